//! What a fault did outlives it: ended faults stay readable (final counters, end time, reason)
//! for a retention window, and the totals of every fault this agent ran never go backwards.
//!
//! A fault's kernel counters are read one last time as it is reverted, while its entries still
//! exist; from then on they live here. The totals are what ended faults did plus, at scrape
//! time, what the live ones have done so far: since a live fault's counters only grow until
//! that last read, the sum never decreases.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::fault::FaultId;
use crate::fault::view::FaultView;
use crate::metrics::Totals;

/// How long an ended fault stays readable unless configured otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(15 * 60);
/// At most this many ended faults are kept, however short-lived (the oldest go first), so a
/// churn of faults cannot grow memory without bound.
pub const MAX_RETAINED: usize = 10_000;

/// Ended faults, oldest first, and the totals of every fault that ended.
#[derive(Debug)]
pub struct Ended {
    retention: Duration,
    faults: HashMap<FaultId, FaultView>,
    order: VecDeque<(Instant, FaultId)>,
    totals: Totals,
}

impl Ended {
    pub fn new(retention: Duration) -> Self {
        Self {
            retention,
            faults: HashMap::new(),
            order: VecDeque::new(),
            totals: Totals::default(),
        }
    }

    /// A fault ended at `now`; `view` carries its final counters and its ending.
    pub fn record(&mut self, view: FaultView, now: Instant) {
        self.totals.add(&view);
        if self.retention.is_zero() {
            return;
        }
        if self.order.len() >= MAX_RETAINED
            && let Some((_, oldest)) = self.order.pop_front()
        {
            self.faults.remove(&oldest);
        }
        self.order.push_back((now, view.id.clone()));
        self.faults.insert(view.id.clone(), view);
    }

    /// Forgets the faults that ended more than the retention window before `now`.
    pub fn prune(&mut self, now: Instant) {
        while let Some((ended, _)) = self.order.front() {
            if now.saturating_duration_since(*ended) < self.retention {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.faults.remove(&id);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&FaultView> {
        self.faults.get(id)
    }

    pub fn views(&self) -> impl Iterator<Item = &FaultView> {
        self.faults.values()
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::view::{Ending, FaultState, RevertReason};
    use crate::fault::{Action, Direction, FaultSpec, Labels, Protocol, Scope, Target};
    use crate::metrics::TotalKey;
    use crate::target::ResolvedScope;
    use faultd_common::Counters;
    use std::time::SystemTime;

    fn view(id: &str, matched: u64, dropped: u64) -> FaultView {
        FaultView {
            id: id.into(),
            lease_id: "l".into(),
            spec: FaultSpec {
                action: Action::Drop { percent: 100.0 },
                target: Target {
                    scope: Scope::Cgroup { path: "/a".into() },
                    ports: Vec::new(),
                    protocol: Protocol::Tcp,
                    direction: Direction::Egress,
                    peers: Vec::new(),
                    exclude_peers: Vec::new(),
                    request: None,
                },
                labels: Labels::default(),
            },
            resolved: ResolvedScope {
                cgroup_path: "/a".into(),
                cgroup_id: 1,
                dir: "/sys/fs/cgroup/a".into(),
            },
            rules: 1,
            state: FaultState::Reverted,
            counters: Counters {
                matched,
                dropped,
                ..Counters::default()
            },
            connections_reset: 0,
            expires_at: SystemTime::now(),
            remaining: Duration::ZERO,
            mechanism: "cgroup_skb",
            ended: Some(Ending {
                at: SystemTime::now(),
                reason: RevertReason::Expired,
                detail: "lease expired".into(),
                failing: None,
            }),
        }
    }

    #[test]
    fn ended_faults_are_kept_for_the_window_and_counted_for_ever() {
        let start = Instant::now();
        let mut ended = Ended::new(Duration::from_secs(60));
        ended.record(view("a", 10, 7), start);
        ended.record(view("b", 5, 5), start + Duration::from_secs(30));
        assert_eq!(ended.get("a").map(|v| v.counters.dropped), Some(7));
        ended.prune(start + Duration::from_secs(61));
        assert!(ended.get("a").is_none());
        assert!(ended.get("b").is_some());
        ended.prune(start + Duration::from_secs(91));
        assert_eq!(ended.views().count(), 0);
        let key = TotalKey {
            action: "drop",
            mechanism: "cgroup_skb",
            scope: "cgroup",
        };
        assert_eq!(ended.totals().matched.get(&key), Some(&15));
        assert_eq!(ended.totals().affected.get(&(key, "dropped")), Some(&12));
        // Only faults with a request match count requests.
        assert!(ended.totals().requests.is_empty());
    }

    #[test]
    fn requests_of_request_matches_are_counted_for_ever() {
        let now = Instant::now();
        let mut ended = Ended::new(Duration::ZERO);
        for (id, matched, affected) in [("a", 4, 1), ("b", 3, 3)] {
            let mut set = view(id, 10, 2);
            set.spec.target.request = Some(crate::fault::RequestMatch::Redis {
                commands: vec!["SET".into()],
                key_prefix: String::new(),
            });
            set.counters.requests_matched = matched;
            set.counters.requests_affected = affected;
            ended.record(set, now);
        }
        let key = TotalKey {
            action: "drop",
            mechanism: "cgroup_skb",
            scope: "cgroup",
        };
        assert_eq!(ended.totals().requests.get(&key), Some(&(7, 4)));
    }

    #[test]
    fn retention_is_bounded_in_count_and_can_be_off() {
        let now = Instant::now();
        let mut ended = Ended::new(Duration::from_secs(3600));
        for i in 0..MAX_RETAINED + 5 {
            ended.record(view(&format!("f{i}"), 1, 1), now);
        }
        assert_eq!(ended.views().count(), MAX_RETAINED);
        assert!(ended.get("f0").is_none());
        assert!(ended.get(&format!("f{}", MAX_RETAINED + 4)).is_some());

        let mut off = Ended::new(Duration::ZERO);
        off.record(view("x", 3, 3), now);
        assert!(off.get("x").is_none());
        assert_eq!(off.totals().matched.values().sum::<u64>(), 3);
    }
}
