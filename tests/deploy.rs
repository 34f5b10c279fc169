//! The files in deploy/ work as shipped: the systemd units load
//! (`systemd-analyze verify`), their command lines parse with the real
//! binary, the scheduler's sandbox rates well, the sysusers file is valid,
//! the compose file passes what its services read and mounts what they
//! use, and coop's ports clear the usual ones of a Debian machine.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, require_tool};

const UNITS: [&str; 2] = ["coop-scheduler.service", "coop-agent.service"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The units in a temporary directory, starting the binary under test.
fn units_here() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for u in UNITS {
        let text = read(&format!("deploy/systemd/{u}")).replace("/usr/local/bin/coop", BIN);
        std::fs::write(dir.path().join(u), text).unwrap();
    }
    dir
}

#[test]
fn systemd_units_load_without_a_complaint() {
    if !require_tool("systemd-analyze", &["--version"], "apt-get install systemd") {
        return;
    }
    let dir = units_here();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(UNITS)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    // Unknown keys and bad values are only warnings to systemd: none allowed.
    assert!(err.trim().is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn the_scheduler_sandbox_rates_ok() {
    if !require_tool("systemd-analyze", &["--version"], "apt-get install systemd") {
        return;
    }
    let dir = units_here();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.path().join("coop-scheduler.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("coop-scheduler.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    // The README states 1.2 (systemd 252); anything above 2 is a regression.
    assert!(score <= 2.0, "exposure {score}:\n{text}");
}

#[test]
fn sysusers_file_creates_the_coop_user() {
    if !require_tool(
        "systemd-sysusers",
        &["--version"],
        "apt-get install systemd",
    ) {
        return;
    }
    let f = repo().join("deploy/systemd/coop.sysusers.conf");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("coop:")), "{passwd}");
    let unit = read("deploy/systemd/coop-scheduler.service");
    assert!(unit.contains("\nUser=coop\n") && !unit.contains("DynamicUser"));
}

/// The values of `#   KEY=VALUE` lines in a unit's comments: the example
/// environment file it documents.
fn documented_env(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            let ok =
                k.starts_with("COOP_") && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
            ok.then(|| {
                let v = v.split_whitespace().next().unwrap_or("");
                (k.to_string(), v.to_string())
            })
        })
        .collect()
}

/// A unit's ExecStart as the arguments systemd would pass (its `${VAR}`
/// from the documented environment, `%d`/`%S` from `dirs`).
fn exec_start(unit: &str, dirs: &Path) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    let line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let env = documented_env(unit);
    line.split_whitespace()
        .skip(1)
        .map(|w| {
            let mut w = w
                .replace("%d", &dirs.join("credentials").display().to_string())
                .replace("%S", &dirs.join("state").display().to_string());
            while let Some(start) = w.find("${") {
                let end = w[start..].find('}').unwrap() + start;
                let name = &w[start + 2..end];
                let v = env
                    .get(name)
                    .unwrap_or_else(|| panic!("${{{name}}} is not in the unit's example env"));
                w.replace_range(start..=end, v);
            }
            w
        })
        .collect()
}

#[test]
fn unit_command_lines_parse_with_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    for u in UNITS {
        let unit = read(&format!("deploy/systemd/{u}"));
        let args = exec_start(&unit, dir.path());
        // Every flag and value is checked as it is parsed; `--help` at the
        // end then stops before anything starts.
        let out = Command::new(BIN)
            .args(&args)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{u}: coop {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        for key in ["EnvironmentFile", "TimeoutStopSec", "StateDirectory"] {
            assert!(unit.contains(&format!("\n{key}=")), "{u} has no {key}");
        }
    }
    // The scheduler's env names a three-node cluster that includes itself.
    let env = documented_env(&read("deploy/systemd/coop-scheduler.service"));
    assert_eq!(env["COOP_PEERS"].split(',').count(), 3, "{env:?}");
    assert!(env["COOP_PEERS"].starts_with(&format!("{}=", env["COOP_ID"])));
    // The agent's: where the schedulers are, their CA and the join token.
    let env = documented_env(&read("deploy/systemd/coop-agent.service"));
    for k in ["COOP_ADDR", "COOP_CA", "COOP_JOIN_TOKEN"] {
        assert!(env.contains_key(k), "{k} in {env:?}");
    }
}

#[test]
fn compose_passes_what_its_services_read_and_mounts_what_they_use() {
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/compose.yml")).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let volumes = |svc: &str| -> Vec<(String, String)> {
        compose["services"][svc]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| {
                let v = v.as_str().unwrap();
                let mut p = v.split(':');
                (p.next().unwrap().to_string(), p.next().unwrap().to_string())
            })
            .collect()
    };
    for (name, _) in services {
        let name = name.as_str().unwrap();
        for (host, _) in volumes(name) {
            // Relative paths are the repository's own files.
            if !host.starts_with('/') {
                let p = repo().join("deploy").join(&host);
                assert!(p.exists(), "{name}: {host} ({}) is missing", p.display());
            }
        }
    }
    // Grafana's provisioning reads $VARS from its environment: compose must pass each.
    let grafana_env = compose["services"]["grafana"]["environment"]
        .as_mapping()
        .expect("grafana environment");
    for f in ["datasources/coop.yml", "dashboards/coop.yml"] {
        let text = read(&format!("deploy/grafana/provisioning/{f}"));
        for var in text.split('$').skip(1) {
            let var: String = var
                .trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                grafana_env.contains_key(var.as_str()),
                "{f} reads ${var}, which compose.yml does not pass to grafana"
            );
        }
    }
    // Prometheus's config reads files under /etc/coop: compose mounts them.
    let prom = read("deploy/prometheus/prometheus.yml");
    let mounted = volumes("prometheus");
    for needed in ["/etc/coop/ca.pem", "/etc/coop/auditor.token"] {
        assert!(prom.contains(needed));
        assert!(
            mounted
                .iter()
                .any(|(_, inside)| needed.starts_with(inside.as_str())),
            "{needed} is not mounted into prometheus: {mounted:?}"
        );
    }
    // Grafana's datasource points at the Prometheus compose starts.
    let listen = compose["services"]["prometheus"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--web.listen-address="))
        .expect("prometheus listen address")
        .to_string();
    let ds = read("deploy/grafana/provisioning/datasources/coop.yml");
    assert!(
        ds.contains(&format!("url: http://{listen}")),
        "{listen} vs {ds}"
    );
}

#[test]
fn coop_ports_clear_debians_prometheus_and_node_exporter() {
    let mut files = vec!["README.md".to_string()];
    for d in [
        "deploy",
        "deploy/systemd",
        "deploy/prometheus",
        "deploy/prometheus/targets",
    ] {
        for e in std::fs::read_dir(repo().join(d)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p.strip_prefix(repo()).unwrap().display().to_string());
            }
        }
    }
    files.push("deploy/grafana/provisioning/datasources/coop.yml".into());
    for f in &files {
        let text = read(f);
        for port in [":9090", ":9100"] {
            let used = text
                .match_indices(port)
                .any(|(i, _)| !text[i + port.len()..].starts_with(|c: char| c.is_ascii_digit()));
            assert!(
                !used,
                "{f} uses port {port}, taken by Debian's prometheus packages"
            );
        }
    }
    // The dev example's metrics address is the one the default targets scrape.
    let targets = read("deploy/prometheus/targets/local.json");
    let readme = read("README.md");
    let dev = readme
        .lines()
        .find_map(|l| l.strip_prefix("coop dev --metrics "))
        .and_then(|r| r.split_whitespace().next())
        .expect("README: coop dev --metrics ADDR");
    assert!(
        targets.contains(&format!("\"{dev}\"")),
        "{dev} vs {targets}"
    );
}
