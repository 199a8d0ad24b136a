//! The hosting server's core: its clients (hello, positions, actions, acknowledgements) and
//! the tick that moves the world and sends each client what it sees.
//!
//! Sans-IO, in the house style of the control server's core: the driver hands it what
//! arrived ([`Host::connected`], [`Host::on_message`], [`Host::on_datagram`],
//! [`Host::disconnected`]) and the time, calls [`Host::tick`] at the tick rate, and sends
//! what [`Host::poll_output`] gives. The same inputs give the same outputs.
//!
//! **Who may connect.** A client's first message is a hello with its session ticket, checked
//! offline against the control key (kind, role, expiry, signature), and a key proof for
//! [`WORLD_ACCOUNT`] bound to this server's certificate, so a proof made for one hosting
//! server is useless at another. Anything else first, a second hello, a bad ticket or proof:
//! a typed [`HostRefusal`], counted, and the connection closed.
//!
//! **Positions** come from the client's own reports, a few a second, checked as the control
//! server checks reports: a move faster than [`HostConfig::max_speed`] allows is not taken and
//! is a strike; strikes fade with time, and too many close the client. A client that leaves
//! the zone and its overlap band is closed: the next server serves it.
//!
//! **Actions** are checked against the world: the player must have a position, be within
//! [`HostConfig::reach`] of the entity, and within its action rate; the world then checks the
//! entity (exists, right kind, present). The answer is `Done` or a typed refusal, counted by
//! reason; what the action changed reaches everyone who sees it as a world event.
//!
//! **Each tick** the world moves; each client's view is updated (spawns and despawns go on
//! the stream, with hysteresis), the priority accumulator chooses what fits its byte budget,
//! and the snapshot writer delta-encodes that against what the client acknowledged, split
//! across datagrams in priority order when it does not fit one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use glam::Vec2;
use rustc_hash::FxHashMap;
use shoal_protocol::control::{KeyProof, SIGN_IN_CONTEXT};
use shoal_protocol::world::{
    Acks, Action, ActionRefusal, ClientToHost, DATAGRAM_SNAPSHOT, HostRefusal, HostToClient, KindClass, KindInfo,
    MAX_SPAWNS, SNAPSHOT_HEADER, WORLD_ACCOUNT, ZoneInfo,
};
use shoal_protocol::{NodeId, PublicKey, Roles, SignedTicket, TicketError, TicketKind, UnixTime};

use crate::interest::{ClientInterest, EntityGrid, InterestConfig};
use crate::snapshot::{Quantised, SnapshotWriter, quantise};
use crate::world::{Entity, EntityId, EntityKind, World, WorldError};

/// Most entity ids one resend request may name.
pub const MAX_RESEND: usize = shoal_protocol::world::MAX_RESEND_REQUEST;

/// How the core behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    /// Ticks a second (default 20).
    pub tick_hz: u16,
    /// The zone served (index into the content's zones).
    pub zone: usize,
    /// How far past the zone's border clients are still served, m (default 135, the
    /// interest's leave radius: a client near the border keeps seeing this zone's entities
    /// until they would leave its view anyway).
    pub overlap: f32,
    /// What each client sees and is sent.
    pub interest: InterestConfig,
    /// How near an entity a player must be to act on it, m (default 6).
    pub reach: f32,
    /// Actions a second a player may make on average (default 4)…
    pub actions_per_sec: f32,
    /// …and at once (default 8).
    pub action_burst: f32,
    /// Damage one attack deals (default 10).
    pub attack_damage: u16,
    /// Fastest a player may move, m/s (default 12); reports beyond it are strikes.
    pub max_speed: f32,
    /// Strikes (fading one a second) past which a client is closed (default 10).
    pub max_strikes: f32,
    /// Most clients at once (default 2,000).
    pub max_clients: usize,
    /// Largest datagram payload to send, bytes (the driver lowers it to what the path takes).
    pub max_datagram: usize,
    /// Clock skew allowed on a key proof.
    pub proof_skew: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            tick_hz: 20,
            zone: 0,
            overlap: 135.0,
            interest: InterestConfig::default(),
            reach: 6.0,
            actions_per_sec: 4.0,
            action_burst: 8.0,
            attack_damage: 10,
            max_speed: 12.0,
            max_strikes: 10.0,
            max_clients: 2_000,
            max_datagram: 1_150,
            proof_skew: Duration::from_secs(30),
        }
    }
}

/// A connection, as the driver numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a message on the client's stream.
    Message(ClientId, HostToClient),
    /// Send a datagram.
    Datagram(ClientId, Vec<u8>),
    /// Close the connection (after the messages before it are sent).
    Close(ClientId),
}

/// What happened, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Hellos accepted.
    pub hellos: u64,
    /// Clients refused or closed, by reason (in [`HostRefusal`] order).
    pub refused: [u64; 10],
    /// Actions done.
    pub actions: u64,
    /// Actions refused, by reason (in [`ActionRefusal`] order).
    pub actions_refused: [u64; 6],
    /// Position reports not taken: faster than a player moves, or not finite.
    pub implausible: u64,
    /// Datagrams that were not acknowledgements.
    pub bad_datagrams: u64,
    /// Entities a client asked to have sent whole again.
    pub resends: u64,
    /// Snapshot datagrams sent, and their bytes.
    pub snapshots: u64,
    /// See `snapshots`.
    pub snapshot_bytes: u64,
    /// Entity states sent.
    pub entries: u64,
    /// World events sent to clients.
    pub events: u64,
}

fn refusal_index(r: HostRefusal) -> usize {
    match r {
        HostRefusal::BadTicket => 0,
        HostRefusal::ExpiredTicket => 1,
        HostRefusal::WrongRole => 2,
        HostRefusal::BadProof => 3,
        HostRefusal::NoHello => 4,
        HostRefusal::Malformed => 5,
        HostRefusal::Implausible => 6,
        HostRefusal::OutsideZone => 7,
        HostRefusal::Full => 8,
        HostRefusal::Replaced => 9,
    }
}

fn action_refusal_index(r: ActionRefusal) -> usize {
    match r {
        ActionRefusal::NoEntity => 0,
        ActionRefusal::WrongKind => 1,
        ActionRefusal::Absent => 2,
        ActionRefusal::OutOfRange => 3,
        ActionRefusal::RateLimited => 4,
        ActionRefusal::NoPosition => 5,
    }
}

/// Names of the refusal reasons, in counter order, for metrics.
pub const REFUSAL_NAMES: [&str; 10] = [
    "bad_ticket",
    "expired_ticket",
    "wrong_role",
    "bad_proof",
    "no_hello",
    "malformed",
    "implausible",
    "outside_zone",
    "full",
    "replaced",
];
/// Names of the action refusal reasons, in counter order, for metrics.
pub const ACTION_REFUSAL_NAMES: [&str; 6] =
    ["no_entity", "wrong_kind", "absent", "out_of_range", "rate_limited", "no_position"];

/// A token bucket. (Eight lines do not need a crate.)
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: f32, burst: f32) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f32();
        self.at = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

/// A client past its hello.
#[derive(Debug)]
struct Player {
    node: NodeId,
    /// Where it last said it was (x, z), and when.
    at: Option<(Vec2, Instant)>,
    strikes: f32,
    strikes_at: Instant,
    actions: Bucket,
    interest: ClientInterest,
    writer: SnapshotWriter,
}

#[derive(Debug)]
enum Client {
    AwaitingHello,
    Playing(Box<Player>),
}

/// The core. See the module docs.
#[derive(Debug)]
pub struct Host {
    cfg: HostConfig,
    world: World,
    control: PublicKey,
    cert: [u8; 32],
    zone: ZoneInfo,
    kinds: Vec<KindInfo>,
    clients: FxHashMap<ClientId, Client>,
    by_node: FxHashMap<NodeId, ClientId>,
    grid: EntityGrid,
    out: VecDeque<Output>,
    counters: HostCounters,
    /// Scratch, kept for its storage.
    states: Vec<(EntityId, Quantised)>,
    buf: Vec<u8>,
    players: Vec<(NodeId, Vec2)>,
    /// Ticks so far: snapshots carry it, for clients to place them on one clock.
    ticks: u32,
}

impl Host {
    /// A core serving `world`'s zone `cfg.zone`, trusting tickets signed by `control`, and
    /// presenting the certificate whose SHA-256 is `cert` (what key proofs are bound to).
    pub fn new(mut world: World, cfg: HostConfig, control: PublicKey, cert: [u8; 32]) -> Host {
        let content = world.content();
        let z = &content.zones[cfg.zone.min(content.zones.len() - 1)];
        let zone = ZoneInfo { name: z.name.clone(), min: z.min, max: z.max };
        let mut kinds: Vec<KindInfo> = content
            .npc_kinds
            .iter()
            .map(|k| KindInfo { name: k.name.clone(), class: KindClass::Npc, states: vec![k.health.to_string()] })
            .collect();
        kinds.extend(content.object_kinds.iter().map(|k| KindInfo {
            name: k.name.clone(),
            class: if k.respawn_secs.is_some() { KindClass::Item } else { KindClass::Object },
            states: k.states.clone(),
        }));
        if content.zones.len() > 1 {
            world.serve_only(cfg.zone);
        }
        Host {
            grid: EntityGrid::new(cfg.interest.leave_radius),
            cfg,
            world,
            control,
            cert,
            zone,
            kinds,
            clients: FxHashMap::default(),
            by_node: FxHashMap::default(),
            out: VecDeque::new(),
            counters: HostCounters::default(),
            states: Vec::new(),
            buf: Vec::new(),
            players: Vec::new(),
            ticks: 0,
        }
    }

    /// The world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The zone served.
    pub fn zone(&self) -> &ZoneInfo {
        &self.zone
    }

    /// What happened so far.
    pub fn counters(&self) -> &HostCounters {
        &self.counters
    }

    /// Clients past their hello.
    pub fn players(&self) -> usize {
        self.by_node.len()
    }

    /// The configuration.
    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    /// Lowers the datagram size to what the path takes.
    pub fn set_max_datagram(&mut self, bytes: usize) {
        self.cfg.max_datagram = bytes.max(64);
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// A connection opened; it must say hello first. (An id already known is left as it is.)
    pub fn connected(&mut self, id: ClientId) {
        if self.clients.contains_key(&id) {
            return;
        }
        if self.clients.len() >= self.cfg.max_clients {
            self.close(id, HostRefusal::Full);
            return;
        }
        self.clients.insert(id, Client::AwaitingHello);
    }

    /// A connection closed.
    pub fn disconnected(&mut self, id: ClientId) {
        if let Some(Client::Playing(p)) = self.clients.remove(&id)
            && self.by_node.get(&p.node) == Some(&id)
        {
            self.by_node.remove(&p.node);
        }
    }

    /// A frame on `id`'s stream that did not decode.
    pub fn on_malformed(&mut self, id: ClientId) {
        self.close(id, HostRefusal::Malformed);
    }

    /// A message on `id`'s stream, at `now` (`unix` the wall clock, for tickets).
    pub fn on_message(&mut self, now: Instant, unix_ms: u64, id: ClientId, msg: ClientToHost) {
        let playing = match self.clients.get(&id) {
            None => return,
            Some(Client::AwaitingHello) => None,
            Some(Client::Playing(p)) => Some(p.node),
        };
        match (playing, msg) {
            (None, ClientToHost::Hello { session, proof }) => match self.check_hello(unix_ms, &session, &proof) {
                Ok(node) => self.welcome(now, id, node),
                Err(r) => self.close(id, r),
            },
            (None, _) | (Some(_), ClientToHost::Hello { .. }) => self.close(id, HostRefusal::NoHello),
            (Some(_), ClientToHost::Position { at }) => {
                if let Err(r) = self.position(now, id, at) {
                    self.close(id, r);
                }
            }
            (Some(node), ClientToHost::Act { id: n, action }) => {
                match self.act(now, id, node, action) {
                    Ok(()) => {
                        self.counters.actions += 1;
                        self.out.push_back(Output::Message(id, HostToClient::Done { id: n }));
                    }
                    Err(reason) => {
                        self.counters.actions_refused[action_refusal_index(reason)] += 1;
                        self.out.push_back(Output::Message(id, HostToClient::Refused { id: n, reason }));
                    }
                }
                self.drain_events();
            }
            (Some(_), ClientToHost::Resend(ids)) => {
                if let Some(Client::Playing(p)) = self.clients.get_mut(&id) {
                    for e in ids.iter().take(MAX_RESEND) {
                        p.writer.forget(*e);
                    }
                }
                self.counters.resends += ids.len().min(MAX_RESEND) as u64;
            }
            (Some(_), ClientToHost::Leave) => {
                self.out.push_back(Output::Close(id));
                self.disconnected(id);
            }
        }
    }

    /// A datagram from `id`: acknowledgements of snapshots.
    pub fn on_datagram(&mut self, id: ClientId, bytes: &[u8]) {
        let Some(Client::Playing(p)) = self.clients.get_mut(&id) else {
            self.counters.bad_datagrams += 1;
            return;
        };
        let Some(acks) = Acks::decode(bytes) else {
            self.counters.bad_datagrams += 1;
            return;
        };
        for seq in acks.iter() {
            p.writer.ack(seq);
        }
    }

    fn check_hello(&self, unix_ms: u64, session: &[u8], proof: &KeyProof) -> Result<NodeId, HostRefusal> {
        let ticket = SignedTicket::decode(session).map_err(|_| HostRefusal::BadTicket)?;
        let ticket = ticket
            .verify(&self.control, TicketKind::Session, Roles::CLIENT, UnixTime(unix_ms / 1000))
            .map_err(|e| match e {
                TicketError::Expired { .. } | TicketError::NotYetValid { .. } => HostRefusal::ExpiredTicket,
                TicketError::WrongKind { .. } | TicketError::WrongRole { .. } => HostRefusal::WrongRole,
                _ => HostRefusal::BadTicket,
            })?;
        if proof.public_key != ticket.body.public_key
            || proof.unix_ms.abs_diff(unix_ms) > self.cfg.proof_skew.as_millis() as u64
        {
            return Err(HostRefusal::BadProof);
        }
        let m = KeyProof::message(WORLD_ACCOUNT, &proof.public_key, proof.unix_ms, &self.cert);
        proof.public_key.verify(SIGN_IN_CONTEXT, &m, &proof.signature).map_err(|_| HostRefusal::BadProof)?;
        Ok(ticket.body.node_id)
    }

    fn welcome(&mut self, now: Instant, id: ClientId, node: NodeId) {
        if let Some(old) = self.by_node.insert(node, id) {
            self.close(old, HostRefusal::Replaced);
        }
        self.counters.hellos += 1;
        let player = Player {
            node,
            at: None,
            strikes: 0.0,
            strikes_at: now,
            actions: Bucket { tokens: self.cfg.action_burst, at: now },
            interest: ClientInterest::new(),
            writer: SnapshotWriter::new(),
        };
        self.clients.insert(id, Client::Playing(Box::new(player)));
        self.out.push_back(Output::Message(
            id,
            HostToClient::Welcome {
                zone: self.zone.clone(),
                overlap: self.cfg.overlap,
                tick_hz: self.cfg.tick_hz,
                kinds: self.kinds.clone(),
            },
        ));
    }

    fn position(&mut self, now: Instant, id: ClientId, at: [f32; 3]) -> Result<(), HostRefusal> {
        let Some(Client::Playing(p)) = self.clients.get_mut(&id) else { return Ok(()) };
        let to = Vec2::new(at[0], at[2]);
        let faded = now.saturating_duration_since(p.strikes_at).as_secs_f32();
        p.strikes = (p.strikes - faded).max(0.0);
        p.strikes_at = now;
        let plausible = at.iter().all(|v| v.is_finite())
            && p.at.is_none_or(|(from, t)| {
                let dt = now.saturating_duration_since(t).as_secs_f32();
                from.distance(to) <= self.cfg.max_speed * dt + 1.0
            });
        if !plausible {
            self.counters.implausible += 1;
            p.strikes += 1.0;
            return if p.strikes > self.cfg.max_strikes { Err(HostRefusal::Implausible) } else { Ok(()) };
        }
        if !self.zone.contains(to.to_array(), self.cfg.overlap) {
            return Err(HostRefusal::OutsideZone);
        }
        p.at = Some((to, now));
        Ok(())
    }

    fn act(&mut self, now: Instant, id: ClientId, node: NodeId, action: Action) -> Result<(), ActionRefusal> {
        let Some(Client::Playing(p)) = self.clients.get_mut(&id) else { return Err(ActionRefusal::NoPosition) };
        let (at, _) = p.at.ok_or(ActionRefusal::NoPosition)?;
        if !p.actions.take(now, self.cfg.actions_per_sec, self.cfg.action_burst) {
            return Err(ActionRefusal::RateLimited);
        }
        let target = action.target();
        let e = self.world.entity(target).filter(|_| self.world.serves(target)).ok_or(ActionRefusal::NoEntity)?;
        if e.at.distance(at) > self.cfg.reach {
            return Err(ActionRefusal::OutOfRange);
        }
        let r = match action {
            Action::Interact(o) => self.world.interact(o, node).map(|_| ()),
            Action::Attack(n) => self.world.attack(n, self.cfg.attack_damage, node),
            Action::PickUp(i) => self.world.pick_up(i, node),
        };
        r.map_err(|e| match e {
            WorldError::NoEntity(_) => ActionRefusal::NoEntity,
            WorldError::WrongKind(_) => ActionRefusal::WrongKind,
            WorldError::Absent(_) => ActionRefusal::Absent,
        })
    }

    fn close(&mut self, id: ClientId, reason: HostRefusal) {
        self.counters.refused[refusal_index(reason)] += 1;
        self.out.push_back(Output::Message(id, HostToClient::Closed(reason)));
        self.out.push_back(Output::Close(id));
        self.disconnected(id);
    }

    /// Tells each world event to the clients that see its entity, and to the player who
    /// caused it.
    fn drain_events(&mut self) {
        while let Some(info) = self.world.poll_event() {
            let (entity, by) = (info.entity(), info.by());
            for (&cid, c) in &self.clients {
                let Client::Playing(p) = c else { continue };
                if p.interest.sees(entity) || by == Some(p.node) {
                    self.out.push_back(Output::Message(cid, HostToClient::Event(info)));
                    self.counters.events += 1;
                }
            }
        }
    }

    /// Moves the world one tick and sends every client what it sees.
    pub fn tick(&mut self, _now: Instant) {
        let dt = 1.0 / f32::from(self.cfg.tick_hz.max(1));
        self.ticks = self.ticks.wrapping_add(1);
        self.players.clear();
        self.players.extend(self.clients.values().filter_map(|c| match c {
            Client::Playing(p) => p.at.map(|(at, _)| (p.node, at)),
            Client::AwaitingHello => None,
        }));
        self.players.sort_by_key(|p| p.0);
        self.world.tick(dt, &self.players);
        self.drain_events();
        let world = &self.world;
        self.grid.rebuild_with(world.entities(), |e| world.serves(e.id));
        let entities = world.entities();
        let mut ids: Vec<ClientId> = self.clients.keys().copied().collect();
        ids.sort_unstable();
        for cid in ids {
            let Some(Client::Playing(p)) = self.clients.get_mut(&cid) else { continue };
            let Some((at, _)) = p.at else { continue };
            let change = p.interest.update(&self.cfg.interest, &self.grid, entities, at);
            if !change.despawned.is_empty() {
                for id in &change.despawned {
                    p.writer.forget(*id);
                }
                let after = p.writer.next().wrapping_sub(1);
                for ids in change.despawned.chunks(MAX_SPAWNS) {
                    self.out.push_back(Output::Message(cid, HostToClient::Despawn { ids: ids.to_vec(), after }));
                }
            }
            if !change.spawned.is_empty() {
                let npc_kinds = world.content().npc_kinds.len();
                let kind_of = |e: &Entity| match e.kind {
                    EntityKind::Npc { kind, .. } => kind,
                    EntityKind::Object { kind } => (npc_kinds + usize::from(kind)) as u16,
                };
                let spawns: Vec<(EntityId, u16)> =
                    change.spawned.iter().map(|&id| (id, kind_of(&entities[id.0 as usize]))).collect();
                for s in spawns.chunks(MAX_SPAWNS) {
                    self.out.push_back(Output::Message(cid, HostToClient::Spawn(s.to_vec())));
                }
            }
            let chosen = p.interest.choose(entities, at, self.cfg.interest.budget);
            self.states.clear();
            self.states.extend(chosen.iter().map(|&id| (id, quantise(&entities[id.0 as usize]))));
            let mut rest = &self.states[..];
            while !rest.is_empty() {
                let (_, n) = p.writer.write_within(rest, self.cfg.max_datagram - SNAPSHOT_HEADER, &mut self.buf);
                rest = &rest[n..];
                let mut d = Vec::with_capacity(SNAPSHOT_HEADER + self.buf.len());
                d.push(DATAGRAM_SNAPSHOT);
                d.extend_from_slice(&self.ticks.to_be_bytes());
                d.extend_from_slice(&self.buf);
                self.counters.snapshots += 1;
                self.counters.snapshot_bytes += d.len() as u64;
                self.counters.entries += n as u64;
                self.out.push_back(Output::Datagram(cid, d));
            }
        }
    }
}

#[cfg(test)]
mod tests;
