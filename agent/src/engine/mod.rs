//! The engine applies and reverts faults. It owns the lease table, the faults, and the
//! dataplane (every kernel resource), behind one lock so that each request is applied whole or
//! not at all. A timer task expires leases on their deadlines; the kernel entries carry the
//! same deadline, so the kernel stops a fault on time even when this process cannot.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use faultd_common::{
    ACTION_DROP, ACTION_PASS, ACTION_PEERS, ACTION_REJECT, Counters, MAX_FAULTS, MAX_RULES,
    RuleKey, RuleValue,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::dataplane::clock::{kernel_deadline, monotonic_now_ns};
use crate::dataplane::peer_marker::{self, PeerFault};
use crate::dataplane::{Dataplane, DataplaneError, PeerEntry, Shaped, Shaper, SocketFilter};
use crate::events::{EventKind, Events};
pub use crate::fault::view::{Ending, FaultState, FaultView, LeaseView, RevertReason};
use crate::fault::{
    Action, FaultId, FaultSpec, Invalid, Labels, LeaseId, Mechanism, PeerSet, Scope, Target,
};
use crate::lease::{Lease, LeaseTable};
use crate::metrics::Metrics;
use crate::policy::{Denied, Policy};
use crate::target::{Resolve, ResolveError, ResolvedScope};

impl From<ResolveError> for Error {
    fn from(error: ResolveError) -> Self {
        match error {
            ResolveError::Invalid(invalid) => Error::Invalid(invalid),
            ResolveError::NotFound(message) => Error::ScopeNotFound(message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The policy forbids the request.
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("no {kind} {id:?}")]
    NotFound { kind: &'static str, id: String },
    /// A pod or container this node does not run, with where faultd looked.
    #[error("{0}")]
    ScopeNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Exhausted(String),
    /// The kernel lacks what the action needs (a mechanism, a qdisc, a netfilter target).
    #[error("{0}")]
    Unsupported(String),
    /// The fault already ended (it is still readable with Get).
    #[error("fault {id:?} already ended ({}); Get shows its final counters", reason.name())]
    Ended { id: String, reason: RevertReason },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Limits, protected ports and the host scope (`policy.max_ttl` caps every ttl).
    pub policy: Policy,
    /// How long an ended fault stays readable (Get, List, faultctl list --ended); zero keeps
    /// none, while the totals still count it.
    pub ended_retention: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            ended_retention: ended::DEFAULT_RETENTION,
        }
    }
}

/// Which faults List shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Select {
    /// In force now.
    #[default]
    Active,
    /// Ended, within the retention window.
    Ended,
    All,
}

/// Which lease an Inject goes under.
#[derive(Clone, Debug)]
pub enum LeaseRef {
    Existing(LeaseId),
    /// A private lease of this ttl, granted for the fault.
    Ttl(Duration),
}

struct FaultRecord {
    lease_id: LeaseId,
    spec: FaultSpec,
    resolved: ResolvedScope,
    keys: Vec<RuleKey>,
    slot: u32,
    /// The peers the fault is limited to: its keys hold `ACTION_PEERS` markers (shared with
    /// other faults on disjoint peers) and `value` lives in the peers map.
    peers: Option<PeerSet>,
    /// What the kernel holds for the fault (its deadline moves with the lease).
    value: RuleValue,
    mechanism: &'static str,
    connections_reset: Arc<AtomicU64>,
    /// Dropping it stops the `reset{after_bytes}` watcher.
    watcher: Option<reset::ResetWatcher>,
    /// Index into `State::shapers` for delay and bandwidth faults; None for the cgroup_skb
    /// datapath's faults, whose keys are in the kernel map.
    shaper: Option<usize>,
    /// The policy's max_fault_duration after it was applied: it ends then even if its lease
    /// lives on.
    ends_at: Instant,
}

struct State {
    leases: LeaseTable,
    faults: HashMap<FaultId, FaultRecord>,
    /// `ends_at` of every fault, earliest first.
    fault_ends: BTreeSet<(Instant, FaultId)>,
    events: Events,
    metrics: Metrics,
    /// Which fault holds each kernel key: overlapping faults are refused, not merged.
    owners: HashMap<RuleKey, FaultId>,
    /// The faults with peers on each key (their peer sets are disjoint).
    peer_owners: HashMap<RuleKey, Vec<FaultId>>,
    /// The same for delay and bandwidth faults: they may overlap a drop, not each other.
    shape_owners: HashMap<RuleKey, Vec<FaultId>>,
    free_slots: Vec<u32>,
    dataplane: Box<dyn Dataplane>,
    /// The mechanisms for delay and bandwidth, one per `Mechanism` at most.
    shapers: Vec<Box<dyn Shaper>>,
    resolver: Box<dyn Resolve>,
    /// Faults that ended, readable for a while, and what every ended fault did.
    ended: ended::Ended,
}

pub struct Engine {
    state: Mutex<State>,
    config: EngineConfig,
    /// Shared with `State` (cheap handles), so readers need not take the lock.
    events: Events,
    metrics: Metrics,
    /// Wakes the expiry task when the earliest deadline may have moved.
    deadline_changed: Notify,
}

impl Engine {
    pub fn new(
        dataplane: Box<dyn Dataplane>,
        resolver: Box<dyn Resolve>,
        config: EngineConfig,
    ) -> Arc<Self> {
        Self::with_shapers(dataplane, Vec::new(), resolver, config)
    }

    /// An engine that can also delay and pace packets through `shapers`.
    pub fn with_shapers(
        dataplane: Box<dyn Dataplane>,
        shapers: Vec<Box<dyn Shaper>>,
        resolver: Box<dyn Resolve>,
        config: EngineConfig,
    ) -> Arc<Self> {
        let events = Events::default();
        let metrics = Metrics::default();
        Arc::new(Self {
            events: events.clone(),
            metrics: metrics.clone(),
            state: Mutex::new(State {
                leases: LeaseTable::default(),
                faults: HashMap::new(),
                fault_ends: BTreeSet::new(),
                events,
                metrics,
                owners: HashMap::new(),
                peer_owners: HashMap::new(),
                shape_owners: HashMap::new(),
                free_slots: (0..MAX_FAULTS).rev().collect(),
                dataplane,
                shapers,
                resolver,
                ended: ended::Ended::new(config.ended_retention),
            }),
            config,
            deadline_changed: Notify::new(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The counters the engine keeps (the API adds its own to the same set).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Fault events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<crate::events::FaultEvent>> {
        self.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave kernel state half-applied (every step
        // rolls back before returning), so the data is still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        state.expire(now);
        state.ended.prune(now);
        state
    }

    fn check_ttl(&self, ttl: Duration, field: &str) -> Result<(), Invalid> {
        if ttl.is_zero() {
            return Err(Invalid::new(field, "must be greater than 0"));
        }
        let max = self.config.policy.max_ttl;
        if ttl > max {
            return Err(Invalid::new(
                field,
                format!(
                    "{} exceeds the maximum {} (policy max_ttl)",
                    crate::duration::format(ttl),
                    crate::duration::format(max)
                ),
            ));
        }
        Ok(())
    }

    /// RESOURCE_EXHAUSTED once the policy's max_leases are held.
    fn check_lease_room(&self, state: &State) -> Result<(), Error> {
        let max = self.config.policy.max_leases;
        if state.leases.len() >= max {
            return Err(Error::Exhausted(format!(
                "{max} leases are held, the most the policy allows (policy max_leases); revoke \
                 one first"
            )));
        }
        Ok(())
    }

    pub fn grant(&self, ttl: Duration, labels: Labels) -> Result<LeaseView, Error> {
        self.check_ttl(ttl, "ttl")?;
        let mut state = self.lock();
        self.check_lease_room(&state)?;
        let (id, _) = state.grant(ttl, labels, false);
        self.deadline_changed.notify_one();
        state.lease_view(&id)
    }

    pub fn renew(&self, id: &str) -> Result<LeaseView, Error> {
        let mut state = self.lock();
        let now = Instant::now();
        let lease = state
            .leases
            .renew(id, now)
            .ok_or_else(|| not_found("lease", id))?
            .clone();
        // Push the new deadline into every kernel entry of the lease.
        let mut rules = Vec::new();
        let mut peers = Vec::new();
        let mut shaped = Vec::new();
        for fault_id in &lease.faults {
            if let Some(fault) = state.faults.get_mut(fault_id) {
                let deadline = kernel_deadline(lease.deadline.min(fault.ends_at));
                if let Some(shaper) = fault.shaper {
                    shaped.push((shaper, fault_id.clone(), deadline));
                    continue;
                }
                let value = rule_value(&fault.spec.action, fault.slot, deadline);
                fault.value = value;
                match &fault.peers {
                    None => rules.extend(fault.keys.iter().map(|k| (*k, value))),
                    Some(set) => peers.extend(
                        fault
                            .keys
                            .iter()
                            .flat_map(|&rule| set.include.iter().map(move |&cidr| (rule, cidr)))
                            .map(|(rule, cidr)| (PeerEntry { rule, cidr }, value)),
                    ),
                }
                if let Some(watcher) = &fault.watcher {
                    watcher.renew(deadline);
                }
            }
        }
        for (shaper, fault_id, deadline) in shaped {
            state.shapers[shaper].refresh(&fault_id, deadline)?;
        }
        state.dataplane.refresh(&rules)?;
        state.dataplane.set_peers(&peers)?;
        self.deadline_changed.notify_one();
        state.lease_view(id)
    }

    pub fn revoke(&self, id: &str) -> Result<(LeaseView, Vec<FaultId>), Error> {
        let mut state = self.lock();
        let view = state.lease_view(id)?;
        let reverted = state.revoke(id, RevertReason::Revoked);
        self.deadline_changed.notify_one();
        Ok((view, reverted))
    }

    pub fn time_to_live(&self, id: &str) -> Result<LeaseView, Error> {
        self.lock().lease_view(id)
    }

    pub fn leases(&self) -> Vec<LeaseView> {
        let state = self.lock();
        let mut views: Vec<_> = state.leases.iter().map(|l| state.view_of(l)).collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    pub fn inject(&self, lease: LeaseRef, spec: FaultSpec) -> Result<FaultView, Error> {
        self.inject_or_plan(lease, spec, false)
    }

    /// Everything `inject` checks and resolves, without applying anything: the answer is the
    /// fault as it would be (state `DryRun`, no id). Leases, faults and the kernel stay as
    /// they are.
    pub fn dry_run(&self, lease: LeaseRef, spec: FaultSpec) -> Result<FaultView, Error> {
        self.inject_or_plan(lease, spec, true)
    }

    fn inject_or_plan(
        &self,
        lease: LeaseRef,
        spec: FaultSpec,
        dry_run: bool,
    ) -> Result<FaultView, Error> {
        let started = std::time::Instant::now();
        if let LeaseRef::Ttl(ttl) = &lease {
            self.check_ttl(*ttl, "ttl")?;
        }
        spec.validate()?;
        let spec = spec.normalized();
        let policy = &self.config.policy;
        policy.check_target(&spec.target)?;
        let mut state = self.lock();
        // Delay and bandwidth go to a shaping mechanism, the rest to the datapath.
        let shaper = match spec.action.shaping() {
            Some(forced) => Some(state.choose_shaper(&spec.action, &spec.target, forced)?),
            None => None,
        };
        let mechanism = match shaper {
            Some(shaper) => state.shapers[shaper].mechanism().name(),
            None => state.dataplane.mechanism(&spec.action).map_err(|missing| {
                Error::Unsupported(format!(
                    "{} is not available on this kernel: {missing}",
                    spec.action.name()
                ))
            })?,
        };
        // The lease the fault goes under: an existing one, or a private one granted below.
        let (existing, private_ttl) = match lease {
            LeaseRef::Existing(id) => match state.leases.get(&id) {
                Some(lease) => (Some((id, lease.deadline)), Duration::ZERO),
                None => {
                    return Err(Invalid::new(
                        "lease_id",
                        format!("no lease {id:?} (grant one first, or pass a ttl)"),
                    )
                    .into());
                }
            },
            LeaseRef::Ttl(ttl) => (None, ttl),
        };
        let resolved = state.resolver.resolve(&spec.target.scope)?;
        policy.check_resolved(&resolved)?;
        let keys = spec.rule_keys(resolved.cgroup_id);
        let peers = spec.target.peer_set()?;
        let owner = match shaper {
            Some(_) => state.shape_conflict(&keys, peers.as_ref()),
            None => keys
                .iter()
                .find_map(|k| state.owners.get(k))
                .or_else(|| state.peer_conflict(&keys, peers.as_ref())),
        };
        if let Some(owner) = owner {
            return Err(Error::Conflict(format!(
                "fault.target: {} {} overlaps fault {owner} (remove it first)",
                spec.action.name(),
                spec.target.summary()
            )));
        }
        let used = state.owners.len() + state.peer_owners.len();
        if shaper.is_none() && used + keys.len() > MAX_RULES as usize {
            return Err(Error::Exhausted(format!(
                "the kernel rule table holds {} entries; this fault needs {} but only {} are free",
                MAX_RULES,
                keys.len(),
                MAX_RULES as usize - used
            )));
        }
        if state.faults.len() >= policy.max_active_faults {
            return Err(Error::Exhausted(format!(
                "{} faults are active, the most the policy allows (policy max_active_faults); \
                 remove one first",
                policy.max_active_faults
            )));
        }
        if state.free_slots.is_empty() {
            return Err(Error::Exhausted(format!(
                "{MAX_FAULTS} faults are active, the most this agent holds"
            )));
        }
        let private = existing.is_none();
        if private {
            self.check_lease_room(&state)?;
        }
        let ends_at = Instant::now() + policy.max_fault_duration;
        if dry_run {
            let lease_deadline = existing
                .as_ref()
                .map_or(Instant::now() + private_ttl, |(_, deadline)| *deadline);
            let (expires_at, remaining) = wall_clock(lease_deadline.min(ends_at));
            return Ok(FaultView {
                id: String::new(),
                lease_id: existing.map(|(id, _)| id).unwrap_or_default(),
                spec,
                resolved,
                rules: keys.len(),
                state: FaultState::DryRun,
                counters: Counters::default(),
                connections_reset: 0,
                expires_at,
                remaining,
                mechanism,
                ended: None,
            });
        }
        let Some(slot) = state.free_slots.pop() else {
            return Err(Error::Exhausted(format!(
                "{MAX_FAULTS} faults are active, the most this agent holds"
            )));
        };
        let (lease_id, deadline) = match existing {
            Some(found) => found,
            None => state.grant(private_ttl, Labels::new(), true),
        };
        let deadline_ns = kernel_deadline(deadline.min(ends_at));
        let value = rule_value(&spec.action, slot, deadline_ns);
        let rules: Vec<_> = keys.iter().map(|k| (*k, value)).collect();
        let id = new_id(|id| state.faults.contains_key(id) || state.ended.get(id).is_some());
        let connections_reset = Arc::new(AtomicU64::new(0));
        // A netns scope's interface gets the tc programs first (once for all its faults); a
        // delay or bandwidth there is its shaper's alone.
        let interface = match (&spec.target.scope, shaper) {
            (Scope::Netns { interface, .. }, None) => Some(interface.clone()),
            _ => None,
        };
        let mut attached = false;
        let applied = state
            .dataplane
            .reset_counters(slot)
            .and_then(|()| match &interface {
                Some(interface) => {
                    let result = state.dataplane.attach_interface(&resolved, interface);
                    attached = result.is_ok();
                    result
                }
                None => Ok(()),
            })
            .and_then(|()| match shaper {
                Some(shaper) => state.shapers[shaper].apply(&Shaped {
                    id: &id,
                    action: &spec.action,
                    target: &spec.target,
                    resolved: &resolved,
                    keys: &keys,
                    slot,
                    expires_at_ns: deadline_ns,
                }),
                None => match &peers {
                    None => state.dataplane.insert(&rules),
                    Some(set) => state.insert_peer_fault(&keys, set, value),
                },
            })
            .map_err(Error::from)
            .and_then(|()| {
                // New connects are refused before the old connections go, so a client cannot
                // slip a reconnect in between.
                state.apply_reset(&id, &spec, &resolved, deadline_ns, &connections_reset)
            });
        let watcher = match applied {
            Ok(watcher) => watcher,
            Err(e) => {
                // A shaped fault's keys are not in the datapath (a drop may hold the same ones).
                if shaper.is_none() {
                    let removed = match &peers {
                        None => state.dataplane.remove(&keys),
                        Some(set) => state.remove_peer_fault(&id, &keys, set),
                    };
                    if let Err(e) = removed {
                        tracing::warn!(error = %e, "rolling back a failed inject");
                    }
                }
                if attached && let Err(e) = state.dataplane.release_interface(resolved.cgroup_id) {
                    tracing::warn!(error = %e, "rolling back a failed inject");
                }
                state.free_slots.push(slot);
                if private {
                    state.leases.remove(&lease_id);
                }
                if state.events.watched() {
                    let (expires_at, remaining) = wall_clock(deadline.min(ends_at));
                    let view = FaultView {
                        id: String::new(),
                        lease_id: if private { String::new() } else { lease_id },
                        spec,
                        resolved,
                        rules: keys.len(),
                        state: FaultState::Reverted,
                        counters: Counters::default(),
                        connections_reset: 0,
                        expires_at,
                        remaining,
                        mechanism,
                        ended: None,
                    };
                    let message = format!("applying the fault: {e}");
                    state.events.publish(EventKind::Failed { message }, view);
                }
                return Err(e);
            }
        };
        for key in &keys {
            match (shaper, &peers) {
                (Some(_), _) => {
                    state.shape_owners.entry(*key).or_default().push(id.clone());
                }
                (None, None) => {
                    state.owners.insert(*key, id.clone());
                }
                (None, Some(_)) => state.peer_owners.entry(*key).or_default().push(id.clone()),
            }
        }
        if let Some(lease) = state.leases.get_mut(&lease_id) {
            lease.faults.push(id.clone());
        }
        tracing::info!(fault = %id, lease = %lease_id, action = spec.action.name(), mechanism,
            target = %spec.target.summary(), cgroup_id = resolved.cgroup_id, rules = keys.len(),
            connections_reset = connections_reset.load(Ordering::Relaxed), "fault applied");
        let action = spec.action.name();
        state.faults.insert(
            id.clone(),
            FaultRecord {
                lease_id,
                spec,
                resolved,
                keys,
                slot,
                peers,
                value,
                mechanism,
                connections_reset,
                watcher,
                shaper,
                ends_at,
            },
        );
        state.fault_ends.insert((ends_at, id.clone()));
        self.deadline_changed.notify_one();
        let view = state.fault_view(&id, FaultState::Active)?;
        state.metrics.applied(action, started.elapsed());
        if state.events.watched() {
            state.events.publish(EventKind::Applied, view.clone());
        }
        Ok(view)
    }

    /// Reverts one fault now; a private lease goes with it.
    pub fn remove(&self, id: &str) -> Result<FaultView, Error> {
        let mut state = self.lock();
        if !state.faults.contains_key(id)
            && let Some(ending) = state.ended.get(id).and_then(|v| v.ended.as_ref())
        {
            return Err(Error::Ended {
                id: id.to_string(),
                reason: ending.reason,
            });
        }
        let before = state.fault_view(id, FaultState::Reverted)?;
        state.revert(id, RevertReason::Removed);
        // With its final counters and ending (unless retention is off).
        let view = state.ended.get(id).cloned().unwrap_or(before);
        if let Some(lease) = state.leases.get(&view.lease_id)
            && lease.private
            && lease.faults.is_empty()
        {
            state.leases.remove(&view.lease_id);
        }
        self.deadline_changed.notify_one();
        Ok(view)
    }

    /// A fault in force, or one that ended within the retention window (with its final
    /// counters and ending).
    pub fn get(&self, id: &str) -> Result<FaultView, Error> {
        let state = self.lock();
        match state.ended.get(id) {
            Some(view) if !state.faults.contains_key(id) => Ok(view.clone()),
            _ => state.fault_view(id, FaultState::Active),
        }
    }

    /// The faults `select` asks for, by id.
    pub fn faults(&self, select: Select) -> Vec<FaultView> {
        let state = self.lock();
        let mut views: Vec<FaultView> = Vec::new();
        if select != Select::Ended {
            views.extend(
                state
                    .faults
                    .keys()
                    .filter_map(|id| state.fault_view(id, FaultState::Active).ok()),
            );
        }
        if select != Select::Active {
            views.extend(state.ended.views().cloned());
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// Reverts every fault and revokes every lease.
    pub fn abort(&self) -> (Vec<FaultId>, Vec<LeaseId>) {
        self.metrics.aborts.inc();
        self.revert_all(self.lock(), RevertReason::Aborted)
    }

    /// Reverts every fault and revokes every lease because faultd is stopping.
    pub fn shutdown(&self) -> (Vec<FaultId>, Vec<LeaseId>) {
        self.revert_all(self.lock(), RevertReason::Shutdown)
    }

    fn revert_all(
        &self,
        mut state: MutexGuard<'_, State>,
        reason: RevertReason,
    ) -> (Vec<FaultId>, Vec<LeaseId>) {
        let leases = state.leases.ids();
        let mut faults = Vec::new();
        for id in &leases {
            faults.extend(state.revoke(id, reason));
        }
        self.deadline_changed.notify_one();
        (faults, leases)
    }

    /// Reverts everything, then waits for the mechanisms' background clean-up (shutdown).
    pub fn close(&self) -> (Vec<FaultId>, Vec<LeaseId>) {
        let reverted = self.shutdown();
        let mut state = self.lock();
        for shaper in &mut state.shapers {
            shaper.flush();
        }
        reverted
    }

    pub fn active_faults(&self) -> usize {
        self.lock().faults.len()
    }

    /// Every fault in force with its counters, the number of leases, and the totals of every
    /// fault this agent ran (ended and live), read at one instant (for metrics).
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let state = self.lock();
        let faults: Vec<FaultView> = state
            .faults
            .keys()
            .filter_map(|id| state.fault_view(id, FaultState::Active).ok())
            .collect();
        let mut totals = state.ended.totals().clone();
        for fault in &faults {
            totals.add(fault);
        }
        crate::metrics::Snapshot {
            faults,
            leases: state.leases.len(),
            totals,
        }
    }

    /// Expires leases on their deadlines until `shutdown` resolves.
    pub async fn run_expiry(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            // Registered before reading the deadline, so a change in between is not missed.
            let changed = self.deadline_changed.notified();
            // Locking reverts what is due, which may run iptables-restore or netlink in other
            // namespaces: on the blocking pool, not on this async worker.
            let engine = self.clone();
            let next =
                match tokio::task::spawn_blocking(move || engine.lock().next_deadline()).await {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::error!(error = %e, "expiry pass");
                        Some(Instant::now() + Duration::from_millis(100))
                    }
                };
            let sleep = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = changed => {}
                _ = sleep => {}
            }
        }
    }
}

impl crate::metrics::Source for Engine {
    fn snapshot(&self) -> crate::metrics::Snapshot {
        Engine::snapshot(self)
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
    /// A delay or bandwidth fault on one of `keys` whose peers may meet `peers`: shaped faults
    /// share a key only when their peer sets are disjoint (a fault without peers meets all).
    fn shape_conflict(&self, keys: &[RuleKey], peers: Option<&PeerSet>) -> Option<&FaultId> {
        Self::meets(&self.shape_owners, &self.faults, keys, peers)
    }

    fn meets<'a>(
        owners: &'a HashMap<RuleKey, Vec<FaultId>>,
        faults: &HashMap<FaultId, FaultRecord>,
        keys: &[RuleKey],
        peers: Option<&PeerSet>,
    ) -> Option<&'a FaultId> {
        keys.iter().find_map(|key| {
            owners.get(key)?.iter().find(|owner| {
                match (peers, faults.get(*owner).and_then(|f| f.peers.as_ref())) {
                    (Some(new), Some(held)) => new.overlaps(held),
                    _ => true,
                }
            })
        })
    }

    /// A fault with peers on one of `keys` whose peers may meet `peers` (every fault meets one
    /// without peers).
    fn peer_conflict(&self, keys: &[RuleKey], peers: Option<&PeerSet>) -> Option<&FaultId> {
        Self::meets(&self.peer_owners, &self.faults, keys, peers)
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
                Some(PeerFault {
                    keys: &fault.keys,
                    peers: fault.peers.as_ref()?,
                    value: fault.value,
                })
            })
            .collect()
    }

    /// Writes a new fault's peers entries, then the markers of its keys that have none yet.
    fn insert_peer_fault(
        &mut self,
        keys: &[RuleKey],
        set: &PeerSet,
        value: RuleValue,
    ) -> Result<(), DataplaneError> {
        let new = PeerFault {
            keys,
            peers: set,
            value,
        };
        let writes = peer_marker::insert(&new, &self.peer_faults(keys, ""), PEER_EXCLUDED);
        self.dataplane.set_peers(&writes.set)?;
        let markers: Vec<_> = writes.markers.iter().map(|k| (*k, PEERS_MARKER)).collect();
        self.dataplane.insert(&markers)
    }

    /// Takes a fault's peers entries out (or gives them back to the faults that share them),
    /// and the markers of its keys no other fault holds. `id` must be out of `peer_owners`
    /// already, or is skipped.
    fn remove_peer_fault(
        &mut self,
        id: &str,
        keys: &[RuleKey],
        set: &PeerSet,
    ) -> Result<(), DataplaneError> {
        let gone = PeerFault {
            keys,
            peers: set,
            value: PEER_EXCLUDED,
        };
        let writes = peer_marker::remove(&gone, &self.peer_faults(keys, id), PEER_EXCLUDED);
        // Markers first: from then on no packet consults the entries.
        let first = self.dataplane.remove(&writes.markers);
        let second = self.dataplane.remove_peers(&writes.delete);
        let third = self.dataplane.set_peers(&writes.set);
        first.and(second).and(third)
    }

    /// The socket side of `reset`: tears down the target's connections now, or starts the
    /// watcher of `reset{after_bytes}`.
    fn apply_reset(
        &self,
        id: &str,
        spec: &FaultSpec,
        resolved: &ResolvedScope,
        deadline_ns: u64,
        count: &Arc<AtomicU64>,
    ) -> Result<Option<reset::ResetWatcher>, Error> {
        let Action::Reset { after_bytes } = spec.action else {
            return Ok(None);
        };
        let filter = SocketFilter {
            cgroup_dir: resolved.dir.clone(),
            ports: spec.target.ports.clone(),
            min_bytes: after_bytes,
            peers: spec.target.peer_set()?,
        };
        let killer = self.dataplane.connection_killer();
        if after_bytes.is_none() {
            count.fetch_add(killer(&filter)? as u64, Ordering::Relaxed);
            return Ok(None);
        }
        reset::ResetWatcher::start(id, filter, killer, deadline_ns, count.clone())
            .map(Some)
            .map_err(|e| Error::Exhausted(format!("starting the reset watcher thread: {e}")))
    }

    /// The shaper for a delay or bandwidth action: the one the user forced, else the first
    /// available in order of preference. FAILED_PRECONDITION names what is missing.
    fn choose_shaper(
        &self,
        action: &Action,
        target: &Target,
        forced: Option<Mechanism>,
    ) -> Result<usize, Error> {
        let find =
            |mechanism: Mechanism| self.shapers.iter().position(|s| s.mechanism() == mechanism);
        let why_not = |mechanism: Mechanism| match find(mechanism) {
            Some(i) => self.shapers[i]
                .unavailable_for(action, target)
                .map_or(Ok(i), Err),
            None => Err("not supported by this faultd".to_string()),
        };
        let action_name = action.name();
        if let Some(mechanism) = forced {
            return why_not(mechanism).map_err(|why| {
                Error::Unsupported(format!(
                    "fault.{action_name}.mechanism: {} cannot apply a {action_name} on this host: {why}",
                    mechanism.name().to_uppercase()
                ))
            });
        }
        let mut reasons = Vec::new();
        for mechanism in Mechanism::PREFERENCE {
            match why_not(mechanism) {
                Ok(i) => return Ok(i),
                Err(why) => reasons.push(format!("{}: {why}", mechanism.name())),
            }
        }
        Err(Error::Unsupported(format!(
            "fault.{action_name}: no mechanism can apply a {action_name} on this host ({})",
            reasons.join("; ")
        )))
    }

    fn grant(&mut self, ttl: Duration, labels: Labels, private: bool) -> (LeaseId, Instant) {
        let id = new_id(|id| self.leases.contains(id));
        let deadline = Instant::now() + ttl;
        self.leases.insert(Lease {
            id: id.clone(),
            ttl,
            deadline,
            faults: Vec::new(),
            private,
            labels,
        });
        (id, deadline)
    }

    /// Expires every lease due at `now` and reverts its faults, and every fault that reached
    /// the policy's max_fault_duration.
    fn expire(&mut self, now: Instant) {
        for lease in self.leases.take_expired(now) {
            tracing::info!(lease = %lease.id, faults = lease.faults.len(), "lease expired");
            self.metrics.lease_expirations.inc();
            for fault in &lease.faults {
                self.revert_because(fault, RevertReason::Expired, "lease expired");
            }
        }
        while let Some((ends_at, _)) = self.fault_ends.first() {
            if *ends_at > now {
                break;
            }
            if let Some((_, id)) = self.fault_ends.pop_first() {
                tracing::info!(fault = %id, "fault reached the policy's max_fault_duration");
                let lease_id = self.faults.get(&id).map(|f| f.lease_id.clone());
                self.revert_because(&id, RevertReason::Expired, "max_fault_duration reached");
                // A private lease exists for its one fault: it goes with it.
                if let Some(lease_id) = lease_id
                    && self
                        .leases
                        .get(&lease_id)
                        .is_some_and(|l| l.private && l.faults.is_empty())
                {
                    self.leases.remove(&lease_id);
                }
            }
        }
    }

    /// The earliest lease deadline or fault end.
    fn next_deadline(&self) -> Option<Instant> {
        let fault_end = self.fault_ends.first().map(|(at, _)| *at);
        match (self.leases.next_deadline(), fault_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn revoke(&mut self, id: &str, reason: RevertReason) -> Vec<FaultId> {
        let Some(lease) = self.leases.remove(id) else {
            return Vec::new();
        };
        for fault in &lease.faults {
            self.revert(fault, reason);
        }
        lease.faults
    }

    fn revert(&mut self, id: &str, reason: RevertReason) {
        let detail = match reason {
            RevertReason::Removed => "removed by FaultService.Remove",
            RevertReason::Expired => "lease expired",
            RevertReason::Revoked => "lease revoked",
            RevertReason::Aborted => "FaultService.Abort",
            RevertReason::Shutdown => "faultd stopped",
        };
        self.revert_because(id, reason, detail);
    }

    /// Takes a fault out of the kernel and the tables. Removing a key cannot be undone
    /// half-way in any useful sense, so errors are logged and the bookkeeping goes on: the
    /// kernel entry still expires by its deadline.
    fn revert_because(&mut self, id: &str, reason: RevertReason, detail: &str) {
        let started = std::time::Instant::now();
        let Some(fault) = self.faults.remove(id) else {
            return;
        };
        // The final counters, read while the entries are still there: they outlive the fault.
        let counters = match fault.shaper {
            Some(shaper) => self.shapers[shaper].counters(id),
            None => self.dataplane.counters(fault.slot),
        }
        .unwrap_or_else(|e| {
            tracing::warn!(fault = %id, error = %e, "reading the final counters");
            Counters::default()
        });
        for key in &fault.keys {
            match (fault.shaper, &fault.peers) {
                (Some(_), _) => disown(&mut self.shape_owners, key, id),
                (None, None) => {
                    self.owners.remove(key);
                }
                (None, Some(_)) => disown(&mut self.peer_owners, key, id),
            }
        }
        let removed = match (fault.shaper, &fault.peers) {
            (Some(shaper), _) => self.shapers[shaper].remove(id),
            (None, None) => self.dataplane.remove(&fault.keys),
            (None, Some(set)) => self.remove_peer_fault(id, &fault.keys, set),
        };
        if let Err(e) = &removed {
            tracing::error!(fault = %id, error = %e, "removing kernel entries; they lapse at the lease deadline");
        }
        if let (Scope::Netns { .. }, None) = (&fault.spec.target.scope, fault.shaper)
            && let Err(e) = self.dataplane.release_interface(fault.resolved.cgroup_id)
        {
            tracing::error!(fault = %id, error = %e, "detaching the tc programs");
        }
        self.fault_ends.remove(&(fault.ends_at, id.to_string()));
        self.free_slots.push(fault.slot);
        if let Some(lease) = self.leases.get_mut(&fault.lease_id) {
            lease.faults.retain(|f| f != id);
        }
        self.metrics
            .reverted(fault.spec.action.name(), reason, started.elapsed());
        tracing::info!(fault = %id, reason = reason.name(), detail, "fault reverted");
        let now = SystemTime::now();
        let view = FaultView {
            id: id.to_string(),
            rules: fault.keys.len(),
            state: FaultState::Reverted,
            counters,
            connections_reset: fault.connections_reset.load(Ordering::Relaxed),
            expires_at: now,
            remaining: Duration::ZERO,
            mechanism: fault.mechanism,
            lease_id: fault.lease_id,
            spec: fault.spec,
            resolved: fault.resolved,
            ended: Some(Ending {
                at: now,
                reason,
                detail: detail.to_string(),
            }),
        };
        self.ended.record(view.clone(), Instant::now());
        if self.events.watched() {
            if let Err(e) = removed {
                let message = format!(
                    "removing the fault's kernel entries: {e}; they lapse at the lease deadline"
                );
                self.events
                    .publish(EventKind::Failed { message }, view.clone());
            }
            let detail = detail.to_string();
            self.events
                .publish(EventKind::Reverted { reason, detail }, view);
        }
    }

    fn fault_view(&self, id: &str, state: FaultState) -> Result<FaultView, Error> {
        let fault = self.faults.get(id).ok_or_else(|| not_found("fault", id))?;
        let lease = self
            .leases
            .get(&fault.lease_id)
            .ok_or_else(|| not_found("lease", &fault.lease_id))?;
        let (expires_at, remaining) = wall_clock(lease.deadline.min(fault.ends_at));
        let counters = match fault.shaper {
            Some(shaper) => self.shapers[shaper].counters(id)?,
            None => self.dataplane.counters(fault.slot)?,
        };
        Ok(FaultView {
            id: id.to_string(),
            lease_id: fault.lease_id.clone(),
            spec: fault.spec.clone(),
            resolved: fault.resolved.clone(),
            rules: fault.keys.len(),
            state,
            counters,
            connections_reset: fault.connections_reset.load(Ordering::Relaxed),
            expires_at,
            remaining,
            mechanism: fault.mechanism,
            ended: None,
        })
    }

    fn view_of(&self, lease: &Lease) -> LeaseView {
        let (expires_at, remaining) = wall_clock(lease.deadline);
        LeaseView {
            id: lease.id.clone(),
            ttl: lease.ttl,
            expires_at,
            remaining,
            fault_ids: lease.faults.clone(),
            private: lease.private,
            labels: lease.labels.clone(),
        }
    }

    fn lease_view(&self, id: &str) -> Result<LeaseView, Error> {
        self.leases
            .get(id)
            .map(|l| self.view_of(l))
            .ok_or_else(|| not_found("lease", id))
    }
}

fn not_found(kind: &'static str, id: &str) -> Error {
    Error::NotFound {
        kind,
        id: id.to_string(),
    }
}

/// The rules-map value of a key whose faults name peers: the peers map decides.
/// The peers entry of an excluded prefix: the packet matches no fault of the key.
const PEER_EXCLUDED: RuleValue = RuleValue {
    expires_at_ns: 0,
    drop_threshold: 0,
    counter_slot: 0,
    action: ACTION_PASS,
};

const PEERS_MARKER: RuleValue = RuleValue {
    expires_at_ns: u64::MAX,
    drop_threshold: 0,
    counter_slot: 0,
    action: ACTION_PEERS,
};

fn rule_value(action: &Action, slot: u32, expires_at_ns: u64) -> RuleValue {
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

/// A fresh random 64-bit id in hex that `taken` does not know.
fn new_id(taken: impl Fn(&str) -> bool) -> String {
    loop {
        let mut bytes = [0u8; 8];
        // SAFETY: getrandom writes at most `len` bytes into the buffer.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != bytes.len() as isize {
            // getrandom on Linux ≥ 3.17 does not fail for 8 bytes once booted; fall back anyway.
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            bytes = (nanos.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
        }
        let id = format!("{:016x}", u64::from_le_bytes(bytes));
        if !taken(&id) {
            return id;
        }
    }
}

/// Wall-clock time of `deadline`, and the time left until it.
fn wall_clock(deadline: Instant) -> (SystemTime, Duration) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    (SystemTime::now() + remaining, remaining)
}

mod ended;
mod reset;
#[cfg(test)]
mod tests;
