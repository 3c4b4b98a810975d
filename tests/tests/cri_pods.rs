//! Pods that a real containerd created through the CRI, as the kubelet asks for them (cgroupfs
//! driver, CNI bridge networking, see `faultd_tests::cri`), faulted by faultd on the host with
//! faultctl as a user runs it. Real clients in the pods feel each fault; a sibling pod on the
//! node does not.

use std::path::Path;
use std::time::Duration;

use faultd_tests::api::{list_faults, remove};
use faultd_tests::clients::{ConnClient, at};
use faultd_tests::cri::{Container, Node, Pod};
use faultd_tests::kube::Qos;
use faultd_tests::process::{blocking, unix_ns};
use faultd_tests::servers::{POSTGRES_PORT, REDIS_PORT};
use faultd_tests::workload::stats::median;
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

/// A container's Redis client loop: PING every `interval_ms` on one redis-py client.
fn redis_loop(
    node: &mut Node,
    pod: &Pod,
    name: &str,
    attempt: u32,
    redis: &Pod,
    interval_ms: u32,
) -> (Container, ConnClient) {
    let port = REDIS_PORT.to_string();
    let interval = interval_ms.to_string();
    node.client_container(
        pod,
        name,
        attempt,
        "redis-loop",
        &[&redis.ip, &port, &interval],
    )
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

fn is_timeout(event: &Value) -> bool {
    event["type"].as_str().unwrap_or("").contains("Timeout")
}

/// The sibling's loop keeps answering over `window` after `since`.
fn assert_untouched(sibling: &mut ConnClient, since: i128, window: Duration, what: &str) {
    let events = sibling.events_after(since, window);
    assert!(
        events.len() >= 5 && events.iter().all(|e| e["event"] == "pong"),
        "{what}: the sibling pod is not targeted and its loop should keep getting PONG: {events:?}"
    );
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

/// PONG round trips (ms) a loop reports over `window` after `since`.
fn pong_ms(client: &mut ConnClient, since: i128, window: Duration) -> Vec<f64> {
    client
        .events_after(since, window)
        .iter()
        .filter(|e| e["event"] == "pong")
        .filter_map(|e| e["took_ns"].as_f64())
        .map(|ns| ns / 1e6)
        .collect()
}

/// The delay the tests add: well above the loops' own round trip (under 1 ms), short enough
/// for 50 samples in a few seconds.
const DELAY_MS: f64 = 30.0;

/// Injects `faultctl inject delay ARGS… --latency 30ms` and asserts, from the loops' own PONG
/// timings over 3 s before and after, that the client pod's median round trip rises by the
/// delay (± 2 ms) and the sibling's does not move (± 2 ms).
fn assert_delay_adds_to_the_client_only(pods: &mut RedisPods, args: &[&str], what: &str) {
    let window = Duration::from_secs(3);
    let before = unix_ns();
    let (client_before, sibling_before) = (
        pong_ms(&mut pods.client, before, window),
        pong_ms(&mut pods.sibling, before, Duration::ZERO),
    );
    let latency = format!("{DELAY_MS}ms");
    let mut all = vec!["delay"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--latency", &latency, "--ttl", "60s"]);
    let injected = inject(&pods.faultctl, &all);
    // Samples of PINGs sent after the fault was in place.
    let settled = injected + 200_000_000;
    std::thread::sleep(Duration::from_millis(200));
    let (client_after, sibling_after) = (
        pong_ms(&mut pods.client, settled, window),
        pong_ms(&mut pods.sibling, settled, Duration::ZERO),
    );
    for (name, samples) in [
        ("client before", &client_before),
        ("client after", &client_after),
        ("sibling before", &sibling_before),
        ("sibling after", &sibling_after),
    ] {
        assert!(
            samples.len() >= 30,
            "{what}: {name}: too few PONGs to measure ({})",
            samples.len()
        );
    }
    let added = median(&client_after) - median(&client_before);
    let sibling_added = median(&sibling_after) - median(&sibling_before);
    eprintln!(
        "MEASURE {what}: requested_ms={DELAY_MS} client_median_before_ms={:.2} \
         client_median_after_ms={:.2} added_ms={added:.2} sibling_added_ms={sibling_added:.2} \
         samples={}/{}",
        median(&client_before),
        median(&client_after),
        client_before.len(),
        client_after.len()
    );
    assert!(
        (added - DELAY_MS).abs() <= 2.0,
        "{what}: a {DELAY_MS} ms delay should add {DELAY_MS} ms ± 2 ms to the client pod's median \
         Redis round trip, added {added:.2} ms"
    );
    assert!(
        sibling_added.abs() <= 2.0,
        "{what}: the sibling pod's median round trip should not move, moved {sibling_added:.2} ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, umoci, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn delay_on_a_pod_adds_its_latency_to_the_pods_redis_round_trips_only() {
    let _serial = SERIAL.lock().await;
    let mut pods = RedisPods::start(20).await;
    let uid = pods.client_pod.uid.clone();
    assert_delay_adds_to_the_client_only(
        &mut pods,
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

    assert_delay_adds_to_the_client_only(
        &mut pods,
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
