//! The BPF programs, links and maps a process holds, and whether the kernel still has them.
//!
//! Ownership comes from the process's file descriptors (`/proc/PID/fdinfo` names the
//! `prog_id`, `map_id` or `link_id` behind each BPF fd) and, where bpftool was built with pid
//! support, from the `pids` of `bpftool -j … show`. What exists comes from bpftool, and so do
//! the programs' run statistics while [`StatsEnabled`] holds `kernel.bpf_stats_enabled` on.

use std::collections::BTreeSet;
use std::process::Command;

use crate::process::run_ok;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Prog,
    Link,
    Map,
}

impl Kind {
    fn bpftool(self) -> &'static str {
        match self {
            Kind::Prog => "prog",
            Kind::Link => "link",
            Kind::Map => "map",
        }
    }

    /// The anon inode behind the fd, and the fdinfo key with the object's id.
    fn fd(self) -> (&'static str, &'static str) {
        match self {
            Kind::Prog => ("anon_inode:bpf-prog", "prog_id:"),
            Kind::Link => ("anon_inode:bpf_link", "link_id:"),
            Kind::Map => ("anon_inode:bpf-map", "map_id:"),
        }
    }
}

/// BPF objects of one kind: id and name ("" for links).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    pub objects: Vec<(u64, String)>,
}

impl Owned {
    pub fn ids(&self) -> BTreeSet<u64> {
        self.objects.iter().map(|(id, _)| *id).collect()
    }

    pub fn names(&self) -> BTreeSet<&str> {
        self.objects.iter().map(|(_, name)| name.as_str()).collect()
    }
}

/// Programs, links and maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfObjects {
    pub progs: Owned,
    pub links: Owned,
    pub maps: Owned,
}

impl BpfObjects {
    /// What process `pid` holds now.
    pub fn owned_by(pid: u32) -> BpfObjects {
        let fds = fd_ids(pid);
        let owned = |kind: Kind| {
            let mine: BTreeSet<u64> = fds
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, id)| *id)
                .collect();
            Owned {
                objects: list(kind)
                    .into_iter()
                    .filter(|(id, _, pids)| mine.contains(id) || pids.contains(&pid))
                    .map(|(id, name, _)| (id, name))
                    .collect(),
            }
        };
        BpfObjects {
            progs: owned(Kind::Prog),
            links: owned(Kind::Link),
            maps: owned(Kind::Map),
        }
    }

    /// Which of these objects the kernel still lists (whoever holds them now).
    pub fn still_present(&self) -> BpfObjects {
        let keep = |kind: Kind, mine: &Owned| {
            let ids = mine.ids();
            Owned {
                objects: list(kind)
                    .into_iter()
                    .filter(|(id, _, _)| ids.contains(id))
                    .map(|(id, name, _)| (id, name))
                    .collect(),
            }
        };
        BpfObjects {
            progs: keep(Kind::Prog, &self.progs),
            links: keep(Kind::Link, &self.links),
            maps: keep(Kind::Map, &self.maps),
        }
    }

    /// Waits up to `timeout` for the kernel to free these objects (it does so a moment after
    /// their last reference goes, RCU); what is still there then, or None.
    pub fn left_after(&self, timeout: std::time::Duration) -> Option<BpfObjects> {
        let gone = crate::process::poll(timeout, || self.still_present().is_empty().then_some(()));
        match gone {
            Some(()) => None,
            None => Some(self.still_present()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.progs.objects.is_empty()
            && self.links.objects.is_empty()
            && self.maps.objects.is_empty()
    }
}

/// The kernel's run statistics of BPF programs (`run_cnt`, `run_time_ns`), on while this value
/// lives. It holds a BPF_ENABLE_STATS fd: the kernel counts its holders, so neither the
/// `kernel.bpf_stats_enabled` sysctl nor another user turning statistics off affects it, and
/// nothing needs restoring afterwards.
pub struct RunStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunStats {
    /// Panics if the kernel refuses (not root, or older than Linux 5.8).
    pub fn enable() -> RunStats {
        RunStats::try_enable().unwrap_or_else(|e| {
            panic!("bpf(BPF_ENABLE_STATS) failed: {e} (needs root and Linux 5.8 or later)")
        })
    }

    pub fn try_enable() -> std::io::Result<RunStats> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // union bpf_attr's enable_stats member: one u32, the rest of the union zero.
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr.len()` bytes of a buffer that lives across the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Ok(RunStats { _fd: fd })
    }
}

/// How often a program ran and for how long, summed over the programs of one name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    pub count: u64,
    pub ns: u64,
}

impl Runs {
    pub fn ns_per_run(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.ns as f64 / self.count as f64
        }
    }
}

/// The runs of every program process `pid` holds, summed, from its fds' fdinfo (`run_cnt`,
/// `run_time_ns`, with `RunStats` on): no bpftool needed (the kernel matrix guests have none).
pub fn fd_runs(pid: u32) -> Runs {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    let mut runs = Runs::default();
    for entry in entries.flatten() {
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == Kind::Prog.fd().0);
        if !is_prog {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue;
        };
        let field = |key: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        runs.count += field("run_cnt:");
        runs.ns += field("run_time_ns:");
    }
    runs
}

/// How many BPF links process `pid` holds (by its fds; no bpftool needed).
pub fn links_held(pid: u32) -> usize {
    fd_ids(pid)
        .into_iter()
        .filter(|(kind, _)| *kind == Kind::Link)
        .count()
}

/// What each program ran between two readings of `prog_stats`, summed by name; matched by
/// program id, so a program loaded in between counts from 0. Only programs that ran.
pub fn runs_between(
    before: &[ProgStats],
    after: &[ProgStats],
) -> std::collections::BTreeMap<String, Runs> {
    let mut runs = std::collections::BTreeMap::<String, Runs>::new();
    for prog in after {
        let (count, ns) = before
            .iter()
            .find(|p| p.id == prog.id)
            .map_or((0, 0), |p| (p.run_cnt, p.run_time_ns));
        let entry = runs.entry(prog.name.clone()).or_default();
        entry.count += prog.run_cnt.saturating_sub(count);
        entry.ns += prog.run_time_ns.saturating_sub(ns);
    }
    runs.retain(|_, r| r.count > 0);
    runs
}

/// (kind, id) of every BPF fd of `pid`.
fn fd_ids(pid: u32) -> Vec<(Kind, u64)> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(kind) = [Kind::Prog, Kind::Link, Kind::Map]
            .into_iter()
            .find(|k| k.fd().0 == target)
        else {
            continue;
        };
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue;
        };
        let key = kind.fd().1;
        if let Some(id) = text
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push((kind, id));
        }
    }
    ids
}

/// `bpftool -j <kind> show`: one JSON object per object.
fn show(kind: Kind) -> Vec<serde_json::Value> {
    let out = run_ok(Command::new("bpftool").args(["-j", kind.bpftool(), "show"]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool -j {} show: not JSON ({e}): {}",
            kind.bpftool(),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    match json {
        serde_json::Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// `bpftool -j <kind> show` as (id, name, owner pids).
fn list(kind: Kind) -> Vec<(u64, String, Vec<u32>)> {
    show(kind)
        .iter()
        .filter_map(|item| Some((item.get("id")?.as_u64()?, name(item), pids(item))))
        .collect()
}

fn name(item: &serde_json::Value) -> String {
    item.get("name")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The `pids` bpftool lists for an object (empty where bpftool was built without them).
fn pids(item: &serde_json::Value) -> Vec<u32> {
    item.get("pids")
        .and_then(|p| p.as_array())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("pid")?.as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// One program's run statistics: how often it ran and for how long in all, since it was loaded
/// (counted only while the statistics are on: see [`RunStats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgStats {
    pub id: u64,
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The programs process `pid` holds, with their run statistics now.
pub fn prog_stats(pid: u32) -> Vec<ProgStats> {
    let mine: BTreeSet<u64> = fd_ids(pid)
        .into_iter()
        .filter(|(kind, _)| *kind == Kind::Prog)
        .map(|(_, id)| id)
        .collect();
    let count = |item: &serde_json::Value, key: &str| {
        item.get(key).and_then(|v| v.as_u64()).unwrap_or_default()
    };
    show(Kind::Prog)
        .iter()
        .filter_map(|item| {
            let id = item.get("id")?.as_u64()?;
            (mine.contains(&id) || pids(item).contains(&pid)).then(|| ProgStats {
                id,
                name: name(item),
                run_cnt: count(item, "run_cnt"),
                run_time_ns: count(item, "run_time_ns"),
            })
        })
        .collect()
}

/// The entries of the map `name` that process `pid` holds, as (key, value) bytes, sorted.
/// Panics if the process holds no such map.
pub fn map_entries(pid: u32, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let owned = BpfObjects::owned_by(pid);
    let Some((id, _)) = owned.maps.objects.iter().find(|(_, n)| n == name) else {
        panic!("process {pid} holds no BPF map named {name}: {owned:?}");
    };
    let out = run_ok(Command::new("bpftool").args(["-j", "map", "dump", "id", &id.to_string()]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool map dump id {id}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let bytes = |value: &serde_json::Value| -> Vec<u8> {
        value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|b| b.as_str())
                    .filter_map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = json
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| (bytes(&item["key"]), bytes(&item["value"])))
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries
}
