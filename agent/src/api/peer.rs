//! Who is calling: the unix peer's credentials (SO_PEERCRED, as tonic's UDS connect info carries
//! them), or the subject of the client certificate that mTLS verified.

use tonic::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::audit::Peer;

pub fn of<T>(request: &Request<T>) -> Peer {
    let extensions = request.extensions();
    if let Some(info) = extensions.get::<UdsConnectInfo>() {
        return match info.peer_cred {
            Some(cred) => Peer::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            None => Peer::Unknown,
        };
    }
    if let Some(info) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
        let subject = info
            .peer_certs()
            .and_then(|certs| certs.first().map(|der| subject(der.as_ref())))
            .unwrap_or_else(|| "(no client certificate)".into());
        return Peer::Tls {
            subject,
            addr: info.get_ref().remote_addr(),
        };
    }
    if let Some(info) = extensions.get::<TcpConnectInfo>() {
        return Peer::Tcp {
            addr: info.remote_addr(),
        };
    }
    Peer::Unknown
}

/// The certificate's subject as RFC 4514-ish text, e.g. `CN=chaos-controller, O=platform`.
pub fn subject(der: &[u8]) -> String {
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => cert.subject().to_string(),
        Err(e) => format!("(unreadable certificate: {e})"),
    }
}
