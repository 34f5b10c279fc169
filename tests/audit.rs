//! The hash-chained audit ledger end to end: export (JSON lines, CSV, a
//! period), verification of the live cluster and of files, and tampering
//! caught and named.

mod common;

use common::*;
use serde_json::Value;

fn verify_file(c: &Cluster, path: &std::path::Path) -> std::process::Output {
    c.run(&["audit", "verify", "--file", path.to_str().unwrap()])
}

#[test]
fn the_ledger_exports_verifies_and_names_the_first_tampered_entry() {
    let c = Cluster::dev(&["--usage-interval", "300ms"]);
    let acme = c.add_member("acme");
    c.ok(&["policy", "set", "share.acme=2", "--reason", "acme's vote"]);
    let id = c.submit_as(&acme, &["--gpus", "2", "--", "sleep", "1"]);
    c.wait_final(&id);

    let lines: Vec<Value> = c
        .ok(&["audit", "export"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    // The default member, the local machine's enrollment and join, acme, the vote.
    assert_eq!(
        &kinds[..5],
        [
            "member_added",
            "account_changed",
            "account_changed",
            "member_added",
            "policy_changed"
        ],
        "{kinds:?}"
    );
    assert_eq!(lines[1]["account"], "node:local");
    assert_eq!(lines[1]["change"], "enrolled");
    assert_eq!(lines[2]["change"], "joined");
    assert!(
        kinds.iter().filter(|k| **k == "usage").count() >= 2,
        "usage in intervals: {kinds:?}"
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64 + 1);
    }
    // The usage entries add up to what the job was billed.
    let job = c.json_as(&acme, &["job", "get", &id]);
    let billed: u64 = lines
        .iter()
        .filter(|l| l["kind"] == "usage" && l["job"] == id.as_str())
        .map(|l| l["gpu_ms"].as_u64().unwrap())
        .sum();
    assert_eq!(billed as f64 / 1000.0, job["gpu_seconds"].as_f64().unwrap());

    let live = c.ok(&["audit", "verify"]);
    let head = lines.last().unwrap()["hash"].as_str().unwrap().to_string();
    assert!(live.contains(&head), "{live}");

    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("ledger.jsonl");
    std::fs::write(&jsonl, c.ok(&["audit", "export"])).unwrap();
    let csv = dir.path().join("ledger.csv");
    std::fs::write(&csv, c.ok(&["audit", "export", "--format", "csv"])).unwrap();
    for f in [&jsonl, &csv] {
        let out = verify_file(&c, f);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&head));
    }

    // Someone lowers a usage entry in the JSON lines export.
    let usage_seq = lines.iter().find(|l| l["kind"] == "usage").unwrap()["seq"]
        .as_u64()
        .unwrap();
    let tampered: Vec<String> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if v["seq"] == usage_seq {
                v["gpu_ms"] = serde_json::json!(1);
            }
            v.to_string()
        })
        .collect();
    std::fs::write(&jsonl, tampered.join("\n")).unwrap();
    let out = verify_file(&c, &jsonl);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("entry {usage_seq}:")), "{err}");

    // ... or drops a row of the CSV export.
    let text = std::fs::read_to_string(&csv).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, l)| l)
        .collect();
    std::fs::write(&csv, kept.join("\n")).unwrap();
    let out = verify_file(&c, &csv);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("entry 3:") && err.contains("follows entry 1"),
        "{err}"
    );

    // A period verifies on its own; auditing is the operator's.
    let future = c.ok(&["audit", "export", "--from", "2100-01-01T00:00:00Z"]);
    assert!(future.trim().is_empty(), "{future}");
    let err = c.fails_as(Some(&acme), &["audit", "export"]);
    assert!(err.contains("PermissionDenied"), "{err}");
}

#[test]
fn a_statement_shows_use_by_model_preemptions_contribution_and_balance() {
    let c = Cluster::dev(&["--usage-interval", "300ms"]);
    let acme = c.add_member("acme");
    let beta = c.add_member("beta");
    c.ok(&[
        "policy",
        "set",
        "share.default=0",
        "min_runtime=0s",
        "preempt_grace=1s",
        "weight.A100-80GB=2",
        "--reason",
        "statement test",
    ]);
    let floods = c.flood(&acme, 4, 4);
    let mine = c.submit_as(&beta, &["--gpus", "2", "--", "sleep", "1"]);
    c.wait_final(&mine);
    c.cancel_all(&floods);

    let month = |who: &str| {
        let now = std::time::SystemTime::now();
        let stamp = humantime::format_rfc3339(now).to_string();
        c.json(&[
            "usage",
            "statement",
            "--member",
            who,
            "--period",
            &stamp[..7],
        ])
    };
    let a = month("acme");
    let b = month("beta");
    let d = month("default");
    assert_eq!(a["preemptions_suffered"], 2, "{a:#}");
    assert_eq!(a["preemptions_caused"], 0);
    assert_eq!(b["preemptions_caused"], 2, "{b:#}");
    assert_eq!(a["jobs"], 4);
    assert_eq!(b["jobs"], 1);
    // Usage by model, weighted by the policy: 2 units per A100 GPU-hour.
    let bm = &b["by_model"][0];
    assert_eq!(bm["model"], "A100-80GB");
    let job = c.job(&mine);
    let gpu_h = job["gpu_seconds"].as_f64().unwrap() / 3600.0;
    assert!(
        (bm["gpu_hours"].as_f64().unwrap() - gpu_h).abs() < 1e-9,
        "{b:#}"
    );
    assert!(
        (b["units"].as_f64().unwrap() - 2.0 * gpu_h).abs() < 1e-9,
        "{b:#}"
    );
    assert!(b["energy_kwh"].as_f64().unwrap() > 0.0);
    // Members without nodes contributed nothing: their balance is what they used.
    assert_eq!(b["contributed_gpu_hours"], 0.0);
    assert!((b["balance_units"].as_f64().unwrap() + b["units"].as_f64().unwrap()).abs() < 1e-9);
    // The node's owner contributed its four GPUs for as long as the node was up.
    let contributed = d["contributed_gpu_hours"].as_f64().unwrap();
    let up_h =
        (ms(&d["as_of"]) - ms(&c.json(&["node", "list"])[0]["registered_at"])) as f64 / 3_600_000.0;
    assert!(
        (contributed - 4.0 * up_h).abs() < 4.0 * 2.0 / 3600.0,
        "{contributed} vs {up_h}"
    );
    assert!(d["balance_units"].as_f64().unwrap() > 0.0);

    // CSV: one row per model and a total; a member reads only its own.
    let csv = c.ok_as(
        &beta,
        &["usage", "statement", "--period", "2026-11", "--csv"],
    );
    assert!(
        csv.starts_with("member,from,to,model,gpu_hours,units,energy_kwh"),
        "{csv}"
    );
    assert!(csv.lines().last().unwrap().starts_with("beta,") && csv.contains(",total,"));
    let err = c.fails_as(
        Some(&beta),
        &[
            "usage",
            "statement",
            "--member",
            "acme",
            "--period",
            "2026-11",
        ],
    );
    assert!(err.contains("PermissionDenied"), "{err}");
    let err = c.fails(&[
        "usage",
        "statement",
        "--member",
        "acme",
        "--period",
        "11-2026",
    ]);
    assert!(err.contains("period"), "{err}");
}

#[test]
fn policy_changes_can_require_member_approvals() {
    let c = Cluster::dev(&[]);
    let a = c.add_voter("a");
    let b = c.add_voter("b");
    c.ok(&[
        "policy",
        "set",
        "approvals=2",
        "--reason",
        "the assembly decides",
    ]);
    let err = c.fails(&["policy", "set", "share.a=3", "--reason", "operator alone"]);
    assert!(
        err.contains("approval") && err.contains("FailedPrecondition"),
        "{err}"
    );

    let p = c.json_as(
        &a,
        &[
            "policy",
            "propose",
            "share.a=3",
            "--reason",
            "a doubled its GPUs",
        ],
    );
    let id = p["id"].as_u64().unwrap().to_string();
    assert_eq!(p["state"], "open");
    assert_eq!(p["by"], "a");
    assert_eq!(p["required"], 2);
    let err = c.fails(&["policy", "approve", &id]);
    assert!(
        err.contains("PermissionDenied"),
        "the operator has no vote: {err}"
    );
    let p = c.json_as(&a, &["policy", "approve", &id]);
    assert_eq!(p["state"], "open");
    assert_eq!(
        c.json(&["policy", "show"])["settings"]["share.a"],
        Value::Null
    );
    let p = c.json_as(&b, &["policy", "approve", &id]);
    assert_eq!(p["state"], "enacted");
    let shown = c.json(&["policy", "show"]);
    assert_eq!(shown["settings"]["share.a"], "3");
    let last = shown["changes"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["by"].as_str().unwrap().contains("approved by a, b"),
        "{last:#}"
    );
    let list = c.json(&["policy", "proposals"]);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let kinds: Vec<String> = c
        .ok(&["audit", "export"])
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let n = kinds.len();
    assert_eq!(
        kinds[n - 4..],
        [
            "policy_proposed",
            "policy_approved",
            "policy_approved",
            "policy_changed"
        ]
    );
    assert!(c.ok(&["audit", "verify"]).starts_with("verified"));
}

/// Edits, in a stopped scheduler's raft log, every committed command whose
/// JSON contains `from`, as someone with the disk could; returns how many.
fn rewrite_log(db: &std::path::Path, from: &str, to: &str) -> usize {
    use protobuf::Message as _;
    use sqlx::Connection as _;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("sqlite://{}", db.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT idx, entry FROM raft_entries")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let mut edited = 0;
        for (idx, bytes) in rows {
            let mut e = raft::eraftpb::Entry::parse_from_bytes(&bytes).unwrap();
            let Ok(text) = std::str::from_utf8(&e.data) else {
                continue;
            };
            if !text.contains(from) {
                continue;
            }
            e.data = text.replace(from, to).into_bytes().into();
            sqlx::query("UPDATE raft_entries SET entry = ? WHERE idx = ?")
                .bind(e.write_to_bytes().unwrap())
                .bind(idx)
                .execute(&mut conn)
                .await
                .unwrap();
            edited += 1;
        }
        conn.close().await.unwrap();
        edited
    })
}

#[test]
fn a_history_rewritten_offline_is_caught_by_a_head_saved_before() {
    let mut s = Split::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let save = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let c = &s.c;
    let auditor = c.json(&["auditor", "add", "ledger-watch"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let acme = c.add_member("acme");
    // A member keeps heads as a witness (it may not export the chain).
    let early = save(
        "early.json",
        c.ok_as(&acme, &["audit", "head", "-o", "json"]),
    );
    c.ok(&["policy", "set", "share.acme=3", "--reason", "acme's vote"]);
    let saved = save(
        "saved.json",
        c.ok_as(&acme, &["audit", "head", "-o", "json"]),
    );
    let saved_head: Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let saved_seq = saved_head["seq"].as_u64().unwrap();
    let export = save("export.jsonl", c.ok(&["audit", "export"]));
    let err = c.fails_as(Some(&acme), &["audit", "export"]);
    assert!(err.contains("PermissionDenied"), "{err}");

    // Honest history goes on: the saved heads still hold, and a later one too.
    c.add_member("beta");
    let later = save(
        "later.json",
        c.ok_as(&auditor, &["audit", "head", "-o", "json"]),
    );
    for head in [&early, &saved, &later] {
        let out = c.ok_as(&auditor, &["audit", "verify", "--since", head]);
        assert!(out.contains("it extends the saved head"), "{out}");
    }
    let v = c.json_as(&auditor, &["audit", "verify", "--since", &saved]);
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["since"]["seq"], saved_seq);
    // ... and offline, against the export made when it was saved.
    let out = c.ok_as(
        &acme,
        &["audit", "verify", "--file", &export, "--since", &saved],
    );
    assert!(out.contains("it extends the saved head"), "{out}");

    // A head file edited to claim another history fails its signature.
    let mut forged = saved_head.clone();
    forged["hash"] = Value::String("ab".repeat(32));
    let forged = save("forged.json", forged.to_string());
    let err = c.fails_as(Some(&auditor), &["audit", "verify", "--since", &forged]);
    assert!(
        err.contains("forged.json: signature: does not match"),
        "{err}"
    );
    // A chain cut short of the head is called truncated.
    let text = std::fs::read_to_string(&export).unwrap();
    let short = save(
        "short.jsonl",
        text.lines()
            .take(saved_seq as usize - 1)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let err = c.fails_as(
        Some(&auditor),
        &["audit", "verify", "--file", &short, "--since", &saved],
    );
    assert!(
        err.contains(&format!("entry {saved_seq}:")) && err.contains("truncated"),
        "{err}"
    );

    // The operator stops the scheduler and rewrites the reason of the policy
    // change in its raft log; replayed, the chain is different from there on.
    s.scheduler.stop();
    let db = s.c.dir.path().join("scheduler/scheduler.db");
    assert_eq!(rewrite_log(&db, "acme's vote", "the operator's whim"), 1);
    s.restart_scheduler();
    let c = &s.c;
    let policy = c.json(&["policy", "show"]);
    assert_eq!(
        policy["changes"][0]["reason"], "the operator's whim",
        "{policy:#}"
    );
    // Its store held the chain as it was: the replay says it differs.
    let said = s.scheduler.stderr();
    assert!(
        said.contains("replaying the raft log made audit record")
            && said.contains("changed outside coop"),
        "{said}"
    );
    let c = &s.c;

    // The rewritten chain is consistent in itself: without a head, it passes.
    assert!(
        c.ok_as(&auditor, &["audit", "verify"])
            .starts_with("verified")
    );
    // A head saved after the rewritten entry catches it, naming the entry.
    for head in [&saved, &later] {
        let seq =
            serde_json::from_str::<Value>(&std::fs::read_to_string(head).unwrap()).unwrap()["seq"]
                .as_u64()
                .unwrap();
        let err = c.fails_as(Some(&auditor), &["audit", "verify", "--since", head]);
        assert!(
            err.contains(&format!("entry {seq}:"))
                && err.contains(&format!(
                    "the history at or before entry {seq} was rewritten"
                )),
            "{err}"
        );
    }
    let out = c.run_as(
        Some(&auditor),
        &["audit", "verify", "--since", &saved, "-o", "json"],
    );
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v:#}");
    assert_eq!(v["seq"], saved_seq);
    assert!(v["error"].as_str().unwrap().contains("rewritten"), "{v:#}");
    // What came before the rewritten entry is intact, and says so.
    let out = c.ok_as(&auditor, &["audit", "verify", "--since", &early]);
    assert!(out.contains("it extends the saved head"), "{out}");
    assert!(!out.contains("note:"), "{out}");

    // A scheduler whose signing key was replaced is pointed out.
    s.scheduler.stop();
    std::fs::remove_file(s.c.dir.path().join("scheduler/audit-signing.pk8")).unwrap();
    s.restart_scheduler();
    let out = s.c.ok_as(&auditor, &["audit", "verify", "--since", &early]);
    assert!(
        out.contains("note: scheduler 1 now signs with key"),
        "{out}"
    );
}
