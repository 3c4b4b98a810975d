//! fd-probe: runs a client inside a test workload (a cgroup and a network namespace).
//!
//! ```text
//! fd-probe [--cgroup DIR] [--netns NAME] -- CMD ARGS...
//! fd-probe [--cgroup DIR] [--netns NAME] tcp-probe ADDR [--interval 5ms] [--timeout 20ms] [--duration 1s]
//! fd-probe [--cgroup DIR] [--netns NAME] udp-blast ADDR COUNT [--rate PPS]
//! fd-probe [--cgroup DIR] [--netns NAME] udp-recv ADDR [--idle 1s] [--max 30s]
//! fd-probe [--cgroup DIR] [--netns NAME] udp-stream ADDR --round N [--interval 100us] [--duration 5s]
//! fd-probe [--cgroup DIR] [--netns NAME] redis-rtt ADDR [--count 200] [--interval 10ms] [--timeout 10s]
//! fd-probe [--cgroup DIR] [--netns NAME] redis-set ADDR KEY BYTES
//! fd-probe [--cgroup DIR] [--netns NAME] redis-get ADDR KEY [--timeout 30s]
//! ```
//!
//! It joins the cgroup first (its own pid into DIR/cgroup.procs), then the network namespace
//! (setns on /run/netns/NAME, or on NAME if it is a path such as /proc/PID/ns/net) while still
//! single-threaded, so everything it runs or sends after
//! that belongs to the workload. The cgroup comes first because `ip netns exec` style entry
//! hides the cgroup v2 mount. Only std and libc: it must start fast and stay predictable.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufWriter, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("fd-probe: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut cgroup: Option<PathBuf> = None;
    let mut netns: Option<String> = None;
    while let Some(first) = args.first().and_then(|a| a.to_str()) {
        match first {
            "--cgroup" => {
                args.remove(0);
                cgroup = Some(PathBuf::from(take(&mut args, "--cgroup DIR")?));
            }
            "--netns" => {
                args.remove(0);
                netns = Some(
                    take(&mut args, "--netns NAME")?
                        .into_string()
                        .map_err(|_| "--netns: not UTF-8")?,
                );
            }
            _ => break,
        }
    }
    // Cgroup first: once in the namespace we may no longer see the cgroup v2 mount.
    if let Some(dir) = &cgroup {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    if let Some(name) = &netns {
        enter_netns(name)?;
    }
    let mode = args
        .first()
        .and_then(|a| a.to_str())
        .ok_or("missing mode: `-- CMD ARGS...`, tcp-probe, udp-blast or udp-recv")?
        .to_owned();
    args.remove(0);
    if mode == "--" {
        return exec(args);
    }
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<_, _>>()?;
    match mode.as_str() {
        "tcp-probe" => tcp_probe(&args),
        "udp-blast" => udp_blast(&args),
        "udp-recv" => udp_recv(&args),
        "udp-stream" => udp_stream(&args),
        "redis-rtt" => redis_rtt(&args),
        "redis-set" => redis_set(&args),
        "redis-get" => redis_get(&args),
        other => Err(format!("unknown mode {other:?}")),
    }
}

fn take(args: &mut Vec<OsString>, what: &str) -> Result<OsString, String> {
    if args.is_empty() {
        return Err(format!("missing value for {what}"));
    }
    Ok(args.remove(0))
}

/// NAME is `ip netns`' (`/run/netns/NAME`), or a path such as `/proc/PID/ns/net` (a pod's).
fn enter_netns(name: &str) -> Result<(), String> {
    let path = if name.contains('/') {
        name.to_owned()
    } else {
        format!("/run/netns/{name}")
    };
    let file = fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    // SAFETY: setns on a valid, open namespace fd; the process is single-threaded here.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!("setns {path}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn exec(command: Vec<OsString>) -> Result<ExitCode, String> {
    let (program, rest) = command
        .split_first()
        .ok_or("`--` must be followed by a command")?;
    let error = Command::new(program).args(rest).exec();
    Err(format!("exec {program:?}: {error}"))
}

/// Splits positional arguments from `--flag value` options.
fn parse(
    args: &[String],
    positional: usize,
    flags: &[&str],
) -> Result<(Vec<String>, HashMap<String, String>), String> {
    let mut pos = Vec::new();
    let mut opts = HashMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if let Some(flag) = arg.strip_prefix("--") {
            if !flags.contains(&flag) {
                return Err(format!("unknown option --{flag} (known: {flags:?})"));
            }
            let value = it.next().ok_or_else(|| format!("--{flag} needs a value"))?;
            opts.insert(flag.to_owned(), value.clone());
        } else {
            pos.push(arg.clone());
        }
    }
    if pos.len() != positional {
        return Err(format!(
            "expected {positional} positional argument(s), got {pos:?}"
        ));
    }
    Ok((pos, opts))
}

fn duration(
    opts: &HashMap<String, String>,
    name: &str,
    default: Duration,
) -> Result<Duration, String> {
    let Some(text) = opts.get(name) else {
        return Ok(default);
    };
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text.as_str(), 1.0)
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("--{name} {text}: not a duration"))?;
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("--{name} {text}: not a duration"))
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Raises our priority so that on a busy machine the measurement is about the network, not
/// about when the probe got a CPU: the lowest real-time priority (the probe sleeps between its
/// few packets), else nice -10. Best effort: a failure is reported, not fatal.
fn raise_priority() {
    if let Err(e) = faultd_tests::sys::prioritize(0) {
        eprintln!("fd-probe: setpriority: {e} (continuing at normal priority)");
    }
}

/// A fresh TCP connection every interval with a short connect timeout; one line per attempt:
/// `<unix_time_ns> ok|fail <took_ns>`: the time just before connect(), and how long it took
/// (so a connection that straddles an instant can be told from one made wholly before it).
fn tcp_probe(args: &[String]) -> Result<ExitCode, String> {
    let (pos, opts) = parse(args, 1, &["interval", "timeout", "duration"])?;
    let addr = resolve(&pos[0])?;
    let interval = duration(&opts, "interval", Duration::from_millis(5))?;
    let timeout = duration(&opts, "timeout", Duration::from_millis(20))?;
    let total = duration(&opts, "duration", Duration::from_secs(1))?;
    raise_priority();
    let mut lines =
        Vec::with_capacity((total.as_micros() / interval.as_micros().max(1)) as usize + 16);
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < total {
        let at = unix_ns();
        let began = Instant::now();
        let ok = TcpStream::connect_timeout(&addr, timeout).is_ok();
        lines.push((at, ok, began.elapsed().as_nanos()));
        next += interval;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    let mut out = BufWriter::new(io::stdout().lock());
    for (at, ok, took) in lines {
        writeln!(out, "{at} {} {took}", if ok { "ok" } else { "fail" })
            .map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

const DATAGRAM: usize = 64;

/// Sends COUNT numbered datagrams, paced at --rate per second (default 20000).
/// Prints `sent=N errors=N` and the first error if any.
fn udp_blast(args: &[String]) -> Result<ExitCode, String> {
    let (pos, opts) = parse(args, 2, &["rate"])?;
    let addr = resolve(&pos[0])?;
    let count: u64 = pos[1]
        .parse()
        .map_err(|_| format!("COUNT {:?} is not a number", pos[1]))?;
    let rate: f64 = match opts.get("rate") {
        Some(r) => r
            .parse()
            .map_err(|_| format!("--rate {r:?} is not a number"))?,
        None => 20_000.0,
    };
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    let mut payload = [0u8; DATAGRAM];
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let start = Instant::now();
    for seq in 0..count {
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        if let Err(e) = socket.send_to(&payload, addr) {
            errors += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
        if seq % 32 == 31 {
            let due = Duration::from_secs_f64((seq + 1) as f64 / rate);
            let elapsed = start.elapsed();
            if due > elapsed {
                thread::sleep(due - elapsed);
            }
        }
    }
    println!(
        "sent={count} errors={errors} seconds={:.3}",
        start.elapsed().as_secs_f64()
    );
    if let Some(e) = first_error {
        println!("first_error={e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends one datagram every --interval for --duration, each carrying the round number, its
/// sequence number and the wall-clock time it was sent (`round u32, seq u32, unix_ns u64`,
/// little endian), so a receiver can tell when a fault began and ceased to drop them.
/// Send errors (an `iptables -j DROP` in OUTPUT fails the send) are counted, not fatal.
fn udp_stream(args: &[String]) -> Result<ExitCode, String> {
    let (pos, opts) = parse(args, 1, &["round", "interval", "duration"])?;
    let addr = resolve(&pos[0])?;
    let round: u32 = opts
        .get("round")
        .ok_or("--round N is required")?
        .parse()
        .map_err(|_| "--round: not a number".to_owned())?;
    let interval = duration(&opts, "interval", Duration::from_micros(100))?;
    let length = duration(&opts, "duration", Duration::from_secs(5))?;
    raise_priority();
    // Sleeps of ~100 us are only that short with a small timer slack (default 50 us).
    // SAFETY: prctl with integer arguments on our own thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000, 0, 0, 0) };
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    let mut payload = [0u8; 16];
    payload[..4].copy_from_slice(&round.to_le_bytes());
    let start = Instant::now();
    let mut errors = 0u64;
    let mut seq: u32 = 0;
    while start.elapsed() < length {
        payload[4..8].copy_from_slice(&seq.to_le_bytes());
        payload[8..16].copy_from_slice(&(unix_ns() as u64).to_le_bytes());
        if socket.send_to(&payload, addr).is_err() {
            errors += 1;
        }
        seq = seq.wrapping_add(1);
        let due = interval * seq;
        let elapsed = start.elapsed();
        if due > elapsed {
            thread::sleep(due - elapsed);
        }
    }
    println!("sent={seq} errors={errors}");
    Ok(ExitCode::SUCCESS)
}

/// Receives numbered datagrams until --idle passes without one (after the first) or --max
/// passes. Prints `ready <addr>` once bound, then `received=N distinct=N rcvbuf_errors=N
/// late=N` (late: datagrams numbered below one received before them, i.e. out of order).
fn udp_recv(args: &[String]) -> Result<ExitCode, String> {
    let (pos, opts) = parse(args, 1, &["idle", "max"])?;
    let addr = resolve(&pos[0])?;
    let idle = duration(&opts, "idle", Duration::from_secs(1))?;
    let max = duration(&opts, "max", Duration::from_secs(30))?;
    let socket = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    // A large buffer so that a receiver descheduled for a while loses nothing: every missing
    // datagram must be the fault's doing. The overflow counter below proves it.
    faultd_tests::sys::force_receive_buffer(&socket, 64 << 20)
        .map_err(|e| format!("SO_RCVBUFFORCE: {e}"))?;
    let errors_before = rcvbuf_errors()?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    println!("ready {local}");
    io::stdout().flush().map_err(|e| e.to_string())?;

    let start = Instant::now();
    let mut seen: Vec<bool> = Vec::new();
    let mut received = 0u64;
    let mut distinct = 0u64;
    let mut late = 0u64;
    let mut highest: Option<usize> = None;
    let mut buf = [0u8; 2048];
    loop {
        let wait = if received == 0 {
            max.saturating_sub(start.elapsed())
        } else {
            idle
        };
        if wait.is_zero() {
            break;
        }
        socket
            .set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        match socket.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                received += 1;
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
                if highest.is_some_and(|h| seq < h) {
                    late += 1;
                }
                highest = highest.max(Some(seq));
                if seq < (1 << 24) {
                    if seq >= seen.len() {
                        seen.resize(seq + 1, false);
                    }
                    if !seen[seq] {
                        seen[seq] = true;
                        distinct += 1;
                    }
                }
            }
            Ok(_) => received += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("recv: {e}")),
        }
        if start.elapsed() >= max {
            break;
        }
    }
    let overflow = rcvbuf_errors()?.saturating_sub(errors_before);
    println!("received={received} distinct={distinct} rcvbuf_errors={overflow} late={late}");
    Ok(ExitCode::SUCCESS)
}

/// The namespace's UDP `RcvbufErrors` counter (datagrams lost because a socket buffer was full).
fn rcvbuf_errors() -> Result<u64, String> {
    let snmp = fs::read_to_string("/proc/self/net/snmp")
        .map_err(|e| format!("/proc/self/net/snmp: {e}"))?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return Err("/proc/self/net/snmp has no Udp lines".into());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .ok_or_else(|| "/proc/self/net/snmp: no Udp RcvbufErrors".into())
}

/// Reads until `buf` ends with `suffix`; returns everything read.
fn read_until(stream: &mut TcpStream, suffix: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    let mut chunk = [0u8; 64 * 1024];
    while !buf.ends_with(suffix) {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "Redis closed the connection",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn redis_connect(addr: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addr = resolve(addr)?;
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// PINGs Redis over one connection, timing each round trip itself. First `connect <ns>` (how
/// long connect() took), then one line per PING: `<unix_ns when sent> <rtt_ns>`, or
/// `<unix_ns> fail <error>` (then it reconnects).
fn redis_rtt(args: &[String]) -> Result<ExitCode, String> {
    let (pos, opts) = parse(args, 1, &["count", "interval", "timeout"])?;
    let count: u64 = match opts.get("count") {
        Some(c) => c
            .parse()
            .map_err(|_| format!("--count {c:?} is not a number"))?,
        None => 200,
    };
    let interval = duration(&opts, "interval", Duration::from_millis(10))?;
    let timeout = duration(&opts, "timeout", Duration::from_secs(10))?;
    raise_priority();
    let began = Instant::now();
    let mut stream = redis_connect(&pos[0], timeout)?;
    let mut lines = Vec::with_capacity(count as usize + 1);
    lines.push(format!("connect {}", began.elapsed().as_nanos()));
    let mut buf = Vec::new();
    for _ in 0..count {
        let at = unix_ns();
        let began = Instant::now();
        let answer = stream
            .write_all(b"PING\r\n")
            .and_then(|()| read_until(&mut stream, b"\r\n", &mut buf));
        match answer {
            Ok(()) if buf == b"+PONG\r\n" => {
                lines.push(format!("{at} {}", began.elapsed().as_nanos()));
            }
            Ok(()) => {
                return Err(format!(
                    "Redis answered {:?} to PING",
                    String::from_utf8_lossy(&buf)
                ));
            }
            Err(e) => {
                lines.push(format!("{at} fail {e}"));
                stream = redis_connect(&pos[0], timeout)?;
            }
        }
        thread::sleep(interval);
    }
    let mut out = BufWriter::new(io::stdout().lock());
    for line in lines {
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// SET KEY to BYTES bytes. Prints `ok`.
fn redis_set(args: &[String]) -> Result<ExitCode, String> {
    let (pos, _) = parse(args, 3, &[])?;
    let size: usize = pos[2]
        .parse()
        .map_err(|_| format!("BYTES {:?} is not a number", pos[2]))?;
    let mut stream = redis_connect(&pos[0], Duration::from_secs(10))?;
    let key = &pos[1];
    let mut request =
        format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${size}\r\n", key.len()).into_bytes();
    request.extend(std::iter::repeat_n(b'x', size));
    request.extend_from_slice(b"\r\n");
    stream
        .write_all(&request)
        .map_err(|e| format!("SET: {e}"))?;
    let mut buf = Vec::new();
    read_until(&mut stream, b"\r\n", &mut buf).map_err(|e| format!("SET: {e}"))?;
    if buf != b"+OK\r\n" {
        return Err(format!(
            "Redis answered {:?} to SET",
            String::from_utf8_lossy(&buf)
        ));
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

/// GETs KEY on a fresh connection, timing from the request to the last byte of the value.
/// Prints `bytes=N seconds=F`.
fn redis_get(args: &[String]) -> Result<ExitCode, String> {
    let (pos, opts) = parse(args, 2, &["timeout"])?;
    let timeout = duration(&opts, "timeout", Duration::from_secs(30))?;
    raise_priority();
    let mut stream = redis_connect(&pos[0], timeout)?;
    let key = &pos[1];
    let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    let began = Instant::now();
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("GET: {e}"))?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    // `$<len>\r\n<value>\r\n`
    let total = loop {
        if let Some(end) = received.windows(2).position(|w| w == b"\r\n") {
            let header = String::from_utf8_lossy(&received[..end]).into_owned();
            let len: usize = header
                .strip_prefix('$')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("Redis answered {header:?} to GET"))?;
            break end + 2 + len + 2;
        }
        let n = stream.read(&mut chunk).map_err(|e| format!("GET: {e}"))?;
        if n == 0 {
            return Err("Redis closed the connection during GET".into());
        }
        received.extend_from_slice(&chunk[..n]);
    };
    while received.len() < total {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("GET after {} of {total} bytes: {e}", received.len()))?;
        if n == 0 {
            return Err("Redis closed the connection during GET".into());
        }
        received.extend_from_slice(&chunk[..n]);
    }
    println!(
        "bytes={} seconds={:.6}",
        received.len(),
        began.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
