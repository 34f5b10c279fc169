//! A gRPC client of the cluster: finds a scheduler among the given addresses and
//! sends the bearer token with every call.

use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use anyhow::{Context, anyhow, bail};
use coop_proto::v1::{
    audit_service_client::AuditServiceClient, cluster_service_client::ClusterServiceClient,
    job_service_client::JobServiceClient, member_service_client::MemberServiceClient,
    policy_service_client::PolicyServiceClient, usage_service_client::UsageServiceClient,
};
use http_body_util::BodyExt;
use tonic::Request;
use tonic::body::Body;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::args::ClientArgs;

pub struct Client {
    channel: Failover,
    auth: MetadataValue<tonic::metadata::Ascii>,
}

/// How long one scheduler has to take a connection (TCP and TLS) before the
/// next address is tried; `--timeout` when that is shorter.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// Checks the addresses and the credential; connects on the first call.
    pub async fn connect(args: &ClientArgs) -> anyhow::Result<Self> {
        let token = args
            .token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| anyhow!("token: no credential given (--token or COOP_TOKEN)"))?;
        let auth = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| anyhow!("token: not a valid token"))?;
        let tls = tls(args.ca.as_deref())?;
        let mut targets = Vec::new();
        for addr in args.addr.split(',').filter(|a| !a.trim().is_empty()) {
            let url = normalize_addr(addr, tls.is_some());
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|_| anyhow!("addr: {addr:?} is not an address"))?
                .connect_timeout(args.timeout.min(CONNECT_TIMEOUT))
                .tcp_nodelay(true);
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
            targets.push(Target {
                url,
                endpoint,
                channel: Default::default(),
            });
        }
        if targets.is_empty() {
            bail!("addr: no scheduler address given (--addr or COOP_ADDR)");
        }
        let failover = Failover(Arc::new(Targets {
            targets,
            current: AtomicUsize::new(0),
            timeout: args.timeout,
            hint: tls.is_none(),
        }));
        Ok(Self {
            channel: failover,
            auth,
        })
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }

    pub fn jobs(&self) -> JobServiceClient<Failover> {
        JobServiceClient::new(self.channel.clone())
    }
    pub fn members(&self) -> MemberServiceClient<Failover> {
        MemberServiceClient::new(self.channel.clone())
    }
    pub fn usage(&self) -> UsageServiceClient<Failover> {
        UsageServiceClient::new(self.channel.clone())
    }
    pub fn audit(&self) -> AuditServiceClient<Failover> {
        AuditServiceClient::new(self.channel.clone())
    }
    pub fn policy(&self) -> PolicyServiceClient<Failover> {
        PolicyServiceClient::new(self.channel.clone())
    }
    pub fn cluster(&self) -> ClusterServiceClient<Failover> {
        ClusterServiceClient::new(self.channel.clone())
    }
}

/// The schedulers of `--addr` as one gRPC channel. Each call goes to the one
/// that answered last; where it cannot be reached, does not answer within
/// `--timeout`, or says it did not carry the call out (no leader), the call
/// goes on to the next. A call that changes something and may have been
/// carried out (a timeout, a connection cut) is not sent again unless the
/// proto marks it idempotent: the error says so instead.
#[derive(Clone)]
pub struct Failover(Arc<Targets>);

struct Targets {
    targets: Vec<Target>,
    current: AtomicUsize,
    timeout: Duration,
    /// Say that COOP_CA may be missing when nothing could be reached.
    hint: bool,
}

struct Target {
    url: String,
    endpoint: Endpoint,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Target {
    async fn channel(&self, limit: Duration) -> Result<Channel, String> {
        let mut slot = self.channel.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        // The connect timeout covers TCP only: a scheduler that is stopped
        // (SIGSTOP) accepts the connection and then never finishes TLS.
        let c = match tokio::time::timeout(limit, self.endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("{}: {}", self.url, chain(&e))),
            Err(_) => {
                return Err(format!(
                    "{}: no connection within {}",
                    self.url,
                    humantime::format_duration(limit)
                ));
            }
        };
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn forget(&self) {
        *self.channel.lock().await = None;
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// The connection was refused: the call cannot have been delivered.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// `grpc-timeout`: the server may stop working on a call nobody waits for.
fn grpc_timeout(d: Duration) -> http::HeaderValue {
    let ms = d.as_millis().clamp(1, 99_999_999);
    http::HeaderValue::from_str(&format!("{ms}m")).expect("ascii digits")
}

impl Targets {
    async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = req.into_parts();
        // One request message (unary or server streaming): kept whole, so
        // that it can go to another scheduler.
        let bytes = body.collect().await?.to_bytes();
        let path = parts.uri.path().to_string();
        let method = path.trim_start_matches('/').to_string();
        let repeatable = coop_proto::v1::retry::RETRY_SAFE.contains(&path.as_str());
        let n = self.targets.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        let wait = humantime::format_duration(self.timeout);
        for i in 0..n {
            let k = (first + i) % n;
            let target = &self.targets[k];
            let mut channel = match target.channel(self.timeout.min(CONNECT_TIMEOUT)).await {
                Ok(c) => c,
                // Nothing was sent: any call may go on to the next.
                Err(why) => {
                    failures.push(why);
                    continue;
                }
            };
            let mut r = http::Request::new(Body::new(
                http_body_util::Full::new(bytes.clone()).map_err(|e| match e {}),
            ));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r.headers_mut()
                .insert("grpc-timeout", grpc_timeout(self.timeout));
            let outcome = tokio::time::timeout(self.timeout, async {
                use tower::{Service, ServiceExt};
                channel.ready().await?.call(r).await
            })
            .await;
            let why = match outcome {
                Ok(Ok(resp)) => {
                    // A trailers-only answer carries its status in the headers.
                    let status = Status::from_header_map(resp.headers());
                    let unavailable = status
                        .as_ref()
                        .is_some_and(|s| s.code() == Code::Unavailable);
                    let not_applied = resp.headers().contains_key(NOT_APPLIED_HEADER);
                    if unavailable && (repeatable || not_applied) {
                        let s = status.expect("checked");
                        failures.push(format!("{}: {}", target.url, s.message()));
                        continue;
                    }
                    self.current.store(k, Ordering::Relaxed);
                    return Ok(resp);
                }
                Ok(Err(e)) => {
                    target.forget().await;
                    // tonic's own timeouts (connecting, the HTTP/2 handshake)
                    // read as ours.
                    let why = if chain(&e).contains("Timeout expired") {
                        format!("{}: no answer within {wait} (--timeout)", target.url)
                    } else {
                        format!("{}: {}", target.url, chain(&e))
                    };
                    if refused(&e) {
                        failures.push(why);
                        continue;
                    }
                    why
                }
                Err(_) => {
                    target.forget().await;
                    format!("{}: no answer within {wait} (--timeout)", target.url)
                }
            };
            if !repeatable {
                let s = Status::unavailable(format!(
                    "{why}: {method} may or may not have been carried out; check before repeating it"
                ));
                return Err(Box::new(s));
            }
            failures.push(why);
        }
        let hint = if self.hint {
            " (if the schedulers serve TLS, set COOP_CA to the cluster's ca.pem)"
        } else {
            ""
        };
        Err(Box::new(Status::unavailable(format!(
            "no scheduler answered {method}{hint}: {}",
            failures.join("; ")
        ))))
    }
}

/// Metadata on an UNAVAILABLE answer: the scheduler did not carry the call
/// out (it knows no leader), so another may be asked.
pub use coop_scheduler::status::NOT_APPLIED_HEADER;

impl tower::Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let targets = self.0.clone();
        Box::pin(async move { targets.send(req).await })
    }
}
