//! The raft service other scheduler nodes call: raft messages in, proposals
//! forwarded by followers, membership changes, and this node's status.

use coop_proto::v1::{self as pb, raft_service_server::RaftService};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status};

use crate::replica::{Membership, Replica};
use coop_core::state::Op;

/// Served on the peer listener only, whose TLS handshake already refused any
/// caller without a certificate of the cluster CA.
pub struct Raft(pub Replica);

impl Raft {
    /// Raft messages are decoded by protobuf 2, which has no depth limit on
    /// nesting (RUSTSEC-2024-0437): a second check that the caller showed a
    /// peer certificate, should this service ever be mounted elsewhere.
    fn authorise<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match req.peer_certs() {
            Some(c) if !c.is_empty() => Ok(()),
            _ => Err(Status::unauthenticated(
                "raft peers must present a certificate of the cluster CA",
            )),
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
        // Read strictly, as the log is: a field this build does not know (a
        // newer follower's) must not be dropped on the way to the leader.
        let op: Op = coop_core::codec::decode(&req.into_inner().op)
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
            .map_err(crate::status::propose_status)?;
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
