//! MemberService: add and list members (operator only).

use coop_proto::v1::{self as pb, member_service_server::MemberService};
use tonic::{Request, Response, Status};

use super::{Ctx, propose_status};
use crate::auth::{hash_token, new_token};
use crate::state::Op;

pub struct Members(pub Ctx);

#[tonic::async_trait]
impl MemberService for Members {
    async fn add(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        self.0.operator(&req).await?;
        let name = req.into_inner().name.trim().to_string();
        if !crate::state::valid_name(&name) {
            return Err(super::invalid(
                "name",
                format!(
                    "{name:?} is not a valid member name (lowercase letters, digits, '-', '_'; at most 63)"
                ),
            ));
        }
        let token = new_token();
        self.0
            .replica
            .propose(Op::AddMember {
                name: name.clone(),
                token_hash: hash_token(&token),
            })
            .await
            .map_err(propose_status)?;
        let member = self
            .0
            .replica
            .read()
            .members
            .get(&name)
            .map(|m| pb::Member {
                name: m.name.clone(),
                created_at_ms: m.created_at_ms,
            });
        Ok(Response::new(pb::AddMemberResponse { member, token }))
    }

    async fn list(
        &self,
        req: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        self.0.operator(&req).await?;
        self.0.current().await?;
        let state = self.0.replica.read();
        Ok(Response::new(pb::ListMembersResponse {
            members: state
                .members
                .values()
                .map(|m| pb::Member {
                    name: m.name.clone(),
                    created_at_ms: m.created_at_ms,
                })
                .collect(),
        }))
    }
}
