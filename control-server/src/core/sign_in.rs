//! Signing in: key proofs, the account check and resumption with a session ticket, and the
//! tickets and permits the server signs.

use std::time::Duration;

use rustc_hash::FxHashMap;
use shoal_protocol::control::{ControlToClient, KeyProof, Refusal, SIGN_IN_CONTEXT};
use shoal_protocol::{NodeId, PublicKey, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

use super::{ConnId, Core, Output, Player, State};

impl Core {
    /// A sign-in with credentials: the key proof is checked here, the account by the driver.
    pub(super) fn on_sign_in(
        &mut self,
        unix: UnixTime,
        conn: ConnId,
        account: String,
        password: String,
        proof: KeyProof,
    ) {
        if !self.proof_ok(&account, &proof, unix) {
            self.counters.bad_proofs += 1;
            self.refuse(conn, Refusal::BadProof, &account, proof.public_key.node_id());
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = State::Verifying { key: proof.public_key, account: account.clone() };
        }
        self.outputs.push_back(Output::Verify { conn, account, password });
    }

    /// A resumption with a session ticket: the ticket and the key proof are checked here, and
    /// the driver finds the account.
    pub(super) fn on_resume(&mut self, unix: UnixTime, conn: ConnId, session: &[u8], proof: KeyProof) {
        let ticket = SignedTicket::decode(session)
            .ok()
            .and_then(|t| t.verify(&self.identity.public_key(), TicketKind::Session, Roles::CLIENT, unix).ok());
        let node = proof.public_key.node_id();
        let Some(t) = ticket else {
            self.counters.bad_tickets += 1;
            self.refuse(conn, Refusal::BadTicket, "", node);
            return;
        };
        if t.body.public_key != proof.public_key {
            self.counters.bad_tickets += 1;
            self.refuse(conn, Refusal::BadTicket, "", node);
            return;
        }
        // The proof shows the client holds the ticket's key (no account is claimed: the
        // server finds it).
        if !self.proof_ok("", &proof, unix) {
            self.counters.bad_proofs += 1;
            self.refuse(conn, Refusal::BadProof, "", node);
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = State::Resuming { key: proof.public_key };
        }
        self.outputs.push_back(Output::FindAccount { conn, node: proof.public_key.node_id() });
    }

    /// Whether `proof` is `account`'s, made within the allowed skew of `unix`, for this
    /// server.
    pub(super) fn proof_ok(&self, account: &str, proof: &KeyProof, unix: UnixTime) -> bool {
        let now_ms = unix.0.saturating_mul(1000);
        if proof.unix_ms.abs_diff(now_ms) > self.cfg.proof_skew.as_millis() as u64 {
            return false;
        }
        let message = KeyProof::message(account, &proof.public_key, proof.unix_ms, &self.server_fingerprint);
        proof.public_key.verify(SIGN_IN_CONTEXT, &message, &proof.signature).is_ok()
    }

    /// Refuses a sign-in or resumption of `account` (empty when a resumption claims none) by
    /// `node`; the connection is closed after too many.
    fn refuse(&mut self, conn: ConnId, why: Refusal, account: &str, node: NodeId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.failures += 1;
        tracing::info!(addr = %c.remote, account, %node, reason = %why, failures = c.failures, "sign-in refused");
        if c.failures >= self.cfg.max_sign_in_failures {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::RateLimited)));
            self.outputs.push_back(Output::Close(conn));
        } else {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(why)));
        }
    }

    /// The driver's answer to [`Output::Verify`].
    pub fn on_verdict(&mut self, unix: UnixTime, conn: ConnId, accepted: Option<String>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let State::Verifying { key, account } = std::mem::replace(&mut c.state, State::Connected) else { return };
        match accepted {
            Some(name) if name == account => self.welcome(conn, unix, name, key, false),
            _ => {
                self.counters.bad_credentials += 1;
                self.refuse(conn, Refusal::BadCredentials, &account, key.node_id());
            }
        }
    }

    /// The driver's answer to [`Output::FindAccount`]. A node with no saved character cannot
    /// resume; its client signs in again with its credentials.
    pub fn on_account(&mut self, unix: UnixTime, conn: ConnId, account: Option<String>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let State::Resuming { key } = std::mem::replace(&mut c.state, State::Connected) else { return };
        match account {
            Some(account) => {
                self.counters.resumed += 1;
                self.welcome(conn, unix, account, key, true);
            }
            None => {
                self.counters.bad_tickets += 1;
                self.refuse(conn, Refusal::BadTicket, "", key.node_id());
            }
        }
    }

    fn ticket(&self, kind: TicketKind, key: PublicKey, unix: UnixTime, ttl: Duration) -> SignedTicket {
        TicketBody::new(kind, key, Roles::CLIENT, unix, ttl.as_secs()).sign(&self.identity)
    }

    /// Signs `key` in as `account` on `conn` (`resumed` with a session ticket).
    fn welcome(&mut self, conn: ConnId, unix: UnixTime, account: String, key: PublicKey, resumed: bool) {
        let node = key.node_id();
        // A newer sign-in of the same node replaces the old connection.
        if let Some(old) = self.by_node.get(&node).copied()
            && old != conn
        {
            tracing::info!(account, %node, "a newer sign-in replaces the connection");
            self.outputs.push_back(Output::Close(old));
            self.on_disconnected(old);
        }
        let session = self.ticket(TicketKind::Session, key, unix, self.cfg.session_ttl);
        let permit = self.ticket(TicketKind::RelayPermit, key, unix, self.cfg.permit_ttl);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.failures = 0;
        if resumed {
            tracing::info!(account, %node, addr = %c.remote, "resumed");
        } else {
            tracing::info!(account, %node, addr = %c.remote, "signed in");
        }
        c.state = State::SignedIn(Box::new(Player {
            account,
            key,
            observed: None,
            local: Vec::new(),
            relay_rtts: FxHashMap::default(),
            position: None,
            history: std::collections::VecDeque::new(),
            mismatches: Vec::new(),
            flags: 0,
            permit_expires: permit.body.expires_at,
            last_report: None,
            stream_key: None,
        }));
        self.by_node.insert(node, conn);
        self.counters.signed_in += 1;
        self.outputs.push_back(Output::Send(
            conn,
            ControlToClient::Welcome {
                session: session.encode().to_vec(),
                permit: permit.encode().to_vec(),
                relays: self.relay_list(),
                now: unix,
            },
        ));
        if !self.hosting.is_empty() {
            self.outputs.push_back(Output::Send(conn, ControlToClient::Hosting(self.hosting_list())));
        }
    }

    /// Renews the permits with a third of their life left, except flagged clients'.
    pub(super) fn renew_permits(&mut self, unix: UnixTime) {
        let renew_before = self.renew_before();
        let mut renewals = Vec::new();
        for (&id, c) in &mut self.conns {
            if let State::SignedIn(p) = &mut c.state
                && p.flags == 0
                && p.permit_expires.0.saturating_sub(unix.0) <= renew_before
            {
                renewals.push((id, p.key));
                p.permit_expires = UnixTime(unix.0 + self.cfg.permit_ttl.as_secs());
            }
        }
        renewals.sort_by_key(|r| r.0);
        for (id, key) in renewals {
            let permit = self.ticket(TicketKind::RelayPermit, key, unix, self.cfg.permit_ttl);
            self.outputs.push_back(Output::Send(id, ControlToClient::Permit(permit.encode().to_vec())));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::time::Instant;

    use shoal_protocol::Identity;
    use shoal_protocol::control::ClientToControl;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn bad_proofs_credentials_and_early_messages_are_refused_and_counted() {
        let mut c = core();
        let t = Instant::now();
        let id = Identity::from_seed([5; 32]);
        c.on_connected(t, 1, "203.0.113.5:1".parse().unwrap());
        // Before sign-in.
        c.on_message(t, UnixTime(T0), 1, ClientToControl::Keepalive);
        assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Refused(Refusal::NotSignedIn))]);
        // A proof for another account, one too old, one for another server.
        let other_account = proof(&id, "eve", T0 * 1000);
        let stale = proof(&id, "ana", (T0 - 120) * 1000);
        let mut other_server = proof(&id, "ana", T0 * 1000);
        other_server.signature =
            id.sign(SIGN_IN_CONTEXT, &KeyProof::message("ana", &id.public_key(), T0 * 1000, &[8; 32]));
        for p in [other_account, stale, other_server] {
            c.on_message(
                t,
                UnixTime(T0),
                1,
                ClientToControl::SignIn { account: "ana".into(), password: "pw".into(), proof: p },
            );
            assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Refused(Refusal::BadProof))]);
        }
        // Wrong password: the verdict says no.
        c.on_message(
            t,
            UnixTime(T0),
            1,
            ClientToControl::SignIn {
                account: "ana".into(),
                password: "x".into(),
                proof: proof(&id, "ana", T0 * 1000),
            },
        );
        outputs(&mut c);
        c.on_verdict(UnixTime(T0), 1, None);
        assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Refused(Refusal::BadCredentials))]);
        // The fifth failure closes the connection.
        c.on_message(
            t,
            UnixTime(T0),
            1,
            ClientToControl::SignIn {
                account: "ana".into(),
                password: "x".into(),
                proof: proof(&id, "ana", T0 * 1000),
            },
        );
        outputs(&mut c);
        c.on_verdict(UnixTime(T0), 1, None);
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        let k = c.counters();
        assert_eq!((k.bad_proofs, k.bad_credentials, k.not_signed_in), (3, 2, 1));
        c.on_malformed(1);
        assert_eq!(c.counters().malformed, 1);
    }

    #[test]
    fn forged_and_expired_tickets_do_not_resume() {
        let mut c = core();
        let t = Instant::now();
        let id = sign_in(&mut c, t, 1, 10, "ana");
        // A genuine ticket resumes on a new connection, replacing the old one.
        let session = TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0), 3600)
            .sign(&Identity::from_seed([99; 32]));
        c.on_connected(t, 2, "203.0.113.10:6000".parse().unwrap());
        c.on_message(
            t,
            UnixTime(T0),
            2,
            ClientToControl::Resume { session: session.encode().to_vec(), proof: proof(&id, "", T0 * 1000) },
        );
        assert_eq!(outputs(&mut c), vec![Output::FindAccount { conn: 2, node: id.node_id() }]);
        c.on_account(UnixTime(T0), 2, Some("ana".into()));
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        assert!(out.iter().any(|o| matches!(o, Output::Send(2, ControlToClient::Welcome { .. }))), "{out:?}");
        // Forged (signed by someone else), expired, and another key's ticket.
        let forged = TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0), 3600)
            .sign(&Identity::from_seed([1; 32]));
        let expired = TicketBody::new(TicketKind::Session, id.public_key(), Roles::CLIENT, UnixTime(T0 - 7200), 3600)
            .sign(&Identity::from_seed([99; 32]));
        let other = Identity::from_seed([12; 32]);
        for (n, ticket, key) in [(3, forged, &id), (4, expired, &id), (5, session, &other)] {
            c.on_connected(t, n, "203.0.113.10:7000".parse().unwrap());
            c.on_message(
                t,
                UnixTime(T0),
                n,
                ClientToControl::Resume { session: ticket.encode().to_vec(), proof: proof(key, "", T0 * 1000) },
            );
            assert_eq!(outputs(&mut c), vec![Output::Send(n, ControlToClient::Refused(Refusal::BadTicket))]);
        }
        assert_eq!(c.counters().bad_tickets, 3);
        assert_eq!(c.player(id.node_id()).unwrap().account, "ana");
        // A node the store knows no account for cannot resume.
        c.on_connected(t, 6, "203.0.113.10:7001".parse().unwrap());
        c.on_message(
            t,
            UnixTime(T0),
            6,
            ClientToControl::Resume { session: ticket_for(&other), proof: proof(&other, "", T0 * 1000) },
        );
        assert_eq!(outputs(&mut c), vec![Output::FindAccount { conn: 6, node: other.node_id() }]);
        c.on_account(UnixTime(T0), 6, None);
        assert_eq!(outputs(&mut c), vec![Output::Send(6, ControlToClient::Refused(Refusal::BadTicket))]);
    }
}
