//! The certificates of the mTLS tests, made at test time, as PEM text: a CA, a server
//! certificate for localhost and 127.0.0.1, a client certificate, and a client certificate
//! with the same subject from another CA.
//!
//! One file serves two crates: faultd-tests (`pki.rs`, which writes these to files for the
//! faultd binary) and faultd-agent's in-process mTLS test (`agent/tests/mtls.rs`, through
//! `#[path]`). The agent cannot depend on faultd-tests, which depends on it. So this file uses
//! nothing but `rcgen` and std.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The client certificates' common name; their subject is `CN=<this>, O=faultd tests`.
pub const CLIENT_CN: &str = "chaos-controller";

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

pub struct Certs {
    /// The CA faultd checks clients against and clients check faultd against.
    pub ca: String,
    pub server: Issued,
    /// Signed by `ca`.
    pub client: Issued,
    /// The same subject as `client`, signed by a CA faultd does not trust.
    pub stranger: Issued,
}

impl Certs {
    pub fn new() -> Certs {
        let ca = Ca::new("faultd test CA");
        let server = ca.issue(
            "faultd",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = ca.issue(CLIENT_CN, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let other = Ca::new("another CA");
        let stranger = other.issue(CLIENT_CN, &[], ExtendedKeyUsagePurpose::ClientAuth);
        Certs {
            ca: ca.cert.pem(),
            server,
            client,
            stranger,
        }
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A certificate for `common_name`, valid for `names` (DNS names or IPs).
    fn issue(&self, common_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "faultd tests");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}
