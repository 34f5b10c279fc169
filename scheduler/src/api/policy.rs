//! PolicyService: the policy and its history; changes by the operator only.

use coop_proto::v1::{self as pb, policy_service_server::PolicyService};
use tonic::{Request, Response, Status};

use super::{Ctx, after, invalid, page, propose_status};
use crate::clock::now_ms;
use coop_core::policy::Setting;
use coop_core::state::{Op, Principal, Proposal, State};

fn proposal_to_pb(p: &Proposal, now: i64) -> pb::PolicyProposal {
    pb::PolicyProposal {
        id: p.id,
        settings: p.settings.iter().map(ToString::to_string).collect(),
        by: p.by.clone(),
        reason: p.reason.clone(),
        created_at_ms: p.created_at_ms,
        expires_at_ms: p.expires_at_ms,
        approvals: p.approvals.iter().cloned().collect(),
        required: p.required,
        state: match p.enacted_at_ms {
            Some(_) => "enacted",
            None if now > p.expires_at_ms => "expired",
            None => "open",
        }
        .into(),
    }
}

fn parse_settings(settings: &[String], reason: &str) -> Result<Vec<Setting>, Status> {
    if settings.is_empty() {
        return Err(invalid("settings", "name at least one KEY=VALUE"));
    }
    let parsed = settings
        .iter()
        .map(|kv| Setting::parse(kv).map_err(|(k, m)| invalid(&k, m)))
        .collect::<Result<Vec<_>, _>>()?;
    if reason.trim().is_empty() {
        return Err(invalid(
            "reason",
            "say why the policy changes (it is kept with the change)",
        ));
    }
    Ok(parsed)
}

pub struct Policies(pub Ctx);

fn policy_to_pb(state: &State) -> pb::Policy {
    pb::Policy {
        settings: state
            .policy
            .settings()
            .iter()
            .map(ToString::to_string)
            .collect(),
        changes: state
            .policy_log
            .iter()
            .map(|c| pb::PolicyChange {
                at_ms: c.at_ms,
                by: c.by.clone(),
                reason: c.reason.clone(),
                settings: c.settings.iter().map(ToString::to_string).collect(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl PolicyService for Policies {
    async fn get(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        self.0.principal(&req).await?;
        self.0.current().await?;
        Ok(Response::new(policy_to_pb(&self.0.replica.read())))
    }

    async fn set(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        self.0.operator(&req).await?;
        let r = req.into_inner();
        let settings = parse_settings(&r.settings, &r.reason)?;
        self.0
            .replica
            .propose(Op::SetPolicy {
                settings,
                by: "operator".into(),
                reason: r.reason.trim().to_string(),
            })
            .await
            .map_err(propose_status)?;
        self.0.registry.wake_scheduler();
        Ok(Response::new(policy_to_pb(&self.0.replica.read())))
    }

    async fn propose(
        &self,
        req: Request<pb::ProposePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let by = match self.0.actor(&req).await? {
            Principal::Operator => "operator".to_string(),
            Principal::Member(m) => m,
            Principal::Auditor(_) | Principal::Node(_) => unreachable!("refused by actor"),
        };
        let r = req.into_inner();
        let settings = parse_settings(&r.settings, &r.reason)?;
        let reason = r.reason.trim().to_string();
        self.0
            .replica
            .propose(Op::ProposePolicy {
                settings: settings.clone(),
                by: by.clone(),
                reason: reason.clone(),
            })
            .await
            .map_err(propose_status)?;
        let state = self.0.replica.read();
        let p = state
            .proposals
            .values()
            .rev()
            .find(|p| p.by == by && p.reason == reason && p.settings == settings)
            .ok_or_else(|| Status::internal("the proposal was applied but is not found"))?;
        Ok(Response::new(proposal_to_pb(p, now_ms())))
    }

    async fn approve(
        &self,
        req: Request<pb::ApprovePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let member = match self.0.actor(&req).await? {
            Principal::Member(m) => m,
            Principal::Operator => {
                return Err(Status::permission_denied(
                    "approvals come from members, each with its own token; the operator has none",
                ));
            }
            Principal::Auditor(_) | Principal::Node(_) => unreachable!("refused by actor"),
        };
        let id = req.into_inner().id;
        self.0
            .replica
            .propose(Op::ApprovePolicy { id, member })
            .await
            .map_err(propose_status)?;
        self.0.registry.wake_scheduler();
        let state = self.0.replica.read();
        Ok(Response::new(proposal_to_pb(
            &state.proposals[&id],
            now_ms(),
        )))
    }

    async fn list_proposals(
        &self,
        req: Request<pb::ListProposalsRequest>,
    ) -> Result<Response<pb::ListProposalsResponse>, Status> {
        self.0.principal(&req).await?;
        self.0.current().await?;
        let r = req.into_inner();
        let now = now_ms();
        let state = self.0.replica.read();
        let (proposals, next_page_token) = page(
            state
                .proposals
                .values()
                .map(|p| (format!("{:020}", p.id), p))
                .filter(|(k, _)| after(k, &r.page_token))
                .map(|(k, p)| (k, proposal_to_pb(p, now))),
            r.limit,
        );
        Ok(Response::new(pb::ListProposalsResponse {
            proposals,
            next_page_token,
        }))
    }
}
