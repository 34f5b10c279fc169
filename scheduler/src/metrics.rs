//! Prometheus metrics of a scheduler, and the `/metrics` endpoint.
//!
//! Figures that follow from the replicated state (per member, per job kind and
//! state, per node and GPU, raft indices) are computed at scrape time from the
//! state, so they are the same on every node and survive restarts; counters
//! among them are ledger totals, which only grow. Figures of this process
//! (pass durations, placements, proposal latency, waits) are counted as they
//! happen (`instruments`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Gauge, GaugeVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::clock::now_ms;
use crate::instruments::{
    LEADER_CHANGES, PASS_SECONDS, PLACEMENTS, PREEMPTIONS, PROPOSAL_SECONDS, RAFT_PERSIST_SECONDS,
    SINK_DIVERGED, WAIT_SECONDS,
};
use crate::liveness::Registry as Liveness;
use crate::replica::Replica;
use coop_core::fairshare::{entitlements, factors, jain, running_gpus, total_gpus, water_fill};
use coop_core::state::{JobKind, JobState};

/// A registry holding every scheduler metric, computed from `replica` and `liveness`.
pub fn registry(replica: Replica, liveness: Arc<Liveness>) -> Registry {
    let r = Registry::new();
    let direct: [Box<dyn Collector>; 8] = [
        Box::new(RAFT_PERSIST_SECONDS.clone()),
        Box::new(SINK_DIVERGED.clone()),
        Box::new(PASS_SECONDS.clone()),
        Box::new(PLACEMENTS.clone()),
        Box::new(PREEMPTIONS.clone()),
        Box::new(PROPOSAL_SECONDS.clone()),
        Box::new(LEADER_CHANGES.clone()),
        Box::new(WAIT_SECONDS.clone()),
    ];
    for c in direct {
        r.register(c).expect("unique metric names");
    }
    r.register(Box::new(StateCollector::new(replica, liveness)))
        .expect("unique metric names");
    r
}

struct Vecs {
    entitlement: GaugeVec,
    decayed: GaugeVec,
    factor: GaugeVec,
    gpu_seconds: CounterVec,
    normalised: CounterVec,
    energy: CounterVec,
    running_gpus: IntGaugeVec,
    pending_jobs: IntGaugeVec,
    suffered: CounterVec,
    caused: CounterVec,
    rejected: CounterVec,
    jobs: IntGaugeVec,
    gpu_allocated: IntGaugeVec,
    node_up: IntGaugeVec,
    heartbeat_age: GaugeVec,
    gpus: IntGauge,
    queue: IntGauge,
    jain: Gauge,
    policy_changes: IntGauge,
    is_leader: IntGauge,
    term: IntGauge,
    commit: IntGauge,
    applied: IntGauge,
}

struct StateCollector {
    replica: Replica,
    liveness: Arc<Liveness>,
    vecs: Mutex<Vecs>,
    descs: Vec<Desc>,
}

fn gv(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}
fn igv(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}
fn cv(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    CounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}
fn ig(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

impl StateCollector {
    fn new(replica: Replica, liveness: Arc<Liveness>) -> Self {
        let m = &["member"];
        let vecs = Vecs {
            entitlement: gv("coop_member_entitlement_ratio", "The member's entitlement: its fraction of the cluster by policy.", m),
            decayed: gv("coop_member_decayed_usage_gpu_seconds", "The member's usage in normalised GPU-seconds, decayed with the policy's half-life.", m),
            factor: gv("coop_member_fairshare_factor", "Fair-share factor 2^(-U/S): 1 unused, 0.5 at entitlement, towards 0 above.", m),
            gpu_seconds: cv("coop_member_gpu_seconds_total", "GPU-seconds billed to the member (ledger).", m),
            normalised: cv("coop_member_normalised_gpu_seconds_total", "GPU-seconds billed to the member, times the policy's GPU model weight.", m),
            energy: cv("coop_member_energy_joules_total", "Energy billed to the member (ledger).", m),
            running_gpus: igv("coop_member_running_gpus", "GPUs the member's running jobs hold.", m),
            pending_jobs: igv("coop_member_pending_jobs", "The member's jobs waiting to be placed.", m),
            suffered: cv("coop_member_preemptions_suffered_total", "Runs of the member's jobs that were preempted.", m),
            caused: cv("coop_member_preemptions_caused_total", "Runs of other members preempted for the member's jobs.", m),
            rejected: cv("coop_node_reports_rejected_total", "Reports of the node's agent that failed the plausibility checks (kept in the audit ledger, billed nothing).", &["node"]),
            jobs: igv("coop_jobs", "Jobs the scheduler holds in memory, by kind and state (finished ones for the policy's job_retention).", &["kind", "state"]),
            gpu_allocated: igv("coop_gpu_allocated", "1 when a job holds the GPU, 0 when it is free.", &["node", "gpu", "model"]),
            node_up: igv("coop_node_up", "1 while the node's agent is registered and heard from.", &["node", "owner"]),
            heartbeat_age: gv("coop_agent_heartbeat_age_seconds", "Seconds since this scheduler last heard from the node's agent.", &["node"]),
            gpus: ig("coop_cluster_gpus", "GPUs on nodes that are up."),
            queue: ig("coop_scheduler_queue_depth", "Jobs waiting to be placed."),
            jain: Gauge::new("coop_fairness_jain_index", "Jain's index of GPUs held over fair allocation (entitlement water-filled over members that want GPUs); 1 is perfectly fair.").expect("valid metric"),
            policy_changes: ig("coop_policy_changes", "Policy changes made so far."),
            is_leader: ig("coop_raft_is_leader", "1 when this scheduler is the leader."),
            term: ig("coop_raft_term", "Raft term seen by this scheduler."),
            commit: ig("coop_raft_commit_index", "Highest log index known to be committed."),
            applied: ig("coop_raft_applied_index", "Highest log index applied to this scheduler's state."),
        };
        let mut descs = Vec::new();
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(vecs.entitlement.clone()),
            Box::new(vecs.decayed.clone()),
            Box::new(vecs.factor.clone()),
            Box::new(vecs.gpu_seconds.clone()),
            Box::new(vecs.normalised.clone()),
            Box::new(vecs.energy.clone()),
            Box::new(vecs.running_gpus.clone()),
            Box::new(vecs.pending_jobs.clone()),
            Box::new(vecs.suffered.clone()),
            Box::new(vecs.caused.clone()),
            Box::new(vecs.rejected.clone()),
            Box::new(vecs.jobs.clone()),
            Box::new(vecs.gpu_allocated.clone()),
            Box::new(vecs.node_up.clone()),
            Box::new(vecs.heartbeat_age.clone()),
            Box::new(vecs.gpus.clone()),
            Box::new(vecs.queue.clone()),
            Box::new(vecs.jain.clone()),
            Box::new(vecs.policy_changes.clone()),
            Box::new(vecs.is_leader.clone()),
            Box::new(vecs.term.clone()),
            Box::new(vecs.commit.clone()),
            Box::new(vecs.applied.clone()),
        ];
        for c in &all {
            descs.extend(c.desc().into_iter().cloned());
        }
        Self {
            replica,
            liveness,
            vecs: Mutex::new(vecs),
            descs,
        }
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let v = self.vecs.lock().expect("metrics lock");
        let now = now_ms();
        let applied = *self.replica.applied().borrow();
        let state = self.replica.read();
        for g in [&v.entitlement, &v.decayed, &v.factor, &v.heartbeat_age] {
            g.reset();
        }
        for c in [
            &v.gpu_seconds,
            &v.normalised,
            &v.energy,
            &v.suffered,
            &v.caused,
            &v.rejected,
        ] {
            c.reset();
        }
        for (node, n) in &state.rejected_reports {
            v.rejected.with_label_values(&[node]).inc_by(*n as f64);
        }
        for g in [
            &v.running_gpus,
            &v.pending_jobs,
            &v.jobs,
            &v.gpu_allocated,
            &v.node_up,
        ] {
            g.reset();
        }
        let ent = entitlements(&state);
        let decayed = coop_core::fairshare::usage(&state, now);
        let factor = factors(&ent, &decayed);
        let running = running_gpus(&state);
        let mut pending: BTreeMap<&str, i64> = BTreeMap::new();
        for (_, id) in &state.queue {
            *pending.entry(state.jobs[id].member.as_str()).or_default() += 1;
        }
        // Billed totals and preemptions per member: all-time, kept by the
        // state as the ledger grows (jobs leave memory, counters must not drop).
        let mut jobs: BTreeMap<(JobKind, JobState), i64> = BTreeMap::new();
        for j in state.jobs.values() {
            *jobs.entry((j.spec.kind, j.state)).or_default() += 1;
        }
        for m in state.members.keys() {
            let l = &[m.as_str()];
            v.entitlement
                .with_label_values(l)
                .set(ent.get(m).copied().unwrap_or(0.0));
            // Decayed usage is kept in GPU-hours; Prometheus wants seconds.
            v.decayed
                .with_label_values(l)
                .set(decayed.get(m).copied().unwrap_or(0.0) * 3600.0);
            v.factor
                .with_label_values(l)
                .set(factor.get(m).copied().unwrap_or(0.0));
            let t = state.totals.get(m).cloned().unwrap_or_default();
            v.gpu_seconds
                .with_label_values(l)
                .inc_by(t.gpu_ms as f64 / 1000.0);
            v.normalised
                .with_label_values(l)
                .inc_by(t.weighted_gpu_ms as f64 / 1000.0);
            v.energy
                .with_label_values(l)
                .inc_by(t.energy_mj as f64 / 1000.0);
            v.running_gpus
                .with_label_values(l)
                .set(running.get(m).copied().unwrap_or(0) as i64);
            v.pending_jobs
                .with_label_values(l)
                .set(pending.get(m.as_str()).copied().unwrap_or(0));
            v.suffered
                .with_label_values(l)
                .inc_by(t.preemptions_suffered as f64);
            v.caused
                .with_label_values(l)
                .inc_by(t.preemptions_caused as f64);
        }
        for kind in [JobKind::Finetune, JobKind::Inference] {
            for st in [
                JobState::Pending,
                JobState::Running,
                JobState::Completed,
                JobState::Failed,
                JobState::Cancelled,
                JobState::Lost,
            ] {
                let n = jobs.get(&(kind, st)).copied().unwrap_or(0);
                v.jobs
                    .with_label_values(&[kind_name(kind), state_name(st)])
                    .set(n);
            }
        }
        for n in state.nodes.values() {
            v.node_up
                .with_label_values(&[n.name.as_str(), n.owner.as_str()])
                .set(n.up as i64);
            for g in &n.gpus {
                v.gpu_allocated
                    .with_label_values(&[n.name.as_str(), g.uuid.as_str(), g.model.as_str()])
                    .set(g.job.is_some() as i64);
            }
            if let Some(seen) = self.liveness.last_seen(&n.name) {
                v.heartbeat_age
                    .with_label_values(&[n.name.as_str()])
                    .set((now - seen).max(0) as f64 / 1000.0);
            }
        }
        let total = total_gpus(&state);
        v.gpus.set(total as i64);
        v.queue.set(state.queue.len() as i64);
        // Fairness now: GPUs held over each wanting member's fair allocation.
        let mut wanted: BTreeMap<String, f64> = BTreeMap::new();
        for j in state.jobs.values() {
            if matches!(j.state, JobState::Running | JobState::Pending) {
                *wanted.entry(j.member.clone()).or_default() += j.spec.gpus as f64;
            }
        }
        let fair = water_fill(total as f64, &wanted, &ent);
        let xs: Vec<f64> = fair
            .iter()
            .filter(|(_, f)| **f > 0.0)
            .map(|(m, f)| running.get(m).copied().unwrap_or(0) as f64 / f)
            .collect();
        v.jain.set(jain(&xs).unwrap_or(1.0));
        v.policy_changes.set(state.policy_log.len() as i64);
        // One scheduler until replication lands: it leads term 1.
        let status = self.replica.view().borrow().status.clone();
        v.is_leader
            .set(status.as_ref().is_some_and(|s| s.role == "leader") as i64);
        v.term.set(status.as_ref().map_or(0, |s| s.term) as i64);
        v.commit
            .set(status.as_ref().map_or(applied, |s| s.commit) as i64);
        v.applied.set(applied as i64);
        drop(state);
        let all: [&dyn Collector; 23] = [
            &v.entitlement,
            &v.decayed,
            &v.factor,
            &v.gpu_seconds,
            &v.normalised,
            &v.energy,
            &v.running_gpus,
            &v.pending_jobs,
            &v.suffered,
            &v.caused,
            &v.rejected,
            &v.jobs,
            &v.gpu_allocated,
            &v.node_up,
            &v.heartbeat_age,
            &v.gpus,
            &v.queue,
            &v.jain,
            &v.policy_changes,
            &v.is_leader,
            &v.term,
            &v.commit,
            &v.applied,
        ];
        all.iter().flat_map(|c| c.collect()).collect()
    }
}

fn kind_name(k: JobKind) -> &'static str {
    match k {
        JobKind::Finetune => "finetune",
        JobKind::Inference => "inference",
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Lost => "lost",
    }
}

/// Serves `GET /metrics` from `registry` on `addr`, in plain HTTP to anyone,
/// or as `guard` says (TLS, and a credential); returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    guard: Option<crate::metrics_access::Guard>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = crate::metrics_access::app(registry, guard.as_ref().map(|g| g.allow.clone()));
    tokio::spawn(async move {
        let served = match guard {
            Some(g) => {
                let tls = crate::metrics_access::TlsListener::new(listener, g.tls);
                axum::serve(tls, app).await
            }
            None => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
