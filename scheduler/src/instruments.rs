//! What this scheduler process counts as it happens: pass durations,
//! placements, proposal and persist latency, leader changes, waits. Every
//! layer may count here; `metrics` registers these with the figures it
//! computes from the replicated state.

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge};

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

/// Scheduling passes, by how long they took.
pub static PASS_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "coop_scheduler_pass_duration_seconds",
        "Time one scheduling pass took to decide placements and preemptions.",
        prometheus::exponential_buckets(0.0001, 4.0, 9).expect("buckets"),
    )
});
pub static PLACEMENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coop_scheduler_placements_total",
        "Placements committed by this scheduler.",
    )
});
pub static PREEMPTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coop_scheduler_preemptions_total",
        "Preemptions committed by this scheduler.",
    )
});
pub static PROPOSAL_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "coop_raft_proposal_duration_seconds",
        "Time from proposing a command to its being durable and applied.",
        prometheus::exponential_buckets(0.0005, 2.0, 14).expect("buckets"),
    )
});
pub static RAFT_PERSIST_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "coop_raft_persist_duration_seconds",
        "Time to make one Ready durable (one SQLite transaction with fsync).",
        prometheus::exponential_buckets(0.0001, 2.0, 16).expect("buckets"),
    )
});
pub static LEADER_CHANGES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coop_raft_leader_changes_total",
        "Times this node saw the cluster's leader change.",
    )
});
pub static WAIT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new(
            "coop_job_wait_seconds",
            "Time from submission to first placement, by member.",
        )
        .buckets(prometheus::exponential_buckets(1.0, 4.0, 10).expect("buckets")),
        &["member"],
    )
    .expect("valid metric")
});

/// 1 while the accounting database holds a ledger that the cluster's chain
/// does not extend: the sink then appends nothing (`sink`).
pub static SINK_DIVERGED: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::new(
        "coop_ledger_sink_diverged",
        "1 while the accounting database holds a ledger the cluster's chain does not extend (nothing is appended then), else 0.",
    )
    .expect("valid metric")
});
