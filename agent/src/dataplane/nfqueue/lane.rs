//! A lane: one queue and its thread in one network namespace, which holds each packet until
//! its release time (`serve`) and lets everything go at the lease deadline or when stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use faultd_common::Counters;
use nfq::{Message, Queue, Verdict};

use super::error::NfqueueError;
use super::guard::Guard;
use super::queue::{
    COPY_RANGE, COPY_WHOLE, bind_free, configure, eventfd, open_queue, tune_thread, wait,
};
use super::schedule::{Rng, Schedule, flow_of};
use super::tamper::{Done, Tamper};
use crate::dataplane::clock::monotonic_now_ns;
use crate::fault::wire::tcp_payload;
use crate::fault::{Action, RequestMatch};
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
    /// With a request match: requests matched (and so delayed).
    requests: AtomicU64,
    duplicated: AtomicU64,
    corrupted: AtomicU64,
    reordered: AtomicU64,
    sliced: AtomicU64,
    /// Written to wake the lane (stop, new deadline).
    wake: OwnedFd,
}

impl LaneShared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd. A full counter (EAGAIN) still wakes.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn counters(&self) -> Counters {
        Counters {
            matched: self.matched.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            requests_matched: self.requests.load(Ordering::Relaxed),
            requests_affected: self.requests.load(Ordering::Relaxed),
            refused: 0,
            duplicated: self.duplicated.load(Ordering::Relaxed),
            corrupted: self.corrupted.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
            sliced: self.sliced.load(Ordering::Relaxed),
        }
    }
}

/// One queue and its thread, in one network namespace.
pub(super) struct Lane {
    shared: Arc<LaneShared>,
    thread: Option<JoinHandle<()>>,
    pub(super) queue: u16,
}

impl Lane {
    /// Starts the thread, which enters `netns`, binds a free queue number (not in `taken`)
    /// and reports it.
    /// With `request`, only segments that start with a request it names wait (the rest pass,
    /// behind what their flow has waiting).
    pub(super) fn start(
        netns: Arc<NetNs>,
        action: &Action,
        request: Option<RequestMatch>,
        expires_at_ns: u64,
        taken: BTreeSet<u16>,
        first: u16,
    ) -> Result<Lane, NfqueueError> {
        let schedule = Schedule::new(action, Rng::seeded())?;
        let mut tamper = Tamper::new(action);
        let shared = Arc::new(LaneShared {
            deadline_ns: AtomicU64::new(expires_at_ns),
            stop: AtomicBool::new(false),
            matched: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            sliced: AtomicU64::new(0),
            wake: eventfd().map_err(NfqueueError::Eventfd)?,
        });
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let lane_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("faultd-nfqueue".into())
            .spawn(move || {
                let range = match tamper.whole_packets() {
                    true => COPY_WHOLE,
                    false => COPY_RANGE,
                };
                let opened = open_in(&netns, &taken, first, range).and_then(|opened| {
                    tamper.open().map_err(NfqueueError::RawSocket)?;
                    Ok(opened)
                });
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
                            let what = What {
                                schedule,
                                tamper,
                                request,
                            };
                            serve(queue, fd, what, &lane_shared);
                        }
                    }
                    Err(e) => {
                        let _owner_gone = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(NfqueueError::SpawnLane)?;
        let queue = match ready_rx.recv() {
            Ok(Ok(num)) => num,
            failed => {
                // The thread has ended (or is about to): it holds no queue.
                if thread.join().is_err() {
                    tracing::error!("the NFQUEUE thread panicked while starting");
                }
                return Err(match failed {
                    Ok(Err(e)) => e,
                    _ => NfqueueError::LaneDied,
                });
            }
        };
        Ok(Lane {
            shared,
            thread: Some(thread),
            queue,
        })
    }

    pub(super) fn counters(&self) -> Counters {
        self.shared.counters()
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

/// On the lane's thread: enters `netns`, then opens, binds and configures the queue there.
fn open_in(
    netns: &NetNs,
    taken: &BTreeSet<u16>,
    first: u16,
    range: u16,
) -> Result<(Queue, RawFd, u16), NfqueueError> {
    NetNs::enter(netns.as_fd()).map_err(|source| NfqueueError::EnterNetns {
        netns: netns.path().to_path_buf(),
        source,
    })?;
    tune_thread();
    let (mut queue, fd) = open_queue()?;
    let num = bind_free(&mut queue, taken, first)?;
    configure(&mut queue, num, range)?;
    Ok((queue, fd, num))
}

/// What a lane does to its packets: when they leave (the schedule also says whether the ones
/// held back count as reordered rather than delayed), and what else happens to them.
struct What {
    schedule: Schedule,
    tamper: Tamper,
    /// Only segments starting with these requests wait.
    request: Option<RequestMatch>,
}

/// The lane's loop: read packets, hold them, release them on time.
fn serve(queue: Queue, fd: RawFd, what: What, shared: &LaneShared) {
    let mut server = Server {
        queue,
        fd,
        schedule: what.schedule,
        tamper: what.tamper,
        request: what.request,
        rng: Rng::seeded(),
        shared,
        held: BTreeMap::new(),
        seq: 0,
        errors: 0,
    };
    while server.turn().is_continue() {}
}

/// What the lane's loop holds between turns.
struct Server<'a> {
    queue: Queue,
    fd: RawFd,
    schedule: Schedule,
    /// Only segments starting with these requests wait.
    request: Option<RequestMatch>,
    tamper: Tamper,
    /// For the tamper's choices.
    rng: Rng,
    shared: &'a LaneShared,
    /// Keyed by (release time, arrival sequence): released in order.
    held: BTreeMap<(u64, u64), Message>,
    seq: u64,
    /// Receive errors in a row.
    errors: u32,
}

fn release(queue: &mut Queue, msg: Message) {
    if let Err(e) = queue.verdict(msg) {
        tracing::warn!(error = %e, "NFQUEUE verdict");
    }
}

impl Server<'_> {
    /// One turn: release what is due (everything past the deadline or when stopping), wait
    /// for packets, a wake-up or the next release time, and read what came. Breaks when the
    /// lane ends.
    fn turn(&mut self) -> ControlFlow<()> {
        let now = monotonic_now_ns();
        let deadline = self.shared.deadline_ns.load(Ordering::Acquire);
        let stopping = self.shared.stop.load(Ordering::Acquire);
        if stopping || now >= deadline {
            self.release_all();
            if stopping {
                self.drain();
                return ControlFlow::Break(());
            }
        }
        self.release_due(now);
        if self.poll(now, deadline)? {
            self.read_batch()
        } else {
            ControlFlow::Continue(())
        }
    }

    fn release_all(&mut self) {
        while let Some((_, msg)) = self.held.pop_first() {
            release(&mut self.queue, msg);
        }
    }

    /// The rules are gone by now: what is still queued is released, not dropped with the
    /// socket.
    fn drain(&mut self) {
        loop {
            match self.queue.recv() {
                Ok(msg) => release(&mut self.queue, msg),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn release_due(&mut self, now: u64) {
        while let Some(entry) = self.held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            release(&mut self.queue, entry.remove());
        }
    }

    /// Waits for the queue or the wake-up fd, until the next release time (or the deadline,
    /// if sooner) when packets are held; continues with whether the queue is readable, breaks
    /// when it failed.
    fn poll(&mut self, now: u64, deadline: u64) -> ControlFlow<(), bool> {
        let timeout = self
            .held
            .first_key_value()
            .map(|((at, _), _)| (*at).min(deadline).saturating_sub(now));
        let mut fds = [
            libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Err(e) = wait(&mut fds, timeout) {
            tracing::error!(error = %e, "NFQUEUE wait failed; the queue is closed and traffic bypasses it");
            return ControlFlow::Break(());
        }
        if fds[1].revents != 0 {
            let mut value = 0u64;
            // SAFETY: an 8-byte read from our eventfd; EAGAIN is harmless.
            unsafe { libc::read(self.shared.wake.as_raw_fd(), (&raw mut value).cast(), 8) };
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0 {
            tracing::error!(
                revents = fds[0].revents,
                "the NFQUEUE socket failed; closing it (traffic bypasses it)"
            );
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(fds[0].revents != 0)
    }

    /// Reads up to `READ_BATCH` packets; breaks when the queue keeps failing.
    fn read_batch(&mut self) -> ControlFlow<()> {
        for _ in 0..READ_BATCH {
            let msg = match self.queue.recv() {
                Ok(msg) => msg,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // A verdict for a packet the guard accepted while faultd was stopped.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    self.errors += 1;
                    if self.errors > 1000 {
                        tracing::error!(error = %e, "NFQUEUE keeps failing; closing it (traffic bypasses it)");
                        return ControlFlow::Break(());
                    }
                    tracing::warn!(error = %e, "NFQUEUE receive");
                    break;
                }
            };
            self.errors = 0;
            self.hold(msg);
        }
        ControlFlow::Continue(())
    }

    /// Holds `msg` until its release time; past the lease deadline it goes at once (after
    /// what is held), and beyond `MAX_HELD` it is dropped.
    fn hold(&mut self, mut msg: Message) {
        let shared = self.shared;
        let now = monotonic_now_ns();
        if now >= shared.deadline_ns.load(Ordering::Acquire) {
            // Past the lease deadline: in order, everything goes.
            self.release_all();
            release(&mut self.queue, msg);
            return;
        }
        shared.matched.fetch_add(1, Ordering::Relaxed);
        if let Some(request) = &self.request {
            if !tcp_payload(msg.get_payload()).is_some_and(|p| request.matches(p)) {
                let at = self.schedule.in_order(now, flow_of(msg.get_payload()));
                self.seq += 1;
                self.held.insert((at, self.seq), msg);
                return;
            }
            shared.requests.fetch_add(1, Ordering::Relaxed);
        }
        if self.held.len() >= MAX_HELD {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            msg.set_verdict(Verdict::Drop);
            release(&mut self.queue, msg);
            return;
        }
        // What arrives (INPUT for a cgroup, PREROUTING for an interface) has its own bucket.
        let inbound = [libc::NF_INET_LOCAL_IN, libc::NF_INET_PRE_ROUTING]
            .contains(&i32::from(msg.get_hook()));
        let at = self.schedule.release_at(
            now,
            flow_of(msg.get_payload()),
            msg.get_original_len(),
            inbound,
        );
        match (at > now, self.schedule.reorders()) {
            (true, true) => shared.reordered.fetch_add(1, Ordering::Relaxed),
            (true, false) => shared.delayed.fetch_add(1, Ordering::Relaxed),
            (false, _) => 0,
        };
        match self.tamper.apply(&mut msg, &mut self.rng, now) {
            Done::Duplicated => shared.duplicated.fetch_add(1, Ordering::Relaxed),
            Done::Corrupted => shared.corrupted.fetch_add(1, Ordering::Relaxed),
            Done::Sliced => shared.sliced.fetch_add(1, Ordering::Relaxed),
            Done::Nothing => 0,
        };
        self.seq += 1;
        self.held.insert((at, self.seq), msg);
    }
}
