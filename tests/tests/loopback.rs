//! Two SDK clients on real UDP sockets on loopback, talking through one `shoal-mesh-node`
//! relay process, on Realtime, Reliable and Bulk VCs at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::{Identity, Roles};
use shoal_sdk::{Client, ClientError, ClientEvent, Event, NodeError, PeerInfo, Profile, VcEvent};
use shoal_tests::procs::{permit, start_relay};
use tokio::time::timeout;

async fn client(control: &Identity, seed: u8, relay: SocketAddr) -> (Client, Identity) {
    let id = Identity::from_seed([seed; 32]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut c = Client::start(sock, id.clone(), permit(control, &id, Roles::CLIENT)).unwrap();
    c.add_relay(relay).unwrap();
    loop {
        match timeout(Duration::from_secs(5), c.next()).await.expect("relay bind timed out") {
            Some(ClientEvent::Node(Event::RelayBound { .. })) => break,
            Some(_) => {}
            None => panic!("client stopped"),
        }
    }
    (c, id)
}

fn chunk(i: u8) -> Vec<u8> {
    (0..64 * 1024u32).map(|j| (j as u8).wrapping_mul(7).wrapping_add(i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_exchange_on_realtime_reliable_and_bulk_vcs_through_a_relay_process() {
    let control = Identity::from_seed([100; 32]);
    let dir = std::env::temp_dir().join(format!("shoal-loopback-{}", std::process::id()));
    let relay = start_relay(&dir, &control, 42, "");
    let (relay_id, relay_addr) = (relay.id, relay.addr);
    let (mut a, ida) = client(&control, 1, relay_addr).await;
    let (mut b, idb) = client(&control, 2, relay_addr).await;
    let via = Path::Relayed(Route::new(&[relay_id]).unwrap());
    a.add_peer(PeerInfo { key: idb.public_key(), paths: vec![via] }).unwrap();
    b.add_peer(PeerInfo { key: ida.public_key(), paths: vec![via] }).unwrap();

    let rt = a.open(b.id(), VcId(1), Profile::realtime(false)).await.unwrap();
    let rel = a.open(b.id(), VcId(2), Profile::reliable()).await.unwrap();
    let bulk = a.open(b.id(), VcId(3), Profile::bulk()).await.unwrap();
    const UPDATES: u32 = 300;
    const CHUNKS: u8 = 10;
    for i in 0..UPDATES {
        a.send(rt, i.to_be_bytes().repeat(16)).await.unwrap();
        a.send(rel, i.to_be_bytes().to_vec()).await.unwrap();
        if i % 30 == 0 {
            a.send(bulk, chunk((i / 30) as u8)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // B: collect everything, and answer on the reliable VC once it is open.
    let (mut updates, mut reliable, mut chunks, mut replied) = (0u32, Vec::new(), Vec::new(), false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reliable.len() < UPDATES as usize || chunks.len() < usize::from(CHUNKS) {
        let ev = tokio::time::timeout_at(deadline, b.next()).await.expect("B timed out").expect("B stopped");
        match ev {
            ClientEvent::Message(k, m) if k.vc == VcId(1) => {
                assert_eq!(m.len(), 64);
                updates += 1;
            }
            ClientEvent::Message(k, m) if k.vc == VcId(2) => {
                reliable.push(u32::from_be_bytes(m[..4].try_into().unwrap()))
            }
            ClientEvent::Message(k, m) if k.vc == VcId(3) => chunks.push(m),
            ClientEvent::Node(Event::Vc(k, VcEvent::Opened)) if k.vc == VcId(2) && !replied => {
                for j in 0..100u32 {
                    b.send(k, j.to_be_bytes().to_vec()).await.unwrap();
                }
                replied = true;
            }
            _ => {}
        }
    }
    assert_eq!(reliable, (0..UPDATES).collect::<Vec<_>>(), "reliable messages lost or out of order");
    assert!(updates >= UPDATES * 9 / 10, "only {updates} of {UPDATES} realtime updates on loopback");
    let mut got: Vec<u8> = chunks.iter().map(|c| c[0]).collect();
    got.sort_unstable();
    assert_eq!(got, (0..CHUNKS).collect::<Vec<_>>());
    for c in &chunks {
        assert_eq!(**c, chunk(c[0])[..], "bulk chunk {} corrupted", c[0]);
    }

    // A: B's replies, all and in order.
    let mut replies = Vec::new();
    while replies.len() < 100 {
        let ev = tokio::time::timeout_at(deadline, a.next()).await.expect("A timed out").expect("A stopped");
        if let ClientEvent::Message(k, m) = ev
            && k.vc == VcId(2)
        {
            replies.push(u32::from_be_bytes(m[..4].try_into().unwrap()));
        }
    }
    assert_eq!(replies, (0..100).collect::<Vec<_>>());
    let stats = a.stats(rel).await.unwrap().unwrap();
    assert!(stats.rtt.is_some(), "the reliable VC measured no RTT");
    assert_eq!(stats.counters.auth_failures, 0);
    assert_eq!(stats.path.map(|p| p.path), Some(via));
}

/// Reads `c`'s events until it has `n` messages on VC `vc`, and returns them as numbers.
async fn numbers(c: &mut Client, vc: VcId, n: usize, deadline: tokio::time::Instant) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        let ev = tokio::time::timeout_at(deadline, c.next()).await.expect("timed out").expect("client stopped");
        if let ClientEvent::Message(k, m) = ev
            && k.vc == vc
        {
            got.push(u32::from_be_bytes(m[..4].try_into().unwrap()));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_to_a_new_socket_mid_stream_loses_nothing_direct_or_relayed() {
    let control = Identity::from_seed([101; 32]);
    let dir = std::env::temp_dir().join(format!("shoal-loopback-move-{}", std::process::id()));
    let relay = start_relay(&dir, &control, 43, "");
    let via = Path::Relayed(Route::new(&[relay.id]).unwrap());
    let (mut a, ida) = client(&control, 11, relay.addr).await;
    let (mut b, idb) = client(&control, 12, relay.addr).await;
    let (mut c, idc) = client(&control, 13, relay.addr).await;
    // A and B may go direct; A and C only ever talk through the relay.
    a.add_peer(PeerInfo { key: idb.public_key(), paths: vec![via, Path::Direct(b.local_addr())] }).unwrap();
    b.add_peer(PeerInfo { key: ida.public_key(), paths: vec![via, Path::Direct(a.local_addr())] }).unwrap();
    a.add_peer(PeerInfo { key: idc.public_key(), paths: vec![via] }).unwrap();
    c.add_peer(PeerInfo { key: ida.public_key(), paths: vec![via] }).unwrap();
    let ab = a.open(b.id(), VcId(2), Profile::reliable()).await.unwrap();
    let ac = a.open(c.id(), VcId(2), Profile::reliable()).await.unwrap();
    // A's handshake may reach C first and open the VC there: then it is C's already.
    let ca = match c.open(a.id(), VcId(2), Profile::reliable()).await {
        Ok(k) => k,
        Err(ClientError::Node(NodeError::Exists(k))) => k,
        Err(e) => panic!("C could not open its VC to A: {e}"),
    };

    // Wait for A to B to go direct.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.stats(ab).await.unwrap().and_then(|s| s.path).map(|p| p.path) != Some(Path::Direct(b.local_addr())) {
        assert!(tokio::time::Instant::now() < deadline, "A to B never went direct");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    const N: u32 = 300;
    let old = a.local_addr();
    let mut new = None;
    for i in 0..N {
        a.send(ab, i.to_be_bytes().to_vec()).await.unwrap();
        a.send(ac, i.to_be_bytes().to_vec()).await.unwrap();
        c.send(ca, i.to_be_bytes().to_vec()).await.unwrap();
        if i == N / 3 {
            new = Some(a.rebind("127.0.0.1:0".parse().unwrap()).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let new = new.unwrap();
    assert_ne!(new, old);
    assert_eq!(a.local_addr(), new);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let want: Vec<u32> = (0..N).collect();
    assert_eq!(numbers(&mut b, VcId(2), N as usize, deadline).await, want, "direct stream A to B");
    assert_eq!(numbers(&mut c, VcId(2), N as usize, deadline).await, want, "relayed stream A to C");
    assert_eq!(numbers(&mut a, VcId(2), N as usize, deadline).await, want, "relayed stream C to A");

    // The relay saw A at its new socket, and B talks to it there, directly.
    let status = a.status().await.unwrap();
    assert_eq!(status.observed, Some(new));
    let ba = shoal_sdk::VcKey { peer: ida.node_id(), vc: VcId(2) };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let path = b.stats(ba).await.unwrap().and_then(|s| s.path).map(|p| p.path);
        if path == Some(Path::Direct(new)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "B's VC is on {path:?}, not A's new address {new}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (who, s) in [("A", a.stats(ab).await), ("B", b.stats(ba).await)] {
        assert_eq!(s.unwrap().unwrap().counters.auth_failures, 0, "{who}");
    }
}
