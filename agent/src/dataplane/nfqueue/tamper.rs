//! What a lane does to a packet besides holding it: send it twice (`duplicate`), damage it
//! (`corrupt`) or cut it into pieces (`slice`). Reordering is a matter of release times
//! (`schedule`).
//!
//! A duplicate is the packet as queued, sent again through a raw socket opened in the lane's
//! network namespace while the original waits for its verdict. The copy may pass the fault's rule again
//! (a host or interface scope; a cgroup's own packets only match the cgroup's sockets, not
//! faultd's): the lane remembers what it sent for a second and lets it through untouched.
//!
//! A corrupted packet has the low bit of its last byte flipped (L4 header or payload: TCP and
//! UDP checksums cover both) and its checksum left as it was. The kernel completes a
//! locally generated packet's checksum before it queues it (the queue does not ask for GSO
//! packets), and a packet whose payload user space rewrote is marked CHECKSUM_NONE, so the
//! receiver verifies the sum and drops the packet (TcpInCsumErrors/UdpInCsumErrors), as it
//! would drop one damaged on the wire.
//!
//! A sliced TCP segment is dropped and its data sent instead as pieces of at most `max` bytes
//! (`slice`), each with the segment's headers, its own sequence number, lengths and checksums,
//! FIN and PSH only on the last, through the same raw sockets. TCP_MAXSEG could not do it: its
//! floor is 88 bytes. Pieces are at most `max` bytes, so they pass the rule again untouched.
//! With a delay, a thread of the lane sends each segment's pieces that far apart.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use nfq::Message;

use super::schedule::{FNV_OFFSET, Rng, fnv1a};
use super::slice;
use crate::fault::Action;

/// Copies whose return is ignored, for this long.
const COPY_MEMORY_NS: u64 = 1_000_000_000;

/// What `Tamper::apply` did to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Done {
    Nothing,
    Duplicated,
    Corrupted,
    /// The packet was sent as pieces; its own verdict is now Drop.
    Sliced,
}

pub(super) enum Tamper {
    None,
    Duplicate {
        share: f64,
        /// IPv4 and IPv6 raw sockets (IPPROTO_RAW: the header is ours), once opened.
        raw: Option<(OwnedFd, OwnedFd)>,
        /// Hashes of the copies sent, with when to forget them.
        sent: HashMap<u64, u64>,
    },
    Corrupt {
        share: f64,
    },
    Slice {
        max: usize,
        /// Pause between pieces: then a thread of the lane's sends them (`pacer`).
        delay: Duration,
        raw: Option<Arc<(OwnedFd, OwnedFd)>>,
        pacer: Option<SyncSender<Vec<Vec<u8>>>>,
    },
}

/// Segments whose pieces wait for the pacing thread at most; beyond, pieces go at once.
const PACER_BACKLOG: usize = 1024;

impl Tamper {
    pub(super) fn new(action: &Action) -> Tamper {
        match action {
            Action::Duplicate { percent, .. } => Tamper::Duplicate {
                share: percent / 100.0,
                raw: None,
                sent: HashMap::new(),
            },
            Action::Corrupt { percent, .. } => Tamper::Corrupt {
                share: percent / 100.0,
            },
            Action::Slice { max_bytes, delay } => Tamper::Slice {
                max: *max_bytes as usize,
                delay: *delay,
                raw: None,
                pacer: None,
            },
            _ => Tamper::None,
        }
    }

    /// Whether the lane needs whole packets in user space (not only their headers).
    pub(super) fn whole_packets(&self) -> bool {
        !matches!(self, Tamper::None)
    }

    /// Opens what the tamper needs in the current network namespace (the lane's thread is in
    /// the rules' namespace by then).
    pub(super) fn open(&mut self) -> io::Result<()> {
        match self {
            Tamper::Duplicate { raw, .. } => {
                *raw = Some((raw_socket(libc::AF_INET)?, raw_socket(libc::AF_INET6)?));
            }
            Tamper::Slice {
                raw, pacer, delay, ..
            } => {
                let sockets = Arc::new((raw_socket(libc::AF_INET)?, raw_socket(libc::AF_INET6)?));
                if !delay.is_zero() {
                    *pacer = Some(start_pacer(sockets.clone(), *delay)?);
                }
                *raw = Some(sockets);
            }
            Tamper::None | Tamper::Corrupt { .. } => {}
        }
        Ok(())
    }

    /// Acts on `msg` (queued at `now`) with the tamper's probability. A packet that the
    /// kernel copied only in part is left alone: rewriting it would cut it short.
    pub(super) fn apply(&mut self, msg: &mut Message, rng: &mut Rng, now: u64) -> Done {
        let whole = msg.get_payload().len() == msg.get_original_len();
        match self {
            Tamper::None => Done::Nothing,
            Tamper::Slice {
                max, raw, pacer, ..
            } => {
                let Some(sockets) = raw else {
                    return Done::Nothing;
                };
                if !whole {
                    return Done::Nothing;
                }
                let Some(pieces) = slice::pieces(msg.get_payload(), *max) else {
                    return Done::Nothing;
                };
                // With a pause between pieces the pacing thread sends them, in the order the
                // segments came; when it lags too far behind, they go at once.
                let pieces = match pacer {
                    Some(pacer) => match pacer.try_send(pieces) {
                        Ok(()) => {
                            msg.set_verdict(nfq::Verdict::Drop);
                            return Done::Sliced;
                        }
                        Err(TrySendError::Full(pieces) | TrySendError::Disconnected(pieces)) => {
                            pieces
                        }
                    },
                    None => pieces,
                };
                let (v4, v6) = &**sockets;
                for piece in &pieces {
                    if let Err(e) = send_copy(v4, v6, piece) {
                        // The segment goes whole: TCP copes with a piece lost on the way.
                        tracing::debug!(error = %e, "sending a slice");
                        return Done::Nothing;
                    }
                }
                msg.set_verdict(nfq::Verdict::Drop);
                Done::Sliced
            }
            Tamper::Corrupt { share } => {
                if !whole || rng.unit() > *share {
                    return Done::Nothing;
                }
                let payload = msg.get_payload_mut();
                match payload.last_mut() {
                    Some(last) => {
                        *last ^= 1;
                        Done::Corrupted
                    }
                    None => Done::Nothing,
                }
            }
            Tamper::Duplicate { share, raw, sent } => {
                let packet = msg.get_payload();
                let hash = fnv1a(FNV_OFFSET, packet);
                if sent.get(&hash).is_some_and(|until| *until > now) {
                    return Done::Nothing; // our own copy, passing the rule again
                }
                if !whole || rng.unit() > *share {
                    return Done::Nothing;
                }
                let Some((v4, v6)) = raw else {
                    return Done::Nothing;
                };
                if sent.len() > 4096 {
                    sent.retain(|_, until| *until > now);
                }
                match send_copy(v4, v6, packet) {
                    Ok(()) => {
                        sent.insert(hash, now + COPY_MEMORY_NS);
                        Done::Duplicated
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "sending a duplicate");
                        Done::Nothing
                    }
                }
            }
        }
    }
}

/// The thread that sends each segment's pieces `delay` apart; it ends when the tamper (the
/// sender) goes.
fn start_pacer(
    sockets: Arc<(OwnedFd, OwnedFd)>,
    delay: Duration,
) -> io::Result<SyncSender<Vec<Vec<u8>>>> {
    let (tx, rx) = sync_channel::<Vec<Vec<u8>>>(PACER_BACKLOG);
    std::thread::Builder::new()
        .name("faultd-slicer".into())
        .spawn(move || {
            let (v4, v6) = &*sockets;
            for pieces in rx {
                for (i, piece) in pieces.iter().enumerate() {
                    if i > 0 {
                        std::thread::sleep(delay);
                    }
                    if let Err(e) = send_copy(v4, v6, piece) {
                        // TCP resends what a lost piece carried.
                        tracing::debug!(error = %e, "sending a slice");
                    }
                }
            }
        })?;
    Ok(tx)
}

fn raw_socket(family: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `packet` (an IPv4 or IPv6 packet, header included) to its destination.
fn send_copy(v4: &OwnedFd, v6: &OwnedFd, packet: &[u8]) -> io::Result<()> {
    let sent = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            // SAFETY: sockaddr_in is plain data; zero is a valid value.
            let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            to.sin_family = libc::AF_INET as libc::sa_family_t;
            to.sin_addr.s_addr =
                u32::from_ne_bytes([packet[16], packet[17], packet[18], packet[19]]);
            // SAFETY: valid buffer and address of the stated sizes.
            unsafe {
                libc::sendto(
                    v4.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        Some(6) if packet.len() >= 40 => {
            // SAFETY: sockaddr_in6 is plain data; zero is a valid value.
            let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            to.sin6_addr.s6_addr.copy_from_slice(&packet[24..40]);
            // SAFETY: valid buffer and address of the stated sizes.
            unsafe {
                libc::sendto(
                    v6.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
        _ => return Err(io::Error::other("not an IP packet")),
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
