//! The cluster's state machine: members, nodes, GPUs, jobs and the usage ledger.
//!
//! Pure and deterministic: `State::apply(&Command)` reads nothing but the state and
//! the command (time arrives inside the command, stamped by the proposer), so every
//! replica that applies the same log reaches the same state. It validates everything
//! it is told: a placement of a GPU that is no longer free is rejected here, not
//! trusted, and a rejected command changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ledger;
use crate::policy::{Policy, Setting};

pub type JobId = Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Finetune,
    Inference,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Lost,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled | JobState::Lost
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Principal {
    Operator,
    Member(String),
    /// Reads every member's figures and the audit ledger; changes nothing.
    Auditor(String),
    /// An enrolled agent machine, scoped to its one node.
    Node(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub created_at_ms: i64,
    /// Its tokens are refused and its pending jobs wait until resumed.
    #[serde(default)]
    pub suspended: bool,
    /// Removed: no token, no jobs; kept for its ledger history.
    #[serde(default)]
    pub removed_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub memory_mb: u64,
    /// The job holding this GPU; `None` when free.
    pub job: Option<JobId>,
    /// Throughput measured by the agent's probe.
    #[serde(default)]
    pub measured: Option<Capacity>,
    /// The board's power limit, W, as enrolled (0: unknown; see `plausible`).
    #[serde(default)]
    pub power_limit_w: u32,
}

/// A GPU's throughput as the agent's probe measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub fp16_gflops: u64,
    pub bf16_gflops: u64,
    pub memory_mb_per_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub owner: String,
    pub gpus: Vec<Gpu>,
    pub up: bool,
    /// The agent process that registered last; reports from any other are stale.
    pub session: String,
    /// Highest report sequence applied for `session` (reports are applied once).
    pub last_seq: u64,
    pub registered_at_ms: i64,
    /// Since when the node has offered its GPUs as they are now (while up).
    #[serde(default)]
    pub up_since_ms: i64,
    /// Runs ended by the node going down while its agent may still have run
    /// them: what that agent reports of them later is billed too.
    #[serde(default)]
    pub cut_off: Vec<CutOff>,
    /// Its agent is shutting down: nothing new is placed on it.
    #[serde(default)]
    pub draining: bool,
    /// Drained by the operator or its owner (`coop node drain`): nothing new
    /// is placed on it until `coop node resume`. Kept across registrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordon: Option<crate::habits::Cordon>,
}

/// A run the scheduler gave up on when its node went silent. The agent kept
/// metering it; its late reports bill the time past `billed_to_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutOff {
    pub job: JobId,
    pub attempt: u32,
    pub billed_to_ms: i64,
    pub gpus: u32,
    pub model: String,
    pub weight_milli: u64,
    /// The power limits of its GPUs, summed (0 in entries from before it was kept).
    #[serde(default)]
    pub power_w: u64,
    /// When the run started, and the energy billed for it so far: its
    /// energy stays within its GPUs' limits over its whole time.
    #[serde(default)]
    pub started_at_ms: i64,
    #[serde(default)]
    pub energy_mj: u64,
    /// Billed no later than this: set when the agent registers again, which
    /// then stops the run within the longest grace.
    #[serde(default)]
    pub deadline_ms: Option<i64>,
}

/// GPUs a member's node offered to the cluster over a time: what statements
/// count as contributed capacity. The open interval of a node that is up is
/// not here but in `Node::up_since_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityRecord {
    pub node: String,
    pub owner: String,
    pub model: String,
    pub gpus: u32,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Node {
    /// The node's GPUs by model: (model, count).
    pub fn models(&self) -> BTreeMap<&str, u32> {
        let mut m: BTreeMap<&str, u32> = BTreeMap::new();
        for g in &self.gpus {
            *m.entry(g.model.as_str()).or_default() += 1;
        }
        m
    }

    /// The node's open offer, up to `now_ms` (nothing while it is down).
    pub fn offered_until_now(&self, now_ms: i64) -> Vec<CapacityRecord> {
        self.offered_until(now_ms)
    }

    fn offered_until(&self, end_ms: i64) -> Vec<CapacityRecord> {
        if !self.up || end_ms <= self.up_since_ms {
            return vec![];
        }
        self.models()
            .into_iter()
            .map(|(model, gpus)| CapacityRecord {
                node: self.name.clone(),
                owner: self.owner.clone(),
                model: model.to_string(),
                gpus,
                start_ms: self.up_since_ms,
                end_ms,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub kind: JobKind,
    pub gpus: u32,
    pub command: Vec<String>,
    pub gpu_model: Option<String>,
    pub min_gpu_memory_mb: u64,
    pub preemptible: bool,
    pub kill_grace_ms: u64,
    /// Orders a member's own jobs: higher first (-1000..=1000).
    #[serde(default)]
    pub priority: i32,
    /// A run is stopped and the job fails after this long (0 = no limit). Backfill
    /// uses it to know when GPUs will be free.
    #[serde(default)]
    pub time_limit_ms: u64,
    /// How the agent keeps the run apart from others.
    #[serde(default)]
    pub isolation: Isolation,
    /// Environment the member gives the run, on top of the agent's allowlist.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// What a run may use besides its GPUs, and what it runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// CPU limit in thousandths of a CPU (0 = none).
    pub cpu_millis: u64,
    /// Memory limit in MiB (0 = none).
    pub memory_mb: u64,
    /// Container image the command runs in (none = a plain process).
    pub image: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub member: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// Node and GPUs of the current run, or of the last one once it ended.
    pub node: Option<String>,
    pub gpus: Vec<String>,
    pub exit_code: Option<i32>,
    /// Runs started so far (placements).
    pub attempts: u32,
    pub submitted_at_ms: i64,
    /// When the current (or last) run started, as measured by its agent.
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub cancel_requested: bool,
    /// Not placed before this time (restart back-off of services).
    pub not_before_ms: i64,
    pub reason: String,
    /// GPU-milliseconds billed so far, over all runs.
    pub gpu_ms: u64,
    /// Normalised usage billed so far: GPU-milliseconds times the model weight.
    #[serde(default)]
    pub weighted_gpu_ms: u64,
    #[serde(default)]
    pub energy_mj: u64,
    /// The current run is billed up to here (agents report usage in intervals).
    #[serde(default)]
    pub billed_to_ms: i64,
    /// The current run is being stopped to make room for this pending job.
    #[serde(default)]
    pub preempted_for: Option<JobId>,
    /// The current run is being stopped because it ran past its time limit.
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub preemptions: u32,
    /// Runs of other members preempted to make room for this job.
    #[serde(default)]
    pub preemptions_caused: u32,
    /// GPU utilisation readings (sum of percents, count) of the finished
    /// runs, and of the current run so far.
    #[serde(default)]
    pub utilization: (u64, u64),
    #[serde(default)]
    pub run_utilization: (u64, u64),
    /// GPUs are being freed for this job on this node by preemption.
    #[serde(default)]
    pub nominated_node: Option<String>,
    /// When the current (or last) run was placed, by the leader's clock: no
    /// report of the run may start before it.
    #[serde(default)]
    pub placed_at_ms: i64,
    /// Energy billed for the current run so far (bounded by its GPUs' power
    /// limits over its time, see `plausible`).
    #[serde(default)]
    pub run_energy_mj: u64,
    /// Name, working directory, dependencies (see `habits`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub extra: crate::habits::JobExtra,
    /// Held (`coop job hold`): not placed until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// The current run is being stopped to go back to the queue (its node
    /// was drained with `--now`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requeue_requested: bool,
    /// The job is one task of an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<crate::habits::ArrayTask>,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

impl Job {
    /// Mean utilisation of the job's GPUs over all its runs, percent.
    pub fn utilization_pct(&self) -> Option<f64> {
        let (sum, n) = (
            self.utilization.0.saturating_add(self.run_utilization.0),
            self.utilization.1.saturating_add(self.run_utilization.1),
        );
        (n > 0).then(|| sum as f64 / n as f64)
    }

    /// The agent must stop the current run (cancel, preemption or time limit).
    pub fn stopping(&self) -> bool {
        self.cancel_requested
            || self.preempted_for.is_some()
            || self.timed_out
            || self.requeue_requested
    }
}

/// One billed interval of a run: what the ledger holds. Agents report usage at
/// least every 30 s and at the end, so a run is several contiguous records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub job: JobId,
    pub attempt: u32,
    pub member: String,
    pub node: String,
    /// Model of the run's GPUs (placement gives a job GPUs of one model).
    #[serde(default)]
    pub model: String,
    pub gpus: u32,
    pub start_ms: i64,
    pub end_ms: i64,
    pub gpu_ms: u64,
    /// `gpu_ms` times the policy's weight of the model when it was billed.
    #[serde(default)]
    pub weighted_gpu_ms: u64,
    #[serde(default)]
    pub energy_mj: u64,
}

/// A proposed policy change waiting for members' approvals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u64,
    pub settings: Vec<Setting>,
    pub by: String,
    pub reason: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// Members that approved it.
    pub approvals: BTreeSet<String>,
    /// Approvals it needs (the policy's figure when it was proposed).
    pub required: u32,
    pub enacted_at_ms: Option<i64>,
    /// The members who may approve it: those of the co-op, active and not
    /// suspended, when it was proposed. Members added since do not vote on
    /// it. (Empty in proposals made before electorates were kept.)
    #[serde(default)]
    pub electorate: BTreeSet<String>,
}

/// A change of policy: who made it, when, why, and what was set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyChange {
    pub at_ms: i64,
    pub by: String,
    pub reason: String,
    pub settings: Vec<Setting>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub memory_mb: u64,
    #[serde(default)]
    pub measured: Option<Capacity>,
    #[serde(default)]
    pub power_limit_w: u32,
}

/// A command of the replicated log, stamped with the proposer's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub at_ms: i64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// First command of a cluster: the operator credential and, optionally, the
    /// member that the operator's own submissions are billed to.
    Bootstrap {
        operator_token_hash: String,
        default_member: Option<(String, String)>,
    },
    AddMember {
        name: String,
        token_hash: String,
        /// The token stops working at this time (never, when absent).
        #[serde(default)]
        expires_at_ms: Option<i64>,
    },
    AddAuditor {
        name: String,
        token_hash: String,
    },
    RemoveAuditor {
        name: String,
    },
    /// The account's token is replaced: the old one is dead from this entry on.
    RotateToken {
        account: Principal,
        token_hash: String,
        #[serde(default)]
        expires_at_ms: Option<i64>,
        /// Who asked (absent in entries from before it was recorded).
        #[serde(default)]
        by: Option<Principal>,
    },
    SuspendMember {
        name: String,
        suspended: bool,
    },
    /// Its token dies, its pending jobs are cancelled and its running ones
    /// stopped, its nodes revoked; its ledger history stays.
    RemoveMember {
        name: String,
    },
    /// A one-time join token (its hash) for the agent of `node`, owned by `owner`.
    EnrollNode {
        node: String,
        owner: String,
        join_hash: String,
        expires_at_ms: i64,
    },
    /// An agent exchanges its join token for a node credential it made itself.
    JoinNode {
        join_hash: String,
        credential_hash: String,
    },
    /// The node's credential dies; its runs are handled as on node loss.
    RevokeNode {
        node: String,
    },
    RegisterNode {
        node: String,
        owner: String,
        gpus: Vec<GpuInfo>,
        session: String,
        /// Where runs of an earlier agent session are billed up to (its last heartbeat).
        orphaned_runs_end_ms: i64,
    },
    NodeDown {
        node: String,
        last_seen_ms: i64,
    },
    /// The node's agent is shutting down: no new placements on it.
    DrainNode {
        node: String,
    },
    SubmitJob {
        id: JobId,
        member: String,
        spec: JobSpec,
    },
    /// A submission with a name, working directory, dependencies or hold;
    /// with `array` ("0-9%2"), one job per task (`id` is the array's).
    SubmitJobWith {
        id: JobId,
        member: String,
        spec: Box<JobSpec>,
        extra: Box<crate::habits::JobExtra>,
        #[serde(default)]
        array: Option<String>,
    },
    /// Holds (or releases) pending jobs.
    HoldJobs {
        ids: Vec<JobId>,
        held: bool,
    },
    /// Cancels several jobs at once (those that have ended stay as they are).
    CancelJobs {
        ids: Vec<JobId>,
    },
    /// `coop node drain`: nothing new is placed on the node; with `requeue`
    /// its runs are stopped and requeued.
    CordonNode {
        node: String,
        reason: String,
        by: String,
        requeue: bool,
    },
    /// `coop node resume`: the node takes jobs again.
    ResumeNode {
        node: String,
    },
    CancelJob {
        id: JobId,
    },
    Place {
        job: JobId,
        node: String,
        gpus: Vec<String>,
    },
    /// Stop a running job to free its GPUs for the pending job `for_job`.
    Preempt {
        job: JobId,
        for_job: JobId,
    },
    /// Stop a run that is past its time limit.
    Expire {
        job: JobId,
    },
    SetPolicy {
        settings: Vec<Setting>,
        by: String,
        reason: String,
    },
    /// A change that takes effect once enough members approve it.
    ProposePolicy {
        settings: Vec<Setting>,
        by: String,
        reason: String,
    },
    ApprovePolicy {
        id: u64,
        member: String,
    },
    Report {
        node: String,
        session: String,
        seq: u64,
        report: RunReport,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunReport {
    Started {
        job: JobId,
        attempt: u32,
        at_ms: i64,
    },
    Exited {
        job: JobId,
        attempt: u32,
        at_ms: i64,
        exit_code: i32,
        reason: String,
        /// Energy since the last usage report.
        #[serde(default)]
        energy_mj: u64,
    },
    /// The run's usage up to `to_ms` since the previous report (or its start).
    Usage {
        job: JobId,
        attempt: u32,
        to_ms: i64,
        energy_mj: u64,
    },
    /// Utilisation readings of the run's GPUs since it started: their sum
    /// (percent) and count. Each report replaces the previous one.
    Utilization {
        job: JobId,
        attempt: u32,
        sum_pct: u64,
        samples: u64,
    },
    /// The agent lost the run through no fault of the job (it restarted and
    /// stopped the orphan, or found it gone): billed up to `at_ms`, requeued.
    Lost {
        job: JobId,
        attempt: u32,
        at_ms: i64,
        reason: String,
        /// Energy since the last usage report.
        energy_mj: u64,
    },
}

/// What changed, for watchers (job watch streams, agent desired-state pushers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Job(JobId),
    Node(String),
    Member(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Over a limit of the policy (pending jobs).
    #[error("{field}: {message}")]
    ResourceExhausted { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> Rejection {
    Rejection::InvalidArgument {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Open proposals one proposer may have at once.
pub const MAX_OPEN_PROPOSALS: usize = 16;

/// Failed finetune runs lost with their node are retried this many times in all.
pub const MAX_ATTEMPTS: u32 = 3;
/// Services that keep exiting are restarted after 1 s, 2 s, 4 s ... up to this.
pub const MAX_RESTART_BACKOFF_MS: i64 = 60_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub operator_token_hash: Option<String>,
    pub default_member: Option<String>,
    pub members: BTreeMap<String, Member>,
    pub tokens: BTreeMap<String, Principal>,
    /// When tokens (by hash) stop working; absent: never.
    #[serde(default)]
    pub token_expiry: BTreeMap<String, i64>,
    #[serde(default)]
    pub auditors: BTreeMap<String, crate::accounts::Auditor>,
    /// Unused join tokens by hash.
    #[serde(default)]
    pub enrollments: BTreeMap<String, crate::accounts::Enrollment>,
    /// The owner each enrolled node's credential was issued for.
    #[serde(default)]
    pub node_owners: BTreeMap<String, String>,
    pub nodes: BTreeMap<String, Node>,
    pub jobs: BTreeMap<JobId, Job>,
    /// Pending jobs in arrival order (an index over `jobs`).
    pub queue: BTreeSet<(i64, JobId)>,
    /// Running jobs (an index over `jobs`).
    #[serde(default)]
    pub running: BTreeSet<JobId>,
    pub ledger: Vec<UsageRecord>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub policy_log: Vec<PolicyChange>,
    /// The hash-chained audit ledger (see `ledger`).
    #[serde(default)]
    pub audit: Vec<crate::ledger::Record>,
    /// Closed intervals of GPUs offered by members' nodes.
    #[serde(default)]
    pub capacity: Vec<CapacityRecord>,
    #[serde(default)]
    pub proposals: BTreeMap<u64, Proposal>,
    /// Mean probed throughput of each GPU model's registered GPUs (kept up to
    /// date at registration), for measured weights.
    #[serde(default)]
    pub measured_models: BTreeMap<String, Capacity>,
    /// Implausible reports per node, kept as evidence (see `plausible`).
    #[serde(default)]
    pub rejected_reports: BTreeMap<String, u64>,
    /// The GPUs each node registered first after it enrolled: a later
    /// registration may offer fewer of them, but no other or changed ones.
    #[serde(default)]
    pub inventory: BTreeMap<String, Vec<GpuInfo>>,
    /// Members whose token is one they made themselves (rotated with their
    /// own token): only they vote, since the operator saw the token each
    /// member was given.
    #[serde(default)]
    pub self_keyed: BTreeSet<String>,
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl State {
    pub fn principal(&self, token_hash: &str) -> Option<&Principal> {
        self.tokens.get(token_hash)
    }

    fn job(&self, id: JobId) -> Result<&Job, Rejection> {
        self.jobs
            .get(&id)
            .ok_or_else(|| Rejection::NotFound(format!("job {id} does not exist")))
    }

    pub fn bootstrapped(&self) -> bool {
        self.operator_token_hash.is_some()
    }

    /// Applies one command. On `Err` nothing has changed.
    pub fn apply(&mut self, cmd: &Command) -> Result<Vec<Event>, Rejection> {
        let mut events = self.apply_op(cmd)?;
        self.settle_dependencies(cmd.at_ms, &mut events);
        Ok(events)
    }

    fn apply_op(&mut self, cmd: &Command) -> Result<Vec<Event>, Rejection> {
        let at = cmd.at_ms;
        match &cmd.op {
            Op::Bootstrap {
                operator_token_hash,
                default_member,
            } => self.bootstrap(at, operator_token_hash, default_member.as_ref()),
            Op::AddMember {
                name,
                token_hash,
                expires_at_ms,
            } => {
                self.ungoverned("adding a member")?;
                let events = self.add_member(at, name, token_hash)?;
                if let Some(t) = expires_at_ms {
                    self.token_expiry.insert(token_hash.clone(), *t);
                }
                Ok(events)
            }
            Op::AddAuditor { name, token_hash } => self.add_auditor(at, name, token_hash),
            Op::RemoveAuditor { name } => self.remove_auditor(at, name),
            Op::RotateToken {
                account,
                token_hash,
                expires_at_ms,
                by,
            } => {
                // The operator holding a new token of a member could vote as it.
                if matches!(account, Principal::Member(_)) && *by == Some(Principal::Operator) {
                    self.ungoverned("the operator rotating a member's token")?;
                }
                let events = self.rotate_token(at, account, token_hash, *expires_at_ms)?;
                if let Principal::Member(m) = account {
                    if by.as_ref() == Some(account) {
                        self.self_keyed.insert(m.clone());
                    } else {
                        self.self_keyed.remove(m);
                    }
                }
                Ok(events)
            }
            Op::SuspendMember { name, suspended } => self.suspend_member(at, name, *suspended),
            Op::RemoveMember { name } => {
                self.ungoverned("removing a member")?;
                self.remove_member(at, name)
            }
            Op::EnrollNode {
                node,
                owner,
                join_hash,
                expires_at_ms,
            } => self.enroll_node(at, node, owner, join_hash, *expires_at_ms),
            Op::JoinNode {
                join_hash,
                credential_hash,
            } => self.join_node(at, join_hash, credential_hash),
            Op::RevokeNode { node } => self.revoke_node(at, node),
            Op::RegisterNode {
                node,
                owner,
                gpus,
                session,
                orphaned_runs_end_ms,
            } => self.register_node(at, node, owner, gpus, session, *orphaned_runs_end_ms),
            Op::NodeDown { node, last_seen_ms } => self.node_down(node, *last_seen_ms),
            Op::DrainNode { node } => {
                let n = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| Rejection::NotFound(format!("node {node:?} does not exist")))?;
                n.draining = n.up;
                Ok(vec![Event::Node(node.clone())])
            }
            Op::SubmitJob { id, member, spec } => self.submit(at, *id, member, spec),
            Op::CancelJob { id } => self.cancel(at, *id),
            Op::SubmitJobWith {
                id,
                member,
                spec,
                extra,
                array,
            } => self.submit_with(at, *id, member, spec, extra, array.as_deref()),
            Op::HoldJobs { ids, held } => self.hold_jobs(ids, *held),
            Op::CancelJobs { ids } => self.cancel_jobs(at, ids),
            Op::CordonNode {
                node,
                reason,
                by,
                requeue,
            } => self.cordon(at, node, reason, by, *requeue),
            Op::ResumeNode { node } => self.resume_node(node),
            Op::Place { job, node, gpus } => self.place(at, *job, node, gpus),
            Op::Preempt { job, for_job } => self.preempt(at, *job, *for_job),
            Op::Expire { job } => self.expire(at, *job),
            Op::SetPolicy {
                settings,
                by,
                reason,
            } => {
                self.ungoverned("a policy change")?;
                if settings
                    .iter()
                    .any(|s| matches!(s, Setting::AddMember { .. } | Setting::RemoveMember(_)))
                {
                    return Err(invalid(
                        "settings",
                        "members are added and removed with coop member add/remove",
                    ));
                }
                self.set_policy(at, settings, by, reason)
            }
            Op::ProposePolicy {
                settings,
                by,
                reason,
            } => self.propose_policy(at, settings, by, reason),
            Op::ApprovePolicy { id, member } => self.approve_policy(at, *id, member),
            Op::Report {
                node,
                session,
                seq,
                report,
            } => self.report(at, node, session, *seq, report),
        }
    }

    fn bootstrap(
        &mut self,
        at: i64,
        hash: &str,
        default_member: Option<&(String, String)>,
    ) -> Result<Vec<Event>, Rejection> {
        if self.bootstrapped() {
            return Err(Rejection::FailedPrecondition(
                "cluster is already bootstrapped".into(),
            ));
        }
        let mut events = Vec::new();
        if let Some((name, member_hash)) = default_member {
            events = self.add_member(at, name, member_hash)?;
            self.default_member = Some(name.clone());
        }
        self.operator_token_hash = Some(hash.to_string());
        self.tokens.insert(hash.to_string(), Principal::Operator);
        Ok(events)
    }

    fn add_member(&mut self, at: i64, name: &str, hash: &str) -> Result<Vec<Event>, Rejection> {
        if !valid_name(name) {
            return Err(invalid(
                "name",
                format!(
                    "{name:?} is not a valid member name (lowercase letters, digits, '-', '_'; at most 63)"
                ),
            ));
        }
        if self.members.contains_key(name) {
            return Err(Rejection::AlreadyExists(format!(
                "member {name:?} already exists"
            )));
        }
        if self.tokens.contains_key(hash) {
            return Err(Rejection::AlreadyExists("token already in use".into()));
        }
        self.members.insert(
            name.to_string(),
            Member {
                name: name.to_string(),
                created_at_ms: at,
                suspended: false,
                removed_at_ms: None,
            },
        );
        self.tokens
            .insert(hash.to_string(), Principal::Member(name.to_string()));
        ledger::append(
            &mut self.audit,
            at,
            ledger::Entry::MemberAdded {
                member: name.to_string(),
            },
        );
        Ok(vec![Event::Member(name.to_string())])
    }

    fn register_node(
        &mut self,
        at: i64,
        name: &str,
        owner: &str,
        gpus: &[GpuInfo],
        session: &str,
        orphaned_end: i64,
    ) -> Result<Vec<Event>, Rejection> {
        if !valid_name(name) {
            return Err(invalid(
                "node",
                format!("{name:?} is not a valid node name"),
            ));
        }
        if self.active_member(owner).is_err() {
            return Err(Rejection::NotFound(format!(
                "owner: member {owner:?} does not exist"
            )));
        }
        // An agent's identity is a UUID; anything long would only weigh on
        // every replica.
        if session.is_empty() || session.len() > 128 {
            return Err(invalid("session", "must be 1 to 128 bytes"));
        }
        if gpus.len() > MAX_GPUS_PER_NODE {
            return Err(invalid(
                "gpus",
                format!(
                    "{} GPUs; a node offers at most {MAX_GPUS_PER_NODE}",
                    gpus.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for g in gpus {
            check_gpu(g)?;
            if g.uuid.is_empty() || !seen.insert(g.uuid.as_str()) {
                return Err(invalid(
                    "gpus",
                    format!("GPU uuid {:?} is empty or repeated", g.uuid),
                ));
            }
            if let Some(other) = self
                .nodes
                .values()
                .find(|n| n.name != name && n.gpus.iter().any(|o| o.uuid == g.uuid))
            {
                return Err(invalid(
                    "gpus",
                    format!(
                        "GPU {} is already registered by node {}",
                        g.uuid, other.name
                    ),
                ));
            }
        }
        // The inventory is fixed at the first registration after enrollment:
        // an owner cannot grow its contributed capacity or change what its
        // GPUs are without enrolling the machine again.
        let inventory: Vec<GpuInfo> = match self.inventory.get(name) {
            None => gpus.to_vec(),
            Some(enrolled) => {
                let mut kept = enrolled.clone();
                for g in gpus {
                    let Some(e) = kept.iter_mut().find(|e| e.uuid == g.uuid) else {
                        return Err(Rejection::FailedPrecondition(format!(
                            "gpus: GPU {} is not one node {name} was enrolled with; enroll the node again (coop node revoke {name}; coop node enroll {name}) to change its GPUs",
                            g.uuid
                        )));
                    };
                    if e.model != g.model || e.memory_mb != g.memory_mb {
                        return Err(Rejection::FailedPrecondition(format!(
                            "gpus: GPU {} was enrolled as {} with {} MB, not {} with {} MB; enroll node {name} again to change it",
                            g.uuid, e.model, e.memory_mb, g.model, g.memory_mb
                        )));
                    }
                    // The first measurement and power limit stand until the node
                    // enrolls again: an owner cannot raise what its GPUs may bill.
                    if e.measured.is_none() {
                        e.measured = g.measured;
                    }
                    if e.power_limit_w == 0 {
                        e.power_limit_w = g.power_limit_w;
                    }
                }
                kept
            }
        };
        let enrolled = |uuid: &str| inventory.iter().find(|e| e.uuid == uuid);
        let measured = |uuid: &str| enrolled(uuid).and_then(|e| e.measured);
        let power_limit_w = |uuid: &str| enrolled(uuid).map_or(0, |e| e.power_limit_w);
        let mut events = vec![Event::Node(name.to_string())];
        if let Some(node) = self.nodes.get(name) {
            // Runs of an earlier agent process are no longer watched by anyone;
            // runs on GPUs that are gone cannot continue. Both go back to the queue.
            let new_session = node.session != session;
            let orphans: Vec<JobId> = node
                .gpus
                .iter()
                .filter(|g| new_session || !gpus.iter().any(|n| n.uuid == g.uuid))
                .filter_map(|g| g.job)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for job in orphans {
                self.end_run_lost(job, orphaned_end.min(at), "agent restarted");
                events.push(Event::Job(job));
            }
        }
        let held: BTreeMap<String, JobId> = self
            .nodes
            .get(name)
            .map(|n| {
                n.gpus
                    .iter()
                    .filter_map(|g| g.job.map(|j| (g.uuid.clone(), j)))
                    .collect()
            })
            .unwrap_or_default();
        let registered_at_ms = self.nodes.get(name).map_or(at, |n| n.registered_at_ms);
        // A node that stays up with the same owner and GPUs keeps offering
        // them since when it did; otherwise the offer so far is closed.
        let unchanged = self.nodes.get(name).is_some_and(|n| {
            n.up && n.owner == owner
                && n.gpus.len() == gpus.len()
                && n.gpus
                    .iter()
                    .zip(gpus)
                    .all(|(a, b)| a.uuid == b.uuid && a.model == b.model)
        });
        let up_since_ms = match self.nodes.get(name) {
            Some(n) if unchanged => n.up_since_ms,
            Some(n) => {
                let closed = n.offered_until(at);
                self.capacity.extend(closed);
                at
            }
            None => at,
        };
        let same_session = self.nodes.get(name).is_some_and(|n| n.session == session);
        let (last_seq, mut cut_off) = match self.nodes.get(name) {
            // The same agent: it still owes reports of the runs cut off.
            Some(n) if same_session => (n.last_seq, n.cut_off.clone()),
            _ => (0, vec![]),
        };
        // Back in touch, it is told those runs are not its own any more and
        // stops them at once: they bill no later.
        let deadline = at.saturating_add(crate::plausible::CUT_OFF_STOP_MS);
        for c in &mut cut_off {
            c.deadline_ms.get_or_insert(deadline);
        }
        self.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                owner: owner.to_string(),
                gpus: gpus
                    .iter()
                    .map(|g| Gpu {
                        uuid: g.uuid.clone(),
                        index: g.index,
                        model: g.model.clone(),
                        memory_mb: g.memory_mb,
                        job: held.get(&g.uuid).copied(),
                        measured: measured(&g.uuid),
                        power_limit_w: power_limit_w(&g.uuid),
                    })
                    .collect(),
                up: true,
                session: session.to_string(),
                last_seq,
                cut_off,
                draining: false,
                cordon: self.nodes.get(name).and_then(|n| n.cordon.clone()),
                registered_at_ms,
                up_since_ms,
            },
        );
        self.inventory.insert(name.to_string(), inventory);
        self.remeasure_models();
        Ok(events)
    }

    pub(crate) fn node_down(
        &mut self,
        name: &str,
        last_seen: i64,
    ) -> Result<Vec<Event>, Rejection> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| Rejection::NotFound(format!("node {name:?} does not exist")))?;
        if !node.up {
            return Ok(vec![]);
        }
        // It offered its GPUs until it was last heard from.
        let closed = node.offered_until(last_seen.max(node.up_since_ms));
        node.up = false;
        self.capacity.extend(closed);
        let node = self.nodes.get_mut(name).expect("checked above");
        let jobs: BTreeSet<JobId> = node.gpus.iter().filter_map(|g| g.job).collect();
        let mut events = vec![Event::Node(name.to_string())];
        for job in jobs {
            let cut = self
                .jobs
                .get(&job)
                .filter(|j| j.started_at_ms.is_some())
                .map(|j| {
                    let (model, weight_milli) = self.run_weight(j);
                    CutOff {
                        job,
                        attempt: j.attempts,
                        billed_to_ms: last_seen.max(j.billed_to_ms),
                        gpus: j.spec.gpus,
                        model,
                        weight_milli,
                        power_w: self.run_power_w(j),
                        started_at_ms: j.started_at_ms.unwrap_or(j.billed_to_ms).max(1),
                        energy_mj: j.run_energy_mj,
                        deadline_ms: None,
                    }
                });
            self.end_run_lost(job, last_seen, "node down");
            if let Some(cut) = cut {
                self.nodes
                    .get_mut(name)
                    .expect("checked above")
                    .cut_off
                    .push(cut);
            }
            events.push(Event::Job(job));
        }
        Ok(events)
    }

    pub(crate) fn submit(
        &mut self,
        at: i64,
        id: JobId,
        member: &str,
        spec: &JobSpec,
    ) -> Result<Vec<Event>, Rejection> {
        validate_spec(spec)?;
        if !self.members.contains_key(member) {
            return Err(Rejection::NotFound(format!(
                "member: {member:?} does not exist"
            )));
        }
        let policy = &self.policy;
        if spec.kill_grace_ms > policy.max_grace_s.saturating_mul(1000) {
            return Err(invalid(
                "kill_grace",
                format!(
                    "at most {} (policy max_grace)",
                    crate::policy::fmt_duration_s(policy.max_grace_s)
                ),
            ));
        }
        if let Some(q) = policy.gpu_quota(member)
            && spec.gpus as u64 > q
        {
            return Err(invalid(
                "gpus",
                format!("member {member} may hold at most {q} GPUs (policy gpu_quota)"),
            ));
        }
        if policy.max_pending_jobs > 0 {
            let pending = self
                .queue
                .iter()
                .filter(|(_, id)| self.jobs.get(id).is_some_and(|j| j.member == member))
                .count() as u64;
            if pending >= policy.max_pending_jobs {
                return Err(Rejection::ResourceExhausted {
                    field: "jobs".into(),
                    message: format!(
                        "member {member} has {pending} pending jobs, the most the policy allows (max_pending)"
                    ),
                });
            }
        }
        if self.jobs.contains_key(&id) {
            return Err(Rejection::AlreadyExists(format!("job {id} already exists")));
        }
        let want = spec.gpus as usize;
        if !self.nodes.values().any(|n| largest_class(n, spec) >= want) {
            let largest = self
                .nodes
                .values()
                .map(|n| largest_class(n, spec))
                .max()
                .unwrap_or(0);
            let what = match &spec.gpu_model {
                Some(m) => format!(" {m}"),
                None => String::new(),
            };
            return Err(Rejection::FailedPrecondition(format!(
                "gpus: the job asks for {} GPUs but the largest registered node has {largest} matching{what} GPUs",
                spec.gpus
            )));
        }
        self.jobs.insert(
            id,
            Job {
                id,
                member: member.to_string(),
                spec: spec.clone(),
                state: JobState::Pending,
                node: None,
                gpus: vec![],
                exit_code: None,
                attempts: 0,
                submitted_at_ms: at,
                started_at_ms: None,
                finished_at_ms: None,
                cancel_requested: false,
                not_before_ms: at,
                reason: String::new(),
                gpu_ms: 0,
                weighted_gpu_ms: 0,
                energy_mj: 0,
                billed_to_ms: 0,
                preempted_for: None,
                timed_out: false,
                preemptions: 0,
                preemptions_caused: 0,
                utilization: (0, 0),
                run_utilization: (0, 0),
                nominated_node: None,
                placed_at_ms: 0,
                run_energy_mj: 0,
                extra: Default::default(),
                held: false,
                requeue_requested: false,
                array: None,
            },
        );
        self.queue.insert((at, id));
        Ok(vec![Event::Job(id)])
    }

    pub(crate) fn cancel(&mut self, at: i64, id: JobId) -> Result<Vec<Event>, Rejection> {
        let job = self
            .jobs
            .get_mut(&id)
            .ok_or_else(|| Rejection::NotFound(format!("job {id} does not exist")))?;
        match job.state {
            JobState::Pending => {
                job.state = JobState::Cancelled;
                job.finished_at_ms = Some(at);
                job.reason = "cancelled while pending".into();
                let key = (job.submitted_at_ms, id);
                self.queue.remove(&key);
            }
            // The agent stops it (SIGTERM, grace, SIGKILL); its exit report ends it.
            JobState::Running => job.cancel_requested = true,
            s => {
                return Err(Rejection::FailedPrecondition(format!(
                    "job {id} has already ended ({s:?})"
                )));
            }
        }
        Ok(vec![Event::Job(id)])
    }

    fn place(
        &mut self,
        at: i64,
        id: JobId,
        node_name: &str,
        gpus: &[String],
    ) -> Result<Vec<Event>, Rejection> {
        let job = self.job(id)?;
        if job.state != JobState::Pending {
            return Err(Rejection::FailedPrecondition(format!(
                "job {id} is not pending"
            )));
        }
        if job.not_before_ms > at {
            return Err(Rejection::FailedPrecondition(format!(
                "job {id} is backing off"
            )));
        }
        let node = self
            .nodes
            .get(node_name)
            .ok_or_else(|| Rejection::NotFound(format!("node {node_name:?} does not exist")))?;
        if !node.up {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node_name} is down"
            )));
        }
        if node.draining {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node_name} is draining: its agent is shutting down"
            )));
        }
        if let Some(c) = &node.cordon {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node_name} is drained: {}",
                c.reason
            )));
        }
        match self.blocked(id, &self.array_running()) {
            None => {}
            Some(crate::habits::Blocked::Held) => {
                return Err(Rejection::FailedPrecondition(format!("job {id} is held")));
            }
            Some(crate::habits::Blocked::Dependency(d)) => {
                return Err(Rejection::FailedPrecondition(format!(
                    "job {id} waits for job {d}"
                )));
            }
            Some(crate::habits::Blocked::ArrayLimit(n)) => {
                return Err(Rejection::FailedPrecondition(format!(
                    "{n} tasks of job {id}'s array are running, its limit"
                )));
            }
        }
        if let Some(q) = self.policy.gpu_quota(&job.member) {
            let held = self.gpus_held(&job.member);
            if held.saturating_add(job.spec.gpus as u64) > q {
                return Err(Rejection::FailedPrecondition(format!(
                    "member {} holds {held} GPUs; its quota is {q}",
                    job.member
                )));
            }
        }
        let distinct: BTreeSet<&String> = gpus.iter().collect();
        if gpus.len() != job.spec.gpus as usize || distinct.len() != gpus.len() {
            return Err(invalid(
                "gpus",
                format!(
                    "placement gives {} GPUs to a job of {}",
                    distinct.len(),
                    job.spec.gpus
                ),
            ));
        }
        for uuid in gpus {
            let gpu = node
                .gpus
                .iter()
                .find(|g| &g.uuid == uuid)
                .ok_or_else(|| invalid("gpus", format!("{uuid} is not on node {node_name}")))?;
            if gpu.job.is_some() {
                return Err(Rejection::FailedPrecondition(format!(
                    "GPU {uuid} is not free"
                )));
            }
            if !gpu_fits(gpu, &job.spec) {
                return Err(Rejection::FailedPrecondition(format!(
                    "GPU {uuid} does not meet the job's model or memory request"
                )));
            }
        }
        let node = self.nodes.get_mut(node_name).expect("checked above");
        for g in node.gpus.iter_mut().filter(|g| gpus.contains(&g.uuid)) {
            g.job = Some(id);
        }
        let job = self.jobs.get_mut(&id).expect("checked above");
        self.queue.remove(&(job.submitted_at_ms, id));
        self.running.insert(id);
        job.state = JobState::Running;
        job.node = Some(node_name.to_string());
        job.gpus = gpus.to_vec();
        job.attempts += 1;
        job.started_at_ms = None;
        job.finished_at_ms = None;
        job.exit_code = None;
        job.reason.clear();
        job.nominated_node = None;
        job.placed_at_ms = at;
        job.run_energy_mj = 0;
        Ok(vec![Event::Job(id), Event::Node(node_name.to_string())])
    }

    fn preempt(&mut self, at: i64, id: JobId, for_id: JobId) -> Result<Vec<Event>, Rejection> {
        if !self.policy.preemption {
            return Err(Rejection::FailedPrecondition(
                "preemption is off in the policy".into(),
            ));
        }
        let job = self.job(id)?;
        let waiting = self.job(for_id)?;
        if waiting.state != JobState::Pending {
            return Err(Rejection::FailedPrecondition(format!(
                "job {for_id} is not pending"
            )));
        }
        if waiting.member == job.member {
            return Err(Rejection::FailedPrecondition(
                "a member's job does not preempt the same member's".into(),
            ));
        }
        if !self.preemptible(job, at) {
            return Err(Rejection::FailedPrecondition(format!(
                "job {id} is not preemptible now"
            )));
        }
        let node = job.node.clone().expect("running jobs have a node");
        let member = waiting.member.clone();
        let entry = ledger::Entry::Preemption {
            job: id,
            member: job.member.clone(),
            for_job: for_id,
            for_member: member.clone(),
        };
        ledger::append(&mut self.audit, at, entry);
        let job = self.jobs.get_mut(&id).expect("checked");
        job.preempted_for = Some(for_id);
        job.reason = format!("preempted for job {for_id} of member {member}");
        let waiting = self.jobs.get_mut(&for_id).expect("checked");
        waiting.nominated_node = Some(node.clone());
        waiting.preemptions_caused += 1;
        Ok(vec![Event::Job(id), Event::Job(for_id), Event::Node(node)])
    }

    /// GPUs the running jobs of `member` hold.
    pub fn gpus_held(&self, member: &str) -> u64 {
        self.running
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.member == member)
            .map(|j| j.spec.gpus as u64)
            .sum()
    }

    /// Whether policy lets `job` be preempted at `at`.
    pub fn preemptible(&self, job: &Job, at: i64) -> bool {
        let kind_ok = match job.spec.kind {
            JobKind::Finetune => job.spec.preemptible,
            JobKind::Inference => self.policy.preempt_inference,
        };
        kind_ok
            && job.state == JobState::Running
            && !job.stopping()
            && job.started_at_ms.is_some_and(|s| {
                at.saturating_sub(s) >= (self.policy.min_runtime_s as i64).saturating_mul(1000)
            })
    }

    fn expire(&mut self, at: i64, id: JobId) -> Result<Vec<Event>, Rejection> {
        let job = self
            .jobs
            .get_mut(&id)
            .ok_or_else(|| Rejection::NotFound(format!("job {id} does not exist")))?;
        let limit = job.spec.time_limit_ms as i64;
        let over = job.state == JobState::Running
            && limit > 0
            && job
                .started_at_ms
                .is_some_and(|s| at.saturating_sub(s) >= limit);
        if !over {
            return Err(Rejection::FailedPrecondition(format!(
                "job {id} is not past its time limit"
            )));
        }
        job.timed_out = true;
        Ok(vec![Event::Job(id)])
    }

    /// Refuses what only a proposal may do while the co-op governs itself
    /// (`approvals` > 0): the operator alone may not do it.
    fn ungoverned(&self, what: &str) -> Result<(), Rejection> {
        let k = self.policy.approvals_required;
        if k > 0 {
            return Err(Rejection::FailedPrecondition(format!(
                "{what} needs the approval of {k} members (policy approvals={k}): propose it"
            )));
        }
        Ok(())
    }

    /// Members that may vote: present ones. Suspension (the operator's
    /// alone) is about use and changes no vote; the member the operator's
    /// own jobs are billed to has the operator's token and never votes.
    fn voters(&self) -> BTreeSet<String> {
        self.members
            .values()
            .filter(|m| m.removed_at_ms.is_none())
            .filter(|m| self.default_member.as_deref() != Some(m.name.as_str()))
            .map(|m| m.name.clone())
            .collect()
    }

    fn check_settings(&self, settings: &[Setting], reason: &str) -> Result<(), Rejection> {
        if settings.is_empty() {
            return Err(invalid("settings", "name at least one KEY=VALUE"));
        }
        if reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "say why the policy changes (it is kept with the change)",
            ));
        }
        if settings.len() > 64 || reason.len() > 1024 {
            return Err(invalid(
                "settings",
                "at most 64 settings and a reason of at most 1024 bytes",
            ));
        }
        let named: Vec<&String> = settings
            .iter()
            .filter_map(|s| match s {
                Setting::AddMember { name, .. } | Setting::RemoveMember(name) => Some(name),
                _ => None,
            })
            .collect();
        if named.iter().collect::<BTreeSet<_>>().len() != named.len() {
            return Err(invalid("settings", "names one member twice"));
        }
        let hashes: Vec<&String> = settings
            .iter()
            .filter_map(|s| match s {
                Setting::AddMember { token_hash, .. } => Some(token_hash),
                _ => None,
            })
            .collect();
        if hashes.iter().collect::<BTreeSet<_>>().len() != hashes.len() {
            return Err(Rejection::AlreadyExists("token already in use".into()));
        }
        // Approvals are checked against the co-op as this change leaves it.
        let mut after = self.voters();
        for s in settings {
            match s {
                Setting::AddMember { name, .. } => {
                    after.insert(name.clone());
                }
                Setting::RemoveMember(name) => {
                    after.remove(name);
                }
                _ => {}
            }
        }
        let voters_after = after.len();
        let approvals_after = settings
            .iter()
            .rev()
            .find_map(|s| match s {
                Setting::Approvals(k) => Some(*k),
                _ => None,
            })
            .unwrap_or(self.policy.approvals_required);
        if approvals_after as usize > voters_after {
            return Err(invalid(
                "approvals",
                format!(
                    "{approvals_after} approvals, but the co-op would have {voters_after} members who can vote: nothing could pass again"
                ),
            ));
        }
        for s in settings {
            match s {
                Setting::Share { member, .. } if !self.members.contains_key(member) => {
                    return Err(Rejection::NotFound(format!(
                        "share.{member}: member {member:?} does not exist"
                    )));
                }
                Setting::MemberGpuQuota { member, .. } if !self.members.contains_key(member) => {
                    return Err(Rejection::NotFound(format!(
                        "gpu_quota.{member}: member {member:?} does not exist"
                    )));
                }
                Setting::AddMember { name, token_hash } => {
                    if !valid_name(name) {
                        return Err(invalid(
                            "member.add",
                            format!("{name:?} is not a valid member name"),
                        ));
                    }
                    if self.members.contains_key(name) {
                        return Err(Rejection::AlreadyExists(format!(
                            "member {name:?} already exists"
                        )));
                    }
                    if self.tokens.contains_key(token_hash) {
                        return Err(Rejection::AlreadyExists("token already in use".into()));
                    }
                }
                Setting::RemoveMember(name) => {
                    self.active_member(name)?;
                    if self.default_member.as_deref() == Some(name) {
                        return Err(Rejection::FailedPrecondition(format!(
                            "member {name:?} is the one the operator's own jobs are billed to"
                        )));
                    }
                }
                Setting::Approvals(k) if *k as usize > voters_after => {
                    return Err(invalid(
                        "approvals",
                        format!(
                            "{k} approvals, but the co-op would have {voters_after} members who can vote"
                        ),
                    ));
                }
                Setting::ModelWeightMilli { model, .. }
                    if model.is_empty()
                        || model.len() > 64
                        || !model.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    return Err(invalid(
                        "weight",
                        "a GPU model name is 1 to 64 printable characters",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn propose_policy(
        &mut self,
        at: i64,
        settings: &[Setting],
        by: &str,
        reason: &str,
    ) -> Result<Vec<Event>, Rejection> {
        self.check_settings(settings, reason)?;
        let required = self.policy.approvals_required;
        if required == 0 {
            return Err(Rejection::FailedPrecondition(
                "the policy needs no approvals (approvals=0): the operator sets it directly".into(),
            ));
        }
        let open = self
            .proposals
            .values()
            .filter(|p| p.by == by && p.enacted_at_ms.is_none() && p.expires_at_ms >= at)
            .count();
        if open >= MAX_OPEN_PROPOSALS {
            return Err(Rejection::ResourceExhausted {
                field: "proposals".into(),
                message: format!(
                    "{by} has {open} open proposals, the most one may have; let them pass or expire"
                ),
            });
        }
        let id = self.proposals.keys().next_back().map_or(1, |k| k + 1);
        let expires_at_ms =
            at.saturating_add((self.policy.proposal_ttl_s as i64).saturating_mul(1000));
        ledger::append(
            &mut self.audit,
            at,
            ledger::Entry::PolicyProposed {
                id,
                by: by.to_string(),
                reason: reason.to_string(),
                settings: settings.iter().map(ToString::to_string).collect(),
                expires_at_ms,
            },
        );
        self.proposals.insert(
            id,
            Proposal {
                id,
                settings: settings.to_vec(),
                by: by.to_string(),
                reason: reason.to_string(),
                created_at_ms: at,
                expires_at_ms,
                approvals: BTreeSet::new(),
                required,
                enacted_at_ms: None,
                electorate: self.voters(),
            },
        );
        Ok(vec![])
    }

    fn approve_policy(&mut self, at: i64, id: u64, member: &str) -> Result<Vec<Event>, Rejection> {
        if !self.members.contains_key(member) {
            return Err(Rejection::NotFound(format!(
                "member {member:?} does not exist"
            )));
        }
        let voters = self.voters();
        if !voters.contains(member) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {member} does not vote (removed, or the member the operator's own jobs are billed to)"
            )));
        }
        let p = self
            .proposals
            .get(&id)
            .ok_or_else(|| Rejection::NotFound(format!("proposal {id} does not exist")))?;
        if !p.electorate.is_empty() && !p.electorate.contains(member) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {member} joined after proposal {id} was made: only the members of the co-op then vote on it"
            )));
        }
        if !p.electorate.is_empty() && !self.self_keyed.contains(member) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {member} votes with a token of its own: rotate it first with the one it was given (coop member token rotate {member}); the operator has seen that one"
            )));
        }
        if p.enacted_at_ms.is_some() {
            return Err(Rejection::FailedPrecondition(format!(
                "proposal {id} has already been enacted"
            )));
        }
        if at > p.expires_at_ms {
            return Err(Rejection::FailedPrecondition(format!(
                "proposal {id} expired without enough approvals"
            )));
        }
        if p.approvals.contains(member) {
            return Err(Rejection::AlreadyExists(format!(
                "member {member} has already approved proposal {id}"
            )));
        }
        // Approvals of members removed since no longer count.
        let standing = p.approvals.iter().filter(|m| voters.contains(*m)).count() as u32;
        let enact = standing + 1 >= p.required;
        let (settings, reason) = (p.settings.clone(), p.reason.clone());
        if enact {
            // Checked again: members may have left since it was proposed.
            self.check_settings(&settings, &reason)?;
        }
        ledger::append(
            &mut self.audit,
            at,
            ledger::Entry::PolicyApproved {
                id,
                member: member.to_string(),
            },
        );
        let p = self.proposals.get_mut(&id).expect("checked");
        p.approvals.insert(member.to_string());
        if enact {
            p.enacted_at_ms = Some(at);
            let by = format!(
                "proposal {id} by {}, approved by {}",
                p.by,
                p.approvals.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            return self.set_policy(at, &settings, &by, &reason);
        }
        Ok(vec![])
    }

    fn set_policy(
        &mut self,
        at: i64,
        settings: &[Setting],
        by: &str,
        reason: &str,
    ) -> Result<Vec<Event>, Rejection> {
        self.check_settings(settings, reason)?;
        let mut policy = self.policy.clone();
        for s in settings {
            policy.set(s);
        }
        // Membership changes (checked above, so they succeed).
        let mut events = vec![];
        for s in settings {
            match s {
                Setting::AddMember { name, token_hash } => {
                    events.extend(self.add_member(at, name, token_hash)?);
                }
                Setting::RemoveMember(name) => events.extend(self.remove_member(at, name)?),
                _ => {}
            }
        }
        self.policy = policy;
        ledger::append(
            &mut self.audit,
            at,
            ledger::Entry::PolicyChanged {
                by: by.to_string(),
                reason: reason.to_string(),
                settings: settings.iter().map(ToString::to_string).collect(),
            },
        );
        self.policy_log.push(PolicyChange {
            at_ms: at,
            by: by.to_string(),
            reason: reason.to_string(),
            settings: settings.to_vec(),
        });
        Ok(events)
    }

    fn report(
        &mut self,
        at: i64,
        node_name: &str,
        session: &str,
        seq: u64,
        report: &RunReport,
    ) -> Result<Vec<Event>, Rejection> {
        let node = self
            .nodes
            .get_mut(node_name)
            .ok_or_else(|| Rejection::NotFound(format!("node {node_name:?} does not exist")))?;
        if node.session != session {
            return Err(Rejection::FailedPrecondition(format!(
                "agent session {session} of node {node_name} is no longer registered"
            )));
        }
        // A node that went silent reports again once it has registered again
        // (which bounds what it may still bill of the runs it was cut off
        // from); refused, not acknowledged, so that nothing honest is lost.
        if !node.up {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node_name} is down: register again"
            )));
        }
        if seq <= node.last_seq {
            return Ok(vec![]); // already applied: a retransmission
        }
        node.last_seq = seq;
        // An implausible report is kept as evidence and bills nothing; a run
        // it says has ended still ends (the node could hold it hostage
        // otherwise), billed no further than before.
        let plausible = match self.check_report(at, node_name, report) {
            Ok(()) => true,
            Err(why) => {
                self.reject_report(at, node_name, report, &why);
                false
            }
        };
        if self.bill_cut_off(at, node_name, report, plausible) {
            return Ok(vec![]);
        }
        // A report about a run that is no longer current (requeued meanwhile, or
        // stopped after it was reassigned) is acknowledged and otherwise ignored.
        let current = |s: &State, job: &JobId, attempt: u32| {
            s.jobs.get(job).is_some_and(|j| {
                j.state == JobState::Running
                    && j.attempts == attempt
                    && j.node.as_deref() == Some(node_name)
            })
        };
        match report {
            RunReport::Started {
                job,
                attempt,
                at_ms,
            } => {
                if !plausible || !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                let j = self.jobs.get_mut(job).expect("checked");
                // Within the skew it is the agent's clock; billed from no
                // earlier than the placement and no later than now.
                let start = (*at_ms).clamp(j.placed_at_ms.min(at), at);
                j.started_at_ms = Some(start);
                j.billed_to_ms = start;
                Ok(vec![Event::Job(*job)])
            }
            RunReport::Usage {
                job,
                attempt,
                to_ms,
                energy_mj,
            } => {
                if !plausible || !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                self.bill(*job, (*to_ms).min(at), *energy_mj);
                Ok(vec![])
            }
            RunReport::Utilization {
                job,
                attempt,
                sum_pct,
                samples,
            } => {
                if plausible && current(self, job, *attempt) {
                    let j = self.jobs.get_mut(job).expect("checked");
                    j.run_utilization = (*sum_pct, *samples);
                }
                Ok(vec![])
            }
            RunReport::Lost {
                job,
                attempt,
                at_ms,
                reason,
                energy_mj,
            } => {
                if !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                let (end, energy) = self.run_end(*job, at, *at_ms, *energy_mj, plausible);
                self.close_run(*job, end, energy);
                self.after_lost_run(*job, end, &crate::plausible::bounded_reason(reason));
                Ok(vec![Event::Job(*job), Event::Node(node_name.to_string())])
            }
            RunReport::Exited {
                job,
                attempt,
                at_ms,
                exit_code,
                reason,
                energy_mj,
            } => {
                if !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                let (end, energy) = self.run_end(*job, at, *at_ms, *energy_mj, plausible);
                self.close_run(*job, end, energy);
                let reason = crate::plausible::bounded_reason(reason);
                let j = self.jobs.get_mut(job).expect("checked");
                j.exit_code = Some(*exit_code);
                j.reason = reason.clone();
                let (preempted, timed_out) =
                    (j.preempted_for.take(), std::mem::take(&mut j.timed_out));
                if j.cancel_requested {
                    j.state = JobState::Cancelled;
                    j.finished_at_ms = Some(end);
                } else if let Some(for_job) = preempted {
                    j.reason = format!("preempted for job {for_job}");
                    self.end_preempted(*job, at.max(end));
                } else if j.requeue_requested {
                    let node = j.node.clone().unwrap_or_default();
                    j.reason = format!("node {node} drained: requeued");
                    self.requeue(*job, at.max(end));
                } else if timed_out {
                    j.state = JobState::Failed;
                    j.finished_at_ms = Some(end);
                    j.reason = format!("time limit of {} s reached", j.spec.time_limit_ms / 1000);
                } else {
                    match j.spec.kind {
                        JobKind::Finetune => {
                            j.state = if *exit_code == 0 {
                                JobState::Completed
                            } else {
                                JobState::Failed
                            };
                            j.finished_at_ms = Some(end);
                        }
                        JobKind::Inference => {
                            // A service is restarted, with a growing back-off if it
                            // keeps exiting quickly.
                            let backoff = restart_backoff(j.attempts);
                            j.reason = format!(
                                "exited with {exit_code}{}; restarting",
                                if reason.is_empty() {
                                    String::new()
                                } else {
                                    format!(" ({reason})")
                                }
                            );
                            self.requeue(*job, at.max(end) + backoff);
                        }
                    }
                }
                Ok(vec![Event::Job(*job), Event::Node(node_name.to_string())])
            }
        }
    }

    /// Bills a late report about a run cut off when its node went down: the
    /// agent measured it past the point the scheduler billed it to. Returns
    /// whether the report was about such a run.
    fn bill_cut_off(
        &mut self,
        at: i64,
        node_name: &str,
        report: &RunReport,
        plausible: bool,
    ) -> bool {
        let (job, attempt, to_ms, energy_mj, last) = match report {
            RunReport::Usage {
                job,
                attempt,
                to_ms,
                energy_mj,
            } => (job, *attempt, *to_ms, *energy_mj, false),
            RunReport::Exited {
                job,
                attempt,
                at_ms,
                energy_mj,
                ..
            }
            | RunReport::Lost {
                job,
                attempt,
                at_ms,
                energy_mj,
                ..
            } => (job, *attempt, *at_ms, *energy_mj, true),
            RunReport::Started { .. } | RunReport::Utilization { .. } => return false,
        };
        let Some(node) = self.nodes.get_mut(node_name) else {
            return false;
        };
        let Some(i) = node
            .cut_off
            .iter()
            .position(|c| c.job == *job && c.attempt == attempt)
        else {
            return false;
        };
        let to_ms = to_ms.min(node.cut_off[i].deadline_ms.unwrap_or(i64::MAX));
        let cut = if last {
            node.cut_off.remove(i)
        } else {
            let c = &mut node.cut_off[i];
            let before = c.clone();
            if plausible {
                c.billed_to_ms = to_ms.min(at).max(c.billed_to_ms);
                c.energy_mj = c.energy_mj.saturating_add(energy_mj);
            }
            before
        };
        let Some(j) = self.jobs.get(job) else {
            return true;
        };
        if !plausible {
            return true;
        }
        let to = to_ms.min(at).max(cut.billed_to_ms);
        let gpu_ms = ms_between(cut.billed_to_ms, to).saturating_mul(cut.gpus as u64);
        if gpu_ms == 0 && energy_mj == 0 {
            return true;
        }
        let record = UsageRecord {
            job: *job,
            attempt,
            member: j.member.clone(),
            node: node_name.to_string(),
            model: cut.model,
            gpus: cut.gpus,
            start_ms: cut.billed_to_ms,
            end_ms: to,
            gpu_ms,
            weighted_gpu_ms: weighted_ms(gpu_ms, cut.weight_milli),
            energy_mj,
        };
        self.add_usage(record);
        true
    }

    /// Bills the current run of `id` from where it was billed to up to `to_ms`.
    /// A run that has not reported its start has no time to bill.
    fn bill(&mut self, id: JobId, to_ms: i64, energy_mj: u64) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.started_at_ms.is_none() {
            return;
        }
        let from = job.billed_to_ms;
        let to = to_ms.max(from);
        let (model, weight_milli) = self.run_weight(job);
        let gpu_ms = ms_between(from, to).saturating_mul(job.spec.gpus as u64);
        let weighted = weighted_ms(gpu_ms, weight_milli);
        let job = self.jobs.get_mut(&id).expect("checked");
        job.billed_to_ms = to;
        job.run_energy_mj = job.run_energy_mj.saturating_add(energy_mj);
        if gpu_ms == 0 && energy_mj == 0 {
            return;
        }
        let record = UsageRecord {
            job: id,
            attempt: job.attempts,
            member: job.member.clone(),
            node: job.node.clone().unwrap_or_default(),
            model,
            gpus: job.spec.gpus,
            start_ms: from,
            end_ms: to,
            gpu_ms,
            weighted_gpu_ms: weighted,
            energy_mj,
        };
        self.add_usage(record);
    }

    /// Where and with what energy a run that a report ends is closed: at the
    /// reported time within the leader's clock, or, for an implausible
    /// report, where it was billed to already and with no energy.
    fn run_end(
        &self,
        id: JobId,
        at: i64,
        at_ms: i64,
        energy_mj: u64,
        plausible: bool,
    ) -> (i64, u64) {
        let Some(j) = self.jobs.get(&id) else {
            return (at_ms.min(at), 0);
        };
        let floor = if j.started_at_ms.is_some() {
            j.billed_to_ms
        } else {
            j.placed_at_ms.min(at)
        };
        if plausible {
            (at_ms.min(at).max(floor), energy_mj)
        } else {
            (floor, 0)
        }
    }

    /// Keeps an implausible report as evidence: an audit entry, and a count
    /// per node for the metrics.
    fn reject_report(&mut self, at: i64, node: &str, report: &RunReport, why: &str) {
        let (job, attempt) = report.run();
        ledger::append(
            &mut self.audit,
            at,
            ledger::Entry::ReportRejected {
                node: node.to_string(),
                job,
                attempt,
                report: report.kind().to_string(),
                reason: why.to_string(),
            },
        );
        let n = self.rejected_reports.entry(node.to_string()).or_default();
        *n = n.saturating_add(1);
    }

    /// Adds a usage record to its job's totals and to both ledgers.
    fn add_usage(&mut self, record: UsageRecord) {
        if let Some(j) = self.jobs.get_mut(&record.job) {
            j.gpu_ms = j.gpu_ms.saturating_add(record.gpu_ms);
            j.weighted_gpu_ms = j.weighted_gpu_ms.saturating_add(record.weighted_gpu_ms);
            j.energy_mj = j.energy_mj.saturating_add(record.energy_mj);
        }
        // Stamped with the interval's end: when the usage happened.
        let at = record.end_ms;
        ledger::append(&mut self.audit, at, ledger::Entry::Usage(record.clone()));
        self.ledger.push(record);
    }

    /// Thousandths of a unit per GPU-hour of `model`: the declared weight, or
    /// where the policy weighs by measurement, the model's probed throughput
    /// against the reference; else one unit.
    pub fn weight_milli(&self, model: &str) -> u64 {
        let p = &self.policy;
        p.declared_weight_milli(model)
            .or_else(|| {
                let m = self.measured_models.get(model)?;
                p.measured_weight_milli(m.fp16_gflops)
            })
            .unwrap_or(crate::policy::UNIT_WEIGHT_MILLI)
    }

    /// Recomputes each model's mean probed throughput from the registered GPUs.
    fn remeasure_models(&mut self) {
        let mut sums: BTreeMap<String, (Capacity, u64)> = BTreeMap::new();
        for g in self.nodes.values().flat_map(|n| &n.gpus) {
            let Some(m) = g.measured else { continue };
            let (s, n) = sums.entry(g.model.clone()).or_insert((
                Capacity {
                    fp16_gflops: 0,
                    bf16_gflops: 0,
                    memory_mb_per_s: 0,
                },
                0,
            ));
            s.fp16_gflops = s.fp16_gflops.saturating_add(m.fp16_gflops);
            s.bf16_gflops = s.bf16_gflops.saturating_add(m.bf16_gflops);
            s.memory_mb_per_s = s.memory_mb_per_s.saturating_add(m.memory_mb_per_s);
            *n += 1;
        }
        self.measured_models = sums
            .into_iter()
            .map(|(model, (s, n))| {
                let mean = Capacity {
                    fp16_gflops: s.fp16_gflops / n,
                    bf16_gflops: s.bf16_gflops / n,
                    memory_mb_per_s: s.memory_mb_per_s / n,
                };
                (model, mean)
            })
            .collect();
    }

    /// The model of a run's GPUs and the policy's weight for it, in thousandths
    /// (the mean weight if a run ever held mixed models).
    pub fn run_weight(&self, job: &Job) -> (String, u64) {
        let node = job.node.as_ref().and_then(|n| self.nodes.get(n));
        let models: Vec<&str> = job
            .gpus
            .iter()
            .filter_map(|u| node.and_then(|n| n.gpus.iter().find(|g| &g.uuid == u)))
            .map(|g| g.model.as_str())
            .collect();
        if models.is_empty() {
            return (String::new(), crate::policy::UNIT_WEIGHT_MILLI);
        }
        let sum = models
            .iter()
            .fold(0u64, |s, m| s.saturating_add(self.weight_milli(m)));
        (models[0].to_string(), sum / models.len() as u64)
    }

    /// Ends the current run of a running job, bills the rest of it, and frees its GPUs.
    fn close_run(&mut self, id: JobId, end_ms: i64, energy_mj: u64) {
        self.bill(id, end_ms, energy_mj);
        self.running.remove(&id);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let (sum, n) = std::mem::take(&mut job.run_utilization);
        job.utilization = (
            job.utilization.0.saturating_add(sum),
            job.utilization.1.saturating_add(n),
        );
        let job = &self.jobs[&id];
        if let Some(node) = job.node.as_ref().and_then(|n| self.nodes.get_mut(n)) {
            for g in node.gpus.iter_mut().filter(|g| g.job == Some(id)) {
                g.job = None;
            }
        }
    }

    /// A preempted run has stopped: back to the queue, ahead of nothing (its
    /// place in it is its submission time), with its attempts kept.
    fn end_preempted(&mut self, id: JobId, at: i64) {
        let job = self.jobs.get_mut(&id).expect("preempted job exists");
        job.preemptions += 1;
        self.requeue(id, at);
    }

    /// The run's agent is gone: bill up to `end_ms` and put the job back in the
    /// queue, unless it was being cancelled or has used up its attempts.
    fn end_run_lost(&mut self, id: JobId, end_ms: i64, why: &str) {
        self.close_run(id, end_ms, 0);
        self.after_lost_run(id, end_ms, why);
    }

    /// A run that ended through no fault of its job: the job goes back to the
    /// queue (or is lost for good after too many attempts).
    fn after_lost_run(&mut self, id: JobId, end_ms: i64, why: &str) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.timed_out = false;
        if job.preempted_for.take().is_some() && !job.cancel_requested {
            self.end_preempted(id, end_ms);
            return;
        }
        if job.requeue_requested && !job.cancel_requested {
            self.requeue(id, end_ms);
            return;
        }
        job.reason = format!("{why} during attempt {}", job.attempts);
        if job.cancel_requested {
            job.state = JobState::Cancelled;
            job.finished_at_ms = Some(end_ms);
        } else if job.spec.kind == JobKind::Finetune && job.attempts >= MAX_ATTEMPTS {
            job.state = JobState::Lost;
            job.finished_at_ms = Some(end_ms);
        } else {
            self.requeue(id, end_ms);
        }
    }

    fn requeue(&mut self, id: JobId, not_before: i64) {
        let job = self.jobs.get_mut(&id).expect("requeue of a known job");
        job.state = JobState::Pending;
        job.not_before_ms = not_before;
        job.cancel_requested = false;
        job.preempted_for = None;
        job.timed_out = false;
        job.requeue_requested = false;
        self.queue.insert((job.submitted_at_ms, id));
    }

    /// GPU-milliseconds of a job: what is billed plus the running run's
    /// unbilled part up to `now_ms`.
    pub fn job_gpu_ms(&self, job: &Job, now_ms: i64) -> u64 {
        job.gpu_ms
            .saturating_add(unbilled_ms(job, now_ms).saturating_mul(job.spec.gpus as u64))
    }
}

/// Milliseconds from `from` to `to` (none when `to` is earlier).
fn ms_between(from: i64, to: i64) -> u64 {
    to.saturating_sub(from).max(0) as u64
}

/// GPU-milliseconds times a weight in thousandths.
fn weighted_ms(gpu_ms: u64, weight_milli: u64) -> u64 {
    u64::try_from(gpu_ms as u128 * weight_milli as u128 / 1000).unwrap_or(u64::MAX)
}

fn restart_backoff(attempts: u32) -> i64 {
    let exp = attempts.saturating_sub(1).min(16);
    (1000i64 << exp).min(MAX_RESTART_BACKOFF_MS)
}

/// Milliseconds of the current run not yet billed, up to `now_ms`.
pub fn unbilled_ms(job: &Job, now_ms: i64) -> u64 {
    match (job.state, job.started_at_ms) {
        (JobState::Running, Some(_)) => ms_between(job.billed_to_ms, now_ms),
        _ => 0,
    }
}

/// The most GPUs of one model and memory size on `node` that fit `spec`:
/// placement gives a job GPUs of one kind.
pub fn largest_class(node: &Node, spec: &JobSpec) -> usize {
    let mut by: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for g in node.gpus.iter().filter(|g| gpu_fits(g, spec)) {
        *by.entry((g.model.as_str(), g.memory_mb)).or_default() += 1;
    }
    by.into_values().max().unwrap_or(0)
}

pub fn gpu_fits(gpu: &Gpu, spec: &JobSpec) -> bool {
    spec.gpu_model
        .as_ref()
        .is_none_or(|m| gpu.model.eq_ignore_ascii_case(m))
        && gpu.memory_mb >= spec.min_gpu_memory_mb
}

/// Most GPUs (or MIG instances) one node may offer.
pub const MAX_GPUS_PER_NODE: usize = 128;
/// No GPU has more memory than this (4 TiB), nor more throughput (100 PFLOPS,
/// 100 TB/s) than these: bounds that keep sums of them far from overflow.
const MAX_GPU_MEMORY_MB: u64 = 4 << 20;
const MAX_MEASURED: u64 = 100_000_000;

/// What a registration may say of one GPU.
fn check_gpu(g: &GpuInfo) -> Result<(), Rejection> {
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if g.uuid.len() > 128 || !printable(&g.uuid) {
        return Err(invalid(
            "gpus",
            format!("GPU uuid {:?} is not a GPU uuid", g.uuid),
        ));
    }
    if g.model.is_empty() || g.model.len() > 64 || !printable(&g.model) {
        return Err(invalid(
            "gpus",
            format!("GPU model {:?} is not a model name", g.model),
        ));
    }
    if g.power_limit_w as u64 > crate::plausible::MAX_GPU_POWER_W {
        return Err(invalid(
            "gpus",
            format!(
                "GPU {} claims a power limit of {} W",
                g.uuid, g.power_limit_w
            ),
        ));
    }
    if g.memory_mb > MAX_GPU_MEMORY_MB {
        return Err(invalid(
            "gpus",
            format!("GPU {} claims {} MB of memory", g.uuid, g.memory_mb),
        ));
    }
    if let Some(m) = g.measured
        && (m.fp16_gflops > MAX_MEASURED
            || m.bf16_gflops > MAX_MEASURED
            || m.memory_mb_per_s > MAX_MEASURED)
    {
        return Err(invalid(
            "gpus",
            format!("GPU {} claims an impossible measured throughput", g.uuid),
        ));
    }
    Ok(())
}

/// Most arguments a command may have.
pub const MAX_ARGS: usize = 4096;
/// Most environment variables a job may set.
pub const MAX_ENV_VARS: usize = 256;
/// Most bytes of command, arguments and environment together: every replica
/// keeps them, and every list answer carries them.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
pub const MAX_TIME_LIMIT_MS: u64 = 366 * 24 * 3600 * 1000;

/// Variables the agent sets for each run, which a job may not override.
pub fn reserved_env(key: &str) -> bool {
    // NVIDIA_* steer the container runtime's GPU hooks (devices, MIG
    // configuration): the agent's to set, like the job's identity.
    key.starts_with("COOP_")
        || key.starts_with("NVIDIA_")
        || matches!(
            key,
            "CUDA_VISIBLE_DEVICES" | "HIP_VISIBLE_DEVICES" | "ROCR_VISIBLE_DEVICES"
        )
}

/// Checks what can be checked without the state; the service layer calls it
/// before proposing so that bad input never reaches the log.
pub fn validate_spec(spec: &JobSpec) -> Result<(), Rejection> {
    if spec.gpus == 0 {
        return Err(invalid("gpus", "must be at least 1"));
    }
    if spec.command.is_empty() || spec.command[0].trim().is_empty() {
        return Err(invalid("command", "must not be empty"));
    }
    if spec.command.len() > MAX_ARGS {
        return Err(invalid(
            "command",
            format!("{} arguments; at most {MAX_ARGS}", spec.command.len()),
        ));
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("command", "an argument holds a NUL byte"));
    }
    if spec.env.len() > MAX_ENV_VARS {
        return Err(invalid(
            "env",
            format!("{} variables; at most {MAX_ENV_VARS}", spec.env.len()),
        ));
    }
    for (k, v) in &spec.env {
        let name_ok = k.len() <= 255
            && k.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(invalid(
                "env",
                format!("{k:?} is not a variable name (letters, digits, '_'; not first a digit)"),
            ));
        }
        if reserved_env(k) {
            return Err(invalid(
                "env",
                format!("{k} is set by the agent for each run (the job's GPUs and identity)"),
            ));
        }
        if v.contains('\0') {
            return Err(invalid("env", format!("the value of {k} holds a NUL byte")));
        }
    }
    let bytes: usize = spec.command.iter().map(|a| a.len() + 1).sum::<usize>()
        + spec
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if bytes > MAX_SPEC_BYTES {
        return Err(invalid(
            "command",
            format!(
                "the command, its arguments and its environment come to {bytes} bytes; at most {MAX_SPEC_BYTES}"
            ),
        ));
    }
    if spec.time_limit_ms > MAX_TIME_LIMIT_MS {
        return Err(invalid("time_limit", "at most 366 days"));
    }
    if spec.kill_grace_ms > crate::policy::MAX_GRACE_S * 1000 {
        return Err(invalid("kill_grace", "at most a day"));
    }
    if spec.gpu_model.as_ref().is_some_and(|m| m.len() > 64) {
        return Err(invalid("gpu_model", "at most 64 characters"));
    }
    if spec.gpu_model.as_ref().is_some_and(|m| m.trim().is_empty()) {
        return Err(invalid("gpu_model", "must not be blank"));
    }
    if !(-1000..=1000).contains(&spec.priority) {
        return Err(invalid("priority", "must be from -1000 to 1000"));
    }
    let iso = &spec.isolation;
    if iso.cpu_millis > 1_000_000 {
        return Err(invalid("cpus", "must be at most 1000"));
    }
    if iso.cpu_millis > 0 && iso.cpu_millis < 10 {
        return Err(invalid("cpus", "must be at least 0.01"));
    }
    if iso.memory_mb > 0 && iso.memory_mb < 4 {
        return Err(invalid("memory", "must be at least 4 MiB"));
    }
    if let Some(image) = &iso.image
        && (image.is_empty()
            || image.len() > 512
            || image.starts_with('-')
            || image.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(invalid(
            "image",
            format!("{image:?} is not an image reference (e.g. docker.io/library/python:3.12)"),
        ));
    }
    Ok(())
}
