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

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::fault::{Cidr, PeerSet};
use crate::fault::{Direction, PortRange, Protocol};
use crate::instance::Instance;
use crate::target::namespaces::NetNs;

pub const TABLE: &str = "mangle";
const CHAIN_PREFIX: &str = "FAULTD-";

/// Conntrack mark layout: a fault's id (1 to 127) in bits 24–30, and whether a workload socket
/// sent in the connection's original or reply direction.
const MARK_ID_SHIFT: u32 = 24;
const MARK_ID_MASK: u32 = 0x7f00_0000;
const MARK_ORIGINAL: u32 = 0x0080_0000;
const MARK_REPLY: u32 = 0x0040_0000;
pub const MAX_MARK_ID: u8 = 127;

/// Most port entries xt_multiport takes in one rule (a range counts as two).
const MULTIPORT_MAX: usize = 15;

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

/// What a fault's packets are told apart by, besides protocol, ports and peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matcher {
    /// The sending socket's cgroup, relative to the cgroup v2 root (checked with
    /// `check_cgroup_path`), in OUTPUT; ingress via a conntrack mark, in INPUT.
    Cgroup(String),
    /// The interface a packet leaves by (POSTROUTING, `-o`) or arrives on (PREROUTING, `-i`),
    /// checked with `check_interface`.
    Interface(String),
}

/// The chain of `instance` for `hook`, e.g. `FAULTD-1a2b3c4d-OUT`.
pub fn chain(instance: &str, hook: Hook) -> String {
    format!("{CHAIN_PREFIX}{instance}-{}", hook.suffix())
}

/// The chain of one fault of `instance` for `hook`, holding its exclusions' RETURN rules
/// before its own, named after the fault's queue: e.g. `FAULTD-1a2b3c4d-O40000` (O for what
/// leaves, I for what arrives; a queue number belongs to one fault in a namespace).
fn fault_chain(instance: &str, hook: Hook, queue: u16) -> String {
    let letter = match hook {
        Hook::Output | Hook::Postrouting => 'O',
        Hook::Input | Hook::Prerouting => 'I',
    };
    format!("{CHAIN_PREFIX}{instance}-{letter}{queue}")
}

/// The instance id of a faultd chain name (an agent's or one of its faults'), if it is one.
fn chain_owner(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(CHAIN_PREFIX)?;
    let (id, hook) = rest.split_once('-')?;
    let fault_chain = hook
        .strip_prefix(['O', 'I'])
        .is_some_and(|queue| !queue.is_empty() && queue.parse::<u16>().is_ok());
    (Instance::is_id(id) && (Hook::SUFFIXES.contains(&hook) || fault_chain)).then_some(id)
}

/// Refuses cgroup paths that could not be passed safely to `-m cgroup --path`: xt_cgroup takes
/// at most 4095 bytes, and the restore input is line- and quote-structured.
pub fn check_cgroup_path(path: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "/._-@:+,=".contains(c);
    if !path.starts_with('/') || path.len() > 4095 {
        return Err(format!(
            "cgroup path {path:?} must start with / and be shorter than 4096 bytes"
        ));
    }
    if let Some(bad) = path.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "cgroup path {path:?} has the character {bad:?}, which the NFQUEUE mechanism does not \
             pass to iptables (allowed: letters, digits and /._-@:+,=)"
        ));
    }
    Ok(())
}

/// Refuses interface names that iptables would read as something else: `+` is a wildcard
/// there, `!` a negation, and the restore input is line- and quote-structured.
pub fn check_interface(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-@:".contains(c);
    if name.is_empty() || name.len() > 15 || name.starts_with('-') {
        return Err(format!(
            "interface name {name:?} must be 1 to 15 characters and not start with -"
        ));
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "interface name {name:?} has the character {bad:?}, which the NFQUEUE mechanism does \
             not pass to iptables (allowed: letters, digits and ._-@:)"
        ));
    }
    Ok(())
}

/// Why `described` could not start: only a missing program means iptables is not installed;
/// running out of descriptors or processes says so.
fn spawn_error(described: &str, error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ENOENT) => format!("cannot run `{described}`: {error} (is iptables installed?)"),
        Some(libc::EMFILE | libc::ENFILE) => format!(
            "cannot run `{described}`: {error} (faultd is out of file descriptors: raise its \
             RLIMIT_NOFILE, LimitNOFILE= in systemd)"
        ),
        Some(libc::EAGAIN | libc::ENOMEM) => {
            format!("cannot run `{described}`: {error} (out of processes or memory)")
        }
        _ => format!("cannot run `{described}`: {error}"),
    }
}

/// Runs `program args` (in `netns` if given), feeding `stdin`; returns stdout. An argument
/// vector, never a shell.
fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    netns: Option<&NetNs>,
) -> Result<String, String> {
    let described = format!("{program} {}", args.join(" "));
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(netns) = netns {
        let fd = netns.as_fd().as_raw_fd();
        // SAFETY: between fork and exec only setns(2) runs, which is async-signal-safe; the
        // fd stays open in the child until exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn().map_err(|e| spawn_error(&described, &e))?;
    if let Some(text) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        // A write error shows up as the program's failure below.
        if let Err(e) = pipe.write_all(text.as_bytes()) {
            tracing::debug!(error = %e, "writing to {program}");
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for `{described}`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{described}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Applies `lines` (iptables commands such as `-A CHAIN ...`) to the mangle table in one
/// transaction.
pub fn restore(family: Family, netns: Option<&NetNs>, lines: &[String]) -> Result<(), String> {
    if lines.is_empty() {
        return Ok(());
    }
    let input = format!("*{TABLE}\n{}\nCOMMIT\n", lines.join("\n"));
    run(
        family.restore_tool(),
        &["--noflush", "--wait=5"],
        Some(&input),
        netns,
    )
    .map(drop)
}

/// The mangle table's rules as `iptables -S` prints them.
pub fn list(family: Family, netns: Option<&NetNs>) -> Result<Listing, String> {
    run(family.tool(), &["-w", "5", "-t", TABLE, "-S"], None, netns).map(|text| Listing { text })
}

/// What `iptables -t mangle -S` showed.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    text: String,
}

impl Listing {
    #[cfg(test)]
    fn from_text(text: &str) -> Listing {
        Listing { text: text.into() }
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.lines().map(str::trim)
    }

    /// Rules (`-A` lines) of faultd chains.
    fn faultd_rules(&self) -> impl Iterator<Item = &str> {
        self.lines().filter(|line| {
            line.strip_prefix("-A ")
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|chain| chain_owner(chain).is_some())
        })
    }

    /// Instance ids that own faultd chains here.
    pub fn owners(&self) -> BTreeSet<String> {
        self.lines()
            .filter_map(|line| line.strip_prefix("-N "))
            .filter_map(|chain| chain_owner(chain.trim()))
            .map(str::to_owned)
            .collect()
    }

    /// Whether the chain `name` exists.
    pub fn has_chain(&self, name: &str) -> bool {
        self.lines()
            .filter_map(|line| line.strip_prefix("-N "))
            .any(|chain| chain.trim() == name)
    }

    /// Queue numbers that faultd rules of any agent send packets to.
    pub fn queues(&self) -> BTreeSet<u16> {
        self.faultd_rules()
            .filter_map(|line| value_after(line, "--queue-num"))
            .filter_map(|value| value.parse().ok())
            .collect()
    }

    /// Conntrack mark ids that faultd rules of any agent use.
    pub fn mark_ids(&self) -> BTreeSet<u8> {
        self.faultd_rules()
            .filter_map(|line| {
                value_after(line, "--set-xmark").or_else(|| value_after(line, "--mark"))
            })
            .filter_map(|value| value.split('/').next())
            .filter_map(|value| u32::from_str_radix(value.trim_start_matches("0x"), 16).ok())
            .map(|mark| ((mark & MARK_ID_MASK) >> MARK_ID_SHIFT) as u8)
            .filter(|id| *id != 0)
            .collect()
    }

    /// Restore lines that remove every chain of `instance` and the jumps to them.
    pub fn removal(&self, instance: &str) -> Vec<String> {
        let ours = |chain: &str| chain_owner(chain) == Some(instance);
        let mut lines: Vec<String> = self
            .lines()
            .filter_map(|line| line.strip_prefix("-A "))
            .filter(|rule| {
                let mut words = rule.split_whitespace();
                let chain = words.next().unwrap_or_default();
                let jumps_to_ours = rule
                    .split_whitespace()
                    .skip_while(|w| *w != "-j")
                    .nth(1)
                    .is_some_and(ours);
                !ours(chain) && jumps_to_ours
            })
            .map(|rule| format!("-D {rule}"))
            .collect();
        let chains: Vec<&str> = self
            .lines()
            .filter_map(|line| line.strip_prefix("-N "))
            .map(str::trim)
            .filter(|chain| ours(chain))
            .collect();
        lines.extend(chains.iter().map(|chain| format!("-F {chain}")));
        lines.extend(chains.iter().map(|chain| format!("-X {chain}")));
        lines
    }
}

/// The word after `flag` in a rule.
fn value_after<'a>(line: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == flag)?;
    words.next()
}

/// Restore lines that create the chains of `instance` for `hooks` and jump to them first.
pub fn chain_creation(instance: &str, hooks: &[Hook]) -> Vec<String> {
    let mut lines = Vec::new();
    for hook in hooks {
        lines.push(format!("-N {}", chain(instance, *hook)));
    }
    for hook in hooks {
        lines.push(format!(
            "-I {} 1 -j {}",
            hook.builtin(),
            chain(instance, *hook)
        ));
    }
    lines
}

/// Restore lines that undo `lines` (`-N`, `-I BUILTIN 1` and `-A` lines), last first: for a
/// transaction that must be rolled back because the other family's failed.
pub fn undo(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .rev()
        .filter_map(|line| {
            if let Some(rule) = line.strip_prefix("-A ") {
                return Some(format!("-D {rule}"));
            }
            if let Some(chain) = line.strip_prefix("-N ") {
                return Some(format!("-X {chain}"));
            }
            let rest = line.strip_prefix("-I ")?;
            let (builtin, rule) = rest.split_once(" 1 ")?;
            Some(format!("-D {builtin} {rule}"))
        })
        .collect()
}

/// The rules of one fault in one namespace.
#[derive(Clone, Debug)]
pub struct FaultRules {
    pub instance: String,
    pub fault: String,
    pub matcher: Matcher,
    pub protocol: Protocol,
    pub direction: Direction,
    pub ports: Vec<PortRange>,
    pub queue: u16,
    /// The conntrack mark id: needed when the direction includes ingress on a cgroup.
    pub mark_id: Option<u8>,
    /// Unix seconds: the last second in which packets are queued (None: no end).
    pub until: Option<u64>,
    /// The remote addresses the fault is limited to (None: all of them).
    pub peers: Option<PeerSet>,
}

impl FaultRules {
    fn ingress_marked(&self) -> bool {
        matches!(self.direction, Direction::Ingress | Direction::Both) && self.mark_id.is_some()
    }

    fn egress(&self) -> bool {
        matches!(self.direction, Direction::Egress | Direction::Both)
    }

    /// Whether packets arriving are queued (a cgroup needs its conntrack mark for that).
    fn ingress(&self) -> bool {
        match self.matcher {
            Matcher::Cgroup(_) => self.ingress_marked(),
            Matcher::Interface(_) => matches!(self.direction, Direction::Ingress | Direction::Both),
        }
    }

    /// Whether the fault has rules on the way out: a cgroup fault always (ingress is marked
    /// there), an interface fault for egress.
    fn leaving_rules(&self) -> bool {
        match self.matcher {
            Matcher::Cgroup(_) => true,
            Matcher::Interface(_) => self.egress(),
        }
    }

    /// The agent's chains the rules go in: (leaving, arriving).
    fn hook_pair(&self) -> (Hook, Hook) {
        match self.matcher {
            Matcher::Cgroup(_) => (Hook::Output, Hook::Input),
            Matcher::Interface(_) => (Hook::Postrouting, Hook::Prerouting),
        }
    }

    /// The agent's chains these rules need. A cgroup fault always sets its marks in OUTPUT
    /// and keeps the INPUT chain beside it; an interface fault uses only the hooks of its
    /// directions (an unneeded PREROUTING jump would cost every arriving packet).
    pub fn hooks(&self) -> Vec<Hook> {
        let (leaving, arriving) = self.hook_pair();
        match self.matcher {
            Matcher::Cgroup(_) => vec![leaving, arriving],
            Matcher::Interface(_) => [(self.egress(), leaving), (self.ingress(), arriving)]
                .into_iter()
                .filter_map(|(used, hook)| used.then_some(hook))
                .collect(),
        }
    }

    /// The peers of `family` the fault is limited to (`[None]`: every address; empty: none,
    /// the family gets no rule) and the ones it excludes.
    fn peers_of(&self, family: Family) -> (Vec<Option<Cidr>>, Vec<Cidr>) {
        let ours = |c: &&Cidr| c.is_v6() == (family == Family::V6);
        match &self.peers {
            None => (vec![None], Vec::new()),
            Some(set) => (
                set.include.iter().filter(ours).copied().map(Some).collect(),
                set.exclude.iter().filter(ours).copied().collect(),
            ),
        }
    }

    /// The fault's own chains in `family`: only a fault that excludes peers of this family
    /// has them (its RETURN rules must not skip the rules of other faults).
    fn own_chains(&self, family: Family) -> Vec<String> {
        let (include, exclude) = self.peers_of(family);
        if include.is_empty() || exclude.is_empty() {
            return Vec::new();
        }
        let mut chains = Vec::new();
        if self.leaving_rules() {
            chains.push(fault_chain(&self.instance, Hook::Output, self.queue));
        }
        if self.ingress() {
            chains.push(fault_chain(&self.instance, Hook::Input, self.queue));
        }
        chains
    }

    /// Restore lines creating the fault's own chains in `family` (before `lines`).
    pub fn setup(&self, family: Family) -> Vec<String> {
        self.own_chains(family)
            .iter()
            .map(|chain| format!("-N {chain}"))
            .collect()
    }

    /// Restore lines removing the fault's own chains in `family` (after `deletion(lines)`).
    pub fn teardown(&self, family: Family) -> Vec<String> {
        let chains = self.own_chains(family);
        let mut lines: Vec<String> = chains.iter().map(|c| format!("-F {c}")).collect();
        lines.extend(chains.iter().map(|c| format!("-X {c}")));
        lines
    }

    /// `-A` lines for `family`, in the order they must be evaluated: exclusions first, then
    /// connection marks before the egress NFQUEUE rule, which ends the packet's walk through
    /// the chain. Egress matches a peer as the destination, ingress as the source; addresses
    /// are rendered from parsed CIDRs only.
    pub fn lines(&self, family: Family) -> Vec<String> {
        let (includes, excludes) = self.peers_of(family);
        if includes.is_empty() {
            return Vec::new();
        }
        let (leaving, arriving) = self.hook_pair();
        let mut out = chain(&self.instance, leaving);
        let mut input = chain(&self.instance, arriving);
        let protocols: &[&str] = match self.protocol {
            Protocol::Tcp => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::Both => &["tcp", "udp"],
        };
        let egress = self.egress();
        let ingress = self.ingress();
        let comment = format!("-m comment --comment faultd:{}", self.fault);
        let mut lines = Vec::new();
        if !excludes.is_empty() {
            if self.leaving_rules() {
                let own_out = fault_chain(&self.instance, Hook::Output, self.queue);
                lines.push(format!("-A {out} {comment} -j {own_out}"));
                lines.extend(
                    excludes
                        .iter()
                        .map(|e| format!("-A {own_out} -d {e} {comment} -j RETURN")),
                );
                out = own_out;
            }
            if ingress {
                let own_in = fault_chain(&self.instance, Hook::Input, self.queue);
                lines.push(format!("-A {input} {comment} -j {own_in}"));
                lines.extend(
                    excludes
                        .iter()
                        .map(|e| format!("-A {own_in} -s {e} {comment} -j RETURN")),
                );
                input = own_in;
            }
        }
        let until = match self.until {
            Some(secs) => format!("-m time --datestop {} --utc ", utc(secs)),
            None => String::new(),
        };
        let queue = format!(
            "{until}{comment} -j NFQUEUE --queue-num {} --queue-bypass",
            self.queue
        );
        for peer in &includes {
            // `0.0.0.0/0` and `::/0` (only exclusions) match every address.
            let (to, from) = match peer.filter(|p| p.prefix > 0) {
                Some(p) => (format!(" -d {p}"), format!(" -s {p}")),
                None => (String::new(), String::new()),
            };
            for protocol in protocols {
                for ports in multiport_lists(&self.ports) {
                    let matches = format!("-p {protocol} -m multiport --ports {ports}");
                    let cgroup = match &self.matcher {
                        Matcher::Cgroup(path) => format!("-m cgroup --path {path}"),
                        Matcher::Interface(name) => {
                            // Each direction has its hook: no marks needed.
                            if egress {
                                lines.push(format!("-A {out}{to} -o {name} {matches} {queue}"));
                            }
                            if ingress {
                                lines.push(format!("-A {input}{from} -i {name} {matches} {queue}"));
                            }
                            continue;
                        }
                    };
                    if let (true, Some(id)) = (ingress, self.mark_id) {
                        let id = u32::from(id) << MARK_ID_SHIFT;
                        for (ctdir, side) in [("ORIGINAL", MARK_ORIGINAL), ("REPLY", MARK_REPLY)] {
                            lines.push(format!(
                                "-A {out}{to} {cgroup} {matches} -m conntrack --ctdir {ctdir} \
                                 {comment} -j CONNMARK --set-xmark {:#x}/{:#x}",
                                id | side,
                                MARK_ID_MASK | side
                            ));
                        }
                        // Ingress to the workload flows against the direction it sent in.
                        for (ctdir, side) in [("REPLY", MARK_ORIGINAL), ("ORIGINAL", MARK_REPLY)] {
                            lines.push(format!(
                                "-A {input}{from} {matches} -m connmark --mark {:#x}/{:#x} \
                                 -m conntrack --ctdir {ctdir} {queue}",
                                id | side,
                                MARK_ID_MASK | side
                            ));
                        }
                    }
                    if egress {
                        lines.push(format!("-A {out}{to} {cgroup} {matches} {queue}"));
                    }
                }
            }
        }
        lines
    }
}

/// Unix seconds as xt_time writes a UTC date: `2026-11-22T05:30:07`.
fn utc(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Restore lines deleting what `lines` added, last first.
pub fn deletion(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .rev()
        .filter_map(|line| line.strip_prefix("-A "))
        .map(|rule| format!("-D {rule}"))
        .collect()
}

/// Port ranges as xt_multiport `--ports` lists of at most 15 entries (a range takes two).
fn multiport_lists(ports: &[PortRange]) -> Vec<String> {
    let mut lists = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for range in ports {
        let (entry, cost) = if range.first == range.last {
            (range.first.to_string(), 1)
        } else {
            (format!("{}:{}", range.first, range.last), 2)
        };
        if used + cost > MULTIPORT_MAX {
            lists.push(current.join(","));
            current.clear();
            used = 0;
        }
        current.push(entry);
        used += cost;
    }
    if !current.is_empty() {
        lists.push(current.join(","));
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
        list.iter()
            .map(|&(first, last)| PortRange { first, last })
            .collect()
    }

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
    fn egress_rules_match_the_cgroup_and_either_port() {
        let mut rules = FaultRules {
            instance: "0badcafe".into(),
            fault: "f00d".into(),
            matcher: Matcher::Cgroup("/app".into()),
            protocol: Protocol::Tcp,
            direction: Direction::Egress,
            ports: ports(&[(6379, 6379)]),
            queue: 40000,
            mark_id: None,
            until: None,
            peers: None,
        };
        assert_eq!(
            rules.lines(Family::V4),
            vec![
                "-A FAULTD-0badcafe-OUT -m cgroup --path /app -p tcp -m multiport --ports 6379 \
                 -m comment --comment faultd:f00d -j NFQUEUE --queue-num 40000 --queue-bypass"
            ]
        );
        assert_eq!(
            deletion(&rules.lines(Family::V4)),
            vec![rules.lines(Family::V4)[0].replacen("-A", "-D", 1)]
        );
        rules.until = Some(1_763_789_407);
        assert!(
            rules.lines(Family::V4)[0]
                .contains("--ports 6379 -m time --datestop 2025-11-22T05:30:07 --utc -m comment"),
            "{:?}",
            rules.lines(Family::V4)
        );
    }

    #[test]
    fn ingress_rules_mark_connections_on_the_way_out() {
        let rules = FaultRules {
            instance: "0badcafe".into(),
            fault: "f00d".into(),
            matcher: Matcher::Cgroup("/app".into()),
            protocol: Protocol::Both,
            direction: Direction::Both,
            ports: ports(&[(6379, 6379)]),
            queue: 7,
            mark_id: Some(3),
            until: None,
            peers: None,
        };
        let lines = rules.lines(Family::V4);
        assert_eq!(
            lines.len(),
            2 * 5,
            "per protocol: 2 marks, 2 ingress queues, 1 egress"
        );
        assert!(
            lines[0].contains("--ctdir ORIGINAL")
                && lines[0].ends_with("--set-xmark 0x3800000/0x7f800000")
        );
        assert!(
            lines[1].contains("--ctdir REPLY")
                && lines[1].ends_with("--set-xmark 0x3400000/0x7f400000")
        );
        assert!(lines[2].starts_with("-A FAULTD-0badcafe-IN -p tcp"));
        assert!(lines[2].contains("--mark 0x3800000/0x7f800000 -m conntrack --ctdir REPLY"));
        assert!(lines[3].contains("--mark 0x3400000/0x7f400000 -m conntrack --ctdir ORIGINAL"));
        assert!(lines[4].starts_with("-A FAULTD-0badcafe-OUT -m cgroup"));
        assert!(lines[4].ends_with("--queue-num 7 --queue-bypass"));
        assert!(lines[5].contains("-p udp"));
        let listing = Listing::from_text(
            &lines
                .iter()
                .map(|l| l.replace("--path /app", "--path \"/app\""))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        assert_eq!(listing.mark_ids(), BTreeSet::from([3]));
        assert_eq!(listing.queues(), BTreeSet::from([7]));
    }

    fn peers(include: &[&str], exclude: &[&str]) -> Option<PeerSet> {
        let parse = |list: &[&str]| -> Vec<Cidr> {
            list.iter().map(|t| Cidr::parse(t, "f").unwrap()).collect()
        };
        PeerSet::new(&parse(include), &parse(exclude), "t").unwrap()
    }

    #[test]
    fn peers_restrict_each_family_and_exclusions_return_from_the_faults_own_chain() {
        let mut rules = FaultRules {
            instance: "0badcafe".into(),
            fault: "f00d".into(),
            matcher: Matcher::Cgroup("/app".into()),
            protocol: Protocol::Tcp,
            direction: Direction::Both,
            ports: ports(&[(6379, 6379)]),
            queue: 40000,
            mark_id: Some(2),
            until: None,
            peers: peers(&["127.0.0.2/32", "10.0.0.0/8"], &[]),
        };
        let v4 = rules.lines(Family::V4);
        assert_eq!(
            v4.len(),
            2 * 5,
            "per peer: 2 marks, 2 ingress queues, 1 egress"
        );
        for (i, peer) in ["10.0.0.0/8", "127.0.0.2/32"].iter().enumerate() {
            let part = &v4[i * 5..(i + 1) * 5];
            assert!(part[0].starts_with(&format!("-A FAULTD-0badcafe-OUT -d {peer} -m cgroup")));
            assert!(part[1].starts_with(&format!("-A FAULTD-0badcafe-OUT -d {peer} -m cgroup")));
            assert!(part[2].starts_with(&format!("-A FAULTD-0badcafe-IN -s {peer} -p tcp")));
            assert!(part[3].starts_with(&format!("-A FAULTD-0badcafe-IN -s {peer} -p tcp")));
            assert!(part[4].starts_with(&format!("-A FAULTD-0badcafe-OUT -d {peer} -m cgroup")));
            assert!(part[4].ends_with("-j NFQUEUE --queue-num 40000 --queue-bypass"));
        }
        assert!(
            rules.lines(Family::V6).is_empty(),
            "a family with no peer gets no rule"
        );
        assert!(rules.setup(Family::V4).is_empty() && rules.teardown(Family::V4).is_empty());

        rules.peers = peers(&[], &["127.0.0.2", "fd00::/8"]);
        rules.direction = Direction::Egress;
        rules.mark_id = None;
        let own = "FAULTD-0badcafe-O40000";
        assert_eq!(rules.setup(Family::V4), vec![format!("-N {own}")]);
        assert_eq!(
            rules.lines(Family::V4),
            vec![
                format!("-A FAULTD-0badcafe-OUT -m comment --comment faultd:f00d -j {own}"),
                format!("-A {own} -d 127.0.0.2/32 -m comment --comment faultd:f00d -j RETURN"),
                format!(
                    "-A {own} -m cgroup --path /app -p tcp -m multiport --ports 6379 \
                     -m comment --comment faultd:f00d -j NFQUEUE --queue-num 40000 --queue-bypass"
                ),
            ]
        );
        let v6 = rules.lines(Family::V6);
        assert!(v6[1].contains("-d fd00::/8 ") && v6[1].ends_with("-j RETURN"));
        assert!(v6[2].starts_with(&format!("-A {own} -m cgroup")));
        assert_eq!(
            rules.teardown(Family::V6),
            vec![format!("-F {own}"), format!("-X {own}")]
        );

        // The fault's chains are the agent's: a sweep takes them too.
        let listing = Listing::from_text(&format!(
            "-N FAULTD-0badcafe-OUT\n-N {own}\n-A OUTPUT -j FAULTD-0badcafe-OUT\n\
             -A FAULTD-0badcafe-OUT -j {own}\n\
             -A {own} -p tcp -j NFQUEUE --queue-num 40000 --queue-bypass\n"
        ));
        assert_eq!(listing.queues(), BTreeSet::from([40000]));
        assert_eq!(
            listing.removal("0badcafe"),
            vec![
                "-D OUTPUT -j FAULTD-0badcafe-OUT".to_string(),
                "-F FAULTD-0badcafe-OUT".into(),
                format!("-F {own}"),
                "-X FAULTD-0badcafe-OUT".into(),
                format!("-X {own}"),
            ]
        );
        assert!(chain_owner("FAULTD-0badcafe-O").is_none());
        assert!(chain_owner("FAULTD-0badcafe-Ox1").is_none());
        assert!(own.len() <= 28, "xtables chain names");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59");
    }

    #[test]
    fn port_lists_respect_the_multiport_limit() {
        let many: Vec<(u16, u16)> = (1..=20).map(|p| (p, p)).collect();
        let lists = multiport_lists(&ports(&many));
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[0].split(',').count(), 15);
        let ranges: Vec<(u16, u16)> = (0..8).map(|i| (i * 10 + 1, i * 10 + 5)).collect();
        let lists = multiport_lists(&ports(&ranges));
        assert_eq!(
            lists,
            vec!["1:5,11:15,21:25,31:35,41:45,51:55,61:65", "71:75"]
        );
    }

    const LISTING: &str = "\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-N FAULTD-0badcafe-IN
-N FAULTD-0badcafe-OUT
-N FAULTD-12345678-IN
-N FAULTD-12345678-OUT
-N FAULTD-not-an-id
-N OTHER
-A INPUT -j FAULTD-12345678-IN
-A INPUT -j FAULTD-0badcafe-IN
-A OUTPUT -j FAULTD-12345678-OUT
-A OUTPUT -j FAULTD-0badcafe-OUT
-A OUTPUT -p tcp -j OTHER
-A FAULTD-0badcafe-OUT -p tcp -m cgroup --path \"/a\" -m multiport --ports 1 -m comment --comment \"faultd:x\" -j NFQUEUE --queue-num 40001 --queue-bypass
-A FAULTD-12345678-OUT -p tcp -m cgroup --path \"/b\" -m multiport --ports 1 -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark 0x5800000/0x7f800000
-A OTHER -j NFQUEUE --queue-num 5
";

    #[test]
    fn listings_show_owners_queues_and_marks() {
        let listing = Listing::from_text(LISTING);
        assert_eq!(
            listing.owners(),
            BTreeSet::from(["0badcafe".to_string(), "12345678".to_string()])
        );
        assert!(
            listing.has_chain("FAULTD-0badcafe-OUT") && !listing.has_chain("FAULTD-0badcafe-PRE")
        );
        assert_eq!(
            listing.queues(),
            BTreeSet::from([40001]),
            "only faultd chains count"
        );
        assert_eq!(listing.mark_ids(), BTreeSet::from([5]));
    }

    #[test]
    fn removal_takes_jumps_rules_and_chains_of_one_instance_only() {
        let listing = Listing::from_text(LISTING);
        assert_eq!(
            listing.removal("0badcafe"),
            vec![
                "-D INPUT -j FAULTD-0badcafe-IN",
                "-D OUTPUT -j FAULTD-0badcafe-OUT",
                "-F FAULTD-0badcafe-IN",
                "-F FAULTD-0badcafe-OUT",
                "-X FAULTD-0badcafe-IN",
                "-X FAULTD-0badcafe-OUT",
            ]
        );
        assert!(listing.removal("99999999").is_empty());
    }

    #[test]
    fn chains_are_created_with_a_jump_in_front() {
        assert_eq!(
            chain_creation("0badcafe", &[Hook::Output, Hook::Input]),
            vec![
                "-N FAULTD-0badcafe-OUT",
                "-N FAULTD-0badcafe-IN",
                "-I OUTPUT 1 -j FAULTD-0badcafe-OUT",
                "-I INPUT 1 -j FAULTD-0badcafe-IN",
            ]
        );
        assert!(
            chain("0badcafe", Hook::Output).len() <= 28,
            "xtables chain names"
        );
    }

    #[test]
    fn interface_rules_queue_what_leaves_in_postrouting_and_what_arrives_in_prerouting() {
        let mut rules = FaultRules {
            instance: "0badcafe".into(),
            fault: "f00d".into(),
            matcher: Matcher::Interface("r1".into()),
            protocol: Protocol::Tcp,
            direction: Direction::Both,
            ports: ports(&[(6379, 6379)]),
            queue: 40000,
            mark_id: None,
            until: None,
            peers: None,
        };
        assert_eq!(rules.hooks(), vec![Hook::Postrouting, Hook::Prerouting]);
        let queue = "-m comment --comment faultd:f00d -j NFQUEUE --queue-num 40000 --queue-bypass";
        assert_eq!(
            rules.lines(Family::V4),
            vec![
                format!("-A FAULTD-0badcafe-POST -o r1 -p tcp -m multiport --ports 6379 {queue}"),
                format!("-A FAULTD-0badcafe-PRE -i r1 -p tcp -m multiport --ports 6379 {queue}"),
            ]
        );
        rules.direction = Direction::Ingress;
        assert_eq!(rules.hooks(), vec![Hook::Prerouting]);
        rules.peers = peers(&["10.77.2.0/24"], &["10.77.2.9"]);
        let own = "FAULTD-0badcafe-I40000";
        assert_eq!(rules.setup(Family::V4), vec![format!("-N {own}")]);
        assert_eq!(
            rules.lines(Family::V4),
            vec![
                format!("-A FAULTD-0badcafe-PRE -m comment --comment faultd:f00d -j {own}"),
                format!("-A {own} -s 10.77.2.9/32 -m comment --comment faultd:f00d -j RETURN"),
                format!("-A {own} -s 10.77.2.0/24 -i r1 -p tcp -m multiport --ports 6379 {queue}"),
            ]
        );
        assert!(rules.lines(Family::V6).is_empty());

        // The sweep knows the new chains as the agent's.
        let listing = Listing::from_text(&format!(
            "-N FAULTD-0badcafe-PRE\n-N {own}\n-A PREROUTING -j FAULTD-0badcafe-PRE\n\
             -A FAULTD-0badcafe-PRE -j {own}\n"
        ));
        assert_eq!(listing.owners(), BTreeSet::from(["0badcafe".to_string()]));
        assert_eq!(
            listing.removal("0badcafe"),
            vec![
                "-D PREROUTING -j FAULTD-0badcafe-PRE".to_string(),
                "-F FAULTD-0badcafe-PRE".into(),
                format!("-F {own}"),
                "-X FAULTD-0badcafe-PRE".into(),
                format!("-X {own}"),
            ]
        );
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
    fn undo_reverses_a_transaction() {
        let mut lines = chain_creation("0badcafe", &[Hook::Postrouting]);
        lines.push("-N FAULTD-0badcafe-O7".into());
        lines.push("-A FAULTD-0badcafe-POST -j FAULTD-0badcafe-O7".into());
        lines.push("-A FAULTD-0badcafe-O7 -o r1 -j NFQUEUE --queue-num 7".into());
        assert_eq!(
            undo(&lines),
            vec![
                "-D FAULTD-0badcafe-O7 -o r1 -j NFQUEUE --queue-num 7",
                "-D FAULTD-0badcafe-POST -j FAULTD-0badcafe-O7",
                "-X FAULTD-0badcafe-O7",
                "-D POSTROUTING -j FAULTD-0badcafe-POST",
                "-X FAULTD-0badcafe-POST",
            ]
        );
    }

    #[test]
    fn spawn_errors_say_what_ran_out() {
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert!(spawn_error("iptables -S", &enoent).contains("is iptables installed?"));
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let message = spawn_error("iptables -S", &emfile);
        assert!(message.contains("out of file descriptors"), "{message}");
        assert!(!message.contains("installed"), "{message}");
    }
}
