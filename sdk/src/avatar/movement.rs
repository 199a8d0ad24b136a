//! A movement model for tests and benchmarks: a player that walks, runs, turns, strafes,
//! jumps, stops and idles, with acceleration and gravity, everything drawn from a seed.
//!
//! Not a game's physics: just enough of one that the codec, the interpolation and the
//! upload budget are measured on the motion real avatars have (long steady stretches, sudden
//! starts and stops, turns, jumps, standing still), not on random noise or straight lines.

use glam::{Quat, Vec3};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::AvatarState;

/// Walking speed, m/s.
pub const WALK: f32 = 1.4;
/// Running speed, m/s.
pub const RUN: f32 = 5.5;
/// Sideways speed, m/s.
pub const STRAFE: f32 = 1.2;
/// How fast a player reaches its speed or stops, m/s².
pub const ACCELERATION: f32 = 8.0;
/// Turning rate, rad/s.
pub const TURN_RATE: f32 = 2.5;
/// Upward speed at the start of a jump, m/s.
pub const JUMP_SPEED: f32 = 4.5;
/// m/s².
pub const GRAVITY: f32 = 9.81;

/// What a player is doing; its animation id is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Activity {
    /// Standing still.
    Idle = 0,
    /// Walking forward.
    Walk = 1,
    /// Running forward.
    Run = 2,
    /// Turning on the spot, then going on as before.
    Turn = 3,
    /// Moving sideways.
    Strafe = 4,
    /// A jump, carrying the speed it had.
    Jump = 5,
    /// Slowing to a stop.
    Stop = 6,
}

/// One simulated player.
#[derive(Debug, Clone)]
pub struct Mover {
    rng: Xoshiro256PlusPlus,
    position: Vec3,
    yaw: f32,
    velocity: Vec3,
    activity: Activity,
    /// Seconds left in the current activity.
    left: f32,
    /// Turning: the yaw to reach. Strafing: the direction (±1).
    aim: f32,
    /// Keeps players inside a square of this half-size around `centre`.
    half: f32,
    centre: Vec3,
}

impl Mover {
    /// A player at a random place in a square of side `side` around the origin, from `seed`.
    pub fn new(seed: u64, side: f32) -> Mover {
        Mover::around(seed, Vec3::ZERO, side)
    }

    /// A player at a random place in a square of side `side` around `centre` (on the ground),
    /// staying inside it, from `seed`.
    pub fn around(seed: u64, centre: Vec3, side: f32) -> Mover {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let half = side / 2.0;
        let centre = Vec3::new(centre.x, 0.0, centre.z);
        let position = centre + Vec3::new(rng.random_range(-half..half), 0.0, rng.random_range(-half..half));
        let yaw = rng.random_range(-std::f32::consts::PI..std::f32::consts::PI);
        let mut m = Mover {
            rng,
            position,
            yaw,
            velocity: Vec3::ZERO,
            activity: Activity::Idle,
            left: 0.0,
            aim: 0.0,
            half,
            centre,
        };
        m.next_activity();
        m
    }

    /// What the player does now.
    pub fn activity(&self) -> Activity {
        self.activity
    }

    /// The avatar as it is now.
    pub fn state(&self) -> AvatarState {
        AvatarState {
            position: self.position,
            orientation: Quat::from_rotation_y(self.yaw),
            velocity: self.velocity,
            anim: self.activity as u16,
        }
    }

    /// Moves on by `dt` seconds and returns the avatar.
    pub fn step(&mut self, dt: f32) -> AvatarState {
        self.left -= dt;
        let airborne = self.position.y > 0.0 || self.velocity.y > 0.0;
        if self.left <= 0.0 && !airborne {
            self.next_activity();
        }
        let forward = Vec3::new(self.yaw.sin(), 0.0, self.yaw.cos());
        let right = Vec3::new(forward.z, 0.0, -forward.x);
        let target = match self.activity {
            Activity::Idle | Activity::Stop | Activity::Turn => Vec3::ZERO,
            Activity::Walk => forward * WALK,
            Activity::Run => forward * RUN,
            Activity::Strafe => right * STRAFE * self.aim,
            Activity::Jump => Vec3::new(self.velocity.x, 0.0, self.velocity.z),
        };
        if self.activity == Activity::Turn {
            let diff = wrap(self.aim - self.yaw);
            self.yaw = wrap(self.yaw + diff.clamp(-TURN_RATE * dt, TURN_RATE * dt));
        }
        // Ground speed towards the target at the acceleration limit; in the air it keeps.
        let ground = Vec3::new(self.velocity.x, 0.0, self.velocity.z);
        let change = target - ground;
        let step = if airborne { Vec3::ZERO } else { change.clamp_length_max(ACCELERATION * dt) };
        let mut v = ground + step;
        v.y = if airborne { self.velocity.y - GRAVITY * dt } else { 0.0 };
        self.velocity = v;
        self.position += v * dt;
        if self.position.y <= 0.0 && airborne {
            self.position.y = 0.0;
            self.velocity.y = 0.0;
        }
        // Walls: turn back towards the middle.
        let off = self.position - self.centre;
        if off.x.abs() > self.half || off.z.abs() > self.half {
            self.position.x = self.centre.x + off.x.clamp(-self.half, self.half);
            self.position.z = self.centre.z + off.z.clamp(-self.half, self.half);
            self.activity = Activity::Turn;
            self.aim = wrap((-off.x).atan2(-off.z));
            self.left = 1.0;
        }
        self.state()
    }

    fn next_activity(&mut self) {
        let r: f32 = self.rng.random();
        let (activity, secs) = match r {
            r if r < 0.30 => (Activity::Walk, 2.0..8.0),
            r if r < 0.45 => (Activity::Run, 1.0..5.0),
            r if r < 0.60 => (Activity::Idle, 1.0..10.0),
            r if r < 0.72 => (Activity::Turn, 0.5..1.5),
            r if r < 0.82 => (Activity::Strafe, 0.5..2.0),
            r if r < 0.90 => (Activity::Jump, 0.1..0.2),
            _ => (Activity::Stop, 0.5..1.5),
        };
        self.activity = activity;
        self.left = self.rng.random_range(secs);
        match activity {
            Activity::Turn => self.aim = wrap(self.yaw + self.rng.random_range(-2.5..2.5)),
            Activity::Strafe => self.aim = if self.rng.random::<bool>() { 1.0 } else { -1.0 },
            Activity::Jump => self.velocity.y = JUMP_SPEED,
            _ => {}
        }
    }
}

/// An angle in -π..π.
fn wrap(a: f32) -> f32 {
    let tau = std::f32::consts::TAU;
    (a + std::f32::consts::PI).rem_euclid(tau) - std::f32::consts::PI
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_moves_the_same_way_and_every_activity_happens() {
        let run = |seed| {
            let mut m = Mover::new(seed, 200.0);
            (0..30 * 120).map(|_| m.step(1.0 / 30.0)).collect::<Vec<_>>()
        };
        let a = run(4);
        assert_eq!(a, run(4));
        assert_ne!(a, run(5));
        let mut seen = [false; 7];
        for s in &a {
            seen[usize::from(s.anim)] = true;
            assert!(s.position.x.abs() <= 100.0 && s.position.z.abs() <= 100.0 && s.position.y >= 0.0);
            assert!(s.velocity.length() <= RUN + JUMP_SPEED + 0.01, "{s:?}");
        }
        assert_eq!(seen, [true; 7], "some activity never happened in two minutes");
        // Speeds change no faster than the acceleration allows on the ground.
        for w in a.windows(2) {
            let (p, q) = (w[0].velocity, w[1].velocity);
            let ground = Vec3::new(q.x - p.x, 0.0, q.z - p.z).length();
            assert!(ground <= ACCELERATION / 30.0 + 1e-3, "{p} to {q}");
        }
    }
}
