//! The agent's spool: a SQLite file in its data dir that holds its identity,
//! every report not yet acknowledged by a scheduler, and what it measured of
//! each run. A report is written here before it is sent, in the same
//! transaction as the run's new totals, so a crash or a scheduler outage
//! loses nothing: the next process resends what was not acknowledged.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use coop_proto::v1 as pb;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::runner::RunKey;

/// What the agent knows and measured of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub job: String,
    pub attempt: u32,
    pub gpus: Vec<String>,
    /// Process group of the run, to find it again after a crash.
    pub pgid: i32,
    /// The group leader's boot and start time (`runner::process_tag`): a
    /// recycled pid is never taken for the run's.
    #[serde(default)]
    pub process: Option<String>,
    pub started_ms: i64,
    /// Usage has been measured and reported up to here.
    pub metered_to_ms: i64,
    /// Each GPU's energy counter at `metered_to_ms` (mJ), where it has one,
    /// and the counters' epoch (`Telemetry::epoch`).
    #[serde(default)]
    pub counters_mj: Vec<Option<u64>>,
    #[serde(default)]
    pub epoch: String,
    /// Sum and count of the run's GPUs' utilisation readings (percent).
    #[serde(default)]
    pub utilization_sum: u64,
    #[serde(default)]
    pub utilization_samples: u64,
    /// Measured so far: GPU-milliseconds and energy.
    pub gpu_ms: u64,
    pub energy_mj: u64,
    pub ended_ms: Option<i64>,
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: String,
    /// Ended because the agent lost track of it (it restarted).
    #[serde(default)]
    pub lost: bool,
}

impl RunRecord {
    /// A run with nothing measured yet, as of `at_ms` (as it stands: one that
    /// never started, its spawn failed or it was cancelled first).
    pub fn new(key: &RunKey, at_ms: i64) -> Self {
        Self {
            job: key.job.clone(),
            attempt: key.attempt,
            gpus: vec![],
            pgid: 0,
            process: None,
            started_ms: at_ms,
            metered_to_ms: at_ms,
            counters_mj: vec![],
            epoch: String::new(),
            utilization_sum: 0,
            utilization_samples: 0,
            gpu_ms: 0,
            energy_mj: 0,
            ended_ms: None,
            exit_code: None,
            reason: String::new(),
            lost: false,
        }
    }

    /// Mean utilisation of the run's GPUs over its readings, in percent.
    pub fn utilization_pct(&self) -> Option<f64> {
        (self.utilization_samples > 0)
            .then(|| self.utilization_sum as f64 / self.utilization_samples as f64)
    }

    pub fn key(&self) -> RunKey {
        RunKey {
            job: self.job.clone(),
            attempt: self.attempt,
        }
    }
}

pub struct Spool {
    pool: SqlitePool,
    path: PathBuf,
    identity: String,
    next_seq: u64,
}

pub const FILE: &str = "agent.db";

async fn connect(path: &Path, create: bool) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(create)
        .read_only(!create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(5));
    // One connection: the agent's loop is the only writer.
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .with_context(|| format!("opening the agent spool {}", path.display()))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`.
    pub async fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let pool = connect(&path, true).await?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS runs (job TEXT NOT NULL, attempt INTEGER NOT NULL, \
             ended_ms INTEGER, record TEXT NOT NULL, PRIMARY KEY (job, attempt))",
        ] {
            sqlx::query(ddl).execute(&pool).await?;
        }
        let meta = |key: &'static str| {
            sqlx::query_scalar::<_, String>("SELECT value FROM meta WHERE key = ?").bind(key)
        };
        let identity = match meta("identity").fetch_optional(&pool).await? {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                sqlx::query("INSERT INTO meta (key, value) VALUES ('identity', ?)")
                    .bind(&id)
                    .execute(&pool)
                    .await?;
                id
            }
        };
        let next_seq = match meta("next_seq").fetch_optional(&pool).await? {
            Some(s) => s.parse().context("spool: next_seq is not a number")?,
            None => 1,
        };
        Ok(Self {
            pool,
            path,
            identity,
            next_seq,
        })
    }

    /// Opens an existing spool for reading only (`coop agent status`), also
    /// while its agent runs.
    pub async fn open_read_only(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        anyhow::ensure!(
            path.exists(),
            "data-dir: no agent spool at {} (has an agent run with this data dir?)",
            path.display()
        );
        let pool = connect(&path, false).await?;
        let identity: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'identity'")
            .fetch_one(&pool)
            .await?;
        Ok(Self {
            pool,
            path,
            identity,
            next_seq: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This agent's identity: made with the spool, kept across restarts. The
    /// scheduler applies each (identity, sequence) once.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The sequence the next report gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Numbers the next reports from `seq` on.
    pub async fn skip_to(&mut self, seq: u64) -> anyhow::Result<()> {
        if seq > self.next_seq {
            self.next_seq = seq;
            sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)")
                .bind(seq.to_string())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Numbers `events` as reports and writes them with the runs' new
    /// records in one transaction. The reports are returned even when the
    /// write fails (and their numbers are used up all the same), so that the
    /// caller can still send them.
    pub async fn record(
        &mut self,
        events: Vec<pb::report::Event>,
        runs: &[&RunRecord],
    ) -> (Vec<pb::Report>, anyhow::Result<()>) {
        let reports: Vec<pb::Report> = events
            .into_iter()
            .zip(self.next_seq..)
            .map(|(event, seq)| pb::Report {
                seq,
                event: Some(event),
            })
            .collect();
        self.next_seq += reports.len() as u64;
        let written = self.write(&reports, runs).await;
        (reports, written)
    }

    async fn write(&self, reports: &[pb::Report], runs: &[&RunRecord]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for report in reports {
            sqlx::query("INSERT INTO reports (seq, body) VALUES (?, ?)")
                .bind(report.seq as i64)
                .bind(report.encode_to_vec())
                .execute(&mut *tx)
                .await?;
        }
        if !reports.is_empty() {
            sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)")
                .bind(self.next_seq.to_string())
                .execute(&mut *tx)
                .await?;
        }
        for r in runs {
            sqlx::query(
                "INSERT OR REPLACE INTO runs (job, attempt, ended_ms, record) VALUES (?, ?, ?, ?)",
            )
            .bind(&r.job)
            .bind(r.attempt as i64)
            .bind(r.ended_ms)
            .bind(serde_json::to_string(r)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await.context("writing the agent spool")?;
        Ok(())
    }

    /// Forgets the reports a scheduler acknowledged, up to `seq`.
    pub async fn ack(&self, seq: u64) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM reports WHERE seq <= ?")
            .bind(seq as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Reports not yet acknowledged, in sequence order.
    pub async fn pending(&self) -> anyhow::Result<Vec<pb::Report>> {
        let rows = sqlx::query("SELECT body FROM reports ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let body: Vec<u8> = r.get(0);
                pb::Report::decode(body.as_slice()).context("spool: undecodable report")
            })
            .collect()
    }

    /// Every run the spool remembers, oldest first.
    pub async fn runs(&self) -> anyhow::Result<Vec<RunRecord>> {
        let rows = sqlx::query("SELECT record FROM runs")
            .fetch_all(&self.pool)
            .await?;
        let mut runs = rows
            .iter()
            .map(|r| {
                let text: String = r.get(0);
                serde_json::from_str::<RunRecord>(&text).context("spool: unreadable run record")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        runs.sort_by_key(|r| (r.started_ms, r.job.clone(), r.attempt));
        Ok(runs)
    }

    /// Forgets runs that ended before `cutoff_ms` and whose reports were all
    /// acknowledged (their usage is in the schedulers' ledger by then).
    pub async fn prune(&self, cutoff_ms: i64) -> anyhow::Result<u64> {
        let pending = self.pending().await?;
        if !pending.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query("DELETE FROM runs WHERE ended_ms IS NOT NULL AND ended_ms < ?")
            .bind(cutoff_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job: &str, ended: Option<i64>) -> RunRecord {
        RunRecord {
            job: job.into(),
            attempt: 1,
            gpus: vec!["GPU-a".into()],
            pgid: 42,
            process: Some("boot:1".into()),
            started_ms: 1_000,
            metered_to_ms: 2_000,
            counters_mj: vec![Some(7)],
            epoch: "boot:1".into(),
            utilization_sum: 90,
            utilization_samples: 1,
            gpu_ms: 1_000,
            energy_mj: 300_000,
            ended_ms: ended,
            exit_code: ended.map(|_| 0),
            reason: String::new(),
            lost: false,
        }
    }

    fn usage(job: &str, to_ms: i64) -> pb::report::Event {
        pb::report::Event::Usage(pb::RunUsage {
            job_id: job.into(),
            attempt: 1,
            to_ms,
            energy_mj: 5,
        })
    }

    #[tokio::test]
    async fn reports_and_runs_survive_a_reopen_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).await.unwrap();
        let id = s.identity().to_string();
        let a = record("j1", None);
        let (sent, written) = s
            .record(vec![usage("j1", 2_000), usage("j1", 3_000)], &[&a])
            .await;
        written.unwrap();
        assert_eq!(sent.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        s.ack(1).await.unwrap();
        s.close().await;

        let mut s = Spool::open(dir.path()).await.unwrap();
        assert_eq!(s.identity(), id, "the identity is kept");
        let pending = s.pending().await.unwrap();
        assert_eq!(pending, sent[1..]);
        assert_eq!(s.runs().await.unwrap(), vec![a]);
        // Numbering goes on after the acknowledged reports were forgotten.
        s.ack(2).await.unwrap();
        let (next, written) = s.record(vec![usage("j1", 4_000)], &[]).await;
        written.unwrap();
        assert_eq!(next[0].seq, 3);
        s.skip_to(10).await.unwrap();
        s.close().await;
        let mut s = Spool::open(dir.path()).await.unwrap();
        assert_eq!(s.next_seq(), 10, "a skip is kept");
        let (_, written) = s.record(vec![], &[]).await;
        written.unwrap();

        // A reader sees the same while the writer has it open.
        let r = Spool::open_read_only(dir.path()).await.unwrap();
        assert_eq!(r.identity(), id);
        assert_eq!(r.pending().await.unwrap(), next);
    }

    #[tokio::test]
    async fn ended_runs_are_pruned_only_once_everything_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).await.unwrap();
        let old = record("old", Some(5_000));
        let running = record("running", None);
        let (sent, written) = s.record(vec![usage("old", 5_000)], &[&old, &running]).await;
        written.unwrap();
        assert_eq!(s.prune(10_000).await.unwrap(), 0, "a report is pending");
        s.ack(sent[0].seq).await.unwrap();
        assert_eq!(s.prune(4_000).await.unwrap(), 0, "ended after the cutoff");
        assert_eq!(s.prune(10_000).await.unwrap(), 1);
        assert_eq!(s.runs().await.unwrap(), [running]);
    }

    #[tokio::test]
    async fn a_missing_spool_is_a_clear_error_for_readers() {
        let dir = tempfile::tempdir().unwrap();
        let err = Spool::open_read_only(dir.path())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("data-dir:"), "{err}");
    }
}
