//! Who may scrape a scheduler's metrics (they show every member's usage):
//! over TLS with the scheduler's certificate, with the operator's or an
//! auditor's bearer token, as Prometheus sends it (`authorization:
//! credentials_file`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// Whether a bearer token may read the metrics.
pub type Allow = Arc<dyn Fn(&str) -> bool + Send + Sync>;

pub struct Guard {
    pub tls: Arc<rustls::ServerConfig>,
    pub allow: Allow,
}

/// The `/metrics` route; with `allow`, a request without a token it takes
/// is answered 401.
pub fn app(registry: Registry, allow: Option<Allow>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let (registry, allow) = (registry.clone(), allow.clone());
            async move {
                if let Some(allow) = allow {
                    let token = headers
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "));
                    if !token.is_some_and(|t| allow(t.trim())) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Bearer".to_string())],
                            b"metrics: send the operator's or an auditor's token as a bearer token\n"
                                .to_vec(),
                        );
                    }
                }
                let mut buf = Vec::new();
                let encoder = TextEncoder::new();
                match encoder.encode(&registry.gather(), &mut buf) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
                        buf,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain".to_string())],
                        format!("encoding metrics: {e}").into_bytes(),
                    ),
                }
            }
        }),
    )
}

/// Connections whose TLS handshake is done. Handshakes run each in a task of
/// its own, with a deadline, so that a client that never finishes one holds
/// up no one else.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: Arc<rustls::ServerConfig>) -> Self {
        let local = tcp.local_addr().expect("a bound listener has an address");
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let shake = tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(stream));
                    if let Ok(Ok(tls)) = shake.await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Self { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor task ended: serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A scheduler's guard: its certificate, and the operator's or an auditor's
/// token as the cluster knows them now.
pub fn guard(
    replica: crate::replica::Replica,
    tls: &crate::tls::SchedulerTls,
) -> anyhow::Result<Guard> {
    use coop_core::state::Principal;
    let allow: Allow = Arc::new(move |token| {
        let hash = crate::auth::hash_token(token);
        matches!(
            replica.read().authenticate(&hash, crate::clock::now_ms()),
            Ok(Principal::Operator | Principal::Auditor(_))
        )
    });
    Ok(Guard {
        tls: tls.rustls_server()?,
        allow,
    })
}
