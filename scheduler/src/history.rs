//! Reading this replica's history (`consensus::archive`), and copying what a
//! snapshot skipped from a peer.
//!
//! The node loop stores each Ready's history with it, after the Ready's
//! proposers were answered; a reader therefore waits until the stored history
//! reaches what this node has applied (one fsync at most) before it reads, so
//! that it sees every write acknowledged before it asked.
//!
//! A replica that installed a snapshot lacks the history of the entries the
//! snapshot covers. Until a peer has given it that, history reads here are
//! refused as UNAVAILABLE (a client goes on to another scheduler): an answer
//! with a hole in it would be a wrong statement, not a slow one.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::sync::watch;

use crate::consensus::archive::{self, Page};
use crate::consensus::history::{Gap, Item};
use coop_core::ledger;

/// How long a reader waits for this node's own write of what it applied.
const STORED_WAIT: Duration = Duration::from_secs(10);
/// Records a peer sends per page.
pub const PAGE_RECORDS: u32 = 10_000;

/// This replica's stored history, for readers.
#[derive(Clone)]
pub struct History {
    pool: SqlitePool,
    stored: watch::Receiver<u64>,
    gap: watch::Receiver<Option<Gap>>,
}

/// Why history cannot be read here now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error(
        "this scheduler is still copying the history of log entries {} to {} from its peers \
         (it installed a snapshot); ask another scheduler",
        .0.from + 1,
        .0.to
    )]
    Copying(Gap),
    #[error("this scheduler has not stored what it applied yet")]
    Behind,
}

/// What the node loop (and the copier) tell readers: how far the stored
/// history runs, and what is missing from it.
#[derive(Clone)]
pub struct Progress {
    pub stored: Arc<watch::Sender<u64>>,
    pub gap: Arc<watch::Sender<Option<Gap>>>,
    /// Held by whoever writes the gap (the node loop installing a snapshot,
    /// the copier filling it) from its write to its publishing what the
    /// database then holds, so that an older answer never overwrites a newer.
    pub gap_writer: Arc<tokio::sync::Mutex<()>>,
}

impl History {
    /// Opens read-only connections to the replica's database (WAL: readers
    /// never wait for the node loop's writes, nor it for them).
    pub async fn open(
        db: &std::path::Path,
        stored: u64,
        gap: Option<Gap>,
    ) -> anyhow::Result<(Self, Progress)> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))?
            .read_only(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let (stored_tx, stored) = watch::channel(stored);
        let (gap_tx, gap) = watch::channel(gap);
        Ok((
            Self { pool, stored, gap },
            Progress {
                stored: Arc::new(stored_tx),
                gap: Arc::new(gap_tx),
                gap_writer: Default::default(),
            },
        ))
    }

    /// The database, once its history holds every entry up to `applied`.
    pub async fn at(&self, applied: u64) -> Result<&SqlitePool, Unreadable> {
        let copying = || self.gap.borrow().clone().map(Unreadable::Copying);
        if let Some(e) = copying() {
            return Err(e);
        }
        let mut stored = self.stored.clone();
        tokio::time::timeout(STORED_WAIT, stored.wait_for(|&s| s >= applied))
            .await
            .map_err(|_| Unreadable::Behind)?
            .map_err(|_| Unreadable::Behind)?;
        // The write that got it there may have been a snapshot's, with a gap
        // (published before the index, so seen here).
        if let Some(e) = copying() {
            return Err(e);
        }
        Ok(&self.pool)
    }

    /// The database as it is, gap or not (for serving peers what it holds).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn stored(&self) -> u64 {
        *self.stored.borrow()
    }

    pub fn gap(&self) -> Option<Gap> {
        self.gap.borrow().clone()
    }

    pub fn watch_gap(&self) -> watch::Receiver<Option<Gap>> {
        self.gap.clone()
    }
}

/// Stores a page a peer sent for `gap` and moves the gap past it, in one
/// transaction. The page must be what the chain says it is: its records
/// follow the last one this replica holds before the gap (by sequence and
/// hash), come from entries inside the gap, and, on the last page, end at
/// the head of the snapshot that made the gap; the records this replica
/// made after the gap must link to them. Returns the gap left.
pub async fn fill(writer: &SqlitePool, gap: &Gap, page: &Page) -> anyhow::Result<Option<Gap>> {
    anyhow::ensure!(
        page.upto > gap.from && page.upto <= gap.to,
        "the peer sent entries up to {}, outside the gap {}..{}",
        page.upto,
        gap.from + 1,
        gap.to
    );
    let items = page.items()?;
    if let Some((idx, _)) = items
        .iter()
        .find(|(idx, _)| *idx <= gap.from || *idx > page.upto)
    {
        anyhow::bail!("the peer sent history of entry {idx}, outside its page");
    }
    let records: Vec<ledger::Record> = items
        .iter()
        .filter_map(|(_, i)| match i {
            Item::Record(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    ledger::verify(&records).map_err(|e| anyhow::anyhow!("the peer's records: {e}"))?;
    let mut tx = writer.begin().await?;
    // The gap may have moved meanwhile (another snapshot): store nothing
    // then, unless only its end moved on.
    let current = match archive::read_gap(&mut tx).await? {
        Some(c) if c.from == gap.from => c,
        other => {
            tx.rollback().await?;
            return Ok(other);
        }
    };
    let held = archive::last_seq_upto(&mut tx, gap.from).await?;
    let stored = |seq: u64| {
        sqlx::query_as::<_, (String,)>("SELECT record FROM audit WHERE seq = ?").bind(seq as i64)
    };
    if let Some(first) = records.first() {
        anyhow::ensure!(
            first.seq == held + 1,
            "the peer's page starts at record {}, not at {} (the one after those held here)",
            first.seq,
            held + 1
        );
        if held > 0 {
            let (json,) = stored(held).fetch_one(&mut *tx).await?;
            let before: ledger::Record = serde_json::from_str(&json)?;
            anyhow::ensure!(
                first.prev_hash == before.hash,
                "the peer's record {} does not link to record {} here",
                first.seq,
                before.seq
            );
        }
    }
    let last = records.last().map_or(held, |r| r.seq);
    if let Some(r) = records.last()
        && let Some((json,)) = stored(r.seq + 1).fetch_optional(&mut *tx).await?
    {
        let after: ledger::Record = serde_json::from_str(&json)?;
        anyhow::ensure!(
            after.prev_hash == r.hash,
            "record {} here does not link to the peer's record {}",
            after.seq,
            r.seq
        );
    }
    let done = page.upto >= current.to;
    if done {
        // The whole gap is in: it ends at the snapshot's head.
        anyhow::ensure!(
            last == current.head.seq && records.last().is_none_or(|r| r.hash == current.head.hash),
            "the peer's history ends at record {last}, the snapshot's chain at {}",
            current.head.seq
        );
    }
    archive::insert(&mut tx, &items, archive::Source::Copy).await?;
    let left = (!done).then(|| Gap {
        from: page.upto,
        to: current.to,
        head: current.head.clone(),
    });
    archive::set_gap(&mut tx, left.clone()).await?;
    tx.commit().await?;
    Ok(left)
}
