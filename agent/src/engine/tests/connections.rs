//! Reject and reset: connects refused, connections torn down, missing kernel support.

use super::*;

fn connection_spec(action: Action, port: u32) -> FaultSpec {
    FaultSpec {
        action,
        target: Target {
            scope: Scope::Cgroup {
                path: "/app".into(),
            },
            ports: vec![PortRange::new(port, None, "p").unwrap()],
            protocol: Protocol::Both,
            direction: Direction::Both,
            peers: Vec::new(),
            exclude_peers: Vec::new(),
            request: None,
        },
        labels: Labels::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn reject_refuses_connects_to_the_ports_and_leaves_packets_alone() {
    let (engine, fake) = engine();
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reject, 6379),
        )
        .unwrap();
    assert_eq!(fault.mechanism, "fake-connect");
    let rules = fake.rules();
    assert_eq!(rules.len(), 1);
    let (key, value) = rules.iter().next().unwrap();
    assert_eq!(
        *key,
        RuleKey::new(42, PROTO_TCP, faultd_common::DIR_CONNECT, 6379)
    );
    assert_eq!(value.action, faultd_common::ACTION_REJECT);
    assert!(fake.state.lock().unwrap().destroyed.is_empty());
    // A drop on the same port is a different fault: packets, not connects.
    engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            drop_spec(100.0, "/app", 6379),
        )
        .unwrap();
    // A second connection fault on the port overlaps.
    let err = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reset { after_bytes: None }, 6379),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn reset_refuses_first_then_tears_down_the_scope_connections() {
    let (engine, fake) = engine();
    fake.state.lock().unwrap().sockets_per_destroy = 3;
    let fault = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reset { after_bytes: None }, 5432),
        )
        .unwrap();
    assert_eq!(fault.connections_reset, 3);
    let state = fake.state.lock().unwrap();
    assert_eq!(state.rules.len(), 1, "new connects are refused");
    assert_eq!(state.destroyed.len(), 1);
    let filter = &state.destroyed[0];
    assert_eq!(
        filter.cgroup_dir,
        std::path::Path::new("/sys/fs/cgroup/app")
    );
    assert_eq!(filter.ports, vec![PortRange::new(5432, None, "p").unwrap()]);
    assert_eq!(filter.min_bytes, None);
}

#[tokio::test(start_paused = true)]
async fn missing_kernel_support_is_a_precondition_and_changes_nothing() {
    let (engine, fake) = engine();
    fake.state.lock().unwrap().connect_missing = Some("no bpf_set_retval".into());
    let err = engine
        .inject(
            LeaseRef::Ttl(Duration::from_secs(30)),
            connection_spec(Action::Reject, 6379),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("no bpf_set_retval"));
    assert!(fake.rules().is_empty());
    assert!(engine.leases().is_empty(), "no private lease left behind");
}
