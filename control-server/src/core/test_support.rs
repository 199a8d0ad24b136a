//! What the core's tests share: a configured core, signed-in players, registered relays.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Instant;

use shoal_protocol::control::{
    ClientToControl, ControlToClient, KeyProof, RELAY_ACCOUNT, RelayInfo, RelayToControl, Report,
};
use shoal_protocol::profile::ProfileConfig;
use shoal_protocol::{Identity, NodeId, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

use super::{ConnId, Core, CoreConfig, Output};

pub(super) const FP: [u8; 32] = [7; 32];
pub(super) const T0: u64 = 1_800_000_000;

pub(super) fn core() -> Core {
    let cfg = CoreConfig {
        relays: vec![
            RelayInfo { id: NodeId([1; 8]), addr: "198.51.100.1:7000".parse().unwrap(), rtt_us: 0 },
            RelayInfo { id: NodeId([2; 8]), addr: "198.51.100.2:7000".parse().unwrap(), rtt_us: 0 },
        ],
        profiles: vec![(1, ProfileConfig::Voice)],
        ..CoreConfig::default()
    };
    Core::new(cfg, Identity::from_seed([99; 32]), FP).unwrap()
}

pub(super) fn proof(id: &Identity, account: &str, unix_ms: u64) -> KeyProof {
    KeyProof::new(id, account, unix_ms, &FP)
}

pub(super) fn outputs(c: &mut Core) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

/// Connects and signs `seed`'s identity in as `account`; returns its connection.
pub(super) fn sign_in(c: &mut Core, now: Instant, conn: ConnId, seed: u8, account: &str) -> Identity {
    let id = Identity::from_seed([seed; 32]);
    c.on_connected(now, conn, format!("203.0.113.{seed}:5000").parse().unwrap());
    let msg = ClientToControl::SignIn {
        account: account.into(),
        password: "pw".into(),
        proof: proof(&id, account, T0 * 1000),
    };
    c.on_message(now, UnixTime(T0), conn, msg);
    let out = outputs(c);
    assert!(matches!(&out[..], [Output::Verify { conn: x, .. }] if *x == conn), "{out:?}");
    c.on_verdict(UnixTime(T0), conn, Some(account.into()));
    let out = outputs(c);
    let [Output::Send(_, ControlToClient::Welcome { session, permit, .. })] = &out[..] else { panic!("{out:?}") };
    let s = SignedTicket::decode(session).unwrap();
    s.verify(&c.public_key(), TicketKind::Session, Roles::CLIENT, UnixTime(T0)).unwrap();
    let p = SignedTicket::decode(permit).unwrap();
    assert_eq!(p.body.node_id, id.node_id());
    p.verify(&c.public_key(), TicketKind::RelayPermit, Roles::CLIENT, UnixTime(T0)).unwrap();
    id
}

pub(super) fn ticket_for(id: &Identity) -> Vec<u8> {
    TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0), 3600)
        .sign(&Identity::from_seed([99; 32]))
        .encode()
        .to_vec()
}

pub(super) fn report(seq: u64, ms: u64, pos: [f32; 3]) -> ClientToControl {
    ClientToControl::Report(Box::new(Report {
        seq,
        unix_ms: ms,
        status: "playing".into(),
        app: vec![],
        build_hash: [0; 32],
        position: pos,
        character: vec![seq as u8],
        game: vec![],
        links: vec![],
        lost: vec![],
        observed: vec![],
    }))
}

/// Registers relay `seed` (configured as `NodeId([n; 8])` only for seeds the core knows).
pub(super) fn register(c: &mut Core, t: Instant, conn: ConnId, relay: &Identity) -> Vec<Output> {
    c.on_connected(t, conn, "198.51.100.9:40000".parse().unwrap());
    let msg = RelayToControl::Register {
        addr: "198.51.100.9:7000".parse().unwrap(),
        proof: proof(relay, RELAY_ACCOUNT, T0 * 1000),
    };
    c.on_relay_message(t, UnixTime(T0), conn, msg);
    outputs(c)
}

pub(super) fn relay_core(relays: &[&Identity]) -> Core {
    let cfg = CoreConfig {
        relays: relays
            .iter()
            .enumerate()
            .map(|(i, r)| RelayInfo {
                id: r.node_id(),
                addr: format!("198.51.100.{}:7000", i + 1).parse().unwrap(),
                rtt_us: 0,
            })
            .collect(),
        ..CoreConfig::default()
    };
    Core::new(cfg, Identity::from_seed([99; 32]), FP).unwrap()
}

/// What `f` logs at info and above, as plain text.
pub(super) fn logs_of(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || Sink(sink.clone()))
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
