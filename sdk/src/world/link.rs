//! One hosting server connection's protocol, sans-IO: the hello, the welcome's kinds, spawns
//! and despawns, snapshots decoded against what was acknowledged, acknowledgements, actions
//! and their answers.

use std::collections::VecDeque;
use std::time::Instant;

use glam::{Quat, Vec3};
use rustc_hash::FxHashMap;
use shoal_protocol::Identity;
use shoal_protocol::control::KeyProof;
use shoal_protocol::snapshot::{SnapshotReader, decode};
use shoal_protocol::world::{
    Acks, ActionRefusal, ClientToHost, DATAGRAM_SNAPSHOT, EntityId, HostRefusal, HostToClient, KindInfo,
    MAX_RESEND_REQUEST, SNAPSHOT_HEADER, WORLD_ACCOUNT, WorldEventInfo, ZoneInfo,
};

use crate::avatar::{AvatarState, InterpConfig, Interpolator};

/// How far outside its zone an entity a server sends may stand before it is refused: the
/// quantisation, and nothing more (NPCs are held in their zone, objects stand in one).
const ZONE_SLACK: f32 = 0.5;

/// What one link tells the view.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LinkEvent {
    Welcomed,
    Spawned(EntityId),
    Despawned(EntityId),
    Happened(WorldEventInfo),
    Done(u32),
    Refused(u32, ActionRefusal),
    Closed(HostRefusal),
}

/// What a link counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Snapshot datagrams taken.
    pub snapshots: u64,
    /// Entity states taken.
    pub entries: u64,
    /// Datagrams that did not decode.
    pub bad_datagrams: u64,
    /// Entries whose baseline was not held (asked for again whole).
    pub missing_baselines: u64,
    /// Entries for entities outside the server's zone, or of kinds it did not name: refused.
    pub refused_claims: u64,
    /// Entries for entities not spawned (held until their spawn comes).
    pub unspawned: u64,
}

/// An entity as this link holds it.
#[derive(Debug)]
pub(crate) struct Tracked {
    pub(crate) kind: Option<u16>,
    pub(crate) view: Interpolator,
    /// The snapshot the newest state taken came in.
    pub(crate) newest: Option<u32>,
}

/// One hosting server connection. See the module docs.
#[derive(Debug)]
pub(crate) struct WorldLink {
    pub(crate) zone: ZoneInfo,
    interp: InterpConfig,
    epoch: Instant,
    welcomed: Option<(u16, Vec<KindInfo>)>,
    reader: SnapshotReader,
    pub(crate) entities: FxHashMap<EntityId, Tracked>,
    /// Entities despawned, and the newest snapshot whose states of them are stale.
    gone: FxHashMap<EntityId, u32>,
    acks: Option<Acks>,
    acks_due: bool,
    resend: Vec<EntityId>,
    pub(crate) events: VecDeque<LinkEvent>,
    pub(crate) counters: LinkCounters,
}

impl WorldLink {
    /// A link to a server serving `zone`, about to say hello.
    pub(crate) fn new(zone: ZoneInfo, interp: InterpConfig, epoch: Instant) -> WorldLink {
        WorldLink {
            zone,
            interp,
            epoch,
            welcomed: None,
            reader: SnapshotReader::new(),
            entities: FxHashMap::default(),
            gone: FxHashMap::default(),
            acks: None,
            acks_due: false,
            resend: Vec::new(),
            events: VecDeque::new(),
            counters: LinkCounters::default(),
        }
    }

    /// The hello: `identity`'s session ticket and a key proof bound to the server's
    /// certificate `cert`, made at `unix_ms`.
    pub(crate) fn hello(identity: &Identity, session: Vec<u8>, cert: &[u8; 32], unix_ms: u64) -> ClientToHost {
        ClientToHost::Hello { session, proof: KeyProof::new(identity, WORLD_ACCOUNT, unix_ms, cert) }
    }

    /// The kinds the welcome named.
    pub(crate) fn kind(&self, k: u16) -> Option<&KindInfo> {
        self.welcomed.as_ref()?.1.get(usize::from(k))
    }

    pub(crate) fn is_welcomed(&self) -> bool {
        self.welcomed.is_some()
    }

    /// The next message the link itself has for the server: entities to send whole again.
    pub(crate) fn poll_message(&mut self) -> Option<ClientToHost> {
        if self.resend.is_empty() {
            return None;
        }
        let ids: Vec<EntityId> = self.resend.drain(..self.resend.len().min(MAX_RESEND_REQUEST)).collect();
        Some(ClientToHost::Resend(ids))
    }

    /// The acknowledgement datagram, when snapshots came since the last.
    pub(crate) fn poll_acks(&mut self) -> Option<[u8; Acks::LEN]> {
        if !std::mem::take(&mut self.acks_due) {
            return None;
        }
        self.acks.map(|a| a.encode())
    }

    /// A message from the server.
    pub(crate) fn on_message(&mut self, msg: HostToClient) {
        match msg {
            HostToClient::Welcome { zone, overlap: _, tick_hz, kinds } => {
                self.zone = zone;
                self.welcomed = Some((tick_hz.max(1), kinds));
                self.events.push_back(LinkEvent::Welcomed);
            }
            HostToClient::Spawn(list) => {
                for (id, kind) in list {
                    if self.kind(kind).is_none() {
                        self.counters.refused_claims += 1;
                        continue;
                    }
                    self.gone.remove(&id);
                    let t = self.entities.entry(id).or_insert_with(|| Tracked {
                        kind: None,
                        view: Interpolator::new(self.interp, self.epoch),
                        newest: None,
                    });
                    if t.kind.replace(kind).is_none() && t.newest.is_some() {
                        self.events.push_back(LinkEvent::Spawned(id));
                    }
                }
            }
            HostToClient::Despawn { ids, after } => {
                for id in ids {
                    self.gone.insert(id, after);
                    // States taken after the despawn's snapshot are of the entity back in
                    // view (its spawn is on the way): they stay.
                    let stale = self.entities.get(&id).is_none_or(|t| t.newest.is_none_or(|s| !newer(s, after)));
                    if stale && let Some(t) = self.entities.remove(&id) {
                        self.reader.forget(id);
                        if t.kind.is_some() && t.newest.is_some() {
                            self.events.push_back(LinkEvent::Despawned(id));
                        }
                    }
                }
            }
            HostToClient::Event(e) => self.events.push_back(LinkEvent::Happened(e)),
            HostToClient::Done { id } => self.events.push_back(LinkEvent::Done(id)),
            HostToClient::Refused { id, reason } => self.events.push_back(LinkEvent::Refused(id, reason)),
            HostToClient::Closed(r) => self.events.push_back(LinkEvent::Closed(r)),
        }
    }

    /// A datagram from the server.
    pub(crate) fn on_datagram(&mut self, now: Instant, d: &[u8]) {
        let Some((tick_hz, _)) = &self.welcomed else {
            self.counters.bad_datagrams += 1;
            return;
        };
        let tick_hz = f64::from(*tick_hz);
        if d.len() < SNAPSHOT_HEADER || d[0] != DATAGRAM_SNAPSHOT {
            self.counters.bad_datagrams += 1;
            return;
        }
        let tick = u32::from_be_bytes([d[1], d[2], d[3], d[4]]);
        let Ok((seq, entries)) = decode(&d[SNAPSHOT_HEADER..]) else {
            self.counters.bad_datagrams += 1;
            return;
        };
        let before = self.reader.missing_baselines;
        let states = self.reader.apply(seq, &entries);
        let missing = self.reader.missing_baselines - before;
        if missing > 0 {
            // Which ones: those named and not taken.
            self.counters.missing_baselines += missing;
            let taken: Vec<EntityId> = states.iter().map(|(id, _)| *id).collect();
            self.resend.extend(entries.iter().map(|e| e.id).filter(|id| !taken.contains(id)));
        }
        self.counters.snapshots += 1;
        Acks::take(&mut self.acks, seq);
        self.acks_due = true;
        for (id, q) in states {
            if self.gone.get(&id).is_some_and(|&after| !newer(seq, after)) {
                continue;
            }
            let [x, z] = q.position();
            if !self.zone.contains([x, z], ZONE_SLACK) {
                self.counters.refused_claims += 1;
                continue;
            }
            self.counters.entries += 1;
            let state = AvatarState {
                position: Vec3::new(x, 0.0, z),
                orientation: Quat::from_rotation_y(-q.heading()),
                velocity: Vec3::ZERO,
                anim: q.state,
            };
            let t = self.entities.entry(id).or_insert_with(|| Tracked {
                kind: None,
                view: Interpolator::new(self.interp, self.epoch),
                newest: None,
            });
            if t.kind.is_none() {
                self.counters.unspawned += 1;
            }
            let first = t.newest.is_none();
            if t.newest.is_none_or(|s| newer(seq, s)) {
                t.newest = Some(seq);
            }
            t.view.push(now, f64::from(tick) / tick_hz, state);
            if first && t.kind.is_some() {
                self.events.push_back(LinkEvent::Spawned(id));
            }
        }
    }
}

/// Whether snapshot `a` is newer than `b`, across the wrap of the numbers.
fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}
