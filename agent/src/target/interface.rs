//! `netns{path, interface}` scopes: an interface inside a network namespace, identified to the
//! kernel programs by its index, read inside the namespace on a thread of its own (setns never
//! runs on a tokio worker).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use faultd_common::netns_scope_id;

use super::namespaces::in_netns;
use super::{ResolveError, ResolvedScope, ScopeNotFound};
use crate::fault::Invalid;

/// Where network namespaces are named: `ip netns` mounts, or a process's.
fn check_path(path: &str) -> Result<(), Invalid> {
    let field = "fault.target.netns.path";
    let named = ["/run/netns/", "/var/run/netns/"].iter().any(|dir| {
        path.strip_prefix(dir)
            .is_some_and(|name| !name.is_empty() && !name.contains('/') && name != "..")
    });
    let of_process = path
        .strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix("/ns/net"))
        .is_some_and(|pid| !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()));
    if named || of_process {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            format!("{path:?} is not /run/netns/NAME or /proc/PID/ns/net"),
        ))
    }
}

fn check_interface(name: &str) -> Result<CString, Invalid> {
    let field = "fault.target.netns.interface";
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) || name == "." {
        return Err(Invalid::new(
            field,
            format!("{name:?} is not an interface name (1 to 15 characters, e.g. \"eth0\")"),
        ));
    }
    CString::new(name).map_err(|_| Invalid::new(field, "contains NUL"))
}

pub fn resolve(path: &str, interface: &str) -> Result<ResolvedScope, ResolveError> {
    check_path(path)?;
    let name = check_interface(interface)?;
    let ifindex = in_netns(Path::new(path), || {
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })
    .map_err(|e| {
        Invalid::new(
            "fault.target.netns.path",
            format!("cannot enter the network namespace {path}: {e}"),
        )
    })?;
    if ifindex == 0 {
        return Err(ScopeNotFound::Interface {
            netns: path.to_string(),
            interface: interface.to_string(),
        }
        .into());
    }
    Ok(ResolvedScope {
        cgroup_path: format!("netns {path} interface {interface}"),
        cgroup_id: netns_scope_id(ifindex),
        dir: PathBuf::from(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names_are_checked() {
        assert!(check_path("/run/netns/blue").is_ok());
        assert!(check_path("/proc/42/ns/net").is_ok());
        for bad in [
            "/etc/passwd",
            "/run/netns/",
            "/run/netns/../x",
            "/proc/self/ns/net",
            "x",
        ] {
            assert_eq!(
                check_path(bad).unwrap_err().field,
                "fault.target.netns.path",
                "{bad}"
            );
        }
        assert!(check_interface("veth0").is_ok());
        for bad in ["", "a/b", "sixteen-chars-xx"] {
            assert_eq!(
                check_interface(bad).unwrap_err().field,
                "fault.target.netns.interface",
                "{bad}"
            );
        }
    }
}
