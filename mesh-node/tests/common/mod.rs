//! The relay and endpoint cores wired in memory on a virtual clock, shared by the mesh tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_mesh::bind::Transmit;
use shoal_mesh::endpoint::{Endpoint, EndpointEvent, Received};
use shoal_mesh::router::{Rate, Router, RouterConfig, Verdict};
use shoal_protocol::{Identity, Roles, SignedTicket, TicketBody, TicketKind, UnixTime};

pub(crate) const T0_UNIX: u64 = 1_800_000_000;
/// Latency of every link.
pub(crate) const HOP: Duration = Duration::from_micros(100);

pub(crate) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub(crate) fn permit(control: &Identity, node: &Identity, roles: Roles, ttl: u64) -> SignedTicket {
    TicketBody::new(TicketKind::RelayPermit, node.public_key(), roles, UnixTime(T0_UNIX), ttl).sign(control)
}

pub(crate) fn relay_cfg(control: &Identity, seed: u8) -> RouterConfig {
    let identity = Identity::from_seed([seed; 32]);
    let lots = Rate { per_sec: 1e6, burst: 1e6 };
    RouterConfig {
        permit: Some(permit(control, &identity, Roles::RELAY, 3600)),
        identity,
        control_key: control.public_key(),
        source_packets: Rate { per_sec: 100.0, burst: 20.0 },
        source_bytes: lots,
        bind_verifications: lots,
        notices: lots,
        max_bindings: 16,
        cookie_secret: [seed; 32],
        fanout: shoal_mesh::fanout::FanoutConfig::default(),
    }
}

pub(crate) enum Node {
    Relay(Box<Router>),
    End(Box<Endpoint>),
}

/// An in-memory loopback: every datagram is delivered after `latency`.
pub(crate) struct Net {
    pub(crate) now: Instant,
    pub(crate) nodes: Vec<(SocketAddr, Node)>,
    pub(crate) queue: VecDeque<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
    pub(crate) events: Vec<(SocketAddr, EndpointEvent)>,
}

impl Net {
    pub(crate) fn send(&mut self, from: SocketAddr, t: Transmit) {
        self.queue.push_back((self.now + HOP, from, t.to, t.bytes));
    }

    pub(crate) fn drain(&mut self, i: usize) {
        let from = self.nodes[i].0;
        let mut out = Vec::new();
        match &mut self.nodes[i].1 {
            Node::Relay(r) => {
                while let Some(t) = r.poll_transmit() {
                    out.push(t);
                }
                while r.poll_event().is_some() {}
            }
            Node::End(e) => {
                while let Some(t) = e.poll_transmit() {
                    out.push(t);
                }
                while let Some(ev) = e.poll_event() {
                    self.events.push((from, ev));
                }
            }
        }
        for t in out {
            self.send(from, t);
        }
    }

    pub(crate) fn run(&mut self, dur: Duration) {
        self.run_by(dur, Duration::from_micros(100));
    }

    /// Runs in steps of `step` (a datagram sent within a step arrives at the next).
    pub(crate) fn run_by(&mut self, dur: Duration, step: Duration) {
        let end = self.now + dur;
        while self.now < end {
            self.now += step;
            let now = self.now;
            for i in 0..self.nodes.len() {
                match &mut self.nodes[i].1 {
                    Node::Relay(r) => r.handle_timeout(now),
                    Node::End(e) => e.handle_timeout(now),
                }
                self.drain(i);
            }
            while self.queue.front().is_some_and(|q| q.0 <= now) {
                let (_, from, to, mut bytes) = self.queue.pop_front().unwrap();
                let Some(i) = self.nodes.iter().position(|n| n.0 == to) else { continue };
                match &mut self.nodes[i].1 {
                    Node::Relay(r) => match r.handle_datagram(now, from, &mut bytes) {
                        Verdict::Forward(next) => self.queue.push_back((now + HOP, to, next, bytes)),
                        Verdict::Reply(n) | Verdict::DropWithNotice(_, n) => {
                            bytes.truncate(n);
                            self.queue.push_back((now + HOP, to, from, bytes));
                        }
                        Verdict::FanOut(group) => {
                            for &next in r.copies_for(&group) {
                                self.queue.push_back((now + HOP, to, next, bytes.clone()));
                            }
                        }
                        Verdict::Drop(_) | Verdict::Consumed => {}
                    },
                    Node::End(e) => e.handle_datagram(now, from, &bytes),
                }
                self.drain(i);
            }
        }
    }

    pub(crate) fn relay(&mut self, i: usize) -> &mut Router {
        match &mut self.nodes[i].1 {
            Node::Relay(r) => r,
            Node::End(_) => panic!("not a relay"),
        }
    }

    pub(crate) fn endpoint(&mut self, i: usize) -> &mut Endpoint {
        match &mut self.nodes[i].1 {
            Node::End(e) => e,
            Node::Relay(_) => panic!("not an endpoint"),
        }
    }

    pub(crate) fn received(&mut self, at: SocketAddr) -> Vec<Received> {
        self.take_events(at)
            .into_iter()
            .filter_map(|e| match e {
                EndpointEvent::Received(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn take_events(&mut self, at: SocketAddr) -> Vec<EndpointEvent> {
        let (mine, rest) = std::mem::take(&mut self.events).into_iter().partition(|(a, _)| *a == at);
        self.events = rest;
        mine.into_iter().map(|(_, e)| e).collect()
    }
}
