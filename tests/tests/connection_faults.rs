//! Connection faults as a real server failure looks to real clients: `reject` refuses new
//! connects with ECONNREFUSED at once; `reset` tears down the established connections of the
//! workload (and only those) and refuses reconnects while it lasts; writes that went through
//! a reset are neither lost nor duplicated.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultd_proto::v1::{Direction, Fault, Protocol};
use faultd_tests::api::{
    cgroup_target, get_counters_until, get_fault, grant, lease_deadline, reject_fault, remove,
    reset_fault, under_lease, with_ttl,
};
use faultd_tests::clients::{ConnClient, at};
use faultd_tests::process::{ChildGuard, output, poll, unix_ns, wait_timeout};
use faultd_tests::servers::{POSTGRES_PORT, REDIS_PORT};
use faultd_tests::workload::timeline;
use faultd_tests::{Cgroup, Faultd, NetNs, Postgres, RedisScene, Workload, fd_probe};
use tonic::transport::Channel;

/// How soon after the Inject ack a client must see its connection fail (issue bound).
const ERROR_BOUND_MS: f64 = 100.0;
const ECONNREFUSED: i64 = 111;
const ECONNRESET: i64 = 104;
const ECONNABORTED: i64 = 103;
const EPIPE: i64 = 32;

/// Injects; returns the fault and the unix ns when the ack arrived.
async fn inject(
    faults: &mut faultd_proto::v1::fault_service_client::FaultServiceClient<Channel>,
    request: faultd_proto::v1::InjectRequest,
) -> (Fault, i128) {
    let sent = unix_ns();
    let fault = faults
        .inject(request)
        .await
        .unwrap_or_else(|s| panic!("Inject failed: {s:?}"))
        .into_inner();
    let acked = unix_ns();
    eprintln!("MEASURE inject_round_trip_ms={:.2}", ms(acked - sent));
    (fault, acked)
}

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

fn errno(event: &serde_json::Value) -> i64 {
    event["errno"].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn reject_refuses_redis_connects_at_once_until_the_lease_deadline() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let outside = Workload::outside(fd_probe!(), netns);
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();

    let lease = grant(&mut leases, Duration::from_secs(3)).await;
    let deadline = lease_deadline(&lease);
    let target = cgroup_target(
        cgroup,
        &[REDIS_PORT],
        Protocol::Unspecified,
        Direction::Unspecified,
    );
    let (fault, _) = inject(&mut faults, under_lease(reject_fault(target), &lease.id)).await;
    assert_eq!(
        fault.mechanism, "cgroup_connect",
        "Inject answered {fault:?}"
    );

    // redis-cli, as a user runs it: "Connection refused", not a timeout, not EPERM.
    let cli = inside.redis_ping();
    assert!(
        !cli.answered() && !cli.timed_out(),
        "redis-cli inside the cgroup should fail at once: {cli}"
    );
    assert!(
        format!("{}{}", cli.stdout, cli.stderr).contains("Connection refused"),
        "redis-cli inside should say \"Connection refused\": {cli}"
    );
    // redis-py: the errno and how long the failing connect took.
    let mut client = ConnClient::start(inside, "redis-connect", &["127.0.0.1", "6379"]);
    let refused = client.expect("error", Duration::from_secs(10));
    let took_ms = ms(refused["took_ns"].as_i64().unwrap_or(i64::MAX).into());
    eprintln!(
        "MEASURE reject_connect_ms={took_ms:.3} errno={} ({}) redis-py {}: {}",
        errno(&refused),
        refused["errno_name"],
        refused["type"],
        refused["error"]
    );
    assert_eq!(
        errno(&refused),
        ECONNREFUSED,
        "redis-py inside should get ECONNREFUSED: {refused}"
    );
    assert!(
        took_ms < ERROR_BOUND_MS,
        "the refused connect took {took_ms:.1} ms (bound {ERROR_BOUND_MS} ms)"
    );
    let neighbour = outside.redis_ping();
    assert!(
        neighbour.answered(),
        "outside the cgroup Redis must answer: {neighbour}"
    );
    let counted = get_fault(&mut faults, &fault.id).await;
    let refused_count = counted.counters.unwrap_or_default().refused;
    assert!(
        refused_count >= 2,
        "the fault should count the refused connects: {counted:?}"
    );

    // Lease expiry: connects succeed again right after the deadline, never before.
    let left = Duration::from_nanos((deadline - unix_ns()).max(0) as u64);
    let attempts = inside
        .tcp_probe(
            &format!("127.0.0.1:{REDIS_PORT}"),
            Duration::from_millis(5),
            Duration::from_secs(1),
            left + Duration::from_millis(600),
        )
        .finish();
    let early = timeline::ok_before(&attempts, deadline);
    assert!(
        early.is_empty(),
        "a connect succeeded before the lease deadline: {}",
        timeline::around(&attempts, deadline, 60)
    );
    let slow: Vec<_> = attempts
        .iter()
        .filter(|a| !a.ok && a.took > 100_000_000)
        .collect();
    assert!(
        slow.is_empty(),
        "refused connects must fail at once, some took over 100 ms: {slow:?}"
    );
    let first_ok = timeline::first_ok_after(&attempts, deadline).unwrap_or_else(|| {
        panic!(
            "no connect succeeded after the lease deadline: {}",
            timeline::around(&attempts, deadline, 300)
        )
    });
    let recovery_ms = ms(first_ok.at - deadline);
    eprintln!("MEASURE reject_expiry_recovery_ms={recovery_ms:.1}");
    assert!(
        recovery_ms <= 100.0,
        "connects came back {recovery_ms:.1} ms after the deadline: {}",
        timeline::around(&attempts, deadline, 120)
    );
}

/// `psql -Atc SQL` from `workload`.
fn psql(workload: &Workload, sql: &str) -> (bool, String) {
    let mut cmd = workload.command("psql");
    cmd.args(["-h", "127.0.0.1", "-p", &POSTGRES_PORT.to_string(), "-U"])
        .args(["postgres", "-Atc", sql])
        .env("PGCONNECT_TIMEOUT", "2");
    let out = output(&mut cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn backend_listed(outside: &Workload, pid: i64) -> bool {
    let (ok, out) = psql(
        outside,
        &format!("select count(*) from pg_stat_activity where pid = {pid}"),
    );
    assert!(ok, "pg_stat_activity query failed: {out}");
    out.trim() != "0"
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn reset_kills_the_postgres_connections_of_the_cgroup_only() {
    let netns = NetNs::new();
    let _postgres = Postgres::start(&netns);
    let cgroup = Cgroup::new();
    let faultd = Faultd::start().await;
    let inside = Workload::inside(fd_probe!(), &cgroup, &netns);
    let outside = Workload::outside(fd_probe!(), &netns);
    let mut faults = faultd.faults();
    let port = POSTGRES_PORT.to_string();

    let mut held = ConnClient::start(&inside, "pg-hold", &["127.0.0.1", &port]);
    let mut spared = ConnClient::start(&outside, "pg-hold", &["127.0.0.1", &port]);
    let held_pid = held.expect("ready", Duration::from_secs(20))["backend_pid"]
        .as_i64()
        .expect("backend pid");
    let spared_pid = spared.expect("ready", Duration::from_secs(20))["backend_pid"]
        .as_i64()
        .expect("backend pid");
    assert!(backend_listed(&outside, held_pid) && backend_listed(&outside, spared_pid));

    let target = cgroup_target(
        &cgroup,
        &[POSTGRES_PORT],
        Protocol::Tcp,
        Direction::Unspecified,
    );
    let (fault, acked) = inject(
        &mut faults,
        with_ttl(reset_fault(target, None), Duration::from_secs(30)),
    )
    .await;
    assert_eq!(fault.mechanism, "sock_diag+cgroup_connect", "{fault:?}");
    let broken = held.expect("error", Duration::from_secs(5));
    let after_ms = ms(at(&broken) - acked);
    eprintln!(
        "MEASURE reset_pg_error_after_ack_ms={after_ms:.1} errno={} ({}) psycopg {}: {}",
        errno(&broken),
        broken["errno_name"],
        broken["type"],
        broken["error"]
    );
    assert!(
        after_ms < ERROR_BOUND_MS,
        "the client inside saw its connection fail {after_ms:.1} ms after the Inject ack (bound {ERROR_BOUND_MS} ms): {broken}"
    );
    assert!(
        broken["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("psycopg")),
        "expected a psycopg connection error: {broken}"
    );
    let counted = get_fault(&mut faults, &fault.id).await;
    assert!(
        counted.counters.unwrap_or_default().reset >= 1,
        "the fault should count the connection it reset: {counted:?}"
    );

    // The server side saw the connection go: the backend leaves pg_stat_activity.
    let gone = poll(Duration::from_secs(3), || {
        (!backend_listed(&outside, held_pid)).then_some(())
    });
    assert!(
        gone.is_some(),
        "backend {held_pid} of the reset connection is still in pg_stat_activity"
    );
    assert!(
        backend_listed(&outside, spared_pid),
        "the connection outside the cgroup must survive"
    );
    assert!(
        spared.next(Duration::from_millis(200)).is_none(),
        "the client outside the cgroup saw something: {:?}",
        spared.seen()
    );

    // Reconnecting is refused while the fault lasts...
    let mut again = ConnClient::start(&inside, "pg-connect", &["127.0.0.1", &port]);
    let refused = again.expect("error", Duration::from_secs(10));
    // libpq reports the connect's errno as text only.
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("Connection refused")),
        "a reconnect inside should be refused: {refused}"
    );
    let (ok, out) = psql(&inside, "select 1");
    assert!(
        !ok && out.contains("Connection refused"),
        "psql inside should say \"Connection refused\": {out}"
    );
    // ...and works once the fault is removed.
    remove(&mut faults, &fault.id).await;
    let (ok, out) = psql(&inside, "select 1");
    assert!(
        ok && out.trim() == "1",
        "after Remove psql inside must work: {out}"
    );
}

/// `redis-cli PUBLISH channel message` from `workload`; returns the receiver count.
fn publish(workload: &Workload, channel: &str, message: &str) -> String {
    let mut cmd = workload.command("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string()])
        .args(["PUBLISH", channel, message]);
    String::from_utf8_lossy(&output(&mut cmd).stdout)
        .trim()
        .to_string()
}

fn expect_message(client: &mut ConnClient, data: &str) {
    let message = client.expect("message", Duration::from_secs(5));
    assert_eq!(message["data"], data, "unexpected message {message}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn reset_ends_a_subscriber_inside_and_spares_one_outside() {
    let scene = RedisScene::start(fd_probe!()).await;
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    let mut faults = scene.faultd.faults();
    let channel = "faultd-test";

    let mut inside_sub = ConnClient::start(
        &scene.inside,
        "redis-subscribe",
        &["127.0.0.1", "6379", channel],
    );
    let mut outside_sub =
        ConnClient::start(&outside, "redis-subscribe", &["127.0.0.1", "6379", channel]);
    // And redis-cli itself, as a user would hold a subscription open.
    let cli_log = Arc::new(Mutex::new(String::new()));
    let mut cli = {
        let mut cmd = scene.inside.command("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string()])
            .args(["SUBSCRIBE", channel])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ChildGuard::spawn("redis-cli SUBSCRIBE", &mut cmd)
    };
    for pipe in [
        cli.child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        cli.child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let log = Arc::clone(&cli_log);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut log = log.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
    }
    inside_sub.expect("ready", Duration::from_secs(10));
    outside_sub.expect("ready", Duration::from_secs(10));
    let cli_text = || cli_log.lock().expect("log lock").clone();
    poll(Duration::from_secs(10), || {
        (publish(&outside, channel, "before") == "3").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "three subscribers expected; redis-cli printed: {}",
            cli_text()
        )
    });
    expect_message(&mut inside_sub, "before");
    expect_message(&mut outside_sub, "before");

    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Unspecified,
    );
    let (_, acked) = inject(
        &mut faults,
        with_ttl(reset_fault(target, None), Duration::from_secs(30)),
    )
    .await;
    let died = inside_sub.expect("error", Duration::from_secs(5));
    let after_ms = ms(at(&died) - acked);
    eprintln!(
        "MEASURE reset_redis_subscriber_error_after_ack_ms={after_ms:.1} errno={} ({}) redis-py {}: {}",
        errno(&died),
        died["errno_name"],
        died["type"],
        died["error"]
    );
    assert!(
        after_ms < ERROR_BOUND_MS,
        "the subscriber inside died {after_ms:.1} ms after the Inject ack (bound {ERROR_BOUND_MS} ms)"
    );
    assert!(
        [ECONNRESET, ECONNABORTED, EPIPE, -1].contains(&errno(&died))
            && died["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("redis")),
        "the subscriber should die with a connection error: {died}"
    );
    let status = wait_timeout(&mut cli.child, Duration::from_secs(5));
    let printed = cli_text();
    assert!(
        status.is_some_and(|s| !s.success())
            && (printed.contains("connection abort") || printed.contains("reset by peer")),
        "redis-cli SUBSCRIBE inside should exit with a connection error ({status:?}): {printed}"
    );
    eprintln!(
        "MEASURE reset_redis_cli_subscriber {}",
        printed.lines().last().unwrap_or_default()
    );
    assert_eq!(
        publish(&outside, channel, "after"),
        "1",
        "only the subscriber outside should still be there"
    );
    expect_message(&mut outside_sub, "after");
}

/// The writes a writer knows landed must be exactly 0..next: none skipped, none twice.
fn assert_contiguous(name: &str, ids: &[u64], next: u64) {
    let gap = ids
        .iter()
        .enumerate()
        .find(|(k, id)| *k as u64 != **id)
        .map(|(k, id)| format!("position {k} holds write {id}"));
    assert!(
        ids.len() as u64 == next && gap.is_none(),
        "the {name} writer's known writes should be 0..{next}, it knows {} ({})",
        ids.len(),
        gap.unwrap_or_default()
    );
}

/// The payload the writers store for write `i` (as tests/clients/conn_client.py makes it).
fn payload(i: u64) -> String {
    format!("{i:08}:").repeat(512)[..4096].to_string()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn writes_through_a_reset_are_neither_lost_nor_duplicated() {
    let scene = RedisScene::start(fd_probe!()).await;
    let _postgres = Postgres::start(&scene.netns);
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let outside = Workload::outside(fd_probe!(), netns);
    let mut faults = faultd.faults();
    let table = format!("writes_{}", std::process::id());

    let mut redis_writer =
        ConnClient::start(inside, "redis-writer", &["127.0.0.1", "6379", "w", "5"]);
    let mut pg_writer = ConnClient::start(
        inside,
        "pg-writer",
        &["127.0.0.1", &POSTGRES_PORT.to_string(), &table, "5"],
    );
    redis_writer.expect("writing", Duration::from_secs(20));
    pg_writer.expect("writing", Duration::from_secs(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = cgroup_target(
        cgroup,
        &[REDIS_PORT, POSTGRES_PORT],
        Protocol::Tcp,
        Direction::Unspecified,
    );
    let (fault, _) = inject(
        &mut faults,
        with_ttl(reset_fault(target, None), Duration::from_secs(2)),
    )
    .await;
    let reset_count = get_fault(&mut faults, &fault.id)
        .await
        .counters
        .unwrap_or_default()
        .reset;
    let redis_done = redis_writer.expect("done", Duration::from_secs(40));
    let pg_done = pg_writer.expect("done", Duration::from_secs(40));
    for (name, done) in [("redis", &redis_done), ("postgres", &pg_done)] {
        eprintln!(
            "MEASURE {name}_writer writes={} acked={} verified_after_error={} errors={} first_error={}",
            done["next"],
            done["acked"].as_array().map_or(0, Vec::len),
            done["verified"].as_array().map_or(0, Vec::len),
            done["errors"],
            done["first_error"]
        );
    }
    assert!(
        reset_count >= 2,
        "the fault should have reset both writers' connections: {reset_count}"
    );

    for (name, done) in [("redis", &redis_done), ("postgres", &pg_done)] {
        assert!(
            done["errors"].as_u64().unwrap_or(0) >= 1,
            "the {name} writer never saw the reset: the test proves nothing ({done})"
        );
        assert!(
            done["acked"].as_array().is_some_and(|a| a.len() >= 10),
            "the {name} writer made little progress: {done}"
        );
    }

    // Redis: every write the client knows landed holds its whole payload; nothing beyond.
    let ids = |done: &serde_json::Value| -> Vec<u64> {
        let mut ids: Vec<u64> = ["acked", "verified"]
            .iter()
            .flat_map(|k| done[*k].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_u64())
            .collect();
        ids.sort_unstable();
        ids
    };
    let redis_ids = ids(&redis_done);
    let next = redis_done["next"].as_u64().expect("next");
    assert_contiguous("redis", &redis_ids, next);
    let mut keys = outside.command("redis-cli");
    keys.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string(), "--scan"])
        .args(["--pattern", "w:*"]);
    let stored = String::from_utf8_lossy(&output(&mut keys).stdout).into_owned();
    let stored_count = stored.lines().filter(|l| !l.is_empty()).count() as u64;
    assert_eq!(
        stored_count, next,
        "Redis holds {stored_count} keys w:*, the writer wrote {next}"
    );
    for i in (0..next)
        .step_by(((next / 20).max(1)) as usize)
        .chain([next - 1])
    {
        let mut get = outside.command("redis-cli");
        get.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string()])
            .args(["GET", &format!("w:{i}")]);
        let value = String::from_utf8_lossy(&output(&mut get).stdout)
            .trim_end()
            .to_string();
        assert!(
            value == payload(i),
            "w:{i} holds {} bytes, not its whole payload",
            value.len()
        );
    }

    // PostgreSQL: each known write exactly once, whole; no row the writer did not know about.
    let pg_ids = ids(&pg_done);
    let next = pg_done["next"].as_u64().expect("next");
    assert_contiguous("postgres", &pg_ids, next);
    let mut check = outside.command("psql");
    check
        .args(["-h", "127.0.0.1", "-p", &POSTGRES_PORT.to_string(), "-U"])
        .args(["postgres", "-Atc"])
        .arg(format!(
            "select count(*), count(distinct id), coalesce(min(id), -1), coalesce(max(id), -1), \
             count(*) filter (where payload <> substr(repeat(lpad(id::text, 8, '0') || ':', 512), 1, 4096)) \
             from {table}"
        ));
    let out = String::from_utf8_lossy(&output(&mut check).stdout)
        .trim()
        .to_string();
    let expected = format!("{next}|{next}|0|{}|0", next as i64 - 1);
    assert_eq!(
        out, expected,
        "rows|distinct ids|min|max|partial payloads in {table} (expected every write 0..{next} once, whole)"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn reset_after_bytes_cuts_each_connection_once_it_carried_that_much() {
    const LIMIT: u64 = 200_000;
    const CHUNK: u64 = 10_000;
    let scene = RedisScene::start(fd_probe!()).await;
    let mut faults = scene.faultd.faults();
    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Unspecified,
    );
    let (fault, _) = inject(
        &mut faults,
        with_ttl(reset_fault(target, Some(LIMIT)), Duration::from_secs(30)),
    )
    .await;
    assert_eq!(fault.mechanism, "sock_diag", "{fault:?}");
    // 10 kB every 10 ms: about 1 MB/s, so the limit is reached after about 0.2 s.
    let mut stream = ConnClient::start(
        &scene.inside,
        "redis-stream",
        &["127.0.0.1", "6379", &CHUNK.to_string(), "10", "3"],
    );
    let mut cuts = Vec::new();
    for _ in 0..2 {
        stream.expect("connected", Duration::from_secs(10));
        let cut = stream.expect("error", Duration::from_secs(5));
        cuts.push(cut["carried"].as_u64().unwrap_or(0));
    }
    eprintln!("MEASURE reset_after_bytes limit={LIMIT} carried_at_reset={cuts:?}");
    for carried in &cuts {
        // At 1 MB/s and a 5 ms watch, the reset lands within a chunk or two of the limit; the
        // bound leaves 100 ms for a busy machine to schedule the watcher.
        assert!(
            (LIMIT - 2 * CHUNK..=LIMIT + 10 * CHUNK).contains(carried),
            "a connection was reset after carrying {carried} bytes; the limit is {LIMIT}"
        );
    }
    // New connections were allowed: the client reconnected after the first cut.
    let counted = get_counters_until(&mut faults, &fault.id, |c| c.reset >= 2).await;
    let counters = counted.counters.unwrap_or_default();
    assert!(
        counters.reset >= 2 && counters.refused == 0,
        "expected two resets and no refused connect: {counters:?}"
    );
}
