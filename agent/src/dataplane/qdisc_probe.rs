//! Which qdiscs the kernel has (netem, fq), found by creating each one, never guessed
//! from the kernel version: on the loopback device of a private network namespace that a
//! short-lived thread creates and takes with it, so no device of the host is touched.
//! Plain rtnetlink (RTM_NEWQDISC) on a raw socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWQDISC: u16 = 36;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TC_H_ROOT: u32 = 0xffff_ffff;
/// The loopback device is always ifindex 1 in a new network namespace.
const LOOPBACK_IFINDEX: i32 = 1;

/// Creates each qdisc kind as the root qdisc of a private loopback device; Ok if the kernel
/// accepted it, else why not (e.g. "no sch_netem in this kernel").
pub fn probe(kinds: &[&'static str]) -> Vec<(&'static str, Result<(), String>)> {
    let kinds = kinds.to_vec();
    let fallback = kinds.clone();
    let outcome = std::thread::Builder::new()
        .name("faultd-probe-qdisc".into())
        .spawn(move || {
            // SAFETY: unshare on this thread only (network namespaces are per thread).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = format!(
                    "creating a private network namespace: {}",
                    io::Error::last_os_error()
                );
                return kinds.iter().map(|k| (*k, Err(e.clone()))).collect();
            }
            let socket = match route_socket() {
                Ok(socket) => socket,
                Err(e) => {
                    let e = format!("opening an rtnetlink socket: {e}");
                    return kinds.iter().map(|k| (*k, Err(e.clone()))).collect();
                }
            };
            kinds
                .iter()
                .map(|kind| (*kind, create_root_qdisc(&socket, kind)))
                .collect::<Vec<_>>()
        })
        .map_err(|e| e.to_string())
        .and_then(|thread| thread.join().map_err(|_| "the probe panicked".to_string()));
    outcome.unwrap_or_else(|e| fallback.iter().map(|k| (*k, Err(e.clone()))).collect())
}

fn route_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is ours.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zero means "let the kernel pick the port id".
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: bind with a valid sockaddr_nl.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// RTM_NEWQDISC creating `kind` as the root qdisc (handle 1:) of the loopback device.
fn new_qdisc_message(kind: &str) -> Vec<u8> {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    let mut buf = Vec::with_capacity(96);
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    buf.extend_from_slice(&RTM_NEWQDISC.to_ne_bytes());
    buf.extend_from_slice(&(flags as u16).to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // struct tcmsg
    buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    buf.extend_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
    buf.extend_from_slice(&0x0001_0000u32.to_ne_bytes()); // handle 1:
    buf.extend_from_slice(&TC_H_ROOT.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    let mut name = kind.as_bytes().to_vec();
    name.push(0);
    push_attr(&mut buf, TCA_KIND, &name);
    if kind == "netem" {
        // struct tc_netem_qopt {latency, limit, loss, gap, duplicate, jitter}: netem needs it.
        let qopt: [u32; 6] = [0, 1000, 0, 0, 0, 0];
        let bytes: Vec<u8> = qopt.iter().flat_map(|v| v.to_ne_bytes()).collect();
        push_attr(&mut buf, TCA_OPTIONS, &bytes);
    }
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn create_root_qdisc(socket: &OwnedFd, kind: &str) -> Result<(), String> {
    let message = new_qdisc_message(kind);
    // SAFETY: send a buffer we own.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(format!(
            "sending RTM_NEWQDISC: {}",
            io::Error::last_os_error()
        ));
    }
    let mut reply = [0u8; 8192];
    // SAFETY: recv into a buffer we own.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if n < 20 {
        return Err(format!(
            "no answer to RTM_NEWQDISC: {}",
            io::Error::last_os_error()
        ));
    }
    let kind_of_reply = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind_of_reply != libc::NLMSG_ERROR as u16 {
        return Err(format!("unexpected answer {kind_of_reply} to RTM_NEWQDISC"));
    }
    let errno = -i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    match errno {
        0 => Ok(()),
        libc::ENOENT => Err(format!(
            "no sch_{kind} in this kernel (creating a {kind} qdisc: {})",
            io::Error::from_raw_os_error(errno)
        )),
        _ => Err(format!(
            "creating a {kind} qdisc failed: {}",
            io::Error::from_raw_os_error(errno)
        )),
    }
}

/// `struct ifreq` with the flags member.
#[repr(C)]
struct IfreqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Brings `lo` of the calling thread's network namespace up (a new namespace has it down).
pub fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket(2); the fd is closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
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
            return Err(format!(
                "reading lo's flags: {}",
                io::Error::last_os_error()
            ));
        }
        request.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut request) != 0 {
            return Err(format!("bringing lo up: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_a_well_formed_rtm_newqdisc() {
        let message = new_qdisc_message("netem");
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(u16::from_ne_bytes([message[4], message[5]]), RTM_NEWQDISC);
        // nlmsghdr (16) + tcmsg (20) + TCA_KIND "netem\0" (4 + 6, padded to 12) + options (28).
        assert_eq!(message.len(), 16 + 20 + 12 + 28);
        assert_eq!(&message[40..46], b"netem\0");
        assert_eq!(new_qdisc_message("fq").len(), 16 + 20 + 8);
    }
}
