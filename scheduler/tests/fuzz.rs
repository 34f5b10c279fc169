//! Fuzzing, driven by proptest so that it runs in every CI run for a bounded
//! number of cases (`PROPTEST_CASES` raises it for a longer hunt): committed
//! entries, well-formed or not, applied to states built from random
//! histories; and raft messages from bytes. Nothing may panic (a panic in
//! apply would recur on every replay of the log: a permanent outage), a
//! refused command changes nothing, and the invariants hold after every
//! step. Failing cases are kept by proptest in `proptest-regressions/` and
//! replayed first.

use std::collections::BTreeMap;

use coop_core::policy::Setting;
use coop_core::state::*;
use proptest::prelude::*;
use uuid::Uuid;

/// Numbers where bugs live: extremes, zero, and ordinary values.
fn int() -> impl Strategy<Value = i64> {
    prop_oneof![
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(0i64),
        1 => Just(-1i64),
        3 => 0i64..200_000,
        1 => any::<i64>(),
    ]
}

fn uint() -> impl Strategy<Value = u64> {
    prop_oneof![Just(u64::MAX), Just(0u64), 0u64..200_000, any::<u64>()]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("n1".to_string()),
        Just("n2".to_string()),
        Just(String::new()),
        Just("Not Valid".to_string()),
        "[a-z]{1,3}",
    ]
}

fn job_id() -> impl Strategy<Value = JobId> {
    (0u128..6).prop_map(Uuid::from_u128)
}

fn gpu_infos() -> impl Strategy<Value = Vec<GpuInfo>> {
    prop::collection::vec(
        (
            0u32..6,
            prop_oneof![Just("A100-80GB".to_string()), Just("T4".to_string())],
            uint(),
        ),
        0..5,
    )
    .prop_map(|gs| {
        gs.into_iter()
            .map(|(i, model, mem)| GpuInfo {
                uuid: format!("GPU-{i}"),
                index: i,
                model,
                memory_mb: mem,
                measured: None,
                power_limit_w: 0,
            })
            .collect()
    })
}

fn spec() -> impl Strategy<Value = JobSpec> {
    (
        0u32..10,
        uint(),
        uint(),
        any::<bool>(),
        prop::collection::vec("[a-z]{0,3}", 0..3),
        (
            prop_oneof![4 => Just(0u32), 1 => 0u32..4],
            prop_oneof![4 => Just(0u32), 1 => 0u32..5],
        ),
    )
        .prop_map(
            |(gpus, grace, limit, preemptible, command, (nodes, gpus_per_node))| JobSpec {
                kind: if preemptible {
                    JobKind::Finetune
                } else {
                    JobKind::Inference
                },
                gpus,
                command,
                gpu_model: None,
                min_gpu_memory_mb: 0,
                preemptible,
                kill_grace_ms: grace,
                priority: 0,
                time_limit_ms: limit,
                isolation: Default::default(),
                env: BTreeMap::new(),
                nodes,
                gpus_per_node,
            },
        )
}

fn report() -> impl Strategy<Value = RunReport> {
    // Mostly about the runs of the seeded history, where billing happens.
    (
        (1u128..3).prop_map(Uuid::from_u128),
        0u32..3,
        int(),
        uint(),
        any::<i32>(),
    )
        .prop_flat_map(|(job, attempt, t, e, code)| {
            prop_oneof![
                Just(RunReport::Started {
                    job,
                    attempt,
                    at_ms: t
                }),
                Just(RunReport::Usage {
                    job,
                    attempt,
                    to_ms: t,
                    energy_mj: e
                }),
                Just(RunReport::Exited {
                    job,
                    attempt,
                    at_ms: t,
                    exit_code: code,
                    reason: String::new(),
                    energy_mj: e
                }),
                Just(RunReport::Lost {
                    job,
                    attempt,
                    at_ms: t,
                    reason: String::new(),
                    energy_mj: e
                }),
                Just(RunReport::Utilization {
                    job,
                    attempt,
                    sum_pct: e,
                    samples: e / 3
                }),
            ]
        })
}

fn setting() -> impl Strategy<Value = Setting> {
    prop_oneof![
        (name(), uint()).prop_map(|(member, shares)| Setting::Share { member, shares }),
        (0u32..4).prop_map(Setting::Approvals),
        uint().prop_map(Setting::HalfLifeS),
        uint().prop_map(Setting::MinRuntimeS),
        uint().prop_map(Setting::MaxPendingJobs),
        uint().prop_map(Setting::GpuQuota),
        (name(), uint()).prop_map(|(member, gpus)| Setting::MemberGpuQuota { member, gpus }),
        any::<bool>().prop_map(Setting::Preemption),
        name().prop_map(Setting::RemoveMember),
        name().prop_map(|n| Setting::AddMember {
            token_hash: format!("h-{n}"),
            name: n
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => name().prop_map(|n| Op::AddMember { token_hash: format!("h-{n}"), name: n, expires_at_ms: None }),
        1 => (name(), name(), gpu_infos(), prop_oneof![Just("s1".to_string()), Just("s2".to_string())], int())
            .prop_map(|(node, owner, gpus, session, end)| Op::RegisterNode {
                node,
                owner,
                gpus,
                session,
                orphaned_runs_end_ms: end,
                address: String::new(),
                site: String::new(),
            }),
        1 => (name(), int()).prop_map(|(node, last_seen_ms)| Op::NodeDown { node, last_seen_ms }),
        1 => name().prop_map(|node| Op::DrainNode { node }),
        1 => (job_id(), name(), spec()).prop_map(|(id, member, spec)| Op::SubmitJob { id, member, spec }),
        1 => job_id().prop_map(|id| Op::CancelJob { id }),
        1 => (job_id(), name(), prop::collection::vec((0u32..6).prop_map(|i| format!("GPU-{i}")), 0..4))
            .prop_map(|(job, node, gpus)| Op::Place { job, node, gpus }),
        1 => (
            job_id(),
            prop::collection::vec(
                (
                    prop_oneof![4 => Just("n1".to_string()), 4 => Just("n2".to_string()), 1 => name()],
                    prop::collection::vec(0u32..5, 0..5),
                ),
                0..4,
            ),
            prop_oneof![Just(29500u16), any::<u16>()],
        )
            .prop_map(|(job, parts, port)| Op::PlaceGang {
                job,
                parts: parts
                    .into_iter()
                    .map(|(node, gpus)| {
                        let gpus = gpus.iter().map(|i| format!("GPU-{node}-{i}")).collect();
                        (node, gpus)
                    })
                    .collect(),
                port,
            }),
        1 => (job_id(), job_id()).prop_map(|(job, for_job)| Op::Preempt { job, for_job }),
        1 => job_id().prop_map(|job| Op::Expire { job }),
        1 => prop::collection::vec(setting(), 0..3).prop_map(|settings| Op::SetPolicy {
            settings,
            by: "operator".into(),
            reason: "fuzz".into(),
        }),
        1 => prop::collection::vec(setting(), 0..3).prop_map(|settings| Op::ProposePolicy {
            settings,
            by: "a".into(),
            reason: "fuzz".into(),
        }),
        1 => (0u64..4, name()).prop_map(|(id, member)| Op::ApprovePolicy { id, member }),
        1 => (name(), any::<bool>()).prop_map(|(name, suspended)| Op::SuspendMember { name, suspended }),
        1 => name().prop_map(|name| Op::RemoveMember { name }),
        1 => name().prop_map(|node| Op::RevokeNode { node }),
        8 => (
            prop_oneof![4 => Just("n1".to_string()), 4 => Just("n2".to_string()), 1 => name()],
            prop_oneof![4 => Just("s1".to_string()), 1 => Just("s2".to_string())],
            0u64..40,
            report()
        )
            .prop_map(|(node, session, seq, report)| Op::Report { node, session, seq, report }),
    ]
}

/// A co-op with two members, two nodes and a job running on each.
fn seeded() -> State {
    let mut s = State::default();
    let gpus = |node: &str| {
        (0..4)
            .map(|i| GpuInfo {
                uuid: format!("GPU-{node}-{i}"),
                index: i,
                model: "A100-80GB".into(),
                memory_mb: 81_920,
                measured: None,
                power_limit_w: 0,
            })
            .collect()
    };
    let ops = vec![
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: Some(("a".into(), "h-a".into())),
        },
        Op::AddMember {
            name: "b".into(),
            token_hash: "h-b".into(),
            expires_at_ms: None,
        },
        Op::RegisterNode {
            node: "n1".into(),
            owner: "a".into(),
            gpus: gpus("n1"),
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
        Op::RegisterNode {
            node: "n2".into(),
            owner: "b".into(),
            gpus: gpus("n2"),
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
        Op::SubmitJob {
            id: Uuid::from_u128(1),
            member: "b".into(),
            spec: plain(2),
        },
        Op::SubmitJob {
            id: Uuid::from_u128(2),
            member: "a".into(),
            spec: plain(1),
        },
        Op::Place {
            job: Uuid::from_u128(1),
            node: "n1".into(),
            gpus: vec!["GPU-n1-0".into(), "GPU-n1-1".into()],
        },
        Op::Place {
            job: Uuid::from_u128(2),
            node: "n2".into(),
            gpus: vec!["GPU-n2-0".into()],
        },
    ];
    for op in ops {
        s.apply(&Command { at_ms: 1_000, op })
            .expect("seed history");
    }
    s
}

fn plain(gpus: u32) -> JobSpec {
    JobSpec {
        kind: JobKind::Finetune,
        gpus,
        command: vec!["true".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible: true,
        kill_grace_ms: 1000,
        priority: 0,
        time_limit_ms: 0,
        isolation: Default::default(),
        env: BTreeMap::new(),
        nodes: 0,
        gpus_per_node: 0,
    }
}

/// What must hold of every state, whatever was applied.
fn check(s: &State) -> Result<(), TestCaseError> {
    let mut held = BTreeMap::new();
    for n in s.nodes.values() {
        for g in &n.gpus {
            if let Some(j) = g.job {
                prop_assert!(
                    held.insert(g.uuid.clone(), j).is_none(),
                    "GPU {} held twice",
                    g.uuid
                );
                prop_assert_eq!(s.jobs[&j].state, JobState::Running);
            }
        }
    }
    for id in &s.running {
        prop_assert_eq!(s.jobs[id].state, JobState::Running);
    }
    for (_, id) in &s.queue {
        prop_assert_eq!(s.jobs[id].state, JobState::Pending);
    }
    let billed: u64 = s
        .outbox
        .usage()
        .filter(|r| r.job == Uuid::from_u128(1))
        .map(|r| r.gpu_ms)
        .sum();
    // The job may have left memory (its retention passed): then the store
    // gets it, from the outbox.
    let job = s
        .jobs
        .get(&Uuid::from_u128(1))
        .or_else(|| s.outbox.retired.iter().find(|j| j.id == Uuid::from_u128(1)));
    prop_assert_eq!(
        billed,
        job.map_or(0, |j| j.gpu_ms),
        "job totals equal the ledger"
    );
    prop_assert_eq!(coop_core::ledger::verify(&s.outbox.records), Ok(()));
    Ok(())
}

/// Applies `cmd`: a refusal must change nothing.
fn step(s: &mut State, cmd: &Command) -> Result<(), TestCaseError> {
    let before = s.clone();
    if s.apply(cmd).is_err() {
        prop_assert_eq!(
            &*s,
            &before,
            "a refused command changed the state: {:?}",
            cmd
        );
    }
    check(s)
}

proptest! {

    /// Random histories of structurally valid commands with hostile values.
    #[test]
    fn any_history_of_commands_applies_without_panic(history in prop::collection::vec((op(), int()), 1..60)) {
        let mut s = seeded();
        for (i, (mut op, at_ms)) in history.into_iter().enumerate() {
            // Reports mostly in sequence, so that they are applied, not
            // taken for retransmissions; sequence 0 stays one.
            if let Op::Report { seq, .. } = &mut op
                && *seq > 0
            {
                *seq = i as u64 + 1;
            }
            step(&mut s, &Command { at_ms, op })?;
        }
    }

    /// A committed entry as bytes: a valid command's JSON, mutated. What
    /// decodes is applied; what does not is refused by decoding, never by
    /// a panic.
    #[test]
    fn mutated_entries_decode_or_are_refused(
        history in prop::collection::vec((op(), 0i64..100_000), 0..10),
        entry in (op(), int()),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut s = seeded();
        for (op, at_ms) in history {
            step(&mut s, &Command { at_ms, op })?;
        }
        let mut bytes = serde_json::to_vec(&Command { at_ms: entry.1, op: entry.0 }).unwrap();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(cmd) = serde_json::from_slice::<Command>(&bytes) {
            step(&mut s, &cmd)?;
        }
    }

    /// What a peer sends on the raft port, decoded as the transport does.
    #[test]
    fn raft_messages_from_any_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        use protobuf::Message as _;
        let _ = raft::eraftpb::Message::parse_from_bytes(&bytes);
        let _ = raft::eraftpb::ConfChangeV2::parse_from_bytes(&bytes);
    }
}
