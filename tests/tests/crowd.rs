//! Avatars on real sockets: 20 sessions, a control server and a relay process on loopback,
//! each player moving and setting its avatar 30 times a second through the public API.

#![allow(clippy::expect_used)]

use std::time::Duration;

use shoal_tests::crowd::crowd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_on_real_sockets_see_their_neighbours_avatars_move() {
    let dir = std::env::temp_dir().join(format!("shoal-crowd-avatars-{}", std::process::id()));
    let run = crowd(&dir, 20, Duration::from_secs(4), Duration::from_secs(3)).await;
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{:?}", run.views);
    assert_eq!(run.views.len(), 20, "{run:?}");
    for (i, v) in run.views.iter().enumerate() {
        // Twenty players within 20 m of each other; the first to come fill their 16 slots, so
        // the last have fewer.
        assert!(v.neighbours >= 1, "player {i}: {v:?}");
        assert_eq!(v.shown, v.neighbours, "player {i} does not show every neighbour: {v:?}");
        // Players idle now and then (a player with one or two neighbours may see only idlers
        // for three seconds); of four or more, some moved.
        assert!(v.neighbours < 4 || v.moved >= 1, "player {i}: {v:?}");
    }
    let (moved, shown) = run.views.iter().fold((0, 0), |(m, s), v| (m + v.moved, s + v.shown));
    assert!(moved * 3 >= shown, "{moved} of {shown} shown avatars moved");
    assert!(run.messages_received * 10 >= run.messages_sent * 9, "{run:?}");
}
