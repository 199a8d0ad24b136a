//! The interest tick for 10k and 100k players, uniform and clustered: each measured tick
//! follows a second of walking (up to 1.4 m per player), as a 1 Hz interest tick would.
//! Criterion's "elements" are players, so its throughput line reads players per second.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use shoal_control::interest::{Interest, InterestConfig};
use shoal_control::synthetic::{Layout, positions, walk};
use shoal_protocol::NodeId;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("neighbour_tick");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    for n in [10_000usize, 100_000] {
        for layout in [Layout::Uniform, Layout::Clustered] {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
            let mut pos = positions(n, layout, &mut rng);
            let mut m = Interest::new(InterestConfig::default()).unwrap();
            let ids: Vec<NodeId> = (0..n as u64).map(|i| NodeId(i.to_be_bytes())).collect();
            for (id, p) in ids.iter().zip(&pos) {
                m.update(*id, *p).unwrap();
            }
            // Settle: the first tick pairs everyone; later ones are the steady state.
            m.tick();
            while m.poll_event().is_some() {}
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{n}/{layout:?}"), |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        walk(&mut pos, 1.4, &mut rng);
                        for (id, p) in ids.iter().zip(&pos) {
                            m.update(*id, *p).unwrap();
                        }
                        let t = Instant::now();
                        m.tick();
                        spent += t.elapsed();
                        while black_box(m.poll_event()).is_some() {}
                    }
                    spent
                });
            });
            let s = m.stats();
            eprintln!(
                "neighbour_tick/{n}/{layout:?}: {} pairs, last tick introduced {} and dismissed {}, searched {} players",
                s.pairs, s.introduced, s.dismissed, s.searched
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
