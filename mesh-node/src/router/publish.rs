//! Fan-out at the relay: a publisher's datagram copied to its group's members, and the
//! subscriptions that make members. Copies another relay feeds here are in [`super::feed`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_protocol::{Group, NodeId, Roles, SignedSubscription, StreamId, SubscriptionError, UnixTime};

use super::{Hot, ParseErrorKind, Router, RouterEvent, TokenBucket, Verdict};
use crate::metrics::DropReason;
use crate::wire::{
    self, Datagram, Kind, MAX_STREAM, NoticeCode, SUBSCRIBE_ACK_BODY_LEN, SubscribeAck, SubscribeStatus, VcId,
};

impl Router {
    /// A publisher's datagram for its group here: the publisher's binding checked as for data,
    /// every copy charged to its rate limit, then stamped once for all the copies.
    pub(super) fn fan_out(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8], d: Hot, stream: VcId) -> Verdict {
        let Some(binding) = self.by_addr.get_mut(&from) else {
            return self.refuse(now, buf, DropReason::NotBound, NoticeCode::NotBound);
        };
        if binding.expires <= now {
            return self.refuse(now, buf, DropReason::PermitExpired, NoticeCode::PermitExpired);
        }
        binding.heard = now;
        let (node, roles) = (binding.node, binding.roles);
        if roles.contains(Roles::RELAY) {
            return self.fan_out_fed(now, buf, d, stream, node);
        }
        if d.source != node || d.hop != 0 {
            return Verdict::Drop(DropReason::SourceMismatch);
        }
        // A publish names this relay as its only hop and as its destination (so that one
        // buffer serves every member).
        if d.route_len != 1 || !d.on_route || d.next_hop != self.id {
            return Verdict::Drop(DropReason::NotOnRoute);
        }
        if stream.0 > MAX_STREAM {
            return Verdict::Drop(DropReason::Malformed(ParseErrorKind::Field));
        }
        let group = Group { publisher: d.source, stream: StreamId(stream.0 as u16) };
        let copies = self.groups.members(now, &group).len();
        if copies == 0 {
            return Verdict::Drop(DropReason::NoGroup);
        }
        if !self.charge_copies(now, d.source, copies, buf.len()) {
            return Verdict::Drop(DropReason::RateLimited);
        }
        self.counters.published += 1;
        wire::stamp_and_advance(buf, self.tag, self.clock.stamp_us(now));
        Verdict::FanOut(group)
    }

    /// Charges `copies` of a `len`-byte datagram to `publisher`'s rate limit; whether it had
    /// room (the copies not sent are counted when it had not).
    pub(super) fn charge_copies(&mut self, now: Instant, publisher: NodeId, copies: usize, len: usize) -> bool {
        let (pr, br) = (self.cfg.source_packets, self.cfg.source_bytes);
        let (packets, bytes) =
            self.buckets.entry(publisher).or_insert_with(|| (TokenBucket::new(&pr, now), TokenBucket::new(&br, now)));
        let n = copies as f64;
        if !packets.take(&pr, now, n) || !bytes.take(&br, now, len as f64 * n) {
            self.counters.copies_rate_limited += copies as u64;
            return false;
        }
        true
    }

    /// A node presents a subscription (or leaves a group): answered with its status, in a
    /// reply smaller than the request. Refusals are counted, and answered within the notice
    /// budget.
    pub(super) fn subscribe(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let (node, leave) = (d.source(), d.unbind());
        let decoded = SignedSubscription::decode(d.body());
        let (publisher, stream) = decoded.map_or((NodeId([0; 8]), 0), |s| (s.body.publisher, s.body.stream.0));
        let status = match self.check_subscription(now, from, node, decoded, leave) {
            Ok(s) => s,
            Err(None) => return Verdict::Drop(DropReason::BindRateLimited),
            Err(Some(s)) => s,
        };
        self.counters.subscribe_answered(status);
        let refused = !matches!(status, SubscribeStatus::Member | SubscribeStatus::Left);
        if refused && !self.notice_bucket.take(&self.cfg.notices, now, 1.0) {
            return Verdict::Drop(DropReason::SubscribeRefused);
        }
        let mut body = [0; SUBSCRIBE_ACK_BODY_LEN];
        SubscribeAck { status, stream, publisher }.write(&mut body);
        match self.write_reply(buf, Kind::SubscribeAck, node, VcId(0), &body) {
            Verdict::Reply(n) if refused => Verdict::DropWithNotice(DropReason::SubscribeRefused, n),
            v => v,
        }
    }

    /// Every check on a subscribe, cheapest first: the sender's binding, the subscription's
    /// layout, relay, subscriber and validity, the signature budget (`Err(None)` when spent),
    /// the signature; then the group's room. A leave needs no signature: it comes from the
    /// member's own binding.
    pub(super) fn check_subscription(
        &mut self,
        now: Instant,
        from: SocketAddr,
        node: NodeId,
        sub: Result<SignedSubscription, SubscriptionError>,
        leave: bool,
    ) -> Result<SubscribeStatus, Option<SubscribeStatus>> {
        let bound = self.by_addr.get(&from).is_some_and(|b| b.node == node && b.expires > now);
        if !bound {
            return Err(Some(SubscribeStatus::NotBound));
        }
        let sub = sub.map_err(|_| Some(SubscribeStatus::Forged))?;
        let b = sub.body;
        let now_secs = self.clock.unix_secs(now);
        if b.relay != self.id {
            return Err(Some(SubscribeStatus::WrongRelay));
        }
        if b.subscriber != node {
            return Err(Some(SubscribeStatus::WrongSubscriber));
        }
        if leave {
            if self.groups.leave(b.group(), node) {
                self.events.push_back(RouterEvent::Left { group: b.group(), node });
            }
            return Ok(SubscribeStatus::Left);
        }
        if now_secs >= b.expires_at.0 {
            return Err(Some(SubscribeStatus::Expired));
        }
        if !self.bind_bucket.take(&self.cfg.bind_verifications, now, 1.0) {
            return Err(None);
        }
        sub.verify(&self.cfg.control_key, self.id, node, UnixTime(now_secs)).map_err(|e| {
            Some(match e {
                SubscriptionError::Expired { .. } | SubscriptionError::NotYetValid { .. } => SubscribeStatus::Expired,
                SubscriptionError::WrongRelay { .. } => SubscribeStatus::WrongRelay,
                SubscriptionError::WrongSubscriber { .. } => SubscribeStatus::WrongSubscriber,
                _ => SubscribeStatus::Forged,
            })
        })?;
        let lapses = now + Duration::from_secs(b.expires_at.0 - now_secs);
        self.groups.join(b.group(), node, from, lapses).map_err(Some)?;
        self.feed_member_joined(now, &b.group());
        self.events.push_back(RouterEvent::Joined { group: b.group(), node, addr: from, expires_at: b.expires_at.0 });
        Ok(SubscribeStatus::Member)
    }
}
