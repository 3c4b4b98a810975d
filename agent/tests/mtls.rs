//! The TCP listener with mutual TLS: a client with a certificate from the configured CA gets
//! in and is audited by its certificate's subject; one without a certificate, with a
//! certificate from another CA, or speaking plain HTTP/2 is refused. Certificates are made
//! at test time, by the maker faultd-tests uses too.

#[path = "../../tests/src/pki/certs.rs"]
mod certs;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use certs::{Certs, Issued};
use faultd::client::Tls;
use faultd::policy::Policy;
use faultd_proto::v1 as pb;
use pb::fault_service_client::FaultServiceClient;
use support::{Server, drop_fault, inject};
use tonic::transport::{Identity, ServerTlsConfig};

async fn tls_server(name: &str, pki: &Certs) -> (Server, SocketAddr) {
    let server = Server::start(name, Policy::default()).await;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.cert, &pki.server.key))
        .client_ca_root(tonic::transport::Certificate::from_pem(&pki.ca));
    let addr = server.listen_tcp(Some(tls)).await;
    (server, addr)
}

/// A call over TCP with `tls`; Err(text) if the connection or the call fails.
async fn list(addr: SocketAddr, tls: Option<Tls>) -> Result<usize, String> {
    let attempt = async {
        let channel = faultd::client::connect_tcp(&addr.to_string(), tls)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        FaultServiceClient::new(channel)
            .list(pb::ListFaultsRequest::default())
            .await
            .map(|r| r.into_inner().faults.len())
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn tls(pki: &Certs, identity: Option<&Issued>) -> Tls {
    Tls {
        ca: pki.ca.clone().into_bytes(),
        identity: identity.map(|id| (id.cert.clone().into_bytes(), id.key.clone().into_bytes())),
        server_name: Some("localhost".into()),
    }
}

#[tokio::test]
async fn a_client_certificate_from_the_ca_gets_in_and_is_audited_by_subject() {
    let pki = Certs::new();
    let (server, addr) = tls_server("mtls-accept", &pki).await;
    assert_eq!(list(addr, Some(tls(&pki, Some(&pki.client)))).await, Ok(0));

    let channel =
        faultd::client::connect_tcp(&addr.to_string(), Some(tls(&pki, Some(&pki.client))))
            .await
            .unwrap();
    let fault = FaultServiceClient::new(channel)
        .inject(inject(drop_fault(100.0, &[(6379, None)]), "30s"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.fake.rules().len(), 1);
    let lines = server.audit_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let peer = &lines[0]["peer"];
    assert_eq!(peer["transport"], "mtls", "{peer}");
    let subject = peer["subject"].as_str().unwrap();
    assert!(
        subject.contains("CN=chaos-controller") && subject.contains("O=faultd tests"),
        "the audit log should name the certificate's subject: {subject}"
    );
    assert!(
        peer["addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{peer}"
    );
    assert_eq!(lines[0]["result"]["faultId"], fault.id);
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_are_refused() {
    let pki = Certs::new();
    let (server, addr) = tls_server("mtls-refuse", &pki).await;

    let no_cert = list(addr, Some(tls(&pki, None))).await;
    assert!(
        no_cert
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRequired")),
        "a client without a certificate should be refused with the TLS alert CertificateRequired: {no_cert:?}"
    );
    let stranger = list(addr, Some(tls(&pki, Some(&pki.stranger)))).await;
    assert!(
        stranger.as_ref().is_err_and(|e| e.contains("UnknownCA")),
        "a client with a certificate from another CA should be refused with the TLS alert UnknownCA: {stranger:?}"
    );
    let plain = list(addr, None).await;
    assert!(plain.is_err(), "a plain-text client got in: {plain:?}");

    // Nothing they tried reached the engine; the right client still gets in.
    assert!(
        server.audit_lines().is_empty(),
        "{:?}",
        server.audit_lines()
    );
    assert_eq!(list(addr, Some(tls(&pki, Some(&pki.client)))).await, Ok(0));
}

#[tokio::test]
async fn insecure_tcp_serves_plain_http2_and_audits_the_address() {
    let server = Server::start("insecure", Policy::default()).await;
    let addr = server.listen_tcp(None).await;
    let channel = faultd::client::connect_tcp(&addr.to_string(), None)
        .await
        .unwrap();
    FaultServiceClient::new(channel)
        .abort(pb::AbortRequest {})
        .await
        .unwrap();
    let lines = server.audit_lines();
    assert_eq!(lines[0]["peer"]["transport"], "tcp", "{lines:?}");
}
