//! faultd.v1.FaultService.

use std::sync::Arc;
use std::time::Instant;

use faultd_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::convert;
use crate::caps::Capabilities;
use crate::engine::Engine;
use crate::fault::Invalid;

pub struct FaultApi {
    engine: Arc<Engine>,
    caps: Arc<Capabilities>,
}

impl FaultApi {
    pub fn new(engine: Arc<Engine>, caps: Arc<Capabilities>) -> Self {
        Self { engine, caps }
    }
}

fn fault_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Invalid::new("id", "required").into());
    }
    Ok(id)
}

#[tonic::async_trait]
impl pb::fault_service_server::FaultService for FaultApi {
    async fn inject(
        &self,
        request: Request<pb::InjectRequest>,
    ) -> Result<Response<pb::Fault>, Status> {
        let request = request.into_inner();
        let lease = convert::lease_ref(request.lease.as_ref())?;
        let spec = convert::fault_spec(request.fault)?;
        // A reset walks cgroups and talks netlink in other namespaces: not on an async worker.
        let engine = self.engine.clone();
        let fault = tokio::task::spawn_blocking(move || engine.inject(lease, spec))
            .await
            .map_err(|e| Status::internal(format!("inject task: {e}")))??;
        Ok(Response::new(convert::fault(fault)))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::Fault>, Status> {
        let id = fault_id(&request.get_ref().id)?;
        Ok(Response::new(convert::fault(self.engine.remove(id)?)))
    }

    async fn get(
        &self,
        request: Request<pb::GetFaultRequest>,
    ) -> Result<Response<pb::Fault>, Status> {
        let id = fault_id(&request.get_ref().id)?;
        Ok(Response::new(convert::fault(self.engine.get(id)?)))
    }

    async fn list(
        &self,
        _: Request<pb::ListFaultsRequest>,
    ) -> Result<Response<pb::ListFaultsResponse>, Status> {
        let faults = self
            .engine
            .faults()
            .into_iter()
            .map(convert::fault)
            .collect();
        Ok(Response::new(pb::ListFaultsResponse { faults }))
    }

    async fn abort(
        &self,
        _: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let started = Instant::now();
        let (faults, leases) = self.engine.abort();
        tracing::warn!(
            faults = faults.len(),
            leases = leases.len(),
            "abort: everything reverted"
        );
        Ok(Response::new(pb::AbortResponse {
            reverted_fault_ids: faults,
            revoked_lease_ids: leases,
            took: Some(crate::duration::to_proto(started.elapsed())),
        }))
    }

    async fn capabilities(
        &self,
        _: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        Ok(Response::new(self.caps.to_proto()))
    }
}
