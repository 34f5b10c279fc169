//! The state machine against a hostile member, a hostile node and a
//! hostile operator: each forgery or overreach of issue 13 is refused,
//! changes no bill, and (for reports) leaves evidence in the audit ledger.

use coop_core::ledger::Entry;
use coop_core::policy::Setting;
use coop_core::state::*;
use uuid::Uuid;

fn gpus(node: &str, n: u32) -> Vec<GpuInfo> {
    (0..n)
        .map(|i| GpuInfo {
            uuid: format!("GPU-{node}-{i}"),
            index: i,
            model: "A100-80GB".into(),
            memory_mb: 80 * 1024,
            measured: None,
            power_limit_w: 0,
        })
        .collect()
}

fn spec(n: u32) -> JobSpec {
    JobSpec {
        kind: JobKind::Finetune,
        gpus: n,
        command: vec!["true".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible: false,
        kill_grace_ms: 1000,
        priority: 0,
        time_limit_ms: 0,
        isolation: Default::default(),
        env: Default::default(),
        nodes: 0,
        gpus_per_node: 0,
    }
}

fn apply(s: &mut State, at_ms: i64, op: Op) -> Result<Vec<Event>, Rejection> {
    s.apply(&Command { at_ms, op })
}

/// A co-op with members a (its node n1, 4 GPUs) and b, and b's 2-GPU job
/// placed on n1 at t = 10 s.
fn running() -> (State, JobId) {
    let mut s = State::default();
    let ops = [
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        },
        Op::AddMember {
            name: "a".into(),
            token_hash: "h-a".into(),
            expires_at_ms: None,
        },
        Op::AddMember {
            name: "b".into(),
            token_hash: "h-b".into(),
            expires_at_ms: None,
        },
        Op::RegisterNode {
            node: "n1".into(),
            owner: "a".into(),
            gpus: gpus("n1", 4),
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
    ];
    for op in ops {
        apply(&mut s, 1_000, op).expect("setup");
    }
    let id = Uuid::from_u128(1);
    apply(
        &mut s,
        2_000,
        Op::SubmitJob {
            id,
            member: "b".into(),
            spec: spec(2),
        },
    )
    .unwrap();
    let gpus = vec!["GPU-n1-0".to_string(), "GPU-n1-1".to_string()];
    apply(
        &mut s,
        10_000,
        Op::Place {
            job: id,
            node: "n1".into(),
            gpus,
        },
    )
    .unwrap();
    (s, id)
}

fn report(s: &mut State, at_ms: i64, seq: u64, report: RunReport) {
    let op = Op::Report {
        node: "n1".into(),
        session: "s1".into(),
        seq,
        report,
    };
    apply(s, at_ms, op).expect("a report is acknowledged, plausible or not");
}

fn rejected(s: &State) -> Vec<String> {
    s.outbox
        .records
        .iter()
        .filter_map(|r| match &r.entry {
            Entry::ReportRejected { report, reason, .. } => Some(format!("{report}: {reason}")),
            _ => None,
        })
        .collect()
}

#[test]
fn forged_times_bill_nothing_and_are_kept_as_evidence() {
    // The attack of issue 13: a start at i64::MIN billed 57 GPU-years.
    let (mut s, id) = running();
    let start = s.clone();
    let forgeries = [
        (
            11_000,
            RunReport::Started {
                job: id,
                attempt: 1,
                at_ms: i64::MIN,
            },
        ),
        (
            20_000,
            RunReport::Usage {
                job: id,
                attempt: 1,
                to_ms: i64::MAX,
                energy_mj: 0,
            },
        ),
        (
            21_000,
            RunReport::Exited {
                job: id,
                attempt: 1,
                at_ms: 21_000,
                exit_code: 0,
                reason: String::new(),
                energy_mj: 0,
            },
        ),
    ];
    for (seq, (at, r)) in forgeries.iter().enumerate() {
        report(&mut s, *at, seq as u64 + 1, r.clone());
        if seq == 0 {
            assert_eq!(
                s.jobs[&id].started_at_ms, None,
                "the run has not started as far as billing goes"
            );
        }
    }
    assert!(
        s.outbox.usage().next().is_none(),
        "nothing billed: {:?}",
        s.outbox.records
    );
    assert_eq!(s.jobs[&id].gpu_ms, 0);
    assert_eq!(
        s.jobs[&id].state,
        JobState::Completed,
        "the run still ended"
    );
    let why = rejected(&s);
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why[0].starts_with("started: the run starts"), "{why:?}");
    assert!(why[1].starts_with("usage: its time is"), "{why:?}");
    assert_eq!(s.rejected_reports["n1"], 2);
    // Every replica replaying the log reaches the same state, with no panic.
    let mut replay = start;
    for (seq, (at, r)) in forgeries.into_iter().enumerate() {
        report(&mut replay, at, seq as u64 + 1, r);
    }
    assert_eq!(replay, s);
}

#[test]
fn a_run_is_billed_only_from_its_placement_to_the_leaders_clock() {
    let (mut s, id) = running();
    // A start a little before the placement (clock skew) bills from the placement.
    report(
        &mut s,
        10_500,
        1,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: 9_000,
        },
    );
    assert_eq!(s.jobs[&id].started_at_ms, Some(10_000));
    // An exit 4 s ahead of the leader's clock is within the skew: billed to the clock.
    report(
        &mut s,
        30_000,
        2,
        RunReport::Exited {
            job: id,
            attempt: 1,
            at_ms: 34_000,
            exit_code: 0,
            reason: String::new(),
            energy_mj: 0,
        },
    );
    assert_eq!(s.jobs[&id].gpu_ms, 2 * 20_000, "2 GPUs from 10 s to 30 s");
    assert!(rejected(&s).is_empty());
}

#[test]
fn energy_beyond_what_the_gpus_can_draw_is_refused() {
    let (mut s, id) = running();
    report(
        &mut s,
        10_000,
        1,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: 10_000,
        },
    );
    // 277,777 kWh in 10 s, as in the attack.
    let forged = 277_777 * 3_600_000_000_000u64;
    report(
        &mut s,
        20_000,
        2,
        RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: 20_000,
            energy_mj: forged,
        },
    );
    assert!(
        s.outbox.usage().next().is_none(),
        "neither the time nor the energy is billed"
    );
    assert_eq!(rejected(&s).len(), 1);
    // What two 400 W GPUs draw in 20 s is billed.
    report(
        &mut s,
        30_000,
        3,
        RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: 30_000,
            energy_mj: 2 * 400 * 20_000,
        },
    );
    assert_eq!(s.jobs[&id].energy_mj, 16_000_000);
    assert_eq!(s.jobs[&id].gpu_ms, 2 * 20_000);
    // An exit claiming u64::MAX millijoules ends the run, billing nothing more.
    report(
        &mut s,
        31_000,
        4,
        RunReport::Exited {
            job: id,
            attempt: 1,
            at_ms: 31_000,
            exit_code: 0,
            reason: "x".repeat(10_000),
            energy_mj: u64::MAX,
        },
    );
    let j = &s.jobs[&id];
    assert_eq!(
        (j.state, j.energy_mj, j.gpu_ms),
        (JobState::Completed, 16_000_000, 40_000)
    );
    assert!(j.reason.len() <= 512, "the agent's reason is bounded");
    assert_eq!(rejected(&s).len(), 2);
}

#[test]
fn energy_is_bounded_by_the_power_limits_the_gpus_enrolled_with() {
    let (mut s, id) = running();
    // n1 enrolled (first registered) without limits; a node that gives them:
    let mut limited = gpus("n2", 2);
    for g in &mut limited {
        g.power_limit_w = 300;
    }
    let op = Op::RegisterNode {
        node: "n2".into(),
        owner: "a".into(),
        gpus: limited.clone(),
        session: "s1".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    apply(&mut s, 1_000, op).unwrap();
    // Raising the limits later changes nothing: the enrolled ones stand.
    for g in &mut limited {
        g.power_limit_w = 1_000;
    }
    let op = Op::RegisterNode {
        node: "n2".into(),
        owner: "a".into(),
        gpus: limited,
        session: "s1".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    apply(&mut s, 1_500, op).unwrap();
    assert!(s.nodes["n2"].gpus.iter().all(|g| g.power_limit_w == 300));
    let id2 = Uuid::from_u128(2);
    apply(
        &mut s,
        2_000,
        Op::SubmitJob {
            id: id2,
            member: "b".into(),
            spec: spec(2),
        },
    )
    .unwrap();
    let place = Op::Place {
        job: id2,
        node: "n2".into(),
        gpus: vec!["GPU-n2-0".into(), "GPU-n2-1".into()],
    };
    apply(&mut s, 10_000, place).unwrap();
    let report2 = |s: &mut State, at_ms, seq, report| {
        apply(
            s,
            at_ms,
            Op::Report {
                node: "n2".into(),
                session: "s1".into(),
                seq,
                report,
            },
        )
        .unwrap();
    };
    report2(
        &mut s,
        10_000,
        1,
        RunReport::Started {
            job: id2,
            attempt: 1,
            at_ms: 10_000,
        },
    );
    // 2 × 500 W for 60 s: within 1.5 kW a GPU, over their 300 W limits.
    report2(
        &mut s,
        70_000,
        2,
        RunReport::Usage {
            job: id2,
            attempt: 1,
            to_ms: 70_000,
            energy_mj: 2 * 500 * 60_000,
        },
    );
    assert_eq!(s.jobs[&id2].energy_mj, 0);
    assert!(
        rejected(&s)[0].contains("limited to 600 W"),
        "{:?}",
        rejected(&s)
    );
    // 2 × 290 W is what they can draw.
    report2(
        &mut s,
        130_000,
        3,
        RunReport::Usage {
            job: id2,
            attempt: 1,
            to_ms: 130_000,
            energy_mj: 2 * 290 * 120_000,
        },
    );
    assert_eq!(s.jobs[&id2].energy_mj, 2 * 290 * 120_000);
    let _ = id;
}

#[test]
fn utilisation_over_a_hundred_percent_is_refused() {
    let (mut s, id) = running();
    report(
        &mut s,
        10_000,
        1,
        RunReport::Utilization {
            job: id,
            attempt: 1,
            sum_pct: u64::MAX,
            samples: 1,
        },
    );
    assert_eq!(s.jobs[&id].run_utilization, (0, 0));
    assert_eq!(rejected(&s).len(), 1);
}

#[test]
fn a_node_keeps_the_gpus_it_enrolled_with() {
    let (mut s, _) = running();
    let before = s.clone();
    // More GPUs than it registered: capacity inflation.
    let more = Op::RegisterNode {
        node: "n1".into(),
        owner: "a".into(),
        gpus: gpus("n1", 8),
        session: "s1".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    let e = apply(&mut s, 40_000, more).unwrap_err();
    assert!(e.to_string().contains("enroll the node again"), "{e}");
    // The same GPUs as another model.
    let mut other = gpus("n1", 4);
    other[3].model = "H200-141GB".into();
    let op = Op::RegisterNode {
        node: "n1".into(),
        owner: "a".into(),
        gpus: other,
        session: "s1".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    assert!(apply(&mut s, 40_000, op).is_err());
    assert_eq!(s, before, "refused registrations change nothing");
    // Fewer (a GPU lost) is fine, and it may come back.
    let fewer = Op::RegisterNode {
        node: "n1".into(),
        owner: "a".into(),
        gpus: gpus("n1", 3),
        session: "s1".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    apply(&mut s, 41_000, fewer).unwrap();
    let all = Op::RegisterNode {
        node: "n1".into(),
        owner: "a".into(),
        gpus: gpus("n1", 4),
        session: "s1".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    apply(&mut s, 42_000, all).unwrap();
    // Absurd claims are refused even at the first registration.
    let op = Op::RegisterNode {
        node: "n9".into(),
        owner: "a".into(),
        gpus: gpus("n9", 1),
        session: "s".repeat(4096),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    assert!(
        apply(&mut s, 43_000, op)
            .unwrap_err()
            .to_string()
            .starts_with("session:")
    );
    let mut huge = gpus("n9", 1);
    huge[0].memory_mb = u64::MAX;
    let op = Op::RegisterNode {
        node: "n9".into(),
        owner: "a".into(),
        gpus: huge,
        session: "s".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    assert!(
        apply(&mut s, 43_000, op)
            .unwrap_err()
            .to_string()
            .starts_with("gpus:")
    );
    let op = Op::RegisterNode {
        node: "n9".into(),
        owner: "a".into(),
        gpus: gpus("n9", 129),
        session: "s".into(),
        orphaned_runs_end_ms: 0,
        address: String::new(),
        site: String::new(),
    };
    assert!(
        apply(&mut s, 43_000, op)
            .unwrap_err()
            .to_string()
            .starts_with("gpus:")
    );
}

#[test]
fn what_a_member_submits_is_bounded() {
    let (mut s, _) = running();
    let before = s.clone();
    let submit = |s: &mut State, n: u128, spec: JobSpec| {
        apply(
            s,
            50_000,
            Op::SubmitJob {
                id: Uuid::from_u128(100 + n),
                member: "b".into(),
                spec,
            },
        )
    };
    let field = |r: Result<Vec<Event>, Rejection>| match r {
        Err(Rejection::InvalidArgument { field, .. }) => field,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    };
    // A million arguments, as in the attack.
    let mut big = spec(1);
    big.command = vec!["x".into(); 1_000_000];
    assert_eq!(field(submit(&mut s, 1, big)), "command");
    let mut wide = spec(1);
    wide.command = vec!["y".repeat(70_000)];
    assert_eq!(field(submit(&mut s, 2, wide)), "command");
    let mut grace = spec(1);
    grace.kill_grace_ms = u64::MAX;
    assert_eq!(field(submit(&mut s, 3, grace)), "kill_grace");
    let mut grace = spec(1);
    grace.kill_grace_ms = 11 * 60 * 1000; // over the default max_grace of 10 min
    assert_eq!(field(submit(&mut s, 4, grace)), "kill_grace");
    let mut limit = spec(1);
    limit.time_limit_ms = u64::MAX;
    assert_eq!(field(submit(&mut s, 5, limit)), "time_limit");
    let mut env = spec(1);
    env.env
        .insert("CUDA_VISIBLE_DEVICES".into(), "0,1,2,3".into());
    assert_eq!(field(submit(&mut s, 6, env)), "env");
    let mut env = spec(1);
    env.env.insert("COOP_JOB_ID".into(), "someone-else".into());
    assert_eq!(field(submit(&mut s, 7, env)), "env");
    assert_eq!(s, before, "refused submissions change nothing");

    // Pending jobs per member.
    let set = |s: &mut State, settings| {
        apply(
            s,
            50_000,
            Op::SetPolicy {
                settings,
                by: "operator".into(),
                reason: "limits".into(),
            },
        )
        .unwrap()
    };
    set(&mut s, vec![Setting::MaxPendingJobs(2)]);
    submit(&mut s, 10, spec(1)).unwrap();
    submit(&mut s, 11, spec(1)).unwrap();
    match submit(&mut s, 12, spec(1)) {
        Err(e @ Rejection::ResourceExhausted { .. }) => {
            assert!(e.to_string().starts_with("jobs: member b has 2 pending"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_gpu_quota_holds_at_submission_and_at_placement() {
    let (mut s, _) = running(); // b holds 2 GPUs
    apply(
        &mut s,
        50_000,
        Op::SetPolicy {
            settings: vec![Setting::MemberGpuQuota {
                member: "b".into(),
                gpus: 3,
            }],
            by: "operator".into(),
            reason: "quota".into(),
        },
    )
    .unwrap();
    let e = apply(
        &mut s,
        50_001,
        Op::SubmitJob {
            id: Uuid::from_u128(7),
            member: "b".into(),
            spec: spec(4),
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("gpus: member b may hold at most 3"),
        "{e}"
    );
    let id = Uuid::from_u128(8);
    apply(
        &mut s,
        50_002,
        Op::SubmitJob {
            id,
            member: "b".into(),
            spec: spec(2),
        },
    )
    .unwrap();
    let place = Op::Place {
        job: id,
        node: "n1".into(),
        gpus: vec!["GPU-n1-2".into(), "GPU-n1-3".into()],
    };
    let e = apply(&mut s, 50_003, place).unwrap_err();
    assert!(e.to_string().contains("its quota is 3"), "{e}");
    let plan = coop_core::placement::plan(&s, 50_004, &Default::default());
    assert!(
        plan.placements.is_empty(),
        "the scheduler does not place it either"
    );
    assert!(
        plan.waiting[&id].to_string().contains("quota"),
        "{}",
        plan.waiting[&id]
    );
}

/// The attack of issue 13: with approvals=2 the operator added two members
/// and approved with their tokens. Now adding a member is itself a proposal,
/// only members of the co-op when a proposal was made vote on it, and only
/// with tokens of their own, which the operator has never seen.
#[test]
fn the_operator_alone_cannot_bend_the_rules() {
    let (mut s, _) = running(); // members a and b
    let own = |s: &mut State, at, m: &str| {
        let op = Op::RotateToken {
            account: Principal::Member(m.into()),
            token_hash: format!("own-{m}"),
            expires_at_ms: None,
            by: Some(Principal::Member(m.into())),
        };
        apply(s, at, op).unwrap();
    };
    let approve = |s: &mut State, at, id, m: &str| {
        apply(
            s,
            at,
            Op::ApprovePolicy {
                id,
                member: m.into(),
            },
        )
    };
    let propose = |s: &mut State, at, settings| {
        apply(
            s,
            at,
            Op::ProposePolicy {
                settings,
                by: "operator".into(),
                reason: "x".into(),
            },
        )
        .unwrap();
        *s.proposals.keys().last().unwrap()
    };
    let set = Op::SetPolicy {
        settings: vec![Setting::Approvals(2)],
        by: "operator".into(),
        reason: "govern".into(),
    };
    apply(&mut s, 60_000, set).unwrap();
    let before = s.clone();
    let add = Op::AddMember {
        name: "sock1".into(),
        token_hash: "h-s1".into(),
        expires_at_ms: None,
    };
    let e = apply(&mut s, 60_001, add).unwrap_err();
    assert!(
        e.to_string().contains("needs the approval of 2 members"),
        "{e}"
    );
    assert!(apply(&mut s, 60_001, Op::RemoveMember { name: "b".into() }).is_err());
    let steal = Op::RotateToken {
        account: Principal::Member("a".into()),
        token_hash: "h-a-2".into(),
        expires_at_ms: None,
        by: Some(Principal::Operator),
    };
    assert!(
        apply(&mut s, 60_001, steal).is_err(),
        "the operator cannot take a member's vote"
    );
    let shares = Op::SetPolicy {
        settings: vec![Setting::Share {
            member: "a".into(),
            shares: 9,
        }],
        by: "operator".into(),
        reason: "x".into(),
    };
    assert!(apply(&mut s, 60_001, shares).is_err());
    assert_eq!(s, before);

    // The operator may propose a member; it joins once a and b approve,
    // each with a token it made itself.
    let p1 = propose(
        &mut s,
        60_002,
        vec![Setting::AddMember {
            name: "sock1".into(),
            token_hash: "h-s1".into(),
        }],
    );
    let e = approve(&mut s, 60_003, p1, "a").unwrap_err();
    assert!(
        e.to_string().contains("votes with a token of its own"),
        "{e}"
    );
    own(&mut s, 60_003, "a");
    own(&mut s, 60_003, "b");
    approve(&mut s, 60_003, p1, "a").unwrap();
    assert!(!s.members.contains_key("sock1"));
    assert!(s.principal("h-s1").is_none(), "its token does not work yet");
    approve(&mut s, 60_004, p1, "b").unwrap();
    assert!(s.members.contains_key("sock1"));
    // A member added after a proposal does not vote on it.
    let e = approve(&mut s, 60_005, p1, "sock1").unwrap_err();
    assert!(e.to_string().contains("joined after proposal"), "{e}");
    let p2 = propose(
        &mut s,
        60_006,
        vec![Setting::Share {
            member: "a".into(),
            shares: 5,
        }],
    );
    own(&mut s, 60_007, "sock1");
    approve(&mut s, 60_008, p2, "sock1").unwrap();
    approve(&mut s, 60_009, p2, "a").unwrap();
    assert_eq!(
        s.policy.share("a"),
        5,
        "sock1 existed when p2 was made: its vote counts"
    );
    // Suspension (the operator's alone) changes no vote.
    let p4 = propose(
        &mut s,
        60_010,
        vec![Setting::Share {
            member: "b".into(),
            shares: 3,
        }],
    );
    approve(&mut s, 60_011, p4, "a").unwrap();
    apply(
        &mut s,
        60_012,
        Op::SuspendMember {
            name: "a".into(),
            suspended: true,
        },
    )
    .unwrap();
    approve(&mut s, 60_014, p4, "b").unwrap();
    assert_eq!(
        s.policy.share("b"),
        3,
        "a's approval stands through its suspension"
    );
    // A member joining after p5 cannot tip it.
    let p5 = propose(
        &mut s,
        60_015,
        vec![Setting::Share {
            member: "b".into(),
            shares: 4,
        }],
    );
    let p6 = propose(
        &mut s,
        60_015,
        vec![Setting::AddMember {
            name: "sock2".into(),
            token_hash: "h-s2".into(),
        }],
    );
    approve(&mut s, 60_016, p6, "b").unwrap();
    approve(&mut s, 60_017, p6, "sock1").unwrap();
    own(&mut s, 60_018, "sock2");
    let e = approve(&mut s, 60_018, p5, "sock2").unwrap_err();
    assert!(e.to_string().contains("joined after proposal"), "{e}");
    // A proposal cannot leave fewer voters than the approvals it sets.
    let e = apply(
        &mut s,
        60_019,
        Op::ProposePolicy {
            settings: vec![
                Setting::RemoveMember("sock1".into()),
                Setting::RemoveMember("sock2".into()),
                Setting::Approvals(3),
            ],
            by: "operator".into(),
            reason: "lock it".into(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("approvals:"), "{e}");
    // One proposer's open proposals are bounded.
    for i in 0..MAX_OPEN_PROPOSALS {
        let op = Op::ProposePolicy {
            settings: vec![Setting::Share {
                member: "a".into(),
                shares: i as u64,
            }],
            by: "b".into(),
            reason: "spam".into(),
        };
        apply(&mut s, 60_020, op).unwrap();
    }
    let op = Op::ProposePolicy {
        settings: vec![Setting::Share {
            member: "a".into(),
            shares: 1,
        }],
        by: "b".into(),
        reason: "spam".into(),
    };
    assert!(matches!(
        apply(&mut s, 60_021, op),
        Err(Rejection::ResourceExhausted { .. })
    ));
}

#[test]
fn a_run_starts_once_and_its_energy_is_bounded_over_its_whole_time() {
    let (mut s, id) = running();
    report(
        &mut s,
        10_000,
        1,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: 10_000,
        },
    );
    report(
        &mut s,
        20_000,
        2,
        RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: 20_000,
            energy_mj: 0,
        },
    );
    // A second start would bill [10 s, 20 s] again.
    report(
        &mut s,
        20_000,
        3,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: 10_000,
        },
    );
    report(
        &mut s,
        30_000,
        4,
        RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: 30_000,
            energy_mj: 0,
        },
    );
    assert_eq!(
        s.jobs[&id].gpu_ms,
        2 * 20_000,
        "10 s to 30 s on 2 GPUs, once"
    );
    assert!(
        rejected(&s)[0].contains("already started"),
        "{:?}",
        rejected(&s)
    );
    // Zero-length reports each claiming the slack of one clock skew: the
    // bound is over the run, so the slack is granted once.
    let bound = coop_core::plausible::energy_bound_mj(2 * 1_500, 20_000);
    for seq in 5..50 {
        report(
            &mut s,
            30_000,
            seq,
            RunReport::Usage {
                job: id,
                attempt: 1,
                to_ms: 30_000,
                energy_mj: 5_000_000,
            },
        );
    }
    let e = s.jobs[&id].energy_mj;
    assert!(e <= bound, "{e} mJ billed, at most {bound}");
}

#[test]
fn a_run_cut_off_with_its_node_is_billed_until_its_agent_is_back_and_a_grace() {
    let (mut s, id) = running();
    report(
        &mut s,
        10_000,
        1,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: 10_000,
        },
    );
    apply(
        &mut s,
        60_000,
        Op::NodeDown {
            node: "n1".into(),
            last_seen_ms: 20_000,
        },
    )
    .unwrap();
    // While down, the node's reports are refused (not acknowledged: the agent
    // keeps them and sends them once it has registered again).
    let before = s.clone();
    let late = Op::Report {
        node: "n1".into(),
        session: "s1".into(),
        seq: 2,
        report: RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: 3_000_000,
            energy_mj: 0,
        },
    };
    let e = apply(&mut s, 3_000_000, late).unwrap_err();
    assert!(e.to_string().contains("register again"), "{e}");
    assert_eq!(s, before);
    // The agent comes back an hour later (same session) and keeps reporting
    // the run it was cut off from, for days: billed to its return plus a
    // minute (it stops the run at once), its energy no further either.
    let back = 3_600_000;
    let op = Op::RegisterNode {
        node: "n1".into(),
        owner: "a".into(),
        gpus: gpus("n1", 4),
        session: "s1".into(),
        orphaned_runs_end_ms: back,
        address: String::new(),
        site: String::new(),
    };
    apply(&mut s, back, op).unwrap();
    let later = back + 3 * 24 * 3_600_000;
    report(
        &mut s,
        later,
        2,
        RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: later,
            energy_mj: 0,
        },
    );
    let billed_to = s
        .outbox
        .usage()
        .filter(|r| r.job == id)
        .map(|r| r.end_ms)
        .max()
        .unwrap();
    assert_eq!(billed_to, back + coop_core::plausible::CUT_OFF_STOP_MS);
    let bound = coop_core::plausible::energy_bound_mj(2 * 1_500, billed_to - 10_000);
    for seq in 3..30 {
        report(
            &mut s,
            later + seq as i64,
            seq,
            RunReport::Usage {
                job: id,
                attempt: 1,
                to_ms: later,
                energy_mj: bound / 4,
            },
        );
    }
    let energy: u64 = s
        .outbox
        .usage()
        .filter(|r| r.job == id)
        .map(|r| r.energy_mj)
        .sum();
    assert!(
        energy <= bound,
        "{energy} mJ billed past the deadline's bound {bound}"
    );
}

/// A run asked to stop gets the grace the policy allows now: a member's long
/// kill grace, or the preemption grace, is cut to a max_grace lowered since.
#[test]
fn a_stopping_run_gets_no_more_grace_than_the_policy_allows_now() {
    let (s, id) = running();
    let mut job = s.jobs[&id].clone();
    let mut policy = s.policy.clone();
    job.spec.kill_grace_ms = 9 * 60 * 1000;
    policy.max_grace_s = 10 * 60;
    job.request_stop(Stop::Cancel);
    assert_eq!(job.stop_grace_ms(&policy), 9 * 60 * 1000);
    policy.max_grace_s = 5;
    assert_eq!(job.stop_grace_ms(&policy), 5_000);

    let mut job = s.jobs[&id].clone();
    job.request_stop(Stop::Preempt {
        for_job: Uuid::from_u128(99),
    });
    policy.preempt_grace_s = 30;
    policy.max_grace_s = 60;
    assert_eq!(job.stop_grace_ms(&policy), 30_000);
    policy.max_grace_s = 20;
    assert_eq!(job.stop_grace_ms(&policy), 20_000);
    // A cancel overrides the preemption: the job's own grace again (1 s).
    job.request_stop(Stop::Cancel);
    assert_eq!(job.stop_grace_ms(&policy), 1_000);
}
