//! AuditService: the hash-chained ledger, exported for verification, and its
//! head signed by this scheduler (`head`).

use std::pin::Pin;

use coop_proto::v1::{self as pb, audit_service_server::AuditService};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{Ctx, invalid};
use crate::head::SignedHead;

/// A signed head as the API carries it, and back: the same fields.
pub fn head_to_pb(h: SignedHead) -> pb::AuditHead {
    pb::AuditHead {
        format: h.format,
        seq: h.seq,
        hash: h.hash,
        at_ms: h.at_ms,
        scheduler_id: h.scheduler_id,
        public_key: h.public_key,
        signature: h.signature,
    }
}

pub fn head_from_pb(h: pb::AuditHead) -> SignedHead {
    SignedHead {
        format: h.format,
        seq: h.seq,
        hash: h.hash,
        at_ms: h.at_ms,
        scheduler_id: h.scheduler_id,
        public_key: h.public_key,
        signature: h.signature,
    }
}
use crate::clock::now_ms;
use coop_core::ledger::GENESIS;

pub struct Audit(pub Ctx);

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for Audit {
    type ExportStream = RecordStream;

    async fn export(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        self.0.overseer(&req).await?;
        self.0.current().await?;
        let r = req.into_inner();
        let to = if r.to_ms == 0 { i64::MAX } else { r.to_ms };
        if r.from_ms > to {
            return Err(invalid("from_ms", "the period starts after it ends"));
        }
        // Encoded under the read lock, sent after it is released.
        let records: Vec<Result<pb::AuditRecord, Status>> = {
            let state = self.0.replica.read();
            // Usage entries carry the agent's time of the interval, so the
            // chain is not sorted by time: filter, don't search.
            state
                .audit
                .iter()
                .filter(|e| e.at_ms >= r.from_ms && e.at_ms <= to)
                .map(|e| {
                    serde_json::to_string(e)
                        .map(|json| pb::AuditRecord { seq: e.seq, json })
                        .map_err(|err| Status::internal(format!("encoding entry {}: {err}", e.seq)))
                })
                .collect()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(records))))
    }

    async fn head(
        &self,
        req: Request<pb::AuditHeadRequest>,
    ) -> Result<Response<pb::AuditHead>, Status> {
        // Any person: members keep heads as witnesses. Not a node's credential.
        self.0.principal(&req).await?;
        self.0.current().await?;
        let (seq, hash) = {
            let state = self.0.replica.read();
            state
                .audit
                .last()
                .map_or((0, GENESIS.to_string()), |r| (r.seq, r.hash.clone()))
        };
        let h = self.0.signer.sign(seq, &hash, now_ms());
        Ok(Response::new(head_to_pb(h)))
    }
}
