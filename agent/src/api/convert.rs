//! proto ⇄ domain. Every rejected field is named as the user typed it (proto3 JSON path).

use std::time::{Duration, SystemTime};

use faultd_proto::v1 as pb;

use crate::engine::{FaultState, FaultView, LeaseRef, LeaseView, RevertReason, Select};
use crate::events::{EventKind, FaultEvent};
use crate::fault::{
    Action, Cidr, Direction, FaultSpec, Invalid, Labels, Mechanism, PortRange, Protocol, Scope,
    Target, limits,
};

pub fn ttl(value: Option<&prost_types::Duration>, field: &str) -> Result<Duration, Invalid> {
    let value = value.ok_or_else(|| Invalid::new(field, "required (e.g. \"30s\")"))?;
    // What google.protobuf.Duration allows: |nanos| below one second, with the sign of seconds.
    if !(-999_999_999..=999_999_999).contains(&value.nanos) {
        return Err(Invalid::new(
            field,
            format!(
                "nanos out of range: {} (a Duration's nanos lie within ±999999999)",
                value.nanos
            ),
        ));
    }
    if (value.seconds > 0 && value.nanos < 0) || (value.seconds < 0 && value.nanos > 0) {
        return Err(Invalid::new(
            field,
            format!(
                "seconds ({}) and nanos ({}) have different signs",
                value.seconds, value.nanos
            ),
        ));
    }
    duration_from_proto(value).ok_or_else(|| Invalid::new(field, "must not be negative"))
}

/// A lease id: required, and no longer than an id can be.
pub fn lease_id(id: &str, field: &str) -> Result<String, Invalid> {
    limits::id(id, field)?;
    Ok(id.to_string())
}

/// Labels of a fault or lease, bounded before anything copies them.
pub fn check_labels(
    labels: &std::collections::HashMap<String, String>,
    field: &str,
) -> Result<(), Invalid> {
    limits::labels(labels, field)
}

pub fn lease_ref(lease: Option<&pb::inject_request::Lease>) -> Result<LeaseRef, Invalid> {
    match lease {
        Some(pb::inject_request::Lease::LeaseId(id)) => {
            Ok(LeaseRef::Existing(lease_id(id, "lease_id")?))
        }
        Some(pb::inject_request::Lease::Ttl(value)) => Ok(LeaseRef::Ttl(ttl(Some(value), "ttl")?)),
        None => Err(Invalid::new(
            "ttl",
            "a fault needs a lease: give lease_id or ttl",
        )),
    }
}

pub fn fault_spec(fault: Option<pb::Fault>) -> Result<FaultSpec, Invalid> {
    let fault = fault.ok_or_else(|| Invalid::new("fault", "required"))?;
    // Every variable-size field is bounded before any work that grows with it.
    check_labels(&fault.labels, "fault.labels")?;
    if let Some(target) = &fault.target {
        bounded_target(target)?;
    }
    let action = action(fault.action)?;
    let target = target(
        fault
            .target
            .ok_or_else(|| Invalid::new("fault.target", "required"))?,
    )?;
    Ok(FaultSpec {
        action,
        target,
        labels: fault.labels.into_iter().collect(),
    })
}

fn action(action: Option<pb::fault::Action>) -> Result<Action, Invalid> {
    Ok(match action {
        Some(pb::fault::Action::Drop(drop)) => Action::drop(drop.percent, "fault.drop.percent")?,
        Some(pb::fault::Action::Delay(delay)) => Action::delay(
            ttl(delay.latency.as_ref(), "fault.delay.latency")?,
            optional_duration(delay.jitter.as_ref(), "fault.delay.jitter")?,
            delay.correlation,
            mechanism(delay.mechanism, "fault.delay.mechanism")?,
            "fault.delay",
        )?,
        Some(pb::fault::Action::Bandwidth(bandwidth)) => Action::bandwidth(
            bandwidth.rate_bytes_per_sec,
            bandwidth.burst,
            mechanism(bandwidth.mechanism, "fault.bandwidth.mechanism")?,
            "fault.bandwidth",
        )?,
        Some(pb::fault::Action::Reject(pb::Reject {})) => Action::Reject,
        Some(pb::fault::Action::LoseReply(pb::LoseReply {})) => Action::LoseReply,
        Some(pb::fault::Action::Reset(reset)) => {
            Action::reset(reset.after_bytes, "fault.reset.after_bytes")?
        }
        Some(pb::fault::Action::Stall(stall)) => Action::stall(
            stall
                .close_after
                .as_ref()
                .map(|d| ttl(Some(d), "fault.stall.close_after"))
                .transpose()?,
            "fault.stall",
        )?,
        Some(pb::fault::Action::SlowConnect(slow)) => Action::slow_connect(
            ttl(slow.latency.as_ref(), "fault.slow_connect.latency")?,
            "fault.slow_connect",
        )?,
        Some(pb::fault::Action::SlowClose(slow)) => Action::slow_close(
            ttl(slow.latency.as_ref(), "fault.slow_close.latency")?,
            "fault.slow_close",
        )?,
        Some(pb::fault::Action::Duplicate(tamper)) => Action::duplicate(
            tamper.percent,
            mechanism(tamper.mechanism, "fault.duplicate.mechanism")?,
            "fault.duplicate",
        )?,
        Some(pb::fault::Action::Corrupt(tamper)) => Action::corrupt(
            tamper.percent,
            mechanism(tamper.mechanism, "fault.corrupt.mechanism")?,
            "fault.corrupt",
        )?,
        Some(pb::fault::Action::Reorder(tamper)) => Action::reorder(
            tamper.percent,
            optional_duration(tamper.gap.as_ref(), "fault.reorder.gap")?,
            mechanism(tamper.mechanism, "fault.reorder.mechanism")?,
            "fault.reorder",
        )?,
        Some(pb::fault::Action::Slice(slice)) => Action::slice(
            slice.max_bytes,
            optional_duration(slice.delay.as_ref(), "fault.slice.delay")?,
            "fault.slice",
        )?,
        None => {
            return Err(Invalid::new(
                "fault",
                "an action is required (drop, delay, bandwidth, reject, reset, stall, \
                 slow_connect, slow_close, duplicate, corrupt, reorder or slice)",
            ));
        }
    })
}

fn target(target: pb::Target) -> Result<Target, Invalid> {
    let scope = match target.scope {
        Some(pb::target::Scope::Host(_)) => Scope::Host,
        Some(pb::target::Scope::Cgroup(cgroup)) => Scope::Cgroup { path: cgroup.path },
        Some(pb::target::Scope::Pid(pid)) => Scope::Pid { pid: pid.pid },
        Some(pb::target::Scope::Pod(pod)) => Scope::Pod { uid: pod.uid },
        Some(pb::target::Scope::Container(container)) => Scope::Container { id: container.id },
        Some(pb::target::Scope::Netns(netns)) => Scope::Netns {
            path: netns.path,
            interface: netns.interface,
        },
        None => {
            return Err(Invalid::new(
                "fault.target",
                "a scope is required: host, cgroup, pid, pod, container or netns",
            ));
        }
    };
    let ports = target
        .ports
        .iter()
        .enumerate()
        .map(|(i, r)| PortRange::new(r.first, r.last, &format!("fault.target.ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match pb::Protocol::try_from(target.protocol) {
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        Ok(pb::Protocol::Unspecified) => Protocol::Both,
        Err(_) => {
            return Err(Invalid::new(
                "fault.target.protocol",
                format!("unknown value {}", target.protocol),
            ));
        }
    };
    let direction = match pb::Direction::try_from(target.direction) {
        Ok(pb::Direction::Egress) => Direction::Egress,
        Ok(pb::Direction::Ingress) => Direction::Ingress,
        Ok(pb::Direction::Both | pb::Direction::Unspecified) => Direction::Both,
        Err(_) => {
            return Err(Invalid::new(
                "fault.target.direction",
                format!("unknown value {}", target.direction),
            ));
        }
    };
    let cidrs = |list: &[String], name: &str| {
        list.iter()
            .enumerate()
            .map(|(i, text)| Cidr::parse(text, &format!("fault.target.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let peers = cidrs(&target.peers, "peers")?;
    let exclude_peers = cidrs(&target.exclude_peers, "exclude_peers")?;
    Ok(Target {
        scope,
        ports,
        protocol,
        direction,
        peers,
        exclude_peers,
        request: target.request.map(super::request::from_proto).transpose()?,
    })
}

/// The sizes of a target's repeated and string fields.
fn bounded_target(target: &pb::Target) -> Result<(), Invalid> {
    limits::target_counts(
        target.ports.len(),
        target.peers.len() + target.exclude_peers.len(),
    )?;
    let (path, name) = (limits::MAX_PATH_BYTES, limits::MAX_NAME_BYTES);
    match &target.scope {
        Some(pb::target::Scope::Cgroup(cgroup)) => {
            limits::text(&cgroup.path, path, "fault.target.cgroup.path")
        }
        Some(pb::target::Scope::Pod(pod)) => limits::text(&pod.uid, name, "fault.target.pod.uid"),
        Some(pb::target::Scope::Container(container)) => {
            limits::text(&container.id, name, "fault.target.container.id")
        }
        Some(pb::target::Scope::Netns(netns)) => {
            limits::text(&netns.path, path, "fault.target.netns.path")?;
            limits::text(&netns.interface, name, "fault.target.netns.interface")
        }
        Some(pb::target::Scope::Host(_) | pb::target::Scope::Pid(_)) | None => Ok(()),
    }
}

/// An unset duration is zero.
fn optional_duration(
    value: Option<&prost_types::Duration>,
    field: &str,
) -> Result<Duration, Invalid> {
    value.map_or(Ok(Duration::ZERO), |value| ttl(Some(value), field))
}

/// None: the agent chooses.
fn mechanism(value: i32, field: &str) -> Result<Option<Mechanism>, Invalid> {
    match pb::Mechanism::try_from(value) {
        Ok(pb::Mechanism::Unspecified) => Ok(None),
        Ok(pb::Mechanism::Netem) => Ok(Some(Mechanism::Netem)),
        Ok(pb::Mechanism::Edt) => Ok(Some(Mechanism::Edt)),
        Ok(pb::Mechanism::Nfqueue) => Ok(Some(Mechanism::Nfqueue)),
        Err(_) => Err(Invalid::new(field, format!("unknown value {value}"))),
    }
}

fn mechanism_to_proto(mechanism: Option<Mechanism>) -> i32 {
    match mechanism {
        None => pb::Mechanism::Unspecified,
        Some(Mechanism::Netem) => pb::Mechanism::Netem,
        Some(Mechanism::Edt) => pb::Mechanism::Edt,
        Some(Mechanism::Nfqueue) => pb::Mechanism::Nfqueue,
    }
    .into()
}

/// A duration as google.protobuf.Duration.
pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// None for negative or out-of-range values.
pub fn duration_from_proto(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

fn labels(labels: &Labels) -> std::collections::HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn fault(view: FaultView) -> pb::Fault {
    let spec = view.spec;
    let state = match view.state {
        FaultState::Active => pb::FaultState::Active,
        FaultState::Reverted => pb::FaultState::Reverted,
        FaultState::DryRun => pb::FaultState::DryRun,
        FaultState::RevertFailing => pb::FaultState::RevertFailing,
    };
    let (ended_at, end_reason, end_detail, failing) = match view.ended {
        Some(ending) => (
            Some(timestamp(ending.at)),
            revert_reason(ending.reason).into(),
            ending.detail,
            ending.failing,
        ),
        None => (None, 0, String::new(), None),
    };
    let (revert_error, revert_attempts) =
        failing.map(|f| (f.error, f.attempts)).unwrap_or_default();
    pb::Fault {
        id: view.id,
        lease_id: view.lease_id,
        action: Some(action_to_proto(spec.action)),
        target: Some(target_to_proto(spec.target)),
        labels: labels(&spec.labels),
        state: state.into(),
        counters: Some(pb::Counters {
            matched: view.counters.matched,
            dropped: view.counters.dropped,
            refused: view.counters.refused,
            reset: view.connections_reset,
            delayed: view.counters.delayed,
            requests_matched: view.counters.requests_matched,
            requests_affected: view.counters.requests_affected,
            duplicated: view.counters.duplicated,
            corrupted: view.counters.corrupted,
            reordered: view.counters.reordered,
            sliced: view.counters.sliced,
        }),
        expires_at: Some(timestamp(view.expires_at)),
        remaining: Some(duration_to_proto(view.remaining)),
        mechanism: view.mechanism.to_string(),
        resolved: Some(pb::ResolvedTarget {
            cgroup_path: view.resolved.cgroup_path,
            cgroup_id: view.resolved.cgroup_id,
            rules: view.rules as u32,
        }),
        ended_at,
        end_reason,
        end_detail,
        revert_error,
        revert_attempts,
    }
}

fn action_to_proto(action: Action) -> pb::fault::Action {
    match action {
        Action::Drop { percent } => pb::fault::Action::Drop(pb::Drop { percent }),
        Action::Delay(delay) => pb::fault::Action::Delay(pb::Delay {
            latency: Some(duration_to_proto(delay.latency)),
            jitter: Some(duration_to_proto(delay.jitter)),
            correlation: delay.correlation,
            mechanism: mechanism_to_proto(delay.mechanism),
        }),
        Action::Bandwidth(bandwidth) => pb::fault::Action::Bandwidth(pb::Bandwidth {
            rate_bytes_per_sec: bandwidth.rate_bytes_per_sec,
            burst: bandwidth.burst,
            mechanism: mechanism_to_proto(bandwidth.mechanism),
        }),
        Action::Reject => pb::fault::Action::Reject(pb::Reject {}),
        Action::LoseReply => pb::fault::Action::LoseReply(pb::LoseReply {}),
        Action::Reset { after_bytes } => pb::fault::Action::Reset(pb::Reset { after_bytes }),
        Action::Stall { close_after } => pb::fault::Action::Stall(pb::Stall {
            close_after: close_after.map(duration_to_proto),
        }),
        Action::SlowConnect { latency } => pb::fault::Action::SlowConnect(pb::SlowConnect {
            latency: Some(duration_to_proto(latency)),
        }),
        Action::SlowClose { latency } => pb::fault::Action::SlowClose(pb::SlowClose {
            latency: Some(duration_to_proto(latency)),
        }),
        Action::Duplicate { percent, mechanism } => pb::fault::Action::Duplicate(pb::Duplicate {
            percent,
            mechanism: mechanism_to_proto(mechanism),
        }),
        Action::Corrupt { percent, mechanism } => pb::fault::Action::Corrupt(pb::Corrupt {
            percent,
            mechanism: mechanism_to_proto(mechanism),
        }),
        Action::Reorder {
            percent,
            gap,
            mechanism,
        } => pb::fault::Action::Reorder(pb::Reorder {
            percent,
            gap: Some(duration_to_proto(gap)),
            mechanism: mechanism_to_proto(mechanism),
        }),
        Action::Slice { max_bytes, delay } => pb::fault::Action::Slice(pb::Slice {
            max_bytes,
            delay: Some(duration_to_proto(delay)),
        }),
    }
}

fn target_to_proto(target: Target) -> pb::Target {
    let scope = match target.scope {
        Scope::Host => pb::target::Scope::Host(pb::HostScope {}),
        Scope::Cgroup { path } => pb::target::Scope::Cgroup(pb::CgroupScope { path }),
        Scope::Pid { pid } => pb::target::Scope::Pid(pb::PidScope { pid }),
        Scope::Pod { uid } => pb::target::Scope::Pod(pb::PodScope { uid }),
        Scope::Container { id } => pb::target::Scope::Container(pb::ContainerScope { id }),
        Scope::Netns { path, interface } => {
            pb::target::Scope::Netns(pb::NetnsScope { path, interface })
        }
    };
    let protocol = match target.protocol {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Both => pb::Protocol::Unspecified,
    };
    let direction = match target.direction {
        Direction::Egress => pb::Direction::Egress,
        Direction::Ingress => pb::Direction::Ingress,
        Direction::Both => pb::Direction::Both,
    };
    let ports = target
        .ports
        .iter()
        .map(|r| pb::PortRange {
            first: r.first.into(),
            last: (r.last != r.first).then_some(r.last.into()),
        })
        .collect();
    pb::Target {
        scope: Some(scope),
        ports,
        protocol: protocol.into(),
        direction: direction.into(),
        peers: target.peers.iter().map(Cidr::to_string).collect(),
        exclude_peers: target.exclude_peers.iter().map(Cidr::to_string).collect(),
        request: target.request.map(super::request::to_proto),
    }
}

pub fn select(selection: pb::FaultSelection) -> Select {
    match selection {
        pb::FaultSelection::Unspecified | pb::FaultSelection::SelectActive => Select::Active,
        pb::FaultSelection::SelectEnded => Select::Ended,
        pb::FaultSelection::SelectAll => Select::All,
    }
}

pub fn revert_reason(reason: RevertReason) -> pb::RevertReason {
    match reason {
        RevertReason::Expired => pb::RevertReason::Expired,
        RevertReason::Removed => pb::RevertReason::Removed,
        RevertReason::Revoked => pb::RevertReason::Revoked,
        RevertReason::Aborted => pb::RevertReason::Aborted,
        RevertReason::Shutdown => pb::RevertReason::Shutdown,
        RevertReason::TargetGone => pb::RevertReason::TargetGone,
    }
}

pub fn event(event: &FaultEvent) -> pb::FaultEvent {
    let kind = match &event.kind {
        EventKind::Applied => pb::fault_event::Kind::Applied(pb::FaultApplied {}),
        EventKind::Reverted { reason, detail } => {
            pb::fault_event::Kind::Reverted(pb::FaultReverted {
                reason: revert_reason(*reason).into(),
                detail: detail.clone(),
            })
        }
        EventKind::Failed { message } => pb::fault_event::Kind::Failed(pb::FaultFailed {
            message: message.clone(),
        }),
    };
    pb::FaultEvent {
        time: Some(timestamp(event.time)),
        fault: Some(fault(event.fault.clone())),
        kind: Some(kind),
    }
}

pub fn lease(view: LeaseView) -> pb::Lease {
    pb::Lease {
        id: view.id,
        ttl: Some(duration_to_proto(view.ttl)),
        expires_at: Some(timestamp(view.expires_at)),
        remaining: Some(duration_to_proto(view.remaining)),
        fault_ids: view.fault_ids,
        private: view.private,
        labels: labels(&view.labels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_fault(percent: f64) -> pb::Fault {
        pb::Fault {
            action: Some(pb::fault::Action::Drop(pb::Drop { percent })),
            target: Some(pb::Target {
                scope: Some(pb::target::Scope::Cgroup(pb::CgroupScope {
                    path: "/app".into(),
                })),
                ports: vec![pb::PortRange {
                    first: 6379,
                    last: None,
                }],
                protocol: pb::Protocol::Tcp.into(),
                direction: pb::Direction::Egress.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_proto_duration_is_never_negative() {
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(duration_from_proto(&negative), None);
        assert_eq!(
            duration_from_proto(&duration_to_proto(Duration::from_millis(1500))),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn converts_a_drop_fault() {
        let spec = fault_spec(Some(drop_fault(30.0))).unwrap();
        assert_eq!(spec.action, Action::Drop { percent: 30.0 });
        assert_eq!(spec.target.protocol, Protocol::Tcp);
        assert_eq!(spec.target.direction, Direction::Egress);
        assert_eq!(
            spec.target.ports,
            vec![PortRange {
                first: 6379,
                last: 6379
            }]
        );
    }

    fn with_action(action: pb::fault::Action) -> pb::Fault {
        pb::Fault {
            action: Some(action),
            ..drop_fault(0.0)
        }
    }

    #[test]
    fn converts_delay_and_bandwidth_both_ways() {
        let ms = |ms| Some(duration_to_proto(Duration::from_millis(ms)));
        let delay = pb::Delay {
            latency: ms(100),
            jitter: ms(20),
            correlation: 25.0,
            mechanism: pb::Mechanism::Nfqueue.into(),
        };
        let spec = fault_spec(Some(with_action(pb::fault::Action::Delay(delay)))).unwrap();
        let Action::Delay(domain) = &spec.action else {
            panic!("not a delay: {spec:?}");
        };
        assert_eq!(domain.latency, Duration::from_millis(100));
        assert_eq!(domain.jitter, Duration::from_millis(20));
        assert_eq!(domain.mechanism, Some(Mechanism::Nfqueue));
        assert_eq!(mechanism_to_proto(domain.mechanism), delay.mechanism);

        let bandwidth = pb::Bandwidth {
            rate_bytes_per_sec: 262_144,
            burst: 0,
            mechanism: 0,
        };
        let spec = fault_spec(Some(with_action(pb::fault::Action::Bandwidth(bandwidth)))).unwrap();
        let Action::Bandwidth(domain) = &spec.action else {
            panic!("not a bandwidth: {spec:?}");
        };
        assert_eq!(domain.burst, 2621, "the default burst is filled in");
        assert_eq!(domain.mechanism, None);
    }

    #[test]
    fn names_the_bad_delay_and_bandwidth_fields() {
        let field = |action| fault_spec(Some(with_action(action))).unwrap_err().field;
        let delay = pb::Delay {
            latency: None,
            ..Default::default()
        };
        assert_eq!(
            field(pb::fault::Action::Delay(delay)),
            "fault.delay.latency"
        );
        let delay = pb::Delay {
            latency: Some(duration_to_proto(Duration::from_millis(5))),
            mechanism: 42,
            ..Default::default()
        };
        assert_eq!(
            field(pb::fault::Action::Delay(delay)),
            "fault.delay.mechanism"
        );
        let bandwidth = pb::Bandwidth::default();
        assert_eq!(
            field(pb::fault::Action::Bandwidth(bandwidth)),
            "fault.bandwidth.rate_bytes_per_sec"
        );
    }

    #[test]
    fn names_the_bad_field() {
        let field = |f: pb::Fault| fault_spec(Some(f)).unwrap_err().field;
        assert_eq!(field(drop_fault(101.0)), "fault.drop.percent");
        let mut f = drop_fault(1.0);
        f.target.as_mut().unwrap().scope = None;
        assert_eq!(field(f), "fault.target");
        let mut f = drop_fault(1.0);
        f.target.as_mut().unwrap().ports[0].first = 0;
        assert_eq!(field(f), "fault.target.ports[0].first");
        let mut f = drop_fault(1.0);
        f.target.as_mut().unwrap().protocol = 9;
        assert_eq!(field(f), "fault.target.protocol");
        assert_eq!(fault_spec(None).unwrap_err().field, "fault");
        assert_eq!(lease_ref(None).unwrap_err().field, "ttl");
        let negative = pb::inject_request::Lease::Ttl(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(lease_ref(Some(&negative)).unwrap_err().field, "ttl");
    }

    #[test]
    fn durations_out_of_range_name_the_field() {
        let bad = |seconds, nanos| {
            ttl(
                Some(&prost_types::Duration { seconds, nanos }),
                "fault.delay.latency",
            )
            .unwrap_err()
        };
        let err = bad(1, 1_000_000_000);
        assert_eq!(err.field, "fault.delay.latency");
        assert!(err.reason.contains("nanos out of range"), "{err}");
        assert!(bad(0, i32::MIN).reason.contains("nanos out of range"));
        assert!(bad(1, -5).reason.contains("different signs"));
        assert!(bad(-1, 0).reason.contains("negative"));
        let fine = prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000,
        };
        assert_eq!(ttl(Some(&fine), "ttl"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn sizes_are_bounded_before_conversion() {
        let exceeded = |f: pb::Fault| {
            let err = fault_spec(Some(f)).unwrap_err();
            assert!(err.over_limit, "{err}");
            assert!(err.to_string().len() < 200, "echoes the input: {err}");
            err.field
        };
        let mut f = drop_fault(1.0);
        f.target.as_mut().unwrap().peers = vec!["10.0.0.1".into(); 40_000];
        assert_eq!(exceeded(f), "fault.target.peers");
        let mut f = drop_fault(1.0);
        f.target.as_mut().unwrap().ports = vec![
            pb::PortRange {
                first: 1,
                last: None
            };
            100_000
        ];
        assert_eq!(exceeded(f), "fault.target.ports");
        let mut f = drop_fault(1.0);
        f.labels.insert("experiment".into(), "x".repeat(3 << 20));
        assert!(exceeded(f).starts_with("fault.labels"));
        let mut f = drop_fault(1.0);
        f.labels = (0..100_000)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert_eq!(exceeded(f), "fault.labels");
        let mut f = drop_fault(1.0);
        f.target.as_mut().unwrap().scope = Some(pb::target::Scope::Cgroup(pb::CgroupScope {
            path: "/".repeat(1 << 20),
        }));
        assert_eq!(exceeded(f), "fault.target.cgroup.path");
        let err = lease_id(&"x".repeat(3 << 20), "lease_id").unwrap_err();
        assert!(err.over_limit);
        assert_eq!(lease_id("", "lease_id").unwrap_err().field, "lease_id");
    }
}
