//! faultd's cgroup_skb programs: one for egress, one for ingress, attached only at the cgroups
//! that have faults (the cgroup v2 root only for the host scope), so traffic no fault targets
//! never runs them. For an IPv4/IPv6 TCP/UDP packet they first test its ports against the
//! ports any rule names (an array read); only then do they walk the socket's cgroup and its
//! ancestors, and for the cgroups that have rules look up (scope, protocol, direction, port)
//! in a hash map.
//! An entry past its deadline is ignored, so a fault ends on time even if faultd is gone.
//! Fail open: anything unexpected passes the packet.
//!
//! Two cgroup/connect programs (IPv4, IPv6) refuse new TCP connections of a scope to the ports
//! of a `reject` or `reset` fault with ECONNREFUSED, as a port nobody listens on does.
//!
//! A rule whose faults name peers (CIDRs) is a marker (`ACTION_PEERS`) in the rules map: the
//! packet's remote address, looked up with the rule's key in an LPM trie, then says which fault
//! applies, if any. Rules without peers never touch the trie.
//!
//! Two tc programs (ingress, egress) serve `netns{path, interface}` scopes: attached to one
//! interface inside a network namespace, they apply the drop rules of that interface's scope
//! id (its index) to whatever crosses it, routed traffic included.
//!
//! A rule whose action is a request code (`ACTION_REQ_*`) acts only on segments that start with
//! a request it names (`request`); only such rules read payload.
//!
//! A `stall` rule drops only the TCP segments that carry data or a FIN, so its connections stay
//! established (ACKs and keepalives pass) while no data flows in the matched direction.
//!
//! The tc classifier for delay and bandwidth faults lives in `shape`.
#![no_std]
#![no_main]

mod ancestry;
mod request;
mod shape;

use ancestry::Step;

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_prandom_u32,
        bpf_ktime_get_ns, bpf_set_retval, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map},
    maps::{
        Array, HashMap, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SkBuffContext, SockAddrContext, TcContext, sk_buff::SkBuff},
};
use faultd_common::{
    ACTION_DROP, ACTION_PASS, ACTION_PEERS, ACTION_REJECT, ACTION_REQ_LOSE_REPLY, ACTION_STALL,
    Counters, DIR_CONNECT, DIR_EGRESS, DIR_INGRESS, ECONNREFUSED, FAMILY_V4, FAMILY_V6, MAX_FAULTS,
    MAX_PEERS, MAX_RULES, MAX_SCOPES, PEER_KEY_FIXED_BITS, PORTS, PROTO_TCP, PROTO_UDP, PeerKey,
    RuleKey, RuleValue, ScopeValue, is_request_action, netns_scope_id, port_bit,
};

#[map]
static FAULTD_RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(MAX_RULES, 0);
#[map]
static FAULTD_SCOPES: HashMap<u64, ScopeValue> = HashMap::with_max_entries(MAX_SCOPES, 0);
/// LPM tries need BPF_F_NO_PREALLOC.
const BPF_F_NO_PREALLOC: u32 = 1;
#[map]
static FAULTD_PEERS: LpmTrie<PeerKey, RuleValue> =
    LpmTrie::with_max_entries(MAX_PEERS, BPF_F_NO_PREALLOC);
#[map]
static FAULTD_PORTS: Array<u32> = Array::with_max_entries(PORTS, 0);
#[map]
static FAULTD_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_FAULTS, 0);

/// cgroup_skb verdicts.
const PASS: i32 = 1;
/// Egress drop with congestion notification: the stack treats it like a full queue, so a UDP
/// sender sees no error (as on a lossy network) and TCP retransmits.
const DROP_EGRESS: i32 = 2;
const DROP_INGRESS: i32 = 0;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;

#[cgroup_skb(egress)]
pub fn faultd_egress(ctx: SkBuffContext) -> i32 {
    match should_drop(&ctx, DIR_EGRESS) {
        Some(true) => DROP_EGRESS,
        _ => PASS,
    }
}

#[cgroup_skb(ingress)]
pub fn faultd_ingress(ctx: SkBuffContext) -> i32 {
    match should_drop(&ctx, DIR_INGRESS) {
        Some(true) => DROP_INGRESS,
        _ => PASS,
    }
}

/// What the programs need of a packet, seen from the workload.
struct Packet {
    protocol: u8,
    local: u16,
    remote: u16,
    family: u32,
    /// Offset of the remote address in the packet (read only for rules with peers).
    remote_addr: usize,
    /// Offset of the TCP/UDP header (read only for stall rules).
    l4: usize,
}

/// `base`: where the IP header starts (0 in cgroup_skb programs, after the Ethernet header in tc).
/// The headers are read in place when the packet's linear data holds them (the common case,
/// and the miss path's cost: no helper call), else copied out with `bpf_skb_load_bytes`.
#[inline(always)]
fn parse(ctx: &SkBuff, base: usize, direction: u8) -> Option<Packet> {
    // `protocol` holds the EtherType in network byte order.
    let ethertype = u16::from_be(unsafe { (*ctx.skb).protocol } as u16) as u32;
    let egress = direction == DIR_EGRESS;
    let (protocol, ports, family, remote_addr, l4) = match ethertype {
        ETH_P_IP => {
            let (vihl, frag, protocol, ports, header) = match in_place::<IPV4_READ>(ctx, base) {
                Some(h) => {
                    // SAFETY: `in_place` checked that IPV4_READ bytes from `h` are packet data.
                    let at = |i: usize| unsafe { *((h + i) as *const u8) };
                    let header = ((at(0) & 0x0f) as usize) * 4;
                    let ports = if header == 20 {
                        [at(20), at(21), at(22), at(23)]
                    } else {
                        ctx.load(base + header).ok()?
                    };
                    (at(0), [at(6), at(7)], at(9), ports, header)
                }
                None => {
                    let h: [u8; IPV4_READ] = ctx.load(base).ok()?;
                    let header = ((h[0] & 0x0f) as usize) * 4;
                    let ports = if header == 20 {
                        [h[20], h[21], h[22], h[23]]
                    } else {
                        ctx.load(base + header).ok()?
                    };
                    (h[0], [h[6], h[7]], h[9], ports, header)
                }
            };
            if vihl >> 4 != 4 {
                return None;
            }
            if u16::from_be_bytes(frag) & 0x1fff != 0 {
                return None; // a non-first fragment has no ports
            }
            let remote_addr = base + if egress { 16 } else { 12 };
            (protocol, ports, FAMILY_V4, remote_addr, base + header)
        }
        ETH_P_IPV6 => {
            let (next, ports) = match in_place::<IPV6_READ>(ctx, base) {
                Some(h) => {
                    // SAFETY: `in_place` checked that IPV6_READ bytes from `h` are packet data.
                    let at = |i: usize| unsafe { *((h + i) as *const u8) };
                    (at(6), [at(40), at(41), at(42), at(43)])
                }
                None => {
                    let h: [u8; IPV6_READ] = ctx.load(base).ok()?;
                    (h[6], [h[40], h[41], h[42], h[43]])
                }
            };
            let remote_addr = base + if egress { 24 } else { 8 };
            (next, ports, FAMILY_V6, remote_addr, base + 40)
        }
        _ => return None,
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let (local, remote) = if egress {
        (sport, dport)
    } else {
        (dport, sport)
    };
    Some(Packet {
        protocol,
        local,
        remote,
        family,
        remote_addr,
        l4,
    })
}

/// An IPv4 header without options and the ports behind it; an IPv6 header and the ports.
const IPV4_READ: usize = 24;
const IPV6_READ: usize = 44;

/// The address of `N` bytes at `offset` in the packet's linear data, if it holds them.
#[inline(always)]
fn in_place<const N: usize>(ctx: &SkBuff, offset: usize) -> Option<usize> {
    let start = unsafe { (*ctx.skb).data } as usize + offset;
    let end = unsafe { (*ctx.skb).data_end } as usize;
    if start + N > end {
        return None;
    }
    Some(start)
}

/// Whether any rule, in any scope, names a port of the packet for its protocol and direction:
/// the cheapest test that can say "not mine" (two array reads, which the verifier inlines).
#[inline(always)]
fn port_named(protocol: u8, direction: u8, local: u16, remote: u16) -> bool {
    let bits = |port: u16| FAULTD_PORTS.get(port as u32).map_or(0, |bits| *bits);
    (bits(remote) | bits(local)) & port_bit(protocol, direction) != 0
}

/// The fault a peers marker stands for, for this remote address: None when no fault's peers
/// cover it (or an exclusion does).
#[inline(always)]
fn peer_rule(rule: RuleKey, family: u32, addr: [u8; 16]) -> Option<&'static RuleValue> {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        PEER_KEY_FIXED_BITS + bits,
        PeerKey {
            rule,
            family,
            addr,
            _pad: 0,
        },
    );
    let value = FAULTD_PEERS.get(&key)?;
    if value.action == ACTION_PASS {
        return None;
    }
    Some(value)
}

/// The remote address of the packet, IPv4 in the first 4 bytes.
#[inline(always)]
fn remote_addr(ctx: &SkBuff, packet: &Packet) -> Option<[u8; 16]> {
    let mut addr = [0u8; 16];
    if packet.family == FAMILY_V4 {
        let v4: [u8; 4] = ctx.load(packet.remote_addr).ok()?;
        addr[..4].copy_from_slice(&v4);
    } else {
        addr = ctx.load(packet.remote_addr).ok()?;
    }
    Some(addr)
}

#[inline(always)]
fn should_drop(ctx: &SkBuffContext, direction: u8) -> Option<bool> {
    let packet = parse(&ctx.skb, 0, direction)?;
    if !port_named(packet.protocol, direction, packet.local, packet.remote) {
        return None;
    }
    let skb = ctx.skb.skb;
    let verdict = ancestry::walk(
        unsafe { bpf_skb_cgroup_id(skb) },
        |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) },
        |scope| unsafe { FAULTD_SCOPES.get(&scope) }.is_some(),
        |scope| match scope_drops(&ctx.skb, scope, direction, &packet) {
            Some(Verdict::Drop(false)) => Step::Next,
            Some(verdict) => Step::Found(verdict),
            None => Step::Stop,
        },
    )?;
    Some(decide(&ctx.skb, 0, &packet, verdict))
}

/// What a scope's rules say about a packet.
enum Verdict {
    Drop(bool),
    /// A rule with a request match: the payload decides (read outside the cgroup walk, so the
    /// verifier sees the parser once).
    Request(&'static RuleValue),
    /// A reply to the workload on a lose_reply rule's port: its socket decides.
    Reply(&'static RuleValue),
}

#[inline(always)]
fn decide(ctx: &SkBuff, base: usize, packet: &Packet, verdict: Verdict) -> bool {
    match verdict {
        Verdict::Drop(drop) => drop,
        Verdict::Request(rule) => request::decide(
            ctx,
            base,
            packet.family,
            rule,
            FAULTD_COUNTERS.get_ptr_mut(rule.counter_slot),
        ),
        Verdict::Reply(rule) => request::reply(
            ctx,
            base,
            packet.family,
            rule,
            FAULTD_COUNTERS.get_ptr_mut(rule.counter_slot),
        ),
    }
}

/// Looks the packet up among the rules of one scope: counts it against the rule it matches and
/// says whether to drop it, or that its payload decides.
#[inline(always)]
fn scope_drops(ctx: &SkBuff, scope: u64, direction: u8, packet: &Packet) -> Option<Verdict> {
    let protocol = packet.protocol;
    let mut key = RuleKey::new(scope, protocol, direction, packet.remote);
    let mut rule = unsafe { FAULTD_RULES.get(&key) };
    if rule.is_none() {
        key = RuleKey::new(scope, protocol, direction, packet.local);
        rule = unsafe { FAULTD_RULES.get(&key) };
    }
    if let Some(found) = rule
        && found.action == ACTION_PEERS
    {
        rule = peer_rule(key, packet.family, remote_addr(ctx, packet)?);
    }
    match rule {
        // Requests are what a client sends: to the rule's port, from the workload; replies come
        // back from that port.
        Some(found) if is_request_action(found.action) => Some(
            match (
                protocol == PROTO_TCP && key.port == packet.remote,
                direction,
            ) {
                (true, DIR_EGRESS) => Verdict::Request(found),
                (true, _) if found.action == ACTION_REQ_LOSE_REPLY => Verdict::Reply(found),
                _ => Verdict::Drop(false),
            },
        ),
        rule => {
            Some(Verdict::Drop(rule.is_some_and(|rule| {
                apply(rule, || carries_data(ctx, packet))
            })))
        }
    }
}

/// Whether a TCP segment carries data or a FIN (what a stall holds back): its length beyond the
/// TCP header, or its FIN flag. Pure ACKs, SYNs and RSTs do not. `skb->len` counts from the
/// start of the packet data the program sees (GSO packets included), as `l4` does.
#[inline(always)]
fn carries_data(ctx: &SkBuff, packet: &Packet) -> bool {
    if packet.protocol != PROTO_TCP {
        return true;
    }
    // Byte 12: data offset (high nibble, 32-bit words); byte 13: flags.
    let Ok(bytes) = ctx.load::<[u8; 2]>(packet.l4 + 12) else {
        return false; // fail open
    };
    const FIN: u8 = 0x01;
    let header = ((bytes[0] >> 4) as usize) * 4;
    let len = unsafe { (*ctx.skb).len } as usize;
    bytes[1] & FIN != 0 || len > packet.l4 + header
}

/// tc verdicts: TC_ACT_UNSPEC hands the packet on (the next program, or the stack); TC_ACT_SHOT.
const TC_NEXT: i32 = -1;
const TC_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;

#[classifier]
pub fn faultd_tc_ingress(ctx: TcContext) -> i32 {
    match tc_should_drop(&ctx, DIR_INGRESS) {
        Some(true) => TC_SHOT,
        _ => TC_NEXT,
    }
}

#[classifier]
pub fn faultd_tc_egress(ctx: TcContext) -> i32 {
    match tc_should_drop(&ctx, DIR_EGRESS) {
        Some(true) => TC_SHOT,
        _ => TC_NEXT,
    }
}

/// A netns{path, interface} scope: the rules of the interface the program runs on.
#[inline(always)]
fn tc_should_drop(ctx: &TcContext, direction: u8) -> Option<bool> {
    let skb = ctx.skb.skb;
    let scope = netns_scope_id(unsafe { (*skb).ifindex });
    unsafe { FAULTD_SCOPES.get(&scope) }?;
    let packet = parse(&ctx.skb, ETH_HLEN, direction)?;
    if !port_named(packet.protocol, direction, packet.local, packet.remote) {
        return None;
    }
    let verdict = scope_drops(&ctx.skb, scope, direction, &packet)?;
    Some(decide(&ctx.skb, ETH_HLEN, &packet, verdict))
}

/// Counts the packet against the rule and says whether to drop it. `data`: whether the packet
/// carries data, asked only of a stall rule.
#[inline(always)]
fn apply(rule: &RuleValue, data: impl FnOnce() -> bool) -> bool {
    if unsafe { bpf_ktime_get_ns() } >= rule.expires_at_ns {
        return false;
    }
    let counters = FAULTD_COUNTERS.get_ptr_mut(rule.counter_slot);
    if let Some(c) = counters {
        unsafe { (*c).matched += 1 };
    }
    if rule.action == ACTION_STALL {
        let stalled = data();
        if stalled && let Some(c) = counters {
            unsafe { (*c).dropped += 1 };
        }
        return stalled;
    }
    if rule.action != ACTION_DROP {
        return false;
    }
    let drop = (unsafe { bpf_get_prandom_u32() } as u64) < rule.drop_threshold;
    if drop && let Some(c) = counters {
        unsafe { (*c).dropped += 1 };
    }
    drop
}

/// cgroup/connect verdicts.
const CONNECT_ALLOW: i32 = 1;
const CONNECT_DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn faultd_connect4(ctx: SockAddrContext) -> i32 {
    connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn faultd_connect6(ctx: SockAddrContext) -> i32 {
    connect::<true>(&ctx)
}

#[inline(always)]
fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    if should_refuse::<V6>(ctx) {
        // Without this the caller sees EPERM, which no real server failure produces.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        CONNECT_DENY
    } else {
        CONNECT_ALLOW
    }
}

#[inline(always)]
fn should_refuse<const V6: bool>(ctx: &SockAddrContext) -> bool {
    let addr = ctx.sock_addr;
    // UDP "connects" only set a default peer: a real closed port never refuses them.
    if unsafe { (*addr).protocol } != PROTO_TCP as u32 {
        return false;
    }
    // The port is in network byte order in the low 16 bits.
    let port = u16::from_be(unsafe { (*addr).user_port } as u16);
    if !port_named(PROTO_TCP, DIR_CONNECT, port, port) {
        return false;
    }
    let refusing = ancestry::walk(
        unsafe { bpf_get_current_cgroup_id() },
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
        |scope| unsafe { FAULTD_SCOPES.get(&scope) }.is_some(),
        |scope| match connect_rule::<V6>(ctx, RuleKey::new(scope, PROTO_TCP, DIR_CONNECT, port)) {
            Some(rule)
                if rule.action == ACTION_REJECT
                    && unsafe { bpf_ktime_get_ns() } < rule.expires_at_ns =>
            {
                Step::Found(rule)
            }
            _ => Step::Next,
        },
    );
    let Some(rule) = refusing else {
        return false;
    };
    if let Some(c) = FAULTD_COUNTERS.get_ptr_mut(rule.counter_slot) {
        unsafe {
            (*c).matched += 1;
            (*c).refused += 1;
        }
    }
    true
}

/// The rule of a connect's key, through the peers map when its faults name peers. `V6`: the
/// connect6 hook (each hook may read only its own family's address fields).
#[inline(always)]
fn connect_rule<const V6: bool>(ctx: &SockAddrContext, key: RuleKey) -> Option<&'static RuleValue> {
    let rule = unsafe { FAULTD_RULES.get(&key) }?;
    if rule.action != ACTION_PEERS {
        return Some(rule);
    }
    let addr = ctx.sock_addr;
    let mut bytes = [0u8; 16];
    let family = if !V6 {
        bytes[..4].copy_from_slice(&unsafe { (*addr).user_ip4 }.to_ne_bytes());
        FAMILY_V4
    } else {
        let words = unsafe { (*addr).user_ip6 };
        for (i, word) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        // An IPv4-mapped address (::ffff:a.b.c.d) connects over IPv4.
        if words[0] == 0 && words[1] == 0 && u32::from_be(words[2]) == 0xffff {
            bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&words[3].to_ne_bytes());
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    };
    peer_rule(key, family, bytes)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
