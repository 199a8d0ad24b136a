#![allow(clippy::unwrap_used, clippy::panic)]

use shoal_protocol::snapshot::{SnapshotReader, decode};
use shoal_protocol::world::WorldEventInfo;
use shoal_protocol::{Identity, TicketBody};

use super::*;
use crate::behaviour::BUILT_IN;
use crate::content::Content;
use crate::interest::InterestConfig;

const CONTENT: &str = r#"
[[zone]]
name = "field"
min = [0.0, 0.0]
max = [400.0, 400.0]

[[npc_kind]]
name = "sheep"
behaviour = "wander"
speed = 2.0
health = 20
respawn_secs = 5

[[spawn]]
kind = "sheep"
zone = "field"
count = 30
around = [100.0, 100.0]
radius = 20.0

[[object_kind]]
name = "gate"
states = ["closed", "open"]

[[object_kind]]
name = "herb"
states = ["ripe"]
respawn_secs = 10

[[object]]
kind = "gate"
at = [102.0, 100.0]

[[object]]
kind = "herb"
at = [98.0, 100.0]
"#;

const CERT: [u8; 32] = [7; 32];
const T0_MS: u64 = 1_800_000_000_000;

struct Rig {
    host: Host,
    control: Identity,
    t0: Instant,
}

fn rig(cfg: HostConfig) -> Rig {
    let control = Identity::from_seed([1; 32]);
    let world = World::new(Content::parse(CONTENT, BUILT_IN).unwrap(), 3, &[]).unwrap();
    Rig { host: Host::new(world, cfg, control.public_key(), CERT), control, t0: Instant::now() }
}

fn player(n: u8) -> Identity {
    Identity::from_seed([n; 32])
}

impl Rig {
    fn ticket(&self, who: &Identity, kind: TicketKind, roles: Roles, issued_s: u64, ttl: u64) -> Vec<u8> {
        TicketBody::new(kind, who.public_key(), roles, UnixTime(issued_s), ttl).sign(&self.control).encode().to_vec()
    }

    /// Opens connection `cid` and makes `who`'s hello for it.
    fn hello(&mut self, cid: u64, who: &Identity) -> ClientToHost {
        self.host.connected(ClientId(cid));
        let session = self.ticket(who, TicketKind::Session, Roles::CLIENT, T0_MS / 1000 - 10, 3600);
        ClientToHost::Hello { session, proof: KeyProof::new(who, WORLD_ACCOUNT, T0_MS, &CERT) }
    }

    fn send(&mut self, at_ms: u64, cid: u64, msg: ClientToHost) {
        self.host.on_message(self.t0 + Duration::from_millis(at_ms), T0_MS + at_ms, ClientId(cid), msg);
    }

    fn join(&mut self, cid: u64, who: &Identity, at: [f32; 2]) {
        let hello = self.hello(cid, who);
        self.send(0, cid, hello);
        self.send(0, cid, ClientToHost::Position { at: [at[0], 0.0, at[1]] });
    }

    fn outputs(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.host.poll_output()).collect()
    }

    fn messages(&mut self, cid: u64) -> Vec<HostToClient> {
        self.outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Message(c, m) if c == ClientId(cid) => Some(m),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_player_with_a_good_ticket_and_proof_is_welcomed_and_every_bad_hello_is_refused_with_its_reason() {
    let mut r = rig(HostConfig::default());
    let ana = player(2);
    let hello = r.hello(1, &ana);
    r.send(0, 1, hello);
    let m = r.messages(1);
    assert!(matches!(&m[..], [HostToClient::Welcome { tick_hz: 20, kinds, .. }] if kinds.len() == 3), "{m:?}");
    assert_eq!(r.host.players(), 1);

    let bob = player(3);
    let good = r.ticket(&bob, TicketKind::Session, Roles::CLIENT, T0_MS / 1000 - 10, 3600);
    let proof = KeyProof::new(&bob, WORLD_ACCOUNT, T0_MS, &CERT);
    let mut forged = good.clone();
    forged[70] ^= 1;
    let cases: Vec<(ClientToHost, HostRefusal)> = vec![
        (ClientToHost::Hello { session: forged, proof: proof.clone() }, HostRefusal::BadTicket),
        (ClientToHost::Hello { session: good[..50].to_vec(), proof: proof.clone() }, HostRefusal::BadTicket),
        (
            ClientToHost::Hello {
                session: r.ticket(&bob, TicketKind::Session, Roles::CLIENT, T0_MS / 1000 - 7200, 3600),
                proof: proof.clone(),
            },
            HostRefusal::ExpiredTicket,
        ),
        (
            ClientToHost::Hello {
                session: r.ticket(&bob, TicketKind::Session, Roles::RELAY, T0_MS / 1000 - 10, 3600),
                proof: proof.clone(),
            },
            HostRefusal::WrongRole,
        ),
        (
            ClientToHost::Hello {
                session: r.ticket(&bob, TicketKind::RelayPermit, Roles::CLIENT, T0_MS / 1000 - 10, 3600),
                proof: proof.clone(),
            },
            HostRefusal::WrongRole,
        ),
        // A proof made for another hosting server, for another account, by another key, or
        // too old.
        (
            ClientToHost::Hello { session: good.clone(), proof: KeyProof::new(&bob, WORLD_ACCOUNT, T0_MS, &[8; 32]) },
            HostRefusal::BadProof,
        ),
        (
            ClientToHost::Hello { session: good.clone(), proof: KeyProof::new(&bob, "", T0_MS, &CERT) },
            HostRefusal::BadProof,
        ),
        (
            ClientToHost::Hello { session: good.clone(), proof: KeyProof::new(&ana, WORLD_ACCOUNT, T0_MS, &CERT) },
            HostRefusal::BadProof,
        ),
        (
            ClientToHost::Hello {
                session: good.clone(),
                proof: KeyProof::new(&bob, WORLD_ACCOUNT, T0_MS - 120_000, &CERT),
            },
            HostRefusal::BadProof,
        ),
        (ClientToHost::Position { at: [0.0; 3] }, HostRefusal::NoHello),
    ];
    for (i, (msg, want)) in cases.into_iter().enumerate() {
        let cid = 10 + i as u64;
        r.host.connected(ClientId(cid));
        r.send(0, cid, msg);
        let out = r.outputs();
        assert_eq!(
            out,
            vec![Output::Message(ClientId(cid), HostToClient::Closed(want)), Output::Close(ClientId(cid))],
            "case {i}"
        );
    }
    let c = r.host.counters();
    assert_eq!((c.hellos, c.refused[0], c.refused[1], c.refused[2], c.refused[3], c.refused[4]), (1, 2, 1, 2, 4, 1));
    // A second hello on a welcomed connection is refused too.
    let session = r.ticket(&ana, TicketKind::Session, Roles::CLIENT, T0_MS / 1000 - 10, 3600);
    r.send(0, 1, ClientToHost::Hello { session, proof: KeyProof::new(&ana, WORLD_ACCOUNT, T0_MS, &CERT) });
    assert_eq!(r.messages(1), vec![HostToClient::Closed(HostRefusal::NoHello)]);
    assert_eq!(r.host.players(), 0);
}

/// Applies a client's datagrams and messages as the SDK would: returns the entities it
/// holds with their kinds, and acknowledges what it took.
#[derive(Default)]
struct View {
    reader: SnapshotReader,
    kinds: FxHashMap<EntityId, u16>,
    acks: Option<Acks>,
    datagrams: Vec<usize>,
    events: Vec<WorldEventInfo>,
}

impl View {
    fn take(&mut self, out: Vec<Output>, cid: u64) {
        for o in out {
            match o {
                Output::Message(c, HostToClient::Spawn(s)) if c == ClientId(cid) => self.kinds.extend(s),
                Output::Message(c, HostToClient::Despawn { ids, .. }) if c == ClientId(cid) => {
                    for id in ids {
                        self.kinds.remove(&id);
                        self.reader.forget(id);
                    }
                }
                Output::Message(c, HostToClient::Event(e)) if c == ClientId(cid) => self.events.push(e),
                Output::Datagram(c, d) if c == ClientId(cid) => {
                    assert_eq!(d[0], DATAGRAM_SNAPSHOT);
                    self.datagrams.push(d.len());
                    let (seq, entries) = decode(&d[SNAPSHOT_HEADER..]).unwrap();
                    self.reader.apply(seq, &entries);
                    Acks::take(&mut self.acks, seq);
                }
                _ => {}
            }
        }
    }

    fn ack(&self, host: &mut Host, cid: u64) {
        if let Some(a) = self.acks {
            host.on_datagram(ClientId(cid), &a.encode());
        }
    }
}

#[test]
fn a_player_sees_what_is_near_in_snapshots_that_shrink_once_acknowledged_and_loses_it_walking_away() {
    let mut r = rig(HostConfig::default());
    r.join(1, &player(2), [100.0, 100.0]);
    r.outputs();
    let mut v = View::default();
    r.host.tick(r.t0);
    v.take(r.outputs(), 1);
    // Thirty sheep, the gate and the herb, with their kinds (sheep 0, gate 1, herb 2).
    assert_eq!(v.kinds.len(), 32);
    assert_eq!(v.kinds[&EntityId(30)], 1);
    assert_eq!(v.kinds[&EntityId(31)], 2);
    let first: usize = v.datagrams.iter().sum();
    for e in r.host.world().entities() {
        let (_, q) = v.reader.latest(e.id).unwrap();
        assert_eq!(q, quantise(e));
    }
    v.ack(&mut r.host, 1);
    v.datagrams.clear();
    r.host.tick(r.t0 + Duration::from_millis(50));
    v.take(r.outputs(), 1);
    let second: usize = v.datagrams.iter().sum();
    assert!(second * 4 < first * 3, "{second} bytes against {first} before the ack");
    for e in r.host.world().entities() {
        assert_eq!(v.reader.latest(e.id).unwrap().1, quantise(e));
    }
    // Walking away, 10 m a second for 25 s, the flock leaves the view.
    for s in 1..=25u64 {
        let at = [100.0 + 10.0 * s as f32, 0.0, 100.0];
        r.send(s * 1000, 1, ClientToHost::Position { at });
        r.host.tick(r.t0 + Duration::from_millis(s * 1000));
        v.take(r.outputs(), 1);
        v.ack(&mut r.host, 1);
    }
    assert!(v.kinds.is_empty(), "{:?}", v.kinds);
}

#[test]
fn a_view_larger_than_a_datagram_goes_in_several_within_the_limit() {
    let cfg = HostConfig { max_datagram: 120, ..HostConfig::default() };
    let mut r = rig(cfg);
    r.join(1, &player(2), [100.0, 100.0]);
    let mut v = View::default();
    r.host.tick(r.t0);
    v.take(r.outputs(), 1);
    assert!(v.datagrams.len() >= 3, "{:?}", v.datagrams);
    assert!(v.datagrams.iter().all(|&n| n <= 120), "{:?}", v.datagrams);
    assert!(r.host.world().entities().iter().all(|e| v.reader.latest(e.id).is_some()));
}

#[test]
fn actions_are_checked_for_position_range_rate_and_kind_and_their_events_reach_who_sees_them() {
    let mut r = rig(HostConfig::default());
    let (ana, bob) = (player(2), player(3));
    let act = |n, action| ClientToHost::Act { id: n, action };
    // No position yet.
    let hello = r.hello(1, &ana);
    r.send(0, 1, hello);
    r.send(0, 1, act(1, Action::Interact(EntityId(30))));
    assert_eq!(r.messages(1)[1..], [HostToClient::Refused { id: 1, reason: ActionRefusal::NoPosition }]);
    r.send(0, 1, ClientToHost::Position { at: [100.0, 0.0, 100.0] });
    r.join(2, &bob, [101.0, 101.0]);
    r.host.tick(r.t0);
    r.outputs();
    // The gate opens; both players hear of it, as they both see it.
    r.send(10, 1, act(2, Action::Interact(EntityId(30))));
    let out = r.outputs();
    let changed = WorldEventInfo::ObjectChanged { object: EntityId(30), state: 1, by: ana.node_id() };
    assert!(out.contains(&Output::Message(ClientId(1), HostToClient::Done { id: 2 })));
    assert!(out.contains(&Output::Message(ClientId(1), HostToClient::Event(changed))));
    assert!(out.contains(&Output::Message(ClientId(2), HostToClient::Event(changed))));
    // Wrong kinds, a missing entity.
    r.send(20, 1, act(3, Action::Attack(EntityId(30))));
    r.send(20, 1, act(4, Action::PickUp(EntityId(30))));
    r.send(20, 1, act(5, Action::Interact(EntityId(999))));
    let m = r.messages(1);
    assert_eq!(
        m,
        vec![
            HostToClient::Refused { id: 3, reason: ActionRefusal::WrongKind },
            HostToClient::Refused { id: 4, reason: ActionRefusal::WrongKind },
            HostToClient::Refused { id: 5, reason: ActionRefusal::NoEntity },
        ]
    );
    // The herb, picked up, is gone for the next one who tries.
    r.send(30, 2, act(1, Action::PickUp(EntityId(31))));
    r.send(30, 1, act(6, Action::PickUp(EntityId(31))));
    let out = r.outputs();
    assert!(out.contains(&Output::Message(ClientId(2), HostToClient::Done { id: 1 })));
    assert!(
        out.contains(&Output::Message(ClientId(1), HostToClient::Refused { id: 6, reason: ActionRefusal::Absent }))
    );
    // A sheep out of reach; then the nearest, struck to death, as fast as the rate allows.
    let world = r.host.world();
    let me = Vec2::new(100.0, 100.0);
    let mut sheep: Vec<&Entity> = world.entities()[..30].iter().collect();
    sheep.sort_by(|a, b| a.at.distance(me).total_cmp(&b.at.distance(me)));
    let (near, far) = (sheep[0].id, sheep[29].id);
    let near_at = sheep[0].at;
    assert!(sheep[29].at.distance(me) > 6.0);
    r.send(40, 1, act(7, Action::Attack(far)));
    assert_eq!(r.messages(1), vec![HostToClient::Refused { id: 7, reason: ActionRefusal::OutOfRange }]);
    r.send(40, 1, ClientToHost::Position { at: [near_at.x, 0.0, near_at.y] });
    let mut t = 1000;
    for n in 0..2 {
        r.send(t, 1, act(8 + n, Action::Attack(near)));
        t += 250;
    }
    let m = r.messages(1);
    assert!(m.contains(&HostToClient::Event(WorldEventInfo::Died { npc: near, by: ana.node_id() })), "{m:?}");
    // Ten at once: the bucket (eight, four a second) has about six left of what the actions
    // above spent; the rest are refused.
    for n in 0..10 {
        r.send(t, 1, act(20 + n, Action::Interact(EntityId(30))));
    }
    let refused = r
        .messages(1)
        .iter()
        .filter(|m| matches!(m, HostToClient::Refused { reason: ActionRefusal::RateLimited, .. }))
        .count();
    assert_eq!(refused, 5);
    let c = r.host.counters();
    assert_eq!(c.actions_refused[action_refusal_index(ActionRefusal::OutOfRange)], 1);
    assert_eq!(c.actions_refused[action_refusal_index(ActionRefusal::RateLimited)] as usize, refused);
}

#[test]
fn implausible_moves_are_not_taken_and_too_many_close_the_client_as_does_leaving_the_zone() {
    let mut r = rig(HostConfig::default());
    r.join(1, &player(2), [100.0, 100.0]);
    r.outputs();
    // A jump of 100 m in a second is not taken: the view stays where the player was.
    r.send(1000, 1, ClientToHost::Position { at: [200.0, 0.0, 100.0] });
    r.send(1000, 1, ClientToHost::Position { at: [f32::NAN, 0.0, 0.0] });
    assert_eq!(r.host.counters().implausible, 2);
    r.host.tick(r.t0 + Duration::from_secs(1));
    let mut v = View::default();
    v.take(r.outputs(), 1);
    assert_eq!(v.kinds.len(), 32, "served where it really was");
    for i in 0..12u64 {
        r.send(1000 + i, 1, ClientToHost::Position { at: [300.0, 0.0, 300.0] });
    }
    assert_eq!(r.messages(1), vec![HostToClient::Closed(HostRefusal::Implausible)]);
    // Walking out of the zone and its overlap band (135 m).
    r.join(2, &player(3), [395.0, 200.0]);
    r.outputs();
    for s in 1..=15u64 {
        r.send(s * 1000, 2, ClientToHost::Position { at: [395.0 + 10.0 * s as f32, 0.0, 200.0] });
    }
    assert_eq!(r.messages(2), vec![HostToClient::Closed(HostRefusal::OutsideZone)]);
}

#[test]
fn the_same_player_connecting_again_replaces_the_older_connection() {
    let mut r = rig(HostConfig::default());
    let ana = player(2);
    r.join(1, &ana, [100.0, 100.0]);
    r.join(2, &ana, [100.0, 100.0]);
    let out = r.outputs();
    assert!(out.contains(&Output::Message(ClientId(1), HostToClient::Closed(HostRefusal::Replaced))));
    assert!(out.contains(&Output::Close(ClientId(1))));
    assert_eq!(r.host.players(), 1);
    // The older connection's close does not unseat the newer one.
    r.host.disconnected(ClientId(1));
    assert_eq!(r.host.players(), 1);
}

#[test]
fn a_client_is_sent_exactly_the_entities_in_its_interest_radius_and_the_set_follows_it() {
    const SPREAD: &str = r#"
[[zone]]
name = "wide"
min = [0.0, 0.0]
max = [600.0, 600.0]

[[npc_kind]]
name = "sheep"
behaviour = "wander"
speed = 1.0
health = 20
respawn_secs = 5

[[spawn]]
kind = "sheep"
zone = "wide"
count = 400
around = [300.0, 300.0]
radius = 290.0
"#;
    let control = Identity::from_seed([1; 32]);
    let world = World::new(Content::parse(SPREAD, BUILT_IN).unwrap(), 4, &[]).unwrap();
    // A budget that holds everything in view, so the view is the set sent.
    let interest = InterestConfig { budget: 100_000, ..InterestConfig::default() };
    let mut r = Rig {
        host: Host::new(world, HostConfig { interest, ..HostConfig::default() }, control.public_key(), CERT),
        control,
        t0: Instant::now(),
    };
    r.join(1, &player(2), [100.0, 100.0]);
    let mut v = View::default();
    let (radius, leave) = (interest.radius, interest.leave_radius);
    for s in 0..=40u64 {
        let at = Vec2::new(100.0 + 10.0 * s as f32, 100.0 + 5.0 * s as f32);
        r.send(s * 1000, 1, ClientToHost::Position { at: [at.x, 0.0, at.y] });
        r.host.tick(r.t0 + Duration::from_millis(s * 1000));
        v.take(r.outputs(), 1);
        v.ack(&mut r.host, 1);
        for e in r.host.world().entities() {
            let d = e.at.distance(at);
            let held = v.kinds.contains_key(&e.id);
            if s == 0 {
                // At first: exactly those within the radius.
                assert_eq!(held, d <= radius, "{:?} {d:.1} m away", e.id);
            } else {
                assert!(d > radius || held, "{:?} {d:.1} m away, not in view", e.id);
                assert!(d <= leave || !held, "{:?} {d:.1} m away, still in view", e.id);
            }
            if held {
                assert_eq!(v.reader.latest(e.id).map(|(_, q)| q), Some(quantise(e)), "{:?}", e.id);
            }
        }
    }
    assert!(r.host.counters().refused.iter().all(|&n| n == 0));
}
