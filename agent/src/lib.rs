//! faultd: per-node network fault injection under leases.

/// The eBPF object built by build.rs (empty when built without the eBPF toolchain).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/faultd-ebpf"));

pub mod client;
pub mod duration;
