//! faultd: per-node network fault injection under leases.
//!
//! Rooms: `fault` (domain model and validation), `lease` (lease table), `engine` (applies and
//! reverts faults, owns the kernel resources), `dataplane` (kernel mechanisms), `target`
//! (scope resolution), `api` (gRPC: conversion and status mapping only), `caps` (kernel probe;
//! `capability` is its line, a leaf the dataplane reports with),
//! `policy` (guardrails), `events` (what happens to faults, for Watch), `metrics` and `http`
//! (Prometheus and /healthz), `audit` (who did what).

pub mod api;
pub mod audit;
pub mod capability;
pub mod caps;
pub mod claims;
pub mod client;
pub mod config;
pub mod dataplane;
pub mod duration;
pub mod engine;
pub mod events;
pub mod fault;
pub mod http;
pub mod instance;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod target;

/// The eBPF object built by build.rs (empty when built without the eBPF toolchain).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/faultd-ebpf"));
