//! Relays: registration with a key proof, the permits and peer lists they get, and the
//! relay map their measured round trips make.

use std::time::Instant;

use shoal_protocol::control::{ControlToRelay, RELAY_ACCOUNT, Refusal, RelayInfo, RelayToControl};
use shoal_protocol::{NodeId, PublicKey, Roles, TicketBody, TicketKind, UnixTime};

use super::{ConnId, Core, Output, State};

impl Core {
    /// A message arrived on a relay's connection.
    pub fn on_relay_message(&mut self, now: Instant, unix: UnixTime, conn: ConnId, msg: RelayToControl) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.heard = now;
        let remote = c.remote;
        let registered = match c.state {
            State::Relay(id) => Some(id),
            _ => None,
        };
        match (msg, registered) {
            (RelayToControl::Register { addr, proof }, None) => {
                let id = proof.public_key.node_id();
                if !self.proof_ok(RELAY_ACCOUNT, &proof, unix) || !self.relays.contains_key(&id) {
                    self.counters.relays_refused += 1;
                    let why = if self.relays.contains_key(&id) { Refusal::BadProof } else { Refusal::BadCredentials };
                    tracing::info!(node = %id, addr = %remote, reason = %why, "relay registration refused");
                    self.outputs.push_back(Output::SendRelay(conn, ControlToRelay::Refused(why)));
                    self.outputs.push_back(Output::Close(conn));
                    return;
                }
                // A relay that registers again (restart, new connection) replaces its old one.
                if let Some(old) = self.relays.get(&id).and_then(|r| r.conn)
                    && old != conn
                {
                    self.outputs.push_back(Output::Close(old));
                    self.on_disconnected(old);
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = State::Relay(id);
                }
                if let Some(r) = self.relays.get_mut(&id) {
                    r.addr = addr;
                    r.conn = Some(conn);
                    r.key = Some(proof.public_key);
                }
                self.counters.relays_registered += 1;
                tracing::info!(node = %id, announced = %addr, addr = %remote, "relay registered");
                // The newcomer learns the registered relays, and they learn it.
                let others: Vec<(NodeId, PublicKey)> = self
                    .relays
                    .iter()
                    .filter(|(_, r)| r.conn.is_some())
                    .filter_map(|(p, r)| Some((*p, r.key?)))
                    .collect();
                for (other, key) in others {
                    self.send_registered(other, key, unix);
                }
            }
            (RelayToControl::PeerRtts(rtts), Some(id)) => {
                if let Some(r) = self.relays.get_mut(&id) {
                    r.peer_rtts = rtts.into_iter().filter(|(p, _)| *p != id).take(64).collect();
                }
            }
            (RelayToControl::Keepalive, Some(_)) | (RelayToControl::Register { .. }, Some(_)) => {}
            (_, None) => {
                self.counters.not_signed_in += 1;
                self.outputs.push_back(Output::SendRelay(conn, ControlToRelay::Refused(Refusal::NotSignedIn)));
            }
        }
    }

    /// Tells a registered relay its permit and its peers (the other registered relays).
    fn send_registered(&mut self, id: NodeId, key: PublicKey, unix: UnixTime) {
        let permit = TicketBody::new(TicketKind::RelayPermit, key, Roles::RELAY, unix, self.cfg.permit_ttl.as_secs())
            .sign(&self.identity);
        let peers = self
            .relays
            .iter()
            .filter(|(p, r)| **p != id && r.conn.is_some())
            .map(|(p, r)| RelayInfo { id: *p, addr: r.addr, rtt_us: r.peer_rtts.get(&id).copied().unwrap_or(0) })
            .collect();
        let Some(r) = self.relays.get_mut(&id) else { return };
        r.permit_expires = permit.body.expires_at;
        if let Some(conn) = r.conn {
            let msg = ControlToRelay::Registered { permit: permit.encode().to_vec(), peers };
            self.outputs.push_back(Output::SendRelay(conn, msg));
        }
    }

    /// Renews the registered relays' permits with a third of their life left.
    pub(super) fn renew_relay_permits(&mut self, unix: UnixTime) {
        let renew_before = self.renew_before();
        let relays: Vec<(NodeId, PublicKey)> = self
            .relays
            .iter()
            .filter(|(_, r)| r.conn.is_some() && r.permit_expires.0.saturating_sub(unix.0) <= renew_before)
            .filter_map(|(id, r)| Some((*id, r.key?)))
            .collect();
        for (id, key) in relays {
            self.send_registered(id, key, unix);
        }
    }

    /// The relays clients bind to, with their current addresses.
    pub(super) fn relay_list(&self) -> Vec<RelayInfo> {
        self.relays.iter().map(|(id, r)| RelayInfo { id: *id, addr: r.addr, rtt_us: 0 }).collect()
    }

    /// The relays' own round trip between `a` and `b`, as either measured it.
    pub(super) fn relay_rtt(&self, a: NodeId, b: NodeId) -> Option<u32> {
        let ab = self.relays.get(&a).and_then(|r| r.peer_rtts.get(&b).copied());
        let ba = self.relays.get(&b).and_then(|r| r.peer_rtts.get(&a).copied());
        ab.into_iter().chain(ba).min()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use shoal_protocol::control::KeyProof;
    use shoal_protocol::{Identity, SignedTicket};

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn configured_relays_register_get_a_relay_permit_and_their_peers_and_others_are_refused() {
        let (r1, r2) = (Identity::from_seed([31; 32]), Identity::from_seed([32; 32]));
        let mut c = relay_core(&[&r1, &r2]);
        let t = Instant::now();
        // Before registering, a relay's other messages are refused.
        c.on_connected(t, 9, "198.51.100.9:40000".parse().unwrap());
        c.on_relay_message(t, UnixTime(T0), 9, RelayToControl::PeerRtts(vec![]));
        assert_eq!(outputs(&mut c), vec![Output::SendRelay(9, ControlToRelay::Refused(Refusal::NotSignedIn))]);

        let mut out = Vec::new();
        let log = logs_of(|| out = register(&mut c, t, 1, &r1));
        let registered = log.lines().find(|l| l.contains("relay registered")).unwrap_or_default();
        assert!(registered.contains(&r1.node_id().to_string()) && registered.contains("198.51.100.9:7000"), "{log}");
        let [Output::SendRelay(1, ControlToRelay::Registered { permit, peers })] = &out[..] else { panic!("{out:?}") };
        let permit = SignedTicket::decode(permit).unwrap();
        assert_eq!(permit.body.node_id, r1.node_id());
        permit.verify(&c.public_key(), TicketKind::RelayPermit, Roles::RELAY, UnixTime(T0)).unwrap();
        assert!(peers.is_empty(), "no other relay has registered yet");
        // When r2 registers, each learns the other, at the address it announced.
        let out = register(&mut c, t, 2, &r2);
        let peers_of = |conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::SendRelay(c, ControlToRelay::Registered { peers, .. }) if *c == conn => Some(peers.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(
            peers_of(1).iter().map(|p| (p.id, p.addr)).collect::<Vec<_>>(),
            vec![(r2.node_id(), "198.51.100.9:7000".parse().unwrap())]
        );
        assert_eq!(peers_of(2).iter().map(|p| p.id).collect::<Vec<_>>(), vec![r1.node_id()]);

        // Measured RTTs show in the live state.
        c.on_relay_message(t, UnixTime(T0), 1, RelayToControl::PeerRtts(vec![(r2.node_id(), 1_500)]));
        let snap = c.snapshot();
        let hex = |n: NodeId| shoal_protocol::identity::to_hex(&n.0);
        let s1 = snap.relays.iter().find(|r| r.node == hex(r1.node_id())).unwrap();
        assert!(s1.registered);
        assert_eq!(s1.peers, vec![(hex(r2.node_id()), 1.5)]);

        // A relay the server was not configured with, and a bad proof, are refused and closed.
        let stranger = Identity::from_seed([33; 32]);
        let mut out = Vec::new();
        let log = logs_of(|| out = register(&mut c, t, 3, &stranger));
        assert!(log.contains("relay registration refused") && log.contains("wrong account or password"), "{log}");
        assert_eq!(out, vec![Output::SendRelay(3, ControlToRelay::Refused(Refusal::BadCredentials)), Output::Close(3)]);
        c.on_connected(t, 4, "198.51.100.9:40001".parse().unwrap());
        let forged = RelayToControl::Register {
            addr: "198.51.100.9:7000".parse().unwrap(),
            proof: KeyProof::new(&r1, RELAY_ACCOUNT, T0 * 1000, &[0; 32]),
        };
        c.on_relay_message(t, UnixTime(T0), 4, forged);
        assert_eq!(
            outputs(&mut c),
            vec![Output::SendRelay(4, ControlToRelay::Refused(Refusal::BadProof)), Output::Close(4)]
        );
        assert_eq!((c.counters().relays_registered, c.counters().relays_refused), (2, 2));

        // The permit is renewed before it lapses; a lost relay shows as unregistered.
        c.tick(t, UnixTime(T0 + c.cfg.permit_ttl.as_secs() * 2 / 3 + 1));
        let renewed = outputs(&mut c)
            .into_iter()
            .filter(|o| matches!(o, Output::SendRelay(_, ControlToRelay::Registered { .. })))
            .count();
        assert_eq!(renewed, 2);
        c.on_disconnected(1);
        assert!(!c.snapshot().relays.iter().find(|r| r.node == hex(r1.node_id())).unwrap().registered);
    }
}
