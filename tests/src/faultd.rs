//! The faultd daemon under test, as a process guard, and the faultctl CLI.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use faultd_proto::v1::{Fault, InjectRequest, ListFaultsRequest, ListLeasesRequest};
use tonic::transport::Channel;

use crate::process::{describe, output, signal, stop, unix_ns, wait_timeout};
use crate::tempdir::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const TERM_GRACE: Duration = Duration::from_secs(5);

/// The build's binary `name`: `$ENV` if set, else next to the test executable's profile
/// directory (`<workspace>/target/debug/<name>` in a default build). Panics if missing: the
/// tests never skip.
pub fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{env}={} does not exist", path.display());
        return path;
    }
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo xtask test`, or `cargo build -p faultd-agent --bins` first (or set {env})",
        path.display()
    );
    path
}

/// `target/<profile>`: the test executable lives in `target/<profile>/deps`.
fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.join("deps").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// How to start faultd.
#[derive(Clone, Debug, Default)]
pub struct FaultdOptions {
    /// `--state-dir`; by default a fresh directory owned by the guard.
    pub state_dir: Option<PathBuf>,
    /// `--max-ttl`, e.g. "1h"; faultd's default if None.
    pub max_ttl: Option<String>,
    pub extra_args: Vec<String>,
    /// RLIMIT_NOFILE (soft, hard) faultd starts with; the test's own if None.
    pub nofile: Option<(u64, u64)>,
    /// The umask faultd starts with; the test's own if None.
    pub umask: Option<u32>,
    /// Runs faultd in a mount namespace of its own (mounts private), so that a test can change
    /// what faultd sees of the file system (`Faultd::bind_mount`) and nobody else.
    pub private_mounts: bool,
}

impl FaultdOptions {
    /// On the state directory `dir`, which outlives the faultd: a second faultd started with
    /// the same options finds what the first left there (its instance id, its rules).
    pub fn with_state_dir(dir: &Path) -> FaultdOptions {
        FaultdOptions {
            state_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    /// With the metrics endpoint on a free loopback port (`Faultd::metrics_addr`).
    pub fn with_metrics() -> FaultdOptions {
        FaultdOptions {
            extra_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
            ..Default::default()
        }
    }
}

/// A running faultd on a unique socket and state directory. Drop sends SIGTERM, waits 5 s,
/// then SIGKILLs.
pub struct Faultd {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    channel: Channel,
    // Last: removed after the process is gone.
    _dir: TempDir,
}

impl Faultd {
    pub async fn start() -> Faultd {
        Faultd::start_with(FaultdOptions::default()).await
    }

    /// Starts faultd and waits until a gRPC call succeeds (10 s, then panics with its stderr).
    pub async fn start_with(options: FaultdOptions) -> Faultd {
        crate::require_root();
        let bin = binary("FAULTD_BIN", "faultd");
        let dir = TempDir::new("faultd-test-agent");
        let socket = dir.join("faultd.sock");
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.join("state"));
        std::fs::create_dir_all(&state_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", state_dir.display()));
        let log = dir.join("faultd.log");
        let stderr =
            File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let stdout = stderr.try_clone().expect("dup log file");

        let mut cmd = Command::new(&bin);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir);
        if let Some(max_ttl) = &options.max_ttl {
            cmd.args(["--max-ttl", max_ttl]);
        }
        cmd.args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let (nofile, umask, private_mounts) =
            (options.nofile, options.umask, options.private_mounts);
        if nofile.is_some() || umask.is_some() || private_mounts {
            // SAFETY: between fork and exec only setrlimit(2), umask(2), unshare(2) and
            // mount(2) run, all async-signal-safe, on values copied in before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some((soft, hard)) = nofile {
                        let limit = libc::rlimit {
                            rlim_cur: soft,
                            rlim_max: hard,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(mask) = umask {
                        libc::umask(mask as libc::mode_t);
                    }
                    if private_mounts {
                        if libc::unshare(libc::CLONE_NEWNS) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        let root = c"/";
                        let flags = libc::MS_REC | libc::MS_PRIVATE;
                        let none = std::ptr::null();
                        if libc::mount(none, root.as_ptr(), none, flags, none.cast()) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start faultd (`{}`): {e}", describe(&cmd)));
        let pid = child.id();

        let started = Instant::now();
        let channel = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "faultd (`{}`) exited with {status} before it answered on {}; its output:\n{}",
                    describe(&cmd),
                    socket.display(),
                    read(&log)
                );
            }
            if let Some(channel) = try_connect(&socket).await {
                break channel;
            }
            if started.elapsed() > READY_TIMEOUT {
                stop(&mut child, libc::SIGKILL, TERM_GRACE);
                panic!(
                    "faultd (`{}`) did not answer a gRPC call on {} within {READY_TIMEOUT:?}; its output:\n{}",
                    describe(&cmd),
                    socket.display(),
                    read(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Faultd {
            child: Some(child),
            pid,
            socket,
            state_dir,
            log,
            channel,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Everything faultd wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// A value faultd logged as `key=value` (text logs) or `"key":"value"` (JSON logs), e.g.
    /// `metrics` → `http://127.0.0.1:41234/metrics`.
    pub fn logged(&self, key: &str) -> Option<String> {
        let log = self.log();
        let text = format!("{key}=");
        let json = format!("\"{key}\":\"");
        log.lines().find_map(|line| {
            if let Some((_, rest)) = line.split_once(&json) {
                return rest.split('"').next().map(str::to_owned);
            }
            let (_, rest) = line.split_once(&text)?;
            rest.split_whitespace().next().map(str::to_owned)
        })
    }

    /// `HOST:PORT` of the metrics endpoint faultd logged at start (`--metrics-addr`).
    pub fn metrics_addr(&self) -> String {
        let url = self.logged("metrics").unwrap_or_else(|| {
            panic!(
                "faultd logged no metrics address (was it started with --metrics-addr?):\n{}",
                self.log()
            )
        });
        url.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned()
    }

    /// Bind-mounts `source` over `target` in faultd's own mount namespace (it must have been
    /// started with `private_mounts`); the guard unmounts it.
    pub fn bind_mount(&self, source: &Path, target: &Path) -> BindMount {
        let pid = self.pid.to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &pid, "--mount", "--", "mount", "--bind"])
            .arg(source)
            .arg(target);
        let out = output(&mut cmd);
        assert!(
            out.status.success(),
            "`{}` failed: {}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
        BindMount {
            pid,
            target: Some(target.to_path_buf()),
        }
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn faults(&self) -> FaultServiceClient<Channel> {
        FaultServiceClient::new(self.channel.clone())
    }

    pub fn leases(&self) -> LeaseServiceClient<Channel> {
        LeaseServiceClient::new(self.channel.clone())
    }

    /// FaultService.Inject, which must succeed: the fault as faultd answered it.
    pub async fn inject(&self, request: InjectRequest) -> Fault {
        self.faults()
            .inject(request)
            .await
            .unwrap_or_else(|s| panic!("Inject failed: {s:?}"))
            .into_inner()
    }

    /// SIGKILL, and reap. Returns the wall-clock instant (Unix ns) just before the signal.
    pub fn kill(&mut self) -> i128 {
        let mut child = self.child.take().expect("faultd is running");
        let at = unix_ns();
        signal(child.id(), libc::SIGKILL);
        if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
            panic!(
                "faultd (pid {}) still running 5 s after SIGKILL",
                child.id()
            );
        }
        at
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL. Returns how it exited (None: not even then).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        stop(&mut child, libc::SIGTERM, TERM_GRACE)
    }

    /// Panics with the log if faultd has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "faultd exited unexpectedly with {status}; its output:\n{}",
                read(&self.log)
            );
        }
    }
}

/// A bind mount in a faultd's mount namespace, undone on drop (or with `undo`).
pub struct BindMount {
    pid: String,
    target: Option<PathBuf>,
}

impl BindMount {
    pub fn undo(&mut self) {
        let Some(target) = self.target.take() else {
            return;
        };
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.pid, "--mount", "--", "umount"])
            .arg(&target);
        let out = output(&mut cmd);
        if !out.status.success() {
            // faultd may be gone, and its mount namespace with it.
            eprintln!(
                "warning: `{}` failed: {}",
                describe(&cmd),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        self.undo();
    }
}

impl Drop for Faultd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            match stop(&mut child, libc::SIGTERM, TERM_GRACE) {
                Some(status) if status.success() => {}
                Some(status) => eprintln!(
                    "warning: faultd (pid {}) exited with {status} on SIGTERM",
                    self.pid
                ),
                None => eprintln!("warning: faultd (pid {}) did not exit", self.pid),
            }
        }
    }
}

async fn try_connect(socket: &Path) -> Option<Channel> {
    if !socket.exists() {
        return None;
    }
    let attempt = async {
        let channel = faultd::client::connect(socket).await.ok()?;
        FaultServiceClient::new(channel.clone())
            .list(ListFaultsRequest::default())
            .await
            .ok()?;
        LeaseServiceClient::new(channel.clone())
            .list(ListLeasesRequest {})
            .await
            .ok()?;
        Some(channel)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// The faultctl CLI, talking to one faultd.
pub struct Faultctl {
    bin: PathBuf,
    socket: PathBuf,
}

impl Faultctl {
    /// Panics if faultctl is not built (FAULTCTL_BIN, else next to faultd).
    pub fn new(faultd: &Faultd) -> Faultctl {
        Faultctl {
            bin: binary("FAULTCTL_BIN", "faultctl"),
            socket: faultd.socket().to_path_buf(),
        }
    }

    /// `faultctl --socket <socket>`; add the rest.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket").arg(&self.socket).stdin(Stdio::null());
        cmd
    }

    /// Runs `faultctl --socket <socket> ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let mut cmd = self.command();
        cmd.args(args);
        CliOutput::of(&mut cmd)
    }
}

/// What a CLI run printed, with its command line for messages.
pub struct CliOutput {
    pub command: String,
    pub output: Output,
}

impl CliOutput {
    /// Runs `cmd` to completion (any client: faultctl, grpcurl, a script).
    pub fn of(cmd: &mut Command) -> CliOutput {
        let output = output(cmd);
        CliOutput {
            command: describe(cmd),
            output,
        }
    }

    /// What it printed, as JSON; panics unless it exited 0 with JSON on stdout.
    pub fn json(&self) -> serde_json::Value {
        self.assert_success();
        serde_json::from_str(&self.stdout()).unwrap_or_else(|e| panic!("{self}\nnot JSON: {e}"))
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// Panics unless it exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "`{}` failed: {}", self.command, self);
        self
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nstdout: {}\nstderr: {}",
            self.output.status,
            self.stdout().trim_end(),
            self.stderr().trim_end()
        )
    }
}
