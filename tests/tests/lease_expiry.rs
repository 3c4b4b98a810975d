//! A fault under a lease nobody renews holds until the lease deadline, and not a moment longer.

use std::time::Duration;

use faultd_proto::v1::{Direction, Protocol, TimeToLiveRequest};
use faultd_tests::api::{
    cgroup_target, drop_fault, grant, lease_deadline, list_faults, under_lease,
};
use faultd_tests::process::unix_ns;
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::timeline;
use faultd_tests::{RedisScene, fd_probe};

const TTL: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(20);
/// How soon after the deadline traffic must flow again.
const RECOVERY_BOUND_MS: f64 = 100.0;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn fault_ends_at_its_lease_deadline() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();

    let lease = grant(&mut leases, TTL).await;
    let deadline = lease_deadline(&lease);
    // Protocol TCP, direction unspecified (both): the default a user gets.
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Unspecified);
    let fault = faults
        .inject(under_lease(drop_fault(100.0, target), &lease.id))
        .await
        .unwrap_or_else(|s| panic!("Inject under lease {} failed: {s:?}", lease.id))
        .into_inner();
    assert_eq!(fault.lease_id, lease.id, "Inject answered {fault:?}");

    let left = Duration::from_nanos((deadline - unix_ns()).max(0) as u64);
    assert!(
        left >= Duration::from_millis(500),
        "only {left:?} of the {TTL:?} lease were left after Grant and Inject: too little to observe the fault"
    );
    let probe = inside.tcp_probe(
        &format!("127.0.0.1:{REDIS_PORT}"),
        PROBE_INTERVAL,
        PROBE_TIMEOUT,
        left + Duration::from_millis(700),
    );
    let attempts = probe.finish();

    let before: Vec<_> = attempts.iter().filter(|a| a.at < deadline).collect();
    assert!(
        before.len() >= 10,
        "only {} connection attempts before the deadline: the probe did not run long enough to show the fault",
        before.len()
    );
    let early = timeline::ok_before(&attempts, deadline);
    assert!(
        early.is_empty(),
        "a client inside the cgroup reached Redis {:.3} ms before the lease deadline: the fault was lifted early \
         (attempts around the deadline: {})",
        early
            .first()
            .map(|a| (deadline - a.at) as f64 / 1e6)
            .unwrap_or(0.0),
        timeline::around(&attempts, deadline, 60)
    );
    let first_ok = timeline::first_ok_after(&attempts, deadline).unwrap_or_else(|| {
        panic!(
            "no connection to Redis succeeded within 700 ms after the lease deadline (attempts after it: {})",
            timeline::around(&attempts, deadline + 350_000_000, 350)
        )
    });
    let recovery_ms = (first_ok.at - deadline) as f64 / 1e6;
    eprintln!("MEASURE expiry_recovery_ms={recovery_ms:.1}");
    assert!(
        recovery_ms <= RECOVERY_BOUND_MS,
        "Redis became reachable {recovery_ms:.1} ms after the lease deadline (bound {RECOVERY_BOUND_MS} ms); \
         attempts around the deadline: {}",
        timeline::around(&attempts, deadline, 120)
    );

    let left_over = list_faults(&mut faults).await;
    assert!(
        left_over.is_empty(),
        "after the lease expired, List should show no fault, got {left_over:?}"
    );
    let status = leases
        .time_to_live(TimeToLiveRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .expect_err("TimeToLive of an expired lease should be NOT_FOUND");
    assert_eq!(
        status.code(),
        tonic::Code::NotFound,
        "TimeToLive of the expired lease: {status:?}"
    );
}
