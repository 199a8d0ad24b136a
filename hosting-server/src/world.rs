//! The authoritative world: every NPC and object, moved a tick at a time.
//!
//! Sans-IO and deterministic: [`World::tick`] takes the seconds since the last tick and where
//! the players are, and the world's own seeded RNG does the rest, so the same content, seed and
//! inputs give the same world. What happened (an NPC died or spawned again, an object changed)
//! comes out of [`World::poll_event`]; drain it after every tick and action.

use std::collections::VecDeque;

use glam::Vec2;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use shoal_protocol::NodeId;

use crate::behaviour::{self, Behaviour, Factory, View};
use crate::content::{Content, ContentError};
use crate::grid::Grid;

/// An entity's id in this world; never reused while the world runs.
pub use shoal_protocol::world::EntityId;

/// What an entity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    /// An NPC of this kind (index into [`Content::npc_kinds`]), from this spawn (index into
    /// [`Content::spawns`]).
    Npc {
        /// Its kind.
        kind: u16,
        /// Its spawn.
        spawn: u32,
    },
    /// An object or item of this kind (index into [`Content::object_kinds`]).
    Object {
        /// Its kind.
        kind: u16,
    },
}

/// One entity as the world holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// Its id.
    pub id: EntityId,
    /// What it is.
    pub kind: EntityKind,
    /// Where it is (x, z).
    pub at: Vec2,
    /// Where it faces, radians about the vertical axis (0 is +x).
    pub heading: f32,
    /// An object's state (index into its kind's states); an NPC's health.
    pub state: u16,
    /// Whether it is in the world (a dead NPC is not, until it spawns again).
    pub present: bool,
}

/// Something that happened in the world: the protocol's own event, as clients are told it.
pub use shoal_protocol::world::WorldEventInfo as WorldEvent;

/// Why the world refused an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorldError {
    /// No entity has this id.
    #[error("no entity {0:?}")]
    NoEntity(EntityId),
    /// The entity is not of the kind the action needs (attacking an object, opening an NPC).
    #[error("entity {0:?} cannot be used so")]
    WrongKind(EntityId),
    /// The NPC is dead, or the item taken.
    #[error("entity {0:?} is not in the world")]
    Absent(EntityId),
}

/// An NPC's own state beside its entity: NPCs are the world's first entities, in order, so the
/// `i`-th is entity `i`.
#[derive(Debug)]
struct Npc {
    mind: Box<dyn Behaviour>,
    /// When a dead NPC spawns again, in seconds of world time.
    respawn_at: f64,
}

/// The world. See the module docs.
#[derive(Debug)]
pub struct World {
    content: Content,
    entities: Vec<Entity>,
    npcs: Vec<Npc>,
    rng: Xoshiro256PlusPlus,
    /// World time, seconds.
    time: f64,
    /// Players by where they are, for what NPCs see.
    grid: Grid<()>,
    near: Vec<Vec2>,
    events: VecDeque<WorldEvent>,
    /// Items taken, and when each appears again (world time, seconds).
    taken: Vec<(f64, EntityId)>,
    /// Each entity's zone (index into the content's zones): an NPC's spawn's, an object's
    /// that holds it.
    zone_of: Vec<u16>,
    /// The one zone this world moves, when it is one of several servers' parts of the world.
    serving: Option<usize>,
}

impl World {
    /// The world `content` describes, with the built-in behaviours and `extra` (a studio's own,
    /// by name), every NPC spawned at a random place in its spawn circle (`seed` decides).
    ///
    /// # Errors
    /// When the content names a behaviour neither built in nor in `extra`.
    pub fn new(content: Content, seed: u64, extra: &[(&str, Factory)]) -> Result<World, ContentError> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut entities = Vec::with_capacity(content.entities());
        let mut npcs = Vec::new();
        let factory =
            |name: &str| behaviour::built_in(name).or_else(|| extra.iter().find(|e| e.0 == name).map(|e| e.1));
        for (s, spawn) in content.spawns.iter().enumerate() {
            let kind = &content.npc_kinds[spawn.kind];
            let Some(make) = factory(&kind.behaviour) else {
                let reason = format!("no behaviour {:?} registered", kind.behaviour);
                return Err(ContentError { line: 0, field: format!("npc_kind {:?}", kind.name), reason });
            };
            for _ in 0..spawn.count {
                let at = spawn_point(&mut rng, spawn.around, spawn.radius);
                let id = EntityId(entities.len() as u32);
                npcs.push(Npc { mind: make(), respawn_at: 0.0 });
                entities.push(Entity {
                    id,
                    kind: EntityKind::Npc { kind: spawn.kind as u16, spawn: s as u32 },
                    at,
                    heading: rng.random_range(0.0..std::f32::consts::TAU),
                    state: kind.health,
                    present: true,
                });
            }
        }
        for o in &content.objects {
            let id = EntityId(entities.len() as u32);
            let kind = EntityKind::Object { kind: o.kind as u16 };
            entities.push(Entity { id, kind, at: Vec2::from(o.at), heading: 0.0, state: 0, present: true });
        }
        let cell = content.npc_kinds.iter().map(|k| k.range).fold(16.0, f32::max);
        let zone_of = entities
            .iter()
            .map(|e| match e.kind {
                EntityKind::Npc { spawn, .. } => content.spawns[spawn as usize].zone as u16,
                EntityKind::Object { .. } => {
                    content.zones.iter().position(|z| z.contains(e.at.to_array())).unwrap_or(0) as u16
                }
            })
            .collect();
        Ok(World {
            content,
            entities,
            npcs,
            rng,
            time: 0.0,
            grid: Grid::new(cell),
            near: Vec::new(),
            events: VecDeque::new(),
            taken: Vec::new(),
            zone_of,
            serving: None,
        })
    }

    /// Moves only the entities of `zone` (index into the content's zones) from now on: the
    /// world of one of several hosting servers that each serve a zone. Every server loads the
    /// same content, so entity ids agree between them.
    pub fn serve_only(&mut self, zone: usize) {
        self.serving = Some(zone);
    }

    /// The zone `id` belongs to.
    pub fn zone_of(&self, id: EntityId) -> Option<usize> {
        self.zone_of.get(id.0 as usize).map(|&z| usize::from(z))
    }

    /// Whether this world is the authority for `id`: it serves every zone, or `id`'s.
    pub fn serves(&self, id: EntityId) -> bool {
        self.serving.is_none_or(|z| self.zone_of(id) == Some(z))
    }

    /// The names a content file may give behaviours, with `extra` registered.
    pub fn behaviour_names<'a>(extra: &[(&'a str, Factory)]) -> Vec<&'a str> {
        behaviour::BUILT_IN.iter().copied().chain(extra.iter().map(|e| e.0)).collect()
    }

    /// The content it was built from.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Every entity, present or not, in id order.
    pub fn entities(&self) -> &[Entity] {
        &self.entities
    }

    /// One entity.
    pub fn entity(&self, id: EntityId) -> Option<&Entity> {
        self.entities.get(id.0 as usize)
    }

    /// World time, seconds since it was built.
    pub fn time(&self) -> f64 {
        self.time
    }

    /// Moves the world on by `dt` seconds: every present NPC steers by its behaviour, within
    /// its kind's speed and its zone, seeing the `players` within its kind's range; dead NPCs
    /// whose time has come spawn again, and so do items taken.
    pub fn tick(&mut self, dt: f32, players: &[(NodeId, Vec2)]) {
        self.time += f64::from(dt);
        let (time, entities) = (self.time, &mut self.entities);
        self.taken.retain(|&(at, id)| {
            let back = at <= time;
            if back && let Some(e) = entities.get_mut(id.0 as usize) {
                e.present = true;
            }
            !back
        });
        self.grid.clear();
        for &(_, p) in players {
            self.grid.insert(p, ());
        }
        let content = &self.content;
        for (npc, e) in self.npcs.iter_mut().zip(&mut self.entities) {
            let EntityKind::Npc { kind, spawn } = e.kind else { continue };
            if self.serving.is_some_and(|z| z != content.spawns[spawn as usize].zone) {
                continue;
            }
            let (kind, spawn) = (&content.npc_kinds[kind as usize], &content.spawns[spawn as usize]);
            if !e.present {
                if self.time >= npc.respawn_at {
                    e.at = spawn_point(&mut self.rng, spawn.around, spawn.radius);
                    e.state = kind.health;
                    e.present = true;
                    self.events.push_back(WorldEvent::Respawned { npc: e.id, at: e.at.to_array() });
                }
                continue;
            }
            self.near.clear();
            self.grid.within(e.at, kind.range, |p, ()| self.near.push(p));
            let at = e.at;
            self.near.sort_by(|a, b| a.distance_squared(at).total_cmp(&b.distance_squared(at)));
            let zone = &content.zones[spawn.zone];
            let view = View { at: e.at, kind, spawn, zone, players: &self.near, dt };
            let v = npc.mind.steer(&view, &mut self.rng).clamp_length_max(kind.speed);
            if v.length_squared() > 1e-6 {
                e.heading = v.y.atan2(v.x);
            }
            let to = e.at + v * dt;
            e.at = to.clamp(Vec2::from(zone.min), Vec2::from(zone.max));
        }
    }

    /// `by` deals `damage` to an NPC; it dies at no health left, and spawns again after its
    /// kind's respawn time.
    ///
    /// # Errors
    /// No such entity, not an NPC, or dead already.
    pub fn attack(&mut self, npc: EntityId, damage: u16, by: NodeId) -> Result<(), WorldError> {
        let e = self.entities.get_mut(npc.0 as usize).ok_or(WorldError::NoEntity(npc))?;
        let EntityKind::Npc { kind, .. } = e.kind else { return Err(WorldError::WrongKind(npc)) };
        if !e.present {
            return Err(WorldError::Absent(npc));
        }
        e.state = e.state.saturating_sub(damage);
        if e.state == 0 {
            e.present = false;
            let respawn = f64::from(self.content.npc_kinds[kind as usize].respawn_secs);
            if let Some(n) = self.npcs.get_mut(npc.0 as usize) {
                n.respawn_at = self.time + respawn;
            }
            self.events.push_back(WorldEvent::Died { npc, by });
        }
        Ok(())
    }

    /// `by` uses an object: it moves to its kind's next state (after the last, the first).
    ///
    /// # Errors
    /// No such entity, not an object (NPCs are attacked, items picked up), or not in the world.
    pub fn interact(&mut self, object: EntityId, by: NodeId) -> Result<u16, WorldError> {
        let e = self.entities.get_mut(object.0 as usize).ok_or(WorldError::NoEntity(object))?;
        let EntityKind::Object { kind } = e.kind else { return Err(WorldError::WrongKind(object)) };
        if self.content.object_kinds[kind as usize].respawn_secs.is_some() {
            return Err(WorldError::WrongKind(object));
        }
        if !e.present {
            return Err(WorldError::Absent(object));
        }
        let states = self.content.object_kinds[kind as usize].states.len() as u16;
        e.state = (e.state + 1) % states.max(1);
        self.events.push_back(WorldEvent::ObjectChanged { object, state: e.state, by });
        Ok(e.state)
    }

    /// `by` picks up an item: it leaves the world until its kind's respawn time has passed.
    ///
    /// # Errors
    /// No such entity, not an item, or taken already.
    pub fn pick_up(&mut self, item: EntityId, by: NodeId) -> Result<(), WorldError> {
        let e = self.entities.get_mut(item.0 as usize).ok_or(WorldError::NoEntity(item))?;
        let EntityKind::Object { kind } = e.kind else { return Err(WorldError::WrongKind(item)) };
        let Some(secs) = self.content.object_kinds[kind as usize].respawn_secs else {
            return Err(WorldError::WrongKind(item));
        };
        if !e.present {
            return Err(WorldError::Absent(item));
        }
        e.present = false;
        self.taken.push((self.time + f64::from(secs), item));
        self.events.push_back(WorldEvent::PickedUp { item, by });
        Ok(())
    }

    /// The next thing that happened.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<WorldEvent> {
        self.events.pop_front()
    }
}

fn spawn_point(rng: &mut Xoshiro256PlusPlus, around: [f32; 2], radius: f32) -> Vec2 {
    let angle = rng.random_range(0.0..std::f32::consts::TAU);
    Vec2::from(around) + Vec2::from_angle(angle) * radius * rng.random::<f32>().sqrt()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const ZONE: &str = r#"
[[zone]]
name = "field"
min = [0.0, 0.0]
max = [200.0, 200.0]
"#;

    fn world_of(extra_toml: &str, seed: u64) -> World {
        let text = format!("{ZONE}{extra_toml}");
        World::new(Content::parse(&text, behaviour::BUILT_IN).unwrap(), seed, &[]).unwrap()
    }

    fn npc(kind: &str, behaviour: &str, range: f32, spawn: &str) -> String {
        format!(
            "[[npc_kind]]\nname = \"{kind}\"\nbehaviour = \"{behaviour}\"\nspeed = 4.0\nrange = {range}\nhealth = 10\nrespawn_secs = 5\n\n[[spawn]]\nkind = \"{kind}\"\nzone = \"field\"\n{spawn}\n"
        )
    }

    const P: NodeId = NodeId([1; 8]);

    fn run(w: &mut World, secs: f32, players: &[(NodeId, Vec2)]) {
        for _ in 0..(secs * 20.0) as usize {
            w.tick(0.05, players);
        }
    }

    #[test]
    fn the_same_seed_and_inputs_give_the_same_world() {
        let spec = npc("sheep", "wander", 0.0, "count = 30\naround = [100.0, 100.0]\nradius = 50.0");
        let (mut a, mut b, mut c) = (world_of(&spec, 7), world_of(&spec, 7), world_of(&spec, 8));
        let players = [(P, Vec2::new(90.0, 90.0))];
        for w in [&mut a, &mut b, &mut c] {
            run(w, 10.0, &players);
        }
        assert_eq!(a.entities(), b.entities());
        assert_ne!(a.entities(), c.entities());
    }

    #[test]
    fn wanderers_walk_about_within_their_circle_and_zone() {
        let spec = npc("sheep", "wander", 0.0, "count = 20\naround = [20.0, 20.0]\nradius = 30.0");
        let mut w = world_of(&spec, 1);
        let start: Vec<Vec2> = w.entities().iter().map(|e| e.at).collect();
        run(&mut w, 30.0, &[]);
        let moved = w.entities().iter().zip(&start).filter(|(e, s)| e.at.distance(**s) > 1.0).count();
        assert!(moved >= 15, "{moved} of 20 moved");
        for e in w.entities() {
            assert!(e.at.distance(Vec2::new(20.0, 20.0)) <= 30.5, "{:?}", e.at);
            assert!(e.at.min_element() >= 0.0, "left the zone: {:?}", e.at);
        }
    }

    #[test]
    fn a_patrol_walks_its_route_in_order() {
        let route =
            "count = 1\naround = [10.0, 10.0]\nradius = 0.0\nroute = [[10.0, 10.0], [50.0, 10.0], [50.0, 50.0]]";
        let mut w = world_of(&npc("guard", "patrol", 0.0, route), 1);
        let mut visited = Vec::new();
        for _ in 0..(60.0 * 20.0) as usize {
            w.tick(0.05, &[]);
            let at = w.entities()[0].at;
            for (i, p) in [[10.0, 10.0], [50.0, 10.0], [50.0, 50.0]].into_iter().enumerate() {
                if at.distance(Vec2::from(p)) < 0.6 && visited.last() != Some(&i) {
                    visited.push(i);
                }
            }
        }
        assert!(visited.len() >= 6, "{visited:?}");
        for pair in visited.windows(2) {
            assert_eq!(pair[1], (pair[0] + 1) % 3, "{visited:?}");
        }
    }

    #[test]
    fn followers_come_to_a_player_in_range_and_fleers_run_from_one() {
        let spec = npc("wolf", "follow", 30.0, "count = 1\naround = [100.0, 100.0]\nradius = 0.0")
            + &npc("deer", "flee", 30.0, "count = 1\naround = [100.0, 100.0]\nradius = 0.0");
        let mut w = world_of(&spec, 1);
        let player = Vec2::new(120.0, 100.0);
        run(&mut w, 10.0, &[(P, player)]);
        let (wolf, deer) = (w.entities()[0].at, w.entities()[1].at);
        assert!(wolf.distance(player) <= 3.0, "the wolf is {} m off", wolf.distance(player));
        // The deer runs until the player is out of its range (it started 20 m off).
        assert!(deer.distance(player) >= 29.0, "the deer is {} m off", deer.distance(player));
        // Beyond its range, a follower does not chase.
        let mut w = world_of(&spec, 1);
        let far = Vec2::new(180.0, 180.0);
        run(&mut w, 5.0, &[(P, far)]);
        assert!(w.entities()[0].at.distance(far) > 80.0);
    }

    #[test]
    fn an_npc_killed_dies_and_spawns_again_and_objects_change_state() {
        let spec = npc("sheep", "wander", 0.0, "count = 1\naround = [100.0, 100.0]\nradius = 10.0")
            + "[[object_kind]]\nname = \"chest\"\nstates = [\"closed\", \"open\", \"empty\"]\n\n[[object]]\nkind = \"chest\"\nat = [5.0, 5.0]\n";
        let mut w = world_of(&spec, 1);
        let (sheep, chest) = (EntityId(0), EntityId(1));
        w.attack(sheep, 4, P).unwrap();
        assert_eq!(w.entity(sheep).unwrap().state, 6);
        assert_eq!(w.poll_event(), None);
        w.attack(sheep, 40, P).unwrap();
        assert_eq!(w.poll_event(), Some(WorldEvent::Died { npc: sheep, by: P }));
        assert!(!w.entity(sheep).unwrap().present);
        assert_eq!(w.attack(sheep, 1, P), Err(WorldError::Absent(sheep)));
        assert_eq!(w.attack(chest, 1, P), Err(WorldError::WrongKind(chest)));
        assert_eq!(w.attack(EntityId(9), 1, P), Err(WorldError::NoEntity(EntityId(9))));
        assert_eq!(w.interact(sheep, P), Err(WorldError::WrongKind(sheep)));
        run(&mut w, 4.9, &[]);
        assert!(!w.entity(sheep).unwrap().present, "back before its respawn time");
        run(&mut w, 0.2, &[]);
        let e = w.entity(sheep).unwrap().clone();
        assert!(e.present && e.state == 10);
        let Some(WorldEvent::Respawned { npc, at }) = w.poll_event() else { panic!("no respawn") };
        assert_eq!(npc, sheep);
        assert!(Vec2::from(at).distance(Vec2::new(100.0, 100.0)) <= 10.0, "spawned again at {at:?}");
        let states: Vec<u16> = (0..4).map(|_| w.interact(chest, P).unwrap()).collect();
        assert_eq!(states, vec![1, 2, 0, 1]);
        assert_eq!(w.poll_event(), Some(WorldEvent::ObjectChanged { object: chest, state: 1, by: P }));
    }

    #[test]
    fn an_item_picked_up_is_gone_until_its_time_and_only_items_are_picked_up() {
        let spec = "[[object_kind]]\nname = \"herb\"\nstates = [\"ripe\"]\nrespawn_secs = 3\n\n\
                    [[object_kind]]\nname = \"gate\"\nstates = [\"closed\", \"open\"]\n\n\
                    [[object]]\nkind = \"herb\"\nat = [5.0, 5.0]\n\n[[object]]\nkind = \"gate\"\nat = [9.0, 9.0]\n";
        let mut w = world_of(spec, 1);
        let (herb, gate) = (EntityId(0), EntityId(1));
        assert_eq!(w.pick_up(gate, P), Err(WorldError::WrongKind(gate)));
        assert_eq!(w.interact(herb, P), Err(WorldError::WrongKind(herb)));
        w.pick_up(herb, P).unwrap();
        assert_eq!(w.poll_event(), Some(WorldEvent::PickedUp { item: herb, by: P }));
        assert_eq!(w.pick_up(herb, P), Err(WorldError::Absent(herb)));
        run(&mut w, 2.9, &[]);
        assert!(!w.entity(herb).unwrap().present);
        run(&mut w, 0.2, &[]);
        assert!(w.entity(herb).unwrap().present);
        w.pick_up(herb, P).unwrap();
    }

    /// A behaviour of the studio's own, by name: circles its spawn point.
    #[derive(Debug, Default)]
    struct Circle;

    impl Behaviour for Circle {
        fn steer(&mut self, v: &View<'_>, _rng: &mut Xoshiro256PlusPlus) -> Vec2 {
            (v.at - Vec2::from(v.spawn.around)).perp().normalize_or(Vec2::X) * v.kind.speed
        }
    }

    #[test]
    fn a_studio_registers_its_own_behaviour_by_name() {
        let extra: &[(&str, Factory)] = &[("circle", || Box::new(Circle))];
        let text = format!("{ZONE}{}", npc("moth", "circle", 0.0, "count = 3\naround = [100.0, 100.0]\nradius = 5.0"));
        let names = World::behaviour_names(extra);
        assert!(Content::parse(&text, behaviour::BUILT_IN).is_err(), "unknown without registering");
        let mut w = World::new(Content::parse(&text, &names).unwrap(), 1, extra).unwrap();
        run(&mut w, 5.0, &[]);
        assert!(w.entities().iter().all(|e| e.at.distance(Vec2::new(100.0, 100.0)) < 40.0));
        // Content that names it, in a world that does not have it, is refused.
        assert!(World::new(Content::parse(&text, &names).unwrap(), 1, &[]).is_err());
    }
}
