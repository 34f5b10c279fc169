//! The command line (see DESIGN.md, "CLI contract").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "coop",
    version,
    about = "GPU scheduling and accounting for cooperative data centers"
)]
pub struct Cli {
    /// Client flags given before the subcommand (`coop --addr X job list`).
    /// They are not global: daemons and offline commands (`dev`, `scheduler`,
    /// `ca`, `simulate`) do not take them, so their help does not show them.
    #[command(flatten)]
    pub client: TopClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The client flags as written before the subcommand: no defaults and no
/// environment here, so that [`ClientArgs`] (after the subcommand, with
/// `COOP_ADDR`, `COOP_TOKEN`, ... and the defaults) knows what was given.
#[derive(Args, Debug, Clone, Default)]
pub struct TopClientArgs {
    /// Scheduler addresses, comma-separated (as COOP_ADDR); also accepted
    /// after a client subcommand.
    #[arg(long)]
    pub addr: Option<String>,
    /// Bearer token (as COOP_TOKEN); also accepted after a client subcommand.
    #[arg(long)]
    pub token: Option<String>,
    /// The cluster CA's certificate (as COOP_CA); also accepted after a
    /// client subcommand.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Allow sending the credential in plain text to a remote scheduler (as
    /// COOP_PLAIN_TEXT); also accepted after a client subcommand.
    #[arg(long = "plain-text")]
    pub plain_text: bool,
    /// Output format; also accepted after the subcommand.
    #[arg(long, short, value_enum)]
    pub output: Option<Output>,
    /// How long one call may take at one scheduler (as COOP_TIMEOUT); also
    /// accepted after a client subcommand.
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

impl TopClientArgs {
    pub fn is_empty(&self) -> bool {
        self.addr.is_none()
            && self.token.is_none()
            && self.ca.is_none()
            && !self.plain_text
            && self.output.is_none()
            && self.timeout.is_none()
    }
}

/// How a client command reaches the cluster. Global within the client
/// subcommand that flattens it (`coop job --addr X list` and `coop job list
/// --addr X` both work), never on daemons or offline commands.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Scheduler addresses, comma-separated; any node of the cluster will do.
    /// An address without a scheme means https:// when --ca is given.
    #[arg(
        long,
        env = "COOP_ADDR",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    pub addr: String,
    /// Bearer token: the operator's, a member's or an auditor's.
    #[arg(long, env = "COOP_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The cluster CA's certificate (ca.pem): the schedulers are verified
    /// against it. `coop dev` prints it as COOP_CA.
    #[arg(long, env = "COOP_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Allow sending the credential in plain text (http://) to a scheduler
    /// that is not on this machine.
    #[arg(long = "plain-text", env = "COOP_PLAIN_TEXT", global = true)]
    pub plain_text: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// How long one call may take at one scheduler before the next address
    /// is tried (connecting: at most 3s of it), e.g. 20s or 1m.
    #[arg(long, env = "COOP_TIMEOUT", value_parser = parse_timeout, default_value = "20s", global = true)]
    pub timeout: Duration,
}

/// A duration with its unit (`20s`, `1m`), more than zero.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>().is_ok() {
        return Err(format!("{s:?} has no unit: write e.g. 20s or 1m"));
    }
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}): write e.g. 20s or 1m"))?;
    if d.is_zero() {
        return Err(format!("{s:?} must be more than 0"));
    }
    Ok(d)
}

impl ClientArgs {
    /// Applies the flags given before the subcommand, except where the same
    /// flag was given after it (`after` says which ids were, from clap's
    /// value sources).
    pub fn merge(&mut self, top: &TopClientArgs, after: impl Fn(&str) -> bool) {
        if let Some(a) = top.addr.as_ref().filter(|_| !after("addr")) {
            self.addr = a.clone();
        }
        if let Some(t) = top.token.as_ref().filter(|_| !after("token")) {
            self.token = Some(t.clone());
        }
        if let Some(c) = top.ca.as_ref().filter(|_| !after("ca")) {
            self.ca = Some(c.clone());
        }
        if top.plain_text {
            self.plain_text = true;
        }
        if let Some(o) = top.output.filter(|_| !after("output")) {
            self.output = o;
        }
        if let Some(t) = top.timeout.filter(|_| !after("timeout")) {
            self.timeout = t;
        }
    }

    /// The client flags from the environment and the defaults alone (for
    /// the agent's subcommands, which take only some of them as flags).
    pub fn from_env() -> Result<Self, clap::Error> {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            c: ClientArgs,
        }
        Only::try_parse_from(["coop"]).map(|o| o.c)
    }
}

/// A client subcommand group with the client flags.
#[derive(Args, Debug)]
pub struct Client<C: Subcommand> {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub cmd: C,
}

/// The agent's own connection flags (the scheduler's address is --scheduler;
/// it acts with its node credential, not a token).
#[derive(Args, Debug, Clone)]
pub struct AgentConn {
    /// The cluster CA's certificate (ca.pem): the schedulers are verified against it.
    #[arg(long, env = "COOP_CA")]
    pub ca: Option<PathBuf>,
    /// Allow talking to a scheduler that is not on this machine in plain text
    /// (http://): the node credential then crosses the network unencrypted.
    #[arg(long = "plain-text", env = "COOP_PLAIN_TEXT")]
    pub plain_text: bool,
}

/// `--output` alone, for commands that print data without calling a scheduler.
#[derive(Args, Debug, Clone)]
pub struct OutputArg {
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A whole cluster in one process: a scheduler and an agent with simulated GPUs.
    Dev(DevArgs),
    /// Scheduler daemon.
    #[command(subcommand)]
    Scheduler(SchedulerCmd),
    /// GPU agent daemon.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Submit, list, inspect, cancel and watch jobs.
    Job(Client<JobCmd>),
    /// Member organisations (operator only).
    Member(Client<MemberCmd>),
    /// GPU time, normalised units and energy per member over a window.
    ///
    /// Running jobs count up to now in GPU-hours and units; their energy is
    /// what the agents have reported so far (every --usage-interval).
    Usage(UsageArgs),
    /// Fair share now: entitlement, decayed usage and factor per member, and why each job waits.
    Fairshare(FairshareArgs),
    /// The scheduling policy (shares, weights, decay, preemption).
    Policy(Client<PolicyCmd>),
    /// Replay a workload trace through the real scheduling code, in simulated time.
    Simulate(SimulateArgs),
    /// Export and verify the hash-chained audit ledger, and its signed head.
    Audit(Client<AuditCmd>),
    /// Cluster overview.
    Cluster(Client<ClusterCmd>),
    /// Agent nodes and their GPUs; enrolling and revoking machines.
    Node(Client<NodeCmd>),
    /// Read-only accounts for auditors (operator only).
    Auditor(Client<AuditorCmd>),
    /// The operator's own credential.
    Operator(Client<OperatorCmd>),
    /// The cluster's certificate authority and the schedulers' certificates.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Subcommand, Debug)]
pub enum AuditorCmd {
    /// Add an auditor; prints its read-only token (shown once).
    Add {
        /// The auditor's name.
        name: String,
    },
    /// List auditors.
    List,
    /// Remove an auditor: its token dies at once.
    Remove {
        /// The auditor.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// The operator's token.
    #[command(subcommand)]
    Token(OperatorTokenCmd),
}

#[derive(Subcommand, Debug)]
pub enum OperatorTokenCmd {
    /// A new operator token, printed once; the old one is dead on every node
    /// once this returns.
    Rotate,
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Make a cluster CA in DIR (ca.pem, and ca.key readable by you only).
    /// Keep ca.key off the schedulers if you can: it is needed only to issue.
    Init {
        /// The directory to create the CA in (made if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a scheduler's certificate: writes cert.pem, key.pem and ca.pem
    /// into --out, which becomes that scheduler's --tls-dir.
    Issue {
        /// The CA's directory (from `coop ca init`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// A name for the certificate (e.g. the scheduler's id).
        #[arg(long)]
        name: String,
        /// Every name and address clients, agents and peers reach the
        /// scheduler at (repeatable, or comma-separated).
        #[arg(long, required = true, value_delimiter = ',')]
        host: Vec<String>,
        /// The directory to write cert.pem, key.pem and ca.pem into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Timing {
    /// A node whose agent is silent this long is marked down and its jobs requeued.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    pub node_timeout: Duration,
    /// How often agents send a heartbeat.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub heartbeat_interval: Duration,
    /// Default time between SIGTERM and SIGKILL when a job is stopped.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub kill_grace: Duration,
    /// How often agents report the usage (GPU time, energy) of running jobs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub usage_interval: Duration,
    /// Stream the audit ledger into this PostgreSQL database (postgres://...).
    #[arg(long, env = "COOP_ACCOUNTING_DB", hide_env_values = true)]
    pub accounting_db: Option<String>,
}

/// How an agent reads its GPUs and keeps its runs (`coop dev`, `coop agent run`).
#[derive(Args, Debug)]
pub struct RunArgs {
    /// How often the GPUs are read (metrics, each job's utilisation).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub telemetry_interval: Duration,
    /// Put runs with --cpus/--memory limits in cgroups under this cgroup v2
    /// directory [default: the agent's own cgroup, if delegated to it].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Do not use cgroups (limits are then not enforced).
    #[arg(long, conflicts_with = "cgroup_root")]
    pub no_cgroups: bool,
    /// Container runtime for jobs with --image: auto (podman, else docker), a
    /// program name or path, or none.
    #[arg(long, default_value = "auto")]
    pub container_runtime: String,
    /// Remove a run's directory (its output and files) this long after it ended.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    pub keep_runs: Duration,
    /// Host name or IP address at which other nodes reach this one's jobs:
    /// the rendezvous (MASTER_ADDR) of multi-node jobs whose rank 0 runs
    /// here [default: the address this agent reaches the scheduler from].
    #[arg(long, env = "COOP_AGENT_ADDRESS")]
    pub address: Option<String>,
    /// The site or rack this machine is in (e.g. rack-3): a multi-node job's
    /// processes are placed in one site where they fit.
    #[arg(long, env = "COOP_AGENT_SITE")]
    pub site: Option<String>,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// GPUs of the local agent: `auto` (the real ones through NVML where a
    /// driver is present, else 4 simulated A100s), `nvml`, or `sim:COUNTxMODEL[,..]`.
    #[arg(long, default_value = "auto")]
    pub gpus: String,
    #[command(flatten)]
    pub runs: RunArgs,
    /// Where the cluster keeps its SQLite files [default: $XDG_DATA_HOME/coop/dev].
    #[arg(long, env = "COOP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where clients call the scheduler (TLS unless --insecure).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Serve clients in plain text instead of TLS (credentials then cross
    /// the network unencrypted).
    #[arg(long)]
    pub insecure: bool,
    /// Name of the local agent's node.
    #[arg(long, default_value = "local")]
    pub node: String,
    /// Serve Prometheus metrics (scheduler and agent) at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub timing: Timing,
}

#[derive(Subcommand, Debug)]
pub enum SchedulerCmd {
    /// Run a scheduler node.
    Run(SchedulerRunArgs),
}

#[derive(Args, Debug)]
pub struct SchedulerRunArgs {
    /// This node's id among --peers.
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Where clients and agents call (TLS).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Where the other schedulers call (raft; mutual TLS). Needed with --peers.
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// The schedulers' peer addresses as ID=HOST:PORT,... (their
    /// --peer-listen; this one included). With --join: the running cluster's.
    #[arg(long)]
    pub peers: Option<String>,
    /// Start empty and wait to be added with `coop cluster add-node ID PEER-ADDR`.
    #[arg(long)]
    pub join: bool,
    /// The address clients and agents reach this node at (default: the bound
    /// --listen address; with an unspecified IP, --peers' host for this id).
    #[arg(long)]
    pub advertise: Option<String>,
    /// This scheduler's TLS: ca.pem, cert.pem and key.pem (coop ca issue).
    /// Without it a lone scheduler makes a CA of its own in DATA_DIR/tls.
    #[arg(long, env = "COOP_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve clients and agents in plain text (their credentials then cross
    /// the network unencrypted). The peers still use mutual TLS.
    #[arg(long)]
    pub insecure: bool,
    /// Snapshot the state and compact the raft log every this many entries.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,
    /// Where this scheduler keeps its raft log, snapshots and keys (SQLite).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Operator credential to create at first boot (generated and printed if absent).
    #[arg(long, env = "COOP_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub timing: Timing,
}

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the agent of this machine.
    Run(Box<AgentRunArgs>),
    /// What an agent measured and what waits for a scheduler, read from its
    /// spool (works while the agent runs, and when no scheduler answers).
    Status(AgentStatusArgs),
    /// Check each GPU (an NVRTC-compiled kernel must compute the right
    /// answer) and measure it: cuBLAS fp16/bf16 matmul, memory bandwidth.
    Probe(ProbeArgs),
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub output: OutputArg,
    /// Afterwards keep every visible GPU busy with fp16 matmuls this long
    /// (e.g. 30s): a known load for checking telemetry and accounting.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub burn: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct AgentStatusArgs {
    #[command(flatten)]
    pub output: OutputArg,
    /// The agent's data dir.
    #[arg(long)]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct AgentRunArgs {
    /// Scheduler addresses, comma-separated.
    #[arg(long, env = "COOP_ADDR")]
    pub scheduler: String,
    /// A join token from `coop node enroll`: exchanged once for this
    /// machine's node credential, kept in --data-dir.
    #[arg(long, env = "COOP_JOIN_TOKEN", hide_env_values = true)]
    pub join: Option<String>,
    /// This node's name (checked against the enrollment).
    #[arg(long)]
    pub name: Option<String>,
    /// The member that owns this machine (checked against the enrollment).
    #[arg(long)]
    pub owner: Option<String>,
    /// `nvml` for the real GPUs, or `sim:COUNTxMODEL[,..]` (e.g. sim:8xH100-80GB).
    #[arg(long, default_value = "nvml")]
    pub gpus: String,
    /// Where run output and bookkeeping are kept.
    #[arg(long)]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub runs: RunArgs,
    #[command(flatten)]
    pub conn: AgentConn,
    /// Do not probe real GPUs at start. By default each is checked and
    /// measured first (as `coop agent probe`); one that fails is not offered.
    #[arg(long)]
    pub no_probe: bool,
    /// Serve Prometheus metrics (GPU telemetry, report backlog) at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Finetune,
    Inference,
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Submit a job; prints its id.
    Submit(SubmitArgs),
    /// List jobs (a member sees its own; the operator all).
    List(ListArgs),
    /// Show one job (an id, a unique prefix of at least 4 characters, or ARRAY_TASK).
    Get(IdArg),
    /// Cancel jobs by id (several; an array's id: all its tasks) or by filter:
    /// SIGTERM, their grace period, then SIGKILL.
    Cancel(CancelArgs),
    /// Keep pending jobs from being placed until released.
    Hold(IdsArg),
    /// Let held jobs be placed again.
    Release(IdsArg),
    /// Print a job's output.
    Logs(LogsArgs),
    /// Follow a job's state changes until it ends.
    Watch(IdArg),
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// finetune: a batch job, runs to completion; inference: a service, runs until cancelled.
    #[arg(long, value_enum, default_value_t = Kind::Finetune)]
    pub kind: Kind,
    /// GPUs, all at once: on one node where one has that many, else over
    /// the fewest nodes with equal parts (one process per node).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub gpus: i64,
    /// Run over exactly this many nodes, one process each, the GPUs split
    /// evenly (torchrun's --nnodes).
    #[arg(long)]
    pub nodes: Option<u32>,
    /// GPUs on each node of a multi-node job (--gpus is then the total).
    #[arg(long)]
    pub gpus_per_node: Option<u32>,
    /// Only GPUs of this model (e.g. A100-80GB).
    #[arg(long)]
    pub gpu_model: Option<String>,
    /// Only GPUs with at least this much memory, in GB.
    #[arg(long, default_value_t = 0)]
    pub min_memory_gb: u64,
    /// The job may be preempted (finetune).
    #[arg(long)]
    pub preemptible: bool,
    /// Time between SIGTERM and SIGKILL when the job is stopped (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace: Option<Duration>,
    /// Submit for this member (operator only).
    #[arg(long)]
    pub member: Option<String>,
    /// Order among this member's own jobs: higher first (-1000 to 1000).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Stop the run and fail the job after this long: 4h, 90m, 1:30:00 or
    /// 2-00:00:00 (Slurm's D-HH:MM:SS); lets short jobs backfill.
    #[arg(long, value_parser = parse_time_limit)]
    pub time_limit: Option<Duration>,
    /// A name for the job (shown by job list; filter with job list --name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the run starts, relative to the run's own directory (made for
    /// it; no absolute path, no '..').
    #[arg(long, visible_alias = "chdir")]
    pub workdir: Option<String>,
    /// Wait for other jobs of yours: afterok:ID[:ID..] (cancelled if one
    /// fails) or afterany:ID[:ID..]; several separated by ','.
    #[arg(long, short = 'd')]
    pub dependency: Option<String>,
    /// A job array: one job per task, e.g. 0-9, 1,3,5 or 0-99%4 (at most 4
    /// at once). Each task has COOP_ARRAY_JOB_ID and COOP_ARRAY_TASK_ID.
    #[arg(long)]
    pub array: Option<String>,
    /// Submit held: not placed until coop job release.
    #[arg(long)]
    pub hold: bool,
    /// CPU limit of the run's cgroup, in CPUs (e.g. 8 or 0.5).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<u64>,
    /// Memory limit of the run's cgroup (e.g. 64G, 512M; a bare number is MiB).
    #[arg(long, value_parser = parse_memory_mb)]
    pub memory: Option<u64>,
    /// Run the command in a container of this image (docker or podman on the
    /// agent), with only the job's GPUs passed in.
    #[arg(long)]
    pub image: Option<String>,
    /// An environment variable of the run, KEY=VALUE (repeatable). The run
    /// gets only these besides the agent's allowlist (PATH, HOME, LANG, ...).
    #[arg(long, value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Environment variables from a file of KEY=VALUE lines (# comments);
    /// --env wins over it.
    #[arg(long)]
    pub env_file: Vec<std::path::PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `KEY=VALUE` for --env: the key must be a variable name.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let ok = k
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(format!("{k:?} is not a variable name"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateArg {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Lost,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only jobs in these states (repeatable).
    #[arg(long, value_enum)]
    pub state: Vec<StateArg>,
    /// Only this member's jobs.
    #[arg(long)]
    pub member: Option<String>,
    /// At most this many jobs (all by default, fetched page by page).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Go on from where a listing with --limit stopped.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Only jobs with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only jobs whose current (or last) run is on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only the tasks of this job array.
    #[arg(long)]
    pub array: Option<String>,
    /// Only jobs not ended before this: how long ago (24h, 7d) or RFC 3339.
    #[arg(long, visible_alias = "from", value_parser = parse_when)]
    pub since: Option<std::time::SystemTime>,
    /// Only jobs submitted by this: how long ago (1h) or RFC 3339.
    #[arg(long, visible_alias = "to", value_parser = parse_when)]
    pub until: Option<std::time::SystemTime>,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// The job's id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct IdsArg {
    /// Job ids, unique prefixes, ARRAY_TASK, or array ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// Job ids, unique prefixes, ARRAY_TASK, or array ids.
    pub ids: Vec<String>,
    /// Every job of this member that matches the other filters.
    #[arg(long)]
    pub member: Option<String>,
    /// Only jobs in these states (pending, running).
    #[arg(long, value_enum)]
    pub state: Vec<StateArg>,
    /// Only jobs with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only jobs running on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// With no id and no filter: every job you may cancel.
    #[arg(long)]
    pub all: bool,
}

/// A time limit: "4h", "90m", "1:30:00" (H:MM:SS), "30:00" (MM:SS),
/// "2-00:00:00", "2-12" (days-hours). A bare number has no unit and is refused.
pub fn parse_time_limit(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{t:?} has no unit: write e.g. {t}m, {t}h, 1:30:00 or 2-00:00:00"
        ));
    }
    let num = |x: &str| -> Result<u64, String> {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) || x.len() > 9 {
            return Err(format!(
                "{s:?} is not a time limit (4h, 1:30:00, 2-00:00:00)"
            ));
        }
        Ok(x.parse().expect("digits"))
    };
    let d = if t.contains(':') || t.contains('-') {
        let (days, rest) = match t.split_once('-') {
            Some((d, r)) => (num(d)?, r),
            None => (0, t),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let hms: u64 = match (t.contains('-'), parts.as_slice()) {
            (true, [h]) => num(h)? * 3600,
            (true, [h, m]) => num(h)? * 3600 + num(m)? * 60,
            (false, [m, sec]) => num(m)? * 60 + num(sec)?,
            (_, [h, m, sec]) => num(h)? * 3600 + num(m)? * 60 + num(sec)?,
            _ => {
                return Err(format!(
                    "{s:?} is not a time limit (4h, 1:30:00, 2-00:00:00)"
                ));
            }
        };
        Duration::from_secs(days * 86_400 + hms)
    } else {
        humantime::parse_duration(t).map_err(|e| format!("{s:?}: {e}"))?
    };
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// A point in time: RFC 3339, or how long ago ("24h", "7d").
pub fn parse_when(s: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim()) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s.trim()).map_err(|_| {
        format!("{s:?} is neither RFC 3339 (2026-11-01T00:00:00Z) nor a duration with a unit (24h)")
    })?;
    std::time::SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("{s:?} is too long ago"))
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The job's id.
    pub id: String,
    /// Keep printing new output until the run ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Which attempt (default: the latest).
    #[arg(long, default_value_t = 0)]
    pub attempt: u32,
    /// Of a multi-node job, the output of this node rank's process.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
}

#[derive(Subcommand, Debug)]
pub enum MemberCmd {
    /// Add a member; prints its token (shown once). While the policy needs
    /// approvals, this proposes the member: its token works once they come.
    Add {
        /// The member's name (letters, digits, - and _).
        name: String,
        /// The token stops working after this long (e.g. 90d) [default: never].
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List members.
    List,
    /// A member's token.
    #[command(subcommand)]
    Token(MemberTokenCmd),
    /// Refuse a member's token and hold its pending jobs (running ones go on).
    Suspend {
        /// The member.
        name: String,
    },
    /// Undo `suspend`.
    Resume {
        /// The member.
        name: String,
    },
    /// Remove a member: its pending jobs are cancelled, running ones stopped,
    /// its machines revoked and its token dies; its ledger history stays.
    Remove {
        /// The member.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MemberTokenCmd {
    /// A new token for the member (operator, or the member itself), printed
    /// once; the old one is dead once this returns.
    Rotate {
        /// The member.
        name: String,
        /// The new token stops working after this long [default: never].
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
}

// Not `args_conflicts_with_subcommands`: that would refuse the client flags
// before `statement` (`coop usage --addr X statement`); `commands::usage`
// refuses the window's flags with `statement` instead.
#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub statement: Option<UsageCmd>,
    /// Only this member (a member always sees only itself).
    #[arg(long)]
    pub member: Option<String>,
    /// The window's start: how long ago (e.g. 24h, 7d).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "from")]
    pub since: Option<Duration>,
    /// The window's start, RFC 3339 (e.g. 2026-11-01T00:00:00Z).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub from: Option<std::time::SystemTime>,
    /// The window's end, RFC 3339 [default: now].
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub to: Option<std::time::SystemTime>,
}

#[derive(Subcommand, Debug)]
pub enum UsageCmd {
    /// A member's statement for a period: GPU-hours by model, units, kWh, jobs,
    /// preemptions, contributed capacity and the balance.
    Statement(StatementArgs),
}

#[derive(Args, Debug)]
pub struct StatementArgs {
    /// The member (a member may leave it out: itself).
    #[arg(long)]
    pub member: Option<String>,
    /// A calendar month in UTC, YYYY-MM (e.g. 2026-11).
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub period: Option<String>,
    /// The period's start, RFC 3339.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, requires = "to")]
    pub from: Option<std::time::SystemTime>,
    /// The period's end (exclusive), RFC 3339.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, requires = "from")]
    pub to: Option<std::time::SystemTime>,
    /// Write CSV (one row per GPU model, then a total row) instead of a table.
    #[arg(long)]
    pub csv: bool,
}

#[derive(Args, Debug)]
pub struct FairshareArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only this member (a member always sees only itself).
    #[arg(long)]
    pub member: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// The policy in force and the history of its changes.
    Show,
    /// Change settings (operator only), all together: KEY=VALUE ...
    Set {
        /// ordering=fifo|fairshare|drf, share.MEMBER=N, default_share=N,
        /// capacity_blend=PCT, weight.MODEL=X.XXX, half_life=7d, preemption=on|off,
        /// preempt_inference=on|off, min_runtime=5m, preempt_grace=30s
        #[arg(required = true)]
        settings: Vec<String>,
        /// Why the policy changes; kept with the change.
        #[arg(long, required = true)]
        reason: String,
    },
    /// Propose a change for members to approve (when the policy needs approvals).
    Propose {
        /// KEY=VALUE settings, as for `set`.
        #[arg(required = true)]
        settings: Vec<String>,
        /// Why; kept with the proposal and the change.
        #[arg(long, required = true)]
        reason: String,
    },
    /// Approve a proposal, as the member whose token is used.
    Approve {
        /// The proposal's number (`coop policy proposals`).
        id: u64,
    },
    /// Proposals: open, enacted and expired, with their approvals.
    Proposals,
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Write the ledger (or a period of it) to stdout (operator only).
    Export(AuditExportArgs),
    /// The chain's head (its last entry), signed by the scheduler that
    /// answers; `-o json > head.json` saves it for `verify --since`.
    /// The operator, auditors and members.
    Head,
    /// Check the chain of the live cluster, or of an exported file; names the
    /// first entry that does not match.
    Verify {
        /// An export (JSON lines or CSV) instead of the live cluster.
        #[arg(long, conflicts_with = "db")]
        file: Option<PathBuf>,
        /// The accounting database (postgres://...) instead of the live cluster.
        #[arg(long)]
        db: Option<String>,
        /// A head saved earlier (`coop audit head -o json`): check its
        /// signature, and that the chain still holds its entry with its hash
        /// (so extends the history it was signed over).
        #[arg(long, value_name = "HEAD_FILE")]
        since: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditFormat {
    Jsonl,
    Csv,
}

#[derive(Args, Debug)]
pub struct AuditExportArgs {
    /// JSON lines (one entry a line) or CSV with a header row.
    #[arg(long, value_enum, default_value_t = AuditFormat::Jsonl)]
    pub format: AuditFormat,
    /// The period's start, RFC 3339.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub from: Option<std::time::SystemTime>,
    /// The period's end, RFC 3339.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub to: Option<std::time::SystemTime>,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Trace CSV: tenant,submit_s,gpus,duration_s[,...] with a header row.
    #[arg(long)]
    pub trace: PathBuf,
    /// The scheduling order: fifo, fair share, or dominant resource fairness.
    #[arg(long, value_enum, default_value_t = PolicyArg::Fairshare)]
    pub policy: PolicyArg,
    /// The simulated cluster: COUNT:GPUSxMODEL[,...], e.g. 32:8xV100-32GB,16:4xT4-16GB.
    #[arg(long, default_value = "32:8xV100-32GB")]
    pub nodes: String,
    /// Where summary.json, summary.csv, members.csv, jobs.csv and share.svg are written.
    #[arg(long)]
    pub out: PathBuf,
    /// Preemption (trace jobs are preemptible finetune jobs); auto: off for fifo, on otherwise.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub preemption: String,
    /// Usage half-life, with a unit (e.g. 7d, 12h).
    #[arg(long, default_value = "7d", value_parser = duration_s)]
    pub half_life: u64,
    /// Minimum run time before preemption, with a unit (e.g. 5m).
    #[arg(long, default_value = "5m", value_parser = duration_s)]
    pub min_runtime: u64,
    /// Only the first N jobs of the trace.
    #[arg(long)]
    pub limit: Option<usize>,
    // `--output json`: summary.json on stdout instead of the one-line summary.
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyArg {
    Fifo,
    Fairshare,
    Drf,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Schedulers, nodes, GPUs and queue at a glance.
    Status,
    /// Add a scheduler node (started with --join): a learner until it has
    /// caught up, then a voter.
    AddNode {
        /// Its raft id, unique in the cluster.
        id: u64,
        /// Where the other schedulers reach it (host:port).
        address: String,
    },
    /// Remove a scheduler node from the voters.
    RemoveNode {
        /// Its raft id.
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Agent nodes and their GPUs.
    List,
    /// Print a one-time join token for a machine's agent (`coop agent run
    /// --join TOKEN`); the operator, or the member that owns the machine.
    Enroll {
        /// The machine's node name (its agent's --name).
        name: String,
        /// The member that owns the machine.
        #[arg(long)]
        owner: String,
        /// The join token expires after this long (at most 7d).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: Duration,
    },
    /// Make a node's credential useless at once; its runs are handled as if
    /// the node was lost.
    Revoke {
        /// The node.
        name: String,
    },
    /// Place nothing new on a node (its runs finish); the operator, or the
    /// member that owns it.
    Drain {
        /// The node.
        name: String,
        /// Why (shown by node list).
        #[arg(long)]
        reason: Option<String>,
        /// Stop its runs now (each with its grace) and requeue them.
        #[arg(long)]
        now: bool,
    },
    /// Let a drained node take jobs again.
    Resume {
        /// The node.
        name: String,
    },
}

/// Seconds from a duration with a unit, as the policy writes them (`90s`,
/// `15m`, `12h`, `7d`); a bare number other than 0 is refused.
pub fn duration_s(s: &str) -> Result<u64, String> {
    coop_core::policy::parse_duration_s(s.trim())
}

/// CPUs as thousandths: "8" -> 8000, "0.5" -> 500.
pub fn parse_cpus(s: &str) -> Result<u64, String> {
    let cpus: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of CPUs"))?;
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(format!("{s:?} must be more than 0"));
    }
    Ok((cpus * 1000.0).round() as u64)
}

/// Memory in MiB from "64G", "512M", "1.5GiB", "2T" or a bare number of MiB
/// (units are binary, as in Slurm's --mem).
pub fn parse_memory_mb(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not an amount of memory (e.g. 64G)"))?;
    let per_mib = match unit.trim().to_ascii_uppercase().as_str() {
        "K" | "KB" | "KIB" => 1.0 / 1024.0,
        "" | "M" | "MB" | "MIB" => 1.0,
        "G" | "GB" | "GIB" => 1024.0,
        "T" | "TB" | "TIB" => 1024.0 * 1024.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (K, M, G or T)")),
    };
    let mb = (n * per_mib).round();
    if !mb.is_finite() || mb < 1.0 {
        return Err(format!("{s:?} must be at least 1M"));
    }
    Ok(mb as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_and_memory_parse_as_slurm_users_write_them() {
        assert_eq!(parse_cpus("8"), Ok(8000));
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("many").is_err());
        assert_eq!(parse_memory_mb("64G"), Ok(65536));
        assert_eq!(parse_memory_mb("1.5GiB"), Ok(1536));
        assert_eq!(parse_memory_mb("512"), Ok(512));
        assert_eq!(parse_memory_mb("512m"), Ok(512));
        assert_eq!(parse_memory_mb("2T"), Ok(2 * 1024 * 1024));
        assert!(parse_memory_mb("12X").is_err());
        assert!(parse_memory_mb("0").is_err());
        assert!(parse_memory_mb("G").is_err());
    }

    #[test]
    fn time_limits_parse_as_slurm_users_write_them_and_need_a_unit() {
        let s = |x: &str| parse_time_limit(x).map(|d| d.as_secs());
        assert_eq!(s("1:30:00"), Ok(5400));
        assert_eq!(s("2-00:00:00"), Ok(2 * 86_400));
        assert_eq!(s("2-12"), Ok(2 * 86_400 + 12 * 3600));
        assert_eq!(s("1-02:30"), Ok(86_400 + 2 * 3600 + 30 * 60));
        assert_eq!(s("30:00"), Ok(1800));
        assert_eq!(s("90m"), Ok(5400));
        assert_eq!(s("4h"), Ok(4 * 3600));
        let bare = s("90").unwrap_err();
        assert!(bare.contains("no unit"), "{bare}");
        for bad in ["", "0:00:00", "1:2:3:4", "-1", "a:b", "1-", "4x"] {
            assert!(s(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod help_tests {
    use super::*;
    use clap::CommandFactory;

    fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in c.get_arguments() {
            let builtin = matches!(a.get_id().as_str(), "help" | "version");
            if !a.is_hide_set() && !builtin && a.get_help().is_none() {
                missing.push(format!("{path} {}", a.get_id()));
            }
        }
        for s in c.get_subcommands() {
            if s.get_name() != "help" {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
    }

    #[test]
    fn every_flag_and_argument_says_what_it_is() {
        let mut cmd = Cli::command();
        cmd.build();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "coop", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn daemons_and_offline_commands_show_no_client_flags() {
        let mut cmd = Cli::command();
        cmd.build();
        let client = ["addr", "token", "output", "plain-text"];
        for path in [
            &["dev"][..],
            &["scheduler", "run"],
            &["agent", "run"],
            &["ca", "init"],
            &["ca", "issue"],
            &["simulate"],
        ] {
            let mut c = &cmd;
            for p in path {
                c = c.find_subcommand(p).unwrap();
            }
            let help = c.clone().render_long_help().to_string();
            for flag in client {
                if *path == ["simulate"] && flag == "output" {
                    continue; // simulate prints its summary, as JSON with --output json
                }
                assert!(
                    !help.contains(&format!("--{flag} ")),
                    "coop {} --help shows --{flag}:\n{help}",
                    path.join(" ")
                );
            }
        }
        // Client commands take them after the subcommand.
        let job = cmd.find_subcommand("job").unwrap();
        let list = job.find_subcommand("list").unwrap();
        let help = list.clone().render_long_help().to_string();
        for flag in client {
            assert!(help.contains(&format!("--{flag}")), "{help}");
        }
    }
}
