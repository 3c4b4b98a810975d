//! `netns{path, interface}`: faults on an interface inside a network namespace hit traffic
//! routed through it, which no local socket of that namespace owns — a drop (tc programs on the
//! interface), and a delay or bandwidth limit (NFQUEUE rules in that namespace).
//!
//! The tests in this file run one at a time (`SERIAL`): some measure time, and the machine has
//! two cores.

use std::process::Command;
use std::time::Duration;

use faultd_proto::v1::target::Scope;
use faultd_proto::v1::{Direction, Fault, Mechanism, NetnsScope, PortRange, Protocol, Target};
use faultd_tests::api::{
    bandwidth_fault, counters, delay_fault, drop_fault, get_fault_until, remove, stall_fault,
    with_ttl,
};
use faultd_tests::process::{blocking, output, poll, run_ok};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::stats::{median, quantile};
use faultd_tests::{Faultd, FaultdOptions, NetNs, Redis, TempDir, Workload, fd_probe};
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
