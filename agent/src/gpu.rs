//! GPU backends: simulated GPUs from a spec, or the real ones through NVML.
//! NVML is loaded at run time, so the agent builds and runs without a driver
//! and `--gpus nvml` fails with a clear error there.

use anyhow::{Context, anyhow, bail};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub memory_mb: u64,
}

/// Where the agent's GPUs come from (`--gpus nvml` or `--gpus sim:SPEC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    Nvml,
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
        let Some(spec) = s.strip_prefix("sim:") else {
            bail!("gpus: expected 'nvml' or 'sim:COUNTxMODEL[,COUNTxMODEL..]', got {s:?}");
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

/// Board power a simulated GPU of `model` draws while busy, in watts: the
/// vendor's typical figure for the family, 250 W when unknown.
pub fn sim_power_w(model: &str) -> u64 {
    let m = model.to_ascii_uppercase();
    [
        ("H200", 600),
        ("H100", 500),
        ("A100", 300),
        ("L40", 300),
        ("A10", 150),
        ("L4", 72),
        ("T4", 70),
        ("V100", 250),
    ]
    .iter()
    .find(|(p, _)| m.starts_with(p))
    .map_or(250, |(_, w)| *w)
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
    /// The GPUs of this machine. Simulated UUIDs are stable per node name and index.
    pub fn discover(&self, node: &str) -> anyhow::Result<Vec<GpuInfo>> {
        match self {
            GpuSource::Sim(groups) => {
                let mut out = Vec::new();
                for (count, model) in groups {
                    let memory_mb = model_memory_mb(model)?;
                    for _ in 0..*count {
                        let index = out.len() as u32;
                        let id = uuid::Uuid::new_v5(
                            &uuid::Uuid::NAMESPACE_OID,
                            format!("coop-sim/{node}/{index}").as_bytes(),
                        );
                        out.push(GpuInfo {
                            uuid: format!("GPU-{id}"),
                            index,
                            model: model.clone(),
                            memory_mb,
                        });
                    }
                }
                Ok(out)
            }
            GpuSource::Nvml => nvml_discover(),
        }
    }
}

fn nvml_discover() -> anyhow::Result<Vec<GpuInfo>> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| {
        anyhow!(
            "gpus: cannot load NVML (libnvidia-ml.so.1): {e}. Is the NVIDIA driver installed? \
             Use --gpus sim:4xA100-80GB for simulated GPUs"
        )
    })?;
    let count = nvml.device_count().context("NVML device count")?;
    let mut out = Vec::new();
    for i in 0..count {
        let d = nvml
            .device_by_index(i)
            .with_context(|| format!("NVML device {i}"))?;
        out.push(GpuInfo {
            uuid: d.uuid().with_context(|| format!("uuid of GPU {i}"))?,
            index: i,
            model: d.name().with_context(|| format!("name of GPU {i}"))?,
            memory_mb: d
                .memory_info()
                .with_context(|| format!("memory of GPU {i}"))?
                .total
                / (1024 * 1024),
        });
    }
    if out.is_empty() {
        bail!("gpus: NVML found no GPU on this machine");
    }
    Ok(out)
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
