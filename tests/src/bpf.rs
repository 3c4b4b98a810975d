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

    pub fn is_empty(&self) -> bool {
        self.progs.objects.is_empty()
            && self.links.objects.is_empty()
            && self.maps.objects.is_empty()
    }
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
/// (counted only while the statistics are on: see [`StatsEnabled`]).
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

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` set to 1 while held, so the kernel counts every program's runs
/// and run time; the previous value is written back on drop, also when unwinding. The counting
/// itself costs each run two clock reads, so hold it only while measuring.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn new() -> std::io::Result<StatsEnabled> {
        let previous = std::fs::read_to_string(STATS_SYSCTL)?.trim().to_owned();
        std::fs::write(STATS_SYSCTL, "1")?;
        Ok(StatsEnabled { previous })
    }

    /// Whether the statistics are still on: the sysctl is machine-wide, and another process
    /// may have switched it off meanwhile.
    pub fn still_on(&self) -> bool {
        std::fs::read_to_string(STATS_SYSCTL).is_ok_and(|v| v.trim() == "1")
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!(
                "warning: restoring {STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
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
