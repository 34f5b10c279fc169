//! Checks that need no state: names, a registration's GPUs, a job's spec,
//! and whether a GPU fits a job.

use std::collections::BTreeMap;

use super::{Gpu, GpuInfo, JobSpec, Node, Rejection, invalid};

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The most GPUs of one model and memory size on `node` that fit `spec`:
/// placement gives a job GPUs of one kind.
pub fn largest_class(node: &Node, spec: &JobSpec) -> usize {
    let mut by: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for g in node.gpus.iter().filter(|g| gpu_fits(g, spec)) {
        *by.entry((g.model.as_str(), g.memory_mb)).or_default() += 1;
    }
    by.into_values().max().unwrap_or(0)
}

pub fn gpu_fits(gpu: &Gpu, spec: &JobSpec) -> bool {
    spec.gpu_model
        .as_ref()
        .is_none_or(|m| gpu.model.eq_ignore_ascii_case(m))
        && gpu.memory_mb >= spec.min_gpu_memory_mb
}

/// Most GPUs (or MIG instances) one node may offer.
pub const MAX_GPUS_PER_NODE: usize = 128;

/// No GPU has more memory than this (4 TiB), nor more throughput (100 PFLOPS,
/// 100 TB/s) than these: bounds that keep sums of them far from overflow.
const MAX_GPU_MEMORY_MB: u64 = 4 << 20;

const MAX_MEASURED: u64 = 100_000_000;

/// What a registration may say of one GPU.
pub(super) fn check_gpu(g: &GpuInfo) -> Result<(), Rejection> {
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if g.uuid.len() > 128 || !printable(&g.uuid) {
        return Err(invalid(
            "gpus",
            format!("GPU uuid {:?} is not a GPU uuid", g.uuid),
        ));
    }
    if g.model.is_empty() || g.model.len() > 64 || !printable(&g.model) {
        return Err(invalid(
            "gpus",
            format!("GPU model {:?} is not a model name", g.model),
        ));
    }
    if g.power_limit_w as u64 > super::plausible::MAX_GPU_POWER_W {
        return Err(invalid(
            "gpus",
            format!(
                "GPU {} claims a power limit of {} W",
                g.uuid, g.power_limit_w
            ),
        ));
    }
    if g.memory_mb > MAX_GPU_MEMORY_MB {
        return Err(invalid(
            "gpus",
            format!("GPU {} claims {} MB of memory", g.uuid, g.memory_mb),
        ));
    }
    if let Some(m) = g.measured
        && (m.fp16_gflops > MAX_MEASURED
            || m.bf16_gflops > MAX_MEASURED
            || m.memory_mb_per_s > MAX_MEASURED)
    {
        return Err(invalid(
            "gpus",
            format!("GPU {} claims an impossible measured throughput", g.uuid),
        ));
    }
    Ok(())
}

/// Most nodes one job may span.
pub const MAX_NODES_PER_JOB: usize = 64;

/// Most arguments a command may have.
pub const MAX_ARGS: usize = 4096;

/// Most environment variables a job may set.
pub const MAX_ENV_VARS: usize = 256;

/// Most bytes of command, arguments and environment together: every replica
/// keeps them, and every list answer carries them.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

pub const MAX_TIME_LIMIT_MS: u64 = 366 * 24 * 3600 * 1000;

/// Variables the agent sets for each run, which a job may not override.
pub fn reserved_env(key: &str) -> bool {
    // NVIDIA_* steer the container runtime's GPU hooks (devices, MIG
    // configuration): the agent's to set, like the job's identity.
    key.starts_with("COOP_")
        || key.starts_with("NVIDIA_")
        || matches!(
            key,
            "CUDA_VISIBLE_DEVICES" | "HIP_VISIBLE_DEVICES" | "ROCR_VISIBLE_DEVICES"
        )
}

/// Checks what can be checked without the state; the service layer calls it
/// before proposing so that bad input never reaches the log.
pub fn validate_spec(spec: &JobSpec) -> Result<(), Rejection> {
    if spec.gpus == 0 {
        return Err(invalid("gpus", "must be at least 1"));
    }
    if spec.command.is_empty() || spec.command[0].trim().is_empty() {
        return Err(invalid("command", "must not be empty"));
    }
    if spec.command.len() > MAX_ARGS {
        return Err(invalid(
            "command",
            format!("{} arguments; at most {MAX_ARGS}", spec.command.len()),
        ));
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("command", "an argument holds a NUL byte"));
    }
    if spec.env.len() > MAX_ENV_VARS {
        return Err(invalid(
            "env",
            format!("{} variables; at most {MAX_ENV_VARS}", spec.env.len()),
        ));
    }
    for (k, v) in &spec.env {
        let name_ok = k.len() <= 255
            && k.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(invalid(
                "env",
                format!("{k:?} is not a variable name (letters, digits, '_'; not first a digit)"),
            ));
        }
        if reserved_env(k) {
            return Err(invalid(
                "env",
                format!("{k} is set by the agent for each run (the job's GPUs and identity)"),
            ));
        }
        if v.contains('\0') {
            return Err(invalid("env", format!("the value of {k} holds a NUL byte")));
        }
    }
    let bytes: usize = spec.command.iter().map(|a| a.len() + 1).sum::<usize>()
        + spec
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if bytes > MAX_SPEC_BYTES {
        return Err(invalid(
            "command",
            format!(
                "the command, its arguments and its environment come to {bytes} bytes; at most {MAX_SPEC_BYTES}"
            ),
        ));
    }
    if spec.time_limit_ms > MAX_TIME_LIMIT_MS {
        return Err(invalid("time_limit", "at most 366 days"));
    }
    if spec.kill_grace_ms > crate::policy::MAX_GRACE_S * 1000 {
        return Err(invalid("kill_grace", "at most a day"));
    }
    if spec.gpu_model.as_ref().is_some_and(|m| m.len() > 64) {
        return Err(invalid("gpu_model", "at most 64 characters"));
    }
    if spec.gpu_model.as_ref().is_some_and(|m| m.trim().is_empty()) {
        return Err(invalid("gpu_model", "must not be blank"));
    }
    if spec.nodes as usize > MAX_NODES_PER_JOB {
        return Err(invalid(
            "nodes",
            format!("at most {MAX_NODES_PER_JOB} nodes"),
        ));
    }
    if spec.gpus_per_node > 0 && !spec.gpus.is_multiple_of(spec.gpus_per_node) {
        return Err(invalid(
            "gpus_per_node",
            format!(
                "{} GPUs do not split into parts of {} (gpus must be a multiple of gpus_per_node)",
                spec.gpus, spec.gpus_per_node
            ),
        ));
    }
    if spec.nodes > 0 && !spec.gpus.is_multiple_of(spec.nodes) {
        return Err(invalid(
            "nodes",
            format!(
                "{} GPUs do not split evenly over {} nodes (gpus must be a multiple of nodes)",
                spec.gpus, spec.nodes
            ),
        ));
    }
    if spec.nodes > 0
        && spec.gpus_per_node > 0
        && spec.nodes as u64 * spec.gpus_per_node as u64 != spec.gpus as u64
    {
        return Err(invalid(
            "gpus",
            format!(
                "{} nodes of {} GPUs are {}, not {}",
                spec.nodes,
                spec.gpus_per_node,
                spec.nodes as u64 * spec.gpus_per_node as u64,
                spec.gpus
            ),
        ));
    }
    if spec.gpus_per_node > 0 && (spec.gpus / spec.gpus_per_node) as usize > MAX_NODES_PER_JOB {
        return Err(invalid(
            "gpus_per_node",
            format!(
                "parts of {} GPUs need more than {MAX_NODES_PER_JOB} nodes",
                spec.gpus_per_node
            ),
        ));
    }
    if !(-1000..=1000).contains(&spec.priority) {
        return Err(invalid("priority", "must be from -1000 to 1000"));
    }
    let iso = &spec.isolation;
    if iso.cpu_millis > 1_000_000 {
        return Err(invalid("cpus", "must be at most 1000"));
    }
    if iso.cpu_millis > 0 && iso.cpu_millis < 10 {
        return Err(invalid("cpus", "must be at least 0.01"));
    }
    if iso.memory_mb > 0 && iso.memory_mb < 4 {
        return Err(invalid("memory", "must be at least 4 MiB"));
    }
    if let Some(image) = &iso.image
        && (image.is_empty()
            || image.len() > 512
            || image.starts_with('-')
            || image.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(invalid(
            "image",
            format!("{image:?} is not an image reference (e.g. docker.io/library/python:3.12)"),
        ));
    }
    Ok(())
}
