//! What a scheduler and the CLI do when things go wrong around them: an
//! address that accepts connections and never answers, a scheduler stopped
//! with SIGSTOP, a leader cut off from its peers by a network partition
//! (network namespaces), SIGTERM with agents and watchers connected, and a
//! second process started on a data dir in use.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Accepts TCP connections and never answers: a hung process, or a port a
/// firewall swallows after the handshake. Lives as long as the test.
fn black_hole() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let accept = l.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in accept.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
    });
    (l, addr)
}

/// Runs `coop` with these addresses; returns its output and how long it took.
fn timed(c: &Cluster, addr: &str, args: &[&str]) -> (Output, Duration) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("COOP_ADDR", addr)
        .env("COOP_TOKEN", &c.token);
    c.with_ca(&mut cmd);
    let start = Instant::now();
    let out = cmd.output().unwrap();
    (out, start.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_silent_address_is_given_up_after_the_timeout_and_the_next_one_answers() {
    let c = Cluster::dev(&[]);
    let (_hole, hole) = black_hole();
    let both = format!("{hole},{}", c.addr);

    // A read, and a submission (idempotent by its request id), go on to the
    // scheduler that answers.
    let (out, _) = timed(&c, &both, &["job", "list", "--timeout", "2s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (out, _) = timed(
        &c,
        &both,
        &[
            "job",
            "submit",
            "--timeout",
            "2s",
            "--gpus",
            "1",
            "--",
            "true",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // Alone, the silent address is an error that names it and what timed
    // out, after the timeout and not never.
    let (out, took) = timed(&c, &hole, &["job", "list", "--timeout", "2s"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&hole), "{err}");
    assert!(err.contains("within 2s"), "{err}");
    assert!(took < PATIENCE, "job list waited {took:?}");

    // A bare number is not a timeout.
    let (out, _) = timed(&c, &c.addr, &["job", "list", "--timeout", "20"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("timeout"), "{}", stderr(&out));
}

#[test]
fn a_change_that_timed_out_is_not_sent_again_and_the_error_says_it_may_have_happened() {
    // In plain text the connection is made at once (no TLS handshake to
    // wait for): the call itself is what goes unanswered.
    let c = Cluster::dev(&["--insecure"]);
    let (_hole, hole) = black_hole();
    let addr = format!("http://{hole},{}", c.addr);
    let (out, _) = timed(&c, &addr, &["member", "add", "acme", "--timeout", "2s"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "member add went through: {err}");
    assert!(
        err.contains("may or may not have been carried out"),
        "{err}"
    );
    // It was not sent to the scheduler that answers.
    let members = c.json(&["member", "list"]);
    assert!(
        !members.to_string().contains("acme"),
        "sent again: {members}"
    );
}

#[test]
fn a_second_scheduler_on_a_data_dir_in_use_exits_at_once_naming_the_first() {
    let s = Split::start(&[]);
    let data = s.c.dir.path().join("scheduler");
    let out = Command::new(BIN)
        .args(["scheduler", "run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("COOP_OPERATOR_TOKEN", OPERATOR)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "in use by another scheduler (pid {})",
            s.scheduler.pid()
        )),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it started: {:?}", out.stdout);
    // The first one goes on.
    s.c.ok(&["cluster", "status"]);
}

#[test]
fn a_second_dev_on_a_dir_in_use_starts_nothing() {
    let c = Cluster::dev(&[]);
    let data = c.data_dir();
    let out = Command::new(BIN)
        .args(["dev", "--listen", "127.0.0.1:0", "--gpus", "sim:1xT4-16GB"])
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is in use by another coop dev (pid "), "{err}");
    assert!(out.stdout.is_empty(), "it started: {:?}", out.stdout);
    // A scheduler by hand on its scheduler dir is refused as well.
    let out = Command::new(BIN)
        .args(["scheduler", "run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.join("scheduler"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another scheduler"),
        "{}",
        stderr(&out)
    );
    c.ok(&["job", "list"]);
}

#[test]
fn sigterm_stops_a_scheduler_with_an_agent_and_a_watcher_connected() {
    let mut s = Split::start(&[]);
    s.c.add_member("acme");
    let _agent = s.agent("box", "acme", "sim:1xT4-16GB");
    s.c.wait_node("box", "up", |n| n["state"] == "up");
    let id =
        s.c.submit(&["--member", "acme", "--gpus", "1", "--", "sleep", "600"]);
    s.c.wait_job(&id, "running", |j| j["state"] == "running");
    // A client following the job: a stream that never ends by itself.
    let mut watch = Command::new(BIN);
    watch
        .args(["job", "watch", &id])
        .env("COOP_ADDR", &s.c.addr)
        .env("COOP_TOKEN", &s.c.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    s.c.with_ca(&mut watch);
    let mut watch = KillOnDrop(watch.spawn().unwrap());
    // Its first line (the job as it is) says the stream is open.
    let mut first = [0u8; 1];
    watch
        .0
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();

    let stopped_at = Instant::now();
    s.scheduler.signal(Signal::SIGTERM);
    let deadline = stopped_at + PATIENCE;
    let status = loop {
        if let Some(st) = s.scheduler.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the scheduler ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", s.scheduler.stderr());
    // Bounded by the stop grace (5 s), not by the agent or the watcher.
    let took = stopped_at.elapsed();
    assert!(took < Duration::from_secs(15), "stopping took {took:?}");

    // The watcher was told and, with no other scheduler in its list, ends
    // with that error rather than hanging.
    let st = watch.0.wait().unwrap();
    let mut err = String::new();
    let mut pipe = watch.0.stderr.take().unwrap();
    pipe.read_to_string(&mut err).unwrap();
    assert!(!st.success(), "{st}: {err}");
    assert!(
        err.contains("this scheduler is shutting down: go on with another"),
        "{st}: {err:?}"
    );
    assert!(!err.contains("watching on"), "{err}");
}

// ------------------------------------------------------------- partitions

/// Three hosts in network namespaces of their own, on a bridge in a fourth
/// (where the client runs), so that the machine's own firewall is not in
/// the way and a partition is a pair of blackhole routes.
struct Lab {
    tag: String,
    subnet: String,
}

impl Lab {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    fn sh(&self, ns: Option<&str>, cmd: &str) {
        let mut args: Vec<String> = vec![];
        if let Some(n) = ns {
            args.extend(["netns".into(), "exec".into(), self.ns(n), "ip".into()]);
        }
        args.extend(cmd.split_whitespace().map(String::from));
        let out = Command::new("ip").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(n: usize) -> Option<Lab> {
        let root = nix::unistd::geteuid().is_root();
        if !root || !require_tool("ip", &["netns", "list"], "apt-get install iproute2") {
            assert!(
                std::env::var_os("COOP_REQUIRE_ALL").is_none(),
                "network namespaces need root"
            );
            eprintln!("SKIPPED: network namespaces need root and iproute2");
            return None;
        }
        let pid = std::process::id();
        let lab = Lab {
            tag: format!("coop{pid}"),
            subnet: format!("10.{}.{}", 200 + pid % 50, (pid / 50) % 250),
        };
        lab.sh(None, &format!("netns add {}", lab.ns("lab")));
        lab.sh(Some("lab"), "link set lo up");
        lab.sh(Some("lab"), "link add br0 type bridge");
        lab.sh(
            Some("lab"),
            &format!("addr add {}.254/24 dev br0", lab.subnet),
        );
        lab.sh(Some("lab"), "link set br0 up");
        for i in 0..n {
            let host = format!("s{}", i + 1);
            lab.sh(None, &format!("netns add {}", lab.ns(&host)));
            lab.sh(Some(&host), "link set lo up");
            lab.sh(
                Some("lab"),
                &format!(
                    "link add h{i} type veth peer name n{i} netns {}",
                    lab.ns(&host)
                ),
            );
            lab.sh(Some("lab"), &format!("link set h{i} master br0 up"));
            lab.sh(Some(&host), &format!("addr add {}/24 dev n{i}", lab.ip(i)));
            lab.sh(Some(&host), &format!("link set n{i} up"));
        }
        Some(lab)
    }

    /// Cuts host `i` off from host `j`, both ways (the client still reaches both).
    fn cut(&self, i: usize, j: usize, on: bool) {
        let verb = if on { "add" } else { "del" };
        self.sh(
            Some(&format!("s{}", i + 1)),
            &format!("route {verb} blackhole {}/32", self.ip(j)),
        );
        self.sh(
            Some(&format!("s{}", j + 1)),
            &format!("route {verb} blackhole {}/32", self.ip(i)),
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{}-", self.tag)) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

struct Partitioned {
    // Before `lab` and `dir`: the schedulers stop before their namespaces go.
    nodes: Vec<Daemon>,
    lab: Lab,
    // Holds the logs and data dirs until the end.
    _dir: tempfile::TempDir,
    ca: String,
}

impl Partitioned {
    fn start() -> Option<Self> {
        let lab = Lab::start(3)?;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let ok = |args: &[&str]| {
            let out = Command::new(BIN).args(args).output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
        };
        ok(&["ca", "init", "--dir", ca.to_str().unwrap()]);
        let peers = (0..3)
            .map(|i| format!("{}={}:7071", i + 1, lab.ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = vec![];
        for i in 0..3 {
            let tls = dir.path().join(format!("tls-{i}"));
            ok(&[
                "ca",
                "issue",
                "--ca-dir",
                ca.to_str().unwrap(),
                "--name",
                &(i + 1).to_string(),
                "--host",
                &lab.ip(i),
                "--out",
                tls.to_str().unwrap(),
            ]);
            let data = dir.path().join(format!("s{}", i + 1));
            let args = [
                "netns",
                "exec",
                &lab.ns(&format!("s{}", i + 1)),
                BIN,
                "scheduler",
                "run",
                "--id",
                &(i + 1).to_string(),
                "--listen",
                &format!("{}:7070", lab.ip(i)),
                "--peer-listen",
                &format!("{}:7071", lab.ip(i)),
                "--peers",
                &peers,
                "--tls-dir",
                tls.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
            ];
            // `ip netns exec` execs the program: the pid is the scheduler's.
            nodes.push(Daemon::spawn_program(
                "ip",
                &format!("scheduler-{}", i + 1),
                dir.path(),
                &args,
                &[("COOP_OPERATOR_TOKEN", OPERATOR)],
            ));
        }
        for n in &nodes {
            n.export("COOP_ADDR");
        }
        let ca = ca.join("ca.pem").to_str().unwrap().to_string();
        Some(Partitioned {
            nodes,
            lab,
            _dir: dir,
            ca,
        })
    }

    fn addr(&self, i: usize) -> String {
        format!("https://{}:7070", self.lab.ip(i))
    }

    /// `coop ARGS -o json` from the client's namespace, at these addresses.
    fn coop(&self, addrs: &[usize], args: &[&str]) -> (Result<Value, String>, Duration) {
        let addr = addrs
            .iter()
            .map(|&i| self.addr(i))
            .collect::<Vec<_>>()
            .join(",");
        let start = Instant::now();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.ns("lab"), BIN])
            .args(args)
            .args(["--output", "json"])
            .env("COOP_ADDR", addr)
            .env("COOP_CA", &self.ca)
            .env("COOP_TOKEN", OPERATOR)
            .output()
            .unwrap();
        let took = start.elapsed();
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let v = serde_json::from_str(&text).unwrap_or(Value::String(text.trim().into()));
            (Ok(v), took)
        } else {
            (Err(stderr(&out)), took)
        }
    }

    /// The leader node `i` sees, if any.
    fn leader_seen_by(&self, i: usize) -> Option<usize> {
        let (v, _) = self.coop(&[i], &["cluster", "status", "--timeout", "2s"]);
        let v = v.ok()?;
        v["schedulers"]
            .as_array()?
            .iter()
            .find(|s| s["id"] == (i + 1) as u64)
            .and_then(|s| s["leader"].as_u64())
            .filter(|&l| l != 0)
            .map(|l| l as usize - 1)
    }

    /// Waits until the nodes in `among` agree on a leader among them.
    fn leader(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen: Vec<Option<usize>> = among.iter().map(|&i| self.leader_seen_by(i)).collect();
            if let Some(Some(l)) = seen.first()
                && seen.iter().all(|s| *s == Some(*l))
                && among.contains(l)
            {
                return *l;
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {among:?}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_partitioned_leader_is_replaced_fast_and_its_side_acknowledges_nothing() {
    let Some(p) = Partitioned::start() else {
        return;
    };
    let names = |i: usize| -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match p.coop(&[i], &["member", "list"]).0 {
                Ok(v) => {
                    let mut n: Vec<String> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|m| m["name"].as_str().unwrap().to_string())
                        .collect();
                    n.sort();
                    return n;
                }
                Err(e) => assert!(Instant::now() < deadline, "member list at {i}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let old = p.leader(&[0, 1, 2]);
    p.coop(&[0, 1, 2], &["member", "add", "before"]).0.unwrap();
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();

    // The leader is cut off from its peers, not from the client.
    for &i in &rest {
        p.lab.cut(old, i, true);
    }
    let new = p.leader(&rest);
    let elected = Instant::now();
    // A write to the majority, through the follower (forwarded to the new
    // leader), is acknowledged within 2 s of the election.
    let follower = rest.iter().copied().find(|&i| i != new).unwrap();
    p.coop(&[follower], &["member", "add", "majority"])
        .0
        .unwrap();
    let took = elected.elapsed();
    eprintln!("the majority acknowledged a write {took:?} after electing");
    assert!(took < Duration::from_secs(2), "the majority took {took:?}");
    // A client that lists the old leader first moves on to the others, for
    // a read and for a write that may be repeated.
    let order = [old, follower, new];
    p.coop(&order, &["member", "list", "--timeout", "5s"])
        .0
        .unwrap();
    p.coop(&order, &["member", "resume", "majority", "--timeout", "5s"])
        .0
        .unwrap();

    // The isolated side answers each call with an error, within its
    // deadline, and acknowledges nothing.
    for args in [
        &["member", "add", "isolated", "--timeout", "3s"][..],
        &["member", "list", "--timeout", "3s"][..],
        &["job", "list", "--timeout", "3s"][..],
    ] {
        let (r, took) = p.coop(&[old], args);
        let err = r.expect_err("the isolated node acknowledged a call");
        eprintln!("isolated: {args:?} answered in {took:?}: {}", err.trim());
        assert!(took < Duration::from_secs(3 + 5), "{args:?} took {took:?}");
        assert!(err.contains(&p.addr(old)), "{args:?}: {err}");
    }

    // Healed: every node holds the majority's writes and none of the
    // isolated side's.
    for &i in &rest {
        p.lab.cut(old, i, false);
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let lists: Vec<Vec<String>> = (0..3).map(names).collect();
        if lists.iter().all(|l| *l == lists[0]) {
            assert_eq!(lists[0], ["before", "majority"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never agreed: {lists:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A follower frozen with SIGSTOP, first in the list: calls go on to the
    // others after the connect timeout, reads and writes alike.
    let leader = p.leader(&[0, 1, 2]);
    let frozen = (0..3).find(|&i| i != leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != frozen).collect();
    p.nodes[frozen].signal(Signal::SIGSTOP);
    let order = [frozen, others[0], others[1]];
    p.coop(&order, &["member", "add", "frozen", "--timeout", "5s"])
        .0
        .unwrap();
    let listed = p
        .coop(&order, &["member", "list", "--timeout", "5s"])
        .0
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    p.nodes[frozen].signal(Signal::SIGCONT);
}
