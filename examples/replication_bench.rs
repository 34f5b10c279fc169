//! Replicated-write benchmark: a 3-node coop scheduler cluster on loopback
//! (raft, SQLite with fsync) against a 3-member etcd, in the same run.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example replication_bench -- [SECONDS_PER_LEVEL] [FAILOVERS]
//! ```
//!
//! For 1, 16 and 64 concurrent clients it reports acknowledged writes per
//! second and p50/p99 latency: coop job submissions (gRPC, to the leader), and
//! etcd puts (its HTTP gateway, to its leader) when `etcd` is on PATH (Debian
//! package `etcd-server`). Then it kills the coop leader with SIGKILL several
//! times and reports the time from the kill to the next acknowledged
//! submission.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coop_proto::v1 as pb;
use tonic::transport::Channel;

const TOKEN: &str = "coop_bench-operator";
const LEVELS: [usize; 3] = [1, 16, 64];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let failovers: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    println!("| system | clients | writes/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");

    let mut coop = CoopCluster::start(dir.path())?;
    rt.block_on(async {
        let leader = coop.wait_leader().await?;
        let c = client(&coop.addr(leader)).await?;
        members(&c)
            .add(req(pb::AddMemberRequest {
                name: "bench".into(),
                token_ttl_s: 0,
            }))
            .await?;
        // Submissions are checked against the GPUs registered: one node with
        // one GPU, which the first job takes; the rest wait in the queue.
        pb::agent_service_client::AgentServiceClient::new(c.clone())
            .register(req(pb::RegisterRequest {
                node: "bench".into(),
                owner: "bench".into(),
                gpus: vec![pb::Gpu {
                    uuid: "GPU-bench-0".into(),
                    index: 0,
                    model: "A100-80GB".into(),
                    memory_mb: 81_920,
                    job: String::new(),
                    measured: None,
                }],
                session: "bench".into(),
            }))
            .await?;
        for &n in &LEVELS {
            let lat = load(n, secs, |_| {
                let addr = coop.addr(leader);
                async move {
                    let c = client(&addr).await?;
                    Ok(move || {
                        let mut jobs = pb::job_service_client::JobServiceClient::new(c.clone());
                        async move {
                            jobs.submit(req(submission())).await?;
                            anyhow::Ok(())
                        }
                    })
                }
            })
            .await?;
            report("coop (3 nodes)", n, secs, lat);
        }
        anyhow::Ok(())
    })?;

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
                report("etcd 3.4 (3 members)", n, secs, lat);
            }
        }
        None => println!("(etcd not found on PATH: install etcd-server to compare)"),
    }

    let mut times = vec![];
    rt.block_on(async {
        for _ in 0..failovers {
            let leader = coop.wait_leader().await?;
            let all = coop.all_addrs();
            let killed = Instant::now();
            coop.kill(leader);
            // Submit through every node in turn until one acknowledges.
            loop {
                let mut ok = false;
                for a in &all {
                    if let Ok(c) = client(a).await {
                        let mut jobs = pb::job_service_client::JobServiceClient::new(c);
                        if jobs.submit(req(submission())).await.is_ok() {
                            ok = true;
                            break;
                        }
                    }
                }
                if ok {
                    break;
                }
            }
            times.push(killed.elapsed());
            coop.restart(leader)?;
        }
        anyhow::Ok(())
    })?;
    times.sort();
    if !times.is_empty() {
        println!(
            "\ncoop failover (SIGKILL of the leader to the next acknowledged submission), {} runs: median {:.0} ms, min {:.0} ms, max {:.0} ms",
            times.len(),
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(*times.last().unwrap())
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(system: &str, clients: usize, secs: u64, mut lat: Vec<Duration>) {
    lat.sort();
    let p = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)));
    println!(
        "| {system} | {clients} | {:.0} | {:.2} | {:.2} |",
        lat.len() as f64 / secs as f64,
        p(0.50).map_or(0.0, |d| ms(*d)),
        p(0.99).map_or(0.0, |d| ms(*d)),
    );
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

fn req<T>(body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

async fn client(addr: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(addr.to_string())?
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await?)
}

fn members(c: &Channel) -> pb::member_service_client::MemberServiceClient<Channel> {
    pb::member_service_client::MemberServiceClient::new(c.clone())
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

struct CoopCluster {
    bin: PathBuf,
    dir: PathBuf,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl CoopCluster {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        // The example lives in target/<profile>/examples; the binary one up.
        let bin = std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("coop"))
            .filter(|p| p.is_file())
            .ok_or_else(|| anyhow::anyhow!("build the coop binary first: cargo build --release"))?;
        let mut c = CoopCluster {
            bin,
            dir: dir.to_path_buf(),
            ports: (0..3).map(|_| free_port()).collect(),
            children: vec![None, None, None],
        };
        for i in 0..3 {
            c.restart(i)?;
        }
        Ok(c)
    }

    fn addr(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    fn all_addrs(&self) -> Vec<String> {
        (0..3).map(|i| self.addr(i)).collect()
    }

    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let peers = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new(&self.bin)
            .args(["scheduler", "run", "--id", &(i + 1).to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .args(["--peers", &peers])
            .arg("--data-dir")
            .arg(self.dir.join(format!("coop-{}", i + 1)))
            .args(["--node-timeout", "1h"])
            .env("COOP_OPERATOR_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.children[i] = Some(child);
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
                let Ok(c) = client(&self.addr(i)).await else {
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
