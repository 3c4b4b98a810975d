//! The conntrack mark layout of ingress faults on a cgroup: how a fault's rules write it, and
//! how a listing's marks are read back (to find the ids in use).

/// Conntrack mark layout: a fault's id (1 to 127) in bits 24–30, and whether a workload socket
/// sent in the connection's original or reply direction.
const MARK_ID_SHIFT: u32 = 24;
const MARK_ID_MASK: u32 = 0x7f00_0000;
const MARK_ORIGINAL: u32 = 0x0080_0000;
const MARK_REPLY: u32 = 0x0040_0000;
pub const MAX_MARK_ID: u8 = 127;

/// The conntrack directions a workload socket sends in, with the bit that records each.
pub(super) const SENT: [(&str, u32); 2] = [("ORIGINAL", MARK_ORIGINAL), ("REPLY", MARK_REPLY)];
/// The directions packets arriving at the workload take: against the one it sent in.
pub(super) const AGAINST: [(&str, u32); 2] = [("REPLY", MARK_ORIGINAL), ("ORIGINAL", MARK_REPLY)];

/// The `value/mask` of fault `id` on `side`, as `--set-xmark` and `--mark` take it.
pub(super) fn mark(id: u8, side: u32) -> String {
    let id = u32::from(id) << MARK_ID_SHIFT;
    format!("{:#x}/{:#x}", id | side, MARK_ID_MASK | side)
}

/// The fault id in a mark `value[/mask]` as iptables -S prints it, if there is one.
pub(super) fn id_of(value: &str) -> Option<u8> {
    let value = value.split('/').next()?;
    let mark = u32::from_str_radix(value.trim_start_matches("0x"), 16).ok()?;
    let id = ((mark & MARK_ID_MASK) >> MARK_ID_SHIFT) as u8;
    (id != 0).then_some(id)
}
