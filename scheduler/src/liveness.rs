//! What the scheduler knows of its agents that is not replicated: which are
//! connected, when each was last heard from, and the log requests in flight.
//! A new leader starts with none of it and gives every node a full timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coop_proto::v1 as pb;
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::Status;

use crate::clock::now_ms;

pub type AgentTx = mpsc::Sender<Result<pb::SchedulerMessage, Status>>;

struct Conn {
    id: u64,
    tx: AgentTx,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<String, Conn>,
    seen: HashMap<String, i64>,
    /// Log requests waiting for an answer: the node asked, and where to reply.
    logs: HashMap<u64, (String, oneshot::Sender<pb::LogChunk>)>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    wake: Notify,
    started_ms: std::sync::atomic::AtomicI64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ConnInfo {
    pub last_seen_ms: i64,
    pub connected: bool,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            inner: Mutex::default(),
            next_id: AtomicU64::new(1),
            wake: Notify::new(),
            started_ms: std::sync::atomic::AtomicI64::new(now_ms()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new stream from `node`, replacing any older one.
    pub fn connect(&self, node: &str, tx: AgentTx) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.conns.insert(node.to_string(), Conn { id, tx });
        inner.seen.insert(node.to_string(), now_ms());
        id
    }

    pub fn disconnect(&self, node: &str, id: u64) {
        let mut inner = self.lock();
        if inner.conns.get(node).is_some_and(|c| c.id == id) {
            inner.conns.remove(node);
        }
    }

    pub fn touch(&self, node: &str) {
        self.lock().seen.insert(node.to_string(), now_ms());
    }

    pub fn last_seen(&self, node: &str) -> Option<i64> {
        self.lock().seen.get(node).copied()
    }

    /// When a node with no heartbeat since this scheduler became leader counts from:
    /// since when agents have had the chance to reach this scheduler as leader.
    pub fn started_ms(&self) -> i64 {
        self.started_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Heartbeats seen while following are stale: start counting afresh.
    pub fn restart_grace(&self) {
        self.started_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        self.lock().seen.clear();
    }

    pub fn connection_info(&self, node: &str) -> ConnInfo {
        let inner = self.lock();
        ConnInfo {
            last_seen_ms: inner.seen.get(node).copied().unwrap_or(0),
            connected: inner.conns.contains_key(node),
        }
    }

    /// Asks `node`'s agent for a piece of a run's output, over its heartbeat stream.
    pub async fn fetch_logs(
        &self,
        node: &str,
        job: uuid::Uuid,
        attempt: u32,
        offset: u64,
        limit: u32,
        timeout: Duration,
    ) -> Result<pb::LogChunk, Status> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let tx = {
            let mut inner = self.lock();
            let tx = inner.conns.get(node).map(|c| c.tx.clone()).ok_or_else(|| {
                Status::unavailable(format!(
                    "node {node}, which holds this job's output, is not connected"
                ))
            })?;
            inner.logs.insert(request_id, (node.to_string(), reply));
            tx
        };
        let msg = pb::SchedulerMessage {
            msg: Some(pb::scheduler_message::Msg::LogRequest(pb::LogRequest {
                request_id,
                job_id: job.to_string(),
                attempt,
                offset,
                limit,
            })),
        };
        let result = async {
            tx.send(Ok(msg))
                .await
                .map_err(|_| Status::unavailable(format!("node {node} disconnected")))?;
            tokio::time::timeout(timeout, rx)
                .await
                .map_err(|_| Status::deadline_exceeded(format!("node {node} did not answer")))?
                .map_err(|_| Status::unavailable(format!("node {node} disconnected")))
        }
        .await;
        self.lock().logs.remove(&request_id);
        let chunk = result?;
        if !chunk.error.is_empty() {
            return Err(Status::not_found(chunk.error));
        }
        Ok(chunk)
    }

    /// An answer from `node`'s agent: taken only for a request sent to that
    /// node, so that one machine cannot answer for another's runs.
    pub fn complete_log(&self, node: &str, chunk: pb::LogChunk) {
        let mut inner = self.lock();
        if inner
            .logs
            .get(&chunk.request_id)
            .is_some_and(|(n, _)| n == node)
            && let Some((_, reply)) = inner.logs.remove(&chunk.request_id)
        {
            let _ = reply.send(chunk);
        }
    }

    /// Asks the scheduling loop for a pass now (new job, freed GPUs, new node).
    pub fn wake_scheduler(&self) {
        self.wake.notify_one();
    }

    pub async fn scheduler_woken(&self) {
        self.wake.notified().await
    }
}
