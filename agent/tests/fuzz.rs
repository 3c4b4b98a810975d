//! Fuzzing the request path for a bounded time: proto decode → conversion and validation →
//! policy → engine (with the fake dataplane in place of the kernel). Inputs are requests built
//! from generous strategies (NaN, negative and huge numbers, odd paths, unknown enum values),
//! the same requests with their encoded bytes mutated, plain random bytes, and random bytes
//! sent as gRPC messages to a real server on a unix socket.
//!
//! Whatever comes in: no panic, no hang (a watchdog aborts the run if one input takes longer
//! than `HANG`), every rejection a clean status (a code a client can act on and a message), and
//! the kernel map always holds exactly the entries of the faults in force.
//!
//! `FAULTD_FUZZ_SECONDS` sets the budget (default 20); the run prints how many inputs it tried.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use faultd::api::convert;
use faultd::dataplane::fake::FakeDataplane;
use faultd::engine::{Engine, EngineConfig};
use faultd::policy::Policy;
use faultd::target::CgroupRoot;
use faultd_proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// One input taking this long is a hang.
const HANG: Duration = Duration::from_secs(10);

fn budget() -> Duration {
    let seconds = std::env::var("FAULTD_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// Aborts the process, printing the input, if one input runs longer than `HANG`.
struct Watchdog {
    started_ms: Arc<AtomicU64>,
    input: Arc<Mutex<String>>,
    done: Arc<AtomicBool>,
    epoch: Instant,
}

impl Watchdog {
    fn start() -> Watchdog {
        let dog = Watchdog {
            started_ms: Arc::new(AtomicU64::new(0)),
            input: Arc::new(Mutex::new(String::new())),
            done: Arc::new(AtomicBool::new(false)),
            epoch: Instant::now(),
        };
        let (started, input, done, epoch) = (
            dog.started_ms.clone(),
            dog.input.clone(),
            dog.done.clone(),
            dog.epoch,
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let since = epoch.elapsed().as_millis() as u64 - started.load(Ordering::Relaxed);
                if since > HANG.as_millis() as u64 {
                    eprintln!(
                        "fuzz: one input has run for {since} ms (a hang); the input:\n{}",
                        input.lock().map(|i| i.clone()).unwrap_or_default()
                    );
                    std::process::abort();
                }
            }
        });
        dog
    }

    fn begin(&self, input: impl FnOnce() -> String) {
        if let Ok(mut slot) = self.input.lock() {
            *slot = input();
        }
        self.started_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// A code a client can act on, and a message saying why.
fn clean(status: &tonic::Status) -> Result<(), TestCaseError> {
    let acceptable = [
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
    ];
    prop_assert!(
        acceptable.contains(&status.code()),
        "unclean status {status:?}"
    );
    prop_assert!(!status.message().is_empty(), "a status without a message");
    Ok(())
}

/// The engine under fuzz, its fake kernel, and a cgroup root with `/app` and `/app/web`.
struct Target {
    engine: Arc<Engine>,
    fake: FakeDataplane,
    dir: std::path::PathBuf,
}

impl Target {
    fn new(name: &str) -> Target {
        let dir = std::env::temp_dir().join(format!("faultd-fuzz-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("app/web")).unwrap();
        for cgroup in ["", "app", "app/web"] {
            std::fs::write(dir.join(cgroup).join("cgroup.procs"), "").unwrap();
        }
        let fake = FakeDataplane::default();
        let policy = Policy::from_toml("max_active_faults = 64\nmax_leases = 64").unwrap();
        let engine = Engine::new(
            Box::new(fake.clone()),
            Box::new(CgroupRoot::at(&dir).unwrap()),
            EngineConfig {
                policy,
                ..EngineConfig::default()
            },
        );
        Target { engine, fake, dir }
    }

    /// The request path of FaultService.Inject, as the API runs it.
    fn inject(&self, request: pb::InjectRequest) -> Result<pb::Fault, tonic::Status> {
        let lease = convert::lease_ref(request.lease.as_ref())?;
        let spec = convert::fault_spec(request.fault)?;
        let view = match request.dry_run {
            true => self.engine.dry_run(lease, spec)?,
            false => self.engine.inject(lease, spec)?,
        };
        Ok(convert::fault(view))
    }

    fn grant(&self, request: pb::GrantRequest) -> Result<pb::Lease, tonic::Status> {
        let ttl = convert::ttl(request.ttl.as_ref(), "ttl")?;
        Ok(convert::lease(
            self.engine
                .grant(ttl, request.labels.into_iter().collect())?,
        ))
    }

    /// The kernel holds exactly the entries of the faults in force, within the limits.
    fn check(&self) -> Result<(), TestCaseError> {
        let faults = self.engine.faults(faultd::engine::Select::Active);
        prop_assert!(faults.len() <= 64);
        let expected: usize = faults.iter().map(|f| f.rules).sum();
        let rules = self.fake.rules();
        prop_assert_eq!(rules.len(), expected);
        for fault in &faults {
            for key in fault.spec.rule_keys(fault.resolved.cgroup_id) {
                prop_assert!(rules.contains_key(&key), "fault {} lost {key:?}", fault.id);
            }
        }
        Ok(())
    }

    /// Reverts everything now and then, so the limits do not end every run early.
    fn reset_sometimes(&self, count: u64) {
        if count.is_multiple_of(200) {
            self.engine.abort(std::time::Duration::ZERO);
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies: mostly plausible values, with the edges mixed in.

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("/app".to_string()),
        Just("app/web".to_string()),
        Just("/".to_string()),
        Just("/app/../..".to_string()),
        Just("/proc/self".to_string()),
        Just("a\0b".to_string()),
        "[a-z/._-]{0,24}",
        ".{0,40}",
    ]
    .boxed()
}

fn port() -> BoxedStrategy<u32> {
    prop_oneof![
        8 => 1000u32..1100,
        2 => 1u32..=65535,
        1 => Just(0u32),
        1 => Just(22u32),
        1 => Just(53u32),
        1 => any::<u32>(),
    ]
    .boxed()
}

fn duration() -> BoxedStrategy<prost_types::Duration> {
    let seconds = prop_oneof![
        8 => 1i64..3600,
        2 => 0i64..7200,
        1 => any::<i64>(),
        1 => Just(i64::MAX),
        1 => Just(-1i64),
    ];
    let nanos = prop_oneof![8 => 0i32..1_000_000_000, 1 => any::<i32>()];
    (seconds, nanos)
        .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos })
        .boxed()
}

fn percent() -> BoxedStrategy<f64> {
    prop_oneof![
        12 => 0.0f64..=100.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(-0.0f64),
        1 => any::<f64>(),
    ]
    .boxed()
}

fn scope() -> BoxedStrategy<Option<pb::target::Scope>> {
    let cgroup = |path: &str| {
        Some(pb::target::Scope::Cgroup(pb::CgroupScope {
            path: path.into(),
        }))
    };
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(pb::target::Scope::Host(pb::HostScope {}))),
        6 => Just(cgroup("/app")),
        4 => Just(cgroup("app/web")),
        2 => text().prop_map(|path| Some(pb::target::Scope::Cgroup(pb::CgroupScope { path }))),
        1 => prop_oneof![Just(0u32), Just(1u32), Just(std::process::id()), any::<u32>()]
            .prop_map(|pid| Some(pb::target::Scope::Pid(pb::PidScope { pid }))),
    ]
    .boxed()
}

fn target() -> BoxedStrategy<pb::Target> {
    let range = (port(), proptest::option::weighted(0.2, port()))
        .prop_map(|(first, last)| pb::PortRange { first, last });
    let protocol = prop_oneof![12 => 0i32..3, 1 => any::<i32>()];
    let direction = prop_oneof![12 => 0i32..4, 1 => any::<i32>()];
    (
        scope(),
        proptest::collection::vec(range, 0..4),
        protocol,
        direction,
    )
        .prop_map(|(scope, ports, protocol, direction)| pb::Target {
            scope,
            ports,
            protocol,
            direction,
            ..Default::default()
        })
        .boxed()
}

fn fault() -> BoxedStrategy<pb::Fault> {
    let action = proptest::option::weighted(
        0.9,
        prop_oneof![
            4 => percent().prop_map(|percent| pb::fault::Action::Drop(pb::Drop { percent })),
            1 => Just(pb::fault::Action::Reject(pb::Reject {})),
            1 => (duration(), duration(), percent(), -1i32..4).prop_map(
                |(latency, jitter, correlation, mechanism)| {
                    pb::fault::Action::Delay(pb::Delay {
                        latency: Some(latency),
                        jitter: Some(jitter),
                        correlation,
                        mechanism,
                    })
                }
            ),
            1 => (any::<u64>(), any::<u64>(), -1i32..4).prop_map(
                |(rate_bytes_per_sec, burst, mechanism)| {
                    pb::fault::Action::Bandwidth(pb::Bandwidth {
                        rate_bytes_per_sec,
                        burst,
                        mechanism,
                    })
                }
            ),
            1 => proptest::option::of(prop_oneof![Just(0u64), 1u64..1_000_000, any::<u64>()])
                .prop_map(|after_bytes| pb::fault::Action::Reset(pb::Reset { after_bytes })),
        ],
    );
    let labels = proptest::collection::hash_map(text(), text(), 0..3);
    (
        action,
        proptest::option::weighted(0.9, target()),
        labels,
        text(),
    )
        .prop_map(|(action, target, labels, id)| pb::Fault {
            // Read-only fields a client may still fill in: they must be ignored.
            id,
            action,
            target,
            labels,
            ..Default::default()
        })
        .boxed()
}

fn inject_request() -> BoxedStrategy<pb::InjectRequest> {
    let lease = prop_oneof![
        1 => Just(None),
        8 => duration().prop_map(|ttl| Some(pb::inject_request::Lease::Ttl(ttl))),
        1 => text().prop_map(|id| Some(pb::inject_request::Lease::LeaseId(id))),
    ];
    (
        lease,
        proptest::option::weighted(0.95, fault()),
        any::<bool>(),
    )
        .prop_map(|(lease, fault, dry_run)| pb::InjectRequest {
            lease,
            fault,
            dry_run,
        })
        .boxed()
}

/// Byte-level damage to an encoded message: flips, cuts, insertions.
fn mutated(bytes: Vec<u8>, edits: Vec<(usize, u8, u8)>) -> Vec<u8> {
    let mut bytes = bytes;
    for (at, kind, value) in edits {
        if bytes.is_empty() {
            bytes.push(value);
            continue;
        }
        let at = at % bytes.len();
        match kind % 4 {
            0 => bytes[at] ^= value | 1,
            1 => bytes.truncate(at),
            2 => bytes.insert(at, value),
            _ => bytes[at] = value,
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// gRPC with raw bytes as the message: the server's own decoding is fuzzed too.

#[derive(Clone, Copy, Default)]
struct Raw;

struct RawEncoder;
struct RawDecoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

#[derive(Default, Debug)]
struct Tally {
    structured: u64,
    mutated: u64,
    raw: u64,
    grpc: u64,
    decoded: u64,
    accepted: u64,
    rejected: u64,
}

#[test]
fn fuzz_the_request_path() {
    let budget = budget();
    let started = Instant::now();
    let deadline = started + budget;
    let dog = Watchdog::start();
    let target = Target::new("direct");
    let tally = Mutex::new(Tally::default());
    // A runner counts its cases across runs: each batch gets a fresh one (randomly seeded).
    let runner = || {
        TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        })
    };

    // Runs one decoded request through the path and checks the outcome.
    let run = |request: pb::InjectRequest, count: u64| -> Result<(), TestCaseError> {
        target.reset_sometimes(count);
        match target.inject(request) {
            Ok(fault) => {
                tally.lock().unwrap().accepted += 1;
                prop_assert!(
                    fault.state() == pb::FaultState::Active
                        || fault.state() == pb::FaultState::DryRun
                );
            }
            Err(status) => {
                tally.lock().unwrap().rejected += 1;
                clean(&status)?;
            }
        }
        target.check()
    };

    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        // 1. Structured requests, encoded and decoded as on the wire.
        runner()
            .run(&inject_request(), |request| {
                let count = {
                    let mut t = tally.lock().unwrap();
                    t.structured += 1;
                    t.structured
                };
                dog.begin(|| format!("{request:?}"));
                let decoded = pb::InjectRequest::decode(request.encode_to_vec().as_slice());
                prop_assert!(decoded.is_ok(), "an encoded request did not decode");
                run(decoded.unwrap(), count)
            })
            .unwrap_or_else(|e| panic!("structured input failed: {e}"));

        // 2. The same with their bytes damaged.
        let edits = proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6);
        runner()
            .run(&(inject_request(), edits), |(request, edits)| {
                let bytes = mutated(request.encode_to_vec(), edits);
                let count = {
                    let mut t = tally.lock().unwrap();
                    t.mutated += 1;
                    t.mutated
                };
                dog.begin(|| format!("{bytes:?}"));
                if let Ok(decoded) = pb::InjectRequest::decode(bytes.as_slice()) {
                    tally.lock().unwrap().decoded += 1;
                    run(decoded, count)?;
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("mutated input failed: {e}"));

        // 3. Random bytes as every request message of the API.
        let bytes = proptest::collection::vec(any::<u8>(), 0..200);
        runner()
            .run(&bytes, |bytes| {
                tally.lock().unwrap().raw += 1;
                dog.begin(|| format!("{bytes:?}"));
                if let Ok(request) = pb::InjectRequest::decode(bytes.as_slice()) {
                    tally.lock().unwrap().decoded += 1;
                    run(request, round)?;
                }
                if let Ok(request) = pb::GrantRequest::decode(bytes.as_slice())
                    && let Err(status) = target.grant(request)
                {
                    clean(&status)?;
                }
                if let Ok(request) = pb::RenewRequest::decode(bytes.as_slice())
                    && let Err(error) = convert::lease_id(&request.lease_id, "lease_id")
                        .map_err(tonic::Status::from)
                        .and_then(|id| target.engine.renew(&id).map_err(tonic::Status::from))
                {
                    clean(&error)?;
                }
                if let Ok(request) = pb::RemoveRequest::decode(bytes.as_slice())
                    && let Err(error) = target.engine.remove(&request.id)
                {
                    clean(&tonic::Status::from(error))?;
                }
                target.check()
            })
            .unwrap_or_else(|e| panic!("random bytes failed: {e}"));
    }

    // 4. Random and damaged messages to a real server, over its unix socket, for a fifth of
    //    the budget: tonic's and prost's decoding on the server, then the same path.
    let grpc_budget = budget / 5;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let grpc = runtime.block_on(async {
        let server = support::Server::start("fuzz-grpc", Policy::default()).await;
        let channel = server.channel().await;
        let mut client = tonic::client::Grpc::new(channel);
        let methods = [
            "/faultd.v1.FaultService/Inject",
            "/faultd.v1.FaultService/Remove",
            "/faultd.v1.FaultService/Get",
            "/faultd.v1.LeaseService/Grant",
            "/faultd.v1.LeaseService/Renew",
            "/faultd.v1.LeaseService/Revoke",
            "/faultd.v1.LeaseService/TimeToLive",
        ];
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (
                inject_request(),
                proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..4)
            )
                .prop_map(|(request, edits)| mutated(request.encode_to_vec(), edits)),
        ];
        let grpc_deadline = Instant::now() + grpc_budget;
        let mut sent = 0u64;
        while Instant::now() < grpc_deadline {
            let tree = strategy.new_tree(&mut runner).unwrap();
            let bytes = proptest::strategy::ValueTree::current(&tree);
            let method = methods[sent as usize % methods.len()];
            dog.begin(|| format!("{method} {bytes:?}"));
            client.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
            let answer = client
                .unary::<Vec<u8>, Vec<u8>, Raw>(tonic::Request::new(bytes), path, Raw)
                .await;
            sent += 1;
            if let Err(status) = answer {
                // Undecodable bytes are the one INTERNAL a client sees: tonic's own answer
                // to a message it cannot decode ("failed to decode Protobuf message").
                if status.code() == Code::Internal {
                    assert!(
                        status.message().contains("decode"),
                        "{method}: INTERNAL that is not a decode error: {status:?}"
                    );
                } else {
                    clean(&status).unwrap_or_else(|e| panic!("{method}: {e}"));
                }
            }
            if sent.is_multiple_of(100) {
                server.engine.abort(std::time::Duration::ZERO);
            }
        }
        // Still serving after all that.
        server
            .faults()
            .await
            .list(pb::ListFaultsRequest::default())
            .await
            .expect("the server stopped answering");
        sent
    });
    tally.lock().unwrap().grpc = grpc;

    let tally = tally.into_inner().unwrap();
    let executions = tally.structured + tally.mutated + tally.raw + tally.grpc;
    eprintln!(
        "MEASURE fuzz_executions={executions} in {:.1}s: {} structured, {} mutated, {} random \
         bytes, {} over gRPC; {} decoded from damaged/random bytes; {} accepted, {} rejected \
         cleanly",
        started.elapsed().as_secs_f64(),
        tally.structured,
        tally.mutated,
        tally.raw,
        tally.grpc,
        tally.decoded,
        tally.accepted,
        tally.rejected,
    );
    assert!(
        tally.accepted > 0 && tally.rejected > 0,
        "the fuzzer should reach both outcomes: {tally:?}"
    );
}
