//! Kubernetes pods and containers on this node, found by the cgroup names the kubelet and the
//! container runtimes give them. A pod's cgroup holds all its containers, including those that
//! restart or start later, so a fault attached to it outlives any one container process.
//!
//! kubelet's systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
//! with the uid's dashes as underscores (guaranteed pods: `kubepods.slice/kubepods-pod<uid>.slice`);
//! its cgroupfs driver: `kubepods/<qos>/pod<uid>` (guaranteed: `kubepods/pod<uid>`). Containers:
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, or the bare id under the
//! pod's cgroup (cgroupfs).

use std::fs;
use std::path::Path;

use super::{CgroupRoot, ResolveError, ResolvedScope, ScopeNotFound};
use crate::fault::Invalid;

/// QoS classes as they appear in the tree; guaranteed pods sit directly under kubepods.
const QOS: [&str; 3] = ["", "burstable", "besteffort"];
/// How deep below kubepods a container's cgroup may sit (qos / pod / container).
const CONTAINER_DEPTH: usize = 4;

/// The pod cgroups a uid may have, relative to the cgroup root, in the order they are tried.
pub fn pod_paths(uid: &str) -> Vec<String> {
    let underscored = uid.replace('-', "_");
    let mut paths = Vec::new();
    for qos in QOS {
        paths.push(match qos {
            "" => format!("kubepods.slice/kubepods-pod{underscored}.slice"),
            qos => {
                format!("kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice")
            }
        });
    }
    for qos in QOS {
        paths.push(match qos {
            "" => format!("kubepods/pod{uid}"),
            qos => format!("kubepods/{qos}/pod{uid}"),
        });
    }
    paths
}

fn check_name(
    value: &str,
    field: &str,
    allowed: impl Fn(char) -> bool,
    example: &str,
) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, format!("required (e.g. {example})")));
    }
    if value.len() > 128 || !value.chars().all(allowed) {
        return Err(Invalid::new(
            field,
            format!("{value:?} is not a valid id (e.g. {example})"),
        ));
    }
    Ok(())
}

pub fn pod(root: &CgroupRoot, uid: &str) -> Result<ResolvedScope, ResolveError> {
    let field = "fault.target.pod.uid";
    check_name(
        uid,
        field,
        |c| c.is_ascii_alphanumeric() || c == '-' || c == '_',
        "\"6f1c2a52-3b4d-4e5f-8a9b-0c1d2e3f4a5b\"",
    )?;
    // The systemd form of a uid given with underscores is the same cgroup.
    let uid = uid.replace('_', "-");
    let paths = pod_paths(&uid);
    for path in &paths {
        if root.path().join(path).join("cgroup.procs").is_file() {
            return Ok(root.cgroup(path, field)?);
        }
    }
    Err(ScopeNotFound::Pod {
        uid,
        paths,
        root: root.path().to_path_buf(),
    }
    .into())
}

pub fn container(root: &CgroupRoot, id: &str) -> Result<ResolvedScope, ResolveError> {
    let field = "fault.target.container.id";
    check_name(
        id,
        field,
        |c| c.is_ascii_alphanumeric(),
        "the 64 hex digits of `crictl ps --no-trunc`",
    )?;
    let names = [
        format!("cri-containerd-{id}.scope"),
        format!("crio-{id}.scope"),
        format!("docker-{id}.scope"),
    ];
    let mut searched = Vec::new();
    for top in ["kubepods.slice", "kubepods"] {
        let dir = root.path().join(top);
        searched.push(dir.display().to_string());
        if let Some(found) = find_container(&dir, id, &names, CONTAINER_DEPTH) {
            let relative = found
                .strip_prefix(root.path())
                .map_err(|_| ScopeNotFound::OutsideRoot { id: id.to_string() })?;
            return Ok(root.cgroup(&relative.to_string_lossy(), field)?);
        }
    }
    Err(ScopeNotFound::Container {
        id: id.to_string(),
        names: names.to_vec(),
        searched,
    }
    .into())
}

/// A directory below `dir` named like the container (depth-first, at most `depth` levels).
fn find_container(
    dir: &Path,
    id: &str,
    names: &[String],
    depth: usize,
) -> Option<std::path::PathBuf> {
    if depth == 0 {
        return None;
    }
    let in_pod = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("pod") || n.contains("-pod"));
    let mut subdirs = Vec::new();
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if names.iter().any(|n| *n == name) || (in_pod && name == id) {
            return Some(entry.path());
        }
        subdirs.push(entry.path());
    }
    subdirs
        .iter()
        .find_map(|sub| find_container(sub, id, names, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Resolve;
    use std::os::unix::fs::MetadataExt;

    const UID: &str = "6f1c2a52-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn tree(name: &str, dirs: &[&str]) -> (std::path::PathBuf, CgroupRoot) {
        let root = std::env::temp_dir().join(format!("faultd-pods-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("cgroup.procs"), "").unwrap();
        for dir in dirs {
            let path = root.join(dir);
            fs::create_dir_all(&path).unwrap();
            // Every level is a cgroup.
            let mut at = path.as_path();
            while at != root {
                fs::write(at.join("cgroup.procs"), "").unwrap();
                at = at.parent().unwrap();
            }
        }
        let cgroups = CgroupRoot::at(&root).unwrap();
        (root, cgroups)
    }

    #[test]
    fn pods_resolve_under_both_drivers_and_every_qos() {
        let u = UID.replace('-', "_");
        for (i, dir) in [
            format!("kubepods.slice/kubepods-pod{u}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
            format!("kubepods/pod{UID}"),
            format!("kubepods/burstable/pod{UID}"),
            format!("kubepods/besteffort/pod{UID}"),
        ]
        .iter()
        .enumerate()
        {
            let (root, cgroups) = tree(&format!("qos{i}"), &[dir]);
            let resolved = cgroups
                .resolve(&crate::fault::Scope::Pod { uid: UID.into() })
                .unwrap();
            assert_eq!(resolved.cgroup_path, format!("/{dir}"));
            assert_eq!(
                resolved.cgroup_id,
                fs::metadata(root.join(dir)).unwrap().ino()
            );
            fs::remove_dir_all(&root).unwrap();
        }
    }

    #[test]
    fn unknown_pods_name_the_paths_searched_and_bad_uids_the_field() {
        let (root, cgroups) = tree("unknown", &["kubepods.slice"]);
        let err = cgroups
            .resolve(&crate::fault::Scope::Pod { uid: UID.into() })
            .unwrap_err();
        let ResolveError::NotFound(missing) = err else {
            panic!("{err:?}")
        };
        let message = missing.to_string();
        assert!(message.contains("kubepods/besteffort/pod"), "{message}");
        assert!(
            message.contains("kubepods-burstable-pod6f1c2a52_3b4d"),
            "{message}"
        );
        for bad in ["", "../x", "a/b", "pod uid"] {
            let err = cgroups
                .resolve(&crate::fault::Scope::Pod { uid: bad.into() })
                .unwrap_err();
            let ResolveError::Invalid(invalid) = err else {
                panic!("{bad}: {err:?}")
            };
            assert_eq!(invalid.field, "fault.target.pod.uid");
        }
        let err = cgroups
            .resolve(&crate::fault::Scope::Container { id: "../x".into() })
            .unwrap_err();
        assert!(matches!(err, ResolveError::Invalid(_)), "{err:?}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn containers_resolve_by_the_runtime_scope_names() {
        let u = UID.replace('-', "_");
        let pod =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice");
        let dirs = [
            format!("{pod}/cri-containerd-aaa1.scope"),
            format!("{pod}/crio-bbb2.scope"),
            format!("{pod}/docker-ccc3.scope"),
            format!("kubepods/besteffort/pod{UID}/ddd4"),
        ];
        let refs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        let (root, cgroups) = tree("containers", &refs);
        for (id, dir) in ["aaa1", "bbb2", "ccc3", "ddd4"].iter().zip(&dirs) {
            let resolved = cgroups
                .resolve(&crate::fault::Scope::Container { id: id.to_string() })
                .unwrap();
            assert_eq!(resolved.cgroup_path, format!("/{dir}"));
        }
        let err = cgroups
            .resolve(&crate::fault::Scope::Container { id: "eee5".into() })
            .unwrap_err();
        assert!(matches!(err, ResolveError::NotFound(_)), "{err:?}");
        fs::remove_dir_all(&root).unwrap();
    }
}
