//! ClusterService: scheduler nodes, agent nodes and their GPUs.

use coop_proto::v1::{self as pb, cluster_service_server::ClusterService};
use tonic::{Request, Response, Status};

use super::Ctx;
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

#[tonic::async_trait]
impl ClusterService for Cluster {
    async fn status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.0.principal(&req)?;
        let applied = *self.0.replica.applied().borrow();
        let state = self.0.replica.read();
        let nodes = self.nodes(&state);
        let up_gpus = state.nodes.values().filter(|n| n.up).flat_map(|n| &n.gpus);
        let (total, free) = up_gpus.fold((0, 0), |(t, f), g| (t + 1, f + g.job.is_none() as u32));
        let count = |s: JobState| state.jobs.values().filter(|j| j.state == s).count() as u32;
        Ok(Response::new(pb::ClusterStatusResponse {
            // A single scheduler until replication: it is its own leader.
            schedulers: vec![pb::SchedulerNode {
                id: self.0.config.id,
                address: self.0.config.advertise.clone(),
                role: "leader".into(),
                term: 1,
                commit_index: applied,
                applied_index: applied,
            }],
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
        self.0.principal(&req)?;
        let state = self.0.replica.read();
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self.nodes(&state),
        }))
    }
}
