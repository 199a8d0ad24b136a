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

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindState {
    /// Sending bind requests.
    Requesting,
    /// Answered a challenge; waiting for the ack.
    Proving(Challenge),
    /// The relay holds our binding.
    Bound {
        /// The address the relay saw.
        observed: SocketAddr,
        /// Unix second at which the relay drops the binding.
        expires_at: u64,
    },
}

/// One node's binding to one relay.
#[derive(Debug)]
pub struct BindClient {
    relay: SocketAddr,
    relay_id: Option<NodeId>,
    state: BindState,
    next_send: Instant,
    retry: Duration,
}

impl BindClient {
    /// Starts binding to the relay at `relay`; the first request goes out on the next timeout.
    pub fn new(relay: SocketAddr, now: Instant) -> BindClient {
        BindClient { relay, relay_id: None, state: BindState::Requesting, next_send: now, retry: FIRST_RETRY }
    }

    /// The relay's address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The relay's id, once it answered.
    pub fn relay_id(&self) -> Option<NodeId> {
        self.relay_id
    }

    /// Where the handshake stands.
    pub fn state(&self) -> BindState {
        self.state
    }

    /// Whether the relay holds our binding.
    pub fn is_bound(&self) -> bool {
        matches!(self.state, BindState::Bound { .. })
    }

    /// When [`BindClient::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.next_send
    }

    /// Starts over (e.g. after the relay said our binding is gone, or the permit changed).
    pub fn restart(&mut self, now: Instant) {
        self.state = BindState::Requesting;
        self.next_send = now;
        self.retry = FIRST_RETRY;
    }

    /// Sends whatever is due: a (re)request, a retransmitted proof, or a renewal.
    pub fn handle_timeout(&mut self, now: Instant, me: &Identity, permit: &SignedTicket) -> Option<Transmit> {
        if now < self.next_send {
            return None;
        }
        let out = match self.state {
            BindState::Requesting | BindState::Bound { .. } => {
                self.state = BindState::Requesting;
                self.request(me)
            }
            BindState::Proving(challenge) => self.proof(me, permit, &challenge),
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
        match dgram.kind() {
            Kind::BindChallenge if !self.is_bound() => {
                let challenge = Challenge::read(dgram.body());
                self.relay_id = Some(dgram.source());
                self.state = BindState::Proving(challenge);
                self.next_send = now + FIRST_RETRY;
                self.retry = FIRST_RETRY * 2;
                self.proof(me, permit, &challenge)
            }
            Kind::BindAck if matches!(self.state, BindState::Proving(_)) && Some(dgram.source()) == self.relay_id => {
                let ack = BindAck::read(dgram.body()).ok()?;
                self.state = BindState::Bound { observed: ack.observed, expires_at: ack.expires_at };
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
