//! Interest: which entities each client hears about, and which of those go in this tick's
//! snapshot.
//!
//! An entity enters a client's view within [`InterestConfig::radius`] and leaves it only past
//! [`InterestConfig::leave_radius`], so one that walks along the edge does not spawn and
//! despawn at the client every tick. Of those in view, a snapshot carries what fits the
//! client's byte budget, chosen by a priority accumulator: every tick each entity gains
//! priority by how near it is, the highest go out and start again from zero, so far entities
//! are sent less often, but always sent (delayed, never starved).

use std::cmp::Ordering;

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

/// About what an entity's entry costs in a snapshot once the client holds a state of it (a
/// walking NPC's delta is 7 bytes) and before (whole: about twice that). The budget is kept
/// with these, so that choosing costs no look-up in the snapshot writer.
const DELTA_COST: usize = 7;
/// See [`DELTA_COST`].
const WHOLE_COST: usize = 14;

/// An entity in a client's view.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: EntityId,
    /// Accumulated priority.
    priority: f32,
    /// Whether it went out since it entered the view (so its next entry is likely a delta).
    sent: bool,
}

/// One client's view. See the module docs.
#[derive(Debug, Default)]
pub struct ClientInterest {
    /// Entities in view, in id order.
    in_view: Vec<Slot>,
    /// The next view, built by merging the last with what is near now.
    next: Vec<Slot>,
    seen: Vec<EntityId>,
    order: Vec<(f32, u32)>,
}

impl ClientInterest {
    /// A client that sees nothing yet.
    pub fn new() -> ClientInterest {
        ClientInterest::default()
    }

    /// Entities in view, in id order.
    pub fn in_view(&self) -> impl Iterator<Item = EntityId> + '_ {
        self.in_view.iter().map(|s| s.id)
    }

    /// Whether `id` is in view.
    pub fn sees(&self, id: EntityId) -> bool {
        self.in_view.binary_search_by_key(&id, |s| s.id).is_ok()
    }

    /// Updates the view of a client at `at`: entities within the radius enter, those beyond
    /// the leave radius (or gone from the world) leave.
    pub fn update(&mut self, cfg: &InterestConfig, grid: &EntityGrid, entities: &[Entity], at: Vec2) -> ViewChange {
        let mut change = ViewChange::default();
        self.seen.clear();
        grid.0.within(at, cfg.leave_radius, |_, id| self.seen.push(id));
        self.seen.sort_unstable();
        // Merge the view with what is within the leave radius, both in id order: those in
        // both stay, those only in the view go, those only near enter if within the radius.
        self.next.clear();
        let (mut old, mut near) = (self.in_view.iter().peekable(), self.seen.iter().peekable());
        loop {
            let order = match (old.peek(), near.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(s), Some(&&n)) => s.id.cmp(&n),
            };
            match order {
                Ordering::Less => {
                    if let Some(s) = old.next() {
                        change.despawned.push(s.id);
                    }
                }
                Ordering::Equal => {
                    self.next.extend(old.next().copied());
                    near.next();
                }
                Ordering::Greater => {
                    if let Some(&n) = near.next()
                        && entities[n.0 as usize].at.distance_squared(at) <= cfg.radius * cfg.radius
                    {
                        // A newcomer goes out in the next snapshot.
                        self.next.push(Slot { id: n, priority: f32::MAX / 2.0, sent: false });
                        change.spawned.push(n);
                    }
                }
            }
        }
        std::mem::swap(&mut self.in_view, &mut self.next);
        change
    }

    /// Chooses this tick's entities: every one in view gains priority by its nearness, then the
    /// highest are taken while their estimated bytes ([`DELTA_COST`], or [`WHOLE_COST`] for one
    /// not yet sent) fit `budget`, and start again from zero. Returns them, highest priority
    /// first.
    pub fn choose(&mut self, entities: &[Entity], at: Vec2, budget: usize) -> Vec<EntityId> {
        self.order.clear();
        for (i, s) in self.in_view.iter_mut().enumerate() {
            let d = entities[s.id.0 as usize].at.distance(at);
            s.priority += 1.0 / (1.0 + d / 10.0);
            self.order.push((s.priority, i as u32));
        }
        let slots = &self.in_view;
        self.order
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(slots[a.1 as usize].id.cmp(&slots[b.1 as usize].id)));
        let mut left = budget;
        let mut chosen = Vec::new();
        for &(_, i) in &self.order {
            let s = &mut self.in_view[i as usize];
            let c = if s.sent { DELTA_COST } else { WHOLE_COST };
            if c > left {
                continue;
            }
            left -= c;
            chosen.push(s.id);
            s.priority = 0.0;
            s.sent = true;
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
        // Room for 5 of 40 a tick once each has gone out whole (the first 40 cost twice).
        let mut sent = vec![0u32; 40];
        let mut last = vec![0usize; 40];
        let mut longest = vec![0usize; 40];
        for tick in 1..=400 {
            for id in c.choose(&entities, Vec2::ZERO, 5 * DELTA_COST) {
                let i = id.0 as usize;
                sent[i] += 1;
                longest[i] = longest[i].max(tick - last[i]);
                last[i] = tick;
            }
        }
        let total = sent.iter().sum::<u32>();
        assert!((400 * 5 - 80..=400 * 5).contains(&total), "{total}");
        assert!(sent[0] > 3 * sent[39], "near {} against far {}", sent[0], sent[39]);
        assert!(longest.iter().all(|&l| l <= 60), "longest waits {longest:?}");
        assert!(sent.iter().all(|&n| n >= 5), "{sent:?}");
    }
}
