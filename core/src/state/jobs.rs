//! A job's life: submission, placement, preemption, cancellation, the time
//! limit, and what happens when a run ends through no fault of its own.

use std::collections::BTreeSet;

use super::{
    Event, Job, JobId, JobKind, JobSpec, JobState, Rejection, State, Stop, gpu_fits, invalid,
    largest_class, validate_spec,
};
use crate::ledger;

/// Failed finetune runs lost with their node are retried this many times in all.
pub const MAX_ATTEMPTS: u32 = 3;

/// Services that keep exiting are restarted after 1 s, 2 s, 4 s ... up to this.
pub const MAX_RESTART_BACKOFF_MS: i64 = 60_000;

impl State {
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
        self.check_shape(spec)?;
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
                stop: None,
                not_before_ms: at,
                reason: String::new(),
                gpu_ms: 0,
                weighted_gpu_ms: 0,
                energy_mj: 0,
                billed_to_ms: 0,
                preemptions: 0,
                preemptions_caused: 0,
                utilization: (0, 0),
                run_utilization: (0, 0),
                nominated_node: None,
                placed_at_ms: 0,
                run_energy_mj: 0,
                extra: Default::default(),
                held: false,
                array: None,
                gang: None,
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
            JobState::Running => job.request_stop(Stop::Cancel),
            s => {
                return Err(Rejection::FailedPrecondition(format!(
                    "job {id} has already ended ({s:?})"
                )));
            }
        }
        Ok(vec![Event::Job(id)])
    }

    /// Whether job `id` may be placed now, wherever it goes.
    pub(super) fn check_placeable(&self, at: i64, id: JobId) -> Result<(), Rejection> {
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
        Ok(())
    }

    /// Node `name`, if new runs may be placed on it.
    pub(super) fn usable_node(&self, node_name: &str) -> Result<&crate::model::Node, Rejection> {
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
                "node {node_name} is draining: its agent is leaving or giving up a lost GPU"
            )));
        }
        if let Some(c) = &node.cordon {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node_name} is drained: {}",
                c.reason
            )));
        }
        Ok(node)
    }

    pub(super) fn place(
        &mut self,
        at: i64,
        id: JobId,
        node_name: &str,
        gpus: &[String],
    ) -> Result<Vec<Event>, Rejection> {
        self.check_placeable(at, id)?;
        let job = self.job(id)?;
        let node = self.usable_node(node_name)?;
        // One node it is, when this one holds a job that asks for no split
        // (the common case: no look at every node on each placement).
        let spec = &job.spec;
        let here = spec.nodes == 0
            && spec.gpus_per_node == 0
            && largest_class(node, spec) >= spec.gpus as usize;
        if !here && let Some((n, _)) = self.shape_of(spec).filter(|(n, _)| *n != 1) {
            return Err(invalid(
                "node",
                format!("job {id} runs on {n} nodes: it is placed on all at once"),
            ));
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
            free_gpu(node, uuid, &job.spec)?;
        }
        let node = self.nodes.get_mut(node_name).expect("checked above");
        for g in node.gpus.iter_mut().filter(|g| gpus.contains(&g.uuid)) {
            g.job = Some(id);
        }
        self.start_run(at, id, node_name, gpus);
        Ok(vec![Event::Job(id), Event::Node(node_name.to_string())])
    }

    /// A placed job's new run: out of the queue, running on `gpus`.
    pub(super) fn start_run(&mut self, at: i64, id: JobId, node_name: &str, gpus: &[String]) {
        let job = self.jobs.get_mut(&id).expect("a placed job");
        self.queue.remove(&(job.submitted_at_ms, id));
        self.running.insert(id);
        job.state = JobState::Running;
        job.node = Some(node_name.to_string());
        job.gpus = gpus.to_vec();
        job.gang = None;
        job.attempts += 1;
        job.started_at_ms = None;
        job.finished_at_ms = None;
        job.exit_code = None;
        job.reason.clear();
        job.nominated_node = None;
        job.placed_at_ms = at;
        job.run_energy_mj = 0;
    }

    pub(super) fn preempt(
        &mut self,
        at: i64,
        id: JobId,
        for_id: JobId,
    ) -> Result<Vec<Event>, Rejection> {
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
        self.record(at, entry);
        let job = self.jobs.get_mut(&id).expect("checked");
        job.request_stop(Stop::Preempt { for_job: for_id });
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

    pub(super) fn expire(&mut self, at: i64, id: JobId) -> Result<Vec<Event>, Rejection> {
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
        job.request_stop(Stop::TimeLimit);
        Ok(vec![Event::Job(id)])
    }

    /// A preempted run has stopped: back to the queue, ahead of nothing (its
    /// place in it is its submission time), with its attempts kept.
    pub(super) fn end_preempted(&mut self, id: JobId, at: i64) {
        let job = self.jobs.get_mut(&id).expect("preempted job exists");
        job.preemptions += 1;
        self.requeue(id, at);
    }

    /// The run's agent on `node` is gone: bill up to `end_ms` and put the job
    /// back in the queue, unless it was being cancelled or has used up its
    /// attempts. Of a multi-node run, only the part on `node` is lost (the
    /// others are stopped; see `gang`).
    pub(super) fn end_run_lost(&mut self, at: i64, id: JobId, node: &str, end_ms: i64, why: &str) {
        if self.jobs.get(&id).is_some_and(|j| j.gang.is_some()) {
            self.lose_part(at, id, node, end_ms, why);
            return;
        }
        self.close_run(id, end_ms, 0);
        self.after_lost_run(id, end_ms, why);
    }

    /// A run that ended through no fault of its job: the job goes back to the
    /// queue (or is lost for good after too many attempts).
    pub(super) fn after_lost_run(&mut self, id: JobId, end_ms: i64, why: &str) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        // Why it was being stopped decides, as for a run that exits, except
        // that a time limit fails no run that was lost anyway (see `Stop`).
        match job.stop {
            Some(Stop::Preempt { .. }) => {
                self.end_preempted(id, end_ms);
                return;
            }
            Some(Stop::Requeue) => {
                self.requeue(id, end_ms);
                return;
            }
            Some(Stop::TimeLimit | Stop::PartEnded) => job.stop = None,
            Some(Stop::Cancel) | None => {}
        }
        job.reason = format!("{why} during attempt {}", job.attempts);
        if job.cancel_requested() {
            job.state = JobState::Cancelled;
            job.finished_at_ms = Some(end_ms);
        } else if job.spec.kind == JobKind::Finetune && job.attempts >= MAX_ATTEMPTS {
            job.state = JobState::Lost;
            job.finished_at_ms = Some(end_ms);
        } else {
            self.requeue(id, end_ms);
        }
    }

    pub(super) fn requeue(&mut self, id: JobId, not_before: i64) {
        let job = self.jobs.get_mut(&id).expect("requeue of a known job");
        job.state = JobState::Pending;
        job.not_before_ms = not_before;
        job.stop = None;
        self.queue.insert((job.submitted_at_ms, id));
    }
}

/// GPU `uuid` of `node`, if it is free and meets `spec`'s model and memory.
pub(super) fn free_gpu<'a>(
    node: &'a crate::model::Node,
    uuid: &str,
    spec: &JobSpec,
) -> Result<&'a crate::model::Gpu, Rejection> {
    let gpu = node
        .gpus
        .iter()
        .find(|g| g.uuid == uuid)
        .ok_or_else(|| invalid("gpus", format!("{uuid} is not on node {}", node.name)))?;
    if gpu.job.is_some() {
        return Err(Rejection::FailedPrecondition(format!(
            "GPU {uuid} is not free"
        )));
    }
    if !gpu_fits(gpu, spec) {
        return Err(Rejection::FailedPrecondition(format!(
            "GPU {uuid} does not meet the job's model or memory request"
        )));
    }
    Ok(gpu)
}

pub(super) fn restart_backoff(attempts: u32) -> i64 {
    let exp = attempts.saturating_sub(1).min(16);
    (1000i64 << exp).min(MAX_RESTART_BACKOFF_MS)
}
