//! Delay and bandwidth faults: which mechanism, overlaps, rollback, following the lease.

use super::*;
use crate::dataplane::fake::FakeShaper;
use crate::fault::Mechanism;

/// An engine whose NETEM is missing and whose EDT and NFQUEUE are fakes.
pub(super) fn shaping_engine(
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

pub(super) fn delay_spec(mechanism: Option<Mechanism>, port: u32) -> FaultSpec {
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
