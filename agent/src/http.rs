//! The HTTP endpoint on `--metrics-addr`: `GET /metrics` (Prometheus) and `GET /healthz` (the
//! kernel probe, whether the datapath is loaded, and whether the engine answers).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::caps::Capabilities;
use crate::engine::Engine;

/// How long /healthz waits for the engine before it calls it stuck.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoint reads.
#[derive(Clone)]
pub struct Endpoint {
    pub registry: Arc<Registry>,
    pub engine: Arc<Engine>,
    pub caps: Arc<Capabilities>,
}

/// Most connections served at once (fewer when faultd has few descriptors, see `Budget`); a
/// newer one closes the oldest. A Prometheus server and a few probes need a handful.
const MAX_CONNECTIONS: usize = 32;

/// A request's head must arrive whole within this, and a kept-alive connection gets no longer
/// before its next request: idle and slow-header connections go.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest one connection lives, whatever it does (a request answered slowly, a client
/// that reads its response slowly).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Warnings about connections closed early come at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the endpoint may use of faultd's descriptors, from RLIMIT_NOFILE: the API, leases,
/// netlink, NFQUEUE and iptables need theirs whatever comes to the metrics port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Connections served at once.
    pub connections: usize,
    /// A connection whose descriptor is this number or higher is closed at once: descriptors
    /// are handed out lowest first, so at least this many are open.
    pub fd_ceiling: u64,
}

impl Budget {
    /// A quarter of the descriptors (at least 64) stays in reserve for faultd's own work, and
    /// the endpoint serves at most an eighth of them at once.
    pub fn for_limit(nofile: u64) -> Self {
        let reserve = (nofile / 4).max(64);
        Self {
            connections: usize::try_from(nofile / 8)
                .unwrap_or(MAX_CONNECTIONS)
                .clamp(1, MAX_CONNECTIONS),
            fd_ceiling: nofile.saturating_sub(reserve),
        }
    }

    /// From this process's soft RLIMIT_NOFILE.
    pub fn of_process() -> Self {
        Self::for_limit(nofile_limit())
    }
}

/// This process's soft RLIMIT_NOFILE (1024, the usual default, when unknown or unlimited).
pub fn nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 if limit.rlim_cur != libc::RLIM_INFINITY => limit.rlim_cur,
        _ => 1024,
    }
}

/// The connections being served, oldest first, each with the means to close it.
#[derive(Default)]
struct Open {
    next: u64,
    oldest_first: VecDeque<(u64, oneshot::Sender<()>)>,
}

fn lock(open: &Mutex<Open>) -> MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves until `shutdown` turns true. When `budget.connections` are open, a new connection
/// closes the oldest: idle connections cannot keep a probe or a scrape out, since these send
/// their request at once. When descriptors run low, new connections are closed at once.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: watch::Receiver<bool>) {
    let budget = Budget::of_process();
    tracing::debug!(?budget, "metrics endpoint");
    let open = Arc::new(Mutex::new(Open::default()));
    let stopped = crate::api::stopped(shutdown);
    tokio::pin!(stopped);
    let (mut closed_early, mut refused) = (0u64, 0u64);
    let mut warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopped => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let low_on_fds = u64::try_from(stream.as_raw_fd()).unwrap_or(0) >= budget.fd_ceiling;
        let (admitted, crowded) = match low_on_fds {
            // Closed at once: the client sees EOF, and the descriptor is free again.
            true => {
                drop(stream);
                refused += 1;
                (None, true)
            }
            false => {
                let mut open = lock(&open);
                let full = open.oldest_first.len() >= budget.connections;
                if full && let Some((_, oldest)) = open.oldest_first.pop_front() {
                    // An error means it has just ended by itself.
                    let _ended = oldest.send(());
                    closed_early += 1;
                }
                let id = open.next;
                open.next += 1;
                let (close, closed) = oneshot::channel();
                open.oldest_first.push_back((id, close));
                (Some((stream, id, closed)), full)
            }
        };
        if crowded && warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warned = Some(Instant::now());
            tracing::warn!(
                max_connections = budget.connections,
                closed_oldest = closed_early,
                refused_low_on_descriptors = refused,
                "metrics endpoint: too many connections"
            );
        }
        let Some((stream, id, closed)) = admitted else {
            continue;
        };
        let (endpoint, open) = (endpoint.clone(), open.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(endpoint.clone(), request));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = tokio::time::timeout(CONNECTION_LIFETIME, connection) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: connection"),
                    Err(_) => tracing::debug!("metrics endpoint: connection lived too long; closed"),
                },
                // Told to make room, or the endpoint stopped.
                _ = closed => tracing::debug!("metrics endpoint: closed for a newer connection"),
            }
            lock(&open).oldest_first.retain(|(other, _)| *other != id);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

async fn handle(endpoint: Endpoint, request: Request<Incoming>) -> Result<Reply, Infallible> {
    if request.method() != Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ));
    }
    Ok(match request.uri().path() {
        "/metrics" => metrics(endpoint).await,
        "/healthz" => health(endpoint).await,
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    })
}

async fn metrics(endpoint: Endpoint) -> Reply {
    // Rendering reads every fault's per-CPU counters under the engine lock: blocking work.
    let registry = endpoint.registry.clone();
    match tokio::task::spawn_blocking(move || crate::metrics::render(&registry)).await {
        Ok(Ok(text)) => reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding metrics: {e}\n"),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding metrics: {e}\n"),
        ),
    }
}

async fn health(endpoint: Endpoint) -> Reply {
    let engine = endpoint.engine.clone();
    let counts = tokio::time::timeout(
        ENGINE_TIMEOUT,
        tokio::task::spawn_blocking(move || (engine.active_faults(), engine.leases().len())),
    )
    .await;
    let (responsive, faults, leases) = match counts {
        Ok(Ok((faults, leases))) => (true, Some(faults), Some(leases)),
        _ => (false, None, None),
    };
    let caps = &endpoint.caps;
    // The datapath programs load at start (and attach where faults are); the probe saw
    // whether they loaded.
    let loaded = caps
        .items
        .iter()
        .any(|c| c.name == "cgroup_skb" && c.available);
    let healthy = loaded && responsive;
    let actions: serde_json::Map<String, serde_json::Value> = caps
        .actions
        .iter()
        .map(|(name, outcome)| {
            let value = match outcome {
                Ok(mechanism) => json!({ "available": true, "mechanism": mechanism }),
                Err(missing) => json!({ "available": false, "detail": missing }),
            };
            ((*name).to_string(), value)
        })
        .collect();
    let capabilities: Vec<_> = caps
        .items
        .iter()
        .map(|c| json!({ "name": c.name, "available": c.available, "detail": c.detail }))
        .collect();
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "datapath": { "loaded": loaded, "actions": actions },
        "engine": { "responsive": responsive, "faults": faults, "leases": leases },
        "kernel": caps.kernel_release,
        "capabilities": capabilities,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let status = match healthy {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    reply(status, "application/json", format!("{body}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_descriptors_in_reserve() {
        assert_eq!(
            Budget::for_limit(256),
            Budget {
                connections: 32,
                fd_ceiling: 192
            }
        );
        assert_eq!(
            Budget::for_limit(1024),
            Budget {
                connections: 32,
                fd_ceiling: 768
            }
        );
        let tiny = Budget::for_limit(40);
        assert_eq!(tiny.connections, 5);
        assert_eq!(
            tiny.fd_ceiling, 0,
            "nothing to spare: every connection is closed"
        );
        assert!(Budget::of_process().connections >= 1);
    }
}
