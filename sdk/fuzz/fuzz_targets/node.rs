//! A sans-IO `shoal_sdk::Node` fed what a hostile network and a hostile peer can send: raw
//! datagrams from any address, mesh datagrams from the introduced peer carrying arbitrary
//! frames, the peer's genuine hellos with arbitrary profiles and times, sealed frames holding
//! arbitrary items under keys the peer really agreed with the node, replays, tampered copies,
//! and the relay's bind answers and notices, interleaved with the game's own calls and with
//! `handle_timeout` at advancing virtual times.
//!
//! The node must never panic, never ask for its timeout at an instant it has just handled
//! without progress (a driver would spin), send fewer than [`MAX_PER_DATAGRAM`] datagrams in
//! answer to any one datagram, and send only datagrams that parse: data for the peer whose
//! hellos verify under the node's key and whose sealed frames, once opened, parse as items.
//!
//! Every input gets a fresh node, bound to one relay by replaying a bind handshake recorded
//! once against a real `Router` (fixed seeds, one `Instant` base, so the replay matches), and
//! introduced to the peer over a direct path and a path through that relay. The fuzz target
//! plays the peer by hand (its hellos, its key agreement, its sealing) so that the fuzzer
//! chooses the plaintext of authenticated frames. Input: a sequence of operations, each a
//! selector byte and its arguments, read until the input runs out (see `Run::op`).

#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{self, Datagram, Header, Kind, MAX_DATAGRAM, Route, VcId};
use shoal_protocol::{Identity, NodeId, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};
use shoal_sdk::crypto::{CryptoError, Ephemeral, HelloBody, SessionKeys};
use shoal_sdk::frame::{self, Frame};
use shoal_sdk::{Node, PeerInfo, Profile, ProfileConfig, VcKey};

const T0_UNIX_US: u64 = 1_800_000_000_000_000;
const T0_UNIX: u64 = T0_UNIX_US / 1_000_000;

/// The node sends fewer datagrams than this in answer to one received datagram: a hello
/// answered on every path with a confirm behind each is the most a genuine exchange needs, far
/// below it.
const MAX_PER_DATAGRAM: usize = 64;
/// The node sends fewer datagrams than this from one `handle_timeout`: every VC's hellos or
/// ticks on every path.
const MAX_PER_TIMEOUT: usize = 2048;
/// `handle_timeout` calls at one instant after which a node still due at that instant spins.
const MAX_CALLS_PER_INSTANT: usize = 16;
/// Operations read from one input.
const MAX_OPS: usize = 64;
/// VC ids the operations name, so that they meet each other.
const VCS: u32 = 4;

const A_ADDR: SocketAddr = addr([10, 0, 0, 1], 7000);
const B_ADDR: SocketAddr = addr([10, 0, 0, 2], 7000);
const R_ADDR: SocketAddr = addr([10, 0, 0, 9], 9000);
const STRANGER: SocketAddr = addr([10, 0, 0, 66], 9999);

const fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])), port)
}

struct Fixture {
    clock: WallClock,
    /// The node under test.
    a: Identity,
    a_permit: SignedTicket,
    /// The peer, played by the target.
    b: Identity,
    /// The relay's id.
    r: NodeId,
    /// The relay's challenge and ack to the node's first bind, at `start`.
    challenge: Vec<u8>,
    ack: Vec<u8>,
    start: Instant,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base = Instant::now();
        let clock = WallClock::new(base, T0_UNIX_US);
        let control = Identity::from_seed([200; 32]);
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let relay = Identity::from_seed([9; 32]);
        let permit = |id: &Identity, roles| {
            TicketBody::new(TicketKind::RelayPermit, id.public_key(), roles, UnixTime(T0_UNIX), 3600).sign(&control)
        };
        let lots = Rate { per_sec: 1e6, burst: 1e6 };
        let cfg = RouterConfig {
            permit: Some(permit(&relay, Roles::RELAY)),
            identity: relay.clone(),
            control_key: control.public_key(),
            source_packets: lots,
            source_bytes: lots,
            bind_verifications: lots,
            notices: lots,
            max_bindings: 16,
            cookie_secret: [9; 32],
        };
        let a_permit = permit(&a, Roles::CLIENT);
        let start = base + Duration::from_secs(1);
        let mut router = Router::new(cfg, clock, base);
        let mut node = Node::new(a.clone(), a_permit.clone(), clock);
        node.add_relay(start, R_ADDR);
        node.handle_timeout(start);
        let mut answers = Vec::new();
        for _ in 0..2 {
            let Some(t) = node.poll_transmit() else { panic!("the fixture's node sent no bind") };
            let mut buf = t.bytes;
            let Verdict::Reply(n) = router.handle_datagram(start, A_ADDR, &mut buf) else {
                panic!("the fixture's relay did not answer the bind")
            };
            buf.truncate(n);
            node.handle_datagram(start, R_ADDR, &buf);
            answers.push(buf);
        }
        assert_eq!(node.endpoint().bound_relays().count(), 1, "the fixture's bind failed");
        let ack = answers.pop().unwrap_or_default();
        let challenge = answers.pop().unwrap_or_default();
        Fixture { clock, a, a_permit, b, r: relay.node_id(), challenge, ack, start }
    })
}

/// Reads operations' arguments off the input; zeros past its end.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.data.split_first() else { return 0 };
        self.data = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// Up to `max` bytes, as many as a length prefix asks.
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()) % (max + 1);
        let n = n.min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
}

/// The peer's side of one VC, as the target plays it.
#[derive(Default)]
struct PeerVc {
    /// Our ephemeral and hello, until the node's hello arrives to agree keys with.
    pending: Option<(Ephemeral, HelloBody)>,
    keys: Option<SessionKeys>,
    /// The last frame we sealed, for tampered copies.
    last_sealed: Vec<u8>,
}

/// How a datagram from the peer reaches the node.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// Straight from this address (the peer's own, one it may have moved to, or anyone's).
    Direct(SocketAddr),
    /// Through the relay the node is bound to.
    Relay,
}

struct Run<'f> {
    f: &'f Fixture,
    node: Node,
    now: Instant,
    peer: BTreeMap<u32, PeerVc>,
    /// Datagrams delivered, for replays.
    history: Vec<(SocketAddr, Vec<u8>)>,
    /// The VC whose hello the node is expected to answer within the current drain.
    awaiting: Option<u32>,
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut run = Run::new(f);
    let mut r = Reader { data };
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        run.op(&mut r);
    }
    // Whatever the inputs did, time keeps running without a spin or a panic.
    run.advance(Duration::from_secs(30));
    let _ = run.node.counters();
    let _ = run.node.traffic();
});

impl<'f> Run<'f> {
    fn new(f: &'f Fixture) -> Run<'f> {
        let now = f.start;
        let mut node = Node::new(f.a.clone(), f.a_permit.clone(), f.clock);
        node.set_local_addr(A_ADDR);
        node.add_relay(now, R_ADDR);
        node.handle_timeout(now);
        discard(&mut node);
        node.handle_datagram(now, R_ADDR, &f.challenge);
        discard(&mut node);
        node.handle_datagram(now, R_ADDR, &f.ack);
        discard(&mut node);
        assert_eq!(node.endpoint().bound_relays().count(), 1, "the replayed bind does not match the node");
        let relayed = Path::Relayed(Route::new(&[f.r]).unwrap_or(Route::DIRECT));
        node.add_peer(now, PeerInfo { key: f.b.public_key(), paths: vec![Path::Direct(B_ADDR), relayed] });
        let mut run = Run { f, node, now, peer: BTreeMap::new(), history: Vec::new(), awaiting: None };
        run.check_transmits(MAX_PER_TIMEOUT, "introduction");
        run
    }

    fn op(&mut self, r: &mut Reader<'_>) {
        match r.u8() % 12 {
            // Raw bytes from anywhere.
            0 => {
                let from = self.pick_from(r);
                let bytes = r.bytes(1500).to_vec();
                self.deliver(from, bytes);
            }
            // An arbitrary frame in a valid datagram from the peer.
            1 => {
                let vc = r.u8() as u32 % VCS;
                let (via, trace) = self.pick_via(r);
                let body = r.bytes(MAX_DATAGRAM).to_vec();
                self.from_peer(vc, via, trace, &body);
            }
            // The peer's genuine hello, with an arbitrary profile and time.
            2 => self.peer_hello(r),
            // A sealed frame of arbitrary items under the keys the peer agreed: some bytes,
            // repeated (many items cost the fuzzer few bytes).
            3 => {
                let vc = r.u8() as u32 % VCS;
                let (via, trace) = self.pick_via(r);
                let times = usize::from(r.u8() % 64) + 1;
                let mut plain = r.bytes(MAX_DATAGRAM).repeat(times);
                plain.truncate(MAX_DATAGRAM);
                if let Some(sealed) = self.seal(vc, &plain) {
                    self.from_peer(vc, via, trace, &sealed);
                }
            }
            4 => {
                let b = r.u8();
                let d = match b {
                    0..=99 => Duration::from_millis(u64::from(b)),
                    100..=199 => Duration::from_millis(u64::from(b - 100) * 50),
                    _ => Duration::from_secs(u64::from(b - 200)),
                };
                self.advance(d);
            }
            // A replay of something delivered before, from where it came or elsewhere.
            5 => {
                if self.history.is_empty() {
                    return;
                }
                let i = usize::from(r.u8()) % self.history.len();
                let (mut from, bytes) = self.history[i].clone();
                if r.u8() & 1 == 1 {
                    from = self.pick_from(r);
                }
                self.deliver(from, bytes);
            }
            // The game opens a VC.
            6 => {
                let vc = VcId(r.u8() as u32 % VCS);
                let profile = named_profile(r.u8());
                let now = self.now;
                let _ = self.node.open(now, self.f.b.node_id(), vc, profile);
                self.check_transmits(MAX_PER_TIMEOUT, "open");
            }
            // The game sends a message.
            7 => {
                let key = VcKey { peer: self.f.b.node_id(), vc: VcId(r.u8() as u32 % VCS) };
                let message = r.bytes(4000).to_vec();
                let _ = self.node.send(key, message);
            }
            // The game closes a VC.
            8 => {
                let key = VcKey { peer: self.f.b.node_id(), vc: VcId(r.u8() as u32 % VCS) };
                let now = self.now;
                self.node.close(now, key);
                self.check_transmits(MAX_PER_TIMEOUT, "close");
            }
            // The relay's answers, tampered, and its notices.
            9 => {
                let which = r.u8();
                let mask = r.bytes(64);
                let mut bytes = match which % 3 {
                    0 => self.f.challenge.clone(),
                    1 => self.f.ack.clone(),
                    _ => {
                        let h = Header {
                            kind: Kind::Notice,
                            source: self.f.r,
                            destination: self.f.a.node_id(),
                            vc: VcId(0),
                            trace: false,
                        };
                        let mut body = [0; wire::NOTICE_BODY_LEN];
                        body[0] = which / 3 % 5;
                        let mut buf = vec![0; MAX_DATAGRAM];
                        let n = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &body).unwrap_or(0);
                        buf.truncate(n);
                        buf
                    }
                };
                for (b, m) in bytes.iter_mut().zip(mask) {
                    *b ^= m;
                }
                self.deliver(R_ADDR, bytes);
            }
            // A genuine sealed frame of the peer's, tampered.
            10 => {
                let vc = r.u8() as u32 % VCS;
                let (via, trace) = self.pick_via(r);
                let mask = r.bytes(MAX_DATAGRAM);
                let Some(mut frame) = self.peer.get(&vc).map(|p| p.last_sealed.clone()) else { return };
                for (b, m) in frame.iter_mut().zip(mask) {
                    *b ^= m;
                }
                self.from_peer(vc, via, trace, &frame);
            }
            // The node's network changes.
            _ => {
                let now = self.now;
                self.node.network_changed(now);
                self.check_transmits(MAX_PER_TIMEOUT, "network change");
            }
        }
    }

    fn pick_from(&self, r: &mut Reader<'_>) -> SocketAddr {
        let b = r.u8();
        match b % 4 {
            0 => B_ADDR,
            1 => R_ADDR,
            2 => STRANGER,
            // Addresses the peer may have moved to; few enough that they meet again.
            _ => addr([10, 9, 0, b / 4 % 12], 20_000 + u16::from(b / 48)),
        }
    }

    fn pick_via(&self, r: &mut Reader<'_>) -> (Via, bool) {
        let b = r.u8();
        let via = if b & 1 == 0 { Via::Relay } else { Via::Direct(self.pick_from(r)) };
        (via, b & 2 != 0)
    }

    /// The peer's hello for a VC: `[vc][profile][time][flags]`. The profile is a named one or
    /// 16 bytes from the input; the time is ours give or take; the peer keeps its ephemeral
    /// key unless the flags ask for a restart (a new one, and a later time).
    fn peer_hello(&mut self, r: &mut Reader<'_>) {
        let vc = r.u8() as u32 % VCS;
        let p = r.u8();
        let profile = if p < 128 {
            named_profile(p).config.to_wire()
        } else {
            let mut w = [0; shoal_protocol::profile::PROFILE_WIRE_LEN];
            for b in &mut w {
                *b = r.u8();
            }
            w
        };
        let skew = i64::from(r.u8() as i8) * 1000;
        let (via, trace) = self.pick_via(r);
        let ours = self.f.clock.unix_us(self.now) / 1000;
        let unix_ms = ours.saturating_add_signed(skew);
        let Ok(ephemeral) = Ephemeral::generate() else { return };
        let h = HelloBody { ephemeral: ephemeral.public(), static_key: self.f.b.public_key(), unix_ms, profile };
        let sig = h.sign(&self.f.b, self.f.a.node_id(), VcId(vc));
        let state = self.peer.entry(vc).or_default();
        state.pending = Some((ephemeral, h));
        self.awaiting = Some(vc);
        let bytes = frame::write_hello(&h, &sig);
        self.from_peer(vc, via, trace, &bytes);
        self.awaiting = None;
    }

    fn seal(&mut self, vc: u32, plain: &[u8]) -> Option<Vec<u8>> {
        let (b, a) = (self.f.b.node_id(), self.f.a.node_id());
        let state = self.peer.get_mut(&vc)?;
        let keys = state.keys.as_mut()?;
        let mut buf = Vec::with_capacity(frame::SEALED_OVERHEAD + plain.len());
        buf.push(frame::SEALED);
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(plain);
        let pn = keys.seal(|pn| frame::aad(pn, b, a, VcId(vc)), &mut buf, 9);
        buf[1..9].copy_from_slice(&pn.to_be_bytes());
        state.last_sealed = buf.clone();
        Some(buf)
    }

    /// A data datagram from the peer carrying `body`, delivered the way `via` says.
    fn from_peer(&mut self, vc: u32, via: Via, trace: bool, body: &[u8]) {
        let f = self.f;
        let h = Header { kind: Kind::Data, source: f.b.node_id(), destination: f.a.node_id(), vc: VcId(vc), trace };
        let stamp = f.clock.stamp_us(self.now);
        let mut buf = vec![0; MAX_DATAGRAM];
        let (route, from) = match via {
            Via::Direct(from) => (Route::DIRECT, from),
            Via::Relay => (Route::new(&[f.r]).unwrap_or(Route::DIRECT), R_ADDR),
        };
        let Ok(n) = wire::emit(&mut buf, &h, &route, stamp, body) else { return };
        buf.truncate(n);
        if !route.is_empty() {
            // The relay stamps it on the way.
            wire::stamp_and_advance(&mut buf, wire::relay_tag(f.r), stamp.wrapping_add(500));
        }
        self.deliver(from, buf);
    }

    fn deliver(&mut self, from: SocketAddr, bytes: Vec<u8>) {
        let now = self.now;
        self.node.handle_datagram(now, from, &bytes);
        self.check_transmits(MAX_PER_DATAGRAM, "one datagram");
        if self.history.len() < 32 {
            self.history.push((from, bytes));
        }
    }

    /// Runs the node's timers for `d`, at each instant it asks for.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        let mut calls_here = 0;
        for _ in 0..2000 {
            let due = self.node.poll_timeout(self.now);
            let next = match due {
                Some(t) if t <= end => t.max(self.now),
                _ => break,
            };
            if next == self.now {
                calls_here += 1;
                assert!(
                    calls_here <= MAX_CALLS_PER_INSTANT,
                    "the node keeps asking for a timeout at an instant it handled ({calls_here} calls)"
                );
            } else {
                calls_here = 1;
            }
            self.now = next;
            self.node.handle_timeout(next);
            self.check_transmits(MAX_PER_TIMEOUT, "one timeout");
        }
        self.now = end;
        self.node.handle_timeout(end);
        self.check_transmits(MAX_PER_TIMEOUT, "one timeout");
    }

    /// Drains the node's output and checks it: a bounded number of datagrams, each parsing, the
    /// data ones for the peer with hellos that verify and sealed frames whose items parse.
    fn check_transmits(&mut self, max: usize, after: &str) {
        let f = self.f;
        let mut n = 0;
        while let Some(t) = self.node.poll_transmit() {
            n += 1;
            assert!(n < max, "{n} datagrams in answer to {after}");
            assert!(t.bytes.len() <= MAX_DATAGRAM, "a datagram of {} bytes", t.bytes.len());
            if t.bytes.first() == Some(&frame::SHORT) {
                self.check_short(&t.bytes, t.to);
                continue;
            }
            let d = match Datagram::parse(&t.bytes) {
                Ok(d) => d,
                Err(e) => panic!("the node sent a datagram that does not parse: {e}"),
            };
            assert_eq!(d.source(), f.a.node_id());
            match d.kind() {
                Kind::Data => self.check_data(&d, t.to),
                Kind::BindRequest | Kind::BindProof => assert_eq!(t.to, R_ADDR),
                Kind::ProbeAck => {}
                other => panic!("the node sent a {other:?}"),
            }
        }
        while self.node.poll_event().is_some() {}
        let keys: Vec<VcKey> = self.node.vcs().collect();
        for k in keys {
            while self.node.recv(k).is_some() {}
            let _ = self.node.stats(self.now, k);
        }
    }

    /// A short-form datagram: only to the peer's direct address, holding a whole tag, and,
    /// when it is sealed under keys of one of our VCs with the node, items that parse.
    fn check_short(&mut self, bytes: &[u8], to: SocketAddr) {
        let f = self.f;
        assert_eq!(to, B_ADDR, "a short-form datagram not on the direct path");
        assert!(bytes.len() > frame::SHORT_HEADER_LEN + 16, "a short-form datagram of {} bytes", bytes.len());
        let low = u64::from(u16::from_be_bytes([bytes[5], bytes[6]]));
        for (&vc, state) in &mut self.peer {
            let Some(keys) = state.keys.as_mut() else { continue };
            // Packet numbers near the highest we opened with these low bits.
            let base = keys.highest_received().map_or(0, |h| h + 1) & !0xffff;
            for pn in [base | low, (base | low) + 0x1_0000, (base | low).saturating_sub(0x1_0000)] {
                let mut buf = bytes[frame::SHORT_HEADER_LEN..].to_vec();
                if let Ok(plain) = keys.open(pn, frame::aad(pn, f.a.node_id(), f.b.node_id(), VcId(vc)), &mut buf) {
                    if let Err(e) = frame::parse_items(plain) {
                        panic!("the node sealed a short frame whose items do not parse: {e}");
                    }
                    return;
                }
            }
        }
    }

    fn check_data(&mut self, d: &Datagram<'_>, to: SocketAddr) {
        let f = self.f;
        assert_eq!(d.destination(), f.b.node_id(), "data for a node never introduced");
        if d.route_len() > 0 {
            assert_eq!((to, d.route_at(0)), (R_ADDR, f.r), "relayed data not through the bound relay");
        }
        let vc = d.vc();
        match Frame::parse(d.body()) {
            Ok(Frame::Hello(h, sig)) => {
                assert_eq!(h.static_key, f.a.public_key());
                assert!(h.verify(&sig, f.a.node_id(), f.b.node_id(), vc).is_ok(), "the node's hello does not verify");
                // The node took the peer's hello and answered: both sides agree keys now.
                if self.awaiting == Some(vc.0)
                    && let Some(state) = self.peer.get_mut(&vc.0)
                    && let Some((mut e, mine)) = state.pending.take()
                {
                    let (me, node) = (f.b.node_id(), f.a.node_id());
                    if let Ok(k) = SessionKeys::derive(me, node, &mut e, &mine, &h) {
                        state.keys = Some(k);
                    }
                }
            }
            Ok(Frame::Sealed { pn, .. }) => {
                let Some(keys) = self.peer.get_mut(&vc.0).and_then(|s| s.keys.as_mut()) else { return };
                let mut buf = d.body().to_vec();
                match keys.open(pn, frame::aad(pn, f.a.node_id(), f.b.node_id(), vc), &mut buf[9..]) {
                    Ok(plain) => {
                        if let Err(e) = frame::parse_items(plain) {
                            panic!("the node sealed a frame whose items do not parse: {e}");
                        }
                    }
                    // A copy on a second path, or keys the node agreed without telling us.
                    Err(CryptoError::Replay(_) | CryptoError::Auth) => {}
                    Err(e) => panic!("opening the node's frame: {e}"),
                }
            }
            Err(e) => panic!("the node sent a frame that does not parse: {e}"),
        }
    }
}

fn named_profile(b: u8) -> Profile {
    match b % 6 {
        0 => Profile::realtime(false),
        1 => Profile::realtime(true),
        2 => Profile::reliable(),
        3 => Profile::bulk(),
        4 => Profile::voice(),
        _ => {
            let c = ProfileConfig::Reliable { max_latency_ms: Some(40) };
            Profile::from_config(&c).unwrap_or_else(|_| Profile::reliable())
        }
    }
}

fn discard(node: &mut Node) {
    while node.poll_transmit().is_some() {}
    while node.poll_event().is_some() {}
}
