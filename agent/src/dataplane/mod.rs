//! Kernel mechanisms, one file each. The engine talks to them through `Dataplane`; unit tests of
//! the engine use `fake::FakeDataplane`.

pub mod cgroup_skb;
pub mod fake;
pub mod sock_diag;

use faultd_common::{Counters, RuleKey, RuleValue};

use crate::fault::Action;
pub use sock_diag::SocketFilter;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "faultd was built without the eBPF toolchain (empty stub object); run `cargo xtask setup` and rebuild"
    )]
    StubObject,
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error("attaching {program} to {cgroup}: {reason}")]
    Attach {
        program: &'static str,
        cgroup: String,
        reason: String,
    },
    #[error("updating BPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("resetting connections: {0}")]
    SockDiag(#[from] sock_diag::SockDiagError),
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
    /// The counters of a slot, summed over CPUs.
    fn counters(&self, slot: u32) -> Result<Counters, DataplaneError>;
    fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError>;
    /// The mechanism that applies `action` (shown to users), or what this kernel lacks for it.
    fn mechanism(&self, action: &Action) -> Result<&'static str, String>;
    /// What tears down established TCP connections (`reset`): called with a filter, it returns
    /// how many connections it destroyed. Shared, so a watcher thread can call it too.
    fn connection_killer(&self) -> ConnectionKiller;
    /// What this datapath probed beyond loading, for the capability report.
    fn capabilities(&self) -> Vec<crate::caps::Capability> {
        Vec::new()
    }
}

pub type ConnectionKiller =
    std::sync::Arc<dyn Fn(&SocketFilter) -> Result<usize, DataplaneError> + Send + Sync>;
