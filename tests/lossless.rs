//! Usage is never lost and never counted twice: the ledger holds exactly what
//! the agent measured (as its spool says, through `coop agent status`), across
//! a 30 s outage of every scheduler and across the agent's own kill -9.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// What the agent measured of each job, summed over its attempts: (GPU-ms, mJ).
fn measured(status: &Value) -> BTreeMap<String, (u64, u64)> {
    let mut by_job = BTreeMap::new();
    for r in status["runs"].as_array().unwrap() {
        let e = by_job
            .entry(r["job"].as_str().unwrap().to_string())
            .or_insert((0, 0));
        e.0 += r["gpu_ms"].as_u64().unwrap();
        e.1 += r["energy_mj"].as_u64().unwrap();
    }
    by_job
}

/// What the ledger holds of a job: (GPU-ms, mJ).
fn billed(c: &Cluster, id: &str) -> (u64, u64) {
    let job = c.job(id);
    (
        (job["gpu_seconds"].as_f64().unwrap() * 1000.0).round() as u64,
        (job["energy_j"].as_f64().unwrap() * 1000.0).round() as u64,
    )
}

/// Every job's ledger totals equal the agent's measurements, and the member's
/// usage is their sum.
fn assert_ledger_matches_agent(s: &Split, agent: &str, ids: &[&str]) {
    let status = s.wait_agent(agent, "had every report acknowledged", |st| {
        st["pending_reports"] == 0
    });
    let measured = measured(&status);
    let mut total_ms = 0;
    for id in ids {
        let m = measured[*id];
        assert_eq!(billed(&s.c, id), m, "job {id}: ledger vs agent {status:#}");
        assert!(m.0 > 0 && m.1 > 0, "job {id} was measured: {status:#}");
        total_ms += m.0;
    }
    let usage = s.c.json(&["usage", "--member", "acme"]);
    let member = usage["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["member"] == "acme")
        .unwrap_or_else(|| panic!("no usage for acme: {usage:#}"));
    assert_eq!(
        (member["gpu_seconds"].as_f64().unwrap() * 1000.0).round() as u64,
        total_ms,
        "{usage:#}"
    );
}

/// A scheduler (usage reported every 300 ms, and `timing`), an agent "box"
/// with 2 simulated A100s, and a 2-GPU job running on it: (cluster, agent,
/// job id, the job's pid).
fn one_running_job(timing: &[&str]) -> (Split, Daemon, String, i32) {
    let mut flags = vec!["--usage-interval", "300ms"];
    flags.extend(timing);
    let s = Split::start(&flags);
    s.c.add_member("acme");
    let agent = s.agent("box", "acme", "sim:2xA100-80GB");
    s.c.wait_node("box", "up", |n| n["state"] == "up");
    let id = s.c.submit(&[
        "--member",
        "acme",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "echo pid $$; exec sleep 300",
    ]);
    s.c.wait_log(&id, "pid ");
    let pid = job_pid(&id, 1);
    (s, agent, id, pid)
}

fn run_of<'a>(status: &'a Value, id: &str, attempt: u64) -> Option<&'a Value> {
    status["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["job"] == id && r["attempt"] == attempt)
}

#[test]
fn usage_of_jobs_that_ran_and_ended_while_every_scheduler_was_down_is_billed_once() {
    let outage = Duration::from_secs(30);
    let mut s = Split::start(&["--usage-interval", "300ms", "--node-timeout", "5s"]);
    s.c.add_member("acme");
    let _agent = s.agent("box", "acme", "sim:4xA100-80GB");
    s.c.wait_node("box", "up", |n| n["state"] == "up");

    let short = s.c.submit(&["--member", "acme", "--", "sleep", "2"]);
    let medium =
        s.c.submit(&["--member", "acme", "--gpus", "2", "--", "sleep", "4"]);
    let long = s.c.submit(&["--member", "acme", "--", "sleep", "300"]);
    for id in [&short, &medium, &long] {
        s.c.wait_job(id, "billed while running", |j| {
            j["state"] == "running" && j["gpu_seconds"].as_f64().unwrap() > 0.0
        });
    }

    // Every scheduler goes (there is one), without a chance to say goodbye.
    s.scheduler.kill9();
    let down_at = Instant::now();
    // The two shorter jobs end meanwhile; the agent spools their ends.
    let status = s.wait_agent("box", "recorded both ends", |st| {
        [&short, &medium]
            .iter()
            .all(|id| run_of(st, id, 1).is_some_and(|r| r["exit_code"] == 0))
    });
    assert!(
        status["pending_reports"].as_u64().unwrap() > 0,
        "{status:#}"
    );
    // The outage lasts its full length while the long job keeps running.
    std::thread::sleep(outage.saturating_sub(down_at.elapsed()));
    s.restart_scheduler();

    for id in [&short, &medium] {
        let job = s.c.wait_final(id);
        assert_eq!(job["state"], "completed", "{job:#}");
    }
    let job = s.c.job(&long);
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("running"), Some(1)),
        "the run that went on through the outage is still the same: {job:#}"
    );
    s.c.ok(&["job", "cancel", &long]);
    assert_eq!(s.c.wait_final(&long)["state"], "cancelled");

    assert_ledger_matches_agent(&s, "box", &[&short, &medium, &long]);
    // Each run's GPUs' utilisation is attributed to it (simulated GPUs are
    // flat out while busy).
    let status = s.agent_status("box");
    let long_run = run_of(&status, &long, 1).unwrap();
    assert_eq!(long_run["utilization_pct"], 100.0, "{status:#}");
    // ...and reaches the scheduler with the job.
    let job = s.c.job(&long);
    assert_eq!(job["gpu_utilization_pct"], 100.0, "{job:#}");
    let (long_ms, _) = billed(&s.c, &long);
    assert!(
        long_ms >= outage.as_millis() as u64,
        "the long job is billed for the outage too: {long_ms} ms"
    );
}

#[test]
fn an_agent_killed_with_sigkill_and_restarted_loses_no_usage() {
    let (s, mut agent, id, pid) = one_running_job(&["--node-timeout", "20s"]);
    s.c.wait_job(&id, "billed", |j| j["gpu_seconds"].as_f64().unwrap() > 0.0);

    agent.kill9();
    assert!(process_alive(pid), "the run outlives its agent");
    let _agent = s.agent("box", "acme", "sim:2xA100-80GB");
    // The new agent stops what its predecessor left and reports it lost, with
    // its usage up to then; the job runs again.
    wait_gone(pid, "the run left by the killed agent");
    s.c.wait_job(&id, "running again", |j| {
        j["state"] == "running" && j["attempts"] == 2
    });
    let status = s.agent_status("box");
    let first = run_of(&status, &id, 1).unwrap();
    assert_eq!(first["lost"], true, "{status:#}");
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("the agent restarted"),
        "{status:#}"
    );
    // The table an operator reads says the same.
    let table = s.agent_status_as("box", "table");
    let row = table
        .lines()
        .find(|l| l.starts_with(id.as_str()) && l.contains(" lost "))
        .unwrap_or_else(|| panic!("no lost row for {id}: {table}"));
    assert!(row.contains("the agent restarted"), "{table}");
    s.c.wait_log(&id, "pid ");
    let pid2 = job_pid(&id, 2);
    assert_ne!(pid, pid2);

    s.c.ok(&["job", "cancel", &id]);
    assert_eq!(s.c.wait_final(&id)["state"], "cancelled");
    assert_ledger_matches_agent(&s, "box", &[&id]);
}

#[test]
fn an_agent_stopped_cleanly_hands_its_runs_back_at_once_billed_to_their_end() {
    // A node timeout far beyond the test's patience: only the agent's own
    // goodbye can mark the node down in time.
    let (s, mut agent, id, pid) = one_running_job(&["--node-timeout", "10m"]);

    agent.stop(); // SIGTERM, and a clean exit
    assert!(
        !process_alive(pid),
        "the run was stopped before the agent exited"
    );
    s.c.wait_node("box", "down", |n| n["state"] == "down");
    let job = s.c.job(&id);
    assert_eq!(job["state"], "pending", "{job:#}");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("the agent shut down"),
        "{job:#}"
    );
    assert_ledger_matches_agent(&s, "box", &[&id]);
}

#[test]
fn usage_an_agent_measured_while_cut_off_past_the_node_timeout_is_billed_when_it_returns() {
    let (s, agent, id, pid) = one_running_job(&[]); // FAST: nodes down after 2 s

    // The agent goes silent (frozen): the scheduler gives the run up and bills
    // it up to the last heartbeat, but the run goes on.
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    s.c.wait_node("box", "down", |n| n["state"] == "down");
    assert_eq!(s.c.job(&id)["state"], "pending");
    assert!(process_alive(pid));
    // Back again: it stops the run it no longer owns and reports what it
    // measured, up to the stop; the job runs again there.
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    wait_gone(pid, "the run given up on");
    s.c.wait_job(&id, "running again", |j| {
        j["state"] == "running" && j["attempts"] == 2
    });
    s.c.ok(&["job", "cancel", &id]);
    assert_eq!(s.c.wait_final(&id)["state"], "cancelled");
    assert_ledger_matches_agent(&s, "box", &[&id]);
    let first = run_of(&s.agent_status("box"), &id, 1).unwrap().clone();
    assert!(
        first["gpu_ms"].as_u64().unwrap() >= 2 * 2_000,
        "the first run was measured through the silence: {first:#}"
    );
}
