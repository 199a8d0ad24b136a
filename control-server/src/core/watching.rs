//! Relay fan-out, the control server's side: the watch set's events become grants (a
//! subscription signed for the publisher's relay, and the key that seals its stream) and
//! withdrawals; grants are renewed before their subscriptions lapse and re-sent when the
//! publisher changes its key; each publisher learns how many watch it and where to publish.
//!
//! A publisher publishes to the registered relay it measured nearest (the first configured
//! one while it has measured none). A watcher takes the stream at that relay, or, when the
//! relay map says it is clearly faster, at a second relay near the watcher which the
//! publisher's relay feeds: the control server signs that relay a subscription at the
//! publisher's relay (a feed), so the stream crosses the link between them once for all the
//! watchers behind it.

use rustc_hash::FxHashMap;
use shoal_protocol::control::{ControlToClient, ControlToRelay, RelayInfo, WatchGrant};
use shoal_protocol::subscription::AVATAR_STREAM;
use shoal_protocol::{NodeId, SubscriptionBody, UnixTime};

use super::{Core, Output};
use crate::watch::WatchEvent;

/// A grant in force: the relay its subscription names and when that lapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Grant {
    pub(super) relay: NodeId,
    pub(super) expires: UnixTime,
}

/// A feed in force: the relay that feeds the group, when the subscription lapses, and the
/// fed relay's control connection it was sent on (a relay that connects again is fed again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Feed {
    upstream: NodeId,
    expires: UnixTime,
    conn: super::ConnId,
}

/// Where a watcher takes a stream: the relay it subscribes at, and the relay that feeds that
/// one when it is not the publisher's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WatchRoute {
    pub(super) relay: RelayInfo,
    pub(super) upstream: Option<NodeId>,
}

/// A route through a second relay: its round trip (the relays' own plus the watcher's to the
/// second), the second relay and its address.
type Chain = (u32, NodeId, std::net::SocketAddr);

/// How much faster another path must be before it replaces the one in use: a fifth of the
/// round trip, or 2 ms.
fn margin(rtt_us: u32) -> u32 {
    (rtt_us / 5).max(2_000)
}

/// A publisher's rank of a relay: splitmix64 of their ids, lowest first.
fn rank(publisher: NodeId, relay: NodeId) -> u64 {
    let mut z = u64::from_be_bytes(publisher.0) ^ u64::from_be_bytes(relay.0).rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Core {
    /// Where `publisher` publishes: its nearest relay, a registered one first (as for
    /// introductions, a configured relay that has not registered is still offered when no
    /// other is). Relays about as near as the nearest (within a fifth of its round trip, or
    /// 2 ms) share the publishers: the one it publishes through stays while it is among them,
    /// otherwise each publisher takes the one its id ranks first (rendezvous hashing), so that
    /// relays in one place carry even loads without any count to keep.
    fn publish_relay(&self, publisher: NodeId) -> Option<RelayInfo> {
        let p = self.signed_in(publisher)?;
        let rtt = |id: &NodeId| p.relay_rtts.get(id).copied().unwrap_or(u32::MAX);
        let (best_unregistered, best_rtt) = self.relays.iter().map(|(id, r)| (r.conn.is_none(), rtt(id))).min()?;
        let current = self.audiences.get(&publisher).and_then(|&(_, r)| r);
        let info = |(&id, r): (&NodeId, &super::RelayEntry)| RelayInfo { id, addr: r.addr, rtt_us: rtt(&id) };
        let near = |id: &NodeId, r: &super::RelayEntry| {
            r.conn.is_none() == best_unregistered && rtt(id) <= best_rtt.saturating_add(margin(best_rtt))
        };
        if let Some(cur) = current.and_then(|c| self.relays.get_key_value(&c)).filter(|(id, r)| near(id, r)) {
            return Some(info(cur));
        }
        self.relays.iter().filter(|(id, r)| near(id, r)).min_by_key(|(id, _)| rank(publisher, **id)).map(info)
    }

    /// Where `watcher` takes the stream `publisher` publishes at `via`: there, or at a second
    /// registered relay that `via` feeds, when the relay map's round trip between the two plus
    /// the watcher's to the second beats the watcher's own to `via` by [`margin`]. The route in
    /// use stays while it is within the margin of the best.
    pub(super) fn watch_route(&self, watcher: NodeId, publisher: NodeId, via: &RelayInfo) -> WatchRoute {
        let direct_route = WatchRoute { relay: *via, upstream: None };
        let Some(w) = self.signed_in(watcher) else { return direct_route };
        let rtt = |id: &NodeId| w.relay_rtts.get(id).copied().unwrap_or(u32::MAX);
        let direct = rtt(&via.id);
        let chains = self
            .relays
            .iter()
            .filter(|(id, r)| **id != via.id && r.conn.is_some())
            .filter_map(|(id, r)| Some((self.relay_rtt(via.id, *id)?.saturating_add(rtt(id)), *id, r.addr)));
        let chained = |(_, id, addr): Chain| WatchRoute {
            relay: RelayInfo { id, addr, rtt_us: rtt(&id) },
            upstream: Some(via.id),
        };
        let current = self.grants.get(&(watcher, publisher)).map(|g| g.relay);
        // Without allocating (this runs for every watch, every tick): the fastest chain, and the
        // one through the relay in use.
        let (mut best_chain, mut kept): (Option<Chain>, Option<Chain>) = (None, None);
        for c in chains {
            if Some(c.1) == current {
                kept = Some(c);
            }
            if best_chain.is_none_or(|b| c.0 < b.0) {
                best_chain = Some(c);
            }
        }
        let best = best_chain.map_or(direct, |b| b.0.min(direct));
        match (current, kept, best_chain) {
            (Some(cur), _, _) if cur == via.id && direct <= best.saturating_add(margin(best)) => direct_route,
            (_, Some(k), _) if k.0 <= best.saturating_add(margin(best)) => chained(k),
            (_, _, Some(b)) if b.0.saturating_add(margin(direct.min(b.0))) < direct => chained(b),
            _ => direct_route,
        }
    }

    /// Signs and sends `relay` a feed of `publisher`'s stream from `upstream`, unless the one
    /// it holds has more than a third of its life left.
    fn feed(&mut self, unix: UnixTime, relay: NodeId, publisher: NodeId, upstream: NodeId) {
        let Some(conn) = self.relays.get(&relay).and_then(|r| r.conn) else { return };
        let ttl = self.cfg.subscription_ttl.as_secs();
        let fresh = |f: &Feed| f.upstream == upstream && f.conn == conn && f.expires.0 > unix.0 + ttl / 3;
        if self.feeds.get(&(relay, publisher)).is_some_and(fresh) {
            return;
        }
        let expires = UnixTime(unix.0 + ttl);
        let subscription = SubscriptionBody {
            subscriber: relay,
            publisher,
            stream: AVATAR_STREAM,
            relay: upstream,
            issued_at: unix,
            expires_at: expires,
        }
        .sign(&self.identity);
        self.feeds.insert((relay, publisher), Feed { upstream, expires, conn });
        self.counters.feeds += 1;
        let msg = ControlToRelay::Feed { subscription: subscription.encode().to_vec() };
        self.outputs.push_back(Output::SendRelay(conn, msg));
    }

    /// Signs and sends `watcher` its grant for `publisher` through `route` (feeding its relay
    /// first when the publisher's relay feeds it).
    fn grant(&mut self, unix: UnixTime, watcher: NodeId, publisher: NodeId, route: WatchRoute) {
        let relay = route.relay;
        let (Some(&conn), Some(p)) = (self.by_node.get(&watcher), self.signed_in(publisher)) else { return };
        // A player that serves no avatar has no stream to watch: nothing is signed for it
        // until it gives a key (the next renewal pass grants it then).
        let Some(stream_key) = p.stream_key else { return };
        let ttl = self.cfg.subscription_ttl.as_secs();
        let relay_id = relay.id;
        let expires = UnixTime(unix.0 + ttl);
        let subscription = SubscriptionBody {
            subscriber: watcher,
            publisher,
            stream: AVATAR_STREAM,
            relay: relay_id,
            issued_at: unix,
            expires_at: expires,
        }
        .sign(&self.identity);
        let grant = WatchGrant {
            publisher,
            publisher_key: p.key,
            relay,
            subscription: subscription.encode().to_vec(),
            stream_key: Some(stream_key),
        };
        if let Some(upstream) = route.upstream {
            self.feed(unix, relay_id, publisher, upstream);
            self.counters.chained_grants += 1;
        }
        self.grants.insert((watcher, publisher), Grant { relay: relay_id, expires });
        self.counters.watch_grants += 1;
        self.outputs.push_back(Output::Send(conn, ControlToClient::Watch(Box::new(grant))));
    }

    /// Tells `publisher` its audience (and where to publish) if either changed.
    fn tell_audience(&mut self, publisher: NodeId) {
        let Some(w) = &self.watchers else { return };
        let watchers = u32::try_from(w.audience(publisher)).unwrap_or(u32::MAX);
        let relay = if watchers > 0 { self.publish_relay(publisher) } else { None };
        let told = (watchers, relay.as_ref().map(|r| r.id));
        if self.audiences.get(&publisher) == Some(&told) || (watchers == 0 && !self.audiences.contains_key(&publisher))
        {
            return;
        }
        if watchers == 0 {
            self.audiences.remove(&publisher);
        } else {
            self.audiences.insert(publisher, told);
        }
        if let Some(&conn) = self.by_node.get(&publisher) {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Audience { watchers, relay }));
        }
    }

    /// Turns the watch set's events into grants, withdrawals and audience updates.
    pub(super) fn drain_watch(&mut self, unix: UnixTime) {
        let mut publishers = Vec::new();
        while let Some(e) = self.watchers.as_mut().and_then(crate::watch::Watchers::poll_event) {
            match e {
                WatchEvent::Watch { watcher, publisher } => {
                    match self.publish_relay(publisher) {
                        Some(via) => self.grant(unix, watcher, publisher, self.watch_route(watcher, publisher, &via)),
                        None => self.counters.watch_no_relay += 1,
                    }
                    publishers.push(publisher);
                }
                WatchEvent::Unwatch { watcher, publisher } => {
                    self.grants.remove(&(watcher, publisher));
                    if let Some(&conn) = self.by_node.get(&watcher) {
                        self.counters.unwatches += 1;
                        self.outputs.push_back(Output::Send(conn, ControlToClient::Unwatch(publisher)));
                    }
                    publishers.push(publisher);
                }
            }
        }
        publishers.sort_unstable();
        publishers.dedup();
        for p in publishers {
            self.tell_audience(p);
        }
    }

    /// Renews grants whose subscriptions have a third of their life left, grants again at
    /// once those whose route changed (the publisher's relay, a nearer one measured or its
    /// relay gone; or a faster second relay for the watcher), grants the watch events missed
    /// for want of a relay, and renews the feeds the grants in force need (the others lapse,
    /// and their relays leave them once no member is left).
    pub(super) fn renew_grants(&mut self, unix: UnixTime) {
        let Some(w) = &self.watchers else { return };
        let before = self.cfg.subscription_ttl.as_secs() / 3;
        let mut due: Vec<(NodeId, NodeId, WatchRoute)> = Vec::new();
        let mut feeds: Vec<(NodeId, NodeId, NodeId)> = Vec::new();
        let mut players: Vec<NodeId> = self.by_node.keys().copied().collect();
        players.sort_unstable();
        let mut relay_of: FxHashMap<NodeId, Option<RelayInfo>> = FxHashMap::default();
        for &watcher in &players {
            for publisher in w.watched_by(watcher) {
                let via = relay_of.entry(publisher).or_insert_with(|| {
                    let streams = self.signed_in(publisher).is_some_and(|p| p.stream_key.is_some());
                    streams.then(|| self.publish_relay(publisher)).flatten()
                });
                // Nothing to grant yet: no relay, or no stream.
                let Some(via) = via else { continue };
                let route = self.watch_route(watcher, publisher, via);
                let stale = self
                    .grants
                    .get(&(watcher, publisher))
                    .is_none_or(|g| g.expires.0 <= unix.0 + before || g.relay != route.relay.id);
                if stale {
                    due.push((watcher, publisher, route));
                } else if let Some(upstream) = route.upstream {
                    feeds.push((route.relay.id, publisher, upstream));
                }
            }
        }
        let mut publishers = Vec::new();
        for (watcher, publisher, route) in due {
            self.grant(unix, watcher, publisher, route);
            publishers.push(publisher);
        }
        feeds.sort_unstable();
        feeds.dedup();
        for &(relay, publisher, upstream) in &feeds {
            self.feed(unix, relay, publisher, upstream);
        }
        // Feeds no grant needs any more are forgotten (a relay that needs one again is fed anew).
        let granted: rustc_hash::FxHashSet<(NodeId, NodeId)> =
            self.grants.iter().map(|(&(_, p), g)| (g.relay, p)).collect();
        self.feeds.retain(|k, _| granted.contains(k));
        publishers.sort_unstable();
        publishers.dedup();
        for p in publishers {
            self.tell_audience(p);
        }
    }

    /// `publisher` sealed its stream with a new key: its watchers get their grants again.
    pub(super) fn on_stream_key(&mut self, unix: UnixTime, publisher: NodeId) {
        let watchers: Vec<NodeId> = self
            .grants
            .iter()
            .filter(|((_, p), _)| *p == publisher)
            .map(|((w, _), _)| *w)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for watcher in watchers {
            if let Some(via) = self.publish_relay(publisher) {
                let route = self.watch_route(watcher, publisher, &via);
                self.grant(unix, watcher, publisher, route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::time::{Duration, Instant};

    use shoal_protocol::control::{ClientToControl, RelayToControl};
    use shoal_protocol::{Identity, SignedSubscription};

    use super::super::CoreConfig;
    use super::super::test_support::*;
    use super::*;
    use crate::interest::InterestConfig;
    use crate::watch::WatchConfig;

    fn grants(out: &[Output]) -> Vec<(u64, WatchGrant)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(c, ControlToClient::Watch(g)) => Some((*c, (**g).clone())),
                _ => None,
            })
            .collect()
    }

    /// Three players in a line: 0 and 1 are neighbours (max one each), 2 is 100 m off, in
    /// view of both but nobody's neighbour.
    #[test]
    fn watchers_get_signed_grants_for_the_publishers_relay_renewed_moved_and_withdrawn() {
        let (relay_id, relay2_id) = (Identity::from_seed([50; 32]), Identity::from_seed([51; 32]));
        let cfg = CoreConfig {
            relays: vec![
                RelayInfo { id: relay_id.node_id(), addr: "198.51.100.1:7000".parse().unwrap(), rtt_us: 0 },
                RelayInfo { id: relay2_id.node_id(), addr: "198.51.100.2:7000".parse().unwrap(), rtt_us: 0 },
            ],
            interest: InterestConfig { max_neighbours: 1, ..InterestConfig::default() },
            watch: Some(WatchConfig { view_radius: 150.0, leave_radius: 170.0, max_watched: 8 }),
            subscription_ttl: Duration::from_secs(60),
            max_speed: 1000.0,
            ..CoreConfig::default()
        };
        let mut c = Core::new(cfg, Identity::from_seed([99; 32]), FP).unwrap();
        let t = Instant::now();
        register(&mut c, t, 100, &relay_id);
        register(&mut c, t, 101, &relay2_id);
        let (relay, relay2) = (relay_id.node_id(), relay2_id.node_id());
        let nodes: Vec<NodeId> =
            (0..3u8).map(|i| sign_in(&mut c, t, u64::from(i) + 1, i + 10, &format!("p{i}")).node_id()).collect();
        for (i, x) in [(0u64, 0.0), (1, 10.0), (2, 100.0)] {
            c.on_message(t, UnixTime(T0), i + 1, report(1, T0 * 1000, [x, 0.0, 0.0]));
        }
        outputs(&mut c);
        c.on_message(t, UnixTime(T0), 3, ClientToControl::StreamKey([7; 32]));
        c.on_message(t, UnixTime(T0), 3, ClientToControl::RelayRtts(vec![(relay, 5_000), (relay2, 9_000)]));
        c.tick(t, UnixTime(T0));
        let mut out = outputs(&mut c);
        // 0 and 1 watch 2; 2 watches 0 and 1 (it has no neighbour: both are full), once they
        // serve avatars: nothing is granted for a player without a stream.
        assert_eq!(grants(&out).len(), 2, "{out:?}");
        for conn in [1, 2] {
            c.on_message(t, UnixTime(T0), conn, ClientToControl::StreamKey([conn as u8; 32]));
        }
        c.tick(t, UnixTime(T0));
        out.extend(outputs(&mut c));
        let g = grants(&out);
        let pairs: Vec<(u64, NodeId)> = g.iter().map(|(c, g)| (*c, g.publisher)).collect();
        for want in [(1, nodes[2]), (2, nodes[2]), (3, nodes[0]), (3, nodes[1])] {
            assert!(pairs.contains(&want), "{want:?} not in {pairs:?}");
        }
        assert_eq!(g.len(), 4);
        let (_, to0) = g.iter().find(|(c, _)| *c == 1).unwrap();
        assert_eq!((to0.relay.id, to0.stream_key), (relay, Some([7; 32])));
        let sub = SignedSubscription::decode(&to0.subscription).unwrap();
        let body = sub.verify(&c.public_key(), relay, nodes[0], UnixTime(T0 + 1)).unwrap();
        assert_eq!((body.publisher, body.stream, body.expires_at), (nodes[2], AVATAR_STREAM, UnixTime(T0 + 60)));
        // Player 2 learns it is watched by two, through the relay.
        assert!(out.iter().any(
            |o| matches!(o, Output::Send(3, ControlToClient::Audience { watchers: 2, relay: Some(r) }) if r.id == relay)
        ));
        // Forty seconds on, a third of the life is left: renewed.
        c.on_message(t, UnixTime(T0 + 40), 1, ClientToControl::Keepalive);
        c.tick(t + Duration::from_secs(1), UnixTime(T0 + 40));
        let renewed = grants(&outputs(&mut c));
        assert_eq!(renewed.len(), 4, "{renewed:?}");
        let sub = SignedSubscription::decode(&renewed[0].1.subscription).unwrap();
        assert_eq!(sub.body.expires_at, UnixTime(T0 + 100));
        // Player 2 measures a second relay nearer: its watchers are granted that one at once,
        // and it is told to publish there.
        c.on_message(t, UnixTime(T0 + 40), 3, ClientToControl::RelayRtts(vec![(relay, 9_000), (relay2, 2_000)]));
        c.tick(t + Duration::from_secs(1), UnixTime(T0 + 40));
        let out = outputs(&mut c);
        let moved = grants(&out);
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert!(moved.iter().all(|(_, g)| g.publisher == nodes[2] && g.relay.id == relay2), "{moved:?}");
        assert!(out.iter().any(|o| matches!(o, Output::Send(3, ControlToClient::Audience { watchers: 2, relay: Some(r) }) if r.id == relay2)));
        // Player 2 walks out of view: the watches of it end, and it stops publishing.
        c.on_message(t + Duration::from_secs(2), UnixTime(T0 + 41), 3, report(2, (T0 + 41) * 1000, [300.0, 0.0, 0.0]));
        c.tick(t + Duration::from_secs(2), UnixTime(T0 + 41));
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Send(1, ControlToClient::Unwatch(nodes[2]))), "{out:?}");
        assert!(out.contains(&Output::Send(2, ControlToClient::Unwatch(nodes[2]))), "{out:?}");
        assert!(out.contains(&Output::Send(3, ControlToClient::Audience { watchers: 0, relay: None })), "{out:?}");
    }

    /// Two registered relays about as near as each other to everyone: publishers share them,
    /// each keeps its relay while it stays about as near, and moves when another is clearly
    /// nearer.
    #[test]
    fn publishers_share_equally_near_relays_and_keep_theirs() {
        let (ra, rb) = (Identity::from_seed([50; 32]), Identity::from_seed([51; 32]));
        let mut c = relay_core(&[&ra, &rb]);
        let t = Instant::now();
        register(&mut c, t, 100, &ra);
        register(&mut c, t, 101, &rb);
        let (a, b) = (ra.node_id(), rb.node_id());
        let players: Vec<NodeId> =
            (0..16u8).map(|i| sign_in(&mut c, t, u64::from(i) + 1, i + 10, &format!("p{i}")).node_id()).collect();
        for conn in 1..=16 {
            c.on_message(t, UnixTime(T0), conn, ClientToControl::RelayRtts(vec![(a, 20_000), (b, 21_000)]));
        }
        let chosen: Vec<NodeId> = players.iter().map(|&p| c.publish_relay(p).unwrap().id).collect();
        let on_a = chosen.iter().filter(|&&r| r == a).count();
        assert!((4..=12).contains(&on_a), "{on_a} of 16 on one relay");
        // Player 0 publishes through its choice; the other relay turning 3 ms nearer (within a
        // fifth of the round trip) does not move it, 10 ms nearer does.
        let (mine, other) = if chosen[0] == a { (a, b) } else { (b, a) };
        c.audiences.insert(players[0], (1, Some(mine)));
        c.on_message(t, UnixTime(T0), 1, ClientToControl::RelayRtts(vec![(mine, 20_000), (other, 17_000)]));
        assert_eq!(c.publish_relay(players[0]).unwrap().id, mine);
        c.on_message(t, UnixTime(T0), 1, ClientToControl::RelayRtts(vec![(mine, 20_000), (other, 10_000)]));
        assert_eq!(c.publish_relay(players[0]).unwrap().id, other);
    }

    /// The publisher is near relay A, two watchers are near relay B, and A and B are 10 ms
    /// apart: the watchers are granted B, and B is fed the stream from A once for both, renewed
    /// once for both. A watcher that comes near A takes the stream there again.
    #[test]
    fn watchers_near_another_relay_take_the_stream_there_fed_once_by_the_publishers_relay() {
        let (ra, rb) = (Identity::from_seed([50; 32]), Identity::from_seed([51; 32]));
        let mut c = relay_core(&[&ra, &rb]);
        let t = Instant::now();
        register(&mut c, t, 100, &ra);
        register(&mut c, t, 101, &rb);
        let (a, b) = (ra.node_id(), rb.node_id());
        c.on_relay_message(t, UnixTime(T0), 100, RelayToControl::PeerRtts(vec![(b, 10_000)]));
        let ids: Vec<NodeId> =
            (0..3u8).map(|i| sign_in(&mut c, t, u64::from(i) + 1, i + 10, &format!("p{i}")).node_id()).collect();
        let ms = |x: u32, y: u32| ClientToControl::RelayRtts(vec![(a, x * 1000), (b, y * 1000)]);
        c.on_message(t, UnixTime(T0), 1, ms(5, 60));
        for (conn, x) in [(1u64, 0.0), (2, 100.0), (3, 110.0)] {
            c.on_message(t, UnixTime(T0), conn, report(1, T0 * 1000, [x, 0.0, 0.0]));
            c.on_message(t, UnixTime(T0), conn, ClientToControl::StreamKey([conn as u8; 32]));
        }
        c.on_message(t, UnixTime(T0), 2, ms(80, 5));
        c.on_message(t, UnixTime(T0), 3, ms(80, 6));
        outputs(&mut c);
        c.tick(t, UnixTime(T0));
        let out = outputs(&mut c);
        let to_watchers: Vec<(u64, RelayInfo)> =
            grants(&out).into_iter().filter(|(_, g)| g.publisher == ids[0]).map(|(c, g)| (c, g.relay)).collect();
        assert_eq!(to_watchers.len(), 2, "{out:?}");
        assert!(to_watchers.iter().all(|(_, r)| r.id == b), "{to_watchers:?}");
        let feeds = |out: &[Output]| -> Vec<SignedSubscription> {
            out.iter()
                .filter_map(|o| match o {
                    Output::SendRelay(101, ControlToRelay::Feed { subscription }) => {
                        SignedSubscription::decode(subscription).ok()
                    }
                    _ => None,
                })
                .filter(|s| s.body.publisher == ids[0])
                .collect()
        };
        let fed = feeds(&out);
        assert_eq!(fed.len(), 1, "one feed for both watchers: {out:?}");
        let body = fed[0].verify(&c.public_key(), a, b, UnixTime(T0 + 1)).unwrap();
        assert_eq!((body.publisher, body.stream), (ids[0], AVATAR_STREAM));
        // The publisher still publishes at its own relay.
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(1, ControlToClient::Audience { relay: Some(r), .. }) if r.id == a))
        );
        // Forty seconds on: the grants and the one feed are renewed.
        c.on_message(t, UnixTime(T0 + 40), 1, ClientToControl::Keepalive);
        c.tick(t + Duration::from_secs(1), UnixTime(T0 + 40));
        let out = outputs(&mut c);
        assert_eq!(feeds(&out).len(), 1, "{out:?}");
        assert_eq!(grants(&out).iter().filter(|(_, g)| g.publisher == ids[0] && g.relay.id == b).count(), 2);
        // Watcher 2 travels near relay A: it takes the stream there, straight from A.
        c.on_message(t, UnixTime(T0 + 41), 2, ms(5, 60));
        c.tick(t + Duration::from_secs(2), UnixTime(T0 + 41));
        let out = outputs(&mut c);
        let moved: Vec<_> = grants(&out).into_iter().filter(|(_, g)| g.publisher == ids[0]).collect();
        assert_eq!(moved.len(), 1, "{out:?}");
        assert_eq!((moved[0].0, moved[0].1.relay.id), (2, a));
        assert!(feeds(&out).is_empty());
        // (Player 0 watches the other two through relay A, which B feeds, the same way.)
        assert_eq!((c.counters().chained_grants, c.counters().feeds), (8, 6), "{:?}", c.counters());
    }
}
