//! Billing: a run's usage records, the model weights they are normalised by,
//! and the end of a run (its last interval, its GPUs freed).

use super::{Job, JobId, JobState, State, UsageRecord};
use crate::ledger;

impl State {
    /// Bills the current run of `id` from where it was billed to up to `to_ms`.
    /// A run that has not reported its start has no time to bill.
    pub(super) fn bill(&mut self, id: JobId, to_ms: i64, energy_mj: u64) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.started_at_ms.is_none() {
            return;
        }
        let from = job.billed_to_ms;
        let to = to_ms.max(from);
        let (model, weight_milli) = self.run_weight(job);
        let gpu_ms = ms_between(from, to).saturating_mul(job.spec.gpus as u64);
        let weighted = weighted_ms(gpu_ms, weight_milli);
        let job = self.jobs.get_mut(&id).expect("checked");
        job.billed_to_ms = to;
        job.run_energy_mj = job.run_energy_mj.saturating_add(energy_mj);
        if gpu_ms == 0 && energy_mj == 0 {
            return;
        }
        let record = UsageRecord {
            job: id,
            attempt: job.attempts,
            member: job.member.clone(),
            node: job.node.clone().unwrap_or_default(),
            model,
            gpus: job.spec.gpus,
            start_ms: from,
            end_ms: to,
            gpu_ms,
            weighted_gpu_ms: weighted,
            energy_mj,
        };
        self.add_usage(record);
    }

    /// Adds a usage record to its job's and its member's totals and to the audit chain.
    pub(super) fn add_usage(&mut self, record: UsageRecord) {
        if let Some(j) = self.jobs.get_mut(&record.job) {
            j.gpu_ms = j.gpu_ms.saturating_add(record.gpu_ms);
            j.weighted_gpu_ms = j.weighted_gpu_ms.saturating_add(record.weighted_gpu_ms);
            j.energy_mj = j.energy_mj.saturating_add(record.energy_mj);
        }
        let hl = self.policy.half_life_s;
        self.decayed
            .entry(record.member.clone())
            .or_default()
            .add(&record, hl);
        // Stamped with the interval's end: when the usage happened.
        let at = record.end_ms;
        self.record(at, ledger::Entry::Usage(record));
    }

    /// Thousandths of a unit per GPU-hour of `model`: the declared weight, or
    /// where the policy weighs by measurement, the model's probed throughput
    /// against the reference; else one unit.
    pub fn weight_milli(&self, model: &str) -> u64 {
        let p = &self.policy;
        p.declared_weight_milli(model)
            .or_else(|| {
                let m = self.measured_models.get(model)?;
                p.measured_weight_milli(m.fp16_gflops)
            })
            .unwrap_or(crate::policy::UNIT_WEIGHT_MILLI)
    }

    /// The model of a run's GPUs and the policy's weight for it, in thousandths
    /// (the mean weight if a run ever held mixed models).
    pub fn run_weight(&self, job: &Job) -> (String, u64) {
        self.weight_of(job.node.as_deref().unwrap_or_default(), &job.gpus)
    }

    /// The model of `gpus` on `node` and the policy's weight for them (as
    /// `run_weight`).
    pub fn weight_of(&self, node: &str, gpus: &[String]) -> (String, u64) {
        let node = self.nodes.get(node);
        let models: Vec<&str> = gpus
            .iter()
            .filter_map(|u| node.and_then(|n| n.gpus.iter().find(|g| &g.uuid == u)))
            .map(|g| g.model.as_str())
            .collect();
        if models.is_empty() {
            return (String::new(), crate::policy::UNIT_WEIGHT_MILLI);
        }
        let sum = models
            .iter()
            .fold(0u64, |s, m| s.saturating_add(self.weight_milli(m)));
        (models[0].to_string(), sum / models.len() as u64)
    }

    /// Ends the current run of a running job, bills the rest of it, and frees its GPUs.
    pub(super) fn close_run(&mut self, id: JobId, end_ms: i64, energy_mj: u64) {
        self.bill(id, end_ms, energy_mj);
        self.running.remove(&id);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let (sum, n) = std::mem::take(&mut job.run_utilization);
        job.utilization = (
            job.utilization.0.saturating_add(sum),
            job.utilization.1.saturating_add(n),
        );
        let job = &self.jobs[&id];
        debug_assert!(job.gang.is_none(), "parts of a gang end one by one");
        if let Some(node) = job.node.as_ref().and_then(|n| self.nodes.get_mut(n)) {
            for g in node.gpus.iter_mut().filter(|g| g.job == Some(id)) {
                g.job = None;
            }
        }
    }

    /// GPU-milliseconds of a job: what is billed plus the running run's
    /// unbilled part up to `now_ms`.
    pub fn job_gpu_ms(&self, job: &Job, now_ms: i64) -> u64 {
        job.gpu_ms
            .saturating_add(unbilled_ms(job, now_ms).saturating_mul(live_gpus(job) as u64))
    }
}

/// Milliseconds from `from` to `to` (none when `to` is earlier).
pub(super) fn ms_between(from: i64, to: i64) -> u64 {
    to.saturating_sub(from).max(0) as u64
}

/// GPU-milliseconds times a weight in thousandths.
pub(super) fn weighted_ms(gpu_ms: u64, weight_milli: u64) -> u64 {
    u64::try_from(gpu_ms as u128 * weight_milli as u128 / 1000).unwrap_or(u64::MAX)
}

/// GPUs of the current run whose time is being billed: all of a one-node
/// run's; of a multi-node run, those of its parts that have started and
/// not ended (billed from `billed_to_ms`, the least of theirs).
pub fn live_gpus(job: &Job) -> u32 {
    match &job.gang {
        None => job.spec.gpus,
        Some(g) => g
            .parts
            .iter()
            .filter(|p| p.started_at_ms.is_some() && p.end.is_none())
            .map(|p| p.gpus.len() as u32)
            .sum(),
    }
}

/// Milliseconds of the current run not yet billed, up to `now_ms`.
pub fn unbilled_ms(job: &Job, now_ms: i64) -> u64 {
    match (job.state, job.started_at_ms) {
        (JobState::Running, Some(_)) => ms_between(job.billed_to_ms, now_ms),
        _ => 0,
    }
}
