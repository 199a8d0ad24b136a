//! Hosting servers: registration with a key proof, and telling clients which hosting server
//! serves which zone (after their welcome, and whenever one registers or goes).

use std::time::Instant;

use shoal_protocol::control::{ControlToClient, Refusal};
use shoal_protocol::world::{ControlToHosting, HOSTING_ACCOUNT, HostingInfo, HostingToControl};
use shoal_protocol::{NodeId, UnixTime};

use super::{ConnId, Core, Output, State};

/// A registered hosting server.
#[derive(Debug)]
pub(super) struct HostingEntry {
    pub(super) conn: ConnId,
    pub(super) info: HostingInfo,
    /// Its last load report: clients, entities.
    pub(super) load: (u32, u32),
}

impl Core {
    /// A message arrived on a hosting server's connection.
    pub fn on_hosting_message(&mut self, now: Instant, unix: UnixTime, conn: ConnId, msg: HostingToControl) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.heard = now;
        let remote = c.remote;
        let registered = match c.state {
            State::Hosting(id) => Some(id),
            _ => None,
        };
        match (msg, registered) {
            (HostingToControl::Register(r), None) => {
                let id = r.proof.public_key.node_id();
                let allowed = self.cfg.hosting.contains(&id);
                if !allowed || !self.proof_ok(HOSTING_ACCOUNT, &r.proof, unix) {
                    self.counters.hosting_refused += 1;
                    let why = if allowed { Refusal::BadProof } else { Refusal::BadCredentials };
                    tracing::info!(node = %id, addr = %remote, reason = %why, "hosting server registration refused");
                    self.outputs.push_back(Output::SendHosting(conn, ControlToHosting::Refused(why)));
                    self.outputs.push_back(Output::Close(conn));
                    return;
                }
                // A hosting server that registers again (restart, new connection) replaces
                // its old connection.
                if let Some(old) = self.hosting.get(&id).map(|h| h.conn)
                    && old != conn
                {
                    self.outputs.push_back(Output::Close(old));
                    self.on_disconnected(old);
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = State::Hosting(id);
                }
                let info = HostingInfo { id, addr: r.addr, cert: r.cert, zone: r.zone, overlap: r.overlap };
                tracing::info!(node = %id, announced = %info.addr, zone = info.zone.name.as_str(), "hosting server registered");
                self.hosting.insert(id, HostingEntry { conn, info, load: (0, 0) });
                self.counters.hosting_registered += 1;
                self.outputs.push_back(Output::SendHosting(conn, ControlToHosting::Registered));
                self.announce_hosting();
            }
            (HostingToControl::Load { clients, entities }, Some(id)) => {
                if let Some(h) = self.hosting.get_mut(&id) {
                    h.load = (clients, entities);
                }
            }
            (HostingToControl::Keepalive, Some(_)) | (HostingToControl::Register(_), Some(_)) => {}
            (_, None) => {
                self.counters.not_signed_in += 1;
                self.outputs.push_back(Output::SendHosting(conn, ControlToHosting::Refused(Refusal::NotSignedIn)));
            }
        }
    }

    /// The hosting servers registered now, by node id.
    pub fn hosting_list(&self) -> Vec<HostingInfo> {
        self.hosting.values().map(|h| h.info.clone()).collect()
    }

    /// A hosting server's connection ended.
    pub(super) fn hosting_gone(&mut self, id: NodeId, conn: ConnId) {
        if self.hosting.get(&id).is_some_and(|h| h.conn == conn) {
            tracing::info!(node = %id, "hosting server unregistered");
            self.hosting.remove(&id);
            self.announce_hosting();
        }
    }

    /// Tells every signed-in client the hosting servers there are now.
    fn announce_hosting(&mut self) {
        let list = self.hosting_list();
        let mut clients: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| matches!(c.state, State::SignedIn(_))).map(|(&id, _)| id).collect();
        clients.sort_unstable();
        for conn in clients {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Hosting(list.clone())));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::time::Instant;

    use shoal_protocol::control::{ClientToControl, ControlToClient};
    use shoal_protocol::world::{ControlToHosting, HOSTING_ACCOUNT, HostingToControl, Registration, ZoneInfo};
    use shoal_protocol::{Identity, UnixTime};

    use super::super::test_support::{FP, T0, outputs, proof, sign_in};
    use super::super::{Core, CoreConfig, Output};

    fn registration(host: &Identity, ms: u64, account: &str) -> HostingToControl {
        HostingToControl::Register(Box::new(Registration {
            addr: "127.0.0.1:7000".parse().unwrap(),
            cert: [3; 32],
            zone: ZoneInfo { name: "meadow".into(), min: [0.0, 0.0], max: [500.0, 1000.0] },
            overlap: 40.0,
            proof: proof(host, account, ms),
        }))
    }

    #[test]
    fn a_configured_hosting_server_registers_and_clients_learn_of_it_until_it_goes() {
        let host = Identity::from_seed([40; 32]);
        let stranger = Identity::from_seed([41; 32]);
        let cfg = CoreConfig { hosting: vec![host.node_id()], ..CoreConfig::default() };
        let mut c = Core::new(cfg, Identity::from_seed([99; 32]), FP).unwrap();
        let t = Instant::now();
        sign_in(&mut c, t, 1, 9, "ana");
        // Not configured; a proof for another account; a proof too old.
        for (conn, who, account, ms) in [
            (10, &stranger, HOSTING_ACCOUNT, T0 * 1000),
            (11, &host, "relay", T0 * 1000),
            (12, &host, HOSTING_ACCOUNT, (T0 - 600) * 1000),
        ] {
            c.on_connected(t, conn, "198.51.100.20:4000".parse().unwrap());
            c.on_hosting_message(t, UnixTime(T0), conn, registration(who, ms, account));
            let out = outputs(&mut c);
            assert!(matches!(out[0], Output::SendHosting(_, ControlToHosting::Refused(_))), "{out:?}");
            assert_eq!(out[1], Output::Close(conn));
        }
        assert_eq!(c.counters().hosting_refused, 3);
        c.on_connected(t, 20, "198.51.100.20:4000".parse().unwrap());
        c.on_hosting_message(t, UnixTime(T0), 20, registration(&host, T0 * 1000, HOSTING_ACCOUNT));
        let out = outputs(&mut c);
        assert_eq!(out[0], Output::SendHosting(20, ControlToHosting::Registered));
        let Output::Send(1, ControlToClient::Hosting(list)) = &out[1] else { panic!("{out:?}") };
        assert_eq!((list.len(), list[0].id, list[0].zone.name.as_str()), (1, host.node_id(), "meadow"));
        // A client signing in now learns of it after its welcome.
        let bob = Identity::from_seed([10; 32]);
        c.on_connected(t, 2, "203.0.113.10:5000".parse().unwrap());
        let msg = ClientToControl::SignIn {
            account: "bob".into(),
            password: "pw".into(),
            proof: proof(&bob, "bob", T0 * 1000),
        };
        c.on_message(t, UnixTime(T0), 2, msg);
        outputs(&mut c);
        c.on_verdict(UnixTime(T0), 2, Some("bob".into()));
        let out = outputs(&mut c);
        assert!(
            matches!(&out[..], [Output::Send(2, ControlToClient::Welcome { .. }), Output::Send(2, ControlToClient::Hosting(l))] if l.len() == 1),
            "{out:?}"
        );
        // It goes: both are told the list is empty.
        c.on_disconnected(20);
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Send(1, ControlToClient::Hosting(Vec::new()))));
        assert!(out.contains(&Output::Send(2, ControlToClient::Hosting(Vec::new()))));
    }
}
