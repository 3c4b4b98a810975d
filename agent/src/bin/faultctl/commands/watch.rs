//! `faultctl watch`: fault events as they happen, one line each, until Ctrl-C.

use std::io::Write;

use anyhow::{Context, Result, bail};
use faultd_proto::v1::WatchRequest;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use tonic::transport::Channel;

use crate::args::Output;
use crate::error::rpc_error;
use crate::output::json::event_json;
use crate::output::text::event_text;
use crate::signals::Signals;

/// Prints events until Ctrl-C (Ok) or until faultd ends the stream (Err: it says why).
pub async fn watch(faults: &mut FaultServiceClient<Channel>, output: Output) -> Result<()> {
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
