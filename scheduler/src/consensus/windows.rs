//! Usage over a window, from the store (`archive`): the records that end in
//! the window's whole days and hours come summed from `usage_rollup`, the few
//! others one by one, to be cut pro rata by `coop_core::usage`: those at its
//! edges, and those of an hour that holds a record begun before the window
//! (a day that holds one is taken hour by hour). So a month of a member's
//! usage is a few dozen rollup rows and about two hours of records, however
//! busy the month was.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use sqlx::Row;
use sqlx::SqliteConnection;
use sqlx::sqlite::{SqlitePool, SqliteRow};

use super::archive::sql_int;
use coop_core::state::{JobId, UsageRecord};
use coop_core::usage::Sum;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

/// The columns of `usage` that [`usage_row`] reads, in its order.
macro_rules! usage_columns {
    () => {
        "job, attempt, member, node, model, gpus, start_ms, end_ms, gpu_ms, weighted_gpu_ms, \
         energy_mj"
    };
}

/// A window's usage: `sums` of the records that count whole, and `records`
/// that meet the window but were not summed (some lie across its edges).
/// `coop_core::usage::Past` takes them as `sums` and `usage`.
#[derive(Debug, Default)]
pub struct Window {
    pub sums: Vec<Sum>,
    pub records: Vec<UsageRecord>,
}

/// Usage records that meet `[from_ms, to_ms]`, of `member` or all, made by
/// entries up to `upto`, as rollup sums and records (see the module).
pub async fn usage_window(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> anyhow::Result<Window> {
    // One read transaction: the rollups, the rows made after `upto` that
    // they already hold, and the edges are of one moment of the store.
    let mut tx = pool.begin().await?;
    let conn: &mut SqliteConnection = &mut tx;
    let reach = reach(&mut *conn, to_ms).await?;
    let from_ms = from_ms.max(0);
    let rows = Rows { upto, member };
    let (first_hour, end_hour) = (ceil_div(from_ms, HOUR), to_ms.div_euclid(HOUR));
    if first_hour >= end_hour {
        let records = rows.ending(conn, (from_ms, reach), to_ms, None).await?;
        return Ok(Window {
            sums: Vec::new(),
            records,
        });
    }
    // The buckets cover the records ending in (a, b]; whole days where they
    // fit, hours on either side.
    let (a, b) = (first_hour * HOUR, end_hour * HOUR);
    let (first_day, end_day) = (ceil_div(a, DAY), b / DAY);
    let days = first_day < end_day;
    let spans = if days {
        vec![
            (DAY, first_day, end_day),
            (HOUR, first_hour, first_day * 24),
            (HOUR, end_day * 24, end_hour),
        ]
    } else {
        vec![(HOUR, first_hour, end_hour)]
    };
    // Per member and model: GPU-ms, weighted GPU-ms, energy, records.
    let mut whole: BTreeMap<(String, String), [i64; 4]> = BTreeMap::new();
    let mut summed: HashSet<(i64, i64, String, String)> = HashSet::new();
    let mut records = Vec::new();
    // Buckets holding a record begun before the window: a day's hours are
    // tried instead, an hour's records read one by one.
    let mut bad = Vec::new();
    for (span, lo, hi) in spans.into_iter().filter(|(_, lo, hi)| lo < hi) {
        bad.extend(rollups(conn, member, None, span, lo, hi).await?);
        while let Some(row) = bad.pop() {
            let (m, bucket, model): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
            let span: i64 = row.get(8);
            if row.get::<i64, _>(3) >= from_ms {
                let sum = whole.entry((m.clone(), model.clone())).or_default();
                for (i, v) in sum.iter_mut().enumerate() {
                    *v += row.get::<i64, _>(4 + i);
                }
                summed.insert((span, bucket, m, model));
            } else if span == DAY {
                let hours = (bucket * 24, bucket * 24 + 24);
                bad.extend(rollups(conn, Some(&m), Some(&model), HOUR, hours.0, hours.1).await?);
            } else {
                let (lo_end, hi_end) = (bucket * span + 1, (bucket + 1) * span);
                let only = Rows {
                    upto,
                    member: Some(&m),
                };
                records.extend(
                    only.ending(conn, (lo_end, hi_end), i64::MAX, Some(&model))
                        .await?,
                );
            }
        }
    }
    // The rollups already hold rows made after `upto`: take those away (from
    // the day or the hour that was summed, if either was).
    for r in rows.made_after(conn, a, b).await? {
        let key = |span: i64| {
            (
                span,
                (r.end_ms - 1) / span,
                r.member.clone(),
                r.model.clone(),
            )
        };
        let Some(key) = [key(DAY), key(HOUR)]
            .into_iter()
            .find(|k| summed.contains(k))
        else {
            continue;
        };
        let sum = whole.entry((key.2, key.3)).or_default();
        sum[0] -= sql_int(r.gpu_ms);
        sum[1] -= sql_int(r.weighted_gpu_ms);
        sum[2] -= sql_int(r.energy_mj);
        sum[3] -= 1;
    }
    records.extend(rows.ending(conn, (from_ms, a), to_ms, None).await?);
    records.extend(rows.ending(conn, (b + 1, reach), to_ms, None).await?);
    let sums = whole
        .into_iter()
        .filter(|(_, sum)| sum[3] > 0)
        .map(|((member, model), [g, w, e, _])| Sum {
            member,
            model,
            gpu_ms: g.max(0) as u64,
            weighted_gpu_ms: w.max(0) as u64,
            energy_mj: e.max(0) as u64,
        })
        .collect();
    Ok(Window { sums, records })
}

/// No record that began by `to_ms` ends later than this: `to_ms` plus the
/// longest record stored (`usage_max_ms`).
async fn reach(conn: &mut SqliteConnection, to_ms: i64) -> anyhow::Result<i64> {
    let longest: Option<(i64,)> =
        sqlx::query_as("SELECT value FROM history_meta WHERE key = 'usage_max_ms'")
            .fetch_optional(conn)
            .await?;
    Ok(to_ms.saturating_add(longest.map_or(0, |(v,)| v.max(0))))
}

fn ceil_div(v: i64, by: i64) -> i64 {
    v.div_euclid(by) + i64::from(v.rem_euclid(by) != 0)
}

/// The rollup rows of buckets `[lo, hi)` of one span, of `member` (or all)
/// and `model` (or all).
async fn rollups(
    conn: &mut SqliteConnection,
    member: Option<&str>,
    model: Option<&str>,
    span: i64,
    lo: i64,
    hi: i64,
) -> anyhow::Result<Vec<SqliteRow>> {
    // Two statements, so that each can use its index.
    let query = match member {
        Some(_) => sqlx::query(
            "SELECT member, bucket, model, min_start, gpu_ms, weighted_gpu_ms, energy_mj, \
             records, span FROM usage_rollup WHERE member = ? AND span = ? AND bucket >= ? \
             AND bucket < ? AND (? IS NULL OR model = ?)",
        ),
        None => sqlx::query(
            "SELECT member, bucket, model, min_start, gpu_ms, weighted_gpu_ms, energy_mj, \
             records, span FROM usage_rollup WHERE (? IS NULL) AND span = ? AND bucket >= ? \
             AND bucket < ? AND (? IS NULL OR model = ?)",
        ),
    };
    Ok(query
        .bind(member)
        .bind(span)
        .bind(lo)
        .bind(hi)
        .bind(model)
        .bind(model)
        .fetch_all(&mut *conn)
        .await?)
}

/// Reads of usage records, of one member or all, made by entries up to `upto`.
struct Rows<'a> {
    upto: u64,
    member: Option<&'a str>,
}

impl Rows<'_> {
    /// Records ending in `[lo, hi]` that began by `start_by`, of `model` or all.
    async fn ending(
        &self,
        conn: &mut SqliteConnection,
        (lo, hi): (i64, i64),
        start_by: i64,
        model: Option<&str>,
    ) -> anyhow::Result<Vec<UsageRecord>> {
        if lo > hi {
            return Ok(Vec::new());
        }
        let query = match self.member {
            Some(_) => sqlx::query(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage WHERE member = ? AND end_ms >= ? AND end_ms <= ? AND start_ms <= ? \
                 AND idx <= ? AND (? IS NULL OR model = ?)"
            )),
            None => sqlx::query(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage WHERE (? IS NULL) AND end_ms >= ? AND end_ms <= ? \
                 AND start_ms <= ? AND idx <= ? AND (? IS NULL OR model = ?)"
            )),
        };
        let rows = query
            .bind(self.member)
            .bind(lo)
            .bind(hi)
            .bind(start_by)
            .bind(sql_int(self.upto))
            .bind(model)
            .bind(model)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter().map(usage_row).collect()
    }

    /// Records made by entries after `upto` that end in `(lo, hi]` (few: the
    /// store runs at most a few Readies ahead of a read's index, or the log
    /// tail replayed after a restart).
    async fn made_after(
        &self,
        conn: &mut SqliteConnection,
        lo: i64,
        hi: i64,
    ) -> anyhow::Result<Vec<UsageRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            usage_columns!(),
            // By entry: left to itself, SQLite would take the end-time
            // index and walk the whole window.
            " FROM usage INDEXED BY usage_idx WHERE idx > ? AND (? IS NULL OR member = ?) \
             AND end_ms > ? AND end_ms <= ?"
        ))
        .bind(sql_int(self.upto))
        .bind(self.member)
        .bind(self.member)
        .bind(lo)
        .bind(hi)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(usage_row).collect()
    }
}

/// The jobs of `member` that a statement of `[from_ms, to_ms]` lists: those
/// with usage in it (or a record of no length, such as an exit's energy,
/// in it), made by entries up to `upto`.
pub async fn usage_jobs(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: &str,
) -> anyhow::Result<Vec<JobId>> {
    let reach = reach(&mut *pool.acquire().await?, to_ms).await?;
    // As `Statement::add_past` counts a record's job: its interval meets
    // the period's inside, or it has no length, lies in the period and
    // brings something.
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT job FROM usage WHERE member = ? AND end_ms >= ? AND end_ms <= ? \
         AND start_ms <= ? AND idx <= ? AND ((end_ms > ? AND start_ms < ?) \
         OR (end_ms <= start_ms AND end_ms <= ? \
         AND (gpu_ms > 0 OR weighted_gpu_ms > 0 OR energy_mj > 0)))",
    )
    .bind(member)
    .bind(from_ms)
    .bind(reach)
    .bind(to_ms)
    .bind(sql_int(upto))
    .bind(from_ms)
    .bind(to_ms)
    .bind(to_ms)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(j,)| j.parse().context("a stored job id"))
        .collect()
}

/// A usage record from its columns (`usage_columns!`, in that order).
fn usage_row(row: &SqliteRow) -> anyhow::Result<UsageRecord> {
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

#[cfg(test)]
mod tests;
