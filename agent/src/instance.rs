//! This agent's identity on the host. Several agents may run side by side (one per state
//! directory); whatever one creates outside its own process and cannot tie to its lifetime
//! (netfilter chains) carries its instance id, so that a start-up sweep removes what dead
//! agents left and never what a live one holds.
//!
//! Liveness is a beacon: an abstract unix socket `faultd/instance/<id>` bound for the life of
//! the process. The kernel frees the name when the process dies, however it dies, so "is the
//! owner alive?" has no pid-reuse or stale-file pitfalls. Abstract names are per network
//! namespace: the test is meaningful between agents that share one (the host's).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const PREFIX: &str = "faultd/instance/";
/// Hex digits of an id: short enough for netfilter chain names (28 characters at most).
pub const ID_LEN: usize = 8;

pub struct Instance {
    id: String,
    _beacon: OwnedFd,
}

impl Instance {
    /// Picks a fresh id and binds its beacon.
    pub fn register() -> io::Result<Instance> {
        let mut last = None;
        for _ in 0..32 {
            let id = format!("{:08x}", random_u32());
            match bind_beacon(&id) {
                Ok(beacon) => {
                    return Ok(Instance {
                        id,
                        _beacon: beacon,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free instance id")))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the agent with this id is alive (its beacon is bound). When in doubt (an
    /// unexpected error), it is taken as alive: a sweep must never touch a live agent's state.
    pub fn is_alive(id: &str) -> bool {
        let Ok(socket) = unix_dgram() else {
            return true;
        };
        let (addr, len) = abstract_addr(id);
        // SAFETY: connect with a valid sockaddr_un of the given length.
        let rc = unsafe { libc::connect(socket.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc == 0 {
            return true;
        }
        io::Error::last_os_error().raw_os_error() != Some(libc::ECONNREFUSED)
    }

    /// Whether `text` has the shape of an instance id.
    pub fn is_id(text: &str) -> bool {
        text.len() == ID_LEN && text.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

fn unix_dgram() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn abstract_addr(id: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("{PREFIX}{id}");
    // sun_path[0] stays NUL: an abstract name.
    for (slot, byte) in addr.sun_path[1..].iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (addr, len as libc::socklen_t)
}

fn bind_beacon(id: &str) -> io::Result<OwnedFd> {
    let socket = unix_dgram()?;
    let (addr, len) = abstract_addr(id);
    // SAFETY: bind with a valid sockaddr_un of the given length.
    let rc = unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        return nanos ^ std::process::id().rotate_left(16);
    }
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_instance_is_alive_until_dropped() {
        let instance = Instance::register().expect("abstract unix sockets work unprivileged");
        assert!(Instance::is_id(instance.id()), "{}", instance.id());
        assert!(Instance::is_alive(instance.id()));
        let id = instance.id().to_owned();
        drop(instance);
        assert!(
            !Instance::is_alive(&id),
            "the beacon goes with the instance"
        );
        assert!(!Instance::is_id("xyz"));
        assert!(!Instance::is_id("0123456789"));
    }
}
