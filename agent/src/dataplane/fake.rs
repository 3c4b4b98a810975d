//! An in-memory `Dataplane` for tests of the logic above the kernel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use faultd_common::{Counters, RuleKey, RuleValue};

use super::{ConnectionKiller, Dataplane, DataplaneError, SocketFilter};
use crate::fault::Action;

#[derive(Default)]
pub struct FakeState {
    pub rules: HashMap<RuleKey, RuleValue>,
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
                    reason: "injected failure".into(),
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

    fn counters(&self, slot: u32) -> Result<Counters, DataplaneError> {
        Ok(self.lock().counters.get(&slot).copied().unwrap_or_default())
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
        self.lock().counters.remove(&slot);
        Ok(())
    }

    fn mechanism(&self, action: &Action) -> Result<&'static str, String> {
        match (action, &self.lock().connect_missing) {
            (Action::Drop { .. }, _) => Ok("fake"),
            (_, Some(missing)) => Err(missing.clone()),
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
