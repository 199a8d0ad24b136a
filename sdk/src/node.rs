//! A node: one mesh endpoint, the peers it was introduced to, and every virtual connection it
//! holds with them. This is the SDK's core; the tokio driver and the simulator both run it.
//!
//! Each peer has one [`PathSet`] that all VCs with it share: one set of path measurements,
//! one hole-punching schedule and one set of pings per peer, however many VCs run over them.
//! The node sends the pings that cannot ride on data through one of the peer's VCs.
//!
//! Sans-IO, with the house call order: after [`Node::handle_datagram`],
//! [`Node::handle_timeout`], [`Node::open`], [`Node::send`] or [`Node::close`], drain
//! [`Node::poll_transmit`] and [`Node::poll_event`], then wait until [`Node::poll_timeout`] or
//! the next datagram.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use renet::Bytes;
use shoal_mesh::bind::Transmit;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::SendError;
use shoal_mesh::endpoint::{Endpoint, EndpointEvent, Envelope, Path, Received};
use shoal_mesh::wire::{MAX_DATAGRAM, SubscribeAck, VcId};
use shoal_protocol::{Identity, NodeId, PublicKey, SignedSubscription, SignedTicket};

use crate::crypto::TAG_LEN;
use crate::frame::{Frame, SEALED, SHORT, SHORT_HEADER_LEN};
use crate::path::{PathId, PathSet};
use crate::peer::Peer;
use crate::profile::Profile;
use crate::vc::{OpenError, VcEvent, VcSendError, VcStats, VirtualConnection, check_hello};

/// Most VCs a node holds with one peer; a peer's hellos past this are refused.
pub const MAX_VCS_PER_PEER: usize = 16;

/// Names one VC at a node: the peer and the VC id they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcKey {
    /// The peer.
    pub peer: NodeId,
    /// The VC id, the same on both sides.
    pub vc: VcId,
}

impl VcKey {
    fn first(peer: NodeId) -> VcKey {
        VcKey { peer, vc: VcId(0) }
    }

    fn last(peer: NodeId) -> VcKey {
        VcKey { peer, vc: VcId(u32::MAX) }
    }
}

/// What a node knows about a peer it may talk to (from an introduction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's long-term key.
    pub key: PublicKey,
    /// Candidate paths to it, in order of preference before anything is measured.
    pub paths: Vec<Path>,
}

/// Something that happened at the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Something happened on a VC.
    Vc(VcKey, VcEvent),
    /// A relay accepted our binding and saw us at `observed`.
    RelayBound {
        /// The relay.
        relay: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// Our address as it saw it.
        observed: SocketAddr,
    },
    /// A relay stopped answering.
    RelayLost {
        /// The relay.
        relay: NodeId,
        /// Its address.
        addr: SocketAddr,
    },
    /// A copy of a stream we subscribed to, from the relay that fans it out.
    Published {
        /// The publisher (vouched for by the relay, which checked its binding).
        publisher: NodeId,
        /// Its stream.
        stream: u16,
        /// The (sealed) payload.
        payload: Vec<u8>,
    },
    /// A relay answered a subscription we presented.
    Subscription {
        /// The relay.
        relay: NodeId,
        /// Its answer.
        ack: SubscribeAck,
    },
}

/// Datagrams the node refused before any VC saw them, and candidates it would not take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Hellos from nodes we were not introduced to.
    pub unknown_peer: u64,
    /// Short-form datagrams too short to hold a sealed frame, or for a short id no VC of
    /// ours holds.
    pub unknown_short: u64,
    /// Frames for a VC that does not exist and that are not a hello.
    pub unknown_vc: u64,
    /// Relayed frames that came from an address other than the route's relay.
    pub misrouted: u64,
    /// Hellos for a new VC that failed their check (key, signature, time, profile): forged,
    /// or broken. None of them created anything.
    pub bad_hellos: u64,
    /// Hellos for a new VC no newer than one already taken for that VC id: replays.
    pub replayed_hellos: u64,
    /// Hellos for a new VC dropped unchecked: the peer's id was past its budget of checks.
    pub hello_flood: u64,
    /// Hellos for a new VC past [`MAX_VCS_PER_PEER`].
    pub too_many_vcs: u64,
    /// Frames the node could not send (first relay not bound, too large).
    pub send_failures: u64,
    /// Candidate paths refused: past the bound on introduced or learned paths.
    pub paths_refused: u64,
    /// Learned paths that gave way to a newer one.
    pub paths_evicted: u64,
}

/// Datagrams and bytes (UDP payload) the node sent and received, split into what carried the
/// game's messages and what is the mesh's own overhead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Datagrams that carried messages.
    pub data_datagrams: u64,
    /// Their bytes, headers included.
    pub data_bytes: u64,
    /// Bytes inside those that are measurement and acks riding along.
    pub riding_bytes: u64,
    /// Datagrams that carried no message: hellos, pings and pongs on their own, acks, closes,
    /// advertisements, and the relay binds and keepalives.
    pub overhead_datagrams: u64,
    /// Their bytes.
    pub overhead_bytes: u64,
}

/// Bytes of IPv4 and UDP headers around every datagram, for what a node puts on the wire.
pub const IP_UDP_HEADERS: u64 = 28;

impl Traffic {
    /// Bytes on the wire: UDP payload and [`IP_UDP_HEADERS`] per datagram.
    pub fn on_the_wire(&self) -> u64 {
        self.data_bytes + self.overhead_bytes + IP_UDP_HEADERS * (self.data_datagrams + self.overhead_datagrams)
    }

    /// Bytes that are not payload: whole overhead datagrams and what rides on data.
    pub fn overhead(&self) -> u64 {
        self.overhead_bytes + self.riding_bytes
    }

    fn count(&mut self, len: usize, carries_data: bool, riding: usize) {
        if carries_data {
            self.data_datagrams += 1;
            self.data_bytes += len as u64;
            self.riding_bytes += riding as u64;
        } else {
            self.overhead_datagrams += 1;
            self.overhead_bytes += len as u64;
        }
    }
}

/// Why a VC could not be opened or used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// No [`PeerInfo`] for the peer.
    #[error("no introduction for peer {0}")]
    UnknownPeer(NodeId),
    /// No such VC.
    #[error("no virtual connection {0:?}")]
    UnknownVc(VcKey),
    /// A VC with this key is already open.
    #[error("virtual connection {0:?} already exists")]
    Exists(VcKey),
    /// The peer already has [`MAX_VCS_PER_PEER`] VCs.
    #[error("peer {0} already has {MAX_VCS_PER_PEER} virtual connections")]
    TooMany(NodeId),
    /// Opening failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The VC refused the message.
    #[error(transparent)]
    Send(#[from] VcSendError),
}

/// One node. See the module docs.
#[derive(Debug)]
pub struct Node {
    identity: Identity,
    clock: WallClock,
    endpoint: Endpoint,
    peers: BTreeMap<NodeId, Peer>,
    vcs: BTreeMap<VcKey, VirtualConnection>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    counters: NodeCounters,
    sent: Traffic,
    received: Traffic,
    /// Our VCs by the short id the peers send short-form datagrams to.
    short_ids: BTreeMap<u32, VcKey>,
    next_short: u32,
}

impl Node {
    /// A node for `identity`, which shows `permit` to relays.
    pub fn new(identity: Identity, permit: SignedTicket, clock: WallClock) -> Node {
        Node {
            endpoint: Endpoint::new(identity.clone(), permit, clock),
            identity,
            clock,
            peers: BTreeMap::new(),
            vcs: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: NodeCounters::default(),
            sent: Traffic::default(),
            received: Traffic::default(),
            short_ids: BTreeMap::new(),
            next_short: 0,
        }
    }

    /// Gives the VC `key` a short id of its own (dropping the one a VC it replaced held): the
    /// VC tells the peer, whose direct frames then come in the short form.
    fn assign_short_id(&mut self, key: VcKey, replaced: Option<u32>) {
        if let Some(old) = replaced {
            self.short_ids.remove(&old);
        }
        let Some(vc) = self.vcs.get_mut(&key) else { return };
        // Ids are handed out in turn, skipping those in use; a node holds far fewer VCs than
        // there are ids.
        loop {
            self.next_short = self.next_short.wrapping_add(1);
            if !self.short_ids.contains_key(&self.next_short) {
                break;
            }
        }
        self.short_ids.insert(self.next_short, key);
        vc.set_short_id(self.next_short);
    }

    /// A short-form datagram (see [`crate::frame`]): the VC its id names takes it as a sealed
    /// frame that came directly from `from`.
    fn on_short(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let header = bytes.get(..SHORT_HEADER_LEN).filter(|_| bytes.len() >= SHORT_HEADER_LEN + 1 + TAG_LEN);
        let key = header.and_then(|h| self.short_ids.get(&u32::from_be_bytes([h[1], h[2], h[3], h[4]])).copied());
        let (Some(h), Some(key)) = (header, key) else {
            self.counters.unknown_short += 1;
            self.received.count(bytes.len(), false, 0);
            return;
        };
        let (Some(vc), Some(p)) = (self.vcs.get_mut(&key), self.peers.get_mut(&key.peer)) else {
            self.counters.unknown_short += 1;
            self.received.count(bytes.len(), false, 0);
            return;
        };
        let pn = expand_pn(vc.highest_received_pn(), u16::from_be_bytes([h[5], h[6]]));
        let mut frame = Vec::with_capacity(bytes.len() + 2);
        frame.push(SEALED);
        frame.extend_from_slice(&pn.to_be_bytes());
        frame.extend_from_slice(&bytes[SHORT_HEADER_LEN..]);
        let seen = vc.handle_frame(now, &mut p.paths, Path::Direct(from), None, &mut frame);
        if seen.genuine {
            p.heard = Some(now);
            vc.on_short_received();
        }
        self.received.count(bytes.len(), seen.carries_data, seen.riding);
        self.drain_vc(now, key);
        self.sync_peer(now, key.peer);
    }

    /// Our node id.
    pub fn id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// Our long-term public key.
    pub fn public_key(&self) -> PublicKey {
        self.identity.public_key()
    }

    /// The mesh endpoint underneath (bindings, observed address).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Starts binding to the relay at `addr`.
    pub fn add_relay(&mut self, now: Instant, addr: SocketAddr) {
        self.endpoint.add_relay(now, addr);
        self.drain_endpoint(now);
    }

    /// Tells the node its socket's address (the driver does, at start and after a move): the
    /// relay bindings compare it with where the relays see us, to tell whether a NAT is in
    /// front and how long its mappings live, and send keepalives no more often than that
    /// needs (see `shoal_mesh::bind`).
    pub fn set_local_addr(&mut self, local: SocketAddr) {
        self.endpoint.set_local_addr(local);
    }

    /// Our socket moved to another network or port (the driver rebound it): every relay is
    /// bound again from the new address and every path to every peer re-probed at once. The
    /// peers learn the new address from our authenticated frames, and from the advertisement
    /// sent once a relay reports where it sees us now.
    pub fn network_changed(&mut self, now: Instant) {
        self.endpoint.network_changed(now);
        for peer in self.peers.values_mut() {
            peer.paths.on_network_change(now);
        }
        self.drain_endpoint(now);
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.run_peer(now, peer, true);
        }
    }

    /// Records what we know of a peer; its paths join those VCs with it already use.
    pub fn add_peer(&mut self, now: Instant, info: PeerInfo) {
        let peer = info.key.node_id();
        let keeper = self.id() < peer;
        let p = self.peers.entry(peer).or_insert_with(|| Peer::new(info.key, PathSet::new(keeper)));
        p.key = info.key;
        for path in &info.paths {
            p.paths.introduce(now, *path);
        }
    }

    /// Forgets a peer (the control server's farewell): closes every VC with it, telling the
    /// peer, and refuses its hellos from now on. Returns the VCs that were closed.
    pub fn remove_peer(&mut self, now: Instant, peer: NodeId) -> Vec<VcKey> {
        let keys: Vec<VcKey> = self.vcs.range(VcKey::first(peer)..=VcKey::last(peer)).map(|(k, _)| *k).collect();
        for &key in &keys {
            self.close(now, key);
        }
        self.peers.remove(&peer);
        keys
    }

    /// Whether we know a peer.
    pub fn knows(&self, peer: NodeId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Replaces our relay permit (renewed by the control server); every relay binding is
    /// proved again with it.
    pub fn set_permit(&mut self, now: Instant, permit: SignedTicket) {
        self.endpoint.set_permit(now, permit);
        self.drain_endpoint(now);
    }

    /// Opens VC `vc` to `peer` with `profile`. The peer opens the same VC when our hello
    /// arrives (or when it opens it too, as both sides of an introduction do).
    pub fn open(&mut self, now: Instant, peer: NodeId, vc: VcId, profile: Profile) -> Result<VcKey, NodeError> {
        let key = VcKey { peer, vc };
        if self.vcs.get(&key).is_some_and(|v| !v.is_closed()) {
            return Err(NodeError::Exists(key));
        }
        let p = self.peers.get(&peer).ok_or(NodeError::UnknownPeer(peer))?;
        if self.vc_count(peer) >= MAX_VCS_PER_PEER {
            return Err(NodeError::TooMany(peer));
        }
        let v = VirtualConnection::new(now, self.identity.clone(), self.clock, p.key, vc, profile)?;
        let replaced = self.vcs.insert(key, v).and_then(|old| old.short_id());
        self.assign_short_id(key, replaced);
        Ok(key)
    }

    fn vc_count(&self, peer: NodeId) -> usize {
        self.vcs.range(VcKey::first(peer)..=VcKey::last(peer)).filter(|(_, v)| !v.is_closed()).count()
    }

    /// Queues a message on a VC.
    pub fn send(&mut self, key: VcKey, message: impl Into<Bytes>) -> Result<(), NodeError> {
        let vc = self.vcs.get_mut(&key).ok_or(NodeError::UnknownVc(key))?;
        Ok(vc.send(message.into())?)
    }

    /// Bytes of headers a frame on the VC's primary path carries above UDP besides its items
    /// (see [`VirtualConnection::header_bytes`]), for upload budgets.
    pub fn header_bytes(&self, key: VcKey) -> Option<usize> {
        self.vcs.get(&key)?.header_bytes(&self.peers.get(&key.peer)?.paths)
    }

    /// The next message on a VC.
    pub fn recv(&mut self, key: VcKey) -> Option<Bytes> {
        self.vcs.get_mut(&key)?.recv()
    }

    /// Closes a VC and tells the peer.
    pub fn close(&mut self, now: Instant, key: VcKey) {
        if let (Some(vc), Some(peer)) = (self.vcs.get_mut(&key), self.peers.get_mut(&key.peer)) {
            vc.close(&peer.paths);
            if let Some(ms) = vc.peer_hello_ms() {
                peer.took_hello(key.vc, ms);
            }
        }
        self.drain_vc(now, key);
    }

    /// What a VC measures.
    pub fn stats(&self, now: Instant, key: VcKey) -> Option<VcStats> {
        let peer = self.peers.get(&key.peer)?;
        Some(self.vcs.get(&key)?.stats(now, &peer.paths))
    }

    /// The VCs this node holds, open or closing.
    pub fn vcs(&self) -> impl Iterator<Item = VcKey> + '_ {
        self.vcs.keys().copied()
    }

    /// Datagrams refused before reaching a VC, and candidates refused or replaced.
    pub fn counters(&self) -> NodeCounters {
        let mut c = self.counters;
        c.misrouted = self.endpoint.counters().misrouted;
        for p in self.peers.values() {
            let pc = p.paths.counters();
            c.paths_refused += pc.refused;
            c.paths_evicted += pc.evicted;
        }
        c
    }

    /// What the node sent and received so far, payload and overhead apart.
    pub fn traffic(&self) -> (Traffic, Traffic) {
        (self.sent, self.received)
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if bytes.first() == Some(&SHORT) {
            self.on_short(now, from, bytes);
            return;
        }
        self.endpoint.handle_datagram(now, from, bytes);
        let before = self.received;
        self.drain_endpoint(now);
        if self.received == before {
            // Not a VC frame: a bind or probe answer, a relay's notice, or something refused.
            self.received.count(bytes.len(), false, 0);
        }
    }

    /// Drives binds, the peers' pings, hellos, renet ticks and everything else that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        self.drain_endpoint(now);
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.run_peer(now, peer, false);
        }
        // Closed VCs have reported their closing; forget them.
        let peers = &mut self.peers;
        self.vcs.retain(|k, v| {
            if v.is_closed()
                && let (Some(p), Some(ms)) = (peers.get_mut(&k.peer), v.peer_hello_ms())
            {
                p.took_hello(k.vc, ms);
            }
            !v.is_closed()
        });
        let vcs = &self.vcs;
        self.short_ids.retain(|_, k| vcs.contains_key(k));
    }

    /// Runs what is due for one peer: its paths' timers and pings, then its VCs (all of them
    /// when the paths were due or `all`, since the paths' state feeds their choices).
    fn run_peer(&mut self, now: Instant, peer: NodeId, all: bool) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let paths_due = p.paths.poll_timeout(now).is_some_and(|t| t <= now);
        if paths_due {
            p.paths.handle_timeout(now);
            self.send_pings(now, peer);
        }
        let keys: Vec<VcKey> = self.vcs.range(VcKey::first(peer)..=VcKey::last(peer)).map(|(k, _)| *k).collect();
        for key in keys {
            let (Some(vc), Some(p)) = (self.vcs.get_mut(&key), self.peers.get_mut(&peer)) else { continue };
            if all || paths_due || vc.poll_timeout(now, &p.paths, p.heard).is_some_and(|t| t <= now) {
                vc.handle_timeout(now, &mut p.paths, p.heard);
            }
            self.drain_vc(now, key);
        }
        self.sync_peer(now, peer);
    }

    /// Sends the peer's pings that could not ride on data, each through one of its VCs: one
    /// that paces its sending on that path (its pacer counts the bytes before the ping), else
    /// one that sends on it, else the first that holds keys.
    fn send_pings(&mut self, now: Instant, peer: NodeId) {
        loop {
            let Some(p) = self.peers.get_mut(&peer) else { return };
            let Some(ping) = p.paths.poll_ping() else { return };
            let range = VcKey::first(peer)..=VcKey::last(peer);
            let carrier = {
                let with_keys = || self.vcs.range(range.clone()).filter(|(_, v)| v.has_keys());
                let on = |v: &VirtualConnection| v.sending().contains(&ping.path);
                with_keys()
                    .find(|(_, v)| v.paced() && on(v))
                    .or_else(|| with_keys().find(|(_, v)| on(v)))
                    .or_else(|| with_keys().next())
                    .map(|(k, _)| *k)
            };
            let Some(key) = carrier else { continue };
            if let (Some(vc), Some(p)) = (self.vcs.get_mut(&key), self.peers.get(&peer)) {
                vc.send_ping(now, &p.paths, ping.path, ping.id, ping.urgent);
            }
            self.drain_vc(now, key);
        }
    }

    /// Tells the peer's paths which of them its VCs use and whether pings can go, and has the
    /// VCs forget candidates that were replaced.
    fn sync_peer(&mut self, now: Instant, peer: NodeId) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let range = VcKey::first(peer)..=VcKey::last(peer);
        let (mut used, mut paced) = (0u64, 0u64);
        let mut armed = false;
        for (_, v) in self.vcs.range(range.clone()) {
            armed |= v.has_keys();
            for id in v.sending() {
                used |= 1 << (id.0 % 64);
                if v.paced() {
                    paced |= 1 << (id.0 % 64);
                }
            }
        }
        p.paths.set_armed(armed);
        let bit = |mask: u64| move |id: PathId| mask & (1 << (id.0 % 64)) != 0;
        p.paths.set_in_use(now, bit(used), bit(paced));
        let evicted = p.paths.take_evicted();
        if evicted.is_empty() {
            return;
        }
        let keys: Vec<VcKey> = self.vcs.range(range).map(|(k, _)| *k).collect();
        for key in keys {
            if let (Some(vc), Some(p)) = (self.vcs.get_mut(&key), self.peers.get(&peer)) {
                for &id in &evicted {
                    vc.forget_path(now, &p.paths, id);
                }
            }
            self.drain_vc(now, key);
        }
    }

    /// When [`Node::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if self.vcs.values().any(VirtualConnection::is_closed) {
            // Closed VCs are forgotten on the next timeout.
            return Some(now);
        }
        let peers = self.peers.values().filter_map(|p| p.paths.poll_timeout(now));
        let vcs = self.vcs.iter().filter_map(|(k, v)| {
            let p = self.peers.get(&k.peer)?;
            v.poll_timeout(now, &p.paths, p.heard)
        });
        self.endpoint.poll_timeout().into_iter().chain(peers).chain(vcs).min()
    }

    /// Presents `subscription` to the relay it names (which must hold our binding), or with
    /// `leave` leaves its group; the answer comes as [`Event::Subscription`].
    pub fn subscribe(&mut self, now: Instant, subscription: &SignedSubscription, leave: bool) -> Result<(), SendError> {
        self.endpoint.subscribe(now, subscription, leave)?;
        self.drain_endpoint(now);
        Ok(())
    }

    /// Publishes `payload` on our `stream` through `relay`, which copies it to its members.
    /// Counted as data: it is the game's.
    pub fn publish(&mut self, now: Instant, relay: NodeId, stream: u16, payload: &[u8]) -> Result<(), SendError> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let (to, len) = self.endpoint.encode_publish(now, relay, stream, true, payload, &mut buf)?;
        self.sent.count(len, true, 0);
        self.transmits.push_back(Transmit { to, bytes: buf[..len].to_vec() });
        Ok(())
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn drain_endpoint(&mut self, now: Instant) {
        while let Some(t) = self.endpoint.poll_transmit() {
            self.sent.count(t.bytes.len(), false, 0);
            self.transmits.push_back(t);
        }
        while let Some(e) = self.endpoint.poll_event() {
            match e {
                EndpointEvent::Received(r) => self.on_received(now, r),
                EndpointEvent::RelayBound { relay, addr, observed, moved } => {
                    self.events.push_back(Event::RelayBound { relay, addr, observed });
                    if moved {
                        self.on_moved(now, observed);
                    }
                }
                EndpointEvent::RelayLost { relay, addr } => self.events.push_back(Event::RelayLost { relay, addr }),
                EndpointEvent::Published(r) => {
                    self.received.count(r.datagram_len, true, 0);
                    let (publisher, stream) = (r.source, r.vc.0 as u16);
                    self.events.push_back(Event::Published { publisher, stream, payload: r.payload });
                }
                EndpointEvent::Subscription { relay, ack } => self.events.push_back(Event::Subscription { relay, ack }),
                EndpointEvent::ProbeDone(_) | EndpointEvent::ProbeLost { .. } | EndpointEvent::Notice { .. } => {}
            }
        }
    }

    /// A relay sees us at a new address: our NAT mapping changed (it expired, the NAT
    /// rebound us, or our network changed). One VC per peer tells it, so peers behind NATs
    /// that only admit addresses they have sent to punch towards the new one, and every path
    /// is punched afresh from our side.
    fn on_moved(&mut self, now: Instant, observed: SocketAddr) {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.paths.on_network_change(now);
            }
            let carrier =
                self.vcs.range(VcKey::first(peer)..=VcKey::last(peer)).find(|(_, v)| !v.is_closed()).map(|(k, _)| *k);
            if let Some(key) = carrier {
                if let Some(vc) = self.vcs.get_mut(&key) {
                    vc.advertise(now, &[observed]);
                }
                self.drain_vc(now, key);
            }
        }
    }

    fn on_received(&mut self, now: Instant, mut r: Received) {
        let datagram_len = r.datagram_len;
        let path = if r.route.is_empty() { Path::Direct(r.from) } else { Path::Relayed(r.route.reversed()) };
        let key = VcKey { peer: r.source, vc: r.vc };
        if !self.vcs.contains_key(&key) {
            self.accept_hello(now, key, path, &r.payload);
            self.received.count(datagram_len, false, 0);
            return;
        }
        let hops = r.trace.map(|t| t.hop_latencies());
        let (Some(vc), Some(p)) = (self.vcs.get_mut(&key), self.peers.get_mut(&key.peer)) else { return };
        let seen = vc.handle_frame(now, &mut p.paths, path, hops, &mut r.payload);
        if seen.genuine {
            p.heard = Some(now);
        }
        self.received.count(datagram_len, seen.carries_data, seen.riding);
        self.drain_vc(now, key);
        self.sync_peer(now, key.peer);
    }

    /// A frame for a VC we do not hold: if it is a hello from an introduced peer that passes
    /// every check, the VC is created and the hello taken. Anything else costs a counter and
    /// creates nothing.
    fn accept_hello(&mut self, now: Instant, key: VcKey, path: Path, payload: &[u8]) {
        let Ok(Frame::Hello(h, sig)) = Frame::parse(payload) else {
            self.counters.unknown_vc += 1;
            return;
        };
        let count = self.vc_count(key.peer);
        let me = self.id();
        let Some(p) = self.peers.get_mut(&key.peer) else {
            self.counters.unknown_peer += 1;
            return;
        };
        if !p.allow_hello_check(now) {
            self.counters.hello_flood += 1;
            return;
        }
        let profile = match check_hello(me, &self.clock, now, p.key, key.vc, &h, &sig) {
            Ok(profile) => profile,
            Err(e) => {
                tracing::debug!(peer = %key.peer, vc = key.vc.0, "hello refused: {e}");
                self.counters.bad_hellos += 1;
                return;
            }
        };
        if !p.is_fresh(key.vc, h.unix_ms) {
            self.counters.replayed_hellos += 1;
            return;
        }
        if count >= MAX_VCS_PER_PEER {
            self.counters.too_many_vcs += 1;
            return;
        }
        let vc = match VirtualConnection::new(now, self.identity.clone(), self.clock, p.key, key.vc, profile) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(peer = %key.peer, vc = key.vc.0, "opening a VC for a hello: {e}");
                self.counters.bad_hellos += 1;
                return;
            }
        };
        p.took_hello(key.vc, h.unix_ms);
        p.heard = Some(now);
        let vc = self.vcs.entry(key).or_insert(vc);
        vc.handle_checked_hello(now, &p.paths, path, h);
        self.assign_short_id(key, None);
        self.drain_vc(now, key);
        self.sync_peer(now, key.peer);
    }

    fn drain_vc(&mut self, now: Instant, key: VcKey) {
        let (Some(vc), Some(p)) = (self.vcs.get_mut(&key), self.peers.get_mut(&key.peer)) else { return };
        let mut buf = [0u8; MAX_DATAGRAM];
        while let Some(t) = vc.poll_transmit() {
            if let (Path::Direct(to), Some(short), Some((&SEALED, rest))) =
                (t.path, vc.short_peer(), t.frame.split_first())
                && rest.len() >= 8
            {
                // The short form: the peer's id for the VC and the packet number's low 16
                // bits in place of the mesh header and the frame's type and packet number.
                let mut bytes = Vec::with_capacity(SHORT_HEADER_LEN + rest.len() - 8);
                bytes.push(SHORT);
                bytes.extend_from_slice(&short.to_be_bytes());
                bytes.extend_from_slice(&rest[6..]);
                self.sent.count(bytes.len(), t.carries_data, t.riding);
                self.transmits.push_back(Transmit { to, bytes });
                continue;
            }
            let env = Envelope { destination: key.peer, path: t.path, vc: key.vc, trace: t.trace };
            match self.endpoint.encode_data(now, &env, &t.frame, &mut buf) {
                Ok((to, len)) => {
                    self.sent.count(len, t.carries_data, t.riding);
                    self.transmits.push_back(Transmit { to, bytes: buf[..len].to_vec() });
                }
                Err(_) => {
                    self.counters.send_failures += 1;
                    vc.on_unusable(&mut p.paths, &t.path);
                }
            }
        }
        while let Some(e) = vc.poll_event() {
            self.events.push_back(Event::Vc(key, e));
        }
    }
}

/// The full packet number a short-form datagram's low 16 bits stand for: the one nearest the
/// next expected (one past `highest`) with those bits, as QUIC decodes its packet numbers.
fn expand_pn(highest: Option<u64>, low: u16) -> u64 {
    const WINDOW: u64 = 1 << 16;
    let expected = highest.map_or(0, |h| h.saturating_add(1));
    let candidate = (expected & !(WINDOW - 1)) | u64::from(low);
    if candidate.saturating_add(WINDOW / 2) <= expected {
        candidate.saturating_add(WINDOW)
    } else if candidate > expected.saturating_add(WINDOW / 2) && candidate >= WINDOW {
        candidate - WINDOW
    } else {
        candidate
    }
}
