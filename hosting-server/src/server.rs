//! The hosting server on real QUIC: the tokio driver around [`Host`].
//!
//! Clients connect with ALPN `shoal-world/1` to a certificate made at start (its fingerprint is
//! what the server registers with the control server, which passes it to clients to pin).
//! Each client opens one bidirectional stream of frames ([`ClientToHost`] / [`HostToClient`])
//! and acknowledges snapshots in QUIC datagrams. One task owns the core, ticks it, and is fed
//! by each connection's reader tasks; each connection's writer task drains a bounded queue,
//! and a client that stops reading is closed. Readers take a token from their connection's
//! bucket per message, so a client writing too fast is slowed by QUIC's flow control.
//!
//! When a control server is configured, a registration task announces the zone and address
//! over ALPN `shoal-hosting/1` and reports the load every second, reconnecting with backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::QuicServerConfig;
use rustc_hash::FxHashMap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_link::{ControlLink, FrameReader, LinkError, SERVER_NAME, Trust, WORLD_ALPN, fingerprint, write_message};
use shoal_protocol::control::KeyProof;
use shoal_protocol::framing::FrameError;
use shoal_protocol::world::{
    ClientToHost, ControlToHosting, HOSTING_ACCOUNT, HostToClient, HostingToControl, MAX_WORLD_FRAME, Registration,
};
use shoal_protocol::{Identity, PublicKey};
use tokio::sync::{mpsc, watch};

use crate::host::{ClientId, Host, HostConfig, HostCounters, Output};
use crate::world::World;

/// Messages waiting to be written to one client: past this it is not reading, and is closed.
const OUTGOING_QUEUE: usize = 512;
/// Events waiting for the core: readers wait when it is full.
const EVENT_QUEUE: usize = 4096;
/// How often the load goes to the control server (and keeps the registration alive).
const REPORT_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The certificate could not be made or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Where and as whom to register with the control server.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The control server's QUIC address.
    pub addr: SocketAddr,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// Where clients reach this server; `None` means the address it is bound to.
    pub public_addr: Option<SocketAddr>,
}

/// What the server needs.
#[derive(Debug)]
pub struct ServerConfig {
    /// Where to listen for QUIC.
    pub listen: SocketAddr,
    /// The server's own key (what it registers with).
    pub identity: Identity,
    /// The control key whose session tickets it takes.
    pub control_key: PublicKey,
    /// The core's settings.
    pub host: HostConfig,
    /// Messages a second a client may send on its stream, and at once.
    pub messages_per_sec: f64,
    /// See `messages_per_sec`.
    pub message_burst: f64,
    /// Registration with the control server.
    pub control: Option<ControlSettings>,
}

/// What the server publishes after each tick, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// The core's counters.
    pub counters: HostCounters,
    /// Clients past their hello.
    pub clients: usize,
    /// Entities in the world.
    pub entities: usize,
    /// Tick times, µs, for the histogram: count per bucket of [`TICK_BUCKETS_US`].
    pub tick_buckets: [u64; TICK_BUCKETS_US.len()],
    /// Ticks, and their total time in seconds.
    pub ticks: u64,
    /// See `ticks`.
    pub tick_secs: f64,
    /// Datagrams the path would not take (too large, or no datagram support).
    pub datagrams_refused: u64,
    /// Clients closed for not reading what was sent to them.
    pub overflowed: u64,
    /// Whether the control server has the registration now.
    pub registered: bool,
}

/// Upper bounds of the tick-time histogram's buckets, µs.
pub const TICK_BUCKETS_US: [u64; 8] = [1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its certificate's fingerprint, which clients pin.
    pub cert: [u8; 32],
    /// What it publishes after every tick.
    pub stats: watch::Receiver<Stats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting, closes every client and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A self-signed certificate made at start, and the QUIC server configuration around it.
fn tls() -> Result<(quinn::ServerConfig, [u8; 32]), ServerError> {
    let err = |e: &dyn std::fmt::Display| ServerError::Tls(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(|e| err(&e))?;
    let cert = params.self_signed(&key).map_err(|e| err(&e))?;
    let der: CertificateDer<'static> = cert.der().clone();
    let fp = fingerprint(der.as_ref());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![der], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .map_err(|e| err(&e))?;
    tls.alpn_protocols = vec![WORLD_ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| err(&e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    // One stream per client, bounded to two of the largest frames in flight.
    let window = quinn::VarInt::from_u32(2 * MAX_WORLD_FRAME as u32);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(window)
        .receive_window(window)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(15_000).into()));
    config.transport_config(Arc::new(transport));
    Ok((config, fp))
}

/// Starts the server on the current tokio runtime.
///
/// # Errors
/// When the certificate cannot be made or the socket bound.
pub fn start(cfg: ServerConfig, world: World) -> Result<ServerHandle, ServerError> {
    let (quic, cert) = tls()?;
    let socket =
        std::net::UdpSocket::bind(cfg.listen).map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(quic), socket, Arc::new(quinn::TokioRuntime))
            .map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let addr = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let host = Host::new(world, cfg.host.clone(), cfg.control_key, cert);
    let (stop, stop_rx) = watch::channel(false);
    let (stats_tx, stats) = watch::channel(Stats::default());
    let (registered_tx, registered_rx) = watch::channel(false);
    let (load_tx, load_rx) = watch::channel((0u32, 0u32));
    if let Some(c) = cfg.control.clone() {
        let zone = host.zone().clone();
        let reg = ControlRegistration {
            control: c,
            identity: cfg.identity.clone(),
            public_addr: addr,
            cert,
            zone,
            overlap: cfg.host.overlap,
        };
        tokio::spawn(register(reg, load_rx, registered_tx, stop_rx.clone()));
    }
    let limit = (cfg.messages_per_sec, cfg.message_burst);
    let task = tokio::spawn(run(host, endpoint, limit, stop_rx, stats_tx, registered_rx, load_tx));
    Ok(ServerHandle { addr, cert, stats, stop, task })
}

enum Event {
    Connected(ClientId, quinn::Connection, mpsc::Sender<HostToClient>),
    Message(ClientId, ClientToHost),
    Datagram(ClientId, Vec<u8>),
    Malformed(ClientId),
    Disconnected(ClientId),
}

struct Conn {
    connection: quinn::Connection,
    queue: mpsc::Sender<HostToClient>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn run(
    mut host: Host,
    endpoint: quinn::Endpoint,
    limit: (f64, f64),
    mut stop: watch::Receiver<bool>,
    stats: watch::Sender<Stats>,
    registered: watch::Receiver<bool>,
    load: watch::Sender<(u32, u32)>,
) {
    let (events_tx, mut events) = mpsc::channel::<Event>(EVENT_QUEUE);
    let mut conns: FxHashMap<ClientId, Conn> = FxHashMap::default();
    let mut next = 1u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(host.config().tick_hz.max(1)));
    let mut tick = tokio::time::interval(period);
    // A late tick is not made up for with a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What /metrics shows from the start, before the first tick.
    let mut s = Stats { entities: host.world().entities().len(), ..Stats::default() };
    let _ = stats.send(s.clone());
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {
                let t0 = Instant::now();
                host.tick(t0);
                let took = t0.elapsed();
                s.ticks += 1;
                s.tick_secs += took.as_secs_f64();
                let us = took.as_micros() as u64;
                if let Some(b) = TICK_BUCKETS_US.iter().position(|&b| us <= b) {
                    s.tick_buckets[b] += 1;
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let id = ClientId(next);
                next += 1;
                let events = events_tx.clone();
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else { return };
                    serve(id, connection, events, limit).await;
                });
            }
            Some(event) = events.recv() => match event {
                Event::Connected(id, connection, queue) => {
                    let max = connection.max_datagram_size().unwrap_or(1200);
                    host.set_max_datagram(host.config().max_datagram.min(max));
                    conns.insert(id, Conn { connection, queue });
                    host.connected(id);
                }
                Event::Message(id, msg) => host.on_message(Instant::now(), unix_ms(), id, msg),
                Event::Datagram(id, d) => host.on_datagram(id, &d),
                Event::Malformed(id) => host.on_malformed(id),
                Event::Disconnected(id) => {
                    conns.remove(&id);
                    host.disconnected(id);
                }
            },
        }
        while let Some(out) = host.poll_output() {
            match out {
                Output::Message(id, msg) => {
                    let Some(c) = conns.get(&id) else { continue };
                    if let Err(mpsc::error::TrySendError::Full(_)) = c.queue.try_send(msg) {
                        c.connection.close(1u32.into(), b"not reading");
                        s.overflowed += 1;
                        conns.remove(&id);
                        host.disconnected(id);
                    }
                }
                Output::Datagram(id, d) => {
                    if let Some(c) = conns.get(&id)
                        && c.connection.send_datagram(d.into()).is_err()
                    {
                        s.datagrams_refused += 1;
                    }
                }
                // Dropping the queue lets the writer finish the stream after what it holds.
                Output::Close(id) => {
                    conns.remove(&id);
                }
            }
        }
        s.counters = host.counters().clone();
        s.clients = host.players();
        s.entities = host.world().entities().len();
        s.registered = *registered.borrow();
        let _ = load.send((s.clients as u32, s.entities as u32));
        let _ = stats.send(s.clone());
    }
    for c in conns.values() {
        c.connection.close(0u32.into(), b"shutting down");
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// One client connection: its stream's frames and its datagrams into the core's events, at
/// most at its rate limit, and what the core sends it onto its stream.
async fn serve(id: ClientId, connection: quinn::Connection, events: mpsc::Sender<Event>, limit: (f64, f64)) {
    let Ok((mut send, recv)) = connection.accept_bi().await else { return };
    let mut recv = FrameReader::new(recv);
    let (tx, mut out) = mpsc::channel::<HostToClient>(OUTGOING_QUEUE);
    if events.send(Event::Connected(id, connection.clone(), tx)).await.is_err() {
        return;
    }
    let closer = connection.clone();
    let writer = tokio::spawn(async move {
        while let Some(msg) = out.recv().await {
            let closing = matches!(msg, HostToClient::Closed(_));
            if write_message(&mut send, &msg).await.is_err() {
                return;
            }
            if closing {
                break;
            }
        }
        // The core is done with this client: end the stream so it reads what was sent.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        closer.close(0u32.into(), b"closed by the hosting server");
    });
    let datagrams = {
        let (connection, events) = (connection.clone(), events.clone());
        tokio::spawn(async move {
            while let Ok(d) = connection.read_datagram().await {
                if events.send(Event::Datagram(id, d.to_vec())).await.is_err() {
                    return;
                }
            }
        })
    };
    let (rate, burst) = limit;
    let (mut tokens, mut at) = (burst, Instant::now());
    loop {
        let now = Instant::now();
        tokens = (tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(burst);
        at = now;
        if tokens < 1.0 {
            // Not read until it may be: the client's writes back up into its own buffers.
            tokio::time::sleep(Duration::from_secs_f64((1.0 - tokens) / rate.max(1e-3))).await;
            continue;
        }
        tokens -= 1.0;
        let event = match recv.read_message::<ClientToHost>().await {
            Ok(m) => Event::Message(id, m),
            Err(LinkError::Frame(FrameError::Codec(_))) => Event::Malformed(id),
            Err(LinkError::Frame(FrameError::TooLarge { .. })) => {
                let _ = events.send(Event::Malformed(id)).await;
                break;
            }
            Err(_) => break,
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
    let _ = events.send(Event::Disconnected(id)).await;
    datagrams.abort();
    let _ = writer.await;
}

struct ControlRegistration {
    control: ControlSettings,
    identity: Identity,
    public_addr: SocketAddr,
    cert: [u8; 32],
    zone: shoal_protocol::world::ZoneInfo,
    overlap: f32,
}

/// Registers with the control server and stays registered until `stop` turns true.
async fn register(
    reg: ControlRegistration,
    load: watch::Receiver<(u32, u32)>,
    registered: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = tokio::select! {
            r = registration(&reg, &load, &registered, &mut backoff) => r,
            _ = stop.changed() => return,
        };
        let _ = registered.send(false);
        if let Err(e) = session {
            tracing::warn!(control = %reg.control.addr, "control server registration: {e}; retrying in {backoff:?}");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn registration(
    reg: &ControlRegistration,
    load: &watch::Receiver<(u32, u32)>,
    registered: &watch::Sender<bool>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let link = ControlLink::connect_hosting(reg.control.addr, &reg.control.trust).await.map_err(|e| e.to_string())?;
    let server = link.server_fingerprint().ok_or("no server certificate")?;
    let ControlLink { endpoint: _endpoint, connection, mut send, mut recv } = link;
    let proof = KeyProof::new(&reg.identity, HOSTING_ACCOUNT, unix_ms(), &server);
    let msg = HostingToControl::Register(Box::new(Registration {
        addr: reg.control.public_addr.unwrap_or(reg.public_addr),
        cert: reg.cert,
        zone: reg.zone.clone(),
        overlap: reg.overlap,
        proof,
    }));
    write_message(&mut send, &msg).await.map_err(|e| e.to_string())?;
    // Reads go through a task: a read cut short by the report timer would lose its frame.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let m = recv.read_message::<ControlToHosting>().await;
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        }
    });
    let result = async {
        let mut report = tokio::time::interval(REPORT_EVERY);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Ok(ControlToHosting::Registered)) => {
                        *backoff = BACKOFF_MIN;
                        let _ = registered.send(true);
                        tracing::info!(control = %reg.control.addr, zone = reg.zone.name.as_str(), "registered with the control server");
                    }
                    Some(Ok(ControlToHosting::Refused(r))) => return Err(format!("refused: {r}")),
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("reader stopped".to_string()),
                },
                _ = report.tick() => {
                    let (clients, entities) = *load.borrow();
                    write_message(&mut send, &HostingToControl::Load { clients, entities }).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
    .await;
    reader.abort();
    connection.close(0u32.into(), b"hosting server leaving");
    result
}
