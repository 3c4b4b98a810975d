//! `reset{after_bytes}` and `stall{close_after}`: a watcher thread that tears down each
//! connection of the target once it has carried the given number of bytes, or once the fault
//! has seen it for the given time, for as long as the fault lasts. It stops when the
//! fault is reverted, and on its own at the lease deadline it was last given, so even a hung
//! engine cannot make it outlive the lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::dataplane::{ConnectionKiller, SocketFilter};

/// How often the watcher looks at the connections' byte counts.
pub const POLL: Duration = Duration::from_millis(5);

pub struct ResetWatcher {
    stop: Arc<AtomicBool>,
    /// CLOCK_MONOTONIC ns after which the watcher stops by itself; renewals move it.
    deadline_ns: Arc<AtomicU64>,
}

impl ResetWatcher {
    pub fn start(
        fault: &str,
        filter: SocketFilter,
        killer: ConnectionKiller,
        deadline_ns: u64,
        reset_count: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Arc::new(AtomicU64::new(deadline_ns));
        let (thread_stop, thread_deadline) = (stop.clone(), deadline.clone());
        let fault = fault.to_string();
        std::thread::Builder::new()
            .name(format!("reset-{}", &fault[..8.min(fault.len())]))
            .spawn(move || {
                let mut last_error = String::new();
                while !thread_stop.load(Ordering::Acquire)
                    && super::monotonic_now_ns() < thread_deadline.load(Ordering::Acquire)
                {
                    match killer(&filter) {
                        Ok(n) => {
                            reset_count.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // Logged once per distinct error: the watcher keeps trying.
                            let text = e.to_string();
                            if text != last_error {
                                tracing::warn!(%fault, error = %text, "reset watcher");
                                last_error = text;
                            }
                        }
                    }
                    std::thread::sleep(POLL);
                }
            })?;
        Ok(Self {
            stop,
            deadline_ns: deadline,
        })
    }

    pub fn renew(&self, deadline_ns: u64) {
        self.deadline_ns.store(deadline_ns, Ordering::Release);
    }
}

impl Drop for ResetWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
