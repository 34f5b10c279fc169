//! The agent's connection to the schedulers: register, then one heartbeat stream
//! on which it reconciles its runs with the desired set it is sent, and reports
//! run starts, usage intervals and exits until each is acknowledged. Reports
//! survive reconnects (they are resent on the next stream); the scheduler
//! applies each once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use coop_proto::v1::{
    self as pb, agent_message::Msg as Up, agent_service_client::AgentServiceClient,
    scheduler_message::Msg as Down,
};
use tokio::sync::{mpsc, watch};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::gpu::GpuInfo;
use crate::runner::{Exit, RunKey, Runner, Spawned};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Scheduler addresses (`http://host:port`); any of them will do.
    pub schedulers: Vec<String>,
    pub token: String,
    pub node: String,
    pub owner: String,
    pub gpus: Vec<GpuInfo>,
    pub data_dir: PathBuf,
    /// Where to publish telemetry and the report backlog, if anywhere.
    pub metrics: Option<crate::metrics::AgentMetrics>,
}

pub struct Agent {
    cfg: AgentConfig,
    session: String,
    runner: Runner,
    exits: mpsc::UnboundedReceiver<Exit>,
    /// Runs of this session that have ended: never started again.
    ended: BTreeSet<RunKey>,
    /// Reports not yet acknowledged, in sequence order.
    unacked: VecDeque<pb::Report>,
    next_seq: u64,
    /// Sends on the current stream, if any.
    out: Option<mpsc::UnboundedSender<pb::AgentMessage>>,
    /// Watch on "registered at least once", for callers that wait for readiness.
    registered: watch::Sender<bool>,
    /// Runs that have started, with their GPUs and where their usage was last
    /// reported up to.
    metered: BTreeMap<RunKey, Metered>,
    /// How often usage is reported (the scheduler says, at registration).
    usage_interval: Duration,
    last_telemetry: std::time::Instant,
}

struct Metered {
    gpus: Vec<String>,
    since_ms: i64,
}

/// The scheduler asked to is not the leader; this one is.
#[derive(Debug, thiserror::Error)]
#[error("the leader is at {0}")]
struct Redirect(String);

/// A scheduler's error, or the leader it points to.
fn status_error(what: &str, s: &tonic::Status) -> anyhow::Error {
    match s
        .metadata()
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(leader) if s.code() == Code::Unavailable => {
            anyhow::Error::new(Redirect(leader.to_string()))
        }
        _ => anyhow!("{what}: {}", s.message()),
    }
}

/// Set by a scheduler that does not lead, on an UNAVAILABLE answer.
const LEADER_HEADER: &str = "x-coop-leader";

/// The scheduler refused this agent's registration for good.
#[derive(Debug, thiserror::Error)]
#[error("registration refused: {0}")]
pub struct Refused(String);

const STOP_ON_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Agent {
    pub async fn new(cfg: AgentConfig) -> anyhow::Result<Self> {
        if cfg.schedulers.is_empty() {
            anyhow::bail!("scheduler: at least one address is needed");
        }
        Runner::kill_orphans(&cfg.data_dir, Duration::from_secs(5)).await;
        let (tx, exits) = mpsc::unbounded_channel();
        let runner = Runner::new(cfg.data_dir.clone(), tx)?;
        Ok(Self {
            cfg,
            session: uuid::Uuid::new_v4().to_string(),
            runner,
            exits,
            ended: BTreeSet::new(),
            unacked: VecDeque::new(),
            next_seq: 1,
            out: None,
            registered: watch::channel(false).0,
            metered: BTreeMap::new(),
            usage_interval: Duration::from_secs(30),
            last_telemetry: std::time::Instant::now(),
        })
    }

    /// Becomes true once the node is registered.
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.subscribe()
    }

    /// Runs until `shutdown` turns true; then stops every job and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        let mut next = 0usize;
        let mut redirect: Option<String> = None;
        loop {
            let addr = redirect.take().unwrap_or_else(|| {
                next += 1;
                self.cfg.schedulers[(next - 1) % self.cfg.schedulers.len()].clone()
            });
            match self.session_with(&addr, &mut shutdown).await {
                Ok(()) => break,
                Err(e) if e.is::<Redirect>() => {
                    let to = e.downcast::<Redirect>().expect("checked").0;
                    tracing::info!("scheduler {addr} does not lead; following the leader at {to}");
                    redirect = Some(to);
                    self.registered.send_replace(false);
                    // On to the leader at once (a pause only so that two
                    // nodes with stale views cannot bounce it in a tight loop).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) if e.is::<Refused>() => {
                    self.runner
                        .stop_all(STOP_ON_SHUTDOWN_GRACE, &mut self.exits)
                        .await;
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!("scheduler {addr}: {e:#}; reconnecting");
                    if self.registered.send_replace(false) {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            // Keep collecting exits while disconnected; they are reported later.
            let until = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    Some(exit) = self.exits.recv() => self.on_exit(exit),
                    _ = stopped(&mut shutdown) => {
                        self.runner.stop_all(STOP_ON_SHUTDOWN_GRACE, &mut self.exits).await;
                        return Ok(());
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        self.runner
            .stop_all(STOP_ON_SHUTDOWN_GRACE, &mut self.exits)
            .await;
        Ok(())
    }

    fn authed<T>(&self, msg: T) -> anyhow::Result<Request<T>> {
        let mut req = Request::new(msg);
        let value = MetadataValue::try_from(format!("Bearer {}", self.cfg.token))
            .map_err(|_| anyhow!("token: not a valid header value"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }

    /// One connection: register, stream, until an error or shutdown (`Ok`).
    async fn session_with(
        &mut self,
        addr: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let channel: Channel = Endpoint::from_shared(addr.to_string())
            .context("scheduler address")?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await
            .context("connecting")?;
        let mut client = AgentServiceClient::new(channel);
        let reg = pb::RegisterRequest {
            node: self.cfg.node.clone(),
            owner: self.cfg.owner.clone(),
            gpus: self
                .cfg
                .gpus
                .iter()
                .map(|g| pb::Gpu {
                    uuid: g.uuid.clone(),
                    index: g.index,
                    model: g.model.clone(),
                    memory_mb: g.memory_mb,
                    job: String::new(),
                })
                .collect(),
            session: self.session.clone(),
        };
        let resp = client
            .register(self.authed(reg)?)
            .await
            .map_err(|s| match s.code() {
                // Retrying cannot help: the configuration or credential is wrong.
                Code::InvalidArgument
                | Code::NotFound
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::AlreadyExists => anyhow::Error::new(Refused(s.message().to_string())),
                _ => status_error("register", &s),
            })?
            .into_inner();
        let interval = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
        if resp.usage_interval_ms > 0 {
            self.usage_interval = Duration::from_millis(resp.usage_interval_ms.max(50));
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let hello = pb::AgentMessage {
            msg: Some(Up::Hello(pb::Hello {
                node: self.cfg.node.clone(),
                session: self.session.clone(),
            })),
        };
        tx.send(hello)?;
        for r in &self.unacked {
            tx.send(report_msg(r.clone()))?;
        }
        let mut inbound = client
            .heartbeat(self.authed(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))?)
            .await
            .map_err(|s| status_error("heartbeat", &s))?
            .into_inner();
        self.out = Some(tx.clone());
        self.registered.send_replace(true);
        if let Some(m) = &self.cfg.metrics {
            m.set_connected(&self.cfg.node, true);
        }
        tracing::info!("node {} connected to {addr}", self.cfg.node);

        let mut tick = tokio::time::interval(interval);
        let mut usage_tick = tokio::time::interval(self.usage_interval);
        usage_tick.tick().await;
        let result = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.on_message(m),
                    Ok(None) => break Err(anyhow!("stream closed by the scheduler")),
                    Err(s) => break Err(status_error("stream", &s)),
                },
                Some(exit) = self.exits.recv() => self.on_exit(exit),
                _ = usage_tick.tick() => self.report_usage(),
                _ = tick.tick() => {
                    self.publish_metrics();
                    let ping = pb::AgentMessage { msg: Some(Up::Ping(pb::Ping {})) };
                    if tx.send(ping).is_err() {
                        break Err(anyhow!("stream closed"));
                    }
                }
                _ = stopped(shutdown) => break Ok(()),
            }
        };
        self.out = None;
        if let Some(m) = &self.cfg.metrics {
            m.set_connected(&self.cfg.node, false);
        }
        result
    }

    /// One telemetry reading of every GPU, and the report backlog.
    fn publish_metrics(&mut self) {
        let Some(m) = &self.cfg.metrics else { return };
        let dt = self.last_telemetry.elapsed().as_secs_f64();
        self.last_telemetry = std::time::Instant::now();
        let busy = |uuid: &str| {
            self.metered
                .values()
                .any(|r| r.gpus.iter().any(|g| g == uuid))
        };
        m.publish(&self.cfg.node, &self.cfg.gpus, &busy, dt);
        m.set_backlog(&self.cfg.node, self.unacked.len());
    }

    fn on_message(&mut self, msg: pb::SchedulerMessage) {
        match msg.msg {
            Some(Down::Desired(d)) => self.reconcile(d.runs),
            Some(Down::Ack(a)) => {
                while self.unacked.front().is_some_and(|r| r.seq <= a.seq) {
                    self.unacked.pop_front();
                }
            }
            Some(Down::LogRequest(r)) => self.serve_log(r),
            None => {}
        }
    }

    /// Makes the local runs match the desired set.
    fn reconcile(&mut self, runs: Vec<pb::Run>) {
        let mut wanted = BTreeSet::new();
        for run in runs {
            let key = RunKey {
                job: run.job_id.clone(),
                attempt: run.attempt,
            };
            wanted.insert(key.clone());
            let grace = Duration::from_millis(run.kill_grace_ms);
            if self.runner.is_running(&key) {
                if run.stop {
                    self.runner.stop(&key, grace);
                }
            } else if !self.ended.contains(&key) {
                if run.stop {
                    // Cancelled before it started here: nothing to stop.
                    self.on_exit(Exit {
                        key,
                        at_ms: crate::runner::now_ms(),
                        exit_code: 143,
                        reason: "cancelled before it started".into(),
                    });
                    continue;
                }
                tracing::info!("starting run {key} on {:?}", run.gpus);
                match self.runner.spawn(key.clone(), &run.command, &run.gpus) {
                    Spawned::Started { at_ms } => {
                        self.metered.insert(
                            key.clone(),
                            Metered {
                                gpus: run.gpus.clone(),
                                since_ms: at_ms,
                            },
                        );
                        self.report(pb::report::Event::Started(pb::RunStarted {
                            job_id: key.job,
                            attempt: key.attempt,
                            at_ms,
                        }))
                    }
                    Spawned::Failed(exit) => self.on_exit(exit),
                }
            }
        }
        // Anything not wanted any more (cancelled, requeued while we were away).
        for key in self.runner.keys() {
            if !wanted.contains(&key) {
                tracing::info!("stopping run {key}: no longer assigned to this node");
                self.runner.stop(&key, Duration::from_secs(10));
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        tracing::info!(
            "run {} exited with {} {}",
            exit.key,
            exit.exit_code,
            exit.reason
        );
        self.runner.finished(&exit.key);
        self.ended.insert(exit.key.clone());
        let energy_mj = self
            .metered
            .remove(&exit.key)
            .map_or(0, |m| self.energy_mj(&m.gpus, m.since_ms, exit.at_ms));
        self.report(pb::report::Event::Exited(pb::RunExited {
            job_id: exit.key.job,
            attempt: exit.key.attempt,
            at_ms: exit.at_ms,
            exit_code: exit.exit_code,
            reason: exit.reason,
            energy_mj,
        }));
    }

    /// Reports every running run's usage since its last report.
    fn report_usage(&mut self) {
        let now = crate::runner::now_ms();
        let mut events = Vec::new();
        for (key, m) in self.metered.iter_mut() {
            if now <= m.since_ms {
                continue;
            }
            let energy_mj = energy_mj(&self.cfg.gpus, &m.gpus, m.since_ms, now);
            m.since_ms = now;
            events.push(pb::report::Event::Usage(pb::RunUsage {
                job_id: key.job.clone(),
                attempt: key.attempt,
                to_ms: now,
                energy_mj,
            }));
        }
        for e in events {
            self.report(e);
        }
    }

    fn energy_mj(&self, gpus: &[String], from_ms: i64, to_ms: i64) -> u64 {
        energy_mj(&self.cfg.gpus, gpus, from_ms, to_ms)
    }

    fn report(&mut self, event: pb::report::Event) {
        let report = pb::Report {
            seq: self.next_seq,
            event: Some(event),
        };
        self.next_seq += 1;
        self.unacked.push_back(report.clone());
        if let Some(tx) = &self.out {
            // A closed stream is fine: unacked reports are resent on the next.
            let _ = tx.send(report_msg(report));
        }
    }

    fn serve_log(&mut self, r: pb::LogRequest) {
        let key = RunKey {
            job: r.job_id,
            attempt: r.attempt,
        };
        let mut chunk = pb::LogChunk {
            request_id: r.request_id,
            ..Default::default()
        };
        match self.runner.read_log(&key, r.offset, r.limit) {
            Ok((data, eof)) => {
                chunk.next_offset = r.offset + data.len() as u64;
                chunk.data = data;
                chunk.eof = eof;
            }
            Err(e) => chunk.error = e.to_string(),
        }
        if let Some(tx) = &self.out {
            let _ = tx.send(pb::AgentMessage {
                msg: Some(Up::LogChunk(chunk)),
            });
        }
    }
}

/// Energy the run's GPUs drew over `[from, to]`: simulated GPUs draw their
/// model's typical board power while busy (W x ms = mJ).
fn energy_mj(all: &[GpuInfo], gpus: &[String], from_ms: i64, to_ms: i64) -> u64 {
    let ms = (to_ms - from_ms).max(0) as u64;
    gpus.iter()
        .filter_map(|u| all.iter().find(|g| &g.uuid == u))
        .map(|g| crate::gpu::sim_power_w(&g.model) * ms)
        .sum()
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn report_msg(r: pb::Report) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Report(r)),
    }
}
