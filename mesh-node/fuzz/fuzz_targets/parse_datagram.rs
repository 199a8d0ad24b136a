//! Arbitrary bytes into `wire::Datagram::parse`. Whatever parses must be safe to read through
//! every accessor and body reader, must satisfy the layout invariants, must survive a
//! re-emit/re-parse round trip, and (when a hop is left) must still parse after a relay stamps
//! it in place.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_mesh::wire::{
    self, BindAck, BindProof, Challenge, Datagram, Header, Kind, Notice, ParseError, Route, TraceSlot,
};
use shoal_protocol::SignedTicket;

/// Relay tag and clock used for the stamp check.
const TAG: u32 = 0x5eed_f00d;
const NOW_US: u32 = 0x1234_5678;

fuzz_target!(|data: &[u8]| {
    let d = match Datagram::parse(data) {
        Ok(d) => d,
        Err(e) => {
            check_error(data, e);
            return;
        }
    };
    check_datagram(data, &d);
    check_body(&d);
    check_reemit(&d);
    check_stamp(data, &d);
});

fn check_error(data: &[u8], e: ParseError) {
    // Error display must not panic either.
    let _ = e.to_string();
    if data.len() < wire::HEADER_LEN {
        assert!(matches!(e, ParseError::Truncated { .. }), "short input gave {e:?}");
    }
    if data.len() > wire::MAX_DATAGRAM {
        assert!(matches!(e, ParseError::Oversized(_)), "long input gave {e:?}");
    }
}

/// Offset of the body for a datagram of this shape (the specification in `docs/protocol.md`).
fn expected_body_at(route_len: usize, traced: bool) -> usize {
    let trace = if traced { wire::TRACE_ORIGIN_LEN + route_len * wire::TRACE_SLOT_LEN } else { 0 };
    wire::HEADER_LEN + route_len * wire::ROUTE_ENTRY_LEN + trace
}

fn check_datagram(data: &[u8], d: &Datagram<'_>) {
    assert!(data.len() >= wire::HEADER_LEN && data.len() <= wire::MAX_DATAGRAM);
    assert_eq!(d.as_bytes(), data);
    assert_eq!(data[0], wire::VERSION);
    let kind = d.kind();
    assert_eq!(kind as u8, data[1]);
    let traced = d.traced();
    let (route_len, hop) = (d.route_len(), d.hop());
    assert!(route_len <= wire::MAX_ROUTE, "route_len {route_len}");
    assert!(hop <= route_len, "hop {hop} > route_len {route_len}");

    // Shape rules.
    if !kind.is_routed() {
        assert_eq!(route_len, 0, "{kind:?} with a route");
        assert!(!traced, "{kind:?} with a trace");
    }
    if matches!(kind, Kind::Probe | Kind::ProbeAck) {
        assert!(traced, "{kind:?} without a trace");
    }
    assert_eq!(d.unbind(), data[2] & 0b10 != 0);
    if d.unbind() {
        assert!(matches!(kind, Kind::BindProof | Kind::BindAck | Kind::Subscribe), "{kind:?} with the unbind flag");
    }

    // Header fields at their fixed offsets.
    assert_eq!(d.source().0[..], data[4..12]);
    assert_eq!(d.destination().0[..], data[12..20]);
    assert_eq!(d.vc().0, u32::from_be_bytes([data[20], data[21], data[22], data[23]]));

    // Route.
    let route = d.route();
    assert_eq!(route.len(), route_len);
    assert_eq!(route.is_empty(), route_len == 0);
    assert_eq!(route.relays().len(), route_len);
    for i in 0..route_len {
        assert_eq!(route.relays()[i], d.route_at(i));
        let at = wire::HEADER_LEN + i * wire::ROUTE_ENTRY_LEN;
        assert_eq!(d.route_at(i).0[..], data[at..at + wire::ROUTE_ENTRY_LEN]);
    }
    let rev = route.reversed();
    assert_eq!(rev.len(), route_len);
    assert!(rev.relays().iter().eq(route.relays().iter().rev()));
    assert_eq!(Route::new(route.relays()), Some(route));
    let _ = format!("{route:?}");

    // Trace.
    assert_eq!(d.trace_origin().is_some(), traced);
    let slots: Vec<TraceSlot> = d.trace_slots().collect();
    assert_eq!(slots.len(), if traced { hop } else { 0 }, "trace slots vs hop {hop}");

    // Body.
    let body_at = expected_body_at(route_len, traced);
    assert!(body_at <= data.len());
    assert_eq!(d.body(), &data[body_at..]);
    let min_body = match kind {
        Kind::Data | Kind::Publish => 0,
        Kind::Subscribe => shoal_protocol::subscription::SUBSCRIPTION_LEN,
        Kind::SubscribeAck => wire::SUBSCRIBE_ACK_BODY_LEN,
        // A probe carries room for the ack's echo of its trace, so the ack is never larger.
        Kind::Probe | Kind::ProbeAck => wire::probe_body_len(route_len),
        Kind::Notice => wire::NOTICE_BODY_LEN,
        Kind::BindRequest => wire::BIND_REQUEST_BODY_LEN,
        Kind::BindChallenge => wire::CHALLENGE_BODY_LEN,
        Kind::BindProof => wire::BIND_PROOF_BODY_LEN,
        Kind::BindAck => wire::BIND_ACK_BODY_LEN,
    };
    assert!(d.body().len() >= min_body, "{kind:?} body {} < {min_body}", d.body().len());
    let _ = format!("{d:?}");
}

fn check_body(d: &Datagram<'_>) {
    let body = d.body();
    match d.kind() {
        Kind::Data | Kind::Publish => {}
        Kind::Subscribe => {
            // Untrusted bytes: decoding and verifying must not panic, and what decodes encodes
            // back to the same bytes.
            if let Ok(s) = shoal_protocol::SignedSubscription::decode(body) {
                assert_eq!(s.encode()[..], body[..shoal_protocol::subscription::SUBSCRIPTION_LEN]);
                let key = shoal_protocol::Identity::from_seed([1; 32]).public_key();
                let _ = s.verify(&key, s.body.relay, s.body.subscriber, shoal_protocol::UnixTime(0));
            }
        }
        Kind::SubscribeAck => {
            if let Ok(a) = wire::SubscribeAck::read(body) {
                let mut out = [0; wire::SUBSCRIBE_ACK_BODY_LEN];
                a.write(&mut out);
                assert_eq!(wire::SubscribeAck::read(&out), Ok(a));
            }
        }
        Kind::Probe => {
            let _ = wire::probe_id(body);
        }
        Kind::ProbeAck => {
            let _ = wire::probe_id(body);
            let (origin, slots) = wire::echoed_trace(d);
            assert_eq!(origin.to_be_bytes()[..], body[wire::PROBE_ID_LEN..wire::PROBE_ID_LEN + 4]);
            assert_eq!(slots.count(), d.route_len());
        }
        Kind::Notice => {
            if let Ok(n) = Notice::read(body) {
                let mut out = [0; wire::NOTICE_BODY_LEN];
                n.write(&mut out);
                assert_eq!(Notice::read(&out), Ok(n));
                assert_eq!(out[..2], body[..2]);
            }
        }
        Kind::BindRequest => {}
        Kind::BindChallenge => {
            let c = Challenge::read(body);
            let mut out = [0; wire::CHALLENGE_BODY_LEN];
            c.write(&mut out);
            assert_eq!(out[..], body[..wire::CHALLENGE_BODY_LEN]);
            assert_eq!(Challenge::read(&out), c);
        }
        Kind::BindProof => {
            let p = BindProof::read(body);
            assert_eq!(p.permit.len(), shoal_protocol::ticket::TICKET_LEN);
            // The permit is untrusted bytes too: decoding must not panic.
            if let Ok(t) = SignedTicket::decode(p.permit) {
                let _ = t.encode();
            }
            let _ = wire::bind_proof_message(d.destination(), &p.challenge);
        }
        Kind::BindAck => {
            if let Ok(a) = BindAck::read(body) {
                let mut out = [0; wire::BIND_ACK_BODY_LEN];
                a.write(&mut out);
                assert_eq!(BindAck::read(&out), Ok(a));
            }
        }
    }
}

/// Emitting the parsed header, route, origin stamp and body again (at hop 0, trace slots
/// zeroed) yields a datagram of the same length that parses to the same fields.
fn check_reemit(d: &Datagram<'_>) {
    let h = Header { kind: d.kind(), source: d.source(), destination: d.destination(), vc: d.vc(), trace: d.traced() };
    let route = d.route();
    let origin = d.trace_origin().unwrap_or(0);
    let mut buf = vec![0u8; wire::MAX_DATAGRAM];
    let n = match wire::emit(&mut buf, &h, &route, origin, d.body()) {
        Ok(n) => n,
        Err(e) => panic!("re-emit of a parsed {:?} failed: {e}", d.kind()),
    };
    assert_eq!(n, d.as_bytes().len(), "re-emitted length");
    if d.unbind() {
        wire::set_unbind(&mut buf[..n]);
    }
    let e = match Datagram::parse(&buf[..n]) {
        Ok(e) => e,
        Err(err) => panic!("re-emitted {:?} does not parse: {err}", d.kind()),
    };
    assert_eq!(e.kind(), d.kind());
    assert_eq!(e.source(), d.source());
    assert_eq!(e.destination(), d.destination());
    assert_eq!(e.vc(), d.vc());
    assert_eq!(e.traced(), d.traced());
    assert_eq!(e.unbind(), d.unbind());
    assert_eq!(e.route(), route);
    assert_eq!(e.route_len(), d.route_len());
    assert_eq!(e.hop(), 0);
    assert_eq!(e.trace_origin(), d.trace_origin());
    assert_eq!(e.trace_slots().count(), 0);
    assert_eq!(e.body(), d.body());
}

/// A relay stamping the current hop: the result parses with `hop + 1`, the new slot holds the
/// relay's tag and its delta from the origin stamp, and nothing else moves.
fn check_stamp(data: &[u8], d: &Datagram<'_>) {
    let (hop, route_len) = (d.hop(), d.route_len());
    if hop >= route_len {
        return;
    }
    let mut buf = data.to_vec();
    wire::stamp_and_advance(&mut buf, TAG, NOW_US);
    assert_eq!(buf.len(), data.len());
    let s = match Datagram::parse(&buf) {
        Ok(s) => s,
        Err(e) => panic!("stamped datagram does not parse: {e}"),
    };
    assert_eq!(s.hop(), hop + 1);
    assert_eq!(s.kind(), d.kind());
    assert_eq!(s.route_len(), route_len);
    assert_eq!(s.route(), d.route());
    assert_eq!(s.source(), d.source());
    assert_eq!(s.destination(), d.destination());
    assert_eq!(s.vc(), d.vc());
    assert_eq!(s.trace_origin(), d.trace_origin());
    assert_eq!(s.body(), d.body());
    let before: Vec<TraceSlot> = d.trace_slots().collect();
    let after: Vec<TraceSlot> = s.trace_slots().collect();
    if let Some(origin) = d.trace_origin() {
        assert_eq!(after.len(), hop + 1);
        assert_eq!(after[..hop], before[..]);
        assert_eq!(after[hop], TraceSlot { tag: TAG, delta_us: NOW_US.wrapping_sub(origin) });
        // Only the hop nibble and the stamped slot change.
        let slot_at =
            wire::HEADER_LEN + route_len * wire::ROUTE_ENTRY_LEN + wire::TRACE_ORIGIN_LEN + hop * wire::TRACE_SLOT_LEN;
        for (i, (a, b)) in data.iter().zip(&buf).enumerate() {
            if i != 3 && !(slot_at..slot_at + wire::TRACE_SLOT_LEN).contains(&i) {
                assert_eq!(a, b, "byte {i} changed by stamping");
            }
        }
    } else {
        assert!(after.is_empty());
        for (i, (a, b)) in data.iter().zip(&buf).enumerate() {
            if i != 3 {
                assert_eq!(a, b, "byte {i} changed by stamping an untraced datagram");
            }
        }
    }
}
