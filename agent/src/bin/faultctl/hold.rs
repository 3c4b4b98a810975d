//! The --keepalive hold: faultctl renews the lease of the fault it injected until Ctrl-C or
//! SIGTERM, then reverts the fault (revoking a lease it granted, or removing only its fault from
//! a lease given with --lease). If faultd stops answering, the hold fails and says so.

use faultd::api::convert;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use faultd::duration;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use faultd_proto::v1::{KeepAliveRequest, Lease, RemoveRequest, RevokeRequest};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::rpc_error;
use crate::output::fields::id_list;
use crate::signals::Signals;

/// A lease faultctl keeps alive for one injected fault.
pub struct Hold {
    pub lease_id: String,
    pub fault_id: String,
    /// Granted by faultctl: revoked at the end. A lease given with --lease belongs to someone
    /// else, so only our fault is removed and the lease is left to its owner.
    pub owned: bool,
}

impl Hold {
    /// Renews the lease every ttl/3 until a signal (then reverts, Ok) or a failure (Err).
    pub async fn run(
        &self,
        leases: &mut LeaseServiceClient<Channel>,
        faults: &mut FaultServiceClient<Channel>,
        signals: &mut Signals,
        ttl_hint: Option<Duration>,
    ) -> Result<()> {
        let id = &self.lease_id;
        let (sender, receiver) = mpsc::channel(4);
        // Renew at once: for a --lease ID the answer also tells us the lease's ttl.
        self.renew(&sender)?;
        let answers = leases.keep_alive(ReceiverStream::new(receiver)).await;
        let mut answers = answers
            .map_err(rpc_error(format!("keeping lease {id} alive")))?
            .into_inner();
        let mut ttl = ttl_hint.unwrap_or(Duration::from_secs(3));
        let mut last_answer = Instant::now();
        let mut next_renewal = Instant::now() + renewal_period(ttl);
        eprintln!("faultctl: keeping lease {id} alive; Ctrl-C or SIGTERM reverts the fault");
        loop {
            tokio::select! {
                reason = signals.recv() => return self.release(leases, faults, reason).await,
                () = sleep_until(next_renewal) => {
                    self.renew(&sender)?;
                    next_renewal = Instant::now() + renewal_period(ttl);
                }
                () = sleep_until(last_answer + ttl) => bail!(
                    "keeping lease {id} alive: no answer from faultd for {}; the lease has expired",
                    duration::format(ttl)
                ),
                answer = answers.message() => {
                    ttl = self.renewed_ttl(answer)?;
                    last_answer = Instant::now();
                }
            }
        }
    }

    fn renew(&self, sender: &mpsc::Sender<KeepAliveRequest>) -> Result<()> {
        let request = KeepAliveRequest {
            lease_id: self.lease_id.clone(),
        };
        match sender.try_send(request) {
            // A full queue means faultd is behind on answers; the silence deadline decides.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bail!(
                    "keeping lease {} alive: the keep-alive stream closed",
                    self.lease_id
                )
            }
        }
    }

    /// The lease's ttl from a keep-alive answer, or why holding it has failed.
    fn renewed_ttl(&self, answer: Result<Option<Lease>, Status>) -> Result<Duration> {
        let what = format!("keeping lease {} alive", self.lease_id);
        match answer {
            Ok(Some(lease)) => lease_ttl(&lease)
                .ok_or_else(|| anyhow!("{what}: the lease has expired or was revoked")),
            Ok(None) => bail!("{what}: faultd closed the keep-alive stream"),
            // The stream broke without an answer from faultd: it most likely went away.
            Err(status) if matches!(status.code(), Code::Unavailable | Code::Unknown) => {
                let err = rpc_error(what)(status);
                bail!("{err:#}; if faultd stopped, the fault reverts within the lease's ttl")
            }
            Err(status) => Err(rpc_error(what)(status)),
        }
    }

    async fn release(
        &self,
        leases: &mut LeaseServiceClient<Channel>,
        faults: &mut FaultServiceClient<Channel>,
        reason: &str,
    ) -> Result<()> {
        if self.owned {
            let reverted = revoke(leases, &self.lease_id).await?;
            eprintln!(
                "faultctl: {reason}: revoked lease {}; reverted faults: {}",
                self.lease_id,
                id_list(&reverted)
            );
            return Ok(());
        }
        let request = RemoveRequest {
            id: self.fault_id.clone(),
        };
        match faults.remove(request).await {
            Ok(_) => eprintln!(
                "faultctl: {reason}: removed fault {}; faultctl no longer renews lease {}",
                self.fault_id, self.lease_id
            ),
            // Already reverted with its lease: what we were asked for has happened.
            Err(status) if status.code() == Code::NotFound => {
                eprintln!(
                    "faultctl: {reason}: fault {} was already gone",
                    self.fault_id
                )
            }
            Err(status) => {
                return Err(rpc_error(format!("removing fault {}", self.fault_id))(
                    status,
                ));
            }
        }
        Ok(())
    }
}

/// Revokes a lease and returns the faults that reverted; a lease already gone is not an error.
pub async fn revoke(leases: &mut LeaseServiceClient<Channel>, id: &str) -> Result<Vec<String>> {
    match leases
        .revoke(RevokeRequest {
            lease_id: id.to_string(),
        })
        .await
    {
        Ok(revoked) => Ok(revoked.into_inner().reverted_fault_ids),
        Err(status) if status.code() == Code::NotFound => Ok(Vec::new()),
        Err(status) => Err(rpc_error(format!("revoking lease {id}"))(status)),
    }
}

/// A third of the ttl leaves two more tries before the lease lapses; the floor keeps a tiny
/// ttl from spinning.
fn renewal_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(10))
}

/// The lease's ttl; None when the agent answers with no (or a zero) ttl, i.e. the lease is gone.
pub fn lease_ttl(lease: &Lease) -> Option<Duration> {
    lease
        .ttl
        .as_ref()
        .and_then(convert::duration_from_proto)
        .filter(|ttl| !ttl.is_zero())
}
