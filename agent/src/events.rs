//! What happens to faults, as it happens: the engine publishes an event for every fault applied,
//! every fault reverted (with the reason) and every change the kernel refused. `Watch` streams
//! them to clients. A slow watcher that falls more than `CAPACITY` events behind is told so
//! instead of slowing the engine down.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::fault::view::{FaultView, RevertReason};

/// Events a watcher may fall behind by before its stream ends with "lagged".
pub const CAPACITY: usize = 8192;

#[derive(Clone, Debug)]
pub enum EventKind {
    Applied,
    Reverted {
        reason: RevertReason,
        /// e.g. "lease expired", "max_fault_duration 1h reached".
        detail: String,
    },
    /// The kernel refused to apply (nothing was applied) or to remove a fault (it is then
    /// REVERT_FAILING and tried again until it is out).
    Failed {
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct FaultEvent {
    pub time: SystemTime,
    pub kind: EventKind,
    /// The fault at the time of the event; on a revert with its final counters.
    pub fault: FaultView,
}

/// The engine's side of the event stream.
#[derive(Clone, Debug)]
pub struct Events {
    sender: broadcast::Sender<Arc<FaultEvent>>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    pub fn publish(&self, kind: EventKind, fault: FaultView) {
        let event = FaultEvent {
            time: SystemTime::now(),
            kind,
            fault,
        };
        // An error only means nobody is watching.
        let _nobody_watching = self.sender.send(Arc::new(event));
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FaultEvent>> {
        self.sender.subscribe()
    }

    /// Whether anyone watches (to skip building events nobody reads).
    pub fn watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }
}
