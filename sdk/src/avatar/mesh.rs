//! One player's side of the avatar mesh: serving its avatar to its neighbours and showing
//! theirs, and, beyond them, publishing it for watchers through a relay and showing the
//! players it watches.
//!
//! Sans-IO. The game sets its avatar each tick ([`AvatarMesh::set_avatar`]); the session
//! adds and removes neighbours as the control server introduces and dismisses them, with
//! their distances; [`AvatarMesh::poll_messages`] says what to send on each neighbour's
//! realtime VC, and [`AvatarMesh::handle_message`] takes what arrived on it. A message holds
//! an avatar update, the ack of the newest update we decoded from that neighbour, or both:
//!
//! | byte 0 | then |
//! |---|---|
//! | bit 0: an ack follows; bit 1: it asks for a full state; bit 2: an update follows | the ack's tick (2 bytes, big-endian) if bit 0, then the update (see [`super::codec`]) if bit 2 |

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use shoal_protocol::NodeId;
use shoal_protocol::subscription::AVATAR_STREAM;

use super::AvatarState;
use super::codec::{Ack, DecodeError, Decoder, Encoder};
use super::interp::{InterpConfig, Interpolator};
use super::quant::Quantizer;
use super::schedule::{RateConfig, Scheduler};
use super::stream::{StreamDecoder, StreamEncoder, StreamOpener, StreamSealer};

const HAS_ACK: u8 = 1;
const NEED_FULL: u8 = 2;
const HAS_UPDATE: u8 = 4;
/// IPv4 and UDP headers, counted against the budget for every datagram.
const IP_UDP: usize = crate::node::IP_UDP_HEADERS as usize;
/// How long an ack waits for an update of ours to ride on before it goes alone. A datagram's
/// headers cost far more than an ack, so acks ride on updates: to a neighbour served at the
/// floor rate one goes at least every half second, which keeps the sender's baselines well
/// within [`super::MAX_AGE`]. Only to a neighbour the budget holds back further does an ack
/// go alone (and a request for a full state always does, at once).
pub const ACK_DELAY: Duration = Duration::from_millis(600);

/// How long a former neighbour stays shown from its last updates (held, then still) while the
/// stream that will show it as a watched player has not: the control server's grant, the
/// subscription at the relay, and the stream's next key state. Without it the avatar would
/// leave and appear again at the change of tier.
pub const LINGER: Duration = Duration::from_secs(3);

/// What the game hears about its neighbours' avatars.
#[derive(Debug, Clone, PartialEq)]
pub enum AvatarEvent {
    /// A neighbour's first full state arrived: its avatar can be shown.
    Appeared(NodeId, AvatarState),
    /// A newer update from a shown neighbour arrived (the state as served; what to draw at a
    /// render time is [`AvatarMesh::avatar_of`]).
    Updated(NodeId, AvatarState),
    /// A neighbour was dismissed: its avatar is gone.
    Left(NodeId),
}

/// What an avatar mesh counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshCounters {
    /// Updates sent and received.
    pub updates_sent: u64,
    /// See `updates_sent`.
    pub updates_received: u64,
    /// Messages from neighbours that did not parse, or whose update did not decode.
    pub malformed: u64,
    /// Updates against a baseline we no longer hold (a full state was asked for).
    pub missing_baseline: u64,
    /// Messages from a peer that is not a neighbour.
    pub not_neighbour: u64,
    /// Messages sent (updates, acks, or both in one), and their bytes.
    pub messages_sent: u64,
    /// See `messages_sent`.
    pub bytes_sent: u64,
    /// Updates published to our relay for watchers, and their sealed bytes.
    pub published: u64,
    /// See `published`.
    pub published_bytes: u64,
    /// Updates decoded from the players we watch.
    pub watched_received: u64,
    /// Published datagrams refused: not sealed by the publisher's key, replayed, from a
    /// player we do not watch, or not decodable.
    pub watched_refused: u64,
    /// Published updates waiting for a key state (one was lost, or we just began watching).
    pub watched_waiting: u64,
}

/// Where and how we publish our avatar for watchers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Publishing {
    /// Our node id (the stream is sealed to it).
    pub me: NodeId,
    /// The relay that fans the stream out.
    pub relay: NodeId,
    /// The key that seals it, as given to the control server.
    pub key: [u8; 32],
    /// Updates a second.
    pub hz: f32,
}

#[derive(Debug)]
struct Publication {
    to: Publishing,
    encoder: StreamEncoder,
    /// Kept while publishing pauses (nobody watches): a sealer made anew would number from
    /// zero again under the same key, reusing nonces.
    sealer: StreamSealer,
    next: Instant,
    paused: bool,
}

/// A player we watch through its relay.
#[derive(Debug)]
struct Watched {
    key: [u8; 32],
    opener: StreamOpener,
    decoder: StreamDecoder,
    view: Interpolator,
    shown: bool,
    /// When the newest update decoded from the stream arrived.
    last: Option<Instant>,
}

#[derive(Debug)]
struct Neighbour {
    encoder: Encoder,
    decoder: Decoder,
    view: Interpolator,
    shown: bool,
    /// Our ack is owed since then: something was decoded (or a full state is needed).
    ack_due: Option<Instant>,
    /// The newest state decoded from it, and when it arrived: what observers report.
    last: Option<(Instant, AvatarState)>,
    /// Bytes of headers a datagram to it carries besides the message, as its path costs now.
    header_bytes: Option<usize>,
}

/// One player's avatar mesh. See the module docs.
#[derive(Debug)]
pub struct AvatarMesh {
    q: Quantizer,
    interp: InterpConfig,
    schedule: Scheduler,
    epoch: Instant,
    avatar: Option<AvatarState>,
    neighbours: BTreeMap<NodeId, Neighbour>,
    events: VecDeque<AvatarEvent>,
    counters: MeshCounters,
    /// Bytes of headers a datagram on a realtime VC carries besides the message, for the
    /// budget.
    header_bytes: usize,
    publication: Option<Publication>,
    watched: BTreeMap<NodeId, Watched>,
    /// Former neighbours still shown from their last updates, until when (see [`LINGER`]).
    lingering: BTreeMap<NodeId, (Interpolator, Instant)>,
}

impl AvatarMesh {
    /// A mesh whose avatar clock starts at `epoch`. `header_bytes` is what a realtime VC
    /// datagram carries besides the message (mesh header, VC frame, tag), for the budget.
    pub fn new(
        q: Quantizer,
        interp: InterpConfig,
        rates: RateConfig,
        header_bytes: usize,
        epoch: Instant,
    ) -> AvatarMesh {
        // Before an update was sent, assume a full state's size.
        let first = (header_bytes + IP_UDP + 32) as f64 * 8.0;
        AvatarMesh {
            q,
            interp,
            schedule: Scheduler::new(rates, first),
            epoch,
            avatar: None,
            neighbours: BTreeMap::new(),
            events: VecDeque::new(),
            counters: MeshCounters::default(),
            header_bytes,
            publication: None,
            watched: BTreeMap::new(),
            lingering: BTreeMap::new(),
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> MeshCounters {
        self.counters
    }

    /// The scheduler, for its rates.
    pub fn schedule(&self) -> &Scheduler {
        &self.schedule
    }

    /// Our avatar from now on.
    pub fn set_avatar(&mut self, state: AvatarState) {
        self.avatar = Some(state);
    }

    /// Adds `peer` as a neighbour at `distance` (until its avatar is shown; from then on the
    /// distance between the two avatars is used), or updates its distance.
    pub fn set_neighbour(&mut self, now: Instant, peer: NodeId, distance: f32) {
        let (q, interp) = (self.q, self.interp);
        // A former neighbour still lingering goes on from what it showed.
        let lingering = self.lingering.remove(&peer).map(|(view, _)| view);
        self.neighbours.entry(peer).or_insert_with(|| Neighbour {
            encoder: Encoder::new(q),
            decoder: Decoder::new(q),
            shown: lingering.is_some(),
            view: lingering.unwrap_or_else(|| Interpolator::new(interp, now)),
            ack_due: None,
            last: None,
            header_bytes: None,
        });
        self.schedule.set_distance(peer, distance);
    }

    /// A datagram to `peer` carries `bytes` of headers besides the message on its path now
    /// (the short form's on an established direct path, more when relayed).
    pub fn set_header_bytes(&mut self, peer: NodeId, bytes: usize) {
        if let Some(n) = self.neighbours.get_mut(&peer) {
            n.header_bytes = Some(bytes);
        }
    }

    /// The node has sent `wire_bytes` in all so far, counted on the wire (see
    /// [`Scheduler::observe_upload`]).
    pub fn observe_upload(&mut self, wire_bytes: u64) {
        self.schedule.observe_upload(wire_bytes);
    }

    /// `peer` is no longer a neighbour at `now`: its avatar leaves, unless its stream shows
    /// it (a player we watch), or may soon: it stays shown from its last updates for up to
    /// [`LINGER`] while it is not yet shown from a stream.
    pub fn remove_neighbour(&mut self, now: Instant, peer: NodeId) {
        if let Some(n) = self.neighbours.remove(&peer) {
            self.schedule.remove(peer);
            if n.shown && !self.watched.get(&peer).is_some_and(|w| w.shown) {
                self.lingering.insert(peer, (n.view, now + LINGER));
            }
        }
    }

    /// Former neighbours whose linger ran out without a stream to show them: they leave.
    fn expire_lingering(&mut self, now: Instant) {
        let events = &mut self.events;
        self.lingering.retain(|&peer, (_, until)| {
            let keep = now < *until;
            if !keep {
                events.push_back(AvatarEvent::Left(peer));
            }
            keep
        });
    }

    /// The avatar clock's tick at `now`.
    fn tick(&self, now: Instant) -> u32 {
        let ns = now.saturating_duration_since(self.epoch).as_nanos();
        (ns * u128::from(self.q.config().tick_hz) / 1_000_000_000) as u32
    }

    /// When [`AvatarMesh::poll_messages`] should be called next: the avatar clock's next tick
    /// while there are neighbours (updates are scheduled and owed acks sent at ticks), never
    /// without.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let linger = self.lingering.values().map(|(_, until)| *until).min();
        let mesh = self.poll_timeout_serving(now);
        match (mesh, linger) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_timeout_serving(&self, now: Instant) -> Option<Instant> {
        let publish = self.publication.as_ref().filter(|p| self.avatar.is_some() && !p.paused).map(|p| p.next.max(now));
        // Nothing to serve and no ack owed: nothing to do until an input.
        if self.avatar.is_none() && self.neighbours.values().all(|n| n.ack_due.is_none()) {
            return None;
        }
        if self.neighbours.is_empty() {
            return publish;
        }
        // In whole nanoseconds, rounded up, so that the next tick is never `now` itself.
        let hz = u128::from(self.q.config().tick_hz);
        let next = (u128::from(self.tick(now)) + 1) * 1_000_000_000;
        let ns = u64::try_from(next.div_ceil(hz)).unwrap_or(u64::MAX);
        let tick = self.epoch + Duration::from_nanos(ns);
        Some(publish.map_or(tick, |p| p.min(tick)))
    }

    /// The neighbours, in id order.
    pub fn neighbours(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.neighbours.keys().copied()
    }

    /// The newest state decoded from each neighbour and when it arrived, for observers'
    /// reports.
    pub fn received(&self) -> impl Iterator<Item = (NodeId, Instant, AvatarState)> + '_ {
        self.neighbours.iter().filter_map(|(&p, n)| n.last.map(|(at, s)| (p, at, s)))
    }

    /// Our avatar as last set.
    pub fn avatar(&self) -> Option<AvatarState> {
        self.avatar
    }

    /// What to send now, each on that neighbour's realtime VC: updates the schedule says are
    /// due, with our acks riding along, and acks that waited [`ACK_DELAY`] for an update in
    /// vain (or ask for a full state).
    pub fn poll_messages(&mut self, now: Instant) -> Vec<(NodeId, Vec<u8>)> {
        self.expire_lingering(now);
        let tick = self.tick(now);
        // Once a neighbour's avatar is shown, its distance is measured from ours.
        if let Some(me) = self.avatar {
            for (&peer, n) in &self.neighbours {
                if let Some(s) = n.shown.then(|| n.view.state_at(now)).flatten() {
                    self.schedule.set_distance(peer, s.position.distance(me.position));
                }
            }
        }
        let due = if self.avatar.is_some() { self.schedule.tick(now) } else { Vec::new() };
        let mut out = Vec::new();
        for (&peer, n) in &mut self.neighbours {
            let update = due.contains(&peer);
            let ack = n.ack_due.and_then(|since| n.decoder.ack().map(|a| (since, a)));
            let ack_alone = ack.is_some_and(|(since, a)| a.need_full || now >= since + ACK_DELAY);
            if !update && !ack_alone {
                continue;
            }
            let mut msg = vec![0u8];
            if let Some((_, a)) = ack {
                msg[0] |= HAS_ACK | if a.need_full { NEED_FULL } else { 0 };
                msg.extend_from_slice(&a.tick.to_be_bytes());
                n.ack_due = None;
            }
            if update && let Some(s) = &self.avatar {
                let (_, bytes) = n.encoder.encode(tick, s);
                msg[0] |= HAS_UPDATE;
                msg.extend_from_slice(&bytes);
                self.counters.updates_sent += 1;
            }
            if msg[0] == 0 {
                continue;
            }
            let wire = msg.len() + n.header_bytes.unwrap_or(self.header_bytes) + IP_UDP;
            if update {
                self.schedule.sent(peer, wire);
            } else {
                self.schedule.spent(wire);
            }
            self.counters.messages_sent += 1;
            self.counters.bytes_sent += msg.len() as u64;
            out.push((peer, msg));
        }
        out
    }

    /// A message from `peer` on its realtime VC.
    pub fn handle_message(&mut self, now: Instant, peer: NodeId, msg: &[u8]) {
        let Some(n) = self.neighbours.get_mut(&peer) else {
            self.counters.not_neighbour += 1;
            return;
        };
        let Some((&flags, mut rest)) = msg.split_first() else {
            self.counters.malformed += 1;
            return;
        };
        // Unknown bits, or a request for a full state with no ack to carry it.
        if flags & !(HAS_ACK | NEED_FULL | HAS_UPDATE) != 0 || flags & (HAS_ACK | NEED_FULL) == NEED_FULL {
            self.counters.malformed += 1;
            return;
        }
        if flags & HAS_ACK != 0 {
            let Some((tick, after)) = rest.split_first_chunk::<2>() else {
                self.counters.malformed += 1;
                return;
            };
            n.encoder.on_ack(Ack { tick: u16::from_be_bytes(*tick), need_full: flags & NEED_FULL != 0 });
            rest = after;
        }
        if flags & HAS_UPDATE == 0 {
            return;
        }
        match n.decoder.decode(rest) {
            Ok(d) => {
                self.counters.updates_received += 1;
                n.ack_due.get_or_insert(now);
                let at = d.tick as f64 / f64::from(self.q.config().tick_hz);
                n.view.push(now, at, d.state);
                n.last = Some((now, d.state));
                let watched = self.watched.get(&peer).is_some_and(|w| w.shown);
                self.events.push_back(if n.shown || watched {
                    n.shown = true;
                    AvatarEvent::Updated(peer, d.state)
                } else {
                    n.shown = true;
                    AvatarEvent::Appeared(peer, d.state)
                });
            }
            Err(DecodeError::MissingBaseline { .. } | DecodeError::NoState) => {
                self.counters.missing_baseline += 1;
                n.ack_due.get_or_insert(now);
            }
            Err(_) => self.counters.malformed += 1,
        }
    }

    /// The time on `peer`'s avatar clock (seconds from its start) that its avatar as shown at
    /// `now` stands for, once it has appeared: what tests compare against where it really was.
    pub fn render_time_of(&self, peer: NodeId, now: Instant) -> Option<f64> {
        match (self.neighbours.get(&peer).filter(|n| n.shown), self.watched.get(&peer).filter(|w| w.shown)) {
            (Some(n), _) => n.view.render_at(now),
            (None, Some(w)) => w.view.render_at(now),
            (None, None) => self.lingering.get(&peer)?.0.render_at(now),
        }
    }

    /// Neighbour `peer`'s avatar as shown at `now`, once it has appeared.
    pub fn avatar_of(&self, peer: NodeId, now: Instant) -> Option<AvatarState> {
        // A neighbour's direct updates come faster than its stream: they win while both do.
        match (self.neighbours.get(&peer).filter(|n| n.shown), self.watched.get(&peer).filter(|w| w.shown)) {
            (Some(n), _) => n.view.state_at(now),
            (None, Some(w)) => w.view.state_at(now),
            (None, None) => self.lingering.get(&peer)?.0.state_at(now),
        }
    }

    /// Starts publishing our avatar for watchers as `to` says, changes where, or with `None`
    /// pauses. A new key starts a new stream; after a pause, or on a new relay, the stream
    /// goes on under its key with a key state first (its watchers may be new).
    pub fn set_publishing(&mut self, now: Instant, to: Option<Publishing>) {
        let Some(to) = to else {
            if let Some(p) = &mut self.publication {
                p.paused = true;
            }
            return;
        };
        match &mut self.publication {
            Some(p) if p.to.key == to.key && p.to.me == to.me => {
                if p.paused || p.to.relay != to.relay {
                    p.encoder = StreamEncoder::new(self.q);
                    p.next = now;
                }
                p.to = to;
                p.paused = false;
            }
            _ => {
                self.publication = Some(Publication {
                    to,
                    encoder: StreamEncoder::new(self.q),
                    sealer: StreamSealer::new(&to.key, to.me, AVATAR_STREAM),
                    next: now,
                    paused: false,
                });
            }
        }
    }

    /// The sealed update to publish now, and the relay to publish it to, when one is due.
    pub fn poll_publish(&mut self, now: Instant) -> Option<(NodeId, Vec<u8>)> {
        let tick = self.tick(now);
        let state = self.avatar?;
        let p = self.publication.as_mut().filter(|p| !p.paused)?;
        if now < p.next {
            return None;
        }
        let every = Duration::from_secs_f64(1.0 / f64::from(p.to.hz.max(0.1)));
        // On schedule, but never a burst to catch up after a pause.
        p.next = (p.next + every).max(now);
        let (_, plain) = p.encoder.encode(tick, &state);
        let sealed = p.sealer.seal(&plain);
        self.counters.published += 1;
        self.counters.published_bytes += sealed.len() as u64;
        Some((p.to.relay, sealed))
    }

    /// Starts watching `publisher`'s stream sealed with `key` (or takes its new key).
    pub fn watch(&mut self, now: Instant, publisher: NodeId, key: [u8; 32]) {
        let (q, interp) = (self.q, self.interp);
        let w = self.watched.entry(publisher).or_insert_with(|| Watched {
            key,
            opener: StreamOpener::new(&key, publisher, AVATAR_STREAM),
            decoder: StreamDecoder::new(q),
            view: Interpolator::new(interp, now),
            shown: false,
            last: None,
        });
        if w.key != key {
            w.key = key;
            w.opener = StreamOpener::new(&key, publisher, AVATAR_STREAM);
            w.decoder = StreamDecoder::new(q);
        }
    }

    /// Stops watching `publisher`: its avatar leaves, unless it is a neighbour now.
    pub fn unwatch(&mut self, publisher: NodeId) {
        if let Some(w) = self.watched.remove(&publisher)
            && w.shown
            && !self.neighbours.get(&publisher).is_some_and(|n| n.shown)
        {
            self.events.push_back(AvatarEvent::Left(publisher));
        }
    }

    /// The players we watch, in id order.
    pub fn watched(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.watched.keys().copied()
    }

    /// The players we watch whose stream has shown their avatar, each with when its newest
    /// update arrived.
    pub fn watched_received(&self) -> impl Iterator<Item = (NodeId, Instant)> + '_ {
        self.watched.iter().filter_map(|(&p, w)| Some((p, w.last?)))
    }

    /// A copy of `publisher`'s stream the relay fanned out to us.
    pub fn handle_published(&mut self, now: Instant, publisher: NodeId, sealed: &[u8]) {
        let Some(w) = self.watched.get_mut(&publisher) else {
            self.counters.watched_refused += 1;
            return;
        };
        let Ok(plain) = w.opener.open(sealed) else {
            self.counters.watched_refused += 1;
            return;
        };
        match w.decoder.decode(now, &plain) {
            Ok(d) => {
                self.counters.watched_received += 1;
                let at = d.tick as f64 / f64::from(self.q.config().tick_hz);
                // A former neighbour lingering: its stream goes on from what it showed, on the
                // same avatar clock.
                let lingering = if w.shown { None } else { self.lingering.remove(&publisher) };
                let lingered = lingering.is_some();
                if let Some((view, _)) = lingering {
                    w.view = view;
                }
                w.view.push(now, at, d.state);
                w.last = Some(now);
                let neighbour = self.neighbours.get(&publisher).is_some_and(|n| n.shown);
                if !w.shown {
                    w.shown = true;
                    if !neighbour && !lingered {
                        self.events.push_back(AvatarEvent::Appeared(publisher, d.state));
                    }
                } else if !neighbour {
                    self.events.push_back(AvatarEvent::Updated(publisher, d.state));
                }
            }
            Err(DecodeError::MissingBaseline { .. } | DecodeError::NoState) => self.counters.watched_waiting += 1,
            Err(_) => self.counters.watched_refused += 1,
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<AvatarEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::avatar::CodecConfig;
    use crate::avatar::movement::Mover;

    const MS: Duration = Duration::from_millis(1);

    fn mesh(t0: Instant) -> AvatarMesh {
        let q = Quantizer::new(CodecConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        AvatarMesh::new(q, InterpConfig::default(), RateConfig::default(), 50, t0)
    }

    /// Two players 10 m apart, each moving, over a link of 30 ms that loses every seventh
    /// message: each sees the other appear, then moving close to where it was.
    #[test]
    fn two_players_see_each_other_move_through_loss() {
        let t0 = Instant::now();
        let (a_id, b_id) = (NodeId([1; 8]), NodeId([2; 8]));
        let (mut a, mut b) = (mesh(t0), mesh(t0));
        a.set_neighbour(t0, b_id, 10.0);
        b.set_neighbour(t0, a_id, 10.0);
        let (mut ma, mut mb) = (Mover::new(1, 100.0), Mover::new(2, 100.0));
        let mut in_flight: Vec<(Instant, NodeId, NodeId, Vec<u8>)> = Vec::new();
        let mut truth_b: Vec<(Instant, AvatarState)> = Vec::new();
        let mut sent = 0u64;
        let mut errors = Vec::new();
        let mut appeared = (false, false);
        for k in 0..60 * 20u32 {
            let now = t0 + MS * (k * 1000 / 60);
            a.set_avatar(ma.step(1.0 / 60.0));
            let sb = mb.step(1.0 / 60.0);
            b.set_avatar(sb);
            truth_b.push((now, sb));
            for (from, to, m) in a
                .poll_messages(now)
                .into_iter()
                .map(|(p, m)| (a_id, p, m))
                .chain(b.poll_messages(now).into_iter().map(|(p, m)| (b_id, p, m)))
            {
                sent += 1;
                if !sent.is_multiple_of(7) {
                    in_flight.push((now + 30 * MS, from, to, m));
                }
            }
            let (arrived, later): (Vec<_>, Vec<_>) = in_flight.drain(..).partition(|m| m.0 <= now);
            in_flight = later;
            for (_, from, to, m) in arrived {
                let target = if to == a_id { &mut a } else { &mut b };
                target.handle_message(now, from, &m);
            }
            while let Some(e) = a.poll_event() {
                appeared.0 |= matches!(e, AvatarEvent::Appeared(p, _) if p == b_id);
            }
            while let Some(e) = b.poll_event() {
                appeared.1 |= matches!(e, AvatarEvent::Appeared(p, _) if p == a_id);
            }
            // After two seconds, what a shows of b against where b was at the render time
            // (30 ms of link and a's interpolation delay ago).
            if k > 120
                && let Some(shown) = a.avatar_of(b_id, now)
            {
                let back = MS * 130;
                let want = truth_b.iter().rev().find(|(t, _)| *t <= now - back).map(|(_, s)| s.position);
                if let Some(want) = want {
                    errors.push(shown.position.distance(want));
                }
            }
        }
        assert!(appeared.0 && appeared.1);
        errors.sort_by(f32::total_cmp);
        let p99 = errors[errors.len() * 99 / 100];
        assert!(p99 < 0.25, "p99 error {p99} m");
        assert_eq!(a.counters().malformed + b.counters().malformed, 0);
        assert!(a.counters().updates_received > 20 * 25, "{:?}", a.counters());
        // No longer a neighbour: it lingers (a watch may be on its way), then leaves.
        let now = t0 + Duration::from_secs(20);
        a.remove_neighbour(now, b_id);
        assert_eq!(a.poll_event(), None);
        assert!(a.avatar_of(b_id, now).is_some());
        assert_eq!(a.poll_timeout(now), Some(now + LINGER));
        a.poll_messages(now + LINGER);
        assert_eq!(a.poll_event(), Some(AvatarEvent::Left(b_id)));
        assert_eq!(a.avatar_of(b_id, now + LINGER), None);
    }

    #[test]
    fn messages_from_strangers_or_malformed_ones_change_nothing() {
        let t0 = Instant::now();
        let mut a = mesh(t0);
        let b_id = NodeId([2; 8]);
        a.handle_message(t0, b_id, &[HAS_UPDATE, 0, 0]);
        assert_eq!(a.counters().not_neighbour, 1);
        a.set_neighbour(t0, b_id, 5.0);
        for m in [&[][..], &[0x80], &[NEED_FULL], &[HAS_ACK, 1], &[HAS_UPDATE]] {
            a.handle_message(t0, b_id, m);
        }
        assert_eq!(a.counters().malformed, 5);
        assert_eq!(a.avatar_of(b_id, t0), None);
        assert_eq!(a.poll_event(), None);
    }

    /// A publisher seen by three watchers through a relay (here, a copy each), one of them
    /// losing every fifth copy: each sees it appear and move close to the truth; copies from
    /// a player nobody watches, or not sealed by its key, change nothing; a watch that ends
    /// takes the avatar away, unless the player became a neighbour meanwhile.
    #[test]
    fn watchers_see_a_published_avatar_move_and_only_what_its_key_sealed() {
        let t0 = Instant::now();
        let (p_id, relay) = (NodeId([1; 8]), NodeId([9; 8]));
        let key = [7u8; 32];
        let mut publisher = mesh(t0);
        publisher.set_publishing(t0, Some(Publishing { me: p_id, relay, key, hz: 5.0 }));
        let mut watchers: Vec<AvatarMesh> = (0..3).map(|_| mesh(t0)).collect();
        for w in &mut watchers {
            w.watch(t0, p_id, key);
        }
        let mut mover = Mover::new(3, 100.0);
        let mut truth: Vec<(f64, AvatarState)> = Vec::new();
        let mut errors = Vec::new();
        let mut copies = 0u32;
        for k in 0..60 * 10u32 {
            let now = t0 + MS * (k * 1000 / 60);
            let s = mover.step(1.0 / 60.0);
            publisher.set_avatar(s);
            truth.push((f64::from(k) / 60.0, s));
            if let Some((to, sealed)) = publisher.poll_publish(now) {
                assert_eq!(to, relay);
                copies += 1;
                for (i, w) in watchers.iter_mut().enumerate() {
                    if i == 2 && copies.is_multiple_of(5) {
                        continue;
                    }
                    w.handle_published(now + 30 * MS, p_id, &sealed);
                }
            }
            if k > 120 && k % 10 == 0 {
                for w in &watchers {
                    let (Some(at), Some(shown)) = (w.render_time_of(p_id, now), w.avatar_of(p_id, now)) else {
                        panic!("not shown at {k}")
                    };
                    let i = ((at * 60.0).round() as usize).min(truth.len() - 1);
                    errors.push(shown.position.distance(truth[i].1.position));
                }
            }
        }
        // Five a second for ten seconds.
        assert!((49..=51).contains(&copies), "{copies}");
        for w in &mut watchers {
            let ev: Vec<AvatarEvent> = std::iter::from_fn(|| w.poll_event()).collect();
            assert!(matches!(ev.first(), Some(AvatarEvent::Appeared(p, _)) if *p == p_id), "{ev:?}");
            assert!(ev.len() >= 40);
        }
        errors.sort_by(f32::total_cmp);
        let p99 = errors[errors.len() * 99 / 100];
        assert!(p99 < 1.5, "p99 error {p99} m at 5 Hz");
        // A copy under another key, and one from a player not watched: refused, counted.
        let mut forged = StreamSealer::new(&[8; 32], p_id, AVATAR_STREAM);
        let w = &mut watchers[0];
        let before = w.counters();
        w.handle_published(t0, p_id, &forged.seal(&[0; 8]));
        w.handle_published(t0, NodeId([5; 8]), &forged.seal(&[0; 8]));
        assert_eq!(w.counters().watched_refused, before.watched_refused + 2);
        assert_eq!(w.counters().watched_received, before.watched_received);
        // The publisher becomes watcher 0's neighbour and its direct updates show it; the
        // watch then ends without the avatar leaving.
        let now = t0 + Duration::from_secs(10);
        w.set_neighbour(now, p_id, 20.0);
        let mut direct = Encoder::new(w.q);
        let (_, update) = direct.encode(600, &truth[599].1);
        let mut msg = vec![HAS_UPDATE];
        msg.extend_from_slice(&update);
        w.handle_message(now, p_id, &msg);
        w.unwatch(p_id);
        let ev: Vec<AvatarEvent> = std::iter::from_fn(|| w.poll_event()).collect();
        assert!(matches!(&ev[..], [AvatarEvent::Updated(p, _)] if *p == p_id), "{ev:?}");
        // Watcher 1's watch ends while the player is nobody's neighbour: it leaves.
        watchers[1].unwatch(p_id);
        assert_eq!(watchers[1].poll_event(), Some(AvatarEvent::Left(p_id)));
        // Watcher 0's neighbour turns into a player it watches: shown from its last direct
        // updates until the stream's first key state, then from the stream, never leaving.
        let later = now + Duration::from_millis(100);
        let w = &mut watchers[0];
        w.remove_neighbour(later, p_id);
        w.watch(later, p_id, key);
        let mut shown_throughout = true;
        for k in 0..120u32 {
            let at = later + MS * (k * 1000 / 60);
            publisher.set_avatar(mover.step(1.0 / 60.0));
            if let Some((_, sealed)) = publisher.poll_publish(at) {
                w.handle_published(at, p_id, &sealed);
            }
            w.poll_messages(at);
            shown_throughout &= w.avatar_of(p_id, at).is_some();
        }
        let ev: Vec<AvatarEvent> = std::iter::from_fn(|| w.poll_event()).collect();
        assert!(shown_throughout);
        assert!(!ev.is_empty() && ev.iter().all(|e| matches!(e, AvatarEvent::Updated(p, _) if *p == p_id)), "{ev:?}");
    }

    /// Nobody watches for a while, then someone does again: the stream goes on under its key
    /// with new sequence numbers (a nonce is never used twice under one key) and a key state
    /// first, so a watcher that held on decodes at once.
    #[test]
    fn a_paused_publication_resumes_without_reusing_a_nonce() {
        let t0 = Instant::now();
        let (p_id, relay, key) = (NodeId([1; 8]), NodeId([9; 8]), [7u8; 32]);
        let to = Publishing { me: p_id, relay, key, hz: 5.0 };
        let (mut publisher, mut watcher) = (mesh(t0), mesh(t0));
        publisher.set_avatar(Mover::new(3, 100.0).step(0.1));
        watcher.watch(t0, p_id, key);
        let mut seqs = Vec::new();
        let mut publish = |p: &mut AvatarMesh, w: &mut AvatarMesh, from: u64, secs: u64| {
            for ms in (from..from + secs * 1000).step_by(50) {
                let now = t0 + MS * ms as u32;
                if let Some((_, sealed)) = p.poll_publish(now) {
                    seqs.push(u64::from_be_bytes(sealed[..8].try_into().unwrap()));
                    w.handle_published(now, p_id, &sealed);
                }
            }
        };
        publisher.set_publishing(t0, Some(to));
        publish(&mut publisher, &mut watcher, 0, 2);
        publisher.set_publishing(t0 + Duration::from_secs(2), None);
        publish(&mut publisher, &mut watcher, 2000, 5);
        let before = watcher.counters();
        publisher.set_publishing(t0 + Duration::from_secs(7), Some(to));
        publish(&mut publisher, &mut watcher, 7000, 2);
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "sequence numbers");
        assert_eq!(seqs.len(), 20, "nothing published while paused");
        let after = watcher.counters();
        assert_eq!((after.watched_refused, after.watched_waiting), (0, 0), "{after:?}");
        assert_eq!(after.watched_received - before.watched_received, 10);
    }
}
