//! `shoal-sim-bench sockets`: a crowd of sessions on real sockets, what each player puts on
//! the wire.

use std::process::ExitCode;
use std::time::Duration;

pub(crate) fn sockets(players: usize, secs: u64) -> ExitCode {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("no tokio runtime");
        return ExitCode::FAILURE;
    };
    let dir = std::env::temp_dir().join(format!("shoal-crowd-{}", std::process::id()));
    let r = rt.block_on(shoal_tests::crowd::crowd(&dir, players, Duration::from_secs(10), Duration::from_secs(secs)));
    let _ = std::fs::remove_dir_all(&dir);
    let per = |v: u64| v as f64 / r.secs / r.players as f64;
    let dg_sent = per(r.sent.data_datagrams + r.sent.overhead_datagrams);
    let dg_recv = per(r.received.data_datagrams + r.received.overhead_datagrams);
    let kbps = |t: shoal_sdk::Traffic| per((t.data_bytes + t.overhead_bytes) * 8) / 1000.0;
    let overhead_kbps_nb = per((r.sent.overhead() + r.received.overhead()) * 8) / 1000.0 / r.neighbours.max(1.0);
    let overhead_dg_nb = per(r.sent.overhead_datagrams + r.received.overhead_datagrams) / r.neighbours.max(1.0);
    let cores = r.cpu_secs / r.secs;
    println!("players {} over {:.1} s, {:.1} neighbours each", r.players, r.secs, r.neighbours);
    println!(
        "per player: sends {dg_sent:.0} datagrams/s ({:.1} kbit/s), receives {dg_recv:.0} ({:.1} kbit/s)",
        kbps(r.sent),
        kbps(r.received)
    );
    println!(
        "updates: {:.0}/s sent and {:.0}/s received per player; overhead {overhead_kbps_nb:.3} kbit/s and {overhead_dg_nb:.2} datagrams/s per neighbour",
        per(r.messages_sent),
        per(r.messages_received)
    );
    println!(
        "path changes: {} for a fault and {} to a better path in {:.0} s; CPU: {cores:.2} cores for players and control server",
        r.path_changes, r.upgrades, r.secs
    );
    let json = serde_json::json!({
        "players": r.players,
        "secs": (r.secs * 10.0).round() / 10.0,
        "neighbours": (r.neighbours * 10.0).round() / 10.0,
        "datagrams_sent_per_player_per_s": dg_sent.round(),
        "datagrams_received_per_player_per_s": dg_recv.round(),
        "kbps_sent_per_player": (kbps(r.sent) * 10.0).round() / 10.0,
        "updates_sent_per_player_per_s": per(r.messages_sent).round(),
        "updates_received_per_player_per_s": per(r.messages_received).round(),
        "overhead_kbps_per_neighbour": (overhead_kbps_nb * 1000.0).round() / 1000.0,
        "overhead_datagrams_per_neighbour": (overhead_dg_nb * 100.0).round() / 100.0,
        "path_changes_for_faults": r.path_changes,
        "path_changes_to_better": r.upgrades,
        "cores": (cores * 100.0).round() / 100.0,
    });
    println!("{json}");
    ExitCode::SUCCESS
}
