//! The accounting sink: streams the audit ledger into PostgreSQL, where
//! auditors and Grafana query it (`migrations/postgres/` has the table and
//! the statement views).
//!
//! Idempotent and in order: each round reads the highest sequence number the
//! database holds and inserts the entries after it, in one transaction, so an
//! interruption at any point (database down, scheduler killed) resumes where
//! the database left off, with nothing missing or doubled (`seq` is the
//! primary key). Runs on the leader.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::watch;

use crate::ledger::Record;
use crate::replica::Replica;

const BATCH: usize = 1000;

pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    sqlx::migrate!("./migrations/postgres").run(&pool).await?;
    Ok(pool)
}

/// Runs until `shutdown` turns true, reconnecting after any error.
pub async fn run(url: String, replica: Replica, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = async {
            let pool = connect(&url).await?;
            tracing::info!("accounting sink connected");
            stream(&pool, &replica, &mut shutdown).await
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!("accounting sink: {e:#}; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn stream(
    pool: &PgPool,
    replica: &Replica,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut applied = replica.applied();
    loop {
        let (done,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM ledger")
            .fetch_one(pool)
            .await?;
        // Sequence numbers start at 1 and have no gaps: entry n is audit[n - 1].
        let batch: Vec<Record> = {
            let state = replica.read();
            state
                .audit
                .iter()
                .skip(done.max(0) as usize)
                .take(BATCH)
                .cloned()
                .collect()
        };
        if batch.is_empty() {
            tokio::select! {
                r = applied.changed() => if r.is_err() { return Ok(()) },
                _ = shutdown.changed() => return Ok(()),
            }
            continue;
        }
        let mut tx = pool.begin().await?;
        for r in &batch {
            let record = serde_json::to_string(r)?;
            let entry = serde_json::to_value(&r.entry)?;
            sqlx::query(
                "INSERT INTO ledger (seq, at, kind, entry, record, prev_hash, hash) \
                 VALUES ($1, to_timestamp($2 / 1000.0), $3, $4, $5, $6, $7) \
                 ON CONFLICT (seq) DO NOTHING",
            )
            .bind(r.seq as i64)
            .bind(r.at_ms as f64)
            .bind(r.entry.kind())
            .bind(sqlx::types::Json(entry))
            .bind(record)
            .bind(&r.prev_hash)
            .bind(&r.hash)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::debug!(
            "accounting sink: {} entries up to {}",
            batch.len(),
            done as usize + batch.len()
        );
    }
}

/// The ledger as the database holds it, in sequence order, for verification.
pub async fn read(url: &str) -> anyhow::Result<Vec<Record>> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT seq, record FROM ledger ORDER BY seq")
        .fetch_all(&pool)
        .await?;
    rows.into_iter()
        .map(|(seq, record)| {
            serde_json::from_str(&record)
                .map_err(|e| anyhow::anyhow!("row {seq}: not a ledger entry ({e})"))
        })
        .collect()
}
