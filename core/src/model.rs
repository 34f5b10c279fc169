//! What the state is made of: members, nodes and their GPUs, jobs and their
//! specs, usage records, proposals.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    pub suspended: bool,
    /// Removed: no token, no jobs; kept for its ledger history.
    pub removed_at_ms: Option<i64>,
}

/// A member's all-time figures, kept as the chain grows (the records are in
/// the replicas' stores): what the metrics' counters show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub gpu_ms: u64,
    pub weighted_gpu_ms: u64,
    pub energy_mj: u64,
    pub preemptions_suffered: u64,
    pub preemptions_caused: u64,
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
    pub measured: Option<Capacity>,
    /// The board's power limit, W, as enrolled (0: unknown; see `plausible`).
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
    pub up_since_ms: i64,
    /// Runs ended by the node going down while its agent may still have run
    /// them: what that agent reports of them later is billed too.
    pub cut_off: Vec<CutOff>,
    /// Its agent is shutting down: nothing new is placed on it.
    pub draining: bool,
    /// Drained by the operator or its owner (`coop node drain`): nothing new
    /// is placed on it until `coop node resume`. Kept across registrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordon: Option<Cordon>,
    /// Where the node's processes reach each other (the agent's address, as
    /// it registered it): the rendezvous of multi-node runs. Empty: unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// A site or rack label (as its agent registered it; empty: none): the
    /// parts of a multi-node run are placed in one site where they fit.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site: String,
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
    /// The power limits of its GPUs, summed (0: unknown).
    pub power_w: u64,
    /// When the run started, and the energy billed for it so far: its
    /// energy stays within its GPUs' limits over its whole time.
    pub started_at_ms: i64,
    pub energy_mj: u64,
    /// Billed no later than this: set when the agent registers again, which
    /// then stops the run within the longest grace.
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
    /// The group the node is in under `rule`: a multi-node job's parts share
    /// one (`Any`: all nodes are one group).
    pub fn group(&self, rule: crate::policy::GangNodes) -> &str {
        use crate::policy::GangNodes;
        match rule {
            GangNodes::Any => "",
            GangNodes::Site => &self.site,
            GangNodes::Owner => &self.owner,
        }
    }

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

    pub(super) fn offered_until(&self, end_ms: i64) -> Vec<CapacityRecord> {
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
    pub priority: i32,
    /// A run is stopped and the job fails after this long (0 = no limit). Backfill
    /// uses it to know when GPUs will be free.
    pub time_limit_ms: u64,
    /// How the agent keeps the run apart from others.
    pub isolation: Isolation,
    /// Environment the member gives the run, on top of the agent's allowlist.
    pub env: BTreeMap<String, String>,
    /// Nodes a multi-node job spans (0: as few as its GPUs need; see `gang`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub nodes: u32,
    /// GPUs on each node of a multi-node job (0: `gpus` split evenly).
    #[serde(default, skip_serializing_if = "is_default")]
    pub gpus_per_node: u32,
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
    /// Why the current run is being stopped, if it is (see `Stop`). A job
    /// cancelled while it ran keeps `Stop::Cancel` once it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Not placed before this time (restart back-off of services).
    pub not_before_ms: i64,
    pub reason: String,
    /// GPU-milliseconds billed so far, over all runs.
    pub gpu_ms: u64,
    /// Normalised usage billed so far: GPU-milliseconds times the model weight.
    pub weighted_gpu_ms: u64,
    pub energy_mj: u64,
    /// The current run is billed up to here (agents report usage in intervals).
    pub billed_to_ms: i64,
    pub preemptions: u32,
    /// Runs of other members preempted to make room for this job.
    pub preemptions_caused: u32,
    /// GPU utilisation readings (sum of percents, count) of the finished
    /// runs, and of the current run so far.
    pub utilization: (u64, u64),
    pub run_utilization: (u64, u64),
    /// GPUs are being freed for this job on this node by preemption.
    pub nominated_node: Option<String>,
    /// When the current (or last) run was placed, by the leader's clock: no
    /// report of the run may start before it.
    pub placed_at_ms: i64,
    /// Energy billed for the current run so far (bounded by its GPUs' power
    /// limits over its time, see `plausible`).
    pub run_energy_mj: u64,
    /// Name, working directory, dependencies (see `habits`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub extra: JobExtra,
    /// Held (`coop job hold`): not placed until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// The job is one task of an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayTask>,
    /// The current (or last) run spans nodes: its parts, by rank. `node` is
    /// then rank 0's and `gpus` all of the run's; `started_at_ms` is the
    /// first part's start and `billed_to_ms` the least any part is billed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<Box<Gang>>,
}

/// A multi-node run: one process per node, started together, ended together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gang {
    /// Rank 0's rendezvous port (`MASTER_PORT`), chosen at placement.
    pub port: u16,
    pub parts: Vec<Part>,
    /// The rank whose failure or loss, applied first, stopped the others:
    /// it decides the job's fate (by the order the replicated log applied
    /// the parts' ends, not by their agents' clocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<u32>,
}

/// One node's share of a multi-node run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub node: String,
    pub gpus: Vec<String>,
    /// As the node's agent reported it.
    pub started_at_ms: Option<i64>,
    pub billed_to_ms: i64,
    /// Energy billed for this part in the current run.
    pub energy_mj: u64,
    pub utilization: (u64, u64),
    /// How it ended, once it has.
    pub end: Option<PartEnd>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEnd {
    pub at_ms: i64,
    /// None: lost (its node or agent went away).
    pub exit_code: Option<i32>,
    pub reason: String,
}

impl Gang {
    /// The rank of the part on `node`.
    pub fn rank_on(&self, node: &str) -> Option<usize> {
        self.parts.iter().position(|p| p.node == node)
    }

    /// A part failed or was lost (or, of a service, ended): the others
    /// must stop.
    pub fn broken(&self) -> bool {
        self.first_broken.is_some()
    }

    pub fn all_ended(&self) -> bool {
        self.parts.iter().all(|p| p.end.is_some())
    }
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

    /// The agent must stop the current run (cancel, preemption, requeue or
    /// time limit).
    pub fn stopping(&self) -> bool {
        self.stop.is_some()
    }

    /// How long the agent gives the current run between SIGTERM and SIGKILL
    /// once it is stopped: the policy's preemption grace for a preempted run
    /// (to checkpoint), the job's own otherwise, never more than the policy's
    /// longest (which may have been lowered since the job was submitted).
    pub fn stop_grace_ms(&self, policy: &Policy) -> u64 {
        if self.preempted_for().is_some() {
            policy.preempt_grace_s.saturating_mul(1000)
        } else {
            self.spec.kill_grace_ms
        }
        .min(policy.max_grace_s.saturating_mul(1000))
    }

    /// A cancel was asked for while the job ran.
    pub fn cancel_requested(&self) -> bool {
        self.stop == Some(Stop::Cancel)
    }

    /// The pending job the current run is being stopped for, if it is
    /// being preempted.
    pub fn preempted_for(&self) -> Option<JobId> {
        match self.stop {
            Some(Stop::Preempt { for_job }) => Some(for_job),
            _ => None,
        }
    }

    /// Asks the agent to stop the current run for `why`, unless it is being
    /// stopped already for a reason that takes precedence (`Stop::merge`).
    pub fn request_stop(&mut self, why: Stop) {
        self.stop = Some(Stop::merge(self.stop, why));
    }
}

/// Why a running job's current run is being stopped. The agent stops it (the
/// command's SIGTERM, a grace, SIGKILL); its exit or loss report then ends the
/// run, and the reason decides what becomes of the job:
///
/// | reason      | run exits                    | run is lost (node down, agent restart) |
/// |-------------|------------------------------|----------------------------------------|
/// | `Cancel`    | cancelled                    | cancelled                              |
/// | `Preempt`   | requeued, `preemptions` + 1  | requeued, `preemptions` + 1            |
/// | `Requeue`   | requeued                     | requeued                               |
/// | `TimeLimit` | failed ("time limit ... reached") | as if none: requeued, or lost after `MAX_ATTEMPTS` |
/// | `PartEnded` | as if none: by the code of the part that failed first | as if none |
///
/// One run has one reason. When a second arrives while the first is pending
/// the stronger one stands, in this order:
///
/// `Cancel` > `Preempt` > `Requeue` > `TimeLimit` = `PartEnded`
///
/// (`PartEnded` stops the other parts of a multi-node run when one failed or
/// was lost; a time limit after it does not fail the job for having run
/// long, nor does a part's failure after a time limit make it otherwise.)
///
/// A cancel overrides whatever was under way (a cancelled job never goes back
/// to the queue); a time limit never overrides anything (a run stopped for
/// another reason does not fail for having run long). Preempting or draining
/// a node with `--now` only picks runs that are not being stopped already, so
/// those two never meet each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// `coop job cancel` (or the member's removal).
    Cancel,
    /// To free GPUs for the pending job `for_job`; the run gets the policy's
    /// preemption grace to checkpoint.
    Preempt { for_job: JobId },
    /// Back to the queue: its node was drained with `--now`.
    Requeue,
    /// The run went past the spec's time limit.
    TimeLimit,
    /// A part of a multi-node run failed or was lost: the others stop, and
    /// the job's fate is decided once all have (see `State::end_gang`).
    PartEnded,
}

impl Stop {
    /// Rank in the precedence above: the higher wins.
    fn rank(self) -> u8 {
        match self {
            Stop::TimeLimit | Stop::PartEnded => 0,
            Stop::Requeue => 1,
            Stop::Preempt { .. } => 2,
            Stop::Cancel => 3,
        }
    }

    /// The reason that stands when `new` arrives while the run is already
    /// being stopped for `current`: the higher ranked, and on a tie the one
    /// that was there first.
    pub fn merge(current: Option<Stop>, new: Stop) -> Stop {
        match current {
            Some(c) if c.rank() >= new.rank() => c,
            _ => new,
        }
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
    pub model: String,
    pub gpus: u32,
    pub start_ms: i64,
    pub end_ms: i64,
    pub gpu_ms: u64,
    /// `gpu_ms` times the policy's weight of the model when it was billed.
    pub weighted_gpu_ms: u64,
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
    pub measured: Option<Capacity>,
    pub power_limit_w: u32,
}

// What members' habits add to jobs and nodes (see `habits`).

/// What a submission carries besides its `JobSpec` (kept apart so that the
/// spec stays as it was for older log entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobExtra {
    /// A label for people (`--name`); not unique.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Where the run starts, relative to the run's own directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Placed only once each of these has completed successfully; cancelled
    /// when one ends otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_ok: Vec<JobId>,
    /// Placed only once each of these has ended, however.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_any: Vec<JobId>,
    /// Submitted held: not placed until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

/// A job that is one task of an array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayTask {
    /// The array's id (not itself a job's).
    pub array: JobId,
    pub task: u32,
    /// At most this many tasks of the array run at once (0 = no limit).
    pub limit: u32,
}

/// An operator's drain of a node: nothing new is placed there until resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cordon {
    pub reason: String,
    pub at_ms: i64,
    pub by: String,
}

// Accounts other than members' (see `accounts`).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auditor {
    pub name: String,
    pub created_at_ms: i64,
}

/// An unused join token: whoever holds it may enroll the agent of `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub node: String,
    pub owner: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_overrides_any_stop_and_a_time_limit_none() {
        let p = Stop::Preempt {
            for_job: Uuid::nil(),
        };
        for s in [Stop::Cancel, p, Stop::Requeue, Stop::TimeLimit] {
            assert_eq!(Stop::merge(None, s), s);
            assert_eq!(Stop::merge(Some(s), Stop::Cancel), Stop::Cancel);
            assert_eq!(Stop::merge(Some(s), Stop::TimeLimit), s);
        }
        assert_eq!(Stop::merge(Some(p), Stop::Requeue), p);
        assert_eq!(Stop::merge(Some(Stop::Requeue), p), p);
    }

    #[test]
    fn a_record_missing_a_field_is_refused_not_defaulted() {
        let r = UsageRecord {
            job: Uuid::nil(),
            attempt: 1,
            member: "alice".into(),
            node: "n1".into(),
            model: "A100".into(),
            gpus: 1,
            start_ms: 0,
            end_ms: 1000,
            gpu_ms: 1000,
            weighted_gpu_ms: 1000,
            energy_mj: 5,
        };
        let mut v = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::from_value::<UsageRecord>(v.clone()).unwrap(), r);
        v.as_object_mut().unwrap().remove("weighted_gpu_ms");
        let err = serde_json::from_value::<UsageRecord>(v).unwrap_err();
        assert!(err.to_string().contains("weighted_gpu_ms"), "{err}");
    }

    #[test]
    fn a_stop_is_written_by_name() {
        let json = |s: Stop| serde_json::to_string(&s).unwrap();
        assert_eq!(json(Stop::TimeLimit), r#""time_limit""#);
        assert_eq!(
            json(Stop::Preempt {
                for_job: Uuid::nil()
            }),
            r#"{"preempt":{"for_job":"00000000-0000-0000-0000-000000000000"}}"#
        );
    }
}
