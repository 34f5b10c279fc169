//! The machine's real GPUs through NVML (libnvidia-ml, loaded at run time).
//!
//! A GPU in MIG mode is offered as its MIG instances, each a device of its
//! own with its own UUID (what `CUDA_VISIBLE_DEVICES` takes); MIG slices have
//! no power sensor, so their readings leave power and energy empty.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml, bitmasks::device::ThrottleReasons};

use super::{Devices, GpuInfo, Gpus, Reading, Telemetry};

/// Why NVML could not start, and what the operator can do about it.
fn init_error(e: NvmlError) -> anyhow::Error {
    let advice = match &e {
        NvmlError::LibloadingError(_) => {
            "libnvidia-ml.so.1 cannot be loaded: install the NVIDIA driver"
        }
        NvmlError::DriverNotLoaded => {
            "the NVIDIA kernel driver is not loaded: check that it is installed and the machine rebooted since (lsmod | grep nvidia)"
        }
        NvmlError::NoPermission => {
            "this user may not open the GPUs: check the permissions of /dev/nvidia*"
        }
        NvmlError::LibRmVersionMismatch => {
            "the NVIDIA library and kernel driver versions differ (the driver was upgraded without a reboot): reboot, or reload the nvidia kernel modules"
        }
        NvmlError::GpuLost | NvmlError::ResetRequired => {
            "a GPU has fallen off the bus or needs a reset: see dmesg and nvidia-smi"
        }
        NvmlError::CorruptedInfoROM | NvmlError::IrqIssue => {
            "the driver reports a hardware fault: see dmesg and nvidia-smi"
        }
        _ => "see dmesg and nvidia-smi",
    };
    anyhow!("gpus: cannot use NVML: {e}; {advice}. Use --gpus sim:4xA100-80GB for simulated GPUs")
}

/// Device files every GPU container needs, where this machine has them.
const SHARED_DEVICES: &[&str] = &[
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

pub(super) fn open() -> anyhow::Result<Gpus> {
    let nvml = Nvml::init().map_err(init_error)?;
    // Kept for the life of the process: the XID event sets borrow it, and
    // an agent opens its GPUs once.
    let nvml: &'static Nvml = Box::leak(Box::new(nvml));
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
    let mut devices = Devices {
        shared: SHARED_DEVICES
            .iter()
            .filter(|p| std::path::Path::new(p).exists())
            .map(|p| p.to_string())
            .collect(),
        ..Default::default()
    };
    let mut xid_sets = Vec::new();
    for i in 0..count {
        // A GPU that cannot be read (fallen off the bus before the agent
        // started) is left out: the others are still offered.
        let d = match nvml.device_by_index(i) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("GPU {i} is not offered: NVML cannot reach it ({e})");
                continue;
            }
        };
        // A container gets the board's device file, MIG slice or not.
        let node = d
            .minor_number()
            .ok()
            .map(|m| vec![format!("/dev/nvidia{m}")])
            .unwrap_or_default();
        let mig_on = d.mig_mode().is_ok_and(|m| m.current == 1);
        let mut found = Vec::new();
        if !mig_on {
            found.push(describe(&d, &format!("GPU {i}")));
        } else {
            let slots = d.mig_device_count().unwrap_or(0);
            for m in 0..slots {
                // Unused slots answer NotFound.
                let Ok(mig) = d.mig_device_by_index(m) else {
                    continue;
                };
                found.push(describe(&mig, &format!("MIG {m} of GPU {i}")));
            }
        }
        let mut uuids = Vec::new();
        for g in found {
            match g {
                Ok(mut g) => {
                    g.index = info.len() as u32;
                    devices.per_gpu.insert(g.uuid.clone(), node.clone());
                    uuids.push(g.uuid.clone());
                    info.push(g);
                }
                Err(e) => tracing::error!("{e:#}: not offered"),
            }
        }
        // XID errors are the board's: they count against each of its slices.
        match nvml.create_event_set().and_then(|set| {
            d.register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| e.error)
        }) {
            Ok(set) => xid_sets.push((set, uuids)),
            Err(e) => tracing::debug!("no XID events from GPU {i}: {e}"),
        }
    }
    if info.is_empty() {
        bail!("gpus: NVML found no GPU it can read on this machine");
    }
    let state = info
        .iter()
        .map(|g| (g.uuid.clone(), GpuState::default()))
        .collect();
    Ok(Gpus {
        info,
        driver_version,
        cuda_version,
        devices,
        telemetry: Box::new(NvmlTelemetry {
            nvml,
            state,
            xid_sets,
            // NVML's counters run from the driver's load: one boot at most.
            epoch: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|b| format!("boot:{}", b.trim()))
                .unwrap_or_default(),
        }),
    })
}

fn describe(d: &Device, what: &str) -> anyhow::Result<GpuInfo> {
    Ok(GpuInfo {
        uuid: d.uuid().with_context(|| format!("gpus: uuid of {what}"))?,
        index: 0,
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

/// What the agent keeps of one GPU between readings.
#[derive(Default)]
struct GpuState {
    integrated: Integrated,
    /// The energy counter at the last reading that gave one: a GPU that is
    /// lost bills no energy beyond it.
    last_energy_mj: Option<u64>,
    lost: bool,
    /// XID errors that mean the hardware is in trouble: unhealthy until the
    /// driver reloads (the agent restarts).
    fatal_xid: bool,
}

struct NvmlTelemetry {
    nvml: &'static Nvml,
    state: BTreeMap<String, GpuState>,
    /// One event set per board, with the UUIDs it is offered as.
    xid_sets: Vec<(EventSet<'static>, Vec<String>)>,
    epoch: String,
}

/// The GPU is gone: fallen off the bus, or no longer known to the driver.
fn gone(e: &NvmlError) -> bool {
    matches!(e, NvmlError::GpuLost | NvmlError::NotFound)
}

/// `None` for what this GPU does not support; a GPU found lost is marked in
/// `lost`; other errors are logged as they come.
fn opt<T>(what: &str, uuid: &str, r: Result<T, NvmlError>, lost: &mut bool) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => None,
        Err(NvmlError::GpuLost) => {
            *lost = true;
            None
        }
        Err(e) => {
            tracing::debug!("NVML {what} of {uuid}: {e}");
            None
        }
    }
}

/// XIDs that mean the GPU's hardware or its memory is failing (NVIDIA's
/// XID catalogue): double-bit and uncontained ECC errors, row-remapping
/// failures, NVLink errors, fallen off the bus, GSP errors. Others (13, 31,
/// 43: a program's own fault) say nothing about the GPU.
fn fatal_xid(xid: u64) -> bool {
    matches!(xid, 48 | 63 | 64 | 74 | 79 | 92 | 94 | 95 | 119 | 120)
}

impl NvmlTelemetry {
    /// The board's energy counter, or its power integrated over the
    /// readings; for a lost GPU, the last counter it gave.
    fn energy_of(
        &mut self,
        d: Option<&Device>,
        uuid: &str,
        now_ms: i64,
        lost: &mut bool,
    ) -> Option<u64> {
        let st = self.state.entry(uuid.to_string()).or_default();
        let counted = match d {
            None => None,
            Some(d) => match d.total_energy_consumption() {
                Ok(mj) => Some(mj),
                // A board without the counter: its power, integrated. (Only
                // then: a counter that failed once is not mixed with it.)
                Err(NvmlError::NotSupported) => match opt("power", uuid, d.power_usage(), lost) {
                    Some(mw) if !*lost => Some(st.integrated.add(now_ms, mw as u64)),
                    _ => None,
                },
                Err(e) => {
                    *lost |= matches!(e, NvmlError::GpuLost);
                    tracing::debug!("NVML energy of {uuid}: {e}");
                    None
                }
            },
        };
        if *lost || d.is_none() {
            return st.last_energy_mj;
        }
        if counted.is_some() {
            st.last_energy_mj = counted;
        }
        // A passing error reads as no energy since the last counter: the next
        // reading that works catches up.
        counted.or(st.last_energy_mj)
    }

    /// New XID errors since the last call, by UUID.
    fn drain_xids(&mut self) -> BTreeMap<String, Vec<u64>> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (set, uuids) in &self.xid_sets {
            // A bounded drain: a flood of events cannot hold up a reading.
            for _ in 0..64 {
                let Ok(ev) = set.wait(0) else { break };
                let xid = match ev.event_data {
                    Some(XidError::Value(x)) => x,
                    _ => continue,
                };
                for u in uuids {
                    out.entry(u.clone()).or_default().push(xid);
                }
            }
        }
        out
    }
}

impl Telemetry for NvmlTelemetry {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn read(&mut self, now_ms: i64) -> Vec<Reading> {
        let uuids: Vec<String> = self.state.keys().cloned().collect();
        let mut xids = self.drain_xids();
        let nvml = self.nvml;
        let mut out = Vec::with_capacity(uuids.len());
        for uuid in uuids {
            let xids = xids.remove(&uuid).unwrap_or_default();
            let mut lost = self.state.get(&uuid).is_some_and(|s| s.lost);
            let d = match nvml.device_by_uuid(uuid.as_str()) {
                Ok(d) => Some(d),
                Err(e) => {
                    lost |= gone(&e);
                    if !lost {
                        tracing::debug!("NVML handle of {uuid}: {e}");
                    }
                    None
                }
            };
            let mut r = Reading {
                uuid: uuid.clone(),
                ..Default::default()
            };
            if let Some(d) = &d {
                r.throttle = opt("throttle", &uuid, d.current_throttle_reasons(), &mut lost)
                    .map(harmful_throttle)
                    .unwrap_or_default();
                r.ecc_uncorrected = opt(
                    "ECC",
                    &uuid,
                    d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                    &mut lost,
                );
                r.utilization_pct =
                    opt("utilization", &uuid, d.utilization_rates(), &mut lost).map(|u| u.gpu);
                r.memory_used_bytes =
                    opt("memory", &uuid, d.memory_info(), &mut lost).map(|m| m.used);
                r.power_mw = opt("power", &uuid, d.power_usage(), &mut lost).map(u64::from);
                r.temperature_c = opt(
                    "temperature",
                    &uuid,
                    d.temperature(TemperatureSensor::Gpu),
                    &mut lost,
                );
            }
            r.energy_mj = self.energy_of(d.as_ref(), &uuid, now_ms, &mut lost);
            // Fallen off the bus, says the driver.
            lost |= xids.contains(&79);
            let st = self.state.entry(uuid.clone()).or_default();
            st.fatal_xid |= xids.iter().any(|x| fatal_xid(*x));
            if lost && !st.lost {
                tracing::error!("GPU {uuid} is lost (fallen off the bus or gone from the driver)");
            }
            st.lost |= lost;
            r.lost = st.lost;
            r.healthy = d.is_some()
                && !r.lost
                && !st.fatal_xid
                && r.ecc_uncorrected.unwrap_or(0) == 0
                && r.throttle.is_empty();
            if r.lost {
                // Nothing it said in this reading can be trusted.
                r = Reading {
                    uuid: r.uuid,
                    energy_mj: r.energy_mj,
                    lost: true,
                    xids,
                    ..Default::default()
                };
            } else {
                r.xids = xids;
            }
            out.push(r);
        }
        out
    }

    fn energy_mj(&mut self, uuids: &[String], now_ms: i64) -> Vec<Option<u64>> {
        let nvml = self.nvml;
        uuids
            .iter()
            .map(|u| {
                let mut lost = self.state.get(u).is_some_and(|s| s.lost);
                let d = if lost {
                    None
                } else {
                    nvml.device_by_uuid(u.as_str()).ok()
                };
                self.energy_of(d.as_ref(), u, now_ms, &mut lost)
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
