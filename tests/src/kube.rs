//! A kubelet-like cgroup tree under a cgroup of the test's own: pods under `kubepods.slice`
//! (systemd driver) or `kubepods` (cgroupfs driver) in their QoS class, containers in the scopes
//! the runtimes create. faultd started with `--cgroup-root` at the tree's root finds them as it
//! finds a node's pods.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::process::{poll, signal};
use crate::uniq::uniq;

/// The kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class: guaranteed pods sit directly under kubepods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Container runtimes, by the scope name they give a container (cgroupfs: the bare id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
}

/// Field order is drop order: the nested cgroups go (in `Drop`) before the root.
pub struct KubeTree {
    /// Every cgroup created below the root, parents before children.
    created: Vec<PathBuf>,
    root: Cgroup,
}

pub struct Pod {
    pub uid: String,
    pub dir: PathBuf,
    pub driver: Driver,
}

impl KubeTree {
    pub fn new() -> KubeTree {
        KubeTree {
            created: Vec::new(),
            root: Cgroup::new(),
        }
    }

    /// The directory to give faultd as `--cgroup-root`.
    pub fn root(&self) -> &Path {
        self.root.dir()
    }

    fn mkdir(&mut self, relative: &Path) -> PathBuf {
        let mut dir = self.root.dir().to_path_buf();
        for part in relative.components() {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                self.created.push(dir.clone());
            }
        }
        dir
    }

    /// A pod with a fresh uid.
    pub fn pod(&mut self, driver: Driver, qos: Qos) -> Pod {
        let uid = pod_uid();
        let relative = pod_cgroup(driver, qos, &uid);
        let dir = self.mkdir(Path::new(&relative));
        Pod { uid, dir, driver }
    }

    /// A container of `pod` with a fresh 64-hex-digit id: returns (id, its cgroup directory).
    pub fn container(&mut self, pod: &Pod, runtime: Runtime) -> (String, PathBuf) {
        let n = uniq().replace('-', "");
        let id = format!("{n:0>64}");
        let name = match (pod.driver, runtime) {
            (Driver::Cgroupfs, _) => id.clone(),
            (Driver::Systemd, Runtime::Containerd) => format!("cri-containerd-{id}.scope"),
            (Driver::Systemd, Runtime::Crio) => format!("crio-{id}.scope"),
            (Driver::Systemd, Runtime::Docker) => format!("docker-{id}.scope"),
        };
        let relative = pod
            .dir
            .strip_prefix(self.root.dir())
            .expect("the pod is in the tree")
            .join(name);
        (id, self.mkdir(&relative))
    }

    /// Kills what runs in a container's cgroup and removes it, as a runtime does when a
    /// container exits.
    pub fn remove_container(&mut self, dir: &Path) {
        empty_and_remove(dir);
        self.created.retain(|d| d != dir);
    }
}

/// A fresh pod uid, shaped as Kubernetes makes them (a version-4 UUID).
pub fn pod_uid() -> String {
    let n = uniq().replace('-', "");
    let n = format!("{n:0>12}");
    format!(
        "{}-4e5f-4a9b-8c1d-{}",
        &n[n.len() - 8..],
        &n[n.len() - 12..]
    )
}

/// Where the kubelet puts a pod's cgroup, relative to its cgroup root.
pub fn pod_cgroup(driver: Driver, qos: Qos, uid: &str) -> String {
    let u = uid.replace('-', "_");
    match (driver, qos) {
        (Driver::Systemd, Qos::Guaranteed) => format!("kubepods.slice/kubepods-pod{u}.slice"),
        (Driver::Systemd, Qos::Burstable) => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
        }
        (Driver::Systemd, Qos::BestEffort) => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
        }
        (Driver::Cgroupfs, Qos::Guaranteed) => format!("kubepods/pod{uid}"),
        (Driver::Cgroupfs, Qos::Burstable) => format!("kubepods/burstable/pod{uid}"),
        (Driver::Cgroupfs, Qos::BestEffort) => format!("kubepods/besteffort/pod{uid}"),
    }
}

impl Default for KubeTree {
    fn default() -> Self {
        KubeTree::new()
    }
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn empty_and_remove(dir: &Path) {
    let emptied = poll(Duration::from_secs(5), || {
        let pids = procs(dir);
        if pids.is_empty() {
            return Some(());
        }
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            pids.iter().for_each(|&pid| signal(pid, libc::SIGKILL));
        }
        None
    });
    if emptied.is_none() {
        eprintln!("warning: processes still in cgroup {}", dir.display());
    }
    let removed = poll(Duration::from_secs(5), || std::fs::remove_dir(dir).ok());
    if removed.is_none() {
        eprintln!("warning: could not remove cgroup {}", dir.display());
    }
}

impl Drop for KubeTree {
    fn drop(&mut self) {
        // Children before parents.
        for dir in self.created.iter().rev() {
            empty_and_remove(dir);
        }
    }
}
