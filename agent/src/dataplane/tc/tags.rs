//! Ownership of what tc cannot tie to a process: each instance claims a tag (`0x7a00 + n`,
//! lock file `<TAG_LOCK_DIR>/<tag>.lock`, flock held for life), gives its root qdiscs the handle
//! `<tag>:` and its netlink filters the priority `<tag>`, and at start removes what carries a
//! tag whose lock nobody holds.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::dataplane::rtnl::{self, CLSACT_EGRESS, CLSACT_HANDLE, Rtnl, TC_H_ROOT};
use crate::dataplane::{DataplaneError, TcError};

/// First tag; an instance's tag is the major number of its root qdiscs and the priority of its
/// netlink filters. Below 0x8000, where the kernel's automatic handles start.
pub const TAG_BASE: u16 = 0x7a00;
pub const TAG_COUNT: u16 = 256;
/// Where instances hold the lock of their tag.
pub const TAG_LOCK_DIR: &str = "/run/faultd/tc";

pub(super) fn lock_path(dir: &Path, tag: u16) -> PathBuf {
    dir.join(format!("{tag:04x}.lock"))
}

/// Takes `path`'s flock without waiting; None if another process holds it.
pub(super) fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(Some(file))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// Claims the first free tag.
pub(super) fn claim_tag(dir: &Path) -> Result<(u16, File), DataplaneError> {
    let fail = |source: std::io::Error| TcError::Path {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(fail)?;
    for tag in TAG_BASE..TAG_BASE + TAG_COUNT {
        if let Some(lock) = try_lock(&lock_path(dir, tag)).map_err(fail)? {
            return Ok((tag, lock));
        }
    }
    Err(TcError::TagsHeld {
        count: TAG_COUNT,
        dir: dir.to_path_buf(),
    }
    .into())
}

/// Whether `priority`/`major` is a faultd tag.
pub(super) fn is_tag(value: u32) -> bool {
    (u32::from(TAG_BASE)..u32::from(TAG_BASE + TAG_COUNT)).contains(&value)
}

/// Removes the root qdiscs and netlink filters of dead instances (its own tag's included: the
/// instance that held it before is gone). Logs what it cannot do:
/// an agent that cannot sweep can still shape.
pub(super) fn sweep(rtnl: &mut Rtnl, own: u16) {
    let dir = Path::new(TAG_LOCK_DIR);
    // Locks of dead tags, held while sweeping so no new instance claims them meanwhile.
    let mut dead: HashMap<u32, Option<File>> = HashMap::new();
    let mut is_dead = |tag: u32| -> bool {
        if !is_tag(tag) {
            return false;
        }
        // This instance has just claimed its tag: what carries it is a dead holder's.
        if tag == u32::from(own) {
            return true;
        }
        dead.entry(tag)
            .or_insert_with(|| try_lock(&lock_path(dir, tag as u16)).ok().flatten())
            .is_some()
    };
    match rtnl.qdiscs() {
        Ok(qdiscs) => {
            for q in qdiscs.iter().filter(|q| q.parent == TC_H_ROOT) {
                if is_dead(q.handle >> 16) {
                    match rtnl.delete_qdisc(q.ifindex, q.handle, TC_H_ROOT) {
                        Ok(()) => {
                            tracing::info!(ifindex = q.ifindex, handle = %rtnl::handle(q.handle),
                            "removed a dead faultd's root qdisc")
                        }
                        Err(e) => tracing::warn!(error = %e, "sweeping a dead faultd's qdisc"),
                    }
                }
            }
            let clsacts: Vec<u32> = qdiscs
                .iter()
                .filter(|q| q.kind == "clsact")
                .map(|q| q.ifindex)
                .collect();
            for ifindex in clsacts {
                let Ok(filters) = rtnl.filters(ifindex, CLSACT_EGRESS) else {
                    continue;
                };
                let mut swept = false;
                let mut priorities: Vec<u16> = filters.iter().map(|f| f.priority()).collect();
                priorities.dedup();
                for priority in priorities {
                    if is_dead(u32::from(priority)) {
                        match rtnl.delete_filters(ifindex, CLSACT_EGRESS, priority) {
                            Ok(()) => {
                                swept = true;
                                tracing::info!(
                                    ifindex,
                                    priority,
                                    "removed a dead faultd's tc filter"
                                );
                            }
                            Err(e) => tracing::warn!(error = %e, "sweeping a dead faultd's filter"),
                        }
                    }
                }
                // The clsact a dead instance added goes once nothing else is attached to it.
                let empty = |rtnl: &mut Rtnl, parent| {
                    rtnl.filters(ifindex, parent).is_ok_and(|f| f.is_empty())
                };
                if swept
                    && empty(rtnl, CLSACT_EGRESS)
                    && empty(rtnl, 0xFFFF_FFF2)
                    && let Err(e) = rtnl.delete_qdisc(ifindex, CLSACT_HANDLE, 0xFFFF_FFF1)
                {
                    tracing::warn!(error = %e, "removing a dead faultd's clsact");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing qdiscs to sweep"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_claimed_once_and_freed_with_the_holder() {
        let dir = std::env::temp_dir().join(format!("faultd-tags-{}", std::process::id()));
        let (first, lock) = claim_tag(&dir).unwrap();
        assert_eq!(first, TAG_BASE);
        let (second, _lock2) = claim_tag(&dir).unwrap();
        assert_eq!(second, TAG_BASE + 1);
        // Held: not dead.
        assert!(try_lock(&lock_path(&dir, first)).unwrap().is_none());
        drop(lock);
        assert!(try_lock(&lock_path(&dir, first)).unwrap().is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_tag_range_is_swept() {
        assert!(is_tag(0x7a00));
        assert!(is_tag(0x7aff));
        assert!(!is_tag(0x7b00));
        assert!(!is_tag(0x8001));
        assert!(!is_tag(1));
    }
}
