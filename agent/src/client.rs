//! Connecting to faultd's unix socket as a gRPC client (used by faultctl and the tests).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tower::service_fn;

/// The socket faultd listens on unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/faultd/faultd.sock";

/// A channel to the faultd serving `socket`. Fails if nothing accepts on it.
pub async fn connect(socket: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.as_ref().to_path_buf();
    // The URI is required by the API but unused: the connector dials the unix socket.
    Endpoint::from_static("http://faultd.local")
        .connect_with_connector(service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
}
