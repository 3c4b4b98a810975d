//! The domain model: what a fault does (`Action`), to whom (`Target`), and how a request is
//! validated. No tonic and no aya types here: the API converts into these, the engine applies them.

use std::collections::BTreeMap;

use faultd_common::{DIR_CONNECT, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP, RuleKey};

pub type FaultId = String;
pub type LeaseId = String;
pub type Labels = BTreeMap<String, String>;

/// Most kernel entries (protocol × direction × port) one fault may need.
pub const MAX_RULES_PER_FAULT: usize = 4096;

/// A request field that failed validation: `field` is the path a user typed, e.g.
/// `fault.drop.percent`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Drop `percent` (0–100) of the matched packets.
    Drop { percent: f64 },
    /// New TCP connects of the target fail with ECONNREFUSED; existing connections live on.
    Reject,
    /// Established TCP connections of the target are torn down at once, and new connects are
    /// refused for as long as the fault lasts. With `after_bytes`, each connection is instead
    /// torn down once it has carried that many bytes, and new connects are allowed.
    Reset { after_bytes: Option<u64> },
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
            Self::Reject => "reject",
            Self::Reset { .. } => "reset",
        }
    }

    /// `percent` as the threshold the program compares `bpf_get_prandom_u32()` with.
    pub fn drop_threshold(&self) -> u64 {
        match self {
            Self::Drop { percent } => {
                ((percent / 100.0) * faultd_common::DROP_ALL as f64).round() as u64
            }
            Self::Reject | Self::Reset { .. } => 0,
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
}

impl Target {
    /// Checks what no single field can: at least one port, and a bounded number of entries.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.ports.is_empty() {
            return Err(Invalid::new(
                "fault.target.ports",
                "at least one port or range is required (e.g. {\"first\": 6379})",
            ));
        }
        let rules = self.rule_count();
        if rules > MAX_RULES_PER_FAULT {
            return Err(Invalid::new(
                "fault.target.ports",
                format!(
                    "needs {rules} kernel entries (ports x protocols x directions); at most \
                     {MAX_RULES_PER_FAULT} per fault"
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
        };
        format!(
            "{} {} ports {} of {scope}",
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
        self.target.validate()?;
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
