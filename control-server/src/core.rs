//! The control server's logic, sans-IO: fed connections, decoded messages, sign-in verdicts and
//! the clock; it answers with messages to send, connections to close, sign-ins to check and
//! rows to persist. The QUIC driver and the tests run the same core.
//!
//! A connection signs in (a key proof, then the account check the driver runs through the
//! [`crate::auth::Authenticator`]) and gets its session ticket and relay permit. It checks in
//! with its addresses and learns the one the server observed. Its reports move it in the
//! [`Interest`] set, whose tick introduces neighbours and dismisses those that drift apart.
//! Reported movement faster than the game allows is flagged; a client flagged
//! [`CoreConfig::max_flags`] times is cut off and its permit is not renewed. Silence past
//! [`CoreConfig::presence_timeout`] counts as a lost connection.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glam::Vec3;
use rustc_hash::FxHashMap;
use shoal_protocol::control::{
    ClientToControl, ControlToClient, ControlToRelay, Introduction, KeyProof, RELAY_ACCOUNT, Refusal, RelayInfo,
    RelayToControl, Report, RouteInfo, SIGN_IN_CONTEXT,
};
use shoal_protocol::profile::ProfileConfig;
use shoal_protocol::{Identity, NodeId, PublicKey, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

use crate::interest::{Interest, InterestConfig, InterestError, InterestEvent};
use crate::store::{Character, ReportRow};

/// A connection's handle, chosen by the driver.
pub type ConnId = u64;

/// How the core behaves.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Session tickets last this long.
    pub session_ttl: Duration,
    /// Relay permits last this long; they are renewed when a third is left.
    pub permit_ttl: Duration,
    /// A key proof's clock may differ from ours by this much.
    pub proof_skew: Duration,
    /// A client silent this long is gone.
    pub presence_timeout: Duration,
    /// The fastest a character may move, units per second.
    pub max_speed: f32,
    /// Flags after which a client is cut off.
    pub max_flags: u32,
    /// Failed sign-ins on one connection before it is closed.
    pub max_sign_in_failures: u32,
    /// Introductions.
    pub interest: InterestConfig,
    /// Relays every client may use.
    pub relays: Vec<RelayInfo>,
    /// VCs each side of an introduction opens, by id; none leaves the choice to the client.
    pub profiles: Vec<(u32, ProfileConfig)>,
    /// Build hashes clients may run; empty accepts any.
    pub builds: Vec<[u8; 32]>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            session_ttl: Duration::from_secs(3600),
            permit_ttl: Duration::from_secs(600),
            proof_skew: Duration::from_secs(30),
            presence_timeout: Duration::from_secs(15),
            max_speed: 20.0,
            max_flags: 3,
            max_sign_in_failures: 5,
            interest: InterestConfig::default(),
            relays: Vec::new(),
            profiles: Vec::new(),
            builds: Vec::new(),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a message on a connection.
    Send(ConnId, ControlToClient),
    /// Check these credentials and answer with [`Core::on_verdict`].
    Verify {
        /// The connection.
        conn: ConnId,
        /// The account.
        account: String,
        /// The password.
        password: String,
    },
    /// Find the account whose character `node` last played (a resumed session's ticket names
    /// the key, not the account) and answer with [`Core::on_account`].
    FindAccount {
        /// The connection.
        conn: ConnId,
        /// The node resuming.
        node: NodeId,
    },
    /// Close the connection (after sending what is queued for it, which says why).
    Close(ConnId),
    /// Persist a character's latest state.
    SaveCharacter(Character),
    /// Send a message on a relay's connection.
    SendRelay(ConnId, ControlToRelay),
}

/// Counters of what the core refused and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreCounters {
    /// Sign-ins accepted (new or resumed).
    pub signed_in: u64,
    /// Of those, sessions resumed with a ticket.
    pub resumed: u64,
    /// Wrong account or password.
    pub bad_credentials: u64,
    /// Key proofs with a bad signature or time.
    pub bad_proofs: u64,
    /// Forged, expired or mismatched session tickets.
    pub bad_tickets: u64,
    /// Messages that need sign-in, before it.
    pub not_signed_in: u64,
    /// Frames that could not be decoded (reported by the driver).
    pub malformed: u64,
    /// Reports taken.
    pub reports: u64,
    /// Reports with implausible movement.
    pub implausible: u64,
    /// Builds not on the allow-list.
    pub unknown_builds: u64,
    /// Clients cut off for implausible reports.
    pub cut_off: u64,
    /// Clients gone silent.
    pub lost: u64,
    /// Introductions sent (one per side).
    pub introductions: u64,
    /// Farewells sent (one per side).
    pub farewells: u64,
    /// Relay registrations accepted.
    pub relays_registered: u64,
    /// Registrations from relays not in the configuration, or with a bad proof.
    pub relays_refused: u64,
    /// Connections closed because they did not read what the server sent them.
    pub overflowed: u64,
}

/// One player in the live-state API.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlayerState {
    /// Node id, hex.
    pub node: String,
    /// Account.
    pub account: String,
    /// Last plausible position.
    pub position: Option<[f32; 3]>,
    /// Address the server observed.
    pub observed: Option<SocketAddr>,
    /// The status word of its latest report.
    pub status: Option<String>,
    /// Implausible reports so far.
    pub flags: u32,
    /// Current neighbours, hex node ids.
    pub neighbours: Vec<String>,
}

/// One link a player reported, in the live-state API.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinkState {
    /// The reporting player, hex.
    pub from: String,
    /// The peer, hex.
    pub to: String,
    /// The VC id.
    pub vc: u32,
    /// "direct", "relayed" or "multi-relay".
    pub path: &'static str,
    /// Relays on the path, hex.
    pub relays: Vec<String>,
    /// RTT, milliseconds.
    pub rtt_ms: f32,
    /// Loss, 0..1.
    pub loss: f32,
    /// Bytes per second each way.
    pub send_bps: u32,
    /// Bytes per second received.
    pub recv_bps: u32,
}

/// The live state, as the dashboard reads it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Snapshot {
    /// Signed-in players.
    pub players: Vec<PlayerState>,
    /// Links from the players' latest reports.
    pub links: Vec<LinkState>,
    /// Known relays.
    pub relays: Vec<RelayState>,
}

/// A relay in the live-state API.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RelayState {
    /// Node id, hex.
    pub node: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it is registered now.
    pub registered: bool,
    /// Round-trip times to its peer relays as it measured them: node id hex, milliseconds.
    pub peers: Vec<(String, f32)>,
}

/// A signed-in player, as [`Core::player`] shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlayerView<'a> {
    /// Its account.
    pub account: &'a str,
    /// Its last plausible position.
    pub position: Option<[f32; 3]>,
    /// Its latest report.
    pub report: Option<&'a Report>,
    /// Implausible reports so far.
    pub flags: u32,
}

#[derive(Debug)]
struct Player {
    account: String,
    key: PublicKey,
    observed: Option<SocketAddr>,
    local: Vec<SocketAddr>,
    relay_rtts: FxHashMap<NodeId, u32>,
    /// Last accepted position and the client's time for it.
    position: Option<(Vec3, u64)>,
    flags: u32,
    permit_expires: UnixTime,
    last_report: Option<Report>,
}

#[derive(Debug)]
enum State {
    Connected,
    /// Key proven; the account check is with the driver.
    Verifying {
        key: PublicKey,
        account: String,
    },
    /// Ticket and key proven; the driver is finding the account.
    Resuming {
        key: PublicKey,
    },
    SignedIn(Box<Player>),
    /// A registered relay.
    Relay(NodeId),
}

#[derive(Debug)]
struct Conn {
    remote: SocketAddr,
    state: State,
    heard: Instant,
    failures: u32,
}

/// A relay of the relay map: configured, and registered while `conn` is set.
#[derive(Debug)]
struct RelayEntry {
    addr: SocketAddr,
    conn: Option<ConnId>,
    /// Its key, once it registered.
    key: Option<PublicKey>,
    /// Its RTTs to other relays, microseconds.
    peer_rtts: FxHashMap<NodeId, u32>,
    permit_expires: UnixTime,
}

/// The control server's core. See the module docs.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    identity: Identity,
    /// The server certificate's fingerprint, which key proofs are bound to.
    server_fingerprint: [u8; 32],
    conns: FxHashMap<ConnId, Conn>,
    by_node: FxHashMap<NodeId, ConnId>,
    interest: Interest,
    /// The relay map, keyed and ordered by node id.
    relays: BTreeMap<NodeId, RelayEntry>,
    outputs: VecDeque<Output>,
    rows: Vec<ReportRow>,
    counters: CoreCounters,
}

impl Core {
    /// A core that signs tickets as `identity` and binds proofs to `server_fingerprint`.
    pub fn new(cfg: CoreConfig, identity: Identity, server_fingerprint: [u8; 32]) -> Result<Core, InterestError> {
        let relays = cfg
            .relays
            .iter()
            .map(|r| {
                (
                    r.id,
                    RelayEntry {
                        addr: r.addr,
                        conn: None,
                        key: None,
                        peer_rtts: FxHashMap::default(),
                        permit_expires: UnixTime(0),
                    },
                )
            })
            .collect();
        Ok(Core {
            interest: Interest::new(cfg.interest)?,
            relays,
            cfg,
            identity,
            server_fingerprint,
            conns: FxHashMap::default(),
            by_node: FxHashMap::default(),
            outputs: VecDeque::new(),
            rows: Vec::new(),
            counters: CoreCounters::default(),
        })
    }

    /// The control key clients and relays verify tickets with.
    pub fn public_key(&self) -> PublicKey {
        self.identity.public_key()
    }

    /// Counters.
    pub fn counters(&self) -> CoreCounters {
        self.counters
    }

    /// Signed-in players.
    pub fn players(&self) -> usize {
        self.by_node.len()
    }

    /// A signed-in player, as the live-state API shows it.
    pub fn player(&self, node: NodeId) -> Option<PlayerView<'_>> {
        let p = self.signed_in(node)?;
        Some(PlayerView {
            account: &p.account,
            position: p.position.map(|(v, _)| v.to_array()),
            report: p.last_report.as_ref(),
            flags: p.flags,
        })
    }

    /// The live state: players, their reported links, relays.
    pub fn snapshot(&self) -> Snapshot {
        let hex = |n: NodeId| shoal_protocol::identity::to_hex(&n.0);
        let mut players = Vec::new();
        let mut links = Vec::new();
        let mut nodes: Vec<(&NodeId, &ConnId)> = self.by_node.iter().collect();
        nodes.sort();
        for (&node, conn) in nodes {
            let Some(Conn { state: State::SignedIn(p), .. }) = self.conns.get(conn) else { continue };
            players.push(PlayerState {
                node: hex(node),
                account: p.account.clone(),
                position: p.position.map(|(v, _)| v.to_array()),
                observed: p.observed,
                status: p.last_report.as_ref().map(|r| r.status.clone()),
                flags: p.flags,
                neighbours: self.interest.neighbours(node).map(hex).collect(),
            });
            for l in p.last_report.iter().flat_map(|r| &r.links) {
                links.push(LinkState {
                    from: hex(node),
                    to: hex(l.peer),
                    vc: l.vc,
                    path: match l.path_kind {
                        0 => "direct",
                        1 => "relayed",
                        _ => "multi-relay",
                    },
                    relays: l.relays.iter().map(|r| hex(*r)).collect(),
                    rtt_ms: l.rtt_us as f32 / 1000.0,
                    loss: l.loss,
                    send_bps: l.send_bps,
                    recv_bps: l.recv_bps,
                });
            }
        }
        let relays = self
            .relays
            .iter()
            .map(|(id, r)| {
                let mut peers: Vec<(String, f32)> =
                    r.peer_rtts.iter().map(|(p, us)| (hex(*p), *us as f32 / 1000.0)).collect();
                peers.sort_by(|a, b| a.0.cmp(&b.0));
                RelayState { node: hex(*id), addr: r.addr, registered: r.conn.is_some(), peers }
            })
            .collect();
        Snapshot { players, links, relays }
    }

    /// The next thing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Report rows waiting to be persisted.
    pub fn take_report_rows(&mut self) -> Vec<ReportRow> {
        std::mem::take(&mut self.rows)
    }

    /// A connection arrived from `remote`.
    pub fn on_connected(&mut self, now: Instant, conn: ConnId, remote: SocketAddr) {
        self.conns.insert(conn, Conn { remote, state: State::Connected, heard: now, failures: 0 });
    }

    /// A connection ended (closed by either side or lost).
    pub fn on_disconnected(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        if let State::Relay(id) = c.state
            && let Some(r) = self.relays.get_mut(&id)
            && r.conn == Some(conn)
        {
            r.conn = None;
        }
        if let State::SignedIn(p) = c.state {
            let node = p.key.node_id();
            if self.by_node.get(&node) == Some(&conn) {
                self.by_node.remove(&node);
                self.interest.remove(node);
                self.drain_interest();
            }
        }
    }

    /// `conn` stopped reading: what the server queued for it reached the driver's bound. It is
    /// closed like a client gone silent, and counted.
    pub fn on_overflow(&mut self, conn: ConnId) {
        if self.conns.contains_key(&conn) {
            self.counters.overflowed += 1;
            self.outputs.push_back(Output::Close(conn));
            self.on_disconnected(conn);
        }
    }

    /// A frame on `conn` could not be decoded.
    pub fn on_malformed(&mut self, conn: ConnId) {
        self.counters.malformed += 1;
        self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::Malformed)));
    }

    /// A decoded message arrived on `conn`.
    pub fn on_message(&mut self, now: Instant, unix: UnixTime, conn: ConnId, msg: ClientToControl) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.heard = now;
        let signed_in = matches!(c.state, State::SignedIn(_));
        match msg {
            // A connection signs in once; a second attempt on it changes nothing.
            ClientToControl::SignIn { .. } | ClientToControl::Resume { .. } if signed_in => {}
            ClientToControl::SignIn { account, password, proof } => {
                if !self.proof_ok(&account, &proof, unix) {
                    self.counters.bad_proofs += 1;
                    self.refuse(conn, Refusal::BadProof);
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = State::Verifying { key: proof.public_key, account: account.clone() };
                }
                self.outputs.push_back(Output::Verify { conn, account, password });
            }
            ClientToControl::Resume { session, proof } => {
                let ticket = SignedTicket::decode(&session)
                    .ok()
                    .and_then(|t| t.verify(&self.identity.public_key(), TicketKind::Session, Roles::CLIENT, unix).ok());
                let Some(t) = ticket else {
                    self.counters.bad_tickets += 1;
                    self.refuse(conn, Refusal::BadTicket);
                    return;
                };
                if t.body.public_key != proof.public_key {
                    self.counters.bad_tickets += 1;
                    self.refuse(conn, Refusal::BadTicket);
                    return;
                }
                // The proof shows the client holds the ticket's key (no account is claimed:
                // the server finds it).
                if !self.proof_ok("", &proof, unix) {
                    self.counters.bad_proofs += 1;
                    self.refuse(conn, Refusal::BadProof);
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = State::Resuming { key: proof.public_key };
                }
                self.outputs.push_back(Output::FindAccount { conn, node: proof.public_key.node_id() });
            }
            other if signed_in => self.on_signed_in_message(conn, unix, other),
            _ => {
                self.counters.not_signed_in += 1;
                self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::NotSignedIn)));
            }
        }
    }

    fn proof_ok(&self, account: &str, proof: &KeyProof, unix: UnixTime) -> bool {
        let now_ms = unix.0.saturating_mul(1000);
        if proof.unix_ms.abs_diff(now_ms) > self.cfg.proof_skew.as_millis() as u64 {
            return false;
        }
        let message = KeyProof::message(account, &proof.public_key, proof.unix_ms, &self.server_fingerprint);
        proof.public_key.verify(SIGN_IN_CONTEXT, &message, &proof.signature).is_ok()
    }

    fn refuse(&mut self, conn: ConnId, why: Refusal) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.failures += 1;
        if c.failures >= self.cfg.max_sign_in_failures {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::RateLimited)));
            self.outputs.push_back(Output::Close(conn));
        } else {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(why)));
        }
    }

    /// The driver's answer to [`Output::Verify`].
    pub fn on_verdict(&mut self, unix: UnixTime, conn: ConnId, accepted: Option<String>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let State::Verifying { key, account } = std::mem::replace(&mut c.state, State::Connected) else { return };
        match accepted {
            Some(name) if name == account => self.welcome(conn, unix, name, key),
            _ => {
                self.counters.bad_credentials += 1;
                self.refuse(conn, Refusal::BadCredentials);
            }
        }
    }

    /// The driver's answer to [`Output::FindAccount`]. A node with no saved character cannot
    /// resume; its client signs in again with its credentials.
    pub fn on_account(&mut self, unix: UnixTime, conn: ConnId, account: Option<String>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let State::Resuming { key } = std::mem::replace(&mut c.state, State::Connected) else { return };
        match account {
            Some(account) => {
                self.counters.resumed += 1;
                self.welcome(conn, unix, account, key);
            }
            None => {
                self.counters.bad_tickets += 1;
                self.refuse(conn, Refusal::BadTicket);
            }
        }
    }

    fn ticket(&self, kind: TicketKind, key: PublicKey, unix: UnixTime, ttl: Duration) -> SignedTicket {
        TicketBody::new(kind, key, Roles::CLIENT, unix, ttl.as_secs()).sign(&self.identity)
    }

    /// A message arrived on a relay's connection.
    pub fn on_relay_message(&mut self, now: Instant, unix: UnixTime, conn: ConnId, msg: RelayToControl) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.heard = now;
        let registered = match c.state {
            State::Relay(id) => Some(id),
            _ => None,
        };
        match (msg, registered) {
            (RelayToControl::Register { addr, proof }, None) => {
                let id = proof.public_key.node_id();
                if !self.proof_ok(RELAY_ACCOUNT, &proof, unix) || !self.relays.contains_key(&id) {
                    self.counters.relays_refused += 1;
                    let why = if self.relays.contains_key(&id) { Refusal::BadProof } else { Refusal::BadCredentials };
                    self.outputs.push_back(Output::SendRelay(conn, ControlToRelay::Refused(why)));
                    self.outputs.push_back(Output::Close(conn));
                    return;
                }
                // A relay that registers again (restart, new connection) replaces its old one.
                if let Some(old) = self.relays.get(&id).and_then(|r| r.conn)
                    && old != conn
                {
                    self.outputs.push_back(Output::Close(old));
                    self.on_disconnected(old);
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = State::Relay(id);
                }
                if let Some(r) = self.relays.get_mut(&id) {
                    r.addr = addr;
                    r.conn = Some(conn);
                    r.key = Some(proof.public_key);
                }
                self.counters.relays_registered += 1;
                // The newcomer learns the registered relays, and they learn it.
                let others: Vec<(NodeId, PublicKey)> = self
                    .relays
                    .iter()
                    .filter(|(_, r)| r.conn.is_some())
                    .filter_map(|(p, r)| Some((*p, r.key?)))
                    .collect();
                for (other, key) in others {
                    self.send_registered(other, key, unix);
                }
            }
            (RelayToControl::PeerRtts(rtts), Some(id)) => {
                if let Some(r) = self.relays.get_mut(&id) {
                    r.peer_rtts = rtts.into_iter().filter(|(p, _)| *p != id).take(64).collect();
                }
            }
            (RelayToControl::Keepalive, Some(_)) | (RelayToControl::Register { .. }, Some(_)) => {}
            (_, None) => {
                self.counters.not_signed_in += 1;
                self.outputs.push_back(Output::SendRelay(conn, ControlToRelay::Refused(Refusal::NotSignedIn)));
            }
        }
    }

    /// Tells a registered relay its permit and its peers (the other registered relays).
    fn send_registered(&mut self, id: NodeId, key: PublicKey, unix: UnixTime) {
        let permit = TicketBody::new(TicketKind::RelayPermit, key, Roles::RELAY, unix, self.cfg.permit_ttl.as_secs())
            .sign(&self.identity);
        let peers = self
            .relays
            .iter()
            .filter(|(p, r)| **p != id && r.conn.is_some())
            .map(|(p, r)| RelayInfo { id: *p, addr: r.addr, rtt_us: r.peer_rtts.get(&id).copied().unwrap_or(0) })
            .collect();
        let Some(r) = self.relays.get_mut(&id) else { return };
        r.permit_expires = permit.body.expires_at;
        if let Some(conn) = r.conn {
            let msg = ControlToRelay::Registered { permit: permit.encode().to_vec(), peers };
            self.outputs.push_back(Output::SendRelay(conn, msg));
        }
    }

    fn welcome(&mut self, conn: ConnId, unix: UnixTime, account: String, key: PublicKey) {
        let node = key.node_id();
        // A newer sign-in of the same node replaces the old connection.
        if let Some(old) = self.by_node.get(&node).copied()
            && old != conn
        {
            self.outputs.push_back(Output::Close(old));
            self.on_disconnected(old);
        }
        let session = self.ticket(TicketKind::Session, key, unix, self.cfg.session_ttl);
        let permit = self.ticket(TicketKind::RelayPermit, key, unix, self.cfg.permit_ttl);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.failures = 0;
        c.state = State::SignedIn(Box::new(Player {
            account,
            key,
            observed: None,
            local: Vec::new(),
            relay_rtts: FxHashMap::default(),
            position: None,
            flags: 0,
            permit_expires: permit.body.expires_at,
            last_report: None,
        }));
        self.by_node.insert(node, conn);
        self.counters.signed_in += 1;
        self.outputs.push_back(Output::Send(
            conn,
            ControlToClient::Welcome {
                session: session.encode().to_vec(),
                permit: permit.encode().to_vec(),
                relays: self.relay_list(),
                now: unix,
            },
        ));
    }

    fn on_signed_in_message(&mut self, conn: ConnId, unix: UnixTime, msg: ClientToControl) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let remote = c.remote;
        let State::SignedIn(p) = &mut c.state else { return };
        match msg {
            ClientToControl::CheckIn { local, mesh_port, reflexive } => {
                // A relay's observation of the mesh socket is its real mapping; a claim of
                // another IP is not taken (peers would be sent to punch at it).
                let observed = reflexive
                    .filter(|r| r.ip() == remote.ip())
                    .unwrap_or_else(|| SocketAddr::new(remote.ip(), mesh_port));
                p.observed = Some(observed);
                p.local = local.into_iter().take(8).collect();
                self.outputs.push_back(Output::Send(conn, ControlToClient::Observed(observed)));
            }
            ClientToControl::RelayRtts(rtts) => {
                p.relay_rtts = rtts.into_iter().take(32).collect();
            }
            ClientToControl::Report(report) => {
                self.counters.reports += 1;
                if !self.cfg.builds.is_empty() && !self.cfg.builds.contains(&report.build_hash) {
                    self.counters.unknown_builds += 1;
                    self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::UnknownBuild)));
                    self.outputs.push_back(Output::Close(conn));
                    return;
                }
                let pos = Vec3::from_array(report.position);
                let plausible = pos.is_finite()
                    && p.position.is_none_or(|(last, at)| {
                        let dt = report.unix_ms.saturating_sub(at) as f32 / 1000.0;
                        // A little slack for the clocks between reports.
                        last.distance(pos) <= self.cfg.max_speed * (dt + 0.25)
                    });
                let node = p.key.node_id();
                if plausible {
                    p.position = Some((pos, report.unix_ms));
                    self.outputs.push_back(Output::SaveCharacter(Character {
                        account: p.account.clone(),
                        node_id: node.0,
                        position: pos.as_dvec3().to_array(),
                        state: report.character.clone(),
                        updated_ms: (unix.0 * 1000) as i64,
                    }));
                } else {
                    p.flags += 1;
                    self.counters.implausible += 1;
                }
                let cut = p.flags >= self.cfg.max_flags;
                self.rows.push(ReportRow {
                    account: p.account.clone(),
                    node_id: node.0,
                    seq: report.seq as i64,
                    received_ms: (unix.0 * 1000) as i64,
                    status: report.status.clone(),
                    position: pos.as_dvec3().to_array(),
                    body: shoal_protocol::codec::encode(&report).unwrap_or_default(),
                });
                p.last_report = Some(*report);
                if plausible {
                    let _ = self.interest.update(node, pos);
                }
                if cut {
                    self.counters.cut_off += 1;
                    self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::Implausible)));
                    self.outputs.push_back(Output::Close(conn));
                    self.on_disconnected(conn);
                }
            }
            ClientToControl::SignOut => {
                self.outputs.push_back(Output::Close(conn));
                self.on_disconnected(conn);
            }
            ClientToControl::Keepalive | ClientToControl::SignIn { .. } | ClientToControl::Resume { .. } => {}
        }
    }

    /// Runs introductions, presence and permit renewal. Call it at the interest rate (a few
    /// times a second at most).
    pub fn tick(&mut self, now: Instant, unix: UnixTime) {
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.heard) > self.cfg.presence_timeout)
            .map(|(&id, _)| id)
            .collect();
        for conn in silent {
            self.counters.lost += 1;
            self.outputs.push_back(Output::Close(conn));
            self.on_disconnected(conn);
        }
        // Permits with a third of their life left are renewed, except for flagged clients.
        let renew_before = self.cfg.permit_ttl.as_secs() / 3;
        let mut renewals = Vec::new();
        for (&id, c) in &mut self.conns {
            if let State::SignedIn(p) = &mut c.state
                && p.flags == 0
                && p.permit_expires.0.saturating_sub(unix.0) <= renew_before
            {
                renewals.push((id, p.key));
                p.permit_expires = UnixTime(unix.0 + self.cfg.permit_ttl.as_secs());
            }
        }
        renewals.sort_by_key(|r| r.0);
        for (id, key) in renewals {
            let permit = self.ticket(TicketKind::RelayPermit, key, unix, self.cfg.permit_ttl);
            self.outputs.push_back(Output::Send(id, ControlToClient::Permit(permit.encode().to_vec())));
        }
        let relays: Vec<(NodeId, PublicKey)> = self
            .relays
            .iter()
            .filter(|(_, r)| r.conn.is_some() && r.permit_expires.0.saturating_sub(unix.0) <= renew_before)
            .filter_map(|(id, r)| Some((*id, r.key?)))
            .collect();
        for (id, key) in relays {
            self.send_registered(id, key, unix);
        }
        self.interest.tick();
        self.drain_interest();
    }

    fn drain_interest(&mut self) {
        while let Some(e) = self.interest.poll_event() {
            match e {
                InterestEvent::Introduce(a, b) => {
                    for (me, them) in [(a, b), (b, a)] {
                        if let Some(intro) = self.introduction(me, them)
                            && let Some(&conn) = self.by_node.get(&me)
                        {
                            self.counters.introductions += 1;
                            self.outputs.push_back(Output::Send(conn, ControlToClient::Introduce(Box::new(intro))));
                        }
                    }
                }
                InterestEvent::Farewell(a, b) => {
                    for (me, them) in [(a, b), (b, a)] {
                        if let Some(&conn) = self.by_node.get(&me) {
                            self.counters.farewells += 1;
                            self.outputs.push_back(Output::Send(conn, ControlToClient::Farewell(them)));
                        }
                    }
                }
            }
        }
    }

    fn signed_in(&self, node: NodeId) -> Option<&Player> {
        match &self.conns.get(self.by_node.get(&node)?)?.state {
            State::SignedIn(p) => Some(p),
            _ => None,
        }
    }

    /// The relays clients bind to, with their current addresses.
    fn relay_list(&self) -> Vec<RelayInfo> {
        self.relays.iter().map(|(id, r)| RelayInfo { id: *id, addr: r.addr, rtt_us: 0 }).collect()
    }

    /// The relays' own round trip between `a` and `b`, as either measured it.
    fn relay_rtt(&self, a: NodeId, b: NodeId) -> Option<u32> {
        let ab = self.relays.get(&a).and_then(|r| r.peer_rtts.get(&b).copied());
        let ba = self.relays.get(&b).and_then(|r| r.peer_rtts.get(&a).copied());
        ab.into_iter().chain(ba).min()
    }

    /// What `me` needs to reach `them`. Single relays are ranked by the sum of both sides'
    /// reported RTTs to them (unknown counts as a second); routes through two relays, one
    /// each side measured, cost my RTT to the first, the relays' RTT to each other and their
    /// RTT to the second, and are offered when they beat the best single relay.
    fn introduction(&self, me: NodeId, them: NodeId) -> Option<Introduction> {
        const UNKNOWN: u64 = 1_000_000;
        let (a, b) = (self.signed_in(me)?, self.signed_in(them)?);
        let to = |p: &Player, r: NodeId| p.relay_rtts.get(&r).map(|&us| u64::from(us));
        let us = |cost: u64| u32::try_from(cost).unwrap_or(u32::MAX);
        let mut relays: Vec<(u64, RelayInfo)> = self
            .relays
            .iter()
            .map(|(&id, r)| {
                let cost = to(a, id).unwrap_or(UNKNOWN) + to(b, id).unwrap_or(UNKNOWN);
                (cost, RelayInfo { id, addr: r.addr, rtt_us: us(cost) })
            })
            .collect();
        relays.sort_by_key(|(cost, r)| (*cost, r.id));
        let best_single = relays.first().map_or(u64::MAX, |(cost, _)| *cost);
        let mut routes: Vec<(u64, RouteInfo)> = Vec::new();
        for (&r1, &mine) in &a.relay_rtts {
            for (&r2, &theirs) in &b.relay_rtts {
                if r1 == r2 || !self.relays.contains_key(&r1) || !self.relays.contains_key(&r2) {
                    continue;
                }
                let Some(between) = self.relay_rtt(r1, r2) else { continue };
                let cost = u64::from(mine) + u64::from(between) + u64::from(theirs);
                if cost < best_single {
                    routes.push((cost, RouteInfo { relays: vec![r1, r2], rtt_us: us(cost) }));
                }
            }
        }
        routes.sort_by(|(c1, r1), (c2, r2)| (c1, &r1.relays).cmp(&(c2, &r2.relays)));
        routes.truncate(2);
        relays.truncate(3);
        Some(Introduction {
            peer_key: b.key,
            observed: b.observed,
            local: b.local.clone(),
            relays: relays.into_iter().map(|(_, r)| r).collect(),
            routes: routes.into_iter().map(|(_, r)| r).collect(),
            profiles: self.cfg.profiles.iter().map(|(vc, p)| (*vc, p.to_wire())).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const FP: [u8; 32] = [7; 32];
    const T0: u64 = 1_800_000_000;

    fn core() -> Core {
        let cfg = CoreConfig {
            relays: vec![
                RelayInfo { id: NodeId([1; 8]), addr: "198.51.100.1:7000".parse().unwrap(), rtt_us: 0 },
                RelayInfo { id: NodeId([2; 8]), addr: "198.51.100.2:7000".parse().unwrap(), rtt_us: 0 },
            ],
            profiles: vec![(1, ProfileConfig::Voice)],
            ..CoreConfig::default()
        };
        Core::new(cfg, Identity::from_seed([99; 32]), FP).unwrap()
    }

    fn proof(id: &Identity, account: &str, unix_ms: u64) -> KeyProof {
        KeyProof::new(id, account, unix_ms, &FP)
    }

    fn outputs(c: &mut Core) -> Vec<Output> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    /// Connects and signs `seed`'s identity in as `account`; returns its connection.
    fn sign_in(c: &mut Core, now: Instant, conn: ConnId, seed: u8, account: &str) -> Identity {
        let id = Identity::from_seed([seed; 32]);
        c.on_connected(now, conn, format!("203.0.113.{seed}:5000").parse().unwrap());
        let msg = ClientToControl::SignIn {
            account: account.into(),
            password: "pw".into(),
            proof: proof(&id, account, T0 * 1000),
        };
        c.on_message(now, UnixTime(T0), conn, msg);
        let out = outputs(c);
        assert!(matches!(&out[..], [Output::Verify { conn: x, .. }] if *x == conn), "{out:?}");
        c.on_verdict(UnixTime(T0), conn, Some(account.into()));
        let out = outputs(c);
        let [Output::Send(_, ControlToClient::Welcome { session, permit, .. })] = &out[..] else { panic!("{out:?}") };
        let s = SignedTicket::decode(session).unwrap();
        s.verify(&c.public_key(), TicketKind::Session, Roles::CLIENT, UnixTime(T0)).unwrap();
        let p = SignedTicket::decode(permit).unwrap();
        assert_eq!(p.body.node_id, id.node_id());
        p.verify(&c.public_key(), TicketKind::RelayPermit, Roles::CLIENT, UnixTime(T0)).unwrap();
        id
    }

    fn ticket_for(id: &Identity) -> Vec<u8> {
        TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0), 3600)
            .sign(&Identity::from_seed([99; 32]))
            .encode()
            .to_vec()
    }

    fn report(seq: u64, ms: u64, pos: [f32; 3]) -> ClientToControl {
        ClientToControl::Report(Box::new(Report {
            seq,
            unix_ms: ms,
            status: "playing".into(),
            app: vec![],
            build_hash: [0; 32],
            position: pos,
            character: vec![seq as u8],
            game: vec![],
            links: vec![],
            lost: vec![],
        }))
    }

    #[test]
    fn sign_in_check_in_and_introductions_then_farewell() {
        let mut c = core();
        let t = Instant::now();
        let a = sign_in(&mut c, t, 1, 10, "ana");
        let b = sign_in(&mut c, t, 2, 11, "bob");
        c.on_message(t, UnixTime(T0), 1, ClientToControl::CheckIn { local: vec![], mesh_port: 4000, reflexive: None });
        assert_eq!(
            outputs(&mut c),
            vec![Output::Send(1, ControlToClient::Observed("203.0.113.10:4000".parse().unwrap()))]
        );
        // A relay's view of the mesh socket (its NAT mapping) is taken when it shares the IP
        // the server sees; one that names another IP is not.
        let mapped: SocketAddr = "203.0.113.10:61000".parse().unwrap();
        let check_in = |reflexive| ClientToControl::CheckIn { local: vec![], mesh_port: 4000, reflexive };
        c.on_message(t, UnixTime(T0), 1, check_in(Some(mapped)));
        assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Observed(mapped))]);
        c.on_message(t, UnixTime(T0), 1, check_in(Some("198.51.100.1:61000".parse().unwrap())));
        assert_eq!(
            outputs(&mut c),
            vec![Output::Send(1, ControlToClient::Observed("203.0.113.10:4000".parse().unwrap()))]
        );
        // A second sign-in on a signed-in connection changes nothing.
        let again = ClientToControl::SignIn {
            account: "ana".into(),
            password: "pw".into(),
            proof: proof(&a, "ana", T0 * 1000),
        };
        c.on_message(t, UnixTime(T0), 1, again);
        assert_eq!(outputs(&mut c), vec![]);
        assert_eq!(c.player(a.node_id()).unwrap().account, "ana");
        c.on_message(t, UnixTime(T0), 2, ClientToControl::RelayRtts(vec![(NodeId([2; 8]), 10_000)]));
        c.on_message(t, UnixTime(T0), 1, ClientToControl::RelayRtts(vec![(NodeId([2; 8]), 20_000)]));
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        c.on_message(t, UnixTime(T0), 2, report(1, T0 * 1000, [10.0, 0.0, 0.0]));
        let saved = outputs(&mut c).into_iter().filter(|o| matches!(o, Output::SaveCharacter(_))).count();
        assert_eq!(saved, 2);
        assert_eq!(c.take_report_rows().len(), 2);
        c.tick(t, UnixTime(T0));
        let out = outputs(&mut c);
        let intros: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(conn, ControlToClient::Introduce(i)) => Some((*conn, i.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(intros.len(), 2, "{out:?}");
        let to_a = &intros.iter().find(|(conn, _)| *conn == 1).unwrap().1;
        assert_eq!(to_a.peer_key, b.public_key());
        assert_eq!(to_a.profiles, vec![(1, ProfileConfig::Voice.to_wire())]);
        // Relay 2 is known to both sides, so it ranks first; the estimate is the round trip
        // between the players through it: the sum of their RTTs to it.
        assert_eq!(to_a.relays[0].id, NodeId([2; 8]));
        assert_eq!(to_a.relays[0].rtt_us, 30_000);
        assert!(to_a.routes.is_empty(), "no relay map yet, so no two-relay routes");
        let to_b = &intros.iter().find(|(conn, _)| *conn == 2).unwrap().1;
        assert_eq!(to_b.peer_key, a.public_key());
        assert_eq!(to_b.observed, Some("203.0.113.10:4000".parse().unwrap()));
        // Bob walks away (within the speed limit): farewell to both.
        for i in 1..=10u64 {
            c.on_message(t, UnixTime(T0), 2, report(1 + i, T0 * 1000 + i * 1000, [10.0 + 10.0 * i as f32, 0.0, 0.0]));
        }
        outputs(&mut c);
        c.tick(t, UnixTime(T0));
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Send(1, ControlToClient::Farewell(b.node_id()))), "{out:?}");
        assert!(out.contains(&Output::Send(2, ControlToClient::Farewell(a.node_id()))), "{out:?}");
        assert_eq!(c.counters().implausible, 0);
    }

    /// Registers relay `seed` (configured as `NodeId([n; 8])` only for seeds the core knows).
    fn register(c: &mut Core, t: Instant, conn: ConnId, relay: &Identity) -> Vec<Output> {
        c.on_connected(t, conn, "198.51.100.9:40000".parse().unwrap());
        let msg = RelayToControl::Register {
            addr: "198.51.100.9:7000".parse().unwrap(),
            proof: proof(relay, RELAY_ACCOUNT, T0 * 1000),
        };
        c.on_relay_message(t, UnixTime(T0), conn, msg);
        outputs(c)
    }

    fn relay_core(relays: &[&Identity]) -> Core {
        let cfg = CoreConfig {
            relays: relays
                .iter()
                .enumerate()
                .map(|(i, r)| RelayInfo {
                    id: r.node_id(),
                    addr: format!("198.51.100.{}:7000", i + 1).parse().unwrap(),
                    rtt_us: 0,
                })
                .collect(),
            ..CoreConfig::default()
        };
        Core::new(cfg, Identity::from_seed([99; 32]), FP).unwrap()
    }

    #[test]
    fn configured_relays_register_get_a_relay_permit_and_their_peers_and_others_are_refused() {
        let (r1, r2) = (Identity::from_seed([31; 32]), Identity::from_seed([32; 32]));
        let mut c = relay_core(&[&r1, &r2]);
        let t = Instant::now();
        // Before registering, a relay's other messages are refused.
        c.on_connected(t, 9, "198.51.100.9:40000".parse().unwrap());
        c.on_relay_message(t, UnixTime(T0), 9, RelayToControl::PeerRtts(vec![]));
        assert_eq!(outputs(&mut c), vec![Output::SendRelay(9, ControlToRelay::Refused(Refusal::NotSignedIn))]);

        let out = register(&mut c, t, 1, &r1);
        let [Output::SendRelay(1, ControlToRelay::Registered { permit, peers })] = &out[..] else { panic!("{out:?}") };
        let permit = SignedTicket::decode(permit).unwrap();
        assert_eq!(permit.body.node_id, r1.node_id());
        permit.verify(&c.public_key(), TicketKind::RelayPermit, Roles::RELAY, UnixTime(T0)).unwrap();
        assert!(peers.is_empty(), "no other relay has registered yet");
        // When r2 registers, each learns the other, at the address it announced.
        let out = register(&mut c, t, 2, &r2);
        let peers_of = |conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::SendRelay(c, ControlToRelay::Registered { peers, .. }) if *c == conn => Some(peers.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(
            peers_of(1).iter().map(|p| (p.id, p.addr)).collect::<Vec<_>>(),
            vec![(r2.node_id(), "198.51.100.9:7000".parse().unwrap())]
        );
        assert_eq!(peers_of(2).iter().map(|p| p.id).collect::<Vec<_>>(), vec![r1.node_id()]);

        // Measured RTTs show in the live state.
        c.on_relay_message(t, UnixTime(T0), 1, RelayToControl::PeerRtts(vec![(r2.node_id(), 1_500)]));
        let snap = c.snapshot();
        let hex = |n: NodeId| shoal_protocol::identity::to_hex(&n.0);
        let s1 = snap.relays.iter().find(|r| r.node == hex(r1.node_id())).unwrap();
        assert!(s1.registered);
        assert_eq!(s1.peers, vec![(hex(r2.node_id()), 1.5)]);

        // A relay the server was not configured with, and a bad proof, are refused and closed.
        let stranger = Identity::from_seed([33; 32]);
        let out = register(&mut c, t, 3, &stranger);
        assert_eq!(out, vec![Output::SendRelay(3, ControlToRelay::Refused(Refusal::BadCredentials)), Output::Close(3)]);
        c.on_connected(t, 4, "198.51.100.9:40001".parse().unwrap());
        let forged = RelayToControl::Register {
            addr: "198.51.100.9:7000".parse().unwrap(),
            proof: KeyProof::new(&r1, RELAY_ACCOUNT, T0 * 1000, &[0; 32]),
        };
        c.on_relay_message(t, UnixTime(T0), 4, forged);
        assert_eq!(
            outputs(&mut c),
            vec![Output::SendRelay(4, ControlToRelay::Refused(Refusal::BadProof)), Output::Close(4)]
        );
        assert_eq!((c.counters().relays_registered, c.counters().relays_refused), (2, 2));

        // The permit is renewed before it lapses; a lost relay shows as unregistered.
        c.tick(t, UnixTime(T0 + c.cfg.permit_ttl.as_secs() * 2 / 3 + 1));
        let renewed = outputs(&mut c)
            .into_iter()
            .filter(|o| matches!(o, Output::SendRelay(_, ControlToRelay::Registered { .. })))
            .count();
        assert_eq!(renewed, 2);
        c.on_disconnected(1);
        assert!(!c.snapshot().relays.iter().find(|r| r.node == hex(r1.node_id())).unwrap().registered);
    }

    #[test]
    fn players_near_different_relays_get_a_two_relay_route_when_the_relay_map_says_it_is_faster() {
        let (r1, r2, r3) =
            (Identity::from_seed([31; 32]), Identity::from_seed([32; 32]), Identity::from_seed([34; 32]));
        let mut c = relay_core(&[&r1, &r2, &r3]);
        let t = Instant::now();
        register(&mut c, t, 101, &r1);
        register(&mut c, t, 102, &r2);
        c.on_relay_message(t, UnixTime(T0), 101, RelayToControl::PeerRtts(vec![(r2.node_id(), 20_000)]));
        let a = sign_in(&mut c, t, 1, 10, "ana");
        let b = sign_in(&mut c, t, 2, 11, "bob");
        // Ana is near r1, Bob near r2; r3 is far from both.
        let ms = |r: &Identity, ms: u32| (r.node_id(), ms * 1000);
        c.on_message(t, UnixTime(T0), 1, ClientToControl::RelayRtts(vec![ms(&r1, 5), ms(&r2, 100), ms(&r3, 90)]));
        c.on_message(t, UnixTime(T0), 2, ClientToControl::RelayRtts(vec![ms(&r1, 100), ms(&r2, 5), ms(&r3, 90)]));
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        c.on_message(t, UnixTime(T0), 2, report(1, T0 * 1000, [10.0, 0.0, 0.0]));
        outputs(&mut c);
        c.tick(t, UnixTime(T0));
        let intros: Vec<(ConnId, Box<Introduction>)> = outputs(&mut c)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send(conn, ControlToClient::Introduce(i)) => Some((conn, i)),
                _ => None,
            })
            .collect();
        let to = |conn| &intros.iter().find(|(c, _)| *c == conn).unwrap().1;
        // 5 + 20 + 5 = 30 ms through r1 and r2, against 105 ms through either alone.
        assert_eq!(to(1).routes, vec![RouteInfo { relays: vec![r1.node_id(), r2.node_id()], rtt_us: 30_000 }]);
        assert_eq!(to(2).routes, vec![RouteInfo { relays: vec![r2.node_id(), r1.node_id()], rtt_us: 30_000 }]);
        // Single relays still come, best first (r1 and r2 tie at 105 ms; r3 is 180 ms).
        assert_eq!(to(1).relays.iter().map(|r| r.rtt_us).collect::<Vec<_>>(), vec![105_000, 105_000, 180_000]);
        assert_eq!(to(1).peer_key, b.public_key());
        assert_eq!(to(2).peer_key, a.public_key());
    }

    #[test]
    fn bad_proofs_credentials_and_early_messages_are_refused_and_counted() {
        let mut c = core();
        let t = Instant::now();
        let id = Identity::from_seed([5; 32]);
        c.on_connected(t, 1, "203.0.113.5:1".parse().unwrap());
        // Before sign-in.
        c.on_message(t, UnixTime(T0), 1, ClientToControl::Keepalive);
        assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Refused(Refusal::NotSignedIn))]);
        // A proof for another account, one too old, one for another server.
        let other_account = proof(&id, "eve", T0 * 1000);
        let stale = proof(&id, "ana", (T0 - 120) * 1000);
        let mut other_server = proof(&id, "ana", T0 * 1000);
        other_server.signature =
            id.sign(SIGN_IN_CONTEXT, &KeyProof::message("ana", &id.public_key(), T0 * 1000, &[8; 32]));
        for p in [other_account, stale, other_server] {
            c.on_message(
                t,
                UnixTime(T0),
                1,
                ClientToControl::SignIn { account: "ana".into(), password: "pw".into(), proof: p },
            );
            assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Refused(Refusal::BadProof))]);
        }
        // Wrong password: the verdict says no.
        c.on_message(
            t,
            UnixTime(T0),
            1,
            ClientToControl::SignIn {
                account: "ana".into(),
                password: "x".into(),
                proof: proof(&id, "ana", T0 * 1000),
            },
        );
        outputs(&mut c);
        c.on_verdict(UnixTime(T0), 1, None);
        assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Refused(Refusal::BadCredentials))]);
        // The fifth failure closes the connection.
        c.on_message(
            t,
            UnixTime(T0),
            1,
            ClientToControl::SignIn {
                account: "ana".into(),
                password: "x".into(),
                proof: proof(&id, "ana", T0 * 1000),
            },
        );
        outputs(&mut c);
        c.on_verdict(UnixTime(T0), 1, None);
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        let k = c.counters();
        assert_eq!((k.bad_proofs, k.bad_credentials, k.not_signed_in), (3, 2, 1));
        c.on_malformed(1);
        assert_eq!(c.counters().malformed, 1);
    }

    #[test]
    fn forged_and_expired_tickets_do_not_resume() {
        let mut c = core();
        let t = Instant::now();
        let id = sign_in(&mut c, t, 1, 10, "ana");
        // A genuine ticket resumes on a new connection, replacing the old one.
        let session = TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0), 3600)
            .sign(&Identity::from_seed([99; 32]));
        c.on_connected(t, 2, "203.0.113.10:6000".parse().unwrap());
        c.on_message(
            t,
            UnixTime(T0),
            2,
            ClientToControl::Resume { session: session.encode().to_vec(), proof: proof(&id, "", T0 * 1000) },
        );
        assert_eq!(outputs(&mut c), vec![Output::FindAccount { conn: 2, node: id.node_id() }]);
        c.on_account(UnixTime(T0), 2, Some("ana".into()));
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        assert!(out.iter().any(|o| matches!(o, Output::Send(2, ControlToClient::Welcome { .. }))), "{out:?}");
        // Forged (signed by someone else), expired, and another key's ticket.
        let forged = TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0), 3600)
            .sign(&Identity::from_seed([1; 32]));
        let expired = TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0 - 7200), 3600)
            .sign(&Identity::from_seed([99; 32]));
        let other = Identity::from_seed([12; 32]);
        for (n, ticket, key) in [(3, forged, &id), (4, expired, &id), (5, session, &other)] {
            c.on_connected(t, n, "203.0.113.10:7000".parse().unwrap());
            c.on_message(
                t,
                UnixTime(T0),
                n,
                ClientToControl::Resume { session: ticket.encode().to_vec(), proof: proof(key, "", T0 * 1000) },
            );
            assert_eq!(outputs(&mut c), vec![Output::Send(n, ControlToClient::Refused(Refusal::BadTicket))]);
        }
        assert_eq!(c.counters().bad_tickets, 3);
        assert_eq!(c.player(id.node_id()).unwrap().account, "ana");
        // A node the store knows no account for cannot resume.
        c.on_connected(t, 6, "203.0.113.10:7001".parse().unwrap());
        c.on_message(
            t,
            UnixTime(T0),
            6,
            ClientToControl::Resume { session: ticket_for(&other), proof: proof(&other, "", T0 * 1000) },
        );
        assert_eq!(outputs(&mut c), vec![Output::FindAccount { conn: 6, node: other.node_id() }]);
        c.on_account(UnixTime(T0), 6, None);
        assert_eq!(outputs(&mut c), vec![Output::Send(6, ControlToClient::Refused(Refusal::BadTicket))]);
    }

    #[test]
    fn teleports_are_flagged_and_repeat_offenders_cut_off_without_a_new_permit() {
        let mut c = core();
        let t = Instant::now();
        sign_in(&mut c, t, 1, 10, "ana");
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        // 500 units in one second at a 20/s limit, three times.
        for i in 1..=3u64 {
            c.on_message(t, UnixTime(T0), 1, report(1 + i, T0 * 1000 + i * 1000, [500.0 * i as f32, 0.0, 0.0]));
        }
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        assert_eq!(c.counters().implausible, 3);
        assert_eq!(c.counters().cut_off, 1);
        assert_eq!(c.players(), 0);
        // Its permit is not renewed: it is gone.
        c.tick(t, UnixTime(T0 + 500));
        assert!(!outputs(&mut c).iter().any(|o| matches!(o, Output::Send(1, ControlToClient::Permit(_)))));
    }

    #[test]
    fn permits_are_renewed_before_they_lapse_and_silence_is_a_lost_client() {
        let mut c = core();
        let t = Instant::now();
        sign_in(&mut c, t, 1, 10, "ana");
        // Permit TTL 600 s: at 450 s a third is left.
        c.on_message(t + Duration::from_secs(10), UnixTime(T0 + 450), 1, ClientToControl::Keepalive);
        c.tick(t + Duration::from_secs(10), UnixTime(T0 + 450));
        let out = outputs(&mut c);
        let [Output::Send(1, ControlToClient::Permit(p))] = &out[..] else { panic!("{out:?}") };
        let p = SignedTicket::decode(p).unwrap();
        assert_eq!(p.body.expires_at, UnixTime(T0 + 450 + 600));
        // Nothing for longer than the presence timeout.
        c.tick(t + Duration::from_secs(30), UnixTime(T0 + 470));
        assert_eq!(outputs(&mut c), vec![Output::Close(1)]);
        assert_eq!(c.counters().lost, 1);
        assert_eq!(c.players(), 0);
    }
}
