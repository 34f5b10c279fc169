//! The audit ledger: a hash chain over everything that bills or governs.
//!
//! Each entry has a sequence number and the SHA-256 of its canonical encoding
//! (the JSON of `(seq, at_ms, entry)`) joined to the previous entry's hash, so
//! changing, removing or reordering any entry changes every hash after it.
//! Every scheduler makes the same chain as it applies the log: the replicated
//! state keeps only its head ([`Head`]), the records go to each replica's
//! store in the same transaction as the applied index. An auditor who keeps the head hash of an export can later prove that
//! the cluster's ledger still starts with exactly what was exported.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{JobId, UsageRecord};

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A billed usage interval.
    Usage(UsageRecord),
    MemberAdded {
        member: String,
    },
    PolicyChanged {
        by: String,
        reason: String,
        settings: Vec<String>,
    },
    PolicyProposed {
        id: u64,
        by: String,
        reason: String,
        settings: Vec<String>,
        expires_at_ms: i64,
    },
    PolicyApproved {
        id: u64,
        member: String,
    },
    /// A run stopped to make room for another member's job.
    Preemption {
        job: JobId,
        member: String,
        for_job: JobId,
        for_member: String,
    },
    /// Who may act changed: `account` is `member:NAME`, `auditor:NAME`,
    /// `node:NAME` or `operator`; `change` what happened to it (added,
    /// token_rotated, suspended, resumed, removed, enrolled, joined, revoked).
    AccountChanged {
        account: String,
        change: String,
    },
    /// A node's report that failed the plausibility checks: kept as
    /// evidence; it billed nothing.
    ReportRejected {
        node: String,
        job: JobId,
        attempt: u32,
        report: String,
        reason: String,
    },
}

impl Entry {
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Usage(_) => "usage",
            Entry::MemberAdded { .. } => "member_added",
            Entry::PolicyChanged { .. } => "policy_changed",
            Entry::PolicyProposed { .. } => "policy_proposed",
            Entry::PolicyApproved { .. } => "policy_approved",
            Entry::Preemption { .. } => "preemption",
            Entry::AccountChanged { .. } => "account_changed",
            Entry::ReportRejected { .. } => "report_rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub at_ms: i64,
    #[serde(flatten)]
    pub entry: Entry,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of an entry: SHA-256 over the previous hash, a newline, and the
/// canonical JSON of `[seq, at_ms, entry]`.
pub fn hash(prev: &str, seq: u64, at_ms: i64, entry: &Entry) -> String {
    let body = serde_json::to_vec(&(seq, at_ms, entry)).expect("entries encode");
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(&body);
    hex::encode(h.finalize())
}

/// The last link of a chain: what the replicated state keeps of it (the
/// records themselves go to each replica's store as they are made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// 0 for an empty chain.
    pub seq: u64,
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

impl Head {
    /// The record of `entry` after this head, and the head moved onto it.
    pub fn link(&mut self, at_ms: i64, entry: Entry) -> Record {
        let seq = self.seq + 1;
        let hash = hash(&self.hash, seq, at_ms, &entry);
        let prev_hash = std::mem::replace(&mut self.hash, hash.clone());
        self.seq = seq;
        Record {
            seq,
            at_ms,
            entry,
            prev_hash,
            hash,
        }
    }
}

/// Appends `entry` to `chain`.
pub fn append(chain: &mut Vec<Record>, at_ms: i64, entry: Entry) {
    let mut head = chain.last().map_or_else(Head::default, |r| Head {
        seq: r.seq,
        hash: r.hash.clone(),
    });
    chain.push(head.link(at_ms, entry));
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {seq}: {problem}")]
pub struct Broken {
    pub seq: u64,
    pub problem: String,
}

/// Checks a run of consecutive records (a whole chain, or a period of one):
/// sequence numbers follow each other, each links to the one before, and
/// each hash matches its contents. Names the first record that does not.
pub fn verify(records: &[Record]) -> Result<(), Broken> {
    let mut prev: Option<&Record> = None;
    for r in records {
        let broken = |problem: String| Broken {
            seq: r.seq,
            problem,
        };
        if let Some(p) = prev {
            if r.seq != p.seq + 1 {
                return Err(broken(format!(
                    "follows entry {} (missing or reordered entries)",
                    p.seq
                )));
            }
            if r.prev_hash != p.hash {
                return Err(broken("does not link to the entry before it".into()));
            }
        } else if r.seq == 1 && r.prev_hash != GENESIS {
            return Err(broken(
                "the first entry must link to the genesis hash".into(),
            ));
        }
        if hash(&r.prev_hash, r.seq, r.at_ms, &r.entry) != r.hash {
            return Err(broken("its contents do not match its hash".into()));
        }
        prev = Some(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Record> {
        let mut c = Vec::new();
        for i in 0..n {
            append(
                &mut c,
                i as i64,
                Entry::MemberAdded {
                    member: format!("m{i}"),
                },
            );
        }
        c
    }

    #[test]
    fn an_untouched_chain_verifies_and_any_change_is_named() {
        let c = chain(5);
        assert_eq!(verify(&c), Ok(()));
        assert_eq!(verify(&c[2..]), Ok(()), "a period verifies on its own");

        let mut edited = c.clone();
        edited[2].entry = Entry::MemberAdded {
            member: "mallory".into(),
        };
        assert_eq!(verify(&edited).unwrap_err().seq, 3);

        let mut dropped = c.clone();
        dropped.remove(1);
        assert_eq!(verify(&dropped).unwrap_err().seq, 3);

        // Rehashing the edited entry is not enough: the next one no longer links.
        let mut rehashed = edited.clone();
        rehashed[2].hash = hash(&rehashed[2].prev_hash, 3, 2, &rehashed[2].entry);
        assert_eq!(verify(&rehashed).unwrap_err().seq, 4);
    }
}
