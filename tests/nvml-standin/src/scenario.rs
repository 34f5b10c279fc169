//! The scenario file: what the stand-in's GPUs are and what they read over
//! time. Tests build a [`Scenario`] in Rust, [`write`] it, and compute the
//! readings they expect with [`phase_at`] and [`energy_mj`], the same
//! functions the library answers with.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The environment variable the library reads, at each init, for the
/// scenario file's path.
pub const ENV_VAR: &str = "NVML_STANDIN_SCENARIO";

/// `nvmlEventTypeXidCriticalError`: the only event type the stand-in has.
pub const XID_EVENT: u64 = 0x8;

/// The whole machine, as the scenario file describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// When set (and not 0), `nvmlInit_v2`/`nvmlInitWithFlags` return it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_error: Option<u32>,
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    /// NVML's integer form: major * 1000 + minor * 10.
    #[serde(default = "default_cuda_version")]
    pub cuda_version: i32,
    /// Time zero of every device's phases and energy counter, in unix ms.
    /// Required when a device lists phases; when absent the library takes the
    /// wall clock of the first time this process loaded a scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_unix_ms: Option<u64>,
    #[serde(default)]
    pub devices: Vec<Device>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            init_error: None,
            driver_version: default_driver_version(),
            cuda_version: default_cuda_version(),
            start_unix_ms: None,
            devices: Vec::new(),
        }
    }
}

/// One physical GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub uuid: String,
    pub name: String,
    /// Default: the device's index in `devices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<u32>,
    pub memory_total_bytes: u64,
    #[serde(default = "default_power_limit_mw")]
    pub power_limit_mw: u32,
    /// False: `nvmlDeviceGetTotalEnergyConsumption` is NOT_SUPPORTED.
    #[serde(default = "default_true")]
    pub energy_counter: bool,
    /// The counter's value at `start_unix_ms`.
    #[serde(default)]
    pub energy_base_mj: u64,
    /// True: every call about this GPU or its MIG devices is GPU_IS_LOST.
    #[serde(default)]
    pub lost: bool,
    /// Piecewise-constant readings, cycled; empty means one default phase.
    #[serde(default)]
    pub phases: Vec<Phase>,
    /// XID critical errors that have happened, oldest first.
    #[serde(default)]
    pub xids: Vec<u64>,
    /// Non-empty: MIG mode is on and these are its MIG devices, slot order.
    #[serde(default)]
    pub mig: Vec<MigDevice>,
    /// `nvmlDeviceGetMaxMigDeviceCount`; default 7 with MIG devices, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_slots: Option<u32>,
}

impl Device {
    /// A GPU with every optional field at its default.
    pub fn new(uuid: &str, name: &str, memory_total_bytes: u64) -> Self {
        Device {
            uuid: uuid.to_string(),
            name: name.to_string(),
            minor: None,
            memory_total_bytes,
            power_limit_mw: default_power_limit_mw(),
            energy_counter: true,
            energy_base_mj: 0,
            lost: false,
            phases: Vec::new(),
            xids: Vec::new(),
            mig: Vec::new(),
            mig_slots: None,
        }
    }

    /// The MIG slot count the library reports.
    pub fn effective_mig_slots(&self) -> u32 {
        self.mig_slots
            .unwrap_or(if self.mig.is_empty() { 0 } else { 7 })
    }
}

/// One stretch of constant readings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Phase {
    /// Must be > 0.
    pub for_ms: u64,
    pub utilization_pct: u32,
    pub memory_util_pct: u32,
    pub memory_used_bytes: u64,
    pub power_mw: u32,
    pub temperature_c: u32,
    pub ecc_uncorrected: u64,
    pub throttle_reasons: u64,
}

impl Default for Phase {
    fn default() -> Self {
        DEFAULT_PHASE
    }
}

/// One MIG device of a GPU in MIG mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigDevice {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    #[serde(default)]
    pub memory_used_bytes: u64,
}

fn default_driver_version() -> String {
    "550.54.15".to_string()
}
fn default_cuda_version() -> i32 {
    12040
}
fn default_power_limit_mw() -> u32 {
    700_000
}
fn default_true() -> bool {
    true
}

const DEFAULT_PHASE: Phase = Phase {
    for_ms: 1000,
    utilization_pct: 0,
    memory_util_pct: 0,
    memory_used_bytes: 0,
    power_mw: 60_000,
    temperature_c: 40,
    ecc_uncorrected: 0,
    throttle_reasons: 0,
};

fn phases(device: &Device) -> &[Phase] {
    if device.phases.is_empty() {
        std::slice::from_ref(&DEFAULT_PHASE)
    } else {
        &device.phases
    }
}

/// Parses and checks a scenario; the error names the problem.
pub fn parse(text: &str) -> Result<Scenario, String> {
    let scenario: Scenario = serde_json::from_str(text).map_err(|e| e.to_string())?;
    validate(&scenario)?;
    Ok(scenario)
}

/// What the library refuses to load.
pub fn validate(scenario: &Scenario) -> Result<(), String> {
    let mut uuids = HashSet::new();
    for (i, d) in scenario.devices.iter().enumerate() {
        if !d.phases.is_empty() && scenario.start_unix_ms.is_none() {
            return Err(format!(
                "devices[{i}] has phases but start_unix_ms is not set"
            ));
        }
        if let Some(p) = d.phases.iter().position(|p| p.for_ms == 0) {
            return Err(format!("devices[{i}].phases[{p}].for_ms is 0"));
        }
        if d.mig.len() as u64 > u64::from(d.effective_mig_slots()) {
            return Err(format!(
                "devices[{i}] has {} MIG devices but {} mig_slots",
                d.mig.len(),
                d.effective_mig_slots()
            ));
        }
        let names = std::iter::once(&d.uuid).chain(d.mig.iter().map(|m| &m.uuid));
        for u in names {
            if u.is_empty() || u.contains('\0') {
                return Err(format!("devices[{i}] has an empty or NUL-bearing uuid"));
            }
            if !uuids.insert(u.as_str()) {
                return Err(format!("uuid {u} appears twice"));
            }
        }
        let mig_names = d.mig.iter().map(|m| &m.name);
        if std::iter::once(&d.name)
            .chain(mig_names)
            .any(|n| n.contains('\0'))
        {
            return Err(format!("devices[{i}] has a name with a NUL"));
        }
    }
    if scenario.driver_version.contains('\0') {
        return Err("driver_version contains a NUL".to_string());
    }
    Ok(())
}

/// The index into the device's phases (or 0 for the default phase) current
/// at wall time `t_ms`. Before `start_unix_ms` it is the first phase.
pub fn phase_index_at(device: &Device, start_unix_ms: u64, t_ms: u64) -> usize {
    let phases = phases(device);
    let cycle: u64 = phases.iter().map(|p| p.for_ms).fold(0, u64::saturating_add);
    if t_ms <= start_unix_ms || cycle == 0 {
        return 0;
    }
    let mut rem = (t_ms - start_unix_ms) % cycle;
    for (i, p) in phases.iter().enumerate() {
        if rem < p.for_ms {
            return i;
        }
        rem -= p.for_ms;
    }
    0
}

/// The readings current at wall time `t_ms`.
pub fn phase_at(device: &Device, start_unix_ms: u64, t_ms: u64) -> Phase {
    phases(device)[phase_index_at(device, start_unix_ms, t_ms)]
}

/// The energy counter (mJ) at wall time `t_ms`: `energy_base_mj` plus the
/// exact integral of the phases' `power_mw` over `[start_unix_ms, t_ms]`
/// (mW × ms / 1000, rounded down), whole cycles in closed form.
pub fn energy_mj(device: &Device, start_unix_ms: u64, t_ms: u64) -> u64 {
    let phases = phases(device);
    let cycle: u128 = phases.iter().map(|p| u128::from(p.for_ms)).sum();
    if t_ms <= start_unix_ms || cycle == 0 {
        return device.energy_base_mj;
    }
    let elapsed = u128::from(t_ms - start_unix_ms);
    let per_cycle: u128 = phases
        .iter()
        .map(|p| u128::from(p.power_mw) * u128::from(p.for_ms))
        .sum();
    let mut micro = (elapsed / cycle) * per_cycle; // mW·ms = µJ
    let mut rem = elapsed % cycle;
    for p in phases {
        let part = rem.min(u128::from(p.for_ms));
        micro += u128::from(p.power_mw) * part;
        rem -= part;
        if rem == 0 {
            break;
        }
    }
    let total = u128::from(device.energy_base_mj) + micro / 1000;
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// The wall clock in unix milliseconds, as the library reads it.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes `scenario` to `path` atomically: a temporary file in the same
/// directory, then a rename, so a running library never reads half a file.
pub fn write(path: &Path, scenario: &Scenario) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(scenario).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = Path::new(&tmp);
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(phases: Vec<Phase>) -> Device {
        Device {
            phases,
            energy_base_mj: 5,
            ..Device::new("GPU-a", "A", 1 << 30)
        }
    }

    fn ph(for_ms: u64, power_mw: u32) -> Phase {
        Phase {
            for_ms,
            power_mw,
            ..Phase::default()
        }
    }

    #[test]
    fn energy_is_the_integral() {
        let d = dev(vec![ph(1000, 100_000), ph(500, 200_000)]);
        assert_eq!(energy_mj(&d, 10_000, 9_000), 5);
        assert_eq!(energy_mj(&d, 10_000, 10_000), 5);
        assert_eq!(energy_mj(&d, 10_000, 10_500), 5 + 50_000);
        assert_eq!(energy_mj(&d, 10_000, 11_250), 5 + 100_000 + 50_000);
        // Two whole cycles of 200 J each, then 1.2 s: 100 J + 40 J.
        assert_eq!(
            energy_mj(&d, 10_000, 10_000 + 3_000 + 1_200),
            5 + 400_000 + 140_000
        );
        // The default phase: 60 W.
        assert_eq!(energy_mj(&dev(vec![]), 0, 2_000), 5 + 120_000);
        // Rounded down, not accumulated: 1 mW for 999 ms is 0 mJ.
        assert_eq!(energy_mj(&dev(vec![ph(1000, 1)]), 0, 999), 5);
    }

    #[test]
    fn phases_cycle() {
        let d = dev(vec![ph(1000, 1), ph(500, 2)]);
        let at = |t| phase_at(&d, 100, t).power_mw;
        assert_eq!(at(0), 1);
        assert_eq!(at(100), 1);
        assert_eq!(at(1099), 1);
        assert_eq!(at(1100), 2);
        assert_eq!(at(1599), 2);
        assert_eq!(at(1600), 1);
        assert_eq!(phase_index_at(&d, 100, 1100 + 1500), 1);
    }

    #[test]
    fn parse_defaults_and_errors() {
        let s =
            parse(r#"{"devices":[{"uuid":"GPU-1","name":"X","memory_total_bytes":1}]}"#).unwrap();
        assert_eq!(s.driver_version, "550.54.15");
        assert_eq!(s.cuda_version, 12040);
        let d = &s.devices[0];
        assert_eq!(
            (d.power_limit_mw, d.energy_counter, d.lost),
            (700_000, true, false)
        );
        assert_eq!(d.effective_mig_slots(), 0);
        assert!(parse(r#"{"bogus":1}"#).unwrap_err().contains("bogus"));
        let no_start = r#"{"devices":[{"uuid":"GPU-1","name":"X","memory_total_bytes":1,
            "phases":[{"for_ms":5}]}]}"#;
        assert!(parse(no_start).unwrap_err().contains("start_unix_ms"));
        let dup = r#"{"devices":[{"uuid":"GPU-1","name":"X","memory_total_bytes":1,
            "mig":[{"uuid":"GPU-1","name":"m","memory_total_bytes":1}]}]}"#;
        assert!(parse(dup).unwrap_err().contains("twice"));
        let round = Scenario {
            start_unix_ms: Some(7),
            devices: vec![dev(vec![ph(3, 4)])],
            ..Scenario::default()
        };
        let text = serde_json::to_string(&round).unwrap();
        assert_eq!(parse(&text).unwrap(), round);
    }
}
