//! The game's view of the world: the hosting servers' entities (NPCs, objects, items) and the
//! avatars the mesh carries, each shown on one render clock, with spawn and despawn events in
//! one API ([`WorldEvent`]) that the Bevy plugin maps onto entities.
//!
//! **Zones and handover.** The control server names the hosting servers and the zone each
//! serves ([`HostingInfo`]). The view connects to every server whose zone, grown by its
//! overlap band less [`CONNECT_MARGIN`], holds the player, and leaves one only past its band
//! less [`LEAVE_MARGIN`]. The band is at least the interest's leave radius, so a player walking
//! towards a border is connected to the next server before any of its entities could be in
//! view, and keeps the first until none of its entities could be. Each server sends only its
//! own zone's entities (ids agree across servers), so the view shows no gap and no duplicate,
//! and nothing despawns and spawns again at the border.
//!
//! **Authority.** A hosting server is the authority for its zone's entities and nothing else:
//! a state it sends for an entity outside its zone, a kind it did not name, or an entity
//! another server already shows, is refused and counted. It cannot name an avatar: avatars are
//! keyed by node id, entities by entity id, and snapshots carry only entity ids. A peer is the
//! authority for its own avatar only: its updates arrive on its own VC, keyed by its node id,
//! so it cannot speak for another player or for an entity.
//!
//! Sans-IO: the driver ([`driver`]) or a test feeds it messages, datagrams and the time.

pub mod driver;
mod link;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use glam::Vec3;
use rustc_hash::FxHashMap;
use shoal_protocol::world::{
    Action, ActionRefusal, ClientToHost, EntityId, HostRefusal, HostToClient, HostingInfo, KindInfo, WorldEventInfo,
};
use shoal_protocol::{Identity, NodeId};

use crate::avatar::{AvatarEvent, AvatarState, InterpConfig};
pub use link::LinkCounters;
use link::{LinkEvent, WorldLink};

/// A server is connected to once the player is this much inside its overlap band.
pub const CONNECT_MARGIN: f32 = 10.0;
/// And left once the player is less than this inside it (the server itself closes the
/// connection at the band's edge).
pub const LEAVE_MARGIN: f32 = 2.0;
/// How often the player's position goes to each connected hosting server.
pub const POSITION_EVERY: Duration = Duration::from_millis(200);

/// Something shown: a world entity or a player's avatar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViewId {
    /// An entity of a hosting server.
    Entity(EntityId),
    /// A player's avatar.
    Avatar(NodeId),
}

/// What the game hears of the world.
#[derive(Debug, Clone, PartialEq)]
pub enum WorldEvent {
    /// A hosting server welcomed us.
    Connected {
        /// The server.
        server: NodeId,
        /// The zone it serves.
        zone: String,
    },
    /// A hosting server connection ended (with the server's reason, if it gave one).
    Disconnected {
        /// The server.
        server: NodeId,
        /// Its reason.
        reason: Option<HostRefusal>,
    },
    /// Something can be shown from now on: an entity (with its kind) or an avatar.
    Spawned {
        /// What.
        id: ViewId,
        /// An entity's kind; `None` for an avatar.
        kind: Option<KindInfo>,
    },
    /// Something is no longer shown.
    Despawned {
        /// What.
        id: ViewId,
    },
    /// Something happened to an entity in view, or that we did.
    Happened(WorldEventInfo),
    /// An action was done.
    ActionDone {
        /// Its number, as [`WorldView::act`] gave it.
        id: u32,
    },
    /// An action was refused.
    ActionRefused {
        /// Its number.
        id: u32,
        /// Why.
        reason: ActionRefusal,
    },
}

/// Why an action could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ActError {
    /// No connected hosting server shows that entity.
    #[error("no hosting server shows that entity")]
    NotShown,
}

/// What the driver is to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// A message on the server's stream.
    Message(NodeId, ClientToHost),
    /// A datagram.
    Datagram(NodeId, Vec<u8>),
}

/// What the view counts, over every link it had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorldCounters {
    /// The links' counters, summed.
    pub links: LinkCounters,
    /// Entities a second server claimed while another showed them: refused.
    pub conflicts: u64,
    /// Connections made, and ended.
    pub connected: u64,
    /// See `connected`.
    pub disconnected: u64,
}

/// The merged view. See the module docs.
#[derive(Debug)]
pub struct WorldView {
    interp: InterpConfig,
    epoch: Instant,
    hosting: Vec<HostingInfo>,
    position: Option<Vec3>,
    links: FxHashMap<NodeId, WorldLink>,
    /// Which link shows each entity.
    shown: FxHashMap<EntityId, NodeId>,
    avatars: Vec<NodeId>,
    next_action: u32,
    last_position: Option<Instant>,
    events: VecDeque<WorldEvent>,
    transmits: VecDeque<Transmit>,
    counters: WorldCounters,
}

impl WorldView {
    /// An empty view; `epoch` is any instant before the first arrival.
    pub fn new(interp: InterpConfig, epoch: Instant) -> WorldView {
        WorldView {
            interp,
            epoch,
            hosting: Vec::new(),
            position: None,
            links: FxHashMap::default(),
            shown: FxHashMap::default(),
            avatars: Vec::new(),
            next_action: 1,
            last_position: None,
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            counters: WorldCounters::default(),
        }
    }

    /// The hosting servers there are now, as the control server said.
    pub fn set_hosting(&mut self, hosting: Vec<HostingInfo>) {
        self.hosting = hosting;
    }

    /// Where the player is.
    pub fn set_position(&mut self, at: Vec3) {
        self.position = Some(at);
    }

    /// What to connect to and what to leave, for where the player is now: servers not yet
    /// linked whose band (less [`CONNECT_MARGIN`]) holds the player, and linked ones whose
    /// band (less [`LEAVE_MARGIN`]) no longer does or that are no longer listed.
    pub fn plan(&self) -> (Vec<HostingInfo>, Vec<NodeId>) {
        let Some(p) = self.position else { return (Vec::new(), Vec::new()) };
        let at = [p.x, p.z];
        let connect = self
            .hosting
            .iter()
            .filter(|h| !self.links.contains_key(&h.id) && h.zone.contains(at, (h.overlap - CONNECT_MARGIN).max(0.0)))
            .cloned()
            .collect();
        let leave = self
            .links
            .keys()
            .filter(|id| {
                self.hosting
                    .iter()
                    .find(|h| h.id == **id)
                    .is_none_or(|h| !h.zone.contains(at, (h.overlap - LEAVE_MARGIN).max(0.0)))
            })
            .copied()
            .collect();
        (connect, leave)
    }

    /// A connection to `server` opened: returns its hello (the session ticket and a key proof
    /// by `identity` bound to the server's certificate, made at `unix_ms`).
    pub fn opened(
        &mut self,
        server: &HostingInfo,
        identity: &Identity,
        session: Vec<u8>,
        unix_ms: u64,
    ) -> ClientToHost {
        self.links.insert(server.id, WorldLink::new(server.zone.clone(), self.interp, self.epoch));
        WorldLink::hello(identity, session, &server.cert, unix_ms)
    }

    /// The connection to `server` ended: what it showed is gone.
    pub fn closed(&mut self, server: NodeId, reason: Option<HostRefusal>) {
        let Some(link) = self.links.remove(&server) else { return };
        self.add_counters(&link.counters);
        let mut ids: Vec<EntityId> = self.shown.iter().filter(|(_, s)| **s == server).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        for id in ids {
            self.shown.remove(&id);
            self.events.push_back(WorldEvent::Despawned { id: ViewId::Entity(id) });
        }
        if link.is_welcomed() {
            self.counters.disconnected += 1;
            self.events.push_back(WorldEvent::Disconnected { server, reason });
        }
    }

    fn add_counters(&mut self, c: &LinkCounters) {
        let t = &mut self.counters.links;
        t.snapshots += c.snapshots;
        t.entries += c.entries;
        t.bad_datagrams += c.bad_datagrams;
        t.missing_baselines += c.missing_baselines;
        t.refused_claims += c.refused_claims;
        t.unspawned += c.unspawned;
    }

    /// A message from `server`.
    pub fn on_message(&mut self, server: NodeId, msg: HostToClient) {
        let Some(link) = self.links.get_mut(&server) else { return };
        link.on_message(msg);
        self.take_link_events(server);
    }

    /// A datagram from `server`.
    pub fn on_datagram(&mut self, now: Instant, server: NodeId, d: &[u8]) {
        let Some(link) = self.links.get_mut(&server) else { return };
        link.on_datagram(now, d);
        if let Some(acks) = link.poll_acks() {
            self.transmits.push_back(Transmit::Datagram(server, acks.to_vec()));
        }
        self.take_link_events(server);
    }

    fn take_link_events(&mut self, server: NodeId) {
        let Some(link) = self.links.get_mut(&server) else { return };
        while let Some(m) = link.poll_message() {
            self.transmits.push_back(Transmit::Message(server, m));
        }
        let mut closed = None;
        while let Some(e) = link.events.pop_front() {
            match e {
                LinkEvent::Welcomed => {
                    self.counters.connected += 1;
                    self.events.push_back(WorldEvent::Connected { server, zone: link.zone.name.clone() });
                    if let Some(p) = self.position {
                        self.transmits
                            .push_back(Transmit::Message(server, ClientToHost::Position { at: p.to_array() }));
                    }
                }
                LinkEvent::Spawned(id) => match self.shown.get(&id) {
                    Some(other) if *other != server => self.counters.conflicts += 1,
                    Some(_) => {}
                    None => {
                        self.shown.insert(id, server);
                        let kind = link.entities.get(&id).and_then(|t| t.kind).and_then(|k| link.kind(k)).cloned();
                        self.events.push_back(WorldEvent::Spawned { id: ViewId::Entity(id), kind });
                    }
                },
                LinkEvent::Despawned(id) => {
                    if self.shown.get(&id) == Some(&server) {
                        self.shown.remove(&id);
                        self.events.push_back(WorldEvent::Despawned { id: ViewId::Entity(id) });
                    }
                }
                LinkEvent::Happened(e) => self.events.push_back(WorldEvent::Happened(e)),
                LinkEvent::Done(id) => self.events.push_back(WorldEvent::ActionDone { id }),
                LinkEvent::Refused(id, reason) => self.events.push_back(WorldEvent::ActionRefused { id, reason }),
                LinkEvent::Closed(r) => closed = Some(r),
            }
        }
        if let Some(r) = closed {
            self.closed(server, Some(r));
        }
    }

    /// Asks the hosting server that shows the entity to do `action`; returns the action's
    /// number, which its [`WorldEvent::ActionDone`] or [`WorldEvent::ActionRefused`] names.
    ///
    /// # Errors
    /// When no connected server shows the entity.
    pub fn act(&mut self, action: Action) -> Result<u32, ActError> {
        let server = *self.shown.get(&action.target()).ok_or(ActError::NotShown)?;
        let id = self.next_action;
        self.next_action = self.next_action.wrapping_add(1);
        self.transmits.push_back(Transmit::Message(server, ClientToHost::Act { id, action }));
        Ok(id)
    }

    /// Sends the player's position to every welcomed server when [`POSITION_EVERY`] has
    /// passed. Call it every frame.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (Some(p), due) = (self.position, self.last_position.is_none_or(|t| now >= t + POSITION_EVERY)) else {
            return;
        };
        if !due {
            return;
        }
        self.last_position = Some(now);
        let mut ids: Vec<NodeId> = self.links.iter().filter(|(_, l)| l.is_welcomed()).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        for id in ids {
            self.transmits.push_back(Transmit::Message(id, ClientToHost::Position { at: p.to_array() }));
        }
    }

    /// When [`WorldView::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.position?;
        Some(self.last_position.map_or(self.epoch, |t| t + POSITION_EVERY))
    }

    /// Takes an avatar event from the mesh: avatars appear and leave in the same events as
    /// entities.
    pub fn on_avatar_event(&mut self, e: &AvatarEvent) {
        match e {
            AvatarEvent::Appeared(peer, _) if !self.avatars.contains(peer) => {
                self.avatars.push(*peer);
                self.events.push_back(WorldEvent::Spawned { id: ViewId::Avatar(*peer), kind: None });
            }
            AvatarEvent::Left(peer) => {
                if let Some(i) = self.avatars.iter().position(|p| p == peer) {
                    self.avatars.swap_remove(i);
                    self.events.push_back(WorldEvent::Despawned { id: ViewId::Avatar(*peer) });
                }
            }
            _ => {}
        }
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the game.
    pub fn poll_event(&mut self) -> Option<WorldEvent> {
        self.events.pop_front()
    }

    /// Every entity shown, as drawn at `now` (interpolated a little behind the newest
    /// snapshot), in id order. Avatars come from the avatar mesh.
    pub fn entities(&self, now: Instant) -> Vec<(EntityId, AvatarState)> {
        let mut out: Vec<(EntityId, AvatarState)> = self
            .shown
            .iter()
            .filter_map(|(id, server)| {
                let t = self.links.get(server)?.entities.get(id)?;
                Some((*id, t.view.state_at(now)?))
            })
            .collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    /// The hosting servers linked now.
    pub fn servers(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.links.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// What the view counted, its current links' included.
    pub fn counters(&self) -> WorldCounters {
        let mut c = self.counters;
        for l in self.links.values() {
            let t = &mut c.links;
            t.snapshots += l.counters.snapshots;
            t.entries += l.counters.entries;
            t.bad_datagrams += l.counters.bad_datagrams;
            t.missing_baselines += l.counters.missing_baselines;
            t.refused_claims += l.counters.refused_claims;
            t.unspawned += l.counters.unspawned;
        }
        c
    }
}

#[cfg(test)]
mod tests;
