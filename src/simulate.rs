//! `coop simulate`: reads a trace, runs `coop_core::simulate`, and writes
//! summary.json, members.csv, jobs.csv and share.svg.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use coop_core::policy::Ordering;
use coop_core::simulate::{NodeGroup, SimConfig, SimResult, TraceJob, simulate_with_progress};
use serde_json::json;

use crate::args::{Output, PolicyArg, SimulateArgs};

/// A progress line on stderr while a long simulation runs, only when stderr
/// is a terminal (logs and tests stay clean).
struct Progress {
    tty: bool,
    last: Instant,
    shown: bool,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            shown: false,
        }
    }

    fn show(&mut self, done: usize, all: usize) {
        if !self.tty || self.last.elapsed() < std::time::Duration::from_millis(250) {
            return;
        }
        self.last = Instant::now();
        self.shown = true;
        let pct = done as f64 * 100.0 / all.max(1) as f64;
        eprint!("\rsimulating: {done}/{all} jobs ended ({pct:.0}%)\x1b[K");
    }

    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
        }
    }
}

pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let nodes = parse_nodes(&a.nodes)?;
    let mut trace = read_trace(&a.trace)?;
    if let Some(n) = a.limit {
        trace.truncate(n);
    }
    if trace.is_empty() {
        bail!("trace: {} has no jobs", a.trace.display());
    }
    let ordering = match a.policy {
        PolicyArg::Fifo => Ordering::Fifo,
        PolicyArg::Fairshare => Ordering::Fairshare,
        PolicyArg::Drf => Ordering::Drf,
    };
    let mut cfg = SimConfig::new(ordering, nodes);
    cfg.preemption = match a.preemption.as_str() {
        "auto" => ordering != Ordering::Fifo,
        v => v == "on",
    };
    if a.half_life == 0 {
        bail!("half_life: must be longer than zero");
    }
    cfg.half_life_s = a.half_life;
    cfg.min_runtime_s = a.min_runtime;
    let started = Instant::now();
    let mut progress = Progress::new();
    let result = simulate_with_progress(&trace, &cfg, &mut |done, all| progress.show(done, all))
        .map_err(|e| anyhow!("{e}"))?;
    progress.clear();
    let wall_s = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut summary = summary(&result, ordering, cfg.preemption, wall_s, trace.len());
    let largest_node = cfg.nodes.iter().map(|g| g.gpus).max().unwrap_or(0);
    let never: Vec<&coop_core::simulate::JobOutcome> = result
        .jobs
        .iter()
        .filter(|j| j.first_start_s.is_none())
        .collect();
    summary["never_placed"] = json!(never.len());
    // Jobs larger than any node: run over several nodes at once.
    let multi: Vec<&coop_core::simulate::JobOutcome> = result
        .jobs
        .iter()
        .filter(|j| j.gpus > largest_node)
        .collect();
    let gpu_s = |jobs: &[&coop_core::simulate::JobOutcome]| -> f64 {
        jobs.iter()
            .filter(|j| j.end_s.is_some())
            .fold(0.0, |s, j| s + j.gpus as f64 * j.duration_s)
    };
    let all: Vec<&coop_core::simulate::JobOutcome> = result.jobs.iter().collect();
    summary["multi_node_jobs"] = json!(multi.len());
    summary["multi_node_gpu_seconds_share"] = json!(if gpu_s(&all) > 0.0 {
        gpu_s(&multi) / gpu_s(&all)
    } else {
        0.0
    });
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    write_members_csv(&a.out.join("members.csv"), &summary)?;
    write_summary_csv(&a.out.join("summary.csv"), &summary)?;
    write_jobs_csv(&a.out.join("jobs.csv"), &result)?;
    std::fs::write(a.out.join("share.svg"), share_svg(&result, ordering))?;
    if let Some(biggest) = never.iter().max_by_key(|j| j.gpus) {
        let why = biggest.never.as_deref().unwrap_or("it never found room");
        bail!(
            "trace: {} of {} jobs could never be placed on nodes of at most {largest_node} GPUs \
             (the largest asks for {}; {why}): the figures in {} leave them out",
            never.len(),
            trace.len(),
            biggest.gpus,
            a.out.display()
        );
    }
    if a.output.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{} jobs, {} GPUs, policy {}: jain {:.3}, utilization {:.1}%, wait p50 {:.0} s, p95 {:.0} s, makespan {:.1} d; {} passes in {:.2} s. Wrote {}",
        trace.len(),
        result.total_gpus,
        ordering.as_str(),
        summary["jain_index"].as_f64().unwrap_or(f64::NAN),
        result.utilization() * 100.0,
        summary["wait_p50_s"].as_f64().unwrap_or(0.0),
        summary["wait_p95_s"].as_f64().unwrap_or(0.0),
        result.makespan_s / 86_400.0,
        result.passes,
        wall_s,
        a.out.display()
    );
    Ok(())
}

/// `COUNT:GPUSxMODEL[,..]`, e.g. `32:8xV100-32GB,16:4xT4-16GB`.
fn parse_nodes(spec: &str) -> anyhow::Result<Vec<NodeGroup>> {
    spec.split(',')
        .map(|part| {
            let bad = || anyhow!("nodes: {part:?} is not COUNT:GPUSxMODEL (e.g. 32:8xV100-32GB)");
            let (count, rest) = part.trim().split_once(':').ok_or_else(bad)?;
            let (gpus, model) = rest.split_once('x').ok_or_else(bad)?;
            let count: u32 = count.parse().ok().filter(|c| *c > 0).ok_or_else(bad)?;
            let gpus: u32 = gpus.parse().ok().filter(|g| *g > 0).ok_or_else(bad)?;
            let memory_mb =
                coop_agent::gpu::model_memory_mb(model).map_err(|e| anyhow!("nodes: {e}"))?;
            Ok(NodeGroup {
                count,
                gpus,
                model: model.to_string(),
                memory_mb,
            })
        })
        .collect()
}

/// A CSV with a header naming at least tenant, submit_s, gpus, duration_s.
fn read_trace(path: &Path) -> anyhow::Result<Vec<TraceJob>> {
    let mut r = csv::Reader::from_path(path)
        .with_context(|| format!("trace: reading {}", path.display()))?;
    let headers = r.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| anyhow!("trace: no {name:?} column in {}", path.display()))
    };
    let (tenant, submit, gpus, duration) = (
        col("tenant")?,
        col("submit_s")?,
        col("gpus")?,
        col("duration_s")?,
    );
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("trace: row {}", i + 2))?;
        let field = |c: usize, name: &str| -> anyhow::Result<f64> {
            rec.get(c)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| anyhow!("trace: row {}: {name} is not a non-negative number", i + 2))
        };
        let g = field(gpus, "gpus")?;
        if g < 1.0 || g.fract() != 0.0 {
            bail!(
                "trace: row {}: gpus must be a whole number of at least 1",
                i + 2
            );
        }
        out.push(TraceJob {
            tenant: rec.get(tenant).unwrap_or_default().trim().to_string(),
            submit_s: field(submit, "submit_s")? as i64,
            gpus: g as u32,
            duration_s: field(duration, "duration_s")?.ceil() as i64,
        });
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[i])
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn summary(
    r: &SimResult,
    ordering: Ordering,
    preemption: bool,
    wall_s: f64,
    trace_jobs: usize,
) -> serde_json::Value {
    let mut by: BTreeMap<&str, Vec<&coop_core::simulate::JobOutcome>> = BTreeMap::new();
    for j in &r.jobs {
        by.entry(j.member.as_str()).or_default().push(j);
    }
    let mut used: BTreeMap<&str, f64> = BTreeMap::new();
    for b in &r.bins {
        for (m, v) in &b.used {
            *used.entry(m.as_str()).or_default() += v;
        }
    }
    let figures = |jobs: &[&coop_core::simulate::JobOutcome]| {
        let waits = sorted(jobs.iter().filter_map(|j| j.wait_s).collect());
        let jct = sorted(
            jobs.iter()
                .filter_map(|j| j.end_s.map(|e| e - j.submit_s))
                .collect(),
        );
        json!({
            "jobs": jobs.len(),
            "completed": jct.len(),
            "wait_p50_s": percentile(&waits, 0.5),
            "wait_p95_s": percentile(&waits, 0.95),
            "jct_p50_s": percentile(&jct, 0.5),
            "jct_p95_s": percentile(&jct, 0.95),
            "preemptions": jobs.iter().map(|j| j.preemptions as u64).sum::<u64>(),
        })
    };
    let members: Vec<serde_json::Value> = by
        .iter()
        .map(|(m, jobs)| {
            let mut v = figures(jobs);
            v["member"] = json!(m);
            v["entitlement"] = json!(r.entitlements.get(*m).copied().unwrap_or(0.0));
            v["gpu_seconds"] = json!(used.get(m).copied().unwrap_or(0.0));
            v
        })
        .collect();
    let all: Vec<&coop_core::simulate::JobOutcome> = r.jobs.iter().collect();
    let mut s = figures(&all);
    let o = s.as_object_mut().expect("object");
    o.insert("policy".into(), json!(ordering.as_str()));
    o.insert("preemption".into(), json!(preemption));
    o.insert("jain_index".into(), json!(r.jain_index()));
    o.insert("utilization".into(), json!(r.utilization()));
    o.insert("makespan_s".into(), json!(r.makespan_s));
    o.insert("gpus".into(), json!(r.total_gpus));
    o.insert("trace_jobs".into(), json!(trace_jobs));
    o.insert("scheduling_passes".into(), json!(r.passes));
    o.insert("simulation_wall_s".into(), json!(wall_s));
    o.insert("members".into(), json!(members));
    s
}

/// A JSON value as a CSV cell: strings bare, null empty.
fn csv_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn write_members_csv(path: &Path, summary: &serde_json::Value) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    let cols = [
        "member",
        "entitlement",
        "gpu_seconds",
        "jobs",
        "completed",
        "wait_p50_s",
        "wait_p95_s",
        "jct_p50_s",
        "jct_p95_s",
        "preemptions",
    ];
    w.write_record(cols)?;
    for m in summary["members"].as_array().into_iter().flatten() {
        w.write_record(cols.iter().map(|c| csv_cell(&m[*c])))?;
    }
    w.flush()?;
    Ok(())
}

/// The overall figures of summary.json as one CSV row.
fn write_summary_csv(path: &Path, summary: &serde_json::Value) -> anyhow::Result<()> {
    let cols = [
        "policy",
        "preemption",
        "gpus",
        "jobs",
        "completed",
        "jain_index",
        "utilization",
        "makespan_s",
        "wait_p50_s",
        "wait_p95_s",
        "jct_p50_s",
        "jct_p95_s",
        "preemptions",
        "scheduling_passes",
        "simulation_wall_s",
    ];
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(cols)?;
    w.write_record(cols.iter().map(|c| csv_cell(&summary[*c])))?;
    w.flush()?;
    Ok(())
}

fn write_jobs_csv(path: &Path, r: &SimResult) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record([
        "member",
        "gpus",
        "submit_s",
        "first_start_s",
        "end_s",
        "duration_s",
        "wait_s",
        "preemptions",
    ])?;
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for j in &r.jobs {
        w.write_record([
            j.member.clone(),
            j.gpus.to_string(),
            j.submit_s.to_string(),
            opt(j.first_start_s),
            opt(j.end_s),
            j.duration_s.to_string(),
            opt(j.wait_s),
            j.preemptions.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// Each member's share of the GPUs over time, stacked, one colour per member.
/// Written directly as SVG: a few polygons do not need a plotting library.
fn share_svg(r: &SimResult, ordering: Ordering) -> String {
    const W: f64 = 1000.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 50.0;
    const TOP: f64 = 40.0;
    const PLOT_W: f64 = 760.0;
    const PLOT_H: f64 = 320.0;
    let palette = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
    ];
    let members: Vec<&String> = r.entitlements.keys().collect();
    // Merge bins so that the drawing has at most ~500 steps.
    let per = r.bins.len().div_ceil(500).max(1);
    let capacity = r.total_gpus as f64 * r.bin_s as f64 * per as f64;
    let steps: Vec<Vec<f64>> = r
        .bins
        .chunks(per)
        .map(|c| {
            members
                .iter()
                .map(|m| {
                    c.iter()
                        .map(|b| b.used.get(*m).copied().unwrap_or(0.0))
                        .sum::<f64>()
                        / capacity
                })
                .collect()
        })
        .collect();
    let n = steps.len().max(1) as f64;
    let x = |i: usize| LEFT + PLOT_W * i as f64 / n;
    let y = |v: f64| TOP + PLOT_H * (1.0 - v.clamp(0.0, 1.0));
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="14">Share of {} GPUs held by each member over time (policy {})</text>"#,
        r.total_gpus,
        ordering.as_str()
    );
    let mut base = vec![0.0; steps.len()];
    for (k, m) in members.iter().enumerate() {
        let mut pts = String::new();
        for (i, s) in steps.iter().enumerate() {
            let top = base[i] + s[k];
            let _ = write!(
                pts,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(i),
                y(top),
                x(i + 1),
                y(top)
            );
        }
        for i in (0..steps.len()).rev() {
            let _ = write!(
                pts,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(i + 1),
                y(base[i]),
                x(i),
                y(base[i])
            );
        }
        for (i, s) in steps.iter().enumerate() {
            base[i] += s[k];
        }
        let colour = palette[k % palette.len()];
        let _ = writeln!(
            svg,
            r#"<polygon points="{pts}" fill="{colour}" stroke="none"><title>{m}</title></polygon>"#
        );
        let ly = TOP + 14.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{m} ({:.1}%)</text>"#,
            LEFT + PLOT_W + 15.0,
            ly,
            LEFT + PLOT_W + 30.0,
            ly + 9.0,
            r.entitlements[*m] * 100.0
        );
    }
    // Axes: 0..100 % and days.
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="black"/>"#
    );
    for p in [0, 25, 50, 75, 100] {
        let yy = y(p as f64 / 100.0);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{p}%</text><line x1="{LEFT}" x2="{}" y1="{yy}" y2="{yy}" stroke="black" stroke-opacity="0.15"/>"#,
            LEFT - 5.0,
            yy + 4.0,
            LEFT + PLOT_W
        );
    }
    let days = r.bins.len() as f64 * r.bin_s as f64 / 86_400.0;
    let tick = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        .into_iter()
        .find(|t| days / t <= 10.0)
        .unwrap_or(200.0);
    let mut d = 0.0;
    while d <= days {
        let xx = LEFT + PLOT_W * d / days.max(1e-9);
        let _ = writeln!(
            svg,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{d}</text>"#,
            TOP + PLOT_H + 15.0
        );
        d += tick;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">days since the first submission (legend: member, entitlement)</text>"#,
        LEFT + PLOT_W / 2.0,
        TOP + PLOT_H + 32.0
    );
    svg.push_str("</svg>\n");
    svg
}
