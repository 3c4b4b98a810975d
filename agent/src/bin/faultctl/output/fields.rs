//! How one field of a fault or a lease reads in text: protocol, direction, ports, scope,
//! action, durations, states, labels, ids. The answers in `text` are made of these phrases.

use faultd::api::convert;
use std::collections::HashMap;

use faultd::duration;
use faultd_proto::v1::{self as pb, Fault, FaultState, PortRange, Target, fault, target};

pub fn protocol_text(protocol: i32) -> String {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::Tcp) => "tcp".into(),
        Ok(pb::Protocol::Udp) => "udp".into(),
        Ok(pb::Protocol::Unspecified) => "tcp+udp".into(),
        Err(_) => format!("protocol {protocol}"),
    }
}

pub fn direction_text(direction: i32) -> String {
    match pb::Direction::try_from(direction) {
        Ok(pb::Direction::Egress) => "egress".into(),
        Ok(pb::Direction::Ingress) => "ingress".into(),
        Ok(pb::Direction::Both | pb::Direction::Unspecified) => "both".into(),
        Err(_) => format!("direction {direction}"),
    }
}

/// e.g. `6379,8000-8010`, or `all`.
pub fn port_list(ports: &[PortRange]) -> String {
    if ports.is_empty() {
        return "all".into();
    }
    let list: Vec<String> = ports
        .iter()
        .map(|port| match port.last {
            Some(last) => format!("{}-{last}", port.first),
            None => port.first.to_string(),
        })
        .collect();
    list.join(",")
}

/// e.g. `ports 6379,8000-8010`, or `all ports`.
fn ports_text(ports: &[PortRange]) -> String {
    match ports.is_empty() {
        true => "all ports".into(),
        false => format!("ports {}", port_list(ports)),
    }
}

pub fn scope_text(scope: Option<&target::Scope>) -> String {
    match scope {
        Some(target::Scope::Host(_)) => "host".into(),
        Some(target::Scope::Cgroup(cgroup)) => format!("cgroup {}", cgroup.path),
        Some(target::Scope::Pid(pid)) => format!("pid {}", pid.pid),
        Some(target::Scope::Pod(pod)) => format!("pod {}", pod.uid),
        Some(target::Scope::Container(c)) => format!("container {}", c.id),
        Some(target::Scope::Netns(n)) => format!("interface {} of netns {}", n.interface, n.path),
        None => "no scope".into(),
    }
}

/// e.g. `redis commands SET,DEL on keys user:*`, `postgres statements COMMIT`.
pub fn request_text(request: &pb::RequestMatch) -> String {
    use faultd::fault::RequestMatch;
    use pb::request_match::Protocol;
    // The agent's own wording; the names are shown as the agent answered them.
    let request = match &request.protocol {
        Some(Protocol::Redis(redis)) => RequestMatch::Redis {
            commands: redis.commands.clone(),
            key_prefix: redis.key_prefix.clone(),
        },
        Some(Protocol::Postgres(pg)) => RequestMatch::Postgres {
            statements: pg.statements.clone(),
        },
        None => return "requests of no protocol".into(),
    };
    request.summary()
}

/// e.g. `tcp+udp both ports 6379 cgroup /app`.
pub fn target_summary(target: &Target) -> String {
    let mut peers = String::new();
    if !target.peers.is_empty() {
        peers += &format!(" peers {}", target.peers.join(","));
    }
    if !target.exclude_peers.is_empty() {
        peers += &format!(" except {}", target.exclude_peers.join(","));
    }
    if let Some(request) = &target.request {
        peers += &format!(" {}", request_text(request));
    }
    format!(
        "{} {} {}{peers} {}",
        protocol_text(target.protocol),
        direction_text(target.direction),
        ports_text(&target.ports),
        scope_text(target.scope.as_ref())
    )
}

pub fn action_text(action: Option<&fault::Action>) -> String {
    match action {
        Some(fault::Action::Drop(drop)) => format!("drop {}%", drop.percent),
        Some(fault::Action::Reject(_)) => "reject".into(),
        Some(fault::Action::LoseReply(_)) => "lose_reply".into(),
        Some(fault::Action::Reset(reset)) => match reset.after_bytes {
            Some(bytes) => format!("reset after {bytes} bytes"),
            None => "reset".into(),
        },
        Some(fault::Action::Delay(delay)) => {
            let mut text = format!("delay {}", remaining_text(delay.latency.as_ref()));
            let jitter = delay.jitter.as_ref().and_then(convert::duration_from_proto);
            if jitter.is_some_and(|jitter| !jitter.is_zero()) {
                text.push_str(&format!(" ±{}", remaining_text(delay.jitter.as_ref())));
            }
            if delay.correlation > 0.0 {
                text.push_str(&format!(" {}% correlated", delay.correlation));
            }
            text
        }
        Some(fault::Action::Bandwidth(bandwidth)) => format!(
            "bandwidth {}/s burst {}",
            bytes_text(bandwidth.rate_bytes_per_sec),
            bytes_text(bandwidth.burst)
        ),
        Some(fault::Action::Stall(stall)) => match &stall.close_after {
            Some(after) => format!("stall, close after {}", remaining_text(Some(after))),
            None => "stall".into(),
        },
        Some(fault::Action::SlowConnect(slow)) => {
            format!("slow_connect {}", remaining_text(slow.latency.as_ref()))
        }
        Some(fault::Action::SlowClose(slow)) => {
            format!("slow_close {}", remaining_text(slow.latency.as_ref()))
        }
        Some(fault::Action::Duplicate(d)) => format!("duplicate {}%", d.percent),
        Some(fault::Action::Slice(s)) => {
            let delay = s.delay.as_ref().and_then(convert::duration_from_proto);
            match delay.filter(|d| !d.is_zero()) {
                Some(_) => format!(
                    "slice {} bytes, {} apart",
                    s.max_bytes,
                    remaining_text(s.delay.as_ref())
                ),
                None => format!("slice {} bytes", s.max_bytes),
            }
        }
        Some(fault::Action::Corrupt(c)) => format!("corrupt {}%", c.percent),
        Some(fault::Action::Reorder(r)) => format!(
            "reorder {}% by {}",
            r.percent,
            remaining_text(r.gap.as_ref())
        ),
        None => "no action".into(),
    }
}

/// Bytes in the largest binary unit that divides them exactly, e.g. `256KiB`, `2621B`.
fn bytes_text(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// e.g. `drop 100% tcp+udp both ports 6379 cgroup /app`.
pub fn fault_summary(fault: &Fault) -> String {
    let target = fault
        .target
        .as_ref()
        .map(target_summary)
        .unwrap_or_else(|| "no target".into());
    format!("{} {target}", action_text(fault.action.as_ref()))
}

/// e.g. "30s" or "2.925s" (`duration::format` rounds to the millisecond).
pub fn remaining_text(remaining: Option<&prost_types::Duration>) -> String {
    remaining
        .and_then(convert::duration_from_proto)
        .map(duration::format)
        .unwrap_or_else(|| "-".into())
}

pub fn reason_text(reason: i32) -> String {
    pb::RevertReason::try_from(reason)
        .map(|r| r.as_str_name().to_lowercase())
        .unwrap_or_else(|_| format!("reason {reason}"))
}

pub fn state_text(state: i32) -> String {
    match FaultState::try_from(state) {
        Ok(state) => state.as_str_name().to_lowercase(),
        Err(_) => format!("state {state}"),
    }
}

pub fn labels_text(labels: &HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    pairs.sort();
    pairs.join(",")
}

pub fn id_list(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

pub fn yes_no(available: bool) -> String {
    (if available { "yes" } else { "no" }).into()
}

#[cfg(test)]
mod tests {
    use faultd_proto::v1::PortRange;

    use super::*;

    fn range(first: u32, last: Option<u32>) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn target_summary_reads_like_the_flags() {
        let target = Target {
            scope: Some(target::Scope::Cgroup(pb::CgroupScope {
                path: "/app".into(),
            })),
            ports: vec![range(6379, None)],
            protocol: pb::Protocol::Unspecified as i32,
            direction: pb::Direction::Both as i32,
            ..Default::default()
        };
        assert_eq!(
            target_summary(&target),
            "tcp+udp both ports 6379 cgroup /app"
        );
        let target = Target {
            scope: Some(target::Scope::Pid(pb::PidScope { pid: 7 })),
            ports: vec![range(5432, None), range(8000, Some(8010))],
            protocol: pb::Protocol::Tcp as i32,
            direction: pb::Direction::Egress as i32,
            ..Default::default()
        };
        assert_eq!(
            target_summary(&target),
            "tcp egress ports 5432,8000-8010 pid 7"
        );
        let target = Target {
            scope: Some(target::Scope::Host(pb::HostScope {})),
            protocol: pb::Protocol::Udp as i32,
            direction: pb::Direction::Unspecified as i32,
            ..Target::default()
        };
        assert_eq!(target_summary(&target), "udp both all ports host");
        let fault = Fault {
            action: Some(fault::Action::Drop(pb::Drop { percent: 12.5 })),
            target: Some(target),
            ..Fault::default()
        };
        assert_eq!(fault_summary(&fault), "drop 12.5% udp both all ports host");
    }
}
