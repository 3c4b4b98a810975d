//! The xtables rules of the NFQUEUE mechanism (the one place faultd executes a program).
//!
//! Each agent owns up to four chains per network namespace in the mangle table, named after
//! its instance id: `FAULTD-<id>-OUT`, jumped to first from OUTPUT, and `FAULTD-<id>-IN`, from
//! INPUT, for faults on cgroups; `FAULTD-<id>-POST` from POSTROUTING and `FAULTD-<id>-PRE` from
//! PREROUTING for faults on an interface (`netns{path, interface}` scopes), created with the
//! first fault that needs them. A fault adds rules there and takes them out again; chains of
//! agents that are no longer alive are swept. Changes go through `iptables-restore --noflush`
//! (and `ip6tables-restore`) so that a fault's rules appear, or disappear, in one transaction;
//! the input holds only values faultd produced or validated (`check_cgroup_path`,
//! `check_interface`).
//!
//! An interface scope is about traffic no local socket owns: packets a router forwards take
//! PREROUTING, FORWARD and POSTROUTING, never OUTPUT or INPUT. So its egress (what the interface
//! sends) is matched with `-o IFACE` in POSTROUTING, which sees forwarded and locally sent
//! packets alike, and its ingress (what the interface receives) with `-i IFACE` in PREROUTING,
//! which sees every arriving packet before the routing decision, forwarded or local.
//!
//! Egress (what the workload sends) matches the sending socket's cgroup with `-m cgroup`.
//! Ingress cannot: on INPUT the packet has no socket yet for loopback traffic (early demux is
//! skipped when the packet already carries a route), so `-m cgroup` never matches there. The
//! workload's connections are therefore marked on the way out (conntrack mark, one id per
//! fault, one bit for each side the workload is on) and ingress packets flowing the other way
//! on a marked connection are queued. A connection is thus delayed on ingress from the first
//! packet the workload sends on it (its SYN as a client, its SYN-ACK as a server).
//!
//! The queueing rules also carry the lease deadline, rounded up to the second (`-m time
//! --datestop`): should faultd hang as a whole (stopped, frozen), the kernel stops queueing
//! packets to it shortly after the deadline. A healthy faultd's lanes stop holding packets at
//! the deadline itself.
//!
//! `reject` and `reset` on an interface refuse new connects with REJECT rules in the filter
//! table instead (`refuse`), in the same spirit: same exec, same tagging and sweeping.
//!
//! Rooms: `rules` (what one fault's rules say), `refuse` (the REJECT rules), `chains` (the chains' names and the lines that
//! create and remove them), `marks` (the conntrack mark layout), `matches` (port lists and
//! dates as the match extensions take them), `restore` (running iptables-restore and
//! iptables -S, and reading what they list).

mod chains;
mod marks;
mod matches;
mod refuse;
mod restore;
mod rules;

pub use chains::{chain, chain_creation, deletion, undo};
pub use marks::MAX_MARK_ID;
pub use refuse::{REFUSE_TABLE, RefuseHook, RefuseRules, refuse_chain, refuse_chain_creation};
pub use restore::{ExecError, Listing, list, list_table, restore, restore_table};
pub use rules::{FaultRules, Matcher, TcpFlags};

pub const TABLE: &str = "mangle";
const CHAIN_PREFIX: &str = "FAULTD-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn tool(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn restore_tool(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// What local sockets send (cgroup scopes).
    Output,
    /// What local sockets receive (cgroup scopes).
    Input,
    /// Everything leaving through an interface, forwarded or local (interface scopes).
    Postrouting,
    /// Everything arriving on an interface, forwarded or local (interface scopes).
    Prerouting,
}

impl Hook {
    const SUFFIXES: [&str; 4] = ["OUT", "IN", "POST", "PRE"];

    fn builtin(self) -> &'static str {
        match self {
            Self::Output => "OUTPUT",
            Self::Input => "INPUT",
            Self::Postrouting => "POSTROUTING",
            Self::Prerouting => "PREROUTING",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Output => "OUT",
            Self::Input => "IN",
            Self::Postrouting => "POST",
            Self::Prerouting => "PRE",
        }
    }
}

/// A cgroup path or interface name the rules cannot carry safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpassable {
    #[error("cgroup path {path:?} must start with / and be shorter than 4096 bytes")]
    CgroupPathShape { path: String },
    #[error(
        "cgroup path {path:?} has the character {bad:?}, which the NFQUEUE mechanism does not \
         pass to iptables (allowed: letters, digits and /._-@:+,=)"
    )]
    CgroupPathCharacter { path: String, bad: char },
    #[error("interface name {name:?} must be 1 to 15 characters and not start with -")]
    InterfaceShape { name: String },
    #[error(
        "interface name {name:?} has the character {bad:?}, which the NFQUEUE mechanism does \
         not pass to iptables (allowed: letters, digits and ._-@:)"
    )]
    InterfaceCharacter { name: String, bad: char },
}

/// Refuses cgroup paths that could not be passed safely to `-m cgroup --path`: xt_cgroup takes
/// at most 4095 bytes, and the restore input is line- and quote-structured.
pub fn check_cgroup_path(path: &str) -> Result<(), Unpassable> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "/._-@:+,=".contains(c);
    if !path.starts_with('/') || path.len() > 4095 {
        return Err(Unpassable::CgroupPathShape { path: path.into() });
    }
    if let Some(bad) = path.chars().find(|c| !allowed(*c)) {
        return Err(Unpassable::CgroupPathCharacter {
            path: path.into(),
            bad,
        });
    }
    Ok(())
}

/// Refuses interface names that iptables would read as something else: `+` is a wildcard
/// there, `!` a negation, and the restore input is line- and quote-structured.
pub fn check_interface(name: &str) -> Result<(), Unpassable> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-@:".contains(c);
    if name.is_empty() || name.len() > 15 || name.starts_with('-') {
        return Err(Unpassable::InterfaceShape { name: name.into() });
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Err(Unpassable::InterfaceCharacter {
            name: name.into(),
            bad,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_are_checked_before_they_reach_iptables() {
        assert!(check_cgroup_path("/").is_ok());
        assert!(check_cgroup_path("/system.slice/redis-server.service").is_ok());
        assert!(check_cgroup_path("/kubepods.slice/pod_1:2@x+y,z=w").is_ok());
        for bad in ["relative", "/a b", "/a\nCOMMIT", "/a\"b", "/dev-x\\x2d"] {
            assert!(check_cgroup_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_cgroup_path(&format!("/{}", "a".repeat(4095))).is_err());
    }

    #[test]
    fn interface_names_are_checked_before_they_reach_iptables() {
        for good in ["r1", "veth-a.10", "eth0@x", "br_lan:1"] {
            assert!(check_interface(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "eth+",
            "!eth0",
            "-x",
            "a b",
            "a\"b",
            "a\nCOMMIT",
            "sixteen-chars-xx",
        ] {
            assert!(check_interface(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refusals_say_what_and_why() {
        let text = |r: Result<(), Unpassable>| r.unwrap_err().to_string();
        assert_eq!(
            text(check_cgroup_path("rel")),
            "cgroup path \"rel\" must start with / and be shorter than 4096 bytes"
        );
        assert_eq!(
            text(check_cgroup_path("/a b")),
            "cgroup path \"/a b\" has the character ' ', which the NFQUEUE mechanism does not pass \
             to iptables (allowed: letters, digits and /._-@:+,=)"
        );
        assert_eq!(
            text(check_interface("")),
            "interface name \"\" must be 1 to 15 characters and not start with -"
        );
        assert_eq!(
            text(check_interface("eth+")),
            "interface name \"eth+\" has the character '+', which the NFQUEUE mechanism does not \
             pass to iptables (allowed: letters, digits and ._-@:)"
        );
    }
}
