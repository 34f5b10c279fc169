//! What a scheduler process is started with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub id: u64,
    pub listen: SocketAddr,
    /// How clients reach this scheduler; filled from the bound address when empty.
    pub advertise: String,
    pub data_dir: PathBuf,
    /// The operator credential to create at first boot; generated when absent.
    pub operator_token: Option<String>,
    /// A member created at first boot (name, token hash) that the operator's own
    /// submissions are billed to (`coop dev` uses "default").
    pub default_member: Option<(String, String)>,
    /// A node with no heartbeat for this long is marked down and its jobs requeued.
    pub node_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// SIGTERM-to-SIGKILL grace of jobs that do not set their own.
    pub kill_grace: Duration,
    /// How often agents report the usage of running jobs.
    pub usage_interval: Duration,
    /// PostgreSQL URL the ledger is streamed to (`sink`), if any.
    pub accounting_db: Option<String>,
    /// The scheduler nodes of a new cluster by raft id, this one included.
    /// Empty: a cluster of this node alone.
    pub peers: BTreeMap<u64, String>,
    /// Start with no configuration and wait to be added (`coop cluster add-node`).
    /// `peers` then names the running cluster's nodes (their peer addresses).
    pub join: bool,
    /// TLS of both listeners and of calls to peers.
    pub tls: Option<crate::tls::SchedulerTls>,
    /// Serve clients in plain text (`--insecure`) even where `tls` is set
    /// (it then serves the peers alone).
    pub insecure: bool,
    /// Where the raft service listens (mutual TLS); `None`: no peers.
    pub peer_listen: Option<SocketAddr>,
    /// One raft tick; elections time out after 10 to 20 of them.
    pub raft_tick: Duration,
    /// Snapshot the state (and compact the log) every this many entries.
    pub snapshot_every: u64,
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            id: 1,
            listen,
            advertise: String::new(),
            data_dir,
            operator_token: None,
            default_member: None,
            node_timeout: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(1),
            kill_grace: Duration::from_secs(10),
            usage_interval: Duration::from_secs(30),
            accounting_db: None,
            peers: BTreeMap::new(),
            join: false,
            tls: None,
            insecure: false,
            peer_listen: None,
            raft_tick: Duration::from_millis(50),
            snapshot_every: 10_000,
        }
    }
}
