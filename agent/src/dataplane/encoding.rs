//! What the cgroup datapath's maps hold for a fault (`FAULTD_RULES`, `FAULTD_PEERS`): the
//! kernel encoding of an action, its counter slot and its deadline.

use faultd_common::{ACTION_DROP, ACTION_PASS, ACTION_PEERS, ACTION_REJECT, RuleValue};

use crate::fault::Action;

/// The rules-map value of a key whose faults name peers: the peers map decides.
pub const PEERS_MARKER: RuleValue = RuleValue {
    expires_at_ns: u64::MAX,
    drop_threshold: 0,
    counter_slot: 0,
    action: ACTION_PEERS,
};

/// The peers entry of an excluded prefix: the packet matches no fault of the key.
pub const PEER_EXCLUDED: RuleValue = RuleValue {
    expires_at_ns: 0,
    drop_threshold: 0,
    counter_slot: 0,
    action: ACTION_PASS,
};

/// The entry of a fault with `action`, counting into `slot`, in force until `expires_at_ns`
/// (CLOCK_MONOTONIC).
pub fn rule_value(action: &Action, slot: u32, expires_at_ns: u64) -> RuleValue {
    RuleValue {
        expires_at_ns,
        drop_threshold: action.drop_threshold(),
        counter_slot: slot,
        action: match action {
            Action::Reject | Action::Reset { .. } => ACTION_REJECT,
            // Delay and bandwidth never reach the map (their shaper applies them).
            Action::Drop { .. } | Action::Delay(_) | Action::Bandwidth(_) => ACTION_DROP,
        },
    }
}
