//! `netns{path, interface}`: faults on an interface inside a network namespace hit traffic
//! routed through it, which no local socket of that namespace owns — a drop (tc programs on the
//! interface), a delay or bandwidth limit (NFQUEUE rules in that namespace), a reject (REJECT
//! rules in that namespace's filter table) and a reset (those, and the namespace's established
//! connections torn down, but loopback ones).
//!
//! The tests in this file run one at a time (`SERIAL`): some measure time, and the machine has
//! two cores.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use faultd_proto::v1::target::Scope;
use faultd_proto::v1::{
    Direction, Fault, Mechanism, NetnsScope, PortRange, Protocol, RenewRequest, Target,
};
use faultd_tests::api::{
    bandwidth_fault, counters, delay_fault, drop_fault, get_fault_until, grant, reject_fault,
    remove, reset_fault, stall_fault, under_lease, with_ttl,
};
use faultd_tests::process::{blocking, output, poll, run_ok};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::stats::{median, quantile};
use faultd_tests::{Faultctl, Faultd, FaultdOptions, NetNs, Redis, TempDir, Workload, fd_probe};
use tonic::Code;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ip(ns: &NetNs, args: &[&str]) {
    run_ok(Command::new("ip").args(["-n", ns.name()]).args(args));
}

/// client (10.77.1.1, c0) -- (r0, 10.77.1.2) router (10.77.2.1, r1) -- (s0, 10.77.2.2) server,
/// each in a namespace of its own; the interface names exist only inside them. The router
/// forwards: nothing the client and server exchange has a socket in the router.
struct Routed {
    client: NetNs,
    router: NetNs,
    server: NetNs,
}

impl Routed {
    const SERVER: &str = "10.77.2.2";

    fn new() -> Routed {
        let routed = Routed {
            client: NetNs::new(),
            router: NetNs::new(),
            server: NetNs::new(),
        };
        let Routed {
            client,
            router,
            server,
        } = &routed;
        ip(
            client,
            &[
                "link",
                "add",
                "c0",
                "type",
                "veth",
                "peer",
                "name",
                "r0",
                "netns",
                router.name(),
            ],
        );
        ip(
            router,
            &[
                "link",
                "add",
                "r1",
                "type",
                "veth",
                "peer",
                "name",
                "s0",
                "netns",
                server.name(),
            ],
        );
        for (ns, iface, addr) in [
            (client, "c0", "10.77.1.1/24"),
            (router, "r0", "10.77.1.2/24"),
            (router, "r1", "10.77.2.1/24"),
            (server, "s0", "10.77.2.2/24"),
        ] {
            ip(ns, &["addr", "add", addr, "dev", iface]);
            ip(ns, &["link", "set", iface, "up"]);
        }
        ip(client, &["route", "add", "default", "via", "10.77.1.2"]);
        ip(server, &["route", "add", "default", "via", "10.77.2.1"]);
        run_ok(router.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        routed
    }

    /// `interface` of the router, for the Redis port, TCP.
    fn target(&self, interface: &str, direction: Direction) -> Target {
        Target {
            scope: Some(Scope::Netns(NetnsScope {
                path: format!("/run/netns/{}", self.router.name()),
                interface: interface.into(),
            })),
            ports: vec![PortRange {
                first: REDIS_PORT.into(),
                last: None,
            }],
            protocol: Protocol::Tcp.into(),
            direction: direction.into(),
            ..Default::default()
        }
    }

    /// `iptables-save` and `ip6tables-save` in the router.
    fn router_rules(&self) -> String {
        let mut text = String::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            let out = output(&mut self.router.exec(tool));
            assert!(
                out.status.success(),
                "{tool} in the router failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        text
    }

    /// Waits up to 5 s (clean-up runs in the background) for the router to hold nothing of
    /// faultd's: no chain, no rule, no comment naming a fault.
    fn assert_router_clean(&self, after: &str) {
        let ours = |text: &str| text.contains("FAULTD-") || text.contains("faultd:");
        let clean = poll(Duration::from_secs(5), || {
            (!ours(&self.router_rules())).then_some(())
        });
        assert!(
            clean.is_some(),
            "after {after} faultd's rules are still in the router:\n{}",
            self.router_rules()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_drop_on_a_routers_interface_hits_the_traffic_routed_through_it() {
    let _serial = SERIAL.lock().await;
    let routed = Routed::new();
    let _redis = Redis::start_bound(&routed.server, &[Routed::SERVER]);
    let faultd = Faultd::start().await;
    let mut faults = faultd.faults();
    let outside = Workload::outside(fd_probe!(), &routed.client);
    let run = outside.redis_ping_at(Routed::SERVER);
    assert!(
        run.answered(),
        "routed through the router, Redis should answer: {run}"
    );

    let path = format!("/run/netns/{}", routed.router.name());
    let target = |interface: &str| routed.target(interface, Direction::Both);
    let fault = faults
        .inject(with_ttl(
            drop_fault(100.0, target("r1")),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop on r1 in {path} failed: {s:?}"))
        .into_inner();
    // bpftool here predates TCX links: faultd's log says what it attached and detached.
    let log = faultd.log();
    assert!(
        log.contains("tc programs attached") && log.contains("interface=\"r1\""),
        "faultd should log the tc programs attached to r1:\n{log}"
    );
    let run = outside.redis_ping_at(Routed::SERVER);
    assert!(
        run.timed_out(),
        "a drop on the router's r1 should black-hole Redis for the client: {run}"
    );
    let seen = get_fault_until(&mut faults, &fault.id, |m, d| m > 0 && d > 0).await;
    let (matched, dropped) = counters(&seen);
    assert!(
        matched > 0 && dropped > 0,
        "Get shows matched={matched} dropped={dropped}"
    );

    remove(&mut faults, &fault.id).await;
    let run = outside.redis_ping_at(Routed::SERVER);
    assert!(run.answered(), "after Remove Redis answers again: {run}");
    let log = faultd.log();
    assert!(
        log.contains("tc programs detached"),
        "Remove of the last fault detaches the tc programs:\n{log}"
    );

    // An interface the namespace lacks, and a path that is no namespace.
    let status = faults
        .inject(with_ttl(
            drop_fault(100.0, target("nope0")),
            Duration::from_secs(60),
        ))
        .await
        .expect_err("a missing interface must be refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut bad = target("r1");
    bad.scope = Some(Scope::Netns(NetnsScope {
        path: "/etc/hostname".into(),
        interface: "r1".into(),
    }));
    let status = faults
        .inject(with_ttl(drop_fault(100.0, bad), Duration::from_secs(60)))
        .await
        .expect_err("a path that is no namespace must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("fault.target.netns.path"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_stall_on_a_routers_interface_lets_connections_open_but_no_data_through() {
    let _serial = SERIAL.lock().await;
    let routed = Routed::new();
    let _redis = Redis::start_bound(&routed.server, &[Routed::SERVER]);
    let faultd = Faultd::start().await;
    let mut faults = faultd.faults();
    let client = Workload::outside(fd_probe!(), &routed.client);
    let fault = faults
        .inject(with_ttl(
            stall_fault(routed.target("r1", Direction::Both), None),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a stall on r1 failed: {s:?}"))
        .into_inner();
    // The handshake crosses the router (no data in it): connects succeed, unlike under a drop.
    let addr = format!("{}:{REDIS_PORT}", Routed::SERVER);
    let ms = Duration::from_millis;
    let attempts = blocking(|| client.tcp_probe(&addr, ms(20), ms(1000), ms(300)).finish());
    assert!(
        attempts.iter().all(|a| a.ok),
        "connects through a stalled router should succeed: {attempts:?}"
    );
    // The data does not: redis-cli's PING hangs until its timeout.
    let run = client.redis_ping_at(Routed::SERVER);
    assert!(
        run.timed_out(),
        "a stall on r1 should leave the PING unanswered: {run}"
    );
    let seen = get_fault_until(&mut faults, &fault.id, |m, d| m > d && d > 0).await;
    let (matched, dropped) = counters(&seen);
    eprintln!("MEASURE netns_stall_matched={matched} dropped={dropped}");
    assert!(
        dropped > 0 && matched > dropped,
        "the tc programs should pass the handshakes and hold the data back: {seen:?}"
    );
    remove(&mut faults, &fault.id).await;
    let run = client.redis_ping_at(Routed::SERVER);
    assert!(run.answered(), "after Remove Redis answers again: {run}");
}

/// `count` PINGs from the client to the server through the router, 10 ms apart.
fn pings(client: &Workload, count: u32) -> Vec<f64> {
    let run = blocking(|| client.redis_rtt_at(Routed::SERVER, count, Duration::from_millis(10)));
    assert_eq!(
        run.failures(),
        0,
        "PINGs through the router failed: {run:?}"
    );
    run.rtts()
}

/// The median time (ms) a connect to a closed port of the server takes to be refused: one
/// round trip through the router on a port no fault names.
fn refused_connect_ms(client: &Workload) -> f64 {
    let addr = format!("{}:{}", Routed::SERVER, REDIS_PORT + 1);
    let ms = Duration::from_millis;
    let attempts = client.tcp_probe(&addr, ms(10), ms(1000), ms(600)).finish();
    let took: Vec<f64> = attempts.iter().map(|a| a.took as f64 / 1e6).collect();
    assert!(
        attempts.iter().all(|a| !a.ok) && took.len() >= 20,
        "nothing listens on {addr}: every connect should be refused, quickly: {attempts:?}"
    );
    median(&took)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn delay_and_bandwidth_on_a_routers_interface_shape_the_traffic_routed_through_it() {
    let _serial = SERIAL.lock().await;
    let routed = Routed::new();
    let _redis = Redis::start_bound(&routed.server, &[Routed::SERVER]);
    let state = TempDir::new("faultd-test-state");
    let options = FaultdOptions::with_state_dir(state.path());
    let mut faultd = Faultd::start_with(options.clone()).await;
    let mut faults = faultd.faults();
    let client = Workload::outside(fd_probe!(), &routed.client);
    let base = pings(&client, 100);
    let base_other = refused_connect_ms(&client);
    let inject = |fault: Fault| with_ttl(fault, Duration::from_secs(60));

    // 100 ms on what r1 sends: the client's requests, forwarded towards the server.
    let delay = |direction| {
        delay_fault(
            Duration::from_millis(100),
            Duration::ZERO,
            0.0,
            Mechanism::Unspecified,
            routed.target("r1", direction),
        )
    };
    let fault = faults
        .inject(inject(delay(Direction::Egress)))
        .await
        .unwrap_or_else(|s| panic!("Inject of a delay on r1 failed: {s:?}\n{}", faultd.log()))
        .into_inner();
    assert_eq!(fault.mechanism, "nfqueue", "{fault:?}");
    let rules = routed.router_rules();
    assert!(
        rules.contains("-A POSTROUTING -j FAULTD-") && rules.contains("-o r1"),
        "the delay's rules belong in the router's POSTROUTING, matching -o r1:\n{rules}"
    );
    let delayed = pings(&client, 100);
    let added = median(&delayed) - median(&base);
    let other = refused_connect_ms(&client) - base_other;
    eprintln!(
        "MEASURE netns_delay_100ms_routed_median_added_ms={added:.3} p99_ms={:.3} \
         other_port_added_ms={other:+.3} baseline_ms={:.3}",
        quantile(&delayed, 0.99),
        median(&base)
    );
    assert!(
        (95.0..=130.0).contains(&added),
        "a 100 ms delay on the router's r1 added {added:.2} ms to the client's median PING \
         (want 95-130 ms)"
    );
    assert!(
        other < 20.0,
        "a connect to port {} (not the fault's) took {other:+.2} ms longer: it must not be delayed",
        REDIS_PORT + 1
    );
    let seen = get_fault_until(&mut faults, &fault.id, |m, _| m >= 100).await;
    assert!(
        counters(&seen).0 >= 100,
        "Get shows the delayed packets: {seen:?}"
    );
    remove(&mut faults, &fault.id).await;
    routed.assert_router_clean("Remove of the delay");
    let after = pings(&client, 50);
    assert!(
        median(&after) < median(&base) + 5.0,
        "after Remove the median PING is {:.2} ms (baseline {:.2} ms)",
        median(&after),
        median(&base)
    );

    // 256 KiB/s on what r1 receives: the server's answers on their way to the client.
    const VALUE: usize = 1 << 20;
    blocking(|| client.redis_set_at(Routed::SERVER, "faultd:big", VALUE));
    let (_, unpaced) = blocking(|| client.redis_get_at(Routed::SERVER, "faultd:big"));
    let fault = faults
        .inject(inject(bandwidth_fault(
            256 * 1024,
            0,
            routed.target("r1", Direction::Ingress),
        )))
        .await
        .unwrap_or_else(|s| panic!("Inject of a bandwidth on r1 failed: {s:?}"))
        .into_inner();
    let rules = routed.router_rules();
    assert!(
        rules.contains("-A PREROUTING -j FAULTD-") && rules.contains("-i r1"),
        "the bandwidth's rules belong in the router's PREROUTING, matching -i r1:\n{rules}"
    );
    let (bytes, paced) = blocking(|| client.redis_get_at(Routed::SERVER, "faultd:big"));
    eprintln!(
        "MEASURE netns_bandwidth_256KiB_1MiB_routed_get_s={paced:.3} error_pct={:+.1} baseline_s={unpaced:.4}",
        (paced - 4.0) / 4.0 * 100.0
    );
    assert!(bytes >= VALUE as u64);
    assert!(
        (3.4..=4.6).contains(&paced),
        "at 256 KiB/s on the router's r1 a GET of 1 MiB took {paced:.3} s (want 4 s ± 15%)"
    );
    remove(&mut faults, &fault.id).await;
    routed.assert_router_clean("Remove of the bandwidth");
    let (_, after) = blocking(|| client.redis_get_at(Routed::SERVER, "faultd:big"));
    assert!(after < 0.5, "after Remove the GET took {after:.3} s");

    // Expiry: a delay whose lease runs out leaves nothing behind either.
    faults
        .inject(with_ttl(delay(Direction::Both), Duration::from_secs(1)))
        .await
        .unwrap_or_else(|s| panic!("Inject of a 1 s delay failed: {s:?}"));
    blocking(|| std::thread::sleep(Duration::from_millis(1500)));
    routed.assert_router_clean("the lease expired");

    // SIGKILL: the rules stay (fail-open), and the next faultd on the state directory sweeps
    // them from the router's namespace.
    faults
        .inject(inject(delay(Direction::Both)))
        .await
        .unwrap_or_else(|s| panic!("Inject before the SIGKILL failed: {s:?}"));
    faultd.kill();
    assert!(
        routed.router_rules().contains("FAULTD-"),
        "nothing but the next faultd removes a killed one's rules; they should still be here"
    );
    let after_kill = pings(&client, 20);
    assert!(
        median(&after_kill) < median(&base) + 5.0,
        "with faultd killed, --queue-bypass lets PINGs through undelayed: {after_kill:?}"
    );
    let mut faultd = Faultd::start_with(options).await;
    routed.assert_router_clean("a new faultd started on the killed one's state directory");

    // Shutdown: SIGTERM takes the rules out.
    faultd
        .faults()
        .inject(inject(delay(Direction::Both)))
        .await
        .unwrap_or_else(|s| panic!("Inject on the new faultd failed: {s:?}"));
    assert!(routed.router_rules().contains("FAULTD-"));
    let status = faultd.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "faultd should exit cleanly on SIGTERM: {status:?}"
    );
    routed.assert_router_clean("faultd stopped");
}

/// The client's connects to the server's Redis port through the router over 600 ms: how many
/// succeeded, how many there were, and the slowest, in ms.
fn redis_connects(client: &Workload) -> (usize, usize, f64) {
    let addr = format!("{}:{}", Routed::SERVER, REDIS_PORT);
    let ms = Duration::from_millis;
    let attempts = client.tcp_probe(&addr, ms(10), ms(1000), ms(600)).finish();
    let slowest = attempts
        .iter()
        .map(|a| a.took as f64 / 1e6)
        .fold(0.0, f64::max);
    let ok = attempts.iter().filter(|a| a.ok).count();
    (ok, attempts.len(), slowest)
}

/// Every connect is refused, at once (a drop would leave them to time out after 1 s).
fn assert_refused_at_once(client: &Workload, during: &str) {
    let (ok, all, slowest) = redis_connects(client);
    eprintln!("MEASURE netns_refused_connect_slowest_ms={slowest:.2} attempts={all} ({during})");
    assert!(
        ok == 0 && all >= 20 && slowest < 200.0,
        "during {during} every connect should be refused at once: {ok} of {all} succeeded, \
         the slowest took {slowest:.1} ms"
    );
}

fn assert_connects(client: &Workload, when: &str) {
    let (ok, all, _) = redis_connects(client);
    assert!(
        ok == all && all >= 20,
        "{when} every connect should succeed: {ok} of {all} did"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_reject_on_a_routers_interface_refuses_the_connects_routed_through_it_at_once() {
    let _serial = SERIAL.lock().await;
    let routed = Routed::new();
    let _redis = Redis::start_bound(&routed.server, &[Routed::SERVER]);
    let state = TempDir::new("faultd-test-state");
    let options = FaultdOptions::with_state_dir(state.path());
    let mut faultd = Faultd::start_with(options.clone()).await;
    let mut faults = faultd.faults();
    let client = Workload::outside(fd_probe!(), &routed.client);
    assert_connects(&client, "before any fault");
    let inject = |fault: Fault| with_ttl(fault, Duration::from_secs(60));

    // caps says what a reject on an interface is; a dry run shows its mechanism and changes
    // nothing.
    let faultctl = Faultctl::new(&faultd);
    let caps = faultctl.run(&["caps"]);
    caps.assert_success();
    assert!(
        caps.stdout().contains("netns_reject") && caps.stdout().contains("REJECT"),
        "faultctl caps should list netns_reject: {caps}"
    );
    let netns = format!("/run/netns/{}", routed.router.name());
    let port = REDIS_PORT.to_string();
    let dry = faultctl.run(&[
        "inject",
        "reject",
        "--netns",
        &netns,
        "--iface",
        "r1",
        "--port",
        &port,
        "--ttl",
        "30s",
        "--dry-run",
    ]);
    dry.assert_success();
    assert!(
        dry.stdout().contains("nothing was changed") && dry.stdout().contains("nfqueue"),
        "the dry run should show the mechanism: {dry}"
    );
    routed.assert_router_clean("a dry run");

    // What r1 sends: the client's SYNs, forwarded towards the server.
    let fault = faults
        .inject(inject(reject_fault(routed.target("r1", Direction::Egress))))
        .await
        .unwrap_or_else(|s| panic!("Inject of a reject on r1 failed: {s:?}\n{}", faultd.log()))
        .into_inner();
    assert_eq!(fault.mechanism, "nfqueue", "{fault:?}");
    let rules = routed.router_rules();
    assert!(
        rules.contains("-A FORWARD -j FAULTD-")
            && rules.contains("-o r1")
            && rules.contains("-j REJECT --reject-with tcp-reset"),
        "the reject's rules belong in the router's filter table, FORWARD, matching -o r1:\n{rules}"
    );
    assert_refused_at_once(&client, "a reject on r1 (egress)");
    remove(&mut faults, &fault.id).await;
    routed.assert_router_clean("Remove of the reject");
    assert_connects(&client, "after Remove");

    // Under a lease: a renewal moves the rules' kernel-side end (`--datestop`, in seconds),
    // and expiry takes them out.
    let datestop = |rules: &str| {
        rules
            .lines()
            .find_map(|l| l.split("--datestop ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let mut leases = faultd.leases();
    let lease = grant(&mut leases, Duration::from_secs(3)).await;
    faults
        .inject(under_lease(
            reject_fault(routed.target("r1", Direction::Egress)),
            &lease.id,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject under lease {} failed: {s:?}", lease.id));
    let first = datestop(&routed.router_rules()).expect("the rules carry the lease's end");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    leases
        .renew(RenewRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("Renew failed: {s:?}"));
    let renewed = datestop(&routed.router_rules());
    assert!(
        renewed.as_ref().is_some_and(|r| *r > first),
        "a renewal moves the REJECT rules' end from {first}: {renewed:?}"
    );
    assert_refused_at_once(&client, "a renewed reject on r1");
    blocking(|| std::thread::sleep(Duration::from_millis(3500)));
    routed.assert_router_clean("the lease expired");
    assert_connects(&client, "after the lease expired");

    // What r0 receives: the same SYNs, arriving from the client. A SIGKILL leaves the rules
    // (they end at the lease's deadline), and the next faultd on the state directory sweeps
    // them from the router's namespace.
    faults
        .inject(inject(reject_fault(
            routed.target("r0", Direction::Ingress),
        )))
        .await
        .unwrap_or_else(|s| panic!("Inject of a reject on r0 failed: {s:?}"));
    let rules = routed.router_rules();
    assert!(
        rules.contains("-A INPUT -j FAULTD-") && rules.contains("-i r0"),
        "the reject's rules match -i r0 in the router's INPUT and FORWARD:\n{rules}\n{}",
        faultd.log()
    );
    assert_refused_at_once(&client, "a reject on r0 (ingress)");
    faultd.kill();
    assert!(
        routed.router_rules().contains("FAULTD-"),
        "nothing but the next faultd removes a killed one's rules; they should still be here"
    );
    let _faultd = Faultd::start_with(options).await;
    routed.assert_router_clean("a new faultd started on the killed one's state directory");
    assert_connects(&client, "after the sweep");
}

/// Held in the client's namespace: a Redis connection through c0 to the server, and a loopback
/// connection on the Redis port; each line on stdin checks both again and prints
/// `far <state> near <state>` (`ok`, or the error a socket torn down gives).
const SESSIONS: &str = r#"
import socket, sys
far = socket.create_connection(("10.77.2.2", 6379), timeout=5)
lst = socket.socket()
lst.bind(("127.0.0.1", 6379))
lst.listen()
near = socket.create_connection(("127.0.0.1", 6379), timeout=5)
peer, _ = lst.accept()
def ping():
    try:
        far.sendall(b"*1\r\n$4\r\nPING\r\n")
        return "ok" if far.recv(64).startswith(b"+PONG") else "closed"
    except OSError as e:
        return type(e).__name__
def echo():
    try:
        near.sendall(b"x")
        return "ok" if peer.recv(1) == b"x" else "closed"
    except OSError as e:
        return type(e).__name__
for _ in sys.stdin:
    print("far", ping(), "near", echo(), flush=True)
"#;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_reset_on_an_interface_tears_down_its_namespaces_connections_and_refuses_new_ones() {
    let _serial = SERIAL.lock().await;
    let routed = Routed::new();
    let _redis = Redis::start_bound(&routed.server, &[Routed::SERVER]);
    let state = TempDir::new("faultd-test-state");
    let faultd = Faultd::start_with(FaultdOptions::with_state_dir(state.path())).await;
    let mut faults = faultd.faults();
    let client = Workload::outside(fd_probe!(), &routed.client);
    let mut sessions = routed
        .client
        .exec("python3")
        .args(["-c", SESSIONS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 in the client's namespace");
    let mut stdin = sessions.stdin.take().unwrap();
    let mut stdout = BufReader::new(sessions.stdout.take().unwrap());
    let mut check = || {
        stdin.write_all(b"\n").unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(check(), "far ok near ok");

    // The client's own c0: its connection to the server goes, the loopback one stays.
    let target = Target {
        scope: Some(Scope::Netns(NetnsScope {
            path: format!("/run/netns/{}", routed.client.name()),
            interface: "c0".into(),
        })),
        ports: vec![PortRange {
            first: REDIS_PORT.into(),
            last: None,
        }],
        ..Default::default()
    };
    let fault = faults
        .inject(with_ttl(reset_fault(target, None), Duration::from_secs(60)))
        .await
        .unwrap_or_else(|s| panic!("Inject of a reset on c0 failed: {s:?}\n{}", faultd.log()))
        .into_inner();
    let after = check();
    let _ = sessions.kill();
    let _ = sessions.wait();
    assert!(
        after.starts_with("far ") && !after.starts_with("far ok") && after.ends_with("near ok"),
        "the reset should tear down the connection through c0 and keep the loopback one: {after}"
    );
    assert_eq!(
        fault.counters.as_ref().map(|c| c.reset),
        Some(1),
        "the reset counts the one connection it tore down: {fault:?}"
    );
    assert_refused_at_once(&client, "a reset on c0");
    remove(&mut faults, &fault.id).await;
    assert_connects(&client, "after Remove of the reset");
}
