//! Who may act, in the pure state machine: enrollment, joining, revocation,
//! removal, rotation and expiry. Every rejected command must change nothing.

use coop_core::accounts::Refused;
use coop_core::state::*;

fn apply(s: &mut State, at: i64, op: Op) -> Result<Vec<Event>, Rejection> {
    let before = s.clone();
    let r = s.apply(&Command { at_ms: at, op });
    if r.is_err() {
        assert_eq!(*s, before, "a rejected command changed the state");
    }
    r
}

fn coop() -> State {
    let mut s = State::default();
    let boot = Op::Bootstrap {
        operator_token_hash: "op".into(),
        default_member: None,
    };
    apply(&mut s, 0, boot).unwrap();
    for m in ["alice", "bob"] {
        let add = Op::AddMember {
            name: m.into(),
            token_hash: format!("h-{m}"),
            expires_at_ms: None,
        };
        apply(&mut s, 0, add).unwrap();
    }
    s
}

fn enroll(node: &str, owner: &str, join: &str) -> Op {
    Op::EnrollNode {
        node: node.into(),
        owner: owner.into(),
        join_hash: join.into(),
        expires_at_ms: 1_000,
    }
}

fn join(join: &str, cred: &str) -> Op {
    Op::JoinNode {
        join_hash: join.into(),
        credential_hash: cred.into(),
    }
}

fn register(node: &str, owner: &str) -> Op {
    Op::RegisterNode {
        node: node.into(),
        owner: owner.into(),
        gpus: vec![GpuInfo {
            uuid: format!("GPU-{node}"),
            index: 0,
            model: "A100-80GB".into(),
            memory_mb: 81_920,
            measured: None,
            power_limit_w: 0,
        }],
        session: "s".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    }
}

#[test]
fn a_join_token_is_good_once_before_it_expires_for_its_node_and_owner() {
    let mut s = coop();
    apply(&mut s, 10, enroll("n1", "alice", "j1")).unwrap();
    // Expired: refused, and the token stays unused (nothing changes).
    assert!(apply(&mut s, 1_000, join("j1", "c1")).is_err());
    apply(&mut s, 20, join("j1", "c1")).unwrap();
    assert_eq!(s.authenticate("c1", 30), Ok(&Principal::Node("n1".into())));
    assert_eq!(s.node_owners["n1"], "alice");
    // Used: a second exchange fails.
    assert!(apply(&mut s, 30, join("j1", "c2")).is_err());
    // Joining again with a new enrollment replaces the old credential.
    apply(&mut s, 40, enroll("n1", "alice", "j2")).unwrap();
    apply(&mut s, 50, join("j2", "c3")).unwrap();
    assert_eq!(s.authenticate("c1", 60), Err(Refused::Unknown));
    assert!(s.authenticate("c3", 60).is_ok());
}

#[test]
fn a_node_name_held_by_one_owner_cannot_be_taken_by_another() {
    let mut s = coop();
    apply(&mut s, 10, enroll("n1", "alice", "j1")).unwrap();
    // Outstanding join token: bob cannot take the name.
    assert!(matches!(
        apply(&mut s, 20, enroll("n1", "bob", "j2")),
        Err(Rejection::FailedPrecondition(_))
    ));
    apply(&mut s, 30, join("j1", "c1")).unwrap();
    // Joined: still alice's.
    assert!(apply(&mut s, 40, enroll("n1", "bob", "j3")).is_err());
    assert!(s.authenticate("c1", 50).is_ok());
    // Revoked, the name is free again.
    apply(&mut s, 60, Op::RevokeNode { node: "n1".into() }).unwrap();
    assert_eq!(s.authenticate("c1", 70), Err(Refused::Unknown));
    apply(&mut s, 80, enroll("n1", "bob", "j4")).unwrap();
}

#[test]
fn a_removed_member_keeps_no_machine_and_no_token() {
    let mut s = coop();
    apply(&mut s, 10, enroll("n1", "alice", "j1")).unwrap();
    apply(&mut s, 20, join("j1", "c1")).unwrap();
    apply(&mut s, 25, enroll("n2", "alice", "j2")).unwrap();
    apply(&mut s, 30, register("n1", "alice")).unwrap();
    apply(&mut s, 40, enroll("n3", "alice", "j3")).unwrap();
    apply(&mut s, 45, join("j3", "c3")).unwrap();
    // n3 joined but never registered; n2 has a join token out.
    apply(
        &mut s,
        50,
        Op::RemoveMember {
            name: "alice".into(),
        },
    )
    .unwrap();
    assert_eq!(s.authenticate("h-alice", 60), Err(Refused::Unknown));
    assert_eq!(s.authenticate("c1", 60), Err(Refused::Unknown));
    assert_eq!(s.authenticate("c3", 60), Err(Refused::Unknown));
    assert!(!s.nodes["n1"].up);
    assert!(apply(&mut s, 70, join("j2", "c2")).is_err());
    assert!(apply(&mut s, 80, register("n3", "alice")).is_err());
    assert!(s.members["alice"].removed_at_ms.is_some());
    // Its history stays in the ledger.
    let removed = s.outbox.records.iter().any(|r| {
        matches!(&r.entry, coop_core::ledger::Entry::AccountChanged { account, change }
            if account == "member:alice" && change == "removed")
    });
    assert!(removed);
}

#[test]
fn tokens_expire_rotate_and_suspension_refuses_them() {
    let mut s = coop();
    let add = Op::AddMember {
        name: "carol".into(),
        token_hash: "h-carol".into(),
        expires_at_ms: Some(500),
    };
    apply(&mut s, 10, add).unwrap();
    assert!(s.authenticate("h-carol", 499).is_ok());
    assert_eq!(s.authenticate("h-carol", 500), Err(Refused::Expired));
    let rotate = Op::RotateToken {
        account: Principal::Member("bob".into()),
        token_hash: "h-bob-2".into(),
        expires_at_ms: None,
        by: Some(Principal::Operator),
    };
    apply(&mut s, 20, rotate).unwrap();
    assert_eq!(s.authenticate("h-bob", 30), Err(Refused::Unknown));
    assert!(s.authenticate("h-bob-2", 30).is_ok());
    // A token in use elsewhere is refused.
    let clash = Op::RotateToken {
        account: Principal::Member("alice".into()),
        token_hash: "h-bob-2".into(),
        expires_at_ms: None,
        by: Some(Principal::Operator),
    };
    assert!(apply(&mut s, 40, clash).is_err());
    let suspend = Op::SuspendMember {
        name: "alice".into(),
        suspended: true,
    };
    apply(&mut s, 50, suspend).unwrap();
    assert_eq!(
        s.authenticate("h-alice", 60),
        Err(Refused::Suspended("alice".into()))
    );
    let rotate_op = Op::RotateToken {
        account: Principal::Operator,
        token_hash: "op-2".into(),
        expires_at_ms: None,
        by: Some(Principal::Operator),
    };
    apply(&mut s, 70, rotate_op).unwrap();
    assert_eq!(s.authenticate("op", 80), Err(Refused::Unknown));
    assert_eq!(s.operator_token_hash.as_deref(), Some("op-2"));
}
