//! The store's suite, run against a SQLite file and, when one is given, a real PostgreSQL
//! server (`SHOAL_TEST_POSTGRES_URL`; `.ci/run` starts one). Under `CI=true` a missing server
//! fails the run instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_control::store::{Backend, Character, ReportRow, Store};

fn report(account: &str, seq: i64, at: i64) -> ReportRow {
    ReportRow {
        account: account.into(),
        node_id: [seq as u8; 8],
        seq,
        received_ms: at,
        status: "playing".into(),
        position: [seq as f64, 0.5, -1.25],
        body: vec![seq as u8; 40],
    }
}

async fn suite(store: &Store) {
    // Accounts: created once, names unique.
    assert!(store.create_account("ana", "$argon2id$hash-a", 1).await.unwrap());
    assert!(!store.create_account("ana", "$argon2id$other", 2).await.unwrap(), "a taken name must be refused");
    assert_eq!(store.password_hash("ana").await.unwrap().as_deref(), Some("$argon2id$hash-a"));
    assert_eq!(store.password_hash("nobody").await.unwrap(), None);

    // Characters: saved, replaced, loaded exactly.
    assert_eq!(store.load_character("ana").await.unwrap(), None);
    let mut c = Character {
        account: "ana".into(),
        node_id: [7; 8],
        position: [10.5, 0.0, -3.25],
        state: b"hp=10;gold=3".to_vec(),
        updated_ms: 1_000,
    };
    store.save_character(&c).await.unwrap();
    c.position = [11.0, 1.0, -3.0];
    c.state = vec![0, 255, 1, 2];
    c.updated_ms = 2_000;
    store.save_character(&c).await.unwrap();
    assert_eq!(store.load_character("ana").await.unwrap(), Some(c));
    assert_eq!(store.account_of_node([7; 8]).await.unwrap().as_deref(), Some("ana"));
    assert_eq!(store.account_of_node([8; 8]).await.unwrap(), None);

    // Reports: a batch that spans several statements, read back in order, pruned by age.
    let rows: Vec<ReportRow> = (0..1_200).map(|i| report("ana", i, 10_000 + i)).collect();
    store.insert_reports(&rows).await.unwrap();
    store.insert_reports(&[report("bob", 1, 50_000)]).await.unwrap();
    assert_eq!(store.report_count().await.unwrap(), 1_201);
    let back = store.reports("ana", 10_000).await.unwrap();
    assert_eq!(back, rows);
    assert_eq!(store.prune_reports(10_600).await.unwrap(), 600);
    assert_eq!(store.report_count().await.unwrap(), 601);
    assert_eq!(store.reports("ana", 1).await.unwrap()[0].seq, 600);
}

#[tokio::test]
async fn sqlite_file_store() {
    let dir = std::env::temp_dir().join(format!("shoal-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.db");
    let _ = std::fs::remove_file(&path);
    let url = format!("sqlite:{}", path.display());
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    suite(&store).await;
    store.close().await;
    // Reopened: the schema is not applied twice and everything is still there.
    let again = Store::open(&url).await.unwrap();
    assert!(again.load_character("ana").await.unwrap().is_some());
    assert_eq!(again.report_count().await.unwrap(), 601);
    again.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn postgres_store() {
    let Ok(url) = std::env::var("SHOAL_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "SHOAL_TEST_POSTGRES_URL is not set under CI=true: the PostgreSQL store was not tested"
        );
        eprintln!("SKIPPED: PostgreSQL store tests (set SHOAL_TEST_POSTGRES_URL, as .ci/run does)");
        return;
    };
    // A clean database for the suite.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::raw_sql("DROP TABLE IF EXISTS reports, characters, accounts, shoal_schema CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    suite(&store).await;
    store.close().await;
    let again = Store::open(&url).await.unwrap();
    assert_eq!(again.report_count().await.unwrap(), 601);
    again.close().await;
}
