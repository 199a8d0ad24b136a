//! Introductions: the interest set's events become introductions (the peer's key and
//! addresses, the relays and two-relay routes to reach it, the VCs to open) and farewells.

use shoal_protocol::NodeId;
use shoal_protocol::control::{ControlToClient, Introduction, RelayInfo, RouteInfo};

use super::{Core, Output, Player};
use crate::interest::InterestEvent;

impl Core {
    pub(super) fn drain_interest(&mut self) {
        while let Some(e) = self.interest.poll_event() {
            match e {
                InterestEvent::Introduce(a, b) => {
                    for (me, them) in [(a, b), (b, a)] {
                        if let Some(intro) = self.introduction(me, them)
                            && let Some(&conn) = self.by_node.get(&me)
                        {
                            self.counters.introductions += 1;
                            self.outputs.push_back(Output::Send(conn, ControlToClient::Introduce(Box::new(intro))));
                        }
                    }
                }
                InterestEvent::Farewell(a, b) => {
                    for (me, them) in [(a, b), (b, a)] {
                        if let Some(&conn) = self.by_node.get(&me) {
                            self.counters.farewells += 1;
                            self.outputs.push_back(Output::Send(conn, ControlToClient::Farewell(them)));
                        }
                    }
                }
            }
        }
    }

    /// What `me` needs to reach `them`. Single relays are ranked by the sum of both sides'
    /// reported RTTs to them (unknown counts as a second); routes through two relays, one
    /// each side measured, cost my RTT to the first, the relays' RTT to each other and their
    /// RTT to the second, and are offered when they beat the best single relay.
    fn introduction(&self, me: NodeId, them: NodeId) -> Option<Introduction> {
        const UNKNOWN: u64 = 1_000_000;
        let (a, b) = (self.signed_in(me)?, self.signed_in(them)?);
        let to = |p: &Player, r: NodeId| p.relay_rtts.get(&r).map(|&us| u64::from(us));
        let us = |cost: u64| u32::try_from(cost).unwrap_or(u32::MAX);
        let mut relays: Vec<(u64, RelayInfo)> = self
            .relays
            .iter()
            .map(|(&id, r)| {
                let cost = to(a, id).unwrap_or(UNKNOWN) + to(b, id).unwrap_or(UNKNOWN);
                (cost, RelayInfo { id, addr: r.addr, rtt_us: us(cost) })
            })
            .collect();
        relays.sort_by_key(|(cost, r)| (*cost, r.id));
        let best_single = relays.first().map_or(u64::MAX, |(cost, _)| *cost);
        let mut routes: Vec<(u64, RouteInfo)> = Vec::new();
        for (&r1, &mine) in &a.relay_rtts {
            for (&r2, &theirs) in &b.relay_rtts {
                if r1 == r2 || !self.relays.contains_key(&r1) || !self.relays.contains_key(&r2) {
                    continue;
                }
                let Some(between) = self.relay_rtt(r1, r2) else { continue };
                let cost = u64::from(mine) + u64::from(between) + u64::from(theirs);
                if cost < best_single {
                    routes.push((cost, RouteInfo { relays: vec![r1, r2], rtt_us: us(cost) }));
                }
            }
        }
        routes.sort_by(|(c1, r1), (c2, r2)| (c1, &r1.relays).cmp(&(c2, &r2.relays)));
        routes.truncate(2);
        relays.truncate(3);
        Some(Introduction {
            peer_key: b.key,
            observed: b.observed,
            local: b.local.clone(),
            relays: relays.into_iter().map(|(_, r)| r).collect(),
            routes: routes.into_iter().map(|(_, r)| r).collect(),
            profiles: self.cfg.profiles.iter().map(|(vc, p)| (*vc, p.to_wire())).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::net::SocketAddr;
    use std::time::Instant;

    use shoal_protocol::Identity;
    use shoal_protocol::UnixTime;
    use shoal_protocol::control::{ClientToControl, RelayToControl};
    use shoal_protocol::profile::ProfileConfig;

    use super::super::test_support::*;
    use super::super::{ConnId, Output};
    use super::*;

    #[test]
    fn sign_in_check_in_and_introductions_then_farewell() {
        let mut c = core();
        let t = Instant::now();
        let a = sign_in(&mut c, t, 1, 10, "ana");
        let b = sign_in(&mut c, t, 2, 11, "bob");
        c.on_message(t, UnixTime(T0), 1, ClientToControl::CheckIn { local: vec![], mesh_port: 4000, reflexive: None });
        assert_eq!(
            outputs(&mut c),
            vec![Output::Send(1, ControlToClient::Observed("203.0.113.10:4000".parse().unwrap()))]
        );
        // A relay's view of the mesh socket (its NAT mapping) is taken when it shares the IP
        // the server sees; one that names another IP is not.
        let mapped: SocketAddr = "203.0.113.10:61000".parse().unwrap();
        let check_in = |reflexive| ClientToControl::CheckIn { local: vec![], mesh_port: 4000, reflexive };
        c.on_message(t, UnixTime(T0), 1, check_in(Some(mapped)));
        assert_eq!(outputs(&mut c), vec![Output::Send(1, ControlToClient::Observed(mapped))]);
        c.on_message(t, UnixTime(T0), 1, check_in(Some("198.51.100.1:61000".parse().unwrap())));
        assert_eq!(
            outputs(&mut c),
            vec![Output::Send(1, ControlToClient::Observed("203.0.113.10:4000".parse().unwrap()))]
        );
        // A second sign-in on a signed-in connection changes nothing.
        let again = ClientToControl::SignIn {
            account: "ana".into(),
            password: "pw".into(),
            proof: proof(&a, "ana", T0 * 1000),
        };
        c.on_message(t, UnixTime(T0), 1, again);
        assert_eq!(outputs(&mut c), vec![]);
        assert_eq!(c.player(a.node_id()).unwrap().account, "ana");
        c.on_message(t, UnixTime(T0), 2, ClientToControl::RelayRtts(vec![(NodeId([2; 8]), 10_000)]));
        c.on_message(t, UnixTime(T0), 1, ClientToControl::RelayRtts(vec![(NodeId([2; 8]), 20_000)]));
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        c.on_message(t, UnixTime(T0), 2, report(1, T0 * 1000, [10.0, 0.0, 0.0]));
        let saved = outputs(&mut c).into_iter().filter(|o| matches!(o, Output::SaveCharacter(_))).count();
        assert_eq!(saved, 2);
        assert_eq!(c.take_report_rows().len(), 2);
        c.tick(t, UnixTime(T0));
        let out = outputs(&mut c);
        let intros: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(conn, ControlToClient::Introduce(i)) => Some((*conn, i.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(intros.len(), 2, "{out:?}");
        let to_a = &intros.iter().find(|(conn, _)| *conn == 1).unwrap().1;
        assert_eq!(to_a.peer_key, b.public_key());
        assert_eq!(to_a.profiles, vec![(1, ProfileConfig::Voice.to_wire())]);
        // Relay 2 is known to both sides, so it ranks first; the estimate is the round trip
        // between the players through it: the sum of their RTTs to it.
        assert_eq!(to_a.relays[0].id, NodeId([2; 8]));
        assert_eq!(to_a.relays[0].rtt_us, 30_000);
        assert!(to_a.routes.is_empty(), "no relay map yet, so no two-relay routes");
        let to_b = &intros.iter().find(|(conn, _)| *conn == 2).unwrap().1;
        assert_eq!(to_b.peer_key, a.public_key());
        assert_eq!(to_b.observed, Some("203.0.113.10:4000".parse().unwrap()));
        // Bob walks away (within the speed limit): farewell to both.
        for i in 1..=10u64 {
            let at = t + std::time::Duration::from_secs(i);
            c.on_message(at, UnixTime(T0 + i), 2, report(1 + i, (T0 + i) * 1000, [10.0 + 10.0 * i as f32, 0.0, 0.0]));
        }
        outputs(&mut c);
        c.tick(t, UnixTime(T0));
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Send(1, ControlToClient::Farewell(b.node_id()))), "{out:?}");
        assert!(out.contains(&Output::Send(2, ControlToClient::Farewell(a.node_id()))), "{out:?}");
        assert_eq!(c.counters().implausible, 0);
    }

    #[test]
    fn players_near_different_relays_get_a_two_relay_route_when_the_relay_map_says_it_is_faster() {
        let (r1, r2, r3) =
            (Identity::from_seed([31; 32]), Identity::from_seed([32; 32]), Identity::from_seed([34; 32]));
        let mut c = relay_core(&[&r1, &r2, &r3]);
        let t = Instant::now();
        register(&mut c, t, 101, &r1);
        register(&mut c, t, 102, &r2);
        c.on_relay_message(t, UnixTime(T0), 101, RelayToControl::PeerRtts(vec![(r2.node_id(), 20_000)]));
        let a = sign_in(&mut c, t, 1, 10, "ana");
        let b = sign_in(&mut c, t, 2, 11, "bob");
        // Ana is near r1, Bob near r2; r3 is far from both.
        let ms = |r: &Identity, ms: u32| (r.node_id(), ms * 1000);
        c.on_message(t, UnixTime(T0), 1, ClientToControl::RelayRtts(vec![ms(&r1, 5), ms(&r2, 100), ms(&r3, 90)]));
        c.on_message(t, UnixTime(T0), 2, ClientToControl::RelayRtts(vec![ms(&r1, 100), ms(&r2, 5), ms(&r3, 90)]));
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        c.on_message(t, UnixTime(T0), 2, report(1, T0 * 1000, [10.0, 0.0, 0.0]));
        outputs(&mut c);
        c.tick(t, UnixTime(T0));
        let intros: Vec<(ConnId, Box<Introduction>)> = outputs(&mut c)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send(conn, ControlToClient::Introduce(i)) => Some((conn, i)),
                _ => None,
            })
            .collect();
        let to = |conn| &intros.iter().find(|(c, _)| *c == conn).unwrap().1;
        // 5 + 20 + 5 = 30 ms through r1 and r2, against 105 ms through either alone.
        assert_eq!(to(1).routes, vec![RouteInfo { relays: vec![r1.node_id(), r2.node_id()], rtt_us: 30_000 }]);
        assert_eq!(to(2).routes, vec![RouteInfo { relays: vec![r2.node_id(), r1.node_id()], rtt_us: 30_000 }]);
        // Single relays still come, best first (r1 and r2 tie at 105 ms; r3 is 180 ms).
        assert_eq!(to(1).relays.iter().map(|r| r.rtt_us).collect::<Vec<_>>(), vec![105_000, 105_000, 180_000]);
        assert_eq!(to(1).peer_key, b.public_key());
        assert_eq!(to(2).peer_key, a.public_key());
    }
}
