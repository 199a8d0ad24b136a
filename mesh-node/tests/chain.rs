//! Relay chains through the endpoint and relay cores in memory: a relay fed a group by the
//! publisher's relay takes the stream once over the link between them and fans it out to its
//! own members; it takes copies only of groups it is fed, only from the relay that feeds them;
//! a feed without members is left upstream and taken up again when one joins; an upstream that
//! restarted feeds again by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::*;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::{Endpoint, EndpointEvent};
use shoal_mesh::metrics::DropReason;
use shoal_mesh::router::{FEED_IDLE, FEED_REFRESH, Router};
use shoal_mesh::wire::{self, Header, Kind, Route, SubscribeStatus, VcId};
use shoal_protocol::{
    Identity, NodeId, Roles, SignedSubscription, StreamId, SubscriptionBody, SubscriptionError, UnixTime,
};

/// Net indices: the publisher, a watcher near the publisher's relay, two watchers near the
/// second relay, then the relays.
const P: usize = 0;
const NEAR: usize = 1;
const FAR: [usize; 2] = [2, 3];
const R1: usize = 4;
const R2: usize = 5;

struct Chain {
    net: Net,
    control: Identity,
    ids: Vec<Identity>,
    r1: NodeId,
    r2: NodeId,
    clock: WallClock,
}

/// P and NEAR bound to R1, the FAR watchers to R2; the relays bound to each other.
fn chain() -> Chain {
    let now = Instant::now();
    let clock = WallClock::new(now, T0_UNIX * 1_000_000);
    let control = Identity::from_seed([200; 32]);
    let mut nodes = Vec::new();
    let mut ids = Vec::new();
    for i in 0..4u8 {
        let id = Identity::from_seed([i + 1; 32]);
        let mut e = Endpoint::new(id.clone(), permit(&control, &id, Roles::CLIENT, 600), clock);
        e.add_relay(now, addr(if i < 2 { 11 } else { 12 }));
        nodes.push((addr(u16::from(i) + 1), Node::End(Box::new(e))));
        ids.push(id);
    }
    for seed in [11u8, 12] {
        let mut cfg = relay_cfg(&control, seed);
        cfg.source_packets.burst = 1_000.0;
        nodes.push((addr(u16::from(seed)), Node::Relay(Box::new(Router::new(cfg, clock, now)))));
    }
    let mut net = Net { now, nodes, queue: VecDeque::new(), events: Vec::new() };
    net.relay(R1).add_peer(addr(12), now);
    net.run(Duration::from_millis(50));
    net.events.clear();
    let (r1, r2) = (net.relay(R1).id(), net.relay(R2).id());
    Chain { net, control, ids, r1, r2, clock }
}

impl Chain {
    fn sub(&self, subscriber: NodeId, relay: NodeId, ttl: u64) -> SignedSubscription {
        self.sub_by(&self.control, subscriber, relay, ttl)
    }

    /// A subscription `signer` made now, for `ttl` seconds.
    fn sub_by(&self, signer: &Identity, subscriber: NodeId, relay: NodeId, ttl: u64) -> SignedSubscription {
        let unix = self.clock.unix_secs(self.net.now);
        SubscriptionBody {
            subscriber,
            publisher: self.ids[P].node_id(),
            stream: StreamId(3),
            relay,
            issued_at: UnixTime(unix),
            expires_at: UnixTime(unix + ttl),
        }
        .sign(signer)
    }

    /// Endpoint `i` joins the group at `relay`.
    fn watch(&mut self, i: usize, relay: NodeId) {
        let sub = self.sub(self.ids[i].node_id(), relay, 600);
        let now = self.net.now;
        self.net.endpoint(i).subscribe(now, &sub, false).unwrap();
        self.net.drain(i);
        self.net.run(Duration::from_millis(2));
        let ack = self.net.take_events(addr(i as u16 + 1)).into_iter().find_map(|e| match e {
            EndpointEvent::Subscription { ack, .. } => Some(ack.status),
            _ => None,
        });
        assert_eq!(ack, Some(SubscribeStatus::Member));
    }

    /// The control server feeds R2 the publisher's group at R1.
    fn feed(&mut self, ttl: u64) {
        let sub = self.sub(self.r2, self.r1, ttl);
        let now = self.net.now;
        self.net.relay(R2).feed(now, sub).unwrap();
        self.net.drain(R2);
        self.net.run(Duration::from_millis(2));
    }

    /// The publisher publishes `payload` at R1; returns who got a copy, and through which
    /// relay.
    fn publish(&mut self, payload: &[u8]) -> Vec<(usize, NodeId)> {
        let (now, r1) = (self.net.now, self.r1);
        self.net.endpoint(P).publish(now, r1, 3, true, payload).unwrap();
        self.net.drain(P);
        // Each relay's bundling window, and the hops.
        self.net.run(Duration::from_millis(25));
        let mut got = Vec::new();
        for i in 0..4 {
            for e in self.net.take_events(addr(i as u16 + 1)) {
                if let EndpointEvent::Published(r) = e {
                    assert_eq!((r.source, r.payload.as_slice(), r.vc.0), (self.ids[P].node_id(), payload, 3));
                    assert_eq!(r.trace.map(|t| t.slots().len()), Some(1), "stamped by the relay it came from");
                    got.push((i, r.route.relays()[0]));
                }
            }
        }
        got
    }
}

#[test]
fn a_fed_relay_takes_the_stream_once_and_copies_it_to_its_members() {
    let mut c = chain();
    c.feed(600);
    assert_eq!(c.net.relay(R2).feeds(), 1);
    // R2 presented the feed at R1 and is a member there.
    assert_eq!(c.net.relay(R1).groups(), (1, 1));
    c.watch(NEAR, c.r1);
    for i in FAR {
        c.watch(i, c.r2);
    }
    let (r1, r2) = (c.r1, c.r2);
    for n in 0..5u8 {
        let got = c.publish(&[n; 40]);
        assert_eq!(got, vec![(NEAR, r1), (FAR[0], r2), (FAR[1], r2)]);
    }
    // Per publish, R1 made two copies (NEAR and R2), R2 took one and made two.
    let (a, b) = (c.net.relay(R1).counters().clone(), c.net.relay(R2).counters().clone());
    assert_eq!((a.published, a.copies, a.fed), (5, 10, 0));
    assert_eq!((b.published, b.fed, b.copies), (0, 5, 10));
    assert_eq!(b.feeds_refused, 0);
}

#[test]
fn copies_of_groups_not_fed_or_not_from_the_feeding_relay_are_refused() {
    let mut c = chain();
    c.watch(FAR[0], c.r2);
    let publisher = c.ids[P].node_id();
    // A copy as R1 would send it, for a group R2 is not fed.
    let copy = |source: NodeId, upstream: NodeId| {
        let h = Header { kind: Kind::Publish, source, destination: upstream, vc: VcId(3), trace: false };
        let mut buf = vec![0; 128];
        let n = wire::emit(&mut buf, &h, &Route::new(&[upstream]).unwrap(), 0, b"forged").unwrap();
        buf.truncate(n);
        wire::stamp_and_advance(&mut buf, 0, 0);
        buf
    };
    let now = c.net.now;
    let relay = c.net.relay(R2);
    let mut unfed = copy(publisher, c.r1);
    assert_eq!(relay.handle_datagram(now, addr(11), &mut unfed), shoal_mesh::router::Verdict::Drop(DropReason::NotFed));
    c.feed(600);
    let relay = c.net.relay(R2);
    // Fed now, but a copy naming another relay as the one it crossed.
    let mut elsewhere = copy(publisher, NodeId([9; 8]));
    assert_eq!(
        relay.handle_datagram(now, addr(11), &mut elsewhere),
        shoal_mesh::router::Verdict::Drop(DropReason::NotOnRoute)
    );
    // The same bytes a feed would carry, sent by a watcher rather than the feeding relay.
    let mut from_node = copy(publisher, c.r1);
    assert_eq!(
        relay.handle_datagram(now, addr(3), &mut from_node),
        shoal_mesh::router::Verdict::Drop(DropReason::SourceMismatch)
    );
    assert!(c.net.take_events(addr(3)).is_empty());
    assert_eq!(c.net.relay(R2).counters().drops(DropReason::NotFed), 1);
}

#[test]
fn a_feed_not_signed_for_this_relay_is_refused_with_its_reason() {
    let mut c = chain();
    let (r1, r2, now) = (c.r1, c.r2, c.net.now);
    let mut stretched = c.sub(r2, r1, 600);
    stretched.body.expires_at = UnixTime(stretched.body.expires_at.0 + 100_000);
    let cases = [
        (c.sub_by(&Identity::from_seed([66; 32]), r2, r1, 600), "forged"),
        (stretched, "altered"),
        (c.sub(NodeId([9; 8]), r1, 600), "another subscriber's"),
        (c.sub(r2, r2, 600), "naming itself upstream"),
        (c.sub(r2, r1, 0), "lapsed"),
    ];
    let relay = c.net.relay(R2);
    let refused: Vec<_> = cases.into_iter().map(|(sub, what)| (what, relay.feed(now, sub))).collect();
    assert!(matches!(refused[0].1, Err(SubscriptionError::BadSignature)), "{refused:?}");
    assert!(matches!(refused[1].1, Err(SubscriptionError::BadSignature)), "{refused:?}");
    assert!(matches!(refused[2].1, Err(SubscriptionError::WrongSubscriber { .. })), "{refused:?}");
    assert!(matches!(refused[3].1, Err(SubscriptionError::WrongRelay { .. })), "{refused:?}");
    assert!(matches!(refused[4].1, Err(SubscriptionError::Expired { .. })), "{refused:?}");
    assert_eq!(relay.feeds(), 0);
    assert_eq!((relay.counters().feeds_taken, relay.counters().feeds_invalid), (0, 5));
}

#[test]
fn a_feed_without_members_is_left_upstream_and_taken_up_when_one_joins() {
    let mut c = chain();
    c.feed(600);
    assert_eq!(c.net.relay(R1).groups(), (1, 1));
    c.net.run(FEED_IDLE + Duration::from_secs(2));
    assert_eq!(c.net.relay(R1).groups(), (0, 0), "R2 left the group it had no members for");
    assert_eq!(c.net.relay(R2).feeds(), 1);
    c.watch(FAR[0], c.r2);
    c.net.run(Duration::from_millis(10));
    assert_eq!(c.net.relay(R1).groups(), (1, 1));
    let r2 = c.r2;
    assert_eq!(c.publish(b"back"), vec![(FAR[0], r2)]);
    // The feed lapses with its subscription.
    c.feed(2);
    c.net.run(Duration::from_secs(3));
    assert_eq!(c.net.relay(R2).feeds(), 0);
}

#[test]
fn an_upstream_that_restarted_feeds_again_by_itself() {
    let mut c = chain();
    c.feed(600);
    c.watch(FAR[0], c.r2);
    let r2 = c.r2;
    assert_eq!(c.publish(b"before"), vec![(FAR[0], r2)]);
    // R1 restarts with nothing: no bindings, no groups. It binds to R2 again, and the
    // publisher binds to it again when its next publish is refused.
    let now = c.net.now;
    let mut cfg = relay_cfg(&c.control, 11);
    cfg.source_packets.burst = 1_000.0;
    let fresh = Router::new(cfg, c.clock, now);
    c.net.nodes[R1].1 = Node::Relay(Box::new(fresh));
    c.net.relay(R1).add_peer(addr(12), now);
    let mut delivered_at = None;
    let start = c.net.now;
    while c.net.now < start + FEED_REFRESH + Duration::from_secs(5) {
        if !c.publish(b"after").is_empty() {
            delivered_at = Some(c.net.now - start);
            break;
        }
        c.net.run(Duration::from_millis(100));
    }
    let took = delivered_at.expect("the chain never came back");
    assert!(took <= FEED_REFRESH + Duration::from_secs(1), "took {took:?}");
}

/// Publishes within one window reach the fed relay in one bundle, which it takes apart and
/// fans out copy by copy, bundled again for each of its members.
#[test]
fn a_bundle_from_the_feeding_relay_is_taken_apart_and_fanned_out() {
    let mut c = chain();
    c.feed(600);
    for i in FAR {
        c.watch(i, c.r2);
    }
    let (now, r1) = (c.net.now, c.r1);
    for n in 0..3u8 {
        c.net.endpoint(P).publish(now, r1, 3, true, &[n; 40]).unwrap();
    }
    c.net.drain(P);
    c.net.run(Duration::from_millis(25));
    for i in FAR {
        let got: Vec<u8> = c
            .net
            .take_events(addr(i as u16 + 1))
            .into_iter()
            .filter_map(|e| match e {
                EndpointEvent::Published(r) => Some(r.payload[0]),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![0, 1, 2], "watcher {i}");
    }
    let (a, b) = (c.net.relay(R1).counters().clone(), c.net.relay(R2).counters().clone());
    assert_eq!((a.copies, a.bundles, a.bundled_copies), (3, 1, 3), "R1 sent R2 one bundle of three");
    assert_eq!((b.fed, b.copies, b.bundles, b.bundled_copies), (3, 6, 2, 6));
}
