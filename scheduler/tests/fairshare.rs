//! Properties of fair share: decay against its closed form, usage conserved
//! between agents' reports and the ledger, the order of pending jobs, and
//! preemption that converges and never moves GPUs straight back.

use std::collections::BTreeMap;

use coop_core::fairshare::{entitlements, factors, recomputed, usage};
use coop_core::placement::plan;
use coop_core::policy::Setting;
use coop_core::state::*;
use proptest::prelude::*;
use uuid::Uuid;

const HOUR_MS: f64 = 3_600_000.0;

fn apply(s: &mut State, at: i64, op: Op) {
    s.apply(&Command { at_ms: at, op })
        .expect("command applies");
}

fn spec(gpus: u32, preemptible: bool, priority: i32) -> JobSpec {
    JobSpec {
        kind: JobKind::Finetune,
        gpus,
        command: vec!["true".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible,
        kill_grace_ms: 1000,
        priority,
        time_limit_ms: 0,
        isolation: Default::default(),
        env: Default::default(),
        nodes: 0,
        gpus_per_node: 0,
    }
}

/// A cluster of `nodes` nodes of `per_node` GPUs owned by "pool" (no share),
/// and `members` with the given shares.
fn cluster(nodes: u32, per_node: u32, members: &[(&str, u64)]) -> State {
    let mut s = State::default();
    apply(
        &mut s,
        0,
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: Some(("pool".into(), "h-pool".into())),
        },
    );
    let mut settings = vec![Setting::Share {
        member: "pool".into(),
        shares: 0,
    }];
    for (m, share) in members {
        apply(
            &mut s,
            0,
            Op::AddMember {
                name: m.to_string(),
                token_hash: format!("h-{m}"),
                expires_at_ms: None,
            },
        );
        settings.push(Setting::Share {
            member: m.to_string(),
            shares: *share,
        });
    }
    settings.push(Setting::MinRuntimeS(60));
    apply(
        &mut s,
        0,
        Op::SetPolicy {
            settings,
            by: "test".into(),
            reason: "test".into(),
        },
    );
    for n in 0..nodes {
        let name = format!("n{n}");
        let gpus = (0..per_node)
            .map(|i| GpuInfo {
                uuid: format!("GPU-{name}-{i}"),
                index: i,
                model: "A100-80GB".into(),
                memory_mb: 80 * 1024,
                measured: None,
                power_limit_w: 0,
            })
            .collect();
        apply(
            &mut s,
            0,
            Op::RegisterNode {
                node: name,
                owner: "pool".into(),
                gpus,
                session: "s".into(),
                orphaned_runs_end_ms: 0,
                address: String::new(),
                site: String::new(),
            },
        );
    }
    s
}

struct Agent {
    seq: BTreeMap<String, u64>,
}

impl Agent {
    fn report(&mut self, s: &mut State, at: i64, job: JobId, report: RunReport) {
        let node = s.jobs[&job].node.clone().expect("placed");
        let seq = self.seq.entry(node.clone()).or_default();
        *seq += 1;
        apply(
            s,
            at,
            Op::Report {
                node,
                session: "s".into(),
                seq: *seq,
                report,
            },
        );
    }

    /// Places what the pass places and starts each run at once.
    fn pass(&mut self, s: &mut State, at: i64) -> coop_core::placement::Plan {
        let p = plan(s, at, &usage(s, at));
        for pl in &p.placements {
            apply(
                s,
                at,
                Op::Place {
                    job: pl.job,
                    node: pl.node.clone(),
                    gpus: pl.gpus.clone(),
                },
            );
            let attempt = s.jobs[&pl.job].attempts;
            self.report(
                s,
                at,
                pl.job,
                RunReport::Started {
                    job: pl.job,
                    attempt,
                    at_ms: at,
                },
            );
        }
        p
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// However an agent cuts a run into usage reports, the ledger holds exactly
    /// the run's GPU time and the reported energy, and decayed usage equals the
    /// closed form of a constant rate decayed continuously; the incremental
    /// tally the leader keeps agrees with a recomputation from scratch.
    #[test]
    fn usage_is_conserved_and_decays_as_the_closed_form(
        gpus in 1u32..=4,
        // Each cut: how long after the last, and the GPUs' draw meanwhile (W
        // each, under the 1.5 kW any board may draw: the scheduler refuses
        // more, see `plausible`).
        cuts in proptest::collection::vec((1i64..400_000, 0u64..1_400), 0..12),
        run_ms in 1i64..2_000_000,
        later_ms in 0i64..30_000_000,
        half_life_s in 60u64..1_000_000,
    ) {
        let mut s = cluster(1, 4, &[("a", 1)]);
        apply(&mut s, 0, Op::SetPolicy {
            settings: vec![Setting::HalfLifeS(half_life_s)],
            by: "t".into(), reason: "t".into(),
        });
        let id = Uuid::from_u128(1);
        apply(&mut s, 1000, Op::SubmitJob { id, member: "a".into(), spec: spec(gpus, false, 0) });
        let mut agent = Agent { seq: BTreeMap::new() };
        agent.pass(&mut s, 1000);
        let start = 1000;
        let mut t = start;
        let mut energy = 0;
        for (dt, watts) in &cuts {
            let from = t;
            t = (t + dt).min(start + run_ms);
            let e = watts * gpus as u64 * (t - from) as u64;
            agent.report(&mut s, t, id, RunReport::Usage { job: id, attempt: 1, to_ms: t, energy_mj: e });
            energy += e;
        }
        let end = start + run_ms;
        agent.report(&mut s, end, id, RunReport::Exited {
            job: id, attempt: 1, at_ms: end, exit_code: 0, reason: String::new(), energy_mj: 11,
        });
        energy += 11;
        prop_assert_eq!(s.jobs[&id].state, JobState::Completed);
        let billed: u64 = s.outbox.usage().map(|r| r.gpu_ms).sum();
        prop_assert_eq!(billed, run_ms as u64 * gpus as u64);
        prop_assert_eq!(s.outbox.usage().map(|r| r.energy_mj).sum::<u64>(), energy);
        let contiguous = s.outbox.usage().collect::<Vec<_>>().windows(2).all(|w| w[0].end_ms == w[1].start_ms);
        prop_assert!(contiguous, "usage intervals overlap or leave gaps");

        let now = end + later_ms;
        let h = half_life_s as f64 * 1000.0;
        let closed = gpus as f64 * h / std::f64::consts::LN_2
            * ((-(now - end) as f64 / h).exp2() - (-(now - start) as f64 / h).exp2())
            / HOUR_MS;
        // From every record, and from the per-member total the state keeps.
        let exact = recomputed(&s, s.outbox.usage(), now)["a"];
        prop_assert!((exact - closed).abs() <= 1e-9 * closed.max(1e-12), "{} vs {}", exact, closed);
        let kept = usage(&s, now)["a"];
        prop_assert!((kept - closed).abs() <= 1e-9 * closed.max(1e-12), "{} vs {}", kept, closed);
    }

    /// Pending jobs are considered by their member's factor (highest first),
    /// then by priority, then by age.
    #[test]
    fn pending_jobs_follow_factor_then_priority_then_age(
        shares in proptest::collection::vec(0u64..5, 3),
        usage in proptest::collection::vec(0.0f64..100.0, 3),
        jobs in proptest::collection::vec((0usize..3, -2i32..3, 0i64..50), 1..40),
    ) {
        let names = ["a", "b", "c"];
        let members: Vec<(&str, u64)> = names.iter().copied().zip(shares.iter().copied()).collect();
        let mut s = cluster(1, 1, &members);
        // The one GPU is busy, so the pass places nothing and its order is whole.
        let busy = Uuid::from_u128(999);
        apply(&mut s, 1, Op::SubmitJob { id: busy, member: "pool".into(), spec: spec(1, false, 0) });
        Agent { seq: BTreeMap::new() }.pass(&mut s, 1);
        for (i, (m, prio, t)) in jobs.iter().enumerate() {
            let id = Uuid::from_u128(i as u128 + 1);
            apply(&mut s, 10 + t, Op::SubmitJob { id, member: names[*m].into(), spec: spec(1, false, *prio) });
        }
        let usage: BTreeMap<String, f64> =
            names.iter().map(|m| m.to_string()).zip(usage.iter().copied()).collect();
        let p = plan(&s, 100, &usage);
        prop_assert!(p.placements.is_empty());
        prop_assert_eq!(p.order.len(), jobs.len());
        let f = factors(&entitlements(&s), &usage);
        for w in p.order.windows(2) {
            let (a, b) = (&s.jobs[&w[0]], &s.jobs[&w[1]]);
            let (fa, fb) = (f[&a.member], f[&b.member]);
            prop_assert!(fa >= fb, "factor {} before {}", fa, fb);
            if fa == fb {
                prop_assert!(a.spec.priority >= b.spec.priority);
                if a.spec.priority == b.spec.priority {
                    prop_assert!((a.submitted_at_ms, a.id) <= (b.submitted_at_ms, b.id));
                }
            }
        }
    }

    /// One member fills the cluster with preemptible jobs; others arrive. Run
    /// passes with no other change until nothing moves: preemption stops,
    /// never overshoots (the beneficiary ends no further above its entitlement
    /// than the victim's member), and never moves GPUs straight back.
    #[test]
    fn preemption_converges_and_never_goes_back(
        nodes in 1u32..4,
        shares in proptest::collection::vec(1u64..4, 3),
        filler in proptest::collection::vec(1u32..=2, 1..12),
        waiting in proptest::collection::vec((1usize..3, 1u32..=4), 1..8),
    ) {
        let names = ["a", "b", "c"];
        let members: Vec<(&str, u64)> = names.iter().copied().zip(shares.iter().copied()).collect();
        let mut s = cluster(nodes, 4, &members);
        let mut agent = Agent { seq: BTreeMap::new() };
        let mut n = 0u128;
        let mut at = 1000;
        for g in &filler {
            n += 1;
            apply(&mut s, at, Op::SubmitJob { id: Uuid::from_u128(n), member: "a".into(), spec: spec(*g, true, 0) });
        }
        agent.pass(&mut s, at);
        for (m, g) in &waiting {
            n += 1;
            apply(&mut s, at, Op::SubmitJob { id: Uuid::from_u128(n), member: names[*m].into(), spec: spec(*g, true, 0) });
        }
        let mut last: Vec<(String, String)> = Vec::new();
        let mut quiet = false;
        for _round in 0..40 {
            at += 61_000; // past every minimum run time
            let p = plan(&s, at, &usage(&s, at));
            if p.preemptions.is_empty() {
                quiet = true;
                break;
            }
            let ent = entitlements(&s);
            let total = (nodes * 4) as f64;
            let mut alloc: BTreeMap<String, f64> = BTreeMap::new();
            for id in &s.running {
                *alloc.entry(s.jobs[id].member.clone()).or_default() += s.jobs[id].spec.gpus as f64;
            }
            let mut pairs = Vec::new();
            for pr in &p.preemptions {
                let (v, b) = (s.jobs[&pr.job].member.clone(), s.jobs[&pr.for_job].member.clone());
                prop_assert!(v != b);
                prop_assert!(
                    !last.contains(&(b.clone(), v.clone())),
                    "GPUs moved from {} to {} and straight back", b, v
                );
                // Below before, above before.
                prop_assert!(alloc.get(&b).copied().unwrap_or(0.0) < ent[&b] * total);
                prop_assert!(alloc.get(&v).copied().unwrap_or(0.0) > ent[&v] * total);
                pairs.push((v, b));
            }
            // The victims' members keep at least their entitlements.
            let mut after = alloc.clone();
            for pr in &p.preemptions {
                *after.get_mut(&s.jobs[&pr.job].member).unwrap() -= s.jobs[&pr.job].spec.gpus as f64;
            }
            for (v, _) in &pairs {
                prop_assert!(after[v] >= ent[v] * total - 1e-9, "{} left below its entitlement", v);
            }
            for pr in &p.preemptions {
                apply(&mut s, at, Op::Preempt { job: pr.job, for_job: pr.for_job });
            }
            // The victims checkpoint and exit; the next pass places what fits.
            for pr in &p.preemptions {
                let attempt = s.jobs[&pr.job].attempts;
                agent.report(&mut s, at + 1, pr.job, RunReport::Exited {
                    job: pr.job, attempt, at_ms: at + 1, exit_code: 143, reason: String::new(), energy_mj: 0,
                });
                prop_assert_eq!(s.jobs[&pr.job].state, JobState::Pending);
            }
            agent.pass(&mut s, at + 2);
            last = pairs;
        }
        prop_assert!(quiet, "preemption did not settle");
    }
}

#[test]
fn a_member_with_no_usage_goes_first_and_the_heavy_user_last() {
    let mut s = cluster(1, 1, &[("light", 1), ("heavy", 1)]);
    let busy = Uuid::from_u128(100);
    apply(
        &mut s,
        1,
        Op::SubmitJob {
            id: busy,
            member: "pool".into(),
            spec: spec(1, false, 0),
        },
    );
    Agent {
        seq: BTreeMap::new(),
    }
    .pass(&mut s, 1);
    let (h, l) = (Uuid::from_u128(1), Uuid::from_u128(2));
    apply(
        &mut s,
        5,
        Op::SubmitJob {
            id: h,
            member: "heavy".into(),
            spec: spec(1, false, 0),
        },
    );
    apply(
        &mut s,
        6,
        Op::SubmitJob {
            id: l,
            member: "light".into(),
            spec: spec(1, false, 0),
        },
    );
    let usage = BTreeMap::from([("heavy".to_string(), 10.0), ("light".to_string(), 0.0)]);
    let p = plan(&s, 10, &usage);
    assert_eq!(
        p.order,
        vec![l, h],
        "the later job of the light user goes first"
    );
}

/// The preempted runs exit one at a time; the pass between the two exits must
/// hold the freed GPU for the job they are freed for, not give it back.
#[test]
fn gpus_freed_by_preemption_go_to_the_job_they_were_freed_for() {
    let mut s = cluster(1, 4, &[("flood", 1), ("late", 1)]);
    apply(
        &mut s,
        0,
        Op::SetPolicy {
            settings: vec![Setting::MinRuntimeS(0)],
            by: "t".into(),
            reason: "t".into(),
        },
    );
    let mut agent = Agent {
        seq: BTreeMap::new(),
    };
    for i in 0..6 {
        let id = Uuid::from_u128(i + 1);
        let sp = spec(1, true, 0);
        apply(
            &mut s,
            10,
            Op::SubmitJob {
                id,
                member: "flood".into(),
                spec: sp,
            },
        );
    }
    agent.pass(&mut s, 10);
    let late = Uuid::from_u128(100);
    let sp = spec(2, false, 0);
    apply(
        &mut s,
        20,
        Op::SubmitJob {
            id: late,
            member: "late".into(),
            spec: sp,
        },
    );
    let p = agent.pass(&mut s, 30);
    assert_eq!(p.preemptions.len(), 2);
    for pr in &p.preemptions {
        apply(
            &mut s,
            30,
            Op::Preempt {
                job: pr.job,
                for_job: pr.for_job,
            },
        );
    }
    for (k, pr) in p.preemptions.iter().enumerate() {
        let attempt = s.jobs[&pr.job].attempts;
        let at = 31 + k as i64 * 10;
        let exited = RunReport::Exited {
            job: pr.job,
            attempt,
            at_ms: at,
            exit_code: 143,
            reason: String::new(),
            energy_mj: 0,
        };
        agent.report(&mut s, at, pr.job, exited);
        agent.pass(&mut s, at + 1);
    }
    assert_eq!(s.jobs[&late].state, JobState::Running);
    for pr in &p.preemptions {
        assert_eq!(s.jobs[&pr.job].state, JobState::Pending);
        assert_eq!(s.jobs[&pr.job].preemptions, 1);
    }
}

/// EASY backfill: the head-of-line job that does not fit reserves the node;
/// a small job may use the idle GPUs only if it ends before the reserved
/// start (by its time limit), never if it would delay it.
#[test]
fn backfill_uses_idle_gpus_only_when_it_does_not_delay_the_reserved_job() {
    let mut s = cluster(1, 4, &[("a", 1)]);
    let mut agent = Agent {
        seq: BTreeMap::new(),
    };
    let limited = |gpus: u32, minutes: u64| JobSpec {
        time_limit_ms: minutes * 60_000,
        ..spec(gpus, false, 0)
    };
    let running = Uuid::from_u128(1);
    apply(
        &mut s,
        0,
        Op::SubmitJob {
            id: running,
            member: "a".into(),
            spec: limited(2, 10),
        },
    );
    agent.pass(&mut s, 0);
    assert_eq!(s.jobs[&running].state, JobState::Running);
    // The head job needs the whole node: it waits for the 10-minute run.
    let head = Uuid::from_u128(2);
    apply(
        &mut s,
        1,
        Op::SubmitJob {
            id: head,
            member: "a".into(),
            spec: limited(4, 60),
        },
    );
    // Behind it: one that would end after the reserved start, one before it.
    let long = Uuid::from_u128(3);
    apply(
        &mut s,
        2,
        Op::SubmitJob {
            id: long,
            member: "a".into(),
            spec: limited(1, 60),
        },
    );
    let short = Uuid::from_u128(4);
    apply(
        &mut s,
        3,
        Op::SubmitJob {
            id: short,
            member: "a".into(),
            spec: limited(1, 5),
        },
    );
    let p = agent.pass(&mut s, 1000);
    let placed: Vec<JobId> = p.placements.iter().map(|p| p.job).collect();
    assert_eq!(
        placed,
        vec![short],
        "only the job that ends in time backfills"
    );
    match p.wait_of(&s.jobs[&head], Some(0)) {
        Some(coop_core::placement::Wait::Reserved { at_ms, .. }) => {
            assert_eq!(
                at_ms,
                Some(10 * 60_000),
                "reserved for when the running job's limit ends"
            )
        }
        other => panic!("head job: {other:?}"),
    }
    assert!(matches!(
        p.waiting.get(&long),
        Some(coop_core::placement::Wait::BehindReservation { job }) if *job == head
    ));

    // Without time limits nothing is known about when GPUs free up: the
    // reserved node is held, and nothing backfills onto it.
    let mut s = cluster(1, 4, &[("a", 1)]);
    let mut agent = Agent {
        seq: BTreeMap::new(),
    };
    apply(
        &mut s,
        0,
        Op::SubmitJob {
            id: running,
            member: "a".into(),
            spec: spec(2, false, 0),
        },
    );
    agent.pass(&mut s, 0);
    apply(
        &mut s,
        1,
        Op::SubmitJob {
            id: head,
            member: "a".into(),
            spec: spec(4, false, 0),
        },
    );
    apply(
        &mut s,
        3,
        Op::SubmitJob {
            id: short,
            member: "a".into(),
            spec: limited(1, 5),
        },
    );
    let p = agent.pass(&mut s, 1000);
    assert!(p.placements.is_empty(), "{:?}", p.placements);
}
