//! faultd run as `deploy/faultd.yaml` declares it — a privileged container with the node's pid
//! and network namespaces, its volumes, args and probes, read from the manifest itself — by a
//! real containerd through the CRI, beside pods that containerd created (see
//! `faultd_tests::cri`). `faultctl` runs inside the faultd container, as `kubectl exec` runs it;
//! the probes run as the kubelet runs them (ExecSync). Real clients in a pod feel each fault; a
//! sibling pod does not.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use faultd_tests::bpf::BpfObjects;
use faultd_tests::clients::at;
use faultd_tests::cri::loops::{
    assert_delay_adds_to_the_client_only, assert_untouched, is_timeout,
};
use faultd_tests::cri::scenarios::{self, InContainer, RedisPods};
use faultd_tests::cri::{Container, FaultdManifest, FaultdPod, Node};
use faultd_tests::faultd::binary;
use faultd_tests::process::{output, poll, signal, unix_ns};
use serde_json::Value;

/// One rig at a time: each starts its own containerd, and the delay test measures time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const RECOVERY_BOUND_MS: f64 = 1000.0;

/// The Redis pods (see `scenarios::RedisPods`) and the faultd DaemonSet's pod with its
/// container. Field order is drop order: the loops, then the node (which stops faultd with
/// SIGTERM before the sandboxes go).
struct Rig {
    pods: RedisPods,
    faultd_pod: FaultdPod,
    agent: Container,
    node: Node,
}

fn python() -> PathBuf {
    PathBuf::from(std::env::var_os("FAULTD_TEST_PYTHON").unwrap_or_else(|| {
        panic!("set FAULTD_TEST_PYTHON to the test venv's python (cargo xtask test does)")
    }))
}

/// The DaemonSet's pod and its started container on `node`.
fn faultd_on(node: &mut Node) -> (FaultdPod, Container) {
    faultd_on_run_by(node, &[])
}

/// As `faultd_on`, with faultd run by `runner`.
fn faultd_on_run_by(node: &mut Node, runner: &[&str]) -> (FaultdPod, Container) {
    let manifest = FaultdManifest::from_manifest(&python());
    assert!(
        manifest.host_pid() && manifest.host_network() && manifest.privileged(),
        "the DaemonSet runs faultd privileged with hostPID and hostNetwork"
    );
    let faultd_pod = node.faultd_pod(&manifest);
    let agent = start_agent_run_by(node, &faultd_pod, 0, runner);
    (faultd_pod, agent)
}

impl Rig {
    fn start(interval_ms: u32) -> Rig {
        let mut node = Node::start();
        let pods = RedisPods::start(&mut node, interval_ms);
        let (faultd_pod, agent) = faultd_on(&mut node);
        Rig {
            pods,
            faultd_pod,
            agent,
            node,
        }
    }

    fn inject(&self, args: &[&str]) -> (String, i128) {
        scenarios::inject(&InContainer(&self.agent), &self.node, args)
    }

    /// `faultctl inject drop --pod <client pod> --port 6379` in the faultd container; returns
    /// (the fault's id, when the inject started) once the client pod's loop timed out.
    fn drop_client_redis(&mut self) -> (String, i128) {
        let uid = self.pods.client_pod.uid.clone();
        let (id, injected) =
            self.inject(&["drop", "--pod", &uid, "--port", "6379", "--ttl", "60s"]);
        let what = "a drop on the client pod, from faultctl in the faultd container";
        let error = self.pods.client.sees("error", injected, what);
        assert!(is_timeout(&error), "{what}: {error}");
        (id, injected)
    }

    fn remove(&self, id: &str) -> i128 {
        scenarios::remove(&InContainer(&self.agent), &self.node, id)
    }
}

/// `faultctl ARGS…` in the faultd container (ExecSync, as `kubectl exec`); its stdout.
fn faultctl_in(node: &Node, agent: &Container, args: &[&str]) -> String {
    use scenarios::FaultctlAt;
    InContainer(agent).faultctl(node, args)
}

/// Starts the DaemonSet's container (restart `attempt`) and waits until its readiness probe
/// passes, then runs its liveness probe once; both as the kubelet runs them (ExecSync).
fn start_agent(node: &mut Node, faultd_pod: &FaultdPod, attempt: u32) -> Container {
    start_agent_run_by(node, faultd_pod, attempt, &[])
}

/// As `start_agent`, with faultd run by `runner` (see `Node::faultd_container_run_by`).
fn start_agent_run_by(
    node: &mut Node,
    faultd_pod: &FaultdPod,
    attempt: u32,
    runner: &[&str],
) -> Container {
    let agent = node.faultd_container_run_by(faultd_pod, attempt, runner);
    let started = Instant::now();
    let (readiness, timeout) = faultd_pod.manifest.probe("readinessProbe");
    let readiness: Vec<&str> = readiness.iter().map(String::as_str).collect();
    let mut last = None;
    let ready = poll(READY_TIMEOUT, || {
        let exec = node.exec(&agent, &readiness, Duration::from_secs(timeout));
        let ok = exec.exit_code == 0;
        last = Some(exec);
        ok.then_some(())
    });
    assert!(
        ready.is_some(),
        "the faultd container's readiness probe `{}` did not pass within {READY_TIMEOUT:?}: \
         {last:?}\nfaultd's log:\n{}",
        readiness.join(" "),
        node.log_of(&agent)
    );
    eprintln!(
        "MEASURE faultd container attempt {attempt} ready after {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let (liveness, timeout) = faultd_pod.manifest.probe("livenessProbe");
    let liveness: Vec<&str> = liveness.iter().map(String::as_str).collect();
    node.exec(&agent, &liveness, Duration::from_secs(timeout))
        .assert_success("the faultd container's liveness probe");
    agent
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_drops_a_pods_redis_calls_not_its_siblings() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start(100);
    let (id, injected) = rig.drop_client_redis();
    // A node-local client reaches the same faultd through the hostPath socket.
    let socket = rig.faultd_pod.run_dir.join("faultd.sock");
    let mut list = Command::new(binary("FAULTCTL_BIN", "faultctl"));
    list.arg("--socket")
        .arg(&socket)
        .args(["--output", "json", "list"]);
    let out = output(&mut list);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&id),
        "faultctl on the node, on the hostPath socket {}, should list fault {id}: {out:?}",
        socket.display()
    );
    assert_untouched(
        &mut rig.pods.sibling,
        injected,
        Duration::from_secs(2),
        "drop",
    );
    let removed = rig.remove(&id);
    rig.pods
        .client
        .sees("pong", removed, "after `faultctl rm` the client pod");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_delays_a_pods_redis_round_trips_not_its_siblings() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start(20);
    let uid = rig.pods.client_pod.uid.clone();
    let mut ids = Vec::new();
    let Rig {
        pods, node, agent, ..
    } = &mut rig;
    // NFQUEUE on this kernel: its `-m cgroup --path` names the pod's cgroup as faultd's cgroup
    // namespace, inside the container, sees it.
    assert_delay_adds_to_the_client_only(
        &mut pods.client,
        &mut pods.sibling,
        |args| {
            let mut all = args.to_vec();
            all.extend_from_slice(&["--mechanism", "nfqueue"]);
            let (id, started) = scenarios::inject(&InContainer(agent), node, &all);
            ids.push(id);
            started
        },
        &["--pod", &uid, "--port", "6379", "--direction", "egress"],
        "delay --pod from the faultd container",
    );
    for id in ids {
        rig.remove(&id);
    }
}

/// The lines of `iptables-save -t mangle` in the network namespace of `pid` (the host's if
/// None) that name a chain of faultd instance `instance`.
fn rules_of(instance: &str, pid: Option<u32>) -> Vec<String> {
    let mut cmd = Command::new("nsenter");
    if let Some(pid) = pid {
        cmd.arg(format!("--net=/proc/{pid}/ns/net"));
    }
    cmd.args(["iptables-save", "-t", "mangle"]);
    let out = output(&mut cmd);
    assert!(out.status.success(), "iptables-save: {out:?}");
    let chain = format!("FAULTD-{instance}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&chain))
        .map(String::from)
        .collect()
}

/// The BPF objects a faultd held are gone (within 2 s) now that it is `how` (killed, stopped).
fn assert_bpf_gone(owned: &BpfObjects, how: &str) {
    let gone = poll(Duration::from_secs(2), || {
        owned.still_present().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "the {how} faultd's BPF objects should be gone: {:?}",
        owned.still_present()
    );
}

/// The instance id the faultd container wrote in its state directory (the hostPath).
fn instance_in(faultd_pod: &FaultdPod) -> String {
    let path = faultd_pod.run_dir.join("instance");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn sigkill_of_the_faultd_container_lifts_its_faults_and_the_next_one_sweeps_the_rest() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start(100);
    let uid = rig.pods.client_pod.uid.clone();
    rig.drop_client_redis();
    // NFQUEUE rules outlive a killed faultd (fail-open through --queue-bypass): the next one
    // must sweep them.
    rig.inject(&[
        "delay",
        "--pod",
        &uid,
        "--port",
        "5432",
        "--direction",
        "egress",
        "--latency",
        "30ms",
        "--mechanism",
        "nfqueue",
        "--ttl",
        "60s",
    ]);
    let old = instance_in(&rig.faultd_pod);
    let pod_pid = Some(rig.pods.app.pid);
    assert!(
        !rules_of(&old, pod_pid).is_empty(),
        "the delay should have put faultd {old}'s NFQUEUE rules in the client pod's netns"
    );
    let old_pid = rig.agent.pid;
    let owned = BpfObjects::owned_by(old_pid);
    assert!(
        !owned.progs.objects.is_empty() && !owned.links.objects.is_empty(),
        "the faultd container (pid {old_pid}) should hold its programs and links: {owned:?}"
    );

    signal(old_pid, libc::SIGKILL);
    let killed = unix_ns();
    let pong = rig
        .pods
        .client
        .sees("pong", killed, "after SIGKILL of the faultd container");
    let back_ms = (at(&pong) - killed) as f64 / 1e6;
    eprintln!("MEASURE cri_faultd_sigkill_traffic_back_ms={back_ms:.1}");
    assert!(
        back_ms <= RECOVERY_BOUND_MS,
        "the client pod's Redis calls should work within {RECOVERY_BOUND_MS} ms of the faultd \
         container's SIGKILL, took {back_ms:.1} ms"
    );
    assert_bpf_gone(&owned, "killed");

    // As the kubelet restarts it: the same pod, the same hostPath state directory.
    rig.node.remove_container(&rig.agent, Duration::ZERO);
    rig.agent = start_agent(&mut rig.node, &rig.faultd_pod, 1);
    let new = instance_in(&rig.faultd_pod);
    assert_ne!(
        old, new,
        "the new faultd container registers an instance of its own"
    );
    let swept = poll(Duration::from_secs(5), || {
        (rules_of(&old, pod_pid).is_empty() && rules_of(&old, None).is_empty()).then_some(())
    });
    assert!(
        swept.is_some(),
        "the new faultd container should sweep the NFQUEUE rules the killed one left in the \
         client pod's netns: {:?}\nits log:\n{}",
        rules_of(&old, pod_pid),
        rig.node.log_of(&rig.agent)
    );
    let list = faultctl_in(&rig.node, &rig.agent, &["--output", "json", "list"]);
    let list: Value = serde_json::from_str(&list)
        .unwrap_or_else(|e| panic!("`faultctl list` printed no JSON ({e}): {list}"));
    assert!(
        list.as_array().is_some_and(|a| a.is_empty())
            || list["faults"].as_array().is_some_and(|a| a.is_empty()),
        "the new faultd holds no fault: {list}"
    );
    let started = unix_ns();
    assert_untouched(
        &mut rig.pods.client,
        started,
        Duration::from_secs(1),
        "after the restart",
    );

    // Stopped as the kubelet stops it (SIGTERM): nothing of either agent remains.
    let new_pid = rig.agent.pid;
    let owned = BpfObjects::owned_by(new_pid);
    rig.node
        .remove_container(&rig.agent, Duration::from_secs(10));
    for instance in [&old, &new] {
        for pid in [pod_pid, None] {
            let left = rules_of(instance, pid);
            assert!(left.is_empty(), "faultd {instance} left rules: {left:?}");
        }
    }
    assert_bpf_gone(&owned, "stopped");
    for pid in [old_pid, new_pid] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "faultd (pid {pid}) should be gone"
        );
    }
}

/// A node of the test's own with the DaemonSet's faultd on it, for a shared scenario (the
/// node's teardown stops faultd with SIGTERM before the sandboxes go).
fn node_with_faultd() -> (Container, FaultdPod, Node) {
    let mut node = Node::start();
    let (faultd_pod, agent) = faultd_on(&mut node);
    (agent, faultd_pod, node)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_rejects_and_resets_a_pods_postgres() {
    let _serial = SERIAL.lock().await;
    let (agent, _pod, mut node) = node_with_faultd();
    scenarios::reject_and_reset_postgres(&mut node, &InContainer(&agent));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_hits_one_container_of_a_two_container_pod() {
    let _serial = SERIAL.lock().await;
    let (agent, _pod, mut node) = node_with_faultd();
    scenarios::container_fault_hits_one_of_two(&mut node, &InContainer(&agent));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_faults_a_container_restarted_in_a_faulted_pod() {
    let _serial = SERIAL.lock().await;
    let (agent, _pod, mut node) = node_with_faultd();
    scenarios::restarted_container_is_faulted(&mut node, &InContainer(&agent));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_drops_and_delays_on_a_pods_interface_by_netns() {
    let _serial = SERIAL.lock().await;
    let (agent, _pod, mut node) = node_with_faultd();
    scenarios::netns_drop_and_delay(&mut node, &InContainer(&agent));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_resets_a_pods_postgres_session_by_netns() {
    let _serial = SERIAL.lock().await;
    let (agent, _pod, mut node) = node_with_faultd();
    scenarios::netns_reset_postgres(&mut node, &InContainer(&agent));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn faultd_as_the_daemonset_drops_by_the_pid_of_a_pods_container() {
    let _serial = SERIAL.lock().await;
    let (agent, _pod, mut node) = node_with_faultd();
    scenarios::drop_by_pid(&mut node, &InContainer(&agent));
}

/// The inode of a process's cgroup namespace.
fn cgroup_namespace(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/proc/{pid}/ns/cgroup");
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, containerd, runc, CNI plugins, buildah, BPF, cgroup v2 and NFQUEUE; `cargo xtask test` runs it as root"]
async fn faultd_in_a_cgroup_namespace_of_its_own_delays_a_pods_redis_round_trips() {
    let _serial = SERIAL.lock().await;
    let mut node = Node::start();
    let mut pods = RedisPods::start(&mut node, 20);
    // As Kubernetes on cgroup v2 runs containers (containerd 1.6 here leaves a privileged one
    // in the node's): the container's own cgroup is the root of faultd's cgroup namespace, the
    // pods' cgroups lie outside it.
    let (_faultd_pod, agent) = faultd_on_run_by(&mut node, &["unshare", "--cgroup"]);
    assert_ne!(
        cgroup_namespace(agent.pid),
        cgroup_namespace(std::process::id()),
        "faultd should run in a cgroup namespace of its own, not the node's"
    );
    let uid = pods.client_pod.uid.clone();
    let cgroup = pods
        .client_pod
        .cgroup_dir
        .strip_prefix(node.cgroup_root())
        .expect("the pod's cgroup is below the node's cgroup root")
        .display()
        .to_string();
    for (scope, what) in [
        (
            ["--pod", uid.as_str()],
            "delay --pod from faultd in a cgroup namespace of its own",
        ),
        (
            ["--cgroup", cgroup.as_str()],
            "delay --cgroup from faultd in a cgroup namespace of its own",
        ),
    ] {
        let mut ids = Vec::new();
        let mut args = scope.to_vec();
        args.extend_from_slice(&["--port", "6379", "--direction", "egress"]);
        assert_delay_adds_to_the_client_only(
            &mut pods.client,
            &mut pods.sibling,
            |args| {
                let mut all = args.to_vec();
                all.extend_from_slice(&["--mechanism", "nfqueue"]);
                let (id, started) = scenarios::inject(&InContainer(&agent), &node, &all);
                ids.push(id);
                started
            },
            &args,
            what,
        );
        for id in ids {
            scenarios::remove(&InContainer(&agent), &node, &id);
        }
    }
}
