//! Delay and bandwidth faults at the tc egress hook: the `faultd_shape` classifier picks the
//! target's packets (cgroup of the socket and its ancestors, protocol, port: O(1) lookups) and
//! hands them to a qdisc faultd installs and owns. Two mechanisms share this room:
//! - `netem` (see `netem.rs`): each fault gets an htb class whose netem leaf delays, or whose
//!   rate limits, the packets the classifier steers into it through `skb->priority`;
//! - `edt` (see `edt.rs`): the classifier stamps each packet's Earliest Departure Time
//!   (`skb->tstamp`) and steers it into one shared class whose fq leaf holds it until then.
//!
//! Peers: a fault that names peers puts a marker (`SHAPE_PEERS`) on its keys and its
//! prefixes in `FAULTD_SHAPE_PEERS` under each key (an exclusion is an entry that shapes
//! nothing); faults with disjoint peers (the engine checks) share the keys and the marker, as
//! on the drop path.
//!
//! Which interfaces: every interface of faultd's network namespace that is up, loopback
//! included. A socket's packets leave by the interface its route picks, so covering every
//! interface is the only choice that never misses a target's packets (local peers use
//! loopback, remote ones a NIC, containers a veth or bridge) — and unmatched packets only
//! pass the classifier's lookup and htb's direct queue, unshaped. An interface whose root
//! qdisc someone configured (a non-default handle that is not faultd's) is left alone and
//! logged. Interfaces that come up later are covered at the next fault.
//!
//! Ownership: qdiscs and netlink filters are not fd-owned, so each instance claims a tag
//! (`0x7a00 + n`, lock file `/run/faultd/tc/<tag>.lock`, flock held for life): its root qdiscs
//! have the handle `<tag>:` and its netlink filters the priority `<tag>`. At start an instance
//! removes what carries a tag whose lock nobody holds (a dead instance's), and at the end of the
//! last fault and at shutdown its own. On kernels with TCX (≥ 6.6) the classifier is an
//! fd-owned link; on older ones it is a cls_bpf filter on clsact egress, which a killed agent
//! leaves behind: the classifier then stops shaping by itself within a second, because the
//! agent no longer refreshes its liveness deadline (`FAULTD_SHAPE_ALIVE`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use faultd_common::{
    COUNTERS_MAP, Counters, PROG_SHAPE, PeerKey, RULES_MAP, RuleKey, SCOPES_MAP, SHAPE_ALIVE_MAP,
    SHAPE_COUNTERS_MAP, SHAPE_DIST_MAP, SHAPE_PASS, SHAPE_PEERS, SHAPE_PEERS_MAP, SHAPE_SCOPES_MAP,
    SHAPE_STATE_MAP, SHAPES_MAP, ScopeValue, ShapeState, ShapeValue,
};

use super::cgroup_skb::peer_key;
use super::peer_marker::{self, PeerFault};
use super::rtnl::{self, CLSACT_EGRESS, CLSACT_HANDLE, Rtnl, RtnlError, TC_H_ROOT};
use super::{DataplaneError, PeerEntry, Shaped, Shaper, edt, netem};
use crate::fault::{Action, Direction, Mechanism, PeerSet, Scope, Target};

/// First tag; an instance's tag is the major number of its root qdiscs and the priority of its
/// netlink filters. Below 0x8000, where the kernel's automatic handles start.
pub const TAG_BASE: u16 = 0x7a00;
pub const TAG_COUNT: u16 = 256;
/// Where instances hold the lock of their tag.
pub const TAG_LOCK_DIR: &str = "/run/faultd/tc";
/// How long the classifier keeps shaping after the agent's last sign of life, and how often
/// the agent renews it.
const ALIVE_FOR: Duration = Duration::from_millis(900);
const ALIVE_EVERY: Duration = Duration::from_millis(200);
/// Packets the htb root's direct queue (unshaped traffic) holds.
const DIRECT_QLEN: u32 = 10_000;

/// Which shaping mechanism a fault uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShapeMechanism {
    Netem,
    Edt,
}

impl ShapeMechanism {
    pub fn name(self) -> &'static str {
        match self {
            Self::Netem => "netem",
            Self::Edt => "edt",
        }
    }
}

/// What a shaping fault does to its packets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapeSpec {
    pub latency: Duration,
    /// Standard deviation of the added delay (normal distribution).
    pub jitter: Duration,
    /// Correlation of successive delays, 0 to 100 (percent).
    pub correlation: f64,
    /// Bytes per second; 0 for no limit.
    pub rate_bytes_per_sec: u64,
    /// Bytes that may pass at line rate before the limit applies.
    pub burst_bytes: u32,
}

/// One shaping fault as the kernel holds it.
struct ShapeFault {
    mechanism: ShapeMechanism,
    spec: ShapeSpec,
    keys: Vec<RuleKey>,
    /// The peers it is limited to: its keys hold markers and its value is in the peers map.
    peers: Option<PeerSet>,
    expires_at_ns: u64,
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
struct Interface {
    name: String,
    link: Option<SchedClassifierLinkId>,
    /// Netlink-attached: the clsact qdisc faultd added (removed with the last filter).
    added_clsact: bool,
    /// EDT's shared class and fq leaf exist.
    edt_class: bool,
}

pub struct TcShaping {
    tag: u16,
    _tag_lock: File,
    rtnl: Rtnl,
    shapes: BpfHashMap<MapData, RuleKey, ShapeValue>,
    peers: LpmTrie<MapData, PeerKey, ShapeValue>,
    scopes: BpfHashMap<MapData, u64, ScopeValue>,
    counters: PerCpuArray<MapData, Counters>,
    state: Array<MapData, ShapeState>,
    scope_rules: HashMap<u64, u32>,
    faults: BTreeMap<u32, ShapeFault>,
    interfaces: BTreeMap<u32, Interface>,
    table: Vec<i16>,
    nr_cpus: usize,
    alive_stop: Arc<AtomicBool>,
    alive_thread: Option<std::thread::JoinHandle<()>>,
    // Last: detaches the classifier when dropped.
    ebpf: Ebpf,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        reason: e.to_string(),
    }
}

fn tc_err(e: RtnlError) -> DataplaneError {
    DataplaneError::Tc(e.to_string())
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
            .map_err(|e| DataplaneError::Load(e.to_string()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROG_SHAPE)
            .ok_or_else(|| DataplaneError::Load(format!("program {PROG_SHAPE} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
        program.load().map_err(|e| {
            DataplaneError::Load(format!(
                "{PROG_SHAPE}: {}",
                super::cgroup_skb::verifier_detail(&e)
            ))
        })?;
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| DataplaneError::Load(format!("map {name} missing from the object")))
        };
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
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Load(format!("{what}: {e}")))?;
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
                        .insert(key, value, super::BPF_EXIST)
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
                                super::BPF_EXIST,
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
            PerCpuValues::try_from(vec![Counters::default(); self.nr_cpus]).map_err(|e| {
                DataplaneError::Map {
                    map: SHAPE_COUNTERS_MAP,
                    reason: e.to_string(),
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

    /// Installs the root qdisc and classifier on every up interface not covered yet, with the
    /// classes of the faults already in force.
    fn cover_interfaces(&mut self) -> Result<(), DataplaneError> {
        let links = self.rtnl.links().map_err(tc_err)?;
        let roots: HashMap<u32, u32> = self
            .rtnl
            .qdiscs()
            .map_err(tc_err)?
            .into_iter()
            .filter(|q| q.parent == TC_H_ROOT)
            .map(|q| (q.ifindex, q.handle))
            .collect();
        for link in links.into_iter().filter(|l| l.up) {
            if self.interfaces.contains_key(&link.index) {
                continue;
            }
            let root = roots.get(&link.index).copied().unwrap_or(0);
            if root >> 16 != 0 && root >> 16 != u32::from(self.tag) {
                tracing::warn!(interface = %link.name, root = %rtnl::handle(root),
                    "not shaping this interface: its root qdisc is someone else's");
                continue;
            }
            self.cover(link.index, &link.name)?;
            let slots: Vec<u32> = self.faults.keys().copied().collect();
            for slot in slots {
                self.install_fault(link.index, slot)?;
            }
        }
        Ok(())
    }

    fn cover(&mut self, ifindex: u32, name: &str) -> Result<(), DataplaneError> {
        self.rtnl
            .replace_root_qdisc(
                ifindex,
                self.tag,
                "htb",
                rtnl::htb_root_options(DIRECT_QLEN),
            )
            .map_err(tc_err)?;
        let mut interface = Interface {
            name: name.to_string(),
            link: None,
            added_clsact: false,
            edt_class: false,
        };
        let attached = self.attach(ifindex, name, &mut interface);
        self.interfaces.insert(ifindex, interface);
        attached?;
        tracing::info!(interface = name, "shaping qdisc and classifier installed");
        Ok(())
    }

    /// Attaches the classifier on egress: an fd-owned TCX link where the kernel has TCX, else a
    /// cls_bpf filter with this instance's priority on clsact.
    fn attach(
        &mut self,
        ifindex: u32,
        name: &str,
        interface: &mut Interface,
    ) -> Result<(), DataplaneError> {
        let tag = self.tag;
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_SHAPE)
            .ok_or_else(|| DataplaneError::Load(format!("program {PROG_SHAPE} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
        if tcx_available() {
            match program.attach_with_options(
                name,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(link) => {
                    interface.link = Some(link);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(interface = name, error = %e, "TCX attach failed; using clsact");
                }
            }
        }
        interface.added_clsact = self.rtnl.add_clsact(ifindex).map_err(tc_err)?;
        let link = program
            .attach_with_options(
                name,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: tag,
                    handle: TcHandle::new(0, 1),
                    classid: None,
                }),
            )
            .map_err(|e| {
                DataplaneError::Tc(format!("attaching {PROG_SHAPE} to {name} egress: {e}"))
            })?;
        interface.link = Some(link);
        Ok(())
    }

    fn install_fault(&mut self, ifindex: u32, slot: u32) -> Result<(), DataplaneError> {
        let Some(fault) = self.faults.get(&slot) else {
            return Ok(());
        };
        match fault.mechanism {
            ShapeMechanism::Netem => netem::install(
                &mut self.rtnl,
                ifindex,
                self.tag,
                slot,
                &fault.spec,
                &self.table,
            )
            .map_err(tc_err),
            ShapeMechanism::Edt => {
                let Some(interface) = self.interfaces.get_mut(&ifindex) else {
                    return Ok(());
                };
                if !interface.edt_class {
                    edt::install(&mut self.rtnl, ifindex, self.tag).map_err(tc_err)?;
                    interface.edt_class = true;
                }
                Ok(())
            }
        }
    }

    /// Detaches the classifier and removes the qdiscs from every interface.
    fn release_interfaces(&mut self) -> Result<(), DataplaneError> {
        let mut first_error = None;
        let interfaces = std::mem::take(&mut self.interfaces);
        for (ifindex, interface) in interfaces {
            if let Some(link) = interface.link
                && let Ok(program) = <&mut SchedClassifier>::try_from(
                    self.ebpf
                        .program_mut(PROG_SHAPE)
                        .ok_or_else(|| DataplaneError::Load(PROG_SHAPE.into()))?,
                )
                && let Err(e) = program.detach(link)
            {
                first_error.get_or_insert(DataplaneError::Tc(format!(
                    "detaching {PROG_SHAPE} from {}: {e}",
                    interface.name
                )));
            }
            if interface.added_clsact
                && let Err(e) = self.rtnl.delete_qdisc(ifindex, CLSACT_HANDLE, 0xFFFF_FFF1)
            {
                first_error.get_or_insert(tc_err(e));
            }
            if let Err(e) = self
                .rtnl
                .delete_qdisc(ifindex, u32::from(self.tag) << 16, TC_H_ROOT)
            {
                first_error.get_or_insert(tc_err(e));
            }
            tracing::info!(interface = %interface.name, "shaping qdisc and classifier removed");
        }
        first_error.map_or(Ok(()), Err)
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

/// TCX links exist from Linux 6.6 on.
pub(crate) fn tcx_available() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Renews the classifier's liveness deadline from a thread of its own, so a stalled engine
/// does not stop it (only a dead process does).
fn keep_alive(
    mut alive: Array<MapData, u64>,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>), DataplaneError> {
    let renew = move |alive: &mut Array<MapData, u64>| {
        let until = super::clock::monotonic_now_ns() + ALIVE_FOR.as_nanos() as u64;
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
        .map_err(|e| DataplaneError::Load(format!("starting the liveness thread: {e}")))?;
    Ok((stop, thread))
}

fn lock_path(dir: &Path, tag: u16) -> PathBuf {
    dir.join(format!("{tag:04x}.lock"))
}

/// Takes `path`'s flock without waiting; None if another process holds it.
fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(Some(file))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// Claims the first free tag.
fn claim_tag(dir: &Path) -> Result<(u16, File), DataplaneError> {
    let fail = |e: std::io::Error| DataplaneError::Tc(format!("{}: {e}", dir.display()));
    fs::create_dir_all(dir).map_err(fail)?;
    for tag in TAG_BASE..TAG_BASE + TAG_COUNT {
        if let Some(lock) = try_lock(&lock_path(dir, tag)).map_err(fail)? {
            return Ok((tag, lock));
        }
    }
    Err(DataplaneError::Tc(format!(
        "all {TAG_COUNT} tc tags in {} are held by running faultd instances",
        dir.display()
    )))
}

/// Whether `priority`/`major` is a faultd tag.
fn is_tag(value: u32) -> bool {
    (u32::from(TAG_BASE)..u32::from(TAG_BASE + TAG_COUNT)).contains(&value)
}

/// Removes the root qdiscs and netlink filters of dead instances (its own tag's included: the
/// instance that held it before is gone). Logs what it cannot do:
/// an agent that cannot sweep can still shape.
fn sweep(rtnl: &mut Rtnl, own: u16) {
    let dir = Path::new(TAG_LOCK_DIR);
    // Locks of dead tags, held while sweeping so no new instance claims them meanwhile.
    let mut dead: HashMap<u32, Option<File>> = HashMap::new();
    let mut is_dead = |tag: u32| -> bool {
        if !is_tag(tag) {
            return false;
        }
        // This instance has just claimed its tag: what carries it is a dead holder's.
        if tag == u32::from(own) {
            return true;
        }
        dead.entry(tag)
            .or_insert_with(|| try_lock(&lock_path(dir, tag as u16)).ok().flatten())
            .is_some()
    };
    match rtnl.qdiscs() {
        Ok(qdiscs) => {
            for q in qdiscs.iter().filter(|q| q.parent == TC_H_ROOT) {
                if is_dead(q.handle >> 16) {
                    match rtnl.delete_qdisc(q.ifindex, q.handle, TC_H_ROOT) {
                        Ok(()) => {
                            tracing::info!(ifindex = q.ifindex, handle = %rtnl::handle(q.handle),
                            "removed a dead faultd's root qdisc")
                        }
                        Err(e) => tracing::warn!(error = %e, "sweeping a dead faultd's qdisc"),
                    }
                }
            }
            let clsacts: Vec<u32> = qdiscs
                .iter()
                .filter(|q| q.kind == "clsact")
                .map(|q| q.ifindex)
                .collect();
            for ifindex in clsacts {
                let Ok(filters) = rtnl.filters(ifindex, CLSACT_EGRESS) else {
                    continue;
                };
                let mut swept = false;
                let mut priorities: Vec<u16> = filters.iter().map(|f| f.priority()).collect();
                priorities.dedup();
                for priority in priorities {
                    if is_dead(u32::from(priority)) {
                        match rtnl.delete_filters(ifindex, CLSACT_EGRESS, priority) {
                            Ok(()) => {
                                swept = true;
                                tracing::info!(
                                    ifindex,
                                    priority,
                                    "removed a dead faultd's tc filter"
                                );
                            }
                            Err(e) => tracing::warn!(error = %e, "sweeping a dead faultd's filter"),
                        }
                    }
                }
                // The clsact a dead instance added goes once nothing else is attached to it.
                let empty = |rtnl: &mut Rtnl, parent| {
                    rtnl.filters(ifindex, parent).is_ok_and(|f| f.is_empty())
                };
                if swept
                    && empty(rtnl, CLSACT_EGRESS)
                    && empty(rtnl, 0xFFFF_FFF2)
                    && let Err(e) = rtnl.delete_qdisc(ifindex, CLSACT_HANDLE, 0xFFFF_FFF1)
                {
                    tracing::warn!(error = %e, "removing a dead faultd's clsact");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing qdiscs to sweep"),
    }
}

/// The engine's view of one mechanism (netem or EDT) over the shared tc state: both use the
/// same classifier, maps and root qdiscs.
pub struct TcShaper {
    mechanism: ShapeMechanism,
    tc: Arc<std::sync::Mutex<TcShaping>>,
    slots: HashMap<String, u32>,
}

impl TcShaper {
    /// The netem and EDT shapers over one `TcShaping`.
    pub fn pair(tc: TcShaping) -> (TcShaper, TcShaper) {
        let tc = Arc::new(std::sync::Mutex::new(tc));
        let make = |mechanism| TcShaper {
            mechanism,
            tc: tc.clone(),
            slots: HashMap::new(),
        };
        (make(ShapeMechanism::Netem), make(ShapeMechanism::Edt))
    }

    fn tc(&self) -> std::sync::MutexGuard<'_, TcShaping> {
        // Every step rolls back before returning, so a panic cannot leave the state half-done.
        self.tc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, e: DataplaneError) -> DataplaneError {
        DataplaneError::Shaper {
            mechanism: self.mechanism.name(),
            reason: e.to_string(),
        }
    }
}

/// What a delay or bandwidth action asks of the tc mechanisms.
fn spec_of(action: &Action) -> Option<ShapeSpec> {
    match action {
        Action::Delay(delay) => Some(ShapeSpec {
            latency: delay.latency,
            jitter: delay.jitter,
            correlation: delay.correlation,
            rate_bytes_per_sec: 0,
            burst_bytes: 0,
        }),
        Action::Bandwidth(bandwidth) => Some(ShapeSpec {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            correlation: 0.0,
            rate_bytes_per_sec: bandwidth.rate_bytes_per_sec,
            burst_bytes: u32::try_from(bandwidth.burst).unwrap_or(u32::MAX),
        }),
        _ => None,
    }
}

impl Shaper for TcShaper {
    fn mechanism(&self) -> Mechanism {
        match self.mechanism {
            ShapeMechanism::Netem => Mechanism::Netem,
            ShapeMechanism::Edt => Mechanism::Edt,
        }
    }

    fn unavailable(&self, action: &Action) -> Option<String> {
        let spec = spec_of(action)?;
        match self.mechanism {
            ShapeMechanism::Edt => edt::check(&spec).err().map(|e| e.to_string()),
            ShapeMechanism::Netem => None,
        }
    }

    fn unavailable_for(&self, action: &Action, target: &Target) -> Option<String> {
        if let Scope::Netns { .. } = target.scope {
            return Some(format!(
                "{} shapes the host's interfaces, not one inside another network namespace \
                 (fault.target.netns); the nfqueue mechanism does",
                self.mechanism.name()
            ));
        }
        if target.direction != Direction::Egress {
            return Some(format!(
                "{} shapes what the workload sends (direction egress) at the interfaces' egress; \
                 {} traffic needs the nfqueue mechanism",
                self.mechanism.name(),
                target.direction.name()
            ));
        }
        self.unavailable(action)
    }

    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        let spec = spec_of(fault.action).ok_or_else(|| {
            self.error(DataplaneError::Unsupported {
                mechanism: self.mechanism.name(),
                reason: format!("cannot apply a {} action", fault.action.name()),
            })
        })?;
        // Egress keys only: the classifier runs at the egress hook.
        let keys: Vec<RuleKey> = fault
            .keys
            .iter()
            .filter(|k| k.direction == faultd_common::DIR_EGRESS)
            .copied()
            .collect();
        let mechanism = self.mechanism;
        let peers = fault.target.peer_set().map_err(|e| {
            self.error(DataplaneError::Unsupported {
                mechanism: mechanism.name(),
                reason: e.to_string(),
            })
        })?;
        self.tc()
            .apply(
                fault.slot,
                mechanism,
                spec,
                &keys,
                peers,
                fault.expires_at_ns,
            )
            .map_err(|e| self.error(e))?;
        self.slots.insert(fault.id.clone(), fault.slot);
        Ok(())
    }

    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError> {
        let Some(&slot) = self.slots.get(id) else {
            return Ok(());
        };
        self.tc()
            .refresh(slot, expires_at_ns)
            .map_err(|e| self.error(e))
    }

    fn remove(&mut self, id: &str) -> Result<(), DataplaneError> {
        let Some(slot) = self.slots.remove(id) else {
            return Ok(());
        };
        self.tc().remove(slot).map_err(|e| self.error(e))
    }

    fn counters(&self, id: &str) -> Result<Counters, DataplaneError> {
        match self.slots.get(id) {
            Some(&slot) => self.tc().counters(slot).map_err(|e| self.error(e)),
            None => Ok(Counters::default()),
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.tc().shutdown() {
            tracing::error!(mechanism = self.mechanism.name(), error = %e, "removing tc shaping state");
        }
    }
}

/// Whether this kernel can run `mechanism`, found by building what it needs — an htb root, a
/// class and its netem or fq leaf — on the loopback device of a private network namespace
/// that a short-lived thread creates and takes with it. Names what is missing.
pub fn probe(mechanism: ShapeMechanism) -> Result<(), String> {
    let thread = std::thread::Builder::new()
        .name("faultd-probe-tc".into())
        .spawn(move || -> Result<(), String> {
            // SAFETY: unshare on this thread only (network namespaces are per thread).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "creating a private network namespace: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let mut rtnl = Rtnl::open().map_err(|e| e.to_string())?;
            let missing = |kind: &'static str| {
                move |e: RtnlError| match e.errno() {
                    Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => {
                        format!("the kernel has no sch_{kind} ({e})")
                    }
                    _ => e.to_string(),
                }
            };
            let lo = 1;
            rtnl.replace_root_qdisc(lo, TAG_BASE, "htb", rtnl::htb_root_options(DIRECT_QLEN))
                .map_err(missing("htb"))?;
            let spec = ShapeSpec {
                latency: Duration::from_millis(1),
                jitter: Duration::ZERO,
                correlation: 0.0,
                rate_bytes_per_sec: 0,
                burst_bytes: 0,
            };
            match mechanism {
                ShapeMechanism::Netem => {
                    netem::install(&mut rtnl, lo, TAG_BASE, 0, &spec, &[]).map_err(missing("netem"))
                }
                ShapeMechanism::Edt => edt::install(&mut rtnl, lo, TAG_BASE).map_err(missing("fq")),
            }
        })
        .map_err(|e| format!("starting the probe thread: {e}"))?;
    thread
        .join()
        .map_err(|_| "the probe thread panicked".to_string())?
}

/// A capability as probed: its name, and what was found or why it is missing.
pub type Found = (&'static str, Result<String, String>);

/// The netem and EDT shapers for the engine, in that order: the real ones where `probe` finds
/// what they need and the classifier loads, else stand-ins that name what is missing. Also
/// what was found, as (capability, Ok(detail) or Err(why)) for `Capabilities`. Blocking.
pub fn tc_shapers(object: &[u8]) -> (Vec<Box<dyn Shaper>>, Vec<Found>) {
    let netem = probe(ShapeMechanism::Netem);
    let edt = probe(ShapeMechanism::Edt);
    let mut found = vec![
        (
            "netem",
            netem
                .clone()
                .map(|()| "built htb + netem on a private loopback device".to_string()),
        ),
        (
            "fq",
            edt.clone().map(|()| {
                "built htb + fq (with a horizon) on a private loopback device".to_string()
            }),
        ),
    ];
    let loaded = if netem.is_ok() || edt.is_ok() {
        TcShaping::load(object).map_err(|e| format!("loading the tc classifier: {e}"))
    } else {
        Err("no qdisc to shape with".to_string())
    };
    found.push((
        "tc_classifier",
        match &loaded {
            Ok(_) if tcx_available() => {
                Ok("faultd_shape on egress through fd-owned TCX links".into())
            }
            Ok(_) => Ok("faultd_shape on clsact egress through netlink (no TCX before 6.6)".into()),
            Err(e) => Err(e.clone()),
        },
    ));
    let missing = |mechanism: Mechanism, reason: String| -> Box<dyn Shaper> {
        Box::new(super::MissingShaper { mechanism, reason })
    };
    let shapers = match loaded {
        Ok(tc) => {
            let (netem_shaper, edt_shaper) = TcShaper::pair(tc);
            vec![
                match netem {
                    Ok(()) => Box::new(netem_shaper) as Box<dyn Shaper>,
                    Err(why) => missing(Mechanism::Netem, why),
                },
                match edt {
                    Ok(()) => Box::new(edt_shaper) as Box<dyn Shaper>,
                    Err(why) => missing(Mechanism::Edt, why),
                },
            ]
        }
        Err(why) => vec![
            missing(Mechanism::Netem, netem.err().unwrap_or_else(|| why.clone())),
            missing(Mechanism::Edt, edt.err().unwrap_or(why)),
        ],
    };
    (shapers, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_claimed_once_and_freed_with_the_holder() {
        let dir = std::env::temp_dir().join(format!("faultd-tags-{}", std::process::id()));
        let (first, lock) = claim_tag(&dir).unwrap();
        assert_eq!(first, TAG_BASE);
        let (second, _lock2) = claim_tag(&dir).unwrap();
        assert_eq!(second, TAG_BASE + 1);
        // Held: not dead.
        assert!(try_lock(&lock_path(&dir, first)).unwrap().is_none());
        drop(lock);
        assert!(try_lock(&lock_path(&dir, first)).unwrap().is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_tag_range_is_swept() {
        assert!(is_tag(0x7a00));
        assert!(is_tag(0x7aff));
        assert!(!is_tag(0x7b00));
        assert!(!is_tag(0x8001));
        assert!(!is_tag(1));
    }
}
