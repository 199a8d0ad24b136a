//! Interest: which entities each client hears about, and which of those go in this tick's
//! snapshot.
//!
//! An entity enters a client's view within [`InterestConfig::radius`] and leaves it only past
//! [`InterestConfig::leave_radius`], so one that walks along the edge does not spawn and
//! despawn at the client every tick. Of those in view, a snapshot carries what fits the
//! client's byte budget, chosen by a priority accumulator: every tick each entity gains
//! priority by how near it is, the highest go out and start again from zero, so far entities
//! are sent less often, but always sent (delayed, never starved).

use std::collections::BTreeMap;

use glam::Vec2;

use crate::grid::Grid;
use crate::world::{Entity, EntityId};

/// How far a client sees, and how much it is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterestConfig {
    /// An entity this near enters the view, m (default 120).
    pub radius: f32,
    /// An entity farther than this leaves it, m (default 135).
    pub leave_radius: f32,
    /// Bytes of entity updates one snapshot may carry (default 1,100: one datagram's worth).
    pub budget: usize,
}

impl Default for InterestConfig {
    fn default() -> Self {
        InterestConfig { radius: 120.0, leave_radius: 135.0, budget: 1_100 }
    }
}

/// Entities by where they are, rebuilt once a tick and shared by every client's query.
#[derive(Debug)]
pub struct EntityGrid(Grid<EntityId>);

impl EntityGrid {
    /// An empty grid of `cell`-metre squares (the leave radius is a good size).
    pub fn new(cell: f32) -> EntityGrid {
        EntityGrid(Grid::new(cell))
    }

    /// Files every present entity by where it is now.
    pub fn rebuild(&mut self, entities: &[Entity]) {
        self.rebuild_with(entities, |_| true);
    }

    /// Files every present entity that `keep` takes (a server's own zone's) by where it is.
    pub fn rebuild_with(&mut self, entities: &[Entity], keep: impl Fn(&Entity) -> bool) {
        self.0.clear();
        for e in entities.iter().filter(|e| e.present && keep(e)) {
            self.0.insert(e.at, e.id);
        }
    }
}

/// What changed in a client's view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewChange {
    /// Entities that entered it, in id order.
    pub spawned: Vec<EntityId>,
    /// Entities that left it (or the world), in id order.
    pub despawned: Vec<EntityId>,
}

/// One client's view. See the module docs.
#[derive(Debug, Default)]
pub struct ClientInterest {
    /// Entities in view, with their accumulated priority.
    in_view: BTreeMap<EntityId, f32>,
    seen: Vec<EntityId>,
    order: Vec<(f32, EntityId)>,
}

impl ClientInterest {
    /// A client that sees nothing yet.
    pub fn new() -> ClientInterest {
        ClientInterest::default()
    }

    /// Entities in view, in id order.
    pub fn in_view(&self) -> impl Iterator<Item = EntityId> + '_ {
        self.in_view.keys().copied()
    }

    /// Whether `id` is in view.
    pub fn sees(&self, id: EntityId) -> bool {
        self.in_view.contains_key(&id)
    }

    /// Updates the view of a client at `at`: entities within the radius enter, those beyond
    /// the leave radius (or gone from the world) leave.
    pub fn update(&mut self, cfg: &InterestConfig, grid: &EntityGrid, entities: &[Entity], at: Vec2) -> ViewChange {
        let mut change = ViewChange::default();
        self.seen.clear();
        grid.0.within(at, cfg.leave_radius, |_, id| self.seen.push(id));
        self.seen.sort_unstable();
        // Those in view and still within the leave radius stay; the rest go.
        let seen = &self.seen;
        self.in_view.retain(|id, _| {
            let keep = seen.binary_search(id).is_ok();
            if !keep {
                change.despawned.push(*id);
            }
            keep
        });
        for &id in &self.seen {
            let e = &entities[id.0 as usize];
            if !self.in_view.contains_key(&id) && e.at.distance_squared(at) <= cfg.radius * cfg.radius {
                // A newcomer goes out in the next snapshot.
                self.in_view.insert(id, f32::MAX / 2.0);
                change.spawned.push(id);
            }
        }
        change
    }

    /// Chooses this tick's entities: every one in view gains priority by its nearness, then the
    /// highest are taken while their `cost` in bytes fits `budget`, and start again from zero.
    /// Returns them, highest priority first.
    pub fn choose(
        &mut self,
        entities: &[Entity],
        at: Vec2,
        budget: usize,
        cost: impl Fn(EntityId) -> usize,
    ) -> Vec<EntityId> {
        self.order.clear();
        for (id, p) in &mut self.in_view {
            let d = entities[id.0 as usize].at.distance(at);
            *p += 1.0 / (1.0 + d / 10.0);
            self.order.push((*p, *id));
        }
        self.order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut left = budget;
        let mut chosen = Vec::new();
        for &(_, id) in &self.order {
            let c = cost(id);
            if c > left {
                continue;
            }
            left -= c;
            chosen.push(id);
            if let Some(p) = self.in_view.get_mut(&id) {
                *p = 0.0;
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::world::EntityKind;

    fn entity(i: u32, x: f32) -> Entity {
        Entity {
            id: EntityId(i),
            kind: EntityKind::Object { kind: 0 },
            at: Vec2::new(x, 0.0),
            heading: 0.0,
            state: 0,
            present: true,
        }
    }

    #[test]
    fn entities_enter_within_the_radius_and_leave_only_past_the_larger_one() {
        let cfg = InterestConfig { radius: 100.0, leave_radius: 110.0, budget: 1000 };
        let mut entities: Vec<Entity> = (0..4).map(|i| entity(i, 50.0 * i as f32)).collect();
        let mut grid = EntityGrid::new(100.0);
        grid.rebuild(&entities);
        let mut c = ClientInterest::new();
        let first = c.update(&cfg, &grid, &entities, Vec2::ZERO);
        assert_eq!(first.spawned, vec![EntityId(0), EntityId(1), EntityId(2)]);
        // Entity 2 wanders between 100 and 110 m, back and forth: no churn.
        for x in [105.0, 99.0, 109.0, 101.0] {
            entities[2].at.x = x;
            grid.rebuild(&entities);
            assert_eq!(c.update(&cfg, &grid, &entities, Vec2::ZERO), ViewChange::default(), "at {x}");
        }
        entities[2].at.x = 111.0;
        grid.rebuild(&entities);
        assert_eq!(c.update(&cfg, &grid, &entities, Vec2::ZERO).despawned, vec![EntityId(2)]);
        // The client walks on: entity 3 comes in, 0 goes; an entity that dies leaves.
        entities[1].present = false;
        grid.rebuild(&entities);
        let moved = c.update(&cfg, &grid, &entities, Vec2::new(120.0, 0.0));
        assert_eq!(moved.spawned, vec![EntityId(2), EntityId(3)]);
        assert_eq!(moved.despawned, vec![EntityId(0), EntityId(1)]);
        assert_eq!(c.in_view().collect::<Vec<_>>(), vec![EntityId(2), EntityId(3)]);
    }

    #[test]
    fn far_entities_are_sent_less_often_but_never_starved() {
        let cfg = InterestConfig { radius: 500.0, leave_radius: 550.0, budget: 1000 };
        let entities: Vec<Entity> = (0..40).map(|i| entity(i, 10.0 * i as f32)).collect();
        let mut grid = EntityGrid::new(100.0);
        grid.rebuild(&entities);
        let mut c = ClientInterest::new();
        c.update(&cfg, &grid, &entities, Vec2::ZERO);
        // Room for 5 of 40 a tick.
        let mut sent = vec![0u32; 40];
        let mut last = vec![0usize; 40];
        let mut longest = vec![0usize; 40];
        for tick in 1..=400 {
            for id in c.choose(&entities, Vec2::ZERO, 1000, |_| 200) {
                let i = id.0 as usize;
                sent[i] += 1;
                longest[i] = longest[i].max(tick - last[i]);
                last[i] = tick;
            }
        }
        assert_eq!(sent.iter().sum::<u32>(), 400 * 5);
        assert!(sent[0] > 3 * sent[39], "near {} against far {}", sent[0], sent[39]);
        assert!(longest.iter().all(|&l| l <= 60), "longest waits {longest:?}");
        assert!(sent.iter().all(|&n| n >= 5), "{sent:?}");
    }
}
