//! Inject and its dry run: validate, check the policy, resolve the target and choose the
//! mechanism (the plan), then put the fault in the kernel under its lease, all or nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use faultd_common::{Counters, MAX_RULES, RuleKey};
use tokio::time::Instant;

use super::placement::Placement;
use super::{
    Engine, Error, FaultRecord, FaultState, FaultView, LeaseRef, Limit, State, Unsupported, new_id,
    reset, wall_clock,
};
use crate::claims::Class;
use crate::dataplane::SocketFilter;
use crate::dataplane::clock::kernel_deadline;
use crate::events::EventKind;
use crate::fault::{
    Action, FaultSpec, Invalid, Labels, LeaseId, Mechanism, PeerSet, ResolvedScope, Target,
};
use crate::policy::Policy;

/// An Inject checked, resolved and planned; nothing applied yet.
struct Plan {
    spec: FaultSpec,
    resolved: ResolvedScope,
    keys: Vec<RuleKey>,
    peers: Option<PeerSet>,
    /// The shaping mechanism of a delay or bandwidth (index into `State::shapers`).
    shaper: Option<usize>,
    mechanism: &'static str,
    /// The existing lease and its deadline, or None for a private lease of `private_ttl`.
    lease: Option<(LeaseId, Instant)>,
    private_ttl: Duration,
    /// When the policy's max_fault_duration ends it.
    ends_at: Instant,
}

impl Plan {
    /// The fault as planned, in `state`, under `lease_id` until `deadline` (or the policy's
    /// end): a dry run's answer, or what watchers hear of a fault that could not be applied.
    fn view(self, state: FaultState, lease_id: LeaseId, deadline: Instant) -> FaultView {
        let (expires_at, remaining) = wall_clock(deadline.min(self.ends_at));
        FaultView {
            id: String::new(),
            lease_id,
            spec: self.spec,
            resolved: self.resolved,
            rules: self.keys.len(),
            state,
            counters: Counters::default(),
            connections_reset: 0,
            expires_at,
            remaining,
            mechanism: self.mechanism,
            ended: None,
        }
    }

    /// The dry run's answer: the fault as it would be applied.
    fn dry_run(self) -> FaultView {
        let (lease_id, deadline) = match &self.lease {
            Some((id, deadline)) => (id.clone(), *deadline),
            None => (String::new(), Instant::now() + self.private_ttl),
        };
        self.view(FaultState::DryRun, lease_id, deadline)
    }
}

impl Engine {
    pub fn inject(&self, lease: LeaseRef, spec: FaultSpec) -> Result<FaultView, Error> {
        let started = std::time::Instant::now();
        let (mut state, plan) = self.plan(lease, spec)?;
        let view = state.apply(plan)?;
        state
            .metrics
            .applied(view.spec.action.name(), started.elapsed());
        if state.events.watched() {
            state.events.publish(EventKind::Applied, view.clone());
        }
        self.deadline_changed.notify_one();
        Ok(view)
    }

    /// Everything `inject` checks and resolves, without applying anything: the answer is the
    /// fault as it would be (state `DryRun`, no id). Leases, faults and the kernel stay as
    /// they are.
    pub fn dry_run(&self, lease: LeaseRef, spec: FaultSpec) -> Result<FaultView, Error> {
        self.plan(lease, spec).map(|(_, plan)| plan.dry_run())
    }

    /// Checks and resolves an Inject. The lock it returns stays held until the plan is
    /// applied, so nothing it checked can change in between.
    fn plan(
        &self,
        lease: LeaseRef,
        spec: FaultSpec,
    ) -> Result<(MutexGuard<'_, State>, Plan), Error> {
        if let LeaseRef::Ttl(ttl) = &lease {
            self.check_ttl(*ttl, "ttl")?;
        }
        spec.validate()?;
        let spec = spec.normalized();
        let policy = &self.config.policy;
        policy.check_target(&spec.target)?;
        let state = self.lock();
        let (shaper, mechanism) = state.mechanism_for(&spec)?;
        let (lease, private_ttl) = match lease {
            LeaseRef::Existing(id) => match state.leases.get(&id) {
                Some(found) => (Some((id, found.deadline)), Duration::ZERO),
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
        state.check_room(&spec, &keys, peers.as_ref(), shaper.is_some(), policy)?;
        if lease.is_none() {
            self.check_lease_room(&state)?;
        }
        let plan = Plan {
            spec,
            resolved,
            keys,
            peers,
            shaper,
            mechanism,
            lease,
            private_ttl,
            ends_at: Instant::now() + policy.max_fault_duration,
        };
        Ok((state, plan))
    }
}

impl State {
    /// Delay and bandwidth go to a shaping mechanism, the rest to the datapath: which, and the
    /// mechanism's name. FAILED_PRECONDITION names what the kernel lacks.
    fn mechanism_for(&self, spec: &FaultSpec) -> Result<(Option<usize>, &'static str), Error> {
        // An interface has no local sockets: its connects are refused by REJECT rules, which
        // the NFQUEUE mechanism's netfilter machinery puts in. Requests are matched in user
        // space, on the packets NFQUEUE hands over.
        let shaping = if crate::dataplane::nfqueue::refuses_on_interface(&spec.action, &spec.target)
        {
            Some(Some(Mechanism::Nfqueue))
        } else {
            spec.action.shaping().map(|forced| {
                spec.target
                    .request
                    .as_ref()
                    .map_or(forced, |_| Some(Mechanism::Nfqueue))
            })
        };
        if let Some(forced) = shaping {
            let shaper = self.choose_shaper(&spec.action, &spec.target, forced)?;
            return Ok((Some(shaper), self.shapers[shaper].mechanism().name()));
        }
        let mechanism = match spec.target.request {
            Some(_) => self.dataplane.request_mechanism(&spec.action),
            None => self.dataplane.mechanism(&spec.action),
        }
        .map_err(|missing| Unsupported::Action {
            action: spec.action.name(),
            missing,
        })?;
        Ok((None, mechanism))
    }

    /// Refuses a fault that overlaps one in force, or for which a table is full.
    fn check_room(
        &self,
        spec: &FaultSpec,
        keys: &[RuleKey],
        peers: Option<&PeerSet>,
        shaped: bool,
        policy: &Policy,
    ) -> Result<(), Error> {
        if let Some(owner) = self.overlap(keys, peers, shaped) {
            return Err(Error::Conflict {
                fault: format!("{} {}", spec.action.name(), spec.target.summary()),
                holder: owner.clone(),
            });
        }
        let used = self.rules_in_use();
        if !shaped && used + keys.len() > MAX_RULES as usize {
            return Err(Limit::RuleTable {
                capacity: MAX_RULES,
                needed: keys.len(),
                free: MAX_RULES as usize - used,
            }
            .into());
        }
        if self.faults.len() >= policy.max_active_faults {
            return Err(Limit::PolicyFaults {
                max: policy.max_active_faults,
            }
            .into());
        }
        if self.free_slots.is_empty() {
            return Err(Limit::FaultSlots.into());
        }
        Ok(())
    }

    /// Puts the planned fault in the kernel under its lease (granting a private one), or
    /// changes nothing.
    fn apply(&mut self, plan: Plan) -> Result<FaultView, Error> {
        let slot = self.free_slots.pop().ok_or(Limit::FaultSlots)?;
        let private = plan.lease.is_none();
        let (lease_id, deadline) = match plan.lease.clone() {
            Some(found) => found,
            None => self.grant(plan.private_ttl, Labels::new(), true),
        };
        let deadline_ns = kernel_deadline(deadline.min(plan.ends_at));
        let placement = Placement::new(
            &plan.spec,
            &plan.resolved,
            plan.keys.clone(),
            plan.shaper,
            plan.peers.clone(),
            slot,
            deadline_ns,
        );
        let id = new_id(|id| self.faults.contains_key(id) || self.ended.get(id).is_some());
        let connections_reset = Arc::new(AtomicU64::new(0));
        let placed = self
            .claim(&id, &plan)
            .and_then(|()| {
                self.place(&id, &placement, &plan.spec, &plan.resolved)
                    .map_err(Error::from)
            })
            .and_then(|()| {
                // New connects are refused before the old connections go, so a client cannot
                // slip a reconnect in between.
                let reset = self.apply_reset(
                    &id,
                    &plan.spec,
                    &plan.resolved,
                    deadline_ns,
                    &connections_reset,
                );
                if reset.is_err()
                    && let Err(undo) = self.unplace(&id, &placement)
                {
                    tracing::warn!(error = %undo, "rolling back a failed inject");
                }
                reset
            });
        let watcher = match placed {
            Ok(watcher) => watcher,
            Err(e) => {
                self.release_claims(&id);
                self.free_slots.push(slot);
                if private {
                    self.leases.remove(&lease_id);
                }
                let lease_id = if private { String::new() } else { lease_id };
                let view = plan.view(FaultState::Reverted, lease_id, deadline);
                self.publish_failed(&e, view);
                return Err(e);
            }
        };
        self.own(&id, &placement);
        self.leases.add_fault(&lease_id, &id);
        tracing::info!(fault = %id, lease = %lease_id, action = plan.spec.action.name(),
            mechanism = plan.mechanism, target = %plan.spec.target.summary(),
            cgroup_id = plan.resolved.cgroup_id, rules = placement.keys.len(),
            connections_reset = connections_reset.load(Ordering::Relaxed), "fault applied");
        self.fault_ends.insert((plan.ends_at, id.clone()));
        self.faults.insert(
            id.clone(),
            FaultRecord {
                lease_id,
                spec: plan.spec,
                resolved: plan.resolved,
                placement,
                mechanism: plan.mechanism,
                connections_reset,
                watcher,
                ends_at: plan.ends_at,
            },
        );
        self.fault_view(&id, FaultState::Active)
    }

    /// Takes the fault's keys among the faultd instances of this host, or names the one that
    /// holds them.
    fn claim(&mut self, id: &str, plan: &Plan) -> Result<(), Error> {
        let Some(claims) = &mut self.claims else {
            return Ok(());
        };
        let class = match plan.shaper {
            Some(_) => Class::Shaped,
            None => Class::Rules,
        };
        claims
            .claim(id, class, &plan.keys)
            .map_err(|source| Error::Claimed {
                fault: format!("{} {}", plan.spec.action.name(), plan.spec.target.summary()),
                source,
            })
    }

    /// Tells watchers that a planned fault (`view`) could not be applied; nothing was.
    fn publish_failed(&self, error: &Error, view: FaultView) {
        if self.events.watched() {
            let message = format!("applying the fault: {error}");
            self.events.publish(EventKind::Failed { message }, view);
        }
    }

    /// The socket side of `reset`: tears down the target's connections now, or starts the
    /// watcher of `reset{after_bytes}` or `stall{close_after}`.
    fn apply_reset(
        &self,
        id: &str,
        spec: &FaultSpec,
        resolved: &ResolvedScope,
        deadline_ns: u64,
        count: &Arc<AtomicU64>,
    ) -> Result<Option<reset::ResetWatcher>, Error> {
        let (after_bytes, min_age) = match spec.action {
            Action::Reset { after_bytes } => (after_bytes, None),
            Action::Stall {
                close_after: Some(after),
            } => (None, Some(after)),
            _ => return Ok(None),
        };
        if spec.target.request.is_some() {
            // The datapath resets each connection at its matched request instead.
            return Ok(None);
        }
        let filter = SocketFilter {
            min_bytes: after_bytes,
            netns: match &spec.target.scope {
                crate::fault::Scope::Netns { path, .. } => Some(path.into()),
                _ => None,
            },
            min_age,
            ..SocketFilter::connections(
                resolved.dir.clone(),
                spec.target.ports.clone(),
                spec.target.peer_set()?,
            )
        };
        let killer = self.dataplane.connection_killer();
        if !spec.action.closes_connections() {
            count.fetch_add(killer(&filter)? as u64, Ordering::Relaxed);
            return Ok(None);
        }
        reset::ResetWatcher::start(id, filter, killer, deadline_ns, count.clone())
            .map(Some)
            .map_err(|e| Limit::WatcherThread(e).into())
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
                Unsupported::Forced {
                    action: action_name,
                    mechanism,
                    why,
                }
                .into()
            });
        }
        let mut reasons = Vec::new();
        for &mechanism in action.auto_preference() {
            match why_not(mechanism) {
                Ok(i) => return Ok(i),
                Err(why) => reasons.push((mechanism, why)),
            }
        }
        Err(Unsupported::NoMechanism {
            action: action_name,
            reasons,
        }
        .into())
    }
}
