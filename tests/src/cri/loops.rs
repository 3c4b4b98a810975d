//! The Redis client loops of the pod tests and what they must see under a fault: a client
//! pod's loop feels it, a sibling pod's does not.

use std::time::Duration;

use serde_json::Value;

use super::{Container, Node, Pod};
use crate::clients::ConnClient;
use crate::servers::REDIS_PORT;
use crate::workload::stats::median;

/// A container's Redis client loop: PING every `interval_ms` on one redis-py client.
pub fn redis_loop(
    node: &mut Node,
    pod: &Pod,
    name: &str,
    attempt: u32,
    redis: &Pod,
    interval_ms: u32,
) -> (Container, ConnClient) {
    let port = REDIS_PORT.to_string();
    let interval = interval_ms.to_string();
    node.client_container(
        pod,
        name,
        attempt,
        "redis-loop",
        &[&redis.ip, &port, &interval],
    )
}

pub fn is_timeout(event: &Value) -> bool {
    event["type"].as_str().unwrap_or("").contains("Timeout")
}

/// The sibling's loop keeps answering over `window` after `since`.
pub fn assert_untouched(sibling: &mut ConnClient, since: i128, window: Duration, what: &str) {
    let events = sibling.events_after(since, window);
    assert!(
        events.len() >= 5 && events.iter().all(|e| e["event"] == "pong"),
        "{what}: the sibling pod is not targeted and its loop should keep getting PONG: {events:?}"
    );
}

/// PONG round trips (ms) a loop reports over `window` after `since`.
pub fn pong_ms(client: &mut ConnClient, since: i128, window: Duration) -> Vec<f64> {
    client
        .events_after(since, window)
        .iter()
        .filter(|e| e["event"] == "pong")
        .filter_map(|e| e["took_ns"].as_f64())
        .map(|ns| ns / 1e6)
        .collect()
}

/// The delay the tests add: well above the loops' own round trip (under 1 ms), short enough
/// for 50 samples in a few seconds.
pub const DELAY_MS: f64 = 30.0;

/// Injects, with `inject(["delay", ARGS…, "--latency", "30ms", "--ttl", "60s"])` (returning
/// when it started, unix ns), and asserts, from the loops' own PONG timings over 3 s before and
/// after, that the client pod's median round trip rises by the delay (± 2 ms) and the
/// sibling's does not move (± 2 ms).
pub fn assert_delay_adds_to_the_client_only(
    client: &mut ConnClient,
    sibling: &mut ConnClient,
    inject: impl FnOnce(&[&str]) -> i128,
    args: &[&str],
    what: &str,
) {
    let window = Duration::from_secs(3);
    let before = crate::process::unix_ns();
    let (client_before, sibling_before) = (
        pong_ms(client, before, window),
        pong_ms(sibling, before, Duration::ZERO),
    );
    let latency = format!("{DELAY_MS}ms");
    let mut all = vec!["delay"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--latency", &latency, "--ttl", "60s"]);
    let injected = inject(&all);
    // Samples of PINGs sent after the fault was in place.
    let settled = injected + 200_000_000;
    std::thread::sleep(Duration::from_millis(200));
    let (client_after, sibling_after) = (
        pong_ms(client, settled, window),
        pong_ms(sibling, settled, Duration::ZERO),
    );
    for (name, samples) in [
        ("client before", &client_before),
        ("client after", &client_after),
        ("sibling before", &sibling_before),
        ("sibling after", &sibling_after),
    ] {
        assert!(
            samples.len() >= 30,
            "{what}: {name}: too few PONGs to measure ({})",
            samples.len()
        );
    }
    let added = median(&client_after) - median(&client_before);
    let sibling_added = median(&sibling_after) - median(&sibling_before);
    eprintln!(
        "MEASURE {what}: requested_ms={DELAY_MS} client_median_before_ms={:.2} \
         client_median_after_ms={:.2} added_ms={added:.2} sibling_added_ms={sibling_added:.2} \
         samples={}/{}",
        median(&client_before),
        median(&client_after),
        client_before.len(),
        client_after.len()
    );
    assert!(
        (added - DELAY_MS).abs() <= 2.0,
        "{what}: a {DELAY_MS} ms delay should add {DELAY_MS} ms ± 2 ms to the client pod's median \
         Redis round trip, added {added:.2} ms"
    );
    assert!(
        sibling_added.abs() <= 2.0,
        "{what}: the sibling pod's median round trip should not move, moved {sibling_added:.2} ms"
    );
}
