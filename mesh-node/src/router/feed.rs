//! Relay chains: a relay takes a group's stream from the publisher's relay (a *feed*) and fans
//! it out to its own members, so that the stream crosses the link between the two relays once,
//! however many watchers sit behind the second.
//!
//! The control server signs a subscription that names this relay as the subscriber and the
//! publisher's relay as the relay, and sends it over this relay's control connection
//! ([`Router::feed`]). The worker that owns peer binds presents it upstream through its peer
//! binding, as a node presents its own, until the upstream answers that this relay is a member;
//! again every [`FEED_REFRESH`] (an upstream that restarted forgot its groups without telling
//! anyone) and whenever the peer binding is made anew. Copies from the upstream for a group fed
//! here are made this relay's own in place ([`wire::adopt`]) and fanned out to the members here,
//! charged to the publisher's rate limit as its own publishes are. A fed group without members
//! here for [`FEED_IDLE`] is left upstream, and presented again when a member joins.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use shoal_protocol::{Group, NodeId, Roles, SignedSubscription, SubscriptionError, UnixTime};

use super::{Hot, ParseErrorKind, Router, Verdict};
use crate::bind::Transmit;
use crate::metrics::DropReason;
use crate::wire::{self, Datagram, Header, Kind, MAX_DATAGRAM, MAX_STREAM, Route, SubscribeAck, SubscribeStatus, VcId};

/// How often an unanswered feed is presented upstream again.
pub const FEED_RETRY: Duration = Duration::from_secs(2);
/// How often a feed the upstream holds is presented again, so that an upstream that restarted
/// (and forgot its groups) feeds again within this long.
pub const FEED_REFRESH: Duration = Duration::from_secs(10);
/// How long a fed group may have no members here before the feed is left upstream.
pub const FEED_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To be presented upstream at this time.
    Due(Instant),
    /// Presented and held upstream; presented again at this time.
    Held(Instant),
    /// Left upstream for want of members here.
    Left,
}

/// One group this relay is fed.
#[derive(Debug, Clone)]
pub(super) struct Feed {
    /// The relay that feeds it (the publisher's).
    upstream: NodeId,
    subscription: SignedSubscription,
    lapses: Instant,
    state: State,
    /// Since when the group has had no members here.
    empty_since: Option<Instant>,
}

/// Every feed of one router.
pub(super) type Feeds = FxHashMap<Group, Feed>;

impl Router {
    /// Takes a feed the control server signed: this relay (the subscriber) takes the group's
    /// stream from the relay the subscription names, and fans it out to its own members. A
    /// feed replaces the group's earlier one (leaving the earlier upstream if it was another).
    ///
    /// # Errors
    /// When the subscription is not the control server's, has lapsed, names another subscriber,
    /// or names this relay as the upstream.
    pub fn feed(&mut self, now: Instant, subscription: SignedSubscription) -> Result<(), SubscriptionError> {
        let b = subscription.body;
        let now_secs = self.clock.unix_secs(now);
        let checked = if b.relay == self.id {
            Err(SubscriptionError::WrongRelay { intended: b.relay })
        } else {
            subscription.verify(&self.cfg.control_key, b.relay, self.id, UnixTime(now_secs)).map(|_| ())
        };
        if let Err(e) = checked {
            self.counters.feeds_invalid += 1;
            return Err(e);
        }
        let lapses = now + Duration::from_secs(b.expires_at.0.saturating_sub(now_secs));
        let feed = Feed { upstream: b.relay, subscription, lapses, state: State::Due(now), empty_since: None };
        if let Some(old) = self.feeds.insert(b.group(), feed)
            && old.upstream != b.relay
            && old.state != State::Left
        {
            self.present(&old.subscription, true);
        }
        self.counters.feeds_taken += 1;
        self.feeds_next = Some(now);
        self.present_due(now);
        Ok(())
    }

    /// Groups this relay is fed.
    pub fn feeds(&self) -> usize {
        self.feeds.len()
    }

    /// A copy from the relay that feeds `d`'s group here (`upstream`, whose binding sent it):
    /// made this relay's own and fanned out to the members here.
    pub(super) fn fan_out_fed(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        d: Hot,
        stream: VcId,
        upstream: NodeId,
    ) -> Verdict {
        // The upstream's copy names the upstream as its crossed hop and its destination.
        if d.route_len != 1 || d.hop != 1 || d.next_hop != upstream {
            return Verdict::Drop(DropReason::NotOnRoute);
        }
        if stream.0 > MAX_STREAM {
            return Verdict::Drop(DropReason::Malformed(ParseErrorKind::Field));
        }
        let group = Group { publisher: d.source, stream: shoal_protocol::StreamId(stream.0 as u16) };
        if !self.feeds.get(&group).is_some_and(|f| f.upstream == upstream && f.lapses > now) {
            return Verdict::Drop(DropReason::NotFed);
        }
        let copies = self.groups.members(now, &group).len();
        if copies == 0 {
            return Verdict::Drop(DropReason::NoGroup);
        }
        if !self.charge_copies(now, d.source, copies, buf.len()) {
            return Verdict::Drop(DropReason::RateLimited);
        }
        self.counters.fed += 1;
        wire::adopt(buf, self.id, self.tag, self.clock.stamp_us(now));
        Verdict::FanOut(group)
    }

    /// A bundle of copies from a relay that feeds groups here: each taken as a copy of its own.
    pub(super) fn unbundle(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Some(b) = self.by_addr.get(&from) else { return Verdict::Drop(DropReason::NotBound) };
        if !b.roles.contains(Roles::RELAY) || b.expires <= now {
            return Verdict::Drop(DropReason::SourceMismatch);
        }
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        // Each entry is checked, adopted and fanned out in place, inside the bundle.
        let mut at = buf.len() - d.body().len();
        while at + wire::BUNDLE_ENTRY_LEN <= buf.len() {
            let len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
            let start = at + wire::BUNDLE_ENTRY_LEN;
            if start + len > buf.len() {
                self.counters.drop(DropReason::Malformed(ParseErrorKind::Truncated));
                break;
            }
            let entry = &mut buf[start..start + len];
            let verdict = match Datagram::parse(entry) {
                Ok(inner) if inner.kind() == Kind::Publish => {
                    let (hot, stream) = (Hot::read(&inner, self.id), inner.vc());
                    self.fan_out(now, from, entry, hot, stream)
                }
                Ok(_) => Verdict::Drop(DropReason::Malformed(ParseErrorKind::Unknown)),
                Err(e) => Verdict::Drop(DropReason::Malformed(ParseErrorKind::of(&e))),
            };
            match self.count(now, verdict, entry) {
                // Bundling is off here (or the copy is too large to share): each goes on its own.
                Verdict::FanOut(group) => {
                    for &to in self.groups.addrs(&group) {
                        self.transmits.push_back(Transmit { to, bytes: entry.to_vec() });
                    }
                }
                Verdict::DropWithNotice(..) | Verdict::Reply(_) | Verdict::Forward(_) => {
                    self.counters.drop(DropReason::Internal)
                }
                Verdict::Drop(_) | Verdict::Consumed => {}
            }
            at = start + len;
        }
        Verdict::Consumed
    }

    /// An upstream's answer to a feed presented there.
    pub(super) fn feed_answer(&mut self, now: Instant, from: SocketAddr, buf: &[u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        if !self.peers.iter().any(|p| p.relay() == from && p.relay_id() == Some(d.source())) {
            return Verdict::Drop(DropReason::UnsolicitedBindReply);
        }
        let Ok(ack) = SubscribeAck::read(d.body()) else { return Verdict::Drop(DropReason::UnsolicitedBindReply) };
        let group = Group { publisher: ack.publisher, stream: shoal_protocol::StreamId(ack.stream) };
        let Some(feed) = self.feeds.get_mut(&group).filter(|f| f.upstream == d.source()) else {
            return Verdict::Drop(DropReason::UnsolicitedBindReply);
        };
        match ack.status {
            SubscribeStatus::Member if matches!(feed.state, State::Due(_)) => {
                feed.state = State::Held(now + FEED_REFRESH);
            }
            SubscribeStatus::Member | SubscribeStatus::Left => {}
            // The upstream lost our binding (it restarted): bind again; the feeds follow.
            SubscribeStatus::NotBound => {
                self.counters.feeds_refused += 1;
                if let Some(p) = self.peers.iter_mut().find(|p| p.relay() == from && p.is_bound()) {
                    p.restart(now);
                }
            }
            _ => {
                self.counters.feeds_refused += 1;
                tracing::debug!(upstream = %d.source(), publisher = %ack.publisher, status = ?ack.status, "feed refused");
            }
        }
        Verdict::Consumed
    }

    /// Every second: drops lapsed feeds, leaves those without members for [`FEED_IDLE`], takes
    /// them up again when members came, and presents those due.
    pub(super) fn sweep_feeds(&mut self, now: Instant) {
        self.feeds.retain(|_, f| f.lapses > now);
        let mut leave = Vec::new();
        for (group, f) in &mut self.feeds {
            if self.groups.addrs(group).is_empty() {
                let since = *f.empty_since.get_or_insert(now);
                if f.state != State::Left && now.saturating_duration_since(since) >= FEED_IDLE {
                    f.state = State::Left;
                    leave.push(f.subscription);
                }
            } else {
                f.empty_since = None;
                if f.state == State::Left {
                    f.state = State::Due(now);
                    self.feeds_next = Some(now);
                }
            }
        }
        for s in &leave {
            self.present(s, true);
        }
        self.present_due(now);
    }

    /// A member joined `group` here: a feed left for want of members is presented again now.
    pub(super) fn feed_member_joined(&mut self, now: Instant, group: &Group) {
        if let Some(f) = self.feeds.get_mut(group) {
            f.empty_since = None;
            if f.state == State::Left {
                f.state = State::Due(now);
                self.feeds_next = Some(now);
                self.present_due(now);
            }
        }
    }

    /// Our binding to the peer relay `peer` was made anew: every feed it gives is presented
    /// again (a peer that lost our binding lost our memberships too).
    pub(super) fn feed_peer_bound(&mut self, now: Instant, peer: NodeId) {
        for f in self.feeds.values_mut().filter(|f| f.upstream == peer && f.state != State::Left) {
            f.state = State::Due(now);
        }
        self.feeds_next = Some(now);
        self.present_due(now);
    }

    /// When a feed is next due to be presented.
    pub(super) fn feeds_timeout(&self) -> Option<Instant> {
        self.feeds_next.filter(|_| self.peer_owner)
    }

    /// Presents every feed that is due to its upstream, if our binding there holds (the worker
    /// that owns peer binds does; the others only take copies).
    ///
    /// Cheap when nothing is due: the earliest time anything is (`feeds_next`) is kept, set to
    /// `now` by whatever makes a feed due at once, and found again here.
    pub(super) fn present_due(&mut self, now: Instant) {
        if !self.peer_owner || self.feeds_next.is_none_or(|t| t > now) {
            return;
        }
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for f in self.feeds.values_mut() {
            let (State::Due(t) | State::Held(t)) = f.state else { continue };
            if t <= now {
                let bound = self.peers.iter().any(|p| p.is_bound() && p.relay_id() == Some(f.upstream));
                f.state = match f.state {
                    State::Held(_) if bound => State::Held(now + FEED_REFRESH),
                    _ => State::Due(now + FEED_RETRY),
                };
                if bound {
                    due.push(f.subscription);
                }
            }
            let (State::Due(t) | State::Held(t)) = f.state else { continue };
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        self.feeds_next = next;
        for s in &due {
            self.present(s, false);
        }
    }

    /// Queues a subscribe (or, with `leave`, a leave) to the upstream the subscription names,
    /// through our peer binding there.
    fn present(&mut self, subscription: &SignedSubscription, leave: bool) {
        let upstream = subscription.body.relay;
        let Some(to) = self.peers.iter().find(|p| p.is_bound() && p.relay_id() == Some(upstream)).map(|p| p.relay())
        else {
            return;
        };
        let h = Header { kind: Kind::Subscribe, source: self.id, destination: upstream, vc: VcId(0), trace: false };
        let mut bytes = vec![0; MAX_DATAGRAM];
        let Ok(len) = wire::emit(&mut bytes, &h, &Route::DIRECT, 0, &subscription.encode()) else { return };
        bytes.truncate(len);
        if leave {
            wire::set_unbind(&mut bytes);
        }
        self.transmits.push_back(Transmit { to, bytes });
    }
}
