//! faultd: per-node network fault injection under leases.
//!
//! Rooms: `fault` (domain model and validation), `lease` (lease table), `engine` (applies and
//! reverts faults, owns the kernel resources), `dataplane` (kernel mechanisms), `target`
//! (scope resolution), `api` (gRPC: conversion and status mapping only), `caps` (kernel probe).

pub mod api;
pub mod caps;
pub mod client;
pub mod config;
pub mod dataplane;
pub mod duration;
pub mod engine;
pub mod fault;
pub mod instance;
pub mod lease;
pub mod target;

/// The eBPF object built by build.rs (empty when built without the eBPF toolchain).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/faultd-ebpf"));
