//! The netem mechanism: each delay or bandwidth fault gets an htb class `<tag>:<slot + 1>` under
//! faultd's htb root on every shaped interface, and the classifier steers the fault's packets
//! into it (`skb->priority`). A delay fault's class has a netem leaf (latency, jitter as the
//! standard deviation of a normal distribution, correlation); a bandwidth fault's class itself
//! is rate-limited (htb rate = ceil) with its default fifo leaf. Only steered packets enter
//! the class, so other traffic keeps its timing, handshakes of unmatched flows included.

use faultd_common::{SHAPE_CLASS, ShapeValue};

use super::spec::ShapeSpec;
use crate::dataplane::rtnl::{self, Rtnl, RtnlError};

/// Packets a netem leaf holds (netem's default, 1000, overflows at 10 k packets/s × 100 ms).
const NETEM_LIMIT: u32 = 100_000;
/// Rate of a class that only delays: htb's largest 32-bit rate (≈ 34 Gbit/s), never the limit.
const UNLIMITED: u64 = u32::MAX as u64;
/// Burst of such a class.
const UNLIMITED_BURST: u32 = 1 << 20;

/// The class of the fault in `slot`.
pub fn classid(tag: u16, slot: u32) -> u32 {
    (u32::from(tag) << 16) | (slot + 1)
}

pub fn rule_value(tag: u16, slot: u32, expires_at_ns: u64) -> ShapeValue {
    ShapeValue {
        expires_at_ns,
        classid: classid(tag, slot),
        mechanism: SHAPE_CLASS,
        counter_slot: slot,
        ..Default::default()
    }
}

/// Creates the fault's class (and netem leaf) on one interface.
pub fn install(
    rtnl: &mut Rtnl,
    ifindex: u32,
    tag: u16,
    slot: u32,
    spec: &ShapeSpec,
    table: &[i16],
) -> Result<(), RtnlError> {
    let class = classid(tag, slot);
    let root = u32::from(tag) << 16;
    let (rate, burst) = if spec.rate_bytes_per_sec > 0 {
        (spec.rate_bytes_per_sec, spec.burst_bytes.max(1514))
    } else {
        (UNLIMITED, UNLIMITED_BURST)
    };
    rtnl.replace_class(ifindex, class, root, rtnl::htb_class_options(rate, burst))?;
    if !spec.latency.is_zero() || !spec.jitter.is_zero() {
        let correlation = (spec.correlation / 100.0 * f64::from(u32::MAX)).round() as u32;
        rtnl.add_leaf_qdisc(
            ifindex,
            class,
            "netem",
            rtnl::netem_options(
                spec.latency.as_nanos() as u64,
                spec.jitter.as_nanos() as u64,
                correlation,
                NETEM_LIMIT,
                table,
            ),
        )?;
    }
    Ok(())
}

/// Deletes the fault's class (its leaf goes with it).
pub fn remove(rtnl: &mut Rtnl, ifindex: u32, tag: u16, slot: u32) -> Result<(), RtnlError> {
    rtnl.delete_class(ifindex, classid(tag, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_has_its_own_class_under_the_tag() {
        assert_eq!(classid(0x7a01, 0), 0x7a01_0001);
        assert_eq!(classid(0x7a01, 16_383), 0x7a01_4000);
        let value = rule_value(0x7a01, 4, 99);
        assert_eq!(value.classid, 0x7a01_0005);
        assert_eq!(value.mechanism, SHAPE_CLASS);
        assert_eq!(value.counter_slot, 4);
        assert_eq!(value.expires_at_ns, 99);
    }
}
