//! Two faultd instances on one host do not overlap: a fault another live instance holds is
//! refused naming that instance, and their ingress connection-mark ids are never the same.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use faultd_proto::v1::{Direction, Fault, Mechanism, Protocol};
use faultd_tests::api::{cgroup_target, delay_fault, drop_fault, remove, with_ttl};
use faultd_tests::process::output;
use faultd_tests::{Cgroup, Faultd};
use tonic::Code;

/// Tests that load the machine run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn instance_of(faultd: &Faultd) -> String {
    let path = faultd.state_dir().join("instance");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn delay(cgroup: &Cgroup, port: u16, direction: Direction) -> Fault {
    delay_fault(
        Duration::from_millis(1),
        Duration::ZERO,
        0.0,
        Mechanism::Nfqueue,
        cgroup_target(cgroup, &[port], Protocol::Tcp, direction),
    )
}

async fn inject(faultd: &Faultd, fault: Fault) -> Result<Fault, tonic::Status> {
    faultd
        .faults()
        .inject(with_ttl(fault, Duration::from_secs(60)))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn a_fault_another_live_instance_holds_is_refused_naming_that_instance() {
    let _serial = SERIAL.lock().await;
    let mut first = Faultd::start().await;
    let second = Faultd::start().await;
    let (first_id, second_id) = (instance_of(&first), instance_of(&second));
    assert_ne!(first_id, second_id);
    let cgroup = Cgroup::new();

    let held = inject(&first, delay(&cgroup, 46_600, Direction::Egress))
        .await
        .unwrap_or_else(|s| panic!("the first instance's delay: {s:?}\n{}", first.log()));
    let refused = inject(&second, delay(&cgroup, 46_600, Direction::Egress))
        .await
        .expect_err("the second instance must refuse the same delay");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(
        refused.message().contains(&first_id) && refused.message().contains(&held.id),
        "the refusal names the instance and its fault: {}",
        refused.message()
    );
    assert!(
        refused.message().starts_with("fault.target: delay"),
        "{}",
        refused.message()
    );
    // Both directions overlap egress too.
    let both = inject(&second, delay(&cgroup, 46_600, Direction::Both)).await;
    assert_eq!(
        both.map(|_| ()).map_err(|s| s.code()),
        Err(Code::AlreadyExists)
    );

    // What one instance may combine, two may too: a drop beside a delay; other ports are free.
    let dropping = drop_fault(
        100.0,
        cgroup_target(&cgroup, &[46_600], Protocol::Tcp, Direction::Egress),
    );
    let dropped = inject(&second, dropping)
        .await
        .unwrap_or_else(|s| panic!("a drop beside another instance's delay: {s:?}"));
    let other_port = inject(&second, delay(&cgroup, 46_601, Direction::Egress))
        .await
        .unwrap_or_else(|s| panic!("a delay on another port: {s:?}"));

    // Once the first lets go, the second may take it.
    remove(&mut first.faults(), &held.id).await;
    let taken = inject(&second, delay(&cgroup, 46_600, Direction::Egress))
        .await
        .unwrap_or_else(|s| panic!("the key is free again: {s:?}\n{}", second.log()));

    // A dead instance holds nothing.
    inject(&first, delay(&cgroup, 46_602, Direction::Egress))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    first.kill();
    let after_death = inject(&second, delay(&cgroup, 46_602, Direction::Egress))
        .await
        .unwrap_or_else(|s| panic!("a killed instance's claims count for nothing: {s:?}"));

    let mut faults = second.faults();
    for id in [dropped.id, other_port.id, taken.id, after_death.id] {
        remove(&mut faults, &id).await;
    }
}

/// The conntrack mark id (bits 24-30) each fault's rules write or match, from iptables-save.
fn mark_ids(faults: &[String]) -> BTreeMap<String, BTreeSet<u8>> {
    let out = output(Command::new("iptables-save").args(["-t", "mangle"]));
    assert!(out.status.success(), "iptables-save: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ids: BTreeMap<String, BTreeSet<u8>> = BTreeMap::new();
    for line in text.lines() {
        let Some(fault) = faults
            .iter()
            .find(|id| line.contains(&format!("faultd:{id}")))
        else {
            continue;
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            if pair[0] != "--set-xmark" && pair[0] != "--mark" {
                continue;
            }
            let value = pair[1].split('/').next().unwrap_or_default();
            let mark = u32::from_str_radix(value.trim_start_matches("0x"), 16)
                .unwrap_or_else(|e| panic!("mark {value:?} in {line:?}: {e}"));
            let id = ((mark >> 24) & 0x7f) as u8;
            if id != 0 {
                ids.entry(fault.clone()).or_default().insert(id);
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and iptables; `cargo xtask test` runs it as root"]
async fn two_instances_injecting_at_once_never_share_an_ingress_mark_id() {
    const EACH: u16 = 8;
    let _serial = SERIAL.lock().await;
    let first = Faultd::start().await;
    let second = Faultd::start().await;
    let cgroup = Cgroup::new();
    let started = std::time::Instant::now();
    let (ours, theirs) = tokio::join!(
        ingress_delays(&first, &cgroup, 46_700, EACH),
        ingress_delays(&second, &cgroup, 46_750, EACH)
    );
    eprintln!(
        "{} ingress delays injected by two instances at once in {:?}",
        2 * EACH,
        started.elapsed()
    );
    let all: Vec<String> = ours.iter().chain(&theirs).cloned().collect();
    let marks = mark_ids(&all);
    let of = |ids: &[String]| -> Vec<u8> {
        ids.iter()
            .map(|id| {
                let held = marks.get(id).cloned().unwrap_or_default();
                assert_eq!(held.len(), 1, "fault {id} uses one mark id: {marks:?}");
                *held.iter().next().unwrap_or(&0)
            })
            .collect()
    };
    let (first_marks, second_marks) = (of(&ours), of(&theirs));
    let distinct: BTreeSet<u8> = first_marks.iter().chain(&second_marks).copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "every fault has a mark id of its own: first {first_marks:?}, second {second_marks:?}"
    );
    for (faultd, ids) in [(&first, ours), (&second, theirs)] {
        let mut faults = faultd.faults();
        for id in ids {
            remove(&mut faults, &id).await;
        }
    }
}

/// `count` ingress NFQUEUE delays on `cgroup`, on the ports from `base` on; their ids.
async fn ingress_delays(faultd: &Faultd, cgroup: &Cgroup, base: u16, count: u16) -> Vec<String> {
    let mut ids = Vec::new();
    for port in base..base + count {
        let fault = inject(faultd, delay(cgroup, port, Direction::Ingress))
            .await
            .unwrap_or_else(|s| panic!("ingress delay on {port}: {s:?}\n{}", faultd.log()));
        ids.push(fault.id);
    }
    ids
}
