//! The cgroup namespace faultd's iptables runs in. xt_cgroup resolves `-m cgroup --path` from
//! the root of the cgroup namespace of the process that installs the rule. A faultd in a cgroup
//! namespace of its own (as Kubernetes gives containers on cgroup v2) sees the node's pods
//! outside it, where no path names them; with the node's pid namespace (hostPID), it runs
//! iptables in the node's cgroup namespace instead (a process's `/proc/PID/ns/cgroup`, joined
//! between fork and exec) and names cgroups from the hierarchy's root, through a mount of the
//! whole hierarchy (the node's `/sys/fs/cgroup` that the DaemonSet mounts).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;

/// The inode number of the kernel's initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// The node's cgroup namespace when it is not faultd's own (and faultd may open it): iptables
/// then runs there. It is `/proc/1/ns/cgroup`, or, where the node's init does not let faultd
/// open it, that of the first process found in the kernel's initial cgroup namespace. None
/// when faultd shares it (a host service, or a container the runtime left in the node's cgroup
/// namespace) or sees no process in it (no hostPID): iptables runs in faultd's own.
pub fn iptables_namespace() -> Option<&'static File> {
    static NAMESPACE: OnceLock<Option<File>> = OnceLock::new();
    NAMESPACE
        .get_or_init(|| {
            let own = std::fs::metadata("/proc/self/ns/cgroup").ok()?;
            if own.ino() == INIT_CGROUP_NS_INO {
                return None;
            }
            let other = |path: &Path| {
                let file = File::open(path).ok()?;
                let meta = file.metadata().ok()?;
                ((meta.dev(), meta.ino()) != (own.dev(), own.ino())).then_some((file, meta))
            };
            let found = other(Path::new("/proc/1/ns/cgroup")).or_else(|| {
                std::fs::read_dir("/proc")
                    .ok()?
                    .flatten()
                    .find_map(|entry| {
                        let name = entry.file_name();
                        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                            return None;
                        }
                        let (file, meta) = other(&entry.path().join("ns/cgroup"))?;
                        (meta.ino() == INIT_CGROUP_NS_INO).then_some((file, meta))
                    })
            });
            let (file, _) = found?;
            tracing::info!(
                "faultd runs in a cgroup namespace of its own: iptables runs in the node's, with \
                 paths from the cgroup hierarchy's root"
            );
            Some(file)
        })
        .as_ref()
}

/// Whether `dir` is the root of a cgroup v2 hierarchy: the kernel gives every cgroup but the
/// root a `cgroup.events` file.
pub fn is_hierarchy_root(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file() && !dir.join("cgroup.events").exists()
}
