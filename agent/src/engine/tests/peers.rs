//! Faults with peers sharing keys, and netns interface scopes.

use super::shaping::{delay_spec, shaping_engine};
use super::*;

fn peer_spec(action: Action, peers: &[&str], exclude: &[&str]) -> FaultSpec {
    let cidrs = |list: &[&str]| {
        list.iter()
            .map(|t| crate::fault::Cidr::parse(t, "f").unwrap())
            .collect::<Vec<_>>()
    };
    let mut spec = drop_spec(100.0, "/app", 6379);
    spec.action = action;
    spec.target.peers = cidrs(peers);
    spec.target.exclude_peers = cidrs(exclude);
    spec
}

fn peer(cidr: &str) -> PeerEntry {
    PeerEntry {
        rule: KEY,
        cidr: crate::fault::Cidr::parse(cidr, "f").unwrap(),
    }
}

#[tokio::test(start_paused = true)]
async fn faults_with_disjoint_peers_share_a_key_and_leave_it_clean() {
    let (engine, fake) = engine();
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let drop = || Action::Drop { percent: 100.0 };
    let a = engine
        .inject(ttl(), peer_spec(drop(), &["10.0.0.0/8"], &["10.1.0.0/16"]))
        .unwrap();
    assert_eq!(
        fake.rules()[&KEY].action,
        ACTION_PEERS,
        "the key is a marker"
    );
    let peers = fake.peers();
    assert_eq!(peers[&peer("10.0.0.0/8")].action, ACTION_DROP);
    assert_eq!(peers[&peer("10.1.0.0/16")].action, ACTION_PASS);

    // Inside a's exclusion: disjoint, so it is allowed and takes the excluded prefix over.
    let b = engine
        .inject(ttl(), peer_spec(drop(), &["10.1.0.0/16"], &[]))
        .unwrap();
    let peers = fake.peers();
    assert_eq!(peers[&peer("10.1.0.0/16")].action, ACTION_DROP);
    assert_ne!(
        peers[&peer("10.1.0.0/16")].counter_slot,
        peers[&peer("10.0.0.0/8")].counter_slot
    );

    // Overlapping peers, or none at all, conflict with what holds the key.
    for (peers, exclude) in [(&["10.2.0.0/16"][..], &[][..]), (&[], &[]), (&[], &["::1"])] {
        let err = engine
            .inject(ttl(), peer_spec(drop(), peers, exclude))
            .unwrap_err();
        assert!(
            matches!(err, Error::Conflict { .. }),
            "{peers:?} {exclude:?}: {err:?}"
        );
    }
    // A fault without peers holds the key whole: a fault with peers conflicts with it too.
    let other_port = drop_spec(100.0, "/app", 6380);
    let plain = engine.inject(ttl(), other_port).unwrap();
    let mut on_6380 = peer_spec(drop(), &["192.168.0.0/16"], &[]);
    on_6380.target.ports = vec![PortRange::new(6380, None, "p").unwrap()];
    assert!(matches!(
        engine.inject(ttl(), on_6380).unwrap_err(),
        Error::Conflict { .. }
    ));
    engine.remove(&plain.id).unwrap();

    // Removing a gives its prefix back (and b keeps the one it took over).
    engine.remove(&a.id).unwrap();
    let peers = fake.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[&peer("10.1.0.0/16")].action, ACTION_DROP);
    assert_eq!(fake.rules()[&KEY].action, ACTION_PEERS);
    engine.remove(&b.id).unwrap();
    assert!(fake.peers().is_empty());
    assert!(
        fake.rules().is_empty(),
        "the marker goes with the last fault"
    );
}

#[tokio::test(start_paused = true)]
async fn peers_entries_follow_the_lease_and_reset_filters_by_peer() {
    let (engine, fake) = engine();
    let lease = engine
        .grant(Duration::from_secs(10), Labels::new())
        .unwrap();
    let fault = engine
        .inject(
            LeaseRef::Existing(lease.id.clone()),
            peer_spec(
                Action::Reset { after_bytes: None },
                &["::1", "127.0.0.2"],
                &[],
            ),
        )
        .unwrap();
    let connect = |cidr: &str| PeerEntry {
        rule: RuleKey::new(42, PROTO_TCP, faultd_common::DIR_CONNECT, 6379),
        ..peer(cidr)
    };
    let before = fake.peers()[&connect("::1")].expires_at_ns;
    assert_eq!(fake.peers()[&connect("127.0.0.2/32")].action, ACTION_REJECT);
    tokio::time::advance(Duration::from_secs(5)).await;
    engine.renew(&lease.id).unwrap();
    let after = fake.peers()[&connect("::1")].expires_at_ns;
    assert!(after > before, "renew moved the peers entry's deadline");
    let destroyed = fake.state.lock().unwrap().destroyed.clone();
    let peers = destroyed[0]
        .peers
        .as_ref()
        .expect("the reset filter has the peers");
    assert!(peers.contains("::1".parse().unwrap()));
    assert!(!peers.contains("127.0.0.1".parse().unwrap()));
    engine.revoke(&lease.id).unwrap();
    assert!(fake.peers().is_empty() && fake.rules().is_empty());
    drop(fault);
}

#[tokio::test(start_paused = true)]
async fn delays_with_disjoint_peers_share_a_key_and_overlapping_ones_conflict() {
    let (engine, _fake, _edt, nfqueue) = shaping_engine(Some("no fq"));
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let delay = || {
        Action::delay(
            Duration::from_millis(10),
            Duration::ZERO,
            0.0,
            None,
            "fault.delay",
        )
        .unwrap()
    };
    let a = engine
        .inject(ttl(), peer_spec(delay(), &["127.0.0.2"], &[]))
        .unwrap();
    assert_eq!(a.mechanism, "nfqueue");
    let b = engine
        .inject(ttl(), peer_spec(delay(), &["127.0.0.1", "::1"], &[]))
        .unwrap();
    assert_eq!(nfqueue.faults().len(), 2, "disjoint peers share the key");
    for (peers, exclude) in [
        (&[][..], &["127.0.0.3"][..]),
        (&["127.0.0.0/8"][..], &[][..]),
        (&[][..], &[][..]),
    ] {
        match engine.inject(ttl(), peer_spec(delay(), peers, exclude)) {
            Err(err @ Error::Conflict { .. }) => {
                assert!(err.to_string().contains("overlaps fault"), "{err}")
            }
            other => {
                panic!("peers {peers:?} except {exclude:?}: expected a conflict, got {other:?}")
            }
        }
    }
    let err = engine
        .inject(ttl(), peer_spec(delay(), &["10.1.0.0/16"], &["10.0.0.0/8"]))
        .unwrap_err();
    let Error::Invalid(invalid) = err else {
        panic!("{err:?}")
    };
    assert_eq!(invalid.field, "fault.target.exclude_peers");
    engine.remove(&a.id).unwrap();
    engine.remove(&b.id).unwrap();
    assert!(nfqueue.faults().is_empty());
    engine
        .inject(ttl(), peer_spec(delay(), &[], &[]))
        .expect("once the faults with peers are gone the key is free");
}

#[tokio::test(start_paused = true)]
async fn netns_faults_share_the_interfaces_programs_and_release_them_with_the_last() {
    let (engine, fake) = engine();
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let on_port = |port| {
        let mut spec = drop_spec(100.0, "/app", port);
        spec.target.scope = Scope::Netns {
            path: "/run/netns/r".into(),
            interface: "r1".into(),
        };
        spec
    };
    let a = engine.inject(ttl(), on_port(6379)).unwrap();
    let b = engine.inject(ttl(), on_port(5432)).unwrap();
    let scope = faultd_common::netns_scope_id(3);
    assert_eq!(
        fake.state.lock().unwrap().interfaces[&scope],
        ("r1".into(), 2)
    );
    assert!(fake.rules().keys().all(|k| k.scope_id == scope));
    engine.remove(&a.id).unwrap();
    assert_eq!(fake.state.lock().unwrap().interfaces[&scope].1, 1);
    engine.remove(&b.id).unwrap();
    assert!(fake.state.lock().unwrap().interfaces.is_empty());

    let mut reset = on_port(6379);
    reset.action = Action::Reset {
        after_bytes: Some(100),
    };
    let Err(Error::Invalid(invalid)) = engine.inject(ttl(), reset) else {
        panic!("a reset after some bytes on a netns scope must be invalid")
    };
    assert_eq!(invalid.field, "fault.target.netns");
    // A reject or reset there needs the NFQUEUE mechanism's REJECT rules, which this engine
    // lacks.
    for action in [Action::Reject, Action::Reset { after_bytes: None }] {
        let mut refusing = on_port(6379);
        refusing.action = action;
        assert!(matches!(
            engine.inject(ttl(), refusing),
            Err(Error::Unsupported(_))
        ));
    }
    assert!(fake.rules().is_empty() && fake.state.lock().unwrap().interfaces.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_reject_on_a_netns_scope_goes_to_the_nfqueue_mechanism_either_way() {
    let (engine, fake, _edt, nfqueue) = shaping_engine(Some("no fq"));
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let mut reject = drop_spec(100.0, "/app", 5432);
    reject.action = Action::Reject;
    reject.target.direction = crate::fault::Direction::Ingress;
    reject.target.scope = Scope::Netns {
        path: "/run/netns/r".into(),
        interface: "r1".into(),
    };
    let fault = engine.inject(ttl(), reject.clone()).unwrap();
    assert_eq!(fault.mechanism, "nfqueue");
    assert!(nfqueue.faults().contains_key(&fault.id));
    assert!(
        fake.rules().is_empty() && fake.state.lock().unwrap().interfaces.is_empty(),
        "the REJECT rules need neither the rules map nor tc programs"
    );
    match engine.inject(ttl(), reject) {
        Err(Error::Conflict { holder, .. }) => assert_eq!(holder, fault.id),
        other => panic!("a second reject on the same port must conflict: {other:?}"),
    }
    engine.remove(&fault.id).unwrap();
    assert!(nfqueue.faults().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_delay_on_a_netns_scope_goes_to_its_shaper_beside_a_drop_and_attaches_no_programs() {
    let (engine, fake, _edt, nfqueue) = shaping_engine(Some("no fq"));
    let ttl = || LeaseRef::Ttl(Duration::from_secs(30));
    let on_r1 = |mut spec: FaultSpec| {
        spec.target.scope = Scope::Netns {
            path: "/run/netns/r".into(),
            interface: "r1".into(),
        };
        spec
    };
    let delay = engine.inject(ttl(), on_r1(delay_spec(None, 6379))).unwrap();
    assert_eq!(delay.mechanism, "nfqueue");
    let scope = faultd_common::netns_scope_id(3);
    assert!(
        nfqueue.faults()[&delay.id]
            .keys
            .iter()
            .all(|k| k.scope_id == scope)
    );
    assert!(
        fake.state.lock().unwrap().interfaces.is_empty(),
        "a shaped fault needs no tc programs on the interface"
    );
    let drop = engine
        .inject(ttl(), on_r1(drop_spec(100.0, "/app", 6379)))
        .expect("a drop may overlap a delay");
    assert_eq!(fake.state.lock().unwrap().interfaces[&scope].1, 1);
    match engine.inject(ttl(), on_r1(delay_spec(None, 6379))) {
        Err(Error::Conflict { holder, .. }) => assert_eq!(holder, delay.id),
        other => panic!("a second delay on the same key must conflict: {other:?}"),
    }
    engine.remove(&delay.id).unwrap();
    assert!(nfqueue.faults().is_empty());
    assert_eq!(
        fake.state.lock().unwrap().interfaces[&scope].1,
        1,
        "removing the delay leaves the drop's programs"
    );
    engine.remove(&drop.id).unwrap();
    assert!(fake.state.lock().unwrap().interfaces.is_empty());
}
