//! Simulated GPUs: a busy GPU runs flat out at its model's typical board
//! power, an idle one at a tenth of it. The energy counter integrates that
//! exactly between the agent's calls, so a run's measured energy is its
//! GPUs' busy power times its time.

use std::collections::BTreeMap;

use super::{GpuInfo, Gpus, Reading, Telemetry, model_memory_mb};

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

struct SimGpu {
    info: GpuInfo,
    busy: bool,
    /// mJ drawn up to `at_ms`.
    energy_mj: u64,
    at_ms: i64,
}

impl SimGpu {
    /// Busy power in W is busy power in mJ per ms; idle draws a tenth.
    fn power_mw(&self) -> u64 {
        let w = sim_power_w(&self.info.model);
        if self.busy { w * 1000 } else { w * 100 }
    }

    fn advance(&mut self, now_ms: i64) {
        if now_ms > self.at_ms {
            self.energy_mj += self.power_mw() * (now_ms - self.at_ms) as u64 / 1000;
            self.at_ms = now_ms;
        }
    }
}

struct SimTelemetry {
    gpus: BTreeMap<String, SimGpu>,
    epoch: String,
}

pub(super) fn open(node: &str, groups: &[(u32, String)]) -> anyhow::Result<Gpus> {
    let mut info = Vec::new();
    for (count, model) in groups {
        let memory_mb = model_memory_mb(model)?;
        for _ in 0..*count {
            let index = info.len() as u32;
            let id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("coop-sim/{node}/{index}").as_bytes(),
            );
            info.push(GpuInfo {
                uuid: format!("GPU-{id}"),
                index,
                model: model.clone(),
                memory_mb,
                measured: None,
                power_limit_w: sim_power_w(model) as u32,
            });
        }
    }
    let now = crate::runner::now_ms();
    let gpus = info
        .iter()
        .map(|g| {
            let sim = SimGpu {
                info: g.clone(),
                busy: false,
                energy_mj: 0,
                at_ms: now,
            };
            (g.uuid.clone(), sim)
        })
        .collect();
    Ok(Gpus {
        info,
        driver_version: None,
        cuda_version: None,
        devices: Default::default(),
        telemetry: Box::new(SimTelemetry {
            gpus,
            epoch: format!("sim:{}", uuid::Uuid::new_v4()),
        }),
    })
}

impl Telemetry for SimTelemetry {
    fn read(&mut self, now_ms: i64) -> Vec<Reading> {
        self.gpus
            .values_mut()
            .map(|g| {
                g.advance(now_ms);
                Reading {
                    uuid: g.info.uuid.clone(),
                    utilization_pct: Some(if g.busy { 100 } else { 0 }),
                    memory_used_bytes: Some(if g.busy {
                        g.info.memory_mb * 1024 * 1024 / 2
                    } else {
                        0
                    }),
                    power_mw: Some(g.power_mw()),
                    energy_mj: Some(g.energy_mj),
                    temperature_c: Some(if g.busy { 70 } else { 35 }),
                    ecc_uncorrected: Some(0),
                    healthy: true,
                    ..Default::default()
                }
            })
            .collect()
    }

    fn energy_mj(&mut self, uuids: &[String], now_ms: i64) -> Vec<Option<u64>> {
        uuids
            .iter()
            .map(|u| {
                self.gpus.get_mut(u).map(|g| {
                    g.advance(now_ms);
                    g.energy_mj
                })
            })
            .collect()
    }

    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn busy_energy_mj(&self, uuid: &str, ms: u64) -> u64 {
        self.gpus
            .get(uuid)
            .map_or(0, |g| sim_power_w(&g.info.model) * ms)
    }

    fn set_busy(&mut self, uuid: &str, busy: bool, now_ms: i64) {
        if let Some(g) = self.gpus.get_mut(uuid) {
            g.advance(now_ms);
            g.busy = busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_gpu_draws_its_model_power_and_an_idle_one_a_tenth() {
        let mut g = open("n", &[(2, "A100-80GB".to_string())]).unwrap();
        let (a, b) = (g.info[0].uuid.clone(), g.info[1].uuid.clone());
        let t0 = crate::runner::now_ms() + 1_000;
        let base = g.telemetry.energy_mj(&[a.clone(), b.clone()], t0);
        g.telemetry.set_busy(&a, true, t0);
        let after = g.telemetry.energy_mj(&[a.clone(), b.clone()], t0 + 2_000);
        // 300 W for 2 s on a, 30 W on b.
        assert_eq!(after[0].unwrap() - base[0].unwrap(), 600_000);
        assert_eq!(after[1].unwrap() - base[1].unwrap(), 60_000);
        let readings = g.telemetry.read(t0 + 2_000);
        assert_eq!(readings[0].power_mw, Some(300_000));
        assert!(readings.iter().all(|r| r.healthy));
        // A reading back in time changes nothing.
        let again = g.telemetry.energy_mj(&[a], t0 + 1_000);
        assert_eq!(again[0], after[0]);
    }
}
