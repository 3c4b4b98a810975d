//! Real client libraries (redis-py, psycopg 3) run inside or beside a workload through
//! `tests/clients/conn_client.py`, reporting what they see as timestamped JSON events.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{describe, stop};
use crate::workload::Workload;

/// The Python with the client libraries: `cargo xtask test` points `FAULTD_TEST_PYTHON` at the
/// venv it installs them into.
pub fn python() -> std::ffi::OsString {
    std::env::var_os("FAULTD_TEST_PYTHON").unwrap_or_else(|| "python3".into())
}

/// The bin directory of the test venv (`FAULTD_TEST_PYTHON`'s), after checking that each of
/// `tools` is there: `cargo xtask setup` installs them (chaos, pytest, grpcurl, ...).
pub fn venv_bin(tools: &[&str]) -> std::path::PathBuf {
    let python = std::path::PathBuf::from(python());
    let bin = python
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    for tool in tools {
        assert!(
            bin.join(tool).is_file(),
            "{} is missing: FAULTD_TEST_PYTHON must name the venv `cargo xtask setup` installs \
             the test clients into (run the suite with `cargo xtask test`)",
            bin.join(tool).display()
        );
    }
    bin
}

/// A running client; killed if dropped. Or the client a container runs, whose events are read
/// from the container's log ([`ConnClient::follow_log`]).
pub struct ConnClient {
    child: Option<Child>,
    /// Set on drop: stops the thread that follows a container's log.
    stop: Arc<AtomicBool>,
    events: Receiver<Value>,
    stderr: std::sync::mpsc::Receiver<String>,
    command: String,
    seen: Vec<Value>,
}

impl ConnClient {
    /// `conn_client.py MODE ARGS…` in `workload`.
    pub fn start(workload: &Workload, mode: &str, args: &[&str]) -> ConnClient {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/conn_client.py");
        let python = python();
        let mut cmd: Command = workload.command(&python.to_string_lossy());
        cmd.arg(script)
            .arg(mode)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        let (tx, events) = channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str(&line) {
                    Ok(value) => {
                        if tx.send(value).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("conn_client: {line}"),
                }
            }
        });
        let (etx, stderr) = channel();
        let pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            let _ = etx.send(text);
        });
        ConnClient {
            child: Some(child),
            stop: Arc::new(AtomicBool::new(false)),
            events,
            stderr,
            command: describe(&cmd),
            seen: Vec::new(),
        }
    }

    /// The events a container's client prints, read from its CRI log file `log` (lines
    /// `<time> stdout F <text>`, as the kubelet's log readers parse them); `label` names it in
    /// messages. The file need not exist yet.
    pub fn follow_log(log: &Path, label: &str) -> ConnClient {
        let (tx, events) = channel();
        let (_, stderr) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let path = log.to_path_buf();
        let stopped = stop.clone();
        std::thread::spawn(move || follow(&path, &tx, &stopped));
        ConnClient {
            child: None,
            stop,
            events,
            stderr,
            command: format!("{label} (log {})", log.display()),
            seen: Vec::new(),
        }
    }

    /// Waits up to 10 s for the next `event` ("pong", "error", ...) stamped after `since`
    /// (unix ns); panics saying `what` and the last events seen otherwise.
    pub fn sees(&mut self, event: &str, since: i128, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(seen) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if seen["event"] == event && at(&seen) > since {
                return seen;
            }
        }
        panic!(
            "{what}: no {event:?} from `{}` within 10 s; it saw {:?}",
            self.command,
            self.seen.iter().rev().take(5).collect::<Vec<_>>()
        );
    }

    /// The events stamped after `since`, reading for `window`.
    pub fn events_after(&mut self, since: i128, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        while self
            .next(deadline.saturating_duration_since(Instant::now()))
            .is_some()
        {}
        self.seen
            .iter()
            .filter(|e| at(e) > since)
            .cloned()
            .collect()
    }

    /// The next event within `timeout`, or None.
    pub fn next(&mut self, timeout: Duration) -> Option<Value> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => {
                self.seen.push(event.clone());
                Some(event)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Waits for an event named `name`, skipping others; panics with what was seen if none
    /// arrives within `timeout`.
    pub fn expect(&mut self, name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(event) if event["event"] == name => return event,
                Some(_) => {}
                None => {
                    let stderr = self.stderr_text();
                    panic!(
                        "`{}` sent no {name:?} event within {timeout:?}; events {:?}; stderr {stderr}",
                        self.command, self.seen
                    )
                }
            }
        }
    }

    /// Events seen so far.
    pub fn seen(&self) -> &[Value] {
        &self.seen
    }

    fn stderr_text(&mut self) -> String {
        if let Some(child) = self.child.as_mut()
            && matches!(child.try_wait(), Ok(Some(_)))
        {
            return self
                .stderr
                .recv_timeout(Duration::from_secs(1))
                .unwrap_or_default();
        }
        "(still running, or not a process of ours)".into()
    }
}

impl Drop for ConnClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut child) = self.child.take() {
            stop(&mut child, libc::SIGKILL, Duration::from_secs(2));
        }
    }
}

/// Follows a CRI log file until `stop`, sending each JSON line of stdout; other lines (stderr,
/// tracebacks) go to the test's stderr.
fn follow(path: &PathBuf, tx: &Sender<Value>, stop: &AtomicBool) {
    let idle = Duration::from_millis(20);
    let file = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match std::fs::File::open(path) {
            Ok(file) => break file,
            Err(_) => std::thread::sleep(idle),
        }
    };
    let mut reader = BufReader::new(file);
    let (mut line, mut partial) = (String::new(), String::new());
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => {
                std::thread::sleep(idle);
                continue;
            }
            Ok(_) if !line.ends_with('\n') => continue, // the rest is still being written
            Ok(_) => {}
        }
        // `<RFC 3339 time> <stream> <P|F> <text>`: P is a part of a longer line.
        let mut parts = line.trim_end_matches('\n').splitn(4, ' ');
        let (_, stream, tag, text) = (parts.next(), parts.next(), parts.next(), parts.next());
        partial.push_str(text.unwrap_or(""));
        if tag != Some("P") {
            let text = std::mem::take(&mut partial);
            match (stream, serde_json::from_str::<Value>(&text)) {
                (Some("stdout"), Ok(value)) => {
                    if tx.send(value).is_err() {
                        return;
                    }
                }
                _ => eprintln!("{}: {text}", path.display()),
            }
        }
        line.clear();
    }
}

/// The event's `t` (unix ns).
pub fn at(event: &Value) -> i128 {
    event["t"]
        .as_i64()
        .map(i128::from)
        .unwrap_or_else(|| panic!("event without a time: {event}"))
}
