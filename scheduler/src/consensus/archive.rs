//! The history in the replica's SQLite database (see `history`): written with
//! each Ready, read by the API, the PostgreSQL sink and peers copying it.
//!
//! Tables: `audit` (every chain record as its export JSON, by sequence, with
//! the index of the entry that made it), `usage` (the usage records among
//! them again, as columns: member, job, node, model, interval and figures,
//! so that a window is summed by SQLite), `usage_rollup` (their sums per
//! member, model and hour or day, kept by triggers), `retired_jobs`
//! (finished jobs that left memory, as JSON) and `history_meta` (`applied`:
//! the index the history runs to; `gap_from`/`gap_to`: entries whose history
//! is missing, `gap_head_seq`/`gap_head_hash`: the chain head the copied part
//! ends at; `usage_max_ms`: the longest usage record).
//!
//! What applying makes is written as made (`INSERT OR REPLACE`, an upsert
//! for `usage`): a replayed
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
use coop_core::state::{Job, JobId};

/// An index or sequence number as SQLite's integer (`u64::MAX`: all of them).
pub(super) fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A trigger keeping `usage_rollup` (hour and day buckets) as `usage` rows
/// are written: `$row` (`NEW` or `OLD`) added or taken away (`$sign`). A
/// replaced row's `min_start` may stay lower than its rows': that only makes
/// a window read the bucket's records one by one.
macro_rules! rollup_trigger {
    ($name:literal, $event:literal, $row:literal, $sign:literal) => {
        concat!(
            "CREATE TRIGGER IF NOT EXISTS ",
            $name,
            " AFTER ",
            $event,
            " ON usage WHEN ",
            $row,
            ".end_ms > 0 BEGIN ",
            rollup_upsert!(3600000, $row, $sign),
            rollup_upsert!(86400000, $row, $sign),
            "END"
        )
    };
}

macro_rules! rollup_upsert {
    ($span:literal, $row:literal, $sign:literal) => {
        concat!(
            "INSERT INTO usage_rollup VALUES (",
            $span,
            ", ",
            $row,
            ".member, (",
            $row,
            ".end_ms - 1) / ",
            $span,
            ", ",
            $row,
            ".model, ",
            $row,
            ".start_ms, ",
            $sign,
            $row,
            ".gpu_ms, ",
            $sign,
            $row,
            ".weighted_gpu_ms, ",
            $sign,
            $row,
            ".energy_mj, ",
            $sign,
            "1) ",
            "ON CONFLICT DO UPDATE SET min_start = MIN(min_start, excluded.min_start), ",
            "records = records + excluded.records, ",
            "gpu_ms = gpu_ms + excluded.gpu_ms, ",
            "weighted_gpu_ms = weighted_gpu_ms + excluded.weighted_gpu_ms, ",
            "energy_mj = energy_mj + excluded.energy_mj; "
        )
    };
}

/// Brings a store of version 2 to this one (after [`SCHEMA`]): fills
/// `usage_rollup` and drops the indexes replaced by covering ones.
pub const FROM_VERSION_2: &[&str] = &[
    "DROP INDEX IF EXISTS retired_member_finished",
    "DROP INDEX IF EXISTS retired_finished",
    "INSERT INTO usage_rollup SELECT 3600000, member, (end_ms - 1) / 3600000, model, \
     MIN(start_ms), SUM(gpu_ms), SUM(weighted_gpu_ms), SUM(energy_mj), COUNT(*) FROM usage \
     WHERE end_ms > 0 GROUP BY 1, 2, 3, 4",
    "INSERT INTO usage_rollup SELECT 86400000, member, (end_ms - 1) / 86400000, model, \
     MIN(start_ms), SUM(gpu_ms), SUM(weighted_gpu_ms), SUM(energy_mj), COUNT(*) FROM usage \
     WHERE end_ms > 0 GROUP BY 1, 2, 3, 4",
    "INSERT INTO history_meta (key, value) SELECT 'usage_max_ms', COALESCE(MAX(end_ms - start_ms), 0) \
     FROM usage WHERE true ON CONFLICT (key) DO UPDATE SET value = excluded.value",
];

pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS history_meta (key TEXT PRIMARY KEY, value NOT NULL)",
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
    // What a read at an earlier index must leave out (`windows`).
    "CREATE INDEX IF NOT EXISTS usage_idx ON usage (idx)",
    // Each member's usage per GPU model and hour, and per day, kept by the
    // triggers below in the transaction that writes the records: a month is
    // read as a few dozen rows (`windows::usage_window`). A bucket holds the
    // records that end in it, `(bucket × span, (bucket + 1) × span]`;
    // `min_start` says whether they all started inside a window.
    "CREATE TABLE IF NOT EXISTS usage_rollup (span INTEGER NOT NULL, member TEXT NOT NULL, \
     bucket INTEGER NOT NULL, model TEXT NOT NULL, min_start INTEGER NOT NULL, \
     gpu_ms INTEGER NOT NULL, weighted_gpu_ms INTEGER NOT NULL, energy_mj INTEGER NOT NULL, \
     records INTEGER NOT NULL, PRIMARY KEY (span, member, bucket, model)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS usage_rollup_bucket ON usage_rollup (span, bucket)",
    rollup_trigger!("usage_rolled", "INSERT", "NEW", "+"),
    rollup_trigger!("usage_rerolled", "UPDATE", "NEW", "+"),
    rollup_trigger!("usage_unrolled", "UPDATE", "OLD", "-"),
    // The longest record: how far past a window's end a record meeting it
    // can end.
    "CREATE TRIGGER IF NOT EXISTS usage_longest AFTER INSERT ON usage BEGIN \
     INSERT INTO history_meta (key, value) VALUES ('usage_max_ms', NEW.end_ms - NEW.start_ms) \
     ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value); END",
    "CREATE TRIGGER IF NOT EXISTS usage_longest_again AFTER UPDATE ON usage BEGIN \
     INSERT INTO history_meta (key, value) VALUES ('usage_max_ms', NEW.end_ms - NEW.start_ms) \
     ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value); END",
    // By id and entry: a job id reused after its job left memory (a client
    // picks the id of a submission) is another row, never a replaced one.
    "CREATE TABLE IF NOT EXISTS retired_jobs (id TEXT NOT NULL, idx INTEGER NOT NULL, \
     member TEXT NOT NULL, submitted_at_ms INTEGER NOT NULL, \
     finished_at_ms INTEGER NOT NULL, job TEXT NOT NULL, PRIMARY KEY (id, idx))",
    "CREATE INDEX IF NOT EXISTS retired_idx ON retired_jobs (idx)",
    // Covering the finished counts (`retired_finished_counts`).
    "CREATE INDEX IF NOT EXISTS retired_member_finished_at ON retired_jobs \
     (member, finished_at_ms, idx)",
    "CREATE INDEX IF NOT EXISTS retired_finished_at ON retired_jobs (finished_at_ms, idx, member)",
    "CREATE INDEX IF NOT EXISTS retired_submitted ON retired_jobs (submitted_at_ms, id)",
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
            // An update, not a replace, so that the rollups' triggers see
            // the row taken away (SQLite's REPLACE fires no delete trigger).
            "INSERT INTO usage (seq, idx, member, job, attempt, node, model, gpus, \
             start_ms, end_ms, gpu_ms, weighted_gpu_ms, energy_mj) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (seq) DO UPDATE SET idx = excluded.idx, member = excluded.member, \
             job = excluded.job, attempt = excluded.attempt, node = excluded.node, \
             model = excluded.model, gpus = excluded.gpus, start_ms = excluded.start_ms, \
             end_ms = excluded.end_ms, gpu_ms = excluded.gpu_ms, \
             weighted_gpu_ms = excluded.weighted_gpu_ms, energy_mj = excluded.energy_mj",
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

pub(super) async fn meta<'e>(
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

/// How many jobs of each member (or of `member`) left memory by entry
/// `upto` having finished in `[from_ms, to_ms]`; counted from an index.
pub async fn retired_finished_counts(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> anyhow::Result<Vec<(String, u64)>> {
    let query = match member {
        Some(_) => sqlx::query_as(
            "SELECT member, COUNT(*) FROM retired_jobs WHERE member = ? AND finished_at_ms >= ? \
             AND finished_at_ms <= ? AND idx <= ? GROUP BY member",
        ),
        None => sqlx::query_as(
            "SELECT member, COUNT(*) FROM retired_jobs WHERE (? IS NULL) AND finished_at_ms >= ? \
             AND finished_at_ms <= ? AND idx <= ? GROUP BY member",
        ),
    };
    let rows: Vec<(String, i64)> = query
        .bind(member)
        .bind(from_ms)
        .bind(to_ms)
        .bind(sql_int(upto))
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(m, n)| (m, n.max(0) as u64))
        .collect())
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
