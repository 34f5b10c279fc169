//! Multi-node jobs in the state machine and the scheduling pass: placed all
//! at once or not at all, each part billed from its own node's reports, one
//! fate for all parts; what a forged placement or a stranger's report gets.

use coop_core::ledger::Entry;
use coop_core::placement::{Wait, plan};
use coop_core::policy::Setting;
use coop_core::state::*;
use std::collections::BTreeSet;

use uuid::Uuid;

fn gpus(node: &str, n: u32, model: &str) -> Vec<GpuInfo> {
    (0..n)
        .map(|i| GpuInfo {
            uuid: format!("GPU-{node}-{i}"),
            index: i,
            model: model.into(),
            memory_mb: 80 * 1024,
            measured: None,
            power_limit_w: 400,
        })
        .collect()
}

fn spec(n: u32) -> JobSpec {
    JobSpec {
        kind: JobKind::Finetune,
        gpus: n,
        command: vec!["train".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible: true,
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

/// Members a and b (equal shares), nodes n1..n3 of four A100s each (owned
/// by a) and n4 of four H100s; n1 and n4 in rack-a, n2 and n3 in rack-b.
fn coop() -> State {
    let mut s = State::default();
    let mut ops = vec![
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
    ];
    for (n, model, site) in [
        ("n1", "A100", "rack-a"),
        ("n2", "A100", "rack-b"),
        ("n3", "A100", "rack-b"),
        ("n4", "H100", "rack-a"),
    ] {
        ops.push(Op::RegisterNode {
            node: n.into(),
            owner: "a".into(),
            gpus: gpus(n, 4, model),
            session: format!("s-{n}"),
            orphaned_runs_end_ms: 0,
            address: format!("10.0.0.{}", &n[1..]),
            site: site.into(),
        });
    }
    for op in ops {
        apply(&mut s, 1_000, op).expect("setup");
    }
    s
}

fn submit(s: &mut State, at: i64, id: u128, member: &str, spec: JobSpec) -> JobId {
    let id = Uuid::from_u128(id);
    apply(
        s,
        at,
        Op::SubmitJob {
            id,
            member: member.into(),
            spec,
        },
    )
    .expect("submitted");
    id
}

/// One pass at `at`, its preemptions and placements applied.
fn pass(s: &mut State, at: i64) -> coop_core::placement::Plan {
    let usage = coop_core::fairshare::usage(s, at);
    let p = plan(s, at, &usage);
    for pre in &p.preemptions {
        apply(
            s,
            at,
            Op::Preempt {
                job: pre.job,
                for_job: pre.for_job,
            },
        )
        .expect("preempts");
    }
    for pl in p.placements.clone() {
        let op = pl.op(s);
        apply(s, at, op).expect("places");
    }
    p
}

struct Agents {
    seq: std::collections::BTreeMap<String, u64>,
}

impl Agents {
    fn new() -> Self {
        Agents {
            seq: Default::default(),
        }
    }
    /// Each of `nodes` reports that its part of `job`'s first run started.
    fn start<'a>(
        &mut self,
        s: &mut State,
        at: i64,
        job: JobId,
        nodes: impl IntoIterator<Item = &'a str>,
    ) {
        for n in nodes {
            let started = RunReport::Started {
                job,
                attempt: 1,
                at_ms: at,
            };
            self.report(s, at, n, started);
        }
    }

    /// `node` reports that its part (or run) of `job`'s first attempt exited
    /// with `code` at `at`.
    fn exit(&mut self, s: &mut State, at: i64, node: &str, job: JobId, code: i32) {
        let exited = RunReport::Exited {
            job,
            attempt: 1,
            at_ms: at,
            exit_code: code,
            reason: String::new(),
            energy_mj: 0,
        };
        self.report(s, at, node, exited);
    }

    fn report(&mut self, s: &mut State, at: i64, node: &str, report: RunReport) {
        let seq = self.seq.entry(node.into()).or_default();
        *seq += 1;
        apply(
            s,
            at,
            Op::Report {
                node: node.into(),
                session: format!("s-{node}"),
                seq: *seq,
                report,
            },
        )
        .expect("report applies");
    }
}

fn parts(s: &State, id: JobId) -> Vec<(String, usize)> {
    s.jobs[&id]
        .gang
        .as_ref()
        .expect("a multi-node run")
        .parts
        .iter()
        .map(|p| (p.node.clone(), p.gpus.len()))
        .collect()
}

fn usage_of(s: &mut State, id: JobId) -> Vec<UsageRecord> {
    s.take_outbox()
        .records
        .into_iter()
        .filter_map(|r| match r.entry {
            Entry::Usage(u) if u.job == id => Some(u),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_larger_than_any_node_runs_over_the_fewest_nodes_of_one_model() {
    let mut s = coop();
    let id = submit(&mut s, 2_000, 1, "a", spec(8));
    let p = pass(&mut s, 3_000);
    assert_eq!(p.placements.len(), 1);
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.gpus.len(), 8);
    let placed = parts(&s, id);
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert!(
        placed.iter().all(|(n, g)| n != "n4" && *g == 4),
        "{placed:?}"
    );
    assert_eq!(j.node.as_deref(), Some(placed[0].0.as_str()));
    assert_eq!(j.gang.as_ref().unwrap().port, FIRST_RENDEZVOUS_PORT);
    // Every GPU of both nodes is the job's.
    for (n, _) in &placed {
        assert!(s.nodes[n].gpus.iter().all(|g| g.job == Some(id)));
    }
    // Only n1 (A100) and n4 (H100) have room: one model only, so another
    // job of 8 (any model) waits...
    let id2 = submit(&mut s, 4_000, 2, "b", spec(8));
    pass(&mut s, 5_000);
    assert_eq!(s.jobs[&id2].state, JobState::Pending);
    let usage = coop_core::fairshare::usage(&s, 6_000);
    let p = plan(&s, 6_000, &usage);
    assert!(
        matches!(
            p.waiting.get(&id2),
            Some(
                Wait::NoFitNodes {
                    nodes: 2,
                    per_node: 4
                } | Wait::Reserved { .. }
            )
        ),
        "{:?}",
        p.waiting.get(&id2)
    );
    // ...while one of 4 runs at once.
    let id3 = submit(&mut s, 6_500, 3, "b", spec(4));
    pass(&mut s, 7_000);
    assert_eq!(s.jobs[&id3].state, JobState::Running);
    assert_eq!(s.jobs[&id2].state, JobState::Pending);
}

#[test]
fn a_gang_is_placed_whole_or_not_at_all() {
    let mut s = coop();
    // Two GPUs of n1 are taken: twelve A100s are no longer free anywhere.
    let small = submit(&mut s, 2_000, 1, "a", spec(2));
    pass(&mut s, 2_500);
    assert_eq!(s.jobs[&small].node.as_deref(), Some("n1"));
    let mut big = spec(12);
    big.gpu_model = Some("A100".into());
    let id = submit(&mut s, 3_000, 2, "b", big);
    pass(&mut s, 4_000);
    assert_eq!(s.jobs[&id].state, JobState::Pending);
    assert!(s.nodes["n2"].gpus.iter().all(|g| g.job.is_none()));
    assert!(s.nodes["n3"].gpus.iter().all(|g| g.job.is_none()));
    // Once the small run ends, all three parts start together.
    let mut agents = Agents::new();
    agents.exit(&mut s, 5_000, "n1", small, 0);
    pass(&mut s, 6_000);
    assert_eq!(s.jobs[&id].state, JobState::Running);
    assert_eq!(parts(&s, id).len(), 3);
}

#[test]
fn more_gpus_than_the_nodes_could_ever_give_are_refused_at_submission() {
    let mut s = coop();
    let mut big = spec(16);
    big.gpu_model = Some("A100".into());
    let err = apply(
        &mut s,
        2_000,
        Op::SubmitJob {
            id: Uuid::from_u128(9),
            member: "a".into(),
            spec: big,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("16 GPUs as 4 nodes of 4, but 3 registered nodes"),
        "{err}"
    );
    let mut bad = spec(8);
    bad.gpus_per_node = 3;
    assert!(
        validate_spec(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("gpus_per_node:")
    );
    bad.gpus_per_node = 0;
    bad.nodes = 3;
    assert!(
        validate_spec(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("nodes:")
    );
}

/// Job 1 of member a: 8 GPUs over n1 and n2 (in rank order), placed at 3 s.
fn running_gang() -> (State, JobId, [String; 2]) {
    let mut s = coop();
    let id = submit(&mut s, 2_000, 1, "a", spec(8));
    pass(&mut s, 3_000);
    let p = parts(&s, id);
    (s, id, [p[0].0.clone(), p[1].0.clone()])
}

#[test]
fn each_part_is_billed_from_its_own_nodes_reports_exactly_once() {
    let (mut s, id, [r0, r1]) = running_gang();
    s.take_outbox();
    let mut agents = Agents::new();
    let started = |at_ms| RunReport::Started {
        job: id,
        attempt: 1,
        at_ms,
    };
    agents.report(&mut s, 3_500, &r0, started(3_200));
    agents.report(&mut s, 4_500, &r1, started(4_000));
    // A node holding no part of it reports for it: ignored.
    let stranger = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != r0 && *n != r1)
        .unwrap();
    agents.report(
        &mut s,
        5_000,
        stranger,
        RunReport::Usage {
            job: id,
            attempt: 1,
            to_ms: 5_000,
            energy_mj: 1,
        },
    );
    assert!(usage_of(&mut s, id).is_empty());
    let usage = |to_ms| RunReport::Usage {
        job: id,
        attempt: 1,
        to_ms,
        energy_mj: 1_000,
    };
    agents.report(&mut s, 13_200, &r0, usage(13_200));
    agents.report(&mut s, 14_000, &r1, usage(14_000));
    let records = usage_of(&mut s, id);
    assert_eq!(records.len(), 2, "{records:?}");
    for (r, node) in records.iter().zip([&r0, &r1]) {
        assert_eq!((&r.node, r.gpus, r.model.as_str()), (node, 4, "A100"));
        assert_eq!(r.gpu_ms, 4 * 10_000, "{r:?}");
        assert_eq!(r.energy_mj, 1_000);
    }
    // A retransmission (same sequence) bills nothing more.
    apply(
        &mut s,
        15_000,
        Op::Report {
            node: r1.clone(),
            session: format!("s-{r1}"),
            seq: agents.seq[&r1],
            report: usage(15_000),
        },
    )
    .unwrap();
    assert!(usage_of(&mut s, id).is_empty());
    let j = &s.jobs[&id];
    assert_eq!(j.gpu_ms, 80_000);
    assert_eq!(j.energy_mj, 2_000);
    assert_eq!(j.started_at_ms, Some(3_200));
    // Both exit 0: completed once, every GPU free.
    for (node, at) in [(&r1, 20_000), (&r0, 21_000)] {
        agents.exit(&mut s, at, node, id, 0);
    }
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.exit_code, Some(0));
    assert_eq!(j.finished_at_ms, Some(21_000));
    assert_eq!(j.gpu_ms, 80_000 + 4 * 6_000 + 4 * 7_800);
    assert!(
        s.nodes
            .values()
            .flat_map(|n| &n.gpus)
            .all(|g| g.job.is_none())
    );
    assert!(s.running.is_empty());
}

#[test]
fn a_failed_part_stops_the_others_and_the_job_fails_once_with_its_code() {
    let (mut s, id, [r0, r1]) = running_gang();
    let mut agents = Agents::new();
    agents.start(&mut s, 4_000, id, [r0.as_str(), r1.as_str()]);
    agents.report(
        &mut s,
        6_000,
        &r1,
        RunReport::Exited {
            job: id,
            attempt: 1,
            at_ms: 6_000,
            exit_code: 3,
            reason: "exit status 3".into(),
            energy_mj: 0,
        },
    );
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.stop, Some(Stop::PartEnded), "the other part is stopped");
    assert!(s.nodes[&r1].gpus.iter().all(|g| g.job.is_none()));
    assert!(s.nodes[&r0].gpus.iter().all(|g| g.job == Some(id)));
    // Live figures count the part still running only: rank 1's billed two
    // seconds, and rank 0's unbilled two and a half, of four GPUs each.
    assert_eq!(s.job_gpu_ms(&s.jobs[&id], 6_500), 4 * 2_000 + 4 * 2_500);
    // A cancel now wins over the part's failure, as over any stop.
    apply(&mut s, 6_500, Op::CancelJob { id }).unwrap();
    assert_eq!(s.jobs[&id].stop, Some(Stop::Cancel));
    agents.report(
        &mut s,
        7_000,
        &r0,
        RunReport::Exited {
            job: id,
            attempt: 1,
            at_ms: 7_000,
            exit_code: 143,
            reason: "signal 15".into(),
            energy_mj: 0,
        },
    );
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.exit_code, Some(3), "{j:?}");
    let g = j.gang.as_ref().unwrap();
    let codes: Vec<_> = g
        .parts
        .iter()
        .map(|p| p.end.as_ref().unwrap().exit_code)
        .collect();
    assert_eq!(codes, [Some(143), Some(3)]);
    assert_eq!(j.gpu_ms, 4 * 3_000 + 4 * 2_000);
}

#[test]
fn without_a_cancel_the_first_failing_rank_decides() {
    let (mut s, id, [r0, r1]) = running_gang();
    let mut agents = Agents::new();
    let exit = |code, at| RunReport::Exited {
        job: id,
        attempt: 1,
        at_ms: at,
        exit_code: code,
        reason: String::new(),
        energy_mj: 0,
    };
    agents.report(&mut s, 6_000, &r1, exit(3, 6_000));
    // Rank 0's clock runs a second behind: it claims to have ended first,
    // but the log applied rank 1's failure first.
    agents.report(&mut s, 7_000, &r0, exit(143, 5_000));
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Failed);
    // Rank 0 exited 143 only because it was stopped: rank 1 failed first.
    assert_eq!(j.exit_code, Some(3));
    assert!(
        j.reason.contains(&format!("rank 1 on {r1} exited with 3")),
        "{}",
        j.reason
    );
    assert_eq!(j.stop, None);
    // The job ended once: later reports of either part change nothing.
    let before = s.jobs[&id].clone();
    agents.report(&mut s, 8_000, &r1, exit(0, 8_000));
    assert_eq!(s.jobs[&id], before);
}

#[test]
fn a_part_lost_with_its_node_requeues_the_whole_job_once() {
    let (mut s, id, [r0, r1]) = running_gang();
    let mut agents = Agents::new();
    agents.start(&mut s, 4_000, id, [r0.as_str(), r1.as_str()]);
    apply(
        &mut s,
        20_000,
        Op::NodeDown {
            node: r1.clone(),
            last_seen_ms: 10_000,
        },
    )
    .unwrap();
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Running, "rank 0 is still being stopped");
    assert!(j.stopping());
    assert_eq!(s.nodes[&r1].cut_off.len(), 1);
    assert_eq!(s.nodes[&r1].cut_off[0].gpus, 4);
    agents.exit(&mut s, 21_000, &r0, id, 143);
    let j = &s.jobs[&id];
    assert_eq!(j.state, JobState::Pending, "{j:?}");
    assert_eq!(j.attempts, 1);
    assert!(
        j.reason.contains(&format!("rank 1 on {r1}: node down")),
        "{}",
        j.reason
    );
    // Rank 0 billed to its exit, rank 1 to its node's last heartbeat.
    assert_eq!(j.gpu_ms, 4 * 17_000 + 4 * 6_000);
    // It runs again as a whole, on two A100 nodes that are up.
    pass(&mut s, 22_000);
    let j = &s.jobs[&id];
    assert_eq!((j.state, j.attempts), (JobState::Running, 2));
    let again = parts(&s, id);
    assert_eq!(again.len(), 2);
    assert!(
        again.iter().all(|(n, _)| *n != r1 && n != "n4"),
        "{again:?}"
    );
    // r1's agent was cut off, not dead: back, it reports the end of its part
    // of attempt 1, which is billed from its last heartbeat, once.
    let before = s.jobs[&id].gpu_ms;
    apply(
        &mut s,
        23_000,
        Op::RegisterNode {
            node: r1.clone(),
            owner: "a".into(),
            gpus: gpus(&r1, 4, "A100"),
            session: format!("s-{r1}"),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
    )
    .unwrap();
    s.take_outbox();
    let late = RunReport::Exited {
        job: id,
        attempt: 1,
        at_ms: 15_000,
        exit_code: 143,
        reason: String::new(),
        energy_mj: 0,
    };
    agents.report(&mut s, 24_000, &r1, late.clone());
    let records = usage_of(&mut s, id);
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!((r.node.as_str(), r.attempt, r.gpus), (r1.as_str(), 1, 4));
    assert_eq!((r.start_ms, r.end_ms, r.gpu_ms), (10_000, 15_000, 20_000));
    assert_eq!(s.jobs[&id].gpu_ms, before + 20_000);
    // Its part is no longer cut off: the same report again bills nothing.
    agents.report(&mut s, 24_500, &r1, late);
    assert!(usage_of(&mut s, id).is_empty());
    assert!(s.nodes[&r1].cut_off.is_empty());
}

#[test]
fn a_forged_gang_placement_is_refused_and_changes_nothing() {
    let mut s = coop();
    let id = submit(&mut s, 2_000, 1, "a", spec(8));
    let g = |node: &str, from: u32, n: u32| -> (String, Vec<String>) {
        (
            node.into(),
            (from..from + n)
                .map(|i| format!("GPU-{node}-{i}"))
                .collect(),
        )
    };
    let before = s.clone();
    type Parts = Vec<(String, Vec<String>)>;
    let cases: Vec<(Parts, u16, &str)> = vec![
        (vec![g("n1", 0, 4)], 29500, "parts"),
        (vec![g("n1", 0, 4), g("n1", 0, 4)], 29500, "parts"),
        (
            vec![g("n1", 0, 2), g("n2", 0, 4), g("n3", 0, 2)],
            29500,
            "parts",
        ),
        (vec![g("n1", 0, 3), g("n2", 0, 5)], 29500, "parts"),
        (vec![g("n1", 0, 4), g("n4", 0, 4)], 29500, "gpus"),
        (vec![g("n1", 0, 4), g("n2", 0, 4)], 80, "port"),
        (
            vec![g("n1", 0, 4), ("n2".into(), vec!["GPU-n1-0".into(); 4])],
            29500,
            "gpus",
        ),
    ];
    for (parts, port, field) in cases {
        let err = apply(
            &mut s,
            3_000,
            Op::PlaceGang {
                job: id,
                parts: parts.clone(),
                port,
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, Rejection::InvalidArgument { field: f, .. } if f == field),
            "{parts:?}: {err:?}"
        );
        assert_eq!(s, before);
    }
    // A one-node placement of a multi-node job is refused too.
    let err = apply(
        &mut s,
        3_000,
        Op::Place {
            job: id,
            node: "n1".into(),
            gpus: g("n1", 0, 4).1,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("runs on 2 nodes"), "{err}");
    // A down node takes no part.
    apply(
        &mut s,
        3_000,
        Op::NodeDown {
            node: "n2".into(),
            last_seen_ms: 3_000,
        },
    )
    .unwrap();
    let err = apply(
        &mut s,
        3_000,
        Op::PlaceGang {
            job: id,
            parts: vec![g("n1", 0, 4), g("n2", 0, 4)],
            port: 29500,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("n2 is down"), "{err}");
}

#[test]
fn two_gangs_led_from_one_host_in_one_pass_meet_on_different_ports() {
    let mut s = coop();
    // n2 and n3 share one host (two agents on one machine, as in tests).
    for n in ["n2", "n3"] {
        apply(
            &mut s,
            1_500,
            Op::RegisterNode {
                node: n.into(),
                owner: "a".into(),
                gpus: gpus(n, 4, "A100"),
                session: format!("s-{n}"),
                orphaned_runs_end_ms: 0,
                address: "10.0.0.2".into(),
                site: "rack-b".into(),
            },
        )
        .unwrap();
    }
    let mut half = spec(2);
    half.gpus_per_node = 1;
    half.gpu_model = Some("A100".into());
    let a = submit(&mut s, 2_000, 1, "a", half.clone());
    let b = submit(&mut s, 2_001, 2, "b", half);
    let usage = coop_core::fairshare::usage(&s, 3_000);
    let p = plan(&s, 3_000, &usage);
    assert_eq!(p.placements.len(), 2, "{p:?}");
    // Both are led from rack-b's host, decided in one pass: the leader
    // proposes them together, before either is applied.
    let ops = coop_core::placement::place_ops(&s, p.placements);
    let ports: Vec<u16> = ops
        .iter()
        .map(|op| match op {
            Op::PlaceGang { parts, port, .. } => {
                assert_eq!(s.rendezvous_host(&parts[0].0), "10.0.0.2");
                *port
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ports, [FIRST_RENDEZVOUS_PORT, FIRST_RENDEZVOUS_PORT + 1]);
    for op in ops {
        apply(&mut s, 3_000, op).expect("places");
    }
    assert!(s.running.contains(&a) && s.running.contains(&b));
    // A third, forged onto a port in use on that host, is refused.
    let mut third = spec(2);
    third.gpus_per_node = 1;
    third.gpu_model = Some("A100".into());
    let c = submit(&mut s, 4_000, 3, "a", third);
    let err = apply(
        &mut s,
        4_000,
        Op::PlaceGang {
            job: c,
            parts: vec![
                ("n3".into(), vec!["GPU-n3-3".into()]),
                ("n1".into(), vec!["GPU-n1-0".into()]),
            ],
            port: FIRST_RENDEZVOUS_PORT + 1,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("on 10.0.0.2 is the rendezvous"),
        "{err}"
    );
}

#[test]
fn backfill_keeps_the_reserved_nodes_for_the_head_of_line_gang() {
    let mut s = coop();
    apply(
        &mut s,
        1_500,
        Op::SetPolicy {
            settings: vec![Setting::Ordering(coop_core::policy::Ordering::Fifo)],
            by: "op".into(),
            reason: "fifo".into(),
        },
    )
    .unwrap();
    // n1 half busy and n2 busy for ten minutes, n3 busy for an hour.
    let a100 = |gpus, limit_ms| {
        let mut j = spec(gpus);
        j.gpu_model = Some("A100".into());
        j.time_limit_ms = limit_ms;
        j
    };
    submit(&mut s, 2_000, 1, "a", a100(2, 600_000));
    submit(&mut s, 2_001, 2, "a", a100(4, 600_000));
    submit(&mut s, 2_002, 3, "a", a100(4, 3_600_000));
    pass(&mut s, 3_000);
    let node_of = |s: &State, i: u128| s.jobs[&Uuid::from_u128(i)].node.clone().unwrap();
    assert_eq!(
        [node_of(&s, 1), node_of(&s, 2), node_of(&s, 3)],
        ["n1", "n2", "n3"]
    );
    let mut agents = Agents::new();
    for id in 1..=3u128 {
        let node = node_of(&s, id);
        agents.report(
            &mut s,
            3_000,
            &node,
            RunReport::Started {
                job: Uuid::from_u128(id),
                attempt: 1,
                at_ms: 3_000,
            },
        );
    }
    // The head of the line: 8 A100s, on n1 and n2, free in ten minutes.
    let head = submit(&mut s, 4_000, 10, "b", a100(8, 0));
    // Behind it, a 20-minute job would fit n1's two free GPUs now, but would
    // delay it; a 5-minute one ends before and may use them.
    let late = submit(&mut s, 4_001, 11, "b", a100(2, 1_200_000));
    let usage = coop_core::fairshare::usage(&s, 5_000);
    let p = plan(&s, 5_000, &usage);
    match p.waiting.get(&head) {
        Some(Wait::Reserved { node, at_ms }) => {
            assert_eq!(*at_ms, Some(603_000));
            assert_eq!(node, "n1,n2");
        }
        other => panic!("head of line: {other:?}"),
    }
    assert!(p.placements.is_empty(), "{:?}", p.placements);
    assert_eq!(
        p.waiting.get(&late),
        Some(&Wait::BehindReservation { job: head })
    );
    let short = submit(&mut s, 4_002, 12, "b", a100(2, 300_000));
    pass(&mut s, 5_000);
    assert_eq!(s.jobs[&short].node.as_deref(), Some("n1"));
    assert_eq!(s.jobs[&late].state, JobState::Pending);
}

#[test]
fn preemption_frees_a_gangs_worth_of_gpus_across_nodes() {
    let mut s = coop();
    apply(
        &mut s,
        1_500,
        Op::SetPolicy {
            settings: vec![Setting::MinRuntimeS(0)],
            by: "op".into(),
            reason: "test".into(),
        },
    )
    .unwrap();
    // Member a fills all three A100 nodes with preemptible runs of two.
    let mut one = spec(2);
    one.gpu_model = Some("A100".into());
    for i in 1..=6u128 {
        submit(&mut s, 2_000 + i as i64, i, "a", one.clone());
    }
    pass(&mut s, 3_000);
    let mut agents = Agents::new();
    for i in 1..=6u128 {
        let id = Uuid::from_u128(i);
        let node = s.jobs[&id].node.clone().unwrap();
        agents.report(
            &mut s,
            3_000,
            &node,
            RunReport::Started {
                job: id,
                attempt: 1,
                at_ms: 3_000,
            },
        );
    }
    // Member b, below its half (8 of 16), wants 4 A100s as two parts of
    // two: one run of a's goes on each of two nodes, leaving a its half.
    let mut big = spec(4);
    big.gpus_per_node = 2;
    big.gpu_model = Some("A100".into());
    let id = submit(&mut s, 4_000, 10, "b", big);
    let p = pass(&mut s, 5_000);
    assert_eq!(p.preemptions.len(), 2, "{:?}", p.preemptions);
    assert!(p.preemptions.iter().all(|pre| pre.for_job == id));
    let victims: std::collections::BTreeSet<String> = p
        .preemptions
        .iter()
        .map(|pre| s.jobs[&pre.job].node.clone().unwrap())
        .collect();
    assert_eq!(victims.len(), 2, "on two nodes");
    // Once both have stopped, the gang starts there.
    for pre in &p.preemptions {
        let node = s.jobs[&pre.job].node.clone().unwrap();
        agents.exit(&mut s, 6_000, &node, pre.job, 143);
    }
    pass(&mut s, 7_000);
    assert_eq!(s.jobs[&id].state, JobState::Running);
    let mut on: Vec<String> = parts(&s, id).into_iter().map(|(n, _)| n).collect();
    on.sort();
    assert_eq!(on, victims.into_iter().collect::<Vec<_>>());
}

#[test]
fn a_multi_node_job_goes_across_sites_only_where_one_site_cannot_hold_it() {
    let mut s = coop();
    // One GPU of n3 is busy: rack-b no longer has two free A100 nodes.
    let mut one = spec(1);
    one.gpu_model = Some("A100".into());
    let small = submit(&mut s, 2_000, 1, "a", one);
    let mut agents = Agents::new();
    apply(
        &mut s,
        2_500,
        Op::Place {
            job: small,
            node: "n3".into(),
            gpus: vec!["GPU-n3-0".into()],
        },
    )
    .unwrap();
    let at = "n3".to_string();
    let mut big = spec(8);
    big.gpu_model = Some("A100".into());
    let id = submit(&mut s, 3_000, 2, "b", big);
    pass(&mut s, 4_000);
    let mut nodes: Vec<String> = parts(&s, id).into_iter().map(|(n, _)| n).collect();
    nodes.sort();
    assert!(!nodes.contains(&at), "{nodes:?} and the busy {at}");
    let sites: BTreeSet<&str> = nodes.iter().map(|n| s.nodes[n].site.as_str()).collect();
    assert_eq!(sites.len(), 2, "across sites: {nodes:?}");
    // A site label that is not a name is refused at registration.
    agents.seq.clear();
    let err = apply(
        &mut s,
        5_000,
        Op::RegisterNode {
            node: "n5".into(),
            owner: "a".into(),
            gpus: gpus("n5", 1, "A100"),
            session: "s-n5".into(),
            orphaned_runs_end_ms: 0,
            address: "10.0.0.5".into(),
            site: "Rack A".into(),
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Rejection::InvalidArgument { field, .. } if field == "site"),
        "{err:?}"
    );
    for address in [
        "10.0.0.5; rm -rf /",
        "a b",
        &"x".repeat(300),
        "10.0.0.5:29500",
        "[fe80::1]",
        "-oProxyCommand",
    ] {
        let err = apply(
            &mut s,
            5_000,
            Op::RegisterNode {
                node: "n5".into(),
                owner: "a".into(),
                gpus: gpus("n5", 1, "A100"),
                session: "s-n5".into(),
                orphaned_runs_end_ms: 0,
                address: address.into(),
                site: String::new(),
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, Rejection::InvalidArgument { field, .. } if field == "address"),
            "{err:?}"
        );
    }
    assert!(!s.nodes.contains_key("n5"));
}

#[test]
fn preempting_a_multi_node_run_frees_its_gpus_on_every_node() {
    let mut s = coop();
    apply(
        &mut s,
        1_500,
        Op::SetPolicy {
            settings: vec![
                Setting::MinRuntimeS(0),
                Setting::Share {
                    member: "a".into(),
                    shares: 1,
                },
                Setting::Share {
                    member: "b".into(),
                    shares: 3,
                },
            ],
            by: "op".into(),
            reason: "test".into(),
        },
    )
    .unwrap();
    // Member a (a quarter of 16 GPUs) holds 12: a 4-GPU run on n1, then a
    // younger preemptible run of 2 x 4 over rack-b.
    let mut four = spec(4);
    four.gpu_model = Some("A100".into());
    let single = submit(&mut s, 2_000, 1, "a", four);
    apply(
        &mut s,
        2_000,
        Op::Place {
            job: single,
            node: "n1".into(),
            gpus: (0..4).map(|i| format!("GPU-n1-{i}")).collect(),
        },
    )
    .unwrap();
    let mut eight = spec(8);
    eight.gpu_model = Some("A100".into());
    let gang = submit(&mut s, 2_100, 2, "a", eight.clone());
    pass(&mut s, 2_200);
    assert_eq!(parts(&s, gang).len(), 2);
    let mut agents = Agents::new();
    agents.report(
        &mut s,
        2_500,
        "n1",
        RunReport::Started {
            job: single,
            attempt: 1,
            at_ms: 2_500,
        },
    );
    agents.start(&mut s, 3_000, gang, ["n2", "n3"]);
    // Member b wants 2 x 4 A100s. Preempting a's multi-node run alone frees
    // both nodes and leaves a its quarter; taking the run on n1 as well (or
    // instead) would take a below it.
    let id = submit(&mut s, 4_000, 3, "b", eight);
    let p = pass(&mut s, 5_000);
    let victims: Vec<JobId> = p.preemptions.iter().map(|x| x.job).collect();
    assert_eq!(victims, [gang], "{:?}", p.preemptions);
    for n in ["n2", "n3"] {
        agents.exit(&mut s, 6_000, n, gang, 143);
    }
    assert_eq!(s.jobs[&gang].state, JobState::Pending);
    assert_eq!(s.jobs[&gang].preemptions, 1);
    pass(&mut s, 7_000);
    let mut on: Vec<String> = parts(&s, id).into_iter().map(|(n, _)| n).collect();
    on.sort();
    assert_eq!(on, ["n2", "n3"]);
    assert_eq!(s.jobs[&single].state, JobState::Running);
}

#[test]
fn the_policy_can_keep_a_jobs_parts_in_one_site_or_with_one_owner() {
    let mut s = coop();
    let set = |s: &mut State, value: &str| {
        let setting = Setting::parse(&format!("gang_nodes={value}")).expect("parses");
        assert_eq!(setting.to_string(), format!("gang_nodes={value}"));
        apply(
            s,
            1_500,
            Op::SetPolicy {
                settings: vec![setting],
                by: "op".into(),
                reason: "test".into(),
            },
        )
        .unwrap();
    };
    let (key, why) = Setting::parse("gang_nodes=rack").unwrap_err();
    assert_eq!(key, "gang_nodes");
    assert!(why.contains("not any, site or owner"), "{why}");
    set(&mut s, "site");
    // One GPU of n3 is busy: rack-b cannot hold 8 A100s, rack-a has one
    // A100 node: the job waits rather than span both racks.
    let mut one = spec(1);
    one.gpu_model = Some("A100".into());
    let small = submit(&mut s, 2_000, 1, "a", one);
    apply(
        &mut s,
        2_000,
        Op::Place {
            job: small,
            node: "n3".into(),
            gpus: vec!["GPU-n3-0".into()],
        },
    )
    .unwrap();
    let mut eight = spec(8);
    eight.gpu_model = Some("A100".into());
    let id = submit(&mut s, 3_000, 2, "b", eight);
    pass(&mut s, 4_000);
    assert_eq!(s.jobs[&id].state, JobState::Pending);
    let all = |n: &str| -> (String, Vec<String>) {
        (n.into(), (0..4).map(|i| format!("GPU-{n}-{i}")).collect())
    };
    let err = apply(
        &mut s,
        4_000,
        Op::PlaceGang {
            job: id,
            parts: vec![all("n1"), all("n2")],
            port: FIRST_RENDEZVOUS_PORT,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Rejection::InvalidArgument { field, message } if field == "parts" && message.contains("gang_nodes=site")),
        "{err:?}"
    );
    let mut agents = Agents::new();
    agents.exit(&mut s, 5_000, "n3", small, 0);
    pass(&mut s, 6_000);
    let mut on: Vec<String> = parts(&s, id).into_iter().map(|(n, _)| n).collect();
    on.sort();
    assert_eq!(on, ["n2", "n3"]);

    // One owner: member b's machine n5 does not join a's three.
    set(&mut s, "owner");
    apply(
        &mut s,
        7_000,
        Op::RegisterNode {
            node: "n5".into(),
            owner: "b".into(),
            gpus: gpus("n5", 4, "A100"),
            session: "s-n5".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: "rack-a".into(),
        },
    )
    .unwrap();
    let mut twelve = spec(12);
    twelve.gpu_model = Some("A100".into());
    submit(&mut s, 8_000, 3, "a", twelve);
    let mut sixteen = spec(16);
    sixteen.gpu_model = Some("A100".into());
    let err = apply(
        &mut s,
        8_000,
        Op::SubmitJob {
            id: Uuid::from_u128(4),
            member: "a".into(),
            spec: sixteen,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(
            "16 GPUs as 4 nodes of 4, but 3 registered nodes have 4 matching A100 GPUs of one owner"
        ),
        "{err}"
    );
}
