//! Durable command log and snapshots in SQLite.
//!
//! The log is the source of truth: a command is acknowledged only after the
//! transaction holding it is committed with `synchronous=FULL`. At start the
//! latest snapshot is loaded and the commands after it are re-applied. Raft
//! replication keeps this shape: the log becomes the raft log.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::state::{Command, State};

pub struct Store {
    pool: SqlitePool,
}

pub struct Loaded {
    pub state: State,
    pub applied: u64,
    pub snapshot_index: u64,
}

impl Store {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(5));
        // One writer connection: the log has a single appender.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, command TEXT NOT NULL)",
        )
        .execute(&pool)
        .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL, state TEXT NOT NULL)",
        )
        .execute(&pool)
        .await?;
        Ok(Self { pool })
    }

    /// The state as of the last durable command.
    pub async fn load(&self) -> anyhow::Result<Loaded> {
        let (mut state, snapshot_index) =
            match sqlx::query("SELECT idx, state FROM snapshot WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?
            {
                Some(row) => {
                    let idx: i64 = row.get(0);
                    let json: String = row.get(1);
                    let state: State =
                        serde_json::from_str(&json).context("decoding the snapshot")?;
                    (state, idx as u64)
                }
                None => (State::default(), 0),
            };
        let rows = sqlx::query("SELECT idx, command FROM log WHERE idx > ? ORDER BY idx")
            .bind(snapshot_index as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut applied = snapshot_index;
        for row in rows {
            let idx: i64 = row.get(0);
            let json: String = row.get(1);
            let cmd: Command =
                serde_json::from_str(&json).with_context(|| format!("decoding log entry {idx}"))?;
            // Rejected commands were rejected the first time too: same result.
            let _ = state.apply(&cmd);
            applied = idx as u64;
        }
        Ok(Loaded {
            state,
            applied,
            snapshot_index,
        })
    }

    /// Appends commands in one transaction (one fsync for the whole batch).
    pub async fn append(&self, first_index: u64, cmds: &[Command]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for (i, cmd) in cmds.iter().enumerate() {
            sqlx::query("INSERT INTO log (idx, command) VALUES (?, ?)")
                .bind((first_index + i as u64) as i64)
                .bind(serde_json::to_string(cmd)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the snapshot and drops the log entries it covers.
    pub async fn snapshot(&self, index: u64, state_json: String) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT OR REPLACE INTO snapshot (id, idx, state) VALUES (1, ?, ?)")
            .bind(index as i64)
            .bind(state_json)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM log WHERE idx <= ?")
            .bind(index as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
