//! The loopback device of a private network namespace, which probes create on a short-lived
//! thread: a new namespace has `lo` down, and a probe needs it up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct ifreq` with the flags member.
#[repr(C)]
struct IfreqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// What failed while bringing `lo` up.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    #[error("socket: {0}")]
    Socket(#[source] io::Error),
    #[error("reading lo's flags: {0}")]
    ReadFlags(#[source] io::Error),
    #[error("bringing lo up: {0}")]
    Up(#[source] io::Error),
}

/// Brings `lo` of the calling thread's network namespace up (a new namespace has it down).
pub fn loopback_up() -> Result<(), LoopbackError> {
    // SAFETY: plain socket(2); the fd is closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(LoopbackError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    for (slot, byte) in request.name.iter_mut().zip(b"lo") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a struct ifreq.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut request) != 0 {
            return Err(LoopbackError::ReadFlags(io::Error::last_os_error()));
        }
        request.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut request) != 0 {
            return Err(LoopbackError::Up(io::Error::last_os_error()));
        }
    }
    Ok(())
}
