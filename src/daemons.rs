//! Long-running processes: `coop dev`, `coop scheduler run`, `coop agent run`.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use coop_agent::metrics::AgentMetrics;
use coop_agent::{Agent, AgentConfig, GpuSource};
use coop_core::state::Op;
use coop_scheduler::auth::{hash_token, new_token};
use coop_scheduler::metrics;
use coop_scheduler::tls;
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
    tls::write_file(&path, &serde_json::to_vec_pretty(&creds)?, 0o600)?;
    Ok(creds)
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
    let gpu_devices = gpus.driver_version.is_some().then(|| gpus.devices.clone());
    let dir = a.data_dir.unwrap_or_else(default_dev_dir);
    tls::private_dir(&dir)?;
    // Before anything starts: a second `coop dev`, or a scheduler or agent
    // run by hand on these dirs, stops this one here.
    let _dev_lock = coop_scheduler::datadir::lock(&dir, "dev.lock", "coop dev")?;
    let scheduler_dir = dir.join("scheduler");
    coop_scheduler::datadir::check(
        &scheduler_dir,
        coop_scheduler::datadir::LOCK_FILE,
        "scheduler",
    )?;
    coop_scheduler::datadir::check(&dir.join("agent"), coop_agent::agent::LOCK_FILE, "agent")?;
    if nix::unistd::geteuid().is_root() {
        // Runs, each its own user, pass through to their directories under
        // agent/; everything else here is private on its own.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let creds = dev_credentials(&dir)?;
    let mut config = scheduler_config(a.listen, scheduler_dir, &a.timing);
    config.operator_token = Some(creds.operator_token.clone());
    config.default_member = Some((creds.member.clone(), hash_token(&creds.member_token)));
    // The everyday path is the secure one: a CA of this cluster's own.
    config.tls = if a.insecure {
        None
    } else {
        Some(tls::SchedulerTls::local(&dir.join("tls"), a.listen.ip())?)
    };
    let ca_path = config.tls.as_ref().map(|t| t.ca_path());
    let scheduler_tls = config.tls.clone();
    let scheduler = Scheduler::start(config).await?;
    let addr = client_url(scheduler.addr, ca_path.is_some());
    // One endpoint for both: the agent's metrics join the scheduler's registry.
    let agent_metrics = AgentMetrics::new(&scheduler.registry)?;
    let metrics_addr = match a.metrics {
        Some(m) => {
            let guard = scheduler_tls
                .as_ref()
                .map(|t| coop_scheduler::metrics_access::guard(scheduler.replica.clone(), t))
                .transpose()?;
            Some(metrics::serve(m, scheduler.registry.clone(), guard).await?)
        }
        None => None,
    };

    // The local agent enrolls like any other machine: a join token, exchanged
    // for a node credential it makes and keeps in its own data dir.
    let agent_dir = dir.join("agent");
    coop_agent::agent::private_dir(&agent_dir)?;
    let agent_tls = crate::client::tls(ca_path.as_deref())?;
    let known = |c: &coop_agent::enroll::Credential| {
        let hash = hash_token(&c.token);
        scheduler.replica.read().tokens.contains_key(&hash)
    };
    let cred = match coop_agent::enroll::load(&agent_dir)? {
        // Kept, unless the node was renamed or the cluster no longer knows it.
        Some(c) if c.node == a.node && known(&c) => c,
        _ => {
            let join = coop_scheduler::auth::new_join_token();
            scheduler
                .replica
                .propose(Op::EnrollNode {
                    node: a.node.clone(),
                    owner: creds.member.clone(),
                    join_hash: hash_token(&join),
                    expires_at_ms: coop_scheduler::clock::now_ms() + 60_000,
                })
                .await
                .context("enrolling the local node")?;
            coop_agent::enroll::join(
                &agent_dir,
                std::slice::from_ref(&addr),
                agent_tls.as_ref(),
                &join,
            )
            .await?
        }
    };
    let agent = Agent::new(AgentConfig {
        schedulers: vec![addr.clone()],
        token: cred.token,
        tls: agent_tls,
        node: a.node.clone(),
        owner: cred.owner,
        gpus,
        data_dir: agent_dir,
        metrics: Some(agent_metrics),
        telemetry_interval: a.runs.telemetry_interval,
        isolation: isolation(&a.runs, gpu_devices)?,
        keep_runs: a.runs.keep_runs,
        address: a.runs.address.clone().unwrap_or_default(),
        site: a.runs.site.clone().unwrap_or_default(),
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
    let current = scheduler.replica.read().operator_token_hash.clone();
    if current == Some(hash_token(&creds.operator_token)) {
        println!("export COOP_TOKEN={}", creds.operator_token);
    } else {
        eprintln!(
            "the operator token was rotated (coop operator token rotate): use the one it printed"
        );
    }
    if let Some(ca) = &ca_path {
        println!("export COOP_CA={}", ca.display());
    }
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
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

pub async fn scheduler(cmd: SchedulerCmd) -> anyhow::Result<()> {
    let SchedulerCmd::Run(a) = cmd;
    if let Some(t) = &a.operator_token {
        coop_scheduler::auth::check_strength(t).map_err(|e| anyhow!("operator-token: {e}"))?;
    }
    let mut config = scheduler_config(a.listen, a.data_dir.clone(), &a.timing);
    config.id = a.id;
    config.operator_token = a.operator_token;
    config.join = a.join;
    config.snapshot_every = a.snapshot_every;
    config.peer_listen = a.peer_listen;
    if let Some(peers) = &a.peers {
        config.peers = parse_peers(peers)?;
        if !a.join && !config.peers.contains_key(&a.id) {
            bail!("peers: must include this node's id {} (ID=HOST:PORT)", a.id);
        }
    } else if a.join {
        bail!("peers: --join needs the running cluster's schedulers (--peers ID=HOST:PORT,..)");
    }
    let several = a.join || config.peers.keys().any(|&id| id != a.id);
    config.tls = match (&a.tls_dir, a.insecure) {
        (Some(d), _) => Some(tls::SchedulerTls::load(d)?),
        (None, true) => None,
        (None, false) if several => bail!(
            "tls-dir: schedulers of one cluster need certificates from one CA (coop ca init, coop ca issue)"
        ),
        (None, false) => Some(tls::SchedulerTls::local(
            &a.data_dir.join("tls"),
            a.listen.ip(),
        )?),
    };
    config.insecure = a.insecure;
    let tls_on = config.tls.is_some() && !a.insecure;
    config.advertise = match &a.advertise {
        Some(adv) => coop_scheduler::consensus::transport::normalize(adv, tls_on),
        // Bound to every interface: clients reach it where peers do.
        None if a.listen.ip().is_unspecified() => config
            .peers
            .get(&a.id)
            .and_then(|p| url_host(p))
            .map(|h| client_url_host(&h, a.listen.port(), tls_on))
            .unwrap_or_default(),
        None => String::new(),
    };
    let ca_path = config.tls.as_ref().filter(|_| tls_on).map(|t| t.ca_path());
    let metrics_tls = config.tls.clone().filter(|_| tls_on);
    let mut s = Scheduler::start(config).await?;
    if let Some(t) = &s.generated_operator_token {
        eprintln!("a new cluster: its operator token is shown only now");
        println!("export COOP_TOKEN={t}");
    }
    println!("export COOP_ADDR={}", client_url(s.addr, tls_on));
    if let Some(ca) = ca_path {
        println!("export COOP_CA={}", ca.display());
    }
    if let Some(p) = s.peer_addr {
        println!("export COOP_PEER_ADDR={p}");
    }
    if let Some(m) = a.metrics {
        let guard = metrics_tls
            .as_ref()
            .map(|t| coop_scheduler::metrics_access::guard(s.replica.clone(), t))
            .transpose()?;
        let bound = metrics::serve(m, s.registry.clone(), guard).await?;
        println!("export COOP_METRICS={bound}");
    }
    tokio::select! {
        r = s.wait() => r?,
        _ = stop_signal() => s.stop().await,
    }
    Ok(())
}

/// How clients reach a scheduler bound to `addr` (loopback for a wildcard).
fn client_url(addr: std::net::SocketAddr, tls: bool) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    coop_scheduler::consensus::transport::normalize(
        &std::net::SocketAddr::new(ip, addr.port()).to_string(),
        tls,
    )
}

fn client_url_host(host: &str, port: u16, tls: bool) -> String {
    coop_scheduler::consensus::transport::normalize(&format!("{host}:{port}"), tls)
}

/// The host of `scheme://host:port`.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
    Some(host.to_string()).filter(|h| !h.is_empty())
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
            .insert(
                id,
                coop_scheduler::consensus::transport::normalize(addr, true),
            )
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
    if client.token.is_some() {
        tracing::warn!(
            "COOP_TOKEN is not used by agents: they act with their node's own credential"
        );
    }
    let agent_tls = crate::client::tls(client.ca.as_deref())?;
    let schedulers: Vec<String> = a
        .scheduler
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| normalize_addr(s, agent_tls.is_some()))
        .collect();
    for s in schedulers.iter().filter(|s| s.starts_with("http://")) {
        crate::client::plain_text_allowed(s, client.plain_text)?;
    }
    if agent_tls.is_none() {
        if let Some(s) = schedulers.iter().find(|s| s.starts_with("https://")) {
            bail!("ca: {s} is served over TLS: give the cluster CA with --ca or COOP_CA");
        }
        tracing::warn!(
            "no --ca: talking to the schedulers in PLAIN TEXT; the node credential crosses the network unencrypted"
        );
    }
    coop_agent::agent::private_dir(&a.data_dir)?;
    let existing = coop_agent::enroll::load(&a.data_dir)?;
    let cred = match (&a.join, existing) {
        (Some(j), Some(c)) if c.joined_with == coop_agent::enroll::hash(j) => c,
        (Some(j), _) => {
            let c =
                coop_agent::enroll::join(&a.data_dir, &schedulers, agent_tls.as_ref(), j).await?;
            eprintln!("enrolled: this machine is node {} of {}", c.node, c.owner);
            c
        }
        (None, Some(c)) => c,
        (None, None) => bail!(
            "join: this machine has no node credential yet: run `coop node enroll NAME --owner MEMBER` \
             where the operator's or the owner's token is, then start the agent with --join TOKEN"
        ),
    };
    if let Some(n) = a.name.as_deref().filter(|n| *n != cred.node) {
        bail!(
            "name: this machine is enrolled as node {}, not {n}",
            cred.node
        );
    }
    if let Some(o) = a.owner.as_deref().filter(|o| *o != cred.owner) {
        bail!(
            "owner: this machine is enrolled for {}, not {o}",
            cred.owner
        );
    }
    let mut gpus = a.gpus.parse::<GpuSource>()?.open(&cred.node)?;
    if gpus.driver_version.is_some() && !a.no_probe {
        probe_gpus(&mut gpus).await?;
    }
    let gpu_summary = describe_gpus(&gpus);
    let gpu_devices = gpus.driver_version.is_some().then(|| gpus.devices.clone());
    let registry = prometheus::Registry::new();
    let agent_metrics = AgentMetrics::new(&registry)?;
    if let Some(m) = a.metrics {
        // An agent has no certificate of its own: its telemetry is served to
        // anyone who can reach the address.
        if !m.ip().is_loopback() {
            tracing::warn!(
                "agent metrics on {m} are plain HTTP without a credential: keep them on a trusted network"
            );
        }
        let bound = metrics::serve(m, registry, None).await?;
        println!("export COOP_METRICS={bound}");
    }
    let node = cred.node.clone();
    let agent = Agent::new(AgentConfig {
        schedulers,
        token: cred.token,
        tls: agent_tls,
        node: cred.node,
        owner: cred.owner,
        gpus,
        data_dir: a.data_dir,
        metrics: Some(agent_metrics),
        telemetry_interval: a.runs.telemetry_interval,
        isolation: isolation(&a.runs, gpu_devices)?,
        keep_runs: a.runs.keep_runs,
        address: a.runs.address.clone().unwrap_or_default(),
        site: a.runs.site.clone().unwrap_or_default(),
    })
    .await?;
    eprintln!("agent {node}: {gpu_summary}");
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
fn isolation(
    a: &RunArgs,
    gpu_devices: Option<coop_agent::gpu::Devices>,
) -> anyhow::Result<coop_agent::runner::Isolation> {
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
    let run_users = nix::unistd::geteuid().is_root();
    let mut pid_namespaces = false;
    if run_users {
        tracing::info!(
            "each run runs as an unprivileged user of its own, in a directory only it can enter"
        );
        match coop_agent::runner::pid_namespaces_work() {
            Ok(()) => {
                pid_namespaces = true;
                tracing::info!("each run has a PID namespace of its own: it sees no other process");
            }
            Err(why) => tracing::warn!(
                "no PID namespaces ({why}): runs see the machine's processes (not their environments or files)"
            ),
        }
    } else {
        tracing::warn!(
            "not running as root: runs share the agent's user and can read its files, its node credential included, and see its processes"
        );
    }
    Ok(coop_agent::runner::Isolation {
        cgroups,
        runtime,
        gpu_devices,
        run_users,
        pid_namespaces,
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
