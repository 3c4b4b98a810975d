//! The netem mechanism: each delay or bandwidth fault gets an htb class `<tag>:<slot + 1>` under
//! faultd's htb root on every shaped interface, and the classifier steers the fault's packets
//! into it (`skb->priority`). A delay fault's class has a netem leaf (latency, jitter as the
//! standard deviation of a normal distribution, correlation); a bandwidth fault's class itself
//! is rate-limited (htb rate = ceil) with its default fifo leaf. Only steered packets enter
//! the class, so other traffic keeps its timing, handshakes of unmatched flows included.
//!
//! Duplicate, corrupt and reorder faults get a netem leaf too, with netem's own tampering:
//! - duplicate: netem hands a clone of the chosen packets back to the root qdisc, where the
//!   clone's `skb->priority` brings it to the same class (the classifier does not run again,
//!   and netem does not duplicate the clone);
//! - corrupt: netem completes a pending checksum, then flips one bit at a random offset of the
//!   packet's linear part (headers included), so the receiver drops it as damaged on the wire;
//! - reorder: netem sends its `reorder` share at once and delays the rest by its latency. The
//!   fault's `percent` is the share held back, so netem gets `100 - percent` and the gap as
//!   latency: the same packets are late as on the NFQUEUE fallback.

use faultd_common::{SHAPE_CLASS, ShapeValue};

use super::spec::{ShapeSpec, Tamper};
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
    if has_leaf(spec) {
        let mut options = rtnl::netem_options(
            spec.latency.as_nanos() as u64,
            spec.jitter.as_nanos() as u64,
            probability(spec.correlation),
            NETEM_LIMIT,
            table,
        );
        add_tampering(&mut options, &spec.tamper);
        rtnl.add_leaf_qdisc(ifindex, class, "netem", options)?;
    }
    Ok(())
}

/// Whether `spec` gets a netem leaf (a bandwidth fault's class has a fifo).
fn has_leaf(spec: &ShapeSpec) -> bool {
    !spec.latency.is_zero() || !spec.jitter.is_zero() || !spec.tamper.is_none()
}

/// Why the kernel refused `spec`'s netem leaf with EINVAL, when the leaf and `others` (the
/// other netem faults on the interface) mix a duplicating netem with another netem: some
/// kernels (the 5.10 and 6.1 stable series of the kernel matrix; not its 6.12) refuse that mix
/// in one qdisc tree, since a duplicate re-enqueued at the root could pass through another
/// netem again. None when the error has another cause.
pub fn mix_refused<'a>(
    error: &RtnlError,
    spec: &ShapeSpec,
    others: impl IntoIterator<Item = &'a ShapeSpec>,
) -> Option<String> {
    if error.errno() != Some(libc::EINVAL) || !has_leaf(spec) {
        return None;
    }
    let others: Vec<&ShapeSpec> = others.into_iter().filter(|o| has_leaf(o)).collect();
    if spec.tamper.duplicate > 0.0 && !others.is_empty() {
        return Some(
            "this kernel refuses a duplicating netem beside another fault's netem on the same \
             interface: use mechanism nfqueue for the duplicate (the default) or remove the \
             other netem fault"
                .to_string(),
        );
    }
    if others.iter().any(|o| o.tamper.duplicate > 0.0) {
        return Some(
            "this kernel refuses another netem beside a duplicate fault forced onto netem on \
             the same interface: remove that duplicate fault or use another mechanism"
                .to_string(),
        );
    }
    None
}

/// A percentage as netem's probabilities are: a share of u32::MAX.
fn probability(percent: f64) -> u32 {
    (percent.clamp(0.0, 100.0) / 100.0 * f64::from(u32::MAX)).round() as u32
}

/// Sets `tamper` in netem options made by `rtnl::netem_options`: `duplicate` and `gap` in the
/// leading `tc_netem_qopt`, then TCA_NETEM_REORDER and TCA_NETEM_CORRUPT (netem reads them
/// after the struct, so the reorder probability overrides the 100 % a non-zero gap implies).
fn add_tampering(options: &mut Vec<u8>, tamper: &Tamper) {
    const GAP_OFFSET: usize = 12;
    const DUPLICATE_OFFSET: usize = 16;
    const TCA_NETEM_REORDER: u16 = 3;
    const TCA_NETEM_CORRUPT: u16 = 4;
    let mut set = |offset: usize, value: u32| {
        options[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    };
    set(DUPLICATE_OFFSET, probability(tamper.duplicate));
    if let Some(held_back) = tamper.reorder {
        // Gap 1: every packet may be the one sent at once (netem reorders nothing at gap 0).
        set(GAP_OFFSET, 1);
        // struct tc_netem_reorder { probability, correlation }: the share sent at once.
        let at_once = probability(100.0 - held_back);
        rtnl::push_attribute(options, TCA_NETEM_REORDER, &[at_once, 0]);
    }
    if tamper.corrupt > 0.0 {
        // struct tc_netem_corrupt { probability, correlation }
        rtnl::push_attribute(
            options,
            TCA_NETEM_CORRUPT,
            &[probability(tamper.corrupt), 0],
        );
    }
}

/// Deletes the fault's class (its leaf goes with it).
pub fn remove(rtnl: &mut Rtnl, ifindex: u32, tag: u16, slot: u32) -> Result<(), RtnlError> {
    rtnl.delete_class(ifindex, classid(tag, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(latency_ms: u64, duplicate: f64, rate_bytes_per_sec: u64) -> ShapeSpec {
        ShapeSpec {
            latency: std::time::Duration::from_millis(latency_ms),
            jitter: std::time::Duration::ZERO,
            correlation: 0.0,
            rate_bytes_per_sec,
            burst_bytes: 0,
            tamper: Tamper {
                duplicate,
                ..Default::default()
            },
        }
    }

    #[test]
    fn einval_beside_a_duplicating_netem_is_the_mix_the_kernel_refuses() {
        let kernel = |errno| RtnlError::Kernel {
            what: "adding a netem qdisc".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let (einval, duplicate, delay) =
            (kernel(libc::EINVAL), spec(0, 100.0, 0), spec(10, 0.0, 0));
        let bandwidth = spec(0, 0.0, 1000);
        let new_duplicate = mix_refused(&einval, &duplicate, [&delay]).unwrap();
        assert!(
            new_duplicate.contains("duplicating netem beside"),
            "{new_duplicate}"
        );
        let new_delay = mix_refused(&einval, &delay, [&bandwidth, &duplicate]).unwrap();
        assert!(
            new_delay.contains("beside a duplicate fault"),
            "{new_delay}"
        );
        // No other netem leaf (a bandwidth class has a fifo), another errno, no duplicate.
        assert_eq!(mix_refused(&einval, &duplicate, [&bandwidth]), None);
        assert_eq!(
            mix_refused(&kernel(libc::ENOMEM), &duplicate, [&delay]),
            None
        );
        assert_eq!(mix_refused(&einval, &delay, [&delay]), None);
    }

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

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_ne_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    /// (type, payload as u32s) of each attribute after the leading struct.
    fn attributes(bytes: &[u8]) -> Vec<(u16, Vec<u32>)> {
        let mut out = Vec::new();
        let mut at = 24;
        while at < bytes.len() {
            let len = usize::from(u16::from_ne_bytes([bytes[at], bytes[at + 1]]));
            let kind = u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]);
            let payload = (at + 4..at + len)
                .step_by(4)
                .map(|o| u32_at(bytes, o))
                .collect();
            out.push((kind, payload));
            at += len.div_ceil(4) * 4;
        }
        out
    }

    #[test]
    fn duplicate_and_corrupt_are_netem_probabilities() {
        let mut options = rtnl::netem_options(0, 0, 0, NETEM_LIMIT, &[]);
        let tamper = Tamper {
            duplicate: 100.0,
            corrupt: 25.0,
            reorder: None,
        };
        add_tampering(&mut options, &tamper);
        assert_eq!(u32_at(&options, 16), u32::MAX);
        assert_eq!(u32_at(&options, 12), 0, "no gap: nothing reordered");
        let corrupt = attributes(&options)
            .into_iter()
            .find(|(kind, _)| *kind == 4)
            .unwrap();
        assert_eq!(corrupt.1, vec![u32::MAX / 4 + 1, 0]);
        assert!(attributes(&options).iter().all(|(kind, _)| *kind != 3));
    }

    #[test]
    fn reorder_sends_the_share_not_held_back_at_once() {
        let mut options = rtnl::netem_options(10_000_000, 0, 0, NETEM_LIMIT, &[]);
        let tamper = Tamper {
            reorder: Some(25.0),
            ..Tamper::default()
        };
        add_tampering(&mut options, &tamper);
        assert_eq!(
            u32_at(&options, 0),
            (10_000_000 / 64) as u32,
            "gap as latency"
        );
        assert_eq!(u32_at(&options, 12), 1);
        assert_eq!(u32_at(&options, 16), 0, "nothing duplicated");
        let reorder = attributes(&options)
            .into_iter()
            .find(|(kind, _)| *kind == 3)
            .unwrap();
        assert_eq!(reorder.1, vec![probability(75.0), 0]);
        assert!(attributes(&options).iter().all(|(kind, _)| *kind != 4));
    }
}
