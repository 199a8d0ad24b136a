//! Sending on a VC: sealing, renet's flush, per-path pacing for the bandwidth profiles, and the
//! measurement that rides on data.
//!
//! One flush of renet becomes as few frames as it can: renet's packets share a frame up to
//! [`MAX_PLAINTEXT`], and a frame that goes anyway carries the path's due ping and the pongs
//! held for it. Unreliable profiles send no renet acks at all (nothing is resent, and RTTs
//! come from pings). Reliable ones ack what arrived as soon as it has been read (with the
//! data when there is some): acks a tick late held a sender that keeps its buffer full to a
//! tenth of what renet alone moves on loopback. Paced ones ack once per tick.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use renet::Bytes;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire;

use super::{CHANNEL, CloseReason, HeldPong, RENET_ACK_PACKET, VcSendError, VcTransmit, VirtualConnection};
use crate::frame::{self, Inner, PONG_HOLD};
use crate::pacing::Pacer;
use crate::path::{PathId, PathSet};

/// Renet calls per pacing round, at most; each emits up to the profile's `bytes_per_flush`.
const MAX_PULLS: usize = 64;
/// Deepest a path's pacing queue is filled, in ticks of its rate.
const MAX_QUEUE_TICKS: u32 = 2;
/// Most plaintext a frame holds on any route: the datagram limit less the header, the
/// longest route and trace, and the sealing.
pub(crate) const MAX_PLAINTEXT: usize = wire::MAX_DATAGRAM
    - wire::HEADER_LEN
    - wire::MAX_ROUTE * wire::ROUTE_ENTRY_LEN
    - wire::TRACE_ORIGIN_LEN
    - wire::MAX_ROUTE * wire::TRACE_SLOT_LEN
    - frame::SEALED_OVERHEAD;
/// Pongs held at once; past this the oldest goes at once.
const MAX_HELD_PONGS: usize = 32;
/// Largest message an unreliable VC sends as a message item, outside renet; larger ones go
/// through renet, which splits them. Room is left for the measurement riding with it.
pub(crate) const MAX_MESSAGE_ITEM: usize = 1024;
/// Messages an unreliable VC holds while it has no path to send them on; past this the
/// oldest is dropped (and counted stale): latest wins.
const MAX_OUTBOX: usize = 64;
/// How often a VC tells the peer the id its node knows it by, until the peer uses it.
const SHORT_ID_EVERY: Duration = Duration::from_secs(1);

impl VirtualConnection {
    pub(super) fn push(&mut self, t: VcTransmit) {
        self.counters.frames_sent += 1;
        self.counters.bytes_sent += t.frame.len() as u64;
        self.transmits.push_back(t);
    }

    /// Seals `items` into a frame under the next packet number.
    fn seal(&mut self, items: &[Inner<'_>]) -> Option<Vec<u8>> {
        let keys = self.keys.as_mut()?;
        // Type and packet number, then the plaintext, sealed in place behind them.
        let len: usize = items.iter().enumerate().map(|(i, it)| it.wire_len(i + 1 == items.len())).sum();
        let mut buf = Vec::with_capacity(frame::SEALED_OVERHEAD + len);
        buf.push(frame::SEALED);
        buf.extend_from_slice(&[0; 8]);
        frame::write_items(items, &mut buf);
        let (me, peer, vc) = (self.identity.node_id(), self.peer, self.vc);
        let pn = keys.seal(|pn| frame::aad(pn, me, peer, vc), &mut buf, 9);
        buf[1..9].copy_from_slice(&pn.to_be_bytes());
        Some(buf)
    }

    /// Seals a frame that carries no data and sends it on each of `paths`.
    pub(super) fn seal_control(&mut self, paths: &[Path], trace: bool, items: &[Inner<'_>]) {
        let Some(mut buf) = self.seal(items) else { return };
        for (i, p) in paths.iter().enumerate() {
            let frame = if i + 1 == paths.len() { std::mem::take(&mut buf) } else { buf.clone() };
            self.push(VcTransmit { path: *p, trace, frame, carries_data: false, riding: 0 });
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
        self.flush_now = true;
        if !self.profile.is_reliable() && !self.paced() && message.len() <= MAX_MESSAGE_ITEM {
            // Sent whole at the flush this call brings forward: it waits only while there is
            // no path.
            if self.outbox.len() >= MAX_OUTBOX {
                self.outbox.pop_front();
                self.counters.stale += 1;
            }
            self.outbox.push_back(message);
            return Ok(());
        }
        self.backlog_bytes += message.len();
        self.backlog.push_back(message);
        self.pull_ok = true;
        Ok(())
    }

    /// The next message from the peer.
    pub fn recv(&mut self) -> Option<Bytes> {
        if let Some(m) = self.inbox.pop_front() {
            self.counters.messages_received += 1;
            return Some(m);
        }
        if self.renet.is_disconnected() {
            return None;
        }
        let m = self.renet.receive_message(CHANNEL)?;
        self.counters.messages_received += 1;
        Some(m)
    }

    /// Closes the VC and tells the peer.
    pub fn close(&mut self, paths: &PathSet) {
        if self.is_closed() {
            return;
        }
        let to: Vec<Path> = self.sel.sending().iter().filter_map(|&i| paths.path(i)).collect();
        self.seal_control(&to, false, &[Inner::Close(0)]);
        self.finish(CloseReason::Local);
    }

    /// The peer pinged us over `path`: answer at once if it is urgent, otherwise hold the
    /// answer (up to [`PONG_HOLD`]) for a frame going that way anyway.
    pub(super) fn on_ping(
        &mut self,
        now: Instant,
        paths: &mut PathSet,
        path: Path,
        id: Option<PathId>,
        ping: u32,
        urgent: bool,
    ) {
        if let Some(id) = id {
            paths.on_peer_ping(now, id);
        }
        self.held_pongs.push(HeldPong { path, id, ping, received: now });
        if urgent || self.held_pongs.len() > MAX_HELD_PONGS {
            self.release_pongs(now, paths, urgent);
        }
    }

    /// Our short id, when the peer should be told it again: it rides on any frame, until the
    /// peer sends in the short form.
    fn short_rider(&mut self, now: Instant) -> Option<Inner<'static>> {
        let short = self.short_local.filter(|_| !self.short_confirmed)?;
        if self.short_told_at.is_some_and(|t| now < t + SHORT_ID_EVERY) {
            return None;
        }
        self.short_told_at = Some(now);
        Some(Inner::ShortId(short))
    }

    /// The pongs held for `path`, as items, taken out of the hold.
    fn take_pongs(&mut self, now: Instant, path: Path) -> Vec<Inner<'static>> {
        let mut out = Vec::new();
        let sel = &self.sel;
        self.held_pongs.retain(|p| {
            if p.path != path {
                return true;
            }
            let held = frame::held_units(now.saturating_duration_since(p.received));
            let delivered = p.id.map_or(0, |id| sel.delivered(id));
            out.push(Inner::Pong { ping: p.ping, held, delivered });
            false
        });
        out
    }

    /// Sends the held pongs that waited long enough (all of them with `all`), one frame per
    /// path.
    pub(super) fn release_pongs(&mut self, now: Instant, paths: &mut PathSet, all: bool) {
        while let Some(p) = self
            .held_pongs
            .iter()
            .find(|p| all || now >= p.received + PONG_HOLD || self.held_pongs.len() > MAX_HELD_PONGS)
            .copied()
        {
            let mut items = self.take_pongs(now, p.path);
            if let Some(ping) = p.id.and_then(|id| paths.take_echo_ping(now, id)) {
                items.push(Inner::Ping { id: ping, urgent: false });
            }
            items.extend(self.short_rider(now));
            self.seal_control(&[p.path], true, &items);
        }
    }

    /// A ping that could not wait for data (the node asks the VC it picks to carry it), with
    /// any pongs held for the same path.
    pub fn send_ping(&mut self, now: Instant, paths: &PathSet, id: PathId, ping: u32, urgent: bool) {
        let Some(path) = paths.path(id) else { return };
        if self.keys.is_none() {
            return;
        }
        if self.paced() && self.sel.sending().contains(&id) {
            // Behind every frame released so far on this path, which the pong counts.
            self.pacer(now, id).on_ping(now, ping);
        }
        let mut items = vec![Inner::Ping { id: ping, urgent }];
        items.extend(self.take_pongs(now, path));
        items.extend(self.short_rider(now));
        self.seal_control(&[path], true, &items);
    }

    /// Whether sending is paced per path: the profiles after bandwidth.
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
            let Some(m) = self.backlog.pop_front() else { break };
            self.backlog_bytes -= m.len();
            self.renet.send_message(CHANNEL, m);
        }
    }

    /// Hands the backlog to renet as its buffers allow, and sends what renet emits (paced
    /// profiles leave the sending to [`VirtualConnection::pace`]).
    pub(super) fn flush(&mut self, now: Instant, paths: &mut PathSet) {
        self.flush_now = false;
        self.next_tick = now + self.profile.tick;
        self.renet_update(now);
        self.feed_backlog();
        if self.paced() {
            self.pull_ok = true;
            return;
        }
        let sending = self.sel.sending().to_vec();
        let Some(&primary) = sending.first() else { return };
        let packets = self.renet.get_packets_to_send();
        if let Some(reason) = self.renet.disconnect_reason() {
            self.finish(CloseReason::Protocol(format!("{reason}")));
            return;
        }
        let (acks, packets): (Vec<_>, Vec<_>) = packets.into_iter().partition(|p| p.first() == Some(&RENET_ACK_PACKET));
        // Unreliable profiles resend nothing, so acks would only cost: none go. Reliable ones
        // ack what came since the last ack, with the data when there is some.
        let acks = if self.profile.is_reliable() && (self.ack_due || !packets.is_empty()) { acks } else { Vec::new() };
        let messages: Vec<Bytes> = self.outbox.drain(..).collect();
        let data: Vec<Inner<'_>> =
            messages.iter().map(|m| Inner::Message(m)).chain(packets.iter().map(|p| Inner::Renet(p))).collect();
        if data.is_empty() && acks.is_empty() {
            return;
        }
        self.ack_due = false;
        if self.profile.redundancy && sending.len() >= 2 {
            // The same frames on the primary and its disjoint second path; measurement is per
            // path, so none rides on them.
            let to: Vec<(PathId, Path)> = sending[..2].iter().filter_map(|&id| Some((id, paths.path(id)?))).collect();
            for &(id, _) in &to {
                paths.on_data_sent(now, id);
            }
            for item in data.iter().copied().chain(acks.iter().map(|p| Inner::Renet(p))) {
                let carries_data = item.is_data();
                let Some(frame) = self.seal(&[item]) else { return };
                for &(id, path) in &to {
                    if carries_data {
                        self.sel.on_data_sent(id, frame.len());
                    }
                    let riding = if carries_data { 0 } else { frame.len() };
                    self.push(VcTransmit { path, trace: false, frame: frame.clone(), carries_data, riding });
                }
            }
            return;
        }
        let Some(path) = paths.path(primary) else { return };
        // Acks count as flow too: the peer's reliable stream waits on them, so a path that
        // loses them must be noticed as fast as one that loses data.
        paths.on_data_sent(now, primary);
        let mut riders: Vec<Inner<'_>> = Vec::new();
        if let Some((id, urgent)) = paths.take_ping(now, primary) {
            riders.push(Inner::Ping { id, urgent });
        }
        let pongs = self.take_pongs(now, path);
        riders.extend(pongs);
        riders.extend(self.short_rider(now));
        riders.extend(acks.iter().map(Vec::as_slice).map(Inner::Renet));
        // Pack: the riders first, then as many data items as fit; an item that does not fit
        // starts the next frame.
        let mut frames: Vec<(Vec<Inner<'_>>, usize)> = Vec::new();
        let mut cur: Vec<Inner<'_>> = riders;
        let mut riding: usize = cur.iter().map(|i| i.wire_len(false)).sum();
        let mut size = riding;
        for item in data {
            let len = item.wire_len(false);
            if size + len > MAX_PLAINTEXT && cur.iter().any(Inner::is_data) {
                frames.push((std::mem::take(&mut cur), riding));
                riding = 0;
                size = 0;
            }
            size += len;
            cur.push(item);
        }
        if !cur.is_empty() {
            frames.push((cur, riding));
        }
        for (items, riding) in frames {
            let carries_data = items.iter().any(Inner::is_data);
            let trace = items.iter().any(|i| matches!(i, Inner::Ping { .. } | Inner::Pong { .. }));
            let Some(frame) = self.seal(&items) else { return };
            if carries_data {
                self.sel.on_data_sent(primary, frame.len());
            }
            let riding = if carries_data { riding } else { frame.len() };
            self.push(VcTransmit { path, trace, frame, carries_data, riding });
        }
    }

    /// Paced profiles: keeps each sending path's queue about one tick deep from renet's
    /// output, each frame on the path where it would arrive first, and releases what each
    /// path's rate allows.
    pub(super) fn pace(&mut self, now: Instant, paths: &mut PathSet) {
        let sending = self.sel.sending().to_vec();
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
            let id = self.pick(paths, &sending, frame.len());
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
                        && let Some(path) = paths.path(primary)
                    {
                        self.acked_at = Some(now);
                        self.ack_due = false;
                        self.seal_control(&[path], false, &[Inner::Renet(&p)]);
                    }
                    continue;
                }
                data = true;
                let Some(frame) = self.seal(&[Inner::Renet(&p)]) else { continue };
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
                    let id = self.pick(paths, &sending, frame.len());
                    self.pacers[usize::from(id.0)].enqueue(frame);
                }
            }
            if !data {
                self.pull_ok = false;
            }
        }
        for &id in &sending {
            let Some(path) = paths.path(id) else { continue };
            while let Some(frame) = self.pacers[usize::from(id.0)].poll_release(now) {
                paths.on_data_sent(now, id);
                self.sel.on_data_sent(id, frame.len());
                self.push(VcTransmit { path, trace: false, frame, carries_data: true, riding: 0 });
            }
        }
    }

    /// Whether some sending path's queue is shorter than one tick.
    pub(super) fn wants_more(&self, sending: &[PathId]) -> bool {
        sending.iter().any(|id| self.pacers.get(usize::from(id.0)).is_none_or(|p| p.drain_time(0) < self.profile.tick))
    }

    /// The sending path where a frame of `len` bytes queued now would arrive first.
    ///
    /// No queue is filled past [`MAX_QUEUE_TICKS`] ticks: a frame waiting in it has started
    /// renet's resend timer, so a deep queue would have renet send it again before it left.
    fn pick(&self, paths: &PathSet, sending: &[PathId], len: usize) -> PathId {
        let cap = self.profile.tick * MAX_QUEUE_TICKS;
        let drain = |id: &PathId| self.pacers.get(usize::from(id.0)).map_or(Duration::ZERO, |p| p.drain_time(len));
        let arrival = |id: &PathId| drain(id) + paths.srtt(*id).unwrap_or_default() / 2;
        let open = sending.iter().copied().filter(|id| drain(id) <= cap).min_by_key(arrival);
        open.or_else(|| sending.iter().copied().min_by_key(drain)).unwrap_or(PathId(0))
    }
}
