//! The shared tc state of both shaping mechanisms: the classifier's maps, the faults in force
//! with their entries (peers included), their counters, and the liveness deadline that stops
//! the classifier within a second of this agent's death.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::SchedClassifier;
use aya::programs::tc::SchedClassifierLinkId;
use aya::{Ebpf, EbpfLoader};
use faultd_common::{
    COUNTERS_MAP, Counters, PROG_SHAPE, PeerKey, RULES_MAP, RuleKey, SCOPES_MAP, SHAPE_ALIVE_MAP,
    SHAPE_COUNTERS_MAP, SHAPE_DIST_MAP, SHAPE_PASS, SHAPE_PEERS, SHAPE_PEERS_MAP, SHAPE_SCOPES_MAP,
    SHAPE_STATE_MAP, SHAPES_MAP, ScopeValue, ShapeState, ShapeValue,
};

use super::spec::{ShapeMechanism, ShapeSpec};
use super::tags::{TAG_LOCK_DIR, claim_tag, sweep};
use super::{edt, netem};
use crate::dataplane::encoding::peer_key;
pub(super) use crate::dataplane::error::map_err;
use crate::dataplane::peer_marker::{self, PeerFault};
use crate::dataplane::rtnl::{self, Rtnl, RtnlError};
use crate::dataplane::{DataplaneError, LoadError, PeerEntry};
use crate::fault::PeerSet;

/// How long the classifier keeps shaping after the agent's last sign of life, and how often
/// the agent renews it.
const ALIVE_FOR: Duration = Duration::from_millis(900);
const ALIVE_EVERY: Duration = Duration::from_millis(200);
/// Packets the htb root's direct queue (unshaped traffic) holds.
pub(super) const DIRECT_QLEN: u32 = 10_000;

/// One shaping fault as the kernel holds it.
pub(super) struct ShapeFault {
    pub(super) mechanism: ShapeMechanism,
    pub(super) spec: ShapeSpec,
    pub(super) keys: Vec<RuleKey>,
    /// The peers it is limited to: its keys hold markers and its value is in the peers map.
    pub(super) peers: Option<PeerSet>,
    pub(super) expires_at_ns: u64,
}

/// The `FAULTD_SHAPES` entry of a key whose faults name peers.
const PEERS_MARKER: ShapeValue = ShapeValue {
    expires_at_ns: u64::MAX,
    delay_ns: 0,
    jitter_ns: 0,
    rate_bytes_per_sec: 0,
    max_backlog_ns: 0,
    classid: 0,
    mechanism: SHAPE_PEERS,
    correlation: 0,
    counter_slot: 0,
};

/// The peers entry of an excluded prefix: nothing shapes the packet.
const PEER_EXCLUDED: ShapeValue = ShapeValue {
    mechanism: SHAPE_PASS,
    ..PEERS_MARKER
};

/// An interface faultd shapes: its root qdisc is faultd's htb `<tag>:`.
pub(super) struct Interface {
    pub(super) name: String,
    pub(super) link: Option<SchedClassifierLinkId>,
    /// Netlink-attached: the clsact qdisc faultd added (removed with the last filter).
    pub(super) added_clsact: bool,
    /// EDT's shared class and fq leaf exist.
    pub(super) edt_class: bool,
}

pub struct TcShaping {
    pub(super) tag: u16,
    pub(super) _tag_lock: File,
    pub(super) rtnl: Rtnl,
    pub(super) shapes: BpfHashMap<MapData, RuleKey, ShapeValue>,
    pub(super) peers: LpmTrie<MapData, PeerKey, ShapeValue>,
    pub(super) scopes: BpfHashMap<MapData, u64, ScopeValue>,
    pub(super) counters: PerCpuArray<MapData, Counters>,
    pub(super) state: Array<MapData, ShapeState>,
    pub(super) scope_rules: HashMap<u64, u32>,
    pub(super) faults: BTreeMap<u32, ShapeFault>,
    pub(super) interfaces: BTreeMap<u32, Interface>,
    pub(super) table: Vec<i16>,
    pub(super) nr_cpus: usize,
    pub(super) alive_stop: Arc<AtomicBool>,
    pub(super) alive_thread: Option<std::thread::JoinHandle<()>>,
    // Last: detaches the classifier when dropped.
    pub(super) ebpf: Ebpf,
}

pub(super) fn tc_err(e: RtnlError) -> DataplaneError {
    DataplaneError::Tc(e.into())
}

impl TcShaping {
    /// Loads the classifier, claims a tag and removes what dead instances left behind.
    /// Attaches nothing until the first fault. Blocking: call from a blocking thread.
    pub fn load(object: &[u8]) -> Result<Self, DataplaneError> {
        if object.is_empty() {
            return Err(DataplaneError::StubObject);
        }
        let (tag, tag_lock) = claim_tag(Path::new(TAG_LOCK_DIR))?;
        let mut ebpf = EbpfLoader::new()
            // The drop programs' maps are not used by this instance of the object.
            .map_max_entries(RULES_MAP, 1)
            .map_max_entries(SCOPES_MAP, 1)
            .map_max_entries(COUNTERS_MAP, 1)
            .load(object)
            .map_err(LoadError::object)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROG_SHAPE)
            .ok_or(LoadError::MissingProgram(PROG_SHAPE))?
            .try_into()
            .map_err(LoadError::program_type)?;
        program.load().map_err(LoadError::verify(PROG_SHAPE))?;
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(LoadError::MissingMap(name));
        let shapes = BpfHashMap::try_from(take(SHAPES_MAP)?).map_err(map_err(SHAPES_MAP))?;
        let peers = LpmTrie::try_from(take(SHAPE_PEERS_MAP)?).map_err(map_err(SHAPE_PEERS_MAP))?;
        let scopes =
            BpfHashMap::try_from(take(SHAPE_SCOPES_MAP)?).map_err(map_err(SHAPE_SCOPES_MAP))?;
        let counters = PerCpuArray::try_from(take(SHAPE_COUNTERS_MAP)?)
            .map_err(map_err(SHAPE_COUNTERS_MAP))?;
        let state = Array::try_from(take(SHAPE_STATE_MAP)?).map_err(map_err(SHAPE_STATE_MAP))?;
        let mut dist: Array<MapData, i32> =
            Array::try_from(take(SHAPE_DIST_MAP)?).map_err(map_err(SHAPE_DIST_MAP))?;
        let table = rtnl::normal_table();
        for (i, value) in table.iter().enumerate() {
            dist.set(i as u32, i32::from(*value), 0)
                .map_err(map_err(SHAPE_DIST_MAP))?;
        }
        let alive: Array<MapData, u64> =
            Array::try_from(take(SHAPE_ALIVE_MAP)?).map_err(map_err(SHAPE_ALIVE_MAP))?;
        let nr_cpus = aya::util::nr_cpus().map_err(LoadError::cpus)?;
        let mut rtnl = Rtnl::open().map_err(tc_err)?;
        sweep(&mut rtnl, tag);
        let (alive_stop, alive_thread) = keep_alive(alive)?;
        tracing::info!(tag = format!("{tag:x}"), "tc shaping ready");
        Ok(Self {
            tag,
            _tag_lock: tag_lock,
            rtnl,
            shapes,
            peers,
            scopes,
            counters,
            state,
            scope_rules: HashMap::new(),
            faults: BTreeMap::new(),
            interfaces: BTreeMap::new(),
            table,
            nr_cpus,
            alive_stop,
            alive_thread: Some(alive_thread),
            ebpf,
        })
    }

    /// The handle major of this instance's root qdiscs.
    pub fn tag(&self) -> u16 {
        self.tag
    }

    /// Names of the interfaces shaped now.
    pub fn interfaces(&self) -> Vec<String> {
        self.interfaces.values().map(|i| i.name.clone()).collect()
    }

    /// Applies a shaping fault: qdiscs and classes on every interface, then the map entries.
    /// All or nothing. Faults with peers may share keys when their peers are disjoint (the
    /// engine refuses overlapping ones).
    pub fn apply(
        &mut self,
        slot: u32,
        mechanism: ShapeMechanism,
        spec: ShapeSpec,
        keys: &[RuleKey],
        peers: Option<PeerSet>,
        expires_at_ns: u64,
    ) -> Result<(), DataplaneError> {
        if mechanism == ShapeMechanism::Edt {
            edt::check(&spec)?;
        }
        self.reset_slot(slot)?;
        self.faults.insert(
            slot,
            ShapeFault {
                mechanism,
                spec,
                keys: keys.to_vec(),
                peers,
                expires_at_ns,
            },
        );
        // Interfaces covered already get the new fault's class here; newly covered ones get
        // every fault's in `cover_interfaces`.
        let covered: Vec<u32> = self.interfaces.keys().copied().collect();
        let result = covered
            .into_iter()
            .try_for_each(|ifindex| self.install_fault(ifindex, slot))
            .and_then(|()| self.cover_interfaces())
            .and_then(|()| self.insert_keys(slot, expires_at_ns));
        if let Err(e) = result {
            if let Err(undo) = self.remove(slot) {
                tracing::warn!(error = %undo, "rolling back a failed shaping fault");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Pushes a renewed deadline into the fault's entries.
    pub fn refresh(&mut self, slot: u32, expires_at_ns: u64) -> Result<(), DataplaneError> {
        let Some(fault) = self.faults.get_mut(&slot) else {
            return Ok(());
        };
        fault.expires_at_ns = expires_at_ns;
        let Some(fault) = self.faults.get(&slot) else {
            return Ok(());
        };
        let value = self.value(slot, fault, expires_at_ns);
        match &fault.peers {
            None => {
                for key in &fault.keys {
                    self.shapes
                        .insert(key, value, crate::dataplane::BPF_EXIST)
                        .map_err(map_err(SHAPES_MAP))?;
                }
            }
            Some(set) => {
                for &rule in &fault.keys {
                    for &cidr in &set.include {
                        self.peers
                            .insert(
                                &peer_key(&PeerEntry { rule, cidr }),
                                value,
                                crate::dataplane::BPF_EXIST,
                            )
                            .map_err(map_err(SHAPE_PEERS_MAP))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The other faults with peers on any of `keys`, as the trie sees them.
    fn peer_faults(&self, keys: &[RuleKey], except: u32) -> Vec<PeerFault<'_, ShapeValue>> {
        self.faults
            .iter()
            .filter(|(slot, fault)| **slot != except && fault.keys.iter().any(|k| keys.contains(k)))
            .filter_map(|(&slot, fault)| {
                Some(PeerFault {
                    keys: &fault.keys,
                    peers: fault.peers.as_ref()?,
                    value: self.value(slot, fault, fault.expires_at_ns),
                })
            })
            .collect()
    }

    /// Takes a fault out: entries first (the classifier stops at once), then its classes;
    /// with the last fault, the qdiscs and classifiers go too. Keeps going on error.
    pub fn remove(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let Some(fault) = self.faults.remove(&slot) else {
            return Ok(());
        };
        let mut first_error = None;
        // A key another fault with peers still holds keeps its marker; the entries of this
        // fault's prefixes go, or return to the faults that share them.
        let keys: Vec<RuleKey> = match &fault.peers {
            None => fault.keys.clone(),
            Some(set) => {
                let gone = PeerFault {
                    keys: &fault.keys,
                    peers: set,
                    value: PEER_EXCLUDED,
                };
                let writes =
                    peer_marker::remove(&gone, &self.peer_faults(&fault.keys, slot), PEER_EXCLUDED);
                for (entry, value) in &writes.set {
                    if let Err(e) = self.peers.insert(&peer_key(entry), *value, 0) {
                        first_error.get_or_insert(map_err(SHAPE_PEERS_MAP)(e));
                    }
                }
                for entry in &writes.delete {
                    match self.peers.remove(&peer_key(entry)) {
                        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                        Err(e) => {
                            first_error.get_or_insert(map_err(SHAPE_PEERS_MAP)(e));
                        }
                    }
                }
                writes.markers
            }
        };
        for key in &keys {
            match self.shapes.remove(key) {
                Ok(()) => {
                    if let Err(e) = self.count_scope(key.scope_id, -1) {
                        first_error.get_or_insert(e);
                    }
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    first_error.get_or_insert(map_err(SHAPES_MAP)(e));
                }
            }
        }
        if fault.mechanism == ShapeMechanism::Netem {
            let ifindexes: Vec<u32> = self.interfaces.keys().copied().collect();
            for ifindex in ifindexes {
                if let Err(e) = netem::remove(&mut self.rtnl, ifindex, self.tag, slot) {
                    first_error.get_or_insert(tc_err(e));
                }
            }
        }
        if self.faults.is_empty()
            && let Err(e) = self.release_interfaces()
        {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn counters(&self, slot: u32) -> Result<Counters, DataplaneError> {
        let per_cpu = self
            .counters
            .get(&slot, 0)
            .map_err(map_err(SHAPE_COUNTERS_MAP))?;
        Ok(per_cpu.iter().fold(Counters::default(), |sum, c| Counters {
            matched: sum.matched + c.matched,
            delayed: sum.delayed + c.delayed,
            dropped: sum.dropped + c.dropped,
            refused: sum.refused + c.refused,
            ..sum
        }))
    }

    /// Removes every fault, qdisc and classifier of this instance.
    pub fn shutdown(&mut self) -> Result<(), DataplaneError> {
        let slots: Vec<u32> = self.faults.keys().copied().collect();
        let mut first_error = None;
        for slot in slots {
            if let Err(e) = self.remove(slot) {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.release_interfaces() {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn value(&self, slot: u32, fault: &ShapeFault, expires_at_ns: u64) -> ShapeValue {
        match fault.mechanism {
            ShapeMechanism::Netem => netem::rule_value(self.tag, slot, expires_at_ns),
            ShapeMechanism::Edt => edt::rule_value(self.tag, slot, &fault.spec, expires_at_ns),
        }
    }

    fn reset_slot(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let zeros =
            PerCpuValues::try_from(vec![Counters::default(); self.nr_cpus]).map_err(|source| {
                DataplaneError::PerCpuValues {
                    map: SHAPE_COUNTERS_MAP,
                    source,
                }
            })?;
        self.counters
            .set(slot, zeros, 0)
            .map_err(map_err(SHAPE_COUNTERS_MAP))?;
        self.state
            .set(slot, ShapeState::default(), 0)
            .map_err(map_err(SHAPE_STATE_MAP))
    }

    fn insert_keys(&mut self, slot: u32, expires_at_ns: u64) -> Result<(), DataplaneError> {
        let Some(fault) = self.faults.get(&slot) else {
            return Ok(());
        };
        let mut value = self.value(slot, fault, expires_at_ns);
        let mut keys = fault.keys.clone();
        if let Some(set) = &fault.peers {
            // The prefixes first, then the markers of the keys that have none yet: the
            // classifier never consults a half-written set.
            let new = PeerFault {
                keys: &fault.keys,
                peers: set,
                value,
            };
            let writes = peer_marker::insert(&new, &self.peer_faults(&keys, slot), PEER_EXCLUDED);
            for (entry, value) in &writes.set {
                self.peers
                    .insert(&peer_key(entry), *value, 0)
                    .map_err(map_err(SHAPE_PEERS_MAP))?;
            }
            keys = writes.markers;
            value = PEERS_MARKER;
        }
        for key in keys {
            // The scope entry first, so the classifier never misses a new rule.
            self.count_scope(key.scope_id, 1)?;
            if let Err(e) = self.shapes.insert(key, value, 0) {
                self.count_scope(key.scope_id, -1)?;
                return Err(map_err(SHAPES_MAP)(e));
            }
        }
        Ok(())
    }

    fn count_scope(&mut self, scope: u64, delta: i64) -> Result<(), DataplaneError> {
        let before = i64::from(self.scope_rules.get(&scope).copied().unwrap_or(0));
        let after = (before + delta).max(0);
        if after == 0 {
            self.scope_rules.remove(&scope);
            if before > 0 {
                self.scopes
                    .remove(&scope)
                    .map_err(map_err(SHAPE_SCOPES_MAP))?;
            }
        } else {
            self.scope_rules.insert(scope, after as u32);
            if before == 0 {
                self.scopes
                    .insert(scope, ScopeValue::default(), 0)
                    .map_err(map_err(SHAPE_SCOPES_MAP))?;
            }
        }
        Ok(())
    }
}

impl Drop for TcShaping {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "removing tc shaping state");
        }
        self.alive_stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.alive_thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the liveness thread panicked");
        }
    }
}

/// Renews the classifier's liveness deadline from a thread of its own, so a stalled engine
/// does not stop it (only a dead process does).
fn keep_alive(
    mut alive: Array<MapData, u64>,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>), DataplaneError> {
    let renew = move |alive: &mut Array<MapData, u64>| {
        let until = crate::dataplane::clock::monotonic_now_ns() + ALIVE_FOR.as_nanos() as u64;
        alive.set(0, until, 0)
    };
    renew(&mut alive).map_err(map_err(SHAPE_ALIVE_MAP))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("faultd-tc-alive".into())
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(ALIVE_EVERY);
                if let Err(e) = renew(&mut alive) {
                    tracing::error!(error = %e, "renewing the classifier's liveness deadline");
                }
            }
            // Stop shaping at once on the way out.
            if let Err(e) = alive.set(0, 0, 0) {
                tracing::warn!(error = %e, "clearing the classifier's liveness deadline");
            }
        })
        .map_err(LoadError::LivenessThread)?;
    Ok((stop, thread))
}
