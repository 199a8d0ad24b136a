//! The `shoal-mesh-node` binary on real UDP sockets on loopback: two relays started from
//! config files, endpoint A → R1 → R2 → endpoint B and back, an unbound sender dropped and
//! counted at the first relay, a clean shutdown on SIGTERM, and a clear refusal of a bad
//! config.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_mesh::driver::endpoint::MeshEndpoint;
use shoal_mesh::endpoint::{Envelope, Path as MeshPath};
use shoal_mesh::wire::{self, Header, Kind, Route, SubscribeStatus, VcId};
use shoal_protocol::identity::to_hex;
use shoal_protocol::{
    Identity, NodeId, Roles, SignedTicket, StreamId, SubscriptionBody, TicketBody, TicketKind, UnixTime,
};

const BIN: &str = env!("CARGO_BIN_EXE_shoal-mesh-node");

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn permit(control: &Identity, node: &Identity, roles: Roles) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), roles, UnixTime(unix_now()), 600).sign(control)
}

/// A relay process; killed on drop if the test did not stop it.
struct RelayProc {
    child: Child,
    node: NodeId,
    mesh: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_relay(dir: &Path, name: &str, control: &Identity, seed: u8, peers: &[SocketAddr]) -> RelayProc {
    let identity = Identity::from_seed([seed; 32]);
    std::fs::write(dir.join(format!("{name}.key")), to_hex(identity.seed())).unwrap();
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    let config = format!(
        "listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nworkers = 2\nkey_file = \"{name}.key\"\n\
         control_public_key = \"{}\"\npermit = \"{}\"\npeers = [{}]\n",
        control.public_key(),
        to_hex(&permit(control, &identity, Roles::RELAY).encode()),
        peers.join(", ")
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().to_string();
    assert!(line.starts_with("shoal-mesh-node ready"), "{line}");
    RelayProc {
        child,
        node: field("node=").parse().unwrap(),
        mesh: field("mesh=").parse().unwrap(),
        metrics: field("metrics=").parse().unwrap(),
    }
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn two_relays_forward_both_ways_and_refuse_an_unbound_sender() {
    let dir = temp_dir("relays");
    let control = Identity::from_seed([100; 32]);
    let r2 = start_relay(&dir, "r2", &control, 12, &[]);
    let r1 = start_relay(&dir, "r1", &control, 11, &[r2.mesh]);

    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let pa = permit(&control, &a, Roles::CLIENT);
    let pb = permit(&control, &b, Roles::CLIENT);
    let mut ea = MeshEndpoint::bind("127.0.0.1:0".parse().unwrap(), a.clone(), pa).await.unwrap();
    let mut eb = MeshEndpoint::bind("127.0.0.1:0".parse().unwrap(), b.clone(), pb).await.unwrap();
    assert_eq!(ea.attach_relay(r1.mesh, Duration::from_secs(5)).await.unwrap(), r1.node);
    assert_eq!(eb.attach_relay(r2.mesh, Duration::from_secs(5)).await.unwrap(), r2.node);

    // The relays bind to each other in the background; retry until the route carries.
    let route = Route::new(&[r1.node, r2.node]).unwrap();
    let mut delivered = None;
    for attempt in 0..50u32 {
        ea.send(
            &Envelope { destination: b.node_id(), path: MeshPath::Relayed(route), vc: VcId(3), trace: true },
            &attempt.to_be_bytes(),
        )
        .await
        .unwrap();
        if let Ok(rx) = eb.recv(Duration::from_millis(100)).await {
            delivered = Some(rx);
            break;
        }
    }
    let rx = delivered.expect("A → R1 → R2 → B never delivered");
    assert_eq!((rx.source, rx.vc, rx.route), (a.node_id(), VcId(3), route));
    let trace = rx.trace.unwrap();
    assert_eq!(trace.slots().len(), 2);
    assert_eq!(trace.slots()[0].tag, wire::relay_tag(r1.node));
    assert_eq!(trace.slots()[1].tag, wire::relay_tag(r2.node));
    let hops = trace.hop_latencies();
    assert_eq!(hops.len(), 3);
    // One host, one clock: every hop is real, and none takes anything like a second.
    assert!(hops.iter().all(|h| *h < Duration::from_millis(500)), "{hops:?}");
    assert!(hops.iter().sum::<Duration>() > Duration::ZERO, "{hops:?}");

    // And back: B → R2 → R1 → A.
    eb.send(
        &Envelope { destination: a.node_id(), path: MeshPath::Relayed(route.reversed()), vc: VcId(3), trace: true },
        b"pong",
    )
    .await
    .unwrap();
    let back = ea.recv(Duration::from_secs(2)).await.unwrap();
    assert_eq!(back.payload, b"pong");
    assert_eq!(back.trace.unwrap().slots()[0].tag, wire::relay_tag(r2.node));

    // A probe sees the round trip and splits it by hop (B answers while it is driven).
    let path = MeshPath::Relayed(route);
    let (report, _) = tokio::join!(ea.probe(b.node_id(), &path), eb.next_event(Duration::from_secs(1)));
    let report = report.unwrap();
    assert_eq!(report.hop_rtts.len(), 3);
    assert!(report.hop_rtts.iter().sum::<Duration>() <= report.rtt);

    // An intruder with no binding, claiming to be A, from its own socket.
    let intruder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 200];
    let h = Header { kind: Kind::Data, source: a.node_id(), destination: b.node_id(), vc: VcId(3), trace: false };
    let n = wire::emit(&mut buf, &h, &route, 0, b"forged").unwrap();
    for _ in 0..5 {
        intruder.send_to(&buf[..n], r1.mesh).unwrap();
    }
    // Plus garbage, which must be counted, not crash the relay.
    intruder.send_to(&[1, 99, 0, 0], r1.mesh).unwrap();
    assert!(eb.recv(Duration::from_millis(300)).await.is_err(), "the forged datagram was forwarded");
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = scrape(r1.metrics);
        if metric(&text, "shoal_relay_dropped_total{reason=\"not_bound\"}") >= 5 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&text, "shoal_relay_dropped_total{reason=\"not_bound\"}"), 5);
    assert_eq!(metric(&text, "shoal_relay_dropped_total{reason=\"malformed_truncated\"}"), 1);
    assert!(metric(&text, "shoal_relay_forwarded_packets_total") >= 2);
    assert!(metric(&text, "shoal_relay_hop_latency_seconds_count") >= 2);
    // Prometheus' text format, every family with its HELP and TYPE.
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4")
            || text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    for line in [
        "# HELP shoal_relay_dropped_total Datagrams dropped, by reason.",
        "# TYPE shoal_relay_dropped_total counter",
        "# TYPE shoal_relay_forwarded_packets_total counter",
        "# TYPE shoal_relay_bindings gauge",
        "# TYPE shoal_relay_hop_latency_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in {text}");
    }
    assert!(metric(&text, "shoal_relay_bindings") >= 1);

    // SIGTERM: both relays stop by themselves with status 0.
    for mut r in [r1, r2] {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = r.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "relay did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One publisher, 50 subscribers and a forger, all bound to one relay process with two
/// workers: every subscriber gets every published datagram (whichever worker admitted it),
/// the forged subscription is refused with its reason, and the forger gets no copy.
#[tokio::test]
async fn a_relay_process_fans_a_publisher_out_to_50_subscribers_and_refuses_a_forgery() {
    let dir = temp_dir("fanout");
    let control = Identity::from_seed([100; 32]);
    let relay = start_relay(&dir, "fan", &control, 13, &[]);
    let bind = |seed: u8| {
        let id = Identity::from_seed([seed; 32]);
        let p = permit(&control, &id, Roles::CLIENT);
        async move {
            let mut e = MeshEndpoint::bind("127.0.0.1:0".parse().unwrap(), id, p).await.unwrap();
            e.attach_relay(relay.mesh, Duration::from_secs(5)).await.unwrap();
            e
        }
    };
    let mut publisher = bind(1).await;
    let subscription = |subscriber: NodeId, signer: &Identity| {
        SubscriptionBody {
            subscriber,
            publisher: publisher.node_id(),
            stream: StreamId(1),
            relay: relay.node,
            issued_at: UnixTime(unix_now()),
            expires_at: UnixTime(unix_now() + 60),
        }
        .sign(signer)
    };
    let mut subscribers = Vec::new();
    for seed in 10..60 {
        let mut e = bind(seed).await;
        let ack = e.subscribe(&subscription(e.node_id(), &control), false, Duration::from_secs(5)).await.unwrap();
        assert_eq!(ack.status, SubscribeStatus::Member);
        subscribers.push(e);
    }
    let mut forger = bind(99).await;
    let forged = subscription(forger.node_id(), &Identity::from_seed([66; 32]));
    let ack = forger.subscribe(&forged, false, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ack.status, SubscribeStatus::Forged);
    // Each worker learns the memberships the other admitted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&scrape(relay.metrics), "shoal_relay_group_members") < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..10u8 {
        publisher.publish(relay.node, 1, &[i; 40]).await.unwrap();
    }
    for (k, s) in subscribers.iter_mut().enumerate() {
        let mut got: Vec<u8> = Vec::new();
        for _ in 0..10 {
            let rx = s.recv_published(Duration::from_secs(2)).await.unwrap_or_else(|e| panic!("subscriber {k}: {e}"));
            assert_eq!((rx.source, rx.vc, rx.payload.len()), (publisher.node_id(), VcId(1), 40));
            got.push(rx.payload[0]);
        }
        got.sort_unstable();
        assert_eq!(got, (0..10).collect::<Vec<u8>>(), "subscriber {k}");
    }
    assert!(forger.recv_published(Duration::from_millis(200)).await.is_err(), "the forger got a copy");
    let text = scrape(relay.metrics);
    assert!(metric(&text, "shoal_relay_copies_total") >= 500, "{text}");
    assert!(metric(&text, "shoal_relay_published_total") >= 10);
    assert_eq!(metric(&text, "shoal_relay_subscribes_total{status=\"forged\"}"), 1);
    assert_eq!(metric(&text, "shoal_relay_subscribes_total{status=\"member\"}"), 50);
    assert_eq!(metric(&text, "shoal_relay_groups"), 1);
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_is_refused_with_a_clear_error() {
    let dir = temp_dir("badcfg");
    let control = Identity::from_seed([100; 32]);
    let relay = Identity::from_seed([5; 32]);
    std::fs::write(dir.join("r.key"), to_hex(relay.seed())).unwrap();
    let good_permit = to_hex(&permit(&control, &relay, Roles::RELAY).encode());
    let client_permit = to_hex(&permit(&control, &relay, Roles::CLIENT).encode());
    let cases = [
        ("listen = \"nowhere\"\n", "listen"),
        (
            &*format!(
                "listen = \"127.0.0.1:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"abc\"\npermit = \"{good_permit}\"\n"
            ),
            "control_public_key",
        ),
        (
            &*format!(
                "listen = \"127.0.0.1:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{}\"\npermit = \"{client_permit}\"\n",
                control.public_key()
            ),
            "permit",
        ),
        (
            &*format!(
                "listen = \"127.0.0.1:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{}\"\npermit = \"{good_permit}\"\nworkers = 0\n",
                control.public_key()
            ),
            "workers",
        ),
        (
            &*format!(
                "listen = \"127.0.0.1:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{}\"\n",
                control.public_key()
            ),
            "required unless [control]",
        ),
        (
            &*format!(
                "listen = \"0.0.0.0:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{}\"\n[control]\naddr = \"127.0.0.1:1\"\ntrust = \"sha256:{}\"\n",
                control.public_key(),
                "ab".repeat(32)
            ),
            "control.public_addr",
        ),
        (
            &*format!(
                "listen = \"127.0.0.1:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{}\"\n[control]\naddr = \"127.0.0.1:1\"\ntrust = \"sha256:12\"\n",
                control.public_key()
            ),
            "control.trust",
        ),
        (
            &*format!(
                "listen = \"127.0.0.1:0\"\nkey_file = \"r.key\"\ncontrol_public_key = \"{}\"\npermit = \"{good_permit}\"\n\
                 [control]\naddr = \"127.0.0.1:1\"\ntrust = \"sha256:{}\"\n",
                control.public_key(),
                "ab".repeat(32)
            ),
            "`permit` and `[control]` cannot both be set",
        ),
    ];
    for (text, mentions) in cases {
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN).args(["run", "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(mentions), "error for {text:?} does not mention {mentions}: {err}");
    }
    let out = Command::new(BIN).args(["run", "--config", "/nonexistent/shoal.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let _ = std::fs::remove_dir_all(&dir);
}
