//! The kernel/user-space boundary of faultd: map names, key and value layouts, constants.
//!
//! Every type is `#[repr(C)]`, `Copy`, with explicit padding and no `bool`/`Option`, so the eBPF
//! programs and the loader agree byte for byte. User space enables the `user` feature for the
//! `aya::Pod` impls.
#![no_std]

/// Hash map `RuleKey` → `RuleValue`: which packets a fault touches.
pub const RULES_MAP: &str = "FAULTD_RULES";
/// Hash map `u64` cgroup id → `ScopeValue`: cgroups that have at least one rule.
pub const SCOPES_MAP: &str = "FAULTD_SCOPES";
/// Per-CPU array indexed by `RuleValue::counter_slot` → `Counters`.
pub const COUNTERS_MAP: &str = "FAULTD_COUNTERS";
/// Program names (the ELF symbols), as user space looks them up.
pub const PROG_EGRESS: &str = "faultd_egress";
pub const PROG_INGRESS: &str = "faultd_ingress";
/// cgroup/connect4 and cgroup/connect6 programs: refuse new TCP connections.
pub const PROG_CONNECT4: &str = "faultd_connect4";
pub const PROG_CONNECT6: &str = "faultd_connect6";

/// tc programs (ingress, egress) of `netns{path, interface}` scopes.
pub const PROG_TC_INGRESS: &str = "faultd_tc_ingress";
pub const PROG_TC_EGRESS: &str = "faultd_tc_egress";

/// Marks the scope ids of `netns{path, interface}` scopes (cgroup ids are inode numbers, far
/// below it).
pub const NETNS_SCOPE_BIT: u64 = 1 << 63;

/// The scope id of an interface in a network namespace: its index. The tc programs run only on
/// the interfaces faultd attached them to, and faultd attaches to one interface per index at a
/// time (a tc program cannot tell the namespace of a routed packet's device).
pub const fn netns_scope_id(ifindex: u32) -> u64 {
    NETNS_SCOPE_BIT | ifindex as u64
}

/// Array of `PORTS` `u32`, indexed by port: which (protocol, direction) pairs have a rule on
/// that port in any scope (`port_bit`). The programs test it first, so a packet on a port no
/// rule names costs one header load and two array reads, before any cgroup or hash lookup.
pub const PORTS_MAP: &str = "FAULTD_PORTS";
/// Entries of the ports map: every u16 port.
pub const PORTS: u32 = 65_536;

/// The bit of `(protocol, direction)` in a ports-map entry: TCP in the low byte, UDP in the
/// next, each with the direction's own bit (`DIR_EGRESS`, `DIR_INGRESS`, `DIR_CONNECT`).
pub const fn port_bit(protocol: u8, direction: u8) -> u32 {
    let shift = if protocol == PROTO_TCP { 0 } else { 8 };
    (direction as u32) << shift
}

/// Capacity of the rules map (one entry per scope × protocol × direction × port).
pub const MAX_RULES: u32 = 65_536;
/// Capacity of the scopes map.
pub const MAX_SCOPES: u32 = 16_384;
/// Number of counter slots, i.e. of faults that can be active at once.
pub const MAX_FAULTS: u32 = 16_384;
/// How deep a cgroup may be below the cgroup v2 root for its ancestors to be checked.
pub const MAX_CGROUP_DEPTH: u32 = 16;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Direction as seen from the workload.
pub const DIR_EGRESS: u8 = 1;
pub const DIR_INGRESS: u8 = 2;
/// Not a packet direction: a TCP `connect()` of the workload, keyed by the destination port.
pub const DIR_CONNECT: u8 = 4;

/// `RuleValue::action`: drop `drop_threshold / 2^32` of the matched packets.
pub const ACTION_DROP: u32 = 1;
/// `RuleValue::action` on a `DIR_CONNECT` key: the connect fails with ECONNREFUSED.
pub const ACTION_REJECT: u32 = 2;

/// `RuleValue::action` of a rules-map entry whose faults name peers: the packet's remote address,
/// looked up in the peers map under the same `RuleKey`, says which fault (if any) applies.
pub const ACTION_PEERS: u32 = 3;
/// `RuleValue::action` of a peers-map entry for an excluded prefix: no fault applies.
pub const ACTION_PASS: u32 = 0;

/// `RuleValue::action` of a `stall` fault: drop the matched TCP segments that carry data or a
/// FIN; pure ACKs, SYNs and RSTs pass, so the connection stays up while no data flows.
pub const ACTION_STALL: u32 = 20;

/// LPM trie `PeerKey` → `RuleValue`: the peers (CIDRs) of faults that name them.
pub const PEERS_MAP: &str = "FAULTD_PEERS";
/// Capacity of the peers map (prefixes × kernel keys of the faults with peers).
pub const MAX_PEERS: u32 = 65_536;
/// `PeerKey::family`.
pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;
/// Bits of a `PeerKey` before the address, always matched in full (rule key and family).
pub const PEER_KEY_FIXED_BITS: u32 = 160;

/// The errno a refused connect reports, as a real closed port does.
pub const ECONNREFUSED: i32 = 111;

/// A drop threshold meaning "every packet": compared as `prandom_u32 < threshold` in u64.
pub const DROP_ALL: u64 = 1 << 32;

/// Which packets: a scope (cgroup v2 id; the root cgroup's id for the host scope), an L4
/// protocol, a direction and one port of either end of the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleKey {
    pub scope_id: u64,
    pub port: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: u32,
}

impl RuleKey {
    pub const fn new(scope_id: u64, protocol: u8, direction: u8, port: u16) -> Self {
        Self {
            scope_id,
            port,
            protocol,
            direction,
            _pad: 0,
        }
    }
}

/// What to do with them, and until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) deadline: from then on the program ignores the rule.
    pub expires_at_ns: u64,
    /// Drop the packet when `bpf_get_prandom_u32() < drop_threshold` (u64 compare).
    pub drop_threshold: u64,
    /// Index into the counters map.
    pub counter_slot: u32,
    pub action: u32,
}

/// The data of a peers-map key: the rule it belongs to, the address family, and the remote
/// address in network byte order (IPv4 in the first 4 bytes). The prefix length counts
/// `PEER_KEY_FIXED_BITS` plus the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub rule: RuleKey,
    pub family: u32,
    pub addr: [u8; 16],
    pub _pad: u32,
}

/// Marks a cgroup that has rules; the programs only test for presence. User space counts the
/// rules of each scope itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScopeValue {
    pub _reserved: u64,
}

/// Per-fault packet counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub matched: u64,
    pub dropped: u64,
    /// Connects refused.
    pub refused: u64,
    /// Packets held back by a delay or bandwidth fault.
    pub delayed: u64,
    /// Requests (Redis commands, PostgreSQL statements) that matched a request match.
    pub requests_matched: u64,
    /// Matched requests the fault acted on (dropped, or their connection reset).
    pub requests_affected: u64,
    /// Packets a duplicate fault sent twice, a corrupt fault damaged, a reorder fault held
    /// back behind later ones (NFQUEUE counts these in user space).
    pub duplicated: u64,
    pub corrupted: u64,
    pub reordered: u64,
    /// TCP segments a slice fault cut into pieces.
    pub sliced: u64,
}

/// Shaping (delay, bandwidth) at the tc egress hook: hash map `RuleKey` → `ShapeValue`.
pub const SHAPES_MAP: &str = "FAULTD_SHAPES";
/// Hash map `u64` cgroup id → `ScopeValue`: cgroups that have at least one shaping rule.
pub const SHAPE_SCOPES_MAP: &str = "FAULTD_SHAPE_SCOPES";
/// Per-CPU array indexed by `ShapeValue::counter_slot` → `Counters` (matched, delayed, and
/// dropped by a full EDT rate backlog).
pub const SHAPE_COUNTERS_MAP: &str = "FAULTD_SHAPE_COUNTERS";
/// Array indexed by `ShapeValue::counter_slot` → `ShapeState` (EDT pacing and jitter state).
pub const SHAPE_STATE_MAP: &str = "FAULTD_SHAPE_STATE";
/// Array of `DIST_SIZE` `i32`: the inverse CDF of the standard normal distribution scaled by
/// `DIST_SCALE` (the table netem takes as TCA_NETEM_DELAY_DIST), for EDT jitter.
pub const SHAPE_DIST_MAP: &str = "FAULTD_SHAPE_DIST";
/// Array of one `u64`: CLOCK_MONOTONIC time until which the agent is known to be alive. The
/// classifier shapes nothing after it, so a killed agent's netlink-attached classifier (kernels
/// without TCX keep it) stops within a second.
pub const SHAPE_ALIVE_MAP: &str = "FAULTD_SHAPE_ALIVE";
/// LPM trie `PeerKey` → `ShapeValue`: the peers of shaping faults that name them, under the
/// `RuleKey` whose `FAULTD_SHAPES` entry is a `SHAPE_PEERS` marker. An excluded prefix holds a
/// value whose mechanism is `SHAPE_PASS`.
pub const SHAPE_PEERS_MAP: &str = "FAULTD_SHAPE_PEERS";
/// The tc egress classifier.
pub const PROG_SHAPE: &str = "faultd_shape";

/// `ShapeValue::mechanism`: steer the packet into the htb class `classid` (netem/htb leaf).
pub const SHAPE_CLASS: u32 = 1;
/// `ShapeValue::mechanism`: delay/pace by setting `skb->tstamp` (Earliest Departure Time), which
/// the fq qdisc enforces.
pub const SHAPE_EDT: u32 = 2;
/// `ShapeValue::mechanism` of a `FAULTD_SHAPES` entry whose faults name peers: the packet's
/// remote address, looked up in `FAULTD_SHAPE_PEERS` under the same key, says which fault (if
/// any) shapes it.
pub const SHAPE_PEERS: u32 = 3;
/// `ShapeValue::mechanism` of a peers entry for an excluded prefix: nothing shapes the packet.
pub const SHAPE_PASS: u32 = 0;

/// Entries of the distribution table and its scale (netem's NETEM_DIST_SCALE).
pub const DIST_SIZE: u32 = 4096;
pub const DIST_SCALE: i64 = 8192;

/// How a fault shapes the packets it matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShapeValue {
    /// CLOCK_MONOTONIC deadline, as `RuleValue::expires_at_ns`.
    pub expires_at_ns: u64,
    /// EDT: added delay and its spread (standard deviation of a normal distribution).
    pub delay_ns: u64,
    pub jitter_ns: u64,
    /// EDT: bytes per second the matched traffic may leave at (0: unlimited).
    pub rate_bytes_per_sec: u64,
    /// EDT: longest queueing a packet may accumulate from the rate before it is dropped, as a
    /// full bottleneck queue would (kept below fq's horizon).
    pub max_backlog_ns: u64,
    /// The htb class (`major << 16 | minor`) written to `skb->priority`: the fault's own
    /// (SHAPE_CLASS) or the interface's fq class (SHAPE_EDT).
    pub classid: u32,
    pub mechanism: u32,
    /// Correlation of successive jitter samples, scaled to 0..=u32::MAX.
    pub correlation: u32,
    pub counter_slot: u32,
}

/// EDT state of one fault, shared by all CPUs (updates race benignly: a lost update shifts one
/// departure time by one packet's worth).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShapeState {
    /// Departure time of the last paced packet.
    pub last_departure_ns: u64,
    /// Last uniform random value, for correlated jitter.
    pub last_random: u64,
}

/// `RuleValue::action` codes 10-19: a fault with a request match (`FAULTD_REQ_*` maps, keyed
/// by the rule's counter slot, say which requests). Only TCP egress keys carry them.
/// The matched request's segment is dropped (its retransmissions match again).
pub const ACTION_REQ_DROP: u32 = 10;
/// The matched request's segment is dropped and user space destroys its socket (an event in
/// `FAULTD_REQ_EVENTS`).
pub const ACTION_REQ_RESET: u32 = 11;
/// The matched request passes and arms its socket (`FAULTD_REQ_ARMED`); on the ingress key of
/// the same port, the reply segments of an armed socket are dropped and user space destroys it.
pub const ACTION_REQ_LOSE_REPLY: u32 = 12;
/// Whether a rules-map action is a request match.
pub const fn is_request_action(action: u32) -> bool {
    action >= 10 && action < 20
}

/// Hash map `u32` counter slot → `RequestSpec`: the protocol (and key prefix) of a fault with a
/// request match.
pub const REQ_SPECS_MAP: &str = "FAULTD_REQ_SPECS";
/// Hash map `RequestName` → `u32`: the command names (Redis) or first keywords (PostgreSQL) a
/// fault matches, upper case.
pub const REQ_NAMES_MAP: &str = "FAULTD_REQ_NAMES";
/// Per-CPU array of one `RequestBuf`: where the programs copy a segment's first bytes.
pub const REQ_BUF_MAP: &str = "FAULTD_REQ_BUF";
/// Ring buffer of `RequestEvent`: sockets user space must destroy now (reset).
pub const REQ_EVENTS_MAP: &str = "FAULTD_REQ_EVENTS";
/// LRU hash map `u64` socket cookie → `RequestArm`: connections whose reply lose_reply loses.
pub const REQ_ARMED_MAP: &str = "FAULTD_REQ_ARMED";
pub const MAX_REQ_ARMED: u32 = 16_384;

/// An armed connection: the fault (counter slot) whose matched request it sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RequestArm {
    pub slot: u32,
    /// 1 once a reply segment was dropped (the request is counted as affected once).
    pub fired: u32,
}

/// Capacity of the specs map (one per fault) and of the names map.
pub const MAX_REQ_SPECS: u32 = MAX_FAULTS;
pub const MAX_REQ_NAMES: u32 = 65_536;
/// Longest command name or keyword, and key prefix, the programs compare.
pub const REQ_NAME_LEN: usize = 16;
pub const REQ_PREFIX_LEN: usize = 32;
/// Bytes of a segment's payload the programs look at (a power of two: indexes are masked).
pub const REQ_BUF_LEN: usize = 128;
/// `RequestSpec::protocol`.
pub const REQ_REDIS: u32 = 1;
pub const REQ_POSTGRES: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RequestSpec {
    pub protocol: u32,
    /// Bytes of `key_prefix` in use (Redis; 0: any key).
    pub key_prefix_len: u32,
    pub key_prefix: [u8; REQ_PREFIX_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RequestName {
    pub slot: u32,
    pub _pad: u32,
    /// Upper case, zero-filled.
    pub name: [u8; REQ_NAME_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RequestBuf {
    /// Where the parser keeps the payload length and the positions it found, reading them
    /// back at each use: the verifier then knows only their bounds, not which parse path
    /// produced them, and checks what follows once instead of once per path.
    pub scratch: [u64; 4],
    pub bytes: [u8; REQ_BUF_LEN],
}

/// A socket whose matched request the program dropped: user space destroys it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RequestEvent {
    /// The socket's cookie (`bpf_get_socket_cookie`, as sock_diag reports it).
    pub cookie: u64,
    pub slot: u32,
    pub action: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, #[repr(C)], every bit pattern valid, explicit padding.
    unsafe impl aya::Pod for super::RequestSpec {}
    unsafe impl aya::Pod for super::RequestName {}
    unsafe impl aya::Pod for super::RequestBuf {}
    unsafe impl aya::Pod for super::RequestEvent {}
    unsafe impl aya::Pod for super::RequestArm {}
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::ScopeValue {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::ShapeValue {}
    unsafe impl aya::Pod for super::ShapeState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleKey>(), 16);
        assert_eq!(size_of::<RuleValue>(), 24);
        assert_eq!(size_of::<PeerKey>(), 40);
        assert_eq!(size_of::<ScopeValue>(), 8);
        assert_eq!(size_of::<Counters>(), 80);
        assert_eq!(size_of::<RequestSpec>(), 40);
        assert_eq!(size_of::<RequestName>(), 24);
        assert_eq!(size_of::<RequestEvent>(), 16);
        assert_eq!(size_of::<ShapeValue>(), 56);
        assert_eq!(size_of::<ShapeState>(), 16);
    }

    fn bytes<T>(value: &T) -> &[u8] {
        // SAFETY: the types are #[repr(C)] plain data without implicit padding (checked above).
        unsafe { core::slice::from_raw_parts((value as *const T).cast(), size_of::<T>()) }
    }

    #[test]
    fn keys_and_values_encode_as_the_kernel_reads_them() {
        let key = RuleKey::new(0x0102_0304_0506_0708, PROTO_TCP, DIR_INGRESS, 6379);
        let mut expected = [0u8; 16];
        expected[..8].copy_from_slice(&0x0102_0304_0506_0708u64.to_ne_bytes());
        expected[8..10].copy_from_slice(&6379u16.to_ne_bytes());
        expected[10] = PROTO_TCP;
        expected[11] = DIR_INGRESS;
        assert_eq!(bytes(&key), expected);

        let value = RuleValue {
            expires_at_ns: 7,
            drop_threshold: DROP_ALL,
            counter_slot: 3,
            action: ACTION_DROP,
        };
        let raw = bytes(&value);
        assert_eq!(&raw[..8], 7u64.to_ne_bytes());
        assert_eq!(&raw[8..16], DROP_ALL.to_ne_bytes());
        assert_eq!(&raw[16..20], 3u32.to_ne_bytes());
        assert_eq!(&raw[20..24], ACTION_DROP.to_ne_bytes());
    }
}
