//! Command-line configuration of the daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::client::DEFAULT_SOCKET;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// faultd: injects network faults (drop, ...) into chosen workloads, under leases.
#[derive(Debug, Parser)]
#[command(name = "faultd", version)]
pub struct Config {
    /// Unix socket to serve the gRPC API on (mode 0660).
    #[arg(long, default_value = DEFAULT_SOCKET, env = "FAULTD_SOCKET")]
    pub socket: PathBuf,
    /// Group that owns the unix socket (name or gid): its members may call faultd.
    #[arg(long, value_name = "GROUP", env = "FAULTD_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Also serve the API on TCP, e.g. tcp://0.0.0.0:7443. Requires mTLS (--tls-cert,
    /// --tls-key, --tls-client-ca) unless --insecure is given.
    #[arg(long, value_name = "tcp://ADDR", value_parser = parse_listen, env = "FAULTD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain faultd presents on --listen.
    #[arg(long, value_name = "PEM", env = "FAULTD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", env = "FAULTD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: only clients with a certificate signed by it may connect on --listen.
    #[arg(long, value_name = "PEM", env = "FAULTD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve --listen as plain TCP, without TLS: anyone who reaches the port controls faultd.
    #[arg(long)]
    pub insecure: bool,
    /// Serve Prometheus metrics (/metrics) and /healthz over HTTP on this address.
    #[arg(long, value_name = "ADDR", env = "FAULTD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Append one JSON line per mutating call (who, what, when, result) to this file.
    #[arg(long, value_name = "PATH", env = "FAULTD_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Guardrails (TOML): limits, protected ports, the host scope. Without it the safe defaults
    /// apply: max ttl 1h, max fault duration 1h, 1000 faults, 1000 leases, ports 22, 53, 6443,
    /// 10250 and faultd's own protected, no host scope.
    #[arg(long, value_name = "PATH", env = "FAULTD_POLICY")]
    pub policy: Option<PathBuf>,
    /// Longest lease a client may ask for; overrides the policy's max_ttl.
    #[arg(long, value_parser = crate::duration::parse)]
    pub max_ttl: Option<Duration>,
    /// How long an ended fault stays readable with its final counters and end reason (Get,
    /// List with SELECT_ENDED, `faultctl list --ended`); 0 keeps none. The totals in
    /// /metrics count every fault regardless.
    #[arg(long, value_parser = crate::duration::parse, default_value = "15m", env = "FAULTD_ENDED_RETENTION")]
    pub ended_retention: Duration,
    /// Allow faults on the whole host; overrides the policy's allow_host_scope.
    #[arg(long, env = "FAULTD_ALLOW_HOST_SCOPE")]
    pub allow_host_scope: bool,
    /// Directory this instance owns and locks; two agents cannot share one.
    #[arg(long, default_value = "/run/faultd")]
    pub state_dir: PathBuf,
    /// Directory shared by the faultd instances of this host, where each says which targets
    /// its faults hold: a fault that another live instance holds is refused.
    #[arg(long, default_value = crate::claims::DEFAULT_DIR, env = "FAULTD_INSTANCES_DIR")]
    pub instances_dir: PathBuf,
    /// The cgroup v2 root (default: where cgroup2 is mounted); a hybrid layout's
    /// /sys/fs/cgroup means its `unified`.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `tcp://IP:PORT`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let Some(addr) = text.strip_prefix("tcp://") else {
        return Err(format!(
            "{text:?}: write tcp://IP:PORT, e.g. tcp://0.0.0.0:7443 (the unix socket is --socket)"
        ));
    };
    addr.parse().map_err(|_| {
        format!("{text:?}: {addr:?} is not IP:PORT, e.g. tcp://0.0.0.0:7443 or tcp://[::1]:7443")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_tcp_addresses_only() {
        assert_eq!(
            parse_listen("tcp://127.0.0.1:7443"),
            Ok("127.0.0.1:7443".parse().unwrap())
        );
        assert!(parse_listen("tcp://[::1]:7443").is_ok());
        assert!(parse_listen("127.0.0.1:7443").is_err());
        assert!(parse_listen("tcp://localhost:7443").is_err());
        assert!(parse_listen("unix:///run/faultd.sock").is_err());
    }

    #[test]
    fn flags_parse() {
        let config = Config::try_parse_from([
            "faultd",
            "--listen",
            "tcp://127.0.0.1:7443",
            "--insecure",
            "--max-ttl",
            "10m",
            "--allow-host-scope",
        ])
        .unwrap();
        assert_eq!(config.max_ttl, Some(Duration::from_secs(600)));
        assert!(config.insecure && config.allow_host_scope);
    }
}
