//! When packets leave: each packet's release time under a delay (latency, jitter, correlation),
//! a bandwidth (token bucket per direction) or a reorder (some held back, the others at once),
//! and the flow a packet belongs to.

use std::collections::HashMap;

use super::error::NfqueueError;
use crate::dataplane::clock::monotonic_now_ns;
use crate::fault::Action;

/// splitmix64: small, fast, good enough for delays.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn seeded() -> Rng {
        let mut bytes = [0u8; 8];
        // SAFETY: getrandom writes at most `len` bytes into the buffer.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let seed = if n == bytes.len() as isize {
            u64::from_le_bytes(bytes)
        } else {
            monotonic_now_ns() ^ u64::from(std::process::id())
        };
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub(super) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Bucket {
    /// May go negative: bytes promised to packets that wait.
    tokens: f64,
    last_ns: u64,
}

pub(super) enum Model {
    Delay {
        latency_ns: f64,
        jitter_ns: f64,
        /// Correlation of successive random parts, 0 to 1.
        rho: f64,
        /// The last standard-normal random part.
        z: f64,
    },
    /// `share` of the packets leave `gap_ns` late, the others at once: later packets of a flow
    /// overtake the held ones (no per-flow order).
    Reorder { share: f64, gap_ns: u64 },
    /// Every packet leaves at once (duplicate, corrupt: the tamper acts on it).
    Pass,
    Pace {
        bytes_per_ns: f64,
        burst: f64,
        /// Outbound, inbound.
        buckets: [Bucket; 2],
    },
}

/// Computes each packet's release time.
pub(super) struct Schedule {
    model: Model,
    /// Release time of the last packet of each flow, for per-flow order.
    flows: HashMap<u64, u64>,
    rng: Rng,
}

impl Schedule {
    /// Whether packets held back are reordered (rather than delayed).
    pub(super) fn reorders(&self) -> bool {
        matches!(self.model, Model::Reorder { .. })
    }

    pub(super) fn new(action: &Action, rng: Rng) -> Result<Schedule, NfqueueError> {
        let model = match action {
            Action::Delay(delay) => Model::Delay {
                latency_ns: delay.latency.as_nanos() as f64,
                jitter_ns: delay.jitter.as_nanos() as f64,
                rho: delay.correlation / 100.0,
                z: 0.0,
            },
            Action::SlowConnect { latency } | Action::SlowClose { latency } => Model::Delay {
                latency_ns: latency.as_nanos() as f64,
                jitter_ns: 0.0,
                rho: 0.0,
                z: 0.0,
            },
            Action::Reorder { percent, gap, .. } => Model::Reorder {
                share: percent / 100.0,
                gap_ns: gap.as_nanos() as u64,
            },
            Action::Duplicate { .. } | Action::Corrupt { .. } | Action::Slice { .. } => Model::Pass,
            Action::Bandwidth(bandwidth) => {
                let burst = bandwidth.burst as f64;
                let full = Bucket {
                    tokens: burst,
                    last_ns: 0,
                };
                Model::Pace {
                    bytes_per_ns: bandwidth.rate_bytes_per_sec as f64 / 1e9,
                    burst,
                    buckets: [full; 2],
                }
            }
            other => return Err(NfqueueError::NotApplicable(other.name())),
        };
        Ok(Schedule {
            model,
            flows: HashMap::new(),
            rng,
        })
    }

    /// When a packet of `flow` that arrived at `now` and is not itself delayed may leave: at
    /// once, or behind what its flow has waiting.
    pub(super) fn in_order(&self, now: u64, flow: u64) -> u64 {
        self.flows.get(&flow).map_or(now, |&last| last.max(now))
    }

    /// When a packet of `len` bytes of `flow` that arrived at `now` may leave.
    pub(super) fn release_at(&mut self, now: u64, flow: u64, len: usize, inbound: bool) -> u64 {
        let release = match &mut self.model {
            Model::Reorder { share, gap_ns } => {
                let held = self.rng.unit() <= *share;
                // Out of order on purpose: the flow's order is not kept.
                return if held {
                    now.saturating_add(*gap_ns)
                } else {
                    now
                };
            }
            Model::Pass => now,
            Model::Delay {
                latency_ns,
                jitter_ns,
                rho,
                z,
            } => {
                if *jitter_ns > 0.0 {
                    *z = *rho * *z + (1.0 - *rho * *rho).sqrt() * self.rng.normal();
                }
                let delay = (*latency_ns + *jitter_ns * *z).max(0.0);
                now.saturating_add(delay as u64)
            }
            Model::Pace {
                bytes_per_ns,
                burst,
                buckets,
            } => {
                let bucket = &mut buckets[usize::from(inbound)];
                if bucket.last_ns == 0 {
                    bucket.last_ns = now;
                }
                let elapsed = now.saturating_sub(bucket.last_ns) as f64;
                bucket.tokens = (bucket.tokens + elapsed * *bytes_per_ns).min(*burst);
                bucket.last_ns = now;
                // A packet leaves once the bucket holds all of it, as if it had crossed a link of
                // this rate; tokens beyond the burst accrue only for packets that wait.
                let len = len as f64;
                let wait = if bucket.tokens >= len {
                    0.0
                } else {
                    (len - bucket.tokens) / *bytes_per_ns
                };
                bucket.tokens -= len;
                now.saturating_add(wait.ceil() as u64)
            }
        };
        if self.flows.len() > 4096 {
            self.flows.retain(|_, last| *last > now);
        }
        let last = self.flows.entry(flow).or_insert(0);
        let release = release.max(*last);
        *last = release;
        release
    }
}

/// A hash of the packet's protocol, addresses and ports (0 when it cannot be parsed).
pub(super) fn flow_of(packet: &[u8]) -> u64 {
    let (protocol, addresses, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (packet[9], &packet[12..20], ihl)
        }
        Some(6) if packet.len() >= 40 => (packet[6], &packet[8..40], 40),
        _ => return 0,
    };
    // What identifies the flow.
    let hash = fnv1a(fnv1a(FNV_OFFSET, &[protocol]), addresses);
    match packet.get(l4..l4 + 4) {
        Some(ports) if matches!(protocol, 6 | 17) => fnv1a(hash, ports),
        _ => hash,
    }
}

/// FNV-1a's starting value.
pub(super) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: `hash` (`FNV_OFFSET` to start) with `bytes` added.
pub(super) fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fault::Action;

    const MS: u64 = 1_000_000;

    fn delay(latency_ms: u64, jitter_ms: u64, correlation: f64) -> Schedule {
        let action = Action::delay(
            Duration::from_millis(latency_ms),
            Duration::from_millis(jitter_ms),
            correlation,
            None,
            "f",
        )
        .unwrap();
        Schedule::new(&action, Rng(42)).unwrap()
    }

    fn stats(values: &[f64]) -> (f64, f64) {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn a_fixed_delay_is_exact() {
        let mut schedule = delay(100, 0, 0.0);
        for i in 0..10 {
            let now = 1_000 * MS + i * 7 * MS;
            assert_eq!(schedule.release_at(now, i, 100, false), now + 100 * MS);
        }
    }

    #[test]
    fn jitter_has_the_requested_spread_with_or_without_correlation() {
        for correlation in [0.0, 25.0, 75.0] {
            let mut schedule = delay(50, 20, correlation);
            let samples: Vec<f64> = (0..20_000u64)
                .map(|i| {
                    let now = i * 1000 * MS;
                    (schedule.release_at(now, i, 100, false) - now) as f64 / MS as f64
                })
                .collect();
            let (mean, sd) = stats(&samples);
            assert!(
                (mean - 50.0).abs() < 1.0,
                "correlation {correlation}: mean {mean}"
            );
            assert!(
                (sd - 20.0).abs() < 1.0,
                "correlation {correlation}: sd {sd}"
            );
            let lag1 = samples
                .windows(2)
                .map(|w| (w[0] - mean) * (w[1] - mean))
                .sum::<f64>()
                / ((samples.len() - 1) as f64 * sd * sd);
            assert!(
                (lag1 - correlation / 100.0).abs() < 0.05,
                "correlation {correlation}: measured {lag1}"
            );
        }
    }

    #[test]
    fn a_flow_keeps_its_order() {
        let mut schedule = delay(10, 50, 0.0);
        let mut last = 0;
        for i in 0..1000u64 {
            let at = schedule.release_at(i * MS / 10, 7, 100, false);
            assert!(at >= last, "packet {i} would overtake the one before it");
            last = at;
        }
    }

    #[test]
    fn reorder_holds_its_share_back_and_lets_the_rest_overtake() {
        let gap = Duration::from_millis(10);
        let action = Action::reorder(25.0, gap, None, "f").unwrap();
        let mut schedule = Schedule::new(&action, Rng(3)).unwrap();
        let (mut held, mut overtaken) = (0, 0);
        let mut last = 0;
        for i in 0..10_000u64 {
            let now = i * MS / 10;
            let at = schedule.release_at(now, 7, 100, false);
            match at - now {
                0 => {}
                d if d == gap.as_nanos() as u64 => held += 1,
                d => panic!("released {d} ns late"),
            }
            if at < last {
                overtaken += 1;
            }
            last = last.max(at);
        }
        assert!((2300..2700).contains(&held), "held {held} of 10000");
        assert!(
            overtaken > 2000,
            "only {overtaken} packets left before a held one"
        );
        let duplicate = Action::duplicate(100.0, None, "f").unwrap();
        let mut schedule = Schedule::new(&duplicate, Rng(3)).unwrap();
        assert_eq!(schedule.release_at(5, 7, 100, false), 5, "leaves at once");
    }

    #[test]
    fn pacing_holds_the_rate_and_lets_a_burst_through() {
        let action = Action::bandwidth(256 * 1024, 0, None, "f").unwrap();
        let mut schedule = Schedule::new(&action, Rng(1)).unwrap();
        // 1 MiB in 64 KiB segments, all at once.
        let start = 5_000 * MS;
        let mut last = 0;
        for i in 0..16 {
            last = schedule.release_at(start, i, 65_536, true);
        }
        let seconds = (last - start) as f64 / 1e9;
        // The last segment leaves once all 16 have crossed the "link", less the first burst.
        let expected = (16.0 * 65_536.0 - 2621.0) / 262_144.0;
        assert!(
            (seconds - expected).abs() < 0.001,
            "{seconds} vs {expected}"
        );
        // The other direction has its own bucket.
        assert_eq!(schedule.release_at(start, 99, 1000, false), start);
        // Small packets spaced wider than the rate are never held.
        let action = Action::bandwidth(1_000_000, 0, None, "f").unwrap();
        let mut schedule = Schedule::new(&action, Rng(1)).unwrap();
        for i in 0..100 {
            let now = start + i * 10 * MS;
            assert_eq!(schedule.release_at(now, 1, 1500, false), now);
        }
    }

    #[test]
    fn flows_are_told_apart_by_addresses_and_ports() {
        let mut v4 = vec![0u8; 40];
        v4[0] = 0x45;
        v4[9] = 6;
        v4[12..20].copy_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        v4[20..24].copy_from_slice(&[0x18, 0xeb, 0xc3, 0x50]);
        let mut other = v4.clone();
        other[21] = 0xec;
        assert_ne!(flow_of(&v4), flow_of(&other));
        assert_eq!(flow_of(&v4), flow_of(&v4.clone()));
        assert_eq!(flow_of(&[]), 0);
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 17;
        assert_ne!(flow_of(&v6), 0);
    }
}
