//! Governance: the co-op's first command, its members, and its policy, set
//! by the operator or by proposals that members approve.

use std::collections::BTreeSet;

use super::{
    Event, Member, PolicyChange, Principal, Proposal, Rejection, State, invalid, valid_name,
};
use crate::ledger;
use crate::policy::Setting;

/// Open proposals one proposer may have at once.
pub const MAX_OPEN_PROPOSALS: usize = 16;

impl State {
    pub(super) fn bootstrap(
        &mut self,
        at: i64,
        hash: &str,
        default_member: Option<&(String, String)>,
    ) -> Result<Vec<Event>, Rejection> {
        if self.bootstrapped() {
            return Err(Rejection::FailedPrecondition(
                "cluster is already bootstrapped".into(),
            ));
        }
        let mut events = Vec::new();
        if let Some((name, member_hash)) = default_member {
            events = self.add_member(at, name, member_hash)?;
            self.default_member = Some(name.clone());
        }
        self.operator_token_hash = Some(hash.to_string());
        self.tokens.insert(hash.to_string(), Principal::Operator);
        Ok(events)
    }

    pub(super) fn add_member(
        &mut self,
        at: i64,
        name: &str,
        hash: &str,
    ) -> Result<Vec<Event>, Rejection> {
        if !valid_name(name) {
            return Err(invalid(
                "name",
                format!(
                    "{name:?} is not a valid member name (lowercase letters, digits, '-', '_'; at most 63)"
                ),
            ));
        }
        if self.members.contains_key(name) {
            return Err(Rejection::AlreadyExists(format!(
                "member {name:?} already exists"
            )));
        }
        if self.tokens.contains_key(hash) {
            return Err(Rejection::AlreadyExists("token already in use".into()));
        }
        self.members.insert(
            name.to_string(),
            Member {
                name: name.to_string(),
                created_at_ms: at,
                suspended: false,
                removed_at_ms: None,
            },
        );
        self.tokens
            .insert(hash.to_string(), Principal::Member(name.to_string()));
        self.record(
            at,
            ledger::Entry::MemberAdded {
                member: name.to_string(),
            },
        );
        Ok(vec![Event::Member(name.to_string())])
    }

    /// Refuses what only a proposal may do while the co-op governs itself
    /// (`approvals` > 0): the operator alone may not do it.
    pub(super) fn ungoverned(&self, what: &str) -> Result<(), Rejection> {
        let k = self.policy.approvals_required;
        if k > 0 {
            return Err(Rejection::FailedPrecondition(format!(
                "{what} needs the approval of {k} members (policy approvals={k}): propose it"
            )));
        }
        Ok(())
    }

    /// Members that may vote: present ones. Suspension (the operator's
    /// alone) is about use and changes no vote; the member the operator's
    /// own jobs are billed to has the operator's token and never votes.
    pub(super) fn voters(&self) -> BTreeSet<String> {
        self.members
            .values()
            .filter(|m| m.removed_at_ms.is_none())
            .filter(|m| self.default_member.as_deref() != Some(m.name.as_str()))
            .map(|m| m.name.clone())
            .collect()
    }

    pub(super) fn check_settings(
        &self,
        settings: &[Setting],
        reason: &str,
    ) -> Result<(), Rejection> {
        if settings.is_empty() {
            return Err(invalid("settings", "name at least one KEY=VALUE"));
        }
        if reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "say why the policy changes (it is kept with the change)",
            ));
        }
        if settings.len() > 64 || reason.len() > 1024 {
            return Err(invalid(
                "settings",
                "at most 64 settings and a reason of at most 1024 bytes",
            ));
        }
        let named: Vec<&String> = settings
            .iter()
            .filter_map(|s| match s {
                Setting::AddMember { name, .. } | Setting::RemoveMember(name) => Some(name),
                _ => None,
            })
            .collect();
        if named.iter().collect::<BTreeSet<_>>().len() != named.len() {
            return Err(invalid("settings", "names one member twice"));
        }
        let hashes: Vec<&String> = settings
            .iter()
            .filter_map(|s| match s {
                Setting::AddMember { token_hash, .. } => Some(token_hash),
                _ => None,
            })
            .collect();
        if hashes.iter().collect::<BTreeSet<_>>().len() != hashes.len() {
            return Err(Rejection::AlreadyExists("token already in use".into()));
        }
        // Approvals are checked against the co-op as this change leaves it.
        let mut after = self.voters();
        for s in settings {
            match s {
                Setting::AddMember { name, .. } => {
                    after.insert(name.clone());
                }
                Setting::RemoveMember(name) => {
                    after.remove(name);
                }
                _ => {}
            }
        }
        let voters_after = after.len();
        let approvals_after = settings
            .iter()
            .rev()
            .find_map(|s| match s {
                Setting::Approvals(k) => Some(*k),
                _ => None,
            })
            .unwrap_or(self.policy.approvals_required);
        if approvals_after as usize > voters_after {
            return Err(invalid(
                "approvals",
                format!(
                    "{approvals_after} approvals, but the co-op would have {voters_after} members who can vote: nothing could pass again"
                ),
            ));
        }
        for s in settings {
            match s {
                Setting::Share { member, .. } if !self.members.contains_key(member) => {
                    return Err(Rejection::NotFound(format!(
                        "share.{member}: member {member:?} does not exist"
                    )));
                }
                Setting::MemberGpuQuota { member, .. } if !self.members.contains_key(member) => {
                    return Err(Rejection::NotFound(format!(
                        "gpu_quota.{member}: member {member:?} does not exist"
                    )));
                }
                Setting::AddMember { name, token_hash } => {
                    if !valid_name(name) {
                        return Err(invalid(
                            "member.add",
                            format!("{name:?} is not a valid member name"),
                        ));
                    }
                    if self.members.contains_key(name) {
                        return Err(Rejection::AlreadyExists(format!(
                            "member {name:?} already exists"
                        )));
                    }
                    if self.tokens.contains_key(token_hash) {
                        return Err(Rejection::AlreadyExists("token already in use".into()));
                    }
                }
                Setting::RemoveMember(name) => {
                    self.active_member(name)?;
                    if self.default_member.as_deref() == Some(name) {
                        return Err(Rejection::FailedPrecondition(format!(
                            "member {name:?} is the one the operator's own jobs are billed to"
                        )));
                    }
                }
                Setting::Approvals(k) if *k as usize > voters_after => {
                    return Err(invalid(
                        "approvals",
                        format!(
                            "{k} approvals, but the co-op would have {voters_after} members who can vote"
                        ),
                    ));
                }
                Setting::ModelWeightMilli { model, .. }
                    if model.is_empty()
                        || model.len() > 64
                        || !model.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    return Err(invalid(
                        "weight",
                        "a GPU model name is 1 to 64 printable characters",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn propose_policy(
        &mut self,
        at: i64,
        settings: &[Setting],
        by: &str,
        reason: &str,
    ) -> Result<Vec<Event>, Rejection> {
        self.check_settings(settings, reason)?;
        let required = self.policy.approvals_required;
        if required == 0 {
            return Err(Rejection::FailedPrecondition(
                "the policy needs no approvals (approvals=0): the operator sets it directly".into(),
            ));
        }
        let open = self
            .proposals
            .values()
            .filter(|p| p.by == by && p.enacted_at_ms.is_none() && p.expires_at_ms >= at)
            .count();
        if open >= MAX_OPEN_PROPOSALS {
            return Err(Rejection::ResourceExhausted {
                field: "proposals".into(),
                message: format!(
                    "{by} has {open} open proposals, the most one may have; let them pass or expire"
                ),
            });
        }
        let id = self.proposals.keys().next_back().map_or(1, |k| k + 1);
        let expires_at_ms =
            at.saturating_add((self.policy.proposal_ttl_s as i64).saturating_mul(1000));
        self.record(
            at,
            ledger::Entry::PolicyProposed {
                id,
                by: by.to_string(),
                reason: reason.to_string(),
                settings: settings.iter().map(ToString::to_string).collect(),
                expires_at_ms,
            },
        );
        self.proposals.insert(
            id,
            Proposal {
                id,
                settings: settings.to_vec(),
                by: by.to_string(),
                reason: reason.to_string(),
                created_at_ms: at,
                expires_at_ms,
                approvals: BTreeSet::new(),
                required,
                enacted_at_ms: None,
                electorate: self.voters(),
            },
        );
        Ok(vec![])
    }

    pub(super) fn approve_policy(
        &mut self,
        at: i64,
        id: u64,
        member: &str,
    ) -> Result<Vec<Event>, Rejection> {
        if !self.members.contains_key(member) {
            return Err(Rejection::NotFound(format!(
                "member {member:?} does not exist"
            )));
        }
        let voters = self.voters();
        if !voters.contains(member) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {member} does not vote (removed, or the member the operator's own jobs are billed to)"
            )));
        }
        let p = self
            .proposals
            .get(&id)
            .ok_or_else(|| Rejection::NotFound(format!("proposal {id} does not exist")))?;
        if !p.electorate.is_empty() && !p.electorate.contains(member) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {member} joined after proposal {id} was made: only the members of the co-op then vote on it"
            )));
        }
        if !p.electorate.is_empty() && !self.self_keyed.contains(member) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {member} votes with a token of its own: rotate it first with the one it was given (coop member token rotate {member}); the operator has seen that one"
            )));
        }
        if p.enacted_at_ms.is_some() {
            return Err(Rejection::FailedPrecondition(format!(
                "proposal {id} has already been enacted"
            )));
        }
        if at > p.expires_at_ms {
            return Err(Rejection::FailedPrecondition(format!(
                "proposal {id} expired without enough approvals"
            )));
        }
        if p.approvals.contains(member) {
            return Err(Rejection::AlreadyExists(format!(
                "member {member} has already approved proposal {id}"
            )));
        }
        // Approvals of members removed since no longer count.
        let standing = p.approvals.iter().filter(|m| voters.contains(*m)).count() as u32;
        let enact = standing + 1 >= p.required;
        let (settings, reason) = (p.settings.clone(), p.reason.clone());
        if enact {
            // Checked again: members may have left since it was proposed.
            self.check_settings(&settings, &reason)?;
        }
        self.record(
            at,
            ledger::Entry::PolicyApproved {
                id,
                member: member.to_string(),
            },
        );
        let p = self.proposals.get_mut(&id).expect("checked");
        p.approvals.insert(member.to_string());
        if enact {
            p.enacted_at_ms = Some(at);
            let by = format!(
                "proposal {id} by {}, approved by {}",
                p.by,
                p.approvals.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            return self.set_policy(at, &settings, &by, &reason);
        }
        Ok(vec![])
    }

    pub(super) fn set_policy(
        &mut self,
        at: i64,
        settings: &[Setting],
        by: &str,
        reason: &str,
    ) -> Result<Vec<Event>, Rejection> {
        self.check_settings(settings, reason)?;
        let mut policy = self.policy.clone();
        for s in settings {
            policy.set(s);
        }
        // Membership changes (checked above, so they succeed).
        let mut events = vec![];
        for s in settings {
            match s {
                Setting::AddMember { name, token_hash } => {
                    events.extend(self.add_member(at, name, token_hash)?);
                }
                Setting::RemoveMember(name) => events.extend(self.remove_member(at, name)?),
                _ => {}
            }
        }
        if policy.half_life_s != self.policy.half_life_s {
            // Usage so far decays at the old rate up to now, at the new one after.
            let old = self.policy.half_life_s;
            for d in self.decayed.values_mut() {
                d.advance(at, old);
            }
        }
        self.policy = policy;
        self.record(
            at,
            ledger::Entry::PolicyChanged {
                by: by.to_string(),
                reason: reason.to_string(),
                settings: settings.iter().map(ToString::to_string).collect(),
            },
        );
        self.policy_log.push(PolicyChange {
            at_ms: at,
            by: by.to_string(),
            reason: reason.to_string(),
            settings: settings.to_vec(),
        });
        Ok(events)
    }
}
