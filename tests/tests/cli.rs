//! faultctl as a user runs it: inject, list, list as JSON, rm, and a bad flag.

use faultd_tests::api::list_faults;
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::{Faultctl, RedisScene, fd_probe};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_injects_lists_and_removes_a_drop() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    let faultctl = Faultctl::new(faultd);
    let port = REDIS_PORT.to_string();

    let inject = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        cgroup.path(),
        "--port",
        &port,
        "--ttl",
        "30s",
    ]);
    inject.assert_success();
    let held = list_faults(&mut faults).await;
    assert_eq!(
        held.len(),
        1,
        "after `{}` faultd should hold one fault: {held:?}",
        inject.command
    );
    let id = held[0].id.clone();
    assert!(
        inject.stdout().contains(&id),
        "`{}` should print the id of the fault it injected ({id}): {inject}",
        inject.command
    );
    let run = inside.redis_ping();
    assert!(
        run.timed_out(),
        "after `faultctl inject drop --port {port}`, redis-cli inside the cgroup should hang: {run}"
    );

    let list = faultctl.run(&["list"]);
    list.assert_success();
    assert!(
        list.stdout().contains(&id),
        "`{}` should show fault {id}: {list}",
        list.command
    );

    let json = faultctl.run(&["--output", "json", "list"]);
    json.assert_success();
    let value: serde_json::Value = serde_json::from_str(&json.stdout())
        .unwrap_or_else(|e| panic!("`{}` is not JSON ({e}): {json}", json.command));
    assert!(
        contains_string(&value, &id),
        "`{}` parses as JSON but does not mention fault {id}: {value}",
        json.command
    );

    let rm = faultctl.run(&["rm", &id]);
    rm.assert_success();
    let left = list_faults(&mut faults).await;
    assert!(
        left.is_empty(),
        "after `{}` faultd still holds {left:?}",
        rm.command
    );
    let run = inside.redis_ping();
    assert!(
        run.answered(),
        "after `faultctl rm {id}`, redis-cli inside the cgroup should get PONG: {run}"
    );

    let bad = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        cgroup.path(),
        "--port",
        &port,
        "--ttl",
        "30s",
        "--percent",
        "150",
    ]);
    assert!(
        !bad.success(),
        "`{}` should fail: a percent above 100 is invalid; {bad}",
        bad.command
    );
    assert!(
        bad.stderr().contains("percent"),
        "`{}` should say what is wrong with percent: {bad}",
        bad.command
    );
    let left = list_faults(&mut faults).await;
    assert!(
        left.is_empty(),
        "a rejected `faultctl inject` changed faultd's faults: {left:?}"
    );
}

fn contains_string(value: &serde_json::Value, needle: &str) -> bool {
    match value {
        serde_json::Value::String(s) => s == needle,
        serde_json::Value::Array(items) => items.iter().any(|v| contains_string(v, needle)),
        serde_json::Value::Object(map) => map.values().any(|v| contains_string(v, needle)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_targets_a_process_by_pid() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let faultctl = Faultctl::new(faultd);
    // A long-running process of the workload: the user knows its pid, not its cgroup.
    let mut cmd = inside.command("sleep");
    cmd.arg("60");
    let workload = faultd_tests::process::ChildGuard::spawn("sleep in the workload", &mut cmd);
    // fd-probe joins the cgroup before it execs: wait until the kernel shows it there.
    let joined = faultd_tests::process::poll(std::time::Duration::from_secs(2), || {
        cgroup.procs().contains(&workload.id()).then_some(())
    });
    assert!(
        joined.is_some(),
        "the workload process {} never showed up in cgroup {}",
        workload.id(),
        cgroup.path()
    );
    let pid = workload.id().to_string();

    let port = REDIS_PORT.to_string();
    let inject = faultctl.run(&[
        "--output", "json", "inject", "drop", "--pid", &pid, "--port", &port, "--ttl", "30s",
    ]);
    inject.assert_success();
    let fault: serde_json::Value = serde_json::from_str(&inject.stdout())
        .unwrap_or_else(|e| panic!("`{}` printed no JSON: {e}", inject.command));
    assert_eq!(
        fault["resolved"]["cgroupPath"],
        cgroup.path(),
        "--pid {pid} should resolve to the process's cgroup: {fault}"
    );
    let blocked = inside.redis_ping();
    assert!(
        !blocked.answered(),
        "a drop on the cgroup of pid {pid} did not block redis-cli in that cgroup: {blocked}"
    );
    let unknown = faultctl.run(&[
        "inject",
        "drop",
        "--pid",
        "999999999",
        "--port",
        &port,
        "--ttl",
        "30s",
    ]);
    assert!(!unknown.success(), "a pid that does not exist was accepted");
    assert!(
        unknown.stderr().contains("fault.target.pid.pid")
            && unknown.stderr().contains("INVALID_ARGUMENT"),
        "an unknown pid should be INVALID_ARGUMENT naming fault.target.pid.pid, got {}",
        unknown.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_rejects_and_resets_connections() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let faultctl = Faultctl::new(faultd);
    let port = REDIS_PORT.to_string();
    let scope = ["--cgroup", cgroup.path(), "--port", &port, "--ttl", "30s"];

    let reject = faultctl.run(&[&["inject", "reject"][..], &scope].concat());
    reject.assert_success();
    let run = inside.redis_ping();
    assert!(
        !run.answered() && format!("{}{}", run.stdout, run.stderr).contains("Connection refused"),
        "after `{}`, redis-cli inside should be refused: {run}",
        reject.command
    );
    let list = faultctl.run(&["list"]);
    list.assert_success();
    let row = list
        .stdout()
        .lines()
        .find(|l| l.contains("reject"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        row.contains("tcp egress ports 6379"),
        "`faultctl list` should show the reject as applied (TCP connects): {list}"
    );
    // A second connection fault on the same port overlaps: refused, with the reason.
    let overlap = faultctl.run(&[&["inject", "reset"][..], &scope].concat());
    assert!(
        !overlap.success() && overlap.stderr().contains("ALREADY_EXISTS"),
        "`{}` should be refused as overlapping: {overlap}",
        overlap.command
    );
    let abort = faultctl.run(&["abort"]);
    abort.assert_success();
    let reset = faultctl.run(&[&["inject", "reset"][..], &scope].concat());
    reset.assert_success();
    let detail = faultctl.run(&["--output", "json", "list"]);
    let json: serde_json::Value = serde_json::from_str(&detail.stdout())
        .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}): {detail}", detail.command));
    assert_eq!(
        json["faults"][0]["mechanism"], "sock_diag+cgroup_connect",
        "{json}"
    );
    assert!(json["faults"][0]["reset"].is_object(), "{json}");

    let zero = faultctl.run(&[&["inject", "reset", "--after-bytes", "0"][..], &scope].concat());
    assert_eq!(
        zero.output.status.code(),
        Some(2),
        "`{}` should be a usage error: {zero}",
        zero.command
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_takes_peers_and_pods_and_answers_health_probes() {
    let mut scene = RedisScene::start(fd_probe!()).await;
    let faultctl = Faultctl::new(&scene.faultd);
    let port = REDIS_PORT.to_string();
    let cgroup = scene.cgroup.path().to_string();

    let health = faultctl.run(&["health"]);
    health.assert_success();
    assert!(
        health.stdout().contains("SERVING"),
        "`faultctl health` should say SERVING: {health}"
    );

    let inject = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        &cgroup,
        "--port",
        &port,
        "--peer",
        "127.0.0.2",
        "--peer",
        "fd00::/8",
        "--exclude-peer",
        "fd00::1",
        "--ttl",
        "30s",
    ]);
    inject.assert_success();
    let list = faultctl.run(&["list"]);
    list.assert_success();
    assert!(
        list.stdout()
            .contains("peers 127.0.0.2/32,fd00::/8 except fd00::1/128"),
        "`faultctl list` should show the peers: {list}"
    );
    let run = scene.inside.redis_ping();
    assert!(
        run.answered(),
        "a drop limited to 127.0.0.2 and fd00::/8 leaves 127.0.0.1 alone: {run}"
    );

    let bad = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        &cgroup,
        "--port",
        "5432",
        "--exclude-peer",
        "10.0.0.1/8",
        "--ttl",
        "30s",
    ]);
    assert!(
        !bad.success() && bad.stderr().contains("fault.target.exclude_peers[0]"),
        "a CIDR with host bits should be refused naming the field: {bad}"
    );
    let unknown = faultctl.run(&[
        "inject",
        "drop",
        "--pod",
        "00000000-0000-4000-8000-000000000000",
        "--port",
        "5432",
        "--ttl",
        "30s",
    ]);
    assert!(
        !unknown.success() && unknown.stderr().contains("kubepods"),
        "an unknown pod should be refused naming where faultd looked: {unknown}"
    );

    scene.faultd.terminate();
    let health = faultctl.run(&["health"]);
    assert!(
        !health.success(),
        "`faultctl health` must fail when faultd is gone: {health}"
    );
}
