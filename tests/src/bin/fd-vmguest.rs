//! The test program of the kernel matrix (`cargo xtask vm-test`): runs as the guest's only
//! workload, next to a TCP echo server of its own, and exits with the number of failed tests.
//!
//! `fd-vmguest [TEST...]` runs the tests (all by default); `fd-vmguest rtt ...` is the client
//! it starts in a cgroup to measure round trips.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("rtt") {
        if let Err(e) = rtt_client(&args[1..]) {
            eprintln!("rtt: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    let failed = guest::run(&args);
    std::process::exit(failed.min(100) as i32);
}

/// Round trips of one byte over one connection: `rtt CGROUP_DIR PORT COUNT [PAUSE_MS]`,
/// microseconds on stdout, one per line. Joins the cgroup before its socket exists, so the
/// socket belongs to it.
fn rtt_client(args: &[String]) -> anyhow::Result<()> {
    let [cgroup, port, count, rest @ ..] = args else {
        bail!("usage: rtt CGROUP_DIR PORT COUNT [PAUSE_MS]");
    };
    std::fs::write(Path::new(cgroup).join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining {cgroup}"))?;
    let port: u16 = port.parse()?;
    let count: usize = count.parse()?;
    let pause = Duration::from_millis(rest.first().map_or(Ok(0), |p| p.parse())?);
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = String::new();
    let mut byte = [0u8; 1];
    for i in 0..count {
        let start = Instant::now();
        stream.write_all(&[i as u8])?;
        stream.read_exact(&mut byte)?;
        out.push_str(&format!("{}\n", start.elapsed().as_micros()));
        std::thread::sleep(pause);
    }
    stream.shutdown(Shutdown::Both)?;
    print!("{out}");
    Ok(())
}

/// An echo server on 127.0.0.1:`port`, one thread per connection, for the life of the guest.
fn echo_server(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _nodelay = stream.set_nodelay(true);
                let mut buf = [0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

/// A sink server: reads everything and answers with the byte count once the peer shuts down
/// its side (for bandwidth: the client times its upload).
fn sink_server(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let mut total = 0u64;
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _answer = stream.write_all(&total.to_be_bytes());
            });
        }
    });
    Ok(())
}

/// Sample statistics in milliseconds.
#[derive(Clone, Copy, Debug)]
struct Stats {
    median: f64,
    p99: f64,
    mean: f64,
    sd: f64,
    n: usize,
}

impl Stats {
    fn of(micros: &[u64]) -> anyhow::Result<Stats> {
        ensure!(!micros.is_empty(), "no samples");
        let mut ms: Vec<f64> = micros.iter().map(|&u| u as f64 / 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let mean = ms.iter().sum::<f64>() / n as f64;
        let var = ms.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let rank = |q: f64| ms[((q * (n - 1) as f64).round() as usize).min(n - 1)];
        Ok(Stats {
            median: rank(0.5),
            p99: rank(0.99),
            mean,
            sd: var.sqrt(),
            n,
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.2} ms, p99 {:.2} ms, mean {:.2} ms, sd {:.2} ms (n={})",
            self.median, self.p99, self.mean, self.sd, self.n
        )
    }
}

/// Runs the rtt client in `cgroup` and returns its round trips.
fn measure(cgroup: &Path, port: u16, count: usize, pause_ms: u64) -> anyhow::Result<Vec<u64>> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg("rtt")
        .arg(cgroup)
        .args([port.to_string(), count.to_string(), pause_ms.to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "rtt client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse::<u64>().context("rtt output"))
        .collect()
}

fn cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}

mod guest {
    //! The tests and their runner.

    use std::os::unix::fs::MetadataExt;

    use faultd::dataplane::shape::{ShapeMechanism, ShapeSpec, Shaper};
    use faultd_common::{DIR_EGRESS, PROTO_TCP, RuleKey};

    use super::*;

    const ECHO_PORT: u16 = 7000;

    type Test = fn() -> anyhow::Result<()>;

    const TESTS: &[(&str, Test)] = &[
        ("shaper-netem", shaper_netem),
        ("shaper-edt", shaper_edt),
    ];

    pub fn run(filter: &[String]) -> usize {
        if let Err(e) = echo_server(ECHO_PORT).and_then(|()| sink_server(ECHO_PORT + 1)) {
            println!("guest: starting the servers: {e:#}");
            return 1;
        }
        let mut failed = 0;
        for (name, test) in TESTS {
            if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                continue;
            }
            let started = Instant::now();
            println!("guest: test {name} ...");
            match test() {
                Ok(()) => println!("guest: test {name} ok ({:.1} s)", started.elapsed().as_secs_f64()),
                Err(e) => {
                    failed += 1;
                    println!("guest: test {name} FAILED: {e:#}");
                }
            }
        }
        failed
    }

    /// A cgroup under the root, removed on drop.
    struct TestCgroup(PathBuf);

    impl TestCgroup {
        fn new(name: &str) -> anyhow::Result<Self> {
            let path = cgroup_root().join(name);
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }
        fn id(&self) -> anyhow::Result<u64> {
            Ok(std::fs::metadata(&self.0)?.ino())
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            if let Err(e) = std::fs::remove_dir(&self.0) {
                println!("guest: removing {}: {e}", self.0.display());
            }
        }
    }

    fn shaper_delay(mechanism: ShapeMechanism) -> anyhow::Result<()> {
        let cgroup = TestCgroup::new(&format!("shaper-{}", mechanism.name()))?;
        let keys = vec![RuleKey::new(cgroup.id()?, PROTO_TCP, DIR_EGRESS, ECHO_PORT)];
        let baseline = Stats::of(&measure(&cgroup.0, ECHO_PORT, 20, 0)?)?;
        let mut shaper = Shaper::load(faultd::EBPF_OBJECT)?;
        let spec = ShapeSpec {
            latency: Duration::from_millis(100),
            jitter: Duration::ZERO,
            correlation: 0.0,
            rate_bytes_per_sec: 0,
            burst_bytes: 0,
        };
        let deadline = faultd::engine::monotonic_now_ns() + 60_000_000_000;
        shaper.apply(0, mechanism, spec, &keys, deadline)?;
        println!("guest:   shaping {:?}", shaper.interfaces());
        let qdiscs = Command::new("/usr/sbin/tc").args(["qdisc", "show", "dev", "lo"]).output()?;
        print!("{}", String::from_utf8_lossy(&qdiscs.stdout));
        let delayed = Stats::of(&measure(&cgroup.0, ECHO_PORT, 20, 0)?)?;
        let outside = Stats::of(&measure(&cgroup_root(), ECHO_PORT, 20, 0)?)?;
        let counters = shaper.counters(0)?;
        shaper.remove(0)?;
        drop(shaper);
        let after = Stats::of(&measure(&cgroup.0, ECHO_PORT, 20, 0)?)?;
        println!("guest:   baseline {baseline}\nguest:   delayed  {delayed}\nguest:   outside  {outside}\nguest:   after    {after}\nguest:   counters {counters:?}");
        let added = delayed.median - baseline.median;
        ensure!((added - 100.0).abs() < 15.0, "added {added:.2} ms, not 100 ms");
        ensure!(outside.median < baseline.median + 10.0, "outside traffic delayed");
        ensure!(after.median < baseline.median + 10.0, "delay outlived its removal");
        Ok(())
    }

    fn shaper_netem() -> anyhow::Result<()> {
        shaper_delay(ShapeMechanism::Netem)
    }

    fn shaper_edt() -> anyhow::Result<()> {
        shaper_delay(ShapeMechanism::Edt)
    }
}
