//! `coop simulate` on a slice of the Philly trace: the output files, GPU time
//! conserved, determinism, and bad input.

mod common;

use std::process::Command;

use common::BIN;
use serde_json::Value;

const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/philly-vc-trace.csv"
);

fn simulate(policy: &str, out: &std::path::Path) -> Value {
    let o = Command::new(BIN)
        .args([
            "simulate",
            "--trace",
            TRACE,
            "--limit",
            "300",
            "--nodes",
            "4:8xV100-32GB",
        ])
        .args(["--policy", policy, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn each_policy_writes_its_figures_and_bills_every_gpu_second_once() {
    let dir = tempfile::tempdir().unwrap();
    // What the 300 jobs need: GPUs times duration.
    let mut rdr = csv_rows(300);
    let needed: f64 = rdr.iter_mut().map(|(g, d)| *g * *d).sum();
    for policy in ["fifo", "fairshare", "drf"] {
        let out = dir.path().join(policy);
        let s = simulate(policy, &out);
        assert_eq!(s["policy"], policy);
        assert_eq!(s["gpus"], 32);
        assert_eq!(s["jobs"], 300);
        assert_eq!(s["completed"], 300, "every job ends: {s:#}");
        for key in [
            "jain_index",
            "utilization",
            "makespan_s",
            "wait_p50_s",
            "wait_p95_s",
        ] {
            assert!(s[key].as_f64().is_some(), "{key} in {s:#}");
        }
        let u = s["utilization"].as_f64().unwrap();
        assert!(u > 0.0 && u <= 1.0, "{u}");
        let members = s["members"].as_array().unwrap();
        let billed: f64 = members
            .iter()
            .map(|m| m["gpu_seconds"].as_f64().unwrap())
            .sum();
        // Preempted runs keep their work (checkpoint), so GPU time is exactly the demand.
        assert!(
            (billed - needed).abs() < 1e-6 * needed,
            "{policy}: {billed} vs {needed}"
        );
        let ent: f64 = members
            .iter()
            .map(|m| m["entitlement"].as_f64().unwrap())
            .sum();
        assert!((ent - 1.0).abs() < 1e-9, "entitlements sum to {ent}");
        for m in members {
            for key in [
                "member",
                "entitlement",
                "gpu_seconds",
                "wait_p50_s",
                "wait_p95_s",
                "jobs",
            ] {
                assert!(!m[key].is_null(), "{key} in {m:#}");
            }
        }
        let overall = std::fs::read_to_string(out.join("summary.csv")).unwrap();
        let rows: Vec<&str> = overall.lines().collect();
        assert_eq!(rows.len(), 2);
        assert!(
            rows[0].starts_with("policy,") && rows[1].starts_with(policy),
            "{overall}"
        );
        let csv = std::fs::read_to_string(out.join("members.csv")).unwrap();
        assert_eq!(csv.lines().count(), members.len() + 1);
        assert_eq!(
            std::fs::read_to_string(out.join("jobs.csv"))
                .unwrap()
                .lines()
                .count(),
            301
        );
        let svg = std::fs::read_to_string(out.join("share.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polygon"),
            "share.svg is a drawing"
        );
    }
    // The same trace and policy give the same figures.
    let again = simulate("fairshare", &dir.path().join("again"));
    let first: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("fairshare/summary.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "jain_index",
        "utilization",
        "makespan_s",
        "wait_p50_s",
        "members",
        "scheduling_passes",
    ] {
        assert_eq!(again[key], first[key], "{key}");
    }
}

/// (gpus, duration_s) of the first `n` rows.
fn csv_rows(n: usize) -> Vec<(f64, f64)> {
    std::fs::read_to_string(TRACE)
        .unwrap()
        .lines()
        .skip(1)
        .take(n)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[2].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect()
}

#[test]
fn bad_input_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "tenant,submit_s,gpus,duration_s\na,0,1,10\nb,5,zero,10\n",
    )
    .unwrap();
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["--trace", TRACE, "--nodes", "4:8xV100"], "nodes"),
        (
            vec!["--trace", TRACE, "--nodes", "four:8xV100-32GB"],
            "nodes",
        ),
        (vec!["--trace", bad.to_str().unwrap()], "row 3: gpus"),
    ];
    for (args, needle) in cases {
        let o = Command::new(BIN)
            .arg("simulate")
            .args(&args)
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written on bad input"
    );
}

#[test]
fn jobs_that_can_never_be_placed_fail_the_simulation_by_name_and_number() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.csv");
    std::fs::write(
        &trace,
        "tenant,submit_s,gpus,duration_s\na,0,16,100\nb,10,2,50\na,20,1,50\n",
    )
    .unwrap();
    let run = |nodes: &str, extra: &[&str]| {
        Command::new(BIN)
            .arg("simulate")
            .arg("--trace")
            .arg(&trace)
            .args(["--nodes", nodes, "--out"])
            .arg(dir.path().join("out"))
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run("1:8xV100-32GB", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a 16-GPU job on one 8-GPU node: {err}");
    assert!(
        err.contains("1 of 3 jobs could never be placed on nodes of at most 8 GPUs")
            && err.contains("16 GPUs as 2 nodes of 8, but 1 registered node has 8"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(o.stdout.is_empty(), "no summary line as if all was well");
    // The files say so too.
    let s: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s["never_placed"], 1);
    // On nodes big enough, it runs, and --output json prints summary.json;
    // stderr is not a terminal, so no progress line either.
    let o = run("1:16xV100-32GB", &["--output", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["completed"], 3);
    assert_eq!(s["never_placed"], 0);
    assert_eq!(s["multi_node_jobs"], 0);
    // On two nodes of 8 it runs over both at once, and is counted as such.
    let o = run("2:8xV100-32GB", &["--output", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["completed"], 3);
    assert_eq!(s["never_placed"], 0);
    assert_eq!(s["multi_node_jobs"], 1);
    // 1600 of the trace's 1600 + 100 + 50 GPU-seconds.
    let share = s["multi_node_gpu_seconds_share"].as_f64().unwrap();
    assert!((share - 1600.0 / 1750.0).abs() < 1e-9, "{share}");
    let jobs = std::fs::read_to_string(dir.path().join("out/jobs.csv")).unwrap();
    assert_eq!(jobs.lines().count(), 4, "{jobs}");
}
