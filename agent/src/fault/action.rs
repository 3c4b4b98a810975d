//! What a fault does: drop, reject, reset, delay, bandwidth, stall, slow_connect, slow_close, with their parameters and
//! their validation, and how a delay or bandwidth is applied (`Mechanism`).

use std::time::Duration;

use super::Invalid;

/// Longest latency, and largest jitter, a delay fault may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// How a delay or bandwidth fault is applied (DESIGN.md, Mechanisms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// A netem (or tbf/htb) class selected by a BPF classifier.
    Netem,
    /// Departure times set by a BPF program, enforced by the fq qdisc.
    Edt,
    /// Packets held in user space through an NFQUEUE rule with `--queue-bypass`.
    Nfqueue,
}

impl Mechanism {
    /// In the order the agent prefers them when the user leaves the choice to it.
    pub const PREFERENCE: [Mechanism; 3] = [Mechanism::Netem, Mechanism::Edt, Mechanism::Nfqueue];

    /// The name shown to users (`Fault.mechanism`, `faultctl caps`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Netem => "netem",
            Self::Edt => "edt",
            Self::Nfqueue => "nfqueue",
        }
    }
}

/// `delay`: hold each matched packet for `latency` plus a normally distributed random part of
/// standard deviation `jitter`, whose successive values are correlated by `correlation` %.
#[derive(Clone, Debug, PartialEq)]
pub struct Delay {
    pub latency: Duration,
    pub jitter: Duration,
    /// 0 to 100.
    pub correlation: f64,
    /// None: the agent chooses.
    pub mechanism: Option<Mechanism>,
}

/// `bandwidth`: pace the matched packets to `rate_bytes_per_sec` through a token bucket of
/// `burst` bytes (one bucket per direction).
#[derive(Clone, Debug, PartialEq)]
pub struct Bandwidth {
    pub rate_bytes_per_sec: u64,
    pub burst: u64,
    /// None: the agent chooses.
    pub mechanism: Option<Mechanism>,
}

impl Bandwidth {
    /// The bucket when the user gives none: 10 ms at the rate, and at least one full-size
    /// Ethernet frame so that a packet never waits for more tokens than the bucket holds.
    pub fn default_burst(rate_bytes_per_sec: u64) -> u64 {
        (rate_bytes_per_sec / 100).max(1514)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Drop `percent` (0–100) of the matched packets.
    Drop {
        percent: f64,
    },
    /// New TCP connects of the target fail with ECONNREFUSED; existing connections live on.
    Reject,
    /// Established TCP connections of the target are torn down at once, and new connects are
    /// refused for as long as the fault lasts. With `after_bytes`, each connection is instead
    /// torn down once it has carried that many bytes, and new connects are allowed.
    Reset {
        after_bytes: Option<u64>,
    },
    Delay(Delay),
    Bandwidth(Bandwidth),
    /// The matched request reaches the server and runs; its reply never reaches the client,
    /// whose connection is then torn down. Only with a request match.
    LoseReply,
    /// TCP connections stay up but no data (nor FIN) flows in the matched direction: readers
    /// hang. With `close_after`, each connection is then torn down that long after the fault
    /// first saw it.
    Stall {
        close_after: Option<Duration>,
    },
    /// Only the TCP handshake waits: each SYN is held for `latency`, so a connect takes that
    /// much longer; established connections are not slowed.
    SlowConnect {
        latency: Duration,
    },
    /// Each TCP FIN is held for `latency`: the peer sees the close that much later.
    SlowClose {
        latency: Duration,
    },
    /// Send `percent` of the matched packets twice.
    Duplicate {
        percent: f64,
        /// None: the agent chooses.
        mechanism: Option<Mechanism>,
    },
    /// Flip a bit in `percent` of the matched packets, leaving their checksum wrong, so that
    /// the receiver drops them as it drops a packet damaged on the wire.
    Corrupt {
        percent: f64,
        mechanism: Option<Mechanism>,
    },
    /// Hold `percent` of the matched packets back for `gap`, so that later ones overtake them.
    Reorder {
        percent: f64,
        gap: Duration,
        mechanism: Option<Mechanism>,
    },
    /// Cut the data of each matched TCP segment into pieces of at most `max_bytes`, sent
    /// `delay` apart.
    Slice {
        max_bytes: u32,
        delay: Duration,
    },
}

/// The largest piece a slice fault may ask for (beyond it nothing would be cut).
pub const MAX_SLICE: u32 = 65_535;
/// The longest pause between the pieces of a slice: pieces that take longer than TCP's
/// retransmission timeout make the sender resend the segment, which is cut again.
pub const MAX_SLICE_DELAY: Duration = Duration::from_millis(100);

/// The gap a reorder fault holds packets back by when the user gives none.
pub const DEFAULT_REORDER_GAP: Duration = Duration::from_millis(10);

impl Action {
    pub fn drop(percent: f64, field: &str) -> Result<Self, Invalid> {
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return Err(Invalid::new(
                field,
                format!("{percent} is outside 0 to 100"),
            ));
        }
        Ok(Self::Drop { percent })
    }

    /// `field` is the action's path, e.g. `fault.delay`.
    pub fn delay(
        latency: Duration,
        jitter: Duration,
        correlation: f64,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        if latency.is_zero() {
            return Err(Invalid::new(
                format!("{field}.latency"),
                "must be greater than 0 (e.g. \"100ms\")",
            ));
        }
        for (name, value) in [("latency", latency), ("jitter", jitter)] {
            at_most(value, MAX_DELAY, || format!("{field}.{name}"))?;
        }
        if !correlation.is_finite() || !(0.0..=100.0).contains(&correlation) {
            return Err(Invalid::new(
                format!("{field}.correlation"),
                format!("{correlation} is outside 0 to 100"),
            ));
        }
        Ok(Self::Delay(Delay {
            latency,
            jitter,
            correlation,
            mechanism,
        }))
    }

    /// `burst` 0 takes `Bandwidth::default_burst`.
    pub fn bandwidth(
        rate_bytes_per_sec: u64,
        burst: u64,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        if rate_bytes_per_sec == 0 {
            return Err(Invalid::new(
                format!("{field}.rate_bytes_per_sec"),
                "must be greater than 0 (e.g. 262144 for 256 KiB/s); use drop to cut traffic off",
            ));
        }
        let burst = match burst {
            0 => Bandwidth::default_burst(rate_bytes_per_sec),
            burst => burst,
        };
        Ok(Self::Bandwidth(Bandwidth {
            rate_bytes_per_sec,
            burst,
            mechanism,
        }))
    }

    pub fn reset(after_bytes: Option<u64>, field: &str) -> Result<Self, Invalid> {
        if after_bytes == Some(0) {
            return Err(Invalid::new(
                field,
                "must be at least 1 (leave it out to reset every connection now)",
            ));
        }
        Ok(Self::Reset { after_bytes })
    }

    /// `field` is the action's path, e.g. `fault.stall`.
    pub fn stall(close_after: Option<Duration>, field: &str) -> Result<Self, Invalid> {
        if close_after.is_some_and(|d| d.is_zero()) {
            return Err(Invalid::new(
                format!("{field}.close_after"),
                "must be greater than 0 (leave it out to stall until the fault ends)",
            ));
        }
        Ok(Self::Stall { close_after })
    }

    /// `field` is the action's path, `fault.slow_connect`.
    pub fn slow_connect(latency: Duration, field: &str) -> Result<Self, Invalid> {
        slow_latency(latency, field).map(|latency| Self::SlowConnect { latency })
    }

    /// `field` is the action's path, `fault.slow_close`.
    pub fn slow_close(latency: Duration, field: &str) -> Result<Self, Invalid> {
        slow_latency(latency, field).map(|latency| Self::SlowClose { latency })
    }

    /// `field` is the action's path, `fault.duplicate`.
    pub fn duplicate(
        percent: f64,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        tamper_checks(percent, mechanism, field)?;
        Ok(Self::Duplicate { percent, mechanism })
    }

    /// `field` is the action's path, `fault.corrupt`.
    pub fn corrupt(
        percent: f64,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        tamper_checks(percent, mechanism, field)?;
        Ok(Self::Corrupt { percent, mechanism })
    }

    /// `field` is the action's path, `fault.reorder`. A zero `gap` takes `DEFAULT_REORDER_GAP`.
    pub fn reorder(
        percent: f64,
        gap: Duration,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        Self::drop(percent, &format!("{field}.percent"))?;
        at_most(gap, MAX_DELAY, || format!("{field}.gap"))?;
        changes_packets(mechanism, field)?;
        Ok(Self::Reorder {
            percent,
            gap: if gap.is_zero() {
                DEFAULT_REORDER_GAP
            } else {
                gap
            },
            mechanism,
        })
    }

    /// `field` is the action's path, `fault.slice`.
    pub fn slice(max_bytes: u32, delay: Duration, field: &str) -> Result<Self, Invalid> {
        at_most(delay, MAX_SLICE_DELAY, || format!("{field}.delay"))?;
        if max_bytes == 0 || max_bytes > MAX_SLICE {
            return Err(Invalid::new(
                format!("{field}.max_bytes"),
                format!("{max_bytes} is not between 1 and {MAX_SLICE} (e.g. 16)"),
            ));
        }
        Ok(Self::Slice { max_bytes, delay })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Slice { .. } => "slice",
            Self::Duplicate { .. } => "duplicate",
            Self::Corrupt { .. } => "corrupt",
            Self::Reorder { .. } => "reorder",
            Self::Stall { .. } => "stall",
            Self::SlowConnect { .. } => "slow_connect",
            Self::SlowClose { .. } => "slow_close",
            Self::Drop { .. } => "drop",
            Self::Delay(_) => "delay",
            Self::Bandwidth(_) => "bandwidth",
            Self::Reject => "reject",
            Self::Reset { .. } => "reset",
            Self::LoseReply => "lose_reply",
        }
    }

    /// For actions applied by a shaping mechanism (delay, bandwidth): the mechanism the user
    /// forced, if any. None for actions of the cgroup_skb datapath.
    pub fn shaping(&self) -> Option<Option<Mechanism>> {
        match self {
            Self::Drop { .. }
            | Self::Reject
            | Self::Reset { .. }
            | Self::LoseReply
            | Self::Stall { .. } => None,
            Self::Delay(delay) => Some(delay.mechanism),
            Self::Bandwidth(bandwidth) => Some(bandwidth.mechanism),
            // Held by the mechanism that can tell segments by their TCP flags.
            Self::SlowConnect { .. } | Self::SlowClose { .. } => Some(None),
            Self::Duplicate { mechanism, .. }
            | Self::Corrupt { mechanism, .. }
            | Self::Reorder { mechanism, .. } => Some(*mechanism),
            Self::Slice { .. } => Some(None),
        }
    }

    /// The mechanisms tried, in order, when the user forces none. A duplicate takes NFQUEUE
    /// first and netem only where NFQUEUE is missing: some kernels refuse a duplicating netem
    /// and another netem on one interface, which would break the duplicate, or a later delay
    /// beside it (EDT only delays).
    pub fn auto_preference(&self) -> &'static [Mechanism] {
        match self {
            Self::Duplicate { .. } => &[Mechanism::Nfqueue, Mechanism::Netem],
            _ => &Mechanism::PREFERENCE,
        }
    }

    /// `percent` as the threshold the program compares `bpf_get_prandom_u32()` with (0 for
    /// actions that drop nothing).
    pub fn drop_threshold(&self) -> u64 {
        match self {
            Self::Drop { percent } => {
                ((percent / 100.0) * faultd_common::DROP_ALL as f64).round() as u64
            }
            Self::Reject
            | Self::Reset { .. }
            | Self::Delay(_)
            | Self::Bandwidth(_)
            | Self::LoseReply
            | Self::Stall { .. }
            | Self::SlowConnect { .. }
            | Self::SlowClose { .. }
            | Self::Duplicate { .. }
            | Self::Corrupt { .. }
            | Self::Reorder { .. }
            | Self::Slice { .. } => 0,
        }
    }

    /// Whether new connects of the target are refused while the fault lasts.
    pub fn refuses_connects(&self) -> bool {
        matches!(self, Self::Reject | Self::Reset { after_bytes: None })
    }

    /// Whether the fault acts on TCP segments only.
    pub(super) fn tcp_only(&self) -> bool {
        matches!(
            self,
            Self::Stall { .. }
                | Self::SlowConnect { .. }
                | Self::SlowClose { .. }
                | Self::Slice { .. }
        )
    }

    /// The connections a fault tears down later, and when: `reset{after_bytes}` and
    /// `stall{close_after}` (through a watcher of the target's sockets).
    pub fn closes_connections(&self) -> bool {
        matches!(
            self,
            Self::Reset {
                after_bytes: Some(_)
            } | Self::Stall {
                close_after: Some(_)
            }
        )
    }

    /// Whether the fault acts on connections rather than packets.
    pub(super) fn on_connections(&self) -> bool {
        matches!(self, Self::Reject | Self::Reset { .. })
    }
}

/// INVALID_ARGUMENT naming `field` when `value` is over `max`.
fn at_most(value: Duration, max: Duration, field: impl FnOnce() -> String) -> Result<(), Invalid> {
    if value > max {
        return Err(Invalid::new(
            field(),
            format!(
                "{} exceeds the maximum {}",
                crate::duration::format(value),
                crate::duration::format(max)
            ),
        ));
    }
    Ok(())
}

/// The latency of `slow_connect`/`slow_close` (`field`: the action's path).
fn slow_latency(latency: Duration, field: &str) -> Result<Duration, Invalid> {
    if latency.is_zero() || latency > MAX_DELAY {
        return Err(Invalid::new(
            format!("{field}.latency"),
            format!(
                "{} is not between 0 (excluded) and {} (e.g. \"300ms\")",
                crate::duration::format(latency),
                crate::duration::format(MAX_DELAY)
            ),
        ));
    }
    Ok(latency)
}

/// What `duplicate` and `corrupt` check (`field`: the action's path): the share as drop's, and
/// a mechanism that can change packets.
fn tamper_checks(percent: f64, mechanism: Option<Mechanism>, field: &str) -> Result<(), Invalid> {
    Action::drop(percent, &format!("{field}.percent"))?;
    changes_packets(mechanism, field)
}

/// A forced mechanism of `duplicate`, `corrupt` or `reorder` must be able to change packets.
fn changes_packets(mechanism: Option<Mechanism>, field: &str) -> Result<(), Invalid> {
    if mechanism == Some(Mechanism::Edt) {
        return Err(Invalid::new(
            format!("{field}.mechanism"),
            "edt only delays packets: use netem or nfqueue (or leave it unset)",
        ));
    }
    Ok(())
}
