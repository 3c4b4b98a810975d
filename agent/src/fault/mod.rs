//! The domain model: what a fault does (`Action`), to whom (`Target`), and how a request is
//! validated. No tonic and no aya types here: the API converts into these, the engine applies them.

use std::collections::BTreeMap;

mod action;
pub mod limits;
mod peers;
pub mod request;
mod target;
mod validate;
pub mod view;
pub mod wire;

pub use action::{Action, Bandwidth, DEFAULT_REORDER_GAP, Delay, MAX_DELAY, MAX_SLICE, Mechanism};
pub use peers::{Cidr, PeerSet};
pub use request::RequestMatch;
pub use target::{Direction, PortRange, Protocol, Scope, Target};

/// A scope as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedScope {
    /// Path relative to faultd's cgroup root (`--cgroup-root`), always starting with `/`.
    /// What the kernel calls the cgroup's path may differ: see `target::namespace_path`.
    pub cgroup_path: String,
    /// The cgroup v2 id (the directory's inode number), as `bpf_skb_cgroup_id` returns it.
    pub cgroup_id: u64,
    /// The cgroup's directory on this host.
    pub dir: std::path::PathBuf,
}

use faultd_common::{DIR_CONNECT, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, RuleKey};

pub type FaultId = String;
pub type LeaseId = String;
pub type Labels = BTreeMap<String, String>;

/// Most kernel entries (protocol × direction × port) one fault may need.
pub const MAX_RULES_PER_FAULT: usize = 4096;

/// Most peer entries (prefixes × kernel keys) one fault may need.
pub const MAX_PEER_ENTRIES_PER_FAULT: usize = 8192;

/// A request field that failed validation: `field` is the path a user typed, e.g.
/// `fault.drop.percent`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
    /// The field is well-formed but larger than faultd accepts (RESOURCE_EXHAUSTED rather than
    /// INVALID_ARGUMENT): see `limits`.
    pub over_limit: bool,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            over_limit: false,
        }
    }

    /// A field over one of faultd's bounds.
    pub fn over_limit(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            over_limit: true,
            ..Self::new(field, reason)
        }
    }
}

/// What a user asks for: an action on a target, with labels.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    pub action: Action,
    pub target: Target,
    pub labels: Labels,
}

impl FaultSpec {
    /// The kernel keys of this fault in the scope `scope_id`, without duplicates. Packet faults
    /// key on (protocol, direction, port); connection faults on the TCP connect's destination
    /// port (a `reset` with `after_bytes` refuses nothing, so it has no keys).
    pub fn rule_keys(&self, scope_id: u64) -> Vec<RuleKey> {
        if self.target.request.is_some() {
            // Requests are what the workload sends to the ports.
            let mut keys: Vec<_> = self
                .target
                .ports
                .iter()
                .flat_map(|r| r.first..=r.last)
                .flat_map(|port| {
                    // lose_reply also watches the replies coming back.
                    let reply = (self.action == Action::LoseReply)
                        .then(|| RuleKey::new(scope_id, PROTO_TCP, DIR_INGRESS, port));
                    std::iter::once(RuleKey::new(scope_id, PROTO_TCP, DIR_EGRESS, port))
                        .chain(reply)
                })
                .collect();
            keys.sort_unstable_by_key(|k| (k.direction, k.port));
            keys.dedup();
            return keys;
        }
        if !self.action.on_connections() {
            return self.target.rule_keys(scope_id);
        }
        if !self.action.refuses_connects() {
            return Vec::new();
        }
        let mut keys: Vec<_> = self
            .target
            .ports
            .iter()
            .flat_map(|r| r.first..=r.last)
            .map(|port| RuleKey::new(scope_id, PROTO_TCP, DIR_CONNECT, port))
            .collect();
        keys.sort_unstable_by_key(|k| k.port);
        keys.dedup();
        keys
    }

    /// The spec as it is applied, so that what the API shows is what happens: connection
    /// faults act on TCP connects the workload makes (protocol TCP, direction egress); on an
    /// interface, on the connects it sends, receives or both, as the direction says.
    pub fn normalized(mut self) -> Self {
        if self.action.on_connections() || self.target.request.is_some() {
            self.target.protocol = Protocol::Tcp;
            if !matches!(self.target.scope, Scope::Netns { .. }) {
                self.target.direction = Direction::Egress;
            }
        }
        if self.action.tcp_only() {
            self.target.protocol = Protocol::Tcp;
        }
        self
    }
}

#[cfg(test)]
mod tests;
