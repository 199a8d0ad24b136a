//! The control server on real QUIC: the tokio driver around [`Core`].
//!
//! Players' clients (ALPN `shoal-control/1`) and relays (ALPN `shoal-relay/1`) connect to the
//! same port. Each opens one bidirectional stream and sends length-prefixed frames
//! ([`shoal_mesh::control`]); the server answers on the same stream. One task owns the core
//! and is fed by the connections' reader tasks; sign-in checks and account look-ups run on
//! their own tasks and come back as events, so a slow hash never holds up other clients.
//! Report rows and character saves are written to the [`Store`] in batches on each tick, by
//! one writer task, in order; shutdown waits until everything queued is written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use shoal_mesh::control::{LinkError, RELAY_ALPN, read_frame, write_message};
use shoal_protocol::codec::decode;
use shoal_protocol::control::{ClientToControl, ControlToClient, ControlToRelay, MAX_CONTROL_FRAME, RelayToControl};
use shoal_protocol::{Identity, UnixTime};
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{Authenticator, Verdict};
use crate::core::{ConnId, Core, CoreConfig, CoreCounters, Output, Snapshot};
use crate::store::{Character, ReportRow, Store};
use crate::tls::{ServerIdentity, TlsError};

/// How often the core ticks (introductions, presence, permits, persistence).
pub const TICK: Duration = Duration::from_millis(250);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The core's configuration is invalid.
    #[error("interest config: {0}")]
    Config(String),
}

/// What the server needs.
#[derive(Debug)]
pub struct ServerConfig {
    /// Where to listen for QUIC.
    pub listen: SocketAddr,
    /// The control key that signs tickets.
    pub identity: Identity,
    /// The TLS certificate.
    pub tls: ServerIdentity,
    /// The core's behaviour.
    pub core: CoreConfig,
    /// History older than this is pruned.
    pub retention: Duration,
}

/// What the core sends on a connection: a client's or a relay's message.
enum Outgoing {
    Client(ControlToClient),
    Relay(ControlToRelay),
}

enum Event {
    Connected(ConnId, SocketAddr, mpsc::UnboundedSender<Outgoing>),
    Message(ConnId, ClientToControl),
    RelayMessage(ConnId, RelayToControl),
    Malformed(ConnId),
    Disconnected(ConnId),
    Verdict(ConnId, Option<String>),
    Account(ConnId, Option<String>),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// What the server publishes after each turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// The core's counters.
    pub counters: CoreCounters,
    /// Signed-in players.
    pub players: usize,
}

/// A cloneable handle for reading a running server's state (the HTTP API uses it).
#[derive(Debug, Clone)]
pub struct ServerClient {
    events: mpsc::UnboundedSender<Event>,
    stats: watch::Receiver<Stats>,
}

impl ServerClient {
    /// Counters and gauges as of the core's last turn.
    pub fn stats(&self) -> Stats {
        *self.stats.borrow()
    }

    /// The live state; `None` once the server has stopped.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Snapshot(tx)).ok()?;
        rx.await.ok()
    }
}

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
#[derive(Debug)]
pub struct ServerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    client: ServerClient,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// The core's counters, as of its last turn.
    pub fn counters(&self) -> CoreCounters {
        self.client.stats().counters
    }

    /// A handle for reading its state.
    pub fn client(&self) -> ServerClient {
        self.client.clone()
    }

    /// Stops accepting, closes every connection, writes what is pending and waits.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn unix_now() -> UnixTime {
    UnixTime(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// Starts the server.
pub fn start(cfg: ServerConfig, store: Store, auth: Arc<dyn Authenticator>) -> Result<ServerHandle, ServerError> {
    let fingerprint = cfg.tls.fingerprint();
    let endpoint = quinn::Endpoint::server(cfg.tls.server_config()?, cfg.listen)
        .map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let addr = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let core = Core::new(cfg.core, cfg.identity, fingerprint).map_err(|e| ServerError::Config(e.to_string()))?;
    let (stop, stop_rx) = watch::channel(false);
    let (stats_tx, stats) = watch::channel(Stats::default());
    let (events, rx) = mpsc::unbounded_channel();
    let client = ServerClient { events: events.clone(), stats };
    let task = tokio::spawn(run(Task {
        endpoint,
        core,
        store,
        auth,
        retention: cfg.retention,
        stop: stop_rx,
        stats: stats_tx,
        events,
        rx,
    }));
    Ok(ServerHandle { addr, stop, client, task })
}

/// Everything the server task owns.
struct Task {
    endpoint: quinn::Endpoint,
    core: Core,
    store: Store,
    auth: Arc<dyn Authenticator>,
    retention: Duration,
    stop: watch::Receiver<bool>,
    stats: watch::Sender<Stats>,
    events: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
}

async fn run(task: Task) {
    let Task { endpoint, mut core, store, auth, retention, mut stop, stats, events, mut rx } = task;
    let mut writers: FxHashMap<ConnId, mpsc::UnboundedSender<Outgoing>> = FxHashMap::default();
    let mut next_conn: ConnId = 1;
    let mut tick = tokio::time::interval(TICK);
    let mut characters: FxHashMap<String, Character> = FxHashMap::default();
    let (writes, queue) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(store.clone(), queue));
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let conn = next_conn;
                next_conn += 1;
                let events = events.clone();
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else { return };
                    serve(conn, connection, events).await;
                });
            }
            Some(event) = rx.recv() => {
                let (now, unix) = (Instant::now(), unix_now());
                match event {
                    Event::Connected(conn, remote, writer) => {
                        writers.insert(conn, writer);
                        core.on_connected(now, conn, remote);
                    }
                    Event::Message(conn, msg) => core.on_message(now, unix, conn, msg),
                    Event::RelayMessage(conn, msg) => core.on_relay_message(now, unix, conn, msg),
                    Event::Malformed(conn) => core.on_malformed(conn),
                    Event::Disconnected(conn) => {
                        writers.remove(&conn);
                        core.on_disconnected(conn);
                    }
                    Event::Verdict(conn, account) => core.on_verdict(unix, conn, account),
                    Event::Account(conn, account) => core.on_account(unix, conn, account),
                    Event::Snapshot(reply) => {
                        let _ = reply.send(core.snapshot());
                    }
                }
            }
            _ = tick.tick() => {
                core.tick(Instant::now(), unix_now());
                persist(&writes, &mut core, &mut characters);
                if last_prune.elapsed() >= Duration::from_secs(60) {
                    last_prune = Instant::now();
                    let before = (unix_now().0 as i64 - retention.as_secs() as i64) * 1000;
                    let store = store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.prune_reports(before).await {
                            tracing::warn!("pruning reports: {e}");
                        }
                    });
                }
            }
        }
        while let Some(out) = core.poll_output() {
            match out {
                Output::Send(conn, msg) => {
                    if let Some(w) = writers.get(&conn) {
                        let _ = w.send(Outgoing::Client(msg));
                    }
                }
                Output::SendRelay(conn, msg) => {
                    if let Some(w) = writers.get(&conn) {
                        let _ = w.send(Outgoing::Relay(msg));
                    }
                }
                Output::Verify { conn, account, password } => {
                    let (auth, events) = (auth.clone(), events.clone());
                    tokio::spawn(async move {
                        let verdict = match auth.verify(&account, &password).await {
                            Ok(Verdict::Accepted(name)) => Some(name),
                            Ok(Verdict::Refused) => None,
                            Err(e) => {
                                tracing::warn!("sign-in check for {account}: {e}");
                                None
                            }
                        };
                        let _ = events.send(Event::Verdict(conn, verdict));
                    });
                }
                Output::FindAccount { conn, node } => {
                    let (store, events) = (store.clone(), events.clone());
                    tokio::spawn(async move {
                        let account = store.account_of_node(node.0).await.ok().flatten();
                        let _ = events.send(Event::Account(conn, account));
                    });
                }
                Output::Close(conn) => {
                    // The writer ends the stream after what is queued; the connection closes
                    // when the client has read it (or on the presence timeout).
                    writers.remove(&conn);
                }
                Output::SaveCharacter(c) => {
                    characters.insert(c.account.clone(), c);
                }
            }
        }
        let _ = stats.send(Stats { counters: core.counters(), players: core.players() });
    }
    // Shutdown: refuse new connections, tell clients, write what is pending.
    endpoint.close(0u32.into(), b"shutting down");
    persist(&writes, &mut core, &mut characters);
    drop(writes);
    let _ = writer.await;
    endpoint.wait_idle().await;
    let _ = stats.send(Stats { counters: core.counters(), players: core.players() });
}

/// One tick's writes.
struct Writes {
    rows: Vec<ReportRow>,
    characters: Vec<Character>,
}

/// Hands pending report rows and character saves to the writer.
fn persist(writer: &mpsc::UnboundedSender<Writes>, core: &mut Core, characters: &mut FxHashMap<String, Character>) {
    let rows = core.take_report_rows();
    let characters: Vec<Character> = characters.drain().map(|(_, c)| c).collect();
    if !rows.is_empty() || !characters.is_empty() {
        let _ = writer.send(Writes { rows, characters });
    }
}

/// The one task that writes to the store, in order. One writer holds at most one of the
/// pool's connections, so sign-ins always find one for their look-ups; when it falls behind,
/// the ticks that queued meanwhile go out as one batch. It ends when the server drops its
/// sender, after writing everything queued.
async fn write_loop(store: Store, mut queue: mpsc::UnboundedReceiver<Writes>) {
    while let Some(mut w) = queue.recv().await {
        let mut characters: FxHashMap<String, Character> =
            w.characters.drain(..).map(|c| (c.account.clone(), c)).collect();
        while let Ok(more) = queue.try_recv() {
            w.rows.extend(more.rows);
            characters.extend(more.characters.into_iter().map(|c| (c.account.clone(), c)));
        }
        if let Err(e) = store.insert_reports(&w.rows).await {
            tracing::warn!("persisting {} reports: {e}", w.rows.len());
        }
        for c in characters.values() {
            if let Err(e) = store.save_character(c).await {
                tracing::warn!("saving character {}: {e}", c.account);
            }
        }
    }
}

/// One client connection: reads and decodes frames from its first bi-stream into the core's
/// events, and writes what the core sends it.
async fn serve(conn: ConnId, connection: quinn::Connection, events: mpsc::UnboundedSender<Event>) {
    let remote = connection.remote_address();
    // The ALPN says who is calling: a player's client or a relay.
    let relay = connection
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == RELAY_ALPN);
    let Ok((mut send, mut recv)) = connection.accept_bi().await else { return };
    let (tx, mut out) = mpsc::unbounded_channel::<Outgoing>();
    if events.send(Event::Connected(conn, remote, tx)).is_err() {
        return;
    }
    let closer = connection.clone();
    let writer = tokio::spawn(async move {
        while let Some(msg) = out.recv().await {
            let written = match msg {
                Outgoing::Client(m) => write_message(&mut send, &m).await,
                Outgoing::Relay(m) => write_message(&mut send, &m).await,
            };
            if let Err(LinkError::Closed(_)) = written {
                return;
            }
        }
        // The core closed this client: end the stream so it reads what was sent, then close.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        closer.close(0u32.into(), b"closed by the control server");
    });
    loop {
        let frame = match read_frame(&mut recv).await {
            Ok(frame) => frame,
            Err(LinkError::Oversized(_)) => {
                // Refused before reading it; the stream cannot be resynchronised, so it ends.
                let _ = events.send(Event::Malformed(conn));
                break;
            }
            Err(_) => break,
        };
        // Decoded here, on the connection's own task, so the core's task only acts.
        let event = if relay {
            decode::<RelayToControl>(&frame, MAX_CONTROL_FRAME).map(|m| Event::RelayMessage(conn, m))
        } else {
            decode::<ClientToControl>(&frame, MAX_CONTROL_FRAME).map(|m| Event::Message(conn, m))
        };
        let event = event.unwrap_or(Event::Malformed(conn));
        if events.send(event).is_err() {
            break;
        }
    }
    let _ = events.send(Event::Disconnected(conn));
    let _ = writer.await;
    connection.close(0u32.into(), b"bye");
}
