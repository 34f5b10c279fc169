//! Long-running processes: `coop dev`, `coop scheduler run`, `coop agent run`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use coop_agent::metrics::AgentMetrics;
use coop_agent::{Agent, AgentConfig, GpuSource};
use coop_scheduler::auth::{hash_token, new_token};
use coop_scheduler::metrics;
use coop_scheduler::{Config, Scheduler};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::args::*;
use crate::client::normalize_addr;

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn scheduler_config(listen: std::net::SocketAddr, data_dir: PathBuf, t: &Timing) -> Config {
    let mut c = Config::new(listen, data_dir);
    c.node_timeout = t.node_timeout;
    c.heartbeat_interval = t.heartbeat_interval;
    c.kill_grace = t.kill_grace;
    c.usage_interval = t.usage_interval;
    c.accounting_db = t.accounting_db.clone();
    c
}

/// The plaintext credentials `coop dev` prints at every start (the cluster
/// itself keeps only their hashes). Readable by the owner only.
#[derive(Serialize, Deserialize)]
struct DevCredentials {
    operator_token: String,
    member: String,
    member_token: String,
}

fn dev_credentials(dir: &Path) -> anyhow::Result<DevCredentials> {
    let path = dir.join("credentials.json");
    if let Ok(bytes) = std::fs::read(&path) {
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", path.display()));
    }
    let creds = DevCredentials {
        operator_token: new_token(),
        member: "default".into(),
        member_token: new_token(),
    };
    write_private(&path, &serde_json::to_vec_pretty(&creds)?)?;
    Ok(creds)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn default_dev_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("coop").join("dev")
}

pub async fn dev(a: DevArgs) -> anyhow::Result<()> {
    let gpus = a.gpus.parse::<GpuSource>()?.open(&a.node)?;
    let gpu_summary = describe_gpus(&gpus);
    let real = gpus.driver_version.is_some();
    let dir = a.data_dir.unwrap_or_else(default_dev_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let creds = dev_credentials(&dir)?;
    let mut config = scheduler_config(a.listen, dir.join("scheduler"), &a.timing);
    config.operator_token = Some(creds.operator_token.clone());
    config.default_member = Some((creds.member.clone(), hash_token(&creds.member_token)));
    let scheduler = Scheduler::start(config).await?;
    let addr = format!("http://{}", scheduler.addr);
    // One endpoint for both: the agent's metrics join the scheduler's registry.
    let agent_metrics = AgentMetrics::new(&scheduler.registry)?;
    let metrics_addr = match a.metrics {
        Some(m) => Some(metrics::serve(m, scheduler.registry.clone()).await?),
        None => None,
    };

    let agent = Agent::new(AgentConfig {
        schedulers: vec![addr.clone()],
        token: creds.operator_token.clone(),
        node: a.node.clone(),
        owner: creds.member.clone(),
        gpus,
        data_dir: dir.join("agent"),
        metrics: Some(agent_metrics),
        telemetry_interval: a.runs.telemetry_interval,
        isolation: isolation(&a.runs, real)?,
        keep_runs: a.runs.keep_runs,
    })
    .await?;
    let mut registered = agent.registered();
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent_task = tokio::spawn(agent.run(stop_rx));
    registered
        .wait_for(|r| *r)
        .await
        .context("the local agent stopped")?;

    eprintln!(
        "coop dev: scheduler on {addr}, node {} with {gpu_summary}, data in {}",
        a.node,
        dir.display()
    );
    eprintln!(
        "operator credential below; member {:?} has token {}",
        creds.member, creds.member_token
    );
    println!("export COOP_ADDR={addr}");
    println!("export COOP_TOKEN={}", creds.operator_token);
    if let Some(m) = metrics_addr {
        println!("export COOP_METRICS={m}");
    }
    eprintln!("try: coop job submit --gpus 2 -- sh -c 'echo $CUDA_VISIBLE_DEVICES; sleep 2'");
    eprintln!("stop with Ctrl-C");

    let failed = tokio::select! {
        _ = stop_signal() => None,
        why = scheduler.replica.failure() => Some(why),
    };
    eprintln!("stopping: running jobs get SIGTERM, then SIGKILL after their grace period");
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    scheduler.stop().await;
    match failed {
        Some(why) => bail!("the raft log failed: {why}"),
        None => Ok(()),
    }
}

pub async fn scheduler(cmd: SchedulerCmd) -> anyhow::Result<()> {
    let SchedulerCmd::Run(a) = cmd;
    let mut config = scheduler_config(a.listen, a.data_dir, &a.timing);
    config.id = a.id;
    config.operator_token = a.operator_token;
    config.join = a.join;
    config.peer_token = a.peer_token;
    config.snapshot_every = a.snapshot_every;
    if let Some(adv) = a.advertise {
        config.advertise = coop_scheduler::consensus::transport::normalize(&adv);
    }
    if let Some(peers) = &a.peers {
        config.peers = parse_peers(peers)?;
        match config.peers.get(&a.id) {
            Some(addr) if config.advertise.is_empty() => config.advertise = addr.clone(),
            Some(_) => {}
            None => bail!("peers: must include this node's id {} (ID=ADDR)", a.id),
        }
    }
    let mut s = Scheduler::start(config).await?;
    if let Some(t) = &s.generated_operator_token {
        eprintln!("a new cluster: its operator token is shown only now");
        println!("export COOP_TOKEN={t}");
    }
    println!("export COOP_ADDR=http://{}", s.addr);
    if let Some(m) = a.metrics {
        let bound = metrics::serve(m, s.registry.clone()).await?;
        println!("export COOP_METRICS={bound}");
    }
    tokio::select! {
        r = s.wait() => r?,
        _ = stop_signal() => s.stop().await,
    }
    Ok(())
}

/// `1=host:port,2=host:port` into ids and URLs.
fn parse_peers(s: &str) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut peers = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("peers: {part:?} is not ID=ADDR"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| anyhow::anyhow!("peers: {id:?} is not a positive integer id"))?;
        let addr = addr.trim();
        if addr.is_empty() {
            bail!("peers: node {id} has no address");
        }
        if peers
            .insert(id, coop_scheduler::consensus::transport::normalize(addr))
            .is_some()
        {
            bail!("peers: id {id} appears twice");
        }
    }
    Ok(peers)
}

pub async fn agent(client: &ClientArgs, cmd: AgentCmd) -> anyhow::Result<()> {
    let a = match cmd {
        AgentCmd::Run(a) => a,
        AgentCmd::Status(a) => return crate::commands::agent_status(client, &a.data_dir).await,
        AgentCmd::Probe(p) => return crate::commands::agent_probe(client, p.burn).await,
    };
    let token = client
        .token
        .clone()
        .filter(|t| !t.trim().is_empty())
        .context("token: the agent needs a credential (--token or COOP_TOKEN)")?;
    let mut gpus = a.gpus.parse::<GpuSource>()?.open(&a.name)?;
    if gpus.driver_version.is_some() && !a.no_probe {
        probe_gpus(&mut gpus).await?;
    }
    let gpu_summary = describe_gpus(&gpus);
    let real = gpus.driver_version.is_some();
    let schedulers: Vec<String> = a
        .scheduler
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(normalize_addr)
        .collect();
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let registry = prometheus::Registry::new();
    let agent_metrics = AgentMetrics::new(&registry)?;
    if let Some(m) = a.metrics {
        let bound = metrics::serve(m, registry).await?;
        println!("export COOP_METRICS={bound}");
    }
    let agent = Agent::new(AgentConfig {
        schedulers,
        token,
        node: a.name.clone(),
        owner: a.owner,
        gpus,
        data_dir: a.data_dir,
        metrics: Some(agent_metrics),
        telemetry_interval: a.runs.telemetry_interval,
        isolation: isolation(&a.runs, real)?,
        keep_runs: a.runs.keep_runs,
    })
    .await?;
    eprintln!("agent {}: {gpu_summary}", a.name);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut task = tokio::spawn(agent.run(stop_rx));
    tokio::select! {
        r = &mut task => return r?,
        _ = stop_signal() => {}
    }
    let _ = stop_tx.send(true);
    task.await??;
    Ok(())
}

/// How this agent keeps runs apart, said once at start: what limits mean
/// here, and whether image jobs can run.
fn isolation(a: &RunArgs, real_gpus: bool) -> anyhow::Result<coop_agent::runner::Isolation> {
    use coop_agent::isolation::{Cgroups, Runtime};
    let (no_cgroups, root, runtime) = (
        a.no_cgroups,
        a.cgroup_root.as_deref(),
        a.container_runtime.as_str(),
    );
    let cgroups = if no_cgroups {
        tracing::info!("cgroups off (--no-cgroups): --cpus and --memory are not enforced");
        None
    } else {
        match Cgroups::detect(root) {
            Ok(cg) => {
                tracing::info!("runs with --cpus/--memory get their own cgroup");
                Some(cg)
            }
            // An explicit root that does not work is a configuration error.
            Err(why) if root.is_some() => bail!("cgroup-root: {why}"),
            Err(why) => {
                tracing::warn!("no per-run cgroups ({why}): --cpus and --memory are not enforced");
                None
            }
        }
    };
    let runtime = match runtime {
        "none" => None,
        choice => {
            let found = Runtime::find(choice);
            match &found {
                Some(rt) => tracing::info!("jobs with --image run in {} containers", rt.program),
                None if choice == "auto" => {
                    tracing::info!("no docker or podman on PATH: jobs with --image fail here")
                }
                None => bail!("container-runtime: {choice:?} is not an executable on PATH"),
            }
            found
        }
    };
    Ok(coop_agent::runner::Isolation {
        cgroups,
        runtime,
        real_gpus,
    })
}

/// Checks and measures real GPUs before they are offered: those that fail
/// are left out. A probe that cannot run at all (no NVRTC) leaves them
/// unmeasured, with a warning.
async fn probe_gpus(gpus: &mut coop_agent::Gpus) -> anyhow::Result<()> {
    match tokio::task::spawn_blocking(coop_agent::probe::probe_all).await? {
        Ok(probes) => {
            for (uuid, why) in coop_agent::probe::apply(&mut gpus.info, &probes) {
                tracing::error!("GPU {uuid} failed its check and is not offered: {why}");
            }
            if gpus.info.is_empty() {
                bail!("gpus: every GPU failed its check (see coop agent probe)");
            }
        }
        Err(e) => tracing::warn!("{e:#}; GPUs are offered unmeasured"),
    }
    Ok(())
}

/// "4 GPUs (A100-80GB), simulated" or "8 GPUs (H100-80GB-HBM3), driver 550.54, CUDA 12.4".
fn describe_gpus(g: &coop_agent::Gpus) -> String {
    let mut models: Vec<&str> = g.info.iter().map(|i| i.model.as_str()).collect();
    models.dedup();
    let source = match (&g.driver_version, &g.cuda_version) {
        (Some(d), Some(c)) => format!("driver {d}, CUDA {c}"),
        (Some(d), None) => format!("driver {d}"),
        _ => "simulated".to_string(),
    };
    format!("{} GPUs ({}), {source}", g.info.len(), models.join(", "))
}
