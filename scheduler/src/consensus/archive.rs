//! The history in the replica's SQLite database (see `history`): written with
//! each Ready, read by the API, the PostgreSQL sink and peers copying it.
//!
//! Tables: `audit` (every chain record as its export JSON, by sequence, with
//! the index of the entry that made it), `usage` (the usage records among
//! them again, as columns: member, job, node, model, interval and figures,
//! so that a window is summed by SQLite), `retired_jobs` (finished jobs
//! that left memory, as JSON) and `history_meta` (`applied`: the index the
//! history runs to; `gap_from`/`gap_to`: entries whose history is missing,
//! `gap_head_seq`/`gap_head_hash`: the chain head the copied part ends at).
//!
//! What applying makes is written as made (`INSERT OR REPLACE`): a replayed
//! entry makes the same rows again, and were the log changed outside coop,
//! the store follows what the log now says (and the error log says so),
//! which anyone holding an earlier signed head can detect. What a peer sends
//! only fills a gap (`INSERT OR IGNORE`): it never replaces a row.

use anyhow::Context;
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

use super::history::{Gap, Item, Tagged};
use super::log::Persist;
use coop_core::ledger::{Entry, Head, Record};
use coop_core::state::{Job, JobId, UsageRecord};
use coop_core::usage::{Sum, inside};

/// The columns of `usage` that [`usage_row`] reads, in its order.
macro_rules! usage_columns {
    () => {
        "job, attempt, member, node, model, gpus, start_ms, end_ms, gpu_ms, weighted_gpu_ms, \
         energy_mj"
    };
}

/// An index or sequence number as SQLite's integer (`u64::MAX`: all of them).
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, idx INTEGER NOT NULL, \
     at_ms INTEGER NOT NULL, kind TEXT NOT NULL, record TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS audit_idx ON audit (idx)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms)",
    "CREATE INDEX IF NOT EXISTS audit_kind_at ON audit (kind, at_ms)",
    // The usage records' figures as columns too: a window's are summed
    // without reading the records' JSON.
    "CREATE TABLE IF NOT EXISTS usage (seq INTEGER PRIMARY KEY, idx INTEGER NOT NULL, \
     member TEXT NOT NULL, job TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT NOT NULL, \
     model TEXT NOT NULL, gpus INTEGER NOT NULL, start_ms INTEGER NOT NULL, \
     end_ms INTEGER NOT NULL, gpu_ms INTEGER NOT NULL, weighted_gpu_ms INTEGER NOT NULL, \
     energy_mj INTEGER NOT NULL)",
    // Covering the window sums and a statement's jobs (`usage_sums`,
    // `usage_jobs`): SQLite reads a member's month from the index alone.
    "CREATE INDEX IF NOT EXISTS usage_member_end ON usage (member, end_ms, start_ms, idx, \
     model, gpu_ms, weighted_gpu_ms, energy_mj, job)",
    "CREATE INDEX IF NOT EXISTS usage_end ON usage (end_ms, start_ms, idx, member, model, \
     gpu_ms, weighted_gpu_ms, energy_mj)",
    "CREATE INDEX IF NOT EXISTS usage_job ON usage (job, attempt)",
    // By id and entry: a job id reused after its job left memory (a client
    // picks the id of a submission) is another row, never a replaced one.
    "CREATE TABLE IF NOT EXISTS retired_jobs (id TEXT NOT NULL, idx INTEGER NOT NULL, \
     member TEXT NOT NULL, submitted_at_ms INTEGER NOT NULL, \
     finished_at_ms INTEGER NOT NULL, job TEXT NOT NULL, PRIMARY KEY (id, idx))",
    "CREATE INDEX IF NOT EXISTS retired_idx ON retired_jobs (idx)",
    "CREATE INDEX IF NOT EXISTS retired_member_finished ON retired_jobs (member, finished_at_ms)",
    "CREATE INDEX IF NOT EXISTS retired_finished ON retired_jobs (finished_at_ms)",
    "CREATE INDEX IF NOT EXISTS retired_submitted ON retired_jobs (submitted_at_ms, id)",
    "CREATE TABLE IF NOT EXISTS history_meta (key TEXT PRIMARY KEY, value NOT NULL)",
];

/// Writes a Ready's history (inside its transaction).
pub async fn write(tx: &mut Transaction<'_, Sqlite>, p: &Persist) -> anyhow::Result<()> {
    let stored = meta(&mut **tx, "applied").await?.unwrap_or(0);
    if p.history.iter().any(|(idx, _)| *idx <= stored) {
        changed_since_stored(tx, &p.history, stored).await?;
    }
    insert(tx, &p.history, Source::Apply).await?;
    if let Some(applied) = p.applied {
        // Never backwards: a restart replays entries whose history is stored.
        sqlx::query(
            "INSERT INTO history_meta (key, value) VALUES ('applied', ?) \
             ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        )
        .bind(applied as i64)
        .execute(&mut **tx)
        .await?;
    }
    if let (Some((over, head)), Some(snap)) = (&p.installed_over, &p.snapshot) {
        let before = read_gap(tx).await?;
        let gap = Gap::after_install(before, *over, snap.get_metadata().index, head.clone());
        set_gap(tx, gap).await?;
    }
    Ok(())
}

/// A replay (after a restart) makes the history of entries this store holds
/// already: the same rows, unless the raft log was changed outside coop.
/// Says so, naming the first record that differs.
async fn changed_since_stored(
    tx: &mut Transaction<'_, Sqlite>,
    items: &Tagged,
    stored: u64,
) -> anyhow::Result<()> {
    for (_, item) in items.iter().filter(|(idx, _)| *idx <= stored) {
        let Item::Record(r) = item else { continue };
        let held: Option<(String,)> = sqlx::query_as("SELECT record FROM audit WHERE seq = ?")
            .bind(r.seq as i64)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some((json,)) = held
            && record(&json, r.seq as i64)?.hash != r.hash
        {
            tracing::error!(
                "replaying the raft log made audit record {} differently from the one stored: \
                 the log (or the store) was changed outside coop; the store now follows the \
                 log, and a head saved before will not verify",
                r.seq
            );
            break;
        }
    }
    Ok(())
}

/// Whose history is being stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This replica's own apply (or replay): rows are written as made.
    Apply,
    /// A peer's page, filling a gap: it never replaces a row.
    Copy,
}

/// Stores items (rows are keyed, and a replayed entry's are the same).
pub async fn insert(
    tx: &mut Transaction<'_, Sqlite>,
    items: &Tagged,
    source: Source,
) -> anyhow::Result<()> {
    let (audit, usage, retired) = match source {
        Source::Apply => (
            "INSERT OR REPLACE INTO audit (seq, idx, at_ms, kind, record) VALUES (?, ?, ?, ?, ?)",
            "INSERT OR REPLACE INTO usage (seq, idx, member, job, attempt, node, model, gpus, \
             start_ms, end_ms, gpu_ms, weighted_gpu_ms, energy_mj) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "INSERT OR REPLACE INTO retired_jobs \
             (id, idx, member, submitted_at_ms, finished_at_ms, job) VALUES (?, ?, ?, ?, ?, ?)",
        ),
        Source::Copy => (
            "INSERT OR IGNORE INTO audit (seq, idx, at_ms, kind, record) VALUES (?, ?, ?, ?, ?)",
            "INSERT OR IGNORE INTO usage (seq, idx, member, job, attempt, node, model, gpus, \
             start_ms, end_ms, gpu_ms, weighted_gpu_ms, energy_mj) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "INSERT OR IGNORE INTO retired_jobs \
             (id, idx, member, submitted_at_ms, finished_at_ms, job) VALUES (?, ?, ?, ?, ?, ?)",
        ),
    };
    for (idx, item) in items {
        match item {
            Item::Record(r) => {
                sqlx::query(audit)
                    .bind(r.seq as i64)
                    .bind(*idx as i64)
                    .bind(r.at_ms)
                    .bind(r.entry.kind())
                    .bind(serde_json::to_string(r)?)
                    .execute(&mut **tx)
                    .await?;
                if let Entry::Usage(u) = &r.entry {
                    sqlx::query(usage)
                        .bind(r.seq as i64)
                        .bind(*idx as i64)
                        .bind(&u.member)
                        .bind(u.job.to_string())
                        .bind(u.attempt as i64)
                        .bind(&u.node)
                        .bind(&u.model)
                        .bind(u.gpus as i64)
                        .bind(u.start_ms)
                        .bind(u.end_ms)
                        .bind(sql_int(u.gpu_ms))
                        .bind(sql_int(u.weighted_gpu_ms))
                        .bind(sql_int(u.energy_mj))
                        .execute(&mut **tx)
                        .await?;
                }
            }
            Item::Retired(j) => {
                sqlx::query(retired)
                    .bind(j.id.to_string())
                    .bind(*idx as i64)
                    .bind(&j.member)
                    .bind(j.submitted_at_ms)
                    .bind(j.finished_at_ms.unwrap_or(j.submitted_at_ms))
                    .bind(serde_json::to_string(j)?)
                    .execute(&mut **tx)
                    .await?;
            }
        }
    }
    Ok(())
}

async fn meta<'e>(
    ex: impl sqlx::Executor<'e, Database = Sqlite>,
    key: &str,
) -> anyhow::Result<Option<u64>> {
    let v: Option<(i64,)> = sqlx::query_as("SELECT value FROM history_meta WHERE key = ?")
        .bind(key)
        .fetch_optional(ex)
        .await?;
    Ok(v.map(|(v,)| v as u64))
}

pub async fn read_gap(conn: &mut sqlx::SqliteConnection) -> anyhow::Result<Option<Gap>> {
    let from = meta(&mut *conn, "gap_from").await?;
    let to = meta(&mut *conn, "gap_to").await?;
    let head_seq = meta(&mut *conn, "gap_head_seq").await?;
    let head_hash: Option<(String,)> =
        sqlx::query_as("SELECT value FROM history_meta WHERE key = 'gap_head_hash'")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match (from, to, head_seq, head_hash) {
        (Some(from), Some(to), Some(seq), Some((hash,))) => Some(Gap {
            from,
            to,
            head: Head { seq, hash },
        }),
        _ => None,
    })
}

pub async fn set_gap(tx: &mut Transaction<'_, Sqlite>, gap: Option<Gap>) -> anyhow::Result<()> {
    sqlx::query(
        "DELETE FROM history_meta WHERE key IN ('gap_from', 'gap_to', 'gap_head_seq', \
         'gap_head_hash')",
    )
    .execute(&mut **tx)
    .await?;
    if let Some(g) = gap.filter(|g| g.to > g.from) {
        sqlx::query(
            "INSERT INTO history_meta (key, value) VALUES ('gap_from', ?), ('gap_to', ?), \
             ('gap_head_seq', ?), ('gap_head_hash', ?)",
        )
        .bind(g.from as i64)
        .bind(g.to as i64)
        .bind(g.head.seq as i64)
        .bind(&g.head.hash)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The highest sequence number among the records made by entries up to `idx`.
pub async fn last_seq_upto(conn: &mut sqlx::SqliteConnection, idx: u64) -> anyhow::Result<u64> {
    let v: (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM audit WHERE idx <= ?")
        .bind(sql_int(idx))
        .fetch_one(&mut *conn)
        .await?;
    Ok(v.0.unwrap_or(0) as u64)
}

/// The entries whose history this replica is missing, if any.
pub async fn gap(pool: &SqlitePool) -> anyhow::Result<Option<Gap>> {
    let mut conn = pool.acquire().await?;
    read_gap(&mut conn).await
}

/// The index the stored history runs to.
pub async fn applied(pool: &SqlitePool) -> anyhow::Result<u64> {
    Ok(meta(pool, "applied").await?.unwrap_or(0))
}

fn record(json: &str, seq: i64) -> anyhow::Result<Record> {
    serde_json::from_str(json).with_context(|| format!("the stored audit record {seq}"))
}

fn records(rows: Vec<sqlx::sqlite::SqliteRow>) -> anyhow::Result<Vec<Record>> {
    rows.iter()
        .map(|row| record(row.get::<&str, _>(1), row.get(0)))
        .collect()
}

/// Audit records stamped in `[from_ms, to_ms]` after sequence `after`, in
/// chain order, at most `limit`.
pub async fn audit_between(
    pool: &SqlitePool,
    from_ms: i64,
    to_ms: i64,
    after: u64,
    limit: u32,
) -> anyhow::Result<Vec<Record>> {
    let rows = sqlx::query(
        "SELECT seq, record FROM audit WHERE seq > ? AND at_ms >= ? AND at_ms <= ? \
         ORDER BY seq LIMIT ?",
    )
    .bind(after as i64)
    .bind(from_ms)
    .bind(to_ms)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    records(rows)
}

/// The record of sequence number `seq`.
pub async fn record_at(pool: &SqlitePool, seq: u64) -> anyhow::Result<Option<Record>> {
    let row: Option<(String,)> = sqlx::query_as("SELECT record FROM audit WHERE seq = ?")
        .bind(seq as i64)
        .fetch_optional(pool)
        .await?;
    row.map(|(json,)| record(&json, seq as i64)).transpose()
}

/// Records of `kind` stamped in `[from_ms, to_ms)`, made by entries up to `upto`.
pub async fn audit_of_kind(
    pool: &SqlitePool,
    upto: u64,
    kind: &str,
    from_ms: i64,
    to_ms: i64,
) -> anyhow::Result<Vec<Record>> {
    let rows = sqlx::query(
        "SELECT seq, record FROM audit WHERE kind = ? AND at_ms >= ? AND at_ms < ? AND idx <= ? \
         ORDER BY seq",
    )
    .bind(kind)
    .bind(from_ms)
    .bind(to_ms)
    .bind(sql_int(upto))
    .fetch_all(pool)
    .await?;
    records(rows)
}

/// Usage records whose interval meets `[from_ms, to_ms]`, of one member or
/// all, made by entries up to `upto` (what `usage_sums` and `usage_edges`
/// split between them; the reference their tests compare with).
pub async fn usage_between(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> anyhow::Result<Vec<UsageRecord>> {
    usage_rows(pool, upto, from_ms, to_ms, member, false).await
}

/// The usage records meeting a window; with `edges_only`, those not
/// [`inside`] it, skipped by SQLite rather than read and dropped here.
async fn usage_rows(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
    edges_only: bool,
) -> anyhow::Result<Vec<UsageRecord>> {
    // Two statements, so that each can use its index (by member and end,
    // or by end).
    let query = match member {
        Some(_) => sqlx::query(concat!(
            "SELECT ",
            usage_columns!(),
            " FROM usage WHERE member = ? AND end_ms >= ? AND start_ms <= ? AND idx <= ? \
             AND (? = 0 OR NOT (start_ms >= ? AND end_ms <= ? AND end_ms > start_ms))"
        )),
        None => sqlx::query(concat!(
            "SELECT ",
            usage_columns!(),
            " FROM usage WHERE (? IS NULL) AND end_ms >= ? AND start_ms <= ? AND idx <= ? \
             AND (? = 0 OR NOT (start_ms >= ? AND end_ms <= ? AND end_ms > start_ms))"
        )),
    };
    let rows = query
        .bind(member)
        .bind(from_ms)
        .bind(to_ms)
        .bind(sql_int(upto))
        .bind(edges_only)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(pool)
        .await?;
    rows.iter().map(usage_row).collect()
}

/// Usage records wholly inside `[from_ms, to_ms]` (`usage::inside`), made by
/// entries up to `upto`, summed by member and model: SQLite adds them up
/// without handing each over, so a long window costs little.
pub async fn usage_sums(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> anyhow::Result<Vec<Sum>> {
    let query = match member {
        Some(_) => sqlx::query(
            "SELECT member, model, SUM(gpu_ms), SUM(weighted_gpu_ms), SUM(energy_mj) FROM usage \
             WHERE member = ? AND end_ms >= ? AND end_ms <= ? AND start_ms >= ? \
             AND end_ms > start_ms AND idx <= ? GROUP BY member, model",
        ),
        None => sqlx::query(
            "SELECT member, model, SUM(gpu_ms), SUM(weighted_gpu_ms), SUM(energy_mj) FROM usage \
             WHERE (? IS NULL) AND end_ms >= ? AND end_ms <= ? AND start_ms >= ? \
             AND end_ms > start_ms AND idx <= ? GROUP BY member, model",
        ),
    };
    let rows = query
        .bind(member)
        .bind(from_ms)
        .bind(to_ms)
        .bind(from_ms)
        .bind(sql_int(upto))
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|row| Sum {
            member: row.get(0),
            model: row.get(1),
            gpu_ms: row.get::<i64, _>(2).max(0) as u64,
            weighted_gpu_ms: row.get::<i64, _>(3).max(0) as u64,
            energy_mj: row.get::<i64, _>(4).max(0) as u64,
        })
        .collect())
}

/// Usage records that meet `[from_ms, to_ms]` without lying inside it (they
/// are cut at its edges), made by entries up to `upto`.
pub async fn usage_edges(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> anyhow::Result<Vec<UsageRecord>> {
    let edges = usage_rows(pool, upto, from_ms, to_ms, member, true).await?;
    debug_assert!(edges.iter().all(|r| !inside(r, from_ms, to_ms)));
    Ok(edges)
}

/// The jobs of the usage records inside `[from_ms, to_ms]` of `member`.
pub async fn usage_jobs(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: &str,
) -> anyhow::Result<Vec<JobId>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT job FROM usage WHERE member = ? AND end_ms >= ? AND end_ms <= ? \
         AND start_ms >= ? AND end_ms > start_ms AND idx <= ?",
    )
    .bind(member)
    .bind(from_ms)
    .bind(to_ms)
    .bind(from_ms)
    .bind(sql_int(upto))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(j,)| j.parse().context("a stored job id"))
        .collect()
}

/// A usage record from its columns (`usage_columns!`, in that order).
fn usage_row(row: &sqlx::sqlite::SqliteRow) -> anyhow::Result<UsageRecord> {
    let n = |i: usize| row.get::<i64, _>(i).max(0) as u64;
    Ok(UsageRecord {
        job: row.get::<&str, _>(0).parse().context("a stored job id")?,
        attempt: n(1) as u32,
        member: row.get(2),
        node: row.get(3),
        model: row.get(4),
        gpus: n(5) as u32,
        start_ms: row.get(6),
        end_ms: row.get(7),
        gpu_ms: n(8),
        weighted_gpu_ms: n(9),
        energy_mj: n(10),
    })
}

/// The node a past attempt of a job ran on, from its usage records.
pub async fn attempt_node(
    pool: &SqlitePool,
    job: JobId,
    attempt: u32,
) -> anyhow::Result<Option<String>> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT node FROM usage WHERE job = ? AND attempt = ? LIMIT 1")
            .bind(job.to_string())
            .bind(attempt as i64)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(node,)| node))
}

fn job(json: &str) -> anyhow::Result<Job> {
    serde_json::from_str(json).context("a stored job")
}

/// A job that left memory by entry `upto` (the latest of that id).
pub async fn retired_job(pool: &SqlitePool, upto: u64, id: JobId) -> anyhow::Result<Option<Job>> {
    Ok(retired_versions(pool, upto, id).await?.into_iter().next())
}

/// Every job of id `id` that left memory by entry `upto`, the latest first
/// (one, unless a client reused the id of a job that had left).
pub async fn retired_versions(pool: &SqlitePool, upto: u64, id: JobId) -> anyhow::Result<Vec<Job>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT job FROM retired_jobs WHERE id = ? AND idx <= ? ORDER BY idx DESC LIMIT 16",
    )
    .bind(id.to_string())
    .bind(sql_int(upto))
    .fetch_all(pool)
    .await?;
    rows.iter().map(|(j,)| job(j)).collect()
}

/// Jobs that left memory by entry `upto` and finished in `[from_ms, to_ms]`,
/// of one member or all: `(id, member)`.
pub async fn retired_finished_between(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> anyhow::Result<Vec<(JobId, String)>> {
    let query = match member {
        Some(_) => sqlx::query_as(
            "SELECT id, member FROM retired_jobs WHERE member = ? AND finished_at_ms >= ? \
             AND finished_at_ms <= ? AND idx <= ?",
        ),
        None => sqlx::query_as(
            "SELECT id, member FROM retired_jobs WHERE (? IS NULL) AND finished_at_ms >= ? \
             AND finished_at_ms <= ? AND idx <= ?",
        ),
    };
    let rows: Vec<(String, String)> = query
        .bind(member)
        .bind(from_ms)
        .bind(to_ms)
        .bind(sql_int(upto))
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|(id, m)| Ok((id.parse().context("a stored job id")?, m)))
        .collect()
}

/// Jobs that left memory by entry `upto`, finished at or after `from_ms` and
/// submitted at or before `to_ms`, of one member or all, in
/// `(submitted_at_ms, id)` order after `after`, at most `limit`.
pub async fn retired_jobs(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
    after: Option<(i64, String)>,
    limit: u32,
) -> anyhow::Result<Vec<Job>> {
    let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
    let query = match member {
        Some(_) => sqlx::query_as(
            "SELECT job FROM retired_jobs WHERE member = ? AND finished_at_ms >= ? \
             AND submitted_at_ms <= ? \
             AND (submitted_at_ms > ? OR (submitted_at_ms = ? AND id > ?)) AND idx <= ? \
             ORDER BY submitted_at_ms, id LIMIT ?",
        ),
        None => sqlx::query_as(
            "SELECT job FROM retired_jobs WHERE (? IS NULL) AND finished_at_ms >= ? \
             AND submitted_at_ms <= ? \
             AND (submitted_at_ms > ? OR (submitted_at_ms = ? AND id > ?)) AND idx <= ? \
             ORDER BY submitted_at_ms, id LIMIT ?",
        ),
    };
    let rows: Vec<(String,)> = query
        .bind(member)
        .bind(from_ms)
        .bind(to_ms)
        .bind(after_at)
        .bind(after_at)
        .bind(after_id)
        .bind(sql_int(upto))
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|(j,)| job(j)).collect()
}

/// A page of the history of entries `(from, to]` for a peer copying it:
/// every item of the entries `(from, upto]`, with `upto <= to` chosen so that
/// the page holds about `max_records` records (one entry's items are never
/// split).
pub async fn page(pool: &SqlitePool, from: u64, to: u64, max_records: u32) -> anyhow::Result<Page> {
    // Where the records, and the jobs, would pass the page's size. An entry
    // makes a bounded history (`MAX_RETIRED_PER_COMMAND` jobs at most).
    let cut_records: Option<(i64,)> = sqlx::query_as(
        "SELECT idx FROM audit WHERE idx > ? AND idx <= ? ORDER BY seq LIMIT 1 OFFSET ?",
    )
    .bind(sql_int(from))
    .bind(sql_int(to))
    .bind(max_records as i64)
    .fetch_optional(pool)
    .await?;
    let cut_jobs: Option<(i64,)> = sqlx::query_as(
        "SELECT idx FROM retired_jobs WHERE idx > ? AND idx <= ? ORDER BY idx LIMIT 1 OFFSET ?",
    )
    .bind(sql_int(from))
    .bind(sql_int(to))
    .bind(max_records as i64)
    .fetch_optional(pool)
    .await?;
    let cut = cut_records
        .into_iter()
        .chain(cut_jobs)
        .map(|(i,)| i as u64)
        .min();
    let upto = match cut {
        // The entry at the cut may have more: end before it, unless it is
        // the first (then take it whole).
        Some(idx) if idx > from + 1 => idx - 1,
        Some(idx) => idx,
        None => to,
    };
    let records: Vec<(i64, String)> =
        sqlx::query_as("SELECT idx, record FROM audit WHERE idx > ? AND idx <= ? ORDER BY seq")
            .bind(sql_int(from))
            .bind(sql_int(upto))
            .fetch_all(pool)
            .await?;
    let jobs: Vec<(i64, String)> = sqlx::query_as(
        "SELECT idx, job FROM retired_jobs WHERE idx > ? AND idx <= ? ORDER BY idx, id",
    )
    .bind(sql_int(from))
    .bind(sql_int(upto))
    .fetch_all(pool)
    .await?;
    let tag = |rows: Vec<(i64, String)>| rows.into_iter().map(|(i, s)| (i as u64, s)).collect();
    Ok(Page {
        upto,
        records: tag(records),
        jobs: tag(jobs),
    })
}

/// A page of history for a peer: the records' and jobs' JSON, each with the
/// index of the entry that made it.
#[derive(Debug, Default)]
pub struct Page {
    pub upto: u64,
    pub records: Vec<(u64, String)>,
    pub jobs: Vec<(u64, String)>,
}

impl Page {
    /// The items of a page, read back.
    pub fn items(&self) -> anyhow::Result<Tagged> {
        let mut out = Tagged::new();
        for (idx, json) in &self.records {
            let r: Record = serde_json::from_str(json).context("a record from a peer")?;
            out.push((*idx, Item::Record(r)));
        }
        for (idx, json) in &self.jobs {
            out.push((*idx, Item::Retired(Box::new(job(json)?))));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coop_core::ledger::Head;
    use coop_core::usage::{MemberUsage, Past, Statement, add_past_usage};

    /// Summing the records inside a window in SQL and cutting only those
    /// across its edges gives the figures of cutting every record.
    #[tokio::test]
    async fn sums_and_edges_give_the_figures_of_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let disk = crate::consensus::disk::Disk::open(&dir.path().join("s.db"))
            .await
            .unwrap();
        let mut head = Head::default();
        let mut items = Tagged::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for i in 0..400u64 {
            let start = next(10_000) as i64;
            // Some of no length (an exit's energy), some long.
            let len = [0, 1, 30, 700, 5_000][next(5) as usize];
            let u = UsageRecord {
                job: uuid::Uuid::from_u128(next(50) as u128),
                attempt: 1,
                member: ["a", "b"][next(2) as usize].into(),
                node: "n".into(),
                model: ["A100", "H100"][next(2) as usize].into(),
                gpus: 2,
                start_ms: start,
                end_ms: start + len,
                gpu_ms: len as u64 * 2,
                weighted_gpu_ms: len as u64 * 3,
                energy_mj: next(1_000_000),
            };
            items.push((i + 1, Item::Record(head.link(start + len, Entry::Usage(u)))));
        }
        let mut tx = disk.pool().begin().await.unwrap();
        insert(&mut tx, &items, Source::Apply).await.unwrap();
        tx.commit().await.unwrap();
        let pool = disk.pool();
        for (from, to) in [(0, 20_000), (2_000, 3_000), (4_999, 5_001), (7_000, 7_000)] {
            let all = usage_between(pool, 400, from, to, None).await.unwrap();
            let sums = usage_sums(pool, 400, from, to, None).await.unwrap();
            let edges = usage_edges(pool, 400, from, to, None).await.unwrap();
            let zero = |m: &str| MemberUsage {
                member: m.into(),
                ..Default::default()
            };
            let mut by_record = vec![zero("a"), zero("b")];
            let mut summed = by_record.clone();
            let whole = Past {
                usage: &all,
                ..Default::default()
            };
            add_past_usage(&mut by_record, whole, from, to);
            let split = Past {
                usage: &edges,
                sums: &sums,
                ..Default::default()
            };
            add_past_usage(&mut summed, split, from, to);
            assert_eq!(summed, by_record, "window {from}..{to}");
            let jobs = usage_jobs(pool, 400, from, to, "a").await.unwrap();
            let statement = |past: Past<'_>| {
                let mut st = Statement {
                    member: "a".into(),
                    from_ms: from,
                    to_ms: to,
                    ..Default::default()
                };
                st.add_past(past);
                st
            };
            let split = Past {
                usage: &edges,
                sums: &sums,
                jobs: &jobs,
                ..Default::default()
            };
            assert_eq!(statement(split), statement(whole), "window {from}..{to}");
        }
    }

    #[tokio::test]
    async fn a_usage_record_reads_back_from_its_columns_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let disk = crate::consensus::disk::Disk::open(&dir.path().join("s.db"))
            .await
            .unwrap();
        let u = UsageRecord {
            job: uuid::Uuid::from_u128(42),
            attempt: 3,
            member: "acme".into(),
            node: "n7".into(),
            model: "H100-80GB".into(),
            gpus: 8,
            start_ms: 1_000,
            end_ms: 31_000,
            gpu_ms: 240_000,
            weighted_gpu_ms: 510_000,
            energy_mj: 99_000_000,
        };
        let mut head = Head::default();
        let r = head.link(31_000, Entry::Usage(u.clone()));
        let mut tx = disk.pool().begin().await.unwrap();
        insert(&mut tx, &vec![(5, Item::Record(r))], Source::Apply)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let pool = disk.pool();
        assert_eq!(
            usage_between(pool, 5, 0, 2_000, Some("acme"))
                .await
                .unwrap(),
            vec![u.clone()]
        );
        assert_eq!(
            usage_between(pool, 5, 0, 2_000, None).await.unwrap(),
            vec![u]
        );
        // Not at an earlier index, nor another member's, nor outside the window.
        assert!(
            usage_between(pool, 4, 0, 2_000, None)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            usage_between(pool, 5, 0, 2_000, Some("b"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            usage_between(pool, 5, 31_001, 40_000, None)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            attempt_node(pool, uuid::Uuid::from_u128(42), 3)
                .await
                .unwrap(),
            Some("n7".into())
        );
    }
}
