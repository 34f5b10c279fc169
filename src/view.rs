//! How the CLI shows what a scheduler answers: tables, JSON, times and names;
//! and how it reads a list that comes in pages.

use std::time::{Duration, UNIX_EPOCH};

use coop_proto::v1 as pb;
use serde_json::{Value, json};

use crate::args::StateArg;

pub(crate) fn rfc3339(ms: i64) -> Value {
    if ms <= 0 {
        return Value::Null;
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
    Value::String(humantime::format_rfc3339_millis(t).to_string())
}

pub(crate) fn kind_name(k: i32) -> &'static str {
    match pb::JobKind::try_from(k) {
        Ok(pb::JobKind::Finetune) => "finetune",
        Ok(pb::JobKind::Inference) => "inference",
        _ => "unknown",
    }
}

pub(crate) fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s) {
        Ok(pb::JobState::Pending) => "pending",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        Ok(pb::JobState::Lost) => "lost",
        _ => "unknown",
    }
}

pub(crate) fn job_json(j: &pb::Job) -> Value {
    let mut v = json!({
        "id": j.id,
        "member": j.member,
        "kind": kind_name(j.kind),
        "state": state_name(j.state),
        "gpu_count": j.gpu_count,
        "gpus": j.gpus,
        "node": if j.node.is_empty() { Value::Null } else { json!(j.node) },
        "command": j.command,
        "gpu_model": if j.gpu_model.is_empty() { Value::Null } else { json!(j.gpu_model) },
        "preemptible": j.preemptible,
        "exit_code": j.exit_code,
        "attempts": j.attempts,
        "submitted_at": rfc3339(j.submitted_at_ms),
        "started_at": rfc3339(j.started_at_ms),
        "finished_at": rfc3339(j.finished_at_ms),
        "cancel_requested": j.cancel_requested,
        "kill_grace_s": j.kill_grace_ms as f64 / 1000.0,
        "reason": j.reason,
        "gpu_seconds": j.gpu_ms as f64 / 1000.0,
        "units": j.weighted_gpu_ms as f64 / 3_600_000.0,
        "energy_j": j.energy_mj as f64 / 1000.0,
        "priority": j.priority,
        "time_limit_s": if j.time_limit_ms == 0 { Value::Null } else { json!(j.time_limit_ms as f64 / 1000.0) },
        "preemptions": j.preemptions,
        "preempted_for": if j.preempted_for.is_empty() { Value::Null } else { json!(j.preempted_for) },
        "cpus": if j.cpu_millis == 0 { Value::Null } else { json!(j.cpu_millis as f64 / 1000.0) },
        "memory_mb": if j.memory_mb == 0 { Value::Null } else { json!(j.memory_mb) },
        "image": if j.image.is_empty() { Value::Null } else { json!(j.image) },
        // Names only: the values may hold the member's secrets.
        "env": j.env_names,
        "gpu_utilization_pct": j.gpu_utilization_pct,
    });
    let opt = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    let extra = json!({
        "name": opt(&j.name),
        "workdir": opt(&j.workdir),
        "after_ok": j.after_ok,
        "after_any": j.after_any,
        "held": j.held,
        "array_id": opt(&j.array_id),
        "array_task": j.array_task,
        "array_limit": if j.array_limit == 0 { Value::Null } else { json!(j.array_limit) },
        "wait_reason": opt(&j.wait_reason),
        "wait_detail": opt(&j.wait_detail),
        "nodes": if j.nodes == 0 { Value::Null } else { json!(j.nodes) },
        "gpus_per_node": if j.gpus_per_node == 0 { Value::Null } else { json!(j.gpus_per_node) },
        // Of a multi-node run, each node's process, by rank.
        "parts": j.parts.iter().map(|p| json!({
            "rank": p.rank,
            "node": p.node,
            "gpus": p.gpus,
            "started_at": rfc3339(p.started_at_ms),
            "state": if !p.ended { "running" } else if p.exit_code.is_some() { "exited" } else { "lost" },
            "exit_code": p.exit_code,
            "reason": opt(&p.reason),
        })).collect::<Vec<_>>(),
    });
    if let (Value::Object(v), Value::Object(x)) = (&mut v, extra) {
        v.extend(x);
    }
    v
}

pub(crate) fn state_to_pb(s: StateArg) -> pb::JobState {
    match s {
        StateArg::Pending => pb::JobState::Pending,
        StateArg::Running => pb::JobState::Running,
        StateArg::Completed => pb::JobState::Completed,
        StateArg::Failed => pb::JobState::Failed,
        StateArg::Cancelled => pb::JobState::Cancelled,
        StateArg::Lost => pb::JobState::Lost,
    }
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Prints rows as aligned columns.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    debug_assert!(
        rows.iter().all(|r| r.len() == header.len()),
        "a row does not match the header {header:?}"
    );
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub(crate) fn ago(ms: i64, now: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let s = ((now - ms).max(0) / 1000) as u64;
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

pub(crate) fn now_ms() -> i64 {
    coop_scheduler::clock::now_ms()
}

pub(crate) fn show_time(ms: i64) -> String {
    rfc3339(ms).as_str().unwrap_or("-").to_string()
}

/// Fetches pages of a list until none is left or `limit` items are in hand;
/// returns them and the page token of the rest (empty when there is none).
pub async fn pages<T, F, Fut>(
    limit: Option<u32>,
    mut token: String,
    mut fetch: F,
) -> anyhow::Result<(Vec<T>, String)>
where
    F: FnMut(u32, String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut out = Vec::new();
    loop {
        let want = limit.map_or(0, |l| l.saturating_sub(out.len() as u32));
        let (items, next) = fetch(want, token).await?;
        out.extend(items);
        token = next;
        if token.is_empty() || limit.is_some_and(|l| out.len() as u32 >= l) {
            return Ok((out, token));
        }
    }
}
