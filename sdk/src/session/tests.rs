//! The session's decisions, fed by hand: no socket, no clock, no control server.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use shoal_link::Trust;
use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::control::{
    ClientToControl, ControlToClient, Introduction, KeyProof, MAX_CONTROL_FRAME, Refusal, RelayInfo, Report, RouteInfo,
    SIGN_IN_CONTEXT,
};
use shoal_protocol::profile::ProfileConfig;
use shoal_protocol::{Identity, NodeId, Roles, TicketBody, TicketKind, UnixTime};

use super::*;
use crate::driver::NodeStatus;
use crate::node::{Event, VcKey};
use crate::vc::{CloseReason, VcCounters, VcEvent, VcStats};

const T0: u64 = 1_800_000_000;
const FP: [u8; 32] = [7; 32];

fn control() -> Identity {
    Identity::from_seed([99; 32])
}

fn me() -> Identity {
    Identity::from_seed([1; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn config() -> SessionConfig {
    SessionConfig::new(addr("198.51.100.1:7100"), Trust::Pinned(FP), "ana", "pw", me())
}

fn new_core(seed: u64) -> (SessionCore, Instant) {
    let t = Instant::now();
    let mut c =
        SessionCore::new(t, config(), WallClock::new(t, T0 * 1_000_000), Xoshiro256PlusPlus::seed_from_u64(seed));
    c.set_local_addrs(vec![addr("192.168.1.5:4000")], 4000);
    (c, t)
}

/// Everything the core asks for, in its call order.
#[derive(Debug, Default)]
struct Out {
    commands: Vec<NodeCommand>,
    transmits: Vec<LinkCommand>,
    events: Vec<SessionEvent>,
}

impl Out {
    fn sent(&self) -> Vec<&ClientToControl> {
        self.transmits
            .iter()
            .filter_map(|t| match t {
                LinkCommand::Send { msg, .. } => Some(msg),
                _ => None,
            })
            .collect()
    }

    fn report(&self) -> &Report {
        self.sent()
            .into_iter()
            .find_map(|m| match m {
                ClientToControl::Report(r) => Some(&**r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no report in {self:?}"))
    }
}

fn drain(c: &mut SessionCore) -> Out {
    let mut out = Out::default();
    out.commands.extend(std::iter::from_fn(|| c.poll_command()));
    out.transmits.extend(std::iter::from_fn(|| c.poll_transmit()));
    out.events.extend(std::iter::from_fn(|| c.poll_event()));
    out
}

fn welcome(relays: &[(u8, &str)]) -> ControlToClient {
    let key = me().public_key();
    let ticket = |kind| TicketBody::new(kind, key, Roles::CLIENT, UnixTime(T0), 600).sign(&control()).encode().to_vec();
    ControlToClient::Welcome {
        session: ticket(TicketKind::Session),
        permit: ticket(TicketKind::RelayPermit),
        relays: relays.iter().map(|&(id, a)| RelayInfo { id: NodeId([id; 8]), addr: addr(a), rtt_us: 0 }).collect(),
        now: UnixTime(T0),
    }
}

/// Takes the core through its first sign-in on link 1.
fn signed_in(seed: u64) -> (SessionCore, Instant) {
    let (mut c, t) = new_core(seed);
    drain(&mut c);
    c.handle_link_up(t, LinkId(1), FP);
    drain(&mut c);
    c.handle_message(t, LinkId(1), welcome(&[(1, "198.51.100.7:7000")]));
    drain(&mut c);
    assert!(c.is_signed_in());
    (c, t)
}

fn link_stats(auth_failures: u64) -> VcStats {
    VcStats {
        rtt: Some(Duration::from_millis(30)),
        jitter: Duration::ZERO,
        loss: 0.0,
        send_bytes_per_sec: 100.0,
        recv_bytes_per_sec: 200.0,
        path: None,
        paths: Vec::new(),
        counters: VcCounters { auth_failures, ..VcCounters::default() },
    }
}

fn status(links: Vec<(VcKey, VcStats)>) -> NodeOutcome {
    NodeOutcome::Status(Box::new(NodeStatus {
        links,
        relays: vec![(NodeId([1; 8]), addr("198.51.100.7:7000"), Duration::from_millis(12))],
        ..NodeStatus::default()
    }))
}

/// Runs the report that is due at `at`, answering its status request with `outcome`.
fn report_at(c: &mut SessionCore, at: Instant, outcome: NodeOutcome) -> Out {
    assert_eq!(c.poll_timeout(), Some(at));
    c.handle_timeout(at);
    let out = drain(c);
    assert_eq!(out.commands, vec![NodeCommand::Status]);
    c.handle_node_outcome(at, outcome);
    drain(c)
}

#[test]
fn signs_in_with_a_key_proof_then_binds_checks_in_and_reports_on_schedule() {
    let (mut c, t) = new_core(1);
    let out = drain(&mut c);
    assert_eq!(out.transmits, vec![LinkCommand::Connect { link: LinkId(1), resume: false }]);
    c.handle_link_up(t, LinkId(1), FP);
    let out = drain(&mut c);
    let [ClientToControl::SignIn { account, password, proof }] = &out.sent()[..] else { panic!("{out:?}") };
    assert_eq!((account.as_str(), password.as_str()), ("ana", "pw"));
    // The proof is made on the clock passed in, for this server and account.
    assert_eq!(proof.unix_ms, T0 * 1000);
    let signed = KeyProof::message("ana", &me().public_key(), T0 * 1000, &FP);
    proof.public_key.verify(SIGN_IN_CONTEXT, &signed, &proof.signature).unwrap();

    c.handle_message(t, LinkId(1), welcome(&[(1, "198.51.100.7:7000"), (2, "198.51.100.8:7000")]));
    let out = drain(&mut c);
    // The permit and the relays before the check-in that follows them.
    assert!(matches!(out.commands[0], NodeCommand::SetPermit(p) if p.body.node_id == me().node_id()));
    assert_eq!(
        out.commands[1..],
        [NodeCommand::AddRelay(addr("198.51.100.7:7000")), NodeCommand::AddRelay(addr("198.51.100.8:7000"))]
    );
    // The check-in, and the key our published stream is sealed with, for our watchers.
    assert_eq!(
        out.sent()[0],
        &ClientToControl::CheckIn { local: vec![addr("192.168.1.5:4000")], mesh_port: 4000, reflexive: None }
    );
    assert!(matches!(out.sent()[1..], [ClientToControl::StreamKey(_)]), "{out:?}");
    assert!(out.events.is_empty(), "the first sign-in is no restoration: {:?}", out.events);

    // A report at once, then one a second; each carries the state and the link stats, with
    // the authentication failures since the one before, and the relays' RTTs when they
    // changed.
    c.set_state(PlayerState { position: [1.0, 2.0, 3.0], status: "playing".into(), ..Default::default() }).unwrap();
    let key = VcKey { peer: NodeId([5; 8]), vc: VcId(1) };
    let out = report_at(&mut c, t, status(vec![(key, link_stats(3))]));
    let [ClientToControl::RelayRtts(rtts), ClientToControl::Report(r)] = &out.sent()[..] else { panic!("{out:?}") };
    assert_eq!(rtts, &vec![(NodeId([1; 8]), 12_000)]);
    assert_eq!((r.seq, r.position, r.status.as_str()), (1, [1.0, 2.0, 3.0], "playing"));
    assert_eq!((r.links[0].peer, r.links[0].rtt_us, r.links[0].auth_failures), (key.peer, 30_000, 3));
    let second = t + Duration::from_secs(1);
    let out = report_at(&mut c, second, status(vec![(key, link_stats(5))]));
    assert_eq!(out.sent().len(), 1, "RTTs unchanged: {out:?}");
    assert_eq!((out.report().seq, out.report().links[0].auth_failures), (2, 2));

    // A VC that timed out is a lost peer, told once; one closed by either side is not.
    let lost = VcKey { peer: NodeId([6; 8]), vc: VcId(2) };
    c.handle_node_event(second, Event::Vc(lost, VcEvent::Closed(CloseReason::TimedOut)));
    c.handle_node_event(second, Event::Vc(key, VcEvent::Closed(CloseReason::Local)));
    let out = drain(&mut c);
    assert_eq!(out.events.len(), 2, "node events are passed on: {out:?}");
    let third = second + Duration::from_secs(1);
    assert_eq!(report_at(&mut c, third, status(vec![])).report().lost, vec![lost.peer]);
    assert!(report_at(&mut c, third + Duration::from_secs(1), status(vec![])).report().lost.is_empty());
    assert_eq!(c.counters().reports, 4);
}

#[test]
fn a_lost_link_resumes_with_the_ticket_and_falls_back_to_the_credentials_when_it_is_refused() {
    let (mut c, t) = signed_in(1);
    c.handle_link_down(t, LinkId(1), "reset by peer");
    let out = drain(&mut c);
    assert_eq!(out.events, vec![SessionEvent::ControlLost("reset by peer".into())]);
    assert_eq!(out.transmits, vec![LinkCommand::Close { link: LinkId(1) }]);
    // 250 ms and up to a quarter more.
    let retry = c.poll_timeout().unwrap();
    assert!(retry >= t + Duration::from_millis(250) && retry <= t + Duration::from_micros(312_500), "{retry:?}");
    c.handle_timeout(retry - Duration::from_micros(1));
    assert!(drain(&mut c).transmits.is_empty(), "not before the backoff");
    c.handle_timeout(retry);
    assert_eq!(drain(&mut c).transmits, vec![LinkCommand::Connect { link: LinkId(2), resume: true }]);
    c.handle_link_up(retry, LinkId(2), FP);
    let out = drain(&mut c);
    let [ClientToControl::Resume { session, proof }] = &out.sent()[..] else { panic!("{out:?}") };
    let ticket = shoal_protocol::SignedTicket::decode(session).unwrap();
    assert_eq!(ticket.body.kind, TicketKind::Session);
    // A resume's proof names no account.
    let signed = KeyProof::message("", &me().public_key(), proof.unix_ms, &FP);
    proof.public_key.verify(SIGN_IN_CONTEXT, &signed, &proof.signature).unwrap();

    c.handle_message(retry, LinkId(2), ControlToClient::Refused(Refusal::BadTicket));
    let out = drain(&mut c);
    assert!(matches!(out.sent()[..], [ClientToControl::SignIn { .. }]), "{out:?}");
    assert!(out.events.is_empty(), "a fallback is no refusal to the game: {out:?}");
    c.handle_message(retry, LinkId(2), welcome(&[]));
    let out = drain(&mut c);
    assert_eq!(out.events, vec![SessionEvent::ControlRestored]);
    assert!(matches!(out.sent()[..], [ClientToControl::CheckIn { .. }, ClientToControl::StreamKey(_)]), "{out:?}");
    let k = c.counters();
    assert_eq!((k.attempts, k.welcomes, k.resumed, k.fallbacks, k.lost), (2, 2, 0, 1, 1));
}

/// The waits between attempts while the server stays away, for a session on `seed`.
fn backoff_waits(seed: u64) -> Vec<Duration> {
    let (mut c, mut t) = signed_in(seed);
    let mut link = 1;
    c.handle_link_down(t, LinkId(link), "gone");
    drain(&mut c);
    let mut waits = Vec::new();
    for _ in 0..9 {
        let retry = c.poll_timeout().unwrap();
        waits.push(retry - t);
        t = retry;
        c.handle_timeout(t);
        link += 1;
        assert_eq!(drain(&mut c).transmits, vec![LinkCommand::Connect { link: LinkId(link), resume: true }]);
        c.handle_link_down(t, LinkId(link), "connection refused");
        assert_eq!(drain(&mut c).transmits, vec![LinkCommand::Close { link: LinkId(link) }]);
    }
    waits
}

#[test]
fn reconnects_back_off_doubling_with_seeded_jitter_up_to_the_max() {
    let waits = backoff_waits(7);
    let mut base = Duration::from_millis(250);
    for w in &waits {
        assert!(*w >= base && *w <= base + base / 4, "{w:?} for a backoff of {base:?}: {waits:?}");
        base = (base * 2).min(Duration::from_secs(10));
    }
    assert_eq!(backoff_waits(7), waits, "the same seed waits the same");
    assert_ne!(backoff_waits(8), waits, "another seed draws other jitter");
}

#[test]
fn a_final_refusal_stops_reconnecting_and_others_are_retried() {
    // Refused for good while reconnecting.
    let (mut c, t) = signed_in(1);
    c.handle_link_down(t, LinkId(1), "gone");
    drain(&mut c);
    let retry = c.poll_timeout().unwrap();
    c.handle_timeout(retry);
    c.handle_link_up(retry, LinkId(2), FP);
    drain(&mut c);
    c.handle_message(retry, LinkId(2), ControlToClient::Refused(Refusal::RateLimited));
    let out = drain(&mut c);
    assert_eq!(out.transmits, vec![LinkCommand::Close { link: LinkId(2) }]);
    assert!(out.events.is_empty() && c.poll_timeout().is_some(), "rate limited: tried again later");
    let retry = c.poll_timeout().unwrap();
    c.handle_timeout(retry);
    c.handle_link_up(retry, LinkId(3), FP);
    c.handle_message(retry, LinkId(3), ControlToClient::Refused(Refusal::BadTicket));
    drain(&mut c);
    c.handle_message(retry, LinkId(3), ControlToClient::Refused(Refusal::BadCredentials));
    let out = drain(&mut c);
    assert_eq!(out.events, vec![SessionEvent::Refused(Refusal::BadCredentials)]);
    assert!(c.is_stopped() && c.poll_timeout().is_none());

    // Cut off while signed in: the server's refusal, then its close.
    let (mut c, t) = signed_in(1);
    c.handle_message(t, LinkId(1), ControlToClient::Refused(Refusal::Implausible));
    c.handle_link_down(t, LinkId(1), "closed");
    let out = drain(&mut c);
    assert_eq!(
        out.events,
        vec![SessionEvent::Refused(Refusal::Implausible), SessionEvent::ControlLost("closed".into())]
    );
    assert!(c.is_stopped() && c.poll_timeout().is_none());
}

#[test]
fn the_first_sign_in_fails_with_its_reason_and_is_not_retried() {
    let (mut c, t) = new_core(1);
    drain(&mut c);
    c.handle_link_up(t, LinkId(1), FP);
    c.handle_message(t, LinkId(1), ControlToClient::Refused(Refusal::BadCredentials));
    assert_eq!(c.start_failure(), Some(&StartFailure::Refused(Refusal::BadCredentials)));
    assert!(drain(&mut c).transmits.contains(&LinkCommand::Close { link: LinkId(1) }));
    assert!(c.is_stopped() && c.poll_timeout().is_none());

    let (mut c, t) = new_core(1);
    drain(&mut c);
    assert_eq!(c.poll_timeout(), Some(t + Duration::from_secs(5)));
    c.handle_timeout(t + Duration::from_secs(5));
    assert_eq!(c.start_failure(), Some(&StartFailure::Timeout));
    assert_eq!(drain(&mut c).transmits, vec![LinkCommand::Close { link: LinkId(1) }]);
    assert_eq!(c.counters().timeouts, 1);

    let (mut c, t) = new_core(1);
    drain(&mut c);
    c.handle_link_down(t, LinkId(1), "no route to host");
    assert_eq!(c.start_failure(), Some(&StartFailure::Link("no route to host".into())));

    // A welcome whose permit cannot be read.
    let (mut c, t) = new_core(1);
    c.handle_link_up(t, LinkId(1), FP);
    let ControlToClient::Welcome { session, relays, now, .. } = welcome(&[]) else { unreachable!() };
    c.handle_message(t, LinkId(1), ControlToClient::Welcome { session, permit: vec![1, 2, 3], relays, now });
    assert!(matches!(c.start_failure(), Some(StartFailure::BadWelcome(_))));
    assert_eq!(c.counters().bad_welcomes, 1);
}

#[test]
fn what_comes_on_a_link_the_session_gave_up_on_is_dropped_and_counted() {
    let (mut c, t) = signed_in(1);
    c.handle_link_down(t, LinkId(1), "gone");
    drain(&mut c);
    // The lost link's last messages, read after its loss.
    c.handle_message(t, LinkId(1), ControlToClient::Farewell(NodeId([5; 8])));
    let retry = c.poll_timeout().unwrap();
    c.handle_timeout(retry);
    drain(&mut c);
    // The attempt times out; its handshake completes too late.
    let late = retry + Duration::from_secs(5);
    c.handle_timeout(late);
    drain(&mut c);
    c.handle_link_up(late, LinkId(2), FP);
    assert_eq!(drain(&mut c).transmits, vec![LinkCommand::Close { link: LinkId(2) }]);
    // Before the welcome, only a welcome or a refusal means anything.
    let next = c.poll_timeout().unwrap();
    c.handle_timeout(next);
    c.handle_link_up(next, LinkId(3), FP);
    c.handle_message(next, LinkId(3), ControlToClient::Farewell(NodeId([5; 8])));
    let out = drain(&mut c);
    assert!(out.commands.is_empty(), "{out:?}");
    let k = c.counters();
    assert_eq!((k.stale, k.unexpected, k.timeouts), (2, 1, 1));
}

#[test]
fn an_introduction_adds_the_peer_with_relayed_paths_first_and_a_farewell_removes_it() {
    let (mut c, t) = signed_in(1);
    let peer = Identity::from_seed([5; 32]);
    let (r1, r2, r3) = (NodeId([1; 8]), NodeId([2; 8]), NodeId([3; 8]));
    let observed = addr("203.0.113.9:4000");
    let intro = Introduction {
        peer_key: peer.public_key(),
        observed: Some(observed),
        local: vec![addr("192.168.9.1:4000"), observed, addr("192.168.9.2:4000"), addr("192.168.9.3:4000")],
        relays: vec![
            RelayInfo { id: r1, addr: addr("198.51.100.7:7000"), rtt_us: 20_000 },
            RelayInfo { id: r3, addr: addr("198.51.100.9:7000"), rtt_us: 90_000 },
        ],
        routes: vec![RouteInfo { relays: vec![r1, r2], rtt_us: 15_000 }],
        profiles: vec![(3, ProfileConfig::Voice.to_wire()), (4, [0xff; 16])],
    };
    c.handle_message(t, LinkId(1), ControlToClient::Introduce(Box::new(intro.clone())));
    let out = drain(&mut c);
    let route = |ids: &[NodeId]| Path::Relayed(Route::new(ids).unwrap());
    let expected_paths = vec![
        route(&[r1, r2]),
        route(&[r1]),
        route(&[r3]),
        Path::Direct(observed),
        Path::Direct(addr("192.168.9.1:4000")),
        Path::Direct(addr("192.168.9.2:4000")),
    ];
    let voice = Profile::from_config(&ProfileConfig::Voice).unwrap();
    assert_eq!(
        out.commands,
        vec![
            NodeCommand::AddRelay(addr("198.51.100.7:7000")),
            NodeCommand::AddRelay(addr("198.51.100.9:7000")),
            NodeCommand::Introduce {
                peer: crate::PeerInfo { key: peer.public_key(), paths: expected_paths },
                vcs: vec![(VcId(3), voice)],
            },
        ]
    );
    assert_eq!(c.counters().bad_profiles, 1);
    let vcs = vec![VcKey { peer: peer.node_id(), vc: VcId(3) }];
    c.handle_node_outcome(t, NodeOutcome::Introduced { peer: peer.node_id(), vcs: vcs.clone() });
    assert_eq!(drain(&mut c).events, vec![SessionEvent::Introduced { peer: peer.node_id(), vcs: vcs.clone() }]);

    // With no profiles named, the configured ones.
    let plain = Introduction { profiles: Vec::new(), ..intro };
    c.handle_message(t, LinkId(1), ControlToClient::Introduce(Box::new(plain)));
    let out = drain(&mut c);
    let Some(NodeCommand::Introduce { vcs: opened, .. }) = out.commands.last() else { panic!("{out:?}") };
    assert_eq!(opened, &config().profiles);

    c.handle_message(t, LinkId(1), ControlToClient::Farewell(peer.node_id()));
    assert_eq!(drain(&mut c).commands, vec![NodeCommand::RemovePeer(peer.node_id())]);
    c.handle_node_outcome(t, NodeOutcome::Removed { peer: peer.node_id(), closed: vcs.clone() });
    assert_eq!(drain(&mut c).events, vec![SessionEvent::Farewell { peer: peer.node_id(), closed: vcs }]);
}

#[test]
fn a_relay_that_sees_a_new_address_brings_a_check_in_and_observed_is_told_once_per_address() {
    let (mut c, t) = signed_in(1);
    let (r1, r2) = (addr("198.51.100.7:7000"), addr("198.51.100.8:7000"));
    let bound = |relay, observed| Event::RelayBound { relay: NodeId([1; 8]), addr: relay, observed };
    let check_ins = |out: &Out| {
        out.sent()
            .into_iter()
            .filter_map(|m| match m {
                ClientToControl::CheckIn { reflexive, .. } => Some(*reflexive),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let (o1, o2) = (addr("203.0.113.5:4000"), addr("203.0.113.5:4001"));
    c.handle_node_event(t, bound(r1, o1));
    assert_eq!(check_ins(&drain(&mut c)), vec![Some(o1)]);
    c.handle_node_event(t, bound(r1, o1));
    c.handle_node_event(t, bound(r2, o2));
    assert!(check_ins(&drain(&mut c)).is_empty(), "the same view, or another relay's");
    c.handle_node_event(t, bound(r1, o2));
    assert_eq!(check_ins(&drain(&mut c)), vec![Some(o2)], "the NAT rebound us");
    c.handle_node_event(t, Event::RelayLost { relay: NodeId([1; 8]), addr: r1 });
    c.handle_node_event(t, bound(r2, o1));
    assert_eq!(check_ins(&drain(&mut c)), vec![Some(o1)], "the other relay's view now");

    for a in [o1, o1, o2, o2] {
        c.handle_message(t, LinkId(1), ControlToClient::Observed(a));
    }
    assert_eq!(drain(&mut c).events, vec![SessionEvent::Observed(o1), SessionEvent::Observed(o2)]);

    // Renewed permits go to the node; an unreadable one is counted and dropped.
    let ControlToClient::Welcome { permit, .. } = welcome(&[]) else { unreachable!() };
    c.handle_message(t, LinkId(1), ControlToClient::Permit(permit));
    c.handle_message(t, LinkId(1), ControlToClient::Permit(vec![0; 5]));
    let out = drain(&mut c);
    assert!(matches!(out.commands[..], [NodeCommand::SetPermit(_)]), "{out:?}");
    assert_eq!(c.counters().bad_permits, 1);
}

#[test]
fn a_state_too_large_for_a_report_is_refused_with_its_size_and_the_limit_and_never_sent() {
    let (mut c, t) = signed_in(1);
    let small = PlayerState { position: [4.0, 0.0, 0.0], character: vec![1; 100], ..Default::default() };
    c.set_state(small.clone()).unwrap();
    let huge = PlayerState { character: vec![7; 70_000], ..small.clone() };
    let err = c.set_state(huge.clone()).unwrap_err();
    let StateError::TooLarge { len, max } = err;
    assert_eq!(max, MAX_STATE_REPORT);
    assert!(len > 70_000 && len < 70_200, "{len}");
    let words = err.to_string();
    assert!(words.contains(&len.to_string()) && words.contains(&max.to_string()), "{words}");
    assert_eq!(check_state(&huge), Err(err));
    // The reports keep the state they had.
    assert_eq!(c.state(), &small);
    assert_eq!(report_at(&mut c, t, status(vec![])).report().character, small.character);
    assert_eq!(c.counters().states_too_large, 1);
    // The largest state that fits is taken.
    let mut edge = PlayerState { character: vec![7; MAX_STATE_REPORT], ..Default::default() };
    while check_state(&edge).is_err() {
        edge.character.pop();
    }
    c.set_state(edge).unwrap();

    // Link stats past the frame are left out rather than the report lost.
    let many: Vec<(VcKey, VcStats)> =
        (0..3000u32).map(|i| (VcKey { peer: NodeId([9; 8]), vc: VcId(i) }, link_stats(0))).collect();
    let out = report_at(&mut c, t + Duration::from_secs(1), status(many));
    let report = out.sent().into_iter().find(|m| matches!(m, ClientToControl::Report(_))).unwrap();
    assert!(super::encoded_len(report) <= MAX_CONTROL_FRAME);
    assert!(c.counters().links_trimmed > 0);
    assert_eq!(out.report().links.len() as u64 + c.counters().links_trimmed, 3000);
}

#[test]
fn signing_out_unbinds_the_relays_then_says_goodbye_and_stops() {
    let (mut c, t) = signed_in(1);
    c.sign_out(t);
    let out = drain(&mut c);
    assert_eq!(out.commands, vec![NodeCommand::UnbindRelays]);
    assert_eq!(
        out.transmits,
        vec![
            LinkCommand::Send { link: LinkId(1), msg: ClientToControl::SignOut },
            LinkCommand::Finish { link: LinkId(1) }
        ]
    );
    assert!(c.is_stopped() && c.poll_timeout().is_none());
    c.handle_link_down(t, LinkId(1), "closed");
    assert!(drain(&mut c).events.is_empty(), "no loss reported after signing out");
}
