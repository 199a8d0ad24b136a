//! A player's session: the control-server client and the mesh node, run together.
//!
//! [`Session::start`] signs in over QUIC, starts the node with the relay permit it receives,
//! binds to the relays the welcome names and checks in with the node's addresses. From then
//! on a background task
//! - reports the player's state ([`Session::set_state`]) with every VC's stats, the relays'
//!   round-trip times and the peers lost since the last report, every
//!   [`SessionConfig::report_every`];
//! - acts on introductions by adding the neighbour and opening the VCs it names (or
//!   [`SessionConfig::profiles`]), and on farewells by closing them;
//! - installs renewed permits, and checks in again when a relay sees a new address for us;
//! - when the control connection is lost, keeps the mesh running and reconnects with
//!   exponential backoff, resuming with its session ticket (signing in again with the
//!   credentials if the ticket is refused).
//!
//! The game reads everything that happens from [`Session::next`] and talks on VCs through
//! the [`NodeHandle`] the session derefs to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use renet::Bytes;
use shoal_link::{ControlLink, LinkError, Trust, write_message};
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::control::{
    ClientToControl, ControlToClient, Introduction, KeyProof, LinkReport, Refusal, RelayInfo, Report,
};
use shoal_protocol::{Identity, NodeId, SignedTicket};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::driver::{Client, ClientEvent, NodeHandle, NodeStatus};
use crate::node::{Event, NodeError, PeerInfo, VcKey};
use crate::path::PathKind;
use crate::profile::{Profile, ProfileConfig};
use crate::vc::{CloseReason, VcEvent};

/// Direct addresses of a neighbour punched at once: its observed address and its first local
/// ones. Each costs a burst of probes per attempt.
const MAX_DIRECT_CANDIDATES: usize = 4;

/// What a session needs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The control server.
    pub control: SocketAddr,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// The account.
    pub account: String,
    /// Its password (sent inside TLS only).
    pub password: String,
    /// The player's long-term key.
    pub identity: Identity,
    /// Where the mesh socket binds.
    pub mesh_bind: SocketAddr,
    /// Hash of this build, checked against the server's allow-list.
    pub build_hash: [u8; 32],
    /// How often the session reports.
    pub report_every: Duration,
    /// VCs opened with every introduced neighbour when the introduction names none.
    pub profiles: Vec<(VcId, Profile)>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// First wait before reconnecting; doubles per failed attempt.
    pub reconnect_min: Duration,
    /// Longest wait between attempts.
    pub reconnect_max: Duration,
}

impl SessionConfig {
    /// A session with the defaults: mesh socket on any address, a report a second, realtime
    /// (VC 1) and reliable (VC 2) VCs with each neighbour, reconnects from 250 ms up to 10 s.
    pub fn new(control: SocketAddr, trust: Trust, account: &str, password: &str, identity: Identity) -> SessionConfig {
        let any: IpAddr = if control.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
        SessionConfig {
            control,
            trust,
            account: account.into(),
            password: password.into(),
            identity,
            mesh_bind: SocketAddr::new(if control.ip().is_loopback() { control.ip() } else { any }, 0),
            build_hash: [0; 32],
            report_every: Duration::from_secs(1),
            profiles: vec![(VcId(1), Profile::realtime(false)), (VcId(2), Profile::reliable())],
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(10),
        }
    }
}

/// What the player reports about itself; the session sends the latest with each report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlayerState {
    /// Where the character is.
    pub position: [f32; 3],
    /// A short status word ("playing", "loading").
    pub status: String,
    /// The character's state, persisted by the control server.
    pub character: Vec<u8>,
    /// Application status and data.
    pub app: Vec<u8>,
    /// Game state.
    pub game: Vec<u8>,
}

/// Something that happened in the session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A node event (VC opened, path changed, closed; relay bound or lost).
    Node(Event),
    /// A message arrived on a VC.
    Message(VcKey, Bytes),
    /// The control server introduced a neighbour; these VCs were opened with it.
    Introduced {
        /// The neighbour.
        peer: NodeId,
        /// The VCs opened.
        vcs: Vec<VcKey>,
    },
    /// A neighbour is no longer one; these VCs were closed.
    Farewell {
        /// The former neighbour.
        peer: NodeId,
        /// The VCs closed.
        closed: Vec<VcKey>,
    },
    /// The control server takes this address for our mesh socket (told once per address,
    /// however often it repeats it).
    Observed(SocketAddr),
    /// The control connection was lost; the mesh runs on and the session reconnects.
    ControlLost(String),
    /// Reconnected and resumed (or signed in again).
    ControlRestored,
    /// The control server refused something. After a refusal that ends the session
    /// (credentials, implausible reports, unknown build) the session stops reconnecting.
    Refused(Refusal),
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The control server could not be reached or the link broke.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Connecting took longer than [`SessionConfig::connect_timeout`].
    #[error("the control server did not answer in time")]
    Timeout,
    /// The control server refused the sign-in.
    #[error("the control server refused: {0}")]
    Refused(Refusal),
    /// The welcome carried something unusable.
    #[error("bad welcome: {0}")]
    BadWelcome(String),
    /// The mesh socket could not be set up.
    #[error("mesh socket: {0}")]
    Io(#[from] std::io::Error),
}

enum Cmd {
    SetState(PlayerState),
    SignOut,
}

/// A signed-in player. See the module docs.
#[derive(Debug)]
pub struct Session {
    node: NodeHandle,
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    id: NodeId,
    /// The session task; taken by [`Session::sign_out`].
    task: Option<JoinHandle<()>>,
}

impl Deref for Session {
    type Target = NodeHandle;

    fn deref(&self) -> &NodeHandle {
        &self.node
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a successful sign-in or resume gives.
struct Welcome {
    session: Vec<u8>,
    permit: SignedTicket,
    relays: Vec<RelayInfo>,
}

impl Session {
    /// Signs in, starts the mesh node and checks in. Fails if the control server cannot be
    /// reached or refuses; reconnects after that are the session's own business.
    pub async fn start(cfg: SessionConfig) -> Result<Session, SessionError> {
        let (link, welcome) = connect(&cfg, None).await?;
        let socket = UdpSocket::bind(cfg.mesh_bind).await?;
        let client = Client::start(socket, cfg.identity.clone(), welcome.permit)?;
        let (id, node) = (client.id(), client.handle());
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let mut task = Task::new(cfg, client, cmd_rx, ev_tx);
        task.attach(link, welcome).await;
        let task = Some(tokio::spawn(task.run()));
        Ok(Session { node, cmds, events, id, task })
    }

    /// Our node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Sets what the next reports carry.
    pub fn set_state(&self, state: PlayerState) {
        let _ = self.cmds.send(Cmd::SetState(state));
    }

    /// The next event; `None` once the session has stopped.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }

    /// Tells the relays to let go of the node's bindings, says goodbye to the control server
    /// and stops the node.
    pub async fn sign_out(mut self) {
        let _ = self.cmds.send(Cmd::SignOut);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Connects and signs in (or resumes with `ticket`, falling back to the credentials when the
/// server refuses the ticket), within the configured timeout.
async fn connect(cfg: &SessionConfig, ticket: Option<&[u8]>) -> Result<(ControlLink, Welcome), SessionError> {
    tokio::time::timeout(cfg.connect_timeout, async {
        let mut link = ControlLink::connect(cfg.control, &cfg.trust).await?;
        let server = link.server_fingerprint().ok_or_else(|| SessionError::BadWelcome("no certificate".into()))?;
        let proof = |account: &str| KeyProof::new(&cfg.identity, account, unix_ms(), &server);
        let sign_in = || ClientToControl::SignIn {
            account: cfg.account.clone(),
            password: cfg.password.clone(),
            proof: proof(&cfg.account),
        };
        let first = match ticket {
            // A resume claims no account (the server finds it), so its proof names none.
            Some(t) => ClientToControl::Resume { session: t.to_vec(), proof: proof("") },
            None => sign_in(),
        };
        link.send(&first).await?;
        let mut resumed = ticket.is_some();
        loop {
            match link.recv::<ControlToClient>().await? {
                ControlToClient::Welcome { session, permit, relays, .. } => {
                    let permit = SignedTicket::decode(&permit).map_err(|e| SessionError::BadWelcome(e.to_string()))?;
                    return Ok((link, Welcome { session, permit, relays }));
                }
                ControlToClient::Refused(Refusal::BadTicket | Refusal::NotSignedIn) if resumed => {
                    // The ticket lapsed or the server cannot place it: sign in afresh.
                    resumed = false;
                    link.send(&sign_in()).await?;
                }
                ControlToClient::Refused(r) => return Err(SessionError::Refused(r)),
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| SessionError::Timeout)?
}

/// The addresses the mesh socket is reachable on from the control server's side: its own
/// address, or (bound to any address) the interface the route to the control server uses.
fn local_candidates(mesh: SocketAddr, control: SocketAddr) -> Vec<SocketAddr> {
    if !mesh.ip().is_unspecified() {
        return vec![mesh];
    }
    // Connecting a UDP socket sends nothing; it only asks the kernel for the route.
    let probe = std::net::UdpSocket::bind(SocketAddr::new(mesh.ip(), 0))
        .and_then(|s| s.connect(control).and_then(|()| s.local_addr()));
    probe.map(|a| vec![SocketAddr::new(a.ip(), mesh.port())]).unwrap_or_default()
}

/// A refusal after which reconnecting cannot help.
fn is_final(r: Refusal) -> bool {
    matches!(r, Refusal::BadCredentials | Refusal::Implausible | Refusal::UnknownBuild)
}

/// What the reader task hands the session task.
enum Incoming {
    Message(u64, ControlToClient),
    Lost(u64, String),
}

/// The control connection while it is up; its reader runs on its own task.
struct Up {
    send: quinn::SendStream,
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

struct Task {
    cfg: SessionConfig,
    /// The node; commands go through its [`NodeHandle`].
    client: Client,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<SessionEvent>,
    link: Option<Up>,
    /// Which connection the reader's messages belong to.
    generation: u64,
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// While disconnected: the next attempt (its backoff wait, then connecting).
    reconnecting: Option<JoinHandle<Result<(ControlLink, Welcome), SessionError>>>,
    backoff: Duration,
    /// No more reconnecting (a final refusal).
    refused: bool,
    ticket: Vec<u8>,
    state: PlayerState,
    seq: u64,
    lost: BTreeSet<NodeId>,
    auth_failures: BTreeMap<VcKey, u64>,
    sent_rtts: Vec<(NodeId, u32)>,
    observed: Option<SocketAddr>,
    /// The relay whose view of us `observed` is.
    observed_by: Option<SocketAddr>,
    /// The address the control server last answered a check-in with.
    control_observed: Option<SocketAddr>,
}

impl Task {
    fn new(
        cfg: SessionConfig,
        client: Client,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        events: mpsc::UnboundedSender<SessionEvent>,
    ) -> Task {
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        Task {
            backoff: cfg.reconnect_min,
            cfg,
            client,
            cmds,
            events,
            link: None,
            generation: 0,
            incoming_tx,
            incoming,
            reconnecting: None,
            refused: false,
            ticket: Vec::new(),
            state: PlayerState::default(),
            seq: 0,
            lost: BTreeSet::new(),
            auth_failures: BTreeMap::new(),
            sent_rtts: Vec::new(),
            observed: None,
            observed_by: None,
            control_observed: None,
        }
    }

    /// A relay bound us and saw us at `observed`: returns whether that is news for the
    /// control server (the first relay's view, or a change in it).
    fn note_observed(&mut self, relay: SocketAddr, observed: SocketAddr) -> bool {
        if self.observed_by.is_some_and(|r| r != relay) || self.observed == Some(observed) {
            return false;
        }
        self.observed_by = Some(relay);
        self.observed = Some(observed);
        true
    }

    fn emit(&self, e: SessionEvent) {
        let _ = self.events.send(e);
    }

    /// Takes a freshly signed-in link into use.
    async fn attach(&mut self, link: ControlLink, welcome: Welcome) {
        let ControlLink { endpoint, connection, send, mut recv } = link;
        self.generation += 1;
        let (generation, tx) = (self.generation, self.incoming_tx.clone());
        tokio::spawn(async move {
            loop {
                match recv.read_message::<ControlToClient>().await {
                    Ok(m) => {
                        if tx.send(Incoming::Message(generation, m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Incoming::Lost(generation, e.to_string()));
                        return;
                    }
                }
            }
        });
        self.link = Some(Up { send, connection, endpoint });
        self.ticket = welcome.session;
        let _ = self.client.set_permit(welcome.permit);
        self.add_relays(welcome.relays.iter());
        self.backoff = self.cfg.reconnect_min;
        self.check_in().await;
    }

    /// Binds to relays (the node ignores ones it already has).
    fn add_relays<'a>(&self, relays: impl Iterator<Item = &'a RelayInfo>) {
        for r in relays {
            let _ = self.client.add_relay(r.addr);
        }
    }

    async fn send(&mut self, msg: &ClientToControl) {
        let Some(up) = &mut self.link else { return };
        if let Err(e) = write_message(&mut up.send, msg).await {
            self.lose(e.to_string());
        }
    }

    async fn check_in(&mut self) {
        let local = local_candidates(self.client.local_addr(), self.cfg.control);
        let mesh_port = self.client.local_addr().port();
        let reflexive = self.observed;
        self.send(&ClientToControl::CheckIn { local, mesh_port, reflexive }).await;
    }

    /// The control connection is gone: schedule a reconnect.
    fn lose(&mut self, why: String) {
        let Some(up) = self.link.take() else { return };
        up.connection.close(0u32.into(), b"lost");
        self.emit(SessionEvent::ControlLost(why));
        self.schedule_retry();
    }

    /// Starts the next attempt after the backoff.
    fn schedule_retry(&mut self) {
        if self.refused {
            return;
        }
        // Up to a quarter of jitter, so clients of a restarted server do not all come back in
        // the same instant.
        let mut r = [0u8; 2];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
        let jitter = self.backoff.mul_f64(f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) / 4.0);
        let wait = self.backoff + jitter;
        self.backoff = (self.backoff * 2).min(self.cfg.reconnect_max);
        let (cfg, ticket) = (self.cfg.clone(), self.ticket.clone());
        self.reconnecting = Some(tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            connect(&cfg, Some(&ticket)).await
        }));
    }

    async fn run(mut self) {
        let mut report = tokio::time::interval(self.cfg.report_every);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let attempt = async {
                match &mut self.reconnecting {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = self.client.next() => {
                    let Some(ev) = ev else { return };
                    let moved = match &ev {
                        ClientEvent::Node(Event::RelayBound { addr, observed, .. }) => {
                            self.note_observed(*addr, *observed)
                        }
                        ClientEvent::Node(Event::RelayLost { addr, .. }) => {
                            // Another relay's view will do from now on.
                            if self.observed_by == Some(*addr) {
                                self.observed_by = None;
                            }
                            false
                        }
                        _ => false,
                    };
                    self.on_node(ev);
                    if moved {
                        // At once, not at the next report: introductions made meanwhile
                        // would hand peers a guessed address for our mesh socket.
                        self.check_in().await;
                    }
                }
                m = self.incoming.recv() => match m {
                    Some(Incoming::Message(g, m)) if g == self.generation => self.on_control(m).await,
                    Some(Incoming::Lost(g, why)) if g == self.generation => self.lose(why),
                    Some(_) => {}
                    None => return,
                },
                c = self.cmds.recv() => match c {
                    Some(Cmd::SetState(s)) => self.state = s,
                    Some(Cmd::SignOut) | None => {
                        // The relays let go of our bindings now, not when they time out.
                        if let Err(e) = self.client.unbind_relays().await {
                            tracing::debug!("unbinding from the relays: {e}");
                        }
                        self.send(&ClientToControl::SignOut).await;
                        if let Some(mut up) = self.link.take() {
                            let _ = up.send.finish();
                            let _ = tokio::time::timeout(Duration::from_secs(1), up.send.stopped()).await;
                            up.connection.close(0u32.into(), b"signed out");
                            let _ = tokio::time::timeout(Duration::from_secs(1), up.endpoint.wait_idle()).await;
                        }
                        if let Some(attempt) = self.reconnecting.take() {
                            attempt.abort();
                        }
                        return;
                    }
                },
                done = attempt => {
                    self.reconnecting = None;
                    match done {
                        Ok(Ok((link, welcome))) => {
                            self.attach(link, welcome).await;
                            self.emit(SessionEvent::ControlRestored);
                        }
                        Ok(Err(SessionError::Refused(r))) if is_final(r) => {
                            self.refused = true;
                            self.emit(SessionEvent::Refused(r));
                        }
                        Ok(Err(e)) => {
                            tracing::debug!("reconnecting to the control server: {e}");
                            self.schedule_retry();
                        }
                        Err(_) => self.schedule_retry(),
                    }
                }
                _ = report.tick() => self.report().await,
            }
        }
    }

    fn on_node(&mut self, ev: ClientEvent) {
        match ev {
            ClientEvent::Node(e) => {
                if let Event::Vc(key, VcEvent::Closed(reason)) = &e
                    && !matches!(reason, CloseReason::Local | CloseReason::Peer)
                {
                    self.lost.insert(key.peer);
                }
                self.emit(SessionEvent::Node(e));
            }
            ClientEvent::Message(k, m) => self.emit(SessionEvent::Message(k, m)),
        }
    }

    async fn on_control(&mut self, m: ControlToClient) {
        match m {
            ControlToClient::Introduce(intro) => self.introduce(*intro).await,
            ControlToClient::Farewell(peer) => {
                let closed = self.client.remove_peer(peer).await.unwrap_or_default();
                self.emit(SessionEvent::Farewell { peer, closed });
            }
            ControlToClient::Permit(p) => match SignedTicket::decode(&p) {
                Ok(p) => {
                    let _ = self.client.set_permit(p);
                }
                Err(e) => tracing::warn!("control server sent an unreadable permit: {e}"),
            },
            ControlToClient::Observed(a) => {
                // Every check-in is answered, and the session checks in again when a relay
                // reports our mapping and after a reconnect: mostly with the same answer.
                if self.control_observed.replace(a) != Some(a) {
                    self.emit(SessionEvent::Observed(a));
                }
            }
            ControlToClient::Refused(r) => {
                if is_final(r) {
                    self.refused = true;
                }
                self.emit(SessionEvent::Refused(r));
            }
            ControlToClient::Welcome { .. } => {}
        }
    }

    async fn introduce(&mut self, intro: Introduction) {
        let peer = intro.peer_key.node_id();
        self.add_relays(intro.relays.iter());
        // Two-relay routes come first: the control server offers them only when its relay map
        // says they beat every single relay.
        let routes = intro.routes.iter().filter_map(|r| Route::new(&r.relays));
        let single = intro.relays.iter().filter_map(|r| Route::new(&[r.id]));
        // Relayed paths first, so the VC starts on one at once; the direct candidates after
        // them are punched in parallel and take over when they answer.
        let direct = intro.observed.into_iter().chain(intro.local.iter().copied()).take(MAX_DIRECT_CANDIDATES);
        let mut paths: Vec<Path> = routes.chain(single).map(Path::Relayed).collect();
        for addr in direct {
            if !paths.contains(&Path::Direct(addr)) {
                paths.push(Path::Direct(addr));
            }
        }
        let _ = self.client.add_peer(PeerInfo { key: intro.peer_key, paths });
        let profiles: Vec<(VcId, Profile)> = if intro.profiles.is_empty() {
            self.cfg.profiles.clone()
        } else {
            intro
                .profiles
                .iter()
                .filter_map(|(vc, w)| Some((VcId(*vc), Profile::from_config(&ProfileConfig::from_wire(w).ok()?).ok()?)))
                .collect()
        };
        let mut vcs = Vec::with_capacity(profiles.len());
        for (vc, profile) in profiles {
            // Both sides open; whichever hello lands first opens the other side's VC.
            match self.client.open(peer, vc, profile).await {
                Ok(key) => vcs.push(key),
                Err(crate::ClientError::Node(NodeError::Exists(key))) => vcs.push(key),
                Err(e) => tracing::warn!("opening VC {vc:?} with {peer}: {e}"),
            }
        }
        self.emit(SessionEvent::Introduced { peer, vcs });
    }

    async fn report(&mut self) {
        if self.link.is_none() {
            return;
        }
        let Ok(status) = self.client.status().await else { return };
        let rtts: Vec<(NodeId, u32)> =
            status.relays.iter().map(|(id, _, rtt)| (*id, rtt.as_micros().min(u32::MAX.into()) as u32)).collect();
        if !rtts.is_empty() && rtts != self.sent_rtts {
            self.send(&ClientToControl::RelayRtts(rtts.clone())).await;
            self.sent_rtts = rtts;
        }
        self.seq += 1;
        let r = Report {
            seq: self.seq,
            unix_ms: unix_ms(),
            status: self.state.status.clone(),
            app: self.state.app.clone(),
            build_hash: self.cfg.build_hash,
            position: self.state.position,
            character: self.state.character.clone(),
            game: self.state.game.clone(),
            links: self.links(&status),
            lost: std::mem::take(&mut self.lost).into_iter().collect(),
        };
        self.send(&ClientToControl::Report(Box::new(r))).await;
    }

    fn links(&mut self, status: &NodeStatus) -> Vec<LinkReport> {
        let mut seen = BTreeMap::new();
        let links = status
            .links
            .iter()
            .map(|(key, s)| {
                let total = s.counters.auth_failures;
                let before = self.auth_failures.get(key).copied().unwrap_or(0);
                seen.insert(*key, total);
                let route = s.path.as_ref().map(|p| p.path.route());
                LinkReport {
                    peer: key.peer,
                    vc: key.vc.0,
                    path_kind: match s.path.as_ref().map(|p| p.kind) {
                        Some(PathKind::Direct) | None => 0,
                        Some(PathKind::OneRelay) => 1,
                        Some(PathKind::MultiRelay) => 2,
                    },
                    relays: route.map(|r| r.relays().to_vec()).unwrap_or_default(),
                    rtt_us: s.rtt.map_or(0, |r| r.as_micros().min(u32::MAX.into()) as u32),
                    loss: s.loss,
                    send_bps: s.send_bytes_per_sec.min(f64::from(u32::MAX)) as u32,
                    recv_bps: s.recv_bytes_per_sec.min(f64::from(u32::MAX)) as u32,
                    auth_failures: total.saturating_sub(before).min(u64::from(u32::MAX)) as u32,
                }
            })
            .collect();
        self.auth_failures = seen;
        links
    }
}
