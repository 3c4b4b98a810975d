//! SIGINT and SIGTERM for the commands that run until stopped (`watch`, `inject --keepalive`),
//! so a stop ends in an orderly way instead of the default exit.

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM, registered up front (tokio's `ctrl_c()` only registers on first poll).
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        let install = |kind| signal(kind).context("installing the signal handlers");
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupt",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
