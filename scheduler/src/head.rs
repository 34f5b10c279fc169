//! Signed heads of the audit chain: what an auditor (or a member, as a
//! witness) saves so that a history rewritten outside raft can be caught later.
//!
//! A head names the chain's last entry (`seq`, `hash`) and is signed with the
//! answering scheduler's ed25519 key over a fixed, versioned byte string. The
//! chain's hashes link every entry to all before it, so a chain that still
//! holds `hash` at `seq` is the saved history plus what came after; one that
//! does not was rewritten at or before `seq`, or cut short. The signature makes
//! a saved head evidence: no one can edit it (to claim a history the cluster
//! never had) without its key.
//!
//! Pure: no I/O, no clock. Keys are made and kept by `signer`.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use coop_core::ledger::{GENESIS, Record};

/// What the signature covers; a new layout gets a new version.
pub const FORMAT: &str = "coop-audit-head/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub format: String,
    /// The last entry's sequence number; 0 for an empty chain.
    pub seq: u64,
    /// The last entry's hash (the genesis hash for an empty chain).
    pub hash: String,
    /// When the scheduler signed it, by its own clock.
    pub at_ms: i64,
    /// The signing scheduler's raft id.
    pub scheduler_id: u64,
    /// Its ed25519 public key, hex.
    pub public_key: String,
    /// Hex.
    pub signature: String,
}

/// The bytes a head's signature covers.
pub fn canonical(seq: u64, hash: &str, at_ms: i64, scheduler_id: u64) -> Vec<u8> {
    format!("{FORMAT}\n{seq}\n{hash}\n{at_ms}\n{scheduler_id}\n").into_bytes()
}

/// Signs the head `(seq, hash)` as scheduler `scheduler_id` at `at_ms`.
pub fn sign(
    key: &Ed25519KeyPair,
    seq: u64,
    hash: &str,
    at_ms: i64,
    scheduler_id: u64,
) -> SignedHead {
    let signature = key.sign(&canonical(seq, hash, at_ms, scheduler_id));
    SignedHead {
        format: FORMAT.to_string(),
        seq,
        hash: hash.to_string(),
        at_ms,
        scheduler_id,
        public_key: hex::encode(key.public_key().as_ref()),
        signature: hex::encode(signature.as_ref()),
    }
}

/// Why a head is not one: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BadHead {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> BadHead {
    BadHead {
        field,
        problem: problem.into(),
    }
}

/// `bytes` bytes as lowercase hex.
fn hex_field(field: &'static str, value: &str, bytes: usize) -> Result<Vec<u8>, BadHead> {
    let lower = value
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if value.len() != 2 * bytes || !lower {
        return Err(bad(
            field,
            format!("expected {} lowercase hex digits, got {value:?}", 2 * bytes),
        ));
    }
    hex::decode(value).map_err(|e| bad(field, e.to_string()))
}

/// Checks that `h` is well formed and signed by the key it names. (Whether
/// that key is the cluster's is for the reader to judge: it is printed.)
pub fn check_signature(h: &SignedHead) -> Result<(), BadHead> {
    if h.format != FORMAT {
        return Err(bad(
            "format",
            format!("{:?} is not {FORMAT:?}, the only format known", h.format),
        ));
    }
    hex_field("hash", &h.hash, 32)?;
    if h.seq == 0 && h.hash != GENESIS {
        return Err(bad(
            "hash",
            "the head of an empty chain is the genesis hash",
        ));
    }
    let key = hex_field("public_key", &h.public_key, 32)?;
    let sig = hex_field("signature", &h.signature, 64)?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&canonical(h.seq, &h.hash, h.at_ms, h.scheduler_id), &sig)
        .map_err(|_| {
            bad(
                "signature",
                "does not match the head: it was edited, or not signed by the key it names",
            )
        })
}

/// How a chain fails to extend a saved head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    #[error(
        "entry {seq}: its hash is {found}, the saved head says {expected}: the history at or before entry {seq} was rewritten"
    )]
    Rewritten {
        seq: u64,
        found: String,
        expected: String,
    },
    #[error(
        "entry {seq}: the chain ends at entry {last}, before the saved head's entry {seq}: it was truncated"
    )]
    Truncated { seq: u64, last: u64 },
    #[error(
        "entry {seq}: the records start at entry {first}, after the saved head's entry: check an export from the beginning"
    )]
    NotCovered { seq: u64, first: u64 },
}

impl Divergence {
    /// The entry the saved head and the chain disagree on.
    pub fn seq(&self) -> u64 {
        match self {
            Divergence::Rewritten { seq, .. }
            | Divergence::Truncated { seq, .. }
            | Divergence::NotCovered { seq, .. } => *seq,
        }
    }
}

/// Does `records` (consecutive entries that `ledger::verify` accepted) hold
/// the saved head's entry with its hash? Then, by the hash links, it holds
/// exactly the history the head was signed over, and extends it.
pub fn extends(records: &[Record], head: &SignedHead) -> Result<(), Divergence> {
    if head.seq == 0 {
        // Every chain extends the empty one.
        return Ok(());
    }
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(Divergence::Truncated {
            seq: head.seq,
            last: 0,
        });
    };
    if head.seq < first.seq {
        return Err(Divergence::NotCovered {
            seq: head.seq,
            first: first.seq,
        });
    }
    if head.seq > last.seq {
        return Err(Divergence::Truncated {
            seq: head.seq,
            last: last.seq,
        });
    }
    let r = &records[(head.seq - first.seq) as usize];
    debug_assert_eq!(r.seq, head.seq, "records are consecutive");
    if r.hash != head.hash {
        return Err(Divergence::Rewritten {
            seq: head.seq,
            found: r.hash.clone(),
            expected: head.hash.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use coop_core::ledger::{Entry, append};

    /// A fixed key (ring makes keys from a random source; tests need none).
    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap()
    }

    fn chain(members: &[&str]) -> Vec<Record> {
        let mut c = Vec::new();
        for (i, m) in members.iter().enumerate() {
            append(
                &mut c,
                i as i64,
                Entry::MemberAdded {
                    member: m.to_string(),
                },
            );
        }
        c
    }

    #[test]
    fn a_signed_head_verifies_and_any_edit_of_it_is_refused() {
        let c = chain(&["a", "b", "c"]);
        let h = sign(&key(), 3, &c[2].hash, 1_000, 2);
        assert_eq!(check_signature(&h), Ok(()));
        assert_eq!(h.format, FORMAT);

        type Edit = fn(&mut SignedHead);
        let edits: [(&str, Edit); 5] = [
            ("signature", |h| h.seq = 2),
            ("signature", |h| h.at_ms += 1),
            ("signature", |h| h.scheduler_id = 1),
            ("signature", |h| {
                let last = if h.hash.ends_with('0') { '1' } else { '0' };
                h.hash = format!("{}{last}", &h.hash[..63]);
            }),
            ("format", |h| h.format = "coop-audit-head/v2".into()),
        ];
        for (field, edit) in edits {
            let mut e = h.clone();
            edit(&mut e);
            assert_eq!(check_signature(&e).unwrap_err().field, field, "{e:?}");
        }
        // Another key's signature over the same head is refused too.
        let other = Ed25519KeyPair::from_seed_unchecked(&[8; 32]).unwrap();
        let mut e = h.clone();
        e.signature = sign(&other, 3, &c[2].hash, 1_000, 2).signature;
        assert_eq!(check_signature(&e).unwrap_err().field, "signature");
        // Malformed fields are named.
        let mut e = h.clone();
        e.hash = "XYZ".into();
        assert_eq!(check_signature(&e).unwrap_err().field, "hash");
        let mut e = h.clone();
        e.public_key.pop();
        assert_eq!(check_signature(&e).unwrap_err().field, "public_key");
        let mut e = h.clone();
        e.signature = e.signature.to_uppercase();
        assert_eq!(check_signature(&e).unwrap_err().field, "signature");
        // An empty chain's head is the genesis hash.
        assert_eq!(check_signature(&sign(&key(), 0, GENESIS, 5, 1)), Ok(()));
        let e = sign(&key(), 0, &c[0].hash, 5, 1);
        assert_eq!(check_signature(&e).unwrap_err().field, "hash");
    }

    #[test]
    fn a_chain_extends_its_own_heads_and_not_a_rewritten_or_shorter_one() {
        let c = chain(&["a", "b", "c", "d"]);
        let head_at = |n: usize| sign(&key(), n as u64, &c[n - 1].hash, 0, 1);
        for n in 1..=4 {
            assert_eq!(extends(&c, &head_at(n)), Ok(()), "head {n}");
        }
        assert_eq!(extends(&c, &sign(&key(), 0, GENESIS, 0, 1)), Ok(()));
        assert_eq!(extends(&[], &sign(&key(), 0, GENESIS, 0, 1)), Ok(()));
        // A period that holds the head's entry is enough.
        assert_eq!(extends(&c[1..], &head_at(3)), Ok(()));

        // The same history with entry 2 changed: every later hash differs.
        let rewritten = chain(&["a", "mallory", "c", "d"]);
        assert_eq!(extends(&rewritten, &head_at(1)), Ok(()));
        let d = extends(&rewritten, &head_at(3)).unwrap_err();
        assert!(matches!(d, Divergence::Rewritten { seq: 3, .. }), "{d}");
        assert!(d.to_string().starts_with("entry 3:"), "{d}");

        let d = extends(&c[..2], &head_at(3)).unwrap_err();
        assert_eq!(d, Divergence::Truncated { seq: 3, last: 2 });
        assert_eq!(
            extends(&[], &head_at(1)).unwrap_err(),
            Divergence::Truncated { seq: 1, last: 0 }
        );
        let d = extends(&c[2..], &head_at(2)).unwrap_err();
        assert_eq!(d, Divergence::NotCovered { seq: 2, first: 3 });
        assert_eq!(d.seq(), 2);
    }
}
