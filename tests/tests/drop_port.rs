//! A 100% egress drop on one port black-holes that service for the workload only.

use std::time::Duration;

use faultd_proto::v1::{Direction, FaultState, Protocol};
use faultd_tests::api::{cgroup_target, counters, drop_fault, get_fault_until, remove, with_ttl};
use faultd_tests::servers::{POSTGRES_PORT, REDIS_PORT};
use faultd_tests::{Postgres, RedisScene, Workload, fd_probe};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn full_drop_on_a_port_blackholes_that_service_for_the_cgroup_only() {
    let mut scene = RedisScene::start(fd_probe!()).await;
    let _postgres = Postgres::start(&scene.netns);
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &mut scene;
    let mut faults = faultd.faults();
    let outside = Workload::outside(fd_probe!(), netns);

    // Without a fault both services answer from inside: what fails later is the fault's doing.
    let run = inside.redis_ping();
    assert!(
        run.answered(),
        "before any fault, redis-cli inside the cgroup should get PONG: {run}"
    );
    let run = inside.psql_select_1();
    assert!(
        run.answered(),
        "before any fault, psql inside the cgroup should get 1: {run}"
    );

    // --- Redis black-holed ---
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let redis_fault = faults
        .inject(with_ttl(drop_fault(100.0, target), Duration::from_secs(60)))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "Inject of a 100% drop on {REDIS_PORT} for {} failed: {s:?}",
                cgroup.path()
            )
        })
        .into_inner();
    assert_eq!(
        redis_fault.state(),
        FaultState::Active,
        "Inject answered {redis_fault:?}"
    );
    let resolved = redis_fault.resolved.clone().unwrap_or_default();
    assert_eq!(
        resolved.cgroup_id,
        cgroup.id(),
        "faultd resolved {} to cgroup id {} but the cgroup's id (inode) is {}: {redis_fault:?}",
        cgroup.path(),
        resolved.cgroup_id,
        cgroup.id()
    );
    assert!(
        resolved.rules >= 1,
        "the fault resolved to no kernel rule: {redis_fault:?}"
    );

    let run = inside.redis_ping();
    assert!(
        run.timed_out() && !run.answered(),
        "with a 100% egress drop on {REDIS_PORT}, redis-cli inside the cgroup should hang until `timeout` kills it: {run}"
    );
    let run = outside.redis_ping();
    assert!(
        run.answered(),
        "the fault is on the cgroup only; redis-cli outside it should still get PONG: {run}"
    );
    let run = inside.psql_select_1();
    assert!(
        run.answered(),
        "a fault on {REDIS_PORT} must leave PostgreSQL alone; psql inside the cgroup: {run}"
    );

    let seen = get_fault_until(&mut faults, &redis_fault.id, |m, d| m > 0 && d > 0).await;
    let (matched, dropped) = counters(&seen);
    assert!(
        matched > 0 && dropped > 0,
        "redis-cli's SYNs were dropped, yet Get shows matched={matched} dropped={dropped}: {seen:?}"
    );
    eprintln!("redis fault counters: matched={matched} dropped={dropped}");

    let removed = remove(&mut faults, &redis_fault.id).await;
    assert_eq!(
        removed.state(),
        FaultState::Reverted,
        "Remove answered {removed:?}"
    );
    let run = inside.redis_ping();
    assert!(
        run.answered(),
        "after Remove, redis-cli inside the cgroup should get PONG again: {run}"
    );

    // --- The mirror: PostgreSQL black-holed, Redis untouched ---
    let target = cgroup_target(cgroup, &[POSTGRES_PORT], Protocol::Tcp, Direction::Egress);
    let pg_fault = faults
        .inject(with_ttl(drop_fault(100.0, target), Duration::from_secs(60)))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "Inject of a 100% drop on {POSTGRES_PORT} for {} failed: {s:?}",
                cgroup.path()
            )
        })
        .into_inner();
    let run = inside.psql_select_1();
    assert!(
        !run.answered() && run.stderr.contains("timeout"),
        "with a 100% egress drop on {POSTGRES_PORT}, psql inside the cgroup should fail with a connect timeout: {run}"
    );
    let run = outside.psql_select_1();
    assert!(
        run.answered(),
        "psql outside the cgroup should still get 1: {run}"
    );
    let run = inside.redis_ping();
    assert!(
        run.answered(),
        "a fault on {POSTGRES_PORT} must leave Redis alone; redis-cli inside the cgroup: {run}"
    );
    let seen = get_fault_until(&mut faults, &pg_fault.id, |m, d| m > 0 && d > 0).await;
    let (matched, dropped) = counters(&seen);
    assert!(
        matched > 0 && dropped > 0,
        "psql's SYNs were dropped, yet Get shows matched={matched} dropped={dropped}: {seen:?}"
    );

    // SIGTERM reverts everything and exits 0.
    let status = faultd.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "faultd should exit 0 on SIGTERM, got {status:?}; its output:\n{}",
        faultd.log()
    );
    let run = inside.psql_select_1();
    assert!(
        run.answered(),
        "after faultd stopped on SIGTERM, psql inside the cgroup should work again: {run}"
    );
}
