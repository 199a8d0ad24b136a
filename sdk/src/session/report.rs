//! What a session's reports carry: the game's state, every VC's path and stats (with the
//! authentication failures since the last report), the relays' round trips when they changed,
//! and the peers lost; trimmed so that a report always fits a control frame.

use std::collections::BTreeMap;
use std::time::Instant;

use shoal_protocol::control::{ClientToControl, LinkReport, MAX_CONTROL_FRAME, ObservedAvatar, Report};
use shoal_protocol::{NodeId, codec};

use super::core::{LinkCommand, LinkId, SessionCore};
use super::encoded_len;
use crate::driver::NodeStatus;
use crate::path::PathKind;

/// Most neighbours' avatars one report carries.
const MAX_OBSERVED: usize = 64;

impl SessionCore {
    /// Sends the relays' round trips (when they changed) and a report, from the node's
    /// `status`.
    pub(super) fn report(&mut self, now: Instant, link: LinkId, status: &NodeStatus) {
        let rtts: Vec<(NodeId, u32)> =
            status.relays.iter().map(|(id, _, rtt)| (*id, rtt.as_micros().min(u32::MAX.into()) as u32)).collect();
        if !rtts.is_empty() && rtts != self.sent_rtts {
            self.transmits.push_back(LinkCommand::Send { link, msg: ClientToControl::RelayRtts(rtts.clone()) });
            self.sent_rtts = rtts;
        }
        self.seq += 1;
        let report = Report {
            seq: self.seq,
            unix_ms: self.clock_ms(now),
            status: self.state.status.clone(),
            app: self.state.app.clone(),
            build_hash: self.config().build_hash,
            position: self.state.position,
            character: self.state.character.clone(),
            game: self.state.game.clone(),
            links: self.links(status),
            lost: std::mem::take(&mut self.lost).into_iter().collect(),
            observed: self.observations(now),
        };
        let msg = self.fit(report);
        self.counters.reports += 1;
        self.transmits.push_back(LinkCommand::Send { link, msg });
    }

    /// The report as a message no larger than a control frame: link stats, then lost peers,
    /// are left out from the end until it fits, and counted. The state alone always fits
    /// ([`super::check_state`]), with room for the link stats of a usual neighbourhood.
    fn fit(&mut self, report: Report) -> ClientToControl {
        let mut msg = ClientToControl::Report(Box::new(report));
        let mut len = encoded_len(&msg);
        if len <= MAX_CONTROL_FRAME {
            return msg;
        }
        if let ClientToControl::Report(r) = &mut msg {
            // Each element's own encoding (its codec frame less the version byte); the
            // vector's length prefix only shrinks as elements go, so the running total never
            // understates.
            let link_len = |l: &LinkReport| codec::encode(l).map_or(0, |f| f.len() - 1);
            let node_len = |n: &NodeId| codec::encode(n).map_or(0, |f| f.len() - 1);
            while len > MAX_CONTROL_FRAME {
                if let Some(l) = r.links.pop() {
                    len = len.saturating_sub(link_len(&l));
                    self.counters.links_trimmed += 1;
                } else if let Some(p) = r.lost.pop() {
                    len = len.saturating_sub(node_len(&p));
                    self.counters.lost_trimmed += 1;
                } else if let Some(o) = r.observed.pop() {
                    len = len.saturating_sub(codec::encode(&o).map_or(0, |f| f.len() - 1));
                } else {
                    break;
                }
            }
        }
        msg
    }

    /// The newest avatar of each neighbour that arrived since the last report, for the
    /// control server's cross-check, at most [`MAX_OBSERVED`].
    fn observations(&mut self, now: Instant) -> Vec<ObservedAvatar> {
        let Some(mesh) = &self.avatars else { return Vec::new() };
        let mut out = Vec::new();
        for (peer, at, state) in mesh.received() {
            if out.len() == MAX_OBSERVED || self.observed_sent.get(&peer).is_some_and(|&t| t >= at) {
                continue;
            }
            self.observed_sent.insert(peer, at);
            let age_ms = now.saturating_duration_since(at).as_millis().min(u32::MAX.into()) as u32;
            out.push(ObservedAvatar { peer, age_ms, position: state.position.to_array() });
        }
        let neighbours: Vec<NodeId> = mesh.neighbours().collect();
        self.observed_sent.retain(|p, _| neighbours.contains(p));
        out
    }

    fn clock_ms(&self, now: Instant) -> u64 {
        self.clock.unix_us(now) / 1000
    }

    /// One [`LinkReport`] per VC, with the authentication failures since the last report.
    fn links(&mut self, status: &NodeStatus) -> Vec<LinkReport> {
        let mut seen = BTreeMap::new();
        let links = status
            .links
            .iter()
            .map(|(key, s)| {
                let total = s.counters.auth_failures;
                let before = self.auth_failures.get(key).copied().unwrap_or(0);
                seen.insert(*key, total);
                let route = s.path.as_ref().map(|p| p.path.route());
                LinkReport {
                    peer: key.peer,
                    vc: key.vc.0,
                    path_kind: match s.path.as_ref().map(|p| p.kind) {
                        Some(PathKind::Direct) | None => 0,
                        Some(PathKind::OneRelay) => 1,
                        Some(PathKind::MultiRelay) => 2,
                    },
                    relays: route.map(|r| r.relays().to_vec()).unwrap_or_default(),
                    rtt_us: s.rtt.map_or(0, |r| r.as_micros().min(u32::MAX.into()) as u32),
                    loss: s.loss,
                    send_bps: s.send_bytes_per_sec.min(f64::from(u32::MAX)) as u32,
                    recv_bps: s.recv_bytes_per_sec.min(f64::from(u32::MAX)) as u32,
                    auth_failures: total.saturating_sub(before).min(u64::from(u32::MAX)) as u32,
                }
            })
            .collect();
        self.auth_failures = seen;
        links
    }
}
