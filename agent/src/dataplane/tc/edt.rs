//! The EDT mechanism (Earliest Departure Time): the classifier stamps each matched packet with
//! the time it may leave (`skb->tstamp` = now + a delay sample, or its paced slot under a
//! rate) and steers it into one class per interface, `<tag>:ffff`, whose fq leaf holds every
//! packet until its time. fq caps a time beyond its horizon instead of dropping the packet
//! (horizon_drop off), and faultd refuses delays that would reach the horizon, so nothing is
//! silently dropped or cut short. A rate's backlog is bounded: past `MAX_BACKLOG` the
//! classifier drops, as a full bottleneck queue would.

use std::time::Duration;

use faultd_common::{SHAPE_EDT, ShapeValue};

use super::spec::ShapeSpec;
use crate::dataplane::DataplaneError;
use crate::dataplane::rtnl::{self, Rtnl, RtnlError};

/// The fq leaf's horizon: departure times further out are capped to it.
pub const HORIZON: Duration = Duration::from_secs(60);
/// A delay sample reaches at most latency + 4 jitter (the table is clamped to ±4σ).
const JITTER_SPAN: u32 = 4;
/// Longest queueing a rate may build up before packets are dropped.
const MAX_BACKLOG: Duration = Duration::from_secs(1);
/// The class of every EDT fault on an interface.
const EDT_MINOR: u32 = 0xFFFF;
/// fq limits: generous, the classifier decides what is held.
const FQ_LIMIT: u32 = 100_000;
const FQ_FLOW_LIMIT: u32 = 100_000;

pub fn classid(tag: u16) -> u32 {
    (u32::from(tag) << 16) | EDT_MINOR
}

/// Refuses what fq cannot hold to the letter.
pub fn check(spec: &ShapeSpec) -> Result<(), DataplaneError> {
    let longest = spec.latency + spec.jitter * JITTER_SPAN;
    if longest >= HORIZON {
        return Err(DataplaneError::Unsupported {
            mechanism: "edt",
            reason: format!(
                "EDT holds packets for less than fq's horizon of {}: latency + 4 × jitter is {}; \
             use a shorter delay or the netem mechanism",
                crate::duration::format(HORIZON),
                crate::duration::format(longest)
            ),
        });
    }
    Ok(())
}

pub fn rule_value(tag: u16, slot: u32, spec: &ShapeSpec, expires_at_ns: u64) -> ShapeValue {
    ShapeValue {
        expires_at_ns,
        delay_ns: spec.latency.as_nanos() as u64,
        jitter_ns: spec.jitter.as_nanos() as u64,
        rate_bytes_per_sec: spec.rate_bytes_per_sec,
        max_backlog_ns: MAX_BACKLOG.as_nanos() as u64,
        classid: classid(tag),
        mechanism: SHAPE_EDT,
        correlation: (spec.correlation / 100.0 * f64::from(u32::MAX)).round() as u32,
        counter_slot: slot,
    }
}

/// Creates the interface's EDT class and its fq leaf.
pub fn install(rtnl: &mut Rtnl, ifindex: u32, tag: u16) -> Result<(), RtnlError> {
    let class = classid(tag);
    rtnl.replace_class(
        ifindex,
        class,
        u32::from(tag) << 16,
        rtnl::htb_class_options(u64::from(u32::MAX), 1 << 20),
    )?;
    rtnl.add_leaf_qdisc(
        ifindex,
        class,
        "fq",
        rtnl::fq_options(FQ_LIMIT, FQ_FLOW_LIMIT, HORIZON.as_micros() as u32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(latency_ms: u64, jitter_ms: u64) -> ShapeSpec {
        ShapeSpec {
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::from_millis(jitter_ms),
            correlation: 25.0,
            rate_bytes_per_sec: 0,
            burst_bytes: 0,
            tamper: Default::default(),
        }
    }

    #[test]
    fn delays_that_reach_the_horizon_are_refused() {
        assert!(check(&spec(100, 20)).is_ok());
        assert!(check(&spec(59_000, 0)).is_ok());
        let err = check(&spec(50_000, 3_000)).unwrap_err();
        assert!(err.to_string().contains("horizon"), "{err}");
    }

    #[test]
    fn values_carry_the_delay_and_the_shared_class() {
        let value = rule_value(0x7a00, 3, &spec(100, 20), 7);
        assert_eq!(value.delay_ns, 100_000_000);
        assert_eq!(value.jitter_ns, 20_000_000);
        assert_eq!(value.classid, 0x7a00_ffff);
        assert_eq!(value.mechanism, SHAPE_EDT);
        assert_eq!(
            value.correlation,
            (0.25 * f64::from(u32::MAX)).round() as u32
        );
        assert!(value.max_backlog_ns < HORIZON.as_nanos() as u64);
    }
}
