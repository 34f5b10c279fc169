//! GPU backends: simulated GPUs from a spec (`sim`), or the real ones through
//! NVML (`nvml`). Both give the same inventory and the same readings; NVML is
//! loaded at run time, so the agent builds and runs without a driver and
//! `--gpus nvml` fails with a clear error there.

mod nvml;
mod sim;

use anyhow::{anyhow, bail};

pub use crate::isolation::Devices;
pub use sim::sim_power_w;

/// One reading of one GPU. A field is `None` where the GPU cannot say
/// (NVML's NotSupported: a MIG slice has no power sensor of its own, older
/// boards have no energy counter).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub uuid: String,
    /// Percent of the last sample period a kernel was running.
    pub utilization_pct: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub power_mw: Option<u64>,
    /// Energy counter in mJ: NVML's since the driver loaded, or the power
    /// integrated over the agent's readings where the board has none.
    pub energy_mj: Option<u64>,
    pub temperature_c: Option<u32>,
    /// Uncorrected ECC errors since the driver loaded.
    pub ecc_uncorrected: Option<u64>,
    /// Why the clocks are held down, when for a reason that hurts jobs
    /// (thermal, power brake, hardware slowdown).
    pub throttle: Vec<&'static str>,
    /// XID errors the driver reported for this GPU since the last reading.
    pub xids: Vec<u64>,
    /// False when the GPU cannot be read, has uncorrected ECC errors, is
    /// throttled by hardware, or had an XID error that means its hardware
    /// is in trouble.
    pub healthy: bool,
    /// The GPU is gone (NVML's GPU_IS_LOST, or no longer found): its runs
    /// cannot go on, and the node stops offering it.
    pub lost: bool,
}

/// Readings of a machine's GPUs.
pub trait Telemetry: Send {
    /// Reads every GPU, as of `now_ms`.
    fn read(&mut self, now_ms: i64) -> Vec<Reading>;
    /// The energy counters of `uuids` as of `now_ms`, in that order.
    fn energy_mj(&mut self, uuids: &[String], now_ms: i64) -> Vec<Option<u64>>;
    /// A run started or ended on `uuid` (the simulation draws power by it;
    /// real GPUs need no telling).
    fn set_busy(&mut self, _uuid: &str, _busy: bool, _now_ms: i64) {}
    /// Counters are comparable only within one epoch: NVML's within a boot,
    /// the simulation's within one agent process.
    fn epoch(&self) -> &str;
    /// Energy a busy GPU draws in `ms` where no counter can tell (the
    /// counter restarted, or the device has none): the simulation knows, a
    /// real GPU's is unknown (0).
    fn busy_energy_mj(&self, _uuid: &str, _ms: u64) -> u64 {
        0
    }
}

/// A machine's GPUs: what they are and how to read them.
pub struct Gpus {
    pub info: Vec<GpuInfo>,
    /// NVIDIA driver and CUDA versions (none for simulated GPUs).
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
    /// Device files a container needs for each GPU (by UUID), and those
    /// every GPU container needs (`/dev/nvidiactl`, ...); none when simulated.
    pub devices: Devices,
    pub telemetry: Box<dyn Telemetry>,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus")
            .field("info", &self.info)
            .field("driver_version", &self.driver_version)
            .field("cuda_version", &self.cuda_version)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub memory_mb: u64,
    /// Throughput the probe measured (`coop agent probe`), if it ran.
    pub measured: Option<Capacity>,
    /// The board's enforced power limit, W (0: the device cannot say, as a
    /// MIG slice cannot).
    pub power_limit_w: u32,
}

/// Where the agent's GPUs come from (`--gpus nvml` or `--gpus sim:SPEC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    Nvml,
    /// NVML where a driver is present, else the given simulated GPUs
    /// (`coop dev`'s default).
    Auto(Vec<(u32, String)>),
    /// `(count, model)` groups, e.g. `sim:4xA100-80GB,2xT4-16GB`.
    Sim(Vec<(u32, String)>),
}

impl std::str::FromStr for GpuSource {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        if s == "nvml" {
            return Ok(GpuSource::Nvml);
        }
        if s == "auto" {
            return Ok(GpuSource::Auto(vec![(4, "A100-80GB".into())]));
        }
        let Some(spec) = s.strip_prefix("sim:") else {
            bail!("gpus: expected 'nvml', 'auto' or 'sim:COUNTxMODEL[,COUNTxMODEL..]', got {s:?}");
        };
        let mut groups = Vec::new();
        for part in spec.split(',') {
            let (count, model) = part
                .split_once('x')
                .ok_or_else(|| anyhow!("gpus: {part:?} is not COUNTxMODEL (e.g. 4xA100-80GB)"))?;
            let count: u32 = count.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                anyhow!("gpus: count {count:?} in {part:?} must be a positive number")
            })?;
            model_memory_mb(model)?;
            groups.push((count, model.to_string()));
        }
        Ok(GpuSource::Sim(groups))
    }
}

/// Memory read from a model name such as `A100-80GB` (in MiB).
pub fn model_memory_mb(model: &str) -> anyhow::Result<u64> {
    let gb = model
        .rsplit_once('-')
        .and_then(|(_, tail)| tail.strip_suffix("GB"))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            anyhow!("gpus: cannot read the memory from model {model:?} (expected e.g. A100-80GB)")
        })?;
    Ok(gb * 1024)
}

impl GpuSource {
    /// Finds the GPUs. Simulated UUIDs are stable per node name and index.
    pub fn open(&self, node: &str) -> anyhow::Result<Gpus> {
        match self {
            GpuSource::Sim(groups) => sim::open(node, groups),
            GpuSource::Nvml => nvml::open(),
            GpuSource::Auto(groups) => match nvml::open() {
                Ok(gpus) => Ok(gpus),
                Err(e) => {
                    tracing::info!("no NVIDIA GPUs here ({e:#}); simulating them");
                    sim::open(node, groups)
                }
            },
        }
    }

    /// The GPUs' inventory only.
    pub fn discover(&self, node: &str) -> anyhow::Result<Vec<GpuInfo>> {
        Ok(self.open(node)?.info)
    }

    pub fn is_simulated(&self) -> bool {
        matches!(self, GpuSource::Sim(_))
    }
}

/// What the scheduler is told of a probed GPU (see `probe`), in whole units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capacity {
    pub fp16_gflops: u64,
    pub bf16_gflops: u64,
    pub memory_mb_per_s: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_spec_parses_and_discovers_stable_uuids() {
        let src: GpuSource = "sim:2xA100-80GB,1xT4-16GB".parse().unwrap();
        let a = src.discover("n1").unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].memory_mb, 80 * 1024);
        assert_eq!(a[2].model, "T4-16GB");
        assert_eq!(a, src.discover("n1").unwrap());
        let b = src.discover("n2").unwrap();
        assert_ne!(a[0].uuid, b[0].uuid);
        assert!(a[0].uuid.starts_with("GPU-"));
    }

    #[test]
    fn bad_specs_name_the_field() {
        for bad in [
            "sim:0xA100-80GB",
            "sim:4A100",
            "sim:2xA100",
            "cuda",
            "sim:-1xT4-16GB",
        ] {
            let err = bad.parse::<GpuSource>().unwrap_err().to_string();
            assert!(err.starts_with("gpus:"), "{bad}: {err}");
        }
    }

    #[test]
    fn nvml_without_a_driver_is_an_error_not_a_panic() {
        // On a machine with a driver this discovers real GPUs instead.
        match GpuSource::Nvml.discover("n") {
            Ok(gpus) => assert!(!gpus.is_empty()),
            Err(e) => assert!(e.to_string().starts_with("gpus:"), "{e}"),
        }
    }
}
