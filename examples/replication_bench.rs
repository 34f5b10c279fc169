//! Replicated-write benchmark: a 3-node coop scheduler cluster on loopback
//! (raft over mutual TLS, SQLite with fsync), its clients once over TLS and
//! once in plain text, against a 3-member etcd, in the same run.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example replication_bench -- [SECONDS_PER_LEVEL] [FAILOVERS]
//! ```
//!
//! For 1, 16 and 64 concurrent clients it reports acknowledged writes per
//! second and p50/p99 latency: coop job submissions (gRPC, to the leader) with
//! the client listener on TLS (the default) and in plain text (`--insecure`;
//! the peers keep mutual TLS), and etcd puts (its HTTP gateway, to its
//! leader) when `etcd` is on PATH (Debian package `etcd-server`). The two
//! coop clusters run side by side and take turns; etcd runs alone, after
//! them. Each client opens its connection before the clock starts, so
//! handshakes are not counted. Before etcd, it kills the leader of the TLS
//! cluster with SIGKILL several times and reports the time from the kill to
//! the next acknowledged submission (a new TLS connection included).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coop_proto::v1 as pb;
use tonic::transport::{Channel, ClientTlsConfig};

/// The operator's token (a fixed one: it must look random, 192 bits).
const TOKEN: &str = "coop_37e7d706d208edea783c03d9996855fa2b516a2c8777dbdb";
/// The benchmark node's credential, exchanged for its join token.
const NODE_CREDENTIAL: &str =
    "coopnode_d87da0936d64ca85cc4e311afec4f65486b616a2b6e3b697919bfea3f866eeb5";
const LEVELS: [usize; 3] = [1, 16, 64];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let failovers: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let bin = coop_binary()?;
    let pki = Pki::make(&bin, dir.path())?;
    let mut rows = vec![];

    // Both clusters run side by side and take turns at each level, the first
    // to go alternating, so that neither is always measured on the fresher
    // machine; the one not measured idles.
    let systems = [
        ("coop (3 nodes, TLS)", "tls", false),
        ("coop (3 nodes, plain clients)", "plain", true),
    ];
    let mut clusters = vec![];
    for (_, data, insecure) in systems {
        clusters.push(CoopCluster::start(
            &bin,
            &pki,
            &dir.path().join(data),
            insecure,
        )?);
    }
    let mut coop_rows: [Vec<String>; 2] = Default::default();
    rt.block_on(async {
        let mut leaders = vec![];
        for c in &clusters {
            leaders.push(add_bench_node(c).await?);
        }
        for (level, &n) in LEVELS.iter().enumerate() {
            let order = if level % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let lat = coop_writes(&leaders[k], n, secs).await?;
                coop_rows[k].push(row(systems[k].0, n, secs, lat));
            }
        }
        anyhow::Ok(())
    })?;
    rows.extend(coop_rows.into_iter().flatten());

    // Then the TLS cluster alone: its leader killed again and again.
    let mut tls = clusters.swap_remove(0);
    drop(clusters);
    let times = rt.block_on(failover(&mut tls, failovers))?;
    drop(tls);

    match which("etcd") {
        Some(etcd) => {
            let cluster = EtcdCluster::start(&etcd, dir.path())?;
            let leader = cluster.wait_leader()?;
            for &n in &LEVELS {
                let lat = rt.block_on(load(n, secs, |_| {
                    let addr = cluster.client_addr(leader);
                    async move {
                        Ok(move || {
                            let addr = addr.clone();
                            async move {
                                tokio::task::spawn_blocking(move || etcd_put(&addr)).await??;
                                anyhow::Ok(())
                            }
                        })
                    }
                }))?;
                rows.push(row("etcd 3.4 (3 members)", n, secs, lat));
            }
        }
        None => rows.push("(etcd not found on PATH: install etcd-server to compare)".into()),
    }

    println!("| system | clients | writes/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    if let (Some(min), Some(max)) = (times.first(), times.last()) {
        println!(
            "\ncoop failover (TLS cluster; SIGKILL of the leader to the next acknowledged submission), {} runs: median {:.0} ms, min {:.0} ms, max {:.0} ms",
            times.len(),
            ms(times[times.len() / 2]),
            ms(*min),
            ms(*max)
        );
    }
    Ok(())
}

/// The member and node that submissions are checked against; the leader's
/// client listener.
async fn add_bench_node(coop: &CoopCluster) -> anyhow::Result<Target> {
    let leader = coop.wait_leader().await?;
    let target = coop.target(leader);
    let c = target.connect().await?;
    pb::member_service_client::MemberServiceClient::new(c.clone())
        .add(req(pb::AddMemberRequest {
            name: "bench".into(),
            token_ttl_s: 0,
        }))
        .await?;
    // Submissions are checked against the GPUs registered: one node with one
    // GPU, which the first job takes; the rest wait in the queue. The node is
    // enrolled by the operator and joins with its own credential.
    let join_token = pb::cluster_service_client::ClusterServiceClient::new(c.clone())
        .enroll_node(req(pb::EnrollNodeRequest {
            node: "bench".into(),
            owner: "bench".into(),
            ttl_s: 0,
        }))
        .await?
        .into_inner()
        .join_token;
    let mut agents = pb::agent_service_client::AgentServiceClient::new(c);
    agents
        .join(bearer(
            &join_token,
            pb::JoinRequest {
                credential_hash: coop_agent::enroll::hash(NODE_CREDENTIAL),
            },
        ))
        .await?;
    agents
        .register(bearer(
            NODE_CREDENTIAL,
            pb::RegisterRequest {
                address: String::new(),
                site: String::new(),
                node: "bench".into(),
                owner: "bench".into(),
                gpus: vec![pb::Gpu {
                    uuid: "GPU-bench-0".into(),
                    index: 0,
                    model: "A100-80GB".into(),
                    memory_mb: 81_920,
                    job: String::new(),
                    measured: None,
                    power_limit_w: 400,
                }],
                session: "bench".into(),
            },
        ))
        .await?;
    Ok(target)
}

/// `clients` loops of job submissions to `leader`, each on a connection of
/// its own.
async fn coop_writes(leader: &Target, clients: usize, secs: u64) -> anyhow::Result<Vec<Duration>> {
    load(clients, secs, |_| {
        let leader = leader.clone();
        async move {
            let c = leader.connect().await?;
            Ok(move || {
                let mut jobs = pb::job_service_client::JobServiceClient::new(c.clone());
                async move {
                    jobs.submit(req(submission())).await?;
                    anyhow::Ok(())
                }
            })
        }
    })
    .await
}

/// Kills the leader `runs` times; the time from each kill to the next
/// submission acknowledged by any node, sorted.
async fn failover(coop: &mut CoopCluster, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = vec![];
    for _ in 0..runs {
        let leader = coop.wait_leader().await?;
        let all: Vec<Target> = (0..3).map(|i| coop.target(i)).collect();
        let killed = Instant::now();
        coop.kill(leader);
        // Submit through every node in turn until one acknowledges.
        'acked: loop {
            for t in &all {
                if let Ok(c) = t.connect().await {
                    let mut jobs = pb::job_service_client::JobServiceClient::new(c);
                    if jobs.submit(req(submission())).await.is_ok() {
                        break 'acked;
                    }
                }
            }
        }
        times.push(killed.elapsed());
        coop.restart(leader)?;
    }
    times.sort();
    Ok(times)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A table row: writes per second, p50 and p99 latency.
fn row(system: &str, clients: usize, secs: u64, mut lat: Vec<Duration>) -> String {
    lat.sort();
    let p = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)));
    format!(
        "| {system} | {clients} | {:.0} | {:.2} | {:.2} |",
        lat.len() as f64 / secs as f64,
        p(0.50).map_or(0.0, |d| ms(*d)),
        p(0.99).map_or(0.0, |d| ms(*d)),
    )
}

/// Runs `clients` loops of `op` for `secs` seconds; the latency of each write.
async fn load<S, SF, O, OF>(clients: usize, secs: u64, setup: S) -> anyhow::Result<Vec<Duration>>
where
    S: Fn(usize) -> SF,
    SF: std::future::Future<Output = anyhow::Result<O>>,
    O: Fn() -> OF + Send + 'static,
    OF: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for i in 0..clients {
        let op = setup(i).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            while Instant::now() < end {
                let t = Instant::now();
                op().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

fn submission() -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        kind: pb::JobKind::Finetune as i32,
        gpus: 1,
        command: vec![
            "python".into(),
            "train.py".into(),
            "--epochs".into(),
            "3".into(),
        ],
        member: "bench".into(),
        ..Default::default()
    }
}

/// A request as the operator.
fn req<T>(body: T) -> tonic::Request<T> {
    bearer(TOKEN, body)
}

fn bearer<T>(token: &str, body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// One scheduler's client listener: https with the cluster CA, or plain http.
#[derive(Clone)]
struct Target {
    addr: String,
    tls: Option<ClientTlsConfig>,
}

impl Target {
    async fn connect(&self) -> anyhow::Result<Channel> {
        let ep = tonic::transport::Endpoint::from_shared(self.addr.clone())?
            .connect_timeout(Duration::from_millis(300));
        let ep = match &self.tls {
            Some(tls) => ep.tls_config(tls.clone())?,
            None => ep,
        };
        Ok(ep.connect().await?)
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The example lives in target/<profile>/examples; the binary one up.
fn coop_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("coop"))
        .filter(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("build the coop binary first: cargo build --release"))
}

/// A cluster CA and a certificate for each of the three schedulers, made with
/// `coop ca init` and `coop ca issue`.
struct Pki {
    ca_pem: Vec<u8>,
    tls_dirs: Vec<PathBuf>,
}

impl Pki {
    fn make(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let ca = dir.join("ca");
        coop_ok(bin, &["ca", "init", "--dir", path_str(&ca)?])?;
        let mut tls_dirs = vec![];
        for id in 1..=3 {
            let out = dir.join(format!("tls-{id}"));
            coop_ok(
                bin,
                &[
                    "ca",
                    "issue",
                    "--ca-dir",
                    path_str(&ca)?,
                    "--name",
                    &id.to_string(),
                    "--host",
                    "127.0.0.1,localhost",
                    "--out",
                    path_str(&out)?,
                ],
            )?;
            tls_dirs.push(out);
        }
        Ok(Pki {
            ca_pem: std::fs::read(ca.join("ca.pem"))?,
            tls_dirs,
        })
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", p.display()))
}

/// Runs `coop` to completion; its stderr in the error if it fails.
fn coop_ok(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bin).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "coop {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct CoopCluster {
    bin: PathBuf,
    dir: PathBuf,
    tls_dirs: Vec<PathBuf>,
    /// Plain-text clients (`--insecure`); the peers use mutual TLS either way.
    insecure: bool,
    client_tls: ClientTlsConfig,
    ports: Vec<u16>,
    peer_ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl CoopCluster {
    fn start(bin: &Path, pki: &Pki, dir: &Path, insecure: bool) -> anyhow::Result<Self> {
        let mut c = CoopCluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            tls_dirs: pki.tls_dirs.clone(),
            insecure,
            client_tls: coop_scheduler::tls::client(&pki.ca_pem),
            ports: (0..3).map(|_| free_port()).collect(),
            peer_ports: (0..3).map(|_| free_port()).collect(),
            children: vec![None, None, None],
        };
        for i in 0..3 {
            c.restart(i)?;
        }
        Ok(c)
    }

    fn target(&self, i: usize) -> Target {
        let port = self.ports[i];
        if self.insecure {
            Target {
                addr: format!("http://127.0.0.1:{port}"),
                tls: None,
            }
        } else {
            Target {
                addr: format!("https://127.0.0.1:{port}"),
                tls: Some(self.client_tls.clone()),
            }
        }
    }

    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let peers = self
            .peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["scheduler", "run", "--id", &(i + 1).to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .args([
                "--peer-listen",
                &format!("127.0.0.1:{}", self.peer_ports[i]),
            ])
            .args(["--peers", &peers])
            .arg("--tls-dir")
            .arg(&self.tls_dirs[i])
            .arg("--data-dir")
            .arg(self.dir.join(format!("coop-{}", i + 1)))
            .args(["--node-timeout", "1h"])
            .env("COOP_OPERATOR_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.insecure {
            cmd.arg("--insecure");
        }
        self.children[i] = Some(cmd.spawn()?);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn wait_leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for i in 0..3 {
                if self.children[i].is_none() {
                    continue;
                }
                let Ok(c) = self.target(i).connect().await else {
                    continue;
                };
                let mut cl = pb::cluster_service_client::ClusterServiceClient::new(c);
                if let Ok(s) = cl.status(req(pb::ClusterStatusRequest {})).await {
                    let all_up = s.get_ref().schedulers.iter().all(|n| n.error.is_empty());
                    if let Some(l) = s.get_ref().schedulers.iter().find(|n| n.role == "leader")
                        && all_up
                    {
                        return Ok(l.id as usize - 1);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("no coop leader within 30 s")
    }
}

impl Drop for CoopCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

struct EtcdCluster {
    client_ports: Vec<u16>,
    children: Vec<Child>,
}

impl EtcdCluster {
    fn start(etcd: &Path, dir: &Path) -> anyhow::Result<Self> {
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial = peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = vec![];
        for i in 0..3 {
            let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
            let client = format!("http://127.0.0.1:{}", client_ports[i]);
            children.push(
                Command::new(etcd)
                    .args(["--name", &format!("e{i}")])
                    .arg("--data-dir")
                    .arg(dir.join(format!("etcd-{i}")))
                    .args([
                        "--listen-peer-urls",
                        &peer,
                        "--initial-advertise-peer-urls",
                        &peer,
                    ])
                    .args([
                        "--listen-client-urls",
                        &client,
                        "--advertise-client-urls",
                        &client,
                    ])
                    .args([
                        "--initial-cluster",
                        &initial,
                        "--initial-cluster-state",
                        "new",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(Self {
            client_ports,
            children,
        })
    }

    fn client_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.client_ports[i])
    }

    /// The member that says it leads (the gateway's maintenance status).
    fn wait_leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for i in 0..3 {
                if let Ok(body) = http_post(&self.client_addr(i), "/v3/maintenance/status", "{}")
                    && let (Some(leader), Some(me)) =
                        (field(&body, "leader"), field(&body, "member_id"))
                    && leader == me
                {
                    return Ok(i);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("no etcd leader within 30 s")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A string field of a flat JSON object ("header" holds member_id).
fn field(body: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let f = v.get(name).or_else(|| v.get("header")?.get(name))?;
    Some(
        f.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| f.to_string()),
    )
}

thread_local! {
    static ETCD_CONN: std::cell::RefCell<Option<(String, TcpStream)>> = const { std::cell::RefCell::new(None) };
}

/// One etcd put of a 200-byte value (about a job's size), on a kept-alive
/// connection per thread.
fn etcd_put(addr: &str) -> anyhow::Result<()> {
    // base64 of "bench-key" and of 200 × 'x'.
    let body = format!(
        "{{\"key\":\"YmVuY2gta2V5\",\"value\":\"{}\"}}",
        "eHh4".repeat(66) + "eHg="
    );
    http_post(addr, "/v3/kv/put", &body).map(|_| ())
}

fn http_post(addr: &str, path: &str, body: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    ETCD_CONN.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(a, _)| a != addr) {
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            *slot = Some((addr.to_string(), s));
        }
        let (_, stream) = slot.as_mut().expect("set");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let result = (|| {
            stream.write_all(request.as_bytes())?;
            let mut reader = BufReader::new(&*stream);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            anyhow::ensure!(line.contains(" 200 "), "etcd answered {line:?}");
            let mut len = 0usize;
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse()?;
                }
            }
            let mut buf = vec![0; len];
            reader.read_exact(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })();
        if result.is_err() {
            *slot = None;
        }
        result
    })
}
