//! What the state machine does with them: dependencies, arrays, holds,
//! batch cancels and node drains.

use super::*;
use crate::habits::*;

impl State {
    /// A dependency of `id` not met yet (the first one), if any.
    ///
    /// A dependency no longer in memory has met it: a job leaves memory only
    /// once it has ended and its retention passed, and had it ended otherwise
    /// than completed, an `afterok` on it would have cancelled the waiting
    /// job then (`settle_dependencies`) or refused its submission.
    pub fn unmet_dependency(&self, x: &JobExtra) -> Option<JobId> {
        let ok = x.after_ok.iter().find(|d| {
            self.jobs
                .get(d)
                .is_some_and(|j| j.state != JobState::Completed)
        });
        let any = || {
            x.after_any
                .iter()
                .find(|d| self.jobs.get(d).is_some_and(|j| !j.state.is_final()))
        };
        ok.or_else(any).copied()
    }

    /// Running tasks of each array (for `%N` limits).
    pub fn array_running(&self) -> BTreeMap<JobId, u32> {
        let mut out = BTreeMap::new();
        for j in self.running.iter().filter_map(|id| self.jobs.get(id)) {
            if let Some(a) = &j.array {
                *out.entry(a.array).or_default() += 1;
            }
        }
        out
    }

    /// Held, waiting for a dependency, or at its array's limit (given the
    /// array's running tasks).
    pub fn blocked(&self, id: JobId, array_running: &BTreeMap<JobId, u32>) -> Option<Blocked> {
        let j = self.jobs.get(&id)?;
        if j.held {
            return Some(Blocked::Held);
        }
        if let Some(d) = self.unmet_dependency(&j.extra) {
            return Some(Blocked::Dependency(d));
        }
        if let Some(a) = &j.array
            && a.limit > 0
            && array_running.get(&a.array).copied().unwrap_or(0) >= a.limit
        {
            return Some(Blocked::ArrayLimit(a.limit));
        }
        None
    }

    /// Checks a submission's dependencies: each exists, is `member`'s, and
    /// can still be met.
    pub(crate) fn check_dependencies(&self, member: &str, x: &JobExtra) -> Result<(), Rejection> {
        for d in x.after_ok.iter().chain(&x.after_any) {
            let Some(j) = self.jobs.get(d).filter(|j| j.member == member) else {
                // The same answer whether it exists or is another member's.
                return Err(invalid(
                    "dependency",
                    format!("job {d} does not exist among member {member}'s jobs"),
                ));
            };
            if x.after_ok.contains(d) && j.state.is_final() && j.state != JobState::Completed {
                return Err(invalid(
                    "dependency",
                    format!(
                        "job {d} has already ended {:?}: afterok can never be met",
                        j.state
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Submits one job, or (`array` given) one job per task.
    pub(crate) fn submit_with(
        &mut self,
        at: i64,
        id: JobId,
        member: &str,
        spec: &JobSpec,
        extra: &JobExtra,
        array: Option<&str>,
    ) -> Result<Vec<Event>, Rejection> {
        validate_extra(extra)?;
        if self.members.contains_key(member) {
            self.check_dependencies(member, extra)?;
        }
        let Some(array) = array else {
            let events = self.submit(at, id, member, spec)?;
            let job = self.jobs.get_mut(&id).expect("just submitted");
            job.extra = extra.clone();
            job.held = extra.hold;
            return Ok(events);
        };
        let (tasks, limit) = parse_array(array)?;
        if self.jobs.contains_key(&id)
            || self
                .jobs
                .values()
                .any(|j| j.array.as_ref().is_some_and(|a| a.array == id))
        {
            return Err(Rejection::AlreadyExists(format!("job {id} already exists")));
        }
        let max = self.policy.max_pending_jobs;
        if max > 0 {
            let pending = self
                .queue
                .iter()
                .filter(|(_, q)| self.jobs.get(q).is_some_and(|j| j.member == member))
                .count() as u64;
            if pending + tasks.len() as u64 > max {
                return Err(Rejection::ResourceExhausted {
                    field: "array".into(),
                    message: format!(
                        "member {member} has {pending} pending jobs; {} more tasks would pass the policy's max_pending of {max}",
                        tasks.len()
                    ),
                });
            }
        }
        // A task id that exists already (the same request resent is answered
        // before this, by its request id) refuses the whole array before
        // anything is added, so the rollback below only removes what this
        // call added.
        if let Some(&t) = tasks
            .iter()
            .find(|&&t| self.jobs.contains_key(&task_id(id, t)))
        {
            return Err(Rejection::AlreadyExists(format!(
                "job {} (task {t} of array {id}) exists already",
                task_id(id, t)
            )));
        }
        // All or nothing: the first task is checked as a whole submission
        // (spec, member, policy, a node it fits), then the rest follow it.
        let mut events = Vec::with_capacity(tasks.len());
        let saved_max = self.policy.max_pending_jobs;
        self.policy.max_pending_jobs = 0;
        let mut result = Ok(());
        for &t in &tasks {
            let tid = task_id(id, t);
            match self.submit(at, tid, member, spec) {
                Ok(e) => events.extend(e),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            let job = self.jobs.get_mut(&tid).expect("just submitted");
            job.extra = extra.clone();
            job.held = extra.hold;
            job.array = Some(ArrayTask {
                array: id,
                task: t,
                limit,
            });
        }
        self.policy.max_pending_jobs = saved_max;
        if let Err(e) = result {
            // Only the first task can fail (the rest are the same request),
            // and then nothing was added.
            for &t in &tasks {
                let tid = task_id(id, t);
                if let Some(j) = self.jobs.remove(&tid) {
                    self.queue.remove(&(j.submitted_at_ms, tid));
                }
            }
            return Err(e);
        }
        Ok(events)
    }

    /// Holds (or releases) pending jobs: a held job is not placed.
    pub(crate) fn hold_jobs(&mut self, ids: &[JobId], held: bool) -> Result<Vec<Event>, Rejection> {
        if ids.len() > MAX_IDS {
            return Err(invalid("ids", format!("at most {MAX_IDS} jobs")));
        }
        for id in ids {
            let j = self
                .jobs
                .get(id)
                .ok_or_else(|| Rejection::NotFound(format!("job {id} does not exist")))?;
            if j.state != JobState::Pending {
                return Err(Rejection::FailedPrecondition(format!(
                    "job {id} is {}: only pending jobs are {}",
                    format!("{:?}", j.state).to_lowercase(),
                    if held { "held" } else { "released" }
                )));
            }
        }
        let mut events = Vec::new();
        for id in ids {
            let j = self.jobs.get_mut(id).expect("checked");
            if j.held != held {
                j.held = held;
                events.push(Event::Job(*id));
            }
        }
        Ok(events)
    }

    /// Cancels each job that has not ended (ended ones are left as they are).
    pub(crate) fn cancel_jobs(&mut self, at: i64, ids: &[JobId]) -> Result<Vec<Event>, Rejection> {
        if ids.len() > MAX_IDS {
            return Err(invalid("ids", format!("at most {MAX_IDS} jobs")));
        }
        if let Some(id) = ids.iter().find(|id| !self.jobs.contains_key(id)) {
            return Err(Rejection::NotFound(format!("job {id} does not exist")));
        }
        let mut events = Vec::new();
        for id in ids {
            if !self.jobs[id].state.is_final() && !self.jobs[id].cancel_requested() {
                events.extend(self.cancel(at, *id)?);
            }
        }
        Ok(events)
    }

    /// The operator's drain: nothing new is placed on `node`; with `requeue`
    /// its runs are stopped (with their grace) and go back to the queue.
    pub(crate) fn cordon(
        &mut self,
        at: i64,
        node: &str,
        reason: &str,
        by: &str,
        requeue: bool,
    ) -> Result<Vec<Event>, Rejection> {
        check_text("reason", reason, MAX_DRAIN_REASON)?;
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| Rejection::NotFound(format!("node {node:?} does not exist")))?;
        n.cordon = Some(Cordon {
            reason: reason.to_string(),
            at_ms: at,
            by: by.to_string(),
        });
        let running: BTreeSet<JobId> = n.gpus.iter().filter_map(|g| g.job).collect();
        let mut events = vec![Event::Node(node.to_string())];
        if requeue {
            for id in running {
                let j = self.jobs.get_mut(&id).expect("GPUs hold known jobs");
                if j.state == JobState::Running && !j.stopping() {
                    j.request_stop(crate::state::Stop::Requeue);
                    j.reason = format!("node {node} drained: requeued");
                    events.push(Event::Job(id));
                }
            }
        }
        Ok(events)
    }

    pub(crate) fn resume_node(&mut self, node: &str) -> Result<Vec<Event>, Rejection> {
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| Rejection::NotFound(format!("node {node:?} does not exist")))?;
        n.cordon = None;
        Ok(vec![Event::Node(node.to_string())])
    }

    /// After a command: pending jobs whose afterok dependency ended other
    /// than completed are cancelled, with the reason (and so on down the line).
    pub(crate) fn settle_dependencies(&mut self, at: i64, events: &mut Vec<Event>) {
        let mut ended: Vec<JobId> = events
            .iter()
            .filter_map(|e| match e {
                Event::Job(id) => Some(*id),
                _ => None,
            })
            .filter(|id| {
                self.jobs
                    .get(id)
                    .is_some_and(|j| j.state.is_final() && j.state != JobState::Completed)
            })
            .collect();
        let mut seen: BTreeSet<JobId> = BTreeSet::new();
        while let Some(dep) = ended.pop() {
            if !seen.insert(dep) {
                continue;
            }
            let state = self.jobs[&dep].state;
            let waiting: Vec<JobId> = self
                .queue
                .iter()
                .map(|(_, id)| *id)
                .filter(|id| self.jobs[id].extra.after_ok.contains(&dep))
                .collect();
            for id in waiting {
                let j = self.jobs.get_mut(&id).expect("queued jobs exist");
                j.state = JobState::Cancelled;
                j.finished_at_ms = Some(at);
                j.reason = format!(
                    "dependency {dep} {}",
                    match state {
                        JobState::Failed => "failed",
                        JobState::Cancelled => "was cancelled",
                        JobState::Lost => "was lost",
                        _ => "did not complete",
                    }
                );
                let key = (j.submitted_at_ms, id);
                self.queue.remove(&key);
                events.push(Event::Job(id));
                ended.push(id);
            }
        }
    }
}
