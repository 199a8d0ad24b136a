//! Arbitrary bytes as one received datagram into `Router::handle_datagram`, which must never
//! panic, never answer with more bytes than it received (no amplification), and forward only
//! in place.
//!
//! Every input gets a fresh router built from one fixed configuration (fixed seeds, one
//! `Instant` base captured once), so runs are reproducible. The router first learns a bound
//! peer relay and a bound client node. The input is then delivered from each of three fixed
//! addresses, one after the other: an unbound sender (the notice path), the bound client (the
//! node checks of the hot path) and the bound peer relay (the forwarding path, and the peer
//! bind replies the router is waiting for). Then the input is XORed over the client's genuine
//! unbind (made once, against the challenge of the client's binding) and delivered from the
//! client, so the unbind checks are reached past the cookie; another worker's unbinding with
//! fields from the input is applied; and time runs past the idle expiry, after which no
//! binding may be left. The router is fed one group by the peer relay, of which the client is
//! a member: only a copy from the peer, of that group, is fanned out, only to the client, and
//! made the router's own.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_mesh::bind::BindClient;
use shoal_mesh::clock::WallClock;
use shoal_mesh::router::{IDLE_EXPIRY, Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{self, Datagram, Kind, Notice};
use shoal_protocol::{
    Identity, NodeId, Roles, SignedSubscription, StreamId, SubscriptionBody, TicketBody, TicketKind, UnixTime,
};

const T0_UNIX_US: u64 = 1_800_000_000_000_000;
const T0_UNIX: u64 = T0_UNIX_US / 1_000_000;

const STRANGER: SocketAddr = addr(40_001);
const CLIENT: SocketAddr = addr(40_002);
const PEER: SocketAddr = addr(40_003);

const fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), port)
}

struct Fixture {
    base: Instant,
    cfg: RouterConfig,
    client: NodeId,
    peer: NodeId,
    /// When the challenge of the client's binding was issued.
    challenge_at: u64,
    /// The client's unbind for that binding.
    unbind: Vec<u8>,
    /// The group the peer relay feeds the router, signed by the control server.
    feed: SignedSubscription,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let control = Identity::from_seed([1; 32]);
        let identity = Identity::from_seed([2; 32]);
        let permit =
            TicketBody::new(TicketKind::RelayPermit, identity.public_key(), Roles::RELAY, UnixTime(T0_UNIX), 3600)
                .sign(&control);
        let lots = Rate { per_sec: 1e6, burst: 1e6 };
        let cfg = RouterConfig {
            identity,
            permit: Some(permit),
            control_key: control.public_key(),
            source_packets: Rate { per_sec: 100.0, burst: 20.0 },
            source_bytes: lots,
            bind_verifications: lots,
            notices: lots,
            max_bindings: 16,
            cookie_secret: [2; 32],
            // Without bundling, so that each fan-out is a verdict the checks below can see.
            fanout: shoal_mesh::fanout::FanoutConfig { bundle_window: Duration::ZERO, ..Default::default() },
        };
        let base = Instant::now();
        let client = Identity::from_seed([3; 32]);
        let (challenge_at, unbind) = genuine_unbind(&cfg, base, &control, &client);
        let peer = Identity::from_seed([4; 32]).node_id();
        let feed = SubscriptionBody {
            subscriber: cfg.identity.node_id(),
            publisher: Identity::from_seed([5; 32]).node_id(),
            stream: StreamId(1),
            relay: peer,
            issued_at: UnixTime(T0_UNIX),
            expires_at: UnixTime(T0_UNIX + 3600),
        }
        .sign(&control);
        Fixture { base, cfg, client: client.node_id(), peer, challenge_at, unbind, feed }
    })
}

/// Binds `client` from [`CLIENT`] to a router of `cfg` with a real handshake at the time every
/// input runs at, and returns its challenge's time and its unbind.
fn genuine_unbind(cfg: &RouterConfig, base: Instant, control: &Identity, client: &Identity) -> (u64, Vec<u8>) {
    let now = base + Duration::from_secs(1);
    let clock = WallClock::new(base, T0_UNIX_US);
    let permit = TicketBody::new(TicketKind::RelayPermit, client.public_key(), Roles::CLIENT, UnixTime(T0_UNIX), 3600)
        .sign(control);
    let mut router = Router::new(cfg.clone(), clock, base);
    let mut c = BindClient::new(addr(7000), now);
    let mut out = c.handle_timeout(now, client, &permit).map(|t| t.bytes).unwrap_or_default();
    let mut challenge_at = 0;
    for _ in 0..2 {
        let Verdict::Reply(n) = router.handle_datagram(now, CLIENT, &mut out) else {
            panic!("the fixture's bind failed")
        };
        let reply = out[..n].to_vec();
        let Ok(d) = Datagram::parse(&reply) else { panic!("the fixture's bind reply does not parse") };
        if d.kind() == Kind::BindChallenge {
            challenge_at = wire::Challenge::read(d.body()).issued_at;
        }
        match c.handle_datagram(now, &clock, &d, client, &permit) {
            Some(t) => out = t.bytes,
            None => break,
        }
    }
    let Some(unbind) = c.unbind(client, &permit) else { panic!("the fixture's client is not bound") };
    (challenge_at, unbind.bytes)
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let clock = WallClock::new(f.base, T0_UNIX_US);
    let now = f.base + Duration::from_secs(1);
    let expires = T0_UNIX + 3600;

    let mut router = Router::new(f.cfg.clone(), clock, f.base);
    router.apply_binding(now, f.client, Roles::CLIENT, CLIENT, expires, f.challenge_at);
    router.apply_binding(now, f.peer, Roles::RELAY, PEER, expires, 0);
    if let Err(e) = router.feed(now, f.feed) {
        panic!("the fixture's feed was refused: {e}");
    }
    router.apply_membership(now, f.feed.body.group(), f.client, CLIENT, expires);
    // Starts the bind to the peer relay, so that its challenge or ack is expected.
    router.handle_timeout(now);
    drain(&mut router);

    for from in [STRANGER, CLIENT, PEER] {
        deliver(&mut router, now, from, data);
        drain(&mut router);
    }
    let mut unbind = f.unbind.clone();
    for (b, x) in unbind.iter_mut().zip(data) {
        *b ^= x;
    }
    deliver(&mut router, now, CLIENT, &unbind);
    drain(&mut router);
    // Another worker's unbinding, of whatever the input names.
    let mut field = [0u8; 16];
    for (b, x) in field.iter_mut().zip(data) {
        *b = *x;
    }
    let (node, at) = field.split_at(8);
    let at = u64::from_be_bytes(at.try_into().unwrap_or_default());
    let target = if field[0] & 1 == 0 { CLIENT } else { PEER };
    router.apply_unbinding(NodeId(node.try_into().unwrap_or_default()), target, at);
    drain(&mut router);
    router.handle_timeout(now + Duration::from_secs(5));
    drain(&mut router);
    // Nothing was heard since: past the idle expiry, every binding is gone.
    router.handle_timeout(now + IDLE_EXPIRY + Duration::from_secs(2));
    drain(&mut router);
    assert_eq!(router.bindings(), 0, "a binding outlived the idle expiry");
});

fn drain(router: &mut Router) {
    while let Some(t) = router.poll_transmit() {
        assert!(t.bytes.len() <= wire::MAX_DATAGRAM);
        assert!(Datagram::parse(&t.bytes).is_ok(), "router transmit does not parse");
    }
    while router.poll_event().is_some() {}
}

fn deliver(router: &mut Router, now: Instant, from: SocketAddr, data: &[u8]) {
    let mut buf = data.to_vec();
    let len = buf.len();
    let verdict = router.handle_datagram(now, from, &mut buf);
    assert_eq!(buf.len(), len);
    match verdict {
        Verdict::Reply(n) => {
            assert!(n <= len, "amplification: reply of {n} bytes to {len} from {from}");
            let r = match Datagram::parse(&buf[..n]) {
                Ok(r) => r,
                Err(e) => panic!("reply does not parse: {e}"),
            };
            assert!(
                matches!(r.kind(), Kind::BindChallenge | Kind::BindAck | Kind::SubscribeAck),
                "reply of kind {:?}",
                r.kind()
            );
            assert!(!r.unbind() || r.kind() == Kind::BindAck, "an unbind flag on a {:?}", r.kind());
            assert_eq!(r.source(), router.id());
        }
        Verdict::DropWithNotice(reason, n) => {
            assert!(n <= len, "amplification: notice ({reason:?}) of {n} bytes to {len} from {from}");
            let r = match Datagram::parse(&buf[..n]) {
                Ok(r) => r,
                Err(e) => panic!("notice does not parse: {e}"),
            };
            match r.kind() {
                Kind::Notice => assert!(Notice::read(r.body()).is_ok(), "notice body does not read"),
                Kind::SubscribeAck => assert!(wire::SubscribeAck::read(r.body()).is_ok(), "refusal does not read"),
                k => panic!("a refusal of kind {k:?}"),
            }
        }
        Verdict::FanOut(group) => {
            // Nobody in this fixture presents a subscription that verifies: the only group is
            // the fed one, and only the peer that feeds it sends copies of it.
            let f = fixture();
            assert_eq!((group, from), (f.feed.body.group(), PEER));
            assert_eq!(router.copies_for(&group), &[CLIENT]);
            let (before, after) = match (Datagram::parse(data), Datagram::parse(&buf)) {
                (Ok(b), Ok(a)) => (b, a),
                _ => panic!("a fanned-out copy that does not parse"),
            };
            assert_eq!((after.kind(), after.source(), after.vc()), (Kind::Publish, before.source(), before.vc()));
            assert_eq!((after.destination(), after.route().relays()), (router.id(), &[router.id()][..]));
            assert_eq!(after.body(), before.body());
        }
        Verdict::Forward(to) => {
            assert!(to == CLIENT || to == PEER, "forward to unknown {to}");
            let before = match Datagram::parse(data) {
                Ok(d) => d,
                Err(e) => panic!("forwarded a datagram that does not parse: {e}"),
            };
            let after = match Datagram::parse(&buf) {
                Ok(d) => d,
                Err(e) => panic!("forwarded datagram no longer parses: {e}"),
            };
            assert!(before.kind().is_routed());
            assert_eq!(after.hop(), before.hop() + 1);
            assert_eq!(after.route(), before.route());
            assert_eq!(after.body(), before.body());
        }
        Verdict::Drop(_) | Verdict::Consumed => {}
    }
}
