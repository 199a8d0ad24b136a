//! Control-plane messages, named by direction. They travel over the control server's QUIC
//! connections, one message per length-prefixed frame ([`crate::framing`]) holding a
//! [`crate::codec`] frame (version byte, then postcard). A frame larger than
//! [`MAX_CONTROL_FRAME`] is refused before it is read.
//!
//! The control plane never carries game payloads: it signs players in, records where they are
//! reachable, introduces neighbours to each other, maps the relays, and takes reports.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, NodeId, PublicKey, Signature};
use crate::ticket::UnixTime;

/// Largest control frame either side accepts.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// The account a relay's [`KeyProof`] names.
pub const RELAY_ACCOUNT: &str = "relay";

/// Domain separation for the signature that proves a client holds the key it signs in with.
pub const SIGN_IN_CONTEXT: &[u8] = b"shoal sign-in v1";

/// What a client proves when it signs in: that it holds the secret key of `public_key`, now,
/// towards this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProof {
    /// The client's long-term key.
    pub public_key: PublicKey,
    /// When the proof was made; the server refuses proofs outside its clock-skew window.
    pub unix_ms: u64,
    /// Signature over [`KeyProof::message`] with `public_key`'s secret.
    pub signature: Signature,
}

impl KeyProof {
    /// `identity`'s proof for `account`, made at `unix_ms`, towards the server whose
    /// certificate has fingerprint `server`.
    pub fn new(identity: &Identity, account: &str, unix_ms: u64, server: &[u8; 32]) -> KeyProof {
        let public_key = identity.public_key();
        let m = KeyProof::message(account, &public_key, unix_ms, server);
        KeyProof { public_key, unix_ms, signature: identity.sign(SIGN_IN_CONTEXT, &m) }
    }

    /// The bytes signed: the account, the key, the time and the server's certificate
    /// fingerprint, so a proof made for one server or account is useless elsewhere.
    pub fn message(account: &str, public_key: &PublicKey, unix_ms: u64, server: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(account.len() + 80);
        m.extend_from_slice(&(account.len() as u32).to_be_bytes());
        m.extend_from_slice(account.as_bytes());
        m.extend_from_slice(&public_key.0);
        m.extend_from_slice(&unix_ms.to_be_bytes());
        m.extend_from_slice(server);
        m
    }
}

/// From a player's client to the control server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientToControl {
    /// Sign in with an account and password, proving the key the tickets will name.
    SignIn {
        /// The account name.
        account: String,
        /// Its password (the connection is TLS).
        password: String,
        /// Possession of the client's key.
        proof: KeyProof,
    },
    /// Resume after a lost connection or a server restart with a session ticket still valid.
    Resume {
        /// The session ticket from [`ControlToClient::Welcome`].
        session: Vec<u8>,
        /// Possession of the key the ticket names, made for the empty account (a resume
        /// claims none; the server finds it).
        proof: KeyProof,
    },
    /// The client's own addresses (it learns its observed one in the answer).
    CheckIn {
        /// The addresses its mesh socket is bound to, as it sees them.
        local: Vec<SocketAddr>,
        /// The mesh socket's port, for the server to pair with the address it observes.
        mesh_port: u16,
        /// The mesh socket's address as a relay observed it (its NAT mapping), once one has.
        /// The server takes it as the client's observed address when its IP is the one the
        /// server sees the client at, so that peers punch towards the mapping the mesh
        /// socket really has rather than a guess from the control connection's.
        reflexive: Option<SocketAddr>,
    },
    /// Round-trip times to relays it measured, microseconds.
    RelayRtts(Vec<(NodeId, u32)>),
    /// The key that seals the player's published stream (relay fan-out), for the server to
    /// give its watchers. A new key replaces the old one.
    StreamKey([u8; 32]),
    /// The periodic report.
    Report(Box<Report>),
    /// Nothing to say; the connection is alive.
    Keepalive,
    /// Leaving.
    SignOut,
}

/// Why the control server refused a message or a client. Displayed in words, for errors and
/// logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Unknown account or wrong password.
    #[error("wrong account or password")]
    BadCredentials,
    /// The key proof's signature or time is wrong.
    #[error("the key proof's signature or time is wrong")]
    BadProof,
    /// The session ticket is forged, expired or for another key.
    #[error("the session ticket is forged, expired or for another key")]
    BadTicket,
    /// A message that needs a signed-in client came before sign-in.
    #[error("not signed in")]
    NotSignedIn,
    /// The frame could not be decoded or was too large.
    #[error("malformed message")]
    Malformed,
    /// Too many attempts; try again later.
    #[error("too many attempts; try again later")]
    RateLimited,
    /// The client's reports were implausible too often.
    #[error("reported movement was implausible too often")]
    Implausible,
    /// The build hash is not on the allow-list.
    #[error("this build is not allowed")]
    UnknownBuild,
}

/// A relay a client may use, with the control server's latency estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The relay's node id.
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Estimated RTT through it between the two sides of an introduction (or from the
    /// client, in a welcome), microseconds; 0 if unknown.
    pub rtt_us: u32,
}

/// A route through several relays, as the receiver of an introduction uses it: the first relay
/// is one it is bound to, the last one its neighbour is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The relays in order.
    pub relays: Vec<NodeId>,
    /// Estimated round-trip time between the two players along it, microseconds.
    pub rtt_us: u32,
}

/// What a client needs to reach a neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    /// The neighbour's long-term key.
    pub peer_key: PublicKey,
    /// Its address as the control server observed it.
    pub observed: Option<SocketAddr>,
    /// Its own addresses.
    pub local: Vec<SocketAddr>,
    /// Relays for the pair, best first; `rtt_us` is the estimated round trip between the
    /// two players through it.
    pub relays: Vec<RelayInfo>,
    /// Routes through two relays (one near each player, over the relays' own link) that the
    /// relay map estimates to be faster than any single relay, best first.
    pub routes: Vec<RouteInfo>,
    /// VCs to open: id and the SDK's 16-byte profile.
    pub profiles: Vec<(u32, [u8; 16])>,
}

/// What a watcher needs to receive a player's published stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchGrant {
    /// The publisher.
    pub publisher: NodeId,
    /// Its long-term key.
    pub publisher_key: PublicKey,
    /// The relay that fans its stream out; the watcher binds to it if it is not yet.
    pub relay: RelayInfo,
    /// The subscription to present there (a `SignedSubscription`'s bytes).
    pub subscription: Vec<u8>,
    /// The key that seals the stream, once the publisher has given one.
    pub stream_key: Option<[u8; 32]>,
}

/// From the control server to a player's client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlToClient {
    /// Signed in (or resumed).
    Welcome {
        /// The session ticket (a `SignedTicket`'s bytes).
        session: Vec<u8>,
        /// The relay permit.
        permit: Vec<u8>,
        /// Relays to bind to, nearest first where known.
        relays: Vec<RelayInfo>,
        /// The server's clock.
        now: UnixTime,
    },
    /// The address the server saw the client's check-in come from.
    Observed(SocketAddr),
    /// A new neighbour.
    Introduce(Box<Introduction>),
    /// A neighbour that is no longer one.
    Farewell(NodeId),
    /// A fresh relay permit, before the old one lapses.
    Permit(Vec<u8>),
    /// Receive a player's published stream through its relay (or keep receiving it: the same
    /// grant again, renewed before its subscription lapses, or with a new key).
    Watch(Box<WatchGrant>),
    /// Stop receiving this player's stream.
    Unwatch(NodeId),
    /// How many players watch ours, and the relay to publish to; none means stop publishing.
    Audience {
        /// Watchers now.
        watchers: u32,
        /// Where to publish.
        relay: Option<RelayInfo>,
    },
    /// The hosting servers of the world and the zones they serve: sent after the welcome and
    /// again whenever one registers or goes.
    Hosting(Vec<crate::world::HostingInfo>),
    /// The message or client was refused; the server may close the connection after this.
    Refused(Refusal),
}

/// One of a client's connections, as it reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The peer.
    pub peer: NodeId,
    /// The VC id.
    pub vc: u32,
    /// 0 direct, 1 one relay, 2 several relays.
    pub path_kind: u8,
    /// Relays on the path in use.
    pub relays: Vec<NodeId>,
    /// Smoothed RTT, microseconds.
    pub rtt_us: u32,
    /// Loss, 0..1.
    pub loss: f32,
    /// Bytes per second sent and received.
    pub send_bps: u32,
    /// Bytes per second received.
    pub recv_bps: u32,
    /// Frames that failed authentication since the last report.
    pub auth_failures: u32,
}

/// What each client reports, continually.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Increases by one per report.
    pub seq: u64,
    /// The client's clock when it made the report, milliseconds. Kept as data: the server
    /// times movement by its own clock.
    pub unix_ms: u64,
    /// A short status word of the game's (for example "playing", "loading").
    pub status: String,
    /// Application status and data, opaque to Shoal.
    pub app: Vec<u8>,
    /// Hash of the client build, checked against the allow-list.
    pub build_hash: [u8; 32],
    /// Where the character is.
    pub position: [f32; 3],
    /// The character's state, opaque to Shoal, persisted.
    pub character: Vec<u8>,
    /// Game state, opaque to Shoal.
    pub game: Vec<u8>,
    /// Each open connection.
    pub links: Vec<LinkReport>,
    /// Peers whose connection was lost since the last report.
    pub lost: Vec<NodeId>,
    /// The newest avatar position received from each neighbour since the last report: what
    /// the control server compares with that neighbour's own reports.
    pub observed: Vec<ObservedAvatar>,
}

/// A neighbour's avatar as an observer received it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObservedAvatar {
    /// The neighbour.
    pub peer: NodeId,
    /// How long before the report it arrived, milliseconds (on the observer's clock, so no
    /// clock needs to agree with another).
    pub age_ms: u32,
    /// Where it was.
    pub position: [f32; 3],
}

/// From a relay node to the control server (on connections with ALPN `shoal-relay/1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RelayToControl {
    /// A relay announcing itself; `proof` signs with the relay's key for the account
    /// [`RELAY_ACCOUNT`]. Only relays the control server is configured with are accepted.
    Register {
        /// Where clients reach it.
        addr: SocketAddr,
        /// Possession of the relay's key.
        proof: KeyProof,
    },
    /// RTTs to other relays, microseconds.
    PeerRtts(Vec<(NodeId, u32)>),
    /// Alive.
    Keepalive,
}

/// From the control server to a relay node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlToRelay {
    /// Registered (sent again with a fresh permit before the old one lapses, and whenever the
    /// set of relays changes); the relays to bind to and measure.
    Registered {
        /// Its permit.
        permit: Vec<u8>,
        /// Other relays.
        peers: Vec<RelayInfo>,
    },
    /// Refused.
    Refused(Refusal),
    /// Take a group's stream from another relay and fan it out to the members here: a
    /// subscription signed for this relay (the subscriber) at the publisher's relay. Sent again
    /// before it lapses while watchers near this relay need the stream.
    Feed {
        /// The encoded [`crate::SignedSubscription`].
        subscription: Vec<u8>,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::codec::{decode, encode};
    use proptest::prelude::*;

    fn report() -> Report {
        Report {
            seq: 7,
            unix_ms: 1_800_000_000_000,
            status: "playing".into(),
            app: vec![1, 2, 3],
            build_hash: [9; 32],
            position: [1.0, 2.0, -3.5],
            character: b"hp=10".to_vec(),
            game: vec![],
            links: vec![LinkReport {
                peer: NodeId([1; 8]),
                vc: 1,
                path_kind: 1,
                relays: vec![NodeId([2; 8])],
                rtt_us: 40_000,
                loss: 0.01,
                send_bps: 1000,
                recv_bps: 2000,
                auth_failures: 0,
            }],
            lost: vec![NodeId([3; 8])],
            observed: vec![ObservedAvatar { peer: NodeId([4; 8]), age_ms: 120, position: [1.0, 2.0, 3.0] }],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let id = Identity::from_seed([4; 32]);
        let proof = KeyProof { public_key: id.public_key(), unix_ms: 5, signature: id.sign(SIGN_IN_CONTEXT, b"m") };
        let up = [
            ClientToControl::SignIn { account: "ana".into(), password: "pw".into(), proof: proof.clone() },
            ClientToControl::Resume { session: vec![1; 124], proof },
            ClientToControl::CheckIn {
                local: vec!["10.0.0.2:4000".parse().unwrap()],
                mesh_port: 4000,
                reflexive: Some("203.0.113.9:61000".parse().unwrap()),
            },
            ClientToControl::RelayRtts(vec![(NodeId([1; 8]), 12_000)]),
            ClientToControl::Report(Box::new(report())),
            ClientToControl::Keepalive,
            ClientToControl::SignOut,
        ];
        for m in up {
            let f = encode(&m).unwrap();
            assert_eq!(decode::<ClientToControl>(&f, MAX_CONTROL_FRAME).unwrap(), m);
        }
        let intro = Introduction {
            peer_key: id.public_key(),
            observed: Some("203.0.113.5:6000".parse().unwrap()),
            local: vec![],
            relays: vec![RelayInfo { id: NodeId([5; 8]), addr: "198.51.100.1:7000".parse().unwrap(), rtt_us: 30_000 }],
            routes: vec![RouteInfo { relays: vec![NodeId([5; 8]), NodeId([6; 8])], rtt_us: 20_000 }],
            profiles: vec![(1, [1; 16])],
        };
        let down = [
            ControlToClient::Welcome { session: vec![1], permit: vec![2], relays: vec![], now: UnixTime(9) },
            ControlToClient::Observed("203.0.113.5:6000".parse().unwrap()),
            ControlToClient::Introduce(Box::new(intro)),
            ControlToClient::Farewell(NodeId([6; 8])),
            ControlToClient::Permit(vec![3]),
            ControlToClient::Refused(Refusal::BadCredentials),
        ];
        for m in down {
            let f = encode(&m).unwrap();
            assert_eq!(decode::<ControlToClient>(&f, MAX_CONTROL_FRAME).unwrap(), m);
        }
    }

    #[test]
    fn relay_messages_round_trip() {
        let id = Identity::from_seed([8; 32]);
        let up = [
            RelayToControl::Register {
                addr: "198.51.100.1:7000".parse().unwrap(),
                proof: KeyProof::new(&id, "relay", 5, &[1; 32]),
            },
            RelayToControl::PeerRtts(vec![(NodeId([1; 8]), 900)]),
            RelayToControl::Keepalive,
        ];
        for m in up {
            let f = encode(&m).unwrap();
            assert_eq!(decode::<RelayToControl>(&f, MAX_CONTROL_FRAME).unwrap(), m);
        }
        let down = [
            ControlToRelay::Registered { permit: vec![1; 124], peers: vec![] },
            ControlToRelay::Refused(Refusal::BadCredentials),
            ControlToRelay::Feed { subscription: vec![3; 120] },
        ];
        for m in down {
            let f = encode(&m).unwrap();
            assert_eq!(decode::<ControlToRelay>(&f, MAX_CONTROL_FRAME).unwrap(), m);
        }
    }

    #[test]
    fn truncated_frames_are_errors() {
        let f = encode(&ClientToControl::Report(Box::new(report()))).unwrap();
        for cut in 0..f.len() {
            assert!(decode::<ClientToControl>(&f[..cut], MAX_CONTROL_FRAME).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ClientToControl>(&b, MAX_CONTROL_FRAME);
            let _ = decode::<ControlToClient>(&b, MAX_CONTROL_FRAME);
            let _ = decode::<RelayToControl>(&b, MAX_CONTROL_FRAME);
        }
    }

    #[test]
    fn refusals_read_as_words() {
        assert_eq!(Refusal::BadCredentials.to_string(), "wrong account or password");
        for r in [
            Refusal::BadCredentials,
            Refusal::BadProof,
            Refusal::BadTicket,
            Refusal::NotSignedIn,
            Refusal::Malformed,
            Refusal::RateLimited,
            Refusal::Implausible,
            Refusal::UnknownBuild,
        ] {
            let words = r.to_string();
            assert_ne!(words, format!("{r:?}"));
            assert!(words.contains(' '), "{words}");
        }
    }
}
