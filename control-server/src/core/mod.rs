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
//!
//! One [`Core`], its handlers split by concern: `sign_in` (key proofs, accounts, tickets and
//! permits), `relays` (registration and the relay map), `reports` (what signed-in clients
//! send: check-ins, relay RTTs, reports and their plausibility) and `introductions` (who is
//! introduced to whom, over which relays).

mod hosting;
mod introductions;
mod relays;
mod reports;
mod sign_in;
#[cfg(test)]
mod test_support;
mod watching;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glam::Vec3;
use rustc_hash::FxHashMap;
use shoal_protocol::control::{ClientToControl, ControlToClient, ControlToRelay, Refusal, RelayInfo, Report};
use shoal_protocol::profile::ProfileConfig;
use shoal_protocol::{Identity, NodeId, PublicKey, UnixTime};

use crate::interest::{Interest, InterestConfig, InterestError};
use crate::store::{Character, ReportRow};
use crate::watch::{WatchConfig, Watchers};

/// A connection's handle, chosen by the driver.
pub type ConnId = u64;

/// How long accepted positions are kept to check observations against, and mismatches
/// counted towards a quorum.
pub const OBSERVE_WINDOW: Duration = Duration::from_secs(10);

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
    /// A relay silent this long is gone (they report every second): the streams published
    /// through it move to another relay, and introductions stop offering it.
    pub relay_presence_timeout: Duration,
    /// The fastest a character may move, units per second.
    pub max_speed: f32,
    /// Added to the time between two reports' receipts (on the server's clock) before their
    /// distance is checked against [`CoreConfig::max_speed`]: the jitter of their arrival.
    pub speed_slack: Duration,
    /// Flags after which a client is cut off.
    pub max_flags: u32,
    /// Slack for comparing an avatar a neighbour observed with the served player's own
    /// reports: the observation's and the reports' delivery, and the observer's interpolation.
    /// A served position farther from every nearby report than [`CoreConfig::max_speed`]
    /// allows over their time apart plus this is a mismatch.
    pub observe_slack: Duration,
    /// Distinct observers whose mismatches within [`OBSERVE_WINDOW`] flag the served player,
    /// so that one lying observer cannot get an honest player flagged.
    pub observe_quorum: usize,
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
    /// Who watches whom through relay fan-out beyond the neighbours (on with its defaults);
    /// `None` turns watching off.
    pub watch: Option<WatchConfig>,
    /// Subscriptions for watchers last this long; they are renewed when a third is left.
    pub subscription_ttl: Duration,
    /// Hosting servers that may register, by node id.
    pub hosting: Vec<NodeId>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            session_ttl: Duration::from_secs(3600),
            permit_ttl: Duration::from_secs(600),
            proof_skew: Duration::from_secs(30),
            presence_timeout: Duration::from_secs(15),
            relay_presence_timeout: Duration::from_secs(4),
            max_speed: 20.0,
            speed_slack: Duration::from_millis(250),
            max_flags: 3,
            observe_slack: Duration::from_secs(1),
            observe_quorum: 2,
            max_sign_in_failures: 5,
            interest: InterestConfig::default(),
            relays: Vec::new(),
            profiles: Vec::new(),
            builds: Vec::new(),
            watch: Some(WatchConfig::default()),
            subscription_ttl: Duration::from_secs(60),
            hosting: Vec::new(),
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
    /// Send a message on a hosting server's connection.
    SendHosting(ConnId, shoal_protocol::world::ControlToHosting),
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
    /// Reports refused because their sequence number is past what the history stores.
    pub bad_seqs: u64,
    /// Builds not on the allow-list.
    pub unknown_builds: u64,
    /// Clients cut off for implausible reports.
    pub cut_off: u64,
    /// Neighbours' avatars observers reported.
    pub observations: u64,
    /// Observations not taken: of a player that is not the observer's neighbour, not signed
    /// in, or older than the position history.
    pub observations_refused: u64,
    /// Observations that disagree with the served player's own reports.
    pub avatar_mismatches: u64,
    /// Flags raised because a quorum of observers saw an avatar its player's reports deny.
    pub avatar_flags: u64,
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
    /// Hosting server registrations accepted.
    pub hosting_registered: u64,
    /// Registrations from hosting servers not in the configuration, or with a bad proof.
    pub hosting_refused: u64,
    /// Connections closed because they did not read what the server sent them.
    pub overflowed: u64,
    /// Watch grants sent: new, renewed, or with a new stream key.
    pub watch_grants: u64,
    /// Watches withdrawn.
    pub unwatches: u64,
    /// Watches not granted because no relay was registered.
    pub watch_no_relay: u64,
    /// Watch grants through a second relay near the watcher, which the publisher's relay feeds.
    pub chained_grants: u64,
    /// Feeds sent to relays: new, renewed, or from another upstream.
    pub feeds: u64,
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
    /// Flags so far: implausible reports, and avatars served that the reports deny.
    pub flags: u32,
    /// Whether it has been flagged at all.
    pub flagged: bool,
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
    /// Last accepted position, and when the server received the report that gave it.
    position: Option<(Vec3, Instant)>,
    /// Accepted positions of the last [`OBSERVE_WINDOW`], oldest first, for cross-checks.
    history: VecDeque<(Instant, Vec3)>,
    /// Observers whose observations disagreed with the reports, and when, within
    /// [`OBSERVE_WINDOW`].
    mismatches: Vec<(NodeId, Instant)>,
    flags: u32,
    permit_expires: UnixTime,
    last_report: Option<Report>,
    /// The key that seals its published stream, once it gave one.
    stream_key: Option<[u8; 32]>,
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
    /// A registered hosting server.
    Hosting(NodeId),
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
    /// The watch set, when watching is on.
    watchers: Option<Watchers>,
    /// Grants in force, by (watcher, publisher).
    grants: FxHashMap<(NodeId, NodeId), watching::Grant>,
    /// Feeds in force, by (fed relay, publisher).
    feeds: FxHashMap<(NodeId, NodeId), watching::Feed>,
    /// What each publisher was last told of its audience: watchers and relay.
    audiences: FxHashMap<NodeId, (u32, Option<NodeId>)>,
    /// The relay map, keyed and ordered by node id.
    relays: BTreeMap<NodeId, RelayEntry>,
    /// Registered hosting servers, by node id.
    hosting: BTreeMap<NodeId, hosting::HostingEntry>,
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
            watchers: cfg.watch.map(Watchers::new).transpose()?,
            grants: FxHashMap::default(),
            feeds: FxHashMap::default(),
            audiences: FxHashMap::default(),
            relays,
            hosting: BTreeMap::new(),
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
                flagged: p.flags > 0,
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
            tracing::info!(node = %id, addr = %c.remote, "relay unregistered");
            r.conn = None;
        }
        if let State::Hosting(id) = c.state {
            self.hosting_gone(id, conn);
        }
        if let State::SignedIn(p) = c.state {
            let node = p.key.node_id();
            if self.by_node.get(&node) == Some(&conn) {
                self.by_node.remove(&node);
                self.interest.remove(node);
                self.drain_interest();
                if let Some(w) = &mut self.watchers {
                    w.remove(node);
                    self.grants.retain(|(w, p), _| *w != node && *p != node);
                    self.audiences.remove(&node);
                    // A removal only ends watches: nothing is granted, so no time is needed.
                    self.drain_watch(UnixTime(0));
                }
            }
        }
    }

    /// `conn` stopped reading: what the server queued for it reached the driver's bound. It is
    /// closed like a client gone silent, and counted.
    pub fn on_overflow(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            tracing::info!(conn, addr = %c.remote, "closed: not reading what the server sends");
            self.counters.overflowed += 1;
            self.outputs.push_back(Output::Close(conn));
            self.on_disconnected(conn);
        }
    }

    /// A frame on `conn` could not be decoded.
    pub fn on_malformed(&mut self, conn: ConnId) {
        self.counters.malformed += 1;
        tracing::debug!(conn, reason = %Refusal::Malformed, "refused");
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
                self.on_sign_in(unix, conn, account, password, proof);
            }
            ClientToControl::Resume { session, proof } => self.on_resume(unix, conn, &session, proof),
            other if signed_in => self.on_signed_in_message(now, unix, conn, other),
            _ => {
                tracing::debug!(conn, reason = %Refusal::NotSignedIn, "refused");
                self.counters.not_signed_in += 1;
                self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::NotSignedIn)));
            }
        }
    }

    /// Runs introductions, presence and permit renewal. Call it at the interest rate (a few
    /// times a second at most).
    pub fn tick(&mut self, now: Instant, unix: UnixTime) {
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let timeout = match c.state {
                    State::Relay(_) | State::Hosting(_) => self.cfg.relay_presence_timeout,
                    _ => self.cfg.presence_timeout,
                };
                now.saturating_duration_since(c.heard) > timeout
            })
            .map(|(&id, _)| id)
            .collect();
        for conn in silent {
            if let Some(c) = self.conns.get(&conn) {
                match &c.state {
                    State::SignedIn(p) => {
                        tracing::info!(account = p.account.as_str(), node = %p.key.node_id(), addr = %c.remote, "lost: silent")
                    }
                    _ => tracing::debug!(conn, addr = %c.remote, "lost: silent"),
                }
            }
            self.counters.lost += 1;
            self.outputs.push_back(Output::Close(conn));
            self.on_disconnected(conn);
        }
        self.renew_permits(unix);
        self.renew_relay_permits(unix);
        self.interest.tick();
        self.drain_interest();
        if let Some(w) = &mut self.watchers {
            let interest = &self.interest;
            w.tick(|a, b| interest.neighbours(a).any(|n| n == b));
            self.drain_watch(unix);
            self.renew_grants(unix);
        }
    }

    /// Permits are renewed when this much of their life is left.
    fn renew_before(&self) -> u64 {
        self.cfg.permit_ttl.as_secs() / 3
    }

    /// A signed-in player by node id.
    fn signed_in(&self, node: NodeId) -> Option<&Player> {
        match &self.conns.get(self.by_node.get(&node)?)?.state {
            State::SignedIn(p) => Some(p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::test_support::*;
    use super::*;
    use shoal_protocol::SignedTicket;

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
