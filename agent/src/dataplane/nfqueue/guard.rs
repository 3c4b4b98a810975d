//! The guard of an NFQUEUE lane: while faultd is stopped (SIGSTOP, a debugger), nobody reads
//! its queues, and the packets in them (or held by faultd) would wait until it resumes: a 10 ms
//! delay would become an outage. The kernel's fail-open only helps once the queue is full, which
//! a quiet flow never fills.
//!
//! So each lane forks a small process that shares the lane's netlink socket (a verdict is
//! accepted from any holder of the socket bound to the queue). Every `LOOK_EVERY_MS` it peeks at
//! the first message in the socket; when the same message is still first a look later, nobody
//! read it for that long, and the guard reads faultd's state in `/proc`. While faultd is
//! stopped the guard takes over: it drains the socket as packets come and accepts, with one
//! batch verdict, every packet queued — those faultd had read and was holding too. A stopped
//! faultd thus degrades to "no delay" within two looks of the first packet that waits (a packet
//! faultd held when it stopped goes with the next one, e.g. the flow's TCP retransmission);
//! when faultd resumes, its own verdicts for the packets already accepted fail with ENOENT,
//! which the lane ignores. While faultd runs, the guard costs one peek per look.
//!
//! The guard dies with the lane thread that forked it (PR_SET_PDEATHSIG), so with faultd, and
//! is killed and reaped when the lane ends. Between fork and exit it only makes async-signal-
//! safe system calls on stack buffers: no allocation, no locks, no panics.

use std::io;
use std::os::fd::RawFd;

/// How often the guard looks at the queue (and, while it takes over, at faultd's state).
const LOOK_EVERY_MS: libc::c_int = 20;

/// nfnetlink subsystem and message of a batch verdict (linux/netfilter/nfnetlink*.h).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NF_ACCEPT: u32 = 1;

/// The forked guard of one queue; killed and reaped when dropped.
pub struct Guard {
    pid: libc::pid_t,
}

impl Guard {
    /// Forks the guard of queue `num`, whose netlink socket is `fd`.
    pub fn start(fd: RawFd, num: u16) -> io::Result<Guard> {
        // Everything the child needs is prepared here: after fork it may not allocate.
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let stat = proc_stat_path(parent);
        // SAFETY: the child runs only `watch`, which makes async-signal-safe system calls on
        // stack memory and never returns (it ends with _exit), as POSIX requires after fork in
        // a multi-threaded process.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => watch(fd, num, parent, &stat),
            pid => Ok(Guard { pid }),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on the child this guard forked.
        unsafe {
            if libc::kill(self.pid, libc::SIGKILL) != 0 {
                tracing::warn!(pid = self.pid, error = %io::Error::last_os_error(), "stopping the NFQUEUE guard");
            }
            let mut status = 0;
            if libc::waitpid(self.pid, &mut status, 0) < 0 {
                tracing::warn!(pid = self.pid, error = %io::Error::last_os_error(), "reaping the NFQUEUE guard");
            }
        }
    }
}

/// `/proc/<pid>/stat` as a NUL-terminated path.
fn proc_stat_path(pid: libc::pid_t) -> [u8; 40] {
    let mut path = [0u8; 40];
    let text = format!("/proc/{pid}/stat");
    for (slot, byte) in path.iter_mut().zip(text.bytes()) {
        *slot = byte;
    }
    path
}

/// The guard's life, in the child. Never returns.
fn watch(fd: RawFd, num: u16, parent: libc::pid_t, stat: &[u8; 40]) -> ! {
    // SAFETY (whole function): only async-signal-safe system calls, on stack buffers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        // Hold nothing of faultd's but the queue's socket (listeners, the state lock, ...).
        if fd > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (fd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
        let mut buffer = [0u8; 16 * 1024];
        // The highest packet id seen: a batch verdict up to it plus half the id space covers
        // every packet queued now, whoever read it.
        let mut last_id: u32 = 0;
        // The id of the message first in the socket at the previous look.
        let mut head: Option<u32> = None;
        let mut taking_over = false;
        loop {
            if taking_over {
                // Each packet is accepted as it comes.
                let mut ready = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                libc::poll(&mut ready, 1, LOOK_EVERY_MS);
            } else {
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::c_long::from(LOOK_EVERY_MS) * 1_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
            }
            if libc::getppid() != parent {
                libc::_exit(0);
            }
            if taking_over {
                taking_over = is_stopped(stat);
                if taking_over {
                    drain_and_accept(fd, num, &mut buffer, &mut last_id);
                } else {
                    head = None;
                }
                continue;
            }
            // Cheap while faultd runs: one peek. A message still first a look later was not
            // read for that long; only then is faultd's state read.
            let now = match next_packet(fd, &mut buffer, libc::MSG_PEEK) {
                Some(Some(id)) => Some(id),
                Some(None) | None => None,
            };
            if let Some(id) = now {
                last_id = later(last_id, id);
                if head == Some(id) && is_stopped(stat) {
                    taking_over = true;
                    drain_and_accept(fd, num, &mut buffer, &mut last_id);
                }
            }
            head = now;
        }
    }
}

/// Reads every message in the socket, then accepts every packet queued (those faultd holds
/// included) with one batch verdict.
fn drain_and_accept(fd: RawFd, num: u16, buffer: &mut [u8], last_id: &mut u32) {
    while let Some(id) = next_packet(fd, buffer, 0) {
        if let Some(id) = id {
            *last_id = later(*last_id, id);
        }
    }
    accept_all(fd, num, last_id.wrapping_add(1 << 30));
}

/// The later of two packet ids (they wrap).
fn later(a: u32, b: u32) -> u32 {
    if (b.wrapping_sub(a) as i32) > 0 { b } else { a }
}

/// Whether the process of `stat` is stopped (`T`) or traced (`t`). In doubt, no.
fn is_stopped(stat: &[u8; 40]) -> bool {
    let mut buffer = [0u8; 512];
    // SAFETY: open/read/close on a NUL-terminated path and a stack buffer.
    let n = unsafe {
        let fd = libc::open(stat.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
        libc::close(fd);
        n
    };
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    state_of(buffer.get(..n).unwrap_or(&[])).is_some_and(|state| state == b'T' || state == b't')
}

/// The state letter of a `/proc/PID/stat` line: after the command name's closing parenthesis.
fn state_of(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
}

/// Receives (or peeks at) one datagram: None when there is none, Some(None) when it holds no
/// packet (an error reply), Some(Some(id)) with the highest packet id in it.
fn next_packet(fd: RawFd, buffer: &mut [u8], flags: libc::c_int) -> Option<Option<u32>> {
    // SAFETY: recv into a stack buffer of the given length.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(highest_packet_id(buffer.get(..n)?))
}

/// The highest NFQUEUE packet id among the netlink messages of `datagram`.
fn highest_packet_id(datagram: &[u8]) -> Option<u32> {
    let mut highest = None;
    let mut at = 0usize;
    while let Some(header) = datagram.get(at..at + 16) {
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < 16 {
            break;
        }
        let message = datagram.get(at..at + len).unwrap_or(&[]);
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            // nlmsghdr (16) + nfgenmsg (4), then attributes.
            let mut attr = 20usize;
            while let Some(head) = message.get(attr..attr + 4) {
                let attr_len = u16::from_ne_bytes([head[0], head[1]]) as usize;
                let attr_type = u16::from_ne_bytes([head[2], head[3]]) & 0x3fff;
                if attr_len < 4 {
                    break;
                }
                if attr_type == NFQA_PACKET_HDR
                    && let Some(id) = message.get(attr + 4..attr + 8)
                {
                    let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                    highest = Some(highest.map_or(id, |h| later(h, id)));
                }
                attr += (attr_len + 3) & !3;
            }
        }
        at += (len + 3) & !3;
    }
    highest
}

/// A batch verdict: accept every packet of queue `num` up to `max_id`.
fn batch_accept(num: u16, max_id: u32) -> [u8; 32] {
    let mut message = [0u8; 32];
    // nlmsghdr: length, type, flags (a request), sequence, port id (0: the kernel fills it).
    message[0..4].copy_from_slice(&32u32.to_ne_bytes());
    message[4..6]
        .copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH).to_ne_bytes());
    message[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, the queue number (big-endian).
    message[18..20].copy_from_slice(&num.to_be_bytes());
    // NFQA_VERDICT_HDR { verdict, id }, both big-endian.
    message[20..22].copy_from_slice(&12u16.to_ne_bytes());
    message[22..24].copy_from_slice(&NFQA_VERDICT_HDR.to_ne_bytes());
    message[24..28].copy_from_slice(&NF_ACCEPT.to_be_bytes());
    message[28..32].copy_from_slice(&max_id.to_be_bytes());
    message
}

fn accept_all(fd: RawFd, num: u16, max_id: u32) {
    let message = batch_accept(num, max_id);
    // SAFETY: send of a stack buffer on the queue's socket (to the kernel: no address).
    unsafe {
        libc::send(
            fd,
            message.as_ptr().cast(),
            message.len(),
            libc::MSG_DONTWAIT,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_after_the_command_name() {
        assert_eq!(state_of(b"42 (faultd) T 1 42"), Some(b'T'));
        assert_eq!(state_of(b"42 (a) b) S 1"), Some(b'S'));
        assert_eq!(state_of(b"garbage"), None);
        let own = proc_stat_path(std::process::id() as libc::pid_t);
        assert!(!is_stopped(&own), "this test is running");
    }

    #[test]
    fn finds_the_highest_packet_id_and_builds_a_batch_verdict() {
        // Two packet messages of one datagram, ids 7 and 9, each with NFQA_PACKET_HDR first.
        let packet = |id: u32| {
            let mut m = vec![0u8; 28];
            m[0..4].copy_from_slice(&28u32.to_ne_bytes());
            m[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET).to_ne_bytes());
            m[20..22].copy_from_slice(&8u16.to_ne_bytes());
            m[22..24].copy_from_slice(&NFQA_PACKET_HDR.to_ne_bytes());
            m[24..28].copy_from_slice(&id.to_be_bytes());
            m
        };
        let mut datagram = packet(9);
        datagram.extend(packet(7));
        assert_eq!(highest_packet_id(&datagram), Some(9));
        assert_eq!(highest_packet_id(&[0u8; 10]), None);
        assert_eq!(later(u32::MAX, 2), 2, "ids wrap");

        let verdict = batch_accept(0x8001, 41);
        assert_eq!(u32::from_ne_bytes(verdict[0..4].try_into().unwrap()), 32);
        assert_eq!(
            u16::from_ne_bytes(verdict[4..6].try_into().unwrap()),
            0x0303
        );
        assert_eq!(verdict[18..20], [0x80, 0x01]);
        assert_eq!(verdict[24..32], [0, 0, 0, 1, 0, 0, 0, 41]);
    }
}
