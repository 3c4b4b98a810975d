//! Pods and containers: faultd finds a pod's cgroup by uid in a kubelet-like tree (systemd and
//! cgroupfs drivers, every QoS class) and a container's by id; a fault on a pod hits all its
//! containers, including one restarted into a new scope after the fault was injected, and no
//! sibling pod.

use std::time::Duration;

use faultd_proto::v1::target::Scope;
use faultd_proto::v1::{ContainerScope, Direction, PodScope, Protocol, RemoveRequest, Target};
use faultd_tests::api::{drop_fault, with_ttl};
use faultd_tests::clients::ConnClient;
use faultd_tests::kube::{Driver, KubeTree, Pod, Qos, Runtime};
use faultd_tests::process::unix_ns;
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::{Faultd, FaultdOptions, NetNs, Redis, Workload, fd_probe};
use tonic::Code;

const TTL: Duration = Duration::from_secs(60);

fn target(scope: Scope) -> Target {
    Target {
        scope: Some(scope),
        ports: vec![faultd_proto::v1::PortRange {
            first: REDIS_PORT.into(),
            last: None,
        }],
        protocol: Protocol::Tcp.into(),
        direction: Direction::Egress.into(),
        ..Default::default()
    }
}

fn pod_scope(pod: &Pod) -> Scope {
    Scope::Pod(PodScope {
        uid: pod.uid.clone(),
    })
}

async fn faultd_for(tree: &KubeTree) -> Faultd {
    Faultd::start_with(FaultdOptions {
        extra_args: vec!["--cgroup-root".into(), tree.root().display().to_string()],
        ..Default::default()
    })
    .await
}

/// A container's Redis client loop (PING every 100 ms on one redis-py client), started in
/// `workload`'s cgroup directory.
fn client_loop(workload: &Workload) -> ConnClient {
    ConnClient::start(
        workload,
        "redis-loop",
        &["127.0.0.1", &REDIS_PORT.to_string(), "100"],
    )
}

/// One driver: a pod of two containers (and a sibling pod), each running a Redis client loop;
/// a drop by pod uid; a container killed and restarted into a new scope; Remove.
async fn pod_fault_covers_every_container(driver: Driver, qos: Qos, sibling_qos: Qos) {
    let netns = NetNs::new();
    let _redis = Redis::start(&netns);
    let mut tree = KubeTree::new();
    let pod = tree.pod(driver, qos);
    let sibling = tree.pod(driver, sibling_qos);
    let (_, first_dir) = tree.container(&pod, Runtime::Containerd);
    let (_, second_dir) = tree.container(&pod, Runtime::Crio);
    let (_, sibling_dir) = tree.container(&sibling, Runtime::Docker);
    let faultd = faultd_for(&tree).await;
    let mut faults = faultd.faults();
    let in_dir = |dir: &std::path::Path, label: &str| {
        Workload::in_cgroup_dir(fd_probe!(), dir, &netns, label)
    };
    let first = in_dir(&first_dir, "first container");
    let second = in_dir(&second_dir, "second container");
    let neighbour = in_dir(&sibling_dir, "sibling pod's container");
    let mut loops: Vec<(ConnClient, &Workload)> = [&first, &second, &neighbour]
        .into_iter()
        .map(|w| (client_loop(w), w))
        .collect();
    for (client, workload) in &mut loops {
        let what = format!("{driver:?}: before any fault, the {}", workload.label());
        client.sees("pong", 0, &what);
    }

    let injected = unix_ns();
    let fault = faults
        .inject(with_ttl(drop_fault(100.0, target(pod_scope(&pod))), TTL))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "{driver:?}: Inject of a drop on pod {} failed: {s:?}",
                pod.uid
            )
        })
        .into_inner();
    let resolved = fault.resolved.clone().unwrap_or_default();
    assert_eq!(
        std::path::Path::new(&tree.root().display().to_string())
            .join(resolved.cgroup_path.trim_start_matches('/')),
        pod.dir,
        "{driver:?}: faultd resolved pod {} elsewhere: {fault:?}",
        pod.uid
    );
    // The running loops of both containers time out on the connections they already hold.
    for (client, workload) in loops.iter_mut().take(2) {
        let what = format!(
            "{driver:?}: a drop on the pod should black-hole Redis for its {}",
            workload.label()
        );
        let error = client.sees("error", injected, &what);
        assert!(
            error["type"].as_str().unwrap_or("").contains("Timeout"),
            "{what}: {error}"
        );
    }
    let (neighbour_loop, _) = &mut loops[2];
    let events = neighbour_loop.events_after(injected, Duration::from_secs(2));
    assert!(
        events.len() >= 5 && events.iter().all(|e| e["event"] == "pong"),
        "{driver:?}: the sibling pod is not targeted and its loop should keep getting PONG: \
         {events:?}"
    );

    // The first container exits; the runtime starts it again in a new scope of the same pod.
    drop(loops.remove(0));
    tree.remove_container(&first_dir);
    let (_, restarted_dir) = tree.container(&pod, Runtime::Containerd);
    let restarted = in_dir(&restarted_dir, "restarted container");
    let started = unix_ns();
    let mut restarted_loop = client_loop(&restarted);
    let what = format!(
        "{driver:?}: a container restarted after the fault is in the pod and should be hit"
    );
    let error = restarted_loop.sees("error", started, &what);
    assert!(
        restarted_loop.seen().iter().all(|e| e["event"] != "pong"),
        "{what}: {error}"
    );

    faults
        .remove(RemoveRequest {
            id: fault.id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("{driver:?}: Remove {} failed: {s:?}", fault.id));
    let removed = unix_ns();
    loops.push((restarted_loop, &restarted));
    for (client, workload) in &mut loops {
        let what = format!(
            "{driver:?}: after Remove the {} should get PONG again",
            workload.label()
        );
        client.sees("pong", removed, &what);
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_pod_fault_hits_every_container_of_the_pod_under_the_systemd_driver() {
    pod_fault_covers_every_container(Driver::Systemd, Qos::Burstable, Qos::BestEffort).await;
    pod_fault_covers_every_container(Driver::Systemd, Qos::Guaranteed, Qos::Burstable).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_pod_fault_hits_every_container_of_the_pod_under_the_cgroupfs_driver() {
    pod_fault_covers_every_container(Driver::Cgroupfs, Qos::BestEffort, Qos::Guaranteed).await;
    pod_fault_covers_every_container(Driver::Cgroupfs, Qos::Guaranteed, Qos::Burstable).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_container_fault_hits_only_that_container_and_unknown_ids_are_not_found() {
    let netns = NetNs::new();
    let _redis = Redis::start(&netns);
    let mut tree = KubeTree::new();
    let pod = tree.pod(Driver::Systemd, Qos::Burstable);
    let (target_id, target_dir) = tree.container(&pod, Runtime::Containerd);
    let (_, other_dir) = tree.container(&pod, Runtime::Containerd);
    let cgroupfs_pod = tree.pod(Driver::Cgroupfs, Qos::Burstable);
    let (bare_id, bare_dir) = tree.container(&cgroupfs_pod, Runtime::Containerd);
    let faultd = faultd_for(&tree).await;
    let mut faults = faultd.faults();
    let targeted = Workload::in_cgroup_dir(fd_probe!(), &target_dir, &netns, "targeted");
    let other = Workload::in_cgroup_dir(fd_probe!(), &other_dir, &netns, "other");
    let bare = Workload::in_cgroup_dir(fd_probe!(), &bare_dir, &netns, "cgroupfs container");

    let fault = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                target(Scope::Container(ContainerScope {
                    id: target_id.clone(),
                })),
            ),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop on container {target_id} failed: {s:?}"))
        .into_inner();
    let run = targeted.redis_ping();
    assert!(
        run.timed_out(),
        "the targeted container should be black-holed: {run}"
    );
    let run = other.redis_ping();
    assert!(
        run.answered(),
        "another container of the same pod is not targeted and should get PONG: {run}"
    );
    faults
        .remove(RemoveRequest { id: fault.id })
        .await
        .expect("Remove of the container fault");

    // cgroupfs driver: the container's cgroup is its bare id inside the pod's.
    let fault = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                target(Scope::Container(ContainerScope {
                    id: bare_id.clone(),
                })),
            ),
            TTL,
        ))
        .await
        .unwrap_or_else(|s| panic!("Inject of a drop on container {bare_id} failed: {s:?}"))
        .into_inner();
    let run = bare.redis_ping();
    assert!(
        run.timed_out(),
        "the cgroupfs container should be black-holed: {run}"
    );
    let run = targeted.redis_ping();
    assert!(
        run.answered(),
        "the systemd pod's container is untouched: {run}"
    );
    faults
        .remove(RemoveRequest { id: fault.id })
        .await
        .expect("Remove of the cgroupfs container fault");

    // Unknown pod uid and container id: NOT_FOUND, naming where faultd looked.
    let unknown_uid = "00000000-0000-4000-8000-000000000000";
    let status = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                target(Scope::Pod(PodScope {
                    uid: unknown_uid.into(),
                })),
            ),
            TTL,
        ))
        .await
        .expect_err("a pod this node does not run must be refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    for searched in [
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod00000000_0000",
        "kubepods/besteffort/pod00000000-0000",
        "kubepods/pod00000000-0000",
    ] {
        assert!(
            status.message().contains(searched),
            "NOT_FOUND should list {searched}: {}",
            status.message()
        );
    }
    let status = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                target(Scope::Container(ContainerScope { id: "0".repeat(64) })),
            ),
            TTL,
        ))
        .await
        .expect_err("a container this node does not run must be refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = faults
        .inject(with_ttl(
            drop_fault(
                100.0,
                target(Scope::Pod(PodScope {
                    uid: "../../etc".into(),
                })),
            ),
            TTL,
        ))
        .await
        .expect_err("a malformed uid must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("fault.target.pod.uid"),
        "{status:?}"
    );
}
