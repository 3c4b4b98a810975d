//! What the kernel offers, probed once at start: reported by `Capabilities`, `faultctl caps`
//! and the start-up log.

use std::path::Path;

use faultd_proto::v1 as pb;

use crate::dataplane::Shaper;
use crate::fault::{Action, Mechanism};

#[derive(Clone, Debug)]
pub struct Capability {
    pub name: &'static str,
    pub available: bool,
    pub detail: String,
}

#[derive(Clone, Debug)]
pub struct Capabilities {
    pub kernel_release: String,
    pub cgroup_root: String,
    pub items: Vec<Capability>,
    /// The datapath that applies `drop`, if it loaded.
    pub drop_mechanism: Option<&'static str>,
    /// delay and bandwidth: the mechanism the agent picks for each, or why none can apply it.
    pub shaping: Vec<(&'static str, Result<Mechanism, String>)>,
}

impl Capabilities {
    /// Probes the kernel. `datapath` is the outcome of loading and attaching the programs
    /// (the one probe that proves BPF, cgroup_skb and the helpers the programs call).
    pub fn probe(cgroup_root: &Path, datapath: Result<&'static str, String>) -> Self {
        let kernel_release = kernel_release();
        let btf = Path::new("/sys/kernel/btf/vmlinux").is_file();
        let version = parse_version(&kernel_release);
        let at_least = |major, minor| version.is_some_and(|v| v >= (major, minor));
        let mut items = vec![
            Capability {
                name: "btf",
                available: btf,
                detail: if btf {
                    "/sys/kernel/btf/vmlinux".into()
                } else {
                    "no kernel BTF".into()
                },
            },
            Capability {
                name: "cgroup2",
                available: cgroup_root.join("cgroup.procs").is_file(),
                detail: cgroup_root.display().to_string(),
            },
        ];
        let drop_mechanism = match &datapath {
            Ok(mechanism) => {
                items.push(Capability {
                    name: "cgroup_skb",
                    available: true,
                    detail: format!(
                        "ingress+egress programs attached at {} through bpf_links",
                        cgroup_root.display()
                    ),
                });
                Some(*mechanism)
            }
            Err(reason) => {
                items.push(Capability {
                    name: "cgroup_skb",
                    available: false,
                    detail: reason.clone(),
                });
                None
            }
        };
        items.push(Capability {
            name: "bpf_link_cgroup",
            available: at_least(5, 7),
            detail: "fd-owned cgroup links (kernel >= 5.7): programs detach when faultd exits"
                .into(),
        });
        items.push(Capability {
            name: "tcx",
            available: at_least(6, 6),
            detail: "by kernel version (>= 6.6); not used by this version".into(),
        });
        Self {
            kernel_release,
            cgroup_root: cgroup_root.display().to_string(),
            items,
            drop_mechanism,
            shaping: Vec::new(),
        }
    }

    /// Adds a probed capability: Ok(detail) if present, Err(why not) if not.
    pub fn add(&mut self, name: &'static str, probed: Result<String, String>) {
        let (available, detail) = match probed {
            Ok(detail) => (true, detail),
            Err(why) => (false, why),
        };
        self.items.push(Capability {
            name,
            available,
            detail,
        });
    }

    /// Records which mechanism would apply delay and bandwidth (the engine's choice for a fault
    /// that leaves it open), given the engine's shapers.
    pub fn add_shaping(&mut self, shapers: &[Box<dyn Shaper>]) {
        let ms = std::time::Duration::from_millis;
        let samples = [
            ("delay", Action::delay(ms(1), ms(0), 0.0, None, "delay")),
            ("bandwidth", Action::bandwidth(1, 0, None, "bandwidth")),
        ];
        for (name, action) in samples {
            let Ok(action) = action else {
                continue;
            };
            let mut reasons = Vec::new();
            let chosen = Mechanism::PREFERENCE.into_iter().find(|mechanism| {
                match shapers.iter().find(|s| s.mechanism() == *mechanism) {
                    Some(shaper) => match shaper.unavailable(&action) {
                        None => true,
                        Some(why) => {
                            reasons.push(format!("{}: {why}", mechanism.name()));
                            false
                        }
                    },
                    None => {
                        reasons.push(format!(
                            "{}: not supported by this faultd",
                            mechanism.name()
                        ));
                        false
                    }
                }
            });
            self.shaping
                .push((name, chosen.ok_or_else(|| reasons.join("; "))));
        }
    }

    pub fn to_proto(&self) -> pb::CapabilitiesResponse {
        let not_yet = |action: &str| pb::ActionSupport {
            action: action.into(),
            available: false,
            mechanism: String::new(),
            detail: "not implemented in this version".into(),
        };
        let drop = pb::ActionSupport {
            action: "drop".into(),
            available: self.drop_mechanism.is_some(),
            mechanism: self.drop_mechanism.unwrap_or_default().into(),
            detail: match self.drop_mechanism {
                Some(_) => "per-packet drop with the lease deadline enforced in the kernel".into(),
                None => "the cgroup_skb datapath did not load".into(),
            },
        };
        pb::CapabilitiesResponse {
            kernel_release: self.kernel_release.clone(),
            cgroup_root: self.cgroup_root.clone(),
            capabilities: self
                .items
                .iter()
                .map(|c| pb::Capability {
                    name: c.name.into(),
                    available: c.available,
                    detail: c.detail.clone(),
                })
                .collect(),
            actions: {
                let mut actions = vec![drop];
                for name in ["delay", "bandwidth"] {
                    actions.push(match self.shaping.iter().find(|(n, _)| *n == name) {
                        Some((_, Ok(mechanism))) => pb::ActionSupport {
                            action: name.into(),
                            available: true,
                            mechanism: mechanism.name().into(),
                            detail: format!(
                                "{} unless the fault forces another mechanism",
                                mechanism.name()
                            ),
                        },
                        Some((_, Err(why))) => pb::ActionSupport {
                            action: name.into(),
                            available: false,
                            mechanism: String::new(),
                            detail: why.clone(),
                        },
                        None => not_yet(name),
                    });
                }
                actions.push(not_yet("reset"));
                actions.push(not_yet("reject"));
                actions
            },
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_kernel_versions() {
        assert_eq!(super::parse_version("6.18.44-fc-v769"), Some((6, 18)));
        assert_eq!(super::parse_version("5.10.0-28-cloud-amd64"), Some((5, 10)));
        assert_eq!(super::parse_version("garbage"), None);
    }
}
