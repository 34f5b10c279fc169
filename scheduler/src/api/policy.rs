//! PolicyService: the policy and its history; changes by the operator only.

use coop_proto::v1::{self as pb, policy_service_server::PolicyService};
use tonic::{Request, Response, Status};

use super::{Ctx, invalid, propose_status};
use crate::policy::Setting;
use crate::state::{Op, State};

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
        self.0.principal(&req)?;
        Ok(Response::new(policy_to_pb(&self.0.replica.read())))
    }

    async fn set(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        self.0.operator(&req)?;
        let r = req.into_inner();
        if r.settings.is_empty() {
            return Err(invalid("settings", "name at least one KEY=VALUE"));
        }
        let settings = r
            .settings
            .iter()
            .map(|kv| Setting::parse(kv).map_err(|(k, m)| invalid(&k, m)))
            .collect::<Result<Vec<_>, _>>()?;
        if r.reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "say why the policy changes (it is kept with the change)",
            ));
        }
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
}
