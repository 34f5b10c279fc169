//! End-to-end fair share on `coop dev`: policy changes, preemption of a
//! flooding member for a late one, the fair-share view, and usage intervals
//! with energy.

mod common;

use common::*;
use serde_json::Value;

fn member<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["member"] == name)
        .unwrap_or_else(|| panic!("member {name} missing from {view:#}"))
}

#[test]
fn a_late_member_gets_its_share_by_preempting_the_one_that_flooded() {
    let c = Cluster::dev(&["--usage-interval", "300ms"]);
    let flood = c.add_member("flood");
    let late = c.add_member("late");
    // Only the two members hold shares; runs may be preempted at once, with 2 s to checkpoint.
    let shown = c.ok(&[
        "policy",
        "set",
        "share.default=0",
        "min_runtime=0s",
        "preempt_grace=2s",
        "--reason",
        "assembly vote of 2026-11-24: equal shares for flood and late",
    ]);
    assert!(shown.contains("preempt_grace=2s"), "{shown}");
    let policy = c.json(&["policy", "show"]);
    assert_eq!(policy["settings"]["share.default"], "0");
    let change = &policy["changes"].as_array().unwrap()[0];
    assert_eq!(change["by"], "operator");
    assert!(change["reason"].as_str().unwrap().contains("assembly vote"));

    // Checkpointing jobs: four run (the cluster has four GPUs; best fit
    // fills in order), two wait.
    let floods = c.flood(&flood, 6, 4);
    let view = c.json(&["fairshare"]);
    assert_eq!(member(&view, "flood")["running_gpus"], 4);
    assert_eq!(member(&view, "flood")["entitlement"], 0.5);
    assert_eq!(member(&view, "late")["entitlement"], 0.5);
    assert_eq!(member(&view, "default")["entitlement"], 0.0);

    // The late member asks for two GPUs: two flooding runs are preempted.
    let mine = c.submit_as(
        &late,
        &["--gpus", "2", "--", "sh", "-c", "echo got-gpus; sleep 600"],
    );
    let got = c.wait_job(&mine, "running", |j| !j["started_at"].is_null());
    let waited_ms = ms(&got["started_at"]) - ms(&got["submitted_at"]);
    // Without preemption it would wait ten minutes; with it, the 2 s grace
    // plus a pass or two.
    assert!(
        waited_ms < 20_000,
        "the late job waited {waited_ms} ms for its share"
    );
    let preempted: Vec<Value> = floods
        .iter()
        .map(|id| c.job(id))
        .filter(|j| j["preemptions"] == 1)
        .collect();
    assert_eq!(preempted.len(), 2, "two runs make room for a 2-GPU job");
    let freed: Vec<String> = preempted
        .iter()
        .flat_map(|j| j["gpus"].as_array().unwrap().clone())
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    let mut mine_gpus: Vec<String> = got["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    mine_gpus.sort();
    let mut freed_sorted = freed.clone();
    freed_sorted.sort();
    assert_eq!(
        mine_gpus, freed_sorted,
        "the late job runs on the freed GPUs"
    );
    for j in &preempted {
        assert_eq!(j["state"], "pending", "a preempted job is requeued: {j:#}");
        assert_eq!(j["attempts"], 1);
        assert!(j["reason"].as_str().unwrap().contains("preempted"), "{j:#}");
        let id = j["id"].as_str().unwrap();
        assert!(
            c.ok(&["job", "logs", id, "--attempt", "1"])
                .contains("checkpoint"),
            "the preempted run got SIGTERM and its grace"
        );
    }

    // The view explains the rest, and nothing moves back: the late member is
    // at its entitlement, the flooding member at its own.
    let view = wait_fairshare(&c, |v| {
        v["waiting"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["member"] == "flood")
            .count()
            == 4
            && v["waiting"].as_array().unwrap().iter().all(|w| {
                let r = w["reason"].as_str().unwrap();
                r.contains("waiting for") || r.contains("reserved")
            })
    });
    assert_eq!(member(&view, "late")["running_gpus"], 2);
    assert_eq!(member(&view, "flood")["running_gpus"], 2);
    assert_eq!(member(&view, "flood")["pending_jobs"], 4);
    let mine_now = c.job(&mine);
    assert_eq!(mine_now["state"], "running");
    assert_eq!(mine_now["preemptions"], 0);

    // Usage comes in intervals, with energy from the (simulated) GPUs.
    let usage = c.json(&["usage", "--member", "flood"]);
    let m = &usage["members"][0];
    assert!(m["energy_j"].as_f64().unwrap() > 0.0, "{usage:#}");
    assert!(m["units"].as_f64().unwrap() > 0.0, "{usage:#}");
    assert!(m["decayed_usage"].as_f64().unwrap() > 0.0, "{usage:#}");
    assert!(m["factor"].as_f64().unwrap() < 1.0, "{usage:#}");
}

/// Polls `coop fairshare` until `pred` holds.
fn wait_fairshare(c: &Cluster, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let v = c.json(&["fairshare"]);
        if pred(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fairshare never settled: {v:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn policy_changes_are_checked_and_kept_with_who_and_why() {
    let c = Cluster::dev(&[]);
    let acme = c.add_member("acme");
    for (args, field) in [
        (
            vec!["policy", "set", "half_life=0s", "--reason", "x"],
            "half_life",
        ),
        (
            vec!["policy", "set", "share.ghost=2", "--reason", "x"],
            "share.ghost",
        ),
        (
            vec!["policy", "set", "colour=blue", "--reason", "x"],
            "colour",
        ),
        (
            vec!["policy", "set", "preemption=off", "--reason", " "],
            "reason",
        ),
    ] {
        let err = c.fails(&args);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    let err = c.fails_as(
        Some(&acme),
        &["policy", "set", "preemption=off", "--reason", "mine"],
    );
    assert!(err.contains("PermissionDenied"), "{err}");
    // Nothing above changed anything.
    assert!(
        c.json(&["policy", "show"])["changes"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    c.ok(&[
        "policy",
        "set",
        "share.acme=3",
        "weight.A100-80GB=2.5",
        "half_life=1d",
        "ordering=drf",
        "--reason",
        "acme bought in",
    ]);
    let p = c.json_as(&acme, &["policy", "show"]);
    assert_eq!(p["settings"]["share.acme"], "3");
    assert_eq!(p["settings"]["weight.A100-80GB"], "2.500");
    assert_eq!(p["settings"]["half_life"], "1d");
    assert_eq!(p["settings"]["ordering"], "drf");
    let view = c.json(&["fairshare"]);
    assert_eq!(view["ordering"], "drf");
    // acme 3 shares, default 1.
    assert_eq!(member(&view, "acme")["entitlement"], 0.75);

    // Normalised units follow the model weight.
    let id = c.submit_as(&acme, &["--gpus", "2", "--", "sleep", "1"]);
    let job = c.wait_final(&id);
    let gpu_s = job["gpu_seconds"].as_f64().unwrap();
    let units = job["units"].as_f64().unwrap();
    assert!((units - gpu_s * 2.5 / 3600.0).abs() < 1e-6, "{job:#}");
}

#[test]
fn a_run_past_its_time_limit_is_stopped_and_the_job_fails() {
    let c = Cluster::dev(&[]);
    let id = c.submit(&[
        "--time-limit",
        "1s",
        "--grace",
        "1s",
        "--",
        "sh",
        "-c",
        "trap 'echo stopping; exit 3' TERM; sleep 600 & wait",
    ]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["time_limit_s"], 1.0);
    assert!(
        job["reason"].as_str().unwrap().contains("time limit"),
        "{job:#}"
    );
    let ran = ms(&job["finished_at"]) - ms(&job["started_at"]);
    assert!(ran >= 1000, "stopped after {ran} ms, before its limit");
    assert!(c.logs(&id).contains("stopping"), "it got SIGTERM first");
    let err = c.fails(&["job", "submit", "--time-limit", "0s", "--", "true"]);
    assert!(err.contains("--time-limit"), "{err}");
}
