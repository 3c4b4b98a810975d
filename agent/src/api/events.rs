//! FaultService.Watch: the engine's events, as they happen, to one client.

use std::pin::Pin;

use faultd_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::convert;
use crate::engine::Engine;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::FaultEvent, Status>> + Send>>;

/// Events from now until the client goes away, it falls `events::CAPACITY` events behind
/// (DATA_LOSS), or faultd stops (the shutdown's reverts, then UNAVAILABLE).
pub fn stream(engine: &Engine, shutdown: watch::Receiver<bool>) -> EventStream {
    let mut events = engine.subscribe();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let shutdown = super::stopped(shutdown);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                // Events first: those published before the stop (its reverts) still go out.
                biased;
                event = events.recv() => {
                    let message = match event {
                        Ok(event) => Ok(convert::event(&event)),
                        Err(RecvError::Lagged(missed)) => Err(Status::data_loss(format!(
                            "this watcher fell {missed} events behind; List shows the current \
                             state, then Watch again"
                        ))),
                        Err(RecvError::Closed) => break,
                    };
                    let end = message.is_err();
                    if tx.send(message).await.is_err() || end {
                        break;
                    }
                }
                () = &mut shutdown => {
                    while let Ok(event) = events.try_recv() {
                        if tx.send(Ok(convert::event(&event))).await.is_err() {
                            return;
                        }
                    }
                    let status = Status::unavailable("faultd is stopping; every fault was reverted");
                    let _client_gone = tx.send(Err(status)).await;
                    break;
                }
                () = tx.closed() => break,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
