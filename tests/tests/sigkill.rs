//! SIGKILL of faultd lifts its faults at once (fd-owned links), leaves no BPF object behind,
//! and a new faultd starts on the same state directory.

use std::time::Duration;

use faultd_proto::v1::{Direction, Protocol, RemoveRequest};
use faultd_tests::api::{cgroup_target, drop_fault, with_ttl};
use faultd_tests::bpf::BpfObjects;
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::timeline;
use faultd_tests::{Faultd, FaultdOptions, RedisScene, TempDir, fd_probe};

const RECOVERY_BOUND_MS: f64 = 1000.0;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn sigkill_of_faultd_restores_traffic_and_leaves_nothing() {
    let state = TempDir::new("faultd-test-state");
    let options = FaultdOptions::with_state_dir(state.path());
    let mut scene = RedisScene::start_with(fd_probe!(), options.clone()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &mut scene;
    let mut faults = faultd.faults();

    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    faults
        .inject(with_ttl(drop_fault(100.0, target), Duration::from_secs(60)))
        .await
        .unwrap_or_else(|s| panic!("Inject of a 100% drop on {REDIS_PORT} failed: {s:?}"));

    let owned = BpfObjects::owned_by(faultd.pid());
    eprintln!("faultd pid {} holds {owned:?}", faultd.pid());
    let progs = owned.progs.names();
    assert!(
        progs.contains("faultd_egress") && progs.contains("faultd_ingress"),
        "bpftool should list faultd_egress and faultd_ingress held by faultd (pid {}) while a fault is active; it lists {owned:?}",
        faultd.pid()
    );
    assert!(
        !owned.links.objects.is_empty(),
        "bpftool lists no link held by faultd (pid {}): {owned:?}",
        faultd.pid()
    );
    let maps = owned.maps.names();
    for map in ["FAULTD_RULES", "FAULTD_SCOPES", "FAULTD_COUNTERS"] {
        assert!(
            maps.contains(map),
            "bpftool lists no map {map} held by faultd (pid {}): {owned:?}",
            faultd.pid()
        );
    }

    let probe = inside.tcp_probe(
        &format!("127.0.0.1:{REDIS_PORT}"),
        Duration::from_millis(5),
        Duration::from_millis(20),
        Duration::from_millis(2500),
    );
    faultd_tests::process::blocking(|| std::thread::sleep(Duration::from_millis(500)));
    let killed_at = faultd.kill();
    let attempts = probe.finish();

    let early = timeline::ok_before(&attempts, killed_at);
    assert!(
        early.is_empty(),
        "Redis was reachable from inside the cgroup before faultd was killed: {early:?}"
    );
    let first_ok = timeline::first_ok_after(&attempts, killed_at).unwrap_or_else(|| {
        panic!("Redis was still unreachable from inside the cgroup 2 s after faultd was SIGKILLed")
    });
    let recovery_ms = (first_ok.at - killed_at) as f64 / 1e6;
    eprintln!("MEASURE sigkill_recovery_ms={recovery_ms:.1}");
    assert!(
        recovery_ms <= RECOVERY_BOUND_MS,
        "after SIGKILL of faultd, Redis stayed unreachable for {recovery_ms:.1} ms (bound {RECOVERY_BOUND_MS} ms)"
    );

    let left = owned.left_after(Duration::from_secs(3));
    assert!(
        left.is_none(),
        "after SIGKILL of faultd these BPF objects it held are still in the kernel: {left:?}"
    );

    // A new faultd on the same state directory starts and works.
    let faultd = Faultd::start_with(options).await;
    let mut faults = faultd.faults();
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let fault = faults
        .inject(with_ttl(drop_fault(100.0, target), Duration::from_secs(60)))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "Inject on the restarted faultd failed: {s:?}\n{}",
                faultd.log()
            )
        })
        .into_inner();
    let run = inside.redis_ping();
    assert!(
        run.timed_out(),
        "with the restarted faultd's drop on {REDIS_PORT}, redis-cli inside should hang: {run}"
    );
    faults
        .remove(RemoveRequest {
            id: fault.id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("Remove on the restarted faultd failed: {s:?}"));
    let run = inside.redis_ping();
    assert!(
        run.answered(),
        "after Remove on the restarted faultd, redis-cli inside should get PONG: {run}"
    );
}
