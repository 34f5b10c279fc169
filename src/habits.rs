//! The Slurm and Nomad habits of the CLI: cancel by filter, hold and
//! release, dependencies, node drain and resume.

use anyhow::{anyhow, bail};
use coop_proto::v1 as pb;
use serde_json::{Value, json};

use crate::args::*;
use crate::client::Client;
use crate::view::{job_json, pages, print_json, state_name, state_to_pb};

/// `afterok:ID[:ID..][,afterany:ID..]`: the jobs waited for successfully, and
/// those waited for however they end.
pub fn parse_dependency(s: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut ok, mut any) = (vec![], vec![]);
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, ids) = part.split_once(':').ok_or_else(|| {
            anyhow!("dependency: {part:?} is not afterok:ID[:ID..] or afterany:ID[:ID..]")
        })?;
        let into = match kind {
            "afterok" => &mut ok,
            "afterany" => &mut any,
            other => bail!("dependency: {other:?} is not supported (afterok, afterany)"),
        };
        for id in ids.split(':') {
            if id.trim().is_empty() {
                bail!("dependency: {part:?} names an empty job id");
            }
            into.push(id.trim().to_string());
        }
    }
    if ok.is_empty() && any.is_empty() {
        bail!("dependency: name at least one job, e.g. afterok:ID");
    }
    Ok((ok, any))
}

/// `coop job cancel`: ids, or the jobs a filter selects (listed first, with
/// the caller's own rights), cancelled in one command.
pub async fn cancel(cli: &ClientArgs, c: &Client, a: CancelArgs) -> anyhow::Result<()> {
    let filtered =
        a.member.is_some() || !a.state.is_empty() || a.name.is_some() || a.node.is_some();
    let one = a.ids.len() == 1;
    let ids = if !a.ids.is_empty() {
        if filtered || a.all {
            bail!("ids: give job ids or filters (--member, --state, --name, --node), not both");
        }
        a.ids
    } else {
        if !filtered && !a.all {
            bail!(
                "ids: name jobs, or select them with --member, --state, --name or --node (--all for every job you may cancel)"
            );
        }
        let states: Vec<i32> = if a.state.is_empty() {
            vec![pb::JobState::Pending as i32, pb::JobState::Running as i32]
        } else {
            a.state.iter().map(|s| state_to_pb(*s) as i32).collect()
        };
        let (member, name, node) = (
            a.member.unwrap_or_default(),
            a.name.unwrap_or_default(),
            a.node.unwrap_or_default(),
        );
        let (list, _) = pages(None, String::new(), |limit, page_token| {
            let mut jobs = c.jobs();
            let req = c.req(pb::ListJobsRequest {
                states: states.clone(),
                member: member.clone(),
                name: name.clone(),
                node: node.clone(),
                limit,
                page_token,
                ..Default::default()
            });
            async move {
                let r = jobs.list(req).await?.into_inner();
                Ok((r.jobs, r.next_page_token))
            }
        })
        .await?;
        let ids: Vec<String> = list.into_iter().map(|j| j.id).collect();
        if ids.is_empty() {
            match cli.output {
                Output::Json => print_json(&json!([])),
                Output::Table => println!("no job matches"),
            }
            return Ok(());
        }
        ids
    };
    let mut jobs = vec![];
    for chunk in ids.chunks(pb_max_ids()) {
        let r = c
            .jobs()
            .cancel(c.req(pb::CancelJobRequest {
                id: String::new(),
                ids: chunk.to_vec(),
            }))
            .await?
            .into_inner();
        jobs.extend(r.jobs);
    }
    if one && jobs.len() == 1 && matches!(cli.output, Output::Json) {
        // One job named: its object, as before.
        print_json(&job_json(&jobs[0]));
        return Ok(());
    }
    print_changed(cli, &jobs, |j| {
        if j.cancel_requested {
            format!(
                "stopping (SIGTERM, then SIGKILL after {} s)",
                j.kill_grace_ms / 1000
            )
        } else {
            state_name(j.state).to_string()
        }
    });
    Ok(())
}

fn pb_max_ids() -> usize {
    10_000
}

fn print_changed(cli: &ClientArgs, jobs: &[pb::Job], what: impl Fn(&pb::Job) -> String) {
    match cli.output {
        Output::Json => print_json(&Value::Array(jobs.iter().map(job_json).collect())),
        Output::Table => {
            for j in jobs {
                println!("{}: {}", j.id, what(j));
            }
        }
    }
}

/// `coop job hold` / `coop job release`.
pub async fn hold(
    cli: &ClientArgs,
    c: &Client,
    ids: Vec<String>,
    held: bool,
) -> anyhow::Result<()> {
    let req = c.req(pb::HoldJobsRequest { ids });
    let r = if held {
        c.jobs().hold(req).await?
    } else {
        c.jobs().release(req).await?
    }
    .into_inner();
    print_changed(cli, &r.jobs, |j| {
        if j.held { "held" } else { "released" }.to_string()
    });
    Ok(())
}

/// `coop node drain` / `coop node resume`.
pub async fn node(cli: &ClientArgs, c: &Client, cmd: NodeCmd) -> anyhow::Result<()> {
    let (node, requeued) = match cmd {
        NodeCmd::Drain { name, reason, now } => {
            let r = c
                .cluster()
                .drain_node(c.req(pb::DrainNodeRequest {
                    node: name,
                    reason: reason.unwrap_or_default(),
                    now,
                }))
                .await?
                .into_inner();
            (r.node.unwrap_or_default(), r.requeued)
        }
        NodeCmd::Resume { name } => {
            let r = c
                .cluster()
                .resume_node(c.req(pb::ResumeNodeRequest { node: name }))
                .await?
                .into_inner();
            (r.node.unwrap_or_default(), vec![])
        }
        _ => unreachable!("only drain and resume come here"),
    };
    match cli.output {
        Output::Json => print_json(&json!({
            "name": node.name,
            "drain": if node.drain.is_empty() { Value::Null } else { json!(node.drain) },
            "drain_reason": if node.drain_reason.is_empty() { Value::Null } else { json!(node.drain_reason) },
            "requeued": requeued,
        })),
        Output::Table => {
            let state = if node.drain.is_empty() {
                "resumed"
            } else {
                node.drain.as_str()
            };
            if node.drain_reason.is_empty() {
                println!("{}: {state}", node.name);
            } else {
                println!("{}: {state} ({})", node.name, node.drain_reason);
            }
            for j in requeued {
                println!("{j}: stopping, to be requeued");
            }
        }
    }
    Ok(())
}

/// `NODELIST(REASON)` as squeue shows it: the node of a job that has run,
/// the reason of one that waits.
pub fn node_or_reason(j: &pb::Job) -> String {
    if j.state == pb::JobState::Pending as i32 {
        let why = if j.wait_reason.is_empty() {
            "Priority"
        } else {
            j.wait_reason.as_str()
        };
        return format!("({why})");
    }
    if !j.parts.is_empty() {
        // As squeue's NODELIST: every node of a multi-node run.
        return j
            .parts
            .iter()
            .map(|p| p.node.as_str())
            .collect::<Vec<_>>()
            .join(",");
    }
    if j.node.is_empty() {
        "-".into()
    } else {
        j.node.clone()
    }
}

/// An array task as `ARRAY_TASK` (the array's first 8 characters), or "-".
pub fn array_label(j: &pb::Job) -> String {
    match j.array_task {
        Some(t) if !j.array_id.is_empty() => {
            format!("{}_{t}", &j.array_id[..8.min(j.array_id.len())])
        }
        _ => "-".into(),
    }
}
