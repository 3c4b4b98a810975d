//! fd-bench: faultd's benchmarks, run by `cargo xtask bench` (as root, on release binaries).
//!
//! ```text
//! fd-bench [--quick] [--only NAME]... [--out DIR]
//! ```
//!
//! NAME is one of `latency`, `overhead`, `accuracy`, `scale`, `churn`, `proxy`, `requests`. Each figure is
//! set against a baseline measured in the same run (machines are shared and noisy, so only
//! ratios and side-by-side differences mean something). Prints a table and writes
//! `DIR/bench-<unix time>.json` and `DIR/latest.json` (default DIR: `target/bench`).
//!
//! Every namespace, cgroup, server and faultd a benchmark starts is held by a guard of the test
//! harness and removed when the benchmark ends, also when it fails (a failed benchmark is
//! reported and the others still run).

use std::collections::HashMap;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::{AbortRequest, Direction, Mechanism, Protocol};
use faultd_tests::api::{
    cgroup_target, delay_fault, drop_fault, grant, lease_deadline, remove, under_lease, with_ttl,
};
use faultd_tests::process::{ChildGuard, describe, output, run_ok, unix_ns};
use faultd_tests::servers::{POSTGRES_PORT, REDIS_PORT};
use faultd_tests::workload::stats::{median, quantile, stddev};
use faultd_tests::{Cgroup, Faultd, FaultdOptions, NetNs, Postgres, Redis, TempDir, Workload};
use tonic::transport::Channel;

// A crate root looks for modules beside itself: keep this binary's rooms in a folder of its name.
#[path = "fd-bench/churn.rs"]
mod churn;
#[path = "fd-bench/floor.rs"]
mod floor;
#[path = "fd-bench/overhead.rs"]
mod overhead;
#[path = "fd-bench/requests.rs"]
mod requests;

/// Redis and PostgreSQL on their own ports, and through the proxy.
const DIRECT: (u16, u16) = (REDIS_PORT, POSTGRES_PORT);
const PROXIED: (u16, u16) = (16_379, 15_432);

const BENCHES: &[&str] = &[
    "latency", "overhead", "accuracy", "scale", "churn", "proxy", "requests",
];

/// The fault-cli release the proxy comparison installs (`cargo install fault-cli@…`).
const FAULT_CLI_VERSION: &str = "1.2.1";

/// Ports of the faults that must match nothing: below the ephemeral range (32768-60999) and
/// away from Redis, PostgreSQL and the policy's protected ports (kubelet 10250).
const IDLE_PORTS: u16 = 11_000;

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Clone, Debug)]
struct Row {
    bench: &'static str,
    metric: String,
    unit: &'static str,
    value: f64,
    min: f64,
    max: f64,
    /// What the figure is set against, measured in the same run.
    baseline: Option<(String, f64)>,
    /// value / baseline (or as the metric says).
    ratio: Option<f64>,
    goal: Option<String>,
    met: Option<bool>,
}

impl Row {
    fn new(
        bench: &'static str,
        metric: impl Into<String>,
        unit: &'static str,
        values: &[f64],
    ) -> Row {
        let (value, min, max) = if values.is_empty() {
            (f64::NAN, f64::NAN, f64::NAN)
        } else {
            (
                median(values),
                values.iter().copied().fold(f64::INFINITY, f64::min),
                values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        Row {
            bench,
            metric: metric.into(),
            unit,
            value,
            min,
            max,
            baseline: None,
            ratio: None,
            goal: None,
            met: None,
        }
    }

    /// A figure that is one quantile of `values` (min and max of all of them).
    fn quantile(
        bench: &'static str,
        metric: impl Into<String>,
        unit: &'static str,
        values: &[f64],
        q: f64,
    ) -> Row {
        let mut row = Row::new(bench, metric, unit, values);
        if !values.is_empty() {
            row.value = quantile(values, q);
        }
        row
    }

    fn against(mut self, label: impl Into<String>, baseline: f64) -> Row {
        self.ratio = Some(self.value / baseline);
        self.baseline = Some((label.into(), baseline));
        self
    }

    fn goal(mut self, text: &str, met: bool) -> Row {
        self.goal = Some(text.to_owned());
        self.met = Some(met);
        self
    }

    /// For the p99 row of a quantile pair (`q` > 0.5): the goal of at most `bound_ms`; the
    /// median row carries none.
    fn p99_goal(self, q: f64, bound_ms: f64) -> Row {
        if q > 0.5 {
            let met = self.value <= bound_ms;
            self.goal(&format!("p99 ≤ {bound_ms} ms"), met)
        } else {
            self
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "bench": self.bench,
            "metric": self.metric,
            "unit": self.unit,
            "median": finite(self.value),
            "min": finite(self.min),
            "max": finite(self.max),
            "baseline": self.baseline.as_ref().map(|(label, v)| serde_json::json!({"label": label, "value": finite(*v)})),
            "ratio": self.ratio.and_then(finite),
            "goal": self.goal,
            "met": self.met,
        })
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[derive(Clone)]
struct Ctx {
    quick: bool,
    probe: PathBuf,
    rows: Arc<Mutex<Vec<Row>>>,
    notes: Arc<Mutex<Vec<String>>>,
}

impl Ctx {
    fn push(&self, row: Row) {
        eprintln!("fd-bench: {}", format_row(&row));
        self.rows.lock().expect("rows").push(row);
    }

    fn note(&self, note: String) {
        eprintln!("fd-bench: note: {note}");
        self.notes.lock().expect("notes").push(note);
    }

    fn rounds(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn format_row(row: &Row) -> String {
    let baseline = row
        .baseline
        .as_ref()
        .map(|(label, v)| format!("{} ({label})", num(*v)))
        .unwrap_or_else(|| "-".to_owned());
    let ratio = row.ratio.map(num).unwrap_or_else(|| "-".to_owned());
    let goal = match (&row.goal, row.met) {
        (Some(goal), Some(true)) => format!("{goal}: met"),
        (Some(goal), Some(false)) => format!("{goal}: MISSED"),
        _ => "-".to_owned(),
    };
    format!(
        "{:<9} {:<56} {:>9} {:<5} [{:>8} … {:>8}]  {:<28} {:>7}  {}",
        row.bench,
        row.metric,
        num(row.value),
        row.unit,
        num(row.min),
        num(row.max),
        baseline,
        ratio,
        goal
    )
}

// ---------------------------------------------------------------------------------------------
// Main

struct Args {
    quick: bool,
    only: Vec<String>,
    out: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        only: Vec::new(),
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                let name = it.next().context("--only needs a NAME")?;
                if !BENCHES.contains(&name.as_str()) {
                    bail!(
                        "--only {name}: unknown benchmark (known: {})",
                        BENCHES.join(", ")
                    );
                }
                args.only.push(name);
            }
            "--out" => args.out = PathBuf::from(it.next().context("--out needs a DIR")?),
            other => {
                bail!("unknown argument {other} (fd-bench [--quick] [--only NAME]... [--out DIR])")
            }
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    faultd_tests::require_root();
    // faultd, faultctl and fd-probe of the same build, next to this binary.
    let dir = std::env::current_exe()?
        .parent()
        .context("no directory")?
        .to_path_buf();
    for (env, name) in [("FAULTD_BIN", "faultd"), ("FAULTCTL_BIN", "faultctl")] {
        if std::env::var_os(env).is_none() {
            // SAFETY: still single-threaded: the runtime starts below.
            unsafe { std::env::set_var(env, dir.join(name)) };
        }
    }
    let probe = dir.join("fd-probe");
    if !probe.is_file() {
        bail!(
            "{} not found: build the tests crate's binaries",
            probe.display()
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args, probe))
}

async fn run(args: Args, probe: PathBuf) -> anyhow::Result<()> {
    let ctx = Ctx {
        quick: args.quick,
        probe,
        rows: Arc::default(),
        notes: Arc::default(),
    };
    let started = unix_ns();
    let mut failed = Vec::new();
    for &name in BENCHES {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("fd-bench: === {name} ===");
        let c = ctx.clone();
        // Each benchmark in a task of its own: a panic unwinds its guards (namespaces, cgroups,
        // servers, faultd) and the next benchmark still runs.
        let mut task = tokio::spawn(async move {
            match name {
                "latency" => latency(&c).await,
                "overhead" => overhead::overhead(&c).await,
                "accuracy" => accuracy(&c).await,
                "scale" => scale(&c).await,
                "churn" => churn::churn(&c).await,
                "proxy" => proxy(&c).await,
                "requests" => requests::requests(&c).await,
                _ => unreachable!("listed in BENCHES"),
            }
        });
        let result = tokio::select! {
            result = &mut task => result,
            _ = tokio::signal::ctrl_c() => {
                // Cancelling the task drops its guards at its next await: what it started
                // is removed before we exit.
                task.abort();
                let _ = task.await;
                ctx.note(format!("{name} interrupted (SIGINT); the rest did not run"));
                failed.push(name);
                break;
            }
        };
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(panic_message(e)),
        };
        if let Some(error) = error {
            ctx.note(format!("{name} FAILED: {error}"));
            failed.push(name);
        }
    }

    let rows = ctx.rows.lock().expect("rows").clone();
    let notes = ctx.notes.lock().expect("notes").clone();
    println!();
    println!(
        "{:<9} {:<56} {:>9} {:<5} [{:>8} … {:>8}]  {:<28} {:>7}  goal",
        "bench", "metric", "median", "unit", "min", "max", "baseline (same run)", "ratio"
    );
    for row in &rows {
        println!("{}", format_row(row));
    }
    for note in &notes {
        println!("note: {note}");
    }
    let machine = machine();
    println!("machine: {machine}");

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({
        "started_unix_ns": started.to_string(),
        "quick": args.quick,
        "machine": machine,
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "notes": notes,
    });
    let text = serde_json::to_string_pretty(&json)?;
    let file = args
        .out
        .join(format!("bench-{}.json", started / 1_000_000_000));
    std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    std::fs::write(args.out.join("latest.json"), &text)?;
    println!("wrote {}", file.display());
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned()),
        Err(e) => e.to_string(),
    }
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(str::trim)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpus} CPUs ({cpu}), kernel {}, load average at the end {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

/// faultd started with a policy that allows the counts the benchmarks need.
struct BenchFaultd {
    faultd: Faultd,
    _dir: TempDir,
}

impl BenchFaultd {
    async fn start() -> BenchFaultd {
        let dir = TempDir::new("faultd-bench-policy");
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            "max_active_faults = 20000\nmax_leases = 20000\nmax_ttl = \"1h\"\n",
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", policy.display()));
        let faultd = Faultd::start_with(FaultdOptions {
            extra_args: vec!["--policy".into(), policy.display().to_string()],
            ..Default::default()
        })
        .await;
        BenchFaultd { faultd, _dir: dir }
    }
}

/// Injects `count` drop faults (100%) on `cgroup`, one per port from `first_port`, with
/// `protocol` and `direction`, 32 calls in flight. Returns their ids.
async fn inject_many(
    faults: &FaultServiceClient<Channel>,
    cgroup: &Cgroup,
    first_port: u16,
    count: usize,
    protocol: Protocol,
    direction: Direction,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    let ports: Vec<u16> = (0..count).map(|i| first_port + i as u16).collect();
    for chunk in ports.chunks(32) {
        let mut set = tokio::task::JoinSet::new();
        for &port in chunk {
            let mut client = faults.clone();
            let fault = drop_fault(100.0, cgroup_target(cgroup, &[port], protocol, direction));
            set.spawn(async move {
                client
                    .inject(with_ttl(fault, Duration::from_secs(3600)))
                    .await
                    .unwrap_or_else(|s| panic!("Inject drop on port {port} failed: {s:?}"))
                    .into_inner()
                    .id
            });
        }
        while let Some(id) = set.join_next().await {
            ids.push(id.expect("inject task"));
        }
    }
    ids
}

/// The lowest real-time priority for a process of ours, else nice -10 (best effort).
fn prioritize(pid: u32) {
    let _best_effort = faultd_tests::sys::prioritize(pid);
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Memory the kernel charges for the BPF maps a process holds (the `memlock` of every map fd
/// in /proc/PID/fdinfo), in MiB.
fn bpf_map_mib(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return f64::NAN;
    };
    let mut bytes = 0u64;
    let mut seen = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        // The same map may be open on several fds.
        if let Some(id) = field("map_id:")
            && !seen.insert(id)
        {
            continue;
        }
        bytes += field("memlock:").unwrap_or(0);
    }
    bytes as f64 / (1 << 20) as f64
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

// ---------------------------------------------------------------------------------------------
// (3) Injection latency

/// The stream's pace: one datagram every 100 us.
const STREAM_INTERVAL_NS: u64 = 100_000;

/// Where the stream's datagrams arrived: per round, the gaps (runs of lost datagrams).
#[derive(Clone, Copy, Debug)]
struct Gap {
    last_seq: u32,
    last_ns: u64,
    next_seq: u32,
    next_ns: u64,
}

impl Gap {
    /// When the first lost datagram was sent: one interval after the last that arrived (or
    /// sooner, if the stream caught up after a stall: the pace across the gap).
    fn first_lost_ns(&self) -> u64 {
        let step = (self.next_ns - self.last_ns) / u64::from(self.next_seq - self.last_seq);
        self.last_ns + step.min(STREAM_INTERVAL_NS)
    }

    fn lost(&self) -> u32 {
        self.next_seq - self.last_seq - 1
    }
}

#[derive(Clone, Debug, Default)]
struct Flow {
    packets: u64,
    last_seq: u32,
    last_ns: u64,
    gaps: Vec<Gap>,
}

/// A UDP receiver on a thread of ours inside the namespace (setns on that thread only).
struct StreamReceiver {
    port: u16,
    flows: Arc<Mutex<HashMap<u32, Flow>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StreamReceiver {
    fn start(netns: &NetNs) -> anyhow::Result<StreamReceiver> {
        let path = format!("/run/netns/{}", netns.name());
        let flows: Arc<Mutex<HashMap<u32, Flow>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, s) = (flows.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let socket = (|| -> anyhow::Result<UdpSocket> {
                let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a valid namespace fd; affects this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                let socket = UdpSocket::bind("127.0.0.1:0")?;
                // Best effort, as before: a smaller buffer only makes the count noisier.
                let _best_effort = faultd_tests::sys::force_receive_buffer(&socket, 16 << 20);
                socket.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(socket)
            })();
            let socket = match socket {
                Ok(socket) => {
                    let _ = tx.send(Ok(socket.local_addr().map(|a| a.port()).unwrap_or(0)));
                    socket
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                if n < 16 {
                    continue;
                }
                let round = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
                let seq = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
                let sent = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                let mut flows = f.lock().expect("flows");
                let flow = flows.entry(round).or_default();
                if flow.packets > 0 {
                    if seq <= flow.last_seq {
                        continue;
                    }
                    if seq > flow.last_seq + 1 {
                        let gap = Gap {
                            last_seq: flow.last_seq,
                            last_ns: flow.last_ns,
                            next_seq: seq,
                            next_ns: sent,
                        };
                        flow.gaps.push(gap);
                    }
                }
                flow.packets += 1;
                flow.last_seq = seq;
                flow.last_ns = sent;
            }
        });
        let port = rx
            .recv()
            .context("receiver thread ended")?
            .context("starting the receiver")?;
        Ok(StreamReceiver {
            port,
            flows,
            stop,
            thread: Some(thread),
        })
    }

    fn flow(&self, round: u32) -> Flow {
        self.flows
            .lock()
            .expect("flows")
            .get(&round)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the round's stream has arrived `packets` times (up to 5 s).
    async fn wait_flowing(&self, round: u32, packets: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.flow(round).packets < packets {
            if Instant::now() > deadline {
                bail!("the stream of round {round} did not arrive within 5 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Waits (up to `timeout`) for a gap of the round that closed after `after_ns`: the stream
    /// flowed again. Returns the longest such gap.
    async fn wait_recovered(&self, round: u32, after_ns: u64, timeout: Duration) -> Option<Gap> {
        let deadline = Instant::now() + timeout;
        loop {
            let flow = self.flow(round);
            if let Some(gap) = flow
                .gaps
                .iter()
                .filter(|g| g.next_ns >= after_ns)
                .max_by_key(|g| g.lost())
            {
                return Some(*gap);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the stream receiver thread panicked");
        }
    }
}

/// `fd-probe udp-stream`: one datagram every 100 us from inside `cgroup`.
fn start_stream(ctx: &Ctx, cgroup: &Cgroup, netns: &NetNs, port: u16, round: u32) -> ChildGuard {
    let mut cmd = Command::new(&ctx.probe);
    cmd.arg("--cgroup")
        .arg(cgroup.dir())
        .args(["--netns", netns.name(), "udp-stream"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--round",
            &round.to_string(),
            "--interval",
            "100us",
            "--duration",
            "20s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    ChildGuard::spawn("udp-stream", &mut cmd)
}

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

/// How a round puts the drop in place and takes it away.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// faultd, on a cgroup that already has a fault (its scope entry exists).
    Existing,
    /// faultd, on a cgroup created for the round, which had no fault: faultd adds its scope
    /// and, where its programs sit only at faulted cgroups, attaches them there (the Remove of
    /// the cgroup's last fault detaches them).
    NewCgroup,
    /// faultd, under a lease left to run out.
    Deadline,
    /// `iptables -A … -j DROP` / `-D`, each run as a command.
    Iptables,
}

#[derive(Default)]
struct Latencies {
    applied: Vec<f64>,
    recovered: Vec<f64>,
    missed: usize,
}

fn iptables(netns: &NetNs, op: &str, cgroup: &Cgroup, port: u16) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", netns.name()))
        .args(["iptables", "-w", op, "OUTPUT", "-m", "cgroup", "--path"])
        .arg(cgroup.path())
        .args(["-p", "udp", "--dport", &port.to_string(), "-j", "DROP"]);
    cmd
}

#[allow(clippy::too_many_arguments)]
async fn latency_round(
    ctx: &Ctx,
    faultd: &Faultd,
    receiver: &StreamReceiver,
    netns: &NetNs,
    shared: &Cgroup,
    way: Way,
    round: u32,
    out: &mut Latencies,
) -> anyhow::Result<()> {
    let fresh = (way == Way::NewCgroup).then(Cgroup::new);
    let cgroup = fresh.as_ref().unwrap_or(shared);
    let stream = start_stream(ctx, cgroup, netns, receiver.port, round);
    receiver.wait_flowing(round, 100).await?;
    let mut faults = faultd.faults();
    let target = cgroup_target(cgroup, &[receiver.port], Protocol::Udp, Direction::Egress);
    let applied_at;
    let revert_at;
    match way {
        Way::Existing | Way::NewCgroup => {
            applied_at = unix_ns();
            let fault = faults
                .inject(with_ttl(drop_fault(100.0, target), Duration::from_secs(60)))
                .await
                .map_err(|s| anyhow::anyhow!("Inject: {s:?}"))?
                .into_inner();
            tokio::time::sleep(Duration::from_millis(30)).await;
            revert_at = unix_ns();
            remove(&mut faults, &fault.id).await;
        }
        Way::Deadline => {
            let lease = grant(&mut faultd.leases(), Duration::from_millis(100)).await;
            applied_at = unix_ns();
            // On a stalled machine the 100 ms lease may run out before the Inject arrives
            // (NOT_FOUND): the round is then counted as missed.
            if faults
                .inject(under_lease(drop_fault(100.0, target), &lease.id))
                .await
                .is_err()
            {
                out.missed += 1;
                return Ok(());
            }
            revert_at = lease_deadline(&lease);
        }
        Way::Iptables => {
            applied_at = unix_ns();
            run_ok(&mut iptables(netns, "-A", cgroup, receiver.port));
            tokio::time::sleep(Duration::from_millis(30)).await;
            revert_at = unix_ns();
            run_ok(&mut iptables(netns, "-D", cgroup, receiver.port));
        }
    }
    let gap = receiver
        .wait_recovered(round, applied_at as u64, Duration::from_secs(3))
        .await;
    drop(stream);
    match gap {
        Some(gap) => {
            out.applied
                .push(ms(gap.first_lost_ns() as i128 - applied_at));
            out.recovered.push(ms(gap.next_ns as i128 - revert_at));
        }
        None => out.missed += 1,
    }
    Ok(())
}

async fn latency(ctx: &Ctx) -> anyhow::Result<()> {
    const B: &str = "latency";
    let rounds = ctx.rounds(200, 30);
    let netns = NetNs::new();
    let shared = Cgroup::new();
    let bench = BenchFaultd::start().await;
    let faultd = &bench.faultd;
    let receiver = StreamReceiver::start(&netns)?;
    // Keeps the shared cgroup's scope in the kernel's map: "an existing datapath".
    let mut faults = faultd.faults();
    faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                cgroup_target(
                    &shared,
                    &[receiver.port.wrapping_add(1).max(1024)],
                    Protocol::Udp,
                    Direction::Egress,
                ),
            ),
            Duration::from_secs(3600),
        ))
        .await
        .map_err(|s| anyhow::anyhow!("Inject of the resident fault: {s:?}"))?;

    let ways = [Way::Iptables, Way::Existing, Way::NewCgroup, Way::Deadline];
    let mut results: Vec<Latencies> = ways.iter().map(|_| Latencies::default()).collect();
    let mut round = 0u32;
    // Interleaved: each pass runs every way once, so noise hits them alike.
    for _ in 0..rounds {
        for (i, &way) in ways.iter().enumerate() {
            round += 1;
            latency_round(
                ctx,
                faultd,
                &receiver,
                &netns,
                &shared,
                way,
                round,
                &mut results[i],
            )
            .await?;
        }
    }
    let [ipt, existing, new, deadline] = &results[..] else {
        unreachable!("four ways")
    };
    for (label, r) in [
        ("iptables", ipt),
        ("existing", existing),
        ("new cgroup", new),
        ("deadline", deadline),
    ] {
        if r.missed > 0 {
            ctx.note(format!(
                "latency {label}: {} of {rounds} rounds saw no drop and recovery within 3 s",
                r.missed
            ));
        }
    }
    let ipt_apply = |q| quantile(&ipt.applied, q);
    let ipt_rec = |q| quantile(&ipt.recovered, q);
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        ctx.push(Row::quantile(
            B,
            format!("iptables -A → first drop {name}"),
            "ms",
            &ipt.applied,
            q,
        ));
        let row = Row::quantile(
            B,
            format!("Inject → first drop {name} (existing)"),
            "ms",
            &existing.applied,
            q,
        )
        .against(format!("iptables -A {name}"), ipt_apply(q));
        ctx.push(row.p99_goal(q, 5.0));
        let row = Row::quantile(
            B,
            format!("Inject → first drop {name} (new cgroup)"),
            "ms",
            &new.applied,
            q,
        )
        .against(format!("iptables -A {name}"), ipt_apply(q));
        // Includes attaching faultd's programs where the cgroup had no fault before.
        ctx.push(row.p99_goal(q, 5.0));
        ctx.push(Row::quantile(
            B,
            format!("iptables -D → first pass {name}"),
            "ms",
            &ipt.recovered,
            q,
        ));
        ctx.push(
            Row::quantile(
                B,
                format!("Remove → first pass {name} (existing)"),
                "ms",
                &existing.recovered,
                q,
            )
            .against(format!("iptables -D {name}"), ipt_rec(q))
            .p99_goal(q, 5.0),
        );
        ctx.push(
            Row::quantile(
                B,
                format!("Remove → first pass {name} (new cgroup)"),
                "ms",
                &new.recovered,
                q,
            )
            .against(format!("iptables -D {name}"), ipt_rec(q))
            .p99_goal(q, 5.0),
        );
        let row = Row::quantile(
            B,
            format!("lease deadline → first pass {name}"),
            "ms",
            &deadline.recovered,
            q,
        );
        ctx.push(row.p99_goal(q, 5.0));
    }
    ctx.note(format!(
        "latency: {rounds} rounds per way, a datagram every 100 us (resolution ~0.1 ms); figures \
         are from the client's call (or the lease's expires_at) to the send time of the first \
         datagram dropped / passed"
    ));
    drop(receiver);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client workloads, shared by overhead (fd-bench/overhead.rs), proxy and scale

/// One client run: throughput and median latency.
#[derive(Clone, Copy, Debug)]
struct Perf {
    rps: f64,
    p50_ms: f64,
}

/// `redis-benchmark -t get,set` from inside the workload; one Perf per test.
fn redis_benchmark(
    inside: &Workload,
    port: u16,
    requests: u32,
    pipeline: u32,
) -> anyhow::Result<Vec<(String, Perf)>> {
    let mut cmd = inside.command("redis-benchmark");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        "get,set",
        "-c",
        "8",
        "--csv",
    ])
    .args(["-n", &requests.to_string(), "-P", &pipeline.to_string()]);
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{}` failed: {stdout}{}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let mut results = Vec::new();
    for line in stdout.lines().skip(1) {
        let fields: Vec<String> = line
            .split(',')
            .map(|f| f.trim_matches('"').to_owned())
            .collect();
        let get = |i: usize| -> anyhow::Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("field {i} of {line:?}"))
        };
        results.push((
            fields[0].clone(),
            Perf {
                rps: get(1)?,
                p50_ms: get(4)?,
            },
        ));
    }
    if results.len() != 2 {
        bail!("`{}` printed {stdout:?}", describe(&cmd));
    }
    Ok(results)
}

/// `pgbench -S` (select only) from inside the workload, with a per-transaction log.
fn pgbench(inside: &Workload, port: u16, seconds: u32) -> anyhow::Result<Perf> {
    let dir = TempDir::new("faultd-bench-pgbench");
    let prefix = dir.join("tx");
    let mut cmd = inside.command("pgbench");
    cmd.args([
        "-S",
        "-c",
        "4",
        "-j",
        "1",
        "-T",
        &seconds.to_string(),
        "-h",
        "127.0.0.1",
    ])
    .args(["-p", &port.to_string(), "-U", "postgres", "-l"])
    .arg(format!("--log-prefix={}", prefix.display()))
    .arg("postgres");
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{}` failed: {stdout}{}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tps: f64 = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no `tps = ` in {stdout:?}"))?;
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir.path())?.flatten() {
        let text = std::fs::read_to_string(entry.path())?;
        // client_id transaction_no time_us script_no time_epoch time_us
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    if latencies.is_empty() {
        bail!(
            "pgbench wrote no transaction log in {}",
            dir.path().display()
        );
    }
    Ok(Perf {
        rps: tps,
        p50_ms: quantile(&latencies, 0.5) / 1000.0,
    })
}

/// Every client workload once: name → Perf.
fn workloads(
    ctx: &Ctx,
    inside: &Workload,
    ports: (u16, u16),
) -> anyhow::Result<Vec<(String, Perf)>> {
    let n = if ctx.quick { 30_000 } else { 100_000 };
    let mut all = Vec::new();
    for (pipeline, tag) in [(1, ""), (16, " -P16")] {
        for (test, perf) in redis_benchmark(
            inside,
            ports.0,
            if pipeline == 1 { n } else { n * 4 },
            pipeline,
        )? {
            all.push((format!("redis {test}{tag}"), perf));
        }
    }
    all.push((
        "pgbench -S".to_owned(),
        pgbench(inside, ports.1, if ctx.quick { 3 } else { 8 })?,
    ));
    Ok(all)
}

/// Redis and PostgreSQL (with pgbench's tables) in a fresh namespace, and a client cgroup in
/// it: the scene of the throughput benchmarks. Fields drop in reverse order: clients first.
struct DbScene {
    inside: Workload,
    cgroup: Cgroup,
    _pg: Postgres,
    _redis: Redis,
    netns: NetNs,
}

impl DbScene {
    fn start(ctx: &Ctx) -> DbScene {
        let netns = NetNs::new();
        let redis = Redis::start(&netns);
        let pg = Postgres::start(&netns);
        let cgroup = Cgroup::new();
        let inside = Workload::inside(&ctx.probe, &cgroup, &netns);
        let mut init = inside.command("pgbench");
        init.args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("postgres");
        run_ok(&mut init);
        DbScene {
            inside,
            cgroup,
            _pg: pg,
            _redis: redis,
            netns,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (4) Accuracy

async fn accuracy(ctx: &Ctx) -> anyhow::Result<()> {
    const B: &str = "accuracy";
    let netns = NetNs::new();
    let redis = Redis::start(&netns);
    let cgroup = Cgroup::new();
    let bench = BenchFaultd::start().await;
    let mut faults = bench.faultd.faults();
    let inside = Workload::inside(&ctx.probe, &cgroup, &netns);
    let outside = Workload::outside(&ctx.probe, &netns);
    let datagrams = 100_000;
    let rounds = ctx.rounds(3, 1);

    // Baseline: the same stream with no fault.
    let mut base_loss = Vec::new();
    for _ in 0..rounds {
        let receiver = outside.udp_receiver("127.0.0.1:0");
        let blast = inside.udp_blast(receiver.addr(), datagrams);
        let count = receiver.finish();
        base_loss.push(100.0 * (1.0 - count.distinct as f64 / blast.sent as f64));
    }
    ctx.push(Row::new(B, "no fault: loss", "%", &base_loss));
    let base = median(&base_loss);
    for percent in [1.0, 10.0, 30.0, 50.0] {
        let mut errors = Vec::new();
        for _ in 0..rounds {
            let receiver = outside.udp_receiver("127.0.0.1:0");
            let target = cgroup_target(
                &cgroup,
                &[receiver.port()],
                Protocol::Udp,
                Direction::Egress,
            );
            let fault = faults
                .inject(with_ttl(
                    drop_fault(percent, target),
                    Duration::from_secs(600),
                ))
                .await
                .map_err(|s| anyhow::anyhow!("Inject drop {percent}%: {s:?}"))?
                .into_inner();
            let blast = inside.udp_blast(receiver.addr(), datagrams);
            let count = receiver.finish();
            remove(&mut faults, &fault.id).await;
            if count.rcvbuf_errors > 0 {
                ctx.note(format!(
                    "accuracy drop {percent}%: the receiver's buffer overflowed {} times",
                    count.rcvbuf_errors
                ));
            }
            let loss = 100.0 * (1.0 - count.distinct as f64 / blast.sent as f64);
            errors.push((loss - percent).abs());
        }
        let mut row = Row::new(
            B,
            format!("drop {percent}% of 100k: |loss - {percent}|"),
            "pp",
            &errors,
        );
        row.baseline = Some(("loss without fault, %".to_owned(), base));
        ctx.push(row);
    }

    // Delay, on the mechanism this host has (NFQUEUE here; netem/EDT in the kernel matrix).
    // Redis at the probe's priority (the lowest real-time one), as the delay tests do: the round
    // trips then measure the delay, not the run queue of a busy machine.
    prioritize(redis.pid());
    let _resident = inside.resident();
    let mut mechanism = String::from("unknown");
    let base_rtt = median(
        &inside
            .redis_rtt(if ctx.quick { 50 } else { 200 }, Duration::from_millis(5))
            .rtts(),
    );
    for latency_ms in [10u64, 100, 500] {
        for jitter_ms in [0, latency_ms / 10] {
            let count = match (ctx.quick, latency_ms) {
                (true, 500) => 8,
                (true, _) => 30,
                (false, 10) => 200,
                (false, 100) => 60,
                (false, _) => 30,
            };
            let target = cgroup_target(&cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
            let fault = faults
                .inject(with_ttl(
                    delay_fault(
                        Duration::from_millis(latency_ms),
                        Duration::from_millis(jitter_ms),
                        0.0,
                        Mechanism::Unspecified,
                        target,
                    ),
                    Duration::from_secs(600),
                ))
                .await
                .map_err(|s| anyhow::anyhow!("Inject delay {latency_ms} ms: {s:?}"))?
                .into_inner();
            let rtts = inside.redis_rtt(count, Duration::from_millis(1)).rtts();
            remove(&mut faults, &fault.id).await;
            let errors: Vec<f64> = rtts
                .iter()
                .map(|r| r - base_rtt - latency_ms as f64)
                .collect();
            if errors.is_empty() {
                bail!("delay {latency_ms} ms: no PING answered");
            }
            let abs: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
            let what = if jitter_ms == 0 {
                format!("delay {latency_ms} ms")
            } else {
                format!("delay {latency_ms}±{jitter_ms} ms")
            };
            let mut row = Row::new(B, format!("{what}: median error"), "ms", &errors);
            row.min = f64::NAN;
            row.max = f64::NAN;
            row.baseline = Some(("RTT without fault, ms".to_owned(), base_rtt));
            ctx.push(row);
            ctx.push(Row::quantile(
                B,
                format!("{what}: p99 |error|"),
                "ms",
                &abs,
                0.99,
            ));
            if jitter_ms > 0 {
                let sd = stddev(&rtts);
                let mut row = Row::new(B, format!("{what}: measured stddev"), "ms", &[sd])
                    .against("requested jitter, ms", jitter_ms as f64);
                row.min = f64::NAN;
                row.max = f64::NAN;
                ctx.push(row);
            }
            mechanism.clone_from(&fault.mechanism);
        }
    }
    ctx.note(format!(
        "accuracy: drop over {datagrams} UDP datagrams, {rounds} round(s) per level; delay on a Redis \
         PING round trip (egress delay), error = RTT - RTT without fault - requested latency; \
         mechanism chosen by faultd on this host: {mechanism}"
    ));
    drop(redis);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (5) Scale

async fn scale(ctx: &Ctx) -> anyhow::Result<()> {
    const B: &str = "scale";
    let netns = NetNs::new();
    let _redis = Redis::start(&netns);
    let cgroup = Cgroup::new();
    let inside = Workload::inside(&ctx.probe, &cgroup, &netns);
    let bench = BenchFaultd::start().await;
    let pid = bench.faultd.pid();
    let mut faults = bench.faultd.faults();
    let requests = if ctx.quick { 20_000 } else { 50_000 };
    let counts: &[usize] = if ctx.quick {
        &[1, 100, 1000]
    } else {
        &[1, 100, 1000, 10_000]
    };
    let get_rps = |inside: &Workload| -> anyhow::Result<f64> {
        let r = redis_benchmark(inside, REDIS_PORT, requests, 1)?;
        Ok(r.iter().map(|(_, p)| p.rps).sum::<f64>() / r.len() as f64)
    };
    let rss0 = rss_mib(pid);
    let maps0 = bpf_map_mib(pid);
    let rounds = ctx.rounds(3, 1);
    for &n in counts {
        let (mut apply, mut abort, mut ratios, mut base, mut rss, mut maps) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        // Interleaved: 0 faults, n faults, Abort; again.
        for _ in 0..rounds {
            let without = get_rps(&inside)?;
            let started = Instant::now();
            let ids = inject_many(
                &faults,
                &cgroup,
                IDLE_PORTS,
                n,
                Protocol::Unspecified,
                Direction::Unspecified,
            )
            .await;
            apply.push(started.elapsed().as_secs_f64());
            assert_eq!(ids.len(), n);
            let with = get_rps(&inside)?;
            rss.push(rss_mib(pid));
            maps.push(bpf_map_mib(pid));
            let started = Instant::now();
            let aborted = faults
                .abort(AbortRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("Abort: {s:?}"))?
                .into_inner();
            abort.push(started.elapsed().as_secs_f64() * 1000.0);
            if aborted.reverted_fault_ids.len() != n {
                ctx.note(format!(
                    "scale {n}: Abort reverted {} faults",
                    aborted.reverted_fault_ids.len()
                ));
            }
            ratios.push(with / without);
            base.push(without);
        }
        let per_fault: Vec<f64> = apply.iter().map(|s| s * 1000.0 / n as f64).collect();
        ctx.push(Row::new(
            B,
            format!("apply {n} faults (32 in flight)"),
            "s",
            &apply,
        ));
        ctx.push(Row::new(
            B,
            format!("apply {n}: per fault"),
            "ms",
            &per_fault,
        ));
        ctx.push(Row::new(B, format!("Abort {n} faults"), "ms", &abort));
        let mut row = Row::new(
            B,
            format!("{n} faults: redis req/s with/without"),
            "ratio",
            &ratios,
        );
        row.baseline = Some(("0 faults, same faultd, req/s".to_owned(), median(&base)));
        ctx.push(row);
        ctx.push(
            Row::new(B, format!("{n} faults: faultd RSS"), "MiB", &rss).against("at start", rss0),
        );
        ctx.push(
            Row::new(B, format!("{n} faults: BPF map memlock"), "MiB", &maps)
                .against("at start", maps0),
        );
    }
    ctx.note(
        "scale: faults are 100% drops on the client's cgroup, one port each (TCP+UDP, both \
         directions: 4 map entries a fault), none matching Redis; req/s is the mean of \
         redis-benchmark GET and SET (-c 8, no pipelining) measured right before and after"
            .to_owned(),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (2) Against a proxy

/// `fault run` with a passthrough run document: Redis and PostgreSQL behind TCP proxies in the
/// namespace, no fault configured.
fn start_fault_proxy(netns: &NetNs, bin: &Path, dir: &TempDir) -> anyhow::Result<ChildGuard> {
    let config = dir.join("passthrough.yaml");
    std::fs::write(
        &config,
        format!(
            "schema_version: 1\nname: passthrough\nproxies:\n\
             - {{name: redis, protocol: tcp, listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{}\"}}\n\
             - {{name: pg, protocol: tcp, listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{}\"}}\n\
             phases:\n- {{name: passthrough, proxies: []}}\n",
            PROXIED.0, DIRECT.0, PROXIED.1, DIRECT.1
        ),
    )?;
    let log = dir.join("fault.log");
    let file = std::fs::File::create(&log)?;
    let mut cmd = netns.exec(&bin.display().to_string());
    cmd.args(["--output", "json", "--color", "never", "run"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut proxy = ChildGuard::spawn("fault", &mut cmd);
    let mut ping = netns.exec("redis-cli");
    ping.args(["-h", "127.0.0.1", "-p", &PROXIED.0.to_string(), "PING"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            bail!(
                "`{}` exited with {status}: {}",
                describe(&cmd),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if String::from_utf8_lossy(&output(&mut ping).stdout).trim() == "PONG" {
            return Ok(proxy);
        }
        if Instant::now() > deadline {
            bail!(
                "`{}` did not pass a Redis PING within 10 s: {}",
                describe(&cmd),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn proxy(ctx: &Ctx) -> anyhow::Result<()> {
    const B: &str = "proxy";
    let bin = std::env::current_dir()?.join("target/bench-tools/bin/fault");
    if !bin.is_file() {
        bail!(
            "{} is missing: `cargo install fault-cli@{FAULT_CLI_VERSION} --locked --root target/bench-tools` \
             did not install it (see cargo xtask bench's output)",
            bin.display()
        );
    }
    let scene = DbScene::start(ctx);
    let (netns, cgroup, inside) = (&scene.netns, &scene.cgroup, &scene.inside);
    let dir = TempDir::new("faultd-bench-proxy");

    let rounds = ctx.rounds(3, 1);
    // name → per round (direct, through fault, through faultd's 0% drop)
    let mut runs: Vec<(String, Vec<[Perf; 3]>)> = Vec::new();
    let mut matched = 0u64;
    for round in 0..rounds {
        let mut results: [Option<Vec<(String, Perf)>>; 3] = [None, None, None];
        // A different order each round, so a drift in the machine's load favours none.
        for k in 0..3 {
            let which = (k + round) % 3;
            results[which] = Some(match which {
                0 => workloads(ctx, inside, DIRECT)?,
                1 => {
                    let _proxy = start_fault_proxy(netns, &bin, &dir)?;
                    workloads(ctx, inside, PROXIED)?
                }
                _ => {
                    let bench = BenchFaultd::start().await;
                    let mut faults = bench.faultd.faults();
                    let target = cgroup_target(
                        cgroup,
                        &[DIRECT.0, DIRECT.1],
                        Protocol::Unspecified,
                        Direction::Unspecified,
                    );
                    let fault = faults
                        .inject(with_ttl(drop_fault(0.0, target), Duration::from_secs(3600)))
                        .await
                        .map_err(|s| anyhow::anyhow!("Inject of a 0% drop: {s:?}"))?
                        .into_inner();
                    let result = workloads(ctx, inside, DIRECT)?;
                    let seen = faultd_tests::api::get_fault(&mut faults, &fault.id).await;
                    matched += faultd_tests::api::counters(&seen).0;
                    result
                }
            });
        }
        let [Some(a), Some(b), Some(c)] = results else {
            unreachable!("all three ran")
        };
        for (((name, a), (_, b)), (_, c)) in a.into_iter().zip(b).zip(c) {
            match runs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push([a, b, c]),
                None => runs.push((name, vec![[a, b, c]])),
            }
        }
    }
    for (name, rs) in runs {
        let base = median(&rs.iter().map(|r| r[0].rps).collect::<Vec<_>>());
        for (i, label) in [
            (1, "through fault proxy"),
            (2, "faultd 0% drop on every packet"),
        ] {
            let ratios: Vec<f64> = rs.iter().map(|r| r[i].rps / r[0].rps).collect();
            let mut row = Row::new(B, format!("{name}: {label}"), "ratio", &ratios);
            row.baseline = Some(("direct, req/s".to_owned(), base));
            ctx.push(row);
            let p50: Vec<f64> = rs
                .iter()
                .map(|r| (r[i].p50_ms - r[0].p50_ms) * 1000.0)
                .collect();
            ctx.push(Row::new(
                B,
                format!("{name}: {label}, p50 added"),
                "us",
                &p50,
            ));
        }
    }
    ctx.note(format!(
        "proxy: fault-cli {FAULT_CLI_VERSION} (`fault run`, TCP proxies for Redis and PostgreSQL, \
         no fault in the phase) vs faultd with a 0% drop on the client's cgroup, ports 6379 and \
         5432, TCP+UDP both directions (it matched {matched} packets); {rounds} rounds, order rotated"
    ));
    Ok(())
}
