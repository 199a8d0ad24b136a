//! A hosting server on real QUIC on loopback: it registers with a real control server, which
//! tells signed-in players where it is; their sessions connect by themselves with their
//! session tickets, see its NPCs and objects as entities, and act on them. A hello with a
//! forged ticket is refused with its reason and counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use glam::Vec3;
use shoal_control::auth::{HashCost, StoreAccounts};
use shoal_control::core::CoreConfig;
use shoal_control::limit::RateLimit;
use shoal_control::server::{self, ServerConfig};
use shoal_control::store::Store;
use shoal_control::tls::ServerIdentity;
use shoal_hosting::behaviour::BUILT_IN;
use shoal_hosting::content::Content;
use shoal_hosting::host::HostConfig;
use shoal_hosting::server::{self as hosting, ControlSettings};
use shoal_hosting::world::World;
use shoal_link::{ControlLink, Trust, WORLD_ALPN};
use shoal_protocol::control::KeyProof;
use shoal_protocol::world::{
    Action, ActionRefusal, ClientToHost, EntityId, HostRefusal, HostToClient, KindClass, WORLD_ACCOUNT, WorldEventInfo,
};
use shoal_protocol::{Identity, Roles, TicketBody, TicketKind, UnixTime};
use shoal_sdk::world::{ViewId, WorldEvent};
use shoal_sdk::{AvatarEvent, AvatarState, PlayerState, Session, SessionConfig, SessionEvent};
use tokio::time::{Instant, timeout_at};

const FIELD: &str = r#"
[[zone]]
name = "field"
min = [0.0, 0.0]
max = [300.0, 300.0]

[[npc_kind]]
name = "sheep"
behaviour = "wander"
speed = 1.0
health = 20
respawn_secs = 5

[[spawn]]
kind = "sheep"
zone = "field"
count = 12
around = [20.0, 20.0]
radius = 8.0

[[object_kind]]
name = "gate"
states = ["closed", "open"]

[[object]]
kind = "gate"
at = [12.0, 10.0]
"#;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-hosting-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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

fn standing(x: f32, z: f32) -> PlayerState {
    PlayerState { position: [x, 0.0, z], status: "playing".into(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_see_the_hosting_servers_world_and_act_on_it_and_a_forged_ticket_is_refused() {
    let dir = temp_dir("world");
    let control_key = Identity::from_seed([77; 32]);
    let host_key = Identity::from_seed([60; 32]);
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
    let accounts = StoreAccounts::new(store.clone(), HashCost { memory_kib: 256, iterations: 1 }).unwrap();
    accounts.create("ana", "ana-pw", 1).await.unwrap();
    accounts.create("bob", "bob-pw", 1).await.unwrap();
    let tls = ServerIdentity::load_or_create(&dir).unwrap();
    let fp = tls.fingerprint();
    // A relay, for the players' VCs (their avatars go over them).
    let relay = shoal_tests::procs::start_relay(&dir, &control_key, 30, "");
    let relays = vec![shoal_protocol::control::RelayInfo { id: relay.id, addr: relay.addr, rtt_us: 0 }];
    let control = server::start(
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            identity: control_key.clone(),
            tls,
            core: CoreConfig { hosting: vec![host_key.node_id()], relays, ..CoreConfig::default() },
            retention: Duration::from_secs(3600),
            rate_limit: RateLimit::default(),
        },
        store.clone(),
        Arc::new(accounts),
    )
    .unwrap();

    let world = World::new(Content::parse(FIELD, BUILT_IN).unwrap(), 5, &[]).unwrap();
    let host = hosting::start(
        hosting::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            identity: host_key,
            control_key: control_key.public_key(),
            host: HostConfig::default(),
            messages_per_sec: 50.0,
            message_burst: 100.0,
            control: Some(ControlSettings { addr: control.addr, trust: Trust::Pinned(fp), public_addr: None }),
        },
        world,
    )
    .unwrap();

    let mut sessions = Vec::new();
    for (account, seed) in [("ana", 1u8), ("bob", 2)] {
        let cfg = SessionConfig::new(
            control.addr,
            Trust::Pinned(fp),
            account,
            &format!("{account}-pw"),
            Identity::from_seed([seed; 32]),
        );
        let s = Session::start(cfg).await.unwrap();
        s.set_state(standing(10.0, 10.0)).unwrap();
        s.set_avatar(AvatarState { position: Vec3::new(10.0 + f32::from(seed), 0.0, 10.0), ..AvatarState::default() });
        sessions.push(s);
    }
    let gate = EntityId(12);
    let bob = sessions[1].id();
    // Bob's avatar joins ana's view in the same events as the world's entities.
    let mut ana_saw_bob = false;
    for s in &mut sessions {
        // The control server names the hosting server; the session connects by itself.
        let hosts = until(s, "the hosting list", |e| match e {
            SessionEvent::Hosting(h) if !h.is_empty() => Some(h),
            _ => None,
        })
        .await;
        assert_eq!(hosts[0].cert, host.cert);
        until(s, "the welcome", |e| matches!(e, SessionEvent::World(WorldEvent::Connected { .. })).then_some(())).await;
        // Every sheep and the gate spawn, with their kinds.
        let mut spawned = Vec::new();
        while spawned.len() < 13 {
            let (id, kind) = until(s, "spawns", |e| match e {
                SessionEvent::World(WorldEvent::Spawned { id: ViewId::Entity(id), kind }) => Some((id, kind.unwrap())),
                SessionEvent::World(WorldEvent::Spawned { id: ViewId::Avatar(p), kind: None }) => {
                    ana_saw_bob |= p == bob;
                    None
                }
                _ => None,
            })
            .await;
            assert_eq!(kind.class, if id == gate { KindClass::Object } else { KindClass::Npc });
            spawned.push(id);
        }
        let shown = s.world().entities(std::time::Instant::now()).await;
        assert_eq!(shown.len(), 13);
        let (_, g) = shown.iter().find(|(id, _)| *id == gate).unwrap();
        assert!((g.position.x - 12.0).abs() < 0.1 && (g.position.z - 10.0).abs() < 0.1, "{:?}", g.position);
    }
    if !ana_saw_bob {
        until(&mut sessions[0], "bob's avatar", |e| {
            matches!(e, SessionEvent::World(WorldEvent::Spawned { id: ViewId::Avatar(p), .. }) if p == bob)
                .then_some(())
        })
        .await;
    }
    // For two seconds: bob's avatar comes at its serving rate, the world's entities at the
    // hosting server's tick rate, side by side in ana's view.
    let (before, _) = sessions[0].world().counters().await;
    let (mut updates, started) = (0u32, Instant::now());
    while started.elapsed() < Duration::from_secs(2) {
        sessions[1].set_avatar(AvatarState { position: Vec3::new(12.0, 0.0, 10.0), ..AvatarState::default() });
        if let Ok(Some(SessionEvent::Avatar(AvatarEvent::Updated(p, _)))) =
            tokio::time::timeout(Duration::from_millis(5), sessions[0].next()).await
        {
            updates += u32::from(p == bob);
        }
    }
    let (after, _) = sessions[0].world().counters().await;
    let per_entity = (after.links.entries - before.links.entries) as f64 / 13.0 / 2.0;
    assert!(updates >= 20, "{updates} avatar updates from bob in 2 s");
    assert!(per_entity >= 15.0, "{per_entity} states a second per entity");
    assert!(sessions[0].avatars(std::time::Instant::now()).await.iter().any(|(p, _)| *p == bob));
    assert_eq!(sessions[0].world().entities(std::time::Instant::now()).await.len(), 13);
    // Ana opens the gate: done, and both hear of it; attacking it is refused with the reason.
    let ana_id = sessions[0].id();
    let n = sessions[0].world().act(Action::Interact(gate)).await.unwrap();
    until(&mut sessions[0], "the action's answer", |e| {
        matches!(e, SessionEvent::World(WorldEvent::ActionDone { id }) if id == n).then_some(())
    })
    .await;
    for s in &mut sessions {
        until(s, "the gate opening", |e| match e {
            SessionEvent::World(WorldEvent::Happened(WorldEventInfo::ObjectChanged { object, state: 1, by })) => {
                (object == gate && by == ana_id).then_some(())
            }
            _ => None,
        })
        .await;
    }
    let n = sessions[1].world().act(Action::Attack(gate)).await.unwrap();
    let reason = until(&mut sessions[1], "the refusal", |e| match e {
        SessionEvent::World(WorldEvent::ActionRefused { id, reason }) if id == n => Some(reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, ActionRefusal::WrongKind);
    let (counters, servers) = sessions[0].world().counters().await;
    assert_eq!(servers.len(), 1);
    assert!(counters.links.snapshots > 0 && counters.links.refused_claims == 0);

    // A hello whose ticket was not signed by the control key, over real QUIC.
    let forger = Identity::from_seed([9; 32]);
    let session = TicketBody::new(TicketKind::Session, forger.public_key(), Roles::CLIENT, UnixTime(now_secs()), 3600)
        .sign(&forger)
        .encode()
        .to_vec();
    let mut link = ControlLink::connect_with(host.addr, &Trust::Pinned(host.cert), WORLD_ALPN).await.unwrap();
    let proof = KeyProof::new(&forger, WORLD_ACCOUNT, now_secs() * 1000, &host.cert);
    link.send(&ClientToHost::Hello { session, proof }).await.unwrap();
    let answer: HostToClient = tokio::time::timeout(Duration::from_secs(5), link.recv()).await.unwrap().unwrap();
    assert_eq!(answer, HostToClient::Closed(HostRefusal::BadTicket));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stats = host.stats.clone();
    while stats.borrow().counters.refused[0] == 0 {
        timeout_at(deadline, stats.changed()).await.unwrap().unwrap();
    }
    assert_eq!(stats.borrow().clients, 2);

    for s in sessions {
        s.sign_out().await;
    }
    host.shutdown().await;
    control.shutdown().await;
    drop(relay);
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

const TWO_ZONES: &str = r#"
[[zone]]
name = "west"
min = [0.0, 0.0]
max = [100.0, 100.0]

[[zone]]
name = "east"
min = [100.0, 0.0]
max = [200.0, 100.0]

[[npc_kind]]
name = "sheep"
behaviour = "wander"
speed = 1.0
health = 20
respawn_secs = 5

[[spawn]]
kind = "sheep"
zone = "west"
count = 15
around = [88.0, 50.0]
radius = 8.0

[[spawn]]
kind = "sheep"
zone = "east"
count = 15
around = [112.0, 50.0]
radius = 8.0
"#;

/// Two hosting-server processes serve the two halves of a world; a player walks across the
/// border and back at 10 m/s. Every entity it has seen and that did not leave its view is
/// shown at every sample (no gap), none comes twice, and none leaves while in range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_walks_across_two_hosting_processes_border_and_back_without_a_gap() {
    use std::collections::{BTreeMap, BTreeSet};

    use shoal_tests::procs::start_hosting;

    let dir = temp_dir("handover");
    let control_key = Identity::from_seed([77; 32]);
    let (west_key, east_key) = (Identity::from_seed([61; 32]), Identity::from_seed([62; 32]));
    let store = Store::open(&format!("sqlite:{}", dir.join("control.db").display())).await.unwrap();
    let accounts = StoreAccounts::new(store.clone(), HashCost { memory_kib: 256, iterations: 1 }).unwrap();
    accounts.create("ana", "ana-pw", 1).await.unwrap();
    let tls = ServerIdentity::load_or_create(&dir).unwrap();
    let fp = tls.fingerprint();
    let control = server::start(
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            identity: control_key.clone(),
            tls,
            core: CoreConfig { hosting: vec![west_key.node_id(), east_key.node_id()], ..CoreConfig::default() },
            retention: Duration::from_secs(3600),
            rate_limit: RateLimit::default(),
        },
        store.clone(),
        Arc::new(accounts),
    )
    .unwrap();
    // A view of 40 m (45 to leave), and the band as wide as the leave radius.
    let extra = "overlap = 45.0\n[interest]\nradius = 40.0\nleave_radius = 45.0\nbudget = 1100\n";
    let west = start_hosting(&dir, &control_key, 61, TWO_ZONES, "west", (control.addr, &fp), extra);
    let east = start_hosting(&dir, &control_key, 62, TWO_ZONES, "east", (control.addr, &fp), extra);

    let cfg = SessionConfig::new(control.addr, Trust::Pinned(fp), "ana", "ana-pw", Identity::from_seed([1; 32]));
    let mut s = Session::start(cfg).await.unwrap();
    let mut x = 40.0f32;
    s.set_state(standing(x, 50.0)).unwrap();
    until(&mut s, "the west server", |e| matches!(e, SessionEvent::World(WorldEvent::Connected { .. })).then_some(()))
        .await;
    // Walk east to 160, then back to 40, sampling the view every 50 ms.
    let (mut spawned, mut seen) = (BTreeSet::new(), BTreeMap::<EntityId, ([f32; 3], u32)>::new());
    let (mut both, mut gaps, mut sample) = (false, Vec::new(), 0u32);
    let start = Instant::now();
    for step in 0..=480u32 {
        x = if step <= 240 { 40.0 + step as f32 * 0.5 } else { 160.0 - (step - 240) as f32 * 0.5 };
        s.set_state(standing(x, 50.0)).unwrap();
        tokio::time::sleep_until(start + Duration::from_millis(50 * u64::from(step))).await;
        // The events so far.
        while let Ok(Some(e)) = tokio::time::timeout(Duration::ZERO, s.next()).await {
            match e {
                SessionEvent::World(WorldEvent::Spawned { id: ViewId::Entity(id), .. }) => {
                    assert!(spawned.insert(id), "{id:?} spawned twice");
                }
                SessionEvent::World(WorldEvent::Despawned { id: ViewId::Entity(id) }) => {
                    assert!(spawned.remove(&id), "{id:?} despawned unspawned");
                    if let Some((p, _)) = seen.remove(&id) {
                        let d = ((p[0] - x).powi(2) + (p[2] - 50.0).powi(2)).sqrt();
                        assert!(d > 38.0, "{id:?} left {d:.1} m from the player at x {x}");
                    }
                }
                _ => {}
            }
        }
        sample += 1;
        let (_, servers) = s.world().counters().await;
        both |= servers.len() == 2;
        let shown: BTreeMap<EntityId, [f32; 3]> = s
            .world()
            .entities(std::time::Instant::now())
            .await
            .into_iter()
            .map(|(id, a)| (id, a.position.to_array()))
            .collect();
        for (id, (_, last)) in &seen {
            if !shown.contains_key(id) && spawned.contains(id) {
                gaps.push((*id, sample - last, x));
            }
        }
        for (id, p) in shown {
            seen.insert(id, (p, sample));
        }
    }
    assert!(both, "never linked to both servers");
    assert!(gaps.is_empty(), "entities missing from the view while spawned: {gaps:?}");
    // Seen from both sides.
    let (counters, _) = s.world().counters().await;
    assert_eq!((counters.conflicts, counters.links.refused_claims), (0, 0));
    assert!(counters.connected >= 3, "{counters:?}");
    s.sign_out().await;
    drop((west, east));
    control.shutdown().await;
}
