//! The node side of the bind handshake (request → challenge → proof → ack), shared by
//! endpoints binding to their relays and by relays binding to their peer relays.
//!
//! Sans-IO: fed `now` and the datagrams that came back from the relay, it yields datagrams to
//! send and tells when it next needs [`BindClient::handle_timeout`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_protocol::{Identity, NodeId, SignedTicket};

use crate::clock::WallClock;
use crate::wire::{
    self, BIND_PROOF_BODY_LEN, BIND_REQUEST_BODY_LEN, BindAck, BindProof, Challenge, Datagram, Header, Kind, Route,
    VcId,
};

/// First retransmission delay of an unanswered request or proof; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(4);
/// How often a bound node binds again anyway: keeps NAT mappings open and lets the relay see
/// a new address promptly.
pub const KEEPALIVE: Duration = Duration::from_secs(20);
/// A binding is renewed this long before it lapses.
const RENEW_BEFORE: Duration = Duration::from_secs(30);

/// A datagram a core wants sent. Only control traffic (binds, probes) is built this way; the
/// relay forwards in place and never allocates one of these per forwarded datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: SocketAddr,
    /// The datagram.
    pub bytes: Vec<u8>,
}

/// What the relay last granted us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The address the relay saw.
    pub observed: SocketAddr,
    /// Unix second at which the relay drops the binding.
    pub expires_at: u64,
}

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing in flight; the next handshake starts at `next_send`.
    Idle,
    /// Sending bind requests.
    Requesting,
    /// Answered a challenge; waiting for the ack.
    Proving(Challenge),
}

/// A binding counts as lost when a refresh has gone unanswered this long.
pub const LOST_AFTER: Duration = Duration::from_secs(10);

/// One node's binding to one relay. A binding stays usable while it is being refreshed; it is
/// lost when the relay says so (a notice) or stops answering for [`LOST_AFTER`].
#[derive(Debug)]
pub struct BindClient {
    relay: SocketAddr,
    relay_id: Option<NodeId>,
    phase: Phase,
    bound: Option<Bound>,
    /// When the handshake in flight started.
    started: Instant,
    next_send: Instant,
    retry: Duration,
    /// When the handshake's only request went out; `None` once it was retransmitted, so an
    /// answer cannot be matched to one send (Karn's rule).
    request_sent: Option<Instant>,
    /// Smoothed round-trip time of request to challenge.
    rtt: Option<Duration>,
}

impl BindClient {
    /// Starts binding to the relay at `relay`; the first request goes out on the next timeout.
    pub fn new(relay: SocketAddr, now: Instant) -> BindClient {
        BindClient {
            relay,
            relay_id: None,
            phase: Phase::Idle,
            bound: None,
            started: now,
            next_send: now,
            retry: FIRST_RETRY,
            request_sent: None,
            rtt: None,
        }
    }

    /// The relay's address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The relay's id, once it answered.
    pub fn relay_id(&self) -> Option<NodeId> {
        self.relay_id
    }

    /// What the relay granted, while the binding holds.
    pub fn bound(&self) -> Option<Bound> {
        self.bound
    }

    /// The smoothed round-trip time to the relay, measured on each handshake (every
    /// [`KEEPALIVE`] while bound).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Whether the relay holds our binding.
    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// When [`BindClient::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.next_send
    }

    /// Forgets the binding and binds again at once (the relay said it no longer holds it).
    pub fn restart(&mut self, now: Instant) {
        self.bound = None;
        self.refresh(now);
    }

    /// The relay refused our proof: the binding is gone, and the next try waits the longest
    /// retry interval (a refused permit stays refused until it is renewed).
    pub fn refused(&mut self, now: Instant) {
        self.bound = None;
        self.phase = Phase::Idle;
        self.next_send = now + MAX_RETRY;
        self.retry = MAX_RETRY;
    }

    /// Binds again at once, keeping the current binding meanwhile (e.g. a renewed permit).
    pub fn refresh(&mut self, now: Instant) {
        self.phase = Phase::Idle;
        self.next_send = now;
        self.retry = FIRST_RETRY;
    }

    /// Sends whatever is due: a new handshake, a retransmitted request or proof.
    pub fn handle_timeout(&mut self, now: Instant, me: &Identity, permit: &SignedTicket) -> Option<Transmit> {
        if self.phase != Phase::Idle && now.saturating_duration_since(self.started) >= LOST_AFTER {
            self.bound = None;
        }
        if now < self.next_send {
            return None;
        }
        let out = match self.phase {
            Phase::Idle => {
                self.phase = Phase::Requesting;
                self.started = now;
                self.retry = FIRST_RETRY;
                self.request_sent = Some(now);
                self.request(me)
            }
            Phase::Requesting => {
                self.request_sent = None;
                self.request(me)
            }
            Phase::Proving(challenge) => self.proof(me, permit, &challenge),
        };
        self.next_send = now + self.retry;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        out
    }

    /// Handles a datagram of a bind kind that came from the relay's address. Returns the
    /// datagram to send in reply, if any.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        clock: &WallClock,
        dgram: &Datagram<'_>,
        me: &Identity,
        permit: &SignedTicket,
    ) -> Option<Transmit> {
        if dgram.destination() != me.node_id() {
            return None;
        }
        match (dgram.kind(), self.phase) {
            (Kind::BindChallenge, Phase::Requesting | Phase::Proving(_)) => {
                if let (Phase::Requesting, Some(sent)) = (self.phase, self.request_sent.take()) {
                    let sample = now.saturating_duration_since(sent);
                    self.rtt = Some(self.rtt.map_or(sample, |old| (old * 7 + sample) / 8));
                }
                let challenge = Challenge::read(dgram.body());
                self.relay_id = Some(dgram.source());
                self.phase = Phase::Proving(challenge);
                self.next_send = now + FIRST_RETRY;
                self.retry = FIRST_RETRY * 2;
                self.proof(me, permit, &challenge)
            }
            (Kind::BindAck, Phase::Proving(_)) if Some(dgram.source()) == self.relay_id => {
                let ack = BindAck::read(dgram.body()).ok()?;
                self.bound = Some(Bound { observed: ack.observed, expires_at: ack.expires_at });
                self.phase = Phase::Idle;
                let left = Duration::from_secs(ack.expires_at.saturating_sub(clock.unix_secs(now)));
                self.next_send = now + KEEPALIVE.min(left.saturating_sub(RENEW_BEFORE)).max(Duration::from_secs(1));
                self.retry = FIRST_RETRY;
                None
            }
            _ => None,
        }
    }

    fn request(&self, me: &Identity) -> Option<Transmit> {
        let h = Header {
            kind: Kind::BindRequest,
            source: me.node_id(),
            destination: self.relay_id.unwrap_or(NodeId([0; 8])),
            vc: VcId(0),
            trace: false,
        };
        let mut buf = vec![0; wire::HEADER_LEN + BIND_REQUEST_BODY_LEN];
        let len = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &[0; BIND_REQUEST_BODY_LEN]).ok()?;
        buf.truncate(len);
        Some(Transmit { to: self.relay, bytes: buf })
    }

    fn proof(&self, me: &Identity, permit: &SignedTicket, challenge: &Challenge) -> Option<Transmit> {
        let relay = self.relay_id?;
        let signature = me.sign(wire::BIND_CONTEXT, &wire::bind_proof_message(relay, challenge));
        let mut body = [0; BIND_PROOF_BODY_LEN];
        BindProof::write(challenge, &permit.encode(), &signature, &mut body);
        let h = Header { kind: Kind::BindProof, source: me.node_id(), destination: relay, vc: VcId(0), trace: false };
        let mut buf = vec![0; wire::HEADER_LEN + BIND_PROOF_BODY_LEN];
        let len = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &body).ok()?;
        buf.truncate(len);
        Some(Transmit { to: self.relay, bytes: buf })
    }
}
