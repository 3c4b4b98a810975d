//! Kernel mechanisms, one file each. The engine talks to the cgroup_skb datapath through
//! `Dataplane` and to the mechanisms that delay and pace packets through `Shaper`; unit tests of
//! the engine use `fake::FakeDataplane` and `fake::FakeShaper`.

mod cgroup_links;
pub mod cgroup_skb;
pub mod clock;
pub mod coverage;
pub mod encoding;
mod error;
pub mod fake;
pub mod netfilter;
pub mod nfqueue;
pub mod peer_marker;
pub mod qdisc_probe;
pub mod requests;
pub mod rtnl;
pub mod sock_diag;
pub mod tc;

use faultd_common::{Counters, RuleKey, RuleValue};

use crate::fault::{Action, Cidr, FaultId, Mechanism, Target};
use crate::target::ResolvedScope;
pub use error::{AttachFailure, DataplaneError, LoadError, TcError, Unavailable};
pub use requests::RequestEntry;
pub use sock_diag::SocketFilter;

/// TCX links exist from Linux 6.6 on.
pub(crate) fn tcx_available() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// `BPF_EXIST` (uapi linux/bpf.h): update an entry only if it exists, so a refresh racing a
/// removal cannot bring the entry back.
pub(crate) const BPF_EXIST: u64 = 2;

/// An entry of the peers map: the prefix `cidr` of the remote address, under the rule `rule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerEntry {
    pub rule: RuleKey,
    pub cidr: Cidr,
}

/// A datapath keyed by `RuleKey`.
pub trait Dataplane: Send {
    /// Adds entries whose keys it does not hold yet (the engine checks that). All or nothing:
    /// on error, the entries this call added are taken out again.
    fn insert(&mut self, rules: &[(RuleKey, RuleValue)]) -> Result<(), DataplaneError>;
    /// Overwrites the values of entries it holds (a renewed deadline). On error some entries
    /// keep their old, earlier deadline: the fault can only end sooner, never outlive a lease.
    fn refresh(&mut self, rules: &[(RuleKey, RuleValue)]) -> Result<(), DataplaneError>;
    /// Removes entries; missing ones are ignored. Keeps going on error and reports the first.
    fn remove(&mut self, keys: &[RuleKey]) -> Result<(), DataplaneError>;
    /// Inserts or overwrites peers-map entries (their rule holds an `ACTION_PEERS` marker).
    /// On error some entries may be written: the engine takes them out again.
    fn set_peers(&mut self, entries: &[(PeerEntry, RuleValue)]) -> Result<(), DataplaneError>;
    /// Removes peers-map entries; missing ones are ignored. Keeps going on error and reports
    /// the first.
    fn remove_peers(&mut self, entries: &[PeerEntry]) -> Result<(), DataplaneError>;
    /// Attaches the cgroup programs where a fault on the cgroup of `scope` needs them (at the
    /// cgroup, unless a cgroup containing it holds faults already), or counts one more fault
    /// on it. All or nothing.
    fn attach_cgroup(&mut self, scope: &ResolvedScope) -> Result<(), DataplaneError>;
    /// One fault less on the cgroup `scope_id`: with its last, the programs leave it (for the
    /// faulted cgroups inside it, if any). A cgroup no fault covers runs none of them.
    fn release_cgroup(&mut self, scope_id: u64) -> Result<(), DataplaneError>;
    /// Attaches the tc programs to the interface of a `netns{path, interface}` scope (its
    /// `dir` is the namespace's path), or counts one more fault on it if they are attached.
    fn attach_interface(
        &mut self,
        scope: &ResolvedScope,
        interface: &str,
    ) -> Result<(), DataplaneError>;
    /// One fault less on the interface of `scope_id`: at the last, the programs are detached
    /// (and a clsact qdisc faultd added removed).
    fn release_interface(&mut self, scope_id: u64) -> Result<(), DataplaneError>;
    /// The counters of a slot, summed over CPUs.
    fn counters(&self, slot: u32) -> Result<Counters, DataplaneError>;
    fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError>;
    /// The mechanism that applies `action` (shown to users), or what this kernel lacks for it.
    fn mechanism(&self, action: &Action) -> Result<&'static str, Unavailable>;
    /// What tears down established TCP connections (`reset`): called with a filter, it returns
    /// how many connections it destroyed. Shared, so a watcher thread can call it too.
    fn connection_killer(&self) -> ConnectionKiller;
    /// Writes the request match of the fault counting into `slot` (before its rules).
    fn set_request(&mut self, _slot: u32, _entry: &RequestEntry) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Takes it out (after its rules); missing entries are ignored.
    fn remove_request(&mut self, _slot: u32, _entry: &RequestEntry) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// The mechanism that applies `action` to matched requests, or what this kernel lacks.
    fn request_mechanism(&self, action: &Action) -> Result<&'static str, Unavailable> {
        self.mechanism(action)
    }
    /// What this datapath probed beyond loading, for the capability report.
    fn capabilities(&self) -> Vec<crate::capability::Capability> {
        Vec::new()
    }
}

pub type ConnectionKiller =
    std::sync::Arc<dyn Fn(&SocketFilter) -> Result<usize, DataplaneError> + Send + Sync>;

/// One delay or bandwidth fault, as a shaping mechanism receives it.
#[derive(Clone, Copy, Debug)]
pub struct Shaped<'a> {
    pub id: &'a FaultId,
    /// `Action::Delay` or `Action::Bandwidth`.
    pub action: &'a Action,
    pub target: &'a Target,
    pub resolved: &'a ResolvedScope,
    /// The target's keys in the scope (as the cgroup_skb datapath would store them).
    pub keys: &'a [RuleKey],
    /// The fault's slot in the per-CPU counters map, for mechanisms that count in BPF.
    pub slot: u32,
    /// The lease deadline, CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`): the mechanism stops
    /// delaying at this instant by itself, even if the agent cannot remove the fault in time.
    pub expires_at_ns: u64,
}

/// A mechanism that delays or paces the packets of a fault: netem, EDT or NFQUEUE. The engine
/// picks one per fault (the user's choice, else the first available in
/// `Mechanism::PREFERENCE`), and calls it under its lock, so calls never overlap.
pub trait Shaper: Send {
    fn mechanism(&self) -> Mechanism;
    /// Why this mechanism cannot apply `action` on this host, or None if it can. The reason
    /// names what is missing (it is shown as FAILED_PRECONDITION).
    fn unavailable(&self, action: &Action) -> Option<String>;
    /// Like `unavailable`, for this target (e.g. a mechanism that shapes egress only).
    fn unavailable_for(&self, action: &Action, _target: &Target) -> Option<String> {
        self.unavailable(action)
    }
    /// Applies the fault, all or nothing. May block (netlink, exec of iptables).
    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError>;
    /// Moves the fault's deadline (a renewed lease).
    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError>;
    /// Stops delaying at once and takes the fault out; unknown ids are ignored. Must not block
    /// for long (it runs on lease expiry): slow clean-up may finish in the background.
    fn remove(&mut self, id: &str) -> Result<(), DataplaneError>;
    fn counters(&self, id: &str) -> Result<Counters, DataplaneError>;
    /// Waits until background clean-up of removed faults is done (at shutdown).
    fn flush(&mut self) {}
    /// Where the clean-up that `remove` left to the background stands.
    fn cleanup(&self, _id: &str) -> Cleanup {
        Cleanup::Done
    }
    /// Tries a failed clean-up again, in the background.
    fn retry(&mut self, _id: &str) {}
}

/// Where the background clean-up of a removed fault stands (`Shaper::cleanup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing of the fault is left.
    Done,
    /// Under way.
    Pending,
    /// It failed with this error; what is left waits for `Shaper::retry`.
    Failed(String),
}

/// A mechanism this host (or this build) lacks. It stands in the engine's list so that a user
/// who forces it learns what is missing, e.g. "the kernel has no sch_netem".
pub struct MissingShaper {
    pub mechanism: Mechanism,
    pub reason: String,
}

impl Shaper for MissingShaper {
    fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    fn unavailable(&self, _action: &Action) -> Option<String> {
        Some(self.reason.clone())
    }

    fn apply(&mut self, _fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        Err(DataplaneError::Shaper {
            mechanism: self.mechanism.name(),
            reason: self.reason.clone(),
        })
    }

    fn refresh(&mut self, _id: &str, _expires_at_ns: u64) -> Result<(), DataplaneError> {
        Ok(())
    }

    fn remove(&mut self, _id: &str) -> Result<(), DataplaneError> {
        Ok(())
    }

    fn counters(&self, _id: &str) -> Result<Counters, DataplaneError> {
        Ok(Counters::default())
    }
}
