//! AgentService: node registration and the heartbeat stream.
//!
//! Down the stream goes the node's desired set of runs (level-triggered: the
//! whole set, whenever it changes), acknowledgements and log requests; up come
//! pings, run reports (applied once each, by sequence) and log chunks.

use std::pin::Pin;

use coop_proto::v1::{
    self as pb, agent_message::Msg as Up, agent_service_server::AgentService,
    scheduler_message::Msg as Down,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{Ctx, invalid, parse_job_id, propose_status};
use crate::clock::now_ms;
use crate::liveness::AgentTx;
use coop_core::state::{Capacity, GpuInfo, Op, RunReport, State, valid_name};

pub struct Agents(pub Ctx);

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

/// Every run `node` should have now: its one-node runs, and its parts of
/// multi-node runs (each with the rendezvous its launcher needs).
pub fn desired_runs(state: &State, node: &str) -> Vec<pb::Run> {
    let Some(n) = state.nodes.get(node) else {
        return vec![];
    };
    let mut ids: Vec<_> = n.gpus.iter().filter_map(|g| g.job).collect();
    ids.sort();
    ids.dedup();
    ids.iter()
        .filter_map(|id| state.jobs.get(id))
        .filter_map(|j| Some((j, j.run_on(node)?)))
        .map(|(j, run)| pb::Run {
            job_id: j.id.to_string(),
            attempt: j.attempts,
            command: j.spec.command.clone(),
            gpus: run.gpus.to_vec(),
            kill_grace_ms: j.stop_grace_ms(&state.policy),
            stop: j.stopping(),
            cpu_millis: j.spec.isolation.cpu_millis,
            memory_mb: j.spec.isolation.memory_mb,
            image: j.spec.isolation.image.clone().unwrap_or_default(),
            env: j.spec.env.clone().into_iter().collect(),
            workdir: j.extra.workdir.clone().unwrap_or_default(),
            array_job_id: j
                .array
                .as_ref()
                .map(|a| a.array.to_string())
                .unwrap_or_default(),
            array_task_id: j.array.as_ref().map(|a| a.task),
            rendezvous: j.gang.as_ref().map(|g| pb::Rendezvous {
                node_rank: g.rank_on(node).unwrap_or_default() as u32,
                addresses: g
                    .parts
                    .iter()
                    .map(|p| {
                        // A node that gave no address is reached by name.
                        state
                            .nodes
                            .get(&p.node)
                            .map(|n| n.address.clone())
                            .filter(|a| !a.is_empty())
                            .unwrap_or_else(|| p.node.clone())
                    })
                    .collect(),
                port: g.port as u32,
                world_size: j.spec.gpus,
            }),
        })
        .collect()
}

fn to_report(r: pb::Report) -> Result<RunReport, Status> {
    Ok(match r.event {
        Some(pb::report::Event::Started(s)) => RunReport::Started {
            job: parse_job_id("started.job_id", &s.job_id)?,
            attempt: s.attempt,
            at_ms: s.at_ms,
        },
        Some(pb::report::Event::Exited(e)) if e.lost => RunReport::Lost {
            job: parse_job_id("exited.job_id", &e.job_id)?,
            attempt: e.attempt,
            at_ms: e.at_ms,
            reason: e.reason,
            energy_mj: e.energy_mj,
        },
        Some(pb::report::Event::Exited(e)) => RunReport::Exited {
            job: parse_job_id("exited.job_id", &e.job_id)?,
            attempt: e.attempt,
            at_ms: e.at_ms,
            exit_code: e.exit_code,
            reason: e.reason,
            energy_mj: e.energy_mj,
        },
        Some(pb::report::Event::Utilization(u)) => RunReport::Utilization {
            job: parse_job_id("utilization.job_id", &u.job_id)?,
            attempt: u.attempt,
            sum_pct: u.sum_pct,
            samples: u.samples,
        },
        Some(pb::report::Event::Usage(u)) => RunReport::Usage {
            job: parse_job_id("usage.job_id", &u.job_id)?,
            attempt: u.attempt,
            to_ms: u.to_ms,
            energy_mj: u.energy_mj,
        },
        None => return Err(invalid("report.event", "missing")),
    })
}

#[tonic::async_trait]
impl AgentService for Agents {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string())
            .ok_or_else(|| {
                Status::unauthenticated("join: send the join token as 'Bearer <token>'")
            })?;
        let credential_hash = req.into_inner().credential_hash;
        if credential_hash.len() != 64 || !credential_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("credential_hash", "must be a SHA-256 in hex"));
        }
        let join_hash = crate::auth::hash_token(&token);
        // Checked here first, so that guesses do not reach the log.
        self.0.current().await?;
        let expires = self
            .0
            .replica
            .read()
            .enrollments
            .get(&join_hash)
            .map(|e| e.expires_at_ms);
        match expires {
            None => {
                return Err(Status::unauthenticated(
                    "join token unknown or already used: enroll the node again (coop node enroll)",
                ));
            }
            Some(t) if t <= now_ms() => {
                return Err(Status::unauthenticated(
                    "join token expired: enroll the node again (coop node enroll)",
                ));
            }
            Some(_) => {}
        }
        let events = self
            .0
            .replica
            .propose(Op::JoinNode {
                join_hash,
                credential_hash: credential_hash.to_lowercase(),
            })
            .await
            .map_err(propose_status)?;
        let node = events
            .iter()
            .find_map(|e| match e {
                coop_core::state::Event::Node(n) => Some(n.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::internal("the join was applied without a node"))?;
        let owner = self
            .0
            .replica
            .read()
            .node_owners
            .get(&node)
            .cloned()
            .unwrap_or_default();
        tracing::info!("node {node} of {owner} enrolled its agent");
        Ok(Response::new(pb::JoinResponse { node, owner }))
    }

    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let node = self.0.node(&req).await?;
        self.0.leader_only()?;
        let seen_from = req.remote_addr().map(|a| a.ip().to_canonical().to_string());
        let mut r = req.into_inner();
        if r.node != node {
            return Err(Status::permission_denied(format!(
                "node: this credential is for node {node}, not {:?}",
                r.node
            )));
        }
        if !valid_name(&r.node) {
            return Err(invalid(
                "node",
                format!("{:?} is not a valid node name", r.node),
            ));
        }
        // The owner is the one the node was enrolled for, whatever is asked.
        let owner = self.0.replica.read().node_owners.get(&node).cloned();
        let Some(owner) = owner else {
            return Err(Status::permission_denied(format!(
                "node {node} has no enrollment: enroll it (coop node enroll)"
            )));
        };
        if !r.owner.trim().is_empty() && r.owner.trim() != owner {
            return Err(Status::permission_denied(format!(
                "owner: node {node} was enrolled for {owner}, not {:?}",
                r.owner.trim()
            )));
        }
        r.owner = owner;
        if r.gpus.is_empty() {
            return Err(invalid("gpus", "a node must offer at least one GPU"));
        }
        if r.session.is_empty() {
            return Err(invalid("session", "must not be empty"));
        }
        let gpus = r
            .gpus
            .into_iter()
            .map(|g| GpuInfo {
                uuid: g.uuid,
                index: g.index,
                model: g.model,
                memory_mb: g.memory_mb,
                power_limit_w: g.power_limit_w,
                measured: g.measured.map(|m| Capacity {
                    fp16_gflops: m.fp16_gflops,
                    bf16_gflops: m.bf16_gflops,
                    memory_mb_per_s: m.memory_mb_per_s,
                }),
            })
            .collect();
        let session = r.session;
        let registry = &self.0.registry;
        let orphaned_runs_end_ms = registry.last_seen(&r.node).unwrap_or_else(now_ms);
        self.0
            .replica
            .propose(Op::RegisterNode {
                node: r.node.clone(),
                owner: r.owner,
                gpus,
                session: session.clone(),
                orphaned_runs_end_ms,
                // Where the agent says its node is reached, else where it
                // connected from.
                address: if r.address.is_empty() {
                    seen_from.unwrap_or_default()
                } else {
                    r.address
                },
                site: r.site,
            })
            .await
            .map_err(propose_status)?;
        registry.touch(&r.node);
        registry.wake_scheduler();
        let last_seq = self
            .0
            .replica
            .read()
            .nodes
            .get(&r.node)
            .filter(|n| n.session == session)
            .map_or(0, |n| n.last_seq);
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: self.0.config.heartbeat_interval.as_millis() as u64,
            usage_interval_ms: self.0.config.usage_interval.as_millis() as u64,
            last_seq,
        }))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let me = self.0.node(&req).await?;
        self.0.leader_only()?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage {
                msg: Some(Up::Hello(h)),
            }) => h,
            _ => return Err(invalid("hello", "the first message must be hello")),
        };
        let (node, session) = (hello.node, hello.session);
        if node != me {
            return Err(Status::permission_denied(format!(
                "hello.node: this credential is for node {me}, not {node:?}"
            )));
        }
        if !registered(&self.0.replica.read(), &node, &session) {
            return Err(Status::failed_precondition(format!(
                "node {node} is not registered with session {session}: register again"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let conn = self.0.registry.connect(&node, tx.clone());
        tokio::spawn(push_desired(
            self.0.clone(),
            node.clone(),
            session.clone(),
            tx.clone(),
        ));
        let ctx = self.0.clone();
        tokio::spawn(async move {
            let result = read_agent(&ctx, &node, &session, &mut inbound, &tx).await;
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
            ctx.registry.disconnect(&node, conn);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn registered(state: &State, node: &str, session: &str) -> bool {
    state
        .nodes
        .get(node)
        .is_some_and(|n| n.up && n.session == session)
}

async fn read_agent(
    ctx: &Ctx,
    node: &str,
    session: &str,
    inbound: &mut Streaming<pb::AgentMessage>,
    tx: &AgentTx,
) -> Result<(), Status> {
    let mut view = ctx.replica.view();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m?,
            // A deposed leader sends its agents on to the new one.
            // (The view's read lock is let go before `leader_only` takes it
            // again: a second read behind a waiting writer would deadlock.)
            r = view.wait_for(|v| !v.is_leader()) => {
                drop(r);
                return ctx.leader_only();
            }
            // A stopping scheduler sends them on to another at once.
            _ = ctx.stopping() => return Err(super::shutting_down()),
        };
        let Some(msg) = msg else { break };
        ctx.registry.touch(node);
        match msg.msg {
            Some(Up::Ping(_)) | None => {}
            Some(Up::Leaving(_)) => {
                ctx.replica
                    .propose(Op::DrainNode {
                        node: node.to_string(),
                    })
                    .await
                    .map_err(propose_status)?;
            }
            Some(Up::Goodbye(_)) => {
                ctx.replica
                    .propose(Op::NodeDown {
                        node: node.to_string(),
                        last_seen_ms: now_ms(),
                    })
                    .await
                    .map_err(propose_status)?;
                ctx.registry.wake_scheduler();
                return Ok(());
            }
            Some(Up::Hello(_)) => return Err(invalid("hello", "sent twice")),
            Some(Up::LogChunk(c)) => ctx.registry.complete_log(node, c),
            Some(Up::Report(r)) => {
                let seq = r.seq;
                let report = to_report(r)?;
                ctx.replica
                    .propose(Op::Report {
                        node: node.to_string(),
                        session: session.to_string(),
                        seq,
                        report,
                    })
                    .await
                    .map_err(propose_status)?;
                ctx.registry.wake_scheduler();
                let ack = pb::SchedulerMessage {
                    msg: Some(Down::Ack(pb::Ack { seq })),
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Sends the node's desired runs whenever they change; ends the stream when the
/// node is no longer registered with this session (marked down, or replaced).
async fn push_desired(ctx: Ctx, node: String, session: String, tx: AgentTx) {
    let mut applied = ctx.replica.applied();
    let mut last: Option<Vec<pb::Run>> = None;
    loop {
        let (ok, runs) = {
            let state = ctx.replica.read();
            (
                registered(&state, &node, &session),
                desired_runs(&state, &node),
            )
        };
        if !ok {
            let _ = tx
                .send(Err(Status::failed_precondition(format!(
                    "node {node} is no longer registered with session {session}: register again"
                ))))
                .await;
            return;
        }
        if last.as_ref() != Some(&runs) {
            let msg = pb::SchedulerMessage {
                msg: Some(Down::Desired(pb::Desired { runs: runs.clone() })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            last = Some(runs);
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}
