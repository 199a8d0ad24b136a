//! The tokio driver of a [`WorldView`]: QUIC connections to the hosting servers the view
//! plans for (ALPN `shoal-world/1`, each server's certificate pinned as the control server
//! named it), their streams and datagrams, and the clock. A session runs one and feeds it the
//! hosting servers, its session ticket, the player's position and the avatar events; a game
//! reads the view through the session.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glam::Vec3;
use rustc_hash::FxHashMap;
use shoal_link::{ControlLink, Trust, WORLD_ALPN, write_message};
use shoal_protocol::world::{Action, ClientToHost, EntityId, HostToClient, HostingInfo};
use shoal_protocol::{Identity, NodeId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{ActError, Transmit, WorldCounters, WorldEvent, WorldView};
use crate::avatar::{AvatarEvent, AvatarState, InterpConfig};

/// A server whose connection failed is not tried again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Messages waiting for one server's stream.
const OUTGOING_QUEUE: usize = 256;

#[derive(Debug)]
enum Cmd {
    Hosting(Vec<HostingInfo>),
    Ticket(Vec<u8>),
    Position(Vec3),
    Avatar(AvatarEvent),
    Act(Action, oneshot::Sender<Result<u32, ActError>>),
    Entities(Instant, oneshot::Sender<Vec<(EntityId, AvatarState)>>),
    Counters(oneshot::Sender<(WorldCounters, Vec<NodeId>)>),
}

/// What a connection task hands the world task, with the connection's number (a late word
/// from a connection since replaced is ignored).
enum Incoming {
    Message(NodeId, u64, HostToClient),
    Datagram(NodeId, u64, Vec<u8>),
    Ended(NodeId, u64, String),
}

enum Out {
    Message(ClientToHost),
    Datagram(Vec<u8>),
}

/// The world task; dropping it stops the task and its connections. It derefs to a
/// [`WorldHandle`].
#[derive(Debug)]
pub struct WorldClient {
    handle: WorldHandle,
    task: JoinHandle<()>,
}

impl Drop for WorldClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::ops::Deref for WorldClient {
    type Target = WorldHandle;

    fn deref(&self) -> &WorldHandle {
        &self.handle
    }
}

/// What talks to the world task; cheap to clone.
#[derive(Debug, Clone)]
pub struct WorldHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl WorldClient {
    /// Starts the world task on the current runtime: it connects as `identity`, and hands what
    /// the game should hear to `events`.
    pub fn start(
        identity: Identity,
        interp: InterpConfig,
        events: impl Fn(WorldEvent) + Send + 'static,
    ) -> WorldClient {
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(identity, interp, Box::new(events), rx));
        WorldClient { handle: WorldHandle { cmds }, task }
    }
}

impl WorldHandle {
    /// The hosting servers there are now.
    pub fn set_hosting(&self, hosting: Vec<HostingInfo>) {
        let _ = self.cmds.send(Cmd::Hosting(hosting));
    }

    /// The session ticket hellos carry (a fresh one after a resume).
    pub fn set_ticket(&self, ticket: Vec<u8>) {
        let _ = self.cmds.send(Cmd::Ticket(ticket));
    }

    /// Where the player is.
    pub fn set_position(&self, at: Vec3) {
        let _ = self.cmds.send(Cmd::Position(at));
    }

    /// An avatar appeared or left.
    pub fn avatar_event(&self, e: AvatarEvent) {
        let _ = self.cmds.send(Cmd::Avatar(e));
    }

    /// Asks the hosting server that shows the entity to do `action`; its number comes back,
    /// and its outcome as a [`WorldEvent`].
    ///
    /// # Errors
    /// When no connected server shows the entity (or the task has stopped).
    pub async fn act(&self, action: Action) -> Result<u32, ActError> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Act(action, tx));
        rx.await.unwrap_or(Err(ActError::NotShown))
    }

    /// Every entity shown, as drawn at `at`, in id order.
    pub async fn entities(&self, at: Instant) -> Vec<(EntityId, AvatarState)> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Entities(at, tx));
        rx.await.unwrap_or_default()
    }

    /// The view's counters and the servers linked now.
    pub async fn counters(&self) -> (WorldCounters, Vec<NodeId>) {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Counters(tx));
        rx.await.unwrap_or_default()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Conn {
    number: u64,
    out: mpsc::Sender<Out>,
    task: JoinHandle<()>,
}

async fn run(
    identity: Identity,
    interp: InterpConfig,
    events: Box<dyn Fn(WorldEvent) + Send>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut view = WorldView::new(interp, Instant::now());
    let (in_tx, mut incoming) = mpsc::unbounded_channel::<Incoming>();
    let mut conns: FxHashMap<NodeId, Conn> = FxHashMap::default();
    let mut failed: FxHashMap<NodeId, Instant> = FxHashMap::default();
    let mut ticket: Option<Vec<u8>> = None;
    let mut next_number = 0u64;
    let current = |conns: &FxHashMap<NodeId, Conn>, s: NodeId, g: u64| conns.get(&s).is_some_and(|c| c.number == g);
    loop {
        let wake = view.poll_timeout();
        tokio::select! {
            c = cmds.recv() => match c {
                None => break,
                Some(Cmd::Hosting(h)) => view.set_hosting(h),
                Some(Cmd::Ticket(t)) => ticket = Some(t),
                Some(Cmd::Position(p)) => view.set_position(p),
                Some(Cmd::Avatar(e)) => view.on_avatar_event(&e),
                Some(Cmd::Act(a, tx)) => { let _ = tx.send(view.act(a)); }
                Some(Cmd::Entities(at, tx)) => { let _ = tx.send(view.entities(at)); }
                Some(Cmd::Counters(tx)) => { let _ = tx.send((view.counters(), view.servers())); }
            },
            m = incoming.recv() => match m {
                Some(Incoming::Message(s, g, msg)) => if current(&conns, s, g) { view.on_message(s, msg) },
                Some(Incoming::Datagram(s, g, d)) => if current(&conns, s, g) { view.on_datagram(Instant::now(), s, &d) },
                Some(Incoming::Ended(s, g, why)) => if current(&conns, s, g) {
                    tracing::debug!(server = %s, "world connection ended: {why}");
                    if let Some(c) = conns.remove(&s) {
                        c.task.abort();
                    }
                    failed.insert(s, Instant::now());
                    view.closed(s, None);
                }
                None => break,
            },
            () = sleep(wake) => view.handle_timeout(Instant::now()),
        }
        // Connect and leave as the player moves.
        let (connect, leave) = view.plan();
        for s in leave {
            if let Some(c) = conns.remove(&s) {
                let _ = c.out.try_send(Out::Message(ClientToHost::Leave));
                // The task finishes its stream and closes.
                drop(c.out);
            }
            view.closed(s, None);
        }
        if let Some(t) = &ticket {
            let now = Instant::now();
            for h in connect {
                if failed.get(&h.id).is_some_and(|&at| now < at + RETRY_AFTER) {
                    continue;
                }
                let hello = view.opened(&h, &identity, t.clone(), unix_ms());
                let (out, rx) = mpsc::channel(OUTGOING_QUEUE);
                let _ = out.try_send(Out::Message(hello));
                next_number += 1;
                let task = tokio::spawn(connection(h.id, next_number, h.addr, h.cert, rx, in_tx.clone()));
                conns.insert(h.id, Conn { number: next_number, out, task });
            }
        }
        while let Some(t) = view.poll_transmit() {
            let (s, o) = match t {
                Transmit::Message(s, m) => (s, Out::Message(m)),
                Transmit::Datagram(s, d) => (s, Out::Datagram(d)),
            };
            if let Some(c) = conns.get(&s)
                && c.out.try_send(o).is_err()
            {
                tracing::debug!(server = %s, "world connection not keeping up; a message was dropped");
            }
        }
        while let Some(e) = view.poll_event() {
            // A server that closed us (we left its band, it is full) is not asked again at once.
            if let WorldEvent::Disconnected { server, reason: Some(_) } = &e
                && conns.remove(server).is_some()
            {
                failed.insert(*server, Instant::now());
            }
            events(e);
        }
    }
    for (_, c) in conns {
        c.task.abort();
    }
}

/// One hosting server: connects, then writes what the view sends and reads what the server
/// sends until either ends.
async fn connection(
    server: NodeId,
    number: u64,
    addr: SocketAddr,
    cert: [u8; 32],
    mut out: mpsc::Receiver<Out>,
    incoming: mpsc::UnboundedSender<Incoming>,
) {
    let link = match ControlLink::connect_with(addr, &Trust::Pinned(cert), WORLD_ALPN).await {
        Ok(l) => l,
        Err(e) => {
            let _ = incoming.send(Incoming::Ended(server, number, e.to_string()));
            return;
        }
    };
    let ControlLink { endpoint, connection, mut send, mut recv } = link;
    let reader = {
        let incoming = incoming.clone();
        tokio::spawn(async move {
            loop {
                match recv.read_message::<HostToClient>().await {
                    Ok(m) => {
                        if incoming.send(Incoming::Message(server, number, m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = incoming.send(Incoming::Ended(server, number, e.to_string()));
                        return;
                    }
                }
            }
        })
    };
    let datagrams = {
        let (incoming, connection) = (incoming.clone(), connection.clone());
        tokio::spawn(async move {
            while let Ok(d) = connection.read_datagram().await {
                if incoming.send(Incoming::Datagram(server, number, d.to_vec())).is_err() {
                    return;
                }
            }
        })
    };
    while let Some(o) = out.recv().await {
        match o {
            Out::Message(m) => {
                if write_message(&mut send, &m).await.is_err() {
                    break;
                }
            }
            Out::Datagram(d) => {
                let _ = connection.send_datagram(d.into());
            }
        }
    }
    // Left: finish the stream so the server reads the leave, then close.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    connection.close(0u32.into(), b"left");
    reader.abort();
    datagrams.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

async fn sleep(wake: Option<Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
