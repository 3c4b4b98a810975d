//! A small synchronous rtnetlink client for the tc objects faultd owns: links, qdiscs, classes
//! and filters, with the option blobs of htb, netem and fq encoded here (netlink-packet-route
//! has no types for them). Synchronous because the engine applies a fault under one lock,
//! like its BPF map updates; each call is a few microseconds of kernel work.

use std::io;

use rtnetlink::packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("decoding a netlink answer: {0}")]
    Decode(String),
}

impl RtnlError {
    /// The errno the kernel answered with, if it did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// `TC_H_ROOT`: the parent of a root qdisc.
pub const TC_H_ROOT: u32 = 0xFFFF_FFFF;
/// The clsact qdisc's handle (`ffff:`) and its egress hook as a filter parent.
pub const CLSACT_HANDLE: u32 = 0xFFFF_0000;
pub const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
/// `tcm_info` protocol of a filter that matches every packet (ETH_P_ALL, network order).
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
}

/// A qdisc, class or filter as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcObject {
    pub ifindex: u32,
    pub handle: u32,
    pub parent: u32,
    /// Filters: `priority << 16 | protocol`.
    pub info: u32,
    pub kind: String,
}

impl TcObject {
    /// A filter's priority.
    pub fn priority(&self) -> u16 {
        (self.info >> 16) as u16
    }
}

pub struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    /// Opens a route netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and collects the answers until the ACK (or the end of a dump).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        what: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        self.socket.send(&buffer, 0).map_err(RtnlError::Socket)?;

        let mut answers = Vec::new();
        let mut receive = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .socket
                .recv(&mut &mut receive[..], 0)
                .map_err(RtnlError::Socket)?;
            let mut offset = 0;
            while offset < n {
                let bytes = &receive[offset..n];
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| RtnlError::Decode(e.to_string()))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    return Err(RtnlError::Decode("zero-length message".into()));
                }
                offset += (length + 3) & !3;
                if answer.header.sequence_number != self.sequence {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(RtnlError::Kernel {
                                what: what(),
                                source: e.to_io(),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>, RtnlError> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            || "listing interfaces".into(),
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(Link {
                    index: link.header.index,
                    up: link.header.flags.contains(LinkFlags::Up),
                    name: link
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            LinkAttribute::IfName(name) => Some(name.clone()),
                            _ => None,
                        })
                        .unwrap_or_default(),
                }),
                _ => None,
            })
            .collect())
    }

    fn dump_tc(
        &mut self,
        message: RouteNetlinkMessage,
        what: &'static str,
    ) -> Result<Vec<TcObject>, RtnlError> {
        let answers = self.request(message, NLM_F_DUMP, || what.to_string())?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewQueueDiscipline(m)
                | RouteNetlinkMessage::NewTrafficClass(m)
                | RouteNetlinkMessage::NewTrafficFilter(m) => Some(tc_object(&m)),
                _ => None,
            })
            .collect())
    }

    /// Every qdisc of every interface.
    pub fn qdiscs(&mut self) -> Result<Vec<TcObject>, RtnlError> {
        self.dump_tc(
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            "listing qdiscs",
        )
    }

    /// The filters of one interface under `parent` (e.g. `CLSACT_EGRESS`).
    pub fn filters(&mut self, ifindex: u32, parent: u32) -> Result<Vec<TcObject>, RtnlError> {
        let mut message = TcMessage::with_index(ifindex as i32);
        message.header.parent = TcHandle::from(parent);
        self.dump_tc(
            RouteNetlinkMessage::GetTrafficFilter(message),
            "listing tc filters",
        )
    }

    /// Creates or replaces the root qdisc of `ifindex` with `kind` and handle `major:`.
    pub fn replace_root_qdisc(
        &mut self,
        ifindex: u32,
        major: u16,
        kind: &str,
        options: Vec<u8>,
    ) -> Result<(), RtnlError> {
        let message = tc_message(ifindex, u32::from(major) << 16, TC_H_ROOT, kind, options);
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(message),
            NLM_F_CREATE | NLM_F_REPLACE,
            || format!("installing the {kind} root qdisc {major:x}: on interface {ifindex}"),
        )
        .map(drop)
    }

    /// Adds a qdisc under a class (`parent`), with a handle the kernel chooses.
    pub fn add_leaf_qdisc(
        &mut self,
        ifindex: u32,
        parent: u32,
        kind: &str,
        options: Vec<u8>,
    ) -> Result<(), RtnlError> {
        let message = tc_message(ifindex, 0, parent, kind, options);
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(message),
            NLM_F_CREATE | NLM_F_EXCL,
            || {
                format!(
                    "adding a {kind} qdisc under {} on interface {ifindex}",
                    handle(parent)
                )
            },
        )
        .map(drop)
    }

    /// Adds the clsact qdisc; Ok(false) if the interface already has one.
    pub fn add_clsact(&mut self, ifindex: u32) -> Result<bool, RtnlError> {
        let message = tc_message(ifindex, CLSACT_HANDLE, 0xFFFF_FFF1, "clsact", Vec::new());
        match self.request(
            RouteNetlinkMessage::NewQueueDiscipline(message),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("adding clsact on interface {ifindex}"),
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes a qdisc; a qdisc that is already gone is not an error.
    pub fn delete_qdisc(
        &mut self,
        ifindex: u32,
        handle_: u32,
        parent: u32,
    ) -> Result<(), RtnlError> {
        let message = tc_message(ifindex, handle_, parent, "", Vec::new());
        ignore_missing(
            self.request(RouteNetlinkMessage::DelQueueDiscipline(message), 0, || {
                format!("deleting qdisc {} on interface {ifindex}", handle(handle_))
            }),
        )
    }

    /// Creates or changes an htb class.
    pub fn replace_class(
        &mut self,
        ifindex: u32,
        classid: u32,
        parent: u32,
        options: Vec<u8>,
    ) -> Result<(), RtnlError> {
        let message = tc_message(ifindex, classid, parent, "htb", options);
        self.request(
            RouteNetlinkMessage::NewTrafficClass(message),
            NLM_F_CREATE | NLM_F_REPLACE,
            || {
                format!(
                    "installing htb class {} on interface {ifindex}",
                    handle(classid)
                )
            },
        )
        .map(drop)
    }

    /// Deletes a class (and its leaf qdisc); a class that is already gone is not an error.
    pub fn delete_class(&mut self, ifindex: u32, classid: u32) -> Result<(), RtnlError> {
        let message = tc_message(ifindex, classid, 0, "", Vec::new());
        ignore_missing(
            self.request(RouteNetlinkMessage::DelTrafficClass(message), 0, || {
                format!("deleting class {} on interface {ifindex}", handle(classid))
            }),
        )
    }

    /// Deletes every filter of `priority` under `parent`.
    pub fn delete_filters(
        &mut self,
        ifindex: u32,
        parent: u32,
        priority: u16,
    ) -> Result<(), RtnlError> {
        let mut message = tc_message(ifindex, 0, parent, "", Vec::new());
        message.header.info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL_BE);
        ignore_missing(
            self.request(RouteNetlinkMessage::DelTrafficFilter(message), 0, || {
                format!("deleting filters of priority {priority} on interface {ifindex}")
            }),
        )
    }
}

fn ignore_missing(result: Result<Vec<RouteNetlinkMessage>, RtnlError>) -> Result<(), RtnlError> {
    match result {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.errno(),
                Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn tc_message(ifindex: u32, handle_: u32, parent: u32, kind: &str, options: Vec<u8>) -> TcMessage {
    let mut message = TcMessage::with_index(ifindex as i32);
    message.header.handle = TcHandle::from(handle_);
    message.header.parent = TcHandle::from(parent);
    if !kind.is_empty() {
        message.attributes.push(TcAttribute::Kind(kind.to_string()));
    }
    if !options.is_empty() {
        // Raw TCA_OPTIONS: netem's starts with a struct, the others are nested attributes.
        message
            .attributes
            .push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, options)));
    }
    message
}

fn tc_object(message: &TcMessage) -> TcObject {
    TcObject {
        ifindex: message.header.index as u32,
        handle: u32::from(message.header.handle),
        parent: u32::from(message.header.parent),
        info: message.header.info,
        kind: message
            .attributes
            .iter()
            .find_map(|a| match a {
                TcAttribute::Kind(kind) => Some(kind.clone()),
                _ => None,
            })
            .unwrap_or_default(),
    }
}

/// `major:minor` in hex, as tc(8) prints handles.
pub fn handle(value: u32) -> String {
    format!("{:x}:{:x}", value >> 16, value & 0xFFFF)
}

const TCA_OPTIONS: u16 = 2;

/// Appends one netlink attribute (type, length, value, padding to 4 bytes).
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let length = 4 + value.len();
    out.extend_from_slice(&(length as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + ((4 - length % 4) % 4), 0);
}

/// Appends an attribute whose payload is `values` (a struct of u32s).
pub fn push_attribute(out: &mut Vec<u8>, kind: u16, values: &[u32]) {
    attribute(out, kind, &u32s(values));
}

fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// Nanoseconds per psched tick (`PSCHED_SHIFT` = 6).
const PSCHED_TICK_NS: u64 = 64;

/// htb root qdisc options: unclassified packets go to the direct queue (no default class),
/// so only what the classifier steers is shaped.
pub fn htb_root_options(direct_qlen: u32) -> Vec<u8> {
    const TCA_HTB_INIT: u16 = 2;
    const TCA_HTB_DIRECT_QLEN: u16 = 5;
    let mut out = Vec::new();
    // struct tc_htb_glob { version, rate2quantum, defcls, debug, direct_pkts }
    attribute(&mut out, TCA_HTB_INIT, &u32s(&[3, 10, 0, 0, 0]));
    attribute(&mut out, TCA_HTB_DIRECT_QLEN, &direct_qlen.to_ne_bytes());
    out
}

/// htb class options for `rate` bytes per second (ceil the same) and `burst` bytes.
pub fn htb_class_options(rate: u64, burst: u32) -> Vec<u8> {
    const TCA_HTB_PARMS: u16 = 1;
    const TCA_HTB_RATE64: u16 = 6;
    const TCA_HTB_CEIL64: u16 = 7;
    const TC_LINKLAYER_ETHERNET: u8 = 1;
    let rate = rate.max(1);
    let rate32 = u32::try_from(rate).unwrap_or(u32::MAX);
    // struct tc_ratespec { cell_log u8, linklayer u8, overhead u16, cell_align i16, mpu u16, rate u32 }
    let mut ratespec = vec![0u8, TC_LINKLAYER_ETHERNET, 0, 0, 0, 0, 0, 0];
    ratespec.extend_from_slice(&rate32.to_ne_bytes());
    let ticks = (u64::from(burst) * 1_000_000_000 / rate / PSCHED_TICK_NS)
        .clamp(1, u64::from(u32::MAX)) as u32;
    let quantum = (rate / 10).clamp(1600, 200_000) as u32;
    // struct tc_htb_opt { rate, ceil, buffer, cbuffer, quantum, level, prio }
    let mut parms = ratespec.clone();
    parms.extend_from_slice(&ratespec);
    parms.extend_from_slice(&u32s(&[ticks, ticks, quantum, 0, 0]));
    let mut out = Vec::new();
    attribute(&mut out, TCA_HTB_PARMS, &parms);
    if rate > u64::from(u32::MAX) {
        attribute(&mut out, TCA_HTB_RATE64, &rate.to_ne_bytes());
        attribute(&mut out, TCA_HTB_CEIL64, &rate.to_ne_bytes());
    }
    out
}

/// netem options: `latency` and `jitter` (standard deviation of `table`, a normal distribution)
/// in nanoseconds, `correlation` scaled to u32, room for `limit` packets.
pub fn netem_options(
    latency: u64,
    jitter: u64,
    correlation: u32,
    limit: u32,
    table: &[i16],
) -> Vec<u8> {
    const TCA_NETEM_CORR: u16 = 1;
    const TCA_NETEM_DELAY_DIST: u16 = 2;
    const TCA_NETEM_LATENCY64: u16 = 10;
    const TCA_NETEM_JITTER64: u16 = 11;
    let ticks = |ns: u64| u32::try_from(ns / PSCHED_TICK_NS).unwrap_or(u32::MAX);
    // struct tc_netem_qopt { latency, limit, loss, gap, duplicate, jitter } (ticks, legacy)
    let mut out = u32s(&[ticks(latency), limit, 0, 0, 0, ticks(jitter)]);
    // struct tc_netem_corr { delay_corr, loss_corr, dup_corr }
    attribute(&mut out, TCA_NETEM_CORR, &u32s(&[correlation, 0, 0]));
    if jitter != 0 && !table.is_empty() {
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_ne_bytes()).collect();
        attribute(&mut out, TCA_NETEM_DELAY_DIST, &bytes);
    }
    attribute(
        &mut out,
        TCA_NETEM_LATENCY64,
        &(latency as i64).to_ne_bytes(),
    );
    attribute(&mut out, TCA_NETEM_JITTER64, &(jitter as i64).to_ne_bytes());
    out
}

/// fq options: queue limits, and a `horizon` (µs) beyond which departure times are capped,
/// never dropped.
pub fn fq_options(limit: u32, flow_limit: u32, horizon_us: u32) -> Vec<u8> {
    const TCA_FQ_PLIMIT: u16 = 1;
    const TCA_FQ_FLOW_PLIMIT: u16 = 2;
    const TCA_FQ_HORIZON: u16 = 14;
    const TCA_FQ_HORIZON_DROP: u16 = 15;
    let mut out = Vec::new();
    attribute(&mut out, TCA_FQ_PLIMIT, &limit.to_ne_bytes());
    attribute(&mut out, TCA_FQ_FLOW_PLIMIT, &flow_limit.to_ne_bytes());
    attribute(&mut out, TCA_FQ_HORIZON, &horizon_us.to_ne_bytes());
    attribute(&mut out, TCA_FQ_HORIZON_DROP, &[0u8]);
    out
}

/// The inverse CDF of the standard normal distribution at `DIST_SIZE` evenly spaced points,
/// scaled by `DIST_SCALE` and clamped to ±4σ: the table netem samples its delay from
/// (TCA_NETEM_DELAY_DIST), and the EDT classifier too.
pub fn normal_table() -> Vec<i16> {
    let size = faultd_common::DIST_SIZE as usize;
    (0..size)
        .map(|i| {
            let p = (i as f64 + 0.5) / size as f64;
            let z = inverse_normal_cdf(p).clamp(-4.0, 4.0);
            (z * faultd_common::DIST_SCALE as f64)
                .round()
                .clamp(-32767.0, 32767.0) as i16
        })
        .collect()
}

/// Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9).
fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    const LOW: f64 = 0.02425;
    if p < LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -inverse_normal_cdf(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_ne_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        attribute(&mut out, 15, &[7]);
        assert_eq!(out.len(), 8);
        assert_eq!(u16::from_ne_bytes([out[0], out[1]]), 5);
        assert_eq!(u16::from_ne_bytes([out[2], out[3]]), 15);
        assert_eq!(out[4], 7);
    }

    #[test]
    fn netem_options_start_with_the_legacy_struct_then_64_bit_times() {
        let table = normal_table();
        let out = netem_options(100_000_000, 20_000_000, 0, 5000, &table);
        assert_eq!(u32_at(&out, 0), (100_000_000 / 64) as u32);
        assert_eq!(u32_at(&out, 4), 5000);
        assert_eq!(u32_at(&out, 20), (20_000_000 / 64) as u32);
        // CORR, DELAY_DIST (8192 bytes of table), LATENCY64, JITTER64.
        assert_eq!(out.len(), 24 + 16 + (4 + 8192) + 12 + 12);
        let latency = &out[out.len() - 24..out.len() - 12];
        assert_eq!(u16::from_ne_bytes([latency[2], latency[3]]), 10);
        assert_eq!(
            i64::from_ne_bytes(latency[4..12].try_into().unwrap()),
            100_000_000
        );
        // No jitter: no table.
        assert_eq!(netem_options(1, 0, 0, 1, &table).len(), 24 + 16 + 12 + 12);
    }

    #[test]
    fn htb_class_rates_above_4_gbytes_use_the_64_bit_attributes() {
        let small = htb_class_options(262_144, 16_384);
        assert_eq!(small.len(), 4 + 44);
        assert_eq!(u32_at(&small, 4 + 8), 262_144);
        // buffer: 16 KiB at 256 KiB/s is 62.5 ms, in 64 ns ticks.
        assert_eq!(u32_at(&small, 4 + 24), (62_500_000 / 64) as u32);
        let big = htb_class_options(10_000_000_000, 1 << 20);
        assert_eq!(u32_at(&big, 4 + 8), u32::MAX);
        assert_eq!(big.len(), 4 + 44 + 12 + 12);
    }

    #[test]
    fn the_normal_table_is_symmetric_with_unit_spread() {
        let table = normal_table();
        assert_eq!(table.len(), faultd_common::DIST_SIZE as usize);
        assert_eq!(table[0], -table[table.len() - 1]);
        assert!(table.windows(2).all(|w| w[0] <= w[1]));
        let scale = faultd_common::DIST_SCALE as f64;
        let n = table.len() as f64;
        let mean = table.iter().map(|&v| f64::from(v) / scale).sum::<f64>() / n;
        let var = table
            .iter()
            .map(|&v| (f64::from(v) / scale - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.01, "sd {}", var.sqrt());
    }

    #[test]
    fn handles_print_like_tc() {
        assert_eq!(handle(0xFD01_0003), "fd01:3");
        assert_eq!(handle(TC_H_ROOT), "ffff:ffff");
    }
}
