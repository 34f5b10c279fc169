//! The agent's NVML path end to end, against the stand-in `libnvidia-ml.so.1`
//! (tests/nvml-standin) loaded through the normal loader path: discovery and
//! MIG, energy and utilisation in the ledger, health in the metrics and the
//! alert rules, a GPU lost mid-job, a board without an energy counter, and
//! NVML failing to start.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use nvidia_ml::scenario::{self, Device, MigDevice, Phase, Scenario};
use serde_json::Value;

const GIB: u64 = 1 << 30;
/// How often the agents here read their GPUs.
const READ_EVERY_MS: u64 = 100;

/// A directory holding the stand-in as `libnvidia-ml.so.1`, and the
/// scenario file it reads.
struct StandIn {
    dir: tempfile::TempDir,
}

impl StandIn {
    fn new(s: &Scenario) -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(standin_lib(), dir.path().join("libnvidia-ml.so.1")).unwrap();
        let me = StandIn { dir };
        me.set(s);
        me
    }

    fn scenario_path(&self) -> PathBuf {
        self.dir.path().join("scenario.json")
    }

    /// Rewrites the scenario (atomically): the library sees it at its next call.
    fn set(&self, s: &Scenario) {
        scenario::write(&self.scenario_path(), s).unwrap();
    }

    /// What a process needs in its environment to load the stand-in.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_LIBRARY_PATH", self.dir.path().display().to_string()),
            (
                scenario::ENV_VAR,
                self.scenario_path().display().to_string(),
            ),
        ]
    }
}

fn envs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A job's billed energy, in mJ.
fn millijoules(job: &Value) -> u64 {
    (job["energy_j"].as_f64().unwrap() * 1000.0).round() as u64
}

fn gpu(uuid: &str, name: &str, phases: Vec<Phase>) -> Device {
    Device {
        phases,
        ..Device::new(uuid, name, 80 * GIB)
    }
}

fn phase(for_ms: u64, utilization_pct: u32, power_w: u32) -> Phase {
    Phase {
        for_ms,
        utilization_pct,
        power_mw: power_w * 1000,
        memory_used_bytes: 10 * GIB,
        ..Phase::default()
    }
}

fn scenario_of(devices: Vec<Device>) -> Scenario {
    Scenario {
        start_unix_ms: Some(scenario::now_unix_ms()),
        devices,
        ..Scenario::default()
    }
}

/// A scheduler, member acme, and one agent on the stand-in's GPUs.
fn cluster(standin: &StandIn, extra: &[&str]) -> (Split, Daemon) {
    let s = Split::start(&["--usage-interval", "300ms"]);
    s.c.add_member("acme");
    let agent = agent(&s, standin, extra);
    (s, agent)
}

/// Agent `box` of acme on the stand-in's GPUs, once it is connected.
fn agent(s: &Split, standin: &StandIn, extra: &[&str]) -> Daemon {
    let interval = format!("{READ_EVERY_MS}ms");
    let mut args = vec!["--no-probe", "--telemetry-interval", interval.as_str()];
    args.extend(extra);
    let env = standin.env();
    let agent = s.agent_env("box", "acme", "nvml", &args, &envs(&env));
    s.c.wait_node("box", "up", |n| {
        n["state"] == "up" && n["connected"] == true
    });
    agent
}

fn uuids(node: &Value) -> Vec<String> {
    node["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_agent_and_coop_dev_offer_the_scenarios_gpus_and_mig_instances() {
    let mut a100 = Device::new("GPU-a100-0", "NVIDIA A100-SXM4-80GB", 80 * GIB);
    a100.mig = vec![
        MigDevice {
            uuid: "MIG-a100-0-slot0".into(),
            name: "NVIDIA A100-SXM4-80GB MIG 3g.40gb".into(),
            memory_total_bytes: 40 * GIB,
            memory_used_bytes: 0,
        },
        MigDevice {
            uuid: "MIG-a100-0-slot1".into(),
            name: "NVIDIA A100-SXM4-80GB MIG 1g.10gb".into(),
            memory_total_bytes: 10 * GIB,
            memory_used_bytes: 0,
        },
    ];
    let h100 = Device {
        power_limit_mw: 650_000,
        ..Device::new("GPU-h100-1", "NVIDIA H100 80GB HBM3", 80 * GIB)
    };
    let standin = StandIn::new(&Scenario {
        devices: vec![h100, a100],
        ..Scenario::default()
    });
    let (s, agent) = cluster(&standin, &[]);
    let node = s.c.wait_node("box", "up", |n| n["state"] == "up");
    // A GPU in MIG mode is offered as its instances, each by its own UUID.
    assert_eq!(
        uuids(&node),
        ["GPU-h100-1", "MIG-a100-0-slot0", "MIG-a100-0-slot1"]
    );
    let gpus = node["gpus"].as_array().unwrap();
    let models: Vec<&str> = gpus.iter().map(|g| g["model"].as_str().unwrap()).collect();
    assert_eq!(
        models,
        [
            "H100-80GB-HBM3",
            "A100-SXM4-80GB-MIG-3g.40gb",
            "A100-SXM4-80GB-MIG-1g.10gb"
        ]
    );
    let memory: Vec<u64> = gpus
        .iter()
        .map(|g| g["memory_mb"].as_u64().unwrap())
        .collect();
    assert_eq!(memory, [80 * 1024, 40 * 1024, 10 * 1024]);
    assert!(
        agent.stderr().contains("driver 550.54.15, CUDA 12.4"),
        "{}",
        agent.stderr()
    );
    // A job may ask for a MIG instance by its model, and gets exactly it.
    let id = s.c.submit(&[
        "--member",
        "acme",
        "--gpu-model",
        "A100-SXM4-80GB-MIG-1g.10gb",
        "--",
        "sh",
        "-c",
        "echo $CUDA_VISIBLE_DEVICES",
    ]);
    let job = s.c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job:#}");
    assert_eq!(s.c.logs(&id).trim(), "MIG-a100-0-slot1");

    // `coop dev` takes the real GPUs where a driver answers.
    let env = standin.env();
    let dev = Cluster::dev_env(&["--gpus", "auto"], &envs(&env));
    let nodes = dev.json(&["node", "list"]);
    assert_eq!(
        uuids(&nodes[0]),
        ["GPU-h100-1", "MIG-a100-0-slot0", "MIG-a100-0-slot1"]
    );
}

/// The mean of a device's utilisation over `[from, to]`, as the scenario
/// says it (1 ms steps).
fn mean_utilization(d: &Device, start: u64, from: u64, to: u64) -> f64 {
    let sum: u64 = (from..to)
        .map(|t| scenario::phase_at(d, start, t).utilization_pct as u64)
        .sum();
    sum as f64 / (to - from) as f64
}

#[test]
fn a_jobs_energy_and_utilisation_in_the_ledger_are_the_scenarios_counters() {
    // Readings that change over time: 40% at 200 W, then 90% at 450 W.
    let phases = vec![phase(400, 40, 200), phase(400, 90, 450)];
    let s0 = scenario_of(vec![
        gpu("GPU-e-0", "NVIDIA H100 80GB HBM3", phases.clone()),
        gpu("GPU-e-1", "NVIDIA H100 80GB HBM3", phases),
    ]);
    let standin = StandIn::new(&s0);
    let (s, _agent) = cluster(&standin, &[]);
    let id =
        s.c.submit(&["--member", "acme", "--gpus", "2", "--", "sleep", "2"]);
    let job = s.c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job:#}");
    let (from, to) = (
        ms(&job["started_at"]) as u64,
        ms(&job["finished_at"]) as u64,
    );
    let start = s0.start_unix_ms.unwrap();
    let expected: u64 = s0
        .devices
        .iter()
        .map(|d| scenario::energy_mj(d, start, to) - scenario::energy_mj(d, start, from))
        .sum();
    let billed = millijoules(&job);
    // Within one reading of both GPUs at their highest draw.
    let one_reading = 2 * 450 * READ_EVERY_MS;
    assert!(
        billed.abs_diff(expected) <= one_reading,
        "billed {billed} mJ, the counters say {expected} mJ over {from}..{to}"
    );
    // The ledger's usage entries add up to the same.
    let ledger: u64 =
        s.c.ok(&["audit", "export"])
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["kind"] == "usage" && l["job"] == id.as_str())
            .map(|l| l["energy_mj"].as_u64().unwrap())
            .sum();
    assert_eq!(ledger, billed);
    // Utilisation is the mean of the readings: the scenario's mean over the
    // run, within a reading's share of the run at each end.
    let want = mean_utilization(&s0.devices[0], start, from, to);
    let got = job["gpu_utilization_pct"].as_f64().unwrap();
    let slack = 100.0 * 2.0 * READ_EVERY_MS as f64 / (to - from) as f64;
    assert!(
        (got - want).abs() <= slack,
        "utilisation {got}%, the scenario's mean over the run is {want}%"
    );
}

#[test]
fn a_board_without_an_energy_counter_is_billed_by_its_integrated_power() {
    let mut old = gpu(
        "GPU-old-0",
        "Tesla V100-SXM2-32GB",
        vec![phase(1000, 100, 250)],
    );
    old.energy_counter = false;
    old.memory_total_bytes = 32 * GIB;
    let standin = StandIn::new(&scenario_of(vec![old]));
    let (s, _agent) = cluster(&standin, &[]);
    let id = s.c.submit(&["--member", "acme", "--", "sleep", "1.5"]);
    let job = s.c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job:#}");
    let secs = (ms(&job["finished_at"]) - ms(&job["started_at"])) as u64;
    // 250 W for the run's length, within one reading.
    let expected = 250 * secs;
    let billed = millijoules(&job);
    assert!(
        billed.abs_diff(expected) <= 250 * READ_EVERY_MS,
        "billed {billed} mJ for {secs} ms at 250 W ({expected} mJ)"
    );
}

/// The agent's metrics page.
fn scrape(addr: &str) -> String {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The sample lines of `name` on the page whose labels include all of `labels`.
fn samples<'a>(page: &'a str, name: &str, labels: &[&str]) -> Vec<&'a str> {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .collect()
}

fn wait_metrics(addr: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    poll(
        &format!("metrics showing {what}"),
        || scrape(addr),
        |p| pred(p),
    )
}

/// `series 1` for each line: a promtool input series held for 10 minutes.
fn held_series(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let v = value.trim();
            format!(
                "      - series: '{series}'\n        values: '{v} {v} {v} {v} {v} {v} {v} {v} {v} {v} {v}'\n"
            )
        })
        .collect()
}

#[test]
fn throttling_ecc_and_xid_errors_show_in_the_metrics_and_fire_the_alerts() {
    let promtool = require_tool("promtool", &["--version"], "apt-get install prometheus");
    let hot = Phase {
        temperature_c: 91,
        // HW thermal slowdown (NVML's clocks-event reason bit 0x40).
        throttle_reasons: 0x40,
        ..phase(1000, 100, 300)
    };
    let failing = Phase {
        ecc_uncorrected: 2,
        ..phase(1000, 100, 300)
    };
    let fine = phase(1000, 50, 200);
    let mut s0 = scenario_of(vec![
        gpu("GPU-hot", "NVIDIA H100 80GB HBM3", vec![hot]),
        gpu("GPU-ecc", "NVIDIA H100 80GB HBM3", vec![failing]),
        gpu("GPU-fine", "NVIDIA H100 80GB HBM3", vec![fine]),
    ]);
    let standin = StandIn::new(&s0);
    let port = free_port().to_string();
    let metrics = format!("127.0.0.1:{port}");
    let (_s, _agent) = cluster(&standin, &["--metrics", &metrics]);
    // An XID 48 (double-bit ECC error) arrives while the agent runs.
    s0.devices[1].xids.push(48);
    standin.set(&s0);
    let page = wait_metrics(&metrics, "the XID", |p| {
        !samples(
            p,
            "coop_gpu_xid_errors_total",
            &["gpu=\"GPU-ecc\"", "xid=\"48\""],
        )
        .is_empty()
    });
    let one = |name: &str, labels: &[&str]| -> f64 {
        let s = samples(&page, name, labels);
        assert_eq!(s.len(), 1, "{name} {labels:?}:\n{page}");
        s[0].rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    let hot_gpu = "gpu=\"GPU-hot\"";
    assert_eq!(
        one("coop_gpu_throttled", &[hot_gpu, "reason=\"hw_thermal\""]),
        1.0
    );
    assert_eq!(
        one("coop_gpu_throttled", &[hot_gpu, "reason=\"hw_slowdown\""]),
        0.0
    );
    assert_eq!(one("coop_gpu_temperature_celsius", &[hot_gpu]), 91.0);
    assert_eq!(one("coop_gpu_healthy", &[hot_gpu]), 0.0);
    assert_eq!(
        one("coop_gpu_ecc_uncorrected_errors", &["gpu=\"GPU-ecc\""]),
        2.0
    );
    assert_eq!(one("coop_gpu_healthy", &["gpu=\"GPU-ecc\""]), 0.0);
    assert_eq!(one("coop_gpu_xid_errors_total", &["xid=\"48\""]), 1.0);
    assert_eq!(one("coop_gpu_healthy", &["gpu=\"GPU-fine\""]), 1.0);
    assert_eq!(
        one("coop_gpu_utilization_ratio", &["gpu=\"GPU-fine\""]),
        0.5
    );
    if !promtool {
        return;
    }
    // The alert rules, fed exactly these series as Prometheus would scrape
    // them (held for ten minutes), fire for the GPUs in trouble only.
    let mut fed: Vec<&str> = Vec::new();
    for name in [
        "coop_gpu_throttled",
        "coop_gpu_ecc_uncorrected_errors",
        "coop_gpu_healthy",
        "coop_gpu_xid_errors_total",
    ] {
        fed.extend(samples(&page, name, &[]));
    }
    let node = "node: box, model: H100-80GB-HBM3";
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let test = format!(
        "rule_files: ['{}']\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}    alert_rule_test:\n\
         \x20     - eval_time: 6m\n        alertname: CoopGpuThrottled\n        exp_alerts:\n          - exp_labels: {{severity: warning, {node}, gpu: GPU-hot, reason: hw_thermal}}\n            exp_annotations:\n              summary: \"GPU GPU-hot on box is slowed down by the hardware (hw_thermal)\"\n\
         \x20     - eval_time: 6m\n        alertname: CoopGpuEccErrors\n        exp_alerts:\n          - exp_labels: {{severity: critical, {node}, gpu: GPU-ecc}}\n            exp_annotations:\n              summary: \"GPU GPU-ecc on box has 2 uncorrected ECC errors\"\n\
         \x20     - eval_time: 6m\n        alertname: CoopGpuXidError\n        exp_alerts:\n          - exp_labels: {{severity: critical, {node}, gpu: GPU-ecc, xid: \"48\"}}\n            exp_annotations:\n              summary: \"GPU GPU-ecc on box reported XID 48\"\n\
         \x20     - eval_time: 6m\n        alertname: CoopGpuUnhealthy\n        exp_alerts:\n          - exp_labels: {{severity: critical, {node}, gpu: GPU-hot}}\n            exp_annotations:\n              summary: \"GPU GPU-hot on box fails its health checks\"\n          - exp_labels: {{severity: critical, {node}, gpu: GPU-ecc}}\n            exp_annotations:\n              summary: \"GPU GPU-ecc on box fails its health checks\"\n",
        rules.display(),
        held_series(&fed),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scraped_test.yml");
    std::fs::write(&file, &test).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_gpu_lost_mid_job_ends_its_run_lost_billed_to_its_last_reading() {
    let steady = vec![phase(1000, 100, 250)];
    let mut s0 = scenario_of(
        (0..3)
            .map(|i| {
                gpu(
                    &format!("GPU-l-{i}"),
                    "NVIDIA H100 80GB HBM3",
                    steady.clone(),
                )
            })
            .collect(),
    );
    let standin = StandIn::new(&s0);
    let port = free_port().to_string();
    let metrics = format!("127.0.0.1:{port}");
    let (s, mut first) = cluster(&standin, &["--metrics", &metrics]);
    let c = &s.c;
    // Two GPUs, one of which is lost. It ignores SIGTERM: were it billed to
    // its kill, that would be 5 s on, on both GPUs.
    let id = c.submit(&[
        "--member",
        "acme",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo started; while :; do sleep 0.1; done",
    ]);
    c.wait_log(&id, "started");
    let job = c.wait_job(&id, "running", |j| j["state"] == "running");
    let started = ms(&job["started_at"]) as u64;
    let held = job["gpus"][0].as_str().unwrap().to_string();
    let i = s0.devices.iter().position(|d| d.uuid == held).unwrap();
    let lost_at = scenario::now_unix_ms();
    s0.devices[i].lost = true;
    standin.set(&s0);
    // The node offers the other GPUs only, and the job runs again there.
    let node = c.wait_node("box", "one GPU fewer", |n| {
        n["gpus"].as_array().unwrap().len() == 2
    });
    let others: Vec<String> = s0
        .devices
        .iter()
        .filter(|d| d.uuid != held)
        .map(|d| d.uuid.clone())
        .collect();
    assert_eq!(uuids(&node), others);
    let job = c.wait_job(&id, "running again", |j| {
        j["state"] == "running" && j["attempts"] == 2
    });
    let mut again: Vec<String> = job["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    again.sort();
    assert_eq!(again, others);
    // The first run is billed up to the lost GPU's last reading, no further,
    // on both its GPUs: time and energy.
    let usage: Vec<Value> = c
        .ok(&["audit", "export"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["kind"] == "usage" && l["job"] == id.as_str() && l["attempt"] == 1)
        .collect();
    let gpu_ms: u64 = usage.iter().map(|u| u["gpu_ms"].as_u64().unwrap()).sum();
    let energy: u64 = usage.iter().map(|u| u["energy_mj"].as_u64().unwrap()).sum();
    let ran = 2 * (lost_at - started);
    let slack = 2 * 2 * READ_EVERY_MS;
    assert!(
        gpu_ms + slack >= ran && gpu_ms <= ran + slack,
        "attempt 1 billed {gpu_ms} GPU-ms; the GPU was lost {ran} GPU-ms after it started: {usage:#?}"
    );
    // 250 W per GPU up to the last reading, within a reading.
    assert!(
        energy.abs_diff(250 * gpu_ms) <= 250 * slack,
        "attempt 1 billed {energy} mJ for {gpu_ms} GPU-ms at 250 W: {usage:#?}"
    );
    let page = scrape(&metrics);
    let lost = samples(&page, "coop_gpu_lost", &[&format!("gpu=\"{held}\"")]);
    assert_eq!(lost.len(), 1, "{page}");
    assert!(lost[0].ends_with(" 1"), "{page}");
    c.ok(&["job", "cancel", &id]);
    c.wait_final(&id);
    // An agent started while the GPU is still lost offers the others.
    first.stop();
    c.wait_node("box", "down", |n| n["state"] == "down");
    let _second = agent(&s, &standin, &[]);
    let node = c.wait_node("box", "up", |n| n["state"] == "up");
    assert_eq!(uuids(&node), others);
}

#[test]
fn an_xid_79_takes_the_gpu_out_of_the_offer() {
    let mut s0 = scenario_of(vec![
        gpu("GPU-x-0", "NVIDIA H100 80GB HBM3", vec![phase(1000, 0, 60)]),
        gpu("GPU-x-1", "NVIDIA H100 80GB HBM3", vec![phase(1000, 0, 60)]),
    ]);
    let standin = StandIn::new(&s0);
    let (s, _agent) = cluster(&standin, &[]);
    // The driver says GPU-x-1 fell off the bus; NVML still answers for it.
    s0.devices[1].xids.push(79);
    standin.set(&s0);
    let node = s.c.wait_node("box", "one GPU fewer", |n| {
        n["gpus"].as_array().unwrap().len() == 1
    });
    assert_eq!(uuids(&node), ["GPU-x-0"]);
}

/// NVML failing to start, as nvmlInit documents it can: a clear error that
/// names the cause, never a panic.
#[test]
fn nvml_failing_to_start_is_a_clear_error_naming_the_cause() {
    let cases = [
        (9, "Driver Not Loaded", "kernel driver is not loaded"),
        (4, "No Permission", "may not open the GPUs"),
        (18, "RM version mismatch", "versions differ"),
        (999, "unknown", "dmesg"),
    ];
    for (code, _nvml_says, advice) in cases {
        let standin = StandIn::new(&Scenario {
            init_error: Some(code),
            ..Scenario::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_coop"))
            .args(["dev", "--gpus", "nvml", "--data-dir"])
            .arg(dir.path())
            .envs(standin.env())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "code {code}: {err}");
        assert!(!err.contains("panicked"), "code {code}: {err}");
        assert!(err.contains("gpus: cannot use NVML"), "code {code}: {err}");
        assert!(err.contains(advice), "code {code}: {err}");
    }
    // No library at all.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coop"))
        .args(["dev", "--gpus", "nvml", "--data-dir"])
        .arg(empty.path())
        .env("LD_LIBRARY_PATH", empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // (A machine with a real driver finds it elsewhere: nothing to check there.)
    if !Path::new("/dev/nvidiactl").exists() {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("install the NVIDIA driver"), "{err}");
    }
}
