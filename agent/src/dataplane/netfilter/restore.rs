//! Running iptables-restore and iptables -S (an argument vector, never a shell), and reading
//! what a listing shows: owners, queues, mark ids, what to remove.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};

use super::chains::chain_owner;
use super::{Family, TABLE, marks};
use crate::target::namespaces::NetNs;

/// What failed running iptables-restore or iptables: the command as run, and the source.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program did not start.
    #[error("cannot run `{command}`: {source}{}", spawn_hint(source))]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for `{command}`: {source}")]
    Wait {
        command: String,
        #[source]
        source: io::Error,
    },
    /// The program ran and failed; `stderr` is what it said, trimmed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// Why a program could not start: only a missing program means iptables is not installed;
/// running out of descriptors or processes says so.
fn spawn_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ENOENT) => " (is iptables installed?)",
        Some(libc::EMFILE | libc::ENFILE) => {
            " (faultd is out of file descriptors: raise its RLIMIT_NOFILE, LimitNOFILE= in \
             systemd)"
        }
        Some(libc::EAGAIN | libc::ENOMEM) => " (out of processes or memory)",
        _ => "",
    }
}

/// Runs `program args` (in `netns` if given), feeding `stdin`; returns stdout. An argument
/// vector, never a shell.
fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    netns: Option<&NetNs>,
) -> Result<String, ExecError> {
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
    // `-m cgroup --path` resolves in iptables' cgroup namespace: the node's when faultd has
    // one of its own (see target::cgroupns).
    if let Some(cgroupns) = crate::target::cgroupns::iptables_namespace() {
        let fd = cgroupns.as_raw_fd();
        // SAFETY: between fork and exec only setns(2) runs, which is async-signal-safe; the
        // file is static, so the fd stays open.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWCGROUP) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(netns) = netns {
        let fd = netns.as_fd().as_raw_fd();
        // SAFETY: between fork and exec only setns(2) runs, which is async-signal-safe; the
        // fd stays open in the child until exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        command: described.clone(),
        source,
    })?;
    if let Some(text) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        // A write error shows up as the program's failure below.
        if let Err(e) = pipe.write_all(text.as_bytes()) {
            tracing::debug!(error = %e, "writing to {program}");
        }
    }
    let output = child.wait_with_output().map_err(|source| ExecError::Wait {
        command: described.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(ExecError::Failed {
            command: described,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Applies `lines` (iptables commands such as `-A CHAIN ...`) to the mangle table in one
/// transaction.
pub fn restore(family: Family, netns: Option<&NetNs>, lines: &[String]) -> Result<(), ExecError> {
    restore_table(TABLE, family, netns, lines)
}

/// Applies `lines` to `table` (faultd's mangle table, or the filter table of the refusing
/// rules) in one transaction.
pub fn restore_table(
    table: &str,
    family: Family,
    netns: Option<&NetNs>,
    lines: &[String],
) -> Result<(), ExecError> {
    if lines.is_empty() {
        return Ok(());
    }
    let input = format!("*{table}\n{}\nCOMMIT\n", lines.join("\n"));
    run(
        family.restore_tool(),
        &["--noflush", "--wait=5"],
        Some(&input),
        netns,
    )
    .map(drop)
}

/// The mangle table's rules as `iptables -S` prints them.
pub fn list(family: Family, netns: Option<&NetNs>) -> Result<Listing, ExecError> {
    list_table(TABLE, family, netns)
}

/// `table`'s rules as `iptables -S` prints them.
pub fn list_table(
    table: &str,
    family: Family,
    netns: Option<&NetNs>,
) -> Result<Listing, ExecError> {
    run(family.tool(), &["-w", "5", "-t", table, "-S"], None, netns).map(|text| Listing { text })
}

/// What `iptables -t mangle -S` showed.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    text: String,
}

impl Listing {
    #[cfg(test)]
    pub(super) fn from_text(text: &str) -> Listing {
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
            .filter_map(marks::id_of)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn spawn_errors_say_what_ran_out() {
        let spawn = |errno| {
            ExecError::Spawn {
                command: "iptables -S".into(),
                source: io::Error::from_raw_os_error(errno),
            }
            .to_string()
        };
        let enoent = spawn(libc::ENOENT);
        assert!(enoent.starts_with("cannot run `iptables -S`: "), "{enoent}");
        assert!(enoent.ends_with(" (is iptables installed?)"), "{enoent}");
        let message = spawn(libc::EMFILE);
        assert!(message.contains("out of file descriptors"), "{message}");
        assert!(!message.contains("installed"), "{message}");
        assert!(spawn(libc::EACCES).ends_with("(os error 13)"), "no hint");
    }
}
