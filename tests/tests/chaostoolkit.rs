//! The Chaos Toolkit extension (`integrations/chaostoolkit`) and the experiments of
//! `examples/experiments`, run as a user runs them: `chaos run` against a real faultd, real
//! Redis and PostgreSQL and the demo app, in shortened form (seconds instead of minutes).
//! Each test reads the journal `chaos run` writes and checks what the experiment claims.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use faultd_proto::v1::ListFaultsRequest;
use faultd_tests::api::{lease_deadline, list_leases};
use faultd_tests::pki::Pki;
use faultd_tests::process::{ChildGuard, describe, output, poll, signal, unix_ns, wait_timeout};
use faultd_tests::{
    Cgroup, Faultd, FaultdOptions, Postgres, RedisScene, TempDir, Workload, fd_probe,
};
use serde_json::{Value, json};

/// One experiment at a time: they measure latencies and error rates on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The venv `cargo xtask setup` installs chaostoolkit and the extension into.
fn venv_bin() -> PathBuf {
    faultd_tests::clients::venv_bin(&["chaos", "pytest"])
}

fn with_venv_path(cmd: &mut Command, bin: &Path) {
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{}:{path}", bin.display()));
}

/// Redis and PostgreSQL in a namespace of their own, the demo app inside a fresh cgroup there,
/// and a faultd of the test's own: the Redis scene with PostgreSQL added.
struct Demo {
    app: Option<ChildGuard>,
    _postgres: Postgres,
    scene: RedisScene,
    dir: TempDir,
    bin: PathBuf,
}

impl Demo {
    async fn start() -> Demo {
        let bin = venv_bin();
        let scene = RedisScene::start(fd_probe!()).await;
        let postgres = Postgres::start(&scene.netns);
        let dir = TempDir::new("faultd-test-chaos");
        let mut demo = Demo {
            app: None,
            _postgres: postgres,
            scene,
            dir,
            bin,
        };
        let mut cmd = demo
            .scene
            .inside
            .command(&demo.bin.join("python3").to_string_lossy());
        cmd.arg(repo().join("examples/experiments/demo/app.py"))
            .args(["serve", "--port", "8080"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(demo.dir.join("app.log")).expect("app log file"));
        demo.app = Some(ChildGuard::spawn("demo app", &mut cmd));
        // Warm: every key was read once (so memory can answer alone), and for the last 2 s
        // every answer came from Redis.
        let warm = poll(Duration::from_secs(30), || {
            let stats = demo.app_json(&["stats", "--window", "2", "--min-requests", "10"])?;
            let sources = stats["sources"].as_object()?;
            (sources.len() == 1 && sources.contains_key("redis")).then_some(())
        });
        assert!(
            warm.is_some(),
            "the demo app did not warm up within 30 s; its log:\n{}",
            demo.app_log()
        );
        demo
    }

    fn app_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("app.log")).unwrap_or_default()
    }

    /// `app.py ARGS` beside the app (in the namespace, outside its cgroup); its JSON, if it
    /// printed some.
    fn app_json(&self, args: &[&str]) -> Option<Value> {
        let outside = Workload::outside(fd_probe!(), &self.scene.netns);
        let mut cmd = outside.command(&self.bin.join("python3").to_string_lossy());
        cmd.arg(repo().join("examples/experiments/demo/app.py"))
            .args(args);
        let out = output(&mut cmd);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The command that runs `chaos run EXPERIMENT` with `vars` as configuration, in the
    /// namespace (so the demo's 127.0.0.1 servers are the ones it reaches), from
    /// examples/experiments as its README says.
    fn chaos(&self, experiment: &str, vars: Value) -> (Command, PathBuf) {
        let mut configuration = json!({
            "faultd_address": format!("unix://{}", self.scene.faultd.socket().display()),
            "client_cgroup": self.scene.cgroup.path(),
            "writes_ledger": self.dir.join("writes.jsonl"),
            "bank_ledger": self.dir.join("bank.jsonl"),
            "jobs_ledger": self.dir.join("jobs.jsonl"),
        });
        for (key, value) in vars.as_object().expect("vars object") {
            configuration[key] = value.clone();
        }
        let var_file = self.dir.join(&format!("{experiment}.vars.json"));
        std::fs::write(
            &var_file,
            serde_json::to_vec_pretty(&json!({ "configuration": configuration })).unwrap(),
        )
        .expect("write var file");
        let journal = self.dir.join(&format!("{experiment}.journal.json"));
        let outside = Workload::outside(fd_probe!(), &self.scene.netns);
        let mut cmd = outside.command(&self.bin.join("chaos").to_string_lossy());
        cmd.arg("--no-version-check")
            .arg("--log-file")
            .arg(self.dir.join(&format!("{experiment}.log")))
            .arg("run")
            .arg("--journal-path")
            .arg(&journal)
            .arg("--var-file")
            .arg(&var_file)
            .arg(experiment)
            .current_dir(repo().join("examples/experiments"));
        with_venv_path(&mut cmd, &self.bin);
        (cmd, journal)
    }

    /// Runs the experiment to its end; returns the journal and how long `chaos run` took.
    fn run(&self, experiment: &str, vars: Value) -> (Value, Duration) {
        let (mut cmd, journal_path) = self.chaos(experiment, vars);
        let started = Instant::now();
        let out: Output = output(&mut cmd);
        let took = started.elapsed();
        let journal: Value = std::fs::read(&journal_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(|| {
                panic!(
                    "`{}` wrote no journal ({}); stdout:\n{}\nstderr:\n{}",
                    describe(&cmd),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        eprintln!(
            "MEASURE chaos run {experiment}: status {} deviated {} in {:.1} s (exit {})",
            journal["status"],
            journal["deviated"],
            took.as_secs_f64(),
            out.status
        );
        for phase in ["before", "after"] {
            for probe in journal["steady_states"][phase]["probes"]
                .as_array()
                .into_iter()
                .flatten()
            {
                eprintln!(
                    "MEASURE   {phase:6} {}: {}",
                    probe["activity"]["name"].as_str().unwrap_or("?"),
                    probe_output(probe).trim()
                );
            }
        }
        for run in journal["run"].as_array().into_iter().flatten() {
            let text = probe_output(run);
            let text: String = text.trim().chars().take(400).collect();
            eprintln!(
                "MEASURE   method {} ({}, {:.1} s): {text}",
                run["activity"]["name"].as_str().unwrap_or("?"),
                run["status"].as_str().unwrap_or("?"),
                run["duration"].as_f64().unwrap_or(0.0)
            );
        }
        let logs = || {
            format!(
                "chaos stderr:\n{}\ndemo app log:\n{}\nfaultd log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.app_log(),
                self.scene.faultd.log()
            )
        };
        assert_eq!(
            journal["status"],
            "completed",
            "{experiment} did not complete; {}",
            logs()
        );
        assert_eq!(
            journal["deviated"],
            false,
            "{experiment}: the steady state deviated; {}",
            logs()
        );
        assert!(out.status.success(), "chaos run exited {}", out.status);
        for run in journal["run"].as_array().into_iter().flatten() {
            assert_eq!(
                run["status"], "succeeded",
                "{experiment}: activity {} failed: {}",
                run["activity"]["name"], run["exception"]
            );
        }
        (journal, took)
    }

    async fn active_faults(&self) -> usize {
        self.scene
            .faultd
            .faults()
            .list(ListFaultsRequest::default())
            .await
            .expect("List")
            .into_inner()
            .faults
            .len()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut app) = self.app.take() {
            signal(app.id(), libc::SIGKILL);
            wait_timeout(&mut app.child, Duration::from_secs(5));
        }
    }
}

/// The stdout of a process probe (its JSON line), or a python probe's output.
fn probe_output(run: &Value) -> String {
    match &run["output"] {
        Value::Object(map) if map.contains_key("stdout") => {
            map["stdout"].as_str().unwrap_or_default().to_owned()
        }
        other => other.to_string(),
    }
}

/// The JSON an activity named `name` printed (process) or returned (python).
fn activity_output(journal: &Value, phase: &str, name: &str) -> Value {
    let runs: Vec<&Value> = match phase {
        "method" => journal["run"].as_array().into_iter().flatten().collect(),
        "rollbacks" => journal["rollbacks"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => journal["steady_states"][phase]["probes"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
    };
    let run = runs
        .into_iter()
        .find(|run| run["activity"]["name"] == name)
        .unwrap_or_else(|| panic!("no activity {name} in the journal's {phase}"));
    match &run["output"] {
        Value::Object(map) if map.contains_key("stdout") => {
            serde_json::from_str(map["stdout"].as_str().unwrap_or_default().trim())
                .unwrap_or_else(|e| panic!("{name}: output is not JSON ({e}): {}", run["output"]))
        }
        other => other.clone(),
    }
}

/// The shortened configuration of an experiment; with `FAULTD_EXPERIMENTS_FULL=1` the
/// experiment's own (60 s faults; about 10 minutes for all seven).
fn short(vars: Value) -> Value {
    if std::env::var_os("FAULTD_EXPERIMENTS_FULL").is_some_and(|v| v == "1") {
        return json!({});
    }
    let mut base = json!({"faultd_lease_ttl": 2, "recovery_seconds": 30});
    for (key, value) in vars.as_object().expect("vars") {
        base[key] = value.clone();
    }
    base
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn redis_unavailable_app_falls_back_and_recovers() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "redis-unavailable.json",
        short(json!({"fault_seconds": 4, "window_seconds": 6})),
    );
    // The outage happened: the fault dropped the app's Redis packets, and the users were
    // answered from PostgreSQL meanwhile.
    let removed = activity_output(&journal, "method", "end-the-outage");
    let dropped: u64 = removed
        .as_array()
        .expect("removed faults")
        .iter()
        .map(|f| {
            f["counters"]["dropped"]
                .as_str()
                .map_or(0, |d| d.parse().unwrap())
        })
        .sum();
    assert!(dropped > 0, "the fault dropped nothing: {removed}");
    let during = activity_output(&journal, "after", "users-error-rate-below-5-percent");
    assert!(
        during["sources"]["postgres"].as_u64().unwrap_or(0) > 0,
        "no answer came from the fallback during the outage: {during}"
    );
    let recovered = activity_output(&journal, "after", "app-reads-redis-again-within-30-s");
    assert!(recovered["healthy_after_s"].as_f64().is_some());
    assert_eq!(demo.active_faults().await, 0);
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn redis_latency_keeps_p99_under_2s() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "redis-latency.json",
        short(json!({"fault_seconds": 5, "window_seconds": 5})),
    );
    // The delay was there: the users' p99 over the fault rose to about 500 ms + jitter.
    let after = activity_output(
        &journal,
        "after",
        "users-p99-below-2-s-and-error-rate-below-5-percent",
    );
    let p99 = after["p99_s"].as_f64().expect("p99");
    assert!(
        p99 >= 0.45,
        "p99 {p99} s: the 500 ms delay did not show: {after}"
    );
    assert!(p99 < 2.0);
    assert!(after["sources"]["redis"].as_u64().unwrap_or(0) > 0);
    assert_eq!(demo.active_faults().await, 0);
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn redis_writes_survive_connection_failures() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "redis-consistency.json",
        short(json!({"fault_seconds": 3, "warmup_seconds": 1, "writer_seconds": 6})),
    );
    let verified = activity_output(
        &journal,
        "after",
        "every-acknowledged-write-present-none-partial",
    );
    assert!(verified["acked"].as_u64().unwrap() > 10, "{verified}");
    assert!(
        verified["failed_attempts"].as_u64().unwrap() > 0,
        "the writer never failed: the fault did not bite: {verified}"
    );
    assert!(
        verified["acked_after_failures"].as_u64().unwrap() > 0,
        "no write was acknowledged after the fault: {verified}"
    );
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn postgres_pool_survives_reset() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "postgres-reset.json",
        short(json!({"fault_seconds": 3, "warmup_seconds": 1, "bank_seconds": 6})),
    );
    let verified = activity_output(
        &journal,
        "after",
        "committed-means-committed-and-the-pool-reconnected",
    );
    assert!(verified["committed"].as_u64().unwrap() > 10, "{verified}");
    assert!(
        verified["failed"].as_u64().unwrap() + verified["unknown"].as_u64().unwrap() > 0,
        "no transaction failed: the reset did not bite: {verified}"
    );
    assert!(verified["committed_after_last_failure"].as_u64().unwrap() > 0);
    assert!(verified["reconnects"].as_u64().unwrap() > 0, "{verified}");
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn partition_rolls_back_by_itself() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "partition.json",
        short(json!({"fault_seconds": 4, "window_seconds": 6})),
    );
    let during = activity_output(&journal, "after", "users-error-rate-below-5-percent");
    assert!(
        during["sources"]["memory"].as_u64().unwrap_or(0) > 0,
        "no answer came from memory during the partition: {during}"
    );
    // Nothing was left for the rollbacks: the deadline had already reverted the partition.
    let left = activity_output(&journal, "method", "nothing-left-after-the-deadline");
    assert_eq!(left, json!([]), "faults left after the deadline: {left}");
    let rolled_back = activity_output(
        &journal,
        "rollbacks",
        "remove-every-fault-this-experiment-injected",
    );
    assert_eq!(rolled_back, json!([]));
    assert_eq!(demo.active_faults().await, 0);
}

/// The counters `fault_counters` reported for the fault a method action injected.
fn counters_of(journal: &Value, action: &str, counters: &Value) -> Value {
    let id = activity_output(journal, "method", action)["id"].clone();
    let id = id
        .as_str()
        .unwrap_or_else(|| panic!("{action}: no fault id"));
    counters[id].clone()
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn redis_queue_failover_buffers_then_does_every_job_once() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "redis-queue-failover.json",
        short(json!({"fault_seconds": 8, "warmup_seconds": 1, "job_rate": 40, "rto_seconds": 15})),
    );
    let verified = activity_output(
        &journal,
        "after",
        "accepted-jobs-done-once-503-only-when-full-drained-within-rto",
    );
    let n = |key: &str| verified[key].as_u64().unwrap_or(0);
    // The partition bit: jobs went to the memory buffer, it filled, and submissions got 503.
    assert!(
        n("accepted_into_memory") > 0,
        "nothing was buffered: {verified}"
    );
    assert!(n("rejected_503") > 0, "no submission got 503: {verified}");
    assert!(n("done") > n("accepted_into_memory"), "{verified}");
    assert!(
        n("dead_lettered") > 0,
        "no poison job reached the dead letters: {verified}"
    );
    assert_eq!(verified["lost"], json!([]), "{verified}");
    assert_eq!(verified["done_twice"], json!([]), "{verified}");
    let unhealthy = verified["redis_unhealthy_after_s"]
        .as_f64()
        .expect("unhealthy after");
    assert!(unhealthy <= 30.0, "{verified}");
    let drained = verified["drained_after_fault_s"]
        .as_f64()
        .expect("drained after");
    assert!(drained <= 15.0, "{verified}");
    let counters = activity_output(&journal, "method", "what-the-partition-did");
    let partition = counters_of(&journal, "partition-the-app-from-redis", &counters);
    assert!(
        partition["dropped"].as_u64().unwrap_or(0) > 0,
        "the partition dropped nothing: {counters}"
    );
    assert_eq!(demo.active_faults().await, 0);
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn degraded_network_keeps_error_rate_and_p99() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, _) = demo.run(
        "degraded-network.json",
        short(json!({
            "phase_seconds": 3, "warmup_seconds": 1, "window_seconds": 12,
            "job_rate": 10, "rto_seconds": 15
        })),
    );
    let users = activity_output(
        &journal,
        "after",
        "users-error-rate-below-1-percent-p99-below-1-s",
    );
    assert!(users["requests"].as_u64().unwrap_or(0) > 0, "{users}");
    let jobs = activity_output(
        &journal,
        "after",
        "job-submissions-error-rate-below-1-percent-p99-below-1-s-none-lost-or-done-twice",
    );
    assert!(jobs["done"].as_u64().unwrap_or(0) > 0, "{jobs}");
    assert_eq!(jobs["lost"], json!([]), "{jobs}");
    // Each phase bit: packets to PostgreSQL dropped, Redis packets held back by the pacing,
    // Redis connections reset or refused.
    let counters = activity_output(&journal, "method", "what-each-phase-did");
    let count = |action: &str, key: &str| {
        counters_of(&journal, action, &counters)[key]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        count("phase-1-packet-loss-to-postgresql", "dropped") > 0,
        "the loss dropped nothing: {counters}"
    );
    assert!(
        count("phase-2-redis-at-100-kb-s", "delayed") > 0,
        "the bandwidth held nothing back: {counters}"
    );
    assert!(
        count("phase-3-reset-redis-connections", "reset")
            + count("phase-3-reset-redis-connections", "refused")
            > 0,
        "the reset tore down and refused nothing: {counters}"
    );
    assert_eq!(demo.active_faults().await, 0);
}

/// `chaos run` SIGKILLed mid-experiment: its KeepAlive stops, and faultd reverts the fault
/// within one lease ttl, by itself.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn killed_chaos_run_reverts_within_one_ttl() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let ttl = Duration::from_secs(2);
    let (mut cmd, _) = demo.chaos(
        "redis-unavailable.json",
        json!({"fault_seconds": 60, "window_seconds": 6, "faultd_lease_ttl": 2, "recovery_seconds": 30}),
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut chaos = ChildGuard::spawn("chaos run", &mut cmd);
    let injected = poll(Duration::from_secs(60), || {
        let n = futures_blocking(demo.active_faults());
        (n > 0).then_some(())
    });
    assert!(
        injected.is_some(),
        "the experiment injected nothing within 60 s"
    );
    // Past one ttl: the background KeepAlive is what holds it. (Off the renewal period of
    // ttl/3, so the kill does not race a renewal.)
    std::thread::sleep(ttl * 2 + Duration::from_millis(300));
    assert_eq!(
        demo.active_faults().await,
        1,
        "the fault did not outlive its first ttl while chaos run was alive"
    );
    signal(chaos.id(), libc::SIGKILL);
    let killed = unix_ns();
    wait_timeout(&mut chaos.child, Duration::from_secs(5));
    // Nothing renews it any more: this is the deadline the fault dies at.
    let leases = list_leases(&mut demo.scene.faultd.leases()).await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    let deadline = lease_deadline(&leases[0]);
    assert!(
        deadline - killed <= ttl.as_nanos() as i128,
        "the lease ran {} ms past the kill: more than one ttl",
        (deadline - killed) / 1_000_000
    );
    let gone = poll(ttl + Duration::from_secs(2), || {
        (futures_blocking(demo.active_faults()) == 0).then(unix_ns)
    })
    .expect("the fault outlived the killed experiment by more than ttl + 2 s");
    eprintln!(
        "MEASURE killed chaos run: lease deadline {:.3} s after SIGKILL (ttl {:?}), fault gone \
         {:.3} s after SIGKILL ({:+.1} ms from the deadline)",
        (deadline - killed) as f64 / 1e9,
        ttl,
        (gone - killed) as f64 / 1e9,
        (gone - deadline) as f64 / 1e6
    );
    assert!(
        gone - deadline <= 150_000_000,
        "the fault was still listed {} ms after its lease deadline",
        (gone - deadline) / 1_000_000
    );
    // And the app is back on Redis.
    let back = demo
        .app_json(&["wait-healthy", "--backend", "redis", "--within", "30"])
        .expect("wait-healthy output");
    assert!(back["healthy_after_s"].as_f64().is_some(), "{back}");
}

/// The extension's own tests (pytest): request building and bad input without faultd, then
/// every action and probe against a real faultd on its unix socket.
#[tokio::test]
#[ignore = "needs root: BPF (run with `cargo xtask test`)"]
async fn extension_pytest() {
    let faultd = Faultd::start().await;
    let address = format!("unix://{}", faultd.socket().display());
    pytest(&address, &[], &["integrations/chaostoolkit/tests"]);
}

/// The same live tests over faultd's TCP listener with mutual TLS.
#[tokio::test]
#[ignore = "needs root: BPF (run with `cargo xtask test`)"]
async fn extension_pytest_over_mtls() {
    let pki = Pki::new();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let faultd = Faultd::start_with(FaultdOptions {
        extra_args: pki.listener_args(),
        ..FaultdOptions::default()
    })
    .await;
    let address = faultd
        .logged("listen")
        .unwrap_or_else(|| panic!("faultd logged no TCP listener:\n{}", faultd.log()));
    assert!(address.starts_with("tcp://"), "{address}");
    pytest(
        &address,
        &[
            ("FAULTD_TLS_CA", path(&pki.ca)),
            ("FAULTD_TLS_CERT", path(&pki.client_cert)),
            ("FAULTD_TLS_KEY", path(&pki.client_key)),
        ],
        &["integrations/chaostoolkit/tests/test_live.py"],
    );
}

/// Runs pytest on `files` against faultd at `address`, in a fresh cgroup; panics unless every
/// test ran and passed.
fn pytest(address: &str, env: &[(&str, String)], files: &[&str]) {
    let bin = venv_bin();
    let cgroup = Cgroup::new();
    let mut cmd = Command::new(bin.join("pytest"));
    cmd.args(["-q", "-p", "no:cacheprovider"])
        .args(files.iter().map(|f| repo().join(f)))
        .env("FAULTD_ADDRESS", address)
        .env("FAULTD_TEST_CGROUP", cgroup.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(repo());
    with_venv_path(&mut cmd, &bin);
    let out = output(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "pytest failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(" passed") && !text.contains("skipped"),
        "pytest ran no test or skipped some:\n{text}"
    );
}

/// Runs a future to completion from a synchronous poll loop inside the test's runtime.
fn futures_blocking<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// `postgres-ambiguous-commit.json` with the demo payment service retrying as `retry` says:
/// the journal, and the after-probe's verdict (payments, applied_twice, ...).
fn ambiguous_commit(demo: &Demo, retry: &str) -> (Value, Value) {
    let vars = short(json!({
        "payment_retry": retry,
        "fault_seconds": 2,
        "warmup_seconds": 2,
        "pay_seconds": 6,
        "payments_ledger": demo.dir.join("payments.jsonl"),
    }));
    let (mut cmd, journal_path) = demo.chaos("postgres-ambiguous-commit.json", vars);
    let out = output(&mut cmd);
    let journal: Value = std::fs::read(&journal_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| {
            panic!(
                "`{}` wrote no journal ({}): {}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let verdict = activity_output(&journal, "after", "no-payment-applied-twice");
    eprintln!(
        "MEASURE ambiguous commit, {retry} retries: status {} deviated {}; {verdict}",
        journal["status"], journal["deviated"]
    );
    (journal, verdict)
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn ambiguous_commit_applies_no_payment_twice_with_idempotent_retries() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, verdict) = ambiguous_commit(&demo, "idempotent");
    assert_eq!(journal["status"], "completed", "{journal}");
    assert_eq!(journal["deviated"], false, "{verdict}");
    assert!(verdict["payments"].as_u64().unwrap_or(0) > 10, "{verdict}");
    assert!(
        verdict["retried_payments"].as_u64().unwrap_or(0) > 0,
        "no COMMIT reply was lost: the fault did not bite: {verdict}"
    );
    assert_eq!(verdict["applied_twice"], 0, "{verdict}");
}

#[tokio::test]
#[ignore = "needs root: namespaces, cgroups and BPF (run with `cargo xtask test`)"]
async fn ambiguous_commit_catches_naive_retries_applying_payments_twice() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start().await;
    let (journal, verdict) = ambiguous_commit(&demo, "naive");
    // chaostoolkit completes a run whose steady state deviates afterwards, and says so.
    assert_eq!(journal["status"], "completed", "{journal}");
    assert_eq!(
        journal["deviated"], true,
        "the steady state must deviate: {verdict}"
    );
    assert!(
        verdict["applied_twice"].as_u64().unwrap_or(0) > 0,
        "naive retries of lost COMMIT replies must apply payments twice: {verdict}"
    );
}
