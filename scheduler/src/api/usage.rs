//! UsageService: GPU time per member.

use coop_proto::v1::{self as pb, usage_service_server::UsageService};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::replica::now_ms;
use crate::state::Principal;
use crate::usage::member_usage;

pub struct Usage(pub Ctx);

#[tonic::async_trait]
impl UsageService for Usage {
    async fn get(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let who = self.0.principal(&req)?;
        let asked = req.into_inner().member.trim().to_string();
        let only = match (&who, asked.as_str()) {
            (Principal::Operator, "") => None,
            (Principal::Operator, m) => Some(m.to_string()),
            (Principal::Member(m), "") => Some(m.clone()),
            (Principal::Member(m), a) if a == m => Some(m.clone()),
            (Principal::Member(m), a) => {
                return Err(Status::permission_denied(format!(
                    "member {m} may not read the usage of {a}"
                )));
            }
        };
        let state = self.0.replica.read();
        if let Some(m) = &only
            && !state.members.contains_key(m)
        {
            return Err(Status::not_found(format!("member: {m:?} does not exist")));
        }
        let now = now_ms();
        let members = member_usage(&state, now, only.as_deref())
            .into_iter()
            .map(|u| pb::MemberUsage {
                member: u.member,
                gpu_ms: u.gpu_ms,
                running_jobs: u.running_jobs,
                running_gpus: u.running_gpus,
                pending_jobs: u.pending_jobs,
                finished_jobs: u.finished_jobs,
            })
            .collect();
        Ok(Response::new(pb::GetUsageResponse {
            members,
            as_of_ms: now,
        }))
    }
}
