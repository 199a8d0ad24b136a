//! One virtual connection: an end-to-end encrypted session with one peer, with its own keys,
//! its own renet connection (reliability and channels, from the profile), its own choice of
//! paths and its own counters. Nothing one VC sees can change another; what they share is the
//! peer's path measurements ([`PathSet`]), which only authenticated frames feed.
//!
//! Sans-IO, driven by [`crate::Node`], which passes the peer's [`PathSet`] into every call:
//! feed frames with [`VirtualConnection::handle_frame`], call
//! [`VirtualConnection::handle_timeout`] when [`VirtualConnection::poll_timeout`] is due, and
//! after each input drain [`VirtualConnection::poll_transmit`] and
//! [`VirtualConnection::poll_event`].
//!
//! The code is split by concern: the key exchange (`handshake`), sending, pacing and the
//! pings and pongs that ride on data (`send`), and address advertisements (`advert`).

mod advert;
mod handshake;
mod send;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use renet::{Bytes, RenetClient};
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::VcId;
use shoal_protocol::{Identity, NodeId, PublicKey, Signature};

pub use handshake::{HELLO_MAX_SKEW, HelloError, check_hello};

use crate::crypto::{CryptoError, Ephemeral, HelloBody, SessionKeys};
use crate::frame::{self, Frame, Inner};
use crate::pacing::Pacer;
use crate::path::{PathEvent, PathId, PathInfo, PathSet, Selector, SwitchReason};
use crate::profile::{Policy, Profile};

/// The one renet channel of a VC; its delivery comes from the profile.
const CHANNEL: u8 = crate::profile::RENET_CHANNEL;
/// A VC whose peer has not answered its hello by then is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A VC closes when nothing authenticated has come from its peer, on it or on any other VC
/// with the peer, for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Renet's type byte for an ack-only packet, which needs no ack of its own soon.
const RENET_ACK_PACKET: u8 = crate::frame::RENET_ACK;
/// Messages that arrived outside renet and wait for the game, at most; past this the
/// newest are dropped (and counted stale): an unreliable VC's reader that falls this far
/// behind wants the latest state, not a backlog.
const MAX_INBOX: usize = 1024;
/// Direct candidates a peer's advertisements may add to a VC (see
/// [`crate::path::MAX_LEARNED_PATHS`], which bounds every learned path).
pub const MAX_ADVERTISED_PATHS: usize = crate::path::MAX_LEARNED_PATHS;

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
    /// Advertised candidates refused: not a usable address, or every learned path in use.
    pub candidates_refused: u64,
    /// Authenticated frames from an address that could not become a path (every learned path
    /// in use): processed, but nothing is sent there.
    pub unlearned_sources: u64,
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
    /// Whether it carries the game's messages (renet data). A frame that does not is
    /// overhead as a whole: a hello, a ping or pong on its own, an ack, a close.
    pub carries_data: bool,
    /// Bytes within a data frame that are measurement and acks riding along.
    pub riding: usize,
}

/// What a received frame turned out to be, for the node's account of its traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameSeen {
    /// It authenticated (or was a genuine hello).
    pub genuine: bool,
    /// It carried the game's messages.
    pub carries_data: bool,
    /// Bytes of measurement and acks riding in it, if it carried data.
    pub riding: usize,
}

#[derive(Debug)]
enum State {
    Handshaking { since: Instant },
    Open,
    Closed,
}

/// A pong waiting for a frame to ride on.
#[derive(Debug, Clone, Copy)]
struct HeldPong {
    path: Path,
    id: Option<PathId>,
    ping: u32,
    received: Instant,
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
    /// Hello rounds sent: each retry tries the next relayed path.
    hello_rounds: u32,
    renet: RenetClient,
    renet_at: Instant,
    next_tick: Instant,
    flush_now: bool,
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
    sel: Selector,
    /// Paced profiles: one pacer per candidate, by path id.
    pacers: Vec<Pacer>,
    /// Paced profiles: renet may have packets to emit (until a call emits none).
    pull_ok: bool,
    /// Reliable profiles: data arrived that renet has not acknowledged yet; the ack goes with
    /// the next tick's frames instead of following every packet.
    ack_due: bool,
    /// Paced profiles: when the last ack-only packet left.
    acked_at: Option<Instant>,
    /// Highest packet number of a renet packet or message processed: for latest-wins
    /// delivery.
    newest_renet: Option<u64>,
    /// Unreliable VCs: messages waiting for the next flush, outside renet.
    outbox: VecDeque<Bytes>,
    /// Messages that arrived outside renet, for [`VirtualConnection::recv`].
    inbox: VecDeque<Bytes>,
    /// The id our node knows this VC by, for the peer's short-form datagrams.
    short_local: Option<u32>,
    /// The id the peer's node knows this VC by: direct frames to it go in the short form.
    short_peer: Option<u32>,
    /// The peer sent us a short-form datagram: it has our id, which need not be told again.
    short_confirmed: bool,
    /// When our id last rode on a frame.
    short_told_at: Option<Instant>,
    last_heard: Instant,
    /// Pongs waiting for a frame going their way.
    held_pongs: Vec<HeldPong>,
    advert: advert::AdvertState,
    transmits: VecDeque<VcTransmit>,
    events: VecDeque<VcEvent>,
    counters: VcCounters,
}

fn renet_for(profile: &Profile) -> RenetClient {
    let mut c = RenetClient::new(profile.renet_config());
    c.set_connected();
    c
}

/// Why a VC could not be opened.
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
    /// A VC to `peer` (whose long-term key is `peer_key`) on `vc`. It starts the key exchange
    /// at once, on every candidate of `paths`.
    pub fn new(
        now: Instant,
        identity: Identity,
        clock: WallClock,
        peer_key: PublicKey,
        vc: VcId,
        profile: Profile,
    ) -> Result<VirtualConnection, OpenError> {
        let peer = peer_key.node_id();
        let ephemeral = Ephemeral::generate()?;
        let my_hello = handshake::make_hello(&identity, &ephemeral, &clock, now, &profile, peer, vc);
        Ok(VirtualConnection {
            identity,
            peer,
            peer_key,
            vc,
            renet: renet_for(&profile),
            sel: Selector::new(profile.clone()),
            profile,
            clock,
            state: State::Handshaking { since: now },
            ephemeral,
            my_hello,
            peer_hello: None,
            keys: None,
            confirmed: false,
            // The first handle_timeout sends the hello.
            hello_next: now,
            hello_backoff: handshake::HELLO_RETRY,
            hello_rounds: 0,
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
            outbox: VecDeque::new(),
            inbox: VecDeque::new(),
            short_local: None,
            short_peer: None,
            short_confirmed: false,
            short_told_at: None,
            last_heard: now,
            held_pongs: Vec::new(),
            advert: advert::AdvertState::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: VcCounters::default(),
        })
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

    /// Whether the VC holds keys (it can seal frames: pings for the peer's paths, say).
    pub fn has_keys(&self) -> bool {
        self.keys.is_some() && !self.is_closed()
    }

    /// Whether the VC is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The paths it sends on, primary first.
    pub fn sending(&self) -> &[PathId] {
        self.sel.sending()
    }

    /// Whether it paces its sending per path (the bandwidth profiles).
    pub fn paced(&self) -> bool {
        self.profile.policy == Policy::Widest
    }

    /// Our node knows this VC by `id`: the peer is told, so that it can send to us in the
    /// short form.
    pub fn set_short_id(&mut self, id: u32) {
        self.short_local = Some(id);
    }

    /// The id our node knows this VC by.
    pub fn short_id(&self) -> Option<u32> {
        self.short_local
    }

    /// The id the peer's node knows this VC by, once it told us: frames on a direct path go
    /// to it in the short form.
    pub fn short_peer(&self) -> Option<u32> {
        self.short_peer
    }

    /// Bytes of headers a sealed frame on the primary path carries above UDP, besides its
    /// items: the short form's on a direct path once the peer's id is known, else the mesh
    /// header (with the route) and the sealed frame's type, packet number and tag.
    pub fn header_bytes(&self, paths: &PathSet) -> Option<usize> {
        let path = paths.path(*self.sel.sending().first()?)?;
        Some(match path {
            Path::Direct(_) if self.short_peer.is_some() => frame::SHORT_HEADER_LEN + crate::crypto::TAG_LEN,
            Path::Direct(_) => shoal_mesh::wire::HEADER_LEN + frame::SEALED_OVERHEAD - 1,
            Path::Relayed(r) => {
                shoal_mesh::wire::HEADER_LEN + r.len() * shoal_mesh::wire::ROUTE_ENTRY_LEN + frame::SEALED_OVERHEAD - 1
            }
        })
    }

    /// A short-form frame from the peer authenticated: it has our id.
    pub fn on_short_received(&mut self) {
        self.short_confirmed = true;
    }

    /// The highest packet number an authenticated frame from the peer carried, if any: what
    /// a short-form datagram's 16 bits are read against.
    pub fn highest_received_pn(&self) -> Option<u64> {
        self.keys.as_ref().and_then(SessionKeys::highest_received)
    }

    /// The peer's candidate `id` now names another path: forget what this VC knew of it.
    pub fn forget_path(&mut self, now: Instant, paths: &PathSet, id: PathId) {
        if let Some(p) = self.pacers.get_mut(usize::from(id.0)) {
            *p = Pacer::new(now);
        }
        self.sel.forget(now, paths, id);
        self.drain_selector();
    }

    fn finish(&mut self, reason: CloseReason) {
        self.state = State::Closed;
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.held_pongs.clear();
        self.events.push_back(VcEvent::Closed(reason));
    }

    /// A local send on `path` failed (its first relay is not bound): the path counts as
    /// silent.
    pub fn on_unusable(&mut self, paths: &mut PathSet, path: &Path) {
        if let Some(id) = paths.find(path) {
            paths.on_unusable(id);
        }
    }

    /// A frame from the peer arrived over `path`, with the per-hop latencies of its trace.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        paths: &mut PathSet,
        path: Path,
        hops: Option<Vec<Duration>>,
        bytes: &mut [u8],
    ) -> FrameSeen {
        let mut seen = FrameSeen::default();
        if self.is_closed() {
            return seen;
        }
        // Only an authenticated frame may add a path (below): an address that merely claims to
        // be the peer must not make the VC send to it.
        let mut id = paths.find(&path);
        match Frame::parse(bytes) {
            Ok(Frame::Hello(h, sig)) => {
                let before = self.counters.bad_hellos;
                if self.on_hello(now, paths, path, h, &sig) {
                    self.answer_unknown_address(paths, path);
                }
                seen.genuine = self.counters.bad_hellos == before;
            }
            Ok(Frame::Sealed { pn, .. }) => {
                let Some(keys) = self.keys.as_mut() else {
                    self.counters.early += 1;
                    return seen;
                };
                let aad = frame::aad(pn, self.peer, self.identity.node_id(), self.vc);
                let len = bytes.len();
                match keys.open(pn, aad, &mut bytes[9..]) {
                    Ok(plain) => {
                        let Ok(items) = frame::parse_items(plain) else {
                            // Authenticated but unreadable: the peer's bug or another version,
                            // not an attack on the path.
                            self.counters.malformed += 1;
                            return seen;
                        };
                        if id.is_none() {
                            // The peer from an address we did not know: it moved, or its NAT
                            // mapped it to a port no introduction could name.
                            id = paths.learn(now, path);
                            if id.is_none() {
                                self.counters.unlearned_sources += 1;
                            }
                        }
                        self.counters.frames_received += 1;
                        self.counters.bytes_received += len as u64;
                        self.last_heard = now;
                        if !self.confirmed {
                            self.confirmed = true;
                            paths.on_confirmed(now);
                        }
                        seen.genuine = true;
                        for i in items.clone() {
                            if i.is_data() {
                                seen.carries_data = true;
                            } else {
                                seen.riding += i.wire_len(false);
                            }
                        }
                        if !seen.carries_data {
                            seen.riding = 0;
                        }
                        if let Some(id) = id {
                            paths.on_frame(now, id, seen.carries_data);
                            if let Some(h) = hops {
                                paths.on_trace(id, h);
                            }
                        }
                        for item in items {
                            self.on_item(now, paths, path, id, pn, len, item);
                            if self.is_closed() {
                                break;
                            }
                        }
                    }
                    Err(CryptoError::Replay(_)) => {
                        self.counters.duplicates += 1;
                        // On a paced redundant VC the slower path's copies all land here; they
                        // still count as what that path delivered, or it would look lossy.
                        if self.profile.policy == Policy::Widest
                            && self.profile.redundancy
                            && let Some(id) = id
                            && let Ok(plain) = keys.open_duplicate(pn, aad, &mut bytes[9..])
                            && frame::parse_items(plain).is_ok_and(|mut items| items.any(|i| i.is_data()))
                        {
                            self.sel.on_data_received(id, len);
                        }
                    }
                    Err(_) => self.on_auth_failure(now, paths, id),
                }
            }
            Err(_) => {
                // Once keys exist, anything unreadable on a path is as suspect as a bad tag.
                self.counters.malformed += 1;
                if self.keys.is_some() {
                    self.on_auth_failure(now, paths, id);
                }
            }
        }
        self.drain_selector();
        seen
    }

    /// Acts on a hello the node has checked with [`check_hello`] (it creates a VC for a hello
    /// only after that), as if it had come through [`VirtualConnection::handle_frame`].
    pub fn handle_checked_hello(&mut self, now: Instant, paths: &PathSet, path: Path, h: HelloBody) {
        if self.take_hello(now, paths, Some(path), h) {
            self.answer_unknown_address(paths, path);
        }
    }

    /// A genuine hello the peer is waiting for us to answer came from an address we did not
    /// know: the peer's NAT mapped it to a port no introduction could name (an
    /// address-dependent or symmetric NAT), and our hellos to the named ones are filtered.
    /// Answer there, once per hello, so the peer gets its keys directly instead of over the
    /// relay; the address becomes a path only once a sealed frame from it authenticates.
    fn answer_unknown_address(&mut self, paths: &PathSet, path: Path) {
        if paths.find(&path).is_none() && matches!(path, Path::Direct(_)) {
            let bytes = frame::write_hello(&self.my_hello.0, &self.my_hello.1);
            self.push(VcTransmit { path, trace: false, frame: bytes, carries_data: false, riding: 0 });
        }
    }

    /// The unix time (ms) of the peer's hello this VC's keys came from, if any: the node
    /// refuses hellos for this VC id that are not newer once the VC is gone.
    pub fn peer_hello_ms(&self) -> Option<u64> {
        self.peer_hello.map(|h| h.unix_ms)
    }

    fn on_auth_failure(&mut self, now: Instant, paths: &PathSet, id: Option<PathId>) {
        self.counters.auth_failures += 1;
        if let Some(id) = id {
            self.sel.on_auth_failure(now, paths, id);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_item(
        &mut self,
        now: Instant,
        paths: &mut PathSet,
        path: Path,
        id: Option<PathId>,
        pn: u64,
        len: usize,
        item: Inner<'_>,
    ) {
        match item {
            Inner::Renet(packet) => self.on_renet(now, id, pn, len, packet),
            Inner::Message(m) => self.on_message(id, pn, len, m),
            Inner::ShortId(short) => self.short_peer = Some(short),
            Inner::Ping { id: ping, urgent } => self.on_ping(now, paths, path, id, ping, urgent),
            Inner::Pong { ping, held, delivered } => {
                let Some(id) = id else { return };
                let held = frame::HELD_UNIT * u32::from(held);
                let Some(rtt) = paths.on_pong(now, id, ping, held) else { return };
                let srtt = paths.srtt(id).unwrap_or(rtt);
                if let Some(p) = self.pacers.get_mut(usize::from(id.0)) {
                    p.on_pong(now, ping, delivered, rtt, srtt);
                    if let Some(cap) = p.capacity() {
                        paths.on_capacity(id, cap);
                    }
                }
            }
            Inner::Close(_) => self.finish(CloseReason::Peer),
            Inner::Candidates(c) => self.on_candidates(now, paths, path, &c),
            Inner::CandidatesAck(seq) => self.advert.acked(seq),
            Inner::Confirm => {}
        }
    }

    /// A message outside renet: an unreliable VC's, so the latest wins (or, with redundant
    /// copies, every first copy counts).
    fn on_message(&mut self, id: Option<PathId>, pn: u64, len: usize, m: &[u8]) {
        if let Some(id) = id {
            self.sel.on_data_received(id, len);
        }
        if !self.profile.redundancy && self.newest_renet.is_some_and(|n| pn < n) {
            self.counters.stale += 1;
            return;
        }
        self.newest_renet = Some(self.newest_renet.map_or(pn, |n| n.max(pn)));
        if self.inbox.len() < MAX_INBOX {
            self.inbox.push_back(Bytes::copy_from_slice(m));
        } else {
            self.counters.stale += 1;
        }
    }

    fn on_renet(&mut self, now: Instant, id: Option<PathId>, pn: u64, len: usize, packet: &[u8]) {
        let is_ack = packet.first() == Some(&RENET_ACK_PACKET);
        if let Some(id) = id
            && !is_ack
        {
            self.sel.on_data_received(id, len);
        }
        // Latest wins: an unreliable packet overtaken by a newer one carries only superseded
        // state. With redundant copies, the slower path's copy of a packet the faster path
        // lost is the point of redundancy, so it is delivered even when a newer one came
        // first.
        let latest_wins = !self.profile.is_reliable() && !self.profile.redundancy;
        if latest_wins && self.newest_renet.is_some_and(|n| pn < n) {
            self.counters.stale += 1;
            return;
        }
        self.newest_renet = Some(self.newest_renet.map_or(pn, |n| n.max(pn)));
        if is_ack {
            // Acks free renet's buffers and end resend timers: there may be more to send.
            self.pull_ok = true;
        } else if self.profile.is_reliable() {
            self.ack_due = true;
            // Acked at once (see the send module's docs); paced VCs ack with their tick.
            if !self.paced() {
                self.flush_now = true;
            }
        }
        self.renet.update(now.saturating_duration_since(self.renet_at));
        self.renet_at = now;
        self.renet.process_packet(packet);
        if let Some(reason) = self.renet.disconnect_reason() {
            self.finish(CloseReason::Protocol(format!("{reason}")));
        }
    }

    fn drain_selector(&mut self) {
        while let Some(e) = self.sel.poll_event() {
            self.events.push_back(match e {
                PathEvent::Changed { old, new, reason } => VcEvent::PathChanged { old, new, reason },
                PathEvent::Abandoned { path, failures } => VcEvent::PathAbandoned { path, failures },
                PathEvent::Degraded { path } => VcEvent::Degraded { path },
            });
        }
    }

    /// Retransmits hellos, re-evaluates the paths, sends what is due (renet's tick, pongs
    /// that waited long enough, advertisements), and closes a VC whose peer is gone.
    /// `peer_heard` is the last time anything authenticated came from the peer on any VC.
    pub fn handle_timeout(&mut self, now: Instant, paths: &mut PathSet, peer_heard: Option<Instant>) {
        if self.is_closed() {
            return;
        }
        if let State::Handshaking { since } = self.state
            && now.saturating_duration_since(since) >= HANDSHAKE_TIMEOUT
        {
            self.finish(CloseReason::HandshakeTimeout);
            return;
        }
        let heard = peer_heard.map_or(self.last_heard, |h| h.max(self.last_heard));
        if self.keys.is_some() && now.saturating_duration_since(heard) >= IDLE_TIMEOUT {
            self.finish(CloseReason::TimedOut);
            return;
        }
        if !self.confirmed && now >= self.hello_next {
            self.send_hellos(now, paths);
            self.hello_next = now + self.hello_backoff;
            self.hello_backoff = (self.hello_backoff * 2).min(handshake::HELLO_RETRY_MAX);
        }
        if self.keys.is_none() {
            return;
        }
        self.sel.reselect(now, paths, None);
        self.send_advert(now, paths);
        if self.flush_now || now >= self.next_tick {
            self.flush(now, paths);
        }
        if self.paced() && !self.is_closed() {
            self.pace(now, paths);
        }
        self.release_pongs(now, paths, false);
        self.drain_selector();
    }

    /// When [`VirtualConnection::handle_timeout`] is next due for this VC's own timers (the
    /// node also calls it when the peer's [`PathSet`] is due).
    #[must_use]
    pub fn poll_timeout(&self, now: Instant, paths: &PathSet, peer_heard: Option<Instant>) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let heard = peer_heard.map_or(self.last_heard, |h| h.max(self.last_heard));
        let mut t = heard + IDLE_TIMEOUT;
        if let State::Handshaking { since } = self.state {
            t = t.min(since + HANDSHAKE_TIMEOUT);
        }
        if !self.confirmed {
            t = t.min(self.hello_next);
        }
        if self.keys.is_some() {
            if let Some(next) = self.advert.next() {
                t = t.min(next);
            }
            if let Some(p) = self.held_pongs.iter().map(|p| p.received + frame::PONG_HOLD).min() {
                t = t.min(p);
            }
            if let Some(a) = self.sel.poll_timeout(now, paths) {
                t = t.min(a);
            }
            if self.flush_now {
                t = now;
            } else if self.needs_tick() {
                t = t.min(self.next_tick);
            }
            if self.paced() {
                let sending = self.sel.sending();
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
    /// messages, or an ack owed. An idle VC does not tick.
    fn needs_tick(&self) -> bool {
        !self.backlog.is_empty()
            || !self.outbox.is_empty()
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
    pub fn stats(&self, now: Instant, paths: &PathSet) -> VcStats {
        let mut infos = self.sel.info(now, paths);
        for p in &mut infos {
            if let Some(pacer) = self.pacers.get(usize::from(p.id.0)) {
                let s = pacer.stats();
                p.stats.pacing_rate = Some(s.rate);
                p.stats.delivery_rate = Some(s.delivery_rate);
            }
        }
        let primary = self.sel.sending().first().and_then(|id| infos.iter().find(|p| p.id == *id)).cloned();
        let info = self.renet.network_info();
        VcStats {
            rtt: primary.as_ref().and_then(|p| p.stats.srtt),
            jitter: primary.as_ref().map_or(Duration::ZERO, |p| p.stats.jitter),
            loss: primary.as_ref().map_or(0.0, |p| p.stats.loss),
            send_bytes_per_sec: info.bytes_sent_per_second,
            recv_bytes_per_sec: info.bytes_received_per_second,
            path: primary,
            paths: infos,
            counters: self.counters,
        }
    }

    /// The counters alone.
    pub fn counters(&self) -> &VcCounters {
        &self.counters
    }
}
