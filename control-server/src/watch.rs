//! The second tier of interest: who watches whom through relay fan-out.
//!
//! Neighbours (see [`crate::interest`]) are the nearest few, served directly at the full rate.
//! Beyond them a player sees everyone within its view radius, through the publishers' relays:
//! each tick, a watcher with room is subscribed to the nearest players within the view radius
//! that it is not already watching and that are not its neighbours, up to `max_watched`. A
//! watch lasts until the two are farther apart than the leave radius (hysteresis, as for
//! neighbours), until they become neighbours (the direct stream supersedes it), or until
//! either goes.
//!
//! Watching is one-way: a watcher receives a publisher's stream, the publisher learns only how
//! many watch it. What it guarantees after every tick:
//! - no watcher watches more than `max_watched` publishers, itself, or a neighbour;
//! - every watch is within the leave radius, and was within the view radius when it began;
//! - a watcher with room watches every non-neighbour within the view radius (maximal), nearest
//!   first; ties go to the lower node id, so the same inputs give the same watches.
//!
//! Sans-IO and clock-free, like [`crate::interest::Interest`]; the grid is on the ground plane
//! with cells one view radius wide.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use glam::Vec3;
use rustc_hash::FxHashMap;
use shoal_protocol::NodeId;

use crate::interest::{InterestError, check_tier};

/// How far watching reaches, and how much of it a watcher gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchConfig {
    /// Players closer than this are watched (default 150 m).
    pub view_radius: f32,
    /// A watch ends past this distance (default 170 m); at least `view_radius`.
    pub leave_radius: f32,
    /// Most publishers one watcher watches (default 256).
    pub max_watched: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { view_radius: 150.0, leave_radius: 170.0, max_watched: 256 }
    }
}

impl WatchConfig {
    /// Checks the config.
    pub fn validate(&self) -> Result<(), InterestError> {
        check_tier(self.view_radius, self.leave_radius, self.max_watched)
    }
}

/// A change to who watches whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// `watcher` should receive `publisher`'s stream.
    Watch {
        /// Who receives.
        watcher: NodeId,
        /// Whose stream.
        publisher: NodeId,
    },
    /// `watcher` no longer receives `publisher`'s stream.
    Unwatch {
        /// Who received.
        watcher: NodeId,
        /// Whose stream.
        publisher: NodeId,
    },
}

/// Every player's position and watches. See the module docs.
#[derive(Debug)]
pub struct Watchers {
    cfg: WatchConfig,
    /// Players by id (the order ticks visit them in), with where they are.
    players: BTreeMap<NodeId, Vec3>,
    /// Per watcher, whom it watches.
    watching: FxHashMap<NodeId, BTreeSet<NodeId>>,
    /// Per publisher, how many watch it.
    audience: FxHashMap<NodeId, usize>,
    events: VecDeque<WatchEvent>,
}

impl Watchers {
    /// No players yet.
    pub fn new(cfg: WatchConfig) -> Result<Watchers, InterestError> {
        cfg.validate()?;
        Ok(Watchers {
            cfg,
            players: BTreeMap::new(),
            watching: FxHashMap::default(),
            audience: FxHashMap::default(),
            events: VecDeque::new(),
        })
    }

    /// The config.
    pub fn config(&self) -> &WatchConfig {
        &self.cfg
    }

    /// Records where `id` is, adding it if new.
    pub fn update(&mut self, id: NodeId, position: Vec3) -> Result<(), InterestError> {
        if !position.is_finite() {
            return Err(InterestError::NotFinite);
        }
        self.players.insert(id, position);
        Ok(())
    }

    /// Forgets `id`: its watchers get an unwatch now; its own watches end without one (it is
    /// gone).
    pub fn remove(&mut self, id: NodeId) {
        if self.players.remove(&id).is_none() {
            return;
        }
        for p in self.watching.remove(&id).unwrap_or_default() {
            self.drop_audience(p);
        }
        let watchers: Vec<NodeId> =
            self.watching.iter().filter(|(_, set)| set.contains(&id)).map(|(&w, _)| w).collect();
        for w in watchers {
            self.unwatch(w, id);
        }
        self.audience.remove(&id);
    }

    /// Whom `watcher` watches.
    pub fn watched_by(&self, watcher: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.watching.get(&watcher).into_iter().flatten().copied()
    }

    /// How many watch `publisher`.
    pub fn audience(&self, publisher: NodeId) -> usize {
        self.audience.get(&publisher).copied().unwrap_or(0)
    }

    /// Watches in all.
    pub fn watches(&self) -> usize {
        self.audience.values().sum()
    }

    /// The next change.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<WatchEvent> {
        self.events.pop_front()
    }

    fn drop_audience(&mut self, publisher: NodeId) {
        if let Some(n) = self.audience.get_mut(&publisher) {
            *n -= 1;
            if *n == 0 {
                self.audience.remove(&publisher);
            }
        }
    }

    fn unwatch(&mut self, watcher: NodeId, publisher: NodeId) {
        if self.watching.get_mut(&watcher).is_some_and(|s| s.remove(&publisher)) {
            self.drop_audience(publisher);
            self.events.push_back(WatchEvent::Unwatch { watcher, publisher });
        }
    }

    fn cell(&self, p: Vec3) -> (i32, i32) {
        let c = self.cfg.view_radius;
        ((p.x / c).floor() as i32, (p.z / c).floor() as i32)
    }

    /// Ends watches that drifted apart or became neighbours (`neighbours(a, b)`), then gives
    /// every watcher with room its nearest unwatched players within the view radius.
    pub fn tick(&mut self, neighbours: impl Fn(NodeId, NodeId) -> bool) {
        let leave2 = self.cfg.leave_radius * self.cfg.leave_radius;
        let view2 = self.cfg.view_radius * self.cfg.view_radius;
        let ids: Vec<NodeId> = self.players.keys().copied().collect();
        for &w in &ids {
            let pos = self.players[&w];
            let ended: Vec<NodeId> = self
                .watched_by(w)
                .filter(|p| self.players.get(p).is_none_or(|q| q.distance_squared(pos) > leave2) || neighbours(w, *p))
                .collect();
            for p in ended {
                self.unwatch(w, p);
            }
        }
        let mut grid: FxHashMap<(i32, i32), Vec<NodeId>> = FxHashMap::default();
        for (&id, &p) in &self.players {
            grid.entry(self.cell(p)).or_default().push(id);
        }
        let mut candidates: Vec<(f32, NodeId)> = Vec::new();
        for &w in &ids {
            let have = self.watching.get(&w).map_or(0, BTreeSet::len);
            if have >= self.cfg.max_watched {
                continue;
            }
            let pos = self.players[&w];
            let (cx, cz) = self.cell(pos);
            candidates.clear();
            let watched = self.watching.get(&w);
            for dx in -1..=1 {
                for dz in -1..=1 {
                    for &p in grid.get(&(cx + dx, cz + dz)).into_iter().flatten() {
                        let d2 = self.players[&p].distance_squared(pos);
                        if p != w && d2 <= view2 && !watched.is_some_and(|s| s.contains(&p)) && !neighbours(w, p) {
                            candidates.push((d2, p));
                        }
                    }
                }
            }
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            candidates.truncate(self.cfg.max_watched - have);
            let set = self.watching.entry(w).or_default();
            for &(_, p) in &candidates {
                set.insert(p);
                *self.audience.entry(p).or_default() += 1;
                self.events.push_back(WatchEvent::Watch { watcher: w, publisher: p });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn id(i: u16) -> NodeId {
        let mut b = [0; 8];
        b[..2].copy_from_slice(&i.to_be_bytes());
        NodeId(b)
    }

    fn at(x: f32, z: f32) -> Vec3 {
        Vec3::new(x, 0.0, z)
    }

    fn events(w: &mut Watchers) -> Vec<WatchEvent> {
        std::iter::from_fn(|| w.poll_event()).collect()
    }

    #[test]
    fn a_watcher_sees_the_nearest_beyond_its_neighbours_up_to_its_cap() {
        let cfg = WatchConfig { view_radius: 100.0, leave_radius: 120.0, max_watched: 2 };
        let mut w = Watchers::new(cfg).unwrap();
        w.update(id(0), at(0.0, 0.0)).unwrap();
        for (i, x) in [(1, 10.0), (2, 50.0), (3, 60.0), (4, 90.0), (5, 200.0)] {
            w.update(id(i), at(x, 0.0)).unwrap();
        }
        // Player 1 is player 0's neighbour: it is served directly, not watched.
        let nb = |a: NodeId, b: NodeId| (a == id(0) && b == id(1)) || (a == id(1) && b == id(0));
        w.tick(nb);
        assert_eq!(w.watched_by(id(0)).collect::<Vec<_>>(), vec![id(2), id(3)]);
        // Player 5 is 110 m from the nearest (player 4): out of everyone's view.
        assert_eq!(w.audience(id(5)), 0);
        assert_eq!(w.watched_by(id(5)).count(), 0);
        // Player 4 watches players 3 and 2 (its nearest), not player 0 (90 m, third).
        assert_eq!(w.watched_by(id(4)).collect::<Vec<_>>(), vec![id(2), id(3)]);
        // Player 2 walks 30 m off: still within the leave radius, kept.
        w.update(id(2), at(115.0, 0.0)).unwrap();
        events(&mut w);
        w.tick(nb);
        assert!(!events(&mut w).contains(&WatchEvent::Unwatch { watcher: id(0), publisher: id(2) }));
        // Past it: unwatched, and player 4 (90 m) takes the freed place.
        w.update(id(2), at(130.0, 0.0)).unwrap();
        w.tick(nb);
        let ev = events(&mut w);
        assert!(ev.contains(&WatchEvent::Unwatch { watcher: id(0), publisher: id(2) }), "{ev:?}");
        assert!(ev.contains(&WatchEvent::Watch { watcher: id(0), publisher: id(4) }), "{ev:?}");
        // Player 3 becomes a neighbour: the direct stream supersedes the watch.
        let nb2 = |a: NodeId, b: NodeId| nb(a, b) || (a == id(0) && b == id(3)) || (a == id(3) && b == id(0));
        w.tick(nb2);
        assert!(!w.watched_by(id(0)).any(|p| p == id(3)));
        // Player 4 signs out: its watchers are told.
        events(&mut w);
        w.remove(id(4));
        assert!(events(&mut w).contains(&WatchEvent::Unwatch { watcher: id(0), publisher: id(4) }));
        assert_eq!(w.audience(id(4)), 0);
    }

    proptest! {
        /// The rules in the module docs hold after every tick of random walks, and the same
        /// walks give the same events.
        #[test]
        fn the_rules_hold_after_every_tick(seed in any::<u64>(), n in 2usize..40) {
            let cfg = WatchConfig { view_radius: 60.0, leave_radius: 75.0, max_watched: 5 };
            let run = || {
                let mut rng = seed;
                let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as f32 / (1u64 << 31) as f32 };
                let mut w = Watchers::new(cfg).unwrap();
                let mut pos: Vec<Vec3> = (0..n).map(|_| at(next() * 300.0, next() * 300.0)).collect();
                let mut log = Vec::new();
                // Neighbours: each player with the next one in id order, when within 20 m.
                for _ in 0..12 {
                    for (i, p) in pos.iter_mut().enumerate() {
                        *p += at(next() * 40.0 - 20.0, next() * 40.0 - 20.0);
                        w.update(id(i as u16), *p).unwrap();
                    }
                    let near = pos.clone();
                    let nb = move |a: NodeId, b: NodeId| {
                        let (a, b) = (usize::from(u16::from_be_bytes([a.0[0], a.0[1]])), usize::from(u16::from_be_bytes([b.0[0], b.0[1]])));
                        a.abs_diff(b) == 1 && near[a].distance(near[b]) < 20.0
                    };
                    w.tick(&nb);
                    log.extend(std::iter::from_fn(|| w.poll_event()));
                    for a in 0..n {
                        let watched: Vec<NodeId> = w.watched_by(id(a as u16)).collect();
                        assert!(watched.len() <= cfg.max_watched);
                        for &p in &watched {
                            let b = usize::from(u16::from_be_bytes([p.0[0], p.0[1]]));
                            assert_ne!(a, b);
                            assert!(pos[a].distance(pos[b]) <= cfg.leave_radius + 1e-3);
                            assert!(!nb(id(a as u16), p));
                        }
                        // Maximal: with room, every non-neighbour in view is watched.
                        if watched.len() < cfg.max_watched {
                            for b in (0..n).filter(|&b| b != a) {
                                if pos[a].distance(pos[b]) <= cfg.view_radius && !nb(id(a as u16), id(b as u16)) {
                                    assert!(watched.contains(&id(b as u16)), "{a} does not watch {b}");
                                }
                            }
                        }
                    }
                    let total: usize = (0..n).map(|a| w.watched_by(id(a as u16)).count()).sum();
                    assert_eq!(total, w.watches());
                }
                log
            };
            prop_assert_eq!(run(), run());
        }
    }
}
