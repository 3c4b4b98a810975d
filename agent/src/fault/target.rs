//! To whom a fault is done: the scope (host, cgroup, pid, pod, container, netns interface),
//! ports, protocol, direction and peers, with their validation and kernel keys.

use faultd_common::{DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP, RuleKey};

use super::{
    Cidr, Invalid, MAX_PEER_ENTRIES_PER_FAULT, MAX_RULES_PER_FAULT, PeerSet, RequestMatch, limits,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every socket on the host (the cgroup v2 root).
    Host,
    /// A cgroup, by path relative to the cgroup v2 root.
    Cgroup { path: String },
    /// The cgroup of a process, resolved when the fault is injected.
    Pid { pid: u32 },
    /// A Kubernetes pod's cgroup, found by its uid under the kubelet's cgroup tree: every
    /// container of the pod, including those that (re)start later.
    Pod { uid: String },
    /// A container's cgroup, found by its id in the scope name the runtime gives it.
    Container { id: String },
    /// An interface inside a network namespace (`/run/netns/NAME` or `/proc/PID/ns/net`): what
    /// crosses it, routed or bridged traffic included, whichever socket (if any) owns it.
    Netns { path: String, interface: String },
}

impl Scope {
    /// The kind of scope, as metrics and logs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Cgroup { .. } => "cgroup",
            Self::Pid { .. } => "pid",
            Self::Pod { .. } => "pod",
            Self::Container { .. } => "container",
            Self::Netns { .. } => "netns",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn new(first: u32, last: Option<u32>, field: &str) -> Result<Self, Invalid> {
        let last = last.unwrap_or(first);
        let port = |value: u32, name: &str| {
            u16::try_from(value)
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| {
                    Invalid::new(
                        format!("{field}.{name}"),
                        format!("{value} is not a port (1 to 65535)"),
                    )
                })
        };
        let (first, last) = (port(first, "first")?, port(last, "last")?);
        if last < first {
            return Err(Invalid::new(
                format!("{field}.last"),
                format!("{last} is below first ({first})"),
            ));
        }
        Ok(Self { first, last })
    }

    /// Number of ports in the range (never 0).
    pub fn port_count(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    Tcp,
    Udp,
    #[default]
    Both,
}

impl Protocol {
    fn numbers(self) -> &'static [u8] {
        match self {
            Self::Tcp => &[PROTO_TCP],
            Self::Udp => &[PROTO_UDP],
            Self::Both => &[PROTO_TCP, PROTO_UDP],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Both => "tcp+udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    Egress,
    Ingress,
    #[default]
    Both,
}

impl Direction {
    fn numbers(self) -> &'static [u8] {
        match self {
            Self::Egress => &[DIR_EGRESS],
            Self::Ingress => &[DIR_INGRESS],
            Self::Both => &[DIR_EGRESS, DIR_INGRESS],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
            Self::Both => "both",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub scope: Scope,
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub direction: Direction,
    /// Remote addresses the fault is limited to (empty: every address).
    pub peers: Vec<Cidr>,
    /// Remote addresses it spares.
    pub exclude_peers: Vec<Cidr>,
    /// Only requests of an application protocol the workload sends (TCP, egress).
    pub request: Option<RequestMatch>,
}

impl Target {
    /// The peers the fault is limited to, normalized; None when it names none.
    pub fn peer_set(&self) -> Result<Option<PeerSet>, Invalid> {
        PeerSet::new(&self.peers, &self.exclude_peers, "fault.target")
    }

    /// Checks what no single field can: at least one port, and a bounded number of entries.
    pub fn validate(&self) -> Result<(), Invalid> {
        // The counts first: what follows grows with them.
        limits::target_counts(
            self.ports.len(),
            self.peers.len() + self.exclude_peers.len(),
        )?;
        if self.ports.is_empty() {
            return Err(Invalid::new(
                "fault.target.ports",
                "at least one port or range is required (e.g. {\"first\": 6379})",
            ));
        }
        let rules = self.rule_count();
        if rules > MAX_RULES_PER_FAULT {
            return Err(Invalid::over_limit(
                "fault.target.ports",
                format!(
                    "needs {rules} kernel entries (ports x protocols x directions); at most \
                     {MAX_RULES_PER_FAULT} per fault"
                ),
            ));
        }
        let peers = self
            .peer_set()?
            .map_or(0, |s| s.include.len() + s.exclude.len());
        if peers * rules > MAX_PEER_ENTRIES_PER_FAULT {
            return Err(Invalid::over_limit(
                "fault.target.peers",
                format!(
                    "needs {} kernel entries (peer prefixes x ports x protocols x directions); at \
                     most {MAX_PEER_ENTRIES_PER_FAULT} per fault",
                    peers * rules
                ),
            ));
        }
        Ok(())
    }

    pub fn rule_count(&self) -> usize {
        let ports: usize = self.ports.iter().map(PortRange::port_count).sum();
        ports * self.protocol.numbers().len() * self.direction.numbers().len()
    }

    /// The kernel keys of this target in the scope `scope_id`, without duplicates.
    pub fn rule_keys(&self, scope_id: u64) -> Vec<RuleKey> {
        let mut keys = Vec::with_capacity(self.rule_count());
        for &protocol in self.protocol.numbers() {
            for &direction in self.direction.numbers() {
                for range in &self.ports {
                    for port in range.first..=range.last {
                        keys.push(RuleKey::new(scope_id, protocol, direction, port));
                    }
                }
            }
        }
        keys.sort_unstable_by_key(|k| (k.protocol, k.direction, k.port));
        keys.dedup();
        keys
    }

    /// A one-line summary for logs and the CLI, e.g. `tcp egress ports 6379,8000-8010`.
    pub fn summary(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|r| {
                if r.first == r.last {
                    r.first.to_string()
                } else {
                    format!("{}-{}", r.first, r.last)
                }
            })
            .collect();
        let scope = match &self.scope {
            Scope::Host => "host".to_string(),
            Scope::Cgroup { path } => format!("cgroup {path}"),
            Scope::Pid { pid } => format!("pid {pid}"),
            Scope::Pod { uid } => format!("pod {uid}"),
            Scope::Container { id } => format!("container {id}"),
            Scope::Netns { path, interface } => format!("interface {interface} of netns {path}"),
        };
        let mut peers = String::new();
        if !self.peers.is_empty() {
            let list: Vec<_> = self.peers.iter().map(Cidr::to_string).collect();
            peers += &format!(" peers {}", list.join(","));
        }
        if !self.exclude_peers.is_empty() {
            let list: Vec<_> = self.exclude_peers.iter().map(Cidr::to_string).collect();
            peers += &format!(" except {}", list.join(","));
        }
        if let Some(request) = &self.request {
            peers += &format!(" {}", request.summary());
        }
        format!(
            "{} {} ports {}{peers} of {scope}",
            self.protocol.name(),
            self.direction.name(),
            ports.join(",")
        )
    }
}
