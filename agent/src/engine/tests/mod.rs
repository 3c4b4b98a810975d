use std::time::Duration;

use faultd_common::{DIR_EGRESS, DROP_ALL, PROTO_TCP, RuleKey};

use super::*;
use crate::dataplane::PeerEntry;
use crate::dataplane::fake::FakeDataplane;
use crate::fault::{Action, Direction, PortRange, Protocol, Scope, Target};
use crate::metrics::TotalKey;
use crate::target::ResolveError;
use faultd_common::{ACTION_DROP, ACTION_PASS, ACTION_PEERS, ACTION_REJECT, Counters};

struct FixedResolver;

impl Resolve for FixedResolver {
    fn resolve(&self, scope: &Scope) -> Result<ResolvedScope, ResolveError> {
        match scope {
            Scope::Cgroup { path } if path == "/app" => Ok(ResolvedScope {
                cgroup_path: "/app".into(),
                cgroup_id: 42,
                dir: "/sys/fs/cgroup/app".into(),
            }),
            Scope::Cgroup { path } if path == "/app/web" => Ok(ResolvedScope {
                cgroup_path: "/app/web".into(),
                cgroup_id: 43,
                dir: "/sys/fs/cgroup/app/web".into(),
            }),
            Scope::Cgroup { .. } => {
                Err(Invalid::new("fault.target.cgroup.path", "no such cgroup").into())
            }
            Scope::Netns { path, interface } => Ok(ResolvedScope {
                cgroup_path: format!("netns {path} interface {interface}"),
                cgroup_id: faultd_common::netns_scope_id(3),
                dir: path.into(),
            }),
            _ => Ok(ResolvedScope {
                cgroup_path: "/".into(),
                cgroup_id: 1,
                dir: "/sys/fs/cgroup".into(),
            }),
        }
    }
}

fn engine() -> (Arc<Engine>, FakeDataplane) {
    let fake = FakeDataplane::default();
    let engine = Engine::new(
        Box::new(fake.clone()),
        Box::new(FixedResolver),
        EngineConfig::default(),
    );
    (engine, fake)
}

fn drop_spec(percent: f64, path: &str, port: u32) -> FaultSpec {
    FaultSpec {
        action: Action::drop(percent, "fault.drop.percent").unwrap(),
        target: Target {
            scope: Scope::Cgroup { path: path.into() },
            ports: vec![PortRange::new(port, None, "p").unwrap()],
            protocol: Protocol::Tcp,
            direction: Direction::Egress,
            peers: Vec::new(),
            exclude_peers: Vec::new(),
            request: None,
        },
        labels: Labels::new(),
    }
}

const KEY: RuleKey = RuleKey::new(42, PROTO_TCP, DIR_EGRESS, 6379);

#[tokio::test(start_paused = true)]
async fn inject_writes_rules_and_remove_takes_them_out() {
    let (engine, fake) = engine();
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    let rules = fake.rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[&KEY].drop_threshold, DROP_ALL);
    assert_eq!(fault.resolved.cgroup_id, 42);
    assert_eq!(engine.faults(Select::Active).len(), 1);
    assert_eq!(engine.leases().len(), 1, "a private lease was granted");

    let removed = engine.remove(&fault.id).unwrap();
    assert_eq!(removed.state, FaultState::Reverted);
    assert!(fake.rules().is_empty());
    assert!(engine.faults(Select::Active).is_empty());
    assert!(
        engine.leases().is_empty(),
        "the private lease goes with its fault"
    );
    assert!(matches!(
        engine.remove(&fault.id),
        Err(Error::Ended {
            reason: RevertReason::Removed,
            ..
        })
    ));
    assert!(matches!(
        engine.remove("0123456789abcdef"),
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn an_ended_fault_keeps_its_final_counters_and_reason_for_the_retention_window() {
    let (engine, fake) = engine();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engine.clone().run_expiry(async move {
        let _ = stopped.await;
    }));
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(2)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    let slot = fake.rules()[&KEY].counter_slot;
    fake.set_counters(
        slot,
        Counters {
            matched: 10,
            dropped: 7,
            ..Counters::default()
        },
    );
    let key = TotalKey {
        action: "drop",
        mechanism: fault.mechanism,
        scope: "cgroup",
    };
    assert_eq!(engine.snapshot().totals.matched.get(&key), Some(&10));

    tokio::time::sleep(Duration::from_millis(2001)).await;
    assert!(engine.faults(Select::Active).is_empty());
    let ended = engine.get(&fault.id).unwrap();
    assert_eq!(ended.state, FaultState::Reverted);
    assert_eq!((ended.counters.matched, ended.counters.dropped), (10, 7));
    let ending = ended.ended.expect("an ending");
    assert_eq!(ending.reason, RevertReason::Expired);
    assert_eq!(ending.detail, "lease expired");
    let listed = engine.faults(Select::Ended);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, fault.id);
    assert_eq!(engine.faults(Select::All).len(), 1);
    assert!(matches!(
        engine.remove(&fault.id),
        Err(Error::Ended {
            reason: RevertReason::Expired,
            ..
        })
    ));
    // The slot's counters start again for the next fault; the totals never go back.
    fake.set_counters(slot, Counters::default());
    let snapshot = engine.snapshot();
    assert!(snapshot.faults.is_empty());
    assert_eq!(snapshot.totals.matched.get(&key), Some(&10));
    assert_eq!(snapshot.totals.affected.get(&(key, "dropped")), Some(&7));

    tokio::time::sleep(super::ended::DEFAULT_RETENTION).await;
    assert!(matches!(engine.get(&fault.id), Err(Error::NotFound { .. })));
    assert!(engine.faults(Select::All).is_empty());
    assert_eq!(engine.snapshot().totals.matched.get(&key), Some(&10));
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lease_expires_on_its_deadline_not_before() {
    let (engine, fake) = engine();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engine.clone().run_expiry(async move {
        let _ = stopped.await;
    }));
    engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(2)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();

    tokio::time::sleep(Duration::from_millis(1999)).await;
    assert_eq!(fake.rules().len(), 1, "removed before the deadline");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(fake.rules().is_empty(), "still present after the deadline");
    assert!(engine.leases().is_empty());
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn renew_moves_the_kernel_deadline() {
    let (engine, fake) = engine();
    let lease = engine.grant(Duration::from_secs(1), Labels::new()).unwrap();
    engine
        .inject(
            LeaseRef::Existing(lease.id.clone()),
            drop_spec(50.0, "/app", 6379),
        )
        .unwrap();
    let before = fake.rules()[&KEY].expires_at_ns;
    tokio::time::advance(Duration::from_millis(500)).await;
    engine.renew(&lease.id).unwrap();
    let after = fake.rules()[&KEY].expires_at_ns;
    assert!(
        after > before,
        "renew must push the deadline into the kernel entry"
    );
    tokio::time::advance(Duration::from_millis(900)).await;
    assert_eq!(
        engine.faults(Select::Active).len(),
        1,
        "renewed lease expired early"
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(engine.faults(Select::Active).is_empty());
    assert!(fake.rules().is_empty());
    assert!(matches!(
        engine.renew(&lease.id),
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn revoke_reverts_every_fault_of_the_lease() {
    let (engine, fake) = engine();
    let lease = engine
        .grant(Duration::from_secs(60), Labels::new())
        .unwrap();
    let a = engine
        .inject(
            LeaseRef::Existing(lease.id.clone()),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    let b = engine
        .inject(
            LeaseRef::Existing(lease.id.clone()),
            drop_spec(100.0, "/app", 5432),
        )
        .unwrap();
    let (_, reverted) = engine.revoke(&lease.id).unwrap();
    assert_eq!(reverted, vec![a.id, b.id]);
    assert!(fake.rules().is_empty());
}

#[tokio::test(start_paused = true)]
async fn bad_requests_change_nothing() {
    let (engine, fake) = engine();
    let check = |result: Result<FaultView, Error>, field: &str| match result {
        Err(Error::Invalid(invalid)) => assert_eq!(invalid.field, field),
        other => panic!("expected invalid {field}, got {other:?}"),
    };
    check(
        engine.inject(LeaseRef::Ttl(Duration::ZERO), drop_spec(1.0, "/app", 1)),
        "ttl",
    );
    check(
        engine.inject(
            LeaseRef::Ttl(Duration::from_secs(7200)),
            drop_spec(1.0, "/app", 1),
        ),
        "ttl",
    );
    check(
        engine.inject(LeaseRef::Existing("nope".into()), drop_spec(1.0, "/app", 1)),
        "lease_id",
    );
    check(
        engine.inject(
            LeaseRef::Ttl(Duration::from_secs(5)),
            drop_spec(1.0, "/nope", 1),
        ),
        "fault.target.cgroup.path",
    );
    let mut no_ports = drop_spec(1.0, "/app", 1);
    no_ports.target.ports.clear();
    check(
        engine.inject(LeaseRef::Ttl(Duration::from_secs(5)), no_ports),
        "fault.target.ports",
    );
    assert!(fake.rules().is_empty());
    assert!(
        engine.leases().is_empty(),
        "a failed inject must not leave its private lease"
    );
}

#[tokio::test(start_paused = true)]
async fn overlapping_faults_are_refused() {
    let (engine, fake) = engine();
    let first = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(5)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    match engine.inject(
        LeaseRef::Ttl(Duration::from_secs(5)),
        drop_spec(10.0, "/app", 6379),
    ) {
        Err(Error::Conflict { holder, .. }) => assert_eq!(holder, first.id),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        fake.rules()[&KEY].drop_threshold,
        DROP_ALL,
        "the first fault is untouched"
    );
    assert_eq!(engine.leases().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dataplane_failure_rolls_everything_back() {
    let (engine, fake) = engine();
    fake.state.lock().unwrap().fail_insert_after = Some(0);
    let result = engine.inject(
        LeaseRef::Ttl(Duration::from_secs(5)),
        drop_spec(100.0, "/app", 6379),
    );
    assert!(matches!(result, Err(Error::Dataplane(_))));
    assert!(fake.rules().is_empty());
    assert!(engine.leases().is_empty());
    assert!(engine.faults(Select::Active).is_empty());
    // The slot went back: the next inject works.
    engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(5)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn abort_reverts_everything() {
    let (engine, fake) = engine();
    for port in 1..=10 {
        engine
            .inject(
                LeaseRef::Ttl(Duration::from_secs(5)),
                drop_spec(100.0, "/app", port),
            )
            .unwrap();
    }
    let aborted = engine.abort(Duration::from_secs(1));
    assert_eq!((aborted.faults.len(), aborted.leases.len()), (10, 10));
    assert!(aborted.still_reverting.is_empty());
    assert!(fake.rules().is_empty());
    assert!(engine.faults(Select::Active).is_empty());
}

// Delay and bandwidth: the engine picks a shaping mechanism, refuses missing ones with
// FAILED_PRECONDITION, and drives the shaper through the fault's life.

mod attach;
mod connections;
mod peers;
mod reverts;
mod shaping;
mod targets;

#[tokio::test(start_paused = true)]
async fn the_totals_count_what_duplicate_corrupt_reorder_and_slice_did() {
    let (engine, fake) = engine();
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(60)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    let slot = fake.rules()[&KEY].counter_slot;
    fake.set_counters(
        slot,
        Counters {
            matched: 10,
            duplicated: 4,
            corrupted: 3,
            reordered: 2,
            sliced: 1,
            ..Counters::default()
        },
    );
    let key = TotalKey {
        action: "drop",
        mechanism: fault.mechanism,
        scope: "cgroup",
    };
    let totals = engine.snapshot().totals;
    for (effect, want) in [
        ("duplicated", 4),
        ("corrupted", 3),
        ("reordered", 2),
        ("sliced", 1),
    ] {
        assert_eq!(totals.affected.get(&(key, effect)), Some(&want), "{effect}");
    }
}
