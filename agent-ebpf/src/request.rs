//! Request matching: a rule whose action is a request code (`ACTION_REQ_*`) acts only on the
//! TCP segments a client sends whose payload starts with a request it names — a Redis command
//! (RESP multibulk `*N\r\n$L\r\nSET…` or inline `SET k v\r\n`, optionally with a key prefix) or a
//! PostgreSQL simple Query (`Q`) or Parse (`P`) message whose SQL's first keyword is named
//! (leading whitespace and `--` / `/* */` comments skipped).
//!
//! Only the first `REQ_BUF_LEN` bytes of a segment are read, into a per-CPU buffer (map value
//! indexes are masked, which every kernel's verifier accepts). What is not matched, and so
//! passes: a request that starts after another one in the same segment (pipelining), a request
//! split before the end of its name (or key prefix), TLS. Retransmissions of a dropped request
//! carry the same bytes, so they match again. Fail open: whatever does not parse passes.

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::sk_buff::SkBuff,
};
use faultd_common::{
    ACTION_REQ_LOSE_REPLY, ACTION_REQ_RESET, Counters, FAMILY_V4, MAX_REQ_ARMED, MAX_REQ_NAMES,
    MAX_REQ_SPECS, REQ_BUF_LEN, REQ_NAME_LEN, REQ_POSTGRES, REQ_PREFIX_LEN, REQ_REDIS, RequestArm,
    RequestBuf, RequestEvent, RequestName, RequestSpec, RuleValue,
};

#[map]
static FAULTD_REQ_SPECS: HashMap<u32, RequestSpec> = HashMap::with_max_entries(MAX_REQ_SPECS, 0);
#[map]
static FAULTD_REQ_NAMES: HashMap<RequestName, u32> = HashMap::with_max_entries(MAX_REQ_NAMES, 0);
#[map]
static FAULTD_REQ_BUF: PerCpuArray<RequestBuf> = PerCpuArray::with_max_entries(1, 0);
#[map]
static FAULTD_REQ_ARMED: LruHashMap<u64, RequestArm> =
    LruHashMap::with_max_entries(MAX_REQ_ARMED, 0);
#[map]
static FAULTD_REQ_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

const MASK: usize = REQ_BUF_LEN - 1;
/// Bytes of whitespace and comments skipped before a PostgreSQL statement's keyword.
const SQL_SKIP: usize = 96;
/// Longest prepared-statement name of a Parse message.
const STATEMENT_NAME: usize = 64;

/// Whether to drop the packet, for a rule with a request match found under the packet's remote
/// port. `base`: where the IP header starts; `family`: FAMILY_V4 or FAMILY_V6.
#[inline(always)]
pub fn decide(
    ctx: &SkBuff,
    base: usize,
    family: u32,
    rule: &RuleValue,
    counters: Option<*mut Counters>,
) -> bool {
    if unsafe { bpf_ktime_get_ns() } >= rule.expires_at_ns {
        return false;
    }
    if let Some(c) = counters {
        unsafe { (*c).matched += 1 };
    }
    if matches(ctx, base, family, rule.counter_slot).is_none() {
        return false;
    }
    // SAFETY: the program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.cast()) };
    if rule.action == ACTION_REQ_LOSE_REPLY {
        // The request goes through; its reply will not (`reply`).
        let arm = RequestArm {
            slot: rule.counter_slot,
            fired: 0,
        };
        if let Some(c) = counters {
            unsafe { (*c).requests_matched += 1 };
        }
        // A full map evicts the least recently armed connection, whose reply then arrives.
        let _ = FAULTD_REQ_ARMED.insert(&cookie, &arm, 0);
        return false;
    }
    if let Some(c) = counters {
        unsafe {
            (*c).requests_matched += 1;
            (*c).requests_affected += 1;
        }
    }
    if rule.action == ACTION_REQ_RESET {
        // A full ring (user space far behind) still drops the request: the client times
        // out instead of seeing a reset, which is the lesser surprise.
        report(cookie, rule);
    }
    true
}

/// Asks user space to destroy the socket `cookie` now.
#[inline(always)]
fn report(cookie: u64, rule: &RuleValue) {
    let event = RequestEvent {
        cookie,
        slot: rule.counter_slot,
        action: rule.action,
    };
    let _ = FAULTD_REQ_EVENTS.output::<RequestEvent>(&event, 0);
}

/// Whether to drop a segment coming back to the workload on a lose_reply rule's port: one that
/// carries data on a connection the rule armed. User space then destroys the socket.
#[inline(always)]
pub fn reply(
    ctx: &SkBuff,
    base: usize,
    family: u32,
    rule: &RuleValue,
    counters: Option<*mut Counters>,
) -> bool {
    if unsafe { bpf_ktime_get_ns() } >= rule.expires_at_ns {
        return false;
    }
    // SAFETY: the program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.cast()) };
    let Some(arm) = FAULTD_REQ_ARMED.get_ptr_mut(&cookie) else {
        return false;
    };
    if unsafe { (*arm).slot } != rule.counter_slot || payload(ctx, base, family).is_none() {
        return false;
    }
    if unsafe { (*arm).fired } == 0 {
        unsafe { (*arm).fired = 1 };
        if let Some(c) = counters {
            unsafe { (*c).requests_affected += 1 };
        }
    }
    report(cookie, rule);
    true
}

/// Where the TCP payload starts, and how long it is (None when it is empty).
#[inline(always)]
fn payload(ctx: &SkBuff, base: usize, family: u32) -> Option<(usize, usize)> {
    let l4 = if family == FAMILY_V4 {
        let vihl: u8 = ctx.load(base).ok()?;
        base + ((vihl & 0x0f) as usize) * 4
    } else {
        base + 40
    };
    let doff: u8 = ctx.load(l4 + 12).ok()?;
    let payload = l4 + ((doff >> 4) as usize) * 4;
    let len = ctx.len() as usize;
    if payload >= len {
        return None; // a bare ACK, SYN or FIN
    }
    Some((payload, len - payload))
}

/// Some when the segment starts with a request the fault of `slot` names.
#[inline(always)]
fn matches(ctx: &SkBuff, base: usize, family: u32, slot: u32) -> Option<()> {
    let (payload, len) = payload(ctx, base, family)?;
    let n = core::hint::black_box(len.min(REQ_BUF_LEN));
    // 1..=REQ_BUF_LEN in a form every verifier can bound.
    let n = ((n.wrapping_sub(1)) & MASK) + 1;
    let buf = FAULTD_REQ_BUF.get_ptr_mut(0)?;
    // SAFETY: `bytes` is REQ_BUF_LEN bytes of this CPU's map value and n <= REQ_BUF_LEN.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.cast(),
            payload as u32,
            (*buf).bytes.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if loaded != 0 {
        return None;
    }
    let spec = unsafe { FAULTD_REQ_SPECS.get(&slot) }?;
    let p = Payload { buf };
    p.keep(N, n);
    let name = match spec.protocol {
        REQ_REDIS => redis(&p, spec)?,
        REQ_POSTGRES => postgres(&p)?,
        _ => return None,
    };
    let key = RequestName {
        slot,
        _pad: 0,
        // SAFETY: two u64 are 16 plain bytes.
        name: unsafe { core::mem::transmute::<[u64; 2], [u8; REQ_NAME_LEN]>(name) },
    };
    unsafe { FAULTD_REQ_NAMES.get(&key) }.map(|_| ())
}

/// Scratch slots: the payload length, and the start and length of what a parse found.
const N: usize = 0;
const START: usize = 1;
const LEN: usize = 2;
const KEY: usize = 3;

/// The first bytes of a segment's payload, in this CPU's buffer, with the parser's scratch.
struct Payload {
    buf: *mut RequestBuf,
}

impl Payload {
    /// The byte at `i` (masked into the buffer; bytes past the payload length are stale but
    /// never decide a match: every parse checks its positions against it).
    #[inline(always)]
    fn at(&self, i: usize) -> u8 {
        // SAFETY: `buf` is this CPU's map value and the index is masked into it.
        unsafe { (*self.buf).bytes[i & MASK] }
    }

    /// Stores `v` in scratch slot `slot`.
    #[inline(always)]
    fn keep(&self, slot: usize, v: usize) {
        // SAFETY: this CPU's map value; volatile so the compiler keeps the round trip.
        unsafe { core::ptr::write_volatile(&mut (*self.buf).scratch[slot & 3], v as u64) }
    }

    /// Reads slot `slot` back, bounded: a fresh value to the verifier at each use (an
    /// unbounded loop of refinements on one register is what exhausts its budget).
    #[inline(always)]
    fn get(&self, slot: usize) -> usize {
        // SAFETY: as in `keep`.
        (unsafe { core::ptr::read_volatile(&(*self.buf).scratch[slot & 3]) } as usize) & 0x1ff
    }

    /// The payload length (1..=REQ_BUF_LEN).
    #[inline(always)]
    fn n(&self) -> usize {
        self.get(N)
    }
}

#[inline(always)]
fn upper(c: u8) -> u8 {
    if c.is_ascii_lowercase() { c - 32 } else { c }
}

/// The bytes of slots START and LEN, upper case, zero-filled to REQ_NAME_LEN (as two words,
/// so no stack byte is indexed by a variable).
#[inline(always)]
fn name_at(p: &Payload) -> [u64; 2] {
    let mut words = [0u64; 2];
    for i in 0..REQ_NAME_LEN {
        if i < p.get(LEN) {
            let byte = (upper(p.at(p.get(START) + i)) as u64) << ((i % 8) * 8);
            if i < 8 {
                words[0] |= byte;
            } else {
                words[1] |= byte;
            }
        }
    }
    words
}

/// Whether the name at slots START and LEN is 1 to REQ_NAME_LEN bytes inside the payload,
/// all of them `allowed`.
#[inline(always)]
fn name_ok(p: &Payload, allowed: fn(u8) -> bool) -> bool {
    let len = p.get(LEN);
    if len == 0 || len > REQ_NAME_LEN || p.get(START) + p.get(LEN) > p.n() {
        return false;
    }
    for i in 0..REQ_NAME_LEN {
        if i < p.get(LEN) && !allowed(p.at(p.get(START) + i)) {
            return false;
        }
    }
    true
}

/// A decimal number of 1 to 4 digits at `at`, ended by `\r\n`: its value and where the `\r`
/// is.
#[inline(always)]
fn number(p: &Payload, at: usize) -> Option<(usize, usize)> {
    p.keep(KEY, at);
    let mut value = 0;
    let mut end = None;
    for i in 0..5 {
        let at = p.get(KEY);
        if at + i >= p.n() {
            return None;
        }
        let c = p.at(at + i);
        if c == b'\r' {
            end = Some(i);
            break;
        }
        if !c.is_ascii_digit() {
            return None;
        }
        value = value * 10 + (c - b'0') as usize;
    }
    p.keep(KEY, p.get(KEY) + end?);
    let end = p.get(KEY);
    if end == at || end + 1 >= p.n() || p.at(end + 1) != b'\n' {
        return None;
    }
    Some((value & 0xffff, end))
}

fn command_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

fn keyword_byte(c: u8) -> bool {
    c.is_ascii_alphabetic()
}

/// The command name of a Redis request (RESP multibulk or inline), if the segment holds all of
/// it (and the key prefix the spec asks for).
#[inline(always)]
fn redis(p: &Payload, spec: &RequestSpec) -> Option<[u64; 2]> {
    let multibulk = p.at(0) == b'*';
    if multibulk {
        let (_, cr) = number(p, 1)?;
        if p.at(cr + 2) != b'$' {
            return None;
        }
        let (len, cr) = number(p, cr + 3)?;
        p.keep(START, cr + 2);
        p.keep(LEN, len);
    } else {
        let mut end = None;
        for i in 0..=REQ_NAME_LEN {
            if i >= p.n() {
                return None;
            }
            let c = p.at(i);
            if c == b' ' || c == b'\r' || c == b'\n' {
                end = Some(i);
                break;
            }
        }
        p.keep(START, 0);
        p.keep(LEN, end?);
    }
    if !name_ok(p, command_byte) {
        return None;
    }
    if spec.key_prefix_len > 0 {
        // Multibulk: the key's bulk string follows the name's (`\r\n$K\r\n<key>`); inline:
        // after one space.
        if multibulk {
            let at = p.get(START) + p.get(LEN) + 2;
            if p.at(at) != b'$' {
                return None;
            }
            let (key_len, cr) = number(p, at + 1)?;
            if key_len < spec.key_prefix_len as usize {
                return None;
            }
            p.keep(KEY, cr + 2);
        } else {
            p.keep(KEY, p.get(START) + p.get(LEN) + 1);
        }
        if p.get(KEY) + (spec.key_prefix_len as usize & 0xff) > p.n() {
            return None;
        }
        for i in 0..REQ_PREFIX_LEN {
            if i < spec.key_prefix_len as usize && p.at(p.get(KEY) + i) != spec.key_prefix[i] {
                return None;
            }
        }
    }
    Some(name_at(p))
}

/// The first keyword of the SQL of a PostgreSQL Query or Parse message.
#[inline(always)]
fn postgres(p: &Payload) -> Option<[u64; 2]> {
    let kind = p.at(0);
    if kind == b'P' {
        // The prepared statement's name, NUL-terminated, comes first.
        let mut end = None;
        for i in 0..STATEMENT_NAME {
            if 5 + i >= p.n() {
                return None;
            }
            if p.at(5 + i) == 0 {
                end = Some(6 + i);
                break;
            }
        }
        p.keep(START, end?);
    } else if kind == b'Q' {
        p.keep(START, 5); // type byte, then a 4-byte length
    } else {
        return None;
    }
    // Whitespace and comments. mode 0: code, 1: in a `--` comment, 2: in a `/* */` comment.
    let mut mode = 0u8;
    let mut found = false;
    for _ in 0..SQL_SKIP {
        let pos = p.get(START);
        if pos >= p.n() {
            return None;
        }
        let c = p.at(pos);
        let next = if pos + 1 < p.n() { p.at(pos + 1) } else { 0 };
        let step = match mode {
            0 => {
                if c == b' ' || c == b'\t' || c == b'\n' || c == b'\r' {
                    1
                } else if c == b'-' && next == b'-' {
                    mode = 1;
                    2
                } else if c == b'/' && next == b'*' {
                    mode = 2;
                    2
                } else {
                    found = true;
                    break;
                }
            }
            1 => {
                if c == b'\n' {
                    mode = 0;
                }
                1
            }
            _ => {
                if c == b'*' && next == b'/' {
                    mode = 0;
                    2
                } else {
                    1
                }
            }
        };
        p.keep(START, pos + step);
    }
    if !found {
        return None;
    }
    let mut end = None;
    for i in 0..=REQ_NAME_LEN {
        let at = p.get(START) + i;
        if at >= p.n() {
            return None;
        }
        if !keyword_byte(p.at(at)) {
            end = Some(i);
            break;
        }
    }
    p.keep(LEN, end?);
    if !name_ok(p, keyword_byte) {
        return None;
    }
    Some(name_at(p))
}
