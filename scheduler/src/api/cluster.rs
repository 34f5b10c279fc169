//! ClusterService: scheduler nodes, agent nodes and their GPUs.

use coop_proto::v1::{self as pb, cluster_service_server::ClusterService};
use tonic::{Request, Response, Status};

use std::time::Duration;

use super::{Ctx, invalid, propose_status};
use crate::consensus::transport;
use crate::replica::Membership;
use crate::state::{JobState, State};

pub struct Cluster(pub Ctx);

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
                        })
                        .collect(),
                    registered_at_ms: n.registered_at_ms,
                    last_heartbeat_ms: live.last_seen_ms,
                    connected: live.connected,
                }
            })
            .collect()
    }
}

impl Cluster {
    /// Every scheduler node's own account of itself, asked in parallel; one
    /// that does not answer in time is listed as unreachable.
    async fn schedulers(&self) -> Vec<pb::SchedulerNode> {
        let me = self.0.replica.id();
        let peers = self.0.replica.view().borrow().peers.clone();
        let token = self.0.replica.peer_token().clone();
        let asks = peers.into_iter().map(|(id, address)| {
            let token = token.clone();
            let local = (id == me).then(|| self.0.replica.scheduler_node());
            async move {
                if let Some(n) = local {
                    return n;
                }
                let ask = async {
                    let ch = transport::endpoint(&address)?.connect().await?;
                    let n = transport::client(ch)
                        .status(transport::request(pb::NodeStatusRequest {}, &token))
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

fn unreachable(id: u64, address: String, error: String) -> pb::SchedulerNode {
    pb::SchedulerNode {
        id,
        address,
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
        let address = transport::normalize(&r.address);
        if r.address.trim().is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        transport::endpoint(&address)
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

    async fn status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.0.principal(&req).await?;
        let schedulers = self.schedulers().await;
        let state = self.0.replica.read();
        let nodes = self.nodes(&state);
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
        self.0.principal(&req).await?;
        self.0.current().await?;
        let state = self.0.replica.read();
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self.nodes(&state),
        }))
    }
}
