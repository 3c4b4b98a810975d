//! Guardrails over real gRPC, with the fake dataplane in place of the kernel: policy denials
//! and their codes, dry runs that change nothing, the audit log, Watch events, metrics.

mod support;

use std::time::Duration;

use faultd::policy::Policy;
use faultd_proto::v1 as pb;
use support::{Server, drop_fault, inject, ttl, with_scope};
use tonic::Code;

/// Asserts `status` has `code` and its message names `rule`.
fn assert_denied(status: &tonic::Status, code: Code, rule: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(rule),
        "the message should name the rule {rule}: {}",
        status.message()
    );
}

#[tokio::test]
async fn the_default_policy_denies_protected_ports_and_the_host() {
    let server = Server::start("denials", Policy::default()).await;
    let mut faults = server.faults().await;
    for (ports, rule, field) in [
        (
            vec![(22, None)],
            "protected_ports.ssh",
            "fault.target.ports[0]",
        ),
        (
            vec![(6379, None), (50, Some(60))],
            "protected_ports.dns",
            "fault.target.ports[1]",
        ),
        (
            vec![(10250, None)],
            "protected_ports.kubelet",
            "fault.target.ports[0]",
        ),
        (
            vec![(6000, Some(7000))],
            "protected_ports.kube-apiserver",
            "fault.target.ports[0]",
        ),
    ] {
        let status = faults
            .inject(inject(drop_fault(100.0, &ports), "30s"))
            .await
            .unwrap_err();
        assert_denied(&status, Code::PermissionDenied, rule);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    let host = with_scope(
        drop_fault(100.0, &[(6379, None)]),
        pb::target::Scope::Host(pb::HostScope {}),
    );
    let status = faults.inject(inject(host, "30s")).await.unwrap_err();
    assert_denied(&status, Code::PermissionDenied, "allow_host_scope");
    // The cgroup v2 root by path is the host too.
    let root = with_scope(
        drop_fault(100.0, &[(6379, None)]),
        pb::target::Scope::Cgroup(pb::CgroupScope { path: "/".into() }),
    );
    let status = faults.inject(inject(root, "30s")).await.unwrap_err();
    assert_denied(&status, Code::PermissionDenied, "allow_host_scope");
    // Above max_ttl: the ttl field is invalid, and the message says which limit.
    let status = faults
        .inject(inject(drop_fault(100.0, &[(6379, None)]), "2h"))
        .await
        .unwrap_err();
    assert_denied(&status, Code::InvalidArgument, "max_ttl");
    assert!(
        server.fake.rules().is_empty(),
        "a denied request changed the kernel"
    );
    assert!(
        server.engine.leases().is_empty(),
        "a denied request left a lease"
    );
}

#[tokio::test]
async fn limits_give_resource_exhausted_naming_the_rule() {
    let policy = Policy::from_toml("max_active_faults = 2\nmax_leases = 3").unwrap();
    let server = Server::start("limits", policy).await;
    let mut faults = server.faults().await;
    let mut leases = server.leases().await;
    for port in [1000, 1001] {
        faults
            .inject(inject(drop_fault(100.0, &[(port, None)]), "30s"))
            .await
            .unwrap();
    }
    let status = faults
        .inject(inject(drop_fault(100.0, &[(1002, None)]), "30s"))
        .await
        .unwrap_err();
    assert_denied(&status, Code::ResourceExhausted, "max_active_faults");
    // Two private leases are held; one more lease fits, the next does not.
    let grant = || pb::GrantRequest {
        ttl: Some(ttl("30s")),
        labels: Default::default(),
    };
    leases.grant(grant()).await.unwrap();
    let status = leases.grant(grant()).await.unwrap_err();
    assert_denied(&status, Code::ResourceExhausted, "max_leases");
    assert_eq!(server.fake.rules().len(), 2);
}

#[tokio::test]
async fn the_policy_file_can_open_what_the_defaults_close() {
    let policy = Policy::from_toml(
        "allow_host_scope = true\n[protected_ports]\nssh = false\nredis = [6379]",
    )
    .unwrap();
    let server = Server::start("opened", policy).await;
    let mut faults = server.faults().await;
    faults
        .inject(inject(drop_fault(100.0, &[(22, None)]), "30s"))
        .await
        .expect("ssh = false allows port 22");
    let host = with_scope(
        drop_fault(100.0, &[(8080, None)]),
        pb::target::Scope::Host(pb::HostScope {}),
    );
    faults
        .inject(inject(host, "30s"))
        .await
        .expect("allow_host_scope = true allows the host scope");
    let status = faults
        .inject(inject(drop_fault(100.0, &[(6379, None)]), "30s"))
        .await
        .unwrap_err();
    assert_denied(&status, Code::PermissionDenied, "protected_ports.redis");
}

#[tokio::test]
async fn a_fault_ends_at_max_fault_duration_even_when_its_lease_is_renewed() {
    let policy = Policy::from_toml("max_fault_duration = \"400ms\"").unwrap();
    let server = Server::start("duration", policy).await;
    let mut faults = server.faults().await;
    let mut leases = server.leases().await;
    let lease = leases
        .grant(pb::GrantRequest {
            ttl: Some(ttl("300ms")),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut request = inject(drop_fault(100.0, &[(6379, None)]), "1s");
    request.lease = Some(pb::inject_request::Lease::LeaseId(lease.id.clone()));
    let fault = faults.inject(request).await.unwrap().into_inner();
    let mut events = faults
        .watch(pb::WatchRequest {})
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        leases
            .renew(pb::RenewRequest {
                lease_id: lease.id.clone(),
            })
            .await
            .unwrap();
    }
    let event = tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .expect("the fault should end at 400 ms")
        .unwrap()
        .unwrap();
    let Some(pb::fault_event::Kind::Reverted(reverted)) = event.kind else {
        panic!("expected a revert, got {event:?}");
    };
    assert_eq!(reverted.reason(), pb::RevertReason::Expired);
    assert!(
        reverted.detail.contains("max_fault_duration"),
        "{reverted:?}"
    );
    assert_eq!(event.fault.unwrap().id, fault.id);
    assert!(server.fake.rules().is_empty());
    // The lease lives on: only the fault was capped.
    leases
        .renew(pb::RenewRequest { lease_id: lease.id })
        .await
        .expect("the lease outlives the capped fault");
    // A private lease goes with its capped fault.
    faults
        .inject(inject(drop_fault(100.0, &[(6380, None)]), "1s"))
        .await
        .unwrap();
    next_event(&mut events).await;
    let capped = next_event(&mut events).await;
    assert!(
        matches!(capped.kind, Some(pb::fault_event::Kind::Reverted(_))),
        "{capped:?}"
    );
    // Its private lease (ttl 1s) would live on for another 600 ms without its fault.
    let leases = server.engine.leases();
    assert!(
        leases.iter().all(|l| !l.private),
        "the private lease should be gone with its fault: {leases:?}"
    );
}

async fn next_event(events: &mut tonic::Streaming<pb::FaultEvent>) -> pb::FaultEvent {
    tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .expect("no event within 2 s")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_dry_run_resolves_and_checks_but_changes_nothing() {
    let server = Server::start("dryrun", Policy::default()).await;
    let mut faults = server.faults().await;
    let mut leases = server.leases().await;
    // Something in force already, so "nothing changes" is checked against a non-empty state.
    let existing = faults
        .inject(inject(drop_fault(50.0, &[(5432, None)]), "30s"))
        .await
        .unwrap()
        .into_inner();
    let rules_before = server.fake.rules();
    let faults_before = server.engine.faults(faultd::engine::Select::Active).len();
    let leases_before = server.engine.leases().len();

    let mut request = inject(
        drop_fault(100.0, &[(6379, None), (7000, Some(7001))]),
        "30s",
    );
    request.dry_run = true;
    let planned = faults.inject(request.clone()).await.unwrap().into_inner();
    assert_eq!(planned.state(), pb::FaultState::DryRun);
    assert!(planned.id.is_empty(), "a dry run has no id: {planned:?}");
    let resolved = planned.resolved.clone().unwrap();
    assert_eq!(resolved.cgroup_path, "/app");
    assert!(resolved.cgroup_id > 0);
    assert_eq!(resolved.rules, 3);
    assert_eq!(planned.mechanism, "fake");
    let remaining = planned
        .remaining
        .and_then(|r| faultd::api::convert::duration_from_proto(&r))
        .unwrap();
    assert!(
        remaining > Duration::from_secs(29) && remaining <= Duration::from_secs(30),
        "a dry run under a 30s ttl would end in {remaining:?}"
    );

    // Denied, invalid and conflicting requests are reported by a dry run as by a real one.
    let mut denied = inject(drop_fault(100.0, &[(22, None)]), "30s");
    denied.dry_run = true;
    assert_eq!(
        faults.inject(denied).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut conflict = inject(drop_fault(100.0, &[(5432, None)]), "30s");
    conflict.dry_run = true;
    let status = faults.inject(conflict).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains(&existing.id), "{status:?}");
    let mut unknown_lease = request.clone();
    unknown_lease.lease = Some(pb::inject_request::Lease::LeaseId("nope".into()));
    assert_eq!(
        faults.inject(unknown_lease).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    assert_eq!(
        server.fake.rules(),
        rules_before,
        "a dry run changed the kernel map"
    );
    assert_eq!(
        server.engine.faults(faultd::engine::Select::Active).len(),
        faults_before
    );
    assert_eq!(server.engine.leases().len(), leases_before);
    let listed = leases
        .list(pb::ListLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.leases.len(),
        1,
        "a dry run granted a lease: {listed:?}"
    );

    // The same request for real applies what the dry run showed.
    request.dry_run = false;
    let applied = faults.inject(request).await.unwrap().into_inner();
    assert_eq!(applied.resolved, planned.resolved);
    assert_eq!(applied.mechanism, planned.mechanism);
    assert_eq!(server.fake.rules().len(), rules_before.len() + 3);
}

#[tokio::test]
async fn every_mutating_call_writes_one_audit_line_with_the_caller() {
    let server = Server::start("audit", Policy::default()).await;
    let mut faults = server.faults().await;
    let mut leases = server.leases().await;

    let lease = leases
        .grant(pb::GrantRequest {
            ttl: Some(ttl("30s")),
            labels: [("experiment".to_string(), "redis".to_string())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    leases
        .renew(pb::RenewRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap();
    let renewals = tokio_stream::iter(vec![
        pb::KeepAliveRequest {
            lease_id: lease.id.clone(),
        };
        3
    ]);
    let mut replies = leases.keep_alive(renewals).await.unwrap().into_inner();
    while replies.message().await.unwrap().is_some() {}
    let mut request = inject(drop_fault(100.0, &[(6379, None)]), "30s");
    request.lease = Some(pb::inject_request::Lease::LeaseId(lease.id.clone()));
    let fault = faults.inject(request).await.unwrap().into_inner();
    let status = faults
        .inject(inject(drop_fault(100.0, &[(22, None)]), "30s"))
        .await
        .unwrap_err();
    faults
        .remove(pb::RemoveRequest {
            id: fault.id.clone(),
        })
        .await
        .unwrap();
    leases
        .revoke(pb::RevokeRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap();
    faults.abort(pb::AbortRequest {}).await.unwrap();
    // Read-only calls are not audited.
    faults.list(pb::ListFaultsRequest::default()).await.unwrap();
    leases.list(pb::ListLeasesRequest {}).await.unwrap();

    // The KeepAlive line is written when its stream ends, which the server sees a moment
    // after the client.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let lines = loop {
        let lines = server.audit_lines();
        if lines.len() >= 8 || tokio::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut calls: Vec<&str> = lines.iter().map(|l| l["call"].as_str().unwrap()).collect();
    calls.sort();
    let mut expected = vec![
        "faultd.v1.LeaseService/Grant",
        "faultd.v1.LeaseService/Renew",
        "faultd.v1.LeaseService/KeepAlive",
        "faultd.v1.FaultService/Inject",
        "faultd.v1.FaultService/Inject",
        "faultd.v1.FaultService/Remove",
        "faultd.v1.LeaseService/Revoke",
        "faultd.v1.FaultService/Abort",
    ];
    expected.sort();
    assert_eq!(calls, expected, "{lines:#?}");

    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    for line in &lines {
        let peer = &line["peer"];
        assert_eq!(peer["transport"], "unix", "{line}");
        assert_eq!(peer["uid"], uid, "{line}");
        assert_eq!(peer["gid"], gid, "{line}");
        assert_eq!(peer["pid"], std::process::id(), "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    let denied = lines
        .iter()
        .find(|l| l["code"] == "PERMISSION_DENIED")
        .expect("the denied Inject is audited");
    assert_eq!(denied["message"], status.message());
    assert!(
        denied["request"]["fault"]["target"]
            .as_str()
            .unwrap()
            .contains("ports 22"),
        "{denied}"
    );
    let injected = lines
        .iter()
        .find(|l| l["call"] == "faultd.v1.FaultService/Inject" && l["code"] == "OK")
        .unwrap();
    assert_eq!(injected["result"]["faultId"], fault.id);
    assert_eq!(injected["request"]["lease"]["leaseId"], lease.id);
    let keepalive = lines
        .iter()
        .find(|l| l["call"] == "faultd.v1.LeaseService/KeepAlive")
        .unwrap();
    assert_eq!(keepalive["request"]["renewals"], 3, "{keepalive}");
    assert_eq!(keepalive["request"]["leaseIds"][0], lease.id, "{keepalive}");
}

/// The next event, within 2 s.
async fn next(events: &mut tonic::Streaming<pb::FaultEvent>) -> pb::FaultEvent {
    tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .expect("no event within 2 s")
        .expect("the stream failed")
        .expect("the stream ended")
}

fn reverted(event: &pb::FaultEvent) -> pb::RevertReason {
    match &event.kind {
        Some(pb::fault_event::Kind::Reverted(r)) => r.reason(),
        other => panic!("expected a revert, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_delivers_applied_and_every_kind_of_revert() {
    let server = Server::start("watch", Policy::default()).await;
    let mut faults = server.faults().await;
    let mut leases = server.leases().await;
    let mut events = faults
        .watch(pb::WatchRequest {})
        .await
        .unwrap()
        .into_inner();

    // Applied, then expired with its private lease.
    let short = faults
        .inject(inject(drop_fault(100.0, &[(6379, None)]), "300ms"))
        .await
        .unwrap()
        .into_inner();
    let applied = next(&mut events).await;
    assert!(
        matches!(applied.kind, Some(pb::fault_event::Kind::Applied(_))),
        "{applied:?}"
    );
    let fault = applied.fault.unwrap();
    assert_eq!(fault.id, short.id);
    assert_eq!(fault.state(), pb::FaultState::Active);
    assert_eq!(fault.mechanism, "fake");
    let expired = next(&mut events).await;
    assert_eq!(reverted(&expired), pb::RevertReason::Expired);
    assert_eq!(expired.fault.as_ref().unwrap().id, short.id);
    assert_eq!(expired.fault.unwrap().state(), pb::FaultState::Reverted);

    // Removed.
    let fault = faults
        .inject(inject(drop_fault(100.0, &[(6380, None)]), "30s"))
        .await
        .unwrap()
        .into_inner();
    next(&mut events).await;
    faults
        .remove(pb::RemoveRequest { id: fault.id })
        .await
        .unwrap();
    assert_eq!(
        reverted(&next(&mut events).await),
        pb::RevertReason::Removed
    );

    // Revoked.
    let lease = leases
        .grant(pb::GrantRequest {
            ttl: Some(ttl("30s")),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut request = inject(drop_fault(100.0, &[(6381, None)]), "30s");
    request.lease = Some(pb::inject_request::Lease::LeaseId(lease.id.clone()));
    faults.inject(request).await.unwrap();
    next(&mut events).await;
    leases
        .revoke(pb::RevokeRequest { lease_id: lease.id })
        .await
        .unwrap();
    assert_eq!(
        reverted(&next(&mut events).await),
        pb::RevertReason::Revoked
    );

    // Aborted.
    faults
        .inject(inject(drop_fault(100.0, &[(6382, None)]), "30s"))
        .await
        .unwrap();
    next(&mut events).await;
    faults.abort(pb::AbortRequest {}).await.unwrap();
    assert_eq!(
        reverted(&next(&mut events).await),
        pb::RevertReason::Aborted
    );

    // A kernel failure on apply is an event too; nothing was applied.
    server.fake.state.lock().unwrap().fail_insert_after = Some(0);
    let status = faults
        .inject(inject(drop_fault(100.0, &[(6383, None)]), "30s"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    let failed = next(&mut events).await;
    let Some(pb::fault_event::Kind::Failed(failure)) = &failed.kind else {
        panic!("expected a failure, got {failed:?}");
    };
    assert!(failure.message.contains("injected failure"), "{failure:?}");

    // Shutdown: the reverts go out, then the stream ends with UNAVAILABLE.
    faults
        .inject(inject(drop_fault(100.0, &[(6384, None)]), "30s"))
        .await
        .unwrap();
    next(&mut events).await;
    server.engine.shutdown();
    server.stop.send(true).unwrap();
    assert_eq!(
        reverted(&next(&mut events).await),
        pb::RevertReason::Shutdown
    );
    let end = tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .expect("the stream should end when faultd stops")
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
}

#[tokio::test]
async fn metrics_show_faults_leases_codes_and_latencies() {
    let server = Server::start("metrics", Policy::default()).await;
    let mut faults = server.faults().await;
    let fault = faults
        .inject(inject(drop_fault(100.0, &[(6379, None)]), "30s"))
        .await
        .unwrap()
        .into_inner();
    faults
        .inject(inject(drop_fault(100.0, &[(22, None)]), "30s"))
        .await
        .unwrap_err();
    // The kernel counters of the fault's slot (the first fault takes slot 0), as the program
    // would have counted them.
    {
        let mut state = server.fake.state.lock().unwrap();
        state.counters.insert(
            0,
            faultd_common::Counters {
                matched: 120,
                dropped: 30,
                ..Default::default()
            },
        );
    }
    let registry = server.engine.metrics().registry(server.engine.clone());
    let text = faultd::metrics::render(&registry).unwrap();
    let has = |needle: &str| {
        assert!(
            text.lines().any(|l| l.starts_with(needle)),
            "no line starting with {needle:?} in:\n{text}"
        )
    };
    has(r#"faultd_faults_active{action="drop",mechanism="fake"} 1"#);
    has("faultd_leases_active 1");
    has(&format!(
        r#"faultd_fault_packets_matched_total{{fault="{}",lease="{}",action="drop",mechanism="fake"}} 120"#,
        fault.id, fault.lease_id
    ));
    has(&format!(
        r#"faultd_fault_packets_affected_total{{fault="{}",lease="{}",action="drop",mechanism="fake",effect="dropped"}} 30"#,
        fault.id, fault.lease_id
    ));
    has(
        r#"faultd_grpc_handled_total{grpc_service="faultd.v1.FaultService",grpc_method="Inject",grpc_code="OK"} 1"#,
    );
    has(
        r#"faultd_grpc_handled_total{grpc_service="faultd.v1.FaultService",grpc_method="Inject",grpc_code="PERMISSION_DENIED"} 1"#,
    );
    has(r#"faultd_fault_apply_seconds_count{action="drop"} 1"#);
    has(r#"faultd_faults_applied_total{action="drop"} 1"#);

    faults.abort(pb::AbortRequest {}).await.unwrap();
    let text = faultd::metrics::render(&registry).unwrap();
    assert!(text.contains("faultd_aborts_total 1"), "{text}");
    assert!(
        text.contains(r#"faultd_faults_reverted_total{action="drop",reason="aborted"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"faultd_fault_revert_seconds_count{action="drop"} 1"#),
        "{text}"
    );
    assert!(
        !text.contains(&fault.id),
        "a reverted fault still has series:\n{text}"
    );
    assert!(text.contains("faultd_leases_active 0"), "{text}");
}

#[tokio::test]
async fn lease_expirations_are_counted() {
    let server = Server::start("expirations", Policy::default()).await;
    let mut leases = server.leases().await;
    for _ in 0..2 {
        leases
            .grant(pb::GrantRequest {
                ttl: Some(ttl("50ms")),
                labels: Default::default(),
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let registry = server.engine.metrics().registry(server.engine.clone());
    let text = faultd::metrics::render(&registry).unwrap();
    assert!(text.contains("faultd_lease_expirations_total 2"), "{text}");
}
