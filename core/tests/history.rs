//! What the state keeps of its history: the audit chain's head, per-member
//! decayed usage and finished jobs for a retention period. The rest leaves
//! through the outbox for the replica's store; these tests check that what
//! stays in memory is enough, and that nothing is lost on the way out.

use coop_core::fairshare::{recomputed, usage};
use coop_core::ledger;
use coop_core::policy::Setting;
use coop_core::state::*;
use uuid::Uuid;

const T0: i64 = 1_796_000_000_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

struct Coop {
    s: State,
    now: i64,
    seq: u64,
}

impl Coop {
    fn new() -> Self {
        let mut c = Coop {
            s: State::default(),
            now: T0,
            seq: 0,
        };
        c.ok(Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        });
        for m in ["a", "b"] {
            c.ok(Op::AddMember {
                name: m.into(),
                token_hash: format!("h-{m}"),
                expires_at_ms: None,
            });
        }
        c.ok(Op::EnrollNode {
            node: "n1".into(),
            owner: "a".into(),
            join_hash: "h-join".into(),
            expires_at_ms: T0 + 3_600_000,
        });
        let gpus = (0..4)
            .map(|i| GpuInfo {
                uuid: format!("GPU-{i}"),
                index: i,
                model: "A100-80GB".into(),
                memory_mb: 80 * 1024,
                measured: None,
                power_limit_w: 400,
            })
            .collect();
        c.ok(Op::RegisterNode {
            node: "n1".into(),
            owner: "a".into(),
            gpus,
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        });
        c
    }

    fn at(&mut self, at: i64, op: Op) -> Result<Vec<Event>, Rejection> {
        self.now = self.now.max(at);
        self.s.apply(&Command { at_ms: at, op })
    }

    fn ok(&mut self, op: Op) {
        let at = self.now;
        self.at(at, op).unwrap();
    }

    fn report(&mut self, at: i64, report: RunReport) {
        self.seq += 1;
        let op = Op::Report {
            node: "n1".into(),
            session: "s1".into(),
            seq: self.seq,
            report,
        };
        self.at(at, op).unwrap();
    }

    /// Runs a job of `member` on `gpus` GPUs from `start` for `ms`, with a
    /// usage report every hour, and returns its id.
    fn run(&mut self, n: u128, member: &str, gpus: u32, start: i64, ms: i64) -> JobId {
        let job = Uuid::from_u128(n);
        let spec = JobSpec {
            kind: JobKind::Finetune,
            gpus,
            command: vec!["train".into()],
            gpu_model: None,
            min_gpu_memory_mb: 0,
            preemptible: false,
            kill_grace_ms: 10_000,
            priority: 0,
            time_limit_ms: 0,
            isolation: Default::default(),
            env: Default::default(),
            nodes: 0,
            gpus_per_node: 0,
        };
        self.at(
            start,
            Op::SubmitJob {
                id: job,
                member: member.into(),
                spec,
            },
        )
        .unwrap();
        let free: Vec<String> = self.s.nodes["n1"]
            .gpus
            .iter()
            .filter(|g| g.job.is_none())
            .take(gpus as usize)
            .map(|g| g.uuid.clone())
            .collect();
        self.at(
            start,
            Op::Place {
                job,
                node: "n1".into(),
                gpus: free,
            },
        )
        .unwrap();
        let attempt = self.s.jobs[&job].attempts;
        self.report(
            start,
            RunReport::Started {
                job,
                attempt,
                at_ms: start,
            },
        );
        let mut t = start;
        while t + HOUR < start + ms {
            t += HOUR;
            self.report(
                t,
                RunReport::Usage {
                    job,
                    attempt,
                    to_ms: t,
                    energy_mj: 1_000,
                },
            );
        }
        self.report(
            start + ms,
            RunReport::Exited {
                job,
                attempt,
                at_ms: start + ms,
                exit_code: 0,
                reason: String::new(),
                energy_mj: 500,
            },
        );
        job
    }

    /// A command that changes nothing but moves time on.
    fn tick(&mut self, at: i64) {
        let name = format!("t{}", self.seq);
        self.seq += 1;
        self.at(
            at,
            Op::AddAuditor {
                name,
                token_hash: format!("h-{}", self.seq),
            },
        )
        .unwrap();
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-9)
}

#[test]
fn decayed_usage_from_the_totals_equals_a_recount_of_every_record() {
    let mut c = Coop::new();
    c.run(1, "a", 2, T0 + HOUR, 5 * HOUR + 1_234);
    c.run(2, "b", 1, T0 + 2 * HOUR, 3 * DAY);
    c.run(3, "a", 4, T0 + 4 * DAY, 90_000);
    c.run(4, "a", 1, T0 + 4 * DAY + HOUR, 2 * HOUR);
    let records: Vec<UsageRecord> = c.s.outbox.usage().cloned().collect();
    assert!(records.len() > 70, "{} records", records.len());
    for now in [T0 + 4 * DAY + 3 * HOUR, T0 + 10 * DAY, T0 + 400 * DAY] {
        let from_totals = usage(&c.s, now);
        let recount = recomputed(&c.s, &records, now);
        assert_eq!(from_totals.keys().collect::<Vec<_>>(), ["a", "b"]);
        for (m, v) in &from_totals {
            assert!(*v > 0.0, "{m} used something");
            assert!(close(*v, recount[m]), "{m} at {now}: {v} != {}", recount[m]);
        }
    }
    // Totals that took the records in another order agree too.
    let mut other = c.s.clone();
    other.decayed.clear();
    for r in records.iter().rev() {
        other
            .decayed
            .entry(r.member.clone())
            .or_default()
            .add(r, other.policy.half_life_s);
    }
    let now = T0 + 30 * DAY;
    for (m, v) in usage(&other, now) {
        assert!(close(v, usage(&c.s, now)[&m]), "{m}");
    }
}

#[test]
fn a_new_half_life_decays_past_usage_from_when_it_is_adopted() {
    let mut c = Coop::new();
    c.run(1, "a", 2, T0 + HOUR, 10 * HOUR);
    let change = T0 + 3 * DAY;
    let before = usage(&c.s, change)["a"];
    c.at(
        change,
        Op::SetPolicy {
            settings: vec![Setting::HalfLifeS(3600)],
            by: "operator".into(),
            reason: "test".into(),
        },
    )
    .unwrap();
    assert!(
        close(usage(&c.s, change)["a"], before),
        "no jump at the change"
    );
    // One hour later it has halved: the new half-life applies from here.
    assert!(close(usage(&c.s, change + HOUR)["a"], before / 2.0));
}

#[test]
fn finished_jobs_leave_memory_after_the_retention_and_go_to_the_outbox() {
    let mut c = Coop::new();
    c.at(
        c.now,
        Op::SetPolicy {
            settings: vec![Setting::JobRetentionS(2 * 86_400)],
            by: "operator".into(),
            reason: "test".into(),
        },
    )
    .unwrap();
    let done = c.run(1, "a", 1, T0 + HOUR, 2 * HOUR);
    let ended = T0 + 3 * HOUR;
    let pending = Uuid::from_u128(9);
    let spec = c.s.jobs[&done].spec.clone();
    let big = JobSpec { gpus: 4, ..spec };
    c.at(
        ended,
        Op::SubmitJob {
            id: pending,
            member: "b".into(),
            spec: big,
        },
    )
    .unwrap();
    c.s.take_outbox();

    c.tick(ended + 2 * DAY - 1);
    assert!(
        c.s.jobs.contains_key(&done),
        "kept until its retention passes"
    );
    assert!(c.s.take_outbox().retired.is_empty());

    // A refused command changes nothing, retirement included.
    let before = c.s.clone();
    let refused = c.at(ended + 2 * DAY, Op::CancelJob { id: Uuid::nil() });
    assert!(refused.is_err());
    assert_eq!(c.s, before);

    c.tick(ended + 2 * DAY);
    assert!(!c.s.jobs.contains_key(&done), "gone from memory");
    assert!(c.s.jobs.contains_key(&pending), "a pending job stays");
    let out = c.s.take_outbox();
    assert_eq!(out.retired.len(), 1);
    let job = &out.retired[0];
    assert_eq!((job.id, job.state), (done, JobState::Completed));
    assert_eq!(job.gpu_ms, 2 * HOUR as u64, "final, with its billed time");
    assert!(c.s.finished.is_empty());
    assert_eq!(c.s.check(), Ok(()));
}

#[test]
fn the_outbox_continues_the_chain_from_the_head() {
    let mut c = Coop::new();
    let first = c.s.take_outbox().records;
    assert_eq!(ledger::verify(&first), Ok(()));
    assert_eq!(first.last().map(|r| r.seq), Some(c.s.chain.seq));
    c.run(1, "b", 1, T0 + HOUR, 3 * HOUR);
    let second = c.s.take_outbox().records;
    assert_eq!(second[0].prev_hash, first.last().unwrap().hash);
    let whole: Vec<_> = first.into_iter().chain(second).collect();
    assert_eq!(ledger::verify(&whole), Ok(()));
    assert_eq!(whole.last().unwrap().hash, c.s.chain.hash);
    // The head is replicated state: it reads back from a snapshot.
    let back: State = coop_core::codec::decode(&coop_core::codec::encode(&c.s)).unwrap();
    assert_eq!(back, c.s);
}

#[test]
fn decayed_totals_read_back_from_a_snapshot_to_the_last_bit() {
    // A float that reads back one unit off would make a restored replica
    // order its queue differently from the others.
    let mut s = State::default();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..5_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let value = (x >> 11) as f64 / (1u64 << 53) as f64 * 10f64.powi((i % 30) - 15);
        s.decayed.insert(
            format!("m{i}"),
            coop_core::fairshare::Decayed {
                at_ms: i as i64,
                value,
            },
        );
    }
    let back: State = coop_core::codec::decode(&coop_core::codec::encode(&s)).unwrap();
    for (m, d) in &s.decayed {
        assert_eq!(back.decayed[m].value.to_bits(), d.value.to_bits(), "{m}");
    }
}

#[test]
fn a_burst_of_retirements_is_spread_over_the_next_commands() {
    let mut c = Coop::new();
    let n = MAX_RETIRED_PER_COMMAND + 5;
    let spec = JobSpec {
        kind: JobKind::Finetune,
        gpus: 1,
        command: vec!["x".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible: false,
        kill_grace_ms: 1_000,
        priority: 0,
        time_limit_ms: 0,
        isolation: Default::default(),
        env: Default::default(),
        nodes: 0,
        gpus_per_node: 0,
    };
    c.ok(Op::SetPolicy {
        settings: vec![Setting::MaxPendingJobs(0)],
        by: "operator".into(),
        reason: "test".into(),
    });
    for i in 0..n {
        let id = Uuid::from_u128(1000 + i as u128);
        let member = "a".to_string();
        c.at(
            T0,
            Op::SubmitJob {
                id,
                member,
                spec: spec.clone(),
            },
        )
        .unwrap();
        c.at(T0, Op::CancelJob { id }).unwrap();
    }
    c.s.take_outbox();
    // Long after: one command retires the most it may, the next the rest.
    c.tick(T0 + 30 * DAY);
    assert_eq!(c.s.take_outbox().retired.len(), MAX_RETIRED_PER_COMMAND);
    c.tick(T0 + 30 * DAY);
    assert_eq!(c.s.take_outbox().retired.len(), 5);
    assert!(c.s.jobs.is_empty() && c.s.finished.is_empty());
}

#[test]
fn a_dependency_that_left_memory_has_been_met() {
    let mut c = Coop::new();
    let done = c.run(1, "a", 1, T0 + HOUR, HOUR);
    let waiting = Uuid::from_u128(2);
    let spec = c.s.jobs[&done].spec.clone();
    let extra = coop_core::habits::JobExtra {
        after_ok: vec![done],
        hold: true,
        ..Default::default()
    };
    c.at(
        T0 + 3 * HOUR,
        Op::SubmitJobWith {
            id: waiting,
            member: "a".into(),
            spec: Box::new(spec),
            extra: Box::new(extra),
            array: None,
        },
    )
    .unwrap();
    let blocked = |s: &State| s.blocked(waiting, &s.array_running());
    assert_eq!(blocked(&c.s), Some(coop_core::habits::Blocked::Held));
    c.tick(T0 + 30 * DAY);
    assert!(!c.s.jobs.contains_key(&done), "the dependency left memory");
    let j = &c.s.jobs[&waiting];
    assert_eq!(c.s.unmet_dependency(&j.extra), None);
    assert_eq!(blocked(&c.s), Some(coop_core::habits::Blocked::Held));
    c.at(
        T0 + 30 * DAY,
        Op::HoldJobs {
            ids: vec![waiting],
            held: false,
        },
    )
    .unwrap();
    assert_eq!(blocked(&c.s), None, "released, it may run");
}
