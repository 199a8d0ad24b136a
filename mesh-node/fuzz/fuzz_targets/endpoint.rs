//! The node side of the mesh plane, `endpoint::Endpoint::handle_datagram` and the bind client
//! under it (`bind::BindClient`), fed what a hostile network can send while the endpoint binds
//! to a relay: arbitrary bytes from the relay's address and from others, the relay's genuine
//! challenge and ack tampered, challenges, acks and notices with arbitrary bodies, sources and
//! flags, probes and acks of the endpoint's own probes with arbitrary traces, interleaved with
//! `handle_timeout` at advancing virtual times.
//!
//! Every datagram is answered with at most one datagram, sent back where it came from. The
//! answer is never larger than what provoked it, but for the bind proof that answers a
//! challenge: a proof carries the permit and a signature, so it is larger than any challenge,
//! and what bounds it instead is that the endpoint answers at most one challenge per request it
//! sent, so a flood of challenges forged from the relay's address draws nothing more. The
//! endpoint never panics, and after `handle_timeout(now)` it never asks for a timeout at or
//! before `now`.
//!
//! Every input gets a fresh endpoint, which sends its first bind request at once; the genuine
//! challenge and ack were recorded once against a real `Router` (fixed seeds, one `Instant`
//! base). Input: a sequence of operations, a selector byte and its arguments each (see
//! `Run::op`).

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_mesh::bind::Transmit;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::{Endpoint, Path};
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{self, Datagram, Header, Kind, MAX_DATAGRAM, Route, VcId};
use shoal_protocol::{Identity, NodeId, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

const T0_UNIX_US: u64 = 1_800_000_000_000_000;
const T0_UNIX: u64 = T0_UNIX_US / 1_000_000;
/// Operations read from one input.
const MAX_OPS: usize = 64;

const NODE: SocketAddr = addr([192, 0, 2, 1], 7000);
const RELAY: SocketAddr = addr([192, 0, 2, 9], 9000);
const STRANGER: SocketAddr = addr([192, 0, 2, 66], 9999);

const fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])), port)
}

struct Fixture {
    clock: WallClock,
    start: Instant,
    node: Identity,
    permit: SignedTicket,
    relay: NodeId,
    /// The relay's answers to the endpoint's first bind, at `start`.
    challenge: Vec<u8>,
    ack: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base = Instant::now();
        let clock = WallClock::new(base, T0_UNIX_US);
        let control = Identity::from_seed([1; 32]);
        let relay = Identity::from_seed([2; 32]);
        let node = Identity::from_seed([3; 32]);
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
            cookie_secret: [2; 32],
            fanout: shoal_mesh::fanout::FanoutConfig::default(),
        };
        let start = base + Duration::from_secs(1);
        let node_permit = permit(&node, Roles::CLIENT);
        let mut router = Router::new(cfg, clock, base);
        let mut e = Endpoint::new(node.clone(), node_permit.clone(), clock);
        e.add_relay(start, RELAY);
        e.handle_timeout(start);
        let mut answers = Vec::new();
        for _ in 0..2 {
            let Some(t) = e.poll_transmit() else { panic!("the fixture's endpoint sent no bind") };
            let mut buf = t.bytes;
            let Verdict::Reply(n) = router.handle_datagram(start, NODE, &mut buf) else {
                panic!("the fixture's relay did not answer the bind")
            };
            buf.truncate(n);
            e.handle_datagram(start, RELAY, &buf);
            answers.push(buf);
        }
        assert_eq!(e.bound_relays().count(), 1, "the fixture's bind failed");
        let ack = answers.pop().unwrap_or_default();
        let challenge = answers.pop().unwrap_or_default();
        Fixture { clock, start, node, permit: node_permit, relay: relay.node_id(), challenge, ack }
    })
}

/// Reads operations' arguments off the input; zeros past its end.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.data.split_first() else { return 0 };
        self.data = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }

    /// Up to `max` bytes, as many as a length prefix asks.
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (usize::from(self.u16()) % (max + 1)).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
}

struct Run<'f> {
    f: &'f Fixture,
    e: Endpoint,
    now: Instant,
    /// Bind requests the endpoint has sent.
    requests: usize,
    /// Bind proofs it sent in answer to a datagram.
    proofs_answered: usize,
    /// Probes it sent: id, destination, path.
    probes: Vec<(u64, NodeId, Path)>,
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut run = Run::new(f);
    let mut r = Reader { data };
    for _ in 0..MAX_OPS {
        if r.data.is_empty() {
            break;
        }
        run.op(&mut r);
    }
    run.advance(Duration::from_secs(10));
    for t in run.e.unbind_all() {
        assert_eq!(t.to, RELAY);
        let d = parse(&t.bytes, "unbind");
        assert!(d.kind() == Kind::BindProof && d.unbind(), "an unbind that is a {:?}", d.kind());
    }
    let _ = run.e.counters();
    let _ = run.e.observed_address();
    let _ = run.e.keepalive(RELAY);
    let _ = run.e.relay_rtts().count();
});

fn parse<'a>(bytes: &'a [u8], what: &str) -> Datagram<'a> {
    match Datagram::parse(bytes) {
        Ok(d) => d,
        Err(e) => panic!("the endpoint's {what} does not parse: {e}"),
    }
}

impl<'f> Run<'f> {
    fn new(f: &'f Fixture) -> Run<'f> {
        let mut e = Endpoint::new(f.node.clone(), f.permit.clone(), f.clock);
        e.set_local_addr(NODE);
        e.add_relay(f.start, RELAY);
        let mut run = Run { f, e, now: f.start, requests: 0, proofs_answered: 0, probes: Vec::new() };
        run.timeout(f.start);
        assert_eq!(run.requests, 1, "the endpoint did not start binding");
        run
    }

    fn op(&mut self, r: &mut Reader<'_>) {
        match r.u8() % 9 {
            // Arbitrary bytes from the relay's address, or from elsewhere.
            0 => {
                let from = if r.u8() & 1 == 0 { RELAY } else { STRANGER };
                let bytes = r.bytes(1500).to_vec();
                self.deliver(from, &bytes);
            }
            // The relay's genuine challenge or ack, tampered.
            1 | 2 => {
                let mut bytes = if r.u8() & 1 == 0 { self.f.challenge.clone() } else { self.f.ack.clone() };
                for (b, m) in bytes.iter_mut().zip(r.bytes(64)) {
                    *b ^= m;
                }
                let from = if r.u8() & 7 == 0 { STRANGER } else { RELAY };
                self.deliver(from, &bytes);
            }
            // A bind answer or notice with valid framing and arbitrary fields.
            3 | 4 => {
                let b = r.u8();
                let kind = [Kind::BindChallenge, Kind::BindAck, Kind::Notice][usize::from(b % 3)];
                let source = if b & 4 == 0 { self.f.relay } else { NodeId(r.array()) };
                let destination = if b & 8 == 0 { self.f.node.node_id() } else { NodeId(r.array()) };
                let h = Header { kind, source, destination, vc: VcId(0), trace: false };
                let body = r.bytes(256).to_vec();
                let mut buf = vec![0; MAX_DATAGRAM];
                let Ok(n) = wire::emit(&mut buf, &h, &Route::DIRECT, 0, &body) else { return };
                buf.truncate(n);
                if b & 16 != 0 && kind == Kind::BindAck {
                    wire::set_unbind(&mut buf);
                }
                let from = if b & 32 == 0 { RELAY } else { STRANGER };
                self.deliver(from, &buf);
            }
            5 => {
                let b = r.u8();
                let d = match b {
                    0..=99 => Duration::from_millis(u64::from(b) * 10),
                    _ => Duration::from_secs(u64::from(b - 100)),
                };
                self.advance(d);
            }
            // A probe of ours, direct or through the relay.
            6 => {
                let destination = NodeId([r.u8(); 8]);
                let path = if r.u8() & 1 == 0 {
                    Path::Direct(STRANGER)
                } else {
                    Path::Relayed(Route::new(&[self.f.relay]).unwrap_or(Route::DIRECT))
                };
                let now = self.now;
                if let Ok(id) = self.e.probe(now, destination, &path) {
                    self.probes.push((id, destination, path));
                }
                let sent = self.drain();
                assert!(sent.len() <= 1);
            }
            // An answer to one of our probes (or to none), with an arbitrary trace and body.
            7 => {
                let b = r.u8();
                let (id, source, path) = match self.probes.get(usize::from(b) % (self.probes.len() + 1)) {
                    Some(p) => *p,
                    None => (u64::from(r.u8()), NodeId(r.array()), Path::Direct(STRANGER)),
                };
                let route = path.route();
                let mut body = r.bytes(256).to_vec();
                body.resize(body.len().max(wire::probe_body_len(route.len())), 0);
                body[..8].copy_from_slice(&id.to_be_bytes());
                let kind = if b & 1 == 0 { Kind::ProbeAck } else { Kind::Probe };
                self.routed(kind, source, route, &body, r);
            }
            // A probe or data from a peer, straight or through the relay.
            _ => {
                let b = r.u8();
                let kind = if b & 1 == 0 { Kind::Probe } else { Kind::Data };
                let route = if b & 2 == 0 { Route::DIRECT } else { Route::new(&[self.f.relay]).unwrap_or(Route::DIRECT) };
                let mut body = r.bytes(256).to_vec();
                if kind == Kind::Probe {
                    body.resize(body.len().max(wire::probe_body_len(route.len())), 0);
                }
                self.routed(kind, NodeId(r.array()), route, &body, r);
            }
        }
    }

    /// A routed datagram from `source` to us over `route` (stamped by its relays), with its
    /// traces from the input.
    fn routed(&mut self, kind: Kind, source: NodeId, route: Route, body: &[u8], r: &mut Reader<'_>) {
        let h = Header { kind, source, destination: self.f.node.node_id(), vc: VcId(u32::from(r.u8())), trace: true };
        let mut buf = vec![0; MAX_DATAGRAM];
        let origin = u32::from_be_bytes(r.array());
        let Ok(n) = wire::emit(&mut buf, &h, &route, origin, body) else { return };
        buf.truncate(n);
        for _ in 0..route.len() {
            wire::stamp_and_advance(&mut buf, u32::from_be_bytes(r.array()), u32::from_be_bytes(r.array()));
        }
        let from = if route.is_empty() || r.u8() & 7 == 0 { STRANGER } else { RELAY };
        self.deliver(from, &buf);
    }

    fn deliver(&mut self, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        self.e.handle_datagram(now, from, bytes);
        let sent = self.drain();
        assert!(sent.len() <= 1, "{} datagrams in answer to one", sent.len());
        let Some(t) = sent.first() else { return };
        assert_eq!(t.to, from, "an answer sent elsewhere than where its cause came from");
        let d = parse(&t.bytes, "answer");
        assert_eq!(d.source(), self.f.node.node_id());
        match d.kind() {
            Kind::BindProof => {
                let cause = parse(bytes, "cause");
                assert_eq!(cause.kind(), Kind::BindChallenge, "a proof in answer to a {:?}", cause.kind());
                assert_eq!(from, RELAY, "a proof sent to an address the endpoint does not bind to");
                assert!(!d.unbind());
                self.proofs_answered += 1;
                assert!(
                    self.proofs_answered <= self.requests,
                    "{} proofs in answer to challenges after {} requests",
                    self.proofs_answered,
                    self.requests
                );
            }
            Kind::ProbeAck => {
                assert!(t.bytes.len() <= bytes.len(), "a probe ack of {} bytes to {}", t.bytes.len(), bytes.len());
            }
            other => panic!("a {other:?} in answer to a datagram"),
        }
    }

    /// Runs the endpoint's timers for `d`, at each instant it asks for.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..1000 {
            match self.e.poll_timeout() {
                Some(t) if t <= end => self.timeout(t.max(self.now)),
                _ => break,
            }
        }
        self.timeout(end);
    }

    fn timeout(&mut self, now: Instant) {
        self.now = now;
        self.e.handle_timeout(now);
        if let Some(t) = self.e.poll_timeout() {
            assert!(t > now, "the endpoint asks for a timeout {:?} before the one it handled", now - t);
        }
        for t in self.drain() {
            assert_eq!(t.to, RELAY, "a timer sent to an address that is not a relay");
            let d = parse(&t.bytes, "bind");
            match d.kind() {
                Kind::BindRequest => self.requests += 1,
                Kind::BindProof => {}
                other => panic!("a timer sent a {other:?}"),
            }
        }
    }

    fn drain(&mut self) -> Vec<Transmit> {
        let mut out = Vec::new();
        while let Some(t) = self.e.poll_transmit() {
            assert!(t.bytes.len() <= MAX_DATAGRAM);
            out.push(t);
        }
        while self.e.poll_event().is_some() {}
        out
    }
}
