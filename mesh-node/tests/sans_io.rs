//! The relay and endpoint cores wired together in memory, with a virtual clock: binds, a
//! two-relay route in both directions, probes, each refusal a hostile sender meets, and how
//! bindings go (an unbind as a node stops, or silence).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::{Endpoint, EndpointEvent, Envelope, Path, SendError};
use shoal_mesh::metrics::DropReason;
use shoal_mesh::router::{IDLE_EXPIRY, Router};
use shoal_mesh::wire::{self, BindRefusal, Header, Kind, NoticeCode, Route, VcId};
use shoal_protocol::{Identity, Roles, TicketBody, TicketKind, UnixTime};

mod common;

use common::*;

/// A(1) → R1(11) → R2(12) → B(2); R1 is told about R2, R2 learns R1 from its bind.
fn topology() -> (Net, Identity, Identity, Identity) {
    let now = Instant::now();
    let clock = WallClock::new(now, T0_UNIX * 1_000_000);
    let control = Identity::from_seed([200; 32]);
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let r1 = Router::new(relay_cfg(&control, 11), clock, now);
    let mut r2 = Router::new(relay_cfg(&control, 12), clock, now);
    let _ = &mut r2;
    let mut ea = Endpoint::new(a.clone(), permit(&control, &a, Roles::CLIENT, 600), clock);
    let mut eb = Endpoint::new(b.clone(), permit(&control, &b, Roles::CLIENT, 600), clock);
    ea.add_relay(now, addr(11));
    eb.add_relay(now, addr(12));
    let mut net = Net {
        now,
        nodes: vec![
            (addr(1), Node::End(Box::new(ea))),
            (addr(2), Node::End(Box::new(eb))),
            (addr(11), Node::Relay(Box::new(r1))),
            (addr(12), Node::Relay(Box::new(r2))),
        ],
        queue: VecDeque::new(),
        events: Vec::new(),
    };
    net.relay(2).add_peer(addr(12), now);
    net.run(Duration::from_millis(50));
    (net, control, a, b)
}

#[test]
fn two_relay_route_both_ways_with_trace_and_probe() {
    let (mut net, _control, a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    assert!(net.take_events(addr(1)).iter().any(
        |e| matches!(e, EndpointEvent::RelayBound { relay, observed, .. } if *relay == r1 && *observed == addr(1))
    ));
    let route = Route::new(&[r1, r2]).unwrap();
    let now = net.now;
    net.endpoint(0)
        .send(
            now,
            &Envelope { destination: b.node_id(), path: Path::Relayed(route), vc: VcId(7), trace: true },
            b"hello B",
        )
        .unwrap();
    net.drain(0);
    net.run(Duration::from_millis(5));
    let got = net.received(addr(2));
    let rx = &got[0];
    assert_eq!((rx.source, rx.vc, rx.payload.as_slice()), (a.node_id(), VcId(7), &b"hello B"[..]));
    let trace = rx.trace.unwrap();
    assert_eq!(trace.slots().len(), 2);
    assert_eq!(trace.slots()[0].tag, wire::relay_tag(r1));
    // Each hop takes 100 µs of virtual time.
    assert_eq!(trace.hop_latencies(), vec![Duration::from_micros(100); 3]);

    // And back, B → R2 → R1 → A.
    let now = net.now;
    let env = Envelope { destination: a.node_id(), path: Path::Relayed(route.reversed()), vc: VcId(7), trace: false };
    net.endpoint(1).send(now, &env, b"hi A").unwrap();
    net.drain(1);
    net.run(Duration::from_millis(5));
    let got = net.received(addr(1));
    assert!(got[0].payload == b"hi A" && got[0].trace.is_none());

    // A probe measures the round trip and each hop's share of it.
    let now = net.now;
    let id = net.endpoint(0).probe(now, b.node_id(), &Path::Relayed(route)).unwrap();
    net.drain(0);
    net.run(Duration::from_millis(5));
    let got = net.take_events(addr(1));
    let Some(EndpointEvent::ProbeDone(rep)) = got.iter().find(|e| matches!(e, EndpointEvent::ProbeDone(_))) else {
        panic!("{got:?}")
    };
    assert_eq!(rep.id, id);
    assert_eq!(rep.hop_rtts, vec![Duration::from_micros(200); 3]);
    assert!(rep.rtt >= Duration::from_micros(600));
    assert_eq!(net.relay(2).counters().forwarded_packets, 4);
}

#[test]
fn unbound_sender_is_dropped_and_counted_at_first_relay() {
    let (mut net, control, _a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    // An intruder with a valid permit that never bound, sending from another address.
    let intruder = Identity::from_seed([66; 32]);
    let mut e = Endpoint::new(
        intruder.clone(),
        permit(&control, &intruder, Roles::CLIENT, 600),
        WallClock::new(net.now, T0_UNIX * 1_000_000),
    );
    let mut buf = [0u8; 200];
    let h =
        Header { kind: Kind::Data, source: intruder.node_id(), destination: b.node_id(), vc: VcId(1), trace: false };
    let n = wire::emit(&mut buf, &h, &Route::new(&[r1, r2]).unwrap(), 0, b"spam").unwrap();
    net.queue.push_back((net.now, addr(99), addr(11), buf[..n].to_vec()));
    // Claiming A's identity from another address fails the same way.
    let h = Header { source: _a.node_id(), ..h };
    let n = wire::emit(&mut buf, &h, &Route::new(&[r1, r2]).unwrap(), 0, b"spoof").unwrap();
    net.queue.push_back((net.now, addr(98), addr(11), buf[..n].to_vec()));
    net.run(Duration::from_millis(5));
    assert_eq!(net.relay(2).counters().drops(DropReason::NotBound), 2);
    assert_eq!(net.relay(2).counters().forwarded_packets, 0);
    assert!(net.received(addr(2)).is_empty());
    let _ = e.poll_transmit();
}

#[test]
fn a_relayed_datagram_counts_only_when_it_comes_from_the_last_relay_of_its_route() {
    let (mut net, _control, a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    let route = Route::new(&[r1, r2]).unwrap();
    // A datagram as R2 hands it to B at the end of the route A → R1 → R2 → B: captured on the
    // wire, it can be sent to B again by anyone, from anywhere.
    let h = Header { kind: Kind::Data, source: a.node_id(), destination: b.node_id(), vc: VcId(3), trace: false };
    let mut buf = vec![0u8; 200];
    let at = wire::emit_header(&mut buf, &h, &route, route.len(), 0, 5).unwrap();
    buf[at..at + 5].copy_from_slice(b"state");
    buf.truncate(at + 5);
    let now = net.now;
    let eb = net.endpoint(1);
    // From R1 (bound, but not the route's last hop), from an unknown port, from A itself: all
    // replays or forgeries, none delivered.
    for from in [addr(11), addr(40_000), addr(1)] {
        eb.handle_datagram(now, from, &buf);
    }
    // A probe and a probe ack the same way.
    let probe = Header { kind: Kind::Probe, trace: true, ..h };
    let mut p = vec![0u8; 200];
    let body = wire::probe_body_len(route.len());
    let n = wire::emit_header(&mut p, &probe, &route, route.len(), 0, body).unwrap() + body;
    eb.handle_datagram(now, addr(40_001), &p[..n]);
    assert_eq!(eb.counters().misrouted, 4);
    assert!(eb.poll_transmit().is_none(), "a forged probe was answered");
    // From R2, where B bound it: delivered.
    eb.handle_datagram(now, addr(12), &buf);
    net.drain(1);
    let got = net.received(addr(2));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].source, got[0].payload.as_slice()), (a.node_id(), &b"state"[..]));
    // A direct datagram's source is only a claim: the mesh passes it on, and says so.
    let direct = Header { source: Identity::from_seed([9; 32]).node_id(), ..h };
    let n = wire::emit(&mut p, &direct, &Route::DIRECT, 0, b"hi").unwrap();
    net.endpoint(1).handle_datagram(now, addr(40_002), &p[..n]);
    net.drain(1);
    assert!(net.received(addr(2))[0].route.is_empty());
}

#[test]
fn bound_node_cannot_spoof_another_source_or_skip_the_route() {
    let (mut net, _control, a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    let mut buf = [0u8; 200];
    // From A's bound address but claiming to be B.
    let h = Header { kind: Kind::Data, source: b.node_id(), destination: a.node_id(), vc: VcId(1), trace: false };
    let n = wire::emit(&mut buf, &h, &Route::new(&[r1]).unwrap(), 0, b"x").unwrap();
    net.queue.push_back((net.now, addr(1), addr(11), buf[..n].to_vec()));
    // A route that names R2 first, sent to R1.
    let h = Header { source: a.node_id(), destination: b.node_id(), ..h };
    let n = wire::emit(&mut buf, &h, &Route::new(&[r2]).unwrap(), 0, b"x").unwrap();
    net.queue.push_back((net.now, addr(1), addr(11), buf[..n].to_vec()));
    // A destination nobody bound.
    let h = Header { destination: Identity::from_seed([77; 32]).node_id(), ..h };
    let n = wire::emit(&mut buf, &h, &Route::new(&[r1]).unwrap(), 0, b"x").unwrap();
    net.queue.push_back((net.now, addr(1), addr(11), buf[..n].to_vec()));
    net.run(Duration::from_millis(5));
    let c = net.relay(2).counters().clone();
    assert_eq!(c.drops(DropReason::SourceMismatch), 1);
    assert_eq!(c.drops(DropReason::NotOnRoute), 1);
    assert_eq!(c.drops(DropReason::UnknownNextHop), 1);
    let ev = net.take_events(addr(1));
    assert!(
        ev.iter()
            .any(|e| matches!(e, EndpointEvent::Notice { notice, .. } if notice.code == NoticeCode::UnknownNextHop))
    );
}

#[test]
fn per_source_rate_limit_drops_the_excess() {
    let (mut net, _control, _a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    let route = Route::new(&[r1, r2]).unwrap();
    let now = net.now;
    for _ in 0..100 {
        net.endpoint(0)
            .send(
                now,
                &Envelope { destination: b.node_id(), path: Path::Relayed(route), vc: VcId(1), trace: false },
                b"burst",
            )
            .unwrap();
    }
    net.drain(0);
    net.run(Duration::from_millis(2));
    // Burst of 20, refilled at 100/s over ~2 ms: 20 pass.
    assert_eq!(net.relay(2).counters().forwarded_packets, 20);
    assert_eq!(net.relay(2).counters().drops(DropReason::RateLimited), 80);
}

#[test]
fn expired_permit_stops_forwarding_and_forged_permit_never_binds() {
    let (mut net, control, _a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    // A permit signed by someone else.
    let mallory = Identity::from_seed([50; 32]);
    let forged = TicketBody::new(TicketKind::RelayPermit, mallory.public_key(), Roles::CLIENT, UnixTime(T0_UNIX), 600)
        .sign(&Identity::from_seed([51; 32]));
    let mut em = Endpoint::new(mallory.clone(), forged, WallClock::new(net.now, T0_UNIX * 1_000_000));
    em.add_relay(net.now, addr(11));
    net.nodes.push((addr(50), Node::End(Box::new(em))));
    // A short-lived but genuine permit.
    let brief = Identity::from_seed([52; 32]);
    let mut eb = Endpoint::new(
        brief.clone(),
        permit(&control, &brief, Roles::CLIENT, 2),
        WallClock::new(net.now, T0_UNIX * 1_000_000),
    );
    eb.add_relay(net.now, addr(11));
    net.nodes.push((addr(52), Node::End(Box::new(eb))));
    net.run(Duration::from_millis(50));
    assert!(net.relay(2).counters().bind_refusals(BindRefusal::ForgedPermit) >= 1);
    assert!(net.take_events(addr(52)).iter().any(|e| matches!(e, EndpointEvent::RelayBound { .. })));
    let route = Route::new(&[r1, r2]).unwrap();
    let now = net.now;
    net.endpoint(5)
        .send(now, &Envelope { destination: b.node_id(), path: Path::Relayed(route), vc: VcId(1), trace: false }, b"ok")
        .unwrap();
    net.drain(5);
    net.run(Duration::from_secs(3));
    // The endpoint knows its binding lapsed with the permit (the re-bind was refused)...
    let now = net.now;
    let late = net.endpoint(5).send(
        now,
        &Envelope { destination: b.node_id(), path: Path::Relayed(route), vc: VcId(1), trace: false },
        b"late",
    );
    assert_eq!(late, Err(SendError::NotBound(r1)));
    // ...and the relay refuses what is sent anyway.
    let mut buf = [0u8; 200];
    let h = Header { kind: Kind::Data, source: brief.node_id(), destination: b.node_id(), vc: VcId(1), trace: false };
    let n = wire::emit(&mut buf, &h, &route, 0, b"late").unwrap();
    net.queue.push_back((net.now, addr(52), addr(11), buf[..n].to_vec()));
    net.run(Duration::from_millis(5));
    let received: Vec<_> = net.received(addr(2)).into_iter().map(|r| r.payload).collect();
    assert_eq!(received, vec![b"ok".to_vec()]);
    let c = net.relay(2).counters();
    assert!(c.drops(DropReason::PermitExpired) + c.drops(DropReason::NotBound) >= 1);
    assert!(c.bind_refusals(BindRefusal::ExpiredPermit) >= 1, "the expired permit's re-bind is refused");
}

#[test]
fn binds_measure_the_round_trip_to_each_relay() {
    let (mut net, _control, _a, _b) = topology();
    let r1 = net.relay(2).id();
    let r2 = net.relay(3).id();
    let a = net.endpoint(0).relay_rtts().collect::<Vec<_>>();
    assert_eq!(a, vec![(r1, addr(11), 2 * HOP)], "request out, challenge back: two hops");
    let peers = net.relay(2).peer_rtts().collect::<Vec<_>>();
    assert_eq!(peers, vec![(r2, addr(12), 2 * HOP)], "a relay measures its peer relays the same way");
}

#[test]
fn bindings_stay_usable_across_keepalive_refreshes() {
    let (mut net, _control, _a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    let env = Envelope {
        destination: b.node_id(),
        path: Path::Relayed(Route::new(&[r1, r2]).unwrap()),
        vc: VcId(2),
        trace: false,
    };
    // 70 s of updates every 10 ms span three keepalive refreshes of every binding.
    for i in 0..7_000u32 {
        let now = net.now;
        net.endpoint(0).send(now, &env, &i.to_be_bytes()).unwrap_or_else(|e| panic!("send {i} failed: {e}"));
        net.drain(0);
        net.run(Duration::from_millis(10));
    }
    net.run(Duration::from_millis(5));
    assert_eq!(net.received(addr(2)).len(), 7_000);
    assert!(net.relay(2).counters().binds_accepted >= 4, "A and R2 refreshed their bindings at R1");
}

#[test]
fn traffic_resumes_quickly_after_a_relay_restarts() {
    let (mut net, control, a, b) = topology();
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    let route = Route::new(&[r1, r2]).unwrap();
    let to_b = Envelope { destination: b.node_id(), path: Path::Relayed(route), vc: VcId(1), trace: false };
    let to_a = Envelope { destination: a.node_id(), path: Path::Relayed(route.reversed()), vc: VcId(1), trace: false };
    // R2 restarts: same identity, no bindings.
    let now = net.now;
    net.nodes[3].1 =
        Node::Relay(Box::new(Router::new(relay_cfg(&control, 12), WallClock::new(now, T0_UNIX * 1_000_000), now)));
    let mut first = (None, None);
    for tick in 0..100u32 {
        let now = net.now;
        net.endpoint(0).send(now, &to_b, &tick.to_be_bytes()).unwrap();
        net.endpoint(1).send(now, &to_a, &tick.to_be_bytes()).unwrap();
        net.drain(0);
        net.drain(1);
        net.run(Duration::from_millis(10));
        if first.0.is_none() && !net.received(addr(2)).is_empty() {
            first.0 = Some(tick);
        }
        if first.1.is_none() && !net.received(addr(1)).is_empty() {
            first.1 = Some(tick);
        }
    }
    // The notices make R1 and B bind again at once: far sooner than the 20 s keepalive.
    let (to_b_resumed, to_a_resumed) = (first.0.expect("A → B never resumed"), first.1.expect("B → A never resumed"));
    assert!(to_b_resumed <= 10 && to_a_resumed <= 10, "resumed after {first:?} ticks of 10 ms");
}

#[test]
fn a_node_that_stops_unbinds_from_every_relay_it_is_bound_to() {
    let (mut net, _control, a, b) = topology();
    let now = net.now;
    net.endpoint(0).add_relay(now, addr(12));
    net.run(Duration::from_millis(50));
    let (r1, r2) = (net.relay(2).id(), net.relay(3).id());
    assert_eq!(net.relay(3).lookup(a.node_id()), Some(addr(1)));
    let unbinds = net.endpoint(0).unbind_all();
    assert_eq!(unbinds.iter().map(|t| t.to).collect::<Vec<_>>(), vec![addr(11), addr(12)]);
    let rejected = net.endpoint(0).counters();
    for t in unbinds {
        net.send(addr(1), t);
    }
    net.run(Duration::from_millis(5));
    for relay in [2, 3] {
        assert_eq!(net.relay(relay).lookup(a.node_id()), None);
        assert_eq!(net.relay(relay).counters().unbinds, 1);
    }
    // The acks reached A and changed nothing there.
    assert_eq!(net.endpoint(0).counters(), rejected);
    // B's datagrams for A now stop at R1, which no longer knows where A is.
    let env = Envelope {
        destination: a.node_id(),
        path: Path::Relayed(Route::new(&[r2, r1]).unwrap()),
        vc: VcId(1),
        trace: false,
    };
    let now = net.now;
    net.endpoint(1).send(now, &env, b"still there?").unwrap();
    net.drain(1);
    net.run(Duration::from_millis(5));
    assert!(net.received(addr(1)).is_empty());
    assert_eq!(net.relay(2).counters().drops(DropReason::UnknownNextHop), 1);
    // B, still bound, is untouched.
    assert_eq!(net.relay(3).lookup(b.node_id()), Some(addr(2)));
}

#[test]
fn a_vanished_node_is_dropped_once_idle_and_a_silent_live_one_stays() {
    let (mut net, _control, a, b) = topology();
    // B disappears without a word: its datagrams stop, and nothing reaches it any more.
    net.nodes.remove(1);
    // A sends nothing either, but keeps binding (its keepalives).
    net.run_by(IDLE_EXPIRY + Duration::from_secs(5), Duration::from_millis(50));
    assert_eq!(net.relay(2).lookup(b.node_id()), None);
    assert_eq!(net.relay(2).counters().idle_expired, 1);
    assert_eq!(net.relay(1).lookup(a.node_id()), Some(addr(1)));
    assert_eq!(net.relay(1).counters().idle_expired, 0);
    // The relays keep each other: they bind to each other on their own keepalives.
    let r2 = net.relay(2).id();
    assert!(net.relay(1).lookup(r2).is_some());
}
