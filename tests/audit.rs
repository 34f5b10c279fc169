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
    assert_eq!(
        &kinds[..3],
        ["member_added", "member_added", "policy_changed"],
        "{kinds:?}"
    );
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
