//! Test harness: starts real `coop` processes on 127.0.0.1 and drives them
//! with the real CLI, as a user would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_coop");
/// How long anything in a test may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Fast failure detection for tests: 200 ms heartbeats, nodes down after 2 s.
pub const FAST: [&str; 4] = ["--heartbeat-interval", "200ms", "--node-timeout", "2s"];

/// The lines a child prints, as they come, read by a thread of their own.
fn line_reader(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A `coop` daemon whose stdout lines are read as they come and whose stderr
/// goes to a file that is printed if the test fails.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
    pub name: String,
}

impl Daemon {
    pub fn spawn(name: &str, dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        Self::spawn_program(BIN, name, dir, args, envs)
    }

    /// As `spawn`, through another program (e.g. `ip netns exec NS coop ...`).
    pub fn spawn_program(
        program: &str,
        name: &str,
        dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Daemon {
        let log = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("COOP_ADDR")
            .env_remove("COOP_TOKEN")
            .env_remove("COOP_CA")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning coop");
        let lines = line_reader(child.stdout.take().unwrap());
        Daemon {
            child,
            lines,
            log,
            name: name.into(),
        }
    }

    /// The value of the next `export NAME=value` line.
    pub fn export(&self, name: &str) -> String {
        let prefix = format!("export {name}=");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(&prefix) => return l[prefix.len()..].to_string(),
                Ok(_) => {}
                Err(_) => panic!("{} never printed {prefix}:\n{}", self.name, self.stderr()),
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            self.name,
            self.stderr()
        );
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first, so that an agent (or `coop dev`) stops its jobs: a
        // run survives its agent's SIGKILL by design (the next agent stops
        // it), and a test must not leave it behind. SIGKILL if that takes long.
        if let Ok(None) = self.child.try_wait() {
            // A test may have left it stopped (SIGSTOP). Never a panic here.
            let pid = nix::unistd::Pid::from_raw(self.pid());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.stderr();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- {} stderr (last lines) ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A running cluster and a client of it.
pub struct Cluster {
    /// The cluster CA's certificate, when the schedulers serve TLS.
    pub ca: Option<String>,
    // Daemons first: they are dropped (and their logs read) before the dir goes.
    pub daemons: Vec<Daemon>,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub token: String,
}

pub fn is_final(job: &Value) -> bool {
    matches!(
        job["state"].as_str(),
        Some("completed" | "failed" | "cancelled" | "lost")
    )
}

impl Cluster {
    /// `coop dev` in a fresh data dir.
    pub fn dev(extra: &[&str]) -> Cluster {
        Self::dev_env(extra, &[])
    }

    /// `coop dev` with `envs` in its environment.
    pub fn dev_env(extra: &[&str], envs: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let d = start_dev_env(dir.path(), extra, envs);
        let addr = d.export("COOP_ADDR");
        let token = d.export("COOP_TOKEN");
        let ca = (!extra.contains(&"--insecure")).then(|| d.export("COOP_CA"));
        Cluster {
            dir,
            addr,
            token,
            ca,
            daemons: vec![d],
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn run_as(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("COOP_ADDR", &self.addr)
            .env_remove("COOP_TOKEN");
        self.with_ca(&mut cmd);
        if let Some(t) = token {
            cmd.env("COOP_TOKEN", t);
        }
        cmd.output().unwrap()
    }

    /// Points `cmd` at this cluster's CA (or at none).
    pub fn with_ca(&self, cmd: &mut Command) {
        match &self.ca {
            Some(ca) => cmd.env("COOP_CA", ca),
            None => cmd.env_remove("COOP_CA"),
        };
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_as(Some(&self.token), args)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok_as(&self, token: &str, args: &[&str]) -> String {
        let out = self.run_as(Some(token), args);
        assert!(
            out.status.success(),
            "coop {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_as(&self.token.clone(), args)
    }

    pub fn json_as(&self, token: &str, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok_as(token, &a)).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        self.json_as(&self.token.clone(), args)
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails_as(&self, token: Option<&str>, args: &[&str]) -> String {
        let out = self.run_as(token, args);
        assert!(!out.status.success(), "coop {args:?} should have failed");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "error is not one line: {err}"
        );
        err
    }

    pub fn fails(&self, args: &[&str]) -> String {
        self.fails_as(Some(&self.token.clone()), args)
    }

    /// A one-time join token for machine `node` of `owner`, as the operator.
    pub fn enroll(&self, node: &str, owner: &str) -> String {
        self.json(&["node", "enroll", node, "--owner", owner])["join_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn add_member(&self, name: &str) -> String {
        self.json(&["member", "add", name])["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A member that votes: added, then its token rotated with its own, as
    /// a member does before its first vote (the operator saw the first one).
    #[allow(dead_code)] // not every test binary has members vote
    pub fn add_voter(&self, name: &str) -> String {
        let given = self.add_member(name);
        self.json_as(&given, &["member", "token", "rotate", name])["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn submit_as(&self, token: &str, args: &[&str]) -> String {
        let mut a = vec!["job", "submit"];
        a.extend(args);
        self.ok_as(token, &a).trim().to_string()
    }

    pub fn submit(&self, args: &[&str]) -> String {
        self.submit_as(&self.token.clone(), args)
    }

    pub fn job(&self, id: &str) -> Value {
        self.json(&["job", "get", id])
    }

    /// Follows `coop job watch` until the job satisfies `pred`.
    pub fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut cmd = Command::new(BIN);
        self.with_ca(&mut cmd);
        let mut child = cmd
            .args(["job", "watch", id, "--output", "json"])
            .env("COOP_ADDR", &self.addr)
            .env("COOP_TOKEN", &self.token)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let rx = line_reader(child.stdout.take().unwrap());
        let deadline = Instant::now() + PATIENCE;
        let mut last = Value::Null;
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    last = serde_json::from_str(&line).unwrap();
                    if pred(&last) {
                        break Some(last.clone());
                    }
                }
                Err(_) => break None,
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        found.unwrap_or_else(|| panic!("job {id} never became {what}; last seen: {last:#}"))
    }

    pub fn wait_final(&self, id: &str) -> Value {
        self.wait_job(id, "final", is_final)
    }

    /// Waits (polling `coop node list`) until `pred` holds for node `name`.
    pub fn wait_node(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let nodes = self.json(&["node", "list"]);
            if let Some(n) = nodes.as_array().unwrap().iter().find(|n| n["name"] == name)
                && pred(n)
            {
                return n.clone();
            }
            assert!(
                Instant::now() < deadline,
                "node {name} never became {what}: {nodes:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Output of a job's latest attempt.
    pub fn logs(&self, id: &str) -> String {
        self.ok(&["job", "logs", id])
    }

    /// Polls a job's output until it contains `needle`.
    pub fn wait_log(&self, id: &str, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = self.run(&["job", "logs", id]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never printed {needle:?}; got {text:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn start_dev(dir: &Path, extra: &[&str]) -> Daemon {
    start_dev_env(dir, extra, &[])
}

pub fn start_dev_env(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let mut args = vec!["dev", "--listen", "127.0.0.1:0", "--data-dir", data];
    args.extend(FAST);
    // The tests count on 4 simulated A100s, also on a machine with real GPUs.
    if !extra.contains(&"--gpus") {
        args.extend(["--gpus", "sim:4xA100-80GB"]);
    }
    args.extend(extra);
    Daemon::spawn("coop-dev", dir, &args, envs)
}

/// The number after "pid" in a job's output (`echo pid $$`).
/// The host pid of attempt `attempt` of job `id`: the process with the job's
/// id and attempt in its environment (a run in a PID namespace of its own
/// cannot tell its pid on the machine).
#[allow(dead_code)] // not every test binary looks for processes
pub fn job_pid(id: &str, attempt: u32) -> i32 {
    job_pid_with(id, attempt, &[])
}

/// [`job_pid`] of the process that also has the variables `more` (e.g.
/// `COOP_NODE_RANK=1`: one node's process of a multi-node run).
#[allow(dead_code)] // not every test binary looks for processes
pub fn job_pid_with(id: &str, attempt: u32, more: &[String]) -> i32 {
    let mut want = vec![
        format!("COOP_JOB_ID={id}"),
        format!("COOP_JOB_ATTEMPT={attempt}"),
    ];
    want.extend(more.iter().cloned());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|p| {
                std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|env| {
                    let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
                    want.iter().all(|w| vars.contains(&w.as_bytes()))
                })
            });
        if let Some(p) = found {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no process of attempt {attempt} of job {id}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    let t = humantime::parse_rfc3339(s).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn process_alive(pid: i32) -> bool {
    // A zombie is not alive: it has exited and waits for its parent.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until process `pid` is gone.
pub fn wait_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` from `addr` (host:port) over plain HTTP/1.1: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

/// `GET path` over TLS, the server verified against the CA in `ca` (a PEM
/// file), with `token` as the bearer credential if given.
pub fn https_get(addr: &str, path: &str, ca: &str, token: Option<&str>) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
    let name = rustls::pki_types::ServerName::try_from(host).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    // A server may close without close_notify once the response is sent.
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free port on 127.0.0.1 (bound, then released for a server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where an external program is, or why the test cannot run: missing tools
/// fail the test when COOP_REQUIRE_ALL is set (as `.ci/run` does) and are
/// reported and skipped otherwise, so `cargo test` works with the Rust
/// toolchain alone.
pub fn require_tool(program: &str, check: &[&str], install: &str) -> bool {
    let ok = Command::new(program)
        .args(check)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let msg = format!("{program} is not available ({install})");
        assert!(std::env::var_os("COOP_REQUIRE_ALL").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}; set COOP_REQUIRE_ALL=1 to make this a failure");
    }
    ok
}

/// Kills the child when dropped (a server a test started).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A job that checkpoints on SIGTERM: it prints "checkpoint" and exits 0.
pub const CHECKPOINTING: [&str; 3] = [
    "sh",
    "-c",
    "trap 'echo checkpoint; exit 0' TERM; echo working; sleep 600 & wait",
];

impl Cluster {
    /// Submits `n` preemptible 1-GPU checkpointing jobs as `token` and waits
    /// until the first `running` of them run.
    pub fn flood(&self, token: &str, n: usize, running: usize) -> Vec<String> {
        let mut args = vec!["--gpus", "1", "--preemptible", "--"];
        args.extend(CHECKPOINTING);
        let ids: Vec<String> = (0..n).map(|_| self.submit_as(token, &args)).collect();
        for id in &ids[..running] {
            self.wait_job(id, "running", |j| !j["started_at"].is_null());
        }
        ids
    }

    /// Cancels each job and waits for it to end.
    pub fn cancel_all(&self, ids: &[String]) {
        for id in ids {
            self.ok(&["job", "cancel", id]);
            self.wait_final(id);
        }
    }
}

/// Strong enough to be accepted (128 bits at least).
pub const OPERATOR: &str = "coop_0f5e1a7c3b9d24e68a1c5f7b3d9e2a4c6b8d0f1e3a5c7b9d";

/// A scheduler and agents as separate processes (`coop scheduler run`,
/// `coop agent run`), as on real machines.
pub struct Split {
    // The scheduler first: it is dropped (and its log read) before the dir goes.
    pub scheduler: Daemon,
    pub c: Cluster,
    /// How the scheduler was started, to start it again on the same address.
    args: Vec<String>,
}

impl Split {
    /// One scheduler on a free port, with `FAST` timing and `extra` flags.
    pub fn start(extra: &[&str]) -> Split {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("scheduler");
        let mut args: Vec<String> = [
            "scheduler",
            "run",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // FAST's timing, unless `extra` sets its own.
        for pair in FAST.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend(pair.iter().map(|s| s.to_string()));
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let s = spawn_scheduler(dir.path(), &args);
        let addr = s.export("COOP_ADDR");
        let ca = (!extra.contains(&"--insecure")).then(|| s.export("COOP_CA"));
        // Restarts listen where the agents and the CLI already look.
        let port = addr.rsplit(':').next().unwrap();
        args[5] = format!("127.0.0.1:{port}");
        Split {
            scheduler: s,
            c: Cluster {
                dir,
                addr,
                token: OPERATOR.into(),
                ca,
                daemons: vec![],
            },
            args,
        }
    }

    /// Starts the scheduler again (same data dir, same address) after it was
    /// stopped or killed; returns once it serves.
    pub fn restart_scheduler(&mut self) {
        self.scheduler = spawn_scheduler(self.c.dir.path(), &self.args);
        assert_eq!(self.scheduler.export("COOP_ADDR"), self.c.addr);
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.c.dir.path().join(format!("agent-{name}"))
    }

    pub fn agent(&self, name: &str, owner: &str, gpus: &str) -> Daemon {
        self.agent_with(name, owner, gpus, &[])
    }

    /// Enrolls machine `name` for `owner` (as the operator) and starts its
    /// agent with the join token; a restarted agent enrolls again.
    pub fn agent_with(&self, name: &str, owner: &str, gpus: &str, extra: &[&str]) -> Daemon {
        self.agent_env(name, owner, gpus, extra, &[])
    }

    /// As `agent_with`, with `envs` in the agent's environment.
    pub fn agent_env(
        &self,
        name: &str,
        owner: &str,
        gpus: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Daemon {
        let join = self.c.enroll(name, owner);
        let data = self.agent_dir(name);
        let mut args = vec![
            "agent",
            "run",
            "--scheduler",
            &self.c.addr,
            "--join",
            &join,
            "--name",
            name,
            "--gpus",
            gpus,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend(extra);
        let ca = self.c.ca.clone();
        let mut env = vec![];
        if let Some(ca) = &ca {
            env.push(("COOP_CA", ca.as_str()));
        }
        env.extend_from_slice(envs);
        Daemon::spawn(&format!("agent-{name}"), self.c.dir.path(), &args, &env)
    }

    /// `coop agent status` of agent `name`, as JSON.
    pub fn agent_status(&self, name: &str) -> Value {
        serde_json::from_str(&self.agent_status_as(name, "json")).unwrap()
    }

    /// `coop agent status` of agent `name` in an output format.
    pub fn agent_status_as(&self, name: &str, format: &str) -> String {
        let dir = self.agent_dir(name);
        let out = Command::new(BIN)
            .args(["agent", "status", "--output", format, "--data-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "coop agent status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Polls `coop agent status` until `pred` holds.
    pub fn wait_agent(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.agent_status(name);
            if pred(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent {name} never {what}: {status:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn spawn_scheduler(dir: &Path, args: &[String]) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::spawn(
        "scheduler",
        dir,
        &args,
        &[("COOP_OPERATOR_TOKEN", OPERATOR)],
    )
}

/// A TLS channel to `url`, the server verified as `tls` says; `None` when
/// no connection (or no handshake) comes about.
pub async fn tls_channel(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> Option<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .ok()
}

/// The built stand-in: cargo builds it as this package's dev-dependency.
pub fn standin_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvidia_ml") && n.ends_with(".so"))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("the stand-in NVML library (libnvidia_ml.so) is built with the tests")
}

/// Reads `read` every 100 ms until `ok` holds of what it read (within
/// `PATIENCE`); `what` names what is awaited if it never does.
pub fn poll<T: std::fmt::Debug>(
    what: &str,
    mut read: impl FnMut() -> T,
    ok: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = read();
        if ok(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "never {what}: {now:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
