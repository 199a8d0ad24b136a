//! The avatar update codec: one sender's states to one receiver, each delta-encoded against
//! the last state that receiver acknowledged, after predicting that baseline forward by its
//! velocity, so that an avatar moving steadily costs a few bits.
//!
//! An update is one of three forms, told apart by its first bits:
//!
//! | form | bits |
//! |---|---|
//! | delta | `1`, tick (low 8 bits), age − 1 (Exp-Golomb: ticks since the baseline), position residuals (3 × signed Exp-Golomb, in steps, against the baseline moved on by its velocity), orientation (`0` unchanged; `10` and three signed deltas of the smallest components; `11`, the index of the largest and the three components), velocity (`0` unchanged, or `1` and three signed deltas), animation (`0` unchanged, or `1` and 16 bits) |
//! | unchanged | `01`, the baseline's tick (low 6 bits): the state is the baseline's |
//! | full | `00`, tick (16 bits), position (per axis, as many bits as the zone needs), orientation (2 + 3 × `orientation_bits`), velocity (3 × signed), animation (16) |
//!
//! The receiver acknowledges the newest tick it decoded ([`Ack`]); the sender uses an
//! acknowledged state as the baseline while it is at most [`MAX_AGE`] ticks old and falls back
//! to a full state otherwise. Ticks travel as their low bits; both sides rebuild them from the
//! newest tick they know, which is unambiguous because the sender only refers to states within
//! [`MAX_AGE`] ticks of the one it sends and never to one the receiver has not acknowledged
//! (so the receiver's newest tick is at most [`MAX_AGE`] behind). A delta whose baseline the
//! receiver does not hold (lost to reordering past its window, or from a confused sender) is
//! refused with [`DecodeError::MissingBaseline`], never decoded against another state, and the
//! next ack asks for a full state.

use std::collections::VecDeque;

use super::AvatarState;
use super::bits::{Reader, Writer};
use super::quant::{Quantized, Quantizer, Rotation};

/// The oldest baseline a delta may use, in ticks (about a second at 60 Hz).
pub const MAX_AGE: u32 = 64;
/// Below this age a state equal to its baseline goes as the 8-bit unchanged form; from it on
/// a delta, so that an idle avatar's baseline keeps moving forward.
const UNCHANGED_AGE: u32 = 32;
/// Ticks of received states a receiver keeps as possible baselines, behind its newest.
const KEEP: i64 = 2 * MAX_AGE as i64;

/// What the receiver sends back: the newest tick it decoded, and whether it needs a full
/// state (a delta came whose baseline it does not hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Low 16 bits of the newest tick decoded.
    pub tick: u16,
    /// The next update should be a full state.
    pub need_full: bool,
}

/// Which form an update took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The whole state.
    Full,
    /// Against an acknowledged baseline.
    Delta,
    /// Equal to an acknowledged baseline.
    Unchanged,
}

/// What a sender counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncoderCounters {
    /// Updates by form.
    pub full: u64,
    /// See `full`.
    pub delta: u64,
    /// See `full`.
    pub unchanged: u64,
    /// Acks naming a tick not among the states kept (too old, or never sent).
    pub unknown_acks: u64,
}

/// One sender's side of one receiver.
#[derive(Debug, Clone)]
pub struct Encoder {
    q: Quantizer,
    /// States sent as full or delta, oldest first, within [`MAX_AGE`] of the newest.
    sent: VecDeque<(u32, Quantized)>,
    acked: Option<u32>,
    need_full: bool,
    /// The tick of the last update, whatever its form.
    last: Option<u32>,
    counters: EncoderCounters,
}

impl Encoder {
    /// A sender whose receiver holds nothing yet.
    pub fn new(q: Quantizer) -> Encoder {
        Encoder {
            q,
            sent: VecDeque::new(),
            acked: None,
            need_full: true,
            last: None,
            counters: EncoderCounters::default(),
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> EncoderCounters {
        self.counters
    }

    /// The tick of the last update encoded, whatever its form.
    pub fn last_tick(&self) -> Option<u32> {
        self.last
    }

    /// The receiver's ack.
    pub fn on_ack(&mut self, ack: Ack) {
        let Some(&(newest, _)) = self.sent.back() else { return };
        // The acked tick is at most MAX_AGE behind the newest sent, and never ahead of it.
        let back = newest.wrapping_sub(u32::from(ack.tick)) & 0xffff;
        let tick = newest.wrapping_sub(back);
        if ack.need_full {
            self.need_full = true;
            self.acked = None;
            return;
        }
        if !self.sent.iter().any(|&(t, _)| t == tick) {
            self.counters.unknown_acks += 1;
            return;
        }
        if self.acked.is_none_or(|a| tick.wrapping_sub(a) as i32 > 0) {
            self.acked = Some(tick);
            self.need_full = false;
        }
    }

    /// Encodes `state` at `tick` (the avatar clock, which never goes back) for this receiver,
    /// at one past the last update's tick if `tick` is not after it: a tick names one state,
    /// and the receiver may already hold (and have acked) the state first sent at it.
    pub fn encode(&mut self, tick: u32, state: &AvatarState) -> (Form, Vec<u8>) {
        let tick = match self.last {
            Some(last) if tick.wrapping_sub(last) as i32 <= 0 => last.wrapping_add(1),
            _ => tick,
        };
        self.last = Some(tick);
        let q = self.q.quantize(state);
        let mut w = Writer::new();
        let base = self.baseline(tick);
        let form = match base {
            Some((b, base)) if base == q && tick.wrapping_sub(b) < UNCHANGED_AGE => {
                w.bit(false);
                w.bit(true);
                w.uint(6, b & 63);
                Form::Unchanged
            }
            Some((b, base)) => {
                let age = tick.wrapping_sub(b);
                w.bit(true);
                w.uint(8, tick & 0xff);
                w.ue(age - 1);
                self.write_delta(&mut w, &base, age, &q);
                Form::Delta
            }
            None => {
                w.bit(false);
                w.bit(false);
                w.uint(16, tick & 0xffff);
                self.write_full(&mut w, &q);
                Form::Full
            }
        };
        match form {
            Form::Full => self.counters.full += 1,
            Form::Delta => self.counters.delta += 1,
            Form::Unchanged => self.counters.unchanged += 1,
        }
        if form != Form::Unchanged {
            self.sent.retain(|&(t, _)| tick.wrapping_sub(t) < MAX_AGE && t != tick);
            self.sent.push_back((tick, q));
        }
        (form, w.finish())
    }

    /// The acknowledged state to encode against at `tick`, if one is young enough.
    fn baseline(&self, tick: u32) -> Option<(u32, Quantized)> {
        if self.need_full {
            return None;
        }
        let b = self.acked?;
        let age = tick.wrapping_sub(b);
        if age == 0 || age > MAX_AGE {
            return None;
        }
        self.sent.iter().find(|&&(t, _)| t == b).copied()
    }

    fn write_full(&self, w: &mut Writer, q: &Quantized) {
        for axis in 0..3 {
            w.uint(self.q.pos_bits[axis], q.pos[axis]);
        }
        w.uint(2, u32::from(q.rot.largest));
        for c in q.rot.small {
            w.uint(self.q.config().orientation_bits, u32::from(c));
        }
        let mask = (1u64 << self.q.vel_bits) - 1;
        for v in q.vel {
            w.uint(self.q.vel_bits, (i64::from(v) as u64 & mask) as u32);
        }
        w.uint(16, u32::from(q.anim));
    }

    fn write_delta(&self, w: &mut Writer, base: &Quantized, age: u32, q: &Quantized) {
        let predicted = predict(&self.q, base, age);
        for (&p, &guess) in q.pos.iter().zip(&predicted) {
            w.se((i64::from(p) - i64::from(guess)) as i32);
        }
        if q.rot == base.rot {
            w.bit(false);
        } else if q.rot.largest == base.rot.largest {
            w.bit(true);
            w.bit(false);
            for k in 0..3 {
                w.se(i32::from(q.rot.small[k]) - i32::from(base.rot.small[k]));
            }
        } else {
            w.bit(true);
            w.bit(true);
            w.uint(2, u32::from(q.rot.largest));
            for c in q.rot.small {
                w.uint(self.q.config().orientation_bits, u32::from(c));
            }
        }
        if q.vel == base.vel {
            w.bit(false);
        } else {
            w.bit(true);
            for axis in 0..3 {
                w.se(q.vel[axis] - base.vel[axis]);
            }
        }
        if q.anim == base.anim {
            w.bit(false);
        } else {
            w.bit(true);
            w.uint(16, u32::from(q.anim));
        }
    }
}

/// The baseline's position moved on by its velocity for `age` ticks, in position steps,
/// inside the zone. Both ends compute it with the same operations on the same integers.
fn predict(q: &Quantizer, base: &Quantized, age: u32) -> [u32; 3] {
    let cfg = q.config();
    let scale = f64::from(cfg.velocity_resolution) * f64::from(age)
        / f64::from(cfg.tick_hz)
        / f64::from(cfg.position_resolution);
    std::array::from_fn(|axis| {
        let p = f64::from(base.pos[axis]) + f64::from(base.vel[axis]) * scale;
        p.round().clamp(0.0, f64::from(q.pos_max[axis])) as u32
    })
}

/// Why an update was not decoded. None changes what the receiver holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bits ran out, or a code was malformed.
    #[error("avatar update truncated or malformed")]
    Malformed,
    /// A delta or unchanged update before any full state.
    #[error("avatar delta before any full state")]
    NoState,
    /// The baseline named is not among the states kept: the next ack asks for a full state.
    #[error("avatar baseline (tick {tick}) not held")]
    MissingBaseline {
        /// The baseline's tick, as rebuilt.
        tick: i64,
    },
    /// A field past what the zone's configuration allows.
    #[error("avatar field {0} out of range")]
    OutOfRange(&'static str),
}

/// A decoded update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoded {
    /// Its tick on the receiver's scale (the sender's, give or take a multiple of 2^16); for
    /// the unchanged form, the baseline's.
    pub tick: i64,
    /// The form it came in.
    pub form: Form,
    /// The state, as quantised.
    pub quantized: Quantized,
    /// The state.
    pub state: AvatarState,
}

/// What a receiver counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderCounters {
    /// Updates decoded.
    pub decoded: u64,
    /// Updates refused, by reason.
    pub malformed: u64,
    /// See `malformed`.
    pub missing_baseline: u64,
    /// See `malformed`.
    pub out_of_range: u64,
}

/// One receiver's side of one sender.
#[derive(Debug, Clone)]
pub struct Decoder {
    q: Quantizer,
    /// States decoded (full and delta), by tick, oldest first, within [`KEEP`] of the newest.
    held: VecDeque<(i64, Quantized)>,
    newest: Option<i64>,
    need_full: bool,
    counters: DecoderCounters,
}

impl Decoder {
    /// A receiver that holds nothing yet.
    pub fn new(q: Quantizer) -> Decoder {
        Decoder { q, held: VecDeque::new(), newest: None, need_full: false, counters: DecoderCounters::default() }
    }

    /// Counters so far.
    pub fn counters(&self) -> DecoderCounters {
        self.counters
    }

    /// What to tell the sender, once something was decoded or a full state is needed.
    pub fn ack(&self) -> Option<Ack> {
        if self.need_full {
            return Some(Ack { tick: self.newest.map_or(0, |t| t as u16), need_full: true });
        }
        Some(Ack { tick: self.newest? as u16, need_full: false })
    }

    /// Decodes one update.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Decoded, DecodeError> {
        let r = self.decode_inner(bytes);
        match &r {
            Ok(_) => self.counters.decoded += 1,
            Err(DecodeError::Malformed) => self.counters.malformed += 1,
            Err(DecodeError::MissingBaseline { .. } | DecodeError::NoState) => {
                self.counters.missing_baseline += 1;
                self.need_full = true;
            }
            Err(DecodeError::OutOfRange(_)) => self.counters.out_of_range += 1,
        }
        r
    }

    fn decode_inner(&mut self, bytes: &[u8]) -> Result<Decoded, DecodeError> {
        let mut r = Reader::new(bytes);
        let m = |_| DecodeError::Malformed;
        if r.bit().map_err(m)? {
            let low = i64::from(r.uint(8).map_err(m)?);
            let age = i64::from(r.ue().map_err(m)?) + 1;
            let newest = self.newest.ok_or(DecodeError::NoState)?;
            let tick = newest + (low - newest).rem_euclid(256);
            let tick = if tick - newest > 127 { tick - 256 } else { tick };
            let b = tick - age;
            let base = self.held(b).ok_or(DecodeError::MissingBaseline { tick: b })?;
            let q = self.read_delta(&mut r, &base, age as u32)?;
            return Ok(self.accept(tick, Form::Delta, q));
        }
        if r.bit().map_err(m)? {
            let low = i64::from(r.uint(6).map_err(m)?);
            let newest = self.newest.ok_or(DecodeError::NoState)?;
            let b = newest - (newest - low).rem_euclid(64);
            let base = self.held(b).ok_or(DecodeError::MissingBaseline { tick: b })?;
            return Ok(Decoded { tick: b, form: Form::Unchanged, quantized: base, state: self.q.dequantize(&base) });
        }
        let low = i64::from(r.uint(16).map_err(m)?);
        let tick = match self.newest {
            None => low,
            Some(n) => {
                let t = n + (low - n).rem_euclid(65_536);
                if t - n >= 32_768 { t - 65_536 } else { t }
            }
        };
        let q = self.read_full(&mut r)?;
        self.need_full = false;
        Ok(self.accept(tick, Form::Full, q))
    }

    fn held(&self, tick: i64) -> Option<Quantized> {
        self.held.iter().find(|&&(t, _)| t == tick).map(|&(_, q)| q)
    }

    fn accept(&mut self, tick: i64, form: Form, q: Quantized) -> Decoded {
        let newest = self.newest.map_or(tick, |n| n.max(tick));
        self.newest = Some(newest);
        self.held.retain(|&(t, _)| t != tick && newest - t <= KEEP);
        if newest - tick <= KEEP {
            let at = self.held.iter().position(|&(t, _)| t > tick).unwrap_or(self.held.len());
            self.held.insert(at, (tick, q));
        }
        Decoded { tick, form, quantized: q, state: self.q.dequantize(&q) }
    }

    fn read_full(&self, r: &mut Reader<'_>) -> Result<Quantized, DecodeError> {
        let m = |_| DecodeError::Malformed;
        let mut q = Quantized::default();
        for axis in 0..3 {
            q.pos[axis] = r.uint(self.q.pos_bits[axis]).map_err(m)?;
            if q.pos[axis] > self.q.pos_max[axis] {
                return Err(DecodeError::OutOfRange("position"));
            }
        }
        q.rot = self.read_rotation(r)?;
        let bits = self.q.vel_bits;
        for v in &mut q.vel {
            let raw = r.uint(bits).map_err(m)?;
            // Sign-extend from `bits`.
            let shift = 32 - bits;
            *v = ((raw << shift) as i32) >> shift;
            if v.abs() > self.q.vel_max {
                return Err(DecodeError::OutOfRange("velocity"));
            }
        }
        q.anim = r.uint(16).map_err(m)? as u16;
        Ok(q)
    }

    fn read_rotation(&self, r: &mut Reader<'_>) -> Result<Rotation, DecodeError> {
        let m = |_| DecodeError::Malformed;
        let largest = r.uint(2).map_err(m)? as u8;
        let mut small = [0u16; 3];
        for c in &mut small {
            *c = r.uint(self.q.config().orientation_bits).map_err(m)? as u16;
        }
        Ok(Rotation { largest, small })
    }

    fn read_delta(&self, r: &mut Reader<'_>, base: &Quantized, age: u32) -> Result<Quantized, DecodeError> {
        let m = |_| DecodeError::Malformed;
        let predicted = predict(&self.q, base, age);
        let mut q = *base;
        for ((pos, &guess), &max) in q.pos.iter_mut().zip(&predicted).zip(&self.q.pos_max) {
            let p = i64::from(guess) + i64::from(r.se().map_err(m)?);
            if p < 0 || p > i64::from(max) {
                return Err(DecodeError::OutOfRange("position"));
            }
            *pos = p as u32;
        }
        if r.bit().map_err(m)? {
            if r.bit().map_err(m)? {
                q.rot = self.read_rotation(r)?;
            } else {
                for k in 0..3 {
                    let c = i64::from(base.rot.small[k]) + i64::from(r.se().map_err(m)?);
                    if c < 0 || c > i64::from(self.q.rot_max) {
                        return Err(DecodeError::OutOfRange("orientation"));
                    }
                    q.rot.small[k] = c as u16;
                }
            }
        }
        if r.bit().map_err(m)? {
            for axis in 0..3 {
                let v = i64::from(base.vel[axis]) + i64::from(r.se().map_err(m)?);
                if v.abs() > i64::from(self.q.vel_max) {
                    return Err(DecodeError::OutOfRange("velocity"));
                }
                q.vel[axis] = v as i32;
            }
        }
        if r.bit().map_err(m)? {
            q.anim = r.uint(16).map_err(m)? as u16;
        }
        Ok(q)
    }
}
