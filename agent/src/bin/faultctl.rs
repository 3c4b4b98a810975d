//! `faultctl`, the command-line client of faultd: it turns flags into `faultd.v1` requests over
//! the agent's unix socket (or its mTLS TCP listener, `--server tcp://...`) and prints the
//! answers for people (`--output text`) or scripts (`--output json`, proto3 JSON field names).
//! It holds no state of its own except, with `--keepalive`, the lease it keeps alive until
//! Ctrl-C or SIGTERM.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::builder::NonEmptyStringValueParser;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use faultd::api::code_name;
use faultd::{client, duration};
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use faultd_proto::v1::{
    self as pb, AbortRequest, CapabilitiesRequest, CapabilitiesResponse, Fault, FaultEvent,
    FaultSelection, FaultState, GetFaultRequest, GrantRequest, InjectRequest, KeepAliveRequest,
    Lease, ListFaultsRequest, ListLeasesRequest, PortRange, RemoveRequest, RenewRequest,
    RevokeRequest, Target, TimeToLiveRequest, WatchRequest, fault, fault_event, inject_request,
    target,
};
use serde_json::{Map, Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

// ---------------------------------------------------------------------------------------------
// Command line

/// Inject network faults through faultd and manage the leases that bound them.
#[derive(Parser, Debug)]
#[command(name = "faultctl", version)]
struct Cli {
    /// The unix socket faultd listens on.
    #[arg(long, global = true, env = "FAULTD_SOCKET", default_value = client::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where faultd serves: unix:///PATH (like --socket) or tcp://HOST:PORT (its --listen).
    #[arg(long, global = true, env = "FAULTD_SERVER", value_name = "URL", value_parser = parse_server)]
    server: Option<Server>,
    #[command(flatten)]
    tls: TlsArgs,
    /// How to print answers: for people, or one JSON document per command.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Server {
    Unix(PathBuf),
    /// HOST:PORT.
    Tcp(String),
}

/// For --server tcp://: faultd's listener requires mTLS unless it was started with --insecure.
#[derive(Args, Debug, Default)]
struct TlsArgs {
    /// PEM CA that signed faultd's server certificate.
    #[arg(long, global = true, value_name = "PEM", env = "FAULTCTL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, signed by the CA faultd trusts (its --tls-client-ca).
    #[arg(long, global = true, value_name = "PEM", env = "FAULTCTL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "PEM", env = "FAULTCTL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Name to check faultd's certificate against (default: the host of --server).
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Plain TCP, for a faultd started with --insecure.
    #[arg(long, global = true)]
    insecure: bool,
}

fn parse_server(text: &str) -> Result<Server, String> {
    if let Some(path) = text.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(format!("{text:?}: write unix:///run/faultd/faultd.sock"));
        }
        return Ok(Server::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = text.strip_prefix("tcp://") {
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!(
                "{text:?}: write tcp://HOST:PORT, e.g. tcp://10.0.0.5:7443"
            ));
        }
        return Ok(Server::Tcp(addr.to_string()));
    }
    Err(format!(
        "{text:?}: write unix:///PATH or tcp://HOST:PORT, e.g. --server tcp://10.0.0.5:7443"
    ))
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Apply a fault under a lease.
    #[command(subcommand)]
    Inject(InjectCommand),
    /// List the faults in force (with --ended, those that ended within faultd's
    /// --ended-retention, with their final counters and end reason).
    List {
        /// Only faults that ended: final counters, when and why they ended.
        #[arg(long, conflicts_with = "all")]
        ended: bool,
        /// Faults in force and ended ones.
        #[arg(long)]
        all: bool,
    },
    /// Show one fault in detail (in force, or ended within faultd's --ended-retention).
    Get { id: String },
    /// Revert a fault now.
    Rm { id: String },
    /// Emergency stop: revert every fault and revoke every lease of the agent.
    Abort,
    /// Show what the kernel offers and which actions can be applied.
    Caps,
    /// Print fault events as they happen (applied, reverted with the reason, failed) until
    /// Ctrl-C; with --output json one JSON object a line.
    Watch,
    /// Manage leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Ask faultd's gRPC health service whether it serves (exit 0) or not (exit 1): for
    /// liveness and readiness probes.
    Health,
}

#[derive(Subcommand, Debug)]
enum InjectCommand {
    /// Drop a share of the matched packets.
    Drop(DropArgs),
    /// Refuse new TCP connections to the ports with "Connection refused" (ECONNREFUSED).
    Reject(InjectArgs),
    /// Tear down the established TCP connections on the ports now and refuse new ones.
    Reset(ResetArgs),
    /// Hold each matched packet for a latency (± jitter), keeping each flow's order.
    Delay(DelayArgs),
    /// Pace the matched packets to a rate.
    Bandwidth(BandwidthArgs),
}

#[derive(Args, Debug)]
struct DelayArgs {
    #[command(flatten)]
    common: InjectArgs,
    /// Added delay, e.g. 100ms, 1.5s.
    #[arg(long, value_name = "DURATION", value_parser = parse_latency)]
    latency: Duration,
    /// Standard deviation of a normally distributed extra delay, e.g. 20ms.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_jitter)]
    jitter: Duration,
    /// How much each packet's random part follows the previous one's, 0 to 100 (%).
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    correlation: f64,
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    mechanism: MechanismArg,
}

#[derive(Args, Debug)]
struct BandwidthArgs {
    #[command(flatten)]
    common: InjectArgs,
    /// Rate per direction, e.g. 256KiB/s, 1MB/s, 10mbit (bytes unless the unit says bit).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    rate: u64,
    /// Bytes that may pass at once after a pause, e.g. 32KiB (default: 10 ms at the rate).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    burst: Option<u64>,
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    mechanism: MechanismArg,
}

/// How faultd applies a delay or bandwidth fault; `auto` lets it choose.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum MechanismArg {
    Auto,
    Netem,
    Edt,
    Nfqueue,
}

impl MechanismArg {
    fn to_proto(self) -> i32 {
        match self {
            Self::Auto => pb::Mechanism::Unspecified,
            Self::Netem => pb::Mechanism::Netem,
            Self::Edt => pb::Mechanism::Edt,
            Self::Nfqueue => pb::Mechanism::Nfqueue,
        }
        .into()
    }
}

#[derive(Args, Debug)]
struct DropArgs {
    #[command(flatten)]
    common: InjectArgs,
    /// Share of the matched packets to drop, 0 to 100.
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent)]
    percent: f64,
}

#[derive(Args, Debug)]
struct ResetArgs {
    #[command(flatten)]
    common: InjectArgs,
    /// Instead: tear down each connection once it has carried this many bytes, and let new
    /// connections open (each gets the same allowance).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    after_bytes: Option<u64>,
}

/// What every action takes: the target, the lease, labels.
#[derive(Args, Debug)]
struct InjectArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    lease: LeaseChoice,
    /// Label of the fault (and of the lease faultctl grants for it); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Keep the lease alive until Ctrl-C or SIGTERM, then revert the fault.
    #[arg(long, conflicts_with = "dry_run")]
    keepalive: bool,
    /// Validate, check the policy and resolve the target, and show what would be applied;
    /// nothing changes.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug)]
struct TargetArgs {
    #[command(flatten)]
    scope: ScopeArgs,
    /// Port or inclusive range; repeatable and comma-separated. At least one: faultd refuses
    /// a fault on every port.
    #[arg(
        long = "port",
        value_name = "PORT[-LAST]",
        value_delimiter = ',',
        required = true
    )]
    #[arg(value_parser = parse_port_range)]
    ports: Vec<PortRange>,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Both)]
    protocol: ProtocolArg,
    /// Seen from the workload: egress is what it sends, ingress what it receives.
    #[arg(long, value_enum, default_value_t = DirectionArg::Both)]
    direction: DirectionArg,
    /// The interface of --netns.
    #[arg(long, value_name = "NAME")]
    iface: Option<String>,
    /// Only traffic with this remote address or CIDR (IPv4 or IPv6, e.g. 10.0.0.0/8,
    /// fd00::/64, 127.0.0.2); repeatable and comma-separated. Default: every peer.
    #[arg(long = "peer", value_name = "CIDR", value_delimiter = ',')]
    peers: Vec<String>,
    /// Spare traffic with this remote address or CIDR; repeatable and comma-separated.
    #[arg(long = "exclude-peer", value_name = "CIDR", value_delimiter = ',')]
    exclude_peers: Vec<String>,
}

/// Where the fault applies: exactly one of these.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct ScopeArgs {
    /// A cgroup, by path relative to the cgroup v2 root, e.g. /app.
    #[arg(long, value_name = "PATH", value_parser = NonEmptyStringValueParser::new())]
    cgroup: Option<String>,
    /// The cgroup of this process.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pid: Option<u32>,
    /// Every socket on the node.
    #[arg(long)]
    host: bool,
    /// Every container of a Kubernetes pod on this node, by uid (metadata.uid), including
    /// containers that restart or start later.
    #[arg(long, value_name = "UID", value_parser = NonEmptyStringValueParser::new())]
    pod: Option<String>,
    /// One container on this node, by its full id (`crictl ps --no-trunc`).
    #[arg(long, value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
    container: Option<String>,
    /// An interface in a network namespace (/run/netns/NAME or /proc/PID/ns/net), named with
    /// --iface: what crosses it, routed traffic included (drop, delay, bandwidth).
    #[arg(long, value_name = "PATH", value_parser = NonEmptyStringValueParser::new(), requires = "iface")]
    netns: Option<String>,
}

/// What bounds the fault's life: exactly one of these.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct LeaseChoice {
    /// Put the fault under a new lease of this ttl, e.g. 30s, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    ttl: Option<Duration>,
    /// Put the fault under this existing lease.
    #[arg(long = "lease", value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
    lease_id: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProtocolArg {
    Tcp,
    Udp,
    Both,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DirectionArg {
    Egress,
    Ingress,
    Both,
}

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Grant a lease.
    Grant {
        /// How long the lease lives unless renewed, e.g. 30s, 2m.
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Duration,
        /// Label of the lease; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Renew a lease once, for its ttl.
    Renew { id: String },
    /// Revoke a lease now: its faults revert.
    Revoke { id: String },
    /// Show a lease and its remaining time.
    Ttl { id: String },
    /// List the leases.
    List,
}

const PORT_EXAMPLE: &str = "e.g. --port 6379, --port 8000-8010 or --port 6379,5432";

/// One port: 1 to 65535.
fn parse_port(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port),
        _ => Err(format!(
            "{text:?} is not a port: use a number from 1 to 65535, {PORT_EXAMPLE}"
        )),
    }
}

/// `N` or `N-M` with N <= M.
fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let Some((first, last)) = text.split_once('-') else {
        return Ok(PortRange {
            first: parse_port(text)?,
            last: None,
        });
    };
    let (first, last) = (parse_port(first)?, parse_port(last)?);
    if first > last {
        return Err(format!(
            "{text:?}: the first port is above the last; write the range low to high, \
             e.g. --port {last}-{first}"
        ));
    }
    Ok(PortRange {
        first,
        last: Some(last),
    })
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "{text:?} is not a label: write KEY=VALUE, e.g. --label experiment=redis-outage"
        )),
    }
}

/// Labels as a map; a key given twice is a mistake, not something to resolve silently.
fn label_map(labels: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (key, value) in labels {
        if map.insert(key.clone(), value.clone()).is_some() {
            return Err(format!(
                "label {key:?} is given twice: give each --label key once"
            ));
        }
    }
    Ok(map)
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    match duration::parse(text) {
        Ok(ttl) if !ttl.is_zero() => Ok(ttl),
        Ok(_) => Err("a ttl must be longer than zero, e.g. --ttl 30s".into()),
        Err(why) => Err(format!("{why}; write e.g. --ttl 30s, 500ms, 2m or 1m30s")),
    }
}

fn parse_latency(text: &str) -> Result<Duration, String> {
    match duration::parse(text) {
        Ok(latency) if !latency.is_zero() => Ok(latency),
        Ok(_) => Err("a delay must be longer than zero, e.g. --latency 100ms".into()),
        Err(why) => Err(format!("{why}; write e.g. --latency 100ms or 1.5s")),
    }
}

fn parse_jitter(text: &str) -> Result<Duration, String> {
    duration::parse(text).map_err(|why| format!("{why}; write e.g. --jitter 20ms"))
}

/// `NUMBER[UNIT]`: bytes, or bits when the unit says so. Returns bytes.
fn parse_quantity(text: &str, bits_allowed: bool) -> Option<u64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let bytes = match unit.trim() {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        bits if bits_allowed => match bits.to_ascii_lowercase().as_str() {
            "bit" => 1.0 / 8.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            _ => return None,
        },
        _ => return None,
    };
    let value = (number * bytes).round();
    (value.is_finite() && value >= 1.0 && value < u64::MAX as f64).then_some(value as u64)
}

/// A rate in bytes per second: `256KiB/s`, `1MB/s`, `10mbit`, `5000` (bytes/s).
fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let unit = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    parse_quantity(unit, true).ok_or_else(|| {
        format!(
            "{text:?} is not a rate: write e.g. --rate 256KiB/s, 1MB/s or 10mbit \
             (B, KB, KiB, MB, MiB, GB, GiB per second, or bit, kbit, mbit, gbit)"
        )
    })
}

/// A size in bytes: `32KiB`, `1500`, `1MB`.
fn parse_size(text: &str) -> Result<u64, String> {
    parse_quantity(text.trim(), false).ok_or_else(|| {
        format!("{text:?} is not a size: write e.g. --burst 32KiB or 1500 (B, KB, KiB, MB, MiB)")
    })
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches('%').parse::<f64>() {
        Ok(percent) if (0.0..=100.0).contains(&percent) => Ok(percent),
        _ => Err(format!(
            "{text:?}: write a percentage from 0 to 100, e.g. --percent 50"
        )),
    }
}

impl ScopeArgs {
    fn to_proto(&self) -> Option<target::Scope> {
        if self.host {
            Some(target::Scope::Host(pb::HostScope {}))
        } else if let Some(path) = &self.cgroup {
            Some(target::Scope::Cgroup(pb::CgroupScope {
                path: path.clone(),
            }))
        } else if let Some(uid) = &self.pod {
            Some(target::Scope::Pod(pb::PodScope { uid: uid.clone() }))
        } else if let Some(path) = &self.netns {
            Some(target::Scope::Netns(pb::NetnsScope {
                path: path.clone(),
                interface: String::new(),
            }))
        } else if let Some(id) = &self.container {
            Some(target::Scope::Container(pb::ContainerScope {
                id: id.clone(),
            }))
        } else {
            self.pid.map(|pid| target::Scope::Pid(pb::PidScope { pid }))
        }
    }
}

impl TargetArgs {
    fn to_proto(&self) -> Target {
        let protocol = match self.protocol {
            ProtocolArg::Tcp => pb::Protocol::Tcp,
            ProtocolArg::Udp => pb::Protocol::Udp,
            // The API has no BOTH protocol: unspecified means TCP and UDP.
            ProtocolArg::Both => pb::Protocol::Unspecified,
        };
        let direction = match self.direction {
            DirectionArg::Egress => pb::Direction::Egress,
            DirectionArg::Ingress => pb::Direction::Ingress,
            DirectionArg::Both => pb::Direction::Both,
        };
        let mut scope = self.scope.to_proto();
        if let (Some(target::Scope::Netns(netns)), Some(iface)) = (&mut scope, &self.iface) {
            netns.interface = iface.clone();
        }
        Target {
            scope,
            ports: self.ports.clone(),
            protocol: protocol as i32,
            direction: direction as i32,
            peers: self.peers.clone(),
            exclude_peers: self.exclude_peers.clone(),
        }
    }
}

/// Exits with clap's usage error (code 2) for mistakes clap cannot see by itself.
fn usage_error(message: impl Display) -> ! {
    Cli::command()
        .error(ErrorKind::ValueValidation, message)
        .exit()
}

// ---------------------------------------------------------------------------------------------
// Running commands

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("faultctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks what clap cannot, so a mistake is a usage error (exit 2) before any call is made.
fn validate(command: &Command) -> Result<(), String> {
    match command {
        Command::Inject(command) => {
            let args = command.common();
            if args.target.scope.to_proto().is_none() {
                return Err(
                    "choose where the fault applies: --cgroup PATH, --pid PID, --pod UID, \
                     --container ID, --netns PATH --iface NAME or --host"
                        .into(),
                );
            }
            if args.target.iface.is_some() && args.target.scope.netns.is_none() {
                return Err("--iface names an interface of --netns PATH: give both".into());
            }
            label_map(&args.labels).map(drop)
        }
        Command::Lease(LeaseCommand::Grant { labels, .. }) => label_map(labels).map(drop),
        _ => Ok(()),
    }
}

/// Checks the connection flags: TLS only over TCP, and TCP either with TLS or with --insecure.
fn validate_connection(server: Option<&Server>, tls: &TlsArgs) -> Result<(), String> {
    let tls_given = tls.tls_ca.is_some() || tls.tls_cert.is_some() || tls.tls_key.is_some();
    match server {
        Some(Server::Tcp(addr)) => {
            if tls.insecure && tls_given {
                return Err(
                    "--insecure is plain TCP: drop the --tls-* flags, or --insecure".into(),
                );
            }
            if !tls.insecure && tls.tls_ca.is_none() {
                return Err(format!(
                    "faultd's TCP listener uses mutual TLS: give --tls-ca, --tls-cert and \
                     --tls-key for tcp://{addr} (or --insecure for a faultd started with \
                     --insecure)"
                ));
            }
            if tls.tls_cert.is_some() != tls.tls_key.is_some() {
                return Err("give --tls-cert and --tls-key together".into());
            }
            Ok(())
        }
        _ if tls_given || tls.insecure || tls.tls_server_name.is_some() => Err(
            "--tls-* and --insecure are for --server tcp://HOST:PORT; the unix socket needs none"
                .into(),
        ),
        _ => Ok(()),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let output = cli.output;
    if let Err(why) =
        validate(&cli.command).and_then(|()| validate_connection(cli.server.as_ref(), &cli.tls))
    {
        usage_error(why);
    }
    let channel = match &cli.server {
        Some(Server::Tcp(addr)) => connect_tcp(addr, &cli.tls).await?,
        Some(Server::Unix(socket)) => connect(socket).await?,
        None => connect(&cli.socket).await?,
    };
    if let Command::Health = cli.command {
        return health(channel, output).await;
    }
    let mut faults = FaultServiceClient::new(channel.clone());
    let mut leases = LeaseServiceClient::new(channel);
    match cli.command {
        Command::Inject(command) => {
            let (args, action) = command.into_parts();
            inject(&mut faults, &mut leases, args, action, output).await
        }
        Command::List { ended, all } => {
            let select = match (ended, all) {
                (true, _) => FaultSelection::SelectEnded,
                (_, true) => FaultSelection::SelectAll,
                _ => FaultSelection::SelectActive,
            };
            let list = faults
                .list(ListFaultsRequest {
                    select: select.into(),
                })
                .await
                .map_err(rpc_error("listing faults"))?;
            let list = list.into_inner().faults;
            let json = json!({ "faults": list.iter().map(fault_json).collect::<Vec<_>>() });
            show(output, || fault_table(&list), json)
        }
        Command::Get { id } => {
            let request = GetFaultRequest { id: id.clone() };
            let fault = faults
                .get(request)
                .await
                .map_err(rpc_error(format!("getting fault {id}")))?;
            let fault = fault.into_inner();
            show(output, || fault_detail(&fault), fault_json(&fault))
        }
        Command::Rm { id } => {
            let request = RemoveRequest { id: id.clone() };
            let fault = faults
                .remove(request)
                .await
                .map_err(rpc_error(format!("removing fault {id}")))?;
            let fault = fault.into_inner();
            show(output, || removed_text(&fault), fault_json(&fault))
        }
        Command::Abort => {
            let abort = faults
                .abort(AbortRequest {})
                .await
                .map_err(rpc_error("aborting"))?;
            let abort = abort.into_inner();
            let json = object(vec![
                ("revertedFaultIds", json!(abort.reverted_fault_ids)),
                ("revokedLeaseIds", json!(abort.revoked_lease_ids)),
                ("took", duration_json(abort.took.as_ref())),
            ]);
            show(output, || abort_text(&abort), json)
        }
        Command::Caps => {
            let caps = faults.capabilities(CapabilitiesRequest {}).await;
            let caps = caps
                .map_err(rpc_error("reading capabilities"))?
                .into_inner();
            show(output, || caps_text(&caps), caps_json(&caps))
        }
        Command::Lease(command) => lease_command(&mut leases, command, output).await,
        Command::Watch => watch(&mut faults, output).await,
        Command::Health => unreachable!("answered above"),
    }
}

/// `grpc.health.v1.Health/Check` for the whole server (empty service name).
async fn health(channel: Channel, output: Output) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(rpc_error("checking health"))?
        .into_inner();
    let status = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    let name = status.as_str_name();
    show(output, || name.to_string(), json!({ "status": name }))?;
    if status != ServingStatus::Serving {
        anyhow::bail!("faultd is not serving ({name})");
    }
    Ok(())
}

async fn connect_tcp(addr: &str, args: &TlsArgs) -> Result<Channel> {
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
    let with_tls = tls.is_some();
    let channel = client::connect_tcp(addr, tls).await.map_err(|err| {
        anyhow!(
            "cannot reach faultd at tcp://{addr}: {}; is faultd listening there (--listen), and \
             do --tls-ca, --tls-cert and --tls-key match its --tls-cert and --tls-client-ca?",
            error_chain(&err)
        )
    })?;
    // With TLS 1.3 faultd checks the client's certificate after the client thinks the
    // handshake is done: one cheap call finds out now, with a message that says what to fix.
    if let Err(status) = FaultServiceClient::new(channel.clone())
        .capabilities(CapabilitiesRequest {})
        .await
    {
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
        return Err(rpc_error(format!("calling faultd at tcp://{addr}"))(status));
    }
    Ok(channel)
}

/// Prints events until Ctrl-C (Ok) or until faultd ends the stream (Err: it says why).
async fn watch(faults: &mut FaultServiceClient<Channel>, output: Output) -> Result<()> {
    let mut signals = Signals::install()?;
    let mut events = faults
        .watch(WatchRequest {})
        .await
        .map_err(rpc_error("watching events"))?
        .into_inner();
    loop {
        let event = tokio::select! {
            _ = signals.recv() => return Ok(()),
            event = events.message() => event,
        };
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => bail!("faultd closed the event stream"),
            Err(status) => return Err(rpc_error("watching events")(status)),
        };
        let line = match output {
            Output::Text => event_text(&event),
            Output::Json => event_json(&event).to_string(),
        };
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .context("writing to stdout")?;
    }
}

async fn connect(socket: &std::path::Path) -> Result<Channel> {
    client::connect(socket).await.map_err(|err| {
        anyhow!(
            "cannot reach faultd at {}: {}; is faultd running? start it with 'cargo xtask run' \
             or pass --socket",
            socket.display(),
            error_chain(&err)
        )
    })
}

/// Prints the text or the JSON document, and flushes so a reading script sees it at once.
fn show(output: Output, text: impl FnOnce() -> String, json: Value) -> Result<()> {
    let rendered = match output {
        Output::Text => text(),
        Output::Json => serde_json::to_string_pretty(&json).context("encoding JSON")?,
    };
    let mut stdout = std::io::stdout().lock();
    // Written by hand rather than println! so a closed pipe is an error, not a panic.
    writeln!(stdout, "{}", rendered.trim_end())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

async fn lease_command(
    leases: &mut LeaseServiceClient<Channel>,
    command: LeaseCommand,
    output: Output,
) -> Result<()> {
    let lease = match command {
        LeaseCommand::Grant { ttl, labels } => {
            let labels = label_map(&labels).map_err(|why| anyhow!(why))?;
            let request = GrantRequest {
                ttl: Some(duration::to_proto(ttl)),
                labels,
            };
            leases
                .grant(request)
                .await
                .map_err(rpc_error("granting a lease"))?
        }
        LeaseCommand::Renew { id } => {
            let request = RenewRequest {
                lease_id: id.clone(),
            };
            leases
                .renew(request)
                .await
                .map_err(rpc_error(format!("renewing lease {id}")))?
        }
        LeaseCommand::Ttl { id } => {
            let request = TimeToLiveRequest {
                lease_id: id.clone(),
            };
            let what = format!("reading lease {id}");
            leases
                .time_to_live(request)
                .await
                .map_err(rpc_error(what))?
        }
        LeaseCommand::Revoke { id } => {
            let request = RevokeRequest {
                lease_id: id.clone(),
            };
            let revoked = leases
                .revoke(request)
                .await
                .map_err(rpc_error(format!("revoking lease {id}")))?;
            let revoked = revoked.into_inner();
            let json = object(vec![
                (
                    "lease",
                    revoked.lease.as_ref().map_or(Value::Null, lease_json),
                ),
                ("revertedFaultIds", json!(revoked.reverted_fault_ids)),
            ]);
            let text = || revoked_text(&id, &revoked.reverted_fault_ids);
            return show(output, text, json);
        }
        LeaseCommand::List => {
            let list = leases
                .list(ListLeasesRequest {})
                .await
                .map_err(rpc_error("listing leases"))?;
            let list = list.into_inner().leases;
            let json = json!({ "leases": list.iter().map(lease_json).collect::<Vec<_>>() });
            return show(output, || lease_table(&list), json);
        }
    };
    let lease = lease.into_inner();
    show(output, || lease_detail(&lease), lease_json(&lease))
}

impl InjectCommand {
    fn common(&self) -> &InjectArgs {
        match self {
            Self::Drop(args) => &args.common,
            Self::Reject(args) => args,
            Self::Reset(args) => &args.common,
            Self::Delay(args) => &args.common,
            Self::Bandwidth(args) => &args.common,
        }
    }

    fn into_parts(self) -> (InjectArgs, fault::Action) {
        match self {
            Self::Drop(args) => (
                args.common,
                fault::Action::Drop(pb::Drop {
                    percent: args.percent,
                }),
            ),
            Self::Reject(args) => (args, fault::Action::Reject(pb::Reject {})),
            Self::Reset(args) => (
                args.common,
                fault::Action::Reset(pb::Reset {
                    after_bytes: args.after_bytes,
                }),
            ),
            Self::Delay(args) => (
                args.common,
                fault::Action::Delay(pb::Delay {
                    latency: Some(duration::to_proto(args.latency)),
                    jitter: Some(duration::to_proto(args.jitter)),
                    correlation: args.correlation,
                    mechanism: args.mechanism.to_proto(),
                }),
            ),
            Self::Bandwidth(args) => (
                args.common,
                fault::Action::Bandwidth(pb::Bandwidth {
                    rate_bytes_per_sec: args.rate,
                    burst: args.burst.unwrap_or(0),
                    mechanism: args.mechanism.to_proto(),
                }),
            ),
        }
    }
}

fn inject_request(
    lease: inject_request::Lease,
    action: fault::Action,
    target: Target,
    labels: HashMap<String, String>,
    dry_run: bool,
) -> InjectRequest {
    InjectRequest {
        lease: Some(lease),
        fault: Some(Fault {
            action: Some(action),
            target: Some(target),
            labels,
            ..Fault::default()
        }),
        dry_run,
    }
}

async fn inject(
    faults: &mut FaultServiceClient<Channel>,
    leases: &mut LeaseServiceClient<Channel>,
    args: InjectArgs,
    action: fault::Action,
    output: Output,
) -> Result<()> {
    let labels = label_map(&args.labels).map_err(|why| anyhow!(why))?;
    let target = args.target.to_proto();
    if args.dry_run {
        let lease = match (&args.lease.lease_id, args.lease.ttl) {
            (Some(id), _) => inject_request::Lease::LeaseId(id.clone()),
            (None, Some(ttl)) => inject_request::Lease::Ttl(duration::to_proto(ttl)),
            (None, None) => bail!("bound the fault with --ttl DURATION or --lease ID"),
        };
        let fault = faults
            .inject(inject_request(lease, action, target, labels, true))
            .await
            .map_err(rpc_error("dry run of the fault"))?
            .into_inner();
        return show(output, || dry_run_text(&fault), fault_json(&fault));
    }
    // Installed before anything is granted, so a signal during set-up still ends in a revoke
    // instead of the default exit that would leave the fault in force for a whole ttl.
    let mut signals = match args.keepalive {
        true => Some(Signals::install()?),
        false => None,
    };
    // With --keepalive faultctl grants the lease itself, so it can renew it and revoke it.
    let (lease, granted) = match (&args.lease.lease_id, args.lease.ttl) {
        (Some(id), _) => (inject_request::Lease::LeaseId(id.clone()), None),
        (None, Some(ttl)) if args.keepalive => {
            let request = GrantRequest {
                ttl: Some(duration::to_proto(ttl)),
                labels: labels.clone(),
            };
            let lease = leases
                .grant(request)
                .await
                .map_err(rpc_error("granting a lease"))?;
            let lease = lease.into_inner();
            (
                inject_request::Lease::LeaseId(lease.id.clone()),
                Some(lease),
            )
        }
        (None, Some(ttl)) => (inject_request::Lease::Ttl(duration::to_proto(ttl)), None),
        (None, None) => bail!("bound the fault with --ttl DURATION or --lease ID"),
    };
    let request = inject_request(lease, action, target, labels, false);
    let fault = match faults.inject(request).await {
        Ok(fault) => fault.into_inner(),
        Err(status) => {
            if let Some(lease) = &granted {
                // The lease is empty but ours; do not leave it behind until it expires.
                if let Err(err) = revoke(leases, &lease.id).await {
                    eprintln!("faultctl: {err:#}");
                }
            }
            return Err(rpc_error("injecting the fault")(status));
        }
    };
    show(output, || injected_text(&fault), fault_json(&fault))?;
    let Some(signals) = signals.as_mut() else {
        return Ok(());
    };
    let ttl_hint = granted.as_ref().and_then(lease_ttl).or(args.lease.ttl);
    let hold = Hold {
        lease_id: fault.lease_id.clone(),
        fault_id: fault.id.clone(),
        owned: granted.is_some(),
    };
    hold.run(leases, faults, signals, ttl_hint).await
}

/// SIGINT and SIGTERM, registered up front (tokio's `ctrl_c()` only registers on first poll).
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        let install = |kind| signal(kind).context("installing the signal handlers");
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupt",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// A lease faultctl keeps alive for one injected fault.
struct Hold {
    lease_id: String,
    fault_id: String,
    /// Granted by faultctl: revoked at the end. A lease given with --lease belongs to someone
    /// else, so only our fault is removed and the lease is left to its owner.
    owned: bool,
}

impl Hold {
    /// Renews the lease every ttl/3 until a signal (then reverts, Ok) or a failure (Err).
    async fn run(
        &self,
        leases: &mut LeaseServiceClient<Channel>,
        faults: &mut FaultServiceClient<Channel>,
        signals: &mut Signals,
        ttl_hint: Option<Duration>,
    ) -> Result<()> {
        let id = &self.lease_id;
        let (sender, receiver) = mpsc::channel(4);
        // Renew at once: for a --lease ID the answer also tells us the lease's ttl.
        self.renew(&sender)?;
        let answers = leases.keep_alive(ReceiverStream::new(receiver)).await;
        let mut answers = answers
            .map_err(rpc_error(format!("keeping lease {id} alive")))?
            .into_inner();
        let mut ttl = ttl_hint.unwrap_or(Duration::from_secs(3));
        let mut last_answer = Instant::now();
        let mut next_renewal = Instant::now() + renewal_period(ttl);
        eprintln!("faultctl: keeping lease {id} alive; Ctrl-C or SIGTERM reverts the fault");
        loop {
            tokio::select! {
                reason = signals.recv() => return self.release(leases, faults, reason).await,
                () = sleep_until(next_renewal) => {
                    self.renew(&sender)?;
                    next_renewal = Instant::now() + renewal_period(ttl);
                }
                () = sleep_until(last_answer + ttl) => bail!(
                    "keeping lease {id} alive: no answer from faultd for {}; the lease has expired",
                    duration::format(ttl)
                ),
                answer = answers.message() => {
                    ttl = self.renewed_ttl(answer)?;
                    last_answer = Instant::now();
                }
            }
        }
    }

    fn renew(&self, sender: &mpsc::Sender<KeepAliveRequest>) -> Result<()> {
        let request = KeepAliveRequest {
            lease_id: self.lease_id.clone(),
        };
        match sender.try_send(request) {
            // A full queue means faultd is behind on answers; the silence deadline decides.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bail!(
                    "keeping lease {} alive: the keep-alive stream closed",
                    self.lease_id
                )
            }
        }
    }

    /// The lease's ttl from a keep-alive answer, or why holding it has failed.
    fn renewed_ttl(&self, answer: Result<Option<Lease>, Status>) -> Result<Duration> {
        let what = format!("keeping lease {} alive", self.lease_id);
        match answer {
            Ok(Some(lease)) => lease_ttl(&lease)
                .ok_or_else(|| anyhow!("{what}: the lease has expired or was revoked")),
            Ok(None) => bail!("{what}: faultd closed the keep-alive stream"),
            // The stream broke without an answer from faultd: it most likely went away.
            Err(status) if matches!(status.code(), Code::Unavailable | Code::Unknown) => {
                let err = rpc_error(what)(status);
                bail!("{err:#}; if faultd stopped, the fault reverts within the lease's ttl")
            }
            Err(status) => Err(rpc_error(what)(status)),
        }
    }

    async fn release(
        &self,
        leases: &mut LeaseServiceClient<Channel>,
        faults: &mut FaultServiceClient<Channel>,
        reason: &str,
    ) -> Result<()> {
        if self.owned {
            let reverted = revoke(leases, &self.lease_id).await?;
            eprintln!(
                "faultctl: {reason}: revoked lease {}; reverted faults: {}",
                self.lease_id,
                id_list(&reverted)
            );
            return Ok(());
        }
        let request = RemoveRequest {
            id: self.fault_id.clone(),
        };
        match faults.remove(request).await {
            Ok(_) => eprintln!(
                "faultctl: {reason}: removed fault {}; faultctl no longer renews lease {}",
                self.fault_id, self.lease_id
            ),
            // Already reverted with its lease: what we were asked for has happened.
            Err(status) if status.code() == Code::NotFound => {
                eprintln!(
                    "faultctl: {reason}: fault {} was already gone",
                    self.fault_id
                )
            }
            Err(status) => {
                return Err(rpc_error(format!("removing fault {}", self.fault_id))(
                    status,
                ));
            }
        }
        Ok(())
    }
}

/// Revokes a lease and returns the faults that reverted; a lease already gone is not an error.
async fn revoke(leases: &mut LeaseServiceClient<Channel>, id: &str) -> Result<Vec<String>> {
    match leases
        .revoke(RevokeRequest {
            lease_id: id.to_string(),
        })
        .await
    {
        Ok(revoked) => Ok(revoked.into_inner().reverted_fault_ids),
        Err(status) if status.code() == Code::NotFound => Ok(Vec::new()),
        Err(status) => Err(rpc_error(format!("revoking lease {id}"))(status)),
    }
}

/// A third of the ttl leaves two more tries before the lease lapses; the floor keeps a tiny
/// ttl from spinning.
fn renewal_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(10))
}

/// The lease's ttl; None when the agent answers with no (or a zero) ttl, i.e. the lease is gone.
fn lease_ttl(lease: &Lease) -> Option<Duration> {
    lease
        .ttl
        .as_ref()
        .and_then(duration::from_proto)
        .filter(|ttl| !ttl.is_zero())
}

/// `<what failed>: <status message> (<CODE>)`.
fn rpc_error(what: impl Display) -> impl FnOnce(Status) -> anyhow::Error {
    move |status| {
        let message = match status.message() {
            "" => status.code().description(),
            message => message,
        };
        // A transport failure (e.g. a TLS alert from faultd) rides in the status's source.
        let cause = std::error::Error::source(&status)
            .map(|source| format!(": {}", error_chain(source)))
            .unwrap_or_default();
        anyhow!("{what}: {message}{cause} ({})", code_name(status.code()))
    }
}

/// The error and its sources: tonic's transport error alone only says "transport error".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Text output

fn protocol_text(protocol: i32) -> String {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::Tcp) => "tcp".into(),
        Ok(pb::Protocol::Udp) => "udp".into(),
        Ok(pb::Protocol::Unspecified) => "tcp+udp".into(),
        Err(_) => format!("protocol {protocol}"),
    }
}

fn direction_text(direction: i32) -> String {
    match pb::Direction::try_from(direction) {
        Ok(pb::Direction::Egress) => "egress".into(),
        Ok(pb::Direction::Ingress) => "ingress".into(),
        Ok(pb::Direction::Both | pb::Direction::Unspecified) => "both".into(),
        Err(_) => format!("direction {direction}"),
    }
}

/// e.g. `6379,8000-8010`, or `all`.
fn port_list(ports: &[PortRange]) -> String {
    if ports.is_empty() {
        return "all".into();
    }
    let list: Vec<String> = ports
        .iter()
        .map(|port| match port.last {
            Some(last) => format!("{}-{last}", port.first),
            None => port.first.to_string(),
        })
        .collect();
    list.join(",")
}

/// e.g. `ports 6379,8000-8010`, or `all ports`.
fn ports_text(ports: &[PortRange]) -> String {
    match ports.is_empty() {
        true => "all ports".into(),
        false => format!("ports {}", port_list(ports)),
    }
}

fn scope_text(scope: Option<&target::Scope>) -> String {
    match scope {
        Some(target::Scope::Host(_)) => "host".into(),
        Some(target::Scope::Cgroup(cgroup)) => format!("cgroup {}", cgroup.path),
        Some(target::Scope::Pid(pid)) => format!("pid {}", pid.pid),
        Some(target::Scope::Pod(pod)) => format!("pod {}", pod.uid),
        Some(target::Scope::Container(c)) => format!("container {}", c.id),
        Some(target::Scope::Netns(n)) => format!("interface {} of netns {}", n.interface, n.path),
        None => "no scope".into(),
    }
}

/// e.g. `tcp+udp both ports 6379 cgroup /app`.
fn target_summary(target: &Target) -> String {
    let mut peers = String::new();
    if !target.peers.is_empty() {
        peers += &format!(" peers {}", target.peers.join(","));
    }
    if !target.exclude_peers.is_empty() {
        peers += &format!(" except {}", target.exclude_peers.join(","));
    }
    format!(
        "{} {} {}{peers} {}",
        protocol_text(target.protocol),
        direction_text(target.direction),
        ports_text(&target.ports),
        scope_text(target.scope.as_ref())
    )
}

fn action_text(action: Option<&fault::Action>) -> String {
    match action {
        Some(fault::Action::Drop(drop)) => format!("drop {}%", drop.percent),
        Some(fault::Action::Reject(_)) => "reject".into(),
        Some(fault::Action::Reset(reset)) => match reset.after_bytes {
            Some(bytes) => format!("reset after {bytes} bytes"),
            None => "reset".into(),
        },
        Some(fault::Action::Delay(delay)) => {
            let mut text = format!("delay {}", remaining_text(delay.latency.as_ref()));
            let jitter = delay.jitter.as_ref().and_then(duration::from_proto);
            if jitter.is_some_and(|jitter| !jitter.is_zero()) {
                text.push_str(&format!(" ±{}", remaining_text(delay.jitter.as_ref())));
            }
            if delay.correlation > 0.0 {
                text.push_str(&format!(" {}% correlated", delay.correlation));
            }
            text
        }
        Some(fault::Action::Bandwidth(bandwidth)) => format!(
            "bandwidth {}/s burst {}",
            bytes_text(bandwidth.rate_bytes_per_sec),
            bytes_text(bandwidth.burst)
        ),
        None => "no action".into(),
    }
}

/// Bytes in the largest binary unit that divides them exactly, e.g. `256KiB`, `2621B`.
fn bytes_text(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// e.g. `drop 100% tcp+udp both ports 6379 cgroup /app`.
fn fault_summary(fault: &Fault) -> String {
    let target = fault
        .target
        .as_ref()
        .map(target_summary)
        .unwrap_or_else(|| "no target".into());
    format!("{} {target}", action_text(fault.action.as_ref()))
}

/// e.g. "30s" or "2.925s" (`duration::format` rounds to the millisecond).
fn remaining_text(remaining: Option<&prost_types::Duration>) -> String {
    remaining
        .and_then(duration::from_proto)
        .map(duration::format)
        .unwrap_or_else(|| "-".into())
}

fn reason_text(reason: i32) -> String {
    pb::RevertReason::try_from(reason)
        .map(|r| r.as_str_name().to_lowercase())
        .unwrap_or_else(|_| format!("reason {reason}"))
}

fn state_text(state: i32) -> String {
    match FaultState::try_from(state) {
        Ok(state) => state.as_str_name().to_lowercase(),
        Err(_) => format!("state {state}"),
    }
}

fn labels_text(labels: &HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    pairs.sort();
    pairs.join(",")
}

fn id_list(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

fn injected_text(fault: &Fault) -> String {
    let mut text = format!(
        "injected fault {} ({}) under lease {}",
        fault.id,
        fault_summary(fault),
        fault.lease_id
    );
    if fault.remaining.is_some() {
        text.push_str(&format!(
            ", expires in {}",
            remaining_text(fault.remaining.as_ref())
        ));
    }
    text
}

fn dry_run_text(fault: &Fault) -> String {
    let lease = match fault.lease_id.as_str() {
        "" => "a new lease".to_string(),
        id => format!("lease {id}"),
    };
    let resolved = match &fault.resolved {
        Some(r) => format!(
            "cgroup {} (id {}), {} kernel map entries",
            r.cgroup_path, r.cgroup_id, r.rules
        ),
        None => "-".into(),
    };
    let mut text = String::from("dry run: nothing was changed\n");
    text.push_str(&details(&[
        ("would inject", fault_summary(fault)),
        ("under", lease),
        ("resolved", resolved),
        ("mechanism", fault.mechanism.clone()),
        ("would end in", remaining_text(fault.remaining.as_ref())),
    ]));
    text
}

/// e.g. `2026-01-01T10:00:00.5Z  reverted  1f2e...  drop 100% tcp egress ports 6379 cgroup /app
/// (expired: lease expired; matched 12, dropped 12)`.
fn event_text(event: &FaultEvent) -> String {
    let time = event
        .time
        .as_ref()
        .map_or_else(|| "-".to_string(), |t| t.to_string());
    let fault = event.fault.clone().unwrap_or_default();
    let id = match fault.id.as_str() {
        "" => "-",
        id => id,
    };
    let counters = fault.counters.unwrap_or_default();
    let (kind, detail) = match &event.kind {
        Some(fault_event::Kind::Applied(_)) => (
            "applied",
            format!("lease {}, {}", fault.lease_id, fault.mechanism),
        ),
        Some(fault_event::Kind::Reverted(reverted)) => {
            let reason = reason_text(reverted.reason);
            (
                "reverted",
                format!(
                    "{reason}: {}; matched {}, dropped {}",
                    reverted.detail, counters.matched, counters.dropped
                ),
            )
        }
        Some(fault_event::Kind::Failed(failed)) => ("failed", failed.message.clone()),
        None => ("event", String::new()),
    };
    format!(
        "{time}  {kind:<8}  {id}  {} ({detail})",
        fault_summary(&fault)
    )
}

fn event_json(event: &FaultEvent) -> Value {
    let kind = match &event.kind {
        Some(fault_event::Kind::Applied(_)) => ("applied", json!({})),
        Some(fault_event::Kind::Reverted(reverted)) => {
            let reason = pb::RevertReason::try_from(reverted.reason)
                .ok()
                .map(|r| r.as_str_name());
            (
                "reverted",
                json!({
                    "reason": enum_json(reason, reverted.reason),
                    "detail": reverted.detail,
                }),
            )
        }
        Some(fault_event::Kind::Failed(failed)) => ("failed", json!({ "message": failed.message })),
        None => ("kind", Value::Null),
    };
    object(vec![
        ("time", timestamp_json(event.time.as_ref())),
        kind,
        (
            "fault",
            event.fault.as_ref().map_or(Value::Null, fault_json),
        ),
    ])
}

fn removed_text(fault: &Fault) -> String {
    let counters = fault.counters.unwrap_or_default();
    let mut text = format!(
        "removed fault {} ({}); matched {}, dropped {}",
        fault.id,
        fault_summary(fault),
        counters.matched,
        counters.dropped
    );
    if counters.delayed > 0 {
        text.push_str(&format!(", delayed {}", counters.delayed));
    }
    text
}

/// Aligned `key  value` lines.
fn details(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

/// Columns padded to their widest cell; the last column is not padded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| match i == last {
                true => cell.to_string(),
                false => format!("{cell:<width$}", width = widths[i]),
            })
            .collect();
        padded.join("  ") + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

fn fault_table(faults: &[Fault]) -> String {
    if faults.is_empty() {
        return "no faults".into();
    }
    let rows: Vec<Vec<String>> = faults
        .iter()
        .map(|fault| {
            let counters = fault.counters.unwrap_or_default();
            let left = match FaultState::try_from(fault.state) {
                Ok(FaultState::Active) => remaining_text(fault.remaining.as_ref()),
                _ if fault.ended_at.is_some() => {
                    format!("ended: {}", reason_text(fault.end_reason))
                }
                _ => state_text(fault.state),
            };
            vec![
                fault.id.clone(),
                fault.lease_id.clone(),
                action_text(fault.action.as_ref()),
                fault
                    .target
                    .as_ref()
                    .map(target_summary)
                    .unwrap_or_else(|| "-".into()),
                left,
                counters.matched.to_string(),
                counters.dropped.to_string(),
                counters.refused.to_string(),
                counters.reset.to_string(),
                counters.delayed.to_string(),
                fault.mechanism.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "LEASE",
            "ACTION",
            "TARGET",
            "LEFT",
            "MATCHED",
            "DROPPED",
            "REFUSED",
            "RESET",
            "DELAYED",
            "MECHANISM",
        ],
        &rows,
    )
}

fn fault_detail(fault: &Fault) -> String {
    let target = fault.target.clone().unwrap_or_default();
    let counters = fault.counters.unwrap_or_default();
    let resolved = match &fault.resolved {
        Some(resolved) => format!(
            "cgroup {} (id {}), {} kernel map entries",
            resolved.cgroup_path, resolved.cgroup_id, resolved.rules
        ),
        None => "-".into(),
    };
    let expires = match (&fault.ended_at, &fault.expires_at) {
        (Some(ended), _) => format!(
            "ended {ended} ({}: {})",
            reason_text(fault.end_reason),
            fault.end_detail
        ),
        (None, Some(at)) => format!("{at} (in {})", remaining_text(fault.remaining.as_ref())),
        (None, None) => "-".into(),
    };
    details(&[
        ("fault", fault.id.clone()),
        ("lease", fault.lease_id.clone()),
        ("state", state_text(fault.state)),
        ("action", action_text(fault.action.as_ref())),
        ("scope", scope_text(target.scope.as_ref())),
        ("ports", port_list(&target.ports)),
        ("protocol", protocol_text(target.protocol)),
        ("direction", direction_text(target.direction)),
        ("labels", labels_text(&fault.labels)),
        ("resolved", resolved),
        ("mechanism", fault.mechanism.clone()),
        ("expires", expires),
        ("matched", counters.matched.to_string()),
        ("dropped", counters.dropped.to_string()),
        ("refused", counters.refused.to_string()),
        ("reset", counters.reset.to_string()),
        ("delayed", counters.delayed.to_string()),
    ])
}

fn abort_text(abort: &pb::AbortResponse) -> String {
    // Not rounded like remaining times: an abort usually takes well under a millisecond.
    let took = abort.took.as_ref().and_then(duration::from_proto);
    format!(
        "aborted in {}: reverted faults: {}; revoked leases: {}",
        took.map_or("-".into(), duration::format),
        id_list(&abort.reverted_fault_ids),
        id_list(&abort.revoked_lease_ids)
    )
}

fn yes_no(available: bool) -> String {
    (if available { "yes" } else { "no" }).into()
}

fn caps_text(caps: &CapabilitiesResponse) -> String {
    let mut text = details(&[
        ("kernel", caps.kernel_release.clone()),
        ("cgroup root", caps.cgroup_root.clone()),
        ("agent", caps.agent_version.clone()),
    ]);
    let capabilities: Vec<Vec<String>> = caps
        .capabilities
        .iter()
        .map(|cap| vec![cap.name.clone(), yes_no(cap.available), cap.detail.clone()])
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["CAPABILITY", "AVAILABLE", "DETAIL"],
        &capabilities,
    ));
    let actions: Vec<Vec<String>> = caps
        .actions
        .iter()
        .map(|action| {
            let available = yes_no(action.available);
            vec![
                action.action.clone(),
                available,
                action.mechanism.clone(),
                action.detail.clone(),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["ACTION", "AVAILABLE", "MECHANISM", "DETAIL"],
        &actions,
    ));
    text
}

fn lease_detail(lease: &Lease) -> String {
    details(&[
        ("lease", lease.id.clone()),
        ("ttl", remaining_text(lease.ttl.as_ref())),
        ("remaining", remaining_text(lease.remaining.as_ref())),
        (
            "expires",
            lease
                .expires_at
                .map(|at| at.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("private", yes_no(lease.private)),
        ("labels", labels_text(&lease.labels)),
        ("faults", id_list(&lease.fault_ids)),
    ])
}

fn revoked_text(id: &str, reverted: &[String]) -> String {
    format!("revoked lease {id}; reverted faults: {}", id_list(reverted))
}

fn lease_table(leases: &[Lease]) -> String {
    if leases.is_empty() {
        return "no leases".into();
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|lease| {
            vec![
                lease.id.clone(),
                remaining_text(lease.ttl.as_ref()),
                remaining_text(lease.remaining.as_ref()),
                yes_no(lease.private),
                labels_text(&lease.labels),
                id_list(&lease.fault_ids),
            ]
        })
        .collect();
    table(&["ID", "TTL", "LEFT", "PRIVATE", "LABELS", "FAULTS"], &rows)
}

// ---------------------------------------------------------------------------------------------
// JSON output: proto3 JSON names, enums by name, durations "1.5s", timestamps RFC 3339.
// Counters and ids stay JSON numbers (proto3 parsers accept both) so `jq '.dropped > 0'` works.

fn duration_json(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| Value::String(d.to_string()))
}

fn timestamp_json(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// An enum by its proto name, or its number when this faultctl does not know the value.
fn enum_json(name: Option<&'static str>, number: i32) -> Value {
    name.map_or(json!(number), |name| json!(name))
}

/// An object without its null members: proto3 JSON leaves unset fields out.
fn object(members: Vec<(&str, Value)>) -> Value {
    let map: Map<String, Value> = members
        .into_iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(key, value)| (key.to_string(), value))
        .collect();
    Value::Object(map)
}

fn mechanism_json(mechanism: i32) -> Value {
    let name = pb::Mechanism::try_from(mechanism)
        .ok()
        .map(|m| m.as_str_name());
    enum_json(name, mechanism)
}

fn target_json(target: &Target) -> Value {
    let (scope_name, scope) = match &target.scope {
        Some(target::Scope::Host(_)) => ("host", json!({})),
        Some(target::Scope::Cgroup(cgroup)) => ("cgroup", json!({ "path": cgroup.path })),
        Some(target::Scope::Pid(pid)) => ("pid", json!({ "pid": pid.pid })),
        Some(target::Scope::Pod(pod)) => ("pod", json!({ "uid": pod.uid })),
        Some(target::Scope::Container(c)) => ("container", json!({ "id": c.id })),
        Some(target::Scope::Netns(n)) => {
            ("netns", json!({ "path": n.path, "interface": n.interface }))
        }
        None => ("scope", Value::Null),
    };
    let ports: Vec<Value> = target
        .ports
        .iter()
        .map(|port| {
            object(vec![
                ("first", json!(port.first)),
                ("last", json!(port.last)),
            ])
        })
        .collect();
    let protocol = pb::Protocol::try_from(target.protocol)
        .ok()
        .map(|p| p.as_str_name());
    let direction = pb::Direction::try_from(target.direction)
        .ok()
        .map(|d| d.as_str_name());
    let mut fields = vec![
        (scope_name, scope),
        ("ports", json!(ports)),
        ("protocol", enum_json(protocol, target.protocol)),
        ("direction", enum_json(direction, target.direction)),
    ];
    if !target.peers.is_empty() {
        fields.push(("peers", json!(target.peers)));
    }
    if !target.exclude_peers.is_empty() {
        fields.push(("exclude_peers", json!(target.exclude_peers)));
    }
    object(fields)
}

fn fault_json(fault: &Fault) -> Value {
    let (action_name, action) = match &fault.action {
        Some(fault::Action::Drop(drop)) => ("drop", json!({ "percent": drop.percent })),
        Some(fault::Action::Reject(_)) => ("reject", json!({})),
        Some(fault::Action::Reset(reset)) => (
            "reset",
            match reset.after_bytes {
                Some(bytes) => json!({ "afterBytes": bytes }),
                None => json!({}),
            },
        ),
        Some(fault::Action::Delay(delay)) => (
            "delay",
            object(vec![
                ("latency", duration_json(delay.latency.as_ref())),
                ("jitter", duration_json(delay.jitter.as_ref())),
                ("correlation", json!(delay.correlation)),
                ("mechanism", mechanism_json(delay.mechanism)),
            ]),
        ),
        Some(fault::Action::Bandwidth(bandwidth)) => (
            "bandwidth",
            json!({
                "rateBytesPerSec": bandwidth.rate_bytes_per_sec,
                "burst": bandwidth.burst,
                "mechanism": mechanism_json(bandwidth.mechanism),
            }),
        ),
        None => ("action", Value::Null),
    };
    let state = FaultState::try_from(fault.state)
        .ok()
        .map(|s| s.as_str_name());
    object(vec![
        ("id", json!(fault.id)),
        ("leaseId", json!(fault.lease_id)),
        (action_name, action),
        ("target", fault.target.as_ref().map_or(Value::Null, target_json)),
        ("labels", json!(fault.labels)),
        ("state", enum_json(state, fault.state)),
        (
            "counters",
            fault.counters.map_or(Value::Null, |c| {
                json!({ "matched": c.matched, "dropped": c.dropped, "refused": c.refused,
                    "reset": c.reset, "delayed": c.delayed })
            }),
        ),
        ("expiresAt", timestamp_json(fault.expires_at.as_ref())),
        ("remaining", duration_json(fault.remaining.as_ref())),
        ("mechanism", json!(fault.mechanism)),
        (
            "resolved",
            fault.resolved.as_ref().map_or(Value::Null, |r| {
                json!({ "cgroupPath": r.cgroup_path, "cgroupId": r.cgroup_id, "rules": r.rules })
            }),
        ),
        ("endedAt", timestamp_json(fault.ended_at.as_ref())),
        (
            "endReason",
            match fault.ended_at {
                Some(_) => enum_json(
                    pb::RevertReason::try_from(fault.end_reason)
                        .ok()
                        .map(|r| r.as_str_name()),
                    fault.end_reason,
                ),
                None => Value::Null,
            },
        ),
        (
            "endDetail",
            fault
                .ended_at
                .map_or(Value::Null, |_| json!(fault.end_detail)),
        ),
    ])
}

fn lease_json(lease: &Lease) -> Value {
    object(vec![
        ("id", json!(lease.id)),
        ("ttl", duration_json(lease.ttl.as_ref())),
        ("expiresAt", timestamp_json(lease.expires_at.as_ref())),
        ("remaining", duration_json(lease.remaining.as_ref())),
        ("faultIds", json!(lease.fault_ids)),
        ("private", json!(lease.private)),
        ("labels", json!(lease.labels)),
    ])
}

fn caps_json(caps: &CapabilitiesResponse) -> Value {
    let capabilities: Vec<Value> = caps
        .capabilities
        .iter()
        .map(|cap| json!({ "name": cap.name, "available": cap.available, "detail": cap.detail }))
        .collect();
    let actions: Vec<Value> = caps
        .actions
        .iter()
        .map(|action| {
            json!({
                "action": action.action,
                "available": action.available,
                "mechanism": action.mechanism,
                "detail": action.detail,
            })
        })
        .collect();
    json!({
        "kernelRelease": caps.kernel_release,
        "cgroupRoot": caps.cgroup_root,
        "capabilities": capabilities,
        "actions": actions,
        "agentVersion": caps.agent_version,
    })
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// `faultctl inject drop <line>`, split on whitespace.
    fn drop_args(line: &str) -> Result<DropArgs, clap::Error> {
        let argv = "faultctl inject drop"
            .split_whitespace()
            .chain(line.split_whitespace());
        match Cli::try_parse_from(argv)?.command {
            Command::Inject(InjectCommand::Drop(args)) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn range(first: u32, last: Option<u32>) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn scopes_and_peers_become_the_target() {
        let args = drop_args(
            "--netns /run/netns/r --iface r1 --port 6379 --ttl 30s --peer 10.0.0.0/8,::1 \
             --exclude-peer 10.1.0.0/16",
        )
        .unwrap();
        let target = args.common.target.to_proto();
        assert_eq!(
            target.scope,
            Some(target::Scope::Netns(pb::NetnsScope {
                path: "/run/netns/r".into(),
                interface: "r1".into(),
            }))
        );
        assert_eq!(target.peers, vec!["10.0.0.0/8", "::1"]);
        assert_eq!(target.exclude_peers, vec!["10.1.0.0/16"]);
        assert!(
            drop_args("--netns /run/netns/r --port 1 --ttl 1s").is_err(),
            "--iface needed"
        );
        let stray = drop_args("--iface r1 --host --port 1 --ttl 1s").unwrap();
        assert!(
            validate(&Command::Inject(InjectCommand::Drop(stray))).is_err(),
            "--iface without --netns"
        );
        let pod = drop_args("--pod abc --port 1 --ttl 1s").unwrap();
        assert_eq!(
            pod.common.target.to_proto().scope,
            Some(target::Scope::Pod(pb::PodScope { uid: "abc".into() }))
        );
        assert!(drop_args("--pod abc --container def --port 1 --ttl 1s").is_err());
    }

    #[test]
    fn ports_parse_singles_ranges_and_lists() {
        assert_eq!(parse_port_range("6379"), Ok(range(6379, None)));
        assert_eq!(parse_port_range("8000-8010"), Ok(range(8000, Some(8010))));
        assert_eq!(parse_port_range("65535"), Ok(range(65535, None)));
        let args = drop_args("--host --ttl 1s --port 6379,5432 --port 1-9");
        let ports = args.map(|args| args.common.target.ports).expect("parses");
        let expected = vec![range(6379, None), range(5432, None), range(1, Some(9))];
        assert_eq!(ports, expected);
    }

    #[test]
    fn bad_ports_say_what_to_type() {
        for bad in ["0", "65536", "redis", "", "-5", "80-", "90-80"] {
            let why = parse_port_range(bad).expect_err(bad);
            assert!(why.contains("e.g. --port"), "{bad}: {why}");
        }
        let why = parse_port_range("90-80").expect_err("reversed range");
        assert!(why.contains("--port 80-90"), "{why}");
        let err = drop_args("--host --ttl 1s --port 6379,0").expect_err("port 0");
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        let err = drop_args("--host --ttl 1s").expect_err("no port");
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn labels_parse_and_reject_duplicates() {
        assert_eq!(parse_label("team=db"), Ok(("team".into(), "db".into())));
        assert_eq!(parse_label("url=a=b"), Ok(("url".into(), "a=b".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
        let args = drop_args("--host --ttl 1s --port 1 --label a=1 --label b=2").expect("parses");
        assert_eq!(label_map(&args.common.labels).map(|map| map.len()), Ok(2));
        let args = drop_args("--host --ttl 1s --port 1 --label a=1 --label a=2").expect("parses");
        assert!(label_map(&args.common.labels).is_err());
        assert!(validate(&Command::Inject(InjectCommand::Drop(args))).is_err());
    }

    #[test]
    fn exactly_one_scope() {
        let scope = |line: &str| {
            drop_args(&format!("{line} --ttl 1s --port 1"))
                .map(|args| args.common.target.scope.to_proto())
        };
        let cgroup = pb::CgroupScope {
            path: "/app".into(),
        };
        assert_eq!(
            scope("--cgroup /app").ok().flatten(),
            Some(target::Scope::Cgroup(cgroup))
        );
        let pid = pb::PidScope { pid: 42 };
        assert_eq!(
            scope("--pid 42").ok().flatten(),
            Some(target::Scope::Pid(pid))
        );
        let host = pb::HostScope {};
        assert_eq!(
            scope("--host").ok().flatten(),
            Some(target::Scope::Host(host))
        );
        let none = scope("").expect_err("no scope");
        assert_eq!(none.kind(), ErrorKind::MissingRequiredArgument);
        let two = scope("--host --pid 42").expect_err("two scopes");
        assert_eq!(two.kind(), ErrorKind::ArgumentConflict);
        assert!(scope("--pid 0").is_err());
        let empty = [
            "faultctl", "inject", "drop", "--cgroup", "", "--ttl", "1s", "--port", "1",
        ];
        assert!(Cli::try_parse_from(empty).is_err());
    }

    #[test]
    fn exactly_one_of_ttl_and_lease() {
        assert!(drop_args("--host --port 1").is_err());
        assert!(drop_args("--host --port 1 --ttl 1s --lease x").is_err());
        assert!(drop_args("--host --port 1 --ttl 0s").is_err());
        assert!(drop_args("--host --port 1 --ttl soon").is_err());
        let args = drop_args("--host --port 1 --lease abc --keepalive").expect("parses");
        assert_eq!(args.common.lease.lease_id.as_deref(), Some("abc"));
        assert!(args.common.keepalive);
    }

    #[test]
    fn defaults_are_both_protocols_both_directions_all_packets() {
        let args = drop_args("--host --ttl 30s --port 6379").expect("parses");
        let target = args.common.target.to_proto();
        assert_eq!(target.protocol, pb::Protocol::Unspecified as i32);
        assert_eq!(target.direction, pb::Direction::Both as i32);
        assert_eq!(args.percent, 100.0);
        assert!(drop_args("--host --ttl 30s --port 6379 --percent 101").is_err());
    }

    #[test]
    fn target_summary_reads_like_the_flags() {
        let target = Target {
            scope: Some(target::Scope::Cgroup(pb::CgroupScope {
                path: "/app".into(),
            })),
            ports: vec![range(6379, None)],
            protocol: pb::Protocol::Unspecified as i32,
            direction: pb::Direction::Both as i32,
            ..Default::default()
        };
        assert_eq!(
            target_summary(&target),
            "tcp+udp both ports 6379 cgroup /app"
        );
        let target = Target {
            scope: Some(target::Scope::Pid(pb::PidScope { pid: 7 })),
            ports: vec![range(5432, None), range(8000, Some(8010))],
            protocol: pb::Protocol::Tcp as i32,
            direction: pb::Direction::Egress as i32,
            ..Default::default()
        };
        assert_eq!(
            target_summary(&target),
            "tcp egress ports 5432,8000-8010 pid 7"
        );
        let target = Target {
            scope: Some(target::Scope::Host(pb::HostScope {})),
            protocol: pb::Protocol::Udp as i32,
            direction: pb::Direction::Unspecified as i32,
            ..Target::default()
        };
        assert_eq!(target_summary(&target), "udp both all ports host");
        let fault = Fault {
            action: Some(fault::Action::Drop(pb::Drop { percent: 12.5 })),
            target: Some(target),
            ..Fault::default()
        };
        assert_eq!(fault_summary(&fault), "drop 12.5% udp both all ports host");
    }

    fn inject_command(line: &str) -> Result<InjectCommand, clap::Error> {
        let argv = "faultctl inject"
            .split_whitespace()
            .chain(line.split_whitespace());
        match Cli::try_parse_from(argv)?.command {
            Command::Inject(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn delay_takes_human_durations_and_a_mechanism() {
        let command = inject_command(
            "delay --cgroup /app --port 6379 --latency 100ms --jitter 20ms --correlation 25 \
             --mechanism nfqueue --ttl 30s",
        )
        .expect("parses");
        let (_, action) = command.into_parts();
        let Some(fault::Action::Delay(delay)) = Some(action) else {
            panic!("not a delay");
        };
        assert_eq!(
            delay.latency,
            Some(duration::to_proto(Duration::from_millis(100)))
        );
        assert_eq!(
            delay.jitter,
            Some(duration::to_proto(Duration::from_millis(20)))
        );
        assert_eq!(delay.correlation, 25.0);
        assert_eq!(delay.mechanism, pb::Mechanism::Nfqueue as i32);

        let command = inject_command("delay --host --port 1 --latency 1.5s --ttl 1s").unwrap();
        let Some(fault::Action::Delay(delay)) = Some(command.into_parts().1) else {
            panic!("not a delay");
        };
        assert_eq!(delay.mechanism, pb::Mechanism::Unspecified as i32, "auto");
        assert_eq!(delay.correlation, 0.0);
        for bad in [
            "delay --host --port 1 --ttl 1s",
            "delay --host --port 1 --ttl 1s --latency 0s",
            "delay --host --port 1 --ttl 1s --latency soon",
            "delay --host --port 1 --ttl 1s --latency 1s --correlation 101",
            "delay --host --port 1 --ttl 1s --latency 1s --mechanism tc",
        ] {
            assert!(inject_command(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn rates_and_sizes_accept_human_units() {
        assert_eq!(parse_rate("256KiB/s"), Ok(262_144));
        assert_eq!(parse_rate("1MB/s"), Ok(1_000_000));
        assert_eq!(parse_rate("1.5MiB/s"), Ok(1_572_864));
        assert_eq!(parse_rate("10mbit"), Ok(1_250_000));
        assert_eq!(parse_rate("8kbit/s"), Ok(1000));
        assert_eq!(parse_rate("5000"), Ok(5000));
        for bad in ["", "fast", "0", "-5KiB/s", "10 parsecs", "1KiB/h"] {
            let why = parse_rate(bad).expect_err(bad);
            assert!(why.contains("--rate 256KiB/s"), "{bad}: {why}");
        }
        assert_eq!(parse_size("32KiB"), Ok(32_768));
        assert_eq!(parse_size("1500"), Ok(1500));
        assert!(parse_size("8kbit").is_err(), "a size is in bytes");

        let command =
            inject_command("bandwidth --cgroup /app --port 6379 --rate 256KiB/s --ttl 10s")
                .unwrap();
        let Some(fault::Action::Bandwidth(bandwidth)) = Some(command.into_parts().1) else {
            panic!("not a bandwidth");
        };
        assert_eq!(
            (bandwidth.rate_bytes_per_sec, bandwidth.burst),
            (262_144, 0)
        );
        assert!(inject_command("bandwidth --host --port 1 --ttl 1s").is_err());
    }

    #[test]
    fn delay_and_bandwidth_read_like_the_flags() {
        let ms = |ms| Some(duration::to_proto(Duration::from_millis(ms)));
        let delay = fault::Action::Delay(pb::Delay {
            latency: ms(100),
            jitter: ms(20),
            correlation: 25.0,
            mechanism: 0,
        });
        assert_eq!(
            action_text(Some(&delay)),
            "delay 100ms ±20ms 25% correlated"
        );
        let fixed = fault::Action::Delay(pb::Delay {
            latency: ms(50),
            jitter: ms(0),
            ..Default::default()
        });
        assert_eq!(action_text(Some(&fixed)), "delay 50ms");
        let bandwidth = fault::Action::Bandwidth(pb::Bandwidth {
            rate_bytes_per_sec: 262_144,
            burst: 2621,
            mechanism: 0,
        });
        assert_eq!(
            action_text(Some(&bandwidth)),
            "bandwidth 256KiB/s burst 2621B"
        );
        let fault = Fault {
            action: Some(delay),
            mechanism: "nfqueue".into(),
            ..Fault::default()
        };
        let json = fault_json(&fault);
        assert_eq!(json["delay"]["latency"], "0.100s");
        assert_eq!(json["delay"]["mechanism"], "MECHANISM_UNSPECIFIED");
        assert_eq!(json["mechanism"], "nfqueue");
    }

    #[test]
    fn json_uses_proto3_names() {
        let fault = Fault {
            id: "f1".into(),
            lease_id: "l1".into(),
            action: Some(fault::Action::Drop(pb::Drop { percent: 100.0 })),
            target: Some(Target {
                scope: Some(target::Scope::Host(pb::HostScope {})),
                ports: vec![range(1, Some(2))],
                protocol: pb::Protocol::Tcp as i32,
                direction: pb::Direction::Egress as i32,
                ..Default::default()
            }),
            state: FaultState::Active as i32,
            remaining: Some(duration::to_proto(Duration::from_millis(1500))),
            ..Fault::default()
        };
        let json = fault_json(&fault);
        assert_eq!(json["leaseId"], "l1");
        assert_eq!(json["drop"]["percent"], 100.0);
        assert_eq!(json["target"]["host"], json!({}));
        assert_eq!(json["target"]["ports"], json!([{ "first": 1, "last": 2 }]));
        assert_eq!(json["target"]["protocol"], "TCP");
        assert_eq!(json["target"]["direction"], "EGRESS");
        assert_eq!(json["state"], "ACTIVE");
        assert_eq!(json["remaining"], "1.500s");
        assert!(json.get("expiresAt").is_none());
    }
}
