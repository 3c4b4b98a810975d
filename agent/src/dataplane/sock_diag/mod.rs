//! Tearing down established TCP connections of a scope: dump the TCP sockets over netlink
//! sock_diag (each reply carries the socket's cgroup id, `INET_DIAG_CGROUP_ID`), and send
//! `SOCK_DESTROY` for each socket of the scope's cgroup subtree on a matching port. The
//! application sees ECONNABORTED/ECONNRESET on its next call, the peer gets an RST.
//!
//! sock_diag only sees the network namespace its socket was opened in, so the namespaces of the
//! scope's processes are found through /proc and a netlink socket is opened in each, on a
//! short-lived thread of its own (setns never runs on a tokio worker).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fault::{PeerSet, PortRange};
use crate::target::namespaces::in_netns;

mod wire;

use wire::*;

/// Which connections to tear down.
#[derive(Clone, Debug)]
pub struct SocketFilter {
    /// The scope's cgroup directory; sockets of every cgroup below it match too.
    pub cgroup_dir: PathBuf,
    /// Ports of either end; empty means every port.
    pub ports: Vec<PortRange>,
    /// Only connections that carried at least this many bytes (acked out + received).
    pub min_bytes: Option<u64>,
    /// Only connections to these remote addresses (None: any).
    pub peers: Option<PeerSet>,
    /// Only the socket with this cookie (`bpf_get_socket_cookie`): a request match's reset.
    pub cookie: Option<u64>,
    /// An interface's network namespace (`reset` on a netns scope): its sockets match whatever
    /// their cgroup (`cgroup_dir` is not read), but loopback ones, which cross no interface.
    pub netns: Option<PathBuf>,
    /// Only connections that earlier passes of the same `Sockets` have seen for at least this
    /// long (`stall{close_after}`: each connection gets its own allowance from when the fault
    /// first saw it).
    pub min_age: Option<Duration>,
}

impl SocketFilter {
    /// Every connection of the cgroup subtree `cgroup_dir` on `ports` (either end; empty: any)
    /// to `peers` (None: any), whatever its bytes, age or socket.
    pub fn connections(cgroup_dir: PathBuf, ports: Vec<PortRange>, peers: Option<PeerSet>) -> Self {
        Self {
            cgroup_dir,
            ports,
            min_bytes: None,
            peers,
            cookie: None,
            netns: None,
            min_age: None,
        }
    }

    /// Whether the connection's remote address is one of the peers. `family` and `id` are the
    /// `inet_diag_msg`'s (the remote address is the sockid's destination).
    fn peer_matches(&self, family: u8, id: &[u8; 48]) -> bool {
        let Some(peers) = &self.peers else {
            return true;
        };
        peers.contains(remote_addr(family, id))
    }

    /// Whether the socket is the one the filter names, if it names one (`id` as in
    /// `peer_matches`; the cookie is its last 8 bytes, low half first).
    fn cookie_matches(&self, id: &[u8; 48]) -> bool {
        self.cookie.is_none_or(|cookie| {
            u64::from(u32_at(id, 40)) | (u64::from(u32_at(id, 44)) << 32) == cookie
        })
    }

    fn port_matches(&self, sport: u16, dport: u16) -> bool {
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|r| (r.first..=r.last).contains(&sport) || (r.first..=r.last).contains(&dport))
    }
}

/// The remote address of an `inet_diag_msg` (`family`, sockid `id`: its destination).
fn remote_addr(family: u8, id: &[u8; 48]) -> IpAddr {
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&id[20..36]);
    if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]))
    } else {
        let v6 = Ipv6Addr::from(dst);
        // A dual-stack socket talking to an IPv4 peer.
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

/// What one pass found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    pub sockets: usize,
    pub namespaces: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("reading the cgroup tree at {path}: {source}")]
    Cgroup { path: String, source: io::Error },
    #[error("netlink sock_diag: {0}")]
    Netlink(io::Error),
    #[error(
        "the kernel refused SOCK_DESTROY ({0}); it needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN"
    )]
    DestroyUnsupported(io::Error),
}

/// sock_diag sockets by network namespace, kept between the passes of a watcher so that a pass
/// costs a dump, not a thread and a setns per namespace. Only the namespaces seen in the last
/// pass are kept: a netlink socket holds its namespace alive.
#[derive(Default)]
pub struct Sockets {
    by_ns: HashMap<(u64, u64), OwnedFd>,
    /// For `SocketFilter::min_age`: when a pass first saw each matching connection, by socket
    /// cookie (unique across namespaces until reboot). Only those seen in the last pass are kept.
    first_seen: HashMap<[u8; 8], Instant>,
}

/// What `destroy_in` needs of the ages of the connections (`SocketFilter::min_age`).
struct Ages<'a> {
    now: Instant,
    first_seen: &'a mut HashMap<[u8; 8], Instant>,
    seen_now: HashSet<[u8; 8]>,
}

impl Ages<'_> {
    /// Records the connection as seen now, and says whether it was first seen `age` ago.
    fn old_enough(&mut self, id: &[u8; 48], age: Duration) -> bool {
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&id[40..48]);
        self.seen_now.insert(cookie);
        let first = *self.first_seen.entry(cookie).or_insert(self.now);
        self.now.duration_since(first) >= age
    }
}

/// Destroys the established TCP sockets (IPv4 and IPv6) matching `filter`, in every network
/// namespace that a process of the cgroup subtree is in (or in the interface's namespace,
/// `filter.netns`). Blocking.
pub fn destroy(filter: &SocketFilter, sockets: &mut Sockets) -> Result<Destroyed, SockDiagError> {
    // An interface's namespace: its sockets match whatever their cgroup (loopback ones aside).
    let (cgroups, namespaces) = match &filter.netns {
        Some(ns_path) => {
            let meta = fs::metadata(ns_path).map_err(SockDiagError::Netlink)?;
            let ns = (meta.dev(), meta.ino());
            (None, BTreeMap::from([(ns, ns_path.clone())]))
        }
        None => {
            let (cgroups, pids) = cgroup_subtree(&filter.cgroup_dir)?;
            (Some(cgroups), namespaces_of(&pids))
        }
    };
    sockets.by_ns.retain(|ns, _| namespaces.contains_key(ns));
    let mut ages = Ages {
        now: Instant::now(),
        first_seen: &mut sockets.first_seen,
        seen_now: HashSet::new(),
    };
    let mut done = Destroyed::default();
    let mut first_error = None;
    for (ns, ns_path) in &namespaces {
        let socket = match sockets.by_ns.entry(*ns) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => match open_in_netns(ns_path) {
                Ok(socket) => slot.insert(socket),
                // The process left or exited since the scan: its namespace may be gone too.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    first_error.get_or_insert(SockDiagError::Netlink(e));
                    continue;
                }
            },
        };
        done.namespaces += 1;
        match destroy_in(socket, filter, cgroups.as_ref(), &mut ages) {
            Ok(n) => done.sockets += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let seen_now = ages.seen_now;
    sockets
        .first_seen
        .retain(|cookie, _| seen_now.contains(cookie));
    match first_error {
        Some(e) if done.sockets == 0 => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, destroyed = done.sockets, "some connections could not be reset");
            Ok(done)
        }
        None => Ok(done),
    }
}

/// This kernel does not let faultd destroy sockets.
#[derive(Debug, thiserror::Error)]
#[error("SOCK_DESTROY over sock_diag: {0}")]
pub struct SockDestroyUnavailable(#[source] pub io::Error);

/// Checks that this kernel lets us destroy sockets: opens a loopback connection in our own
/// namespace and destroys the client end.
pub fn probe() -> Result<(), SockDestroyUnavailable> {
    let run = || -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let client = std::net::TcpStream::connect(addr)?;
        let (_server, _) = listener.accept()?;
        let local = client.local_addr()?;
        let socket = netlink_socket()?;
        let mut found = None;
        dump(&socket, libc::AF_INET as u8, false, |msg, _| {
            if msg.sport == local.port() && msg.dport == addr.port() {
                found = Some(*msg);
            }
        })?;
        let msg = found
            .ok_or_else(|| io::Error::other("sock_diag did not list a fresh loopback socket"))?;
        destroy_one(&socket, &msg)?;
        Ok(())
    };
    run().map_err(SockDestroyUnavailable)
}

/// The cgroup ids (directory inodes) of `dir` and every cgroup below it, and their processes.
fn cgroup_subtree(dir: &Path) -> Result<(HashSet<u64>, Vec<u32>), SockDiagError> {
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| SockDiagError::Cgroup { path, source }
    };
    let mut ids = HashSet::new();
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = match fs::metadata(&dir) {
            Ok(meta) => meta,
            // A cgroup below the scope removed during the walk.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !ids.is_empty() => continue,
            Err(e) => return Err(err(&dir)(e)),
        };
        ids.insert(meta.ino());
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(&dir)(e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    Ok((ids, pids))
}

/// One `/proc/<pid>/ns/net` path per distinct network namespace of `pids`.
fn namespaces_of(pids: &[u32]) -> BTreeMap<(u64, u64), PathBuf> {
    let mut namespaces = BTreeMap::new();
    for pid in pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if let Ok(meta) = fs::metadata(&path) {
            namespaces.entry((meta.dev(), meta.ino())).or_insert(path);
        }
    }
    namespaces
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sock_diag socket bound to the namespace at `ns_path`. A socket stays in the namespace it
/// was created in, so the setns happens on a throwaway thread.
fn open_in_netns(ns_path: &Path) -> io::Result<OwnedFd> {
    let own = fs::metadata("/proc/self/ns/net")?;
    let target = fs::metadata(ns_path)?;
    if (own.dev(), own.ino()) == (target.dev(), target.ino()) {
        return netlink_socket();
    }
    in_netns(ns_path, netlink_socket)?
}

/// Dumps and destroys in one namespace the sockets of `cgroups` (None: all but loopback ones);
/// returns how many sockets were destroyed.
fn destroy_in(
    socket: &OwnedFd,
    filter: &SocketFilter,
    cgroups: Option<&HashSet<u64>>,
    ages: &mut Ages<'_>,
) -> Result<usize, SockDiagError> {
    let mut victims = Vec::new();
    let with_info = filter.min_bytes.is_some();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(socket, family, with_info, |msg, attrs| {
            let in_scope = match cgroups {
                Some(cgroups) => attrs.cgroup_id.is_some_and(|id| cgroups.contains(&id)),
                None => !remote_addr(msg.family, &msg.id).is_loopback(),
            };
            let enough = filter
                .min_bytes
                .is_none_or(|min| attrs.bytes.is_some_and(|b| b >= min));
            if in_scope
                && enough
                && filter.port_matches(msg.sport, msg.dport)
                && filter.peer_matches(msg.family, &msg.id)
                && filter.cookie_matches(&msg.id)
                && filter
                    .min_age
                    .is_none_or(|age| ages.old_enough(&msg.id, age))
            {
                victims.push(*msg);
            }
        })
        .map_err(SockDiagError::Netlink)?;
    }
    let mut destroyed = 0;
    for victim in &victims {
        match destroy_one(socket, victim) {
            Ok(()) => destroyed += 1,
            // Closed in the meantime.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) => {
                return Err(SockDiagError::DestroyUnsupported(e));
            }
            Err(e) => return Err(SockDiagError::Netlink(e)),
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::Cidr;

    #[test]
    fn a_connection_is_old_enough_an_age_after_it_was_first_seen() {
        let start = Instant::now();
        let mut first_seen = HashMap::new();
        let mut id = [0u8; 48];
        id[40..48].copy_from_slice(&7u64.to_ne_bytes());
        let second = Duration::from_secs(1);
        let mut pass = |now| {
            Ages {
                now,
                first_seen: &mut first_seen,
                seen_now: HashSet::new(),
            }
            .old_enough(&id, second)
        };
        assert!(!pass(start));
        assert!(!pass(start + second / 2));
        assert!(pass(start + second));
        // Another cookie starts its own clock.
        id[40] = 8;
        let mut ages = Ages {
            now: start + second * 2,
            first_seen: &mut first_seen,
            seen_now: HashSet::new(),
        };
        assert!(!ages.old_enough(&id, second));
    }

    #[test]
    fn ports_of_either_end_match() {
        let filter = SocketFilter::connections(
            PathBuf::from("/x"),
            vec![PortRange {
                first: 5432,
                last: 5432,
            }],
            None,
        );
        assert!(filter.port_matches(5432, 40000));
        assert!(filter.port_matches(40000, 5432));
        assert!(!filter.port_matches(40000, 6379));
        let all = SocketFilter {
            ports: vec![],
            ..filter
        };
        assert!(all.port_matches(1, 2));
    }

    #[test]
    fn peers_match_the_remote_address_of_either_family() {
        let peers = PeerSet::new(
            &[
                Cidr::parse("127.0.0.2", "f").unwrap(),
                Cidr::parse("fd00::/8", "f").unwrap(),
            ],
            &[],
            "t",
        )
        .unwrap();
        let filter = SocketFilter::connections(PathBuf::from("/x"), vec![], peers);
        let id = |dst: [u8; 16]| {
            let mut id = [0u8; 48];
            id[4..20].copy_from_slice(&[9; 16]);
            id[20..36].copy_from_slice(&dst);
            id
        };
        let v4 = |a: [u8; 4]| {
            let mut d = [0u8; 16];
            d[..4].copy_from_slice(&a);
            d
        };
        let inet = libc::AF_INET as u8;
        let inet6 = libc::AF_INET6 as u8;
        assert!(filter.peer_matches(inet, &id(v4([127, 0, 0, 2]))));
        assert!(!filter.peer_matches(inet, &id(v4([127, 0, 0, 1]))));
        let mapped = Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().octets();
        assert!(filter.peer_matches(inet6, &id(mapped)));
        assert!(filter.peer_matches(
            inet6,
            &id(Ipv6Addr::new(0xfd12, 0, 0, 0, 0, 0, 0, 1).octets())
        ));
        assert!(!filter.peer_matches(inet6, &id(Ipv6Addr::LOCALHOST.octets())));
    }
}
