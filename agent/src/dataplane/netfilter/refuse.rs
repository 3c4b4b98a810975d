//! The refusing rules of `reject` and `reset` on a `netns{path, interface}` scope: new TCP
//! connections through the interface are answered with a TCP reset, so the client's connect
//! fails at once (ECONNREFUSED) instead of timing out.
//!
//! An interface has no local sockets for the cgroup programs to refuse, and answering a SYN
//! from a tc program would mean forging the reset by hand; xt_REJECT does exactly that, in the
//! kernel, and is run through the same exec as the NFQUEUE rules (iptables-restore, values
//! faultd produced or validated). It only works in the filter table's INPUT, FORWARD and
//! OUTPUT hooks, so these rules live in chains of their own there: `FAULTD-<id>-ROUT` (from
//! OUTPUT: connects the namespace's own sockets send through the interface), `FAULTD-<id>-RIN`
//! (from INPUT: connects arriving for them) and `FAULTD-<id>-RFWD` (from FORWARD: connects
//! the namespace routes, in either direction). They are tagged, carry the lease deadline and
//! are swept like the NFQUEUE chains (`chains::chain_owner` knows their names).
//!
//! What a SYN is matched on: the interface it leaves by (`-o`, egress) or arrives on (`-i`,
//! ingress), its destination port (the service's), and the peer: its destination on egress,
//! its source on ingress.

use super::Family;
use super::matches::{multiport_lists, peers_of, utc};
use super::rules::{chain_creation, chain_removal};
use crate::fault::{Direction, PeerSet, PortRange};

/// The table xt_REJECT works in.
pub const REFUSE_TABLE: &str = "filter";

/// A built-in chain of the filter table and the suffix of the agent's chain it jumps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseHook {
    Output,
    Input,
    Forward,
}

impl RefuseHook {
    pub(super) const SUFFIXES: [&str; 3] = ["ROUT", "RIN", "RFWD"];

    fn builtin(self) -> &'static str {
        match self {
            Self::Output => "OUTPUT",
            Self::Input => "INPUT",
            Self::Forward => "FORWARD",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Output => "ROUT",
            Self::Input => "RIN",
            Self::Forward => "RFWD",
        }
    }
}

/// The agent chain of `instance` in the filter table for `hook`, e.g. `FAULTD-1a2b3c4d-RFWD`.
pub fn refuse_chain(instance: &str, hook: RefuseHook) -> String {
    format!("{}{instance}-{}", super::CHAIN_PREFIX, hook.suffix())
}

/// The refusing rules of one fault on one interface.
#[derive(Clone, Debug)]
pub struct RefuseRules {
    pub instance: String,
    pub fault: String,
    /// Checked with `check_interface`.
    pub interface: String,
    pub direction: Direction,
    pub ports: Vec<PortRange>,
    /// A number no other fault of this agent uses in the namespace: it names the fault's own
    /// chains, which only a fault that excludes peers has.
    pub tag: u16,
    /// Unix seconds: the last second in which connects are refused (None: no end).
    pub until: Option<u64>,
    pub peers: Option<PeerSet>,
}

/// One side of the interface: the hooks its SYNs take, the interface flag, the peer flag,
/// the letter of the fault's own chain.
struct Side {
    hooks: [RefuseHook; 2],
    interface_flag: &'static str,
    peer_flag: &'static str,
    letter: char,
}

/// What the interface sends: local connects (OUTPUT) and routed ones (FORWARD).
const SENT: Side = Side {
    hooks: [RefuseHook::Output, RefuseHook::Forward],
    interface_flag: "-o",
    peer_flag: "-d",
    letter: 'S',
};

/// What the interface receives: connects to local sockets (INPUT) and routed ones (FORWARD).
const RECEIVED: Side = Side {
    hooks: [RefuseHook::Input, RefuseHook::Forward],
    interface_flag: "-i",
    peer_flag: "-s",
    letter: 'A',
};

impl RefuseRules {
    fn sides(&self) -> Vec<&'static Side> {
        match self.direction {
            Direction::Egress => vec![&SENT],
            Direction::Ingress => vec![&RECEIVED],
            Direction::Both => vec![&SENT, &RECEIVED],
        }
    }

    /// The agent's chains these rules need, each once.
    pub fn hooks(&self) -> Vec<RefuseHook> {
        let mut hooks = Vec::new();
        for side in self.sides() {
            for hook in side.hooks {
                if !hooks.contains(&hook) {
                    hooks.push(hook);
                }
            }
        }
        hooks
    }

    fn own_chain(&self, side: &Side) -> String {
        format!(
            "{}{}-{}{}",
            super::CHAIN_PREFIX,
            self.instance,
            side.letter,
            self.tag
        )
    }

    /// The fault's own chains in `family`: one per side, only where it excludes peers (their
    /// RETURN rules must not skip the rules of other faults).
    fn own_chains(&self, family: Family) -> Vec<String> {
        let (include, exclude) = peers_of(self.peers.as_ref(), family);
        if include.is_empty() || exclude.is_empty() {
            return Vec::new();
        }
        self.sides().iter().map(|s| self.own_chain(s)).collect()
    }

    /// Restore lines creating the fault's own chains in `family` (before `lines`).
    pub fn setup(&self, family: Family) -> Vec<String> {
        chain_creation(&self.own_chains(family))
    }

    /// Restore lines removing the fault's own chains in `family` (after `deletion(lines)`).
    pub fn teardown(&self, family: Family) -> Vec<String> {
        chain_removal(&self.own_chains(family))
    }

    /// `-A` lines for `family`: per side, the jumps to the fault's own chain and its RETURN
    /// rules where it excludes peers, then a REJECT rule per hook, peer and port list.
    pub fn lines(&self, family: Family) -> Vec<String> {
        let (includes, excludes) = peers_of(self.peers.as_ref(), family);
        if includes.is_empty() {
            return Vec::new();
        }
        let comment = format!("-m comment --comment faultd:{}", self.fault);
        let until = match self.until {
            Some(secs) => format!("-m time --datestop {} --utc ", utc(secs)),
            None => String::new(),
        };
        let target = format!("{until}{comment} -j REJECT --reject-with tcp-reset");
        let mut lines = Vec::new();
        for side in self.sides() {
            let flag = side.interface_flag;
            let name = &self.interface;
            // Where the REJECT rules go: the agent's chains, or the fault's own behind a jump
            // that already matched the interface.
            let chains: Vec<(String, String)> = if excludes.is_empty() {
                side.hooks
                    .iter()
                    .map(|h| (refuse_chain(&self.instance, *h), format!(" {flag} {name}")))
                    .collect()
            } else {
                let own = self.own_chain(side);
                for hook in side.hooks {
                    lines.push(format!(
                        "-A {} {flag} {name} -p tcp --syn {comment} -j {own}",
                        refuse_chain(&self.instance, hook)
                    ));
                }
                lines.extend(
                    excludes
                        .iter()
                        .map(|e| format!("-A {own} {} {e} {comment} -j RETURN", side.peer_flag)),
                );
                vec![(own, String::new())]
            };
            for (chain, interface) in &chains {
                for peer in &includes {
                    // `0.0.0.0/0` and `::/0` (only exclusions) match every address.
                    let peer = match peer.filter(|p| p.prefix > 0) {
                        Some(p) => format!(" {} {p}", side.peer_flag),
                        None => String::new(),
                    };
                    for ports in multiport_lists(&self.ports) {
                        lines.push(format!(
                            "-A {chain}{interface}{peer} -p tcp --syn -m multiport --dports \
                             {ports} {target}"
                        ));
                    }
                }
            }
        }
        lines
    }
}

/// Restore lines that create the filter-table chains of `instance` for `hooks` and jump to
/// them first.
pub fn refuse_chain_creation(instance: &str, hooks: &[RefuseHook]) -> Vec<String> {
    let mut lines: Vec<String> = hooks
        .iter()
        .map(|h| format!("-N {}", refuse_chain(instance, *h)))
        .collect();
    lines.extend(
        hooks
            .iter()
            .map(|h| format!("-I {} 1 -j {}", h.builtin(), refuse_chain(instance, *h))),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::netfilter::chains::{chain_owner, deletion};
    use crate::dataplane::netfilter::matches::ports;
    use crate::fault::Cidr;

    fn peers(include: &[&str], exclude: &[&str]) -> Option<PeerSet> {
        let parse =
            |l: &[&str]| -> Vec<Cidr> { l.iter().map(|t| Cidr::parse(t, "t").unwrap()).collect() };
        PeerSet::new(&parse(include), &parse(exclude), "t").unwrap()
    }

    fn rules(direction: Direction) -> RefuseRules {
        RefuseRules {
            instance: "0badcafe".into(),
            fault: "f00d".into(),
            interface: "eth0".into(),
            direction,
            ports: ports(&[(5432, 5432)]),
            tag: 3,
            until: None,
            peers: None,
        }
    }

    #[test]
    fn egress_refuses_connects_leaving_by_the_interface() {
        let mut egress = rules(Direction::Egress);
        assert_eq!(egress.hooks(), [RefuseHook::Output, RefuseHook::Forward]);
        let tail = "-p tcp --syn -m multiport --dports 5432 -m comment --comment faultd:f00d \
                    -j REJECT --reject-with tcp-reset";
        assert_eq!(
            egress.lines(Family::V4),
            vec![
                format!("-A FAULTD-0badcafe-ROUT -o eth0 {tail}"),
                format!("-A FAULTD-0badcafe-RFWD -o eth0 {tail}"),
            ]
        );
        egress.until = Some(1_763_789_407);
        assert!(
            egress.lines(Family::V6)[0]
                .contains("--dports 5432 -m time --datestop 2025-11-22T05:30:07 --utc -m comment")
        );
        assert_eq!(
            deletion(&egress.lines(Family::V4))[0],
            egress.lines(Family::V4)[1].replacen("-A", "-D", 1)
        );
    }

    #[test]
    fn both_directions_use_three_hooks_and_match_peers_by_side() {
        let mut both = rules(Direction::Both);
        assert_eq!(
            both.hooks(),
            [RefuseHook::Output, RefuseHook::Forward, RefuseHook::Input]
        );
        both.peers = peers(&["10.9.0.0/16"], &[]);
        let v4 = both.lines(Family::V4);
        assert_eq!(v4.len(), 4);
        assert!(v4[0].starts_with("-A FAULTD-0badcafe-ROUT -o eth0 -d 10.9.0.0/16 -p tcp --syn"));
        assert!(v4[2].starts_with("-A FAULTD-0badcafe-RIN -i eth0 -s 10.9.0.0/16 -p tcp --syn"));
        assert!(both.lines(Family::V6).is_empty(), "no IPv6 peer: no rule");
    }

    #[test]
    fn exclusions_return_from_the_faults_own_chain() {
        let mut egress = rules(Direction::Egress);
        egress.peers = peers(&[], &["10.9.1.0/24"]);
        let own = "FAULTD-0badcafe-S3";
        assert_eq!(egress.setup(Family::V4), vec![format!("-N {own}")]);
        let v4 = egress.lines(Family::V4);
        assert_eq!(
            v4[..3],
            [
                format!(
                    "-A FAULTD-0badcafe-ROUT -o eth0 -p tcp --syn -m comment --comment \
                     faultd:f00d -j {own}"
                ),
                format!(
                    "-A FAULTD-0badcafe-RFWD -o eth0 -p tcp --syn -m comment --comment \
                     faultd:f00d -j {own}"
                ),
                format!("-A {own} -d 10.9.1.0/24 -m comment --comment faultd:f00d -j RETURN"),
            ]
        );
        assert!(v4[3].starts_with(&format!("-A {own} -p tcp --syn -m multiport")));
        assert_eq!(
            egress.teardown(Family::V4),
            vec![format!("-F {own}"), format!("-X {own}")]
        );
        assert_eq!(chain_owner(own), Some("0badcafe"));
    }

    #[test]
    fn agent_chains_are_created_jumped_to_and_swept_by_name() {
        assert_eq!(
            refuse_chain_creation("0badcafe", &[RefuseHook::Forward]),
            vec![
                "-N FAULTD-0badcafe-RFWD",
                "-I FORWARD 1 -j FAULTD-0badcafe-RFWD"
            ]
        );
        for hook in [RefuseHook::Output, RefuseHook::Input, RefuseHook::Forward] {
            assert_eq!(
                chain_owner(&refuse_chain("0badcafe", hook)),
                Some("0badcafe")
            );
        }
    }
}
