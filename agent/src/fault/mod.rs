//! The domain model: what a fault does (`Action`), to whom (`Target`), and how a request is
//! validated. No tonic and no aya types here: the API converts into these, the engine applies them.

use std::collections::BTreeMap;
use std::time::Duration;

pub mod limits;
mod peers;
pub mod view;

pub use peers::{Cidr, PeerSet};

/// A scope as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedScope {
    /// Path relative to faultd's cgroup root (`--cgroup-root`), always starting with `/`.
    /// What the kernel calls the cgroup's path may differ: see `target::namespace_path`.
    pub cgroup_path: String,
    /// The cgroup v2 id (the directory's inode number), as `bpf_skb_cgroup_id` returns it.
    pub cgroup_id: u64,
    /// The cgroup's directory on this host.
    pub dir: std::path::PathBuf,
}

use faultd_common::{DIR_CONNECT, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP, RuleKey};

pub type FaultId = String;
pub type LeaseId = String;
pub type Labels = BTreeMap<String, String>;

/// Most kernel entries (protocol × direction × port) one fault may need.
pub const MAX_RULES_PER_FAULT: usize = 4096;

/// Most peer entries (prefixes × kernel keys) one fault may need.
pub const MAX_PEER_ENTRIES_PER_FAULT: usize = 8192;

/// A request field that failed validation: `field` is the path a user typed, e.g.
/// `fault.drop.percent`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
    /// The field is well-formed but larger than faultd accepts (RESOURCE_EXHAUSTED rather than
    /// INVALID_ARGUMENT): see `limits`.
    pub over_limit: bool,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            over_limit: false,
        }
    }

    /// A field over one of faultd's bounds.
    pub fn over_limit(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            over_limit: true,
            ..Self::new(field, reason)
        }
    }
}

/// Longest latency, and largest jitter, a delay fault may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// How a delay or bandwidth fault is applied (DESIGN.md, Mechanisms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// A netem (or tbf/htb) class selected by a BPF classifier.
    Netem,
    /// Departure times set by a BPF program, enforced by the fq qdisc.
    Edt,
    /// Packets held in user space through an NFQUEUE rule with `--queue-bypass`.
    Nfqueue,
}

impl Mechanism {
    /// In the order the agent prefers them when the user leaves the choice to it.
    pub const PREFERENCE: [Mechanism; 3] = [Mechanism::Netem, Mechanism::Edt, Mechanism::Nfqueue];

    /// The name shown to users (`Fault.mechanism`, `faultctl caps`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Netem => "netem",
            Self::Edt => "edt",
            Self::Nfqueue => "nfqueue",
        }
    }
}

/// `delay`: hold each matched packet for `latency` plus a normally distributed random part of
/// standard deviation `jitter`, whose successive values are correlated by `correlation` %.
#[derive(Clone, Debug, PartialEq)]
pub struct Delay {
    pub latency: Duration,
    pub jitter: Duration,
    /// 0 to 100.
    pub correlation: f64,
    /// None: the agent chooses.
    pub mechanism: Option<Mechanism>,
}

/// `bandwidth`: pace the matched packets to `rate_bytes_per_sec` through a token bucket of
/// `burst` bytes (one bucket per direction).
#[derive(Clone, Debug, PartialEq)]
pub struct Bandwidth {
    pub rate_bytes_per_sec: u64,
    pub burst: u64,
    /// None: the agent chooses.
    pub mechanism: Option<Mechanism>,
}

impl Bandwidth {
    /// The bucket when the user gives none: 10 ms at the rate, and at least one full-size
    /// Ethernet frame so that a packet never waits for more tokens than the bucket holds.
    pub fn default_burst(rate_bytes_per_sec: u64) -> u64 {
        (rate_bytes_per_sec / 100).max(1514)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Drop `percent` (0–100) of the matched packets.
    Drop {
        percent: f64,
    },
    /// New TCP connects of the target fail with ECONNREFUSED; existing connections live on.
    Reject,
    /// Established TCP connections of the target are torn down at once, and new connects are
    /// refused for as long as the fault lasts. With `after_bytes`, each connection is instead
    /// torn down once it has carried that many bytes, and new connects are allowed.
    Reset {
        after_bytes: Option<u64>,
    },
    Delay(Delay),
    Bandwidth(Bandwidth),
}

impl Action {
    pub fn drop(percent: f64, field: &str) -> Result<Self, Invalid> {
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return Err(Invalid::new(
                field,
                format!("{percent} is outside 0 to 100"),
            ));
        }
        Ok(Self::Drop { percent })
    }

    /// `field` is the action's path, e.g. `fault.delay`.
    pub fn delay(
        latency: Duration,
        jitter: Duration,
        correlation: f64,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        if latency.is_zero() {
            return Err(Invalid::new(
                format!("{field}.latency"),
                "must be greater than 0 (e.g. \"100ms\")",
            ));
        }
        for (name, value) in [("latency", latency), ("jitter", jitter)] {
            if value > MAX_DELAY {
                return Err(Invalid::new(
                    format!("{field}.{name}"),
                    format!(
                        "{} exceeds the maximum {}",
                        crate::duration::format(value),
                        crate::duration::format(MAX_DELAY)
                    ),
                ));
            }
        }
        if !correlation.is_finite() || !(0.0..=100.0).contains(&correlation) {
            return Err(Invalid::new(
                format!("{field}.correlation"),
                format!("{correlation} is outside 0 to 100"),
            ));
        }
        Ok(Self::Delay(Delay {
            latency,
            jitter,
            correlation,
            mechanism,
        }))
    }

    /// `burst` 0 takes `Bandwidth::default_burst`.
    pub fn bandwidth(
        rate_bytes_per_sec: u64,
        burst: u64,
        mechanism: Option<Mechanism>,
        field: &str,
    ) -> Result<Self, Invalid> {
        if rate_bytes_per_sec == 0 {
            return Err(Invalid::new(
                format!("{field}.rate_bytes_per_sec"),
                "must be greater than 0 (e.g. 262144 for 256 KiB/s); use drop to cut traffic off",
            ));
        }
        let burst = match burst {
            0 => Bandwidth::default_burst(rate_bytes_per_sec),
            burst => burst,
        };
        Ok(Self::Bandwidth(Bandwidth {
            rate_bytes_per_sec,
            burst,
            mechanism,
        }))
    }

    pub fn reset(after_bytes: Option<u64>, field: &str) -> Result<Self, Invalid> {
        if after_bytes == Some(0) {
            return Err(Invalid::new(
                field,
                "must be at least 1 (leave it out to reset every connection now)",
            ));
        }
        Ok(Self::Reset { after_bytes })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Drop { .. } => "drop",
            Self::Delay(_) => "delay",
            Self::Bandwidth(_) => "bandwidth",
            Self::Reject => "reject",
            Self::Reset { .. } => "reset",
        }
    }

    /// For actions applied by a shaping mechanism (delay, bandwidth): the mechanism the user
    /// forced, if any. None for actions of the cgroup_skb datapath.
    pub fn shaping(&self) -> Option<Option<Mechanism>> {
        match self {
            Self::Drop { .. } | Self::Reject | Self::Reset { .. } => None,
            Self::Delay(delay) => Some(delay.mechanism),
            Self::Bandwidth(bandwidth) => Some(bandwidth.mechanism),
        }
    }

    /// `percent` as the threshold the program compares `bpf_get_prandom_u32()` with (0 for
    /// actions that drop nothing).
    pub fn drop_threshold(&self) -> u64 {
        match self {
            Self::Drop { percent } => {
                ((percent / 100.0) * faultd_common::DROP_ALL as f64).round() as u64
            }
            Self::Reject | Self::Reset { .. } | Self::Delay(_) | Self::Bandwidth(_) => 0,
        }
    }

    /// Whether new connects of the target are refused while the fault lasts.
    pub fn refuses_connects(&self) -> bool {
        matches!(self, Self::Reject | Self::Reset { after_bytes: None })
    }

    /// Whether the fault acts on connections rather than packets.
    fn on_connections(&self) -> bool {
        matches!(self, Self::Reject | Self::Reset { .. })
    }
}

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
        format!(
            "{} {} ports {}{peers} of {scope}",
            self.protocol.name(),
            self.direction.name(),
            ports.join(",")
        )
    }
}

/// What a user asks for: an action on a target, with labels.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    pub action: Action,
    pub target: Target,
    pub labels: Labels,
}

impl FaultSpec {
    /// The target's checks, and what the action asks of the target.
    pub fn validate(&self) -> Result<(), Invalid> {
        limits::labels(&self.labels, "fault.labels")?;
        self.target.validate()?;
        if matches!(self.target.scope, Scope::Netns { .. }) && self.action.on_connections() {
            return Err(Invalid::new(
                "fault.target.netns",
                format!(
                    "{} acts on local sockets, which an interface in a network namespace does not \
                     have (drop, delay and bandwidth can target one)",
                    self.action.name()
                ),
            ));
        }
        if self.action.on_connections() {
            let action = self.action.name();
            if self.target.protocol == Protocol::Udp {
                return Err(Invalid::new(
                    "fault.target.protocol",
                    format!("{action} acts on TCP connections: use TCP or leave it unset"),
                ));
            }
            if self.target.direction == Direction::Ingress {
                return Err(Invalid::new(
                    "fault.target.direction",
                    format!(
                        "{action} acts on the connections the workload opens: use EGRESS or \
                         leave it unset"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The kernel keys of this fault in the scope `scope_id`, without duplicates. Packet faults
    /// key on (protocol, direction, port); connection faults on the TCP connect's destination
    /// port (a `reset` with `after_bytes` refuses nothing, so it has no keys).
    pub fn rule_keys(&self, scope_id: u64) -> Vec<RuleKey> {
        if !self.action.on_connections() {
            return self.target.rule_keys(scope_id);
        }
        if !self.action.refuses_connects() {
            return Vec::new();
        }
        let mut keys: Vec<_> = self
            .target
            .ports
            .iter()
            .flat_map(|r| r.first..=r.last)
            .map(|port| RuleKey::new(scope_id, PROTO_TCP, DIR_CONNECT, port))
            .collect();
        keys.sort_unstable_by_key(|k| k.port);
        keys.dedup();
        keys
    }

    /// The spec as it is applied, so that what the API shows is what happens: connection
    /// faults act on TCP connects the workload makes (protocol TCP, direction egress).
    pub fn normalized(mut self) -> Self {
        if self.action.on_connections() {
            self.target.protocol = Protocol::Tcp;
            self.target.direction = Direction::Egress;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ports: Vec<PortRange>, protocol: Protocol, direction: Direction) -> Target {
        Target {
            scope: Scope::Host,
            ports,
            protocol,
            direction,
            peers: Vec::new(),
            exclude_peers: Vec::new(),
        }
    }

    #[test]
    fn percent_must_be_between_0_and_100() {
        assert!(Action::drop(0.0, "p").is_ok());
        assert!(Action::drop(100.0, "p").is_ok());
        assert!(Action::drop(30.5, "p").is_ok());
        let err = Action::drop(101.0, "fault.drop.percent").unwrap_err();
        assert_eq!(err.field, "fault.drop.percent");
        assert!(Action::drop(-1.0, "p").is_err());
        assert!(Action::drop(f64::NAN, "p").is_err());
    }

    #[test]
    fn delays_are_checked_field_by_field() {
        let ms = Duration::from_millis;
        let delay = Action::delay(ms(100), ms(20), 25.0, None, "fault.delay").unwrap();
        assert_eq!(delay.name(), "delay");
        assert_eq!(delay.shaping(), Some(None));
        assert_eq!(delay.drop_threshold(), 0);
        let field = |latency, jitter, correlation| {
            Action::delay(latency, jitter, correlation, None, "fault.delay")
                .unwrap_err()
                .field
        };
        assert_eq!(field(ms(0), ms(0), 0.0), "fault.delay.latency");
        assert_eq!(field(ms(61_000), ms(0), 0.0), "fault.delay.latency");
        assert_eq!(field(ms(10), ms(61_000), 0.0), "fault.delay.jitter");
        assert_eq!(field(ms(10), ms(0), 100.5), "fault.delay.correlation");
        assert_eq!(field(ms(10), ms(0), f64::NAN), "fault.delay.correlation");
        let forced = Action::delay(ms(1), ms(0), 0.0, Some(Mechanism::Nfqueue), "f").unwrap();
        assert_eq!(forced.shaping(), Some(Some(Mechanism::Nfqueue)));
    }

    #[test]
    fn bandwidth_needs_a_rate_and_defaults_its_burst() {
        let err = Action::bandwidth(0, 0, None, "fault.bandwidth").unwrap_err();
        assert_eq!(err.field, "fault.bandwidth.rate_bytes_per_sec");
        let Action::Bandwidth(b) = Action::bandwidth(262_144, 0, None, "f").unwrap() else {
            panic!("not a bandwidth action");
        };
        assert_eq!(b.burst, 2621);
        let Action::Bandwidth(b) = Action::bandwidth(1000, 0, None, "f").unwrap() else {
            panic!("not a bandwidth action");
        };
        assert_eq!(b.burst, 1514, "at least one full frame");
        let Action::Bandwidth(b) = Action::bandwidth(1000, 64, None, "f").unwrap() else {
            panic!("not a bandwidth action");
        };
        assert_eq!(b.burst, 64, "the user's burst is kept");
        assert_eq!(Action::Drop { percent: 1.0 }.shaping(), None);
    }

    #[test]
    fn drop_threshold_scales_to_u32_range() {
        assert_eq!(Action::Drop { percent: 0.0 }.drop_threshold(), 0);
        assert_eq!(Action::Drop { percent: 100.0 }.drop_threshold(), 1 << 32);
        assert_eq!(Action::Drop { percent: 50.0 }.drop_threshold(), 1 << 31);
    }

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(PortRange::new(6379, None, "f").unwrap().port_count(), 1);
        assert_eq!(
            PortRange::new(8000, Some(8010), "f").unwrap().port_count(),
            11
        );
        assert_eq!(PortRange::new(0, None, "f").unwrap_err().field, "f.first");
        assert_eq!(
            PortRange::new(70000, None, "f").unwrap_err().field,
            "f.first"
        );
        assert_eq!(
            PortRange::new(10, Some(5), "f").unwrap_err().field,
            "f.last"
        );
    }

    #[test]
    fn keys_cover_protocols_directions_and_ports_once() {
        let ranges = vec![
            PortRange::new(6379, None, "f").unwrap(),
            PortRange::new(6379, Some(6380), "f").unwrap(),
        ];
        let t = target(ranges, Protocol::Both, Direction::Both);
        let keys = t.rule_keys(7);
        assert_eq!(keys.len(), 2 * 2 * 2);
        assert!(keys.iter().all(|k| k.scope_id == 7));
        assert!(keys.contains(&RuleKey::new(7, PROTO_UDP, DIR_INGRESS, 6380)));

        let t = target(
            vec![PortRange::new(5432, None, "f").unwrap()],
            Protocol::Tcp,
            Direction::Egress,
        );
        assert_eq!(
            t.rule_keys(1),
            vec![RuleKey::new(1, PROTO_TCP, DIR_EGRESS, 5432)]
        );
    }

    #[test]
    fn connection_faults_key_on_tcp_connects() {
        let spec = |action, protocol, direction| FaultSpec {
            action,
            target: target(
                vec![PortRange::new(5432, Some(5433), "f").unwrap()],
                protocol,
                direction,
            ),
            labels: Labels::new(),
        };
        let reject = spec(Action::Reject, Protocol::Both, Direction::Both);
        assert!(reject.validate().is_ok());
        assert_eq!(
            reject.rule_keys(9),
            vec![
                RuleKey::new(9, PROTO_TCP, DIR_CONNECT, 5432),
                RuleKey::new(9, PROTO_TCP, DIR_CONNECT, 5433)
            ]
        );
        let reset = spec(
            Action::Reset { after_bytes: None },
            Protocol::Tcp,
            Direction::Egress,
        );
        assert_eq!(reset.rule_keys(9).len(), 2);
        let limited = spec(
            Action::Reset {
                after_bytes: Some(10),
            },
            Protocol::Tcp,
            Direction::Egress,
        );
        assert!(limited.rule_keys(9).is_empty());
        let udp = spec(Action::Reject, Protocol::Udp, Direction::Both);
        assert_eq!(udp.validate().unwrap_err().field, "fault.target.protocol");
        let ingress = spec(Action::Reject, Protocol::Tcp, Direction::Ingress);
        assert_eq!(
            ingress.validate().unwrap_err().field,
            "fault.target.direction"
        );
        assert_eq!(
            Action::reset(Some(0), "fault.reset.after_bytes")
                .unwrap_err()
                .field,
            "fault.reset.after_bytes"
        );
    }

    #[test]
    fn targets_need_ports_and_bounded_entries() {
        assert_eq!(
            target(vec![], Protocol::Tcp, Direction::Egress)
                .validate()
                .unwrap_err()
                .field,
            "fault.target.ports"
        );
        let all = vec![PortRange::new(1, Some(65535), "f").unwrap()];
        assert!(
            target(all, Protocol::Tcp, Direction::Egress)
                .validate()
                .is_err()
        );
        let some = vec![PortRange::new(1, Some(1024), "f").unwrap()];
        assert!(
            target(some, Protocol::Both, Direction::Both)
                .validate()
                .is_ok()
        );
    }
}
