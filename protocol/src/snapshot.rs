//! Snapshots on the wire: each chosen entity's quantised state, delta-encoded against the last
//! state of it the client acknowledged, so a lost snapshot never corrupts a later one.
//!
//! The server's [`SnapshotWriter`] (one per client) numbers its snapshots and keeps what each
//! carried until it is acknowledged or too old; a state the client acknowledged becomes that
//! entity's baseline, and later snapshots send only the difference and name the baseline's
//! snapshot (as a distance back, one byte). Anything without an acknowledged baseline within
//! reach goes whole. The client's [`SnapshotReader`] keeps a short history of each entity's
//! states by snapshot, which is where every baseline the server may name is found; snapshots
//! that arrive late or twice decode as well as on time.
//!
//! An entry: entity id (varint), flags (1 byte: whole, heading changed, state changed), the
//! baseline's distance back (1 byte, deltas only), x and z (zigzag varints, whole values or
//! differences, in 1/64 m), the heading (1 byte, 1/256 turn) and the state (varint) when they
//! changed. A walking NPC costs 7 bytes.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::world::EntityId;

/// Positions are sent in these steps per metre.
pub const POSITION_STEPS: f32 = 64.0;
/// Most entities one snapshot may hold.
pub const MAX_ENTRIES: usize = 4096;
/// Snapshots a writer remembers while they await an acknowledgement.
const HISTORY: usize = 64;
/// States a reader keeps per entity.
const ENTITY_HISTORY: usize = 32;

const WHOLE: u8 = 0b001;
const HEADING: u8 = 0b010;
const STATE: u8 = 0b100;
const KNOWN: u8 = WHOLE | HEADING | STATE;

/// An entity's state as the wire carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quantised {
    /// x, in 1/64 m.
    pub x: i32,
    /// z, in 1/64 m.
    pub z: i32,
    /// Heading, in 1/256 turn.
    pub heading: u8,
    /// Object state or NPC health.
    pub state: u16,
}

impl Quantised {
    /// A state at `at` (x, z, m), facing `heading` (radians about the vertical axis), quantised.
    pub fn new(at: [f32; 2], heading: f32, state: u16) -> Quantised {
        let q = |v: f32| (v * POSITION_STEPS).round() as i32;
        let turn = heading.rem_euclid(std::f32::consts::TAU) / std::f32::consts::TAU;
        Quantised { x: q(at[0]), z: q(at[1]), heading: (turn * 256.0).round() as u32 as u8, state }
    }

    /// Where it is (x, z), m.
    pub fn position(&self) -> [f32; 2] {
        [self.x as f32 / POSITION_STEPS, self.z as f32 / POSITION_STEPS]
    }

    /// Where it faces, radians in [0, 2π).
    pub fn heading(&self) -> f32 {
        f32::from(self.heading) / 256.0 * std::f32::consts::TAU
    }
}

/// A snapshot that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// It ends inside a field.
    #[error("snapshot truncated")]
    Truncated,
    /// A varint runs past its type.
    #[error("varint too long")]
    Varint,
    /// More entries than [`MAX_ENTRIES`].
    #[error("{0} entries, more than allowed")]
    TooMany(u64),
    /// Flags this version does not know.
    #[error("unknown flags {0:#x}")]
    Flags(u8),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, SnapshotError> {
        let v = *self.b.get(self.at).ok_or(SnapshotError::Truncated)?;
        self.at += 1;
        Ok(v)
    }

    fn varint(&mut self) -> Result<u64, SnapshotError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(SnapshotError::Varint)
    }

    fn i32(&mut self) -> Result<i32, SnapshotError> {
        i32::try_from(unzigzag(self.varint()?)).map_err(|_| SnapshotError::Varint)
    }
}

/// One entry as decoded, before its baseline is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The entity.
    pub id: EntityId,
    /// The snapshot its baseline came in (none: whole).
    pub baseline: Option<u32>,
    /// x, z: whole, or differences from the baseline.
    pub x: i32,
    /// See `x`.
    pub z: i32,
    /// The heading, if it changed (or the entry is whole).
    pub heading: Option<u8>,
    /// The state, if it changed (or the entry is whole).
    pub state: Option<u16>,
}

/// Decodes a snapshot: its number and entries.
///
/// # Errors
/// When it does not decode; nothing of it is then used.
pub fn decode(bytes: &[u8]) -> Result<(u32, Vec<Entry>), SnapshotError> {
    let mut c = Cursor { b: bytes, at: 0 };
    let seq = u32::try_from(c.varint()?).map_err(|_| SnapshotError::Varint)?;
    let n = c.varint()?;
    if n > MAX_ENTRIES as u64 {
        return Err(SnapshotError::TooMany(n));
    }
    let mut entries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let id = EntityId(u32::try_from(c.varint()?).map_err(|_| SnapshotError::Varint)?);
        let flags = c.byte()?;
        if flags & !KNOWN != 0 {
            return Err(SnapshotError::Flags(flags));
        }
        let whole = flags & WHOLE != 0;
        let baseline = if whole { None } else { Some(seq.wrapping_sub(u32::from(c.byte()?.max(1)))) };
        let (x, z) = (c.i32()?, c.i32()?);
        let heading = if whole || flags & HEADING != 0 { Some(c.byte()?) } else { None };
        let state = if whole || flags & STATE != 0 {
            Some(u16::try_from(c.varint()?).map_err(|_| SnapshotError::Varint)?)
        } else {
            None
        };
        entries.push(Entry { id, baseline, x, z, heading, state });
    }
    if c.at != bytes.len() {
        return Err(SnapshotError::Truncated);
    }
    Ok((seq, entries))
}

/// The server's side, one per client. See the module docs.
#[derive(Debug, Default)]
pub struct SnapshotWriter {
    next: u32,
    /// The last acknowledged state of each entity, and its snapshot.
    acked: FxHashMap<EntityId, (u32, Quantised)>,
    /// Snapshots sent and not yet acknowledged, oldest first.
    sent: VecDeque<(u32, Vec<(EntityId, Quantised)>)>,
    /// Entries being written, kept for their storage.
    scratch: Vec<u8>,
}

impl SnapshotWriter {
    /// A writer that has sent nothing.
    pub fn new() -> SnapshotWriter {
        SnapshotWriter::default()
    }

    /// Writes the next snapshot, of `states`, into `out` (cleared first); returns its number.
    pub fn write(&mut self, states: &[(EntityId, Quantised)], out: &mut Vec<u8>) -> u32 {
        self.write_within(states, usize::MAX, out).0
    }

    /// Writes the next snapshot into `out` (cleared first) with as many of `states`, in order,
    /// as fit in `limit` bytes (at least one, so that an entity is never stuck); returns its
    /// number and how many it took. The caller writes the rest into further snapshots.
    pub fn write_within(&mut self, states: &[(EntityId, Quantised)], limit: usize, out: &mut Vec<u8>) -> (u32, usize) {
        let seq = self.next;
        self.next = self.next.wrapping_add(1);
        let mut entries = std::mem::take(&mut self.scratch);
        entries.clear();
        let mut taken = 0;
        // The header is a varint of the number and one of the count: at most 5 + 3 bytes.
        for &(id, q) in states.iter().take(MAX_ENTRIES) {
            let before = entries.len();
            self.entry(seq, id, q, &mut entries);
            if taken > 0 && entries.len() + 8 > limit {
                entries.truncate(before);
                break;
            }
            taken += 1;
        }
        out.clear();
        put_varint(out, u64::from(seq));
        put_varint(out, taken as u64);
        out.extend_from_slice(&entries);
        self.scratch = entries;
        self.sent.push_back((seq, states[..taken].to_vec()));
        if self.sent.len() > HISTORY {
            self.sent.pop_front();
        }
        (seq, taken)
    }

    /// The number the next snapshot will have.
    pub fn next(&self) -> u32 {
        self.next
    }

    fn entry(&self, seq: u32, id: EntityId, q: Quantised, out: &mut Vec<u8>) {
        put_varint(out, u64::from(id.0));
        let base = self.acked.get(&id).filter(|(s, _)| (1..=255).contains(&seq.wrapping_sub(*s)));
        match base {
            Some(&(s, b)) => {
                let flags =
                    if q.heading != b.heading { HEADING } else { 0 } | if q.state != b.state { STATE } else { 0 };
                out.push(flags);
                out.push(seq.wrapping_sub(s) as u8);
                put_varint(out, zigzag(i64::from(q.x) - i64::from(b.x)));
                put_varint(out, zigzag(i64::from(q.z) - i64::from(b.z)));
                if flags & HEADING != 0 {
                    out.push(q.heading);
                }
                if flags & STATE != 0 {
                    put_varint(out, u64::from(q.state));
                }
            }
            None => {
                out.push(WHOLE);
                put_varint(out, zigzag(i64::from(q.x)));
                put_varint(out, zigzag(i64::from(q.z)));
                out.push(q.heading);
                put_varint(out, u64::from(q.state));
            }
        }
    }

    /// The client acknowledged snapshot `seq`: its states become baselines (where newer than
    /// the ones held).
    pub fn ack(&mut self, seq: u32) {
        let Some(i) = self.sent.iter().position(|(s, _)| *s == seq) else { return };
        let (seq, states) = &self.sent[i];
        for &(id, q) in states {
            let newer = self.acked.get(&id).is_none_or(|(s, _)| seq.wrapping_sub(*s) as i32 > 0);
            if newer {
                self.acked.insert(id, (*seq, q));
            }
        }
        self.sent.remove(i);
    }

    /// `id` left the client's view: it is sent whole if it comes back.
    pub fn forget(&mut self, id: EntityId) {
        self.acked.remove(&id);
    }
}

/// The client's side. See the module docs.
#[derive(Debug, Default)]
pub struct SnapshotReader {
    /// Each entity's states by snapshot, newest last.
    history: FxHashMap<EntityId, VecDeque<(u32, Quantised)>>,
    /// Entries skipped because their baseline was not at hand.
    pub missing_baselines: u64,
}

impl SnapshotReader {
    /// A reader that has seen nothing.
    pub fn new() -> SnapshotReader {
        SnapshotReader::default()
    }

    /// Applies a decoded snapshot; returns its number and the states it gave, in its order.
    /// An entry whose baseline is not at hand is skipped and counted.
    pub fn apply(&mut self, seq: u32, entries: &[Entry]) -> Vec<(EntityId, Quantised)> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let q = match e.baseline {
                None => Quantised { x: e.x, z: e.z, heading: e.heading.unwrap_or(0), state: e.state.unwrap_or(0) },
                Some(b) => {
                    let Some(&(_, base)) = self.history.get(&e.id).and_then(|h| h.iter().find(|(s, _)| *s == b)) else {
                        self.missing_baselines += 1;
                        continue;
                    };
                    Quantised {
                        x: base.x.wrapping_add(e.x),
                        z: base.z.wrapping_add(e.z),
                        heading: e.heading.unwrap_or(base.heading),
                        state: e.state.unwrap_or(base.state),
                    }
                }
            };
            let h = self.history.entry(e.id).or_default();
            let at = h.iter().position(|(s, _)| seq.wrapping_sub(*s) as i32 <= 0).unwrap_or(h.len());
            if h.get(at).is_none_or(|(s, _)| *s != seq) {
                h.insert(at, (seq, q));
            }
            if h.len() > ENTITY_HISTORY {
                h.pop_front();
            }
            out.push((e.id, q));
        }
        out
    }

    /// The newest state held of `id`, and its snapshot.
    pub fn latest(&self, id: EntityId) -> Option<(u32, Quantised)> {
        self.history.get(&id).and_then(|h| h.back().copied())
    }

    /// `id` left the view: its states go.
    pub fn forget(&mut self, id: EntityId) {
        self.history.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn q(x: i32, z: i32, heading: u8, state: u16) -> Quantised {
        Quantised { x, z, heading, state }
    }

    #[test]
    fn a_walking_npc_costs_seven_bytes_once_acknowledged() {
        let mut w = SnapshotWriter::new();
        let mut r = SnapshotReader::new();
        let mut buf = Vec::new();
        let id = EntityId(300);
        let s0 = w.write(&[(id, q(64_000, 64_000, 10, 30))], &mut buf);
        let whole = buf.len();
        let (seq, entries) = decode(&buf).unwrap();
        assert_eq!(r.apply(seq, &entries), vec![(id, q(64_000, 64_000, 10, 30))]);
        w.ack(s0);
        w.write(&[(id, q(64_010, 63_995, 12, 30))], &mut buf);
        // Snapshot header (2) and the entry: id 2, flags 1, baseline 1, dx 1, dz 1, heading 1.
        assert_eq!(buf.len(), 2 + 7, "whole was {whole}");
        let (seq, entries) = decode(&buf).unwrap();
        assert_eq!(r.apply(seq, &entries), vec![(id, q(64_010, 63_995, 12, 30))]);
    }

    #[test]
    fn a_view_too_big_for_one_datagram_splits_in_priority_order_within_the_limit() {
        let mut w = SnapshotWriter::new();
        let states: Vec<(EntityId, Quantised)> =
            (0..300).map(|i| (EntityId(1000 + i), q(i as i32 * 97, -(i as i32) * 31, i as u8, 7))).collect();
        let (mut rest, mut got, mut buf) = (&states[..], Vec::new(), Vec::new());
        let mut r = SnapshotReader::new();
        while !rest.is_empty() {
            let (seq, n) = w.write_within(rest, 1100, &mut buf);
            assert!(buf.len() <= 1100, "{} bytes", buf.len());
            assert!(n > 0);
            let (s, entries) = decode(&buf).unwrap();
            assert_eq!(s, seq);
            got.extend(r.apply(s, &entries));
            rest = &rest[n..];
        }
        assert_eq!(got, states);
        // A single entry bigger than the limit still goes, alone.
        let (_, n) = w.write_within(&states[..2], 4, &mut buf);
        assert_eq!(n, 1);
    }

    #[test]
    fn every_truncation_and_bad_flag_is_an_error() {
        let mut w = SnapshotWriter::new();
        let mut buf = Vec::new();
        w.write(&[(EntityId(1), q(5, -5, 1, 2)), (EntityId(2), q(-100, 100, 3, 4))], &mut buf);
        assert!(decode(&buf).is_ok());
        for n in 0..buf.len() {
            assert!(decode(&buf[..n]).is_err(), "{n} bytes decoded");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(SnapshotError::Truncated));
        let mut flags = buf.clone();
        flags[3] = 0x81;
        assert!(decode(&flags).is_err());
        assert_eq!(decode(&[0, 0xff, 0xff, 0x03]), Err(SnapshotError::TooMany(65_535)));
        assert_eq!(decode(&[0xff; 12]), Err(SnapshotError::Varint));
    }

    proptest! {
        /// Snapshots of a moving world, lost, reordered and duplicated on the way, their
        /// acknowledgements lost and late too: every state the client takes equals the one the
        /// server sent in that snapshot.
        #[test]
        fn lost_and_reordered_snapshots_never_corrupt_a_later_one(
            seed in any::<u64>(), loss in 0.0f64..0.5, ack_loss in 0.0f64..0.5,
        ) {
            use rand::rngs::Xoshiro256PlusPlus;
            use rand::{RngExt, SeedableRng};
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
            let mut w = SnapshotWriter::new();
            let mut r = SnapshotReader::new();
            let mut world: Vec<Quantised> = (0..20).map(|i| q(i * 100, -i * 50, 0, 100)).collect();
            let mut truth: BTreeMap<u32, Vec<(EntityId, Quantised)>> = BTreeMap::new();
            let mut in_flight: Vec<Vec<u8>> = Vec::new();
            let mut acks: Vec<u32> = Vec::new();
            let mut taken = 0;
            for _ in 0..300 {
                for e in &mut world {
                    e.x += rng.random_range(-40..=40);
                    e.z += rng.random_range(-40..=40);
                    if rng.random_bool(0.1) { e.heading = rng.random(); }
                    if rng.random_bool(0.05) { e.state = rng.random_range(0..200); }
                }
                let chosen: Vec<(EntityId, Quantised)> = world.iter().enumerate()
                    .filter(|_| rng.random_bool(0.5))
                    .map(|(i, s)| (EntityId(i as u32), *s))
                    .collect();
                let mut buf = Vec::new();
                let seq = w.write(&chosen, &mut buf);
                truth.insert(seq, chosen);
                if !rng.random_bool(loss) {
                    in_flight.push(buf.clone());
                    if rng.random_bool(0.1) { in_flight.push(buf); }
                }
                // Deliver some of what is in flight, in any order.
                while !in_flight.is_empty() && rng.random_bool(0.6) {
                    let i = rng.random_range(0..in_flight.len());
                    let bytes = in_flight.swap_remove(i);
                    let (seq, entries) = decode(&bytes).unwrap();
                    for (id, got) in r.apply(seq, &entries) {
                        let want = truth[&seq].iter().find(|(i, _)| *i == id).unwrap().1;
                        prop_assert_eq!(got, want);
                        taken += 1;
                    }
                    if !rng.random_bool(ack_loss) { acks.push(seq); }
                }
                while !acks.is_empty() && rng.random_bool(0.5) {
                    let i = rng.random_range(0..acks.len());
                    w.ack(acks.swap_remove(i));
                }
            }
            prop_assert!(taken > 0);
        }
    }
}
