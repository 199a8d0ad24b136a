//! Encoding and decoding avatar updates, ns per update, on the recorded trace
//! (`tests/fixtures/avatars-100x300s.trace`: 100 players of the movement model for five
//! minutes at 30 Hz; the first minute of each is measured), each served at 30 Hz on a 60 Hz
//! avatar clock to one receiver whose acks arrive one update later (a 33 ms RTT). Before measuring it prints the bits per update
//! it sees, moving and idle, beside the same states as postcard-encoded full states.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_sdk::avatar::{Ack, AvatarState, CodecConfig, Decoder, Encoder, Quantizer, Trace};

const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/avatars-100x300s.trace");
const UPDATES: usize = 30 * 60;

/// Every player's states, one per update: the first minute of the trace.
fn traces() -> Vec<Vec<AvatarState>> {
    let trace = Trace::from_bytes(&std::fs::read(TRACE).unwrap()).unwrap();
    (0..trace.players()).map(|p| trace.player(p).iter().take(UPDATES).copied().collect()).collect()
}

/// One player's updates encoded in turn, with acks one update behind.
fn encode_all(q: Quantizer, trace: &[AvatarState]) -> Vec<Vec<u8>> {
    let mut enc = Encoder::new(q);
    let mut dec = Decoder::new(q);
    let mut pending: Option<Ack> = None;
    let mut out = Vec::with_capacity(trace.len());
    for (i, s) in trace.iter().enumerate() {
        let (_, bytes) = enc.encode(2 * i as u32, s);
        let _ = dec.decode(&bytes);
        if let Some(a) = pending.replace(dec.ack().unwrap()) {
            enc.on_ack(a);
        }
        out.push(bytes);
    }
    out
}

fn percentile(v: &mut [usize], p: f64) -> usize {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn bench(c: &mut Criterion) {
    let q = Quantizer::new(CodecConfig::default()).unwrap();
    let traces = traces();
    let (mut moving, mut idle, mut postcard) = (Vec::new(), Vec::new(), 0usize);
    for t in &traces {
        for (s, u) in t.iter().zip(encode_all(q, t)) {
            let bits = u.len() * 8;
            if s.velocity.length() > 0.01 {
                moving.push(bits)
            } else {
                idle.push(bits)
            }
            let full = (s.position.to_array(), s.orientation.to_array(), s.velocity.to_array(), s.anim);
            postcard += postcard::to_allocvec(&full).unwrap().len() * 8;
        }
    }
    let total: usize = moving.iter().chain(&idle).sum();
    let n = moving.len() + idle.len();
    eprintln!(
        "avatar_codec: bits per update moving p50 {} p99 {}, idle p50 {} ({} moving, {} idle); \
         mean {:.1} against {:.1} as postcard full states ({:.1}x)",
        percentile(&mut moving, 0.5),
        percentile(&mut moving, 0.99),
        percentile(&mut idle, 0.5),
        moving.len(),
        idle.len(),
        total as f64 / n as f64,
        postcard as f64 / n as f64,
        postcard as f64 / total as f64,
    );

    let mut g = c.benchmark_group("avatar_codec");
    g.throughput(Throughput::Elements(traces.iter().map(|t| t.len() as u64).sum()));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("encode", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                for t in &traces {
                    let mut enc = Encoder::new(q);
                    let mut dec = Decoder::new(q);
                    let mut pending: Option<Ack> = None;
                    for (i, s) in t.iter().enumerate() {
                        let start = Instant::now();
                        let (_, bytes) = black_box(enc.encode(2 * i as u32, s));
                        spent += start.elapsed();
                        let _ = dec.decode(&bytes);
                        if let Some(a) = pending.replace(dec.ack().unwrap()) {
                            enc.on_ack(a);
                        }
                    }
                }
            }
            spent
        });
    });
    let encoded: Vec<Vec<Vec<u8>>> = traces.iter().map(|t| encode_all(q, t)).collect();
    g.bench_function("decode", |b| {
        b.iter(|| {
            for updates in &encoded {
                let mut dec = Decoder::new(q);
                for u in updates {
                    black_box(dec.decode(u)).ok();
                }
            }
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
