use super::*;
use faultd_common::PROTO_UDP;
use std::time::Duration;

fn target(ports: Vec<PortRange>, protocol: Protocol, direction: Direction) -> Target {
    Target {
        scope: Scope::Host,
        ports,
        protocol,
        direction,
        peers: Vec::new(),
        exclude_peers: Vec::new(),
        request: None,
    }
}

#[test]
fn request_matches_take_drop_and_reset_on_tcp_egress_keys() {
    let port = PortRange::new(6379, None, "p").unwrap();
    let mut t = target(vec![port], Protocol::Both, Direction::Both);
    t.request = Some(RequestMatch::redis(vec!["set".into()], String::new(), "r").unwrap());
    let spec = |action: Action, target: &Target| FaultSpec {
        action,
        target: target.clone(),
        labels: Labels::new(),
    };
    let drop = spec(Action::Drop { percent: 100.0 }, &t);
    drop.validate().unwrap();
    assert_eq!(
        drop.rule_keys(3),
        vec![RuleKey::new(3, PROTO_TCP, DIR_EGRESS, 6379)]
    );
    let normal = drop.clone().normalized().target;
    assert_eq!(
        (normal.protocol, normal.direction),
        (Protocol::Tcp, Direction::Egress)
    );
    spec(Action::Reset { after_bytes: None }, &t)
        .validate()
        .unwrap();
    let field =
        |action: Action, target: &Target| spec(action, target).validate().unwrap_err().field;
    assert_eq!(
        field(Action::Drop { percent: 50.0 }, &t),
        "fault.drop.percent"
    );
    assert_eq!(field(Action::Reject, &t), "fault.target.request");
    assert_eq!(
        field(
            Action::Reset {
                after_bytes: Some(5)
            },
            &t
        ),
        "fault.reset.after_bytes"
    );
    let mut udp = t.clone();
    udp.protocol = Protocol::Udp;
    assert_eq!(
        field(Action::Drop { percent: 100.0 }, &udp),
        "fault.target.protocol"
    );
    let mut ingress = t.clone();
    ingress.direction = Direction::Ingress;
    assert_eq!(
        field(Action::Drop { percent: 100.0 }, &ingress),
        "fault.target.direction"
    );
    let lose = spec(Action::LoseReply, &t);
    lose.validate().unwrap();
    assert_eq!(
        lose.rule_keys(3),
        vec![
            RuleKey::new(3, PROTO_TCP, DIR_EGRESS, 6379),
            RuleKey::new(3, PROTO_TCP, DIR_INGRESS, 6379)
        ]
    );
    let mut bare = t.clone();
    bare.request = None;
    assert_eq!(field(Action::LoseReply, &bare), "fault.target.request");
    let delay = Action::delay(Duration::from_millis(5), Duration::ZERO, 0.0, None, "d").unwrap();
    spec(delay, &t).validate().unwrap();
    let netem = Action::delay(
        Duration::from_millis(5),
        Duration::ZERO,
        0.0,
        Some(Mechanism::Netem),
        "d",
    )
    .unwrap();
    assert_eq!(field(netem, &t), "fault.delay.mechanism");
    let bandwidth = Action::bandwidth(1000, 0, None, "b").unwrap();
    assert_eq!(field(bandwidth, &t), "fault.target.request");
}

#[test]
fn stall_is_a_tcp_packet_fault() {
    let stall = Action::stall(None, "fault.stall").unwrap();
    assert_eq!((stall.name(), stall.shaping()), ("stall", None));
    assert!(!stall.closes_connections());
    let closing = Action::stall(Some(Duration::from_secs(2)), "fault.stall").unwrap();
    assert!(closing.closes_connections());
    let zero = Action::stall(Some(Duration::ZERO), "fault.stall").unwrap_err();
    assert_eq!(zero.field, "fault.stall.close_after");

    let spec = |action: Action, protocol| FaultSpec {
        action,
        target: target(
            vec![PortRange::new(6379, None, "p").unwrap()],
            protocol,
            Direction::Both,
        ),
        labels: Labels::new(),
    };
    let udp = spec(stall.clone(), Protocol::Udp).validate().unwrap_err();
    assert_eq!(udp.field, "fault.target.protocol");
    // Both protocols become TCP: the stall's keys are TCP keys of both directions.
    let both = spec(stall, Protocol::Both);
    both.validate().unwrap();
    let normalized = both.normalized();
    assert_eq!(normalized.target.protocol, Protocol::Tcp);
    let keys = normalized.rule_keys(9);
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter()
            .all(|k| k.protocol == PROTO_TCP && k.port == 6379)
    );
}

#[test]
fn slow_handshakes_are_shaped_tcp_faults() {
    let ms = Duration::from_millis;
    let connect = Action::slow_connect(ms(300), "fault.slow_connect").unwrap();
    assert_eq!(connect.name(), "slow_connect");
    assert_eq!(
        connect.shaping(),
        Some(None),
        "the agent picks the mechanism"
    );
    let close = Action::slow_close(ms(300), "fault.slow_close").unwrap();
    assert_eq!(close.name(), "slow_close");
    for latency in [ms(0), MAX_DELAY + ms(1)] {
        let err = Action::slow_connect(latency, "fault.slow_connect").unwrap_err();
        assert_eq!(err.field, "fault.slow_connect.latency");
    }
    let udp = FaultSpec {
        action: close,
        target: target(
            vec![PortRange::new(5432, None, "p").unwrap()],
            Protocol::Udp,
            Direction::Both,
        ),
        labels: Labels::new(),
    };
    assert_eq!(udp.validate().unwrap_err().field, "fault.target.protocol");
}

#[test]
fn duplicate_corrupt_and_reorder_take_a_share_and_a_gap() {
    let zero = Duration::ZERO;
    let duplicate = Action::duplicate(10.0, None, "fault.duplicate").unwrap();
    assert_eq!(
        duplicate,
        Action::Duplicate {
            percent: 10.0,
            mechanism: None
        }
    );
    assert_eq!(duplicate.shaping(), Some(None));
    // Some kernels refuse a duplicating netem beside another netem: NFQUEUE first.
    assert_eq!(
        duplicate.auto_preference(),
        [Mechanism::Nfqueue, Mechanism::Netem]
    );
    let forced = Action::corrupt(1.0, Some(Mechanism::Netem), "c").unwrap();
    assert_eq!(forced.shaping(), Some(Some(Mechanism::Netem)));
    assert_eq!(forced.auto_preference(), Mechanism::PREFERENCE);
    // EDT sets departure times: it cannot copy, damage or reorder a packet.
    let edt = Action::reorder(1.0, zero, Some(Mechanism::Edt), "fault.reorder");
    assert_eq!(edt.unwrap_err().field, "fault.reorder.mechanism");
    let reorder = Action::reorder(25.0, zero, None, "fault.reorder").unwrap();
    assert_eq!(
        reorder,
        Action::Reorder {
            percent: 25.0,
            gap: DEFAULT_REORDER_GAP,
            mechanism: None
        }
    );
    let corrupt = |percent| {
        Action::corrupt(percent, None, "fault.corrupt")
            .unwrap_err()
            .field
    };
    assert_eq!(corrupt(100.5), "fault.corrupt.percent");
    assert_eq!(corrupt(f64::NAN), "fault.corrupt.percent");
    assert_eq!(
        Action::reorder(
            1.0,
            MAX_DELAY + Duration::from_millis(1),
            None,
            "fault.reorder"
        )
        .unwrap_err()
        .field,
        "fault.reorder.gap"
    );
    assert_eq!(
        Action::slice(0, zero, "fault.slice").unwrap_err().field,
        "fault.slice.max_bytes"
    );
    assert!(Action::slice(MAX_SLICE + 1, zero, "fault.slice").is_err());
    assert_eq!(
        Action::slice(16, Duration::from_millis(101), "fault.slice")
            .unwrap_err()
            .field,
        "fault.slice.delay"
    );
    assert_eq!(Action::slice(16, zero, "s").unwrap().name(), "slice");
    // UDP is fine: these act on packets of either protocol.
    let spec = FaultSpec {
        action: duplicate,
        target: target(
            vec![PortRange::new(9000, None, "p").unwrap()],
            Protocol::Udp,
            Direction::Egress,
        ),
        labels: Labels::new(),
    };
    assert!(spec.validate().is_ok());
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

#[test]
fn on_an_interface_reject_keeps_its_direction_and_reset_after_bytes_is_refused() {
    let mut t = target(
        vec![PortRange::new(5432, None, "p").unwrap()],
        Protocol::Both,
        Direction::Ingress,
    );
    t.scope = Scope::Netns {
        path: "/run/netns/r".into(),
        interface: "r1".into(),
    };
    let spec = |action: Action, target: &Target| FaultSpec {
        action,
        target: target.clone(),
        labels: Labels::new(),
    };
    let reject = spec(Action::Reject, &t);
    reject.validate().unwrap();
    let normal = reject.normalized().target;
    assert_eq!(
        (normal.protocol, normal.direction),
        (Protocol::Tcp, Direction::Ingress)
    );
    spec(Action::Reset { after_bytes: None }, &t)
        .validate()
        .unwrap();
    let after = spec(
        Action::Reset {
            after_bytes: Some(9),
        },
        &t,
    );
    assert_eq!(after.validate().unwrap_err().field, "fault.target.netns");
    t.protocol = Protocol::Udp;
    assert_eq!(
        spec(Action::Reject, &t).validate().unwrap_err().field,
        "fault.target.protocol"
    );
}
