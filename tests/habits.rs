//! The habits of Slurm and Nomad users, end to end against `coop dev`:
//! short id prefixes, job names, working directories, HH:MM:SS time limits,
//! the REASON column, sacct-like filters, cancel by filter, hold and release,
//! job arrays, dependencies and node drain. Each attacker's move (another
//! member's job as a dependency, holding another's job, a huge array, control
//! characters, a one-character prefix) is refused and changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use coop_proto::v1 as pb;
use serde_json::Value;
use tonic::transport::{Certificate, ClientTlsConfig};

/// Polls `coop job get` until `pred` holds (a deadline, not a sleep).
fn poll(c: &Cluster, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c.job(id);
        if pred(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never {what}: {j:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn names_time_limits_workdirs_and_filters() {
    let c = Cluster::dev(&[]);
    let id = c.submit(&[
        "--name",
        "train-llama",
        "--time-limit",
        "1:30:00",
        "--workdir",
        "runs/one",
        "--",
        "sh",
        "-c",
        "pwd; sleep 600",
    ]);
    let j = c.job(&id);
    assert_eq!(j["name"], "train-llama");
    assert_eq!(j["time_limit_s"], 5400.0);
    assert_eq!(j["workdir"], "runs/one");
    let log = c.wait_log(&id, "runs/one");
    assert!(log.trim_end().ends_with("/work/runs/one") || log.trim_end().ends_with("/runs/one"));

    // Slurm's D-HH:MM:SS; a bare number has no unit.
    let two_days = c.submit(&["--time-limit", "2-00:00:00", "--hold", "--", "true"]);
    assert_eq!(c.job(&two_days)["time_limit_s"], 172_800.0);
    let err = c.fails(&["job", "submit", "--time-limit", "90", "--", "true"]);
    assert!(
        err.contains("time-limit") && err.contains("no unit"),
        "{err}"
    );

    // Names are bounded printable text; working directories stay inside.
    let before = c.json(&["job", "list"]).as_array().unwrap().len();
    for (args, field) in [
        (vec!["--name", "evil\u{1b}[2J"], "name:"),
        (vec!["--name", &"n".repeat(129)], "name:"),
        (vec!["--workdir", "../../etc"], "workdir:"),
        (vec!["--workdir", "/etc"], "workdir:"),
    ] {
        let mut a = vec!["job", "submit"];
        a.extend(args.iter().copied());
        a.extend(["--", "true"]);
        let err = c.fails(&a);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), before);

    // Filters, done by the server: name, node, window.
    let named = c.json(&["job", "list", "--name", "train-llama"]);
    assert_eq!(ids(&named), vec![id.clone()]);
    let table = c.ok(&["job", "list", "--name", "train-llama"]);
    assert!(table.lines().next().unwrap().contains("NAME"), "{table}");
    assert!(table.contains("train-llama"), "{table}");
    assert_eq!(
        ids(&c.json(&["job", "list", "--node", "local"])),
        vec![id.clone()]
    );
    assert!(ids(&c.json(&["job", "list", "--node", "elsewhere"])).is_empty());
    assert_eq!(
        c.json(&["job", "list", "--since", "1h"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(ids(&c.json(&["job", "list", "--until", "2000-01-01T00:00:00Z"])).is_empty());
    let err = c.fails(&["job", "list", "--since", "90"]);
    assert!(err.contains("since"), "{err}");
    // Paging goes on correctly under a filter.
    let page = c.json(&["job", "list", "--since", "1h", "--limit", "1"]);
    assert_eq!(page.as_array().unwrap().len(), 1);
}

#[test]
fn prefixes_resolve_only_among_the_callers_jobs() {
    let c = Cluster::dev(&[]);
    let acme = c.add_member("acme");
    let bravo = c.add_member("bravo");
    // Jobs with chosen ids (the API's request_id) that share a prefix.
    let made = |n: u32| format!("abcd{n:04}-0000-4000-8000-000000000000");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ca = std::fs::read(c.ca.as_ref().unwrap()).unwrap();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        let ch = tls_channel(&c.addr, tls).await.unwrap();
        for (n, token) in [(1, &acme), (2, &acme), (3, &bravo)] {
            let mut req = tonic::Request::new(pb::SubmitJobRequest {
                kind: pb::JobKind::Finetune as i32,
                gpus: 1,
                command: vec!["sleep".into(), "600".into()],
                request_id: made(n),
                hold: true,
                ..Default::default()
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            pb::job_service_client::JobServiceClient::new(ch.clone())
                .submit(req)
                .await
                .unwrap();
        }
    });
    // bravo has one job under "abcd": the prefix is its, unambiguous; none
    // of acme's ids shows.
    assert_eq!(c.json_as(&bravo, &["job", "get", "abcd"])["id"], made(3));
    // acme has two: ambiguous, naming only its own.
    let err = c.fails_as(Some(&acme), &["job", "get", "abcd"]);
    assert!(err.contains("ambiguous") && err.contains(&made(1)) && err.contains(&made(2)));
    assert!(!err.contains(&made(3)), "{err}");
    // The operator sees all three.
    let err = c.fails(&["job", "get", "abcd"]);
    assert!(err.contains("3 ids"), "{err}");
    // A longer prefix, with or without the dash.
    assert_eq!(c.json_as(&acme, &["job", "get", "abcd0001"])["id"], made(1));
    assert_eq!(
        c.json_as(&acme, &["job", "get", "abcd0002-00"])["id"],
        made(2)
    );
    // Too short, or not hex: refused, whoever asks.
    for bad in ["0", "abc", "zzzz", ""] {
        let err = c.fails(&["job", "get", bad]);
        assert!(err.contains("id:"), "{bad:?}: {err}");
    }
    // bravo cannot reach acme's job by prefix: it is not there for it.
    let err = c.fails_as(Some(&bravo), &["job", "cancel", "abcd0001"]);
    assert!(err.contains("does not exist"), "{err}");
    // Every command takes a prefix: hold/release/cancel/logs/watch.
    c.ok_as(&acme, &["job", "release", "abcd0001"]);
    let j = poll(&c, &made(1), "ran", |j| j["state"] == "running");
    assert_eq!(j["held"], false);
    c.ok_as(&acme, &["job", "logs", "abcd0001"]);
    c.ok_as(&acme, &["job", "cancel", "abcd0001"]);
    c.wait_final(&made(1));
}

#[test]
fn hold_release_reasons_and_cancel_by_filter() {
    let c = Cluster::dev(&[]);
    let acme = c.add_member("acme");
    let bravo = c.add_member("bravo");
    let a = c.submit_as(&acme, &["--name", "prep", "--hold", "--", "true"]);
    let b = c.submit_as(&bravo, &["--name", "prep", "--", "sleep", "600"]);
    poll(&c, &b, "ran", |j| j["state"] == "running");
    // Held: pending with reason Held, not placed while GPUs are free.
    let j = c.json_as(&acme, &["job", "get", &a]);
    assert_eq!(
        (j["state"].as_str(), j["held"].as_bool()),
        (Some("pending"), Some(true))
    );
    assert_eq!(j["wait_reason"], "Held");
    let table = c.ok_as(&acme, &["job", "list"]);
    assert!(table.contains("(Held)"), "{table}");
    let table = c.ok_as(&bravo, &["job", "list"]);
    assert!(
        table.contains("local"),
        "the node of a running job: {table}"
    );
    // bravo may not hold or release acme's job, nor learn it exists.
    let err = c.fails_as(Some(&bravo), &["job", "release", &a]);
    assert!(err.contains("another member"), "{err}");
    assert_eq!(c.job(&a)["held"], true);
    // Only pending jobs are held.
    let err = c.fails_as(Some(&bravo), &["job", "hold", &b]);
    assert!(err.contains("only pending"), "{err}");
    // Released, it runs.
    c.ok_as(&acme, &["job", "release", &a]);
    assert_eq!(c.wait_final(&a)["state"], "completed");

    // Cancel by filter: refuses an empty filter, cancels only what the
    // caller may, and says what it cancelled.
    let err = c.fails_as(Some(&acme), &["job", "cancel"]);
    assert!(err.contains("--all"), "{err}");
    let a2 = c.submit_as(&acme, &["--name", "prep", "--", "sleep", "600"]);
    let a3 = c.submit_as(&acme, &["--name", "other", "--hold", "--", "sleep", "600"]);
    let out = c.ok_as(&acme, &["job", "cancel", "--name", "prep"]);
    assert!(
        out.contains(&a2) && !out.contains(&b) && !out.contains(&a3),
        "{out}"
    );
    c.wait_final(&a2);
    assert_eq!(c.job(&b)["state"], "running", "bravo's job goes on");
    assert_eq!(c.job(&a3)["state"], "pending");
    let err = c.fails_as(Some(&acme), &["job", "cancel", "--member", "bravo"]);
    assert!(err.contains("may not"), "{err}");
    // Several ids at once; the operator by member and state.
    let out = c.ok(&["job", "cancel", "--member", "acme", "--state", "pending"]);
    assert!(out.contains(&a3), "{out}");
    assert_eq!(c.job(&a3)["state"], "cancelled");
    // Cancelling is idempotent (the CLI may send it again after a timeout):
    // a job cancelled already is what was asked; one that completed is not.
    let again = c.json_as(&acme, &["job", "cancel", &a3]);
    assert_eq!(again["state"], "cancelled", "{again}");
    let err = c.fails_as(Some(&acme), &["job", "cancel", &a]);
    assert!(err.contains("already ended (Completed)"), "{err}");
    let out = c.ok(&["job", "cancel", &b, &a3]);
    assert!(out.contains(&b), "{out}");
    c.wait_final(&b);
}

#[test]
fn dependencies_wait_and_cancel_down_the_line() {
    let c = Cluster::dev(&[]);
    let acme = c.add_member("acme");
    let bravo = c.add_member("bravo");
    let first = c.submit_as(&acme, &["--", "sh", "-c", "sleep 1; exit 3"]);
    let then = c.submit_as(
        &acme,
        &["--dependency", &format!("afterok:{first}"), "--", "true"],
    );
    let after = c.submit_as(
        &acme,
        &["--dependency", &format!("afterok:{then}"), "--", "true"],
    );
    let anyway = c.submit_as(
        &acme,
        &[
            "--dependency",
            &format!("afterany:{}", &first[..8]),
            "--",
            "true",
        ],
    );
    let j = c.json_as(&acme, &["job", "get", &then]);
    assert_eq!(j["wait_reason"], "Dependency");
    // first fails: then is cancelled with the reason, and after in turn;
    // afterany runs regardless.
    assert_eq!(c.wait_final(&first)["state"], "failed");
    let j = c.wait_final(&then);
    assert_eq!(j["state"], "cancelled");
    assert_eq!(j["reason"], format!("dependency {first} failed"));
    let j = c.wait_final(&after);
    assert_eq!(j["reason"], format!("dependency {then} was cancelled"));
    assert_eq!(c.wait_final(&anyway)["state"], "completed");
    // On a completed job: satisfied.
    let ok = c.submit_as(
        &acme,
        &["--dependency", &format!("afterok:{anyway}"), "--", "true"],
    );
    assert_eq!(c.wait_final(&ok)["state"], "completed");

    // Refused at submission, naming the field: another member's job (as if
    // it did not exist), no such job, a job that already failed, bad syntax.
    let before = c.json(&["job", "list"]).as_array().unwrap().len();
    for (dep, want) in [
        (format!("afterok:{ok}"), "dependency:"),
        (
            "afterok:00000000-0000-4000-8000-000000000000".into(),
            "dependency:",
        ),
        ("afternotok:1234".into(), "dependency:"),
        ("afterok:".into(), "dependency:"),
    ] {
        let err = c.fails_as(
            Some(&bravo),
            &["job", "submit", "--dependency", &dep, "--", "true"],
        );
        assert!(err.contains(want), "{dep}: {err}");
    }
    let err = c.fails_as(
        Some(&acme),
        &[
            "job",
            "submit",
            "-d",
            &format!("afterok:{first}"),
            "--",
            "true",
        ],
    );
    assert!(
        err.contains("dependency:") && err.contains("never"),
        "{err}"
    );
    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), before);
}

#[test]
fn arrays_run_each_task_with_its_index_and_are_bounded() {
    let c = Cluster::dev(&[]);
    let acme = c.add_member("acme");
    let array = c.submit_as(
        &acme,
        &[
            "--array",
            "0-3%2",
            "--name",
            "sweep",
            "--",
            "sh",
            "-c",
            "echo task=$COOP_ARRAY_TASK_ID array=$COOP_ARRAY_JOB_ID",
        ],
    );
    let tasks = c.json_as(&acme, &["job", "list", "--array", &array[..8]]);
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 4);
    for t in tasks {
        assert_eq!(t["array_id"], array.as_str());
        assert_eq!(t["array_limit"], 2);
        assert_eq!(t["name"], "sweep");
        let n = t["array_task"].as_u64().unwrap();
        // ARRAY_TASK names the task.
        let id = t["id"].as_str().unwrap();
        let j = c.json_as(&acme, &["job", "get", &format!("{}_{n}", &array[..8])]);
        assert_eq!(j["id"], id);
        assert_eq!(c.wait_final(id)["state"], "completed");
        let log = c.logs(id);
        assert_eq!(log.trim(), format!("task={n} array={array}"));
    }
    // Tasks start in index order, two at a time: 0 and 1 before 2 and 3.
    let started = |n: u32| {
        let j = c.json_as(&acme, &["job", "get", &format!("{}_{n}", &array[..8])]);
        ms(&j["started_at"])
    };
    assert!(
        started(0).max(started(1)) <= started(2).min(started(3)),
        "tasks 2 or 3 started before 0 and 1"
    );
    // The array's id names all its tasks: get refuses, cancel takes all.
    let err = c.fails_as(Some(&acme), &["job", "get", &array]);
    assert!(err.contains("array of 4 tasks"), "{err}");
    let big = c.submit_as(&acme, &["--array", "0-9", "--hold", "--", "true"]);
    let out = c.ok_as(&acme, &["job", "cancel", &big]);
    assert_eq!(out.lines().count(), 10, "{out}");
    assert!(out.lines().all(|l| l.ends_with("cancelled")), "{out}");

    // Bounded; a member cannot forge the variables.
    let before = c.json(&["job", "list"]).as_array().unwrap().len();
    for bad in ["0-999999999", "0-10000", "5-1", "x", "0-3%0"] {
        let err = c.fails_as(
            Some(&acme),
            &["job", "submit", "--array", bad, "--", "true"],
        );
        assert!(err.contains("array:"), "{bad}: {err}");
    }
    let err = c.fails_as(
        Some(&acme),
        &[
            "job",
            "submit",
            "--env",
            "COOP_ARRAY_TASK_ID=7",
            "--",
            "true",
        ],
    );
    assert!(err.contains("env:"), "{err}");
    // Within the policy's max_pending.
    c.ok(&["policy", "set", "max_pending=5", "--reason", "test"]);
    let err = c.fails_as(
        Some(&acme),
        &["job", "submit", "--array", "0-5", "--", "true"],
    );
    assert!(err.contains("max_pending"), "{err}");
    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), before);
}

#[test]
fn a_drained_node_takes_nothing_new_until_resumed() {
    let c = Cluster::dev(&[]);
    let bravo = c.add_member("bravo");
    let long = c.submit(&["--grace", "1s", "--", "sleep", "600"]);
    poll(&c, &long, "ran", |j| j["state"] == "running");
    // Only the operator or the node's owner.
    let err = c.fails_as(Some(&bravo), &["node", "drain", "local"]);
    assert!(err.contains("only machines it owns"), "{err}");
    let err = c.fails(&["node", "drain", "nowhere"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = c.fails(&["node", "drain", "local", "--reason", "bad\u{7}"]);
    assert!(err.contains("reason:"), "{err}");
    assert!(c.json(&["node", "list"])[0]["drain"].is_null());

    let out = c.ok(&["node", "drain", "local", "--reason", "swap PSU"]);
    assert!(out.contains("draining (swap PSU)"), "{out}");
    let n = &c.json(&["node", "list"])[0];
    assert_eq!(
        (n["drain"].as_str(), n["drain_reason"].as_str()),
        (Some("draining"), Some("swap PSU"))
    );
    // Running jobs go on; new ones wait.
    let new = c.submit(&["--", "true"]);
    let j = poll(&c, &new, "waited for resources", |j| {
        j["wait_reason"] == "Resources"
    });
    assert_eq!(j["state"], "pending");
    assert_eq!(c.job(&long)["state"], "running");
    // --now: requeued, not failed.
    let out = c.ok(&["node", "drain", "local", "--now"]);
    assert!(out.contains(&long), "{out}");
    let j = poll(&c, &long, "was requeued", |j| j["state"] == "pending");
    assert_eq!(j["attempts"], 1);
    assert!(j["reason"].as_str().unwrap().contains("drained"), "{j}");
    let n = &c.json(&["node", "list"])[0];
    assert_eq!(n["drain"], "drained");
    assert_eq!(c.ok(&["node", "resume", "local"]).trim(), "local: resumed");
    assert_eq!(c.wait_final(&new)["state"], "completed");
    poll(&c, &long, "ran again", |j| {
        j["state"] == "running" && j["attempts"] == 2
    });
    c.ok(&["job", "cancel", &long]);
    c.wait_final(&long);
}
