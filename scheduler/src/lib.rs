//! coop-scheduler: the shell around the pure core (`coop-core`): raft
//! replication (`consensus`, `replica`), agent liveness (`liveness`), the
//! gRPC services (`api`), the ledger's sinks and signed heads (`sink`,
//! `head`, `signer`), and the process (`server`).

pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod consensus;
pub mod datadir;
pub mod head;
pub mod history;
pub mod history_copy;
pub mod instruments;
pub mod liveness;
pub mod metrics;
pub mod metrics_access;
pub mod peers;
pub mod replica;
pub mod server;
pub mod signer;
pub mod sink;
pub mod status;
pub mod tls;

pub use config::Config;
pub use server::Scheduler;
