//! (1) Overhead: what faultd costs traffic it does not target, and traffic it targets without
//! matching a rule (and, for reference, traffic a rule matches).
//!
//! Five states, interleaved round by round in a rotated order: (a) no faultd; (b) faultd with
//! no fault; (c) faultd with 1000 faults on another cgroup; (d) faultd with 1000 faults on the
//! client's own cgroup, none matching its traffic; (e) faultd with a 0% drop matching every
//! packet of the client. Each state runs the same clients: Redis and PostgreSQL throughput
//! (`redis-benchmark`, `pgbench`), round trips of microsecond resolution (`sockperf
//! ping-pong`), and the kernel's run statistics of faultd's programs while they ran.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faultd_proto::v1::{Direction, Protocol};
use faultd_tests::api::{cgroup_target, counters, drop_fault, get_fault, with_ttl};
use faultd_tests::bpf::{RunStats, Runs, prog_stats, runs_between};
use faultd_tests::process::{ChildGuard, describe, output, poll};
use faultd_tests::servers::{POSTGRES_PORT, REDIS_PORT};
use faultd_tests::workload::stats::median;
use faultd_tests::{Cgroup, NetNs, Workload};

use super::{
    BenchFaultd, Ctx, DIRECT, DbScene, IDLE_PORTS, Perf, Row, cpu_seconds, inject_many, workloads,
};

const B: &str = "overhead";

/// sockperf's server port, for TCP and UDP alike. Not its default (11111): that lies among the
/// IDLE_PORTS of state (d), whose faults must match nothing the clients send.
const SOCKPERF_PORT: u16 = 12_111;

/// The programs whose cost the benchmark reports always; any other `faultd_` program that ran
/// is reported too.
const PROGRAMS: [&str; 4] = [
    "faultd_egress",
    "faultd_ingress",
    "faultd_connect4",
    "faultd_connect6",
];

/// Of those, the per-packet programs: the ones the miss-path budget (≤ 50 ns a run) is for.
/// The connect programs run once per connection, cold, so their ns/run is not that figure.
const PACKET_PROGRAMS: [&str; 2] = ["faultd_egress", "faultd_ingress"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NoFaultd,
    Idle,
    OtherCgroup,
    OwnCgroup,
    Matching,
}

impl State {
    const ALL: [State; 5] = [
        State::NoFaultd,
        State::Idle,
        State::OtherCgroup,
        State::OwnCgroup,
        State::Matching,
    ];

    fn label(self) -> &'static str {
        match self {
            State::NoFaultd => "no faultd",
            State::Idle => "(b) idle",
            State::OtherCgroup => "(c) other cgroup",
            State::OwnCgroup => "(d) own cgroup",
            State::Matching => "(e) matching",
        }
    }

    /// Untargeted traffic: goals of no program run and ≥ 0.99 of the throughput.
    fn untargeted(self) -> bool {
        matches!(self, State::Idle | State::OtherCgroup)
    }
}

/// sockperf round-trip quantiles, in µs.
#[derive(Clone, Copy, Debug)]
struct Rtt {
    p50: f64,
    p99: f64,
}

/// What one state measured in one round.
struct Measured {
    perf: Vec<(String, Perf)>,
    rtt: Vec<(String, Rtt)>,
    /// By program name (every `faultd_` program of the bench's faultd that ran).
    runs: std::collections::BTreeMap<String, Runs>,
    /// faultd's CPU while the clients ran, % of a core.
    faultd_cpu: Option<f64>,
    /// Packets the matching fault of (e) matched.
    matched: u64,
}

/// What every state shares: the servers and the client's cgroup, the sibling cgroup, the CPU
/// of sockperf, and the statistics being on.
struct Scene<'a> {
    db: &'a DbScene,
    other: &'a Cgroup,
    cpu: usize,
    _stats: &'a RunStats,
}

pub(super) async fn overhead(ctx: &Ctx) -> anyhow::Result<()> {
    // Before anything starts, so every program run of the benchmark is counted; restored
    // when this returns or unwinds.
    let stats = RunStats::try_enable().context("switching on the kernel's BPF run statistics")?;
    let db = DbScene::start(ctx);
    // A sibling of the client's cgroup: where (c) puts its faults.
    let other = Cgroup::new();
    let cpu = last_cpu();
    let _servers = [
        start_sockperf(&db.netns, cpu, true)?,
        start_sockperf(&db.netns, cpu, false)?,
    ];
    let scene = Scene {
        db: &db,
        other: &other,
        cpu,
        _stats: &stats,
    };

    let rounds = ctx.rounds(5, 2);
    let mut results: Vec<Vec<Measured>> = State::ALL.iter().map(|_| Vec::new()).collect();
    let mut faultd_cpu = Vec::new();
    let mut matched = 0;
    let mut floor = Vec::new();
    for round in 0..rounds {
        // Round r starts at state r (mod 5): a drift in the machine's load favours none.
        for k in 0..State::ALL.len() {
            let i = (round + k) % State::ALL.len();
            let m = measure(ctx, &scene, State::ALL[i]).await?;
            faultd_cpu.extend(m.faultd_cpu);
            matched += m.matched;
            results[i].push(m);
        }
        floor.push(measure_floor(ctx, &scene)?);
    }
    report(ctx, &results);
    report_floor(ctx, &results, &floor);
    ctx.push(Row::new(
        B,
        "faultd CPU while the clients ran (b-e)",
        "% core",
        &faultd_cpu,
    ));
    ctx.note(format!(
        "overhead: {rounds} rounds of five states, order rotated per round: (a) no faultd, \
         (b) faultd with no fault, (c) faultd with 1000 drop faults on another cgroup, (d) 1000 \
         drop faults on the client's own cgroup, ports {IDLE_PORTS}-{} TCP+UDP both directions \
         (none matching), (e) one 0% drop on the client's cgroup matching ports {REDIS_PORT}, \
         {POSTGRES_PORT} and {SOCKPERF_PORT} (it matched {matched} packets); redis-benchmark \
         -c 8, pgbench -S -c 4; sockperf ping-pong round trips, client and server pinned to CPU \
         {cpu}; program runs and ns/run from the kernel's bpf stats (on for the whole benchmark through BPF_ENABLE_STATS: \
         each run also pays two clock reads for them), all runs on the machine while the clients \
         ran, none in (a)",
        IDLE_PORTS + 999
    ));
    Ok(())
}

/// The empty program's ns/run, no faultd, the same clients as every state.
fn measure_floor(ctx: &Ctx, scene: &Scene<'_>) -> anyhow::Result<f64> {
    let inside = &scene.db.inside;
    let empty = super::floor::EmptyProgram::attach(scene.db.cgroup.dir())?;
    let (n0, t0) = empty.runs();
    workloads(ctx, inside, DIRECT)?;
    let seconds = if ctx.quick { 2 } else { 4 };
    for tcp in [true, false] {
        sockperf(inside, scene.cpu, tcp, seconds)?;
    }
    let (n1, t1) = empty.runs();
    anyhow::ensure!(n1 > n0, "the empty program never ran");
    Ok((t1 - t0) as f64 / (n1 - n0) as f64)
}

/// The floor row, and (d)'s packet programs above it, round by round.
fn report_floor(ctx: &Ctx, results: &[Vec<Measured>], floor: &[f64]) {
    ctx.push(Row::new(
        B,
        format!(
            "empty cgroup_skb program ({}) ns/run: the floor",
            super::floor::NAME
        ),
        "ns",
        floor,
    ));
    let own = State::ALL
        .iter()
        .position(|s| *s == State::OwnCgroup)
        .expect("state (d)");
    for program in PACKET_PROGRAMS {
        let above: Vec<f64> = results[own]
            .iter()
            .zip(floor)
            .filter_map(|(m, floor)| {
                let runs = m.runs.get(program)?;
                Some(runs.ns_per_run() - floor)
            })
            .collect();
        ctx.push(Row::new(
            B,
            format!("(d) own cgroup: {program} ns/run above the floor"),
            "ns",
            &above,
        ));
    }
}

/// One state, once: sets it up, runs every client, and takes it down.
async fn measure(ctx: &Ctx, scene: &Scene<'_>, state: State) -> anyhow::Result<Measured> {
    let (cgroup, inside) = (&scene.db.cgroup, &scene.db.inside);
    let bench = match state {
        State::NoFaultd => None,
        _ => Some(BenchFaultd::start().await),
    };
    let mut fault_id = None;
    if let Some(bench) = &bench {
        let mut faults = bench.faultd.faults();
        let on = match state {
            State::OtherCgroup => Some(scene.other),
            State::OwnCgroup => Some(cgroup),
            _ => None,
        };
        if let Some(on) = on {
            let ids = inject_many(
                &faults,
                on,
                IDLE_PORTS,
                1000,
                Protocol::Unspecified,
                Direction::Unspecified,
            )
            .await;
            assert_eq!(ids.len(), 1000);
        }
        if state == State::Matching {
            let target = cgroup_target(
                cgroup,
                &[REDIS_PORT, POSTGRES_PORT, SOCKPERF_PORT],
                Protocol::Unspecified,
                Direction::Unspecified,
            );
            let fault = faults
                .inject(with_ttl(drop_fault(0.0, target), Duration::from_secs(3600)))
                .await
                .map_err(|s| anyhow::anyhow!("Inject of a 0% drop: {s:?}"))?
                .into_inner();
            fault_id = Some(fault.id);
        }
    }
    let pid = bench.as_ref().map(|b| b.faultd.pid());
    let before = pid.map(prog_stats).unwrap_or_default();
    let (cpu0, t0) = (pid.map(cpu_seconds), Instant::now());

    let perf = workloads(ctx, inside, DIRECT)?;
    let seconds = if ctx.quick { 2 } else { 4 };
    let mut rtt = Vec::new();
    for (tcp, name) in [(true, "TCP"), (false, "UDP")] {
        rtt.push((name.to_owned(), sockperf(inside, scene.cpu, tcp, seconds)?));
    }

    let faultd_cpu = pid
        .zip(cpu0)
        .map(|(pid, cpu0)| 100.0 * (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64());
    let after = pid.map(prog_stats).unwrap_or_default();
    let mut matched = 0;
    if let (Some(bench), Some(id)) = (&bench, &fault_id) {
        matched = counters(&get_fault(&mut bench.faultd.faults(), id).await).0;
    }
    Ok(Measured {
        perf,
        rtt,
        runs: runs_between(&before, &after)
            .into_iter()
            .filter(|(name, _)| name.starts_with("faultd_"))
            .collect(),
        faultd_cpu,
        matched,
    })
}

fn find<T: Copy>(list: &[(String, T)], name: &str) -> Option<T> {
    list.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// The rows: throughput and round trips against (a) of the same round, then program runs.
fn report(ctx: &Ctx, results: &[Vec<Measured>]) {
    let (base, states) = results.split_first().expect("five states");
    let faultd_states = &State::ALL[1..];
    for (name, _) in &base[0].perf {
        let base_rps: Vec<f64> = base
            .iter()
            .filter_map(|m| find(&m.perf, name))
            .map(|p| p.rps)
            .collect();
        for (state, runs) in faultd_states.iter().zip(states) {
            let ratios: Vec<f64> = runs
                .iter()
                .zip(base)
                .filter_map(|(m, a)| Some(find(&m.perf, name)?.rps / find(&a.perf, name)?.rps))
                .collect();
            let mut row = Row::new(
                B,
                format!("{name}: throughput, {}", state.label()),
                "ratio",
                &ratios,
            );
            if state.untargeted() {
                let met = row.value >= 0.99;
                row = row.goal("≥ 0.99", met);
            }
            row.baseline = Some(("no faultd, req/s".to_owned(), median(&base_rps)));
            ctx.push(row);
        }
    }
    for (proto, _) in &base[0].rtt {
        for (q, pick) in [
            ("p50", (|r: Rtt| r.p50) as fn(Rtt) -> f64),
            ("p99", |r: Rtt| r.p99),
        ] {
            let base_us: Vec<f64> = base
                .iter()
                .filter_map(|m| find(&m.rtt, proto))
                .map(pick)
                .collect();
            for (state, runs) in faultd_states.iter().zip(states) {
                let added: Vec<f64> = runs
                    .iter()
                    .zip(base)
                    .filter_map(|(m, a)| {
                        Some(pick(find(&m.rtt, proto)?) - pick(find(&a.rtt, proto)?))
                    })
                    .collect();
                let mut row = Row::new(
                    B,
                    format!("sockperf {proto} RTT {q} added, {}", state.label()),
                    "us",
                    &added,
                );
                // The idle-overhead budget; (e) pays for its matching on purpose.
                if q == "p50" && *state != State::Matching {
                    let met = row.value <= 2.0;
                    row = row.goal("≤ 2 us", met);
                }
                row.baseline = Some((format!("no faultd {q}, us"), median(&base_us)));
                ctx.push(row);
            }
        }
    }
    // The four always (a program missing is one that never ran), and any other that ran.
    let mut programs: Vec<String> = PROGRAMS.iter().map(|p| (*p).to_owned()).collect();
    let ran: BTreeSet<&String> = states
        .iter()
        .flatten()
        .flat_map(|m| m.runs.iter())
        .filter(|(_, r)| r.count > 0)
        .map(|(n, _)| n)
        .collect();
    programs.extend(
        ran.into_iter()
            .filter(|n| !PROGRAMS.contains(&n.as_str()))
            .cloned(),
    );
    for (state, runs) in faultd_states.iter().zip(states) {
        for program in &programs {
            let per_round: Vec<Runs> = runs
                .iter()
                .map(|m| m.runs.get(program).copied().unwrap_or_default())
                .collect();
            let counts: Vec<f64> = per_round.iter().map(|r| r.count as f64).collect();
            let mut row = Row::new(
                B,
                format!("{}: {program} runs", state.label()),
                "count",
                &counts,
            );
            if state.untargeted() {
                // Every round, not just the median: a single run is a program in the path.
                let met = row.max == 0.0;
                row = row.goal("0", met);
            }
            ctx.push(row);
            let ns: Vec<f64> = per_round
                .iter()
                .filter(|r| r.count > 0)
                .map(Runs::ns_per_run)
                .collect();
            let mut row = Row::new(B, format!("{}: {program} ns/run", state.label()), "ns", &ns);
            if *state == State::OwnCgroup && PACKET_PROGRAMS.contains(&program.as_str()) {
                // A program that did not run has no cost to miss the budget with.
                let met = ns.is_empty() || row.value <= 50.0;
                row = row.goal("≤ 50 ns", met);
            }
            ctx.push(row);
        }
    }
}

/// The last CPU this process may run on. sockperf's client and server share it: a round trip
/// is then two wake-ups on one core, a few µs, instead of hopping between a few µs and tens of
/// µs as the scheduler places the two on one core or two.
fn last_cpu() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
                .trim()
                .to_owned();
            list.rsplit([',', '-']).next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// `sockperf server` on SOCKPERF_PORT in the namespace (outside the client's cgroup, like
/// Redis), pinned to `cpu`; returns once it listens.
fn start_sockperf(netns: &NetNs, cpu: usize, tcp: bool) -> anyhow::Result<ChildGuard> {
    let mut cmd = netns.exec("taskset");
    cmd.args([
        "-c",
        &cpu.to_string(),
        "sockperf",
        "server",
        "-i",
        "127.0.0.1",
    ])
    .args(["-p", &SOCKPERF_PORT.to_string()])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if tcp {
        cmd.arg("--tcp");
    }
    let mut server = ChildGuard::spawn("sockperf server", &mut cmd);
    // The server's /proc/PID/net shows the namespace it entered: wait for its socket there.
    let (table, state) = if tcp { ("tcp", "0A") } else { ("udp", "07") };
    let path = format!("/proc/{}/net/{table}", server.id());
    let port = format!(":{SOCKPERF_PORT:04X}");
    let listening = poll(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&path).ok()?;
        text.lines()
            .skip(1)
            .any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.get(1).is_some_and(|a| a.ends_with(&port)) && fields.get(3) == Some(&state)
            })
            .then_some(())
    });
    if listening.is_none() {
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!("`{}` exited with {status}", describe(&cmd));
        }
        bail!(
            "`{}` did not open port {SOCKPERF_PORT} within 10 s",
            describe(&cmd)
        );
    }
    Ok(server)
}

/// `sockperf ping-pong` from inside the workload for `seconds`: round-trip p50 and p99.
fn sockperf(inside: &Workload, cpu: usize, tcp: bool, seconds: u32) -> anyhow::Result<Rtt> {
    let mut cmd = inside.command("taskset");
    cmd.args([
        "-c",
        &cpu.to_string(),
        "sockperf",
        "ping-pong",
        "-i",
        "127.0.0.1",
    ])
    .args(["-p", &SOCKPERF_PORT.to_string(), "-t", &seconds.to_string()])
    .arg("--full-rtt");
    if tcp {
        cmd.arg("--tcp");
    }
    let out = output(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("`{}` failed ({}): {text}", describe(&cmd), out.status);
    }
    // "sockperf: ---> percentile 50.000 =    4.829" (µs, with --full-rtt the round trip)
    let percentile = |q: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| {
                l.split_once(&format!("percentile {q} ="))?
                    .1
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| {
                format!(
                    "no percentile {q} in the output of `{}`: {text}",
                    describe(&cmd)
                )
            })
    };
    Ok(Rtt {
        p50: percentile("50.000")?,
        p99: percentile("99.000")?,
    })
}
