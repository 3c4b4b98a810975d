//! What faultd shows about its faults: Prometheus counters that rise while a drop hits a real
//! Redis client and agree with the losses that client's TCP stack saw, /healthz, Watch events
//! (applied, expired) through `faultctl watch`, and what an ended fault did (cumulative totals,
//! Get and `faultctl list --ended`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultd_proto::v1::{Direction, Protocol};
use faultd_tests::api::{cgroup_target, drop_fault, with_ttl};
use faultd_tests::http::{get, sample};
use faultd_tests::process::{ChildGuard, blocking, output};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::{Faultctl, FaultdOptions, RedisScene, fd_probe};

/// SET commands the client sends, each small enough to be one TCP segment.
const SETS: usize = 300;
const DROP_PERCENT: f64 = 10.0;

/// One end of a TCP connection as `ss -tin` shows it (the kernel's tcp_info).
#[derive(Debug, Clone)]
struct Socket {
    local_port: u16,
    peer_port: u16,
    segs_out: u64,
    segs_in: u64,
}

/// The established TCP sockets `ss -tinH` printed: a line with the addresses, then one with
/// the info.
fn sockets(ss: &str) -> Vec<Socket> {
    let lines: Vec<&str> = ss.lines().collect();
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse().ok());
    let number = |text: &str, name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix(':')?.parse::<u64>().ok())
    };
    lines
        .windows(2)
        .filter_map(|pair| {
            let addrs: Vec<&str> = pair[0].split_whitespace().collect();
            if addrs.len() < 4 || pair[1].starts_with(|c: char| !c.is_whitespace()) {
                return None;
            }
            Some(Socket {
                local_port: port(addrs[addrs.len() - 2])?,
                peer_port: port(addrs[addrs.len() - 1])?,
                segs_out: number(pair[1], "segs_out")?,
                segs_in: number(pair[1], "segs_in")?,
            })
        })
        .collect()
}

/// Number of SET calls Redis has served (`INFO commandstats`), asked from outside the cgroup.
fn sets_served(scene: &RedisScene) -> u64 {
    let mut cmd = scene.netns.exec("redis-cli");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &REDIS_PORT.to_string(),
        "INFO",
        "commandstats",
    ]);
    let out = output(&mut cmd);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn metrics_rise_with_a_drop_on_redis_and_match_the_clients_losses() {
    let scene = RedisScene::start_with(fd_probe!(), FaultdOptions::with_metrics()).await;
    let metrics = scene.faultd.metrics_addr();
    let mut faults = scene.faultd.faults();

    let (status, health) = get(&metrics, "/healthz");
    assert_eq!(status, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["datapath"]["loaded"], true, "{health}");
    assert_eq!(
        health["datapath"]["actions"]["drop"]["mechanism"], "cgroup_skb",
        "{health}"
    );
    assert!(
        health["capabilities"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["name"] == "cgroup_skb" && c["available"] == true)),
        "/healthz reports the probe: {health}"
    );

    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Egress,
    );
    let fault = faults
        .inject(with_ttl(
            drop_fault(DROP_PERCENT, target),
            Duration::from_secs(300),
        ))
        .await
        .unwrap()
        .into_inner();
    let series = |name: &str, effect: Option<&str>| {
        let effect = effect
            .map(|e| format!(",effect=\"{e}\""))
            .unwrap_or_default();
        format!(
            "{name}{{fault=\"{}\",lease=\"{}\",action=\"drop\",mechanism=\"cgroup_skb\"{effect}}}",
            fault.id, fault.lease_id
        )
    };
    let matched_series = series("faultd_fault_packets_matched_total", None);
    let dropped_series = series("faultd_fault_packets_affected_total", Some("dropped"));
    let scrape = || {
        let (status, text) = get(&metrics, "/metrics");
        assert_eq!(status, 200, "{text}");
        let matched = sample(&text, &matched_series)
            .unwrap_or_else(|| panic!("no {matched_series} in:\n{text}"));
        let dropped = sample(&text, &dropped_series)
            .unwrap_or_else(|| panic!("no {dropped_series} in:\n{text}"));
        (matched as u64, dropped as u64, text)
    };
    let (_, _, text) = scrape();
    assert_eq!(
        sample(
            &text,
            r#"faultd_faults_active{action="drop",mechanism="cgroup_skb"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "faultd_leases_active"), Some(1.0), "{text}");

    // A real redis-cli in the cgroup, fed SET commands on stdin over one connection; the test
    // keeps stdin open so the connection (and its tcp_info) lives until it has been read.
    let mut cmd = scene.inside.command("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut client = ChildGuard::spawn("redis-cli", &mut cmd);
    let mut stdin = client.child.stdin.take().unwrap();
    let stdout = client.child.stdout.take().unwrap();
    // Drain the replies so the client never blocks on a full pipe.
    let replies = std::thread::spawn(move || BufReader::new(stdout).lines().count());
    let writer = std::thread::spawn(move || {
        for i in 0..SETS {
            writeln!(stdin, "SET key{i} value-{i}").expect("writing to redis-cli");
        }
        stdin
    });

    // Scrape while the client runs: the counters must rise during the load. A dropped request
    // costs the client a 200 ms wait (TCP's minimum timer) before it is sent again.
    let started = Instant::now();
    let mut seen = Vec::new();
    let done = loop {
        let served = blocking(|| sets_served(&scene));
        seen.push(scrape());
        if served >= SETS as u64 {
            break true;
        }
        if started.elapsed() > Duration::from_secs(120) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(done, "redis-cli did not finish {SETS} SETs within 120 s");
    let rising: Vec<(u64, u64)> = seen.iter().map(|(m, d, _)| (*m, *d)).collect();
    assert!(
        rising
            .windows(2)
            .all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1),
        "counters must never go down: {rising:?}"
    );
    let last = *rising.last().unwrap();
    let during = rising
        .iter()
        .filter(|(m, d)| *m > 0 && *d > 0 && *m < last.0)
        .count();
    assert!(
        during > 0,
        "matched and dropped should rise while the client runs, not only at the end: {rising:?}"
    );

    // Let the last replies be acknowledged, then read both ends of the connection and the
    // metrics at one moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ss = scene.netns.exec("ss");
    ss.args(["-tinH", "state", "established"]);
    let ss_out = String::from_utf8_lossy(&output(&mut ss).stdout).into_owned();
    let (matched, dropped, _) = scrape();
    let all = sockets(&ss_out);
    let client_end = all
        .iter()
        .filter(|s| s.peer_port == REDIS_PORT && s.local_port != REDIS_PORT)
        .max_by_key(|s| s.segs_out)
        .unwrap_or_else(|| panic!("no client connection to Redis in `ss`:\n{ss_out}"))
        .clone();
    let server_end = all
        .iter()
        .find(|s| s.local_port == REDIS_PORT && s.peer_port == client_end.local_port)
        .unwrap_or_else(|| {
            panic!(
                "no server end of port {} in `ss`:\n{ss_out}",
                client_end.local_port
            )
        })
        .clone();
    let stdin = writer.join().expect("writer");
    drop(stdin);
    let reply_lines = blocking(|| replies.join()).expect("reader");
    drop(client);

    // What the client lost: segments its TCP sent (tcp_info segs_out, every attempt counted)
    // that Redis's end never received (segs_in).
    let lost = client_end.segs_out.saturating_sub(server_end.segs_in);
    eprintln!(
        "MEASURE redis_drop_{DROP_PERCENT}pct client sent {} segments, Redis received {}: \
         {lost} lost ({:.2}%); faultd metrics: matched {matched}, dropped {dropped} ({:.2}%); \
         {reply_lines} replies in {:.1}s",
        client_end.segs_out,
        server_end.segs_in,
        lost as f64 * 100.0 / client_end.segs_out as f64,
        dropped as f64 * 100.0 / matched as f64,
        started.elapsed().as_secs_f64()
    );
    let within_5pct = |a: u64, b: u64| (a as f64 - b as f64).abs() <= 0.05 * b as f64;
    assert!(
        within_5pct(matched, client_end.segs_out),
        "faultd_fault_packets_matched_total is {matched}, but the client sent {} segments",
        client_end.segs_out
    );
    assert!(
        within_5pct(dropped, lost),
        "faultd_fault_packets_affected_total{{effect=dropped}} is {dropped}, but the client lost \
         {lost} segments (sent {}, Redis received {})",
        client_end.segs_out,
        server_end.segs_in
    );
    assert!(
        lost > 0 && (dropped as f64 / matched as f64 - DROP_PERCENT / 100.0).abs() < 0.05,
        "a {DROP_PERCENT}% drop dropped {dropped} of {matched} packets"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_watch_prints_applied_and_expired_events() {
    let scene = RedisScene::start(fd_probe!()).await;
    let faultctl = Faultctl::new(&scene.faultd);
    let mut cmd: Command = faultctl.command();
    cmd.args(["--output", "json", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watch = ChildGuard::spawn("faultctl watch", &mut cmd);
    let stdout = watch.child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream is open once faultd counts the Watch call.
    let mut faults = scene.faultd.faults();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Longer than redis-cli's 3 s timeout below, so the fault is surely in force for it.
    let ttl = Duration::from_secs(4);
    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Egress,
    );
    let fault = faults
        .inject(with_ttl(drop_fault(100.0, target), ttl))
        .await
        .unwrap()
        .into_inner();
    let deadline = faultd_tests::api::unix_ns(fault.expires_at.as_ref().unwrap());
    let run = scene.inside.redis_ping();
    assert!(run.timed_out(), "the fault is in force: {run}");

    let next = |what: &str| {
        blocking(|| lines_rx.recv_timeout(Duration::from_secs(10)))
            .unwrap_or_else(|_| panic!("`faultctl watch` printed no {what} event within 10 s"))
    };
    let applied: serde_json::Value = serde_json::from_str(&next("applied")).unwrap();
    assert!(applied.get("applied").is_some(), "{applied}");
    assert_eq!(applied["fault"]["id"], fault.id.as_str(), "{applied}");
    assert_eq!(applied["fault"]["state"], "ACTIVE", "{applied}");
    assert_eq!(applied["fault"]["mechanism"], "cgroup_skb", "{applied}");

    let expired: serde_json::Value = serde_json::from_str(&next("expired")).unwrap();
    assert_eq!(expired["reverted"]["reason"], "EXPIRED", "{expired}");
    assert_eq!(expired["fault"]["id"], fault.id.as_str(), "{expired}");
    assert_eq!(expired["fault"]["state"], "REVERTED", "{expired}");
    // The redis-cli SYNs the fault dropped are in the final counters.
    let dropped = expired["fault"]["counters"]["dropped"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        dropped > 0,
        "the expired event carries the final counters: {expired}"
    );
    let at = expired["time"].as_str().unwrap();
    let at = prost_types::Timestamp::from_str_or_panic(at);
    let late_ms = (faultd_tests::api::unix_ns(&at) - deadline) as f64 / 1e6;
    assert!(
        (0.0..250.0).contains(&late_ms),
        "the expired event should come at the lease deadline: {late_ms:.1} ms after it"
    );
    let run = scene.inside.redis_ping();
    assert!(
        run.answered(),
        "after the expiry Redis answers again: {run}"
    );
    assert!(
        matches!(watch.child.try_wait(), Ok(None)),
        "faultctl watch keeps running after the events"
    );
}

/// RFC 3339 → protobuf timestamp.
trait FromRfc3339 {
    fn from_str_or_panic(text: &str) -> prost_types::Timestamp;
}

impl FromRfc3339 for prost_types::Timestamp {
    fn from_str_or_panic(text: &str) -> prost_types::Timestamp {
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} is not an RFC 3339 time: {e:?}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn what_a_fault_did_outlives_it_in_metrics_get_and_list() {
    let scene = RedisScene::start_with(fd_probe!(), FaultdOptions::with_metrics()).await;
    let metrics = scene.faultd.metrics_addr();
    let mut faults = scene.faultd.faults();
    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Egress,
    );
    let fault = faults
        .inject(with_ttl(drop_fault(100.0, target), Duration::from_secs(2)))
        .await
        .unwrap()
        .into_inner();
    let deadline = faultd_tests::api::unix_ns(fault.expires_at.as_ref().unwrap());

    // A client in the cgroup fails for as long as the 2 s fault lasts.
    let ping = || {
        let mut cmd = scene.inside.command("timeout");
        cmd.args([
            "1",
            "redis-cli",
            "-h",
            "127.0.0.1",
            "-p",
            &REDIS_PORT.to_string(),
            "PING",
        ]);
        String::from_utf8_lossy(&output(&mut cmd).stdout).contains("PONG")
    };
    assert!(!blocking(ping), "the client got an answer under the drop");

    // Scraped 3 s after the fault ended, as a Prometheus scrape between two runs would be.
    let wait_ns = deadline + 3_000_000_000 - faultd_tests::process::unix_ns();
    tokio::time::sleep(Duration::from_nanos(wait_ns.max(0) as u64)).await;
    assert!(blocking(ping), "Redis answers again after the fault");
    let (status, text) = get(&metrics, "/metrics");
    assert_eq!(status, 200, "{text}");
    let labels = r#"action="drop",mechanism="cgroup_skb",scope="cgroup""#;
    let matched = sample(&text, &format!("faultd_packets_matched_total{{{labels}}}"))
        .unwrap_or_else(|| panic!("no cumulative matched total in:\n{text}"));
    let dropped = sample(
        &text,
        &format!("faultd_packets_affected_total{{{labels},effect=\"dropped\"}}"),
    )
    .unwrap_or_else(|| panic!("no cumulative dropped total in:\n{text}"));
    assert!(
        dropped > 0.0 && matched >= dropped,
        "the totals keep what the ended fault did: matched {matched}, dropped {dropped}"
    );
    assert!(
        !text.contains(&format!("fault=\"{}\"", fault.id)),
        "per-fault series end with the fault:\n{text}"
    );

    // Get answers with the final counters and the reason.
    let ended = faultd_tests::api::get_fault(&mut faults, &fault.id).await;
    assert_eq!(ended.state(), faultd_proto::v1::FaultState::Reverted);
    assert_eq!(
        ended.end_reason(),
        faultd_proto::v1::RevertReason::Expired,
        "{ended:?}"
    );
    let counters = ended.counters.unwrap_or_default();
    assert_eq!(
        (counters.matched as f64, counters.dropped as f64),
        (matched, dropped),
        "Get's final counters and the totals of this agent's only fault"
    );
    let ended_at = faultd_tests::api::unix_ns(ended.ended_at.as_ref().expect("ended_at"));
    let late_ms = (ended_at - deadline) as f64 / 1e6;
    assert!(
        (0.0..250.0).contains(&late_ms),
        "ended_at should be the deadline: {late_ms:.1} ms after it"
    );

    // faultctl lists it among the ended faults only.
    let faultctl = Faultctl::new(&scene.faultd);
    let active = faultctl.run(&["list"]);
    assert!(
        !active.assert_success().stdout().contains(&fault.id),
        "{active}"
    );
    let listed = faultctl.run(&["list", "--ended"]);
    let text = listed.assert_success().stdout();
    assert!(
        text.contains(&fault.id) && text.contains("ended: expired"),
        "faultctl list --ended: {listed}"
    );
    let json = faultctl.run(&["--output", "json", "list", "--ended"]);
    let json: serde_json::Value = serde_json::from_str(&json.assert_success().stdout()).unwrap();
    assert_eq!(json["faults"][0]["endReason"], "EXPIRED", "{json}");
    assert_eq!(
        json["faults"][0]["counters"]["dropped"].as_f64(),
        Some(dropped),
        "{json}"
    );
}
