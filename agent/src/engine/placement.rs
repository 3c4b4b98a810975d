//! What each fault put in the kernel, and the one place that knows how to put it there, move
//! its deadline and take it out again: its own entries in the rules map, entries in the peers
//! trie under keys shared with faults on disjoint peers, or a class of a shaping mechanism —
//! plus, on a netns interface, that interface's tc programs. Who holds which kernel key lives
//! here too, so overlapping faults are refused rather than merged.

use std::collections::HashMap;

use faultd_common::{Counters, RuleKey, RuleValue};

use super::{FaultRecord, State};
use crate::dataplane::encoding::{PEER_EXCLUDED, PEERS_MARKER, fault_value};
use crate::dataplane::peer_marker::{self, PeerFault};
use crate::dataplane::{DataplaneError, RequestEntry, Shaped, SocketFilter};
use crate::fault::{FaultId, FaultSpec, PeerSet, ResolvedScope, Scope};

/// Which kernel entries hold a fault.
pub(super) enum Entries {
    /// Its own entries in the rules map: one fault per key.
    Rules,
    /// Its prefixes in the peers trie under keys holding markers, which faults on disjoint
    /// peers share.
    PeerRules(PeerSet),
    /// A delay or bandwidth fault, held by the shaping mechanism at this index of
    /// `State::shapers` (limited to `peers`, if any).
    Shaped {
        shaper: usize,
        peers: Option<PeerSet>,
    },
}

/// What one fault holds in the kernel.
pub(super) struct Placement {
    pub keys: Vec<RuleKey>,
    pub entries: Entries,
    /// The per-CPU counter slot.
    pub slot: u32,
    /// What the rules map (or the peers trie) holds for it; its deadline moves with the lease.
    pub value: RuleValue,
    /// The netns interface (by scope id) whose tc programs the fault holds.
    pub interface: Option<u64>,
    /// The cgroup (by id) where the fault holds the cgroup programs: a fault with entries in
    /// the rules map on any scope but a netns one.
    pub cgroup: Option<u64>,
    /// The request match it puts in the `FAULTD_REQ_*` maps under its slot.
    pub request: Option<RequestEntry>,
}

impl Placement {
    /// The entries a fault with `spec` gets, and whether it holds its interface's programs.
    pub fn new(
        spec: &FaultSpec,
        resolved: &ResolvedScope,
        keys: Vec<RuleKey>,
        shaper: Option<usize>,
        peers: Option<PeerSet>,
        slot: u32,
        deadline_ns: u64,
    ) -> Placement {
        let entries = match (shaper, peers) {
            (Some(shaper), peers) => Entries::Shaped { shaper, peers },
            (None, None) => Entries::Rules,
            (None, Some(peers)) => Entries::PeerRules(peers),
        };
        // A netns scope's interface gets the tc programs (once for all its faults); a delay or
        // bandwidth there is its shaper's alone.
        let interface = match (&spec.target.scope, &entries) {
            (Scope::Netns { .. }, Entries::Rules | Entries::PeerRules(_)) => {
                Some(resolved.cgroup_id)
            }
            _ => None,
        };
        // Any other scope's rules need the cgroup programs where its cgroup is; a delay or
        // bandwidth is its shaper's, and a reset after some bytes has no rules.
        let cgroup = match (&spec.target.scope, &entries) {
            (Scope::Netns { .. }, _) | (_, Entries::Shaped { .. }) => None,
            _ if keys.is_empty() => None,
            _ => Some(resolved.cgroup_id),
        };
        // A shaped fault matches requests in its mechanism, not in the kernel maps.
        let kernel_request = spec.target.request.as_ref().filter(|_| shaper.is_none());
        let request = kernel_request.map(|request| RequestEntry {
            spec: request.spec(),
            names: request.kernel_names(),
            reset: matches!(
                spec.action,
                crate::fault::Action::Reset { .. } | crate::fault::Action::LoseReply
            )
            .then(|| {
                SocketFilter::connections(
                    resolved.dir.clone(),
                    spec.target.ports.clone(),
                    spec.target.peer_set().ok().flatten(),
                )
            }),
        });
        Placement {
            keys,
            entries,
            slot,
            value: fault_value(spec, slot, deadline_ns),
            interface,
            cgroup,
            request,
        }
    }

    /// The peers the fault is limited to.
    pub fn peers(&self) -> Option<&PeerSet> {
        match &self.entries {
            Entries::Rules => None,
            Entries::PeerRules(peers) => Some(peers),
            Entries::Shaped { peers, .. } => peers.as_ref(),
        }
    }
}

/// Takes `id` off the faults sharing `key`, and the key out when none is left.
fn disown(owners: &mut HashMap<RuleKey, Vec<FaultId>>, key: &RuleKey, id: &str) {
    if let Some(held) = owners.get_mut(key) {
        held.retain(|owner| owner != id);
        if held.is_empty() {
            owners.remove(key);
        }
    }
}

impl State {
    /// The fault that a new one on `keys` would overlap: a delay or bandwidth fault may share
    /// a key with a drop but not with another shaped fault, faults on disjoint peers may share
    /// a key, any other overlap is refused.
    pub(super) fn overlap(
        &self,
        keys: &[RuleKey],
        peers: Option<&PeerSet>,
        shaped: bool,
    ) -> Option<&FaultId> {
        if shaped {
            return Self::meets(&self.shape_owners, &self.faults, keys, peers);
        }
        keys.iter()
            .find_map(|k| self.owners.get(k))
            .or_else(|| Self::meets(&self.peer_owners, &self.faults, keys, peers))
    }

    /// A fault holding one of `keys` whose peers may meet `peers` (a fault without peers
    /// meets every other).
    fn meets<'a>(
        owners: &'a HashMap<RuleKey, Vec<FaultId>>,
        faults: &HashMap<FaultId, FaultRecord>,
        keys: &[RuleKey],
        peers: Option<&PeerSet>,
    ) -> Option<&'a FaultId> {
        keys.iter().find_map(|key| {
            owners.get(key)?.iter().find(|owner| {
                match (peers, faults.get(*owner).and_then(|f| f.placement.peers())) {
                    (Some(new), Some(held)) => new.overlaps(held),
                    _ => true,
                }
            })
        })
    }

    /// Rules-map entries the datapath holds now, for the limit on its size.
    pub(super) fn rules_in_use(&self) -> usize {
        self.owners.len() + self.peer_owners.len()
    }

    /// Puts a fault in the kernel, all or nothing: its counters zeroed, its interface's or its
    /// cgroup's programs, its entries.
    pub(super) fn place(
        &mut self,
        id: &str,
        placement: &Placement,
        spec: &FaultSpec,
        resolved: &ResolvedScope,
    ) -> Result<(), DataplaneError> {
        self.dataplane.reset_counters(placement.slot)?;
        if placement.interface.is_some()
            && let Scope::Netns { interface, .. } = &spec.target.scope
        {
            self.dataplane.attach_interface(resolved, interface)?;
        }
        if placement.cgroup.is_some() {
            self.dataplane.attach_cgroup(resolved)?;
        }
        let requested = match &placement.request {
            Some(request) => self.dataplane.set_request(placement.slot, request),
            None => Ok(()),
        };
        let applied = requested.and_then(|()| match &placement.entries {
            Entries::Shaped { shaper, .. } => self.shapers[*shaper].apply(&Shaped {
                id: &id.to_string(),
                action: &spec.action,
                target: &spec.target,
                resolved,
                keys: &placement.keys,
                slot: placement.slot,
                expires_at_ns: placement.value.expires_at_ns,
            }),
            Entries::Rules => self.dataplane.insert(&rules(placement)),
            Entries::PeerRules(peers) => {
                self.insert_peer_fault(&placement.keys, peers, placement.value)
            }
        });
        if let Err(e) = applied {
            if let Err(undo) = self.take_out(id, placement) {
                tracing::warn!(error = %undo, "rolling back a failed inject");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Records `id` as the holder of its keys.
    pub(super) fn own(&mut self, id: &FaultId, placement: &Placement) {
        for key in &placement.keys {
            match &placement.entries {
                Entries::Rules => {
                    self.owners.insert(*key, id.clone());
                }
                Entries::PeerRules(_) => {
                    self.peer_owners.entry(*key).or_default().push(id.clone());
                }
                Entries::Shaped { .. } => {
                    self.shape_owners.entry(*key).or_default().push(id.clone());
                }
            }
        }
    }

    /// Moves fault `id`'s deadline in the kernel (a renewed lease).
    pub(super) fn refresh(&mut self, id: &str, deadline_ns: u64) -> Result<(), DataplaneError> {
        let Some(fault) = self.faults.get_mut(id) else {
            return Ok(());
        };
        let placement = &mut fault.placement;
        placement.value = fault_value(&fault.spec, placement.slot, deadline_ns);
        match &placement.entries {
            &Entries::Shaped { shaper, .. } => self.shapers[shaper].refresh(id, deadline_ns),
            Entries::Rules => self.dataplane.refresh(&rules(placement)),
            Entries::PeerRules(peers) => {
                let value = placement.value;
                let entries: Vec<_> = placement
                    .keys
                    .iter()
                    .flat_map(|&rule| {
                        peers
                            .include
                            .iter()
                            .map(move |&cidr| (crate::dataplane::PeerEntry { rule, cidr }, value))
                    })
                    .collect();
                self.dataplane.set_peers(&entries)
            }
        }
    }

    /// What the fault did so far, from the kernel's counters.
    pub(super) fn counters(
        &self,
        id: &str,
        placement: &Placement,
    ) -> Result<Counters, DataplaneError> {
        match &placement.entries {
            Entries::Shaped { shaper, .. } => self.shapers[*shaper].counters(id),
            Entries::Rules | Entries::PeerRules(_) => self.dataplane.counters(placement.slot),
        }
    }

    /// Gives up the fault's keys and takes its entries and interface out of the kernel. Keeps
    /// going on error and returns the first.
    pub(super) fn unplace(
        &mut self,
        id: &str,
        placement: &Placement,
    ) -> Result<(), DataplaneError> {
        for key in &placement.keys {
            match &placement.entries {
                Entries::Rules => {
                    self.owners.remove(key);
                }
                Entries::PeerRules(_) => disown(&mut self.peer_owners, key, id),
                Entries::Shaped { .. } => disown(&mut self.shape_owners, key, id),
            }
        }
        self.take_out(id, placement)
    }

    /// Takes the fault's entries, then its hold on the interface, out of the kernel.
    fn take_out(&mut self, id: &str, placement: &Placement) -> Result<(), DataplaneError> {
        let removed = match &placement.entries {
            Entries::Shaped { shaper, .. } => self.shapers[*shaper].remove(id),
            Entries::Rules => self.dataplane.remove(&placement.keys),
            Entries::PeerRules(peers) => self.remove_peer_fault(id, &placement.keys, peers),
        };
        let released = match placement.interface {
            Some(scope_id) => self.dataplane.release_interface(scope_id),
            None => Ok(()),
        };
        // After the entries: a detach first would let their packets pass early for nothing.
        let detached = match placement.cgroup {
            Some(scope_id) => self.dataplane.release_cgroup(scope_id),
            None => Ok(()),
        };
        let unrequested = match &placement.request {
            Some(request) => self.dataplane.remove_request(placement.slot, request),
            None => Ok(()),
        };
        removed.and(unrequested).and(released).and(detached)
    }

    /// The faults with peers on any of `keys` other than `except`, as the trie sees them.
    fn peer_faults(&self, keys: &[RuleKey], except: &str) -> Vec<PeerFault<'_, RuleValue>> {
        let mut ids: Vec<&FaultId> = keys
            .iter()
            .filter_map(|key| self.peer_owners.get(key))
            .flatten()
            .filter(|id| *id != except)
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| {
                let fault = self.faults.get(id)?;
                let Entries::PeerRules(peers) = &fault.placement.entries else {
                    return None;
                };
                Some(PeerFault {
                    keys: &fault.placement.keys,
                    peers,
                    value: fault.placement.value,
                })
            })
            .collect()
    }

    /// Writes a new fault's peers entries, then the markers of its keys that have none yet.
    fn insert_peer_fault(
        &mut self,
        keys: &[RuleKey],
        peers: &PeerSet,
        value: RuleValue,
    ) -> Result<(), DataplaneError> {
        let new = PeerFault { keys, peers, value };
        let writes = peer_marker::insert(&new, &self.peer_faults(keys, ""), PEER_EXCLUDED);
        self.dataplane.set_peers(&writes.set)?;
        let markers: Vec<_> = writes.markers.iter().map(|k| (*k, PEERS_MARKER)).collect();
        self.dataplane.insert(&markers)
    }

    /// Takes a fault's peers entries out (or gives them back to the faults that share them),
    /// and the markers of its keys no other fault holds. `id` must be out of `peer_owners`
    /// already, or is skipped.
    pub(super) fn remove_peer_fault(
        &mut self,
        id: &str,
        keys: &[RuleKey],
        peers: &PeerSet,
    ) -> Result<(), DataplaneError> {
        let gone = PeerFault {
            keys,
            peers,
            value: PEER_EXCLUDED,
        };
        let writes = peer_marker::remove(&gone, &self.peer_faults(keys, id), PEER_EXCLUDED);
        // Markers first: from then on no packet consults the entries.
        let first = self.dataplane.remove(&writes.markers);
        let second = self.dataplane.remove_peers(&writes.delete);
        let third = self.dataplane.set_peers(&writes.set);
        first.and(second).and(third)
    }
}

/// The rules-map entries of a fault without peers.
fn rules(placement: &Placement) -> Vec<(RuleKey, RuleValue)> {
    placement
        .keys
        .iter()
        .map(|key| (*key, placement.value))
        .collect()
}
