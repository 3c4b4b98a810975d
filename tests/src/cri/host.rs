//! What the test node needs of the host around containerd: the test venv's Python, a free
//! bridge name and subnet, and the sweep of what containerd, its shims and runc leave behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::read;
use crate::process::{output, poll};
use crate::uniq::uniq;

/// The Python of the test venv (`FAULTD_TEST_PYTHON`, set by `cargo xtask test`): containers
/// run it from the host, mounted read-only.
pub(super) fn test_python() -> PathBuf {
    let python = PathBuf::from(std::env::var_os("FAULTD_TEST_PYTHON").unwrap_or_else(|| {
        panic!("set FAULTD_TEST_PYTHON to the test venv's python (cargo xtask test does)")
    }));
    assert!(
        python.is_absolute() && python.exists(),
        "FAULTD_TEST_PYTHON={} should be the absolute path of the test venv's python",
        python.display()
    );
    python
}

/// The venv of `python` (`<venv>/bin/python3`) and, unless it is under /usr, the installation
/// its `pyvenv.cfg` names as `home` (`<prefix>/bin`).
pub(super) fn python_dirs(python: &Path) -> Vec<PathBuf> {
    let venv = python
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in a venv's bin/", python.display()))
        .to_path_buf();
    let cfg = venv.join("pyvenv.cfg");
    let home = read(&cfg)
        .lines()
        .find_map(|line| Some(line.split_once('=')?).filter(|(k, _)| k.trim() == "home"))
        .map(|(_, v)| PathBuf::from(v.trim()))
        .unwrap_or_else(|| panic!("no home in {}", cfg.display()));
    let prefix = home.parent().unwrap_or(&home).to_path_buf();
    let mut dirs = vec![venv];
    if !prefix.starts_with("/usr") {
        dirs.push(prefix);
    }
    dirs
}

/// `fdc<6 hex digits>`, a name no link has: the bridge plugin would join an existing bridge,
/// and teardown deletes this one.
pub(super) fn free_bridge_name() -> String {
    (0..16)
        .map(|_| {
            let id = uniq();
            format!("fdc{}", id.rsplit('-').next().expect("uniq has parts"))
        })
        .find(|name| {
            !output(Command::new("ip").args(["link", "show", "dev", name]))
                .status
                .success()
        })
        .expect("a free bridge name")
}

/// A /24 in 10.213.0.0/16 that no route and no address of the host uses.
pub(super) fn free_subnet() -> String {
    let routes = String::from_utf8_lossy(&output(Command::new("ip").args(["-4", "route"])).stdout)
        .into_owned()
        + &String::from_utf8_lossy(&output(Command::new("ip").args(["-4", "addr"])).stdout);
    let start = std::process::id() as usize;
    (0..256)
        .map(|i| 16 + (start + i * 7) % 224)
        .map(|n| format!("10.213.{n}."))
        .find(|prefix| !routes.contains(prefix.as_str()))
        .map(|prefix| format!("{prefix}0/24"))
        .expect("a free /24 in 10.213.0.0/16")
}

/// Pids whose command line contains `needle`.
pub(super) fn processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("containerd-shim") && cmdline.contains(needle)).then_some(pid)
        })
        .collect()
}

/// Lazily unmounts whatever is still mounted below `dir` (overlay roots, netns bind mounts,
/// shm) if containerd could not.
pub(super) fn unmount_below(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        eprintln!("warning: unmounting {point} left behind");
        let c = std::ffi::CString::new(point).expect("no NUL in a mount point");
        // SAFETY: umount2 with a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "warning: umount {point}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Removes the tree `name` (children first) in every cgroup hierarchy: runc makes the pods'
/// cgroups in the v1 hierarchies of a hybrid layout too, and nobody but the kubelet removes a
/// pod's.
pub(super) fn remove_cgroups(name: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 3 || !fields[2].starts_with("cgroup") {
            continue;
        }
        let root = Path::new(fields[1]).join(name);
        if root.is_dir() {
            remove_tree(&root);
        }
    }
}

fn remove_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let removed = poll(Duration::from_secs(5), || std::fs::remove_dir(dir).ok());
    if removed.is_none() {
        eprintln!(
            "warning: could not remove cgroup {}: {}",
            dir.display(),
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default()
        );
    }
}
