use super::*;
use crate::state::*;

#[test]
fn arrays_parse_as_slurm_writes_them_and_are_bounded_before_expanding() {
    assert_eq!(parse_array("0-3").unwrap(), (vec![0, 1, 2, 3], 0));
    assert_eq!(parse_array("1,3,5").unwrap(), (vec![1, 3, 5], 0));
    assert_eq!(parse_array("0-9%2").unwrap().1, 2);
    assert_eq!(parse_array("0-20:10").unwrap().0, vec![0, 10, 20]);
    assert_eq!(parse_array("3,1-2,3").unwrap().0, vec![1, 2, 3]);
    assert_eq!(parse_array("0-9999").unwrap().0.len(), 10_000);
    for bad in [
        "",
        "0-10000",
        "0-999999999",
        "5-1",
        "a",
        "1,,2",
        "0-9%0",
        "0-9%x",
        "-1",
        "0-4:0",
        "0-1000000,1-100000",
    ] {
        let e = parse_array(bad).unwrap_err();
        assert!(e.to_string().starts_with("array: "), "{bad:?}: {e}");
    }
}

#[test]
fn workdirs_stay_inside_the_run_directory() {
    assert!(validate_workdir("src/train").is_ok());
    assert!(validate_workdir("./a/b").is_ok());
    for bad in ["", "/etc", "..", "a/../..", "a/..", "x\ny"] {
        let e = validate_workdir(bad).unwrap_err();
        assert!(e.to_string().starts_with("workdir: "), "{bad:?}: {e}");
    }
}

#[test]
fn names_are_bounded_printable_text() {
    let x = |name: &str| JobExtra {
        name: name.into(),
        ..Default::default()
    };
    assert!(validate_extra(&x("train-llama 7b")).is_ok());
    for bad in ["a\u{1b}[2J", "x\n", &"n".repeat(MAX_NAME + 1), " pad"] {
        let e = validate_extra(&x(bad)).unwrap_err();
        assert!(e.to_string().starts_with("name: "), "{bad:?}: {e}");
    }
}

use crate::state::{Command, GpuInfo, JobKind, Op};

fn cluster() -> State {
    let mut s = State::default();
    let ops = [
        Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: Some(("acme".into(), "h-acme".into())),
        },
        Op::AddMember {
            name: "bravo".into(),
            token_hash: "h-bravo".into(),
            expires_at_ms: None,
        },
        Op::RegisterNode {
            node: "n1".into(),
            owner: "acme".into(),
            gpus: (0..2)
                .map(|i| GpuInfo {
                    uuid: format!("GPU-{i}"),
                    index: i,
                    model: "A100-80GB".into(),
                    memory_mb: 81_920,
                    measured: None,
                    power_limit_w: 0,
                })
                .collect(),
            session: "s".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        },
    ];
    for op in ops {
        s.apply(&Command { at_ms: 1, op }).unwrap();
    }
    s
}

fn spec() -> JobSpec {
    JobSpec {
        kind: JobKind::Finetune,
        gpus: 1,
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

fn submit(
    s: &mut State,
    member: &str,
    extra: JobExtra,
    array: Option<&str>,
) -> Result<JobId, Rejection> {
    // Distinct ids without a random source (the core has none).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = Uuid::from_u128(
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .into(),
    );
    s.apply(&Command {
        at_ms: 10,
        op: Op::SubmitJobWith {
            id,
            member: member.into(),
            spec: Box::new(spec()),
            extra: Box::new(extra),
            array: array.map(String::from),
        },
    })?;
    Ok(id)
}

fn after_ok(ids: &[JobId]) -> JobExtra {
    JobExtra {
        after_ok: ids.to_vec(),
        ..Default::default()
    }
}

#[test]
fn a_failed_dependency_cancels_down_the_chain_and_others_are_refused() {
    let mut s = cluster();
    let a = submit(&mut s, "acme", JobExtra::default(), None).unwrap();
    let b = submit(&mut s, "acme", after_ok(&[a]), None).unwrap();
    let c = submit(&mut s, "acme", after_ok(&[b]), None).unwrap();
    assert_eq!(
        s.blocked(b, &s.array_running()),
        Some(Blocked::Dependency(a))
    );
    // Placing a job whose dependency is unmet is refused at apply.
    let place = Op::Place {
        job: b,
        node: "n1".into(),
        gpus: vec!["GPU-0".into()],
    };
    assert!(
        s.apply(&Command {
            at_ms: 11,
            op: place
        })
        .is_err()
    );
    s.apply(&Command {
        at_ms: 12,
        op: Op::CancelJob { id: a },
    })
    .unwrap();
    assert_eq!(s.jobs[&b].state, JobState::Cancelled);
    assert_eq!(s.jobs[&b].reason, format!("dependency {a} was cancelled"));
    assert_eq!(s.jobs[&c].reason, format!("dependency {b} was cancelled"));
    assert!(s.queue.is_empty());
    // Another member's job, a missing one, one that can never succeed.
    let before = s.clone();
    for (member, dep) in [
        ("bravo", a),
        ("acme", Uuid::from_u128(u128::MAX)),
        ("acme", a),
    ] {
        let e = submit(&mut s, member, after_ok(&[dep]), None).unwrap_err();
        assert!(e.to_string().starts_with("dependency: "), "{e}");
    }
    assert_eq!(s, before, "refused submissions change nothing");
    assert!(s.jobs.values().any(|j| !j.extra.after_ok.is_empty()));
    reads_back(&s);
}

#[test]
fn holds_arrays_and_drains_gate_placement() {
    let mut s = cluster();
    let held = submit(
        &mut s,
        "acme",
        JobExtra {
            hold: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let place = |job: JobId, gpu: &str| Op::Place {
        job,
        node: "n1".into(),
        gpus: vec![gpu.into()],
    };
    assert!(
        s.apply(&Command {
            at_ms: 11,
            op: place(held, "GPU-0")
        })
        .is_err()
    );
    s.apply(&Command {
        at_ms: 12,
        op: Op::HoldJobs {
            ids: vec![held],
            held: false,
        },
    })
    .unwrap();
    // Drained: nothing is placed; resumed: it is.
    s.apply(&Command {
        at_ms: 13,
        op: Op::CordonNode {
            node: "n1".into(),
            reason: "maintenance".into(),
            by: "the operator".into(),
            requeue: false,
        },
    })
    .unwrap();
    assert!(s.nodes["n1"].cordon.is_some());
    reads_back(&s);
    assert!(
        s.apply(&Command {
            at_ms: 14,
            op: place(held, "GPU-0")
        })
        .is_err()
    );
    s.apply(&Command {
        at_ms: 15,
        op: Op::ResumeNode { node: "n1".into() },
    })
    .unwrap();
    s.apply(&Command {
        at_ms: 16,
        op: place(held, "GPU-0"),
    })
    .unwrap();
    // Only pending jobs are held.
    let hold = Op::HoldJobs {
        ids: vec![held],
        held: true,
    };
    assert!(
        s.apply(&Command {
            at_ms: 17,
            op: hold
        })
        .is_err()
    );
    // An array of 3 with %1: one task at a time, derived ids.
    let before = s.jobs.len();
    let array = submit(&mut s, "acme", JobExtra::default(), Some("0-2%1")).unwrap();
    assert_eq!(s.jobs.len(), before + 3);
    let t0 = task_id(array, 0);
    s.apply(&Command {
        at_ms: 18,
        op: place(t0, "GPU-1"),
    })
    .unwrap();
    assert_eq!(
        s.blocked(task_id(array, 1), &s.array_running()),
        Some(Blocked::ArrayLimit(1))
    );
    // Over max_pending: all or nothing.
    s.policy.max_pending_jobs = 3;
    let before = s.clone();
    let e = submit(&mut s, "acme", JobExtra::default(), Some("0-1")).unwrap_err();
    assert!(e.to_string().contains("max_pending"), "{e}");
    assert_eq!(s, before);
    reads_back(&s);
}

/// The state reads back from a snapshot exactly (the habits' fields included).
fn reads_back(s: &State) {
    let back: State = crate::codec::decode(&crate::codec::encode(s)).unwrap();
    // The outbox is history on its way to the store, not replicated state.
    let mut want = s.clone();
    want.take_outbox();
    assert_eq!(back, want);
}

#[test]
fn task_ids_are_derived_and_distinct() {
    let a = Uuid::from_u128(0x5eed);
    assert_eq!(task_id(a, 3), task_id(a, 3));
    assert_ne!(task_id(a, 3), task_id(a, 4));
    assert_ne!(task_id(a, 3), a);
}
