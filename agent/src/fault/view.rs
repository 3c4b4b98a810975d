//! Faults and leases as the API shows them, and how a fault ended: what the engine answers
//! with, what events carry and what metrics read. Plain data, no behaviour beyond naming.

use std::time::{Duration, SystemTime};

use faultd_common::Counters;

use super::{FaultId, FaultSpec, Labels, LeaseId, ResolvedScope};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultState {
    Active,
    Reverted,
    /// What a dry run would apply; nothing was.
    DryRun,
    /// Ended, but taking it out of the kernel failed: retried until it succeeds.
    RevertFailing,
}

/// A fault as the API shows it.
#[derive(Clone, Debug)]
pub struct FaultView {
    pub id: FaultId,
    pub lease_id: LeaseId,
    pub spec: FaultSpec,
    pub resolved: ResolvedScope,
    pub rules: usize,
    pub state: FaultState,
    pub counters: Counters,
    /// Connections torn down by a `reset`.
    pub connections_reset: u64,
    pub expires_at: SystemTime,
    pub remaining: Duration,
    pub mechanism: &'static str,
    /// When, how and why the fault ended; None while it is in force.
    pub ended: Option<Ending>,
}

/// How a fault ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    pub at: SystemTime,
    pub reason: RevertReason,
    /// e.g. "lease expired", "max_fault_duration reached".
    pub detail: String,
    /// Set while taking the fault out of the kernel fails.
    pub failing: Option<RevertFailure>,
}

/// Why a fault's revert fails, while it is retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevertFailure {
    /// The last attempt's error.
    pub error: String,
    /// Attempts that failed so far.
    pub attempts: u32,
}

impl FaultView {
    /// What the fault did, by effect: from its kernel counters (packets dropped, connects
    /// refused, packets delayed), from its NFQUEUE lane (packets duplicated, corrupted,
    /// reordered, segments sliced) and from user space (connections reset).
    pub fn effects(&self) -> [(&'static str, u64); 8] {
        [
            ("dropped", self.counters.dropped),
            ("refused", self.counters.refused),
            ("delayed", self.counters.delayed),
            ("reset", self.connections_reset),
            ("duplicated", self.counters.duplicated),
            ("corrupted", self.counters.corrupted),
            ("reordered", self.counters.reordered),
            ("sliced", self.counters.sliced),
        ]
    }
}

/// A lease as the API shows it.
#[derive(Clone, Debug)]
pub struct LeaseView {
    pub id: LeaseId,
    pub ttl: Duration,
    pub expires_at: SystemTime,
    pub remaining: Duration,
    pub fault_ids: Vec<FaultId>,
    pub private: bool,
    pub labels: Labels,
}

/// Why faults were reverted (logs, events, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevertReason {
    Removed,
    Expired,
    Revoked,
    Aborted,
    /// faultd is stopping.
    Shutdown,
    /// Its target went away (its cgroup was deleted).
    TargetGone,
}

impl RevertReason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Aborted => "aborted",
            Self::Shutdown => "shutdown",
            Self::TargetGone => "target_gone",
        }
    }
}
