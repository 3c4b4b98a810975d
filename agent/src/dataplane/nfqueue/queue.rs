//! The queue socket of a lane: opening it (and finding its fd, which `nfq` does not expose),
//! binding a free queue number, waiting on it, and the lane thread's wake-up tuning.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use nfq::Queue;

use super::error::NfqueueError;

/// Bytes of each packet copied to user space: enough for the IPv4/IPv6 and L4 port headers
/// that identify its flow. The packet itself stays in the kernel.
pub(super) const COPY_RANGE: u16 = 128;
/// Kernel queue length; beyond it packets pass undelayed (fail-open).
pub(super) const KERNEL_QUEUE_LEN: u32 = 8192;

/// Queue numbers faultd picks from (per network namespace).
pub(super) const QUEUE_FIRST: u16 = 0x8000;
pub(super) const QUEUE_COUNT: u16 = 0x7fff;

/// Serializes `Queue::open` so that the new netlink socket is the caller's.
pub(super) static OPEN_LOCK: Mutex<()> = Mutex::new(());

/// Inodes of this process's sockets.
pub(super) fn socket_inodes() -> HashSet<u64> {
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

pub(super) fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
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
pub(super) fn open_queue() -> Result<(Queue, RawFd), NfqueueError> {
    let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let before = socket_inodes();
    let queue = Queue::open().map_err(NfqueueError::Open)?;
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
        other => Err(NfqueueError::SocketUnknown(other.len())),
    }
}

/// Binds the first free queue number at or after `first`, skipping `taken`.
pub(super) fn bind_free(
    queue: &mut Queue,
    taken: &BTreeSet<u16>,
    first: u16,
) -> Result<u16, NfqueueError> {
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
            Err(source) => return Err(NfqueueError::Bind { num, source }),
        }
    }
    Err(NfqueueError::NoFreeQueue {
        first: QUEUE_FIRST,
        last: QUEUE_FIRST + QUEUE_COUNT - 1,
        last_error,
    })
}

/// Bytes copied when the lane rewrites or resends packets: all of them.
pub(super) const COPY_WHOLE: u16 = u16::MAX;

pub(super) fn configure(queue: &mut Queue, num: u16, range: u16) -> Result<(), NfqueueError> {
    queue
        .set_copy_range(num, range)
        .and_then(|()| queue.set_fail_open(num, true))
        .and_then(|()| queue.set_queue_max_len(num, KERNEL_QUEUE_LEN))
        .map_err(|source| NfqueueError::Configure { num, source })?;
    queue.set_nonblocking(true);
    Ok(())
}

/// Waits until `fds` are readable or `timeout` passes (None: no timeout).
pub(super) fn wait(fds: &mut [libc::pollfd], timeout: Option<u64>) -> io::Result<()> {
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
pub(super) fn tune_thread() {
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

pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
