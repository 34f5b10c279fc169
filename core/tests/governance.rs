//! Governed policy changes: K of N member approvals, expiry, and the ledger.

use coop_core::ledger::{self, Entry};
use coop_core::policy::Setting;
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
    apply(
        &mut s,
        0,
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        },
    )
    .unwrap();
    for m in ["a", "b", "c"] {
        apply(
            &mut s,
            0,
            Op::AddMember {
                name: m.into(),
                token_hash: format!("h-{m}"),
                expires_at_ms: None,
            },
        )
        .unwrap();
        // Each votes with a token of its own, not the one the operator saw.
        let own = Op::RotateToken {
            account: Principal::Member(m.into()),
            token_hash: format!("own-{m}"),
            expires_at_ms: None,
            by: Some(Principal::Member(m.into())),
        };
        apply(&mut s, 0, own).unwrap();
    }
    apply(
        &mut s,
        0,
        Op::SetPolicy {
            settings: vec![Setting::Approvals(2), Setting::ProposalTtlS(3600)],
            by: "operator".into(),
            reason: "the assembly wants a say".into(),
        },
    )
    .unwrap();
    s
}

fn share(member: &str, shares: u64) -> Vec<Setting> {
    vec![Setting::Share {
        member: member.into(),
        shares,
    }]
}

#[test]
fn a_change_takes_effect_with_the_last_approval_it_needs() {
    let mut s = coop();
    // The operator alone can no longer change the policy.
    let direct = Op::SetPolicy {
        settings: share("a", 5),
        by: "operator".into(),
        reason: "just because".into(),
    };
    assert!(matches!(
        apply(&mut s, 10, direct),
        Err(Rejection::FailedPrecondition(_))
    ));

    let propose = Op::ProposePolicy {
        settings: share("a", 5),
        by: "a".into(),
        reason: "a doubled its contribution".into(),
    };
    apply(&mut s, 10, propose).unwrap();
    assert_eq!(s.proposals[&1].expires_at_ms, 10 + 3_600_000);
    apply(
        &mut s,
        20,
        Op::ApprovePolicy {
            id: 1,
            member: "a".into(),
        },
    )
    .unwrap();
    assert_eq!(
        s.policy.share("a"),
        1,
        "one approval of two changes nothing"
    );
    let again = Op::ApprovePolicy {
        id: 1,
        member: "a".into(),
    };
    assert!(matches!(
        apply(&mut s, 21, again),
        Err(Rejection::AlreadyExists(_))
    ));
    let stranger = Op::ApprovePolicy {
        id: 1,
        member: "zed".into(),
    };
    assert!(matches!(
        apply(&mut s, 21, stranger),
        Err(Rejection::NotFound(_))
    ));
    apply(
        &mut s,
        30,
        Op::ApprovePolicy {
            id: 1,
            member: "b".into(),
        },
    )
    .unwrap();
    assert_eq!(s.policy.share("a"), 5);
    assert_eq!(s.proposals[&1].enacted_at_ms, Some(30));
    let late = Op::ApprovePolicy {
        id: 1,
        member: "c".into(),
    };
    assert!(matches!(
        apply(&mut s, 40, late),
        Err(Rejection::FailedPrecondition(_))
    ));

    // Proposal, approvals and enactment are entries of the verified chain.
    assert_eq!(ledger::verify(&s.outbox.records), Ok(()));
    let kinds: Vec<&str> = s.outbox.records.iter().map(|r| r.entry.kind()).collect();
    let tail = &kinds[kinds.len() - 4..];
    assert_eq!(
        tail,
        [
            "policy_proposed",
            "policy_approved",
            "policy_approved",
            "policy_changed"
        ]
    );
    match &s.outbox.records.last().unwrap().entry {
        Entry::PolicyChanged { by, .. } => assert!(by.contains("approved by a, b"), "{by}"),
        e => panic!("{e:?}"),
    }
    // Proposals, approvals and the policy log read back from a snapshot exactly.
    // (The outbox is history on its way to the store, not replicated state.)
    let back: State = coop_core::codec::decode(&coop_core::codec::encode(&s)).unwrap();
    s.take_outbox();
    assert_eq!(back, s);
}

#[test]
fn an_expired_or_unapproved_proposal_changes_nothing() {
    let mut s = coop();
    let propose = Op::ProposePolicy {
        settings: share("b", 9),
        by: "operator".into(),
        reason: "proposed by the operator".into(),
    };
    apply(&mut s, 0, propose).unwrap();
    apply(
        &mut s,
        1,
        Op::ApprovePolicy {
            id: 1,
            member: "a".into(),
        },
    )
    .unwrap();
    let expired = Op::ApprovePolicy {
        id: 1,
        member: "b".into(),
    };
    let after = 3_600_001;
    assert!(matches!(
        apply(&mut s, after, expired),
        Err(Rejection::FailedPrecondition(_))
    ));
    assert_eq!(s.policy.share("b"), 1);
    assert_eq!(s.proposals[&1].enacted_at_ms, None);

    // Bad proposals are refused naming the field, and leave no trace.
    let too_many = Op::ProposePolicy {
        settings: vec![Setting::Approvals(4)],
        by: "a".into(),
        reason: "more than the members".into(),
    };
    match apply(&mut s, 5, too_many) {
        Err(Rejection::InvalidArgument { field, .. }) => assert_eq!(field, "approvals"),
        r => panic!("{r:?}"),
    }
    let no_reason = Op::ProposePolicy {
        settings: share("a", 2),
        by: "a".into(),
        reason: " ".into(),
    };
    assert!(apply(&mut s, 5, no_reason).is_err());
    assert_eq!(s.proposals.len(), 1);

    // Back to direct changes: by a proposal that passes.
    let back = Op::ProposePolicy {
        settings: vec![Setting::Approvals(0)],
        by: "c".into(),
        reason: "the operator may set it again".into(),
    };
    apply(&mut s, 10, back).unwrap();
    apply(
        &mut s,
        11,
        Op::ApprovePolicy {
            id: 2,
            member: "b".into(),
        },
    )
    .unwrap();
    apply(
        &mut s,
        12,
        Op::ApprovePolicy {
            id: 2,
            member: "c".into(),
        },
    )
    .unwrap();
    assert_eq!(s.policy.approvals_required, 0);
    let direct = Op::SetPolicy {
        settings: share("a", 5),
        by: "operator".into(),
        reason: "allowed again".into(),
    };
    apply(&mut s, 13, direct).unwrap();
}
