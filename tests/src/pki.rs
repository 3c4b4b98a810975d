//! Certificates made at test time for faultd's mTLS listener: a CA, a server certificate for
//! localhost and 127.0.0.1, a client certificate, and a client certificate from another CA.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::tempdir::TempDir;

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

    fn issue(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "faultd tests");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// PEM files in a directory removed on drop.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Subject `CN=<client_cn>, O=faultd tests`, signed by `ca`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The same subject, signed by a CA faultd does not trust.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
    pub client_cn: String,
    _dir: TempDir,
}

impl Pki {
    /// faultd's arguments for a TCP listener on a free loopback port with these certificates:
    /// its own, and the CA it checks clients against.
    pub fn listener_args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        vec![
            "--listen".into(),
            "tcp://127.0.0.1:0".into(),
            "--tls-cert".into(),
            path(&self.server_cert),
            "--tls-key".into(),
            path(&self.server_key),
            "--tls-client-ca".into(),
            path(&self.ca),
        ]
    }

    pub fn new() -> Pki {
        let dir = TempDir::new("faultd-test-pki");
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        };
        let ca = Ca::new("faultd test CA");
        let client_cn = "chaos-controller".to_string();
        let (server_cert, server_key) = ca.issue(
            "faultd",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            ca.issue(&client_cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let other = Ca::new("another CA");
        let (stranger_cert, stranger_key) =
            other.issue(&client_cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: write("ca.pem", &ca.cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            stranger_cert: write("stranger.pem", &stranger_cert),
            stranger_key: write("stranger.key", &stranger_key),
            client_cn,
            _dir: dir,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
