//! The sock_diag wire format: netlink requests to dump and destroy TCP sockets, and the
//! parsing of their answers (uapi layouts of linux/sock_diag.h and linux/inet_diag.h).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

// uapi constants (linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h).
pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(super) const SOCK_DESTROY: u16 = 21;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const INET_DIAG_INFO: u16 = 2;
pub(super) const INET_DIAG_CGROUP_ID: u16 = 21;
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const REQ_LEN: usize = 56;
pub(super) const MSG_LEN: usize = 72;
/// tcp_info: offsets of tcpi_bytes_acked and tcpi_bytes_received (Linux >= 4.1 / 4.2).
pub(super) const TCPI_BYTES_ACKED: usize = 120;
pub(super) const TCPI_BYTES_RECEIVED: usize = 128;
/// Connection states worth tearing down: everything but LISTEN, CLOSE and TIME_WAIT.
pub(super) const TCP_STATES: u32 = (1 << 1) // ESTABLISHED
    | (1 << 2) // SYN_SENT
    | (1 << 3) // SYN_RECV
    | (1 << 4) // FIN_WAIT1
    | (1 << 5) // FIN_WAIT2
    | (1 << 8) // CLOSE_WAIT
    | (1 << 9) // LAST_ACK
    | (1 << 11); // CLOSING

/// The parts of `inet_diag_msg` we use, and its raw socket id for SOCK_DESTROY.
#[derive(Clone, Copy, Debug)]
pub(super) struct DiagMsg {
    pub(super) family: u8,
    pub(super) sport: u16,
    pub(super) dport: u16,
    /// `inet_diag_sockid` as the kernel sent it (48 bytes).
    pub(super) id: [u8; 48],
}

#[derive(Default)]
pub(super) struct DiagAttrs {
    pub(super) cgroup_id: Option<u64>,
    pub(super) bytes: Option<u64>,
}

pub(super) fn request(
    kind: u16,
    flags: u16,
    family: u8,
    ext: u8,
    states: u32,
    id: &[u8; 48],
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // seq
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    buf.push(family);
    buf.push(libc::IPPROTO_TCP as u8);
    buf.push(ext);
    buf.push(0);
    buf.extend_from_slice(&states.to_ne_bytes());
    buf.extend_from_slice(id);
    buf
}

pub(super) fn send(socket: &OwnedFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl zeroed is the kernel's address.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address for the duration of the call.
    let n = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn recv(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(super) fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

pub(super) fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

pub(super) fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// The errno of an NLMSG_ERROR payload (0 is an ack).
pub(super) fn nl_error(payload: &[u8]) -> io::Result<()> {
    if payload.len() < 4 {
        return Err(io::Error::other("short netlink error message"));
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// Walks the messages of one datagram; `each` gets (type, payload) and says whether to go on.
pub(super) fn messages(
    buf: &[u8],
    mut each: impl FnMut(u16, &[u8]) -> io::Result<bool>,
) -> io::Result<bool> {
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(io::Error::other("malformed netlink message"));
        }
        let kind = u16_at(buf, at + 4);
        if !each(kind, &buf[at + NLMSG_HDRLEN..at + len])? {
            return Ok(false);
        }
        at += (len + 3) & !3;
    }
    Ok(true)
}

/// Dumps the TCP sockets of one family in the socket's namespace.
pub(super) fn dump(
    socket: &OwnedFd,
    family: u8,
    with_info: bool,
    mut each: impl FnMut(&DiagMsg, &DiagAttrs),
) -> io::Result<()> {
    let ext = if with_info {
        1 << (INET_DIAG_INFO - 1)
    } else {
        0
    };
    send(
        socket,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            ext,
            TCP_STATES,
            &[0; 48],
        ),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(socket, &mut buf)?;
        let more = messages(&buf[..n], |kind, payload| match kind {
            NLMSG_DONE => Ok(false),
            NLMSG_ERROR => nl_error(payload).map(|()| false),
            SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_LEN => {
                let mut id = [0u8; 48];
                id.copy_from_slice(&payload[4..52]);
                let msg = DiagMsg {
                    family: payload[0],
                    sport: u16::from_be_bytes([payload[4], payload[5]]),
                    dport: u16::from_be_bytes([payload[6], payload[7]]),
                    id,
                };
                each(&msg, &attrs(&payload[MSG_LEN..]));
                Ok(true)
            }
            _ => Ok(true),
        })?;
        if !more {
            return Ok(());
        }
    }
}

pub(super) fn attrs(mut buf: &[u8]) -> DiagAttrs {
    let mut attrs = DiagAttrs::default();
    while buf.len() >= 4 {
        let len = usize::from(u16_at(buf, 0));
        let kind = u16_at(buf, 2) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        let value = &buf[4..len];
        match kind {
            INET_DIAG_CGROUP_ID if value.len() >= 8 => attrs.cgroup_id = Some(u64_at(value, 0)),
            INET_DIAG_INFO if value.len() >= TCPI_BYTES_RECEIVED + 8 => {
                attrs.bytes = Some(
                    u64_at(value, TCPI_BYTES_ACKED)
                        .saturating_add(u64_at(value, TCPI_BYTES_RECEIVED)),
                );
            }
            _ => {}
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    attrs
}

pub(super) fn destroy_one(socket: &OwnedFd, msg: &DiagMsg) -> io::Result<()> {
    send(
        socket,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            msg.family,
            0,
            u32::MAX,
            &msg.id,
        ),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(socket, &mut buf)?;
    let mut result = Err(io::Error::other("no answer to SOCK_DESTROY"));
    messages(&buf[..n], |kind, payload| {
        if kind == NLMSG_ERROR {
            result = nl_error(payload);
            return Ok(false);
        }
        Ok(true)
    })?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_kernel_layout() {
        let mut id = [0u8; 48];
        id[0] = 0x18;
        id[1] = 0xeb; // sport 6379, big endian
        let req = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2, 0, u32::MAX, &id);
        assert_eq!(req.len(), 72);
        assert_eq!(u32_at(&req, 0), 72);
        assert_eq!(u16_at(&req, 4), SOCK_DESTROY);
        assert_eq!(u16_at(&req, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(req[16], 2); // family
        assert_eq!(req[17], 6); // TCP
        assert_eq!(u32_at(&req, 20), u32::MAX);
        assert_eq!(&req[24..26], &[0x18, 0xeb]);
    }

    #[test]
    fn attributes_yield_cgroup_id_and_bytes() {
        let mut buf = Vec::new();
        // INET_DIAG_CGROUP_ID, 8-byte value.
        buf.extend_from_slice(&12u16.to_ne_bytes());
        buf.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        buf.extend_from_slice(&4242u64.to_ne_bytes());
        // INET_DIAG_INFO with a tcp_info long enough for the byte counters.
        let mut info = vec![0u8; 232];
        info[TCPI_BYTES_ACKED..TCPI_BYTES_ACKED + 8].copy_from_slice(&100u64.to_ne_bytes());
        info[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8].copy_from_slice(&23u64.to_ne_bytes());
        buf.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
        buf.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        buf.extend_from_slice(&info);
        let attrs = attrs(&buf);
        assert_eq!(attrs.cgroup_id, Some(4242));
        assert_eq!(attrs.bytes, Some(123));
    }
}
