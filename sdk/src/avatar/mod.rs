//! Avatars: the state a player serves to the players near it, and the codec that carries it.
//!
//! Sans-IO. [`Quantizer`] turns an [`AvatarState`] into integers inside a zone's bounds;
//! [`Encoder`] and [`Decoder`] carry one sender's states to one receiver as bit-packed
//! updates, each delta-encoded against the last state the receiver acknowledged after moving
//! that baseline on by its velocity (see [`codec`] for the bits); [`Interpolator`] shows a
//! neighbour's avatar smoothly from the updates that reach us; [`Scheduler`] decides whom
//! to serve each tick, by distance inside an upload budget; [`stream`] carries a player's
//! states to the watchers a relay fans them out to, sealed and without acknowledgements;
//! [`movement`] moves simulated
//! players for tests and benchmarks, and [`trace`] records avatars into a compact file that
//! benchmarks replay.

mod bits;
pub mod codec;
pub mod interp;
pub mod mesh;
pub mod movement;
mod quant;
pub mod schedule;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod trace;

use glam::{Quat, Vec3};

pub use self::codec::{Ack, DecodeError, Decoded, Decoder, DecoderCounters, Encoder, EncoderCounters, Form, MAX_AGE};
pub use self::interp::{InterpConfig, Interpolator};
pub use self::mesh::{AvatarEvent, AvatarMesh, MeshCounters, Publishing};
pub use self::quant::{CodecConfig, ConfigError, Quantized, Quantizer, Rotation};
pub use self::schedule::{RateConfig, Scheduler};
pub use self::stream::{StreamDecoder, StreamEncoder, StreamError, StreamOpener, StreamSealer};
pub use self::trace::{Trace, TraceError};

/// What a player's avatar looks like at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AvatarState {
    /// Where it is, metres.
    pub position: Vec3,
    /// Which way it faces (a unit quaternion; others are normalised, a zero one is taken as
    /// the identity).
    pub orientation: Quat,
    /// How fast it moves, metres a second: receivers extrapolate with it, and the codec
    /// predicts the next position from it.
    pub velocity: Vec3,
    /// The game's animation or state id.
    pub anim: u16,
}

impl Default for AvatarState {
    fn default() -> Self {
        AvatarState { position: Vec3::ZERO, orientation: Quat::IDENTITY, velocity: Vec3::ZERO, anim: 0 }
    }
}
