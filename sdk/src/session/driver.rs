//! The tokio driver of a [`SessionCore`]: QUIC to the control server through
//! [`ControlLink`], the mesh node through a [`Client`], the wall clock and the system's
//! randomness. It performs what the core asks and feeds back what happened; every decision is
//! the core's.

use std::net::SocketAddr;
use std::ops::Deref;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use shoal_link::{ControlLink, LinkError, write_message};
use shoal_mesh::clock::WallClock;
use shoal_protocol::NodeId;
use shoal_protocol::control::ControlToClient;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};

use super::{
    LinkCommand, LinkId, NodeCommand, PlayerState, SessionConfig, SessionCore, SessionError, SessionEvent,
    StartFailure, StateError, check_state,
};
use crate::avatar::{AvatarState, MeshCounters};
use crate::driver::{Client, ClientEvent, NodeHandle};
use crate::world::driver::{WorldClient, WorldHandle};

enum Cmd {
    SetState(PlayerState),
    SetAvatar(AvatarState),
    Avatars(Instant, oneshot::Sender<Vec<(NodeId, AvatarState)>>),
    AvatarCounters(oneshot::Sender<MeshCounters>),
    SignOut,
}

/// A signed-in player. See the module docs of [`crate::session`].
#[derive(Debug)]
pub struct Session {
    node: NodeHandle,
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    id: NodeId,
    world: WorldClient,
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

impl Session {
    /// Signs in, starts the mesh node and checks in. Fails if the control server cannot be
    /// reached or refuses; reconnects after that are the session's own business.
    pub async fn start(cfg: SessionConfig) -> Result<Session, SessionError> {
        let socket = UdpSocket::bind(cfg.mesh_bind).await?;
        let mesh = socket.local_addr()?;
        let mut core = SessionCore::new(Instant::now(), cfg.clone(), WallClock::system(), system_rng());
        core.set_local_addrs(local_candidates(mesh, cfg.control), mesh.port());
        let (ev_tx, events) = mpsc::unbounded_channel();
        let interp = cfg.avatars.map(|a| a.interp).unwrap_or_default();
        let world_events = ev_tx.clone();
        let world = WorldClient::start(cfg.identity.clone(), interp, move |e| {
            let _ = world_events.send(SessionEvent::World(e));
        });
        let mut task = Task::new(cfg, core, socket, mesh, ev_tx, (*world).clone());
        let (node, id) = task.start().await?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let task = Some(tokio::spawn(task.run(cmd_rx)));
        Ok(Session { node, cmds, events, id, world, task })
    }

    /// The world view: the hosting servers' entities as drawn at a time, and actions on them.
    /// Their spawns, despawns and events come as [`SessionEvent::World`].
    pub fn world(&self) -> &WorldHandle {
        &self.world
    }

    /// Our node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Sets what the next reports carry. A state whose report would not fit a control frame
    /// is refused, with its size and the limit, and never sent; the reports keep the state
    /// they had.
    pub fn set_state(&self, state: PlayerState) -> Result<(), StateError> {
        check_state(&state)?;
        let _ = self.cmds.send(Cmd::SetState(state));
        Ok(())
    }

    /// The player's avatar from now on (call it every game tick): served to every neighbour
    /// at the rate its distance and the upload budget allow, and its position reported to the
    /// control server. Neighbours' avatars come as [`SessionEvent::Avatar`] events and from
    /// [`Session::avatars`].
    pub fn set_avatar(&self, state: AvatarState) {
        let _ = self.cmds.send(Cmd::SetAvatar(state));
    }

    /// Every shown neighbour's avatar as drawn at `at` (interpolated a little behind the
    /// newest update), in id order; empty once the session has stopped.
    pub async fn avatars(&self, at: Instant) -> Vec<(NodeId, AvatarState)> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Avatars(at, tx));
        rx.await.unwrap_or_default()
    }

    /// The avatar mesh's counters (zero once the session has stopped).
    pub async fn avatar_counters(&self) -> MeshCounters {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::AvatarCounters(tx));
        rx.await.unwrap_or_default()
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

/// A seed from the system's randomness (the clock's nanoseconds if that fails: jitter only
/// needs clients to differ).
fn system_rng() -> Xoshiro256PlusPlus {
    let mut seed = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).is_err() {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        seed = nanos.to_le_bytes();
    }
    Xoshiro256PlusPlus::seed_from_u64(u64::from_le_bytes(seed))
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

/// What a connection's reader task hands the session task.
enum Incoming {
    Message(LinkId, ControlToClient),
    Lost(LinkId, String),
}

/// The control connection while it is up; its reader runs on its own task.
struct Up {
    send: quinn::SendStream,
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

type Attempt = JoinHandle<Result<ControlLink, LinkError>>;

struct Task {
    cfg: SessionConfig,
    core: SessionCore,
    /// The mesh socket, until the first welcome's permit starts the node on it.
    socket: Option<UdpSocket>,
    client: Option<Client>,
    /// The mesh socket's address the core was last told.
    mesh: SocketAddr,
    link: Option<(LinkId, Up)>,
    connecting: Option<(LinkId, Attempt)>,
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    events: mpsc::UnboundedSender<SessionEvent>,
    /// The last connection's failure in full, for a first sign-in that fails on it.
    link_error: Option<SessionError>,
    /// The node could not start on the mesh socket.
    node_error: Option<std::io::Error>,
    /// The world view's task, fed the hosting servers, the ticket, positions and avatars.
    world: WorldHandle,
    /// The ticket the world view was last given.
    world_ticket: Vec<u8>,
}

impl Task {
    fn new(
        cfg: SessionConfig,
        core: SessionCore,
        socket: UdpSocket,
        mesh: SocketAddr,
        events: mpsc::UnboundedSender<SessionEvent>,
        world: WorldHandle,
    ) -> Task {
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        Task {
            cfg,
            core,
            socket: Some(socket),
            client: None,
            mesh,
            link: None,
            connecting: None,
            incoming_tx,
            incoming,
            events,
            link_error: None,
            node_error: None,
            world,
            world_ticket: Vec::new(),
        }
    }

    /// Runs the first attempt until the session is signed in with its node started, or the
    /// attempt failed.
    async fn start(&mut self) -> Result<(NodeHandle, NodeId), SessionError> {
        loop {
            self.outputs().await;
            if let Some(e) = self.node_error.take() {
                return Err(SessionError::Io(e));
            }
            if self.core.is_signed_in()
                && let Some(client) = &self.client
            {
                return Ok((client.handle(), client.id()));
            }
            if let Some(f) = self.core.start_failure().cloned() {
                return Err(match f {
                    StartFailure::Refused(r) => SessionError::Refused(r),
                    StartFailure::Timeout => SessionError::Timeout,
                    StartFailure::BadWelcome(why) => SessionError::BadWelcome(why),
                    StartFailure::Link(why) => {
                        self.link_error.take().unwrap_or(SessionError::Link(LinkError::Closed(why)))
                    }
                });
            }
            let wake = self.core.poll_timeout();
            let attempt = async {
                match &mut self.connecting {
                    Some((_, h)) => h.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                done = attempt => self.on_attempt(done),
                m = self.incoming.recv() => if let Some(m) = m { self.on_incoming(m) },
                () = sleep(wake) => self.core.handle_timeout(Instant::now()),
            }
        }
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let wake = self.core.poll_timeout();
            let attempt = async {
                match &mut self.connecting {
                    Some((_, h)) => h.await,
                    None => std::future::pending().await,
                }
            };
            let node = async {
                match &mut self.client {
                    Some(c) => c.next().await,
                    None => None,
                }
            };
            tokio::select! {
                ev = node => match ev {
                    Some(ClientEvent::Node(e)) => {
                        self.refresh_local_addrs();
                        self.core.handle_node_event(Instant::now(), e);
                    }
                    Some(ClientEvent::Message(k, m)) => {
                        if self.core.avatar_vc() == Some(k.vc) {
                            self.core.handle_avatar_message(Instant::now(), k.peer, &m);
                        } else {
                            let _ = self.events.send(SessionEvent::Message(k, m));
                        }
                    }
                    None => return,
                },
                m = self.incoming.recv() => if let Some(m) = m { self.on_incoming(m) },
                c = cmds.recv() => match c {
                    Some(Cmd::SetState(s)) => {
                        self.world.set_position(glam::Vec3::from_array(s.position));
                        // Checked by Session::set_state already.
                        let _ = self.core.set_state(s);
                    }
                    Some(Cmd::SetAvatar(s)) => {
                        self.world.set_position(s.position);
                        self.core.set_avatar(Instant::now(), s);
                    }
                    Some(Cmd::Avatars(at, tx)) => {
                        let _ = tx.send(self.core.avatars(at));
                    }
                    Some(Cmd::AvatarCounters(tx)) => {
                        let _ = tx.send(self.core.avatar_counters());
                    }
                    Some(Cmd::SignOut) | None => {
                        self.core.sign_out(Instant::now());
                        self.outputs().await;
                        if let Some((_, attempt)) = self.connecting.take() {
                            attempt.abort();
                        }
                        return;
                    }
                },
                done = attempt => self.on_attempt(done),
                () = sleep(wake) => self.core.handle_timeout(Instant::now()),
            }
            self.outputs().await;
        }
    }

    /// Tells the core the mesh socket's addresses again if the game moved it
    /// ([`NodeHandle::rebind`]).
    fn refresh_local_addrs(&mut self) {
        let Some(client) = &self.client else { return };
        let mesh = client.local_addr();
        if mesh != self.mesh {
            self.mesh = mesh;
            self.core.set_local_addrs(local_candidates(mesh, self.cfg.control), mesh.port());
        }
    }

    fn on_incoming(&mut self, m: Incoming) {
        let now = Instant::now();
        match m {
            Incoming::Message(link, msg) => self.core.handle_message(now, link, msg),
            Incoming::Lost(link, why) => self.core.handle_link_down(now, link, &why),
        }
    }

    /// A connection attempt finished.
    fn on_attempt(&mut self, done: Result<Result<ControlLink, LinkError>, JoinError>) {
        let Some((link, _)) = self.connecting.take() else { return };
        let now = Instant::now();
        let control = match done {
            Ok(Ok(control)) => control,
            Ok(Err(e)) => {
                let why = e.to_string();
                self.link_error = Some(SessionError::Link(e));
                self.core.handle_link_down(now, link, &why);
                return;
            }
            Err(e) => {
                self.core.handle_link_down(now, link, &format!("connection attempt ended: {e}"));
                return;
            }
        };
        let Some(server) = control.server_fingerprint() else {
            control.close("no certificate");
            self.link_error = Some(SessionError::BadWelcome("no certificate".into()));
            self.core.handle_link_down(now, link, "the server presented no certificate");
            return;
        };
        let ControlLink { endpoint, connection, send, mut recv } = control;
        let tx = self.incoming_tx.clone();
        tokio::spawn(async move {
            loop {
                match recv.read_message::<ControlToClient>().await {
                    Ok(m) => {
                        if tx.send(Incoming::Message(link, m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Incoming::Lost(link, e.to_string()));
                        return;
                    }
                }
            }
        });
        if let Some((_, old)) = self.link.replace((link, Up { send, connection, endpoint })) {
            old.connection.close(0u32.into(), b"replaced");
        }
        self.core.handle_link_up(now, link, server);
    }

    /// Does what the core asks, in its call order, until it asks nothing more.
    async fn outputs(&mut self) {
        loop {
            let mut busy = false;
            while let Some(c) = self.core.poll_command() {
                busy = true;
                self.node_command(c).await;
            }
            while let Some(t) = self.core.poll_transmit() {
                busy = true;
                self.link_command(t).await;
            }
            while let Some(e) = self.core.poll_event() {
                busy = true;
                match &e {
                    SessionEvent::Hosting(list) => self.world.set_hosting(list.clone()),
                    SessionEvent::Avatar(a) => self.world.avatar_event(a.clone()),
                    _ => {}
                }
                let _ = self.events.send(e);
            }
            if self.core.session_ticket() != self.world_ticket.as_slice() {
                self.world_ticket = self.core.session_ticket().to_vec();
                self.world.set_ticket(self.world_ticket.clone());
            }
            if !busy {
                return;
            }
        }
    }

    async fn node_command(&mut self, c: NodeCommand) {
        let Some(client) = &self.client else {
            // The first welcome's permit starts the node; the core asks nothing of the node
            // before a welcome, and a welcome's permit comes first.
            match (c, self.socket.take()) {
                (NodeCommand::SetPermit(permit), Some(socket)) => {
                    match Client::start(socket, self.cfg.identity.clone(), permit) {
                        Ok(client) => self.client = Some(client),
                        Err(e) => self.node_error = Some(e),
                    }
                }
                (c, socket) => {
                    self.socket = socket;
                    tracing::debug!("node command before the node started, dropped: {c:?}");
                }
            }
            return;
        };
        match client.apply(c).await {
            Ok(Some(outcome)) => self.core.handle_node_outcome(Instant::now(), outcome),
            Ok(None) => {}
            Err(e) => tracing::debug!("node command not applied: {e}"),
        }
    }

    async fn link_command(&mut self, t: LinkCommand) {
        match t {
            LinkCommand::Connect { link, .. } => {
                if let Some((_, attempt)) = self.connecting.take() {
                    attempt.abort();
                }
                let (addr, trust) = (self.cfg.control, self.cfg.trust.clone());
                self.connecting = Some((link, tokio::spawn(async move { ControlLink::connect(addr, &trust).await })));
            }
            LinkCommand::Send { link, msg } => {
                let Some((id, up)) = &mut self.link else { return };
                if *id != link {
                    return;
                }
                if let Err(e) = write_message(&mut up.send, &msg).await {
                    self.core.handle_link_down(Instant::now(), link, &e.to_string());
                }
            }
            LinkCommand::Close { link } => {
                if self.connecting.as_ref().is_some_and(|(id, _)| *id == link)
                    && let Some((_, attempt)) = self.connecting.take()
                {
                    attempt.abort();
                }
                if self.link.as_ref().is_some_and(|(id, _)| *id == link)
                    && let Some((_, up)) = self.link.take()
                {
                    up.connection.close(0u32.into(), b"lost");
                }
            }
            LinkCommand::Finish { link } => {
                if self.link.as_ref().is_some_and(|(id, _)| *id == link)
                    && let Some((_, mut up)) = self.link.take()
                {
                    let _ = up.send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(1), up.send.stopped()).await;
                    up.connection.close(0u32.into(), b"signed out");
                    let _ = tokio::time::timeout(Duration::from_secs(1), up.endpoint.wait_idle()).await;
                }
            }
        }
    }
}

/// Sleeps until `wake`, or for ever.
async fn sleep(wake: Option<Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
