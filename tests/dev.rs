//! End-to-end tests against `coop dev`: a real scheduler and agent in one
//! process, driven through the real CLI.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

fn gpus_of(job: &Value) -> Vec<String> {
    job["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_job_runs_with_exactly_its_gpus_in_its_own_process_group() {
    let c = Cluster::dev(&[]);
    let node_gpus: BTreeSet<String> = c.json(&["node", "list"])[0]["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(node_gpus.len(), 4);

    let id = c.submit(&[
        "--kind",
        "finetune",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "echo $CUDA_VISIBLE_DEVICES; echo $NVIDIA_VISIBLE_DEVICES; echo started; sleep 2",
    ]);
    // Seen from the machine, the run is in a process group of its own (the
    // agent signals it as a whole), not the agent's.
    c.wait_log(&id, "started");
    let pid = job_pid(&id, 1);
    // The process group: the fifth field of /proc/PID/stat, after the name.
    let pgid = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after_name = stat.rsplit(')').next().unwrap().to_string();
        after_name.split_whitespace().nth(2).unwrap().to_string()
    };
    let (pgid, agent_pgid) = (pgid(pid), pgid(c.daemons[0].pid()));
    assert_ne!(pgid, agent_pgid, "the job has a process group of its own");
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "completed");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["member"], "default");
    assert_eq!(job["kind"], "finetune");
    assert_eq!(job["node"], "local");
    let gpus = gpus_of(&job);
    assert_eq!(gpus.len(), 2);
    assert!(gpus.iter().all(|g| node_gpus.contains(g)));
    for key in ["submitted_at", "started_at", "finished_at"] {
        ms(&job[key]);
    }

    let logs = c.logs(&id);
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines[0], gpus.join(","), "CUDA_VISIBLE_DEVICES");
    assert_eq!(lines[1], gpus.join(","), "NVIDIA_VISIBLE_DEVICES");
}

#[test]
fn a_failing_job_ends_failed_with_its_exit_code_and_output() {
    let c = Cluster::dev(&[]);
    let id = c.submit(&[
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 3",
    ]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "failed");
    assert_eq!(job["exit_code"], 3);
    let logs = c.logs(&id);
    assert!(
        logs.contains("to-stdout") && logs.contains("to-stderr"),
        "{logs}"
    );

    let missing = c.submit(&["--", "/nonexistent/program"]);
    let job = c.wait_final(&missing);
    assert_eq!(job["state"], "failed");
    assert_eq!(job["exit_code"], 127);
    assert!(
        job["reason"].as_str().unwrap().contains("spawn failed"),
        "{job}"
    );
}

#[test]
fn ten_two_gpu_jobs_on_four_gpus_run_two_at_a_time_and_all_finish() {
    let c = Cluster::dev(&[]);
    let ids: Vec<String> = (0..10)
        .map(|_| {
            c.submit(&[
                "--gpus",
                "2",
                "--",
                "sh",
                "-c",
                "echo $CUDA_VISIBLE_DEVICES; sleep 0.5",
            ])
        })
        .collect();
    let jobs: Vec<Value> = ids.iter().map(|id| c.wait_final(id)).collect();
    for (id, job) in ids.iter().zip(&jobs) {
        assert_eq!(job["state"], "completed", "{job}");
        assert_eq!(c.logs(id).trim(), gpus_of(job).join(","));
    }
    // At no moment were more than two running, and those held distinct GPUs.
    let spans: Vec<(i64, i64, Vec<String>)> = jobs
        .iter()
        .map(|j| (ms(&j["started_at"]), ms(&j["finished_at"]), gpus_of(j)))
        .collect();
    for (i, (s, _, _)) in spans.iter().enumerate() {
        let running: Vec<_> = spans
            .iter()
            .filter(|(s2, f2, _)| s2 <= s && s < f2)
            .collect();
        assert!(
            running.len() <= 2,
            "{} jobs running at once at job {i}'s start",
            running.len()
        );
        let held: Vec<&String> = running.iter().flat_map(|(_, _, g)| g).collect();
        let distinct: BTreeSet<_> = held.iter().collect();
        assert_eq!(
            held.len(),
            distinct.len(),
            "a GPU was given to two running jobs"
        );
    }
    // And some had to wait.
    let last_start = spans.iter().map(|s| s.0).max().unwrap();
    let first_end = spans.iter().map(|s| s.1).min().unwrap();
    assert!(last_start >= first_end);
}

#[test]
fn cancel_sends_sigterm_then_sigkill_after_the_grace_and_frees_the_gpus() {
    let c = Cluster::dev(&[]);
    // Exits on SIGTERM by itself.
    let polite = c.submit(&[
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    // Ignores SIGTERM: must be killed.
    let stubborn = c.submit(&[
        "--gpus",
        "2",
        "--grace",
        "1s",
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    // Waits: all GPUs are taken.
    let waiting = c.submit(&["--gpus", "4", "--", "true"]);
    c.wait_log(&polite, "ready");
    c.wait_log(&stubborn, "ready");
    assert_eq!(c.job(&waiting)["state"], "pending");

    c.ok(&["job", "cancel", &waiting]);
    let job = c.job(&waiting);
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["attempts"], 0);

    c.ok(&["job", "cancel", &polite]);
    let job = c.wait_final(&polite);
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["exit_code"], 0);
    assert!(c.logs(&polite).contains("got-term"));

    c.ok(&["job", "cancel", &stubborn]);
    let job = c.wait_final(&stubborn);
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["exit_code"], 128 + 9, "SIGKILL after the grace: {job}");

    let status = c.json(&["cluster", "status"]);
    assert_eq!(status["gpus_free"], 4);
    assert_eq!(status["jobs_running"], 0);
    // Cancelling again is what was asked already (Cancel is idempotent: the
    // CLI may resend it after a timeout); the job stays as it ended.
    let again = c.json(&["job", "cancel", &polite]);
    assert_eq!(again["state"], "cancelled");
    assert_eq!(again["exit_code"], 0);
}

#[test]
fn an_inference_job_is_restarted_when_it_exits_until_cancelled() {
    let c = Cluster::dev(&[]);
    let id = c.submit(&[
        "--kind",
        "inference",
        "--",
        "sh",
        "-c",
        "echo serving; sleep 0.3; exit 1",
    ]);
    let job = c.wait_job(&id, "restarted", |j| {
        j["attempts"].as_u64() >= Some(2) && j["state"] == "running"
    });
    assert_eq!(job["kind"], "inference");
    assert_eq!(
        c.ok(&["job", "logs", &id, "--attempt", "1"]).trim(),
        "serving"
    );
    c.ok(&["job", "cancel", &id]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "cancelled");
}

#[test]
fn usage_matches_wall_time_times_gpus() {
    let c = Cluster::dev(&[]);
    let a = c.submit(&["--gpus", "1", "--", "sleep", "1"]);
    let b = c.submit(&["--gpus", "2", "--", "sleep", "2"]);
    let running = c.submit(&["--gpus", "1", "--", "sleep", "30"]);
    let done: Vec<Value> = [&a, &b].iter().map(|id| c.wait_final(id)).collect();
    c.wait_job(&running, "started", |j| !j["started_at"].is_null());

    let mut expected = 0.0;
    for (job, (secs, gpus)) in done.iter().zip([(1.0, 1.0), (2.0, 2.0)]) {
        let wall = (ms(&job["finished_at"]) - ms(&job["started_at"])) as f64 / 1000.0;
        let billed = job["gpu_seconds"].as_f64().unwrap();
        assert!(
            (billed - wall * gpus).abs() <= 1.0,
            "{billed} vs {wall} x {gpus}"
        );
        assert!(
            (billed - secs * gpus).abs() <= 1.0,
            "{billed} vs {secs} x {gpus}"
        );
        expected += billed;
    }
    let usage = c.json(&["usage"]);
    let started = ms(&c.job(&running)["started_at"]);
    let as_of = ms(&usage["as_of"]);
    expected += (as_of - started) as f64 / 1000.0;
    let m = &usage["members"][0];
    assert_eq!(m["member"], "default");
    assert_eq!(m["running_jobs"], 1);
    assert_eq!(m["finished_jobs"], 2);
    let got = m["gpu_seconds"].as_f64().unwrap();
    assert!((got - expected).abs() <= 1.0, "usage {got} vs {expected}");
}

#[test]
fn members_see_and_cancel_only_their_own_jobs() {
    let c = Cluster::dev(&[]);
    let alice = c.add_member("alice");
    let bob = c.add_member("bob");
    let job = c.submit_as(&alice, &["--", "sleep", "30"]);
    assert_eq!(c.json_as(&alice, &["job", "get", &job])["member"], "alice");

    for args in [
        vec!["job", "get", &job],
        vec!["job", "cancel", &job],
        vec!["job", "logs", &job],
        vec!["member", "add", "mallory"],
        vec!["member", "list"],
        vec!["usage", "--member", "alice"],
        vec!["job", "list", "--member", "alice"],
    ] {
        let err = c.fails_as(Some(&bob), &args);
        assert!(err.contains("PermissionDenied"), "{args:?}: {err}");
    }
    let bobs = c.json_as(&bob, &["job", "list"]);
    assert_eq!(bobs.as_array().unwrap().len(), 0);
    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), 1);
    let usage = c.json_as(&bob, &["usage"]);
    assert_eq!(usage["members"].as_array().unwrap().len(), 1);
    assert_eq!(usage["members"][0]["member"], "bob");

    for token in [None, Some("coop_not-a-real-token")] {
        let err = c.fails_as(token, &["job", "list"]);
        assert!(
            err.contains("Unauthenticated") || err.contains("token:"),
            "{err}"
        );
    }
    let out = c.run_as(Some("wrong"), &["job", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));

    // Bob's denied cancel changed nothing; the operator may cancel.
    assert_eq!(c.job(&job)["cancel_requested"], false);
    c.ok(&["job", "cancel", &job]);
    assert_eq!(c.wait_final(&job)["state"], "cancelled");

    // Tokens are kept only as hashes.
    let db = std::fs::read(c.data_dir().join("scheduler/scheduler.db")).unwrap();
    let wal = std::fs::read(c.data_dir().join("scheduler/scheduler.db-wal")).unwrap_or_default();
    for t in [&alice, &bob, &c.token] {
        let needle = t.as_bytes();
        for bytes in [&db, &wal] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "a token is stored in clear"
            );
        }
    }
}

#[test]
fn bad_input_gets_a_one_line_error_naming_the_field_and_changes_nothing() {
    let c = Cluster::dev(&[]);
    let cases: &[(&[&str], &str)] = &[
        (&["job", "submit", "--gpus", "0", "--", "true"], "gpus"),
        (&["job", "submit", "--gpus", "-2", "--", "true"], "gpus"),
        (&["job", "submit", "--gpus", "5", "--", "true"], "gpus"),
        (
            &[
                "job",
                "submit",
                "--gpus",
                "1",
                "--gpu-model",
                "H100-80GB",
                "--",
                "true",
            ],
            "gpus",
        ),
        (&["job", "submit", "--", ""], "command"),
        (&["job", "submit", "--gpus", "1"], "COMMAND"),
        (
            &["job", "submit", "--kind", "training", "--", "true"],
            "--kind",
        ),
        (
            &["job", "submit", "--member", "nobody", "--", "true"],
            "member",
        ),
        (
            &["job", "submit", "--grace", "soon", "--", "true"],
            "--grace",
        ),
        (&["job", "get", "not-a-uuid"], "id"),
        (&["job", "cancel", "12345"], "id"),
        (&["job", "logs", "xyz"], "id"),
        (&["member", "add", "Bad Name!"], "name"),
        (&["usage", "--member", "nobody"], "member"),
    ];
    for (args, field) in cases {
        let err = c.fails(args);
        assert!(err.contains(field), "{args:?}: {err} does not name {field}");
    }
    let err = c.fails(&["job", "get", "7f9c2b64-1111-4c3e-9e4e-2a8c1e0d5f00"]);
    assert!(err.contains("NotFound"), "{err}");
    c.add_member("acme");
    let err = c.fails(&["member", "add", "acme"]);
    assert!(err.contains("AlreadyExists"), "{err}");

    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), 0);
    let members: Vec<Value> = c.json(&["member", "list"]).as_array().unwrap().clone();
    let names: Vec<&str> = members
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "default"]);
}

#[test]
fn a_restart_keeps_members_jobs_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_dev(dir.path(), &[]);
    let mut c = Cluster {
        addr: d.export("COOP_ADDR"),
        token: d.export("COOP_TOKEN"),
        ca: Some(d.export("COOP_CA")),
        dir,
        daemons: vec![],
    };
    let acme = c.add_member("acme");
    let done = c.submit_as(
        &acme,
        &["--gpus", "2", "--", "sh", "-c", "echo kept; sleep 1"],
    );
    let before = c.wait_final(&done);
    let usage_before = c.json(&["usage", "--member", "acme"]);
    d.stop();

    let d = start_dev(c.dir.path(), &[]);
    c.addr = d.export("COOP_ADDR");
    assert_eq!(
        d.export("COOP_TOKEN"),
        c.token,
        "the operator token is kept"
    );
    c.daemons.push(d);
    assert_eq!(c.json_as(&acme, &["job", "get", &done]), before);
    // Billed figures are kept exactly (decayed usage moves with the clock).
    let usage_after = c.json(&["usage", "--member", "acme"]);
    for key in [
        "gpu_seconds",
        "units",
        "energy_j",
        "finished_jobs",
        "entitlement",
    ] {
        assert_eq!(
            usage_after["members"][0][key], usage_before["members"][0][key],
            "{key}"
        );
    }
    let names: Vec<Value> = c
        .json(&["member", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert_eq!(names, ["acme", "default"]);
    assert_eq!(c.logs(&done).trim(), "kept");
}

#[test]
fn a_job_running_when_coop_dev_is_killed_runs_again_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_dev(dir.path(), &[]);
    let mut c = Cluster {
        addr: d.export("COOP_ADDR"),
        token: d.export("COOP_TOKEN"),
        ca: Some(d.export("COOP_CA")),
        dir,
        daemons: vec![],
    };
    let id = c.submit(&["--", "sh", "-c", "echo pid $$; exec sleep 300"]);
    c.wait_log(&id, "pid ");
    let pid = job_pid(&id, 1);
    d.kill9();
    // The job's process group outlives the killed agent...
    assert!(process_alive(pid));
    let d = start_dev(c.dir.path(), &[]);
    c.addr = d.export("COOP_ADDR");
    c.daemons.push(d);
    // ...until the restarted agent stops what its predecessor left behind,
    wait_gone(pid, "the orphaned run");
    // and the job is requeued and runs again.
    let job = c.wait_job(&id, "running again", |j| {
        j["attempts"] == 2 && j["state"] == "running"
    });
    assert!(job["reason"].as_str().unwrap().is_empty(), "{job}");
    c.ok(&["job", "cancel", &id]);
    assert_eq!(c.wait_final(&id)["state"], "cancelled");
}

#[test]
fn grpc_health_and_reflection_are_served() {
    let c = Cluster::dev(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ca = std::fs::read(c.ca.as_ref().unwrap()).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        let channel = tonic::transport::Endpoint::from_shared(c.addr.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "coop.v1.JobService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = refl
            .server_reflection_info(tokio_stream::once(req))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
        for s in [
            "coop.v1.JobService",
            "coop.v1.MemberService",
            "coop.v1.AgentService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.contains(s), "{s} not in {names:?}");
        }
    });
}

#[test]
fn logs_follow_prints_the_output_as_it_comes_until_the_job_ends() {
    let c = Cluster::dev(&[]);
    let id = c.submit(&[
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done",
    ]);
    c.wait_job(&id, "started", |j| !j["started_at"].is_null());
    // Started while the job runs, it returns only once the job has ended.
    let followed = c.ok(&["job", "logs", &id, "--follow"]);
    let expected: String = (1..=5).map(|i| format!("line {i}\n")).collect();
    assert_eq!(followed, expected);
    assert!(is_final(&c.job(&id)));
}
