//! The router's bind handshake, unbinds, rate limits and idle expiry.

use shoal_protocol::{SignedTicket, TicketBody, TicketKind, UnixTime};

use super::*;
use crate::bind::BindClient;
use crate::wire::{BindAck, BindRefusal};

const T0: u64 = 1_800_000_000;

fn setup(max_bindings: usize, binds_per_sec: f64) -> (Router, Identity, Instant, WallClock) {
    let control = Identity::from_seed([1; 32]);
    let me = Identity::from_seed([2; 32]);
    let lots = Rate { per_sec: 1e6, burst: 1e6 };
    let now = Instant::now();
    let clock = WallClock::new(now, T0 * 1_000_000);
    let cfg = RouterConfig {
        permit: Some(
            TicketBody::new(TicketKind::RelayPermit, me.public_key(), Roles::RELAY, UnixTime(T0), 60).sign(&control),
        ),
        identity: me,
        control_key: control.public_key(),
        source_packets: lots,
        source_bytes: lots,
        bind_verifications: Rate { per_sec: binds_per_sec, burst: binds_per_sec },
        notices: lots,
        max_bindings,
        cookie_secret: [3; 32],
        fanout: crate::fanout::FanoutConfig::default(),
    };
    (Router::new(cfg, clock, now), control, now, clock)
}

fn permit_for(control: &Identity, node: &Identity, kind: TicketKind) -> SignedTicket {
    TicketBody::new(kind, node.public_key(), Roles::CLIENT, UnixTime(T0), 60).sign(control)
}

/// Runs request → challenge for `node` from `addr`, and returns the proof bytes.
fn proof(
    r: &mut Router,
    now: Instant,
    clock: &WallClock,
    node: &Identity,
    permit: &SignedTicket,
    addr: SocketAddr,
) -> Vec<u8> {
    let relay_addr = SocketAddr::from(([127, 0, 0, 1], 7000));
    let mut c = BindClient::new(relay_addr, now);
    let mut req = c.handle_timeout(now, node, permit).unwrap().bytes;
    let req_len = req.len();
    let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut req) else { panic!("no challenge") };
    assert!(n <= req_len, "challenge larger than the request");
    let challenge = Datagram::parse(&req[..n]).unwrap();
    c.handle_datagram(now, clock, &challenge, node, permit).unwrap().bytes
}

fn refusal(v: Verdict, r: &Router, want: BindRefusal) {
    assert!(matches!(v, Verdict::DropWithNotice(DropReason::BindRefused, _)), "{v:?}");
    assert_eq!(r.counters().bind_refusals(want), 1, "{want:?}");
}

#[test]
fn a_valid_proof_binds_and_the_ack_is_smaller() {
    let (mut r, control, now, clock) = setup(8, 100.0);
    let node = Identity::from_seed([10; 32]);
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let mut p = proof(&mut r, now, &clock, &node, &permit_for(&control, &node, TicketKind::RelayPermit), addr);
    let len = p.len();
    let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut p) else { panic!() };
    assert!(n < len);
    let ack = BindAck::read(Datagram::parse(&p[..n]).unwrap().body()).unwrap();
    assert_eq!(ack.observed, addr);
    assert_eq!(r.lookup(node.node_id()), Some(addr));
}

#[test]
fn every_bad_proof_is_refused_for_its_own_reason() {
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let node = Identity::from_seed([10; 32]);

    // The cookie was issued to another address.
    let (mut r, control, now, clock) = setup(8, 100.0);
    let good = permit_for(&control, &node, TicketKind::RelayPermit);
    let mut p = proof(&mut r, now, &clock, &node, &good, SocketAddr::from(([127, 0, 0, 1], 5001)));
    let v = r.handle_datagram(now, addr, &mut p);
    refusal(v, &r, BindRefusal::BadCookie);

    // The cookie is older than its lifetime.
    let (mut r, _, now, clock) = setup(8, 100.0);
    let mut p = proof(&mut r, now, &clock, &node, &good, addr);
    let v = r.handle_datagram(now + Duration::from_secs(COOKIE_LIFETIME_SECS + 2), addr, &mut p);
    refusal(v, &r, BindRefusal::BadCookie);

    // Signed by a key other than the permit's.
    let (mut r, _, now, clock) = setup(8, 100.0);
    let mut p = proof(&mut r, now, &clock, &node, &good, addr);
    let last = p.len() - 1;
    p[last] ^= 1;
    let v = r.handle_datagram(now, addr, &mut p);
    refusal(v, &r, BindRefusal::BadProof);

    // A permit for someone else, presented by `node`.
    let (mut r, _, now, clock) = setup(8, 100.0);
    let other = permit_for(&control, &Identity::from_seed([11; 32]), TicketKind::RelayPermit);
    let mut p = proof(&mut r, now, &clock, &node, &other, addr);
    let v = r.handle_datagram(now, addr, &mut p);
    refusal(v, &r, BindRefusal::WrongNode);

    // A session ticket is not a relay permit.
    let (mut r, _, now, clock) = setup(8, 100.0);
    let session = permit_for(&control, &node, TicketKind::Session);
    let mut p = proof(&mut r, now, &clock, &node, &session, addr);
    let v = r.handle_datagram(now, addr, &mut p);
    refusal(v, &r, BindRefusal::WrongRole);

    // A forged permit.
    let (mut r, _, now, clock) = setup(8, 100.0);
    let forged = permit_for(&Identity::from_seed([99; 32]), &node, TicketKind::RelayPermit);
    let mut p = proof(&mut r, now, &clock, &node, &forged, addr);
    let v = r.handle_datagram(now, addr, &mut p);
    refusal(v, &r, BindRefusal::ForgedPermit);
}

#[test]
fn a_full_table_and_a_spent_budget_refuse_new_binds() {
    let (mut r, control, now, clock) = setup(1, 100.0);
    for (i, seed) in [20u8, 21].into_iter().enumerate() {
        let node = Identity::from_seed([seed; 32]);
        let addr = SocketAddr::from(([127, 0, 0, 1], 6000 + i as u16));
        let mut p = proof(&mut r, now, &clock, &node, &permit_for(&control, &node, TicketKind::RelayPermit), addr);
        let v = r.handle_datagram(now, addr, &mut p);
        if i == 0 {
            assert!(matches!(v, Verdict::Reply(_)));
        } else {
            refusal(v, &r, BindRefusal::Full);
        }
    }

    let (mut r, control, now, clock) = setup(8, 1.0);
    let mut verdicts = Vec::new();
    for seed in [30u8, 31] {
        let node = Identity::from_seed([seed; 32]);
        let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(seed)));
        let mut p = proof(&mut r, now, &clock, &node, &permit_for(&control, &node, TicketKind::RelayPermit), addr);
        verdicts.push(r.handle_datagram(now, addr, &mut p));
    }
    assert!(matches!(verdicts[0], Verdict::Reply(_)));
    assert_eq!(verdicts[1], Verdict::Drop(DropReason::BindRateLimited));
}

#[test]
fn a_peer_relay_naming_endless_sources_cannot_grow_the_rate_limit_table() {
    let (mut r, _, now, clock) = setup(2, 100.0);
    let me = r.id();
    let (peer, peer_addr) = (Identity::from_seed([40; 32]).node_id(), SocketAddr::from(([127, 0, 0, 1], 8000)));
    let (client, client_addr) = (Identity::from_seed([41; 32]).node_id(), SocketAddr::from(([127, 0, 0, 1], 8001)));
    let until = clock.unix_secs(now) + 60;
    r.apply_binding(now, peer, Roles::RELAY, peer_addr, until, 0);
    r.apply_binding(now, client, Roles::CLIENT, client_addr, until, 0);
    let route = Route::new(&[peer, me]).unwrap();
    let cap = 2 * SOURCES_PER_BINDING;
    let sources = 100u64;
    for i in 0..sources {
        let h = Header {
            kind: Kind::Data,
            source: NodeId(i.to_be_bytes()),
            destination: client,
            vc: VcId(1),
            trace: false,
        };
        let mut buf = vec![0; 64];
        let n = wire::emit(&mut buf, &h, &route, 0, b"avatar").unwrap();
        buf.truncate(n);
        // As the peer relay sent it: its own hop done.
        wire::stamp_and_advance(&mut buf, 0, 0);
        assert_eq!(r.handle_datagram(now, peer_addr, &mut buf), Verdict::Forward(client_addr));
    }
    // Each source up to the cap has its own limit; the rest share the peer relay's.
    assert_eq!(r.rate_limited_sources(), cap + 1);
    assert_eq!(r.counters().sources_over_cap, sources - cap as u64);
    assert_eq!(r.counters().forwarded_packets, sources);
}

/// Runs the whole handshake for `node` from `addr`; returns the bound client.
fn bound_client(
    r: &mut Router,
    now: Instant,
    clock: &WallClock,
    node: &Identity,
    permit: &SignedTicket,
    addr: SocketAddr,
) -> BindClient {
    let mut c = BindClient::new(SocketAddr::from(([127, 0, 0, 1], 7000)), now);
    let mut out = c.handle_timeout(now, node, permit).unwrap().bytes;
    loop {
        let v = r.handle_datagram(now, addr, &mut out);
        let Verdict::Reply(n) = v else { panic!("{v:?}") };
        let reply = out[..n].to_vec();
        match c.handle_datagram(now, clock, &Datagram::parse(&reply).unwrap(), node, permit) {
            Some(t) => out = t.bytes,
            None => break,
        }
    }
    assert!(c.is_bound());
    c
}

fn long_permit(control: &Identity, node: &Identity) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), Roles::CLIENT, UnixTime(T0), 3600).sign(control)
}

#[test]
fn a_node_unbinds_with_its_key_and_the_ack_is_smaller() {
    let (mut r, control, now, clock) = setup(8, 100.0);
    let node = Identity::from_seed([10; 32]);
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let permit = permit_for(&control, &node, TicketKind::RelayPermit);
    let c = bound_client(&mut r, now, &clock, &node, &permit, addr);
    while r.poll_event().is_some() {}
    let mut unbind = c.unbind(&node, &permit).unwrap().bytes;
    let len = unbind.len();
    let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut unbind) else { panic!() };
    assert!(n < len, "an ack of {n} bytes to an unbind of {len}");
    let ack = Datagram::parse(&unbind[..n]).unwrap();
    assert!(ack.kind() == Kind::BindAck && ack.unbind());
    assert_eq!(r.lookup(node.node_id()), None);
    assert_eq!((r.bindings(), r.counters().unbinds), (0, 1));
    let ev = r.poll_event();
    assert!(matches!(ev, Some(RouterEvent::Unbound { node: n, addr: a, .. }) if n == node.node_id() && a == addr));
}

#[test]
fn unbinds_not_from_the_bound_node_are_refused_counted_and_unanswered() {
    let (mut r, control, now, clock) = setup(8, 100.0);
    let node = Identity::from_seed([10; 32]);
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let permit = permit_for(&control, &node, TicketKind::RelayPermit);
    let c = bound_client(&mut r, now, &clock, &node, &permit, addr);
    let unbind = c.unbind(&node, &permit).unwrap().bytes;
    let refused = |r: &mut Router, from: SocketAddr, mut bytes: Vec<u8>, why: UnbindRefusal| {
        let before = r.counters().unbind_refusals(why);
        assert_eq!(r.handle_datagram(now, from, &mut bytes), Verdict::Drop(DropReason::UnbindRefused), "{why:?}");
        assert_eq!(r.counters().unbind_refusals(why), before + 1, "{why:?}");
        assert_eq!(r.lookup(node.node_id()), Some(addr), "{why:?} unbound the node");
    };
    // A third party spoofing another address, or the node's own with another node's id.
    refused(&mut r, SocketAddr::from(([127, 0, 0, 1], 5001)), unbind.clone(), UnbindRefusal::NotBound);
    let other = Identity::from_seed([11; 32]);
    let mut theirs = unbind.clone();
    theirs[4..12].copy_from_slice(&other.node_id().0);
    refused(&mut r, addr, theirs, UnbindRefusal::NotBound);
    // A signature that is not the node's.
    let mut forged = unbind.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    refused(&mut r, addr, forged, UnbindRefusal::BadProof);
    // The node's own bind proof with the flag set: signed for binding, not unbinding.
    let mut c2 = BindClient::new(SocketAddr::from(([127, 0, 0, 1], 7000)), now);
    let mut req = c2.handle_timeout(now, &node, &permit).unwrap().bytes;
    let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut req) else { panic!() };
    let challenge = Datagram::parse(&req[..n]).unwrap();
    let mut proof = c2.handle_datagram(now, &clock, &challenge, &node, &permit).unwrap().bytes;
    wire::set_unbind(&mut proof);
    refused(&mut r, addr, proof, UnbindRefusal::BadProof);
    // A permit that is not the control key's.
    let forged_permit = permit_for(&Identity::from_seed([99; 32]), &node, TicketKind::RelayPermit);
    refused(&mut r, addr, c.unbind(&node, &forged_permit).unwrap().bytes, UnbindRefusal::BadPermit);
    // After the node binds again, its old unbind is stale: a replay cannot undo the new
    // binding.
    let later = now + Duration::from_secs(2);
    let c3 = bound_client(&mut r, later, &clock, &node, &permit, addr);
    let mut old = unbind.clone();
    assert_eq!(r.handle_datagram(later, addr, &mut old), Verdict::Drop(DropReason::UnbindRefused));
    assert_eq!(r.counters().unbind_refusals(UnbindRefusal::StaleChallenge), 1);
    assert_eq!(r.lookup(node.node_id()), Some(addr));
    // The fresh one works; a second copy of it finds nothing to unbind.
    let fresh = c3.unbind(&node, &permit).unwrap().bytes;
    assert!(matches!(r.handle_datagram(later, addr, &mut fresh.clone()), Verdict::Reply(_)));
    assert_eq!(r.handle_datagram(later, addr, &mut fresh.clone()), Verdict::Drop(DropReason::UnbindRefused));
    assert_eq!(r.counters().unbind_refusals(UnbindRefusal::NotBound), 3);
    assert_eq!(r.counters().unbinds, 1);
    assert_eq!(r.counters().notices_sent, 0, "refused unbinds are not answered");
}

#[test]
fn a_binding_that_hears_nothing_expires_and_one_that_hears_stays() {
    let (mut r, _, now, clock) = setup(8, 100.0);
    let me = r.id();
    let until = clock.unix_secs(now) + 3600;
    let (talker, quiet) = (Identity::from_seed([20; 32]).node_id(), Identity::from_seed([21; 32]).node_id());
    let (talker_addr, quiet_addr) =
        (SocketAddr::from(([127, 0, 0, 1], 6000)), SocketAddr::from(([127, 0, 0, 1], 6001)));
    r.apply_binding(now, talker, Roles::CLIENT, talker_addr, until, 0);
    r.apply_binding(now, quiet, Roles::CLIENT, quiet_addr, until, 0);
    let h = Header { kind: Kind::Data, source: talker, destination: quiet, vc: VcId(1), trace: false };
    let mut t = now;
    while t < now + IDLE_EXPIRY + Duration::from_secs(2) {
        // The talker sends a datagram every minute; the quiet one sends nothing.
        let mut buf = vec![0; 64];
        let n = wire::emit(&mut buf, &h, &Route::new(&[me]).unwrap(), 0, b"x").unwrap();
        buf.truncate(n);
        let _ = r.handle_datagram(t, talker_addr, &mut buf);
        t += Duration::from_secs(60);
        r.handle_timeout(t);
    }
    assert_eq!(r.lookup(quiet), None);
    assert_eq!(r.lookup(talker), Some(talker_addr));
    assert_eq!(r.counters().idle_expired, 1);
    // A bind is hearing too: the talker, silent from now on but binding again, stays.
    let mut k = t;
    while k < t + IDLE_EXPIRY * 2 {
        r.apply_binding(k, talker, Roles::CLIENT, talker_addr, until, 1);
        k += crate::bind::KEEPALIVE_MAX;
        r.handle_timeout(k);
    }
    assert_eq!(r.lookup(talker), Some(talker_addr));
    assert_eq!(r.counters().idle_expired, 1);
}

#[test]
fn another_workers_unbinding_drops_only_the_binding_it_released() {
    let (mut r, _, now, clock) = setup(8, 100.0);
    let until = clock.unix_secs(now) + 3600;
    let node = Identity::from_seed([20; 32]).node_id();
    let addr = SocketAddr::from(([127, 0, 0, 1], 6000));
    r.apply_binding(now, node, Roles::CLIENT, addr, until, 7);
    // Released at its earlier bind: the node has bound again since.
    r.apply_unbinding(node, addr, 6);
    assert_eq!(r.lookup(node), Some(addr));
    r.apply_unbinding(node, addr, 7);
    assert_eq!((r.lookup(node), r.bindings()), (None, 0));
}

#[test]
fn a_bound_client_binds_again_within_the_longest_keepalive_however_much_it_sends() {
    let (mut r, control, now, clock) = setup(8, 100.0);
    let node = Identity::from_seed([10; 32]);
    let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
    let permit = long_permit(&control, &node);
    let mut c = bound_client(&mut r, now, &clock, &node, &permit, addr);
    // Data every second defers the keepalive, but never past KEEPALIVE_MAX since the ack.
    for s in 1..200 {
        c.on_sent(now + Duration::from_secs(s));
        assert!(c.poll_timeout() <= now + crate::bind::KEEPALIVE_MAX, "at {s} s: {:?}", c.poll_timeout() - now);
    }
    // The ack of an unbind is not the answer to a bind: the client stays as it was.
    let mut unbind = c.unbind(&node, &permit).unwrap().bytes;
    let Verdict::Reply(n) = r.handle_datagram(now, addr, &mut unbind) else { panic!() };
    let ack = Datagram::parse(&unbind[..n]).unwrap();
    assert_eq!(c.handle_datagram(now, &clock, &ack, &node, &permit), None);
    assert!(c.is_bound());
    // Not bound, nothing to unbind.
    assert!(BindClient::new(addr, now).unbind(&node, &permit).is_none());
}
