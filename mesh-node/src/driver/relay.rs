//! The relay on real sockets: one thread per worker, each with its own `SO_REUSEPORT` socket
//! and its own router, so the hot loop never crosses threads. Workers tell each other about
//! verified bindings over channels; the routers stay sans-IO.
//!
//! A worker blocks in `recvmmsg` itself (with a receive timeout as its clock tick) rather than
//! waiting on an event loop: a wake-up then costs the same two system calls as a bare
//! forwarder (receive the batch, send the batch) instead of four (poll, receive, send, and a
//! receive that finds the socket empty). On a virtual machine, where each system call and each
//! cross-CPU wake-up is expensive, that is most of a relay's cost per datagram.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use shoal_protocol::{Group, NodeId, Roles, SignedSubscription, SignedTicket};

use crate::clock::WallClock;
use crate::driver::batch::{BATCH, Batch};
use crate::metrics::exposition::{Collector, DescriptorEncoder};
use crate::metrics::{Counters, DropReason, Gauges};
use crate::router::{Router, RouterConfig, RouterEvent, Verdict};
use crate::wire::Kind;

/// Batches one worker handles before it looks at its timers and inbox again.
const WORK_BUDGET: usize = 16;
/// The longest a worker waits for a datagram before it looks at its timers, its inbox and the
/// stop flag: the resolution of router timers and the bound on shutdown time.
const TICK: Duration = Duration::from_millis(20);
/// How often workers publish their counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often workers re-read the system clock.
const CLOCK_EVERY: Duration = Duration::from_secs(10);

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The router configuration every worker shares.
    pub router: RouterConfig,
    /// Peer relays to bind to at start.
    pub peers: Vec<SocketAddr>,
}

/// Counters and gauges the workers publish, read by `/metrics` and by benchmarks.
#[derive(Debug, Default)]
pub struct RelayStats {
    workers: Vec<Mutex<(Counters, Gauges)>>,
    tids: Mutex<Vec<i32>>,
    /// Peer relays holding our binding, with their round-trip times (from the worker that
    /// owns peer binds).
    peers: Mutex<Vec<(NodeId, SocketAddr, Duration)>>,
}

impl RelayStats {
    /// Counters summed over workers (at most `PUBLISH_EVERY` old).
    pub fn counters(&self) -> Counters {
        let mut sum = Counters::default();
        for w in &self.workers {
            if let Ok(w) = w.lock() {
                sum.add(&w.0);
            }
        }
        sum
    }

    /// Nodes bound (as seen by the worker that sees most).
    pub fn bindings(&self) -> usize {
        self.gauges().bindings
    }

    /// Bindings, groups and memberships (each as seen by the worker that sees most).
    pub fn gauges(&self) -> Gauges {
        let all: Vec<Gauges> = self.workers.iter().filter_map(|w| w.lock().ok().map(|w| w.1)).collect();
        let max = |f: fn(&Gauges) -> usize| all.iter().map(f).max().unwrap_or(0);
        Gauges {
            bindings: max(|g| g.bindings),
            groups: max(|g| g.groups),
            members: max(|g| g.members),
            feeds: max(|g| g.feeds),
        }
    }

    /// Peer relays holding our binding: id, address, round-trip time.
    pub fn peer_rtts(&self) -> Vec<(NodeId, SocketAddr, Duration)> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Operating-system thread ids of the workers, for per-thread CPU accounting.
    pub fn worker_tids(&self) -> Vec<i32> {
        self.tids.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// What `/metrics` reads: the workers' latest snapshots, summed at each scrape.
impl Collector for RelayStats {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.counters().encode(self.gauges(), &mut e)
    }
}

enum WorkerMsg {
    /// A binding another worker verified.
    Bound { node: NodeId, roles: Roles, addr: SocketAddr, expires_at: u64, challenge_at: u64 },
    /// A binding another worker released on its node's unbind.
    Unbound { node: NodeId, addr: SocketAddr, challenge_at: u64 },
    /// A membership another worker admitted.
    Joined { group: Group, node: NodeId, addr: SocketAddr, expires_at: u64 },
    /// A membership another worker released.
    Left { group: Group, node: NodeId },
    /// A peer relay's bind reply that reached a worker that does not own peer binds.
    PeerReply { from: SocketAddr, bytes: Vec<u8> },
    /// Bind to a peer relay (sent to the worker that owns peer binds).
    AddPeer(SocketAddr),
    /// Our own permit, issued or renewed by the control server.
    SetPermit(SignedTicket),
    /// A group to take from another relay, signed by the control server.
    Feed(SignedSubscription),
}

/// Tells a running relay's workers what the control server said; cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    workers: Vec<Sender<WorkerMsg>>,
    stats: Arc<RelayStats>,
}

impl RelayHandle {
    /// Binds to a peer relay (nothing happens if already bound to it).
    pub fn add_peer(&self, addr: SocketAddr) {
        if let Some(owner) = self.workers.first()
            && owner.send(WorkerMsg::AddPeer(addr)).is_err()
        {
            tracing::debug!(peer = %addr, "relay stopped; peer not added");
        }
    }

    /// Replaces the relay's own permit on every worker.
    pub fn set_permit(&self, permit: SignedTicket) {
        for w in &self.workers {
            if w.send(WorkerMsg::SetPermit(permit)).is_err() {
                tracing::debug!("relay stopped; permit not installed");
            }
        }
    }

    /// Takes a feed on every worker: the group's stream from the relay the subscription names,
    /// fanned out again to the members here (see [`Router::feed`]).
    pub fn feed(&self, subscription: SignedSubscription) {
        for w in &self.workers {
            if w.send(WorkerMsg::Feed(subscription)).is_err() {
                tracing::debug!("relay stopped; feed not taken");
            }
        }
    }

    /// Peer relays holding our binding, with their round-trip times.
    pub fn peer_rtts(&self) -> Vec<(NodeId, SocketAddr, Duration)> {
        self.stats.peer_rtts()
    }
}

/// A running relay. Dropping it stops the workers and waits for them.
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    id: NodeId,
    stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    workers: Vec<Sender<WorkerMsg>>,
}

impl Relay {
    /// Starts one worker per socket. The sockets must share one address (see
    /// [`crate::driver::batch::bind_reuseport`]); each worker makes its socket blocking with
    /// a receive timeout of one tick.
    pub fn spawn(sockets: Vec<UdpSocket>, opts: RelayOptions) -> io::Result<Relay> {
        let first = sockets.first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no sockets"))?;
        let local_addr = first.local_addr()?;
        let id = opts.router.identity.node_id();
        let n = sockets.len();
        let stats = Arc::new(RelayStats {
            workers: (0..n).map(|_| Mutex::new((Counters::default(), Gauges::default()))).collect(),
            tids: Mutex::new(Vec::new()),
            peers: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (senders, receivers): (Vec<Sender<WorkerMsg>>, Vec<Receiver<WorkerMsg>>) =
            (0..n).map(|_| crossbeam_channel::unbounded()).unzip();
        let mut threads = Vec::with_capacity(n);
        for (idx, (sock, inbox)) in sockets.into_iter().zip(receivers).enumerate() {
            let now = Instant::now();
            let mut router = Router::new(opts.router.clone(), WallClock::system(), now);
            router.set_peer_owner(idx == 0);
            if idx == 0 {
                for p in &opts.peers {
                    router.add_peer(*p, now);
                }
            }
            sock.set_nonblocking(false)?;
            // Bundles wait at most their window, and are sent at the first tick after it.
            let window = opts.router.fanout.bundle_window;
            let tick = if window.is_zero() { TICK } else { TICK.min(window / 2).max(Duration::from_millis(1)) };
            sock.set_read_timeout(Some(tick))?;
            let worker = Worker {
                idx,
                router,
                out: Batch::new(),
                inbox,
                others: senders.clone(),
                stats: stats.clone(),
                stop: stop.clone(),
            };
            let t = std::thread::Builder::new().name(format!("relay-worker-{idx}")).spawn(move || worker.run(sock))?;
            threads.push(t);
        }
        Ok(Relay { local_addr, id, stats, stop, threads, workers: senders })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The relay's node id.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// A handle for passing on what the control server says.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle { workers: self.workers.clone(), stats: self.stats.clone() }
    }

    /// Published counters.
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// Stops the workers and waits for them to publish their last counters.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

struct Worker {
    idx: usize,
    router: Router,
    /// Buffers for what the router originates.
    out: Batch,
    inbox: Receiver<WorkerMsg>,
    others: Vec<Sender<WorkerMsg>>,
    stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self, sock: UdpSocket) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Ok(mut t) = self.stats.tids.lock() {
            t.push(tid);
        }
        let fd = sock.as_raw_fd();
        let mut batch = Batch::new();
        let mut publish_at = Instant::now() + PUBLISH_EVERY;
        let mut clock_at = Instant::now() + CLOCK_EVERY;
        let span = tracing::info_span!("relay", worker = self.idx, id = %self.router.id());
        let _enter = span.enter();
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(msg) = self.inbox.try_recv() {
                self.apply(msg, &sock);
            }
            // Wait for the first batch, then take what is already queued without waiting.
            for round in 0..WORK_BUDGET {
                let n = match if round == 0 { batch.recv_wait(fd) } else { batch.recv(fd) } {
                    Ok(n) => n,
                    Err(e) => {
                        if !is_timeout(&e) {
                            tracing::debug!("recvmmsg: {e}");
                        }
                        break;
                    }
                };
                self.forward_batch(&mut batch, n, fd);
                // A batch that was not full emptied the queue: block again.
                if n < BATCH {
                    break;
                }
            }
            let now = Instant::now();
            if now >= self.router.poll_timeout() {
                self.router.handle_timeout(now);
            }
            self.drain(&sock);
            if now >= clock_at {
                self.router.set_clock(WallClock::system());
                clock_at = now + CLOCK_EVERY;
            }
            if now >= publish_at {
                self.publish();
                publish_at = now + PUBLISH_EVERY;
            }
        }
        self.publish();
    }

    fn forward_batch(&mut self, batch: &mut Batch, n: usize, fd: RawFd) {
        let now = Instant::now();
        for i in 0..n {
            let (from, buf) = batch.received(i);
            let Some(from) = from else { continue };
            let len = buf.len();
            // Answers to what the peer-owning worker sent (its binds, its feeds) go to it.
            let to_owner = [Kind::BindChallenge, Kind::BindAck, Kind::SubscribeAck].map(|k| k as u8);
            if self.idx != 0 && buf.get(1).is_some_and(|k| to_owner.contains(k)) {
                if self.others[0].send(WorkerMsg::PeerReply { from, bytes: buf.to_vec() }).is_err() {
                    self.router.counters_mut().drop(DropReason::Internal);
                }
                continue;
            }
            match self.router.handle_datagram(now, from, buf) {
                Verdict::Forward(to) => {
                    batch.queue(i, len, to);
                }
                Verdict::Reply(n) | Verdict::DropWithNotice(_, n) => {
                    batch.queue(i, n, from);
                }
                Verdict::FanOut(group) => {
                    // Every copy points at the one received buffer; a full queue goes out first.
                    let mut failed = 0;
                    for &to in self.router.copies_for(&group) {
                        if !batch.queue(i, len, to) {
                            let queued = batch.queued();
                            failed += queued - batch.send(fd).unwrap_or(0);
                            batch.queue(i, len, to);
                        }
                    }
                    self.router.counters_mut().send_failures += failed as u64;
                }
                Verdict::Drop(_) | Verdict::Consumed => {}
            }
        }
        let queued = batch.queued();
        if queued > 0 {
            let sent = batch.send(fd).unwrap_or(0);
            self.router.counters_mut().send_failures += (queued - sent) as u64;
        }
    }

    fn apply(&mut self, msg: WorkerMsg, sock: &UdpSocket) {
        let now = Instant::now();
        match msg {
            WorkerMsg::Bound { node, roles, addr, expires_at, challenge_at } => {
                self.router.apply_binding(now, node, roles, addr, expires_at, challenge_at);
            }
            WorkerMsg::Unbound { node, addr, challenge_at } => self.router.apply_unbinding(node, addr, challenge_at),
            WorkerMsg::Joined { group, node, addr, expires_at } => {
                self.router.apply_membership(now, group, node, addr, expires_at);
            }
            WorkerMsg::Left { group, node } => self.router.apply_leave(group, node),
            WorkerMsg::PeerReply { from, mut bytes } => {
                let _ = self.router.handle_datagram(now, from, &mut bytes);
                self.drain(sock);
            }
            WorkerMsg::AddPeer(addr) => self.router.add_peer(addr, now),
            WorkerMsg::SetPermit(permit) => self.router.set_permit(now, permit),
            WorkerMsg::Feed(subscription) => {
                if let Err(e) = self.router.feed(now, subscription) {
                    tracing::warn!("feed from the control server refused: {e}");
                }
                self.drain(sock);
            }
        }
    }

    /// Sends what the router originated (binds to peer relays, feeds, bundles of copies), a
    /// batch at a time, and passes on its events. The socket is blocking, so the sends say
    /// `MSG_DONTWAIT`: a full buffer is a counted failure, never a stalled worker.
    fn drain(&mut self, sock: &UdpSocket) {
        let fd = sock.as_raw_fd();
        loop {
            let mut k = 0;
            while k < BATCH
                && let Some(t) = self.router.poll_transmit()
            {
                let n = self.out.fill(k, &t.bytes);
                self.out.queue(k, n, t.to);
                self.router.recycle(t.bytes);
                k += 1;
            }
            if k == 0 {
                break;
            }
            let sent = self.out.send(fd).unwrap_or(0);
            self.router.counters_mut().send_failures += (k - sent) as u64;
        }
        while let Some(ev) = self.router.poll_event() {
            match ev {
                RouterEvent::Bound { node, roles, addr, expires_at, challenge_at } => {
                    tracing::debug!(%node, ?roles, %addr, "bound");
                    self.tell_others(|| WorkerMsg::Bound { node, roles, addr, expires_at, challenge_at });
                }
                RouterEvent::Unbound { node, addr, challenge_at } => {
                    tracing::debug!(%node, %addr, "unbound");
                    self.tell_others(|| WorkerMsg::Unbound { node, addr, challenge_at });
                }
                RouterEvent::Joined { group, node, addr, expires_at } => {
                    self.tell_others(|| WorkerMsg::Joined { group, node, addr, expires_at });
                }
                RouterEvent::Left { group, node } => self.tell_others(|| WorkerMsg::Left { group, node }),
                RouterEvent::PeerBound { addr, peer } => tracing::info!(%peer, %addr, "bound to peer relay"),
            }
        }
    }

    /// Sends every other worker a message (a worker only stops when the relay does, so a
    /// closed inbox means shutdown, when nothing is left to tell).
    fn tell_others(&self, msg: impl Fn() -> WorkerMsg) {
        for (i, tx) in self.others.iter().enumerate() {
            if i != self.idx && tx.send(msg()).is_err() {
                tracing::debug!(worker = i, "worker gone; not told");
            }
        }
    }

    fn publish(&self) {
        if let Some(slot) = self.stats.workers.get(self.idx)
            && let Ok(mut s) = slot.lock()
        {
            let (groups, members) = self.router.groups();
            let gauges = Gauges { bindings: self.router.bindings(), groups, members, feeds: self.router.feeds() };
            *s = (self.router.counters().clone(), gauges);
        }
        if self.idx == 0
            && let Ok(mut p) = self.stats.peers.lock()
        {
            p.clear();
            p.extend(self.router.peer_rtts());
        }
    }
}

/// Nothing arrived: `EAGAIN` when the `SO_RCVTIMEO` tick passes, or a signal (`EINTR`).
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}
