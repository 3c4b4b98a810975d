//! `netns{path, interface}`: a drop on an interface inside a network namespace hits traffic
//! routed through it, which no local socket of that namespace owns.

use std::process::Command;
use std::time::Duration;

use faultd_proto::v1::target::Scope;
use faultd_proto::v1::{Direction, NetnsScope, PortRange, Protocol, RemoveRequest, Target};
use faultd_tests::api::{counters, drop_fault, get_fault_until, with_ttl};
use faultd_tests::process::run_ok;
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::{Faultd, NetNs, Redis, Workload, fd_probe};
use tonic::Code;

fn ip(ns: &NetNs, args: &[&str]) {
    run_ok(Command::new("ip").args(["-n", ns.name()]).args(args));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_drop_on_a_routers_interface_hits_the_traffic_routed_through_it() {
    // client (10.77.1.1) -- router (10.77.1.2 | 10.77.2.1) -- server (10.77.2.2), each in a
    // namespace of its own; the interface names exist only inside them.
    let client = NetNs::new();
    let router = NetNs::new();
    let server = NetNs::new();
    ip(
        &client,
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
        &router,
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
        (&client, "c0", "10.77.1.1/24"),
        (&router, "r0", "10.77.1.2/24"),
        (&router, "r1", "10.77.2.1/24"),
        (&server, "s0", "10.77.2.2/24"),
    ] {
        ip(ns, &["addr", "add", addr, "dev", iface]);
        ip(ns, &["link", "set", iface, "up"]);
    }
    ip(&client, &["route", "add", "default", "via", "10.77.1.2"]);
    ip(&server, &["route", "add", "default", "via", "10.77.2.1"]);
    run_ok(router.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    let _redis = Redis::start_bound(&server, &["10.77.2.2"]);
    let faultd = Faultd::start().await;
    let mut faults = faultd.faults();
    let outside = Workload::outside(fd_probe!(), &client);
    let run = outside.redis_ping_at("10.77.2.2");
    assert!(
        run.answered(),
        "routed through the router, Redis should answer: {run}"
    );

    let path = format!("/run/netns/{}", router.name());
    let target = |interface: &str| Target {
        scope: Some(Scope::Netns(NetnsScope {
            path: path.clone(),
            interface: interface.into(),
        })),
        ports: vec![PortRange {
            first: REDIS_PORT.into(),
            last: None,
        }],
        protocol: Protocol::Tcp.into(),
        direction: Direction::Both.into(),
        ..Default::default()
    };
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
    let run = outside.redis_ping_at("10.77.2.2");
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

    faults
        .remove(RemoveRequest {
            id: fault.id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("Remove {} failed: {s:?}", fault.id));
    let run = outside.redis_ping_at("10.77.2.2");
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
