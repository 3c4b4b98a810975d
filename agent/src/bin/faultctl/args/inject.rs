//! The flags of `faultctl inject <action>`: what every action takes (target, lease, labels,
//! --keepalive, --dry-run), each action's own flags, and their conversion to the proto's
//! `Target` and `fault::Action`.

use faultd::api::convert;
use faultd::fault::MAX_SLICE;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Subcommand, ValueEnum};
use faultd_proto::v1::{self as pb, PortRange, Target, fault, target};

use super::values::{
    parse_close_after, parse_gap, parse_jitter, parse_label, parse_latency, parse_percent,
    parse_port_range, parse_rate, parse_size, parse_slice_delay, parse_ttl,
};

#[derive(Subcommand, Debug)]
pub enum InjectCommand {
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
    /// Let each matched request (--redis-command, --pg-statement) reach the server and run,
    /// lose its reply, and tear the client's connection down ("ambiguous commit").
    LoseReply(InjectArgs),
    /// Keep the TCP connections up but let no data through (Toxiproxy's timeout): reads hang.
    Stall(StallArgs),
    /// Hold each connection's SYN for a latency: only the handshake waits.
    SlowConnect(SlowArgs),
    /// Hold each FIN for a latency: the other end sees the close that much later.
    SlowClose(SlowArgs),
    /// Send a share of the matched packets twice.
    Duplicate(ShareArgs),
    /// Damage a share of the matched packets (a bit flipped, checksum left wrong): the
    /// receiver drops them as it drops packets damaged on the wire.
    Corrupt(ShareArgs),
    /// Hold a share of the matched packets back so that later ones overtake them.
    Reorder(ReorderArgs),
    /// Cut the data of each TCP segment into pieces of at most N bytes (Toxiproxy's slicer).
    Slice(SliceArgs),
}

#[derive(Args, Debug)]
pub struct SliceArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Most data bytes a piece carries, e.g. 16.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SLICE)))]
    pub max_bytes: u32,
    /// Pause between the pieces of a segment, e.g. 1ms (at most 100ms).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_slice_delay)]
    pub delay: Duration,
}

#[derive(Args, Debug)]
pub struct ShareArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Share of the matched packets it acts on, 0 to 100.
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent)]
    pub percent: f64,
    /// netem or nfqueue (edt only delays); `auto` lets faultd choose.
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
}

#[derive(Args, Debug)]
pub struct ReorderArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Share of the matched packets held back, 0 to 100.
    #[arg(long, default_value_t = 25.0, value_parser = parse_percent)]
    pub percent: f64,
    /// How long they are held back, e.g. 10ms.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = parse_gap)]
    pub gap: Duration,
    /// netem or nfqueue (edt only delays); `auto` lets faultd choose.
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
}

#[derive(Args, Debug)]
pub struct SlowArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// How long the segment is held, e.g. 300ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_latency)]
    pub latency: Duration,
}

#[derive(Args, Debug)]
pub struct StallArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Then tear each connection down once the fault has held it this long, e.g. 5s.
    #[arg(long, value_name = "DURATION", value_parser = parse_close_after)]
    pub close_after: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct DelayArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Added delay, e.g. 100ms, 1.5s.
    #[arg(long, value_name = "DURATION", value_parser = parse_latency)]
    pub latency: Duration,
    /// Standard deviation of a normally distributed extra delay, e.g. 20ms.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_jitter)]
    pub jitter: Duration,
    /// How much each packet's random part follows the previous one's, 0 to 100 (%).
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    pub correlation: f64,
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
}

#[derive(Args, Debug)]
pub struct BandwidthArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Rate per direction, e.g. 256KiB/s, 1MB/s, 10mbit (bytes unless the unit says bit).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub rate: u64,
    /// Bytes that may pass at once after a pause, e.g. 32KiB (default: 10 ms at the rate).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub burst: Option<u64>,
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
}

/// How faultd applies a delay or bandwidth fault; `auto` lets it choose.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MechanismArg {
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
pub struct DropArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Share of the matched packets to drop, 0 to 100.
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent)]
    pub percent: f64,
}

#[derive(Args, Debug)]
pub struct ResetArgs {
    #[command(flatten)]
    pub common: InjectArgs,
    /// Instead: tear down each connection once it has carried this many bytes, and let new
    /// connections open (each gets the same allowance).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub after_bytes: Option<u64>,
}

/// What every action takes: the target, the lease, labels.
#[derive(Args, Debug)]
pub struct InjectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub lease: LeaseChoice,
    /// Label of the fault (and of the lease faultctl grants for it); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Keep the lease alive until Ctrl-C or SIGTERM, then revert the fault.
    #[arg(long, conflicts_with = "dry_run")]
    pub keepalive: bool,
    /// Validate, check the policy and resolve the target, and show what would be applied;
    /// nothing changes.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct TargetArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Port or inclusive range; repeatable and comma-separated. At least one: faultd refuses
    /// a fault on every port.
    #[arg(
        long = "port",
        value_name = "PORT[-LAST]",
        value_delimiter = ',',
        required = true
    )]
    #[arg(value_parser = parse_port_range)]
    pub ports: Vec<PortRange>,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Both)]
    pub protocol: ProtocolArg,
    /// Seen from the workload: egress is what it sends, ingress what it receives.
    #[arg(long, value_enum, default_value_t = DirectionArg::Both)]
    pub direction: DirectionArg,
    /// The interface of --netns.
    #[arg(long, value_name = "NAME")]
    pub iface: Option<String>,
    /// Only traffic with this remote address or CIDR (IPv4 or IPv6, e.g. 10.0.0.0/8,
    /// fd00::/64, 127.0.0.2); repeatable and comma-separated. Default: every peer.
    #[arg(long = "peer", value_name = "CIDR", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Spare traffic with this remote address or CIDR; repeatable and comma-separated.
    #[arg(long = "exclude-peer", value_name = "CIDR", value_delimiter = ',')]
    pub exclude_peers: Vec<String>,
    /// Only these Redis commands the workload sends (drop, reset), e.g. SET,DEL; matched on the
    /// first segment of a request (not TLS, not a command pipelined after another in one
    /// segment, not one split before the end of its name).
    #[arg(
        long = "redis-command",
        value_name = "NAME",
        value_delimiter = ',',
        conflicts_with = "pg_statements"
    )]
    pub redis_commands: Vec<String>,
    /// With --redis-command: only commands whose first key starts with this.
    #[arg(
        long = "redis-key-prefix",
        value_name = "PREFIX",
        requires = "redis_commands"
    )]
    pub redis_key_prefix: Option<String>,
    /// Only PostgreSQL Query and Parse messages the workload sends whose SQL starts with one of
    /// these keywords (drop, reset), e.g. COMMIT,INSERT.
    #[arg(long = "pg-statement", value_name = "KEYWORD", value_delimiter = ',')]
    pub pg_statements: Vec<String>,
}

/// Where the fault applies: exactly one of these.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// A cgroup, by path relative to the cgroup v2 root, e.g. /app.
    #[arg(long, value_name = "PATH", value_parser = NonEmptyStringValueParser::new())]
    pub cgroup: Option<String>,
    /// The cgroup of this process.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
    /// Every socket on the node.
    #[arg(long)]
    pub host: bool,
    /// Every container of a Kubernetes pod on this node, by uid (metadata.uid), including
    /// containers that restart or start later.
    #[arg(long, value_name = "UID", value_parser = NonEmptyStringValueParser::new())]
    pub pod: Option<String>,
    /// One container on this node, by its full id (`crictl ps --no-trunc`).
    #[arg(long, value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
    pub container: Option<String>,
    /// An interface in a network namespace (/run/netns/NAME or /proc/PID/ns/net), named with
    /// --iface: what crosses it, routed traffic included (drop, delay, bandwidth).
    #[arg(long, value_name = "PATH", value_parser = NonEmptyStringValueParser::new(), requires = "iface")]
    pub netns: Option<String>,
}

/// What bounds the fault's life: exactly one of these.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct LeaseChoice {
    /// Put the fault under a new lease of this ttl, e.g. 30s, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// Put the fault under this existing lease.
    #[arg(long = "lease", value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
    pub lease_id: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Both,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectionArg {
    Egress,
    Ingress,
    Both,
}

impl ScopeArgs {
    pub fn to_proto(&self) -> Option<target::Scope> {
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
    pub fn to_proto(&self) -> Target {
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
            request: self.request(),
        }
    }

    fn request(&self) -> Option<pb::RequestMatch> {
        use pb::request_match::Protocol;
        let protocol = if !self.redis_commands.is_empty() {
            Protocol::Redis(pb::RedisMatch {
                commands: self.redis_commands.clone(),
                key_prefix: self.redis_key_prefix.clone().unwrap_or_default(),
            })
        } else if !self.pg_statements.is_empty() {
            Protocol::Postgres(pb::PostgresMatch {
                statements: self.pg_statements.clone(),
            })
        } else {
            return None;
        };
        Some(pb::RequestMatch {
            protocol: Some(protocol),
        })
    }
}

impl InjectCommand {
    pub fn common(&self) -> &InjectArgs {
        match self {
            Self::Drop(args) => &args.common,
            Self::Reject(args) | Self::LoseReply(args) => args,
            Self::Reset(args) => &args.common,
            Self::Delay(args) => &args.common,
            Self::Bandwidth(args) => &args.common,
            Self::Stall(args) => &args.common,
            Self::SlowConnect(args) | Self::SlowClose(args) => &args.common,
            Self::Duplicate(args) | Self::Corrupt(args) => &args.common,
            Self::Reorder(args) => &args.common,
            Self::Slice(args) => &args.common,
        }
    }

    pub fn into_parts(self) -> (InjectArgs, fault::Action) {
        match self {
            Self::Drop(args) => (
                args.common,
                fault::Action::Drop(pb::Drop {
                    percent: args.percent,
                }),
            ),
            Self::Reject(args) => (args, fault::Action::Reject(pb::Reject {})),
            Self::LoseReply(args) => (args, fault::Action::LoseReply(pb::LoseReply {})),
            Self::Reset(args) => (
                args.common,
                fault::Action::Reset(pb::Reset {
                    after_bytes: args.after_bytes,
                }),
            ),
            Self::Delay(args) => (
                args.common,
                fault::Action::Delay(pb::Delay {
                    latency: Some(convert::duration_to_proto(args.latency)),
                    jitter: Some(convert::duration_to_proto(args.jitter)),
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
            Self::Stall(args) => (
                args.common,
                fault::Action::Stall(pb::Stall {
                    close_after: args.close_after.map(convert::duration_to_proto),
                }),
            ),
            Self::SlowConnect(args) => (
                args.common,
                fault::Action::SlowConnect(pb::SlowConnect {
                    latency: Some(convert::duration_to_proto(args.latency)),
                }),
            ),
            Self::SlowClose(args) => (
                args.common,
                fault::Action::SlowClose(pb::SlowClose {
                    latency: Some(convert::duration_to_proto(args.latency)),
                }),
            ),
            Self::Duplicate(args) => (
                args.common,
                fault::Action::Duplicate(pb::Duplicate {
                    percent: args.percent,
                    mechanism: args.mechanism.to_proto(),
                }),
            ),
            Self::Corrupt(args) => (
                args.common,
                fault::Action::Corrupt(pb::Corrupt {
                    percent: args.percent,
                    mechanism: args.mechanism.to_proto(),
                }),
            ),
            Self::Reorder(args) => (
                args.common,
                fault::Action::Reorder(pb::Reorder {
                    percent: args.percent,
                    gap: Some(convert::duration_to_proto(args.gap)),
                    mechanism: args.mechanism.to_proto(),
                }),
            ),
            Self::Slice(args) => (
                args.common,
                fault::Action::Slice(pb::Slice {
                    max_bytes: args.max_bytes,
                    delay: Some(convert::duration_to_proto(args.delay)),
                }),
            ),
        }
    }
}
