//! Command-line configuration of the daemon.

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
    /// Directory this instance owns and locks; two agents cannot share one.
    #[arg(long, default_value = "/run/faultd")]
    pub state_dir: PathBuf,
    /// The cgroup v2 root (default: where cgroup2 is mounted).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Longest lease a client may ask for.
    #[arg(long, default_value = "1h", value_parser = crate::duration::parse)]
    pub max_ttl: Duration,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
