//! Cost of one scheduling pass (`placement::plan`, what the leader runs) on a
//! large cluster: 10,000 GPUs (1,250 nodes of 8, two models), 20 members,
//! and 1,000 to 100,000 pending jobs of 1, 2, 4 and 8 GPUs.
//!
//! Two shapes: "half busy" (half the GPUs run jobs; the pass places what fits
//! and explains the rest) and "empty" (every GPU free: the pass places as much
//! as it can, which gives placements per second).
//!
//! cargo run --release -p coop-scheduler --example pass_bench [-- ORDERING]

use std::time::Instant;

use coop_core::placement::plan;
use coop_core::policy::{Ordering, Setting};
use coop_core::state::*;
use uuid::Uuid;

const NODES: u32 = 1250;
const PER_NODE: u32 = 8;
const MEMBERS: usize = 20;

fn apply(s: &mut State, op: Op) {
    s.apply(&Command { at_ms: 1, op }).expect("setup applies");
}

fn cluster(ordering: Ordering) -> State {
    let mut s = State::default();
    apply(
        &mut s,
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        },
    );
    for m in 0..MEMBERS {
        apply(
            &mut s,
            Op::AddMember {
                name: format!("m{m:02}"),
                token_hash: format!("h{m}"),
                expires_at_ms: None,
            },
        );
    }
    apply(
        &mut s,
        Op::SetPolicy {
            settings: vec![Setting::Ordering(ordering)],
            by: "bench".into(),
            reason: "bench".into(),
        },
    );
    for n in 0..NODES {
        let name = format!("n{n:05}");
        let model = if n % 4 == 0 { "H100-80GB" } else { "A100-80GB" };
        let gpus = (0..PER_NODE)
            .map(|i| GpuInfo {
                uuid: format!("GPU-{name}-{i}"),
                index: i,
                model: model.into(),
                memory_mb: 80 * 1024,
                measured: None,
                power_limit_w: 0,
            })
            .collect();
        apply(
            &mut s,
            Op::RegisterNode {
                node: name,
                owner: format!("m{:02}", n as usize % MEMBERS),
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

fn spec(gpus: u32, model: Option<&str>) -> JobSpec {
    // One-hour limits: backfill has something to work with.
    JobSpec {
        kind: JobKind::Finetune,
        gpus,
        command: vec!["train".into()],
        gpu_model: model.map(str::to_string),
        min_gpu_memory_mb: 0,
        preemptible: true,
        kill_grace_ms: 30_000,
        priority: 0,
        time_limit_ms: 3_600_000,
        isolation: Default::default(),
        env: Default::default(),
        nodes: 0,
        gpus_per_node: 0,
    }
}

/// Fills about half the GPUs with running jobs (placed and started).
fn half_busy(s: &mut State) {
    let mut id = 1_000_000u128;
    for n in 0..NODES {
        if n % 2 == 1 {
            continue;
        }
        let node = format!("n{n:05}");
        for part in 0..2 {
            id += 1;
            let job = Uuid::from_u128(id);
            let member = format!("m{:02}", id as usize % MEMBERS);
            apply(
                s,
                Op::SubmitJob {
                    id: job,
                    member,
                    spec: spec(4, None),
                },
            );
            let gpus = (0..4)
                .map(|i| format!("GPU-{node}-{}", part * 4 + i))
                .collect();
            apply(
                s,
                Op::Place {
                    job,
                    node: node.clone(),
                    gpus,
                },
            );
            apply(
                s,
                Op::Report {
                    node: node.clone(),
                    session: "s".into(),
                    seq: part as u64 + 1,
                    report: RunReport::Started {
                        job,
                        attempt: 1,
                        at_ms: 1,
                    },
                },
            );
        }
    }
}

fn add_pending(s: &mut State, n: usize) {
    for i in 0..n {
        let gpus = [1, 1, 2, 4, 8][i % 5];
        let model = (i % 7 == 0).then_some("H100-80GB");
        apply(
            s,
            Op::SubmitJob {
                id: Uuid::from_u128(i as u128 + 1),
                member: format!("m{:02}", (i * 7) % MEMBERS),
                spec: spec(gpus, model),
            },
        );
    }
}

fn time_pass(s: &State, runs: usize) -> (f64, usize, usize) {
    // Twenty minutes after the running jobs started: past the minimum run
    // time, so the pass also looks for preemptions.
    let now = 1_200_000;
    let usage = coop_core::fairshare::usage(s, now);
    let mut times = Vec::new();
    let mut placed = 0;
    let mut preempted = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let p = plan(s, now, &usage);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        placed = p.placements.len();
        preempted = p.preemptions.len();
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], placed, preempted)
}

fn main() {
    let ordering = std::env::args()
        .nth(1)
        .and_then(|o| Ordering::parse(&o))
        .unwrap_or(Ordering::Fairshare);
    println!(
        "ordering {}; {} GPUs on {NODES} nodes; {MEMBERS} members; median of 5 passes",
        ordering.as_str(),
        NODES * PER_NODE
    );
    println!(
        "{:<10} {:>9} {:>10} {:>10} {:>12} {:>16}",
        "cluster", "pending", "pass (ms)", "placed", "preempted", "placements/s"
    );
    for busy in [true, false] {
        for n in [1_000, 10_000, 100_000] {
            let mut s = cluster(ordering);
            if busy {
                half_busy(&mut s);
            }
            add_pending(&mut s, n);
            let (ms, placed, preempted) = time_pass(&s, 5);
            println!(
                "{:<10} {:>9} {:>10.2} {:>10} {:>12} {:>16.0}",
                if busy { "half busy" } else { "empty" },
                n,
                ms,
                placed,
                preempted,
                placed as f64 / (ms / 1000.0)
            );
        }
    }
}
