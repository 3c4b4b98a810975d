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
    /// What netem does to the packets besides delaying them (duplicate, corrupt, reorder).
    pub tamper: Tamper,
}

/// netem's packet tampering, for the duplicate, corrupt and reorder faults; none on delay and
/// bandwidth faults. EDT has none of it.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Tamper {
    /// Percent (0 to 100) of the packets sent twice.
    pub duplicate: f64,
    /// Percent of the packets with one bit flipped (checksum left as it was).
    pub corrupt: f64,
    /// Percent of the packets held back by the spec's latency (the reorder gap) while the
    /// others leave at once and overtake them.
    pub reorder: Option<f64>,
}

impl Tamper {
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }
}
