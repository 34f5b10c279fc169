//! Playing the attacker and the careless operator: TLS unless asked for
//! plain text, a raft port that answers only certificates of the cluster CA,
//! jobs that see no credential, and tokens that can be rotated, suspended,
//! expired, revoked and removed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use coop_proto::v1 as pb;
use protobuf::Message as _;
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn coop_dev_serves_tls_with_its_own_ca_and_plain_text_only_when_asked() {
    let c = Cluster::dev(&[]);
    assert!(c.addr.starts_with("https://"), "{}", c.addr);
    let data = c.data_dir();
    assert_eq!(mode(&data.join("tls/ca.key")), 0o600);
    assert_eq!(mode(&data.join("credentials.json")), 0o600);
    assert_eq!(mode(&data.join("scheduler")), 0o700);
    assert_eq!(mode(&data.join("scheduler/scheduler.db")), 0o600);
    assert_eq!(mode(&data.join("scheduler/audit-signing.pk8")), 0o600);
    assert_eq!(mode(&data.join("agent/credential.json")), 0o600);
    c.ok(&["job", "list"]);

    // Without the CA, the CLI says what is missing.
    let out = Command::new(BIN)
        .args(["job", "list"])
        .env("COOP_ADDR", &c.addr)
        .env("COOP_TOKEN", &c.token)
        .env_remove("COOP_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ca: ") && err.contains("COOP_CA"),
        "{err}"
    );
    // Another cluster's CA does not verify this one.
    let other = Cluster::dev(&[]);
    let out = Command::new(BIN)
        .args(["job", "list"])
        .env("COOP_ADDR", &c.addr)
        .env("COOP_TOKEN", &c.token)
        .env("COOP_CA", other.ca.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a foreign CA was accepted");
    // Plain text to a TLS port gets nowhere.
    let plain = c.addr.replace("https://", "http://");
    let out = Command::new(BIN)
        .args(["job", "list"])
        .env("COOP_ADDR", &plain)
        .env("COOP_TOKEN", &c.token)
        .env_remove("COOP_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A credential is not sent in plain text across a network unless asked.
    let out = Command::new(BIN)
        .args(["job", "list"])
        .env("COOP_ADDR", "http://scheduler.invalid:7070")
        .env("COOP_TOKEN", &c.token)
        .env("COOP_CA", c.ca.as_ref().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: addr: ") && err.contains("--plain-text"),
        "{err}"
    );

    // --insecure: plain text, said loudly at start.
    let insecure = Cluster::dev(&["--insecure"]);
    assert!(insecure.addr.starts_with("http://"), "{}", insecure.addr);
    insecure.ok(&["job", "list"]);
    let log = insecure.daemons[0].stderr();
    assert!(log.contains("PLAIN TEXT"), "{log}");
}

fn tls(ca: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca))
}

async fn connect(url: &str, tls: ClientTlsConfig) -> Option<Channel> {
    tls_channel(url, tls).await
}

/// Sends a raft batch to `url`; true if the peer service accepted it.
async fn send_raft(url: &str, tls: ClientTlsConfig, batch: pb::RaftBatch) -> bool {
    let Some(ch) = connect(url, tls).await else {
        return false;
    };
    pb::raft_service_client::RaftServiceClient::new(ch)
        .max_encoding_message_size(usize::MAX)
        .send(batch)
        .await
        .is_ok()
}

/// A forged snapshot: the whole state replaced by one whose operator token
/// is the attacker's.
fn forged_snapshot() -> Vec<u8> {
    let evil = serde_json::json!({
        "state": { "operator_token_hash": coop_scheduler::auth::hash_token("coop_attacker"),
                   "tokens": { coop_scheduler::auth::hash_token("coop_attacker"): "Operator" } },
        "peers": {},
    });
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
    m.to = 1;
    m.from = 2;
    m.term = 1_000;
    let mut snap = raft::eraftpb::Snapshot {
        data: serde_json::to_vec(&evil).unwrap().into(),
        ..Default::default()
    };
    snap.mut_metadata().index = 1_000_000;
    snap.mut_metadata().term = 1_000;
    m.set_snapshot(snap);
    m.write_to_bytes().unwrap()
}

#[test]
fn the_raft_port_refuses_forged_forwards_snapshots_and_huge_messages_and_changes_nothing() {
    let s = Split::start(&["--peer-listen", "127.0.0.1:0"]);
    let peer = format!("https://{}", s.scheduler.export("COOP_PEER_ADDR"));
    let c = &s.c;
    c.add_member("acme");
    let ca = std::fs::read(c.ca.as_ref().unwrap()).unwrap();
    let before = (c.json(&["member", "list"]), c.ok(&["audit", "verify"]));

    // A certificate from a CA of the attacker's own making.
    let evil = tempfile::tempdir().unwrap();
    coop_scheduler::tls::init_ca(&evil.path().join("ca")).unwrap();
    coop_scheduler::tls::issue(
        &evil.path().join("ca"),
        "evil",
        &["127.0.0.1".into()],
        &evil.path().join("cert"),
    )
    .unwrap();
    let evil_identity = Identity::from_pem(
        std::fs::read(evil.path().join("cert/cert.pem")).unwrap(),
        std::fs::read(evil.path().join("cert/key.pem")).unwrap(),
    );
    let callers = [tls(&ca), tls(&ca).identity(evil_identity)];

    let tls_dir = c.dir.path().join("scheduler/tls");
    let peer_identity = Identity::from_pem(
        std::fs::read(tls_dir.join("cert.pem")).unwrap(),
        std::fs::read(tls_dir.join("key.pem")).unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The listener is there, and lets a scheduler's certificate through.
        let ch = connect(&peer, tls(&ca).identity(peer_identity))
            .await
            .expect("the peer listener answers a scheduler");
        pb::raft_service_client::RaftServiceClient::new(ch)
            .status(pb::NodeStatusRequest {})
            .await
            .expect("a scheduler's certificate is let through");
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let forged_op = serde_json::to_vec(&coop_core::state::Op::AddMember {
            name: "mallory".into(),
            token_hash: coop_scheduler::auth::hash_token("coop_mallory"),
            expires_at_ms: None,
        })
        .unwrap();
        for caller in &callers {
            // A forged Forward (a member with a token of the caller's choosing).
            if let Some(ch) = connect(&peer, caller.clone()).await {
                let r = pb::raft_service_client::RaftServiceClient::new(ch)
                    .forward(pb::ForwardRequest {
                        op: forged_op.clone(),
                    })
                    .await;
                assert!(r.is_err(), "a forged forward was taken");
            }
            // A forged snapshot, a garbage one, and a 1 GiB message.
            for messages in [
                vec![forged_snapshot()],
                vec![vec![0xff; 4096]],
                vec![vec![0; 1 << 30]],
            ] {
                let batch = pb::RaftBatch {
                    from: 2,
                    from_address: "https://127.0.0.1:1".into(),
                    messages,
                };
                assert!(
                    !send_raft(&peer, caller.clone(), batch).await,
                    "the peer port took a message from a caller without a cluster certificate"
                );
            }
        }
        // The client port does not serve raft at all.
        let ch = connect(&c.addr, tls(&ca)).await.unwrap();
        let r = pb::raft_service_client::RaftServiceClient::new(ch.clone())
            .forward(pb::ForwardRequest { op: forged_op })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unimplemented);
        // A 1 GiB request to the client port is cut off at its length.
        let mut req = Request::new(pb::SubmitJobRequest {
            gpus: 1,
            command: vec!["x".repeat(1 << 30)],
            ..Default::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {OPERATOR}").parse().unwrap(),
        );
        let r = pb::job_service_client::JobServiceClient::new(ch)
            .max_encoding_message_size(usize::MAX)
            .submit(req)
            .await;
        assert_eq!(r.unwrap_err().code(), Code::OutOfRange);
    });

    // The node is up, nothing changed, and the forged credentials are worthless.
    let after = (c.json(&["member", "list"]), c.ok(&["audit", "verify"]));
    assert_eq!(after, before);
    let err = c.fails_as(Some("coop_mallory"), &["job", "list"]);
    assert!(err.contains("Unauthenticated"), "{err}");
    let err = c.fails_as(Some("coop_attacker"), &["member", "list"]);
    assert!(err.contains("Unauthenticated"), "{err}");
}

#[test]
fn jobs_see_no_credential_and_not_each_other() {
    // Whatever the agent's own environment holds stays there.
    const LEAK: &str = "coop_in-the-agents-environment-only";
    let c = Cluster::dev_env(
        &[],
        &[("COOP_TOKEN", LEAK), ("AWS_SECRET_ACCESS_KEY", LEAK)],
    );
    let data = c.data_dir();
    let acme = c.add_member("acme");
    let bravo = c.add_member("bravo");
    // An earlier job of acme's keeps a secret and leaves a process behind it
    // (out of its process group): both die with the job, the secret stays shut.
    let old = c.submit_as(
        &acme,
        &[
            "--",
            "sh",
            "-c",
            "echo acme-old > $HOME/secret; setsid sleep 600 & echo uid $(id -u); echo dir $HOME",
        ],
    );
    let text = c.wait_log(&old, "dir ");
    c.wait_final(&old);
    let old_dir = text
        .lines()
        .find_map(|l| l.strip_prefix("dir "))
        .unwrap()
        .to_string();
    if nix::unistd::geteuid().is_root() {
        // Its pid is the namespace's; by its uid, nothing of it is left.
        let uid: u32 = text
            .lines()
            .find_map(|l| l.strip_prefix("uid "))
            .and_then(|u| u.trim().parse().ok())
            .expect("the run's uid printed");
        eventually("the process an ended run left behind is gone", || {
            processes_of(uid).is_empty()
        });
    }
    // acme's job keeps a secret in its own directory and waits.
    let a = c.submit_as(
        &acme,
        &[
            "--",
            "sh",
            "-c",
            "echo acme-secret > $HOME/secret; echo dir $HOME; sleep 600",
        ],
    );
    let text = c.wait_log(&a, "dir ");
    let a_dir = text.split_whitespace().nth(1).unwrap().to_string();
    let node_cred: Value =
        serde_json::from_slice(&std::fs::read(data.join("agent/credential.json")).unwrap())
            .unwrap();
    // bravo's job looks everywhere, and tries to swap its own log for a link
    // to the node's credential, which the agent would then read back.
    let script = format!(
        "env; id -u; set -- /proc/[0-9]*; echo processes $#; cat {a_dir}/secret; ls {a_dir}; cat {old_dir}/secret; cat {d}/credentials.json; \
         cat {d}/agent/credential.json; cat {d}/tls/ca.key; cat {d}/scheduler/scheduler.db; \
         ls {d}/agent/jobs; for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null; done; \
         rm -f $HOME/../output.log output.log; ln -sf {d}/agent/credential.json $HOME/../output.log; \
         ln -sf {d}/agent/credential.json output.log; echo end",
        d = data.display()
    );
    let b = c.submit_as(&bravo, &["--", "sh", "-c", &script]);
    let done = c.wait_final(&b);
    let out = c.logs(&b);
    assert!(out.contains("end"), "{done}: {out}");
    let root = nix::unistd::geteuid().is_root();
    // The environment is clean for every agent; files are shut only where the
    // agent can give runs users of their own (as root).
    let mut secrets = vec![LEAK, c.token.as_str(), acme.as_str(), bravo.as_str()];
    if root {
        let node = node_cred["token"].as_str().unwrap();
        secrets.extend([node, "acme-secret", "acme-old", "PRIVATE KEY"]);
    }
    for secret in secrets {
        assert!(!out.contains(secret), "bravo's job read {secret:?}:\n{out}");
    }
    if root {
        assert!(out.contains("Permission denied"), "{out}");
        let uid: u32 = out
            .lines()
            .find_map(|l| l.trim().parse().ok())
            .expect("id -u printed");
        assert!(
            (1_900_000_000..1_900_004_096).contains(&uid),
            "runs as uid {uid}"
        );
        // Its own PID namespace (where the kernel gives them, as the agent
        // says at start): its shell and the namespace's init, nothing of
        // acme's run or of the machine.
        let seen: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("processes "))
            .and_then(|n| n.trim().parse().ok())
            .expect("the process count printed");
        if c.daemons[0].stderr().contains("a PID namespace of its own") {
            assert!(seen <= 3, "bravo's job sees {seen} processes:\n{out}");
        } else {
            eprintln!("no PID namespaces here: bravo's job saw {seen} processes");
        }
    } else {
        eprintln!(
            "not root: runs share the agent's user and can read its files; only environments were checked"
        );
    }
    c.ok(&["job", "cancel", &a]);
    c.wait_final(&a);
}

/// Host pids of the processes running as `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let needle = format!("Uid:\t{uid}\t");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| s.contains(&needle))
        })
        .collect()
}

/// Polls until `f` holds (wall-clock time passing is what is tested).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tokens_rotate_expire_and_members_are_suspended_resumed_and_removed() {
    let c = Cluster::dev(&[]);
    // Rotation by the operator: the old token is dead at once.
    let acme = c.add_member("acme");
    let rotated = c.json(&["member", "token", "rotate", "acme"]);
    let acme2 = rotated["token"].as_str().unwrap().to_string();
    let err = c.fails_as(Some(&acme), &["job", "list"]);
    assert!(err.contains("Unauthenticated"), "{err}");
    c.ok_as(&acme2, &["job", "list"]);
    // A member rotates its own, and no one else's.
    let acme3 = c.json_as(&acme2, &["member", "token", "rotate", "acme"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    c.fails_as(Some(&acme2), &["job", "list"]);
    let bravo = c.add_member("bravo");
    let err = c.fails_as(Some(&acme3), &["member", "token", "rotate", "bravo"]);
    assert!(err.contains("PermissionDenied"), "{err}");
    c.ok_as(&bravo, &["job", "list"]);

    // A member's own rotation keeps its token's expiry.
    let added = c.json(&["member", "add", "fleeting", "--expires", "1h"]);
    let fleeting = added["token"].as_str().unwrap().to_string();
    let renewed = c.json_as(&fleeting, &["member", "token", "rotate", "fleeting"]);
    assert!(renewed["token_expires_at"].is_string(), "{renewed}");
    assert_eq!(renewed["token_expires_at"], added["token_expires_at"]);

    // Expiry.
    let short = c.json(&["member", "add", "brief", "--expires", "2s"]);
    let brief = short["token"].as_str().unwrap().to_string();
    assert!(short["token_expires_at"].is_string(), "{short}");
    c.ok_as(&brief, &["job", "list"]);
    eventually("the token expires", || {
        !c.run_as(Some(&brief), &["job", "list"]).status.success()
    });
    let err = c.fails_as(Some(&brief), &["job", "list"]);
    assert!(err.contains("expired"), "{err}");

    // Suspension: the token is refused and pending jobs wait; resumed, they run.
    let hog = c.submit(&["--gpus", "4", "--", "sleep", "600"]);
    c.wait_job(&hog, "running", |j| j["state"] == "running");
    let waiting = c.submit_as(&acme3, &["--", "sleep", "600"]);
    let running_before = c.submit_as(&bravo, &["--", "true"]);
    c.ok(&["member", "suspend", "acme"]);
    let err = c.fails_as(Some(&acme3), &["job", "list"]);
    assert!(err.contains("suspended"), "{err}");
    c.ok(&["job", "cancel", &hog]);
    c.wait_final(&hog);
    // bravo's job, behind acme's in the queue, runs; acme's waits and says why.
    c.wait_final(&running_before);
    let j = c.job(&waiting);
    assert_eq!(j["state"], "pending", "{j}");
    let why = c.ok(&["fairshare"]);
    assert!(why.contains("its member is suspended"), "{why}");
    c.ok(&["member", "resume", "acme"]);
    c.wait_job(&waiting, "running", |j| j["state"] == "running");

    // Removal: its running job is stopped, its token dies, its history stays.
    c.ok(&["member", "remove", "acme"]);
    let j = c.wait_final(&waiting);
    assert_eq!(j["state"], "cancelled", "{j}");
    c.fails_as(Some(&acme3), &["job", "list"]);
    let members = c.json(&["member", "list"]);
    let acme_row = members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "acme")
        .unwrap()
        .clone();
    assert_eq!(acme_row["status"], "removed", "{members}");
    let export = c.ok(&["audit", "export"]);
    assert!(
        export.contains(r#""account":"member:acme","change":"removed""#),
        "{export}"
    );
    c.ok(&[
        "usage",
        "statement",
        "--member",
        "acme",
        "--period",
        "2026-11",
    ]);
    let err = c.fails(&["member", "remove", "acme"]);
    assert!(err.contains("NotFound"), "{err}");

    // The operator's own token.
    let new_op = c.json(&["operator", "token", "rotate"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let err = c.fails(&["job", "list"]);
    assert!(err.contains("Unauthenticated"), "{err}");
    c.ok_as(&new_op, &["member", "list"]);
}

#[test]
fn weak_operator_tokens_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for weak in [
        "a",
        "secret",
        "coop_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        let out = Command::new(BIN)
            .args(["scheduler", "run", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("s"))
            .env("COOP_OPERATOR_TOKEN", weak)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: operator-token: too weak"), "{err}");
        assert!(
            !dir.path().join("s").exists(),
            "a refused start wrote nothing"
        );
    }
    // Several schedulers need certificates.
    let out = Command::new(BIN)
        .args([
            "scheduler",
            "run",
            "--id",
            "1",
            "--peers",
            "1=127.0.0.1:1,2=127.0.0.1:2",
        ])
        .args(["--data-dir"])
        .arg(dir.path().join("m"))
        .env("COOP_OPERATOR_TOKEN", OPERATOR)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: tls-dir: "), "{err}");
    // A certificate for something that is no host name is refused, naming it.
    coop_scheduler::tls::init_ca(&dir.path().join("ca")).unwrap();
    let out = Command::new(BIN)
        .args([
            "ca",
            "issue",
            "--name",
            "x",
            "--host",
            "not a host!",
            "--ca-dir",
        ])
        .arg(dir.path().join("ca"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: host: "), "{err}");
    assert!(!dir.path().join("out/key.pem").exists());
}

#[test]
fn machines_enroll_once_act_for_their_node_only_and_are_revoked_at_once() {
    let s = Split::start(&[]);
    let c = &s.c;
    let acme = c.add_member("acme");
    c.add_member("bravo");
    // The owner enrolls its own machine; not someone else's.
    let err = c.fails_as(Some(&acme), &["node", "enroll", "box", "--owner", "bravo"]);
    assert!(err.contains("PermissionDenied"), "{err}");
    let join = c.json_as(&acme, &["node", "enroll", "box", "--owner", "acme"])["join_token"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = s.agent_dir("box");
    let spawn = |join: &str| {
        Daemon::spawn(
            "agent-box",
            c.dir.path(),
            &[
                "agent",
                "run",
                "--scheduler",
                &c.addr,
                "--join",
                join,
                "--gpus",
                "sim:2xA100-80GB",
                "--data-dir",
                dir.to_str().unwrap(),
            ],
            &[("COOP_CA", c.ca.as_deref().unwrap())],
        )
    };
    let mut agent = spawn(&join);
    c.wait_node("box", "up", |n| n["state"] == "up" && n["owner"] == "acme");
    assert_eq!(mode(&dir.join("credential.json")), 0o600);
    let cred: Value =
        serde_json::from_slice(&std::fs::read(dir.join("credential.json")).unwrap()).unwrap();
    let cred = cred["token"].as_str().unwrap().to_string();
    // The node credential is good for its agent only.
    let err = c.fails_as(Some(&cred), &["job", "list"]);
    assert!(err.contains("PermissionDenied"), "{err}");
    let id = c.submit_as(&acme, &["--", "sleep", "600"]);
    c.wait_job(&id, "running", |j| {
        j["state"] == "running" && j["node"] == "box"
    });

    // Revoked: the node goes down at once, its job is requeued, its agent stops.
    c.ok(&["node", "revoke", "box"]);
    let n = c.json(&["node", "list"]);
    assert_eq!(n[0]["state"], "down", "{n}");
    let j = c.job(&id);
    assert_eq!(j["state"], "pending", "{j}");
    assert!(j["reason"].as_str().unwrap().contains("node down"), "{j}");
    let status = agent.child.wait().unwrap();
    assert!(!status.success());
    assert!(
        agent.stderr().contains("registration refused"),
        "{}",
        agent.stderr()
    );
    // Its credential no longer works, even restarted; a new enrollment does.
    let mut again = spawn(&join);
    assert!(!again.child.wait().unwrap().success());
    let join2 = c.enroll("box", "acme");
    let _agent = spawn(&join2);
    c.wait_node("box", "up again", |n| n["state"] == "up");
    c.wait_job(&id, "running again", |j| j["state"] == "running");
    c.ok(&["job", "cancel", &id]);
    c.wait_final(&id);

    // A join token that expired is refused, and says so.
    let late = c.json(&["node", "enroll", "late", "--owner", "acme", "--ttl", "1s"])["join_token"]
        .as_str()
        .unwrap()
        .to_string();
    // Its one second passes (the wall clock is what is tested here).
    std::thread::sleep(Duration::from_millis(1500));
    let out = Command::new(BIN)
        .args(["agent", "run", "--scheduler", &c.addr, "--join", &late])
        .args(["--gpus", "sim:1xA100-80GB", "--data-dir"])
        .arg(c.dir.path().join("agent-late"))
        .env("COOP_CA", c.ca.as_deref().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("join") && err.contains("expired"), "{err}");
}
