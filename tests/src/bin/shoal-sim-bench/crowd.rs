//! `shoal-sim-bench crowd`: relay fan-out in crowds, and upload against audience.

use std::process::ExitCode;

use shoal_tests::fanout::upload_watched_by;
use shoal_tests::world::{AvatarStats, WorldSpec};

use crate::avatars::{p99_ms, run};

pub(crate) fn crowd(populations: &[usize], secs: u64, seed: u64, audiences: &[usize]) -> ExitCode {
    println!(
        "{:>8} {:>11} {:>8} {:>17} {:>15} {:>15} {:>12} {:>20} {:>14} {:>8} {:>10} {:>12}",
        "players",
        "neighbours",
        "watched",
        "upload p50/p99",
        "stale nb p99",
        "stale watch p99",
        "watch err m",
        "relay egress/relay",
        "classic egress",
        "ratio",
        "in view",
        "cpu s/sim s"
    );
    let mut json = Vec::new();
    let mut ok = true;
    for &n in populations {
        let Some(mut r) = run(seed, WorldSpec::watching(n), secs) else { return ExitCode::FAILURE };
        let near = p99_ms(&mut r.stats.near_staleness);
        let watch = p99_ms(&mut r.stats.watched_staleness);
        // The tail's shape: one missed 5 Hz update, two, or a key state lost.
        let tail: Vec<String> = [0.5, 0.98, 0.99, 0.995, 0.999]
            .iter()
            .map(|&p| {
                let q = AvatarStats::quantile(&mut r.stats.watched_staleness, p).unwrap_or_default();
                format!("p{} {} ms", p * 100.0, q.as_millis())
            })
            .collect();
        println!("{n} players, watched staleness: {}", tail.join(", "));
        let err = AvatarStats::quantile(&mut r.stats.watched_errors, 0.99).map_or(f64::NAN, f64::from);
        let q = |v: &mut Vec<f64>, p: f64| AvatarStats::quantile(v, p).unwrap_or(0.0);
        let (up50, up99) = (q(&mut r.upload_kbps, 0.5), q(&mut r.upload_kbps, 0.99));
        let relays = r.relay_egress_kbps.len().max(1) as f64;
        let relay_total: f64 = r.relay_egress_kbps.iter().sum();
        let relay_max = r.relay_egress_kbps.iter().copied().fold(0.0, f64::max);
        let ratio = r.classic_egress_kbps / relay_total.max(f64::MIN_POSITIVE);
        let (pairs, shown) = r.view_pairs;
        let share = shown as f64 / pairs.max(1) as f64;
        let mbps = |kbps: f64| kbps / 1000.0;
        println!(
            "{n:>8} {:>11.1} {:>8.1} {up50:>8.1}/{up99:<8.1} {near:>15.0} {watch:>15.0} {err:>12.3} {:>9.1}/{:<10.1} {:>14.1} {ratio:>8.2} {:>9.2}% {:>12.2}",
            r.neighbours,
            r.watched,
            mbps(relay_total / relays),
            mbps(relay_max),
            mbps(r.classic_egress_kbps),
            share * 100.0,
            r.cpu_per_sim_s,
        );
        println!(
            "         (egress in Mbit/s: mean/max per relay, and the classic server's; {shown} of {pairs} pairs within the view radius show each other)"
        );
        ok &= r.stats.never_appeared == 0 && shown > 0;
        json.push(format!(
            "\"upload_kbps_p50_{n}\":{up50:.1},\"upload_kbps_p99_{n}\":{up99:.1},\"neighbour_staleness_p99_ms_{n}\":{near:.0},\"watcher_staleness_p99_ms_{n}\":{watch:.0},\"watched_error_p99_m_{n}\":{err:.3},\"relay_egress_mbps_mean_{n}\":{:.2},\"relay_egress_mbps_max_{n}\":{:.2},\"classic_egress_mbps_{n}\":{:.2},\"classic_egress_ratio_{n}\":{ratio:.2},\"view_shown_share_{n}\":{share:.4},\"neighbours_{n}\":{:.1},\"watched_{n}\":{:.1},\"sim_wall_s_per_sim_s_{n}\":{:.2}",
            mbps(relay_total / relays),
            mbps(relay_max),
            mbps(r.classic_egress_kbps),
            r.neighbours,
            r.watched,
            r.cpu_per_sim_s,
        ));
    }
    println!("one player's upload, watched by N others (nobody introduced), kbit/s on the wire:");
    let mut uploads = Vec::new();
    for &w in audiences {
        match upload_watched_by(seed, w, 12, 6) {
            Ok((kbps, least)) => {
                println!(
                    "{w:>8} watchers: {kbps:>6.2} kbit/s; the least-served watcher decoded {least:.2} updates/s from each"
                );
                json.push(format!("\"upload_kbps_watched_by_{w}\":{kbps:.2}"));
                uploads.push((w, kbps));
            }
            Err(e) => {
                eprintln!("building the world: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let (Some(&(lo, first)), Some(&(hi, last))) = (uploads.first(), uploads.last()) {
        let flat = last / first;
        println!("upload watched by {hi} over watched by {lo}: {flat:.3}");
        json.push(format!("\"upload_flat_ratio\":{flat:.3}"));
    }
    println!("{{\"seed\":{seed},\"sim_secs\":{secs},{}}}", json.join(","));
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
