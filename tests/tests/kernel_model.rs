//! For a random sequence of Grant, Inject, Remove, Revoke, Renew and Abort calls against the
//! real faultd, with leases expiring on their own in between, the kernel's rule map always
//! holds exactly the entries of the faults the agent lists as in force, nothing more and nothing
//! less. The sequence comes from a seed (printed, and taken from `FAULTD_MODEL_SEED`) so a
//! failure can be replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use faultd_proto::v1::{
    AbortRequest, Direction, Fault, Protocol, RemoveRequest, RenewRequest, RevokeRequest, fault,
};
use faultd_tests::api::{cgroup_target, drop_fault, grant, list_faults, under_lease, with_ttl};
use faultd_tests::bpf::map_entries;
use faultd_tests::{Cgroup, Faultd};

const STEPS: usize = 150;

/// xorshift64*: enough randomness for a test, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The rule map's key bytes for a fault in force, as the agent lists it.
fn expected_keys(fault: &Fault) -> Vec<Vec<u8>> {
    let spec = faultd::api::convert::fault_spec(Some(fault.clone()))
        .unwrap_or_else(|e| panic!("faultd listed a fault it cannot read back ({e}): {fault:?}"))
        .normalized();
    let scope = fault.resolved.as_ref().expect("resolved").cgroup_id;
    spec.rule_keys(scope)
        .into_iter()
        .map(|key| {
            // RuleKey as the kernel reads it: scope id, port, protocol, direction, padding.
            let mut bytes = key.scope_id.to_ne_bytes().to_vec();
            bytes.extend(key.port.to_ne_bytes());
            bytes.extend([key.protocol, key.direction]);
            bytes.extend([0; 4]);
            bytes
        })
        .collect()
}

/// Reads the agent's faults and the kernel map at one moment: the list is read before and
/// after the map, and the reading is repeated when a lease expired in between.
async fn snapshot(faultd: &Faultd) -> (Vec<Fault>, BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut faults = faultd.faults();
    for _ in 0..10 {
        let before = list_faults(&mut faults).await;
        let map: BTreeMap<_, _> = map_entries(faultd.pid(), "FAULTD_RULES")
            .into_iter()
            .collect();
        let after = list_faults(&mut faults).await;
        let ids = |list: &[Fault]| list.iter().map(|f| f.id.clone()).collect::<Vec<_>>();
        if ids(&before) == ids(&after) {
            return (after, map);
        }
    }
    panic!("faults kept changing while the kernel map was read");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn the_kernel_map_always_matches_what_the_agent_says_is_in_force() {
    let seed = std::env::var("FAULTD_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| faultd_tests::process::unix_ns() as u64 | 1);
    eprintln!("FAULTD_MODEL_SEED={seed}");
    let mut rng = Rng(seed);
    let faultd = Faultd::start().await;
    let cgroups = [Cgroup::new(), Cgroup::new()];
    let mut faults = faultd.faults();
    let mut leases_client = faultd.leases();
    let mut leases: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut log = Vec::new();
    let mut most_entries = 0;

    for step in 0..STEPS {
        let op = rng.below(100);
        let what = match op {
            0..=9 => {
                let ttl = Duration::from_millis(300 + rng.below(1500));
                leases.push(grant(&mut leases_client, ttl).await.id);
                format!("grant {ttl:?}")
            }
            10..=59 => {
                let cgroup = &cgroups[rng.below(2) as usize];
                let port = 40_000 + rng.below(6) as u16;
                let protocol =
                    [Protocol::Tcp, Protocol::Udp, Protocol::Unspecified][rng.below(3) as usize];
                let direction =
                    [Direction::Egress, Direction::Ingress, Direction::Both][rng.below(3) as usize];
                let mut fault =
                    drop_fault(50.0, cgroup_target(cgroup, &[port], protocol, direction));
                if rng.below(4) == 0 {
                    fault.action = Some(fault::Action::Reject(Default::default()));
                }
                let request = match (rng.below(2), leases.last()) {
                    (0, Some(lease)) => under_lease(fault, lease),
                    _ => with_ttl(fault, Duration::from_millis(200 + rng.below(2000))),
                };
                let answer = faults.inject(request.clone()).await;
                if let Ok(fault) = &answer {
                    ids.push(fault.get_ref().id.clone());
                }
                format!(
                    "inject {:?} → {:?}",
                    request.fault.and_then(|f| f.target).map(|t| t.ports),
                    answer.map(|f| f.into_inner().id).map_err(|s| s.code())
                )
            }
            60..=69 if !ids.is_empty() => {
                let id = ids[rng.below(ids.len() as u64) as usize].clone();
                let answer = faults.remove(RemoveRequest { id: id.clone() }).await;
                format!(
                    "remove {id} → {:?}",
                    answer.map(|_| ()).map_err(|s| s.code())
                )
            }
            70..=77 if !leases.is_empty() => {
                let lease = leases[rng.below(leases.len() as u64) as usize].clone();
                let answer = leases_client
                    .revoke(RevokeRequest {
                        lease_id: lease.clone(),
                    })
                    .await;
                format!(
                    "revoke {lease} → {:?}",
                    answer.map(|_| ()).map_err(|s| s.code())
                )
            }
            78..=87 if !leases.is_empty() => {
                let lease = leases[rng.below(leases.len() as u64) as usize].clone();
                let answer = leases_client
                    .renew(RenewRequest {
                        lease_id: lease.clone(),
                    })
                    .await;
                format!(
                    "renew {lease} → {:?}",
                    answer.map(|_| ()).map_err(|s| s.code())
                )
            }
            88..=89 => {
                faults.abort(AbortRequest {}).await.unwrap();
                "abort".to_string()
            }
            _ => {
                let pause = Duration::from_millis(rng.below(400));
                tokio::time::sleep(pause).await;
                format!("sleep {pause:?}")
            }
        };
        log.push(what);

        let (listed, map) = snapshot(&faultd).await;
        let mut expected = BTreeSet::new();
        for fault in &listed {
            let keys = expected_keys(fault);
            let slots: BTreeSet<&[u8]> = keys
                .iter()
                .map(|key| {
                    let value = map.get(key).unwrap_or_else(|| {
                        panic!(
                            "seed {seed}, step {step}: fault {} is listed but its entry {key:?} \
                             is not in the kernel map; steps:\n{}",
                            fault.id,
                            log.join("\n")
                        )
                    });
                    // The counter slot (bytes 16..20 of RuleValue).
                    &value[16..20]
                })
                .collect();
            assert!(
                slots.len() <= 1,
                "fault {} has entries on several slots",
                fault.id
            );
            expected.extend(keys);
        }
        let held: BTreeSet<Vec<u8>> = map.keys().cloned().collect();
        most_entries = most_entries.max(held.len());
        assert_eq!(
            held,
            expected,
            "seed {seed}, step {step}: the kernel map holds {} entries, the listed faults need {}; steps:\n{}",
            held.len(),
            expected.len(),
            log.join("\n")
        );
    }
    eprintln!(
        "{STEPS} steps, {} faults injected, at most {most_entries} kernel entries at once",
        ids.len()
    );
    assert!(
        ids.len() > 10 && most_entries > 4,
        "the sequence hardly exercised the map"
    );
    // Everything ends: abort, and the map is empty.
    faults.abort(AbortRequest {}).await.unwrap();
    let (listed, map) = snapshot(&faultd).await;
    assert!(listed.is_empty() && map.is_empty(), "{listed:?} {map:?}");
}
