//! faultd's tc egress classifier for delay and bandwidth faults. It matches only the target's
//! packets — the cgroup of the skb's socket and its ancestors, protocol and port, through the
//! same O(1) lookups as the cgroup_skb programs — and either steers them into the fault's htb
//! class (`skb->priority`, whose netem or rate-limited leaf does the shaping) or gives them an
//! Earliest Departure Time (`skb->tstamp`) that the fq qdisc enforces. A key whose faults name
//! peers holds a marker (`SHAPE_PEERS`); only then is the destination address looked up in a
//! longest-prefix-match trie under that key, to find which fault (if any) shapes the packet.
//! Anything unexpected passes the packet untouched.

use crate::ancestry::Step;
use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        bpf_skb_load_bytes_relative,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use faultd_common::{
    Counters, DIR_EGRESS, DIST_SCALE, DIST_SIZE, FAMILY_V4, FAMILY_V6, MAX_FAULTS, MAX_PEERS,
    MAX_RULES, MAX_SCOPES, PEER_KEY_FIXED_BITS, PROTO_TCP, PROTO_UDP, PeerKey, RuleKey,
    SHAPE_CLASS, SHAPE_EDT, SHAPE_PASS, SHAPE_PEERS, ScopeValue, ShapeState, ShapeValue,
};

#[map]
static FAULTD_SHAPES: HashMap<RuleKey, ShapeValue> =
    HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
#[map]
static FAULTD_SHAPE_SCOPES: HashMap<u64, ScopeValue> =
    HashMap::with_max_entries(MAX_SCOPES, BPF_F_NO_PREALLOC);
#[map]
static FAULTD_SHAPE_PEERS: LpmTrie<PeerKey, ShapeValue> =
    LpmTrie::with_max_entries(MAX_PEERS, BPF_F_NO_PREALLOC);
#[map]
static FAULTD_SHAPE_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_FAULTS, 0);
#[map]
static FAULTD_SHAPE_STATE: Array<ShapeState> = Array::with_max_entries(MAX_FAULTS, 0);
#[map]
static FAULTD_SHAPE_DIST: Array<i32> = Array::with_max_entries(DIST_SIZE, 0);
#[map]
static FAULTD_SHAPE_ALIVE: Array<u64> = Array::with_max_entries(1, 0);

/// Entries are allocated as faults come: these maps are mostly empty.
const BPF_F_NO_PREALLOC: u32 = 1;

/// TC_ACT_UNSPEC for cls_bpf, TCX_NEXT for TCX: the next program (or the default) decides.
const NEXT: i32 = -1;
/// TC_ACT_SHOT: the EDT bandwidth queue is full.
const SHOT: i32 = 2;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[classifier]
pub fn faultd_shape(ctx: TcContext) -> i32 {
    shape(&ctx).unwrap_or(NEXT)
}

/// Loads `T` at `offset` from the network header (whatever the link layer in front of it).
#[inline(always)]
fn load_net<T: Copy + Default>(ctx: &TcContext, offset: u32) -> Option<T> {
    let mut value = T::default();
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const _,
            offset,
            &mut value as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    (ret == 0).then_some(value)
}

/// An egress IPv4/IPv6 TCP/UDP packet: what the lookups need.
struct Packet {
    protocol: u8,
    local: u16,
    remote: u16,
    family: u32,
    /// Offset of the destination address from the network header.
    remote_addr: u32,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (protocol, l4, family, remote_addr) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = load_net(ctx, 0)?;
            if vihl >> 4 != 4 {
                return None;
            }
            let frag = u16::from_be(load_net::<u16>(ctx, 6)?);
            if frag & 0x1fff != 0 {
                return None;
            }
            (
                load_net::<u8>(ctx, 9)?,
                u32::from(vihl & 0x0f) * 4,
                FAMILY_V4,
                16,
            )
        }
        ETH_P_IPV6 => (load_net::<u8>(ctx, 6)?, 40, FAMILY_V6, 24),
        _ => return None,
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    let sport = u16::from_be(load_net::<u16>(ctx, l4)?);
    let dport = u16::from_be(load_net::<u16>(ctx, l4 + 2)?);
    Some(Packet {
        protocol,
        local: sport,
        remote: dport,
        family,
        remote_addr,
    })
}

/// The fault a peers marker stands for, for the packet's destination: None when no fault's
/// peers cover it (or an exclusion does, whose mechanism `SHAPE_PASS` shapes nothing).
#[inline(always)]
fn peer_rule(ctx: &TcContext, rule: RuleKey, packet: &Packet) -> Option<&'static ShapeValue> {
    let mut addr = [0u8; 16];
    let bits = if packet.family == FAMILY_V4 {
        let v4: [u8; 4] = load_net(ctx, packet.remote_addr)?;
        addr[..4].copy_from_slice(&v4);
        32
    } else {
        addr = load_net(ctx, packet.remote_addr)?;
        128
    };
    let key = Key::new(
        PEER_KEY_FIXED_BITS + bits,
        PeerKey {
            rule,
            family: packet.family,
            addr,
            _pad: 0,
        },
    );
    FAULTD_SHAPE_PEERS
        .get(&key)
        .filter(|value| value.mechanism != SHAPE_PASS)
}

#[inline(always)]
fn lookup(ctx: &TcContext, packet: &Packet) -> Option<&'static ShapeValue> {
    let (protocol, local, remote) = (packet.protocol, packet.local, packet.remote);
    let skb = ctx.skb.skb;
    crate::ancestry::walk(
        unsafe { bpf_skb_cgroup_id(skb) },
        |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) },
        |scope| unsafe { FAULTD_SHAPE_SCOPES.get(&scope) }.is_some(),
        |scope| {
            let mut key = RuleKey::new(scope, protocol, DIR_EGRESS, remote);
            let mut found = unsafe { FAULTD_SHAPES.get(&key) };
            if found.is_none() {
                key = RuleKey::new(scope, protocol, DIR_EGRESS, local);
                found = unsafe { FAULTD_SHAPES.get(&key) };
            }
            match found {
                Some(rule) if rule.mechanism != SHAPE_PEERS => Step::Found(rule),
                // No fault of this scope is for this peer: an ancestor's may be.
                Some(_) => peer_rule(ctx, key, packet).map_or(Step::Next, Step::Found),
                None => Step::Next,
            }
        },
    )
}

#[inline(always)]
fn shape(ctx: &TcContext) -> Option<i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    // A dead agent's classifier (netlink-attached, it outlives the process) shapes nothing.
    if now >= *FAULTD_SHAPE_ALIVE.get(0)? {
        return None;
    }
    let packet = parse(ctx)?;
    let rule = lookup(ctx, &packet)?;
    if now >= rule.expires_at_ns {
        return None;
    }
    let counters = FAULTD_SHAPE_COUNTERS.get_ptr_mut(rule.counter_slot);
    if let Some(c) = counters {
        unsafe { (*c).matched += 1 };
    }
    let verdict = match rule.mechanism {
        SHAPE_CLASS => {
            unsafe { (*ctx.skb.skb).priority = rule.classid };
            NEXT
        }
        SHAPE_EDT => match departure(ctx, rule, now) {
            Some(at) => {
                unsafe {
                    (*ctx.skb.skb).tstamp = at;
                    (*ctx.skb.skb).priority = rule.classid;
                }
                NEXT
            }
            None => {
                if let Some(c) = counters {
                    unsafe { (*c).dropped += 1 };
                }
                return Some(SHOT);
            }
        },
        _ => return None,
    };
    if let Some(c) = counters {
        unsafe { (*c).delayed += 1 };
    }
    Some(verdict)
}

/// The packet's departure time under EDT: paced by the rate (if any), plus the delay sample.
/// None when the rate's backlog would exceed its bound (the packet is dropped, as by a full
/// bottleneck queue).
#[inline(always)]
fn departure(ctx: &TcContext, rule: &ShapeValue, now: u64) -> Option<u64> {
    let state = FAULTD_SHAPE_STATE.get_ptr_mut(rule.counter_slot)?;
    // TCP already stamps its packets (its own pacing); never send earlier than that.
    let stamped = unsafe { (*ctx.skb.skb).tstamp };
    let mut at = if stamped > now { stamped } else { now };
    if rule.rate_bytes_per_sec != 0 {
        let last = unsafe { (*state).last_departure_ns };
        let start = if last > at { last } else { at };
        let wire = u64::from(ctx.len()) * 1_000_000_000 / rule.rate_bytes_per_sec;
        if start - now > rule.max_backlog_ns {
            return None;
        }
        at = start + wire;
        unsafe { (*state).last_departure_ns = at };
    }
    if rule.delay_ns != 0 || rule.jitter_ns != 0 {
        at += sample_delay(rule, state);
    }
    Some(at)
}

/// `delay ± jitter` (normal distribution, jitter its standard deviation), never negative;
/// successive samples correlated by `correlation` as in netem.
#[inline(always)]
fn sample_delay(rule: &ShapeValue, state: *mut ShapeState) -> u64 {
    if rule.jitter_ns == 0 {
        return rule.delay_ns;
    }
    let mut random = u64::from(unsafe { bpf_get_prandom_u32() });
    if rule.correlation != 0 {
        let rho = u64::from(rule.correlation);
        let last = unsafe { (*state).last_random };
        random = (random * ((1u64 << 32) - rho) + last * rho) >> 32;
        unsafe { (*state).last_random = random };
    }
    let index = (random as u32) % DIST_SIZE;
    let t = match FAULTD_SHAPE_DIST.get(index) {
        Some(t) => i64::from(*t),
        None => 0,
    };
    let delay = rule.delay_ns as i64 + (rule.jitter_ns as i64) * t / DIST_SCALE;
    if delay > 0 { delay as u64 } else { 0 }
}
