//! What agents report of runs: starts, usage, utilisation and ends, late
//! reports of runs cut off with their node, and implausible ones.

use super::{
    Event, JobId, JobKind, JobState, Rejection, RunReport, State, Stop, UsageRecord,
    billing::{ms_between, weighted_ms},
    jobs::restart_backoff,
};
use crate::ledger;

impl State {
    pub(super) fn report(
        &mut self,
        at: i64,
        node_name: &str,
        session: &str,
        seq: u64,
        report: &RunReport,
    ) -> Result<Vec<Event>, Rejection> {
        let node = self
            .nodes
            .get_mut(node_name)
            .ok_or_else(|| Rejection::NotFound(format!("node {node_name:?} does not exist")))?;
        if node.session != session {
            return Err(Rejection::FailedPrecondition(format!(
                "agent session {session} of node {node_name} is no longer registered"
            )));
        }
        // A node that went silent reports again once it has registered again
        // (which bounds what it may still bill of the runs it was cut off
        // from); refused, not acknowledged, so that nothing honest is lost.
        if !node.up {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node_name} is down: register again"
            )));
        }
        if seq <= node.last_seq {
            return Ok(vec![]); // already applied: a retransmission
        }
        node.last_seq = seq;
        // An implausible report is kept as evidence and bills nothing; a run
        // it says has ended still ends (the node could hold it hostage
        // otherwise), billed no further than before.
        let plausible = match self.check_report(at, node_name, report) {
            Ok(()) => true,
            Err(why) => {
                self.reject_report(at, node_name, report, &why);
                false
            }
        };
        if self.bill_cut_off(at, node_name, report, plausible) {
            return Ok(vec![]);
        }
        if self
            .jobs
            .get(&report.run().0)
            .is_some_and(|j| j.gang.is_some())
        {
            return self.part_report(at, node_name, report, plausible);
        }
        // A report about a run that is no longer current (requeued meanwhile, or
        // stopped after it was reassigned) is acknowledged and otherwise ignored.
        let current = |s: &State, job: &JobId, attempt: u32| {
            s.jobs.get(job).is_some_and(|j| {
                j.state == JobState::Running
                    && j.attempts == attempt
                    && j.node.as_deref() == Some(node_name)
            })
        };
        match report {
            RunReport::Started {
                job,
                attempt,
                at_ms,
            } => {
                if !plausible || !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                let j = self.jobs.get_mut(job).expect("checked");
                // Within the skew it is the agent's clock; billed from no
                // earlier than the placement and no later than now.
                let start = (*at_ms).clamp(j.placed_at_ms.min(at), at);
                j.started_at_ms = Some(start);
                j.billed_to_ms = start;
                Ok(vec![Event::Job(*job)])
            }
            RunReport::Usage {
                job,
                attempt,
                to_ms,
                energy_mj,
            } => {
                if !plausible || !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                self.bill(*job, (*to_ms).min(at), *energy_mj);
                Ok(vec![])
            }
            RunReport::Utilization {
                job,
                attempt,
                sum_pct,
                samples,
            } => {
                if plausible && current(self, job, *attempt) {
                    let j = self.jobs.get_mut(job).expect("checked");
                    j.run_utilization = (*sum_pct, *samples);
                }
                Ok(vec![])
            }
            RunReport::Lost {
                job,
                attempt,
                at_ms,
                reason,
                energy_mj,
            } => {
                if !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                let (end, energy) = self.run_end(*job, at, *at_ms, *energy_mj, plausible);
                self.close_run(*job, end, energy);
                self.after_lost_run(*job, end, &super::plausible::bounded_reason(reason));
                Ok(vec![Event::Job(*job), Event::Node(node_name.to_string())])
            }
            RunReport::Exited {
                job,
                attempt,
                at_ms,
                exit_code,
                reason,
                energy_mj,
            } => {
                if !current(self, job, *attempt) {
                    return Ok(vec![]);
                }
                let (end, energy) = self.run_end(*job, at, *at_ms, *energy_mj, plausible);
                self.close_run(*job, end, energy);
                let reason = super::plausible::bounded_reason(reason);
                self.after_exit(*job, at, end, *exit_code, reason);
                Ok(vec![Event::Job(*job), Event::Node(node_name.to_string())])
            }
        }
    }

    /// A run has exited at `end` with `exit_code`: why it was being stopped,
    /// or else its kind and code, decide what becomes of the job (see `Stop`).
    pub(super) fn after_exit(
        &mut self,
        id: JobId,
        at: i64,
        end: i64,
        exit_code: i32,
        reason: String,
    ) {
        let j = self.jobs.get_mut(&id).expect("an exited job");
        j.exit_code = Some(exit_code);
        j.reason = reason.clone();
        // A cancelled job keeps its `Stop::Cancel`.
        match j.stop {
            Some(Stop::Cancel) => {
                j.state = JobState::Cancelled;
                j.finished_at_ms = Some(end);
            }
            Some(Stop::Preempt { for_job }) => {
                j.reason = format!("preempted for job {for_job}");
                self.end_preempted(id, at.max(end));
            }
            Some(Stop::Requeue) => {
                let node = j.node.clone().unwrap_or_default();
                j.reason = format!("node {node} drained: requeued");
                self.requeue(id, at.max(end));
            }
            Some(Stop::TimeLimit) => {
                j.stop = None;
                j.state = JobState::Failed;
                j.finished_at_ms = Some(end);
                j.reason = format!("time limit of {} s reached", j.spec.time_limit_ms / 1000);
            }
            // A part of a multi-node run failed: the code is that part's.
            None | Some(Stop::PartEnded) => {
                j.stop = None;
                match j.spec.kind {
                    JobKind::Finetune => {
                        j.state = if exit_code == 0 {
                            JobState::Completed
                        } else {
                            JobState::Failed
                        };
                        j.finished_at_ms = Some(end);
                    }
                    JobKind::Inference => {
                        // A service is restarted, with a growing back-off if it
                        // keeps exiting quickly.
                        let backoff = restart_backoff(j.attempts);
                        j.reason = format!(
                            "exited with {exit_code}{}; restarting",
                            if reason.is_empty() {
                                String::new()
                            } else {
                                format!(" ({reason})")
                            }
                        );
                        self.requeue(id, at.max(end) + backoff);
                    }
                }
            }
        }
    }

    /// Bills a late report about a run cut off when its node went down: the
    /// agent measured it past the point the scheduler billed it to. Returns
    /// whether the report was about such a run.
    pub(super) fn bill_cut_off(
        &mut self,
        at: i64,
        node_name: &str,
        report: &RunReport,
        plausible: bool,
    ) -> bool {
        let (job, attempt, to_ms, energy_mj, last) = match report {
            RunReport::Usage {
                job,
                attempt,
                to_ms,
                energy_mj,
            } => (job, *attempt, *to_ms, *energy_mj, false),
            RunReport::Exited {
                job,
                attempt,
                at_ms,
                energy_mj,
                ..
            }
            | RunReport::Lost {
                job,
                attempt,
                at_ms,
                energy_mj,
                ..
            } => (job, *attempt, *at_ms, *energy_mj, true),
            RunReport::Started { .. } | RunReport::Utilization { .. } => return false,
        };
        let Some(node) = self.nodes.get_mut(node_name) else {
            return false;
        };
        let Some(i) = node
            .cut_off
            .iter()
            .position(|c| c.job == *job && c.attempt == attempt)
        else {
            return false;
        };
        let to_ms = to_ms.min(node.cut_off[i].deadline_ms.unwrap_or(i64::MAX));
        let cut = if last {
            node.cut_off.remove(i)
        } else {
            let c = &mut node.cut_off[i];
            let before = c.clone();
            if plausible {
                c.billed_to_ms = to_ms.min(at).max(c.billed_to_ms);
                c.energy_mj = c.energy_mj.saturating_add(energy_mj);
            }
            before
        };
        let Some(j) = self.jobs.get(job) else {
            return true;
        };
        if !plausible {
            return true;
        }
        let to = to_ms.min(at).max(cut.billed_to_ms);
        let gpu_ms = ms_between(cut.billed_to_ms, to).saturating_mul(cut.gpus as u64);
        if gpu_ms == 0 && energy_mj == 0 {
            return true;
        }
        let record = UsageRecord {
            job: *job,
            attempt,
            member: j.member.clone(),
            node: node_name.to_string(),
            model: cut.model,
            gpus: cut.gpus,
            start_ms: cut.billed_to_ms,
            end_ms: to,
            gpu_ms,
            weighted_gpu_ms: weighted_ms(gpu_ms, cut.weight_milli),
            energy_mj,
        };
        self.add_usage(record);
        true
    }

    /// Where and with what energy a run that a report ends is closed: at the
    /// reported time within the leader's clock, or, for an implausible
    /// report, where it was billed to already and with no energy.
    pub(super) fn run_end(
        &self,
        id: JobId,
        at: i64,
        at_ms: i64,
        energy_mj: u64,
        plausible: bool,
    ) -> (i64, u64) {
        let Some(j) = self.jobs.get(&id) else {
            return (at_ms.min(at), 0);
        };
        let floor = if j.started_at_ms.is_some() {
            j.billed_to_ms
        } else {
            j.placed_at_ms.min(at)
        };
        if plausible {
            (at_ms.min(at).max(floor), energy_mj)
        } else {
            (floor, 0)
        }
    }

    /// Keeps an implausible report as evidence: an audit entry, and a count
    /// per node for the metrics.
    pub(super) fn reject_report(&mut self, at: i64, node: &str, report: &RunReport, why: &str) {
        let (job, attempt) = report.run();
        self.record(
            at,
            ledger::Entry::ReportRejected {
                node: node.to_string(),
                job,
                attempt,
                report: report.kind().to_string(),
                reason: why.to_string(),
            },
        );
        let n = self.rejected_reports.entry(node.to_string()).or_default();
        *n = n.saturating_add(1);
    }
}
