//! The names of faultd's chains, and the restore lines that create and remove chains and rules.

use super::refuse::RefuseHook;
use super::{CHAIN_PREFIX, Hook};
use crate::instance::Instance;

/// The chain of `instance` for `hook`, e.g. `FAULTD-1a2b3c4d-OUT`.
pub fn chain(instance: &str, hook: Hook) -> String {
    format!("{CHAIN_PREFIX}{instance}-{}", hook.suffix())
}

/// The chain of one fault of `instance` for `hook`, holding its exclusions' RETURN rules
/// before its own, named after the fault's queue: e.g. `FAULTD-1a2b3c4d-O40000` (O for what
/// leaves, I for what arrives; a queue number belongs to one fault in a namespace).
pub(super) fn fault_chain(instance: &str, hook: Hook, queue: u16) -> String {
    let letter = match hook {
        Hook::Output | Hook::Postrouting => 'O',
        Hook::Input | Hook::Prerouting => 'I',
    };
    format!("{CHAIN_PREFIX}{instance}-{letter}{queue}")
}

/// The instance id of a faultd chain name (an agent's or one of its faults', in the mangle
/// table or, for refusing rules, in the filter table), if it is one.
pub(super) fn chain_owner(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(CHAIN_PREFIX)?;
    let (id, hook) = rest.split_once('-')?;
    let fault_chain = hook
        .strip_prefix(['O', 'I', 'S', 'A'])
        .is_some_and(|queue| !queue.is_empty() && queue.parse::<u16>().is_ok());
    let agent_chain = Hook::SUFFIXES.contains(&hook) || RefuseHook::SUFFIXES.contains(&hook);
    (Instance::is_id(id) && (agent_chain || fault_chain)).then_some(id)
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

/// Restore lines deleting what `lines` added, last first.
pub fn deletion(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .rev()
        .filter_map(|line| line.strip_prefix("-A "))
        .map(|rule| format!("-D {rule}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
