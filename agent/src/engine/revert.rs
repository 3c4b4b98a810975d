//! Taking a fault out, and making sure it is out. A fault ends (REVERTED, its Reverted event,
//! the ended record) only once everything it held is gone from the kernel: a mechanism that
//! cleans up in the background (NFQUEUE's iptables rules) is asked until it says so. A revert
//! that fails is not reported as done: the fault shows as REVERT_FAILING with the error (Get,
//! List, a Failed event per failed attempt, `faultd_reverts_failing`), and the expiry task tries
//! again with growing pauses until it succeeds.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use faultd_common::Counters;
use tokio::time::Instant;

use super::placement::{Entries, Placement};
use super::{FaultState, FaultView, State};
use crate::dataplane::{Cleanup, DataplaneError};
use crate::events::EventKind;
use crate::fault::view::{Ending, RevertFailure, RevertReason};

/// The first pause before a failed revert is tried again; it doubles up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// How often a clean-up under way in the background is asked whether it is done.
const POLL: Duration = Duration::from_millis(20);

/// A fault out of force whose kernel state is not known to be gone yet.
pub(super) struct Reverting {
    /// The fault as it will stay readable: final counters and ending.
    pub view: FaultView,
    placement: Placement,
    /// Waiting for a background clean-up to report; else the next attempt is at `next_try`.
    awaiting: bool,
    next_try: Instant,
}

impl Reverting {
    pub fn failing(&self) -> bool {
        self.view.state == FaultState::RevertFailing
    }

    /// When the expiry task should look at it again.
    pub fn due(&self, now: Instant) -> Instant {
        if self.awaiting {
            now + POLL
        } else {
            self.next_try
        }
    }
}

impl State {
    /// Takes a fault out of force, the kernel and the tables. It ends here if the kernel
    /// confirms; otherwise it waits in `reverting` until a background clean-up or a retry
    /// does.
    pub(super) fn revert_because(&mut self, id: &str, reason: RevertReason, detail: &str) {
        let started = std::time::Instant::now();
        let Some(fault) = self.faults.remove(id) else {
            return;
        };
        // The final counters, read while the entries are still there: they outlive the fault.
        let counters = self.counters(id, &fault.placement).unwrap_or_else(|e| {
            tracing::warn!(fault = %id, error = %e, "reading the final counters");
            Counters::default()
        });
        let removed = self.unplace(id, &fault.placement);
        // Its keys are free from now on, as within this instance (`unplace` gave them up).
        self.release_claims(id);
        self.fault_ends.remove(&(fault.ends_at, id.to_string()));
        self.leases.remove_fault(&fault.lease_id, id);
        self.metrics
            .reverted(fault.spec.action.name(), reason, started.elapsed());
        let now = SystemTime::now();
        let view = FaultView {
            id: id.to_string(),
            rules: fault.placement.keys.len(),
            state: FaultState::Reverted,
            counters,
            connections_reset: fault.connections_reset.load(Ordering::Relaxed),
            expires_at: now,
            remaining: Duration::ZERO,
            mechanism: fault.mechanism,
            lease_id: fault.lease_id,
            spec: fault.spec,
            resolved: fault.resolved,
            ended: Some(Ending {
                at: now,
                reason,
                detail: detail.to_string(),
                failing: None,
            }),
        };
        let mut reverting = Reverting {
            view,
            placement: fault.placement,
            awaiting: true,
            next_try: Instant::now(),
        };
        match removed {
            Err(e) => self.failed(&mut reverting, &e.to_string(), Instant::now()),
            Ok(()) if self.cleanup(id, &reverting.placement) == Cleanup::Done => {
                tracing::info!(fault = %id, reason = reason.name(), detail, "fault reverted");
                self.ended_now(reverting);
                return;
            }
            Ok(()) => {}
        }
        self.reverting.insert(id.to_string(), reverting);
        self.count_failing();
    }

    /// Moves every reverting fault on: a background clean-up that finished ends the fault or
    /// marks it failing; a failing one whose pause is over is tried again.
    pub(super) fn settle(&mut self, now: Instant) {
        if self.reverting.is_empty() {
            return;
        }
        let ids: Vec<_> = self.reverting.keys().cloned().collect();
        for id in ids {
            let Some(mut reverting) = self.reverting.remove(&id) else {
                continue;
            };
            if !reverting.awaiting {
                if now < reverting.next_try {
                    self.reverting.insert(id, reverting);
                    continue;
                }
                tracing::info!(fault = %id, "trying the failed revert again");
                reverting.awaiting = true;
                if let Err(e) = self.retry(&id, &reverting.placement) {
                    self.failed(&mut reverting, &e.to_string(), now);
                    self.reverting.insert(id, reverting);
                    continue;
                }
            }
            match self.cleanup(&id, &reverting.placement) {
                Cleanup::Pending => {
                    self.reverting.insert(id, reverting);
                }
                Cleanup::Failed(error) => {
                    self.failed(&mut reverting, &error, now);
                    self.reverting.insert(id, reverting);
                }
                Cleanup::Done => {
                    tracing::info!(fault = %id, attempts = reverting.view.ended.as_ref()
                        .and_then(|e| e.failing.as_ref()).map_or(0, |f| f.attempts),
                        "fault reverted");
                    reverting.view.state = FaultState::Reverted;
                    if let Some(ending) = &mut reverting.view.ended {
                        ending.failing = None;
                    }
                    self.ended_now(reverting);
                }
            }
        }
        self.count_failing();
    }

    /// The fault is gone from the kernel: its slot is free, it is readable as ended, and
    /// watchers hear of it.
    fn ended_now(&mut self, reverting: Reverting) {
        self.free_slots.push(reverting.placement.slot);
        let view = reverting.view;
        self.ended.record(view.clone(), Instant::now());
        if self.events.watched()
            && let Some(ending) = &view.ended
        {
            let kind = EventKind::Reverted {
                reason: ending.reason,
                detail: ending.detail.clone(),
            };
            self.events.publish(kind, view);
        }
    }

    /// An attempt to take the fault out failed: shown, counted, and tried again after a pause.
    fn failed(&mut self, reverting: &mut Reverting, error: &str, now: Instant) {
        let view = &mut reverting.view;
        let attempts = view
            .ended
            .as_ref()
            .and_then(|e| e.failing.as_ref())
            .map_or(0, |f| f.attempts)
            + 1;
        let pause = FIRST_PAUSE
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(MAX_PAUSE);
        view.state = FaultState::RevertFailing;
        if let Some(ending) = &mut view.ended {
            ending.failing = Some(RevertFailure {
                error: error.to_string(),
                attempts,
            });
        }
        reverting.awaiting = false;
        reverting.next_try = now + pause;
        self.metrics.revert_failures.inc();
        tracing::error!(fault = %view.id, attempts, error, retry_in_ms = pause.as_millis() as u64,
            "taking the fault out of the kernel failed; trying again");
        if self.events.watched() {
            let message = format!(
                "taking the fault out of the kernel failed (attempt {attempts}): {error}; \
                 trying again in {}",
                crate::duration::format(pause)
            );
            self.events
                .publish(EventKind::Failed { message }, view.clone());
        }
    }

    /// Where the fault's background clean-up stands (only shaping mechanisms have one).
    fn cleanup(&self, id: &str, placement: &Placement) -> Cleanup {
        match &placement.entries {
            Entries::Shaped { shaper, .. } => self.shapers[*shaper].cleanup(id),
            Entries::Rules | Entries::PeerRules(_) => Cleanup::Done,
        }
    }

    /// Takes out again what a failed revert may have left: the entries (removing missing ones
    /// is a no-op), or the mechanism's leftovers.
    fn retry(&mut self, id: &str, placement: &Placement) -> Result<(), DataplaneError> {
        match &placement.entries {
            Entries::Shaped { shaper, .. } => {
                let shaper = &mut self.shapers[*shaper];
                shaper.remove(id)?;
                shaper.retry(id);
                Ok(())
            }
            Entries::Rules => self.dataplane.remove(&placement.keys),
            Entries::PeerRules(peers) => self.remove_peer_fault(id, &placement.keys, peers),
        }
    }

    /// Lets the other instances of the host have the fault's keys.
    pub(super) fn release_claims(&mut self, id: &str) {
        if let Some(claims) = &mut self.claims {
            claims.release(id);
        }
    }

    fn count_failing(&self) {
        let failing = self.reverting.values().filter(|r| r.failing()).count();
        self.metrics.reverts_failing.set(failing as i64);
    }

    /// The earliest time a reverting fault needs looking at.
    pub(super) fn next_revert_check(&self, now: Instant) -> Option<Instant> {
        self.reverting.values().map(|r| r.due(now)).min()
    }
}
