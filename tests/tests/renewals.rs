//! A renewed lease stays: renewals are answered at once however busy faultd is with other
//! faults' kernel and iptables work, and no lease renewed in time expires.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use faultd_proto::v1::{Direction, KeepAliveRequest, Mechanism, Protocol, RemoveRequest};
use faultd_tests::api::{
    cgroup_target, delay_fault, drop_fault, grant, list_leases, under_lease, with_ttl,
};
use faultd_tests::process::threads;
use faultd_tests::workload::stats::quantile;
use faultd_tests::{Cgroup, Faultd};
use tokio_stream::StreamExt;

const LEASES: usize = 300;
const STREAMS: usize = 20;
const TTL: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(250);
const CHURN_FOR: Duration = Duration::from_secs(20);
/// KeepAlive answers may take this long at the 99th percentile.
const P99_BOUND_MS: f64 = 50.0;

/// What one KeepAlive stream saw: answer latencies (ms) and how it ended, if it did.
struct StreamRun {
    latencies: Vec<f64>,
    failure: Option<String>,
}

/// Renews the leases in `leases` (more may come in meanwhile) over one KeepAlive stream every
/// `EVERY` until `until`.
async fn keep_alive(
    faultd: &Faultd,
    leases: &std::sync::Mutex<Vec<String>>,
    until: Instant,
) -> StreamRun {
    let mut client = faultd.leases();
    let (tx, rx) = tokio::sync::mpsc::channel::<KeepAliveRequest>(LEASES * 4);
    let mut answers = match client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(answers) => answers.into_inner(),
        Err(status) => {
            return StreamRun {
                latencies: Vec::new(),
                failure: Some(format!("KeepAlive refused: {status:?}")),
            };
        }
    };
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() >= until {
                    break;
                }
                let ids = leases.lock().unwrap().clone();
                for id in &ids {
                    sent.push_back(Instant::now());
                    if tx.send(KeepAliveRequest { lease_id: id.clone() }).await.is_err() {
                        return StreamRun { latencies, failure: Some("the stream closed".into()) };
                    }
                }
            }
            answer = answers.next() => match answer {
                Some(Ok(_)) => {
                    if let Some(at) = sent.pop_front() {
                        latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                Some(Err(status)) => {
                    return StreamRun { latencies, failure: Some(format!("{status:?}")) };
                }
                None => return StreamRun { latencies, failure: Some("the server ended the stream".into()) },
            }
        }
    }
    drop(tx);
    // The last answers.
    while let Some(Ok(_)) = answers.next().await {
        if let Some(at) = sent.pop_front() {
            latencies.push(at.elapsed().as_secs_f64() * 1000.0);
        }
    }
    StreamRun {
        latencies,
        failure: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "privileged: needs root, BPF, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn renewals_are_answered_at_once_while_other_faults_come_and_go() {
    let faultd = std::sync::Arc::new(Faultd::start().await);
    let cgroup = std::sync::Arc::new(Cgroup::new());

    // Each stream grants its leases (ttl 1 s), puts a drop on a port of its own under each, so
    // renewing it moves kernel deadlines, and renews them every 250 ms from then on.
    let threads_before = threads(faultd.pid());
    let until = Instant::now() + CHURN_FOR;
    let mut streams = tokio::task::JoinSet::new();
    for stream in 0..STREAMS {
        let (faultd, cgroup) = (faultd.clone(), cgroup.clone());
        streams.spawn(async move {
            let (faultd, cgroup) = (&*faultd, &*cgroup);
            {
                let ids = std::sync::Mutex::new(Vec::new());
                // The stream renews each lease from the moment it is granted.
                let setup = async {
                    let (mut leases, mut faults) = (faultd.leases(), faultd.faults());
                    for i in 0..LEASES / STREAMS {
                        let lease = grant(&mut leases, TTL).await;
                        ids.lock().unwrap().push(lease.id.clone());
                        let port = 20_000 + (stream * LEASES / STREAMS + i) as u16;
                        let target =
                            cgroup_target(cgroup, &[port], Protocol::Tcp, Direction::Egress);
                        faults
                            .inject(under_lease(drop_fault(100.0, target), &lease.id))
                            .await
                            .unwrap_or_else(|s| {
                                panic!("Inject under lease {} failed: {s:?}", lease.id)
                            });
                    }
                };
                let ((), run) = tokio::join!(setup, keep_alive(faultd, &ids, until));
                (ids.into_inner().unwrap(), run)
            }
        });
    }
    let streams = async {
        let mut runs = Vec::new();
        while let Some(run) = streams.join_next().await {
            runs.push(run.expect("a KeepAlive stream's task panicked"));
        }
        runs
    };
    // Two loops inject and remove delays (NFQUEUE on this host: iptables-restore each time).
    let churn = |first_port: u16| {
        let faultd = &*faultd;
        let cgroup = &*cgroup;
        async move {
            let mut faults = faultd.faults();
            let mut rounds = 0u32;
            let mut max = Duration::ZERO;
            while Instant::now() < until {
                let port = first_port + (rounds % 100) as u16;
                let target = cgroup_target(cgroup, &[port], Protocol::Tcp, Direction::Egress);
                let started = Instant::now();
                let fault = faults
                    .inject(with_ttl(
                        delay_fault(
                            Duration::from_millis(10),
                            Duration::ZERO,
                            0.0,
                            Mechanism::Unspecified,
                            target,
                        ),
                        Duration::from_secs(5),
                    ))
                    .await
                    .unwrap_or_else(|s| panic!("churn Inject failed: {s:?}"))
                    .into_inner();
                faults
                    .remove(RemoveRequest { id: fault.id })
                    .await
                    .unwrap_or_else(|s| panic!("churn Remove failed: {s:?}"));
                max = max.max(started.elapsed());
                rounds += 1;
            }
            (rounds, max)
        }
    };
    let (runs, churned, threads_during) = {
        let sample = async {
            let mut most = 0;
            while Instant::now() < until {
                most = most.max(threads(faultd.pid()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            most
        };
        let (runs, a, b, most) = tokio::join!(streams, churn(40_000), churn(41_000), sample);
        (runs, [a, b], most)
    };
    let (ids, runs): (Vec<Vec<String>>, Vec<StreamRun>) = runs.into_iter().unzip();
    let ids: Vec<String> = ids.into_iter().flatten().collect();
    let failures: Vec<&String> = runs.iter().filter_map(|r| r.failure.as_ref()).collect();
    let latencies: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    assert!(
        !latencies.is_empty(),
        "no KeepAlive answer came back; the streams ended with {failures:?}"
    );
    let p50 = quantile(&latencies, 0.5);
    let p99 = quantile(&latencies, 0.99);
    let max = latencies.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "MEASURE renewals={} keepalive_p50_ms={p50:.2} keepalive_p99_ms={p99:.2} keepalive_max_ms={max:.1} \
         churn_rounds={:?} threads_before={threads_before} threads_max={threads_during}",
        latencies.len(),
        churned
    );
    assert!(
        failures.is_empty(),
        "{} of {STREAMS} KeepAlive streams ended early: {failures:?}",
        failures.len()
    );
    assert!(
        churned.iter().all(|(rounds, _)| *rounds > 5),
        "the churn loops barely ran: {churned:?}"
    );
    let alive = list_leases(&mut faultd.leases()).await;
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !alive.iter().any(|l| &l.id == *id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {LEASES} leases renewed every {EVERY:?} (ttl {TTL:?}) expired anyway: {:?}…",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        p99 < P99_BOUND_MS,
        "KeepAlive answers took {p99:.1} ms at p99 (p50 {p50:.1} ms, max {max:.1} ms) while other faults came and went; bound {P99_BOUND_MS} ms"
    );
    assert!(
        threads_during <= threads_before + 64,
        "faultd grew from {threads_before} to {threads_during} threads under the churn"
    );
}
