//! Clients and measurements run inside a workload (a cgroup in a namespace) or beside it (in
//! the namespace, outside the cgroup), through `fd-probe`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::netns::NetNs;
use crate::process::{ChildGuard, blocking, describe, output, stop, wait_timeout};
use crate::servers::{POSTGRES_PORT, REDIS_PORT};

/// Where clients run: a namespace and, for the workload itself, a cgroup.
#[derive(Clone, Debug)]
pub struct Workload {
    probe: PathBuf,
    cgroup: Option<PathBuf>,
    /// An `ip netns` name, or a namespace's path.
    netns: String,
    label: String,
}

impl Workload {
    /// In `cgroup` and `netns`: what a fault on the cgroup applies to.
    pub fn inside(probe: &Path, cgroup: &Cgroup, netns: &NetNs) -> Workload {
        Workload {
            probe: probe.to_path_buf(),
            cgroup: Some(cgroup.dir().to_path_buf()),
            netns: netns.name().to_owned(),
            label: format!("inside cgroup {}", cgroup.path()),
        }
    }

    /// In the cgroup directory `dir` (e.g. a container's scope in a kubelet-like tree) and
    /// `netns`.
    pub fn in_cgroup_dir(probe: &Path, dir: &Path, netns: &NetNs, label: &str) -> Workload {
        Workload {
            probe: probe.to_path_buf(),
            cgroup: Some(dir.to_path_buf()),
            netns: netns.name().to_owned(),
            label: label.to_owned(),
        }
    }

    /// In the cgroup directory `dir` and the network namespace at `netns_path` (e.g.
    /// `/proc/PID/ns/net` of a pod's container): where `kubectl exec` runs a command.
    pub fn in_namespace_path(probe: &Path, dir: &Path, netns_path: &Path, label: &str) -> Workload {
        Workload {
            probe: probe.to_path_buf(),
            cgroup: Some(dir.to_path_buf()),
            netns: netns_path.display().to_string(),
            label: label.to_owned(),
        }
    }

    /// In `netns` but in the test's own cgroup: a neighbour the fault must not touch.
    pub fn outside(probe: &Path, netns: &NetNs) -> Workload {
        Workload {
            probe: probe.to_path_buf(),
            cgroup: None,
            netns: netns.name().to_owned(),
            label: "outside the cgroup".to_owned(),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    fn base(&self) -> Command {
        let mut cmd = Command::new(&self.probe);
        if let Some(dir) = &self.cgroup {
            cmd.arg("--cgroup").arg(dir);
        }
        cmd.args(["--netns", &self.netns]).stdin(Stdio::null());
        cmd
    }

    /// `fd-probe … -- program`: a real client run in the workload; add its arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = self.base();
        cmd.args(["--", program]);
        cmd
    }

    /// A long-lived process of the workload (`sleep`), as a running application would be:
    /// mechanisms that act per network namespace find the workload's through it.
    /// Returns once it runs in the cgroup and the namespace.
    pub fn resident(&self) -> ChildGuard {
        let mut cmd = self.command("sleep");
        cmd.arg("600");
        let resident = ChildGuard::spawn("resident sleep", &mut cmd);
        // fd-probe execs sleep only after joining the cgroup and the namespace.
        let comm = format!("/proc/{}/comm", resident.id());
        let settled = crate::process::poll(Duration::from_secs(5), || {
            (std::fs::read_to_string(&comm).ok()?.trim() == "sleep").then_some(())
        });
        assert!(
            settled.is_some(),
            "`{}` did not start within 5 s",
            describe(&cmd)
        );
        resident
    }

    /// `redis-rtt`: `count` PINGs to Redis on 127.0.0.1 over one connection, `interval` apart,
    /// each timed by the client itself.
    pub fn redis_rtt(&self, count: u32, interval: Duration) -> RttRun {
        self.redis_rtt_at("127.0.0.1", count, interval)
    }

    /// `redis_rtt` to Redis on `host` (e.g. `[::1]`).
    pub fn redis_rtt_at(&self, host: &str, count: u32, interval: Duration) -> RttRun {
        let mut cmd = self.base();
        cmd.args(["redis-rtt", &format!("{host}:{REDIS_PORT}")])
            .args(["--count", &count.to_string()])
            .args(["--interval", &format!("{}us", interval.as_micros())]);
        let out = output(&mut cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{}` ({}) failed ({}): {stdout}{}",
            describe(&cmd),
            self.label,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        RttRun::parse(&stdout).unwrap_or_else(|| panic!("`{}` printed {stdout:?}", describe(&cmd)))
    }

    /// Starts `redis_rtt` in the background.
    pub fn redis_rtt_spawn(&self, count: u32, interval: Duration) -> RttProbe {
        let mut cmd = self.base();
        cmd.args(["redis-rtt", &format!("127.0.0.1:{REDIS_PORT}")])
            .args(["--count", &count.to_string()])
            .args(["--interval", &format!("{}us", interval.as_micros())])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        RttProbe {
            child: Some(child),
            command: describe(&cmd),
        }
    }

    /// SETs `key` to `bytes` bytes.
    pub fn redis_set(&self, key: &str, bytes: usize) {
        self.redis_set_at("127.0.0.1", key, bytes)
    }

    /// `redis_set` on Redis on `host`.
    pub fn redis_set_at(&self, host: &str, key: &str, bytes: usize) {
        let mut cmd = self.base();
        cmd.args(["redis-set", &format!("{host}:{REDIS_PORT}"), key])
            .arg(bytes.to_string());
        let out = output(&mut cmd);
        assert!(
            out.status.success(),
            "`{}` failed ({}): {}{}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// GETs `key` on a fresh connection; returns the bytes received and the seconds from the
    /// request to the value's last byte.
    pub fn redis_get(&self, key: &str) -> (u64, f64) {
        self.redis_get_at("127.0.0.1", key)
    }

    /// `redis_get` from Redis on `host`.
    pub fn redis_get_at(&self, host: &str, key: &str) -> (u64, f64) {
        let mut cmd = self.base();
        cmd.args(["redis-get", &format!("{host}:{REDIS_PORT}"), key]);
        let out = output(&mut cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{}` ({}) failed ({}): {stdout}{}",
            describe(&cmd),
            self.label,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let seconds = stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("seconds=")?.parse().ok())
            .unwrap_or_else(|| panic!("no seconds=F in {stdout:?}"));
        (field(&stdout, "bytes"), seconds)
    }

    /// `timeout 3 redis-cli -h 127.0.0.1 -p 6379 PING`.
    pub fn redis_ping(&self) -> ClientRun {
        self.redis_ping_at("127.0.0.1")
    }

    /// `timeout 3 redis-cli -h HOST -p 6379 PING` (HOST e.g. `::1`, `127.0.0.2`).
    pub fn redis_ping_at(&self, host: &str) -> ClientRun {
        let mut cmd = self.command("timeout");
        cmd.args([
            "3",
            "redis-cli",
            "-h",
            host,
            "-p",
            &REDIS_PORT.to_string(),
            "PING",
        ]);
        ClientRun::run(cmd, "PONG")
    }

    /// `psql -h 127.0.0.1 -p 5432 -U postgres -c 'select 1'` with PGCONNECT_TIMEOUT=2.
    pub fn psql_select_1(&self) -> ClientRun {
        let mut cmd = self.command("timeout");
        cmd.args([
            "5",
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            &POSTGRES_PORT.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-Atc", "select 1"])
        .env("PGCONNECT_TIMEOUT", "2");
        ClientRun::run(cmd, "1")
    }

    /// Starts `tcp-probe`: a fresh connection to `addr` every `interval` with a `timeout`
    /// connect timeout, for `duration`.
    pub fn tcp_probe(
        &self,
        addr: &str,
        interval: Duration,
        timeout: Duration,
        duration: Duration,
    ) -> TcpProbe {
        let mut cmd = self.base();
        cmd.args(["tcp-probe", addr])
            .args(["--interval", &format!("{}us", interval.as_micros())])
            .args(["--timeout", &format!("{}us", timeout.as_micros())])
            .args(["--duration", &format!("{}ms", duration.as_millis())])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        TcpProbe {
            child: Some(child),
            command: describe(&cmd),
            duration,
        }
    }

    /// Starts a UDP receiver on `addr` (port 0: any free port) and waits until it is bound.
    pub fn udp_receiver(&self, addr: &str) -> UdpReceiver {
        let mut cmd = self.base();
        cmd.args(["udp-recv", addr, "--idle", "1s", "--max", "60s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let read = blocking(|| stdout.read_line(&mut line));
        let addr = line.trim().strip_prefix("ready ").map(str::to_owned);
        let Some(addr) = addr else {
            let _ = stop(&mut child, libc::SIGKILL, Duration::from_secs(5));
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!(
                "UDP receiver `{}` did not report ready ({read:?}, {line:?}); stderr: {err}",
                describe(&cmd)
            );
        };
        UdpReceiver {
            child: Some(child),
            stdout,
            addr,
            command: describe(&cmd),
        }
    }

    /// Sends `count` numbered datagrams to `addr` and waits for the sender to finish.
    pub fn udp_blast(&self, addr: &str, count: u64) -> UdpBlast {
        let mut cmd = self.base();
        cmd.args(["udp-blast", addr, &count.to_string()]);
        let out = output(&mut cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{}` failed ({}): {stdout}{}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        UdpBlast {
            sent: field(&stdout, "sent"),
            errors: field(&stdout, "errors"),
            output: stdout,
        }
    }
}

/// A client run to completion: did it give the expected answer?
pub struct ClientRun {
    pub command: String,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    expected: &'static str,
}

impl ClientRun {
    fn run(mut cmd: Command, expected: &'static str) -> ClientRun {
        let out = output(&mut cmd);
        ClientRun {
            command: describe(&cmd),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            expected,
        }
    }

    /// Exited 0 and printed the expected answer (PONG, 1).
    pub fn answered(&self) -> bool {
        self.status.success() && self.stdout.trim() == self.expected
    }

    /// `timeout` killed it (exit 124): it hung, as a client behind a black hole does.
    pub fn timed_out(&self) -> bool {
        self.status.code() == Some(124)
    }
}

impl std::fmt::Display for ClientRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` → {} stdout {:?} stderr {:?}",
            self.command,
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// One PING of `redis-rtt`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ping {
    /// Unix ns when it was sent.
    pub at: i128,
    /// Round trip in ms; None if it failed.
    pub rtt_ms: Option<f64>,
}

/// What `redis-rtt` measured.
#[derive(Clone, Debug)]
pub struct RttRun {
    /// How long connect() took, in ms.
    pub connect_ms: f64,
    pub pings: Vec<Ping>,
}

impl RttRun {
    fn parse(text: &str) -> Option<RttRun> {
        let mut lines = text.lines();
        let connect_ms = lines
            .next()?
            .strip_prefix("connect ")?
            .trim()
            .parse::<f64>()
            .ok()?
            / 1e6;
        let pings = lines
            .map(|line| {
                let mut fields = line.split_whitespace();
                let at = fields.next()?.parse().ok()?;
                let rtt = fields.next()?;
                let rtt_ms = rtt.parse::<f64>().ok().map(|ns| ns / 1e6);
                Some(Ping { at, rtt_ms })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(RttRun { connect_ms, pings })
    }

    /// Round trips of the PINGs that succeeded, in ms, in order.
    pub fn rtts(&self) -> Vec<f64> {
        self.pings.iter().filter_map(|p| p.rtt_ms).collect()
    }

    pub fn failures(&self) -> usize {
        self.pings.iter().filter(|p| p.rtt_ms.is_none()).count()
    }
}

/// A `redis-rtt` running in the background; killed if dropped unfinished.
pub struct RttProbe {
    child: Option<Child>,
    command: String,
}

impl RttProbe {
    pub fn finish(mut self) -> RttRun {
        let child = self.child.take().expect("probe running");
        let out = blocking(|| child.wait_with_output())
            .unwrap_or_else(|e| panic!("waiting for `{}`: {e}", self.command));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{}` failed ({}): {stdout}{}",
            self.command,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        RttRun::parse(&stdout).unwrap_or_else(|| panic!("`{}` printed {stdout:?}", self.command))
    }
}

impl Drop for RttProbe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, libc::SIGKILL, Duration::from_secs(5));
        }
    }
}

/// Order statistics of measurements.
pub mod stats {
    /// The `q`-quantile (0..=1) by nearest rank.
    pub fn quantile(values: &[f64], q: f64) -> f64 {
        assert!(!values.is_empty(), "no measurements");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    pub fn median(values: &[f64]) -> f64 {
        quantile(values, 0.5)
    }

    pub fn mean(values: &[f64]) -> f64 {
        values.iter().sum::<f64>() / values.len() as f64
    }

    /// Sample standard deviation.
    pub fn stddev(values: &[f64]) -> f64 {
        let mean = mean(values);
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
            / (values.len().saturating_sub(1).max(1)) as f64;
        var.sqrt()
    }
}

/// One connection attempt of `tcp-probe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Unix ns, taken just before connect().
    pub at: i128,
    pub ok: bool,
    /// How long connect() took, in ns.
    pub took: i128,
}

impl Attempt {
    /// When connect() returned.
    pub fn end(&self) -> i128 {
        self.at + self.took
    }
}

/// A running `tcp-probe`; killed if dropped unfinished.
pub struct TcpProbe {
    child: Option<Child>,
    command: String,
    duration: Duration,
}

impl TcpProbe {
    /// Waits for the probe to finish and returns its attempts in order.
    pub fn finish(mut self) -> Vec<Attempt> {
        let child = self.child.take().expect("probe running");
        let out = blocking(|| child.wait_with_output())
            .unwrap_or_else(|e| panic!("waiting for `{}`: {e}", self.command));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "`{}` failed ({}): {}",
            self.command,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let attempts: Vec<Attempt> = stdout
            .lines()
            .map(|line| {
                parse_attempt(line).unwrap_or_else(|| {
                    panic!("tcp-probe printed {line:?}, expected `<unix_ns> ok|fail <took_ns>`")
                })
            })
            .collect();
        assert!(
            !attempts.is_empty(),
            "`{}` made no attempt in {:?}",
            self.command,
            self.duration
        );
        attempts
    }
}

fn parse_attempt(line: &str) -> Option<Attempt> {
    let mut fields = line.split_whitespace();
    let at = fields.next()?.parse().ok()?;
    let ok = match fields.next()? {
        "ok" => true,
        "fail" => false,
        _ => return None,
    };
    let took = fields.next()?.parse().ok()?;
    Some(Attempt { at, ok, took })
}

impl Drop for TcpProbe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, libc::SIGKILL, Duration::from_secs(5));
        }
    }
}

/// What the UDP sender reported.
#[derive(Debug)]
pub struct UdpBlast {
    pub sent: u64,
    /// Send calls that returned an error: a user-visible symptom.
    pub errors: u64,
    pub output: String,
}

/// What the UDP receiver counted.
#[derive(Debug)]
pub struct UdpCount {
    pub received: u64,
    pub distinct: u64,
    /// Datagrams the namespace lost to a full socket buffer (not the fault's doing).
    pub rcvbuf_errors: u64,
    /// Datagrams that came after one numbered higher (out of order).
    pub late: u64,
}

pub struct UdpReceiver {
    child: Option<Child>,
    stdout: BufReader<ChildStdout>,
    addr: String,
    command: String,
}

impl UdpReceiver {
    /// The bound address, e.g. `127.0.0.1:41234`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("receiver address has a port")
    }

    /// Waits (up to 70 s) until the receiver has seen 1 s of silence, and returns its counts.
    pub fn finish(mut self) -> UdpCount {
        let mut child = self.child.take().expect("receiver running");
        let status = wait_timeout(&mut child, Duration::from_secs(70));
        let mut rest = String::new();
        let _ = blocking(|| self.stdout.read_to_string(&mut rest));
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "`{}` did not finish cleanly ({status:?}): {rest}{err}",
            self.command
        );
        UdpCount {
            received: field(&rest, "received"),
            distinct: field(&rest, "distinct"),
            rcvbuf_errors: field(&rest, "rcvbuf_errors"),
            late: field(&rest, "late"),
        }
    }
}

impl Drop for UdpReceiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, libc::SIGKILL, Duration::from_secs(5));
        }
    }
}

/// `name=<u64>` from a probe's report.
fn field(report: &str, name: &str) -> u64 {
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}=N in probe report {report:?}"))
}

/// Summaries of probe attempts around an instant.
pub mod timeline {
    use super::Attempt;

    /// The first successful attempt at or after `from`.
    pub fn first_ok_after(attempts: &[Attempt], from: i128) -> Option<Attempt> {
        attempts.iter().copied().find(|a| a.ok && a.at >= from)
    }

    /// Successful connections made wholly before `until` (connect() returned before it). One
    /// that began a few microseconds before and finished after may have sent its SYN after.
    pub fn ok_before(attempts: &[Attempt], until: i128) -> Vec<Attempt> {
        attempts
            .iter()
            .copied()
            .filter(|a| a.ok && a.end() < until)
            .collect()
    }

    /// A short text of the attempts around `instant`, for failure messages.
    pub fn around(attempts: &[Attempt], instant: i128, window_ms: i128) -> String {
        attempts
            .iter()
            .filter(|a| (a.at - instant).abs() <= window_ms * 1_000_000)
            .map(|a| {
                format!(
                    "{:+.1}ms {}",
                    (a.at - instant) as f64 / 1e6,
                    if a.ok { "ok" } else { "fail" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
