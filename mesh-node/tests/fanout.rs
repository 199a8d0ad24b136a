//! Relay fan-out through the endpoint and relay cores in memory: a publisher's datagram goes
//! once to its relay and reaches every subscriber, and nobody else; every kind of bad
//! subscription is refused with its reason; members that leave, lapse or lose their binding
//! get no more copies; the copies count against the publisher's rate limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::{Endpoint, EndpointEvent};
use shoal_mesh::metrics::DropReason;
use shoal_mesh::router::Router;
use shoal_mesh::wire::{self, Header, Kind, Route, SubscribeAck, SubscribeStatus, VcId};
use shoal_protocol::{Identity, NodeId, Roles, SignedSubscription, StreamId, SubscriptionBody, UnixTime};

/// Long enough for copies to arrive: the relay's bundling window and the hops.
const COPIES_ARRIVE: Duration = Duration::from_millis(12);

/// The relay's index in the net, and its address.
const RELAY: usize = 0;
const RELAY_ADDR: u16 = 100;

/// A relay and `n` endpoints (publisher first), each bound to it. Endpoint `i` is at port
/// `i + 1` and node `nodes[i]`.
fn star(n: usize) -> (Net, Identity, Vec<Identity>) {
    let now = Instant::now();
    let clock = WallClock::new(now, T0_UNIX * 1_000_000);
    let control = Identity::from_seed([200; 32]);
    let mut cfg = relay_cfg(&control, 50);
    cfg.source_packets.burst = 1_000.0;
    let relay = Router::new(cfg, clock, now);
    let mut nodes = vec![(addr(RELAY_ADDR), Node::Relay(Box::new(relay)))];
    let mut ids = Vec::new();
    for i in 0..n {
        let id = Identity::from_seed([i as u8 + 1; 32]);
        let mut e = Endpoint::new(id.clone(), permit(&control, &id, Roles::CLIENT, 600), clock);
        e.add_relay(now, addr(RELAY_ADDR));
        nodes.push((addr(i as u16 + 1), Node::End(Box::new(e))));
        ids.push(id);
    }
    let mut net = Net { now, nodes, queue: VecDeque::new(), events: Vec::new() };
    net.run(Duration::from_millis(20));
    net.events.clear();
    (net, control, ids)
}

fn relay_id(net: &mut Net) -> NodeId {
    net.relay(RELAY).id()
}

fn subscription(
    control: &Identity,
    subscriber: NodeId,
    publisher: NodeId,
    relay: NodeId,
    ttl: u64,
) -> SignedSubscription {
    SubscriptionBody {
        subscriber,
        publisher,
        stream: StreamId(3),
        relay,
        issued_at: UnixTime(T0_UNIX),
        expires_at: UnixTime(T0_UNIX + ttl),
    }
    .sign(control)
}

/// Endpoint `i` presents `sub` (or leaves with it); returns the relay's answer.
fn present(net: &mut Net, i: usize, sub: &SignedSubscription, leave: bool) -> Option<SubscribeAck> {
    let now = net.now;
    net.endpoint(i + 1).subscribe(now, sub, leave).unwrap();
    net.drain(i + 1);
    net.run(Duration::from_millis(2));
    net.take_events(addr(i as u16 + 1)).into_iter().find_map(|e| match e {
        EndpointEvent::Subscription { ack, .. } => Some(ack),
        _ => None,
    })
}

/// The publisher (endpoint 0) publishes `payload` on stream 3; returns who got a copy.
fn publish(net: &mut Net, payload: &[u8]) -> Vec<usize> {
    let (now, relay) = (net.now, relay_id(net));
    net.endpoint(1).publish(now, relay, 3, true, payload).unwrap();
    net.drain(1);
    net.run(COPIES_ARRIVE);
    let mut got = Vec::new();
    for i in 0..net.nodes.len() - 1 {
        for e in net.take_events(addr(i as u16 + 1)) {
            if let EndpointEvent::Published(r) = e {
                assert_eq!((r.payload.as_slice(), r.vc.0), (payload, 3));
                assert_eq!(r.trace.map(|t| t.slots().len()), Some(1), "one hop, stamped");
                got.push(i);
            }
        }
    }
    got
}

#[test]
fn a_published_datagram_reaches_every_subscriber_and_nobody_else() {
    let (mut net, control, ids) = star(12);
    let (publisher, relay) = (ids[0].node_id(), relay_id(&mut net));
    // Ten of the eleven others subscribe; endpoint 11 does not.
    for (i, id) in ids.iter().enumerate().take(11).skip(1) {
        let ack = present(&mut net, i, &subscription(&control, id.node_id(), publisher, relay, 60), false).unwrap();
        assert_eq!(ack, SubscribeAck { status: SubscribeStatus::Member, stream: 3, publisher });
    }
    assert_eq!(net.relay(RELAY).groups(), (1, 10));
    assert_eq!(publish(&mut net, b"avatar"), (1..11).collect::<Vec<_>>());
    let c = net.relay(RELAY).counters().clone();
    assert_eq!((c.published, c.copies), (1, 10));
    // Presenting a subscription again renews it; it adds no second copy.
    present(&mut net, 1, &subscription(&control, ids[1].node_id(), publisher, relay, 120), false).unwrap();
    assert_eq!(publish(&mut net, b"again").len(), 10);
}

#[test]
fn every_bad_subscription_is_refused_with_its_reason_and_counted() {
    let (mut net, control, ids) = star(3);
    let (publisher, relay) = (ids[0].node_id(), relay_id(&mut net));
    let me = ids[1].node_id();
    let status = |net: &mut Net, sub: SignedSubscription| present(net, 1, &sub, false).map(|a| a.status);
    let forger = Identity::from_seed([66; 32]);
    assert_eq!(status(&mut net, subscription(&forger, me, publisher, relay, 60)), Some(SubscribeStatus::Forged));
    // One made for another relay, sent to this one anyway (an honest endpoint sends it to
    // the relay it names).
    let elsewhere = subscription(&control, me, publisher, NodeId([9; 8]), 60);
    let h = Header { kind: Kind::Subscribe, source: me, destination: relay, vc: VcId(0), trace: false };
    let mut buf = vec![0; wire::MAX_DATAGRAM];
    let len = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &elsewhere.encode()).unwrap();
    buf.truncate(len);
    net.queue.push_back((net.now, addr(2), addr(RELAY_ADDR), buf));
    net.run(Duration::from_millis(2));
    let acks: Vec<_> = net
        .take_events(addr(2))
        .into_iter()
        .filter_map(|e| match e {
            EndpointEvent::Subscription { ack, .. } => Some(ack.status),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![SubscribeStatus::WrongRelay]);
    // Endpoint 2's subscription, presented by endpoint 1.
    let theirs = subscription(&control, ids[2].node_id(), publisher, relay, 60);
    assert_eq!(status(&mut net, theirs), Some(SubscribeStatus::WrongSubscriber));
    // Lapsed before it was shown (the clock is 20 ms past T0, the subscription lasted 0 s).
    assert_eq!(status(&mut net, subscription(&control, me, publisher, relay, 0)), Some(SubscribeStatus::Expired));
    // Altered after signing: a longer life.
    let mut stretched = subscription(&control, me, publisher, relay, 60);
    stretched.body.expires_at = UnixTime(T0_UNIX + 100_000);
    assert_eq!(status(&mut net, stretched), Some(SubscribeStatus::Forged));
    let c = net.relay(RELAY).counters().clone();
    for (s, n) in [
        (SubscribeStatus::Forged, 2),
        (SubscribeStatus::WrongRelay, 1),
        (SubscribeStatus::WrongSubscriber, 1),
        (SubscribeStatus::Expired, 1),
        (SubscribeStatus::Member, 0),
    ] {
        assert_eq!(c.subscribes(s), n, "{s:?}");
    }
    assert_eq!(c.drops(DropReason::SubscribeRefused), 5);
    // Nobody joined: the publisher's datagram is dropped, and counted.
    assert_eq!(publish(&mut net, b"nobody"), Vec::<usize>::new());
    assert_eq!(net.relay(RELAY).counters().drops(DropReason::NoGroup), 1);
}

/// A subscription is bound to the subscriber's binding: shown from an address that holds no
/// binding of that node (a copy of the datagram replayed from elsewhere), it admits nobody.
#[test]
fn a_subscription_from_an_address_without_its_binding_admits_nobody() {
    let (mut net, control, ids) = star(2);
    let (publisher, relay) = (ids[0].node_id(), relay_id(&mut net));
    let sub = subscription(&control, ids[1].node_id(), publisher, relay, 60);
    let now = net.now;
    net.endpoint(2).subscribe(now, &sub, false).unwrap();
    let t = net.endpoint(2).poll_transmit().unwrap();
    // The same bytes, from an address no node bound.
    let stranger: SocketAddr = addr(77);
    net.queue.push_back((now, stranger, t.to, t.bytes));
    net.run(Duration::from_millis(2));
    assert_eq!(net.relay(RELAY).groups(), (0, 0));
    assert_eq!(net.relay(RELAY).counters().subscribes(SubscribeStatus::NotBound), 1);
    assert_eq!(publish(&mut net, b"x"), Vec::<usize>::new());
}

#[test]
fn members_that_leave_lapse_or_lose_their_binding_get_no_more_copies() {
    let (mut net, control, ids) = star(4);
    let (publisher, relay) = (ids[0].node_id(), relay_id(&mut net));
    let short = subscription(&control, ids[1].node_id(), publisher, relay, 2);
    let long = |i: usize| subscription(&control, ids[i].node_id(), publisher, relay, 600);
    present(&mut net, 1, &short, false).unwrap();
    present(&mut net, 2, &long(2), false).unwrap();
    present(&mut net, 3, &long(3), false).unwrap();
    assert_eq!(publish(&mut net, b"1"), vec![1, 2, 3]);
    // Endpoint 3 leaves.
    let ack = present(&mut net, 3, &long(3), true).unwrap();
    assert_eq!(ack.status, SubscribeStatus::Left);
    assert_eq!(publish(&mut net, b"2"), vec![1, 2]);
    // Endpoint 1's subscription lapses two seconds after T0.
    net.run(Duration::from_secs(2));
    assert_eq!(publish(&mut net, b"3"), vec![2]);
    // Endpoint 2 stops: it unbinds, and its membership goes with its binding.
    let from = net.nodes[3].0;
    for t in net.endpoint(3).unbind_all() {
        net.send(from, t);
    }
    net.run(Duration::from_millis(1_100));
    assert_eq!(publish(&mut net, b"4"), Vec::<usize>::new());
    assert_eq!(net.relay(RELAY).groups(), (0, 0));
}

/// Amplification is paid for: each copy takes a token of the publisher's rate limit, so a
/// publisher with many members reaches its limit that many times sooner.
#[test]
fn copies_count_against_the_publishers_rate_limit() {
    let (mut net, control, ids) = star(11);
    let (publisher, relay) = (ids[0].node_id(), relay_id(&mut net));
    for (i, id) in ids.iter().enumerate().skip(1) {
        present(&mut net, i, &subscription(&control, id.node_id(), publisher, relay, 60), false).unwrap();
    }
    // A burst of 1,000 datagrams' worth: 100 publishes of ten copies go, then none.
    let now = net.now;
    for _ in 0..120 {
        net.endpoint(1).publish(now, relay, 3, true, b"p").unwrap();
    }
    net.drain(1);
    net.run(COPIES_ARRIVE);
    let mut delivered = 0;
    for i in 1..net.nodes.len() - 1 {
        delivered +=
            net.take_events(addr(i as u16 + 1)).iter().filter(|e| matches!(e, EndpointEvent::Published(_))).count();
    }
    let c = net.relay(RELAY).counters().clone();
    assert!((1_000..=1_030).contains(&delivered), "{delivered} copies");
    assert_eq!(c.copies as usize, delivered);
    assert!(c.copies_rate_limited >= 150, "{c:?}");
    assert!(c.drops(DropReason::RateLimited) >= 15, "{c:?}");
}

/// Someone other than the publisher cannot publish to its group: the relay checks the
/// source against the sender's binding, as for every datagram it forwards.
#[test]
fn nobody_publishes_for_someone_else() {
    let (mut net, control, ids) = star(3);
    let (publisher, relay) = (ids[0].node_id(), relay_id(&mut net));
    present(&mut net, 1, &subscription(&control, ids[1].node_id(), publisher, relay, 60), false).unwrap();
    // Endpoint 2 publishes on its own stream 3: its own group, which has no members.
    let now = net.now;
    net.endpoint(3).publish(now, relay, 3, false, b"mine").unwrap();
    net.drain(3);
    net.run(COPIES_ARRIVE);
    assert!(net.take_events(addr(2)).is_empty());
    assert_eq!(net.relay(RELAY).counters().drops(DropReason::NoGroup), 1);
}

/// Copies for one member within the relay's window share one datagram; the member takes each
/// copy inside as if it had come alone, and nothing from a bundle that did not come from its
/// relay.
#[test]
fn copies_for_one_member_share_a_bundle_and_forged_bundles_give_nothing() {
    let (mut net, control, ids) = star(4);
    let relay = relay_id(&mut net);
    // Endpoint 3 watches publishers 0, 1 and 2.
    for p in 0..3 {
        let sub = subscription(&control, ids[3].node_id(), ids[p].node_id(), relay, 60);
        assert_eq!(present(&mut net, 3, &sub, false).unwrap().status, SubscribeStatus::Member);
    }
    let now = net.now;
    for p in 0..3 {
        net.endpoint(p + 1).publish(now, relay, 3, true, &[p as u8; 30]).unwrap();
        net.drain(p + 1);
    }
    // Catch what the relay sends endpoint 3, on the wire.
    net.run_by(Duration::from_millis(1), Duration::from_micros(100));
    let mut wire_datagrams = Vec::new();
    let end = net.now + COPIES_ARRIVE;
    while net.now < end {
        wire_datagrams.extend(net.queue.iter().filter(|q| q.2 == addr(4)).map(|q| q.3.clone()));
        net.run_by(Duration::from_micros(100), Duration::from_micros(100));
    }
    wire_datagrams.dedup();
    assert_eq!(wire_datagrams.len(), 1, "one datagram for three copies");
    let bundle = wire::Datagram::parse(&wire_datagrams[0]).unwrap();
    assert_eq!((bundle.kind(), bundle.source(), bundle.destination()), (Kind::Bundle, relay, ids[3].node_id()));
    let got: Vec<(NodeId, u8)> = net
        .take_events(addr(4))
        .into_iter()
        .filter_map(|e| match e {
            EndpointEvent::Published(r) => Some((r.source, r.payload[0])),
            _ => None,
        })
        .collect();
    assert_eq!(got, (0..3).map(|p| (ids[p].node_id(), p as u8)).collect::<Vec<_>>());
    let c = net.relay(RELAY).counters().clone();
    assert_eq!((c.published, c.copies, c.bundles, c.bundled_copies), (3, 3, 1, 3));
    // The same bundle replayed from another address, and one naming endpoint 1 as its relay:
    // nothing is taken. Sent to the relay by a node, it is dropped.
    let mut named = wire_datagrams[0].clone();
    named[4..12].copy_from_slice(&ids[0].node_id().0);
    for (from, bytes) in [(addr(2), wire_datagrams[0].clone()), (addr(RELAY_ADDR), named)] {
        net.queue.push_back((net.now, from, addr(4), bytes));
    }
    net.queue.push_back((net.now, addr(2), addr(RELAY_ADDR), wire_datagrams[0].clone()));
    net.run(Duration::from_millis(2));
    assert!(net.take_events(addr(4)).iter().all(|e| !matches!(e, EndpointEvent::Published(_))));
    assert_eq!(net.endpoint(4).counters().misrouted, 2);
    assert_eq!(net.relay(RELAY).counters().drops(DropReason::SourceMismatch), 1);
}
