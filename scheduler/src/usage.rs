//! Per-member usage figures, derived from the state (no I/O).

use std::collections::BTreeMap;

use crate::state::{JobState, State};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberUsage {
    pub member: String,
    pub gpu_ms: u64,
    pub running_jobs: u32,
    pub running_gpus: u32,
    pub pending_jobs: u32,
    pub finished_jobs: u32,
}

/// Usage of every member (or just `only`), counting running jobs up to `now_ms`.
pub fn member_usage(state: &State, now_ms: i64, only: Option<&str>) -> Vec<MemberUsage> {
    let mut by: BTreeMap<&str, MemberUsage> = state
        .members
        .keys()
        .filter(|m| only.is_none_or(|o| o == m.as_str()))
        .map(|m| {
            (
                m.as_str(),
                MemberUsage {
                    member: m.clone(),
                    ..Default::default()
                },
            )
        })
        .collect();
    for job in state.jobs.values() {
        let Some(u) = by.get_mut(job.member.as_str()) else {
            continue;
        };
        u.gpu_ms += state.job_gpu_ms(job, now_ms);
        match job.state {
            JobState::Running => {
                u.running_jobs += 1;
                u.running_gpus += job.spec.gpus;
            }
            JobState::Pending => u.pending_jobs += 1,
            _ => u.finished_jobs += 1,
        }
    }
    by.into_values().collect()
}
