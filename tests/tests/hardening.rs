//! What a local user without privileges can do to faultd, and how faultd protects itself: the
//! metrics port cannot starve the API of descriptors, and idle or slow HTTP connections go.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultd_proto::v1::{Direction, Mechanism, Protocol};
use faultd_tests::api::{cgroup_target, delay_fault, drop_fault, remove, with_ttl};
use faultd_tests::process::{Stopped, blocking, stop, unix_ns, wait_timeout};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::stats::{median, quantile};
use faultd_tests::{Cgroup, Faultctl, Faultd, FaultdOptions, RedisScene, fd_probe};

/// Tests that measure time or load the machine run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The uid and gid of `nobody` on Debian.
const NOBODY: u32 = 65534;
/// What a gRPC call may take while the metrics port is flooded.
const API_BOUND: Duration = Duration::from_secs(2);
/// faultd's header timeout (agent/src/http.rs HEADER_TIMEOUT) plus scheduling slack.
const IDLE_CLOSED_WITHIN: Duration = Duration::from_secs(12);

/// Opens `count` TCP connections to `addr` as `nobody`, says how many opened, then reports
/// how many faultd closed (EOF or reset) and when, as `open N` and `closed K of N after S s`.
const HOLDER: &str = r#"
import select, socket, sys, time
host, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conns = []
for _ in range(count):
    s = socket.socket()
    s.connect((host, port))
    conns.append(s)
print("open", len(conns), flush=True)
started = time.monotonic()
open_ = set(conns)
last = 0.0
while open_ and time.monotonic() - started < wait:
    ready, _, _ = select.select(list(open_), [], [], 0.5)
    for s in ready:
        try:
            data = s.recv(1)
        except OSError:
            data = b""
        if not data:
            open_.discard(s)
            last = time.monotonic() - started
print("closed", len(conns) - len(open_), "of", len(conns), "after", round(last, 2), flush=True)
"#;

/// Runs HOLDER as `nobody`: `count` connections to `host:port`, watched for `wait` seconds.
/// Returns the process and its report lines.
fn hold_as_nobody(
    host: &str,
    port: &str,
    count: usize,
    wait: u64,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut holder = Command::new("python3");
    holder
        .args([
            "-c",
            HOLDER,
            host,
            port,
            &count.to_string(),
            &wait.to_string(),
        ])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec only setgroups/setgid/setuid run (async-signal-safe).
    unsafe {
        holder.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut holder = holder.spawn().expect("python3 runs as nobody");
    let lines = BufReader::new(holder.stdout.take().expect("piped")).lines();
    (holder, lines)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn idle_metrics_connections_of_a_user_neither_starve_the_api_nor_stay() {
    let _serial = SERIAL.lock().await;
    let cgroup = Cgroup::new();
    let faultd = Faultd::start_with(FaultdOptions {
        nofile: Some((256, 256)),
        ..FaultdOptions::with_metrics()
    })
    .await;
    let metrics = faultd.metrics_addr();
    let (host, port) = metrics.rsplit_once(':').expect("HOST:PORT");

    let (mut holder, mut lines) = hold_as_nobody(host, port, 400, 30);
    let opened = blocking(|| lines.next())
        .expect("the holder reports")
        .expect("readable");
    let opened_at = Instant::now();
    assert_eq!(opened, "open 400", "nobody opened its connections");
    let fds = open_fds(faultd.pid());

    // A probe still gets in: it closes the oldest idle connection, not the other way round.
    let (status, _) = faultd_tests::http::get(&metrics, "/healthz");
    assert_eq!(status, 200, "/healthz during the flood");

    // The API answers at once: faultctl list, an Inject and a Remove.
    let cli = Faultctl::new(&faultd);
    let started = Instant::now();
    let mut list = cli.command();
    list.arg("list")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut list = list.spawn().expect("faultctl runs");
    let status = blocking(|| wait_timeout(&mut list, Duration::from_secs(10)));
    let listed = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "faultctl list failed or hung ({status:?}) with 400 idle metrics connections; faultd holds \
         {fds} descriptors; its log:\n{}",
        faultd.log()
    );
    let mut faults = faultd.faults();
    let started = Instant::now();
    let injected = tokio::time::timeout(
        Duration::from_secs(10),
        faults.inject(with_ttl(
            drop_fault(
                100.0,
                cgroup_target(&cgroup, &[6379], Protocol::Tcp, Direction::Egress),
            ),
            Duration::from_secs(60),
        )),
    )
    .await
    .expect("Inject answers")
    .expect("Inject succeeds")
    .into_inner();
    let inject_took = started.elapsed();
    remove(&mut faults, &injected.id).await;
    eprintln!(
        "with 400 idle metrics connections (faultd at {fds} of 256 descriptors): faultctl list \
         {listed:?}, Inject {inject_took:?}"
    );
    assert!(listed < API_BOUND, "faultctl list took {listed:?}");
    assert!(inject_took < API_BOUND, "Inject took {inject_took:?}");
    assert!(
        fds < 256 - 32,
        "faultd kept no descriptors in reserve: {fds} of 256 open"
    );

    // Every idle connection is closed by faultd: the oldest as newer ones come beyond the cap,
    // the rest after the header timeout.
    let closed = blocking(|| lines.next())
        .expect("the holder reports")
        .expect("readable");
    let waited = opened_at.elapsed();
    let _exited = blocking(|| wait_timeout(&mut holder, Duration::from_secs(5)));
    eprintln!("{closed} ({waited:?} after they opened)");
    assert!(
        closed.starts_with("closed 400 of 400"),
        "faultd left idle connections open: {closed}"
    );
    let after: f64 = closed
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seconds");
    assert!(
        Duration::from_secs_f64(after) < IDLE_CLOSED_WITHIN,
        "the last idle connection went after {after} s"
    );

    // And the endpoint serves again.
    let (status, _) = faultd_tests::http::get(&metrics, "/healthz");
    assert_eq!(status, 200, "/healthz after the flood");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn idle_connections_to_the_mtls_port_neither_starve_the_api_nor_stay() {
    let _serial = SERIAL.lock().await;
    let pki = faultd_tests::pki::Pki::new();
    let faultd = Faultd::start_with(FaultdOptions {
        extra_args: pki.listener_args(),
        nofile: Some((256, 256)),
        ..Default::default()
    })
    .await;
    let listen = faultd
        .logged("listen")
        .unwrap_or_else(|| panic!("faultd logged no TCP listener:\n{}", faultd.log()));
    let (host, port) = listen
        .trim_start_matches("tcp://")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .expect("HOST:PORT");

    // Nobody can reach the port: connections that never start TLS.
    let (mut holder, mut lines) = hold_as_nobody(&host, &port, 400, 20);
    let opened = blocking(|| lines.next())
        .expect("the holder could not open its connections (does faultd still accept?)")
        .expect("readable");
    let opened_at = Instant::now();
    assert_eq!(opened, "open 400", "nobody opened its connections");
    let fds = open_fds(faultd.pid());

    let cli = Faultctl::new(&faultd);
    let started = Instant::now();
    let mut list = cli.command();
    list.arg("list")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut list = list.spawn().expect("faultctl runs");
    let status = blocking(|| wait_timeout(&mut list, Duration::from_secs(10)));
    let listed = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "faultctl list on the unix socket failed or hung ({status:?}) with 400 idle TCP \
         connections; faultd holds {fds} descriptors; its log:\n{}",
        faultd.log()
    );
    assert!(listed < API_BOUND, "faultctl list took {listed:?}");
    assert!(
        fds < 256 - 32,
        "faultd kept no descriptors in reserve: {fds} of 256 open"
    );

    // Beyond the cap they are closed at once, the others after the handshake timeout (5 s).
    let closed = blocking(|| lines.next())
        .expect("the holder reports")
        .expect("readable");
    let _exited = blocking(|| wait_timeout(&mut holder, Duration::from_secs(5)));
    eprintln!(
        "{closed} ({:?} after they opened; faultd at {fds} of 256 descriptors, list {listed:?})",
        opened_at.elapsed()
    );
    assert!(
        closed.starts_with("closed 400 of 400"),
        "faultd left idle TCP connections open: {closed}"
    );
    let after: f64 = closed
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seconds");
    assert!(after < 8.0, "the last idle connection went after {after} s");

    // And a client with a certificate gets in over TCP again.
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let run = cli.run(&[
        "--server",
        &listen,
        "--tls-ca",
        &path(&pki.ca),
        "--tls-cert",
        &path(&pki.client_cert),
        "--tls-key",
        &path(&pki.client_key),
        "list",
    ]);
    run.assert_success();
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn under_umask_000_the_socket_and_the_state_stay_private_and_descriptors_are_raised() {
    let faultd = Faultd::start_with(FaultdOptions {
        umask: Some(0o000),
        nofile: Some((512, 1024)),
        ..Default::default()
    })
    .await;
    let mut wrong = Vec::new();
    let socket = faultd.socket();
    if mode(socket) != 0o660 {
        wrong.push(format!("socket {} is {:o}", socket.display(), mode(socket)));
    }
    let state = faultd.state_dir();
    if mode(state) != 0o700 {
        wrong.push(format!(
            "state directory {} is {:o}",
            state.display(),
            mode(state)
        ));
    }
    for entry in std::fs::read_dir(state).expect("state directory") {
        let path = entry.expect("entry").path();
        if mode(&path) != 0o600 {
            wrong.push(format!("{} is {:o}", path.display(), mode(&path)));
        }
    }
    let parent = socket.parent().expect("the socket has a directory");
    for entry in std::fs::read_dir(parent).expect("socket directory") {
        let name = entry.expect("entry").file_name();
        if name.to_string_lossy().starts_with(".faultd-bind-") {
            wrong.push(format!("left behind: {name:?}"));
        }
    }
    // And it took every descriptor it may have: its soft limit is raised to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", faultd.pid())).expect("limits");
    let nofile: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .map(|line| line.split_whitespace().skip(3).take(2).collect())
        .unwrap_or_default();
    if nofile != ["1024", "1024"] {
        wrong.push(format!(
            "RLIMIT_NOFILE soft and hard: {nofile:?}, want the soft one raised to 1024"
        ));
    }
    assert!(
        wrong.is_empty(),
        "under umask 000:\n  {}",
        wrong.join("\n  ")
    );
}

/// Runs faultd with `args` in `dir` (socket `dir/faultd.sock`) until it exits (30 s at most);
/// returns whether it failed, and its log.
fn failed_start(
    dir: &faultd_tests::TempDir,
    state: &std::path::Path,
    args: &[&str],
) -> (bool, String) {
    let log = dir.join("faultd.log");
    let mut child = Command::new(faultd_tests::faultd::binary("FAULTD_BIN", "faultd"))
        .arg("--socket")
        .arg(dir.join("faultd.sock"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("faultd starts");
    let status = blocking(|| wait_timeout(&mut child, Duration::from_secs(30)));
    if status.is_none() {
        stop(&mut child, libc::SIGKILL, Duration::from_secs(5));
    }
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    (status.is_some_and(|s| !s.success()), output)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_start_that_fails_exits_non_zero_and_leaves_no_socket() {
    faultd_tests::require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = taken.local_addr().expect("bound").port();
    let dir = faultd_tests::TempDir::new("faultd-test-failed-start");
    let metrics = format!("127.0.0.1:{port}");
    let (failed, output) = failed_start(&dir, &dir.join("state"), &["--metrics-addr", &metrics]);
    assert!(
        failed,
        "faultd with a taken --metrics-addr did not fail; its log:\n{output}"
    );
    assert!(
        output.contains("--metrics-addr"),
        "the error names the flag:\n{output}"
    );
    let socket = dir.join("faultd.sock");
    assert!(
        !socket.exists(),
        "the failed start left its socket {}",
        socket.display()
    );
    drop(taken);

    // A shared directory (sticky, like /tmp) is never made faultd's private state.
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let (failed, output) = failed_start(&dir, &shared, &[]);
    assert!(
        failed,
        "faultd took a sticky directory as its state; its log:\n{output}"
    );
    assert!(
        output.contains("--state-dir"),
        "the error says what to do:\n{output}"
    );
    assert_eq!(mode(&shared), 0o1777, "the shared directory kept its mode");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and network namespaces; `cargo xtask test` runs it as root"]
async fn a_stopped_faultd_turns_an_nfqueue_delay_into_no_delay_not_an_outage() {
    let _serial = SERIAL.lock().await;
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    // The cgroup has a process in its namespace when the fault is injected (README: NFQUEUE
    // applies the fault in the namespaces of the cgroup's processes).
    let _app = inside.resident();
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Egress);
    let fault = faultd
        .faults()
        .inject(with_ttl(
            delay_fault(
                Duration::from_millis(10),
                Duration::ZERO,
                0.0,
                Mechanism::Nfqueue,
                target,
            ),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a 10 ms delay failed: {s:?}\n{}", faultd.log()))
        .into_inner();
    assert_eq!(fault.mechanism, "nfqueue");

    let probe = inside.redis_rtt_spawn(400, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = unix_ns();
    let frozen = Stopped::stop(faultd.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed = unix_ns();
    drop(frozen);
    let run = probe.finish();

    let rtts = |from: i128, to: i128| -> Vec<f64> {
        run.pings
            .iter()
            .filter(|p| p.at >= from && p.at < to)
            .filter_map(|p| p.rtt_ms)
            .collect()
    };
    let before = rtts(0, stopped);
    let during = rtts(stopped, resumed);
    // From 100 ms after SIGCONT: faultd is back at work.
    let after = rtts(resumed + 100_000_000, i128::MAX);
    let show = |v: &[f64]| {
        if v.is_empty() {
            return "none".to_string();
        }
        format!(
            "n={} median={:.2}ms max={:.2}ms",
            v.len(),
            median(v),
            quantile(v, 1.0)
        )
    };
    eprintln!(
        "10 ms egress delay; PING round trips before the stop: {}; while faultd is stopped: {}; \
         after SIGCONT: {}",
        show(&before),
        show(&during),
        show(&after)
    );
    assert_eq!(run.failures(), 0, "PINGs failed: {run:?}");
    assert!(
        !before.is_empty() && !during.is_empty() && !after.is_empty(),
        "PINGs in each phase: before {}, stopped {}, after {}",
        show(&before),
        show(&during),
        show(&after)
    );
    assert!(
        median(&before) >= 9.5,
        "the delay was not in effect before the stop: {}",
        show(&before)
    );
    // The PING faultd held when it stopped goes with the client's TCP retransmission (200 ms
    // on loopback) once the guard has seen it wait two looks (20 ms apart): well under 1 s.
    // From then on the guard accepts each packet as it comes: most go through undelayed, none
    // waits long (100 ms leaves room for a busy two-core machine).
    let all = rtts(0, i128::MAX);
    assert!(
        quantile(&all, 1.0) < 1000.0,
        "a PING waited {:.0} ms around the stop: {}",
        quantile(&all, 1.0),
        show(&all)
    );
    assert!(
        during.len() >= 50,
        "PINGs stalled while faultd was stopped: {}",
        show(&during)
    );
    assert!(
        quantile(&during, 1.0) < 100.0,
        "a PING waited while faultd was stopped: {}",
        show(&during)
    );
    assert!(
        median(&during) < 5.0,
        "the delay went on while faultd was stopped: {}",
        show(&during)
    );
    assert!(
        median(&after) >= 9.5,
        "the delay did not come back after SIGCONT: {}",
        show(&after)
    );
    faultd
        .faults()
        .remove(faultd_proto::v1::RemoveRequest { id: fault.id })
        .await
        .expect("Remove after SIGCONT");
}

/// Whether `python3` running as nobody (with `groups` as its supplementary groups) can connect
/// to the unix socket `path`.
fn nobody_connects(path: &std::path::Path, groups: &[libc::gid_t]) -> bool {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
    ])
    .arg(path)
    .current_dir("/")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let groups = groups.to_vec();
    // SAFETY: between fork and exec only setgroups/setgid/setuid run, on memory allocated
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.status().expect("python3 runs").success()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn in_the_default_layout_only_the_sockets_group_reaches_the_socket() {
    use std::os::unix::fs::MetadataExt;
    faultd_tests::require_root();
    // As deploy/faultd.service: the socket in the state directory.
    let dir = faultd_tests::TempDir::new("faultd-test-layout");
    let run = dir.join("run");
    let socket = run.join("faultd.sock");
    let log = dir.join("faultd.log");
    let mut child = Command::new(faultd_tests::faultd::binary("FAULTD_BIN", "faultd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&run)
        .args(["--socket-group", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("faultd starts");
    let ready = faultd_tests::process::poll(Duration::from_secs(15), || {
        std::os::unix::net::UnixStream::connect(&socket)
            .ok()
            .map(drop)
    });
    let mut wrong = Vec::new();
    if ready.is_none() {
        wrong.push("faultd did not serve".to_string());
    } else {
        let meta = |path: &std::path::Path| std::fs::metadata(path).expect("metadata");
        if (mode(&run), meta(&run).gid()) != (0o710, 1) {
            wrong.push(format!(
                "state directory {:o} group {}, want 0710 group 1",
                mode(&run),
                meta(&run).gid()
            ));
        }
        if (mode(&socket), meta(&socket).gid()) != (0o660, 1) {
            wrong.push(format!(
                "socket {:o} group {}, want 0660 group 1",
                mode(&socket),
                meta(&socket).gid()
            ));
        }
        if !nobody_connects(&socket, &[1]) {
            wrong.push("a member of the socket's group cannot connect".into());
        }
        if nobody_connects(&socket, &[]) {
            wrong.push("a user outside the socket's group can connect".into());
        }
    }
    stop(&mut child, libc::SIGTERM, Duration::from_secs(10));
    assert!(
        wrong.is_empty(),
        "{}; faultd's log:\n{}",
        wrong.join("; "),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!socket.exists(), "the socket outlived faultd");
}
