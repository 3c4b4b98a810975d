//! Unique names: process id + counter + random suffix, so parallel tests and parallel test
//! processes never share a namespace, cgroup, socket or directory.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<pid>-<counter>-<6 random hex digits>`.
pub fn uniq() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}-{:06x}", std::process::id(), random() & 0xff_ffff)
}

fn random() -> u64 {
    let mut bytes = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_le_bytes(bytes),
        // The pid and counter already make the name unique; the suffix only guards against
        // leftovers of an earlier process that had the same pid.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0),
    }
}
