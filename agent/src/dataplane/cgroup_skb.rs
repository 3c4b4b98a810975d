//! cgroup_skb ingress/egress and cgroup/connect programs, attached through fd-owned bpf_links
//! only where faults are: at each faulted cgroup that no other faulted cgroup contains (the
//! cgroup v2 root only for the host scope), detached with the last fault there. Programs
//! attached at a cgroup run for its whole subtree, so cgroups created below it later (a pod's
//! restarted containers) are covered, and traffic of cgroups no fault covers runs nothing. The
//! links die with faultd's fds, and every rule carries its lease deadline, so nothing outlives
//! the agent or the lease.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use faultd_common::{
    COUNTERS_MAP, Counters, PEERS_MAP, PORTS_MAP, PROG_EGRESS, PROG_TC_EGRESS, PROG_TC_INGRESS,
    PeerKey, RULES_MAP, RuleKey, RuleValue, SCOPES_MAP, ScopeValue, port_bit,
};
use faultd_common::{DIR_CONNECT, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP};

use super::cgroup_links::{CgroupAttachments, load_connect, load_skb};
use super::{
    AttachFailure, ConnectionKiller, Dataplane, DataplaneError, LoadError, PeerEntry, SocketFilter,
    TcError, Unavailable, sock_diag,
};
use crate::capability::Capability;
use crate::fault::Action;

pub struct CgroupSkbDataplane {
    rules: BpfHashMap<MapData, RuleKey, RuleValue>,
    scopes: BpfHashMap<MapData, u64, ScopeValue>,
    peers: LpmTrie<MapData, PeerKey, RuleValue>,
    counters: PerCpuArray<MapData, Counters>,
    ports: Array<MapData, u32>,
    /// Rules per scope id, to keep the scopes map in step with the rules map.
    scope_rules: HashMap<u64, u32>,
    /// Rules per (port, `port_bit`), to keep the ports map in step with the rules map.
    port_rules: HashMap<(u16, u32), u32>,
    /// Where the cgroup programs are attached.
    cgroups: CgroupAttachments,
    nr_cpus: usize,
    /// Whether the connect programs loaded and attached (reject, reset), or why not.
    connect: Result<(), Arc<DataplaneError>>,
    /// Whether SOCK_DESTROY works here (reset), or why not.
    sock_destroy: Result<(), Arc<sock_diag::SockDestroyUnavailable>>,
    /// Whether the tc programs of netns scopes loaded, or why not.
    tc: Result<(), Arc<DataplaneError>>,
    /// The interfaces of netns scopes the tc programs are attached to, by scope id.
    interfaces: HashMap<u64, Attached>,
    /// The maps of request matches and their reset thread, or why not.
    requests: Result<super::requests::Requests, Arc<DataplaneError>>,
    /// Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
}

use super::BPF_EXIST;
use super::encoding::peer_key;
use super::error::map_err;

impl CgroupSkbDataplane {
    /// Loads the object and its programs; nothing is attached until a fault needs it. Blocking
    /// (verifier): call it from a blocking thread. `cgroup_root` is checked to be a cgroup
    /// directory faultd can open.
    pub fn load(object: &[u8], cgroup_root: &Path) -> Result<Self, DataplaneError> {
        if object.is_empty() {
            return Err(DataplaneError::StubObject);
        }
        let mut ebpf = EbpfLoader::new().load(object).map_err(LoadError::object)?;
        File::open(cgroup_root).map_err(|source| DataplaneError::OpenCgroup {
            program: PROG_EGRESS,
            cgroup: cgroup_root.display().to_string(),
            source,
        })?;
        load_skb(&mut ebpf)?;
        // The connect programs need newer kernels than the packet programs (bpf_set_retval in
        // cgroup hooks, 5.18): without them drop still works and reject/reset say what is missing.
        let connect = load_connect(&mut ebpf).map_err(Arc::new);
        if let Err(e) = &connect {
            tracing::warn!(error = %e, "reject and reset are unavailable");
        }
        let sock_destroy = sock_diag::probe().map_err(Arc::new);
        let tc = load_tc(&mut ebpf).map_err(Arc::new);
        if let Err(e) = &tc {
            tracing::warn!(error = %e, "faults on interfaces in network namespaces are unavailable");
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(LoadError::MissingMap(name));
        let rules = BpfHashMap::try_from(take(RULES_MAP)?).map_err(map_err(RULES_MAP))?;
        let scopes = BpfHashMap::try_from(take(SCOPES_MAP)?).map_err(map_err(SCOPES_MAP))?;
        let peers = LpmTrie::try_from(take(PEERS_MAP)?).map_err(map_err(PEERS_MAP))?;
        let counters = PerCpuArray::try_from(take(COUNTERS_MAP)?).map_err(map_err(COUNTERS_MAP))?;
        let ports = Array::try_from(take(PORTS_MAP)?).map_err(map_err(PORTS_MAP))?;
        let nr_cpus = aya::util::nr_cpus().map_err(LoadError::cpus)?;
        let requests = super::requests::Requests::load(&mut ebpf).map_err(Arc::new);
        if let Err(e) = &requests {
            tracing::warn!(error = %e, "request matches are unavailable");
        }
        Ok(Self {
            rules,
            scopes,
            peers,
            counters,
            ports,
            scope_rules: HashMap::new(),
            port_rules: HashMap::new(),
            cgroups: CgroupAttachments::default(),
            nr_cpus,
            connect,
            sock_destroy,
            tc,
            interfaces: HashMap::new(),
            requests,
            _ebpf: ebpf,
        })
    }

    /// Adds `delta` rules to a scope, creating or deleting its scopes-map entry at 0↔1.
    fn count_scope(&mut self, scope: u64, delta: i64) -> Result<(), DataplaneError> {
        let before = i64::from(self.scope_rules.get(&scope).copied().unwrap_or(0));
        let after = (before + delta).max(0);
        if after == 0 {
            self.scope_rules.remove(&scope);
            if before > 0 {
                self.scopes.remove(&scope).map_err(map_err(SCOPES_MAP))?;
            }
        } else {
            self.scope_rules.insert(scope, after as u32);
            if before == 0 {
                let value = ScopeValue::default();
                self.scopes
                    .insert(scope, value, 0)
                    .map_err(map_err(SCOPES_MAP))?;
            }
        }
        Ok(())
    }

    /// Adds `delta` rules on a key's port, setting its bit in the ports map at 0→1 and clearing
    /// it at 1→0.
    fn count_port(&mut self, key: &RuleKey, delta: i64) -> Result<(), DataplaneError> {
        let bit = port_bit(key.protocol, key.direction);
        let held = (key.port, bit);
        let before = i64::from(self.port_rules.get(&held).copied().unwrap_or(0));
        let after = (before + delta).max(0);
        if after == 0 {
            self.port_rules.remove(&held);
        } else {
            self.port_rules.insert(held, after as u32);
        }
        if (before == 0) == (after == 0) {
            return Ok(());
        }
        let bits = PORT_BITS
            .iter()
            .filter(|&&bit| self.port_rules.contains_key(&(key.port, bit)))
            .fold(0, |bits, bit| bits | bit);
        self.ports
            .set(u32::from(key.port), bits, 0)
            .map_err(map_err(PORTS_MAP))
    }
}

impl Dataplane for CgroupSkbDataplane {
    fn insert(&mut self, rules: &[(RuleKey, RuleValue)]) -> Result<(), DataplaneError> {
        let mut added = Vec::with_capacity(rules.len());
        let mut result = Ok(());
        for (key, value) in rules {
            // The scope entry goes in first so the program never misses a new rule.
            // So do the scope entry and the port's bit.
            result = self
                .count_scope(key.scope_id, 1)
                .and_then(|()| self.count_port(key, 1))
                .and_then(|()| self.rules.insert(key, value, 0).map_err(map_err(RULES_MAP)));
            match result {
                Ok(()) => added.push(*key),
                Err(_) => {
                    // Undo this key's counts; `remove` undoes the earlier keys'.
                    let undone = self
                        .count_scope(key.scope_id, -1)
                        .and(self.count_port(key, -1));
                    if let Err(e) = undone {
                        tracing::warn!(error = %e, "rolling back a failed rule insert");
                    }
                    break;
                }
            }
        }
        if result.is_err()
            && let Err(e) = self.remove(&added)
        {
            // The first error is the one worth reporting.
            tracing::warn!(error = %e, "rolling back a failed rule insert");
        }
        result
    }

    fn refresh(&mut self, rules: &[(RuleKey, RuleValue)]) -> Result<(), DataplaneError> {
        for (key, value) in rules {
            self.rules
                .insert(key, value, BPF_EXIST)
                .map_err(map_err(RULES_MAP))?;
        }
        Ok(())
    }

    fn remove(&mut self, keys: &[RuleKey]) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for key in keys {
            match self.rules.remove(key) {
                Ok(()) => {
                    let counted = self
                        .count_scope(key.scope_id, -1)
                        .and(self.count_port(key, -1));
                    if let Err(e) = counted {
                        first_error.get_or_insert(e);
                    }
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    first_error.get_or_insert(map_err(RULES_MAP)(e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn set_peers(&mut self, entries: &[(PeerEntry, RuleValue)]) -> Result<(), DataplaneError> {
        for (entry, value) in entries {
            self.peers
                .insert(&peer_key(entry), value, 0)
                .map_err(map_err(PEERS_MAP))?;
        }
        Ok(())
    }

    fn attach_cgroup(
        &mut self,
        scope: &crate::target::ResolvedScope,
    ) -> Result<(), DataplaneError> {
        let connect = self.connect.is_ok();
        self.cgroups.attach(&mut self._ebpf, scope, connect)
    }

    fn release_cgroup(&mut self, scope_id: u64) -> Result<(), DataplaneError> {
        let connect = self.connect.is_ok();
        self.cgroups.release(&mut self._ebpf, scope_id, connect)
    }

    fn attach_interface(
        &mut self,
        scope: &crate::target::ResolvedScope,
        interface: &str,
    ) -> Result<(), DataplaneError> {
        let netns_id = std::fs::metadata(&scope.dir)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            })
            .map_err(|source| TcError::Path {
                path: scope.dir.clone(),
                source,
            })?;
        if let Some(attached) = self.interfaces.get_mut(&scope.cgroup_id) {
            if attached.netns_id != netns_id || attached.interface != interface {
                return Err(DataplaneError::Unsupported {
                    mechanism: "tc",
                    reason: format!(
                        "interface {interface} of {} has the index of interface {} of {}, \
                         which faults already hold; faultd tells the interfaces of netns \
                         scopes apart by index",
                        scope.dir.display(),
                        attached.interface,
                        attached.netns.display()
                    ),
                });
            }
            attached.faults += 1;
            return Ok(());
        }
        if let Err(e) = &self.tc {
            return Err(DataplaneError::Unsupported {
                mechanism: "tc",
                reason: format!("the tc programs of netns scopes did not load: {e}"),
            });
        }
        let ebpf = &mut self._ebpf;
        let netns = scope.dir.clone();
        let attached = crate::target::namespaces::in_netns(&netns, || attach_tc(ebpf, interface))
            .map_err(|source| TcError::EnterNetns {
                netns: netns.clone(),
                source,
            })??;
        tracing::info!(netns = %netns.display(), interface, tcx = attached.added_clsact.is_none(),
            "tc programs attached");
        self.interfaces.insert(
            scope.cgroup_id,
            Attached {
                netns,
                netns_id,
                interface: interface.to_string(),
                faults: 1,
                ..attached
            },
        );
        Ok(())
    }

    fn release_interface(&mut self, scope_id: u64) -> Result<(), DataplaneError> {
        let Some(attached) = self.interfaces.get_mut(&scope_id) else {
            return Ok(());
        };
        attached.faults = attached.faults.saturating_sub(1);
        if attached.faults > 0 {
            return Ok(());
        }
        let Some(attached) = self.interfaces.remove(&scope_id) else {
            return Ok(());
        };
        let ebpf = &mut self._ebpf;
        let netns = attached.netns.clone();
        let interface = attached.interface.clone();
        // Netlink filters are found by ifindex in the namespace: detach from inside it.
        crate::target::namespaces::in_netns(&netns, || detach_tc(ebpf, attached)).map_err(
            |source| TcError::EnterNetns {
                netns: netns.clone(),
                source,
            },
        )??;
        tracing::info!(netns = %netns.display(), interface, "tc programs detached");
        Ok(())
    }

    fn remove_peers(&mut self, entries: &[PeerEntry]) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for entry in entries {
            match self.peers.remove(&peer_key(entry)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    first_error.get_or_insert(map_err(PEERS_MAP)(e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn counters(&self, slot: u32) -> Result<Counters, DataplaneError> {
        let per_cpu = self.counters.get(&slot, 0).map_err(map_err(COUNTERS_MAP))?;
        Ok(per_cpu.iter().fold(Counters::default(), |sum, c| Counters {
            matched: sum.matched + c.matched,
            dropped: sum.dropped + c.dropped,
            refused: sum.refused + c.refused,
            delayed: sum.delayed + c.delayed,
            requests_matched: sum.requests_matched + c.requests_matched,
            requests_affected: sum.requests_affected + c.requests_affected,
            ..sum
        }))
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let zeros =
            PerCpuValues::try_from(vec![Counters::default(); self.nr_cpus]).map_err(|source| {
                DataplaneError::PerCpuValues {
                    map: COUNTERS_MAP,
                    source,
                }
            })?;
        self.counters
            .set(slot, zeros, 0)
            .map_err(map_err(COUNTERS_MAP))
    }

    fn mechanism(&self, action: &Action) -> Result<&'static str, Unavailable> {
        match action {
            Action::Drop { .. } | Action::Stall { close_after: None } => Ok("cgroup_skb"),
            Action::Stall {
                close_after: Some(_),
            } => self
                .sock_destroy
                .clone()
                .map(|()| "cgroup_skb+sock_diag")
                .map_err(Unavailable::SockDestroy),
            Action::Reject => self
                .connect
                .clone()
                .map(|()| "cgroup_connect")
                .map_err(Unavailable::ConnectPrograms),
            Action::Reset { after_bytes } => {
                self.sock_destroy
                    .clone()
                    .map_err(Unavailable::SockDestroy)?;
                if after_bytes.is_some() {
                    return Ok("sock_diag");
                }
                self.connect
                    .clone()
                    .map(|()| "sock_diag+cgroup_connect")
                    .map_err(Unavailable::ConnectPrograms)
            }
            Action::Delay(_)
            | Action::Bandwidth(_)
            | Action::SlowConnect { .. }
            | Action::SlowClose { .. }
            | Action::Duplicate { .. }
            | Action::Corrupt { .. }
            | Action::Reorder { .. }
            | Action::Slice { .. } => Err(Unavailable::Shaping),
            Action::LoseReply => self.request_mechanism(action),
        }
    }

    fn set_request(
        &mut self,
        slot: u32,
        entry: &super::RequestEntry,
    ) -> Result<(), DataplaneError> {
        match &mut self.requests {
            Ok(requests) => requests.set(slot, entry),
            Err(e) => Err(DataplaneError::Unsupported {
                mechanism: "request match",
                reason: e.to_string(),
            }),
        }
    }

    fn remove_request(
        &mut self,
        slot: u32,
        entry: &super::RequestEntry,
    ) -> Result<(), DataplaneError> {
        match &mut self.requests {
            Ok(requests) => requests.remove(slot, entry),
            Err(_) => Ok(()),
        }
    }

    fn request_mechanism(&self, action: &Action) -> Result<&'static str, Unavailable> {
        if let Err(e) = &self.requests {
            return Err(Unavailable::Requests(e.clone()));
        }
        match action {
            Action::Reset { .. } | Action::LoseReply => self
                .sock_destroy
                .clone()
                .map(|()| "cgroup_skb+sock_diag")
                .map_err(Unavailable::SockDestroy),
            _ => Ok("cgroup_skb"),
        }
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            Capability::outcome(
                "request_match",
                self.requests.as_ref().map(|_| ()).map_err(Arc::clone),
                crate::fault::request::NOT_MATCHED,
            ),
            Capability::outcome(
                "cgroup_connect",
                self.connect.clone(),
                "connect4+connect6 programs refusing with bpf_set_retval(-ECONNREFUSED)",
            ),
            Capability::outcome(
                "netns_tc",
                self.tc.clone(),
                "tc programs for netns{path, interface} scopes",
            ),
            Capability::outcome(
                "sock_destroy",
                self.sock_destroy.clone(),
                "SOCK_DESTROY over netlink sock_diag (probed on a loopback connection)",
            ),
        ]
    }

    fn connection_killer(&self) -> ConnectionKiller {
        let sockets = std::sync::Mutex::new(sock_diag::Sockets::default());
        std::sync::Arc::new(move |filter: &SocketFilter| {
            let mut sockets = sockets.lock().unwrap_or_else(|p| p.into_inner());
            Ok(sock_diag::destroy(filter, &mut sockets)?.sockets)
        })
    }
}

/// The tc programs attached to one interface of a netns scope.
struct Attached {
    netns: std::path::PathBuf,
    /// The namespace's (device, inode).
    netns_id: (u64, u64),
    interface: String,
    /// Faults on the interface.
    faults: usize,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    /// Netlink-attached (no TCX): whether faultd added the clsact qdisc, and the ifindex.
    added_clsact: Option<(bool, u32)>,
}

const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_TC_INGRESS, TcAttachType::Ingress),
    (PROG_TC_EGRESS, TcAttachType::Egress),
];

fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(LoadError::program_type)?;
    Ok(program)
}

fn load_tc(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for (name, _) in TC_PROGRAMS {
        tc_program(ebpf, name)?
            .load()
            .map_err(LoadError::verify(name))?;
    }
    Ok(())
}

/// On a thread inside the namespace: TCX links where the kernel has TCX, else cls_bpf filters
/// on a clsact qdisc (added if missing, and then removed with them).
fn attach_tc(ebpf: &mut Ebpf, interface: &str) -> Result<Attached, DataplaneError> {
    let tc_err = |source: AttachFailure| TcError::Attach {
        interface: interface.to_string(),
        source: Box::new(source),
    };
    let mut attached = Attached {
        netns: Default::default(),
        netns_id: (0, 0),
        interface: interface.to_string(),
        faults: 0,
        links: Vec::new(),
        added_clsact: None,
    };
    let tcx = super::tcx_available();
    if !tcx {
        let name = CString::new(interface).map_err(|e| tc_err(e.into()))?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let added = super::rtnl::Rtnl::open()
            .and_then(|mut rtnl| rtnl.add_clsact(ifindex))
            .map_err(|e| tc_err(e.into()))?;
        attached.added_clsact = Some((added, ifindex));
    }
    for (name, attach_type) in TC_PROGRAMS {
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        } else {
            TcAttachOptions::Netlink(NlOptions::default())
        };
        match tc_program(ebpf, name).and_then(|p| {
            p.attach_with_options(interface, attach_type, options)
                .map_err(|e| tc_err(e.into()).into())
        }) {
            Ok(link) => attached.links.push((name, link)),
            Err(e) => {
                if let Err(undo) = detach_tc(ebpf, attached) {
                    tracing::warn!(error = %undo, "undoing a failed tc attach");
                }
                return Err(e);
            }
        }
    }
    Ok(attached)
}

/// On a thread inside the namespace: detaches the programs, and removes a clsact qdisc faultd
/// added.
fn detach_tc(ebpf: &mut Ebpf, attached: Attached) -> Result<(), DataplaneError> {
    let mut first_error = None;
    for (name, link) in attached.links {
        if let Err(e) = tc_program(ebpf, name).and_then(|p| {
            p.detach(link).map_err(|source| {
                TcError::Detach {
                    program: name,
                    source: Box::new(source),
                }
                .into()
            })
        }) {
            first_error.get_or_insert(e);
        }
    }
    if let Some((true, ifindex)) = attached.added_clsact {
        let removed = super::rtnl::Rtnl::open().and_then(|mut rtnl| {
            rtnl.delete_qdisc(ifindex, super::rtnl::CLSACT_HANDLE, 0xFFFF_FFF1)
        });
        if let Err(e) = removed {
            first_error.get_or_insert(
                TcError::RemoveClsact {
                    interface: attached.interface.clone(),
                    source: e,
                }
                .into(),
            );
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Every bit a ports-map entry may hold.
const PORT_BITS: [u32; 6] = [
    port_bit(PROTO_TCP, DIR_EGRESS),
    port_bit(PROTO_TCP, DIR_INGRESS),
    port_bit(PROTO_TCP, DIR_CONNECT),
    port_bit(PROTO_UDP, DIR_EGRESS),
    port_bit(PROTO_UDP, DIR_INGRESS),
    port_bit(PROTO_UDP, DIR_CONNECT),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_stub_object_clearly() {
        let err = CgroupSkbDataplane::load(&[], Path::new("/nonexistent")).err();
        assert!(matches!(err, Some(DataplaneError::StubObject)));
        assert!(err.unwrap().to_string().contains("cargo xtask setup"));
    }
}
