//! Bundling at the relay: the copies a relay sends one member within a short window go out as
//! one [`Kind::Bundle`] datagram, so a watcher of many publishers costs the relay one send (and
//! the watcher's link one IP and UDP header) per window rather than one per copy.
//!
//! A crowd is where fan-out pays: each watcher takes the streams of up to hundreds of players
//! through the same relay, each at a few hertz. The kernel's send is most of what a copy costs
//! the relay (the router's checks are done once per publish), so copies to the same member are
//! appended to that member's open bundle (one memory copy each) and the bundle is sent when it
//! is full or its window has passed. A bundle that holds one copy goes out as that copy alone,
//! as it would have without bundling.
//!
//! Sans-IO, owned by the router: [`Bundler::push`] on each copy, [`Bundler::flush_due`] when
//! [`Bundler::poll_timeout`] says, and the bundles come out of [`Bundler::poll_transmit`].
//! Their buffers come back through [`Bundler::recycle`], so that a relay in its steady state
//! allocates nothing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use shoal_protocol::NodeId;

use crate::bind::Transmit;
use crate::wire::{self, BUNDLE_ENTRY_LEN, HEADER_LEN, Header, Kind, MAX_DATAGRAM, Route, VcId};

/// Buffers kept for reuse, at most.
const FREE_MAX: usize = 1024;

#[derive(Debug)]
struct Open {
    buf: Vec<u8>,
    copies: u32,
    deadline: Instant,
}

/// Open bundles, one per member address. See the module docs.
#[derive(Debug)]
pub struct Bundler {
    me: NodeId,
    window: Duration,
    open: FxHashMap<SocketAddr, Open>,
    /// Open bundles in the order they were opened, with their deadlines (which therefore only
    /// grow); an entry whose bundle was sent early is skipped.
    due: VecDeque<(Instant, SocketAddr)>,
    free: Vec<Vec<u8>>,
    out: VecDeque<Transmit>,
    /// Bundles sent (of two copies or more).
    pub bundles: u64,
    /// Copies sent inside them.
    pub bundled_copies: u64,
}

impl Bundler {
    /// Bundles for relay `me`, each sent at most `window` after its first copy.
    pub fn new(me: NodeId, window: Duration) -> Bundler {
        Bundler {
            me,
            window,
            open: FxHashMap::default(),
            due: VecDeque::new(),
            free: Vec::new(),
            out: VecDeque::new(),
            bundles: 0,
            bundled_copies: 0,
        }
    }

    /// Whether two copies of `len` bytes fit one bundle (larger ones gain nothing from it).
    pub fn shares(len: usize) -> bool {
        HEADER_LEN + 2 * (BUNDLE_ENTRY_LEN + len) <= MAX_DATAGRAM
    }

    /// Queues `copy` (a whole datagram) for `member`, reached at `to`.
    pub fn push(&mut self, now: Instant, member: NodeId, to: SocketAddr, copy: &[u8]) {
        let entry = BUNDLE_ENTRY_LEN + copy.len();
        if HEADER_LEN + entry > MAX_DATAGRAM {
            // Too large to share a datagram with anything: as it is, now.
            let mut bytes = self.buffer();
            bytes.extend_from_slice(copy);
            self.out.push_back(Transmit { to, bytes });
            return;
        }
        if self.open.get(&to).is_some_and(|o| o.buf.len() + entry > MAX_DATAGRAM) {
            self.close(to);
        }
        if !self.open.contains_key(&to) {
            let mut buf = self.buffer();
            buf.resize(HEADER_LEN, 0);
            let h = Header { kind: Kind::Bundle, source: self.me, destination: member, vc: VcId(0), trace: false };
            if wire::emit_header(&mut buf, &h, &Route::DIRECT, 0, 0, 0).is_err() {
                return;
            }
            let deadline = now + self.window;
            self.open.insert(to, Open { buf, copies: 0, deadline });
            self.due.push_back((deadline, to));
        }
        if let Some(o) = self.open.get_mut(&to) {
            o.buf.extend_from_slice(&(copy.len() as u16).to_be_bytes());
            o.buf.extend_from_slice(copy);
            o.copies += 1;
        }
    }

    /// When the oldest open bundle is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due.front().map(|d| d.0)
    }

    /// Sends every bundle whose window has passed.
    pub fn flush_due(&mut self, now: Instant) {
        while let Some(&(deadline, to)) = self.due.front() {
            if deadline > now {
                break;
            }
            self.due.pop_front();
            if self.open.get(&to).is_some_and(|o| o.deadline == deadline) {
                self.close(to);
            }
        }
    }

    /// A bundle (or a lone copy) to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// Gives back the buffer of a sent transmit, for the next bundle.
    pub fn recycle(&mut self, mut bytes: Vec<u8>) {
        if self.free.len() < FREE_MAX && bytes.capacity() >= MAX_DATAGRAM {
            bytes.clear();
            self.free.push(bytes);
        }
    }

    /// Members with an open bundle.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_else(|| Vec::with_capacity(MAX_DATAGRAM))
    }

    fn close(&mut self, to: SocketAddr) {
        let Some(mut o) = self.open.remove(&to) else { return };
        if o.copies == 1 {
            // A bundle of one is sent as the copy itself.
            o.buf.drain(..HEADER_LEN + BUNDLE_ENTRY_LEN);
        } else {
            self.bundles += 1;
            self.bundled_copies += u64::from(o.copies);
        }
        self.out.push_back(Transmit { to, bytes: o.buf });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::wire::Datagram;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    fn copy(source: u8, len: usize) -> Vec<u8> {
        let relay = NodeId([9; 8]);
        let h =
            Header { kind: Kind::Publish, source: NodeId([source; 8]), destination: relay, vc: VcId(1), trace: false };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::emit(&mut buf, &h, &Route::new(&[relay]).unwrap(), 0, &vec![source; len]).unwrap();
        buf.truncate(n);
        wire::stamp_and_advance(&mut buf, 0, 0);
        buf
    }

    #[test]
    fn copies_to_one_member_within_the_window_go_as_one_bundle_in_order() {
        let t0 = Instant::now();
        let mut b = Bundler::new(NodeId([9; 8]), Duration::from_millis(10));
        let copies: Vec<Vec<u8>> = (1..=5).map(|s| copy(s, 40)).collect();
        for c in &copies {
            b.push(t0, NodeId([7; 8]), addr(1), c);
        }
        // A lone copy for another member.
        b.push(t0 + Duration::from_millis(3), NodeId([8; 8]), addr(2), &copies[0]);
        assert!(b.poll_transmit().is_none());
        assert_eq!(b.poll_timeout(), Some(t0 + Duration::from_millis(10)));
        b.flush_due(t0 + Duration::from_millis(10));
        let t = b.poll_transmit().unwrap();
        assert_eq!(t.to, addr(1));
        let d = Datagram::parse(&t.bytes).unwrap();
        assert_eq!((d.kind(), d.source(), d.destination()), (Kind::Bundle, NodeId([9; 8]), NodeId([7; 8])));
        let inner: Vec<&[u8]> = wire::bundled(d.body()).map(Result::unwrap).collect();
        assert_eq!(inner, copies.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert!(b.poll_transmit().is_none(), "the other member's window has not passed");
        b.flush_due(t0 + Duration::from_millis(13));
        let lone = b.poll_transmit().unwrap();
        assert_eq!((lone.to, lone.bytes.as_slice()), (addr(2), copies[0].as_slice()));
        assert_eq!((b.bundles, b.bundled_copies, b.open()), (1, 5, 0));
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn a_full_bundle_goes_at_once_and_never_exceeds_the_datagram_limit() {
        let t0 = Instant::now();
        let mut b = Bundler::new(NodeId([9; 8]), Duration::from_millis(10));
        let c = copy(1, 300);
        for _ in 0..10 {
            b.push(t0, NodeId([7; 8]), addr(1), &c);
        }
        let mut sent = Vec::new();
        while let Some(t) = b.poll_transmit() {
            sent.push(t);
        }
        b.flush_due(t0 + Duration::from_millis(10));
        while let Some(t) = b.poll_transmit() {
            sent.push(t);
        }
        let mut copies = 0;
        for t in &sent {
            assert!(t.bytes.len() <= MAX_DATAGRAM);
            let d = Datagram::parse(&t.bytes).unwrap();
            copies += if d.kind() == Kind::Bundle { wire::bundled(d.body()).count() } else { 1 };
        }
        assert_eq!(copies, 10);
        assert!(sent.len() >= 3, "{} datagrams for ten copies of 340 bytes", sent.len());
        // Buffers come back for the next bundles.
        for t in sent {
            b.recycle(t.bytes);
        }
        assert!(!b.free.is_empty());
    }
}
