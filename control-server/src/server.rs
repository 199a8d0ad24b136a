//! The control server on real QUIC: the tokio driver around [`Core`].
//!
//! Players' clients (ALPN `shoal-control/1`), relays (ALPN `shoal-relay/1`) and hosting
//! servers (ALPN `shoal-hosting/1`) connect to the same port. Each opens one bidirectional stream and sends length-prefixed frames
//! ([`shoal_link`]); the server answers on the same stream. One task owns the core
//! and is fed by the connections' reader tasks; sign-in checks and account look-ups run on
//! their own tasks and come back as events, so a slow hash never holds up other clients.
//! Report rows and character saves are written to the [`Store`] in batches on each tick, by
//! one writer task, in order; shutdown waits until everything queued is written.
//!
//! Overload is held off at every queue. Each connection's reader takes a token from its
//! [`Bucket`] per message and waits when it has none, so a client writing too fast is slowed
//! by QUIC's flow control. The core's event queue is bounded, so readers wait when the core
//! is behind. The tick comes before events, so introductions, presence and persistence keep
//! their pace under load. What the core sends a connection is bounded too; a client that
//! stops reading is closed and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use shoal_link::daemon::bind_udp;
use shoal_link::{FrameReader, HOSTING_ALPN, LinkError, RELAY_ALPN, write_message};
use shoal_protocol::control::{ClientToControl, ControlToClient, ControlToRelay, RelayToControl};
use shoal_protocol::framing::FrameError;
use shoal_protocol::world::{ControlToHosting, HostingToControl};
use shoal_protocol::{Identity, UnixTime};
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{Authenticator, Verdict};
use crate::core::{ConnId, Core, CoreConfig, CoreCounters, Output, Snapshot};
use crate::limit::{Bucket, RateLimit};
use crate::store::{Character, ReportRow, Store};
use crate::tls::{ServerIdentity, TlsError};

/// How often the core ticks (introductions, presence, permits, persistence).
pub const TICK: Duration = Duration::from_millis(250);

/// Bytes the QUIC socket may queue in each direction (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// Events waiting for the core: readers wait when it is full.
const EVENT_QUEUE: usize = 1024;

/// Messages waiting to be written to one connection: past this it is not reading, and it is
/// closed.
const OUTGOING_QUEUE: usize = 256;

/// A message the client has not let the server write for this long means it is not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// How fast each connection may send.
    pub rate_limit: RateLimit,
}

/// A connection's way out: its writer task's queue, and the connection itself for closing it
/// at once when it stops reading.
struct Writer {
    queue: mpsc::Sender<Outgoing>,
    connection: quinn::Connection,
}

/// What the core sends on a connection: a client's or a relay's message.
enum Outgoing {
    Client(ControlToClient),
    Relay(ControlToRelay),
    Hosting(ControlToHosting),
}

enum Event {
    Connected(ConnId, SocketAddr, Writer),
    Message(ConnId, ClientToControl),
    RelayMessage(ConnId, RelayToControl),
    HostingMessage(ConnId, HostingToControl),
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
    /// Messages whose reading waited for their connection's rate limit.
    pub throttled: u64,
}

/// A cloneable handle for reading a running server's state (the HTTP API uses it).
#[derive(Debug, Clone)]
pub struct ServerClient {
    events: mpsc::Sender<Event>,
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
        self.events.send(Event::Snapshot(tx)).await.ok()?;
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
    let bind = |source| ServerError::Bind { addr: cfg.listen, source };
    // A socket buffer well above the kernel's default, so that a burst from many clients at
    // once is queued rather than dropped (a dropped handshake packet costs a client the
    // handshake's retransmission timeout, about a second).
    let socket = bind_udp(cfg.listen, SOCKET_BUFFER, false).map_err(bind)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(cfg.tls.server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)?;
    let addr = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let core = Core::new(cfg.core, cfg.identity, fingerprint).map_err(|e| ServerError::Config(e.to_string()))?;
    let (stop, stop_rx) = watch::channel(false);
    let (stats_tx, stats) = watch::channel(Stats::default());
    cfg.rate_limit.validate().map_err(ServerError::Config)?;
    let (events, rx) = mpsc::channel(EVENT_QUEUE);
    let client = ServerClient { events: events.clone(), stats };
    let task = tokio::spawn(run(Task {
        endpoint,
        core,
        store,
        auth,
        retention: cfg.retention,
        rate_limit: cfg.rate_limit,
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
    rate_limit: RateLimit,
    stop: watch::Receiver<bool>,
    stats: watch::Sender<Stats>,
    events: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
}

async fn run(task: Task) {
    let Task { endpoint, mut core, store, auth, retention, rate_limit, mut stop, stats, events, mut rx } = task;
    let mut writers: FxHashMap<ConnId, Writer> = FxHashMap::default();
    let mut next_conn: ConnId = 1;
    let throttled = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(TICK);
    // A tick that came late is not made up for with a burst of ticks.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut characters: FxHashMap<String, Character> = FxHashMap::default();
    let (writes, queue) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(store.clone(), queue));
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
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
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let conn = next_conn;
                next_conn += 1;
                let (events, throttled) = (events.clone(), throttled.clone());
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else { return };
                    serve(conn, connection, events, Reader { limit: rate_limit, throttled }).await;
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
                    Event::HostingMessage(conn, msg) => core.on_hosting_message(now, unix, conn, msg),
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
        }
        while let Some(out) = core.poll_output() {
            match out {
                Output::Send(conn, msg) => queue_for(&writers, &mut core, conn, Outgoing::Client(msg)),
                Output::SendRelay(conn, msg) => queue_for(&writers, &mut core, conn, Outgoing::Relay(msg)),
                Output::SendHosting(conn, msg) => queue_for(&writers, &mut core, conn, Outgoing::Hosting(msg)),
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
                        let _ = events.send(Event::Verdict(conn, verdict)).await;
                    });
                }
                Output::FindAccount { conn, node } => {
                    let (store, events) = (store.clone(), events.clone());
                    tokio::spawn(async move {
                        let account = store.account_of_node(node.0).await.ok().flatten();
                        let _ = events.send(Event::Account(conn, account)).await;
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
        publish(&stats, &core, &throttled);
    }
    // Shutdown: refuse new connections, tell clients, write what is pending.
    endpoint.close(0u32.into(), b"shutting down");
    persist(&writes, &mut core, &mut characters);
    drop(writes);
    let _ = writer.await;
    endpoint.wait_idle().await;
    publish(&stats, &core, &throttled);
}

fn publish(stats: &watch::Sender<Stats>, core: &Core, throttled: &AtomicU64) {
    let _ = stats.send(Stats {
        counters: core.counters(),
        players: core.players(),
        throttled: throttled.load(Ordering::Relaxed),
    });
}

/// Queues `msg` for `conn`'s writer; a connection whose queue is full has stopped reading and
/// is closed (the core counts it).
fn queue_for(writers: &FxHashMap<ConnId, Writer>, core: &mut Core, conn: ConnId, msg: Outgoing) {
    let Some(w) = writers.get(&conn) else { return };
    if let Err(mpsc::error::TrySendError::Full(_)) = w.queue.try_send(msg) {
        tracing::debug!("connection {conn} is not reading; closing it");
        w.connection.close(1u32.into(), b"not reading");
        core.on_overflow(conn);
    }
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

/// What a connection's reader is held to.
struct Reader {
    limit: RateLimit,
    /// Counts every message that had to wait for a token, across connections.
    throttled: Arc<AtomicU64>,
}

/// One client connection: reads and decodes frames from its first bi-stream into the core's
/// events, at most at its rate limit, and writes what the core sends it.
async fn serve(conn: ConnId, connection: quinn::Connection, events: mpsc::Sender<Event>, reader: Reader) {
    let remote = connection.remote_address();
    // The ALPN says who is calling: a player's client, a relay or a hosting server.
    let alpn = connection
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let (relay, hosting) = (alpn.as_deref() == Some(RELAY_ALPN), alpn.as_deref() == Some(HOSTING_ALPN));
    let Ok((mut send, recv)) = connection.accept_bi().await else { return };
    let mut recv = FrameReader::new(recv);
    let (tx, mut out) = mpsc::channel::<Outgoing>(OUTGOING_QUEUE);
    if events.send(Event::Connected(conn, remote, Writer { queue: tx, connection: connection.clone() })).await.is_err()
    {
        return;
    }
    let closer = connection.clone();
    let writer = tokio::spawn(async move {
        while let Some(msg) = out.recv().await {
            let written = match msg {
                Outgoing::Client(m) => tokio::time::timeout(WRITE_TIMEOUT, write_message(&mut send, &m)).await,
                Outgoing::Relay(m) => tokio::time::timeout(WRITE_TIMEOUT, write_message(&mut send, &m)).await,
                Outgoing::Hosting(m) => tokio::time::timeout(WRITE_TIMEOUT, write_message(&mut send, &m)).await,
            };
            match written {
                Ok(Err(LinkError::Closed(_))) => return,
                Err(_) => {
                    // Not read for that long: the client is gone or will not read.
                    closer.close(1u32.into(), b"not reading");
                    return;
                }
                Ok(_) => {}
            }
        }
        // The core closed this client: end the stream so it reads what was sent, then close.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        closer.close(0u32.into(), b"closed by the control server");
    });
    let mut bucket = Bucket::new(reader.limit, Instant::now());
    loop {
        // Not read until it may be taken: the client's writes back up into its own buffers.
        if let Some(wait) = bucket.take(Instant::now()) {
            reader.throttled.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            // The token is there now; taking it cannot fail.
            let _ = bucket.take(Instant::now());
        }
        // Decoded here, on the connection's own task, so the core's task only acts.
        let event = if relay {
            recv.read_message::<RelayToControl>().await.map(|m| Event::RelayMessage(conn, m))
        } else if hosting {
            recv.read_message::<HostingToControl>().await.map(|m| Event::HostingMessage(conn, m))
        } else {
            recv.read_message::<ClientToControl>().await.map(|m| Event::Message(conn, m))
        };
        let event = match event {
            Ok(event) => event,
            Err(LinkError::Frame(FrameError::Codec(_))) => Event::Malformed(conn),
            Err(LinkError::Frame(FrameError::TooLarge { .. })) => {
                // Refused before reading it; the stream cannot be resynchronised, so it ends.
                let _ = events.send(Event::Malformed(conn)).await;
                break;
            }
            Err(_) => break,
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
    let _ = events.send(Event::Disconnected(conn)).await;
    let _ = writer.await;
    connection.close(0u32.into(), b"bye");
}
