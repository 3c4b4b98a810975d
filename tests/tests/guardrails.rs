//! Guardrails of the real faultd: a policy file's denials and limits, dry runs that leave the
//! kernel map as it was, the audit log of faultctl's calls, Abort of 1000 faults, JSON logs and
//! the socket's group.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use faultd_proto::v1::{AbortRequest, Direction, FaultState, Protocol};
use faultd_tests::api::{cgroup_target, drop_fault, list_faults, list_leases, with_ttl};
use faultd_tests::bpf::map_entries;
use faultd_tests::{Cgroup, Faultctl, Faultd, FaultdOptions, TempDir};
use tonic::Code;

const RULES_MAP: &str = "FAULTD_RULES";

fn faultd_with(args: &[&str]) -> FaultdOptions {
    FaultdOptions {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..FaultdOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn a_policy_file_denies_protected_ports_the_host_and_what_exceeds_its_limits() {
    let dir = TempDir::new("faultd-test-policy");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "max_active_faults = 2\nmax_ttl = \"10m\"\n[protected_ports]\ndns = false\nredis = [6379]\n",
    )
    .unwrap();
    let faultd = Faultd::start_with(faultd_with(&["--policy", policy.to_str().unwrap()])).await;
    let cgroup = Cgroup::new();
    let faultctl = Faultctl::new(&faultd);
    let inject = |port: &str, extra: &[&str]| {
        let mut args = vec!["inject", "drop", "--cgroup", cgroup.path(), "--port", port];
        args.extend_from_slice(extra);
        if !extra.contains(&"--ttl") {
            args.extend_from_slice(&["--ttl", "30s"]);
        }
        faultctl.run(&args)
    };

    for (port, rule) in [
        ("22", "protected_ports.ssh"),
        ("10250", "protected_ports.kubelet"),
        ("6443", "protected_ports.kube-apiserver"),
        ("6379", "protected_ports.redis"),
        ("6000-6400", "protected_ports.redis"),
    ] {
        let run = inject(port, &[]);
        assert!(!run.success(), "`{}` should be denied: {run}", run.command);
        assert!(
            run.stderr().contains(rule) && run.stderr().contains("PERMISSION_DENIED"),
            "`{}` should say PERMISSION_DENIED and name the rule {rule}: {run}",
            run.command
        );
    }
    // The file removed the dns rule.
    inject("53", &["--protocol", "udp"]).assert_success();
    let run = faultctl.run(&["inject", "drop", "--host", "--port", "8080", "--ttl", "30s"]);
    assert!(
        run.stderr().contains("allow_host_scope") && run.stderr().contains("PERMISSION_DENIED"),
        "the host scope is off unless the policy allows it: {run}"
    );
    let run = inject("8081", &["--ttl", "11m"]);
    assert!(
        run.stderr().contains("max_ttl") && run.stderr().contains("INVALID_ARGUMENT"),
        "a ttl above the policy's max_ttl is refused naming it: {run}"
    );
    inject("8082", &[]).assert_success();
    let run = inject("8083", &[]);
    assert!(
        run.stderr().contains("max_active_faults") && run.stderr().contains("RESOURCE_EXHAUSTED"),
        "a third fault exceeds max_active_faults = 2: {run}"
    );

    let held = list_faults(&mut faultd.faults()).await;
    assert_eq!(
        held.len(),
        2,
        "only the two allowed faults are in force: {held:?}"
    );
    let entries = map_entries(faultd.pid(), RULES_MAP);
    // 53/udp both directions + 8082/tcp+udp both directions.
    assert_eq!(entries.len(), 2 + 4, "kernel map: {entries:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn faultd_refuses_to_start_with_a_broken_policy_file() {
    let dir = TempDir::new("faultd-test-policy");
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "max_tll = \"1h\"\n").unwrap();
    let out = std::process::Command::new(faultd_tests::faultd::binary("FAULTD_BIN", "faultd"))
        .args(["--policy", policy.to_str().unwrap(), "--socket"])
        .arg(dir.join("s.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "faultd started with a misspelt key: {stderr}"
    );
    assert!(
        stderr.contains("max_tll") && stderr.contains(policy.to_str().unwrap()),
        "the error should name the file and the key: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn a_dry_run_resolves_the_target_and_leaves_the_kernel_map_as_it_was() {
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let mut faults = faultd.faults();
    let faultctl = Faultctl::new(&faultd);
    // One fault in force, so the map is not trivially empty.
    faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                cgroup_target(&cgroup, &[5432], Protocol::Tcp, Direction::Egress),
            ),
            Duration::from_secs(60),
        ))
        .await
        .unwrap();
    let map_before = map_entries(faultd.pid(), RULES_MAP);
    let faults_before = list_faults(&mut faults).await;
    let leases_before = list_leases(&mut faultd.leases()).await;
    assert_eq!(map_before.len(), 1, "{map_before:?}");

    let run = faultctl.run(&[
        "--output",
        "json",
        "inject",
        "drop",
        "--cgroup",
        cgroup.path(),
        "--port",
        "6379,7000-7001",
        "--ttl",
        "30s",
        "--dry-run",
    ]);
    run.assert_success();
    let planned: serde_json::Value = serde_json::from_str(&run.stdout())
        .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}): {run}", run.command));
    assert_eq!(planned["state"], "DRY_RUN", "{planned}");
    assert_eq!(
        planned["resolved"]["cgroupPath"],
        cgroup.path(),
        "{planned}"
    );
    assert_eq!(planned["resolved"]["cgroupId"], cgroup.id(), "{planned}");
    // 3 ports x tcp+udp x both directions.
    assert_eq!(planned["resolved"]["rules"], 12, "{planned}");
    assert_eq!(planned["mechanism"], "cgroup_skb", "{planned}");

    let text = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        cgroup.path(),
        "--port",
        "6379",
        "--ttl",
        "30s",
        "--dry-run",
    ]);
    text.assert_success();
    for words in [
        "nothing was changed",
        cgroup.path(),
        &cgroup.id().to_string(),
        "cgroup_skb",
    ] {
        assert!(
            text.stdout().contains(words),
            "the dry run should show {words:?}: {text}"
        );
    }
    // A dry run that overlaps the fault in force is refused like the real thing.
    let overlap = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        cgroup.path(),
        "--port",
        "5432",
        "--protocol",
        "tcp",
        "--direction",
        "egress",
        "--ttl",
        "30s",
        "--dry-run",
    ]);
    assert!(
        !overlap.success() && overlap.stderr().contains("ALREADY_EXISTS"),
        "{overlap}"
    );

    assert_eq!(
        map_entries(faultd.pid(), RULES_MAP),
        map_before,
        "a dry run changed the kernel map"
    );
    let faults_after = list_faults(&mut faults).await;
    assert_eq!(
        faults_after.iter().map(|f| &f.id).collect::<Vec<_>>(),
        faults_before.iter().map(|f| &f.id).collect::<Vec<_>>()
    );
    let leases_after = list_leases(&mut faultd.leases()).await;
    assert_eq!(
        leases_after.iter().map(|l| &l.id).collect::<Vec<_>>(),
        leases_before.iter().map(|l| &l.id).collect::<Vec<_>>(),
        "a dry run granted a lease"
    );
}

/// Runs faultctl and returns its pid along with its output.
fn faultctl_with_pid(faultctl: &Faultctl, args: &[&str]) -> (u32, std::process::Output) {
    let mut cmd = faultctl.command();
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("starting faultctl");
    let pid = child.id();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("faultctl");
    (pid, out)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn the_audit_log_has_one_line_per_mutating_call_with_the_callers_credentials() {
    let dir = TempDir::new("faultd-test-audit");
    let audit = dir.join("audit.jsonl");
    let mut faultd =
        Faultd::start_with(faultd_with(&["--audit-log", audit.to_str().unwrap()])).await;
    let cgroup = Cgroup::new();
    let faultctl = Faultctl::new(&faultd);

    let mut calls = Vec::new();
    let mut run = |args: &[&str], call: &str| {
        let (pid, out) = faultctl_with_pid(&faultctl, args);
        calls.push((call.to_string(), pid, out.status.success()));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let lease = run(
        &["--output", "json", "lease", "grant", "--ttl", "30s"],
        "LeaseService/Grant",
    );
    let lease: serde_json::Value = serde_json::from_str(&lease).unwrap();
    let lease = lease["id"].as_str().unwrap().to_string();
    run(&["lease", "renew", &lease], "LeaseService/Renew");
    let fault = run(
        &[
            "--output",
            "json",
            "inject",
            "drop",
            "--cgroup",
            cgroup.path(),
            "--port",
            "6379",
            "--lease",
            &lease,
        ],
        "FaultService/Inject",
    );
    let fault: serde_json::Value = serde_json::from_str(&fault).unwrap();
    let fault = fault["id"].as_str().unwrap().to_string();
    run(
        &[
            "inject",
            "drop",
            "--cgroup",
            cgroup.path(),
            "--port",
            "22",
            "--ttl",
            "5s",
        ],
        "FaultService/Inject",
    );
    run(
        &[
            "inject",
            "drop",
            "--cgroup",
            cgroup.path(),
            "--port",
            "7000",
            "--ttl",
            "5s",
            "--dry-run",
        ],
        "FaultService/Inject",
    );
    run(&["list"], "");
    run(&["rm", &fault], "FaultService/Remove");
    run(&["lease", "revoke", &lease], "LeaseService/Revoke");
    run(&["abort"], "FaultService/Abort");
    calls.retain(|(call, _, _)| !call.is_empty());

    let status = faultd.terminate();
    assert!(status.is_some_and(|s| s.success()), "{}", faultd.log());
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // One line per call, in order, then faultd's own shutdown.
    assert_eq!(lines.len(), calls.len() + 1, "{text}");
    for ((call, pid, ok), line) in calls.iter().zip(&lines) {
        assert_eq!(line["call"], format!("faultd.v1.{call}"), "{line}");
        assert_eq!(line["peer"]["transport"], "unix", "{line}");
        assert_eq!(line["peer"]["uid"], 0, "{line}");
        assert_eq!(line["peer"]["gid"], 0, "{line}");
        assert_eq!(
            line["peer"]["pid"], *pid,
            "the line should name faultctl's pid: {line}"
        );
        assert_eq!(line["code"] == "OK", *ok, "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
    assert_eq!(lines[2]["result"]["faultId"], fault.as_str());
    assert_eq!(lines[3]["code"], "PERMISSION_DENIED");
    assert!(
        lines[3]["message"]
            .as_str()
            .unwrap()
            .contains("protected_ports.ssh")
    );
    assert_eq!(lines[4]["request"]["dryRun"], true);
    assert_eq!(
        lines[6]["result"]["revertedFaultIds"],
        serde_json::json!([])
    );
    let last = lines.last().unwrap();
    assert_eq!(last["call"], "shutdown", "{last}");
    assert_eq!(last["peer"]["cause"], "SIGTERM", "{last}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn abort_reverts_1000_faults_at_once() {
    const FAULTS: u32 = 1000;
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let mut faults = faultd.faults();
    // The default policy holds 1000 faults: each on a port of its own, under a private lease.
    for port in 0..FAULTS {
        let port = 20_000 + port as u16;
        faults
            .inject(with_ttl(
                drop_fault(
                    100.0,
                    cgroup_target(&cgroup, &[port], Protocol::Tcp, Direction::Egress),
                ),
                Duration::from_secs(300),
            ))
            .await
            .unwrap_or_else(|s| panic!("fault on port {port}: {s:?}"));
    }
    let status = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                cgroup_target(&cgroup, &[30_000], Protocol::Tcp, Direction::Egress),
            ),
            Duration::from_secs(300),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_active_faults"), "{status:?}");
    assert_eq!(map_entries(faultd.pid(), RULES_MAP).len(), FAULTS as usize);

    let started = Instant::now();
    let abort = faults.abort(AbortRequest {}).await.unwrap().into_inner();
    let round_trip = started.elapsed();
    let took = faultd::api::convert::duration_from_proto(&abort.took.unwrap()).unwrap();
    eprintln!(
        "MEASURE abort_1000_faults agent={:.2}ms round_trip={:.2}ms",
        took.as_secs_f64() * 1e3,
        round_trip.as_secs_f64() * 1e3
    );
    assert_eq!(abort.reverted_fault_ids.len(), FAULTS as usize);
    assert_eq!(abort.revoked_lease_ids.len(), FAULTS as usize);
    let left = map_entries(faultd.pid(), RULES_MAP);
    assert!(left.is_empty(), "Abort left {} kernel entries", left.len());
    assert!(list_faults(&mut faults).await.is_empty());
    assert!(list_leases(&mut faultd.leases()).await.is_empty());
    // Abort is not a shutdown: faultd takes new faults at once.
    let fault = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                cgroup_target(&cgroup, &[20_000], Protocol::Tcp, Direction::Egress),
            ),
            Duration::from_secs(5),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fault.state(), FaultState::Active);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn json_logs_and_the_sockets_group() {
    // nogroup exists on every Debian system.
    let faultd = Faultd::start_with(faultd_with(&[
        "--log-format",
        "json",
        "--socket-group",
        "nogroup",
    ]))
    .await;
    let meta = std::fs::metadata(faultd.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), 65534, "the socket should belong to nogroup");
    let log = faultd.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("--log-format json wrote a line that is not JSON ({e}): {line}")
        });
        assert!(
            value["level"].is_string() && value["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        log.contains("\"policy\":\"max_ttl=1h"),
        "the policy in force is logged: {log}"
    );
}
