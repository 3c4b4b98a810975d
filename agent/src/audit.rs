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

impl Entry<'_> {
    pub fn to_json(&self, time: SystemTime) -> Value {
        json!({
            // RFC 3339, as the API's timestamps read.
            "time": prost_types::Timestamp::from(time).to_string(),
            "call": self.call,
            "peer": self.peer.to_json(),
            "request": self.request,
            "code": self.code,
            "message": self.message,
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
