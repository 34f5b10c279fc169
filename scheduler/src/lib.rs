//! coop-scheduler: the replicated state machine (`state`), placement policy
//! (`placement`) and usage figures (`usage`), which are pure; and the shell
//! around them: raft replication (`consensus`, `replica`), agent liveness
//! (`liveness`), the gRPC services (`api`) and the process (`server`).

pub mod accounts;
pub mod api;
pub mod auth;
pub mod consensus;
pub mod datadir;
pub mod fairshare;
pub mod habits;
pub mod head;
pub mod ledger;
pub mod liveness;
pub mod metrics;
pub mod metrics_access;
pub mod placement;
pub mod plausible;
pub mod policy;
pub mod replica;
pub mod server;
pub mod signer;
pub mod simulate;
pub mod sink;
pub mod state;
pub mod tls;
pub mod usage;

pub use server::{Config, Scheduler};
