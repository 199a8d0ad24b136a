//! What the relay counts, and its Prometheus text form. Counters are plain integers owned by
//! each worker's router (no atomics on the hot path); the driver publishes snapshots, which
//! are summed when `/metrics` is scraped ([`Counters::encode`], through the collector the
//! driver registers with an [`exposition::Exposition`]).
//!
//! [`exposition`] is the rendering every Shoal daemon's `/metrics` shares.

pub use shoal_link::exposition;

use std::fmt;

use crate::router::{IDLE_EXPIRY, ParseErrorKind, UnbindRefusal};
use crate::wire::{BindRefusal, SubscribeStatus};

/// Why the relay dropped a datagram. Each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a valid datagram.
    Malformed(ParseErrorKind),
    /// No binding for the sender's address: it never presented a permit here.
    NotBound,
    /// The sender's binding lapsed with its permit.
    PermitExpired,
    /// A node sent a datagram claiming another source, or mid-route.
    SourceMismatch,
    /// Every relay on the route was already crossed.
    HopLimit,
    /// The route does not name this relay at the current hop.
    NotOnRoute,
    /// The next relay is not a bound peer, or the destination is not bound here.
    UnknownNextHop,
    /// The source exceeded its packet or byte rate.
    RateLimited,
    /// Too many bind proofs to verify right now.
    BindRateLimited,
    /// A bind proof was refused (see the refusal counters).
    BindRefused,
    /// An unbind was refused (see the unbind refusal counters).
    UnbindRefused,
    /// A challenge or ack from an address we are not binding to.
    UnsolicitedBindReply,
    /// Relays never forward notices.
    NoticeReceived,
    /// A reply could not be built (cannot happen with valid lengths; counted to be sure).
    Internal,
    /// A publish for a group with no members here.
    NoGroup,
    /// A subscribe was refused (see the subscribe answer counters).
    SubscribeRefused,
    /// A peer relay's copy of a group this relay is not fed by that relay.
    NotFed,
}

const PARSE_KINDS: [ParseErrorKind; 6] = [
    ParseErrorKind::Truncated,
    ParseErrorKind::Oversized,
    ParseErrorKind::Version,
    ParseErrorKind::Unknown,
    ParseErrorKind::Route,
    ParseErrorKind::Field,
];

impl DropReason {
    /// Every reason, for exposition.
    pub const ALL: [DropReason; 22] = [
        DropReason::Malformed(PARSE_KINDS[0]),
        DropReason::Malformed(PARSE_KINDS[1]),
        DropReason::Malformed(PARSE_KINDS[2]),
        DropReason::Malformed(PARSE_KINDS[3]),
        DropReason::Malformed(PARSE_KINDS[4]),
        DropReason::Malformed(PARSE_KINDS[5]),
        DropReason::NotBound,
        DropReason::PermitExpired,
        DropReason::SourceMismatch,
        DropReason::HopLimit,
        DropReason::NotOnRoute,
        DropReason::UnknownNextHop,
        DropReason::RateLimited,
        DropReason::BindRateLimited,
        DropReason::BindRefused,
        DropReason::UnsolicitedBindReply,
        DropReason::NoticeReceived,
        DropReason::Internal,
        DropReason::UnbindRefused,
        DropReason::NoGroup,
        DropReason::SubscribeRefused,
        DropReason::NotFed,
    ];

    fn index(self) -> usize {
        match self {
            DropReason::Malformed(k) => PARSE_KINDS.iter().position(|p| *p == k).unwrap_or(0),
            DropReason::NotBound => 6,
            DropReason::PermitExpired => 7,
            DropReason::SourceMismatch => 8,
            DropReason::HopLimit => 9,
            DropReason::NotOnRoute => 10,
            DropReason::UnknownNextHop => 11,
            DropReason::RateLimited => 12,
            DropReason::BindRateLimited => 13,
            DropReason::BindRefused => 14,
            DropReason::UnsolicitedBindReply => 15,
            DropReason::NoticeReceived => 16,
            DropReason::Internal => 17,
            DropReason::UnbindRefused => 18,
            DropReason::NoGroup => 19,
            DropReason::SubscribeRefused => 20,
            DropReason::NotFed => 21,
        }
    }

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed(ParseErrorKind::Truncated) => "malformed_truncated",
            DropReason::Malformed(ParseErrorKind::Oversized) => "malformed_oversized",
            DropReason::Malformed(ParseErrorKind::Version) => "malformed_version",
            DropReason::Malformed(ParseErrorKind::Unknown) => "malformed_unknown",
            DropReason::Malformed(ParseErrorKind::Route) => "malformed_route",
            DropReason::Malformed(ParseErrorKind::Field) => "malformed_field",
            DropReason::NotBound => "not_bound",
            DropReason::PermitExpired => "permit_expired",
            DropReason::SourceMismatch => "source_mismatch",
            DropReason::HopLimit => "hop_limit",
            DropReason::NotOnRoute => "not_on_route",
            DropReason::UnknownNextHop => "unknown_next_hop",
            DropReason::RateLimited => "rate_limited",
            DropReason::BindRateLimited => "bind_rate_limited",
            DropReason::BindRefused => "bind_refused",
            DropReason::UnsolicitedBindReply => "unsolicited_bind_reply",
            DropReason::NoticeReceived => "notice_received",
            DropReason::Internal => "internal",
            DropReason::UnbindRefused => "unbind_refused",
            DropReason::NoGroup => "no_group",
            DropReason::SubscribeRefused => "subscribe_refused",
            DropReason::NotFed => "not_fed",
        }
    }
}

fn refusal_label(r: BindRefusal) -> &'static str {
    match r {
        BindRefusal::BadCookie => "bad_cookie",
        BindRefusal::MalformedPermit => "malformed_permit",
        BindRefusal::ForgedPermit => "forged_permit",
        BindRefusal::ExpiredPermit => "expired_permit",
        BindRefusal::WrongRole => "wrong_role",
        BindRefusal::BadProof => "bad_proof",
        BindRefusal::WrongNode => "wrong_node",
        BindRefusal::Full => "full",
    }
}

fn subscribe_label(s: SubscribeStatus) -> &'static str {
    match s {
        SubscribeStatus::Member => "member",
        SubscribeStatus::Left => "left",
        SubscribeStatus::NotBound => "not_bound",
        SubscribeStatus::WrongRelay => "wrong_relay",
        SubscribeStatus::WrongSubscriber => "wrong_subscriber",
        SubscribeStatus::Expired => "expired",
        SubscribeStatus::Forged => "forged",
        SubscribeStatus::GroupFull => "group_full",
        SubscribeStatus::TooManyGroups => "too_many_groups",
    }
}

fn unbind_refusal_label(r: UnbindRefusal) -> &'static str {
    match r {
        UnbindRefusal::NotBound => "not_bound",
        UnbindRefusal::StaleChallenge => "stale_challenge",
        UnbindRefusal::BadPermit => "bad_permit",
        UnbindRefusal::BadProof => "bad_proof",
    }
}

/// The relay's state now, for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Nodes bound.
    pub bindings: usize,
    /// Fan-out groups with members.
    pub groups: usize,
    /// Memberships across them.
    pub members: usize,
    /// Groups other relays feed here.
    pub feeds: usize,
}

/// Upper bounds, in microseconds, of the per-hop latency histogram buckets.
pub const HOP_BUCKETS_US: [u64; 12] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];

/// A fixed-bucket histogram (cumulative counts are computed at exposition).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Count per bucket of [`HOP_BUCKETS_US`], plus one for larger values.
    pub buckets: [u64; HOP_BUCKETS_US.len() + 1],
    /// Sum of recorded values.
    pub sum: u64,
    /// Number of recorded values.
    pub count: u64,
}

impl Histogram {
    /// Records one value in microseconds.
    pub fn record(&mut self, us: u64) {
        let i = HOP_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(HOP_BUCKETS_US.len());
        self.buckets[i] += 1;
        self.sum += us;
        self.count += 1;
    }

    fn add(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// Everything one router counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams forwarded.
    pub forwarded_packets: u64,
    /// Bytes forwarded.
    pub forwarded_bytes: u64,
    /// Handshake replies sent (challenges, acks).
    pub replies: u64,
    /// Notices sent.
    pub notices_sent: u64,
    /// Bind proofs accepted.
    pub binds_accepted: u64,
    /// Datagrams the socket would not take (send buffer full, or an error).
    pub send_failures: u64,
    /// Datagrams from a peer relay whose source was charged to that relay's own rate limit
    /// because the table of per-source limits was full.
    pub sources_over_cap: u64,
    /// Bindings released by their node's unbind.
    pub unbinds: u64,
    /// Bindings dropped after the relay heard nothing from them for [`IDLE_EXPIRY`].
    pub idle_expired: u64,
    /// Datagrams publishers sent to their groups here.
    pub published: u64,
    /// Copies of them sent to members.
    pub copies: u64,
    /// Copies not sent because their publisher was past its rate limit.
    pub copies_rate_limited: u64,
    /// Datagrams the relays that feed groups here sent, fanned out again here.
    pub fed: u64,
    /// Feeds the control server gave this relay (renewals included).
    pub feeds_taken: u64,
    /// Answers from upstream relays refusing a feed this relay presented.
    pub feeds_refused: u64,
    /// Feeds not taken: not the control server's signature, lapsed, or not for this relay.
    pub feeds_invalid: u64,
    /// Bundles sent: datagrams that carried two copies or more for one member.
    pub bundles: u64,
    /// Copies sent inside bundles.
    pub bundled_copies: u64,
    subscribes: [u64; SubscribeStatus::ALL.len()],
    drops: [u64; DropReason::ALL.len()],
    refusals: [u64; BindRefusal::ALL.len()],
    unbind_refusals: [u64; UnbindRefusal::ALL.len()],
    /// Latency of the hop each forwarded, traced datagram arrived over, in microseconds.
    pub hop_latency: Histogram,
}

impl Counters {
    /// Counts a drop.
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    /// Drops counted for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Counts a refused bind proof.
    pub fn bind_refused(&mut self, r: BindRefusal) {
        self.refusals[r as usize - 1] += 1;
    }

    /// Bind proofs refused for `r`.
    pub fn bind_refusals(&self, r: BindRefusal) -> u64 {
        self.refusals[r as usize - 1]
    }

    /// Counts an answer to a subscribe.
    pub fn subscribe_answered(&mut self, s: SubscribeStatus) {
        self.subscribes[s as usize] += 1;
    }

    /// Subscribes answered with `s`.
    pub fn subscribes(&self, s: SubscribeStatus) -> u64 {
        self.subscribes[s as usize]
    }

    /// Counts a refused unbind.
    pub fn unbind_refused(&mut self, r: UnbindRefusal) {
        self.unbind_refusals[r as usize] += 1;
    }

    /// Unbinds refused for `r`.
    pub fn unbind_refusals(&self, r: UnbindRefusal) -> u64 {
        self.unbind_refusals[r as usize]
    }

    /// Adds `other` into `self` (summing workers).
    pub fn add(&mut self, other: &Counters) {
        self.forwarded_packets += other.forwarded_packets;
        self.forwarded_bytes += other.forwarded_bytes;
        self.replies += other.replies;
        self.notices_sent += other.notices_sent;
        self.binds_accepted += other.binds_accepted;
        self.send_failures += other.send_failures;
        self.sources_over_cap += other.sources_over_cap;
        self.unbinds += other.unbinds;
        self.idle_expired += other.idle_expired;
        self.published += other.published;
        self.copies += other.copies;
        self.copies_rate_limited += other.copies_rate_limited;
        self.fed += other.fed;
        self.feeds_taken += other.feeds_taken;
        self.feeds_refused += other.feeds_refused;
        self.feeds_invalid += other.feeds_invalid;
        self.bundles += other.bundles;
        self.bundled_copies += other.bundled_copies;
        for (a, b) in self.subscribes.iter_mut().zip(other.subscribes) {
            *a += b;
        }
        for (a, b) in self.unbind_refusals.iter_mut().zip(other.unbind_refusals) {
            *a += b;
        }
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
        for (a, b) in self.refusals.iter_mut().zip(other.refusals) {
            *a += b;
        }
        self.hop_latency.add(&other.hop_latency);
    }

    /// Writes every relay metric, with `now` (nodes bound, groups and memberships held) for
    /// the gauges (for a collector; see [`exposition`]).
    pub fn encode(&self, now: Gauges, e: &mut exposition::DescriptorEncoder<'_>) -> fmt::Result {
        use exposition::{counter, gauge, histogram, labelled_counters};
        counter(e, "shoal_relay_forwarded_packets_total", "Datagrams forwarded.", self.forwarded_packets)?;
        counter(e, "shoal_relay_forwarded_bytes_total", "Bytes forwarded.", self.forwarded_bytes)?;
        counter(e, "shoal_relay_replies_total", "Bind handshake replies sent.", self.replies)?;
        counter(e, "shoal_relay_notices_total", "Notices sent to senders of dropped datagrams.", self.notices_sent)?;
        counter(e, "shoal_relay_binds_accepted_total", "Bind proofs accepted.", self.binds_accepted)?;
        counter(e, "shoal_relay_send_failures_total", "Datagrams the socket would not take.", self.send_failures)?;
        counter(
            e,
            "shoal_relay_sources_over_cap_total",
            "Datagrams from peer relays rate-limited as the relay's own because the per-source table was full.",
            self.sources_over_cap,
        )?;
        counter(e, "shoal_relay_unbinds_total", "Bindings released by their node's unbind.", self.unbinds)?;
        let idle = format!("Bindings dropped after nothing was heard from them for {} s.", IDLE_EXPIRY.as_secs());
        counter(e, "shoal_relay_idle_expired_total", &idle, self.idle_expired)?;
        let drops = DropReason::ALL.map(|r| (r.label(), self.drops(r)));
        labelled_counters(e, "shoal_relay_dropped_total", "Datagrams dropped, by reason.", "reason", drops)?;
        let refusals = BindRefusal::ALL.map(|r| (refusal_label(r), self.bind_refusals(r)));
        labelled_counters(e, "shoal_relay_bind_refused_total", "Bind proofs refused, by reason.", "reason", refusals)?;
        let refusals = UnbindRefusal::ALL.map(|r| (unbind_refusal_label(r), self.unbind_refusals(r)));
        labelled_counters(e, "shoal_relay_unbind_refused_total", "Unbinds refused, by reason.", "reason", refusals)?;
        gauge(e, "shoal_relay_bindings", "Nodes currently bound.", now.bindings as u64)?;
        counter(
            e,
            "shoal_relay_published_total",
            "Datagrams publishers sent to their fan-out groups.",
            self.published,
        )?;
        counter(e, "shoal_relay_copies_total", "Copies of published datagrams sent to group members.", self.copies)?;
        counter(
            e,
            "shoal_relay_copies_rate_limited_total",
            "Copies not sent because their publisher was past its rate limit.",
            self.copies_rate_limited,
        )?;
        counter(
            e,
            "shoal_relay_fed_total",
            "Datagrams relays feeding groups here sent, fanned out again here.",
            self.fed,
        )?;
        counter(
            e,
            "shoal_relay_feeds_taken_total",
            "Feeds the control server gave (renewals included).",
            self.feeds_taken,
        )?;
        counter(e, "shoal_relay_feeds_refused_total", "Feeds upstream relays refused.", self.feeds_refused)?;
        counter(
            e,
            "shoal_relay_feeds_invalid_total",
            "Feeds not taken: not the control server's, lapsed, or not for this relay.",
            self.feeds_invalid,
        )?;
        gauge(e, "shoal_relay_feeds", "Groups other relays feed here.", now.feeds as u64)?;
        counter(e, "shoal_relay_bundles_total", "Datagrams that carried several copies for one member.", self.bundles)?;
        counter(e, "shoal_relay_bundled_copies_total", "Copies sent inside bundles.", self.bundled_copies)?;
        let answers = SubscribeStatus::ALL.map(|s| (subscribe_label(s), self.subscribes(s)));
        labelled_counters(e, "shoal_relay_subscribes_total", "Subscribes answered, by status.", "status", answers)?;
        gauge(e, "shoal_relay_groups", "Fan-out groups with members.", now.groups as u64)?;
        gauge(e, "shoal_relay_group_members", "Memberships across fan-out groups.", now.members as u64)?;
        let h = &self.hop_latency;
        let buckets: Vec<(f64, u64)> = HOP_BUCKETS_US.iter().map(|us| *us as f64 / 1e6).zip(h.buckets).collect();
        histogram(
            e,
            "shoal_relay_hop_latency_seconds",
            "Latency of the hop each traced datagram arrived over.",
            &buckets,
            h.sum as f64 / 1e6,
            h.count,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::exposition::{Collector, DescriptorEncoder, Exposition};
    use super::*;

    #[derive(Debug)]
    struct Snapshot(Counters);

    impl Collector for Snapshot {
        fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
            self.0.encode(Gauges { bindings: 3, groups: 1, members: 2, feeds: 1 }, &mut e)
        }
    }

    #[test]
    fn every_relay_metric_is_exposed_under_its_name_with_help_and_type() {
        let mut c = Counters { forwarded_packets: 5, ..Counters::default() };
        c.drop(DropReason::NotBound);
        c.drop(DropReason::Malformed(ParseErrorKind::Truncated));
        c.bind_refused(BindRefusal::Full);
        c.hop_latency.record(20);
        c.hop_latency.record(1_000_000);
        let text = Exposition::new(Snapshot(c)).render().unwrap();
        for line in [
            "# TYPE shoal_relay_forwarded_packets_total counter",
            "shoal_relay_forwarded_packets_total 5",
            "# HELP shoal_relay_dropped_total Datagrams dropped, by reason.",
            "# TYPE shoal_relay_dropped_total counter",
            "shoal_relay_dropped_total{reason=\"not_bound\"} 1",
            "shoal_relay_dropped_total{reason=\"malformed_truncated\"} 1",
            "shoal_relay_dropped_total{reason=\"internal\"} 0",
            "shoal_relay_bind_refused_total{reason=\"full\"} 1",
            "# TYPE shoal_relay_bindings gauge",
            "shoal_relay_bindings 3",
            "shoal_relay_groups 1",
            "shoal_relay_group_members 2",
            "shoal_relay_feeds 1",
            "shoal_relay_subscribes_total{status=\"forged\"} 0",
            "# TYPE shoal_relay_hop_latency_seconds histogram",
            "shoal_relay_hop_latency_seconds_bucket{le=\"2.5e-05\"} 1",
            "shoal_relay_hop_latency_seconds_bucket{le=\"0.25\"} 1",
            "shoal_relay_hop_latency_seconds_bucket{le=\"+Inf\"} 2",
            "shoal_relay_hop_latency_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Every family has its HELP and TYPE.
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, text.lines().filter(|l| l.starts_with("# HELP")).count());
        assert_eq!(families, 27);
    }
}
