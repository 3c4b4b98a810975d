//! Harness for faultd's privileged end-to-end tests.
//!
//! Every resource a test creates has a unique name and is removed by its guard's `Drop`, also
//! when the test panics: network namespaces ([`netns`]), cgroups ([`cgroup`]), Redis and
//! PostgreSQL inside a namespace ([`servers`]), the faultd process and the faultctl CLI
//! ([`faultd`]). [`workload`] runs real clients and measurements inside a cgroup and a
//! namespace through the `fd-probe` helper binary; [`api`] builds requests; [`bpf`] reads what
//! the kernel holds; [`pki`] makes certificates for mTLS; [`http`] scrapes faultd's metrics
//! endpoint; [`cri`] is a node of the test's own, a real containerd running pods through the
//! CRI. Nothing here skips: a missing tool or privilege is a panic that says what
//! is missing.

pub mod api;
pub mod bpf;
pub mod cgroup;
pub mod clients;
pub mod cri;
pub mod faultd;
pub mod http;
pub mod kube;
pub mod netns;
pub mod pki;
pub mod process;
pub mod scene;
pub mod servers;
pub mod sys;
pub mod tempdir;
pub mod uniq;
pub mod workload;

pub use cgroup::Cgroup;
pub use faultd::{Faultctl, Faultd, FaultdOptions};
pub use netns::NetNs;
pub use scene::RedisScene;
pub use servers::{Postgres, Redis};
pub use tempdir::TempDir;
pub use workload::Workload;

/// The `fd-probe` helper built with this crate. Expands in the calling integration test, where
/// Cargo sets `CARGO_BIN_EXE_fd-probe`.
#[macro_export]
macro_rules! fd_probe {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_fd-probe"))
    };
}

/// The `fd-keepalive` helper built with this crate (a KeepAlive stream held by a process the
/// test can SIGKILL).
#[macro_export]
macro_rules! fd_keepalive {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_fd-keepalive"))
    };
}

/// Panics unless we run as root: these tests create namespaces, cgroups and BPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests need root (network namespaces, cgroups, BPF); run them with `cargo xtask test`"
    );
}
