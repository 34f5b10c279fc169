//! What the state machine is told (`Command`, `Op`, `RunReport`), what it
//! says changed (`Event`) and how it refuses (`Rejection`).

use serde::{Deserialize, Serialize};

use crate::model::{GpuInfo, JobExtra, JobId, JobSpec, Principal};
use crate::policy::Setting;

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
        expires_at_ms: Option<i64>,
        /// Who asked (`None` where it was not recorded).
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
        /// The host other nodes reach it at (see `Node::address`).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        address: String,
        /// A site or rack label (see `Node::site`).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        site: String,
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
        extra: Box<JobExtra>,
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
    /// A multi-node run: `parts` (node, GPUs) by rank, rank 0's rendezvous
    /// on `port`.
    PlaceGang {
        job: JobId,
        parts: Vec<(String, Vec<String>)>,
        port: u16,
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

pub(super) fn invalid(field: &str, message: impl Into<String>) -> Rejection {
    Rejection::InvalidArgument {
        field: field.to_string(),
        message: message.into(),
    }
}
