//! What the TCP listener lets in. Anyone who reaches the port can open connections before
//! mTLS has a say, so, like the metrics endpoint (`http.rs`), the listener serves a bounded
//! number at once, keeps descriptors in reserve for faultd's own work (closing new connections
//! at once when they run low), and closes a connection to which faultd has sent nothing within
//! `HANDSHAKE_TIMEOUT` (a peer that never completes its TLS ClientHello). Connections already
//! served are never closed to make room: they may carry a lease's KeepAlive.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

/// At most this many TCP connections at once (fewer with few descriptors: a quarter of them).
pub const MAX_CONNECTIONS: usize = 256;
/// A connection to which faultd has written nothing by then is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Warnings about refused connections come at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    /// As `http::Budget::fd_ceiling`: a connection whose descriptor is this or higher is closed.
    pub fd_ceiling: u64,
}

impl Limits {
    pub fn for_limit(nofile: u64) -> Limits {
        Limits {
            connections: usize::try_from(nofile / 4)
                .unwrap_or(MAX_CONNECTIONS)
                .clamp(1, MAX_CONNECTIONS),
            fd_ceiling: crate::http::Budget::for_limit(nofile).fd_ceiling,
        }
    }

    /// From this process's soft RLIMIT_NOFILE.
    pub fn of_process() -> Limits {
        Limits::for_limit(crate::http::nofile_limit())
    }
}

/// A served connection: counted while it lives, closed if nothing was sent to it in time.
pub struct Admitted {
    stream: TcpStream,
    _slot: Slot,
    /// Until faultd first writes to it.
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connections of `incoming` that `limits` let in; the rest are closed at once.
pub fn admit<S>(incoming: S, limits: Limits) -> impl Stream<Item = io::Result<Admitted>>
where
    S: Stream<Item = io::Result<TcpStream>>,
{
    let open = Arc::new(AtomicUsize::new(0));
    let mut refused = 0u64;
    let mut warned: Option<Instant> = None;
    incoming.filter_map(move |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => return Some(Err(e)),
        };
        let low_on_fds = u64::try_from(stream.as_raw_fd()).unwrap_or(0) >= limits.fd_ceiling;
        let full = open.load(Ordering::Acquire) >= limits.connections;
        if low_on_fds || full {
            // Closed at once: the peer sees EOF, and the descriptor is free again.
            drop(stream);
            refused += 1;
            if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                warned = Some(Instant::now());
                tracing::warn!(
                    max_connections = limits.connections,
                    low_on_fds,
                    refused,
                    "API TCP listener: too many connections; refusing new ones"
                );
            }
            return None;
        }
        open.fetch_add(1, Ordering::AcqRel);
        Some(Ok(Admitted {
            stream,
            _slot: Slot(open.clone()),
            handshake: Some(Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT))),
        }))
    })
}

impl Admitted {
    /// An error once the handshake time is up and nothing was sent.
    fn check_handshake(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(deadline) = &mut self.handshake else {
            return Ok(());
        };
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no TLS handshake within the time allowed",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_handshake(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.handshake = None;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Admitted {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_keeps_descriptors_and_bounds_connections() {
        assert_eq!(Limits::for_limit(256).connections, 64);
        assert_eq!(Limits::for_limit(256).fd_ceiling, 192);
        assert_eq!(Limits::for_limit(1 << 20).connections, MAX_CONNECTIONS);
    }

    #[tokio::test]
    async fn beyond_the_cap_connections_are_closed_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let limits = Limits {
            connections: 2,
            fd_ceiling: u64::MAX,
        };
        let mut admitted = Box::pin(admit(incoming, limits));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let first = admitted.next().await.unwrap().unwrap();
        let _second = admitted.next().await.unwrap().unwrap();
        // The third is refused (closed at once), and nothing else is waiting.
        let waited = tokio::time::timeout(Duration::from_millis(200), admitted.next()).await;
        assert!(waited.is_err(), "the third connection was let in");
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt;
        assert_eq!(clients[2].read(&mut byte).await.unwrap(), 0, "EOF");
        // Once one goes, the next gets in.
        drop(first);
        clients.push(TcpStream::connect(addr).await.unwrap());
        let fourth = admitted.next().await.unwrap().unwrap();
        assert_eq!(
            fourth.stream.peer_addr().unwrap(),
            clients[3].local_addr().unwrap()
        );
    }
}
