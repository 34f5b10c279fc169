//! The raft service other scheduler nodes call: raft messages in, proposals
//! forwarded by followers, membership changes, and this node's status.

use coop_proto::v1::{self as pb, raft_service_server::RaftService};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status};

use super::PEER_TOKEN_HEADER;
use crate::replica::{Membership, Replica};
use crate::state::Op;

pub struct Raft(pub Replica);

impl Raft {
    /// Raft messages are decoded by protobuf 2, which has no depth limit on
    /// nesting: only peers holding the shared secret may send them.
    fn authorise<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(want) = self.0.peer_token() else {
            return Ok(());
        };
        let got = req
            .metadata()
            .get(PEER_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        if got.map(crate::auth::hash_token) == Some(crate::auth::hash_token(want)) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "raft peers must present the cluster's peer token",
            ))
        }
    }
}

#[tonic::async_trait]
impl RaftService for Raft {
    async fn send(&self, req: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        self.authorise(&req)?;
        let b = req.into_inner();
        let msgs = b
            .messages
            .iter()
            .map(|bytes| Message::parse_from_bytes(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("messages: {e}")))?;
        self.0.step(b.from, b.from_address, msgs);
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        self.authorise(&req)?;
        let op: Op = serde_json::from_slice(&req.into_inner().op)
            .map_err(|e| Status::invalid_argument(format!("op: {e}")))?;
        let result = self.0.propose_local(op).await;
        Ok(Response::new(pb::ForwardResponse {
            result: serde_json::to_vec(&result).expect("results serialise"),
        }))
    }

    async fn change_membership(
        &self,
        req: Request<pb::MembershipRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.authorise(&req)?;
        let change: Membership = serde_json::from_slice(&req.into_inner().change)
            .map_err(|e| Status::invalid_argument(format!("change: {e}")))?;
        self.0
            .change_membership(change)
            .await
            .map_err(crate::api::propose_status)?;
        Ok(Response::new(pb::MembershipResponse {}))
    }

    async fn status(
        &self,
        req: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::SchedulerNode>, Status> {
        self.authorise(&req)?;
        Ok(Response::new(self.0.scheduler_node()))
    }
}
