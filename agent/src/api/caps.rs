//! The capability report as the Capabilities RPC answers it.

use faultd_proto::v1 as pb;

use crate::caps::Capabilities;

pub fn to_proto(caps: &Capabilities) -> pb::CapabilitiesResponse {
    let not_yet = |action: &str| pb::ActionSupport {
        action: action.into(),
        available: false,
        mechanism: String::new(),
        detail: "not implemented in this version".into(),
    };
    let mut actions: Vec<_> = caps
        .actions
        .iter()
        .map(|(name, outcome)| match outcome {
            Ok(mechanism) => pb::ActionSupport {
                action: (*name).into(),
                available: true,
                mechanism: (*mechanism).into(),
                detail: String::new(),
            },
            Err(missing) => pb::ActionSupport {
                action: (*name).into(),
                available: false,
                mechanism: String::new(),
                detail: missing.clone(),
            },
        })
        .collect();
    for name in ["delay", "bandwidth"] {
        if !caps.actions.iter().any(|(listed, _)| *listed == name) {
            actions.push(not_yet(name));
        }
    }
    pb::CapabilitiesResponse {
        kernel_release: caps.kernel_release.clone(),
        cgroup_root: caps.cgroup_root.clone(),
        capabilities: caps
            .items
            .iter()
            .map(|c| pb::Capability {
                name: c.name.into(),
                available: c.available,
                detail: c.detail.clone(),
            })
            .collect(),
        actions,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}
