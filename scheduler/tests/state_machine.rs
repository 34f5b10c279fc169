//! Properties of the state machine: deterministic apply, no GPU ever held by two
//! running jobs, rejected commands change nothing, and usage is conserved.
//! Steps include preemption, usage reports, time limits and policy changes.

use std::collections::BTreeMap;

use coop_core::placement::{Placement, plan};
use coop_core::policy::{Ordering, Setting};
use coop_core::state::*;
use proptest::prelude::*;
use uuid::Uuid;

fn gpus(node: &str, n: u32, model: &str) -> Vec<GpuInfo> {
    (0..n)
        .map(|i| GpuInfo {
            uuid: format!("GPU-{node}-{i}"),
            index: i,
            model: model.into(),
            memory_mb: 80 * 1024,
            measured: None,
            power_limit_w: 0,
        })
        .collect()
}

fn spec(kind: JobKind, n: u32) -> JobSpec {
    JobSpec {
        kind,
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

/// The placements a leader's pass would make now.
fn schedule(s: &State, at: i64) -> Vec<Placement> {
    plan(s, at, &coop_core::fairshare::usage(s, at)).placements
}

fn base() -> (State, i64) {
    let mut s = State::default();
    let mut at = 1_000;
    let cmds = [
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: Some(("default".into(), "h-default".into())),
        },
        Op::AddMember {
            name: "beta".into(),
            token_hash: "h-beta".into(),
            expires_at_ms: None,
        },
        Op::RegisterNode {
            node: "n1".into(),
            owner: "default".into(),
            gpus: gpus("n1", 4, "A100-80GB"),
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
        Op::RegisterNode {
            node: "n2".into(),
            owner: "beta".into(),
            gpus: gpus("n2", 2, "T4-16GB"),
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
    ];
    for op in cmds {
        s.apply(&Command { at_ms: at, op }).expect("setup");
        at += 1;
    }
    (s, at)
}

/// Every GPU is held by at most one job, and held exactly by the running jobs.
fn check_invariants(s: &State) {
    let mut holder: BTreeMap<&str, JobId> = BTreeMap::new();
    for n in s.nodes.values() {
        for g in &n.gpus {
            if let Some(j) = g.job {
                assert!(
                    holder.insert(&g.uuid, j).is_none(),
                    "GPU {} held twice",
                    g.uuid
                );
                let job = &s.jobs[&j];
                assert_eq!(
                    job.state,
                    JobState::Running,
                    "a GPU is held by a job that is not running"
                );
                assert!(job.gpus.contains(&g.uuid));
            }
        }
    }
    for j in s.jobs.values() {
        if j.state == JobState::Running {
            assert_eq!(j.gpus.len(), j.spec.gpus as usize);
            for g in &j.gpus {
                assert_eq!(
                    holder.get(g.as_str()),
                    Some(&j.id),
                    "running job without its GPU"
                );
            }
        }
        let queued = s.queue.contains(&(j.submitted_at_ms, j.id));
        assert_eq!(
            queued,
            j.state == JobState::Pending,
            "queue index out of step"
        );
    }
    let billed: u64 = s.outbox.usage().map(|u| u.gpu_ms).sum();
    let jobs: u64 = s.jobs.values().map(|j| j.gpu_ms).sum();
    assert_eq!(billed, jobs, "ledger and jobs disagree on GPU time");
    let billed: u64 = s.outbox.usage().map(|u| u.weighted_gpu_ms).sum();
    let jobs: u64 = s.jobs.values().map(|j| j.weighted_gpu_ms).sum();
    assert_eq!(billed, jobs, "ledger and jobs disagree on normalised usage");
    let billed: u64 = s.outbox.usage().map(|u| u.energy_mj).sum();
    let jobs: u64 = s.jobs.values().map(|j| j.energy_mj).sum();
    assert_eq!(billed, jobs, "ledger and jobs disagree on energy");
    // The audit chain holds every usage record, in order, and verifies.
    assert_eq!(coop_core::ledger::verify(&s.outbox.records), Ok(()));
    let chained: Vec<&UsageRecord> = s
        .outbox
        .records
        .iter()
        .filter_map(|r| match &r.entry {
            coop_core::ledger::Entry::Usage(u) => Some(u),
            _ => None,
        })
        .collect();
    assert_eq!(
        chained,
        s.outbox.usage().collect::<Vec<_>>(),
        "chain and ledger differ"
    );
    for r in s.outbox.usage() {
        assert!(r.end_ms >= r.start_ms, "a ledger interval runs backwards");
        assert_eq!(r.gpu_ms, (r.end_ms - r.start_ms) as u64 * r.gpus as u64);
    }
    let running: Vec<JobId> = s
        .jobs
        .values()
        .filter(|j| j.state == JobState::Running)
        .map(|j| j.id)
        .collect();
    assert_eq!(
        s.running.iter().copied().collect::<Vec<_>>(),
        running,
        "running index out of step"
    );
    for j in s.jobs.values() {
        // Only a cancel outlives its run (a cancelled job keeps it).
        if j.stop.is_some_and(|s| s != Stop::Cancel) {
            assert_eq!(
                j.state,
                JobState::Running,
                "only a running job is being stopped"
            );
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Submit {
        kind: bool,
        gpus: u32,
    },
    Cancel(usize),
    Schedule,
    /// A placement of arbitrary GPUs, as a stale or buggy leader might propose.
    BadPlace {
        job: usize,
        node: bool,
        first: u32,
    },
    Start(usize),
    Exit {
        job: usize,
        code: i32,
    },
    NodeDown(bool),
    /// The agent reports a running job's usage so far, with some energy.
    Usage {
        job: usize,
        energy: u16,
    },
    /// A preemption as any proposer might send it (often invalid).
    Preempt {
        job: usize,
        for_job: usize,
    },
    Expire(usize),
    Policy {
        ordering: u8,
        preemption: bool,
        min_runtime_s: u8,
    },
    Reregister {
        node: bool,
        new_session: bool,
    },
    Tick(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<bool>(), 0u32..6).prop_map(|(kind, gpus)| Step::Submit { kind, gpus }),
        any::<usize>().prop_map(Step::Cancel),
        Just(Step::Schedule),
        Just(Step::Schedule),
        (any::<usize>(), any::<bool>(), 0u32..4).prop_map(|(job, node, first)| Step::BadPlace {
            job,
            node,
            first
        }),
        any::<usize>().prop_map(Step::Start),
        (any::<usize>(), -1i32..3).prop_map(|(job, code)| Step::Exit { job, code }),
        any::<bool>().prop_map(Step::NodeDown),
        (any::<usize>(), any::<u16>()).prop_map(|(job, energy)| Step::Usage { job, energy }),
        (any::<usize>(), any::<usize>()).prop_map(|(job, for_job)| Step::Preempt { job, for_job }),
        any::<usize>().prop_map(Step::Expire),
        (0u8..3, any::<bool>(), 0u8..3).prop_map(|(ordering, preemption, min_runtime_s)| {
            Step::Policy {
                ordering,
                preemption,
                min_runtime_s,
            }
        }),
        (any::<bool>(), any::<bool>())
            .prop_map(|(node, new_session)| Step::Reregister { node, new_session }),
        (1u16..5000).prop_map(Step::Tick),
    ]
}

/// Turns steps into the commands a leader could propose at that point.
fn commands(steps: &[Step]) -> Vec<Command> {
    let (mut s, mut at) = base();
    let mut out = Vec::new();
    let mut ids: Vec<JobId> = Vec::new();
    let mut seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut sessions: BTreeMap<String, u32> = BTreeMap::new();
    for (i, st) in steps.iter().enumerate() {
        let node_name = |b: bool| if b { "n1" } else { "n2" }.to_string();
        let pick = |k: usize| (!ids.is_empty()).then(|| ids[k % ids.len()]);
        let mut ops = Vec::new();
        match st {
            Step::Submit { kind, gpus } => {
                let id = Uuid::from_u128(i as u128 + 1);
                ids.push(id);
                let kind = if *kind {
                    JobKind::Finetune
                } else {
                    JobKind::Inference
                };
                let mut sp = spec(kind, *gpus);
                sp.preemptible = i % 2 == 0;
                sp.time_limit_ms = if i % 3 == 0 { 3000 } else { 0 };
                ops.push(Op::SubmitJob {
                    id,
                    // Two members, so that preemption has someone to move GPUs to.
                    member: if i % 2 == 0 { "beta" } else { "default" }.into(),
                    spec: sp,
                });
            }
            Step::Preempt { job, for_job } => {
                if let (Some(a), Some(b)) = (pick(*job), pick(*for_job)) {
                    ops.push(Op::Preempt { job: a, for_job: b });
                }
            }
            Step::Expire(k) => ops.extend(pick(*k).map(|id| Op::Expire { job: id })),
            Step::Policy {
                ordering,
                preemption,
                min_runtime_s,
            } => ops.push(Op::SetPolicy {
                settings: vec![
                    Setting::Ordering(
                        [Ordering::Fifo, Ordering::Fairshare, Ordering::Drf][*ordering as usize],
                    ),
                    Setting::Preemption(*preemption),
                    Setting::MinRuntimeS(*min_runtime_s as u64),
                ],
                by: "operator".into(),
                reason: "test".into(),
            }),
            Step::Cancel(k) => ops.extend(pick(*k).map(|id| Op::CancelJob { id })),
            Step::Schedule => {
                let pass = plan(&s, at, &coop_core::fairshare::usage(&s, at));
                // Every pending job is either placed or has a reason to wait.
                let placed: Vec<JobId> = pass.placements.iter().map(|p| p.job).collect();
                for (pos, id) in pass.order.iter().enumerate() {
                    let waits = pass.wait_of(&s.jobs[id], Some(pos)).is_some();
                    assert_ne!(
                        waits,
                        placed.contains(id),
                        "job {id}: placed or waiting, not both"
                    );
                }
                for (_, id) in &s.queue {
                    let known = pass.order.contains(id) || pass.waiting.contains_key(id);
                    assert!(known, "pending job {id} neither considered nor explained");
                }
                ops.extend(pass.expiries.into_iter().map(|job| Op::Expire { job }));
                ops.extend(pass.preemptions.into_iter().map(|p| Op::Preempt {
                    job: p.job,
                    for_job: p.for_job,
                }));
                for p in pass.placements {
                    ops.push(Op::Place {
                        job: p.job,
                        node: p.node,
                        gpus: p.gpus,
                    });
                }
            }
            Step::BadPlace { job, node, first } => {
                if let Some(id) = pick(*job) {
                    let n = node_name(*node);
                    let want = s.jobs.get(&id).map_or(1, |j| j.spec.gpus);
                    let gpus = (0..want)
                        .map(|k| format!("GPU-{n}-{}", first + k))
                        .collect();
                    ops.push(Op::Place {
                        job: id,
                        node: n,
                        gpus,
                    });
                }
            }
            Step::Start(k) | Step::Exit { job: k, .. } | Step::Usage { job: k, .. } => {
                if let Some(j) = pick(*k).and_then(|id| s.jobs.get(&id)) {
                    let id = j.id;
                    if let Some(n) = j.node.clone() {
                        let session = format!("s{}", sessions.get(&n).copied().unwrap_or(1));
                        let sq = seq.entry(format!("{n}/{session}")).or_insert(0);
                        *sq += 1;
                        let report = match st {
                            Step::Start(_) => RunReport::Started {
                                job: id,
                                attempt: j.attempts,
                                at_ms: at,
                            },
                            Step::Exit { code, .. } => RunReport::Exited {
                                job: id,
                                attempt: j.attempts,
                                at_ms: at,
                                exit_code: *code,
                                reason: String::new(),
                                energy_mj: 7,
                            },
                            Step::Usage { energy, .. } => RunReport::Usage {
                                job: id,
                                attempt: j.attempts,
                                to_ms: at,
                                energy_mj: *energy as u64,
                            },
                            _ => unreachable!(),
                        };
                        ops.push(Op::Report {
                            node: n,
                            session,
                            seq: *sq,
                            report,
                        });
                    }
                }
            }
            Step::NodeDown(b) => ops.push(Op::NodeDown {
                node: node_name(*b),
                last_seen_ms: at - 10,
            }),
            Step::Reregister { node, new_session } => {
                let n = node_name(*node);
                let e = sessions.entry(n.clone()).or_insert(1);
                if *new_session {
                    *e += 1;
                }
                let (count, model) = if *node {
                    (4, "A100-80GB")
                } else {
                    (2, "T4-16GB")
                };
                ops.push(Op::RegisterNode {
                    node: n.clone(),
                    owner: "default".into(),
                    gpus: gpus(&n, count, model),
                    session: format!("s{e}"),
                    orphaned_runs_end_ms: at - 5,
                    address: String::new(),
                    site: String::new(),
                });
            }
            Step::Tick(ms) => at += *ms as i64,
        }
        for op in ops {
            let cmd = Command { at_ms: at, op };
            let _ = s.apply(&cmd);
            out.push(cmd);
        }
        at += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn no_gpu_is_ever_held_twice(steps in proptest::collection::vec(step(), 1..120)) {
        let (mut s, _) = base();
        for cmd in commands(&steps) {
            let before = s.clone();
            match s.apply(&cmd) {
                Ok(_) => check_invariants(&s),
                Err(_) => prop_assert_eq!(&s, &before, "a rejected command changed the state"),
            }
        }
    }

    #[test]
    fn apply_is_deterministic(steps in proptest::collection::vec(step(), 1..80)) {
        let cmds = commands(&steps);
        let run = || {
            let (mut s, _) = base();
            let results: Vec<_> = cmds.iter().map(|c| s.apply(c).map(|e| e.len())).collect();
            (serde_json::to_string(&s).unwrap(), results)
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn state_survives_a_snapshot_round_trip(steps in proptest::collection::vec(step(), 1..60)) {
        // As the log writes them: each entry and the snapshot read back exactly
        // (a state that did not would stop every replica it reached).
        let (mut s, _) = base();
        for cmd in commands(&steps) {
            let back: Command = coop_core::codec::decode(&coop_core::codec::encode(&cmd)).unwrap();
            prop_assert_eq!(&back, &cmd);
            let _ = s.apply(&cmd);
        }
        // The outbox is history on its way to the store, not replicated state.
        s.take_outbox();
        let back: State = coop_core::codec::decode(&coop_core::codec::encode(&s)).unwrap();
        prop_assert_eq!(back, s);
    }
}

fn place_all(s: &mut State, at: i64) -> usize {
    let ps = schedule(s, at);
    let n = ps.len();
    for p in ps {
        s.apply(&Command {
            at_ms: at,
            op: Op::Place {
                job: p.job,
                node: p.node,
                gpus: p.gpus,
            },
        })
        .expect("placement from schedule() is valid");
    }
    n
}

#[test]
fn a_gpu_that_is_taken_cannot_be_placed_again() {
    let (mut s, at) = base();
    let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
    for id in [a, b] {
        s.apply(&Command {
            at_ms: at,
            op: Op::SubmitJob {
                id,
                member: "beta".into(),
                spec: spec(JobKind::Finetune, 2),
            },
        })
        .unwrap();
    }
    let place = |job, first: u32| Command {
        at_ms: at,
        op: Op::Place {
            job,
            node: "n1".into(),
            gpus: vec![format!("GPU-n1-{first}"), format!("GPU-n1-{}", first + 1)],
        },
    };
    s.apply(&place(a, 0)).unwrap();
    let before = s.clone();
    let err = s.apply(&place(b, 1)).unwrap_err();
    assert!(matches!(err, Rejection::FailedPrecondition(_)), "{err:?}");
    assert_eq!(s, before);
    s.apply(&place(b, 2)).unwrap();
}

#[test]
fn best_fit_keeps_the_big_node_free_and_gangs_stay_on_one_node() {
    let (mut s, at) = base();
    // A 2-GPU job fits on n2 exactly: best fit puts it there, not on n1.
    let small = Uuid::from_u128(10);
    let big = Uuid::from_u128(11);
    for (id, n) in [(small, 2), (big, 4)] {
        s.apply(&Command {
            at_ms: at,
            op: Op::SubmitJob {
                id,
                member: "beta".into(),
                spec: spec(JobKind::Finetune, n),
            },
        })
        .unwrap();
    }
    assert_eq!(place_all(&mut s, at), 2);
    assert_eq!(s.jobs[&small].node.as_deref(), Some("n2"));
    assert_eq!(s.jobs[&big].node.as_deref(), Some("n1"));
    check_invariants(&s);
}

#[test]
fn too_large_or_empty_jobs_are_rejected_with_the_field() {
    let (mut s, at) = base();
    let before = s.clone();
    let submit = |n: u32, cmd: Vec<String>| Command {
        at_ms: at,
        op: Op::SubmitJob {
            id: Uuid::from_u128(99),
            member: "beta".into(),
            spec: JobSpec {
                command: cmd,
                ..spec(JobKind::Finetune, n)
            },
        },
    };
    for (cmd, field) in [
        (submit(5, vec!["x".into()]), "gpus"),
        (submit(0, vec!["x".into()]), "gpus"),
        (submit(1, vec![]), "command"),
        (submit(1, vec!["  ".into()]), "command"),
    ] {
        let err = s.apply(&cmd).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{field}:")), "{err}");
        assert_eq!(s, before);
    }
}

#[test]
fn node_loss_requeues_bills_up_to_the_last_heartbeat_then_what_the_agent_measured() {
    let (mut s, at) = base();
    let id = Uuid::from_u128(7);
    s.apply(&Command {
        at_ms: at,
        op: Op::SubmitJob {
            id,
            member: "beta".into(),
            spec: spec(JobKind::Finetune, 4),
        },
    })
    .unwrap();
    place_all(&mut s, at);
    let report = |seq, report| Command {
        at_ms: at + 100,
        op: Op::Report {
            node: "n1".into(),
            session: "s1".into(),
            seq,
            report,
        },
    };
    s.apply(&report(
        1,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: at + 10,
        },
    ))
    .unwrap();
    // A retransmitted report is applied once.
    let again = s.clone();
    s.apply(&report(
        1,
        RunReport::Started {
            job: id,
            attempt: 1,
            at_ms: at + 50,
        },
    ))
    .unwrap();
    assert_eq!(s, again);
    s.apply(&Command {
        at_ms: at + 20_000,
        op: Op::NodeDown {
            node: "n1".into(),
            last_seen_ms: at + 1_010,
        },
    })
    .unwrap();
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Pending);
    assert_eq!(j.gpu_ms, 4 * 1_000);
    check_invariants(&s);
    // The agent was only cut off: it kept the run going and metering it, and
    // its late reports bill what it measured past the last heartbeat, once.
    let mut late = report(
        2,
        RunReport::Exited {
            job: id,
            attempt: 1,
            at_ms: at + 30_000,
            exit_code: 143,
            reason: String::new(),
            energy_mj: 7_000,
        },
    );
    // It reaches the leader after the time it reports, once the agent has
    // registered again (a node that is down reports nothing).
    late.at_ms = at + 31_000;
    s.apply(&Command {
        at_ms: at + 30_500,
        op: Op::RegisterNode {
            node: "n1".into(),
            owner: "default".into(),
            gpus: gpus("n1", 4, "A100-80GB"),
            session: "s1".into(),
            orphaned_runs_end_ms: at + 30_500,
            address: String::new(),
            site: String::new(),
        },
    })
    .unwrap();
    s.apply(&late).unwrap();
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Pending, "the job itself has moved on");
    assert_eq!(j.gpu_ms, 4 * 1_000 + 4 * (30_000 - 1_010));
    assert_eq!(j.energy_mj, 7_000);
    let last = s.outbox.usage().last().unwrap();
    assert_eq!(
        (last.attempt, last.start_ms, last.end_ms),
        (1, at + 1_010, at + 30_000)
    );
    let billed = s.clone();
    s.apply(&late).unwrap();
    assert_eq!(s, billed, "a retransmission bills nothing");
    check_invariants(&s);
}

#[test]
fn an_exiting_service_is_restarted_with_back_off() {
    let (mut s, at) = base();
    let id = Uuid::from_u128(8);
    s.apply(&Command {
        at_ms: at,
        op: Op::SubmitJob {
            id,
            member: "beta".into(),
            spec: spec(JobKind::Inference, 1),
        },
    })
    .unwrap();
    place_all(&mut s, at);
    let node = s.jobs[&id].node.clone().unwrap();
    s.apply(&Command {
        at_ms: at + 5,
        op: Op::Report {
            node,
            session: "s1".into(),
            seq: 1,
            report: RunReport::Exited {
                job: id,
                attempt: 1,
                at_ms: at + 5,
                exit_code: 1,
                reason: String::new(),
                energy_mj: 0,
            },
        },
    })
    .unwrap();
    assert_eq!(s.jobs[&id].state, JobState::Pending);
    assert_eq!(place_all(&mut s, at + 10), 0, "placed during its back-off");
    assert_eq!(place_all(&mut s, at + 5 + 1_000), 1);
    assert_eq!(s.jobs[&id].attempts, 2);
}

#[test]
fn probed_throughput_weighs_models_without_a_declared_weight_when_the_policy_says_so() {
    let (mut s, mut at) = base();
    let measured = |fp16_tflops: u64| {
        Some(Capacity {
            fp16_gflops: fp16_tflops * 1000,
            bf16_gflops: fp16_tflops * 1000,
            memory_mb_per_s: 3_000_000,
        })
    };
    let mut h100 = gpus("n3", 2, "H100-80GB-HBM3");
    h100[0].measured = measured(700);
    h100[1].measured = measured(600);
    let mut step = |s: &mut State, op: Op| {
        s.apply(&Command { at_ms: at, op }).expect("applies");
        at += 1;
    };
    step(
        &mut s,
        Op::RegisterNode {
            node: "n3".into(),
            owner: "beta".into(),
            gpus: h100,
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
    );
    // Measurements alone change nothing: the policy has not asked for them.
    assert_eq!(s.weight_milli("H100-80GB-HBM3"), 1000);
    let set = |settings: &[&str]| Op::SetPolicy {
        settings: settings
            .iter()
            .map(|kv| Setting::parse(kv).unwrap())
            .collect(),
        by: "operator".into(),
        reason: "weigh by the probe".into(),
    };
    step(&mut s, set(&["weight_reference_tflops=325"]));
    // The mean of 700 and 600 TFLOPS against 325 TFLOPS a unit.
    assert_eq!(s.weight_milli("H100-80GB-HBM3"), 2000);
    // Unprobed models stay at one unit; a declared weight wins over a measurement.
    assert_eq!(s.weight_milli("T4-16GB"), 1000);
    step(&mut s, set(&["weight.H100-80GB-HBM3=3"]));
    assert_eq!(s.weight_milli("H100-80GB-HBM3"), 3000);
}
