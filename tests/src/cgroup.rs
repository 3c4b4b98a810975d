//! The cgroup v2 root and cgroups of the test's own below it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{poll, signal};
use crate::uniq::uniq;

/// Where cgroup2 is mounted (on a hybrid layout `/sys/fs/cgroup/unified`), found the way
/// faultd finds it.
pub fn cgroup2_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        faultd::target::CgroupRoot::detect()
            .unwrap_or_else(|e| panic!("{e}: faultd and these tests need cgroup v2"))
            .path()
            .to_path_buf()
    })
}

/// A cgroup `faultd-test-<uniq>` of the test's own, directly below the cgroup v2 root or below
/// another one of the test's.
pub struct Cgroup {
    path: String,
    dir: PathBuf,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        crate::require_root();
        let name = format!("faultd-test-{}", uniq());
        let dir = cgroup2_root().join(&name);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Cgroup {
            path: format!("/{name}"),
            dir,
        }
    }

    /// A cgroup `faultd-test-<uniq>` below this one (drop it before its parent).
    pub fn child(&self) -> Cgroup {
        let name = format!("faultd-test-{}", uniq());
        let dir = self.dir.join(&name);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Cgroup {
            path: format!("{}/{name}", self.path),
            dir,
        }
    }

    /// The path relative to the cgroup v2 root, as faultd takes it: `/faultd-test-…`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The directory in the cgroup file system.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup id (the inode number of its directory), as BPF's `bpf_skb_cgroup_id` sees it.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.dir)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.dir.display()))
            .ino()
    }

    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Cgroup::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let kill = self.dir.join("cgroup.kill");
        let emptied = poll(Duration::from_secs(5), || {
            let procs = self.procs();
            if procs.is_empty() {
                return Some(());
            }
            if std::fs::write(&kill, "1").is_err() {
                procs.iter().for_each(|&pid| signal(pid, libc::SIGKILL));
            }
            None
        });
        if emptied.is_none() {
            eprintln!(
                "warning: processes still in cgroup {}: {:?}",
                self.dir.display(),
                self.procs()
            );
        }
        // A killed process leaves the cgroup a moment after it is gone from cgroup.procs.
        let removed = poll(Duration::from_secs(5), || {
            std::fs::remove_dir(&self.dir).ok()
        });
        if removed.is_none() {
            eprintln!("warning: could not remove cgroup {}", self.dir.display());
        }
    }
}
