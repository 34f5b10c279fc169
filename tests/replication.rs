//! Three (or four) `coop scheduler` processes replicating by raft on 127.0.0.1:
//! leaders killed with kill -9 while a client keeps submitting, a follower
//! wiped and brought back by snapshot, scheduler nodes added and removed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const OPERATOR: &str = "coop_0f5e1a7c3b9d24e68a1c5f7b3d9e2a4c6b8d0f1e3a5c7b9d";

struct Schedulers {
    // Before `client`, whose dir holds their logs.
    nodes: Vec<Option<Daemon>>,
    client: Cluster,
    /// Client ports, and peer (raft, mutual TLS) ports.
    ports: Vec<u16>,
    peer_ports: Vec<u16>,
    extra: Vec<String>,
}

/// Runs `coop` to completion; panics with its stderr if it fails.
fn coop_ok(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "coop {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Schedulers {
    fn start(n: usize, extra: &[&str]) -> Self {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let dir = tempfile::tempdir().unwrap();
        // The cluster CA, and a certificate for each scheduler (5 at most).
        let ca = dir.path().join("ca");
        coop_ok(&["ca", "init", "--dir", ca.to_str().unwrap()]);
        for id in 1..=5 {
            let out = dir.path().join(format!("tls-{id}"));
            coop_ok(&[
                "ca",
                "issue",
                "--ca-dir",
                ca.to_str().unwrap(),
                "--name",
                &id.to_string(),
                "--host",
                "127.0.0.1,localhost",
                "--out",
                out.to_str().unwrap(),
            ]);
        }
        let addr = ports
            .iter()
            .map(|p| format!("https://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut s = Schedulers {
            client: Cluster {
                dir,
                addr,
                token: OPERATOR.into(),
                ca: Some(ca.join("ca.pem").to_str().unwrap().to_string()),
                daemons: vec![],
            },
            ports,
            peer_ports,
            nodes: (0..n).map(|_| None).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            s.spawn(i);
        }
        s
    }

    fn peers(&self) -> String {
        self.peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data(&self, i: usize) -> std::path::PathBuf {
        self.client.dir.path().join(format!("s{}", i + 1))
    }

    /// Starts (or restarts) node `i` (raft id i + 1) on its own port and data dir.
    fn spawn(&mut self, i: usize) {
        let id = (i + 1).to_string();
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let peer_listen = format!("127.0.0.1:{}", self.peer_ports[i]);
        let data = self.data(i);
        let peers = self.peers();
        let tls = self.tls_dir(i + 1);
        let mut args = vec![
            "scheduler",
            "run",
            "--id",
            &id,
            "--listen",
            &listen,
            "--peer-listen",
            &peer_listen,
            "--peers",
            &peers,
            "--tls-dir",
            &tls,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend(FAST);
        args.extend(self.extra.iter().map(String::as_str));
        let d = Daemon::spawn(
            &format!("scheduler-{id}"),
            self.client.dir.path(),
            &args,
            &[("COOP_OPERATOR_TOKEN", OPERATOR)],
        );
        d.export("COOP_ADDR");
        self.nodes[i] = Some(d);
    }

    fn addr(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.ports[i])
    }

    fn tls_dir(&self, id: usize) -> String {
        let d = self.client.dir.path().join(format!("tls-{id}"));
        d.to_str().unwrap().to_string()
    }

    fn ca(&self) -> &str {
        self.client.ca.as_deref().unwrap()
    }

    /// The client pointed at node `i` alone.
    fn via(&self, i: usize, args: &[&str]) -> Option<Value> {
        json_via(&self.addr(i), self.ca(), args).ok()
    }

    fn schedulers_seen_by(&self, i: usize) -> Vec<Value> {
        self.via(i, &["cluster", "status"])
            .map(|v| v["schedulers"].as_array().unwrap().clone())
            .unwrap_or_default()
    }

    /// Waits until the live nodes agree on one leader; returns its index.
    fn leader(&self) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let live: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].is_some())
                .collect();
            let leaders: BTreeSet<u64> = live
                .iter()
                .flat_map(|&i| self.schedulers_seen_by(i))
                .filter(|s| s["role"] == "leader")
                .map(|s| s["id"].as_u64().unwrap())
                .collect();
            if let [leader] = leaders.iter().copied().collect::<Vec<_>>()[..]
                && live.contains(&(leader as usize - 1))
            {
                return leader as usize - 1;
            }
            assert!(
                Instant::now() < deadline,
                "no single leader among {live:?}: {leaders:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill9(&mut self, i: usize) {
        let mut d = self.nodes[i].take().unwrap();
        d.kill9();
        // Its stderr stays in the test dir; keep the daemon for the report.
        self.client.daemons.push(d);
    }

    /// Waits until every node lists the same jobs, applied as far as the leader.
    fn wait_agreement(&self) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let views: Vec<Option<Value>> = (0..self.nodes.len())
                .map(|i| self.via(i, &["job", "list"]))
                .collect();
            if views.iter().all(|v| v.is_some() && *v == views[0]) {
                return views[0].as_ref().unwrap().as_array().unwrap().clone();
            }
            assert!(Instant::now() < deadline, "the nodes never agreed");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn agent(&mut self, name: &str, gpus: &str) {
        let data = self.client.dir.path().join(format!("agent-{name}"));
        let join = self.client.enroll(name, "coop");
        let args = [
            "agent",
            "run",
            "--scheduler",
            &self.client.addr,
            "--join",
            &join,
            "--gpus",
            gpus,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        let d = Daemon::spawn(
            &format!("agent-{name}"),
            self.client.dir.path(),
            &args,
            &[("COOP_CA", self.ca())],
        );
        self.client.daemons.push(d);
    }
}

/// The client pointed at one address alone: its JSON output, or its error.
fn json_via(addr: &str, ca: &str, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(BIN)
        .args(args)
        .args(["--output", "json"])
        .env("COOP_ADDR", addr)
        .env("COOP_CA", ca)
        .env("COOP_TOKEN", OPERATOR)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// What the client pointed at `addr` alone prints, or its error.
fn text_via(addr: &str, ca: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .args(args)
        .env("COOP_ADDR", addr)
        .env("COOP_CA", ca)
        .env("COOP_TOKEN", OPERATOR)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Submits short jobs one after another until told to stop; records the ids
/// that were acknowledged.
fn submitter(
    addr: String,
    ca: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let out = Command::new(BIN)
            .args([
                "job", "submit", "--member", "coop", "--gpus", "1", "--", "sleep", "0.2",
            ])
            .env("COOP_ADDR", &addr)
            .env("COOP_CA", &ca)
            .env("COOP_TOKEN", OPERATOR)
            .output()
            .unwrap();
        if out.status.success() {
            let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
            acked.lock().unwrap().push(id);
        } else {
            failed
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
}

fn wait_acks(acked: &Mutex<Vec<String>>, at_least: usize, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while acked.lock().unwrap().len() < at_least {
        assert!(
            Instant::now() < deadline,
            "no submission acknowledged {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn acknowledged_jobs_survive_two_leader_kills_and_run_once() {
    let mut s = Schedulers::start(3, &[]);
    s.leader();
    s.client.ok(&["member", "add", "coop"]);
    s.agent("a1", "sim:2xA100-80GB");
    s.agent("a2", "sim:2xA100-80GB");
    for n in ["a1", "a2"] {
        s.client.wait_node(n, "up", |n| n["state"] == "up");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (addr, stop) = (s.client.addr.clone(), stop.clone());
        let ca = s.ca().to_string();
        let (acked, failed) = (acked.clone(), failed.clone());
        std::thread::spawn(move || submitter(addr, ca, stop, acked, failed))
    };

    for round in 0..2 {
        let before = acked.lock().unwrap().len();
        wait_acks(&acked, before + 5, "before the kill");
        let old = s.leader();
        s.kill9(old);
        let new = s.leader();
        assert_ne!(new, old, "round {round}: the killed node still leads");
        let after_kill = acked.lock().unwrap().len();
        wait_acks(&acked, after_kill + 5, "after the failover");
        s.spawn(old);
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let acked = acked.lock().unwrap().clone();
    let unique: BTreeSet<&String> = acked.iter().collect();
    assert_eq!(unique.len(), acked.len(), "an id was acknowledged twice");
    // Every acknowledged job runs to completion exactly once.
    let deadline = Instant::now() + PATIENCE * 2;
    let jobs = loop {
        let jobs = s.wait_agreement();
        let states: BTreeMap<String, String> = jobs
            .iter()
            .map(|j| {
                (
                    j["id"].as_str().unwrap().to_string(),
                    j["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        // Why a job ended otherwise, for the failure message.
        let reasons: BTreeMap<&str, String> = jobs
            .iter()
            .map(|j| {
                (
                    j["id"].as_str().unwrap(),
                    format!("exit {} {}", j["exit_code"], j["reason"]),
                )
            })
            .collect();
        let done = acked
            .iter()
            .all(|id| states.get(id).is_some_and(|st| st == "completed"));
        if done {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged jobs not completed: {:?}",
            acked
                .iter()
                .filter(|id| states.get(*id).is_none_or(|st| st != "completed"))
                .map(|id| (id, states.get(id), reasons.get(id.as_str())))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for id in &acked {
        let n = jobs.iter().filter(|j| j["id"] == id.as_str()).count();
        assert_eq!(n, 1, "job {id} listed {n} times");
    }
    // The three nodes agree on more than jobs: the ledger's totals too.
    let totals = |i: usize| {
        let u = s.via(i, &["usage"]).unwrap();
        u["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["member"].to_string(),
                    m["gpu_seconds"].to_string(),
                    m["energy_j"].to_string(),
                    m["finished_jobs"].to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let first = totals(0);
    assert_eq!(first.len(), 1);
    // A submission the client saw fail may still have been applied; none did
    // here, since the client retries until the answer is known.
    let failed = failed.lock().unwrap().clone();
    assert_eq!(
        first[0].3,
        acked.len().to_string(),
        "{first:?} failures: {failed:?}"
    );
    assert!(failed.is_empty(), "{failed:?}");
    for i in 1..3 {
        assert_eq!(totals(i), first, "node {} disagrees", i + 1);
    }
}

#[test]
fn a_wiped_follower_rejoins_through_a_snapshot() {
    let mut s = Schedulers::start(3, &["--snapshot-every", "20"]);
    let leader = s.leader();
    for i in 0..40 {
        s.client.ok(&["member", "add", &format!("m{i}")]);
    }
    let follower = (leader + 1) % 3;
    s.kill9(follower);
    std::fs::remove_dir_all(s.data(follower)).unwrap();
    // Written while it is away; the leader's log no longer reaches back to
    // entry 1, so only a snapshot can bring the wiped node up to date.
    for i in 40..45 {
        s.client.ok(&["member", "add", &format!("m{i}")]);
    }
    let me = s
        .schedulers_seen_by(leader)
        .into_iter()
        .find(|n| n["role"] == "leader")
        .unwrap();
    assert!(me["snapshot_index"].as_u64().unwrap() > 0, "{me}");

    s.spawn(follower);
    let deadline = Instant::now() + PATIENCE;
    let want = s.via(leader, &["member", "list"]).unwrap();
    loop {
        if s.via(follower, &["member", "list"]).as_ref() == Some(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the wiped follower never caught up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(want.as_array().unwrap().len(), 45);
    let rejoined = s
        .schedulers_seen_by(follower)
        .into_iter()
        .find(|n| n["id"] == follower as u64 + 1)
        .unwrap();
    assert!(
        rejoined["snapshot_index"].as_u64().unwrap() > 0,
        "{rejoined}"
    );
    // The snapshot carried the state only; the audit chain of the entries it
    // covers was copied from a peer, and the wiped node exports the same
    // chain as the leader (refusing, until it has it all).
    let chain = text_via(&s.addr(leader), s.ca(), &["audit", "export"]).unwrap();
    assert_eq!(chain.lines().count(), 45, "one record per member added");
    let deadline = Instant::now() + PATIENCE;
    loop {
        match text_via(&s.addr(follower), s.ca(), &["audit", "export"]) {
            Ok(theirs) if theirs == chain => break,
            Ok(theirs) => panic!("the wiped node exports another chain:\n{theirs}"),
            Err(e) => assert!(
                e.contains("still copying the history") && Instant::now() < deadline,
                "{e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let head: Value = serde_json::from_str(chain.lines().last().unwrap()).unwrap();
    let verified = text_via(&s.addr(follower), s.ca(), &["audit", "verify"]).unwrap();
    assert!(
        verified.contains(head["hash"].as_str().unwrap()),
        "{verified}"
    );
}

#[test]
fn scheduler_nodes_are_added_as_learners_then_voters_and_removed() {
    let mut s = Schedulers::start(3, &[]);
    s.leader();
    s.client.ok(&["member", "add", "before"]);

    // A fourth node starts empty, knowing the running cluster's peers from
    // its configuration, and waits to be added.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let peer_port = free_port();
    let peer_listen = format!("127.0.0.1:{peer_port}");
    let data = s.client.dir.path().join("s4");
    let peers = s.peers();
    let tls = s.tls_dir(4);
    let mut args = vec![
        "scheduler",
        "run",
        "--id",
        "4",
        "--listen",
        &listen,
        "--peer-listen",
        &peer_listen,
        "--peers",
        &peers,
        "--tls-dir",
        &tls,
        "--join",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend(FAST);
    let d = Daemon::spawn("scheduler-4", s.client.dir.path(), &args, &[]);
    d.export("COOP_ADDR");
    s.client.daemons.push(d);

    // Bad input changes nothing.
    let err = s.client.fails(&["cluster", "add-node", "0", &peer_listen]);
    assert!(err.contains("id"), "{err}");
    let err = s.client.fails(&["cluster", "add-node", "2", &peer_listen]);
    assert!(err.contains("already"), "{err}");

    let added = s.client.json(&["cluster", "add-node", "4", &peer_listen]);
    assert!(
        added.as_array().unwrap().iter().any(|n| n["id"] == 4),
        "node 4 missing: {added}"
    );
    // Node 4 applies its own promotion as soon as it hears of the commit.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let four = s
            .schedulers_seen_by(0)
            .into_iter()
            .find(|n| n["id"] == 4)
            .unwrap();
        if four["membership"] == "voter" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never became a voter: {four}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // It has the cluster's state and answers clients itself.
    let via4 = |args: &[&str]| json_via(&format!("https://{listen}"), s.ca(), args).unwrap();
    let members = via4(&["member", "list"]);
    assert!(members.to_string().contains("before"), "{members}");
    s.client.ok(&["member", "add", "after"]);
    assert!(via4(&["member", "list"]).to_string().contains("after"));

    let removed = s.client.json(&["cluster", "remove-node", "4"]);
    assert!(
        removed.as_array().unwrap().iter().all(|n| n["id"] != 4),
        "{removed}"
    );
    let err = s.client.fails(&["cluster", "remove-node", "4"]);
    assert!(err.contains("not in the cluster"), "{err}");
    // The three left still make progress.
    s.client.ok(&["member", "add", "last"]);
}

#[test]
fn a_leader_stopped_with_sigterm_sends_its_agent_and_watchers_to_the_others() {
    let mut s = Schedulers::start(3, &[]);
    let leader = s.leader();
    s.client.ok(&["member", "add", "coop"]);
    s.agent("a1", "sim:1xA100-80GB");
    s.client.wait_node("a1", "up", |n| n["state"] == "up");
    let id = s.client.submit(&["--member", "coop", "--", "sleep", "600"]);
    s.client
        .wait_job(&id, "running", |j| j["state"] == "running");

    // A watcher whose first address is the leader.
    let order: Vec<String> = std::iter::once(leader)
        .chain((0..3).filter(|&i| i != leader))
        .map(|i| s.addr(i))
        .collect();
    let mut watch = Command::new(BIN);
    watch
        .args(["job", "watch", &id])
        .env("COOP_ADDR", order.join(","))
        .env("COOP_CA", s.ca())
        .env("COOP_TOKEN", OPERATOR)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut watch = KillOnDrop(watch.spawn().unwrap());
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(watch.0.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("running"), "{first}");

    // SIGTERM: the leader exits cleanly; the others elect another.
    let mut stopped = s.nodes[leader].take().unwrap();
    stopped.stop();
    s.client.daemons.push(stopped);
    let rest: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new = s.leader();
    assert!(rest.contains(&new));
    // The job ran on: its agent went on with the new leader, which sees it
    // connected and the run still the one it was.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let nodes = s.via(new, &["node", "list"]).unwrap_or_default();
        let a1 = nodes
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == "a1"));
        if a1.is_some_and(|n| n["state"] == "up" && n["connected"] == true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a1 never reached the new leader: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let job = s.client.job(&id);
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("running"), Some(1)),
        "{job}"
    );
    // The watcher watched on through the next address and sees the end.
    s.client.ok(&["job", "cancel", &id]);
    let rest_of_it: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest_of_it.last().is_some_and(|l| l.contains("cancelled")),
        "{rest_of_it:?}"
    );
    let status = watch.0.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains("shutting down: go on with another; watching on"),
        "{err}"
    );
}
