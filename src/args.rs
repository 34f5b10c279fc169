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
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Scheduler addresses, comma-separated; any node of the cluster will do.
    #[arg(
        long,
        env = "COOP_ADDR",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub addr: String,
    /// Bearer token: the operator's or a member's.
    #[arg(long, env = "COOP_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
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
    #[command(subcommand)]
    Job(JobCmd),
    /// Member organisations (operator only).
    #[command(subcommand)]
    Member(MemberCmd),
    /// GPU time used per member.
    Usage(UsageArgs),
    /// Cluster overview.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Agent nodes and their GPUs.
    #[command(subcommand)]
    Node(NodeCmd),
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
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// GPUs of the local agent.
    #[arg(long, default_value = "sim:4xA100-80GB")]
    pub gpus: String,
    /// Where the cluster keeps its SQLite files [default: $XDG_DATA_HOME/coop/dev].
    #[arg(long, env = "COOP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Name of the local agent's node.
    #[arg(long, default_value = "local")]
    pub node: String,
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
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// All scheduler nodes as ID=ADDR,...; one node until replication lands.
    #[arg(long)]
    pub peers: Option<String>,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Operator credential to create at first boot (generated and printed if absent).
    #[arg(long, env = "COOP_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    #[command(flatten)]
    pub timing: Timing,
}

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the agent of this machine.
    Run(AgentRunArgs),
}

#[derive(Args, Debug)]
pub struct AgentRunArgs {
    /// Scheduler addresses, comma-separated.
    #[arg(long, env = "COOP_ADDR")]
    pub scheduler: String,
    /// This node's name.
    #[arg(long)]
    pub name: String,
    /// The member that owns this machine.
    #[arg(long)]
    pub owner: String,
    /// `nvml` for the real GPUs, or `sim:COUNTxMODEL[,..]` (e.g. sim:8xH100-80GB).
    #[arg(long, default_value = "nvml")]
    pub gpus: String,
    /// Where run output and bookkeeping are kept.
    #[arg(long)]
    pub data_dir: PathBuf,
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
    /// Show one job.
    Get(IdArg),
    /// Cancel a job: SIGTERM, its grace period, then SIGKILL.
    Cancel(IdArg),
    /// Print a job's output.
    Logs(LogsArgs),
    /// Follow a job's state changes until it ends.
    Watch(IdArg),
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[arg(long, value_enum, default_value_t = Kind::Finetune)]
    pub kind: Kind,
    /// GPUs, all at once on one node.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub gpus: i64,
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
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
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
}

#[derive(Args, Debug)]
pub struct IdArg {
    pub id: String,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub id: String,
    /// Keep printing new output until the run ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Which attempt (default: the latest).
    #[arg(long, default_value_t = 0)]
    pub attempt: u32,
}

#[derive(Subcommand, Debug)]
pub enum MemberCmd {
    /// Add a member; prints its token (shown once).
    Add { name: String },
    /// List members.
    List,
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Only this member (a member always sees only itself).
    #[arg(long)]
    pub member: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Schedulers, nodes, GPUs and queue at a glance.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Agent nodes and their GPUs.
    List,
}
