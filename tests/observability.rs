//! Metrics, dashboards and alert rules, proven against a real Prometheus: a
//! `coop dev` cluster runs a two-member workload, Prometheus scrapes it with
//! the provisioned config, and every dashboard query and alert rule is
//! evaluated through Prometheus's HTTP API.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo("deploy/prometheus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    if !require_tool("promtool", &["--version"], "apt-get install prometheus") {
        return;
    }
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yml"], None);
    assert!(ok, "{out}");
}

/// What makes Grafana refuse a dashboard or draw it wrong.
fn check_dashboard(name: &str, d: &Value) -> Vec<(String, String)> {
    const TYPES: [&str; 8] = [
        "timeseries",
        "stat",
        "bargauge",
        "gauge",
        "table",
        "text",
        "heatmap",
        "barchart",
    ];
    assert!(
        d["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "{name}: uid"
    );
    assert!(
        d["title"].as_str().is_some_and(|u| !u.is_empty()),
        "{name}: title"
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "{name}: a Prometheus datasource variable"
    );
    let panels = d["panels"].as_array().unwrap();
    assert!(!panels.is_empty(), "{name}: panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut queries = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{name}: id of {title} repeats"
        );
        assert!(
            TYPES.contains(&p["type"].as_str().unwrap()),
            "{name}: type of {title}"
        );
        assert!(
            p["description"].as_str().is_some_and(|s| s.len() > 20),
            "{name}: {title} needs a description an auditor understands"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}: {title}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{name}: grid of {title}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{name}: {title} overlaps another panel"
                );
            }
        }
        let mut refs = BTreeSet::new();
        for t in p["targets"].as_array().unwrap() {
            assert!(
                refs.insert(t["refId"].as_str().unwrap().to_string()),
                "{name}: refIds"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{name}: {title}");
            queries.push((
                format!("{name}: {title}"),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    queries
}

struct Prometheus {
    _child: KillOnDrop,
    addr: String,
}

impl Prometheus {
    /// Prometheus with the provisioned config, the intervals shortened to 1 s,
    /// and one target: `metrics`.
    /// It scrapes over TLS with the cluster's `ca` and the auditor token in
    /// `dir/auditor.token`, as the provisioned config says.
    fn start(dir: &Path, metrics: &str, ca: &str) -> Prometheus {
        let conf = std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).unwrap();
        let token = dir.join("auditor.token");
        let conf = conf
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("/etc/coop/ca.pem", ca)
            .replace("/etc/coop/auditor.token", token.to_str().unwrap());
        std::fs::write(dir.join("prometheus.yml"), conf).unwrap();
        std::fs::copy(repo("deploy/prometheus/alerts.yml"), dir.join("alerts.yml")).unwrap();
        std::fs::create_dir_all(dir.join("targets")).unwrap();
        std::fs::write(
            dir.join("targets/test.json"),
            format!(r#"[{{"targets": ["{metrics}"], "labels": {{"role": "dev"}}}}]"#),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus {
            _child: KillOnDrop(child),
            addr,
        };
        p.wait("ready", || {
            std::net::TcpStream::connect(&p.addr).is_ok() && http_get(&p.addr, "/-/ready").0 == 200
        });
        p
    }

    fn wait(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !ok() {
            assert!(Instant::now() < deadline, "prometheus never became {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.addr, path);
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {status} {e}: {body}"));
        v
    }

    fn query(&self, expr: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", urlencode(expr)))
    }
}

#[test]
fn every_dashboard_panel_and_alert_rule_works_against_a_real_prometheus() {
    if !require_tool("prometheus", &["--version"], "apt-get install prometheus")
        || !require_tool("promtool", &["--version"], "apt-get install prometheus")
    {
        return;
    }
    let c = Cluster::dev(&["--metrics", "127.0.0.1:0", "--usage-interval", "300ms"]);
    let metrics = c.daemons[0].export("COOP_METRICS");

    // Two members: one floods with preemptible jobs, the other arrives later.
    let alpha = c.add_member("alpha");
    let beta = c.add_member("beta");
    c.ok(&[
        "policy",
        "set",
        "share.default=0",
        "min_runtime=0s",
        "preempt_grace=1s",
        "--reason",
        "observability test",
    ]);
    let short = c.submit_as(&alpha, &["--", "sleep", "1"]);
    c.wait_final(&short);
    c.flood(&alpha, 4, 4);
    let big = c.submit_as(&beta, &["--gpus", "2", "--", "sleep", "600"]);
    c.wait_job(&big, "running", |j| !j["started_at"].is_null());

    // The metrics show every member's usage: TLS, and the operator's or an
    // auditor's token only.
    let ca = c.ca.clone().unwrap();
    let auditor = c.json(&["auditor", "add", "prometheus"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(https_get(&metrics, "/metrics", &ca, None).0, 401);
    assert_eq!(https_get(&metrics, "/metrics", &ca, Some(&alpha)).0, 401);
    let plain = std::net::TcpStream::connect(&metrics).and_then(|mut s| {
        use std::io::{Read, Write};
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok(buf)
    });
    assert!(
        !String::from_utf8_lossy(&plain.unwrap_or_default()).contains("coop_"),
        "plain HTTP got metrics"
    );
    assert_eq!(https_get(&metrics, "/metrics", &ca, Some(&c.token)).0, 200);
    // The exposition passes promtool's lint.
    let (status, body) = https_get(&metrics, "/metrics", &ca, Some(&auditor));
    assert_eq!(status, 200);
    for name in [
        "coop_member_entitlement_ratio",
        "coop_member_fairshare_factor",
        "coop_member_gpu_seconds_total",
        "coop_member_energy_joules_total",
        "coop_job_wait_seconds_bucket",
        "coop_gpu_power_watts",
        "coop_agent_spool_backlog",
        "coop_scheduler_pass_duration_seconds_bucket",
        "coop_raft_applied_index",
        "coop_fairness_jain_index",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    let (ok, out) = promtool(&["check", "metrics"], Some(&body));
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("auditor.token"), &auditor).unwrap();
    let prom = Prometheus::start(dir.path(), &metrics, &ca);
    // Enough scrapes for rates over 30 s windows.
    prom.wait("scraping", || {
        let r = prom.query("count_over_time(coop_cluster_gpus[1m])");
        r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|n| n >= 6.0)
    });
    let up = prom.query("up");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up:#}");

    let mut checked = 0;
    for file in [
        "member-fairness.json",
        "cluster-operations.json",
        "energy.json",
    ] {
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(repo("dashboards").join(file)).unwrap())
                .unwrap();
        for (panel, expr) in check_dashboard(file, &d) {
            let q = prom.query(&expr.replace("$__rate_interval", "30s"));
            assert_eq!(q["status"], "success", "{panel}: {expr}: {q:#}");
            let result = q["data"]["result"].as_array().unwrap();
            assert!(!result.is_empty(), "{panel}: {expr} returned no data");
            checked += 1;
        }
        for a in d["annotations"]["list"].as_array().unwrap() {
            if let Some(expr) = a["expr"].as_str() {
                let q = prom.query(expr);
                assert_eq!(q["status"], "success", "{file}: annotation {expr}: {q:#}");
            }
        }
    }
    assert!(checked >= 30, "only {checked} queries");

    // Prometheus loaded every rule and evaluated each without error.
    let in_file = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml"))
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    prom.wait("evaluating the rules", || {
        let r = prom.api("/api/v1/rules");
        let rules: Vec<&Value> = r["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        rules.len() == in_file
            && rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            })
    });
    let r = prom.api("/api/v1/rules");
    for g in r["data"]["groups"].as_array().unwrap() {
        for rule in g["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule:#}");
        }
    }
    // The cluster is healthy and fair now: no alert fires (the starved-member
    // alert needs 30 minutes, the others a fault).
    let alerts = prom.api("/api/v1/alerts");
    let firing: Vec<&Value> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(firing.is_empty(), "{firing:#?}");

    // What the dashboards show agrees with the cluster: beta holds two GPUs.
    let held = prom.query("max by (member) (coop_member_running_gpus{member=\"beta\"})");
    assert_eq!(held["data"]["result"][0]["value"][1], "2", "{held:#}");
}
