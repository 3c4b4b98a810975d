//! faultd.v1.LeaseService.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use faultd_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Request, Response, Status, Streaming};

use super::{Calls, convert, peer};
use crate::engine::Engine;

const SERVICE: &str = "faultd.v1.LeaseService";

pub struct LeaseApi {
    engine: Arc<Engine>,
    /// Turns true when faultd stops: open KeepAlive streams end then.
    shutdown: watch::Receiver<bool>,
    calls: Calls,
}

impl LeaseApi {
    pub fn new(engine: Arc<Engine>, shutdown: watch::Receiver<bool>, calls: Calls) -> Self {
        Self {
            engine,
            shutdown,
            calls,
        }
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<pb::Lease, Status>> + Send>>;

/// Most KeepAlive requests one pass of the engine renews.
const KEEPALIVE_BATCH: usize = 64;

fn lease_json(lease: &pb::Lease) -> Value {
    json!({ "leaseId": lease.id, "ttl": lease.ttl.map(|t| t.to_string()) })
}

#[tonic::async_trait]
impl pb::lease_service_server::LeaseService for LeaseApi {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let peer = peer::of(&request);
        let request = request.into_inner();
        let what = json!({
            "ttl": request.ttl.map(|t| t.to_string()),
            "labels": request.labels,
        });
        let result = match convert::check_labels(&request.labels, "labels")
            .and_then(|()| convert::ttl(request.ttl.as_ref(), "ttl"))
        {
            Ok(ttl) => {
                let labels = request.labels.into_iter().collect();
                super::try_on_engine(&self.engine, move |engine| engine.grant(ttl, labels)).await
            }
            Err(invalid) => Err(invalid.into()),
        }
        .map(convert::lease);
        self.calls
            .mutating(SERVICE, "Grant", &peer, what, &result, lease_json);
        result.map(Response::new)
    }

    type KeepAliveStream = LeaseStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let peer = peer::of(&request);
        let mut inbound = request.into_inner();
        let engine = self.engine.clone();
        let calls = self.calls.clone();
        let (tx, rx) = mpsc::channel(16);
        let shutdown = super::stopped(self.shutdown.clone());
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            // One audit line per stream, when it ends: which leases it renewed, how often.
            let mut renewed = BTreeSet::new();
            let mut renewals = 0u64;
            let mut ended: Result<(), Status> = Ok(());
            // Ends when the client closes its side or goes away, on the first failed renewal,
            // or when faultd stops.
            loop {
                let message = tokio::select! {
                    message = inbound.next() => match message {
                        Some(Ok(message)) => message,
                        Some(Err(status)) => {
                            ended = Err(status);
                            break;
                        }
                        None => break,
                    },
                    () = &mut shutdown => {
                        let status = Status::unavailable("faultd is stopping; every fault was reverted");
                        ended = Err(status.clone());
                        let _client_gone = tx.send(Err(status)).await;
                        break;
                    }
                };
                // With the requests already queued behind it: one pass of the engine for all.
                let mut batch = vec![message];
                while batch.len() < KEEPALIVE_BATCH {
                    match tokio::time::timeout(Duration::ZERO, inbound.next()).await {
                        Ok(Some(Ok(message))) => batch.push(message),
                        Ok(Some(Err(status))) => {
                            ended = Err(status);
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                let ids: Result<Vec<String>, Status> = batch
                    .iter()
                    .map(|m| convert::lease_id(&m.lease_id, "lease_id").map_err(Status::from))
                    .collect();
                let replies: Vec<Result<pb::Lease, Status>> = match ids {
                    // On this task: renewals never block (see Engine::renew_all).
                    Ok(ids) => engine
                        .renew_all(&ids)
                        .into_iter()
                        .map(|a| a.map(convert::lease).map_err(Status::from))
                        .collect(),
                    Err(status) => vec![Err(status)],
                };
                let mut stop = ended.is_err();
                for reply in replies {
                    match &reply {
                        Ok(lease) => {
                            renewals += 1;
                            renewed.insert(lease.id.clone());
                        }
                        Err(status) => ended = Err(status.clone()),
                    }
                    let failed = reply.is_err();
                    if tx.send(reply).await.is_err() || failed {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
            let what = json!({ "leaseIds": renewed, "renewals": renewals });
            let result = match ended {
                // A client that goes away mid-stream is the normal end of a keep-alive.
                Err(status) if status.code() == Code::Cancelled => Ok(()),
                other => other,
            };
            calls.mutating(SERVICE, "KeepAlive", &peer, what, &result, |()| Value::Null);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let peer = peer::of(&request);
        let id = &request.get_ref().lease_id;
        let result = match convert::lease_id(id, "lease_id") {
            // Never blocks (see Engine::renew_all).
            Ok(id) => self
                .engine
                .renew(&id)
                .map_err(Status::from)
                .map(convert::lease),
            Err(invalid) => Err(Status::from(invalid)),
        };
        let what = json!({ "leaseId": id });
        self.calls
            .mutating(SERVICE, "Renew", &peer, what, &result, lease_json);
        result.map(Response::new)
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let peer = peer::of(&request);
        let id = &request.get_ref().lease_id;
        let result = match convert::lease_id(id, "lease_id") {
            Ok(id) => super::try_on_engine(&self.engine, move |engine| engine.revoke(&id)).await,
            Err(invalid) => Err(Status::from(invalid)),
        }
        .map(|(lease, reverted)| pb::RevokeResponse {
            lease: Some(convert::lease(lease)),
            reverted_fault_ids: reverted,
        });
        let what = json!({ "leaseId": id });
        self.calls.mutating(
            SERVICE,
            "Revoke",
            &peer,
            what,
            &result,
            |revoked| json!({ "revertedFaultIds": revoked.reverted_fault_ids }),
        );
        result.map(Response::new)
    }

    async fn time_to_live(
        &self,
        request: Request<pb::TimeToLiveRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let result = match convert::lease_id(&request.get_ref().lease_id, "lease_id") {
            Ok(id) => {
                super::try_on_engine(&self.engine, move |engine| engine.time_to_live(&id)).await
            }
            Err(invalid) => Err(invalid.into()),
        }
        .map(convert::lease);
        self.calls.read(SERVICE, "TimeToLive", &result);
        result.map(Response::new)
    }

    async fn list(
        &self,
        _: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let result = super::on_engine(&self.engine, Engine::leases)
            .await
            .map(|leases| pb::ListLeasesResponse {
                leases: leases.into_iter().map(convert::lease).collect(),
            });
        self.calls.read(SERVICE, "List", &result);
        result.map(Response::new)
    }
}
