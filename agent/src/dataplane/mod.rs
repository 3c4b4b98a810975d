//! Kernel mechanisms, one file each. The engine talks to them through `Dataplane`; unit tests of
//! the engine use `fake::FakeDataplane`.

pub mod cgroup_skb;
pub mod edt;
pub mod fake;
pub mod netem;
pub mod rtnl;
pub mod shape;

use faultd_common::{Counters, RuleKey, RuleValue};

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
    #[error("traffic control: {0}")]
    Tc(String),
    #[error("{0}")]
    Unsupported(String),
}

/// `BPF_EXIST` (uapi linux/bpf.h): update an entry only if it exists, so a refresh racing a
/// removal cannot bring the entry back.
pub(crate) const BPF_EXIST: u64 = 2;

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
    /// The name shown to users as the fault's mechanism.
    fn mechanism(&self) -> &'static str;
}
