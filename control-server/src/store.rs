//! What the control server keeps across restarts: accounts, each character's latest state,
//! and the history of reports (with a retention the operator sets).
//!
//! One code path for both databases through sqlx's `Any` driver: a SQLite file by default
//! (nothing to set up), PostgreSQL by URL when several control-server instances share state.
//! Queries use `$n` placeholders in order, which both accept. The schema is versioned in the
//! `shoal_schema` table and applied at open; it is a short list kept here because sqlx's
//! embedded migrations need its proc-macro feature, a heavy build for two tables' worth.

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported database.
    #[error("unsupported database URL (want sqlite:… or postgres://…): {0}")]
    Url(String),
    /// The database refused or failed.
    #[error("{op}: {source}")]
    Db {
        /// What the store was doing.
        op: &'static str,
        /// The database's error.
        source: sqlx::Error,
    },
    /// A stored value is not what the store writes.
    #[error("corrupt {what} in the database: {reason}")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Names what the store was doing when the database failed.
trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> Op<T> for Result<T, sqlx::Error> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Db { op, source })
    }
}

/// A node id as stored: exactly eight bytes.
fn node_id(column: &'static str, bytes: &[u8]) -> Result<[u8; 8], StoreError> {
    bytes.try_into().map_err(|_| StoreError::Corrupt { what: column, reason: format!("{} bytes, not 8", bytes.len()) })
}

/// Why a value cannot be kept in a row as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// A report's sequence number is past the largest the history's signed 64-bit column
    /// holds (cast, it would be stored negative).
    #[error("report seq {0} is past the largest storable ({max})", max = i64::MAX)]
    SeqOutOfRange(u64),
}

/// A report's sequence number as the history stores it.
pub fn stored_seq(seq: u64) -> Result<i64, RowError> {
    i64::try_from(seq).map_err(|_| RowError::SeqOutOfRange(seq))
}

/// Unix seconds as the milliseconds the rows store; past the column's range, its largest
/// value.
pub fn stored_ms(unix_secs: u64) -> i64 {
    i64::try_from(unix_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// A character's latest state, as persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct Character {
    /// The account it belongs to.
    pub account: String,
    /// The node that last played it.
    pub node_id: [u8; 8],
    /// Where it is.
    pub position: [f64; 3],
    /// The game's own state, opaque.
    pub state: Vec<u8>,
    /// When it was saved, Unix milliseconds.
    pub updated_ms: i64,
}

/// One report, as kept in the history.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// The account that sent it.
    pub account: String,
    /// The node that sent it.
    pub node_id: [u8; 8],
    /// Its sequence number (see [`stored_seq`]).
    pub seq: i64,
    /// When the server received it, Unix milliseconds.
    pub received_ms: i64,
    /// The client's status word.
    pub status: String,
    /// Where the character was.
    pub position: [f64; 3],
    /// The whole report as received (its control-frame encoding).
    pub body: Vec<u8>,
}

/// Columns of a report row.
const REPORT_COLUMNS: usize = 9;
/// Rows per INSERT statement: well under both databases' parameter limits.
const REPORT_BATCH: usize = 500;

fn schema(backend: Backend) -> [(i64, String); 1] {
    let blob = match backend {
        Backend::Sqlite => "BLOB",
        Backend::Postgres => "BYTEA",
    };
    [(
        1,
        format!(
            "CREATE TABLE accounts (
                name TEXT PRIMARY KEY,
                password_hash TEXT NOT NULL,
                created_ms BIGINT NOT NULL
            );
            CREATE TABLE characters (
                account TEXT PRIMARY KEY,
                node_id {blob} NOT NULL,
                x DOUBLE PRECISION NOT NULL,
                y DOUBLE PRECISION NOT NULL,
                z DOUBLE PRECISION NOT NULL,
                state {blob} NOT NULL,
                updated_ms BIGINT NOT NULL
            );
            CREATE TABLE reports (
                account TEXT NOT NULL,
                node_id {blob} NOT NULL,
                seq BIGINT NOT NULL,
                received_ms BIGINT NOT NULL,
                status TEXT NOT NULL,
                x DOUBLE PRECISION NOT NULL,
                y DOUBLE PRECISION NOT NULL,
                z DOUBLE PRECISION NOT NULL,
                body {blob} NOT NULL
            );
            CREATE INDEX reports_by_time ON reports (received_ms);
            CREATE INDEX reports_by_account ON reports (account, received_ms);"
        ),
    )]
}

/// The store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens (creating a SQLite file if needed) and brings the schema up to date.
    ///
    /// `sqlite:path/to/file.db` or `postgres://user:pass@host/db`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let (backend, url) = if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            let sep = if path.contains('?') { '&' } else { '?' };
            (Backend::Sqlite, format!("sqlite://{path}{sep}mode=rwc"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        let max = if backend == Backend::Sqlite { 4 } else { 8 };
        let pool = AnyPoolOptions::new().max_connections(max).connect(&url).await.op("opening the database")?;
        if backend == Backend::Sqlite {
            // WAL lets readers run beside the writer; the mode is kept in the file, so once
            // is enough. (sqlx already waits up to 5 s for a busy writer.)
            sqlx::raw_sql("PRAGMA journal_mode = WAL").execute(&pool).await.op("opening the database")?;
        }
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS shoal_schema (version BIGINT PRIMARY KEY)")
            .execute(&self.pool)
            .await
            .op("bringing the schema up to date")?;
        let applied: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM shoal_schema")
            .fetch_one(&self.pool)
            .await
            .op("bringing the schema up to date")?
            .try_get(0)
            .op("bringing the schema up to date")?;
        for (version, sql) in schema(self.backend) {
            if version <= applied {
                continue;
            }
            let mut tx = self.pool.begin().await.op("bringing the schema up to date")?;
            sqlx::raw_sql(&sql).execute(&mut *tx).await.op("bringing the schema up to date")?;
            sqlx::query("INSERT INTO shoal_schema (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .op("bringing the schema up to date")?;
            tx.commit().await.op("bringing the schema up to date")?;
        }
        Ok(())
    }

    /// Creates an account; false if the name is taken.
    pub async fn create_account(&self, name: &str, password_hash: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO accounts (name, password_hash, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(password_hash)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .op("creating an account")?;
        Ok(done.rows_affected() == 1)
    }

    /// The stored password hash of an account.
    pub async fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT password_hash FROM accounts WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .op("reading an account's password hash")?;
        row.map(|r| r.try_get(0)).transpose().op("reading an account's password hash")
    }

    /// Saves a character's latest state, replacing what was there.
    pub async fn save_character(&self, c: &Character) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO characters (account, node_id, x, y, z, state, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (account) DO UPDATE SET node_id = excluded.node_id, x = excluded.x, y = excluded.y,
             z = excluded.z, state = excluded.state, updated_ms = excluded.updated_ms",
        )
        .bind(c.account.as_str())
        .bind(c.node_id.to_vec())
        .bind(c.position[0])
        .bind(c.position[1])
        .bind(c.position[2])
        .bind(c.state.clone())
        .bind(c.updated_ms)
        .execute(&self.pool)
        .await
        .op("saving a character")?;
        Ok(())
    }

    /// An account's character, if one was saved.
    pub async fn load_character(&self, account: &str) -> Result<Option<Character>, StoreError> {
        let row = sqlx::query("SELECT node_id, x, y, z, state, updated_ms FROM characters WHERE account = $1")
            .bind(account)
            .fetch_optional(&self.pool)
            .await
            .op("loading a character")?;
        let Some(r) = row else { return Ok(None) };
        let node: Vec<u8> = r.try_get(0).op("loading a character")?;
        Ok(Some(Character {
            account: account.to_string(),
            node_id: node_id("characters.node_id", &node)?,
            position: [
                r.try_get(1).op("loading a character")?,
                r.try_get(2).op("loading a character")?,
                r.try_get(3).op("loading a character")?,
            ],
            state: r.try_get(4).op("loading a character")?,
            updated_ms: r.try_get(5).op("loading a character")?,
        }))
    }

    /// The account whose character `node_id` last played.
    pub async fn account_of_node(&self, node_id: [u8; 8]) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT account FROM characters WHERE node_id = $1 ORDER BY updated_ms DESC LIMIT 1")
            .bind(node_id.to_vec())
            .fetch_optional(&self.pool)
            .await
            .op("finding a node's account")?;
        row.map(|r| r.try_get(0)).transpose().op("finding a node's account")
    }

    /// Appends reports to the history, in one transaction.
    pub async fn insert_reports(&self, rows: &[ReportRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.op("inserting reports")?;
        for chunk in rows.chunks(REPORT_BATCH) {
            let sql = insert_reports_sql(self.backend, chunk.len());
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.account.as_str())
                    .bind(r.node_id.to_vec())
                    .bind(r.seq)
                    .bind(r.received_ms)
                    .bind(r.status.as_str())
                    .bind(r.position[0])
                    .bind(r.position[1])
                    .bind(r.position[2])
                    .bind(r.body.as_slice());
            }
            q.execute(&mut *tx).await.op("inserting reports")?;
        }
        tx.commit().await.op("inserting reports")?;
        Ok(())
    }

    /// Deletes reports received before `before_ms`; returns how many.
    pub async fn prune_reports(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM reports WHERE received_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await
            .op("pruning reports")?;
        Ok(done.rows_affected())
    }

    /// An account's reports, newest last, at most `limit`.
    pub async fn reports(&self, account: &str, limit: i64) -> Result<Vec<ReportRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, seq, received_ms, status, x, y, z, body FROM reports WHERE account = $1
             ORDER BY received_ms, seq LIMIT $2",
        )
        .bind(account)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .op("reading reports")?;
        rows.into_iter()
            .map(|r| {
                let node: Vec<u8> = r.try_get(0).op("reading reports")?;
                Ok(ReportRow {
                    account: account.to_string(),
                    node_id: node_id("reports.node_id", &node)?,
                    seq: r.try_get(1).op("reading reports")?,
                    received_ms: r.try_get(2).op("reading reports")?,
                    status: r.try_get(3).op("reading reports")?,
                    position: [
                        r.try_get(4).op("reading reports")?,
                        r.try_get(5).op("reading reports")?,
                        r.try_get(6).op("reading reports")?,
                    ],
                    body: r.try_get(7).op("reading reports")?,
                })
            })
            .collect()
    }

    /// Reports kept in all.
    pub async fn report_count(&self) -> Result<i64, StoreError> {
        sqlx::query("SELECT COUNT(*) FROM reports")
            .fetch_one(&self.pool)
            .await
            .op("counting reports")?
            .try_get(0)
            .op("counting reports")
    }

    /// Closes the pool, waiting for connections in use.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A multi-row insert. SQLite gets anonymous `?` parameters: it looks numbered ones up by name
/// in a list, which makes binding a 4,500-parameter statement quadratic.
fn insert_reports_sql(backend: Backend, rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO reports (account, node_id, seq, received_ms, status, x, y, z, body) VALUES ");
    let mut n = 1;
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..REPORT_COLUMNS {
            if c > 0 {
                sql.push_str(", ");
            }
            if backend == Backend::Sqlite {
                sql.push('?');
            } else {
                sql.push('$');
                sql.push_str(&n.to_string());
                n += 1;
            }
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_seq_past_the_column_is_an_error_never_a_negative_number() {
        assert_eq!(stored_seq(0), Ok(0));
        assert_eq!(stored_seq(i64::MAX as u64), Ok(i64::MAX));
        let past = i64::MAX as u64 + 1;
        assert_eq!(stored_seq(past), Err(RowError::SeqOutOfRange(past)));
        assert_eq!(stored_seq(u64::MAX), Err(RowError::SeqOutOfRange(u64::MAX)));
        assert!(stored_seq(u64::MAX).unwrap_err().to_string().contains("18446744073709551615"));
        assert_eq!(stored_ms(1_800_000_000), 1_800_000_000_000);
        assert_eq!(stored_ms(u64::MAX), i64::MAX);
    }

    #[test]
    fn store_errors_say_what_the_store_was_doing_and_which_column_is_corrupt() {
        let e = Err::<(), _>(sqlx::Error::RowNotFound).op("saving a character").unwrap_err();
        assert!(e.to_string().starts_with("saving a character: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(node_id("characters.node_id", &[1; 8]).unwrap(), [1; 8]);
        let e = node_id("characters.node_id", &[1; 3]).unwrap_err();
        assert_eq!(e.to_string(), "corrupt characters.node_id in the database: 3 bytes, not 8");
    }
}
