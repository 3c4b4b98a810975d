//! The start-up probe: the whole NFQUEUE path proved in a private network namespace.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::time::Duration;

use nfq::Queue;

use super::error::NfqueueError;
use super::placement::backstop_until;
use super::queue::{QUEUE_FIRST, bind_free, configure, open_queue, wait};
use crate::dataplane::clock::monotonic_now_ns;
use crate::dataplane::netfilter::{self, Family, FaultRules, Matcher};
use crate::fault::Direction;
use crate::target::namespaces::NetNs;

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
        .map_err(NfqueueError::SpawnProbe)
        .and_then(|thread| thread.join().map_err(|_| NfqueueError::ProbePanicked))
        .map_err(|e| e.to_string());
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

/// Per family, whether the probe went through, or what failed (as the report shows it).
fn probe_in_private_netns(instance: &str) -> Vec<(Family, Result<(), String>)> {
    let (netns, mut queue, fd, num) = match private_queue() {
        Ok(parts) => parts,
        Err(e) => {
            let e = e.to_string();
            return Family::ALL.iter().map(|f| (*f, Err(e.clone()))).collect();
        }
    };
    Family::ALL
        .iter()
        .map(|family| {
            let result = probe_family(*family, instance, &netns, &mut queue, fd, num)
                .map_err(|e| e.to_string());
            (*family, result)
        })
        .collect()
}

/// Moves this thread into a new network namespace with loopback up, and opens, binds and
/// configures a queue there.
fn private_queue() -> Result<(NetNs, Queue, RawFd, u16), NfqueueError> {
    // SAFETY: unshare on this thread only (network namespaces are per thread).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(NfqueueError::PrivateNetns(io::Error::last_os_error()));
    }
    crate::dataplane::qdisc_probe::loopback_up()?;
    let netns = NetNs::current().map_err(NfqueueError::OwnNetns)?;
    let (mut queue, fd) = open_queue()?;
    let num = bind_free(&mut queue, &BTreeSet::new(), QUEUE_FIRST)?;
    configure(&mut queue, num, super::queue::COPY_RANGE)?;
    Ok((netns, queue, fd, num))
}

/// Installs a probe fault's rules in `family` and sees a UDP request and its reply go through
/// the queue, the reply on INPUT (the conntrack mark at work).
fn probe_family(
    family: Family,
    instance: &str,
    netns: &NetNs,
    queue: &mut Queue,
    fd: RawFd,
    num: u16,
) -> Result<(), NfqueueError> {
    install_rules(family, instance, netns, num)?;
    let hooks = exchange(family, queue, fd)?;
    let inbound = libc::NF_INET_LOCAL_IN as u8;
    if !hooks.contains(&inbound) {
        return Err(NfqueueError::NotOnInput { hooks });
    }
    Ok(())
}

/// The rules of a fault on UDP port 9 of every process, both ways, sent to queue `num`.
fn install_rules(
    family: Family,
    instance: &str,
    netns: &NetNs,
    num: u16,
) -> Result<(), NfqueueError> {
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
        tcp_flags: None,
        until: Some(backstop_until(monotonic_now_ns() + 3_600_000_000_000)),
        peers: None,
    };
    let mut lines = netfilter::chain_creation(instance, &rules.hooks());
    lines.extend(rules.lines(family));
    Ok(netfilter::restore(family, Some(netns), &lines)?)
}

fn io(what: &'static str) -> impl Fn(io::Error) -> NfqueueError {
    move |source| NfqueueError::Probe { what, source }
}

/// Sends a request to UDP port 9 on loopback and a reply back, passing each queued packet;
/// returns the hooks the queued packets came from.
fn exchange(family: Family, queue: &mut Queue, fd: RawFd) -> Result<Vec<u8>, NfqueueError> {
    let loopback: IpAddr = match family {
        Family::V4 => Ipv4Addr::LOCALHOST.into(),
        Family::V6 => Ipv6Addr::LOCALHOST.into(),
    };
    let (server, client) = (SocketAddr::new(loopback, 9), SocketAddr::new(loopback, 0));
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
    pass(queue, fd, &mut hooks)?;
    let mut buf = [0u8; 64];
    let (_, from) = server_socket
        .recv_from(&mut buf)
        .map_err(io("the probe request did not arrive after its verdict"))?;
    server_socket
        .send_to(b"faultd probe reply", from)
        .map_err(io("sending the probe reply"))?;
    pass(queue, fd, &mut hooks)?;
    pass(queue, fd, &mut hooks)?;
    client_socket
        .recv_from(&mut buf)
        .map_err(io("the probe reply did not arrive after its verdict"))?;
    Ok(hooks)
}

/// Waits up to 1 s for a packet in the queue, notes its hook and accepts it.
fn pass(queue: &mut Queue, fd: RawFd, hooks: &mut Vec<u8>) -> Result<(), NfqueueError> {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    wait(&mut fds, Some(1_000_000_000)).map_err(io("waiting for the queue"))?;
    let msg = queue.recv().map_err(NfqueueError::NoPacket)?;
    hooks.push(msg.get_hook());
    queue.verdict(msg).map_err(io("verdict"))
}
