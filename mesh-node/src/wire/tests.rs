//! Every kind round-trips; every truncation, bad field and arbitrary input is a typed error.

use std::net::SocketAddr;

use proptest::prelude::*;
use shoal_protocol::Signature;

use super::*;

fn id(b: u8) -> NodeId {
    NodeId([b; NODE_ID_LEN])
}

fn any_route() -> impl Strategy<Value = Route> {
    proptest::collection::vec(any::<[u8; 8]>(), 0..=MAX_ROUTE)
        .prop_map(|v| Route::new(&v.into_iter().map(NodeId).collect::<Vec<_>>()).unwrap_or_default())
}

/// A valid body for `kind` over `route_len` relays.
fn body_for(kind: Kind, route_len: usize, fill: u8) -> Vec<u8> {
    let mut body = match kind {
        Kind::Data | Kind::Publish => vec![fill; 40],
        Kind::Bundle => bundle_body(&[publish(fill, 40), publish(fill.wrapping_add(1), 3)]),
        Kind::Subscribe => vec![fill; SUBSCRIPTION_LEN],
        Kind::SubscribeAck => {
            let mut b = vec![0; SUBSCRIBE_ACK_BODY_LEN];
            SubscribeAck { status: SubscribeStatus::GroupFull, stream: 7, publisher: id(fill) }.write(&mut b);
            b
        }
        Kind::Probe | Kind::ProbeAck => vec![fill; probe_body_len(route_len)],
        Kind::Notice => {
            let mut b = vec![0; NOTICE_BODY_LEN];
            Notice { code: NoticeCode::BindRefused, refusal: Some(BindRefusal::ForgedPermit) }.write(&mut b);
            b
        }
        Kind::BindRequest => vec![0; BIND_REQUEST_BODY_LEN],
        Kind::BindChallenge => vec![fill; CHALLENGE_BODY_LEN],
        Kind::BindProof => vec![fill; BIND_PROOF_BODY_LEN],
        Kind::BindAck => {
            let mut b = vec![0; BIND_ACK_BODY_LEN];
            BindAck { expires_at: 77, observed: "[2001:db8::1]:9".parse().unwrap() }.write(&mut b);
            b
        }
    };
    body.truncate(body.len());
    body
}

/// A copy as a relay fans it out: a publish that crossed relay 9.
fn publish(source: u8, len: usize) -> Vec<u8> {
    let h = Header { kind: Kind::Publish, source: id(source), destination: id(9), vc: VcId(1), trace: false };
    let mut bytes = emit_vec(&h, &Route::new(&[id(9)]).unwrap(), 0, &vec![source; len]);
    stamp_and_advance(&mut bytes, 0, 0);
    bytes
}

/// A bundle's body holding `copies`.
fn bundle_body(copies: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    for c in copies {
        b.extend_from_slice(&(c.len() as u16).to_be_bytes());
        b.extend_from_slice(c);
    }
    b
}

fn emit_vec(h: &Header, route: &Route, origin: u32, body: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = emit(&mut buf, h, route, origin, body).unwrap();
    buf.truncate(n);
    buf
}

proptest! {
    #[test]
    fn every_kind_round_trips(kind_i in 0usize..Kind::ALL.len(), route in any_route(), src in any::<[u8; 8]>(),
                              dst in any::<[u8; 8]>(), vc in any::<u32>(), origin in any::<u32>(), fill in any::<u8>()) {
        let kind = Kind::ALL[kind_i];
        let optional_trace = matches!(kind, Kind::Data | Kind::Publish);
        let (route, trace) = if kind.is_routed() { (route, !optional_trace || fill % 2 == 0) } else { (Route::DIRECT, false) };
        let h = Header { kind, source: NodeId(src), destination: NodeId(dst), vc: VcId(vc), trace };
        let body = body_for(kind, route.len(), fill);
        let bytes = emit_vec(&h, &route, origin, &body);
        let d = Datagram::parse(&bytes).unwrap();
        prop_assert_eq!(d.kind(), kind);
        prop_assert_eq!((d.source(), d.destination(), d.vc()), (h.source, h.destination, h.vc));
        prop_assert_eq!(d.route(), route);
        prop_assert_eq!(d.hop(), 0);
        prop_assert_eq!(d.traced(), trace);
        prop_assert_eq!(d.trace_origin(), trace.then_some(origin));
        prop_assert_eq!(d.body(), &body[..]);
        match kind {
            Kind::Notice => prop_assert!(Notice::read(d.body()).is_ok()),
            Kind::BindAck => prop_assert_eq!(BindAck::read(d.body()).unwrap().expires_at, 77),
            Kind::BindChallenge => prop_assert_eq!(Challenge::read(d.body()).cookie, [fill; COOKIE_LEN]),
            Kind::BindProof => prop_assert_eq!(BindProof::read(d.body()).permit.len(), TICKET_LEN),
            Kind::SubscribeAck => prop_assert_eq!(
                SubscribeAck::read(d.body()).unwrap(),
                SubscribeAck { status: SubscribeStatus::GroupFull, stream: 7, publisher: id(fill) }
            ),
            _ => {}
        }
        // Truncated at every byte: an error, never a panic.
        for len in 0..bytes.len() {
            let body_free = matches!(kind, Kind::Data | Kind::Publish) && len >= bytes.len() - body.len()
                // A bundle's entries are read (and refused) one by one, after the header.
                || kind == Kind::Bundle && len >= HEADER_LEN + BUNDLE_ENTRY_LEN + HEADER_LEN;
            prop_assert!(Datagram::parse(&bytes[..len]).is_err() || body_free);
        }
    }

    #[test]
    fn stamping_every_hop_fills_the_trace_in_order(route in any_route(), origin in any::<u32>(), step in 1u32..10_000) {
        prop_assume!(!route.is_empty());
        let h = Header { kind: Kind::Data, source: id(1), destination: id(2), vc: VcId(9), trace: true };
        let mut bytes = emit_vec(&h, &route, origin, b"payload");
        let len = bytes.len();
        for i in 0..route.len() {
            stamp_and_advance(&mut bytes, relay_tag(route.relays()[i]), origin.wrapping_add(step * (i as u32 + 1)));
            prop_assert_eq!(bytes.len(), len);
        }
        let d = Datagram::parse(&bytes).unwrap();
        prop_assert_eq!(d.hop(), route.len());
        let slots: Vec<_> = d.trace_slots().collect();
        prop_assert_eq!(slots.len(), route.len());
        for (i, s) in slots.iter().enumerate() {
            prop_assert_eq!(s.tag, relay_tag(route.relays()[i]));
            prop_assert_eq!(s.delta_us, step * (i as u32 + 1));
        }
        prop_assert_eq!(d.body(), b"payload");
    }

    #[test]
    fn an_adopted_copy_names_the_second_relay_and_keeps_the_payload(
        traced in any::<bool>(), origin in any::<u32>(), first in 1u32..10_000, second in 1u32..10_000,
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let (r1, r2) = (id(7), id(8));
        let h = Header { kind: Kind::Publish, source: id(1), destination: r1, vc: VcId(3), trace: traced };
        let mut bytes = emit_vec(&h, &Route::new(&[r1]).unwrap(), origin, &payload);
        let len = bytes.len();
        stamp_and_advance(&mut bytes, relay_tag(r1), origin.wrapping_add(first));
        adopt(&mut bytes, r2, relay_tag(r2), origin.wrapping_add(first + second));
        prop_assert_eq!(bytes.len(), len);
        let d = Datagram::parse(&bytes).unwrap();
        prop_assert_eq!((d.kind(), d.source(), d.destination(), d.vc()), (Kind::Publish, id(1), r2, VcId(3)));
        prop_assert_eq!((d.hop(), d.route()), (1, Route::new(&[r2]).unwrap()));
        let slots: Vec<_> = d.trace_slots().collect();
        let want = if traced { vec![TraceSlot { tag: relay_tag(r2), delta_us: first + second }] } else { vec![] };
        prop_assert_eq!(slots, want);
        prop_assert_eq!(d.body(), &payload[..]);
    }

    #[test]
    fn a_bundle_gives_back_its_copies_in_order_and_a_cut_one_ends_in_an_error(
        lens in proptest::collection::vec(0usize..300, 1..4), cut in 0usize..2000,
    ) {
        let copies: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &n)| publish(i as u8, n)).collect();
        let body = bundle_body(&copies);
        let read: Vec<&[u8]> = bundled(&body).map(Result::unwrap).collect();
        prop_assert_eq!(read, copies.iter().map(Vec::as_slice).collect::<Vec<_>>());
        // Cut anywhere: the whole entries before the cut, then an error unless the cut falls
        // between entries.
        let cut = cut.min(body.len());
        let entries: Vec<_> = bundled(&body[..cut]).collect();
        let whole = entries.iter().filter(|e| e.is_ok()).count();
        prop_assert!(entries.iter().take(whole).all(Result::is_ok));
        prop_assert!(entries.len() <= whole + 1);
        let boundary = (0..=copies.len()).any(|k| bundle_body(&copies[..k]).len() == cut);
        prop_assert_eq!(entries.len() == whole, boundary);
    }

    #[test]
    fn an_unbind_and_its_ack_round_trip(src in any::<[u8; 8]>(), dst in any::<[u8; 8]>(), issued_at in any::<u64>(),
                                       cookie in any::<[u8; COOKIE_LEN]>(), permit in any::<[u8; TICKET_LEN]>(),
                                       sig in proptest::collection::vec(any::<u8>(), SIGNATURE_LEN), port in any::<u16>()) {
        let challenge = Challenge { issued_at, cookie };
        let signature = Signature(sig.try_into().unwrap());
        let mut body = [0; BIND_PROOF_BODY_LEN];
        BindProof::write(&challenge, &permit, &signature, &mut body);
        let h = Header { kind: Kind::BindProof, source: NodeId(src), destination: NodeId(dst), vc: VcId(0), trace: false };
        let mut bytes = emit_vec(&h, &Route::DIRECT, 0, &body);
        set_unbind(&mut bytes);
        let d = Datagram::parse(&bytes).unwrap();
        prop_assert!(d.unbind());
        prop_assert_eq!((d.kind(), d.source(), d.destination()), (Kind::BindProof, NodeId(src), NodeId(dst)));
        let p = BindProof::read(d.body());
        prop_assert_eq!(p.challenge, challenge);
        prop_assert_eq!(p.permit, &permit[..]);
        prop_assert_eq!(p.signature, signature);
        // Truncated at every byte: an error, never a panic.
        for len in 0..bytes.len() {
            prop_assert!(Datagram::parse(&bytes[..len]).is_err());
        }
        // Its ack: smaller, and flagged.
        let mut ack_body = [0; BIND_ACK_BODY_LEN];
        let observed = SocketAddr::from(([192, 0, 2, 7], port));
        BindAck { expires_at: 0, observed }.write(&mut ack_body);
        let h = Header { kind: Kind::BindAck, source: NodeId(dst), destination: NodeId(src), vc: VcId(0), trace: false };
        let mut ack = emit_vec(&h, &Route::DIRECT, 0, &ack_body);
        set_unbind(&mut ack);
        prop_assert!(ack.len() < bytes.len());
        let d = Datagram::parse(&ack).unwrap();
        prop_assert!(d.unbind());
        prop_assert_eq!(BindAck::read(d.body()).unwrap(), BindAck { expires_at: 0, observed });
        for len in 0..ack.len() {
            prop_assert!(Datagram::parse(&ack[..len]).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        if let Ok(d) = Datagram::parse(&bytes) {
            let _ = (d.route(), d.trace_slots().count(), d.body().len());
            prop_assert!(d.route_len() <= MAX_ROUTE && d.hop() <= d.route_len());
        }
    }
}

fn data(route: &Route, trace: bool) -> Vec<u8> {
    let h = Header { kind: Kind::Data, source: id(1), destination: id(2), vc: VcId(1), trace };
    emit_vec(&h, route, 5, b"x")
}

#[test]
fn each_malformation_has_its_own_error() {
    let route = Route::new(&[id(10), id(11)]).unwrap();
    let good = data(&route, true);
    let mut b = good.clone();
    b[0] = 2;
    assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::UnsupportedVersion(2));
    let mut b = good.clone();
    b[1] = 99;
    assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::UnknownKind(99));
    let mut b = good.clone();
    b[2] |= 0x80;
    assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::UnknownFlags(0x81));
    let mut b = good.clone();
    b[3] = 0x23; // hop 3 on a route of 2
    assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::HopPastRoute { hop: 3, route_len: 2 });
    let mut b = good.clone();
    b[3] = 0x50; // a route of 5 relays
    assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::RouteTooLong(5));
    assert!(matches!(Datagram::parse(&good[..30]), Err(ParseError::Truncated { .. })));
    assert_eq!(Datagram::parse(&vec![0; MAX_DATAGRAM + 1]).unwrap_err(), ParseError::Oversized(MAX_DATAGRAM + 1));
    // A probe must be traced; bind kinds carry no route.
    let h = Header { kind: Kind::Probe, source: id(1), destination: id(2), vc: VcId(0), trace: false };
    let b = emit_vec(&h, &route, 0, &[0; 64]);
    assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::BadShape(Kind::Probe));
    let h = Header { kind: Kind::BindRequest, source: id(1), destination: id(2), vc: VcId(0), trace: false };
    let mut buf = [0; 100];
    assert_eq!(emit(&mut buf, &h, &route, 0, &[0; 24]), Err(EmitError::Shape(Kind::BindRequest)));
    let b = emit_vec(&h, &Route::DIRECT, 0, &[0; 10]);
    assert!(matches!(Datagram::parse(&b), Err(ParseError::ShortBody { kind: Kind::BindRequest, .. })));
    assert!(Route::new(&[id(1); 5]).is_none());
    // The unbind flag belongs to bind proofs and acks and to subscribes (a leave) only;
    // set_unbind leaves others be.
    for kind in Kind::ALL.into_iter().filter(|k| !matches!(k, Kind::BindProof | Kind::BindAck | Kind::Subscribe)) {
        let route = if kind.is_routed() { Route::new(&[id(10)]).unwrap() } else { Route::DIRECT };
        let h = Header { kind, source: id(1), destination: id(2), vc: VcId(0), trace: kind.is_routed() };
        let mut b = emit_vec(&h, &route, 0, &body_for(kind, route.len(), 0));
        set_unbind(&mut b);
        assert!(!Datagram::parse(&b).unwrap().unbind(), "{kind:?}");
        b[2] |= 0b10;
        assert_eq!(Datagram::parse(&b).unwrap_err(), ParseError::BadShape(kind));
    }
}

#[test]
fn replies_are_never_larger_than_what_provokes_them() {
    for route_len in 0..=MAX_ROUTE {
        let trace = TRACE_ORIGIN_LEN + route_len * TRACE_SLOT_LEN;
        let probe = HEADER_LEN + route_len * ROUTE_ENTRY_LEN + trace + probe_body_len(route_len);
        let ack = HEADER_LEN + route_len * ROUTE_ENTRY_LEN + trace + PROBE_ID_LEN + trace;
        assert!(ack <= probe);
    }
}
