//! NFQUEUE: delay and bandwidth on any kernel, in user space.
//!
//! For each fault and each network namespace its workload uses (for a `netns{path, interface}`
//! scope: that namespace, where the rules match the interface), an iptables rule
//! (`netfilter.rs`) sends the matched packets to a queue with `--queue-bypass`, and a dedicated
//! OS thread (a *lane*) bound to that queue holds each packet until its release time, then
//! accepts it. Queues are per network namespace, so the lane opens its netlink socket from
//! inside the rules' namespace:
//! - delay: latency plus a normally distributed part of standard deviation `jitter`, whose
//!   successive values are correlated (a stationary AR(1) process, so the spread stays the
//!   requested one); a later packet of a flow never leaves before an earlier one;
//! - bandwidth: a token bucket per direction (rate, burst).
//!
//! Fail open: if the lane dies or faultd is killed, the kernel frees the queue and
//! `--queue-bypass` lets packets through; the packets held at that moment are lost (TCP
//! retransmits them). A full kernel queue accepts packets too (`fail-open`). The lane also knows
//! the lease deadline: from that instant it releases everything and holds nothing, even if
//! faultd's expiry task is late; the rule itself is removed by the engine, and rules of dead
//! agents are swept when an agent starts or applies a fault in the same namespace.
//!
//! The `nfq` crate does not expose its socket, which a lane needs to wait for "a packet or the
//! next release time" (`ppoll`). `open_queue` finds it: the one new NETLINK_NETFILTER socket
//! that appears in `/proc/self/fd` while the queue is opened under a process-wide lock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use faultd_common::Counters;
use nfq::{Message, Queue, Verdict};

use super::clock::monotonic_now_ns;
use super::netfilter::{self, Family, FaultRules, Hook, Listing, Matcher};
use super::{DataplaneError, Shaped, Shaper, nfqueue_guard};
use crate::fault::{Action, Direction, FaultId, Mechanism, Scope};
use crate::instance::Instance;
use crate::target::namespaces::{self, NetNs};

/// Bytes of each packet copied to user space: enough for the IPv4/IPv6 and L4 port headers
/// that identify its flow. The packet itself stays in the kernel.
const COPY_RANGE: u16 = 128;
/// Kernel queue length; beyond it packets pass undelayed (fail-open).
const KERNEL_QUEUE_LEN: u32 = 8192;
/// Packets a lane holds at most; beyond it new packets are dropped, as netem's and tbf's
/// queue limits do.
const MAX_HELD: usize = 16_384;
/// Queue numbers faultd picks from (per network namespace).
const QUEUE_FIRST: u16 = 0x8000;
const QUEUE_COUNT: u16 = 0x7fff;
/// Messages a lane reads before it releases what is due again.
const READ_BATCH: usize = 256;

fn shaper_error(reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Shaper {
        mechanism: Mechanism::Nfqueue.name(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// When packets leave

/// splitmix64: small, fast, good enough for delays.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let mut bytes = [0u8; 8];
        // SAFETY: getrandom writes at most `len` bytes into the buffer.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let seed = if n == bytes.len() as isize {
            u64::from_le_bytes(bytes)
        } else {
            monotonic_now_ns() ^ u64::from(std::process::id())
        };
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// May go negative: bytes promised to packets that wait.
    tokens: f64,
    last_ns: u64,
}

enum Model {
    Delay {
        latency_ns: f64,
        jitter_ns: f64,
        /// Correlation of successive random parts, 0 to 1.
        rho: f64,
        /// The last standard-normal random part.
        z: f64,
    },
    Pace {
        bytes_per_ns: f64,
        burst: f64,
        /// Outbound, inbound.
        buckets: [Bucket; 2],
    },
}

/// Computes each packet's release time.
struct Schedule {
    model: Model,
    /// Release time of the last packet of each flow, for per-flow order.
    flows: HashMap<u64, u64>,
    rng: Rng,
}

impl Schedule {
    fn new(action: &Action, rng: Rng) -> Result<Schedule, String> {
        let model = match action {
            Action::Delay(delay) => Model::Delay {
                latency_ns: delay.latency.as_nanos() as f64,
                jitter_ns: delay.jitter.as_nanos() as f64,
                rho: delay.correlation / 100.0,
                z: 0.0,
            },
            Action::Bandwidth(bandwidth) => {
                let burst = bandwidth.burst as f64;
                let full = Bucket {
                    tokens: burst,
                    last_ns: 0,
                };
                Model::Pace {
                    bytes_per_ns: bandwidth.rate_bytes_per_sec as f64 / 1e9,
                    burst,
                    buckets: [full; 2],
                }
            }
            other => return Err(format!("NFQUEUE cannot apply {}", other.name())),
        };
        Ok(Schedule {
            model,
            flows: HashMap::new(),
            rng,
        })
    }

    /// When a packet of `len` bytes of `flow` that arrived at `now` may leave.
    fn release_at(&mut self, now: u64, flow: u64, len: usize, inbound: bool) -> u64 {
        let release = match &mut self.model {
            Model::Delay {
                latency_ns,
                jitter_ns,
                rho,
                z,
            } => {
                if *jitter_ns > 0.0 {
                    *z = *rho * *z + (1.0 - *rho * *rho).sqrt() * self.rng.normal();
                }
                let delay = (*latency_ns + *jitter_ns * *z).max(0.0);
                now.saturating_add(delay as u64)
            }
            Model::Pace {
                bytes_per_ns,
                burst,
                buckets,
            } => {
                let bucket = &mut buckets[usize::from(inbound)];
                if bucket.last_ns == 0 {
                    bucket.last_ns = now;
                }
                let elapsed = now.saturating_sub(bucket.last_ns) as f64;
                bucket.tokens = (bucket.tokens + elapsed * *bytes_per_ns).min(*burst);
                bucket.last_ns = now;
                // A packet leaves once the bucket holds all of it, as if it had crossed a link of
                // this rate; tokens beyond the burst accrue only for packets that wait.
                let len = len as f64;
                let wait = if bucket.tokens >= len {
                    0.0
                } else {
                    (len - bucket.tokens) / *bytes_per_ns
                };
                bucket.tokens -= len;
                now.saturating_add(wait.ceil() as u64)
            }
        };
        if self.flows.len() > 4096 {
            self.flows.retain(|_, last| *last > now);
        }
        let last = self.flows.entry(flow).or_insert(0);
        let release = release.max(*last);
        *last = release;
        release
    }
}

/// A hash of the packet's protocol, addresses and ports (0 when it cannot be parsed).
fn flow_of(packet: &[u8]) -> u64 {
    let (protocol, addresses, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (packet[9], &packet[12..20], ihl)
        }
        Some(6) if packet.len() >= 40 => (packet[6], &packet[8..40], 40),
        _ => return 0,
    };
    // FNV-1a over what identifies the flow.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut add = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    add(&[protocol]);
    add(addresses);
    if matches!(protocol, 6 | 17)
        && let Some(ports) = packet.get(l4..l4 + 4)
    {
        add(ports);
    }
    hash
}

// ---------------------------------------------------------------------------------------------
// The queue socket

/// Serializes `Queue::open` so that the new netlink socket is the caller's.
static OPEN_LOCK: Mutex<()> = Mutex::new(());

/// Inodes of this process's sockets.
fn socket_inodes() -> HashSet<u64> {
    fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let link = fs::read_link(entry.path()).ok()?;
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int of the given size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Opens an NFQUEUE netlink socket in the calling thread's network namespace, and finds its fd.
fn open_queue() -> Result<(Queue, RawFd), String> {
    let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let before = socket_inodes();
    let queue = Queue::open().map_err(|e| format!("opening an NFQUEUE netlink socket: {e}"))?;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let Ok(meta) = fs::metadata(entry.path()) else {
            continue;
        };
        if before.contains(&meta.ino())
            || socket_option(fd, libc::SO_DOMAIN) != Some(libc::AF_NETLINK)
            || socket_option(fd, libc::SO_PROTOCOL) != Some(libc::NETLINK_NETFILTER)
        {
            continue;
        }
        found.push(fd);
    }
    match found.as_slice() {
        [fd] => Ok((queue, *fd)),
        other => Err(format!(
            "cannot tell the NFQUEUE socket apart ({} new netfilter netlink sockets)",
            other.len()
        )),
    }
}

/// Binds the first free queue number at or after `first`, skipping `taken`.
fn bind_free(queue: &mut Queue, taken: &BTreeSet<u16>, first: u16) -> Result<u16, String> {
    let mut last_error = None;
    for i in 0..QUEUE_COUNT {
        let num = QUEUE_FIRST + (first.wrapping_sub(QUEUE_FIRST).wrapping_add(i) % QUEUE_COUNT);
        if taken.contains(&num) {
            continue;
        }
        match queue.bind(num) {
            Ok(()) => return Ok(num),
            // Bound by another socket (EPERM), or already by this one (EBUSY).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EBUSY)) => {
                last_error = Some(e);
            }
            Err(e) => return Err(format!("binding NFQUEUE {num}: {e}")),
        }
    }
    Err(format!(
        "no free NFQUEUE number in {QUEUE_FIRST}..{} (last error: {last_error:?})",
        QUEUE_FIRST + QUEUE_COUNT - 1
    ))
}

fn configure(queue: &mut Queue, num: u16) -> Result<(), String> {
    queue
        .set_copy_range(num, COPY_RANGE)
        .and_then(|()| queue.set_fail_open(num, true))
        .and_then(|()| queue.set_queue_max_len(num, KERNEL_QUEUE_LEN))
        .map_err(|e| format!("configuring NFQUEUE {num}: {e}"))?;
    queue.set_nonblocking(true);
    Ok(())
}

/// Waits until `fds` are readable or `timeout` passes (None: no timeout).
fn wait(fds: &mut [libc::pollfd], timeout: Option<u64>) -> io::Result<()> {
    let spec = timeout.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let spec_ptr = spec
        .as_ref()
        .map_or(std::ptr::null(), |s| s as *const libc::timespec);
    // SAFETY: valid pollfd array and optional timespec; no signal mask change.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            spec_ptr,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Precise wake-ups for the lane thread: no timer slack, and the lowest real-time priority
/// (SCHED_FIFO 1), so that a busy machine does not add its run-queue wait to the delay. The
/// thread sleeps in `ppoll` between packets and does little work per packet; the kernel's
/// real-time throttling bounds it anyway. Falls back to nice -10 where real-time is refused.
fn tune_thread() {
    // SAFETY: prctl, sched_setscheduler and setpriority on the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0);
        let param = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 {
            return;
        }
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10) != 0 {
            tracing::debug!(
                error = %io::Error::last_os_error(),
                "raising the NFQUEUE thread's priority"
            );
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------------
// Lanes

/// What a lane and its owner share.
struct LaneShared {
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

    fn counters(&self) -> Counters {
        Counters {
            matched: self.matched.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            refused: 0,
        }
    }
}

/// One queue and its thread, in one network namespace.
struct Lane {
    shared: Arc<LaneShared>,
    thread: Option<JoinHandle<()>>,
    queue: u16,
}

impl Lane {
    /// Starts the thread, which enters `netns`, binds a free queue number (not in `taken`)
    /// and reports it.
    fn start(
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
                        let _guard = nfqueue_guard::Guard::start(fd, num)
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

    fn refresh(&self, expires_at_ns: u64) {
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

    fn join(&mut self) {
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

// ---------------------------------------------------------------------------------------------
// Background netfilter work

type Job = Box<dyn FnOnce() + Send>;

/// One thread runs every iptables call in order, so a removal queued in the background is done
/// before the next fault's rules are computed.
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start() -> io::Result<Worker> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("faultd-netfilter".into())
            .spawn(move || {
                for job in inbox {
                    job();
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(Box::new(job)));
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!("the netfilter worker is gone; a clean-up was skipped");
        }
    }

    /// Runs `job` after everything queued before it and returns its result.
    fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.spawn(move || {
            let _caller_gone = tx.send(job());
        });
        rx.recv()
            .map_err(|_| "the netfilter worker is gone".to_string())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the netfilter worker panicked");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probe

/// What the start-up probe found: the address families whose whole path works.
#[derive(Clone, Debug)]
pub struct Probe {
    pub families: Result<Vec<Family>, String>,
    /// Human-readable detail per family.
    pub detail: String,
}

/// Proves the mechanism end to end in a private network namespace (on a short-lived thread,
/// so nothing on the host is touched): binds a queue, installs a fault's rules with
/// iptables-restore (cgroup, multiport, conntrack marks, NFQUEUE), and sees a UDP request and
/// its reply go through the queue on egress and on ingress.
pub fn probe(instance: &str) -> Probe {
    let instance = instance.to_owned();
    let result = std::thread::Builder::new()
        .name("faultd-probe-nfqueue".into())
        .spawn(move || probe_in_private_netns(&instance))
        .map_err(|e| format!("spawning the probe thread: {e}"))
        .and_then(|thread| {
            thread
                .join()
                .map_err(|_| "the NFQUEUE probe panicked".to_string())
        });
    let per_family = match result {
        Ok(per_family) => per_family,
        Err(e) => {
            return Probe {
                families: Err(e.clone()),
                detail: e,
            };
        }
    };
    let works: Vec<Family> = per_family
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(f, _)| *f)
        .collect();
    let detail = per_family
        .iter()
        .map(|(family, r)| match r {
            Ok(()) => format!(
                "{}: queued and released a test packet both ways",
                family.name()
            ),
            Err(e) => format!("{}: {e}", family.name()),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let families = match (works.contains(&Family::V4), per_family.first()) {
        (true, _) => Ok(works),
        (false, Some((_, Err(e)))) => Err(e.clone()),
        (false, _) => Err(detail.clone()),
    };
    Probe { families, detail }
}

fn probe_in_private_netns(instance: &str) -> Vec<(Family, Result<(), String>)> {
    // SAFETY: unshare on this thread only (network namespaces are per thread).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = format!(
            "creating a private network namespace: {}",
            io::Error::last_os_error()
        );
        return Family::ALL.iter().map(|f| (*f, Err(e.clone()))).collect();
    }
    let setup = (|| {
        super::qdisc_probe::loopback_up()?;
        let netns = NetNs::current().map_err(|e| format!("opening our namespace: {e}"))?;
        let (mut queue, fd) = open_queue()?;
        let num = bind_free(&mut queue, &BTreeSet::new(), QUEUE_FIRST)?;
        configure(&mut queue, num)?;
        Ok::<_, String>((netns, queue, fd, num))
    })();
    let (netns, mut queue, fd, num) = match setup {
        Ok(parts) => parts,
        Err(e) => return Family::ALL.iter().map(|f| (*f, Err(e.clone()))).collect(),
    };
    Family::ALL
        .iter()
        .map(|family| {
            let result = probe_family(*family, instance, &netns, &mut queue, fd, num);
            (*family, result)
        })
        .collect()
}

fn probe_family(
    family: Family,
    instance: &str,
    netns: &NetNs,
    queue: &mut Queue,
    fd: RawFd,
    num: u16,
) -> Result<(), String> {
    use std::net::{SocketAddr, UdpSocket};
    let ports = [crate::fault::PortRange { first: 9, last: 9 }];
    let rules = FaultRules {
        instance: instance.into(),
        fault: "probe".into(),
        matcher: Matcher::Cgroup("/".into()),
        protocol: crate::fault::Protocol::Udp,
        direction: Direction::Both,
        ports: ports.to_vec(),
        queue: num,
        mark_id: Some(1),
        until: Some(backstop_until(monotonic_now_ns() + 3_600_000_000_000)),
        peers: None,
    };
    let mut lines = netfilter::chain_creation(instance, &rules.hooks());
    lines.extend(rules.lines(family));
    netfilter::restore(family, Some(netns), &lines)?;
    let loopback: std::net::IpAddr = match family {
        Family::V4 => std::net::Ipv4Addr::LOCALHOST.into(),
        Family::V6 => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    let (server, client) = (SocketAddr::new(loopback, 9), SocketAddr::new(loopback, 0));
    fn io(what: &'static str) -> impl Fn(io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let server_socket = UdpSocket::bind(server).map_err(io("binding the probe server"))?;
    let client_socket = UdpSocket::bind(client).map_err(io("binding the probe client"))?;
    for socket in [&server_socket, &client_socket] {
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(io("socket timeout"))?;
    }
    client_socket
        .send_to(b"faultd probe", server)
        .map_err(io("sending the probe request"))?;
    let mut hooks = Vec::new();
    let pass = |queue: &mut Queue, hooks: &mut Vec<u8>| -> Result<(), String> {
        let mut fds = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        wait(&mut fds, Some(1_000_000_000)).map_err(io("waiting for the queue"))?;
        let msg = queue
            .recv()
            .map_err(|e| format!("no packet reached the queue within 1 s: {e}"))?;
        hooks.push(msg.get_hook());
        queue.verdict(msg).map_err(io("verdict"))
    };
    pass(queue, &mut hooks)?;
    let mut buf = [0u8; 64];
    let (_, from) = server_socket
        .recv_from(&mut buf)
        .map_err(io("the probe request did not arrive after its verdict"))?;
    server_socket
        .send_to(b"faultd probe reply", from)
        .map_err(io("sending the probe reply"))?;
    pass(queue, &mut hooks)?;
    pass(queue, &mut hooks)?;
    client_socket
        .recv_from(&mut buf)
        .map_err(io("the probe reply did not arrive after its verdict"))?;
    let inbound = libc::NF_INET_LOCAL_IN as u8;
    if !hooks.contains(&inbound) {
        return Err(format!(
            "the reply on a marked connection was not queued on INPUT (hooks seen: {hooks:?})"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The mechanism

/// A fault's lane and rules in one network namespace.
struct Placement {
    netns: Arc<NetNs>,
    lane: Lane,
    rules: FaultRules,
    /// The `-A` lines in force per family (they change with the deadline), for their removal.
    lines: Vec<(Family, Vec<String>)>,
}

/// Seconds the kernel-side deadline (`-m time --datestop`) may trail the lease deadline: the
/// rule is rewritten in the background on each renewal, and must not lapse before it.
const BACKSTOP_MARGIN_SECS: u64 = 1;

/// The last Unix second in which the rules of a fault with this deadline (CLOCK_MONOTONIC ns)
/// queue packets.
fn backstop_until(expires_at_ns: u64) -> u64 {
    let left = expires_at_ns.saturating_sub(monotonic_now_ns());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // The rule matches through this whole second: it ends 1 to 2 s after the deadline.
    (now + Duration::from_nanos(left)).as_secs() + BACKSTOP_MARGIN_SECS
}

pub struct NfqueueShaper {
    instance: String,
    cgroup_root: PathBuf,
    /// `<state dir>/nfqueue-netns`: namespaces this agent put rules in, so that its successor
    /// on the same state directory sweeps them after a crash.
    record: PathBuf,
    own_netns: Arc<NetNs>,
    families: Result<Vec<Family>, String>,
    faults: HashMap<FaultId, Vec<Placement>>,
    /// Faults per namespace (by inode): the chains go with the last one.
    in_use: HashMap<u64, usize>,
    recorded: BTreeSet<u64>,
    next_queue: u16,
    worker: Worker,
}

impl NfqueueShaper {
    /// Sweeps what dead agents left in faultd's own network namespace and in the ones the
    /// previous agent on this state directory recorded, then serves with the families the
    /// probe proved (`families`).
    pub fn start(
        instance: &str,
        cgroup_root: &Path,
        state_dir: &Path,
        families: Result<Vec<Family>, String>,
    ) -> Result<NfqueueShaper, DataplaneError> {
        let own_netns = Arc::new(
            NetNs::current().map_err(|e| shaper_error(format!("opening our namespace: {e}")))?,
        );
        let record = state_dir.join("nfqueue-netns");
        let mut namespaces = vec![own_netns.clone()];
        let previous = fs::read_to_string(&record).unwrap_or_default();
        for inode in previous.split_whitespace().filter_map(|w| w.parse().ok()) {
            if inode != own_netns.inode()
                && let Some(netns) = namespaces::find(inode)
            {
                namespaces.push(Arc::new(netns));
            }
        }
        let own_id = instance.to_owned();
        for netns in &namespaces {
            for family in Family::ALL {
                // A chain named after our own id can only be a dead namesake's.
                match sweep(family, netns, |owner| {
                    owner == own_id || !Instance::is_alive(owner)
                }) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        netns = %netns.path().display(), family = family.name(), agents = n,
                        "removed NFQUEUE rules of agents that are gone"
                    ),
                    Err(e) => {
                        tracing::warn!(netns = %netns.path().display(), family = family.name(),
                        error = %e, "sweeping NFQUEUE rules of agents that are gone")
                    }
                }
            }
        }
        fs::write(&record, "")
            .map_err(|e| shaper_error(format!("writing {}: {e}", record.display())))?;
        Ok(NfqueueShaper {
            next_queue: QUEUE_FIRST
                + (u16::from_str_radix(&own_id[..4], 16).unwrap_or(0) % QUEUE_COUNT),
            instance: own_id,
            cgroup_root: cgroup_root.to_path_buf(),
            record,
            own_netns,
            families,
            faults: HashMap::new(),
            in_use: HashMap::new(),
            recorded: BTreeSet::new(),
            worker: Worker::start()
                .map_err(|e| shaper_error(format!("starting the netfilter worker: {e}")))?,
        })
    }

    fn record_netns(&mut self, inode: u64) {
        if self.recorded.insert(inode) {
            let text: Vec<String> = self.recorded.iter().map(u64::to_string).collect();
            if let Err(e) = fs::write(&self.record, text.join("\n") + "\n") {
                tracing::warn!(error = %e, path = %self.record.display(),
                    "recording a namespace for the next agent's sweep");
            }
        }
    }

    /// The namespaces the fault applies in: an interface scope's own (the lane's queue socket
    /// is opened there, since NFQUEUE is per network namespace), else those of the cgroup's
    /// processes.
    fn namespaces_of(&self, fault: &Shaped<'_>) -> Result<Vec<Arc<NetNs>>, DataplaneError> {
        match &fault.target.scope {
            Scope::Host => return Ok(vec![self.own_netns.clone()]),
            Scope::Netns { path, .. } => {
                let netns = NetNs::open(Path::new(path))
                    .map_err(|e| shaper_error(format!("opening {path}: {e}")))?;
                return Ok(vec![Arc::new(netns)]);
            }
            _ => {}
        }
        let dir = self
            .cgroup_root
            .join(fault.resolved.cgroup_path.trim_start_matches('/'));
        let found = namespaces::of_cgroup(&dir);
        if found.is_empty() {
            tracing::info!(cgroup = %fault.resolved.cgroup_path,
                "no process in the cgroup yet: delaying in faultd's own network namespace");
            return Ok(vec![self.own_netns.clone()]);
        }
        Ok(found.into_iter().map(Arc::new).collect())
    }

    fn place(
        &mut self,
        fault: &Shaped<'_>,
        matcher: &Matcher,
        netns: Arc<NetNs>,
        families: &[Family],
    ) -> Result<Placement, DataplaneError> {
        let instance = self.instance.clone();
        let lookup = netns.clone();
        let fams = families.to_vec();
        // Listing (and sweeping the dead) runs after any clean-up still queued.
        let listings = self
            .worker
            .call(move || {
                fams.iter()
                    .map(|family| {
                        let listing = netfilter::list(*family, Some(&lookup))?;
                        for owner in listing.owners() {
                            if owner != instance && !Instance::is_alive(&owner) {
                                netfilter::restore(
                                    *family,
                                    Some(&lookup),
                                    &listing.removal(&owner),
                                )?;
                            }
                        }
                        Ok((*family, listing))
                    })
                    .collect::<Result<Vec<(Family, Listing)>, String>>()
            })
            .and_then(|r| r)
            .map_err(shaper_error)?;
        let mut taken = BTreeSet::new();
        let mut marks = BTreeSet::new();
        for (_, listing) in &listings {
            taken.extend(listing.queues());
            marks.extend(listing.mark_ids());
        }
        // Only a cgroup's ingress needs a conntrack mark (an interface's has its own hook).
        let ingress = matches!(fault.target.direction, Direction::Ingress | Direction::Both);
        let mark_id = match ingress && matches!(matcher, Matcher::Cgroup(_)) {
            false => None,
            true => Some(
                (1..=netfilter::MAX_MARK_ID)
                    .find(|id| !marks.contains(id))
                    .ok_or_else(|| DataplaneError::Exhausted {
                        mechanism: Mechanism::Nfqueue.name(),
                        reason: format!(
                            "all {} connection-mark ids for ingress faults are in use in this \
                             network namespace",
                            netfilter::MAX_MARK_ID
                        ),
                    })?,
            ),
        };
        let lane = Lane::start(
            netns.clone(),
            fault.action,
            fault.expires_at_ns,
            taken,
            self.next_queue,
        )
        .map_err(shaper_error)?;
        self.next_queue = QUEUE_FIRST + (lane.queue - QUEUE_FIRST + 1) % QUEUE_COUNT;
        let rules = FaultRules {
            instance: self.instance.clone(),
            fault: fault.id.clone(),
            matcher: matcher.clone(),
            protocol: fault.target.protocol,
            direction: fault.target.direction,
            ports: fault.target.ports.clone(),
            queue: lane.queue,
            mark_id,
            until: Some(backstop_until(fault.expires_at_ns)),
            peers: fault
                .target
                .peer_set()
                .map_err(|e| shaper_error(e.reason))?,
        };
        // Per family, the restore lines: the agent's chains this fault needs and lacks, then
        // the fault's own chains and rules.
        let batches: Vec<(Family, Vec<String>)> = listings
            .iter()
            .map(|(family, listing)| {
                let missing: Vec<Hook> = rules
                    .hooks()
                    .into_iter()
                    .filter(|hook| !listing.has_chain(&netfilter::chain(&self.instance, *hook)))
                    .collect();
                let mut lines = netfilter::chain_creation(&self.instance, &missing);
                lines.extend(rules.setup(*family));
                lines.extend(rules.lines(*family));
                (*family, lines)
            })
            .collect();
        self.record_netns(netns.inode());
        let apply_ns = netns.clone();
        let apply = batches.clone();
        let applied = self
            .worker
            .call(move || {
                let mut done: Vec<&(Family, Vec<String>)> = Vec::new();
                for batch in &apply {
                    let (family, lines) = batch;
                    if let Err(e) = netfilter::restore(*family, Some(&apply_ns), lines) {
                        // All or nothing: take out what the other family got.
                        for (family, lines) in done {
                            let undone = netfilter::restore(
                                *family,
                                Some(&apply_ns),
                                &netfilter::undo(lines),
                            );
                            if let Err(e) = undone {
                                tracing::warn!(error = %e, "undoing NFQUEUE rules");
                            }
                        }
                        return Err(format!("{} rules: {e}", family.name()));
                    }
                    done.push(batch);
                }
                Ok(())
            })
            .and_then(|r| r);
        if let Err(e) = applied {
            // The lane goes (Drop) and with it the queue.
            return Err(shaper_error(e));
        }
        let lines = batches
            .iter()
            .map(|(family, _)| (*family, rules.lines(*family)))
            .collect();
        Ok(Placement {
            netns,
            lane,
            rules,
            lines,
        })
    }

    /// Stops delaying at once (the lane passes everything from now on); the rules go in the
    /// background, then the lane, so that no packet is left in a queue nobody reads.
    fn unplace(&mut self, placement: Placement) {
        placement.lane.refresh(0);
        let inode = placement.netns.inode();
        let last = match self.in_use.get_mut(&inode) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                self.in_use.remove(&inode);
                true
            }
        };
        let instance = self.instance.clone();
        self.worker.spawn(move || {
            let Placement {
                netns,
                mut lane,
                rules,
                lines,
            } = placement;
            for (family, lines) in &lines {
                let mut own = netfilter::deletion(lines);
                own.extend(rules.teardown(*family));
                if let Err(e) = netfilter::restore(*family, Some(&netns), &own) {
                    tracing::warn!(error = %e, netns = %netns.path().display(), "removing NFQUEUE rules");
                }
                if last {
                    let removed = netfilter::list(*family, Some(&netns)).and_then(|listing| {
                        netfilter::restore(*family, Some(&netns), &listing.removal(&instance))
                    });
                    if let Err(e) = removed {
                        tracing::warn!(error = %e, netns = %netns.path().display(), "removing faultd's chains");
                    }
                }
            }
            lane.join();
        });
    }
}

/// Removes the chains of every owner `dead` says is gone; returns how many owners.
fn sweep(family: Family, netns: &NetNs, dead: impl Fn(&str) -> bool) -> Result<usize, String> {
    let listing = netfilter::list(family, Some(netns))?;
    let mut swept = 0;
    for owner in listing.owners() {
        if dead(&owner) {
            netfilter::restore(family, Some(netns), &listing.removal(&owner))?;
            swept += 1;
        }
    }
    Ok(swept)
}

impl Shaper for NfqueueShaper {
    fn mechanism(&self) -> Mechanism {
        Mechanism::Nfqueue
    }

    fn unavailable(&self, action: &Action) -> Option<String> {
        match (action, &self.families) {
            (Action::Delay(_) | Action::Bandwidth(_), Ok(_)) => None,
            (Action::Delay(_) | Action::Bandwidth(_), Err(e)) => Some(e.clone()),
            (other, _) => Some(format!("NFQUEUE does not apply {}", other.name())),
        }
    }

    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        let families = self
            .families
            .clone()
            .map_err(|e| DataplaneError::Unsupported {
                mechanism: Mechanism::Nfqueue.name(),
                reason: e,
            })?;
        let matcher = match &fault.target.scope {
            Scope::Netns { interface, .. } => netfilter::check_interface(interface)
                .map(|()| Matcher::Interface(interface.clone())),
            // xt_cgroup resolves the path from iptables' cgroup namespace root, which need not
            // be `--cgroup-root`.
            _ => crate::target::namespace_path(&fault.resolved.dir).and_then(|path| {
                netfilter::check_cgroup_path(&path).map(|()| Matcher::Cgroup(path))
            }),
        }
        .map_err(|reason| DataplaneError::Unsupported {
            mechanism: Mechanism::Nfqueue.name(),
            reason,
        })?;
        let mut placements = Vec::new();
        for netns in self.namespaces_of(fault)? {
            match self.place(fault, &matcher, netns.clone(), &families) {
                Ok(placement) => {
                    *self.in_use.entry(netns.inode()).or_insert(0) += 1;
                    tracing::info!(fault = %fault.id, queue = placement.lane.queue,
                        netns = %netns.path().display(), "NFQUEUE rules in place");
                    placements.push(placement);
                }
                Err(e) => {
                    for placement in placements {
                        self.unplace(placement);
                    }
                    return Err(e);
                }
            }
        }
        self.faults.insert(fault.id.clone(), placements);
        Ok(())
    }

    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError> {
        let until = backstop_until(expires_at_ns);
        for placement in self.faults.get_mut(id).into_iter().flatten() {
            placement.lane.refresh(expires_at_ns);
            if placement.rules.until == Some(until) {
                continue;
            }
            // The kernel-side deadline moves with the lease, in one transaction per family.
            placement.rules.until = Some(until);
            let mut swaps = Vec::new();
            for (family, lines) in &mut placement.lines {
                let fresh = placement.rules.lines(*family);
                let mut swap = netfilter::deletion(lines);
                swap.extend(fresh.iter().cloned());
                *lines = fresh;
                swaps.push((*family, swap));
            }
            let netns = placement.netns.clone();
            self.worker.spawn(move || {
                for (family, swap) in swaps {
                    if let Err(e) = netfilter::restore(family, Some(&netns), &swap) {
                        // The rule keeps its earlier end: the fault can only end sooner.
                        tracing::warn!(error = %e, "moving the NFQUEUE rules' deadline");
                    }
                }
            });
        }
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<(), DataplaneError> {
        for placement in self.faults.remove(id).unwrap_or_default() {
            self.unplace(placement);
        }
        Ok(())
    }

    fn counters(&self, id: &str) -> Result<Counters, DataplaneError> {
        Ok(self
            .faults
            .get(id)
            .into_iter()
            .flatten()
            .map(|p| p.lane.shared.counters())
            .fold(Counters::default(), |sum, c| Counters {
                matched: sum.matched + c.matched,
                dropped: sum.dropped + c.dropped,
                delayed: sum.delayed + c.delayed,
                refused: 0,
            }))
    }

    fn flush(&mut self) {
        if let Err(e) = self.worker.call(|| ()) {
            tracing::warn!(error = %e, "waiting for NFQUEUE clean-up");
        }
        if self.faults.is_empty() {
            // Nothing of ours is left anywhere: the next agent has nothing to sweep.
            self.recorded.clear();
            if let Err(e) = fs::write(&self.record, "") {
                tracing::debug!(error = %e, "clearing the namespace record");
            }
        }
    }
}

impl Drop for NfqueueShaper {
    fn drop(&mut self) {
        let ids: Vec<FaultId> = self.faults.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id) {
                tracing::warn!(error = %e, "reverting an NFQUEUE fault at exit");
            }
        }
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::Action;

    const MS: u64 = 1_000_000;

    fn delay(latency_ms: u64, jitter_ms: u64, correlation: f64) -> Schedule {
        let action = Action::delay(
            Duration::from_millis(latency_ms),
            Duration::from_millis(jitter_ms),
            correlation,
            None,
            "f",
        )
        .unwrap();
        Schedule::new(&action, Rng(42)).unwrap()
    }

    fn stats(values: &[f64]) -> (f64, f64) {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn a_fixed_delay_is_exact() {
        let mut schedule = delay(100, 0, 0.0);
        for i in 0..10 {
            let now = 1_000 * MS + i * 7 * MS;
            assert_eq!(schedule.release_at(now, i, 100, false), now + 100 * MS);
        }
    }

    #[test]
    fn jitter_has_the_requested_spread_with_or_without_correlation() {
        for correlation in [0.0, 25.0, 75.0] {
            let mut schedule = delay(50, 20, correlation);
            let samples: Vec<f64> = (0..20_000u64)
                .map(|i| {
                    let now = i * 1000 * MS;
                    (schedule.release_at(now, i, 100, false) - now) as f64 / MS as f64
                })
                .collect();
            let (mean, sd) = stats(&samples);
            assert!(
                (mean - 50.0).abs() < 1.0,
                "correlation {correlation}: mean {mean}"
            );
            assert!(
                (sd - 20.0).abs() < 1.0,
                "correlation {correlation}: sd {sd}"
            );
            let lag1 = samples
                .windows(2)
                .map(|w| (w[0] - mean) * (w[1] - mean))
                .sum::<f64>()
                / ((samples.len() - 1) as f64 * sd * sd);
            assert!(
                (lag1 - correlation / 100.0).abs() < 0.05,
                "correlation {correlation}: measured {lag1}"
            );
        }
    }

    #[test]
    fn a_flow_keeps_its_order() {
        let mut schedule = delay(10, 50, 0.0);
        let mut last = 0;
        for i in 0..1000u64 {
            let at = schedule.release_at(i * MS / 10, 7, 100, false);
            assert!(at >= last, "packet {i} would overtake the one before it");
            last = at;
        }
    }

    #[test]
    fn pacing_holds_the_rate_and_lets_a_burst_through() {
        let action = Action::bandwidth(256 * 1024, 0, None, "f").unwrap();
        let mut schedule = Schedule::new(&action, Rng(1)).unwrap();
        // 1 MiB in 64 KiB segments, all at once.
        let start = 5_000 * MS;
        let mut last = 0;
        for i in 0..16 {
            last = schedule.release_at(start, i, 65_536, true);
        }
        let seconds = (last - start) as f64 / 1e9;
        // The last segment leaves once all 16 have crossed the "link", less the first burst.
        let expected = (16.0 * 65_536.0 - 2621.0) / 262_144.0;
        assert!(
            (seconds - expected).abs() < 0.001,
            "{seconds} vs {expected}"
        );
        // The other direction has its own bucket.
        assert_eq!(schedule.release_at(start, 99, 1000, false), start);
        // Small packets spaced wider than the rate are never held.
        let action = Action::bandwidth(1_000_000, 0, None, "f").unwrap();
        let mut schedule = Schedule::new(&action, Rng(1)).unwrap();
        for i in 0..100 {
            let now = start + i * 10 * MS;
            assert_eq!(schedule.release_at(now, 1, 1500, false), now);
        }
    }

    #[test]
    fn flows_are_told_apart_by_addresses_and_ports() {
        let mut v4 = vec![0u8; 40];
        v4[0] = 0x45;
        v4[9] = 6;
        v4[12..20].copy_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        v4[20..24].copy_from_slice(&[0x18, 0xeb, 0xc3, 0x50]);
        let mut other = v4.clone();
        other[21] = 0xec;
        assert_ne!(flow_of(&v4), flow_of(&other));
        assert_eq!(flow_of(&v4), flow_of(&v4.clone()));
        assert_eq!(flow_of(&[]), 0);
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 17;
        assert_ne!(flow_of(&v6), 0);
    }
}
