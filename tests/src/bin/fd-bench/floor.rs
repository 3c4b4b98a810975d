//! The floor of a program's measured cost: an empty cgroup_skb program (`r0 = 1; exit`),
//! loaded by the bench itself and attached at the client's cgroup, measured with the same
//! kernel statistics as faultd's programs. What it costs a run is what the statistics and the
//! hook cost, whatever the program does: faultd's own figure is to be read against it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::Context;
use faultd_tests::bpf::prog_stats;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// The program's name, as bpftool lists it.
pub(super) const NAME: &str = "fdbench_empty";

fn bpf(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<i64> {
    let mut buf = [0u8; 128];
    buf[..attr.len()].copy_from_slice(attr);
    // SAFETY: bpf(2) reads a union bpf_attr of `buf.len()` bytes that lives across the call;
    // the pointers inside it point at buffers the caller keeps alive.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, buf.as_ptr(), buf.len() as libc::c_uint) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// The empty program, attached at a cgroup for ingress and egress while this value lives.
pub(super) struct EmptyProgram {
    prog: OwnedFd,
    cgroup: std::fs::File,
}

impl EmptyProgram {
    pub(super) fn attach(cgroup: &Path) -> anyhow::Result<EmptyProgram> {
        // r0 = 1 (pass); exit.
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        let mut name = [0u8; 16];
        name[..NAME.len()].copy_from_slice(NAME.as_bytes());
        let mut attr = Vec::with_capacity(72);
        attr.extend(BPF_PROG_TYPE_CGROUP_SKB.to_ne_bytes());
        attr.extend(2u32.to_ne_bytes());
        attr.extend((insns.as_ptr() as u64).to_ne_bytes());
        attr.extend((license.as_ptr() as u64).to_ne_bytes());
        attr.extend([0u8; 4 + 4 + 8 + 4 + 4]); // log_level, log_size, log_buf, kern_version, prog_flags
        attr.extend(name);
        let fd = bpf(BPF_PROG_LOAD, &attr).context("loading the empty program")?;
        // SAFETY: a new fd that nothing else owns.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cgroup =
            std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let program = EmptyProgram { prog, cgroup };
        for attach_type in [BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS] {
            bpf(
                BPF_PROG_ATTACH,
                &program.attr(attach_type, BPF_F_ALLOW_MULTI),
            )
            .context("attaching the empty program")?;
        }
        Ok(program)
    }

    fn attr(&self, attach_type: u32, flags: u32) -> Vec<u8> {
        let mut attr = Vec::with_capacity(16);
        attr.extend((self.cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr.extend((self.prog.as_raw_fd() as u32).to_ne_bytes());
        attr.extend(attach_type.to_ne_bytes());
        attr.extend(flags.to_ne_bytes());
        attr
    }

    /// Its runs and run time so far.
    pub(super) fn runs(&self) -> (u64, u64) {
        prog_stats(std::process::id())
            .into_iter()
            .filter(|p| p.name == NAME)
            .fold((0, 0), |(n, t), p| (n + p.run_cnt, t + p.run_time_ns))
    }
}

impl Drop for EmptyProgram {
    fn drop(&mut self) {
        for attach_type in [BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS] {
            if let Err(e) = bpf(BPF_PROG_DETACH, &self.attr(attach_type, 0)) {
                eprintln!("warning: detaching the empty program: {e}");
            }
        }
    }
}
