//! Raft messages between scheduler nodes over tonic: one sender task per peer,
//! a bounded queue in front of it, reconnects with back-off.
//!
//! A full queue or a failed call drops messages: raft retransmits what matters,
//! and hearing that a peer is unreachable lets it slow down instead of piling up.
//!
//! Peers call each other over mutual TLS: each presents its certificate from
//! the cluster CA and verifies the other's (`crate::tls`).

use std::collections::HashMap;
use std::time::Duration;

use coop_proto::v1 as pb;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::snapshot_stream::Pieces;

/// How this node calls its peers: mutual TLS, or plain text for a lone node
/// started `--insecure` (which has no peers to call).
pub type PeerTls = Option<ClientTlsConfig>;

/// Messages waiting for one peer; beyond this they are dropped.
const QUEUE: usize = 4096;
/// Messages sent in one call.
const BATCH: usize = 256;
/// A batch of appends may be large (raft sends an entry whole, whatever
/// `max_size_per_msg` says); it must not be cut by gRPC's 4 MiB default.
/// Snapshots travel apart, in pieces (`snapshot_stream`).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;
/// How long a snapshot's stream may stall (a piece not taken, or no answer
/// after the last) before the send counts as failed.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);

/// What the node loop hears back from senders.
#[derive(Debug)]
pub enum Feedback {
    Unreachable(u64),
    SnapshotFailed(u64),
    /// Delivered: the leader resumes replicating after it.
    SnapshotSent(u64),
}

pub struct Transport {
    from: u64,
    from_address: String,
    tls: PeerTls,
    peers: HashMap<u64, Peer>,
    feedback: mpsc::UnboundedSender<Feedback>,
}

struct Peer {
    address: String,
    tx: mpsc::Sender<Message>,
}

impl Transport {
    pub fn new(
        from: u64,
        from_address: String,
        tls: PeerTls,
        feedback: mpsc::UnboundedSender<Feedback>,
    ) -> Self {
        Self {
            from,
            from_address,
            tls,
            peers: HashMap::new(),
            feedback,
        }
    }

    /// Queues `msgs`; `address` tells where each peer is.
    pub fn send(&mut self, msgs: Vec<Message>, address: impl Fn(u64) -> Option<String>) {
        for msg in msgs {
            let to = msg.to;
            let Some(addr) = address(to) else {
                tracing::debug!("no address for raft peer {to}; message dropped");
                continue;
            };
            // A peer seen at a new address gets a new sender (the old one ends).
            if self.peers.get(&to).is_none_or(|p| p.address != addr) {
                let peer = spawn_peer(
                    self.from,
                    &self.from_address,
                    &self.tls,
                    to,
                    &addr,
                    &self.feedback,
                );
                self.peers.insert(to, peer);
            }
            let peer = &self.peers[&to];
            let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            if peer.tx.try_send(msg).is_err() {
                let _ = self.feedback.send(Feedback::Unreachable(to));
                if snapshot {
                    let _ = self.feedback.send(Feedback::SnapshotFailed(to));
                }
            }
        }
    }

    /// Forgets peers no longer in the cluster (their sender tasks end).
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.peers.retain(|id, _| keep(*id));
    }
}

fn spawn_peer(
    from: u64,
    from_address: &str,
    tls: &PeerTls,
    to: u64,
    address: &str,
    feedback: &mpsc::UnboundedSender<Feedback>,
) -> Peer {
    let (tx, rx) = mpsc::channel(QUEUE);
    let sender = Sender {
        from,
        from_address: from_address.to_string(),
        tls: tls.clone(),
        to,
        address: address.to_string(),
        feedback: feedback.clone(),
    };
    tokio::spawn(sender.run(rx));
    Peer {
        address: address.to_string(),
        tx,
    }
}

struct Sender {
    from: u64,
    from_address: String,
    tls: PeerTls,
    to: u64,
    address: String,
    feedback: mpsc::UnboundedSender<Feedback>,
}

/// `host:port` or a URL into a URL: `https://` where TLS is used.
pub fn normalize(address: &str, tls: bool) -> String {
    let address = address.trim();
    if address.contains("://") {
        address.to_string()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

/// How long a connection to a peer (TCP and TLS) or one batch of raft
/// messages may take before the peer is taken as unreachable.
const PEER_PATIENCE: Duration = Duration::from_secs(5);

/// An endpoint of a peer's raft service.
pub fn endpoint(address: &str, tls: &PeerTls) -> Result<Endpoint, tonic::transport::Error> {
    let ep = Endpoint::from_shared(normalize(address, tls.is_some()))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true);
    match tls {
        Some(t) => ep.tls_config(t.clone()),
        None => Ok(ep),
    }
}

pub fn client(channel: Channel) -> pb::raft_service_client::RaftServiceClient<Channel> {
    pb::raft_service_client::RaftServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl Sender {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut conn = None;
        let mut backoff = Duration::from_millis(50);
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            // Snapshots stream on calls of their own, so that heartbeats and
            // votes keep flowing while a large state is on its way.
            for snap in batch.extract_if(.., |m| m.get_msg_type() == MessageType::MsgSnapshot) {
                tokio::spawn(self.send_snapshot(snap));
            }
            if batch.is_empty() {
                continue;
            }
            let messages = batch
                .drain(..)
                .filter_map(|m| m.write_to_bytes().ok())
                .collect();
            let body = pb::RaftBatch {
                from: self.from,
                from_address: self.from_address.clone(),
                messages,
            };
            // A peer that accepts and then never answers (its TLS handshake
            // or the call) must read as unreachable, not hold this sender
            // for good: raft would never hear of it.
            if conn.is_none() {
                conn = match endpoint(&self.address, &self.tls) {
                    Ok(ep) => tokio::time::timeout(PEER_PATIENCE, ep.connect())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(client),
                    Err(_) => None,
                };
            }
            let sent = match conn.as_mut() {
                Some(c) => tokio::time::timeout(PEER_PATIENCE, c.send(body))
                    .await
                    .is_ok_and(|r| r.is_ok()),
                None => false,
            };
            if sent {
                backoff = Duration::from_millis(50);
                continue;
            }
            conn = None;
            let _ = self.feedback.send(Feedback::Unreachable(self.to));
            // What queued up meanwhile is stale; raft will resend what it
            // needs, except a snapshot, which it waits to hear of: that one
            // goes on its own call.
            while let Ok(m) = rx.try_recv() {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    tokio::spawn(self.send_snapshot(m));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

impl Sender {
    /// Streams one snapshot message in pieces and says how it went: raft
    /// holds the follower in snapshot state until it hears.
    fn send_snapshot(&self, msg: Message) -> impl std::future::Future<Output = ()> + use<> {
        let (to, address, tls) = (self.to, self.address.clone(), self.tls.clone());
        let feedback = self.feedback.clone();
        let pieces = Pieces::new(self.from, &self.from_address, msg);
        async move {
            let sent = stream_snapshot(&address, &tls, pieces).await;
            if let Err(e) = &sent {
                tracing::warn!("sending a snapshot to raft peer {to} at {address} failed: {e}");
            }
            let _ = feedback.send(match sent {
                Ok(()) => Feedback::SnapshotSent(to),
                Err(_) => Feedback::SnapshotFailed(to),
            });
        }
    }
}

async fn stream_snapshot(address: &str, tls: &PeerTls, pieces: Pieces) -> Result<(), String> {
    let mut client = client(
        endpoint(address, tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?,
    );
    // Pieces go through a small channel: a follower that stops taking them
    // (HTTP/2's window stays shut) is noticed here, not waited on forever.
    let (tx, rx) = mpsc::channel(2);
    let call = client.send_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
    tokio::pin!(call);
    let feed = async move {
        for piece in pieces {
            if tx.send_timeout(piece, SNAPSHOT_STALL).await.is_err() {
                return false;
            }
        }
        true
    };
    tokio::select! {
        answer = &mut call => {
            answer.map_err(|s| s.message().to_string())?;
            Err("the peer answered before the snapshot was whole".into())
        }
        fed = feed => {
            if !fed {
                return Err(format!("no piece taken for {SNAPSHOT_STALL:?}"));
            }
            match tokio::time::timeout(SNAPSHOT_STALL, call).await {
                Ok(answer) => answer.map(drop).map_err(|s| s.message().to_string()),
                Err(_) => Err(format!("no answer {SNAPSHOT_STALL:?} after the last piece")),
            }
        }
    }
}
