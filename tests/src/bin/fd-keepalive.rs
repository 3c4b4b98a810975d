//! fd-keepalive: holds a LeaseService.KeepAlive stream for a lease until killed.
//!
//! `fd-keepalive --socket PATH --lease ID [--every 250ms]` sends one KeepAlive request per
//! period and prints `<unix_time_ns> <expires_at_unix_ns>` for each answer. The tests SIGKILL
//! it to play a controller that dies without revoking.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use faultd_proto::v1::KeepAliveRequest;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use tokio_stream::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut socket = None;
    let mut lease = None;
    let mut every = Duration::from_millis(250);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--socket" => socket = Some(value),
            "--lease" => lease = Some(value),
            "--every" => every = faultd::duration::parse(&value).map_err(anyhow::Error::msg)?,
            _ => bail!("unknown argument {arg}"),
        }
    }
    let (Some(socket), Some(lease_id)) = (socket, lease) else {
        bail!("usage: fd-keepalive --socket PATH --lease ID [--every 250ms]");
    };
    let channel = faultd::client::connect(&socket)
        .await
        .with_context(|| format!("connecting to {socket}"))?;
    let mut client = LeaseServiceClient::new(channel);
    let requests =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every)).map(move |_| {
            KeepAliveRequest {
                lease_id: lease_id.clone(),
            }
        });
    let mut answers = client
        .keep_alive(requests)
        .await
        .context("KeepAlive")?
        .into_inner();
    while let Some(lease) = answers.next().await {
        let lease = lease.context("KeepAlive stream")?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let expires = lease
            .expires_at
            .map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
            .unwrap_or(0);
        println!("{now} {expires}");
    }
    bail!("faultd closed the KeepAlive stream")
}
