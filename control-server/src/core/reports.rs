//! What a signed-in client sends: check-ins with its addresses, its RTTs to relays, its
//! reports (checked for plausible movement, stored, and fed to the interest set) and its
//! sign-out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glam::Vec3;
use shoal_protocol::control::{ClientToControl, ControlToClient, ObservedAvatar, Refusal};
use shoal_protocol::{NodeId, UnixTime};

use super::{Conn, ConnId, Core, OBSERVE_WINDOW, Output, State};
use crate::store::{Character, ReportRow, stored_ms, stored_seq};

impl Core {
    /// A message from a signed-in client on `conn` (sign-in messages excepted).
    ///
    /// `now` is when the server received it: the speed check measures time on the server's
    /// clock, so a client that sets its own clock forward cannot excuse a teleport.
    pub(super) fn on_signed_in_message(&mut self, now: Instant, unix: UnixTime, conn: ConnId, msg: ClientToControl) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let remote = c.remote;
        let State::SignedIn(p) = &mut c.state else { return };
        match msg {
            ClientToControl::CheckIn { local, mesh_port, reflexive } => {
                // A relay's observation of the mesh socket is its real mapping; a claim of
                // another IP is not taken (peers would be sent to punch at it).
                let observed = reflexive
                    .filter(|r| r.ip() == remote.ip())
                    .unwrap_or_else(|| SocketAddr::new(remote.ip(), mesh_port));
                p.observed = Some(observed);
                p.local = local.into_iter().take(8).collect();
                self.outputs.push_back(Output::Send(conn, ControlToClient::Observed(observed)));
            }
            ClientToControl::RelayRtts(rtts) => {
                p.relay_rtts = rtts.into_iter().take(32).collect();
            }
            ClientToControl::StreamKey(key) => {
                let node = p.key.node_id();
                if p.stream_key.replace(key) != Some(key) {
                    self.on_stream_key(unix, node);
                }
            }
            ClientToControl::Report(mut report) => {
                self.counters.reports += 1;
                if !self.cfg.builds.is_empty() && !self.cfg.builds.contains(&report.build_hash) {
                    self.counters.unknown_builds += 1;
                    let (account, node, reason) = (p.account.as_str(), p.key.node_id(), Refusal::UnknownBuild);
                    tracing::info!(account, %node, addr = %remote, %reason, "refused and closed");
                    self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::UnknownBuild)));
                    self.outputs.push_back(Output::Close(conn));
                    return;
                }
                // The history stores seq in a signed column: one past it is refused, never
                // stored negative.
                let seq = match stored_seq(report.seq) {
                    Ok(seq) => seq,
                    Err(e) => {
                        self.counters.bad_seqs += 1;
                        let (account, node) = (p.account.as_str(), p.key.node_id());
                        tracing::info!(account, %node, addr = %remote, reason = %e, "report refused");
                        self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::Malformed)));
                        return;
                    }
                };
                let pos = Vec3::from_array(report.position);
                // Time between the receipts of this report and of the last accepted one, on the
                // server's clock, with slack for the jitter of their arrival. The report's own
                // `unix_ms` is the client's word and is only stored.
                let plausible = pos.is_finite()
                    && p.position.is_none_or(|(last, at)| {
                        let dt = now.saturating_duration_since(at) + self.cfg.speed_slack;
                        last.distance(pos) <= self.cfg.max_speed * dt.as_secs_f32()
                    });
                let node = p.key.node_id();
                if plausible {
                    p.position = Some((pos, now));
                    p.history.push_back((now, pos));
                    while p.history.front().is_some_and(|&(t, _)| now.saturating_duration_since(t) > OBSERVE_WINDOW) {
                        p.history.pop_front();
                    }
                    self.outputs.push_back(Output::SaveCharacter(Character {
                        account: p.account.clone(),
                        node_id: node.0,
                        position: pos.as_dvec3().to_array(),
                        state: report.character.clone(),
                        updated_ms: stored_ms(unix.0),
                    }));
                } else {
                    p.flags += 1;
                    self.counters.implausible += 1;
                }
                let cut = p.flags >= self.cfg.max_flags;
                self.rows.push(ReportRow {
                    account: p.account.clone(),
                    node_id: node.0,
                    seq,
                    received_ms: stored_ms(unix.0),
                    status: report.status.clone(),
                    position: pos.as_dvec3().to_array(),
                    body: match shoal_protocol::codec::encode(&report) {
                        Ok(body) => body,
                        Err(e) => {
                            // A report that decoded encodes again; kept without its body if not.
                            tracing::warn!(account = p.account.as_str(), %node, "report body not kept: {e}");
                            Vec::new()
                        }
                    },
                });
                let observed = std::mem::take(&mut report.observed);
                p.last_report = Some(*report);
                // A plausible position is finite, all the interest set checks.
                if plausible && let Err(e) = self.interest.update(node, pos) {
                    tracing::warn!(%node, "position not taken for introductions: {e}");
                }
                if plausible && let Some(w) = &mut self.watchers {
                    let _ = w.update(node, pos);
                }
                if cut {
                    self.cut_off(conn);
                    return;
                }
                self.cross_check(now, unix, node, &observed);
            }
            ClientToControl::SignOut => {
                tracing::info!(account = p.account.as_str(), node = %p.key.node_id(), addr = %remote, "signed out");
                self.outputs.push_back(Output::Close(conn));
                self.on_disconnected(conn);
            }
            ClientToControl::Keepalive | ClientToControl::SignIn { .. } | ClientToControl::Resume { .. } => {}
        }
    }
}

impl Core {
    /// Cuts off the signed-in client on `conn`: flagged [`super::CoreConfig::max_flags`]
    /// times. Its permit is not renewed, and it is refused for good.
    fn cut_off(&mut self, conn: ConnId) {
        let Some(Conn { remote, state: State::SignedIn(p), .. }) = self.conns.get(&conn) else { return };
        self.counters.cut_off += 1;
        let (account, node, flags) = (p.account.as_str(), p.key.node_id(), p.flags);
        tracing::warn!(account, %node, addr = %remote, flags, "cut off for implausible reports or avatars");
        self.outputs.push_back(Output::Send(conn, ControlToClient::Refused(Refusal::Implausible)));
        self.outputs.push_back(Output::Close(conn));
        self.on_disconnected(conn);
    }

    /// Checks what `observer` saw of its neighbours' avatars against each neighbour's own
    /// reports. An avatar served where the player's reports say it cannot have been (farther
    /// from each of the nearest two reports than the speed limit allows in their time apart,
    /// plus [`super::CoreConfig::observe_slack`]) is a mismatch; mismatches from
    /// [`super::CoreConfig::observe_quorum`] distinct observers within [`OBSERVE_WINDOW`]
    /// flag the player, as an implausible report does, with a row in its history.
    fn cross_check(&mut self, now: Instant, unix: UnixTime, observer: NodeId, observed: &[ObservedAvatar]) {
        let (max_speed, slack, quorum) = (self.cfg.max_speed, self.cfg.observe_slack, self.cfg.observe_quorum);
        for o in observed.iter().take(MAX_OBSERVATIONS) {
            self.counters.observations += 1;
            let age = Duration::from_millis(u64::from(o.age_ms));
            let pos = Vec3::from_array(o.position);
            let served = self.by_node.get(&o.peer).copied();
            let neighbour = self.interest.neighbours(observer).any(|n| n == o.peer);
            let Some(conn) = served.filter(|_| neighbour && age <= OBSERVE_WINDOW && pos.is_finite()) else {
                self.counters.observations_refused += 1;
                continue;
            };
            let Some(Conn { state: State::SignedIn(p), .. }) = self.conns.get_mut(&conn) else { continue };
            let at = now.checked_sub(age).unwrap_or(now);
            // The reports just before and just after the observation.
            let after = p.history.iter().position(|&(t, _)| t >= at).unwrap_or(p.history.len());
            let mut near = p.history.range(after.saturating_sub(1)..(after + 1).min(p.history.len())).peekable();
            if near.peek().is_none() {
                // No accepted report to compare with.
                self.counters.observations_refused += 1;
                continue;
            }
            let consistent = near.any(|&(t, reported)| {
                let apart = if t > at { t - at } else { at - t };
                reported.distance(pos) <= max_speed * (apart + slack).as_secs_f32()
            });
            if consistent {
                continue;
            }
            self.counters.avatar_mismatches += 1;
            p.mismatches.retain(|&(who, t)| who != observer && now.saturating_duration_since(t) <= OBSERVE_WINDOW);
            p.mismatches.push((observer, now));
            if p.mismatches.len() < quorum {
                continue;
            }
            p.mismatches.clear();
            p.flags += 1;
            self.counters.avatar_flags += 1;
            let (account, node, flags) = (p.account.clone(), o.peer, p.flags);
            tracing::info!(account, %node, flags, "flagged: served avatar disagrees with its reports");
            self.rows.push(ReportRow {
                account,
                node_id: node.0,
                seq: p.last_report.as_ref().and_then(|r| stored_seq(r.seq).ok()).unwrap_or(0),
                received_ms: stored_ms(unix.0),
                status: "flagged: served avatar disagrees with reports".into(),
                position: pos.as_dvec3().to_array(),
                body: Vec::new(),
            });
            if flags >= self.cfg.max_flags {
                self.cut_off(conn);
            }
        }
    }
}

/// Most observations one report is checked for (a report carries at most 64 in the SDK).
const MAX_OBSERVATIONS: usize = 64;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::time::Duration;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn teleports_are_flagged_and_repeat_offenders_cut_off_without_a_new_permit() {
        let mut c = core();
        let t = Instant::now();
        let a = sign_in(&mut c, t, 1, 10, "ana");
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        // 500 units in one second at a 20/s limit, three times.
        let log = logs_of(|| {
            for i in 1..=3u64 {
                let at = t + Duration::from_secs(i);
                c.on_message(at, UnixTime(T0 + i), 1, report(1 + i, (T0 + i) * 1000, [500.0 * i as f32, 0.0, 0.0]));
            }
        });
        // The operator is warned, with who it was.
        let warned = log.lines().find(|l| l.contains("cut off")).unwrap_or_default();
        assert!(warned.contains("WARN") && warned.contains("account=\"ana\""), "{log}");
        assert!(warned.contains(&a.node_id().to_string()) && warned.contains("203.0.113.10:5000"), "{log}");
        let out = outputs(&mut c);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        assert_eq!(c.counters().implausible, 3);
        assert_eq!(c.counters().cut_off, 1);
        assert_eq!(c.players(), 0);
        // Its permit is not renewed: it is gone.
        c.tick(t, UnixTime(T0 + 500));
        assert!(!outputs(&mut c).iter().any(|o| matches!(o, Output::Send(1, ControlToClient::Permit(_)))));
    }

    #[test]
    fn a_client_clock_set_forward_does_not_excuse_a_teleport() {
        let mut c = core();
        let t = Instant::now();
        sign_in(&mut c, t, 1, 10, "ana");
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        // A report a second apart on the server's clock, claiming a thousand seconds passed on
        // the client's: 500 units would be a walk at 0.5/s by its word, a teleport by ours.
        for i in 1..=3u64 {
            let at = t + Duration::from_secs(i);
            let claimed = T0 * 1000 + i * 1_000_000;
            c.on_message(at, UnixTime(T0 + i), 1, report(1 + i, claimed, [500.0 * i as f32, 0.0, 0.0]));
        }
        assert_eq!(c.counters().implausible, 3);
        assert_eq!(c.counters().cut_off, 1);
        assert_eq!(c.players(), 0);
    }

    #[test]
    fn movement_within_the_limit_is_plausible_whatever_the_client_clock_says() {
        let mut c = core();
        let t = Instant::now();
        let a = sign_in(&mut c, t, 1, 10, "ana");
        c.on_message(t, UnixTime(T0), 1, report(1, T0 * 1000, [0.0, 0.0, 0.0]));
        // 20 units a second at a 20/s limit, from a client whose clock stands still, then
        // one whose report arrives a little early (within the slack for jitter).
        for i in 1..=5u64 {
            let at = t + Duration::from_secs(i) - Duration::from_millis(if i == 5 { 200 } else { 0 });
            c.on_message(at, UnixTime(T0 + i), 1, report(1 + i, T0 * 1000, [20.0 * i as f32, 0.0, 0.0]));
        }
        assert_eq!(c.counters().implausible, 0);
        assert_eq!(c.player(a.node_id()).unwrap().position, Some([100.0, 0.0, 0.0]));
        // The client's time is kept as it said, in the latest report.
        assert_eq!(c.player(a.node_id()).unwrap().report.unwrap().unix_ms, T0 * 1000);
    }

    #[test]
    fn a_seq_past_what_the_history_stores_is_refused_and_counted_not_stored_negative() {
        let mut c = core();
        let t = Instant::now();
        let a = sign_in(&mut c, t, 1, 10, "ana");
        c.on_message(t, UnixTime(T0), 1, report(i64::MAX as u64, T0 * 1000, [0.0, 0.0, 0.0]));
        c.on_message(t, UnixTime(T0), 1, report(i64::MAX as u64 + 1, T0 * 1000, [1.0, 0.0, 0.0]));
        c.on_message(t, UnixTime(T0), 1, report(u64::MAX, T0 * 1000, [1.0, 0.0, 0.0]));
        let rows = c.take_report_rows();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![i64::MAX]);
        let refused = outputs(&mut c)
            .into_iter()
            .filter(|o| *o == Output::Send(1, ControlToClient::Refused(Refusal::Malformed)))
            .count();
        assert_eq!(refused, 2);
        assert_eq!(c.counters().bad_seqs, 2);
        // Refused reports move nobody and flag nobody.
        let p = c.player(a.node_id()).unwrap();
        assert_eq!((p.position, p.flags), (Some([0.0, 0.0, 0.0]), 0));
    }

    fn observing(seq: u64, ms: u64, pos: [f32; 3], observed: Vec<ObservedAvatar>) -> ClientToControl {
        let ClientToControl::Report(mut r) = report(seq, ms, pos) else { unreachable!() };
        r.observed = observed;
        ClientToControl::Report(r)
    }

    /// Ana reports where she is honestly; Bob and Cy observe her. Then she serves an avatar
    /// 100 m from where her reports say she is.
    #[test]
    fn an_avatar_served_where_the_reports_deny_is_flagged_only_by_a_quorum_of_observers() {
        let mut c = core();
        let t = Instant::now();
        let ana = sign_in(&mut c, t, 1, 10, "ana").node_id();
        let bob = sign_in(&mut c, t, 2, 11, "bob").node_id();
        sign_in(&mut c, t, 3, 12, "cy");
        let place = |c: &mut Core, i: u64, ana_x: f32| {
            let at = t + Duration::from_secs(i);
            c.on_message(at, UnixTime(T0 + i), 1, report(i, (T0 + i) * 1000, [ana_x, 0.0, 0.0]));
        };
        for i in 1..=2 {
            place(&mut c, i, i as f32);
            for conn in [2, 3] {
                let at = t + Duration::from_secs(i);
                c.on_message(at, UnixTime(T0 + i), conn, report(i, (T0 + i) * 1000, [0.0, 0.0, conn as f32]));
            }
            c.tick(t + Duration::from_secs(i), UnixTime(T0 + i));
        }
        assert!(c.snapshot().players.iter().all(|p| p.neighbours.len() == 2), "{:?}", c.snapshot());
        let seen = |x: f32, age_ms: u32| vec![ObservedAvatar { peer: ana, age_ms, position: [x, 0.0, 0.0] }];
        // Honest: where her reports put her, 300 ms before the observers' reports.
        let at = t + Duration::from_millis(2_300);
        c.on_message(at, UnixTime(T0 + 2), 2, observing(3, (T0 + 2) * 1000, [0.0, 0.0, 2.0], seen(2.3, 300)));
        c.on_message(at, UnixTime(T0 + 2), 3, observing(3, (T0 + 2) * 1000, [0.0, 0.0, 3.0], seen(2.1, 250)));
        assert_eq!((c.counters().observations, c.counters().avatar_mismatches), (2, 0));
        // One observer says she is 100 m off: one liar is not a quorum.
        c.on_message(at, UnixTime(T0 + 2), 2, observing(4, (T0 + 2) * 1000, [0.0, 0.0, 2.0], seen(102.0, 100)));
        assert_eq!(c.counters().avatar_mismatches, 1);
        assert_eq!(c.player(ana).unwrap().flags, 0);
        // A second observer sees the same: she is flagged, with a row in her history.
        c.take_report_rows();
        c.on_message(at, UnixTime(T0 + 2), 3, observing(4, (T0 + 2) * 1000, [0.0, 0.0, 3.0], seen(101.0, 100)));
        assert_eq!(c.counters().avatar_flags, 1);
        assert_eq!(c.player(ana).unwrap().flags, 1);
        let snapshot = c.snapshot();
        let shown = snapshot.players.iter().find(|p| p.account == "ana").unwrap();
        assert!(shown.flagged);
        let rows = c.take_report_rows();
        assert!(rows.iter().any(|r| r.account == "ana" && r.status.starts_with("flagged")), "{rows:?}");
        // Observations of someone not a neighbour, or of a stranger, are refused.
        let stranger = ObservedAvatar { peer: NodeId([42; 8]), age_ms: 10, position: [0.0; 3] };
        c.on_message(at, UnixTime(T0 + 2), 2, observing(5, (T0 + 2) * 1000, [0.0, 0.0, 2.0], vec![stranger]));
        assert_eq!(c.counters().observations_refused, 1);
        // Two more rounds of it and she is cut off, as a teleporter is.
        for round in 0..2u64 {
            for conn in [2, 3] {
                let seq = 6 + round;
                c.on_message(
                    at,
                    UnixTime(T0 + 2),
                    conn,
                    observing(seq, (T0 + 2) * 1000, [0.0, 0.0, 2.0], seen(150.0, 50)),
                );
            }
        }
        assert_eq!(c.counters().avatar_flags, 3);
        assert_eq!(c.counters().cut_off, 1);
        assert!(c.player(ana).is_none());
        assert!(c.player(bob).is_some());
        assert!(outputs(&mut c).contains(&Output::Send(1, ControlToClient::Refused(Refusal::Implausible))));
    }
}
