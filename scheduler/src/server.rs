//! A scheduler process: the replica, the gRPC services, the scheduling loop and
//! the liveness monitor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use coop_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, Ctx};
use crate::auth::{hash_token, new_token};
use crate::clock::now_ms;
use crate::config::Config;
use crate::consensus::core::Timing as RaftTiming;
use crate::instruments;
use crate::liveness::Registry;
use crate::replica::{Replica, ReplicaConfig};
use coop_core::placement::plan;
use coop_core::state::Op;

pub struct Scheduler {
    pub addr: SocketAddr,
    /// Every metric of this scheduler; `metrics::serve` exposes it.
    pub registry: prometheus::Registry,
    /// The operator token, when this start created it without being given one.
    pub generated_operator_token: Option<String>,
    pub replica: Replica,
    /// The peer listener's bound address, when there is one.
    pub peer_addr: Option<SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    peer_server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    _lock: crate::datadir::DirLock,
}

impl Scheduler {
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        crate::tls::private_dir(&config.data_dir)?;
        // Before anything reads the log: a second scheduler on it exits here.
        let lock = crate::datadir::lock(&config.data_dir, crate::datadir::LOCK_FILE, "scheduler")?;
        let signer = crate::signer::Signer::load_or_create(&config.data_dir, config.id)?;
        let several = config.join || config.peers.keys().any(|&id| id != config.id);
        if several && config.tls.is_none() {
            anyhow::bail!(
                "tls-dir: a cluster of several schedulers needs --tls-dir: they authenticate \
                 each other with certificates of the cluster CA (coop ca init, coop ca issue)"
            );
        }
        if several && config.peer_listen.is_none() {
            anyhow::bail!(
                "peer-listen: a cluster of several schedulers needs --peer-listen: the address \
                 their raft traffic (mutual TLS) is served on"
            );
        }
        // Bad certificates are found before anything starts.
        if let Some(t) = &config.tls {
            tonic::transport::Server::builder()
                .tls_config(t.peer_server())
                .context("tls-dir: the certificate or key cannot be used")?;
        }
        if config.peer_listen.is_some() && config.tls.is_none() {
            anyhow::bail!("tls-dir: the peer listener serves mutual TLS only: give --tls-dir");
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let tls = config.tls.is_some() && !config.insecure;
        if config.advertise.is_empty() && !addr.ip().is_unspecified() {
            config.advertise = crate::consensus::transport::normalize(&addr.to_string(), tls);
        } else if config.advertise.is_empty() && several {
            tracing::warn!(
                "listening on every interface without --advertise: agents cannot be sent to this node when it leads"
            );
        }
        let peer_listener = match config.peer_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("peer-listen: listening on {a}"))?,
            ),
            None => None,
        };
        let peer_addr = peer_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        // A wildcard is no address to give others: unknown until configured.
        let own_peer_address = config.peers.get(&config.id).cloned().unwrap_or_else(|| {
            peer_addr
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| crate::consensus::transport::normalize(&a.to_string(), true))
                .unwrap_or_default()
        });
        let mut peers = config.peers.clone();
        if !config.join {
            peers.insert(config.id, own_peer_address.clone());
        } else {
            peers.remove(&config.id);
        }
        let replica = Replica::start(ReplicaConfig {
            id: config.id,
            address: own_peer_address,
            peers: peers.clone(),
            join: config.join,
            db: config.data_dir.join("scheduler.db"),
            timing: RaftTiming {
                snapshot_every: config.snapshot_every,
                ..Default::default()
            },
            tick: config.raft_tick,
            tls: config.tls.as_ref().map(|t| t.peer_client()),
            client_address: config.advertise.clone(),
        })
        .await?;
        // Runs while the replica's node does.
        tokio::spawn(crate::history_copy::run(replica.clone()));
        restrict_files(&config.data_dir);

        let mut generated_operator_token = None;
        let token = match &config.operator_token {
            Some(t) => t.clone(),
            None => {
                let t = new_token();
                generated_operator_token = Some(t.clone());
                t
            }
        };
        let bootstrap = Op::Bootstrap {
            operator_token_hash: hash_token(&token),
            default_member: config.default_member.clone(),
        };
        let alone = peers.len() == 1 && !config.join;
        if alone {
            // Replay the log (the node elects itself and commits at once), so
            // that what follows sees the state as it was left.
            replica
                .read_current()
                .await
                .context("replaying the raft log")?;
        }
        if replica.read().bootstrapped() {
            generated_operator_token = None;
            if let Some(t) = &config.operator_token
                && replica.read().operator_token_hash.as_deref() != Some(&hash_token(t))
            {
                tracing::warn!(
                    "--operator-token is not the cluster's operator token (set at first boot, or rotated since); it is ignored"
                );
            }
        } else if alone {
            // A cluster of one elects itself at once: bootstrap before serving,
            // so that the printed credentials already work.
            replica
                .propose(bootstrap)
                .await
                .context("bootstrapping the cluster")?;
        } else {
            generated_operator_token = None;
            if config.operator_token.is_some() {
                // Whichever node leads first bootstraps; the others' proposals
                // are refused at apply. A restarted node (its log still
                // replaying) may try too: harmless for the same reason.
                tokio::spawn(bootstrap_when_leader(replica.clone(), bootstrap));
            } else {
                anyhow::ensure!(
                    !replica.fresh() || config.join,
                    "operator-token: a cluster of several schedulers needs the same --operator-token on every node at first boot"
                );
            }
        }

        let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
        let ctx = Ctx {
            shutdown: shutdown_rx.clone(),
            replica: replica.clone(),
            registry: Arc::new(Registry::new()),
            config: Arc::new(config),
            limits: Default::default(),
            signer: Arc::new(signer),
        };
        let metrics = crate::metrics::registry(replica.clone(), ctx.registry.clone());
        tokio::spawn(scheduling_loop(ctx.clone(), shutdown_rx.clone()));
        tokio::spawn(liveness_monitor(ctx.clone(), shutdown_rx.clone()));
        if let Some(url) = ctx.config.accounting_db.clone() {
            tokio::spawn(sink_on_leader(url, replica.clone(), shutdown_rx.clone()));
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<pb::job_service_server::JobServiceServer<api::jobs::Jobs>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
        if let Some(t) = ctx.config.tls.as_ref().filter(|_| !ctx.config.insecure) {
            builder = builder.tls_config(t.server())?;
        } else {
            tracing::warn!(
                "serving clients in PLAIN TEXT (--insecure): credentials cross the network unencrypted"
            );
        }
        let router = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(pb::job_service_server::JobServiceServer::new(
                api::jobs::Jobs(ctx.clone()),
            ))
            .add_service(pb::member_service_server::MemberServiceServer::new(
                api::members::Members(ctx.clone()),
            ))
            .add_service(pb::usage_service_server::UsageServiceServer::new(
                api::usage::Usage(ctx.clone()),
            ))
            .add_service(pb::policy_service_server::PolicyServiceServer::new(
                api::policy::Policies(ctx.clone()),
            ))
            .add_service(pb::audit_service_server::AuditServiceServer::new(
                api::audit::Audit(ctx.clone()),
            ))
            .add_service(pb::cluster_service_server::ClusterServiceServer::new(
                api::cluster::Cluster(ctx.clone()),
            ))
            .add_service(pb::agent_service_server::AgentServiceServer::new(
                api::agents::Agents(ctx.clone()),
            ));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let stop = shutdown_rx.clone();
        let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown_rx.wait_for(|s| *s).await;
        }));
        // Raft on a listener of its own: a caller without a certificate of the
        // cluster CA is refused in the TLS handshake, before any message is
        // read; only then may a message be as large as a snapshot.
        let peer_server = match (peer_listener, &ctx.config.tls) {
            (Some(l), Some(t)) => {
                let mut stop = stop;
                let router = tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .tls_config(t.peer_server())?
                    .add_service(
                        pb::raft_service_server::RaftServiceServer::new(crate::peers::Raft::new(
                            replica.clone(),
                        ))
                        .max_decoding_message_size(crate::consensus::transport::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(crate::consensus::transport::MAX_MESSAGE_BYTES),
                    );
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                Some(tokio::spawn(router.serve_with_incoming_shutdown(
                    incoming,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )))
            }
            _ => None,
        };
        if let Some(p) = peer_addr {
            tracing::info!("scheduler {} peers on {p} (mutual TLS)", ctx.config.id);
        }
        tracing::info!("scheduler {} serving on {addr}", ctx.config.id);
        Ok(Self {
            addr,
            registry: metrics,
            generated_operator_token,
            replica,
            peer_addr,
            shutdown,
            server,
            peer_server,
            _lock: lock,
        })
    }

    /// Stops serving: no new calls; streams (agents, watchers) are told to
    /// go on with another scheduler; other calls in flight get
    /// [`STOP_GRACE`] to finish, then their connections are cut.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(STOP_GRACE, async {
            let _ = (&mut self.server).await;
            if let Some(p) = &mut self.peer_server {
                let _ = p.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "calls still open {} s after the stop signal are cut",
                STOP_GRACE.as_secs()
            );
            self.server.abort();
            if let Some(p) = &self.peer_server {
                p.abort();
            }
        }
        self.replica.stop().await;
    }

    /// Runs until the server task ends (an error) .
    /// Runs until the server ends, or the raft log fails (then an error: a
    /// scheduler that cannot write its log must not go on answering).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let peer = async {
            match &mut self.peer_server {
                Some(p) => p.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut self.server => r??,
            r = peer => r??,
            why = self.replica.failure() => anyhow::bail!("{why}"),
        }
        Ok(())
    }
}

/// The raft log and its WAL hold every token hash and the whole ledger:
/// readable by the scheduler's user only.
fn restrict_files(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for f in ["scheduler.db", "scheduler.db-wal", "scheduler.db-shm"] {
        let _ = std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600));
    }
}

/// How long calls in flight may take to finish once the scheduler is asked
/// to stop (systemd's TimeoutStopSec must be longer).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The least time from the start of one scheduling pass to the next.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(50);

/// Proposes the cluster's first command once a leader is elected (every node of
/// a new cluster runs this; the first to lead wins, the others' are refused).
async fn bootstrap_when_leader(replica: Replica, op: Op) {
    let mut view = replica.view();
    loop {
        if replica.read().bootstrapped() {
            return;
        }
        if view.borrow_and_update().is_leader()
            && let Err(e) = replica.propose_local(op.clone()).await
        {
            tracing::debug!("bootstrap: {e}");
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// Streams the ledger to PostgreSQL while this node leads: every node holds
/// the same ledger, one writer is enough (at a leader change two may overlap
/// briefly: they take turns and each appends after what the database holds).
async fn sink_on_leader(
    url: String,
    replica: Replica,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if !leading(&replica, &mut shutdown).await {
            return;
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let sink = tokio::spawn(crate::sink::run(url.clone(), replica.clone(), stop_rx));
        let mut view = replica.view();
        tokio::select! {
            _ = view.wait_for(|v| !v.is_leader()) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        let _ = stop.send(true);
        let _ = sink.await;
    }
}

/// Resolves when this node leads (at once if it does).
async fn leading(replica: &Replica, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    let mut view = replica.view();
    tokio::select! {
        r = view.wait_for(|v| v.is_leader()) => r.is_ok(),
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// Runs a scheduling pass whenever something may have changed, and at least
/// once a second (back-offs, time limits and minimum run times pass with time
/// alone). Decisions are proposed as commands; apply checks each again.
async fn scheduling_loop(ctx: Ctx, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        // Only the leader schedules; its decisions are checked again at apply.
        if !leading(&ctx.replica, &mut shutdown).await {
            return;
        }
        let pass_started = tokio::time::Instant::now();
        let (ops, waits): (Vec<Op>, Vec<(String, f64)>) = {
            let state = ctx.replica.read();
            let now = now_ms();
            let timer = instruments::PASS_SECONDS.start_timer();
            let usage = coop_core::fairshare::usage(&state, now);
            let pass = plan(&state, now, &usage);
            timer.observe_duration();
            // Time to first placement, by member (observed when proposed).
            let waits = pass
                .placements
                .iter()
                .map(|p| &state.jobs[&p.job])
                .filter(|j| j.attempts == 0)
                .map(|j| {
                    (
                        j.member.clone(),
                        (now - j.submitted_at_ms).max(0) as f64 / 1000.0,
                    )
                })
                .collect();
            let expire = pass.expiries.into_iter().map(|job| Op::Expire { job });
            let preempt = pass.preemptions.into_iter().map(|p| {
                tracing::info!("preempting job {} for job {}", p.job, p.for_job);
                Op::Preempt {
                    job: p.job,
                    for_job: p.for_job,
                }
            });
            let place = coop_core::placement::place_ops(&state, pass.placements);
            (expire.chain(preempt).chain(place).collect(), waits)
        };
        for (member, secs) in waits {
            instruments::WAIT_SECONDS
                .with_label_values(&[member.as_str()])
                .observe(secs);
        }
        let kinds: Vec<u8> = ops
            .iter()
            .map(|op| match op {
                Op::Place { .. } | Op::PlaceGang { .. } => 1,
                Op::Preempt { .. } => 2,
                _ => 0,
            })
            .collect();
        // Proposed together, they are written in one batch.
        let results =
            futures::future::join_all(ops.into_iter().map(|op| ctx.replica.propose(op))).await;
        for (r, kind) in results.into_iter().zip(kinds) {
            match (r, kind) {
                (Ok(_), 1) => instruments::PLACEMENTS.inc(),
                (Ok(_), 2) => instruments::PREEMPTIONS.inc(),
                (Ok(_), _) => {}
                (Err(e), _) => tracing::debug!("scheduling decision rejected at apply: {e}"),
            }
        }
        tokio::select! {
            _ = ctx.registry.scheduler_woken() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        // A storm of submissions wakes the loop for each one; like Slurm's
        // sched_min_interval, passes are spaced so that they cannot starve the
        // log of CPU (what arrives meanwhile is taken by the next pass).
        tokio::select! {
            _ = tokio::time::sleep_until(pass_started + MIN_PASS_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Marks nodes down whose agent has not been heard from within the timeout.
async fn liveness_monitor(ctx: Ctx, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let timeout = ctx.config.node_timeout.as_millis() as i64;
    let period =
        (ctx.config.node_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        // Only the leader hears heartbeats. A new leader gives every agent a
        // full timeout to find it before judging.
        let leader = ctx.replica.is_leader();
        if leader && !was_leader {
            ctx.registry.restart_grace();
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        let now = now_ms();
        let stale: Vec<(String, i64)> = {
            let state = ctx.replica.read();
            state
                .nodes
                .values()
                .filter(|n| n.up)
                .filter_map(|n| {
                    let seen = ctx
                        .registry
                        .last_seen(&n.name)
                        .unwrap_or_else(|| ctx.registry.started_ms());
                    (now - seen > timeout).then(|| (n.name.clone(), seen))
                })
                .collect()
        };
        for (node, last_seen_ms) in stale {
            tracing::warn!("node {node} missed heartbeats for {timeout} ms: marking it down");
            if let Err(e) = ctx
                .replica
                .propose(Op::NodeDown { node, last_seen_ms })
                .await
            {
                tracing::warn!("marking a node down failed: {e}");
            }
            ctx.registry.wake_scheduler();
        }
    }
}
