//! Pods that a real containerd created through the CRI, as the kubelet asks for them (cgroupfs
//! driver, CNI bridge networking, see `faultd_tests::cri`), faulted by faultd on the host with
//! faultctl as a user runs it. Real clients in the pods feel each fault; a sibling pod on the
//! node does not.

use std::path::Path;
use std::time::Duration;

use faultd_tests::api::list_faults;
use faultd_tests::clients::at;
use faultd_tests::cri::loops::{
    assert_delay_adds_to_the_client_only, assert_untouched, is_timeout,
};
use faultd_tests::cri::scenarios::{self, RedisPods};
use faultd_tests::cri::{Container, Node};
use faultd_tests::process::{blocking, unix_ns};
use faultd_tests::{Faultctl, Faultd, FaultdOptions, Workload, fd_probe};

/// One rig at a time: each starts its own containerd, and the delay test measures time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn faultd_on(node: &Node) -> Faultd {
    Faultd::start_with(FaultdOptions {
        extra_args: vec![
            "--cgroup-root".into(),
            node.cgroup_root().display().to_string(),
        ],
        ..Default::default()
    })
    .await
}

/// `faultctl inject ARGS…`; panics unless it succeeds. Returns when it was started (unix ns):
/// a fault may act before faultctl returns.
fn inject(faultctl: &Faultctl, args: &[&str]) -> i128 {
    let mut all = vec!["inject"];
    all.extend_from_slice(args);
    let started = unix_ns();
    faultctl.run(&all).assert_success();
    started
}

/// The Redis pods (see `scenarios::RedisPods`) on a node of the test's own, and faultd on the
/// host. Field order is drop order: the loops, faultd, then the node.
struct Rig {
    pods: RedisPods,
    faultctl: Faultctl,
    faultd: Faultd,
    _node: Node,
}

impl Rig {
    async fn start(interval_ms: u32) -> Rig {
        let mut node = Node::start();
        let pods = RedisPods::start(&mut node, interval_ms);
        let faultd = faultd_on(&node).await;
        Rig {
            pods,
            faultctl: Faultctl::new(&faultd),
            faultd,
            _node: node,
        }
    }
}

/// A node of the test's own and faultd on the host, for a shared scenario.
async fn node_and_faultd() -> (Node, Faultd, Faultctl) {
    let node = Node::start();
    let faultd = faultd_on(&node).await;
    let faultctl = Faultctl::new(&faultd);
    (node, faultd, faultctl)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn drop_on_a_pod_black_holes_its_redis_calls_until_the_lease_ends() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start(100).await;
    let pods = &mut rig.pods;
    let ttl = Duration::from_secs(4);
    let injected = inject(
        &rig.faultctl,
        &[
            "drop",
            "--pod",
            &pods.client_pod.uid,
            "--port",
            "6379",
            "--ttl",
            "4s",
        ],
    );
    let what = "a drop on the client pod should black-hole its Redis calls";
    let error = pods.client.sees("error", injected, what);
    assert!(is_timeout(&error), "{what}: {error}");
    assert_untouched(&mut pods.sibling, injected, Duration::from_secs(2), "drop");

    let what = "after the lease ends the client pod should get PONG again";
    let pong = pods.client.sees("pong", injected, what);
    let after = (at(&pong) - injected) as f64 / 1e9;
    assert!(
        after >= ttl.as_secs_f64() - 0.1,
        "{what}, not before: PONG {after:.2} s after the inject: {:?}",
        pods.client.seen().iter().rev().take(10).collect::<Vec<_>>()
    );
    assert!(
        list_faults(&mut rig.faultd.faults()).await.is_empty(),
        "the fault should be gone with its lease"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn reject_and_reset_on_a_pod_refuse_postgres_and_reset_tears_down_its_session() {
    let _serial = SERIAL.lock().await;
    let (mut node, _faultd, faultctl) = node_and_faultd().await;
    scenarios::reject_and_reset_postgres(&mut node, &faultctl);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn a_container_fault_hits_one_container_of_a_two_container_pod() {
    let _serial = SERIAL.lock().await;
    let (mut node, _faultd, faultctl) = node_and_faultd().await;
    scenarios::container_fault_hits_one_of_two(&mut node, &faultctl);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn a_container_restarted_in_a_faulted_pod_is_faulted_without_a_new_inject() {
    let _serial = SERIAL.lock().await;
    let (mut node, _faultd, faultctl) = node_and_faultd().await;
    scenarios::restarted_container_is_faulted(&mut node, &faultctl);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn delay_on_a_pod_adds_its_latency_to_the_pods_redis_round_trips_only() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start(20).await;
    let uid = rig.pods.client_pod.uid.clone();
    let Rig { pods, faultctl, .. } = &mut rig;
    assert_delay_adds_to_the_client_only(
        &mut pods.client,
        &mut pods.sibling,
        |args| inject(faultctl, args),
        &["--pod", &uid, "--port", "6379", "--direction", "egress"],
        "delay --pod",
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn drop_and_delay_on_a_pods_interface_by_netns() {
    let _serial = SERIAL.lock().await;
    let (mut node, _faultd, faultctl) = node_and_faultd().await;
    scenarios::netns_drop_and_delay(&mut node, &faultctl);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn reset_on_a_pods_interface_by_netns_tears_down_its_postgres_session_and_refuses_reconnects()
{
    let _serial = SERIAL.lock().await;
    let (mut node, _faultd, faultctl) = node_and_faultd().await;
    scenarios::netns_reset_postgres(&mut node, &faultctl);
}

/// A command run in `container`'s cgroup and network namespace, as `kubectl exec` runs one.
fn exec_in(container: &Container, label: &str) -> Workload {
    let netns = format!("/proc/{}/ns/net", container.pid);
    Workload::in_namespace_path(fd_probe!(), &container.cgroup_dir, Path::new(&netns), label)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn bandwidth_on_a_pod_paces_its_large_get_only() {
    const VALUE: usize = 1 << 20;
    const KEY: &str = "faultd:big";
    let _serial = SERIAL.lock().await;
    let rig = Rig::start(100).await;
    let pods = &rig.pods;
    let inside = exec_in(&pods.app, "exec in the client pod");
    let neighbour = exec_in(&pods.sibling_app, "exec in the sibling pod");
    let redis = pods.redis.ip.clone();
    blocking(|| neighbour.redis_set_at(&redis, KEY, VALUE));
    let (bytes, base) = blocking(|| inside.redis_get_at(&redis, KEY));
    assert!(
        bytes >= VALUE as u64 && base < 0.5,
        "baseline GET: {bytes} bytes in {base:.3} s"
    );

    inject(
        &rig.faultctl,
        &[
            "bandwidth",
            "--pod",
            &pods.client_pod.uid,
            "--port",
            "6379",
            "--rate",
            "256KiB/s",
            "--ttl",
            "60s",
        ],
    );
    let (bytes, paced) = blocking(|| inside.redis_get_at(&redis, KEY));
    let (_, sibling) = blocking(|| neighbour.redis_get_at(&redis, KEY));
    eprintln!(
        "MEASURE bandwidth --pod 256KiB/s: 1 MiB GET in the pod {paced:.3} s (error {:+.1} %), \
         in the sibling {sibling:.4} s, baseline {base:.4} s",
        (paced - 4.0) / 4.0 * 100.0
    );
    assert!(bytes >= VALUE as u64, "the paced GET carried {bytes} bytes");
    assert!(
        (3.6..=4.4).contains(&paced),
        "at 256 KiB/s a GET of 1 MiB in the client pod took {paced:.3} s (want 4 s ± 10%)"
    );
    assert!(
        sibling < 0.5,
        "in the sibling pod the same GET took {sibling:.3} s: it must not be paced"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn drop_by_the_pid_of_a_pods_container_under_a_cgroup_root() {
    let _serial = SERIAL.lock().await;
    let (mut node, _faultd, faultctl) = node_and_faultd().await;
    scenarios::drop_by_pid(&mut node, &faultctl);
}
