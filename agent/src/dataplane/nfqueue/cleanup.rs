//! Taking a fault's rules out in the background, and what the engine learns of it: a removal
//! that fails keeps what is left (the rules of the families whose restore failed, the lane) so
//! that `Shaper::retry` can try again, and `Shaper::cleanup` says where each fault stands. The
//! engine shows a failing one as REVERT_FAILING until a retry succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::placement::Placement;
use crate::dataplane::Cleanup;
use crate::dataplane::netfilter::{self, Family};
use crate::fault::FaultId;

/// What a failed removal left in one namespace.
pub(super) struct Leftover {
    /// Its `lines` are those of the families whose rules are still in.
    pub(super) placement: Placement,
    /// Every family the fault had rules in (for the chains of the last fault in a namespace).
    pub(super) families: Vec<Family>,
    pub(super) error: String,
}

/// The background removals per fault, shared with the netfilter worker's jobs.
#[derive(Clone, Default)]
pub(super) struct Cleanups {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Removals queued or running, per fault.
    pending: HashMap<FaultId, usize>,
    /// Removals that failed, waiting for a retry.
    failed: HashMap<FaultId, Vec<Leftover>>,
}

impl Cleanups {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps stay consistent whatever panicked: each change is one insert or remove.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn begin(&self, id: &str) {
        *self.lock().pending.entry(id.to_owned()).or_default() += 1;
    }

    /// One removal of `id` ended; `left` is what it could not take out.
    pub(super) fn finish(&self, id: &str, left: Option<Leftover>) {
        let mut inner = self.lock();
        if let Some(count) = inner.pending.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                inner.pending.remove(id);
            }
        }
        if let Some(left) = left {
            inner.failed.entry(id.to_owned()).or_default().push(left);
        }
    }

    pub(super) fn status(&self, id: &str) -> Cleanup {
        let inner = self.lock();
        if inner.pending.contains_key(id) {
            return Cleanup::Pending;
        }
        match inner.failed.get(id).and_then(|left| left.first()) {
            Some(left) => Cleanup::Failed(left.error.clone()),
            None => Cleanup::Done,
        }
    }

    /// What failed removals of `id` left, taken for a retry.
    pub(super) fn take_failed(&self, id: &str) -> Vec<Leftover> {
        self.lock().failed.remove(id).unwrap_or_default()
    }

    pub(super) fn any_failed(&self) -> bool {
        !self.lock().failed.is_empty()
    }

    /// Every leftover, at exit.
    pub(super) fn take_all(&self) -> Vec<Leftover> {
        self.lock()
            .failed
            .drain()
            .flat_map(|(_, left)| left)
            .collect()
    }
}

/// On the netfilter worker: takes the rules of `placement` out (of the families in its `lines`)
/// and, if it was the agent's last fault in the namespace, the agent's chains there. Returns
/// what is left on failure; on success the lane ends.
pub(super) fn remove_rules(
    mut placement: Placement,
    families: Vec<Family>,
    last: bool,
    instance: &str,
) -> Option<Leftover> {
    let netns = placement.netns.clone();
    let mut left = Vec::new();
    let mut error = None;
    for (family, lines) in std::mem::take(&mut placement.lines) {
        let mut own = netfilter::deletion(&lines);
        own.extend(placement.rules.teardown(family));
        if let Err(e) = netfilter::restore(family, Some(&netns), &own) {
            tracing::warn!(error = %e, netns = %netns.path().display(), "removing NFQUEUE rules");
            error.get_or_insert_with(|| e.to_string());
            left.push((family, lines));
        }
    }
    if last && left.is_empty() {
        for family in &families {
            let removed = netfilter::list(*family, Some(&netns)).and_then(|listing| {
                netfilter::restore(*family, Some(&netns), &listing.removal(instance))
            });
            if let Err(e) = removed {
                tracing::warn!(error = %e, netns = %netns.path().display(), "removing faultd's chains");
                error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    match error {
        // The lane passes everything already; it stays until its rules are out, so that no
        // packet waits in a queue nobody reads.
        Some(error) => {
            placement.lines = left;
            Some(Leftover {
                placement,
                families,
                error,
            })
        }
        None => {
            placement.lane.join();
            None
        }
    }
}
