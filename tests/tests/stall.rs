//! `stall`, Toxiproxy's `timeout`, as a real Redis client feels it: a GET on an open redis-py
//! connection hangs (no error) while the fault lasts and is answered on the same connection
//! once it ends; with `close_after` the connection breaks that long after the fault saw it.

use std::time::Duration;

use faultd_proto::v1::{Direction, Fault, Protocol};
use faultd_tests::api::{
    cgroup_target, get_counters_until, get_fault, stall_fault, unix_ns as ts_ns, with_ttl,
};
use faultd_tests::clients::{ConnClient, at};
use faultd_tests::process::unix_ns;
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::uniq::uniq;
use faultd_tests::{RedisScene, fd_probe};

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

fn ns_field(event: &serde_json::Value, name: &str) -> i128 {
    event[name]
        .as_i64()
        .unwrap_or_else(|| panic!("no {name} in {event}"))
        .into()
}

/// A redis-py client in the scene's cgroup: SET once, then a GET every 100 ms on one
/// connection for `seconds`.
fn get_loop(scene: &RedisScene, seconds: u32) -> (ConnClient, i64) {
    let key = format!("stall:{}", uniq());
    let mut client = ConnClient::start(
        &scene.inside,
        "redis-get-loop",
        &[
            "127.0.0.1",
            &REDIS_PORT.to_string(),
            &key,
            "100",
            &seconds.to_string(),
        ],
    );
    let ready = client.expect("ready", Duration::from_secs(20));
    let port = ready["local_port"].as_i64().expect("local port");
    // The loop runs: a first GET is answered at once.
    let first = client.expect("got", Duration::from_secs(5));
    assert!(first["intact"] == true, "GET before the fault: {first}");
    (client, port)
}

/// Injects; returns the fault, and the unix ns just before the request and when the ack came.
async fn inject(scene: &RedisScene, fault: Fault, ttl: Duration) -> (Fault, i128, i128) {
    let sent = unix_ns();
    let fault = scene.faultd.inject(with_ttl(fault, ttl)).await;
    (fault, sent, unix_ns())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_stalled_redis_get_hangs_then_is_answered_on_the_same_connection() {
    let scene = RedisScene::start(fd_probe!()).await;
    let (mut client, port) = get_loop(&scene, 30);
    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Unspecified,
        Direction::Unspecified,
    );
    let (fault, _, acked) = inject(&scene, stall_fault(target, None), Duration::from_secs(3)).await;
    assert_eq!(fault.mechanism, "cgroup_skb", "Inject answered {fault:?}");
    let deadline = ts_ns(fault.expires_at.as_ref().expect("expires_at"));

    // The first GET sent under the fault: it hangs past 2 s, without an error, and is answered
    // (intact, on the same connection) only after the fault ended.
    let stalled = loop {
        let event = client.expect("got", Duration::from_secs(15));
        if ns_field(&event, "started") > acked {
            break event;
        }
    };
    let took = ns_field(&stalled, "took_ns");
    let answered = at(&stalled);
    eprintln!(
        "MEASURE stall_get_took_ms={:.0} answered_after_deadline_ms={:.0}",
        ms(took),
        ms(answered - deadline)
    );
    assert!(
        !client.seen().iter().any(|e| e["event"] == "error"),
        "the client saw an error: {:?}",
        client.seen()
    );
    assert!(
        took > 2_000_000_000,
        "the GET under the stall took only {:.0} ms: {stalled}",
        ms(took)
    );
    assert!(
        answered >= deadline,
        "the GET was answered {:.0} ms before the fault ended: {stalled}",
        ms(deadline - answered)
    );
    // TCP retransmits with a backoff: the next try after the deadline comes within ~3.2 s.
    assert!(
        answered - deadline < 5_000_000_000,
        "the GET was answered only {:.0} ms after the fault ended: {stalled}",
        ms(answered - deadline)
    );
    assert!(
        stalled["intact"] == true,
        "reply after the stall: {stalled}"
    );
    assert_eq!(
        stalled["local_port"].as_i64(),
        Some(port),
        "the GET was answered on another connection: {stalled}"
    );
    // And the connection is as fast as before.
    let next = client.expect("got", Duration::from_secs(2));
    assert!(
        ns_field(&next, "took_ns") < 100_000_000 && next["local_port"].as_i64() == Some(port),
        "the GET after the stall: {next}"
    );

    // What it did: the data segments it held back (the GET and its retransmissions).
    let ended = get_fault(&mut scene.faultd.faults(), &fault.id).await;
    let counters = ended.counters.unwrap_or_default();
    eprintln!(
        "MEASURE stall_matched={} stall_dropped={}",
        counters.matched, counters.dropped
    );
    assert!(
        counters.dropped >= 2 && counters.matched >= counters.dropped,
        "counters should show the stalled segments: {ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn stall_with_close_after_breaks_the_connection_after_its_allowance() {
    let scene = RedisScene::start(fd_probe!()).await;
    let (mut client, _) = get_loop(&scene, 30);
    let target = cgroup_target(
        &scene.cgroup,
        &[REDIS_PORT],
        Protocol::Tcp,
        Direction::Egress,
    );
    let close_after = Duration::from_secs(1);
    let (fault, sent, acked) = inject(
        &scene,
        stall_fault(target, Some(close_after)),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        fault.mechanism, "cgroup_skb+sock_diag",
        "Inject answered {fault:?}"
    );

    let broken = client.expect("error", Duration::from_secs(5));
    // The fault first saw the connection between the request and the ack.
    let (after_request, after) = (at(&broken) - sent, at(&broken) - acked);
    eprintln!(
        "MEASURE stall_close_after_error_ms={:.1} errno={} redis-py {}: {}",
        ms(after),
        broken["errno"],
        broken["type"],
        broken["error"]
    );
    assert!(
        broken["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("ConnectionError")),
        "the client should see a connection error, not a timeout: {broken}"
    );
    // The GET hung until the allowance was used up, then failed within a few polls.
    assert!(
        after_request >= close_after.as_nanos() as i128 && after < 1_500_000_000,
        "the connection broke {:.0} ms after the inject (close_after {close_after:?}): {broken}",
        ms(after)
    );
    // The watcher counts the connection just after the kernel woke the client with the error.
    let counted = get_counters_until(&mut scene.faultd.faults(), &fault.id, |c| {
        c.reset >= 1 && c.dropped >= 1
    })
    .await;
    let counters = counted.counters.unwrap_or_default();
    assert!(
        counters.reset >= 1 && counters.dropped >= 1,
        "counters should show the stalled GET and the closed connection: {counted:?}"
    );
}
