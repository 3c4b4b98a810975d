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
    let (faults, leases) = engine.abort();
    assert_eq!((faults.len(), leases.len()), (10, 10));
    assert!(fake.rules().is_empty());
    assert!(engine.faults(Select::Active).is_empty());
}

// Delay and bandwidth: the engine picks a shaping mechanism, refuses missing ones with
// FAILED_PRECONDITION, and drives the shaper through the fault's life.

use crate::dataplane::fake::FakeShaper;
use crate::fault::Mechanism;

/// An engine whose NETEM is missing and whose EDT and NFQUEUE are fakes.
fn shaping_engine(
    edt_missing: Option<&str>,
) -> (Arc<Engine>, FakeDataplane, FakeShaper, FakeShaper) {
    let fake = FakeDataplane::default();
    let edt = FakeShaper::new(Mechanism::Edt, edt_missing);
    let nfqueue = FakeShaper::new(Mechanism::Nfqueue, None);
    let netem = crate::dataplane::MissingShaper {
        mechanism: Mechanism::Netem,
        reason: "the kernel has no sch_netem".into(),
    };
    let engine = Engine::with_shapers(
        Box::new(fake.clone()),
        vec![
            Box::new(netem),
            Box::new(edt.clone()),
            Box::new(nfqueue.clone()),
        ],
        Box::new(FixedResolver),
        EngineConfig::default(),
    );
    (engine, fake, edt, nfqueue)
}

fn delay_spec(mechanism: Option<Mechanism>, port: u32) -> FaultSpec {
    let ms = Duration::from_millis;
    FaultSpec {
        action: Action::delay(ms(100), ms(20), 25.0, mechanism, "fault.delay").unwrap(),
        ..drop_spec(0.0, "/app", port)
    }
}

#[tokio::test(start_paused = true)]
async fn delay_goes_to_the_preferred_available_mechanism() {
    let (engine, fake, edt, nfqueue) = shaping_engine(Some("the kernel has no sch_fq"));
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            delay_spec(None, 6379),
        )
        .unwrap();
    assert_eq!(fault.mechanism, "nfqueue", "netem and fq are missing");
    let held = nfqueue.faults();
    assert_eq!(held[&fault.id].keys, vec![KEY]);
    assert!(edt.faults().is_empty());
    assert!(fake.rules().is_empty(), "a delay writes no drop rule");

    let (engine, _, edt, nfqueue) = shaping_engine(None);
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            delay_spec(None, 6379),
        )
        .unwrap();
    assert_eq!(fault.mechanism, "edt", "EDT comes before NFQUEUE");
    assert!(edt.faults().contains_key(&fault.id));
    assert!(nfqueue.faults().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_forced_mechanism_that_is_missing_is_a_failed_precondition() {
    let (engine, _, edt, nfqueue) = shaping_engine(Some("the kernel has no sch_fq"));
    for (mechanism, missing) in [
        (Mechanism::Netem, "the kernel has no sch_netem"),
        (Mechanism::Edt, "the kernel has no sch_fq"),
    ] {
        match engine.inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            delay_spec(Some(mechanism), 6379),
        ) {
            Err(Error::Unsupported(why)) => {
                let why = why.to_string();
                assert!(why.starts_with("fault.delay.mechanism: "), "{why}");
                assert!(why.contains(missing), "{why}");
            }
            other => panic!("forcing {mechanism:?}: expected FAILED_PRECONDITION, got {other:?}"),
        }
    }
    assert!(
        engine.leases().is_empty(),
        "nothing is left of the refused injects"
    );
    assert!(edt.faults().is_empty() && nfqueue.faults().is_empty());
    let status = tonic::Status::from(Error::Unsupported(Unsupported::Action {
        action: "drop",
        missing: crate::dataplane::Unavailable::Missing("x".into()),
    }));
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let forced = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            delay_spec(Some(Mechanism::Nfqueue), 6379),
        )
        .unwrap();
    assert_eq!(forced.mechanism, "nfqueue");
}

#[tokio::test(start_paused = true)]
async fn without_any_mechanism_the_error_lists_what_is_missing() {
    let (engine, _) = engine();
    match engine.inject(LeaseRef::Ttl(Duration::from_secs(30)), delay_spec(None, 1)) {
        Err(Error::Unsupported(why)) => {
            let why = why.to_string();
            for name in ["netem", "edt", "nfqueue"] {
                assert!(why.contains(name), "{why}");
            }
        }
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn delays_may_overlap_drops_but_not_each_other() {
    let (engine, fake, _, nfqueue) = shaping_engine(Some("no fq"));
    let ttl = LeaseRef::Ttl(Duration::from_secs(30));
    engine
        .inject(ttl.clone(), drop_spec(100.0, "/app", 6379))
        .unwrap();
    let delay = engine.inject(ttl.clone(), delay_spec(None, 6379)).unwrap();
    assert_eq!(fake.rules().len(), 1);
    assert_eq!(nfqueue.faults().len(), 1);
    let bandwidth = FaultSpec {
        action: Action::bandwidth(1000, 0, None, "fault.bandwidth").unwrap(),
        ..drop_spec(0.0, "/app", 6379)
    };
    match engine.inject(ttl, bandwidth) {
        Err(Error::Conflict { holder, .. }) => assert_eq!(holder, delay.id),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_shaper_failure_rolls_back_and_frees_the_slot() {
    let (engine, _, _, nfqueue) = shaping_engine(Some("no fq"));
    nfqueue.lock().fail_apply = true;
    let result = engine.inject(
        LeaseRef::Ttl(Duration::from_secs(5)),
        delay_spec(None, 6379),
    );
    assert!(matches!(result, Err(Error::Dataplane(_))), "{result:?}");
    assert!(engine.leases().is_empty() && engine.faults(Select::Active).is_empty());
    engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(5)),
            delay_spec(None, 6379),
        )
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_shaper_follows_the_lease() {
    let (engine, _, _, nfqueue) = shaping_engine(Some("no fq"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engine.clone().run_expiry(async move {
        let _ = stopped.await;
    }));
    let lease = engine.grant(Duration::from_secs(1), Labels::new()).unwrap();
    let fault = engine
        .inject(LeaseRef::Existing(lease.id.clone()), delay_spec(None, 6379))
        .unwrap();
    let before = nfqueue.faults()[&fault.id].expires_at_ns;
    assert!(before > 0);

    tokio::time::sleep(Duration::from_millis(600)).await;
    engine.renew(&lease.id).unwrap();
    let after = nfqueue.faults()[&fault.id].expires_at_ns;
    assert!(after > before, "renew must move the mechanism's deadline");

    nfqueue.lock().counters.insert(
        fault.id.clone(),
        Counters {
            matched: 7,
            delayed: 6,
            ..Counters::default()
        },
    );
    let view = engine.get(&fault.id).unwrap();
    assert_eq!((view.counters.matched, view.counters.delayed), (7, 6));
    assert_eq!(view.mechanism, "nfqueue");

    tokio::time::sleep(Duration::from_millis(999)).await;
    assert_eq!(nfqueue.faults().len(), 1, "removed before the deadline");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(
        nfqueue.faults().is_empty(),
        "still applied after the deadline"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

fn connection_spec(action: Action, port: u32) -> FaultSpec {
    FaultSpec {
        action,
        target: Target {
            scope: Scope::Cgroup {
                path: "/app".into(),
            },
            ports: vec![PortRange::new(port, None, "p").unwrap()],
            protocol: Protocol::Both,
            direction: Direction::Both,
            peers: Vec::new(),
            exclude_peers: Vec::new(),
        },
        labels: Labels::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn reject_refuses_connects_to_the_ports_and_leaves_packets_alone() {
    let (engine, fake) = engine();
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reject, 6379),
        )
        .unwrap();
    assert_eq!(fault.mechanism, "fake-connect");
    let rules = fake.rules();
    assert_eq!(rules.len(), 1);
    let (key, value) = rules.iter().next().unwrap();
    assert_eq!(
        *key,
        RuleKey::new(42, PROTO_TCP, faultd_common::DIR_CONNECT, 6379)
    );
    assert_eq!(value.action, faultd_common::ACTION_REJECT);
    assert!(fake.state.lock().unwrap().destroyed.is_empty());
    // A drop on the same port is a different fault: packets, not connects.
    engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    // A second connection fault on the port overlaps.
    let err = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reset { after_bytes: None }, 6379),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn reset_refuses_first_then_tears_down_the_scope_connections() {
    let (engine, fake) = engine();
    fake.state.lock().unwrap().sockets_per_destroy = 3;
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reset { after_bytes: None }, 5432),
        )
        .unwrap();
    assert_eq!(fault.connections_reset, 3);
    let state = fake.state.lock().unwrap();
    assert_eq!(state.rules.len(), 1, "new connects are refused");
    assert_eq!(state.destroyed.len(), 1);
    let filter = &state.destroyed[0];
    assert_eq!(
        filter.cgroup_dir,
        std::path::Path::new("/sys/fs/cgroup/app")
    );
    assert_eq!(filter.ports, vec![PortRange::new(5432, None, "p").unwrap()]);
    assert_eq!(filter.min_bytes, None);
}

#[tokio::test(start_paused = true)]
async fn missing_kernel_support_is_a_precondition_and_changes_nothing() {
    let (engine, fake) = engine();
    fake.state.lock().unwrap().connect_missing = Some("no bpf_set_retval".into());
    let err = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reject, 6379),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("no bpf_set_retval"));
    assert!(fake.rules().is_empty());
    assert!(engine.leases().is_empty(), "no private lease left behind");
}

fn peer_spec(action: Action, peers: &[&str], exclude: &[&str]) -> FaultSpec {
    let cidrs = |list: &[&str]| {
        list.iter()
            .map(|t| crate::fault::Cidr::parse(t, "f").unwrap())
            .collect::<Vec<_>>()
    };
    let mut spec = drop_spec(100.0, "/app", 6379);
    spec.action = action;
    spec.target.peers = cidrs(peers);
    spec.target.exclude_peers = cidrs(exclude);
    spec
}

fn peer(cidr: &str) -> PeerEntry {
    PeerEntry {
        rule: KEY,
        cidr: crate::fault::Cidr::parse(cidr, "f").unwrap(),
    }
}

#[tokio::test(start_paused = true)]
async fn faults_with_disjoint_peers_share_a_key_and_leave_it_clean() {
    let (engine, fake) = engine();
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let drop = || Action::Drop { percent: 100.0 };
    let a = engine
        .inject(ttl(), peer_spec(drop(), &["10.0.0.0/8"], &["10.1.0.0/16"]))
        .unwrap();
    assert_eq!(
        fake.rules()[&KEY].action,
        ACTION_PEERS,
        "the key is a marker"
    );
    let peers = fake.peers();
    assert_eq!(peers[&peer("10.0.0.0/8")].action, ACTION_DROP);
    assert_eq!(peers[&peer("10.1.0.0/16")].action, ACTION_PASS);

    // Inside a's exclusion: disjoint, so it is allowed and takes the excluded prefix over.
    let b = engine
        .inject(ttl(), peer_spec(drop(), &["10.1.0.0/16"], &[]))
        .unwrap();
    let peers = fake.peers();
    assert_eq!(peers[&peer("10.1.0.0/16")].action, ACTION_DROP);
    assert_ne!(
        peers[&peer("10.1.0.0/16")].counter_slot,
        peers[&peer("10.0.0.0/8")].counter_slot
    );

    // Overlapping peers, or none at all, conflict with what holds the key.
    for (peers, exclude) in [(&["10.2.0.0/16"][..], &[][..]), (&[], &[]), (&[], &["::1"])] {
        let err = engine
            .inject(ttl(), peer_spec(drop(), peers, exclude))
            .unwrap_err();
        assert!(
            matches!(err, Error::Conflict { .. }),
            "{peers:?} {exclude:?}: {err:?}"
        );
    }
    // A fault without peers holds the key whole: a fault with peers conflicts with it too.
    let other_port = drop_spec(100.0, "/app", 6380);
    let plain = engine.inject(ttl(), other_port).unwrap();
    let mut on_6380 = peer_spec(drop(), &["192.168.0.0/16"], &[]);
    on_6380.target.ports = vec![PortRange::new(6380, None, "p").unwrap()];
    assert!(matches!(
        engine.inject(ttl(), on_6380).unwrap_err(),
        Error::Conflict { .. }
    ));
    engine.remove(&plain.id).unwrap();

    // Removing a gives its prefix back (and b keeps the one it took over).
    engine.remove(&a.id).unwrap();
    let peers = fake.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[&peer("10.1.0.0/16")].action, ACTION_DROP);
    assert_eq!(fake.rules()[&KEY].action, ACTION_PEERS);
    engine.remove(&b.id).unwrap();
    assert!(fake.peers().is_empty());
    assert!(
        fake.rules().is_empty(),
        "the marker goes with the last fault"
    );
}

#[tokio::test(start_paused = true)]
async fn peers_entries_follow_the_lease_and_reset_filters_by_peer() {
    let (engine, fake) = engine();
    let lease = engine
        .grant(Duration::from_secs(10), Labels::new())
        .unwrap();
    let fault = engine
        .inject(
            LeaseRef::Existing(lease.id.clone()),
            peer_spec(
                Action::Reset { after_bytes: None },
                &["::1", "127.0.0.2"],
                &[],
            ),
        )
        .unwrap();
    let connect = |cidr: &str| PeerEntry {
        rule: RuleKey::new(42, PROTO_TCP, faultd_common::DIR_CONNECT, 6379),
        ..peer(cidr)
    };
    let before = fake.peers()[&connect("::1")].expires_at_ns;
    assert_eq!(fake.peers()[&connect("127.0.0.2/32")].action, ACTION_REJECT);
    tokio::time::advance(Duration::from_secs(5)).await;
    engine.renew(&lease.id).unwrap();
    let after = fake.peers()[&connect("::1")].expires_at_ns;
    assert!(after > before, "renew moved the peers entry's deadline");
    let destroyed = fake.state.lock().unwrap().destroyed.clone();
    let peers = destroyed[0]
        .peers
        .as_ref()
        .expect("the reset filter has the peers");
    assert!(peers.contains("::1".parse().unwrap()));
    assert!(!peers.contains("127.0.0.1".parse().unwrap()));
    engine.revoke(&lease.id).unwrap();
    assert!(fake.peers().is_empty() && fake.rules().is_empty());
    drop(fault);
}

#[tokio::test(start_paused = true)]
async fn delays_with_disjoint_peers_share_a_key_and_overlapping_ones_conflict() {
    let (engine, _fake, _edt, nfqueue) = shaping_engine(Some("no fq"));
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let delay = || {
        Action::delay(
            Duration::from_millis(10),
            Duration::ZERO,
            0.0,
            None,
            "fault.delay",
        )
        .unwrap()
    };
    let a = engine
        .inject(ttl(), peer_spec(delay(), &["127.0.0.2"], &[]))
        .unwrap();
    assert_eq!(a.mechanism, "nfqueue");
    let b = engine
        .inject(ttl(), peer_spec(delay(), &["127.0.0.1", "::1"], &[]))
        .unwrap();
    assert_eq!(nfqueue.faults().len(), 2, "disjoint peers share the key");
    for (peers, exclude) in [
        (&[][..], &["127.0.0.3"][..]),
        (&["127.0.0.0/8"][..], &[][..]),
        (&[][..], &[][..]),
    ] {
        match engine.inject(ttl(), peer_spec(delay(), peers, exclude)) {
            Err(err @ Error::Conflict { .. }) => {
                assert!(err.to_string().contains("overlaps fault"), "{err}")
            }
            other => {
                panic!("peers {peers:?} except {exclude:?}: expected a conflict, got {other:?}")
            }
        }
    }
    let err = engine
        .inject(ttl(), peer_spec(delay(), &["10.1.0.0/16"], &["10.0.0.0/8"]))
        .unwrap_err();
    let Error::Invalid(invalid) = err else {
        panic!("{err:?}")
    };
    assert_eq!(invalid.field, "fault.target.exclude_peers");
    engine.remove(&a.id).unwrap();
    engine.remove(&b.id).unwrap();
    assert!(nfqueue.faults().is_empty());
    engine
        .inject(ttl(), peer_spec(delay(), &[], &[]))
        .expect("once the faults with peers are gone the key is free");
}

#[tokio::test(start_paused = true)]
async fn netns_faults_share_the_interfaces_programs_and_release_them_with_the_last() {
    let (engine, fake) = engine();
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let on_port = |port| {
        let mut spec = drop_spec(100.0, "/app", port);
        spec.target.scope = Scope::Netns {
            path: "/run/netns/r".into(),
            interface: "r1".into(),
        };
        spec
    };
    let a = engine.inject(ttl(), on_port(6379)).unwrap();
    let b = engine.inject(ttl(), on_port(5432)).unwrap();
    let scope = faultd_common::netns_scope_id(3);
    assert_eq!(
        fake.state.lock().unwrap().interfaces[&scope],
        ("r1".into(), 2)
    );
    assert!(fake.rules().keys().all(|k| k.scope_id == scope));
    engine.remove(&a.id).unwrap();
    assert_eq!(fake.state.lock().unwrap().interfaces[&scope].1, 1);
    engine.remove(&b.id).unwrap();
    assert!(fake.state.lock().unwrap().interfaces.is_empty());

    let mut reject = on_port(6379);
    reject.action = Action::Reject;
    let Err(Error::Invalid(invalid)) = engine.inject(ttl(), reject) else {
        panic!("a reject on a netns scope must be invalid")
    };
    assert_eq!(invalid.field, "fault.target.netns");
}

#[tokio::test(start_paused = true)]
async fn a_delay_on_a_netns_scope_goes_to_its_shaper_beside_a_drop_and_attaches_no_programs() {
    let (engine, fake, _edt, nfqueue) = shaping_engine(Some("no fq"));
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let on_r1 = |mut spec: FaultSpec| {
        spec.target.scope = Scope::Netns {
            path: "/run/netns/r".into(),
            interface: "r1".into(),
        };
        spec
    };
    let delay = engine.inject(ttl(), on_r1(delay_spec(None, 6379))).unwrap();
    assert_eq!(delay.mechanism, "nfqueue");
    let scope = faultd_common::netns_scope_id(3);
    assert!(
        nfqueue.faults()[&delay.id]
            .keys
            .iter()
            .all(|k| k.scope_id == scope)
    );
    assert!(
        fake.state.lock().unwrap().interfaces.is_empty(),
        "a shaped fault needs no tc programs on the interface"
    );
    let drop = engine
        .inject(ttl(), on_r1(drop_spec(100.0, "/app", 6379)))
        .expect("a drop may overlap a delay");
    assert_eq!(fake.state.lock().unwrap().interfaces[&scope].1, 1);
    match engine.inject(ttl(), on_r1(delay_spec(None, 6379))) {
        Err(Error::Conflict { holder, .. }) => assert_eq!(holder, delay.id),
        other => panic!("a second delay on the same key must conflict: {other:?}"),
    }
    engine.remove(&delay.id).unwrap();
    assert!(nfqueue.faults().is_empty());
    assert_eq!(
        fake.state.lock().unwrap().interfaces[&scope].1,
        1,
        "removing the delay leaves the drop's programs"
    );
    engine.remove(&drop.id).unwrap();
    assert!(fake.state.lock().unwrap().interfaces.is_empty());
}
