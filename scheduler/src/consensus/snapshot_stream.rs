//! A raft snapshot message as a stream of pieces (`SnapshotChunk`), and its
//! reassembly on the receiving node.
//!
//! raft-rs hands the transport a snapshot as one message holding the whole
//! state. Sent as one gRPC message it would sit in memory twice more (the
//! encoded request, the decoded one) and pass whole or not at all; in
//! pieces it streams under HTTP/2's flow control, so a slow follower slows
//! the stream instead of the leader buffering for it, and it travels on its
//! own call beside the heartbeats.

use bytes::Bytes;
use coop_proto::v1 as pb;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

/// Data per piece.
pub const PIECE_BYTES: usize = 1 << 20;
/// The largest snapshot a node takes (the state of a year is about 160 MB).
pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

/// The pieces of a snapshot message, made as they are asked for.
pub struct Pieces {
    first: Option<pb::SnapshotChunk>,
    data: Bytes,
    at: usize,
}

impl Pieces {
    pub fn new(from: u64, from_address: &str, mut msg: Message) -> Self {
        let data = msg.mut_snapshot().take_data();
        let message = msg.write_to_bytes().expect("a raft message encodes");
        Self {
            first: Some(pb::SnapshotChunk {
                from,
                from_address: from_address.to_string(),
                message,
                total_bytes: data.len() as u64,
                data: Vec::new(),
            }),
            data,
            at: 0,
        }
    }
}

impl Iterator for Pieces {
    type Item = pb::SnapshotChunk;

    fn next(&mut self) -> Option<pb::SnapshotChunk> {
        let end = (self.at + PIECE_BYTES).min(self.data.len());
        let data = self.data[self.at..end].to_vec();
        self.at = end;
        match self.first.take() {
            Some(mut first) => {
                first.data = data;
                Some(first)
            }
            None if data.is_empty() => None,
            None => Some(pb::SnapshotChunk {
                data,
                ..Default::default()
            }),
        }
    }
}

/// A snapshot message being received: its header from the first piece, and
/// the data so far.
#[derive(Debug)]
pub struct Assembly {
    from: u64,
    from_address: String,
    msg: Message,
    total: u64,
    data: Vec<u8>,
}

impl Assembly {
    /// From the first piece: the sender, a raft snapshot message without its
    /// data, and the data's length.
    pub fn start(first: pb::SnapshotChunk) -> Result<Self, String> {
        let msg = Message::parse_from_bytes(&first.message)
            .map_err(|e| format!("message: not a raft message: {e}"))?;
        if msg.get_msg_type() != MessageType::MsgSnapshot || !msg.get_snapshot().data.is_empty() {
            return Err("message: not a snapshot message without its data".into());
        }
        if msg.from != first.from {
            return Err(format!(
                "from: {} sends a snapshot of raft node {}",
                first.from, msg.from
            ));
        }
        if first.total_bytes > MAX_SNAPSHOT_BYTES {
            return Err(format!(
                "total_bytes: {} is over the {MAX_SNAPSHOT_BYTES} bytes a snapshot may have",
                first.total_bytes
            ));
        }
        let mut a = Self {
            from: first.from,
            from_address: first.from_address,
            msg,
            total: first.total_bytes,
            // Grown as data comes, never taken on the sender's word.
            data: Vec::with_capacity((first.total_bytes as usize).min(64 << 20)),
        };
        a.add(pb::SnapshotChunk {
            data: first.data,
            ..Default::default()
        })?;
        Ok(a)
    }

    /// A later piece: data only, never past the length announced.
    pub fn add(&mut self, piece: pb::SnapshotChunk) -> Result<(), String> {
        if !piece.message.is_empty() || piece.total_bytes != 0 {
            return Err("message: only the first piece says what the snapshot is".into());
        }
        if piece.data.len() > PIECE_BYTES {
            return Err(format!("data: a piece over {PIECE_BYTES} bytes"));
        }
        if self.data.len() as u64 + piece.data.len() as u64 > self.total {
            return Err(format!(
                "data: more than the {} bytes announced",
                self.total
            ));
        }
        self.data.extend_from_slice(&piece.data);
        Ok(())
    }

    /// The sender and the whole message, once every byte announced came.
    pub fn finish(mut self) -> Result<(u64, String, Message), String> {
        if self.data.len() as u64 != self.total {
            return Err(format!(
                "data: the stream ended after {} of {} bytes",
                self.data.len(),
                self.total
            ));
        }
        self.msg.mut_snapshot().set_data(self.data.into());
        Ok((self.from, self.from_address, self.msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_message(len: usize) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgSnapshot);
        msg.from = 1;
        msg.to = 2;
        msg.term = 7;
        let snap = msg.mut_snapshot();
        snap.mut_metadata().index = 12_345;
        snap.set_data(
            (0..len)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<_>>()
                .into(),
        );
        msg
    }

    fn reassembled(pieces: impl Iterator<Item = pb::SnapshotChunk>) -> Result<Message, String> {
        let mut pieces = pieces.into_iter();
        let mut a = Assembly::start(pieces.next().ok_or("no piece")?)?;
        for p in pieces {
            a.add(p)?;
        }
        let (from, address, msg) = a.finish()?;
        assert_eq!((from, address.as_str()), (1, "https://a:7000"));
        Ok(msg)
    }

    #[test]
    fn a_snapshot_comes_back_whole_from_its_pieces() {
        for len in [0, 1, PIECE_BYTES - 1, PIECE_BYTES, 3 * PIECE_BYTES + 17] {
            let msg = snapshot_message(len);
            let pieces: Vec<_> = Pieces::new(1, "https://a:7000", msg.clone()).collect();
            assert_eq!(
                pieces.len(),
                len.div_ceil(PIECE_BYTES).max(1),
                "{len} bytes"
            );
            assert!(pieces.iter().all(|p| p.data.len() <= PIECE_BYTES));
            assert_eq!(reassembled(pieces.into_iter()).unwrap(), msg, "{len} bytes");
        }
    }

    #[test]
    fn a_short_long_or_misshapen_stream_is_refused() {
        let msg = snapshot_message(2 * PIECE_BYTES + 5);
        let pieces = || Pieces::new(1, "https://a:7000", msg.clone());
        // Cut short: a piece lost.
        let short = pieces().take(2);
        assert!(reassembled(short).unwrap_err().contains("ended after"));
        // A piece sent twice: more than announced.
        let p: Vec<_> = pieces().collect();
        let twice = p.clone().into_iter().chain(std::iter::once(p[1].clone()));
        assert!(reassembled(twice).unwrap_err().contains("more than"));
        // A second header midway.
        let again = p.clone().into_iter().chain(std::iter::once(p[0].clone()));
        assert!(reassembled(again).unwrap_err().starts_with("message:"));
        // A header that is not a snapshot, or claims too much.
        let mut not = p[0].clone();
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        not.message = heartbeat.write_to_bytes().unwrap();
        assert!(Assembly::start(not).is_err());
        let mut huge = p[0].clone();
        huge.total_bytes = MAX_SNAPSHOT_BYTES + 1;
        assert!(
            Assembly::start(huge)
                .unwrap_err()
                .starts_with("total_bytes:")
        );
        let mut garbage = p[0].clone();
        garbage.message = vec![0xff; 9];
        assert!(Assembly::start(garbage).is_err());
        // A sender naming another node as the snapshot's source.
        let mut other = p[0].clone();
        other.from = 3;
        assert!(Assembly::start(other).unwrap_err().starts_with("from:"));
        // A piece larger than pieces are.
        let mut a = Assembly::start(p[0].clone()).unwrap();
        let big = pb::SnapshotChunk {
            data: vec![0; PIECE_BYTES + 1],
            ..Default::default()
        };
        assert!(a.add(big).unwrap_err().contains("a piece over"));
    }
}
