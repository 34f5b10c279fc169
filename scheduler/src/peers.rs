//! The raft service other scheduler nodes call: raft messages in, proposals
//! forwarded by followers, membership changes, this node's status, and the
//! history a node that installed a snapshot copies.

use coop_proto::v1::{self as pb, raft_service_server::RaftService};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status};

use crate::consensus::archive;
use crate::consensus::snapshot_stream::Assembly;
use crate::replica::{Membership, Replica};
use coop_core::state::Op;

/// Served on the peer listener only, whose TLS handshake already refused any
/// caller without a certificate of the cluster CA.
pub struct Raft {
    replica: Replica,
    /// One snapshot is received at a time: each may hold gigabytes.
    snapshots: tokio::sync::Semaphore,
}

/// How long a snapshot's stream may wait for its next piece.
const PIECE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Raft {
    pub fn new(replica: Replica) -> Self {
        Self {
            replica,
            snapshots: tokio::sync::Semaphore::new(1),
        }
    }

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
        self.replica.step(b.from, b.from_address, msgs);
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn send_snapshot(
        &self,
        req: Request<tonic::Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        self.authorise(&req)?;
        let _one = self.snapshots.try_acquire().map_err(|_| {
            Status::resource_exhausted("a snapshot is being received already; send it later")
        })?;
        let mut pieces = req.into_inner();
        let mut next = async || match tokio::time::timeout(PIECE_WAIT, pieces.message()).await {
            Ok(piece) => piece,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no piece of the snapshot for {PIECE_WAIT:?}"
            ))),
        };
        let first = next()
            .await?
            .ok_or_else(|| Status::invalid_argument("message: the snapshot stream was empty"))?;
        let mut snapshot = Assembly::start(first).map_err(Status::invalid_argument)?;
        while let Some(piece) = next().await? {
            snapshot.add(piece).map_err(Status::invalid_argument)?;
        }
        let (from, from_address, msg) = snapshot.finish().map_err(Status::invalid_argument)?;
        if msg.to != self.replica.id() {
            return Err(Status::invalid_argument(format!(
                "message: a snapshot for raft node {}, not this one ({})",
                msg.to,
                self.replica.id()
            )));
        }
        // Not dropped when the node loop is busy, as other messages are: the
        // leader would count it delivered.
        self.replica
            .step_snapshot(from, from_address, msg)
            .await
            .map_err(|e| Status::unavailable(format!("the snapshot was not taken: {e}")))?;
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
        let result = self.replica.propose_local(op).await;
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
        self.replica
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
        Ok(Response::new(self.replica.scheduler_node()))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryPage>, Status> {
        self.authorise(&req)?;
        let r = req.into_inner();
        if r.to <= r.from {
            return Err(Status::invalid_argument("to: must be after from"));
        }
        let h = self.replica.history();
        // Only what this node holds whole: its own gap, or history it has not
        // stored yet, is another peer's to give.
        let missing = h.gap().filter(|g| g.from < r.to && r.from < g.to);
        if missing.is_some() || h.stored() < r.to {
            return Err(Status::failed_precondition(format!(
                "this scheduler does not hold the history of entries {} to {}",
                r.from + 1,
                r.to
            )));
        }
        let page = archive::page(h.pool(), r.from, r.to, crate::history::PAGE_RECORDS)
            .await
            .map_err(|e| Status::internal(format!("reading the history: {e:#}")))?;
        let items = |v: Vec<(u64, String)>| {
            v.into_iter()
                .map(|(index, json)| pb::HistoryItem { index, json })
                .collect()
        };
        Ok(Response::new(pb::HistoryPage {
            upto: page.upto,
            records: items(page.records),
            jobs: items(page.jobs),
        }))
    }
}
