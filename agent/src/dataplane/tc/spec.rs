//! What a shaping fault does to its packets, and by which mechanism: the leaf both mechanisms
//! and the shared tc state read.

use std::time::Duration;

/// Which shaping mechanism a fault uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShapeMechanism {
    Netem,
    Edt,
}

impl ShapeMechanism {
    pub fn name(self) -> &'static str {
        match self {
            Self::Netem => "netem",
            Self::Edt => "edt",
        }
    }
}

/// What a shaping fault does to its packets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapeSpec {
    pub latency: Duration,
    /// Standard deviation of the added delay (normal distribution).
    pub jitter: Duration,
    /// Correlation of successive delays, 0 to 100 (percent).
    pub correlation: f64,
    /// Bytes per second; 0 for no limit.
    pub rate_bytes_per_sec: u64,
    /// Bytes that may pass at line rate before the limit applies.
    pub burst_bytes: u32,
}
