//! What one fault's rules in one namespace say: `FaultRules` and the `-A` lines it renders.

use super::chains::{chain, fault_chain};
use super::marks;
use super::matches::{multiport_lists, peers_of, utc};
use super::{Family, Hook};
use crate::fault::{Action, Direction, PortRange, Protocol};
use crate::fault::{Cidr, PeerSet};

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

/// Which TCP segments a fault queues, by their flags (all of them when a fault has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpFlags {
    /// The first segment of a handshake: SYN without ACK (`slow_connect`).
    Syn,
    /// Segments with FIN (`slow_close`).
    Fin,
}

impl TcpFlags {
    /// The flags an action's segments are told apart by.
    pub fn of(action: &Action) -> Option<TcpFlags> {
        match action {
            Action::SlowConnect { .. } => Some(TcpFlags::Syn),
            Action::SlowClose { .. } => Some(TcpFlags::Fin),
            _ => None,
        }
    }

    /// The xt_tcp match: `--syn` is SYN set with ACK, RST and FIN clear.
    fn matcher(self) -> &'static str {
        match self {
            TcpFlags::Syn => "-m tcp --syn ",
            TcpFlags::Fin => "-m tcp --tcp-flags FIN FIN ",
        }
    }
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
    /// Only TCP segments with these flags are queued (the connection marks of ingress are set
    /// on every segment the workload sends, so that the peer's FIN is matched too).
    pub tcp_flags: Option<TcpFlags>,
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

    /// The fault's own chains in `family`: only a fault that excludes peers of this family
    /// has them (its RETURN rules must not skip the rules of other faults).
    fn own_chains(&self, family: Family) -> Vec<String> {
        let (include, exclude) = peers_of(self.peers.as_ref(), family);
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
        chain_creation(&self.own_chains(family))
    }

    /// Restore lines removing the fault's own chains in `family` (after `deletion(lines)`).
    pub fn teardown(&self, family: Family) -> Vec<String> {
        chain_removal(&self.own_chains(family))
    }

    /// `-A` lines for `family`, in the order they must be evaluated: exclusions first, then
    /// connection marks before the egress NFQUEUE rule, which ends the packet's walk through
    /// the chain. Egress matches a peer as the destination, ingress as the source; addresses
    /// are rendered from parsed CIDRs only.
    pub fn lines(&self, family: Family) -> Vec<String> {
        let (includes, excludes) = peers_of(self.peers.as_ref(), family);
        if includes.is_empty() {
            return Vec::new();
        }
        let comment = format!("-m comment --comment faultd:{}", self.fault);
        let mut lines = Vec::new();
        let (out, input) = self.entry_chains(&excludes, &comment, &mut lines);
        let queue = self.queue_target(&comment);
        for peer in &includes {
            // `0.0.0.0/0` and `::/0` (only exclusions) match every address.
            let (to, from) = match peer.filter(|p| p.prefix > 0) {
                Some(p) => (format!(" -d {p}"), format!(" -s {p}")),
                None => (String::new(), String::new()),
            };
            for protocol in self.protocols() {
                for ports in multiport_lists(&self.ports) {
                    let rule = Rule {
                        out: format!("{out}{to}"),
                        input: format!("{input}{from}"),
                        matches: format!("-p {protocol} -m multiport --ports {ports}"),
                        comment: &comment,
                        queue: &queue,
                    };
                    match &self.matcher {
                        Matcher::Cgroup(path) => self.cgroup_lines(path, &rule, &mut lines),
                        Matcher::Interface(name) => self.interface_lines(name, &rule, &mut lines),
                    }
                }
            }
        }
        lines
    }

    fn protocols(&self) -> &'static [&'static str] {
        match self.protocol {
            Protocol::Tcp => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::Both => &["tcp", "udp"],
        }
    }

    /// The chains the queueing rules go in, (leaving, arriving): the agent's, or the fault's
    /// own where it excludes peers; the jumps to those and their RETURN rules go to `lines`.
    fn entry_chains(
        &self,
        excludes: &[Cidr],
        comment: &str,
        lines: &mut Vec<String>,
    ) -> (String, String) {
        let (leaving, arriving) = self.hook_pair();
        let mut out = chain(&self.instance, leaving);
        let mut input = chain(&self.instance, arriving);
        if excludes.is_empty() {
            return (out, input);
        }
        let mut exclude = |from: &str, hook: Hook, side: &str| {
            let own = fault_chain(&self.instance, hook, self.queue);
            lines.push(format!("-A {from} {comment} -j {own}"));
            lines.extend(
                excludes
                    .iter()
                    .map(|e| format!("-A {own} {side} {e} {comment} -j RETURN")),
            );
            own
        };
        if self.leaving_rules() {
            out = exclude(&out, Hook::Output, "-d");
        }
        if self.ingress() {
            input = exclude(&input, Hook::Input, "-s");
        }
        (out, input)
    }

    /// The end of every queueing rule: the TCP flags, the kernel-side deadline, the comment,
    /// the queue.
    fn queue_target(&self, comment: &str) -> String {
        let flags = self.tcp_flags.map_or("", TcpFlags::matcher);
        let until = match self.until {
            Some(secs) => format!("-m time --datestop {} --utc ", utc(secs)),
            None => String::new(),
        };
        format!(
            "{flags}{until}{comment} -j NFQUEUE --queue-num {} --queue-bypass",
            self.queue
        )
    }

    /// An interface fault: each direction has its hook, no marks needed.
    fn interface_lines(&self, name: &str, rule: &Rule<'_>, lines: &mut Vec<String>) {
        let Rule {
            out,
            input,
            matches,
            queue,
            ..
        } = rule;
        if self.egress() {
            lines.push(format!("-A {out} -o {name} {matches} {queue}"));
        }
        if self.ingress() {
            lines.push(format!("-A {input} -i {name} {matches} {queue}"));
        }
    }

    /// A cgroup fault: connection marks (for ingress) before the egress NFQUEUE rule, which
    /// ends the packet's walk through the chain.
    fn cgroup_lines(&self, path: &str, rule: &Rule<'_>, lines: &mut Vec<String>) {
        let Rule {
            out,
            input,
            matches,
            comment,
            queue,
        } = rule;
        let cgroup = format!("-m cgroup --path {path}");
        if let (true, Some(id)) = (self.ingress(), self.mark_id) {
            for (ctdir, side) in marks::SENT {
                lines.push(format!(
                    "-A {out} {cgroup} {matches} -m conntrack --ctdir {ctdir} \
                     {comment} -j CONNMARK --set-xmark {}",
                    marks::mark(id, side)
                ));
            }
            // Ingress to the workload flows against the direction it sent in.
            for (ctdir, side) in marks::AGAINST {
                lines.push(format!(
                    "-A {input} {matches} -m connmark --mark {} -m conntrack --ctdir {ctdir} {queue}",
                    marks::mark(id, side)
                ));
            }
        }
        if self.egress() {
            lines.push(format!("-A {out} {cgroup} {matches} {queue}"));
        }
    }
}

/// One queueing rule's parts: the chains with the peer address, what it matches, its end.
struct Rule<'a> {
    /// The leaving chain and ` -d PEER`.
    out: String,
    /// The arriving chain and ` -s PEER`.
    input: String,
    /// Protocol and ports.
    matches: String,
    comment: &'a str,
    queue: &'a str,
}

/// Restore lines creating a fault's own chains.
pub(super) fn chain_creation(chains: &[String]) -> Vec<String> {
    chains.iter().map(|chain| format!("-N {chain}")).collect()
}

/// Restore lines emptying, then removing, a fault's own chains.
pub(super) fn chain_removal(chains: &[String]) -> Vec<String> {
    let mut lines: Vec<String> = chains.iter().map(|c| format!("-F {c}")).collect();
    lines.extend(chains.iter().map(|c| format!("-X {c}")));
    lines
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::dataplane::netfilter::Listing;
    use crate::dataplane::netfilter::chains::{chain_owner, deletion};
    use crate::dataplane::netfilter::matches::ports;

    /// A cgroup's TCP rules on 6379, both ways, queue 40000, no marks, flags, date or peers.
    fn redis_rules() -> FaultRules {
        FaultRules {
            instance: "0badcafe".into(),
            fault: "f00d".into(),
            matcher: Matcher::Cgroup("/app".into()),
            protocol: Protocol::Tcp,
            direction: Direction::Both,
            ports: ports(&[(6379, 6379)]),
            queue: 40000,
            mark_id: None,
            tcp_flags: None,
            until: None,
            peers: None,
        }
    }

    #[test]
    fn egress_rules_match_the_cgroup_and_either_port() {
        let mut rules = FaultRules {
            direction: Direction::Egress,
            ..redis_rules()
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
    fn handshake_and_close_faults_queue_only_their_segments() {
        let mut rules = FaultRules {
            mark_id: Some(1),
            tcp_flags: Some(TcpFlags::Syn),
            ..redis_rules()
        };
        let lines = rules.lines(Family::V4);
        // The marks are set on every segment the workload sends; only queueing looks at flags.
        let (queueing, marking): (Vec<&String>, Vec<&String>) =
            lines.iter().partition(|l| l.contains("NFQUEUE"));
        assert!(!queueing.is_empty() && !marking.is_empty(), "{lines:?}");
        assert!(
            queueing
                .iter()
                .all(|l| l.contains("-p tcp -m multiport --ports 6379")
                    && l.contains("-m tcp --syn -m comment")),
            "{queueing:?}"
        );
        assert!(
            marking.iter().all(|l| !l.contains("-m tcp ")),
            "{marking:?}"
        );
        rules.tcp_flags = Some(TcpFlags::Fin);
        assert!(
            rules
                .lines(Family::V6)
                .iter()
                .filter(|l| l.contains("NFQUEUE"))
                .all(|l| l.contains("-m tcp --tcp-flags FIN FIN -m comment")),
        );
    }

    #[test]
    fn ingress_rules_mark_connections_on_the_way_out() {
        let rules = FaultRules {
            protocol: Protocol::Both,
            queue: 7,
            mark_id: Some(3),
            ..redis_rules()
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
            mark_id: Some(2),
            peers: peers(&["127.0.0.2/32", "10.0.0.0/8"], &[]),
            ..redis_rules()
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
    fn interface_rules_queue_what_leaves_in_postrouting_and_what_arrives_in_prerouting() {
        let mut rules = FaultRules {
            matcher: Matcher::Interface("r1".into()),
            ..redis_rules()
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
}
