//! The engine applies and reverts faults. It owns the lease table, the faults, and the
//! dataplane (every kernel resource), behind one lock so that each request is applied whole or
//! not at all. A timer task expires leases on their deadlines; the kernel entries carry the
//! same deadline, so the kernel stops a fault on time even when this process cannot.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use faultd_common::{MAX_FAULTS, RuleKey};
use tokio::sync::Notify;
use tokio::time::Instant;

pub use self::error::{Error, Limit, Unsupported};
use self::placement::Placement;
use crate::dataplane::clock::monotonic_now_ns;
use crate::dataplane::{Dataplane, Shaper};
use crate::events::Events;
pub use crate::fault::view::{Ending, FaultState, FaultView, LeaseView, RevertReason};
use crate::fault::{FaultId, FaultSpec, Invalid, Labels, LeaseId};
use crate::lease::{Lease, LeaseTable};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::target::{Resolve, ResolvedScope};

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

/// What an Abort did.
#[derive(Clone, Debug, Default)]
pub struct Aborted {
    pub faults: Vec<FaultId>,
    pub leases: Vec<LeaseId>,
    /// Faults whose kernel clean-up was still under way (or failing) when the wait ran out.
    pub still_reverting: Vec<FaultId>,
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
    /// What it holds in the kernel.
    placement: Placement,
    mechanism: &'static str,
    connections_reset: Arc<AtomicU64>,
    /// Dropping it stops the `reset{after_bytes}` watcher.
    watcher: Option<reset::ResetWatcher>,
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
    /// Faults out of force whose kernel state is not known to be gone yet (a clean-up under
    /// way in the background, or a revert that failed and is tried again).
    reverting: HashMap<FaultId, revert::Reverting>,
    /// What this instance holds among the faultd instances of the host (None: alone).
    claims: Option<crate::claims::Claims>,
}

pub struct Engine {
    state: Mutex<State>,
    config: EngineConfig,
    /// Shared with `State` (cheap handles), so readers need not take the lock.
    events: Events,
    metrics: Metrics,
    /// Wakes the expiry task when the earliest deadline may have moved (or renewals wait to
    /// be applied).
    deadline_changed: Notify,
    /// The leases as renewals see them while the engine is busy.
    directory: crate::lease::Directory,
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
        let leases = LeaseTable::default();
        Arc::new(Self {
            events: events.clone(),
            metrics: metrics.clone(),
            directory: leases.directory(),
            state: Mutex::new(State {
                leases,
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
                reverting: HashMap::new(),
                claims: None,
            }),
            config,
            deadline_changed: Notify::new(),
        })
    }

    /// From now on, faults are claimed among the faultd instances of the host: one on a key
    /// another live instance holds is refused.
    pub fn share_host(&self, claims: crate::claims::Claims) {
        self.lock().claims = Some(claims);
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
        self.settled(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The state with the renewals recorded meanwhile applied, then what is due expired.
    fn settled<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.apply_renewals();
        let now = Instant::now();
        state.expire(now);
        state.settle(now);
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
            return Err(Limit::PolicyLeases { max }.into());
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
        let mut views: Vec<_> = state.leases.iter().map(lease_view_of).collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// Reverts one fault now; a private lease goes with it.
    pub fn remove(&self, id: &str) -> Result<FaultView, Error> {
        let mut state = self.lock();
        if !state.faults.contains_key(id)
            && let Some(ending) = state.ended_view(id).and_then(|v| v.ended.as_ref())
        {
            return Err(Error::Ended {
                id: id.to_string(),
                reason: ending.reason,
            });
        }
        let before = state.fault_view(id, FaultState::Reverted)?;
        state.revert(id, RevertReason::Removed);
        // With its final counters and ending (unless retention is off).
        let view = state.ended_view(id).cloned().unwrap_or(before);
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
        match state.ended_view(id) {
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
        // A failing revert is not over: it shows with the faults in force.
        for reverting in state.reverting.values() {
            if (reverting.failing() && select != Select::Ended)
                || (!reverting.failing() && select != Select::Active)
            {
                views.push(reverting.view.clone());
            }
        }
        if select != Select::Active {
            views.extend(state.ended.views().cloned());
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// Reverts every fault and revokes every lease, then waits up to `wait` until nothing of
    /// them is left in the kernel (NFQUEUE's rules go in the background). Blocks: call it off
    /// the async workers.
    pub fn abort(&self, wait: Duration) -> Aborted {
        self.metrics.aborts.inc();
        let (faults, leases) = self.revert_all(self.lock(), RevertReason::Aborted);
        let deadline = std::time::Instant::now() + wait;
        let still_reverting = loop {
            let left = self.reverting_of(&faults);
            if left.is_empty() || std::time::Instant::now() >= deadline {
                break left;
            }
            // The expiry task moves them on; this only looks.
            std::thread::sleep(Duration::from_millis(10));
        };
        Aborted {
            faults,
            leases,
            still_reverting,
        }
    }

    /// Those of `ids` whose clean-up is under way or failing.
    fn reverting_of(&self, ids: &[FaultId]) -> Vec<FaultId> {
        let state = self.lock();
        ids.iter()
            .filter(|id| state.reverting.contains_key(*id))
            .cloned()
            .collect()
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
        for fault in faults
            .iter()
            .chain(state.reverting.values().map(|r| &r.view))
        {
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

impl State {
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

    /// The earliest lease deadline, fault end, or revert to look at.
    fn next_deadline(&self) -> Option<Instant> {
        let fault_end = self.fault_ends.first().map(|(at, _)| *at);
        [
            self.leases.next_deadline(),
            fault_end,
            self.next_revert_check(Instant::now()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// An ended fault: one whose clean-up is still under way (or failing), or one on record.
    fn ended_view(&self, id: &str) -> Option<&FaultView> {
        self.reverting
            .get(id)
            .map(|r| &r.view)
            .or_else(|| self.ended.get(id))
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
            RevertReason::TargetGone => "its target is gone",
        };
        self.revert_because(id, reason, detail);
    }

    fn fault_view(&self, id: &str, state: FaultState) -> Result<FaultView, Error> {
        let fault = self.faults.get(id).ok_or_else(|| not_found("fault", id))?;
        let lease = self
            .leases
            .get(&fault.lease_id)
            .ok_or_else(|| not_found("lease", &fault.lease_id))?;
        let (expires_at, remaining) = wall_clock(lease.deadline.min(fault.ends_at));
        let counters = self.counters(id, &fault.placement)?;
        Ok(FaultView {
            id: id.to_string(),
            lease_id: fault.lease_id.clone(),
            spec: fault.spec.clone(),
            resolved: fault.resolved.clone(),
            rules: fault.placement.keys.len(),
            state,
            counters,
            connections_reset: fault.connections_reset.load(Ordering::Relaxed),
            expires_at,
            remaining,
            mechanism: fault.mechanism,
            ended: None,
        })
    }

    fn lease_view(&self, id: &str) -> Result<LeaseView, Error> {
        self.leases
            .get(id)
            .map(lease_view_of)
            .ok_or_else(|| not_found("lease", id))
    }
}

fn lease_view_of(lease: &Lease) -> LeaseView {
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

fn not_found(kind: &'static str, id: &str) -> Error {
    Error::NotFound {
        kind,
        id: id.to_string(),
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
mod error;
mod inject;
mod placement;
mod renew;
mod reset;
mod revert;
mod targets;
#[cfg(test)]
mod tests;
