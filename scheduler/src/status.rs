//! How the scheduler's errors reach a gRPC client: the status code, and
//! metadata telling a client whether it may try another scheduler.

use tonic::Status;

use crate::replica::ProposeError;
use coop_core::state::Rejection;

pub fn rejection_status(r: Rejection) -> Status {
    match r {
        Rejection::InvalidArgument { .. } => Status::invalid_argument(r.to_string()),
        Rejection::NotFound(m) => Status::not_found(m),
        Rejection::AlreadyExists(m) => Status::already_exists(m),
        Rejection::FailedPrecondition(m) => Status::failed_precondition(m),
        Rejection::ResourceExhausted { .. } => Status::resource_exhausted(r.to_string()),
    }
}

/// Metadata naming the leader's address on an UNAVAILABLE answer.
pub const LEADER_HEADER: &str = "x-coop-leader";
/// Metadata on an UNAVAILABLE answer when the call was certainly not carried
/// out (this node knows no leader): a client may send it to another node.
pub const NOT_APPLIED_HEADER: &str = "x-coop-not-applied";

pub fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Rejected(r) => rejection_status(r),
        ProposeError::Unavailable(m) => Status::unavailable(m),
        ProposeError::Internal(m) => Status::internal(m),
        ProposeError::NotLeader(leader) => {
            let mut s = Status::unavailable(ProposeError::NotLeader(leader.clone()).to_string());
            s.metadata_mut().insert(
                NOT_APPLIED_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            if let Some(l) = leader
                && let Ok(v) = l.parse()
            {
                s.metadata_mut().insert(LEADER_HEADER, v);
            }
            s
        }
    }
}
