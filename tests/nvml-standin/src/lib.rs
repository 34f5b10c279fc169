//! A test stand-in for NVML's C ABI (`libnvidia-ml.so.1`), driven by a
//! scenario file. It is never shipped: tests point nvml-wrapper's
//! `Nvml::builder().lib_path(..)` at the `libnvidia_ml.so` this crate builds,
//! so the agent's real NVML code runs against GPUs that a JSON file
//! describes. NVIDIA's own DCGM ships an NVML injection library for the same
//! purpose.
//!
//! The library reads the file named by [`scenario::ENV_VAR`] at each
//! `nvmlInit_v2`, and again whenever its size, modification time or inode
//! changes (checked with one `stat` per call), so a test can rewrite it
//! (atomically, with [`scenario::write`]) while the agent runs. Unset or
//! unreadable at init: `NVML_ERROR_DRIVER_NOT_LOADED`; malformed:
//! `NVML_ERROR_UNKNOWN` and one line on stderr naming the problem.
//!
//! [`scenario`] holds the file's serde types and the pure functions the
//! library answers with ([`scenario::phase_at`], [`scenario::energy_mj`]), so
//! tests compute their expectations with the same formulas.

mod abi;
pub mod scenario;
mod state;
