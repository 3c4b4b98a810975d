//! A 30% drop loses 30% of a UDP stream, and the BPF counters agree with what was lost.

use std::time::Duration;

use faultd_proto::v1::{Direction, Protocol};
use faultd_tests::api::{cgroup_target, counters, drop_fault, get_fault_until, with_ttl};
use faultd_tests::{Cgroup, Faultd, NetNs, Workload, fd_probe};

const DATAGRAMS: u64 = 25_000;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn thirty_percent_drop_loses_thirty_percent_of_udp() {
    let netns = NetNs::new();
    let cgroup = Cgroup::new();
    let faultd = Faultd::start().await;
    let mut faults = faultd.faults();
    let inside = Workload::inside(fd_probe!(), &cgroup, &netns);
    let outside = Workload::outside(fd_probe!(), &netns);

    let receiver = outside.udp_receiver("127.0.0.1:0");
    let port = receiver.port();
    let target = cgroup_target(&cgroup, &[port], Protocol::Udp, Direction::Egress);
    let fault = faults
        .inject(with_ttl(drop_fault(30.0, target), Duration::from_secs(120)))
        .await
        .unwrap_or_else(|s| panic!("Inject of a 30% UDP drop on {port} failed: {s:?}"))
        .into_inner();

    let blast = inside.udp_blast(receiver.addr(), DATAGRAMS);
    let count = receiver.finish();
    assert_eq!(
        blast.sent, DATAGRAMS,
        "the sender did not send everything: {blast:?}"
    );
    assert_eq!(
        blast.errors, 0,
        "a dropped egress datagram must look sent to a UDP sender (drop + congestion), but send failed: {blast:?}"
    );
    assert_eq!(
        count.rcvbuf_errors, 0,
        "the receiver's socket buffer overflowed, so the loss below is not only the fault's: {count:?}"
    );
    let loss = 1.0 - count.distinct as f64 / blast.sent as f64;
    eprintln!(
        "MEASURE loss_30pct={:.2}% (sent {}, received {} distinct {})",
        loss * 100.0,
        blast.sent,
        count.received,
        count.distinct
    );
    assert!(
        (loss - 0.30).abs() <= 0.02,
        "a 30% drop should lose 30% ± 2 points of {} datagrams; measured {:.2}%",
        blast.sent,
        loss * 100.0
    );

    let seen = get_fault_until(&mut faults, &fault.id, |m, _| m >= blast.sent).await;
    let (matched, dropped) = counters(&seen);
    let counted_loss = if matched == 0 {
        0.0
    } else {
        dropped as f64 / matched as f64
    };
    eprintln!(
        "MEASURE loss_30pct_bpf_counters={:.2}% (matched {matched}, dropped {dropped})",
        counted_loss * 100.0
    );
    assert!(
        matched >= blast.sent && matched <= blast.sent + blast.sent / 100,
        "every datagram the workload sent to port {port} matched the fault: sent {}, but the counters say matched {matched}",
        blast.sent
    );
    let lost = blast.sent - count.distinct;
    assert!(
        dropped.abs_diff(lost) <= blast.sent / 200,
        "the BPF counters say {dropped} dropped but the receiver missed {lost} of {} datagrams",
        blast.sent
    );
    assert!(
        (counted_loss - loss).abs() <= 0.005,
        "dropped/matched = {:.2}% disagrees with the measured loss {:.2}%",
        counted_loss * 100.0,
        loss * 100.0
    );
}
