//! One virtual connection: an end-to-end encrypted session with one peer, with its own keys,
//! its own renet connection (reliability and channels, from the profile), its own path
//! manager and its own counters. Nothing one VC sees can change another.
//!
//! Sans-IO, driven by [`crate::Node`]: feed frames with [`VirtualConnection::handle_frame`],
//! call [`VirtualConnection::handle_timeout`] when [`VirtualConnection::poll_timeout`] is due,
//! and after each input drain [`VirtualConnection::poll_transmit`] and
//! [`VirtualConnection::poll_event`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use renet::{Bytes, RenetClient};
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::VcId;
use shoal_protocol::{Identity, NodeId, PublicKey, Signature};

use crate::crypto::{CryptoError, Ephemeral, HelloBody, SessionKeys};
use crate::frame::{self, Candidates, Frame, Inner};
use crate::pacing::Pacer;
use crate::path::{PathEvent, PathId, PathInfo, PathManager, SwitchReason};
use crate::profile::{Policy, Profile, ProfileConfig};

/// The one renet channel of a VC; its delivery comes from the profile.
const CHANNEL: u8 = crate::profile::RENET_CHANNEL;
/// First hello retransmission; it doubles up to [`HELLO_RETRY_MAX`].
const HELLO_RETRY: Duration = Duration::from_millis(200);
const HELLO_RETRY_MAX: Duration = Duration::from_secs(2);
/// A VC whose peer has not answered its hello by then is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A VC that has heard nothing authenticated from its peer for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// How far a hello's timestamp may lie from our clock.
const HELLO_MAX_SKEW: Duration = Duration::from_secs(120);
/// Renet's type byte for an ack-only packet, which needs no ack of its own soon.
const RENET_ACK_PACKET: u8 = 4;
/// Renet calls per pacing round, at most; each emits up to the profile's `bytes_per_flush`.
const MAX_PULLS: usize = 64;
/// Deepest a path's pacing queue is filled, in ticks of its rate.
const MAX_QUEUE_TICKS: u32 = 2;
/// How often our candidate advertisement is repeated until the peer acknowledges it, and how
/// many times at most.
const ADVERT_RETRY: Duration = Duration::from_millis(200);
const ADVERT_TRIES: u32 = 10;
/// Direct candidates a peer's advertisements may add to a VC. Each is probed, so a peer must
/// not be able to point us at any number of addresses.
pub const MAX_ADVERTISED_PATHS: usize = 8;

/// Why a VC closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This side closed it.
    Local,
    /// The peer closed it.
    Peer,
    /// The peer never answered the hello.
    HandshakeTimeout,
    /// Nothing authenticated came from the peer for [`IDLE_TIMEOUT`].
    TimedOut,
    /// The peer's authenticated frames broke renet's protocol, or its buffers overflowed.
    Protocol(String),
}

/// Something that happened on a VC.
#[derive(Debug, Clone, PartialEq)]
pub enum VcEvent {
    /// Keys are agreed; messages flow.
    Opened,
    /// The peer restarted the VC with a new key exchange; renet state was reset, so reliable
    /// messages in flight across the restart may be lost.
    Reset,
    /// The primary path changed.
    PathChanged {
        /// The previous one.
        old: Option<Box<PathInfo>>,
        /// The new one.
        new: Box<PathInfo>,
        /// Why.
        reason: SwitchReason,
    },
    /// No path meets the profile; the best of the rest is in use.
    Degraded {
        /// The path in use.
        path: Box<PathInfo>,
    },
    /// A path kept producing frames that failed authentication and is out of use.
    PathAbandoned {
        /// The path.
        path: Box<PathInfo>,
        /// Failures within the window.
        failures: u32,
    },
    /// The VC is closed; nothing more will come.
    Closed(CloseReason),
}

/// Why a message was not accepted for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VcSendError {
    /// The VC is closed.
    #[error("virtual connection closed")]
    Closed,
    /// The VC already holds its profile's limit of unsent and unacknowledged bytes.
    #[error("send buffer full ({limit} bytes)")]
    Full {
        /// The profile's limit.
        limit: usize,
    },
}

/// Frames and bytes a VC refused, by reason. None of them reach the game.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcCounters {
    /// Frames that failed authentication (tampered or forged).
    pub auth_failures: u64,
    /// Authenticated packet numbers seen before: redundant copies and replays.
    pub duplicates: u64,
    /// Frames that could not be parsed.
    pub malformed: u64,
    /// Hellos whose signature or key was wrong, or whose time was implausible.
    pub bad_hellos: u64,
    /// Sealed frames that came before the key exchange finished.
    pub early: u64,
    /// Unreliable (latest-wins) packets older than one already delivered, dropped.
    pub stale: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received and authenticated.
    pub frames_received: u64,
    /// Bytes of frames sent (VC frame, not the mesh header).
    pub bytes_sent: u64,
    /// Bytes of authenticated frames received.
    pub bytes_received: u64,
    /// Messages the game sent.
    pub messages_sent: u64,
    /// Messages delivered to the game.
    pub messages_received: u64,
    /// Direct candidates the peer advertised after its address changed, taken up.
    pub candidates_learned: u64,
    /// Advertised candidates refused: past [`MAX_ADVERTISED_PATHS`], or not a usable address.
    pub candidates_refused: u64,
}

/// What a VC measures, as the game sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VcStats {
    /// Smoothed RTT of the primary path.
    pub rtt: Option<Duration>,
    /// Jitter (RTT deviation) of the primary path.
    pub jitter: Duration,
    /// Loss of the primary path.
    pub loss: f32,
    /// Bytes per second renet sent, averaged.
    pub send_bytes_per_sec: f64,
    /// Bytes per second renet received, averaged.
    pub recv_bytes_per_sec: f64,
    /// The primary path, with per-hop latencies.
    pub path: Option<PathInfo>,
    /// Every candidate.
    pub paths: Vec<PathInfo>,
    /// Counters.
    pub counters: VcCounters,
}

/// A frame to send on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcTransmit {
    /// The path.
    pub path: Path,
    /// Whether relays should stamp a trace.
    pub trace: bool,
    /// The frame (the mesh datagram's body).
    pub frame: Vec<u8>,
}

#[derive(Debug)]
enum State {
    Handshaking { since: Instant },
    Open,
    Closed,
}

/// A virtual connection. See the module docs.
#[derive(Debug)]
pub struct VirtualConnection {
    identity: Identity,
    peer: NodeId,
    peer_key: PublicKey,
    vc: VcId,
    profile: Profile,
    clock: WallClock,
    state: State,
    ephemeral: Ephemeral,
    my_hello: (HelloBody, Signature),
    peer_hello: Option<HelloBody>,
    keys: Option<SessionKeys>,
    /// Whether the peer has shown it holds our hello (an authenticated frame arrived).
    confirmed: bool,
    hello_next: Instant,
    hello_backoff: Duration,
    renet: RenetClient,
    renet_at: Instant,
    next_tick: Instant,
    flush_now: bool,
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
    paths: PathManager,
    /// Paced profiles: one pacer per candidate, by path id.
    pacers: Vec<Pacer>,
    /// Paced profiles: renet may have packets to emit (until a call emits none).
    pull_ok: bool,
    /// Paced profiles: data arrived that renet has not acknowledged yet; acks wait for the
    /// next tick instead of following every packet.
    ack_due: bool,
    /// Paced profiles: when the last ack-only packet left.
    acked_at: Option<Instant>,
    /// Highest packet number of a renet packet processed: for latest-wins delivery.
    newest_renet: Option<u64>,
    last_heard: Instant,
    /// Our direct addresses to tell the peer, until it acknowledges them.
    advert: Option<Advert>,
    /// Sequence number of our latest advertisement.
    advert_seq: u32,
    /// Sequence number of the peer's latest advertisement taken up.
    peer_advert_seq: Option<u32>,
    /// Direct candidates added from the peer's advertisements.
    advertised_paths: usize,
    transmits: VecDeque<VcTransmit>,
    events: VecDeque<VcEvent>,
    counters: VcCounters,
}

/// An advertisement of our direct addresses waiting for the peer's acknowledgement.
#[derive(Debug)]
struct Advert {
    candidates: Candidates,
    next: Instant,
    tries_left: u32,
}

fn renet_for(profile: &Profile) -> RenetClient {
    let mut c = RenetClient::new(profile.renet_config());
    c.set_connected();
    c
}

/// Why an incoming hello could not open a VC.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpenError {
    /// The key material failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The hello's profile is unknown or invalid.
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
}

impl VirtualConnection {
    /// A VC to `peer` (whose long-term key is `peer_key`) on `vc`, over `paths` in order of
    /// preference. It starts the key exchange at once.
    pub fn new(
        now: Instant,
        identity: Identity,
        clock: WallClock,
        peer_key: PublicKey,
        vc: VcId,
        profile: Profile,
        paths: &[Path],
    ) -> Result<VirtualConnection, OpenError> {
        let peer = peer_key.node_id();
        let ephemeral = Ephemeral::generate()?;
        let my_hello = Self::make_hello(&identity, &ephemeral, &clock, now, &profile, peer, vc);
        let v = VirtualConnection {
            identity,
            peer,
            peer_key,
            vc,
            renet: renet_for(&profile),
            paths: PathManager::new(profile.clone(), paths, now),
            profile,
            clock,
            state: State::Handshaking { since: now },
            ephemeral,
            my_hello,
            peer_hello: None,
            keys: None,
            confirmed: false,
            hello_next: now,
            hello_backoff: HELLO_RETRY,
            renet_at: now,
            next_tick: now,
            flush_now: false,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            pacers: Vec::new(),
            pull_ok: false,
            ack_due: false,
            acked_at: None,
            newest_renet: None,
            last_heard: now,
            advert: None,
            advert_seq: 0,
            peer_advert_seq: None,
            advertised_paths: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: VcCounters::default(),
        };
        // The first handle_timeout sends the hello (hello_next is now).
        Ok(v)
    }

    fn make_hello(
        identity: &Identity,
        e: &Ephemeral,
        clock: &WallClock,
        now: Instant,
        profile: &Profile,
        peer: NodeId,
        vc: VcId,
    ) -> (HelloBody, Signature) {
        let body = HelloBody {
            ephemeral: e.public(),
            static_key: identity.public_key(),
            unix_ms: clock.unix_us(now) / 1000,
            profile: profile.config.to_wire(),
        };
        let sig = body.sign(identity, peer, vc);
        (body, sig)
    }

    /// The peer.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The VC id.
    pub fn id(&self) -> VcId {
        self.vc
    }

    /// The profile it runs by.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Whether keys are agreed and the VC is not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Whether the VC is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Adds a candidate path (say, a new relay or a direct address learned later).
    pub fn add_path(&mut self, now: Instant, path: Path) {
        let _ = self.paths.add(now, path);
    }

    /// Our direct addresses changed (a relay sees us at a new NAT mapping): tell the peer,
    /// which punches them, and re-punch our own direct candidates from the new address. The
    /// advertisement goes over the relayed paths and the ones in use, and is repeated until
    /// the peer acknowledges it.
    pub fn advertise(&mut self, now: Instant, addrs: &[SocketAddr]) {
        self.advert_seq = self.advert_seq.wrapping_add(1);
        let candidates = Candidates::new(self.advert_seq, addrs);
        self.advert = Some(Advert { candidates, next: now, tries_left: ADVERT_TRIES });
        self.paths.on_network_change(now);
    }

    /// Our socket moved (a new network): every path is pinged at once and every direct one
    /// punched afresh.
    pub fn on_network_change(&mut self, now: Instant) {
        self.paths.on_network_change(now);
    }

    fn send_advert(&mut self, now: Instant) {
        let Some(a) = self.advert.as_mut() else { return };
        if now < a.next || self.keys.is_none() {
            return;
        }
        let candidates = a.candidates;
        a.tries_left -= 1;
        a.next = now + ADVERT_RETRY;
        if a.tries_left == 0 {
            self.advert = None;
        }
        let paths: Vec<Path> = self
            .paths
            .info(now)
            .into_iter()
            .filter(|p| !p.abandoned && (p.active || !p.path.route().is_empty()))
            .map(|p| p.path)
            .collect();
        self.seal_to(&paths, false, Inner::Candidates(candidates));
    }

    /// The peer's addresses changed: punch the new ones, within [`MAX_ADVERTISED_PATHS`].
    fn on_candidates(&mut self, now: Instant, path: Path, c: &Candidates) {
        self.seal_to(&[path], false, Inner::CandidatesAck(c.seq));
        if self.peer_advert_seq.is_some_and(|s| s.wrapping_sub(c.seq) < 1 << 31) {
            return; // This one or a later one was taken up already.
        }
        self.peer_advert_seq = Some(c.seq);
        for addr in c.addrs() {
            let direct = Path::Direct(addr);
            let id = match self.paths.find(&direct) {
                Some(id) => Some(id),
                None if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 => None,
                None if self.advertised_paths >= MAX_ADVERTISED_PATHS => None,
                None => {
                    let id = self.paths.add(now, direct);
                    self.advertised_paths += usize::from(id.is_some());
                    self.counters.candidates_learned += u64::from(id.is_some());
                    id
                }
            };
            match id {
                Some(id) => self.paths.punch_now(now, id),
                None => self.counters.candidates_refused += 1,
            }
        }
    }

    /// Sends the hello on every candidate path, so the fastest one delivers it first.
    fn send_hellos(&mut self, now: Instant) {
        let bytes = frame::write_hello(&self.my_hello.0, &self.my_hello.1);
        for info in self.paths.info(now) {
            if !info.abandoned {
                self.push(VcTransmit { path: info.path, trace: false, frame: bytes.clone() });
            }
        }
    }

    fn push(&mut self, t: VcTransmit) {
        self.counters.frames_sent += 1;
        self.counters.bytes_sent += t.frame.len() as u64;
        self.transmits.push_back(t);
    }

    /// Seals `inner` into a frame under the next packet number.
    fn seal(&mut self, inner: Inner<'_>) -> Option<Vec<u8>> {
        let keys = self.keys.as_mut()?;
        // Type and packet number, then the plaintext, sealed in place behind them.
        let mut buf = Vec::with_capacity(frame::SEALED_OVERHEAD + 1300);
        buf.push(frame::SEALED);
        buf.extend_from_slice(&[0; 8]);
        inner.write(&mut buf);
        let (me, peer, vc) = (self.identity.node_id(), self.peer, self.vc);
        let pn = keys.seal(|pn| frame::aad(pn, me, peer, vc), &mut buf, 9);
        buf[1..9].copy_from_slice(&pn.to_be_bytes());
        Some(buf)
    }

    fn seal_to(&mut self, paths: &[Path], trace: bool, inner: Inner<'_>) {
        let Some(mut buf) = self.seal(inner) else { return };
        for (i, p) in paths.iter().enumerate() {
            let frame = if i + 1 == paths.len() { std::mem::take(&mut buf) } else { buf.clone() };
            self.push(VcTransmit { path: *p, trace, frame });
        }
    }

    /// Queues `message` for the peer. Reliable profiles deliver it (in order for Reliable);
    /// unreliable ones send it on the next flush, which this call brings forward.
    pub fn send(&mut self, message: Bytes) -> Result<(), VcSendError> {
        if self.is_closed() {
            return Err(VcSendError::Closed);
        }
        if self.backlog_bytes + message.len() > self.profile.max_buffered {
            return Err(VcSendError::Full { limit: self.profile.max_buffered });
        }
        self.counters.messages_sent += 1;
        self.backlog_bytes += message.len();
        self.backlog.push_back(message);
        self.flush_now = true;
        self.pull_ok = true;
        Ok(())
    }

    /// The next message from the peer.
    pub fn recv(&mut self) -> Option<Bytes> {
        if self.renet.is_disconnected() {
            return None;
        }
        let m = self.renet.receive_message(CHANNEL)?;
        self.counters.messages_received += 1;
        Some(m)
    }

    /// Closes the VC and tells the peer.
    pub fn close(&mut self) {
        if self.is_closed() {
            return;
        }
        let paths: Vec<Path> = self.paths.sending().iter().filter_map(|&i| self.paths.path(i)).collect();
        self.seal_to(&paths, false, Inner::Close(0));
        self.finish(CloseReason::Local);
    }

    fn finish(&mut self, reason: CloseReason) {
        self.state = State::Closed;
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.events.push_back(VcEvent::Closed(reason));
    }

    /// A local send on `path` failed (its first relay is not bound): the path manager treats
    /// it as silent.
    pub fn on_unusable(&mut self, path: &Path) {
        if let Some(id) = self.paths.find(path) {
            self.paths.on_unusable(id);
        }
    }

    /// A frame from the peer arrived over `path`, with the per-hop latencies of its trace.
    pub fn handle_frame(&mut self, now: Instant, path: Path, hops: Option<Vec<Duration>>, bytes: &mut [u8]) {
        if self.is_closed() {
            return;
        }
        // Only an authenticated frame may add a path (below): an address that merely claims to
        // be the peer must not make the VC send to it.
        let mut id = self.paths.find(&path);
        match Frame::parse(bytes) {
            Ok(Frame::Hello(h, sig)) => {
                if self.on_hello(now, h, &sig) && id.is_none() && matches!(path, Path::Direct(_)) {
                    // A genuine hello from an address we did not know: the peer's NAT mapped
                    // it to a port no introduction could name (an address-dependent or
                    // symmetric NAT), and our hellos to the named ones are filtered. Answer
                    // there, once per hello, so the peer gets its keys directly instead of
                    // over the relay; the address becomes a path only once a sealed frame
                    // from it authenticates.
                    let bytes = frame::write_hello(&self.my_hello.0, &self.my_hello.1);
                    self.push(VcTransmit { path, trace: false, frame: bytes });
                }
            }
            Ok(Frame::Sealed { pn, .. }) => {
                let Some(keys) = self.keys.as_mut() else {
                    self.counters.early += 1;
                    return;
                };
                let aad = frame::aad(pn, self.peer, self.identity.node_id(), self.vc);
                let len = bytes.len();
                match keys.open(pn, aad, &mut bytes[9..]) {
                    Ok(plain) => {
                        if id.is_none() {
                            // The peer from an address we did not know: it moved, or its NAT
                            // mapped it to a port no introduction could name.
                            id = self.paths.add(now, path);
                        }
                        self.counters.frames_received += 1;
                        self.counters.bytes_received += len as u64;
                        self.last_heard = now;
                        if !self.confirmed {
                            self.confirmed = true;
                            self.paths.on_confirmed(now);
                        }
                        if let Some(id) = id {
                            self.paths.on_heard(now, id);
                            if let Some(h) = hops {
                                self.paths.on_trace(id, h);
                            }
                        }
                        self.on_inner(now, path, id, pn, len, plain);
                    }
                    Err(CryptoError::Replay(_)) => {
                        self.counters.duplicates += 1;
                        // On a paced redundant VC the slower path's copies all land here; they
                        // still count as what that path delivered, or it would look lossy.
                        if self.profile.policy == Policy::Widest
                            && self.profile.redundancy
                            && let Some(id) = id
                            && let Ok(plain) = keys.open_duplicate(pn, aad, &mut bytes[9..])
                            && matches!(Inner::parse(plain), Ok(Inner::Renet(p)) if p.first() != Some(&RENET_ACK_PACKET))
                        {
                            self.paths.on_data_received(id, len);
                        }
                    }
                    Err(_) => self.on_auth_failure(now, id),
                }
            }
            Err(_) => {
                // Once keys exist, anything unreadable on a path is as suspect as a bad tag.
                self.counters.malformed += 1;
                if self.keys.is_some() {
                    self.on_auth_failure(now, id);
                }
            }
        }
        self.drain_paths();
    }

    fn on_auth_failure(&mut self, now: Instant, id: Option<PathId>) {
        self.counters.auth_failures += 1;
        if let Some(id) = id {
            let _ = self.paths.on_auth_failure(now, id);
        }
    }

    /// Handles a hello; returns whether the peer is still waiting for ours (a fresh exchange
    /// or a retransmission before any frame of ours got through).
    fn on_hello(&mut self, now: Instant, h: HelloBody, sig: &Signature) -> bool {
        let me = self.identity.node_id();
        let skew = now_skew(&self.clock, now, h.unix_ms);
        if h.static_key != self.peer_key || h.verify(sig, self.peer, me, self.vc).is_err() || skew > HELLO_MAX_SKEW {
            self.counters.bad_hellos += 1;
            return false;
        }
        let same_profile = ProfileConfig::from_wire(&h.profile).ok().and_then(|c| Profile::from_config(&c).ok());
        if same_profile.is_none_or(|p| p.delivery != self.profile.delivery) {
            self.counters.bad_hellos += 1;
            return false;
        }
        match self.peer_hello {
            Some(old) if old.ephemeral == h.ephemeral => {
                // A retransmission: the peer has not got ours yet.
                if !self.confirmed {
                    self.send_hellos(now);
                }
                return !self.confirmed;
            }
            Some(old) if h.unix_ms <= old.unix_ms => {
                // An older exchange, replayed.
                self.counters.bad_hellos += 1;
                return false;
            }
            Some(_) => {
                // The peer restarted the VC: new keys, new renet state.
                match Ephemeral::generate() {
                    Ok(e) => self.ephemeral = e,
                    Err(_) => return false,
                }
                self.my_hello = Self::make_hello(
                    &self.identity,
                    &self.ephemeral,
                    &self.clock,
                    now,
                    &self.profile,
                    self.peer,
                    self.vc,
                );
                self.renet = renet_for(&self.profile);
                // Frames still queued were sealed under the old keys; the peer would take
                // them for forgeries.
                self.pacers.clear();
                self.pull_ok = false;
                self.ack_due = false;
                self.acked_at = None;
                self.renet_at = now;
                self.newest_renet = None;
                self.confirmed = false;
                self.events.push_back(VcEvent::Reset);
            }
            None => {}
        }
        let keys = SessionKeys::derive(me, self.peer, &mut self.ephemeral, &self.my_hello.0, &h);
        match keys {
            Ok(k) => {
                self.keys = Some(k);
                self.peer_hello = Some(h);
                self.send_hellos(now);
                self.hello_next = now + self.hello_backoff;
                if let State::Handshaking { .. } = self.state {
                    self.state = State::Open;
                    self.events.push_back(VcEvent::Opened);
                }
                self.last_heard = now;
                self.flush_now = true;
                true
            }
            Err(_) => {
                self.counters.bad_hellos += 1;
                false
            }
        }
    }

    fn on_inner(&mut self, now: Instant, path: Path, id: Option<PathId>, pn: u64, len: usize, plain: &[u8]) {
        match Inner::parse(plain) {
            Ok(Inner::Renet(packet)) => {
                let is_ack = packet.first() == Some(&RENET_ACK_PACKET);
                if let Some(id) = id
                    && !is_ack
                {
                    self.paths.on_data_received(id, len);
                }
                // Latest wins: an unreliable packet overtaken by a newer one carries only
                // superseded state (and acks that the newer packet repeats). With redundant
                // copies, the slower path's copy of a packet the faster path lost is the
                // point of redundancy, so it is delivered even when a newer one came first.
                let latest_wins = !self.profile.is_reliable() && !self.profile.redundancy;
                if latest_wins && self.newest_renet.is_some_and(|n| pn < n) {
                    self.counters.stale += 1;
                    return;
                }
                self.newest_renet = Some(self.newest_renet.map_or(pn, |n| n.max(pn)));
                if is_ack {
                    // Acks free renet's buffers and end resend timers: there may be more to send.
                    self.pull_ok = true;
                } else if self.paced() {
                    self.ack_due = true;
                } else {
                    self.flush_now = true;
                }
                self.renet.update(now.saturating_duration_since(self.renet_at));
                self.renet_at = now;
                self.renet.process_packet(packet);
                if let Some(reason) = self.renet.disconnect_reason() {
                    self.finish(CloseReason::Protocol(format!("{reason}")));
                }
            }
            Ok(Inner::Ping(ping)) => {
                let delivered = id.map_or(0, |id| self.paths.delivered(id));
                self.seal_to(&[path], true, Inner::Pong { ping, delivered });
            }
            Ok(Inner::Pong { ping, delivered }) => {
                let Some(id) = id else { return };
                let Some(rtt) = self.paths.on_pong(now, id, ping) else { return };
                let srtt = self.paths.srtt(id).unwrap_or(rtt);
                if let Some(p) = self.pacers.get_mut(usize::from(id.0)) {
                    p.on_pong(now, ping, delivered, rtt, srtt);
                    if let Some(cap) = p.capacity() {
                        self.paths.on_capacity(id, cap);
                    }
                }
            }
            Ok(Inner::Close(_)) => self.finish(CloseReason::Peer),
            Ok(Inner::Candidates(c)) => self.on_candidates(now, path, &c),
            Ok(Inner::CandidatesAck(seq)) => {
                if self.advert.as_ref().is_some_and(|a| a.candidates.seq == seq) {
                    self.advert = None;
                }
            }
            Err(_) => self.counters.malformed += 1,
        }
    }

    fn drain_paths(&mut self) {
        while let Some(e) = self.paths.poll_event() {
            self.events.push_back(match e {
                PathEvent::Changed { old, new, reason } => VcEvent::PathChanged { old, new, reason },
                PathEvent::Abandoned { path, failures } => VcEvent::PathAbandoned { path, failures },
                PathEvent::Degraded { path } => VcEvent::Degraded { path },
            });
        }
    }

    /// Retransmits hellos, sends pings, flushes renet on the profile's tick, and closes a VC
    /// whose peer is gone.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if let State::Handshaking { since } = self.state
            && now.saturating_duration_since(since) >= HANDSHAKE_TIMEOUT
        {
            self.finish(CloseReason::HandshakeTimeout);
            return;
        }
        if self.keys.is_some() && now.saturating_duration_since(self.last_heard) >= IDLE_TIMEOUT {
            self.finish(CloseReason::TimedOut);
            return;
        }
        if !self.confirmed && now >= self.hello_next {
            self.send_hellos(now);
            self.hello_next = now + self.hello_backoff;
            self.hello_backoff = (self.hello_backoff * 2).min(HELLO_RETRY_MAX);
        }
        if self.keys.is_none() {
            return;
        }
        self.paths.handle_timeout(now);
        while let Some((id, ping)) = self.paths.poll_ping() {
            if let Some(p) = self.paths.path(id) {
                if self.paced() && self.paths.sending().contains(&id) {
                    // Behind every frame released so far on this path, which the pong counts.
                    // Idle candidates carry no data, so their pongs say nothing of a rate.
                    self.pacer(now, id).on_ping(now, ping);
                }
                self.seal_to(&[p], true, Inner::Ping(ping));
            }
        }
        self.send_advert(now);
        if self.flush_now || now >= self.next_tick {
            self.flush(now);
        }
        if self.paced() && !self.is_closed() {
            self.pace(now);
        }
        self.drain_paths();
    }

    /// Whether sending is paced per path: the profiles after bandwidth.
    fn paced(&self) -> bool {
        self.profile.policy == Policy::Widest
    }

    fn pacer(&mut self, now: Instant, id: PathId) -> &mut Pacer {
        let i = usize::from(id.0);
        while self.pacers.len() <= i {
            self.pacers.push(Pacer::new(now));
        }
        &mut self.pacers[i]
    }

    fn renet_update(&mut self, now: Instant) {
        self.renet.update(now.saturating_duration_since(self.renet_at));
        self.renet_at = now;
    }

    /// Hands renet as much of the backlog as its buffers take.
    fn feed_backlog(&mut self) {
        while let Some(m) = self.backlog.front() {
            if !self.renet.can_send_message(CHANNEL, m.len()) {
                break;
            }
            let m = self.backlog.pop_front().unwrap_or_default();
            self.backlog_bytes -= m.len();
            self.renet.send_message(CHANNEL, m);
        }
    }

    /// Paced profiles: keeps each sending path's queue about one tick deep from renet's
    /// output, each frame on the path where it would arrive first, and releases what each
    /// path's rate allows.
    fn pace(&mut self, now: Instant) {
        let sending = self.paths.sending().to_vec();
        let Some(&primary) = sending.first() else { return };
        for &id in &sending {
            self.pacer(now, id);
        }
        // Frames queued on a path that stopped sending go to the ones that still do; sealed
        // frames are not tied to a path.
        let mut moved = VecDeque::new();
        for (i, p) in self.pacers.iter_mut().enumerate() {
            if p.sent() > 0 && !sending.contains(&PathId(i as u8)) {
                moved.extend(p.take_queue());
                // What it measured is stale by the time it carries data again: it starts over.
                *p = Pacer::new(now);
            }
        }
        if self.profile.redundancy {
            // Each of these has a twin queued on the other path, which may still be sending:
            // moving it could put both copies on one path.
            moved.clear();
        }
        for frame in moved {
            let id = self.pick(&sending, frame.len());
            self.pacers[usize::from(id.0)].enqueue(frame);
        }
        self.renet_update(now);
        self.feed_backlog();
        let mut pulls = 0;
        while self.pull_ok && pulls < MAX_PULLS && self.wants_more(&sending) {
            pulls += 1;
            let packets = self.renet.get_packets_to_send();
            if let Some(reason) = self.renet.disconnect_reason() {
                self.finish(CloseReason::Protocol(format!("{reason}")));
                return;
            }
            let mut data = false;
            for p in packets {
                if p.first() == Some(&RENET_ACK_PACKET) {
                    // Renet emits an ack packet on every call while it holds acks the peer
                    // has not confirmed; one per tick carries them all (a dropped one is as
                    // good as lost, and the next repeats it). Acks are small and
                    // time-critical: unpaced, on the primary.
                    if self.acked_at.is_none_or(|t| now >= t + self.profile.tick)
                        && let Some(path) = self.paths.path(primary)
                    {
                        self.acked_at = Some(now);
                        self.ack_due = false;
                        self.seal_to(&[path], false, Inner::Renet(&p));
                    }
                    continue;
                }
                data = true;
                let Some(frame) = self.seal(Inner::Renet(&p)) else { continue };
                if self.profile.redundancy && sending.len() >= 2 {
                    // The same sealed frame on the primary and on its disjoint second path,
                    // unless that path is already a tick behind: the copy is optional, and a
                    // late one is no use.
                    let second = &mut self.pacers[usize::from(sending[1].0)];
                    if second.drain_time(frame.len()) <= self.profile.tick {
                        second.enqueue(frame.clone());
                    }
                    self.pacers[usize::from(primary.0)].enqueue(frame);
                } else {
                    let id = self.pick(&sending, frame.len());
                    self.pacers[usize::from(id.0)].enqueue(frame);
                }
            }
            if !data {
                self.pull_ok = false;
            }
        }
        for &id in &sending {
            let Some(path) = self.paths.path(id) else { continue };
            while let Some(frame) = self.pacers[usize::from(id.0)].poll_release(now) {
                self.paths.on_data_sent(id, frame.len());
                self.push(VcTransmit { path, trace: false, frame });
            }
        }
    }

    /// Whether some sending path's queue is shorter than one tick.
    fn wants_more(&self, sending: &[PathId]) -> bool {
        sending.iter().any(|id| self.pacers.get(usize::from(id.0)).is_none_or(|p| p.drain_time(0) < self.profile.tick))
    }

    /// The sending path where a frame of `len` bytes queued now would arrive first.
    ///
    /// No queue is filled past [`MAX_QUEUE_TICKS`] ticks: a frame waiting in it has started
    /// renet's resend timer, so a deep queue would have renet send it again before it left.
    fn pick(&self, sending: &[PathId], len: usize) -> PathId {
        let cap = self.profile.tick * MAX_QUEUE_TICKS;
        let drain = |id: &PathId| self.pacers.get(usize::from(id.0)).map_or(Duration::ZERO, |p| p.drain_time(len));
        let arrival = |id: &PathId| drain(id) + self.paths.srtt(*id).unwrap_or_default() / 2;
        let open = sending.iter().copied().filter(|id| drain(id) <= cap).min_by_key(arrival);
        open.or_else(|| sending.iter().copied().min_by_key(drain)).unwrap_or(PathId(0))
    }

    /// Hands the backlog to renet as its buffers allow, and sends what renet emits (paced
    /// profiles leave the sending to [`VirtualConnection::pace`]).
    fn flush(&mut self, now: Instant) {
        self.flush_now = false;
        self.next_tick = now + self.profile.tick;
        self.renet_update(now);
        self.feed_backlog();
        if self.paced() {
            self.pull_ok = true;
            return;
        }
        let sending = self.paths.sending().to_vec();
        if sending.is_empty() {
            return;
        }
        let packets = self.renet.get_packets_to_send();
        if let Some(reason) = self.renet.disconnect_reason() {
            self.finish(CloseReason::Protocol(format!("{reason}")));
            return;
        }
        // The primary, plus the redundant copy when the profile asks for one.
        let n = if self.profile.redundancy { sending.len().min(2) } else { 1 };
        let paths: Vec<Path> = sending[..n].iter().filter_map(|&i| self.paths.path(i)).collect();
        for p in packets {
            let data = p.first() != Some(&RENET_ACK_PACKET);
            let Some(frame) = self.seal(Inner::Renet(&p)) else { return };
            for (&id, &path) in sending.iter().zip(&paths) {
                if data {
                    self.paths.on_data_sent(id, frame.len());
                }
                self.push(VcTransmit { path, trace: false, frame: frame.clone() });
            }
        }
    }

    /// When [`VirtualConnection::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let mut t = self.last_heard + IDLE_TIMEOUT;
        if let State::Handshaking { since } = self.state {
            t = t.min(since + HANDSHAKE_TIMEOUT);
        }
        if !self.confirmed {
            t = t.min(self.hello_next);
        }
        if self.keys.is_some() {
            t = t.min(self.paths.poll_timeout(now));
            if let Some(a) = &self.advert {
                t = t.min(a.next);
            }
            if self.flush_now {
                t = now;
            } else if self.needs_tick() {
                t = t.min(self.next_tick);
            }
            if self.paced() {
                let sending = self.paths.sending();
                if self.pull_ok && !sending.is_empty() && self.wants_more(sending) {
                    t = now;
                }
                for id in sending {
                    if let Some(r) = self.pacers.get(usize::from(id.0)).and_then(|p| p.next_release(now)) {
                        t = t.min(r);
                    }
                }
            }
        }
        Some(t)
    }

    /// Whether renet has anything to say on the next tick: queued or unacknowledged
    /// messages. An idle VC does not tick; its pings keep the paths measured.
    fn needs_tick(&self) -> bool {
        !self.backlog.is_empty()
            || self.ack_due
            || (self.profile.is_reliable() && self.renet.channel_available_memory(CHANNEL) < self.profile.max_buffered)
    }

    /// The next frame to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<VcTransmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<VcEvent> {
        self.events.pop_front()
    }

    /// What the VC measures now.
    pub fn stats(&self, now: Instant) -> VcStats {
        let mut paths = self.paths.info(now);
        for p in &mut paths {
            if let Some(pacer) = self.pacers.get(usize::from(p.id.0)) {
                let s = pacer.stats();
                p.stats.pacing_rate = Some(s.rate);
                p.stats.delivery_rate = Some(s.delivery_rate);
            }
        }
        let primary = self.paths.sending().first().and_then(|id| paths.iter().find(|p| p.id == *id)).cloned();
        let info = self.renet.network_info();
        VcStats {
            rtt: primary.as_ref().and_then(|p| p.stats.srtt),
            jitter: primary.as_ref().map_or(Duration::ZERO, |p| p.stats.jitter),
            loss: primary.as_ref().map_or(0.0, |p| p.stats.loss),
            send_bytes_per_sec: info.bytes_sent_per_second,
            recv_bytes_per_sec: info.bytes_received_per_second,
            path: primary,
            paths,
            counters: self.counters,
        }
    }

    /// The counters alone.
    pub fn counters(&self) -> &VcCounters {
        &self.counters
    }
}

fn now_skew(clock: &WallClock, now: Instant, unix_ms: u64) -> Duration {
    let ours = clock.unix_us(now) / 1000;
    Duration::from_millis(ours.abs_diff(unix_ms))
}
