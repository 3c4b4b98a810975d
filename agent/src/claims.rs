//! What each faultd instance on this host holds, so that instances do not overlap: a fault on
//! a key (scope, protocol, direction, port) that another live instance holds is refused, as
//! within one instance. Each instance's kernel state is its own (its BPF maps, its netfilter
//! chains), so without this two instances would both apply — and shadow each other.
//!
//! A directory shared by the instances of a host (`--instances-dir`) holds a file per
//! instance, `<instance id>.claims`, one line per key a fault holds: `<class> <scope id>
//! <protocol> <direction> <port> <fault id>`. Checking the others' files and rewriting one's
//! own happen under an exclusive lock of `<dir>/lock`, so two instances cannot both take a key.
//! Files of instances that are no longer alive (their beacon, `instance.rs`) are removed. The
//! same lock serializes what instances choose from the kernel's view (NFQUEUE mark ids and
//! queue numbers): `HostLock`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use faultd_common::RuleKey;

use crate::fault::FaultId;
use crate::instance::Instance;

/// Where instances meet unless told otherwise (not a state directory: those are one
/// instance's own).
pub const DEFAULT_DIR: &str = "/run/faultd-instances";
const LOCK: &str = "lock";
const SUFFIX: &str = ".claims";

/// Which faults exclude each other on a key: a delay or bandwidth may share a key with a
/// drop, reject or reset, not with another delay or bandwidth (as within one instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Rules,
    Shaped,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Self::Rules => "rules",
            Self::Shaped => "shaped",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another live instance holds one of the keys.
    #[error("faultd instance {instance} on this host holds fault {fault} there")]
    Held { instance: String, fault: FaultId },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ClaimError + '_ {
    move |source| ClaimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The lock that serializes the choices of the instances meeting in `dir` (their claims, and
/// what NFQUEUE picks from the kernel's view).
pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join(LOCK)
}

/// An exclusive lock of a file shared by the instances of a host, held until dropped.
pub struct HostLock {
    _file: File,
}

impl HostLock {
    /// Waits for the lock of `path` (created if missing).
    pub fn take(path: &Path) -> io::Result<HostLock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        loop {
            // SAFETY: flock on a descriptor we own; released when the file closes.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(HostLock { _file: file });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// This instance's claims, mirrored in its file.
pub struct Claims {
    dir: PathBuf,
    instance: String,
    held: BTreeMap<FaultId, (Class, Vec<RuleKey>)>,
}

impl Claims {
    /// Joins the instances of the host in `dir` (created if missing).
    pub fn open(dir: &Path, instance: &str) -> Result<Claims, ClaimError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let claims = Claims {
            dir: dir.to_path_buf(),
            instance: instance.to_owned(),
            held: BTreeMap::new(),
        };
        let _lock = claims.lock()?;
        claims.write()?;
        Ok(claims)
    }

    fn lock(&self) -> Result<HostLock, ClaimError> {
        let path = lock_path(&self.dir);
        HostLock::take(&path).map_err(io_error(&path))
    }

    fn file(&self) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", self.instance))
    }

    /// Takes `keys` for `fault`, or names the live instance (and its fault) that holds one.
    pub fn claim(&mut self, fault: &str, class: Class, keys: &[RuleKey]) -> Result<(), ClaimError> {
        let _lock = self.lock()?;
        let wanted: HashSet<KeyFields> = keys.iter().map(fields).collect();
        for (instance, text) in self.others()? {
            for line in text.lines() {
                let Some((line_class, key, holder)) = parse(line) else {
                    continue;
                };
                if line_class == class.name() && wanted.contains(&key) {
                    return Err(ClaimError::Held {
                        instance,
                        fault: holder.to_owned(),
                    });
                }
            }
        }
        self.held.insert(fault.to_owned(), (class, keys.to_vec()));
        if let Err(e) = self.write() {
            self.held.remove(fault);
            return Err(e);
        }
        Ok(())
    }

    /// Gives up what `fault` held.
    pub fn release(&mut self, fault: &str) {
        if self.held.remove(fault).is_none() {
            return;
        }
        let written = self.lock().and_then(|_lock| self.write());
        if let Err(e) = written {
            // Stale claims only refuse other instances' faults on those keys, until we exit.
            tracing::warn!(error = %e, fault, "releasing the fault's claims");
        }
    }

    /// The claims files of the other live instances, by instance id; those of dead ones go.
    fn others(&self) -> Result<Vec<(String, String)>, ClaimError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let path = entry.map_err(io_error(&self.dir))?.path();
            let Some(instance) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(SUFFIX))
                .filter(|id| Instance::is_id(id) && *id != self.instance)
                .map(str::to_owned)
            else {
                continue;
            };
            if !Instance::is_alive(&instance) {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::debug!(error = %e, path = %path.display(), "removing a dead instance's claims");
                }
                continue;
            }
            match fs::read_to_string(&path) {
                Ok(text) => found.push((instance, text)),
                // It exited between the listing and the read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(ClaimError::Io { path, source }),
            }
        }
        Ok(found)
    }

    /// Rewrites this instance's file (a new file renamed over the old: readers never see half).
    fn write(&self) -> Result<(), ClaimError> {
        let mut text = String::new();
        for (fault, (class, keys)) in &self.held {
            for key in keys {
                let (scope, protocol, direction, port) = fields(key);
                text.push_str(&format!(
                    "{} {scope} {protocol} {direction} {port} {fault}\n",
                    class.name()
                ));
            }
        }
        let path = self.file();
        let fresh = self.dir.join(format!("{}{SUFFIX}.new", self.instance));
        let mut file = File::create(&fresh).map_err(io_error(&fresh))?;
        file.write_all(text.as_bytes()).map_err(io_error(&fresh))?;
        fs::rename(&fresh, &path).map_err(io_error(&path))
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(self.file()) {
            tracing::debug!(error = %e, "removing this instance's claims");
        }
    }
}

/// A key as the claims files write it: scope id, protocol, direction, port.
type KeyFields = (u64, u8, u8, u16);

fn fields(key: &RuleKey) -> KeyFields {
    (key.scope_id, key.protocol, key.direction, key.port)
}

/// `<class> <scope> <protocol> <direction> <port> <fault>`.
fn parse(line: &str) -> Option<(&str, KeyFields, &str)> {
    let mut words = line.split_whitespace();
    let class = words.next()?;
    let key = (
        words.next()?.parse().ok()?,
        words.next()?.parse().ok()?,
        words.next()?.parse().ok()?,
        words.next()?.parse().ok()?,
    );
    Some((class, key, words.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_another_live_instance_holds_is_refused_until_it_lets_go() {
        let dir = std::env::temp_dir().join(format!("faultd-unit-claims-{}", std::process::id()));
        let (a, b) = (Instance::register().unwrap(), Instance::register().unwrap());
        let mut first = Claims::open(&dir, a.id()).unwrap();
        let mut second = Claims::open(&dir, b.id()).unwrap();
        let key = RuleKey::new(42, 6, 1, 6379);
        let other = RuleKey::new(42, 6, 1, 5432);
        first.claim("f1", Class::Shaped, &[key]).unwrap();

        match second.claim("f2", Class::Shaped, &[other, key]) {
            Err(ClaimError::Held { instance, fault }) => {
                assert_eq!((instance.as_str(), fault.as_str()), (a.id(), "f1"));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        second.claim("f3", Class::Rules, &[key]).unwrap();
        second.claim("f4", Class::Shaped, &[other]).unwrap();

        first.release("f1");
        second.claim("f2", Class::Shaped, &[key]).unwrap();
        // A dead instance's claims count for nothing (and its file goes).
        drop(a);
        let mut third = Claims::open(&dir, "0badc0de").unwrap();
        match third.claim("f5", Class::Shaped, &[key]) {
            Err(ClaimError::Held { instance, .. }) => assert_eq!(instance, b.id()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(second);
        drop(b);
        third.claim("f5", Class::Shaped, &[key]).unwrap();
        drop((first, third));
        fs::remove_dir_all(&dir).unwrap();
    }
}
