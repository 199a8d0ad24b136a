//! A node: one mesh endpoint and every virtual connection it holds. This is the SDK's core;
//! the tokio driver and the simulator both run it.
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
use shoal_mesh::endpoint::{Endpoint, EndpointEvent, Envelope, Path, Received};
use shoal_mesh::wire::{MAX_DATAGRAM, VcId};
use shoal_protocol::{Identity, NodeId, PublicKey, SignedTicket};

use crate::frame::Frame;
use crate::profile::{Profile, ProfileConfig};
use crate::vc::{OpenError, VcEvent, VcSendError, VcStats, VirtualConnection};

/// Names one VC at a node: the peer and the VC id they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcKey {
    /// The peer.
    pub peer: NodeId,
    /// The VC id, the same on both sides.
    pub vc: VcId,
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
}

/// Datagrams the node refused before any VC saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Hellos from nodes we were not introduced to.
    pub unknown_peer: u64,
    /// Frames for a VC that does not exist and that are not a hello.
    pub unknown_vc: u64,
    /// Relayed frames that came from an address other than the route's relay.
    pub misrouted: u64,
    /// Hellos that could not open a VC (bad profile, key failure).
    pub refused_hellos: u64,
    /// Frames the node could not send (first relay not bound, too large).
    pub send_failures: u64,
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
    peers: BTreeMap<NodeId, PeerInfo>,
    vcs: BTreeMap<VcKey, VirtualConnection>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    counters: NodeCounters,
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
        }
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
    /// bound again from the new address and every VC re-probes its paths at once. The peers
    /// learn the new address from our authenticated frames, and from the advertisement each
    /// VC sends once a relay reports where it sees us now.
    pub fn network_changed(&mut self, now: Instant) {
        self.endpoint.network_changed(now);
        for vc in self.vcs.values_mut() {
            vc.on_network_change(now);
        }
        self.drain_endpoint(now);
        let keys: Vec<VcKey> = self.vcs.keys().copied().collect();
        for key in keys {
            self.drain_vc(now, key);
        }
    }

    /// Records what we know of a peer, and offers its paths to VCs already open with it.
    pub fn add_peer(&mut self, now: Instant, info: PeerInfo) {
        let peer = info.key.node_id();
        for (k, vc) in self.vcs.range_mut(VcKey { peer, vc: VcId(0) }..=VcKey { peer, vc: VcId(u32::MAX) }) {
            debug_assert_eq!(k.peer, peer);
            for p in &info.paths {
                vc.add_path(now, *p);
            }
        }
        self.peers.insert(peer, info);
    }

    /// Forgets a peer (the control server's farewell): closes every VC with it, telling the
    /// peer, and refuses its hellos from now on. Returns the VCs that were closed.
    pub fn remove_peer(&mut self, now: Instant, peer: NodeId) -> Vec<VcKey> {
        self.peers.remove(&peer);
        let keys: Vec<VcKey> =
            self.vcs.range(VcKey { peer, vc: VcId(0) }..=VcKey { peer, vc: VcId(u32::MAX) }).map(|(k, _)| *k).collect();
        for &key in &keys {
            self.close(now, key);
        }
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
        let v = self.new_vc(now, key, profile)?;
        self.vcs.insert(key, v);
        Ok(key)
    }

    /// Queues a message on a VC.
    pub fn send(&mut self, key: VcKey, message: impl Into<Bytes>) -> Result<(), NodeError> {
        let vc = self.vcs.get_mut(&key).ok_or(NodeError::UnknownVc(key))?;
        Ok(vc.send(message.into())?)
    }

    /// The next message on a VC.
    pub fn recv(&mut self, key: VcKey) -> Option<Bytes> {
        self.vcs.get_mut(&key)?.recv()
    }

    /// Closes a VC and tells the peer.
    pub fn close(&mut self, now: Instant, key: VcKey) {
        if let Some(vc) = self.vcs.get_mut(&key) {
            vc.close();
        }
        self.drain_vc(now, key);
    }

    /// What a VC measures.
    pub fn stats(&self, now: Instant, key: VcKey) -> Option<VcStats> {
        Some(self.vcs.get(&key)?.stats(now))
    }

    /// The VCs this node holds, open or closing.
    pub fn vcs(&self) -> impl Iterator<Item = VcKey> + '_ {
        self.vcs.keys().copied()
    }

    /// Datagrams refused before reaching a VC.
    pub fn counters(&self) -> &NodeCounters {
        &self.counters
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.endpoint.handle_datagram(now, from, bytes);
        self.drain_endpoint(now);
    }

    /// Drives binds, probes, hellos, pings and renet ticks that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        self.drain_endpoint(now);
        let due: Vec<VcKey> =
            self.vcs.iter().filter(|(_, v)| v.poll_timeout(now).is_some_and(|t| t <= now)).map(|(k, _)| *k).collect();
        for key in due {
            if let Some(vc) = self.vcs.get_mut(&key) {
                vc.handle_timeout(now);
            }
            self.drain_vc(now, key);
        }
        // Closed VCs have reported their closing; forget them.
        self.vcs.retain(|_, v| !v.is_closed());
    }

    /// When [`Node::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let vcs = self.vcs.values().filter_map(|v| v.poll_timeout(now));
        self.endpoint.poll_timeout().into_iter().chain(vcs).min()
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

    /// A VC to an introduced peer, over the paths we were told of.
    fn new_vc(&self, now: Instant, key: VcKey, profile: Profile) -> Result<VirtualConnection, NodeError> {
        let info = self.peers.get(&key.peer).ok_or(NodeError::UnknownPeer(key.peer))?;
        let (id, clock) = (self.identity.clone(), self.clock);
        Ok(VirtualConnection::new(now, id, clock, info.key, key.vc, profile, &info.paths)?)
    }

    fn drain_endpoint(&mut self, now: Instant) {
        while let Some(t) = self.endpoint.poll_transmit() {
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
                EndpointEvent::ProbeDone(_) | EndpointEvent::ProbeLost { .. } | EndpointEvent::Notice { .. } => {}
            }
        }
    }

    /// A relay sees us at a new address: our NAT mapping changed (it expired, the NAT
    /// rebound us, or our network changed). Every VC tells its peer, so peers behind NATs
    /// that only admit addresses they have sent to punch towards the new one.
    fn on_moved(&mut self, now: Instant, observed: SocketAddr) {
        let keys: Vec<VcKey> = self.vcs.keys().copied().collect();
        for key in keys {
            if let Some(vc) = self.vcs.get_mut(&key) {
                vc.advertise(now, &[observed]);
            }
            self.drain_vc(now, key);
        }
    }

    fn on_received(&mut self, now: Instant, mut r: Received) {
        let path = if r.route.is_empty() {
            Path::Direct(r.from)
        } else {
            let back = r.route.reversed();
            // A relayed frame must come from the relay our own route starts with; anything
            // else is forged and must not count against that path.
            let first = back.relays()[0];
            if !self.endpoint.bound_relays().any(|(id, addr)| id == first && addr == r.from) {
                self.counters.misrouted += 1;
                return;
            }
            Path::Relayed(back)
        };
        let key = VcKey { peer: r.source, vc: r.vc };
        if !self.vcs.contains_key(&key) {
            let Ok(Frame::Hello(h, _)) = Frame::parse(&r.payload) else {
                self.counters.unknown_vc += 1;
                return;
            };
            if !self.peers.contains_key(&r.source) {
                self.counters.unknown_peer += 1;
                return;
            }
            let profile = match ProfileConfig::from_wire(&h.profile).and_then(|c| Profile::from_config(&c)) {
                Ok(p) => p,
                Err(_) => {
                    self.counters.refused_hellos += 1;
                    return;
                }
            };
            let vc = self.new_vc(now, key, profile);
            match vc {
                Ok(v) => {
                    self.vcs.insert(key, v);
                }
                Err(_) => {
                    self.counters.refused_hellos += 1;
                    return;
                }
            }
        }
        let hops = r.trace.map(|t| t.hop_latencies());
        if let Some(vc) = self.vcs.get_mut(&key) {
            vc.handle_frame(now, path, hops, &mut r.payload);
        }
        self.drain_vc(now, key);
    }

    fn drain_vc(&mut self, now: Instant, key: VcKey) {
        let Some(vc) = self.vcs.get_mut(&key) else { return };
        let mut buf = [0u8; MAX_DATAGRAM];
        while let Some(t) = vc.poll_transmit() {
            let env = Envelope { destination: key.peer, path: t.path, vc: key.vc, trace: t.trace };
            match self.endpoint.encode_data(now, &env, &t.frame, &mut buf) {
                Ok((to, len)) => self.transmits.push_back(Transmit { to, bytes: buf[..len].to_vec() }),
                Err(_) => {
                    self.counters.send_failures += 1;
                    vc.on_unusable(&t.path);
                }
            }
        }
        while let Some(e) = vc.poll_event() {
            self.events.push_back(Event::Vc(key, e));
        }
    }
}
