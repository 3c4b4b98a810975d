//! Pods that a real containerd created through the CRI, as the kubelet asks for them (cgroupfs
//! driver, CNI bridge networking, see `faultd_tests::cri`), faulted by faultd on the host with
//! faultctl as a user runs it. Real clients in the pods feel each fault; a sibling pod on the
//! node does not.

use std::path::Path;
use std::time::Duration;

use faultd_tests::api::{list_faults, remove};
use faultd_tests::clients::{ConnClient, at};
use faultd_tests::cri::loops::{
    assert_delay_adds_to_the_client_only, assert_untouched, is_timeout, redis_loop,
};
use faultd_tests::cri::{Container, Node, Pod};
use faultd_tests::kube::Qos;
use faultd_tests::process::{blocking, unix_ns};
use faultd_tests::servers::POSTGRES_PORT;
use faultd_tests::{Faultctl, Faultd, FaultdOptions, Workload, fd_probe};
use serde_json::Value;

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

/// A Redis pod, a client pod and a sibling pod whose containers run a Redis client loop
/// (PING every `interval_ms`), on a node of the test's own, and faultd; both loops have
/// answered. Field order is drop order: the loops, faultd, then the node.
struct RedisPods {
    client: ConnClient,
    sibling: ConnClient,
    faultctl: Faultctl,
    faultd: Faultd,
    client_pod: Pod,
    /// The client pod's container.
    app: Container,
    /// The sibling pod's container.
    sibling_app: Container,
    redis: Pod,
    node: Node,
}

impl RedisPods {
    async fn start(interval_ms: u32) -> RedisPods {
        let mut node = Node::start();
        let redis = node.redis_pod();
        let client_pod = node.pod("client", Qos::BestEffort);
        let sibling_pod = node.pod("sibling", Qos::BestEffort);
        let (app, mut client) = redis_loop(&mut node, &client_pod, "loop", 0, &redis, interval_ms);
        let (sibling_app, mut sibling) =
            redis_loop(&mut node, &sibling_pod, "loop", 0, &redis, interval_ms);
        let faultd = faultd_on(&node).await;
        client.sees("pong", 0, "before any fault, the client pod");
        sibling.sees("pong", 0, "before any fault, the sibling pod");
        RedisPods {
            client,
            sibling,
            faultctl: Faultctl::new(&faultd),
            faultd,
            client_pod,
            app,
            sibling_app,
            redis,
            node,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn drop_on_a_pod_black_holes_its_redis_calls_until_the_lease_ends() {
    let _serial = SERIAL.lock().await;
    let mut pods = RedisPods::start(100).await;
    let ttl = Duration::from_secs(4);
    let injected = inject(
        &pods.faultctl,
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
        list_faults(&mut pods.faultd.faults()).await.is_empty(),
        "the fault should be gone with its lease"
    );
}

/// Removes the one fault faultd holds (Remove, as `faultctl rm` does); returns when done.
async fn remove_only_fault(faultd: &Faultd) -> i128 {
    let mut faults = faultd.faults();
    let held = list_faults(&mut faults).await;
    assert_eq!(held.len(), 1, "faultd should hold one fault: {held:?}");
    remove(&mut faults, &held[0].id).await;
    unix_ns()
}

/// A one-shot `pg-connect` container in `pod`: its outcome ("connected" or "error").
fn pg_connect(node: &mut Node, pod: &Pod, name: &str, postgres: &Pod) -> Value {
    let port = POSTGRES_PORT.to_string();
    let (_, mut events) = node.client_container(pod, name, 0, "pg-connect", &[&postgres.ip, &port]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while let Some(event) =
        events.next(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if event["event"] == "connected" || event["event"] == "error" {
            return event;
        }
    }
    panic!(
        "container {name} of pod {} reported no connect outcome within 15 s: {:?}",
        pod.name,
        events.seen()
    );
}

const ECONNREFUSED: i64 = 111;

fn assert_refused(event: &Value, what: &str) {
    // psycopg reports libpq's message, without an errno.
    let refused = event["errno"].as_i64() == Some(ECONNREFUSED)
        || event["error"]
            .as_str()
            .is_some_and(|e| e.contains("Connection refused"));
    assert!(
        event["event"] == "error" && refused,
        "{what}: a new connect from the pod should fail with ECONNREFUSED: {event}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn reject_and_reset_on_a_pod_refuse_postgres_and_reset_tears_down_its_session() {
    let _serial = SERIAL.lock().await;
    let mut node = Node::start();
    let postgres = node.postgres_pod();
    let client_pod = node.pod("client", Qos::BestEffort);
    let sibling_pod = node.pod("sibling", Qos::Burstable);
    let port = POSTGRES_PORT.to_string();
    let hold = |node: &mut Node, pod: &Pod| {
        let (_, mut session) =
            node.client_container(pod, "session", 0, "pg-hold", &[&postgres.ip, &port]);
        session.expect("ready", Duration::from_secs(15));
        session
    };
    let mut session = hold(&mut node, &client_pod);
    let mut sibling_session = hold(&mut node, &sibling_pod);
    let faultd = faultd_on(&node).await;
    let faultctl = Faultctl::new(&faultd);

    let injected = inject(
        &faultctl,
        &[
            "reject",
            "--pod",
            &client_pod.uid,
            "--port",
            &port,
            "--ttl",
            "60s",
        ],
    );
    let outcome = pg_connect(&mut node, &client_pod, "connect-under-reject", &postgres);
    assert_refused(&outcome, "reject");
    let outcome = pg_connect(&mut node, &sibling_pod, "connect-under-reject", &postgres);
    assert_eq!(
        outcome["event"], "connected",
        "reject: the sibling pod is not targeted and connects: {outcome}"
    );
    let events = session.events_after(injected, Duration::from_millis(500));
    assert!(
        events.is_empty(),
        "reject leaves the pod's live session alone: {events:?}"
    );
    remove_only_fault(&faultd).await;

    let injected = inject(
        &faultctl,
        &[
            "reset",
            "--pod",
            &client_pod.uid,
            "--port",
            &port,
            "--ttl",
            "60s",
        ],
    );
    let what = "reset on the pod should tear down its live PostgreSQL session";
    let error = session.sees("error", injected, what);
    let after_ms = (at(&error) - injected) as f64 / 1e6;
    eprintln!("MEASURE cri_reset_session_error_after_inject_ms={after_ms:.1}: {error}");
    let outcome = pg_connect(&mut node, &client_pod, "connect-under-reset", &postgres);
    assert_refused(&outcome, "reset");
    let events = sibling_session.events_after(injected, Duration::from_secs(1));
    assert!(
        events.is_empty(),
        "reset: the sibling pod's session survives: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn a_container_fault_hits_one_container_of_a_two_container_pod() {
    let _serial = SERIAL.lock().await;
    let mut node = Node::start();
    let redis = node.redis_pod();
    let pod = node.pod("client", Qos::Burstable);
    let (first, mut first_loop) = redis_loop(&mut node, &pod, "first", 0, &redis, 100);
    let (_, mut second_loop) = redis_loop(&mut node, &pod, "second", 0, &redis, 100);
    let faultd = faultd_on(&node).await;
    let faultctl = Faultctl::new(&faultd);
    first_loop.sees("pong", 0, "before any fault, the first container");
    second_loop.sees("pong", 0, "before any fault, the second container");

    let injected = inject(
        &faultctl,
        &[
            "drop",
            "--container",
            &first.id,
            "--port",
            "6379",
            "--ttl",
            "60s",
        ],
    );
    let what = "a drop on the first container should black-hole its Redis calls";
    let error = first_loop.sees("error", injected, what);
    assert!(is_timeout(&error), "{what}: {error}");
    assert_untouched(
        &mut second_loop,
        injected,
        Duration::from_secs(2),
        "the other container of the same pod",
    );
    let removed = remove_only_fault(&faultd).await;
    first_loop.sees("pong", removed, "after Remove the first container");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn a_container_restarted_in_a_faulted_pod_is_faulted_without_a_new_inject() {
    let _serial = SERIAL.lock().await;
    let mut pods = RedisPods::start(100).await;
    let injected = inject(
        &pods.faultctl,
        &[
            "drop",
            "--pod",
            &pods.client_pod.uid,
            "--port",
            "6379",
            "--ttl",
            "60s",
        ],
    );
    let error = pods.client.sees("error", injected, "a drop on the pod");
    assert!(is_timeout(&error), "a drop on the pod: {error}");

    // As the kubelet restarts a container: stop it, remove it, create attempt 1 in the sandbox.
    pods.node
        .remove_container(&pods.app, Duration::from_secs(1));
    let started = unix_ns();
    let (restarted, mut restarted_loop) = redis_loop(
        &mut pods.node,
        &pods.client_pod,
        "loop",
        1,
        &pods.redis,
        100,
    );
    assert_ne!(
        restarted.id, pods.app.id,
        "a restarted container has a new id"
    );
    let what = "the container restarted in the faulted pod should be black-holed from its start";
    let error = restarted_loop.sees("error", started, what);
    assert!(
        is_timeout(&error) && restarted_loop.seen().iter().all(|e| e["event"] != "pong"),
        "{what}: {:?}",
        restarted_loop.seen()
    );
    assert_untouched(
        &mut pods.sibling,
        started,
        Duration::from_secs(1),
        "restart",
    );
    let removed = remove_only_fault(&pods.faultd).await;
    restarted_loop.sees("pong", removed, "after Remove the restarted container");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn delay_on_a_pod_adds_its_latency_to_the_pods_redis_round_trips_only() {
    let _serial = SERIAL.lock().await;
    let mut pods = RedisPods::start(20).await;
    let uid = pods.client_pod.uid.clone();
    let RedisPods {
        client,
        sibling,
        faultctl,
        ..
    } = &mut pods;
    assert_delay_adds_to_the_client_only(
        client,
        sibling,
        |args| inject(faultctl, args),
        &["--pod", &uid, "--port", "6379", "--direction", "egress"],
        "delay --pod",
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn drop_and_delay_on_a_pods_interface_by_netns() {
    let _serial = SERIAL.lock().await;
    let mut pods = RedisPods::start(20).await;
    let netns = format!("/proc/{}/ns/net", pods.app.pid);
    let injected = inject(
        &pods.faultctl,
        &[
            "drop", "--netns", &netns, "--iface", "eth0", "--port", "6379", "--ttl", "60s",
        ],
    );
    let what = "a drop on the client pod's eth0 should black-hole its Redis calls";
    let error = pods.client.sees("error", injected, what);
    assert!(is_timeout(&error), "{what}: {error}");
    assert_untouched(
        &mut pods.sibling,
        injected,
        Duration::from_secs(2),
        "netns drop",
    );
    let removed = remove_only_fault(&pods.faultd).await;
    pods.client
        .sees("pong", removed, "after Remove the client pod");

    let RedisPods {
        client,
        sibling,
        faultctl,
        ..
    } = &mut pods;
    assert_delay_adds_to_the_client_only(
        client,
        sibling,
        |args| inject(faultctl, args),
        &[
            "--netns",
            &netns,
            "--iface",
            "eth0",
            "--port",
            "6379",
            "--direction",
            "egress",
        ],
        "delay --netns --iface eth0",
    );
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
    let pods = RedisPods::start(100).await;
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
        &pods.faultctl,
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
