//! The control server on real QUIC on loopback: players sign in, are introduced when their
//! reports put them near each other and dismissed when they part; every rejection path
//! answers with its refusal; garbage and oversized frames are refused; and after a restart on
//! the same database and certificate, clients resume with their session tickets and their
//! characters are intact. A client pinning another certificate is told both fingerprints. A client writing as fast as it can is slowed to its rate limit
//! while others sign in, and loses nothing; a client that stops reading is closed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_control::auth::{HashCost, StoreAccounts};
use shoal_control::core::CoreConfig;
use shoal_control::limit::RateLimit;
use shoal_control::server::{self, ServerConfig, ServerHandle};
use shoal_control::store::Store;
use shoal_control::tls::ServerIdentity;
use shoal_link::{ControlLink, LinkError, Trust};
use shoal_protocol::codec::encode;
use shoal_protocol::control::{
    ClientToControl, ControlToClient, KeyProof, MAX_CONTROL_FRAME, Refusal, RelayInfo, Report,
};
use shoal_protocol::identity::to_hex;
use shoal_protocol::profile::ProfileConfig;
use shoal_protocol::{Identity, NodeId};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

struct Client {
    link: ControlLink,
    id: Identity,
    fingerprint: [u8; 32],
}

impl Client {
    async fn connect(addr: SocketAddr, fingerprint: [u8; 32], seed: u8) -> Client {
        let link = ControlLink::connect(addr, &Trust::Pinned(fingerprint)).await.unwrap();
        Client { link, id: Identity::from_seed([seed; 32]), fingerprint }
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.link.send.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, m: &ClientToControl) {
        self.link.send(m).await.unwrap();
    }

    async fn next(&mut self) -> Option<ControlToClient> {
        timeout(WAIT, self.link.recv()).await.ok()?.ok()
    }

    /// The next message matching `f`, skipping others (permits, observed addresses).
    async fn expect<T>(&mut self, f: impl Fn(&ControlToClient) -> Option<T>) -> T {
        loop {
            let m = self.next().await.expect("no message from the control server");
            if let Some(t) = f(&m) {
                return t;
            }
        }
    }

    fn proof(&self, account: &str) -> KeyProof {
        KeyProof::new(&self.id, account, unix_ms(), &self.fingerprint)
    }

    async fn sign_in(&mut self, account: &str, password: &str) -> ControlToClient {
        let proof = self.proof(account);
        self.send(&ClientToControl::SignIn { account: account.into(), password: password.into(), proof }).await;
        self.next().await.unwrap()
    }

    async fn report(&mut self, seq: u64, pos: [f32; 3], character: &[u8]) {
        let r = Report {
            seq,
            unix_ms: unix_ms(),
            status: "playing".into(),
            app: vec![],
            build_hash: [0; 32],
            position: pos,
            character: character.to_vec(),
            game: vec![],
            links: vec![],
            lost: vec![],
            observed: vec![],
        };
        self.send(&ClientToControl::Report(Box::new(r))).await;
    }
}

/// A plain HTTP/1.1 GET; returns the status and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    timeout(WAIT, s.read_to_string(&mut raw)).await.unwrap().unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

struct Setup {
    dir: std::path::PathBuf,
    store: Store,
}

impl Setup {
    async fn new(name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("shoal-service-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
        Setup { dir, store }
    }

    async fn start(&self) -> (ServerHandle, [u8; 32]) {
        self.start_limited(RateLimit::default()).await
    }

    async fn start_limited(&self, rate_limit: RateLimit) -> (ServerHandle, [u8; 32]) {
        let tls = ServerIdentity::load_or_create(&self.dir).unwrap();
        let fp = tls.fingerprint();
        let accounts = StoreAccounts::new(self.store.clone(), HashCost { memory_kib: 256, iterations: 1 }).unwrap();
        accounts.create("ana", "ana-pw", 1).await.unwrap();
        accounts.create("bob", "bob-pw", 1).await.unwrap();
        let core = CoreConfig {
            relays: vec![RelayInfo { id: NodeId([1; 8]), addr: "127.0.0.1:7000".parse().unwrap(), rtt_us: 0 }],
            profiles: vec![(1, ProfileConfig::Voice)],
            ..CoreConfig::default()
        };
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            identity: Identity::from_seed([77; 32]),
            tls,
            core,
            retention: Duration::from_secs(3600),
            rate_limit,
        };
        (server::start(cfg, self.store.clone(), Arc::new(accounts)).unwrap(), fp)
    }
}

#[tokio::test]
async fn neighbours_are_introduced_and_dismissed_over_quic() {
    let setup = Setup::new("intro").await;
    let (server, fp) = setup.start().await;
    let mut a = Client::connect(server.addr, fp, 1).await;
    let mut b = Client::connect(server.addr, fp, 2).await;
    assert!(matches!(a.sign_in("ana", "ana-pw").await, ControlToClient::Welcome { .. }));
    assert!(matches!(b.sign_in("bob", "bob-pw").await, ControlToClient::Welcome { .. }));
    a.send(&ClientToControl::CheckIn {
        local: vec!["10.0.0.1:4000".parse().unwrap()],
        mesh_port: 4000,
        reflexive: None,
    })
    .await;
    let observed = a.expect(|m| if let ControlToClient::Observed(o) = m { Some(*o) } else { None }).await;
    assert_eq!(observed, "127.0.0.1:4000".parse().unwrap());
    a.report(1, [0.0, 0.0, 0.0], b"ana").await;
    b.report(1, [5.0, 0.0, 0.0], b"bob").await;
    let to_a = a.expect(|m| if let ControlToClient::Introduce(i) = m { Some(i.clone()) } else { None }).await;
    let to_b = b.expect(|m| if let ControlToClient::Introduce(i) = m { Some(i.clone()) } else { None }).await;
    assert_eq!(to_a.peer_key, b.id.public_key());
    assert_eq!(to_b.peer_key, a.id.public_key());
    assert_eq!(to_b.observed, Some(observed));
    assert_eq!(to_b.local, vec!["10.0.0.1:4000".parse::<SocketAddr>().unwrap()]);
    assert_eq!(to_a.relays[0].id, NodeId([1; 8]));
    assert_eq!(to_a.profiles, vec![(1, ProfileConfig::Voice.to_wire())]);
    // Bob walks away at 16 units/s (the limit is 20) until past the 60-unit leave radius.
    for i in 1..=16u64 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        b.report(1 + i, [5.0 + 4.0 * i as f32, 0.0, 0.0], b"bob").await;
    }
    let gone = a.expect(|m| if let ControlToClient::Farewell(n) = m { Some(*n) } else { None }).await;
    assert_eq!(gone, b.id.node_id());
    let gone = b.expect(|m| if let ControlToClient::Farewell(n) = m { Some(*n) } else { None }).await;
    assert_eq!(gone, a.id.node_id());
    let k = server.counters();
    assert_eq!((k.signed_in, k.introductions, k.farewells, k.implausible), (2, 2, 2, 0));
    // The HTTP side: health, metrics and the live state.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    let (stop_http, stop_rx) = tokio::sync::watch::channel(false);
    let http = tokio::spawn(shoal_control::http::serve(listener, server.client(), stop_rx));
    assert_eq!(http_get(http_addr, "/healthz").await, (200, "ok\n".to_string()));
    let (status, metrics) = http_get(http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("shoal_control_players 2\n"), "{metrics}");
    assert!(metrics.contains("shoal_control_introductions_total 2\n"), "{metrics}");
    for line in [
        "# HELP shoal_control_players Signed-in players.",
        "# TYPE shoal_control_players gauge",
        "# TYPE shoal_control_throttled_total counter",
        "# TYPE shoal_control_overflowed_total counter",
        "# TYPE shoal_control_refusals_total counter",
        "shoal_control_refusals_total{reason=\"bad_credentials\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in {metrics}");
    }
    let (status, body) = http_get(http_addr, "/api/state").await;
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    let players = state["players"].as_array().unwrap();
    let mut accounts: Vec<&str> = players.iter().map(|p| p["account"].as_str().unwrap()).collect();
    accounts.sort_unstable();
    assert_eq!(accounts, ["ana", "bob"]);
    let bob = players.iter().find(|p| p["account"] == "bob").unwrap();
    assert_eq!(bob["position"][0].as_f64().unwrap(), 69.0);
    assert_eq!(state["relays"][0]["addr"], "127.0.0.1:7000");
    let _ = stop_http.send(true);
    let _ = http.await;
    a.link.close("");
    b.link.close("");
    server.shutdown().await;
    setup.store.close().await;
}

#[tokio::test]
async fn every_rejection_gets_its_refusal() {
    let setup = Setup::new("reject").await;
    let (server, fp) = setup.start().await;
    let mut c = Client::connect(server.addr, fp, 3).await;
    // Before signing in.
    c.send(&ClientToControl::Keepalive).await;
    assert_eq!(c.next().await, Some(ControlToClient::Refused(Refusal::NotSignedIn)));
    // Wrong password, unknown account, a proof for another account.
    assert_eq!(c.sign_in("ana", "nope").await, ControlToClient::Refused(Refusal::BadCredentials));
    assert_eq!(c.sign_in("zed", "ana-pw").await, ControlToClient::Refused(Refusal::BadCredentials));
    let proof = c.proof("bob");
    c.send(&ClientToControl::SignIn { account: "ana".into(), password: "ana-pw".into(), proof }).await;
    assert_eq!(c.next().await, Some(ControlToClient::Refused(Refusal::BadProof)));
    // A resume with a forged ticket.
    let proof = c.proof("");
    c.send(&ClientToControl::Resume { session: vec![0; 124], proof }).await;
    assert_eq!(c.next().await, Some(ControlToClient::Refused(Refusal::BadTicket)));
    // Random bytes and a truncated message, framed: refused, and the connection stays usable.
    c.raw(&[0, 0, 0, 5, 1, 0xff, 0xfe, 0xfd, 0xfc]).await;
    assert_eq!(c.next().await, Some(ControlToClient::Refused(Refusal::Malformed)));
    let good = encode(&ClientToControl::Keepalive).unwrap();
    c.raw(&[0, 0, 0, 1, good[0]]).await;
    assert_eq!(c.next().await, Some(ControlToClient::Refused(Refusal::Malformed)));
    // An oversized frame is refused before it is read, and the connection ends.
    c.raw(&(MAX_CONTROL_FRAME as u32 + 1).to_be_bytes()).await;
    assert_eq!(c.next().await, Some(ControlToClient::Refused(Refusal::Malformed)));
    assert_eq!(c.next().await, None, "the stream ends after an oversized frame");
    let k = server.counters();
    assert_eq!((k.not_signed_in, k.bad_credentials, k.bad_proofs, k.bad_tickets, k.malformed), (1, 2, 1, 1, 3));
    server.shutdown().await;
    setup.store.close().await;
}

#[tokio::test]
async fn a_wrong_pin_says_which_fingerprints_differ() {
    let setup = Setup::new("pin").await;
    let (server, fp) = setup.start().await;
    let pinned = [0x9f; 32];
    let err = ControlLink::connect(server.addr, &Trust::Pinned(pinned)).await.unwrap_err();
    assert!(
        matches!(err, LinkError::FingerprintMismatch { presented, pinned: p } if presented == fp && p == pinned),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "the server's certificate fingerprint sha256:{} does not match the pinned sha256:{}",
            to_hex(&fp),
            "9f".repeat(32)
        )
    );
    // The fingerprint as `shoal-control-server fingerprint` prints it pins the same server.
    let printed: Trust = to_hex(&fp).parse().unwrap();
    let mut link = ControlLink::connect(server.addr, &printed).await.unwrap();
    link.send(&ClientToControl::Keepalive).await.unwrap();
    let answer = timeout(WAIT, link.recv::<ControlToClient>()).await.unwrap().unwrap();
    assert_eq!(answer, ControlToClient::Refused(Refusal::NotSignedIn));
    server.shutdown().await;
    setup.store.close().await;
}

#[tokio::test]
async fn after_a_restart_clients_resume_and_characters_are_intact() {
    let setup = Setup::new("restart").await;
    let (server, fp) = setup.start().await;
    let mut a = Client::connect(server.addr, fp, 4).await;
    let ControlToClient::Welcome { session, .. } = a.sign_in("ana", "ana-pw").await else { panic!() };
    a.report(1, [3.0, 0.0, 4.0], b"hp=10;gold=7").await;
    // Let a tick persist it, then stop the server.
    tokio::time::sleep(server::TICK * 3).await;
    server.shutdown().await;
    let (server, fp2) = setup.start().await;
    assert_eq!(fp, fp2, "the certificate is kept across restarts");
    let mut again = Client::connect(server.addr, fp2, 4).await;
    let proof = again.proof("");
    again.send(&ClientToControl::Resume { session, proof }).await;
    assert!(matches!(again.next().await, Some(ControlToClient::Welcome { .. })));
    let c = setup.store.load_character("ana").await.unwrap().expect("character saved");
    assert_eq!(c.state, b"hp=10;gold=7");
    assert_eq!(c.position, [3.0, 0.0, 4.0]);
    server.shutdown().await;
    setup.store.close().await;
}

#[tokio::test]
async fn a_flooding_client_is_slowed_to_its_limit_and_others_still_sign_in() {
    let setup = Setup::new("flood").await;
    let limit = RateLimit { per_s: 100.0, burst: 20.0 };
    let (server, fp) = setup.start_limited(limit).await;
    let mut flooder = Client::connect(server.addr, fp, 1).await;
    assert!(matches!(flooder.sign_in("ana", "ana-pw").await, ControlToClient::Welcome { .. }));
    let start = Instant::now();
    let before = server.counters().reports;
    // 400 reports back to back, standing still: four seconds' worth at the limit.
    const FLOOD: u64 = 400;
    let writer = tokio::spawn(async move {
        for seq in 0..FLOOD {
            flooder.report(seq, [0.0; 3], b"").await;
        }
        flooder
    });
    // Meanwhile another player signs in and is answered, without waiting for the flood.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut other = Client::connect(server.addr, fp, 2).await;
    assert!(matches!(other.sign_in("bob", "bob-pw").await, ControlToClient::Welcome { .. }));
    let taken = server.counters().reports - before;
    let allowed = limit.burst + limit.per_s * start.elapsed().as_secs_f64() + 10.0;
    assert!((taken as f64) < allowed, "{taken} reports taken, the limit allows {allowed:.0}");
    assert!(taken < FLOOD, "the flood was not slowed: all {taken} taken before the second sign-in");
    // Slowed, not dropped: every report is taken in the end, and the waits were counted.
    let _flooder = writer.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.counters().reports - before < FLOOD && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.counters().reports - before, FLOOD);
    assert!(server.client().stats().throttled >= FLOOD - limit.burst as u64 - 10, "{:?}", server.client().stats());
    let metrics = shoal_control::http::render_prometheus(&server.client().stats()).unwrap();
    assert!(metrics.contains("shoal_control_throttled_total"), "{metrics}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_counted() {
    let setup = Setup::new("deaf").await;
    // Loose enough that only the unread replies matter here.
    let (server, fp) = setup.start_limited(RateLimit { per_s: 100_000.0, burst: 100_000.0 }).await;
    // A client whose stream window holds only a few replies, so that the server's writes to
    // it block once it stops reading.
    let mut config = shoal_link::client_config(&Trust::Pinned(fp)).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(1024u32.into());
    transport.receive_window(4096u32.into());
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connection = endpoint.connect(server.addr, shoal_link::SERVER_NAME).unwrap().await.expect("connecting");
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let mut recv = shoal_link::FrameReader::new(recv);
    let id = Identity::from_seed([3; 32]);
    let proof = KeyProof::new(&id, "ana", unix_ms(), &fp);
    let sign_in = ClientToControl::SignIn { account: "ana".into(), password: "ana-pw".into(), proof };
    shoal_link::write_message(&mut send, &sign_in).await.unwrap();
    let welcome: ControlToClient = timeout(WAIT, recv.read_message()).await.unwrap().unwrap();
    assert!(matches!(welcome, ControlToClient::Welcome { .. }));
    // Every check-in is answered with the observed address; none of the answers is read.
    let check_in = ClientToControl::CheckIn { local: vec![], mesh_port: 4000, reflexive: None };
    let flood = async {
        for _ in 0..5_000 {
            if shoal_link::write_message(&mut send, &check_in).await.is_err() {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_secs(20), flood).await;
    let closed = timeout(WAIT, connection.closed()).await;
    assert!(closed.is_ok(), "the server kept a client that does not read");
    assert_eq!(server.counters().overflowed, 1);
    // The server serves others as before.
    let mut other = Client::connect(server.addr, fp, 4).await;
    assert!(matches!(other.sign_in("bob", "bob-pw").await, ControlToClient::Welcome { .. }));
    server.shutdown().await;
}
