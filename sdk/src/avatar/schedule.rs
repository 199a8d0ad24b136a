//! Who gets our avatar this tick: rate by distance inside an upload budget.
//!
//! A neighbour inside [`RateConfig::near`] gets every update at [`RateConfig::full_hz`]; the
//! rate falls linearly with distance to [`RateConfig::floor_hz`] at [`RateConfig::edge`]. When
//! serving everyone at those rates would send more than [`RateConfig::budget_bps`] (counted on
//! the wire: what a datagram carries plus its IPv4/UDP headers), the farthest neighbours' rates
//! come down first, to the floor; then, farthest first again, to a quarter of it; and only
//! then everyone's together. In a crowd the near radius thus shrinks to the nearest the
//! budget can serve at the full rate. The budget is a ceiling on the node's whole upload:
//! updates get what the rest of its traffic left over the last second, less a little
//! headroom, less any overspend to repay. A priority accumulator per neighbour turns rates
//! into sends: each tick adds rate × elapsed, a neighbour is due at
//! 1, and when the budget allows fewer sends than are due the most overdue go first, so a far
//! neighbour is delayed, never starved.
//!
//! Sans-IO: told the neighbours' distances and what an update costs, asked at each tick whom
//! to send to.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_protocol::NodeId;

/// How much nearer than its distance a neighbour served at the full rate counts when the
/// budget decides whom to cut, metres.
const KEEP_MARGIN: f32 = 3.0;

/// The share of the budget updates leave for what the last window did not foresee (a burst
/// of handshakes when a crowd comes into view, the peers' checks of a path): the budget is a
/// ceiling, so updates aim a little below it.
const HEADROOM: f64 = 0.04;

/// The least share of the floor rate a neighbour keeps while nearer ones still get more.
const STARVE_SHARE: f32 = 0.25;

/// How rates follow distance, and the budget they fit in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Within this distance, the full rate (default 15 m).
    pub near: f32,
    /// At and past this distance, the floor rate (default 60 m, the control server's leave
    /// radius).
    pub edge: f32,
    /// Updates a second to near neighbours (default 30).
    pub full_hz: f32,
    /// Updates a second at the edge (default 2).
    pub floor_hz: f32,
    /// Bits a second for everything the avatar mesh sends, on the wire (default 96,000).
    pub budget_bps: f64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig { near: 15.0, edge: 60.0, full_hz: 30.0, floor_hz: 2.0, budget_bps: 96_000.0 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    distance: f32,
    /// Wire bits of an update to it, as last sent.
    cost_bits: f64,
    /// Rate it is served at now, after the budget.
    rate: f32,
    /// Sends owed: one is due at 1.
    owed: f64,
    sends: u64,
    /// When it was last served: among neighbours owed as much, the longest waiting goes
    /// first, so that none waits for ever behind others while the budget is short.
    last_sent: Option<Instant>,
}

/// Whom to serve, tick by tick.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: RateConfig,
    slots: BTreeMap<NodeId, Slot>,
    /// Distances or costs changed since the rates were last fitted to the budget.
    dirty: bool,
    last_tick: Option<Instant>,
    /// Budget not spent, bits (at most a tenth of a second's worth is saved up).
    credit: f64,
    /// What an update costs before one was sent: headers and a full state.
    default_cost_bits: f64,
    /// The current window (about a second, from `side_since`): bits of updates and of
    /// messages without one (acks) sent in it, and the node's whole upload at its start and
    /// as last observed ([`Scheduler::observe_upload`]), in wire bytes.
    update_bits: f64,
    side_bits: f64,
    side_since: Option<Instant>,
    upload_start: Option<u64>,
    upload_now: Option<u64>,
    /// What went out besides updates over the last window, bits a second: the rates are
    /// fitted to what the budget leaves.
    side_bps: f64,
    /// Budget overspent over the windows so far (zero or negative), bits: the next window's
    /// updates repay it (an overspend comes from a burst of handshakes, say, that the last
    /// window's rest did not foresee), so the upload holds to the budget over time and not
    /// only window by window. At most a second's budget of debt; what is left unspent is
    /// not saved up, since the budget is a ceiling.
    balance: f64,
}

impl Scheduler {
    /// No neighbours yet. `default_cost_bits` is the wire size of an update to a neighbour
    /// nothing was sent to yet.
    pub fn new(cfg: RateConfig, default_cost_bits: f64) -> Scheduler {
        Scheduler {
            cfg,
            slots: BTreeMap::new(),
            dirty: false,
            last_tick: None,
            credit: 0.0,
            default_cost_bits,
            update_bits: 0.0,
            side_bits: 0.0,
            side_since: None,
            upload_start: None,
            upload_now: None,
            side_bps: 0.0,
            balance: 0.0,
        }
    }

    /// Adds `peer`, or updates its distance.
    pub fn set_distance(&mut self, peer: NodeId, distance: f32) {
        let cost = self.default_cost_bits;
        let s = self.slots.entry(peer).or_insert(Slot {
            distance,
            cost_bits: cost,
            rate: 0.0,
            owed: 1.0,
            sends: 0,
            last_sent: None,
        });
        s.distance = if distance.is_finite() { distance.max(0.0) } else { f32::MAX };
        self.dirty = true;
    }

    /// Forgets `peer` (a farewell).
    pub fn remove(&mut self, peer: NodeId) {
        self.slots.remove(&peer);
        self.dirty = true;
    }

    /// An update to `peer` took `wire_bytes` on the wire (UDP payload and 28 bytes of headers).
    pub fn sent(&mut self, peer: NodeId, wire_bytes: usize) {
        if let Some(s) = self.slots.get_mut(&peer) {
            // A running estimate: deltas vary, and a full state now and then is part of it.
            s.cost_bits = s.cost_bits * 0.8 + wire_bytes as f64 * 8.0 * 0.2;
        }
        self.update_bits += wire_bytes as f64 * 8.0;
        self.dirty = true;
    }

    /// The node has sent `wire_bytes` in all so far (UDP payload and 28 bytes of headers per
    /// datagram, every VC and the relays' upkeep included). Told this, the scheduler fits
    /// updates to what the budget leaves after everything else the player sends, measured,
    /// rather than after the acks it sent alone: so the player's whole upload stays within the
    /// budget while the rest takes no more than three quarters of it.
    pub fn observe_upload(&mut self, wire_bytes: u64) {
        self.upload_now = Some(wire_bytes);
    }

    /// A message without an update (an ack that could not wait) took `wire_bytes` on the
    /// wire: it is paid from the same budget, so updates wait for it.
    pub fn spent(&mut self, wire_bytes: usize) {
        // A debt of at most a second's budget: past that, acks are paid for by nobody.
        self.credit = (self.credit - wire_bytes as f64 * 8.0).max(-self.cfg.budget_bps);
        self.side_bits += wire_bytes as f64 * 8.0;
    }

    /// What updates may spend: the budget less what went out besides them over the last
    /// window, less any overspend still to repay; never less than a quarter of it.
    fn update_budget(&self) -> f64 {
        let b = self.cfg.budget_bps;
        (b * (1.0 - HEADROOM) - self.side_bps + self.balance).max(b / 4.0)
    }

    /// The rate `peer` is served at, updates a second, as of the last [`Scheduler::tick`].
    pub fn rate(&self, peer: NodeId) -> Option<f32> {
        self.slots.get(&peer).map(|s| s.rate)
    }

    /// Updates sent to `peer` so far.
    pub fn sends(&self, peer: NodeId) -> u64 {
        self.slots.get(&peer).map_or(0, |s| s.sends)
    }

    /// The rate by distance alone.
    fn wanted(&self, distance: f32) -> f32 {
        let c = &self.cfg;
        if distance <= c.near {
            return c.full_hz;
        }
        if distance >= c.edge {
            return c.floor_hz;
        }
        let f = (distance - c.near) / (c.edge - c.near);
        c.full_hz + (c.floor_hz - c.full_hz) * f
    }

    /// Fits the rates to the budget: the farthest come down to the floor first, then all.
    fn rebalance(&mut self) {
        // Who is cut first: the farthest, but one served at the full rate counts as
        // [`KEEP_MARGIN`] nearer, so that two neighbours at about the same distance do not
        // trade the full rate and the floor every time one steps past the other.
        let full = self.cfg.full_hz;
        let order = |s: &Slot| s.distance - if s.rate >= full { KEEP_MARGIN } else { 0.0 };
        let mut far: Vec<NodeId> = self.slots.keys().copied().collect();
        far.sort_by(|a, b| order(&self.slots[b]).total_cmp(&order(&self.slots[a])).then(a.cmp(b)));
        let wanted: Vec<(NodeId, f32)> = self.slots.iter().map(|(&p, s)| (p, self.wanted(s.distance))).collect();
        for (p, w) in &wanted {
            if let Some(s) = self.slots.get_mut(p) {
                s.rate = *w;
            }
        }
        let total =
            |slots: &BTreeMap<NodeId, Slot>| slots.values().map(|s| f64::from(s.rate) * s.cost_bits).sum::<f64>();
        let budget = self.update_budget();
        let mut excess = total(&self.slots) - budget;
        if excess <= 0.0 {
            return;
        }
        // Farthest first down to the floor; if that is not enough, farthest first again down
        // to a quarter of it, so that the nearest keep their rate longest.
        for level in [self.cfg.floor_hz, self.cfg.floor_hz * STARVE_SHARE] {
            for p in &far {
                let Some(s) = self.slots.get_mut(p) else { continue };
                let spare = f64::from((s.rate - level).max(0.0)) * s.cost_bits;
                let cut = spare.min(excess);
                s.rate -= (cut / s.cost_bits) as f32;
                excess -= cut;
                if excess <= 0.0 {
                    return;
                }
            }
        }
        // Everyone at the least and still too much: all slow down together.
        let scale = (budget / total(&self.slots)) as f32;
        for s in self.slots.values_mut() {
            s.rate *= scale;
        }
    }

    /// The neighbours to send an update to at `now`, most overdue first; call [`Scheduler::sent`]
    /// for each one served.
    pub fn tick(&mut self, now: Instant) -> Vec<NodeId> {
        let dt = self.last_tick.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)).as_secs_f64();
        self.last_tick = Some(now);
        let since = *self.side_since.get_or_insert(now);
        let window = now.saturating_duration_since(since).as_secs_f64();
        if window >= 1.0 {
            let total = match (self.upload_start, self.upload_now) {
                (Some(a), Some(b)) => (b.saturating_sub(a) as f64 * 8.0).max(self.update_bits),
                _ => self.update_bits + self.side_bits,
            };
            self.side_bps = (total - self.update_bits) / window;
            let budget = self.cfg.budget_bps;
            self.balance = (self.balance + budget * window - total).clamp(-budget, 0.0);
            self.update_bits = 0.0;
            self.side_bits = 0.0;
            self.side_since = Some(now);
            self.upload_start = self.upload_now;
            self.dirty = true;
        }
        // Fitted once a tick, however many distances and costs changed since.
        if std::mem::take(&mut self.dirty) {
            self.rebalance();
        }
        self.credit = (self.credit + self.cfg.budget_bps * dt).min(self.cfg.budget_bps / 10.0);
        for s in self.slots.values_mut() {
            // Owed sends are capped, so that a neighbour held back does not get a burst.
            s.owed = (s.owed + f64::from(s.rate) * dt).min(2.0);
        }
        let mut due: Vec<(NodeId, f64, Option<Instant>)> =
            self.slots.iter().filter(|(_, s)| s.owed >= 1.0).map(|(&p, s)| (p, s.owed, s.last_sent)).collect();
        due.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        for (p, _, _) in due {
            let Some(s) = self.slots.get_mut(&p) else { continue };
            if s.cost_bits > self.credit {
                break;
            }
            self.credit -= s.cost_bits;
            s.owed -= 1.0;
            s.sends += 1;
            s.last_sent = Some(now);
            out.push(p);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8) -> NodeId {
        NodeId([i; 8])
    }

    /// `n` neighbours from 2 m out to 75 m, served for `secs` at 60 ticks a second with
    /// updates of `bytes` on the wire; returns each one's updates a second, nearest first,
    /// and the bits a second sent.
    fn serve(n: u8, bytes: usize, secs: u32) -> (Vec<f64>, f64) {
        let mut s = Scheduler::new(RateConfig::default(), bytes as f64 * 8.0);
        for i in 0..n {
            s.set_distance(peer(i), 2.0 + f32::from(i) * 73.0 / f32::from(n.max(2) - 1));
        }
        let t0 = Instant::now();
        let mut bits = 0.0;
        for k in 0..=60 * secs {
            for p in s.tick(t0 + Duration::from_secs(1) * k / 60) {
                s.sent(p, bytes);
                bits += bytes as f64 * 8.0;
            }
        }
        let rates = (0..n).map(|i| s.sends(peer(i)) as f64 / f64::from(secs)).collect();
        (rates, bits / f64::from(secs))
    }

    #[test]
    fn with_room_in_the_budget_rate_falls_with_distance_to_the_floor() {
        let (rates, bps) = serve(6, 40, 20);
        assert!(bps <= 96_000.0);
        assert!((rates[0] - 30.0).abs() < 0.5, "{rates:?}");
        assert!((rates[5] - 2.0).abs() < 0.2, "{rates:?}");
        assert!(rates.windows(2).all(|w| w[0] >= w[1] - 0.1), "{rates:?}");
    }

    #[test]
    fn forty_neighbours_stay_within_the_budget_and_the_nearest_keep_the_full_rate() {
        // 60 bytes on the wire: a compact update.
        let (rates, bps) = serve(40, 60, 20);
        assert!(bps <= 96_000.0 * 1.01, "{bps} bit/s");
        assert!(bps >= 96_000.0 * 0.9, "the budget is left unused: {bps} bit/s");
        assert!(rates[0] >= 29.5 && rates[1] >= 29.5, "{rates:?}");
        // Nobody starves: the farthest still get half an update a second.
        assert!(rates.iter().all(|&r| r >= 0.45), "{rates:?}");
    }

    #[test]
    fn past_the_budget_at_the_floor_everyone_slows_together_and_nobody_starves() {
        // 90-byte updates to 80 neighbours: the floor alone would be 115 kbit/s.
        let (rates, bps) = serve(80, 90, 20);
        assert!(bps <= 96_000.0 * 1.01, "{bps} bit/s");
        assert!(rates.iter().all(|&r| r >= 0.3), "{rates:?}");
    }
}
