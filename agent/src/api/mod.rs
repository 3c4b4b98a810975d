//! The gRPC API: conversion between proto and domain, and the status code of each error kind.
//! The engine knows nothing of tonic.
//!
//! Every call is counted by its status code (metrics); every mutating call is written to the
//! audit log with who made it (`peer`).

pub mod admit;
pub mod authority;
pub mod caps;
pub mod convert;
mod events;
mod fault;
mod lease;
pub mod peer;
mod request;

use std::sync::Arc;
use std::time::Duration;

use faultd_proto::v1::{
    FILE_DESCRIPTOR_SET, fault_service_server::FaultServiceServer,
    lease_service_server::LeaseServiceServer,
};
use serde_json::Value;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::server::{Router, ServerTlsConfig};
use tonic::{Code, Status};

pub use self::fault::FaultApi;
pub use self::lease::LeaseApi;
use crate::audit::{AuditLog, Entry, Peer};
use crate::caps::Capabilities;
use crate::claims::ClaimError;
use crate::dataplane::DataplaneError;
use crate::engine::{Engine, Error};
use crate::fault::Invalid;
use crate::metrics::Metrics;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Invalid(invalid) => Status::from(invalid),
            Error::Denied(_) => Status::permission_denied(message),
            Error::NotFound { .. } | Error::Ended { .. } | Error::ScopeNotFound(_) => {
                Status::not_found(message)
            }
            Error::Conflict { .. } => Status::already_exists(message),
            Error::Claimed {
                source: ClaimError::Held { .. },
                ..
            } => Status::already_exists(message),
            Error::Claimed { .. } => Status::internal(message),
            Error::Exhausted(_) | Error::Dataplane(DataplaneError::Exhausted { .. }) => {
                Status::resource_exhausted(message)
            }
            Error::Unsupported(_) | Error::Dataplane(DataplaneError::Unsupported { .. }) => {
                Status::failed_precondition(message)
            }
            Error::Dataplane(_) => Status::internal(message),
        }
    }
}

impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Self {
        match invalid.over_limit {
            true => Status::resource_exhausted(invalid.to_string()),
            false => Status::invalid_argument(invalid.to_string()),
        }
    }
}

/// A status code as gRPC names it (`PERMISSION_DENIED`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts answered calls and writes the audit log. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Calls {
    metrics: Metrics,
    audit: Option<Arc<AuditLog>>,
}

impl Calls {
    pub fn new(metrics: Metrics, audit: Option<Arc<AuditLog>>) -> Self {
        Self { metrics, audit }
    }

    /// A read-only call: counted.
    pub fn read<T>(&self, service: &str, method: &str, result: &Result<T, Status>) {
        self.metrics
            .handled(service, method, code_name(code_of(result)));
    }

    /// A mutating call: counted and written to the audit log. `outcome` tells what changed.
    pub fn mutating<T>(
        &self,
        service: &str,
        method: &str,
        peer: &Peer,
        request: Value,
        result: &Result<T, Status>,
        outcome: impl FnOnce(&T) -> Value,
    ) {
        let code = code_of(result);
        self.metrics.handled(service, method, code_name(code));
        let (message, result) = match result {
            Ok(value) => (String::new(), outcome(value)),
            Err(status) => (status.message().to_string(), Value::Null),
        };
        self.audit(&Entry {
            call: &format!("{service}/{method}"),
            peer,
            request,
            code: code_name(code),
            message: &message,
            result,
        });
    }

    /// Writes one audit line, if there is a log. A failed write is logged and counted: the
    /// call has already taken effect and cannot be undone.
    pub fn audit(&self, entry: &Entry<'_>) {
        if let Some(log) = &self.audit
            && let Err(e) = log.record(entry)
        {
            self.metrics.audit_write_errors.inc();
            tracing::error!(error = %e, call = entry.call, "writing the audit log");
        }
    }
}

fn code_of<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// How long open connections get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(mut shutdown: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _stop_or_closed = shutdown.wait_for(|stop| *stop).await;
}

/// Where the API is served.
pub enum Listener {
    /// The default: a unix socket; peers are known by their credentials.
    Unix(UnixListener),
    /// TCP, with mTLS (`tls`) or, when the operator insists (`--insecure`), plain.
    Tcp {
        listener: TcpListener,
        tls: Option<ServerTlsConfig>,
    },
}

/// Runs a call into the engine on the blocking pool. The engine is synchronous and its calls
/// may touch the kernel at length — iptables-restore run inside another network namespace,
/// netlink from a thread that entered one, sock_diag dumps, reverting what expired — which must
/// not hold an async worker. At most `ENGINE_CALLS` run at once (they take turns at the
/// engine anyway): a burst of calls waits here, as tasks, instead of growing a thread each.
pub async fn on_engine<T: Send + 'static>(
    engine: &Arc<Engine>,
    call: impl FnOnce(&Engine) -> T + Send + 'static,
) -> Result<T, Status> {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(ENGINE_CALLS);
    let _slot = SLOTS
        .acquire()
        .await
        .map_err(|e| Status::internal(format!("engine task: {e}")))?;
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || call(&engine))
        .await
        .map_err(|e| Status::internal(format!("engine task: {e}")))
}

/// Engine calls on the blocking pool at once.
const ENGINE_CALLS: usize = 16;

/// `on_engine` for a call that may fail: the engine's error becomes the call's status.
pub async fn try_on_engine<T: Send + 'static>(
    engine: &Arc<Engine>,
    call: impl FnOnce(&Engine) -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    on_engine(engine, call).await?.map_err(Status::from)
}

/// What every listener serves: the engine, the probe result, counting and auditing.
#[derive(Clone)]
pub struct Services {
    pub engine: Arc<Engine>,
    pub caps: Arc<Capabilities>,
    pub calls: Calls,
}

impl Services {
    /// Without an audit log.
    pub fn new(engine: Arc<Engine>, caps: Arc<Capabilities>) -> Self {
        let calls = Calls::new(engine.metrics().clone(), None);
        Self {
            engine,
            caps,
            calls,
        }
    }

    pub fn with_audit(mut self, audit: Option<Arc<AuditLog>>) -> Self {
        self.calls = Calls::new(self.engine.metrics().clone(), audit);
        self
    }
}

/// Serves faultd.v1, grpc.health.v1 and server reflection (v1 and v1alpha) on a unix socket
/// until `shutdown` turns true, without an audit log.
pub async fn serve(
    engine: Arc<Engine>,
    caps: Arc<Capabilities>,
    listener: UnixListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_on(
        Services::new(engine, caps),
        Listener::Unix(listener),
        shutdown,
    )
    .await
}

/// Serves the API on `listener` until `shutdown` turns true. KeepAlive and Watch streams end
/// then; connections still open after `SHUTDOWN_GRACE` are dropped.
pub async fn serve_on(
    services: Services,
    listener: Listener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut builder = tonic::transport::Server::builder();
    let server = match listener {
        Listener::Unix(listener) => {
            // Any :authority a stock client sends on a unix socket is let in (authority.rs).
            let incoming = UnixListenerStream::new(listener)
                .map(|stream| stream.map(authority::NormalizedAuthority::new));
            let router = routes(&mut builder, &services, &shutdown).await?;
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(shutdown.clone())))
        }
        Listener::Tcp { listener, tls } => {
            if let Some(tls) = tls {
                builder = builder.tls_config(tls)?;
            }
            // Bounded before TLS has a say (admit.rs).
            let incoming = admit::admit(
                TcpListenerStream::new(listener),
                admit::Limits::of_process(),
            );
            let router = routes(&mut builder, &services, &shutdown).await?;
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(shutdown.clone())))
        }
    };
    let deadline = async {
        stopped(shutdown).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served??,
        () = deadline => tracing::warn!("clients still connected {SHUTDOWN_GRACE:?} after shutdown began; closing"),
    }
    Ok(())
}

async fn routes(
    builder: &mut tonic::transport::Server,
    services: &Services,
    shutdown: &watch::Receiver<bool>,
) -> Result<Router, Box<dyn std::error::Error + Send + Sync>> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FaultServiceServer<FaultApi>>().await;
    health.set_serving::<LeaseServiceServer<LeaseApi>>().await;
    Ok(builder
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(LeaseServiceServer::new(LeaseApi::new(
            services.engine.clone(),
            shutdown.clone(),
            services.calls.clone(),
        )))
        .add_service(FaultServiceServer::new(FaultApi::new(
            services.engine.clone(),
            services.caps.clone(),
            shutdown.clone(),
            services.calls.clone(),
        ))))
}
