//! The cluster's state machine: members, nodes, GPUs, jobs and the usage ledger.
//!
//! Pure and deterministic: `State::apply(&Command)` reads nothing but the state and
//! the command (time arrives inside the command, stamped by the proposer), so every
//! replica that applies the same log reaches the same state. It validates everything
//! it is told: a placement of a GPU that is no longer free is rejected here, not
//! trusted, and a rejected command changes nothing.
//!
//! By concern: `model` (what the state is made of), `commands` (what it is told
//! and how it refuses), `jobs` (a job's life: submit, place, preempt, stop,
//! requeue), `nodes` (registration and loss), `reports` (what agents say of
//! runs), `billing` (usage records and weights), `governance` (members and
//! policy), `validation` (checks that need no state) and `invariants` (what
//! holds after every command, checked in debug builds).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Setting};

pub mod accounts;
mod billing;
mod finished;
mod gang;
mod governance;
mod habits;
mod invariants;
mod jobs;
mod jobs_map;
mod nodes;
pub mod plausible;
mod reports;
mod validation;

pub use crate::commands::{Command, Event, Op, Rejection, RunReport};
pub use crate::model::{
    Capacity, CapacityRecord, CutOff, Gang, Gpu, GpuInfo, Isolation, Job, JobId, JobKind, JobSpec,
    JobState, Member, Node, Part, PartEnd, PolicyChange, Principal, Proposal, Stop, UsageRecord,
};
pub use billing::{live_gpus, unbilled_ms};
pub use gang::{FIRST_RENDEZVOUS_PORT, RunView, shape as gang_shape};
pub use governance::MAX_OPEN_PROPOSALS;
pub use jobs::{MAX_ATTEMPTS, MAX_RESTART_BACKOFF_MS};
pub use jobs_map::Jobs;
pub use validation::{
    MAX_ARGS, MAX_ENV_VARS, MAX_GPUS_PER_NODE, MAX_SPEC_BYTES, MAX_TIME_LIMIT_MS, gpu_fits,
    largest_class, reserved_env, valid_name, validate_spec,
};

use crate::commands::invalid;

/// Finished jobs one command moves out of memory at most (see `State::retire`).
pub const MAX_RETIRED_PER_COMMAND: usize = 1000;

/// The replicated state. Its large parts are persistent maps (`imbl`, and
/// [`Jobs`]): a clone shares them, so that the shell can hand readers and
/// snapshots the state as of an index without copying it; the small ones
/// (bounded by the members) are plain maps. Encoded alike either way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub operator_token_hash: Option<String>,
    pub default_member: Option<String>,
    pub members: imbl::OrdMap<String, Member>,
    pub tokens: imbl::OrdMap<String, Principal>,
    /// When tokens (by hash) stop working; absent: never.
    pub token_expiry: imbl::OrdMap<String, i64>,
    pub auditors: BTreeMap<String, crate::model::Auditor>,
    /// Unused join tokens by hash.
    pub enrollments: BTreeMap<String, crate::model::Enrollment>,
    /// The owner each enrolled node's credential was issued for.
    pub node_owners: imbl::OrdMap<String, String>,
    pub nodes: imbl::OrdMap<String, Node>,
    pub jobs: jobs_map::Jobs,
    /// Pending jobs in arrival order (an index over `jobs`).
    pub queue: imbl::OrdSet<(i64, JobId)>,
    /// Running jobs (an index over `jobs`).
    pub running: imbl::OrdSet<JobId>,
    /// Finished jobs by when they finished: they leave memory in this order
    /// once the policy's retention has passed (an index over `jobs`).
    pub finished: imbl::OrdSet<(i64, JobId)>,
    pub policy: Policy,
    pub policy_log: Vec<PolicyChange>,
    /// The head of the hash-chained audit ledger (see `ledger`); the records
    /// are in each replica's store.
    pub chain: crate::ledger::Head,
    /// Each member's billed usage, decayed: what fair share needs of the
    /// ledger (see `decay::Decayed`).
    pub decayed: BTreeMap<String, crate::decay::Decayed>,
    /// Each member's all-time usage and preemptions.
    pub totals: BTreeMap<String, crate::model::Totals>,
    /// Closed intervals of GPUs offered by members' nodes.
    pub capacity: imbl::Vector<CapacityRecord>,
    pub proposals: BTreeMap<u64, Proposal>,
    /// Mean probed throughput of each GPU model's registered GPUs (kept up to
    /// date at registration), for measured weights.
    pub measured_models: BTreeMap<String, Capacity>,
    /// Implausible reports per node, kept as evidence (see `plausible`).
    pub rejected_reports: BTreeMap<String, u64>,
    /// The GPUs each node registered first after it enrolled: a later
    /// registration may offer fewer of them, but no other or changed ones.
    pub inventory: imbl::OrdMap<String, Vec<GpuInfo>>,
    /// Members whose token is one they made themselves (rotated with their
    /// own token): only they vote, since the operator saw the token each
    /// member was given.
    pub self_keyed: BTreeSet<String>,
    /// `finished` by member (derived: see `finished::FinishedByMember`).
    #[serde(skip)]
    pub finished_of: finished::FinishedByMember,
    /// What applying added to the history since the shell last took it. Not
    /// replicated state: every replica makes the same, and stores it with the
    /// applied index.
    #[serde(skip)]
    pub outbox: Outbox,
}

/// History made by applying commands, for the replica's store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbox {
    /// New audit records, in chain order.
    pub records: Vec<crate::ledger::Record>,
    /// Finished jobs that left memory (their retention passed), final.
    pub retired: Vec<Job>,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.retired.is_empty()
    }

    /// The usage records among the new audit records.
    pub fn usage(&self) -> impl Iterator<Item = &UsageRecord> {
        self.records.iter().filter_map(|r| match &r.entry {
            crate::ledger::Entry::Usage(u) => Some(u),
            _ => None,
        })
    }
}

impl State {
    pub fn principal(&self, token_hash: &str) -> Option<&Principal> {
        self.tokens.get(token_hash)
    }

    pub(super) fn job(&self, id: JobId) -> Result<&Job, Rejection> {
        self.jobs
            .get(&id)
            .ok_or_else(|| Rejection::NotFound(format!("job {id} does not exist")))
    }

    /// Takes what applying added to the history since the last call.
    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// Links `entry` to the audit chain.
    pub(super) fn record(&mut self, at_ms: i64, entry: crate::ledger::Entry) {
        use crate::ledger::Entry;
        match &entry {
            Entry::Usage(u) => {
                let t = self.totals.entry(u.member.clone()).or_default();
                t.gpu_ms = t.gpu_ms.saturating_add(u.gpu_ms);
                t.weighted_gpu_ms = t.weighted_gpu_ms.saturating_add(u.weighted_gpu_ms);
                t.energy_mj = t.energy_mj.saturating_add(u.energy_mj);
            }
            Entry::Preemption {
                member, for_member, ..
            } => {
                self.totals
                    .entry(member.clone())
                    .or_default()
                    .preemptions_suffered += 1;
                self.totals
                    .entry(for_member.clone())
                    .or_default()
                    .preemptions_caused += 1;
            }
            _ => {}
        }
        let r = self.chain.link(at_ms, entry);
        self.outbox.records.push(r);
    }

    /// Moves finished jobs whose retention has passed by `at` out of memory
    /// (into the outbox, for the store), at most [`MAX_RETIRED_PER_COMMAND`]
    /// at a time: after a long quiet spell the rest follow with the next
    /// commands, so that no one entry makes an unbounded amount of history.
    fn retire(&mut self, at: i64) {
        let keep_ms = i64::try_from(self.policy.job_retention_s)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let mut budget = MAX_RETIRED_PER_COMMAND;
        while let Some(&(finished, id)) = self.finished.get_min() {
            if budget == 0 {
                break;
            }
            budget -= 1;
            if finished.saturating_add(keep_ms) > at {
                break;
            }
            self.finished.remove_min();
            if let Some(j) = self.jobs.get(&id) {
                self.finished_of.remove(&j.member, finished, id);
            }
            // An entry is stale when its job ran again since: skipped.
            let current = self
                .jobs
                .get(&id)
                .is_some_and(|j| j.state.is_final() && j.finished_at_ms == Some(finished));
            if current && let Some(job) = self.jobs.remove(&id) {
                self.outbox.retired.push(job);
            }
        }
    }

    /// Adds the jobs an apply finished to `finished`. Entries are not removed
    /// when a job runs again (that would need its old time): `retire` skips them.
    fn index_finished(&mut self, events: &[Event]) {
        for e in events {
            let Event::Job(id) = e else { continue };
            let Some(j) = self.jobs.get(id) else { continue };
            match j.finished_at_ms {
                Some(at) if j.state.is_final() => {
                    self.finished.insert((at, *id));
                    self.finished_of.insert(&j.member, at, *id);
                }
                // Ran again: its last finish no longer counts.
                Some(at) => self.finished_of.remove(&j.member, at, *id),
                None => {}
            }
        }
    }

    pub fn bootstrapped(&self) -> bool {
        self.operator_token_hash.is_some()
    }

    /// Applies one command. On `Err` nothing has changed. In debug builds the
    /// state's invariants (`State::check`) are checked after it, applied or not.
    pub fn apply(&mut self, cmd: &Command) -> Result<Vec<Event>, Rejection> {
        let result = self.apply_op(cmd).map(|mut events| {
            self.settle_dependencies(cmd.at_ms, &mut events);
            self.index_finished(&events);
            self.retire(cmd.at_ms);
            events
        });
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check() {
            panic!(
                "invariant broken after {} at {}: {broken}",
                invariants::op_name(&cmd.op),
                cmd.at_ms
            );
        }
        result
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
                address,
                site,
            } => self.register_node(
                at,
                node,
                owner,
                gpus,
                session,
                *orphaned_runs_end_ms,
                address,
                site,
            ),
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
            Op::PlaceGang { job, parts, port } => self.place_gang(at, *job, parts, *port),
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
}
