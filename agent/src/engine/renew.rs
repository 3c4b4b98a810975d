//! Renewals, which never wait for the engine: with the engine busy (kernel or iptables work
//! of other faults), the lease directory answers and records them, and the engine applies them
//! before it next looks at deadlines.

use tokio::time::Instant;

use super::{Engine, Error, State, lease_view_of, not_found};
use crate::dataplane::clock::kernel_deadline;
use crate::fault::LeaseId;
use crate::fault::view::LeaseView;
use crate::lease::Lease;

impl Engine {
    /// Never waits for the engine: when another call holds it (kernel or iptables work), the
    /// renewal is answered from the lease directory and recorded there; the expiry task, woken
    /// here, applies it to the table and the kernel as soon as the engine is free, and no lease
    /// with a renewal recorded expires meanwhile.
    pub fn renew(&self, id: &str) -> Result<LeaseView, Error> {
        self.renew_all(std::slice::from_ref(&id.to_string()))
            .pop()
            .unwrap_or_else(|| Err(not_found("lease", id)))
    }

    /// `renew` for several leases at once (a KeepAlive stream's queued requests), in order.
    /// Runs on the caller's thread: it never blocks on the engine, and when it gets the engine
    /// it only writes deadlines (map updates; expiry is the expiry task's).
    pub fn renew_all(&self, ids: &[LeaseId]) -> Vec<Result<LeaseView, Error>> {
        let now = Instant::now();
        let state = match self.state.try_lock() {
            Ok(state) => Some(state),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let answers = match state {
            None => {
                self.metrics.renewals_deferred.inc_by(ids.len() as u64);
                ids.iter()
                    .map(|id| {
                        self.directory
                            .renew(id, now)
                            .map(|lease| lease_view_of(&lease))
                            .ok_or_else(|| not_found("lease", id))
                    })
                    .collect()
            }
            Some(mut state) => {
                state.apply_renewals();
                ids.iter()
                    .map(|id| {
                        // Past its deadline it is expiring: the expiry task reverts it.
                        if state.leases.get(id).is_none_or(|l| l.deadline <= now) {
                            return Err(not_found("lease", id));
                        }
                        state
                            .renew_lease(id, now)
                            .map(|lease| lease_view_of(&lease))
                    })
                    .collect()
            }
        };
        self.deadline_changed.notify_one();
        answers
    }
}

impl State {
    /// Renews lease `id` as of `now` and pushes its new deadline into every kernel entry of its
    /// faults.
    fn renew_lease(&mut self, id: &str, now: Instant) -> Result<Lease, Error> {
        let lease = self
            .leases
            .renew(id, now)
            .ok_or_else(|| not_found("lease", id))?
            .clone();
        for fault_id in &lease.faults {
            let Some(fault) = self.faults.get(fault_id) else {
                continue;
            };
            let deadline = kernel_deadline(lease.deadline.min(fault.ends_at));
            if let Some(watcher) = &fault.watcher {
                watcher.renew(deadline);
            }
            self.refresh(fault_id, deadline)?;
        }
        Ok(lease)
    }

    /// Applies the renewals answered while the engine was busy.
    pub(super) fn apply_renewals(&mut self) {
        for (id, at) in self.leases.take_pending() {
            if let Err(e) = self.renew_lease(&id, at) {
                tracing::warn!(lease = %id, error = %e, "applying a renewal");
            }
        }
    }
}
