//! What can fail in the NFQUEUE mechanism, with the source (the system call's error, the exec
//! of iptables-restore). Reaches the engine as `DataplaneError::Shaper`, with the same text.

use std::io;
use std::path::PathBuf;

use crate::dataplane::DataplaneError;
use crate::dataplane::netfilter::ExecError;
use crate::dataplane::qdisc_probe::LoopbackError;
use crate::fault::Mechanism;

#[derive(Debug, thiserror::Error)]
pub enum NfqueueError {
    #[error("NFQUEUE cannot apply {0}")]
    NotApplicable(&'static str),
    #[error("opening an NFQUEUE netlink socket: {0}")]
    Open(#[source] io::Error),
    /// Not exactly one new NETLINK_NETFILTER socket appeared while the queue was opened.
    #[error("cannot tell the NFQUEUE socket apart ({0} new netfilter netlink sockets)")]
    SocketUnknown(usize),
    #[error("binding NFQUEUE {num}: {source}")]
    Bind {
        num: u16,
        #[source]
        source: io::Error,
    },
    #[error("no free NFQUEUE number in {first}..{last} (last error: {last_error:?})")]
    NoFreeQueue {
        first: u16,
        last: u16,
        last_error: Option<io::Error>,
    },
    #[error("configuring NFQUEUE {num}: {source}")]
    Configure {
        num: u16,
        #[source]
        source: io::Error,
    },
    #[error("eventfd: {0}")]
    Eventfd(#[source] io::Error),
    #[error("opening the raw sockets that send duplicates: {0}")]
    RawSocket(#[source] io::Error),
    #[error("entering {}: {source}", netns.display())]
    EnterNetns {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening {path}: {source}")]
    OpenNetns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("opening our namespace: {0}")]
    OwnNetns(#[source] io::Error),
    #[error("spawning the NFQUEUE thread: {0}")]
    SpawnLane(#[source] io::Error),
    #[error("the NFQUEUE thread died while starting")]
    LaneDied,
    /// The rules of one address family did not go in (those of the others were taken out).
    #[error("{family} rules: {source}")]
    Rules {
        family: &'static str,
        #[source]
        source: ExecError,
    },
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("the netfilter worker is gone")]
    WorkerGone,
    #[error("starting the netfilter worker: {0}")]
    StartWorker(#[source] io::Error),
    /// The record of namespaces for the next agent's sweep could not be written.
    #[error("writing {}: {source}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The lock shared with the other faultd instances of the host.
    #[error("locking {}: {source}", path.display())]
    HostLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating a private network namespace: {0}")]
    PrivateNetns(#[source] io::Error),
    #[error(transparent)]
    Loopback(#[from] LoopbackError),
    /// A step of the start-up probe's exchange failed.
    #[error("{what}: {source}")]
    Probe {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no packet reached the queue within 1 s: {0}")]
    NoPacket(#[source] io::Error),
    #[error("the reply on a marked connection was not queued on INPUT (hooks seen: {hooks:?})")]
    NotOnInput { hooks: Vec<u8> },
    #[error("spawning the probe thread: {0}")]
    SpawnProbe(#[source] io::Error),
    #[error("the NFQUEUE probe panicked")]
    ProbePanicked,
}

/// The engine sees the mechanism's failure with the text it always had.
impl From<NfqueueError> for DataplaneError {
    fn from(e: NfqueueError) -> Self {
        DataplaneError::Shaper {
            mechanism: Mechanism::Nfqueue.name(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn the_engine_sees_the_text_it_always_had() {
        let failed = ExecError::Failed {
            command: "iptables-restore --noflush --wait=5".into(),
            status: ExitStatus::from_raw(256),
            stderr: "iptables-restore: line 2 failed".into(),
        };
        let e = NfqueueError::Rules {
            family: "IPv6",
            source: failed,
        };
        assert_eq!(
            e.to_string(),
            "IPv6 rules: `iptables-restore --noflush --wait=5` failed (exit status: 1): \
             iptables-restore: line 2 failed"
        );
        let none = NfqueueError::NoFreeQueue {
            first: 0x8000,
            last: 0xfffe,
            last_error: None,
        };
        assert_eq!(
            none.to_string(),
            "no free NFQUEUE number in 32768..65534 (last error: None)"
        );
        match DataplaneError::from(NfqueueError::WorkerGone) {
            DataplaneError::Shaper { mechanism, reason } => {
                assert_eq!(mechanism, Mechanism::Nfqueue.name());
                assert_eq!(reason, "the netfilter worker is gone");
            }
            other => panic!("{other:?}"),
        }
    }
}
