//! The command line: clap's types for the global flags and the subcommands, and the checks of
//! flag combinations clap cannot express, so every mistake is a usage error (exit 2) before
//! faultctl makes a call. The inject flags live in `inject`, the value parsers in `values`.

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use faultd::client;

pub mod inject;
mod values;

use inject::InjectCommand;
pub use values::label_map;
use values::{parse_label, parse_ttl};

/// Inject network faults through faultd and manage the leases that bound them.
#[derive(Parser, Debug)]
#[command(name = "faultctl", version)]
pub struct Cli {
    /// The unix socket faultd listens on.
    #[arg(long, global = true, env = "FAULTD_SOCKET", default_value = client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where faultd serves: unix:///PATH (like --socket) or tcp://HOST:PORT (its --listen).
    #[arg(long, global = true, env = "FAULTD_SERVER", value_name = "URL", value_parser = parse_server)]
    pub server: Option<Server>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// How to print answers: for people, or one JSON document per command.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    Unix(PathBuf),
    /// HOST:PORT.
    Tcp(String),
}

/// For --server tcp://: faultd's listener requires mTLS unless it was started with --insecure.
#[derive(Args, Debug, Default)]
pub struct TlsArgs {
    /// PEM CA that signed faultd's server certificate.
    #[arg(long, global = true, value_name = "PEM", env = "FAULTCTL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, signed by the CA faultd trusts (its --tls-client-ca).
    #[arg(long, global = true, value_name = "PEM", env = "FAULTCTL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "PEM", env = "FAULTCTL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Name to check faultd's certificate against (default: the host of --server).
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Plain TCP, for a faultd started with --insecure.
    #[arg(long, global = true)]
    pub insecure: bool,
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
pub enum Command {
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
pub enum LeaseCommand {
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

/// Checks what clap cannot, so a mistake is a usage error (exit 2) before any call is made.
pub fn validate(command: &Command) -> Result<(), String> {
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
pub fn validate_connection(server: Option<&Server>, tls: &TlsArgs) -> Result<(), String> {
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

/// Exits with clap's usage error (code 2) for mistakes clap cannot see by itself.
pub fn usage_error(message: impl Display) -> ! {
    Cli::command()
        .error(ErrorKind::ValueValidation, message)
        .exit()
}

#[cfg(test)]
mod tests {
    use faultd::api::convert;
    use faultd_proto::v1::{self as pb, PortRange, fault, target};

    use super::inject::DropArgs;
    use super::values::{parse_label, parse_port_range, parse_rate, parse_size};
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
            Some(convert::duration_to_proto(Duration::from_millis(100)))
        );
        assert_eq!(
            delay.jitter,
            Some(convert::duration_to_proto(Duration::from_millis(20)))
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
    fn stall_takes_an_optional_close_after() {
        let command = inject_command("stall --cgroup /app --port 6379 --ttl 30s").unwrap();
        let Some(fault::Action::Stall(stall)) = Some(command.into_parts().1) else {
            panic!("not a stall");
        };
        assert_eq!(stall.close_after, None);
        let command =
            inject_command("stall --cgroup /app --port 6379 --close-after 5s --ttl 30s").unwrap();
        let Some(fault::Action::Stall(stall)) = Some(command.into_parts().1) else {
            panic!("not a stall");
        };
        assert_eq!(
            stall.close_after,
            Some(convert::duration_to_proto(Duration::from_secs(5)))
        );
        for bad in [
            "stall --host --port 1 --ttl 1s --close-after 0s",
            "stall --host --port 1 --ttl 1s --close-after later",
        ] {
            assert!(inject_command(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn slow_connect_and_slow_close_take_a_latency() {
        let command =
            inject_command("slow-connect --cgroup /app --port 5432 --latency 300ms --ttl 30s")
                .unwrap();
        let Some(fault::Action::SlowConnect(slow)) = Some(command.into_parts().1) else {
            panic!("not a slow_connect");
        };
        assert_eq!(
            slow.latency,
            Some(convert::duration_to_proto(Duration::from_millis(300)))
        );
        let command =
            inject_command("slow-close --cgroup /app --port 5432 --latency 1s --ttl 30s").unwrap();
        assert!(matches!(
            command.into_parts().1,
            fault::Action::SlowClose(_)
        ));
        for bad in [
            "slow-connect --host --port 1 --ttl 1s",
            "slow-close --host --port 1 --ttl 1s --latency 0s",
        ] {
            assert!(inject_command(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn duplicate_corrupt_and_reorder_take_a_share() {
        let parts = |line: &str| inject_command(line).unwrap().into_parts().1;
        assert_eq!(
            parts("duplicate --cgroup /a --port 9 --ttl 1s"),
            fault::Action::Duplicate(pb::Duplicate {
                percent: 100.0,
                mechanism: 0
            })
        );
        assert_eq!(
            parts("corrupt --cgroup /a --port 9 --percent 2.5 --mechanism netem --ttl 1s"),
            fault::Action::Corrupt(pb::Corrupt {
                percent: 2.5,
                mechanism: pb::Mechanism::Netem as i32
            })
        );
        assert_eq!(
            parts("reorder --cgroup /a --port 9 --gap 20ms --ttl 1s"),
            fault::Action::Reorder(pb::Reorder {
                percent: 25.0,
                gap: Some(convert::duration_to_proto(Duration::from_millis(20))),
                mechanism: 0,
            })
        );
        assert!(inject_command("corrupt --cgroup /a --port 9 --percent 101 --ttl 1s").is_err());
        assert_eq!(
            parts("slice --cgroup /a --port 9 --max-bytes 16 --ttl 1s"),
            fault::Action::Slice(pb::Slice {
                max_bytes: 16,
                delay: Some(convert::duration_to_proto(Duration::ZERO)),
            })
        );
        assert!(inject_command("slice --cgroup /a --port 9 --max-bytes 0 --ttl 1s").is_err());
        // A bad duration's hint names the flag that was given.
        for (line, flag) in [
            ("reorder --cgroup /a --port 9 --gap 0s --ttl 1s", "--gap"),
            ("reorder --cgroup /a --port 9 --gap soon --ttl 1s", "--gap"),
            (
                "slice --cgroup /a --port 9 --max-bytes 16 --delay x --ttl 1s",
                "--delay",
            ),
        ] {
            let error = inject_command(line).unwrap_err().to_string();
            assert!(error.contains(&format!("e.g. {flag} ")), "{line}: {error}");
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
}
