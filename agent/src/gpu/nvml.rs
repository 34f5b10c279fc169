//! The machine's real GPUs through NVML (libnvidia-ml, loaded at run time).
//!
//! A GPU in MIG mode is offered as its MIG instances, each a device of its
//! own with its own UUID (what `CUDA_VISIBLE_DEVICES` takes); MIG slices have
//! no power sensor, so their readings leave power and energy empty.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml, bitmasks::device::ThrottleReasons};

use super::{GpuInfo, Gpus, Reading, Telemetry};

pub(super) fn open() -> anyhow::Result<Gpus> {
    let nvml = Nvml::init().map_err(|e| {
        anyhow!(
            "gpus: cannot load NVML (libnvidia-ml.so.1): {e}. Is the NVIDIA driver installed? \
             Use --gpus sim:4xA100-80GB for simulated GPUs"
        )
    })?;
    let driver_version = nvml.sys_driver_version().ok();
    let cuda_version = nvml.sys_cuda_driver_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    let count = nvml.device_count().context("gpus: NVML device count")?;
    let mut info = Vec::new();
    for i in 0..count {
        let d = nvml
            .device_by_index(i)
            .with_context(|| format!("gpus: NVML device {i}"))?;
        let mig_on = d.mig_mode().is_ok_and(|m| m.current == 1);
        if !mig_on {
            info.push(describe(&d, info.len() as u32, &format!("GPU {i}"))?);
            continue;
        }
        let slots = d.mig_device_count().unwrap_or(0);
        for m in 0..slots {
            // Unused slots answer NotFound.
            let Ok(mig) = d.mig_device_by_index(m) else {
                continue;
            };
            info.push(describe(
                &mig,
                info.len() as u32,
                &format!("MIG {m} of GPU {i}"),
            )?);
        }
    }
    if info.is_empty() {
        bail!("gpus: NVML found no GPU on this machine");
    }
    let integrated = info
        .iter()
        .map(|g| (g.uuid.clone(), Integrated::default()))
        .collect();
    Ok(Gpus {
        info,
        driver_version,
        cuda_version,
        telemetry: Box::new(NvmlTelemetry {
            nvml,
            integrated,
            // NVML's counters run from the driver's load: one boot at most.
            epoch: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|b| format!("boot:{}", b.trim()))
                .unwrap_or_default(),
        }),
    })
}

fn describe(d: &Device, index: u32, what: &str) -> anyhow::Result<GpuInfo> {
    Ok(GpuInfo {
        uuid: d.uuid().with_context(|| format!("gpus: uuid of {what}"))?,
        index,
        model: model_name(&d.name().with_context(|| format!("gpus: name of {what}"))?),
        memory_mb: d
            .memory_info()
            .with_context(|| format!("gpus: memory of {what}"))?
            .total
            / (1024 * 1024),
        measured: None,
        // NVML gives milliwatts.
        power_limit_w: d.enforced_power_limit().map_or(0, |mw| mw / 1000),
    })
}

/// "NVIDIA H100 80GB HBM3" -> "H100-80GB-HBM3": the scheduler's model names
/// are one word, and jobs ask for them by name.
fn model_name(nvml_name: &str) -> String {
    let name = nvml_name.trim();
    let name = name.strip_prefix("NVIDIA ").unwrap_or(name);
    name.split_whitespace().collect::<Vec<_>>().join("-")
}

/// Power integrated over the agent's readings, for boards without an
/// energy counter.
#[derive(Default)]
struct Integrated {
    energy_mj: u64,
    last: Option<(i64, u64)>,
}

impl Integrated {
    fn add(&mut self, now_ms: i64, power_mw: u64) -> u64 {
        if let Some((at, mw)) = self.last
            && now_ms > at
        {
            // Trapezoid between two readings: mW x ms / 1000 = mJ.
            self.energy_mj += (mw + power_mw) / 2 * (now_ms - at) as u64 / 1000;
        }
        self.last = Some((now_ms, power_mw));
        self.energy_mj
    }
}

struct NvmlTelemetry {
    nvml: Nvml,
    integrated: BTreeMap<String, Integrated>,
    epoch: String,
}

/// `None` for what this GPU does not support; other errors are logged once
/// per reading as they come.
fn opt<T>(what: &str, uuid: &str, r: Result<T, NvmlError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => None,
        Err(e) => {
            tracing::debug!("NVML {what} of {uuid}: {e}");
            None
        }
    }
}

/// The board's energy counter, or its power integrated over the readings.
fn energy_of(
    d: &Device,
    uuid: &str,
    now_ms: i64,
    integrated: &mut BTreeMap<String, Integrated>,
) -> Option<u64> {
    if let Ok(mj) = d.total_energy_consumption() {
        return Some(mj);
    }
    let mw = opt("power", uuid, d.power_usage())?;
    Some(
        integrated
            .entry(uuid.to_string())
            .or_default()
            .add(now_ms, mw as u64),
    )
}

impl Telemetry for NvmlTelemetry {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn read(&mut self, now_ms: i64) -> Vec<Reading> {
        let uuids: Vec<String> = self.integrated.keys().cloned().collect();
        let (nvml, integrated) = (&self.nvml, &mut self.integrated);
        let mut out = Vec::with_capacity(uuids.len());
        for uuid in uuids {
            let Ok(d) = nvml.device_by_uuid(uuid.as_str()) else {
                // Fallen off the bus, or the driver went away.
                out.push(Reading {
                    uuid,
                    healthy: false,
                    ..Default::default()
                });
                continue;
            };
            let throttle = opt("throttle", &uuid, d.current_throttle_reasons())
                .map(harmful_throttle)
                .unwrap_or_default();
            let ecc = opt(
                "ECC",
                &uuid,
                d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            );
            let energy = energy_of(&d, &uuid, now_ms, integrated);
            out.push(Reading {
                utilization_pct: opt("utilization", &uuid, d.utilization_rates()).map(|u| u.gpu),
                memory_used_bytes: opt("memory", &uuid, d.memory_info()).map(|m| m.used),
                power_mw: opt("power", &uuid, d.power_usage()).map(u64::from),
                energy_mj: energy,
                temperature_c: opt("temperature", &uuid, d.temperature(TemperatureSensor::Gpu)),
                healthy: ecc.unwrap_or(0) == 0 && throttle.is_empty(),
                ecc_uncorrected: ecc,
                throttle,
                uuid,
            });
        }
        out
    }

    fn energy_mj(&mut self, uuids: &[String], now_ms: i64) -> Vec<Option<u64>> {
        let (nvml, integrated) = (&self.nvml, &mut self.integrated);
        uuids
            .iter()
            .map(|u| {
                let d = nvml.device_by_uuid(u.as_str()).ok()?;
                energy_of(&d, u, now_ms, integrated)
            })
            .collect()
    }
}

/// Throttle reasons that slow a job down for the hardware's sake (idle and
/// application clock settings are normal).
fn harmful_throttle(r: ThrottleReasons) -> Vec<&'static str> {
    [
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal"),
        (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal"),
    ]
    .into_iter()
    .filter(|(bit, _)| r.contains(*bit))
    .map(|(_, name)| name)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_names_become_one_word_models() {
        assert_eq!(model_name("NVIDIA H100 80GB HBM3"), "H100-80GB-HBM3");
        assert_eq!(model_name("NVIDIA A100-SXM4-80GB"), "A100-SXM4-80GB");
        assert_eq!(model_name("Tesla T4"), "Tesla-T4");
    }

    #[test]
    fn power_is_integrated_between_readings() {
        let mut i = Integrated::default();
        assert_eq!(i.add(1_000, 100_000), 0);
        // 100 W then 300 W over 2 s: 200 W average, 400 J.
        assert_eq!(i.add(3_000, 300_000), 400_000);
        assert_eq!(
            i.add(2_000, 0),
            400_000,
            "a reading back in time adds nothing"
        );
    }

    #[test]
    fn only_hardware_throttling_counts_against_health() {
        assert!(harmful_throttle(ThrottleReasons::GPU_IDLE).is_empty());
        assert_eq!(
            harmful_throttle(ThrottleReasons::HW_THERMAL_SLOWDOWN | ThrottleReasons::GPU_IDLE),
            ["hw_thermal"]
        );
    }
}
