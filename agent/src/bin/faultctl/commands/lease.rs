//! `faultctl lease ...`: grant, renew, revoke, read and list leases.

use faultd::api::convert;
use std::time::Duration;

use anyhow::{Result, anyhow};
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use faultd_proto::v1::{
    GrantRequest, Lease, ListLeasesRequest, RenewRequest, RevokeRequest, TimeToLiveRequest,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::args::{LeaseCommand, Output, label_map};
use crate::error::rpc_error;
use crate::output::json::{lease_json, object};
use crate::output::show;
use crate::output::text::{lease_detail, lease_table, revoked_text};

/// Runs a lease subcommand; grant, renew and ttl show the lease they answer with.
pub async fn run(
    leases: &mut LeaseServiceClient<Channel>,
    command: LeaseCommand,
    output: Output,
) -> Result<()> {
    let lease = match command {
        LeaseCommand::Grant { ttl, labels } => grant(leases, ttl, &labels).await?,
        LeaseCommand::Renew { id } => renew(leases, &id).await?,
        LeaseCommand::Ttl { id } => time_to_live(leases, &id).await?,
        LeaseCommand::Revoke { id } => return revoke(leases, &id, output).await,
        LeaseCommand::List => return list(leases, output).await,
    };
    show(output, || lease_detail(&lease), lease_json(&lease))
}

async fn grant(
    leases: &mut LeaseServiceClient<Channel>,
    ttl: Duration,
    labels: &[(String, String)],
) -> Result<Lease> {
    let labels = label_map(labels).map_err(|why| anyhow!(why))?;
    let request = GrantRequest {
        ttl: Some(convert::duration_to_proto(ttl)),
        labels,
    };
    let lease = leases
        .grant(request)
        .await
        .map_err(rpc_error("granting a lease"))?;
    Ok(lease.into_inner())
}

async fn renew(leases: &mut LeaseServiceClient<Channel>, id: &str) -> Result<Lease> {
    let request = RenewRequest {
        lease_id: id.to_string(),
    };
    let lease = leases
        .renew(request)
        .await
        .map_err(rpc_error(format!("renewing lease {id}")))?;
    Ok(lease.into_inner())
}

async fn time_to_live(leases: &mut LeaseServiceClient<Channel>, id: &str) -> Result<Lease> {
    let request = TimeToLiveRequest {
        lease_id: id.to_string(),
    };
    let what = format!("reading lease {id}");
    let lease = leases
        .time_to_live(request)
        .await
        .map_err(rpc_error(what))?;
    Ok(lease.into_inner())
}

async fn revoke(leases: &mut LeaseServiceClient<Channel>, id: &str, output: Output) -> Result<()> {
    let request = RevokeRequest {
        lease_id: id.to_string(),
    };
    let revoked = leases
        .revoke(request)
        .await
        .map_err(rpc_error(format!("revoking lease {id}")))?;
    let revoked = revoked.into_inner();
    let json = object(vec![
        (
            "lease",
            revoked.lease.as_ref().map_or(Value::Null, lease_json),
        ),
        ("revertedFaultIds", json!(revoked.reverted_fault_ids)),
    ]);
    let text = || revoked_text(id, &revoked.reverted_fault_ids);
    show(output, text, json)
}

async fn list(leases: &mut LeaseServiceClient<Channel>, output: Output) -> Result<()> {
    let list = leases
        .list(ListLeasesRequest {})
        .await
        .map_err(rpc_error("listing leases"))?;
    let list = list.into_inner().leases;
    let json = json!({ "leases": list.iter().map(lease_json).collect::<Vec<_>>() });
    show(output, || lease_table(&list), json)
}
