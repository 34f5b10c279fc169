//! MemberService: members, auditors, and the tokens of both and of the
//! operator (add, list, rotate, suspend, resume, remove).

use coop_proto::v1::{self as pb, member_service_server::MemberService};
use tonic::{Request, Response, Status};

use super::{Ctx, after, invalid, page, propose_status};
use crate::auth::{hash_token, new_token};
use crate::clock::now_ms;
use coop_core::policy::Setting;
use coop_core::state::{Member, Op, Principal, State, valid_name};

pub struct Members(pub Ctx);

/// Longest token lifetime one may ask for: ten years.
const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// A token lifetime in seconds into an expiry time (`None`: never).
fn expiry(field: &str, ttl_s: u64) -> Result<Option<i64>, Status> {
    match ttl_s {
        0 => Ok(None),
        t if t > MAX_TTL_S => Err(invalid(field, "at most ten years")),
        t => Ok(Some(now_ms() + t as i64 * 1000)),
    }
}

fn member_to_pb(state: &State, m: &Member) -> pb::Member {
    let expires = state
        .tokens
        .iter()
        .find(|(_, p)| matches!(p, Principal::Member(n) if *n == m.name))
        .and_then(|(h, _)| state.token_expiry.get(h).copied())
        .unwrap_or(0);
    pb::Member {
        name: m.name.clone(),
        created_at_ms: m.created_at_ms,
        suspended: m.suspended,
        removed_at_ms: m.removed_at_ms.unwrap_or(0),
        token_expires_at_ms: expires,
    }
}

fn valid(field: &str, kind: &str, name: &str) -> Result<String, Status> {
    let name = name.trim();
    if !valid_name(name) {
        return Err(invalid(
            field,
            format!(
                "{name:?} is not a valid {kind} name (lowercase letters, digits, '-', '_'; at most 63)"
            ),
        ));
    }
    Ok(name.to_string())
}

impl Members {
    fn member(&self, name: &str) -> Result<pb::Member, Status> {
        let state = self.0.replica.read();
        let m = state
            .members
            .get(name)
            .ok_or_else(|| Status::not_found(format!("member {name:?} does not exist")))?;
        Ok(member_to_pb(&state, m))
    }

    async fn set_suspended(
        &self,
        req: Request<pb::MemberNameRequest>,
        suspended: bool,
    ) -> Result<Response<pb::Member>, Status> {
        self.0.operator(&req).await?;
        let name = valid("name", "member", &req.into_inner().name)?;
        let op = Op::SuspendMember {
            name: name.clone(),
            suspended,
        };
        self.change(op, &name).await
    }

    async fn change(&self, op: Op, name: &str) -> Result<Response<pb::Member>, Status> {
        self.0.replica.propose(op).await.map_err(propose_status)?;
        self.0.registry.wake_scheduler();
        Ok(Response::new(self.member(name)?))
    }
}

#[tonic::async_trait]
impl MemberService for Members {
    async fn add(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        self.0.operator(&req).await?;
        let r = req.into_inner();
        let name = valid("name", "member", &r.name)?;
        let expires_at_ms = expiry("expires", r.token_ttl_s)?;
        let token = new_token();
        let required = self.0.replica.read().policy.approvals_required;
        if required > 0 {
            // The co-op governs itself: the operator proposes, members decide.
            if expires_at_ms.is_some() {
                return Err(invalid(
                    "expires",
                    "a member added by proposal gets a token that does not expire; rotate it later",
                ));
            }
            let settings = vec![Setting::AddMember {
                name: name.clone(),
                token_hash: hash_token(&token),
            }];
            let reason = format!("add member {name}");
            self.0
                .replica
                .propose(Op::ProposePolicy {
                    settings: settings.clone(),
                    by: "operator".into(),
                    reason: reason.clone(),
                })
                .await
                .map_err(propose_status)?;
            let state = self.0.replica.read();
            let id = state
                .proposals
                .values()
                .rev()
                .find(|p| p.settings == settings)
                .map(|p| p.id)
                .ok_or_else(|| Status::internal("the proposal was applied but is not found"))?;
            return Ok(Response::new(pb::AddMemberResponse {
                member: None,
                token,
                proposal_id: id,
            }));
        }
        self.0
            .replica
            .propose(Op::AddMember {
                name: name.clone(),
                token_hash: hash_token(&token),
                expires_at_ms,
            })
            .await
            .map_err(propose_status)?;
        let member = Some(self.member(&name)?);
        Ok(Response::new(pb::AddMemberResponse {
            member,
            token,
            proposal_id: 0,
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        self.0.overseer(&req).await?;
        self.0.current().await?;
        let r = req.into_inner();
        let state = self.0.replica.read();
        let (members, next_page_token) = page(
            state
                .members
                .values()
                .filter(|m| after(&m.name, &r.page_token))
                .map(|m| (m.name.clone(), member_to_pb(&state, m))),
            r.limit,
        );
        Ok(Response::new(pb::ListMembersResponse {
            members,
            next_page_token,
        }))
    }

    async fn rotate_token(
        &self,
        req: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenResponse>, Status> {
        let who = self.0.actor(&req).await?;
        let r = req.into_inner();
        let account = match r.account.trim() {
            "operator" => Principal::Operator,
            "" => who.clone(),
            a => match a.split_once(':') {
                Some(("member", m)) => Principal::Member(valid("account", "member", m)?),
                Some(("auditor", m)) => Principal::Auditor(valid("account", "auditor", m)?),
                _ => {
                    return Err(invalid(
                        "account",
                        format!("{a:?} is not member:NAME, auditor:NAME or operator"),
                    ));
                }
            },
        };
        // The operator rotates any; a member only its own.
        if who != Principal::Operator && who != account {
            return Err(Status::permission_denied(
                "a member may rotate its own token only",
            ));
        }
        let mut expires_at_ms = expiry("expires", r.token_ttl_s)?;
        if who != Principal::Operator {
            // A member's own rotation never outlives the token it replaces:
            // a stolen token cannot buy itself a longer life.
            let state = self.0.replica.read();
            let current = state
                .tokens
                .iter()
                .filter(|(_, p)| **p == account)
                .filter_map(|(h, _)| state.token_expiry.get(h).copied())
                .min();
            if let Some(t) = current {
                expires_at_ms = Some(expires_at_ms.map_or(t, |e| e.min(t)));
            }
        }
        let token = new_token();
        self.0
            .replica
            .propose(Op::RotateToken {
                account,
                token_hash: hash_token(&token),
                expires_at_ms,
                by: Some(who),
            })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(pb::RotateTokenResponse {
            token,
            expires_at_ms: expires_at_ms.unwrap_or(0),
        }))
    }

    async fn suspend(
        &self,
        req: Request<pb::MemberNameRequest>,
    ) -> Result<Response<pb::Member>, Status> {
        self.set_suspended(req, true).await
    }

    async fn resume(
        &self,
        req: Request<pb::MemberNameRequest>,
    ) -> Result<Response<pb::Member>, Status> {
        self.set_suspended(req, false).await
    }

    async fn remove(
        &self,
        req: Request<pb::MemberNameRequest>,
    ) -> Result<Response<pb::Member>, Status> {
        self.0.operator(&req).await?;
        let name = valid("name", "member", &req.into_inner().name)?;
        self.change(Op::RemoveMember { name: name.clone() }, &name)
            .await
    }

    async fn add_auditor(
        &self,
        req: Request<pb::AddAuditorRequest>,
    ) -> Result<Response<pb::AddAuditorResponse>, Status> {
        self.0.operator(&req).await?;
        let name = valid("name", "auditor", &req.into_inner().name)?;
        let token = new_token();
        self.0
            .replica
            .propose(Op::AddAuditor {
                name: name.clone(),
                token_hash: hash_token(&token),
            })
            .await
            .map_err(propose_status)?;
        let auditor = self
            .0
            .replica
            .read()
            .auditors
            .get(&name)
            .map(|a| pb::Auditor {
                name: a.name.clone(),
                created_at_ms: a.created_at_ms,
            });
        Ok(Response::new(pb::AddAuditorResponse { auditor, token }))
    }

    async fn list_auditors(
        &self,
        req: Request<pb::ListAuditorsRequest>,
    ) -> Result<Response<pb::ListAuditorsResponse>, Status> {
        self.0.overseer(&req).await?;
        self.0.current().await?;
        let r = req.into_inner();
        let state = self.0.replica.read();
        let (auditors, next_page_token) = page(
            state
                .auditors
                .values()
                .filter(|a| after(&a.name, &r.page_token))
                .map(|a| {
                    let pb = pb::Auditor {
                        name: a.name.clone(),
                        created_at_ms: a.created_at_ms,
                    };
                    (a.name.clone(), pb)
                }),
            r.limit,
        );
        Ok(Response::new(pb::ListAuditorsResponse {
            auditors,
            next_page_token,
        }))
    }

    async fn remove_auditor(
        &self,
        req: Request<pb::RemoveAuditorRequest>,
    ) -> Result<Response<pb::RemoveAuditorResponse>, Status> {
        self.0.operator(&req).await?;
        let name = valid("name", "auditor", &req.into_inner().name)?;
        self.0
            .replica
            .propose(Op::RemoveAuditor { name })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(pb::RemoveAuditorResponse {}))
    }
}
