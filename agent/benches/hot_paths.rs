//! Micro-benchmarks of the user-space paths every request takes (`cargo bench -p faultd-agent`):
//! turning an Inject's fault into a validated spec, encoding a target into kernel map keys, and
//! the lease table with 10 000 leases (renew, insert/remove, expiry scan), and a gRPC request
//! through the unix socket's `:authority` normalization against copying the same bytes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use faultd::api::authority::NormalizedAuthority;
use faultd::api::convert::fault_spec;
use faultd::lease::{Lease, LeaseTable};
use faultd_proto::v1 as pb;
use tokio::time::Instant;

const LEASES: usize = 10_000;

fn drop_fault(ports: Vec<pb::PortRange>) -> pb::Fault {
    pb::Fault {
        action: Some(pb::fault::Action::Drop(pb::Drop { percent: 30.0 })),
        target: Some(pb::Target {
            scope: Some(pb::target::Scope::Cgroup(pb::CgroupScope {
                path: "/app/worker".to_owned(),
            })),
            ports,
            protocol: pb::Protocol::Tcp.into(),
            direction: pb::Direction::Egress.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(first: u32, last: Option<u32>) -> pb::PortRange {
    pb::PortRange { first, last }
}

fn validation(c: &mut Criterion) {
    let one = drop_fault(vec![port(6379, None)]);
    c.bench_function("validate drop fault, 1 port", |b| {
        b.iter(|| fault_spec(Some(black_box(one.clone()))).expect("valid"))
    });
    let many = drop_fault(vec![
        port(6379, None),
        port(5432, None),
        port(8000, Some(8010)),
    ]);
    c.bench_function("validate drop fault, 2 ports + range of 11", |b| {
        b.iter(|| fault_spec(Some(black_box(many.clone()))).expect("valid"))
    });
    let bad = pb::Fault {
        action: Some(pb::fault::Action::Drop(pb::Drop { percent: 150.0 })),
        ..one.clone()
    };
    c.bench_function("reject invalid drop percent", |b| {
        b.iter(|| fault_spec(Some(black_box(bad.clone()))).expect_err("invalid"))
    });
}

fn encoding(c: &mut Criterion) {
    let one = fault_spec(Some(drop_fault(vec![port(6379, None)]))).expect("valid");
    c.bench_function("rule keys, 1 port", |b| {
        b.iter(|| black_box(&one.target).rule_keys(black_box(4242)))
    });
    let mut both = drop_fault(vec![port(8000, Some(8099))]);
    if let Some(t) = both.target.as_mut() {
        t.protocol = pb::Protocol::Unspecified.into();
        t.direction = pb::Direction::Unspecified.into();
    }
    let both = fault_spec(Some(both)).expect("valid");
    c.bench_function("rule keys, 100 ports x tcp+udp x both directions", |b| {
        b.iter(|| black_box(&both.target).rule_keys(black_box(4242)))
    });
}

fn lease(id: String, now: Instant) -> Lease {
    Lease {
        id,
        ttl: Duration::from_secs(10),
        deadline: now + Duration::from_secs(10),
        faults: Vec::new(),
        private: false,
        labels: Default::default(),
    }
}

fn lease_table(c: &mut Criterion) {
    let now = Instant::now();
    let mut table = LeaseTable::default();
    let ids: Vec<String> = (0..LEASES).map(|i| format!("lease-{i:08}")).collect();
    for id in &ids {
        table.insert(lease(id.clone(), now));
    }
    let mut i = 0;
    c.bench_function("lease table (10k): renew", |b| {
        b.iter(|| {
            i = (i + 1) % LEASES;
            table.renew(black_box(&ids[i]), Instant::now()).is_some()
        })
    });
    c.bench_function("lease table (10k): insert + remove", |b| {
        b.iter(|| {
            table.insert(lease("lease-extra".to_owned(), now));
            table.remove(black_box("lease-extra")).is_some()
        })
    });
    c.bench_function("lease table (10k): expiry scan, none due", |b| {
        b.iter(|| table.take_expired(black_box(now)).len())
    });
    c.bench_function("lease table (10k): next deadline", |b| {
        b.iter(|| table.next_deadline())
    });
}

/// A unary call as grpc-core sends it on a unix socket: HEADERS (the socket path as
/// `:authority`, HPACK-coded against the client's dynamic table after the first) and DATA.
fn unix_requests(count: usize) -> Vec<u8> {
    let mut encoder = fluke_hpack::Encoder::new();
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    };
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for i in 0..count {
        let stream = 2 * i as u32 + 1;
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/faultd.v1.LeaseService/Renew"),
            (b":authority", b"%2Frun%2Ffaultd%2Ffaultd.sock"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-accept-encoding", b"identity, deflate, gzip"),
            (
                b"user-agent",
                b"grpc-python/1.85.1 grpc-c/52.0.0 (linux; chttp2)",
            ),
        ]);
        bytes.extend(frame(0x1, 0x4, stream, &block));
        bytes.extend(frame(
            0x0,
            0x1,
            stream,
            &[
                0, 0, 0, 0, 18, 10, 16, b'0', b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'8', b'9',
                b'a', b'b', b'c', b'd', b'e', b'f',
            ],
        ));
    }
    bytes
}

fn authority(c: &mut Criterion) {
    const CALLS: usize = 100;
    let input = unix_requests(CALLS);
    c.bench_function(
        "100 unary calls through the unix :authority normalization",
        |b| {
            b.iter(|| {
                let mut layer = NormalizedAuthority::new(());
                for chunk in black_box(&input).chunks(8192) {
                    layer.push(chunk).expect("well-formed");
                }
                layer.take_output()
            })
        },
    );
    c.bench_function("baseline: the same bytes copied as read", |b| {
        b.iter(|| {
            let mut out = bytes::BytesMut::new();
            for chunk in black_box(&input).chunks(8192) {
                out.extend_from_slice(chunk);
            }
            out
        })
    });
}

criterion_group!(benches, validation, encoding, lease_table, authority);
criterion_main!(benches);
