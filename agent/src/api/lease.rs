//! faultd.v1.LeaseService.

use std::pin::Pin;
use std::sync::Arc;

use faultd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::engine::Engine;

pub struct LeaseApi {
    engine: Arc<Engine>,
}

impl LeaseApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<pb::Lease, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lease_service_server::LeaseService for LeaseApi {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let request = request.into_inner();
        let ttl = convert::ttl(request.ttl.as_ref(), "ttl")?;
        let lease = self
            .engine
            .grant(ttl, request.labels.into_iter().collect())?;
        Ok(Response::new(convert::lease(lease)))
    }

    type KeepAliveStream = LeaseStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // Ends when the client closes its side or goes away, or on the first failed renewal.
            while let Some(Ok(message)) = inbound.next().await {
                let reply = convert::lease_id(&message.lease_id, "lease_id")
                    .map_err(Status::from)
                    .and_then(|id| engine.renew(&id).map_err(Status::from))
                    .map(convert::lease);
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let id = convert::lease_id(&request.get_ref().lease_id, "lease_id")?;
        Ok(Response::new(convert::lease(self.engine.renew(&id)?)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let id = convert::lease_id(&request.get_ref().lease_id, "lease_id")?;
        let (lease, reverted) = self.engine.revoke(&id)?;
        Ok(Response::new(pb::RevokeResponse {
            lease: Some(convert::lease(lease)),
            reverted_fault_ids: reverted,
        }))
    }

    async fn time_to_live(
        &self,
        request: Request<pb::TimeToLiveRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let id = convert::lease_id(&request.get_ref().lease_id, "lease_id")?;
        Ok(Response::new(convert::lease(
            self.engine.time_to_live(&id)?,
        )))
    }

    async fn list(
        &self,
        _: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let leases = self
            .engine
            .leases()
            .into_iter()
            .map(convert::lease)
            .collect();
        Ok(Response::new(pb::ListLeasesResponse { leases }))
    }
}
