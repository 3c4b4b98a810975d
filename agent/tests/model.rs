//! A property of the engine: for any sequence of Grant, Inject (real and dry run), Remove,
//! Revoke, Renew, Abort and the passing of time, the kernel map (here the fake dataplane)
//! holds exactly the entries of the faults the lease table says are in force, each with its
//! lease's deadline, and nothing of a lease that has expired.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use faultd::dataplane::fake::FakeDataplane;
use faultd::engine::{Engine, EngineConfig, LeaseRef};
use faultd::fault::{Action, Direction, FaultSpec, Labels, PortRange, Protocol, Scope, Target};
use faultd::policy::Policy;
use faultd::target::{Resolve, ResolvedScope};
use faultd_common::RuleKey;
use proptest::prelude::*;

/// Three cgroups, by path.
struct Cgroups;

impl Resolve for Cgroups {
    fn resolve(&self, scope: &Scope) -> Result<ResolvedScope, faultd::target::ResolveError> {
        match scope {
            Scope::Cgroup { path } => {
                let id = match path.as_str() {
                    "/a" => 11,
                    "/b" => 12,
                    "/c" => 13,
                    _ => {
                        return Err(faultd::fault::Invalid::new(
                            "fault.target.cgroup.path",
                            "no such cgroup",
                        )
                        .into());
                    }
                };
                Ok(ResolvedScope {
                    cgroup_path: path.clone(),
                    cgroup_id: id,
                    dir: format!("/sys/fs/cgroup{path}").into(),
                })
            }
            _ => Err(faultd::fault::Invalid::new("fault.target", "cgroups only").into()),
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Grant {
        ttl_ms: u64,
    },
    /// Under the n-th lease granted so far (if any is left), or a private lease of `ttl_ms`.
    Inject {
        lease: Option<usize>,
        ttl_ms: u64,
        cgroup: usize,
        first: u16,
        span: u16,
        protocol: u8,
        direction: u8,
        dry_run: bool,
        /// 0 drop, 1 reject, 2 reset.
        action: u8,
    },
    Remove {
        fault: usize,
    },
    Revoke {
        lease: usize,
    },
    Renew {
        lease: usize,
    },
    Abort,
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (100u64..3000).prop_map(|ttl_ms| Op::Grant { ttl_ms }),
        6 => (
            proptest::option::of(0usize..8),
            100u64..3000,
            0usize..4,
            1000u16..1012,
            0u16..3,
            0u8..3,
            0u8..3,
            proptest::bool::weighted(0.2),
            prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        )
            .prop_map(|(lease, ttl_ms, cgroup, first, span, protocol, direction, dry_run, action)| {
                Op::Inject { lease, ttl_ms, cgroup, first, span, protocol, direction, dry_run, action }
            }),
        2 => (0usize..16).prop_map(|fault| Op::Remove { fault }),
        1 => (0usize..8).prop_map(|lease| Op::Revoke { lease }),
        2 => (0usize..8).prop_map(|lease| Op::Renew { lease }),
        1 => Just(Op::Abort),
        3 => (0u64..1500).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the lease table says is in force must be exactly what the kernel map holds.
fn check(engine: &Engine, fake: &FakeDataplane) -> Result<(), TestCaseError> {
    let faults = engine.faults(faultd::engine::Select::Active);
    let leases: HashMap<String, _> = engine
        .leases()
        .into_iter()
        .map(|lease| (lease.id.clone(), lease))
        .collect();
    let rules = fake.rules();
    let mut expected: HashSet<RuleKey> = HashSet::new();
    let mut slots = HashSet::new();
    for fault in &faults {
        let lease = leases.get(&fault.lease_id);
        prop_assert!(lease.is_some(), "fault {} has no lease", fault.id);
        prop_assert!(lease.unwrap().fault_ids.contains(&fault.id));
        let keys = fault.spec.rule_keys(fault.resolved.cgroup_id);
        let Some(first_key) = keys.first() else {
            // A reset with after_bytes has no kernel entries, only its watcher.
            continue;
        };
        let first = rules.get(first_key);
        prop_assert!(first.is_some(), "fault {} is not in the map", fault.id);
        prop_assert!(
            slots.insert(first.unwrap().counter_slot),
            "a slot is shared"
        );
        for key in keys {
            let value = rules.get(&key);
            prop_assert!(value.is_some(), "fault {} lost {key:?}", fault.id);
            prop_assert_eq!(value.unwrap().counter_slot, first.unwrap().counter_slot);
            prop_assert!(expected.insert(key), "two faults hold {key:?}");
        }
    }
    let held: HashSet<RuleKey> = rules.keys().copied().collect();
    prop_assert_eq!(held, expected, "the map and the lease table disagree");
    // Every fault of every lease is in force.
    for lease in leases.values() {
        for id in &lease.fault_ids {
            prop_assert!(
                faults.iter().any(|f| &f.id == id),
                "lease {} lists {id}",
                lease.id
            );
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let fake = FakeDataplane::default();
        let policy = Policy::from_toml("max_active_faults = 12\nmax_leases = 10").unwrap();
        let engine: Arc<Engine> = Engine::new(
            Box::new(fake.clone()),
            Box::new(Cgroups),
            EngineConfig {
                policy,
                ..EngineConfig::default()
            },
        );
        let mut leases: Vec<String> = Vec::new();
        let mut faults: Vec<String> = Vec::new();
        let paths = ["/a", "/b", "/c", "/nope"];
        let ms = Duration::from_millis;
        for op in ops {
            match op {
                Op::Grant { ttl_ms } => {
                    if let Ok(lease) = engine.grant(ms(ttl_ms), Labels::new()) {
                        leases.push(lease.id);
                    }
                }
                Op::Inject {
                    lease,
                    ttl_ms,
                    cgroup,
                    first,
                    span,
                    protocol,
                    direction,
                    dry_run,
                    action,
                } => {
                    let lease = match lease.and_then(|i| leases.get(i)) {
                        Some(id) => LeaseRef::Existing(id.clone()),
                        None => LeaseRef::Ttl(ms(ttl_ms)),
                    };
                    let spec = FaultSpec {
                        action: match action {
                            0 => Action::Drop { percent: 100.0 },
                            1 => Action::Reject,
                            _ => Action::Reset { after_bytes: None },
                        },
                        target: Target {
                            scope: Scope::Cgroup {
                                path: paths[cgroup].into(),
                            },
                            ports: vec![PortRange {
                                first,
                                last: first + span,
                            }],
                            protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Both]
                                [protocol as usize],
                            direction: [Direction::Egress, Direction::Ingress, Direction::Both]
                                [direction as usize],
                            peers: Vec::new(),
                            exclude_peers: Vec::new(),
                            request: None,
                        },
                        labels: Labels::new(),
                    };
                    let before = fake.rules();
                    match dry_run {
                        true => {
                            let _ = engine.dry_run(lease, spec);
                            prop_assert_eq!(fake.rules(), before, "a dry run changed the map");
                        }
                        false => {
                            if let Ok(fault) = engine.inject(lease, spec) {
                                faults.push(fault.id);
                            }
                        }
                    }
                }
                Op::Remove { fault } => {
                    if let Some(id) = faults.get(fault) {
                        let _ = engine.remove(id);
                    }
                }
                Op::Revoke { lease } => {
                    if let Some(id) = leases.get(lease) {
                        let _ = engine.revoke(id);
                    }
                }
                Op::Renew { lease } => {
                    if let Some(id) = leases.get(lease) {
                        let _ = engine.renew(id);
                    }
                }
                Op::Abort => {
                    engine.abort(std::time::Duration::ZERO);
                    prop_assert!(fake.rules().is_empty(), "Abort left entries");
                }
                Op::Advance { ms: step } => tokio::time::advance(ms(step)).await,
            }
            check(&engine, &fake)?;
        }
        // Once every lease has run out, nothing is left.
        tokio::time::advance(Duration::from_secs(3600)).await;
        check(&engine, &fake)?;
        prop_assert!(fake.rules().is_empty(), "entries outlived every lease");
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_kernel_map_always_matches_the_lease_table(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
