//! Router decision cost per datagram (the relay's whole per-datagram work apart from system
//! calls), with and without a trace, and the parse and emit primitives it stands on.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_mesh::clock::WallClock;
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{self, Datagram, Header, Kind, Route, VcId};
use shoal_protocol::{Identity, Roles, TicketBody, TicketKind, UnixTime};

const T0: u64 = 1_800_000_000;

fn router(now: Instant) -> (Router, SocketAddr, Header, Route) {
    let control = Identity::from_seed([1; 32]);
    let me = Identity::from_seed([2; 32]);
    let lots = Rate { per_sec: 1e12, burst: 1e12 };
    let cfg = RouterConfig {
        permit: Some(
            TicketBody::new(TicketKind::RelayPermit, me.public_key(), Roles::RELAY, UnixTime(T0), 3600).sign(&control),
        ),
        identity: me.clone(),
        control_key: control.public_key(),
        source_packets: lots,
        source_bytes: lots,
        bind_verifications: lots,
        notices: lots,
        max_bindings: 1 << 20,
        cookie_secret: [3; 32],
        fanout: shoal_mesh::fanout::FanoutConfig::default(),
    };
    let mut r = Router::new(cfg, WallClock::new(now, T0 * 1_000_000), now);
    // 10,000 bound nodes, so lookups hit a realistically sized table.
    for i in 0..10_000u32 {
        let node = Identity::from_seed([
            (i % 251) as u8,
            (i / 251) as u8,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
        ]);
        let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 4000));
        r.apply_binding(now, node.node_id(), Roles::CLIENT, addr, T0 + 3600, T0);
    }
    let a = Identity::from_seed([
        0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    ]);
    let b = Identity::from_seed([
        1, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    ]);
    let from = SocketAddr::from(([10, 0, 0, 0], 4000));
    let h = Header { kind: Kind::Data, source: a.node_id(), destination: b.node_id(), vc: VcId(1), trace: false };
    (r, from, h, Route::new(&[me.node_id()]).unwrap())
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("router_decision");
    g.throughput(Throughput::Elements(1));
    for trace in [false, true] {
        let base = Instant::now();
        let (mut r, from, h, route) = router(base);
        let mut buf = vec![0u8; wire::MAX_DATAGRAM];
        let n = wire::emit(&mut buf, &Header { trace, ..h }, &route, 0, &[0xab; 100]).unwrap();
        buf.truncate(n);
        let hop_byte = buf[3];
        let mut now = base;
        g.bench_function(if trace { "forward_100B_traced" } else { "forward_100B" }, |bch| {
            bch.iter(|| {
                buf[3] = hop_byte;
                now += Duration::from_nanos(100);
                let v = r.handle_datagram(now, from, black_box(&mut buf));
                debug_assert!(matches!(v, Verdict::Forward(_)));
                black_box(v)
            })
        });
        assert!(r.counters().forwarded_packets > 0, "the benchmark must measure forwarding");
    }
    let base = Instant::now();
    let (mut r, _, h, route) = router(base);
    let mut buf = vec![0u8; wire::MAX_DATAGRAM];
    let n = wire::emit(&mut buf, &h, &route, 0, &[0; 100]).unwrap();
    buf.truncate(n);
    let template = buf.clone();
    let stranger = SocketAddr::from(([192, 0, 2, 1], 9));
    // The refusal overwrites the buffer with a notice, so each iteration restores it first.
    g.bench_function("refuse_unbound_with_notice", |bch| {
        bch.iter(|| {
            buf.copy_from_slice(&template);
            black_box(r.handle_datagram(base, stranger, black_box(&mut buf)))
        })
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    let h = Header {
        kind: Kind::Data,
        source: shoal_protocol::NodeId([1; 8]),
        destination: shoal_protocol::NodeId([2; 8]),
        vc: VcId(1),
        trace: true,
    };
    let route = Route::new(&[shoal_protocol::NodeId([3; 8]), shoal_protocol::NodeId([4; 8])]).unwrap();
    let payload = [0x5a; 100];
    let mut buf = vec![0u8; wire::MAX_DATAGRAM];
    g.bench_function("emit_data_2hop_traced", |bch| {
        bch.iter(|| black_box(wire::emit(&mut buf, black_box(&h), &route, 1, &payload).unwrap()))
    });
    let n = wire::emit(&mut buf, &h, &route, 1, &payload).unwrap();
    let bytes = buf[..n].to_vec();
    g.bench_function("parse_data_2hop_traced", |bch| {
        bch.iter(|| {
            let d = Datagram::parse(black_box(&bytes)).unwrap();
            black_box((d.destination(), d.route_at(d.hop())))
        })
    });
    g.finish();
}

criterion_group!(benches, decide, codec);
criterion_main!(benches);
