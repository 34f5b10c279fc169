//! The log writer: turns proposals into durable, applied commands.
//!
//! One task owns the store. It takes every proposal that is waiting, stamps each
//! with the clock (never going backwards), writes the batch in one transaction,
//! applies it to the state, and only then answers the proposers. Readers share the
//! state behind a lock that is held for short, synchronous reads only.

use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::state::{Command, Event, Op, Rejection, State};
use crate::store::Store;

/// Snapshot (and compact the log) after this many commands.
const SNAPSHOT_EVERY: u64 = 10_000;
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the scheduler's log is unavailable: {0}")]
    Unavailable(String),
}

struct Proposal {
    op: Op,
    reply: oneshot::Sender<Result<Vec<Event>, ProposeError>>,
}

#[derive(Clone)]
pub struct Replica {
    state: Arc<RwLock<State>>,
    tx: mpsc::Sender<Proposal>,
    applied: watch::Receiver<u64>,
    events: broadcast::Sender<Event>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Replica {
    /// Loads the state from `store` and starts the writer task.
    pub async fn start(store: Store) -> anyhow::Result<Self> {
        let loaded = store.load().await?;
        let state = Arc::new(RwLock::new(loaded.state));
        let (tx, rx) = mpsc::channel(4096);
        let (applied_tx, applied) = watch::channel(loaded.applied);
        let (events, _) = broadcast::channel(4096);
        let writer = Writer {
            store,
            state: state.clone(),
            applied: applied_tx,
            events: events.clone(),
            next_index: loaded.applied + 1,
            last_snapshot: loaded.snapshot_index,
            last_at: 0,
        };
        tokio::spawn(writer.run(rx));
        Ok(Self {
            state,
            tx,
            applied,
            events,
        })
    }

    /// Proposes `op`; returns once it is durable and applied, with apply's result.
    pub async fn propose(&self, op: Op) -> Result<Vec<Event>, ProposeError> {
        let _timer = crate::metrics::PROPOSAL_SECONDS.start_timer();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { op, reply })
            .await
            .map_err(|_| ProposeError::Unavailable("the log writer has stopped".into()))?;
        rx.await
            .map_err(|_| ProposeError::Unavailable("the log writer has stopped".into()))?
    }

    /// A short, synchronous read of the state. Never hold it across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the last applied command; changes after every applied batch.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

struct Writer {
    store: Store,
    state: Arc<RwLock<State>>,
    applied: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    next_index: u64,
    last_snapshot: u64,
    last_at: i64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Proposal>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let at = now_ms().max(self.last_at);
            self.last_at = at;
            let (cmds, replies): (Vec<Command>, Vec<_>) = batch
                .drain(..)
                .map(|p| {
                    (
                        Command {
                            at_ms: at,
                            op: p.op,
                        },
                        p.reply,
                    )
                })
                .unzip();
            if let Err(e) = self.store.append(self.next_index, &cmds).await {
                // Nothing of this batch is acknowledged; the state is unchanged.
                tracing::error!("log append failed: {e:#}");
                for r in replies {
                    let _ = r.send(Err(ProposeError::Unavailable(format!("{e:#}"))));
                }
                continue;
            }
            self.next_index += cmds.len() as u64;
            let mut results = Vec::with_capacity(cmds.len());
            {
                let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
                for cmd in &cmds {
                    results.push(state.apply(cmd));
                }
            }
            let applied = self.next_index - 1;
            self.applied.send_replace(applied);
            for (result, reply) in results.into_iter().zip(replies) {
                if let Ok(events) = &result {
                    for e in events {
                        let _ = self.events.send(e.clone());
                    }
                }
                let _ = reply.send(result.map_err(ProposeError::from));
            }
            if applied - self.last_snapshot >= SNAPSHOT_EVERY {
                self.snapshot(applied).await;
            }
        }
    }

    async fn snapshot(&mut self, index: u64) {
        let json = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            serde_json::to_string(&*state)
        };
        match json {
            Ok(json) => match self.store.snapshot(index, json).await {
                Ok(()) => self.last_snapshot = index,
                Err(e) => tracing::warn!("snapshot at {index} failed: {e:#}"),
            },
            Err(e) => tracing::warn!("encoding snapshot failed: {e}"),
        }
    }
}
