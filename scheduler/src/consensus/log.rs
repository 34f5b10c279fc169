//! The raft log as raft-rs reads it: the last snapshot, the entries after it,
//! the hard state and the conf state, all in memory.
//!
//! raft-rs's `Storage` is synchronous, so the node keeps this view in memory and
//! makes each change durable through its disk (SQLite, or the simulation's) before
//! it tells raft the change is persisted. At start the disk loads it back.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::history::Tagged;

/// What must be durable before the node goes on (`Core::persisted`).
#[derive(Debug, Default)]
pub struct Persist {
    /// A snapshot to store. With `replace_log`, it came from the leader and
    /// replaces the whole log; otherwise it is ours and drops the entries it covers.
    pub snapshot: Option<Snapshot>,
    pub replace_log: bool,
    /// Entries to append; any stored entry at or after the first one's index goes.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub conf_state: Option<ConfState>,
    /// History made by the entries applied since the last write, and the
    /// index applied with it (see `history`).
    pub history: Tagged,
    pub applied: Option<u64>,
    /// A snapshot from the leader was installed over history that ran to
    /// `.0`: the history of entries `(.0, snapshot index]` is missing, and
    /// ends at the snapshot's chain head `.1`.
    pub installed_over: Option<(u64, coop_core::ledger::Head)>,
}

impl Persist {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.history.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Log {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// The latest snapshot, with its data; entries[0] follows it directly.
    pub snapshot: Snapshot,
    pub entries: Vec<Entry>,
}

impl Log {
    /// A fresh log whose first configuration is `voters`.
    pub fn with_voters(voters: &[u64]) -> Self {
        let mut log = Self::default();
        log.conf_state.set_voters(voters.to_vec());
        log.snapshot
            .mut_metadata()
            .set_conf_state(log.conf_state.clone());
        log
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    pub fn last(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    /// Appends `entries`, replacing any conflicting suffix.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        // Entries at or before the snapshot are already covered by it.
        let skip = self.first().saturating_sub(first.index) as usize;
        let Some(first) = entries.get(skip) else {
            return;
        };
        let keep = (first.index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(&entries[skip..]);
    }

    /// Replaces everything the snapshot covers (a snapshot received from the leader
    /// replaces the whole log: raft sends one only when the logs diverge).
    pub fn install(&mut self, snapshot: Snapshot) {
        let meta = snapshot.get_metadata();
        self.entries.clear();
        // Only committed state is snapshotted. Term and vote stay raft's own:
        // it reports them in the Ready's hard state.
        self.hard_state
            .set_commit(self.hard_state.commit.max(meta.index));
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snapshot;
    }

    /// Takes `snapshot` of our own applied state and drops the entries it covers.
    pub fn compact(&mut self, snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        let drop = (index.saturating_sub(self.snapshot_index()) as usize).min(self.entries.len());
        self.entries.drain(..drop);
        self.snapshot = snapshot;
    }

    /// Applies what a Ready made durable: the same changes the SQLite disk
    /// makes to its tables (the simulation's disk is this).
    pub fn persist(&mut self, p: &Persist) {
        if let Some(snap) = &p.snapshot {
            if p.replace_log {
                self.install(snap.clone());
            } else {
                self.compact(snap.clone());
            }
        }
        self.append(&p.entries);
        if let Some(hs) = &p.hard_state {
            self.hard_state = hs.clone();
        }
        if let Some(cs) = &p.conf_state {
            self.conf_state = cs.clone();
        }
    }

    /// A log as read back from disk: the commit index is at least the
    /// snapshot's (only committed state is ever snapshotted).
    pub fn normalised(mut self) -> Self {
        let index = self.snapshot_index();
        if self.hard_state.commit < index {
            self.hard_state.commit = index;
        }
        self
    }

    fn entry(&self, idx: u64) -> Option<&Entry> {
        idx.checked_sub(self.first())
            .and_then(|i| self.entries.get(i as usize))
    }
}

impl Storage for Log {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = (low - self.first()) as usize;
        let to = (high - self.first()) as usize;
        let mut out = self.entries[from..to].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entry(idx)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots are taken as the state is applied; a newer one comes soon.
        if self.snapshot_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_replaces_a_conflicting_suffix() {
        let mut log = Log::with_voters(&[1]);
        log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        log.append(&[entry(2, 2)]);
        assert_eq!(log.last(), 2);
        assert_eq!(log.term(2).unwrap(), 2);
        assert_eq!(log.term(1).unwrap(), 1);
        assert!(log.term(3).is_err());
    }

    #[test]
    fn compaction_keeps_the_tail_and_the_snapshot_term() {
        let mut log = Log::with_voters(&[1]);
        log.append(&[entry(1, 1), entry(2, 1), entry(3, 2)]);
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 1;
        log.compact(snap);
        assert_eq!(log.first(), 3);
        assert_eq!(log.last(), 3);
        assert_eq!(log.term(2).unwrap(), 1);
        assert!(matches!(
            log.entries(1, 3, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            log.entries(3, 4, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
        // Entries older than the snapshot are ignored, newer ones appended.
        log.append(&[entry(2, 1), entry(3, 2), entry(4, 2)]);
        assert_eq!(log.last(), 4);
    }
}
