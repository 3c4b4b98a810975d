//! The guest's own clients and servers: the rtt and upload clients it starts in a cgroup, the
//! echo and sink servers, and the statistics of what the clients measured.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// Moves this process into the cgroup directory `cgroup`, so that the sockets it opens next
/// belong to it.
pub(crate) fn join_cgroup(cgroup: &str) -> anyhow::Result<()> {
    std::fs::write(
        Path::new(cgroup).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .with_context(|| format!("joining {cgroup}"))
}

/// Round trips of one byte over one connection: `rtt CGROUP_DIR PORT COUNT [PAUSE_MS [HOST]]`
/// (HOST 127.0.0.1 by default), microseconds on stdout, one per line. Joins the cgroup before
/// its socket exists, so the socket belongs to it.
pub(crate) fn rtt_client(args: &[String]) -> anyhow::Result<()> {
    let [cgroup, port, count, rest @ ..] = args else {
        bail!("usage: rtt CGROUP_DIR PORT COUNT [PAUSE_MS [HOST]]");
    };
    let host = rest.get(1).map_or("127.0.0.1", String::as_str);
    join_cgroup(cgroup)?;
    let port: u16 = port.parse()?;
    let count: usize = count.parse()?;
    let pause = Duration::from_millis(rest.first().map_or(Ok(0), |p| p.parse())?);
    let mut stream = TcpStream::connect((host, port))?;
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

/// Uploads BYTES to the sink server: `upload CGROUP_DIR PORT BYTES`; prints the microseconds
/// until the server confirmed it received them all.
pub(crate) fn upload_client(args: &[String]) -> anyhow::Result<()> {
    let [cgroup, port, bytes] = args else {
        bail!("usage: upload CGROUP_DIR PORT BYTES");
    };
    join_cgroup(cgroup)?;
    let port: u16 = port.parse()?;
    let bytes: usize = bytes.parse()?;
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let chunk = vec![0x5au8; 16 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        stream.write_all(&chunk[..n])?;
        sent += n;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut total = [0u8; 8];
    stream.read_exact(&mut total)?;
    ensure!(
        u64::from_be_bytes(total) == bytes as u64,
        "the server counted {} bytes",
        u64::from_be_bytes(total)
    );
    println!("{}", start.elapsed().as_micros());
    Ok(())
}

/// An echo server on `host`:`port`, one thread per connection, for the life of the guest.
pub(crate) fn echo_server(host: &str, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind((host, port))?;
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
pub(crate) fn sink_server(port: u16) -> anyhow::Result<()> {
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
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) mean: f64,
    pub(crate) sd: f64,
    /// The spread estimated from the interquartile range (IQR / 1.349, σ for a normal
    /// distribution): robust to the emulator's occasional long stalls, which inflate `sd`.
    pub(crate) iqr_sigma: f64,
    pub(crate) n: usize,
}

impl Stats {
    pub(crate) fn of(micros: &[u64]) -> anyhow::Result<Stats> {
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
            iqr_sigma: (rank(0.75) - rank(0.25)) / 1.349,
            n,
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.2} ms, p99 {:.2} ms, mean {:.2} ms, sd {:.2} ms, IQR/1.349 {:.2} ms (n={})",
            self.median, self.p99, self.mean, self.sd, self.iqr_sigma, self.n
        )
    }
}

/// Runs the rtt client in `cgroup` and returns its round trips to `host`.
pub(crate) fn measure_to(
    cgroup: &Path,
    host: &str,
    port: u16,
    count: usize,
    pause_ms: u64,
) -> anyhow::Result<Vec<u64>> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg("rtt")
        .arg(cgroup)
        .args([port.to_string(), count.to_string(), pause_ms.to_string()])
        .arg(host)
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

/// Runs the rtt client in `cgroup` and returns its round trips to 127.0.0.1.
pub(crate) fn measure(
    cgroup: &Path,
    port: u16,
    count: usize,
    pause_ms: u64,
) -> anyhow::Result<Vec<u64>> {
    measure_to(cgroup, "127.0.0.1", port, count, pause_ms)
}
