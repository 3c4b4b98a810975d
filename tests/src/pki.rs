//! Certificates made at test time for faultd's mTLS listener ([`certs`]: a CA, a server
//! certificate for localhost and 127.0.0.1, a client certificate, and a client certificate from
//! another CA), written to files for the faultd binary and its clients.

pub mod certs;

use std::path::PathBuf;

use certs::{CLIENT_CN, Certs};

use crate::tempdir::TempDir;

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
        let certs = Certs::new();
        Pki {
            ca: write("ca.pem", &certs.ca),
            server_cert: write("server.pem", &certs.server.cert),
            server_key: write("server.key", &certs.server.key),
            client_cert: write("client.pem", &certs.client.cert),
            client_key: write("client.key", &certs.client.key),
            stranger_cert: write("stranger.pem", &certs.stranger.cert),
            stranger_key: write("stranger.key", &certs.stranger.key),
            client_cn: CLIENT_CN.to_string(),
            _dir: dir,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
