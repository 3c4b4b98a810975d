//! `faultctl inject <action>`: bound the fault with a lease, place it (or only try it, with
//! --dry-run), show it, and with --keepalive hand over to the hold until Ctrl-C or SIGTERM.

use faultd::api::convert;
use std::collections::HashMap;

use anyhow::{Result, anyhow, bail};
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use faultd_proto::v1::{Fault, GrantRequest, InjectRequest, Lease, Target, fault, inject_request};
use tonic::transport::Channel;

use crate::args::inject::{InjectArgs, LeaseChoice};
use crate::args::{Output, label_map};
use crate::error::rpc_error;
use crate::hold::{Hold, lease_ttl, revoke};
use crate::output::json::fault_json;
use crate::output::show;
use crate::output::text::{dry_run_text, injected_text};
use crate::signals::Signals;

/// Places the fault (or, with --dry-run, only shows what would be placed) and shows it; with
/// --keepalive holds its lease until Ctrl-C or SIGTERM.
pub async fn inject(
    faults: &mut FaultServiceClient<Channel>,
    leases: &mut LeaseServiceClient<Channel>,
    args: InjectArgs,
    action: fault::Action,
    output: Output,
) -> Result<()> {
    let labels = label_map(&args.labels).map_err(|why| anyhow!(why))?;
    let target = args.target.to_proto();
    if args.dry_run {
        let lease = given_lease(&args.lease)?;
        let request = inject_request(lease, action, target, labels, true);
        return dry_run(faults, request, output).await;
    }
    // Installed before anything is granted, so a signal during set-up still ends in a revoke
    // instead of the default exit that would leave the fault in force for a whole ttl.
    let mut signals = match args.keepalive {
        true => Some(Signals::install()?),
        false => None,
    };
    let (lease, granted) = lease_for(leases, &args, &labels).await?;
    let request = inject_request(lease, action, target, labels, false);
    let fault = place(faults, leases, request, granted.as_ref()).await?;
    show(output, || injected_text(&fault), fault_json(&fault))?;
    let Some(signals) = signals.as_mut() else {
        return Ok(());
    };
    let ttl_hint = granted.as_ref().and_then(lease_ttl).or(args.lease.ttl);
    let hold = Hold {
        lease_id: fault.lease_id.clone(),
        fault_id: fault.id.clone(),
        owned: granted.is_some(),
    };
    hold.run(leases, faults, signals, ttl_hint).await
}

fn inject_request(
    lease: inject_request::Lease,
    action: fault::Action,
    target: Target,
    labels: HashMap<String, String>,
    dry_run: bool,
) -> InjectRequest {
    InjectRequest {
        lease: Some(lease),
        fault: Some(Fault {
            action: Some(action),
            target: Some(target),
            labels,
            ..Fault::default()
        }),
        dry_run,
    }
}

/// Asks faultd what it would apply, and shows that; nothing changes.
async fn dry_run(
    faults: &mut FaultServiceClient<Channel>,
    request: InjectRequest,
    output: Output,
) -> Result<()> {
    let fault = faults
        .inject(request)
        .await
        .map_err(rpc_error("dry run of the fault"))?
        .into_inner();
    show(output, || dry_run_text(&fault), fault_json(&fault))
}

/// The lease as the flags give it: an existing one (--lease) or a new one of a ttl (--ttl).
fn given_lease(choice: &LeaseChoice) -> Result<inject_request::Lease> {
    match (&choice.lease_id, choice.ttl) {
        (Some(id), _) => Ok(inject_request::Lease::LeaseId(id.clone())),
        (None, Some(ttl)) => Ok(inject_request::Lease::Ttl(convert::duration_to_proto(ttl))),
        (None, None) => bail!("bound the fault with --ttl DURATION or --lease ID"),
    }
}

/// The lease to inject under, and the lease faultctl granted for it, if it did. With
/// --keepalive and --ttl faultctl grants the lease itself, so it can renew it and revoke it.
async fn lease_for(
    leases: &mut LeaseServiceClient<Channel>,
    args: &InjectArgs,
    labels: &HashMap<String, String>,
) -> Result<(inject_request::Lease, Option<Lease>)> {
    let (None, Some(ttl), true) = (&args.lease.lease_id, args.lease.ttl, args.keepalive) else {
        return Ok((given_lease(&args.lease)?, None));
    };
    let request = GrantRequest {
        ttl: Some(convert::duration_to_proto(ttl)),
        labels: labels.clone(),
    };
    let lease = leases
        .grant(request)
        .await
        .map_err(rpc_error("granting a lease"))?;
    let lease = lease.into_inner();
    Ok((
        inject_request::Lease::LeaseId(lease.id.clone()),
        Some(lease),
    ))
}

/// Injects the fault; if faultd refuses it, revokes the lease faultctl granted for it.
async fn place(
    faults: &mut FaultServiceClient<Channel>,
    leases: &mut LeaseServiceClient<Channel>,
    request: InjectRequest,
    granted: Option<&Lease>,
) -> Result<Fault> {
    match faults.inject(request).await {
        Ok(fault) => Ok(fault.into_inner()),
        Err(status) => {
            if let Some(lease) = granted {
                // The lease is empty but ours; do not leave it behind until it expires.
                if let Err(err) = revoke(leases, &lease.id).await {
                    eprintln!("faultctl: {err:#}");
                }
            }
            Err(rpc_error("injecting the fault")(status))
        }
    }
}
