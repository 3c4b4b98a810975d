//! A network namespace of the test's own, with loopback up.

use std::process::Command;
use std::time::Duration;

use crate::process::{output, poll, run_ok, signal};
use crate::uniq::uniq;

pub struct NetNs {
    name: String,
}

impl NetNs {
    /// `ip netns add fd-<uniq>` and `ip -n … link set lo up`.
    pub fn new() -> NetNs {
        crate::require_root();
        let name = format!("fd-{}", uniq());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        // From here on Drop deletes it, even if bringing lo up fails.
        let ns = NetNs { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> <program>`: runs as a plain member of the namespace (not in the
    /// test's workload cgroup).
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Pids of every process in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = output(Command::new("ip").args(["netns", "pids", &self.name]));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let emptied = poll(Duration::from_secs(5), || {
            let pids = self.pids();
            pids.iter().for_each(|&pid| signal(pid, libc::SIGKILL));
            pids.is_empty().then_some(())
        });
        if emptied.is_none() {
            eprintln!(
                "warning: processes still in netns {}: {:?}",
                self.name,
                self.pids()
            );
        }
        let out = output(Command::new("ip").args(["netns", "del", &self.name]));
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
