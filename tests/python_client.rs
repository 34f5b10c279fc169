//! The Python example client (`examples/python/`), with stubs generated from
//! `proto/` by grpcio-tools, against a live `coop dev` cluster.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn a_member_submits_watches_and_reads_usage_from_python() {
    if !require_tool(
        "python3",
        &["-c", "import grpc, grpc_tools"],
        "python3 -m pip install grpcio grpcio-tools",
    ) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // As the script's docstring says: `examples/python/make-stubs stubs`,
    // into a directory that does not exist yet.
    let doc = std::fs::read_to_string(root.join("examples/python/coop_client.py")).unwrap();
    assert!(
        doc.contains("examples/python/make-stubs stubs"),
        "the docstring changed"
    );
    let work = tempfile::tempdir().unwrap();
    let protoc = Command::new("sh")
        .arg(root.join("examples/python/make-stubs"))
        .arg("stubs")
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "{}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let stubs = work.path().join("stubs");

    let c = Cluster::dev(&[]);
    let acme = c.add_member("acme");
    let run = |token: &str| {
        Command::new("python3")
            .arg(root.join("examples/python/coop_client.py"))
            .args(["--", "sh", "-c", "echo hello from python; sleep 1"])
            .env("PYTHONPATH", &stubs)
            .env("COOP_ADDR", &c.addr)
            .env("COOP_CA", c.ca.as_ref().unwrap())
            .env("COOP_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = run(&acme);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["state"], "completed", "{got:#}");
    assert_eq!(got["exit_code"], 0);
    assert_eq!(got["member"], "acme");
    assert!(
        stderr.contains("JOB_STATE_RUNNING"),
        "it watched the job run: {stderr}"
    );

    // The cluster agrees with what the client saw.
    let id = got["id"].as_str().unwrap();
    let job = c.json_as(&acme, &["job", "get", id]);
    assert_eq!(job["state"], "completed");
    assert_eq!(got["gpu_seconds"], job["gpu_seconds"]);
    assert!(c.logs(id).contains("hello from python"));
    let usage = c.json_as(&acme, &["usage"]);
    assert_eq!(
        got["usage"]["gpu_seconds"],
        usage["members"][0]["gpu_seconds"]
    );
    assert_eq!(got["usage"]["finished_jobs"], 1);

    // A bad credential is refused with the gRPC code, and nothing is submitted.
    let out = run("coop_not_a_token");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert_eq!(c.json(&["job", "list"]).as_array().unwrap().len(), 1);
}
