//! A sans-IO model of a NAT box for the simulator, with the mapping and filtering behaviours
//! of RFC 4787, so that scenarios can put players behind the kinds of routers they sit behind
//! in homes and on mobile networks.
//!
//! A [`Nat`] holds UDP mappings from an internal (private) address to a port on its public
//! address. [`Nat::outbound`] translates a datagram leaving the private side, creating or
//! refreshing the mapping; [`Nat::inbound`] translates one arriving at the public address, or
//! refuses it. Time is passed in; public ports are handed out in a fixed order from a seed, so
//! a run is reproducible.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Lowest public port a NAT hands out (the well-known and registered-low ports stay free).
const FIRST_PORT: u16 = 1024;

/// Which outbound datagrams share a mapping (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// One public port per internal address, whatever the destination.
    EndpointIndependent,
    /// One public port per internal address and destination IP address.
    AddressDependent,
    /// One public port per internal address and destination address and port ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound datagrams a mapping lets through (RFC 4787 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Any source ("full cone").
    EndpointIndependent,
    /// Sources whose IP address the internal host has sent to through the mapping.
    AddressDependent,
    /// Sources whose address and port the internal host has sent to through the mapping.
    AddressAndPortDependent,
}

/// How a NAT behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    /// Which outbound datagrams share a mapping.
    pub mapping: Mapping,
    /// Which inbound datagrams a mapping admits.
    pub filtering: Filtering,
    /// How long a mapping lives after the last outbound datagram through it. RFC 4787 REQ-5
    /// asks for at least two minutes, but many home routers keep UDP mappings for 30 s.
    pub timeout: Duration,
    /// Whether a host may reach another host behind the same NAT at its public mapping
    /// (hairpinning, RFC 4787 REQ-9).
    pub hairpin: bool,
}

impl NatConfig {
    /// The 30 s UDP mapping lifetime of many home routers.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    fn with(mapping: Mapping, filtering: Filtering) -> NatConfig {
        NatConfig { mapping, filtering, timeout: NatConfig::DEFAULT_TIMEOUT, hairpin: false }
    }

    /// The common home router: endpoint-independent mapping, address-and-port-dependent
    /// filtering ("port-restricted cone").
    pub fn home() -> NatConfig {
        NatConfig::with(Mapping::EndpointIndependent, Filtering::AddressAndPortDependent)
    }

    /// Endpoint-independent mapping and filtering: anyone may send to a mapping.
    pub fn full_cone() -> NatConfig {
        NatConfig::with(Mapping::EndpointIndependent, Filtering::EndpointIndependent)
    }

    /// Endpoint-independent mapping, address-dependent filtering ("restricted cone").
    pub fn address_restricted() -> NatConfig {
        NatConfig::with(Mapping::EndpointIndependent, Filtering::AddressDependent)
    }

    /// A mapping per destination IP address, address-and-port-dependent filtering.
    pub fn address_dependent() -> NatConfig {
        NatConfig::with(Mapping::AddressDependent, Filtering::AddressAndPortDependent)
    }

    /// A mapping per destination address and port, address-and-port-dependent filtering: the
    /// NAT that defeats hole punching without port prediction (carrier-grade and some
    /// enterprise NATs).
    pub fn symmetric() -> NatConfig {
        NatConfig::with(Mapping::AddressAndPortDependent, Filtering::AddressAndPortDependent)
    }

    /// The same NAT with mappings that live `timeout` after their last outbound datagram.
    pub fn with_timeout(self, timeout: Duration) -> NatConfig {
        NatConfig { timeout, ..self }
    }

    /// The same NAT with hairpinning on or off.
    pub fn with_hairpin(self, hairpin: bool) -> NatConfig {
        NatConfig { hairpin, ..self }
    }
}

/// What a NAT has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatStats {
    /// Mappings created (a refresh is not a new mapping).
    pub mappings_created: u64,
    /// Inbound datagrams translated to an internal host.
    pub inbound_admitted: u64,
    /// Inbound datagrams refused: no live mapping on that port, or the filter refused the
    /// source.
    pub inbound_filtered: u64,
    /// Mappings dropped because no outbound datagram refreshed them in time.
    pub expired: u64,
    /// Datagrams from inside to the NAT's own public address, dropped because the NAT does
    /// not hairpin.
    pub hairpin_refused: u64,
}

/// The part of a destination that selects a mapping, by [`Mapping`] behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Any,
    Addr(IpAddr),
    AddrPort(SocketAddr),
}

impl Scope {
    fn of(mapping: Mapping, dst: SocketAddr) -> Scope {
        match mapping {
            Mapping::EndpointIndependent => Scope::Any,
            Mapping::AddressDependent => Scope::Addr(dst.ip()),
            Mapping::AddressAndPortDependent => Scope::AddrPort(dst),
        }
    }
}

/// One live mapping.
#[derive(Debug, Clone)]
struct Binding {
    private: SocketAddr,
    scope: Scope,
    /// Destinations the internal host sent to through this mapping: what the filter admits.
    sent_to: BTreeSet<SocketAddr>,
    /// The last outbound datagram through it.
    refreshed: Instant,
}

/// A NAT box. See the module docs.
#[derive(Debug, Clone)]
pub struct Nat {
    public_ip: IpAddr,
    cfg: NatConfig,
    /// Live mappings by public port.
    by_port: BTreeMap<u16, Binding>,
    /// The public port of each live mapping, by internal address and scope.
    by_private: BTreeMap<(SocketAddr, Scope), u16>,
    /// Each mapping's last refresh and port, oldest first: what expires next.
    by_refresh: BTreeSet<(Instant, u16)>,
    /// The next port to try when allocating.
    next_port: u16,
    stats: NatStats,
}

impl Nat {
    /// A NAT on `public_ip` behaving as `cfg`. Public ports are allocated one after another
    /// from a starting port derived from `port_seed`.
    pub fn new(public_ip: IpAddr, cfg: NatConfig, port_seed: u64) -> Nat {
        let span = u64::from(u16::MAX - FIRST_PORT) + 1;
        let next_port = FIRST_PORT + (port_seed % span) as u16;
        Nat {
            public_ip,
            cfg,
            by_port: BTreeMap::new(),
            by_private: BTreeMap::new(),
            by_refresh: BTreeSet::new(),
            next_port,
            stats: NatStats::default(),
        }
    }

    /// The NAT's public address.
    pub fn public_ip(&self) -> IpAddr {
        self.public_ip
    }

    /// How it behaves.
    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    /// What it has done so far.
    pub fn stats(&self) -> NatStats {
        self.stats
    }

    /// Live mappings at `now`.
    pub fn live_mappings(&self, now: Instant) -> usize {
        self.by_port.values().filter(|b| self.is_live(b, now)).count()
    }

    /// Translates a datagram from `private_src` to `dst` leaving at `now`: returns the public
    /// source address it leaves with, creating the mapping or refreshing it.
    pub fn outbound(&mut self, now: Instant, private_src: SocketAddr, dst: SocketAddr) -> SocketAddr {
        self.expire(now);
        let scope = Scope::of(self.cfg.mapping, dst);
        let port = match self.by_private.get(&(private_src, scope)) {
            Some(&port) => port,
            None => {
                let port = self.allocate();
                let b = Binding { private: private_src, scope, sent_to: BTreeSet::new(), refreshed: now };
                self.by_port.insert(port, b);
                self.by_private.insert((private_src, scope), port);
                self.stats.mappings_created += 1;
                port
            }
        };
        if let Some(b) = self.by_port.get_mut(&port) {
            b.sent_to.insert(dst);
            self.by_refresh.remove(&(b.refreshed, port));
            self.by_refresh.insert((now, port));
            b.refreshed = now;
        }
        SocketAddr::new(self.public_ip, port)
    }

    /// Translates a datagram from `from` arriving at `public_dst` at `now`: the internal
    /// address to deliver it to, or `None` if no live mapping holds that port or the filter
    /// refuses `from`. Inbound datagrams do not refresh the mapping (RFC 4787 REQ-6 allows
    /// either; refreshing only on outbound traffic is the conservative choice).
    pub fn inbound(&mut self, now: Instant, from: SocketAddr, public_dst: SocketAddr) -> Option<SocketAddr> {
        self.expire(now);
        let admitted = (public_dst.ip() == self.public_ip)
            .then(|| self.by_port.get(&public_dst.port()))
            .flatten()
            .filter(|b| match self.cfg.filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => b.sent_to.iter().any(|d| d.ip() == from.ip()),
                Filtering::AddressAndPortDependent => b.sent_to.contains(&from),
            })
            .map(|b| b.private);
        if admitted.is_some() {
            self.stats.inbound_admitted += 1;
        } else {
            self.stats.inbound_filtered += 1;
        }
        admitted
    }

    /// Translates a datagram from `private_src` to this NAT's own public address
    /// `public_dst`: the public source it is looped back with (the mapping created or
    /// refreshed as by [`Nat::outbound`]), or `None`, counted, if the NAT does not hairpin.
    /// The looped-back datagram then goes through [`Nat::inbound`] like any other.
    pub fn hairpin(&mut self, now: Instant, private_src: SocketAddr, public_dst: SocketAddr) -> Option<SocketAddr> {
        if self.cfg.hairpin {
            Some(self.outbound(now, private_src, public_dst))
        } else {
            self.stats.hairpin_refused += 1;
            None
        }
    }

    /// The public address of `private_src`'s live mapping towards `dst`, without creating or
    /// refreshing one.
    pub fn mapping(&self, now: Instant, private_src: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
        let port = *self.by_private.get(&(private_src, Scope::of(self.cfg.mapping, dst)))?;
        let b = self.by_port.get(&port)?;
        self.is_live(b, now).then(|| SocketAddr::new(self.public_ip, port))
    }

    /// The internal address a live mapping on `public_dst` leads to, whatever the filter
    /// would say, without counting anything.
    pub fn target(&self, now: Instant, public_dst: SocketAddr) -> Option<SocketAddr> {
        if public_dst.ip() != self.public_ip {
            return None;
        }
        self.by_port.get(&public_dst.port()).filter(|b| self.is_live(b, now)).map(|b| b.private)
    }

    fn is_live(&self, b: &Binding, now: Instant) -> bool {
        now < b.refreshed + self.cfg.timeout
    }

    /// Drops the mappings that have timed out.
    fn expire(&mut self, now: Instant) {
        while let Some(&(refreshed, port)) = self.by_refresh.first() {
            if now < refreshed + self.cfg.timeout {
                break;
            }
            self.by_refresh.pop_first();
            if let Some(b) = self.by_port.remove(&port) {
                self.by_private.remove(&(b.private, b.scope));
                self.stats.expired += 1;
            }
        }
    }

    /// The next free public port after the last one handed out, wrapping within
    /// `FIRST_PORT..=u16::MAX`. Ports of live mappings are skipped.
    ///
    /// # Panics
    /// If every port holds a live mapping: a scenario that leaks mappings.
    #[allow(clippy::panic)]
    fn allocate(&mut self) -> u16 {
        for _ in FIRST_PORT..=u16::MAX {
            let port = self.next_port;
            self.next_port = if port == u16::MAX { FIRST_PORT } else { port + 1 };
            if !self.by_port.contains_key(&port) {
                return port;
            }
        }
        panic!("NAT {} has no free public port", self.public_ip);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PUBLIC: [u8; 4] = [203, 0, 113, 1];

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    fn inside() -> SocketAddr {
        addr([192, 168, 0, 1], 7000)
    }

    fn nat(cfg: NatConfig) -> (Nat, Instant) {
        (Nat::new(IpAddr::from(PUBLIC), cfg, 42), Instant::now())
    }

    #[test]
    fn endpoint_independent_mapping_reuses_one_public_port() {
        let (mut n, t) = nat(NatConfig::home());
        let a = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        let b = n.outbound(t, inside(), addr([198, 51, 100, 1], 9001));
        let c = n.outbound(t, inside(), addr([198, 51, 100, 2], 9000));
        assert_eq!(a.ip(), IpAddr::from(PUBLIC));
        assert_eq!((a, a), (b, c));
        assert_eq!(n.stats().mappings_created, 1);
    }

    #[test]
    fn address_dependent_mapping_is_per_destination_ip() {
        let (mut n, t) = nat(NatConfig::address_dependent());
        let a = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        let same_ip = n.outbound(t, inside(), addr([198, 51, 100, 1], 9001));
        let other_ip = n.outbound(t, inside(), addr([198, 51, 100, 2], 9000));
        assert_eq!(a, same_ip);
        assert_ne!(a, other_ip);
        assert_eq!(n.stats().mappings_created, 2);
    }

    #[test]
    fn symmetric_mapping_is_per_destination_address_and_port() {
        let (mut n, t) = nat(NatConfig::symmetric());
        let a = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        let other_port = n.outbound(t, inside(), addr([198, 51, 100, 1], 9001));
        let other_ip = n.outbound(t, inside(), addr([198, 51, 100, 2], 9000));
        let again = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        assert_eq!(a, again);
        assert_ne!(a, other_port);
        assert_ne!(a, other_ip);
        assert_ne!(other_port, other_ip);
        assert_eq!(n.stats().mappings_created, 3);
    }

    #[test]
    fn each_internal_address_gets_its_own_mapping() {
        let (mut n, t) = nat(NatConfig::home());
        let dst = addr([198, 51, 100, 1], 9000);
        let a = n.outbound(t, inside(), dst);
        let b = n.outbound(t, addr([192, 168, 0, 2], 7000), dst);
        let c = n.outbound(t, addr([192, 168, 0, 1], 7001), dst);
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn endpoint_independent_filtering_admits_anyone() {
        let (mut n, t) = nat(NatConfig::full_cone());
        let public = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        assert_eq!(n.inbound(t, addr([192, 0, 2, 7], 1234), public), Some(inside()));
        assert_eq!(n.stats().inbound_admitted, 1);
    }

    #[test]
    fn address_dependent_filtering_admits_any_port_of_a_contacted_address() {
        let (mut n, t) = nat(NatConfig::address_restricted());
        let public = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        assert_eq!(n.inbound(t, addr([198, 51, 100, 1], 9000), public), Some(inside()));
        assert_eq!(n.inbound(t, addr([198, 51, 100, 1], 5555), public), Some(inside()));
        assert_eq!(n.inbound(t, addr([198, 51, 100, 2], 9000), public), None);
        assert_eq!(n.stats().inbound_admitted, 2);
        assert_eq!(n.stats().inbound_filtered, 1);
    }

    #[test]
    fn address_and_port_dependent_filtering_admits_only_contacted_endpoints() {
        let (mut n, t) = nat(NatConfig::home());
        let server = addr([198, 51, 100, 1], 9000);
        let public = n.outbound(t, inside(), server);
        assert_eq!(n.inbound(t, server, public), Some(inside()));
        assert_eq!(n.inbound(t, addr([198, 51, 100, 1], 9001), public), None);
        assert_eq!(n.inbound(t, addr([198, 51, 100, 2], 9000), public), None);
        // Once the internal host sends to the peer, the same mapping admits it (hole punching
        // behind an endpoint-independent mapping).
        let peer = addr([192, 0, 2, 9], 4000);
        assert_eq!(n.outbound(t, inside(), peer), public);
        assert_eq!(n.inbound(t, peer, public), Some(inside()));
        assert_eq!(n.stats().inbound_filtered, 2);
        assert_eq!(n.stats().inbound_admitted, 2);
    }

    #[test]
    fn datagrams_to_unmapped_ports_or_other_addresses_are_refused() {
        let (mut n, t) = nat(NatConfig::full_cone());
        let public = n.outbound(t, inside(), addr([198, 51, 100, 1], 9000));
        let unmapped = SocketAddr::new(public.ip(), public.port().wrapping_add(1));
        let elsewhere = addr([203, 0, 113, 2], public.port());
        let from = addr([198, 51, 100, 1], 9000);
        assert_eq!(n.inbound(t, from, unmapped), None);
        assert_eq!(n.inbound(t, from, elsewhere), None);
        assert_eq!(n.target(t, unmapped), None);
        assert_eq!(n.stats().inbound_filtered, 2);
    }

    #[test]
    fn a_mapping_expires_without_outbound_traffic_and_outbound_refreshes_it() {
        let timeout = Duration::from_secs(10);
        let (mut n, t) = nat(NatConfig::home().with_timeout(timeout));
        let server = addr([198, 51, 100, 1], 9000);
        let public = n.outbound(t, inside(), server);
        // Refreshed just before it would have expired, so it lives another timeout from here.
        let refresh = t + timeout - Duration::from_millis(1);
        assert_eq!(n.outbound(refresh, inside(), server), public);
        let late = t + timeout + Duration::from_secs(5);
        assert_eq!(n.inbound(late, server, public), Some(inside()));
        assert_eq!(n.mapping(late, inside(), server), Some(public));
        // Inbound traffic does not keep it alive.
        let dead = refresh + timeout;
        assert_eq!(n.mapping(dead, inside(), server), None);
        assert_eq!(n.inbound(dead, server, public), None);
        assert_eq!(n.stats().expired, 1);
        assert_eq!(n.live_mappings(dead), 0);
        // The next datagram out creates a new mapping on another port.
        let fresh = n.outbound(dead, inside(), server);
        assert_ne!(fresh, public);
        assert_eq!(n.stats().mappings_created, 2);
    }

    #[test]
    fn the_default_timeout_is_thirty_seconds() {
        let (mut n, t) = nat(NatConfig::home());
        let server = addr([198, 51, 100, 1], 9000);
        let public = n.outbound(t, inside(), server);
        assert_eq!(n.inbound(t + Duration::from_secs(29), server, public), Some(inside()));
        assert_eq!(n.inbound(t + Duration::from_secs(30), server, public), None);
    }

    #[test]
    fn public_ports_are_unique_and_follow_the_seed() {
        let (mut n, t) = nat(NatConfig::symmetric());
        let ports: Vec<u16> =
            (0..2000u16).map(|i| n.outbound(t, inside(), addr([198, 51, 100, 1], 10_000 + i)).port()).collect();
        let unique: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|&p| p >= FIRST_PORT));
        let (mut again, _) = nat(NatConfig::symmetric());
        assert_eq!(again.outbound(t, inside(), addr([198, 51, 100, 1], 10_000)).port(), ports[0]);
        let mut other = Nat::new(IpAddr::from(PUBLIC), NatConfig::symmetric(), 7);
        assert_ne!(other.outbound(t, inside(), addr([198, 51, 100, 1], 10_000)).port(), ports[0]);
    }

    #[test]
    fn allocation_wraps_and_skips_ports_still_in_use() {
        let (timeout, t) = (Duration::from_secs(10), Instant::now());
        // The seed that starts at the last port.
        let seed = u64::from(u16::MAX - FIRST_PORT);
        let mut n = Nat::new(IpAddr::from(PUBLIC), NatConfig::symmetric().with_timeout(timeout), seed);
        let server = addr([198, 51, 100, 1], 1);
        let keep = n.outbound(t, inside(), server);
        assert_eq!(keep.port(), u16::MAX);
        // Fill every other port, wrapping to the bottom of the range.
        let span = u32::from(u16::MAX - FIRST_PORT) + 1;
        let ports: Vec<u16> =
            (1..span).map(|i| n.outbound(t, inside(), addr([198, 51, 101, 1], i as u16)).port()).collect();
        assert_eq!((ports[0], ports[ports.len() - 1]), (FIRST_PORT, u16::MAX - 1));
        assert_eq!(n.live_mappings(t), span as usize);
        // All but the first mapping expire; the next allocation skips its port.
        let later = t + timeout - Duration::from_millis(1);
        assert_eq!(n.outbound(later, inside(), server), keep);
        let fresh = n.outbound(t + timeout, inside(), addr([198, 51, 100, 2], 1));
        assert_eq!(fresh.port(), FIRST_PORT);
        assert_eq!(n.stats().expired, u64::from(span) - 1);
        assert_eq!(n.mapping(t + timeout, inside(), server), Some(keep));
    }

    #[test]
    fn hairpinning_loops_back_through_the_mapping_only_when_enabled() {
        let (mut off, t) = nat(NatConfig::home());
        let other = addr([192, 168, 0, 2], 7000);
        let target = off.outbound(t, other, addr([198, 51, 100, 1], 9000));
        assert_eq!(off.hairpin(t, inside(), target), None);
        assert_eq!(off.stats().hairpin_refused, 1);

        let (mut on, t) = nat(NatConfig::full_cone().with_hairpin(true));
        let target = on.outbound(t, other, addr([198, 51, 100, 1], 9000));
        let src = on.hairpin(t, inside(), target).unwrap();
        assert_eq!(src.ip(), IpAddr::from(PUBLIC));
        assert_eq!(on.inbound(t, src, target), Some(other));
    }
}
