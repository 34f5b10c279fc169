//! The node credential: made on this machine, exchanged once for a join token
//! (`coop node enroll`), kept readable by the agent's user only. The cluster
//! stores only its hash; with it the agent may act for its one node, and for
//! nothing else.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use coop_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

const FILE: &str = "credential.json";

#[derive(Clone, Serialize, Deserialize)]
pub struct Credential {
    pub node: String,
    pub owner: String,
    pub token: String,
    /// SHA-256 of the join token it was obtained with: the same join token
    /// given again (a restart) is not exchanged again.
    #[serde(default)]
    pub joined_with: String,
}

/// SHA-256 in hex, as the cluster stores credentials.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential(node {}, owner {})", self.node, self.owner)
    }
}

/// The credential in `data_dir`, if this machine has joined.
pub fn load(data_dir: &Path) -> anyhow::Result<Option<Credential>> {
    let path = data_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// How long a scheduler has to take a connection, TLS included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a call (or opening the heartbeat stream) may take before the
/// agent gives up on that scheduler and tries the next.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A channel to a scheduler: TLS verified against the cluster CA when given.
/// Every call on it has a deadline; a connection that stops answering is
/// found by HTTP/2 keep-alive pings within 10 s.
pub fn endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    let ep = Endpoint::from_shared(addr.to_string())
        .map_err(|_| anyhow!("scheduler: {addr:?} is not an address"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    match tls {
        Some(t) => ep.tls_config(t.clone()).context("tls"),
        None => Ok(ep),
    }
}

/// Connects within [`CONNECT_TIMEOUT`]: the endpoint's own timeout covers TCP
/// only, and a stopped scheduler accepts connections it never answers.
pub async fn connect(addr: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Channel> {
    let ep = endpoint(addr, tls)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, ep.connect()).await {
        Ok(r) => r.context("connecting"),
        Err(_) => bail!(
            "connecting: no connection within {} s",
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// Makes a credential here and exchanges `join_token` for it at the first
/// scheduler that takes it; stores it (0600) in `data_dir`.
pub async fn join(
    data_dir: &Path,
    schedulers: &[String],
    tls: Option<&ClientTlsConfig>,
    join_token: &str,
) -> anyhow::Result<Credential> {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("coopnode_{}", hex::encode(secret));
    let credential_hash = hash(&token);
    let mut last = anyhow!("scheduler: no address given");
    for addr in schedulers {
        let ch = match connect(addr, tls).await {
            Ok(ch) => ch,
            Err(e) => {
                last = anyhow!("{addr}: {e}");
                continue;
            }
        };
        let mut req = tonic::Request::new(pb::JoinRequest {
            credential_hash: credential_hash.clone(),
        });
        let bearer = format!("Bearer {}", join_token.trim())
            .parse()
            .map_err(|_| anyhow!("join: not a valid token"))?;
        req.metadata_mut().insert("authorization", bearer);
        match pb::agent_service_client::AgentServiceClient::new(ch)
            .join(req)
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let cred = Credential {
                    node: r.node,
                    owner: r.owner,
                    token,
                    joined_with: hash(join_token),
                };
                store(data_dir, &cred)?;
                return Ok(cred);
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                last = anyhow!("{addr}: {}", s.message());
            }
            Err(s) => bail!("join: {}", s.message()),
        }
    }
    Err(last.context("join: no scheduler took the join token"))
}

fn store(data_dir: &Path, cred: &Credential) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(FILE);
    let tmp = data_dir.join(format!("{FILE}.new"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(cred)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
