//! An in-memory `Dataplane` and `Shaper` for tests of the logic above the kernel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use faultd_common::{Counters, RuleKey, RuleValue};

use super::{
    ConnectionKiller, Dataplane, DataplaneError, PeerEntry, Shaped, Shaper, SocketFilter,
    Unavailable,
};
use crate::fault::{Action, FaultId, Mechanism};

#[derive(Default)]
pub struct FakeState {
    pub rules: HashMap<RuleKey, RuleValue>,
    pub peers: HashMap<PeerEntry, RuleValue>,
    /// Interfaces of netns scopes by scope id: (interface, faults on it).
    pub interfaces: HashMap<u64, (String, usize)>,
    /// The cgroups holding faults, as the real datapath attaches its programs for them.
    pub cgroups: super::coverage::Coverage,
    pub counters: HashMap<u32, Counters>,
    /// Fail the next insert after this many entries were written.
    pub fail_insert_after: Option<usize>,
    /// What `mechanism` says is missing for reject/reset, if anything.
    pub connect_missing: Option<String>,
    /// Filters `destroy_sockets` was called with, and how many sockets each call reports.
    pub destroyed: Vec<SocketFilter>,
    pub sockets_per_destroy: usize,
}

/// Clones share one state, so a test keeps a handle while the engine owns the other.
#[derive(Clone, Default)]
pub struct FakeDataplane {
    pub state: Arc<Mutex<FakeState>>,
}

impl FakeDataplane {
    pub fn rules(&self) -> HashMap<RuleKey, RuleValue> {
        self.lock().rules.clone()
    }

    pub fn peers(&self) -> HashMap<PeerEntry, RuleValue> {
        self.lock().peers.clone()
    }

    /// The cgroup ids the programs would be attached at, sorted.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().cgroups.wanted().into_keys().collect();
        ids.sort_unstable();
        ids
    }

    /// What the kernel would have counted for the fault in `slot`.
    pub fn set_counters(&self, slot: u32, counters: Counters) {
        self.lock().counters.insert(slot, counters);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Dataplane for FakeDataplane {
    fn insert(&mut self, rules: &[(RuleKey, RuleValue)]) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        let before = state.rules.clone();
        for (i, (key, value)) in rules.iter().enumerate() {
            if state.fail_insert_after == Some(i) {
                state.fail_insert_after = None;
                state.rules = before;
                return Err(DataplaneError::Map {
                    map: "fake",
                    source: Box::new(aya::maps::MapError::IoError(std::io::Error::other(
                        "injected failure",
                    ))),
                });
            }
            state.rules.insert(*key, *value);
        }
        Ok(())
    }

    fn refresh(&mut self, rules: &[(RuleKey, RuleValue)]) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        for (key, value) in rules {
            if let Some(held) = state.rules.get_mut(key) {
                *held = *value;
            }
        }
        Ok(())
    }

    fn remove(&mut self, keys: &[RuleKey]) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        for key in keys {
            state.rules.remove(key);
        }
        Ok(())
    }

    fn set_peers(&mut self, entries: &[(PeerEntry, RuleValue)]) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        for (entry, value) in entries {
            state.peers.insert(*entry, *value);
        }
        Ok(())
    }

    fn attach_cgroup(
        &mut self,
        scope: &crate::target::ResolvedScope,
    ) -> Result<(), DataplaneError> {
        self.lock().cgroups.add(scope.cgroup_id, &scope.dir);
        Ok(())
    }

    fn release_cgroup(&mut self, scope_id: u64) -> Result<(), DataplaneError> {
        self.lock().cgroups.remove(scope_id);
        Ok(())
    }

    fn attach_interface(
        &mut self,
        scope: &crate::target::ResolvedScope,
        interface: &str,
    ) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        let entry = state
            .interfaces
            .entry(scope.cgroup_id)
            .or_insert_with(|| (interface.to_string(), 0));
        entry.1 += 1;
        Ok(())
    }

    fn release_interface(&mut self, scope_id: u64) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        if let Some(entry) = state.interfaces.get_mut(&scope_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                state.interfaces.remove(&scope_id);
            }
        }
        Ok(())
    }

    fn remove_peers(&mut self, entries: &[PeerEntry]) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        for entry in entries {
            state.peers.remove(entry);
        }
        Ok(())
    }

    fn counters(&self, slot: u32) -> Result<Counters, DataplaneError> {
        Ok(self.lock().counters.get(&slot).copied().unwrap_or_default())
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
        self.lock().counters.remove(&slot);
        Ok(())
    }

    fn mechanism(&self, action: &Action) -> Result<&'static str, Unavailable> {
        match (action, &self.lock().connect_missing) {
            (Action::Drop { .. } | Action::Stall { .. }, _) => Ok("fake"),
            (_, Some(missing)) => Err(Unavailable::Missing(missing.clone())),
            (_, None) => Ok("fake-connect"),
        }
    }

    fn connection_killer(&self) -> ConnectionKiller {
        let fake = self.clone();
        Arc::new(move |filter: &SocketFilter| {
            let mut state = fake.lock();
            state.destroyed.push(filter.clone());
            Ok(state.sockets_per_destroy)
        })
    }
}

/// A fault as the fake shaper holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeShape {
    pub action: Action,
    pub keys: Vec<RuleKey>,
    pub expires_at_ns: u64,
}

#[derive(Default)]
pub struct FakeShapes {
    pub faults: HashMap<FaultId, FakeShape>,
    pub counters: HashMap<FaultId, Counters>,
    /// Fail the next apply.
    pub fail_apply: bool,
}

/// Clones share one state, like `FakeDataplane`.
#[derive(Clone)]
pub struct FakeShaper {
    pub mechanism: Mechanism,
    /// Some(reason): the mechanism is missing on this "host".
    pub missing: Option<String>,
    pub state: Arc<Mutex<FakeShapes>>,
}

impl FakeShaper {
    pub fn new(mechanism: Mechanism, missing: Option<&str>) -> Self {
        Self {
            mechanism,
            missing: missing.map(str::to_owned),
            state: Arc::default(),
        }
    }

    pub fn faults(&self) -> HashMap<FaultId, FakeShape> {
        self.lock().faults.clone()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeShapes> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Shaper for FakeShaper {
    fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    fn unavailable(&self, _action: &Action) -> Option<String> {
        self.missing.clone()
    }

    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        if std::mem::take(&mut state.fail_apply) {
            return Err(DataplaneError::Shaper {
                mechanism: self.mechanism.name(),
                reason: "injected failure".into(),
            });
        }
        state.faults.insert(
            fault.id.clone(),
            FakeShape {
                action: fault.action.clone(),
                keys: fault.keys.to_vec(),
                expires_at_ns: fault.expires_at_ns,
            },
        );
        Ok(())
    }

    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError> {
        if let Some(fault) = self.lock().faults.get_mut(id) {
            fault.expires_at_ns = expires_at_ns;
        }
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<(), DataplaneError> {
        self.lock().faults.remove(id);
        Ok(())
    }

    fn counters(&self, id: &str) -> Result<Counters, DataplaneError> {
        Ok(self.lock().counters.get(id).copied().unwrap_or_default())
    }
}
