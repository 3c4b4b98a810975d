//! Faults that name peers, sharing kernel keys: one computation for the cgroup datapath (rules
//! map + `FAULTD_PEERS` trie) and for the tc classifier (`FAULTD_SHAPES` + `FAULTD_SHAPE_PEERS`).
//!
//! A key whose faults name peers holds a marker instead of a fault's value; the packet's remote
//! address is then looked up under the key in a longest-prefix-match trie. Faults on one key
//! have disjoint peer sets, so each prefix of the trie belongs to one fault — except an
//! excluded prefix, which several faults may name: its entry shapes or drops nothing, and it
//! stays while any fault still excludes it and no fault includes it. This module says which
//! trie entries and markers a change needs; the caller writes them to its own maps, in its
//! own order, with its own value type.

use faultd_common::RuleKey;

use super::PeerEntry;
use crate::fault::{Cidr, PeerSet};

/// A fault with peers as the trie sees it: its keys, its peers and its trie value.
#[derive(Clone, Copy, Debug)]
pub struct PeerFault<'a, V> {
    pub keys: &'a [RuleKey],
    pub peers: &'a PeerSet,
    pub value: V,
}

/// The map writes one change needs.
#[derive(Debug, PartialEq)]
pub struct Writes<V> {
    /// Trie entries to write with their values.
    pub set: Vec<(PeerEntry, V)>,
    /// Trie entries to delete.
    pub delete: Vec<PeerEntry>,
    /// Keys whose marker to write (on insert) or delete (on removal): those no other fault
    /// with peers holds.
    pub markers: Vec<RuleKey>,
}

/// What the trie entry `(rule, cidr)` must hold for `faults`: the value of the fault whose
/// peers include the prefix, `excluded` when one only excludes it, else nothing.
pub fn entry_value<V: Copy>(
    rule: &RuleKey,
    cidr: &Cidr,
    faults: &[PeerFault<'_, V>],
    excluded: V,
) -> Option<V> {
    let mut pass = false;
    for fault in faults.iter().filter(|f| f.keys.contains(rule)) {
        if fault.peers.include.contains(cidr) {
            return Some(fault.value);
        }
        pass |= fault.peers.exclude.contains(cidr);
    }
    pass.then_some(excluded)
}

fn unheld(keys: &[RuleKey], others: &[PeerFault<'_, impl Copy>]) -> Vec<RuleKey> {
    keys.iter()
        .filter(|key| !others.iter().any(|o| o.keys.contains(key)))
        .copied()
        .collect()
}

/// Adding `new` beside `others` (the faults with peers already placed): its prefixes, the
/// exclusions no other fault decides yet, and the markers of the keys that have none. Write
/// the entries before the markers, so no packet consults a half-written set.
pub fn insert<V: Copy>(
    new: &PeerFault<'_, V>,
    others: &[PeerFault<'_, V>],
    excluded: V,
) -> Writes<V> {
    let mut set = Vec::new();
    for &rule in new.keys {
        for &cidr in &new.peers.include {
            set.push((PeerEntry { rule, cidr }, new.value));
        }
        for &cidr in &new.peers.exclude {
            if entry_value(&rule, &cidr, others, excluded).is_none() {
                set.push((PeerEntry { rule, cidr }, excluded));
            }
        }
    }
    Writes {
        set,
        delete: Vec::new(),
        markers: unheld(new.keys, others),
    }
}

/// Taking `gone` out from beside `others`: each of its prefixes goes back to what the other
/// faults need of it, or goes; the markers of the keys only it held go.
pub fn remove<V: Copy>(
    gone: &PeerFault<'_, V>,
    others: &[PeerFault<'_, V>],
    excluded: V,
) -> Writes<V> {
    let mut set = Vec::new();
    let mut delete = Vec::new();
    for &rule in gone.keys {
        for &cidr in gone.peers.include.iter().chain(&gone.peers.exclude) {
            let entry = PeerEntry { rule, cidr };
            match entry_value(&rule, &cidr, others, excluded) {
                Some(value) => set.push((entry, value)),
                None => delete.push(entry),
            }
        }
    }
    Writes {
        set,
        delete,
        markers: unheld(gone.keys, others),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultd_common::{DIR_EGRESS, PROTO_TCP};

    const KEY: RuleKey = RuleKey::new(7, PROTO_TCP, DIR_EGRESS, 6379);
    const OTHER_KEY: RuleKey = RuleKey::new(7, PROTO_TCP, DIR_EGRESS, 5432);

    fn set(include: &[&str], exclude: &[&str]) -> PeerSet {
        let parse = |list: &[&str]| -> Vec<Cidr> {
            list.iter()
                .map(|c| Cidr::parse(c, "t").expect("a CIDR"))
                .collect()
        };
        PeerSet::new(&parse(include), &parse(exclude), "t")
            .expect("valid")
            .expect("peers")
    }

    fn cidr(text: &str) -> Cidr {
        Cidr::parse(text, "t").expect("a CIDR")
    }

    #[test]
    fn a_second_fault_shares_the_key_and_takes_what_the_first_excludes() {
        let first_peers = set(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        let first = PeerFault {
            keys: &[KEY],
            peers: &first_peers,
            value: 1u32,
        };
        let written = insert(&first, &[], 0);
        assert_eq!(written.markers, vec![KEY]);
        assert_eq!(
            written.set,
            vec![
                (entry(KEY, "10.0.0.0/8"), 1),
                (entry(KEY, "10.1.0.0/16"), 0)
            ]
        );

        // Disjoint from the first: the prefix the first excludes.
        let second_peers = set(&["10.1.0.0/16"], &[]);
        let both_keys = [KEY, OTHER_KEY];
        let second = PeerFault {
            keys: &both_keys,
            peers: &second_peers,
            value: 2u32,
        };
        let written = insert(&second, &[first], 0);
        assert_eq!(written.markers, vec![OTHER_KEY], "KEY has its marker");
        assert_eq!(
            written.set,
            vec![
                (entry(KEY, "10.1.0.0/16"), 2),
                (entry(OTHER_KEY, "10.1.0.0/16"), 2)
            ]
        );

        // The first goes: its prefix goes, the one it excluded stays the second's.
        let written = remove(&first, &[second], 0);
        assert!(written.markers.is_empty(), "the second still holds KEY");
        assert_eq!(written.delete, vec![entry(KEY, "10.0.0.0/8")]);
        assert_eq!(written.set, vec![(entry(KEY, "10.1.0.0/16"), 2)]);

        // The last goes with its markers; an exclusion alone stays while a fault names it.
        let written = remove(&second, &[], 0);
        assert_eq!(written.markers, both_keys.to_vec());
        assert!(written.set.is_empty());
        assert_eq!(written.delete.len(), 2);
        let written = remove(&second, &[first], 0);
        assert_eq!(written.set, vec![(entry(KEY, "10.1.0.0/16"), 0)]);
    }

    fn entry(rule: RuleKey, text: &str) -> PeerEntry {
        PeerEntry {
            rule,
            cidr: cidr(text),
        }
    }
}
