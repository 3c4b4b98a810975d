//! What the kernel offers, probed once at start: reported by `Capabilities`, `faultctl caps`
//! and the start-up log.

use std::path::Path;

pub use crate::capability::Capability;
use crate::dataplane::{Dataplane, Shaper};
use crate::fault::{Action, Mechanism};

#[derive(Clone, Debug)]
pub struct Capabilities {
    pub kernel_release: String,
    pub cgroup_root: String,
    pub items: Vec<Capability>,
    /// Per action: the mechanism that applies it, or why it is unavailable.
    pub actions: Vec<(&'static str, Result<&'static str, String>)>,
}

impl Capabilities {
    /// Probes the kernel. `datapath` is the outcome of loading and attaching the programs
    /// (the one probe that proves BPF, cgroup_skb and the helpers the programs call).
    pub fn probe(cgroup_root: &Path, datapath: Result<&dyn Dataplane, String>) -> Self {
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
        let actions = match &datapath {
            Ok(datapath) => {
                items.push(Capability {
                    name: "cgroup_skb",
                    available: true,
                    detail: format!(
                        "ingress+egress programs loaded; attached through bpf_links at each \
                         faulted cgroup below {} (at it only for the host scope) while it has \
                         faults",
                        cgroup_root.display()
                    ),
                });
                items.extend(datapath.capabilities());
                ACTIONS
                    .iter()
                    .map(|(name, action)| {
                        let mechanism = datapath.mechanism(action).map_err(|e| e.to_string());
                        (*name, mechanism)
                    })
                    .collect()
            }
            Err(reason) => {
                items.push(Capability {
                    name: "cgroup_skb",
                    available: false,
                    detail: reason.clone(),
                });
                ACTIONS
                    .iter()
                    .map(|(name, _)| (*name, Err("the datapath did not load".to_string())))
                    .collect()
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
            actions,
        }
    }

    /// Adds delay, bandwidth, slow_connect and slow_close: the mechanism the engine picks for a fault that leaves the
    /// choice to it, given its shapers, or why none can apply the action.
    pub fn add_shaping(&mut self, shapers: &[Box<dyn Shaper>]) {
        let ms = std::time::Duration::from_millis;
        let samples = [
            ("delay", Action::delay(ms(1), ms(0), 0.0, None, "delay")),
            ("bandwidth", Action::bandwidth(1, 0, None, "bandwidth")),
            ("slow_connect", Action::slow_connect(ms(1), "slow_connect")),
            ("slow_close", Action::slow_close(ms(1), "slow_close")),
            ("duplicate", Action::duplicate(1.0, None, "duplicate")),
            ("corrupt", Action::corrupt(1.0, None, "corrupt")),
            ("reorder", Action::reorder(1.0, ms(0), None, "reorder")),
            ("slice", Action::slice(16, ms(0), "slice")),
        ];
        for (name, action) in samples {
            let Ok(action) = action else {
                continue;
            };
            let mut reasons = Vec::new();
            let chosen = action.auto_preference().iter().copied().find(|mechanism| {
                let why = match shapers.iter().find(|s| s.mechanism() == *mechanism) {
                    Some(shaper) => shaper.unavailable(&action),
                    None => Some("not supported by this faultd".to_string()),
                };
                if let Some(why) = &why {
                    reasons.push(format!("{}: {why}", mechanism.name()));
                }
                why.is_none()
            });
            self.actions.push((
                name,
                chosen
                    .map(Mechanism::name)
                    .ok_or_else(|| reasons.join("; ")),
            ));
        }
    }
}

/// The actions the capability report lists, with a representative of each.
const ACTIONS: &[(&str, Action)] = &[
    ("drop", Action::Drop { percent: 100.0 }),
    ("reject", Action::Reject),
    ("reset", Action::Reset { after_bytes: None }),
    // Only with a request match (Redis commands, PostgreSQL statements).
    ("lose_reply", Action::LoseReply),
    // close_after needs sock_destroy too, which the report lists.
    ("stall", Action::Stall { close_after: None }),
];

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
