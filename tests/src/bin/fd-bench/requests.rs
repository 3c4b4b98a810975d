//! (7) Requests: what a request match costs each packet on the target's path. Redis in a
//! namespace, redis-benchmark (GET and SET) in a cgroup, under two faults on 6379 egress,
//! round by round in alternating order: (p) a 0% drop — every packet is matched by port, no
//! payload is read; (r) a request drop naming a command the client never sends (FLUSHALL) —
//! every packet is matched by port, and each one with payload is read and parsed, the name
//! looked up and not found, so nothing is dropped. The kernel's run statistics of
//! `faultd_egress` give the ns a run of each; their difference is the matching's cost.

use std::time::Duration;

use faultd_proto::v1::{
    Direction, Protocol, RedisMatch, RequestMatch, request_match::Protocol as Matched,
};
use faultd_tests::api::{cgroup_target, drop_fault, with_ttl};
use faultd_tests::bpf::{RunStats, prog_stats, runs_between};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::{Cgroup, NetNs, Redis, Workload};

use super::{BenchFaultd, Ctx, Row, redis_benchmark};

const B: &str = "requests";

#[derive(Clone, Copy, PartialEq)]
enum Match {
    Port,
    Request,
}

impl Match {
    fn label(self) -> &'static str {
        match self {
            Match::Port => "(p) port match, 0% drop",
            Match::Request => "(r) request match, no command matching",
        }
    }
}

pub(super) async fn requests(ctx: &Ctx) -> anyhow::Result<()> {
    let _stats = RunStats::enable();
    let netns = NetNs::new();
    let _redis = Redis::start(&netns);
    let cgroup = Cgroup::new();
    let inside = Workload::inside(&ctx.probe, &cgroup, &netns);
    let rounds = if ctx.quick { 2 } else { 5 };
    let requests = if ctx.quick { 20_000 } else { 100_000 };
    let mut ns = [Vec::new(), Vec::new()];
    let mut rps = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Match::Port, Match::Request]
        } else {
            [Match::Request, Match::Port]
        };
        for which in order {
            let (per_run, per_second) = measure(&inside, &cgroup, which, requests).await?;
            let i = usize::from(which == Match::Request);
            ns[i].push(per_run);
            rps[i].push(per_second);
        }
    }
    let port = median_of(&ns[0]);
    ctx.push(Row::new(
        B,
        format!("faultd_egress {}", Match::Port.label()),
        "ns/run",
        &ns[0],
    ));
    ctx.push(
        Row::new(
            B,
            format!("faultd_egress {}", Match::Request.label()),
            "ns/run",
            &ns[1],
        )
        .against(Match::Port.label(), port),
    );
    ctx.push(Row::new(
        B,
        format!("redis GET+SET req/s {}", Match::Port.label()),
        "req/s",
        &rps[0],
    ));
    ctx.push(
        Row::new(
            B,
            format!("redis GET+SET req/s {}", Match::Request.label()),
            "req/s",
            &rps[1],
        )
        .against(Match::Port.label(), median_of(&rps[0])),
    );
    ctx.note(format!(
        "requests: redis-benchmark -t get,set -c 8 -n {requests} (no pipelining) in the faulted \
         cgroup, {rounds} rounds alternating (p) and (r); ns/run of faultd_egress over all its \
         runs (pure ACKs included, which read no payload)"
    ));
    Ok(())
}

fn median_of(values: &[f64]) -> f64 {
    faultd_tests::workload::stats::median(values)
}

/// faultd_egress's ns a run, and redis-benchmark's mean req/s of GET and SET, under `which`.
async fn measure(
    inside: &Workload,
    cgroup: &Cgroup,
    which: Match,
    requests: u32,
) -> anyhow::Result<(f64, f64)> {
    let bench = BenchFaultd::start().await;
    let mut target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let percent = match which {
        Match::Port => 0.0,
        Match::Request => {
            target.request = Some(RequestMatch {
                protocol: Some(Matched::Redis(RedisMatch {
                    commands: vec!["FLUSHALL".into()],
                    key_prefix: String::new(),
                })),
            });
            100.0
        }
    };
    bench
        .faultd
        .faults()
        .inject(with_ttl(
            drop_fault(percent, target),
            Duration::from_secs(3600),
        ))
        .await
        .map_err(|s| anyhow::anyhow!("Inject ({}): {s:?}", which.label()))?;
    let pid = bench.faultd.pid();
    let before = prog_stats(pid);
    let perf = redis_benchmark(inside, REDIS_PORT, requests, 1)?;
    let after = prog_stats(pid);
    let runs = runs_between(&before, &after);
    let egress = runs
        .get("faultd_egress")
        .ok_or_else(|| anyhow::anyhow!("faultd_egress did not run"))?;
    let per_second = perf.iter().map(|(_, p)| p.rps).sum::<f64>() / perf.len().max(1) as f64;
    Ok((egress.ns_per_run(), per_second))
}
