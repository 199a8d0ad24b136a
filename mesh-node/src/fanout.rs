//! Fan-out groups: a publisher sends a datagram once, and the relay copies it to every member
//! of its group, so the publisher's upload does not grow with its audience.
//!
//! A group is (publisher, stream) at this relay. Only the control server makes members: a node
//! joins by presenting a signed subscription that names it, the group and this relay (checked
//! by the router before [`Groups::join`]), from the address its binding holds. A membership
//! ends when the subscription lapses, when the node leaves, or when its binding goes. The
//! members' addresses are kept contiguous, so that the driver sends one buffer to all of them
//! without a copy or an allocation per member.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use shoal_protocol::{Group, NodeId};

use crate::wire::SubscribeStatus;

/// How large fan-out may grow at one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutConfig {
    /// Most members of one group (default 512): a publisher's copies are bounded by it, and
    /// each counts against the publisher's rate limit.
    pub max_members: usize,
    /// Most groups held at once (default 65,536).
    pub max_groups: usize,
    /// How long copies for one member may wait to share a datagram (default 10 ms; zero sends
    /// each copy on its own). See [`crate::bundle`].
    pub bundle_window: Duration,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig { max_members: 512, max_groups: 65_536, bundle_window: Duration::from_millis(10) }
    }
}

#[derive(Debug, Default)]
struct Members {
    /// Where each member is reached, in the order of `nodes`.
    addrs: Vec<SocketAddr>,
    /// Each member and when its subscription lapses.
    nodes: Vec<(NodeId, Instant)>,
    /// The earliest lapse among them.
    next_lapse: Option<Instant>,
}

impl Members {
    fn remove(&mut self, i: usize) {
        self.addrs.swap_remove(i);
        self.nodes.swap_remove(i);
    }

    fn prune(&mut self, now: Instant) {
        if self.next_lapse.is_none_or(|t| now < t) {
            return;
        }
        let mut i = 0;
        while i < self.nodes.len() {
            if self.nodes[i].1 <= now { self.remove(i) } else { i += 1 }
        }
        self.next_lapse = self.nodes.iter().map(|n| n.1).min();
    }
}

/// Every group at one relay (one worker's copy; workers share memberships through events, as
/// they share bindings).
#[derive(Debug, Default)]
pub struct Groups {
    cfg: FanoutConfig,
    groups: FxHashMap<Group, Members>,
    members: usize,
}

impl Groups {
    /// No groups yet.
    pub fn new(cfg: FanoutConfig) -> Groups {
        Groups { cfg, groups: FxHashMap::default(), members: 0 }
    }

    /// Makes `node`, reached at `addr`, a member of `group` until `lapses` (or moves it there,
    /// or extends it, if it already is one).
    pub fn join(
        &mut self,
        group: Group,
        node: NodeId,
        addr: SocketAddr,
        lapses: Instant,
    ) -> Result<(), SubscribeStatus> {
        if !self.groups.contains_key(&group) && self.groups.len() >= self.cfg.max_groups {
            return Err(SubscribeStatus::TooManyGroups);
        }
        let m = self.groups.entry(group).or_default();
        if let Some(i) = m.nodes.iter().position(|n| n.0 == node) {
            m.addrs[i] = addr;
            m.nodes[i].1 = lapses;
        } else {
            if m.nodes.len() >= self.cfg.max_members {
                return Err(SubscribeStatus::GroupFull);
            }
            m.addrs.push(addr);
            m.nodes.push((node, lapses));
            self.members += 1;
        }
        m.next_lapse = m.nodes.iter().map(|n| n.1).min();
        Ok(())
    }

    /// Ends `node`'s membership of `group`; whether it was a member.
    pub fn leave(&mut self, group: Group, node: NodeId) -> bool {
        let Some(m) = self.groups.get_mut(&group) else { return false };
        let Some(i) = m.nodes.iter().position(|n| n.0 == node) else { return false };
        m.remove(i);
        self.members -= 1;
        if m.nodes.is_empty() {
            self.groups.remove(&group);
        }
        true
    }

    /// The members of `group` whose subscriptions hold at `now`, lapsed ones dropped first.
    pub fn members(&mut self, now: Instant, group: &Group) -> &[SocketAddr] {
        let Some(m) = self.groups.get_mut(group) else { return &[] };
        let before = m.nodes.len();
        m.prune(now);
        self.members -= before - m.nodes.len();
        &m.addrs
    }

    /// Where `group`'s members are reached, as of the last [`Groups::members`].
    pub fn addrs(&self, group: &Group) -> &[SocketAddr] {
        self.groups.get(group).map_or(&[], |m| &m.addrs)
    }

    /// `group`'s members and where each is reached, as of the last [`Groups::members`].
    pub fn each(&self, group: &Group) -> impl Iterator<Item = (NodeId, SocketAddr)> + '_ {
        self.groups.get(group).into_iter().flat_map(|m| m.nodes.iter().map(|n| n.0).zip(m.addrs.iter().copied()))
    }

    /// Drops lapsed memberships, and those whose node no longer holds a binding at the
    /// member's address (`bound(node, addr)`), and the groups left empty.
    pub fn sweep(&mut self, now: Instant, bound: impl Fn(NodeId, SocketAddr) -> bool) {
        self.groups.retain(|_, m| {
            m.prune(now);
            let mut i = 0;
            while i < m.nodes.len() {
                if bound(m.nodes[i].0, m.addrs[i]) {
                    i += 1;
                } else {
                    m.remove(i);
                }
            }
            m.next_lapse = m.nodes.iter().map(|n| n.1).min();
            !m.nodes.is_empty()
        });
        self.members = self.groups.values().map(|m| m.nodes.len()).sum();
    }

    /// Groups held.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Memberships held, across groups.
    pub fn member_count(&self) -> usize {
        self.members
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use shoal_protocol::StreamId;

    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId([b; 8])
    }

    fn addr(b: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, b], 5000))
    }

    const G: Group = Group { publisher: NodeId([1; 8]), stream: StreamId(0) };

    #[test]
    fn members_join_move_lapse_and_leave() {
        let t0 = Instant::now();
        let mut g = Groups::new(FanoutConfig { max_members: 2, max_groups: 1, ..FanoutConfig::default() });
        g.join(G, node(2), addr(2), t0 + Duration::from_secs(10)).unwrap();
        g.join(G, node(3), addr(3), t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(g.join(G, node(4), addr(4), t0 + Duration::from_secs(5)), Err(SubscribeStatus::GroupFull));
        let other = Group { publisher: node(9), stream: StreamId(0) };
        assert_eq!(g.join(other, node(4), addr(4), t0), Err(SubscribeStatus::TooManyGroups));
        // A member that moved is reached at its new address; renewing it adds no copy.
        g.join(G, node(2), addr(22), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(g.members(t0, &G), &[addr(22), addr(3)]);
        assert_eq!(g.member_count(), 2);
        // Node 3's subscription lapses at 5 s: no copy for it from then on.
        assert_eq!(g.members(t0 + Duration::from_secs(5), &G), &[addr(22)]);
        assert_eq!(g.member_count(), 1);
        assert!(g.leave(G, node(2)));
        assert!(!g.leave(G, node(2)));
        assert!(g.is_empty());
        assert_eq!(g.member_count(), 0);
    }

    #[test]
    fn a_member_whose_binding_went_gets_no_more_copies() {
        let t0 = Instant::now();
        let mut g = Groups::new(FanoutConfig::default());
        let later = t0 + Duration::from_secs(60);
        g.join(G, node(2), addr(2), later).unwrap();
        g.join(G, node(3), addr(3), later).unwrap();
        g.sweep(t0, |n, a| n == node(2) && a == addr(2));
        assert_eq!(g.addrs(&G), &[addr(2)]);
        g.sweep(t0, |_, _| false);
        assert!(g.is_empty());
        assert_eq!(g.member_count(), 0);
    }
}
