//! Who may act: auditors, token rotation, suspended and removed members, and
//! the enrollment of agent machines. Pure like the rest of the state machine:
//! times come in the command; token expiry is checked by the caller's clock.

use std::collections::BTreeSet;

use crate::ledger;
use crate::state::{Event, JobState, Principal, Rejection, State, valid_name};

pub use crate::model::{Auditor, Enrollment};

/// Why a credential is refused, for the caller's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Unknown,
    Expired,
    Suspended(String),
}

/// The name of an account in the audit ledger.
pub fn account_name(p: &Principal) -> String {
    match p {
        Principal::Operator => "operator".into(),
        Principal::Member(m) => format!("member:{m}"),
        Principal::Auditor(a) => format!("auditor:{a}"),
        Principal::Node(n) => format!("node:{n}"),
    }
}

fn not_found(what: &str, name: &str) -> Rejection {
    Rejection::NotFound(format!("{what} {name:?} does not exist"))
}

impl State {
    /// The principal a token (by hash) stands for at `now_ms`.
    pub fn authenticate(&self, token_hash: &str, now_ms: i64) -> Result<&Principal, Refused> {
        let p = self.tokens.get(token_hash).ok_or(Refused::Unknown)?;
        if self
            .token_expiry
            .get(token_hash)
            .is_some_and(|&t| t <= now_ms)
        {
            return Err(Refused::Expired);
        }
        if let Principal::Member(m) = p
            && self.members.get(m).is_some_and(|m| m.suspended)
        {
            return Err(Refused::Suspended(m.clone()));
        }
        Ok(p)
    }

    /// A member that exists and has not been removed.
    pub fn active_member(&self, name: &str) -> Result<&crate::state::Member, Rejection> {
        self.members
            .get(name)
            .filter(|m| m.removed_at_ms.is_none())
            .ok_or_else(|| not_found("member", name))
    }

    fn log_account(&mut self, at: i64, account: &Principal, change: &str) {
        self.record(
            at,
            ledger::Entry::AccountChanged {
                account: account_name(account),
                change: change.to_string(),
            },
        );
    }

    /// Drops every token of `account`.
    fn drop_tokens(&mut self, account: &Principal) {
        let dead: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, p)| *p == account)
            .map(|(h, _)| h.clone())
            .collect();
        for h in dead {
            self.tokens.remove(&h);
            self.token_expiry.remove(&h);
        }
    }

    fn fresh_token(&self, hash: &str) -> Result<(), Rejection> {
        if self.tokens.contains_key(hash) || self.enrollments.contains_key(hash) {
            return Err(Rejection::AlreadyExists("token already in use".into()));
        }
        Ok(())
    }

    pub(crate) fn add_auditor(
        &mut self,
        at: i64,
        name: &str,
        hash: &str,
    ) -> Result<Vec<Event>, Rejection> {
        if !valid_name(name) {
            return Err(Rejection::InvalidArgument {
                field: "name".into(),
                message: format!(
                    "{name:?} is not a valid auditor name (lowercase letters, digits, '-', '_'; at most 63)"
                ),
            });
        }
        if self.auditors.contains_key(name) {
            return Err(Rejection::AlreadyExists(format!(
                "auditor {name:?} already exists"
            )));
        }
        self.fresh_token(hash)?;
        self.auditors.insert(
            name.to_string(),
            Auditor {
                name: name.to_string(),
                created_at_ms: at,
            },
        );
        let p = Principal::Auditor(name.to_string());
        self.tokens.insert(hash.to_string(), p.clone());
        self.log_account(at, &p, "added");
        Ok(vec![])
    }

    pub(crate) fn remove_auditor(&mut self, at: i64, name: &str) -> Result<Vec<Event>, Rejection> {
        if self.auditors.remove(name).is_none() {
            return Err(not_found("auditor", name));
        }
        let p = Principal::Auditor(name.to_string());
        self.drop_tokens(&p);
        self.log_account(at, &p, "removed");
        Ok(vec![])
    }

    pub(crate) fn rotate_token(
        &mut self,
        at: i64,
        account: &Principal,
        hash: &str,
        expires_at_ms: Option<i64>,
    ) -> Result<Vec<Event>, Rejection> {
        match account {
            // An operator token that expired would leave no one to renew it.
            Principal::Operator if expires_at_ms.is_some() => {
                return Err(Rejection::InvalidArgument {
                    field: "expires".into(),
                    message: "the operator's token does not expire".into(),
                });
            }
            Principal::Operator => {}
            Principal::Member(m) => {
                self.active_member(m)?;
            }
            Principal::Auditor(a) => {
                if !self.auditors.contains_key(a) {
                    return Err(not_found("auditor", a));
                }
            }
            Principal::Node(n) => {
                return Err(Rejection::FailedPrecondition(format!(
                    "node {n:?} gets a new credential by enrolling again (coop node enroll)"
                )));
            }
        }
        self.fresh_token(hash)?;
        self.drop_tokens(account);
        self.tokens.insert(hash.to_string(), account.clone());
        if let Some(t) = expires_at_ms {
            self.token_expiry.insert(hash.to_string(), t);
        }
        if *account == Principal::Operator {
            self.operator_token_hash = Some(hash.to_string());
        }
        self.log_account(at, account, "token_rotated");
        Ok(vec![])
    }

    pub(crate) fn suspend_member(
        &mut self,
        at: i64,
        name: &str,
        suspended: bool,
    ) -> Result<Vec<Event>, Rejection> {
        self.active_member(name)?;
        let m = self.members.get_mut(name).expect("checked above");
        if m.suspended == suspended {
            return Ok(vec![]);
        }
        m.suspended = suspended;
        let change = if suspended { "suspended" } else { "resumed" };
        self.log_account(at, &Principal::Member(name.to_string()), change);
        Ok(vec![Event::Member(name.to_string())])
    }

    pub(crate) fn remove_member(&mut self, at: i64, name: &str) -> Result<Vec<Event>, Rejection> {
        self.active_member(name)?;
        if self.default_member.as_deref() == Some(name) {
            return Err(Rejection::FailedPrecondition(format!(
                "member {name:?} is the one the operator's own jobs are billed to"
            )));
        }
        let mut events = vec![Event::Member(name.to_string())];
        let jobs: Vec<_> = self
            .jobs
            .values()
            .filter(|j| {
                j.member == name && matches!(j.state, JobState::Pending | JobState::Running)
            })
            .map(|j| j.id)
            .collect();
        for id in jobs {
            events.extend(self.cancel(at, id)?);
        }
        // Its machines, registered or only joined.
        let nodes: BTreeSet<String> = self
            .nodes
            .values()
            .filter(|n| n.owner == name)
            .map(|n| n.name.clone())
            .chain(
                self.node_owners
                    .iter()
                    .filter(|(_, o)| *o == name)
                    .map(|(n, _)| n.clone()),
            )
            .collect();
        for n in nodes {
            events.extend(self.revoke_node(at, &n)?);
        }
        self.enrollments.retain(|_, e| e.owner != name);
        let p = Principal::Member(name.to_string());
        self.drop_tokens(&p);
        let m = self.members.get_mut(name).expect("checked above");
        m.removed_at_ms = Some(at);
        m.suspended = false;
        self.log_account(at, &p, "removed");
        Ok(events)
    }

    pub(crate) fn enroll_node(
        &mut self,
        at: i64,
        node: &str,
        owner: &str,
        join_hash: &str,
        expires_at_ms: i64,
    ) -> Result<Vec<Event>, Rejection> {
        if !valid_name(node) {
            return Err(Rejection::InvalidArgument {
                field: "node".into(),
                message: format!("{node:?} is not a valid node name"),
            });
        }
        self.active_member(owner)
            .map_err(|_| Rejection::NotFound(format!("owner: member {owner:?} does not exist")))?;
        // A name held by another owner (up, joined, or with a join token out)
        // is theirs until revoked.
        let held = self
            .node_owners
            .get(node)
            .map(String::as_str)
            .or(self
                .nodes
                .get(node)
                .filter(|n| n.up)
                .map(|n| n.owner.as_str()))
            .or(self
                .enrollments
                .values()
                .find(|e| e.node == node)
                .map(|e| e.owner.as_str()));
        if let Some(other) = held.filter(|o| *o != owner) {
            return Err(Rejection::FailedPrecondition(format!(
                "node {node:?} belongs to {other}: revoke it (coop node revoke) before enrolling it for {owner}"
            )));
        }
        if expires_at_ms <= at {
            return Err(Rejection::InvalidArgument {
                field: "ttl".into(),
                message: "the join token would expire at once".into(),
            });
        }
        self.fresh_token(join_hash)?;
        // One outstanding join token per node (a new one replaces the old);
        // expired ones go.
        self.enrollments
            .retain(|_, e| e.node != node && e.expires_at_ms > at);
        self.enrollments.insert(
            join_hash.to_string(),
            Enrollment {
                node: node.to_string(),
                owner: owner.to_string(),
                created_at_ms: at,
                expires_at_ms,
            },
        );
        self.log_account(at, &Principal::Node(node.to_string()), "enrolled");
        Ok(vec![])
    }

    pub(crate) fn join_node(
        &mut self,
        at: i64,
        join_hash: &str,
        credential_hash: &str,
    ) -> Result<Vec<Event>, Rejection> {
        let Some(e) = self.enrollments.get(join_hash) else {
            return Err(Rejection::NotFound(
                "join token: unknown or already used".into(),
            ));
        };
        if e.expires_at_ms <= at {
            return Err(Rejection::FailedPrecondition(
                "join token: expired; enroll the node again".into(),
            ));
        }
        if self.tokens.contains_key(credential_hash) {
            return Err(Rejection::AlreadyExists("credential already in use".into()));
        }
        if self.active_member(&e.owner).is_err() {
            return Err(Rejection::FailedPrecondition(format!(
                "join token: its owner {} is no longer a member",
                e.owner
            )));
        }
        let e = self.enrollments.remove(join_hash).expect("checked above");
        let p = Principal::Node(e.node.clone());
        // A machine that enrolls again replaces the old credential.
        self.drop_tokens(&p);
        self.tokens.insert(credential_hash.to_string(), p.clone());
        self.node_owners.insert(e.node.clone(), e.owner.clone());
        // Enrolled again: its next registration says what its GPUs are.
        self.inventory.remove(&e.node);
        self.log_account(at, &p, "joined");
        Ok(vec![Event::Node(e.node)])
    }

    pub(crate) fn revoke_node(&mut self, at: i64, node: &str) -> Result<Vec<Event>, Rejection> {
        let p = Principal::Node(node.to_string());
        let known = self.nodes.contains_key(node)
            || self.tokens.values().any(|t| *t == p)
            || self.enrollments.values().any(|e| e.node == node);
        if !known {
            return Err(not_found("node", node));
        }
        self.drop_tokens(&p);
        self.enrollments.retain(|_, e| e.node != node);
        self.node_owners.remove(node);
        self.inventory.remove(node);
        let mut events = vec![Event::Node(node.to_string())];
        if self.nodes.contains_key(node) {
            events.extend(self.node_down(node, at)?);
        }
        self.log_account(at, &p, "revoked");
        Ok(events)
    }
}
