//! What NPCs do: each runs a [`Behaviour`], which each tick chooses the velocity it wants from
//! what it sees (its own state, the players near it, its zone). The built-in ones are wander,
//! patrol, follow and flee; a studio registers its own by name when it builds the world
//! ([`crate::world::World::new`]'s `extra`, with [`crate::world::World::behaviour_names`] for
//! the content check) and names them in its content.

use glam::Vec2;
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

use crate::content::{NpcKind, Spawn, Zone};

/// The behaviours every world knows.
pub const BUILT_IN: &[&str] = &["wander", "patrol", "follow", "flee"];

/// What an NPC sees when it decides.
#[derive(Debug)]
pub struct View<'a> {
    /// Where it is (x, z).
    pub at: Vec2,
    /// Its kind.
    pub kind: &'a NpcKind,
    /// Where it spawned, and its route if it has one.
    pub spawn: &'a Spawn,
    /// The zone it lives in.
    pub zone: &'a Zone,
    /// The players within its kind's range, nearest first (x, z).
    pub players: &'a [Vec2],
    /// Seconds since the last tick.
    pub dt: f32,
}

/// An NPC's mind. One instance per NPC, so it may keep state (a target, a route index).
pub trait Behaviour: std::fmt::Debug + Send {
    /// The velocity it wants now (x, z, m/s); the world caps it at the kind's speed and keeps
    /// the NPC in its zone.
    fn steer(&mut self, view: &View<'_>, rng: &mut Xoshiro256PlusPlus) -> Vec2;
}

/// Makes a behaviour for one NPC.
pub type Factory = fn() -> Box<dyn Behaviour>;

/// The built-in behaviour of this name.
pub fn built_in(name: &str) -> Option<Factory> {
    match name {
        "wander" => Some(|| Box::new(Wander::default())),
        "patrol" => Some(|| Box::new(Patrol::default())),
        "follow" => Some(|| Box::new(Follow::default())),
        "flee" => Some(|| Box::new(Flee::default())),
        _ => None,
    }
}

/// Walks to random points within its spawn circle, pausing between them.
#[derive(Debug, Default)]
pub struct Wander {
    target: Option<Vec2>,
    pause: f32,
}

impl Behaviour for Wander {
    fn steer(&mut self, v: &View<'_>, rng: &mut Xoshiro256PlusPlus) -> Vec2 {
        if self.pause > 0.0 {
            self.pause -= v.dt;
            return Vec2::ZERO;
        }
        let target = *self.target.get_or_insert_with(|| {
            let angle = rng.random_range(0.0..std::f32::consts::TAU);
            let r = v.spawn.radius * rng.random::<f32>().sqrt();
            Vec2::from(v.spawn.around) + Vec2::from_angle(angle) * r
        });
        let to = target - v.at;
        if to.length() < 0.5 {
            self.target = None;
            self.pause = rng.random_range(0.5..3.0);
            return Vec2::ZERO;
        }
        to.normalize_or_zero() * v.kind.speed * 0.5
    }
}

/// Walks its route's points in a loop.
#[derive(Debug, Default)]
pub struct Patrol {
    next: usize,
}

impl Behaviour for Patrol {
    fn steer(&mut self, v: &View<'_>, _rng: &mut Xoshiro256PlusPlus) -> Vec2 {
        let route = &v.spawn.route;
        if route.is_empty() {
            return Vec2::ZERO;
        }
        let mut target = Vec2::from(route[self.next % route.len()]);
        if (target - v.at).length() < 0.5 {
            self.next = (self.next + 1) % route.len();
            target = Vec2::from(route[self.next]);
        }
        (target - v.at).normalize_or_zero() * v.kind.speed
    }
}

/// Walks up to the nearest player in range and keeps close; wanders when nobody is.
#[derive(Debug, Default)]
pub struct Follow {
    idle: Wander,
}

impl Behaviour for Follow {
    fn steer(&mut self, v: &View<'_>, rng: &mut Xoshiro256PlusPlus) -> Vec2 {
        match v.players.first() {
            Some(&p) if (p - v.at).length() > 2.0 => (p - v.at).normalize_or_zero() * v.kind.speed,
            Some(_) => Vec2::ZERO,
            None => self.idle.steer(v, rng),
        }
    }
}

/// Runs from the nearest player in range; wanders when nobody is.
#[derive(Debug, Default)]
pub struct Flee {
    idle: Wander,
}

impl Behaviour for Flee {
    fn steer(&mut self, v: &View<'_>, rng: &mut Xoshiro256PlusPlus) -> Vec2 {
        match v.players.first() {
            Some(&p) => (v.at - p).normalize_or(Vec2::X) * v.kind.speed,
            None => self.idle.steer(v, rng),
        }
    }
}
