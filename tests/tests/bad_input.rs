//! Bad requests get the right code and name the field; a failed request changes nothing.

use std::time::{Duration, Instant};

use faultd_proto::v1::target::Scope;
use faultd_proto::v1::{
    CgroupScope, Direction, Fault, GetFaultRequest, GrantRequest, InjectRequest, Mechanism,
    NetnsScope, Protocol, RemoveRequest, RenewRequest, RevokeRequest, TimeToLiveRequest,
};
use faultd_tests::api::{
    bandwidth_fault, cgroup_target, delay_fault, drop_fault, list_faults, list_leases,
    reject_fault, reset_fault, slice_fault, slow_fault, stall_fault, tamper_fault, under_lease,
    with_ttl,
};
use faultd_tests::uniq::uniq;
use faultd_tests::{Cgroup, Faultd, FaultdOptions};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn bad_requests_name_the_field_and_change_nothing() {
    let cgroup = Cgroup::new();
    let faultd = Faultd::start_with(FaultdOptions {
        max_ttl: Some("1h".into()),
        ..Default::default()
    })
    .await;
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();
    let good = || cgroup_target(&cgroup, &[6379], Protocol::Tcp, Direction::Egress);
    let minute = Duration::from_secs(60);

    let mut no_ports = good();
    no_ports.ports.clear();
    let mut no_scope = good();
    no_scope.scope = None;
    let mut unknown_cgroup = good();
    unknown_cgroup.scope = Some(Scope::Cgroup(CgroupScope {
        path: format!("/faultd-test-{}-absent", uniq()),
    }));

    // Checked before the namespace is looked at: it need not exist.
    let mut interface = good();
    interface.scope = Some(Scope::Netns(NetnsScope {
        path: format!("/run/netns/faultd-test-{}-absent", uniq()),
        interface: "r1".into(),
    }));

    let peers = |peers: &[&str], exclude: &[&str]| {
        let mut target = good();
        target.peers = peers.iter().map(|p| p.to_string()).collect();
        target.exclude_peers = exclude.iter().map(|p| p.to_string()).collect();
        target
    };

    let cases: Vec<(&str, InjectRequest, &str)> = vec![
        (
            "a peer that is no CIDR",
            with_ttl(
                drop_fault(100.0, peers(&["10.0.0.0/8", "redis"], &[])),
                minute,
            ),
            "fault.target.peers[1]",
        ),
        (
            "an IPv4 prefix longer than 32",
            with_ttl(drop_fault(100.0, peers(&["10.0.0.0/33"], &[])), minute),
            "fault.target.peers[0]",
        ),
        (
            "a peer CIDR with host bits",
            with_ttl(reject_fault(peers(&["fd00::1/64"], &[])), minute),
            "fault.target.peers[0]",
        ),
        (
            "an exclusion that is no CIDR",
            with_ttl(drop_fault(100.0, peers(&[], &["::1/200"])), minute),
            "fault.target.exclude_peers[0]",
        ),
        (
            "exclusions that leave no peer",
            with_ttl(
                drop_fault(100.0, peers(&["10.1.0.0/16"], &["10.0.0.0/8"])),
                minute,
            ),
            "fault.target.exclude_peers",
        ),
        (
            "a delay whose exclusions leave no peer",
            with_ttl(
                delay_fault(
                    Duration::from_millis(100),
                    Duration::ZERO,
                    0.0,
                    Mechanism::Unspecified,
                    peers(&["10.1.0.0/16"], &["10.0.0.0/8"]),
                ),
                minute,
            ),
            "fault.target.exclude_peers",
        ),
        (
            "a bandwidth fault with a peer that is no CIDR",
            with_ttl(
                bandwidth_fault(1 << 20, 0, peers(&["10.0.0.0/8", "::1/129"], &[])),
                minute,
            ),
            "fault.target.peers[1]",
        ),
        (
            "percent 101",
            with_ttl(drop_fault(101.0, good()), minute),
            "percent",
        ),
        (
            "percent -1",
            with_ttl(drop_fault(-1.0, good()), minute),
            "percent",
        ),
        (
            "no ports",
            with_ttl(drop_fault(100.0, no_ports), minute),
            "ports",
        ),
        (
            "no scope",
            with_ttl(drop_fault(100.0, no_scope), minute),
            "scope",
        ),
        (
            "unknown cgroup path",
            with_ttl(drop_fault(100.0, unknown_cgroup), minute),
            "cgroup",
        ),
        (
            "reject on UDP",
            with_ttl(
                reject_fault(cgroup_target(
                    &cgroup,
                    &[6379],
                    Protocol::Udp,
                    Direction::Egress,
                )),
                minute,
            ),
            "fault.target.protocol",
        ),
        (
            "reset of ingress connections",
            with_ttl(
                reset_fault(
                    cgroup_target(&cgroup, &[6379], Protocol::Tcp, Direction::Ingress),
                    None,
                ),
                minute,
            ),
            "fault.target.direction",
        ),
        (
            "reset after some bytes on an interface in a network namespace",
            with_ttl(reset_fault(interface.clone(), Some(100)), minute),
            "fault.target.netns",
        ),
        (
            "reject of UDP on an interface in a network namespace",
            with_ttl(
                reject_fault(faultd_proto::v1::Target {
                    protocol: Protocol::Udp.into(),
                    ..interface.clone()
                }),
                minute,
            ),
            "fault.target.protocol",
        ),
        (
            "stall of UDP (it holds TCP data)",
            with_ttl(
                stall_fault(
                    cgroup_target(&cgroup, &[6379], Protocol::Udp, Direction::Egress),
                    None,
                ),
                minute,
            ),
            "fault.target.protocol",
        ),
        (
            "slow_connect of 0 s",
            with_ttl(slow_fault(true, Duration::ZERO, good()), minute),
            "fault.slow_connect.latency",
        ),
        (
            "slow_close over the longest delay",
            with_ttl(slow_fault(false, Duration::from_secs(61), good()), minute),
            "fault.slow_close.latency",
        ),
        (
            "slow_connect of UDP",
            with_ttl(
                slow_fault(
                    true,
                    Duration::from_millis(300),
                    cgroup_target(&cgroup, &[6379], Protocol::Udp, Direction::Egress),
                ),
                minute,
            ),
            "fault.target.protocol",
        ),
        (
            "duplicate of 150%",
            with_ttl(
                tamper_fault("duplicate", 150.0, Duration::ZERO, good()),
                minute,
            ),
            "fault.duplicate.percent",
        ),
        (
            "corrupt of NaN %",
            with_ttl(
                tamper_fault("corrupt", f64::NAN, Duration::ZERO, good()),
                minute,
            ),
            "fault.corrupt.percent",
        ),
        (
            "reorder with a gap over the longest delay",
            with_ttl(
                tamper_fault("reorder", 25.0, Duration::from_secs(61), good()),
                minute,
            ),
            "fault.reorder.gap",
        ),
        (
            "slice of 0 bytes",
            with_ttl(slice_fault(0, Duration::ZERO, good()), minute),
            "fault.slice.max_bytes",
        ),
        (
            "slice with 1 s between pieces",
            with_ttl(slice_fault(16, Duration::from_secs(1), good()), minute),
            "fault.slice.delay",
        ),
        (
            "stall closing after 0 s",
            with_ttl(stall_fault(good(), Some(Duration::ZERO)), minute),
            "fault.stall.close_after",
        ),
        (
            "stall closing connections on an interface in a network namespace",
            with_ttl(stall_fault(interface, Some(Duration::from_secs(1))), minute),
            "fault.stall.close_after",
        ),
        (
            "reset after 0 bytes",
            with_ttl(reset_fault(good(), Some(0)), minute),
            "fault.reset.after_bytes",
        ),
        (
            "ttl 0",
            with_ttl(drop_fault(100.0, good()), Duration::ZERO),
            "ttl",
        ),
        (
            "ttl 2h above --max-ttl 1h",
            with_ttl(drop_fault(100.0, good()), Duration::from_secs(7200)),
            "ttl",
        ),
        (
            "unknown lease_id",
            under_lease(drop_fault(100.0, good()), &format!("unknown-{}", uniq())),
            "lease_id",
        ),
    ];

    let faults_before = list_faults(&mut faults).await;
    let leases_before = list_leases(&mut leases).await;
    let mut wrong = Vec::new();
    for (case, request, field) in cases {
        match faults.inject(request.clone()).await {
            Ok(answer) => wrong.push(format!(
                "{case}: Inject was accepted: {:?}",
                answer.into_inner()
            )),
            Err(status) => {
                if status.code() != Code::InvalidArgument || !status.message().contains(field) {
                    wrong.push(format!(
                        "{case}: expected INVALID_ARGUMENT naming `{field}`, got {:?}: {:?}",
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
        let faults_now = list_faults(&mut faults).await;
        let leases_now = list_leases(&mut leases).await;
        if faults_now != faults_before || leases_now.len() != leases_before.len() {
            wrong.push(format!("{case}: the failed request changed state: faults {faults_now:?}, leases {leases_now:?}"));
        }
    }

    let fault_id = format!("unknown-{}", uniq());
    let lease_id = format!("unknown-{}", uniq());
    let not_found: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "Get unknown fault",
            faults
                .get(GetFaultRequest {
                    id: fault_id.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "Remove unknown fault",
            faults
                .remove(RemoveRequest {
                    id: fault_id.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "Renew unknown lease",
            leases
                .renew(RenewRequest {
                    lease_id: lease_id.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "Revoke unknown lease",
            leases
                .revoke(RevokeRequest {
                    lease_id: lease_id.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "TimeToLive unknown lease",
            leases
                .time_to_live(TimeToLiveRequest {
                    lease_id: lease_id.clone(),
                })
                .await
                .map(drop),
        ),
    ];
    for (case, result) in not_found {
        match result {
            Ok(()) => wrong.push(format!("{case}: succeeded")),
            Err(status) if status.code() != Code::NotFound => wrong.push(format!(
                "{case}: expected NOT_FOUND, got {:?}: {:?}",
                status.code(),
                status.message()
            )),
            Err(_) => {}
        }
    }
    let faults_now = list_faults(&mut faults).await;
    let leases_now = list_leases(&mut leases).await;
    if faults_now != faults_before || leases_now.len() != leases_before.len() {
        wrong.push(format!(
            "NOT_FOUND calls changed state: faults {faults_now:?}, leases {leases_now:?}"
        ));
    }
    assert!(
        wrong.is_empty(),
        "faultd mishandled bad requests:\n  {}",
        wrong.join("\n  ")
    );

    // The same request with every field right is accepted: the rejections were about the field.
    let accepted = faults
        .inject(with_ttl(drop_fault(100.0, good()), minute))
        .await;
    assert!(
        accepted.is_ok(),
        "the valid control request was rejected: {accepted:?}"
    );
}

/// A RemoveRequest whose `id` (field 1, a string) can carry any bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRemoveRequest {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
}

/// The longest error message a user should read.
const SHORT: usize = 512;

/// How a call ended, and how long it took.
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> (Result<(), tonic::Status>, Duration) {
    let started = Instant::now();
    let result = call.await.map(drop);
    (result, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn oversized_and_undecodable_requests_are_refused_at_once_with_short_messages() {
    let cgroup = Cgroup::new();
    let dir = faultd_tests::TempDir::new("faultd-test-oversized");
    let audit = dir.join("audit.jsonl");
    let faultd = Faultd::start_with(FaultdOptions {
        extra_args: vec!["--audit-log".into(), audit.display().to_string()],
        ..Default::default()
    })
    .await;
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();
    let good = || cgroup_target(&cgroup, &[6379], Protocol::Tcp, Direction::Egress);
    let minute = Duration::from_secs(60);
    let faults_before = list_faults(&mut faults).await;
    let leases_before = list_leases(&mut leases).await;

    // 40 000 peers: refused before any per-peer work.
    let mut many_peers = good();
    many_peers.peers = (0..40_000u32)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let mut labelled = drop_fault(100.0, good());
    labelled
        .labels
        .insert("experiment".into(), "x".repeat(3 << 20));
    let mut bad_nanos = with_ttl(drop_fault(100.0, good()), minute);
    bad_nanos.lease = Some(faultd_proto::v1::inject_request::Lease::Ttl(
        prost_types::Duration {
            seconds: 1,
            nanos: 2_000_000_000,
        },
    ));
    let mut grpc = tonic::client::Grpc::new(faultd.channel());
    grpc.ready().await.expect("channel ready");
    let not_utf8 = grpc.unary::<_, Fault, _>(
        tonic::Request::new(RawRemoveRequest {
            id: vec![0xc3, 0x28],
        }),
        tonic::codegen::http::uri::PathAndQuery::from_static("/faultd.v1.FaultService/Remove"),
        faultd_proto::codec::ProstCodec::<RawRemoveRequest, Fault>::default(),
    );

    let resource_exhausted = Code::ResourceExhausted;
    let cases = vec![
        (
            "40 000 peers",
            timed(faults.inject(with_ttl(drop_fault(100.0, many_peers), minute))).await,
            resource_exhausted,
            "fault.target.peers",
        ),
        (
            "a 3 MB label",
            timed(faults.inject(with_ttl(labelled, minute))).await,
            resource_exhausted,
            "fault.labels",
        ),
        (
            "100 000 lease labels",
            timed(
                leases.grant(GrantRequest {
                    ttl: Some(faultd::api::convert::duration_to_proto(minute)),
                    labels: (0..100_000)
                        .map(|i| (i.to_string(), String::new()))
                        .collect(),
                }),
            )
            .await,
            resource_exhausted,
            "labels",
        ),
        (
            "Remove with a 3 MB id",
            timed(faults.remove(RemoveRequest {
                id: "f".repeat(3 << 20),
            }))
            .await,
            resource_exhausted,
            "id",
        ),
        (
            "Renew with a 3 MB lease id",
            timed(leases.renew(RenewRequest {
                lease_id: "l".repeat(3 << 20),
            }))
            .await,
            resource_exhausted,
            "lease_id",
        ),
        (
            "ttl nanos 2e9",
            timed(faults.inject(bad_nanos)).await,
            Code::InvalidArgument,
            "ttl: nanos out of range",
        ),
        (
            "an id that is not UTF-8",
            timed(not_utf8).await,
            Code::InvalidArgument,
            "RemoveRequest.id",
        ),
    ];
    let mut wrong = Vec::new();
    for (case, (result, took), code, field) in cases {
        eprintln!("{case}: answered in {took:?}");
        // Peers are checked before any per-peer work: 40 000 take what their transfer takes.
        // 100 000 labels cost prost and the test's debug-built client a few hundred ms to
        // encode and decode on a busy machine, before faultd can look at them.
        let bound = match case {
            "100 000 lease labels" => Duration::from_secs(3),
            _ => Duration::from_secs(1),
        };
        if took > bound {
            wrong.push(format!("{case}: took {took:?}"));
        }
        match result {
            Ok(()) => wrong.push(format!("{case}: accepted")),
            Err(status) => {
                let message = status.message();
                if status.code() != code || !message.contains(field) || message.len() > SHORT {
                    wrong.push(format!(
                        "{case}: expected {code:?} naming `{field}` in at most {SHORT} bytes, got \
                         {:?}: {} bytes: {:?}",
                        status.code(),
                        message.len(),
                        message.chars().take(200).collect::<String>()
                    ));
                }
            }
        }
    }

    let faults_now = list_faults(&mut faults).await;
    let leases_now = list_leases(&mut leases).await;
    if faults_now != faults_before || leases_now.len() != leases_before.len() {
        wrong.push(format!(
            "the refused requests changed state: faults {faults_now:?}, leases {}",
            leases_now.len()
        ));
    }
    // The audit log records each refusal in a line of kilobytes, not megabytes.
    let log = std::fs::read_to_string(&audit).expect("the audit log exists");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    if longest > 16 * 1024 {
        wrong.push(format!("an audit line of {longest} bytes"));
    }
    assert!(
        wrong.is_empty(),
        "faultd mishandled oversized requests:\n  {}",
        wrong.join("\n  ")
    );
}
