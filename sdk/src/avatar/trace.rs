//! Recorded avatar traces: every player's avatar, frame by frame, in a compact file, so that
//! the codec and the mesh can be measured on the same motion however the movement model (or
//! a game) changes. A studio can record its own game's avatars with [`Trace::new`] and
//! [`Trace::push_frame`] and benchmark on them.
//!
//! The file: `SHOALTRC` · version (u8, 1) · frames a second (u8) · players (u16) · frames
//! (u32), big-endian; then, frame after frame and player after player, each avatar as
//! integers (position and velocity in millimetres and millimetres a second, the orientation's
//! x, y, z, w times 32,767), each one written as the Exp-Golomb code of what is left after
//! predicting it from the same player's two frames before (`2·last − before`: steady motion,
//! steady turning and steady acceleration cost a bit or three); the animation id as one bit
//! for "changed" and then its 16 bits. The last byte is padded with zeros. A trace keeps
//! states at those resolutions: finer than the codec's (1 mm by default), so the codec sees
//! what it would have seen.

use glam::{Quat, Vec3};

use super::AvatarState;
use super::bits::{Reader, Writer};

const MAGIC: &[u8; 8] = b"SHOALTRC";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 8 + 1 + 1 + 2 + 4;
/// Integers per avatar besides the animation id: position 3, orientation 4, velocity 3.
const FIELDS: usize = 10;
/// Millimetres (and millimetres a second) per metre.
const MM: f32 = 1000.0;
/// Orientation components are kept as this many steps per unit.
const UNIT: f32 = 32_767.0;
/// The most frames a trace is read with (a day at 60 Hz): a header claiming more is refused
/// before anything is allocated for it.
const MAX_FRAMES: u32 = 60 * 60 * 60 * 24;

/// Why a trace could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// Not a trace: the magic bytes are wrong.
    #[error("not an avatar trace")]
    NotATrace,
    /// A version this build does not read.
    #[error("trace version {0} is not supported")]
    Version(u8),
    /// The header is inconsistent (no frames a second, or more frames than are read).
    #[error("trace header: {0}")]
    Header(&'static str),
    /// The data ends before the header's frames do, or a code is not one.
    #[error("trace data ends or breaks at frame {frame}, player {player}")]
    Truncated {
        /// The frame being read.
        frame: u32,
        /// The player being read.
        player: u16,
    },
}

/// Every player's avatar, frame by frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    hz: u8,
    /// Per player, its states in frame order.
    players: Vec<Vec<AvatarState>>,
}

impl Trace {
    /// An empty trace of `players` recorded `hz` frames a second.
    pub fn new(hz: u8, players: u16) -> Trace {
        Trace { hz: hz.max(1), players: vec![Vec::new(); usize::from(players)] }
    }

    /// Frames a second.
    pub fn hz(&self) -> u8 {
        self.hz
    }

    /// Players.
    pub fn players(&self) -> usize {
        self.players.len()
    }

    /// Frames recorded.
    pub fn frames(&self) -> usize {
        self.players.first().map_or(0, Vec::len)
    }

    /// One player's states, in frame order.
    pub fn player(&self, i: usize) -> &[AvatarState] {
        self.players.get(i).map_or(&[], Vec::as_slice)
    }

    /// Adds a frame: one state per player, in player order (missing players repeat their
    /// last state, extra states are ignored). States are kept at the trace's resolution.
    pub fn push_frame(&mut self, states: &[AvatarState]) {
        for (i, p) in self.players.iter_mut().enumerate() {
            let s = states.get(i).or(p.last()).copied().unwrap_or_default();
            p.push(from_ints(&to_ints(&s), s.anim));
        }
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.frames() * self.players() * 3);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.hz);
        out.extend_from_slice(&(self.players() as u16).to_be_bytes());
        out.extend_from_slice(&(self.frames() as u32).to_be_bytes());
        let mut w = Writer::new();
        let mut history = vec![History::default(); self.players()];
        for f in 0..self.frames() {
            for (p, h) in self.players.iter().zip(&mut history) {
                let s = p[f];
                let now = to_ints(&s);
                for (k, v) in now.iter().enumerate() {
                    w.se(v.wrapping_sub(h.predict(k)));
                }
                w.bit(s.anim != h.anim);
                if s.anim != h.anim {
                    w.uint(16, u32::from(s.anim));
                }
                h.push(now, s.anim);
            }
        }
        out.extend_from_slice(&w.finish());
        out
    }

    /// Reads a trace from a file's bytes.
    ///
    /// # Errors
    /// A [`TraceError`] naming what is wrong; nothing is taken on trust from the header
    /// beyond `MAX_FRAMES` frames.
    pub fn from_bytes(bytes: &[u8]) -> Result<Trace, TraceError> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(TraceError::NotATrace);
        }
        if bytes[8] != VERSION {
            return Err(TraceError::Version(bytes[8]));
        }
        let hz = bytes[9];
        let players = u16::from_be_bytes([bytes[10], bytes[11]]);
        let frames = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if hz == 0 {
            return Err(TraceError::Header("no frames a second"));
        }
        if frames > MAX_FRAMES {
            return Err(TraceError::Header("more frames than a trace may hold"));
        }
        let data = &bytes[HEADER_LEN..];
        // Every avatar takes at least 11 bits: more frames than the data could hold is a lie
        // told to make us allocate.
        if u64::from(frames) * u64::from(players) * 11 > data.len() as u64 * 8 {
            return Err(TraceError::Truncated { frame: 0, player: 0 });
        }
        let mut r = Reader::new(data);
        let mut trace = Trace::new(hz, players);
        for p in &mut trace.players {
            p.reserve_exact(frames as usize);
        }
        let mut history = vec![History::default(); usize::from(players)];
        for f in 0..frames {
            for (i, (p, h)) in trace.players.iter_mut().zip(&mut history).enumerate() {
                let broken = || TraceError::Truncated { frame: f, player: i as u16 };
                let mut now = [0i32; FIELDS];
                for (k, v) in now.iter_mut().enumerate() {
                    *v = h.predict(k).wrapping_add(r.se().map_err(|_| broken())?);
                }
                let anim = if r.bit().map_err(|_| broken())? {
                    u16::try_from(r.uint(16).map_err(|_| broken())?).map_err(|_| broken())?
                } else {
                    h.anim
                };
                h.push(now, anim);
                p.push(from_ints(&now, anim));
            }
        }
        Ok(trace)
    }
}

/// A player's last two frames, as integers, for the prediction.
#[derive(Debug, Clone, Copy, Default)]
struct History {
    last: [i32; FIELDS],
    before: [i32; FIELDS],
    anim: u16,
}

impl History {
    fn predict(&self, k: usize) -> i32 {
        self.last[k].wrapping_mul(2).wrapping_sub(self.before[k])
    }

    fn push(&mut self, now: [i32; FIELDS], anim: u16) {
        self.before = self.last;
        self.last = now;
        self.anim = anim;
    }
}

fn to_ints(s: &AvatarState) -> [i32; FIELDS] {
    // A state read from a trace is within a step of unit length and goes back to the same
    // integers as it is; anything else is normalised first.
    let q = s.orientation;
    let q = if (q.length_squared() - 1.0).abs() < 1e-3 { q } else { q.normalize() };
    let q = if q.is_finite() { q } else { Quat::IDENTITY };
    let mm = |v: f32| if v.is_finite() { (v * MM).round() as i32 } else { 0 };
    let unit = |v: f32| (v.clamp(-1.0, 1.0) * UNIT).round() as i32;
    [
        mm(s.position.x),
        mm(s.position.y),
        mm(s.position.z),
        unit(q.x),
        unit(q.y),
        unit(q.z),
        unit(q.w),
        mm(s.velocity.x),
        mm(s.velocity.y),
        mm(s.velocity.z),
    ]
}

fn from_ints(v: &[i32; FIELDS], anim: u16) -> AvatarState {
    let m = |i: usize| v[i] as f32 / MM;
    let u = |i: usize| v[i] as f32 / UNIT;
    let q = Quat::from_xyzw(u(3), u(4), u(5), u(6));
    AvatarState {
        position: Vec3::new(m(0), m(1), m(2)),
        orientation: if q.length_squared() > 0.0 { q } else { Quat::IDENTITY },
        velocity: Vec3::new(m(7), m(8), m(9)),
        anim,
    }
}

#[cfg(test)]
mod tests {
    use super::super::movement::Mover;
    use super::*;

    fn recorded(players: u16, frames: usize) -> Trace {
        let mut movers: Vec<Mover> = (0..players).map(|i| Mover::new(u64::from(i), 400.0)).collect();
        let mut t = Trace::new(30, players);
        for _ in 0..frames {
            let states: Vec<AvatarState> = movers.iter_mut().map(|m| m.step(1.0 / 30.0)).collect();
            t.push_frame(&states);
        }
        t
    }

    #[test]
    fn a_trace_reads_back_as_recorded_and_costs_a_few_bytes_a_frame() {
        let t = recorded(5, 30 * 20);
        let bytes = t.to_bytes();
        let back = Trace::from_bytes(&bytes).unwrap();
        assert!(back == t, "the trace read back differs from the one written");
        assert_eq!((back.players(), back.frames(), back.hz()), (5, 600, 30));
        let per_avatar = (bytes.len() - HEADER_LEN) as f64 / 3000.0;
        assert!(per_avatar < 4.0, "{per_avatar:.2} bytes per avatar");
    }

    #[test]
    fn recording_keeps_states_within_the_trace_resolution() {
        let mut m = Mover::new(7, 400.0);
        let mut t = Trace::new(30, 1);
        let states: Vec<AvatarState> = (0..300).map(|_| m.step(1.0 / 30.0)).collect();
        for s in &states {
            t.push_frame(std::slice::from_ref(s));
        }
        for (a, b) in states.iter().zip(t.player(0)) {
            assert!(a.position.distance(b.position) <= 0.001);
            assert!(a.velocity.distance(b.velocity) <= 0.001);
            assert!(a.orientation.angle_between(b.orientation) < 1e-3);
            assert_eq!(a.anim, b.anim);
        }
    }

    #[test]
    fn every_truncation_and_a_lying_header_are_errors() {
        let bytes = recorded(2, 40).to_bytes();
        for n in 0..bytes.len() - 1 {
            assert!(Trace::from_bytes(&bytes[..n]).is_err(), "read {n} bytes of {}", bytes.len());
        }
        let mut lie = bytes.clone();
        lie[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Trace::from_bytes(&lie), Err(TraceError::Header("more frames than a trace may hold")));
        let mut lie = bytes.clone();
        lie[12..16].copy_from_slice(&1_000_000u32.to_be_bytes());
        assert!(matches!(Trace::from_bytes(&lie), Err(TraceError::Truncated { .. })));
        let mut v2 = bytes;
        v2[8] = 2;
        assert_eq!(Trace::from_bytes(&v2), Err(TraceError::Version(2)));
        assert_eq!(Trace::from_bytes(b"SHOALTRX"), Err(TraceError::NotATrace));
    }
}
