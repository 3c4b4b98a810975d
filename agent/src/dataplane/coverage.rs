//! Where the cgroup programs must be attached: at every cgroup that holds faults and has no
//! ancestor holding faults. Programs attached at a cgroup run for its whole subtree (cgroups
//! created below it later included), so an attachment below another would only run the same
//! programs twice on the same packet; and a cgroup no fault covers runs none.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The cgroups that hold faults, by cgroup id.
#[derive(Debug, Default)]
pub struct Coverage {
    scopes: HashMap<u64, Held>,
}

#[derive(Debug)]
struct Held {
    dir: PathBuf,
    faults: usize,
}

impl Coverage {
    /// One more fault on the cgroup `id` at `dir`.
    pub fn add(&mut self, id: u64, dir: &Path) {
        self.scopes
            .entry(id)
            .or_insert_with(|| Held {
                dir: dir.to_path_buf(),
                faults: 0,
            })
            .faults += 1;
    }

    /// One fault less on the cgroup `id`; unknown ids are ignored.
    pub fn remove(&mut self, id: u64) {
        if let Some(held) = self.scopes.get_mut(&id) {
            held.faults = held.faults.saturating_sub(1);
            if held.faults == 0 {
                self.scopes.remove(&id);
            }
        }
    }

    /// Where the programs belong: each cgroup holding faults that no other one holding faults
    /// contains.
    pub fn wanted(&self) -> HashMap<u64, &Path> {
        let dirs: HashSet<&Path> = self.scopes.values().map(|h| h.dir.as_path()).collect();
        self.scopes
            .iter()
            .filter(|(_, held)| !held.dir.ancestors().skip(1).any(|a| dirs.contains(a)))
            .map(|(id, held)| (*id, held.dir.as_path()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(coverage: &Coverage) -> Vec<u64> {
        let mut ids: Vec<u64> = coverage.wanted().into_keys().collect();
        ids.sort();
        ids
    }

    #[test]
    fn attaches_at_the_outermost_faulted_cgroups_only() {
        let mut c = Coverage::default();
        c.add(2, Path::new("/cg/kubepods/pod-a/c1"));
        c.add(3, Path::new("/cg/kubepods/pod-b"));
        assert_eq!(wanted(&c), [2, 3]);
        // A fault on the pod moves the attachment up from its container.
        c.add(1, Path::new("/cg/kubepods/pod-a"));
        assert_eq!(wanted(&c), [1, 3]);
        // A sibling whose name only starts like the pod's is not inside it.
        c.add(4, Path::new("/cg/kubepods/pod-ab"));
        assert_eq!(wanted(&c), [1, 3, 4]);
        // The host scope covers everything.
        c.add(9, Path::new("/cg"));
        assert_eq!(wanted(&c), [9]);
        c.remove(9);
        assert_eq!(wanted(&c), [1, 3, 4]);
    }

    #[test]
    fn counts_faults_per_cgroup() {
        let mut c = Coverage::default();
        c.add(1, Path::new("/cg/a"));
        c.add(1, Path::new("/cg/a"));
        c.add(2, Path::new("/cg/a/b"));
        c.remove(1);
        assert_eq!(wanted(&c), [1]);
        c.remove(1);
        assert_eq!(wanted(&c), [2]);
        c.remove(2);
        c.remove(2);
        assert!(c.is_empty());
        assert!(c.wanted().is_empty());
    }
}
