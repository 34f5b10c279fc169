//! Trace-driven simulation: the real state machine and the real scheduling
//! pass (`placement::plan`, the function the leader calls), driven by simulated
//! time and simulated agents instead of clocks and processes. No I/O: the
//! caller reads the trace and writes the results.
//!
//! The simulated agents are ideal: a run starts when it is placed, ends after
//! its remaining work, and a preempted run checkpoints during its grace period
//! and exits at its end (work done so far is kept). Every trace job is a
//! preemptible finetune job whose time limit is its true duration, so backfill
//! sees perfect estimates (real users overestimate: real backfill does worse).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use uuid::Uuid;

use crate::fairshare::{entitlements, jain, water_fill};
use crate::placement::plan;
use crate::policy::{Ordering, Setting};
use crate::state::{Command, GpuInfo, JobId, JobKind, JobSpec, JobState, Op, RunReport, State};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceJob {
    pub tenant: String,
    pub submit_s: i64,
    pub gpus: u32,
    pub duration_s: i64,
}

/// `count` nodes of `gpus` GPUs of `model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGroup {
    pub count: u32,
    pub gpus: u32,
    pub model: String,
    pub memory_mb: u64,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub ordering: Ordering,
    pub preemption: bool,
    pub half_life_s: u64,
    pub min_runtime_s: u64,
    pub preempt_grace_s: u64,
    pub nodes: Vec<NodeGroup>,
    /// Width of the time bins of the share timeline and the fairness index.
    pub bin_s: i64,
}

impl SimConfig {
    pub fn new(ordering: Ordering, nodes: Vec<NodeGroup>) -> Self {
        Self {
            ordering,
            preemption: true,
            half_life_s: crate::policy::DEFAULT_HALF_LIFE_S,
            min_runtime_s: 300,
            preempt_grace_s: 30,
            nodes,
            bin_s: 3600,
        }
    }
}

/// What happened to one trace job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub member: String,
    pub gpus: u32,
    pub submit_s: f64,
    pub first_start_s: Option<f64>,
    pub end_s: Option<f64>,
    pub duration_s: f64,
    pub preemptions: u32,
    /// Time not running between submission and completion.
    pub wait_s: Option<f64>,
    /// Why it could never run on the simulated cluster (refused at
    /// submission: no set of its nodes could ever hold it).
    pub never: Option<String>,
}

/// Per member and per time bin: GPU-seconds used and wanted (running plus
/// pending GPUs), and whether jobs were waiting in the bin.
#[derive(Debug, Clone, Default)]
pub struct Bin {
    pub used: BTreeMap<String, f64>,
    pub wanted: BTreeMap<String, f64>,
    /// Seconds of the bin with at least one job waiting.
    pub waiting_s: f64,
}

#[derive(Debug, Clone)]
pub struct SimResult {
    pub jobs: Vec<JobOutcome>,
    pub entitlements: BTreeMap<String, f64>,
    pub total_gpus: u32,
    pub start_s: i64,
    pub makespan_s: f64,
    pub bins: Vec<Bin>,
    pub bin_s: i64,
    pub passes: u64,
    pub preemptions: u64,
}

const MS: i64 = 1000;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Ev {
    /// A run ends on its own (job, attempt).
    Finish(usize, u32),
    /// A preempted run has checkpointed and exits.
    Stopped(usize, u32),
    Submit(usize),
    /// A scheduling pass with nothing else happening (minimum run times pass).
    Tick,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    trace: &'a [TraceJob],
    state: State,
    now: i64,
    ids: Vec<JobId>,
    index: BTreeMap<JobId, usize>,
    /// Work left (ms) and the start of the current run, per trace job.
    remaining: Vec<i64>,
    run_start: Vec<i64>,
    seq: BTreeMap<String, u64>,
    events: BinaryHeap<Reverse<(i64, Ev)>>,
    out: Vec<JobOutcome>,
    bins: Vec<Bin>,
    last_t: i64,
    passes: u64,
    preemptions: u64,
    /// Trace jobs that have ended.
    ended: usize,
}

/// Member names must be valid names; trace tenants become `t-<tenant>`.
pub fn member_name(tenant: &str) -> String {
    let clean: String = tenant
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(60)
        .collect();
    format!("t-{clean}")
}

pub fn simulate(trace: &[TraceJob], cfg: &SimConfig) -> Result<SimResult, String> {
    simulate_with_progress(trace, cfg, &mut |_, _| {})
}

/// [`simulate`], calling `progress(ended, jobs)` after every scheduling pass
/// with how many of the trace's jobs have ended so far (the shell shows it;
/// the core does no I/O).
pub fn simulate_with_progress(
    trace: &[TraceJob],
    cfg: &SimConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SimResult, String> {
    let mut sim = Sim::new(trace, cfg)?;
    sim.run(progress);
    Ok(sim.finish())
}

impl<'a> Sim<'a> {
    fn new(trace: &'a [TraceJob], cfg: &'a SimConfig) -> Result<Self, String> {
        let start = trace.iter().map(|j| j.submit_s).min().unwrap_or(0);
        let mut s = Self {
            cfg,
            trace,
            state: State::default(),
            now: start * MS,
            ids: Vec::with_capacity(trace.len()),
            index: BTreeMap::new(),
            remaining: trace.iter().map(|j| j.duration_s.max(0) * MS).collect(),
            run_start: vec![0; trace.len()],
            seq: BTreeMap::new(),
            events: BinaryHeap::new(),
            out: trace
                .iter()
                .map(|j| JobOutcome {
                    member: member_name(&j.tenant),
                    gpus: j.gpus,
                    submit_s: (j.submit_s - start) as f64,
                    first_start_s: None,
                    end_s: None,
                    duration_s: j.duration_s as f64,
                    preemptions: 0,
                    wait_s: None,
                    never: None,
                })
                .collect(),
            bins: Vec::new(),
            last_t: start * MS,
            passes: 0,
            preemptions: 0,
            ended: 0,
        };
        s.apply(Op::Bootstrap {
            operator_token_hash: "simulation".into(),
            default_member: None,
        })?;
        // The pool owns the nodes and holds no share: entitlement is by vote.
        s.apply(Op::AddMember {
            name: "pool".into(),
            token_hash: "pool".into(),
            expires_at_ms: None,
        })?;
        let mut tenants: Vec<String> = trace.iter().map(|j| member_name(&j.tenant)).collect();
        tenants.sort();
        tenants.dedup();
        for t in &tenants {
            s.apply(Op::AddMember {
                name: t.clone(),
                token_hash: format!("token-{t}"),
                expires_at_ms: None,
            })?;
        }
        let mut settings = vec![
            Setting::Ordering(cfg.ordering),
            Setting::Share {
                member: "pool".into(),
                shares: 0,
            },
            Setting::HalfLifeS(cfg.half_life_s),
            Setting::Preemption(cfg.preemption),
            Setting::MinRuntimeS(cfg.min_runtime_s),
            Setting::PreemptGraceS(cfg.preempt_grace_s),
            // A trace's queues are what they were: no limits of a live co-op.
            Setting::MaxPendingJobs(0),
            Setting::MaxGraceS(crate::policy::MAX_GRACE_S),
        ];
        settings.dedup();
        s.apply(Op::SetPolicy {
            settings,
            by: "simulate".into(),
            reason: "simulation settings".into(),
        })?;
        let mut n = 0;
        for g in &cfg.nodes {
            for _ in 0..g.count {
                let name = format!("n{n:04}");
                let gpus = (0..g.gpus)
                    .map(|i| GpuInfo {
                        uuid: format!("GPU-{name}-{i}"),
                        index: i,
                        model: g.model.clone(),
                        memory_mb: g.memory_mb,
                        measured: None,
                        power_limit_w: 0,
                    })
                    .collect();
                s.apply(Op::RegisterNode {
                    node: name.clone(),
                    owner: "pool".into(),
                    gpus,
                    session: "sim".into(),
                    orphaned_runs_end_ms: 0,
                    address: String::new(),
                    site: String::new(),
                })?;
                n += 1;
            }
        }
        for (i, j) in trace.iter().enumerate() {
            if j.gpus == 0 {
                return Err(format!("trace row {}: gpus must be at least 1", i + 2));
            }
            s.events.push(Reverse((j.submit_s * MS, Ev::Submit(i))));
        }
        Ok(s)
    }

    fn apply(&mut self, op: Op) -> Result<(), String> {
        let applied = self
            .state
            .apply(&Command {
                at_ms: self.now,
                op,
            })
            .map(|_| ())
            .map_err(|e| e.to_string());
        // The history a replica would store: not needed here.
        self.state.take_outbox();
        applied
    }

    /// `report` from the agent of each node the run is on (each part of a
    /// multi-node run reports for itself).
    fn report(&mut self, i: usize, report: RunReport) {
        let job = &self.state.jobs[&self.ids[i]];
        let nodes: Vec<String> = job.run_nodes().into_iter().map(String::from).collect();
        for node in nodes {
            let seq = self.seq.entry(node.clone()).or_default();
            *seq += 1;
            let op = Op::Report {
                node,
                session: "sim".into(),
                seq: *seq,
                report: report.clone(),
            };
            self.apply(op)
                .expect("reports of the simulated agents apply");
        }
    }

    fn run(&mut self, progress: &mut dyn FnMut(usize, usize)) {
        let tick = (self.cfg.min_runtime_s as i64).max(60) * MS;
        let mut tick_pending = false;
        while let Some(Reverse((t, _))) = self.events.peek().copied() {
            self.account_until(t);
            self.now = t;
            // Everything that happens at `t`, then one pass.
            while let Some(Reverse((t2, ev))) = self.events.peek().copied() {
                if t2 != t {
                    break;
                }
                self.events.pop();
                match ev {
                    Ev::Submit(i) => self.submit(i),
                    Ev::Finish(i, attempt) => self.exit(i, attempt, 0),
                    Ev::Stopped(i, attempt) => self.exit(i, attempt, 143),
                    Ev::Tick => tick_pending = false,
                }
            }
            let usage = crate::fairshare::usage(&self.state, self.now);
            let pass = plan(&self.state, self.now, &usage);
            self.passes += 1;
            progress(self.ended, self.trace.len());
            for p in pass.preemptions {
                if self
                    .apply(Op::Preempt {
                        job: p.job,
                        for_job: p.for_job,
                    })
                    .is_ok()
                {
                    self.preemptions += 1;
                    let i = self.index[&p.job];
                    let attempt = self.state.jobs[&p.job].attempts;
                    let at = self.now + self.cfg.preempt_grace_s as i64 * MS;
                    self.events.push(Reverse((at, Ev::Stopped(i, attempt))));
                }
            }
            for p in pass.placements {
                let i = self.index[&p.job];
                let job = p.job;
                let op = p.op(&self.state);
                if self.apply(op).is_err() {
                    continue;
                }
                let attempt = self.state.jobs[&job].attempts;
                self.report(
                    i,
                    RunReport::Started {
                        job,
                        attempt,
                        at_ms: self.now,
                    },
                );
                self.run_start[i] = self.now;
                if self.out[i].first_start_s.is_none() {
                    self.out[i].first_start_s = Some(self.secs(self.now));
                }
                let end = self.now + self.remaining[i];
                self.events.push(Reverse((end, Ev::Finish(i, attempt))));
            }
            // Waiting jobs may become placeable by time alone (minimum run
            // times of preemption): look again a little later.
            if !self.state.queue.is_empty() && !tick_pending && self.cfg.preemption {
                self.events.push(Reverse((self.now + tick, Ev::Tick)));
                tick_pending = true;
            }
        }
    }

    fn secs(&self, ms: i64) -> f64 {
        (ms - self.trace.iter().map(|j| j.submit_s).min().unwrap_or(0) * MS) as f64 / 1000.0
    }

    fn submit(&mut self, i: usize) {
        let j = &self.trace[i];
        // Ids from the trace position keep runs reproducible.
        let id = Uuid::from_u128(i as u128 + 1);
        let spec = JobSpec {
            kind: JobKind::Finetune,
            gpus: j.gpus,
            command: vec!["trace".into()],
            gpu_model: None,
            min_gpu_memory_mb: 0,
            preemptible: true,
            kill_grace_ms: self.cfg.preempt_grace_s * 1000,
            priority: 0,
            time_limit_ms: (j.duration_s.max(1) * MS) as u64,
            isolation: Default::default(),
            env: Default::default(),
            nodes: 0,
            gpus_per_node: 0,
        };
        let op = Op::SubmitJob {
            id,
            member: member_name(&j.tenant),
            spec,
        };
        self.ids.push(id);
        self.index.insert(id, i);
        // A refused job (more GPUs than the nodes could ever give it) can
        // never run: it is recorded as such.
        if let Err(why) = self.apply(op) {
            self.out[i].never = Some(why);
        }
    }

    /// The run `attempt` of trace job `i` exits (0: its work is done; 143: it
    /// was preempted and stops after its checkpoint).
    fn exit(&mut self, i: usize, attempt: u32, code: i32) {
        let id = self.ids[i];
        // A job that finished long ago may have left memory.
        let Some(job) = self.state.jobs.get(&id) else {
            return;
        };
        if job.state != JobState::Running || job.attempts != attempt {
            return; // this run already ended (preempted, then its finish came)
        }
        let ran = self.now - self.run_start[i];
        self.remaining[i] = (self.remaining[i] - ran).max(0);
        let done = self.remaining[i] == 0;
        self.report(
            i,
            RunReport::Exited {
                job: id,
                attempt,
                at_ms: self.now,
                exit_code: if done { 0 } else { code },
                reason: String::new(),
                energy_mj: 0,
            },
        );
        // A run preempted just as it finished is requeued with no work left;
        // placed again, it completes at once.
        let job = &self.state.jobs[&id];
        if job.state.is_final() {
            let end = self.secs(self.now);
            let o = &mut self.out[i];
            if o.end_s.is_none() {
                self.ended += 1;
            }
            o.end_s = Some(end);
            o.preemptions = job.preemptions;
            o.wait_s = Some((end - o.submit_s - o.duration_s).max(0.0));
        }
    }

    /// Adds what happened over `[last_t, t]` to the bins: per member, GPUs
    /// held and GPUs wanted (held plus pending), and whether anyone waited.
    fn account_until(&mut self, t: i64) {
        if t <= self.last_t {
            return;
        }
        let mut used: BTreeMap<&str, f64> = BTreeMap::new();
        let mut wanted: BTreeMap<&str, f64> = BTreeMap::new();
        for id in &self.state.running {
            let j = &self.state.jobs[id];
            *used.entry(j.member.as_str()).or_default() += j.spec.gpus as f64;
            *wanted.entry(j.member.as_str()).or_default() += j.spec.gpus as f64;
        }
        for (_, id) in &self.state.queue {
            let j = &self.state.jobs[id];
            *wanted.entry(j.member.as_str()).or_default() += j.spec.gpus as f64;
        }
        let waiting = !self.state.queue.is_empty();
        let origin = self.trace.iter().map(|j| j.submit_s).min().unwrap_or(0) * MS;
        let bin_ms = self.cfg.bin_s * MS;
        let mut from = self.last_t;
        while from < t {
            let b = ((from - origin) / bin_ms) as usize;
            let bin_end = origin + (b as i64 + 1) * bin_ms;
            let to = t.min(bin_end);
            let secs = (to - from) as f64 / 1000.0;
            if self.bins.len() <= b {
                self.bins.resize_with(b + 1, Bin::default);
            }
            let bin = &mut self.bins[b];
            for (m, g) in &used {
                *bin.used.entry(m.to_string()).or_default() += g * secs;
            }
            for (m, g) in &wanted {
                *bin.wanted.entry(m.to_string()).or_default() += g * secs;
            }
            if waiting {
                bin.waiting_s += secs;
            }
            from = to;
        }
        self.last_t = t;
    }

    fn finish(self) -> SimResult {
        let mut ent = entitlements(&self.state);
        ent.remove("pool");
        let total_gpus = crate::fairshare::total_gpus(&self.state);
        let makespan_s = self.out.iter().filter_map(|o| o.end_s).fold(0.0, f64::max);
        SimResult {
            jobs: self.out,
            entitlements: ent,
            total_gpus,
            start_s: self.trace.iter().map(|j| j.submit_s).min().unwrap_or(0),
            makespan_s,
            bins: self.bins,
            bin_s: self.cfg.bin_s,
            passes: self.passes,
            preemptions: self.preemptions,
        }
    }
}

impl SimResult {
    /// Jain's index of usage over fair allocation, per contended bin (jobs
    /// waited for at least half of it), averaged over those bins. The fair
    /// allocation is the entitlement, redistributed by water-filling among the
    /// members that wanted GPUs in the bin: a member asking for less than its
    /// entitlement is not counted as wronged.
    pub fn jain_index(&self) -> Option<f64> {
        let capacity = self.total_gpus as f64 * self.bin_s as f64;
        let per_bin: Vec<f64> = self
            .bins
            .iter()
            .filter(|b| b.waiting_s * 2.0 >= self.bin_s as f64)
            .filter_map(|b| {
                let fair = water_fill(capacity, &b.wanted, &self.entitlements);
                let xs: Vec<f64> = fair
                    .iter()
                    .filter(|(_, f)| **f > 0.0)
                    .map(|(m, f)| b.used.get(m).copied().unwrap_or(0.0) / f)
                    .collect();
                jain(&xs)
            })
            .collect();
        (!per_bin.is_empty()).then(|| per_bin.iter().sum::<f64>() / per_bin.len() as f64)
    }

    /// Busy GPU-seconds over GPU-seconds available until the last job ended.
    pub fn utilization(&self) -> f64 {
        let used: f64 = self.bins.iter().flat_map(|b| b.used.values()).sum();
        let avail = self.total_gpus as f64 * self.makespan_s;
        if avail > 0.0 { used / avail } else { 0.0 }
    }
}
