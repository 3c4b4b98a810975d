//! The pod scenarios, written once and run against either faultd: on the host with
//! `faultctl` as a node user runs it (`cri_pods`), or as the DaemonSet's container with
//! `faultctl` run inside it as `kubectl exec` runs it (`cri_faultd`). Real clients in the pods
//! feel each fault; a sibling pod does not.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::loops::{
    assert_delay_adds_to_the_client_only, assert_untouched, is_timeout, redis_loop,
};
use super::{Container, Node, Pod};
use crate::clients::ConnClient;
use crate::faultd::Faultctl;
use crate::kube::Qos;
use crate::process::unix_ns;
use crate::servers::POSTGRES_PORT;

/// Where `faultctl` runs.
pub trait FaultctlAt {
    /// `faultctl ARGS…`; panics unless it succeeds. Its stdout.
    fn faultctl(&self, node: &Node, args: &[&str]) -> String;
}

/// On the node, against the socket of a faultd on the host.
impl FaultctlAt for Faultctl {
    fn faultctl(&self, _node: &Node, args: &[&str]) -> String {
        let out = self.run(args);
        out.assert_success();
        out.stdout()
    }
}

/// In the faultd container, as `kubectl exec` (ExecSync).
pub struct InContainer<'a>(pub &'a Container);

impl FaultctlAt for InContainer<'_> {
    fn faultctl(&self, node: &Node, args: &[&str]) -> String {
        let mut cmd = vec!["faultctl"];
        cmd.extend_from_slice(args);
        let exec = node.exec(self.0, &cmd, Duration::from_secs(30));
        exec.assert_success(&format!("`{}` in the faultd container", cmd.join(" ")));
        exec.stdout
    }
}

/// `faultctl --output json inject ARGS…`: the fault's id and when the call started (unix ns;
/// a fault may act before faultctl returns).
pub fn inject(at: &dyn FaultctlAt, node: &Node, args: &[&str]) -> (String, i128) {
    let mut all = vec!["--output", "json", "inject"];
    all.extend_from_slice(args);
    let started = unix_ns();
    let stdout = at.faultctl(node, &all);
    let fault: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("`faultctl inject` printed no JSON ({e}): {stdout}"));
    let id = fault["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {fault}"))
        .to_owned();
    (id, started)
}

/// `faultctl rm ID`; returns when it is done.
pub fn remove(at: &dyn FaultctlAt, node: &Node, id: &str) -> i128 {
    at.faultctl(node, &["rm", id]);
    unix_ns()
}

/// A Redis pod, a client pod and a sibling pod whose containers run a Redis client loop (PING
/// every `interval_ms`); both loops have answered. Field order is drop order: the loops first.
pub struct RedisPods {
    pub client: ConnClient,
    pub sibling: ConnClient,
    pub client_pod: Pod,
    /// The client pod's container.
    pub app: Container,
    /// The sibling pod's container.
    pub sibling_app: Container,
    pub redis: Pod,
}

impl RedisPods {
    pub fn start(node: &mut Node, interval_ms: u32) -> RedisPods {
        let redis = node.redis_pod();
        let client_pod = node.pod("client", Qos::BestEffort);
        let sibling_pod = node.pod("sibling", Qos::BestEffort);
        let (app, mut client) = redis_loop(node, &client_pod, "loop", 0, &redis, interval_ms);
        let (sibling_app, mut sibling) =
            redis_loop(node, &sibling_pod, "loop", 0, &redis, interval_ms);
        client.sees("pong", 0, "before any fault, the client pod");
        sibling.sees("pong", 0, "before any fault, the sibling pod");
        RedisPods {
            client,
            sibling,
            client_pod,
            app,
            sibling_app,
            redis,
        }
    }
}

/// A one-shot `pg-connect` container in `pod`: its outcome ("connected" or "error").
fn pg_connect(node: &mut Node, pod: &Pod, name: &str, postgres: &Pod) -> Value {
    let port = POSTGRES_PORT.to_string();
    let (_, mut events) = node.client_container(pod, name, 0, "pg-connect", &[&postgres.ip, &port]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Some(event) = events.next(deadline.saturating_duration_since(Instant::now())) {
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

/// Issue test 2: `reject --pod` on 5432 refuses the pod's new PostgreSQL connections (the
/// sibling connects; the pod's live session stays); `reset --pod` tears its live session down
/// and refuses reconnects, while the sibling's session survives.
pub fn reject_and_reset_postgres(node: &mut Node, at: &dyn FaultctlAt) {
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
    let mut session = hold(node, &client_pod);
    let mut sibling_session = hold(node, &sibling_pod);

    let pod_args = ["--pod", &client_pod.uid, "--port", &port, "--ttl", "60s"];
    let mut args = vec!["reject"];
    args.extend_from_slice(&pod_args);
    let (id, injected) = inject(at, node, &args);
    let outcome = pg_connect(node, &client_pod, "connect-under-reject", &postgres);
    assert_refused(&outcome, "reject");
    let outcome = pg_connect(node, &sibling_pod, "connect-under-reject", &postgres);
    assert_eq!(
        outcome["event"], "connected",
        "reject: the sibling pod is not targeted and connects: {outcome}"
    );
    let events = session.events_after(injected, Duration::from_millis(500));
    assert!(
        events.is_empty(),
        "reject leaves the pod's live session alone: {events:?}"
    );
    remove(at, node, &id);

    let mut args = vec!["reset"];
    args.extend_from_slice(&pod_args);
    let (id, injected) = inject(at, node, &args);
    let what = "reset on the pod should tear down its live PostgreSQL session";
    let error = session.sees("error", injected, what);
    let after_ms = (crate::clients::at(&error) - injected) as f64 / 1e6;
    eprintln!("MEASURE cri_reset_session_error_after_inject_ms={after_ms:.1}: {error}");
    let outcome = pg_connect(node, &client_pod, "connect-under-reset", &postgres);
    assert_refused(&outcome, "reset");
    let events = sibling_session.events_after(injected, Duration::from_secs(1));
    assert!(
        events.is_empty(),
        "reset: the sibling pod's session survives: {events:?}"
    );
    remove(at, node, &id);
}

/// Issue test 4: `drop --container` hits one container of a two-container pod, not the other.
pub fn container_fault_hits_one_of_two(node: &mut Node, at: &dyn FaultctlAt) {
    let redis = node.redis_pod();
    let pod = node.pod("client", Qos::Burstable);
    let (first, mut first_loop) = redis_loop(node, &pod, "first", 0, &redis, 100);
    let (_, mut second_loop) = redis_loop(node, &pod, "second", 0, &redis, 100);
    first_loop.sees("pong", 0, "before any fault, the first container");
    second_loop.sees("pong", 0, "before any fault, the second container");

    let (id, injected) = inject(
        at,
        node,
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
    let removed = remove(at, node, &id);
    first_loop.sees("pong", removed, "after Remove the first container");
}

/// Issue test 5: a container stopped and created anew in a faulted pod's sandbox (as the
/// kubelet restarts one) is faulted from its start, without a new Inject.
pub fn restarted_container_is_faulted(node: &mut Node, at: &dyn FaultctlAt) {
    let mut pods = RedisPods::start(node, 100);
    let (id, injected) = inject(
        at,
        node,
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

    node.remove_container(&pods.app, Duration::from_secs(1));
    let started = unix_ns();
    let (restarted, mut restarted_loop) =
        redis_loop(node, &pods.client_pod, "loop", 1, &pods.redis, 100);
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
    let removed = remove(at, node, &id);
    restarted_loop.sees("pong", removed, "after Remove the restarted container");
}

/// Issue test 7: drop, then delay, by `--netns /proc/<pid>/ns/net --iface eth0` on the client
/// pod's interface; the sibling pod is untouched.
pub fn netns_drop_and_delay(node: &mut Node, at: &dyn FaultctlAt) {
    let mut pods = RedisPods::start(node, 20);
    let netns = format!("/proc/{}/ns/net", pods.app.pid);
    let (id, injected) = inject(
        at,
        node,
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
    let removed = remove(at, node, &id);
    pods.client
        .sees("pong", removed, "after Remove the client pod");

    let mut ids = Vec::new();
    assert_delay_adds_to_the_client_only(
        &mut pods.client,
        &mut pods.sibling,
        |args| {
            let (id, started) = inject(at, node, args);
            ids.push(id);
            started
        },
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
    for id in ids {
        remove(at, node, &id);
    }
}

/// Issue test 7, reset: `reset --netns /proc/<pid>/ns/net --iface eth0 --port 5432` tears
/// down the client pod's live PostgreSQL session and refuses its reconnects at once (REJECT
/// rules on the pod's eth0); the sibling pod's session survives; after Remove the pod connects.
pub fn netns_reset_postgres(node: &mut Node, at: &dyn FaultctlAt) {
    let postgres = node.postgres_pod();
    let client_pod = node.pod("client", Qos::BestEffort);
    let sibling_pod = node.pod("sibling", Qos::Burstable);
    let port = POSTGRES_PORT.to_string();
    let hold = |node: &mut Node, pod: &Pod| {
        let (container, mut session) =
            node.client_container(pod, "session", 0, "pg-hold", &[&postgres.ip, &port]);
        session.expect("ready", Duration::from_secs(15));
        (container, session)
    };
    let (app, mut session) = hold(node, &client_pod);
    let (_sibling_app, mut sibling_session) = hold(node, &sibling_pod);
    let netns = format!("/proc/{}/ns/net", app.pid);
    let (id, injected) = inject(
        at,
        node,
        &[
            "reset", "--netns", &netns, "--iface", "eth0", "--port", &port, "--ttl", "60s",
        ],
    );
    let what = "reset on the client pod's eth0 should tear down its live PostgreSQL session";
    let error = session.sees("error", injected, what);
    let after_ms = (crate::clients::at(&error) - injected) as f64 / 1e6;
    eprintln!("MEASURE cri_netns_reset_session_error_after_inject_ms={after_ms:.1}: {error}");
    let outcome = pg_connect(node, &client_pod, "connect-under-reset", &postgres);
    assert_refused(&outcome, "reset --netns --iface eth0");
    let events = sibling_session.events_after(injected, Duration::from_secs(1));
    assert!(
        events.is_empty(),
        "reset --netns: the sibling pod's session survives: {events:?}"
    );
    remove(at, node, &id);
    let outcome = pg_connect(node, &client_pod, "connect-after-reset", &postgres);
    assert_eq!(
        outcome["event"], "connected",
        "after Remove the client pod connects again: {outcome}"
    );
}

/// `drop --pid <pid of the client pod's container>`: the pid's cgroup, as `/proc/PID/cgroup`
/// names it (from the hierarchy's root), is found below faultd's `--cgroup-root` (the node's,
/// below the hierarchy's root); the pod's calls time out, the sibling's do not.
pub fn drop_by_pid(node: &mut Node, at: &dyn FaultctlAt) {
    let mut pods = RedisPods::start(node, 100);
    let pid = pods.app.pid.to_string();
    let mut all = vec!["--output", "json", "inject"];
    all.extend_from_slice(&["drop", "--pid", &pid, "--port", "6379", "--ttl", "60s"]);
    let injected = unix_ns();
    let stdout = at.faultctl(node, &all);
    let fault: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("`faultctl inject` printed no JSON ({e}): {stdout}"));
    let resolved = fault["resolved"]["cgroupPath"].as_str().unwrap_or_default();
    let expected = pods
        .app
        .cgroup_dir
        .strip_prefix(node.cgroup_root())
        .map(|p| format!("/{}", p.display()))
        .unwrap_or_default();
    assert_eq!(
        resolved, expected,
        "--pid {pid} should resolve to the container's cgroup below the cgroup root: {fault}"
    );
    let what = "a drop by the pid of the client pod's container";
    let error = pods.client.sees("error", injected, what);
    assert!(is_timeout(&error), "{what}: {error}");
    assert_untouched(&mut pods.sibling, injected, Duration::from_secs(1), what);
    let id = fault["id"].as_str().expect("an id").to_owned();
    let removed = remove(at, node, &id);
    pods.client
        .sees("pong", removed, "after Remove the client pod");
}
