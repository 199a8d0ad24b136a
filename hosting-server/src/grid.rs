//! A uniform grid over the ground plane: what is near a point, in time that depends on how
//! much is near rather than on how much there is. The world files players in one (for what
//! NPCs see) and interest files entities in another (for what clients see), each rebuilt once
//! a tick.

use glam::Vec2;
use rustc_hash::FxHashMap;

/// Items filed by where they are. See the module docs.
#[derive(Debug)]
pub struct Grid<T> {
    cell: f32,
    cells: FxHashMap<(i32, i32), Vec<(Vec2, T)>>,
}

impl<T: Copy> Grid<T> {
    /// An empty grid of `cell`-metre squares (the largest query range is a good size).
    pub fn new(cell: f32) -> Grid<T> {
        Grid { cell: cell.max(1.0), cells: FxHashMap::default() }
    }

    fn key(&self, p: Vec2) -> (i32, i32) {
        ((p.x / self.cell).floor() as i32, (p.y / self.cell).floor() as i32)
    }

    /// Empties every cell, keeping their storage.
    pub fn clear(&mut self) {
        for v in self.cells.values_mut() {
            v.clear();
        }
    }

    /// Files `item` at `at`.
    pub fn insert(&mut self, at: Vec2, item: T) {
        let k = self.key(at);
        self.cells.entry(k).or_default().push((at, item));
    }

    /// Calls `f` with every item within `range` of `at`, and where it is.
    pub fn within(&self, at: Vec2, range: f32, mut f: impl FnMut(Vec2, T)) {
        if range <= 0.0 {
            return;
        }
        let (lo, hi) = (self.key(at - Vec2::splat(range)), self.key(at + Vec2::splat(range)));
        for x in lo.0..=hi.0 {
            for z in lo.1..=hi.1 {
                for &(p, item) in self.cells.get(&(x, z)).map_or(&[][..], Vec::as_slice) {
                    if p.distance_squared(at) <= range * range {
                        f(p, item);
                    }
                }
            }
        }
    }
}
