//! Building faultd.v1 requests and reading answers.

use std::time::Duration;

use faultd_proto::v1::fault::Action;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::inject_request::Lease as InjectLease;
use faultd_proto::v1::lease_service_client::LeaseServiceClient;
use faultd_proto::v1::target::Scope;
use faultd_proto::v1::{
    Bandwidth, CgroupScope, Delay, Direction, Drop, Fault, GetFaultRequest, GrantRequest,
    InjectRequest, Lease, ListFaultsRequest, ListLeasesRequest, Mechanism, PortRange, Protocol,
    Reject, RemoveRequest, Reset, SlowClose, SlowConnect, Stall, Target,
};
use faultd_proto::v1::{Corrupt, Counters, Duplicate, Reorder, Slice};
use tonic::transport::Channel;

use crate::cgroup::Cgroup;

/// A target: the cgroup, these single ports, protocol and direction.
pub fn cgroup_target(
    cgroup: &Cgroup,
    ports: &[u16],
    protocol: Protocol,
    direction: Direction,
) -> Target {
    Target {
        scope: Some(Scope::Cgroup(CgroupScope {
            path: cgroup.path().to_owned(),
        })),
        ports: ports
            .iter()
            .map(|&p| PortRange {
                first: p.into(),
                last: None,
            })
            .collect(),
        protocol: protocol.into(),
        direction: direction.into(),
        ..Default::default()
    }
}

/// `target` limited to the remote addresses `peers` (CIDRs or addresses; none: any), except
/// `exclude`.
pub fn with_peers(mut target: Target, peers: &[&str], exclude: &[&str]) -> Target {
    target.peers = peers.iter().map(|p| p.to_string()).collect();
    target.exclude_peers = exclude.iter().map(|p| p.to_string()).collect();
    target
}

/// A drop fault of `percent` on `target`.
pub fn drop_fault(percent: f64, target: Target) -> Fault {
    Fault {
        action: Some(Action::Drop(Drop { percent })),
        target: Some(target),
        ..Default::default()
    }
}

/// A reject fault on `target`: new TCP connects are refused.
pub fn reject_fault(target: Target) -> Fault {
    Fault {
        action: Some(Action::Reject(Reject {})),
        target: Some(target),
        ..Default::default()
    }
}

/// A reset fault on `target`: established connections are torn down, new ones refused (or,
/// with `after_bytes`, each connection is torn down once it carried that many bytes).
pub fn reset_fault(target: Target, after_bytes: Option<u64>) -> Fault {
    Fault {
        action: Some(Action::Reset(Reset { after_bytes })),
        target: Some(target),
        ..Default::default()
    }
}

/// A stall fault on `target`: connections stay up, no data flows; with `close_after`, each
/// connection is then torn down.
pub fn stall_fault(target: Target, close_after: Option<Duration>) -> Fault {
    Fault {
        action: Some(Action::Stall(Stall {
            close_after: close_after.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
        })),
        target: Some(target),
        ..Default::default()
    }
}

/// A slow_connect (`connect` true) or slow_close fault on `target`, holding SYNs or FINs for
/// `latency`.
pub fn slow_fault(connect: bool, latency: Duration, target: Target) -> Fault {
    let latency = Some(prost_types::Duration {
        seconds: latency.as_secs() as i64,
        nanos: latency.subsec_nanos() as i32,
    });
    let action = match connect {
        true => Action::SlowConnect(SlowConnect { latency }),
        false => Action::SlowClose(SlowClose { latency }),
    };
    Fault {
        action: Some(action),
        target: Some(target),
        ..Default::default()
    }
}

/// A duplicate, corrupt or reorder fault (`name`) of `percent` on `target`; a reorder holds
/// packets back by `gap`.
pub fn tamper_fault(name: &str, percent: f64, gap: Duration, target: Target) -> Fault {
    let action = match name {
        "duplicate" => Action::Duplicate(Duplicate {
            percent,
            ..Default::default()
        }),
        "corrupt" => Action::Corrupt(Corrupt {
            percent,
            ..Default::default()
        }),
        "reorder" => Action::Reorder(Reorder {
            percent,
            gap: Some(prost_types::Duration {
                seconds: gap.as_secs() as i64,
                nanos: gap.subsec_nanos() as i32,
            }),
            ..Default::default()
        }),
        other => panic!("no tamper fault {other:?}"),
    };
    Fault {
        action: Some(action),
        target: Some(target),
        ..Default::default()
    }
}

/// A slice fault on `target`: TCP data cut into pieces of at most `max_bytes`, `delay` apart.
pub fn slice_fault(max_bytes: u32, delay: Duration, target: Target) -> Fault {
    let delay = Some(prost_types::Duration {
        seconds: delay.as_secs() as i64,
        nanos: delay.subsec_nanos() as i32,
    });
    Fault {
        action: Some(Action::Slice(Slice { max_bytes, delay })),
        target: Some(target),
        ..Default::default()
    }
}

/// A delay fault: `latency` plus normal jitter of standard deviation `jitter`.
pub fn delay_fault(
    latency: Duration,
    jitter: Duration,
    correlation: f64,
    mechanism: Mechanism,
    target: Target,
) -> Fault {
    Fault {
        action: Some(Action::Delay(Delay {
            latency: Some(faultd::api::convert::duration_to_proto(latency)),
            jitter: Some(faultd::api::convert::duration_to_proto(jitter)),
            correlation,
            mechanism: mechanism.into(),
        })),
        target: Some(target),
        ..Default::default()
    }
}

/// A bandwidth fault of `rate` bytes per second (burst 0: faultd's default).
pub fn bandwidth_fault(rate: u64, burst: u64, target: Target) -> Fault {
    Fault {
        action: Some(Action::Bandwidth(Bandwidth {
            rate_bytes_per_sec: rate,
            burst,
            mechanism: Mechanism::Unspecified.into(),
        })),
        target: Some(target),
        ..Default::default()
    }
}

/// Grants a lease of `ttl`; panics with the status if faultd refuses.
pub async fn grant(client: &mut LeaseServiceClient<Channel>, ttl: Duration) -> Lease {
    client
        .grant(GrantRequest {
            ttl: Some(faultd::api::convert::duration_to_proto(ttl)),
            labels: Default::default(),
        })
        .await
        .unwrap_or_else(|s| panic!("Grant ttl {ttl:?} failed: {s:?}"))
        .into_inner()
}

/// Inject under a private lease of `ttl`.
pub fn with_ttl(fault: Fault, ttl: Duration) -> InjectRequest {
    InjectRequest {
        lease: Some(InjectLease::Ttl(faultd::api::convert::duration_to_proto(
            ttl,
        ))),
        fault: Some(fault),
        dry_run: false,
    }
}

/// Inject under an existing lease.
pub fn under_lease(fault: Fault, lease_id: &str) -> InjectRequest {
    InjectRequest {
        lease: Some(InjectLease::LeaseId(lease_id.to_owned())),
        fault: Some(fault),
        dry_run: false,
    }
}

/// A protobuf timestamp as Unix nanoseconds.
pub fn unix_ns(ts: &prost_types::Timestamp) -> i128 {
    ts.seconds as i128 * 1_000_000_000 + ts.nanos as i128
}

/// The `expires_at` of a lease as Unix nanoseconds; panics if it has none.
pub fn lease_deadline(lease: &Lease) -> i128 {
    unix_ns(
        lease
            .expires_at
            .as_ref()
            .unwrap_or_else(|| panic!("lease {} has no expires_at: {lease:?}", lease.id)),
    )
}

/// Removes a fault; panics if faultd refuses. Returns the fault as Remove answered (final
/// counters, state REVERTED).
pub async fn remove(client: &mut FaultServiceClient<Channel>, id: &str) -> Fault {
    client
        .remove(RemoveRequest { id: id.to_owned() })
        .await
        .unwrap_or_else(|s| panic!("Remove {id} failed: {s:?}"))
        .into_inner()
}

pub async fn list_faults(client: &mut FaultServiceClient<Channel>) -> Vec<Fault> {
    client
        .list(ListFaultsRequest::default())
        .await
        .unwrap_or_else(|s| panic!("FaultService.List failed: {s:?}"))
        .into_inner()
        .faults
}

pub async fn list_leases(client: &mut LeaseServiceClient<Channel>) -> Vec<Lease> {
    client
        .list(ListLeasesRequest {})
        .await
        .unwrap_or_else(|s| panic!("LeaseService.List failed: {s:?}"))
        .into_inner()
        .leases
}

pub async fn get_fault(client: &mut FaultServiceClient<Channel>, id: &str) -> Fault {
    client
        .get(GetFaultRequest { id: id.to_owned() })
        .await
        .unwrap_or_else(|s| panic!("FaultService.Get({id}) failed: {s:?}"))
        .into_inner()
}

/// Calls Get until `ready` holds for the fault's (matched, dropped) counters, for up to 2 s
/// (counters may be read from the kernel a moment later than the packets passed). Returns the
/// last answer.
pub async fn get_fault_until(
    client: &mut FaultServiceClient<Channel>,
    id: &str,
    ready: impl Fn(u64, u64) -> bool,
) -> Fault {
    get_counters_until(client, id, |c| ready(c.matched, c.dropped)).await
}

/// Calls Get until `ready` holds for the fault's counters (all zero when it carries none), for
/// up to 2 s: a connection torn down by a watcher is counted a moment after its client saw the
/// error. Returns the last answer.
pub async fn get_counters_until(
    client: &mut FaultServiceClient<Channel>,
    id: &str,
    ready: impl Fn(&Counters) -> bool,
) -> Fault {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let fault = get_fault(client, id).await;
        if ready(&fault.counters.unwrap_or_default()) || tokio::time::Instant::now() >= deadline {
            return fault;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (matched, dropped); (0, 0) when the fault carries no counters.
pub fn counters(fault: &Fault) -> (u64, u64) {
    fault
        .counters
        .as_ref()
        .map(|c| (c.matched, c.dropped))
        .unwrap_or((0, 0))
}
