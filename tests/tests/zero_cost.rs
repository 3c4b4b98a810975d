//! Traffic no fault targets runs none of faultd's programs: they are attached only at the
//! cgroups that hold faults, and leave with the last fault there. Counted with the kernel's own
//! run statistics of each program faultd holds.

use std::collections::BTreeMap;
use std::time::Duration;

use faultd_proto::v1::{Direction, Protocol};
use faultd_tests::api::{cgroup_target, drop_fault, remove, with_ttl};
use faultd_tests::bpf::{BpfObjects, RunStats, Runs, prog_stats, runs_between};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::{Cgroup, Faultd, RedisScene, Workload, fd_probe};

/// A port no test traffic uses: faults on it match nothing.
const UNUSED_PORT: u16 = 11_999;

/// What faultd's programs ran while `traffic` ran, by program name (only those that ran).
fn runs_during(faultd: &Faultd, traffic: impl FnOnce()) -> BTreeMap<String, Runs> {
    let before = prog_stats(faultd.pid());
    traffic();
    runs_between(&before, &prog_stats(faultd.pid()))
}

/// 200 Redis PINGs from `client`, every one answered.
fn pings(client: &Workload) {
    let run = client.redis_rtt(200, Duration::from_millis(1));
    assert_eq!(
        run.failures(),
        0,
        "every PING of {} should be answered: {:?}",
        client.label(),
        run.rtts().len()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn traffic_no_fault_targets_runs_none_of_faultds_programs() {
    let _stats = RunStats::enable();
    let mut scene = RedisScene::start(fd_probe!()).await;
    let sibling = Cgroup::new();
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &mut scene;
    let next_door = Workload::inside(fd_probe!(), &sibling, netns);
    let mut faults = faultd.faults();

    // No fault: nothing runs, nothing is attached.
    let ran = runs_during(faultd, || pings(inside));
    assert!(
        ran.is_empty(),
        "with no fault, 200 Redis PINGs from a client ran faultd's programs: {ran:?}"
    );
    let owned = BpfObjects::owned_by(faultd.pid());
    assert!(
        owned.links.objects.is_empty(),
        "with no fault faultd should hold no BPF link (nothing attached anywhere); it holds {owned:?}"
    );

    // A fault on a sibling cgroup: the sibling is faulted, the client's traffic runs nothing.
    let target = cgroup_target(&sibling, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let sibling_fault = faults
        .inject(with_ttl(
            drop_fault(100.0, target),
            Duration::from_secs(120),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop on the sibling cgroup failed: {s:?}"))
        .into_inner();
    let ran = runs_during(faultd, || pings(inside));
    assert!(
        ran.is_empty(),
        "with a fault on a sibling cgroup only, the client's 200 PINGs ran faultd's programs: {ran:?}"
    );
    let run = next_door.redis_ping();
    assert!(
        run.timed_out(),
        "the sibling cgroup holds a 100% drop on {REDIS_PORT}: its redis-cli should hang: {run}"
    );

    // A fault on the client's own cgroup that matches none of its traffic: the programs run
    // for it (on the cheap path) and the traffic passes.
    let target = cgroup_target(
        cgroup,
        &[UNUSED_PORT],
        Protocol::Unspecified,
        Direction::Unspecified,
    );
    let own_fault = faults
        .inject(with_ttl(
            drop_fault(100.0, target),
            Duration::from_secs(120),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop on port {UNUSED_PORT} failed: {s:?}"))
        .into_inner();
    let ran = runs_during(faultd, || pings(inside));
    for program in ["faultd_egress", "faultd_ingress"] {
        let runs = ran.get(program).copied().unwrap_or_default();
        assert!(
            runs.count > 0,
            "with a fault on the client's own cgroup, {program} should run for its packets: {ran:?}"
        );
        eprintln!(
            "MEASURE {program}_miss_ns_per_run={:.1} runs={}",
            runs.ns_per_run(),
            runs.count
        );
    }

    // The last faults go: nothing runs again, for the client or the sibling.
    remove(&mut faults, &own_fault.id).await;
    remove(&mut faults, &sibling_fault.id).await;
    let ran = runs_during(faultd, || {
        pings(inside);
        pings(&next_door);
    });
    assert!(
        ran.is_empty(),
        "after the last fault was removed, PINGs from the client and the sibling ran faultd's programs: {ran:?}"
    );
    let owned = BpfObjects::owned_by(faultd.pid());
    assert!(
        owned.links.objects.is_empty(),
        "after the last fault was removed faultd should hold no BPF link; it holds {owned:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faults_cover_cgroups_below_them_wherever_the_programs_move() {
    let mut scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup: pod,
        faultd,
        netns,
        ..
    } = &mut scene;
    let container = pod.child();
    let in_pod = Workload::inside(fd_probe!(), pod, netns);
    let in_container = Workload::inside(fd_probe!(), &container, netns);
    let mut faults = faultd.faults();

    // A drop on the inner cgroup: its client hangs, the outer cgroup's answers.
    let target = cgroup_target(&container, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let inner = faults
        .inject(with_ttl(
            drop_fault(100.0, target),
            Duration::from_secs(120),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject on the inner cgroup failed: {s:?}"))
        .into_inner();
    let hangs = |client: &Workload, when: &str| {
        let run = client.redis_ping();
        assert!(
            run.timed_out(),
            "{when}: redis-cli in {} should hang behind the drop on {REDIS_PORT}: {run}",
            client.label()
        );
    };
    let answers = |client: &Workload, when: &str| {
        let run = client.redis_ping();
        assert!(
            run.answered(),
            "{when}: redis-cli in {} should get PONG: {run}",
            client.label()
        );
    };
    hangs(&in_container, "drop on the inner cgroup");
    answers(&in_pod, "drop on the inner cgroup");

    // A fault on the outer cgroup (another port): the programs move up to it; the inner
    // cgroup's drop holds throughout.
    let target = cgroup_target(pod, &[UNUSED_PORT], Protocol::Tcp, Direction::Egress);
    let outer = faults
        .inject(with_ttl(
            drop_fault(100.0, target),
            Duration::from_secs(120),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject on the outer cgroup failed: {s:?}"))
        .into_inner();
    hangs(&in_container, "faults on the inner and the outer cgroup");
    answers(&in_pod, "faults on the inner and the outer cgroup");

    // A cgroup created below the faulted one after the Inject (a restarted container) is
    // faulted too.
    let restarted = container.child();
    let in_restarted = Workload::inside(fd_probe!(), &restarted, netns);
    hangs(
        &in_restarted,
        "a cgroup created below the faulted one after the Inject",
    );

    // The outer fault goes: the programs move back down; the inner drop still holds.
    remove(&mut faults, &outer.id).await;
    hangs(&in_container, "the outer fault removed");
    hangs(&in_restarted, "the outer fault removed");
    answers(&in_pod, "the outer fault removed");

    remove(&mut faults, &inner.id).await;
    answers(&in_container, "every fault removed");
    answers(&in_restarted, "every fault removed");
    let owned = BpfObjects::owned_by(faultd.pid());
    assert!(
        owned.links.objects.is_empty(),
        "after the last fault was removed faultd should hold no BPF link; it holds {owned:?}"
    );
    drop((in_restarted, in_container, in_pod));
    drop(restarted);
    drop(container);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn sigkill_with_faults_on_several_cgroups_leaves_nothing_attached() {
    let mut scene = RedisScene::start(fd_probe!()).await;
    let others = [Cgroup::new(), Cgroup::new()];
    let RedisScene { cgroup, faultd, .. } = &mut scene;
    let mut faults = faultd.faults();
    for (i, target) in std::iter::once(&*cgroup).chain(&others).enumerate() {
        let target = cgroup_target(target, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
        faults
            .inject(with_ttl(
                drop_fault(100.0, target),
                Duration::from_secs(120),
            ))
            .await
            .unwrap_or_else(|s| panic!("Inject {i} failed: {s:?}"));
    }
    let owned = BpfObjects::owned_by(faultd.pid());
    // Two packet programs and, where the kernel has them, two connect programs per cgroup.
    assert!(
        owned.links.objects.len() >= 6,
        "faults on three cgroups should hold links at each of them; faultd holds {owned:?}"
    );
    let attached_before = attached_programs(&owned);
    assert!(
        !attached_before.is_empty(),
        "bpftool cgroup tree shows none of faultd's programs attached: {owned:?}"
    );
    faultd.kill();
    let left = owned.left_after(Duration::from_secs(3));
    assert!(
        left.is_none(),
        "after SIGKILL of faultd these BPF objects it held are still in the kernel: {left:?}"
    );
    let attached_after = attached_programs(&owned);
    assert!(
        attached_after.is_empty(),
        "after SIGKILL of faultd, bpftool cgroup tree still shows its programs attached: {attached_after:?}"
    );
}

/// Where `bpftool cgroup tree` shows one of the programs in `owned` attached: (cgroup, id).
fn attached_programs(owned: &BpfObjects) -> Vec<(String, u64)> {
    let ids = owned.progs.ids();
    let root = faultd_tests::cgroup::cgroup2_root();
    let out = faultd_tests::process::run_ok(
        std::process::Command::new("bpftool")
            .args(["-j", "cgroup", "tree"])
            .arg(root),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool cgroup tree: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let mut found = Vec::new();
    for cgroup in json.as_array().into_iter().flatten() {
        let path = cgroup["cgroup"].as_str().unwrap_or_default();
        for program in cgroup["programs"].as_array().into_iter().flatten() {
            if let Some(id) = program["id"].as_u64()
                && ids.contains(&id)
            {
                found.push((path.to_owned(), id));
            }
        }
    }
    found
}
