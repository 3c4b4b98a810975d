//! Where the engine has the cgroup programs attached: at the faulted cgroups only, the
//! outermost of nested ones, for as long as they hold faults.

use std::time::Duration;

use super::shaping::{delay_spec, shaping_engine};
use super::*;

fn ttl() -> LeaseRef {
    LeaseRef::Ttl(Duration::from_secs(30))
}

#[tokio::test(start_paused = true)]
async fn programs_sit_at_the_outermost_faulted_cgroups_while_they_hold_faults() {
    let (engine, fake) = engine();
    assert!(
        fake.attached_cgroups().is_empty(),
        "no fault, no attachment"
    );
    let inner = engine
        .inject(ttl(), drop_spec(100.0, "/app/web", 6379))
        .unwrap();
    assert_eq!(fake.attached_cgroups(), [43]);
    let outer = engine
        .inject(ttl(), drop_spec(100.0, "/app", 5432))
        .unwrap();
    assert_eq!(
        fake.attached_cgroups(),
        [42],
        "the outer cgroup covers the inner"
    );
    let second = engine
        .inject(ttl(), drop_spec(100.0, "/app", 6380))
        .unwrap();
    engine.remove(&outer.id).unwrap();
    assert_eq!(
        fake.attached_cgroups(),
        [42],
        "the outer cgroup still has a fault"
    );
    engine.remove(&second.id).unwrap();
    assert_eq!(
        fake.attached_cgroups(),
        [43],
        "back to the inner cgroup alone"
    );
    engine.remove(&inner.id).unwrap();
    assert!(
        fake.attached_cgroups().is_empty(),
        "the last fault took them away"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_inject_and_an_expired_lease_leave_no_attachment() {
    let (engine, fake) = engine();
    fake.state.lock().unwrap().fail_insert_after = Some(0);
    assert!(
        engine
            .inject(ttl(), drop_spec(100.0, "/app", 6379))
            .is_err()
    );
    assert!(fake.attached_cgroups().is_empty());
    fake.state.lock().unwrap().fail_insert_after = None;

    engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(1)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    assert_eq!(fake.attached_cgroups(), [42]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let expiry = tokio::spawn(engine.clone().run_expiry(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(engine.faults(Select::Active).is_empty());
    assert!(fake.attached_cgroups().is_empty());
    let _ = stop.send(());
    expiry.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_delay_attaches_no_cgroup_programs() {
    let (engine, fake, _edt, _nfqueue) = shaping_engine(Some("no fq"));
    engine.inject(ttl(), delay_spec(None, 6379)).unwrap();
    assert!(fake.attached_cgroups().is_empty());
}
