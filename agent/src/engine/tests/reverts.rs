//! A revert that fails: shown as failing, retried with growing pauses, ended once it succeeds.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::shaping::delay_spec;
use super::*;
use crate::dataplane::fake::FakeShaper;
use crate::dataplane::{Cleanup, DataplaneError, Shaped};
use crate::events::EventKind;
use crate::fault::Mechanism;

/// NFQUEUE as a fake whose background clean-up fails while `broken` holds an error.
#[derive(Clone)]
struct FlakyCleanup {
    inner: FakeShaper,
    broken: Arc<Mutex<Option<String>>>,
    left: Arc<Mutex<BTreeSet<String>>>,
}

impl FlakyCleanup {
    fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_broken(&self, error: Option<&str>) {
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = error.map(str::to_owned);
    }

    fn left(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.left.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shaper for FlakyCleanup {
    fn mechanism(&self) -> Mechanism {
        self.inner.mechanism()
    }
    fn unavailable(&self, action: &Action) -> Option<String> {
        self.inner.unavailable(action)
    }
    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        self.inner.apply(fault)
    }
    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError> {
        self.inner.refresh(id, expires_at_ns)
    }
    fn remove(&mut self, id: &str) -> Result<(), DataplaneError> {
        self.inner.remove(id)?;
        if self.broken().is_some() {
            self.left().insert(id.to_owned());
        }
        Ok(())
    }
    fn counters(&self, id: &str) -> Result<Counters, DataplaneError> {
        self.inner.counters(id)
    }
    fn cleanup(&self, id: &str) -> Cleanup {
        match (self.left().contains(id), self.broken()) {
            (true, Some(error)) => Cleanup::Failed(error),
            _ => Cleanup::Done,
        }
    }
    fn retry(&mut self, id: &str) {
        if self.broken().is_none() {
            self.left().remove(id);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_revert_shows_until_a_retry_succeeds() {
    let shaper = FlakyCleanup {
        inner: FakeShaper::new(Mechanism::Nfqueue, None),
        broken: Arc::default(),
        left: Arc::default(),
    };
    let engine = Engine::with_shapers(
        Box::new(FakeDataplane::default()),
        vec![Box::new(shaper.clone())],
        Box::new(FixedResolver),
        EngineConfig::default(),
    );
    let mut events = engine.subscribe();
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            delay_spec(Some(Mechanism::Nfqueue), 6379),
        )
        .unwrap();
    shaper.set_broken(Some("iptables-restore failed"));
    engine.remove(&fault.id).unwrap();

    let failing = engine.get(&fault.id).unwrap();
    assert_eq!(failing.state, FaultState::RevertFailing);
    let failure = failing
        .ended
        .as_ref()
        .and_then(|e| e.failing.clone())
        .unwrap();
    assert_eq!(failure.error, "iptables-restore failed");
    assert_eq!(failure.attempts, 1);
    assert_eq!(engine.metrics().reverts_failing.get(), 1);
    let listed: Vec<_> = engine
        .faults(Select::Active)
        .into_iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(
        listed,
        vec![fault.id.clone()],
        "a failing revert is not over"
    );
    assert!(engine.faults(Select::Ended).is_empty());

    // Retried after 200 ms, then 400 ms: still failing.
    tokio::time::advance(Duration::from_millis(210)).await;
    let again = engine.get(&fault.id).unwrap();
    assert_eq!(
        again.ended.and_then(|e| e.failing).map(|f| f.attempts),
        Some(2)
    );
    assert_eq!(engine.metrics().revert_failures.get(), 2);

    shaper.set_broken(None);
    tokio::time::advance(Duration::from_millis(410)).await;
    let reverted = engine.get(&fault.id).unwrap();
    assert_eq!(reverted.state, FaultState::Reverted);
    assert_eq!(
        reverted.ended.as_ref().and_then(|e| e.failing.clone()),
        None
    );
    assert_eq!(engine.metrics().reverts_failing.get(), 0);
    assert!(shaper.left().is_empty());
    assert!(engine.faults(Select::Active).is_empty());

    let mut kinds = Vec::new();
    while let Ok(event) = events.try_recv() {
        kinds.push(match &event.kind {
            EventKind::Applied => "applied".to_string(),
            EventKind::Failed { message } => format!("failed: {message}"),
            EventKind::Reverted { reason, .. } => format!("reverted {}", reason.name()),
        });
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    assert_eq!(kinds[0], "applied");
    assert!(
        kinds[1].contains("(attempt 1): iptables-restore failed"),
        "{kinds:?}"
    );
    assert!(kinds[2].contains("(attempt 2)"), "{kinds:?}");
    assert_eq!(kinds[3], "reverted removed", "reverted only once it is out");
}
