//! Relay fan-out, the control server's side: the watch set's events become grants (a
//! subscription signed for the publisher's relay, and the key that seals its stream) and
//! withdrawals; grants are renewed before their subscriptions lapse and re-sent when the
//! publisher changes its key; each publisher learns how many watch it and where to publish.
//!
//! A publisher publishes to the registered relay it measured nearest (the first configured
//! one while it has measured none); its watchers bind to that relay.

use rustc_hash::FxHashMap;
use shoal_protocol::control::{ControlToClient, RelayInfo, WatchGrant};
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
        let near = |id: &NodeId, r: &super::RelayEntry| {
            r.conn.is_none() == best_unregistered && rtt(id) <= best_rtt.saturating_add((best_rtt / 5).max(2_000))
        };
        let current = self.audiences.get(&publisher).and_then(|&(_, r)| r);
        let info = |(&id, r): (&NodeId, &super::RelayEntry)| RelayInfo { id, addr: r.addr, rtt_us: rtt(&id) };
        if let Some(cur) = current.and_then(|c| self.relays.get_key_value(&c)).filter(|(id, r)| near(id, r)) {
            return Some(info(cur));
        }
        self.relays.iter().filter(|(id, r)| near(id, r)).min_by_key(|(id, _)| rank(publisher, **id)).map(info)
    }

    /// Signs and sends `watcher` its grant for `publisher` through `relay`.
    fn grant(&mut self, unix: UnixTime, watcher: NodeId, publisher: NodeId, relay: RelayInfo) {
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
                        Some(relay) => self.grant(unix, watcher, publisher, relay),
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
    /// once those whose publisher now publishes to another relay (a nearer one measured, or
    /// its relay gone), and grants the watch events missed for want of a relay.
    pub(super) fn renew_grants(&mut self, unix: UnixTime) {
        let Some(w) = &self.watchers else { return };
        let before = self.cfg.subscription_ttl.as_secs() / 3;
        let mut due: Vec<(NodeId, NodeId)> = Vec::new();
        let mut players: Vec<NodeId> = self.by_node.keys().copied().collect();
        players.sort_unstable();
        let mut relay_of: FxHashMap<NodeId, Option<NodeId>> = FxHashMap::default();
        for &watcher in &players {
            for publisher in w.watched_by(watcher) {
                let relay = *relay_of.entry(publisher).or_insert_with(|| {
                    let streams = self.signed_in(publisher).is_some_and(|p| p.stream_key.is_some());
                    streams.then(|| self.publish_relay(publisher).map(|r| r.id)).flatten()
                });
                // Nothing to grant yet: no relay, or no stream.
                if relay.is_none() {
                    continue;
                }
                let stale = self
                    .grants
                    .get(&(watcher, publisher))
                    .is_none_or(|g| g.expires.0 <= unix.0 + before || Some(g.relay) != relay);
                if stale {
                    due.push((watcher, publisher));
                }
            }
        }
        let mut publishers = Vec::new();
        for (watcher, publisher) in due {
            if let Some(relay) = self.publish_relay(publisher) {
                self.grant(unix, watcher, publisher, relay);
                publishers.push(publisher);
            }
        }
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
            if let Some(relay) = self.publish_relay(publisher) {
                self.grant(unix, watcher, publisher, relay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::time::{Duration, Instant};

    use shoal_protocol::control::ClientToControl;
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
}
