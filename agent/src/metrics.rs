//! Prometheus metrics of an agent: per-GPU telemetry and the report backlog.
//!
//! Simulated GPUs report simulated telemetry: busy GPUs at full utilisation and
//! their model's board power, idle ones at a tenth of it. The NVML backend
//! will report the real readings through the same gauges.

use prometheus::{CounterVec, GaugeVec, IntGaugeVec, Opts, Registry};

use crate::gpu::{GpuInfo, sim_power_w};

#[derive(Clone)]
pub struct AgentMetrics {
    utilization: GaugeVec,
    memory_used: GaugeVec,
    power: GaugeVec,
    temperature: GaugeVec,
    healthy: IntGaugeVec,
    energy: CounterVec,
    backlog: IntGaugeVec,
    connected: IntGaugeVec,
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
        };
        registry.register(Box::new(m.utilization.clone()))?;
        registry.register(Box::new(m.memory_used.clone()))?;
        registry.register(Box::new(m.power.clone()))?;
        registry.register(Box::new(m.temperature.clone()))?;
        registry.register(Box::new(m.healthy.clone()))?;
        registry.register(Box::new(m.energy.clone()))?;
        registry.register(Box::new(m.backlog.clone()))?;
        registry.register(Box::new(m.connected.clone()))?;
        Ok(m)
    }

    /// Publishes one reading of every GPU: `busy` says which ones run a job;
    /// `dt_s` is the time since the last reading (for the energy counter).
    pub fn publish(&self, node: &str, gpus: &[GpuInfo], busy: &dyn Fn(&str) -> bool, dt_s: f64) {
        for g in gpus {
            let l = &[node, g.uuid.as_str(), g.model.as_str()];
            let on = busy(&g.uuid);
            let watts = sim_power_w(&g.model) as f64 * if on { 1.0 } else { 0.1 };
            self.utilization
                .with_label_values(l)
                .set(if on { 1.0 } else { 0.0 });
            let mem = if on {
                g.memory_mb as f64 * 1024.0 * 1024.0 / 2.0
            } else {
                0.0
            };
            self.memory_used.with_label_values(l).set(mem);
            self.power.with_label_values(l).set(watts);
            self.temperature
                .with_label_values(l)
                .set(if on { 70.0 } else { 35.0 });
            self.healthy.with_label_values(l).set(1);
            self.energy
                .with_label_values(l)
                .inc_by(watts * dt_s.max(0.0));
        }
    }

    pub fn set_backlog(&self, node: &str, n: usize) {
        self.backlog.with_label_values(&[node]).set(n as i64);
    }

    pub fn set_connected(&self, node: &str, up: bool) {
        self.connected.with_label_values(&[node]).set(up as i64);
    }
}
