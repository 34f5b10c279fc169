//! Agent overhead and spool throughput.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example agent_bench -- [SECONDS] [SPOOL_WRITES]
//! ```
//!
//! 1. Overhead: a scheduler and an agent with 8 simulated GPUs, telemetry
//!    every second, usage reported every 5 s, all 8 GPUs busy with one job
//!    each (`sleep`), for SECONDS (default 60). Reports the agent process's
//!    CPU time (user + system, from /proc) scaled to an hour, and its
//!    resident memory at the end.
//! 2. Spool: usage intervals written to the agent's SQLite spool (WAL,
//!    synchronous=FULL) in transactions of 1, 8 and 64 intervals, for
//!    SPOOL_WRITES transactions each (default 500); intervals persisted per
//!    second, and reports acknowledged (cleared) per second.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coop_agent::spool::{RunRecord, Spool};
use coop_proto::v1 as pb;

const TOKEN: &str = "coop_6d2f8a1c4e7b9035d1e8a6c2f4b7093e5a1d8c6f2b4e7a90";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(60);
    let writes: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(500);
    let dir = tempfile::tempdir()?;
    overhead(dir.path(), secs)?;
    tokio::runtime::Runtime::new()?.block_on(spool(dir.path(), writes))
}

fn coop_bin() -> anyhow::Result<PathBuf> {
    // The example lives in target/<profile>/examples; the binary one up.
    std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("coop"))
        .filter(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("build the coop binary first: cargo build --release"))
}

/// Kills the child when dropped, however the benchmark ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coop(bin: &Path, args: &[&str], addr: &str, ca: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("COOP_ADDR", addr)
        .env("COOP_CA", ca)
        .env("COOP_TOKEN", TOKEN)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "coop {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// (user + system CPU seconds, resident bytes) of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, rest) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("odd stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = 100.0; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / hz, rss_kb * 1024))
}

fn overhead(dir: &Path, secs: u64) -> anyhow::Result<()> {
    let bin = coop_bin()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("https://127.0.0.1:{port}");
    // The scheduler makes a CA of its own there at first start.
    let ca = dir.join("scheduler/tls/ca.pem");
    let _scheduler = Reaped(
        Command::new(&bin)
            .args(["scheduler", "run", "--id", "1"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.join("scheduler"))
            .args(["--usage-interval", "5s"])
            .env("COOP_OPERATOR_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while coop(&bin, &["member", "add", "bench"], &addr, &ca).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the scheduler never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let join = coop(
        &bin,
        &["node", "enroll", "bench", "--owner", "bench"],
        &addr,
        &ca,
    )?;
    let agent = Reaped(
        Command::new(&bin)
            .args(["agent", "run", "--scheduler", &addr, "--join", join.trim()])
            .args(["--gpus", "sim:8xH100-80GB"])
            .args(["--telemetry-interval", "1s"])
            .args(["--metrics", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("agent"))
            .env("COOP_CA", &ca)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !coop(&bin, &["node", "list"], &addr, &ca)?.contains(" up") {
        anyhow::ensure!(Instant::now() < deadline, "the agent never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..8 {
        coop(
            &bin,
            &[
                "job", "submit", "--member", "bench", "--", "sleep", "100000",
            ],
            &addr,
            &ca,
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = coop(&bin, &["job", "list", "--state", "running"], &addr, &ca)?;
        if running.lines().count() == 9 {
            break; // a header and 8 jobs
        }
        anyhow::ensure!(Instant::now() < deadline, "the 8 jobs never all ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = agent.0.id();
    let (cpu0, _) = usage(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (cpu1, rss) = usage(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let per_hour = (cpu1 - cpu0) / wall * 3600.0;
    println!("## Agent overhead: 8 simulated GPUs busy, telemetry every 1 s, usage every 5 s");
    println!();
    println!("| measured over | CPU time per hour | CPU share of one core | resident memory |");
    println!("|---|---|---|---|");
    println!(
        "| {wall:.0} s | {per_hour:.1} s | {:.3} % | {:.1} MiB |",
        (cpu1 - cpu0) / wall * 100.0,
        rss as f64 / (1 << 20) as f64
    );
    println!();
    Ok(())
}

async fn spool(dir: &Path, writes: usize) -> anyhow::Result<()> {
    println!("## Spool: usage intervals persisted (SQLite WAL, synchronous=FULL)");
    println!();
    println!("| intervals per transaction | transactions | intervals/s | acks cleared/s |");
    println!("|---|---|---|---|");
    for batch in [1usize, 8, 64] {
        let d = dir.join(format!("spool-{batch}"));
        std::fs::create_dir_all(&d)?;
        let mut spool = Spool::open(&d).await?;
        let runs: Vec<RunRecord> = (0..batch)
            .map(|i| {
                let mut r = RunRecord::new(
                    &coop_agent::runner::RunKey {
                        job: format!("00000000-0000-0000-0000-{i:012}"),
                        attempt: 1,
                    },
                    0,
                );
                r.gpus = vec![format!("GPU-{i}")];
                r
            })
            .collect();
        let refs: Vec<&RunRecord> = runs.iter().collect();
        let t = Instant::now();
        let mut last_seq = 0;
        for w in 0..writes {
            let events = runs
                .iter()
                .map(|r| {
                    pb::report::Event::Usage(pb::RunUsage {
                        job_id: r.job.clone(),
                        attempt: 1,
                        to_ms: w as i64 * 1000,
                        energy_mj: 700_000,
                    })
                })
                .collect();
            let (reports, written) = spool.record(events, &refs).await;
            written?;
            last_seq = reports.last().map_or(last_seq, |r| r.seq);
        }
        let rate = (writes * batch) as f64 / t.elapsed().as_secs_f64();
        // Acknowledgements, cleared one by one as they would arrive singly.
        let t = Instant::now();
        let acks = writes.min(200);
        for seq in (1..=last_seq).step_by((last_seq as usize / acks).max(1)) {
            spool.ack(seq).await?;
        }
        let ack_rate = acks as f64 / t.elapsed().as_secs_f64();
        println!("| {batch} | {writes} | {rate:.0} | {ack_rate:.0} |");
        spool.close().await;
    }
    Ok(())
}
