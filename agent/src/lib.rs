//! coop-agent: runs jobs on the GPUs of a member's machine and reports to the
//! schedulers. `gpu` finds the GPUs (NVML or simulated), `runner` runs the
//! processes, `spool` keeps reports until the schedulers acknowledge them,
//! `agent` talks to the schedulers.

pub mod agent;
pub mod enroll;
pub mod gpu;
pub mod isolation;
pub mod metrics;
pub mod probe;
pub mod runner;
pub mod spool;

pub use agent::{Agent, AgentConfig};
pub use gpu::{GpuInfo, GpuSource, Gpus};
