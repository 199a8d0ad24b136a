//! Interest management: which players are introduced to each other.
//!
//! From the coordinates players report, each tick finds, for every player, the others within
//! the enter radius, and pairs them nearest first while both have fewer than
//! `max_neighbours`. A pair lasts until the two are farther apart than the leave radius,
//! which is larger: two players walking along the edge of each other's range are not
//! introduced and dismissed over and over (hysteresis). Both sides of a new pair get an
//! [`InterestEvent::Introduce`]; a pair that drifts apart gets an [`InterestEvent::Farewell`].
//!
//! The rules, and what they guarantee after every tick:
//! - no player has more than `max_neighbours` pairs;
//! - every pair is within the leave radius, and was within the enter radius when it formed;
//! - no two unpaired players within the enter radius both have room left (the pairing is
//!   maximal), and each player's new pairs are its nearest candidates with room;
//! - ties are broken by join order, so the same inputs give the same pairs.
//!
//! A player with no room is not searched at all: in a crowd most players are full, and a
//! tick costs a distance check per existing pair plus a grid search for the few with room.
//! The grid is on the ground plane (x and z), with cells one enter radius wide, so a search
//! looks at 3 × 3 cells; the distance itself is in three dimensions.
//!
//! Sans-IO and clock-free: the server calls [`Interest::tick`] at its interest rate.

use std::collections::VecDeque;

use glam::Vec3;
use rustc_hash::FxHashMap;
use shoal_protocol::NodeId;

/// How far introductions reach, and how many a player gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterestConfig {
    /// Players closer than this are introduced (metres, or the game's unit).
    pub enter_radius: f32,
    /// Introduced players farther apart than this are dismissed. At least `enter_radius`.
    pub leave_radius: f32,
    /// Most neighbours per player.
    pub max_neighbours: usize,
}

impl Default for InterestConfig {
    fn default() -> Self {
        InterestConfig { enter_radius: 50.0, leave_radius: 60.0, max_neighbours: 16 }
    }
}

/// Why a config or a position was refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum InterestError {
    /// The radii are not finite, not positive, or leave is smaller than enter.
    #[error("radii must be finite with 0 < enter ({enter}) <= leave ({leave})")]
    Radii {
        /// The enter radius given.
        enter: f32,
        /// The leave radius given.
        leave: f32,
    },
    /// `max_neighbours` is zero.
    #[error("max_neighbours must be at least 1")]
    NoNeighbours,
    /// A coordinate is NaN or infinite.
    #[error("position is not finite")]
    NotFinite,
}

impl InterestConfig {
    /// Checks the config.
    pub fn validate(&self) -> Result<(), InterestError> {
        check_tier(self.enter_radius, self.leave_radius, self.max_neighbours)
    }
}

/// The rules every tier of interest keeps: finite radii with 0 < enter ≤ leave, and room for
/// at least one.
pub(crate) fn check_tier(enter: f32, leave: f32, most: usize) -> Result<(), InterestError> {
    if !(enter.is_finite() && leave.is_finite() && enter > 0.0 && leave >= enter) {
        return Err(InterestError::Radii { enter, leave });
    }
    if most == 0 {
        return Err(InterestError::NoNeighbours);
    }
    Ok(())
}

/// A change to the pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterestEvent {
    /// The two should be introduced to each other.
    Introduce(NodeId, NodeId),
    /// The two are no longer neighbours.
    Farewell(NodeId, NodeId),
}

/// What the last tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickStats {
    /// Players tracked.
    pub players: usize,
    /// Pairs after the tick.
    pub pairs: usize,
    /// Pairs formed.
    pub introduced: usize,
    /// Pairs dismissed.
    pub dismissed: usize,
    /// Players that had room and were searched.
    pub searched: usize,
}

/// The players and their pairs. See the module docs.
#[derive(Debug)]
pub struct Interest {
    cfg: InterestConfig,
    /// Per slot: the player, where it is, whether the slot is in use, and its neighbours.
    ids: Vec<NodeId>,
    positions: Vec<Vec3>,
    alive: Vec<bool>,
    neighbours: Vec<Vec<u32>>,
    free: Vec<u32>,
    index: FxHashMap<NodeId, u32>,
    pairs: usize,
    /// The grid, rebuilt each tick: (cell, slot) sorted, and each cell's range in it.
    order: Vec<(u64, u32)>,
    cells: FxHashMap<u64, (u32, u32)>,
    candidates: Vec<(f32, u32)>,
    events: VecDeque<InterestEvent>,
    stats: TickStats,
}

impl Interest {
    /// An empty set of players.
    pub fn new(cfg: InterestConfig) -> Result<Interest, InterestError> {
        cfg.validate()?;
        Ok(Interest {
            cfg,
            ids: Vec::new(),
            positions: Vec::new(),
            alive: Vec::new(),
            neighbours: Vec::new(),
            free: Vec::new(),
            index: FxHashMap::default(),
            pairs: 0,
            order: Vec::new(),
            cells: FxHashMap::default(),
            candidates: Vec::new(),
            events: VecDeque::new(),
            stats: TickStats::default(),
        })
    }

    /// The config.
    pub fn config(&self) -> &InterestConfig {
        &self.cfg
    }

    /// Players tracked.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no player is tracked.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Records where `id` is, adding it if new. It is paired on the next tick.
    pub fn update(&mut self, id: NodeId, position: Vec3) -> Result<(), InterestError> {
        if !position.is_finite() {
            return Err(InterestError::NotFinite);
        }
        if let Some(&slot) = self.index.get(&id) {
            self.positions[slot as usize] = position;
            return Ok(());
        }
        let slot = match self.free.pop() {
            Some(s) => {
                let i = s as usize;
                self.ids[i] = id;
                self.positions[i] = position;
                self.alive[i] = true;
                s
            }
            None => {
                self.ids.push(id);
                self.positions.push(position);
                self.alive.push(true);
                self.neighbours.push(Vec::new());
                (self.ids.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        Ok(())
    }

    /// Where `id` was last reported.
    pub fn position(&self, id: NodeId) -> Option<Vec3> {
        self.index.get(&id).map(|&s| self.positions[s as usize])
    }

    /// Forgets `id` (signed out, lost): each of its pairs gets a farewell now.
    pub fn remove(&mut self, id: NodeId) {
        let Some(slot) = self.index.remove(&id) else { return };
        let s = slot as usize;
        for q in std::mem::take(&mut self.neighbours[s]) {
            self.neighbours[q as usize].retain(|&x| x != slot);
            self.pairs -= 1;
            self.events.push_back(InterestEvent::Farewell(id, self.ids[q as usize]));
        }
        self.alive[s] = false;
        self.free.push(slot);
    }

    /// The current neighbours of `id`.
    pub fn neighbours(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let slots = self.index.get(&id).map_or(&[][..], |&s| &self.neighbours[s as usize][..]);
        slots.iter().map(|&q| self.ids[q as usize])
    }

    /// Pairs now.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// What the last tick did.
    pub fn stats(&self) -> TickStats {
        self.stats
    }

    /// The next change to the pairs.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<InterestEvent> {
        self.events.pop_front()
    }

    fn cell_of(&self, p: Vec3) -> (i32, i32) {
        let c = self.cfg.enter_radius;
        ((p.x / c).floor() as i32, (p.z / c).floor() as i32)
    }

    fn key(cx: i32, cz: i32) -> u64 {
        (u64::from(cx as u32) << 32) | u64::from(cz as u32)
    }

    /// Dismisses pairs that drifted apart, then pairs players with room, nearest first.
    pub fn tick(&mut self) {
        let mut stats = TickStats::default();
        let leave2 = self.cfg.leave_radius * self.cfg.leave_radius;
        let enter2 = self.cfg.enter_radius * self.cfg.enter_radius;
        let k = self.cfg.max_neighbours;
        // Farewells: each pair once, from its lower slot.
        for p in 0..self.ids.len() {
            if !self.alive[p] {
                continue;
            }
            let pos = self.positions[p];
            let mut i = 0;
            while i < self.neighbours[p].len() {
                let q = self.neighbours[p][i] as usize;
                if q > p && pos.distance_squared(self.positions[q]) > leave2 {
                    self.neighbours[p].swap_remove(i);
                    self.neighbours[q].retain(|&x| x as usize != p);
                    self.pairs -= 1;
                    stats.dismissed += 1;
                    self.events.push_back(InterestEvent::Farewell(self.ids[p], self.ids[q]));
                } else {
                    i += 1;
                }
            }
        }
        // The grid, over players with room only: a full player is no one's candidate.
        self.order.clear();
        for p in 0..self.ids.len() {
            if self.alive[p] && self.neighbours[p].len() < k {
                let (cx, cz) = self.cell_of(self.positions[p]);
                self.order.push((Self::key(cx, cz), p as u32));
            }
        }
        self.order.sort_unstable();
        self.cells.clear();
        let mut start = 0;
        while start < self.order.len() {
            let key = self.order[start].0;
            let mut end = start + 1;
            while end < self.order.len() && self.order[end].0 == key {
                end += 1;
            }
            self.cells.insert(key, (start as u32, end as u32));
            start = end;
        }
        // Pairing, in slot order (join order, as slots are reused).
        for p in 0..self.ids.len() {
            if !self.alive[p] || self.neighbours[p].len() >= k {
                continue;
            }
            stats.searched += 1;
            let pos = self.positions[p];
            let (cx, cz) = self.cell_of(pos);
            let mut candidates = std::mem::take(&mut self.candidates);
            candidates.clear();
            for dx in -1..=1 {
                for dz in -1..=1 {
                    let key = Self::key(cx.wrapping_add(dx), cz.wrapping_add(dz));
                    let Some(&(a, b)) = self.cells.get(&key) else { continue };
                    for &(_, q) in &self.order[a as usize..b as usize] {
                        let qi = q as usize;
                        if qi == p || self.neighbours[qi].len() >= k {
                            continue;
                        }
                        let d2 = pos.distance_squared(self.positions[qi]);
                        if d2 <= enter2 && !self.neighbours[p].contains(&q) {
                            candidates.push((d2, q));
                        }
                    }
                }
            }
            candidates.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, q) in &candidates {
                if self.neighbours[p].len() >= k {
                    break;
                }
                let qi = q as usize;
                if self.neighbours[qi].len() >= k {
                    continue;
                }
                self.neighbours[p].push(q);
                self.neighbours[qi].push(p as u32);
                self.pairs += 1;
                stats.introduced += 1;
                self.events.push_back(InterestEvent::Introduce(self.ids[p], self.ids[qi]));
            }
            self.candidates = candidates;
        }
        stats.players = self.index.len();
        stats.pairs = self.pairs;
        self.stats = stats;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn id(i: u64) -> NodeId {
        NodeId(i.to_be_bytes())
    }

    fn drain(m: &mut Interest) -> Vec<InterestEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    fn cfg(enter: f32, leave: f32, k: usize) -> InterestConfig {
        InterestConfig { enter_radius: enter, leave_radius: leave, max_neighbours: k }
    }

    #[test]
    fn introduces_within_the_enter_radius_and_dismisses_past_the_leave_radius() {
        let mut m = Interest::new(cfg(10.0, 15.0, 8)).unwrap();
        m.update(id(1), Vec3::ZERO).unwrap();
        m.update(id(2), Vec3::new(12.0, 0.0, 0.0)).unwrap();
        m.tick();
        assert!(drain(&mut m).is_empty(), "12 m is outside the 10 m enter radius");
        m.update(id(2), Vec3::new(9.0, 0.0, 0.0)).unwrap();
        m.tick();
        assert_eq!(drain(&mut m), vec![InterestEvent::Introduce(id(1), id(2))]);
        // In the band between the radii: nothing changes.
        m.update(id(2), Vec3::new(14.0, 0.0, 0.0)).unwrap();
        m.tick();
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.neighbours(id(1)).collect::<Vec<_>>(), vec![id(2)]);
        m.update(id(2), Vec3::new(16.0, 0.0, 0.0)).unwrap();
        m.tick();
        assert_eq!(drain(&mut m), vec![InterestEvent::Farewell(id(1), id(2))]);
        // Back into the band: not introduced again until within the enter radius.
        m.update(id(2), Vec3::new(14.0, 0.0, 0.0)).unwrap();
        m.tick();
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn height_counts_in_the_distance() {
        let mut m = Interest::new(cfg(10.0, 15.0, 8)).unwrap();
        m.update(id(1), Vec3::ZERO).unwrap();
        m.update(id(2), Vec3::new(0.0, 11.0, 0.0)).unwrap();
        m.tick();
        assert!(drain(&mut m).is_empty(), "a player 11 m overhead is out of range");
    }

    #[test]
    fn a_crowd_caps_each_player_at_k_nearest_first() {
        let mut m = Interest::new(cfg(100.0, 120.0, 3)).unwrap();
        // Player 0 at the origin, others on a line at 1, 2, ... 9 m.
        for i in 0..10u64 {
            m.update(id(i), Vec3::new(i as f32, 0.0, 0.0)).unwrap();
        }
        m.tick();
        let n0: Vec<NodeId> = m.neighbours(id(0)).collect();
        assert_eq!(n0, vec![id(1), id(2), id(3)]);
        for i in 0..10 {
            assert!(m.neighbours(id(i)).count() <= 3);
        }
    }

    #[test]
    fn removing_a_player_says_farewell_to_each_neighbour() {
        let mut m = Interest::new(cfg(10.0, 15.0, 8)).unwrap();
        for i in 0..3 {
            m.update(id(i), Vec3::new(i as f32, 0.0, 0.0)).unwrap();
        }
        m.tick();
        drain(&mut m);
        m.remove(id(1));
        let ev = drain(&mut m);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| matches!(e, InterestEvent::Farewell(a, _) if *a == id(1))));
        assert_eq!(m.pairs(), 1);
        // The slot is reused without inheriting anything.
        m.update(id(7), Vec3::new(100.0, 0.0, 100.0)).unwrap();
        assert_eq!(m.neighbours(id(7)).count(), 0);
    }

    #[test]
    fn bad_config_and_positions_are_refused() {
        assert!(Interest::new(cfg(10.0, 5.0, 4)).is_err());
        assert!(Interest::new(cfg(f32::NAN, 5.0, 4)).is_err());
        assert!(Interest::new(cfg(10.0, 10.0, 0)).is_err());
        let mut m = Interest::new(cfg(10.0, 10.0, 4)).unwrap();
        assert_eq!(m.update(id(1), Vec3::new(f32::NAN, 0.0, 0.0)), Err(InterestError::NotFinite));
        assert_eq!(m.update(id(1), Vec3::new(0.0, f32::INFINITY, 0.0)), Err(InterestError::NotFinite));
        assert!(m.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// After any sequence of moves and ticks: caps hold, pairs are symmetric and within
        /// the leave radius, and the pairing is maximal.
        #[test]
        fn invariants_hold_after_every_tick(
            k in 1usize..6,
            steps in proptest::collection::vec(proptest::collection::vec((0u64..40, -60.0f32..60.0, -60.0f32..60.0), 1..40), 1..8),
        ) {
            let c = cfg(10.0, 14.0, k);
            let mut m = Interest::new(c).unwrap();
            for moves in steps {
                for (p, x, z) in moves {
                    m.update(id(p), Vec3::new(x, 0.0, z)).unwrap();
                }
                m.tick();
                let players: Vec<NodeId> = (0..40).map(id).filter(|p| m.position(*p).is_some()).collect();
                for &p in &players {
                    let n: Vec<NodeId> = m.neighbours(p).collect();
                    prop_assert!(n.len() <= k);
                    for q in &n {
                        prop_assert!(m.neighbours(*q).any(|x| x == p), "pair not symmetric");
                        prop_assert!(m.position(p).unwrap().distance(m.position(*q).unwrap()) <= c.leave_radius);
                    }
                }
                for (i, &p) in players.iter().enumerate() {
                    for &q in &players[i + 1..] {
                        let close = m.position(p).unwrap().distance(m.position(q).unwrap()) <= c.enter_radius;
                        let room = m.neighbours(p).count() < k && m.neighbours(q).count() < k;
                        let paired = m.neighbours(p).any(|x| x == q);
                        prop_assert!(!(close && room && !paired), "two players in range with room left unpaired");
                    }
                }
            }
        }
    }
}
