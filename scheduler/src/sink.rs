//! The accounting sink: streams the audit ledger into PostgreSQL, where
//! auditors and Grafana query it (`migrations/postgres/` has the table and
//! the statement views).
//!
//! Idempotent and in order: each round reads the highest sequence number the
//! database holds and inserts the entries after it, in one transaction, so an
//! interruption at any point (database down, scheduler killed) resumes where
//! the database left off, with nothing missing or doubled (`seq` is the
//! primary key). Runs on the leader (and, at a leader change, briefly on two
//! nodes: they take turns on an advisory lock).
//!
//! Only onto the same history: before each round the database's last entry
//! must be the cluster's entry of that sequence number (same hash). A
//! database that holds another history (the cluster's was rewritten, or
//! another cluster wrote there) gets nothing, and the sink says so.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::watch;

use crate::consensus::archive;
use crate::replica::Replica;
use coop_core::ledger::Record;

const BATCH: usize = 1000;
/// How often a refused (diverged) database is looked at again.
const RECHECK: Duration = Duration::from_secs(5);
/// The advisory lock the sinks writing to one database take turns with
/// ("coopledg").
const LOCK: i64 = 0x636f_6f70_6c65_6467;

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
    let mut reported = None;
    loop {
        let result = async {
            let pool = connect(&url).await?;
            tracing::info!("accounting sink connected");
            stream(&pool, &replica, &mut shutdown, &mut reported).await
        }
        .await;
        match result {
            Ok(()) => break,
            Err(e) => tracing::warn!("accounting sink: {e:#}; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    // The next leader's sink judges for itself; a stale 1 here would be a false alert.
    crate::instruments::SINK_DIVERGED.set(0);
}

/// Why the cluster's chain (`len` records, `ours` its record of sequence
/// `seq`) does not extend the database's ledger, whose last entry is
/// `(seq, hash)`; `None` when it does (or the database is empty).
pub fn divergence(ours: Option<&Record>, len: u64, seq: u64, hash: &str) -> Option<String> {
    if seq == 0 {
        return None;
    }
    match ours.filter(|_| seq <= len) {
        Some(r) if r.hash == hash => None,
        Some(r) => Some(format!(
            "entry {seq}: the database holds hash {hash}, the cluster's chain {}",
            r.hash
        )),
        None => Some(format!(
            "entry {seq}: the database holds entries up to {seq}, the cluster's chain ends at entry {len}"
        )),
    }
}

/// While the database's last entry is not the cluster's, appends nothing and
/// says so (log, `coop_ledger_sink_diverged`), checking again as the chain
/// grows and every few seconds (someone may restore the database).
async fn stream(
    pool: &PgPool,
    replica: &Replica,
    shutdown: &mut watch::Receiver<bool>,
    reported: &mut Option<String>,
) -> anyhow::Result<()> {
    let mut applied = replica.applied();
    let mut caught_up = false;
    loop {
        let mut tx = pool.begin().await?;
        // Every sink writing here (two schedulers' at a leader change, or
        // another cluster's) takes turns, so that what is checked below is
        // still the last entry when the batch is inserted after it.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(LOCK)
            .execute(&mut *tx)
            .await?;
        let held: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let (done, held_hash) = held.unwrap_or((0, String::new()));
        let done = done.max(0) as u64;
        let (len, index) = {
            let (state, index) = replica.read_indexed();
            (state.chain.seq, index)
        };
        let store = replica.history_at(index).await?;
        let ours = match done {
            0 => None,
            n => archive::record_at(store, n).await?,
        };
        let diverged = divergence(ours.as_ref(), len, done, &held_hash);
        if diverged.is_some() && len < done && !caught_up {
            // A leader elected a moment ago may not have applied all that
            // is committed yet: catch up before calling the chain short.
            tx.rollback().await?;
            replica.read_current().await?;
            caught_up = true;
            continue;
        }
        caught_up = false;
        if let Some(why) = diverged {
            tx.rollback().await?;
            crate::instruments::SINK_DIVERGED.set(1);
            if reported.as_ref() != Some(&why) {
                tracing::error!(
                    "accounting sink: the database's ledger is not the cluster's: {why}; \
                     appending nothing (history was rewritten on one side, or another \
                     cluster wrote there: see coop audit verify --db and --since)"
                );
                *reported = Some(why);
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return Ok(()) },
                _ = tokio::time::sleep(RECHECK) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            continue;
        }
        crate::instruments::SINK_DIVERGED.set(0);
        if reported.take().is_some() {
            tracing::info!("accounting sink: the database's ledger is the cluster's again");
        }
        let batch: Vec<Record> =
            archive::audit_between(store, i64::MIN, i64::MAX, done, BATCH as u32)
                .await?
                .into_iter()
                .filter(|r| r.seq <= len)
                .collect();
        if batch.is_empty() {
            tx.rollback().await?;
            tokio::select! {
                r = applied.changed() => if r.is_err() { return Ok(()) },
                _ = shutdown.changed() => return Ok(()),
            }
            continue;
        }
        for r in &batch {
            let record = serde_json::to_string(r)?;
            let entry = serde_json::to_value(&r.entry)?;
            // No ON CONFLICT: under the lock a row of that seq can only be
            // someone else's, and it must fail the round, not be kept.
            sqlx::query(
                "INSERT INTO ledger (seq, at, kind, entry, record, prev_hash, hash) \
                 VALUES ($1, to_timestamp($2 / 1000.0), $3, $4, $5, $6, $7)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use coop_core::ledger::{Entry, append};

    fn chain(members: &[&str], at_ms: i64) -> Vec<Record> {
        let mut c = Vec::new();
        for m in members {
            append(
                &mut c,
                at_ms,
                Entry::MemberAdded {
                    member: m.to_string(),
                },
            );
        }
        c
    }

    #[test]
    fn the_sink_appends_only_onto_the_history_the_database_holds() {
        let ours = chain(&["a", "b", "c"], 1);
        let at = |n: u64| ours.get(n as usize - 1);
        assert_eq!(divergence(None, 3, 0, ""), None, "an empty database");
        for n in 1..=3 {
            assert_eq!(divergence(at(n), 3, n, &ours[n as usize - 1].hash), None);
        }
        // Another cluster's chain: the same entries at another time.
        let theirs = chain(&["a", "b", "c", "d"], 2);
        let why = divergence(at(2), 3, 2, &theirs[1].hash).unwrap();
        assert!(why.starts_with("entry 2: the database holds hash"), "{why}");
        // The database holds more than the cluster's chain.
        let why = divergence(None, 3, 4, &theirs[3].hash).unwrap();
        assert!(why.contains("the cluster's chain ends at entry 3"), "{why}");
    }
}
