//! Running commands and owning child processes.

use std::process::{Child, Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Runs blocking work from anywhere: on a multi-thread tokio runtime through `block_in_place`
/// (so the gRPC channel's tasks keep running while a test waits for a process), else directly.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Runs to completion and returns the output; panics only if the program cannot be started.
pub fn output(cmd: &mut Command) -> Output {
    blocking(|| cmd.output())
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e} (is it installed?)", describe(cmd)))
}

/// Runs to completion and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sends a signal; ESRCH (already gone) is not an error.
pub fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a positive pid.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            eprintln!("warning: kill({pid}, {signal}): {e}");
        }
    }
}

/// Waits for a child up to `timeout`; None if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    blocking(|| wait_timeout_inner(child, timeout))
}

fn wait_timeout_inner(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                eprintln!("warning: waiting for pid {}: {e}", child.id());
                return None;
            }
        }
    }
}

/// Asks a child to stop with `first`, then SIGKILLs it after `grace`; returns how it ended.
pub fn stop(child: &mut Child, first: libc::c_int, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child.id(), first);
    if let Some(status) = wait_timeout(child, grace) {
        return Some(status);
    }
    signal(child.id(), libc::SIGKILL);
    wait_timeout(child, Duration::from_secs(5))
}

/// A child process that is SIGKILLed and reaped when dropped.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} (`{}`): {e} (is it installed?)",
                describe(cmd)
            )
        });
        ChildGuard {
            child,
            name: name.to_owned(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Panics with `log` if the child has already exited.
    pub fn assert_running(&mut self, log: impl FnOnce() -> String) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its output:\n{}",
                self.name,
                log()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if stop(&mut self.child, libc::SIGKILL, Duration::from_secs(5)).is_none() {
            eprintln!(
                "warning: {} (pid {}) did not exit after SIGKILL",
                self.name,
                self.child.id()
            );
        }
    }
}

/// Polls `check` every 20 ms until it returns Some or `timeout` passes.
pub fn poll<T>(timeout: Duration, check: impl FnMut() -> Option<T>) -> Option<T> {
    blocking(|| poll_inner(timeout, check))
}

fn poll_inner<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The current wall-clock time in nanoseconds since the Unix epoch.
pub fn unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

/// A process stopped with SIGSTOP; SIGCONT when dropped, also when the test fails.
pub struct Stopped(u32);

impl Stopped {
    pub fn stop(pid: u32) -> Stopped {
        signal(pid, libc::SIGSTOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// How many threads process `pid` has now (0 if it is gone).
pub fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
