//! A fixed history and the audit chain it must produce, hash for hash.
//!
//! Every ledger hash covers the JSON of its entry, so renaming a field of an
//! entry (or of anything an entry holds), reordering one, or changing how a
//! number is written changes every hash after it: an auditor's saved heads
//! and exports would no longer verify. This test fails on any such change;
//! one made on purpose needs a new format version and a migration, not a new
//! constant here.

use coop_core::policy::Setting;
use coop_core::state::*;
use uuid::Uuid;

fn a100s(node: &str, n: u32) -> Vec<GpuInfo> {
    (0..n)
        .map(|i| GpuInfo {
            uuid: format!("GPU-{node}-{i}"),
            index: i,
            model: "A100-80GB".into(),
            memory_mb: 80 * 1024,
            measured: None,
            power_limit_w: 400,
        })
        .collect()
}

fn history() -> Vec<Command> {
    let job = Uuid::from_u128(0x0c00_9000_0000_4000_8000_0000_0000_0001);
    let report = |seq, report| Op::Report {
        node: "n1".into(),
        session: "s1".into(),
        seq,
        report,
    };
    let ops = vec![
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: Some(("default".into(), "h-default".into())),
        },
        Op::AddMember {
            name: "acme".into(),
            token_hash: "h-acme".into(),
            expires_at_ms: None,
        },
        Op::EnrollNode {
            node: "n1".into(),
            owner: "default".into(),
            join_hash: "h-join".into(),
            expires_at_ms: 1_796_003_600_000,
        },
        Op::SetPolicy {
            settings: vec![
                Setting::Share {
                    member: "acme".into(),
                    shares: 3,
                },
                Setting::HalfLifeS(7 * 86_400),
            ],
            by: "operator".into(),
            reason: "general assembly".into(),
        },
        Op::RegisterNode {
            node: "n1".into(),
            owner: "default".into(),
            gpus: a100s("n1", 2),
            session: "s1".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
        Op::SubmitJob {
            id: job,
            member: "acme".into(),
            spec: JobSpec {
                kind: JobKind::Finetune,
                gpus: 2,
                command: vec!["python".into(), "train.py".into()],
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
            },
        },
        Op::Place {
            job,
            node: "n1".into(),
            gpus: vec!["GPU-n1-0".into(), "GPU-n1-1".into()],
        },
        report(
            1,
            RunReport::Started {
                job,
                attempt: 1,
                at_ms: 1_796_000_185_000,
            },
        ),
        report(
            2,
            RunReport::Usage {
                job,
                attempt: 1,
                to_ms: 1_796_000_215_000,
                energy_mj: 18_000_000,
            },
        ),
        report(
            3,
            RunReport::Exited {
                job,
                attempt: 1,
                at_ms: 1_796_000_265_000,
                exit_code: 0,
                reason: String::new(),
                energy_mj: 12_000_000,
            },
        ),
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Command {
            // Each command a little after the time it reports.
            at_ms: 1_796_000_000_000 + 30_000 * i as i64,
            op,
        })
        .collect()
}

#[test]
fn a_fixed_history_makes_the_same_audit_chain() {
    let mut s = State::default();
    for c in history() {
        s.apply(&c).unwrap_or_else(|e| panic!("{:?}: {e}", c.op));
    }
    // Each entry as "SEQ KIND HASH-PREFIX".
    let chain: Vec<String> = s
        .outbox
        .records
        .iter()
        .map(|r| {
            let entry = serde_json::to_value(&r.entry).unwrap();
            format!(
                "{} {} {}",
                r.seq,
                entry["kind"].as_str().unwrap_or("?"),
                &r.hash[..16]
            )
        })
        .collect();
    let last = s.outbox.records.last().expect("entries");
    assert_eq!(chain, GOLDEN_CHAIN, "the audit chain changed: {chain:#?}");
    assert_eq!(last.hash, GOLDEN_HEAD);
    assert_eq!(
        (s.chain.seq, s.chain.hash.as_str()),
        (6, GOLDEN_HEAD),
        "the state's head"
    );
    // The run's GPU time and energy, as billed.
    let usage: Vec<(u64, u64)> = s.outbox.usage().map(|r| (r.gpu_ms, r.energy_mj)).collect();
    assert_eq!(usage, GOLDEN_USAGE);
}

/// The chain as the entry encoding of 2026-11-30 makes it (see the module
/// comment before changing any of it).
const GOLDEN_CHAIN: &[&str] = &[
    "1 member_added 924f76595b596178",
    "2 member_added 9a461dcbaa25edb3",
    "3 account_changed 415556ecbc534723",
    "4 policy_changed 34c987725cb4fe77",
    "5 usage 5e74c13f97e6705e",
    "6 usage 5ccdff6369d48285",
];
const GOLDEN_HEAD: &str = "5ccdff6369d48285092e5291f5319f74c2e14b38e740442cc1db627200e7a059";
/// Two GPUs for 30 s (start to the usage report) and 50 s more (to the
/// exit), with the energy each report gave.
const GOLDEN_USAGE: &[(u64, u64)] = &[(2 * 30_000, 18_000_000), (2 * 50_000, 12_000_000)];
