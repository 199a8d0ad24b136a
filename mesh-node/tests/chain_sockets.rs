//! A relay chain on real sockets: two relays in this process, each with two workers on
//! loopback, bound to each other. The second is fed the publisher's group at the first, and ten
//! subscribers at the second get every publish, which crossed the link between the relays once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_mesh::driver::batch::bind_reuseport;
use shoal_mesh::driver::endpoint::MeshEndpoint;
use shoal_mesh::driver::relay::{Relay, RelayOptions};
use shoal_mesh::fanout::FanoutConfig;
use shoal_mesh::router::{Rate, RouterConfig};
use shoal_mesh::wire::{SubscribeStatus, VcId};
use shoal_protocol::{
    Identity, NodeId, Roles, SignedSubscription, SignedTicket, StreamId, SubscriptionBody, TicketBody, TicketKind,
    UnixTime,
};

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn permit(control: &Identity, node: &Identity, roles: Roles) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), roles, UnixTime(unix_now() - 5), 600).sign(control)
}

fn relay(control: &Identity, seed: u8, peers: Vec<SocketAddr>) -> Relay {
    let identity = Identity::from_seed([seed; 32]);
    let lots = Rate { per_sec: 1e6, burst: 1e6 };
    let router = RouterConfig {
        permit: Some(permit(control, &identity, Roles::RELAY)),
        identity,
        control_key: control.public_key(),
        source_packets: lots,
        source_bytes: lots,
        bind_verifications: lots,
        notices: lots,
        max_bindings: 64,
        cookie_secret: [seed; 32],
        fanout: FanoutConfig::default(),
    };
    let sockets = bind_reuseport("127.0.0.1:0".parse().unwrap(), 2, 1 << 20).unwrap();
    Relay::spawn(sockets, RelayOptions { router, peers }).unwrap()
}

fn subscription(control: &Identity, subscriber: NodeId, publisher: NodeId, relay: NodeId) -> SignedSubscription {
    SubscriptionBody {
        subscriber,
        publisher,
        stream: StreamId(1),
        relay,
        issued_at: UnixTime(unix_now()),
        expires_at: UnixTime(unix_now() + 60),
    }
    .sign(control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fed_relay_on_real_sockets_copies_each_publish_it_took_once_to_its_subscribers() {
    let control = Identity::from_seed([100; 32]);
    let r2 = relay(&control, 12, vec![]);
    let r1 = relay(&control, 11, vec![r2.local_addr()]);
    let bind = |seed: u8, at: SocketAddr| {
        let id = Identity::from_seed([seed; 32]);
        let p = permit(&control, &id, Roles::CLIENT);
        async move {
            let mut e = MeshEndpoint::bind("127.0.0.1:0".parse().unwrap(), id, p).await.unwrap();
            e.attach_relay(at, Duration::from_secs(5)).await.unwrap();
            e
        }
    };
    let mut publisher = bind(1, r1.local_addr()).await;
    let mut subscribers = Vec::new();
    for seed in 30..40 {
        let mut e = bind(seed, r2.local_addr()).await;
        let sub = subscription(&control, e.node_id(), publisher.node_id(), r2.node_id());
        let ack = e.subscribe(&sub, false, Duration::from_secs(5)).await.unwrap();
        assert_eq!(ack.status, SubscribeStatus::Member);
        subscribers.push(e);
    }
    // The relays bind to each other; then the second is fed, and presents the feed upstream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r2.stats().peer_rtts().is_empty() || r1.stats().peer_rtts().is_empty() {
        assert!(Instant::now() < deadline, "the relays never bound to each other");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r2.handle().feed(subscription(&control, r2.node_id(), publisher.node_id(), r1.node_id()));
    while r1.stats().gauges().members < 1 {
        assert!(Instant::now() < deadline, "the first relay never took the second as a member");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both workers of each relay know the membership and the feed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10u8 {
        publisher.publish(r1.node_id(), 1, &[i; 40]).await.unwrap();
    }
    for (k, s) in subscribers.iter_mut().enumerate() {
        let mut got: Vec<u8> = Vec::new();
        for _ in 0..10 {
            let rx = s.recv_published(Duration::from_secs(2)).await.unwrap_or_else(|e| {
                panic!("subscriber {k}: {e}; relays {:?}, {:?}", r1.stats().counters(), r2.stats().counters())
            });
            assert_eq!((rx.source, rx.vc, rx.payload.len()), (publisher.node_id(), VcId(1), 40));
            assert_eq!(rx.route.relays(), &[r2.node_id()], "subscriber {k} took a copy from elsewhere");
            got.push(rx.payload[0]);
        }
        got.sort_unstable();
        assert_eq!(got, (0..10).collect::<Vec<u8>>(), "subscriber {k}");
    }
    // Counters are published every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c1, c2) = (r1.stats().counters(), r2.stats().counters());
    assert_eq!((c1.published, c1.copies), (10, 10), "the first relay sent one copy per publish");
    assert_eq!((c2.fed, c2.copies, c2.feeds_refused), (10, 100, 0));
    assert_eq!(r2.stats().gauges().feeds, 1);
}
