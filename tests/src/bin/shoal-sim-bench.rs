//! `shoal-sim-bench`: figures from the deterministic simulator, in virtual time.
//!
//! `failover`: over many seeds (each a random topology of three one-relay paths and one
//! two-relay path, 5–40 ms per link), a VC streams 100 messages a second from A to B; after
//! two seconds the first relay of its active path crashes. For Realtime (with and without a
//! redundant copy) and Reliable it reports, p50 and p99 over the seeds, the time from the crash
//! until the first message sent after it arrives, in ms and in RTTs of the failed path, and the
//! messages lost within a second of the crash. Ends with one JSON line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_sdk::Profile;
use shoal_tests::scenario::{Failover, relay_crash_failover};

#[derive(Parser, Debug)]
#[command(name = "shoal-sim-bench", about = "Figures from Shoal's deterministic network simulator")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Failover after a relay crash, over many seeds.
    Failover {
        /// Seeds to run (0..seeds).
        #[arg(long, default_value_t = 100)]
        seeds: u64,
    },
}

#[derive(Debug, Default)]
struct Summary {
    ms: Vec<f64>,
    rtts: Vec<f64>,
    lost: u64,
    never_resumed: u64,
    out_of_order_runs: u64,
    over_target: u64,
}

impl Summary {
    fn add(&mut self, f: &Failover) {
        match f.resumed {
            Some(d) => {
                self.ms.push(d.as_secs_f64() * 1e3);
                self.rtts.push(d.as_secs_f64() / f.failed_rtt.as_secs_f64().max(1e-9));
                if d > 3 * f.failed_rtt + Duration::from_millis(20) {
                    self.over_target += 1;
                }
            }
            None => self.never_resumed += 1,
        }
        self.lost += f.lost;
        self.out_of_order_runs += u64::from(!f.all_in_order);
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.cmd {
        Cmd::Failover { seeds } => failover(seeds),
    }
}

fn failover(seeds: u64) -> ExitCode {
    let cases = [
        ("realtime", Profile::realtime(false)),
        ("realtime_redundant", Profile::realtime(true)),
        ("reliable", Profile::reliable()),
    ];
    let mut out = Vec::new();
    println!(
        "{:<20} {:>9} {:>9} {:>10} {:>10} {:>6} {:>8} {:>10}",
        "profile", "p50 ms", "p99 ms", "p50 RTTs", "p99 RTTs", "lost", "stalled", ">3RTT+20"
    );
    for (name, profile) in cases {
        let mut s = Summary::default();
        for seed in 0..seeds {
            s.add(&relay_crash_failover(seed, profile.clone()));
        }
        println!(
            "{name:<20} {:>9.1} {:>9.1} {:>10.2} {:>10.2} {:>6} {:>8} {:>10}",
            pct(&s.ms, 0.5),
            pct(&s.ms, 0.99),
            pct(&s.rtts, 0.5),
            pct(&s.rtts, 0.99),
            s.lost,
            s.never_resumed,
            s.over_target
        );
        out.push((name, s));
    }
    let get = |n: &str| out.iter().find(|(k, _)| *k == n).map(|(_, s)| s);
    let (Some(rt), Some(red), Some(rel)) = (get("realtime"), get("realtime_redundant"), get("reliable")) else {
        return ExitCode::FAILURE;
    };
    println!(
        "{{\"seeds\":{seeds},\"realtime_failover_p50_ms\":{:.1},\"realtime_failover_p99_ms\":{:.1},\
         \"realtime_failover_p50_rtts\":{:.2},\"realtime_failover_p99_rtts\":{:.2},\
         \"realtime_redundant_failover_p99_ms\":{:.1},\"reliable_failover_p50_ms\":{:.1},\
         \"reliable_failover_p99_ms\":{:.1},\"reliable_failover_p99_rtts\":{:.2},\
         \"reliable_lost\":{},\"reliable_out_of_order_runs\":{},\"realtime_lost\":{},\
         \"realtime_lost_with_redundancy\":{},\"realtime_over_target_runs\":{}}}",
        pct(&rt.ms, 0.5),
        pct(&rt.ms, 0.99),
        pct(&rt.rtts, 0.5),
        pct(&rt.rtts, 0.99),
        pct(&red.ms, 0.99),
        pct(&rel.ms, 0.5),
        pct(&rel.ms, 0.99),
        pct(&rel.rtts, 0.99),
        rel.lost,
        rel.out_of_order_runs,
        rt.lost,
        red.lost,
        rt.over_target + red.over_target,
    );
    ExitCode::SUCCESS
}
