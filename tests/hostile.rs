//! The attacks of issue 13, end to end against real `coop` processes: a
//! hostile agent forging usage, a member flooding the cluster, and an
//! operator voting with members it made up. Each now does no harm.

mod common;

use common::*;
use coop_proto::v1::{self as pb, agent_message::Msg as Up, scheduler_message::Msg as Down};
use serde_json::Value;
use tonic::Request;
use tonic::transport::{Certificate, ClientTlsConfig};

fn bearer<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn report(seq: u64, event: pb::report::Event) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Report(pb::Report {
            seq,
            event: Some(event),
        })),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A machine enrolled by member acme whose agent is a test client speaking
/// the agent RPCs: it takes a job of bravo's and reports what it likes.
#[test]
fn a_hostile_agent_cannot_bill_forged_usage_or_grow_its_gpus() {
    let c = Cluster::dev(&["--metrics", "127.0.0.1:0"]);
    let acme = c.add_member("acme");
    let bravo = c.add_member("bravo");
    let join = c.json_as(&acme, &["node", "enroll", "evil", "--owner", "acme"])["join_token"]
        .as_str()
        .unwrap()
        .to_string();
    let ca = c.ca.clone().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()));
    let channel = rt.block_on(tls_channel(&c.addr, tls)).expect("connects");
    let mut agent = pb::agent_service_client::AgentServiceClient::new(channel);
    let cred = "evil-machine-credential-0123456789abcdef";
    let gpus = |n: u32| -> Vec<pb::Gpu> {
        (0..n)
            .map(|i| pb::Gpu {
                uuid: format!("GPU-evil-{i}"),
                index: i,
                model: "EVIL-80GB".into(),
                memory_mb: 81_920,
                ..Default::default()
            })
            .collect()
    };
    let register = |agent: &mut pb::agent_service_client::AgentServiceClient<_>, n| {
        let req = pb::RegisterRequest {
            address: String::new(),
            site: String::new(),
            node: "evil".into(),
            owner: String::new(),
            gpus: gpus(n),
            session: "evil-session".into(),
        };
        rt.block_on(agent.register(bearer(cred, req)))
    };
    rt.block_on(agent.join(bearer(
        &join,
        pb::JoinRequest {
            credential_hash: coop_scheduler::auth::hash_token(cred),
        },
    )))
    .expect("joins");
    register(&mut agent, 2).expect("registers its two GPUs");
    // Growing its contributed capacity needs a new enrollment.
    let refused = register(&mut agent, 8).unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("enroll the node again"),
        "{refused:?}"
    );
    let n = c.json(&["node", "list"]);
    let evil = n
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "evil")
        .unwrap();
    assert_eq!(evil["gpus"].as_array().unwrap().len(), 2, "{evil}");

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = pb::AgentMessage {
        msg: Some(Up::Hello(pb::Hello {
            node: "evil".into(),
            session: "evil-session".into(),
        })),
    };
    rt.block_on(tx.send(hello)).unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut down = rt
        .block_on(agent.heartbeat(bearer(cred, stream)))
        .expect("heartbeat")
        .into_inner();
    let id = c.submit_as(&bravo, &["--gpu-model", "EVIL-80GB", "--", "true"]);
    let run = rt.block_on(async {
        loop {
            let m = down.message().await.unwrap().expect("stream open");
            if let Some(Down::Desired(d)) = m.msg
                && let Some(r) = d.runs.into_iter().find(|r| r.job_id == id)
            {
                return r;
            }
        }
    });
    let (job_id, attempt) = (run.job_id.clone(), run.attempt);
    let now = now_ms();
    let forged = [
        // The start of time: 57 GPU-years before the fix.
        pb::report::Event::Started(pb::RunStarted {
            job_id: job_id.clone(),
            attempt,
            at_ms: i64::MIN,
        }),
        pb::report::Event::Started(pb::RunStarted {
            job_id: job_id.clone(),
            attempt,
            at_ms: now,
        }),
        // A year ahead of the scheduler's clock.
        pb::report::Event::Usage(pb::RunUsage {
            job_id: job_id.clone(),
            attempt,
            to_ms: now + 365 * 24 * 3600 * 1000,
            energy_mj: 0,
        }),
        // 277,777 kWh in an instant.
        pb::report::Event::Usage(pb::RunUsage {
            job_id: job_id.clone(),
            attempt,
            to_ms: now,
            energy_mj: 1_000_000_000_000_000,
        }),
        pb::report::Event::Exited(pb::RunExited {
            job_id: job_id.clone(),
            attempt,
            at_ms: now,
            exit_code: 0,
            energy_mj: u64::MAX,
            ..Default::default()
        }),
    ];
    for (i, e) in forged.into_iter().enumerate() {
        rt.block_on(tx.send(report(i as u64 + 1, e))).unwrap();
    }
    rt.block_on(async {
        loop {
            let m = down.message().await.unwrap().expect("stream open");
            if let Some(Down::Ack(a)) = m.msg
                && a.seq == 5
            {
                return;
            }
        }
    });
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["gpu_seconds"], 0.0, "{job}");
    assert_eq!(job["energy_j"], 0.0, "{job}");
    let usage = c.json(&["usage", "--member", "bravo"]);
    assert_eq!(usage["members"][0]["gpu_seconds"], 0.0, "{usage}");
    // The evidence: four rejected reports in the audit ledger, and a metric.
    let export = c.ok(&["audit", "export"]);
    let rejected: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "report_rejected")
        .collect();
    assert_eq!(rejected.len(), 4, "{export}");
    assert!(
        rejected
            .iter()
            .all(|r| r["node"] == "evil" && r["job"] == id.as_str())
    );
    let billed = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "usage" && r["job"] == id.as_str())
        .count();
    assert_eq!(billed, 0, "no usage of the job in the ledger: {export}");
    c.ok(&["audit", "verify"]);
    let metrics = c.daemons[0].export("COOP_METRICS");
    let (code, body) = https_get(&metrics, "/metrics", &ca, Some(&c.token));
    assert_eq!(code, 200);
    assert!(
        body.contains("coop_node_reports_rejected_total{node=\"evil\"} 4"),
        "{body}"
    );
}

/// A member floods the cluster, as in issue 13: huge commands, endless
/// graces, more than its quota, faster than the policy allows. Each is a
/// clear error naming the field, and listing never breaks.
#[test]
fn what_a_member_controls_is_bounded_and_lists_come_in_pages() {
    let c = Cluster::dev(&["--gpus", "sim:2xA100-80GB"]);
    let acme = c.add_member("acme");
    let err = |args: &[&str]| {
        let mut a = vec!["job", "submit"];
        a.extend_from_slice(args);
        c.fails_as(Some(&acme), &a)
    };
    let many: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    let mut args = vec!["--", "echo"];
    args.extend(many.iter().map(String::as_str));
    let e = err(&args);
    assert!(e.contains("command: 5001 arguments; at most 4096"), "{e}");
    let big = "x".repeat(70_000);
    let e = err(&["--", "echo", &big]);
    assert!(
        e.contains("command: the command, its arguments and its environment come to"),
        "{e}"
    );
    let e = err(&["--grace", "1h", "--", "true"]);
    assert!(
        e.contains("kill_grace: at most 10m (policy max_grace)"),
        "{e}"
    );
    let e = err(&["--env", "CUDA_VISIBLE_DEVICES=0,1", "--", "true"]);
    assert!(
        e.contains("env: CUDA_VISIBLE_DEVICES is set by the agent"),
        "{e}"
    );
    let e = err(&["--env", "1BAD=x", "--", "true"]);
    assert!(e.contains("1BAD"), "{e}");

    // Its environment reaches the run; nothing of the agent's does.
    let env_file = c.dir.path().join("job.env");
    std::fs::write(&env_file, "# settings\nexport MODEL=llama\nSTEPS=100\n").unwrap();
    let id = c.submit_as(
        &acme,
        &[
            "--env-file",
            env_file.to_str().unwrap(),
            "--env",
            "STEPS=200",
            "--",
            "sh",
            "-c",
            "echo model=$MODEL steps=$STEPS job=$COOP_JOB_ID",
        ],
    );
    let job = c.wait_final(&id);
    let out = c.logs(&id);
    assert!(
        out.contains(&format!("model=llama steps=200 job={id}")),
        "{out}"
    );
    // `coop job get` names the variables, never their values.
    assert_eq!(job["env"], serde_json::json!(["MODEL", "STEPS"]), "{job}");
    let detail = c.ok_as(&acme, &["job", "get", &id]);
    assert!(
        detail.contains("MODEL STEPS") && !detail.contains("llama"),
        "{detail}"
    );

    // A cancel ends a job that ignores SIGTERM: SIGKILL after its grace.
    let stubborn = c.submit_as(
        &acme,
        &[
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        ],
    );
    c.wait_log(&stubborn, "ready");
    c.ok_as(&acme, &["job", "cancel", &stubborn]);
    let j = c.wait_final(&stubborn);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(j["exit_code"], 137, "killed by SIGKILL: {j}");

    // A GPU quota: one GPU at a time; the second job waits and says why.
    c.ok(&[
        "policy",
        "set",
        "gpu_quota.acme=1",
        "--reason",
        "test quota",
    ]);
    let first = c.submit_as(&acme, &["--", "sleep", "600"]);
    c.wait_job(&first, "running", |j| j["state"] == "running");
    let second = c.submit_as(&acme, &["--", "sleep", "600"]);
    let e = err(&["--gpus", "2", "--", "true"]);
    assert!(
        e.contains("gpus: member acme may hold at most 1 GPUs"),
        "{e}"
    );
    let fs = c.json(&["fairshare"]);
    let waiting = fs["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == second.as_str())
        .cloned();
    let reason = waiting.expect("the second job waits")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("quota of 1"), "{reason}");
    c.cancel_all(&[first, second]);

    // Pages: jobs of 60 kB each, 70 of them (4.2 MB in all, over gRPC's
    // 4 MiB), list whole page by page; --limit stops early and says how to go on.
    let wide = "y".repeat(60_000);
    let mut ids = vec![];
    for _ in 0..70 {
        ids.push(c.submit_as(&acme, &["--priority", "-1000", "--", "echo", &wide]));
    }
    let all = c.json_as(&acme, &["job", "list"]);
    let listed: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.iter().all(|id| listed.contains(&id.as_str())),
        "every job is listed"
    );
    let out = c.run_as(Some(&acme), &["job", "list", "--limit", "10", "-o", "json"]);
    assert!(out.status.success());
    let ten: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ten.as_array().unwrap().len(), 10);
    let hint = String::from_utf8_lossy(&out.stderr).to_string();
    let token = hint
        .split("--page-token ")
        .nth(1)
        .expect("a hint to go on")
        .trim()
        .to_string();
    let rest = c.json_as(&acme, &["job", "list", "--page-token", &token]);
    // The two pages are the whole list, in order: none skipped, none twice.
    let paged: Vec<&str> = ten
        .as_array()
        .unwrap()
        .iter()
        .chain(rest.as_array().unwrap())
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(paged, listed);

    // Submissions per second: a burst of ten times the rate, then a wait.
    c.ok(&["policy", "set", "submit_rate=1", "--reason", "test rate"]);
    let mut refused = None;
    for _ in 0..40 {
        let out = c.run_as(Some(&acme), &["job", "submit", "--", "true"]);
        if !out.status.success() {
            refused = Some(String::from_utf8_lossy(&out.stderr).to_string());
            break;
        }
    }
    let e = refused.expect("refused within the burst of 10 and a little");
    assert!(
        e.contains("ResourceExhausted")
            && e.contains("submissions: member acme may submit 1 jobs a second")
            && e.contains("retry in"),
        "{e}"
    );
}

/// With approvals=2, the operator alone can no longer add members (and vote
/// with their tokens), take a member's token, or change shares.
#[test]
fn the_operator_cannot_vote_with_members_it_makes_up() {
    let c = Cluster::dev(&[]);
    // alpha votes only once it has a token of its own.
    let given = c.add_member("alpha");
    let b = c.add_voter("bravo");
    c.ok(&[
        "policy",
        "set",
        "approvals=2",
        "--reason",
        "the assembly governs",
    ]);
    let added = c.json(&["member", "add", "sock1"]);
    let proposal = added["proposal"]
        .as_u64()
        .expect("a proposal, not a member");
    let sock = added["token"].as_str().unwrap().to_string();
    let e = c.fails_as(Some(&sock), &["job", "list"]);
    assert!(
        e.contains("Unauthenticated"),
        "its token waits for the vote: {e}"
    );
    let e = c.fails(&["member", "token", "rotate", "alpha"]);
    assert!(e.contains("needs the approval of 2 members"), "{e}");
    let e = c.fails(&["policy", "set", "share.alpha=9", "--reason", "mine"]);
    assert!(e.contains("approval"), "{e}");
    let e = c.fails(&["member", "remove", "bravo"]);
    assert!(e.contains("needs the approval of 2 members"), "{e}");
    let e = c.fails(&["policy", "approve", &proposal.to_string()]);
    assert!(e.contains("PermissionDenied"), "{e}");
    // The members decide, each with a token the operator has never seen.
    let e = c.fails_as(Some(&given), &["policy", "approve", &proposal.to_string()]);
    assert!(e.contains("votes with a token of its own"), "{e}");
    let a = c.json_as(&given, &["member", "token", "rotate", "alpha"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    c.ok_as(&a, &["policy", "approve", &proposal.to_string()]);
    c.ok_as(&b, &["policy", "approve", &proposal.to_string()]);
    c.ok_as(&sock, &["job", "list"]);
    let members = c.json(&["member", "list"]);
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "sock1"),
        "{members}"
    );
}

/// However long the queue, the fair-share answer (every member may ask it)
/// lists the front of the line and counts the rest.
#[test]
fn a_long_queue_is_shown_by_its_front() {
    let c = Cluster::dev(&["--gpus", "sim:1xA100-80GB"]);
    let acme = c.add_member("acme");
    c.ok(&[
        "policy",
        "set",
        "submit_rate=0",
        "--reason",
        "a flood, on purpose",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = std::fs::read(c.ca.as_deref().unwrap()).unwrap();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let channel = rt.block_on(tls_channel(&c.addr, tls)).expect("connects");
    let mut jobs = pb::job_service_client::JobServiceClient::new(channel);
    rt.block_on(async {
        for _ in 0..1_050 {
            let r = pb::SubmitJobRequest {
                kind: pb::JobKind::Finetune as i32,
                gpus: 1,
                command: vec!["sleep".into(), "600".into()],
                ..Default::default()
            };
            jobs.submit(bearer(&acme, r)).await.expect("submitted");
        }
    });
    let fs = c.json_as(&acme, &["fairshare"]);
    assert_eq!(fs["waiting"].as_array().unwrap().len(), 1_000);
    assert!(
        fs["waiting_total"].as_u64().unwrap() >= 1_049,
        "{}",
        fs["waiting_total"]
    );
    assert_eq!(
        fs["waiting"][0]["position"], 1,
        "the front of the line first"
    );
    let table = c.ok_as(&acme, &["fairshare"]);
    assert!(table.contains("more waiting behind these"), "{table}");
}
