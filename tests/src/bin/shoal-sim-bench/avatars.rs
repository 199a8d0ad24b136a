//! `shoal-sim-bench avatars` and `record-trace`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use shoal_sdk::avatar::Trace;
use shoal_sdk::avatar::movement::Mover;
use shoal_tests::avatars::{AvatarRun, avatar_run, codec_bits, stream_bits};
use shoal_tests::overhead::{Flow, overhead};
use shoal_tests::world::{AvatarStats, WorldSpec};

/// The recorded trace the codec's figures are measured on.
pub(crate) const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/avatars-100x300s.trace");

fn read_trace(path: &Path) -> Result<Trace, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Trace::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// `shoal-sim-bench stream-codec`: the published stream's bits beside the pairwise codec's.
pub(crate) fn stream_codec(rates: &[u32], trace: &Path) -> ExitCode {
    let trace = match read_trace(trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("bits per moving avatar update on the trace ({} players), no loss:", trace.players());
    println!("{:>6} {:>24} {:>24} {:>8}", "Hz", "stream mean/p50/p99", "pairwise mean/p50/p99", "ratio");
    let mut json = Vec::new();
    for &hz in rates {
        let [(sm, s50, s99), (pm, p50, p99)] = match stream_bits(&trace, hz) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("codec: {e}");
                return ExitCode::FAILURE;
            }
        };
        let ratio = sm / pm;
        println!("{hz:>6} {:>24} {:>24} {ratio:>8.2}", format!("{sm:.1}/{s50}/{s99}"), format!("{pm:.1}/{p50}/{p99}"));
        json.push(format!(
            "\"stream_bits_mean_{hz}hz\":{sm:.1},\"stream_bits_p50_{hz}hz\":{s50},\"stream_bits_p99_{hz}hz\":{s99},\"pairwise_bits_mean_{hz}hz\":{pm:.1},\"pairwise_bits_p50_{hz}hz\":{p50},\"stream_over_pairwise_{hz}hz\":{ratio:.2}"
        ));
    }
    println!("{{{}}}", json.join(","));
    ExitCode::SUCCESS
}

/// Records `players` movers (seeds 0, 1, …) for `secs` at 30 Hz into `out`.
pub(crate) fn record_trace(players: u16, secs: u32, out: &Path) -> ExitCode {
    let mut movers: Vec<Mover> = (0..players).map(|i| Mover::new(u64::from(i), 400.0)).collect();
    let mut trace = Trace::new(30, players);
    for _ in 0..30 * secs {
        let frame: Vec<_> = movers.iter_mut().map(|m| m.step(1.0 / 30.0)).collect();
        trace.push_frame(&frame);
    }
    let bytes = trace.to_bytes();
    if let Err(e) = std::fs::write(out, &bytes) {
        eprintln!("writing {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("{} players, {} frames at 30 Hz: {} bytes in {}", players, trace.frames(), bytes.len(), out.display());
    ExitCode::SUCCESS
}

/// `spec`'s world after a 5-second warm-up and `secs` measured; `None` (said why) when the
/// world cannot be built.
pub(crate) fn run(seed: u64, spec: WorldSpec, secs: u64) -> Option<AvatarRun> {
    match avatar_run(seed, spec, Duration::from_secs(5), Duration::from_secs(secs)) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("building the world: {e}");
            None
        }
    }
}

/// The 99th percentile of `v`, in ms (NaN when empty).
pub(crate) fn p99_ms(v: &mut [Duration]) -> f64 {
    AvatarStats::quantile(v, 0.99).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

pub(crate) fn avatars(populations: &[usize], secs: u64, seed: u64, trace: &Path) -> ExitCode {
    let star = overhead(seed, 4, Flow::Out { hz: 30 }, Duration::from_secs(10), Duration::from_secs(10));
    let header = star.header_bytes_per_datagram(20);
    println!("headers per update on an established direct VC: {header:.1} bytes above UDP");
    let trace = match read_trace(trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let bits = match codec_bits(&trace) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("codec: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ratio = bits.postcard_mean / bits.mean;
    println!(
        "codec bits per update on the trace ({} players, {} s at {} Hz): moving p50 {} p99 {}, idle p50 {} p99 {}; \
         mean {:.1} against {:.1} as postcard ({ratio:.1}x)",
        trace.players(),
        trace.frames() / usize::from(trace.hz()),
        trace.hz(),
        bits.moving_p50,
        bits.moving_p99,
        bits.idle_p50,
        bits.idle_p99,
        bits.mean,
        bits.postcard_mean
    );
    println!(
        "{:>8} {:>11} {:>17} {:>17} {:>17} {:>13} {:>14} {:>14} {:>13} {:>13} {:>12}",
        "players",
        "neighbours",
        "upload p50/p99",
        "payload p50/p99",
        "rest p50/p99",
        "rest/neighbour",
        "stale near p99",
        "stale far p99",
        "error p99 m",
        "bits/message",
        "cpu s/sim s"
    );
    let mut json = vec![
        format!("\"header_bytes_per_datagram\":{header:.1}"),
        format!("\"bits_moving_p50\":{},\"bits_moving_p99\":{}", bits.moving_p50, bits.moving_p99),
        format!("\"bits_idle_p50\":{},\"bits_idle_p99\":{}", bits.idle_p50, bits.idle_p99),
        format!("\"postcard_ratio\":{ratio:.2}"),
    ];
    let mut ok = header <= 28.0;
    for &n in populations {
        let Some(mut r) = run(seed, WorldSpec::avatars(n), secs) else { return ExitCode::FAILURE };
        let near = p99_ms(&mut r.stats.near_staleness);
        let far = p99_ms(&mut r.stats.far_staleness);
        let crowded = p99_ms(&mut r.stats.crowded_staleness);
        let samples = r.stats.near_staleness.len() + r.stats.crowded_staleness.len() + r.stats.far_staleness.len();
        let near_share = r.stats.near_staleness.len() as f64 / samples.max(1) as f64;
        let err = AvatarStats::quantile(&mut r.stats.errors, 0.99).map_or(f64::NAN, f64::from);
        let appear = p99_ms(&mut r.stats.appear_delays);
        let q = |v: &mut Vec<f64>, p: f64| AvatarStats::quantile(v, p).unwrap_or(0.0);
        let (up50, up99) = (q(&mut r.upload_kbps, 0.5), q(&mut r.upload_kbps, 0.99));
        let (pay50, pay99) = (q(&mut r.payload_kbps, 0.5), q(&mut r.payload_kbps, 0.99));
        let (rest50, rest99) = (q(&mut r.rest_kbps, 0.5), q(&mut r.rest_kbps, 0.99));
        let ovh = r.rest_kbps_per_neighbour.iter().sum::<f64>() / r.rest_kbps_per_neighbour.len().max(1) as f64;
        println!(
            "{n:>8} {:>11.1} {up50:>8.1}/{up99:<8.1} {pay50:>8.1}/{pay99:<8.1} {rest50:>8.1}/{rest99:<8.1} {ovh:>13.2} {near:>14.0} {far:>14.0} {err:>13.3} {:>13.1} {:>12.2}",
            r.neighbours, r.bits_per_message, r.cpu_per_sim_s,
        );
        let upkeep =
            r.overhead_kbps_per_neighbour.iter().sum::<f64>() / r.overhead_kbps_per_neighbour.len().max(1) as f64;
        println!(
            "         per player: {:.0} datagrams/s with messages ({:.1} B each), {:.0}/s without ({:.1} B each); \
             overhead (measurement and upkeep) {upkeep:.2} kbit/s per neighbour; staleness p99 {crowded:.0} ms within the \
             near radius but below the full rate; {:.0} % of samples from neighbours at the full rate",
            r.data_dps,
            r.data_bytes,
            r.overhead_dps,
            r.overhead_bytes,
            near_share * 100.0
        );
        ok &= r.stats.never_appeared == 0;
        json.push(format!(
            "\"upload_kbps_p50_{n}\":{up50:.1},\"upload_kbps_p99_{n}\":{up99:.1},\"payload_kbps_p99_{n}\":{pay99:.1},\"rest_kbps_p99_{n}\":{rest99:.1},\"rest_kbps_per_neighbour_{n}\":{ovh:.2},\"near_staleness_p99_ms_{n}\":{near:.0},\"far_staleness_p99_ms_{n}\":{far:.0},\"crowded_staleness_p99_ms_{n}\":{crowded:.0},\"interp_error_p99_m_{n}\":{err:.3},\"appear_p99_ms_{n}\":{appear:.0},\"overhead_kbps_per_neighbour_{n}\":{upkeep:.2},\"bits_per_message_{n}\":{:.1},\"neighbours_{n}\":{:.1},\"sim_wall_s_per_sim_s_{n}\":{:.2}",
            r.bits_per_message,
            r.neighbours,
            r.cpu_per_sim_s,
        ));
        if n == populations.iter().copied().max().unwrap_or(n) {
            json.push(format!(
                "\"upload_kbps_p99\":{up99:.1},\"overhead_kbps_per_neighbour\":{upkeep:.2},\"near_staleness_p99_ms\":{near:.0},\"interp_error_p99_m\":{err:.3}"
            ));
        }
    }
    println!("{{\"seed\":{seed},\"sim_secs\":{secs},{}}}", json.join(","));
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
