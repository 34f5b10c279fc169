//! Who may call what: every RPC of every coop.v1 service (taken from the
//! compiled service descriptors, so that a new RPC without a row fails this
//! test) against every kind of caller, on a real scheduler over TLS with its
//! raft service on a mutual-TLS peer listener. Each cell is the exact gRPC
//! code; a refused write must leave the cluster's state as it was. The README
//! holds the same table (checked below).

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use coop_proto::v1 as pb;
use prost::Message as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request, Status};

/// The callers, in the matrix's column order.
const CALLERS: [&str; 12] = [
    "none",
    "wrong token",
    "member A",
    "member B",
    "auditor",
    "node A (own)",
    "node B (other)",
    "revoked node",
    "suspended member",
    "operator",
    "peer cert",
    "no peer cert",
];
const PEER: usize = 10;

/// O ok, U unauthenticated, P permission denied, N not found, I invalid
/// argument, F failed precondition, V unavailable, X refused in the TLS
/// handshake (no certificate of the cluster CA).
fn letter(r: &Result<(), Status>) -> char {
    match r {
        Ok(()) => 'O',
        Err(s) => match s.code() {
            Code::Unauthenticated => 'U',
            Code::PermissionDenied => 'P',
            Code::NotFound => 'N',
            Code::InvalidArgument => 'I',
            Code::FailedPrecondition => 'F',
            Code::Unavailable => 'V',
            Code::AlreadyExists => 'A',
            Code::Unimplemented => 'M',
            _ => '?',
        },
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<(), Status>>>>;
type Call = Box<dyn Fn(Channel, Option<String>) -> BoxFut>;

fn req<T>(body: T, token: &Option<String>) -> Request<T> {
    let mut r = Request::new(body);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// A call of `Client::method(body)`; `body` is built afresh for each call.
macro_rules! call {
    ($m:ident :: $client:ident, $method:ident, $body:expr) => {{
        Box::new(move |ch: Channel, t: Option<String>| -> BoxFut {
            #[allow(clippy::redundant_closure_call)]
            let body = $body;
            Box::pin(async move {
                pb::$m::$client::new(ch)
                    .$method(req(body, &t))
                    .await
                    .map(|_| ())
            })
        }) as Call
    }};
}

struct Row {
    rpc: &'static str,
    /// Refused calls must change nothing.
    write: bool,
    /// The raft service, on the peer listener.
    peer: bool,
    want: &'static str,
    call: Call,
}

fn row(rpc: &'static str, write: bool, want: &'static str, call: Call) -> Row {
    assert_eq!(want.len(), CALLERS.len(), "{rpc}");
    Row {
        rpc,
        write,
        peer: rpc.starts_with("RaftService/"),
        want,
        call,
    }
}

static FRESH: AtomicUsize = AtomicUsize::new(0);
fn fresh(prefix: &str) -> String {
    format!("{prefix}{}", FRESH.fetch_add(1, Ordering::Relaxed))
}

fn rows(job_a: &str, session: &str) -> Vec<Row> {
    let (j, s) = (job_a.to_string(), session.to_string());
    let (j2, j3, j4) = (j.clone(), j.clone(), j.clone());
    let (j5, j6) = (j.clone(), j.clone());
    let s2 = s.clone();
    let register = move || pb::RegisterRequest {
        address: String::new(),
        site: String::new(),
        node: "node-a".into(),
        owner: String::new(),
        gpus: vec![gpu()],
        session: s.clone(),
    };
    vec![
        // Columns: none, wrong, A, B, auditor, own node, other node, revoked,
        // suspended, operator, peer cert, no peer cert.
        row(
            "JobService/Submit",
            true,
            "UUOPPPPUPOUU",
            call!(
                job_service_client::JobServiceClient,
                submit,
                pb::SubmitJobRequest {
                    kind: pb::JobKind::Finetune as i32,
                    gpus: 1,
                    command: vec!["true".into()],
                    member: "acme".into(),
                    ..Default::default()
                }
            ),
        ),
        row(
            "JobService/Get",
            false,
            "UUOPPPPUPOUU",
            call!(
                job_service_client::JobServiceClient,
                get,
                pb::GetJobRequest { id: j.clone() }
            ),
        ),
        row(
            "JobService/List",
            false,
            "UUOOPPPUPOUU",
            call!(
                job_service_client::JobServiceClient,
                list,
                pb::ListJobsRequest::default()
            ),
        ),
        row(
            "JobService/Cancel",
            true,
            "UUOPPPPUPOUU",
            call!(
                job_service_client::JobServiceClient,
                cancel,
                pb::CancelJobRequest {
                    id: j2.clone(),
                    ids: vec![]
                }
            ),
        ),
        row(
            "JobService/Logs",
            false,
            "UUVPPPPUPVUU",
            call!(
                job_service_client::JobServiceClient,
                logs,
                pb::JobLogsRequest {
                    id: j3.clone(),
                    ..Default::default()
                }
            ),
        ),
        row(
            "JobService/Watch",
            false,
            "UUOPPPPUPOUU",
            call!(
                job_service_client::JobServiceClient,
                watch,
                pb::WatchJobRequest { id: j4.clone() }
            ),
        ),
        // Job A runs: only pending jobs are held, so its member and the
        // operator get FAILED_PRECONDITION, and nothing changes.
        row(
            "JobService/Hold",
            true,
            "UUFPPPPUPFUU",
            call!(
                job_service_client::JobServiceClient,
                hold,
                pb::HoldJobsRequest {
                    ids: vec![j5.clone()]
                }
            ),
        ),
        row(
            "JobService/Release",
            true,
            "UUFPPPPUPFUU",
            call!(
                job_service_client::JobServiceClient,
                release,
                pb::HoldJobsRequest {
                    ids: vec![j6.clone()]
                }
            ),
        ),
        row(
            "MemberService/Add",
            true,
            "UUPPPPPUPOUU",
            call!(
                member_service_client::MemberServiceClient,
                add,
                pb::AddMemberRequest {
                    name: fresh("new"),
                    token_ttl_s: 0
                }
            ),
        ),
        row(
            "MemberService/List",
            false,
            "UUPPOPPUPOUU",
            call!(
                member_service_client::MemberServiceClient,
                list,
                pb::ListMembersRequest::default()
            ),
        ),
        row(
            "MemberService/RotateToken",
            true,
            "UUPPPPPUPNUU",
            call!(
                member_service_client::MemberServiceClient,
                rotate_token,
                pb::RotateTokenRequest {
                    account: "member:ghost".into(),
                    token_ttl_s: 0
                }
            ),
        ),
        row(
            "MemberService/Suspend",
            true,
            "UUPPPPPUPNUU",
            call!(
                member_service_client::MemberServiceClient,
                suspend,
                pb::MemberNameRequest {
                    name: "ghost".into()
                }
            ),
        ),
        row(
            "MemberService/Resume",
            true,
            "UUPPPPPUPNUU",
            call!(
                member_service_client::MemberServiceClient,
                resume,
                pb::MemberNameRequest {
                    name: "ghost".into()
                }
            ),
        ),
        row(
            "MemberService/Remove",
            true,
            "UUPPPPPUPNUU",
            call!(
                member_service_client::MemberServiceClient,
                remove,
                pb::MemberNameRequest {
                    name: "ghost".into()
                }
            ),
        ),
        row(
            "MemberService/AddAuditor",
            true,
            "UUPPPPPUPOUU",
            call!(
                member_service_client::MemberServiceClient,
                add_auditor,
                pb::AddAuditorRequest { name: fresh("aud") }
            ),
        ),
        row(
            "MemberService/ListAuditors",
            false,
            "UUPPOPPUPOUU",
            call!(
                member_service_client::MemberServiceClient,
                list_auditors,
                pb::ListAuditorsRequest::default()
            ),
        ),
        row(
            "MemberService/RemoveAuditor",
            true,
            "UUPPPPPUPNUU",
            call!(
                member_service_client::MemberServiceClient,
                remove_auditor,
                pb::RemoveAuditorRequest {
                    name: "ghost".into()
                }
            ),
        ),
        row(
            "UsageService/Get",
            false,
            "UUOOOPPUPOUU",
            call!(
                usage_service_client::UsageServiceClient,
                get,
                pb::GetUsageRequest::default()
            ),
        ),
        row(
            "UsageService/Statement",
            false,
            "UUOPOPPUPOUU",
            call!(
                usage_service_client::UsageServiceClient,
                statement,
                pb::StatementRequest {
                    member: "acme".into(),
                    from_ms: 1,
                    to_ms: 4_000_000_000_000
                }
            ),
        ),
        row(
            "UsageService/FairShare",
            false,
            "UUOOOPPUPOUU",
            call!(
                usage_service_client::UsageServiceClient,
                fair_share,
                pb::FairShareRequest::default()
            ),
        ),
        row(
            "PolicyService/Get",
            false,
            "UUOOOPPUPOUU",
            call!(
                policy_service_client::PolicyServiceClient,
                get,
                pb::GetPolicyRequest {}
            ),
        ),
        row(
            "PolicyService/Set",
            true,
            "UUPPPPPUPOUU",
            call!(
                policy_service_client::PolicyServiceClient,
                set,
                pb::SetPolicyRequest {
                    settings: vec!["share.acme=2".into()],
                    reason: "the matrix".into()
                }
            ),
        ),
        row(
            "PolicyService/Propose",
            true,
            "UUFFPPPUPFUU",
            call!(
                policy_service_client::PolicyServiceClient,
                propose,
                pb::ProposePolicyRequest {
                    settings: vec!["share.acme=3".into()],
                    reason: "the matrix".into()
                }
            ),
        ),
        row(
            "PolicyService/Approve",
            true,
            "UUNNPPPUPPUU",
            call!(
                policy_service_client::PolicyServiceClient,
                approve,
                pb::ApprovePolicyRequest { id: 999 }
            ),
        ),
        row(
            "PolicyService/ListProposals",
            false,
            "UUOOOPPUPOUU",
            call!(
                policy_service_client::PolicyServiceClient,
                list_proposals,
                pb::ListProposalsRequest::default()
            ),
        ),
        row(
            "AuditService/Export",
            false,
            "UUPPOPPUPOUU",
            call!(
                audit_service_client::AuditServiceClient,
                export,
                pb::ExportAuditRequest::default()
            ),
        ),
        row(
            "AuditService/Head",
            false,
            "UUOOOPPUPOUU",
            call!(
                audit_service_client::AuditServiceClient,
                head,
                pb::AuditHeadRequest {}
            ),
        ),
        row(
            "ClusterService/Status",
            false,
            "UUOOOPPUPOUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                status,
                pb::ClusterStatusRequest {}
            ),
        ),
        row(
            "ClusterService/ListNodes",
            false,
            "UUOOOPPUPOUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                list_nodes,
                pb::ListNodesRequest::default()
            ),
        ),
        row(
            "ClusterService/AddNode",
            true,
            "UUPPPPPUPIUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                add_node,
                pb::AddNodeRequest {
                    id: 0,
                    address: "127.0.0.1:1".into()
                }
            ),
        ),
        row(
            "ClusterService/RemoveNode",
            true,
            "UUPPPPPUPNUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                remove_node,
                pb::RemoveNodeRequest { id: 9 }
            ),
        ),
        row(
            "ClusterService/EnrollNode",
            true,
            "UUOPPPPUPOUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                enroll_node,
                pb::EnrollNodeRequest {
                    node: fresh("box"),
                    owner: "acme".into(),
                    ttl_s: 0
                }
            ),
        ),
        row(
            "ClusterService/RevokeNode",
            true,
            "UUPPPPPUPNUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                revoke_node,
                pb::RevokeNodeRequest {
                    node: "ghost".into()
                }
            ),
        ),
        // The operator, or the member that owns the node (node-a is acme's);
        // resumed right after.
        row(
            "ClusterService/DrainNode",
            true,
            "UUOPPPPUPOUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                drain_node,
                pb::DrainNodeRequest {
                    node: "node-a".into(),
                    reason: "matrix".into(),
                    now: false
                }
            ),
        ),
        row(
            "ClusterService/ResumeNode",
            true,
            "UUOPPPPUPOUU",
            call!(
                cluster_service_client::ClusterServiceClient,
                resume_node,
                pb::ResumeNodeRequest {
                    node: "node-a".into()
                }
            ),
        ),
        row(
            "AgentService/Join",
            true,
            "UUUUUUUUUUUU",
            call!(
                agent_service_client::AgentServiceClient,
                join,
                pb::JoinRequest {
                    credential_hash: coop_scheduler::auth::hash_token(&fresh("cred"))
                }
            ),
        ),
        row(
            "AgentService/Register",
            true,
            "UUPPPOPUPPUU",
            call!(
                agent_service_client::AgentServiceClient,
                register,
                register()
            ),
        ),
        row(
            "AgentService/Heartbeat",
            true,
            "UUPPPOPUPPUU",
            call!(
                agent_service_client::AgentServiceClient,
                heartbeat,
                tokio_stream::iter(vec![pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                        node: "node-a".into(),
                        session: s2.clone()
                    })),
                }])
            ),
        ),
        row(
            "RaftService/Send",
            true,
            "XXXXXXXXXXOX",
            call!(
                raft_service_client::RaftServiceClient,
                send,
                pb::RaftBatch {
                    from: 1,
                    from_address: String::new(),
                    messages: vec![]
                }
            ),
        ),
        row(
            "RaftService/SendSnapshot",
            true,
            "XXXXXXXXXXIX",
            call!(
                raft_service_client::RaftServiceClient,
                send_snapshot,
                tokio_stream::iter(vec![pb::SnapshotChunk {
                    from: 1,
                    message: b"garbage".to_vec(),
                    total_bytes: 7,
                    ..Default::default()
                }])
            ),
        ),
        row(
            "RaftService/Forward",
            true,
            "XXXXXXXXXXIX",
            call!(
                raft_service_client::RaftServiceClient,
                forward,
                pb::ForwardRequest {
                    op: b"{\"AddMember\":".to_vec()
                }
            ),
        ),
        row(
            "RaftService/ChangeMembership",
            true,
            "XXXXXXXXXXIX",
            call!(
                raft_service_client::RaftServiceClient,
                change_membership,
                pb::MembershipRequest {
                    change: b"garbage".to_vec()
                }
            ),
        ),
        row(
            "RaftService/Status",
            false,
            "XXXXXXXXXXOX",
            call!(
                raft_service_client::RaftServiceClient,
                status,
                pb::NodeStatusRequest {}
            ),
        ),
        row(
            "RaftService/History",
            false,
            "XXXXXXXXXXIX",
            call!(
                raft_service_client::RaftServiceClient,
                history,
                pb::HistoryRequest { from: 0, to: 0 }
            ),
        ),
    ]
}

fn gpu() -> pb::Gpu {
    pb::Gpu {
        uuid: "GPU-matrix-0".into(),
        index: 0,
        model: "A100-80GB".into(),
        memory_mb: 81_920,
        ..Default::default()
    }
}

/// Every method of every coop.v1 service, as `Service/Method`.
fn compiled_rpcs() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .flat_map(|f| &f.service)
        .flat_map(|s| {
            s.method
                .iter()
                .map(move |m| format!("{}/{}", s.name(), m.name()))
        })
        .collect()
}

/// The matrix as the README shows it.
fn markdown(rows: &[Row]) -> String {
    let mut out = format!("| RPC | {} |\n", CALLERS.join(" | "));
    out += &format!("|---|{}\n", "---|".repeat(CALLERS.len()));
    for r in rows {
        let cells: Vec<String> = r.want.chars().map(|c| c.to_string()).collect();
        out += &format!("| {} | {} |\n", r.rpc, cells.join(" | "));
    }
    out
}

struct Setup {
    client: Channel,
    peer: Channel,
    tokens: Vec<Option<String>>,
    /// TLS to the peer listener without a client certificate.
    peer_addr: String,
    ca: Vec<u8>,
}

async fn channel(url: &str, tls: ClientTlsConfig) -> Result<Channel, Status> {
    tls_channel(url, tls)
        .await
        .ok_or_else(|| Status::unavailable(format!("no TLS connection to {url}")))
}

/// What a refused write must not change, as the operator reads it.
async fn fingerprint(ch: &Channel) -> String {
    let op = Some(OPERATOR.to_string());
    let jobs = pb::job_service_client::JobServiceClient::new(ch.clone())
        .list(req(pb::ListJobsRequest::default(), &op))
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| (j.id, j.state, j.cancel_requested))
        .collect::<Vec<_>>();
    let mut m = pb::member_service_client::MemberServiceClient::new(ch.clone());
    let members = m
        .list(req(pb::ListMembersRequest::default(), &op))
        .await
        .unwrap()
        .into_inner();
    let auditors = m
        .list_auditors(req(pb::ListAuditorsRequest::default(), &op))
        .await
        .unwrap()
        .into_inner();
    let nodes = pb::cluster_service_client::ClusterServiceClient::new(ch.clone())
        .list_nodes(req(pb::ListNodesRequest::default(), &op))
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.name, n.owner, n.state, n.gpus.len()))
        .collect::<Vec<_>>();
    let mut p = pb::policy_service_client::PolicyServiceClient::new(ch.clone());
    let policy = p
        .get(req(pb::GetPolicyRequest {}, &op))
        .await
        .unwrap()
        .into_inner();
    let proposals = p
        .list_proposals(req(pb::ListProposalsRequest::default(), &op))
        .await
        .unwrap()
        .into_inner();
    let mut audit = pb::audit_service_client::AuditServiceClient::new(ch.clone())
        .export(req(pb::ExportAuditRequest::default(), &op))
        .await
        .unwrap()
        .into_inner();
    let mut chain = vec![];
    while let Some(r) = audit.message().await.unwrap() {
        chain.push(r.json);
    }
    format!("{jobs:?}\n{members:?}\n{auditors:?}\n{nodes:?}\n{policy:?}\n{proposals:?}\n{chain:?}")
}

#[test]
fn every_rpc_answers_every_kind_of_caller_as_the_matrix_says() {
    let s = Split::start(&["--peer-listen", "127.0.0.1:0", "--node-timeout", "1h"]);
    let peer_addr = format!("https://{}", s.scheduler.export("COOP_PEER_ADDR"));
    let c = &s.c;
    let acme = c.add_member("acme");
    let bravo = c.add_member("bravo");
    let suspended = c.add_member("sus");
    c.ok(&["member", "suspend", "sus"]);
    let auditor = c.json(&["auditor", "add", "aud"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let tls_dir = s.c.dir.path().join("scheduler/tls");
    let ca = std::fs::read(tls_dir.join("ca.pem")).unwrap();
    let identity = Identity::from_pem(
        std::fs::read(tls_dir.join("cert.pem")).unwrap(),
        std::fs::read(tls_dir.join("key.pem")).unwrap(),
    );
    let plain_tls = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = channel(&c.addr, plain_tls()).await.unwrap();
        // Three machines join: one of acme's, one of bravo's, one that is revoked.
        let mut creds = vec![];
        for (node, owner) in [("node-a", "acme"), ("node-b", "bravo"), ("node-r", "acme")] {
            let join = c.enroll(node, owner);
            let cred = coop_scheduler::auth::new_token();
            let joined = pb::agent_service_client::AgentServiceClient::new(client.clone())
                .join(req(
                    pb::JoinRequest {
                        credential_hash: coop_scheduler::auth::hash_token(&cred),
                    },
                    &Some(join.clone()),
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!((joined.node.as_str(), joined.owner.as_str()), (node, owner));
            // A join token is good once.
            let again = pb::agent_service_client::AgentServiceClient::new(client.clone())
                .join(req(
                    pb::JoinRequest {
                        credential_hash: coop_scheduler::auth::hash_token(&fresh("c")),
                    },
                    &Some(join),
                ))
                .await;
            assert_eq!(letter(&again.map(|_| ())), 'U');
            creds.push(cred);
        }
        c.ok(&["node", "revoke", "node-r"]);
        // node-a registers and acme's job runs on it.
        let session = "matrix-session".to_string();
        pb::agent_service_client::AgentServiceClient::new(client.clone())
            .register(req(
                pb::RegisterRequest {
                    address: String::new(),
                    site: String::new(),
                    node: "node-a".into(),
                    owner: String::new(),
                    gpus: vec![gpu()],
                    session: session.clone(),
                },
                &Some(creds[0].clone()),
            ))
            .await
            .unwrap();
        let job_a = c.submit_as(&acme, &["--", "sleep", "600"]);
        c.wait_job(&job_a, "running", |j| j["state"] == "running");

        let tokens: Vec<Option<String>> = vec![
            None,
            Some(coop_scheduler::auth::new_token()),
            Some(acme.clone()),
            Some(bravo.clone()),
            Some(auditor.clone()),
            Some(creds[0].clone()),
            Some(creds[1].clone()),
            Some(creds[2].clone()),
            Some(suspended.clone()),
            Some(OPERATOR.to_string()),
            None,
            None,
        ];
        let peer = channel(&peer_addr, plain_tls().identity(identity.clone()))
            .await
            .unwrap();
        let setup = Setup {
            client: client.clone(),
            peer,
            tokens,
            peer_addr: peer_addr.clone(),
            ca: ca.clone(),
        };
        let rows = rows(&job_a, &session);

        // Every compiled RPC has a row, and every row an RPC.
        let have: BTreeSet<String> = rows.iter().map(|r| r.rpc.to_string()).collect();
        assert_eq!(have, compiled_rpcs(), "rows and compiled RPCs differ");

        let mut wrong = vec![];
        // The state as last read; an allowed write forgets it.
        let mut known: Option<String> = None;
        for r in &rows {
            for (i, want) in r.want.chars().enumerate() {
                let guard = r.write && want != 'O';
                let before = match (&known, guard) {
                    (Some(k), true) => Some(k.clone()),
                    (None, true) => Some(fingerprint(&setup.client).await),
                    (_, false) => None,
                };
                let got = run(&setup, r, i).await;
                if got != want {
                    wrong.push(format!("{} as {}: {got}, want {want}", r.rpc, CALLERS[i]));
                }
                if let Some(before) = before {
                    let after = fingerprint(&setup.client).await;
                    if after != before {
                        wrong.push(format!(
                            "{} as {} was refused but changed the state",
                            r.rpc, CALLERS[i]
                        ));
                    }
                    known = Some(after);
                } else if r.write {
                    known = None;
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));

        // The raft service is not served to clients at all.
        let forged = pb::raft_service_client::RaftServiceClient::new(client.clone())
            .forward(req(
                pb::ForwardRequest { op: vec![] },
                &Some(OPERATOR.into()),
            ))
            .await;
        assert_eq!(letter(&forged.map(|_| ())), 'M');

        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let table = markdown(&rows);
        assert!(
            readme.contains(&table),
            "README.md must hold the matrix as it is:\n{table}"
        );
    });
}

/// One cell: the call as caller `i`, as a letter.
async fn run(s: &Setup, r: &Row, i: usize) -> char {
    if !r.peer {
        return letter(&(r.call)(s.client.clone(), s.tokens[i].clone()).await);
    }
    // Only the peer column presents a certificate of the cluster CA; a
    // handshake the server refuses shows as a failed connection, or (TLS 1.3
    // checks the client's certificate after the client has finished) as the
    // connection closed under the first call.
    let ch = if i == PEER {
        s.peer.clone()
    } else {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&s.ca));
        match channel(&s.peer_addr, tls).await {
            Ok(ch) => ch,
            Err(_) => return 'X',
        }
    };
    match (r.call)(ch, s.tokens[i].clone()).await {
        // The server closed the connection: the call failed in the transport.
        Err(e)
            if i != PEER
                && std::error::Error::source(&e)
                    .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some()) =>
        {
            'X'
        }
        other => letter(&other),
    }
}
