//! The control plane in the simulator: the control server's sans-IO [`Core`] and the players
//! that sign in to it, each a [`Node`] beside a [`SessionCore`] on a simulated host.
//!
//! Control messages do not travel as datagrams: the QUIC stream between a player and the
//! server is modelled as an ordered channel with a fixed one-way latency
//! ([`ControlConfig::latency`]); opening it takes one round trip. The core's account checks and
//! lookups are answered at once from memory (accounts added with [`Sim::add_account`], the
//! characters the core asked to save), and it ticks every [`ControlConfig::tick`].
//!
//! The relays register with it as relay daemons do (a key proof, then a keepalive every
//! [`REPORT_EVERY`]), so a relay that crashes falls silent and the core drops it after its
//! presence timeout, as a real control server would. What the core sends the relays (permits,
//! peers) is not carried: the simulator configures them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use shoal_control::core::{ConnId, Core, CoreConfig, Output};
use shoal_control::interest::InterestError;
use shoal_mesh::driver::register::REPORT_EVERY;
use shoal_protocol::control::{
    ClientToControl, ControlToClient, ControlToRelay, KeyProof, RELAY_ACCOUNT, RelayInfo, RelayToControl,
};
use shoal_protocol::{Identity, NodeId, Roles, SignedSubscription, UnixTime};
use shoal_sdk::{LinkCommand, LinkId, Node, SessionConfig, SessionCore, Trust};

use super::{Core as HostCore, HostId, Sim};

/// Where sessions in the simulator think the control server is (they never dial it).
pub const CONTROL_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 255, 255, 254)), 7100);

/// How the simulated control server behaves.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The core's configuration; its relays are the simulation's, filled in by
    /// [`Sim::start_control`].
    pub core: CoreConfig,
    /// One-way latency between any player and the server.
    pub latency: Duration,
    /// How often the core ticks (introductions, presence, permits).
    pub tick: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            core: CoreConfig::default(),
            latency: Duration::from_millis(20),
            tick: shoal_control::server::TICK,
        }
    }
}

/// What the control plane carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlStats {
    /// Messages delivered to the server.
    pub to_server: u64,
    /// Messages delivered to players.
    pub to_players: u64,
    /// Messages for a connection already closed, dropped.
    pub undeliverable: u64,
    /// Report rows the core would have had persisted.
    pub report_rows: u64,
    /// Characters it would have had saved.
    pub saves: u64,
    /// Feeds a relay refused (not the control server's, lapsed, not its own).
    pub feeds_refused: u64,
}

/// Something on its way between a player and the server.
#[derive(Debug)]
enum Carried {
    /// A connection reaches the server.
    Connected {
        conn: ConnId,
        remote: SocketAddr,
    },
    /// Its handshake completes at the player.
    LinkUp {
        host: usize,
        link: LinkId,
    },
    ToServer {
        conn: ConnId,
        msg: ClientToControl,
    },
    ToPlayer {
        host: usize,
        link: LinkId,
        msg: ControlToClient,
    },
    /// The player closed the connection.
    ClosedByPlayer {
        conn: ConnId,
    },
    /// The server closed it.
    ClosedByServer {
        host: usize,
        link: LinkId,
    },
    /// To a relay host, on its registration connection.
    ToRelay {
        host: usize,
        msg: ControlToRelay,
    },
}

/// What reaches a player's session.
enum ToPlayer {
    Up(LinkId, [u8; 32]),
    Message(LinkId, ControlToClient),
    Down(LinkId),
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    what: Carried,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    /// Reversed, so that the heap gives the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The control server and what is in flight to and from it.
#[derive(Debug)]
pub(super) struct ControlPlane {
    core: Core,
    latency: Duration,
    tick: Duration,
    next_tick: Instant,
    fingerprint: [u8; 32],
    accounts: BTreeMap<String, String>,
    /// Accounts by the node that last played them, from the core's saves.
    characters: BTreeMap<NodeId, String>,
    conns: BTreeMap<ConnId, (usize, LinkId)>,
    by_link: BTreeMap<(usize, LinkId), ConnId>,
    next_conn: ConnId,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    stats: ControlStats,
    /// Registered relays by host: their connection and when they last kept it alive.
    relays: BTreeMap<usize, (ConnId, Instant)>,
}

impl ControlPlane {
    fn carry(&mut self, at: Instant, what: Carried) {
        self.seq += 1;
        self.queue.push(InFlight { at, seq: self.seq, what });
    }

    /// When the next thing happens: a delivery or a tick.
    pub(super) fn next_at(&self) -> Instant {
        self.queue.peek().map_or(self.next_tick, |f| f.at.min(self.next_tick))
    }
}

impl Sim {
    /// Starts the control server with the relays added so far, signing tickets with the key
    /// the relays trust.
    pub fn start_control(&mut self, cfg: ControlConfig) -> Result<(), InterestError> {
        let mut core_cfg = cfg.core;
        core_cfg.relays = (0..self.hosts.len())
            .filter(|&i| matches!(self.hosts[i].core, HostCore::Relay(_)))
            .map(|i| RelayInfo { id: self.relay_id(HostId(i)), addr: self.hosts[i].addr, rtt_us: 0 })
            .collect();
        let fingerprint: [u8; 32] = self.rng.random();
        let core = Core::new(core_cfg, self.control.clone(), fingerprint)?;
        self.control_plane = Some(Box::new(ControlPlane {
            core,
            latency: cfg.latency,
            tick: cfg.tick,
            next_tick: self.now + cfg.tick,
            fingerprint,
            accounts: BTreeMap::new(),
            characters: BTreeMap::new(),
            conns: BTreeMap::new(),
            by_link: BTreeMap::new(),
            next_conn: 1,
            queue: BinaryHeap::new(),
            seq: 0,
            stats: ControlStats::default(),
            relays: BTreeMap::new(),
        }));
        let relays: Vec<usize> =
            (0..self.hosts.len()).filter(|&i| matches!(self.hosts[i].core, HostCore::Relay(_))).collect();
        for i in relays {
            self.register_relay(i);
        }
        Ok(())
    }

    /// Relay host `i` registers with the control server on a new connection (at start, and
    /// when it restarts).
    pub(super) fn register_relay(&mut self, i: usize) {
        let now = self.now;
        let clock = self.clock();
        let (addr, Some(cfg)) = (self.hosts[i].addr, self.hosts[i].relay_cfg.as_ref()) else { return };
        let Some(cp) = self.control_plane.as_mut() else { return };
        let conn = cp.next_conn;
        cp.next_conn += 1;
        let proof = KeyProof::new(&cfg.identity, RELAY_ACCOUNT, clock.unix_us(now) / 1000, &cp.fingerprint);
        cp.core.on_connected(now, conn, addr);
        cp.core.on_relay_message(now, UnixTime(clock.unix_secs(now)), conn, RelayToControl::Register { addr, proof });
        cp.relays.insert(i, (conn, now));
        self.drain_control();
    }

    /// Reports from the relays that are up and due, as the relay driver sends them: the round
    /// trips to their peer relays, or a keepalive while they have none.
    fn keep_relays_alive(&mut self) {
        let now = self.now;
        let unix = UnixTime(self.clock().unix_secs(now));
        let Some(cp) = self.control_plane.as_mut() else { return };
        for (&i, (conn, last)) in &mut cp.relays {
            if self.hosts[i].up && now.saturating_duration_since(*last) >= REPORT_EVERY {
                *last = now;
                let rtts: Vec<(NodeId, u32)> = match &self.hosts[i].core {
                    HostCore::Relay(r) => r
                        .peer_rtts()
                        .map(|(id, _, rtt)| (id, rtt.as_micros().min(u128::from(u32::MAX)) as u32))
                        .collect(),
                    HostCore::Node(_) => Vec::new(),
                };
                let msg = if rtts.is_empty() { RelayToControl::Keepalive } else { RelayToControl::PeerRtts(rtts) };
                cp.core.on_relay_message(now, unix, *conn, msg);
            }
        }
    }

    /// A relay host takes what the control server sent it.
    fn deliver_to_relay(&mut self, host: usize, msg: ControlToRelay) {
        let now = self.now;
        if !self.hosts[host].up {
            return;
        }
        if let (HostCore::Relay(r), ControlToRelay::Feed { subscription }) = (&mut self.hosts[host].core, msg)
            && let Ok(sub) = SignedSubscription::decode(&subscription)
            && r.feed(now, sub).is_err()
            && let Some(cp) = self.control_plane.as_mut()
        {
            cp.stats.feeds_refused += 1;
        }
        self.drain(host);
    }

    /// An account the control server accepts.
    pub fn add_account(&mut self, account: &str, password: &str) {
        if let Some(cp) = &mut self.control_plane {
            cp.accounts.insert(account.into(), password.into());
        }
    }

    /// Adds a player on the open network: a node and a session that starts signing in to the
    /// control server at once as `account`. `configure` adjusts the session's configuration
    /// (report interval, profiles, backoff) before it starts.
    pub fn add_player(&mut self, account: &str, password: &str, configure: impl FnOnce(&mut SessionConfig)) -> HostId {
        let identity = Identity::from_seed(self.rng.random());
        // Replaced by the control server's permit at the welcome.
        let node = Node::new(identity.clone(), self.permit(&identity, Roles::CLIENT), self.clock());
        let fingerprint = self.control_plane.as_ref().map_or([0; 32], |cp| cp.fingerprint);
        let mut cfg = SessionConfig::new(CONTROL_ADDR, Trust::Pinned(fingerprint), account, password, identity);
        configure(&mut cfg);
        let rng = Xoshiro256PlusPlus::seed_from_u64(self.rng.random());
        let addr = self.next_addr();
        let mut session = SessionCore::new(self.now, cfg, self.clock(), rng);
        session.set_local_addrs(vec![addr], addr.port());
        let h = self.push_host(addr, None, HostCore::Node(Box::new(node)), None);
        self.hosts[h.0].session = Some(Box::new(session));
        self.drain(h.0);
        h
    }

    /// The session of player `h`.
    ///
    /// # Panics
    /// If `h` has none (a relay, or a node added without a session): a scenario bug.
    #[allow(clippy::panic)]
    pub fn session(&self, h: HostId) -> &SessionCore {
        match &self.hosts[h.0].session {
            Some(s) => s,
            None => panic!("host {h:?} has no session"),
        }
    }

    /// The session of player `h`, to change; [`Sim::flush`] sends what it queued.
    ///
    /// # Panics
    /// If `h` has none: a scenario bug.
    #[allow(clippy::panic)]
    pub fn session_mut(&mut self, h: HostId) -> &mut SessionCore {
        self.timers.touch(h.0);
        match &mut self.hosts[h.0].session {
            Some(s) => s,
            None => panic!("host {h:?} has no session"),
        }
    }

    /// The control server's core (its counters, players, live state).
    pub fn control_core(&self) -> Option<&Core> {
        self.control_plane.as_ref().map(|cp| &cp.core)
    }

    /// What the control plane carried.
    pub fn control_stats(&self) -> ControlStats {
        self.control_plane.as_ref().map_or(ControlStats::default(), |cp| cp.stats)
    }

    /// Where the server sees a player's connection come from.
    fn control_remote(&self, i: usize) -> SocketAddr {
        let h = &self.hosts[i];
        match h.nat {
            Some(x) => SocketAddr::new(self.nats[x].public_ip(), h.addr.port()),
            None => h.addr,
        }
    }

    /// Does what player `i`'s session asks of its control link.
    pub(super) fn link_command(&mut self, i: usize, cmd: LinkCommand) {
        let now = self.now;
        let remote = self.control_remote(i);
        let Some(cp) = self.control_plane.as_mut() else { return };
        let latency = cp.latency;
        match cmd {
            LinkCommand::Connect { link, .. } => {
                let conn = cp.next_conn;
                cp.next_conn += 1;
                cp.conns.insert(conn, (i, link));
                cp.by_link.insert((i, link), conn);
                cp.carry(now + latency, Carried::Connected { conn, remote });
                cp.carry(now + 2 * latency, Carried::LinkUp { host: i, link });
            }
            LinkCommand::Send { link, msg } => match cp.by_link.get(&(i, link)) {
                Some(&conn) => cp.carry(now + latency, Carried::ToServer { conn, msg }),
                None => cp.stats.undeliverable += 1,
            },
            LinkCommand::Close { link } | LinkCommand::Finish { link } => {
                if let Some(conn) = cp.by_link.remove(&(i, link)) {
                    cp.conns.remove(&conn);
                    cp.carry(now + latency, Carried::ClosedByPlayer { conn });
                }
            }
        }
    }

    /// Runs the control plane's next delivery or tick (due now).
    pub(super) fn step_control(&mut self) {
        let now = self.now;
        let unix = UnixTime(self.clock().unix_secs(now));
        let Some(cp) = self.control_plane.as_mut() else { return };
        if cp.queue.peek().is_none_or(|f| f.at > cp.next_tick) {
            cp.next_tick += cp.tick;
            self.keep_relays_alive();
            let Some(cp) = self.control_plane.as_mut() else { return };
            cp.core.tick(now, unix);
            cp.stats.report_rows += cp.core.take_report_rows().len() as u64;
            self.drain_control();
            return;
        }
        let Some(f) = cp.queue.pop() else { return };
        let (host, input) = match f.what {
            Carried::Connected { conn, remote } => {
                cp.core.on_connected(now, conn, remote);
                return self.drain_control();
            }
            Carried::ToServer { conn, msg } => {
                cp.stats.to_server += 1;
                cp.core.on_message(now, unix, conn, msg);
                return self.drain_control();
            }
            Carried::ClosedByPlayer { conn } => {
                cp.core.on_disconnected(conn);
                return self.drain_control();
            }
            Carried::ToRelay { host, msg } => return self.deliver_to_relay(host, msg),
            Carried::LinkUp { host, link } => (host, ToPlayer::Up(link, cp.fingerprint)),
            Carried::ToPlayer { host, link, msg } => {
                cp.stats.to_players += 1;
                (host, ToPlayer::Message(link, msg))
            }
            Carried::ClosedByServer { host, link } => (host, ToPlayer::Down(link)),
        };
        if !self.hosts[host].up {
            return;
        }
        if let Some(s) = self.hosts[host].session.as_mut() {
            match input {
                ToPlayer::Up(link, fingerprint) => s.handle_link_up(now, link, fingerprint),
                ToPlayer::Message(link, msg) => s.handle_message(now, link, msg),
                ToPlayer::Down(link) => s.handle_link_down(now, link, "closed by the server"),
            }
        }
        self.drain(host);
    }

    /// Does what the core asks: messages to players, account checks answered from memory,
    /// closes, saves.
    fn drain_control(&mut self) {
        let now = self.now;
        let unix = UnixTime(self.clock().unix_secs(now));
        let Some(cp) = self.control_plane.as_mut() else { return };
        while let Some(out) = cp.core.poll_output() {
            match out {
                Output::Send(conn, msg) => match cp.conns.get(&conn) {
                    Some(&(host, link)) => cp.carry(now + cp.latency, Carried::ToPlayer { host, link, msg }),
                    None => cp.stats.undeliverable += 1,
                },
                Output::Verify { conn, account, password } => {
                    let accepted = cp.accounts.get(&account).is_some_and(|p| *p == password);
                    cp.core.on_verdict(unix, conn, accepted.then_some(account));
                }
                Output::FindAccount { conn, node } => {
                    let account = cp.characters.get(&node).cloned();
                    cp.core.on_account(unix, conn, account);
                }
                Output::Close(conn) => {
                    if let Some((host, link)) = cp.conns.remove(&conn) {
                        cp.by_link.remove(&(host, link));
                        cp.carry(now + cp.latency, Carried::ClosedByServer { host, link });
                    }
                }
                Output::SaveCharacter(c) => {
                    cp.stats.saves += 1;
                    cp.characters.insert(NodeId(c.node_id), c.account);
                }
                // Relays have their permits and peers from the simulation; feeds they take.
                Output::SendRelay(conn, msg @ ControlToRelay::Feed { .. }) => {
                    match cp.relays.iter().find(|(_, (c, _))| *c == conn) {
                        Some((&host, _)) => cp.carry(now + cp.latency, Carried::ToRelay { host, msg }),
                        None => cp.stats.undeliverable += 1,
                    }
                }
                Output::SendRelay(..) => {}
                // The simulator runs no hosting servers.
                Output::SendHosting(..) => cp.stats.undeliverable += 1,
            }
        }
    }
}
