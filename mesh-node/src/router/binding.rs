//! The bind handshake at the relay: stateless challenges, proofs checked against the control
//! server's permits, unbinds, and this relay's own binds to its peer relays.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use shoal_protocol::{NodeId, Roles, SignedTicket, TicketError, TicketKind, UnixTime};

use super::{Binding, COOKIE_LIFETIME_SECS, Router, RouterEvent, UnbindRefusal, Verdict};
use crate::metrics::DropReason;
use crate::wire::{
    self, BindAck, BindProof, BindRefusal, COOKIE_LEN, Challenge, Datagram, Kind, Notice, NoticeCode, VcId,
};

impl Router {
    pub(super) fn cookie(&self, from: SocketAddr, node: NodeId, issued_at: u64) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.cookie_key);
        match from {
            SocketAddr::V4(a) => ctx.update(&a.ip().octets()),
            SocketAddr::V6(a) => ctx.update(&a.ip().octets()),
        }
        ctx.update(&from.port().to_be_bytes());
        ctx.update(&node.0);
        ctx.update(&issued_at.to_be_bytes());
        let mut c = [0; COOKIE_LEN];
        c.copy_from_slice(&ctx.sign().as_ref()[..COOKIE_LEN]);
        c
    }

    /// Answers a bind request with a stateless challenge of the same size.
    pub(super) fn challenge(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let node = d.source();
        let issued_at = self.clock.unix_secs(now);
        let mut body = [0; wire::CHALLENGE_BODY_LEN];
        Challenge { issued_at, cookie: self.cookie(from, node, issued_at) }.write(&mut body);
        self.write_reply(buf, Kind::BindChallenge, node, VcId(0), &body)
    }

    /// Handles a bind proof: on success binds the sender's address and answers with an ack.
    pub(super) fn accept_proof(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let node = d.source();
        let permit = match self.check_proof(now, from, &d) {
            Ok(p) => p,
            Err(None) => return Verdict::Drop(DropReason::BindRateLimited),
            Err(Some(r)) => {
                self.counters.bind_refused(r);
                let notice = Notice { code: NoticeCode::BindRefused, refusal: Some(r) };
                return self.refuse_with(now, buf, DropReason::BindRefused, notice);
            }
        };
        let b = permit.body;
        let left = b.expires_at.0.saturating_sub(self.clock.unix_secs(now));
        let expires = now + Duration::from_secs(left);
        let challenge_at = BindProof::read(d.body()).challenge.issued_at;
        self.insert_binding(from, Binding { node, roles: b.roles, expires, challenge_at, heard: now });
        self.counters.binds_accepted += 1;
        let expires_at = b.expires_at.0;
        self.events.push_back(RouterEvent::Bound { node, roles: b.roles, addr: from, expires_at, challenge_at });
        // A relay that binds to us expects to be bound to in turn, so that we forward to it.
        if b.roles.contains(Roles::RELAY) && self.peer_owner {
            self.add_peer(from, now);
        }
        let mut body = [0; wire::BIND_ACK_BODY_LEN];
        BindAck { expires_at: b.expires_at.0, observed: from }.write(&mut body);
        self.write_reply(buf, Kind::BindAck, node, VcId(0), &body)
    }

    /// Every check on a bind proof, cheapest first: cookie, the signature budget (`Err(None)`
    /// when spent), permit and proof signatures, and room in the binding table.
    pub(super) fn check_proof(
        &mut self,
        now: Instant,
        from: SocketAddr,
        d: &Datagram<'_>,
    ) -> Result<shoal_protocol::VerifiedTicket, Option<BindRefusal>> {
        let node = d.source();
        let proof = BindProof::read(d.body());
        let now_secs = self.clock.unix_secs(now);
        let c = proof.challenge;
        let fresh = c.issued_at <= now_secs && now_secs - c.issued_at <= COOKIE_LIFETIME_SECS;
        if d.destination() != self.id || !fresh || self.cookie(from, node, c.issued_at) != c.cookie {
            return Err(Some(BindRefusal::BadCookie));
        }
        if !self.bind_bucket.take(&self.cfg.bind_verifications, now, 1.0) {
            return Err(None);
        }
        let permit = self.verify_proof(&proof, node, now_secs).map_err(Some)?;
        let known = self.by_node.contains_key(&node) || self.by_addr.get(&from).is_some_and(|old| old.node == node);
        if !known && self.by_addr.len() >= self.cfg.max_bindings {
            return Err(Some(BindRefusal::Full));
        }
        Ok(permit)
    }

    /// Handles an unbind: on success drops the binding and answers with a flagged ack, smaller
    /// than the unbind; a refusal is counted and not answered.
    pub(super) fn release(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        let node = d.source();
        let challenge_at = match self.check_unbind(now, from, &d) {
            Ok(at) => at,
            Err(None) => return Verdict::Drop(DropReason::BindRateLimited),
            Err(Some(r)) => {
                self.counters.unbind_refused(r);
                return Verdict::Drop(DropReason::UnbindRefused);
            }
        };
        self.remove_binding(from);
        self.counters.unbinds += 1;
        self.events.push_back(RouterEvent::Unbound { node, addr: from, challenge_at });
        let mut body = [0; wire::BIND_ACK_BODY_LEN];
        BindAck { expires_at: 0, observed: from }.write(&mut body);
        let verdict = self.write_reply(buf, Kind::BindAck, node, VcId(0), &body);
        if let Verdict::Reply(n) = verdict {
            wire::set_unbind(&mut buf[..n]);
        }
        verdict
    }

    /// Every check on an unbind, cheapest first: a binding of this node at this address, the
    /// challenge of its latest bind with a cookie this relay made, the signature budget
    /// (`Err(None)` when spent), the permit and the node's signature under the unbind context.
    /// Returns the released binding's challenge time.
    pub(super) fn check_unbind(
        &mut self,
        now: Instant,
        from: SocketAddr,
        d: &Datagram<'_>,
    ) -> Result<u64, Option<UnbindRefusal>> {
        let node = d.source();
        let proof = BindProof::read(d.body());
        let c = proof.challenge;
        let Some(b) = self.by_addr.get(&from).copied() else { return Err(Some(UnbindRefusal::NotBound)) };
        if b.node != node || d.destination() != self.id {
            return Err(Some(UnbindRefusal::NotBound));
        }
        if b.challenge_at != c.issued_at || self.cookie(from, node, c.issued_at) != c.cookie {
            return Err(Some(UnbindRefusal::StaleChallenge));
        }
        if !self.bind_bucket.take(&self.cfg.bind_verifications, now, 1.0) {
            return Err(None);
        }
        let ticket = SignedTicket::decode(proof.permit).map_err(|_| Some(UnbindRefusal::BadPermit))?;
        if ticket.body.node_id != node {
            return Err(Some(UnbindRefusal::BadPermit));
        }
        let now_secs = UnixTime(self.clock.unix_secs(now));
        let verified = ticket
            .verify(&self.cfg.control_key, TicketKind::RelayPermit, Roles::default(), now_secs)
            .map_err(|_| Some(UnbindRefusal::BadPermit))?;
        let msg = wire::bind_proof_message(self.id, &c);
        verified
            .body
            .public_key
            .verify(wire::UNBIND_CONTEXT, &msg, &proof.signature)
            .map_err(|_| Some(UnbindRefusal::BadProof))?;
        Ok(b.challenge_at)
    }

    /// Forgets the binding at `addr`, and its node's address if it is this one.
    pub(super) fn remove_binding(&mut self, addr: SocketAddr) {
        if let Some(b) = self.by_addr.remove(&addr)
            && self.by_node.get(&b.node) == Some(&addr)
        {
            self.by_node.remove(&b.node);
        }
    }

    pub(super) fn verify_proof(
        &self,
        proof: &BindProof<'_>,
        node: NodeId,
        now_secs: u64,
    ) -> Result<shoal_protocol::VerifiedTicket, BindRefusal> {
        let ticket = SignedTicket::decode(proof.permit).map_err(|_| BindRefusal::MalformedPermit)?;
        if ticket.body.node_id != node {
            return Err(BindRefusal::WrongNode);
        }
        let verified = ticket
            .verify(&self.cfg.control_key, TicketKind::RelayPermit, Roles::default(), UnixTime(now_secs))
            .map_err(|e| match e {
                TicketError::Expired { .. } | TicketError::NotYetValid { .. } => BindRefusal::ExpiredPermit,
                TicketError::WrongKind { .. } | TicketError::WrongRole { .. } => BindRefusal::WrongRole,
                TicketError::BadSignature => BindRefusal::ForgedPermit,
                _ => BindRefusal::MalformedPermit,
            })?;
        let msg = wire::bind_proof_message(self.id, &proof.challenge);
        verified
            .body
            .public_key
            .verify(wire::BIND_CONTEXT, &msg, &proof.signature)
            .map_err(|_| BindRefusal::BadProof)?;
        Ok(verified)
    }

    pub(super) fn insert_binding(&mut self, addr: SocketAddr, binding: Binding) {
        // A node that moved: forget its old address.
        if let Some(old) = self.by_node.insert(binding.node, addr)
            && old != addr
        {
            self.by_addr.remove(&old);
        }
        if let Some(prev) = self.by_addr.insert(addr, binding)
            && prev.node != binding.node
            && self.by_node.get(&prev.node) == Some(&addr)
        {
            self.by_node.remove(&prev.node);
        }
    }

    /// Relays never forward notices, but a peer relay saying it lost our binding (it
    /// restarted) makes us bind to it again at once.
    pub(super) fn peer_notice(&mut self, now: Instant, from: SocketAddr, buf: &[u8]) -> Verdict {
        let notice = Datagram::parse(buf).ok().and_then(|d| Notice::read(d.body()).ok());
        if let Some(Notice { code: NoticeCode::NotBound | NoticeCode::PermitExpired, .. }) = notice
            && let Some(peer) = self.peers.iter_mut().find(|p| p.relay() == from && p.is_bound())
        {
            peer.restart(now);
        }
        Verdict::Drop(DropReason::NoticeReceived)
    }

    /// A challenge or ack from a peer relay we are binding to. Relays never unbind, so an
    /// unbind's ack is unsolicited.
    pub(super) fn peer_bind_reply(&mut self, now: Instant, from: SocketAddr, buf: &mut [u8]) -> Verdict {
        let Ok(d) = Datagram::parse(buf) else { return Verdict::Drop(DropReason::Internal) };
        if d.unbind() {
            return Verdict::Drop(DropReason::UnsolicitedBindReply);
        }
        let Some(peer) = self.peers.iter_mut().find(|p| p.relay() == from) else {
            return Verdict::Drop(DropReason::UnsolicitedBindReply);
        };
        let was_bound = peer.is_bound();
        let Some(permit) = &self.cfg.permit else { return Verdict::Drop(DropReason::UnsolicitedBindReply) };
        if let Some(t) = peer.handle_datagram(now, &self.clock, &d, &self.cfg.identity, permit) {
            self.transmits.push_back(t);
        }
        if !was_bound
            && peer.is_bound()
            && let Some(id) = peer.relay_id()
        {
            self.events.push_back(RouterEvent::PeerBound { addr: from, peer: id });
            self.feed_peer_bound(now, id);
        }
        Verdict::Consumed
    }
}
