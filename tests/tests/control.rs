//! The SDK's session against a real control server on loopback: two players sign in over
//! QUIC, report positions near each other, are introduced, open VCs through a relay process and
//! talk; when one walks away both get a farewell and their VCs close. And a session whose
//! control server restarts reconnects by itself and resumes; one that signs out unbinds from
//! its relays.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_control::auth::{HashCost, StoreAccounts};
use shoal_control::core::CoreConfig;
use shoal_control::limit::RateLimit;
use shoal_control::server::{self, ServerConfig, ServerHandle};
use shoal_control::store::Store;
use shoal_control::tls::ServerIdentity;
use shoal_mesh::wire::VcId;
use shoal_protocol::Identity;
use shoal_protocol::control::{Refusal, RelayInfo};
use shoal_protocol::profile::ProfileConfig;
use shoal_sdk::{
    Event, LinkError, MAX_STATE_REPORT, PathKind, PlayerState, Session, SessionConfig, SessionError, SessionEvent,
    StateError, Trust, VcEvent, VcKey,
};
use shoal_tests::procs::{RelayProc, start_registered_relay, start_relay};
use tokio::time::{Instant, timeout_at};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-control-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts a control server on `listen` with its certificate and database in `dir`, knowing
/// `relays`, with accounts ana and bob. Its introductions ask for a realtime VC 1 and a
/// reliable VC 3 (not the SDK's defaults, VCs 1 and 2).
async fn control_server(
    dir: &std::path::Path,
    store: &Store,
    listen: SocketAddr,
    relays: Vec<RelayInfo>,
) -> ServerHandle {
    let accounts = StoreAccounts::new(store.clone(), HashCost { memory_kib: 256, iterations: 1 }).unwrap();
    accounts.create("ana", "ana-pw", 1).await.unwrap();
    accounts.create("bob", "bob-pw", 1).await.unwrap();
    let cfg = ServerConfig {
        listen,
        identity: Identity::from_seed([77; 32]),
        tls: ServerIdentity::load_or_create(dir).unwrap(),
        core: CoreConfig {
            relays,
            profiles: vec![
                (1, ProfileConfig::Realtime { redundancy: false }),
                (3, ProfileConfig::Reliable { max_latency_ms: None }),
            ],
            ..CoreConfig::default()
        },
        retention: Duration::from_secs(3600),
        rate_limit: RateLimit::default(),
    };
    server::start(cfg, store.clone(), Arc::new(accounts)).unwrap()
}

/// A relay process with identity seed `seed` and a control server that hands it to players,
/// in a fresh folder.
async fn relay_and_control_server(name: &str, seed: u8) -> (std::path::PathBuf, RelayProc, Store, ServerHandle) {
    let dir = temp_dir(name);
    let relay = start_relay(&dir, &Identity::from_seed([77; 32]), seed, "");
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
    let relays = vec![RelayInfo { id: relay.id, addr: relay.addr, rtt_us: 0 }];
    let server = control_server(&dir, &store, "127.0.0.1:0".parse().unwrap(), relays).await;
    (dir, relay, store, server)
}

fn session_config(server: SocketAddr, dir: &std::path::Path, account: &str, seed: u8) -> SessionConfig {
    let fp = ServerIdentity::load_or_create(dir).unwrap().fingerprint();
    let id = Identity::from_seed([seed; 32]);
    let mut cfg = SessionConfig::new(server, Trust::Pinned(fp), account, &format!("{account}-pw"), id);
    cfg.report_every = Duration::from_millis(200);
    cfg
}

fn at(x: f32, who: &str) -> PlayerState {
    PlayerState {
        position: [x, 0.0, 0.0],
        status: "playing".into(),
        character: who.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A relay's `/metrics`.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

/// The value of the sample `name` (with its labels, if any) in `text`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Reads `s`'s events until `f` picks one, for at most ten seconds.
async fn until<T>(s: &mut Session, what: &str, mut f: impl FnMut(SessionEvent) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = timeout_at(deadline, s.next()).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if let Some(t) = f(ev.unwrap_or_else(|| panic!("session stopped while waiting for {what}"))) {
            return t;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_are_introduced_talk_through_a_relay_then_directly_and_part_with_a_farewell() {
    let (dir, relay, store, server) = relay_and_control_server("intro", 42).await;

    let mut a = Session::start(session_config(server.addr, &dir, "ana", 1)).await.unwrap();
    let mut b = Session::start(session_config(server.addr, &dir, "bob", 2)).await.unwrap();
    a.set_state(at(0.0, "ana")).unwrap();
    b.set_state(at(5.0, "bob")).unwrap();

    // Introduced both ways, with the VCs the control server asks for opened.
    let (ab, ba) = (VcKey { peer: b.id(), vc: VcId(3) }, VcKey { peer: a.id(), vc: VcId(3) });
    let b_id = b.id();
    let vcs = until(&mut a, "a's introduction", |e| match e {
        SessionEvent::Introduced { peer, vcs } if peer == b_id => Some(vcs),
        _ => None,
    })
    .await;
    assert_eq!(vcs, vec![VcKey { peer: b.id(), vc: VcId(1) }, ab]);
    let a_id = a.id();
    until(&mut b, "b's introduction", |e| {
        matches!(e, SessionEvent::Introduced { peer, .. } if peer == a_id).then_some(())
    })
    .await;

    // The reliable VC starts on the relay, and moves to the direct path (loopback here, from
    // the introduction's candidates) once its probes are answered.
    let first_path = until(&mut a, "the reliable VC's first path", |e| match e {
        SessionEvent::Node(Event::Vc(k, VcEvent::PathChanged { new, .. })) if k == ab => Some(*new),
        _ => None,
    })
    .await;
    assert_eq!(first_path.kind, PathKind::OneRelay);
    assert_eq!(first_path.path.route().relays(), [relay.id]);
    a.send(ab, &b"hello bob"[..]).await.unwrap();
    let got = until(&mut b, "a's message", |e| match e {
        SessionEvent::Message(k, m) if k == ba => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(&got[..], b"hello bob");
    b.send(ba, &b"hello ana"[..]).await.unwrap();
    let got = until(&mut a, "b's answer", |e| match e {
        SessionEvent::Message(k, m) if k == ab => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(&got[..], b"hello ana");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = a.stats(ab).await.unwrap().unwrap();
        // Direct, with the relayed path still a candidate, pinged and answering, ready to take
        // over again.
        let relayed = stats.paths.iter().find(|p| p.kind == PathKind::OneRelay).expect("relayed path dropped");
        if stats.path.as_ref().is_some_and(|p| p.kind == PathKind::Direct) && relayed.stats.pongs > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never went direct with the relay kept warm: {:?}", stats.paths);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Their reports carry the link, which the control server shows in its live state.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = server.client().snapshot().await.unwrap();
        if snap.links.iter().any(|l| l.vc == 3 && l.path == "direct" && l.relays.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "links never reported: {:?}", snap.links);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bob walks away at 16 units/s (the limit is 20) until past the 60-unit leave radius.
    for i in 1..=16 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        b.set_state(at(5.0 + 4.0 * i as f32, "bob")).unwrap();
    }
    let closed = until(&mut a, "a's farewell", |e| match e {
        SessionEvent::Farewell { peer, closed } if peer == b_id => Some(closed),
        _ => None,
    })
    .await;
    let closed_b = until(&mut b, "b's farewell", |e| match e {
        SessionEvent::Farewell { peer, closed } if peer == a_id => Some(closed),
        _ => None,
    })
    .await;
    // The side whose farewell came first closed the VC, and told the other, which may have
    // heard that (directly, faster than the control server) before its own farewell.
    assert!(closed.contains(&ab) || closed_b.contains(&ba), "{closed:?} {closed_b:?}");
    // The VCs are gone on both sides: nothing more can be sent.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats(ab).await.unwrap().is_some() || b.stats(ba).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "VCs still open after the farewell");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.send(ab, &b"still there?"[..]).await.is_err());
    let k = server.counters();
    assert_eq!((k.introductions, k.farewells, k.implausible), (2, 2, 0));

    a.sign_out().await;
    b.sign_out().await;
    server.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reconnects_and_resumes_after_the_control_server_restarts() {
    let dir = temp_dir("restart");
    let url = format!("sqlite:{}", dir.join("control.db").display());
    let store = Store::open(&url).await.unwrap();
    let server = control_server(&dir, &store, "127.0.0.1:0".parse().unwrap(), Vec::new()).await;
    let addr = server.addr;
    let mut a = Session::start(session_config(addr, &dir, "ana", 1)).await.unwrap();
    a.set_state(at(3.0, "ana at 3")).unwrap();
    // Wait until the character is saved (it is what a resume finds the account by).
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.load_character("ana").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "character never saved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    server.shutdown().await;
    until(&mut a, "the loss of the control connection", |e| matches!(e, SessionEvent::ControlLost(_)).then_some(()))
        .await;
    let server = control_server(&dir, &store, addr, Vec::new()).await;
    until(&mut a, "the reconnect", |e| match e {
        SessionEvent::ControlRestored => Some(()),
        SessionEvent::Refused(r) => panic!("refused: {r:?}"),
        _ => None,
    })
    .await;
    // Resumed with the ticket, not signed in again: no password check on the new server.
    // (The counters are published after the server's turn, which may end after the welcome.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.counters().signed_in == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let k = server.counters();
    assert_eq!((k.signed_in, k.resumed, k.bad_tickets), (1, 1, 0));
    a.set_state(at(4.0, "ana at 4")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = server.client().snapshot().await.unwrap();
        if snap.players.iter().any(|p| p.account == "ana" && p.position == Some([4.0, 0.0, 0.0])) {
            break;
        }
        assert!(Instant::now() < deadline, "reports did not resume: {:?}", snap.players);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let saved = store.load_character("ana").await.unwrap().unwrap();
    assert!(saved.state == b"ana at 3" || saved.state == b"ana at 4", "{saved:?}");

    a.sign_out().await;
    server.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_too_large_for_a_report_is_refused_and_the_session_keeps_reporting() {
    let dir = temp_dir("oversized");
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
    let server = control_server(&dir, &store, "127.0.0.1:0".parse().unwrap(), Vec::new()).await;
    let a = Session::start(session_config(server.addr, &dir, "ana", 1)).await.unwrap();
    a.set_state(at(1.0, "ana")).unwrap();
    // Sent, this report would make the server close the connection, and the session would
    // reconnect and send it again for ever.
    let huge = PlayerState { character: vec![0; 70_000], ..at(2.0, "ana") };
    let err = a.set_state(huge).unwrap_err();
    let StateError::TooLarge { len, max } = err;
    assert_eq!(max, MAX_STATE_REPORT);
    assert!(len > 70_000, "{len}");
    assert!(err.to_string().contains(&format!("would take {len} bytes")), "{err}");
    // The reports go on with the state they had, on the first connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = server.client().snapshot().await.unwrap();
        let reported = snap.players.iter().any(|p| p.account == "ana" && p.position == Some([1.0, 0.0, 0.0]));
        if reported && server.counters().reports >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "reports stopped: {:?}", snap.players);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let k = server.counters();
    assert_eq!((k.signed_in, k.malformed), (1, 0));

    a.sign_out().await;
    server.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observed_address_is_told_once_per_address() {
    let (dir, _relay, store, server) = relay_and_control_server("observed", 43).await;
    let mut a = Session::start(session_config(server.addr, &dir, "ana", 1)).await.unwrap();
    let first = a.local_addr();
    // The session checks in when it starts, and again once the relay has seen its mesh socket
    // (here at the same address): the server answers both, and the game hears it once.
    let mut told = Vec::new();
    until(&mut a, "the relay's binding", |e| match e {
        SessionEvent::Observed(addr) => {
            told.push(addr);
            None
        }
        SessionEvent::Node(Event::RelayBound { .. }) => Some(()),
        _ => None,
    })
    .await;
    // A new socket: the relay sees a new address, and so does the control server. Its answer
    // comes after any answer to the earlier check-ins.
    let moved = a.rebind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    until(&mut a, "the new address", |e| match e {
        SessionEvent::Observed(addr) => {
            told.push(addr);
            (addr == moved).then_some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(told, vec![first, moved]);

    a.sign_out().await;
    server.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_sign_in_says_why() {
    let dir = temp_dir("refused");
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
    let server = control_server(&dir, &store, "127.0.0.1:0".parse().unwrap(), Vec::new()).await;
    let mut wrong_password = session_config(server.addr, &dir, "ana", 1);
    wrong_password.password = "not-ana-pw".into();
    let err = Session::start(wrong_password).await.unwrap_err();
    assert!(matches!(err, SessionError::Refused(Refusal::BadCredentials)), "{err}");
    assert_eq!(err.to_string(), "the control server refused: wrong account or password");

    let mut wrong_pin = session_config(server.addr, &dir, "ana", 1);
    wrong_pin.trust = Trust::Pinned([7; 32]);
    let err = Session::start(wrong_pin).await.unwrap_err();
    let fp = ServerIdentity::load_or_create(&dir).unwrap().fingerprint();
    assert!(
        matches!(err, SessionError::Link(LinkError::FingerprintMismatch { presented, pinned: [7, ..] }) if presented == fp),
        "{err}"
    );
    assert!(err.to_string().ends_with(&format!("does not match the pinned sha256:{}", "07".repeat(32))), "{err}");

    // Nobody listening: the start gives up after its timeout instead of hanging.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut unreachable = session_config(silent.local_addr().unwrap(), &dir, "ana", 1);
    unreachable.connect_timeout = Duration::from_millis(500);
    let err = Session::start(unreachable).await.unwrap_err();
    assert!(matches!(err, SessionError::Timeout), "{err}");
    assert_eq!(server.counters().bad_credentials, 1);

    server.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_register_measure_each_other_and_are_handed_to_players() {
    let dir = temp_dir("relays");
    let control = Identity::from_seed([77; 32]);
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
    // The operator lists the relays' keys; their addresses come with their registration.
    let (s1, s2) = (51, 52);
    let configured = [s1, s2].map(|s| RelayInfo {
        id: Identity::from_seed([s; 32]).node_id(),
        addr: "127.0.0.1:9".parse().unwrap(),
        rtt_us: 0,
    });
    let server = control_server(&dir, &store, "127.0.0.1:0".parse().unwrap(), configured.to_vec()).await;
    let fp = ServerIdentity::load_or_create(&dir).unwrap().fingerprint();
    // Neither relay has a permit in its config: the control server issues them.
    let r1 = start_registered_relay(&dir, &control, s1, server.addr, &fp);
    let r2 = start_registered_relay(&dir, &control, s2, server.addr, &fp);
    let _stranger = start_registered_relay(&dir, &control, 53, server.addr, &fp);

    let deadline = Instant::now() + Duration::from_secs(20);
    let hex = |id: shoal_protocol::NodeId| shoal_protocol::identity::to_hex(&id.0);
    loop {
        let snap = server.client().snapshot().await.unwrap();
        let measured = |me: &shoal_tests::procs::RelayProc, other: &shoal_tests::procs::RelayProc| {
            snap.relays.iter().any(|r| {
                r.node == hex(me.id)
                    && r.registered
                    && r.addr == me.addr
                    && r.peers.iter().any(|(p, ms)| *p == hex(other.id) && *ms > 0.0 && *ms < 1000.0)
            })
        };
        if measured(&r1, &r2) && measured(&r2, &r1) {
            break;
        }
        assert!(Instant::now() < deadline, "relays never registered and measured each other: {:?}", snap.relays);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Counters are published after the server's turn: poll.
    while server.counters().relays_refused == 0 {
        assert!(Instant::now() < deadline, "a relay the operator did not list is refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.counters().relays_registered >= 2);

    // A player is sent to the relays where they registered, and both accept its permit.
    let mut a = Session::start(session_config(server.addr, &dir, "ana", 1)).await.unwrap();
    let mut bound = std::collections::BTreeSet::new();
    while bound.len() < 2 {
        let addr = until(&mut a, "relay bindings", |e| match e {
            SessionEvent::Node(Event::RelayBound { addr, .. }) => Some(addr),
            _ => None,
        })
        .await;
        bound.insert(addr);
    }
    assert_eq!(bound, [r1.addr, r2.addr].into_iter().collect());

    // Signing out unbinds the player from both relays at once, not when they time it out.
    a.sign_out().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in [&r1, &r2] {
        let field = |k: &str| r.ready.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().to_string();
        let metrics: SocketAddr = field("metrics=").parse().unwrap();
        loop {
            let text = scrape(metrics).await;
            if metric(&text, "shoal_relay_unbinds_total") == 1 {
                // Only the other relay is left bound there.
                assert_eq!(metric(&text, "shoal_relay_bindings"), 1, "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "relay {} never saw the unbind: {text}", r.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    server.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
