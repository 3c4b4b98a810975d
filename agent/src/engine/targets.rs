//! Faults whose target went away: a cgroup (of a cgroup, pod, container or pid scope) that was
//! deleted ends its faults with their own reason (TARGET_GONE) and event, instead of leaving
//! them ACTIVE with their kernel state until the lease ends. The expiry task looks every
//! `CHECK_EVERY`: one stat per distinct cgroup, outside the engine's lock.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use super::{Engine, RevertReason};
use crate::fault::{FaultId, Scope};

/// How often the targets are looked at.
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(500);

impl Engine {
    /// Looks for gone targets every `CHECK_EVERY` until `shutdown` resolves.
    pub async fn run_target_watch(
        self: std::sync::Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(CHECK_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticks.tick() => {}
            }
            // stat(2) and reverts (iptables, netlink) block: on the blocking pool.
            let engine = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || engine.end_gone_targets()).await {
                tracing::error!(error = %e, "looking for faults whose target is gone");
            }
        }
    }

    /// Ends every fault whose cgroup is gone (or was replaced by another of the same path);
    /// returns their ids.
    pub fn end_gone_targets(&self) -> Vec<FaultId> {
        // The cgroup directory and id of each fault on a cgroup, read under the lock.
        let mut scopes: HashMap<(PathBuf, u64), Vec<FaultId>> = HashMap::new();
        {
            let state = self.lock();
            for (id, fault) in &state.faults {
                if matches!(fault.spec.target.scope, Scope::Host | Scope::Netns { .. }) {
                    continue;
                }
                let key = (fault.resolved.dir.clone(), fault.resolved.cgroup_id);
                scopes.entry(key).or_default().push(id.clone());
            }
        }
        let gone: Vec<(PathBuf, Vec<FaultId>)> = scopes
            .into_iter()
            // A cgroup's id is its directory's inode: a new cgroup of the same path is another.
            .filter(|((dir, cgroup_id), _)| {
                std::fs::metadata(dir).map_or(true, |meta| meta.ino() != *cgroup_id)
            })
            .map(|((dir, _), ids)| (dir, ids))
            .collect();
        if gone.is_empty() {
            return Vec::new();
        }
        let mut state = self.lock();
        let mut ended = Vec::new();
        for (dir, ids) in gone {
            let detail = format!("its cgroup {} was deleted", dir.display());
            for id in ids {
                let Some(lease_id) = state.faults.get(&id).map(|f| f.lease_id.clone()) else {
                    continue;
                };
                tracing::info!(fault = %id, cgroup = %dir.display(), "the fault's cgroup is gone");
                state.revert_because(&id, RevertReason::TargetGone, &detail);
                // A private lease exists for its one fault: it goes with it.
                if state
                    .leases
                    .get(&lease_id)
                    .is_some_and(|l| l.private && l.faults.is_empty())
                {
                    state.leases.remove(&lease_id);
                }
                ended.push(id);
            }
        }
        self.deadline_changed.notify_one();
        ended
    }
}
