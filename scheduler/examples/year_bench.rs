//! "A co-op's year": history through one replica's apply path, in accelerated
//! time, with the figures that grow with it.
//!
//! 1,000 simulated GPUs (125 nodes of 8), 40 members each owning some nodes,
//! fair-share ordering with preemption. Every 100 simulated seconds (an agent's
//! usage tick here): each run reports its usage (`RunReport::Usage`), runs
//! that are done exit, the queue is topped up to 200 pending jobs, and a
//! scheduling pass (`placement::plan`) runs; its placements and preemptions
//! are applied as `Op::Place` / `Op::Preempt` and placed runs report their
//! start. A job runs for 1 to 2R-1 usage ticks (R on average, `--reports-per-job`),
//! so 10M jobs of 1 to 8 GPUs fill the 1,000 GPUs for about a year.
//!
//! Every command goes through `codec::encode`, `codec::decode` and
//! `State::apply`, as a replica applies a committed entry, and the history
//! apply makes (audit records, jobs that leave memory after the policy's
//! retention, 7 days) is written to a real SQLite store (`consensus::archive`,
//! synchronous=FULL, one transaction per 1,024 commands, as a busy node loop
//! batches a Ready); the apply rate is commands over the time spent there.
//!
//! At each sample point: resident memory (VmRSS), jobs in memory, the store's
//! size on disk, the snapshot (`codec::encode` of the state: its size and
//! time), restart (a fresh process of this example decodes that snapshot and
//! replays the 10,000 entries committed after it, the scheduler's default
//! `snapshot_every`, writing their history to a store again: the worst case
//! before the next snapshot), follower catch-up (encode + decode of the
//! snapshot, plus copying the history of those 10,000 entries page by page
//! from the store into another, as a peer serves it), and p99 over 200 samples
//! of `job get` (a random past job: from memory, or from the store once it
//! has left), `usage` (what the API's usage call runs: the live part from the
//! state, one member's last 30 days from the store: the records inside the
//! window summed by SQLite, those across its edges cut here) and a
//! scheduling pass.
//!
//! cargo run --release -p coop-scheduler --example year_bench -- \
//!     [--jobs N] [--reports-per-job R] [--samples K] [--stop-at-rss-mb M]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command as Proc, Stdio};
use std::time::Instant;

use coop_core::codec::{decode, encode};
use coop_core::placement::plan;
use coop_core::policy::{Ordering, Setting};
use coop_core::state::*;
use coop_core::usage::{Past, add_past_usage, live_usage};
use coop_scheduler::consensus::history::{self, Tagged};
use coop_scheduler::consensus::{archive, windows};
use sqlx::SqlitePool;
use uuid::Uuid;

const NODES: usize = 125;
const PER_NODE: u32 = 8;
const MEMBERS: usize = 40;
/// Simulated seconds between usage reports of a run.
const TICK_MS: i64 = 100_000;
const QUEUE_TARGET: usize = 200;
/// The scheduler's default `snapshot_every` (entries between snapshots).
const SNAPSHOT_EVERY: usize = 10_000;
const P99_SAMPLES: usize = 200;
/// Commands whose history is written in one transaction.
const STORE_BATCH: usize = 1024;
const DAY_MS: i64 = 86_400_000;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Run {
    node: usize,
    attempt: u32,
    left: u32,
    stopping: bool,
}

struct Bench {
    state: State,
    /// The state as readers last saw it: published once per batch, as a
    /// replica publishes a view after each Ready (`consensus::view`).
    view: std::sync::Arc<State>,
    now: i64,
    rng: Rng,
    reports_per_job: u32,
    /// Usage ticks each pending job still has to run.
    planned: BTreeMap<JobId, u32>,
    runs: BTreeMap<JobId, Run>,
    seq: Vec<u64>,
    submitted: u64,
    usage_reports: u64,
    commands: u64,
    apply_s: f64,
    /// Entries captured after a snapshot, for the restart measurement.
    capture: Option<Vec<Vec<u8>>>,
    captured: Option<(Vec<Vec<u8>>, usize)>,
    store: Store,
}

/// A replica's history store: the writer, a reader, and what waits to be written.
struct Store {
    rt: tokio::runtime::Runtime,
    path: std::path::PathBuf,
    writer: SqlitePool,
    reader: SqlitePool,
    pending: Tagged,
    _dir: tempfile::TempDir,
}

impl Store {
    fn open() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir_in(std::env::var("COOP_BENCH_DIR").unwrap_or(".".into()))
            .expect("a scratch directory");
        let path = dir.path().join("scheduler.db");
        let (writer, reader) = rt.block_on(async {
            let disk = coop_scheduler::consensus::disk::Disk::open(&path)
                .await
                .expect("the store opens");
            let (h, _) = coop_scheduler::history::History::open(&path, 0, None)
                .await
                .expect("its reader opens");
            (disk.pool().clone(), h.pool().clone())
        });
        Store {
            rt,
            path,
            writer,
            reader,
            pending: Tagged::new(),
            _dir: dir,
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.pending);
        let writer = self.writer.clone();
        self.rt.block_on(write(&writer, &items));
    }

    fn bytes(&self) -> u64 {
        let size = |p: std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        let wal = self.path.with_extension("db-wal");
        size(self.path.clone()) + size(wal)
    }
}

async fn write(pool: &SqlitePool, items: &Tagged) {
    let mut tx = pool.begin().await.expect("a transaction");
    archive::insert(&mut tx, items, archive::Source::Apply)
        .await
        .expect("history is written");
    tx.commit().await.expect("committed");
}

fn member(i: usize) -> String {
    format!("m{i:02}")
}

fn node_name(i: usize) -> String {
    format!("n{i:03}")
}

impl Bench {
    fn new(reports_per_job: u32) -> Self {
        let mut b = Bench {
            state: State::default(),
            now: 1_000,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            reports_per_job,
            planned: BTreeMap::new(),
            runs: BTreeMap::new(),
            seq: vec![0; NODES],
            submitted: 0,
            usage_reports: 0,
            commands: 0,
            apply_s: 0.0,
            view: Default::default(),
            capture: None,
            captured: None,
            store: Store::open(),
        };
        b.setup(Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        });
        for m in 0..MEMBERS {
            b.setup(Op::AddMember {
                name: member(m),
                token_hash: format!("token-{m}"),
                expires_at_ms: None,
            });
        }
        b.setup(Op::SetPolicy {
            settings: vec![
                Setting::Ordering(Ordering::Fairshare),
                Setting::Preemption(true),
                Setting::MinRuntimeS(300),
                Setting::PreemptGraceS(30),
                Setting::MaxPendingJobs(0),
            ],
            by: "bench".into(),
            reason: "year bench".into(),
        });
        for n in 0..NODES {
            let name = node_name(n);
            let model = if n % 4 == 0 { "H100-80GB" } else { "A100-80GB" };
            let gpus = (0..PER_NODE)
                .map(|i| GpuInfo {
                    uuid: format!("GPU-{name}-{i}"),
                    index: i,
                    model: model.into(),
                    memory_mb: 80 * 1024,
                    measured: None,
                    power_limit_w: 0,
                })
                .collect();
            b.setup(Op::RegisterNode {
                node: name,
                owner: member(n % MEMBERS),
                gpus,
                session: "s".into(),
                orphaned_runs_end_ms: 0,
                address: String::new(),
                site: String::new(),
            });
        }
        b
    }

    fn setup(&mut self, op: Op) {
        self.apply(op).expect("setup applies");
    }

    /// One committed entry: encoded, decoded and applied, as a replica does.
    fn apply(&mut self, op: Op) -> Result<Vec<Event>, Rejection> {
        let cmd = Command {
            at_ms: self.now,
            op,
        };
        let t = Instant::now();
        let bytes = encode(&cmd);
        let read: Command = match decode(&bytes) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("the codec refused a command: {e}: {cmd:?}");
                std::process::exit(2);
            }
        };
        let result = self.state.apply(&read);
        self.commands += 1;
        history::tag(
            self.commands,
            self.state.take_outbox(),
            &mut self.store.pending,
        );
        if self.commands.is_multiple_of(STORE_BATCH as u64) {
            self.store.flush();
            self.view = std::sync::Arc::new(self.state.clone());
        }
        self.apply_s += t.elapsed().as_secs_f64();
        if let Some(c) = &mut self.capture {
            c.push(bytes);
            if c.len() == SNAPSHOT_EVERY {
                let c = self.capture.take().expect("capturing");
                self.captured = Some((c, self.state.chain.seq as usize));
            }
        }
        result
    }

    fn report(&mut self, node: usize, report: RunReport) {
        self.seq[node] += 1;
        let op = Op::Report {
            node: node_name(node),
            session: "s".into(),
            seq: self.seq[node],
            report,
        };
        self.apply(op).expect("reports apply");
    }

    fn submit(&mut self) {
        let id = Uuid::from_u128(self.submitted as u128 + 1);
        self.submitted += 1;
        let r = self.reports_per_job as u64;
        let ticks = 1 + self.rng.below(2 * r - 1) as u32;
        let gpus = [1, 1, 2, 4, 8][self.rng.below(5) as usize];
        let m = member(self.rng.below(MEMBERS as u64) as usize);
        let spec = JobSpec {
            kind: JobKind::Finetune,
            gpus,
            command: vec!["train".into()],
            gpu_model: None,
            min_gpu_memory_mb: 0,
            preemptible: true,
            kill_grace_ms: 30_000,
            priority: 0,
            time_limit_ms: (ticks as u64 + 2) * TICK_MS as u64,
            isolation: Default::default(),
            env: Default::default(),
            nodes: 0,
            gpus_per_node: 0,
        };
        self.apply(Op::SubmitJob {
            id,
            member: m,
            spec,
        })
        .expect("submissions apply");
        self.planned.insert(id, ticks);
    }

    /// One usage tick of simulated time.
    fn tick(&mut self, jobs: u64) {
        self.now += TICK_MS;
        let now = self.now;
        let ids: Vec<JobId> = self.runs.keys().copied().collect();
        for id in ids {
            let r = &self.runs[&id];
            let (node, attempt) = (r.node, r.attempt);
            if r.stopping {
                // Preempted: checkpointed within its grace, exits.
                let left = r.left;
                self.runs.remove(&id);
                self.planned.insert(id, left.max(1));
                self.report(
                    node,
                    RunReport::Exited {
                        job: id,
                        attempt,
                        at_ms: now,
                        exit_code: 143,
                        reason: String::new(),
                        energy_mj: 0,
                    },
                );
                continue;
            }
            let energy_mj = 1_000_000 + self.rng.below(1_000_000);
            self.report(
                node,
                RunReport::Usage {
                    job: id,
                    attempt,
                    to_ms: now,
                    energy_mj,
                },
            );
            self.usage_reports += 1;
            let r = self.runs.get_mut(&id).expect("running");
            r.left -= 1;
            if r.left == 0 {
                self.runs.remove(&id);
                self.report(
                    node,
                    RunReport::Exited {
                        job: id,
                        attempt,
                        at_ms: now,
                        exit_code: 0,
                        reason: String::new(),
                        energy_mj: 0,
                    },
                );
            }
        }
        while self.state.queue.len() < QUEUE_TARGET && self.submitted < jobs {
            self.submit();
        }
        let pass = plan(
            &self.state,
            now,
            &coop_core::fairshare::usage(&self.state, now),
        );
        for p in pass.preemptions {
            if self
                .apply(Op::Preempt {
                    job: p.job,
                    for_job: p.for_job,
                })
                .is_ok()
                && let Some(r) = self.runs.get_mut(&p.job)
            {
                r.stopping = true;
            }
        }
        for p in pass.placements {
            let node: usize = p.node[1..].parse().expect("node name");
            let job = p.job;
            if self
                .apply(Op::Place {
                    job,
                    node: p.node,
                    gpus: p.gpus,
                })
                .is_err()
            {
                continue;
            }
            let attempt = self.state.jobs[&job].attempts;
            let left = self.planned.remove(&job).unwrap_or(self.reports_per_job);
            self.report(
                node,
                RunReport::Started {
                    job,
                    attempt,
                    at_ms: now,
                },
            );
            self.runs.insert(
                job,
                Run {
                    node,
                    attempt,
                    left,
                    stopping: false,
                },
            );
        }
    }
}

/// A field of /proc/self/status, in kB.
fn proc_kb(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_mb() -> f64 {
    proc_kb("/proc/self/status", "VmRSS:") as f64 / 1024.0
}

fn p99(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[(times.len() * 99 / 100).min(times.len() - 1)]
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64())
}

fn read_u64(r: &mut impl Read) -> u64 {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).expect("restore input");
    u64::from_le_bytes(b)
}

/// The restarting replica, in its own process: reads a snapshot and the
/// entries after it from stdin, then decodes the snapshot and replays them.
/// Prints: decode seconds, replay seconds, peak RSS kB, ledger and audit length.
fn restore() {
    let mut input = std::io::stdin().lock();
    let n = read_u64(&mut input) as usize;
    let mut snapshot = vec![0u8; n];
    input.read_exact(&mut snapshot).expect("snapshot");
    let count = read_u64(&mut input);
    let mut entries = Vec::new();
    for _ in 0..count {
        let n = read_u64(&mut input) as usize;
        let mut e = vec![0u8; n];
        input.read_exact(&mut e).expect("entry");
        entries.push(e);
    }
    let (state, decode_s) = timed(|| decode::<State>(&snapshot));
    let mut state = state.unwrap_or_else(|e| {
        eprintln!("the codec refused the snapshot: {e}");
        std::process::exit(2);
    });
    drop(snapshot);
    let mut store = Store::open();
    let ((), replay_s) = timed(|| {
        for (i, e) in entries.iter().enumerate() {
            let cmd: Command = decode(e).expect("entries decode");
            let _ = state.apply(&cmd);
            history::tag(i as u64 + 1, state.take_outbox(), &mut store.pending);
            if (i + 1) % STORE_BATCH == 0 {
                store.flush();
            }
        }
        store.flush();
    });
    println!(
        "{decode_s} {replay_s} {} {} {}",
        proc_kb("/proc/self/status", "VmHWM:"),
        state.chain.seq,
        state.jobs.len()
    );
}

struct Restart {
    decode_s: f64,
    replay_s: f64,
    peak_mb: f64,
}

/// Runs `restore` in a child process on `snapshot` and `entries`.
fn restart(snapshot: Vec<u8>, entries: &[Vec<u8>], expect_ledger: usize) -> Restart {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Proc::new(exe)
        .arg("--restore")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("restore process starts");
    {
        let mut w = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
        w.write_all(&(snapshot.len() as u64).to_le_bytes()).unwrap();
        w.write_all(&snapshot).unwrap();
        drop(snapshot);
        w.write_all(&(entries.len() as u64).to_le_bytes()).unwrap();
        for e in entries {
            w.write_all(&(e.len() as u64).to_le_bytes()).unwrap();
            w.write_all(e).unwrap();
        }
        w.flush().unwrap();
    }
    let out = child.wait_with_output().expect("restore process ends");
    assert!(out.status.success(), "restore failed: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    let head: usize = f[3].parse().unwrap();
    assert_eq!(
        head, expect_ledger,
        "the restored state's audit chain differs"
    );
    Restart {
        decode_s: f[0].parse().unwrap(),
        replay_s: f[1].parse().unwrap(),
        peak_mb: f[2].parse::<f64>().unwrap() / 1024.0,
    }
}

struct Opts {
    jobs: u64,
    reports_per_job: u32,
    samples: u64,
    stop_at_rss_mb: f64,
}

fn opts() -> Opts {
    let mut o = Opts {
        jobs: 10_000_000,
        reports_per_job: 10,
        samples: 10,
        stop_at_rss_mb: 6000.0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .and_then(|v| v.replace('_', "").parse::<u64>().ok());
        let Some(v) = value else {
            eprintln!(
                "usage: year_bench [--jobs N] [--reports-per-job R] [--samples K] [--stop-at-rss-mb M]"
            );
            std::process::exit(2);
        };
        match args[i].as_str() {
            "--jobs" => o.jobs = v.max(1),
            "--reports-per-job" => o.reports_per_job = v.clamp(1, 1_000) as u32,
            "--samples" => o.samples = v.max(1),
            "--stop-at-rss-mb" => o.stop_at_rss_mb = v as f64,
            a => {
                eprintln!("unknown argument {a}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    o
}

/// Child memory per snapshot byte that a restart needed so far (a guess until
/// measured): a restart is skipped when it would not fit in free memory.
struct Guard {
    per_byte: f64,
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--restore") {
        restore();
        return;
    }
    let o = opts();
    println!(
        "{} GPUs on {NODES} nodes, {MEMBERS} members; {} jobs, ~{} usage reports each, \
         {} samples, stop above {} MB resident",
        NODES as u32 * PER_NODE,
        o.jobs,
        o.reports_per_job,
        o.samples,
        o.stop_at_rss_mb
    );
    println!(
        "{:>9} {:>11} {:>5} {:>8} {:>11} {:>11} {:>9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "jobs",
        "reports",
        "days",
        "rss MiB",
        "in memory",
        "store MB",
        "snap MB",
        "enc s",
        "restart s",
        "rst MiB",
        "catchup",
        "get p99",
        "use p99",
        "pass p99",
        "cmds/s"
    );
    let mut b = Bench::new(o.reports_per_job);
    let mut guard = Guard { per_byte: 15.0 };
    let mut next = 1;
    let mut last = (b.commands, b.apply_s);
    let started = Instant::now();
    let mut ticks = 0u64;
    let mut stopped = None;
    while next <= o.samples {
        let target = o.jobs * next / o.samples;
        b.tick(o.jobs);
        ticks += 1;
        let over = ticks.is_multiple_of(32) && rss_mb() > o.stop_at_rss_mb;
        if over {
            stopped = Some(rss_mb());
        }
        if b.submitted < target && !over {
            continue;
        }
        // The rate of the stretch since the last sample, before measuring.
        let rate = (b.commands - last.0) as f64 / (b.apply_s - last.1);
        sample(&mut b, &mut guard, rate, o.jobs);
        last = (b.commands, b.apply_s);
        next += 1;
        if over {
            break;
        }
    }
    if let Some(mb) = stopped {
        println!(
            "stopped early: resident memory {mb:.0} MB passed --stop-at-rss-mb {} \
             after {} of {} jobs",
            o.stop_at_rss_mb, b.submitted, o.jobs
        );
    }
    println!(
        "{} commands applied in {:.0} s of apply path; {:.0} s wall in all",
        b.commands,
        b.apply_s,
        started.elapsed().as_secs_f64()
    );
}

fn sample(b: &mut Bench, guard: &mut Guard, rate: f64, jobs: u64) {
    let (jobs_now, reports) = (b.submitted, b.usage_reports);
    let days = b.now as f64 / DAY_MS as f64;
    b.store.flush();
    let rss = rss_mb();
    let (in_memory, store_mb) = (b.state.jobs.len(), b.store.bytes() as f64 / 1e6);
    let now = b.now;
    let mut rng = Rng(jobs_now ^ 0x5851_f42d_4c95_7f2d);
    let reader = b.store.reader.clone();
    let get = p99((0..P99_SAMPLES)
        .map(|_| {
            let id = Uuid::from_u128(rng.below(jobs_now) as u128 + 1);
            let (found, s) = timed(|| match b.state.jobs.get(&id) {
                Some(j) => (b.state.job_gpu_ms(j, now), j.clone()),
                None => {
                    let j = b
                        .store
                        .rt
                        .block_on(archive::retired_job(&reader, u64::MAX, id))
                        .expect("the store reads")
                        .expect("a submitted job is in memory or in the store");
                    (j.gpu_ms, j)
                }
            });
            std::hint::black_box(found);
            s * 1000.0
        })
        .collect());
    let usage = p99((0..P99_SAMPLES)
        .map(|_| {
            let m = member(rng.below(MEMBERS as u64) as usize);
            let from = now - 30 * DAY_MS;
            let (u, s) = timed(|| {
                let mut u = live_usage(&b.state, now, from, now, Some(&m));
                let (window, retired) = b.store.rt.block_on(async {
                    let m = Some(m.as_str());
                    let w = windows::usage_window(&reader, u64::MAX, from, now, m).await;
                    let j = archive::retired_finished_counts(&reader, u64::MAX, from, now, m).await;
                    (w.expect("usage read"), j.expect("jobs read"))
                });
                let past = Past {
                    usage: &window.records,
                    sums: &window.sums,
                    retired: &retired,
                    ..Default::default()
                };
                add_past_usage(&mut u, past, from, now);
                u
            });
            std::hint::black_box(u);
            s * 1000.0
        })
        .collect());
    let usage_now = coop_core::fairshare::usage(&b.state, now);
    let pass = p99((0..P99_SAMPLES)
        .map(|_| {
            let (p, s) = timed(|| plan(&b.state, now, &usage_now));
            std::hint::black_box(p);
            s * 1000.0
        })
        .collect());
    let (snapshot, enc_s) = timed(|| encode(&b.state));
    let snap_mb = snapshot.len() as f64 / 1e6;
    // The entries committed after the snapshot, up to the next one.
    let first = b.commands;
    b.capture = Some(Vec::with_capacity(SNAPSHOT_EVERY));
    while b.captured.is_none() {
        b.tick(jobs.max(b.submitted + QUEUE_TARGET as u64));
    }
    b.store.flush();
    let (entries, expect_ledger) = b.captured.take().expect("captured");
    // A follower that installs the snapshot copies the history of what it
    // covers, page by page, from a peer's store into its own.
    let copy_s = {
        let follower = Store::open();
        let to = first + SNAPSHOT_EVERY as u64;
        timed(|| {
            b.store.rt.block_on(async {
                let mut from = first;
                while from < to {
                    let page =
                        archive::page(&reader, from, to, coop_scheduler::history::PAGE_RECORDS)
                            .await
                            .expect("a page");
                    write(&follower.writer, &page.items().expect("it reads back")).await;
                    from = page.upto;
                }
            })
        })
        .1
    };
    let need_mb = snapshot.len() as f64 * guard.per_byte / 1e6;
    let avail_mb = proc_kb("/proc/meminfo", "MemAvailable:") as f64 / 1024.0;
    let (restart_s, restart_mb, catchup) = if need_mb < avail_mb - 1500.0 {
        let len = snapshot.len() as f64;
        let r = restart(snapshot, &entries, expect_ledger);
        guard.per_byte = (r.peak_mb * 1e6 / len) * 1.2;
        (
            format!("{:.2}", r.decode_s + r.replay_s),
            format!("{:.0}", r.peak_mb),
            format!("{:.2}", enc_s + r.decode_s + copy_s),
        )
    } else {
        println!("(restart skipped: about {need_mb:.0} MB needed, {avail_mb:.0} MB available)");
        ("-".into(), "-".into(), "-".into())
    };
    println!(
        "{:>9} {:>11} {:>5.0} {:>8.0} {:>11} {:>11} {:>9.1} {:>7.2} {:>9} {:>9} {:>8} {:>8.3} {:>8.2} {:>8.2} {:>9.0}",
        jobs_now,
        reports,
        days,
        rss,
        in_memory,
        format!("{store_mb:.0}"),
        snap_mb,
        enc_s,
        restart_s,
        restart_mb,
        catchup,
        get,
        usage,
        pass,
        rate
    );
}
