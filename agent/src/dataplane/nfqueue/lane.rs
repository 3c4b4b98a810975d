//! A lane: one queue and its thread in one network namespace, which holds each packet until
//! its release time (`serve`) and lets everything go at the lease deadline or when stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use faultd_common::Counters;
use nfq::{Message, Queue, Verdict};

use super::guard::Guard;
use super::queue::{bind_free, configure, eventfd, open_queue, tune_thread, wait};
use super::schedule::{Rng, Schedule, flow_of};
use crate::dataplane::clock::monotonic_now_ns;
use crate::fault::Action;
use crate::target::namespaces::NetNs;

/// Packets a lane holds at most; beyond it new packets are dropped, as netem's and tbf's
/// queue limits do.
pub(super) const MAX_HELD: usize = 16_384;

/// Messages a lane reads before it releases what is due again.
pub(super) const READ_BATCH: usize = 256;

/// What a lane and its owner share.
pub(super) struct LaneShared {
    /// CLOCK_MONOTONIC ns: from then on nothing is held.
    deadline_ns: AtomicU64,
    stop: AtomicBool,
    matched: AtomicU64,
    delayed: AtomicU64,
    dropped: AtomicU64,
    /// Written to wake the lane (stop, new deadline).
    wake: OwnedFd,
}

impl LaneShared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd. A full counter (EAGAIN) still wakes.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    pub(super) fn counters(&self) -> Counters {
        Counters {
            matched: self.matched.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            refused: 0,
        }
    }
}

/// One queue and its thread, in one network namespace.
pub(super) struct Lane {
    pub(super) shared: Arc<LaneShared>,
    thread: Option<JoinHandle<()>>,
    pub(super) queue: u16,
}

impl Lane {
    /// Starts the thread, which enters `netns`, binds a free queue number (not in `taken`)
    /// and reports it.
    pub(super) fn start(
        netns: Arc<NetNs>,
        action: &Action,
        expires_at_ns: u64,
        taken: BTreeSet<u16>,
        first: u16,
    ) -> Result<Lane, String> {
        let schedule = Schedule::new(action, Rng::seeded())?;
        let shared = Arc::new(LaneShared {
            deadline_ns: AtomicU64::new(expires_at_ns),
            stop: AtomicBool::new(false),
            matched: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            wake: eventfd().map_err(|e| format!("eventfd: {e}"))?,
        });
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let lane_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("faultd-nfqueue".into())
            .spawn(move || {
                let opened = (|| {
                    NetNs::enter(netns.as_fd())
                        .map_err(|e| format!("entering {}: {e}", netns.path().display()))?;
                    tune_thread();
                    let (mut queue, fd) = open_queue()?;
                    let num = bind_free(&mut queue, &taken, first)?;
                    configure(&mut queue, num)?;
                    Ok::<_, String>((queue, fd, num))
                })();
                match opened {
                    Ok((queue, fd, num)) => {
                        // Releases the queue while faultd is stopped; without it the delay
                        // still works, a stopped faultd just holds traffic.
                        let _guard = Guard::start(fd, num)
                            .map_err(|e| {
                                tracing::warn!(queue = num, error = %e, "NFQUEUE guard");
                            })
                            .ok();
                        // The owner waits for this; if it is gone, there is nothing to serve.
                        if ready_tx.send(Ok(num)).is_ok() {
                            serve(queue, fd, schedule, &lane_shared);
                        }
                    }
                    Err(e) => {
                        let _owner_gone = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("spawning the NFQUEUE thread: {e}"))?;
        let queue = match ready_rx.recv() {
            Ok(Ok(num)) => num,
            failed => {
                // The thread has ended (or is about to): it holds no queue.
                if thread.join().is_err() {
                    tracing::error!("the NFQUEUE thread panicked while starting");
                }
                return Err(match failed {
                    Ok(Err(e)) => e,
                    _ => "the NFQUEUE thread died while starting".into(),
                });
            }
        };
        Ok(Lane {
            shared,
            thread: Some(thread),
            queue,
        })
    }

    pub(super) fn refresh(&self, expires_at_ns: u64) {
        self.shared
            .deadline_ns
            .store(expires_at_ns, Ordering::Release);
        self.shared.wake();
    }

    /// Asks the lane to release everything and end; does not wait.
    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
    }

    pub(super) fn join(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(queue = self.queue, "the NFQUEUE thread panicked");
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.join();
    }
}

/// The lane's loop: read packets, hold them, release them on time.
fn serve(mut queue: Queue, fd: RawFd, mut schedule: Schedule, shared: &LaneShared) {
    // Keyed by (release time, arrival sequence): released in order.
    let mut held: BTreeMap<(u64, u64), Message> = BTreeMap::new();
    let mut seq = 0u64;
    let mut errors = 0u32;
    let release = |queue: &mut Queue, msg: Message| {
        if let Err(e) = queue.verdict(msg) {
            tracing::warn!(error = %e, "NFQUEUE verdict");
        }
    };
    loop {
        let now = monotonic_now_ns();
        let deadline = shared.deadline_ns.load(Ordering::Acquire);
        let stopping = shared.stop.load(Ordering::Acquire);
        if stopping || now >= deadline {
            while let Some((_, msg)) = held.pop_first() {
                release(&mut queue, msg);
            }
            if stopping {
                // The rules are gone by now: what is still queued is released, not dropped
                // with the socket.
                loop {
                    match queue.recv() {
                        Ok(msg) => release(&mut queue, msg),
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    }
                }
            }
        }
        while let Some(entry) = held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            release(&mut queue, entry.remove());
        }
        let timeout = held
            .first_key_value()
            .map(|((at, _), _)| (*at).min(deadline).saturating_sub(now));
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Err(e) = wait(&mut fds, timeout) {
            tracing::error!(error = %e, "NFQUEUE wait failed; the queue is closed and traffic bypasses it");
            return;
        }
        if fds[1].revents != 0 {
            let mut value = 0u64;
            // SAFETY: an 8-byte read from our eventfd; EAGAIN is harmless.
            unsafe { libc::read(shared.wake.as_raw_fd(), (&raw mut value).cast(), 8) };
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0 {
            tracing::error!(
                revents = fds[0].revents,
                "the NFQUEUE socket failed; closing it (traffic bypasses it)"
            );
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        for _ in 0..READ_BATCH {
            let mut msg = match queue.recv() {
                Ok(msg) => msg,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // A verdict for a packet the guard accepted while faultd was stopped.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    errors += 1;
                    if errors > 1000 {
                        tracing::error!(error = %e, "NFQUEUE keeps failing; closing it (traffic bypasses it)");
                        return;
                    }
                    tracing::warn!(error = %e, "NFQUEUE receive");
                    break;
                }
            };
            errors = 0;
            let now = monotonic_now_ns();
            if now >= shared.deadline_ns.load(Ordering::Acquire) {
                // Past the lease deadline: in order, everything goes.
                while let Some((_, earlier)) = held.pop_first() {
                    release(&mut queue, earlier);
                }
                release(&mut queue, msg);
                continue;
            }
            shared.matched.fetch_add(1, Ordering::Relaxed);
            if held.len() >= MAX_HELD {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                msg.set_verdict(Verdict::Drop);
                release(&mut queue, msg);
                continue;
            }
            // What arrives (INPUT for a cgroup, PREROUTING for an interface) has its own bucket.
            let inbound = [libc::NF_INET_LOCAL_IN, libc::NF_INET_PRE_ROUTING]
                .contains(&i32::from(msg.get_hook()));
            let at = schedule.release_at(
                now,
                flow_of(msg.get_payload()),
                msg.get_original_len(),
                inbound,
            );
            if at > now {
                shared.delayed.fetch_add(1, Ordering::Relaxed);
            }
            seq += 1;
            held.insert((at, seq), msg);
        }
    }
}
