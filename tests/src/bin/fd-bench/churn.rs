//! (6) Churn: leases renewed while other faults come and go. 1000 leases of ttl 1 s, each
//! holding a drop, renewed every 250 ms over 500 KeepAlive streams, while two loops inject and
//! remove delay faults (NFQUEUE where the kernel has neither netem nor fq: an iptables-restore
//! each time). A renewal must never wait for that work: how long KeepAlive answers take, how
//! many leases are lost although renewed in time, whether the server closes a stream, and how
//! many threads faultd grows to.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultd_proto::v1::{Direction, KeepAliveRequest, Mechanism, Protocol, RemoveRequest};
use faultd_tests::api::{
    cgroup_target, delay_fault, drop_fault, grant, list_leases, under_lease, with_ttl,
};
use faultd_tests::process::threads;
use faultd_tests::{Cgroup, Faultd};

use super::{BenchFaultd, Ctx, IDLE_PORTS, Row, cpu_seconds};

const B: &str = "churn";
const LEASES: usize = 1000;
const STREAMS: usize = 500;
const TTL: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(250);
/// The ports of the churning delay faults: clear of the leases' drops.
const CHURN_PORTS: [u16; 2] = [40_000, 41_000];

/// What the KeepAlive streams saw.
#[derive(Default)]
struct Seen {
    /// Milliseconds from each request to its answer.
    latencies: Vec<f64>,
    /// Streams that ended with an error (the server closing them included).
    failures: Vec<String>,
}

/// One KeepAlive stream renewing `ids` every `EVERY` until `stop`.
async fn keep_alive(
    faultd: &Faultd,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut client = faultd.leases();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut answers = match client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(answers) => answers.into_inner(),
        Err(s) => {
            seen.lock()
                .expect("seen")
                .failures
                .push(format!("KeepAlive: {s:?}"));
            return;
        }
    };
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(EVERY);
    let failure = loop {
        tokio::select! {
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    break None;
                }
                for id in &ids {
                    sent.push_back(Instant::now());
                    if tx.send(KeepAliveRequest { lease_id: id.clone() }).await.is_err() {
                        break;
                    }
                }
            }
            answer = answers.message() => match answer {
                Ok(Some(_)) => {
                    if let Some(at) = sent.pop_front() {
                        latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                Ok(None) => break Some("the server ended the stream".to_owned()),
                Err(s) => break Some(format!("KeepAlive answer: {s:?}")),
            }
        }
    };
    let mut seen = seen.lock().expect("seen");
    seen.latencies.extend(latencies);
    seen.failures.extend(failure);
}

/// Injects and removes a 10 ms delay on the next of 100 ports from `first_port`, until `stop`;
/// returns the rounds done and the Injects or Removes that failed.
async fn churn_loop(
    faultd: &Faultd,
    cgroup: &Cgroup,
    first_port: u16,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let mut faults = faultd.faults();
    let (mut rounds, mut failed) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let port = first_port + (rounds % 100) as u16;
        let target = cgroup_target(cgroup, &[port], Protocol::Tcp, Direction::Egress);
        let fault = delay_fault(
            Duration::from_millis(10),
            Duration::ZERO,
            0.0,
            Mechanism::Unspecified,
            target,
        );
        match faults.inject(with_ttl(fault, Duration::from_secs(5))).await {
            Ok(fault) => {
                let id = fault.into_inner().id;
                if faults.remove(RemoveRequest { id }).await.is_err() {
                    failed += 1;
                }
            }
            Err(_) => failed += 1,
        }
        rounds += 1;
    }
    (rounds, failed)
}

pub(super) async fn churn(ctx: &Ctx) -> anyhow::Result<()> {
    let cgroup = Arc::new(Cgroup::new());
    let bench = BenchFaultd::start().await;
    let faultd = Arc::new(bench);
    let pid = faultd.faultd.pid();
    let run_for = Duration::from_secs(if ctx.quick { 10 } else { 60 });
    let threads_before = threads(pid);

    // Each stream starts as soon as its leases are granted; its leases' faults follow.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut leases = faultd.faultd.leases();
    let mut tasks = Vec::new();
    let mut ids = Vec::with_capacity(LEASES);
    for _ in 0..STREAMS {
        let mut chunk = Vec::with_capacity(LEASES / STREAMS);
        for _ in 0..LEASES / STREAMS {
            chunk.push(grant(&mut leases, TTL).await.id);
        }
        ids.extend(chunk.iter().cloned());
        let (faultd, stop, seen) = (faultd.clone(), stop.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            keep_alive(&faultd.faultd, chunk, stop, seen).await;
        }));
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = faultd.faultd.faults();
        let fault = drop_fault(
            100.0,
            cgroup_target(
                &cgroup,
                &[IDLE_PORTS + i as u16],
                Protocol::Udp,
                Direction::Egress,
            ),
        );
        let id = id.clone();
        set.spawn(async move { client.inject(under_lease(fault, &id)).await.map(|_| ()) });
    }
    let mut inject_failed = 0;
    while let Some(r) = set.join_next().await {
        if !matches!(r, Ok(Ok(()))) {
            inject_failed += 1;
        }
    }
    // The measured period: renewals go on while the two loops churn.
    seen.lock().expect("seen").latencies.clear();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let loops: Vec<_> = CHURN_PORTS
        .iter()
        .map(|&port| {
            let (faultd, stop, cgroup) = (faultd.clone(), stop.clone(), cgroup.clone());
            tokio::spawn(async move { churn_loop(&faultd.faultd, &cgroup, port, stop).await })
        })
        .collect();
    let mut threads_max = threads(pid);
    while t0.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(250)).await;
        threads_max = threads_max.max(threads(pid));
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let alive = list_leases(&mut faultd.faultd.leases()).await;
    stop.store(true, Ordering::Relaxed);
    let mut churned = (0u64, 0u64);
    for l in loops {
        if let Ok((rounds, failed)) = l.await {
            churned.0 += rounds;
            churned.1 += failed;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let lost = ids
        .iter()
        .filter(|id| !alive.iter().any(|l| &l.id == *id))
        .count();
    let seen = seen.lock().expect("seen");
    if !seen.failures.is_empty() {
        ctx.note(format!(
            "churn: {} KeepAlive streams ended with an error, first: {}",
            seen.failures.len(),
            seen.failures[0]
        ));
    }
    if inject_failed > 0 {
        ctx.note(format!("churn: {inject_failed} of {LEASES} Injects failed"));
    }
    let secs = run_for.as_secs();
    let row = Row::new(
        B,
        format!("leases lost while renewed ({LEASES}, {secs}s)"),
        "count",
        &[lost as f64],
    );
    ctx.push(row.goal("0", lost == 0));
    let closed = seen.failures.len();
    let row = Row::new(
        B,
        "KeepAlive streams ended by the server",
        "count",
        &[closed as f64],
    );
    ctx.push(row.goal("0", closed == 0));
    let row = Row::quantile(B, "KeepAlive answer p50", "ms", &seen.latencies, 0.5);
    ctx.push(row);
    let row = Row::quantile(B, "KeepAlive answer p99", "ms", &seen.latencies, 0.99);
    let met = row.value < 50.0;
    ctx.push(row.goal("< 50 ms", met));
    let most = seen.latencies.iter().copied().fold(0.0, f64::max);
    ctx.push(Row::new(B, "KeepAlive answer max", "ms", &[most]));
    ctx.push(Row::new(
        B,
        "renewals answered per second",
        "1/s",
        &[seen.latencies.len() as f64 / wall],
    ));
    ctx.push(Row::new(
        B,
        "delay Inject+Remove rounds per second (2 loops)",
        "1/s",
        &[churned.0 as f64 / wall],
    ));
    let mut row = Row::new(B, "faultd threads at most", "count", &[threads_max as f64]);
    row.baseline = Some(("threads before".to_owned(), threads_before as f64));
    ctx.push(row);
    ctx.push(Row::new(
        B,
        "faultd CPU while renewing",
        "% core",
        &[100.0 * cpu / wall],
    ));
    ctx.note(format!(
        "churn: {LEASES} leases of ttl 1 s, each with one UDP drop fault, renewed every 250 ms over \
         {STREAMS} KeepAlive streams for {secs} s, while 2 loops injected and \
         removed a 10 ms egress delay on the client cgroup ({} rounds, {} failed; NFQUEUE on a host \
         without netem and fq)",
        churned.0, churned.1
    ));
    Ok(())
}
