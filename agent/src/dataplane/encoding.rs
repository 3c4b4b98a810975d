//! What the datapath's maps hold for a fault (`FAULTD_RULES`, `FAULTD_PEERS`, and the tc
//! classifier's peers trie): the kernel encoding of an action, its counter slot, its deadline,
//! and the trie key of a peer prefix.

use aya::maps::lpm_trie::Key as LpmKey;
use faultd_common::{
    ACTION_DROP, ACTION_PASS, ACTION_PEERS, ACTION_REJECT, ACTION_REQ_DROP, ACTION_REQ_LOSE_REPLY,
    ACTION_REQ_RESET, ACTION_STALL, FAMILY_V4, FAMILY_V6, PEER_KEY_FIXED_BITS, PeerKey, RuleValue,
};

use super::PeerEntry;
use crate::fault::{Action, FaultSpec};

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
            Action::Stall { .. } => ACTION_STALL,
            // Shaped actions never reach the map (their shaper applies them), nor does
            // lose_reply without a request match (validation refuses it).
            Action::Drop { .. }
            | Action::Delay(_)
            | Action::Bandwidth(_)
            | Action::LoseReply
            | Action::SlowConnect { .. }
            | Action::SlowClose { .. }
            | Action::Duplicate { .. }
            | Action::Corrupt { .. }
            | Action::Reorder { .. }
            | Action::Slice { .. } => ACTION_DROP,
        },
    }
}

/// The entry of a fault: `rule_value`, with the request code of the action when the target
/// has a request match (the `FAULTD_REQ_*` maps, keyed by `slot`, say which requests).
pub fn fault_value(spec: &FaultSpec, slot: u32, expires_at_ns: u64) -> RuleValue {
    let mut value = rule_value(&spec.action, slot, expires_at_ns);
    if spec.target.request.is_some() {
        value.action = match spec.action {
            Action::Reset { .. } => ACTION_REQ_RESET,
            Action::LoseReply => ACTION_REQ_LOSE_REPLY,
            _ => ACTION_REQ_DROP,
        };
    }
    value
}

/// The LPM trie key of a peers entry: the rule and the family always match in full.
pub fn peer_key(entry: &PeerEntry) -> LpmKey<PeerKey> {
    let family = if entry.cidr.is_v6() {
        FAMILY_V6
    } else {
        FAMILY_V4
    };
    LpmKey::new(
        PEER_KEY_FIXED_BITS + u32::from(entry.cidr.prefix),
        PeerKey {
            rule: entry.rule,
            family,
            addr: entry.cidr.bytes(),
            _pad: 0,
        },
    )
}
