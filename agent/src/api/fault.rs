//! faultd.v1.FaultService.

use std::sync::Arc;
use std::time::Instant;

use faultd_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{Calls, convert, peer};
use crate::caps::Capabilities;
use crate::engine::Engine;

const SERVICE: &str = "faultd.v1.FaultService";

/// How long Abort waits for the kernel clean-up at most, whatever the call's deadline.
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long Abort may wait for the clean-up: until shortly before the call's deadline
/// (`grpc-timeout`, so that the answer still arrives), at most `ABORT_WAIT`.
fn abort_wait(metadata: &tonic::metadata::MetadataMap) -> std::time::Duration {
    let deadline = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout);
    match deadline {
        // A tenth of it (at most 1 s) is left for the answer to travel.
        Some(d) => d.saturating_sub((d / 10).min(std::time::Duration::from_secs(1))),
        None => ABORT_WAIT,
    }
    .min(ABORT_WAIT)
}

/// A `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub struct FaultApi {
    engine: Arc<Engine>,
    caps: Arc<Capabilities>,
    /// Turns true when faultd stops: open Watch streams end then.
    shutdown: watch::Receiver<bool>,
    calls: Calls,
}

impl FaultApi {
    pub fn new(
        engine: Arc<Engine>,
        caps: Arc<Capabilities>,
        shutdown: watch::Receiver<bool>,
        calls: Calls,
    ) -> Self {
        Self {
            engine,
            caps,
            shutdown,
            calls,
        }
    }

    async fn inject(&self, request: pb::InjectRequest) -> Result<pb::Fault, Status> {
        let lease = convert::lease_ref(request.lease.as_ref())?;
        let spec = convert::fault_spec(request.fault)?;
        let dry_run = request.dry_run;
        let view = super::on_engine(&self.engine, move |engine| match dry_run {
            true => engine.dry_run(lease, spec),
            false => engine.inject(lease, spec),
        })
        .await??;
        Ok(convert::fault(view))
    }
}

fn fault_id(id: &str) -> Result<&str, Status> {
    crate::fault::limits::id(id, "id")?;
    Ok(id)
}

/// What an Inject asked for, for the audit log: the domain's reading of it when it converts,
/// else the request as it came.
fn inject_json(request: &pb::InjectRequest) -> Value {
    let lease = match &request.lease {
        Some(pb::inject_request::Lease::LeaseId(id)) => json!({ "leaseId": id }),
        Some(pb::inject_request::Lease::Ttl(ttl)) => json!({ "ttl": ttl.to_string() }),
        None => Value::Null,
    };
    let fault = match convert::fault_spec(request.fault.clone()) {
        Ok(spec) => json!({
            "action": format!("{:?}", spec.action),
            "target": spec.target.summary(),
            "labels": spec.labels,
        }),
        Err(_) => json!({ "unconverted": format!("{:?}", request.fault) }),
    };
    json!({ "lease": lease, "dryRun": request.dry_run, "fault": fault })
}

fn fault_json(fault: &pb::Fault) -> Value {
    json!({ "faultId": fault.id, "leaseId": fault.lease_id, "state": fault.state().as_str_name() })
}

#[tonic::async_trait]
impl pb::fault_service_server::FaultService for FaultApi {
    async fn inject(
        &self,
        request: Request<pb::InjectRequest>,
    ) -> Result<Response<pb::Fault>, Status> {
        let peer = peer::of(&request);
        let request = request.into_inner();
        let what = inject_json(&request);
        let result = self.inject(request).await;
        self.calls
            .mutating(SERVICE, "Inject", &peer, what, &result, fault_json);
        result.map(Response::new)
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::Fault>, Status> {
        let peer = peer::of(&request);
        let id = request.into_inner().id;
        let result = match fault_id(&id) {
            Ok(valid) => {
                let valid = valid.to_owned();
                super::try_on_engine(&self.engine, move |engine| engine.remove(&valid))
                    .await
                    .map(convert::fault)
            }
            Err(status) => Err(status),
        };
        let what = json!({ "id": id });
        self.calls
            .mutating(SERVICE, "Remove", &peer, what, &result, fault_json);
        result.map(Response::new)
    }

    async fn get(
        &self,
        request: Request<pb::GetFaultRequest>,
    ) -> Result<Response<pb::Fault>, Status> {
        let result = match fault_id(&request.get_ref().id) {
            Ok(id) => {
                let id = id.to_owned();
                super::try_on_engine(&self.engine, move |engine| engine.get(&id)).await
            }
            Err(status) => Err(status),
        }
        .map(convert::fault);
        self.calls.read(SERVICE, "Get", &result);
        result.map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::ListFaultsRequest>,
    ) -> Result<Response<pb::ListFaultsResponse>, Status> {
        let select = convert::select(request.get_ref().select());
        let result = super::on_engine(&self.engine, move |engine| engine.faults(select))
            .await
            .map(|faults| pb::ListFaultsResponse {
                faults: faults.into_iter().map(convert::fault).collect(),
            });
        self.calls.read(SERVICE, "List", &result);
        result.map(Response::new)
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let peer = peer::of(&request);
        let started = Instant::now();
        let wait = abort_wait(request.metadata());
        let aborted = super::on_engine(&self.engine, move |engine| engine.abort(wait)).await?;
        let took = started.elapsed();
        if aborted.still_reverting.is_empty() {
            tracing::warn!(
                faults = aborted.faults.len(),
                leases = aborted.leases.len(),
                took_us = took.as_micros() as u64,
                "abort: everything reverted"
            );
        } else {
            tracing::error!(
                faults = aborted.faults.len(),
                leases = aborted.leases.len(),
                still_reverting = aborted.still_reverting.len(),
                took_us = took.as_micros() as u64,
                "abort: some faults are still being taken out of the kernel"
            );
        }
        let result = Ok(pb::AbortResponse {
            reverted_fault_ids: aborted.faults,
            revoked_lease_ids: aborted.leases,
            took: Some(crate::api::convert::duration_to_proto(took)),
            still_reverting_fault_ids: aborted.still_reverting,
        });
        self.calls
            .mutating(SERVICE, "Abort", &peer, json!({}), &result, |abort| {
                json!({
                    "revertedFaultIds": abort.reverted_fault_ids,
                    "revokedLeaseIds": abort.revoked_lease_ids,
                    "stillRevertingFaultIds": abort.still_reverting_fault_ids,
                    "took": crate::duration::format(took),
                })
            });
        result.map(Response::new)
    }

    async fn capabilities(
        &self,
        _: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        let result = Ok(super::caps::to_proto(&self.caps));
        self.calls.read(SERVICE, "Capabilities", &result);
        result.map(Response::new)
    }

    type WatchStream = super::events::EventStream;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let result = Ok(super::events::stream(&self.engine, self.shutdown.clone()));
        self.calls.read(SERVICE, "Watch", &result);
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn abort_waits_within_the_calls_deadline() {
        assert_eq!(grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("S"), None);
        assert_eq!(grpc_timeout("123456789S"), None);
        assert_eq!(grpc_timeout("-1S"), None);
        assert_eq!(grpc_timeout("5x"), None);

        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(abort_wait(&metadata), ABORT_WAIT);
        metadata.insert("grpc-timeout", "10S".parse().unwrap());
        assert_eq!(abort_wait(&metadata), Duration::from_secs(9));
        metadata.insert("grpc-timeout", "500m".parse().unwrap());
        assert_eq!(abort_wait(&metadata), Duration::from_millis(450));
        metadata.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(abort_wait(&metadata), ABORT_WAIT);
    }
}
