//! A gRPC client of the cluster: finds a scheduler among the given addresses and
//! sends the bearer token with every call.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use coop_proto::v1::{
    audit_service_client::AuditServiceClient, cluster_service_client::ClusterServiceClient,
    job_service_client::JobServiceClient, member_service_client::MemberServiceClient,
    policy_service_client::PolicyServiceClient, usage_service_client::UsageServiceClient,
};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::args::ClientArgs;

pub struct Client {
    channel: Channel,
    auth: MetadataValue<tonic::metadata::Ascii>,
}

/// `host:port` or a URL into a URL (`https://` where TLS is used).
pub use coop_scheduler::consensus::transport::normalize as normalize_addr;

/// The TLS settings of `--ca`/`COOP_CA`, if given.
pub fn tls(ca: Option<&std::path::Path>) -> anyhow::Result<Option<ClientTlsConfig>> {
    match ca {
        None => Ok(None),
        Some(p) => {
            let pem = std::fs::read(p).with_context(|| format!("ca: reading {}", p.display()))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                bail!("ca: {} is not a PEM certificate (ca.pem)", p.display());
            }
            Ok(Some(coop_scheduler::tls::client(&pem)))
        }
    }
}

/// A credential goes out in plain text only to this machine, or where the
/// user said so (`--plain-text`): on a network, anyone on the path reads it.
pub fn plain_text_allowed(url: &str, allowed: bool) -> anyhow::Result<()> {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_matches(['[', ']']);
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local || allowed {
        Ok(())
    } else {
        bail!(
            "addr: {url} is plain text, and the credential would cross the network unencrypted: \
             use https:// with --ca (COOP_CA), or --plain-text if you mean it"
        )
    }
}

impl Client {
    pub async fn connect(args: &ClientArgs) -> anyhow::Result<Self> {
        Self::connect_from(args, 0).await
    }

    /// Tries the addresses in turn, starting with the `start`-th (mod their number).
    pub async fn connect_from(args: &ClientArgs, start: usize) -> anyhow::Result<Self> {
        let token = args
            .token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| anyhow!("token: no credential given (--token or COOP_TOKEN)"))?;
        let auth = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| anyhow!("token: not a valid token"))?;
        let tls = tls(args.ca.as_deref())?;
        let mut last_err = None;
        let addrs: Vec<&str> = args
            .addr
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .collect();
        let n = addrs.len().max(1);
        for i in 0..addrs.len() {
            let addr = addrs[(start + i) % n];
            let url = normalize_addr(addr, tls.is_some());
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|_| anyhow!("addr: {addr:?} is not an address"))?
                .connect_timeout(Duration::from_secs(3));
            if url.starts_with("http://") {
                plain_text_allowed(&url, args.plain_text)?;
            }
            match &tls {
                Some(t) if url.starts_with("https://") => {
                    endpoint = endpoint.tls_config(t.clone())?
                }
                None if url.starts_with("https://") => {
                    bail!("ca: {url} is served over TLS: give the cluster CA with --ca or COOP_CA")
                }
                _ => {}
            }
            match endpoint.connect().await {
                Ok(channel) => return Ok(Self { channel, auth }),
                Err(e) => last_err = Some(anyhow!("{url}: {e}")),
            }
        }
        let hint = if tls.is_none() {
            " (if the schedulers serve TLS, set COOP_CA to the cluster's ca.pem)"
        } else {
            ""
        };
        Err(last_err.unwrap_or_else(|| anyhow!("addr: no scheduler address given")))
            .with_context(|| format!("no scheduler reachable{hint}"))
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }

    pub fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel.clone())
    }
    pub fn members(&self) -> MemberServiceClient<Channel> {
        MemberServiceClient::new(self.channel.clone())
    }
    pub fn usage(&self) -> UsageServiceClient<Channel> {
        UsageServiceClient::new(self.channel.clone())
    }
    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }
    pub fn policy(&self) -> PolicyServiceClient<Channel> {
        PolicyServiceClient::new(self.channel.clone())
    }
    pub fn cluster(&self) -> ClusterServiceClient<Channel> {
        ClusterServiceClient::new(self.channel.clone())
    }
}
