//! JobService: submit, get, list, cancel, logs, watch.

use std::pin::Pin;
use std::time::Duration;

use coop_proto::v1::{self as pb, job_service_server::JobService};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::habits::{Target, fill_wait_reasons, resolve, resolve_one};
use super::{
    Ctx, after, invalid, job_key, job_to_pb, may_access, page, parse_job_id, propose_status,
    rejection_status,
};
use crate::clock::now_ms;
use crate::replica::ProposeError;
use coop_core::habits::{JobExtra, MAX_IDS, validate_extra};
use coop_core::state::{
    Event, Isolation, JobKind, JobSpec, Op, Principal, Rejection, validate_spec,
};

pub struct Jobs(pub Ctx);

const DEFAULT_LOG_LIMIT: u32 = 1 << 20;

impl Jobs {
    /// The job if it exists and the caller may see it (NOT_FOUND / PERMISSION_DENIED).
    fn visible(&self, who: &Principal, id: uuid::Uuid) -> Result<pb::Job, Status> {
        let state = self.0.replica.read();
        let job = state
            .jobs
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("job {id} does not exist")))?;
        if !may_access(who, job) {
            return Err(Status::permission_denied(format!(
                "job {id} belongs to another member"
            )));
        }
        Ok(job_to_pb(&state, job, now_ms()))
    }

    /// The job the caller named, as the API shows it: one in memory, or by
    /// its full id one that finished long ago and is read from the store.
    async fn find(&self, who: &Principal, field: &str, input: &str) -> Result<pb::Job, Status> {
        let missing = match self.resolve_one(who, field, input) {
            Ok(id) => return self.visible(who, id),
            // Another member's job may hold an id that was the caller's once
            // (a client picks a submission's id): the caller's is then in the store.
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::NotFound | tonic::Code::PermissionDenied
                ) =>
            {
                e
            }
            Err(e) => return Err(e),
        };
        let Ok(id) = uuid::Uuid::parse_str(input.trim()) else {
            return Err(missing);
        };
        let (pool, index) = self.0.replica.history_now().await.map_err(propose_status)?;
        let versions = crate::consensus::archive::retired_versions(pool, index, id)
            .await
            .map_err(super::usage::history_error)?;
        let Some(job) = versions.iter().find(|j| may_access(who, j)) else {
            return Err(match versions.is_empty() {
                true => missing,
                false => Status::permission_denied(format!("job {id} belongs to another member")),
            });
        };
        Ok(job_to_pb(&self.0.replica.read(), job, now_ms()))
    }

    /// Refuses a chosen id that a job which has left memory had: the state
    /// no longer knows it, and the new job would share the old one's id in
    /// the store (no row is replaced, but two jobs under one id is a trap).
    /// Best effort: a node still copying its history lets it through.
    async fn check_reused_id(&self, member: &str, id: uuid::Uuid) -> Result<(), Status> {
        let Ok((pool, index)) = self.0.replica.history_now().await else {
            return Ok(());
        };
        let versions = crate::consensus::archive::retired_versions(pool, index, id)
            .await
            .map_err(super::usage::history_error)?;
        match versions.first() {
            None => Ok(()),
            Some(j) if j.member == member => Err(Status::already_exists(format!(
                "request_id: {id} is the id of a job of yours that has ended and left the \
                 scheduler's memory (coop job get {id}); a new submission needs a new request_id"
            ))),
            Some(_) => Err(Status::already_exists(format!(
                "request_id: {id} was used for a different submission"
            ))),
        }
    }

    /// What the caller named, resolved among the jobs it may see.
    fn resolve_one(&self, who: &Principal, field: &str, input: &str) -> Result<uuid::Uuid, Status> {
        resolve_one(&self.0.replica.read(), who, field, input)
    }

    /// Each id (or prefix, `ARRAY_TASK`, array id) of a request, resolved.
    fn resolve_many(&self, who: &Principal, ids: &[String]) -> Result<Vec<uuid::Uuid>, Status> {
        if ids.is_empty() {
            return Err(invalid("ids", "name at least one job"));
        }
        if ids.len() > MAX_IDS {
            return Err(invalid("ids", format!("at most {MAX_IDS} jobs")));
        }
        let state = self.0.replica.read();
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for id in ids {
            for j in resolve(&state, who, "ids", id)?.jobs() {
                if seen.insert(j) {
                    out.push(j);
                }
            }
        }
        if out.len() > MAX_IDS {
            return Err(invalid("ids", format!("at most {MAX_IDS} jobs")));
        }
        Ok(out)
    }

    fn jobs_pb(&self, ids: &[uuid::Uuid]) -> Vec<pb::Job> {
        let state = self.0.replica.read();
        let now = now_ms();
        ids.iter()
            .filter_map(|id| state.jobs.get(id))
            .map(|j| job_to_pb(&state, j, now))
            .collect()
    }

    async fn hold_or_release(
        &self,
        req: Request<pb::HoldJobsRequest>,
        held: bool,
    ) -> Result<Response<pb::HoldJobsResponse>, Status> {
        let who = self.0.actor(&req).await?;
        self.0.current().await?;
        let ids = self.resolve_many(&who, &req.get_ref().ids)?;
        self.0
            .replica
            .propose(Op::HoldJobs {
                ids: ids.clone(),
                held,
            })
            .await
            .map_err(propose_status)?;
        if !held {
            self.0.registry.wake_scheduler();
        }
        Ok(Response::new(pb::HoldJobsResponse {
            jobs: self.jobs_pb(&ids),
        }))
    }
}

fn parse_dependencies(field: &str, ids: &[String]) -> Result<Vec<uuid::Uuid>, Status> {
    let mut out = Vec::new();
    for id in ids {
        let id = parse_job_id(field, id)?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let r = req.into_inner();
        let kind = match pb::JobKind::try_from(r.kind) {
            Ok(pb::JobKind::Finetune) => JobKind::Finetune,
            Ok(pb::JobKind::Inference) => JobKind::Inference,
            _ => return Err(invalid("kind", "must be finetune or inference")),
        };
        let member = match (&who, r.member.trim()) {
            (Principal::Member(m), "") => m.clone(),
            (Principal::Member(m), other) if other == m => m.clone(),
            (Principal::Member(m), other) => {
                return Err(Status::permission_denied(format!(
                    "member {m} may not submit for member {other}"
                )));
            }
            (Principal::Operator, "") => {
                self.0
                    .replica
                    .read()
                    .default_member
                    .clone()
                    .ok_or_else(|| {
                        invalid("member", "the operator must name the member the job is for")
                    })?
            }
            (Principal::Operator, other) => other.to_string(),
            (Principal::Auditor(_) | Principal::Node(_), _) => unreachable!("refused by actor"),
        };
        let spec = JobSpec {
            kind,
            gpus: r.gpus,
            command: r.command,
            gpu_model: Some(r.gpu_model.trim().to_string()).filter(|m| !m.is_empty()),
            min_gpu_memory_mb: r.min_gpu_memory_mb,
            preemptible: r.preemptible,
            kill_grace_ms: if r.kill_grace_ms == 0 {
                self.0.config.kill_grace.as_millis() as u64
            } else {
                r.kill_grace_ms
            },
            priority: r.priority,
            time_limit_ms: r.time_limit_ms,
            isolation: Isolation {
                cpu_millis: r.cpu_millis,
                memory_mb: r.memory_mb,
                image: Some(r.image.trim().to_string()).filter(|i| !i.is_empty()),
            },
            env: r.env.into_iter().collect(),
            nodes: r.nodes,
            gpus_per_node: r.gpus_per_node,
        };
        validate_spec(&spec).map_err(rejection_status)?;
        // Dependencies may be given as prefixes too: resolved among the
        // member's own jobs (apply checks again that they are its own).
        let deps = |ids: &[String]| -> Result<Vec<String>, Status> {
            let state = self.0.replica.read();
            let owner = Principal::Member(member.clone());
            ids.iter()
                .map(|i| {
                    resolve_one(&state, &owner, "dependency", i)
                        .map(|j| j.to_string())
                        // The same answer whether the job is another
                        // member's or does not exist: nothing is learnt of
                        // others' jobs.
                        .map_err(|e| match e.code() {
                            tonic::Code::PermissionDenied | tonic::Code::NotFound => invalid(
                                "dependency",
                                format!("{:?}: no such job of member {member}", i.trim()),
                            ),
                            _ => e,
                        })
                })
                .collect::<Result<Vec<_>, Status>>()
        };
        if r.after_ok.len() + r.after_any.len() > coop_core::habits::MAX_DEPENDENCIES {
            return Err(invalid(
                "dependency",
                format!("at most {} jobs", coop_core::habits::MAX_DEPENDENCIES),
            ));
        }
        let extra = JobExtra {
            name: r.name,
            workdir: Some(r.workdir).filter(|w| !w.is_empty()),
            after_ok: parse_dependencies("dependency", &deps(&r.after_ok)?)?,
            after_any: parse_dependencies("dependency", &deps(&r.after_any)?)?,
            hold: r.hold,
        };
        validate_extra(&extra).map_err(rejection_status)?;
        let array = Some(r.array.trim().to_string()).filter(|a| !a.is_empty());
        let tasks = match &array {
            Some(a) => {
                coop_core::habits::parse_array(a)
                    .map_err(rejection_status)?
                    .0
            }
            None => vec![],
        };
        // An array is charged a submission per task (up to a whole burst).
        let rate = self.0.replica.read().policy.submit_rate;
        let charge = u32::try_from(tasks.len()).unwrap_or(u32::MAX).max(1);
        self.0.limits.check_n(&member, rate, charge)?;
        let retry = !r.request_id.trim().is_empty();
        let id = if retry {
            parse_job_id("request_id", &r.request_id)?
        } else {
            uuid::Uuid::new_v4()
        };
        if retry {
            self.check_reused_id(&member, id).await?;
        }
        let submitted = self
            .0
            .replica
            .propose(Op::SubmitJobWith {
                id,
                member: member.clone(),
                spec: Box::new(spec.clone()),
                extra: Box::new(extra.clone()),
                array: array.clone(),
            })
            .await;
        // The job the answer shows: an array's first task.
        let shown = match tasks.first() {
            Some(t) => coop_core::habits::task_id(id, *t),
            None => id,
        };
        if retry
            && matches!(
                submitted,
                Err(ProposeError::Rejected(Rejection::AlreadyExists(_)))
            )
        {
            // The first attempt may have been applied on the leader only yet.
            self.0.current().await?;
        }
        match submitted {
            Ok(_) => {}
            // The same request sent again: its job, not a second one.
            Err(ProposeError::Rejected(Rejection::AlreadyExists(_)))
                if retry
                    && self.0.replica.read().jobs.get(&shown).is_some_and(|j| {
                        j.member == member && j.spec == spec && j.extra == extra
                    }) => {}
            Err(ProposeError::Rejected(Rejection::AlreadyExists(_))) if retry => {
                return Err(Status::already_exists(format!(
                    "request_id: {id} was used for a different submission"
                )));
            }
            Err(e) => return Err(propose_status(e)),
        }
        self.0.registry.wake_scheduler();
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(self.visible(&who, shown)?),
            tasks: tasks.len() as u32,
        }))
    }

    async fn get(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let who = self.0.actor(&req).await?;
        self.0.current().await?;
        let mut job = [self.find(&who, "id", &req.get_ref().id).await?];
        let state = self.0.replica.read();
        let now = now_ms();
        let decayed = coop_core::fairshare::usage(&state, now);
        fill_wait_reasons(&state, now, &decayed, &mut job);
        let [job] = job;
        Ok(Response::new(pb::GetJobResponse { job: Some(job) }))
    }

    async fn list(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = self.0.actor(&req).await?;
        self.0.current().await?;
        let r = req.into_inner();
        let mut states = Vec::new();
        for s in &r.states {
            let s = pb::JobState::try_from(*s)
                .ok()
                .and_then(super::state_from_pb)
                .ok_or_else(|| invalid("states", format!("{s} is not a job state")))?;
            states.push(s);
        }
        let filter_member = r.member.trim();
        if let (Principal::Member(m), f) = (&who, filter_member)
            && !f.is_empty()
            && f != m
        {
            return Err(Status::permission_denied(format!(
                "member {m} may not list the jobs of {f}"
            )));
        }
        let (name, node) = (r.name.as_str(), r.node.trim());
        let now = now_ms();
        let (mut listed, index, array) = {
            let (state, index) = self.0.replica.read_indexed();
            if !filter_member.is_empty() && !state.members.contains_key(filter_member) {
                return Err(Status::not_found(format!(
                    "member: {filter_member:?} does not exist"
                )));
            }
            if r.from_ms < 0 || r.to_ms < 0 || (r.to_ms > 0 && r.from_ms > r.to_ms) {
                return Err(invalid("from", "the window must start before it ends"));
            }
            let array = match r.array_id.trim() {
                "" => None,
                a => match resolve(&state, &who, "array_id", a)? {
                    Target::Array(a, _) => Some(a),
                    Target::Job(j) => {
                        return Err(invalid(
                            "array_id",
                            format!("{j} is a job, not a job array"),
                        ));
                    }
                },
            };
            let mut jobs: Vec<_> = state
                .jobs
                .values()
                .filter(|j| may_access(&who, j))
                .filter(|j| filter_member.is_empty() || j.member == filter_member)
                .filter(|j| states.is_empty() || states.contains(&j.state))
                .filter(|j| name.is_empty() || j.extra.name == name)
                // A pending job requeued from the node no longer runs there.
                .filter(|j| {
                    node.is_empty()
                        || (j.state != coop_core::state::JobState::Pending
                            && j.run_nodes().contains(&node))
                })
                .filter(|j| r.to_ms == 0 || j.submitted_at_ms <= r.to_ms)
                .filter(|j| r.from_ms == 0 || j.finished_at_ms.is_none_or(|f| f >= r.from_ms))
                .filter(|j| array.is_none() || j.array.as_ref().map(|a| a.array) == array)
                .map(|j| (job_key(j), j))
                .filter(|(k, _)| after(k, &r.page_token))
                .collect();
            jobs.sort_by(|a, b| a.0.cmp(&b.0));
            // Only a page's worth (and one to say there is more) is shown:
            // converting and explaining the rest would be thrown away.
            let page_len = match r.limit as usize {
                0 => super::DEFAULT_PAGE,
                n => n.min(super::MAX_PAGE),
            };
            jobs.truncate(page_len + 1);
            let mut listed: Vec<(String, pb::Job)> = jobs
                .into_iter()
                .map(|(k, j)| (k, job_to_pb(&state, j, now)))
                .collect();
            let decayed = coop_core::fairshare::usage(&state, now);
            let mut shown: Vec<pb::Job> = listed.iter().map(|(_, j)| j.clone()).collect();
            fill_wait_reasons(&state, now, &decayed, &mut shown);
            for ((_, j), filled) in listed.iter_mut().zip(shown) {
                *j = filled;
            }
            (listed, index, array)
        };
        let mut horizon = None;
        // A window that starts somewhere asks for history too (as sacct
        // does): jobs that finished in it and have left memory, from the store.
        if r.from_ms > 0 {
            let limit = match r.limit as usize {
                0 => super::DEFAULT_PAGE,
                n => n.min(super::MAX_PAGE),
            } as u32;
            let pool = self
                .0
                .replica
                .history_at(index)
                .await
                .map_err(propose_status)?;
            let after = r.page_token.split_once('/').and_then(|(at, id)| {
                let at: u64 = at.parse().ok()?;
                Some(((at as i128 - (1i128 << 62)) as i64, id.to_string()))
            });
            let member = (!filter_member.is_empty()).then_some(filter_member);
            let member = match (&who, member) {
                (Principal::Member(m), _) => Some(m.as_str()),
                (_, m) => m,
            };
            let to = if r.to_ms == 0 { i64::MAX } else { r.to_ms };
            let retired = crate::consensus::archive::retired_jobs(
                pool,
                index,
                r.from_ms,
                to,
                member,
                after,
                limit + 1,
            )
            .await
            .map_err(super::usage::history_error)?;
            // A full fetch may stop short of what the page reaches: nothing
            // after its last key can be shown this time.
            horizon = (retired.len() > limit as usize)
                .then(|| retired.last().map(job_key))
                .flatten();
            let state = self.0.replica.read();
            listed.extend(
                retired
                    .iter()
                    .filter(|j| may_access(&who, j))
                    .filter(|j| states.is_empty() || states.contains(&j.state))
                    .filter(|j| name.is_empty() || j.extra.name == name)
                    .filter(|j| node.is_empty() || j.run_nodes().contains(&node))
                    .filter(|j| array.is_none() || j.array.as_ref().map(|a| a.array) == array)
                    .map(|j| (job_key(j), job_to_pb(&state, j, now))),
            );
            listed.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(h) = &horizon {
                listed.retain(|(k, _)| k <= h);
            }
        }
        let (jobs, mut next_page_token) = page(listed.into_iter(), r.limit);
        if next_page_token.is_empty()
            && let Some(h) = horizon
        {
            next_page_token = h;
        }
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let r = req.get_ref();
        let named: Vec<String> = std::iter::once(r.id.clone())
            .filter(|i| !i.trim().is_empty())
            .chain(r.ids.iter().cloned())
            .collect();
        let single = match named.as_slice() {
            [one] => match uuid::Uuid::parse_str(one.trim()) {
                // A full job id, as before (no read barrier needed).
                Ok(id) if self.0.replica.read().jobs.contains_key(&id) => Some(id),
                _ => {
                    self.0.current().await?;
                    match resolve(&self.0.replica.read(), &who, "id", one)? {
                        Target::Job(id) => Some(id),
                        Target::Array(..) => None,
                    }
                }
            },
            _ => None,
        };
        let Some(id) = single else {
            // Several (or an array): one command, so that all are cancelled
            // or, on bad input, none.
            self.0.current().await?;
            let ids = self.resolve_many(&who, &named)?;
            self.0
                .replica
                .propose(Op::CancelJobs { ids: ids.clone() })
                .await
                .map_err(propose_status)?;
            let jobs = self.jobs_pb(&ids);
            return Ok(Response::new(pb::CancelJobResponse {
                job: jobs.first().cloned(),
                jobs,
            }));
        };
        self.visible(&who, id)?;
        let cancelled = |s: &Self| {
            s.0.replica
                .read()
                .jobs
                .get(&id)
                .is_some_and(|j| j.state == coop_core::state::JobState::Cancelled)
        };
        match self.0.replica.propose(Op::CancelJob { id }).await {
            Ok(_) => {}
            // Cancelling is idempotent (a CLI may send it again after a
            // timeout): a job cancelled already is what was asked for.
            Err(ProposeError::Rejected(Rejection::FailedPrecondition(_))) if cancelled(self) => {}
            Err(e) => return Err(propose_status(e)),
        }
        let job = self.visible(&who, id)?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job.clone()),
            jobs: vec![job],
        }))
    }

    async fn logs(
        &self,
        req: Request<pb::JobLogsRequest>,
    ) -> Result<Response<pb::JobLogsResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let r = req.into_inner();
        let job = self.find(&who, "id", &r.id).await?;
        let id: uuid::Uuid = job
            .id
            .parse()
            .map_err(|_| Status::internal("a job without a valid id"))?;
        let attempt = if r.attempt == 0 {
            job.attempts
        } else {
            r.attempt
        };
        if attempt > job.attempts {
            return Err(invalid(
                "attempt",
                format!("job {id} has had {} attempts", job.attempts),
            ));
        }
        if attempt == 0 {
            // Never ran: no output yet, and none ever if it has ended.
            return Ok(Response::new(pb::JobLogsResponse {
                data: vec![],
                next_offset: 0,
                eof: job.finished_at_ms != 0,
                attempt: 0,
            }));
        }
        if r.rank > 0 && (attempt != job.attempts || r.rank as usize >= job.parts.len().max(1)) {
            return Err(invalid(
                "rank",
                if job.parts.is_empty() {
                    format!("job {id} runs on one node: its only rank is 0")
                } else if attempt != job.attempts {
                    format!(
                        "the ranks of job {id} are known for its last attempt only ({})",
                        job.attempts
                    )
                } else {
                    format!("job {id} has ranks 0 to {}", job.parts.len() - 1)
                },
            ));
        }
        let node = if attempt == job.attempts {
            Some(match job.parts.get(r.rank as usize) {
                Some(p) => p.node.clone(),
                None => job.node.clone(),
            })
        } else {
            let (pool, _) = self.0.replica.history_now().await.map_err(propose_status)?;
            crate::consensus::archive::attempt_node(pool, id, attempt)
                .await
                .map_err(super::usage::history_error)?
        }
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Status::not_found(format!(
                "no node is known for attempt {attempt} of job {id}"
            ))
        })?;
        let limit = if r.limit == 0 {
            DEFAULT_LOG_LIMIT
        } else {
            r.limit.min(DEFAULT_LOG_LIMIT)
        };
        let chunk = self
            .0
            .registry
            .fetch_logs(&node, id, attempt, r.offset, limit, Duration::from_secs(10))
            .await?;
        Ok(Response::new(pb::JobLogsResponse {
            data: chunk.data,
            next_offset: chunk.next_offset,
            eof: chunk.eof,
            attempt,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = self.0.actor(&req).await?;
        self.0.current().await?;
        let id = self.resolve_one(&who, "id", &req.get_ref().id)?;
        // Subscribe before the first read so that no change falls in between.
        let mut events = self.0.replica.subscribe();
        let first = self.visible(&who, id)?;
        let replica = self.0.replica.clone();
        let ctx = self.0.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first;
            let mut finished = is_final(&last);
            if tx
                .send(Ok(pb::JobEvent {
                    job: Some(last.clone()),
                }))
                .await
                .is_err()
            {
                return;
            }
            while !finished {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = ctx.stopping() => {
                        let _ = tx.send(Err(super::shutting_down())).await;
                        return;
                    }
                };
                match event {
                    Ok(Event::Job(j)) if j == id => {}
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
                let job = {
                    let state = replica.read();
                    match state.jobs.get(&id) {
                        Some(j) => job_to_pb(&state, j, now_ms()),
                        None => return,
                    }
                };
                // Usage grows by itself; only report real changes.
                let changed = job.state != last.state
                    || job.attempts != last.attempts
                    || job.cancel_requested != last.cancel_requested
                    || job.started_at_ms != last.started_at_ms
                    || job.node != last.node
                    // Each part of a multi-node run starts and ends on its own.
                    || job.parts != last.parts;
                finished = is_final(&job);
                if changed {
                    last = job.clone();
                    if tx.send(Ok(pb::JobEvent { job: Some(job) })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn hold(
        &self,
        req: Request<pb::HoldJobsRequest>,
    ) -> Result<Response<pb::HoldJobsResponse>, Status> {
        self.hold_or_release(req, true).await
    }

    async fn release(
        &self,
        req: Request<pb::HoldJobsRequest>,
    ) -> Result<Response<pb::HoldJobsResponse>, Status> {
        self.hold_or_release(req, false).await
    }
}

fn is_final(job: &pb::Job) -> bool {
    pb::JobState::try_from(job.state)
        .ok()
        .and_then(super::state_from_pb)
        .is_some_and(|s| s.is_final())
}

/// A stream fed by a spawned task through a small channel.
pub fn async_stream<T, F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
