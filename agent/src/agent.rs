//! The agent's connection to the schedulers: register, then one heartbeat stream
//! on which it reconciles its runs with the desired set it is sent, and reports
//! run starts, usage intervals and exits until each is acknowledged. Every
//! report is in the spool before it is sent, so it survives reconnects, long
//! scheduler outages and the agent's own crash; the scheduler applies each
//! (identity, sequence) once.

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
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::gpu::{Gpus, Telemetry};
use crate::runner::{Exit, RunKey, Runner, Spawned, now_ms, process_tag};
use crate::spool::{RunRecord, Spool};

/// The longest grace any run gets between SIGTERM and SIGKILL.
const MAX_GRACE_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug)]
pub struct AgentConfig {
    /// Scheduler addresses (`https://host:port`); any of them will do.
    pub schedulers: Vec<String>,
    /// The node's credential (see `enroll`).
    pub token: String,
    /// Verify the schedulers against the cluster CA; `None`: plain text.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    pub node: String,
    pub owner: String,
    pub gpus: Gpus,
    pub data_dir: PathBuf,
    /// How often the GPUs are read (metrics, and each run's utilisation).
    pub telemetry_interval: Duration,
    /// How runs are kept apart (cgroups, containers).
    pub isolation: crate::runner::Isolation,
    /// Run directories (output, working files) are removed this long after
    /// their run ended.
    pub keep_runs: Duration,
    /// Where to publish telemetry and the report backlog, if anywhere.
    pub metrics: Option<crate::metrics::AgentMetrics>,
    /// Where other nodes reach this one's runs (multi-node rendezvous);
    /// empty: the scheduler takes the address the agent connects from.
    pub address: String,
    /// A site or rack label (empty: none).
    pub site: String,
}

pub struct Agent {
    cfg: AgentConfig,
    spool: Spool,
    /// Held while the agent runs: one agent per data dir.
    _lock: nix::fcntl::Flock<std::fs::File>,
    runner: Runner,
    exits: mpsc::UnboundedReceiver<Exit>,
    /// Runs that have ended here: never started again.
    ended: BTreeSet<RunKey>,
    /// Reports not yet acknowledged, in sequence order (also in the spool).
    unacked: VecDeque<pb::Report>,
    /// Highest sequence acknowledged and not yet cleared from the spool.
    acked_to: u64,
    /// Sends on the current stream, if any.
    out: Option<mpsc::UnboundedSender<pb::AgentMessage>>,
    /// Watch on "registered at least once", for callers that wait for readiness.
    registered: watch::Sender<bool>,
    /// Runs that have started and not ended, with what was measured of them.
    metered: BTreeMap<RunKey, RunRecord>,
    /// How often usage is reported (the scheduler says, at registration),
    /// and when next: connected or not, usage goes to the spool on time.
    usage_interval: Duration,
    next_usage: tokio::time::Instant,
    next_telemetry: tokio::time::Instant,
    last_prune: std::time::Instant,
    next_sweep: tokio::time::Instant,
    /// Shutting down: no new runs are started.
    stopping: bool,
    /// When each GPU last gave a reading: a run on a GPU that is lost is
    /// billed up to there.
    last_read_ms: BTreeMap<String, i64>,
    /// Runs being stopped because a GPU of theirs was lost.
    lost_runs: BTreeMap<RunKey, LostRun>,
    /// GPUs lost and still offered: the node registers again without them
    /// once the runs they held have ended and those ends are acknowledged
    /// (until then it is drained, so that nothing new lands on them).
    dropping: BTreeSet<String>,
    /// Every GPU this agent started with, lost ones too (their metrics go on).
    known: Vec<crate::gpu::GpuInfo>,
}

/// Ended runs are kept in the spool this long (for `coop agent status`)
/// once the schedulers have acknowledged everything about them.
const RUN_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

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

/// The node's GPUs changed (one was lost): it registers again at once.
#[derive(Debug, thiserror::Error)]
#[error("registering again without the lost GPUs")]
struct Reregister;

const STOP_ON_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a run on a lost GPU gets between SIGTERM and SIGKILL.
const LOST_GPU_GRACE: Duration = Duration::from_secs(5);
/// How long after SIGKILL a run on a lost GPU is recorded as ended even if
/// its process is still there (stuck in the driver, as processes on a GPU
/// that fell off the bus often are): the node must not wait on it forever.
const LOST_GPU_GIVE_UP: Duration = Duration::from_secs(10);

/// A run being stopped because a GPU of its was lost (and measured up to
/// that GPU's last reading: see `gpu_lost`).
struct LostRun {
    why: String,
    give_up_at: tokio::time::Instant,
}

impl Agent {
    pub async fn new(mut cfg: AgentConfig) -> anyhow::Result<Self> {
        if cfg.schedulers.is_empty() {
            anyhow::bail!("scheduler: at least one address is needed");
        }
        if cfg.telemetry_interval < Duration::from_millis(10) {
            anyhow::bail!("telemetry-interval: must be at least 10ms");
        }
        private_dir(&cfg.data_dir)?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        let mut spool = Spool::open(&cfg.data_dir).await?;
        // What it measured and ran: the agent's own.
        for f in ["agent.db", "agent.db-wal", "agent.db-shm"] {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                cfg.data_dir.join(f),
                std::fs::Permissions::from_mode(0o600),
            );
        }
        recover_orphans(&mut spool, cfg.gpus.telemetry.as_mut()).await?;
        stop_unrecorded(spool.identity()).await;
        // A killed container client leaves its container running.
        if let Some(rt) = &cfg.isolation.runtime {
            match rt.remove_containers_of(spool.identity()).await {
                Ok(names) if !names.is_empty() => tracing::warn!(
                    "removed {} containers a previous agent process left: {}",
                    names.len(),
                    names.join(", ")
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    "could not look for containers a previous agent process left: {e:#}"
                ),
            }
        }
        let unacked: VecDeque<_> = spool.pending().await?.into();
        let ended = spool
            .runs()
            .await?
            .into_iter()
            .filter(|r| r.ended_ms.is_some())
            .map(|r| r.key())
            .collect();
        if !unacked.is_empty() {
            tracing::info!(
                "{} reports in the spool wait for a scheduler's acknowledgement",
                unacked.len()
            );
        }
        let (tx, exits) = mpsc::unbounded_channel();
        let known = cfg.gpus.info.clone();
        let runner = Runner::new(
            cfg.data_dir.clone(),
            tx,
            cfg.isolation.clone(),
            spool.identity().to_string(),
        )?;
        Ok(Self {
            cfg,
            spool,
            _lock: lock,
            runner,
            exits,
            ended,
            unacked,
            acked_to: 0,
            out: None,
            registered: watch::channel(false).0,
            metered: BTreeMap::new(),
            usage_interval: Duration::from_secs(30),
            next_usage: tokio::time::Instant::now() + Duration::from_secs(30),
            next_telemetry: tokio::time::Instant::now(),
            last_prune: std::time::Instant::now(),
            next_sweep: tokio::time::Instant::now(),
            stopping: false,
            last_read_ms: BTreeMap::new(),
            lost_runs: BTreeMap::new(),
            dropping: BTreeSet::new(),
            known,
        })
    }

    /// This agent's identity (kept in its spool across restarts).
    pub fn identity(&self) -> &str {
        self.spool.identity()
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
                    // The credential goes only where it may: over TLS, to a
                    // scheduler whose certificate the cluster CA signed; in
                    // plain text, only to the addresses this agent was given.
                    let verified = self.cfg.tls.is_some() && to.starts_with("https://");
                    if !verified && !self.cfg.schedulers.contains(&to) {
                        tracing::warn!(
                            "scheduler {addr} points to {to}, which is not among --scheduler: not followed"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    tracing::info!("scheduler {addr} does not lead; following the leader at {to}");
                    redirect = Some(to);
                    self.registered.send_replace(false);
                    // On to the leader at once (a pause only so that two
                    // nodes with stale views cannot bounce it in a tight loop).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) if e.is::<Reregister>() => {
                    tracing::info!(
                        "registering node {} again without its lost GPUs",
                        self.cfg.node
                    );
                    redirect = Some(addr);
                    continue;
                }
                Err(e) if e.is::<Refused>() => {
                    self.stop_all_runs("the agent was refused").await;
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!("scheduler {addr}: {e:#}; reconnecting");
                    if self.registered.send_replace(false) {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            // Keep running, metering and spooling while disconnected: the
            // spool is sent on the next stream.
            let until = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    Some(exit) = self.exits.recv() => self.on_exit(exit).await,
                    _ = tokio::time::sleep_until(self.next_usage) => self.report_usage().await,
                    _ = tokio::time::sleep_until(self.next_telemetry) => self.read_gpus().await,
                    _ = tokio::time::sleep_until(self.next_sweep) => self.sweep_run_dirs(),
                    _ = stopped(&mut shutdown) => {
                        self.stop_all_runs("the agent shut down").await;
                        return Ok(());
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        self.stop_all_runs("the agent shut down").await;
        Ok(())
    }

    /// On shutdown with a scheduler still there: stops every run and stays
    /// until their ends (reported lost, so that their jobs are requeued at
    /// once and billed exactly) are acknowledged, or the grace runs out.
    async fn stop_while_connected(&mut self, inbound: &mut tonic::Streaming<pb::SchedulerMessage>) {
        self.stopping = true;
        // First, so that the jobs handed back are not placed here again.
        if let Some(tx) = &self.out {
            let _ = tx.send(pb::AgentMessage {
                msg: Some(Up::Leaving(pb::Leaving {})),
            });
        }
        for key in self.runner.keys() {
            self.runner.stop(&key, STOP_ON_SHUTDOWN_GRACE);
        }
        let deadline =
            tokio::time::Instant::now() + STOP_ON_SHUTDOWN_GRACE + Duration::from_secs(5);
        while !(self.runner.keys().is_empty() && self.unacked.is_empty()) {
            tokio::select! {
                Some(exit) = self.exits.recv() => self.end(exit, Some("the agent shut down")).await,
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.on_message(m).await,
                    _ => return,
                },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
        // Everything acknowledged: the node can go down now, not after its timeout.
        if let Some(tx) = &self.out {
            let _ = tx.send(pb::AgentMessage {
                msg: Some(Up::Goodbye(pb::Goodbye {})),
            });
            // Until the scheduler has taken it and closed the stream.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        }
    }

    /// Stops every run and records each as lost (the job is not at fault),
    /// with its usage up to its exit.
    async fn stop_all_runs(&mut self, why: &str) {
        self.stopping = true;
        for key in self.runner.keys() {
            self.runner.stop(&key, STOP_ON_SHUTDOWN_GRACE);
        }
        while !self.runner.keys().is_empty() {
            let Some(exit) = self.exits.recv().await else {
                break;
            };
            self.end(exit, Some(why)).await;
        }
        self.flush_acks().await;
        self.spool.close().await;
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
        let channel: Channel = crate::enroll::connect(addr, self.cfg.tls.as_ref()).await?;
        // The desired runs of a full node carry every run's command and
        // environment (64 KiB each at most): above gRPC's default 4 MiB.
        let mut client = AgentServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let identity = self.spool.identity().to_string();
        // Lost GPUs whose runs' ends the scheduler has: no longer offered.
        if !self.dropping.is_empty() && self.lost_runs.is_empty() && self.unacked.is_empty() {
            let lost = std::mem::take(&mut self.dropping);
            self.cfg.gpus.info.retain(|g| !lost.contains(&g.uuid));
        }
        if self.cfg.gpus.info.is_empty() {
            return Err(anyhow::Error::new(Refused(
                "every GPU of this node is lost: nothing is left to offer".into(),
            )));
        }
        let reg = pb::RegisterRequest {
            address: self.cfg.address.clone(),
            site: self.cfg.site.clone(),
            node: self.cfg.node.clone(),
            owner: self.cfg.owner.clone(),
            gpus: self
                .cfg
                .gpus
                .info
                .iter()
                .map(|g| pb::Gpu {
                    uuid: g.uuid.clone(),
                    index: g.index,
                    model: g.model.clone(),
                    memory_mb: g.memory_mb,
                    job: String::new(),
                    measured: g.measured.map(|m| pb::GpuCapacity {
                        fp16_gflops: m.fp16_gflops,
                        bf16_gflops: m.bf16_gflops,
                        memory_mb_per_s: m.memory_mb_per_s,
                    }),
                    power_limit_w: g.power_limit_w,
                })
                .collect(),
            session: identity.clone(),
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
            let every = Duration::from_millis(resp.usage_interval_ms.max(50));
            if every != self.usage_interval {
                self.usage_interval = every;
                self.next_usage = tokio::time::Instant::now() + every;
            }
        }
        if resp.last_seq >= self.spool.next_seq() {
            // The scheduler applied reports this spool no longer numbers above
            // (it lost its last writes): go on above them, or new reports
            // would be taken for retransmissions.
            tracing::warn!(
                "the schedulers applied report {} of this agent, beyond its spool's numbering; renumbering",
                resp.last_seq
            );
            self.spool.skip_to(resp.last_seq + 1).await?;
        }
        self.on_ack(resp.last_seq);

        let (tx, rx) = mpsc::unbounded_channel();
        let hello = pb::AgentMessage {
            msg: Some(Up::Hello(pb::Hello {
                node: self.cfg.node.clone(),
                session: identity,
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
        if !self.dropping.is_empty() {
            self.drain_for_lost_gpus();
        }
        let result = loop {
            if !self.dropping.is_empty() && self.lost_runs.is_empty() && self.unacked.is_empty() {
                // Registering again leaves them out (see above).
                break Err(anyhow::Error::new(Reregister));
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.on_message(m).await,
                    Ok(None) => break Err(anyhow!("stream closed by the scheduler")),
                    Err(s) => break Err(status_error("stream", &s)),
                },
                Some(exit) = self.exits.recv() => self.on_exit(exit).await,
                _ = tokio::time::sleep_until(self.next_usage) => self.report_usage().await,
                _ = tokio::time::sleep_until(self.next_telemetry) => self.read_gpus().await,
                _ = tokio::time::sleep_until(self.next_sweep) => self.sweep_run_dirs(),
                _ = tick.tick() => {
                    self.flush_acks().await;
                    let ping = pb::AgentMessage { msg: Some(Up::Ping(pb::Ping {})) };
                    if tx.send(ping).is_err() {
                        break Err(anyhow!("stream closed"));
                    }
                }
                _ = stopped(shutdown) => {
                    self.stop_while_connected(&mut inbound).await;
                    break Ok(());
                }
            }
        };
        self.out = None;
        if let Some(m) = &self.cfg.metrics {
            m.set_connected(&self.cfg.node, false);
        }
        result
    }

    /// Removes the directories of runs that ended over `keep_runs` ago.
    fn sweep_run_dirs(&mut self) {
        let keep = self.cfg.keep_runs;
        self.next_sweep = tokio::time::Instant::now()
            + (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let cutoff = std::time::SystemTime::now() - keep;
        match self.runner.sweep(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} run directories older than {keep:?}"),
            Err(e) => tracing::warn!("removing old run directories: {e:#}"),
        }
    }

    /// One reading of every GPU: published as metrics, and each running
    /// run's utilisation accumulated.
    async fn read_gpus(&mut self) {
        self.next_telemetry = tokio::time::Instant::now() + self.cfg.telemetry_interval;
        let now = now_ms();
        let readings = self.cfg.gpus.telemetry.read(now);
        for r in &readings {
            // A reading that said nothing (a passing NVML error) is not one.
            let said = r.memory_used_bytes.is_some();
            if !r.lost && said {
                self.last_read_ms.insert(r.uuid.clone(), now);
            } else if r.lost && self.cfg.gpus.info.iter().any(|g| g.uuid == r.uuid) {
                self.gpu_lost(&r.uuid, now).await;
            }
        }
        for (key, r) in self.metered.iter_mut() {
            // A run on a lost GPU was measured to its end when it was found.
            if self.lost_runs.contains_key(key) {
                continue;
            }
            for u in readings.iter().filter(|x| r.gpus.contains(&x.uuid)) {
                if let Some(pct) = u.utilization_pct {
                    r.utilization_sum += pct as u64;
                    r.utilization_samples += 1;
                }
            }
        }
        if let Some(m) = &self.cfg.metrics {
            m.publish(&self.cfg.node, &self.known, &readings);
            m.set_backlog(&self.cfg.node, self.unacked.len());
        }
        let stuck: Vec<RunKey> = self
            .lost_runs
            .iter()
            .filter(|(_, l)| l.give_up_at <= tokio::time::Instant::now())
            .map(|(k, _)| k.clone())
            .collect();
        for key in stuck {
            tracing::error!(
                "run {key} is still there {LOST_GPU_GIVE_UP:?} after SIGKILL (stuck in the driver of its lost GPU?): recorded as ended"
            );
            let exit = Exit {
                key,
                at_ms: now,
                exit_code: 137,
                reason: "did not exit after SIGKILL".into(),
            };
            self.on_exit(exit).await;
        }
    }

    /// A GPU is gone: the runs on it are stopped and billed up to its last
    /// reading, and the node registers again without it. Called at each
    /// reading that finds it lost, until then.
    async fn gpu_lost(&mut self, uuid: &str, now: i64) {
        let last = self.last_read_ms.get(uuid).copied().unwrap_or(now);
        let why = format!("GPU {uuid} was lost");
        let mut events = Vec::new();
        let mut measured = Vec::new();
        for (key, r) in self.metered.iter_mut() {
            if !r.gpus.iter().any(|g| g == uuid) || self.lost_runs.contains_key(key) {
                continue;
            }
            tracing::warn!("stopping run {key}: {why}");
            // Measured now, up to the last reading, and not again: its other
            // GPUs' energy while it is being killed is not its work.
            let to = last.max(r.metered_to_ms);
            events.extend(usage(self.cfg.gpus.telemetry.as_mut(), key, r, to));
            measured.push(r.clone());
            self.lost_runs.insert(
                key.clone(),
                LostRun {
                    why: why.clone(),
                    give_up_at: tokio::time::Instant::now() + LOST_GPU_GRACE + LOST_GPU_GIVE_UP,
                },
            );
            // Nothing it does on a lost GPU can succeed: no long grace.
            self.runner.stop_within(key, LOST_GPU_GRACE);
        }
        if self.dropping.insert(uuid.to_string()) {
            tracing::error!("{why}: node {} stops offering it", self.cfg.node);
            // Before the reports: nothing is placed here once the runs end.
            self.drain_for_lost_gpus();
        }
        if !events.is_empty() {
            let refs: Vec<&RunRecord> = measured.iter().collect();
            self.report(events, &refs).await;
        }
    }

    /// Asks the scheduler to place nothing more here until the node has
    /// registered again without its lost GPUs.
    fn drain_for_lost_gpus(&self) {
        if let Some(tx) = &self.out {
            let _ = tx.send(pb::AgentMessage {
                msg: Some(Up::Leaving(pb::Leaving {})),
            });
        }
    }

    async fn on_message(&mut self, msg: pb::SchedulerMessage) {
        match msg.msg {
            Some(Down::Desired(d)) => self.reconcile(d.runs).await,
            Some(Down::Ack(a)) => self.on_ack(a.seq),
            Some(Down::LogRequest(r)) => self.serve_log(r),
            None => {}
        }
    }

    fn on_ack(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|r| r.seq <= seq) {
            self.unacked.pop_front();
        }
        self.acked_to = self.acked_to.max(seq);
    }

    /// Clears acknowledged reports from the spool, in one write for many acks
    /// (a report cleared late is only resent, and applied once).
    async fn flush_acks(&mut self) {
        if self.acked_to == 0 {
            return;
        }
        if let Err(e) = self.spool.ack(self.acked_to).await {
            tracing::warn!("clearing acknowledged reports from the spool: {e:#}");
            return;
        }
        self.acked_to = 0;
        if self.last_prune.elapsed() > Duration::from_secs(3600) {
            self.last_prune = std::time::Instant::now();
            match self.spool.prune(now_ms() - RUN_RETENTION_MS).await {
                Ok(n) if n > 0 => {
                    tracing::info!("forgot {n} runs ended over 7 days ago");
                    // No scheduler still wants runs that old: forget them here too.
                    if let Ok(runs) = self.spool.runs().await {
                        let kept: BTreeSet<RunKey> = runs.iter().map(|r| r.key()).collect();
                        self.ended.retain(|k| kept.contains(k));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("pruning the spool: {e:#}"),
            }
        }
    }

    /// Makes the local runs match the desired set.
    async fn reconcile(&mut self, runs: Vec<pb::Run>) {
        let mut wanted = BTreeSet::new();
        for run in runs {
            let key = RunKey {
                job: run.job_id.clone(),
                attempt: run.attempt,
            };
            wanted.insert(key.clone());
            // Whatever the scheduler says, a stop ends in SIGKILL within a day.
            let grace = Duration::from_millis(run.kill_grace_ms.min(MAX_GRACE_MS));
            if self.runner.is_running(&key) {
                if run.stop {
                    self.runner.stop(&key, grace);
                }
            } else if !self.ended.contains(&key) && !self.stopping {
                if let Some(g) = run.gpus.iter().find(|g| self.dropping.contains(*g)) {
                    // Placed before the drain landed: it cannot run there.
                    let why = format!("GPU {g} was lost before the run started");
                    let exit = Exit {
                        key,
                        at_ms: now_ms(),
                        exit_code: -1,
                        reason: String::new(),
                    };
                    self.end(exit, Some(&why)).await;
                    continue;
                }
                if run.stop {
                    // Cancelled before it started here: nothing to stop.
                    self.on_exit(Exit {
                        key,
                        at_ms: now_ms(),
                        exit_code: 143,
                        reason: "cancelled before it started".into(),
                    })
                    .await;
                    continue;
                }
                tracing::info!("starting run {key} on {:?}", run.gpus);
                match self.runner.spawn(key.clone(), &run) {
                    Spawned::Started { at_ms, pgid } => {
                        let t = self.cfg.gpus.telemetry.as_mut();
                        for g in &run.gpus {
                            t.set_busy(g, true, at_ms);
                        }
                        let record = RunRecord {
                            gpus: run.gpus.clone(),
                            pgid,
                            process: process_tag(pgid),
                            counters_mj: t.energy_mj(&run.gpus, at_ms),
                            epoch: t.epoch().to_string(),
                            ..RunRecord::new(&key, at_ms)
                        };
                        let event = pb::report::Event::Started(pb::RunStarted {
                            job_id: key.job.clone(),
                            attempt: key.attempt,
                            at_ms,
                        });
                        self.report(vec![event], &[&record]).await;
                        self.metered.insert(key, record);
                    }
                    Spawned::Failed(exit) => self.on_exit(exit).await,
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

    async fn on_exit(&mut self, exit: Exit) {
        self.end(exit, None).await;
    }

    /// A run's exit: recorded once, as lost where a GPU of its was lost, else
    /// as `lost` says.
    async fn end(&mut self, mut exit: Exit, lost: Option<&str>) {
        if self.ended.contains(&exit.key) && !self.metered.contains_key(&exit.key) {
            // The late exit of a run already recorded as ended (see
            // `LOST_GPU_GIVE_UP`).
            self.runner.finished(&exit.key);
            return;
        }
        match self.lost_runs.remove(&exit.key) {
            Some(gone) => {
                // It was measured up to the lost GPU's last reading when the
                // loss was found; nothing after that is billed.
                let metered = self
                    .metered
                    .get(&exit.key)
                    .map_or(exit.at_ms, |r| r.metered_to_ms);
                exit.at_ms = exit.at_ms.min(metered);
                self.finish(exit, Some(&gone.why), false).await;
            }
            None => self.finish(exit, lost, true).await,
        }
    }

    /// Records a run's end with its usage since the last report (none when
    /// `measure_end` is false: it was measured to its end already); `lost`
    /// says why the agent ended it when the job is not at fault.
    async fn finish(&mut self, exit: Exit, lost: Option<&str>, measure_end: bool) {
        tracing::info!(
            "run {} exited with {} {}",
            exit.key,
            exit.exit_code,
            exit.reason
        );
        self.runner.finished(&exit.key);
        self.ended.insert(exit.key.clone());
        let mut record = self.metered.remove(&exit.key).unwrap_or_else(|| {
            // Never started (spawn failed, or cancelled first): nothing measured.
            RunRecord::new(&exit.key, exit.at_ms)
        });
        let t = self.cfg.gpus.telemetry.as_mut();
        let energy_mj = if measure_end {
            measure(t, &mut record, exit.at_ms)
        } else {
            0
        };
        for g in &record.gpus {
            t.set_busy(g, false, exit.at_ms);
        }
        let reason = match lost {
            Some(why) if exit.reason.is_empty() => why.to_string(),
            Some(why) => format!("{why} ({})", exit.reason),
            None => exit.reason,
        };
        record.ended_ms = Some(exit.at_ms);
        record.exit_code = Some(exit.exit_code);
        record.reason = reason.clone();
        record.lost = lost.is_some();
        let mut events: Vec<pb::report::Event> = utilization(&record).into_iter().collect();
        events.push(pb::report::Event::Exited(pb::RunExited {
            job_id: exit.key.job,
            attempt: exit.key.attempt,
            at_ms: exit.at_ms,
            exit_code: exit.exit_code,
            reason,
            energy_mj,
            lost: lost.is_some(),
        }));
        self.report(events, &[&record]).await;
    }

    /// Reports every running run's usage since its last report, in one spool write.
    async fn report_usage(&mut self) {
        self.next_usage = tokio::time::Instant::now() + self.usage_interval;
        let now = now_ms();
        let mut events = Vec::new();
        for (key, r) in self.metered.iter_mut() {
            // A run on a lost GPU was measured to its end when it was found.
            if now <= r.metered_to_ms || self.lost_runs.contains_key(key) {
                continue;
            }
            events.extend(usage(self.cfg.gpus.telemetry.as_mut(), key, r, now));
        }
        if events.is_empty() {
            return;
        }
        let records: Vec<RunRecord> = self.metered.values().cloned().collect();
        let refs: Vec<&RunRecord> = records.iter().collect();
        self.report(events, &refs).await;
    }

    /// Spools the events with the runs' new records, then sends them.
    async fn report(&mut self, events: Vec<pb::report::Event>, runs: &[&RunRecord]) {
        let (reports, written) = self.spool.record(events, runs).await;
        if let Err(e) = written {
            // Still sent: the usage is lost only if the agent also dies before
            // the scheduler acknowledges it.
            tracing::error!("writing the spool failed: {e:#}; reports are held in memory only");
        }
        for report in reports {
            self.unacked.push_back(report.clone());
            if let Some(tx) = &self.out {
                // A closed stream is fine: unacked reports are resent on the next.
                let _ = tx.send(report_msg(report));
            }
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

/// One agent per data dir: a second one would share the spool's identity.
/// The agent's data dir holds its credential and the runs' output: its
/// user's only.
pub fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// The agent's lock in its data dir: one agent per dir.
pub const LOCK_FILE: &str = "agent.lock";

fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow!(
            "data-dir: {} is in use by another agent ({e}); each agent needs its own",
            dir.display()
        )
    })
}

/// Stops what is left of runs the spool does not know: a process started
/// just before its agent crashed (before the spool recorded it), or one that
/// left its run's process group. Every run carries its agent's identity in
/// its environment; at start no run of this agent should exist.
async fn stop_unrecorded(identity: &str) {
    let groups = crate::runner::groups_with_env(crate::runner::AGENT_ENV, identity);
    if groups.is_empty() {
        return;
    }
    tracing::warn!(
        "stopping {} process groups of runs this agent's spool does not know",
        groups.len()
    );
    crate::runner::stop_groups(&groups, Duration::from_secs(5)).await;
}

/// Runs that a previous agent process left unfinished (it crashed or was
/// killed): those still running are stopped, and every one is recorded as
/// lost with its usage up to its end as far as this agent can measure it.
async fn recover_orphans(spool: &mut Spool, telemetry: &mut dyn Telemetry) -> anyhow::Result<()> {
    let orphans: Vec<RunRecord> = spool
        .runs()
        .await?
        .into_iter()
        .filter(|r| r.ended_ms.is_none())
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    // Only a process that is provably the run's (same boot, same start time).
    let ours = |r: &RunRecord| r.process.is_some() && process_tag(r.pgid) == r.process;
    let alive: Vec<i32> = orphans.iter().filter(|r| ours(r)).map(|r| r.pgid).collect();
    for r in orphans.iter().filter(|r| ours(r)) {
        tracing::warn!(
            "stopping run {} (process group {}) left by a previous agent process",
            r.key(),
            r.pgid
        );
    }
    crate::runner::stop_groups(&alive, Duration::from_secs(5)).await;
    let now = now_ms();
    let mut events = Vec::new();
    let mut records = Vec::new();
    for mut r in orphans {
        let was_alive = alive.contains(&r.pgid);
        // A run found gone ended at some unknown time since it was last
        // measured: it is billed up to there, no further.
        let at_ms = if was_alive { now } else { r.metered_to_ms };
        let energy_mj = measure(telemetry, &mut r, at_ms);
        let reason = if was_alive {
            "the agent restarted; the run it left was stopped"
        } else {
            "the agent restarted; the run had ended meanwhile"
        };
        r.ended_ms = Some(at_ms);
        r.exit_code = Some(if was_alive { 143 } else { -1 });
        r.reason = reason.into();
        r.lost = true;
        events.extend(utilization(&r));
        events.push(pb::report::Event::Exited(pb::RunExited {
            job_id: r.job.clone(),
            attempt: r.attempt,
            at_ms,
            exit_code: r.exit_code.unwrap_or(-1),
            reason: reason.into(),
            energy_mj,
            lost: true,
        }));
        records.push(r);
    }
    let refs: Vec<&RunRecord> = records.iter().collect();
    let (_, written) = spool.record(events, &refs).await;
    written
}

/// Measures a run up to `to_ms`: its usage report, and its utilisation so far.
fn usage(
    t: &mut dyn Telemetry,
    key: &RunKey,
    r: &mut RunRecord,
    to_ms: i64,
) -> Vec<pb::report::Event> {
    let energy_mj = measure(t, r, to_ms);
    let mut events = vec![pb::report::Event::Usage(pb::RunUsage {
        job_id: key.job.clone(),
        attempt: key.attempt,
        to_ms,
        energy_mj,
    })];
    events.extend(utilization(r));
    events
}

/// The run's utilisation so far, for the scheduler, once there are readings.
fn utilization(r: &RunRecord) -> Option<pb::report::Event> {
    (r.utilization_samples > 0).then(|| {
        pb::report::Event::Utilization(pb::RunUtilization {
            job_id: r.job.clone(),
            attempt: r.attempt,
            sum_pct: r.utilization_sum,
            samples: r.utilization_samples,
        })
    })
}

/// Measures a run from where it was last measured up to `to_ms`: adds its
/// GPU time and energy to its record and returns the energy of the interval.
/// Energy is the difference of the GPUs' counters; where a counter cannot
/// tell (it restarted with the machine or the agent, or there is none) it is
/// what the backend knows a busy GPU draws.
fn measure(t: &mut dyn Telemetry, r: &mut RunRecord, to_ms: i64) -> u64 {
    let to_ms = to_ms.max(r.metered_to_ms);
    let ms = (to_ms - r.metered_to_ms) as u64;
    let now = t.energy_mj(&r.gpus, to_ms);
    let same_epoch = r.epoch == t.epoch();
    let energy: u64 = r
        .gpus
        .iter()
        .enumerate()
        .map(|(i, uuid)| {
            let before = r.counters_mj.get(i).copied().flatten();
            match (before, now.get(i).copied().flatten()) {
                (Some(a), Some(b)) if same_epoch && b >= a => b - a,
                _ => t.busy_energy_mj(uuid, ms),
            }
        })
        .sum();
    r.counters_mj = now;
    r.epoch = t.epoch().to_string();
    r.gpu_ms += ms * r.gpus.len() as u64;
    r.energy_mj += energy;
    r.metered_to_ms = to_ms;
    energy
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn report_msg(r: pb::Report) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Report(r)),
    }
}
