//! Prometheus metrics of an agent: per-GPU telemetry (NVML's readings, or the
//! simulation's) and the report backlog. A reading a GPU cannot give (a MIG
//! slice's power) leaves its gauge unset rather than at a made-up value.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::gpu::{GpuInfo, Reading};

#[derive(Clone)]
pub struct AgentMetrics {
    utilization: GaugeVec,
    memory_used: GaugeVec,
    power: GaugeVec,
    temperature: GaugeVec,
    healthy: IntGaugeVec,
    energy: CounterVec,
    ecc: IntGaugeVec,
    throttled: IntGaugeVec,
    xid: IntCounterVec,
    lost: IntGaugeVec,
    backlog: IntGaugeVec,
    connected: IntGaugeVec,
    /// Each GPU's energy counter at the last reading, for the counter's increments.
    last_energy: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

const GPU: &[&str] = &["node", "gpu", "model"];

impl AgentMetrics {
    /// Creates the agent's metrics in `registry`.
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        let gv = |n: &str, h: &str| GaugeVec::new(Opts::new(n, h), GPU);
        let m = Self {
            utilization: gv(
                "coop_gpu_utilization_ratio",
                "Fraction of time the GPU was busy.",
            )?,
            memory_used: gv("coop_gpu_memory_used_bytes", "GPU memory in use.")?,
            power: gv("coop_gpu_power_watts", "GPU board power draw.")?,
            temperature: gv("coop_gpu_temperature_celsius", "GPU core temperature.")?,
            healthy: IntGaugeVec::new(
                Opts::new(
                    "coop_gpu_healthy",
                    "1 when the GPU passes its health checks (no ECC or thermal faults).",
                ),
                GPU,
            )?,
            energy: CounterVec::new(
                Opts::new(
                    "coop_gpu_energy_joules_total",
                    "Energy the GPU has drawn since the agent started.",
                ),
                GPU,
            )?,
            ecc: IntGaugeVec::new(
                Opts::new(
                    "coop_gpu_ecc_uncorrected_errors",
                    "Uncorrected ECC errors since the driver loaded.",
                ),
                GPU,
            )?,
            throttled: IntGaugeVec::new(
                Opts::new(
                    "coop_gpu_throttled",
                    "1 while the GPU's clocks are held down by the hardware, by reason.",
                ),
                &["node", "gpu", "model", "reason"],
            )?,
            xid: IntCounterVec::new(
                Opts::new(
                    "coop_gpu_xid_errors_total",
                    "XID errors the NVIDIA driver reported for the GPU, by XID.",
                ),
                &["node", "gpu", "model", "xid"],
            )?,
            lost: IntGaugeVec::new(
                Opts::new(
                    "coop_gpu_lost",
                    "1 once the GPU has fallen off the bus or gone from the driver; the node no longer offers it.",
                ),
                GPU,
            )?,
            backlog: IntGaugeVec::new(
                Opts::new(
                    "coop_agent_spool_backlog",
                    "Reports (run starts, exits, usage) not yet acknowledged by a scheduler.",
                ),
                &["node"],
            )?,
            connected: IntGaugeVec::new(
                Opts::new(
                    "coop_agent_connected",
                    "1 while the agent has a heartbeat stream to a scheduler.",
                ),
                &["node"],
            )?,
            last_energy: Arc::default(),
        };
        registry.register(Box::new(m.utilization.clone()))?;
        registry.register(Box::new(m.memory_used.clone()))?;
        registry.register(Box::new(m.power.clone()))?;
        registry.register(Box::new(m.temperature.clone()))?;
        registry.register(Box::new(m.healthy.clone()))?;
        registry.register(Box::new(m.energy.clone()))?;
        registry.register(Box::new(m.ecc.clone()))?;
        registry.register(Box::new(m.throttled.clone()))?;
        registry.register(Box::new(m.xid.clone()))?;
        registry.register(Box::new(m.lost.clone()))?;
        registry.register(Box::new(m.backlog.clone()))?;
        registry.register(Box::new(m.connected.clone()))?;
        Ok(m)
    }

    /// Publishes one reading of every GPU.
    pub fn publish(&self, node: &str, gpus: &[GpuInfo], readings: &[Reading]) {
        let mut last = self.last_energy.lock().expect("metrics lock");
        for r in readings {
            let model = gpus
                .iter()
                .find(|g| g.uuid == r.uuid)
                .map_or("", |g| g.model.as_str());
            let l = &[node, r.uuid.as_str(), model];
            if let Some(u) = r.utilization_pct {
                self.utilization.with_label_values(l).set(u as f64 / 100.0);
            }
            if let Some(b) = r.memory_used_bytes {
                self.memory_used.with_label_values(l).set(b as f64);
            }
            if let Some(mw) = r.power_mw {
                self.power.with_label_values(l).set(mw as f64 / 1000.0);
            }
            if let Some(c) = r.temperature_c {
                self.temperature.with_label_values(l).set(c as f64);
            }
            if let Some(e) = r.ecc_uncorrected {
                self.ecc.with_label_values(l).set(e as i64);
            }
            for reason in ["hw_slowdown", "hw_thermal", "hw_power_brake", "sw_thermal"] {
                self.throttled
                    .with_label_values(&[node, r.uuid.as_str(), model, reason])
                    .set(r.throttle.contains(&reason) as i64);
            }
            self.healthy.with_label_values(l).set(r.healthy as i64);
            self.lost.with_label_values(l).set(r.lost as i64);
            for x in &r.xids {
                // Bounded label values, whatever a driver sends.
                let xid = if *x < 1000 {
                    x.to_string()
                } else {
                    "other".to_string()
                };
                self.xid
                    .with_label_values(&[node, r.uuid.as_str(), model, xid.as_str()])
                    .inc();
            }
            if let Some(mj) = r.energy_mj {
                // The first reading is the baseline; a counter that went back
                // (driver reload) starts a new one.
                if let Some(prev) = last.insert(r.uuid.clone(), mj)
                    && mj > prev
                {
                    self.energy
                        .with_label_values(l)
                        .inc_by((mj - prev) as f64 / 1000.0);
                }
            }
        }
    }

    pub fn set_backlog(&self, node: &str, n: usize) {
        self.backlog.with_label_values(&[node]).set(n as i64);
    }

    pub fn set_connected(&self, node: &str, up: bool) {
        self.connected.with_label_values(&[node]).set(up as i64);
    }
}
