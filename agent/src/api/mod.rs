//! The gRPC API: conversion between proto and domain, and the status code of each error kind.
//! The engine knows nothing of tonic.

pub mod convert;
mod fault;
mod lease;

use std::sync::Arc;
use std::time::Duration;

use faultd_proto::v1::{
    FILE_DESCRIPTOR_SET, fault_service_server::FaultServiceServer,
    lease_service_server::LeaseServiceServer,
};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

pub use self::fault::FaultApi;
pub use self::lease::LeaseApi;
use crate::caps::Capabilities;
use crate::dataplane::DataplaneError;
use crate::engine::{Engine, Error};
use crate::fault::Invalid;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::NotFound { .. } => Status::not_found(message),
            Error::Conflict(_) => Status::already_exists(message),
            Error::Exhausted(_) => Status::resource_exhausted(message),
            Error::Unsupported(_) | Error::Dataplane(DataplaneError::Unsupported { .. }) => {
                Status::failed_precondition(message)
            }
            Error::Dataplane(_) => Status::internal(message),
        }
    }
}

impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Self {
        Status::invalid_argument(invalid.to_string())
    }
}

/// How long open connections get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(mut shutdown: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _stop_or_closed = shutdown.wait_for(|stop| *stop).await;
}

/// Serves faultd.v1, grpc.health.v1 and server reflection (v1 and v1alpha) on `listener`
/// until `shutdown` turns true. KeepAlive streams end then; connections still open after
/// `SHUTDOWN_GRACE` are dropped.
pub async fn serve(
    engine: Arc<Engine>,
    caps: Arc<Capabilities>,
    listener: UnixListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FaultServiceServer<FaultApi>>().await;
    health.set_serving::<LeaseServiceServer<LeaseApi>>().await;
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(LeaseServiceServer::new(LeaseApi::new(
            engine.clone(),
            shutdown.clone(),
        )))
        .add_service(FaultServiceServer::new(FaultApi::new(engine, caps)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(shutdown.clone()));
    let deadline = async {
        stopped(shutdown).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!("clients still connected {SHUTDOWN_GRACE:?} after shutdown began; closing"),
    }
    Ok(())
}
