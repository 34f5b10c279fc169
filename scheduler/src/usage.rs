//! Per-member usage figures over a time window, derived from the ledger (no I/O).

use std::collections::BTreeMap;

use crate::state::{JobState, State, unbilled_ms};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberUsage {
    pub member: String,
    pub gpu_ms: u64,
    pub weighted_gpu_ms: u64,
    pub energy_mj: u64,
    pub running_jobs: u32,
    pub running_gpus: u32,
    pub pending_jobs: u32,
    pub finished_jobs: u32,
}

/// The part of `value`, spread evenly over `[start, end]`, that falls in `[from, to]`.
fn pro_rata(value: u64, start: i64, end: i64, from: i64, to: i64) -> u64 {
    let (s, e) = (start.max(from), end.min(to));
    if end <= start {
        return if (from..=to).contains(&end) { value } else { 0 };
    }
    if e <= s {
        return 0;
    }
    (value as u128 * (e - s) as u128 / (end - start) as u128) as u64
}

/// Usage of every member (or just `only`) in `[from_ms, to_ms]`: billed ledger
/// intervals, cut pro rata at the window's edges, plus running jobs' unbilled
/// time up to `min(now_ms, to_ms)`. Job counts are as of now, except
/// `finished_jobs`: jobs that ended in the window.
pub fn member_usage(
    state: &State,
    now_ms: i64,
    from_ms: i64,
    to_ms: i64,
    only: Option<&str>,
) -> Vec<MemberUsage> {
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
    for r in &state.ledger {
        let Some(u) = by.get_mut(r.member.as_str()) else {
            continue;
        };
        u.gpu_ms += pro_rata(r.gpu_ms, r.start_ms, r.end_ms, from_ms, to_ms);
        u.weighted_gpu_ms += pro_rata(r.weighted_gpu_ms, r.start_ms, r.end_ms, from_ms, to_ms);
        u.energy_mj += pro_rata(r.energy_mj, r.start_ms, r.end_ms, from_ms, to_ms);
    }
    let end = now_ms.min(to_ms);
    for job in state.jobs.values() {
        let Some(u) = by.get_mut(job.member.as_str()) else {
            continue;
        };
        match job.state {
            JobState::Running => {
                u.running_jobs += 1;
                u.running_gpus += job.spec.gpus;
                if unbilled_ms(job, now_ms) > 0 {
                    let s = job.billed_to_ms.max(from_ms);
                    u.gpu_ms += (end - s).max(0) as u64 * job.spec.gpus as u64;
                }
            }
            JobState::Pending => u.pending_jobs += 1,
            _ => {
                if job
                    .finished_at_ms
                    .is_some_and(|f| (from_ms..=to_ms).contains(&f))
                {
                    u.finished_jobs += 1;
                }
            }
        }
    }
    by.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::pro_rata;

    #[test]
    fn pro_rata_cuts_at_the_window() {
        assert_eq!(pro_rata(100, 0, 100, 0, 100), 100);
        assert_eq!(pro_rata(100, 0, 100, 25, 75), 50);
        assert_eq!(pro_rata(100, 0, 100, 100, 200), 0);
        assert_eq!(pro_rata(7, 50, 50, 0, 100), 7);
        assert_eq!(pro_rata(7, 50, 50, 60, 100), 0);
    }
}
