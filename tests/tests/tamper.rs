//! `duplicate`, `corrupt`, `reorder` and `slice` on this host (no sch_netem: faultd's NFQUEUE fallback),
//! as a real receiver sees them: twice the datagrams, checksum errors counted by the receiving
//! stack (`nstat`) while TCP still delivers intact data, datagrams out of order while TCP still
//! delivers in order, TCP data in pieces of at most the slice's size on the wire and intact.

use std::time::Duration;

use faultd_proto::v1::fault::Action;
use faultd_proto::v1::{CapabilitiesRequest, Counters, Direction, Fault, Mechanism, Protocol};
use faultd_tests::api::{cgroup_target, get_fault, remove, slice_fault, tamper_fault, with_ttl};
use faultd_tests::clients::{ConnClient, at};
use faultd_tests::process::{blocking, output};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::uniq::uniq;
use faultd_tests::workload::{UdpBlast, UdpCount, UdpReceiver};
use faultd_tests::{RedisScene, Workload, fd_probe};

const DATAGRAMS: u64 = 2000;
/// The reply to a GET of a 1 MiB value: `$1048576\r\n`, the value, `\r\n`.
const REPLY_BYTES: u64 = (1 << 20) + 12;

async fn inject(scene: &RedisScene, fault: Fault) -> Fault {
    let fault = scene
        .faultd
        .inject(with_ttl(fault, Duration::from_secs(60)))
        .await;
    assert_eq!(fault.mechanism, "nfqueue", "Inject answered {fault:?}");
    fault
}

/// The scene, a resident process of the workload (NFQUEUE applies in its processes'
/// namespaces), and a view of the namespace from outside the cgroup (the receivers).
async fn scene() -> (RedisScene, faultd_tests::process::ChildGuard, Workload) {
    let scene = RedisScene::start(fd_probe!()).await;
    let app = scene.inside.resident();
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    (scene, app, outside)
}

/// A counter of the namespace's stack, as `nstat` reads it (absolute, history untouched).
fn nstat(workload: &Workload, name: &str) -> u64 {
    let out = output(workload.command("nstat").args(["-asz", name]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("nstat printed no {name}: {text}"))
}

/// Sends DATAGRAMS from the workload to `receiver`; returns what was sent, what the receiver
/// counted, and the fault's counters after.
async fn blast(
    scene: &RedisScene,
    receiver: UdpReceiver,
    fault: &Fault,
) -> (UdpBlast, UdpCount, Counters) {
    let blast = blocking(|| scene.inside.udp_blast(receiver.addr(), DATAGRAMS));
    let count = blocking(|| receiver.finish());
    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    (blast, count, counters)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn duplicate_100_percent_doubles_the_datagrams_a_receiver_counts() {
    let (scene, _app, outside) = scene().await;
    let receiver = outside.udp_receiver("127.0.0.1:0");
    let target = cgroup_target(
        &scene.cgroup,
        &[receiver.port()],
        Protocol::Udp,
        Direction::Egress,
    );
    let fault = inject(
        &scene,
        tamper_fault("duplicate", 100.0, Duration::ZERO, target),
    )
    .await;
    let (blast, count, counters) = blast(&scene, receiver, &fault).await;
    eprintln!(
        "MEASURE duplicate_100pct_received={} distinct={} sent={} duplicated={}",
        count.received, count.distinct, blast.sent, counters.duplicated
    );
    assert_eq!(count.rcvbuf_errors, 0, "the receiver overflowed: {count:?}");
    assert_eq!(
        (count.received, count.distinct),
        (2 * blast.sent, blast.sent),
        "every datagram should arrive twice: {count:?}"
    );
    assert_eq!(counters.duplicated, blast.sent, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn corrupt_datagrams_fail_the_receivers_checksum_and_tcp_recovers() {
    let (scene, _app, outside) = scene().await;
    let receiver = outside.udp_receiver("127.0.0.1:0");
    let target = |port| cgroup_target(&scene.cgroup, &[port], Protocol::Udp, Direction::Egress);
    let udp_errors = nstat(&outside, "UdpInCsumErrors");
    let fault = inject(
        &scene,
        tamper_fault("corrupt", 30.0, Duration::ZERO, target(receiver.port())),
    )
    .await;
    let (blast, count, counters) = blast(&scene, receiver, &fault).await;
    let failed = nstat(&outside, "UdpInCsumErrors") - udp_errors;
    let lost = blast.sent - count.distinct;
    eprintln!(
        "MEASURE corrupt_30pct_udp_lost={lost} of {} UdpInCsumErrors+={failed} corrupted={}",
        blast.sent, counters.corrupted
    );
    assert_eq!(count.rcvbuf_errors, 0, "the receiver overflowed: {count:?}");
    assert!(
        (lost as f64 / blast.sent as f64 - 0.30).abs() <= 0.05,
        "about 30% of the datagrams should be lost: {lost} of {}",
        blast.sent
    );
    assert_eq!(
        (failed, counters.corrupted),
        (lost, lost),
        "every lost datagram should be a checksum error at the receiver, and counted"
    );

    // TCP: a 1 MiB Redis value comes back whole, five times, through 10% corrupted segments
    // (both ways).
    let key = format!("corrupt:{}", uniq());
    scene.inside.redis_set(&key, 1 << 20);
    let tcp_errors = nstat(&outside, "TcpInCsumErrors");
    let tcp = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Unspecified,
    );
    let fault = inject(&scene, tamper_fault("corrupt", 10.0, Duration::ZERO, tcp)).await;
    let gets: Vec<(u64, f64)> = (0..5)
        .map(|_| blocking(|| scene.inside.redis_get(&key)))
        .collect();
    let bytes = gets.iter().map(|g| g.0).min().unwrap_or(0);
    let seconds = gets.iter().map(|g| g.1).fold(0.0, f64::max);
    let failed = nstat(&outside, "TcpInCsumErrors") - tcp_errors;
    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    eprintln!(
        "MEASURE corrupt_10pct_tcp_5_gets_1MiB_max_s={seconds:.3} TcpInCsumErrors+={failed} \
         corrupted={}",
        counters.corrupted
    );
    assert_eq!(
        bytes, REPLY_BYTES,
        "each value should come back whole: {gets:?}"
    );
    assert!(
        failed >= 1 && failed == counters.corrupted,
        "the receiving stack should count each corrupted segment as a checksum error: \
         {failed} errors, {} corrupted",
        counters.corrupted
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn reorder_puts_datagrams_out_of_order_and_tcp_still_delivers() {
    let (scene, _app, outside) = scene().await;
    let receiver = outside.udp_receiver("127.0.0.1:0");
    let target = cgroup_target(
        &scene.cgroup,
        &[receiver.port()],
        Protocol::Udp,
        Direction::Egress,
    );
    let gap = Duration::from_millis(10);
    let fault = inject(&scene, tamper_fault("reorder", 25.0, gap, target)).await;
    let (blast, count, counters) = blast(&scene, receiver, &fault).await;
    eprintln!(
        "MEASURE reorder_25pct_10ms_late={} of {} reordered={}",
        count.late, count.distinct, counters.reordered
    );
    assert_eq!(
        count.distinct, blast.sent,
        "reordering loses nothing: {count:?}"
    );
    assert!(
        (counters.reordered as f64 / blast.sent as f64 - 0.25).abs() <= 0.05,
        "about 25% should be held back: {counters:?}"
    );
    // At 20 000 datagrams/s, each held one is overtaken by the ones sent in the next 10 ms.
    assert!(
        count.late as f64 >= counters.reordered as f64 * 0.9,
        "the receiver should see the held datagrams late: {count:?}, {counters:?}"
    );

    let key = format!("reorder:{}", uniq());
    scene.inside.redis_set(&key, 1 << 20);
    let tcp = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Unspecified,
    );
    let fault = inject(&scene, tamper_fault("reorder", 25.0, gap, tcp)).await;
    let (bytes, seconds) = blocking(|| scene.inside.redis_get(&key));
    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    eprintln!(
        "MEASURE reorder_25pct_tcp_get_1MiB_s={seconds:.3} bytes={bytes} reordered={}",
        counters.reordered
    );
    assert_eq!(bytes, REPLY_BYTES, "the value should come back whole");
    assert!(counters.reordered >= 1, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn slice_16_cuts_tcp_data_into_16_byte_segments_on_the_wire() {
    let (scene, _app, outside) = scene().await;
    let port = 7380u16;
    let size = 1000;
    let target = cgroup_target(&scene.cgroup, &[port], Protocol::Tcp, Direction::Egress);
    let fault = inject(&scene, slice_fault(16, Duration::ZERO, target)).await;
    let (port_text, size_text) = (port.to_string(), size.to_string());
    let mut server = ConnClient::start(&outside, "tcp-sniff-echo", &[&port_text, &size_text]);
    server.expect("listening", Duration::from_secs(10));
    let mut client = ConnClient::start(
        &scene.inside,
        "tcp-echo-client",
        &["127.0.0.1", &port_text, &size_text],
    );
    let echoed = client.expect("echoed", Duration::from_secs(10));
    let done = server.expect("done", Duration::from_secs(10));
    let segments: Vec<u64> = done["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let counters = get_fault(&mut scene.faultd.faults(), &fault.id)
        .await
        .counters
        .unwrap_or_default();
    eprintln!(
        "MEASURE slice_16_segments={} largest={:?} server_reads={} sliced={}",
        segments.len(),
        segments.iter().max(),
        done["reads"],
        counters.sliced
    );
    assert!(
        echoed["intact"] == true,
        "the reply should be intact: {echoed}"
    );
    assert!(
        !segments.is_empty() && segments.iter().all(|&n| n <= 16),
        "every data segment to the server should carry at most 16 bytes: {segments:?}"
    );
    assert_eq!(
        segments.iter().sum::<u64>(),
        size,
        "the segments should carry the data once: {segments:?}"
    );
    assert!(counters.sliced >= 1, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn slice_with_a_delay_makes_the_server_read_each_piece_on_its_own() {
    let (scene, _app, outside) = scene().await;
    let port = 7381u16;
    let size = 160;
    let target = cgroup_target(&scene.cgroup, &[port], Protocol::Tcp, Direction::Egress);
    let delay = Duration::from_millis(20);
    inject(&scene, slice_fault(16, delay, target)).await;
    let (port_text, size_text) = (port.to_string(), size.to_string());
    let mut server = ConnClient::start(&outside, "tcp-sniff-echo", &[&port_text, &size_text]);
    server.expect("listening", Duration::from_secs(10));
    let mut client = ConnClient::start(
        &scene.inside,
        "tcp-echo-client",
        &["127.0.0.1", &port_text, &size_text],
    );
    let sending = at(&client.expect("sending", Duration::from_secs(10)));
    let echoed = client.expect("echoed", Duration::from_secs(10));
    let took_ms = (at(&echoed) - sending) as f64 / 1e6;
    let done = server.expect("done", Duration::from_secs(10));
    let reads: Vec<u64> = done["reads"]
        .as_array()
        .expect("reads")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    eprintln!("MEASURE slice_16_20ms_echo_ms={took_ms:.1} server_reads={reads:?}");
    assert!(
        echoed["intact"] == true,
        "the reply should be intact: {echoed}"
    );
    // Ten pieces, 20 ms apart: the data takes at least 180 ms to get through, and the server
    // reads it piece by piece (each as it comes, unless it was descheduled for a while).
    assert!(
        took_ms >= 180.0,
        "160 bytes in 16-byte pieces 20 ms apart took only {took_ms:.1} ms"
    );
    assert!(
        reads.iter().all(|&n| n <= 32) && reads.len() >= 5,
        "the server should read the data piece by piece: {reads:?}"
    );
}

/// A forced mechanism, as for delay: netem where this kernel lacks it is FAILED_PRECONDITION
/// naming the field and sch_netem (applied, where it has it); edt, which only delays, is
/// INVALID_ARGUMENT naming the field; nfqueue is applied. `caps` names the mechanism chosen.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_forced_mechanism_is_applied_or_refused_naming_what_is_missing() {
    let scene = RedisScene::start(fd_probe!()).await;
    let mut faults = scene.faultd.faults();
    let caps = faults
        .capabilities(CapabilitiesRequest {})
        .await
        .unwrap_or_else(|s| panic!("Capabilities failed: {s:?}"))
        .into_inner();
    let netem = caps
        .capabilities
        .iter()
        .find(|c| c.name == "netem")
        .unwrap_or_else(|| panic!("Capabilities lists no netem: {caps:?}"))
        .available;
    for action in ["duplicate", "corrupt", "reorder"] {
        let support = caps
            .actions
            .iter()
            .find(|a| a.action == action)
            .unwrap_or_else(|| panic!("Capabilities lists no {action}: {caps:?}"));
        let want = if netem { "netem" } else { "nfqueue" };
        assert_eq!(
            (support.available, support.mechanism.as_str()),
            (true, want),
            "{support:?}"
        );
    }
    let forced = |name: &str, mechanism: Mechanism| {
        let target = cgroup_target(
            &scene.cgroup,
            &[REDIS_PORT],
            Protocol::Tcp,
            Direction::Egress,
        );
        let mut fault = tamper_fault(name, 50.0, Duration::ZERO, target);
        match fault.action.as_mut() {
            Some(Action::Duplicate(d)) => d.mechanism = mechanism.into(),
            Some(Action::Corrupt(c)) => c.mechanism = mechanism.into(),
            Some(Action::Reorder(r)) => r.mechanism = mechanism.into(),
            other => panic!("not a tamper action: {other:?}"),
        }
        with_ttl(fault, Duration::from_secs(30))
    };
    for name in ["duplicate", "corrupt", "reorder"] {
        let field = format!("fault.{name}.mechanism");
        match faults.inject(forced(name, Mechanism::Netem)).await {
            Err(status) if !netem => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                assert!(
                    status.message().contains(&field) && status.message().contains("sch_netem"),
                    "forcing netem should name {field} and sch_netem: {status:?}"
                );
            }
            Ok(fault) if netem => {
                assert_eq!(fault.get_ref().mechanism, "netem");
                remove(&mut faults, &fault.get_ref().id).await;
            }
            other => panic!("forcing netem (available: {netem}): {other:?}"),
        }
        let status = faults
            .inject(forced(name, Mechanism::Edt))
            .await
            .expect_err("edt cannot duplicate, corrupt or reorder");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(&field), "{status:?}");
        let fault = faults
            .inject(forced(name, Mechanism::Nfqueue))
            .await
            .unwrap_or_else(|s| panic!("forcing nfqueue failed: {s:?}"))
            .into_inner();
        assert_eq!(fault.mechanism, "nfqueue", "{fault:?}");
        remove(&mut faults, &fault.id).await;
    }
}
