//! Delay and bandwidth on this host's kernel (no sch_netem, no sch_fq: the NFQUEUE mechanism),
//! measured the way a user would: Redis PING round trips timed by the client itself, the time
//! a GET of a large value takes, and what netfilter holds after faultd is killed.
//!
//! The tests in this file run one at a time (`SERIAL`): they measure time, and the machine has
//! two cores.

use std::process::Command;
use std::time::Duration;

use faultd_proto::v1::{CapabilitiesRequest, Capability, Direction, Mechanism, Protocol};
use faultd_tests::api::{
    bandwidth_fault, cgroup_target, delay_fault, get_fault, grant, lease_deadline, list_faults,
    remove, under_lease, with_peers, with_ttl,
};
use faultd_tests::process::{ChildGuard, Stopped, blocking, output, poll};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::stats::{mean, median, quantile, stddev};
use faultd_tests::workload::{RttRun, Workload};
use faultd_tests::{Faultctl, Faultd, FaultdOptions, NetNs, Redis, RedisScene, TempDir, fd_probe};
use tonic::Code;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PINGS: u32 = 200;
const INTERVAL: Duration = Duration::from_millis(10);
const MS: Duration = Duration::from_millis(1);

fn ms(n: u64) -> Duration {
    MS * n as u32
}

/// `iptables-save` and `ip6tables-save` of a namespace (None: faultd's own, the host's).
fn netfilter_rules(netns: Option<&NetNs>) -> String {
    let mut text = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let mut cmd = match netns {
            Some(netns) => netns.exec(tool),
            None => Command::new(tool),
        };
        let out = output(&mut cmd);
        assert!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    text
}

/// Raises a server's priority as fd-probe raises its own (the lowest real-time priority, else
/// nice -10): the round trips then measure the delay, not how long a busy machine's run queue
/// kept Redis from answering. Redis sleeps in epoll between the probe's requests.
fn prioritize(pid: u32) {
    faultd_tests::sys::prioritize(pid)
        .unwrap_or_else(|e| panic!("raising the priority of pid {pid}: {e}"));
}

fn summary(run: &RttRun) -> String {
    let rtts = run.rtts();
    format!(
        "n={} failed={} median={:.2}ms p99={:.2}ms max={:.2}ms sd={:.2}ms connect={:.2}ms",
        rtts.len(),
        run.failures(),
        median(&rtts),
        quantile(&rtts, 0.99),
        quantile(&rtts, 1.0),
        stddev(&rtts),
        run.connect_ms
    )
}

/// The scene with Redis at the probe's priority and a resident process of the workload (the
/// guard that ends it, dropped before the scene).
async fn start_scene() -> (RedisScene, ChildGuard) {
    start_scene_with(FaultdOptions::default()).await
}

async fn start_scene_with(options: FaultdOptions) -> (RedisScene, ChildGuard) {
    let scene = RedisScene::start_with(fd_probe!(), options).await;
    prioritize(scene.redis.pid());
    let app = scene.inside.resident();
    (scene, app)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_100ms_egress_delay_adds_100ms_per_round_trip_inside_the_cgroup_only() {
    let _serial = SERIAL.lock().await;
    let (scene, _app) = start_scene().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let outside = Workload::outside(fd_probe!(), netns);

    let base_in = blocking(|| inside.redis_rtt(PINGS, INTERVAL));
    let base_out = blocking(|| outside.redis_rtt(PINGS, INTERVAL));
    eprintln!("baseline inside:  {}", summary(&base_in));
    eprintln!("baseline outside: {}", summary(&base_out));

    let mut faults = faultd.faults();
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let fault = faults
        .inject(with_ttl(
            delay_fault(ms(100), Duration::ZERO, 0.0, Mechanism::Unspecified, target),
            Duration::from_secs(120),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a 100 ms delay failed: {s:?}\n{}", faultd.log()))
        .into_inner();
    assert_eq!(
        fault.mechanism, "nfqueue",
        "this kernel has neither sch_netem nor sch_fq: the delay must be applied by NFQUEUE"
    );

    let delayed = blocking(|| inside.redis_rtt(PINGS, INTERVAL));
    let neighbour = blocking(|| outside.redis_rtt(PINGS, INTERVAL));
    eprintln!("delayed inside:   {}", summary(&delayed));
    eprintln!("delayed outside:  {}", summary(&neighbour));
    assert_eq!(
        delayed.failures(),
        0,
        "PINGs failed under a delay: {delayed:?}"
    );

    let rtts = delayed.rtts();
    let added = median(&rtts) - median(&base_in.rtts());
    let p99 = quantile(&rtts, 0.99);
    eprintln!(
        "MEASURE delay_nfqueue_100ms_median_added_ms={added:.3} error_ms={:+.3} p99_ms={p99:.3} \
         p99_error_ms={:+.3}",
        added - 100.0,
        p99 - 100.0 - median(&base_in.rtts())
    );
    assert!(
        (added - 100.0).abs() <= 2.0,
        "a 100 ms egress delay added {added:.2} ms to the median PING round trip (want 100 ± 2 ms: \
         only the request is delayed, not the reply): {}",
        summary(&delayed)
    );
    assert!(
        p99 < 110.0,
        "p99 PING round trip under a 100 ms delay is {p99:.2} ms (want < 110 ms): {}",
        summary(&delayed)
    );
    // The SYN leaves late like any packet, once: connection setup takes one delay, not more.
    assert!(
        (95.0..110.0).contains(&delayed.connect_ms),
        "connect() took {:.2} ms under a 100 ms egress delay (want about 100 ms)",
        delayed.connect_ms
    );
    let drift = median(&neighbour.rtts()) - median(&base_out.rtts());
    eprintln!("MEASURE delay_outside_median_change_ms={drift:+.3}");
    assert!(
        drift.abs() <= 1.0,
        "a client outside the cgroup saw its median PING change by {drift:+.2} ms (want within \
         1 ms): {}",
        summary(&neighbour)
    );

    // IPv6 goes through ip6tables: the same delay.
    let v6 = blocking(|| inside.redis_rtt_at("[::1]", 50, INTERVAL));
    let added_v6 = median(&v6.rtts()) - median(&base_in.rtts());
    eprintln!("delayed inside over IPv6: {}", summary(&v6));
    assert!(
        (added_v6 - 100.0).abs() <= 3.0,
        "over IPv6 the delay added {added_v6:.2} ms (want about 100): {}",
        summary(&v6)
    );

    let seen = get_fault(&mut faults, &fault.id).await;
    let counters = seen.counters.unwrap_or_default();
    assert!(
        counters.delayed >= u64::from(PINGS) && counters.matched >= counters.delayed,
        "Get should count at least {PINGS} delayed packets: {counters:?}"
    );

    // Remove releases what is held at once; nothing is lost (no retransmission).
    let probe = inside.redis_rtt_spawn(400, MS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let removed_at = faultd_tests::process::unix_ns();
    faults
        .remove(faultd_proto::v1::RemoveRequest {
            id: fault.id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("Remove failed: {s:?}"));
    let run = probe.finish();
    let worst = quantile(&run.rtts(), 1.0);
    let after: Vec<f64> = run
        .pings
        .iter()
        .filter(|p| p.at > removed_at + 50_000_000)
        .filter_map(|p| p.rtt_ms)
        .collect();
    assert!(
        run.failures() == 0 && worst < 110.0,
        "a PING held when the fault was removed should be released, not lost: {}",
        summary(&run)
    );
    assert!(
        after.len() >= 100 && median(&after) < 5.0,
        "after Remove the PINGs should be undelayed: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn jitter_has_the_requested_spread() {
    let _serial = SERIAL.lock().await;
    let (scene, _app) = start_scene().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let base = blocking(|| inside.redis_rtt(50, INTERVAL));

    // Through the CLI, in the units a person types.
    let cli = Faultctl::new(faultd);
    let injected = cli.run(&[
        "inject",
        "delay",
        "--cgroup",
        cgroup.path(),
        "--port",
        "6379",
        "--protocol",
        "tcp",
        "--direction",
        "egress",
        "--latency",
        "50ms",
        "--jitter",
        "20ms",
        "--correlation",
        "25",
        "--ttl",
        "60s",
    ]);
    injected.assert_success();
    assert!(
        injected
            .stdout()
            .contains("delay 50ms ±20ms 25% correlated tcp egress ports 6379"),
        "faultctl should echo the delay as typed: {injected}"
    );
    let listed = cli.run(&["list"]);
    listed.assert_success();
    assert!(
        listed.stdout().contains("delay 50ms ±20ms") && listed.stdout().contains("nfqueue"),
        "faultctl list should show the delay and its mechanism: {listed}"
    );

    let run = blocking(|| inside.redis_rtt(PINGS, INTERVAL));
    eprintln!("jittered inside: {}", summary(&run));
    assert_eq!(run.failures(), 0, "PINGs failed: {run:?}");
    let rtts = run.rtts();
    let sd = stddev(&rtts);
    let added = median(&rtts) - median(&base.rtts());
    eprintln!(
        "MEASURE jitter_nfqueue_50ms_20ms_sd_ms={sd:.3} sd_error_pct={:+.1} median_added_ms={added:.3} mean_ms={:.3}",
        (sd - 20.0) / 20.0 * 100.0,
        mean(&rtts)
    );
    assert!(
        (14.0..=26.0).contains(&sd),
        "50 ms ± 20 ms: the PING round trips' standard deviation is {sd:.2} ms (want 20 ms ± 30%): {}",
        summary(&run)
    );
    // The median of 200 draws of N(50, 20) itself varies with a standard deviation of
    // 1.25 * 20 / sqrt(200) = 1.8 ms: 3 of them is 44.7-55.3 ms. A flow's packets keep their
    // order, so a PING waits for the ACK the client sent 10 ms earlier if that one drew a longer
    // delay (the PING's delay is max(own, ACK's - 10 ms)), which lifts the median by up to
    // 6.5 ms when the ACK goes out separately. Measured: 47.2-56.9 ms.
    assert!(
        (44.5..=62.0).contains(&added),
        "50 ms ± 20 ms added {added:.2} ms to the median round trip (want 44.5-62 ms: 50 within \
         three standard deviations of a 200-sample median, plus what keeping the flow's order \
         adds): {}",
        summary(&run)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn an_ingress_delay_holds_what_the_workload_receives() {
    let _serial = SERIAL.lock().await;
    let (scene, _app) = start_scene().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let base = blocking(|| inside.redis_rtt(50, INTERVAL));
    let mut faults = faultd.faults();
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Ingress);
    faults
        .inject(with_ttl(
            delay_fault(ms(50), Duration::ZERO, 0.0, Mechanism::Nfqueue, target),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of an ingress delay failed: {s:?}"));
    let run = blocking(|| inside.redis_rtt(100, INTERVAL));
    eprintln!("ingress-delayed inside: {}", summary(&run));
    let added = median(&run.rtts()) - median(&base.rtts());
    eprintln!("MEASURE delay_nfqueue_ingress_50ms_median_added_ms={added:.3}");
    assert!(
        (added - 50.0).abs() <= 2.0,
        "a 50 ms ingress delay added {added:.2} ms to the median PING (want 50 ± 2): {}",
        summary(&run)
    );
    // Redis's own side of the connection (outside the cgroup) is not delayed twice.
    let outside = Workload::outside(fd_probe!(), netns);
    let neighbour = blocking(|| outside.redis_rtt(50, INTERVAL));
    assert!(
        median(&neighbour.rtts()) < 5.0,
        "a client outside the cgroup was slowed by the ingress delay: {}",
        summary(&neighbour)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn the_delay_ends_at_the_lease_deadline() {
    let _serial = SERIAL.lock().await;
    let (scene, _app) = start_scene().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let base = blocking(|| inside.redis_rtt(50, INTERVAL));
    let base_median = median(&base.rtts());
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();
    let lease = grant(&mut leases, Duration::from_secs(2)).await;
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    faults
        .inject(under_lease(
            delay_fault(ms(100), Duration::ZERO, 0.0, Mechanism::Unspecified, target),
            &lease.id,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject under lease {} failed: {s:?}", lease.id));

    // Renewed twice, 1.5 s apart: the delay must hold past the first deadline (the lanes and
    // the rules' own end move with the lease), then end at the last one.
    let probe = inside.redis_rtt_spawn(250, INTERVAL);
    let mut renewed = lease;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        renewed = leases
            .renew(faultd_proto::v1::RenewRequest {
                lease_id: renewed.id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("Renew failed: {s:?}"))
            .into_inner();
    }
    let deadline = lease_deadline(&renewed);
    let run = probe.finish();
    let ms_to_deadline = |at: i128| (deadline - at) as f64 / 1e6;
    let mut before = 0;
    let mut after = Vec::new();
    for ping in &run.pings {
        let rtt = ping
            .rtt_ms
            .unwrap_or_else(|| panic!("a PING failed around the lease deadline: {run:?}"));
        let left = ms_to_deadline(ping.at);
        if left >= 100.0 {
            before += 1;
            assert!(
                rtt >= 99.0,
                "a PING sent {left:.1} ms before the deadline took only {rtt:.2} ms: the delay \
                 ended early"
            );
        } else if left > 0.0 {
            // Held at most until the deadline, then released.
            assert!(
                rtt <= left + base_median + 5.0 && rtt >= left - 1.0,
                "a PING sent {left:.1} ms before the deadline took {rtt:.2} ms (want about \
                 {left:.1} ms: released at the deadline)"
            );
        } else if left < -5.0 {
            after.push(rtt);
        }
    }
    assert!(
        before >= 30 && after.len() >= 100,
        "too few PINGs around the deadline ({before} before, {} after)",
        after.len()
    );
    let after_median = median(&after);
    eprintln!(
        "MEASURE delay_expiry_median_after_ms={after_median:.3} baseline_ms={base_median:.3} max_after_ms={:.3}",
        quantile(&after, 1.0)
    );
    assert!(
        (after_median - base_median).abs() <= 1.0,
        "after the lease deadline the median PING is {after_median:.2} ms, baseline {base_median:.2} ms"
    );
    assert!(
        quantile(&after, 1.0) < 50.0,
        "a PING sent after the deadline was still held: {:?}",
        quantile(&after, 1.0)
    );
    assert!(list_faults(&mut faults).await.is_empty());
    let gone = poll(Duration::from_secs(2), || {
        (!netfilter_rules(Some(netns)).contains("faultd:")).then_some(())
    });
    assert!(
        gone.is_some(),
        "the expired fault's NFQUEUE rules are still in the namespace:\n{}",
        netfilter_rules(Some(netns))
    );
}

/// The median PING round trip (ms) to each of `hosts`, 100 PINGs each.
fn medians(workload: &Workload, hosts: &[&str]) -> Vec<f64> {
    hosts
        .iter()
        .map(|host| {
            let run = blocking(|| workload.redis_rtt_at(host, 100, INTERVAL));
            eprintln!("  {host}: {}", summary(&run));
            assert_eq!(run.failures(), 0, "PINGs to {host} failed: {run:?}");
            median(&run.rtts())
        })
        .collect()
}

/// The scene (Redis on 127.0.0.1 and ::1) with a second Redis on the same port at 127.0.0.2,
/// both at the probe's priority, and a resident process of the workload.
async fn two_servers() -> (RedisScene, Redis, ChildGuard) {
    let (scene, app) = start_scene().await;
    let second = Redis::start_bound(&scene.netns, &["127.0.0.2"]);
    prioritize(second.pid());
    (scene, second, app)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_delay_with_peers_holds_only_the_traffic_to_those_peers() {
    let _serial = SERIAL.lock().await;
    let (scene, _second, _app) = two_servers().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let hosts = ["127.0.0.1", "127.0.0.2", "[::1]"];
    eprintln!("baseline:");
    let base = medians(inside, &hosts);
    let mut faults = faultd.faults();
    let target = || cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);

    // (peers, excluded peers, which of `hosts` are delayed)
    let cases: [(&[&str], &[&str], [bool; 3]); 3] = [
        (&["127.0.0.2/32"], &[], [false, true, false]),
        (&[], &["127.0.0.2"], [true, false, true]),
        (&["::1/128"], &[], [false, false, true]),
    ];
    for (peers, exclude, delayed) in cases {
        let fault = faults
            .inject(with_ttl(
                delay_fault(
                    ms(100),
                    Duration::ZERO,
                    0.0,
                    Mechanism::Unspecified,
                    with_peers(target(), peers, exclude),
                ),
                Duration::from_secs(120),
            ))
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "Inject of a 100 ms delay with peers {peers:?} except {exclude:?} failed: \
                     {s:?}\n{}",
                    faultd.log()
                )
            })
            .into_inner();
        assert_eq!(fault.mechanism, "nfqueue", "{fault:?}");
        let rules = netfilter_rules(Some(netns));
        let queued = |family: &str| {
            let table = match family {
                "v4" => rules.split("ip6tables").next().unwrap_or_default(),
                _ => rules.split("ip6tables").nth(1).unwrap_or_default(),
            };
            table.contains("NFQUEUE")
        };
        eprintln!("delay 100 ms, peers {peers:?} except {exclude:?}:");
        let now = medians(inside, &hosts);
        for (i, host) in hosts.iter().enumerate() {
            let added = now[i] - base[i];
            let tag = format!(
                "delay_nfqueue_100ms_peers_{}_{}",
                if exclude.is_empty() { "in" } else { "except" },
                host.trim_matches(['[', ']'])
            );
            eprintln!("MEASURE {tag}_median_added_ms={added:.3}");
            if delayed[i] {
                assert!(
                    (95.0..=105.0).contains(&added),
                    "a 100 ms delay with peers {peers:?} except {exclude:?} added {added:.2} ms \
                     to PINGs to {host} (want 100 ± 5)"
                );
            } else {
                assert!(
                    added.abs() <= 2.0,
                    "a delay with peers {peers:?} except {exclude:?} changed PINGs to {host} by \
                     {added:+.2} ms (want within 2 ms of baseline)"
                );
            }
        }
        // A family without a delayed peer has no queue rule.
        let v4_delayed = delayed[0] || delayed[1];
        assert_eq!(
            (queued("v4"), queued("v6")),
            (v4_delayed, delayed[2]),
            "NFQUEUE rules per family (IPv4, IPv6) for peers {peers:?} except {exclude:?}:\n{rules}"
        );
        remove(&mut faults, &fault.id).await;
        let left = poll(Duration::from_secs(5), || {
            let rules = netfilter_rules(Some(netns));
            (!rules.contains("FAULTD-")).then_some(())
        });
        assert!(
            left.is_some(),
            "after Remove faultd's rules and chains should be gone:\n{}",
            netfilter_rules(Some(netns))
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn bandwidth_with_peers_paces_only_the_matched_server() {
    let _serial = SERIAL.lock().await;
    let (scene, _second, _app) = two_servers().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    const VALUE: usize = 1 << 20;
    for host in ["127.0.0.1", "127.0.0.2"] {
        blocking(|| inside.redis_set_at(host, "faultd:big", VALUE));
        let (bytes, base) = blocking(|| inside.redis_get_at(host, "faultd:big"));
        assert!(
            bytes >= VALUE as u64 && base < 0.5,
            "baseline GET from {host}: {bytes} bytes in {base:.3} s"
        );
    }
    let mut faults = faultd.faults();
    // Both directions: the value comes in, ingress to the workload.
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Both);
    let fault = faults
        .inject(with_ttl(
            bandwidth_fault(256 << 10, 0, with_peers(target, &["127.0.0.2/32"], &[])),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a bandwidth fault with peers failed: {s:?}"))
        .into_inner();
    assert_eq!(fault.mechanism, "nfqueue", "{fault:?}");
    let (bytes, paced) = blocking(|| inside.redis_get_at("127.0.0.2", "faultd:big"));
    let (_, other) = blocking(|| inside.redis_get_at("127.0.0.1", "faultd:big"));
    eprintln!(
        "MEASURE bandwidth_nfqueue_256KiB_1MiB_peer_get_s={paced:.3} error_pct={:+.1} other_s={other:.4}",
        (paced - 4.0) / 4.0 * 100.0
    );
    assert!(bytes >= VALUE as u64);
    assert!(
        (3.6..=4.4).contains(&paced),
        "at 256 KiB/s a GET of 1 MiB from the peer 127.0.0.2 took {paced:.3} s (want 4 s ± 10%)"
    );
    assert!(
        other < 0.5,
        "the same GET from 127.0.0.1, not a peer of the fault, took {other:.3} s: it must not be \
         paced"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn bandwidth_paces_a_large_get_inside_the_cgroup_only() {
    let _serial = SERIAL.lock().await;
    let (scene, _app) = start_scene().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let outside = Workload::outside(fd_probe!(), netns);
    const VALUE: usize = 1 << 20;
    blocking(|| outside.redis_set("faultd:big", VALUE));
    let (bytes, base) = blocking(|| inside.redis_get("faultd:big"));
    assert!(
        bytes >= VALUE as u64 && base < 0.5,
        "baseline GET: {bytes} bytes in {base:.3} s"
    );

    let cli = Faultctl::new(faultd);
    let injected = cli.run(&[
        "inject",
        "bandwidth",
        "--cgroup",
        cgroup.path(),
        "--port",
        "6379",
        "--rate",
        "256KiB/s",
        "--ttl",
        "60s",
        "--output",
        "json",
    ]);
    injected.assert_success();
    let json: serde_json::Value = serde_json::from_str(&injected.stdout())
        .unwrap_or_else(|e| panic!("faultctl --output json printed no JSON ({e}): {injected}"));
    assert_eq!(json["bandwidth"]["rateBytesPerSec"], 262_144, "{json}");
    assert_eq!(json["mechanism"], "nfqueue", "{json}");

    let (bytes, paced) = blocking(|| inside.redis_get("faultd:big"));
    let (_, neighbour) = blocking(|| outside.redis_get("faultd:big"));
    eprintln!(
        "MEASURE bandwidth_nfqueue_256KiB_1MiB_get_s={paced:.3} error_pct={:+.1} outside_s={neighbour:.4} baseline_s={base:.4}",
        (paced - 4.0) / 4.0 * 100.0
    );
    assert!(bytes >= VALUE as u64);
    assert!(
        (3.6..=4.4).contains(&paced),
        "at 256 KiB/s a GET of 1 MiB inside the cgroup took {paced:.3} s (want 4 s ± 10%)"
    );
    assert!(
        neighbour < 0.5,
        "outside the cgroup the same GET took {neighbour:.3} s: it must not be paced"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn sigkill_during_a_delay_lets_traffic_flow_and_a_new_faultd_sweeps_the_rules() {
    let _serial = SERIAL.lock().await;
    let state = TempDir::new("faultd-test-state");
    let options = FaultdOptions::with_state_dir(state.path());
    let (mut scene, _app) = start_scene_with(options.clone()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &mut scene;
    let old = std::fs::read_to_string(state.path().join("instance"))
        .unwrap_or_else(|e| panic!("faultd wrote no instance id to its state directory: {e}"));
    let chain = format!("FAULTD-{}-", old.trim());

    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    faultd
        .faults()
        .inject(with_ttl(
            delay_fault(ms(100), Duration::ZERO, 0.0, Mechanism::Unspecified, target),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a delay failed: {s:?}"));
    assert!(
        netfilter_rules(Some(netns)).contains(&chain),
        "faultd's chain {chain}… should be in the namespace while the delay is active"
    );

    // PINGs back to back: whenever the kill comes, a request is most likely held.
    let probe = inside.redis_rtt_spawn(1500, MS);
    blocking(|| std::thread::sleep(Duration::from_millis(700)));
    let killed_at = faultd.kill();
    let run = probe.finish();
    let after_kill = |at: i128| (at - killed_at) as f64 / 1e6;
    assert_eq!(
        run.failures(),
        0,
        "PINGs failed across the SIGKILL: {run:?}"
    );
    let held: Vec<f64> = run
        .pings
        .iter()
        .filter(|p| p.at + (p.rtt_ms.unwrap_or(0.0) * 1e6) as i128 <= killed_at)
        .filter_map(|p| p.rtt_ms)
        .collect();
    assert!(
        !held.is_empty() && held.iter().all(|rtt| *rtt >= 99.0),
        "before the SIGKILL every PING should have been delayed: {held:?}"
    );
    // The first PING answered after the kill: how long traffic stood still.
    let first = run
        .pings
        .iter()
        .find(|p| p.at + (p.rtt_ms.unwrap_or(0.0) * 1e6) as i128 > killed_at)
        .unwrap_or_else(|| panic!("no PING was answered after the SIGKILL: {run:?}"));
    let recovered_ms = after_kill(first.at) + first.rtt_ms.unwrap_or(f64::MAX);
    eprintln!("MEASURE delay_sigkill_recovery_ms={recovered_ms:.1}");
    assert!(
        recovered_ms <= 1000.0,
        "after SIGKILL of faultd a PING waited until {recovered_ms:.1} ms after the kill (bound 1000 ms)"
    );
    let later: Vec<f64> = run
        .pings
        .iter()
        .filter(|p| after_kill(p.at) > 1000.0)
        .filter_map(|p| p.rtt_ms)
        .collect();
    assert!(
        later.len() >= 20 && median(&later) < 5.0 && quantile(&later, 1.0) < 50.0,
        "a second after the SIGKILL PINGs should be undelayed (--queue-bypass): {later:?}"
    );
    assert!(
        netfilter_rules(Some(netns)).contains(&chain),
        "nothing removes a killed faultd's rules but the next faultd; they should still be here"
    );

    let faultd = Faultd::start_with(options).await;
    for (place, rules) in [
        ("the workload's namespace", netfilter_rules(Some(netns))),
        ("the host", netfilter_rules(None)),
    ] {
        assert!(
            !rules.contains(&chain),
            "a new faultd on the same state directory left the killed one's rules ({chain}…) in {place}:\n{rules}"
        );
    }
    assert!(
        faultd
            .log()
            .contains("removed NFQUEUE rules of agents that are gone"),
        "the new faultd should say what it swept: {}",
        faultd.log()
    );
    // And it delays again.
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    faultd
        .faults()
        .inject(with_ttl(
            delay_fault(ms(100), Duration::ZERO, 0.0, Mechanism::Unspecified, target),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject on the new faultd failed: {s:?}\n{}", faultd.log()));
    let again = blocking(|| inside.redis_rtt(10, INTERVAL));
    assert!(
        median(&again.rtts()) >= 99.0,
        "the new faultd's delay does not hold: {}",
        summary(&again)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_frozen_faultd_stops_delaying_new_traffic_within_2s_of_the_deadline() {
    let _serial = SERIAL.lock().await;
    let (scene, _app) = start_scene().await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();
    let lease = grant(&mut leases, Duration::from_secs(2)).await;
    let deadline = lease_deadline(&lease);
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    faults
        .inject(under_lease(
            delay_fault(ms(100), Duration::ZERO, 0.0, Mechanism::Unspecified, target),
            &lease.id,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject failed: {s:?}"));
    let during = blocking(|| inside.redis_rtt(3, INTERVAL));
    assert!(
        median(&during.rtts()) >= 99.0,
        "the delay should hold before faultd is frozen: {}",
        summary(&during)
    );

    // Frozen: neither its expiry task nor its NFQUEUE threads run. Only the kernel can end it.
    let frozen = Stopped::stop(faultd.pid());
    let wake = deadline + 2_050_000_000;
    let wait = Duration::from_nanos((wake - faultd_tests::process::unix_ns()).max(0) as u64);
    blocking(|| std::thread::sleep(wait));
    let fresh = blocking(|| inside.redis_rtt(20, INTERVAL));
    eprintln!("2 s after the deadline, faultd frozen: {}", summary(&fresh));
    assert!(
        fresh.connect_ms < 20.0 && median(&fresh.rtts()) < 5.0,
        "with faultd frozen, new traffic 2 s after the lease deadline must not be queued: {}",
        summary(&fresh)
    );
    drop(frozen);
    let gone = poll(Duration::from_secs(3), || {
        (!netfilter_rules(Some(netns)).contains("faultd:")).then_some(())
    });
    assert!(
        gone.is_some(),
        "once thawed, faultd should remove the expired fault's rules:\n{}",
        netfilter_rules(Some(netns))
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn mechanisms_are_reported_and_a_missing_one_is_a_failed_precondition() {
    let _serial = SERIAL.lock().await;
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene { cgroup, faultd, .. } = &scene;
    let mut faults = faultd.faults();
    let caps = faults
        .capabilities(CapabilitiesRequest {})
        .await
        .unwrap_or_else(|s| panic!("Capabilities failed: {s:?}"))
        .into_inner();
    let capability = |name: &str| -> Capability {
        caps.capabilities
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("Capabilities lists no {name:?}: {caps:?}"))
    };
    let nfqueue = capability("nfqueue");
    assert!(
        nfqueue.available,
        "the NFQUEUE probe failed on this host: {}",
        nfqueue.detail
    );
    let (netem, fq) = (capability("netem"), capability("fq"));
    for action in ["delay", "bandwidth"] {
        let support = caps
            .actions
            .iter()
            .find(|a| a.action == action)
            .unwrap_or_else(|| panic!("Capabilities lists no action {action}: {caps:?}"));
        if !netem.available && !fq.available {
            assert_eq!(
                (support.available, support.mechanism.as_str()),
                (true, "nfqueue"),
                "{action}: {support:?}"
            );
        }
    }

    let target = || cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let inject = |mechanism| {
        let mut faults = faults.clone();
        let fault = delay_fault(ms(10), Duration::ZERO, 0.0, mechanism, target());
        async move {
            faults
                .inject(with_ttl(fault, Duration::from_secs(30)))
                .await
        }
    };
    for (mechanism, probe, missing) in [
        (Mechanism::Netem, &netem, "sch_netem"),
        (Mechanism::Edt, &fq, "sch_fq"),
    ] {
        match inject(mechanism).await {
            Err(status) if !probe.available => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert!(
                    status.message().contains("fault.delay.mechanism")
                        && status.message().contains(missing),
                    "forcing {mechanism:?} should name what is missing ({missing}): {status:?}"
                );
            }
            other => assert!(
                probe.available,
                "forcing {mechanism:?} on a kernel without it should fail: {other:?}"
            ),
        }
    }
    let forced = inject(Mechanism::Nfqueue)
        .await
        .unwrap_or_else(|s| panic!("forcing NFQUEUE failed: {s:?}"))
        .into_inner();
    assert_eq!(forced.mechanism, "nfqueue");
    let overlap = inject(Mechanism::Nfqueue)
        .await
        .expect_err("a second delay on the same target");
    assert_eq!(overlap.code(), Code::AlreadyExists, "{overlap:?}");

    let mut bad = delay_fault(
        ms(10),
        Duration::ZERO,
        150.0,
        Mechanism::Unspecified,
        target(),
    );
    let status = faults
        .inject(with_ttl(bad.clone(), Duration::from_secs(5)))
        .await
        .expect_err("correlation 150");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("fault.delay.correlation"),
        "{status:?}"
    );
    if let Some(faultd_proto::v1::fault::Action::Delay(delay)) = bad.action.as_mut() {
        delay.correlation = 0.0;
        delay.latency = None;
    }
    let status = faults
        .inject(with_ttl(bad, Duration::from_secs(5)))
        .await
        .expect_err("no latency");
    assert!(
        status.message().contains("fault.delay.latency"),
        "{status:?}"
    );
    let status = faults
        .inject(with_ttl(
            bandwidth_fault(0, 0, target()),
            Duration::from_secs(5),
        ))
        .await
        .expect_err("rate 0");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("fault.bandwidth.rate_bytes_per_sec"),
        "{status:?}"
    );
    let listed = list_faults(&mut faults).await;
    assert_eq!(
        listed.len(),
        1,
        "only the forced NFQUEUE delay is in force: {listed:?}"
    );
}
