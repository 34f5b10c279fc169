//! The raft log on disk: SQLite with `synchronous=FULL`, one transaction per Ready.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::log::{Log, Persist};

/// The shape of this database's tables (SQLite's `user_version`): 2 since
/// the history moved out of the state (codec format 2), 3 with the usage
/// rollups (a version 2 store gets them when opened).
pub const STORE_VERSION: i64 = 3;
const _: () = assert!(STORE_VERSION == 3, "update the PRAGMA in Disk::open");

pub struct Disk {
    pool: SqlitePool,
}

impl Disk {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(5));
        // One connection: the node loop is the only writer.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        // The tables' shape, by version: a database another coop made is
        // refused whole, not half-used (CREATE ... IF NOT EXISTS would keep
        // its older tables).
        let existing: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'raft_meta'",
        )
        .fetch_optional(&pool)
        .await?;
        let (version,): (i64,) = sqlx::query_as("PRAGMA user_version")
            .fetch_one(&pool)
            .await?;
        anyhow::ensure!(
            existing.is_none() || version == STORE_VERSION || version == 2,
            "{} was written by another coop (store version {version}, this one reads \
             {STORE_VERSION} and upgrades 2): start from an empty data dir",
            path.display()
        );
        // The tables, a version 2 store's rollups and the version, at once: a
        // crash half-way leaves the database as it was.
        let mut tx = pool.begin().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS raft_entries (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS raft_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        for ddl in super::archive::SCHEMA {
            sqlx::query(*ddl).execute(&mut *tx).await?;
        }
        if existing.is_some() && version == 2 {
            tracing::info!(
                "{}: adding the usage rollups (store version 3)",
                path.display()
            );
            for ddl in super::archive::FROM_VERSION_2 {
                sqlx::query(*ddl).execute(&mut *tx).await?;
            }
        }
        // PRAGMA takes no parameters; the literal must match STORE_VERSION.
        sqlx::query("PRAGMA user_version = 3")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let old: Option<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'log'")
                .fetch_optional(&pool)
                .await?;
        anyhow::ensure!(
            old.is_none(),
            "{} holds a log written before raft replication; start from an empty data dir",
            path.display()
        );
        Ok(Self { pool })
    }

    /// The database, for the history's readers and its copier.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The stored log, or `None` for a node that has never written one.
    pub async fn load(&self) -> anyhow::Result<Option<Log>> {
        let meta = sqlx::query("SELECT key, value FROM raft_meta")
            .fetch_all(&self.pool)
            .await?;
        if meta.is_empty() {
            return Ok(None);
        }
        let mut log = Log::default();
        for row in meta {
            let key: String = row.get(0);
            let value: Vec<u8> = row.get(1);
            match key.as_str() {
                "hard_state" => log.hard_state = decode::<HardState>(&value, &key)?,
                "conf_state" => log.conf_state = decode::<ConfState>(&value, &key)?,
                "snapshot" => log.snapshot = decode::<Snapshot>(&value, &key)?,
                _ => {}
            }
        }
        let rows = sqlx::query("SELECT idx, entry FROM raft_entries WHERE idx > ? ORDER BY idx")
            .bind(log.snapshot_index() as i64)
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            let idx: i64 = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let entry = decode::<Entry>(&bytes, &format!("log entry {idx}"))?;
            anyhow::ensure!(
                entry.index == log.last() + 1,
                "the raft log has a gap before entry {idx}"
            );
            log.entries.push(entry);
        }
        Ok(Some(log.normalised()))
    }

    /// Makes `p` durable in one transaction (one fsync).
    pub async fn persist(&self, p: &Persist) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(snap) = &p.snapshot {
            put(&mut tx, "snapshot", snap.write_to_bytes()?).await?;
            let upto = if p.replace_log {
                i64::MAX
            } else {
                snap.get_metadata().index as i64
            };
            sqlx::query("DELETE FROM raft_entries WHERE idx <= ?")
                .bind(upto)
                .execute(&mut *tx)
                .await?;
            if p.replace_log {
                put(
                    &mut tx,
                    "conf_state",
                    snap.get_metadata().get_conf_state().write_to_bytes()?,
                )
                .await?;
            }
        }
        if let Some(first) = p.entries.first() {
            sqlx::query("DELETE FROM raft_entries WHERE idx >= ?")
                .bind(first.index as i64)
                .execute(&mut *tx)
                .await?;
            for e in &p.entries {
                sqlx::query("INSERT INTO raft_entries (idx, entry) VALUES (?, ?)")
                    .bind(e.index as i64)
                    .bind(e.write_to_bytes()?)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if let Some(hs) = &p.hard_state {
            put(&mut tx, "hard_state", hs.write_to_bytes()?).await?;
        }
        if let Some(cs) = &p.conf_state {
            put(&mut tx, "conf_state", cs.write_to_bytes()?).await?;
        }
        super::archive::write(&mut tx, p).await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn put(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    key: &str,
    value: Vec<u8>,
) -> anyhow::Result<()> {
    sqlx::query("INSERT OR REPLACE INTO raft_meta (key, value) VALUES (?, ?)")
        .bind(key)
        .bind(value)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> anyhow::Result<M> {
    M::parse_from_bytes(bytes).with_context(|| format!("decoding the stored {what}"))
}
