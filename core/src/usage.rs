//! Per-member usage figures over a time window, derived from the ledger (no I/O).
//!
//! The ledger is not in memory: the caller reads what a window needs from a
//! replica's store (by index) and passes it as [`Past`]; running jobs and
//! members come from the state.

use std::collections::{BTreeMap, BTreeSet};

use crate::ledger::{Entry, Record};
use crate::state::{JobId, State, UsageRecord, live_gpus, unbilled_ms};

/// What a window's figures need of the history, read from a store at the
/// applied index of the state the live part was read from: then every
/// record and every finished job counts once, in one part or the other.
#[derive(Debug, Clone, Copy, Default)]
pub struct Past<'a> {
    /// Usage records that overlap the window, cut pro rata at its edges
    /// (others are ignored). A store passes only those it did not sum.
    pub usage: &'a [UsageRecord],
    /// Records that count whole in the window (a store's rollups: each
    /// [`inside`] it, or of no length and in it), summed by member and
    /// model, and the jobs of the records inside it.
    pub sums: &'a [Sum],
    pub jobs: &'a [JobId],
    /// Audit records stamped in the window (others are ignored).
    pub audit: &'a [Record],
    /// How many jobs of each member finished in the window and had left memory.
    pub retired: &'a [(String, u64)],
}

/// Usage records wholly inside a window, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sum {
    pub member: String,
    pub model: String,
    pub gpu_ms: u64,
    pub weighted_gpu_ms: u64,
    pub energy_mj: u64,
}

/// Whether a record lies wholly inside `[from_ms, to_ms]` with a length: all
/// of it counts, uncut, whether the window is closed or half-open. The rule
/// a store sums by (`start_ms >= from AND end_ms <= to AND end_ms > start_ms`).
pub fn inside(r: &UsageRecord, from_ms: i64, to_ms: i64) -> bool {
    r.end_ms > r.start_ms && r.start_ms >= from_ms && r.end_ms <= to_ms
}

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
/// time up to `min(now_ms, to_ms)`, in GPU time and in units alike (weighted
/// as the run is billed). Energy is what the agents reported: a running job's
/// energy counts up to its last usage report, since nothing else is measured.
/// Job counts are as of now, except `finished_jobs`: jobs that ended in the window.
pub fn member_usage(
    state: &State,
    past: Past<'_>,
    now_ms: i64,
    from_ms: i64,
    to_ms: i64,
    only: Option<&str>,
) -> Vec<MemberUsage> {
    let mut usage = live_usage(state, now_ms, from_ms, to_ms, only);
    add_past_usage(&mut usage, past, from_ms, to_ms);
    usage
}

/// The part of [`member_usage`] the state holds: running jobs' unbilled
/// time, job counts, and jobs still in memory that finished in the window.
pub fn live_usage(
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
    let end = now_ms.min(to_ms);
    // From the indexes (`State::check` holds them complete): the jobs
    // running, pending and finished in the window, not every job in memory.
    for job in state.running.iter().filter_map(|id| state.jobs.get(id)) {
        let Some(u) = by.get_mut(job.member.as_str()) else {
            continue;
        };
        u.running_jobs += 1;
        u.running_gpus += job.spec.gpus;
        if unbilled_ms(job, now_ms) > 0 {
            let s = job.billed_to_ms.max(from_ms);
            let gpu_ms = (end - s).max(0) as u64 * live_gpus(job) as u64;
            let (_, weight_milli) = state.run_weight(job);
            u.gpu_ms += gpu_ms;
            u.weighted_gpu_ms += (gpu_ms as u128 * weight_milli as u128 / 1000) as u64;
        }
    }
    for (_, id) in &state.queue {
        if let Some(u) = state
            .jobs
            .get(id)
            .and_then(|j| by.get_mut(j.member.as_str()))
        {
            u.pending_jobs += 1;
        }
    }
    for (member, n) in state.finished_counts(from_ms, to_ms, only) {
        if let Some(u) = by.get_mut(member) {
            u.finished_jobs += n as u32;
        }
    }
    by.into_values().collect()
}

/// Adds the history's part to [`live_usage`]'s: billed intervals, cut pro
/// rata at the window's edges, and jobs that finished in it and left memory.
pub fn add_past_usage(usage: &mut [MemberUsage], past: Past<'_>, from_ms: i64, to_ms: i64) {
    let at: BTreeMap<String, usize> = usage
        .iter()
        .enumerate()
        .map(|(i, u)| (u.member.clone(), i))
        .collect();
    for r in past.usage {
        let Some(u) = at.get(&r.member).map(|&i| &mut usage[i]) else {
            continue;
        };
        u.gpu_ms += pro_rata(r.gpu_ms, r.start_ms, r.end_ms, from_ms, to_ms);
        u.weighted_gpu_ms += pro_rata(r.weighted_gpu_ms, r.start_ms, r.end_ms, from_ms, to_ms);
        u.energy_mj += pro_rata(r.energy_mj, r.start_ms, r.end_ms, from_ms, to_ms);
    }
    for s in past.sums {
        let Some(u) = at.get(&s.member).map(|&i| &mut usage[i]) else {
            continue;
        };
        u.gpu_ms += s.gpu_ms;
        u.weighted_gpu_ms += s.weighted_gpu_ms;
        u.energy_mj += s.energy_mj;
    }
    for (member, n) in past.retired {
        if let Some(&i) = at.get(member) {
            usage[i].finished_jobs += *n as u32;
        }
    }
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

/// What a member used and contributed over a period: the figures of a statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statement {
    pub member: String,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Per GPU model: GPU-ms, normalised (weighted) GPU-ms, energy in mJ.
    pub by_model: BTreeMap<String, (u64, u64, u64)>,
    /// Jobs that ran at some time in the period.
    pub jobs: u32,
    pub preemptions_suffered: u32,
    pub preemptions_caused: u32,
    /// GPU-ms the member's nodes offered, and weighted by the policy now.
    pub contributed_gpu_ms: u64,
    pub contributed_weighted_gpu_ms: u64,
    /// The jobs counted in `jobs`.
    pub job_ids: BTreeSet<JobId>,
}

impl Statement {
    /// Adds the history's part: billed intervals (cut pro rata at the
    /// period's edges) and preemptions.
    pub fn add_past(&mut self, past: Past<'_>) {
        let (from_ms, to_ms) = (self.from_ms, self.to_ms);
        for r in past.usage.iter().filter(|r| r.member == self.member) {
            let cut = |v| pro_rata(v, r.start_ms, r.end_ms, from_ms, to_ms);
            let (g, w, e) = (cut(r.gpu_ms), cut(r.weighted_gpu_ms), cut(r.energy_mj));
            // A record counts (its model listed, its job among the jobs)
            // when its interval meets the period's inside, or it brings
            // something to the period (one of no length on its edge).
            if g == 0 && w == 0 && e == 0 && !(r.start_ms < to_ms && r.end_ms > from_ms) {
                continue;
            }
            let m = self.by_model.entry(r.model.clone()).or_default();
            m.0 += g;
            m.1 += w;
            m.2 += e;
            self.job_ids.insert(r.job);
        }
        for s in past.sums.iter().filter(|s| s.member == self.member) {
            let e = self.by_model.entry(s.model.clone()).or_default();
            e.0 += s.gpu_ms;
            e.1 += s.weighted_gpu_ms;
            e.2 += s.energy_mj;
        }
        self.job_ids.extend(past.jobs.iter().copied());
        self.jobs = self.job_ids.len() as u32;
        for r in past
            .audit
            .iter()
            .filter(|r| r.at_ms >= from_ms && r.at_ms < to_ms)
        {
            if let Entry::Preemption {
                member: m,
                for_member,
                ..
            } = &r.entry
            {
                self.preemptions_suffered += (*m == self.member) as u32;
                self.preemptions_caused += (*for_member == self.member) as u32;
            }
        }
    }

    pub fn used_weighted_gpu_ms(&self) -> u64 {
        self.by_model.values().map(|v| v.1).sum()
    }

    /// Contributed minus used, in normalised GPU-ms: positive when the member
    /// gave the co-op more than it took.
    pub fn balance_weighted_gpu_ms(&self) -> i64 {
        self.contributed_weighted_gpu_ms as i64 - self.used_weighted_gpu_ms() as i64
    }
}

/// The statement of `member` for `[from_ms, to_ms)`, as of `now_ms`. Usage is
/// the ledger (cut pro rata at the edges) plus running jobs' time not yet
/// reported; contributed capacity counts the member's nodes while they were up.
pub fn statement(
    state: &State,
    past: Past<'_>,
    member: &str,
    from_ms: i64,
    to_ms: i64,
    now_ms: i64,
) -> Statement {
    let mut st = live_statement(state, member, from_ms, to_ms, now_ms);
    st.add_past(past);
    st
}

/// The part of [`statement`] the state holds: running jobs' unbilled time
/// and contributed capacity.
pub fn live_statement(
    state: &State,
    member: &str,
    from_ms: i64,
    to_ms: i64,
    now_ms: i64,
) -> Statement {
    let mut st = Statement {
        member: member.to_string(),
        from_ms,
        to_ms,
        ..Default::default()
    };
    let mut jobs = BTreeSet::new();
    let end = now_ms.min(to_ms);
    for j in state.running.iter().map(|id| &state.jobs[id]) {
        if j.member != member || unbilled_ms(j, now_ms) == 0 {
            continue;
        }
        let ms = (end - j.billed_to_ms.max(from_ms)).max(0) as u64;
        if ms == 0 {
            continue;
        }
        let (model, w) = state.run_weight(j);
        let e = st.by_model.entry(model).or_default();
        let gpus = live_gpus(j) as u64;
        e.0 += ms * gpus;
        e.1 += (ms as u128 * gpus as u128 * w as u128 / 1000) as u64;
        jobs.insert(j.id);
    }
    st.jobs = jobs.len() as u32;
    st.job_ids = jobs;
    let open = state
        .nodes
        .values()
        .flat_map(|n| n.offered_until_now(now_ms));
    for c in state.capacity.iter().cloned().chain(open) {
        if c.owner != member {
            continue;
        }
        let (s, e) = (c.start_ms.max(from_ms), c.end_ms.min(to_ms));
        if e <= s {
            continue;
        }
        let ms = (e - s) as u64 * c.gpus as u64;
        st.contributed_gpu_ms += ms;
        st.contributed_weighted_gpu_ms +=
            (ms as u128 * state.weight_milli(&c.model) as u128 / 1000) as u64;
    }
    st
}
