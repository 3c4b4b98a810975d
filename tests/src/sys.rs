//! Small syscalls the harness and its helper binaries (fd-probe, fd-bench) share.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

/// Puts process `pid` (0: this one) at the lowest real-time priority (SCHED_FIFO 1), else at
/// nice -10: on a busy machine a measurement is then about the network, not about when a
/// process got a CPU. nice alone does not reach across autogroups (other sessions' builds).
pub fn prioritize(pid: u32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on a process of ours with a valid parameter.
    if unsafe { libc::sched_setscheduler(pid as libc::pid_t, libc::SCHED_FIFO, &param) } == 0 {
        return Ok(());
    }
    // SAFETY: setpriority on a process of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, -10) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the socket's receive buffer to `bytes` past the rmem_max limit (SO_RCVBUFFORCE, root),
/// so that a receiver descheduled for a while loses nothing.
pub fn force_receive_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
