//! The kernel's clock: BPF programs and map entries measure deadlines in CLOCK_MONOTONIC
//! nanoseconds (`bpf_ktime_get_ns`), so every deadline user space hands the kernel is
//! converted here.

use tokio::time::Instant;

/// CLOCK_MONOTONIC nanoseconds (what `bpf_ktime_get_ns` returns) at `deadline`.
pub fn kernel_deadline(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    monotonic_now_ns().saturating_add(left.as_nanos() as u64)
}

pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
