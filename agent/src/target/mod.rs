//! Resolving a scope to the cgroup v2 directory and id the kernel programs match on, and to
//! the network namespaces its processes use (`namespaces`). Kubernetes pods and containers are
//! found by the names the kubelet and the container runtimes give their cgroups (`pods`).

pub mod cgroupns;
pub mod interface;
pub mod namespaces;
pub mod pods;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::fault::{Invalid, Scope};

pub use crate::fault::ResolvedScope;

/// Why a scope does not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A malformed field, or a cgroup path or process that does not exist.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A pod or container this node does not run (NOT_FOUND), with where faultd looked.
    #[error(transparent)]
    NotFound(#[from] ScopeNotFound),
}

/// A scope this node does not have, with where faultd looked.
#[derive(Debug, thiserror::Error)]
pub enum ScopeNotFound {
    #[error(
        "fault.target.netns.interface: no interface {interface:?} in the network namespace \
         {netns}"
    )]
    Interface { netns: String, interface: String },
    /// `paths`: the cgroups a pod of this uid would have, below `root`.
    #[error(
        "fault.target.pod.uid: no pod {uid} on this node; looked for {} under {}",
        paths.join(", "),
        root.display()
    )]
    Pod {
        uid: String,
        paths: Vec<String>,
        root: PathBuf,
    },
    /// `names`: the cgroup names a container of this id would have, looked for below each
    /// directory of `searched`.
    #[error(
        "fault.target.container.id: no container {id} on this node; looked for {} (or {id} in \
         a pod's cgroup) below {}",
        names.join(", "),
        searched.join(" and ")
    )]
    Container {
        id: String,
        names: Vec<String>,
        searched: Vec<String>,
    },
    #[error("fault.target.container.id: {id} is outside the cgroup root")]
    OutsideRoot { id: String },
}

/// Why this host's cgroup v2 hierarchy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupRootError {
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    #[error("no cgroup2 file system is mounted (cgroup v2 is required)")]
    NotMounted,
    #[error(
        "{} is not a cgroup v2 directory, nor a hybrid layout's /sys/fs/cgroup (with a cgroup v2 \
         `unified` in it)",
        .0.display()
    )]
    NotCgroup2(PathBuf),
}

/// Resolves scopes; a trait so engine tests can run without cgroups.
pub trait Resolve: Send {
    fn resolve(&self, scope: &Scope) -> Result<ResolvedScope, ResolveError>;
}

/// The cgroup v2 hierarchy of this host.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    path: PathBuf,
}

impl CgroupRoot {
    /// The cgroup2 mount from /proc/self/mountinfo (`/sys/fs/cgroup` on unified hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones).
    pub fn detect() -> Result<Self, CgroupRootError> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(CgroupRootError::Mountinfo)?;
        mountinfo
            .lines()
            .find_map(cgroup2_mount_point)
            .map(|path| Self { path })
            .ok_or(CgroupRootError::NotMounted)
    }

    /// A cgroup v2 directory, or the `/sys/fs/cgroup` of a hybrid layout (cgroup v1
    /// controllers, v2 in its `unified`): the node's `/sys/fs/cgroup` that the DaemonSet
    /// mounts at `/host/sys/fs/cgroup` is either.
    pub fn at(path: impl Into<PathBuf>) -> Result<Self, CgroupRootError> {
        let path = path.into();
        if path.join("cgroup.procs").is_file() {
            return Ok(Self { path });
        }
        let unified = path.join("unified");
        if unified.join("cgroup.procs").is_file() {
            return Ok(Self { path: unified });
        }
        Err(CgroupRootError::NotCgroup2(path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cgroup(&self, relative: &str, field: &str) -> Result<ResolvedScope, Invalid> {
        let mut dir = self.path.clone();
        let mut clean = String::new();
        for component in Path::new(relative).components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => {
                    dir.push(part);
                    clean.push('/');
                    clean.push_str(&part.to_string_lossy());
                }
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(Invalid::new(
                        field,
                        format!("{relative:?} may not contain '..'"),
                    ));
                }
            }
        }
        let meta = fs::metadata(&dir).map_err(|_| {
            Invalid::new(
                field,
                format!(
                    "no cgroup {relative:?} under {} (create it first, or use a pid or host scope)",
                    self.path.display()
                ),
            )
        })?;
        if !meta.is_dir() || !dir.join("cgroup.procs").is_file() {
            return Err(Invalid::new(
                field,
                format!("{} is not a cgroup v2 directory", dir.display()),
            ));
        }
        Ok(ResolvedScope {
            cgroup_path: if clean.is_empty() { "/".into() } else { clean },
            cgroup_id: meta.ino(),
            dir,
        })
    }
}

impl Resolve for CgroupRoot {
    fn resolve(&self, scope: &Scope) -> Result<ResolvedScope, ResolveError> {
        Ok(match scope {
            Scope::Pod { uid } => return pods::pod(self, uid),
            Scope::Container { id } => return pods::container(self, id),
            Scope::Netns { path, interface } => return interface::resolve(path, interface),
            Scope::Host => self.cgroup("/", "fault.target.host")?,
            Scope::Cgroup { path } => {
                if path.trim().is_empty() {
                    return Err(Invalid::new(
                        "fault.target.cgroup.path",
                        "empty; use the host scope for the whole host",
                    )
                    .into());
                }
                self.cgroup(path, "fault.target.cgroup.path")?
            }
            Scope::Pid { pid } => {
                let field = "fault.target.pid.pid";
                if *pid == 0 {
                    return Err(Invalid::new(field, "0 is not a process id").into());
                }
                let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .map_err(|_| Invalid::new(field, format!("no process {pid}")))?;
                let path = text
                    .lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .ok_or_else(|| {
                        Invalid::new(field, format!("process {pid} has no cgroup v2 membership"))
                    })?;
                // The path is from the root of faultd's cgroup namespace, not from
                // --cgroup-root (which may be any directory of the hierarchy).
                let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
                    Invalid::new(field, format!("reading /proc/self/mountinfo: {e}"))
                })?;
                let relative = below_root(&mountinfo, path, &self.path).ok_or_else(|| {
                    Invalid::new(
                        field,
                        format!(
                            "process {pid}'s cgroup {path:?} is not under {}",
                            self.path.display()
                        ),
                    )
                })?;
                self.cgroup(&relative, field)?
            }
        })
    }
}

/// The cgroup `path`, as `/proc/PID/cgroup` names it to this process (from the root of its
/// cgroup namespace), as a path below `root`: found through a cgroup2 mount whose root holds
/// it. None when no mount under `root` shows it.
fn below_root(mountinfo: &str, path: &str, root: &Path) -> Option<String> {
    let path = Path::new(path);
    mountinfo.lines().find_map(|line| {
        let (mount_root, point) = cgroup2_mount(line)?;
        // Both are from faultd's cgroup namespace root, `/..` included when outside it.
        let below = path.strip_prefix(&mount_root).ok()?;
        if below.components().any(|c| c == Component::ParentDir) {
            return None;
        }
        let dir = point.join(below);
        let relative = dir.strip_prefix(root).ok()?;
        Some(format!("/{}", relative.display()))
    })
}

/// The path of the cgroup directory `dir` as the kernel resolves cgroup paths for this process
/// (from the root of its cgroup namespace), which is what xt_cgroup's `--path` takes. Not the
/// path below `--cgroup-root`: that may be any directory of the hierarchy (a kubelet's own
/// `--cgroup-root`, a tree of the tests), or a mount of another namespace's root. It is the
/// root of the cgroup2 mount holding `dir`, as mountinfo shows it, joined with `dir` below the
/// mount point.
///
/// When iptables runs in the node's cgroup namespace instead (`cgroupns`), the path is from the
/// hierarchy's root, found through a mount of the whole hierarchy.
pub fn namespace_path(dir: &Path) -> Result<String, NamespacePathError> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(NamespacePathError::Mountinfo)?;
    if cgroupns::iptables_namespace().is_some() {
        return hierarchy_path_in(&mountinfo, dir, cgroupns::is_hierarchy_root);
    }
    namespace_path_in(&mountinfo, dir)
}

/// The path of `dir` from its hierarchy's root, when a cgroup2 mount holding it shows the
/// whole hierarchy (`is_root` of its mount point).
fn hierarchy_path_in(
    mountinfo: &str,
    dir: &Path,
    is_root: impl Fn(&Path) -> bool,
) -> Result<String, NamespacePathError> {
    let mut on_cgroup2 = false;
    let found = mountinfo.lines().find_map(|line| {
        let point = cgroup2_mount_point(line)?;
        let below = dir.strip_prefix(&point).ok()?;
        on_cgroup2 = true;
        is_root(&point).then(|| format!("/{}", below.display()))
    });
    match found {
        // `strip_prefix` leaves no trailing separator to trim.
        Some(path) => Ok(path),
        None if on_cgroup2 => Err(NamespacePathError::NotWholeHierarchy(dir.to_path_buf())),
        None => Err(NamespacePathError::NotOnCgroup2(dir.to_path_buf())),
    }
}

/// Why a cgroup has no path in faultd's cgroup namespace.
#[derive(Debug, thiserror::Error)]
pub enum NamespacePathError {
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    #[error("{} is on no cgroup2 mount", .0.display())]
    NotOnCgroup2(PathBuf),
    #[error(
        "the cgroup {} lies outside faultd's cgroup namespace (its mount's root is {root}), \
         where paths cannot name it",
        dir.display()
    )]
    OutsideNamespace { dir: PathBuf, root: String },
    #[error(
        "faultd runs in a cgroup namespace of its own, and the cgroup {} is on no mount of the \
         whole cgroup hierarchy (mount the node's /sys/fs/cgroup, as deploy/faultd.yaml does, \
         and give it as --cgroup-root)",
        .0.display()
    )]
    NotWholeHierarchy(PathBuf),
}

fn namespace_path_in(mountinfo: &str, dir: &Path) -> Result<String, NamespacePathError> {
    let (root, below) = mountinfo
        .lines()
        .filter_map(|line| {
            let (root, point) = cgroup2_mount(line)?;
            let below = dir.strip_prefix(&point).ok()?.to_path_buf();
            Some((point.components().count(), root, below))
        })
        .max_by_key(|(depth, _, _)| *depth)
        .map(|(_, root, below)| (root, below))
        .ok_or_else(|| NamespacePathError::NotOnCgroup2(dir.to_path_buf()))?;
    if root == "/.." || root.starts_with("/../") {
        return Err(NamespacePathError::OutsideNamespace {
            dir: dir.to_path_buf(),
            root,
        });
    }
    let mut path = PathBuf::from(root).join(below).display().to_string();
    if path.len() > 1 && path.ends_with('/') {
        path.pop();
    }
    Ok(path)
}

/// The mount point of a mountinfo line whose file system type is cgroup2.
fn cgroup2_mount_point(line: &str) -> Option<PathBuf> {
    cgroup2_mount(line).map(|(_, point)| point)
}

/// The root (the cgroup it shows, from faultd's cgroup namespace root) and the mount point of
/// a mountinfo line whose file system type is cgroup2.
fn cgroup2_mount(line: &str) -> Option<(String, PathBuf)> {
    let (before, after) = line.split_once(" - ")?;
    if after.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mut fields = before.split_whitespace().skip(3);
    let root = unescape(fields.next()?);
    Some((root, PathBuf::from(unescape(fields.next()?))))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(value) = bytes
                .get(i + 1..i + 4)
                .and_then(|digits| std::str::from_utf8(digits).ok())
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pids_cgroup_is_found_below_a_cgroup_root_under_the_hierarchy() {
        let host = "35 25 0:30 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw";
        let root = Path::new("/sys/fs/cgroup/unified/faultd-test-1");
        // Not joined with the root's own path a second time.
        assert_eq!(
            below_root(host, "/faultd-test-1/kubepods/podA/c1", root).as_deref(),
            Some("/kubepods/podA/c1")
        );
        assert_eq!(below_root(host, "/system.slice/x", root), None);
        assert_eq!(below_root(host, "/../faultd-test-1/x", root), None);
        // In a container: the node's hierarchy mounted at /host/sys/fs/cgroup/unified, the
        // container's own cgroup mount (its cgroup namespace's root) beside it.
        let pod = "40 30 0:30 /kubepods/podF/f1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                   41 30 0:30 / /host/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw";
        assert_eq!(
            below_root(
                pod,
                "/kubepods/podA/c1",
                Path::new("/host/sys/fs/cgroup/unified")
            )
            .as_deref(),
            Some("/kubepods/podA/c1")
        );
        assert_eq!(
            below_root(pod, "/", Path::new("/host/sys/fs/cgroup/unified")).as_deref(),
            Some("/")
        );
        // In a cgroup namespace of its own, both the mount's root and the pid's cgroup are
        // named from that namespace's root, from outside it.
        let private = "41 30 0:30 /../../.. /host/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw";
        assert_eq!(
            below_root(
                private,
                "/../../../kubepods/podA/c1",
                Path::new("/host/sys/fs/cgroup/unified")
            )
            .as_deref(),
            Some("/kubepods/podA/c1")
        );
    }

    #[test]
    fn from_a_namespace_of_its_own_paths_start_at_the_hierarchys_root() {
        // A container's view in a cgroup namespace of its own: its own cgroup at
        // /sys/fs/cgroup, the node's hierarchy at /host/sys/fs/cgroup/unified.
        let mountinfo = "40 30 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                         41 30 0:30 /../../../.. /host/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw";
        let whole = |p: &Path| p == Path::new("/host/sys/fs/cgroup/unified");
        assert_eq!(
            hierarchy_path_in(
                mountinfo,
                Path::new("/host/sys/fs/cgroup/unified/kubepods/besteffort/podA/"),
                whole
            )
            .unwrap(),
            "/kubepods/besteffort/podA"
        );
        assert!(matches!(
            hierarchy_path_in(mountinfo, Path::new("/sys/fs/cgroup/x"), whole),
            Err(NamespacePathError::NotWholeHierarchy(_))
        ));
        assert!(matches!(
            hierarchy_path_in(mountinfo, Path::new("/tmp/x"), whole),
            Err(NamespacePathError::NotOnCgroup2(_))
        ));
    }

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "36 25 0:31 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount_point(v1), None);
    }

    #[test]
    fn namespace_paths_start_at_the_mounts_root() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
36 25 0:31 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
40 38 0:30 /kubepods /host/cgroup rw - cgroup2 cgroup2 rw
41 38 0:30 /../.. /outside rw - cgroup2 cgroup2 rw";
        let path = |dir: &str| namespace_path_in(mountinfo, Path::new(dir));
        assert_eq!(path("/sys/fs/cgroup/unified").unwrap(), "/");
        assert_eq!(
            path("/sys/fs/cgroup/unified/test-1/kubepods/pod1").unwrap(),
            "/test-1/kubepods/pod1"
        );
        assert_eq!(
            path("/host/cgroup/besteffort/pod2").unwrap(),
            "/kubepods/besteffort/pod2"
        );
        assert!(
            path("/outside/kubepods")
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        assert!(
            path("/sys/fs/cgroup/cpu/x")
                .unwrap_err()
                .to_string()
                .contains("no cgroup2")
        );
    }

    #[test]
    fn a_hybrid_layouts_root_means_its_unified_hierarchy() {
        let dir = std::env::temp_dir().join(format!("faultd-unit-hybrid-{}", std::process::id()));
        fs::create_dir_all(dir.join("unified")).unwrap();
        fs::create_dir_all(dir.join("cpu")).unwrap();
        assert!(
            CgroupRoot::at(&dir)
                .unwrap_err()
                .to_string()
                .contains("hybrid")
        );
        fs::write(dir.join("unified/cgroup.procs"), "").unwrap();
        assert_eq!(CgroupRoot::at(&dir).unwrap().path(), dir.join("unified"));
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert_eq!(CgroupRoot::at(&dir).unwrap().path(), dir);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/mnt/back\134slash"), r"/mnt/back\slash");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn rejects_parent_components_and_missing_cgroups() {
        let dir = std::env::temp_dir().join(format!("faultd-unit-{}", std::process::id()));
        fs::create_dir_all(dir.join("app")).unwrap();
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        fs::write(dir.join("app/cgroup.procs"), "").unwrap();
        let root = CgroupRoot::at(&dir).unwrap();

        let app = root.resolve(&Scope::Cgroup { path: "app".into() }).unwrap();
        assert_eq!(app.cgroup_path, "/app");
        assert_eq!(app.cgroup_id, fs::metadata(dir.join("app")).unwrap().ino());
        assert_eq!(root.resolve(&Scope::Host).unwrap().cgroup_path, "/");

        let err = root
            .resolve(&Scope::Cgroup {
                path: "/app/../..".into(),
            })
            .unwrap_err();
        let ResolveError::Invalid(err) = err else {
            panic!("{err:?}")
        };
        assert_eq!(err.field, "fault.target.cgroup.path");
        let err = root
            .resolve(&Scope::Cgroup {
                path: "/nope".into(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("no cgroup"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
