//! Message throughput of one VC on real UDP sockets on loopback, beside renet's own
//! connection over plain UDP on the same load.
//!
//! Both run in the same harness: each side is a thread with its own current-thread tokio
//! runtime and socket (4 MiB buffers), shaped like the SDK's driver: wait for a datagram or the
//! core's timer, hand over what arrived, let the core act, send what it emits. The sender keeps
//! its connection's buffer full; the receiver counts. Renet is configured exactly as the VC's
//! renet (the profile's channel, resend time, memory and bytes per flush) and flushed by the
//! VC's rule: when a message was queued, when a packet other than an ack arrived, or on the
//! tick. So the difference between the two is what a VC adds: the key exchange, ChaCha20-Poly1305
//! on every frame, the mesh header, pings and the path manager.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use renet::{Bytes, RenetClient};
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::VcId;
use shoal_protocol::{Identity, Roles, TicketBody, TicketKind, UnixTime};
use shoal_sdk::profile::RENET_CHANNEL;
use shoal_sdk::{Node, PeerInfo, Profile, VcKey};
use tokio::net::UdpSocket;

/// Datagrams read per wake-up before the core's timers get a look in (as in the driver).
const WORK_BUDGET: usize = 64;
/// Renet's type byte for an ack-only packet.
const RENET_ACK_PACKET: u8 = 4;

/// What one side of a run counts, readable from another thread.
#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    payload: AtomicU64,
    wire_bytes: AtomicU64,
    datagrams: AtomicU64,
}

/// What one run measured over its window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Messages delivered to the receiver per second.
    pub messages_per_s: f64,
    /// Message bytes delivered per second.
    pub payload_bytes_per_s: f64,
    /// Process CPU time (both sides, user + system) per delivered message.
    pub cpu_per_message: Duration,
    /// UDP payload bytes the sender put on the wire per delivered message, beyond the
    /// message itself (framing, acks of acks, retransmissions).
    pub overhead_per_message: f64,
    /// UDP payload bytes the receiver sent back (acks, pongs) per delivered message.
    pub return_bytes_per_message: f64,
    /// Datagrams the sender sent per 100 delivered messages.
    pub datagrams_per_100: f64,
    /// Datagrams the receiver sent back per 100 delivered messages.
    pub return_datagrams_per_100: f64,
}

/// The core one side runs.
trait Core {
    fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_timeout(&self, now: Instant) -> Instant;
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)>;
    /// Queues a message; false when the buffer is full.
    fn offer(&mut self, m: Bytes) -> bool;
    fn recv(&mut self) -> Option<Bytes>;
}

/// Renet's connection straight on UDP, flushed by the VC's rule.
struct PlainRenet {
    conn: RenetClient,
    peer: SocketAddr,
    at: Instant,
    tick: Duration,
    next_tick: Instant,
    flush_now: bool,
    out: VecDeque<Vec<u8>>,
}

impl PlainRenet {
    fn new(profile: &Profile, peer: SocketAddr, now: Instant) -> PlainRenet {
        let mut conn = RenetClient::new(profile.renet_config());
        conn.set_connected();
        PlainRenet { conn, peer, at: now, tick: profile.tick, next_tick: now, flush_now: false, out: VecDeque::new() }
    }
}

impl Core for PlainRenet {
    fn handle(&mut self, now: Instant, _from: SocketAddr, bytes: &[u8]) {
        self.conn.update(now.saturating_duration_since(self.at));
        self.at = now;
        self.conn.process_packet(bytes);
        if bytes.first() != Some(&RENET_ACK_PACKET) {
            self.flush_now = true;
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if !self.flush_now && now < self.next_tick {
            return;
        }
        self.flush_now = false;
        self.next_tick = now + self.tick;
        self.conn.update(now.saturating_duration_since(self.at));
        self.at = now;
        self.out.extend(self.conn.get_packets_to_send());
    }

    fn poll_timeout(&self, now: Instant) -> Instant {
        if self.flush_now { now } else { self.next_tick }
    }

    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.pop_front().map(|p| (self.peer, p))
    }

    fn offer(&mut self, m: Bytes) -> bool {
        if !self.conn.can_send_message(RENET_CHANNEL, m.len()) {
            return false;
        }
        self.conn.send_message(RENET_CHANNEL, m);
        self.flush_now = true;
        true
    }

    fn recv(&mut self) -> Option<Bytes> {
        self.conn.receive_message(RENET_CHANNEL)
    }
}

/// A Shoal node with one VC to the other side over the direct path.
struct ShoalVc {
    node: Node,
    key: VcKey,
}

impl Core for ShoalVc {
    fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.node.handle_datagram(now, from, bytes);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.node.handle_timeout(now);
    }

    fn poll_timeout(&self, now: Instant) -> Instant {
        self.node.poll_timeout(now).unwrap_or(now + Duration::from_millis(100))
    }

    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.node.poll_transmit().map(|t| (t.to, t.bytes))
    }

    fn offer(&mut self, m: Bytes) -> bool {
        self.node.send(self.key, m).is_ok()
    }

    fn recv(&mut self) -> Option<Bytes> {
        self.node.recv(self.key)
    }
}

fn bind() -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // As large as the kernel allows here, so that neither side loses datagrams to a full buffer.
    s.set_recv_buffer_size(4 << 20)?;
    s.set_send_buffer_size(4 << 20)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// What the sender offers: as much as the connection takes, or a fixed rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offer {
    /// Keep the connection's buffer full.
    Saturate,
    /// This many messages per second.
    Rate(f64),
}

/// Runs one side until `stop`: the sender if `payload` is given.
async fn side(
    sock: std::net::UdpSocket,
    mut core: Box<dyn Core + Send>,
    payload: Option<(Bytes, Offer)>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let Ok(sock) = UdpSocket::from_std(sock) else { return };
    let mut buf = vec![0u8; 2048];
    let (start, mut offered) = (Instant::now(), 0u64);
    // A paced sender wakes every millisecond to offer what is due.
    let mut idle = Duration::from_millis(5);
    while !stop.load(Ordering::Relaxed) {
        match &payload {
            Some((m, Offer::Saturate)) => while core.offer(m.clone()) {},
            Some((m, Offer::Rate(r))) => {
                idle = Duration::from_millis(1);
                let due = (start.elapsed().as_secs_f64() * r) as u64;
                while offered < due && core.offer(m.clone()) {
                    offered += 1;
                }
            }
            None => {}
        }
        let wake = core.poll_timeout(Instant::now()).min(Instant::now() + idle);
        tokio::select! {
            biased;
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    core.handle(Instant::now(), from, &buf[..n]);
                }
                for _ in 1..WORK_BUDGET {
                    match sock.try_recv_from(&mut buf) {
                        Ok((n, from)) => core.handle(Instant::now(), from, &buf[..n]),
                        Err(_) => break,
                    }
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        core.handle_timeout(Instant::now());
        while let Some((to, bytes)) = core.poll_transmit() {
            counters.wire_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            counters.datagrams.fetch_add(1, Ordering::Relaxed);
            let _ = sock.send_to(&bytes, to).await;
        }
        while let Some(m) = core.recv() {
            counters.messages.fetch_add(1, Ordering::Relaxed);
            counters.payload.fetch_add(m.len() as u64, Ordering::Relaxed);
        }
    }
}

/// CPU time this process has used, user and system.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // `after` starts at field 3 (state, not a number, so skipped): utime is f[10], stime f[11].
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Which connection to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    /// Renet's own connection over plain UDP.
    PlainRenet,
    /// A Shoal VC over the direct path.
    Shoal,
}

/// Sends `size`-byte messages on `profile` as `offer` says for `warmup` and then `window`, and
/// measures the window.
///
/// # Errors
/// When a socket cannot be set up.
pub fn run(
    who: Contender,
    profile: &Profile,
    size: usize,
    offer: Offer,
    warmup: Duration,
    window: Duration,
) -> std::io::Result<Run> {
    let (sa, sb) = (bind()?, bind()?);
    let (aa, ab) = (sa.local_addr()?, sb.local_addr()?);
    let now = Instant::now();
    let (a, b): (Box<dyn Core + Send>, Box<dyn Core + Send>) = match who {
        Contender::PlainRenet => {
            (Box::new(PlainRenet::new(profile, ab, now)), Box::new(PlainRenet::new(profile, aa, now)))
        }
        Contender::Shoal => {
            let (ia, ib) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
            let control = Identity::from_seed([9; 32]);
            let unix = WallClock::system().unix_us(now) / 1_000_000;
            let permit = |i: &Identity| {
                TicketBody::new(TicketKind::RelayPermit, i.public_key(), Roles::CLIENT, UnixTime(unix), 600)
                    .sign(&control)
            };
            let mut na = Node::new(ia.clone(), permit(&ia), WallClock::system());
            let mut nb = Node::new(ib.clone(), permit(&ib), WallClock::system());
            na.add_peer(now, PeerInfo { key: ib.public_key(), paths: vec![Path::Direct(ab)] });
            nb.add_peer(now, PeerInfo { key: ia.public_key(), paths: vec![Path::Direct(aa)] });
            let key = na.open(now, ib.node_id(), VcId(1), profile.clone()).map_err(std::io::Error::other)?;
            let kb = VcKey { peer: ia.node_id(), vc: VcId(1) };
            (Box::new(ShoalVc { node: na, key }), Box::new(ShoalVc { node: nb, key: kb }))
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (ca, cb) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let payload = Bytes::from(vec![7u8; size]);
    let spawn = |sock, core, payload, counters: &Arc<Counters>| {
        let (counters, stop) = (counters.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                rt.block_on(side(sock, core, payload, counters, stop));
            }
        })
    };
    let ta = spawn(sa, a, Some((payload, offer)), &ca);
    let tb = spawn(sb, b, None, &cb);
    std::thread::sleep(warmup);
    let snap = |c: &Counters| {
        let load = |x: &AtomicU64| x.load(Ordering::Relaxed);
        (load(&c.messages), load(&c.payload), load(&c.wire_bytes), load(&c.datagrams))
    };
    let (t0, cpu0, a0, b0) = (Instant::now(), process_cpu(), snap(&ca), snap(&cb));
    std::thread::sleep(window);
    let (t1, cpu1, a1, b1) = (Instant::now(), process_cpu(), snap(&ca), snap(&cb));
    stop.store(true, Ordering::Relaxed);
    let _ = ta.join();
    let _ = tb.join();
    let secs = (t1 - t0).as_secs_f64();
    let messages = (b1.0 - b0.0).max(1) as f64;
    Ok(Run {
        messages_per_s: messages / secs,
        payload_bytes_per_s: (b1.1 - b0.1) as f64 / secs,
        cpu_per_message: (cpu1 - cpu0).div_f64(messages),
        overhead_per_message: (a1.2 - a0.2) as f64 / messages - size as f64,
        return_bytes_per_message: (b1.2 - b0.2) as f64 / messages,
        datagrams_per_100: 100.0 * (a1.3 - a0.3) as f64 / messages,
        return_datagrams_per_100: 100.0 * (b1.3 - b0.3) as f64 / messages,
    })
}
