//! `slow_connect` and `slow_close` as real sockets feel them: only the handshake waits (the SYN
//! is held, connect() takes the latency longer while an established connection's round trips
//! stay as they were), or only the close does (the server sees EOF the latency late, while the
//! data before it arrived at once).

use std::time::Duration;

use faultd_proto::v1::{Direction, Fault, Protocol};
use faultd_tests::api::{cgroup_target, get_fault, slow_fault, with_ttl};
use faultd_tests::clients::{ConnClient, at};
use faultd_tests::process::{blocking, unix_ns};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::stats;
use faultd_tests::{RedisScene, Workload, fd_probe};

async fn inject(scene: &RedisScene, fault: Fault) -> (Fault, i128) {
    let fault = scene
        .faultd
        .inject(with_ttl(fault, Duration::from_secs(20)))
        .await;
    (fault, unix_ns())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn slow_connect_delays_the_handshake_only() {
    let scene = RedisScene::start(fd_probe!()).await;
    // NFQUEUE applies in the network namespaces of the cgroup's processes.
    let _app = scene.inside.resident();
    let inside = &scene.inside;
    let redis = format!("127.0.0.1:{REDIS_PORT}");
    let ms = Duration::from_millis;

    let base = blocking(|| inside.redis_rtt(100, ms(5)));
    let base_rtt = stats::median(&base.rtts());
    // An established connection that keeps pinging through the fault.
    let established = inside.redis_rtt_spawn(500, ms(10));
    tokio::time::sleep(ms(300)).await;

    let latency = ms(300);
    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Unspecified,
        Direction::Unspecified,
    );
    let (fault, acked) = inject(&scene, slow_fault(true, latency, target)).await;
    assert_eq!(fault.mechanism, "nfqueue", "Inject answered {fault:?}");

    let attempts = blocking(|| {
        inside
            .tcp_probe(
                &redis,
                ms(50),
                Duration::from_secs(2),
                Duration::from_secs(3),
            )
            .finish()
    });
    let run = blocking(|| established.finish());
    let connects: Vec<f64> = attempts
        .iter()
        .filter(|a| a.ok)
        .map(|a| a.took as f64 / 1e6)
        .collect();
    assert_eq!(
        connects.len(),
        attempts.len(),
        "every connect should succeed: {attempts:?}"
    );
    let connect_ms = stats::median(&connects);
    let during: Vec<f64> = run
        .pings
        .iter()
        .filter(|p| p.at > acked)
        .filter_map(|p| p.rtt_ms)
        .collect();
    assert!(
        during.len() >= 100 && run.failures() == 0,
        "the established connection should keep answering: {} pings under the fault, {} failures",
        during.len(),
        run.failures()
    );
    let rtt = stats::median(&during);
    let rtt_p99 = stats::quantile(&during, 0.99);
    eprintln!(
        "MEASURE slow_connect_300ms_connect_median_ms={connect_ms:.3} min={:.3} max={:.3} n={} \
         established_rtt_median_ms={rtt:.3} p99={rtt_p99:.3} baseline_ms={base_rtt:.3}",
        stats::quantile(&connects, 0.0),
        stats::quantile(&connects, 1.0),
        connects.len()
    );
    assert!(
        (connect_ms - 300.0).abs() <= 5.0,
        "connect() took {connect_ms:.3} ms (median of {}), expected 300 ± 5 ms: {connects:?}",
        connects.len()
    );
    assert!(
        rtt < base_rtt + 1.0,
        "the established connection's round trips went from {base_rtt:.3} to {rtt:.3} ms"
    );

    let counted = get_fault(&mut scene.faultd.faults(), &fault.id).await;
    let counters = counted.counters.unwrap_or_default();
    assert!(
        counters.delayed >= connects.len() as u64,
        "each connect's SYN should be counted as held: {counted:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn slow_close_delays_the_fin_only() {
    let scene = RedisScene::start(fd_probe!()).await;
    let _app = scene.inside.resident();
    let outside = Workload::outside(fd_probe!(), &scene.netns);
    let port = 7379u16;
    let latency = Duration::from_millis(300);
    let target = cgroup_target(
        &scene.cgroup,
        &[port],
        Protocol::Unspecified,
        Direction::Unspecified,
    );
    let (fault, _) = inject(&scene, slow_fault(false, latency, target)).await;
    assert_eq!(fault.mechanism, "nfqueue", "Inject answered {fault:?}");

    let mut server = ConnClient::start(&outside, "tcp-eof-server", &[&port.to_string()]);
    server.expect("listening", Duration::from_secs(10));
    let mut client = ConnClient::start(
        &scene.inside,
        "tcp-close",
        &["127.0.0.1", &port.to_string()],
    );
    let sent = at(&client.expect("sent", Duration::from_secs(10)));
    let data = at(&server.expect("data", Duration::from_secs(5)));
    let closing = at(&client.expect("closing", Duration::from_secs(5)));
    let eof = at(&server.expect("eof", Duration::from_secs(5)));
    let data_ms = (data - sent) as f64 / 1e6;
    let eof_ms = (eof - closing) as f64 / 1e6;
    eprintln!(
        "MEASURE slow_close_300ms_eof_after_close_ms={eof_ms:.3} data_after_send_ms={data_ms:.3}"
    );
    assert!(
        data_ms < 50.0,
        "the data before the close should not wait: it arrived {data_ms:.1} ms after the send"
    );
    assert!(
        (300.0..320.0).contains(&eof_ms),
        "the server should see EOF 300 ms after close(), saw it after {eof_ms:.3} ms"
    );
    let counted = get_fault(&mut scene.faultd.faults(), &fault.id).await;
    assert!(
        counted.counters.unwrap_or_default().delayed >= 1,
        "the FIN should be counted as held: {counted:?}"
    );
}
