//! Unix manners of the `coop` binary: a closed pipe, colour, `--output json`,
//! durations with units, client flags, and running time in `coop usage`.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `coop args` against the cluster with its stdout a pipe that is
/// closed before it writes: it must end as `ls | head` does (quietly, by
/// SIGPIPE or with success), never with a panic.
fn with_closed_stdout(c: &Cluster, args: &[&str]) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("COOP_ADDR", &c.addr)
        .env("COOP_TOKEN", &c.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.with_ca(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    // The read end goes before the command has even connected.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "coop {args:?} panicked: {err}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc_sigpipe()),
        "coop {args:?} ended with {}: {err}",
        out.status
    );
    assert!(err.trim().is_empty(), "coop {args:?} said: {err}");
}

fn libc_sigpipe() -> i32 {
    nix::sys::signal::Signal::SIGPIPE as i32
}

#[test]
fn clients_end_quietly_on_a_closed_pipe_and_daemon_logs_carry_no_colour() {
    let c = Cluster::dev(&[]);
    for _ in 0..3 {
        c.submit(&["--", "true"]);
    }
    with_closed_stdout(&c, &["job", "list"]);
    with_closed_stdout(&c, &["cluster", "status"]);
    with_closed_stdout(&c, &["audit", "export"]);
    with_closed_stdout(&c, &["job", "list", "-o", "json"]);
    // The daemon, still serving, kept ignoring SIGPIPE; its log went to a
    // file, so it has no escape sequences (nor would it with NO_COLOR).
    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), 3);
    let log = c.daemons[0].stderr();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains("\x1b["), "ANSI escapes in a log file:\n{log}");
}

#[test]
fn output_json_everywhere_or_a_clear_refusal() {
    let c = Cluster::dev(&[]);
    let id = c.submit(&["--", "echo", "hello"]);
    c.wait_job(&id, "ended", is_final);
    // Client flags before the subcommand, after it, or between.
    let before = c.ok(&["-o", "json", "job", "list"]);
    let between = c.ok(&["job", "-o", "json", "list"]);
    let after = c.ok(&["job", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    assert_eq!(before, between);
    assert_eq!(before, after);
    // Also before a subcommand's own subcommand.
    let st = c.ok(&[
        "usage",
        "-o",
        "json",
        "statement",
        "--member",
        "default",
        "--period",
        "2026-11",
    ]);
    serde_json::from_str::<serde_json::Value>(&st).unwrap();
    // A wrong --addr before the subcommand is used unless given again after it.
    let out = c.run(&["--addr", "http://127.0.0.1:1", "job", "list"]);
    assert!(!out.status.success());
    let ok = c.run(&[
        "--addr",
        "http://127.0.0.1:1",
        "job",
        "list",
        "--addr",
        &c.addr,
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let err = c.fails(&["job", "logs", &id, "-o", "json"]);
    assert!(err.contains("output:"), "{err}");
    let err = c.fails(&["audit", "export", "--format", "csv", "-o", "json"]);
    assert!(err.contains("output:"), "{err}");
    c.ok(&["auditor", "add", "books"]);
    assert_eq!(c.json(&["auditor", "remove", "books"])["removed"], true);
    let lines = c.ok(&["audit", "export", "-o", "json"]);
    for l in lines.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    // Daemons and offline commands take no client flags.
    let out = Command::new(BIN)
        .args(["--token", "x", "ca", "init", "--dir"])
        .arg(c.dir.path().join("ca"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(BIN).args(["dev", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("--listen") && !help.contains("--token"),
        "{help}"
    );
}

#[test]
fn durations_need_a_unit() {
    // No cluster needed: these are refused before anything is sent...
    for args in [
        &["job", "submit", "--grace", "30", "--", "true"][..],
        &["member", "add", "acme", "--expires", "90"],
        &["node", "enroll", "n1", "--owner", "acme", "--ttl", "60"],
        &["usage", "--since", "24"],
        &[
            "simulate",
            "--trace",
            "t.csv",
            "--out",
            "o",
            "--half-life",
            "7",
        ],
        &[
            "simulate",
            "--trace",
            "t.csv",
            "--out",
            "o",
            "--min-runtime",
            "300",
        ],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env("COOP_TOKEN", "x")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "coop {args:?}: {err}");
        assert!(err.contains("unit"), "coop {args:?}: {err}");
    }
    // ...and the policy's durations are checked by the scheduler.
    let c = Cluster::dev(&[]);
    for key in ["half_life", "min_runtime", "preempt_grace", "max_grace"] {
        let err = c.fails(&["policy", "set", &format!("{key}=7"), "--reason", "r"]);
        assert!(
            err.contains(key) && err.contains("7 needs a unit (e.g. 7d"),
            "{err}"
        );
    }
    c.ok(&["policy", "set", "half_life=7d", "--reason", "r"]);
}

#[test]
fn usage_counts_running_time_in_units_as_in_gpu_hours() {
    // Reports only every hour: all of a running job's time is unreported.
    let c = Cluster::dev(&["--usage-interval", "1h"]);
    let id = c.submit(&["--gpus", "2", "--", "sleep", "60"]);
    c.wait_job(&id, "running", |j| j["started_at"].is_string());
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + PATIENCE;
    let m = loop {
        let u = c.json(&["usage"]);
        let m = u["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["running_jobs"] == 1)
            .cloned();
        if let Some(m) = m.filter(|m| m["gpu_seconds"].as_f64().unwrap() > 2.0) {
            break m;
        }
        assert!(Instant::now() < deadline, "no running usage: {u}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let hours = m["gpu_hours"].as_f64().unwrap();
    let units = m["units"].as_f64().unwrap();
    // The simulated A100s weigh one unit per GPU-hour.
    assert!(units > 0.0, "{m}");
    assert!((units - hours).abs() <= 1e-9 + hours * 1e-6, "{m}");
    c.ok(&["job", "cancel", &id]);
}

#[test]
fn typos_get_a_suggestion_and_a_command_without_dash_dash_a_hint() {
    let usage_error = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        err
    };
    let err = usage_error(&["job", "lsit"]);
    assert!(
        err.contains("similar subcommands exist") && err.contains("'list'"),
        "{err}"
    );
    let err = usage_error(&["job", "submit", "--gpu", "2", "--", "true"]);
    assert!(err.contains("a similar argument exists: '--gpus'"), "{err}");
    let err = usage_error(&["job", "submit", "--gpus", "2", "python", "train.py"]);
    assert!(
        err.contains("the job's command goes after --: coop job submit [OPTIONS] -- python"),
        "{err}"
    );
}
