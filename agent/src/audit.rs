//! The audit log: one JSON line per mutating call (Grant, Renew, KeepAlive, Revoke, Inject,
//! Remove, Abort) and per shutdown, saying who asked — the unix peer's uid/gid/pid, or the
//! client certificate's subject over mTLS — what, when, and how it ended. Lines are appended
//! with one write each (O_APPEND), so concurrent calls never interleave within a line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{Value, json};

/// Who made a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A process on the unix socket, by its credentials (SO_PEERCRED).
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A client over mTLS, by its certificate's subject.
    Tls {
        subject: String,
        addr: Option<SocketAddr>,
    },
    /// A client over plain TCP (`--insecure`): only its address is known.
    Tcp {
        addr: Option<SocketAddr>,
    },
    /// faultd itself (e.g. reverting everything on SIGTERM).
    Agent {
        cause: String,
    },
    Unknown,
}

impl Peer {
    pub fn to_json(&self) -> Value {
        let addr = |addr: &Option<SocketAddr>| addr.map(|a| a.to_string());
        match self {
            Self::Unix { uid, gid, pid } => {
                json!({ "transport": "unix", "uid": uid, "gid": gid, "pid": pid })
            }
            Self::Tls { subject, addr: a } => {
                json!({ "transport": "mtls", "subject": subject, "addr": addr(a) })
            }
            Self::Tcp { addr: a } => json!({ "transport": "tcp", "addr": addr(a) }),
            Self::Agent { cause } => json!({ "transport": "agent", "cause": cause }),
            Self::Unknown => json!({ "transport": "unknown" }),
        }
    }
}

/// One line of the log.
#[derive(Debug)]
pub struct Entry<'a> {
    /// The gRPC method, e.g. `faultd.v1.FaultService/Inject`.
    pub call: &'a str,
    pub peer: &'a Peer,
    /// What was asked, as far as it could be read.
    pub request: Value,
    /// The status code name: `OK`, `PERMISSION_DENIED`, ...
    pub code: &'a str,
    pub message: &'a str,
    /// What changed (ids), for calls that succeeded.
    pub result: Value,
}

/// Longest string the log keeps of a request; longer ones keep their start and size.
const MAX_STRING: usize = 256;
/// Most entries the log keeps of a request's list or map.
const MAX_ENTRIES: usize = 64;

/// `value` with long strings, lists and maps cut short: a rejected request of megabytes (a
/// 3 MB id, 100 000 labels) makes a line of a few kilobytes, not of megabytes.
fn clipped(value: &Value) -> Value {
    match value {
        Value::String(text) if text.len() > MAX_STRING => {
            let mut end = MAX_STRING;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Value::String(format!("{}… ({} bytes)", &text[..end], text.len()))
        }
        Value::Array(items) => {
            let mut kept: Vec<Value> = items.iter().take(MAX_ENTRIES).map(clipped).collect();
            if items.len() > MAX_ENTRIES {
                kept.push(Value::String(format!("… ({} entries)", items.len())));
            }
            Value::Array(kept)
        }
        Value::Object(map) => {
            let mut kept: serde_json::Map<String, Value> = map
                .iter()
                .take(MAX_ENTRIES)
                .map(|(key, value)| match clipped(&Value::String(key.clone())) {
                    Value::String(key) => (key, clipped(value)),
                    _ => (key.clone(), clipped(value)),
                })
                .collect();
            if map.len() > MAX_ENTRIES {
                kept.insert("…".into(), json!(format!("{} entries", map.len())));
            }
            Value::Object(kept)
        }
        other => other.clone(),
    }
}

impl Entry<'_> {
    pub fn to_json(&self, time: SystemTime) -> Value {
        json!({
            // RFC 3339, as the API's timestamps read.
            "time": prost_types::Timestamp::from(time).to_string(),
            "call": self.call,
            "peer": self.peer.to_json(),
            "request": clipped(&self.request),
            "code": self.code,
            "message": clipped(&json!(self.message)),
            "result": self.result,
        })
    }
}

#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends one line. A line is a few hundred bytes to a local file: written in place.
    pub fn record(&self, entry: &Entry<'_>) -> std::io::Result<()> {
        let mut line = entry.to_json(SystemTime::now()).to_string();
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_requests_make_short_lines() {
        let labels: serde_json::Map<String, Value> =
            (0..100_000).map(|i| (i.to_string(), json!(""))).collect();
        let entry = Entry {
            call: "faultd.v1.FaultService/Remove",
            peer: &Peer::Unknown,
            request: json!({ "id": "x".repeat(3 << 20), "labels": labels }),
            code: "RESOURCE_EXHAUSTED",
            message: &"y".repeat(1 << 20),
            result: Value::Null,
        };
        let line = entry.to_json(SystemTime::now()).to_string();
        assert!(line.len() < 4096, "{} bytes", line.len());
        assert!(line.contains("(3145728 bytes)"), "{line}");
        assert!(line.contains("100000 entries"), "{line}");
        let small = json!({ "id": "0123456789abcdef", "ports": [6379] });
        assert_eq!(clipped(&small), small);
    }
}
