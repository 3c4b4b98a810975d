//! The channel to faultd: its unix socket, or its TCP listener with mutual TLS (or plain, for a
//! faultd started with --insecure). A failure to connect says what to check.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use faultd::client;
use faultd_proto::v1::CapabilitiesRequest;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::args::{Server, TlsArgs};
use crate::error::{error_chain, rpc_error};

/// Connects where --server says, or else to --socket.
pub async fn channel(server: Option<&Server>, socket: &Path, tls: &TlsArgs) -> Result<Channel> {
    match server {
        Some(Server::Tcp(addr)) => connect_tcp(addr, tls).await,
        Some(Server::Unix(socket)) => connect(socket).await,
        None => connect(socket).await,
    }
}

async fn connect(socket: &Path) -> Result<Channel> {
    client::connect(socket).await.map_err(|err| {
        anyhow!(
            "cannot reach faultd at {}: {}; is faultd running? start it with 'cargo xtask run' \
             or pass --socket",
            socket.display(),
            error_chain(&err)
        )
    })
}

async fn connect_tcp(addr: &str, args: &TlsArgs) -> Result<Channel> {
    let tls = tls_material(args)?;
    let with_tls = tls.is_some();
    let channel = client::connect_tcp(addr, tls).await.map_err(|err| {
        anyhow!(
            "cannot reach faultd at tcp://{addr}: {}; is faultd listening there (--listen), and \
             do --tls-ca, --tls-cert and --tls-key match its --tls-cert and --tls-client-ca?",
            error_chain(&err)
        )
    })?;
    check_admitted(&channel, addr, with_tls).await?;
    Ok(channel)
}

/// The CA, the client identity and the server name from the --tls-* files; None for --insecure.
fn tls_material(args: &TlsArgs) -> Result<Option<client::Tls>> {
    let read = |path: &PathBuf, flag: &str| {
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    let tls = match (&args.tls_ca, args.insecure) {
        (_, true) => None,
        (Some(ca), false) => {
            let identity = match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => {
                    Some((read(cert, "--tls-cert")?, read(key, "--tls-key")?))
                }
                _ => None,
            };
            Some(client::Tls {
                ca: read(ca, "--tls-ca")?,
                identity,
                server_name: args.tls_server_name.clone(),
            })
        }
        (None, false) => bail!("give --tls-ca (checked above)"),
    };
    Ok(tls)
}

/// With TLS 1.3 faultd checks the client's certificate after the client thinks the handshake
/// is done: one cheap call finds out now, with a message that says what to fix.
async fn check_admitted(channel: &Channel, addr: &str, with_tls: bool) -> Result<()> {
    let Err(status) = FaultServiceClient::new(channel.clone())
        .capabilities(CapabilitiesRequest {})
        .await
    else {
        return Ok(());
    };
    let refused = matches!(
        status.code(),
        Code::Cancelled | Code::Unknown | Code::Unavailable
    );
    if with_tls && refused {
        let cause = std::error::Error::source(&status)
            .map(error_chain)
            .unwrap_or_else(|| status.message().to_string());
        bail!(
            "faultd at tcp://{addr} refused this client ({cause}): it admits only clients \
             with a certificate signed by its --tls-client-ca; give --tls-cert and --tls-key"
        );
    }
    Err(rpc_error(format!("calling faultd at tcp://{addr}"))(status))
}
