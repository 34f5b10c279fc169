//! Multi-node jobs end to end: a scheduler and two agents as separate
//! processes on this machine. The job's processes meet through a real TCP
//! rendezvous on rank 0 (as torchrun's do), each node's part is billed from
//! its own agent, and the job has one fate: a failed or lost part stops the
//! others, and the job ends (or is requeued) once.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

/// Each rank prints what the launcher environment says; rank 0 listens on
/// MASTER_ADDR:MASTER_PORT, every other rank connects, says hello and reads
/// the answer (retrying while rank 0 is still starting, as torchrun does).
const RENDEZVOUS: &str = include_str!("../examples/multinode/rendezvous.py");

/// A scheduler with two agents, n1 and n2, of two simulated A100s each.
fn two_nodes() -> (Split, Daemon, Daemon) {
    let s = Split::start(&["--usage-interval", "300ms"]);
    s.c.add_member("acme");
    let a = s.agent("n1", "acme", "sim:2xA100-80GB");
    let b = s.agent("n2", "acme", "sim:2xA100-80GB");
    for n in ["n1", "n2"] {
        s.c.wait_node(n, "up", |n| n["state"] == "up" && n["connected"] == true);
    }
    (s, a, b)
}

fn parts(job: &Value) -> Vec<Value> {
    job["parts"].as_array().cloned().unwrap_or_default()
}

/// Waits until both parts of job `id` have started.
fn wait_started(c: &Cluster, id: &str) -> Value {
    c.wait_job(id, "started on both nodes", |j| {
        j["state"] == "running"
            && parts(j).len() == 2
            && parts(j).iter().all(|p| !p["started_at"].is_null())
    })
}

/// The pid of rank `rank`'s process of attempt `attempt` of job `id`.
fn part_pid(id: &str, attempt: u32, rank: u32) -> i32 {
    job_pid_with(id, attempt, &[format!("COOP_NODE_RANK={rank}")])
}

#[test]
fn a_two_node_job_meets_at_rank_0_and_each_node_bills_its_part() {
    if !require_tool("python3", &["--version"], "apt-get install python3") {
        return;
    }
    let (s, _a, _b) = two_nodes();
    let c = &s.c;
    // Four GPUs: more than either node has, so two parts of two.
    let id = c.submit(&[
        "--member", "acme", "--gpus", "4", "--", "python3", "-c", RENDEZVOUS,
    ]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job:#}");
    assert_eq!(job["exit_code"], 0);
    let ps = parts(&job);
    assert_eq!(ps.len(), 2, "{job:#}");
    let nodes: BTreeSet<&str> = ps.iter().map(|p| p["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2"]));
    for (rank, p) in ps.iter().enumerate() {
        assert_eq!(p["rank"], rank);
        assert_eq!(p["state"], "exited");
        assert_eq!(p["exit_code"], 0);
        assert_eq!(p["gpus"].as_array().unwrap().len(), 2);
    }
    assert_eq!(job["node"], ps[0]["node"], "rank 0 is the job's node");

    // Each rank's own output, through its own agent.
    let rank0 = c.ok(&["job", "logs", &id, "--rank", "0"]);
    let rank1 = c.ok(&["job", "logs", &id, "--rank", "1"]);
    assert!(rank0.contains("rank 0 got: hello from rank 1"), "{rank0}");
    assert!(rank1.contains("rank 1 got: welcome from rank 0"), "{rank1}");
    for (rank, out) in [(0, &rank0), (1, &rank1)] {
        assert!(
            out.contains(&format!(
                "rank {rank} of 2 world 4 local 2 master 127.0.0.1:29500 nodes 127.0.0.1,127.0.0.1 torchrun 2 {rank}"
            )),
            "{out}"
        );
        // Its own node's GPUs only.
        let gpus = out.split("gpus ").nth(1).unwrap().lines().next().unwrap();
        let want: Vec<&str> = ps[rank]["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap())
            .collect();
        assert_eq!(gpus.split(',').collect::<Vec<_>>(), want);
    }
    // There are two ranks only.
    let err = c.fails(&["job", "logs", &id, "--rank", "2"]);
    assert!(
        err.contains("rank: job") && err.contains("ranks 0 to 1"),
        "{err}"
    );

    // Usage: records from both nodes, of two GPUs each, adding up to the bill.
    let usage: Vec<Value> = c
        .ok(&["audit", "export"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["kind"] == "usage" && l["job"] == id.as_str())
        .collect();
    let billed_nodes: BTreeSet<&str> = usage.iter().map(|u| u["node"].as_str().unwrap()).collect();
    assert_eq!(billed_nodes, nodes, "{usage:#?}");
    assert!(usage.iter().all(|u| u["gpus"] == 2), "{usage:#?}");
    let billed: u64 = usage.iter().map(|u| u["gpu_ms"].as_u64().unwrap()).sum();
    assert_eq!(billed as f64 / 1000.0, job["gpu_seconds"].as_f64().unwrap());
    assert!(billed > 0);

    // The table shows every node of it, and each rank's fate.
    let table = c.ok(&["job", "get", &id, "--output", "table"]);
    assert!(
        table.contains("rank 0:") && table.contains("rank 1:"),
        "{table}"
    );
    assert!(table.contains("exit=0"), "{table}");
}

#[test]
fn a_failing_part_stops_the_others_and_the_job_fails_once() {
    let (s, _a, _b) = two_nodes();
    let c = &s.c;
    // Rank 1 fails at once; rank 0 would run for ten minutes.
    let id = c.submit(&[
        "--member",
        "acme",
        "--nodes",
        "2",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "if [ \"$NODE_RANK\" = 1 ]; then echo failing; exit 3; fi; echo working; sleep 600 & wait",
    ]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["attempts"], 1, "it ended once, not retried");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("rank 1 on") && reason.contains("exited with 3"),
        "{reason}"
    );
    let ps = parts(&job);
    assert_eq!(ps[1]["exit_code"], 3);
    // Rank 0 was stopped (SIGTERM), not left running.
    assert_eq!(ps[0]["state"], "exited");
    assert_ne!(ps[0]["exit_code"], 0);
    assert!(
        c.ok(&["job", "logs", &id, "--rank", "0"])
            .contains("working")
    );
    assert!(
        c.ok(&["job", "logs", &id, "--rank", "1"])
            .contains("failing")
    );
    // Every GPU is free again.
    for n in ["n1", "n2"] {
        c.wait_node(n, "free", |n| {
            n["gpus"]
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["job"].is_null() || g["job"] == "")
        });
    }
}

#[test]
fn a_part_lost_with_its_agent_requeues_the_job_and_the_other_part_stops() {
    let (s, _a, mut b) = two_nodes();
    let c = &s.c;
    let id = c.submit(&[
        "--member",
        "acme",
        "--gpus-per-node",
        "2",
        "--gpus",
        "4",
        "--",
        "sh",
        "-c",
        "echo working; sleep 600 & wait",
    ]);
    let ps = parts(&wait_started(c, &id));
    let rank_on_n2 = ps.iter().position(|p| p["node"] == "n2").unwrap() as u32;
    let other = 1 - rank_on_n2;
    let survivor = part_pid(&id, 1, other);
    let orphan = part_pid(&id, 1, rank_on_n2);
    // n2's agent dies with its job's process (kill -9 of the agent only: the
    // scheduler sees the node go silent).
    b.kill9();
    c.wait_node("n2", "down", |n| n["state"] == "down");
    // The job goes back to the queue once, whole: the part on n1 is stopped.
    let job = c.wait_job(&id, "requeued", |j| j["state"] == "pending");
    assert_eq!(job["attempts"], 1);
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("rank {rank_on_n2} on n2")),
        "{reason}"
    );
    wait_gone(survivor, "the surviving part");
    // With one node of two A100s left, four cannot be placed: it waits whole.
    let job = c.job(&id);
    assert_eq!(job["state"], "pending", "{job:#}");
    assert_eq!(job["wait_reason"], "Resources", "{job:#}");
    // The agent comes back: it stops what it ran before (no one's now), and
    // the job runs again on both nodes, as its second attempt.
    assert!(process_alive(orphan));
    let _b = s.agent("n2", "acme", "sim:2xA100-80GB");
    wait_gone(orphan, "the part left behind by the killed agent");
    c.wait_job(&id, "running again", |j| {
        j["state"] == "running" && j["attempts"] == 2 && parts(j).len() == 2
    });
    c.ok(&["job", "cancel", &id]);
    assert_eq!(c.wait_final(&id)["state"], "cancelled");
    // The lost attempt was billed on both nodes (n2's up to its last
    // heartbeat).
    let first: Vec<Value> = c
        .ok(&["audit", "export"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["kind"] == "usage" && l["job"] == id.as_str() && l["attempt"] == 1)
        .collect();
    let nodes: BTreeSet<&str> = first.iter().map(|u| u["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2"]), "{first:#?}");
}

#[test]
fn a_cancel_stops_every_part() {
    let (s, _a, _b) = two_nodes();
    let c = &s.c;
    let id = c.submit(&[
        "--member",
        "acme",
        "--nodes",
        "2",
        "--gpus",
        "4",
        "--",
        "sh",
        "-c",
        "echo working; sleep 600 & wait",
    ]);
    wait_started(c, &id);
    let pids = [part_pid(&id, 1, 0), part_pid(&id, 1, 1)];
    c.ok(&["job", "cancel", &id]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "cancelled", "{job:#}");
    for p in pids {
        wait_gone(p, "a cancelled part");
    }
    assert!(
        parts(&job).iter().all(|p| p["state"] == "exited"),
        "{job:#}"
    );
}

#[test]
fn bad_shapes_are_refused_naming_the_field() {
    let (s, _a, _b) = two_nodes();
    let c = &s.c;
    for (args, field) in [
        (
            &["--gpus", "4", "--gpus-per-node", "3"][..],
            "gpus_per_node",
        ),
        (&["--gpus", "3", "--nodes", "2"][..], "nodes"),
        (&["--gpus", "4", "--nodes", "0"][..], "nodes"),
        (
            &["--gpus", "4", "--nodes", "2", "--gpus-per-node", "1"][..],
            "gpus",
        ),
        (&["--gpus", "4", "--nodes", "100"][..], "nodes"),
    ] {
        let mut all = vec!["job", "submit", "--member", "acme"];
        all.extend_from_slice(args);
        all.extend(["--", "true"]);
        let err = c.fails(&all);
        assert!(err.contains(&format!("{field}:")), "{args:?}: {err}");
    }
    // Six A100s are more than the two nodes have: refused, not queued forever.
    let err = c.fails(&[
        "job", "submit", "--member", "acme", "--gpus", "6", "--", "true",
    ]);
    assert!(
        err.contains("gpus:") && err.contains("3 nodes of 2"),
        "{err}"
    );
    assert!(c.json(&["job", "list"]).as_array().unwrap().is_empty());
}
