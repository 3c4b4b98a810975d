//! Network namespaces of a scope. Netfilter rules and NFQUEUE bindings live in one network
//! namespace each, while a cgroup's processes may sit in any: mechanisms that work per
//! namespace apply a fault in the namespaces of the cgroup's processes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An open handle on a network namespace: it stays valid (and the namespace alive) while held.
#[derive(Debug)]
pub struct NetNs {
    inode: u64,
    file: File,
    /// Where it was opened, for logs.
    path: PathBuf,
}

impl NetNs {
    pub fn open(path: &Path) -> io::Result<NetNs> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(NetNs {
            inode,
            file,
            path: path.to_path_buf(),
        })
    }

    /// The namespace of this thread (faultd's own unless the thread entered another).
    pub fn current() -> io::Result<NetNs> {
        NetNs::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// The namespace identity (the nsfs inode number, as `ip netns identify` and
    /// `/proc/PID/ns/net` show it).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread into this namespace. Only for dedicated OS threads and
    /// children between fork and exec (async-signal-safe: one syscall).
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: setns on a valid namespace fd.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Runs `work` on a new OS thread that entered the namespace at `path` (setns never touches a
/// tokio worker, and the thread ends with the call).
pub fn in_netns<T: Send>(path: &Path, work: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            NetNs::enter(ns.as_fd())?;
            Ok(work())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("network namespace thread panicked")))
    })
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The distinct network namespaces of the processes in `cgroup_dir` and the cgroups below it,
/// in a stable order. Processes that exit while we look are skipped.
pub fn of_cgroup(cgroup_dir: &Path) -> Vec<NetNs> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![cgroup_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(ns) = NetNs::open(&path) {
                    found.entry(ns.inode).or_insert(ns);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found.into_values().collect()
}

/// Finds a namespace by its inode among the named ones (`/run/netns`) and those of running
/// processes. None: it no longer exists (or nothing that we can see holds it).
pub fn find(inode: u64) -> Option<NetNs> {
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    let of_processes = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    named
        .map(|e| e.path())
        .chain(of_processes)
        .filter(|path| fs::metadata(path).is_ok_and(|m| m.ino() == inode))
        .find_map(|path| NetNs::open(&path).ok().filter(|ns| ns.inode == inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_namespace_is_found_by_inode() {
        let own = NetNs::current().expect("/proc/thread-self/ns/net");
        let again = find(own.inode()).expect("our own namespace is held by our process");
        assert_eq!(again.inode(), own.inode());
    }

    #[test]
    fn a_cgroup_tree_yields_each_namespace_once() {
        let dir = std::env::temp_dir().join(format!("faultd-netns-unit-{}", std::process::id()));
        fs::create_dir_all(dir.join("child")).unwrap();
        let me = std::process::id().to_string();
        fs::write(dir.join("cgroup.procs"), format!("{me}\n999999999\n")).unwrap();
        fs::write(dir.join("child/cgroup.procs"), &me).unwrap();
        let found = of_cgroup(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].inode(), NetNs::current().unwrap().inode());
    }
}
