//! Client commands: job, member, usage, cluster, node.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use coop_proto::v1 as pb;
use serde_json::{Value, json};

use crate::args::*;
use crate::client::Client;
use crate::view::*;

fn job_row(j: &pb::Job, now: i64) -> Vec<String> {
    vec![
        j.id.clone(),
        if j.name.is_empty() {
            "-".into()
        } else {
            j.name.clone()
        },
        crate::habits::array_label(j),
        j.member.clone(),
        kind_name(j.kind).into(),
        state_name(j.state).into(),
        j.gpu_count.to_string(),
        crate::habits::node_or_reason(j),
        j.attempts.to_string(),
        // A requeued job's last exit is not its own yet.
        j.exit_code
            .filter(|_| j.state != pb::JobState::Pending as i32)
            .map_or("-".into(), |c| c.to_string()),
        ago(j.submitted_at_ms, now),
    ]
}

const JOB_HEADER: [&str; 11] = [
    "ID",
    "NAME",
    "ARRAY",
    "MEMBER",
    "KIND",
    "STATE",
    "GPUS",
    "NODELIST(REASON)",
    "ATTEMPTS",
    "EXIT",
    "AGE",
];

/// Submits, and while no scheduler can confirm it (a leader election, a node
/// down) tries again for up to `--timeout`; each try goes through every
/// address. The request id makes a resent submission return the job it
/// created rather than a second one.
async fn submit_retrying(
    cli: &ClientArgs,
    c: &Client,
    req: pb::SubmitJobRequest,
) -> anyhow::Result<pb::Job> {
    let deadline = std::time::Instant::now() + cli.timeout;
    loop {
        match c.jobs().submit(c.req(req.clone())).await {
            Ok(r) => return Ok(r.into_inner().job.unwrap_or_default()),
            // Unknown is how a connection cut mid-call (a node killed)
            // surfaces; the request id makes resending safe.
            Err(s)
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
                    && std::time::Instant::now() + Duration::from_millis(200) < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

/// The member's environment for a job: `--env-file` lines, then `--env`.
fn job_env(
    files: &[std::path::PathBuf],
    pairs: &[(String, String)],
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut env = std::collections::HashMap::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow!("env-file: cannot read {}: {e}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (k, v) = parse_env(line)
                .map_err(|e| anyhow!("env-file: {}, line {}: {e}", f.display(), n + 1))?;
            env.insert(k, v);
        }
    }
    env.extend(pairs.iter().cloned());
    Ok(env)
}

pub async fn job(cli: &ClientArgs, cmd: JobCmd) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    let mut jobs = c.jobs();
    match cmd {
        JobCmd::Submit(a) => {
            if a.gpus <= 0 {
                bail!("gpus: must be at least 1 (got {})", a.gpus);
            }
            let gpus =
                u32::try_from(a.gpus).map_err(|_| anyhow!("gpus: {} is too many", a.gpus))?;
            let kill_grace_ms = match a.grace {
                Some(d) if d.is_zero() => bail!("grace: must be more than 0"),
                Some(d) => d.as_millis() as u64,
                None => 0,
            };
            let deps = match &a.dependency {
                Some(d) => crate::habits::parse_dependency(d)?,
                None => (vec![], vec![]),
            };
            if a.nodes == Some(0) {
                bail!("nodes: must be at least 1");
            }
            if a.gpus_per_node == Some(0) {
                bail!("gpus_per_node: must be at least 1");
            }
            let req = pb::SubmitJobRequest {
                nodes: a.nodes.unwrap_or(0),
                gpus_per_node: a.gpus_per_node.unwrap_or(0),
                kind: match a.kind {
                    Kind::Finetune => pb::JobKind::Finetune,
                    Kind::Inference => pb::JobKind::Inference,
                } as i32,
                gpus,
                command: a.command,
                gpu_model: a.gpu_model.unwrap_or_default(),
                min_gpu_memory_mb: a.min_memory_gb * 1024,
                preemptible: a.preemptible,
                kill_grace_ms,
                member: a.member.unwrap_or_default(),
                priority: a.priority,
                time_limit_ms: match a.time_limit {
                    Some(d) if d.is_zero() => bail!("time_limit: must be more than 0"),
                    Some(d) => d.as_millis() as u64,
                    None => 0,
                },
                name: a.name.unwrap_or_default(),
                workdir: a.workdir.unwrap_or_default(),
                after_ok: deps.0,
                after_any: deps.1,
                array: a.array.unwrap_or_default(),
                hold: a.hold,
                request_id: uuid::Uuid::new_v4().to_string(),
                cpu_millis: a.cpus.unwrap_or(0),
                memory_mb: a.memory.unwrap_or(0),
                image: a.image.unwrap_or_default(),
                env: job_env(&a.env_file, &a.env)?,
            };
            let job = submit_retrying(cli, &c, req).await?;
            match cli.output {
                Output::Json => print_json(&job_json(&job)),
                // An array: its id, which names all its tasks.
                Output::Table if !job.array_id.is_empty() => println!("{}", job.array_id),
                Output::Table => println!("{}", job.id),
            }
        }
        JobCmd::List(a) => {
            let states: Vec<i32> = a.state.iter().map(|s| state_to_pb(*s) as i32).collect();
            let member = a.member.unwrap_or_default();
            let (name, node, array_id) = (
                a.name.unwrap_or_default(),
                a.node.unwrap_or_default(),
                a.array.unwrap_or_default(),
            );
            let (from_ms, to_ms) = (a.since.map_or(0, unix_ms), a.until.map_or(0, unix_ms));
            let (list, rest) = pages(
                a.limit,
                a.page_token.unwrap_or_default(),
                |limit, page_token| {
                    let mut jobs = jobs.clone();
                    let req = c.req(pb::ListJobsRequest {
                        states: states.clone(),
                        member: member.clone(),
                        limit,
                        page_token,
                        name: name.clone(),
                        node: node.clone(),
                        from_ms,
                        to_ms,
                        array_id: array_id.clone(),
                    });
                    async move {
                        let r = jobs.list(req).await?.into_inner();
                        Ok((r.jobs, r.next_page_token))
                    }
                },
            )
            .await?;
            if !rest.is_empty() {
                eprintln!("more jobs follow: add --page-token {rest}");
            }
            match cli.output {
                Output::Json => print_json(&Value::Array(list.iter().map(job_json).collect())),
                Output::Table => {
                    let now = now_ms();
                    table(&JOB_HEADER, list.iter().map(|j| job_row(j, now)).collect())
                }
            }
        }
        JobCmd::Get(IdArg { id }) => {
            let job = jobs
                .get(c.req(pb::GetJobRequest { id }))
                .await?
                .into_inner()
                .job
                .unwrap_or_default();
            match cli.output {
                Output::Json => print_json(&job_json(&job)),
                Output::Table => print_job_detail(&job),
            }
        }
        JobCmd::Cancel(a) => crate::habits::cancel(cli, &c, a).await?,
        JobCmd::Hold(a) => crate::habits::hold(cli, &c, a.ids, true).await?,
        JobCmd::Release(a) => crate::habits::hold(cli, &c, a.ids, false).await?,
        JobCmd::Logs(a) => {
            // A job's output is bytes as the job wrote them (stdout and
            // stderr together, not necessarily text): nothing to put in JSON.
            if cli.output == Output::Json {
                bail!(
                    "output: job logs prints the job's output as it wrote it; --output json has no meaning here"
                );
            }
            let mut offset = 0;
            let mut out = std::io::stdout().lock();
            loop {
                let req = pb::JobLogsRequest {
                    id: a.id.clone(),
                    attempt: a.attempt,
                    rank: a.rank,
                    offset,
                    limit: 0,
                };
                let r = jobs.logs(c.req(req)).await?.into_inner();
                out.write_all(&r.data)?;
                out.flush()?;
                offset = r.next_offset;
                if r.eof || (!a.follow && r.data.is_empty()) {
                    break;
                }
                if r.data.is_empty() {
                    // Following: the agent has nothing new yet.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        JobCmd::Watch(IdArg { id }) => {
            // A scheduler that stops ends the stream with UNAVAILABLE (not
            // applied): watch on through another, printing only what changed.
            let mut shown = None;
            let mut stream = jobs
                .watch(c.req(pb::WatchJobRequest { id: id.clone() }))
                .await?
                .into_inner();
            loop {
                let ev = match stream.message().await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(s)
                        if s.code() == tonic::Code::Unavailable
                            && s.metadata().contains_key(crate::client::NOT_APPLIED_HEADER)
                            && cli.addr.split(',').filter(|a| !a.trim().is_empty()).count() > 1 =>
                    {
                        eprintln!("({}; watching on)", s.message());
                        stream = jobs
                            .watch(c.req(pb::WatchJobRequest { id: id.clone() }))
                            .await?
                            .into_inner();
                        continue;
                    }
                    Err(s) => return Err(s.into()),
                };
                let Some(j) = ev.job else { continue };
                // Each part of a multi-node run starts and ends on its own.
                let parts: Vec<(i64, bool, Option<i32>)> = j
                    .parts
                    .iter()
                    .map(|p| (p.started_at_ms, p.ended, p.exit_code))
                    .collect();
                let seen = Some((
                    j.state,
                    j.attempts,
                    j.cancel_requested,
                    j.started_at_ms,
                    j.node.clone(),
                    parts,
                ));
                if seen == shown {
                    continue;
                }
                shown = seen;
                match cli.output {
                    Output::Json => println!("{}", job_json(&j)),
                    Output::Table => {
                        // A job that has ended: when it ended, not when this
                        // line is printed.
                        let when = rfc3339(if j.finished_at_ms > 0 {
                            j.finished_at_ms
                        } else {
                            now_ms()
                        });
                        let mut line = format!(
                            "{}  {}  {}",
                            when.as_str().unwrap_or("-"),
                            j.id,
                            state_name(j.state)
                        );
                        let running = j.state == pb::JobState::Running as i32;
                        if running && !j.parts.is_empty() {
                            let nodes: Vec<&str> =
                                j.parts.iter().map(|p| p.node.as_str()).collect();
                            line.push_str(&format!(
                                "  nodes={} attempt={}",
                                nodes.join(","),
                                j.attempts
                            ));
                        } else if running {
                            line.push_str(&format!("  node={} attempt={}", j.node, j.attempts));
                            if j.started_at_ms == 0
                                || j.parts.iter().any(|p| p.started_at_ms == 0 && !p.ended)
                            {
                                line.push_str("  (starting)");
                            }
                            if j.cancel_requested {
                                line.push_str("  (stopping)");
                            }
                        }
                        if let Some(code) = j
                            .exit_code
                            .filter(|_| j.state != pb::JobState::Running as i32)
                        {
                            line.push_str(&format!("  exit={code}"));
                        }
                        if !j.reason.is_empty() {
                            line.push_str(&format!("  {}", j.reason));
                        }
                        println!("{line}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_job_detail(j: &pb::Job) {
    let v = job_json(j);
    let show = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for key in [
        "id",
        "member",
        "kind",
        "state",
        "gpu_count",
        "gpus",
        "node",
        "name",
        "command",
        "env",
        "workdir",
        "after_ok",
        "after_any",
        "held",
        "array_id",
        "array_task",
        "wait_reason",
        "wait_detail",
        "attempts",
        "exit_code",
        "submitted_at",
        "started_at",
        "finished_at",
        "gpu_seconds",
        "reason",
    ] {
        let val = match &v[key] {
            Value::Array(a) => a.iter().map(show).collect::<Vec<_>>().join(" "),
            other => show(other),
        };
        println!("{:<13} {}", format!("{key}:"), val);
    }
    // A multi-node run: one line per node's process.
    for p in &j.parts {
        let state = match (p.ended, p.exit_code) {
            (false, _) => "running".to_string(),
            (true, Some(code)) => format!("exit={code}"),
            (true, None) => "lost".to_string(),
        };
        let why = if p.reason.is_empty() {
            String::new()
        } else {
            format!("  {}", p.reason)
        };
        println!(
            "{:<13} {}  {} GPUs  {state}{why}",
            format!("rank {}:", p.rank),
            p.node,
            p.gpus.len()
        );
    }
}

fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM` as [first instant of the month, first instant of the next), Unix ms.
fn month(period: &str) -> anyhow::Result<(i64, i64)> {
    let bad = || anyhow!("period: {period:?} is not a month like 2026-11");
    let (y, m) = period.split_once('-').ok_or_else(bad)?;
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(1..=12).contains(&m) || !(1970..=9999).contains(&y) {
        return Err(bad());
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let at = |y: i32, m: u32| -> anyhow::Result<i64> {
        let t =
            humantime::parse_rfc3339(&format!("{y:04}-{m:02}-01T00:00:00Z")).map_err(|_| bad())?;
        Ok(unix_ms(t))
    };
    Ok((at(y, m)?, at(ny, nm)?))
}

async fn statement(cli: &ClientArgs, a: StatementArgs) -> anyhow::Result<()> {
    let (from_ms, to_ms) = match (&a.period, a.from, a.to) {
        (Some(p), _, _) => month(p)?,
        (None, Some(f), Some(t)) => (unix_ms(f), unix_ms(t)),
        _ => bail!("period: give --period YYYY-MM, or --from and --to"),
    };
    if to_ms <= from_ms {
        bail!("to: the period must end after it starts");
    }
    let c = Client::connect(cli).await?;
    let st = c
        .usage()
        .statement(c.req(pb::StatementRequest {
            member: a.member.unwrap_or_default(),
            from_ms,
            to_ms,
        }))
        .await?
        .into_inner();
    let hours = |ms: u64| ms as f64 / 3_600_000.0;
    let kwh = |mj: u64| mj as f64 / 3.6e9;
    let used_units: u64 = st.by_model.iter().map(|m| m.weighted_gpu_ms).sum();
    let used_kwh: u64 = st.by_model.iter().map(|m| m.energy_mj).sum();
    let used_gpu: u64 = st.by_model.iter().map(|m| m.gpu_ms).sum();
    if cli.output == Output::Json {
        print_json(&json!({
            "member": st.member,
            "from": rfc3339(st.from_ms),
            "to": rfc3339(st.to_ms),
            "by_model": st.by_model.iter().map(|m| json!({
                "model": m.model,
                "gpu_hours": hours(m.gpu_ms),
                "units": hours(m.weighted_gpu_ms),
                "energy_kwh": kwh(m.energy_mj),
            })).collect::<Vec<_>>(),
            "gpu_hours": hours(used_gpu),
            "units": hours(used_units),
            "energy_kwh": kwh(used_kwh),
            "jobs": st.jobs,
            "preemptions_suffered": st.preemptions_suffered,
            "preemptions_caused": st.preemptions_caused,
            "contributed_gpu_hours": hours(st.contributed_gpu_ms),
            "contributed_units": hours(st.contributed_weighted_gpu_ms),
            "balance_units": st.balance_weighted_gpu_ms as f64 / 3_600_000.0,
            "as_of": rfc3339(st.as_of_ms),
        }));
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = st
        .by_model
        .iter()
        .map(|m| {
            vec![
                m.model.clone(),
                format!("{:.3}", hours(m.gpu_ms)),
                format!("{:.3}", hours(m.weighted_gpu_ms)),
                format!("{:.4}", kwh(m.energy_mj)),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        format!("{:.3}", hours(used_gpu)),
        format!("{:.3}", hours(used_units)),
        format!("{:.4}", kwh(used_kwh)),
    ]);
    if a.csv {
        let mut w = csv::Writer::from_writer(std::io::stdout());
        w.write_record([
            "member",
            "from",
            "to",
            "model",
            "gpu_hours",
            "units",
            "energy_kwh",
        ])?;
        let (from, to) = (show_time(st.from_ms), show_time(st.to_ms));
        for r in &rows {
            w.write_record([&st.member, &from, &to, &r[0], &r[1], &r[2], &r[3]])?;
        }
        w.flush()?;
        return Ok(());
    }
    println!(
        "statement of {} for {} to {}",
        st.member,
        show_time(st.from_ms),
        show_time(st.to_ms)
    );
    println!();
    table(&["GPU MODEL", "GPU-HOURS", "UNITS", "KWH"], rows);
    println!();
    println!("jobs run: {}", st.jobs);
    println!(
        "preemptions: {} suffered, {} caused",
        st.preemptions_suffered, st.preemptions_caused
    );
    println!(
        "contributed: {:.3} GPU-hours ({:.3} units) by the member's nodes",
        hours(st.contributed_gpu_ms),
        hours(st.contributed_weighted_gpu_ms)
    );
    println!(
        "balance: {:+.3} units (contributed minus used)",
        st.balance_weighted_gpu_ms as f64 / 3_600_000.0
    );
    Ok(())
}

pub async fn usage(cli: &ClientArgs, a: UsageArgs) -> anyhow::Result<()> {
    if let Some(UsageCmd::Statement(s)) = a.statement {
        if a.member.is_some() || a.since.is_some() || a.from.is_some() || a.to.is_some() {
            bail!(
                "statement: --member, --since, --from and --to of a statement go after `statement`"
            );
        }
        return statement(cli, s).await;
    }
    let now = unix_ms(std::time::SystemTime::now());
    let from_ms = match (a.since, a.from) {
        (Some(d), _) => (now - d.as_millis() as i64).max(1),
        (None, Some(t)) => unix_ms(t),
        (None, None) => 0,
    };
    let to_ms = a.to.map_or(0, unix_ms);
    if to_ms > 0 && from_ms > to_ms {
        bail!("from: the window starts after it ends");
    }
    let c = Client::connect(cli).await?;
    let r = c
        .usage()
        .get(c.req(pb::GetUsageRequest {
            member: a.member.unwrap_or_default(),
            from_ms,
            to_ms,
        }))
        .await?
        .into_inner();
    let units = |u: &pb::MemberUsage| u.weighted_gpu_ms as f64 / 3_600_000.0;
    let kwh = |u: &pb::MemberUsage| u.energy_mj as f64 / 3.6e9;
    match cli.output {
        Output::Json => print_json(&json!({
            "as_of": rfc3339(r.as_of_ms),
            "from": rfc3339(r.from_ms),
            "to": rfc3339(r.to_ms),
            "members": r.members.iter().map(|u| json!({
                "member": u.member,
                "gpu_seconds": u.gpu_ms as f64 / 1000.0,
                "gpu_hours": u.gpu_ms as f64 / 3_600_000.0,
                "units": units(u),
                "energy_j": u.energy_mj as f64 / 1000.0,
                "energy_kwh": kwh(u),
                "running_jobs": u.running_jobs,
                "running_gpus": u.running_gpus,
                "pending_jobs": u.pending_jobs,
                "finished_jobs": u.finished_jobs,
                "entitlement": u.entitlement,
                "decayed_usage": u.decayed_usage,
                "factor": u.factor,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => table(
            &[
                "MEMBER",
                "GPU-HOURS",
                "UNITS",
                "KWH",
                "RUNNING",
                "GPUS",
                "PENDING",
                "FINISHED",
                "ENTITLED",
                "FACTOR",
            ],
            r.members
                .iter()
                .map(|u| {
                    vec![
                        u.member.clone(),
                        format!("{:.3}", u.gpu_ms as f64 / 3_600_000.0),
                        format!("{:.3}", units(u)),
                        format!("{:.3}", kwh(u)),
                        u.running_jobs.to_string(),
                        u.running_gpus.to_string(),
                        u.pending_jobs.to_string(),
                        u.finished_jobs.to_string(),
                        format!("{:.1}%", u.entitlement * 100.0),
                        format!("{:.3}", u.factor),
                    ]
                })
                .collect(),
        ),
    }
    Ok(())
}

pub async fn fairshare(cli: &ClientArgs, a: FairshareArgs) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    let r = c
        .usage()
        .fair_share(c.req(pb::FairShareRequest {
            member: a.member.unwrap_or_default(),
        }))
        .await?
        .into_inner();
    match cli.output {
        Output::Json => print_json(&json!({
            "ordering": r.ordering,
            "half_life_s": r.half_life_s,
            "gpus_total": r.gpus_total,
            "as_of": rfc3339(r.as_of_ms),
            "members": r.members.iter().map(|m| json!({
                "member": m.member,
                "shares": m.shares,
                "contributed_gpus": m.contributed_gpus,
                "entitlement": m.entitlement,
                "decayed_usage": m.decayed_usage,
                "usage_fraction": m.usage_fraction,
                "factor": m.factor,
                "running_gpus": m.running_gpus,
                "pending_jobs": m.pending_jobs,
            })).collect::<Vec<_>>(),
            "waiting": r.waiting.iter().map(|w| json!({
                "id": w.job_id,
                "member": w.member,
                "gpus": w.gpus,
                "priority": w.priority,
                "position": w.position,
                "submitted_at": rfc3339(w.submitted_at_ms),
                "reason": w.reason,
            })).collect::<Vec<_>>(),
            "waiting_total": r.waiting_total,
        })),
        Output::Table => {
            println!(
                "ordering: {}   half-life: {}   GPUs up: {}",
                r.ordering,
                humantime::format_duration(Duration::from_secs(r.half_life_s)),
                r.gpus_total
            );
            println!();
            table(
                &[
                    "MEMBER",
                    "SHARES",
                    "OWN GPUS",
                    "ENTITLED",
                    "USAGE (UNIT-H)",
                    "USED",
                    "FACTOR",
                    "RUNNING GPUS",
                    "PENDING",
                ],
                r.members
                    .iter()
                    .map(|m| {
                        vec![
                            m.member.clone(),
                            m.shares.to_string(),
                            m.contributed_gpus.to_string(),
                            format!("{:.1}%", m.entitlement * 100.0),
                            format!("{:.3}", m.decayed_usage),
                            format!("{:.1}%", m.usage_fraction * 100.0),
                            format!("{:.3}", m.factor),
                            m.running_gpus.to_string(),
                            m.pending_jobs.to_string(),
                        ]
                    })
                    .collect(),
            );
            if !r.waiting.is_empty() {
                println!();
                table(
                    &["POS", "JOB", "MEMBER", "GPUS", "PRIO", "WHY IT WAITS"],
                    r.waiting
                        .iter()
                        .map(|w| {
                            vec![
                                if w.position == 0 {
                                    "-".into()
                                } else {
                                    w.position.to_string()
                                },
                                w.job_id.clone(),
                                w.member.clone(),
                                w.gpus.to_string(),
                                w.priority.to_string(),
                                w.reason.clone(),
                            ]
                        })
                        .collect(),
                );
                let more = r.waiting_total as usize - r.waiting.len().min(r.waiting_total as usize);
                if more > 0 {
                    println!("... and {more} more waiting behind these");
                }
            }
        }
    }
    Ok(())
}

fn proposal_json(p: &pb::PolicyProposal) -> Value {
    json!({
        "id": p.id, "state": p.state, "settings": p.settings, "by": p.by, "reason": p.reason,
        "approvals": p.approvals, "required": p.required,
        "created_at": rfc3339(p.created_at_ms), "expires_at": rfc3339(p.expires_at_ms),
    })
}

fn print_proposals(cli: &ClientArgs, ps: &[pb::PolicyProposal], one: bool) {
    match cli.output {
        Output::Json if one => print_json(&proposal_json(&ps[0])),
        Output::Json => print_json(&Value::Array(ps.iter().map(proposal_json).collect())),
        Output::Table => table(
            &["ID", "STATE", "APPROVALS", "EXPIRES", "SET", "BY", "WHY"],
            ps.iter()
                .map(|p| {
                    vec![
                        p.id.to_string(),
                        p.state.clone(),
                        format!(
                            "{}/{} {}",
                            p.approvals.len(),
                            p.required,
                            p.approvals.join(",")
                        ),
                        show_time(p.expires_at_ms),
                        p.settings.join(" "),
                        p.by.clone(),
                        p.reason.clone(),
                    ]
                })
                .collect(),
        ),
    }
}

pub async fn policy(cli: &ClientArgs, cmd: PolicyCmd) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    let mut p = c.policy();
    let r = match cmd {
        PolicyCmd::Show => p.get(c.req(pb::GetPolicyRequest {})).await?,
        PolicyCmd::Set { settings, reason } => {
            p.set(c.req(pb::SetPolicyRequest { settings, reason }))
                .await?
        }
        PolicyCmd::Propose { settings, reason } => {
            let made = p
                .propose(c.req(pb::ProposePolicyRequest { settings, reason }))
                .await?
                .into_inner();
            print_proposals(cli, &[made], true);
            return Ok(());
        }
        PolicyCmd::Approve { id } => {
            let got = p
                .approve(c.req(pb::ApprovePolicyRequest { id }))
                .await?
                .into_inner();
            print_proposals(cli, &[got], true);
            return Ok(());
        }
        PolicyCmd::Proposals => {
            let (all, _) = pages(None, String::new(), |limit, page_token| {
                let mut p = p.clone();
                let req = c.req(pb::ListProposalsRequest { limit, page_token });
                async move {
                    let r = p.list_proposals(req).await?.into_inner();
                    Ok((r.proposals, r.next_page_token))
                }
            })
            .await?;
            print_proposals(cli, &all, false);
            return Ok(());
        }
    }
    .into_inner();
    match cli.output {
        Output::Json => {
            let settings: serde_json::Map<String, Value> = r
                .settings
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            print_json(&json!({
                "settings": settings,
                "changes": r.changes.iter().map(|c| json!({
                    "at": rfc3339(c.at_ms), "by": c.by, "reason": c.reason, "settings": c.settings,
                })).collect::<Vec<_>>(),
            }))
        }
        Output::Table => {
            for kv in &r.settings {
                println!("{kv}");
            }
            if !r.changes.is_empty() {
                println!();
                table(
                    &["WHEN", "BY", "SET", "WHY"],
                    r.changes
                        .iter()
                        .map(|c| {
                            vec![
                                show_time(c.at_ms),
                                c.by.clone(),
                                c.settings.join(" "),
                                c.reason.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

fn node_json(n: &pb::Node) -> Value {
    json!({
        "name": n.name,
        "owner": n.owner,
        "state": if n.state == pb::NodeState::Up as i32 { "up" } else { "down" },
        "connected": n.connected,
        "last_heartbeat": rfc3339(n.last_heartbeat_ms),
        "registered_at": rfc3339(n.registered_at_ms),
        "drain": if n.drain.is_empty() { Value::Null } else { json!(n.drain) },
        "drain_reason": if n.drain_reason.is_empty() { Value::Null } else { json!(n.drain_reason) },
        "site": if n.site.is_empty() { Value::Null } else { json!(n.site) },
        "address": if n.address.is_empty() { Value::Null } else { json!(n.address) },
        "gpus": n.gpus.iter().map(|g| json!({
            "uuid": g.uuid, "index": g.index, "model": g.model, "memory_mb": g.memory_mb,
            "job": if g.job.is_empty() { Value::Null } else { json!(g.job) },
            "measured": g.measured.as_ref().map(|m| json!({
                "fp16_tflops": m.fp16_gflops as f64 / 1000.0,
                "bf16_tflops": m.bf16_gflops as f64 / 1000.0,
                "memory_gb_per_s": m.memory_mb_per_s as f64 / 1000.0,
            })),
        })).collect::<Vec<_>>(),
    })
}

fn node_rows(nodes: &[pb::Node]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            let used = n.gpus.iter().filter(|g| !g.job.is_empty()).count();
            let mut models: Vec<&str> = n.gpus.iter().map(|g| g.model.as_str()).collect();
            models.dedup();
            vec![
                n.name.clone(),
                n.owner.clone(),
                match (n.state == pb::NodeState::Up as i32, n.drain.as_str()) {
                    (true, "") => "up".to_string(),
                    (false, "") => "down".to_string(),
                    (true, d) => d.to_string(),
                    (false, d) => format!("down,{d}"),
                },
                format!("{used}/{}", n.gpus.len()),
                models.join(","),
                if n.connected { "yes" } else { "no" }.into(),
                if n.drain_reason.is_empty() {
                    "-".into()
                } else {
                    n.drain_reason.clone()
                },
            ]
        })
        .collect()
}

const NODE_HEADER: [&str; 7] = [
    "NODE",
    "OWNER",
    "STATE",
    "GPUS USED",
    "MODELS",
    "CONNECTED",
    "REASON",
];

pub async fn cluster(cli: &ClientArgs, cmd: ClusterCmd) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    match cmd {
        ClusterCmd::Status => {}
        ClusterCmd::AddNode { id, address } => {
            let r = c
                .cluster()
                .add_node(c.req(pb::AddNodeRequest { id, address }))
                .await?
                .into_inner();
            return print_schedulers(cli, &r.schedulers);
        }
        ClusterCmd::RemoveNode { id } => {
            let r = c
                .cluster()
                .remove_node(c.req(pb::RemoveNodeRequest { id }))
                .await?
                .into_inner();
            return print_schedulers(cli, &r.schedulers);
        }
    }
    let r = c
        .cluster()
        .status(c.req(pb::ClusterStatusRequest {}))
        .await?
        .into_inner();
    match cli.output {
        Output::Json => print_json(&json!({
            "schedulers": r.schedulers.iter().map(scheduler_json).collect::<Vec<_>>(),
            "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "gpus_total": r.gpus_total,
            "gpus_free": r.gpus_free,
            "jobs_pending": r.jobs_pending,
            "jobs_running": r.jobs_running,
        })),
        Output::Table => {
            scheduler_table(&r.schedulers);
            println!();
            table(&NODE_HEADER, node_rows(&r.nodes));
            println!();
            println!(
                "GPUs: {} free of {} up   jobs: {} running, {} pending",
                r.gpus_free, r.gpus_total, r.jobs_running, r.jobs_pending
            );
        }
    }
    Ok(())
}

fn scheduler_json(s: &pb::SchedulerNode) -> Value {
    json!({
        "id": s.id, "address": s.address, "role": s.role, "term": s.term,
        "leader": s.leader, "membership": s.membership,
        "commit_index": s.commit_index, "applied_index": s.applied_index,
        "last_index": s.last_index, "snapshot_index": s.snapshot_index, "error": s.error,
    })
}

fn scheduler_table(schedulers: &[pb::SchedulerNode]) {
    table(
        &[
            "SCHEDULER",
            "ADDRESS",
            "ROLE",
            // voter or learner (raft membership; not a member organisation)
            "VOTER",
            "TERM",
            "COMMIT",
            "APPLIED",
        ],
        schedulers
            .iter()
            .map(|s| {
                let role = if s.error.is_empty() {
                    s.role.clone()
                } else {
                    format!("{} ({})", s.role, s.error)
                };
                vec![
                    s.id.to_string(),
                    s.address.clone(),
                    role,
                    match s.membership.as_str() {
                        "voter" => "yes".to_string(),
                        "learner" => "no (learner)".to_string(),
                        other => other.to_string(),
                    },
                    s.term.to_string(),
                    s.commit_index.to_string(),
                    s.applied_index.to_string(),
                ]
            })
            .collect(),
    );
}

fn print_schedulers(cli: &ClientArgs, schedulers: &[pb::SchedulerNode]) -> anyhow::Result<()> {
    match cli.output {
        Output::Json => print_json(&Value::Array(
            schedulers.iter().map(scheduler_json).collect(),
        )),
        Output::Table => scheduler_table(schedulers),
    }
    Ok(())
}

pub async fn node(cli: &ClientArgs, cmd: NodeCmd) -> anyhow::Result<()> {
    let c = Client::connect(cli).await?;
    if matches!(cmd, NodeCmd::Drain { .. } | NodeCmd::Resume { .. }) {
        return crate::habits::node(cli, &c, cmd).await;
    }
    if !matches!(cmd, NodeCmd::List) {
        return crate::accounts::node(cli, &c, cmd).await;
    }
    let (nodes, _) = pages(None, String::new(), |limit, page_token| {
        let mut cluster = c.cluster();
        let req = c.req(pb::ListNodesRequest { limit, page_token });
        async move {
            let r = cluster.list_nodes(req).await?.into_inner();
            Ok((r.nodes, r.next_page_token))
        }
    })
    .await?;
    match cli.output {
        Output::Json => print_json(&Value::Array(nodes.iter().map(node_json).collect())),
        Output::Table => table(&NODE_HEADER, node_rows(&nodes)),
    }
    Ok(())
}

/// `coop agent probe`: checks and measures every GPU; fails when there is no
/// driver or when any GPU fails its check.
pub async fn agent_probe(c: &ClientArgs, burn: Option<Duration>) -> anyhow::Result<()> {
    let probes = tokio::task::spawn_blocking(coop_agent::probe::probe_all).await??;
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    match c.output {
        Output::Json => print_json(&serde_json::to_value(&probes)?),
        Output::Table => table(
            &[
                "GPU",
                "UUID",
                "NAME",
                "CHECK",
                "FP16-TFLOPS",
                "BF16-TFLOPS",
                "MEM-GB/S",
                "NOTE",
            ],
            probes
                .iter()
                .map(|p| {
                    vec![
                        p.ordinal.to_string(),
                        p.uuid.clone(),
                        p.name.clone(),
                        if p.ok { "ok" } else { "FAILED" }.to_string(),
                        opt(p.fp16_tflops),
                        opt(p.bf16_tflops),
                        opt(p.memory_gb_per_s),
                        p.error.clone().unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
    }
    let failed: Vec<String> = probes
        .iter()
        .filter(|p| !p.ok)
        .map(|p| p.ordinal.to_string())
        .collect();
    if !failed.is_empty() {
        bail!("probe: GPU {} failed the check", failed.join(", "));
    }
    if let Some(d) = burn {
        let secs = d.as_secs_f64();
        let done = tokio::task::spawn_blocking(move || coop_agent::probe::burn(secs)).await??;
        eprintln!("burn: {secs:.0} s of 8192x8192 fp16 matmuls: {done:?} per GPU");
    }
    Ok(())
}

/// `coop agent status`: the agent's identity, its unacknowledged reports and
/// every run it remembers with what it measured.
pub async fn agent_status(c: &ClientArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let spool = coop_agent::spool::Spool::open_read_only(dir).await?;
    let pending = spool.pending().await?;
    let runs = spool.runs().await?;
    match c.output {
        Output::Json => print_json(&json!({
            "identity": spool.identity(),
            "pending_reports": pending.len(),
            "runs": runs.iter().map(|r| json!({
                "job": r.job,
                "attempt": r.attempt,
                "gpus": r.gpus,
                "started_ms": r.started_ms,
                "measured_to_ms": r.metered_to_ms,
                "ended_ms": r.ended_ms,
                "exit_code": r.exit_code,
                "reason": r.reason,
                "lost": r.lost,
                "gpu_ms": r.gpu_ms,
                "gpu_seconds": r.gpu_ms as f64 / 1000.0,
                "energy_mj": r.energy_mj,
                "energy_j": r.energy_mj as f64 / 1000.0,
                "utilization_pct": r.utilization_pct(),
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!("identity        {}", spool.identity());
            println!("spool           {}", spool.path().display());
            println!("pending reports {}", pending.len());
            println!();
            table(
                &[
                    "JOB",
                    "ATTEMPT",
                    "GPUS",
                    "STATE",
                    "GPU-SECONDS",
                    "ENERGY-J",
                    "UTIL%",
                    "REASON",
                ],
                runs.iter()
                    .map(|r| {
                        let state = match (r.ended_ms, r.exit_code, r.lost) {
                            (None, _, _) => "running".to_string(),
                            (Some(_), _, true) => "lost".to_string(),
                            (Some(_), Some(code), false) => format!("exited {code}"),
                            (Some(_), None, false) => "ended".to_string(),
                        };
                        vec![
                            r.job.clone(),
                            r.attempt.to_string(),
                            r.gpus.len().to_string(),
                            state,
                            format!("{:.3}", r.gpu_ms as f64 / 1000.0),
                            format!("{:.3}", r.energy_mj as f64 / 1000.0),
                            r.utilization_pct()
                                .map_or("-".into(), |u| format!("{u:.0}")),
                            r.reason.clone(),
                        ]
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}
