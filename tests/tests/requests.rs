//! Request matches as real clients see them: a fault on some Redis commands or PostgreSQL
//! statements acts on those requests alone — `drop` makes exactly that call time out (the
//! server never runs it), `reset` fails exactly that call with a connection error — while
//! other calls on the same connection before it, on other connections, and of processes
//! outside the scope work. Pipelined and split requests are matched or passed as the README
//! says, never broken.

use std::time::Duration;

use faultd_proto::v1::{
    Delay, Direction, Fault, LoseReply, PostgresMatch, Protocol, RedisMatch, RequestMatch, Target,
    fault::Action, request_match::Protocol as Matched,
};
use faultd_tests::api::{cgroup_target, drop_fault, get_fault, list_faults, reset_fault, with_ttl};
use faultd_tests::clients::python;
use faultd_tests::http::{get, sample};
use faultd_tests::process::output;
use faultd_tests::servers::{POSTGRES_PORT, REDIS_PORT};
use faultd_tests::{
    Cgroup, Faultctl, Faultd, FaultdOptions, NetNs, Postgres, RedisScene, Workload, fd_probe,
};
use serde_json::Value;

/// How long a client waits for a call before the test counts it as timed out.
const CALL_TIMEOUT_S: &str = "2";

fn redis_target(cgroup: &Cgroup, commands: &[&str]) -> Target {
    let mut target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    target.request = Some(RequestMatch {
        protocol: Some(Matched::Redis(RedisMatch {
            commands: commands.iter().map(|c| c.to_string()).collect(),
            key_prefix: String::new(),
        })),
    });
    target
}

/// `request_client.py MODE 127.0.0.1 PORT TIMEOUT` in `workload`: one JSON object per call.
fn client(workload: &Workload, mode: &str, port: u16) -> Vec<Value> {
    client_with(workload, mode, port, CALL_TIMEOUT_S, &[])
}

fn client_with(
    workload: &Workload,
    mode: &str,
    port: u16,
    timeout_s: &str,
    extra: &[&str],
) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/request_client.py");
    let mut cmd = workload.command(&python().to_string_lossy());
    cmd.args([script, mode, "127.0.0.1", &port.to_string(), timeout_s])
        .args(extra);
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let steps: Vec<Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert!(
        !steps.is_empty(),
        "{mode} printed nothing ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{mode} in {}: {steps:?}", workload.label());
    steps
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

fn ok(step: &Value) -> bool {
    step["ok"] == true
}

fn timed_out(step: &Value) -> bool {
    step["timeout"] == true
}

/// `redis-cli ARGS…` from `workload`.
fn redis_cli(workload: &Workload, args: &[&str]) -> String {
    let mut cmd = workload.command("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string()])
        .args(args);
    String::from_utf8_lossy(&output(&mut cmd).stdout).into_owned()
}

async fn inject(faultd: &Faultd, fault: Fault) -> Fault {
    faultd
        .inject(with_ttl(fault, Duration::from_secs(60)))
        .await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn drop_on_set_times_out_the_set_alone() {
    let scene = RedisScene::start_with(fd_probe!(), FaultdOptions::with_metrics()).await;
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    redis_cli(&outside, &["SET", "k", "before"]);
    let fault = inject(
        &scene.faultd,
        drop_fault(100.0, redis_target(&scene.cgroup, &["set"])),
    )
    .await;
    assert_eq!(fault.mechanism, "cgroup_skb", "Inject answered {fault:?}");

    let steps = client(&scene.inside, "redis-drop", REDIS_PORT);
    let before = step(&steps, "get_before");
    assert!(
        ok(before) && before["value"] == "before",
        "GET before the SET on the same connection must answer: {before}"
    );
    let set = step(&steps, "set");
    assert!(timed_out(set), "SET must time out under the drop: {set}");
    let other = step(&steps, "get_other");
    assert!(
        ok(other) && other["value"] == "before",
        "GET on another connection must answer, and the dropped SET must not have run: {other}"
    );
    // The server never ran the SET, retransmissions included.
    assert_eq!(redis_cli(&outside, &["GET", "k"]).trim(), "before");
    // A process outside the cgroup is untouched.
    assert_eq!(redis_cli(&outside, &["SET", "k", "outside"]).trim(), "OK");
    assert_eq!(redis_cli(&outside, &["GET", "k"]).trim(), "outside");

    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    eprintln!("counters: {counters:?}");
    assert!(
        counters.requests_matched >= 1 && counters.requests_affected >= 1,
        "the fault must count the matched SET (and its retransmissions): {counters:?}"
    );
    // Prometheus shows the same counts, per fault and over every fault of the agent (scraped
    // after Get: retransmissions may have added to them since).
    let (status, text) = get(&scene.faultd.metrics_addr(), "/metrics");
    assert_eq!(status, 200, "{text}");
    let per_fault = |name: &str| {
        let series = format!(
            "faultd_fault_requests_{name}_total{{fault=\"{}\",lease=\"{}\",action=\"drop\",mechanism=\"cgroup_skb\"}}",
            fault.id, fault.lease_id
        );
        sample(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let total = |name: &str| {
        let series = format!(
            "faultd_requests_{name}_total{{action=\"drop\",mechanism=\"cgroup_skb\",scope=\"cgroup\"}}"
        );
        sample(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    for (name, got) in [
        ("matched", counters.requests_matched),
        ("affected", counters.requests_affected),
    ] {
        let (fault_series, total_series) = (per_fault(name), total(name));
        eprintln!(
            "MEASURE requests_{name} get={got} fault_series={fault_series} total={total_series}"
        );
        assert!(
            fault_series >= got as f64 && total_series >= fault_series,
            "requests {name}: Get said {got}, the fault's series {fault_series}, the total {total_series}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn reset_on_eval_fails_that_call_and_redis_never_runs_it() {
    let scene = RedisScene::start(fd_probe!()).await;
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    let fault = inject(
        &scene.faultd,
        reset_fault(redis_target(&scene.cgroup, &["EVAL"]), None),
    )
    .await;
    assert_eq!(
        fault.mechanism, "cgroup_skb+sock_diag",
        "Inject answered {fault:?}"
    );

    let steps = client(&scene.inside, "redis-reset", REDIS_PORT);
    assert!(ok(step(&steps, "ping")), "PING before EVAL: {steps:?}");
    let eval = step(&steps, "eval");
    assert!(
        !ok(eval) && !timed_out(eval) && eval["type"].as_str().unwrap_or("").contains("Connection"),
        "EVAL must fail with a connection error: {eval}"
    );
    eprintln!("MEASURE request_reset_ms={}", eval["took_ms"]);
    assert!(
        eval["took_ms"].as_f64().unwrap_or(f64::MAX) < 500.0,
        "the reset must come at once, not after a retransmission timeout: {eval}"
    );
    assert!(
        ok(step(&steps, "ping_other")),
        "a new connection must work (a request reset refuses no connect): {steps:?}"
    );
    let stats = redis_cli(&outside, &["INFO", "commandstats"]);
    assert!(
        !stats.contains("cmdstat_eval"),
        "Redis must never have run the EVAL: {stats}"
    );
    assert!(stats.contains("cmdstat_ping"), "INFO commandstats: {stats}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn pipelined_and_split_requests_are_matched_or_passed_as_documented() {
    let scene = RedisScene::start(fd_probe!()).await;
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    redis_cli(&outside, &["SET", "a", "1"]);
    inject(
        &scene.faultd,
        drop_fault(100.0, redis_target(&scene.cgroup, &["SET"])),
    )
    .await;

    let steps = client(&scene.inside, "redis-pipeline", REDIS_PORT);
    // A SET pipelined behind a GET in one segment is not matched: both run.
    let passed = step(&steps, "get_then_set");
    assert!(
        ok(passed) && passed["value"] == "$1\r\n1\r\n+OK\r\n",
        "GET then SET in one segment must pass: {passed}"
    );
    assert_eq!(redis_cli(&outside, &["GET", "p"]).trim(), "v");
    // A segment that starts with a SET is matched, with what is pipelined behind it.
    let matched = step(&steps, "set_then_get");
    assert!(
        timed_out(matched),
        "SET then GET must be dropped: {matched}"
    );
    assert_eq!(redis_cli(&outside, &["EXISTS", "q"]).trim(), "0");

    // A request split before the end of its name is not matched, and arrives whole.
    let steps = client(&scene.inside, "redis-split", REDIS_PORT);
    let split = step(&steps, "split_set");
    assert!(
        ok(split) && split["value"] == "+OK\r\n",
        "a SET split inside its name passes: {split}"
    );
    let get = step(&steps, "get_split");
    assert!(
        ok(get) && get["value"] == "$5\r\nsplit\r\n",
        "and Redis got it intact: {get}"
    );
}

/// Medians (ms) of GET and SET round trips over `rounds` rounds on one redis-py connection.
fn get_set_medians(workload: &Workload, rounds: &str) -> (f64, f64) {
    let steps = client_with(workload, "redis-delay", REDIS_PORT, "120", &[rounds]);
    let timed = step(&steps, "rounds");
    assert!(ok(timed), "the rounds must complete: {timed}");
    let median = |i: usize| {
        let values: Vec<f64> = timed["value"][i]
            .as_array()
            .expect("a list of round trips")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        faultd_tests::workload::stats::median(&values)
    };
    (median(0), median(1))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn delay_on_set_slows_the_set_alone() {
    let scene = RedisScene::start(fd_probe!()).await;
    // NFQUEUE applies the fault in the namespaces of the cgroup's processes.
    let _resident = scene.inside.resident();
    let (get_before, set_before) = get_set_medians(&scene.inside, "20");
    let mut fault = drop_fault(100.0, redis_target(&scene.cgroup, &["SET"]));
    fault.action = Some(Action::Delay(Delay {
        latency: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        ..Default::default()
    }));
    let fault = inject(&scene.faultd, fault).await;
    assert_eq!(fault.mechanism, "nfqueue", "Inject answered {fault:?}");
    let (get_during, set_during) = get_set_medians(&scene.inside, "30");
    eprintln!(
        "MEASURE request_delay medians: GET {get_before:.2} -> {get_during:.2} ms, SET \
         {set_before:.2} -> {set_during:.2} ms"
    );
    let added = set_during - set_before;
    assert!(
        (added - 200.0).abs() <= 5.0,
        "SET round trips must rise by 200 ms (±5 ms median): {set_before:.2} -> {set_during:.2} ms"
    );
    assert!(
        get_during - get_before < 5.0,
        "GET round trips must not rise: {get_before:.2} -> {get_during:.2} ms"
    );
    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    assert!(
        counters.requests_matched >= 30,
        "each SET is a matched request: {counters:?}"
    );
}

/// PostgreSQL in a fresh namespace, a workload cgroup, a faultd, and a table `t (id int)`.
struct PgScene {
    inside: Workload,
    outside: Workload,
    faultd: Faultd,
    _postgres: Postgres,
    cgroup: Cgroup,
    _netns: NetNs,
}

impl PgScene {
    async fn start() -> PgScene {
        let netns = NetNs::new();
        let postgres = Postgres::start(&netns);
        let cgroup = Cgroup::new();
        let faultd = Faultd::start().await;
        let scene = PgScene {
            inside: Workload::inside(fd_probe!(), &cgroup, &netns),
            outside: Workload::outside(fd_probe!(), &netns),
            faultd,
            _postgres: postgres,
            cgroup,
            _netns: netns,
        };
        scene.psql("create table t (id int)");
        scene
    }

    /// `psql -Atc SQL` from outside the cgroup.
    fn psql(&self, sql: &str) -> String {
        let mut cmd = self.outside.command("psql");
        cmd.args(["-h", "127.0.0.1", "-p", &POSTGRES_PORT.to_string(), "-U"])
            .args(["postgres", "-Atc", sql])
            .env("PGCONNECT_TIMEOUT", "2");
        String::from_utf8_lossy(&output(&mut cmd).stdout).into_owned()
    }

    fn target(&self, statements: &[&str]) -> Target {
        let mut target = cgroup_target(
            &self.cgroup,
            &[POSTGRES_PORT],
            Protocol::Tcp,
            Direction::Egress,
        );
        target.request = Some(RequestMatch {
            protocol: Some(Matched::Postgres(PostgresMatch {
                statements: statements.iter().map(|s| s.to_string()).collect(),
            })),
        });
        target
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn lose_reply_on_commit_commits_and_fails_the_client() {
    let scene = PgScene::start().await;
    let fault = inject(
        &scene.faultd,
        Fault {
            action: Some(Action::LoseReply(LoseReply {})),
            target: Some(scene.target(&["COMMIT"])),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        fault.mechanism, "cgroup_skb+sock_diag",
        "Inject answered {fault:?}"
    );
    let steps = client(&scene.inside, "pg-lose-reply", POSTGRES_PORT);
    assert!(ok(step(&steps, "insert")), "INSERT: {steps:?}");
    let commit = step(&steps, "commit");
    assert!(
        !ok(commit) && !timed_out(commit),
        "the client's COMMIT must fail with a connection error: {commit}"
    );
    eprintln!(
        "MEASURE lose_reply_commit_ms={} {}",
        commit["took_ms"], commit["error"]
    );
    // The server committed: the row is there, read from outside and from a new connection.
    assert_eq!(
        scene.psql("select count(*) from t where id = 7").trim(),
        "1"
    );
    let count = step(&steps, "count");
    assert!(ok(count) && count["value"] == 1, "{count}");
    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    assert!(
        counters.requests_matched >= 1 && counters.requests_affected == 1,
        "one COMMIT matched, one reply lost: {counters:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn drop_on_insert_skips_comments_and_spares_other_statements() {
    let scene = PgScene::start().await;
    inject(
        &scene.faultd,
        drop_fault(100.0, scene.target(&["Insert", "update"])),
    )
    .await;
    let psql = |sql: &str| scene.psql(sql);

    let steps = client(&scene.inside, "pg-drop", POSTGRES_PORT);
    assert!(
        ok(step(&steps, "select_before")),
        "SELECT before: {steps:?}"
    );
    let insert = step(&steps, "insert");
    assert!(
        timed_out(insert),
        "an INSERT behind comments must be matched and time out: {insert}"
    );
    let other = step(&steps, "select_other");
    assert!(
        ok(other) && other["value"] == 0,
        "SELECT on another connection must answer, with no row inserted: {other}"
    );
    assert_eq!(psql("select count(*) from t").trim(), "0");
    assert_eq!(psql("insert into t values (2)").trim(), "INSERT 0 1");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_takes_request_matches_and_says_what_is_not_matched() {
    let scene = RedisScene::start(fd_probe!()).await;
    let faultctl = Faultctl::new(&scene.faultd);
    let port = REDIS_PORT.to_string();
    let cgroup = scene.cgroup.path();
    let dry = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        cgroup,
        "--port",
        &port,
        "--redis-command",
        "set,Del",
        "--redis-key-prefix",
        "user:",
        "--ttl",
        "30s",
        "--dry-run",
    ]);
    dry.assert_success();
    for expected in [
        "redis commands SET,DEL on keys user:*",
        "TLS",
        "pipelined",
        "split",
    ] {
        assert!(
            dry.stdout().contains(expected),
            "`{}` should show {expected:?}: {dry}",
            dry.command
        );
    }
    let lose = faultctl.run(&[
        "inject",
        "lose-reply",
        "--cgroup",
        cgroup,
        "--port",
        &port,
        "--ttl",
        "30s",
    ]);
    assert!(
        !lose.success() && lose.stderr().contains("fault.target.request"),
        "lose-reply without a request match must name fault.target.request: {lose}"
    );
    let udp = faultctl.run(&[
        "inject",
        "drop",
        "--cgroup",
        cgroup,
        "--port",
        &port,
        "--protocol",
        "udp",
        "--pg-statement",
        "COMMIT",
        "--ttl",
        "30s",
    ]);
    assert!(
        !udp.success() && udp.stderr().contains("fault.target.protocol"),
        "a request match on UDP must name fault.target.protocol: {udp}"
    );
    let caps = faultctl.run(&["caps"]);
    caps.assert_success();
    assert!(
        caps.stdout().contains("request_match") && caps.stdout().contains("TLS"),
        "`faultctl caps` should list request matching and what it does not match: {caps}"
    );
    assert!(
        list_faults(&mut scene.faultd.faults()).await.is_empty(),
        "dry runs and refused injects change nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn key_prefix_limits_the_match_to_those_keys() {
    let scene = RedisScene::start(fd_probe!()).await;
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    redis_cli(&outside, &["MSET", "user:1", "u", "item:1", "i"]);
    let mut target = redis_target(&scene.cgroup, &["GET"]);
    if let Some(Matched::Redis(redis)) = target.request.as_mut().and_then(|r| r.protocol.as_mut()) {
        redis.key_prefix = "user:".into();
    }
    inject(&scene.faultd, drop_fault(100.0, target)).await;
    // redis-cli sends RESP multibulk; the inline form is covered by the unit tests of
    // fault::wire, which read requests as the programs do.
    let get = |key: &str| {
        let mut cmd = scene.inside.command("timeout");
        cmd.args([
            "2",
            "redis-cli",
            "-h",
            "127.0.0.1",
            "-p",
            &REDIS_PORT.to_string(),
        ])
        .args(["GET", key]);
        let out = output(&mut cmd);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(
        get("item:1"),
        (true, "i".to_string()),
        "another key's GET answers"
    );
    let (answered, text) = get("user:1");
    assert!(!answered, "a GET of a user: key must time out: {text}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn bad_request_matches_are_invalid_argument_naming_the_field() {
    let scene = RedisScene::start(fd_probe!()).await;
    let mut faults = scene.faultd.faults();
    let refused = |target: Target, action: Option<Action>| {
        let mut fault = drop_fault(100.0, target);
        if action.is_some() {
            fault.action = action;
        }
        with_ttl(fault, Duration::from_secs(30))
    };
    let mut empty = redis_target(&scene.cgroup, &[]);
    let mut long = redis_target(&scene.cgroup, &["X"]);
    if let Some(Matched::Redis(redis)) = long.request.as_mut().and_then(|r| r.protocol.as_mut()) {
        redis.commands = vec!["A".repeat(17)];
    }
    let mut udp = redis_target(&scene.cgroup, &["SET"]);
    udp.protocol = Protocol::Udp.into();
    let mut none = redis_target(&scene.cgroup, &["SET"]);
    none.request = Some(RequestMatch { protocol: None });
    let reject = Some(Action::Reject(faultd_proto::v1::Reject {}));
    empty.direction = Direction::Egress.into();
    for (request, field) in [
        (refused(empty, None), "fault.target.request.redis.commands"),
        (
            refused(long, None),
            "fault.target.request.redis.commands[0]",
        ),
        (refused(udp, None), "fault.target.protocol"),
        (refused(none, None), "fault.target.request"),
        (
            refused(redis_target(&scene.cgroup, &["SET"]), reject),
            "fault.target.request",
        ),
    ] {
        let status = faults.inject(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "the error must name {field}: {status:?}"
        );
    }
    assert!(
        list_faults(&mut faults).await.is_empty(),
        "nothing was applied"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn requests_over_ipv6_are_matched_too() {
    let scene = RedisScene::start(fd_probe!()).await;
    inject(
        &scene.faultd,
        drop_fault(100.0, redis_target(&scene.cgroup, &["SET"])),
    )
    .await;
    let cli = |args: &[&str]| {
        let mut cmd = scene.inside.command("timeout");
        cmd.args(["2", "redis-cli", "-h", "::1", "-p", &REDIS_PORT.to_string()])
            .args(args);
        let out = output(&mut cmd);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(
        cli(&["PING"]),
        (true, "PONG".to_string()),
        "PING over ::1 answers"
    );
    let (answered, text) = cli(&["SET", "k6", "v"]);
    assert!(!answered, "a SET over ::1 must time out: {text}");
}
