//! What a node's report may claim. An agent's machine belongs to one member
//! and its reports bill another, so nothing in them is taken as given: each
//! is checked against what the replicated state knows (the run's placement,
//! the leader's clock in the command, the run's GPUs) before anything is
//! billed. Pure, like the rest of the state machine.

use crate::state::{JobState, RunReport, State};

/// Agents' and schedulers' clocks may disagree by this much.
pub const MAX_CLOCK_SKEW_MS: i64 = 5_000;
/// No GPU board draws more (the largest today are about 1.2 kW).
pub const MAX_GPU_POWER_W: u64 = 1_500;
/// How long after its agent is back a run cut off with its node may still
/// bill: the agent stops runs it no longer owns with a 10 s grace; a minute
/// covers that and the reports' way to the leader.
pub const CUT_OFF_STOP_MS: i64 = 60_000;
/// Longest exit reason kept from an agent.
pub const MAX_REASON_BYTES: usize = 512;

/// The most energy GPUs with power limits summing to `watts` can draw in
/// `ms`: W × ms = mJ, with a tenth over for sensor overshoot and one clock
/// skew of slack for the interval.
pub fn energy_bound_mj(watts: u64, ms: i64) -> u64 {
    let ms = ms.max(0).saturating_add(MAX_CLOCK_SKEW_MS) as u64;
    watts.saturating_mul(ms).saturating_mul(11) / 10
}

/// A GPU's power limit for the bound: its enrolled one, or the largest any
/// board has where it gave none.
pub fn limit_w(enrolled_w: u32) -> u64 {
    match enrolled_w as u64 {
        0 => MAX_GPU_POWER_W,
        w => w.min(MAX_GPU_POWER_W),
    }
}

/// The reason, cut to a bounded length at a character boundary.
pub fn bounded_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

impl RunReport {
    /// The kind of report, as the audit ledger names it.
    pub fn kind(&self) -> &'static str {
        match self {
            RunReport::Started { .. } => "started",
            RunReport::Exited { .. } => "exited",
            RunReport::Usage { .. } => "usage",
            RunReport::Utilization { .. } => "utilization",
            RunReport::Lost { .. } => "lost",
        }
    }

    /// The run it is about: (job, attempt).
    pub fn run(&self) -> (crate::state::JobId, u32) {
        match self {
            RunReport::Started { job, attempt, .. }
            | RunReport::Exited { job, attempt, .. }
            | RunReport::Usage { job, attempt, .. }
            | RunReport::Utilization { job, attempt, .. }
            | RunReport::Lost { job, attempt, .. } => (*job, *attempt),
        }
    }

    /// The time it claims, where it claims one.
    pub fn time_ms(&self) -> Option<i64> {
        match self {
            RunReport::Started { at_ms, .. }
            | RunReport::Exited { at_ms, .. }
            | RunReport::Lost { at_ms, .. } => Some(*at_ms),
            RunReport::Usage { to_ms, .. } => Some(*to_ms),
            RunReport::Utilization { .. } => None,
        }
    }

    /// The energy it bills, where it bills any.
    pub fn energy_mj(&self) -> Option<u64> {
        match self {
            RunReport::Exited { energy_mj, .. }
            | RunReport::Lost { energy_mj, .. }
            | RunReport::Usage { energy_mj, .. } => Some(*energy_mj),
            RunReport::Started { .. } | RunReport::Utilization { .. } => None,
        }
    }
}

impl State {
    /// The power limits of a run's GPUs, summed.
    pub fn run_power_w(&self, job: &crate::state::Job) -> u64 {
        self.power_w(job.node.as_deref().unwrap_or_default(), &job.gpus)
    }

    /// The power limits of `gpus` on `node`, summed.
    pub fn power_w(&self, node: &str, gpus: &[String]) -> u64 {
        let node = self.nodes.get(node);
        gpus.iter()
            .map(|u| {
                let enrolled = node
                    .and_then(|n| n.gpus.iter().find(|g| &g.uuid == u))
                    .map_or(0, |g| g.power_limit_w);
                limit_w(enrolled)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Whether `report` of `node`, applied at `at` (the leader's clock), is
    /// plausible; if not, why. A report about a run the node no longer has
    /// is not checked here: it bills nothing anyway.
    pub fn check_report(&self, at: i64, node: &str, report: &RunReport) -> Result<(), String> {
        if let Some(t) = report.time_ms()
            && t > at.saturating_add(MAX_CLOCK_SKEW_MS)
        {
            return Err(format!(
                "its time is {} ms ahead of the scheduler's clock",
                t.saturating_sub(at)
            ));
        }
        let (id, attempt) = report.run();
        let cut = self.nodes.get(node).and_then(|n| {
            n.cut_off
                .iter()
                .find(|c| c.job == id && c.attempt == attempt)
        });
        let current = self
            .jobs
            .get(&id)
            .filter(|j| j.state == JobState::Running && j.attempts == attempt)
            .and_then(|j| j.run_on(node));
        // What the report would bill: from where, for a run started when,
        // with how much energy billed for the run already, and the power
        // limits of its GPUs. The energy bound is over the whole run, so
        // that the slack of one skew is granted once, not per report.
        let billed = match (cut, current) {
            (Some(c), _) => {
                let w = match c.power_w {
                    0 => (c.gpus as u64).saturating_mul(MAX_GPU_POWER_W),
                    w => w,
                };
                // Entries from before run starts were kept: from where billed.
                let start = match c.started_at_ms {
                    0 => c.billed_to_ms,
                    s => s,
                };
                Some((c.billed_to_ms, start, c.energy_mj, w, c.deadline_ms))
            }
            (None, Some(j)) => j.started_at_ms.map(|s| {
                (
                    j.billed_to_ms,
                    s,
                    j.energy_mj,
                    self.power_w(node, j.gpus),
                    None,
                )
            }),
            _ => None,
        };
        match report {
            RunReport::Started { at_ms, .. } => {
                if let Some(j) = current {
                    if j.started_at_ms.is_some() {
                        // A second start would move where billing begins.
                        return Err("the run has already started".into());
                    }
                    if *at_ms < j.placed_at_ms.saturating_sub(MAX_CLOCK_SKEW_MS) {
                        return Err(format!(
                            "the run starts {} ms before it was placed",
                            j.placed_at_ms.saturating_sub(*at_ms)
                        ));
                    }
                }
            }
            RunReport::Utilization {
                sum_pct, samples, ..
            } => {
                // At most a reading a millisecond of each GPU since placement.
                let most = current.map_or(u64::MAX, |j| {
                    (at.saturating_sub(j.placed_at_ms).max(0) as u64)
                        .saturating_add(1000)
                        .saturating_mul(j.gpus.len() as u64)
                });
                if *sum_pct > samples.saturating_mul(100) || *samples > most {
                    return Err(format!(
                        "{samples} readings summing to {sum_pct} percent are not readings of this run"
                    ));
                }
            }
            RunReport::Usage { .. } | RunReport::Exited { .. } | RunReport::Lost { .. } => {
                let energy = report.energy_mj().unwrap_or(0);
                if let Some((from, start, so_far, watts, deadline)) = billed {
                    let to = report
                        .time_ms()
                        .unwrap_or(from)
                        .min(at)
                        .min(deadline.unwrap_or(i64::MAX))
                        .max(from);
                    let bound = energy_bound_mj(watts, to.saturating_sub(start));
                    if so_far.saturating_add(energy) > bound {
                        return Err(format!(
                            "{energy} mJ more, after {so_far} mJ, in {} ms of run is more than GPUs limited to {watts} W can draw ({bound} mJ at most)",
                            to.saturating_sub(start)
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_energy_bound_grows_with_gpus_and_time_and_never_overflows() {
        assert_eq!(energy_bound_mj(1_500, 0), 1_500 * 5_000 * 11 / 10);
        assert!(energy_bound_mj(600, 10_000) > energy_bound_mj(300, 10_000));
        assert!(energy_bound_mj(300, 20_000) > energy_bound_mj(300, 10_000));
        assert_eq!(energy_bound_mj(u64::MAX, i64::MAX), u64::MAX / 10);
        assert_eq!(energy_bound_mj(300, i64::MIN), energy_bound_mj(300, 0));
        assert_eq!(
            (limit_w(0), limit_w(700), limit_w(u32::MAX)),
            (1_500, 700, 1_500)
        );
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = bounded_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.chars().all(|c| c == 'é'));
        assert_eq!(bounded_reason("exit 1"), "exit 1");
    }
}
