//! What Slurm and Nomad users expect of a scheduler: job names, working
//! directories, dependencies, holds, arrays, cancelling many jobs at once and
//! draining a node for maintenance. Pure, like the rest of the state machine:
//! every change here is an `Op` applied on every replica.

use std::collections::BTreeSet;

use uuid::Uuid;

use crate::commands::Rejection;
use crate::model::JobId;

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

pub use crate::model::{ArrayTask, Cordon, JobExtra};

fn invalid(field: &str, message: impl Into<String>) -> Rejection {
    Rejection::InvalidArgument {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Printable text of at most `max` characters, no control characters.
pub(crate) fn check_text(field: &str, s: &str, max: usize) -> Result<(), Rejection> {
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

#[cfg(test)]
mod tests;
