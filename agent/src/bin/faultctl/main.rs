//! `faultctl`, the command-line client of faultd: it turns flags into `faultd.v1` requests over
//! the agent's unix socket (or its mTLS TCP listener, `--server tcp://...`) and prints the
//! answers for people (`--output text`) or scripts (`--output json`, proto3 JSON field names).
//! It holds no state of its own except, with `--keepalive`, the lease it keeps alive until
//! Ctrl-C or SIGTERM.
//!
//! This file parses, connects and dispatches; the rooms: `args` (the flags and their checks),
//! `connect` (the unix, TCP or TLS channel), `commands` (one function a subcommand), `hold`
//! (the --keepalive lease hold), `signals` (SIGINT and SIGTERM), `output` (text and JSON) and
//! `error` (how a failed call reads).

mod args;
mod commands;
mod connect;
mod error;
mod hold;
mod output;
mod signals;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;

use args::{Cli, Command};

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

async fn run(cli: Cli) -> Result<()> {
    let output = cli.output;
    if let Err(why) = args::validate(&cli.command)
        .and_then(|()| args::validate_connection(cli.server.as_ref(), &cli.tls))
    {
        args::usage_error(why);
    }
    let channel = connect::channel(cli.server.as_ref(), &cli.socket, &cli.tls).await?;
    if let Command::Health = cli.command {
        return commands::agent::health(channel, output).await;
    }
    let mut faults = FaultServiceClient::new(channel.clone());
    let mut leases = LeaseServiceClient::new(channel);
    match cli.command {
        Command::Inject(command) => {
            let (args, action) = command.into_parts();
            commands::inject::inject(&mut faults, &mut leases, args, action, output).await
        }
        Command::List { ended, all } => {
            commands::faults::list(&mut faults, ended, all, output).await
        }
        Command::Get { id } => commands::faults::get(&mut faults, id, output).await,
        Command::Rm { id } => commands::faults::remove(&mut faults, id, output).await,
        Command::Abort => commands::faults::abort(&mut faults, output).await,
        Command::Caps => commands::agent::caps(&mut faults, output).await,
        Command::Lease(command) => commands::lease::run(&mut leases, command, output).await,
        Command::Watch => commands::watch::watch(&mut faults, output).await,
        Command::Health => unreachable!("answered above"),
    }
}
