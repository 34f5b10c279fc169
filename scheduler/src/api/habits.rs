//! Naming jobs the way people do: unique prefixes of ids (like git and
//! docker), `ARRAY_TASK`, and an array's id for all its tasks; and why each
//! pending job waits, from the same pass the leader makes.

use std::collections::{BTreeSet, HashMap};

use coop_proto::v1 as pb;
use tonic::Status;

use super::{invalid, may_access};
use coop_core::state::{JobId, JobState, Principal, State};

/// Fewest characters of an id prefix (git's minimum).
pub const MIN_PREFIX: usize = 4;
/// Candidates an ambiguity error names.
const SHOWN: usize = 10;

/// What an id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Job(JobId),
    /// An array's id: its tasks the caller may see.
    Array(JobId, Vec<JobId>),
}

impl Target {
    pub fn jobs(self) -> Vec<JobId> {
        match self {
            Target::Job(j) => vec![j],
            Target::Array(_, tasks) => tasks,
        }
    }
}

fn not_found(field: &str, input: &str) -> Status {
    Status::not_found(format!("{field}: job {input} does not exist"))
}

/// The tasks of array `array` that `who` may see, in task order.
fn tasks_of(state: &State, who: &Principal, array: JobId) -> Vec<JobId> {
    let mut tasks: Vec<(u32, JobId)> = state
        .jobs
        .values()
        .filter(|j| may_access(who, j))
        .filter_map(|j| {
            j.array
                .as_ref()
                .filter(|a| a.array == array)
                .map(|a| (a.task, j.id))
        })
        .collect();
    tasks.sort();
    tasks.into_iter().map(|(_, j)| j).collect()
}

/// The longest id a caller may type (a uuid is 36; `ARRAY_TASK` a few more).
const MAX_ID_INPUT: usize = 64;

/// Resolves what a caller typed: a full id (as before: another member's job
/// is PERMISSION_DENIED), `ARRAY_TASK`, or a prefix of at least
/// `MIN_PREFIX` hex digits, matched only against jobs and arrays the caller
/// may see, so that an ambiguity names none of another member's ids.
pub fn resolve(state: &State, who: &Principal, field: &str, input: &str) -> Result<Target, Status> {
    // A uuid with its dashes and a task index fit well within this.
    if input.len() > MAX_ID_INPUT {
        return Err(invalid(
            field,
            format!("{} characters is not a job id", input.len()),
        ));
    }
    let s = input.trim().to_ascii_lowercase();
    if let Some((array, task)) = s.split_once('_') {
        if array.is_empty() || task.contains('_') {
            return Err(invalid(field, format!("{input:?} is not ARRAY_TASK")));
        }
        let task: u32 = task
            .parse()
            .map_err(|_| invalid(field, format!("{input:?}: {task:?} is not a task index")))?;
        let Target::Array(a, tasks) = resolve(state, who, field, array)? else {
            return Err(invalid(
                field,
                format!("{array} is a job, not a job array: drop _{task}"),
            ));
        };
        return tasks
            .into_iter()
            .find(|t| state.jobs[t].array.as_ref().is_some_and(|x| x.task == task))
            .map(Target::Job)
            .ok_or_else(|| {
                Status::not_found(format!("{field}: job array {a} has no task {task}"))
            });
    }
    if let Ok(id) = uuid::Uuid::parse_str(&s) {
        if let Some(job) = state.jobs.get(&id) {
            if !may_access(who, job) {
                return Err(Status::permission_denied(format!(
                    "job {id} belongs to another member"
                )));
            }
            return Ok(Target::Job(id));
        }
        let tasks = tasks_of(state, who, id);
        if tasks.is_empty() {
            return Err(not_found(field, &s));
        }
        return Ok(Target::Array(id, tasks));
    }
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() < MIN_PREFIX || !hex.chars().all(|c| c.is_ascii_hexdigit()) || hex.len() > 32 {
        return Err(invalid(
            field,
            format!(
                "{input:?} is not a job id: give the id, at least {MIN_PREFIX} of its first characters, or ARRAY_TASK"
            ),
        ));
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let mut jobs = BTreeSet::new();
    let mut arrays = BTreeSet::new();
    for j in state.jobs.values().filter(|j| may_access(who, j)) {
        if j.id.simple().encode_lower(&mut buf).starts_with(&hex) {
            jobs.insert(j.id);
        }
        if let Some(a) = &j.array
            && a.array.simple().encode_lower(&mut buf).starts_with(&hex)
        {
            arrays.insert(a.array);
        }
    }
    match (jobs.len(), arrays.len()) {
        (1, 0) => Ok(Target::Job(*jobs.first().expect("one"))),
        (0, 1) => {
            let a = *arrays.first().expect("one");
            Ok(Target::Array(a, tasks_of(state, who, a)))
        }
        (0, 0) => Err(not_found(field, input.trim())),
        (n, m) => {
            let names: Vec<String> = jobs
                .iter()
                .map(|j| j.to_string())
                .chain(arrays.iter().map(|a| format!("{a} (array)")))
                .take(SHOWN)
                .collect();
            Err(invalid(
                field,
                format!(
                    "{} is ambiguous: it begins {} ids: {}{} (give more characters)",
                    input.trim(),
                    n + m,
                    names.join(", "),
                    if n + m > SHOWN { ", ..." } else { "" }
                ),
            ))
        }
    }
}

/// One job (an array's id is refused: it names several).
pub fn resolve_one(
    state: &State,
    who: &Principal,
    field: &str,
    input: &str,
) -> Result<JobId, Status> {
    match resolve(state, who, field, input)? {
        Target::Job(j) => Ok(j),
        Target::Array(a, tasks) => Err(invalid(
            field,
            format!(
                "{a} is a job array of {} tasks: name one as {}_N, or list them with coop job list --array {a}",
                tasks.len(),
                input.trim()
            ),
        )),
    }
}

/// Sets `wait_reason` and `wait_detail` of the pending jobs among `jobs`,
/// from one scheduling pass computed as the leader does (`coop fairshare`
/// shows the same reasons). Running jobs get no reason: their node says it.
pub fn fill_wait_reasons(
    state: &State,
    now: i64,
    decayed: &std::collections::BTreeMap<String, f64>,
    jobs: &mut [pb::Job],
) {
    let pending = pb::JobState::Pending as i32;
    if !jobs.iter().any(|j| j.state == pending) {
        return;
    }
    let pass = coop_core::placement::plan(state, now, decayed);
    let position: HashMap<JobId, usize> = pass
        .order
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i))
        .collect();
    for pj in jobs.iter_mut().filter(|j| j.state == pending) {
        let Some(job) = uuid::Uuid::parse_str(&pj.id)
            .ok()
            .and_then(|id| state.jobs.get(&id))
            .filter(|j| j.state == JobState::Pending)
        else {
            continue;
        };
        match pass.wait_of(job, position.get(&job.id).copied()) {
            Some(w) => {
                pj.wait_reason = w.code().to_string();
                pj.wait_detail = w.to_string();
            }
            None => {
                pj.wait_reason = "Starting".into();
                pj.wait_detail = "placed in this pass: starting".into();
            }
        }
    }
}
