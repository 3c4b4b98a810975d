//! How faults end, as a user sees it: a revert that fails is shown as failing and retried
//! until the kernel is clean, never reported as done.

use std::process::Command;
use std::time::Duration;

use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::{
    Direction, Fault, FaultEvent, FaultState, Mechanism, Protocol, WatchRequest, fault_event,
};
use faultd_tests::api::{cgroup_target, delay_fault, get_fault, remove, with_ttl};
use faultd_tests::process::output;
use faultd_tests::{Cgroup, Faultd, FaultdOptions, TempDir, http};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Tests that load the machine run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every event of a Watch stream opened now, as it comes.
async fn watch(faultd: &Faultd) -> mpsc::UnboundedReceiver<FaultEvent> {
    let mut stream = faultd
        .faults()
        .watch(WatchRequest {})
        .await
        .expect("Watch")
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

/// The events received so far.
fn drain(events: &mut mpsc::UnboundedReceiver<FaultEvent>, into: &mut Vec<FaultEvent>) {
    while let Ok(event) = events.try_recv() {
        into.push(event);
    }
}

/// Calls Get until `done` holds or `within` passes; returns the last answer.
async fn get_until(
    client: &mut FaultServiceClient<Channel>,
    id: &str,
    within: Duration,
    done: impl Fn(&Fault) -> bool,
) -> Fault {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let fault = get_fault(client, id).await;
        if done(&fault) || tokio::time::Instant::now() >= deadline {
            return fault;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The mangle table of this network namespace, as the real iptables-save shows it (IPv4 and
/// IPv6).
fn mangle() -> String {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .map(|tool| {
            let out = output(Command::new(tool).args(["-t", "mangle"]));
            assert!(out.status.success(), "{tool} failed: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

fn instance_of(faultd: &Faultd) -> String {
    let path = faultd.state_dir().join("instance");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn metric(faultd: &Faultd, series: &str) -> Option<f64> {
    let (status, body) = http::get(&faultd.metrics_addr(), "/metrics");
    assert_eq!(status, 200, "{body}");
    http::sample(&body, series)
}

/// A 1 ms NFQUEUE egress delay on `cgroup`'s `port` for 60 s.
async fn nfqueue_delay(faultd: &Faultd, cgroup: &Cgroup, port: u16) -> Fault {
    let target = cgroup_target(cgroup, &[port], Protocol::Tcp, Direction::Egress);
    let fault = delay_fault(
        Duration::from_millis(1),
        Duration::ZERO,
        0.0,
        Mechanism::Nfqueue,
        target,
    );
    faultd
        .faults()
        .inject(with_ttl(fault, Duration::from_secs(60)))
        .await
        .unwrap_or_else(|s| panic!("Inject of an NFQUEUE delay failed: {s:?}\n{}", faultd.log()))
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2, iptables and mount namespaces; `cargo xtask test` runs it as root"]
async fn a_revert_that_fails_shows_as_failing_and_is_retried_until_the_rules_are_gone() {
    let _serial = SERIAL.lock().await;
    let faultd = Faultd::start_with(FaultdOptions {
        private_mounts: true,
        ..FaultdOptions::with_metrics()
    })
    .await;
    let cgroup = Cgroup::new();
    let instance = instance_of(&faultd);
    let fault = nfqueue_delay(&faultd, &cgroup, 46_379).await;
    let tag = format!("faultd:{}", fault.id);
    assert!(
        mangle().contains(&tag),
        "the fault's rules are in:\n{}",
        mangle()
    );

    // iptables fails for faultd alone: in its mount namespace the xtables binary is a script
    // that says so and exits 4.
    let dir = TempDir::new("faultd-test-broken-iptables");
    let script = dir.join("xtables");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'iptables is broken for this test' >&2\nexit 4\n",
    )
    .expect("writing the script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let xtables = std::fs::canonicalize("/usr/sbin/iptables-restore").expect("iptables-restore");
    let mut events = watch(&faultd).await;
    let mut broken = faultd.bind_mount(&script, &xtables);

    let mut client = faultd.faults();
    let removed = remove(&mut client, &fault.id).await;
    assert_eq!(
        removed.end_reason,
        faultd_proto::v1::RevertReason::Removed as i32
    );
    let failing = get_until(&mut client, &fault.id, Duration::from_secs(2), |f| {
        f.state() == FaultState::RevertFailing
    })
    .await;
    assert_eq!(
        failing.state(),
        FaultState::RevertFailing,
        "the failed revert is shown: {failing:?}\n{}",
        faultd.log()
    );
    assert!(
        failing
            .revert_error
            .contains("iptables is broken for this test"),
        "the error says why: {:?}",
        failing.revert_error
    );
    assert!(failing.revert_attempts >= 1, "{failing:?}");
    let listed = faultd_tests::api::list_faults(&mut client).await;
    assert!(
        listed
            .iter()
            .any(|f| f.id == fault.id && f.state() == FaultState::RevertFailing),
        "List shows it with the faults in force: {listed:?}"
    );
    assert_eq!(metric(&faultd, "faultd_reverts_failing"), Some(1.0));
    assert!(
        mangle().contains(&tag),
        "the rules are still in while it fails"
    );

    // A few retries fail (200 ms, 400 ms, 800 ms apart), then iptables works again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = get_fault(&mut client, &fault.id).await;
    assert_eq!(still.state(), FaultState::RevertFailing, "{still:?}");
    assert!(still.revert_attempts >= 2, "it was retried: {still:?}");
    broken.undo();

    // The next retry is at most 5 s away.
    let reverted = get_until(&mut client, &fault.id, Duration::from_secs(8), |f| {
        f.state() == FaultState::Reverted
    })
    .await;
    assert_eq!(
        reverted.state(),
        FaultState::Reverted,
        "{reverted:?}\n{}",
        faultd.log()
    );
    assert!(reverted.revert_error.is_empty(), "{reverted:?}");
    let table = mangle();
    assert!(
        !table.contains(&tag),
        "the fault's rules are gone:\n{table}"
    );
    assert!(
        !table.contains(&format!("FAULTD-{instance}")),
        "the agent's chains are gone:\n{table}"
    );
    assert_eq!(metric(&faultd, "faultd_reverts_failing"), Some(0.0));
    let failures = metric(&faultd, "faultd_revert_failures_total").unwrap_or(0.0);
    assert!(failures >= 2.0, "failed attempts counted: {failures}");

    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen = Vec::new();
    drain(&mut events, &mut seen);
    let kinds: Vec<&str> = seen
        .iter()
        .filter(|e| e.fault.as_ref().is_some_and(|f| f.id == fault.id))
        .map(|e| match &e.kind {
            Some(fault_event::Kind::Failed(_)) => "failed",
            Some(fault_event::Kind::Reverted(_)) => "reverted",
            Some(fault_event::Kind::Applied(_)) => "applied",
            None => "none",
        })
        .collect();
    assert!(kinds.len() >= 3, "{kinds:?}");
    assert!(
        kinds[..kinds.len() - 1].iter().all(|k| *k == "failed"),
        "failures first, each attempt: {kinds:?}"
    );
    assert_eq!(
        kinds.last(),
        Some(&"reverted"),
        "reverted once, at the end: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn abort_answers_once_the_nfqueue_rules_are_gone() {
    const FAULTS: u16 = 30;
    let _serial = SERIAL.lock().await;
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let instance = instance_of(&faultd);
    let mut ids = Vec::new();
    for port in 0..FAULTS {
        ids.push(nfqueue_delay(&faultd, &cgroup, 46_400 + port).await.id);
    }
    let before = mangle();
    assert!(
        ids.iter()
            .all(|id| before.contains(&format!("faultd:{id}"))),
        "every fault's rules are in:\n{before}"
    );

    let started = std::time::Instant::now();
    let aborted = faultd
        .faults()
        .abort(faultd_proto::v1::AbortRequest {})
        .await
        .expect("Abort")
        .into_inner();
    let took = started.elapsed();
    // Read at once: nothing of the faults may be left when Abort has answered.
    let after = mangle();
    eprintln!("Abort of {FAULTS} NFQUEUE delays answered in {took:?}");
    assert_eq!(aborted.reverted_fault_ids.len(), usize::from(FAULTS));
    assert!(
        aborted.still_reverting_fault_ids.is_empty(),
        "{aborted:?}\n{}",
        faultd.log()
    );
    let left: Vec<_> = ids
        .iter()
        .filter(|id| after.contains(&format!("faultd:{id}")))
        .collect();
    assert!(
        left.is_empty() && !after.contains(&format!("FAULTD-{instance}")),
        "rules of {} faults or the agent's chains left after Abort answered:\n{after}",
        left.len()
    );
    let mut client = faultd.faults();
    for id in &ids {
        let fault = get_fault(&mut client, id).await;
        assert_eq!(fault.state(), FaultState::Reverted, "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn a_fault_whose_cgroup_is_deleted_ends_as_target_gone_with_its_event() {
    let _serial = SERIAL.lock().await;
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let target = cgroup_target(&cgroup, &[46_500], Protocol::Tcp, Direction::Egress);
    let dropping = faultd
        .faults()
        .inject(with_ttl(
            faultd_tests::api::drop_fault(100.0, target),
            Duration::from_secs(60),
        ))
        .await
        .expect("Inject drop")
        .into_inner();
    let delaying = nfqueue_delay(&faultd, &cgroup, 46_501).await;
    let ids = [dropping.id.clone(), delaying.id.clone()];
    assert!(!faultd_tests::bpf::map_entries(faultd.pid(), "FAULTD_RULES").is_empty());
    assert!(mangle().contains(&format!("faultd:{}", delaying.id)));
    let mut events = watch(&faultd).await;

    let path = cgroup.path().to_owned();
    drop(cgroup); // rmdir
    let deleted = std::time::Instant::now();
    let mut client = faultd.faults();
    for id in &ids {
        let fault = get_until(&mut client, id, Duration::from_secs(2), |f| {
            f.state() == FaultState::Reverted
        })
        .await;
        assert_eq!(
            fault.state(),
            FaultState::Reverted,
            "ended within 2 s of the rmdir: {fault:?}\n{}",
            faultd.log()
        );
        assert_eq!(
            fault.end_reason(),
            faultd_proto::v1::RevertReason::TargetGone,
            "{fault:?}"
        );
        assert!(
            fault.end_detail.contains(&path) && fault.end_detail.contains("deleted"),
            "the detail names the cgroup: {:?}",
            fault.end_detail
        );
    }
    eprintln!("both faults ended {:?} after the rmdir", deleted.elapsed());
    assert!(
        faultd_tests::bpf::map_entries(faultd.pid(), "FAULTD_RULES").is_empty(),
        "the drop's kernel entries are gone"
    );
    // Get answers REVERTED once the delay stopped; its rules go in the background, and its
    // Reverted event (checked below) comes when they are out.
    let rules_gone = faultd_tests::process::poll(Duration::from_secs(3), || {
        (!mangle().contains(&format!("faultd:{}", delaying.id))).then_some(())
    });
    assert!(
        rules_gone.is_some(),
        "the delay's rules are still in the mangle table 3 s after it ended:\n{}",
        mangle()
    );
    assert!(
        faultd_tests::api::list_leases(&mut faultd.leases())
            .await
            .is_empty(),
        "their private leases went with them"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen = Vec::new();
    drain(&mut events, &mut seen);
    for id in &ids {
        let reasons: Vec<i32> = seen
            .iter()
            .filter(|e| e.fault.as_ref().is_some_and(|f| &f.id == id))
            .filter_map(|e| match &e.kind {
                Some(fault_event::Kind::Reverted(r)) => Some(r.reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            vec![faultd_proto::v1::RevertReason::TargetGone as i32],
            "one Reverted event, TARGET_GONE, for {id}: {seen:?}"
        );
    }
}
