//! faultd.v1.LeaseService.

use std::pin::Pin;
use std::sync::Arc;

use faultd_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::engine::Engine;

pub struct LeaseApi {
    engine: Arc<Engine>,
    /// Turns true when faultd stops: open KeepAlive streams end then.
    shutdown: watch::Receiver<bool>,
}

impl LeaseApi {
    pub fn new(engine: Arc<Engine>, shutdown: watch::Receiver<bool>) -> Self {
        Self { engine, shutdown }
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
        let shutdown = super::stopped(self.shutdown.clone());
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            // Ends when the client closes its side or goes away, on the first failed renewal,
            // or when faultd stops.
            loop {
                let message = tokio::select! {
                    message = inbound.next() => match message {
                        Some(Ok(message)) => message,
                        _ => break,
                    },
                    () = &mut shutdown => {
                        let status = Status::unavailable("faultd is stopping; every fault was reverted");
                        let _client_gone = tx.send(Err(status)).await;
                        break;
                    }
                };
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
