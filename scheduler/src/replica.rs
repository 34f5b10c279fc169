//! This node's replica of the state machine, kept by raft.
//!
//! One task owns the raft [`Core`] and the disk. It takes every input that is
//! waiting (proposals, peer messages, ticks), then handles the Ready: messages
//! out, one SQLite transaction for everything that must be durable, messages
//! that had to wait for it, committed entries applied, proposers answered.
//! Many proposals therefore share one fsync. Readers get the state as the
//! loop last published it (`consensus::view`), which blocks nothing.
//!
//! Writes on a follower are forwarded to the leader; reads that must see every
//! acknowledged write first wait for a ReadIndex.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coop_proto::v1 as pb;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::clock::now_ms;
use crate::consensus::archive;
use crate::consensus::core::{ConfContext, Core, NodeStatus, Refused, Timing};
use crate::consensus::disk::Disk;
use crate::consensus::log::Log;
use crate::consensus::transport::{self, Feedback, Transport};
use crate::consensus::view::Views;
use crate::history::{History, Progress};
use coop_core::state::{Event, Op, Rejection, State};

/// How long a write waits for its commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call waits for a leader to be known before it is answered
/// "no leader" (UNAVAILABLE, not applied) and the client tries another
/// scheduler. An election takes 0.5 to 1 s; a node cut off from the majority
/// never sees one.
const LEADER_WAIT: Duration = Duration::from_secs(2);
/// How long a follower waits to connect (TCP and TLS) to the leader.
const LEADER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Inputs taken before a Ready is handled.
const MAX_INPUTS: usize = 4096;

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("{}", not_leader_message(.0))]
    NotLeader(Option<String>),
    #[error("the scheduler is unavailable: {0}")]
    Unavailable(String),
    /// A bug in coop, not a passing condition: trying again will not help.
    #[error("internal error: {0}")]
    Internal(String),
}

fn not_leader_message(leader: &Option<String>) -> String {
    match leader {
        Some(a) => format!("this scheduler is not the leader; the leader is at {a}"),
        None => {
            "this scheduler knows no leader (an election, or it is cut off from the others)".into()
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    /// How peers reach this node.
    pub address: String,
    /// The voters of a new cluster, with their addresses (this node included).
    /// Empty for a node that joins a running cluster (`coop cluster add-node`).
    pub peers: BTreeMap<u64, String>,
    /// Joining a running cluster: `peers` is its address book, not a voter set.
    pub join: bool,
    pub db: PathBuf,
    pub timing: Timing,
    pub tick: Duration,
    /// How this node calls its peers (mutual TLS).
    pub tls: transport::PeerTls,
    /// Where clients and agents reach this node: told to peers, so that they
    /// can send agents on to the leader.
    pub client_address: String,
}

/// A membership change, carried to the leader as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Membership {
    Add { id: u64, address: String },
    Remove { id: u64 },
}

/// This node as the loop last saw it.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub status: Option<NodeStatus>,
    pub peers: BTreeMap<u64, String>,
    /// Leader only: how far each peer's log matches.
    pub progress: BTreeMap<u64, u64>,
    /// Where clients reach each node, as the nodes themselves say (over
    /// mutual TLS): a hint for redirects, never used to reach a peer.
    pub clients: BTreeMap<u64, String>,
}

impl View {
    pub fn is_leader(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.role == "leader")
    }

    /// The leader's raft (peer) address.
    pub fn leader_address(&self) -> Option<String> {
        let s = self.status.as_ref()?;
        self.peers.get(&s.leader).cloned()
    }

    /// Where clients and agents reach the leader, when known.
    pub fn leader_client_address(&self) -> Option<String> {
        let s = self.status.as_ref()?;
        self.clients.get(&s.leader).cloned()
    }
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

enum Input {
    Propose(Op, Reply<Vec<Event>>),
    ConfChange(ConfChangeV2, Reply<Vec<Event>>),
    ReadIndex(Reply<u64>),
    Raft {
        from: u64,
        from_address: String,
        msgs: Vec<Message>,
    },
    Stop(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Replica {
    id: u64,
    /// The applied state, as the node loop last published it.
    states: Views,
    tx: mpsc::Sender<Input>,
    applied: watch::Receiver<u64>,
    events: broadcast::Sender<Event>,
    view: watch::Receiver<View>,
    tls: transport::PeerTls,
    leaders: Arc<tokio::sync::Mutex<HashMap<String, tonic::transport::Channel>>>,
    /// Why the node loop stopped, if it failed.
    failed: watch::Receiver<Option<String>>,
    /// This start found no raft log on disk.
    fresh: bool,
    history: History,
    /// The database and the history's progress, for the history's copier.
    writer: sqlx::SqlitePool,
    progress: Progress,
}

impl Replica {
    /// Loads the log from disk (or starts a new one) and starts the node loop.
    pub async fn start(config: ReplicaConfig) -> anyhow::Result<Self> {
        let disk = Disk::open(&config.db).await?;
        let loaded = disk.load().await?;
        let (history, progress) = History::open(
            &config.db,
            archive::applied(disk.pool()).await?,
            archive::gap(disk.pool()).await?,
        )
        .await?;
        let writer = disk.pool().clone();
        let fresh = loaded.is_none();
        let log = match loaded {
            Some(log) => log,
            None => {
                let voters: Vec<u64> = if config.join {
                    vec![]
                } else {
                    config.peers.keys().copied().collect()
                };
                let log = Log::with_voters(&voters);
                // Stored at once, so a restart knows it is no longer new.
                disk.persist(&crate::consensus::log::Persist {
                    hard_state: Some(log.hard_state.clone()),
                    conf_state: Some(log.conf_state.clone()),
                    ..Default::default()
                })
                .await?;
                log
            }
        };
        let mut peers = config.peers.clone();
        peers.insert(config.id, config.address.clone());
        let states = Views::default();
        let logger = slog::Logger::root(crate::consensus::TracingDrain, slog::o!());
        let mut core = Core::new(
            config.id,
            log,
            peers,
            states.clone(),
            &config.timing,
            &logger,
        )?;
        // A cluster of one need not wait an election timeout for itself.
        let status = core.status();
        if status.voters == [config.id] {
            core.campaign()?;
        }
        let (tx, rx) = mpsc::channel(MAX_INPUTS);
        let (applied_tx, applied) = watch::channel(core.applied());
        let (events, _) = broadcast::channel(4096);
        let (view_tx, view) = watch::channel(View::default());
        let (feedback_tx, feedback) = mpsc::unbounded_channel();
        let (snapshots, built) = mpsc::unbounded_channel();
        let node = Node {
            snapshots,
            transport: Transport::new(
                config.id,
                config.client_address.clone(),
                config.tls.clone(),
                feedback_tx,
            ),
            clients: BTreeMap::from([(config.id, config.client_address.clone())]),
            core,
            disk,
            progress: progress.clone(),
            applied: applied_tx,
            events: events.clone(),
            view: view_tx,
            next_token: 1,
            proposals: HashMap::new(),
            reads: HashMap::new(),
        };
        let (failed_tx, failed) = watch::channel(None);
        tokio::spawn(async move {
            if let Err(e) = node.run(rx, feedback, built, config.tick).await {
                failed_tx.send_replace(Some(format!("{e:#}")));
            }
        });
        let replica = Self {
            id: config.id,
            states,
            tx,
            applied,
            events,
            view,
            tls: config.tls,
            leaders: Default::default(),
            failed,
            fresh,
            history,
            writer,
            progress,
        };
        Ok(replica)
    }

    /// What `history_copy` writes with.
    pub fn history_writer(&self) -> (sqlx::SqlitePool, Progress) {
        (self.writer.clone(), self.progress.clone())
    }

    /// This replica's stored history, as it is.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Asks a peer scheduler for the history of entries `(from, to]`.
    pub async fn peer_history(
        &self,
        address: &str,
        from: u64,
        to: u64,
    ) -> anyhow::Result<archive::Page> {
        let mut client = self
            .leader_client(address)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {address}: {e}"))?;
        let page = tokio::time::timeout(
            Duration::from_secs(60),
            client.history(pb::HistoryRequest { from, to }),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{address} did not answer in time"))?
        .map_err(|s| anyhow::anyhow!("{address}: {}", s.message()))?
        .into_inner();
        let items = |v: Vec<pb::HistoryItem>| v.into_iter().map(|i| (i.index, i.json)).collect();
        Ok(archive::Page {
            upto: page.upto,
            records: items(page.records),
            jobs: items(page.jobs),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this start created the raft log (a new node) rather than
    /// loading one.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Resolves if the node loop fails (its log cannot be written): the
    /// process should then exit rather than serve without a log.
    pub async fn failure(&self) -> String {
        let mut failed = self.failed.clone();
        match failed.wait_for(Option::is_some).await {
            Ok(f) => f.clone().unwrap_or_default(),
            // The loop ended without failing (stopped): never resolves.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops the node loop and closes the log; later proposals fail.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Input::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Proposes `op` and returns once it is committed and applied, with apply's
    /// result. On a follower it is carried to the leader; while there is no
    /// leader it waits for one, up to a limit.
    pub async fn propose(&self, op: Op) -> Result<Vec<Event>, ProposeError> {
        let _timer = crate::instruments::PROPOSAL_SECONDS.start_timer();
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut backoff = Duration::from_millis(20);
        loop {
            let result = match self.propose_local(op.clone()).await {
                Err(ProposeError::NotLeader(Some(leader))) => {
                    let r = self.forward(&leader, &op).await;
                    if r.is_ok() {
                        // The caller reads here next: let this node catch up
                        // with its own write first.
                        let _ = self.read_current().await;
                    }
                    r
                }
                other => other,
            };
            // Retried only where the op was certainly not applied: no leader,
            // or a leader that could not be reached at all.
            let retry = matches!(result, Err(ProposeError::NotLeader(_)));
            if !retry || tokio::time::Instant::now() + backoff >= deadline {
                return result;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Proposes on this node only: `NotLeader` when it does not lead.
    pub async fn propose_local(&self, op: Op) -> Result<Vec<Event>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Propose(op, reply)).await?;
        self.wait(rx).await
    }

    async fn send(&self, input: Input) -> Result<(), ProposeError> {
        self.tx
            .send(input)
            .await
            .map_err(|_| ProposeError::Unavailable("the raft node has stopped".into()))
    }

    async fn wait<T>(
        &self,
        rx: oneshot::Receiver<Result<T, ProposeError>>,
    ) -> Result<T, ProposeError> {
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Unavailable(
                "the raft node has stopped".into(),
            )),
            Err(_) => Err(ProposeError::Unavailable(OUTCOME_UNKNOWN.into())),
        }
    }

    async fn forward(&self, leader: &str, op: &Op) -> Result<Vec<Event>, ProposeError> {
        let leader_id = self.view.borrow().status.as_ref().map(|s| s.leader);
        let mut client = self.leader_client(leader).await?;
        let body = pb::ForwardRequest {
            op: coop_core::codec::encode(op),
        };
        // A leader that stops answering (frozen, cut off) must not hang the
        // caller: the call ends when its commit would have timed out, or as
        // soon as this node hears of another leader (the old one, cut off,
        // can no longer commit what it has not yet).
        let mut view = self.view.clone();
        let deposed = async move {
            let _ = view
                .wait_for(|v| v.status.as_ref().map(|s| s.leader) != leader_id)
                .await
                .map(|_| ());
        };
        let call = client.forward(body);
        let resp = tokio::select! {
            r = tokio::time::timeout(PROPOSE_TIMEOUT + Duration::from_secs(1), call) => r,
            _ = deposed => {
                self.leaders.lock().await.remove(leader);
                return Err(ProposeError::Unavailable(format!(
                    "the leader changed while the write was with the old one; {OUTCOME_UNKNOWN}"
                )));
            }
        }
        .map_err(|_| ProposeError::Unavailable(OUTCOME_UNKNOWN.into()))?
        .map_err(|s| {
            ProposeError::Unavailable(format!("the leader at {leader}: {}", s.message()))
        })?;
        serde_json::from_slice::<Result<Vec<Event>, ProposeError>>(&resp.into_inner().result)
            .map_err(|e| ProposeError::Unavailable(format!("the leader's answer: {e}")))?
    }

    async fn leader_client(
        &self,
        leader: &str,
    ) -> Result<pb::raft_service_client::RaftServiceClient<tonic::transport::Channel>, ProposeError>
    {
        if let Some(ch) = self.leaders.lock().await.get(leader) {
            return Ok(transport::client(ch.clone()));
        }
        // Bounded as a whole: a frozen leader takes the TCP connection and
        // never finishes TLS. Not under the cache's lock, so that a forward
        // to the next leader does not wait on this one.
        let endpoint = transport::endpoint(leader, &self.tls)
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let ch = tokio::time::timeout(LEADER_CONNECT_TIMEOUT, endpoint.connect())
            .await
            .ok()
            .and_then(Result::ok)
            // Nothing was sent: safe to retry once a leader answers.
            .ok_or(ProposeError::NotLeader(None))?;
        self.leaders
            .lock()
            .await
            .insert(leader.to_string(), ch.clone());
        Ok(transport::client(ch))
    }

    /// Waits until this node has applied every write acknowledged before the
    /// call (raft's ReadIndex), so that a read after it is current.
    pub async fn read_current(&self) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut backoff = Duration::from_millis(20);
        let index = loop {
            let (reply, rx) = oneshot::channel();
            self.send(Input::ReadIndex(reply)).await?;
            match self.wait(rx).await {
                // No leader (an election, or cut off from the majority): wait
                // a little for one, then let the client ask another node.
                Err(ProposeError::NotLeader(l))
                    if tokio::time::Instant::now() + backoff >= deadline =>
                {
                    return Err(ProposeError::NotLeader(l));
                }
                Err(ProposeError::NotLeader(_)) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                other => break other?,
            }
        };
        let mut applied = self.applied.clone();
        tokio::time::timeout(PROPOSE_TIMEOUT, applied.wait_for(|&a| a >= index))
            .await
            .map_err(|_| ProposeError::Unavailable("this node is catching up".into()))?
            .map_err(|_| ProposeError::Unavailable("the raft node has stopped".into()))?;
        Ok(())
    }

    /// The state as last published by the node loop: a shared, immutable
    /// view that blocks nothing however long it is held.
    pub fn read(&self) -> Arc<State> {
        self.states.current().state
    }

    /// [`Replica::read`], with the index of the last entry applied to what it
    /// shows: history read from the store up to that index (`history_at`) and
    /// this state together count everything once.
    pub fn read_indexed(&self) -> (Arc<State>, u64) {
        let view = self.states.current();
        (view.state, view.index)
    }

    /// The stored history as of everything applied now, and that index (for
    /// reads of the history alone; with the state, use `read_indexed`).
    pub async fn history_now(&self) -> Result<(&sqlx::SqlitePool, u64), ProposeError> {
        let index = self.read_indexed().1;
        Ok((self.history_at(index).await?, index))
    }

    /// The stored history once it holds every entry up to `index`.
    pub async fn history_at(&self, index: u64) -> Result<&sqlx::SqlitePool, ProposeError> {
        self.history
            .at(index)
            .await
            .map_err(|e| ProposeError::Unavailable(e.to_string()))
    }

    /// Index of the last applied entry; changes after every applied batch.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.view.borrow().is_leader()
    }

    /// This node's line in `coop cluster status`.
    pub fn scheduler_node(&self) -> pb::SchedulerNode {
        let view = self.view.borrow();
        let Some(s) = &view.status else {
            return pb::SchedulerNode {
                id: self.id,
                role: "starting".into(),
                ..Default::default()
            };
        };
        pb::SchedulerNode {
            id: s.id,
            address: view.clients.get(&s.id).cloned().unwrap_or_default(),
            peer_address: view.peers.get(&s.id).cloned().unwrap_or_default(),
            role: s.role.into(),
            term: s.term,
            commit_index: s.commit,
            applied_index: s.applied,
            leader: s.leader,
            last_index: s.last_index,
            snapshot_index: s.snapshot_index,
            membership: if s.learners.contains(&s.id) {
                "learner"
            } else if s.voters.contains(&s.id) {
                "voter"
            } else {
                "none"
            }
            .into(),
            error: String::new(),
        }
    }

    /// How this node calls its peers.
    pub fn peer_tls(&self) -> &transport::PeerTls {
        &self.tls
    }

    /// Hands peer messages to the node loop; dropped when it is overloaded.
    pub fn step(&self, from: u64, from_address: String, msgs: Vec<Message>) {
        let _ = self.tx.try_send(Input::Raft {
            from,
            from_address,
            msgs,
        });
    }

    /// Hands a snapshot message to the node loop, waiting for room rather
    /// than dropping it: its sender hears that it was delivered.
    pub async fn step_snapshot(
        &self,
        from: u64,
        from_address: String,
        msg: Message,
    ) -> Result<(), String> {
        let input = Input::Raft {
            from,
            from_address,
            msgs: vec![msg],
        };
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.tx.send(input)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the raft node has stopped".into()),
            Err(_) => Err("the raft node is overloaded".into()),
        }
    }

    /// Changes the voter set; on a follower the leader carries it out.
    pub async fn change_membership(&self, change: Membership) -> Result<(), ProposeError> {
        if !self.is_leader() {
            let leader = self
                .view
                .borrow()
                .leader_address()
                .ok_or(ProposeError::NotLeader(None))?;
            let mut client = self.leader_client(&leader).await?;
            let body = pb::MembershipRequest {
                change: serde_json::to_vec(&change).expect("changes serialise"),
            };
            return client
                .change_membership(body)
                .await
                .map(|_| ())
                .map_err(|s| ProposeError::Unavailable(s.message().to_string()));
        }
        match change {
            Membership::Add { id, address } => {
                let ctx = vec![ConfContext {
                    id,
                    address: address.clone(),
                }];
                self.conf_change(ConfChangeType::AddLearnerNode, id, &ctx)
                    .await?;
                let commit = self.view.borrow().status.as_ref().map_or(0, |s| s.commit);
                self.wait_caught_up(id, commit).await?;
                self.conf_change(ConfChangeType::AddNode, id, &ctx).await
            }
            Membership::Remove { id } => {
                let ctx = vec![ConfContext {
                    id,
                    address: String::new(),
                }];
                self.conf_change(ConfChangeType::RemoveNode, id, &ctx).await
            }
        }
    }

    async fn conf_change(
        &self,
        kind: ConfChangeType,
        id: u64,
        ctx: &[ConfContext],
    ) -> Result<(), ProposeError> {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = coop_core::codec::encode(&ctx).into();
        let (reply, rx) = oneshot::channel();
        self.send(Input::ConfChange(cc, reply)).await?;
        self.wait(rx).await.map(|_| ())
    }

    /// Waits until a learner's log holds everything committed up to `commit`
    /// (its own addition included), so that as a voter it does not stall commits.
    async fn wait_caught_up(&self, id: u64, commit: u64) -> Result<(), ProposeError> {
        let mut view = self.view.clone();
        let caught_up = |v: &View| v.progress.get(&id).is_some_and(|&m| m >= commit);
        tokio::time::timeout(Duration::from_secs(60), view.wait_for(caught_up))
            .await
            .map_err(|_| {
                ProposeError::Unavailable(format!(
                    "node {id} did not catch up within 60 s; it stays a learner (is it running?)"
                ))
            })?
            .map_err(|_| ProposeError::Unavailable("the raft node has stopped".into()))?;
        Ok(())
    }
}

pub const OUTCOME_UNKNOWN: &str =
    "the write was not confirmed in time; it may or may not have been applied";

struct Node {
    core: Core,
    disk: Disk,
    /// How far the stored history runs, for its readers.
    progress: Progress,
    transport: Transport,
    applied: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    view: watch::Sender<View>,
    /// Where clients reach each node (see `View::clients`).
    clients: BTreeMap<u64, String>,
    next_token: u64,
    proposals: HashMap<u64, Reply<Vec<Event>>>,
    reads: HashMap<u64, Reply<u64>>,
    /// Where snapshots built off the loop come back.
    snapshots: mpsc::UnboundedSender<BuiltSnapshot>,
}

/// A snapshot built off the node loop: index, term, configuration, bytes.
type BuiltSnapshot = (u64, u64, ConfState, Result<Vec<u8>, String>);

impl Node {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut feedback: mpsc::UnboundedReceiver<Feedback>,
        mut built: mpsc::UnboundedReceiver<BuiltSnapshot>,
        tick: Duration,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inputs = Vec::with_capacity(MAX_INPUTS);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.core.tick();
                    // raft drops a read while there is no leader, or while a new
                    // leader has not committed in its term: ask again.
                    for &token in self.reads.keys() {
                        self.core.read_index(token);
                    }
                }
                n = rx.recv_many(&mut inputs, MAX_INPUTS) => {
                    if n == 0 {
                        return Ok(());
                    }
                    for input in inputs.drain(..) {
                        if let Input::Stop(done) = input {
                            self.disk.close().await;
                            let _ = done.send(());
                            return Ok(());
                        }
                        self.handle(input);
                    }
                }
                Some((index, term, conf, bytes)) = built.recv() => {
                    self.core.snapshot_built(index, term, conf, bytes);
                }
                Some(f) = feedback.recv() => match f {
                    Feedback::Unreachable(id) => self.core.report_unreachable(id),
                    Feedback::SnapshotFailed(id) => self.core.report_snapshot(id, false),
                    Feedback::SnapshotSent(id) => self.core.report_snapshot(id, true),
                },
            }
            let drained = match self.drain_ready().await {
                Ok(()) => match self.core.fatal() {
                    Some(why) => Err(anyhow::anyhow!("{why}")),
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = drained {
                // A node that cannot make its log durable must not take part:
                // answering would acknowledge what a restart forgets.
                tracing::error!("this scheduler stops: {e:#}");
                for (_, r) in self.proposals.drain() {
                    let _ = r.send(Err(ProposeError::Unavailable(format!("{e:#}"))));
                }
                return Err(e);
            }
            self.publish();
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose(op, reply) => {
                let token = self.token();
                match self.core.propose(token, op, now_ms()) {
                    Ok(()) => {
                        self.proposals.insert(token, reply);
                    }
                    Err(Refused::NotLeader(e)) => {
                        let leader = e.leader.and_then(|l| self.core.peers().get(&l).cloned());
                        let _ = reply.send(Err(ProposeError::NotLeader(leader)));
                    }
                    Err(e @ Refused::Unwritable(_)) => {
                        tracing::error!("{e}");
                        let _ = reply.send(Err(ProposeError::Internal(e.to_string())));
                    }
                }
            }
            Input::ConfChange(cc, reply) => {
                let token = self.token();
                match self.core.propose_conf_change(token, cc) {
                    Ok(()) => {
                        self.proposals.insert(token, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Unavailable(format!(
                            "membership change refused: {e} (one change at a time, on the leader)"
                        ))));
                    }
                }
            }
            Input::ReadIndex(reply) => {
                // Without a leader raft drops the request unanswered.
                if self.core.leader().is_none() {
                    let _ = reply.send(Err(ProposeError::NotLeader(None)));
                    return;
                }
                let token = self.token();
                self.core.read_index(token);
                self.reads.insert(token, reply);
            }
            Input::Stop(_) => unreachable!("handled by the loop"),
            Input::Raft {
                from,
                from_address,
                msgs,
            } => {
                // Peer addresses come only from the configuration and committed
                // membership changes; what a peer says of itself is a hint for
                // clients at most.
                if !from_address.is_empty() && self.core.peers().contains_key(&from) {
                    self.clients.insert(from, from_address);
                }
                for m in msgs {
                    if let Err(e) = self.core.step(m) {
                        tracing::debug!("raft message from {from} ignored: {e}");
                    }
                }
            }
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    async fn drain_ready(&mut self) -> anyhow::Result<()> {
        while let Some(mut staged) = self.core.ready() {
            let now = std::mem::take(&mut staged.messages);
            self.send(now);
            // Committed entries are durable on a quorum already: answer their
            // proposers without waiting for this node's own write.
            let early = std::mem::take(&mut staged.done);
            self.finish(early);
            // A snapshot's install writes a gap: the copier must not publish
            // an older one in between (see `Progress::gap_writer`).
            let gap_writer = self.progress.gap_writer.clone();
            let writing_gap = match staged.persist.installed_over {
                Some(_) => Some(gap_writer.lock().await),
                None => None,
            };
            if !staged.persist.is_empty() {
                let _timer = crate::instruments::RAFT_PERSIST_SECONDS.start_timer();
                let started = std::time::Instant::now();
                self.disk.persist(&staged.persist).await?;
                // Raft waits on this write: a slow disk shows here first.
                if started.elapsed() > Duration::from_secs(1) {
                    tracing::warn!(
                        "writing the raft log took {:?}: everything waits on this disk",
                        started.elapsed()
                    );
                }
            }
            // The gap before the index it comes with: a reader woken by the
            // index must see the gap.
            if writing_gap.is_some() {
                let gap = archive::gap(self.disk.pool()).await?;
                self.progress.gap.send_replace(gap);
            }
            drop(writing_gap);
            if let Some(a) = staged.persist.applied {
                self.progress.stored.send_if_modified(|s| {
                    let moved = a > *s;
                    *s = (*s).max(a);
                    moved
                });
            }
            let done = self.core.persisted(staged);
            self.finish(done);
            if let Some(job) = self.core.snapshot_due() {
                // Encoding a large state takes seconds: not in this loop.
                let built = self.snapshots.clone();
                tokio::task::spawn_blocking(move || {
                    let bytes = job.build();
                    let _ = built.send((job.index, job.term, job.conf_state, bytes));
                });
            }
        }
        Ok(())
    }

    /// Publishes what was applied and answers proposers and readers.
    fn finish(&mut self, mut done: crate::consensus::core::Done) {
        self.send(std::mem::take(&mut done.messages));
        // Senders to nodes removed from the cluster end.
        let peers = self.core.peers();
        self.transport.retain(|id| peers.contains_key(&id));
        // Before anyone is answered, so that what they read next is current.
        self.applied.send_if_modified(|a| {
            let changed = *a != self.core.applied();
            *a = self.core.applied();
            changed
        });
        self.publish();
        for e in done.events {
            let _ = self.events.send(e);
        }
        for (token, result) in done.results {
            if let Some(r) = self.proposals.remove(&token) {
                let _ = r.send(result.map_err(ProposeError::from));
            }
        }
        for token in done.dropped {
            if let Some(r) = self.proposals.remove(&token) {
                let _ = r.send(Err(ProposeError::NotLeader(None)));
            }
        }
        for (token, index) in done.reads {
            if let Some(r) = self.reads.remove(&token) {
                let _ = r.send(Ok(index));
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let peers = self.core.peers();
        self.transport.send(msgs, |id| peers.get(&id).cloned());
    }

    fn publish(&mut self) {
        let status = self.core.status();
        let progress = self.core.progress();
        let peers = self.core.peers();
        let (before, was_leader) = {
            let v = self.view.borrow();
            (v.status.as_ref().map(|s| (s.leader, s.term)), v.is_leader())
        };
        if before.is_some_and(|(leader, _)| leader != status.leader) {
            // The leader a follower's ReadIndex went to is gone, or this node
            // led and stepped down: the reader may ask again (reads change
            // nothing), here once a leader is known, or at another node.
            for (_, r) in self.reads.drain() {
                let _ = r.send(Err(ProposeError::NotLeader(None)));
            }
        }
        if was_leader && status.role != "leader" {
            // Stepped down (cut off from the majority, or deposed): what this
            // node proposed and has not committed may or may not be committed
            // by the next leader (its readers were answered above).
            for (_, r) in self.proposals.drain() {
                let _ = r.send(Err(ProposeError::Unavailable(format!(
                    "this scheduler lost the leadership; {OUTCOME_UNKNOWN}"
                ))));
            }
        }
        if before.is_some_and(|(leader, _)| leader != status.leader) && status.leader != 0 {
            crate::instruments::LEADER_CHANGES.inc();
        }
        if before != Some((status.leader, status.term)) {
            tracing::info!(
                "raft: scheduler {} is {} in term {}; leader {}",
                status.id,
                status.role,
                status.term,
                match status.leader {
                    0 => "unknown".to_string(),
                    l => l.to_string(),
                }
            );
        }
        self.view.send_if_modified(|v| {
            let changed = v.status.as_ref() != Some(&status)
                || v.progress != progress
                || &v.peers != peers
                || v.clients != self.clients;
            if changed {
                *v = View {
                    status: Some(status),
                    progress,
                    peers: peers.clone(),
                    clients: self.clients.clone(),
                };
            }
            changed
        });
        // Readers that gave up (timed out) are forgotten.
        self.reads.retain(|_, r| !r.is_closed());
    }
}
