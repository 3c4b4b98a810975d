//! Request matches in the kernel: the `FAULTD_REQ_*` maps a fault's counter slot keys (its
//! protocol and key prefix, its names), and the thread that tears down the connection of each
//! request a `reset` fault dropped, or whose reply a `lose_reply` fault dropped, as the program
//! reports it in the `FAULTD_REQ_EVENTS` ring.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use faultd_common::{
    REQ_ARMED_MAP, REQ_EVENTS_MAP, REQ_NAME_LEN, REQ_NAMES_MAP, REQ_SPECS_MAP, RequestArm,
    RequestEvent, RequestName, RequestSpec,
};

use super::error::map_err;
use super::{DataplaneError, LoadError, SocketFilter, sock_diag};

/// What a fault with a request match puts in the kernel, and for a reset, the connections its
/// dropped requests may belong to.
#[derive(Clone, Debug)]
pub struct RequestEntry {
    pub spec: RequestSpec,
    pub names: Vec<[u8; REQ_NAME_LEN]>,
    /// reset, lose_reply: the fault's sockets (the event's cookie picks one).
    pub reset: Option<SocketFilter>,
}

pub struct Requests {
    specs: BpfHashMap<MapData, u32, RequestSpec>,
    names: BpfHashMap<MapData, RequestName, u32>,
    /// The socket filters of reset faults, by counter slot.
    resets: Arc<Mutex<HashMap<u32, SocketFilter>>>,
    /// Connections whose reply a lose_reply fault loses, by socket cookie.
    armed: Arc<Mutex<BpfHashMap<MapData, u64, RequestArm>>>,
    stop: Arc<AtomicBool>,
}

/// How long the reset thread waits in poll before looking at its stop flag.
const POLL_MS: i32 = 200;

impl Requests {
    /// Takes the maps out of the object and starts the reset thread.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(LoadError::MissingMap(name));
        let specs = BpfHashMap::try_from(take(REQ_SPECS_MAP)?).map_err(map_err(REQ_SPECS_MAP))?;
        let names = BpfHashMap::try_from(take(REQ_NAMES_MAP)?).map_err(map_err(REQ_NAMES_MAP))?;
        let ring = RingBuf::try_from(take(REQ_EVENTS_MAP)?).map_err(map_err(REQ_EVENTS_MAP))?;
        let armed = BpfHashMap::try_from(take(REQ_ARMED_MAP)?).map_err(map_err(REQ_ARMED_MAP))?;
        let armed = Arc::new(Mutex::new(armed));
        let resets = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_resets, thread_armed, thread_stop) =
            (resets.clone(), armed.clone(), stop.clone());
        std::thread::Builder::new()
            .name("request-resets".into())
            .spawn(move || reset_loop(ring, &thread_resets, &thread_armed, &thread_stop))
            .map_err(|e| DataplaneError::Shaper {
                mechanism: "request match",
                reason: format!("starting the reset thread: {e}"),
            })?;
        Ok(Self {
            specs,
            names,
            resets,
            armed,
            stop,
        })
    }

    /// Writes the spec and names of the fault counting into `slot` (before its rules, so the
    /// program never finds a rule without them; it would pass the packet anyway).
    pub fn set(&mut self, slot: u32, entry: &RequestEntry) -> Result<(), DataplaneError> {
        if let Some(filter) = &entry.reset {
            lock(&self.resets).insert(slot, filter.clone());
        }
        self.specs
            .insert(slot, entry.spec, 0)
            .map_err(map_err(REQ_SPECS_MAP))?;
        for name in &entry.names {
            self.names
                .insert(name_key(slot, name), 1, 0)
                .map_err(map_err(REQ_NAMES_MAP))?;
        }
        Ok(())
    }

    /// Takes them out again; missing entries are ignored.
    pub fn remove(&mut self, slot: u32, entry: &RequestEntry) -> Result<(), DataplaneError> {
        lock(&self.resets).remove(&slot);
        let mut first_error = None;
        for name in &entry.names {
            match self.names.remove(&name_key(slot, name)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    first_error.get_or_insert(map_err(REQ_NAMES_MAP)(e));
                }
            }
        }
        match self.specs.remove(&slot) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                first_error.get_or_insert(map_err(REQ_SPECS_MAP)(e));
            }
        }
        // Connections the fault armed and whose reply never came: a later fault on the same
        // slot must not inherit them.
        let mut armed = lock(&self.armed);
        let stale: Vec<u64> = armed
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, arm)| arm.slot == slot)
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in stale {
            if let Err(e) = armed.remove(&cookie)
                && !matches!(e, aya::maps::MapError::KeyNotFound)
            {
                first_error.get_or_insert(map_err(REQ_ARMED_MAP)(e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn name_key(slot: u32, name: &[u8; REQ_NAME_LEN]) -> RequestName {
    RequestName {
        slot,
        _pad: 0,
        name: *name,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for events and destroys each named socket at once.
fn reset_loop(
    mut ring: RingBuf<MapData>,
    resets: &Mutex<HashMap<u32, SocketFilter>>,
    armed: &Mutex<BpfHashMap<MapData, u64, RequestArm>>,
    stop: &AtomicBool,
) {
    let mut sockets = sock_diag::Sockets::default();
    let mut pollfd = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Acquire) {
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pollfd, 1, POLL_MS) };
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<RequestEvent>() {
                // SAFETY: the program writes whole RequestEvents; read unaligned to be safe.
                events.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast::<RequestEvent>())
                });
            }
        }
        for event in events {
            let Some(mut filter) = lock(resets).get(&event.slot).cloned() else {
                continue; // the fault is gone
            };
            filter.cookie = Some(event.cookie);
            let started = Instant::now();
            match sock_diag::destroy(&filter, &mut sockets) {
                Ok(done) => tracing::debug!(
                    cookie = event.cookie,
                    destroyed = done.sockets,
                    took_us = started.elapsed().as_micros() as u64,
                    "request reset"
                ),
                Err(e) => tracing::warn!(error = %e, cookie = event.cookie, "request reset"),
            }
            if let Err(e) = lock(armed).remove(&event.cookie)
                && !matches!(e, aya::maps::MapError::KeyNotFound)
            {
                tracing::warn!(error = %e, cookie = event.cookie, "disarming a connection");
            }
        }
    }
}
