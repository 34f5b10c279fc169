//! Finished jobs leave the scheduler's memory after the policy's
//! `job_retention` and are read from its store from then on, end to end
//! against `coop dev`: `job get` and `job logs` by id, `job list --since`,
//! the usage figures (the same before and after), and a request id that was
//! an old job's is refused rather than made a second job under one id.

mod common;

use std::time::{Duration, Instant};

use common::*;
use coop_proto::v1 as pb;
use serde_json::Value;
use tonic::transport::{Certificate, ClientTlsConfig};

fn listed(v: &Value, id: &str) -> bool {
    v.as_array().unwrap().iter().any(|j| j["id"] == id)
}

/// The figures of `member` in a usage answer.
fn figures(v: &Value, member: &str) -> Value {
    let m = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["member"] == member)
        .unwrap();
    serde_json::json!([m["gpu_seconds"], m["energy_j"], m["finished_jobs"]])
}

#[test]
fn a_job_that_left_memory_is_read_from_the_store() {
    let c = Cluster::dev(&["--gpus", "sim:2xA100-80GB"]);
    c.ok(&["policy", "set", "job_retention=1s", "--reason", "test"]);
    let id = c.submit(&["--gpus", "1", "--", "sh", "-c", "echo kept; sleep 1"]);
    let done = c.wait_final(&id);
    assert_eq!(done["state"], "completed", "{done:#}");
    let window = ["usage", "--since", "1h", "--to", "2100-01-01T00:00:00Z"];
    let before = figures(&c.json(&window), "default");
    assert_eq!(before[2], 1, "{before}");

    // A job leaves memory when a command comes a retention after it ended:
    // the held jobs submitted here are those commands.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut nudges = Vec::new();
    while listed(&c.json(&["job", "list"]), &id) {
        assert!(Instant::now() < deadline, "job {id} never left memory");
        nudges.push(c.submit(&["--hold", "--", "true"]));
        std::thread::sleep(Duration::from_millis(300));
    }

    // By id: the same job, from the store.
    let got = c.job(&id);
    assert_eq!((&got["id"], &got["state"]), (&done["id"], &done["state"]));
    assert_eq!(got["gpu_seconds"], done["gpu_seconds"]);
    assert!(c.logs(&id).contains("kept"), "its log is still on its node");
    // A prefix names only jobs in memory.
    let err = c.fails(&["job", "get", &id[..8]]);
    assert!(err.contains("does not exist"), "{err}");
    // Listed again with a window that reaches back to it (as sacct does).
    assert!(listed(&c.json(&["job", "list", "--since", "1h"]), &id));
    let page = c.json(&["job", "list", "--since", "1h", "--state", "completed"]);
    assert!(listed(&page, &id), "{page:#}");
    let none = c.json(&["job", "list", "--since", "1h", "--state", "failed"]);
    assert!(!listed(&none, &id));
    // The usage figures count it once, as before.
    let after = figures(&c.json(&window), "default");
    assert_eq!(after, before);

    // Its id cannot be given to a new submission.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let ca = std::fs::read(c.ca.as_ref().unwrap()).unwrap();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        let ch = tls_channel(&c.addr, tls).await.unwrap();
        let mut req = tonic::Request::new(pb::SubmitJobRequest {
            kind: pb::JobKind::Finetune as i32,
            gpus: 1,
            command: vec!["true".into()],
            request_id: id.clone(),
            ..Default::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", c.token).parse().unwrap(),
        );
        pb::job_service_client::JobServiceClient::new(ch)
            .submit(req)
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    assert!(
        status.message().contains("left the scheduler's memory"),
        "{status:?}"
    );
    assert_eq!(c.job(&id)["state"], "completed", "the old job is untouched");
    assert!(!nudges.is_empty());
}
