//! The session's decisions, sans-IO: the control link's life (connect, sign in or resume,
//! fall back, back off, reconnect), what the control server's messages mean for the node, and
//! when to check in and report.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
use renet::Bytes;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, SubscribeStatus, VcId};
use shoal_protocol::control::{ClientToControl, ControlToClient, Introduction, KeyProof, Refusal, WatchGrant};
use shoal_protocol::subscription::AVATAR_STREAM;
use shoal_protocol::{Identity, NodeId, SignedSubscription, SignedTicket};

use super::commands::{NodeCommand, NodeOutcome};
use super::{PlayerState, SessionConfig, SessionEvent, StateError, check_state};
use crate::avatar::{AvatarMesh, AvatarState, MeshCounters, Publishing};
use crate::frame::SEALED_OVERHEAD;
use crate::node::{Event, PeerInfo, VcKey};
use crate::profile::{Profile, ProfileConfig};
use crate::vc::{CloseReason, VcEvent};

/// Direct addresses of a neighbour punched at once: its observed address and its first local
/// ones. Each costs a burst of probes per attempt.
const MAX_DIRECT_CANDIDATES: usize = 4;

/// Bytes a realtime VC datagram is taken to carry besides an avatar message, for the upload
/// budget, until the node says what the neighbour's path costs: a sealed frame with a message
/// item in a mesh datagram on a direct path.
const AVATAR_HEADER_BYTES: usize = shoal_mesh::wire::HEADER_LEN + SEALED_OVERHEAD;

/// Names one control connection of a session, so that what a driver reports about a
/// connection the session has given up on (a late handshake, the last messages of a lost
/// link) is told apart and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// What the session asks of its control link.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkCommand {
    /// Open a connection to the control server and report it with
    /// [`SessionCore::handle_link_up`], or its failure with [`SessionCore::handle_link_down`].
    /// The session sends the sign-in (`resume` false) or the resumption with its ticket
    /// (`resume` true) once it is up.
    Connect {
        /// The connection.
        link: LinkId,
        /// Whether it will resume with the session ticket.
        resume: bool,
    },
    /// Send a message on the connection (in order, after those before it).
    Send {
        /// The connection.
        link: LinkId,
        /// The message.
        msg: ClientToControl,
    },
    /// Drop the connection (or the attempt to open it) at once: it failed, timed out or was
    /// lost.
    Close {
        /// The connection.
        link: LinkId,
    },
    /// Close the connection once what was sent on it has been delivered: the session signed
    /// out.
    Finish {
        /// The connection.
        link: LinkId,
    },
}

/// Why the first sign-in failed. Later attempts do not fail the session: it backs off and
/// tries again, unless the refusal is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// The control server refused the sign-in.
    Refused(Refusal),
    /// The attempt took longer than [`SessionConfig::connect_timeout`].
    Timeout,
    /// The welcome's permit could not be read.
    BadWelcome(String),
    /// The connection failed or broke; the driver's words.
    Link(String),
}

/// What the session did and what it dropped, each drop reason apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Connection attempts started.
    pub attempts: u64,
    /// Welcomes taken (the first sign-in and every reconnect).
    pub welcomes: u64,
    /// Of those, sessions resumed with the ticket.
    pub resumed: u64,
    /// Resumptions refused and followed by a sign-in with the credentials.
    pub fallbacks: u64,
    /// Attempts given up after [`SessionConfig::connect_timeout`].
    pub timeouts: u64,
    /// Attempts whose connection failed or broke before the welcome.
    pub failed_attempts: u64,
    /// Signed-in connections lost.
    pub lost: u64,
    /// Reports sent.
    pub reports: u64,
    /// Check-ins sent.
    pub check_ins: u64,
    /// Messages and link reports about a connection the session has given up on, dropped.
    pub stale: u64,
    /// Messages that mean nothing in the session's state (anything but a welcome or a
    /// refusal before the welcome, a second welcome), dropped.
    pub unexpected: u64,
    /// Welcomes whose permit could not be read.
    pub bad_welcomes: u64,
    /// Renewed permits that could not be read, dropped.
    pub bad_permits: u64,
    /// Watch grants whose subscription did not read or was not for us and that player.
    pub bad_grants: u64,
    /// Subscriptions a relay refused.
    pub subscriptions_refused: u64,
    /// Profiles in introductions that could not be read, skipped.
    pub bad_profiles: u64,
    /// States refused by [`SessionCore::set_state`]: their reports would not fit a frame.
    pub states_too_large: u64,
    /// Link stats left out of reports so that they fit a frame.
    pub links_trimmed: u64,
    /// Lost peers left out of reports so that they fit a frame.
    pub lost_trimmed: u64,
    /// Avatar messages the node refused (their VC closed or its queue full).
    pub avatar_sends_refused: u64,
}

/// Where the control link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting out the backoff before the next attempt.
    Waiting { retry_at: Instant },
    /// An attempt: the connection is opening (`server` unknown), then signing in.
    Connecting { link: LinkId, deadline: Instant, server: Option<[u8; 32]>, resuming: bool },
    /// Signed in.
    Up { link: LinkId },
    /// Not connecting any more: signed out, refused for good, or the first sign-in failed.
    Stopped,
}

/// A player's session, sans-IO. See the module docs of [`crate::session`].
///
/// Call order: after [`SessionCore::new`] and after every input (`handle_*`,
/// [`SessionCore::set_state`], [`SessionCore::sign_out`]), drain [`SessionCore::poll_command`]
/// (applying each command to the node in order and feeding its outcome back at once with
/// [`SessionCore::handle_node_outcome`]), then [`SessionCore::poll_transmit`], then
/// [`SessionCore::poll_event`], until all three are empty; then call
/// [`SessionCore::handle_timeout`] when [`SessionCore::poll_timeout`] says, or sooner when an
/// input arrives. Commands come before transmits so that the node holds a permit and relays
/// before the check-in that follows a welcome, and unbinds before a sign-out closes the link.
///
/// The node's state for reports is fed in ([`NodeCommand::Status`] answered with
/// [`NodeOutcome::Status`]) rather than read from a `&Node`: the tokio driver's node runs in
/// a task of its own and answers through a channel, and a request and its answer serve both
/// drivers alike.
#[derive(Debug)]
pub struct SessionCore {
    cfg: SessionConfig,
    pub(super) clock: WallClock,
    rng: Xoshiro256PlusPlus,
    phase: Phase,
    next_link: u64,
    signed_in_once: bool,
    start_failure: Option<StartFailure>,
    /// A final refusal came: no more reconnecting.
    refused: bool,
    backoff: Duration,
    ticket: Vec<u8>,
    pub(super) state: PlayerState,
    pub(super) seq: u64,
    pub(super) lost: BTreeSet<NodeId>,
    pub(super) auth_failures: BTreeMap<VcKey, u64>,
    pub(super) sent_rtts: Vec<(NodeId, u32)>,
    /// Our mesh socket's address as a relay saw it.
    observed: Option<SocketAddr>,
    /// The relay whose view of us `observed` is.
    observed_by: Option<SocketAddr>,
    /// The address the control server last answered a check-in with.
    control_observed: Option<SocketAddr>,
    local: Vec<SocketAddr>,
    mesh_port: u16,
    next_report: Option<Instant>,
    status_pending: bool,
    pub(super) transmits: VecDeque<LinkCommand>,
    commands: VecDeque<NodeCommand>,
    events: VecDeque<SessionEvent>,
    pub(super) counters: SessionCounters,
    /// Our avatar served to the neighbours and theirs shown, unless avatars are off.
    pub(super) avatars: Option<AvatarMesh>,
    /// When the avatar mesh is next due.
    avatar_wake: Option<Instant>,
    /// Per neighbour, the arrival of the newest of its avatars a report carried.
    pub(super) observed_sent: BTreeMap<NodeId, Instant>,
    /// The key our published stream is sealed with, given to the control server at each
    /// welcome for our watchers.
    stream_key: [u8; 32],
    /// Per watched player, the subscription its grant gave, the relay's address, and whether
    /// the relay took it: presented again whenever that relay binds us, and at each report
    /// until taken (a subscribe may be lost).
    subscriptions: BTreeMap<NodeId, (SignedSubscription, SocketAddr, bool)>,
}

/// The key a session seals its published stream with: the SHA-256 of our signature over the
/// time the session started, so that only we could have made it, and a new session has a new
/// one, with no randomness to draw (the simulator replays sessions exactly).
fn stream_key(identity: &Identity, unix_us: u64) -> [u8; 32] {
    let sig = identity.sign(b"shoal/stream-key/v1", &unix_us.to_be_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &sig.0).as_ref());
    key
}

impl SessionCore {
    /// A session for `cfg` that starts its first attempt at `now` (a [`LinkCommand::Connect`]
    /// is waiting). `clock` gives the Unix time of key proofs and reports; `rng` draws the
    /// reconnect jitter.
    pub fn new(now: Instant, cfg: SessionConfig, clock: WallClock, rng: Xoshiro256PlusPlus) -> SessionCore {
        let avatars = cfg.avatars.map(|a| AvatarMesh::new(a.codec, a.interp, a.rates, AVATAR_HEADER_BYTES, now));
        let mut core = SessionCore {
            avatars,
            avatar_wake: None,
            observed_sent: BTreeMap::new(),
            stream_key: stream_key(&cfg.identity, clock.unix_us(now)),
            subscriptions: BTreeMap::new(),
            backoff: cfg.reconnect_min,
            cfg,
            clock,
            rng,
            phase: Phase::Stopped,
            next_link: 0,
            signed_in_once: false,
            start_failure: None,
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
            local: Vec::new(),
            mesh_port: 0,
            next_report: None,
            status_pending: false,
            transmits: VecDeque::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            counters: SessionCounters::default(),
        };
        core.start_attempt(now);
        core
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Counters.
    pub fn counters(&self) -> SessionCounters {
        self.counters
    }

    /// Whether the session is signed in on a live connection now.
    pub fn is_signed_in(&self) -> bool {
        matches!(self.phase, Phase::Up { .. })
    }

    /// Whether the session has stopped connecting: signed out, refused for good, or its first
    /// sign-in failed ([`SessionCore::start_failure`] says why).
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Why the first sign-in failed, if it did.
    pub fn start_failure(&self) -> Option<&StartFailure> {
        self.start_failure.as_ref()
    }

    /// The state reports carry now.
    pub fn state(&self) -> &PlayerState {
        &self.state
    }

    /// Tells the session the mesh socket's addresses, for check-ins: `local` as the socket
    /// sees itself (its address, or the interface towards the control server when bound to
    /// any address), and its port. The driver calls it at start and after the socket moved.
    pub fn set_local_addrs(&mut self, local: Vec<SocketAddr>, mesh_port: u16) {
        self.local = local;
        self.mesh_port = mesh_port;
    }

    /// Sets what the next reports carry; refuses (and never sends) a state whose report would
    /// not fit a control frame.
    pub fn set_state(&mut self, state: PlayerState) -> Result<(), StateError> {
        if let Err(e) = check_state(&state) {
            self.counters.states_too_large += 1;
            return Err(e);
        }
        self.state = state;
        Ok(())
    }

    /// The player's avatar from now on: served to every neighbour at the rate its distance
    /// and the upload budget allow, and its position reported to the control server.
    pub fn set_avatar(&mut self, now: Instant, state: AvatarState) {
        self.state.position = state.position.to_array();
        if let Some(m) = &mut self.avatars {
            m.set_avatar(state);
        }
        self.wake_avatars(now);
    }

    /// The session ticket of the last welcome (empty before one): what a hosting server's
    /// hello carries.
    pub fn session_ticket(&self) -> &[u8] {
        &self.ticket
    }

    /// The VC avatars travel on, if the session serves them: the driver hands every message
    /// on it to [`SessionCore::handle_avatar_message`] instead of the game.
    pub fn avatar_vc(&self) -> Option<VcId> {
        self.cfg.avatars.map(|a| a.vc)
    }

    /// A message arrived from `peer` on the avatar VC.
    pub fn handle_avatar_message(&mut self, now: Instant, peer: NodeId, msg: &[u8]) {
        if let Some(m) = &mut self.avatars {
            m.handle_message(now, peer, msg);
        }
        self.take_avatar_events();
        self.wake_avatars(now);
    }

    /// Neighbour `peer`'s avatar as shown at `now` (interpolated a little behind the newest
    /// update), once it has appeared.
    pub fn avatar_of(&self, peer: NodeId, now: Instant) -> Option<AvatarState> {
        self.avatars.as_ref()?.avatar_of(peer, now)
    }

    /// Every shown neighbour's avatar at `now`, in id order.
    pub fn avatars(&self, now: Instant) -> Vec<(NodeId, AvatarState)> {
        let Some(m) = &self.avatars else { return Vec::new() };
        m.neighbours().filter_map(|p| Some((p, m.avatar_of(p, now)?))).collect()
    }

    /// The avatar mesh, when avatars are on: its counters and the rates it serves at.
    pub fn avatar_mesh(&self) -> Option<&AvatarMesh> {
        self.avatars.as_ref()
    }

    /// The avatar mesh's counters (zero when avatars are off).
    pub fn avatar_counters(&self) -> MeshCounters {
        self.avatars.as_ref().map(AvatarMesh::counters).unwrap_or_default()
    }

    /// Sends what the avatar mesh has due, and reads when it is next due.
    fn serve_avatars(&mut self, now: Instant) {
        let (Some(m), Some(vc)) = (&mut self.avatars, self.cfg.avatars.map(|a| a.vc)) else { return };
        if self.phase == Phase::Stopped {
            return;
        }
        let out: Vec<(VcKey, Bytes)> =
            m.poll_messages(now).into_iter().map(|(peer, msg)| (VcKey { peer, vc }, Bytes::from(msg))).collect();
        if !out.is_empty() {
            self.commands.push_back(NodeCommand::Send(out));
        }
        while let Some((relay, payload)) = m.poll_publish(now) {
            self.commands.push_back(NodeCommand::Publish { relay, stream: AVATAR_STREAM.0, payload });
        }
        self.wake_avatars(now);
    }

    fn wake_avatars(&mut self, now: Instant) {
        let stopped = self.phase == Phase::Stopped;
        self.avatar_wake = self.avatars.as_ref().filter(|_| !stopped).and_then(|m| m.poll_timeout(now));
    }

    fn take_avatar_events(&mut self) {
        let Some(m) = &mut self.avatars else { return };
        while let Some(e) = m.poll_event() {
            self.events.push_back(SessionEvent::Avatar(e));
        }
    }

    /// Signs out: the relays are told to let go of our bindings, the control server is told
    /// goodbye, and the link is finished. Nothing more is attempted.
    pub fn sign_out(&mut self, _now: Instant) {
        self.avatar_wake = None;
        self.commands.push_back(NodeCommand::UnbindRelays);
        match self.phase {
            Phase::Up { link } => {
                self.transmits.push_back(LinkCommand::Send { link, msg: ClientToControl::SignOut });
                self.transmits.push_back(LinkCommand::Finish { link });
            }
            Phase::Connecting { link, .. } => self.transmits.push_back(LinkCommand::Close { link }),
            Phase::Waiting { .. } | Phase::Stopped => {}
        }
        self.phase = Phase::Stopped;
    }

    /// The connection `link` is open; `server` is the fingerprint of the certificate the
    /// server presented (what key proofs are bound to).
    pub fn handle_link_up(&mut self, now: Instant, link: LinkId, server: [u8; 32]) {
        let Phase::Connecting { link: current, deadline, server: None, resuming } = self.phase else {
            self.counters.stale += 1;
            self.transmits.push_back(LinkCommand::Close { link });
            return;
        };
        if current != link {
            self.counters.stale += 1;
            self.transmits.push_back(LinkCommand::Close { link });
            return;
        }
        let first = if resuming {
            // A resume claims no account (the server finds it), so its proof names none.
            ClientToControl::Resume { session: self.ticket.clone(), proof: self.proof(now, "", &server) }
        } else {
            self.sign_in(now, &server)
        };
        self.transmits.push_back(LinkCommand::Send { link, msg: first });
        self.phase = Phase::Connecting { link, deadline, server: Some(server), resuming };
    }

    /// The connection `link` failed to open, or broke; `why` in the driver's words.
    pub fn handle_link_down(&mut self, now: Instant, link: LinkId, why: &str) {
        match self.phase {
            Phase::Connecting { link: current, .. } if current == link => {
                self.counters.failed_attempts += 1;
                self.fail_attempt(now, StartFailure::Link(why.to_string()));
            }
            Phase::Up { link: current } if current == link => {
                self.counters.lost += 1;
                self.transmits.push_back(LinkCommand::Close { link });
                self.events.push_back(SessionEvent::ControlLost(why.to_string()));
                self.schedule_retry(now);
            }
            _ => self.counters.stale += 1,
        }
    }

    /// A message from the control server arrived on `link`.
    pub fn handle_message(&mut self, now: Instant, link: LinkId, msg: ControlToClient) {
        match self.phase {
            Phase::Connecting { link: current, server: Some(server), resuming, deadline } if current == link => {
                match msg {
                    ControlToClient::Welcome { session, permit, relays, .. } => {
                        let permit = match SignedTicket::decode(&permit) {
                            Ok(p) => p,
                            Err(e) => {
                                self.counters.bad_welcomes += 1;
                                self.fail_attempt(now, StartFailure::BadWelcome(e.to_string()));
                                return;
                            }
                        };
                        self.counters.welcomes += 1;
                        self.counters.resumed += u64::from(resuming);
                        self.phase = Phase::Up { link };
                        self.ticket = session;
                        self.backoff = self.cfg.reconnect_min;
                        self.commands.push_back(NodeCommand::SetPermit(permit));
                        self.commands.extend(relays.iter().map(|r| NodeCommand::AddRelay(r.addr)));
                        self.check_in(link);
                        if self.avatars.is_some() {
                            let msg = ClientToControl::StreamKey(self.stream_key);
                            self.transmits.push_back(LinkCommand::Send { link, msg });
                        }
                        if std::mem::replace(&mut self.signed_in_once, true) {
                            self.events.push_back(SessionEvent::ControlRestored);
                        }
                        self.next_report.get_or_insert(now);
                    }
                    ControlToClient::Refused(Refusal::BadTicket | Refusal::NotSignedIn) if resuming => {
                        // The ticket lapsed or the server cannot place it: sign in afresh.
                        self.counters.fallbacks += 1;
                        let msg = self.sign_in(now, &server);
                        self.transmits.push_back(LinkCommand::Send { link, msg });
                        self.phase = Phase::Connecting { link, deadline, server: Some(server), resuming: false };
                    }
                    ControlToClient::Refused(r) => self.fail_attempt(now, StartFailure::Refused(r)),
                    _ => self.counters.unexpected += 1,
                }
            }
            Phase::Up { link: current } if current == link => self.on_control(now, msg),
            _ => self.counters.stale += 1,
        }
    }

    /// Something happened at the node. The session re-emits it as [`SessionEvent::Node`]
    /// after taking what it needs: relays' views of our address, and VCs lost.
    pub fn handle_node_event(&mut self, now: Instant, event: Event) {
        match &event {
            Event::Published { publisher, payload, .. } => {
                if let Some(m) = &mut self.avatars {
                    m.handle_published(now, *publisher, payload);
                }
                self.take_avatar_events();
                // Every copy would be an event: the avatar events say what the game needs.
                return;
            }
            Event::Subscription { ack, .. } => match ack.status {
                SubscribeStatus::Member => {
                    if let Some(s) = self.subscriptions.get_mut(&ack.publisher) {
                        s.2 = true;
                    }
                }
                SubscribeStatus::Left => {}
                _ => self.counters.subscriptions_refused += 1,
            },
            Event::RelayBound { addr, observed, .. } => {
                // The relay holds no subscription of ours yet (first bind, or it restarted).
                for (sub, _, taken) in self.subscriptions.values_mut().filter(|(_, a, _)| a == addr) {
                    *taken = false;
                    self.commands.push_back(NodeCommand::Subscribe(*sub));
                }
                if self.note_observed(*addr, *observed)
                    && let Phase::Up { link } = self.phase
                {
                    // At once, not at the next report: introductions made meanwhile would
                    // hand peers a guessed address for our mesh socket.
                    self.check_in(link);
                }
            }
            Event::RelayLost { addr, .. } => {
                // Another relay's view will do from now on.
                if self.observed_by == Some(*addr) {
                    self.observed_by = None;
                }
            }
            Event::Vc(key, VcEvent::Closed(reason)) if !matches!(reason, CloseReason::Local | CloseReason::Peer) => {
                self.lost.insert(key.peer);
            }
            Event::Vc(..) => {}
        }
        self.events.push_back(SessionEvent::Node(event));
    }

    /// The node's answer to a [`NodeCommand`].
    pub fn handle_node_outcome(&mut self, now: Instant, outcome: NodeOutcome) {
        match outcome {
            NodeOutcome::Introduced { peer, vcs } => {
                if let (Some(m), Some(vc)) = (&mut self.avatars, self.cfg.avatars.map(|a| a.vc))
                    && vcs.iter().any(|k| k.vc == vc)
                {
                    // Where the neighbour is, we learn from its first update; until then it is
                    // served as a near one, so that it sees us at once.
                    m.set_neighbour(now, peer, 0.0);
                    self.wake_avatars(now);
                }
                self.events.push_back(SessionEvent::Introduced { peer, vcs });
            }
            NodeOutcome::Removed { peer, closed } => {
                if let Some(m) = &mut self.avatars {
                    m.remove_neighbour(now, peer);
                    self.take_avatar_events();
                    self.wake_avatars(now);
                }
                self.events.push_back(SessionEvent::Farewell { peer, closed });
            }
            NodeOutcome::Sent { refused, headers, upload } => {
                self.counters.avatar_sends_refused += refused;
                if let Some(m) = &mut self.avatars {
                    m.observe_upload(upload);
                    for (peer, bytes) in headers {
                        // And the message item's kind byte.
                        m.set_header_bytes(peer, bytes + 1);
                    }
                }
            }
            NodeOutcome::Status(status) => {
                self.status_pending = false;
                if let Phase::Up { link } = self.phase {
                    self.report(now, link, &status);
                }
            }
            NodeOutcome::Unbind(_) => {}
        }
    }

    /// Runs what is due: the next attempt after a backoff, an attempt's timeout, a report,
    /// avatar updates and acks.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.avatar_wake.is_some_and(|t| t <= now) {
            self.serve_avatars(now);
        }
        match self.phase {
            Phase::Waiting { retry_at } if retry_at <= now => self.start_attempt(now),
            Phase::Connecting { deadline, .. } if deadline <= now => {
                self.counters.timeouts += 1;
                self.fail_attempt(now, StartFailure::Timeout);
            }
            _ => {}
        }
        if let (Phase::Up { .. }, Some(at)) = (self.phase, self.next_report)
            && at <= now
        {
            if !self.status_pending {
                self.status_pending = true;
                self.commands.push_back(NodeCommand::Status);
            }
            self.next_report = Some(now + self.cfg.report_every);
            for (sub, ..) in self.subscriptions.values().filter(|s| !s.2) {
                self.commands.push_back(NodeCommand::Subscribe(*sub));
            }
        }
    }

    /// When [`SessionCore::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = match self.phase {
            Phase::Waiting { retry_at } => Some(retry_at),
            Phase::Connecting { deadline, .. } => Some(deadline),
            Phase::Up { .. } => self.next_report,
            Phase::Stopped => None,
        };
        link.into_iter().chain(self.avatar_wake).min()
    }

    /// The next thing to do on the control link.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<LinkCommand> {
        self.transmits.pop_front()
    }

    /// The next command for the node.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<NodeCommand> {
        self.commands.pop_front()
    }

    /// The next event for the game.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    fn start_attempt(&mut self, now: Instant) {
        self.next_link += 1;
        let link = LinkId(self.next_link);
        let resuming = !self.ticket.is_empty();
        self.counters.attempts += 1;
        self.phase = Phase::Connecting { link, deadline: now + self.cfg.connect_timeout, server: None, resuming };
        self.transmits.push_back(LinkCommand::Connect { link, resume: resuming });
    }

    /// The attempt in progress failed: before the first welcome that ends the session;
    /// after it, the session backs off and tries again unless the refusal is final.
    fn fail_attempt(&mut self, now: Instant, why: StartFailure) {
        if let Phase::Connecting { link, .. } = self.phase {
            self.transmits.push_back(LinkCommand::Close { link });
        }
        if !self.signed_in_once {
            self.phase = Phase::Stopped;
            self.start_failure = Some(why);
            return;
        }
        match why {
            StartFailure::Refused(r) if is_final(r) => {
                self.refused = true;
                self.phase = Phase::Stopped;
                self.events.push_back(SessionEvent::Refused(r));
            }
            _ => {
                tracing::debug!("reconnecting to the control server: {why:?}");
                self.schedule_retry(now);
            }
        }
    }

    /// Waits out the backoff, with up to a quarter of it added as jitter so that the clients
    /// of a restarted server do not all come back in the same instant.
    fn schedule_retry(&mut self, now: Instant) {
        if self.refused {
            self.phase = Phase::Stopped;
            return;
        }
        let jitter = self.backoff.mul_f64(self.rng.random::<f64>() / 4.0);
        self.phase = Phase::Waiting { retry_at: now + self.backoff + jitter };
        self.backoff = (self.backoff * 2).min(self.cfg.reconnect_max);
    }

    fn proof(&self, now: Instant, account: &str, server: &[u8; 32]) -> KeyProof {
        KeyProof::new(&self.cfg.identity, account, self.clock.unix_us(now) / 1000, server)
    }

    fn sign_in(&self, now: Instant, server: &[u8; 32]) -> ClientToControl {
        ClientToControl::SignIn {
            account: self.cfg.account.clone(),
            password: self.cfg.password.clone(),
            proof: self.proof(now, &self.cfg.account, server),
        }
    }

    fn check_in(&mut self, link: LinkId) {
        self.counters.check_ins += 1;
        let msg =
            ClientToControl::CheckIn { local: self.local.clone(), mesh_port: self.mesh_port, reflexive: self.observed };
        self.transmits.push_back(LinkCommand::Send { link, msg });
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

    fn on_control(&mut self, now: Instant, msg: ControlToClient) {
        match msg {
            ControlToClient::Introduce(intro) => self.introduce(*intro),
            ControlToClient::Farewell(peer) => self.commands.push_back(NodeCommand::RemovePeer(peer)),
            ControlToClient::Permit(p) => match SignedTicket::decode(&p) {
                Ok(p) => self.commands.push_back(NodeCommand::SetPermit(p)),
                Err(e) => {
                    self.counters.bad_permits += 1;
                    tracing::warn!("control server sent an unreadable permit: {e}");
                }
            },
            ControlToClient::Observed(a) => {
                // Every check-in is answered, and the session checks in again when a relay
                // reports our mapping and after a reconnect: mostly with the same answer.
                if self.control_observed.replace(a) != Some(a) {
                    self.events.push_back(SessionEvent::Observed(a));
                }
            }
            ControlToClient::Refused(r) => {
                if is_final(r) {
                    self.refused = true;
                }
                self.events.push_back(SessionEvent::Refused(r));
            }
            ControlToClient::Watch(grant) => self.on_watch(now, &grant),
            ControlToClient::Unwatch(publisher) => {
                if let Some(m) = &mut self.avatars {
                    m.unwatch(publisher);
                }
                self.take_avatar_events();
                if let Some((sub, ..)) = self.subscriptions.remove(&publisher) {
                    self.commands.push_back(NodeCommand::Unsubscribe(sub));
                }
            }
            ControlToClient::Audience { watchers, relay } => {
                let me = self.cfg.identity.node_id();
                let (key, hz) = (self.stream_key, self.cfg.avatars.map_or(0.0, |a| a.watch_hz));
                if let Some(r) = &relay {
                    self.commands.push_back(NodeCommand::AddRelay(r.addr));
                }
                let to = relay.filter(|_| watchers > 0).map(|r| Publishing { me, relay: r.id, key, hz });
                if let Some(m) = &mut self.avatars {
                    m.set_publishing(now, to);
                }
                self.wake_avatars(now);
            }
            ControlToClient::Hosting(hosts) => self.events.push_back(SessionEvent::Hosting(hosts)),
            ControlToClient::Welcome { .. } => self.counters.unexpected += 1,
        }
    }

    /// A grant to watch a player through a relay: bind there, present the subscription (leaving
    /// the group at the relay of an earlier grant), and show what comes. A grant that is not ours, or that does not read, is counted.
    fn on_watch(&mut self, now: Instant, grant: &WatchGrant) {
        let me = self.cfg.identity.node_id();
        let sub = match SignedSubscription::decode(&grant.subscription) {
            Ok(s)
                if s.body.subscriber == me && s.body.publisher == grant.publisher && s.body.relay == grant.relay.id =>
            {
                s
            }
            _ => {
                self.counters.bad_grants += 1;
                return;
            }
        };
        let (Some(m), Some(key)) = (&mut self.avatars, grant.stream_key) else { return };
        m.watch(now, grant.publisher, key);
        self.commands.push_back(NodeCommand::AddRelay(grant.relay.addr));
        self.commands.push_back(NodeCommand::Subscribe(sub));
        // Moved to another relay (the publisher's moved, or one nearer us is fed the stream):
        // leave the old group, or its copies would come twice until it lapsed.
        if let Some((old, ..)) = self.subscriptions.insert(grant.publisher, (sub, grant.relay.addr, false))
            && old.body.relay != sub.body.relay
        {
            self.commands.push_back(NodeCommand::Unsubscribe(old));
        }
    }

    fn introduce(&mut self, intro: Introduction) {
        self.commands.extend(intro.relays.iter().map(|r| NodeCommand::AddRelay(r.addr)));
        let profiles: Vec<(VcId, Profile)> = if intro.profiles.is_empty() {
            self.cfg.profiles.clone()
        } else {
            let parsed: Vec<(VcId, Profile)> = intro
                .profiles
                .iter()
                .filter_map(|(vc, w)| Some((VcId(*vc), Profile::from_config(&ProfileConfig::from_wire(w).ok()?).ok()?)))
                .collect();
            self.counters.bad_profiles += (intro.profiles.len() - parsed.len()) as u64;
            parsed
        };
        let paths = introduced_paths(&intro);
        self.commands
            .push_back(NodeCommand::Introduce { peer: PeerInfo { key: intro.peer_key, paths }, vcs: profiles });
    }
}

/// The candidate paths an introduction gives, best first: two-relay routes (the control
/// server offers them only when its relay map says they beat every single relay), then the
/// single relays, so that the VC starts on a relayed path at once; then up to
/// [`MAX_DIRECT_CANDIDATES`] direct addresses (the observed one first), punched in parallel,
/// which take over when they answer.
pub(super) fn introduced_paths(intro: &Introduction) -> Vec<Path> {
    let routes = intro.routes.iter().filter_map(|r| Route::new(&r.relays));
    let single = intro.relays.iter().filter_map(|r| Route::new(&[r.id]));
    let direct = intro.observed.into_iter().chain(intro.local.iter().copied()).take(MAX_DIRECT_CANDIDATES);
    let mut paths: Vec<Path> = routes.chain(single).map(Path::Relayed).collect();
    for addr in direct {
        if !paths.contains(&Path::Direct(addr)) {
            paths.push(Path::Direct(addr));
        }
    }
    paths
}

/// A refusal after which reconnecting cannot help.
fn is_final(r: Refusal) -> bool {
    matches!(r, Refusal::BadCredentials | Refusal::Implausible | Refusal::UnknownBuild)
}
