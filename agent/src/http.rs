//! The HTTP endpoint on `--metrics-addr`: `GET /metrics` (Prometheus) and `GET /healthz` (the
//! kernel probe, whether the datapath is loaded, and whether the engine answers).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

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

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: watch::Receiver<bool>) {
    let stopped = crate::api::stopped(shutdown);
    tokio::pin!(stopped);
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
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(endpoint.clone(), request));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics endpoint: connection");
            }
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
    // The datapath programs are attached once at start; the probe saw whether they loaded.
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
