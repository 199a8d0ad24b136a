//! Synthetic player populations for the interest benchmarks and load tools: players spread
//! uniformly over a square world, or gathered in towns, walking at a player's pace.

use glam::Vec3;
use rand::{Rng, RngExt};

/// How players are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Uniformly over a square sized so that a player has about [`UNIFORM_DENSITY`] others
    /// within 50 m.
    Uniform,
    /// 70% in towns (one per thousand players, Gaussian with a 30 m deviation), the rest
    /// uniformly over the same square.
    Clustered,
}

/// Players within 50 m of a player, on average, in the uniform layout.
pub const UNIFORM_DENSITY: f32 = 20.0;

/// Side of the square world for `n` players.
pub fn world_side(n: usize) -> f32 {
    // n * pi * 50^2 / side^2 = UNIFORM_DENSITY
    (n as f32 * std::f32::consts::PI * 2500.0 / UNIFORM_DENSITY).sqrt()
}

fn normal(rng: &mut impl Rng) -> f32 {
    // Box-Muller.
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Positions of `n` players.
pub fn positions(n: usize, layout: Layout, rng: &mut impl Rng) -> Vec<Vec3> {
    let side = world_side(n);
    let towns: Vec<Vec3> = (0..(n / 1000).max(1))
        .map(|_| Vec3::new(rng.random_range(0.0..side), 0.0, rng.random_range(0.0..side)))
        .collect();
    (0..n)
        .map(|_| match layout {
            Layout::Clustered if rng.random_bool(0.7) => {
                let t = towns[rng.random_range(0..towns.len())];
                t + Vec3::new(30.0 * normal(rng), 0.0, 30.0 * normal(rng))
            }
            _ => Vec3::new(rng.random_range(0.0..side), 0.0, rng.random_range(0.0..side)),
        })
        .collect()
}

/// Moves each player up to `max_step` in a random direction on the ground.
pub fn walk(positions: &mut [Vec3], max_step: f32, rng: &mut impl Rng) {
    for p in positions {
        let a: f32 = rng.random_range(0.0..std::f32::consts::TAU);
        let d: f32 = rng.random_range(0.0..max_step);
        *p += Vec3::new(a.cos() * d, 0.0, a.sin() * d);
    }
}
