//! gRPC services of coop.v1: the thin shell over the replica.

pub mod agents;
pub mod audit;
pub mod cluster;
pub mod habits;
pub mod jobs;
pub mod limits;
pub mod members;
pub mod policy;
pub mod usage;

use std::sync::Arc;

use coop_proto::v1 as pb;
use tonic::{Request, Status};

use crate::auth::hash_token;
use crate::liveness::Registry;
use crate::replica::{ProposeError, Replica};
use coop_core::state::{Job, JobKind, JobState, Principal, State};

/// What every service holds.
#[derive(Clone)]
pub struct Ctx {
    pub replica: Replica,
    /// The agents' streams (`liveness`).
    pub registry: Arc<Registry>,
    pub config: Arc<crate::config::Config>,
    pub limits: Arc<limits::SubmitLimits>,
    /// Signs audit heads (`AuditService.Head`) with this scheduler's key.
    pub signer: Arc<crate::signer::Signer>,
    /// Turns true when the scheduler is asked to stop: long-lived streams end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// How a stream ends when its scheduler stops: the agent or client goes on
/// with another scheduler.
pub fn shutting_down() -> Status {
    let mut s = Status::unavailable("this scheduler is shutting down: go on with another");
    s.metadata_mut().insert(
        NOT_APPLIED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    s
}

impl Ctx {
    /// Resolves once the scheduler is asked to stop.
    pub async fn stopping(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await.map(|_| ());
    }

    /// The caller's principal, from `authorization: Bearer <token>`: any
    /// credential, a node's included. A token this node does not know yet may
    /// have been created on the leader a moment ago (or this node is replaying
    /// its log after a restart): it catches up before refusing. A follower
    /// also catches up before accepting one, so that a token revoked, rotated
    /// or suspended is refused at once on every node.
    pub async fn authenticate<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "no credential: send authorization: Bearer <token> (COOP_TOKEN)",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))?;
        let hash = hash_token(token.trim());
        let check = || {
            self.replica
                .read()
                .authenticate(&hash, crate::clock::now_ms())
                .cloned()
        };
        match check() {
            Ok(p) if self.replica.is_leader() => return Ok(p),
            Err(coop_core::accounts::Refused::Expired) => {
                return Err(Status::unauthenticated("token expired: ask for a new one"));
            }
            _ => {}
        }
        self.current().await?;
        check().map_err(|r| match r {
            coop_core::accounts::Refused::Unknown => Status::unauthenticated("unknown token"),
            coop_core::accounts::Refused::Expired => {
                Status::unauthenticated("token expired: ask for a new one")
            }
            coop_core::accounts::Refused::Suspended(m) => Status::permission_denied(format!(
                "member {m} is suspended: ask the operator to resume it"
            )),
        })
    }

    /// A person: the operator, a member or an auditor (not an agent's node
    /// credential, which is good for its own node's agent calls only).
    pub async fn principal<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        match self.authenticate(req).await? {
            Principal::Node(n) => Err(Status::permission_denied(format!(
                "the credential of node {n} is for its agent only"
            ))),
            p => Ok(p),
        }
    }

    /// Someone who may change things: the operator or a member.
    pub async fn actor<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        match self.principal(req).await? {
            Principal::Auditor(a) => Err(Status::permission_denied(format!(
                "auditor {a} may read usage, statements, policy and the audit ledger, and change nothing"
            ))),
            p => Ok(p),
        }
    }

    /// The operator or an auditor: reads of every member's figures.
    pub async fn overseer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.principal(req).await? {
            Principal::Operator | Principal::Auditor(_) => Ok(()),
            Principal::Member(m) => Err(Status::permission_denied(format!(
                "member {m} may not do this: operator or auditor only"
            ))),
            Principal::Node(_) => unreachable!("refused by principal"),
        }
    }

    /// An agent's node credential: the node it may act for.
    pub async fn node<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match self.authenticate(req).await? {
            Principal::Node(n) => Ok(n),
            _ => Err(Status::permission_denied(
                "agents authenticate with their node's credential (coop node enroll, then coop agent run --join)",
            )),
        }
    }

    /// Waits until this node has applied every acknowledged write (ReadIndex),
    /// so that what it answers next is current, on a follower too.
    pub async fn current(&self) -> Result<(), Status> {
        self.replica.read_current().await.map_err(propose_status)
    }

    /// Agents talk to the leader only (it alone schedules and watches them):
    /// elsewhere they are told where it is.
    pub fn leader_only(&self) -> Result<(), Status> {
        let view = self.replica.view().borrow().clone();
        if view.is_leader() {
            Ok(())
        } else {
            // Agents are sent to the leader's client listener.
            Err(propose_status(ProposeError::NotLeader(
                view.leader_client_address(),
            )))
        }
    }

    pub async fn operator<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.principal(req).await? {
            Principal::Operator => Ok(()),
            Principal::Member(m) => Err(Status::permission_denied(format!(
                "member {m} may not do this: operator only"
            ))),
            Principal::Auditor(a) => Err(Status::permission_denied(format!(
                "auditor {a} may not do this: operator only"
            ))),
            Principal::Node(_) => unreachable!("refused by principal"),
        }
    }
}

pub use crate::status::{LEADER_HEADER, NOT_APPLIED_HEADER, propose_status, rejection_status};

pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

pub fn parse_job_id(field: &str, s: &str) -> Result<uuid::Uuid, Status> {
    uuid::Uuid::parse_str(s.trim())
        .map_err(|_| invalid(field, format!("{s:?} is not a job id (a UUID)")))
}

pub fn kind_to_pb(k: JobKind) -> pb::JobKind {
    match k {
        JobKind::Finetune => pb::JobKind::Finetune,
        JobKind::Inference => pb::JobKind::Inference,
    }
}

pub fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::Lost => pb::JobState::Lost,
    }
}

pub fn state_from_pb(s: pb::JobState) -> Option<JobState> {
    Some(match s {
        pb::JobState::Unspecified => return None,
        pb::JobState::Pending => JobState::Pending,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Completed => JobState::Completed,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
        pb::JobState::Lost => JobState::Lost,
    })
}

pub fn job_to_pb(state: &State, job: &Job, now_ms: i64) -> pb::Job {
    pb::Job {
        id: job.id.to_string(),
        member: job.member.clone(),
        kind: kind_to_pb(job.spec.kind) as i32,
        state: state_to_pb(job.state) as i32,
        gpu_count: job.spec.gpus,
        gpus: job.gpus.clone(),
        node: job.node.clone().unwrap_or_default(),
        command: job.spec.command.clone(),
        gpu_model: job.spec.gpu_model.clone().unwrap_or_default(),
        min_gpu_memory_mb: job.spec.min_gpu_memory_mb,
        preemptible: job.spec.preemptible,
        exit_code: job.exit_code,
        attempts: job.attempts,
        submitted_at_ms: job.submitted_at_ms,
        started_at_ms: job.started_at_ms.unwrap_or(0),
        finished_at_ms: job.finished_at_ms.unwrap_or(0),
        cancel_requested: job.cancel_requested(),
        kill_grace_ms: job.spec.kill_grace_ms,
        reason: job.reason.clone(),
        gpu_ms: state.job_gpu_ms(job, now_ms),
        priority: job.spec.priority,
        time_limit_ms: job.spec.time_limit_ms,
        weighted_gpu_ms: job.weighted_gpu_ms,
        energy_mj: job.energy_mj,
        preemptions: job.preemptions,
        preempted_for: job
            .preempted_for()
            .map(|j| j.to_string())
            .unwrap_or_default(),
        cpu_millis: job.spec.isolation.cpu_millis,
        memory_mb: job.spec.isolation.memory_mb,
        image: job.spec.isolation.image.clone().unwrap_or_default(),
        gpu_utilization_pct: job.utilization_pct(),
        env_names: job.spec.env.keys().cloned().collect(),
        name: job.extra.name.clone(),
        workdir: job.extra.workdir.clone().unwrap_or_default(),
        after_ok: job.extra.after_ok.iter().map(|j| j.to_string()).collect(),
        after_any: job.extra.after_any.iter().map(|j| j.to_string()).collect(),
        nodes: job.spec.nodes,
        gpus_per_node: job.spec.gpus_per_node,
        parts: job
            .gang
            .iter()
            .flat_map(|g| g.parts.iter().enumerate())
            .map(|(rank, p)| pb::JobPart {
                rank: rank as u32,
                node: p.node.clone(),
                gpus: p.gpus.clone(),
                exit_code: p.end.as_ref().and_then(|e| e.exit_code),
                ended: p.end.is_some(),
                reason: p.end.as_ref().map(|e| e.reason.clone()).unwrap_or_default(),
                started_at_ms: p.started_at_ms.unwrap_or(0),
            })
            .collect(),
        held: job.held,
        array_id: job
            .array
            .as_ref()
            .map(|a| a.array.to_string())
            .unwrap_or_default(),
        array_task: job.array.as_ref().map(|a| a.task),
        array_limit: job.array.as_ref().map_or(0, |a| a.limit),
        wait_reason: String::new(),
        wait_detail: String::new(),
    }
}

/// Items per page when the caller names no limit, and the most it may name.
pub const DEFAULT_PAGE: usize = 500;
pub const MAX_PAGE: usize = 5000;
/// A page stays under this many bytes, whatever its items: well under the
/// 4 MiB a gRPC client accepts by default.
pub const PAGE_BYTES: usize = 3 << 20;

/// One page of `items`, which come in the order of their keys (`(key, item)`,
/// made lazily, so that items past the page cost nothing). The page token is
/// the last key returned; the next page starts after it. An item larger than
/// a page on its own is still returned alone, so that listing always moves on.
pub fn page<T: prost::Message>(
    items: impl Iterator<Item = (String, T)>,
    limit: u32,
) -> (Vec<T>, String) {
    let limit = match limit as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let (mut out, mut bytes, mut last) = (Vec::new(), 0usize, None);
    for (key, item) in items {
        let size = item.encoded_len() + 8;
        if out.len() == limit || (!out.is_empty() && bytes + size > PAGE_BYTES) {
            return (out, last.unwrap_or_default());
        }
        bytes += size;
        last = Some(key);
        out.push(item);
    }
    (out, String::new())
}

/// Whether `key` comes after the page token (every key does, with none).
pub fn after(key: &str, token: &str) -> bool {
    token.is_empty() || key > token
}

/// The page key of a job: submission order, then id.
pub fn job_key(job: &Job) -> String {
    // Offset so that times before 1970 (none in practice) still sort.
    format!(
        "{:020}/{}",
        (job.submitted_at_ms as i128 + (1i128 << 62)) as u64,
        job.id
    )
}

/// The member whose figures a caller may read: the operator and auditors any
/// (or all, with `asked` empty), a member only its own.
pub fn readable_member(who: &Principal, asked: &str) -> Result<Option<String>, Status> {
    match (who, asked.trim()) {
        (Principal::Operator | Principal::Auditor(_), "") => Ok(None),
        (Principal::Operator | Principal::Auditor(_), m) => Ok(Some(m.to_string())),
        (Principal::Node(n), _) => Err(Status::permission_denied(format!(
            "the credential of node {n} is for its agent only"
        ))),
        (Principal::Member(m), "") => Ok(Some(m.clone())),
        (Principal::Member(m), a) if a == m => Ok(Some(m.clone())),
        (Principal::Member(m), a) => Err(Status::permission_denied(format!(
            "member {m} may not read the figures of {a}"
        ))),
    }
}

/// May `who` see (and cancel) `job`?
pub fn may_access(who: &Principal, job: &Job) -> bool {
    match who {
        Principal::Operator => true,
        Principal::Member(m) => *m == job.member,
        Principal::Auditor(_) | Principal::Node(_) => false,
    }
}
