//! The view against real hosting-server cores, wired in memory: a player walking across the
//! border of two zones served by two servers.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use shoal_hosting::behaviour::BUILT_IN;
use shoal_hosting::content::Content;
use shoal_hosting::host::{ClientId, Host, HostConfig, Output};
use shoal_hosting::world::World;
use shoal_protocol::snapshot::{Quantised, SnapshotWriter};
use shoal_protocol::world::{DATAGRAM_SNAPSHOT, KindClass, ZoneInfo};
use shoal_protocol::{Roles, TicketBody, TicketKind, UnixTime};

use super::*;

const TWO_ZONES: &str = r#"
[[zone]]
name = "west"
min = [0.0, 0.0]
max = [200.0, 200.0]

[[zone]]
name = "east"
min = [200.0, 0.0]
max = [400.0, 200.0]

[[npc_kind]]
name = "sheep"
behaviour = "wander"
speed = 1.0
health = 20
respawn_secs = 5

[[spawn]]
kind = "sheep"
zone = "west"
count = 20
around = [185.0, 100.0]
radius = 12.0

[[spawn]]
kind = "sheep"
zone = "east"
count = 20
around = [215.0, 100.0]
radius = 12.0

[[object_kind]]
name = "gate"
states = ["closed", "open"]

[[object]]
kind = "gate"
at = [199.0, 100.0]

[[object]]
kind = "gate"
at = [201.0, 100.0]
"#;

const T0_MS: u64 = 1_800_000_000_000;

struct Server {
    info: HostingInfo,
    host: Host,
}

struct Rig {
    servers: Vec<Server>,
    view: WorldView,
    player: Identity,
    ticket: Vec<u8>,
    t0: Instant,
    /// Every event the game heard.
    heard: Vec<(Duration, WorldEvent)>,
}

fn rig() -> Rig {
    let control = Identity::from_seed([1; 32]);
    let player = Identity::from_seed([2; 32]);
    let servers = (0..2u8)
        .map(|z| {
            let content = Content::parse(TWO_ZONES, BUILT_IN).unwrap();
            let world = World::new(content, 7, &[]).unwrap();
            let cert = [10 + z; 32];
            let host = Host::new(
                world,
                HostConfig { zone: usize::from(z), ..HostConfig::default() },
                control.public_key(),
                cert,
            );
            let info = HostingInfo {
                id: NodeId([20 + z; 8]),
                addr: format!("127.0.0.1:{}", 7000 + u16::from(z)).parse().unwrap(),
                cert,
                zone: host.zone().clone(),
                overlap: host.config().overlap,
            };
            Server { info, host }
        })
        .collect::<Vec<_>>();
    let ticket = TicketBody::new(TicketKind::Session, player.public_key(), Roles::CLIENT, UnixTime(T0_MS / 1000), 3600)
        .sign(&control)
        .encode()
        .to_vec();
    let t0 = Instant::now();
    let mut view = WorldView::new(InterpConfig::default(), t0);
    view.set_hosting(servers.iter().map(|s| s.info.clone()).collect());
    Rig { servers, view, player, ticket, t0, heard: Vec::new() }
}

impl Rig {
    /// One 50 ms step at `ms`: the view connects and leaves as it plans, both servers tick,
    /// and everything is delivered at once.
    fn step(&mut self, ms: u64) {
        let now = self.t0 + Duration::from_millis(ms);
        let (connect, leave) = self.view.plan();
        for s in leave {
            let i = self.servers.iter().position(|x| x.info.id == s).unwrap();
            self.servers[i].host.disconnected(ClientId(1));
            self.view.closed(s, None);
        }
        for h in connect {
            let hello = self.view.opened(&h, &self.player, self.ticket.clone(), T0_MS + ms);
            let i = self.servers.iter().position(|x| x.info.id == h.id).unwrap();
            self.servers[i].host.connected(ClientId(1));
            self.servers[i].host.on_message(now, T0_MS + ms, ClientId(1), hello);
        }
        self.view.handle_timeout(now);
        for i in 0..self.servers.len() {
            self.servers[i].host.tick(now);
        }
        // Deliver until quiet: the servers' outputs to the view, the view's to the servers.
        loop {
            let mut busy = false;
            for i in 0..self.servers.len() {
                let id = self.servers[i].info.id;
                while let Some(o) = self.servers[i].host.poll_output() {
                    busy = true;
                    match o {
                        Output::Message(_, m) => self.view.on_message(id, m),
                        Output::Datagram(_, d) => self.view.on_datagram(now, id, &d),
                        Output::Close(_) => self.view.closed(id, None),
                    }
                }
            }
            while let Some(t) = self.view.poll_transmit() {
                busy = true;
                let (id, t) = match t {
                    Transmit::Message(id, m) => (id, Ok(m)),
                    Transmit::Datagram(id, d) => (id, Err(d)),
                };
                let Some(s) = self.servers.iter_mut().find(|s| s.info.id == id) else { continue };
                match t {
                    Ok(m) => s.host.on_message(now, T0_MS + ms, ClientId(1), m),
                    Err(d) => s.host.on_datagram(ClientId(1), &d),
                }
            }
            if !busy {
                break;
            }
        }
        while let Some(e) = self.view.poll_event() {
            self.heard.push((Duration::from_millis(ms), e));
        }
    }

    /// Where every NPC and object really is (from the server that moves it).
    fn truth(&self) -> BTreeMap<EntityId, Vec3> {
        let mut out = BTreeMap::new();
        for s in &self.servers {
            for e in s.host.world().entities().iter().filter(|e| e.present && s.host.world().serves(e.id)) {
                out.insert(e.id, Vec3::new(e.at.x, 0.0, e.at.y));
            }
        }
        out
    }
}

#[test]
fn a_player_crossing_a_border_sees_no_gap_no_duplicate_and_no_flicker() {
    let mut r = rig();
    // From the middle of the west zone to deep in the east one, 5 m a second.
    let mut at = Vec3::new(100.0, 0.0, 100.0);
    let mut shown_both = false;
    for step in 0..(64 * 20) {
        let ms = step * 50;
        at.x = (100.0 + 5.0 * ms as f32 / 1000.0).min(390.0);
        r.view.set_position(at);
        r.step(ms);
        shown_both |= r.view.servers().len() == 2;
        if ms < 2000 {
            continue;
        }
        // Everything within 100 m of the player is shown, near where it really is.
        let shown: BTreeMap<EntityId, AvatarState> =
            r.view.entities(r.t0 + Duration::from_millis(ms)).into_iter().collect();
        for (id, p) in r.truth() {
            if p.distance(at) < 100.0 {
                let Some(s) = shown.get(&id) else {
                    panic!("{id:?} at {p} not shown with the player at {at} ({ms} ms)")
                };
                assert!(s.position.distance(p) < 1.5, "{id:?} shown at {} against {p}", s.position);
            }
        }
    }
    assert!(shown_both, "never linked to both servers at the border");
    // At 390 m the west server is behind: left.
    assert_eq!(r.view.servers(), vec![r.servers[1].info.id]);
    // No entity came twice, and none left while it was near the player.
    let mut spawned: BTreeSet<ViewId> = BTreeSet::new();
    for (t, e) in &r.heard {
        match e {
            WorldEvent::Spawned { id, kind } => {
                assert!(spawned.insert(*id), "{id:?} spawned twice (at {t:?})");
                assert!(kind.as_ref().is_some_and(|k| matches!(k.class, KindClass::Npc | KindClass::Object)));
            }
            WorldEvent::Despawned { id } => {
                assert!(spawned.remove(id), "{id:?} despawned unspawned");
                let x = (100.0 + 5.0 * t.as_secs_f32()).min(390.0);
                let ViewId::Entity(e) = id else { panic!() };
                let p = r.truth()[e];
                assert!(p.distance(Vec3::new(x, 0.0, 100.0)) > 110.0, "{id:?} left at {p}, the player at {x}");
            }
            _ => {}
        }
    }
    let c = r.view.counters();
    assert_eq!((c.conflicts, c.links.refused_claims, c.links.bad_datagrams), (0, 0, 0));
    assert_eq!((c.connected, c.disconnected), (2, 1));
}

#[test]
fn a_server_that_claims_entities_outside_its_zone_or_unnamed_kinds_is_refused_and_counted() {
    let t0 = Instant::now();
    let mut view = WorldView::new(InterpConfig::default(), t0);
    let zone = ZoneInfo { name: "west".into(), min: [0.0, 0.0], max: [200.0, 200.0] };
    let info = HostingInfo {
        id: NodeId([5; 8]),
        addr: "127.0.0.1:1".parse().unwrap(),
        cert: [0; 32],
        zone: zone.clone(),
        overlap: 135.0,
    };
    let me = Identity::from_seed([3; 32]);
    view.set_position(Vec3::new(100.0, 0.0, 100.0));
    view.opened(&info, &me, Vec::new(), 0);
    let kinds = vec![KindInfo { name: "sheep".into(), class: KindClass::Npc, states: vec!["20".into()] }];
    view.on_message(info.id, HostToClient::Welcome { zone, overlap: 135.0, tick_hz: 20, kinds });
    // Kind 4 was never named; entity 2 stands in the east.
    view.on_message(info.id, HostToClient::Spawn(vec![(EntityId(1), 0), (EntityId(2), 0), (EntityId(3), 4)]));
    let mut w = SnapshotWriter::new();
    let mut buf = Vec::new();
    w.write(
        &[
            (EntityId(1), Quantised::new([150.0, 100.0], 0.0, 20)),
            (EntityId(2), Quantised::new([350.0, 100.0], 0.0, 20)),
        ],
        &mut buf,
    );
    let mut d = vec![DATAGRAM_SNAPSHOT, 0, 0, 0, 1];
    d.extend_from_slice(&buf);
    view.on_datagram(t0, info.id, &d);
    view.on_datagram(t0, info.id, &[DATAGRAM_SNAPSHOT, 1]);
    let shown: Vec<EntityId> = view.entities(t0 + Duration::from_millis(500)).into_iter().map(|(id, _)| id).collect();
    assert_eq!(shown, vec![EntityId(1)]);
    let c = view.counters();
    assert_eq!((c.links.refused_claims, c.links.bad_datagrams), (2, 1));
    // The acknowledgement of what it took goes back.
    assert!(std::iter::from_fn(|| view.poll_transmit()).any(|t| matches!(t, Transmit::Datagram(..))));
    // An action on an entity no server shows is not sent.
    assert_eq!(view.act(Action::Attack(EntityId(2))), Err(ActError::NotShown));
    assert!(view.act(Action::Attack(EntityId(1))).is_ok());
}
