//! Guardrails: what no request may do, whoever sends it. The operator writes them in a TOML file
//! (`--policy PATH`); without one, the safe defaults below apply.
//!
//! ```toml
//! max_ttl = "1h"               # longest lease a client may ask for
//! max_fault_duration = "1h"    # longest a fault stays in force, however often its lease is renewed
//! max_active_faults = 1000
//! max_leases = 1000
//! allow_host_scope = false     # faults on the whole host (the cgroup v2 root)
//!
//! [protected_ports]
//! # Built in: ssh = [22], dns = [53], kubelet = [10250], kube-apiserver = [6443] and
//! # faultd = faultd's own TCP ports (--listen, --metrics-addr). `name = false` removes one;
//! # a new name with a list of ports and ranges adds a rule.
//! dns = false
//! etcd = [2379, "2380-2381"]
//! ```
//!
//! A request that touches a protected port, or the host scope when it is not allowed, gets
//! PERMISSION_DENIED naming the rule; one over a limit gets RESOURCE_EXHAUSTED naming it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::fault::ResolvedScope;
use crate::fault::{Invalid, PortRange, Scope, Target};

/// The rule that protects faultd's own TCP ports.
pub const SELF_RULE: &str = "faultd";

/// A policy file that cannot be used: faultd refuses to start with it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading the policy file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {path}: {source}")]
    Invalid {
        path: String,
        #[source]
        source: InvalidPolicy,
    },
}

/// What is wrong in a policy's text.
#[derive(Debug, thiserror::Error)]
pub enum InvalidPolicy {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("{key}: must be longer than zero")]
    ZeroDuration { key: &'static str },
    /// `reason`: why the duration text does not parse.
    #[error("{key}: {reason}")]
    Duration { key: &'static str, reason: String },
    #[error(
        "protected_ports.{name}: not a built-in rule; give it a list of ports, e.g. {name} = \
         [2379, \"8000-8010\"]"
    )]
    NotBuiltIn { name: String },
    #[error(
        "protected_ports.{SELF_RULE}: faultd's own ports come from --listen and --metrics-addr; \
         write {SELF_RULE} = false to allow faults on them"
    )]
    SelfPorts,
    #[error(
        "protected_ports.{name}: an empty list protects nothing; write {name} = false to remove \
         a built-in rule"
    )]
    EmptyList { name: String },
    #[error("{field}: {text} is not a port or range (e.g. 2379 or \"8000-8010\")")]
    NotAPort { field: String, text: String },
    #[error(transparent)]
    Port(#[from] Invalid),
}

/// A request the policy forbids: `rule` is the policy's name for what forbids it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason} (policy rule {rule})")]
pub struct Denied {
    pub field: String,
    pub rule: String,
    pub reason: String,
}

/// Ports no fault may touch, under the name an operator uses to remove them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectedPorts {
    pub rule: String,
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub max_ttl: Duration,
    pub max_fault_duration: Duration,
    pub max_active_faults: usize,
    pub max_leases: usize,
    pub allow_host_scope: bool,
    /// In the order they are checked: built-in rules first, then the file's own.
    pub protected: Vec<ProtectedPorts>,
    /// Whether faultd's own TCP ports are protected (`faultd = false` turns it off).
    pub protect_self: bool,
}

/// The built-in protected ports.
const BUILT_IN: &[(&str, u16)] = &[
    ("ssh", 22),
    ("dns", 53),
    ("kube-apiserver", 6443),
    ("kubelet", 10250),
];

fn single(port: u16) -> PortRange {
    PortRange {
        first: port,
        last: port,
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(3600),
            max_fault_duration: Duration::from_secs(3600),
            max_active_faults: 1000,
            max_leases: 1000,
            allow_host_scope: false,
            protected: BUILT_IN
                .iter()
                .map(|(rule, port)| ProtectedPorts {
                    rule: (*rule).to_string(),
                    ports: vec![single(*port)],
                })
                .collect(),
            protect_self: true,
        }
    }
}

/// The file as written; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    max_ttl: Option<String>,
    max_fault_duration: Option<String>,
    max_active_faults: Option<usize>,
    max_leases: Option<usize>,
    allow_host_scope: Option<bool>,
    #[serde(default)]
    protected_ports: BTreeMap<String, Rule>,
}

/// `name = false` (remove a built-in rule), `name = true` (keep it) or a list of ports.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Rule {
    Keep(bool),
    Ports(Vec<PortSpec>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortSpec {
    Port(i64),
    Text(String),
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| PolicyError::Invalid {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses a policy; what the text leaves out keeps its default.
    pub fn from_toml(text: &str) -> Result<Self, InvalidPolicy> {
        let file: File = toml::from_str(text)?;
        let mut policy = Self::default();
        let duration = |value: &Option<String>, key: &'static str, default: Duration| match value {
            None => Ok(default),
            Some(text) => match crate::duration::parse(text) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(InvalidPolicy::ZeroDuration { key }),
                Err(why) => Err(InvalidPolicy::Duration {
                    key,
                    reason: why.to_string(),
                }),
            },
        };
        policy.max_ttl = duration(&file.max_ttl, "max_ttl", policy.max_ttl)?;
        policy.max_fault_duration = duration(
            &file.max_fault_duration,
            "max_fault_duration",
            policy.max_fault_duration,
        )?;
        if let Some(max) = file.max_active_faults {
            policy.max_active_faults = max;
        }
        if let Some(max) = file.max_leases {
            policy.max_leases = max;
        }
        if let Some(allow) = file.allow_host_scope {
            policy.allow_host_scope = allow;
        }
        for (name, rule) in file.protected_ports {
            let built_in = name == SELF_RULE || BUILT_IN.iter().any(|(rule, _)| *rule == name);
            match rule {
                Rule::Keep(true) if built_in => {}
                Rule::Keep(false) if built_in => {
                    if name == SELF_RULE {
                        policy.protect_self = false;
                    }
                    policy.protected.retain(|p| p.rule != name);
                }
                Rule::Keep(_) => {
                    return Err(InvalidPolicy::NotBuiltIn { name });
                }
                Rule::Ports(_) if name == SELF_RULE => {
                    return Err(InvalidPolicy::SelfPorts);
                }
                Rule::Ports(specs) => {
                    let field = format!("protected_ports.{name}");
                    let ports = specs
                        .iter()
                        .map(|spec| port_spec(spec, &field))
                        .collect::<Result<Vec<_>, _>>()?;
                    if ports.is_empty() {
                        return Err(InvalidPolicy::EmptyList { name });
                    }
                    policy.protected.retain(|p| p.rule != name);
                    policy.protected.push(ProtectedPorts { rule: name, ports });
                }
            }
        }
        Ok(policy)
    }

    /// Protects faultd's own TCP ports (its gRPC and metrics listeners), unless the policy file
    /// removed that rule.
    pub fn protect_own_ports(&mut self, ports: &[u16]) {
        if !self.protect_self || ports.is_empty() {
            return;
        }
        let ports: Vec<PortRange> = ports.iter().map(|p| single(*p)).collect();
        match self.protected.iter_mut().find(|p| p.rule == SELF_RULE) {
            Some(rule) => rule.ports.extend(ports),
            None => self.protected.push(ProtectedPorts {
                rule: SELF_RULE.to_string(),
                ports,
            }),
        }
    }

    /// What the request asks for, before anything is resolved: the scope and the ports. A
    /// target without ports covers every port, protected ones included.
    pub fn check_target(&self, target: &Target) -> Result<(), Denied> {
        if target.scope == Scope::Host && !self.allow_host_scope {
            return Err(host_denied("fault.target.host", "the host scope"));
        }
        for rule in &self.protected {
            for protected in &rule.ports {
                if target.ports.is_empty() {
                    return Err(Denied {
                        field: "fault.target.ports".into(),
                        rule: format!("protected_ports.{}", rule.rule),
                        reason: format!(
                            "no ports means every port, and {} is protected; name the ports to \
                             fault",
                            range_text(protected)
                        ),
                    });
                }
                if let Some((i, _)) = target
                    .ports
                    .iter()
                    .enumerate()
                    .find(|(_, r)| r.first <= protected.last && protected.first <= r.last)
                {
                    return Err(Denied {
                        field: format!("fault.target.ports[{i}]"),
                        rule: format!("protected_ports.{}", rule.rule),
                        reason: format!(
                            "port {} is protected: no fault may touch it unless the operator \
                             removes the rule from the policy file",
                            range_text(protected)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// What the scope resolved to: a cgroup or process that is the cgroup v2 root is the whole
    /// host, so it needs the host scope's permission too.
    pub fn check_resolved(&self, resolved: &ResolvedScope) -> Result<(), Denied> {
        if resolved.cgroup_path == "/" && !self.allow_host_scope {
            return Err(host_denied(
                "fault.target",
                "this target resolves to the cgroup v2 root, i.e. the whole host, and the host scope",
            ));
        }
        Ok(())
    }

    /// One line for the start-up log.
    pub fn summary(&self) -> String {
        let protected: Vec<String> = self
            .protected
            .iter()
            .map(|p| {
                let ports: Vec<String> = p.ports.iter().map(range_text).collect();
                format!("{}={}", p.rule, ports.join(","))
            })
            .collect();
        format!(
            "max_ttl={} max_fault_duration={} max_active_faults={} max_leases={} \
             allow_host_scope={} protected_ports=[{}]",
            crate::duration::format(self.max_ttl),
            crate::duration::format(self.max_fault_duration),
            self.max_active_faults,
            self.max_leases,
            self.allow_host_scope,
            protected.join(" ")
        )
    }
}

fn host_denied(field: &str, what: &str) -> Denied {
    Denied {
        field: field.into(),
        rule: "allow_host_scope".into(),
        reason: format!(
            "{what} is not allowed on this node; the operator enables it with \
             allow_host_scope = true in the policy file (or --allow-host-scope)"
        ),
    }
}

fn range_text(range: &PortRange) -> String {
    if range.first == range.last {
        range.first.to_string()
    } else {
        format!("{}-{}", range.first, range.last)
    }
}

fn port_spec(spec: &PortSpec, field: &str) -> Result<PortRange, InvalidPolicy> {
    let bad = |what: &dyn std::fmt::Display| InvalidPolicy::NotAPort {
        field: field.to_string(),
        text: what.to_string(),
    };
    match spec {
        PortSpec::Port(port) => {
            let port = u32::try_from(*port).map_err(|_| bad(port))?;
            Ok(PortRange::new(port, None, field)?)
        }
        PortSpec::Text(text) => {
            let (first, last) = match text.split_once('-') {
                Some((first, last)) => (first, Some(last)),
                None => (text.as_str(), None),
            };
            let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad(text));
            let last = last.map(number).transpose()?;
            Ok(PortRange::new(number(first)?, last, field)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{Direction, Protocol};

    fn target(scope: Scope, ports: &[(u16, u16)]) -> Target {
        Target {
            scope,
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocol: Protocol::Tcp,
            direction: Direction::Both,
            peers: Vec::new(),
            exclude_peers: Vec::new(),
            request: None,
        }
    }

    fn app(ports: &[(u16, u16)]) -> Target {
        target(
            Scope::Cgroup {
                path: "/app".into(),
            },
            ports,
        )
    }

    #[test]
    fn defaults_are_safe() {
        let policy = Policy::default();
        assert_eq!(policy.max_ttl, Duration::from_secs(3600));
        assert_eq!(policy.max_active_faults, 1000);
        assert!(!policy.allow_host_scope);
        for (port, rule) in [
            (22, "ssh"),
            (53, "dns"),
            (6443, "kube-apiserver"),
            (10250, "kubelet"),
        ] {
            let denied = policy.check_target(&app(&[(port, port)])).unwrap_err();
            assert_eq!(denied.rule, format!("protected_ports.{rule}"));
            assert_eq!(denied.field, "fault.target.ports[0]");
        }
        assert!(policy.check_target(&app(&[(6379, 6379)])).is_ok());
        let denied = policy.check_target(&target(Scope::Host, &[(6379, 6379)]));
        assert_eq!(denied.unwrap_err().rule, "allow_host_scope");
    }

    #[test]
    fn ranges_and_portless_targets_cover_protected_ports() {
        let policy = Policy::default();
        let denied = policy
            .check_target(&app(&[(6379, 6379), (50, 60)]))
            .unwrap_err();
        assert_eq!(denied.rule, "protected_ports.dns");
        assert_eq!(denied.field, "fault.target.ports[1]");
        let denied = policy.check_target(&app(&[])).unwrap_err();
        assert_eq!(denied.field, "fault.target.ports");
        assert!(denied.reason.contains("every port"), "{denied}");
    }

    #[test]
    fn own_ports_are_protected_unless_removed() {
        let mut policy = Policy::default();
        policy.protect_own_ports(&[7443, 9464]);
        let denied = policy.check_target(&app(&[(9464, 9464)])).unwrap_err();
        assert_eq!(denied.rule, "protected_ports.faultd");
        let mut policy = Policy::from_toml("[protected_ports]\nfaultd = false").unwrap();
        policy.protect_own_ports(&[7443]);
        assert!(policy.check_target(&app(&[(7443, 7443)])).is_ok());
    }

    #[test]
    fn the_file_removes_and_adds_rules() {
        let policy = Policy::from_toml(
            r#"
            max_ttl = "10m"
            max_active_faults = 5
            allow_host_scope = true
            [protected_ports]
            dns = false
            ssh = true
            etcd = [2379, "2380-2381"]
            "#,
        )
        .unwrap();
        assert_eq!(policy.max_ttl, Duration::from_secs(600));
        assert_eq!(policy.max_fault_duration, Duration::from_secs(3600));
        assert_eq!(policy.max_active_faults, 5);
        assert!(policy.check_target(&app(&[(53, 53)])).is_ok());
        assert!(policy.check_target(&app(&[(22, 22)])).is_err());
        let denied = policy.check_target(&app(&[(2381, 2381)])).unwrap_err();
        assert_eq!(denied.rule, "protected_ports.etcd");
        assert!(
            policy
                .check_target(&target(Scope::Host, &[(6379, 6379)]))
                .is_ok()
        );
    }

    #[test]
    fn mistakes_in_the_file_are_refused() {
        for (text, says) in [
            ("max_tll = \"1h\"", "unknown field"),
            ("max_ttl = \"soon\"", "max_ttl"),
            ("max_ttl = \"0s\"", "max_ttl"),
            ("[protected_ports]\nredis = false", "protected_ports.redis"),
            ("[protected_ports]\netcd = [0]", "protected_ports.etcd"),
            (
                "[protected_ports]\netcd = [\"9-1\"]",
                "protected_ports.etcd",
            ),
            ("[protected_ports]\netcd = []", "protected_ports.etcd"),
            ("[protected_ports]\nfaultd = [1]", "protected_ports.faultd"),
            ("max_active_faults = -1", "max_active_faults"),
        ] {
            let err = Policy::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_root_cgroup_is_the_host() {
        let policy = Policy::default();
        let root = ResolvedScope {
            cgroup_path: "/".into(),
            cgroup_id: 1,
            dir: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            policy.check_resolved(&root).unwrap_err().rule,
            "allow_host_scope"
        );
        let app = ResolvedScope {
            cgroup_path: "/app".into(),
            cgroup_id: 2,
            dir: "/sys/fs/cgroup/app".into(),
        };
        assert!(policy.check_resolved(&app).is_ok());
    }
}
