//! The world plane: what hosting servers, the control server and players' clients say about
//! the world outside the avatars (zones, NPCs, objects).
//!
//! - A hosting server registers with the control server on ALPN `shoal-hosting/1`
//!   ([`HostingToControl`] / [`ControlToHosting`]), proving its key for [`HOSTING_ACCOUNT`];
//!   the control server tells clients which hosting server serves which zone
//!   ([`HostingInfo`], in [`crate::control::ControlToClient::Hosting`]).
//! - A client connects to a hosting server on ALPN `shoal-world/1`, pinning the certificate
//!   fingerprint the control server gave, and opens one bidirectional stream of frames
//!   ([`ClientToHost`] / [`HostToClient`], framed as the control plane's are). Its first
//!   message is [`ClientToHost::Hello`] with its session ticket and a [`KeyProof`] for
//!   [`WORLD_ACCOUNT`] bound to that hosting server's certificate.
//! - Snapshots go as QUIC datagrams: [`DATAGRAM_SNAPSHOT`], the server's tick, and a
//!   [`crate::snapshot`]; the client acknowledges them in datagrams of its own ([`Acks`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::control::KeyProof;
use crate::identity::NodeId;

/// The account a hosting server's [`KeyProof`] names when it registers.
pub const HOSTING_ACCOUNT: &str = "hosting";
/// The account a client's [`KeyProof`] names towards a hosting server.
pub const WORLD_ACCOUNT: &str = "world";
/// Largest frame either side of a world connection accepts.
pub const MAX_WORLD_FRAME: usize = 64 * 1024;
/// Most entities one spawn or despawn message names (a larger view goes in several).
pub const MAX_SPAWNS: usize = 1024;
/// Most entities one [`ClientToHost::Resend`] names; a server takes no more of one.
pub const MAX_RESEND_REQUEST: usize = 256;

/// First byte of a server's datagram holding a snapshot: then the server's tick (u32,
/// big-endian), then the [`crate::snapshot`].
pub const DATAGRAM_SNAPSHOT: u8 = 0;
/// Bytes before the snapshot in a snapshot datagram.
pub const SNAPSHOT_HEADER: usize = 5;
/// First byte of a client's datagram holding acknowledgements.
pub const DATAGRAM_ACKS: u8 = 1;

/// An entity's id in a world; hosting servers serving parts of one world agree on them (they
/// load the same content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityId(pub u32);

/// The part of the world a hosting server is the authority for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneInfo {
    /// The zone's name in the content.
    pub name: String,
    /// Its corner with the least x and z, m.
    pub min: [f32; 2],
    /// Its corner with the most x and z, m.
    pub max: [f32; 2],
}

impl ZoneInfo {
    /// Whether `at` (x, z) lies within the zone grown by `margin` on every side.
    pub fn contains(&self, at: [f32; 2], margin: f32) -> bool {
        (0..2).all(|i| at[i] >= self.min[i] - margin && at[i] <= self.max[i] + margin)
    }
}

/// A hosting server, as the control server tells clients of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostingInfo {
    /// Its node id.
    pub id: NodeId,
    /// Where it listens for clients.
    pub addr: SocketAddr,
    /// The SHA-256 of its certificate, which the client pins.
    pub cert: [u8; 32],
    /// The zone it serves.
    pub zone: ZoneInfo,
    /// How far past the zone's border it still serves a client, m: the band in which a client
    /// crossing the border is connected to both servers.
    pub overlap: f32,
}

/// A hosting server announcing itself to the control server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Where clients reach it.
    pub addr: SocketAddr,
    /// The SHA-256 of the certificate it presents to clients.
    pub cert: [u8; 32],
    /// The zone it serves.
    pub zone: ZoneInfo,
    /// Its overlap band, m.
    pub overlap: f32,
    /// Possession of its key, for [`HOSTING_ACCOUNT`].
    pub proof: KeyProof,
}

/// From a hosting server to the control server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostingToControl {
    /// Announcing itself. Only hosting servers whose keys the control server is configured
    /// with are accepted.
    Register(Box<Registration>),
    /// How busy it is.
    Load {
        /// Clients connected.
        clients: u32,
        /// Entities in its world.
        entities: u32,
    },
    /// Alive.
    Keepalive,
}

/// From the control server to a hosting server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlToHosting {
    /// Registered: clients are told of it from now on.
    Registered,
    /// Refused.
    Refused(crate::control::Refusal),
}

/// What a player asks the world to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Use an object: it moves to its next state (a door opens or closes).
    Interact(EntityId),
    /// Strike an NPC.
    Attack(EntityId),
    /// Take an item: it leaves the world until it appears again.
    PickUp(EntityId),
}

impl Action {
    /// The entity the action is on.
    pub fn target(&self) -> EntityId {
        match *self {
            Action::Interact(e) | Action::Attack(e) | Action::PickUp(e) => e,
        }
    }
}

/// Why the hosting server refused an action. Each is counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ActionRefusal {
    /// No entity has that id.
    #[error("no such entity")]
    NoEntity,
    /// Not something that can be used so (attacking a door, picking up an NPC).
    #[error("that cannot be done to this entity")]
    WrongKind,
    /// The entity is not in the world (a dead NPC, an item already taken).
    #[error("the entity is not in the world")]
    Absent,
    /// The player is further from it than the action reaches.
    #[error("out of range")]
    OutOfRange,
    /// Too many actions too fast.
    #[error("too many actions")]
    RateLimited,
    /// The player has not said where it is yet.
    #[error("no position reported yet")]
    NoPosition,
}

/// From a player's client to a hosting server, on the world connection's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientToHost {
    /// The first message: who the player is.
    Hello {
        /// The session ticket (a `SignedTicket`'s bytes) from the control server's welcome.
        session: Vec<u8>,
        /// Possession of the key the ticket names, for [`WORLD_ACCOUNT`], bound to this
        /// hosting server's certificate.
        proof: KeyProof,
    },
    /// Where the player is (x, y, z, m), a few times a second: what the server's interest
    /// and NPCs go by. Checked for plausibility.
    Position {
        /// The position.
        at: [f32; 3],
    },
    /// An action, numbered by the client so that it can match the answer.
    Act {
        /// The client's number for it.
        id: u32,
        /// What to do.
        action: Action,
    },
    /// Entities whose snapshot entries named a baseline the client does not hold: the server
    /// sends them whole next.
    Resend(Vec<EntityId>),
    /// Leaving.
    Leave,
}

/// What class an entity kind is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KindClass {
    /// An NPC; its state is its health.
    Npc,
    /// An object; its state indexes the kind's states.
    Object,
    /// An item a player can pick up; its state indexes the kind's states.
    Item,
}

/// An entity kind, as the client learns it in the welcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindInfo {
    /// Its name in the content.
    pub name: String,
    /// NPC, object or item.
    pub class: KindClass,
    /// An object's or item's state names; an NPC's full health as its one entry, in words.
    pub states: Vec<String>,
}

/// Something that happened in the world, as clients that see it are told.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum WorldEventInfo {
    /// An NPC died.
    Died {
        /// The NPC.
        npc: EntityId,
        /// Whose attack killed it.
        by: NodeId,
    },
    /// A dead NPC spawned again.
    Respawned {
        /// The NPC.
        npc: EntityId,
        /// Where (x, z).
        at: [f32; 2],
    },
    /// An object moved to another state.
    ObjectChanged {
        /// The object.
        object: EntityId,
        /// Its new state.
        state: u16,
        /// Who used it.
        by: NodeId,
    },
    /// An item was taken.
    PickedUp {
        /// The item.
        item: EntityId,
        /// Who took it.
        by: NodeId,
    },
}

impl WorldEventInfo {
    /// The entity it happened to.
    pub fn entity(&self) -> EntityId {
        match *self {
            WorldEventInfo::Died { npc, .. } | WorldEventInfo::Respawned { npc, .. } => npc,
            WorldEventInfo::ObjectChanged { object, .. } => object,
            WorldEventInfo::PickedUp { item, .. } => item,
        }
    }

    /// The player whose action caused it, if one did.
    pub fn by(&self) -> Option<NodeId> {
        match *self {
            WorldEventInfo::Died { by, .. }
            | WorldEventInfo::ObjectChanged { by, .. }
            | WorldEventInfo::PickedUp { by, .. } => Some(by),
            WorldEventInfo::Respawned { .. } => None,
        }
    }
}

/// Why a hosting server refused or closed a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HostRefusal {
    /// The session ticket is forged, altered or malformed.
    #[error("the session ticket is not the control server's")]
    BadTicket,
    /// The session ticket has expired (or is not valid yet).
    #[error("the session ticket has expired")]
    ExpiredTicket,
    /// The ticket is not a player's session ticket.
    #[error("the ticket is not a player's session ticket")]
    WrongRole,
    /// The key proof's signature, account, server or time is wrong.
    #[error("the key proof is wrong")]
    BadProof,
    /// A message before the hello, or a second hello.
    #[error("hello expected first, once")]
    NoHello,
    /// A frame that does not decode, or too large.
    #[error("malformed message")]
    Malformed,
    /// Reported movement was implausible too often.
    #[error("reported movement was implausible too often")]
    Implausible,
    /// The player's position is outside what this server serves.
    #[error("outside this server's zone")]
    OutsideZone,
    /// The server holds as many clients as it may.
    #[error("the server is full")]
    Full,
    /// The same player connected again; this connection is the older one.
    #[error("replaced by a newer connection of the same player")]
    Replaced,
}

/// From a hosting server to a player's client, on the world connection's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostToClient {
    /// The hello was accepted.
    Welcome {
        /// The zone this server serves.
        zone: ZoneInfo,
        /// Its overlap band, m.
        overlap: f32,
        /// Snapshots a second.
        tick_hz: u16,
        /// The world's entity kinds; spawns name them by index.
        kinds: Vec<KindInfo>,
    },
    /// Entities that entered the client's view, with their kinds (indexes into the welcome's).
    /// Their states come in snapshots.
    Spawn(Vec<(EntityId, u16)>),
    /// Entities that left the client's view. States of them in snapshots numbered `after` or
    /// before are stale; later ones are of the entity back in view.
    Despawn {
        /// The entities.
        ids: Vec<EntityId>,
        /// The newest snapshot sent before they left.
        after: u32,
    },
    /// Something happened to an entity in view (or that the client did).
    Event(WorldEventInfo),
    /// An action was done.
    Done {
        /// The client's number for it.
        id: u32,
    },
    /// An action was refused.
    Refused {
        /// The client's number for it.
        id: u32,
        /// Why.
        reason: ActionRefusal,
    },
    /// The client was refused or closed; the server closes the connection after this.
    Closed(HostRefusal),
}

/// A client's acknowledgement of snapshots: the newest it took, and which of the 64 before it
/// it took too (bit `i` for `newest - 1 - i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acks {
    /// The newest snapshot taken.
    pub newest: u32,
    /// The ones before it taken.
    pub before: u64,
}

impl Acks {
    /// Bytes on the wire, kind byte included.
    pub const LEN: usize = 1 + 4 + 8;

    /// The datagram.
    pub fn encode(&self) -> [u8; Acks::LEN] {
        let mut b = [0; Acks::LEN];
        b[0] = DATAGRAM_ACKS;
        b[1..5].copy_from_slice(&self.newest.to_be_bytes());
        b[5..].copy_from_slice(&self.before.to_be_bytes());
        b
    }

    /// Reads an acknowledgement datagram; `None` unless it is exactly one.
    pub fn decode(b: &[u8]) -> Option<Acks> {
        if b.len() != Acks::LEN || b[0] != DATAGRAM_ACKS {
            return None;
        }
        let newest = u32::from_be_bytes(b[1..5].try_into().ok()?);
        let before = u64::from_be_bytes(b[5..].try_into().ok()?);
        Some(Acks { newest, before })
    }

    /// Every snapshot number acknowledged, newest first.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.newest)
            .chain((0..64).filter(|i| self.before & (1 << i) != 0).map(|i| self.newest.wrapping_sub(1 + i as u32)))
    }

    /// Records snapshot `seq` as taken.
    pub fn take(acks: &mut Option<Acks>, seq: u32) {
        let Some(a) = acks else {
            *acks = Some(Acks { newest: seq, before: 0 });
            return;
        };
        let ahead = seq.wrapping_sub(a.newest) as i32;
        if ahead > 0 {
            let shift = ahead as u32;
            a.before = if shift > 64 { 0 } else { (a.before << (shift - 1) << 1) | (1 << (shift - 1)) };
            a.newest = seq;
        } else if (-64..0).contains(&ahead) {
            a.before |= 1 << ((-ahead) - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn acks_record_what_was_taken_in_any_order() {
        let mut a = None;
        for s in [10, 8, 12, 11, 200] {
            Acks::take(&mut a, s);
        }
        let a = a.unwrap();
        let got: Vec<u32> = a.iter().collect();
        assert_eq!(got, vec![200]);
        let mut b = None;
        for s in [10, 8, 12, 11, 9, 76, 75] {
            Acks::take(&mut b, s);
        }
        let b = b.unwrap();
        let mut got: Vec<u32> = b.iter().collect();
        got.sort_unstable();
        // 8 fell out of the 64 behind 76.
        assert_eq!(got, vec![12, 75, 76]);
        assert_eq!(Acks::decode(&b.encode()), Some(b));
        assert_eq!(Acks::decode(&b.encode()[..12]), None);
        let mut wrong = b.encode();
        wrong[0] = DATAGRAM_SNAPSHOT;
        assert_eq!(Acks::decode(&wrong), None);
        // Across the wrap of the numbers.
        let mut c = None;
        Acks::take(&mut c, u32::MAX);
        Acks::take(&mut c, 0);
        assert_eq!(c.unwrap().iter().collect::<Vec<_>>(), vec![0, u32::MAX]);
    }

    #[test]
    fn messages_round_trip() {
        let m = HostToClient::Welcome {
            zone: ZoneInfo { name: "meadow".into(), min: [0.0, 0.0], max: [400.0, 400.0] },
            overlap: 40.0,
            tick_hz: 20,
            kinds: vec![KindInfo { name: "wolf".into(), class: KindClass::Npc, states: vec!["100".into()] }],
        };
        assert_eq!(decode::<HostToClient>(&encode(&m).unwrap(), MAX_WORLD_FRAME).unwrap(), m);
        let a = ClientToHost::Act { id: 3, action: Action::PickUp(EntityId(9)) };
        assert_eq!(decode::<ClientToHost>(&encode(&a).unwrap(), MAX_WORLD_FRAME).unwrap(), a);
        assert!(ZoneInfo { name: String::new(), min: [0.0, 0.0], max: [10.0, 10.0] }.contains([12.0, 5.0], 2.5));
    }
}
