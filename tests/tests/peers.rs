//! Peers: a fault limited to remote addresses (IPv4 and IPv6 CIDRs, and exclusions), and
//! dual-stack faults: a fault on 6379 hits `::1` and `127.0.0.1` alike unless peers say
//! otherwise.

use std::time::Duration;

use faultd_proto::v1::{Direction, Protocol, RemoveRequest};
use faultd_tests::api::{cgroup_target, drop_fault, reject_fault, remove, with_peers, with_ttl};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::ClientRun;
use faultd_tests::{Redis, RedisScene, Workload, fd_probe};
use tonic::Code;

const TTL: Duration = Duration::from_secs(60);

fn refused(run: &ClientRun) -> bool {
    format!("{}{}", run.stdout, run.stderr).contains("Connection refused")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_peer_cidr_limits_a_drop_to_one_of_two_servers_on_the_same_port() {
    // Two Redis servers on port 6379: the scene's on 127.0.0.1 and ::1, one on 127.0.0.2.
    let scene = RedisScene::start(fd_probe!()).await;
    let _second = Redis::start_bound(&scene.netns, &["127.0.0.2"]);
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    for host in ["127.0.0.1", "::1", "127.0.0.2"] {
        let run = inside.redis_ping_at(host);
        assert!(
            run.answered(),
            "before any fault, {host} should answer: {run}"
        );
    }
    let target = || cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);

    // Only the second server is black-holed.
    let second = faults
        .inject(with_ttl(
            drop_fault(100.0, with_peers(target(), &["127.0.0.2/32"], &[])),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop with peers 127.0.0.2/32 failed: {s:?}"))
        .into_inner();
    let run = inside.redis_ping_at("127.0.0.2");
    assert!(
        run.timed_out(),
        "a drop with peers 127.0.0.2/32 should black-hole Redis on 127.0.0.2: {run}"
    );
    for host in ["127.0.0.1", "::1"] {
        let run = inside.redis_ping_at(host);
        assert!(
            run.answered(),
            "a drop with peers 127.0.0.2/32 must leave Redis on {host} alone: {run}"
        );
    }
    let target_text = second
        .target
        .as_ref()
        .map(|t| t.peers.clone())
        .unwrap_or_default();
    assert_eq!(target_text, vec!["127.0.0.2/32".to_string()], "{second:?}");

    // A second fault on the same port with disjoint peers is allowed; an overlapping one is not.
    let first = faults
        .inject(with_ttl(
            drop_fault(100.0, with_peers(target(), &["127.0.0.1"], &[])),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("a drop with disjoint peers (127.0.0.1) was refused: {s:?}"))
        .into_inner();
    let run = inside.redis_ping_at("127.0.0.1");
    assert!(run.timed_out(), "now 127.0.0.1 is black-holed too: {run}");
    let run = inside.redis_ping_at("::1");
    assert!(run.answered(), "::1 is in neither fault's peers: {run}");
    let overlap = faults
        .inject(with_ttl(
            drop_fault(100.0, with_peers(target(), &["127.0.0.0/8"], &[])),
            TTL,
        ))
        .await
        .expect_err("a drop on 127.0.0.0/8 overlaps both faults and must be refused");
    assert_eq!(overlap.code(), Code::AlreadyExists, "{overlap:?}");

    for fault in [&first, &second] {
        remove(&mut faults, &fault.id).await;
    }
    for host in ["127.0.0.1", "::1", "127.0.0.2"] {
        let run = inside.redis_ping_at(host);
        assert!(run.answered(), "after Remove, {host} should answer: {run}");
    }

    // Everything but the second server: both families of the first are hit.
    let all_but = faults
        .inject(with_ttl(
            drop_fault(100.0, with_peers(target(), &[], &["127.0.0.2"])),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop excluding 127.0.0.2 failed: {s:?}"))
        .into_inner();
    let run = inside.redis_ping_at("127.0.0.2");
    assert!(run.answered(), "127.0.0.2 is excluded: {run}");
    for host in ["127.0.0.1", "::1"] {
        let run = inside.redis_ping_at(host);
        assert!(
            run.timed_out(),
            "a drop excluding only 127.0.0.2 should black-hole {host}: {run}"
        );
    }
    faults
        .remove(RemoveRequest { id: all_but.id })
        .await
        .expect("Remove of the excluding drop");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn drop_and_reject_hit_ipv6_and_ipv4_alike_unless_peers_say_otherwise() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        netns,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    let outside = Workload::outside(fd_probe!(), netns);
    let target = || cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);

    // A drop without peers: both families.
    let drop = faults
        .inject(with_ttl(drop_fault(100.0, target()), TTL))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop failed: {s:?}"))
        .into_inner();
    for host in ["::1", "127.0.0.1"] {
        let run = inside.redis_ping_at(host);
        assert!(
            run.timed_out(),
            "a drop on {REDIS_PORT} should black-hole {host}: {run}"
        );
        let run = outside.redis_ping_at(host);
        assert!(run.answered(), "outside the cgroup {host} answers: {run}");
    }
    faults
        .remove(RemoveRequest { id: drop.id })
        .await
        .expect("Remove of the drop");

    // A drop on ::1 only.
    let v6_drop = faults
        .inject(with_ttl(
            drop_fault(100.0, with_peers(target(), &["::1/128"], &[])),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop with peers ::1/128 failed: {s:?}"))
        .into_inner();
    let run = inside.redis_ping_at("::1");
    assert!(
        run.timed_out(),
        "a drop on ::1 should black-hole [::1]:6379: {run}"
    );
    let run = inside.redis_ping_at("127.0.0.1");
    assert!(
        run.answered(),
        "a drop on ::1 leaves 127.0.0.1 alone: {run}"
    );
    faults
        .remove(RemoveRequest { id: v6_drop.id })
        .await
        .expect("Remove of the IPv6 drop");

    // A reject without peers refuses both families; with peers ::1 only IPv6.
    let reject = faults
        .inject(with_ttl(reject_fault(target()), TTL))
        .await
        .unwrap_or_else(|s| panic!("Inject of a reject failed: {s:?}"))
        .into_inner();
    for host in ["::1", "127.0.0.1"] {
        let run = inside.redis_ping_at(host);
        assert!(
            refused(&run),
            "a reject on {REDIS_PORT} should refuse {host}: {run}"
        );
    }
    faults
        .remove(RemoveRequest { id: reject.id })
        .await
        .expect("Remove of the reject");
    let v6_reject = faults
        .inject(with_ttl(
            reject_fault(with_peers(target(), &["::1"], &[])),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a reject with peers ::1 failed: {s:?}"))
        .into_inner();
    let run = inside.redis_ping_at("::1");
    assert!(
        refused(&run),
        "a reject on ::1 should refuse [::1]:6379: {run}"
    );
    let run = inside.redis_ping_at("127.0.0.1");
    assert!(
        run.answered(),
        "a reject on ::1 leaves 127.0.0.1 alone: {run}"
    );
    faults
        .remove(RemoveRequest { id: v6_reject.id })
        .await
        .expect("Remove of the IPv6 reject");
    let run = inside.redis_ping_at("::1");
    assert!(run.answered(), "after Remove, ::1 answers: {run}");
}
