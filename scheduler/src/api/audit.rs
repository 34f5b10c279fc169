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
use crate::consensus::archive;

/// Records an export reads from the store at a time.
const EXPORT_PAGE: u32 = 5000;

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
        // The chain as of now, read from the store a page at a time as the
        // client takes it (the export of a long history is long).
        let (head, index) = {
            let (state, index) = self.0.replica.read_indexed();
            (state.chain.seq, index)
        };
        let pool = self
            .0
            .replica
            .history_at(index)
            .await
            .map_err(crate::status::propose_status)?
            .clone();
        let from = r.from_ms;
        let pages = futures::stream::unfold(Some(0u64), move |after| {
            let pool = pool.clone();
            async move {
                let after = after?;
                // Usage entries carry the agent's time of the interval, so
                // the chain is not sorted by time: filter by time, page by seq.
                match archive::audit_between(&pool, from, to, after, EXPORT_PAGE).await {
                    Ok(rows) => {
                        let rows: Vec<_> = rows.into_iter().filter(|e| e.seq <= head).collect();
                        let next = match rows.last() {
                            Some(last) if rows.len() == EXPORT_PAGE as usize => Some(last.seq),
                            _ => None,
                        };
                        let items: Vec<Result<pb::AuditRecord, Status>> = rows
                            .iter()
                            .map(|e| {
                                serde_json::to_string(e)
                                    .map(|json| pb::AuditRecord { seq: e.seq, json })
                                    .map_err(|err| {
                                        Status::internal(format!("encoding entry {}: {err}", e.seq))
                                    })
                            })
                            .collect();
                        Some((futures::stream::iter(items), next))
                    }
                    Err(e) => Some((
                        futures::stream::iter(vec![Err(super::usage::history_error(e))]),
                        None,
                    )),
                }
            }
        });
        Ok(Response::new(Box::pin(futures::StreamExt::flatten(pages))))
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
            (state.chain.seq, state.chain.hash.clone())
        };
        let h = self.0.signer.sign(seq, &hash, now_ms());
        Ok(Response::new(head_to_pb(h)))
    }
}
