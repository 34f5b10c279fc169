//! One raft node around the scheduler's state machine, with no I/O.
//!
//! The shell (a tokio task with SQLite and tonic, or the deterministic
//! simulation) feeds it ticks, peer messages and proposals, then drains it in
//! two steps that follow raft-rs's Ready protocol:
//!
//! 1. [`Core::ready`] hands out the messages that may go at once, applies a
//!    received snapshot and the newly committed entries, and stages what must be
//!    made durable ([`Persist`]);
//! 2. after the shell has written that in one transaction, [`Core::persisted`]
//!    releases the messages that had to wait for it, advances raft and applies
//!    what became committed meanwhile.
//!
//! After each batch of applies the state is published to readers as a
//! [`StateView`] (shared, not copied). Every `snapshot_every` entries,
//! [`Core::snapshot_due`] hands out the latest view; the shell encodes it
//! wherever it likes (encoding a large state takes seconds) and gives it back
//! with [`Core::snapshot_built`].
//!
//! A proposal is answered only when its entry is applied, with apply's result. A
//! proposal's entry is recognised by (index, term): by raft's log matching, no
//! other entry can hold both, so a different entry at that index means ours was
//! never committed and the caller may safely retry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};
use serde::{Deserialize, Serialize};

use super::history::{self, Tagged};
use super::log::{Log, Persist};
use super::view::Views;
use coop_core::codec;
use coop_core::state::{Command, Event, Op, Rejection, State};

/// What a snapshot holds besides raft's metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotData {
    pub state: State,
    /// Addresses of the scheduler nodes, by raft id.
    pub peers: BTreeMap<u64, String>,
}

/// The context of a membership change entry: the node's address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfContext {
    pub id: u64,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not the leader")]
pub struct NotLeader {
    /// The leader this node knows of, if any.
    pub leader: Option<u64>,
}

/// Why a proposal was not appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// The command would not read back exactly as written (a bug in coop).
    #[error("the command cannot be written to the log: {0}")]
    Unwritable(String),
}

pub type ApplyResult = Result<Vec<Event>, Rejection>;

/// What the shell acts on after a step.
#[derive(Debug, Default)]
pub struct Done {
    /// Messages for peers.
    pub messages: Vec<Message>,
    /// Proposals whose entries were applied, with the result.
    pub results: Vec<(u64, ApplyResult)>,
    /// Proposals whose entries were replaced: they were never committed.
    pub dropped: Vec<u64>,
    /// ReadIndex requests answered: the index the reader must wait for.
    pub reads: Vec<(u64, u64)>,
    /// What changed, for watchers.
    pub events: Vec<Event>,
}

pub struct Staged {
    ready: Option<raft::Ready>,
    /// Send these now (they need nothing durable).
    pub messages: Vec<Message>,
    /// Write this in one transaction, then call [`Core::persisted`].
    pub persist: Persist,
    /// Entries committed (durable on a quorum) and applied: their proposers
    /// may be answered before `persist` is written.
    pub done: Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub role: &'static str,
    pub term: u64,
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

pub struct Core {
    raw: RawNode<Log>,
    /// The state machine, changed only here.
    state: State,
    /// Where readers get it (see `view`).
    views: Views,
    peers: BTreeMap<u64, String>,
    /// Nodes removed from the cluster: a removed node that does not know it
    /// yet keeps sending, and must not be learnt back as a peer.
    removed: BTreeSet<u64>,
    applied: u64,
    /// The latest command time seen: stamps never go backwards.
    last_at_ms: i64,
    snapshot_every: u64,
    /// Our proposals by log index: (token, term).
    proposals: BTreeMap<u64, (u64, u64)>,
    /// A snapshot we took that is not durable yet.
    own_snapshot: Option<Snapshot>,
    /// Where a snapshot last failed to read back; the next try waits
    /// `snapshot_every` entries.
    snapshot_refused_at: u64,
    /// A [`SnapshotJob`] is out being built.
    snapshot_building: bool,
    /// The commit index moved outside a Ready; stored with the next write.
    commit_dirty: bool,
    /// The conf state as last handed out to be stored.
    durable_cs: ConfState,
    /// The hard state as last handed out to be stored.
    durable_hs: HardState,
    /// Why this node cannot go on: a committed entry or a snapshot it cannot
    /// decode. Skipping it would make this replica diverge silently.
    fatal: Option<String>,
    /// History made by applied entries, not yet handed out to be stored.
    made: Tagged,
    /// The applied index as last handed out to be stored with the history.
    durable_applied: u64,
    /// A snapshot from the leader replaced the state when history ran to
    /// here; the snapshot's chain head.
    installed_over: Option<(u64, coop_core::ledger::Head)>,
}

/// Raft timing in ticks, and how often to snapshot.
#[derive(Debug, Clone)]
pub struct Timing {
    pub election_ticks: usize,
    /// Randomised election timeouts fall in [min, max).
    pub min_election_ticks: usize,
    pub max_election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_every: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            election_ticks: 10,
            min_election_ticks: 10,
            max_election_ticks: 20,
            heartbeat_ticks: 2,
            snapshot_every: 10_000,
        }
    }
}

impl Core {
    /// A node over `log` (loaded from disk, or fresh). `peers` seeds the address
    /// book; a snapshot's own book takes over where one exists.
    pub fn new(
        id: u64,
        log: Log,
        peers: BTreeMap<u64, String>,
        views: Views,
        timing: &Timing,
        logger: &slog::Logger,
    ) -> anyhow::Result<Self> {
        let mut book = BTreeMap::new();
        let mut restored = State::default();
        let applied = log.snapshot_index();
        if !log.snapshot.data.is_empty() {
            let data: SnapshotData = codec::decode(&log.snapshot.data).map_err(|e| {
                anyhow::anyhow!("the snapshot at {applied} in the raft log cannot be read: {e}")
            })?;
            restored = data.state;
            book = data.peers;
        }
        // The configuration names where peers are now; the snapshot's book
        // fills in those it does not name (added later by membership changes).
        book.extend(peers);
        let peers = book;
        restored.build_indexes();
        views.publish(&restored, applied);
        let config = raft::Config {
            id,
            election_tick: timing.election_ticks,
            min_election_tick: timing.min_election_ticks,
            max_election_tick: timing.max_election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            // A leader cut off from a quorum steps down, so two nodes never both
            // believe they schedule; pre-vote keeps a rejoining node from
            // deposing a healthy leader.
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let durable_cs = log.conf_state.clone();
        let durable_hs = log.hard_state.clone();
        let raw = RawNode::new(&config, log, logger)?;
        Ok(Self {
            raw,
            state: restored,
            views,
            peers,
            removed: BTreeSet::new(),
            applied,
            last_at_ms: 0,
            snapshot_every: timing.snapshot_every.max(1),
            proposals: BTreeMap::new(),
            own_snapshot: None,
            snapshot_refused_at: 0,
            snapshot_building: false,
            commit_dirty: false,
            durable_cs,
            durable_hs,
            fatal: None,
            made: Tagged::new(),
            durable_applied: applied,
            installed_over: None,
        })
    }

    /// Set once this node met a committed entry or snapshot it cannot decode:
    /// it applies nothing more, and its shell must stop it.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|&l| l != raft::INVALID_ID)
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }

    pub fn log(&self) -> &Log {
        self.raw.store()
    }

    pub fn status(&self) -> NodeStatus {
        let role = match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let cs = &self.raw.store().conf_state;
        NodeStatus {
            id: self.id(),
            role,
            term: self.term(),
            leader: self.raw.raft.leader_id,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            last_index: self.raw.raft.raft_log.last_index(),
            snapshot_index: self.raw.store().snapshot_index(),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        }
    }

    /// How far each peer's log matches the leader's (leader only).
    pub fn progress(&self) -> BTreeMap<u64, u64> {
        if !self.is_leader() {
            return BTreeMap::new();
        }
        self.raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect()
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    pub fn step(&mut self, mut msg: Message) -> raft::Result<()> {
        // A node whose disk was wiped hears the old commit index in heartbeats;
        // raft-rs panics on a commit beyond the log. Clamped, the node answers,
        // the leader probes back to the start of its log and sends a snapshot.
        if msg.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat {
            msg.commit = msg.commit.min(self.raw.raft.raft_log.last_index());
        }
        self.raw.step(msg)
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    pub fn report_snapshot(&mut self, id: u64, delivered: bool) {
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(id, status);
    }

    pub fn campaign(&mut self) -> raft::Result<()> {
        self.raw.campaign()
    }

    /// Appends `op`, stamped with the leader's clock, to the log.
    pub fn propose(&mut self, token: u64, op: Op, now_ms: i64) -> Result<(), Refused> {
        self.check_leader()?;
        let at_ms = now_ms.max(self.last_at_ms);
        let data = codec::encode(&Command { at_ms, op });
        // An entry no replica could read back exactly would stop them all once
        // committed: it is refused here instead, before it is anyone's log.
        if let Err(e) = codec::decode::<Command>(&data) {
            return Err(Refused::Unwritable(e.to_string()));
        }
        self.raw
            .propose(vec![], data)
            .map_err(|_| Refused::NotLeader(self.not_leader()))?;
        self.last_at_ms = at_ms;
        self.track(token);
        Ok(())
    }

    pub fn propose_conf_change(&mut self, token: u64, cc: ConfChangeV2) -> Result<(), raft::Error> {
        if !self.is_leader() {
            return Err(raft::Error::ProposalDropped);
        }
        self.raw.propose_conf_change(vec![], cc)?;
        self.track(token);
        Ok(())
    }

    /// Asks for the commit index a read must wait for to see every write
    /// acknowledged before it (answered in [`Done::reads`]).
    pub fn read_index(&mut self, token: u64) {
        self.raw.read_index(token.to_be_bytes().to_vec());
    }

    fn track(&mut self, token: u64) {
        let index = self.raw.raft.raft_log.last_index();
        self.proposals.insert(index, (token, self.term()));
    }

    fn check_leader(&self) -> Result<(), NotLeader> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(self.not_leader())
        }
    }

    fn not_leader(&self) -> NotLeader {
        NotLeader {
            leader: self.leader().filter(|&l| l != self.id()),
        }
    }

    /// The first half of handling a Ready; `None` when there is nothing to do.
    pub fn ready(&mut self) -> Option<Staged> {
        let cs_dirty = self.raw.store().conf_state != self.durable_cs;
        let history_dirty = !self.made.is_empty() || self.applied != self.durable_applied;
        if !self.raw.has_ready() && self.own_snapshot.is_none() && !cs_dirty && !history_dirty {
            return None;
        }
        let mut staged = Staged {
            ready: None,
            messages: vec![],
            persist: Persist::default(),
            done: Done::default(),
        };
        if let Some(snap) = self.own_snapshot.take() {
            staged.persist.snapshot = Some(snap);
            // Stored with it: a restart must not find a commit index behind
            // its snapshot (raft-rs refuses to start on that).
            let hs = self.raw.store().hard_state.clone();
            staged.persist.hard_state = Some(hs.clone());
            self.durable_hs = hs;
        }
        if !self.raw.has_ready() {
            self.stage_conf_state(&mut staged.persist);
            self.stage_history(&mut staged.persist);
            return Some(staged);
        }
        let mut rd = self.raw.ready();
        staged.messages = rd.take_messages();
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            if !self.restore(&snap) {
                // Nothing of this Ready is stored or sent: the node stops.
                return Some(Staged {
                    ready: None,
                    messages: vec![],
                    persist: Persist::default(),
                    done: Done::default(),
                });
            }
            self.raw.mut_store().install(snap.clone());
            staged.persist.snapshot = Some(snap);
            staged.persist.replace_log = true;
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut staged.done);
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries());
            staged.persist.entries = rd.take_entries();
        }
        self.stage_conf_state(&mut staged.persist);
        self.stage_history(&mut staged.persist);
        // Term and vote must be durable before anyone hears of them. The commit
        // index alone needs no fsync of its own (raft learns it again after a
        // restart): it rides along with the next write.
        let mut must = staged.persist.hard_state.is_some();
        if let Some(hs) = rd.hs() {
            must |= hs.term != self.durable_hs.term || hs.vote != self.durable_hs.vote;
            self.commit_dirty |= hs.commit != self.durable_hs.commit;
            self.raw.mut_store().hard_state = hs.clone();
        }
        if must || (self.commit_dirty && !staged.persist.is_empty()) {
            let hs = self.raw.store().hard_state.clone();
            staged.persist.hard_state = Some(hs.clone());
            self.durable_hs = hs;
            self.commit_dirty = false;
        }
        for rs in rd.take_read_states() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&rs.request_ctx[..]) {
                staged
                    .done
                    .reads
                    .push((u64::from_be_bytes(bytes), rs.index));
            }
        }
        staged.ready = Some(rd);
        Some(staged)
    }

    /// The second half: `staged.persist` is durable now.
    pub fn persisted(&mut self, staged: Staged) -> Done {
        let Staged { ready, .. } = staged;
        let mut done = Done::default();
        if let Some(mut rd) = ready {
            done.messages.extend(rd.take_persisted_messages());
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().hard_state.set_commit(commit);
                self.commit_dirty = true;
            }
            done.messages.extend(light.take_messages());
            // A conf change applied here is stored by the next `ready`.
            self.apply_entries(light.take_committed_entries(), &mut done);
            self.raw.advance_apply();
        }
        done
    }

    /// The history applied entries made, stored with the index they reach.
    fn stage_history(&mut self, persist: &mut Persist) {
        persist.installed_over = self.installed_over.take();
        // An applied index alone is not worth a write of its own (nothing to
        // store: the shell only tells its readers); it rides along with the next.
        if !self.made.is_empty() || self.applied != self.durable_applied {
            persist.history = std::mem::take(&mut self.made);
            persist.applied = Some(self.applied);
            self.durable_applied = self.applied;
        }
    }

    fn stage_conf_state(&mut self, persist: &mut Persist) {
        let cs = &self.raw.store().conf_state;
        if *cs != self.durable_cs {
            persist.conf_state = Some(cs.clone());
            self.durable_cs = cs.clone();
        }
    }

    /// Replaces the state with a snapshot's; false (and `fatal` set) when it
    /// cannot be decoded: keeping the old state would diverge silently.
    fn restore(&mut self, snap: &Snapshot) -> bool {
        match codec::decode::<SnapshotData>(&snap.data) {
            Ok(data) => {
                // The history this replica made so far is kept (it goes to
                // the store with this Ready); what the snapshot covers beyond
                // it is copied from a peer.
                self.installed_over = Some((self.applied, data.state.chain.clone()));
                self.state = data.state;
                self.state.build_indexes();
                self.views.publish(&self.state, snap.get_metadata().index);
                // What this node was configured with or committed stays; the
                // snapshot fills in the rest.
                for (id, address) in data.peers {
                    if !address.is_empty() {
                        self.peers.entry(id).or_insert(address);
                    }
                }
            }
            Err(e) => {
                self.fatal = Some(format!(
                    "the snapshot at index {} (term {}) cannot be read: {e}",
                    snap.get_metadata().index,
                    snap.get_metadata().term
                ));
                return false;
            }
        }
        self.applied = snap.get_metadata().index;
        self.proposals.retain(|&i, _| i > self.applied);
        true
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, done: &mut Done) {
        if entries.is_empty() || self.fatal.is_some() {
            return;
        }
        let before = self.applied;
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Ok(vec![]),
                EntryType::EntryNormal => match codec::decode::<Command>(&entry.data) {
                    Ok(cmd) => {
                        self.last_at_ms = self.last_at_ms.max(cmd.at_ms);
                        let result = self.state.apply(&cmd);
                        history::tag(entry.index, self.state.take_outbox(), &mut self.made);
                        result
                    }
                    Err(e) => {
                        // Every replica must apply every committed entry.
                        self.fatal = Some(format!(
                            "committed log entry {} (term {}) cannot be read: {e}",
                            entry.index, entry.term
                        ));
                        break;
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    match self.apply_conf_change(&entry) {
                        Ok(result) => result,
                        Err(e) => {
                            self.fatal = Some(format!(
                                "committed membership change {} (term {}) cannot be read: {e}",
                                entry.index, entry.term
                            ));
                            break;
                        }
                    }
                }
            };
            self.applied = entry.index;
            if let Ok(events) = &result {
                done.events.extend(events.iter().cloned());
            }
            // Our earlier proposals at indexes passed over can no longer commit.
            while let Some((&index, &(token, term))) = self.proposals.first_key_value() {
                if index > entry.index {
                    break;
                }
                self.proposals.pop_first();
                if index == entry.index && term == entry.term {
                    done.results.push((token, result.clone()));
                } else {
                    done.dropped.push(token);
                }
            }
        }
        // Once per batch: readers see every entry of it or none.
        if self.applied != before {
            self.views.publish(&self.state, self.applied);
        }
    }

    /// Applies a membership change: `Err` when the entry cannot be read (the
    /// node must stop), `Ok(Err(..))` when raft refuses it (as every replica does).
    fn apply_conf_change(&mut self, entry: &Entry) -> Result<ApplyResult, String> {
        // This node proposes only V2 changes (they can join several at once).
        if entry.get_entry_type() != EntryType::EntryConfChangeV2 {
            return Ok(Err(Rejection::FailedPrecondition(
                "a version 1 membership change; only version 2 is proposed here".into(),
            )));
        }
        let mut cc = ConfChangeV2::default();
        cc.merge_from_bytes(&entry.data)
            .map_err(|e| e.to_string())?;
        // Read before applying: a change whose addresses cannot be read must not
        // half-apply.
        let ctx: Vec<ConfContext> = if cc.context.is_empty() {
            vec![]
        } else {
            codec::decode(&cc.context).map_err(|e| e.to_string())?
        };
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => return Ok(Err(Rejection::FailedPrecondition(e.to_string()))),
        };
        for c in ctx {
            if cs.voters.contains(&c.id) || cs.learners.contains(&c.id) {
                self.removed.remove(&c.id);
                self.peers.insert(c.id, c.address);
            } else {
                self.removed.insert(c.id);
                self.peers.remove(&c.id);
            }
        }
        self.raw.mut_store().conf_state = cs;
        Ok(Ok(vec![]))
    }

    /// A copy of the applied state to snapshot, every `snapshot_every` entries
    /// (none while one is being built). The shell builds it off the node loop
    /// ([`SnapshotJob::build`]) and hands the result to [`Core::snapshot_built`];
    /// the log up to it is dropped once the snapshot is durable.
    pub fn snapshot_due(&mut self) -> Option<SnapshotJob> {
        let log = self.raw.store();
        if self.snapshot_building
            || self.fatal.is_some()
            || self.applied < log.snapshot_index() + self.snapshot_every
            || self.applied < self.snapshot_refused_at.saturating_add(self.snapshot_every)
        {
            return None;
        }
        // The view published at `applied`: shared, not copied; encoding it
        // (seconds for a large state) happens elsewhere.
        let view = self.views.current();
        let term = log.term(view.index).ok()?;
        self.snapshot_building = true;
        Some(SnapshotJob {
            index: view.index,
            term,
            conf_state: log.conf_state.clone(),
            state: view.state,
            peers: self.peers.clone(),
        })
    }

    /// Takes a snapshot built from [`Core::snapshot_due`]'s copy: compacts the
    /// log up to it and stages it to be stored, unless the log has moved past
    /// it meanwhile (a snapshot from the leader was installed).
    pub fn snapshot_built(
        &mut self,
        index: u64,
        term: u64,
        conf: ConfState,
        built: Result<Vec<u8>, String>,
    ) {
        self.snapshot_building = false;
        let data = match built {
            Ok(data) => data,
            Err(e) => {
                // A snapshot that would not read back would leave this node
                // unable to restart once its log is compacted, and would stop
                // every follower it is sent to: keep the log instead, and say so.
                tracing::error!(
                    "the state at index {index} would not read back from a snapshot ({e}); \
                     the log is kept uncompacted"
                );
                self.snapshot_refused_at = index;
                return;
            }
        };
        let log = self.raw.store();
        if index <= log.snapshot_index() || log.term(index).ok() != Some(term) {
            return;
        }
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf);
        self.raw.mut_store().compact(snap.clone());
        self.own_snapshot = Some(snap);
    }
}

/// The state at `index` (a published view), to be encoded as a snapshot.
pub struct SnapshotJob {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    state: Arc<State>,
    peers: BTreeMap<u64, String>,
}

/// [`SnapshotData`] as encoded, borrowing the view.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    state: &'a State,
    peers: &'a BTreeMap<u64, String>,
}

impl SnapshotJob {
    /// The snapshot's bytes, checked to read back exactly. Slow for a large
    /// state: run it off the node loop.
    pub fn build(&self) -> Result<Vec<u8>, String> {
        let bytes = codec::encode(&SnapshotOut {
            state: &self.state,
            peers: &self.peers,
        });
        codec::decode::<SnapshotData>(&bytes).map_err(|e| e.to_string())?;
        Ok(bytes)
    }
}
