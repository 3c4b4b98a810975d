//! The gRPC API in process: a real server on a temporary unix socket, a real client, and the
//! fake dataplane standing in for the kernel. No root needed.

mod support;

use std::time::Duration;

use faultd::policy::Policy;
use faultd_proto::v1 as pb;
use support::{Server, drop_fault, inject, with_scope};
use tonic::Code;

/// A drop of `percent` on 6379 of cgroup `path` (tcp, egress) under a lease of `ttl`.
fn drop_request(ttl: &str, percent: f64, path: &str) -> pb::InjectRequest {
    let scope = pb::target::Scope::Cgroup(pb::CgroupScope { path: path.into() });
    inject(with_scope(drop_fault(percent, &[(6379, None)]), scope), ttl)
}

#[tokio::test]
async fn inject_list_remove_over_grpc() {
    let server = Server::start("crud", Policy::default()).await;
    let mut faults = server.faults().await;
    let fault = faults
        .inject(drop_request("30s", 100.0, "/app"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fault.state(), pb::FaultState::Active);
    assert_eq!(fault.resolved.as_ref().unwrap().cgroup_path, "/app");
    assert_eq!(server.fake.rules().len(), 1);

    let listed = faults
        .list(pb::ListFaultsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .faults;
    assert_eq!(listed.len(), 1);
    let removed = faults
        .remove(pb::RemoveRequest {
            id: fault.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.state(), pb::FaultState::Reverted);
    assert!(server.fake.rules().is_empty());
    let again = faults
        .remove(pb::RemoveRequest { id: fault.id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_the_field() {
    let server = Server::start("invalid", Policy::default()).await;
    let mut faults = server.faults().await;
    for (request, field) in [
        (drop_request("30s", 150.0, "/app"), "fault.drop.percent"),
        (drop_request("0s", 100.0, "/app"), "ttl"),
        (drop_request("2h", 100.0, "/app"), "ttl"),
        (
            drop_request("30s", 100.0, "/missing"),
            "fault.target.cgroup.path",
        ),
    ] {
        let status = faults.inject(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    let mut unknown_lease = drop_request("30s", 100.0, "/app");
    unknown_lease.lease = Some(pb::inject_request::Lease::LeaseId("nope".into()));
    let status = faults.inject(unknown_lease).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("lease_id"),
        "{}",
        status.message()
    );
    assert!(
        server.fake.rules().is_empty(),
        "a rejected request changed the kernel state"
    );
}

#[tokio::test]
async fn keepalive_renews_and_reports_an_unknown_lease() {
    let server = Server::start("keepalive", Policy::default()).await;
    let mut leases = server.leases().await;
    let lease = leases
        .grant(pb::GrantRequest {
            ttl: Some(faultd::api::convert::duration_to_proto(
                Duration::from_secs(5),
            )),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let requests = tokio_stream::iter(vec![
        pb::KeepAliveRequest {
            lease_id: lease.id.clone(),
        },
        pb::KeepAliveRequest {
            lease_id: "unknown".into(),
        },
    ]);
    let mut replies = leases.keep_alive(requests).await.unwrap().into_inner();
    let renewed = replies.message().await.unwrap().unwrap();
    assert_eq!(renewed.id, lease.id);
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let revoked = leases
        .revoke(pb::RevokeRequest { lease_id: lease.id })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.reverted_fault_ids.is_empty());
}

#[tokio::test]
async fn shutdown_ends_keepalive_streams() {
    let server = Server::start("shutdown", Policy::default()).await;
    let mut leases = server.leases().await;
    let lease = leases
        .grant(pb::GrantRequest {
            ttl: Some(faultd::api::convert::duration_to_proto(
                Duration::from_secs(60),
            )),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    // A client that renews once and then keeps its side open, as `faultctl --keepalive` does.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::KeepAliveRequest { lease_id: lease.id })
        .await
        .unwrap();
    let mut replies = leases
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap();
    server.stop.send(true).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(1), replies.message())
        .await
        .expect("an open KeepAlive stream must end when faultd stops, not hold it up")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    drop(tx);
}
