//! coop-core: what every scheduler replica computes the same way from the
//! same committed commands. The state machine (`state`), the order jobs run in
//! (`placement`, `fairshare`, `decay`, `habits`), the rules members vote on (`policy`,
//! `accounts`), what a job costs (`usage`, `plausible`) and the audit chain
//! (`ledger`); `codec` writes and strictly reads the log's entries and
//! snapshots; `simulate` replays a workload trace through all of it.
//!
//! Nothing here reads a clock, a file, the network or a random source: the
//! shell (`coop-scheduler`) brings time and ids in with each command, so a
//! replay of the log gives the same state, byte for byte, on every replica.

pub mod codec;
pub mod commands;
pub mod decay;
pub mod fairshare;
pub mod habits;
pub mod ledger;
pub mod model;
pub mod placement;
pub mod policy;
pub mod simulate;
pub mod state;
pub mod usage;

// Parts of the state machine that callers name on their own.
pub use state::{accounts, plausible};
