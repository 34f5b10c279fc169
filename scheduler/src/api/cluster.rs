//! ClusterService: scheduler nodes, agent nodes and their GPUs.

use coop_proto::v1::{self as pb, cluster_service_server::ClusterService};
use tonic::{Request, Response, Status};

use std::time::Duration;

use super::{Ctx, after, invalid, page, propose_status};
use crate::consensus::transport;
use crate::replica::Membership;
use coop_core::state::{JobState, Op, Principal, State};

/// Longest a join token may stay usable.
const MAX_JOIN_TTL_S: u64 = 7 * 24 * 3600;

pub struct Cluster(pub Ctx);

/// A member sees which GPUs are busy, not whose jobs hold them.
fn mask_jobs(who: &Principal, state: &State, nodes: &mut [pb::Node]) {
    let Principal::Member(m) = who else { return };
    for g in nodes.iter_mut().flat_map(|n| n.gpus.iter_mut()) {
        let mine = g
            .job
            .parse()
            .ok()
            .and_then(|id| state.jobs.get(&id))
            .is_some_and(|j| j.member == *m);
        if !mine && !g.job.is_empty() {
            g.job = "(another member's job)".into();
        }
    }
}

impl Cluster {
    fn nodes(&self, state: &State) -> Vec<pb::Node> {
        state
            .nodes
            .values()
            .map(|n| {
                let live = self.0.registry.connection_info(&n.name);
                pb::Node {
                    name: n.name.clone(),
                    owner: n.owner.clone(),
                    state: if n.up {
                        pb::NodeState::Up
                    } else {
                        pb::NodeState::Down
                    } as i32,
                    gpus: n
                        .gpus
                        .iter()
                        .map(|g| pb::Gpu {
                            uuid: g.uuid.clone(),
                            index: g.index,
                            model: g.model.clone(),
                            memory_mb: g.memory_mb,
                            job: g.job.map(|j| j.to_string()).unwrap_or_default(),
                            measured: g.measured.map(|m| pb::GpuCapacity {
                                fp16_gflops: m.fp16_gflops,
                                bf16_gflops: m.bf16_gflops,
                                memory_mb_per_s: m.memory_mb_per_s,
                            }),
                            power_limit_w: g.power_limit_w,
                        })
                        .collect(),
                    registered_at_ms: n.registered_at_ms,
                    site: n.site.clone(),
                    address: n.address.clone(),
                    last_heartbeat_ms: live.last_seen_ms,
                    connected: live.connected,
                    drain: match &n.cordon {
                        None => String::new(),
                        Some(_) if n.gpus.iter().any(|g| g.job.is_some()) => "draining".into(),
                        Some(_) => "drained".into(),
                    },
                    drain_reason: n
                        .cordon
                        .as_ref()
                        .map(|c| c.reason.clone())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}

impl Cluster {
    /// Who may drain and resume `node`: the operator, or the member that owns
    /// it (as for `coop node enroll`). Answers the name to record.
    async fn may_manage(&self, who: &Principal, node: &str) -> Result<String, Status> {
        self.0.current().await?;
        let state = self.0.replica.read();
        let Some(n) = state.nodes.get(node) else {
            return Err(Status::not_found(format!("node {node:?} does not exist")));
        };
        match who {
            Principal::Operator => Ok("the operator".into()),
            Principal::Member(m) if *m == n.owner => Ok(format!("member {m}")),
            Principal::Member(m) => Err(Status::permission_denied(format!(
                "member {m} may drain and resume only machines it owns"
            ))),
            _ => Err(Status::permission_denied(
                "operator or the node's owner only",
            )),
        }
    }

    fn one_node(&self, who: &Principal, node: &str) -> Option<pb::Node> {
        let state = self.0.replica.read();
        let mut nodes = self.nodes(&state);
        nodes.retain(|n| n.name == node);
        mask_jobs(who, &state, &mut nodes);
        nodes.pop()
    }

    /// Every scheduler node's own account of itself, asked in parallel; one
    /// that does not answer in time is listed as unreachable.
    async fn schedulers(&self) -> Vec<pb::SchedulerNode> {
        let me = self.0.replica.id();
        let peers = self.0.replica.view().borrow().peers.clone();
        let tls = self.0.replica.peer_tls().clone();
        let asks = peers.into_iter().map(|(id, address)| {
            let tls = tls.clone();
            let local = (id == me).then(|| self.0.replica.scheduler_node());
            async move {
                if let Some(n) = local {
                    return n;
                }
                let ask = async {
                    let ch = transport::endpoint(&address, &tls)?.connect().await?;
                    let n = transport::client(ch)
                        .status(pb::NodeStatusRequest {})
                        .await?;
                    anyhow::Ok(n.into_inner())
                };
                match tokio::time::timeout(Duration::from_secs(1), ask).await {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => unreachable(id, address, e.to_string()),
                    Err(_) => unreachable(id, address, "no answer within 1 s".into()),
                }
            }
        });
        futures::future::join_all(asks).await
    }

    async fn membership(&self, change: Membership) -> Result<Vec<pb::SchedulerNode>, Status> {
        self.0
            .replica
            .change_membership(change.clone())
            .await
            .map_err(propose_status)?;
        // List the schedulers as of the change, on a follower too: the change
        // is answered once committed, and this node's view of its peers
        // follows when it has applied it.
        self.0.current().await?;
        let settled = |v: &crate::replica::View| match &change {
            Membership::Add { id, .. } => v.peers.contains_key(id),
            Membership::Remove { id } => !v.peers.contains_key(id),
        };
        let mut view = self.0.replica.view();
        let _ = tokio::time::timeout(Duration::from_secs(5), view.wait_for(settled)).await;
        Ok(self.schedulers().await)
    }
}

/// `address`: the peer address that was dialled.
fn unreachable(id: u64, address: String, error: String) -> pb::SchedulerNode {
    pb::SchedulerNode {
        id,
        peer_address: address,
        role: "unreachable".into(),
        error,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ClusterService for Cluster {
    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        self.0.operator(&req).await?;
        let r = req.into_inner();
        if r.id == 0 {
            return Err(invalid("id", "must be a positive integer"));
        }
        let tls = self.0.replica.peer_tls().clone();
        if tls.is_none() {
            return Err(Status::failed_precondition(
                "this cluster has no peer authentication: start its schedulers with --tls-dir and --peer-listen",
            ));
        }
        let address = transport::normalize(&r.address, true);
        if r.address.trim().is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        transport::endpoint(&address, &tls)
            .map_err(|_| invalid("address", format!("{address:?} is not an address")))?;
        if self.0.replica.view().borrow().peers.contains_key(&r.id) {
            return Err(Status::already_exists(format!(
                "scheduler node {} is already in the cluster",
                r.id
            )));
        }
        let schedulers = self
            .membership(Membership::Add { id: r.id, address })
            .await?;
        Ok(Response::new(pb::AddNodeResponse { schedulers }))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        self.0.operator(&req).await?;
        let id = req.into_inner().id;
        if !self.0.replica.view().borrow().peers.contains_key(&id) {
            return Err(Status::not_found(format!(
                "scheduler node {id} is not in the cluster"
            )));
        }
        let schedulers = self.membership(Membership::Remove { id }).await?;
        Ok(Response::new(pb::RemoveNodeResponse { schedulers }))
    }

    async fn enroll_node(
        &self,
        req: Request<pb::EnrollNodeRequest>,
    ) -> Result<Response<pb::EnrollNodeResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let r = req.into_inner();
        let (node, owner) = (r.node.trim().to_string(), r.owner.trim().to_string());
        if !coop_core::state::valid_name(&node) {
            return Err(invalid(
                "node",
                format!("{node:?} is not a valid node name"),
            ));
        }
        if let Principal::Member(m) = &who
            && *m != owner
        {
            return Err(Status::permission_denied(format!(
                "member {m} may enroll only machines it owns (--owner {m})"
            )));
        }
        if owner.is_empty() {
            return Err(invalid(
                "owner",
                "must name the member that owns the machine",
            ));
        }
        let ttl_s = match r.ttl_s {
            0 => 3600,
            t if t > MAX_JOIN_TTL_S => return Err(invalid("ttl", "at most 7 days")),
            t => t,
        };
        let join_token = crate::auth::new_join_token();
        let expires_at_ms = crate::clock::now_ms() + ttl_s as i64 * 1000;
        self.0
            .replica
            .propose(Op::EnrollNode {
                node,
                owner,
                join_hash: crate::auth::hash_token(&join_token),
                expires_at_ms,
            })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(pb::EnrollNodeResponse {
            join_token,
            expires_at_ms,
        }))
    }

    async fn revoke_node(
        &self,
        req: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let node = req.into_inner().node.trim().to_string();
        if let Principal::Member(m) = &who {
            let state = self.0.replica.read();
            let owner = state
                .node_owners
                .get(&node)
                .or_else(|| state.nodes.get(&node).map(|n| &n.owner));
            if owner != Some(m) {
                return Err(Status::permission_denied(format!(
                    "member {m} may revoke only machines it owns"
                )));
            }
        }
        self.0
            .replica
            .propose(Op::RevokeNode { node })
            .await
            .map_err(propose_status)?;
        self.0.registry.wake_scheduler();
        Ok(Response::new(pb::RevokeNodeResponse {}))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let r = req.into_inner();
        let node = r.node.trim().to_string();
        let by = self.may_manage(&who, &node).await?;
        let reason = match r.reason.trim() {
            "" => format!("drained by {by}"),
            reason => reason.to_string(),
        };
        let events = self
            .0
            .replica
            .propose(Op::CordonNode {
                node: node.clone(),
                reason,
                by,
                requeue: r.now,
            })
            .await
            .map_err(propose_status)?;
        // A member draining its own machine learns of its own jobs only, as
        // `mask_jobs` does for the GPUs.
        let requeued = {
            let state = self.0.replica.read();
            events
                .iter()
                .filter_map(|e| match e {
                    coop_core::state::Event::Job(j) => Some(*j),
                    _ => None,
                })
                .map(|j| match &who {
                    Principal::Member(m) if state.jobs.get(&j).is_none_or(|x| x.member != *m) => {
                        "(another member's job)".to_string()
                    }
                    _ => j.to_string(),
                })
                .collect()
        };
        Ok(Response::new(pb::DrainNodeResponse {
            node: self.one_node(&who, &node),
            requeued,
        }))
    }

    async fn resume_node(
        &self,
        req: Request<pb::ResumeNodeRequest>,
    ) -> Result<Response<pb::ResumeNodeResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let node = req.into_inner().node.trim().to_string();
        self.may_manage(&who, &node).await?;
        self.0
            .replica
            .propose(Op::ResumeNode { node: node.clone() })
            .await
            .map_err(propose_status)?;
        self.0.registry.wake_scheduler();
        Ok(Response::new(pb::ResumeNodeResponse {
            node: self.one_node(&who, &node),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let who = self.0.principal(&req).await?;
        let schedulers = self.schedulers().await;
        let state = self.0.replica.read();
        let mut nodes = self.nodes(&state);
        mask_jobs(&who, &state, &mut nodes);
        let up_gpus = state.nodes.values().filter(|n| n.up).flat_map(|n| &n.gpus);
        let (total, free) = up_gpus.fold((0, 0), |(t, f), g| (t + 1, f + g.job.is_none() as u32));
        let count = |s: JobState| state.jobs.values().filter(|j| j.state == s).count() as u32;
        Ok(Response::new(pb::ClusterStatusResponse {
            schedulers,
            nodes,
            gpus_total: total,
            gpus_free: free,
            jobs_pending: state.queue.len() as u32,
            jobs_running: count(JobState::Running),
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let who = self.0.principal(&req).await?;
        self.0.current().await?;
        let r = req.into_inner();
        let state = self.0.replica.read();
        let mut nodes = self.nodes(&state);
        mask_jobs(&who, &state, &mut nodes);
        let (nodes, next_page_token) = page(
            nodes
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .filter(|(k, _)| after(k, &r.page_token)),
            r.limit,
        );
        Ok(Response::new(pb::ListNodesResponse {
            nodes,
            next_page_token,
        }))
    }
}
