//! The SDK on a real UDP socket: a background tokio task owns the socket and the sans-IO
//! [`Node`]; the game holds a [`Client`] that receives its events and messages, and sends it
//! commands through a [`NodeHandle`] (which the client derefs to, and which can be cloned
//! into other tasks). Dropping the client stops the task.

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::time::{Duration, Instant};

use renet::Bytes;
use shoal_mesh::bind::Transmit;
use shoal_mesh::clock::WallClock;
use shoal_mesh::wire::VcId;
use shoal_protocol::{Identity, NodeId, SignedTicket};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::node::{Event, Node, NodeCounters, NodeError, PeerInfo, Traffic, VcKey};
use crate::profile::Profile;
use crate::session::{NodeCommand, NodeOutcome};
use crate::vc::VcStats;

/// Most datagrams or commands handled in one turn of the loop before timers get a look in,
/// so a flood on the socket cannot starve the VCs' ticks.
const WORK_BUDGET: usize = 64;

enum Cmd {
    AddRelay(SocketAddr),
    AddPeer(PeerInfo),
    Open(NodeId, VcId, Profile, oneshot::Sender<Result<VcKey, NodeError>>),
    Send(VcKey, Bytes, oneshot::Sender<Result<(), NodeError>>),
    Close(VcKey),
    Stats(VcKey, oneshot::Sender<Option<VcStats>>),
    SetPermit(SignedTicket),
    RemovePeer(NodeId, oneshot::Sender<Vec<VcKey>>),
    Status(oneshot::Sender<NodeStatus>),
    Rebind(SocketAddr, oneshot::Sender<io::Result<SocketAddr>>),
    UnbindRelays(oneshot::Sender<usize>),
    Apply(NodeCommand, oneshot::Sender<Option<NodeOutcome>>),
}

/// A node's state as a whole, for reports and dashboards.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// Every VC, with what it measures.
    pub links: Vec<(VcKey, VcStats)>,
    /// Relays holding our binding: id, address, round-trip time.
    pub relays: Vec<(NodeId, SocketAddr, Duration)>,
    /// Our address as a relay saw it.
    pub observed: Option<SocketAddr>,
    /// Datagrams refused before reaching a VC.
    pub counters: NodeCounters,
    /// What the node sent and received so far, payload and the mesh's own overhead apart.
    pub sent: Traffic,
    /// See `sent`.
    pub received: Traffic,
    /// Datagrams the socket would not take (a full buffer, an unreachable address): lost as
    /// the network would lose them, and counted here.
    pub socket_send_errors: u64,
    /// Receive calls that failed (an ICMP error reported on the socket, say).
    pub socket_recv_errors: u64,
}

impl NodeStatus {
    /// `node`'s state at `now`.
    pub fn of(node: &Node, now: Instant) -> NodeStatus {
        let (sent, received) = node.traffic();
        NodeStatus {
            links: node.vcs().filter_map(|k| Some((k, node.stats(now, k)?))).collect(),
            relays: node.endpoint().relay_rtts().collect(),
            observed: node.endpoint().observed_address(),
            counters: node.counters(),
            sent,
            received,
            // A sans-IO node has no socket; the tokio driver fills these in.
            socket_send_errors: 0,
            socket_recv_errors: 0,
        }
    }
}

/// What the client reports to the game.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A node event (VC opened, path changed, closed; relay bound or lost).
    Node(Event),
    /// A message arrived on a VC.
    Message(VcKey, Bytes),
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The background task has stopped.
    #[error("client task stopped")]
    Stopped,
    /// The node refused.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A new socket could not be bound.
    #[error("binding a new socket: {0}")]
    Bind(#[from] io::Error),
}

/// Sends commands to a running node; cheap to clone. See the module docs.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
    local: watch::Receiver<SocketAddr>,
}

impl NodeHandle {
    fn cmd(&self, c: Cmd) -> Result<(), ClientError> {
        self.cmds.send(c).map_err(|_| ClientError::Stopped)
    }

    async fn ask<T>(&self, c: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmd(c(tx))?;
        rx.await.map_err(|_| ClientError::Stopped)
    }

    /// The socket's address (the new one after [`NodeHandle::rebind`]).
    pub fn local_addr(&self) -> SocketAddr {
        *self.local.borrow()
    }

    /// Starts binding to a relay; [`Event::RelayBound`] follows.
    pub fn add_relay(&self, addr: SocketAddr) -> Result<(), ClientError> {
        self.cmd(Cmd::AddRelay(addr))
    }

    /// Records a peer we may open VCs with (and accept them from).
    pub fn add_peer(&self, info: PeerInfo) -> Result<(), ClientError> {
        self.cmd(Cmd::AddPeer(info))
    }

    /// Forgets a peer and closes every VC with it; returns the VCs closed.
    pub async fn remove_peer(&self, peer: NodeId) -> Result<Vec<VcKey>, ClientError> {
        self.ask(|tx| Cmd::RemovePeer(peer, tx)).await
    }

    /// Replaces the relay permit; every binding is proved again with it.
    pub fn set_permit(&self, permit: SignedTicket) -> Result<(), ClientError> {
        self.cmd(Cmd::SetPermit(permit))
    }

    /// Opens a VC.
    pub async fn open(&self, peer: NodeId, vc: VcId, profile: Profile) -> Result<VcKey, ClientError> {
        Ok(self.ask(|tx| Cmd::Open(peer, vc, profile, tx)).await??)
    }

    /// Queues a message on a VC.
    pub async fn send(&self, key: VcKey, message: impl Into<Bytes>) -> Result<(), ClientError> {
        let message = message.into();
        Ok(self.ask(|tx| Cmd::Send(key, message, tx)).await??)
    }

    /// Closes a VC.
    pub fn close(&self, key: VcKey) -> Result<(), ClientError> {
        self.cmd(Cmd::Close(key))
    }

    /// A VC's stats.
    pub async fn stats(&self, key: VcKey) -> Result<Option<VcStats>, ClientError> {
        self.ask(|tx| Cmd::Stats(key, tx)).await
    }

    /// Moves the node to a new socket bound to `addr` (the game saw the network change, say
    /// Wi-Fi to cellular; port 0 picks one), and returns its address. VCs carry on: relays
    /// are bound again from the new address, every path is probed at once, and peers learn
    /// the new address from our authenticated frames. The old socket is closed.
    pub async fn rebind(&self, addr: SocketAddr) -> Result<SocketAddr, ClientError> {
        Ok(self.ask(|tx| Cmd::Rebind(addr, tx)).await??)
    }

    /// Every VC's stats, the relays and the observed address at once.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        self.ask(Cmd::Status).await
    }

    /// Applies a session's command to the node, in its task, and returns the node's answer
    /// (see [`NodeCommand::apply`]). Unbind datagrams are sent before it returns.
    pub async fn apply(&self, cmd: NodeCommand) -> Result<Option<NodeOutcome>, ClientError> {
        self.ask(|tx| Cmd::Apply(cmd, tx)).await
    }

    /// Tells every relay holding our binding to let go of it (the node is stopping); returns
    /// how many unbinds went out. A node that keeps running binds again at its next keepalive.
    pub async fn unbind_relays(&self) -> Result<usize, ClientError> {
        self.ask(Cmd::UnbindRelays).await
    }
}

/// The game's handle on a running node. See the module docs.
#[derive(Debug)]
pub struct Client {
    handle: NodeHandle,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    id: NodeId,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Deref for Client {
    type Target = NodeHandle;

    fn deref(&self) -> &NodeHandle {
        &self.handle
    }
}

impl Client {
    /// Starts a node for `identity` (showing `permit` to relays) on an already bound socket.
    pub fn start(socket: UdpSocket, identity: Identity, permit: SignedTicket) -> io::Result<Client> {
        let local = socket.local_addr()?;
        let id = identity.node_id();
        let mut node = Node::new(identity, permit, WallClock::system());
        node.set_local_addr(local);
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let (local_tx, local) = watch::channel(local);
        let task = tokio::spawn(run(socket, node, cmd_rx, ev_tx, local_tx));
        Ok(Client { handle: NodeHandle { cmds, local }, events, id, task })
    }

    /// Our node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// A handle for sending commands from elsewhere.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// The next event or message; `None` once the task has stopped.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }
}

async fn run(
    mut sock: UdpSocket,
    mut node: Node,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<ClientEvent>,
    local: watch::Sender<SocketAddr>,
) {
    let mut buf = vec![0u8; 2048];
    let mut io = SocketErrors::default();
    loop {
        let wake = node.poll_timeout(Instant::now());
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            c = cmds.recv() => {
                let Some(c) = c else { return };
                handle_cmd(&mut node, &mut sock, &local, &mut io, c).await;
                for _ in 1..WORK_BUDGET {
                    match cmds.try_recv() {
                        Ok(c) => handle_cmd(&mut node, &mut sock, &local, &mut io, c).await,
                        Err(_) => break,
                    }
                }
            }
            r = sock.recv_from(&mut buf) => {
                match r {
                    Ok((n, from)) => node.handle_datagram(Instant::now(), from, &buf[..n]),
                    Err(e) => {
                        io.recv_errors += 1;
                        tracing::trace!("mesh socket receive: {e}");
                    }
                }
                for _ in 1..WORK_BUDGET {
                    match sock.try_recv_from(&mut buf) {
                        Ok((n, from)) => node.handle_datagram(Instant::now(), from, &buf[..n]),
                        Err(_) => break,
                    }
                }
            }
            () = sleep => {}
        }
        node.handle_timeout(Instant::now());
        while let Some(t) = node.poll_transmit() {
            // A full socket buffer or an unreachable address loses the datagram, as the
            // network would; renet and the path manager recover.
            if let Err(e) = sock.send_to(&t.bytes, t.to).await {
                io.send_errors += 1;
                tracing::trace!(to = %t.to, "mesh socket send: {e}");
            }
        }
        while let Some(e) = node.poll_event() {
            if events.send(ClientEvent::Node(e)).is_err() {
                return;
            }
        }
        let keys: Vec<VcKey> = node.vcs().collect();
        for k in keys {
            while let Some(m) = node.recv(k) {
                if events.send(ClientEvent::Message(k, m)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Socket calls that failed, for [`NodeStatus`].
#[derive(Debug, Clone, Copy, Default)]
struct SocketErrors {
    send_errors: u64,
    recv_errors: u64,
}

/// Answers a command; the caller may have stopped waiting, which is no fault.
fn reply<T>(tx: oneshot::Sender<T>, v: T) {
    let _ = tx.send(v);
}

/// Sends the unbinds at once rather than queued, so that they are out before the caller
/// stops the node; returns how many went, and counts those the socket refused.
async fn send_unbinds(sock: &UdpSocket, io: &mut SocketErrors, unbinds: &[Transmit]) -> usize {
    let mut sent = 0;
    for t in unbinds {
        match sock.send_to(&t.bytes, t.to).await {
            Ok(_) => sent += 1,
            Err(e) => {
                io.send_errors += 1;
                tracing::debug!(relay = %t.to, "unbind not sent: {e}");
            }
        }
    }
    sent
}

async fn handle_cmd(
    node: &mut Node,
    sock: &mut UdpSocket,
    local: &watch::Sender<SocketAddr>,
    io: &mut SocketErrors,
    c: Cmd,
) {
    let now = Instant::now();
    match c {
        Cmd::Rebind(addr, tx) => {
            let moved = UdpSocket::bind(addr).await.and_then(|new| {
                let addr = new.local_addr()?;
                *sock = new;
                local.send_replace(addr);
                node.set_local_addr(addr);
                node.network_changed(Instant::now());
                Ok(addr)
            });
            reply(tx, moved);
        }
        Cmd::AddRelay(a) => node.add_relay(now, a),
        Cmd::AddPeer(p) => node.add_peer(now, p),
        Cmd::Open(peer, vc, profile, tx) => {
            reply(tx, node.open(now, peer, vc, profile));
        }
        Cmd::Send(k, m, tx) => {
            reply(tx, node.send(k, m));
        }
        Cmd::Close(k) => node.close(now, k),
        Cmd::Stats(k, tx) => {
            reply(tx, node.stats(now, k));
        }
        Cmd::SetPermit(p) => node.set_permit(now, p),
        Cmd::RemovePeer(peer, tx) => {
            reply(tx, node.remove_peer(now, peer));
        }
        Cmd::UnbindRelays(tx) => {
            let unbinds = node.endpoint().unbind_all();
            reply(tx, send_unbinds(sock, io, &unbinds).await);
        }
        Cmd::Status(tx) => {
            let status = NodeStatus {
                socket_send_errors: io.send_errors,
                socket_recv_errors: io.recv_errors,
                ..NodeStatus::of(node, now)
            };
            reply(tx, status);
        }
        Cmd::Apply(c, tx) => {
            let outcome = c.apply(node, now);
            if let Some(NodeOutcome::Unbind(unbinds)) = &outcome {
                send_unbinds(sock, io, unbinds).await;
            }
            reply(tx, outcome);
        }
    }
}
