//! Who may act: members and their tokens, auditors, the operator's token,
//! enrolling and revoking machines, and the cluster's CA.

use std::time::Duration;

use anyhow::bail;
use coop_proto::v1 as pb;
use serde_json::json;

use crate::args::*;
use crate::client::Client;
use crate::view::{pages, print_json, rfc3339, show_time, table};

fn ttl_s(d: Option<Duration>) -> u64 {
    // Rounded up: a lifetime under a second is still a lifetime.
    d.map_or(0, |d| d.as_millis().div_ceil(1000) as u64)
}

/// A secret shown once: JSON, or the value alone on stdout and why on stderr.
fn print_secret(cli: &ClientArgs, what: &str, fields: serde_json::Value, secret: &str) {
    match cli.output {
        Output::Json => print_json(&fields),
        Output::Table => {
            eprintln!("{what}; shown only now:");
            println!("{secret}");
        }
    }
}

pub async fn member(cli: &ClientArgs, cmd: MemberCmd) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    let mut members = c.members();
    let name_req = |name: String| c.req(pb::MemberNameRequest { name });
    let changed = match cmd {
        MemberCmd::Add { name, expires } => {
            let r = members
                .add(c.req(pb::AddMemberRequest {
                    name: name.clone(),
                    token_ttl_s: ttl_s(expires),
                }))
                .await?
                .into_inner();
            if r.proposal_id > 0 {
                // The co-op needs approvals: the member exists once they come.
                let fields = json!({
                    "name": name,
                    "token": r.token,
                    "proposal": r.proposal_id,
                });
                let what = format!(
                    "proposed member {name} as proposal {} (members approve it with `coop policy approve {}`); its token, which works once the proposal passes",
                    r.proposal_id, r.proposal_id
                );
                print_secret(cli, &what, fields, &r.token);
                return Ok(());
            }
            let m = r.member.unwrap_or_default();
            let fields = json!({
                "name": m.name,
                "token": r.token,
                "token_expires_at": rfc3339(m.token_expires_at_ms),
            });
            print_secret(
                cli,
                &format!("added member {}; its token", m.name),
                fields,
                &r.token,
            );
            return Ok(());
        }
        MemberCmd::List => {
            let (list, _) = pages(None, String::new(), |limit, page_token| {
                let mut members = members.clone();
                let req = c.req(pb::ListMembersRequest { limit, page_token });
                async move {
                    let r = members.list(req).await?.into_inner();
                    Ok((r.members, r.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => print_json(&serde_json::Value::Array(
                    list.iter().map(member_json).collect(),
                )),
                Output::Table => table(
                    &["NAME", "STATUS", "CREATED", "TOKEN EXPIRES"],
                    list.iter()
                        .map(|m| {
                            vec![
                                m.name.clone(),
                                member_status(m).to_string(),
                                show_time(m.created_at_ms),
                                show_time(m.token_expires_at_ms),
                            ]
                        })
                        .collect(),
                ),
            }
            return Ok(());
        }
        MemberCmd::Token(MemberTokenCmd::Rotate { name, expires }) => {
            let r = members
                .rotate_token(c.req(pb::RotateTokenRequest {
                    account: format!("member:{name}"),
                    token_ttl_s: ttl_s(expires),
                }))
                .await?
                .into_inner();
            let fields = json!({
                "name": name,
                "token": r.token,
                "token_expires_at": rfc3339(r.expires_at_ms),
            });
            let what = format!("new token of member {name} (the old one no longer works)");
            print_secret(cli, &what, fields, &r.token);
            return Ok(());
        }
        MemberCmd::Suspend { name } => members.suspend(name_req(name)).await?,
        MemberCmd::Resume { name } => members.resume(name_req(name)).await?,
        MemberCmd::Remove { name } => members.remove(name_req(name)).await?,
    }
    .into_inner();
    match cli.output {
        Output::Json => print_json(&member_json(&changed)),
        Output::Table => println!("member {}: {}", changed.name, member_status(&changed)),
    }
    Ok(())
}

fn member_status(m: &pb::Member) -> &'static str {
    if m.removed_at_ms != 0 {
        "removed"
    } else if m.suspended {
        "suspended"
    } else {
        "active"
    }
}

fn member_json(m: &pb::Member) -> serde_json::Value {
    json!({
        "name": m.name,
        "status": member_status(m),
        "created_at": rfc3339(m.created_at_ms),
        "removed_at": rfc3339(m.removed_at_ms),
        "token_expires_at": rfc3339(m.token_expires_at_ms),
    })
}

pub async fn auditor(cli: &ClientArgs, cmd: AuditorCmd) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    let mut members = c.members();
    match cmd {
        AuditorCmd::Add { name } => {
            let r = members
                .add_auditor(c.req(pb::AddAuditorRequest { name }))
                .await?
                .into_inner();
            let name = r.auditor.map(|a| a.name).unwrap_or_default();
            let fields = json!({ "name": name, "token": r.token });
            let what = format!("added auditor {name}; its read-only token");
            print_secret(cli, &what, fields, &r.token);
        }
        AuditorCmd::List => {
            let (list, _) = pages(None, String::new(), |limit, page_token| {
                let mut members = members.clone();
                let req = c.req(pb::ListAuditorsRequest { limit, page_token });
                async move {
                    let r = members.list_auditors(req).await?.into_inner();
                    Ok((r.auditors, r.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => print_json(&serde_json::Value::Array(
                    list.iter()
                        .map(|a| json!({"name": a.name, "created_at": rfc3339(a.created_at_ms)}))
                        .collect(),
                )),
                Output::Table => table(
                    &["NAME", "CREATED"],
                    list.iter()
                        .map(|a| vec![a.name.clone(), show_time(a.created_at_ms)])
                        .collect(),
                ),
            }
        }
        AuditorCmd::Remove { name } => {
            members
                .remove_auditor(c.req(pb::RemoveAuditorRequest { name: name.clone() }))
                .await?;
            match cli.output {
                Output::Json => print_json(&json!({ "auditor": name, "removed": true })),
                Output::Table => eprintln!("auditor {name} removed; its token no longer works"),
            }
        }
    }
    Ok(())
}

pub async fn operator(cli: &ClientArgs, cmd: OperatorCmd) -> anyhow::Result<()> {
    let OperatorCmd::Token(OperatorTokenCmd::Rotate) = cmd;
    let c = Client::connect(cli).await?;
    let r = c
        .members()
        .rotate_token(c.req(pb::RotateTokenRequest {
            account: "operator".into(),
            token_ttl_s: 0,
        }))
        .await?
        .into_inner();
    let what = "new operator token (the old one no longer works on any scheduler; \
                update COOP_TOKEN and anything that kept the old one)";
    print_secret(cli, what, json!({ "token": r.token }), &r.token);
    Ok(())
}

pub async fn node(cli: &ClientArgs, c: &Client, cmd: NodeCmd) -> anyhow::Result<()> {
    let mut cluster = c.cluster();
    match cmd {
        NodeCmd::List | NodeCmd::Drain { .. } | NodeCmd::Resume { .. } => {
            unreachable!("handled by commands::node")
        }
        NodeCmd::Enroll { name, owner, ttl } => {
            if ttl.is_zero() {
                bail!("ttl: must be more than 0");
            }
            let r = cluster
                .enroll_node(c.req(pb::EnrollNodeRequest {
                    node: name.clone(),
                    owner: owner.clone(),
                    ttl_s: ttl_s(Some(ttl)),
                }))
                .await?
                .into_inner();
            match cli.output {
                Output::Json => print_json(&json!({
                    "node": name,
                    "owner": owner,
                    "join_token": r.join_token,
                    "expires_at": rfc3339(r.expires_at_ms),
                })),
                Output::Table => {
                    eprintln!(
                        "join token for node {name} of {owner}, good once until {}; on that machine:",
                        show_time(r.expires_at_ms)
                    );
                    eprintln!(
                        "  coop agent run --scheduler ADDR --ca ca.pem --data-dir DIR --join TOKEN"
                    );
                    println!("{}", r.join_token);
                }
            }
        }
        NodeCmd::Revoke { name } => {
            cluster
                .revoke_node(c.req(pb::RevokeNodeRequest { node: name.clone() }))
                .await?;
            match cli.output {
                Output::Json => print_json(&json!({ "node": name, "revoked": true })),
                Output::Table => println!(
                    "node {name} revoked: its credential no longer works, its runs are requeued"
                ),
            }
        }
    }
    Ok(())
}

pub fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            coop_scheduler::tls::init_ca(&dir)?;
            eprintln!(
                "cluster CA made in {}: ca.pem (give it to clients and agents), ca.key (keep it secret)",
                dir.display()
            );
        }
        CaCmd::Issue {
            ca_dir,
            name,
            host,
            out,
        } => {
            let hosts: Vec<String> = host
                .iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect();
            coop_scheduler::tls::issue(&ca_dir, &name, &hosts, &out)?;
            eprintln!(
                "certificate for {} in {}: start the scheduler with --tls-dir {}",
                hosts.join(", "),
                out.display(),
                out.display()
            );
        }
    }
    Ok(())
}
