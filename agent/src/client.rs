//! Connecting to faultd as a gRPC client (used by faultctl and the tests): over its unix socket,
//! or over TCP with mTLS (or plain, for an agent started with --insecure).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
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

/// What a client presents and trusts on faultd's TCP listener (PEM bytes).
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// The CA that signed faultd's server certificate.
    pub ca: Vec<u8>,
    /// The client's certificate chain and key (faultd requires one).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check faultd's certificate against (default: the host in the address).
    pub server_name: Option<String>,
}

/// A channel to faultd at `addr` (`HOST:PORT`) over TCP: mTLS with `tls`, plain with None.
pub async fn connect_tcp(addr: &str, tls: Option<Tls>) -> Result<Channel, tonic::transport::Error> {
    let Some(tls) = tls else {
        return Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await;
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca));
    if let Some((cert, key)) = tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = tls.server_name {
        config = config.domain_name(name);
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(config)?
        .connect()
        .await
}
