//! The key exchange seen from outside: where hellos go, and what answers them.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use shoal_mesh::clock::WallClock;
use shoal_mesh::endpoint::Path;
use shoal_mesh::wire::{Route, VcId};
use shoal_protocol::{Identity, NodeId};

use super::VirtualConnection;
use crate::frame::{HELLO, SEALED};
use crate::path::PathSet;
use crate::profile::Profile;

fn relayed(b: u8) -> Path {
    Path::Relayed(Route::new(&[NodeId([b; 8])]).unwrap())
}

fn direct() -> Path {
    Path::Direct("198.51.100.4:4000".parse().unwrap())
}

fn side(me: &Identity, peer: &Identity, now: Instant) -> (VirtualConnection, PathSet) {
    let clock = WallClock::new(now, 1_800_000_000_000_000);
    let vc =
        VirtualConnection::new(now, me.clone(), clock, peer.public_key(), VcId(1), Profile::realtime(false)).unwrap();
    let mut paths = PathSet::new(me.node_id() < peer.node_id());
    for p in [relayed(1), relayed(2), relayed(3), direct()] {
        paths.introduce(now, p);
    }
    (vc, paths)
}

/// The frames sent since last asked: (path, first byte, frame).
fn sent(vc: &mut VirtualConnection) -> Vec<(Path, u8, Vec<u8>)> {
    std::iter::from_fn(|| vc.poll_transmit()).map(|t| (t.path, t.frame[0], t.frame)).collect()
}

/// A hello goes on one relayed path and the direct candidates, not on every relay: each
/// introduction in a moving crowd would otherwise cost a hello per relay per VC. A retry
/// tries the next relay, so one that is down delays the exchange by one retry.
#[test]
fn hellos_go_on_one_relay_at_a_time_and_the_direct_candidates() {
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let t0 = Instant::now();
    let (mut vc, mut paths) = side(&a, &b, t0);
    let mut rounds = Vec::new();
    let mut now = t0;
    while rounds.len() < 4 {
        vc.handle_timeout(now, &mut paths, None);
        let hellos: Vec<Path> = sent(&mut vc).into_iter().filter(|s| s.1 == HELLO).map(|s| s.0).collect();
        if !hellos.is_empty() {
            rounds.push(hellos);
        }
        now += Duration::from_millis(10);
    }
    assert_eq!(rounds[0], vec![relayed(1), direct()]);
    assert_eq!(rounds[1], vec![relayed(2), direct()]);
    assert_eq!(rounds[2], vec![relayed(3), direct()]);
    assert_eq!(rounds[3], vec![relayed(1), direct()]);
}

/// The peer's hello came by a path that works: the answer (our hello, and proof of the keys)
/// goes back that way alone.
#[test]
fn a_hello_is_answered_on_the_path_it_came_by_only() {
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let t0 = Instant::now();
    let (mut va, mut pa) = side(&a, &b, t0);
    let (mut vb, mut pb) = side(&b, &a, t0);
    va.handle_timeout(t0, &mut pa, None);
    let hello = sent(&mut va).into_iter().find(|s| s.0 == relayed(1)).unwrap().2;
    // B's first hellos went before A's arrived.
    vb.handle_timeout(t0, &mut pb, None);
    sent(&mut vb);
    let now = t0 + Duration::from_millis(30);
    let mut frame = hello;
    vb.handle_frame(now, &mut pb, relayed(2), None, &mut frame);
    let answer = sent(&mut vb);
    let kinds: Vec<(Path, u8)> = answer.iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(kinds, vec![(relayed(2), HELLO), (relayed(2), SEALED)]);
    // And A, given them, holds the keys and is confirmed.
    for (path, _, mut f) in answer {
        va.handle_frame(now, &mut pa, path, None, &mut f);
    }
    assert!(va.is_open());
}
