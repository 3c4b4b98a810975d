//! What the engine refuses or fails at, each kind its own variant: the api maps each to one
//! gRPC code (`impl From<Error> for Status`), and Display gives the message users see.

use faultd_common::MAX_FAULTS;

use crate::claims::ClaimError;
use crate::dataplane::{DataplaneError, Unavailable};
use crate::fault::view::RevertReason;
use crate::fault::{FaultId, Invalid, Mechanism};
use crate::policy::Denied;
use crate::target::{ResolveError, ScopeNotFound};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The policy forbids the request.
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("no {kind} {id:?}")]
    NotFound { kind: &'static str, id: String },
    /// A pod or container this node does not run, with where faultd looked.
    #[error(transparent)]
    ScopeNotFound(ScopeNotFound),
    /// The fault overlaps one in force: `fault` says what was asked (action and target),
    /// `holder` which fault holds it.
    #[error("fault.target: {fault} overlaps fault {holder} (remove it first)")]
    Conflict { fault: String, holder: FaultId },
    /// Another faultd instance on this host holds the target (`ClaimError::Held`), or the
    /// instances' shared directory failed.
    #[error("fault.target: {fault} overlaps: {source}")]
    Claimed {
        fault: String,
        #[source]
        source: ClaimError,
    },
    #[error(transparent)]
    Exhausted(#[from] Limit),
    /// The kernel lacks what the action needs (a mechanism, a qdisc, a netfilter target).
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The fault already ended (it is still readable with Get).
    #[error("fault {id:?} already ended ({}); Get shows its final counters", reason.name())]
    Ended { id: String, reason: RevertReason },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

impl From<ResolveError> for Error {
    fn from(error: ResolveError) -> Self {
        match error {
            ResolveError::Invalid(invalid) => Error::Invalid(invalid),
            ResolveError::NotFound(missing) => Error::ScopeNotFound(missing),
        }
    }
}

/// Which limit a request would exceed (RESOURCE_EXHAUSTED).
#[derive(Debug, thiserror::Error)]
pub enum Limit {
    /// The kernel rule map (`MAX_RULES` entries).
    #[error(
        "the kernel rule table holds {capacity} entries; this fault needs {needed} but only \
         {free} are free"
    )]
    RuleTable {
        capacity: u32,
        needed: usize,
        free: usize,
    },
    #[error(
        "{max} faults are active, the most the policy allows (policy max_active_faults); remove \
         one first"
    )]
    PolicyFaults { max: usize },
    /// The per-fault counter slots (`MAX_FAULTS`).
    #[error("{MAX_FAULTS} faults are active, the most this agent holds")]
    FaultSlots,
    #[error(
        "{max} leases are held, the most the policy allows (policy max_leases); revoke one first"
    )]
    PolicyLeases { max: usize },
    #[error("starting the reset watcher thread: {0}")]
    WatcherThread(#[source] std::io::Error),
}

/// Why no mechanism here can apply an action (FAILED_PRECONDITION).
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    /// The datapath lacks what `action` needs.
    #[error("{action} is not available on this kernel: {missing}")]
    Action {
        action: &'static str,
        #[source]
        missing: Unavailable,
    },
    /// The user forced a mechanism that cannot apply the action.
    #[error(
        "fault.{action}.mechanism: {} cannot apply a {action} on this host: {why}",
        mechanism.name().to_uppercase()
    )]
    Forced {
        action: &'static str,
        mechanism: Mechanism,
        why: String,
    },
    /// Every mechanism, in order of preference, with why it cannot.
    #[error(
        "fault.{action}: no mechanism can apply a {action} on this host ({})",
        reasons_text(reasons)
    )]
    NoMechanism {
        action: &'static str,
        reasons: Vec<(Mechanism, String)>,
    },
}

fn reasons_text(reasons: &[(Mechanism, String)]) -> String {
    reasons
        .iter()
        .map(|(mechanism, why)| format!("{}: {why}", mechanism.name()))
        .collect::<Vec<_>>()
        .join("; ")
}
