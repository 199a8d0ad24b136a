//! The node side of the bind handshake (request → challenge → proof → ack), shared by
//! endpoints binding to their relays and by relays binding to their peer relays.
//!
//! Sans-IO: fed `now` and the datagrams that came back from the relay, it yields datagrams to
//! send and tells when it next needs [`BindClient::handle_timeout`]. A node that stops sends
//! each relay an unbind ([`BindClient::unbind`]) so the relay lets go of its binding at once;
//! a relay forgets bindings it hears nothing from for a few keepalive intervals anyway, which
//! is why a bound node binds again at least every [`KEEPALIVE_MAX`], whatever else it sends.

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
/// How often a bound node binds again anyway, where nothing tells how long its NAT keeps a
/// silent mapping: keeps the mapping open (many NATs drop one after 30 s, a few sooner) and
/// lets the relay see a new address promptly.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Bounds of a keepalive interval fitted to the NAT's measured mapping lifetime.
pub const KEEPALIVE_MIN: Duration = Duration::from_secs(5);
/// The longest keepalive interval: also how often a node on the open network, which has no
/// mapping to hold, binds again, and the longest a bound node goes without binding again even
/// while it sends (relays time out bindings by it).
pub const KEEPALIVE_MAX: Duration = Duration::from_secs(120);
/// A binding is renewed this long before it lapses.
const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// The longest binding an ack is taken at its word for: a relay, or whoever forges its
/// address, may write any expiry, and an instant that far ahead does not exist.
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

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

/// How long our NAT keeps a mapping without outbound traffic, as far as the relay's view of us
/// has shown: after a silence it either still sees us at the same address (the mapping held)
/// or at a new one (the mapping expired and the NAT made another).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappingLife {
    /// The longest silence the mapping survived.
    pub held: Duration,
    /// The shortest silence after which we came back at a new address.
    pub broke: Option<Duration>,
}

impl MappingLife {
    /// The keepalive interval to use next: the default until a silence that long has held,
    /// then doubling while nothing has broken; once one has, halfway between the longest
    /// silence that held and the shortest that broke, until the two are within an eighth
    /// of each other, and then the one that held.
    pub fn interval(&self) -> Duration {
        let held = self.held;
        let next = match self.broke {
            None if held < KEEPALIVE => KEEPALIVE,
            None => held * 2,
            Some(broke) if broke <= held => broke * 3 / 4,
            Some(broke) if broke - held > held / 8 => (held + broke) / 2,
            Some(_) => held,
        };
        next.clamp(KEEPALIVE_MIN, KEEPALIVE_MAX)
    }

    fn record(&mut self, silence: Duration, same_address: bool) {
        if same_address {
            self.held = self.held.max(silence);
        } else {
            self.broke = Some(self.broke.map_or(silence, |b| b.min(silence)));
        }
    }
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
    /// Our socket's own address, if the driver told us: it says whether a NAT sits between us
    /// and the relay, and whether the NAT's mappings can be told apart by port.
    local: Option<SocketAddr>,
    /// When we last sent the relay anything (our NAT refreshes its mapping then).
    last_sent: Instant,
    /// The address the relay last saw, kept across a lost binding.
    last_observed: Option<SocketAddr>,
    /// A keepalive handshake is in flight after this much silence towards the relay.
    silence: Option<Duration>,
    /// Whether the next handshake is a keepalive (not a first bind, a renewal or a retry).
    keepalive_due: bool,
    life: MappingLife,
    keepalive: Duration,
    /// When the binding must be renewed, whatever else is sent.
    renew_at: Instant,
    /// When the node must bind again at the latest, whatever else it sends: [`KEEPALIVE_MAX`]
    /// after the last ack, so relays keep hearing binds.
    rebind_by: Instant,
    /// The challenge of the proof the relay acknowledged last: an unbind answers it again.
    granted: Option<Challenge>,
    /// Challenges the handshake in flight may still take: one per request sent. A proof is
    /// larger than the challenge it answers, so answering challenges beyond the requests would
    /// let anyone who forges the relay's address make us send proofs at their rate.
    challenges_due: u32,
    /// Challenges that came when none was due: forged, duplicated, or late.
    unsolicited: u64,
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
            local: None,
            last_sent: now,
            last_observed: None,
            silence: None,
            keepalive_due: false,
            life: MappingLife::default(),
            keepalive: KEEPALIVE,
            renew_at: now,
            rebind_by: now,
            granted: None,
            challenges_due: 0,
            unsolicited: 0,
        }
    }

    /// Tells the client its socket's own address (again after the socket moved, which
    /// forgets what was measured of the old network's NAT).
    pub fn set_local(&mut self, local: SocketAddr) {
        if self.local != Some(local) {
            self.local = Some(local);
            self.life = MappingLife::default();
        }
    }

    /// We sent the relay a datagram (data or a probe): the NAT's mapping was refreshed, and
    /// the next keepalive is due a keepalive interval from now (or at renewal time).
    pub fn on_sent(&mut self, now: Instant) {
        self.last_sent = now;
        if self.keepalive_due && self.phase == Phase::Idle {
            self.next_send = (now + self.keepalive).min(self.renew_at).min(self.rebind_by);
        }
    }

    /// The interval between keepalive binds now in use.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// The address the relay saw us at in its last ack, kept when the binding is lost.
    pub fn last_observed(&self) -> Option<SocketAddr> {
        self.last_observed
    }

    /// What the keepalives have shown of the NAT's mapping lifetime.
    pub fn mapping_life(&self) -> MappingLife {
        self.life
    }

    /// The keepalive interval for a relay that sees us at `observed`. Without a NAT there is
    /// no mapping to hold, only the binding to renew. Behind a NAT that gives mappings ports
    /// of its own choosing, an expired mapping comes back at a new port, so the lifetime can
    /// be measured. Behind one that keeps our port, or when our address is unknown, an
    /// expired mapping looks like the old one: the default stands.
    fn keepalive_for(&self, observed: SocketAddr) -> Duration {
        match self.local {
            Some(l) if l == observed => KEEPALIVE_MAX,
            Some(l) if l.port() != observed.port() => self.life.interval(),
            _ => KEEPALIVE,
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
    /// keepalive while bound).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Whether the relay holds our binding.
    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// Challenges refused so far because they answered no request of ours (more than one per
    /// request sent, or none in flight): forged from the relay's address, or duplicated.
    pub fn unsolicited_challenges(&self) -> u64 {
        self.unsolicited
    }

    /// When [`BindClient::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.next_send
    }

    /// Forgets the binding and binds again at once (the relay said it no longer holds it).
    pub fn restart(&mut self, now: Instant) {
        self.bound = None;
        self.keepalive_due = false;
        self.refresh(now);
    }

    /// The relay refused our proof: the binding is gone, and the next try waits the longest
    /// retry interval (a refused permit stays refused until it is renewed).
    pub fn refused(&mut self, now: Instant) {
        self.bound = None;
        self.keepalive_due = false;
        self.phase = Phase::Idle;
        self.challenges_due = 0;
        self.next_send = now + MAX_RETRY;
        self.retry = MAX_RETRY;
    }

    /// Binds again at once, keeping the current binding meanwhile (e.g. a renewed permit).
    pub fn refresh(&mut self, now: Instant) {
        self.keepalive_due = false;
        self.phase = Phase::Idle;
        self.challenges_due = 0;
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
                // A keepalive after a silence: its answer tells whether the mapping held.
                let keepalive = std::mem::take(&mut self.keepalive_due) && self.bound.is_some();
                self.silence = keepalive.then(|| now.saturating_duration_since(self.last_sent));
                self.phase = Phase::Requesting;
                self.started = now;
                self.retry = FIRST_RETRY;
                self.request_sent = Some(now);
                self.challenges_due = 1;
                self.request(me)
            }
            Phase::Requesting => {
                self.request_sent = None;
                self.challenges_due = self.challenges_due.saturating_add(1);
                self.request(me)
            }
            Phase::Proving(challenge) => self.proof(me, permit, &challenge),
        };
        self.last_sent = now;
        self.next_send = now + self.retry;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        out
    }

    /// Handles a datagram of a bind kind that came from the relay's address. Returns the
    /// datagram to send in reply, if any: the proof for a challenge, for at most one challenge
    /// per request sent (others are counted, see [`BindClient::unsolicited_challenges`]).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        clock: &WallClock,
        dgram: &Datagram<'_>,
        me: &Identity,
        permit: &SignedTicket,
    ) -> Option<Transmit> {
        // An unbind's ack is not an answer to a bind; nothing here waits for one.
        if dgram.destination() != me.node_id() || dgram.unbind() {
            return None;
        }
        match (dgram.kind(), self.phase) {
            (Kind::BindChallenge, _) if self.challenges_due == 0 => {
                self.unsolicited += 1;
                None
            }
            (Kind::BindChallenge, Phase::Requesting | Phase::Proving(_)) => {
                self.challenges_due -= 1;
                if let (Phase::Requesting, Some(sent)) = (self.phase, self.request_sent.take()) {
                    let sample = now.saturating_duration_since(sent);
                    self.rtt = Some(self.rtt.map_or(sample, |old| (old * 7 + sample) / 8));
                }
                let challenge = Challenge::read(dgram.body());
                self.relay_id = Some(dgram.source());
                self.phase = Phase::Proving(challenge);
                self.next_send = now + FIRST_RETRY;
                self.retry = FIRST_RETRY * 2;
                self.last_sent = now;
                self.proof(me, permit, &challenge)
            }
            (Kind::BindAck, Phase::Proving(challenge)) if Some(dgram.source()) == self.relay_id => {
                let ack = BindAck::read(dgram.body()).ok()?;
                self.bound = Some(Bound { observed: ack.observed, expires_at: ack.expires_at });
                self.granted = Some(challenge);
                self.rebind_by = now + KEEPALIVE_MAX;
                self.phase = Phase::Idle;
                self.challenges_due = 0;
                if let (Some(silence), Some(before)) = (self.silence.take(), self.last_observed) {
                    self.life.record(silence, before == ack.observed);
                }
                self.last_observed = Some(ack.observed);
                self.keepalive = self.keepalive_for(ack.observed);
                self.keepalive_due = true;
                // The keepalive follows the last datagram we sent by one interval, so the
                // silence it ends is the one measured; the renewal comes first if it is due.
                let left = Duration::from_secs(ack.expires_at.saturating_sub(clock.unix_secs(now))).min(MAX_LEASE);
                self.renew_at = now + left.saturating_sub(RENEW_BEFORE).max(Duration::from_secs(1));
                self.next_send = (self.last_sent + self.keepalive).min(self.renew_at);
                self.retry = FIRST_RETRY;
                None
            }
            _ => None,
        }
    }

    /// An unbind for the relay holding our binding: the challenge of the proof it accepted
    /// last, our permit, and our signature over them under [`wire::UNBIND_CONTEXT`]. The relay
    /// releases the binding and answers with an ack this client ignores. `None` while not
    /// bound. This client is left as it is: a node that keeps running binds again at its next
    /// keepalive.
    pub fn unbind(&self, me: &Identity, permit: &SignedTicket) -> Option<Transmit> {
        let (relay, challenge) = (self.relay_id?, self.granted?);
        self.bound?;
        let signature = me.sign(wire::UNBIND_CONTEXT, &wire::bind_proof_message(relay, &challenge));
        let mut body = [0; BIND_PROOF_BODY_LEN];
        BindProof::write(&challenge, &permit.encode(), &signature, &mut body);
        let h = Header { kind: Kind::BindProof, source: me.node_id(), destination: relay, vc: VcId(0), trace: false };
        let mut buf = vec![0; wire::HEADER_LEN + BIND_PROOF_BODY_LEN];
        let len = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &body).ok()?;
        buf.truncate(len);
        wire::set_unbind(&mut buf);
        Some(Transmit { to: self.relay, bytes: buf })
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::{Roles, TicketBody, TicketKind, UnixTime};

    const S: Duration = Duration::from_secs(1);

    /// A challenge from `relay` to `to`, as a relay writes it.
    fn challenge(relay: NodeId, to: NodeId, cookie: u8) -> Vec<u8> {
        let h = Header { kind: Kind::BindChallenge, source: relay, destination: to, vc: VcId(0), trace: false };
        let mut body = [0; wire::CHALLENGE_BODY_LEN];
        Challenge { issued_at: 1_800_000_000, cookie: [cookie; wire::COOKIE_LEN] }.write(&mut body);
        let mut buf = vec![0; wire::HEADER_LEN + wire::CHALLENGE_BODY_LEN];
        let n = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &body).unwrap();
        buf.truncate(n);
        buf
    }

    /// A node, its permit and a relay, at a fixed Unix time.
    struct Handshake {
        now: Instant,
        clock: WallClock,
        me: Identity,
        relay: NodeId,
        permit: SignedTicket,
    }

    impl Handshake {
        fn new() -> Handshake {
            let now = Instant::now();
            let me = Identity::from_seed([3; 32]);
            let permit =
                TicketBody::new(TicketKind::RelayPermit, me.public_key(), Roles::CLIENT, UnixTime(1_800_000_000), 60)
                    .sign(&Identity::from_seed([1; 32]));
            Handshake {
                now,
                clock: WallClock::new(now, 1_800_000_000_000_000),
                me,
                relay: Identity::from_seed([2; 32]).node_id(),
                permit,
            }
        }
    }

    /// Found by the `endpoint` fuzz target: the relay's challenge delivered twice after one
    /// request drew two proofs, each several times the challenge's size. Whoever forges the
    /// relay's address could have had a node send proofs at the forger's rate.
    #[test]
    fn a_challenge_beyond_the_requests_sent_draws_no_proof() {
        let Handshake { now, clock, me, relay, permit } = Handshake::new();
        let mut c = BindClient::new(SocketAddr::from(([192, 0, 2, 9], 9000)), now);
        assert!(c.handle_timeout(now, &me, &permit).is_some(), "no request");
        let first = challenge(relay, me.node_id(), 1);
        let first = Datagram::parse(&first).unwrap();
        let proof = c.handle_datagram(now, &clock, &first, &me, &permit).expect("the challenge is answered");
        assert!(proof.bytes.len() > first.as_bytes().len());
        for cookie in [1, 2, 3] {
            let again = challenge(relay, me.node_id(), cookie);
            assert_eq!(c.handle_datagram(now, &clock, &Datagram::parse(&again).unwrap(), &me, &permit), None);
        }
        assert_eq!(c.unsolicited_challenges(), 3);
        // A retransmitted request may draw one more challenge, and that one is answered.
        let mut c = BindClient::new(SocketAddr::from(([192, 0, 2, 9], 9000)), now);
        let _ = c.handle_timeout(now, &me, &permit);
        let _ = c.handle_timeout(now + FIRST_RETRY, &me, &permit);
        assert!(c.handle_datagram(now, &clock, &first, &me, &permit).is_some());
        let second = challenge(relay, me.node_id(), 2);
        assert!(c.handle_datagram(now, &clock, &Datagram::parse(&second).unwrap(), &me, &permit).is_some());
        assert_eq!(c.handle_datagram(now, &clock, &first, &me, &permit), None);
        assert_eq!(c.unsolicited_challenges(), 1);
    }

    /// Found by the `endpoint` fuzz target: an ack naming an expiry past what an `Instant` can
    /// hold panicked the node (overflow adding the lease to now).
    #[test]
    fn an_ack_with_an_absurd_expiry_is_taken_as_a_day() {
        let Handshake { now, clock, me, relay, permit } = Handshake::new();
        let mut c = BindClient::new(SocketAddr::from(([192, 0, 2, 9], 9000)), now);
        assert!(c.handle_timeout(now, &me, &permit).is_some());
        let first = challenge(relay, me.node_id(), 1);
        assert!(c.handle_datagram(now, &clock, &Datagram::parse(&first).unwrap(), &me, &permit).is_some());
        let h = Header { kind: Kind::BindAck, source: relay, destination: me.node_id(), vc: VcId(0), trace: false };
        let mut body = [0; wire::BIND_ACK_BODY_LEN];
        BindAck { expires_at: u64::MAX, observed: SocketAddr::from(([198, 51, 100, 1], 4000)) }.write(&mut body);
        let mut buf = vec![0; wire::HEADER_LEN + wire::BIND_ACK_BODY_LEN];
        let n = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &body).unwrap();
        assert_eq!(c.handle_datagram(now, &clock, &Datagram::parse(&buf[..n]).unwrap(), &me, &permit), None);
        assert!(c.is_bound());
        assert!(c.poll_timeout() <= now + MAX_LEASE);
    }

    /// Runs the keepalive search against a NAT whose mappings live `lifetime` of silence,
    /// returning the intervals tried.
    fn search(lifetime: Duration, rounds: usize) -> Vec<Duration> {
        let mut life = MappingLife::default();
        let mut tried = Vec::new();
        for _ in 0..rounds {
            let next = life.interval();
            tried.push(next);
            life.record(next, next < lifetime);
        }
        tried
    }

    #[test]
    fn the_keepalive_starts_at_the_default_and_grows_while_the_mapping_holds() {
        assert_eq!(MappingLife::default().interval(), KEEPALIVE);
        assert_eq!(search(Duration::MAX, 6), [15 * S, 30 * S, 60 * S, 120 * S, 120 * S, 120 * S]);
    }

    #[test]
    fn the_keepalive_settles_just_under_the_mapping_lifetime() {
        for lifetime in [20 * S, 30 * S, 45 * S, 65 * S, 100 * S] {
            let tried = search(lifetime, 20);
            let last = *tried.last().unwrap();
            assert!(last < lifetime && last >= lifetime * 3 / 4, "{lifetime:?}: {tried:?}");
            // Each mapping that broke cost one expiry; the search takes few of them.
            let broke = tried.iter().filter(|&&t| t >= lifetime).count();
            assert!(broke <= 4, "{lifetime:?}: {tried:?}");
            assert_eq!(tried[tried.len() - 5..], [last; 5], "{lifetime:?} did not settle: {tried:?}");
        }
    }

    #[test]
    fn a_nat_quicker_than_the_default_gets_keepalives_as_often_as_it_needs_within_the_floor() {
        let tried = search(10 * S, 20);
        let last = *tried.last().unwrap();
        assert!(last < 10 * S && last >= 7 * S, "{tried:?}");
        let tried = search(3 * S, 20);
        assert_eq!(*tried.last().unwrap(), KEEPALIVE_MIN, "{tried:?}");
    }
}
