//! Quantisation: an avatar's state as the integers the codec sends.
//!
//! Position is quantised inside the zone's bounds at a fixed resolution (default 1 mm),
//! velocity at its own resolution within a speed limit, orientation as the three smallest
//! components of the unit quaternion (the largest is implied by the unit norm, and its index
//! takes two bits). Both ends derive the bit widths from the same [`CodecConfig`], which the
//! zone gives; a state outside the bounds is clamped to them.

use glam::{Quat, Vec3};

use super::AvatarState;

/// 1/√2: no component but the largest of a unit quaternion can exceed it in magnitude.
const SMALLEST_MAX: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// How a zone's avatars are quantised. Sender and receiver must use the same one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecConfig {
    /// The zone's lower corner.
    pub min: Vec3,
    /// The zone's upper corner.
    pub max: Vec3,
    /// Position step, metres (default 1 mm).
    pub position_resolution: f32,
    /// Fastest speed sent on each axis, metres a second (default 64).
    pub max_speed: f32,
    /// Velocity step, metres a second (default 1 cm/s).
    pub velocity_resolution: f32,
    /// Bits for each of the three smallest quaternion components (default 11: under 0.04°).
    pub orientation_bits: u32,
    /// The avatar clock: states are stamped in ticks of 1/`tick_hz` s (default 60).
    pub tick_hz: u32,
}

impl Default for CodecConfig {
    /// A 4 km square zone, 1 km high, centred on the origin at ground level.
    fn default() -> Self {
        CodecConfig {
            min: Vec3::new(-2048.0, -64.0, -2048.0),
            max: Vec3::new(2048.0, 960.0, 2048.0),
            position_resolution: 0.001,
            max_speed: 64.0,
            velocity_resolution: 0.01,
            orientation_bits: 11,
            tick_hz: 60,
        }
    }
}

/// Why a [`CodecConfig`] cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The bounds are not finite, or min is not below max on every axis.
    #[error("zone bounds must be finite with min < max on every axis (min {min}, max {max})")]
    Bounds {
        /// The lower corner given.
        min: Vec3,
        /// The upper corner given.
        max: Vec3,
    },
    /// A resolution or the speed limit is not finite and positive.
    #[error("{field} must be finite and positive, not {value}")]
    NotPositive {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: f32,
    },
    /// An axis or the velocity would need more than 30 bits at this resolution.
    #[error("{field} needs {bits} bits at this resolution; at most 30")]
    TooFine {
        /// Which field.
        field: &'static str,
        /// Bits it would need.
        bits: u32,
    },
    /// Orientation bits outside 6..=15.
    #[error("orientation_bits must be 6 to 15, not {0}")]
    OrientationBits(u32),
    /// A tick rate of 0 or over 1,000 Hz.
    #[error("tick_hz must be 1 to 1000, not {0}")]
    TickHz(u32),
}

/// Bits needed for values 0..=max.
pub(super) fn bits_for(max: u64) -> u32 {
    64 - max.leading_zeros()
}

/// A [`CodecConfig`] checked, with the bit widths and steps both ends derive from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    cfg: CodecConfig,
    /// Largest quantised position on each axis.
    pub(super) pos_max: [u32; 3],
    pub(super) pos_bits: [u32; 3],
    /// Largest quantised velocity magnitude on an axis.
    pub(super) vel_max: i32,
    /// Bits of a quantised velocity component, sign included.
    pub(super) vel_bits: u32,
    pub(super) rot_max: u32,
}

impl Quantizer {
    /// Checks `cfg`.
    pub fn new(cfg: CodecConfig) -> Result<Quantizer, ConfigError> {
        let finite = cfg.min.is_finite() && cfg.max.is_finite();
        if !finite || cfg.min.cmpge(cfg.max).any() {
            return Err(ConfigError::Bounds { min: cfg.min, max: cfg.max });
        }
        for (field, value) in [
            ("position_resolution", cfg.position_resolution),
            ("max_speed", cfg.max_speed),
            ("velocity_resolution", cfg.velocity_resolution),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return Err(ConfigError::NotPositive { field, value });
            }
        }
        if !(6..=15).contains(&cfg.orientation_bits) {
            return Err(ConfigError::OrientationBits(cfg.orientation_bits));
        }
        if !(1..=1000).contains(&cfg.tick_hz) {
            return Err(ConfigError::TickHz(cfg.tick_hz));
        }
        let mut pos_max = [0u32; 3];
        let mut pos_bits = [0u32; 3];
        let extent = cfg.max - cfg.min;
        for axis in 0..3 {
            let steps = (f64::from(extent[axis]) / f64::from(cfg.position_resolution)).ceil();
            if steps >= f64::from(1u32 << 30) {
                return Err(ConfigError::TooFine { field: "position", bits: bits_for(steps as u64) });
            }
            pos_max[axis] = steps as u32;
            pos_bits[axis] = bits_for(u64::from(pos_max[axis]));
        }
        let vel_steps = (f64::from(cfg.max_speed) / f64::from(cfg.velocity_resolution)).ceil();
        if vel_steps >= f64::from(1u32 << 29) {
            return Err(ConfigError::TooFine { field: "velocity", bits: bits_for(vel_steps as u64) + 1 });
        }
        let vel_max = vel_steps as i32;
        let vel_bits = bits_for(vel_max as u64) + 1;
        let rot_max = (1u32 << cfg.orientation_bits) - 1;
        Ok(Quantizer { cfg, pos_max, pos_bits, vel_max, vel_bits, rot_max })
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.cfg
    }

    /// The largest error a position component may come back with: half a step (a position
    /// outside the bounds comes back clamped to them).
    pub fn position_error(&self) -> f32 {
        self.cfg.position_resolution / 2.0
    }

    /// The largest error a velocity component may come back with (within the speed limit).
    pub fn velocity_error(&self) -> f32 {
        self.cfg.velocity_resolution / 2.0
    }

    /// The largest angle, in radians, between an orientation and what comes back.
    pub fn orientation_error(&self) -> f32 {
        // Each of three components is off by at most half a step of 2/√2 over rot_max; the
        // fourth follows from the norm. The angle is 2·acos(|q·q'|); a bound that holds with
        // room to spare is twice the Euclidean distance between the two quaternions.
        let step = 2.0 * SMALLEST_MAX / self.rot_max as f32;
        2.0 * (3.0 * (step / 2.0).powi(2)).sqrt() * 2.0
    }

    /// `s` as integers.
    pub fn quantize(&self, s: &AvatarState) -> Quantized {
        let mut pos = [0u32; 3];
        for (axis, q) in pos.iter_mut().enumerate() {
            let p = sanitize(s.position[axis]).clamp(self.cfg.min[axis], self.cfg.max[axis]);
            let steps =
                ((f64::from(p) - f64::from(self.cfg.min[axis])) / f64::from(self.cfg.position_resolution)).round();
            *q = (steps.max(0.0) as u32).min(self.pos_max[axis]);
        }
        let mut vel = [0i32; 3];
        for (axis, q) in vel.iter_mut().enumerate() {
            let v = (f64::from(sanitize(s.velocity[axis])) / f64::from(self.cfg.velocity_resolution)).round();
            *q = v.clamp(-f64::from(self.vel_max), f64::from(self.vel_max)) as i32;
        }
        Quantized { pos, rot: self.quantize_rotation(s.orientation), vel, anim: s.anim }
    }

    /// The state `q` stands for.
    pub fn dequantize(&self, q: &Quantized) -> AvatarState {
        let mut position = Vec3::ZERO;
        let mut velocity = Vec3::ZERO;
        for axis in 0..3 {
            position[axis] = (f64::from(self.cfg.min[axis])
                + f64::from(q.pos[axis]) * f64::from(self.cfg.position_resolution)) as f32;
            velocity[axis] = (f64::from(q.vel[axis]) * f64::from(self.cfg.velocity_resolution)) as f32;
        }
        AvatarState { position, orientation: self.dequantize_rotation(q.rot), velocity, anim: q.anim }
    }

    fn quantize_rotation(&self, q: Quat) -> Rotation {
        let q = if q.is_finite() && q.length_squared() > 1e-12 { q.normalize() } else { Quat::IDENTITY };
        let c = q.to_array();
        let mut largest = 0;
        for i in 1..4 {
            if c[i].abs() > c[largest].abs() {
                largest = i;
            }
        }
        // q and -q are the same rotation: make the dropped component positive.
        let sign = if c[largest] < 0.0 { -1.0 } else { 1.0 };
        let mut small = [0u16; 3];
        let mut k = 0;
        for (i, &v) in c.iter().enumerate() {
            if i == largest {
                continue;
            }
            let unit = ((v * sign).clamp(-SMALLEST_MAX, SMALLEST_MAX) + SMALLEST_MAX) / (2.0 * SMALLEST_MAX);
            small[k] = (unit * self.rot_max as f32).round() as u16;
            k += 1;
        }
        Rotation { largest: largest as u8, small }
    }

    fn dequantize_rotation(&self, r: Rotation) -> Quat {
        let mut c = [0f32; 4];
        let mut sum = 0.0;
        let mut k = 0;
        for (i, slot) in c.iter_mut().enumerate() {
            if i == usize::from(r.largest) {
                continue;
            }
            let v = f32::from(r.small[k]) / self.rot_max as f32 * (2.0 * SMALLEST_MAX) - SMALLEST_MAX;
            *slot = v;
            sum += v * v;
            k += 1;
        }
        c[usize::from(r.largest & 3)] = (1.0 - sum).max(0.0).sqrt();
        let q = Quat::from_array(c);
        if q.length_squared() > 1e-12 { q.normalize() } else { Quat::IDENTITY }
    }
}

/// NaN and infinities become 0 and the largest finite values, so that a broken game state
/// is sent as something, never as garbage bits.
fn sanitize(v: f32) -> f32 {
    if v.is_nan() { 0.0 } else { v.clamp(f32::MIN, f32::MAX) }
}

/// A unit quaternion as its three smallest components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rotation {
    /// Index (x, y, z, w) of the component left out.
    pub largest: u8,
    /// The other three in order, each 0..=2^bits-1 for -1/√2..1/√2.
    pub small: [u16; 3],
}

/// An avatar's state as the codec sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Quantized {
    /// Steps from the zone's lower corner.
    pub pos: [u32; 3],
    /// Orientation.
    pub rot: Rotation,
    /// Velocity steps.
    pub vel: [i32; 3],
    /// Animation or state id.
    pub anim: u16,
}
