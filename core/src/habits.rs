//! What Slurm and Nomad users expect of a scheduler: job names, working
//! directories, dependencies, holds, arrays, cancelling many jobs at once and
//! draining a node for maintenance. Pure, like the rest of the state machine:
//! every change here is an `Op` applied on every replica.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::{Event, JobId, JobSpec, JobState, Rejection, State};

/// Most characters of a job name.
pub const MAX_NAME: usize = 128;
/// Most bytes of a working directory.
pub const MAX_WORKDIR: usize = 1024;
/// Most jobs one job may wait for.
pub const MAX_DEPENDENCIES: usize = 64;
/// Most tasks of one job array.
pub const MAX_ARRAY_TASKS: u64 = 10_000;
/// Highest task index of an array (Slurm's MaxArraySize is similar).
pub const MAX_ARRAY_INDEX: u64 = 1_000_000;
/// Most characters of a drain reason.
pub const MAX_DRAIN_REASON: usize = 256;
/// Most jobs one hold, release or cancel names.
pub const MAX_IDS: usize = 10_000;

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

fn invalid(field: &str, message: impl Into<String>) -> Rejection {
    Rejection::InvalidArgument {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Printable text of at most `max` characters, no control characters.
fn check_text(field: &str, s: &str, max: usize) -> Result<(), Rejection> {
    if s.chars().count() > max {
        return Err(invalid(field, format!("at most {max} characters")));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(invalid(field, "must not hold control characters"));
    }
    Ok(())
}

/// Checks what can be checked without the state.
pub fn validate_extra(x: &JobExtra) -> Result<(), Rejection> {
    check_text("name", &x.name, MAX_NAME)?;
    if x.name.trim() != x.name {
        return Err(invalid("name", "must not start or end with blanks"));
    }
    if let Some(w) = &x.workdir {
        validate_workdir(w)?;
    }
    let deps = x.after_ok.len() + x.after_any.len();
    if deps > MAX_DEPENDENCIES {
        return Err(invalid(
            "dependency",
            format!("{deps} jobs; at most {MAX_DEPENDENCIES}"),
        ));
    }
    Ok(())
}

/// A working directory is relative to the run's own directory and stays in
/// it: no absolute path, no `..`. (The agent runs jobs as their own user
/// under root; a path out of the run's directory would be the agent's to
/// create.)
pub fn validate_workdir(w: &str) -> Result<(), Rejection> {
    if w.is_empty() || w.len() > MAX_WORKDIR {
        return Err(invalid(
            "workdir",
            format!("must be 1 to {MAX_WORKDIR} bytes"),
        ));
    }
    if w.chars().any(|c| c.is_control()) {
        return Err(invalid("workdir", "must not hold control characters"));
    }
    if w.starts_with('/') {
        return Err(invalid(
            "workdir",
            format!(
                "{w:?} is absolute; give a directory relative to the run's own directory (e.g. src/train)"
            ),
        ));
    }
    if w.split('/').any(|c| c == "..") {
        return Err(invalid(
            "workdir",
            format!("{w:?} leaves the run's own directory ('..')"),
        ));
    }
    Ok(())
}

/// The task indices of `--array` ("0-9", "1,3,5", "0-99:10" and "%N" for at
/// most N at once), in order, and the limit (0 = none). Sizes are checked
/// before anything is expanded.
pub fn parse_array(s: &str) -> Result<(Vec<u32>, u32), Rejection> {
    let bad = |why: String| invalid("array", why);
    let s = s.trim();
    let (list, limit) = match s.split_once('%') {
        Some((l, n)) => {
            let n: u32 = n
                .trim()
                .parse()
                .map_err(|_| bad(format!("{n:?} after '%' is not a number of tasks")))?;
            if n == 0 {
                return Err(bad("the '%' limit must be at least 1".into()));
            }
            (l, n)
        }
        None => (s, 0),
    };
    if list.is_empty() {
        return Err(bad("give tasks, e.g. 0-9, 1,3,5 or 0-9%2".into()));
    }
    let num = |t: &str| -> Result<u64, Rejection> {
        let n: u64 = t
            .trim()
            .parse()
            .map_err(|_| bad(format!("{t:?} is not a task index")))?;
        if n > MAX_ARRAY_INDEX {
            return Err(bad(format!("task index {n} is above {MAX_ARRAY_INDEX}")));
        }
        Ok(n)
    };
    let mut ranges = Vec::new();
    let mut count: u64 = 0;
    for part in list.split(',') {
        let (range, step) = match part.split_once(':') {
            Some((r, st)) => {
                let st = num(st)?;
                if st == 0 {
                    return Err(bad("a step must be at least 1".into()));
                }
                (r, st)
            }
            None => (part, 1),
        };
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let a = num(range)?;
                (a, a)
            }
        };
        if b < a {
            return Err(bad(format!("{range:?} runs backwards")));
        }
        count += (b - a) / step + 1;
        if count > MAX_ARRAY_TASKS {
            return Err(bad(format!("more than {MAX_ARRAY_TASKS} tasks")));
        }
        ranges.push((a, b, step));
    }
    let mut tasks = BTreeSet::new();
    for (a, b, step) in ranges {
        let mut i = a;
        while i <= b {
            tasks.insert(i as u32);
            i += step;
        }
    }
    Ok((tasks.into_iter().collect(), limit))
}

/// The job id of task `task` of array `array`: derived, so that every
/// replica makes the same one.
pub fn task_id(array: JobId, task: u32) -> JobId {
    Uuid::new_v5(&array, &task.to_le_bytes())
}

/// Why a pending job may not be placed yet, before resources are looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    Held,
    Dependency(JobId),
    ArrayLimit(u32),
}

impl State {
    /// A dependency of `id` not met yet (the first one), if any.
    pub fn unmet_dependency(&self, x: &JobExtra) -> Option<JobId> {
        let ok = x.after_ok.iter().find(|d| {
            self.jobs
                .get(d)
                .is_none_or(|j| j.state != JobState::Completed)
        });
        let any = || {
            x.after_any
                .iter()
                .find(|d| self.jobs.get(d).is_none_or(|j| !j.state.is_final()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_parse_as_slurm_writes_them_and_are_bounded_before_expanding() {
        assert_eq!(parse_array("0-3").unwrap(), (vec![0, 1, 2, 3], 0));
        assert_eq!(parse_array("1,3,5").unwrap(), (vec![1, 3, 5], 0));
        assert_eq!(parse_array("0-9%2").unwrap().1, 2);
        assert_eq!(parse_array("0-20:10").unwrap().0, vec![0, 10, 20]);
        assert_eq!(parse_array("3,1-2,3").unwrap().0, vec![1, 2, 3]);
        assert_eq!(parse_array("0-9999").unwrap().0.len(), 10_000);
        for bad in [
            "",
            "0-10000",
            "0-999999999",
            "5-1",
            "a",
            "1,,2",
            "0-9%0",
            "0-9%x",
            "-1",
            "0-4:0",
            "0-1000000,1-100000",
        ] {
            let e = parse_array(bad).unwrap_err();
            assert!(e.to_string().starts_with("array: "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn workdirs_stay_inside_the_run_directory() {
        assert!(validate_workdir("src/train").is_ok());
        assert!(validate_workdir("./a/b").is_ok());
        for bad in ["", "/etc", "..", "a/../..", "a/..", "x\ny"] {
            let e = validate_workdir(bad).unwrap_err();
            assert!(e.to_string().starts_with("workdir: "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names_are_bounded_printable_text() {
        let x = |name: &str| JobExtra {
            name: name.into(),
            ..Default::default()
        };
        assert!(validate_extra(&x("train-llama 7b")).is_ok());
        for bad in ["a\u{1b}[2J", "x\n", &"n".repeat(MAX_NAME + 1), " pad"] {
            let e = validate_extra(&x(bad)).unwrap_err();
            assert!(e.to_string().starts_with("name: "), "{bad:?}: {e}");
        }
    }

    use crate::state::{Command, GpuInfo, JobKind, Op};

    fn cluster() -> State {
        let mut s = State::default();
        let ops = [
            Op::Bootstrap {
                operator_token_hash: "op".into(),
                default_member: Some(("acme".into(), "h-acme".into())),
            },
            Op::AddMember {
                name: "bravo".into(),
                token_hash: "h-bravo".into(),
                expires_at_ms: None,
            },
            Op::RegisterNode {
                node: "n1".into(),
                owner: "acme".into(),
                gpus: (0..2)
                    .map(|i| GpuInfo {
                        uuid: format!("GPU-{i}"),
                        index: i,
                        model: "A100-80GB".into(),
                        memory_mb: 81_920,
                        measured: None,
                        power_limit_w: 0,
                    })
                    .collect(),
                session: "s".into(),
                orphaned_runs_end_ms: 0,
            },
        ];
        for op in ops {
            s.apply(&Command { at_ms: 1, op }).unwrap();
        }
        s
    }

    fn spec() -> JobSpec {
        JobSpec {
            kind: JobKind::Finetune,
            gpus: 1,
            command: vec!["true".into()],
            gpu_model: None,
            min_gpu_memory_mb: 0,
            preemptible: false,
            kill_grace_ms: 1000,
            priority: 0,
            time_limit_ms: 0,
            isolation: Default::default(),
            env: Default::default(),
        }
    }

    fn submit(
        s: &mut State,
        member: &str,
        extra: JobExtra,
        array: Option<&str>,
    ) -> Result<JobId, Rejection> {
        // Distinct ids without a random source (the core has none).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = Uuid::from_u128(
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .into(),
        );
        s.apply(&Command {
            at_ms: 10,
            op: Op::SubmitJobWith {
                id,
                member: member.into(),
                spec: Box::new(spec()),
                extra: Box::new(extra),
                array: array.map(String::from),
            },
        })?;
        Ok(id)
    }

    fn after_ok(ids: &[JobId]) -> JobExtra {
        JobExtra {
            after_ok: ids.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_failed_dependency_cancels_down_the_chain_and_others_are_refused() {
        let mut s = cluster();
        let a = submit(&mut s, "acme", JobExtra::default(), None).unwrap();
        let b = submit(&mut s, "acme", after_ok(&[a]), None).unwrap();
        let c = submit(&mut s, "acme", after_ok(&[b]), None).unwrap();
        assert_eq!(
            s.blocked(b, &s.array_running()),
            Some(Blocked::Dependency(a))
        );
        // Placing a job whose dependency is unmet is refused at apply.
        let place = Op::Place {
            job: b,
            node: "n1".into(),
            gpus: vec!["GPU-0".into()],
        };
        assert!(
            s.apply(&Command {
                at_ms: 11,
                op: place
            })
            .is_err()
        );
        s.apply(&Command {
            at_ms: 12,
            op: Op::CancelJob { id: a },
        })
        .unwrap();
        assert_eq!(s.jobs[&b].state, JobState::Cancelled);
        assert_eq!(s.jobs[&b].reason, format!("dependency {a} was cancelled"));
        assert_eq!(s.jobs[&c].reason, format!("dependency {b} was cancelled"));
        assert!(s.queue.is_empty());
        // Another member's job, a missing one, one that can never succeed.
        let before = s.clone();
        for (member, dep) in [
            ("bravo", a),
            ("acme", Uuid::from_u128(u128::MAX)),
            ("acme", a),
        ] {
            let e = submit(&mut s, member, after_ok(&[dep]), None).unwrap_err();
            assert!(e.to_string().starts_with("dependency: "), "{e}");
        }
        assert_eq!(s, before, "refused submissions change nothing");
    }

    #[test]
    fn holds_arrays_and_drains_gate_placement() {
        let mut s = cluster();
        let held = submit(
            &mut s,
            "acme",
            JobExtra {
                hold: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let place = |job: JobId, gpu: &str| Op::Place {
            job,
            node: "n1".into(),
            gpus: vec![gpu.into()],
        };
        assert!(
            s.apply(&Command {
                at_ms: 11,
                op: place(held, "GPU-0")
            })
            .is_err()
        );
        s.apply(&Command {
            at_ms: 12,
            op: Op::HoldJobs {
                ids: vec![held],
                held: false,
            },
        })
        .unwrap();
        // Drained: nothing is placed; resumed: it is.
        s.apply(&Command {
            at_ms: 13,
            op: Op::CordonNode {
                node: "n1".into(),
                reason: "maintenance".into(),
                by: "the operator".into(),
                requeue: false,
            },
        })
        .unwrap();
        assert!(
            s.apply(&Command {
                at_ms: 14,
                op: place(held, "GPU-0")
            })
            .is_err()
        );
        s.apply(&Command {
            at_ms: 15,
            op: Op::ResumeNode { node: "n1".into() },
        })
        .unwrap();
        s.apply(&Command {
            at_ms: 16,
            op: place(held, "GPU-0"),
        })
        .unwrap();
        // Only pending jobs are held.
        let hold = Op::HoldJobs {
            ids: vec![held],
            held: true,
        };
        assert!(
            s.apply(&Command {
                at_ms: 17,
                op: hold
            })
            .is_err()
        );
        // An array of 3 with %1: one task at a time, derived ids.
        let before = s.jobs.len();
        let array = submit(&mut s, "acme", JobExtra::default(), Some("0-2%1")).unwrap();
        assert_eq!(s.jobs.len(), before + 3);
        let t0 = task_id(array, 0);
        s.apply(&Command {
            at_ms: 18,
            op: place(t0, "GPU-1"),
        })
        .unwrap();
        assert_eq!(
            s.blocked(task_id(array, 1), &s.array_running()),
            Some(Blocked::ArrayLimit(1))
        );
        // Over max_pending: all or nothing.
        s.policy.max_pending_jobs = 3;
        let before = s.clone();
        let e = submit(&mut s, "acme", JobExtra::default(), Some("0-1")).unwrap_err();
        assert!(e.to_string().contains("max_pending"), "{e}");
        assert_eq!(s, before);
    }

    #[test]
    fn task_ids_are_derived_and_distinct() {
        let a = Uuid::from_u128(0x5eed);
        assert_eq!(task_id(a, 3), task_id(a, 3));
        assert_ne!(task_id(a, 3), task_id(a, 4));
        assert_ne!(task_id(a, 3), a);
    }
}
