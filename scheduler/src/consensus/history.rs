//! The history a replica keeps outside its memory: the audit chain (usage
//! records among it) and the finished jobs that left the state. Every replica
//! makes the same history as it applies the log, and stores it in the same
//! transaction as the rest of that Ready, tagged with the index of the entry
//! that made it: replaying an entry after a restart makes the same rows again,
//! so the write is idempotent.
//!
//! A snapshot carries the state only, so that it stays small for years. A
//! replica that installs one has a gap: the history of the entries the
//! snapshot covers and it never applied. It copies that from a peer that holds
//! it (`history_copy`) and refuses history reads until it has.

use coop_core::ledger::{Head, Record};
use coop_core::state::{Job, Outbox};

/// One piece of history.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Record(Record),
    /// A finished job whose retention passed: final, as it left memory.
    Retired(Box<Job>),
}

/// Items by the log index of the entry whose apply made them.
pub type Tagged = Vec<(u64, Item)>;

/// Tags what one entry's apply made with its index.
pub fn tag(index: u64, out: Outbox, into: &mut Tagged) {
    into.extend(out.records.into_iter().map(|r| (index, Item::Record(r))));
    into.extend(
        out.retired
            .into_iter()
            .map(|j| (index, Item::Retired(Box::new(j)))),
    );
}

/// Entries `(from, to]` whose history a replica does not hold, and the audit
/// chain's head after entry `to` (the installed snapshot's): what the copied
/// records must end at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub head: Head,
}

impl Gap {
    /// The gap after installing a snapshot at `to` whose chain ends at `head`,
    /// on a replica whose history runs to `applied`, with the gap it already
    /// had, if any.
    pub fn after_install(before: Option<Gap>, applied: u64, to: u64, head: Head) -> Option<Gap> {
        let from = before.map_or(applied, |g| g.from.min(applied));
        (to > from).then_some(Gap { from, to, head })
    }
}
