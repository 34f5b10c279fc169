//! The accounting sink against a real PostgreSQL server started by the test
//! (Debian's binaries in /usr/lib/postgresql/*/bin): the ledger streamed in
//! order, resumed after the database and the scheduler are killed, verified
//! from the database, the statement views, and a tampered row caught.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    // The effective uid, from /proc (no extra nix features for one number).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Postgres {
    /// PostgreSQL refuses to run as root: as root, run it as `postgres`.
    fn cmd(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start() -> Option<Postgres> {
        let bin = pg_bin();
        let found = bin.is_some();
        if !found {
            let msg = "PostgreSQL server binaries are not in /usr/lib/postgresql (apt-get install postgresql)";
            assert!(std::env::var_os("COOP_REQUIRE_ALL").is_none(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        let pg = Postgres {
            bin: bin.unwrap(),
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
        };
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let out = pg
            .cmd("initdb")
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(pg.data())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.up();
        assert!(pg.psql("postgres", "CREATE DATABASE coop").status.success());
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Stops the server as a crash would (no shutdown checkpoint).
    fn crash(&self) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/coop", self.port)
    }

    fn psql(&self, db: &str, sql: &str) -> Output {
        Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .unwrap()
    }

    fn query(&self, sql: &str) -> String {
        let out = self.psql("coop", sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Waits until the database holds exactly the cluster's ledger.
fn wait_synced(c: &Cluster, pg: &Postgres) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let live = c.ok(&["audit", "export"]).lines().count();
        let out = pg.psql(
            "coop",
            "SELECT count(*), COALESCE(min(seq), 0), COALESCE(max(seq), 0) FROM ledger",
        );
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && got == format!("{live}|1|{live}") {
            return live;
        }
        assert!(
            Instant::now() < deadline,
            "the sink never caught up: {live} live, {got:?} in the database"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `$__timeFilter(col)` (a Grafana macro) as a filter that keeps every row.
fn regex_free_time_filter(sql: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find("$__timeFilter(") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let close = after.find(')').expect("macro closes");
        out.push_str("TRUE");
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

fn run_job(c: &Cluster, token: &str) -> String {
    let id = c.submit_as(token, &["--gpus", "2", "--", "sleep", "1"]);
    c.wait_final(&id);
    id
}

#[test]
fn the_ledger_streams_into_postgres_resumes_after_crashes_and_verifies() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.url();
    let extra = ["--usage-interval", "300ms", "--accounting-db", url.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_dev(dir.path(), &extra);
    let mut c = Cluster {
        addr: d.export("COOP_ADDR"),
        token: d.export("COOP_TOKEN"),
        ca: Some(d.export("COOP_CA")),
        dir,
        daemons: vec![],
    };
    let acme = c.add_member("acme");
    run_job(&c, &acme);
    let n = wait_synced(&c, &pg);
    let live = c.ok(&["audit", "verify"]);
    let from_db = c.ok(&["audit", "verify", "--db", &url]);
    let head = |s: &str| s.rsplit("head ").next().unwrap().trim().to_string();
    assert_eq!(head(&live), head(&from_db), "{live} / {from_db}");

    // The database crashes while work goes on; the sink catches up after.
    pg.crash();
    run_job(&c, &acme);
    c.ok(&[
        "policy",
        "set",
        "share.acme=2",
        "--reason",
        "while the database was down",
    ]);
    pg.up();
    let m = wait_synced(&c, &pg);
    assert!(m > n);

    // The scheduler is killed; started again, it resumes where the database is.
    d.kill9();
    let d2 = start_dev(c.dir.path(), &extra);
    c.addr = d2.export("COOP_ADDR");
    c.daemons.push(d2);
    run_job(&c, &acme);
    // A preemption, so that every kind of entry reaches the database.
    c.ok(&[
        "policy",
        "set",
        "share.default=0",
        "share.acme=1",
        "min_runtime=0s",
        "preempt_grace=1s",
        "--reason",
        "equal shares for acme and beta",
    ]);
    let beta = c.add_member("beta");
    let floods = c.flood(&acme, 4, 4);
    run_job(&c, &beta);
    c.cancel_all(&floods);
    let total = wait_synced(&c, &pg);
    assert!(total > m);
    assert!(
        c.ok(&["audit", "verify", "--db", &url])
            .starts_with("verified")
    );
    // In order, each entry once, and the same hashes as the cluster's.
    let hashes = pg.query("SELECT string_agg(hash, ',' ORDER BY seq) FROM ledger");
    let live: Vec<String> = c
        .ok(&["audit", "export"])
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["hash"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(hashes, live.join(","));

    // The statement view agrees with the cluster's statement.
    let month =
        humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..7].to_string();
    let st = c.json(&["usage", "statement", "--member", "acme", "--period", &month]);
    let view: f64 = pg
        .query("SELECT COALESCE(sum(gpu_hours), 0) FROM member_monthly_usage WHERE member = 'acme'")
        .parse()
        .unwrap();
    assert!(
        (view - st["gpu_hours"].as_f64().unwrap()).abs() < 1e-9,
        "{view} vs {st:#}"
    );
    assert_eq!(pg.query("SELECT count(*) FROM policy_history"), "2");
    assert_eq!(
        pg.query(
            "SELECT suffered || '/' || caused FROM member_monthly_preemptions WHERE member = 'acme'"
        ),
        "2/0"
    );

    // Every query of the auditor dashboard runs and returns rows (Grafana's
    // time filter stands for the whole ledger here).
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/auditor-ledger.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "${ledger}");
        assert!(p["description"].as_str().unwrap().len() > 20);
        for t in p["targets"].as_array().unwrap() {
            let sql = t["rawSql"].as_str().unwrap();
            let sql = regex_free_time_filter(sql);
            let rows = pg.query(&sql);
            assert!(!rows.is_empty(), "{}: {sql} returned nothing", p["title"]);
        }
    }

    // Someone edits a usage row in the database: verification names it.
    let seq = pg.query("SELECT min(seq) FROM ledger WHERE kind = 'usage'");
    let gpu_ms = pg.query(&format!(
        "SELECT entry->>'gpu_ms' FROM ledger WHERE seq = {seq}"
    ));
    pg.query(&format!(
        "UPDATE ledger SET record = replace(record, '\"gpu_ms\":{gpu_ms}', '\"gpu_ms\":1') WHERE seq = {seq}"
    ));
    let out = c.run(&["audit", "verify", "--db", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("entry {seq}:")), "{err}");
}

/// `coop_ledger_sink_diverged` as the scheduler's metrics endpoint shows it.
fn diverged_metric(c: &Cluster, metrics: &str) -> String {
    let (status, body) = https_get(metrics, "/metrics", c.ca.as_ref().unwrap(), Some(&c.token));
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("coop_ledger_sink_diverged "))
        .unwrap_or_else(|| panic!("no coop_ledger_sink_diverged in\n{body}"))
        .to_string()
}

/// Polls until `pred` holds.
fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !pred() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_sink_appends_nothing_onto_a_history_the_cluster_does_not_extend() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.url();
    // One cluster's ledger is in the database.
    let one = Cluster::dev(&["--accounting-db", &url]);
    one.add_member("acme");
    let held = wait_synced(&one, &pg);
    let hashes = || pg.query("SELECT string_agg(hash, ',' ORDER BY seq) FROM ledger");
    let before = hashes();
    drop(one);

    // A second cluster (or the first with its history rewritten) is pointed
    // at the same database, and its chain grows past what the database holds.
    let two = Cluster::dev(&["--accounting-db", &url, "--metrics", "127.0.0.1:0"]);
    let metrics = two.daemons[0].export("COOP_METRICS");
    for m in ["acme", "beta", "gamma"] {
        two.add_member(m);
    }
    assert!(two.ok(&["audit", "export"]).lines().count() > held);
    // The sink compared the database's last entry with its own entry of that
    // number, refused, and says which.
    let named = format!(
        "the database's ledger is not the cluster's: entry {held}: the database holds hash"
    );
    wait_for("the sink names the diverging entry", || {
        two.daemons[0].stderr().contains(&named)
    });
    assert_eq!(diverged_metric(&two, &metrics), "1");
    assert_eq!(hashes(), before, "nothing was appended");

    // Someone resolves it (here: the database is emptied): the sink streams
    // this cluster's ledger and the metric clears.
    pg.query("DELETE FROM ledger");
    two.add_member("epsilon");
    wait_synced(&two, &pg);
    wait_for("the metric clears", || {
        diverged_metric(&two, &metrics) == "0"
    });
    assert!(
        two.ok(&["audit", "verify", "--db", &url])
            .starts_with("verified")
    );
}
