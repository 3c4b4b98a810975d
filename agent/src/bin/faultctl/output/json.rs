//! Answers as JSON for scripts: proto3 JSON names, enums by name, durations "1.5s", timestamps
//! RFC 3339. Counters and ids stay JSON numbers (proto3 parsers accept both) so
//! `jq '.dropped > 0'` works.

use faultd_proto::v1::{
    self as pb, CapabilitiesResponse, Fault, FaultEvent, FaultState, Lease, Target, fault,
    fault_event, target,
};
use serde_json::{Map, Value, json};

pub fn duration_json(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| Value::String(d.to_string()))
}

fn timestamp_json(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// An enum by its proto name, or its number when this faultctl does not know the value.
fn enum_json(name: Option<&'static str>, number: i32) -> Value {
    name.map_or(json!(number), |name| json!(name))
}

/// An object without its null members: proto3 JSON leaves unset fields out.
pub fn object(members: Vec<(&str, Value)>) -> Value {
    let map: Map<String, Value> = members
        .into_iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(key, value)| (key.to_string(), value))
        .collect();
    Value::Object(map)
}

fn mechanism_json(mechanism: i32) -> Value {
    let name = pb::Mechanism::try_from(mechanism)
        .ok()
        .map(|m| m.as_str_name());
    enum_json(name, mechanism)
}

fn target_json(target: &Target) -> Value {
    let (scope_name, scope) = match &target.scope {
        Some(target::Scope::Host(_)) => ("host", json!({})),
        Some(target::Scope::Cgroup(cgroup)) => ("cgroup", json!({ "path": cgroup.path })),
        Some(target::Scope::Pid(pid)) => ("pid", json!({ "pid": pid.pid })),
        Some(target::Scope::Pod(pod)) => ("pod", json!({ "uid": pod.uid })),
        Some(target::Scope::Container(c)) => ("container", json!({ "id": c.id })),
        Some(target::Scope::Netns(n)) => {
            ("netns", json!({ "path": n.path, "interface": n.interface }))
        }
        None => ("scope", Value::Null),
    };
    let ports: Vec<Value> = target
        .ports
        .iter()
        .map(|port| {
            object(vec![
                ("first", json!(port.first)),
                ("last", json!(port.last)),
            ])
        })
        .collect();
    let protocol = pb::Protocol::try_from(target.protocol)
        .ok()
        .map(|p| p.as_str_name());
    let direction = pb::Direction::try_from(target.direction)
        .ok()
        .map(|d| d.as_str_name());
    let mut fields = vec![
        (scope_name, scope),
        ("ports", json!(ports)),
        ("protocol", enum_json(protocol, target.protocol)),
        ("direction", enum_json(direction, target.direction)),
    ];
    if !target.peers.is_empty() {
        fields.push(("peers", json!(target.peers)));
    }
    if !target.exclude_peers.is_empty() {
        fields.push(("exclude_peers", json!(target.exclude_peers)));
    }
    object(fields)
}

pub fn fault_json(fault: &Fault) -> Value {
    let (action_name, action) = action_json(fault.action.as_ref());
    let state = FaultState::try_from(fault.state)
        .ok()
        .map(|s| s.as_str_name());
    object(vec![
        ("id", json!(fault.id)),
        ("leaseId", json!(fault.lease_id)),
        (action_name, action),
        ("target", fault.target.as_ref().map_or(Value::Null, target_json)),
        ("labels", json!(fault.labels)),
        ("state", enum_json(state, fault.state)),
        (
            "counters",
            fault.counters.map_or(Value::Null, |c| {
                json!({ "matched": c.matched, "dropped": c.dropped, "refused": c.refused,
                    "reset": c.reset, "delayed": c.delayed, "duplicated": c.duplicated,
                    "corrupted": c.corrupted, "reordered": c.reordered, "sliced": c.sliced })
            }),
        ),
        ("expiresAt", timestamp_json(fault.expires_at.as_ref())),
        ("remaining", duration_json(fault.remaining.as_ref())),
        ("mechanism", json!(fault.mechanism)),
        (
            "resolved",
            fault.resolved.as_ref().map_or(Value::Null, |r| {
                json!({ "cgroupPath": r.cgroup_path, "cgroupId": r.cgroup_id, "rules": r.rules })
            }),
        ),
        ("endedAt", timestamp_json(fault.ended_at.as_ref())),
        (
            "endReason",
            match fault.ended_at {
                Some(_) => enum_json(
                    pb::RevertReason::try_from(fault.end_reason)
                        .ok()
                        .map(|r| r.as_str_name()),
                    fault.end_reason,
                ),
                None => Value::Null,
            },
        ),
        (
            "endDetail",
            fault
                .ended_at
                .map_or(Value::Null, |_| json!(fault.end_detail)),
        ),
    ])
}

/// The action as proto3 JSON's oneof member: its name and its object.
fn action_json(action: Option<&fault::Action>) -> (&'static str, Value) {
    match action {
        Some(fault::Action::Drop(drop)) => ("drop", json!({ "percent": drop.percent })),
        Some(fault::Action::Reject(_)) => ("reject", json!({})),
        Some(fault::Action::LoseReply(_)) => ("loseReply", json!({})),
        Some(fault::Action::Reset(reset)) => (
            "reset",
            match reset.after_bytes {
                Some(bytes) => json!({ "afterBytes": bytes }),
                None => json!({}),
            },
        ),
        Some(fault::Action::Delay(delay)) => (
            "delay",
            object(vec![
                ("latency", duration_json(delay.latency.as_ref())),
                ("jitter", duration_json(delay.jitter.as_ref())),
                ("correlation", json!(delay.correlation)),
                ("mechanism", mechanism_json(delay.mechanism)),
            ]),
        ),
        Some(fault::Action::Bandwidth(bandwidth)) => (
            "bandwidth",
            json!({
                "rateBytesPerSec": bandwidth.rate_bytes_per_sec,
                "burst": bandwidth.burst,
                "mechanism": mechanism_json(bandwidth.mechanism),
            }),
        ),
        Some(fault::Action::Stall(stall)) => (
            "stall",
            match &stall.close_after {
                Some(after) => json!({ "closeAfter": duration_json(Some(after)) }),
                None => json!({}),
            },
        ),
        Some(fault::Action::SlowConnect(slow)) => (
            "slowConnect",
            json!({ "latency": duration_json(slow.latency.as_ref()) }),
        ),
        Some(fault::Action::SlowClose(slow)) => (
            "slowClose",
            json!({ "latency": duration_json(slow.latency.as_ref()) }),
        ),
        Some(fault::Action::Duplicate(d)) => (
            "duplicate",
            json!({ "percent": d.percent, "mechanism": mechanism_json(d.mechanism) }),
        ),
        Some(fault::Action::Slice(s)) => (
            "slice",
            json!({ "maxBytes": s.max_bytes, "delay": duration_json(s.delay.as_ref()) }),
        ),
        Some(fault::Action::Corrupt(c)) => (
            "corrupt",
            json!({ "percent": c.percent, "mechanism": mechanism_json(c.mechanism) }),
        ),
        Some(fault::Action::Reorder(r)) => (
            "reorder",
            json!({
                "percent": r.percent,
                "gap": duration_json(r.gap.as_ref()),
                "mechanism": mechanism_json(r.mechanism),
            }),
        ),
        None => ("action", Value::Null),
    }
}

pub fn lease_json(lease: &Lease) -> Value {
    object(vec![
        ("id", json!(lease.id)),
        ("ttl", duration_json(lease.ttl.as_ref())),
        ("expiresAt", timestamp_json(lease.expires_at.as_ref())),
        ("remaining", duration_json(lease.remaining.as_ref())),
        ("faultIds", json!(lease.fault_ids)),
        ("private", json!(lease.private)),
        ("labels", json!(lease.labels)),
    ])
}

pub fn caps_json(caps: &CapabilitiesResponse) -> Value {
    let capabilities: Vec<Value> = caps
        .capabilities
        .iter()
        .map(|cap| json!({ "name": cap.name, "available": cap.available, "detail": cap.detail }))
        .collect();
    let actions: Vec<Value> = caps
        .actions
        .iter()
        .map(|action| {
            json!({
                "action": action.action,
                "available": action.available,
                "mechanism": action.mechanism,
                "detail": action.detail,
            })
        })
        .collect();
    json!({
        "kernelRelease": caps.kernel_release,
        "cgroupRoot": caps.cgroup_root,
        "capabilities": capabilities,
        "actions": actions,
        "agentVersion": caps.agent_version,
    })
}

pub fn event_json(event: &FaultEvent) -> Value {
    let kind = match &event.kind {
        Some(fault_event::Kind::Applied(_)) => ("applied", json!({})),
        Some(fault_event::Kind::Reverted(reverted)) => {
            let reason = pb::RevertReason::try_from(reverted.reason)
                .ok()
                .map(|r| r.as_str_name());
            (
                "reverted",
                json!({
                    "reason": enum_json(reason, reverted.reason),
                    "detail": reverted.detail,
                }),
            )
        }
        Some(fault_event::Kind::Failed(failed)) => ("failed", json!({ "message": failed.message })),
        None => ("kind", Value::Null),
    };
    object(vec![
        ("time", timestamp_json(event.time.as_ref())),
        kind,
        (
            "fault",
            event.fault.as_ref().map_or(Value::Null, fault_json),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use faultd::api::convert;
    use faultd_proto::v1::PortRange;

    use super::*;

    fn range(first: u32, last: Option<u32>) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn json_uses_proto3_names() {
        let fault = Fault {
            id: "f1".into(),
            lease_id: "l1".into(),
            action: Some(fault::Action::Drop(pb::Drop { percent: 100.0 })),
            target: Some(Target {
                scope: Some(target::Scope::Host(pb::HostScope {})),
                ports: vec![range(1, Some(2))],
                protocol: pb::Protocol::Tcp as i32,
                direction: pb::Direction::Egress as i32,
                ..Default::default()
            }),
            state: FaultState::Active as i32,
            remaining: Some(convert::duration_to_proto(Duration::from_millis(1500))),
            ..Fault::default()
        };
        let json = fault_json(&fault);
        assert_eq!(json["leaseId"], "l1");
        assert_eq!(json["drop"]["percent"], 100.0);
        assert_eq!(json["target"]["host"], json!({}));
        assert_eq!(json["target"]["ports"], json!([{ "first": 1, "last": 2 }]));
        assert_eq!(json["target"]["protocol"], "TCP");
        assert_eq!(json["target"]["direction"], "EGRESS");
        assert_eq!(json["state"], "ACTIVE");
        assert_eq!(json["remaining"], "1.500s");
        assert!(json.get("expiresAt").is_none());
    }
}
