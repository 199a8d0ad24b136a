//! Arbitrary bytes as one received datagram into `Router::handle_datagram`, which must never
//! panic, never answer with more bytes than it received (no amplification), and forward only
//! in place.
//!
//! Every input gets a fresh router built from one fixed configuration (fixed seeds, one
//! `Instant` base captured once), so runs are reproducible. The router first learns a bound
//! peer relay and a bound client node. The input is then delivered from each of three fixed
//! addresses, one after the other: an unbound sender (the notice path), the bound client (the
//! node checks of the hot path) and the bound peer relay (the forwarding path, and the peer
//! bind replies the router is waiting for).

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_mesh::clock::WallClock;
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_mesh::wire::{self, Datagram, Kind, Notice};
use shoal_protocol::{Identity, NodeId, Roles, TicketBody, TicketKind, UnixTime};

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
        };
        Fixture {
            base: Instant::now(),
            cfg,
            client: Identity::from_seed([3; 32]).node_id(),
            peer: Identity::from_seed([4; 32]).node_id(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let clock = WallClock::new(f.base, T0_UNIX_US);
    let now = f.base + Duration::from_secs(1);
    let expires = T0_UNIX + 3600;

    let mut router = Router::new(f.cfg.clone(), clock, f.base);
    router.apply_binding(now, f.client, Roles::CLIENT, CLIENT, expires);
    router.apply_binding(now, f.peer, Roles::RELAY, PEER, expires);
    // Starts the bind to the peer relay, so that its challenge or ack is expected.
    router.handle_timeout(now);
    drain(&mut router);

    for from in [STRANGER, CLIENT, PEER] {
        deliver(&mut router, now, from, data);
        drain(&mut router);
    }
    router.handle_timeout(now + Duration::from_secs(5));
    drain(&mut router);
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
            assert!(matches!(r.kind(), Kind::BindChallenge | Kind::BindAck), "reply of kind {:?}", r.kind());
            assert_eq!(r.source(), router.id());
        }
        Verdict::DropWithNotice(reason, n) => {
            assert!(n <= len, "amplification: notice ({reason:?}) of {n} bytes to {len} from {from}");
            let r = match Datagram::parse(&buf[..n]) {
                Ok(r) => r,
                Err(e) => panic!("notice does not parse: {e}"),
            };
            assert_eq!(r.kind(), Kind::Notice);
            assert!(Notice::read(r.body()).is_ok(), "notice body does not read");
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
