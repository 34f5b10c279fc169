//! UsageService: usage per member over a window, and the fair-share view.

use coop_proto::v1::{self as pb, usage_service_server::UsageService};
use tonic::{Request, Response, Status};

use super::{Ctx, invalid, readable_member};
use crate::clock::now_ms;
use crate::consensus::{archive, windows};
use crate::status::propose_status;
use coop_core::fairshare::{entitlements, factors, running_gpus, total_gpus};
use coop_core::placement::plan;
use coop_core::state::State;
use coop_core::usage::{Past, add_past_usage, live_statement, live_usage};

/// Waiting jobs a fair-share answer lists (the rest are counted).
const MAX_WAITING_SHOWN: usize = 1000;

pub struct Usage(pub Ctx);

/// A failure to read the stored history: the database, not the caller.
pub fn history_error(e: anyhow::Error) -> Status {
    Status::internal(format!("reading the history: {e:#}"))
}

fn check_member(state: &State, only: &Option<String>) -> Result<(), Status> {
    match only {
        Some(m) if !state.members.contains_key(m) => {
            Err(Status::not_found(format!("member: {m:?} does not exist")))
        }
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl UsageService for Usage {
    async fn get(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let who = self.0.principal(&req).await?;
        let r = req.into_inner();
        let only = readable_member(&who, &r.member)?;
        self.0.current().await?;
        let now = now_ms();
        let from = r.from_ms.max(0);
        let to = if r.to_ms == 0 { now } else { r.to_ms };
        if from > to {
            return Err(invalid("from_ms", "the window starts after it ends"));
        }
        // The live part under the lock, then the history up to the same entry.
        let (mut usage, ent, decayed, index) = {
            let (state, index) = self.0.replica.read_indexed();
            check_member(&state, &only)?;
            (
                live_usage(&state, now, from, to, only.as_deref()),
                entitlements(&state),
                coop_core::fairshare::usage(&state, now),
                index,
            )
        };
        let pool = self
            .0
            .replica
            .history_at(index)
            .await
            .map_err(propose_status)?;
        let member = only.as_deref();
        let window = windows::usage_window(pool, index, from, to, member)
            .await
            .map_err(history_error)?;
        let retired = archive::retired_finished_counts(pool, index, from, to, member)
            .await
            .map_err(history_error)?;
        let past = Past {
            usage: &window.records,
            sums: &window.sums,
            audit: &[],
            retired: &retired,
            ..Default::default()
        };
        add_past_usage(&mut usage, past, from, to);
        let factor = factors(&ent, &decayed);
        let members = usage
            .into_iter()
            .map(|u| pb::MemberUsage {
                entitlement: ent.get(&u.member).copied().unwrap_or(0.0),
                decayed_usage: decayed.get(&u.member).copied().unwrap_or(0.0),
                factor: factor.get(&u.member).copied().unwrap_or(0.0),
                member: u.member,
                gpu_ms: u.gpu_ms,
                running_jobs: u.running_jobs,
                running_gpus: u.running_gpus,
                pending_jobs: u.pending_jobs,
                finished_jobs: u.finished_jobs,
                weighted_gpu_ms: u.weighted_gpu_ms,
                energy_mj: u.energy_mj,
            })
            .collect();
        Ok(Response::new(pb::GetUsageResponse {
            members,
            as_of_ms: now,
            from_ms: from,
            to_ms: to,
        }))
    }

    async fn statement(
        &self,
        req: Request<pb::StatementRequest>,
    ) -> Result<Response<pb::MemberStatement>, Status> {
        let who = self.0.principal(&req).await?;
        let r = req.into_inner();
        self.0.current().await?;
        let member = readable_member(&who, &r.member)?
            .ok_or_else(|| invalid("member", "name the member the statement is for"))?;
        if r.from_ms <= 0 || r.to_ms <= r.from_ms {
            return Err(invalid("to_ms", "the period must start before it ends"));
        }
        let now = now_ms();
        let (mut st, index) = {
            let (state, index) = self.0.replica.read_indexed();
            check_member(&state, &Some(member.clone()))?;
            let st = live_statement(&state, &member, r.from_ms, r.to_ms, now);
            (st, index)
        };
        let pool = self
            .0
            .replica
            .history_at(index)
            .await
            .map_err(propose_status)?;
        let (from, to, m) = (r.from_ms, r.to_ms, Some(member.as_str()));
        let window = windows::usage_window(pool, index, from, to, m)
            .await
            .map_err(history_error)?;
        let jobs = windows::usage_jobs(pool, index, from, to, &member)
            .await
            .map_err(history_error)?;
        let preemptions = archive::audit_of_kind(pool, index, "preemption", from, to)
            .await
            .map_err(history_error)?;
        st.add_past(Past {
            usage: &window.records,
            sums: &window.sums,
            jobs: &jobs,
            audit: &preemptions,
            retired: &[],
        });
        Ok(Response::new(pb::MemberStatement {
            balance_weighted_gpu_ms: st.balance_weighted_gpu_ms(),
            member: st.member,
            from_ms: st.from_ms,
            to_ms: st.to_ms,
            by_model: st
                .by_model
                .into_iter()
                .map(|(model, (g, w, e))| pb::ModelUsage {
                    model,
                    gpu_ms: g,
                    weighted_gpu_ms: w,
                    energy_mj: e,
                })
                .collect(),
            jobs: st.jobs,
            preemptions_suffered: st.preemptions_suffered,
            preemptions_caused: st.preemptions_caused,
            contributed_gpu_ms: st.contributed_gpu_ms,
            contributed_weighted_gpu_ms: st.contributed_weighted_gpu_ms,
            as_of_ms: now,
        }))
    }

    async fn fair_share(
        &self,
        req: Request<pb::FairShareRequest>,
    ) -> Result<Response<pb::FairShareResponse>, Status> {
        let who = self.0.principal(&req).await?;
        let only = readable_member(&who, &req.into_inner().member)?;
        self.0.current().await?;
        let now = now_ms();
        let state = self.0.replica.read();
        check_member(&state, &only)?;
        let decayed = coop_core::fairshare::usage(&state, now);
        Ok(Response::new(fair_share_view(
            &state,
            now,
            &decayed,
            only.as_deref(),
        )))
    }
}

/// Everything `coop fairshare` shows, computed the way the leader's pass does.
pub fn fair_share_view(
    state: &State,
    now: i64,
    decayed: &std::collections::BTreeMap<String, f64>,
    only: Option<&str>,
) -> pb::FairShareResponse {
    let ent = entitlements(state);
    let factor = factors(&ent, decayed);
    let running = running_gpus(state);
    let total_usage: f64 = decayed.values().sum();
    let pass = plan(state, now, decayed);
    let visible = |m: &str| only.is_none_or(|o| o == m);
    let mut contributed: std::collections::BTreeMap<&str, u32> = Default::default();
    for n in state.nodes.values().filter(|n| n.up) {
        *contributed.entry(n.owner.as_str()).or_default() += n.gpus.len() as u32;
    }
    let members = state
        .members
        .keys()
        .filter(|m| visible(m))
        .map(|m| {
            let u = decayed.get(m).copied().unwrap_or(0.0);
            pb::MemberShare {
                member: m.clone(),
                entitlement: ent.get(m).copied().unwrap_or(0.0),
                decayed_usage: u,
                usage_fraction: if total_usage > 0.0 {
                    u / total_usage
                } else {
                    0.0
                },
                factor: factor.get(m).copied().unwrap_or(0.0),
                running_gpus: running.get(m).copied().unwrap_or(0),
                pending_jobs: state
                    .queue
                    .iter()
                    .filter(|(_, id)| state.jobs[id].member == *m)
                    .count() as u32,
                shares: state.policy.share(m),
                contributed_gpus: contributed.get(m.as_str()).copied().unwrap_or(0),
            }
        })
        .collect();
    let position: std::collections::BTreeMap<_, _> = pass
        .order
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32 + 1))
        .collect();
    let mut waiting: Vec<pb::WaitingJob> = state
        .queue
        .iter()
        .map(|(_, id)| &state.jobs[id])
        .filter(|j| visible(&j.member))
        .map(|j| pb::WaitingJob {
            job_id: j.id.to_string(),
            member: j.member.clone(),
            gpus: j.spec.gpus,
            position: position.get(&j.id).copied().unwrap_or(0),
            reason: match pass.wait_of(j, position.get(&j.id).map(|p| *p as usize - 1)) {
                Some(w) => w.to_string(),
                None => "placed in this pass: starting".to_string(),
            },
            priority: j.spec.priority,
            submitted_at_ms: j.submitted_at_ms,
        })
        .collect();
    waiting.sort_by_key(|w| (w.position == 0, w.position, w.submitted_at_ms));
    // The front of the line, so that the answer stays well under 4 MiB
    // however long the queue.
    let waiting_total = waiting.len() as u32;
    waiting.truncate(MAX_WAITING_SHOWN);
    pb::FairShareResponse {
        ordering: state.policy.ordering.as_str().to_string(),
        half_life_s: state.policy.half_life_s,
        members,
        waiting,
        waiting_total,
        gpus_total: total_gpus(state),
        as_of_ms: now,
    }
}
