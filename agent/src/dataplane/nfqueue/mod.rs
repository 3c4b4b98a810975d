//! NFQUEUE: delay and bandwidth on any kernel, in user space.
//!
//! For each fault and each network namespace its workload uses (for a `netns{path, interface}`
//! scope: that namespace, where the rules match the interface), an iptables rule
//! (`netfilter/`) sends the matched packets to a queue with `--queue-bypass`, and a dedicated
//! OS thread (a *lane*) bound to that queue holds each packet until its release time, then
//! accepts it. Queues are per network namespace, so the lane opens its netlink socket from
//! inside the rules' namespace:
//! - delay: latency plus a normally distributed part of standard deviation `jitter`, whose
//!   successive values are correlated (a stationary AR(1) process, so the spread stays the
//!   requested one); a later packet of a flow never leaves before an earlier one;
//! - bandwidth: a token bucket per direction (rate, burst).
//!
//! Fail open: if the lane dies or faultd is killed, the kernel frees the queue and
//! `--queue-bypass` lets packets through; the packets held at that moment are lost (TCP
//! retransmits them). A full kernel queue accepts packets too (`fail-open`). The lane also knows
//! the lease deadline: from that instant it releases everything and holds nothing, even if
//! faultd's expiry task is late; the rule itself is removed by the engine, and rules of dead
//! agents are swept when an agent starts or applies a fault in the same namespace.
//!
//! The `nfq` crate does not expose its socket, which a lane needs to wait for "a packet or the
//! next release time" (`ppoll`). `open_queue` finds it: the one new NETLINK_NETFILTER socket
//! that appears in `/proc/self/fd` while the queue is opened under a process-wide lock.
//!
//! Rooms: `schedule` (when packets leave), `queue` (the queue socket), `lane` (the thread that
//! holds packets), `guard` (what releases them while faultd is stopped), `placement` (a fault's
//! lane and rules in one namespace), `sweep` (what dead agents left), `worker` (the thread that
//! runs iptables), `probe` (the start-up proof), `error` (what can fail, and how the engine
//! sees it).

mod cleanup;
mod error;
mod guard;
mod lane;
mod placement;
mod probe;
mod queue;
mod refusal;
mod schedule;
mod slice;
mod sweep;
mod tamper;
mod worker;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use faultd_common::Counters;

use super::netfilter::{self, Family, Matcher};
use super::{Cleanup, DataplaneError, Shaped, Shaper};
use crate::fault::{Action, FaultId, Mechanism, Scope, Target};
use crate::target::namespaces::{self, NetNs};
use cleanup::Cleanups;
use error::NfqueueError;
use placement::{Placement, backstop_until};
pub use probe::{Probe, probe};
use queue::{QUEUE_COUNT, QUEUE_FIRST};
use worker::Worker;

fn shaper_error(reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Shaper {
        mechanism: Mechanism::Nfqueue.name(),
        reason: reason.into(),
    }
}

/// The NFQUEUE mechanism: the placements of each fault, per namespace, and what they share.
pub struct NfqueueShaper {
    instance: String,
    cgroup_root: PathBuf,
    /// `<state dir>/nfqueue-netns`: namespaces this agent put rules in, so that its successor
    /// on the same state directory sweeps them after a crash.
    record: PathBuf,
    own_netns: Arc<NetNs>,
    families: Result<Vec<Family>, String>,
    faults: HashMap<FaultId, Vec<Placement>>,
    /// Faults per namespace (by inode): the chains go with the last one.
    in_use: HashMap<u64, usize>,
    /// Faults refusing connects on an interface (`reject` on a netns scope).
    refusals: refusal::Refusals,
    recorded: BTreeSet<u64>,
    next_queue: u16,
    worker: Worker,
    /// Where the background removals stand, per fault.
    cleanups: Cleanups,
    /// The lock the faultd instances of the host share: held from reading a namespace's rules
    /// to applying ours, so that two instances never pick the same mark id or queue.
    host_lock: Option<PathBuf>,
}

impl NfqueueShaper {
    /// Sweeps what dead agents left in faultd's own network namespace and in the ones the
    /// previous agent on this state directory recorded, then serves with the families the
    /// probe proved (`families`).
    pub fn start(
        instance: &str,
        cgroup_root: &Path,
        state_dir: &Path,
        families: Result<Vec<Family>, String>,
    ) -> Result<NfqueueShaper, DataplaneError> {
        let own_netns = Arc::new(NetNs::current().map_err(NfqueueError::OwnNetns)?);
        let record = state_dir.join("nfqueue-netns");
        let own_id = instance.to_owned();
        let mut namespaces = vec![own_netns.clone()];
        namespaces.extend(sweep::recorded_namespaces(&record, &own_netns));
        sweep::sweep_dead(&namespaces, &own_id);
        fs::write(&record, "").map_err(|source| NfqueueError::Record {
            path: record.clone(),
            source,
        })?;
        Ok(NfqueueShaper {
            next_queue: QUEUE_FIRST
                + (u16::from_str_radix(&own_id[..4], 16).unwrap_or(0) % QUEUE_COUNT),
            instance: own_id,
            cgroup_root: cgroup_root.to_path_buf(),
            record,
            own_netns,
            families,
            faults: HashMap::new(),
            in_use: HashMap::new(),
            refusals: HashMap::new(),
            recorded: BTreeSet::new(),
            worker: Worker::start().map_err(NfqueueError::StartWorker)?,
            cleanups: Cleanups::default(),
            host_lock: None,
        })
    }

    /// Shares `path`'s lock with the other faultd instances of the host (`claims::lock_path`).
    pub fn with_host_lock(mut self, path: PathBuf) -> NfqueueShaper {
        self.host_lock = Some(path);
        self
    }

    /// The namespaces the fault applies in: an interface scope's own (the lane's queue socket
    /// is opened there, since NFQUEUE is per network namespace), else those of the cgroup's
    /// processes.
    fn namespaces_of(&self, fault: &Shaped<'_>) -> Result<Vec<Arc<NetNs>>, DataplaneError> {
        match &fault.target.scope {
            Scope::Host => return Ok(vec![self.own_netns.clone()]),
            Scope::Netns { path, .. } => {
                let netns =
                    NetNs::open(Path::new(path)).map_err(|source| NfqueueError::OpenNetns {
                        path: path.clone(),
                        source,
                    })?;
                return Ok(vec![Arc::new(netns)]);
            }
            _ => {}
        }
        let dir = self
            .cgroup_root
            .join(fault.resolved.cgroup_path.trim_start_matches('/'));
        let found = namespaces::of_cgroup(&dir);
        if found.is_empty() {
            tracing::info!(cgroup = %fault.resolved.cgroup_path,
                "no process in the cgroup yet: delaying in faultd's own network namespace");
            return Ok(vec![self.own_netns.clone()]);
        }
        Ok(found.into_iter().map(Arc::new).collect())
    }
}

/// Whether the fault is a `reject` or `reset` on an interface, whose refusing of new connects
/// this mechanism applies with REJECT rules (`refusal`; a reset's teardown of the established
/// ones is the engine's, over sock_diag).
pub fn refuses_on_interface(action: &Action, target: &Target) -> bool {
    action.refuses_connects() && matches!(target.scope, Scope::Netns { .. })
}

impl Shaper for NfqueueShaper {
    fn mechanism(&self) -> Mechanism {
        Mechanism::Nfqueue
    }

    fn unavailable(&self, action: &Action) -> Option<String> {
        match (action, &self.families) {
            (
                Action::Drop { .. } | Action::Reject | Action::Reset { .. } | Action::Stall { .. },
                _,
            ) => Some(format!("NFQUEUE does not apply {}", action.name())),
            (_, Ok(_)) => None,
            (_, Err(e)) => Some(e.clone()),
        }
    }

    fn unavailable_for(&self, action: &Action, target: &Target) -> Option<String> {
        if refuses_on_interface(action, target) {
            return self.families.as_ref().err().cloned();
        }
        self.unavailable(action)
    }

    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        let families = self
            .families
            .clone()
            .map_err(|e| DataplaneError::Unsupported {
                mechanism: Mechanism::Nfqueue.name(),
                reason: e,
            })?;
        if refuses_on_interface(fault.action, fault.target) {
            return self.refuse(fault, &families);
        }
        let matcher = match &fault.target.scope {
            Scope::Netns { interface, .. } => netfilter::check_interface(interface)
                .map(|()| Matcher::Interface(interface.clone()))
                .map_err(|e| e.to_string()),
            // xt_cgroup resolves the path from iptables' cgroup namespace root, which need not
            // be `--cgroup-root`.
            _ => crate::target::namespace_path(&fault.resolved.dir)
                .map_err(|e| e.to_string())
                .and_then(|path| {
                    netfilter::check_cgroup_path(&path)
                        .map(|()| Matcher::Cgroup(path))
                        .map_err(|e| e.to_string())
                }),
        }
        .map_err(|reason| DataplaneError::Unsupported {
            mechanism: Mechanism::Nfqueue.name(),
            reason,
        })?;
        let mut placements = Vec::new();
        for netns in self.namespaces_of(fault)? {
            match self.place(fault, &matcher, netns.clone(), &families) {
                Ok(placement) => {
                    *self.in_use.entry(netns.inode()).or_insert(0) += 1;
                    tracing::info!(fault = %fault.id, queue = placement.lane.queue,
                        netns = %netns.path().display(), "NFQUEUE rules in place");
                    placements.push(placement);
                }
                Err(e) => {
                    for placement in placements {
                        self.unplace(None, placement);
                    }
                    return Err(e);
                }
            }
        }
        self.faults.insert(fault.id.clone(), placements);
        Ok(())
    }

    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError> {
        self.refresh_refusal(id, expires_at_ns);
        let until = backstop_until(expires_at_ns);
        for placement in self.faults.get_mut(id).into_iter().flatten() {
            placement.lane.refresh(expires_at_ns);
            if placement.rules.until == Some(until) {
                continue;
            }
            // The kernel-side deadline moves with the lease, in one transaction per family.
            let swaps = placement.move_deadline(until);
            spawn_swaps(
                &self.worker,
                netfilter::TABLE,
                &placement.netns,
                swaps,
                "NFQUEUE",
            );
        }
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<(), DataplaneError> {
        self.end_refusal(id);
        for placement in self.faults.remove(id).unwrap_or_default() {
            self.unplace(Some(id), placement);
        }
        Ok(())
    }

    fn cleanup(&self, id: &str) -> Cleanup {
        self.cleanups.status(id)
    }

    fn retry(&mut self, id: &str) {
        for left in self.cleanups.take_failed(id) {
            self.remove_in_background(Some(id), left.placement, left.families);
        }
    }

    fn counters(&self, id: &str) -> Result<Counters, DataplaneError> {
        Ok(self
            .faults
            .get(id)
            .into_iter()
            .flatten()
            .map(|p| p.lane.counters())
            .fold(Counters::default(), |sum, c| Counters {
                matched: sum.matched + c.matched,
                dropped: sum.dropped + c.dropped,
                delayed: sum.delayed + c.delayed,
                requests_matched: sum.requests_matched + c.requests_matched,
                requests_affected: sum.requests_affected + c.requests_affected,
                refused: 0,
                duplicated: sum.duplicated + c.duplicated,
                corrupted: sum.corrupted + c.corrupted,
                reordered: sum.reordered + c.reordered,
                sliced: sum.sliced + c.sliced,
            }))
    }

    fn flush(&mut self) {
        if let Err(e) = self.worker.call(|| ()) {
            tracing::warn!(error = %e, "waiting for NFQUEUE clean-up");
        }
        if self.faults.is_empty() && self.refusals.is_empty() && !self.cleanups.any_failed() {
            // Nothing of ours is left anywhere: the next agent has nothing to sweep.
            self.forget_namespaces();
        }
    }
}

impl Drop for NfqueueShaper {
    fn drop(&mut self) {
        let ids: Vec<FaultId> = self
            .faults
            .keys()
            .chain(self.refusals.keys())
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.remove(&id) {
                tracing::warn!(error = %e, "reverting an NFQUEUE fault at exit");
            }
        }
        // One last try for removals that failed; what still fails is the next agent's sweep,
        // so the record of namespaces stays.
        let leftovers = self.cleanups.take_all();
        if leftovers.is_empty() {
            self.flush();
            return;
        }
        for left in leftovers {
            self.remove_in_background(None, left.placement, left.families);
        }
        if let Err(e) = self.worker.call(|| ()) {
            tracing::warn!(error = %e, "waiting for NFQUEUE clean-up");
        }
    }
}

/// Applies deadline `swaps` of `rules` rules (netfilter table `table`) in `netns` on `worker`,
/// after whatever is queued: a renewal never waits for iptables. A swap that fails leaves the
/// rules' earlier end (the fault can only end sooner).
fn spawn_swaps(
    worker: &Worker,
    table: &'static str,
    netns: &Arc<NetNs>,
    swaps: Vec<(Family, Vec<String>)>,
    rules: &'static str,
) {
    let netns = netns.clone();
    worker.spawn(move || {
        for (family, swap) in swaps {
            if let Err(e) = netfilter::restore_table(table, family, Some(&netns), &swap) {
                tracing::warn!(error = %e, "moving the {rules} rules' deadline");
            }
        }
    });
}
