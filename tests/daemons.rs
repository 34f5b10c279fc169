//! End-to-end tests with `coop scheduler run` and `coop agent run` as separate
//! processes: registration, jobs, and agents that die or vanish.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::{CommandExt, ExitStatusExt};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn scheduler() -> Split {
    Split::start(&[])
}

#[test]
fn an_agent_process_registers_its_node_and_gpus_and_runs_jobs() {
    let s = scheduler();
    let c = &s.c;
    c.add_member("acme");
    let _agent = s.agent("gpu-box-1", "acme", "sim:8xH100-80GB");
    let node = c.wait_node("gpu-box-1", "up", |n| {
        n["state"] == "up" && n["connected"] == true
    });
    assert_eq!(node["owner"], "acme");
    let gpus = node["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    let uuids: BTreeSet<&str> = gpus.iter().map(|g| g["uuid"].as_str().unwrap()).collect();
    assert_eq!(uuids.len(), 8);
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g["model"], "H100-80GB");
        assert_eq!(g["memory_mb"], 80 * 1024);
        assert_eq!(g["index"], i);
    }

    let id = c.submit(&[
        "--member",
        "acme",
        "--gpus",
        "8",
        "--gpu-model",
        "H100-80GB",
        "--",
        "sh",
        "-c",
        "echo $CUDA_VISIBLE_DEVICES",
    ]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "completed");
    assert_eq!(job["node"], "gpu-box-1");
    let seen: BTreeSet<String> = c.logs(&id).trim().split(',').map(String::from).collect();
    assert_eq!(seen, uuids.iter().map(|u| u.to_string()).collect());

    // A machine cannot be enrolled for an owner that is not a member...
    let err = c.fails(&["node", "enroll", "stray", "--owner", "nobody"]);
    assert!(err.contains("owner"), "{err}");
    // ...and an agent without an enrollment is refused, and says what to do.
    let dir = s.agent_dir("stray");
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "run",
            "--scheduler",
            &c.addr,
            "--gpus",
            "sim:1xT4-16GB",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env("COOP_CA", c.ca.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("join: ") && err.contains("coop node enroll"),
        "{err}"
    );
    let names: Vec<Value> = c
        .json(&["node", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].clone())
        .collect();
    assert_eq!(names, ["gpu-box-1"]);
}

#[test]
fn a_killed_agent_loses_its_node_its_jobs_move_and_its_orphans_are_stopped() {
    let s = scheduler();
    let c = &s.c;
    c.add_member("acme");
    let mut a = s.agent("a", "acme", "sim:2xA100-80GB");
    c.wait_node("a", "up", |n| n["state"] == "up");
    let id = c.submit(&[
        "--member",
        "acme",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "echo pid $$; exec sleep 300",
    ]);
    c.wait_log(&id, "pid ");
    let pid = job_pid(&id, 1);
    assert_eq!(c.job(&id)["node"], "a");

    a.kill9();
    c.wait_node("a", "down", |n| n["state"] == "down");
    let job = c.job(&id);
    assert_eq!(
        job["state"], "pending",
        "requeued when its node went down: {job}"
    );
    assert!(
        job["reason"].as_str().unwrap().contains("node down"),
        "{job}"
    );

    // Another node takes the job over.
    let _b = s.agent("b", "acme", "sim:2xA100-80GB");
    let job = c.wait_job(&id, "running on b", |j| {
        j["state"] == "running" && j["node"] == "b"
    });
    assert_eq!(job["attempts"], 2);
    c.wait_log(&id, "pid ");
    let pid_b = job_pid(&id, 2);
    assert_ne!(pid, pid_b);

    // The old process survived its agent's kill -9; the restarted agent stops it.
    assert!(process_alive(pid));
    let _a = s.agent("a", "acme", "sim:2xA100-80GB");
    wait_gone(pid, "the run left behind by the killed agent");
    c.wait_node("a", "up again", |n| n["state"] == "up");
    assert!(process_alive(pid_b));
    let job = c.job(&id);
    assert_eq!(
        (job["state"].as_str(), job["node"].as_str()),
        (Some("running"), Some("b"))
    );
    // The first attempt was billed up to its node's last heartbeat.
    assert!(job["gpu_seconds"].as_f64().unwrap() > 0.0);
    c.ok(&["job", "cancel", &id]);
    assert_eq!(c.wait_final(&id)["state"], "cancelled");
    drop(s.scheduler);
}

#[test]
fn an_agent_cut_off_too_long_is_told_to_stop_what_it_no_longer_owns() {
    let s = scheduler();
    let c = &s.c;
    c.add_member("acme");
    let a = s.agent("a", "acme", "sim:1xA100-80GB");
    c.wait_node("a", "up", |n| n["state"] == "up");
    let _b = s.agent("b", "acme", "sim:1xA100-80GB");
    c.wait_node("b", "up", |n| n["state"] == "up");
    // Fill b so that the job lands on a, then free b.
    let filler = c.submit(&["--member", "acme", "--", "sleep", "300"]);
    let filler_node = c.wait_job(&filler, "running", |j| j["state"] == "running")["node"].clone();
    let id = c.submit(&[
        "--member",
        "acme",
        "--",
        "sh",
        "-c",
        "echo pid $$; exec sleep 300",
    ]);
    let job = c.wait_job(&id, "running", |j| j["state"] == "running");
    assert_ne!(job["node"], filler_node);
    let first_node = job["node"].as_str().unwrap().to_string();
    c.wait_log(&id, "pid ");
    let pid = job_pid(&id, 1);
    c.ok(&["job", "cancel", &filler]);
    c.wait_final(&filler);

    // Freeze the agent that runs the job: the scheduler stops hearing from it.
    let frozen = if first_node == "a" { &a } else { &_b };
    frozen.signal(Signal::SIGSTOP);
    c.wait_node(&first_node, "down", |n| n["state"] == "down");
    let job = c.wait_job(&id, "moved", |j| {
        j["state"] == "running" && j["node"] != first_node.as_str()
    });
    assert_eq!(job["attempts"], 2);
    assert!(process_alive(pid), "nothing has told the frozen agent yet");

    // When it wakes up it reconnects and is told the run is no longer its own.
    frozen.signal(Signal::SIGCONT);
    wait_gone(pid, "the run of the agent that was cut off");
    c.wait_node(&first_node, "up", |n| n["state"] == "up");
    let job = c.job(&id);
    assert_eq!(job["state"], "running");
    assert_eq!(job["attempts"], 2);
}

#[test]
fn scheduler_and_agent_processes_serve_their_own_metrics() {
    let s = Split::start(&["--metrics", "127.0.0.1:0"]);
    let sched_metrics = s.scheduler.export("COOP_METRICS");
    let c = &s.c;
    c.add_member("acme");
    let agent = s.agent_with(
        "box",
        "acme",
        "sim:2xT4-16GB",
        &["--metrics", "127.0.0.1:0"],
    );
    let agent_metrics = agent.export("COOP_METRICS");
    c.wait_node("box", "up", |n| n["connected"] == true);
    // The scheduler's over TLS to the operator's token; the agent's (no
    // certificate) in plain HTTP.
    let ca = c.ca.clone().unwrap();
    let scrape = |addr: &str, needle: &str| {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let (status, body) = if addr == sched_metrics {
                https_get(addr, "/metrics", &ca, Some(OPERATOR))
            } else {
                http_get(addr, "/metrics")
            };
            assert_eq!(status, 200);
            if body.lines().any(|l| l.starts_with(needle)) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{addr} never showed {needle}:\n{body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let s = scrape(&sched_metrics, r#"coop_node_up{node="box",owner="acme"} 1"#);
    assert!(
        s.contains(r#"coop_member_entitlement_ratio{member="acme"} 1"#),
        "{s}"
    );
    assert!(
        !s.contains("coop_gpu_power_watts"),
        "GPU telemetry comes from the agent"
    );
    let a = scrape(&agent_metrics, r#"coop_agent_connected{node="box"} 1"#);
    let power: Vec<&str> = a
        .lines()
        .filter(|l| l.starts_with("coop_gpu_power_watts{"))
        .collect();
    assert_eq!(power.len(), 2, "{a}");
    assert!(
        power
            .iter()
            .all(|l| l.contains(r#"model="T4-16GB""#) && l.contains(r#"node="box""#))
    );
    assert!(
        !a.contains("coop_member_"),
        "member figures come from the scheduler"
    );
}

#[test]
fn without_a_driver_probe_and_nvml_say_so_in_one_line_and_exit_non_zero() {
    if std::path::Path::new("/proc/driver/nvidia/version").exists() {
        // A machine with a GPU: scripts/gpu-check covers it.
        return;
    }
    let out = std::process::Command::new(BIN)
        .args(["agent", "probe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: probe: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let s = scheduler();
    s.c.add_member("acme");
    let mut agent = s.agent("box", "acme", "nvml");
    let status = agent.child.wait().unwrap();
    assert!(!status.success());
    let err = agent.stderr();
    assert!(err.contains("gpus: cannot use NVML"), "{err}");
    assert!(err.contains("install the NVIDIA driver"), "{err}");
    assert!(
        err.contains("--gpus sim:"),
        "says what to do instead: {err}"
    );
    // Nothing was registered.
    assert_eq!(s.c.json(&["node", "list"]), serde_json::json!([]));
}

#[test]
fn limits_go_to_the_runs_cgroup_where_one_can_be_made_and_image_jobs_need_a_runtime() {
    let s = scheduler();
    s.c.add_member("acme");
    let agent = s.agent_with(
        "box",
        "acme",
        "sim:2xA100-80GB",
        &["--container-runtime", "none"],
    );
    s.c.wait_node("box", "up", |n| n["state"] == "up");

    let id = s.c.submit(&[
        "--member",
        "acme",
        "--cpus",
        "0.5",
        "--memory",
        "256M",
        "--",
        "sh",
        "-c",
        r#"echo "cg=${COOP_CGROUP:-none}"; if [ -n "$COOP_CGROUP" ]; then grep -q "$(basename "$COOP_CGROUP")" /proc/self/cgroup && echo inside; cat "$COOP_CGROUP/cpu.max" "$COOP_CGROUP/memory.max"; fi"#,
    ]);
    let job = s.c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job:#}");
    assert_eq!(
        (job["cpus"].as_f64(), job["memory_mb"].as_u64()),
        (Some(0.5), Some(256))
    );
    let out = s.c.logs(&id);
    if out.contains("cg=none") {
        // No delegated cgroup v2 here: the agent said so when it started.
        assert!(
            agent
                .stderr()
                .contains("--cpus and --memory are not enforced"),
            "{}",
            agent.stderr()
        );
    } else {
        assert!(out.contains("inside"), "the run is in its cgroup: {out}");
        assert!(out.contains("50000 100000"), "half a CPU: {out}");
        assert!(out.contains(&(256u64 << 20).to_string()), "256 MiB: {out}");
    }

    // An image job on an agent without a container runtime fails, saying why.
    let id =
        s.c.submit(&["--member", "acme", "--image", "alpine:3", "--", "true"]);
    let job = s.c.wait_final(&id);
    assert_eq!(job["state"], "failed", "{job:#}");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("no container runtime"),
        "{job:#}"
    );
    // A malformed image or limit is refused before anything is queued.
    let err = s.c.fails(&[
        "job", "submit", "--member", "acme", "--image", "my image", "--", "true",
    ]);
    assert!(err.contains("image"), "{err}");
    let err = s.c.fails(&[
        "job", "submit", "--member", "acme", "--memory", "12X", "--", "true",
    ]);
    assert!(err.contains("--memory"), "{err}");
}

#[test]
fn run_directories_are_removed_after_the_retention_and_running_ones_are_kept() {
    let s = scheduler();
    s.c.add_member("acme");
    let _agent = s.agent_with("box", "acme", "sim:2xA100-80GB", &["--keep-runs", "2s"]);
    s.c.wait_node("box", "up", |n| n["state"] == "up");
    let long = s.c.submit(&[
        "--member",
        "acme",
        "--",
        "sh",
        "-c",
        "echo started; sleep 300",
    ]);
    s.c.wait_log(&long, "started");
    let quick = s.c.submit(&["--member", "acme", "--", "echo", "hello"]);
    assert_eq!(s.c.wait_final(&quick)["state"], "completed");
    assert_eq!(s.c.logs(&quick).trim(), "hello");

    let jobs = s.agent_dir("box").join("jobs");
    let deadline = std::time::Instant::now() + PATIENCE;
    while jobs.join(&quick).exists() {
        assert!(std::time::Instant::now() < deadline, "never removed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let err = s.c.fails(&["job", "logs", &quick]);
    assert!(err.contains("no output is kept"), "{err}");
    // The running job's directory stays, however old its last write.
    assert!(jobs.join(&long).join("1").join("output.log").exists());
    assert!(s.c.logs(&long).contains("started"));
}

#[test]
fn a_restarted_agent_stops_processes_of_its_runs_that_its_spool_never_recorded() {
    let s = scheduler();
    s.c.add_member("acme");
    let mut agent = s.agent("box", "acme", "sim:1xA100-80GB");
    s.c.wait_node("box", "up", |n| n["state"] == "up");
    let identity = s.agent_status("box")["identity"]
        .as_str()
        .unwrap()
        .to_string();
    agent.stop();
    // What a run started in the instant before its agent crashed looks like:
    // its own process group, the agent's identity in its environment, and no
    // record in the spool. Another agent's run is left alone.
    let spawn = |id: &str| {
        std::process::Command::new("sleep")
            .arg("300")
            .env("COOP_AGENT_ID", id)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut unrecorded = spawn(&identity);
    let mut other = spawn("another-agent");
    let _agent = s.agent("box", "acme", "sim:1xA100-80GB");
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = unrecorded.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "never stopped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(15), "stopped with SIGTERM: {status}");
    assert!(process_alive(other.id() as i32));
    let _ = other.kill();
    let _ = other.wait();
}
