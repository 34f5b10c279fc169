//! Deterministic simulation of a whole scheduler cluster in one thread: raft
//! nodes (the real `Core`), their disks, a network that drops, delays, reorders
//! and partitions, crashes that lose everything not yet durable, clients
//! submitting jobs, the leader's scheduling pass and simulated agents. After
//! every step the cluster's invariants are checked.
//!
//! Each node also keeps a store of the history it makes (the audit chain,
//! jobs that left memory), as the SQLite one does; a node that installs a
//! snapshot copies what it skipped from a peer that holds it. At the end every
//! store must hold the same history, and it must verify.
//!
//! A failing seed prints how to replay it alone:
//! `COOP_SIM_SEED=<seed> COOP_SIM_NODES=<n> cargo test -p coop-scheduler --test raft_sim`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use coop_core::ledger::{self, Record};
use coop_core::placement::{place_ops, plan};
use coop_core::policy::Setting;
use coop_core::state::Job;
use coop_core::state::{GpuInfo, JobId, JobKind, JobSpec, JobState, Op, RunReport, State};
use coop_scheduler::consensus::core::{Core, Done, Staged, Timing};
use coop_scheduler::consensus::history::{Gap, Item, Tagged};
use coop_scheduler::consensus::log::{Log, Persist};
use coop_scheduler::consensus::view::Views;
use raft::eraftpb::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Simulated time per tick (commands are stamped with it).
const TICK_MS: i64 = 50;
const TICKS: u64 = 1_600;
const AGENTS: [&str; 2] = ["n1", "n2"];
const GPUS_PER_AGENT: u32 = 2;
/// Finished jobs stay in memory this long (the run lasts 80 s).
const RETENTION_S: u64 = 5;

/// A node's history store, with the same rules as `consensus::archive`.
#[derive(Default, Clone)]
struct Store {
    records: BTreeMap<u64, (u64, Record)>,
    retired: BTreeMap<JobId, (u64, Job)>,
    applied: u64,
    gap: Option<Gap>,
}

impl Store {
    fn insert(&mut self, items: &Tagged) {
        for (idx, item) in items {
            match item {
                Item::Record(r) => {
                    self.records.insert(r.seq, (*idx, r.clone()));
                }
                Item::Retired(j) => {
                    self.retired.insert(j.id, (*idx, (**j).clone()));
                }
            }
        }
    }

    fn persist(&mut self, p: &Persist) {
        self.insert(&p.history);
        if let Some(a) = p.applied {
            self.applied = self.applied.max(a);
        }
        if let (Some((over, head)), Some(snap)) = (&p.installed_over, &p.snapshot) {
            self.gap = Gap::after_install(
                self.gap.take(),
                *over,
                snap.get_metadata().index,
                head.clone(),
            );
        }
    }

    /// Whether this store holds the whole history of entries `(from, to]`.
    fn holds(&self, from: u64, to: u64) -> bool {
        self.applied >= to
            && self
                .gap
                .as_ref()
                .is_none_or(|g| g.to <= from || to <= g.from)
    }

    /// The history of entries `(from, to]`.
    fn between(&self, from: u64, to: u64) -> Tagged {
        let inside = |idx: &u64| *idx > from && *idx <= to;
        let mut out: Tagged = self
            .records
            .values()
            .filter(|(i, _)| inside(i))
            .map(|(i, r)| (*i, Item::Record(r.clone())))
            .collect();
        out.extend(
            self.retired
                .values()
                .filter(|(i, _)| inside(i))
                .map(|(i, j)| (*i, Item::Retired(Box::new(j.clone())))),
        );
        out
    }
}

struct SimNode {
    id: u64,
    core: Option<Core>,
    states: Views,
    /// What survives a crash.
    disk: Log,
    store: Store,
    /// Entries already checked against the committed history.
    checked_to: u64,
    down_until: u64,
}

struct Agent {
    name: String,
    next_seq: u64,
    /// Reports not yet known applied, in order.
    outbox: Vec<(u64, RunReport)>,
    /// (job, attempt) -> (started at ms, ends at tick, GPUs here); removed
    /// when reported.
    runs: BTreeMap<(JobId, u32), (i64, u64, u64)>,
    /// Runs already reported ended.
    ended: BTreeSet<(JobId, u32)>,
    /// GPU-ms the agent measured per (job, attempt), for conservation.
    measured: BTreeMap<(JobId, u32), u64>,
}

enum Pending {
    Submit(JobId),
    Report(usize, u64),
    Setup,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    tick: u64,
    nodes: Vec<SimNode>,
    agents: Vec<Agent>,
    net: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, Message>,
    msg_seq: u64,
    loss: f64,
    /// Nodes cut off from the rest, while a partition lasts.
    partition: Option<(BTreeSet<u64>, u64)>,
    next_token: u64,
    pending: BTreeMap<(u64, u64), Pending>,
    acked: BTreeSet<JobId>,
    /// The nodes of each multi-node run (job, attempt) the agents were given.
    gangs: BTreeMap<(JobId, u32), Vec<String>>,
    /// Multi-node runs that completed, over all nodes.
    gangs_completed: usize,
    /// Leader of each term, as seen by anyone.
    leaders: BTreeMap<u64, u64>,
    /// index -> (term, entry data) of every entry ever applied anywhere.
    committed: BTreeMap<u64, (u64, Vec<u8>)>,
    /// applied index -> the state's JSON at that index.
    states: BTreeMap<u64, String>,
    faults: bool,
}

fn timing(rng: &mut StdRng) -> Timing {
    // raft-rs draws its election timeout from thread_rng within [min, max):
    // one tick apart, the draw is fixed and the seed decides everything.
    let min = rng.random_range(10..20);
    Timing {
        election_ticks: 10,
        min_election_ticks: min,
        max_election_ticks: min + 1,
        heartbeat_ticks: 2,
        snapshot_every: 64,
    }
}

impl Sim {
    fn new(seed: u64, n: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let voters: Vec<u64> = (1..=n).collect();
        let nodes = (1..=n)
            .map(|id| SimNode {
                id,
                core: None,
                states: Views::default(),
                disk: Log::with_voters(&voters),
                store: Store::default(),
                checked_to: 0,
                down_until: 0,
            })
            .collect();
        let agents = AGENTS
            .iter()
            .map(|a| Agent {
                name: a.to_string(),
                next_seq: 1,
                outbox: vec![],
                runs: BTreeMap::new(),
                ended: BTreeSet::new(),
                measured: BTreeMap::new(),
            })
            .collect();
        let loss = rng.random_range(0.0..0.1);
        let mut sim = Sim {
            seed,
            rng,
            tick: 0,
            nodes,
            agents,
            net: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            msg_seq: 0,
            loss,
            partition: None,
            next_token: 0,
            pending: BTreeMap::new(),
            acked: BTreeSet::new(),
            gangs: BTreeMap::new(),
            gangs_completed: 0,
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            states: BTreeMap::new(),
            faults: true,
        };
        for i in 0..sim.nodes.len() {
            sim.boot(i);
        }
        sim
    }

    fn now_ms(&self) -> i64 {
        1_700_000_000_000 + self.tick as i64 * TICK_MS
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "seed {} ({} nodes), tick {}: {what}\nreplay: COOP_SIM_SEED={} COOP_SIM_NODES={} cargo test -p coop-scheduler --test raft_sim",
            self.seed,
            self.nodes.len(),
            self.tick,
            self.seed,
            self.nodes.len()
        )
    }

    /// Starts node `i` from its disk (a first boot, or after a crash).
    fn boot(&mut self, i: usize) {
        let t = timing(&mut self.rng);
        let node = &mut self.nodes[i];
        node.states = Views::default();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let core = Core::new(
            node.id,
            node.disk.clone().normalised(),
            BTreeMap::new(),
            node.states.clone(),
            &t,
            &logger,
        )
        .unwrap_or_else(|e| panic!("seed {}: node {} cannot start: {e}", self.seed, node.id));
        node.checked_to = node.disk.snapshot_index();
        node.core = Some(core);
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if self.faults && self.rng.random_bool(self.loss) {
                self.dropped(&m);
                continue;
            }
            let delay = if self.faults {
                self.rng.random_range(1..4)
            } else {
                1
            };
            self.msg_seq += 1;
            self.in_flight.insert(self.msg_seq, m);
            self.net.push(Reverse((self.tick + delay, self.msg_seq)));
        }
    }

    /// What the real transport tells the sender: a snapshot that did not get
    /// through failed (raft then retries), and the peer is unreachable.
    fn dropped(&mut self, m: &Message) {
        if let Some(core) = self.nodes[m.from as usize - 1].core.as_mut() {
            core.report_unreachable(m.to);
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                core.report_snapshot(m.to, false);
            }
        }
    }

    fn cut(&self, a: u64, b: u64) -> bool {
        self.partition
            .as_ref()
            .is_some_and(|(side, _)| side.contains(&a) != side.contains(&b))
    }

    fn leader(&self) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.core.as_ref().is_some_and(|c| c.is_leader()))
    }

    fn propose(&mut self, i: usize, op: Op, what: Pending) {
        self.next_token += 1;
        let token = self.next_token;
        let now = self.now_ms();
        let node = &mut self.nodes[i];
        if let Some(core) = node.core.as_mut()
            && core.propose(token, op, now).is_ok()
        {
            self.pending.insert((node.id, token), what);
        }
    }

    fn step(&mut self) {
        self.tick += 1;
        // Faults: crashes, restarts, partitions.
        if self.faults {
            let n = self.nodes.len();
            let down = self.nodes.iter().filter(|n| n.core.is_none()).count();
            if down < (n - 1) / 2 && self.rng.random_bool(0.004) {
                let i = self.rng.random_range(0..n);
                if self.nodes[i].core.is_some() {
                    self.crash(i);
                }
            }
            if self.partition.is_none() && self.rng.random_bool(0.003) {
                let k = self.rng.random_range(1..=(n as u64) / 2);
                let mut side = BTreeSet::new();
                while side.len() < k as usize {
                    side.insert(self.rng.random_range(1..=n as u64));
                }
                let until = self.tick + self.rng.random_range(20..200);
                self.partition = Some((side, until));
            }
        }
        if self
            .partition
            .as_ref()
            .is_some_and(|(_, until)| *until <= self.tick)
        {
            self.partition = None;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() && self.nodes[i].down_until <= self.tick {
                self.boot(i);
            }
        }
        for node in &mut self.nodes {
            if let Some(core) = node.core.as_mut() {
                core.tick();
            }
        }
        self.copy_history();
        // Deliver what is due.
        while let Some(Reverse((at, seq))) = self.net.peek().copied() {
            if at > self.tick {
                break;
            }
            self.net.pop();
            let msg = self.in_flight.remove(&seq).expect("queued");
            let (from, to) = (msg.from, msg.to);
            let snapshot = msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            if self.cut(from, to) || self.nodes[to as usize - 1].core.is_none() {
                self.dropped(&msg);
                continue;
            }
            if let Some(core) = self.nodes[to as usize - 1].core.as_mut() {
                let _ = core.step(msg);
            }
            if snapshot && let Some(core) = self.nodes[from as usize - 1].core.as_mut() {
                core.report_snapshot(to, true);
            }
        }
        self.drive_cluster();
        for i in 0..self.nodes.len() {
            self.handle_ready(i);
        }
        self.check();
    }

    /// A live node with a gap in its history copies it from a live peer
    /// that holds it whole (the real one asks over the network, page by page).
    fn copy_history(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(gap) = self.nodes[i].store.gap.clone() else {
                continue;
            };
            if self.nodes[i].core.is_none() {
                continue;
            }
            let donor = (0..self.nodes.len()).find(|&d| {
                d != i
                    && self.nodes[d].core.is_some()
                    && self.nodes[d].store.holds(gap.from, gap.to)
            });
            if let Some(d) = donor {
                let items = self.nodes[d].store.between(gap.from, gap.to);
                let store = &mut self.nodes[i].store;
                store.insert(&items);
                store.gap = None;
                // The copied part ends at the installed snapshot's head.
                let head = &gap.head;
                let ends = head.seq == 0
                    || store
                        .records
                        .get(&head.seq)
                        .is_some_and(|(_, r)| r.hash == head.hash);
                if !ends {
                    self.fail(format!(
                        "node {}: the history copied for {gap:?} does not end at its head",
                        i + 1
                    ));
                }
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.core = None;
        node.down_until = self.tick + self.rng.random_range(10..150);
        let id = node.id;
        self.pending.retain(|(n, _), _| *n != id);
    }

    /// Clients, the leader's scheduling pass, agents.
    fn drive_cluster(&mut self) {
        let Some(l) = self.leader() else { return };
        let state = self.nodes[l].states.current().state.as_ref().clone();
        if !state.bootstrapped() || !state.members.contains_key("m") || state.nodes.len() < 2 {
            if self.tick.is_multiple_of(10) {
                for op in setup_ops(&state) {
                    self.propose(l, op, Pending::Setup);
                }
            }
            return;
        }
        // A client submits now and then, through any node that leads.
        if self.faults && self.rng.random_bool(0.15) {
            let id = JobId::from_u128(self.rng.random());
            // One in eight spans both nodes (more GPUs than either has).
            let gpus = match self.rng.random_range(0..8) {
                0 => 2 * GPUS_PER_AGENT,
                n => n.min(GPUS_PER_AGENT),
            };
            let op = Op::SubmitJob {
                id,
                member: "m".into(),
                spec: spec(gpus),
            };
            self.propose(l, op, Pending::Submit(id));
        }
        if self.tick.is_multiple_of(4) {
            let usage = BTreeMap::new();
            let pass = plan(&state, self.now_ms(), &usage);
            for op in place_ops(&state, pass.placements) {
                self.propose(l, op, Pending::Setup);
            }
        }
        self.drive_agents(l, &state);
    }

    fn drive_agents(&mut self, l: usize, state: &State) {
        let now = self.now_ms();
        for job in state.running.iter().map(|id| &state.jobs[id]) {
            if let Some(g) = &job.gang {
                let nodes = g.parts.iter().map(|p| p.node.clone()).collect();
                self.gangs.insert((job.id, job.attempts), nodes);
            }
        }
        for a in 0..self.agents.len() {
            let agent = &mut self.agents[a];
            // Start what the leader assigned to this node; end what is due.
            // (A part of a multi-node run is started by its node's agent.)
            for job in state.running.iter().map(|id| &state.jobs[id]) {
                let Some(run) = job.run_on(&agent.name) else {
                    continue;
                };
                let key = (job.id, job.attempts);
                if agent.ended.contains(&key) {
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = agent.runs.entry(key) {
                    // Each node's part of a multi-node run ends on its own tick.
                    let ticks = 5 + ((job.id.as_u128() >> (8 * a)) % 40) as u64;
                    e.insert((now, self.tick + ticks, run.gpus.len() as u64));
                    let seq = agent.next_seq;
                    agent.next_seq += 1;
                    agent.outbox.push((
                        seq,
                        RunReport::Started {
                            job: job.id,
                            attempt: job.attempts,
                            at_ms: now,
                        },
                    ));
                }
            }
            let ended: Vec<(JobId, u32)> = agent
                .runs
                .iter()
                .filter(|(_, (_, end, _))| *end <= self.tick)
                .map(|(k, _)| *k)
                .collect();
            for key in ended {
                let (start, _, gpus) = agent.runs.remove(&key).expect("listed");
                agent.ended.insert(key);
                agent.measured.insert(key, gpus * (now - start) as u64);
                let seq = agent.next_seq;
                agent.next_seq += 1;
                agent.outbox.push((
                    seq,
                    RunReport::Exited {
                        job: key.0,
                        attempt: key.1,
                        at_ms: now,
                        exit_code: 0,
                        reason: String::new(),
                        energy_mj: 0,
                    },
                ));
            }
            // Resend everything unacknowledged, in order, to the leader.
            let name = agent.name.clone();
            let outbox = agent.outbox.clone();
            for (seq, report) in outbox {
                let op = Op::Report {
                    node: name.clone(),
                    session: "s".into(),
                    seq,
                    report,
                };
                self.propose(l, op, Pending::Report(a, seq));
            }
        }
    }

    fn handle_ready(&mut self, i: usize) {
        loop {
            let Some(core) = self.nodes[i].core.as_mut() else {
                return;
            };
            let Some(mut staged): Option<Staged> = core.ready() else {
                return;
            };
            let now = std::mem::take(&mut staged.messages);
            self.send(now);
            let early = std::mem::take(&mut staged.done);
            let id = self.nodes[i].id;
            self.finish(id, early);
            // A crash before the write is durable loses it, and all in memory.
            if self.faults && self.rng.random_bool(0.0005) {
                self.crash(i);
                return;
            }
            let node = &mut self.nodes[i];
            node.disk.persist(&staged.persist);
            node.store.persist(&staged.persist);
            let core = node.core.as_mut().expect("live");
            let done = core.persisted(staged);
            // The replica builds snapshots off its loop; here at once.
            if let Some(job) = core.snapshot_due() {
                let bytes = job.build();
                core.snapshot_built(job.index, job.term, job.conf_state.clone(), bytes);
            }
            self.finish(id, done);
        }
    }

    fn finish(&mut self, id: u64, done: Done) {
        self.send(done.messages);
        for (token, result) in done.results {
            match self.pending.remove(&(id, token)) {
                Some(Pending::Submit(job)) if result.is_ok() => {
                    self.acked.insert(job);
                }
                Some(Pending::Report(a, seq)) => {
                    self.agents[a].outbox.retain(|(s, _)| *s != seq);
                }
                _ => {}
            }
        }
        for token in done.dropped {
            self.pending.remove(&(id, token));
        }
    }

    fn check(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(core) = self.nodes[i].core.as_ref() else {
                continue;
            };
            let status = core.status();
            if status.role == "leader"
                && let Some(&other) = self.leaders.get(&status.term)
                && other != status.id
            {
                self.fail(format!(
                    "two leaders in term {}: {} and {other}",
                    status.term, status.id
                ));
            }
            if status.role == "leader" {
                self.leaders.insert(status.term, status.id);
            }
            // Committed entries never change.
            let log = core.log();
            let from = self.nodes[i].checked_to.max(log.snapshot_index()) + 1;
            for idx in from..=status.applied {
                let Some(e) = log.entries.get((idx - log.first()) as usize) else {
                    break;
                };
                let seen = (e.term, e.data.to_vec());
                match self.committed.get(&idx) {
                    Some(c) if *c != seen => self.fail(format!(
                        "entry {idx} changed after commit on node {}",
                        status.id
                    )),
                    Some(_) => {}
                    None => {
                        self.committed.insert(idx, seen);
                    }
                }
            }
            let applied = status.applied;
            let state = self.nodes[i].states.current().state;
            if applied > self.nodes[i].checked_to {
                // Equal state at equal applied index.
                let json = serde_json::to_string(&*state).unwrap();
                match self.states.get(&applied) {
                    Some(s) if *s != json => {
                        drop(state);
                        self.fail(format!(
                            "node {} has a different state at index {applied}",
                            i + 1
                        ))
                    }
                    Some(_) => {}
                    None => {
                        self.states.insert(applied, json);
                    }
                }
            }
            // No GPU held by two running jobs.
            let mut held = BTreeSet::new();
            let twice = state
                .running
                .iter()
                .flat_map(|id| state.jobs[id].held_gpus())
                .find(|g| !held.insert(g.to_string()))
                .cloned();
            drop(state);
            if let Some(g) = twice {
                self.fail(format!("GPU {g} is held twice on node {}", i + 1));
            }
            self.nodes[i].checked_to = applied;
        }
        // No part of a multi-node run runs without all the others: whatever
        // one agent has started of it, every other part's agent has too.
        for a in &self.agents {
            for key in a.runs.keys() {
                let Some(nodes) = self.gangs.get(key) else {
                    continue;
                };
                for other in self.agents.iter().filter(|o| nodes.contains(&o.name)) {
                    if !other.runs.contains_key(key) && !other.ended.contains(key) {
                        self.fail(format!(
                            "run {key:?} runs on {} but its part on {} was never started",
                            a.name, other.name
                        ));
                    }
                }
            }
        }
    }

    /// Heals the cluster and runs without faults until every job has finished
    /// and every node has applied the same log; then checks the end state.
    fn settle(&mut self) {
        self.faults = false;
        self.partition = None;
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                self.nodes[i].down_until = 0;
            }
        }
        // Multi-node runs wait for whole nodes: the queue drains slowly.
        for _ in 0..6_000 {
            self.step();
            let busy = self.leader().is_none_or(|l| {
                let s = self.nodes[l].states.current().state;
                !s.queue.is_empty() || !s.running.is_empty()
            }) || self.agents.iter().any(|a| !a.outbox.is_empty());
            let applied: BTreeSet<u64> = self
                .nodes
                .iter()
                .map(|n| n.core.as_ref().map_or(0, |c| c.applied()))
                .collect();
            if !busy && applied.len() == 1 {
                return self.final_checks();
            }
        }
        let leader = self.leader().map(|l| {
            let s = self.nodes[l].states.current().state;
            let running: Vec<String> = s
                .running
                .iter()
                .map(|id| format!("{:?}", s.jobs[id]))
                .collect();
            (l + 1, s.queue.len(), running)
        });
        let outboxes: Vec<String> = self
            .agents
            .iter()
            .map(|a| format!("{} {:?} ended {:?}", a.outbox.len(), a.runs, a.ended.len()))
            .collect();
        let applied: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| n.core.as_ref().map_or(0, |c| c.applied()))
            .collect();
        self.fail(format!(
            "the cluster never settled after the faults stopped: leader (id, queued, running) {leader:?}, agent outboxes {outboxes:?}, applied {applied:?}"
        ));
    }

    fn final_checks(&mut self) {
        // The stores end whole: every gap copied.
        for _ in 0..10 {
            self.copy_history();
        }
        let stores: Vec<Store> = self.nodes.iter().map(|n| n.store.clone()).collect();
        for (i, st) in stores.iter().enumerate() {
            if let Some(g) = &st.gap {
                self.fail(format!("node {} never copied the history of {g:?}", i + 1));
            }
        }
        let chain: Vec<Record> = stores[0].records.values().map(|(_, r)| r.clone()).collect();
        for (i, st) in stores.iter().enumerate().skip(1) {
            let other: Vec<Record> = st.records.values().map(|(_, r)| r.clone()).collect();
            if other != chain {
                self.fail(format!(
                    "node {} stores another audit chain ({} records, node 1 {})",
                    i + 1,
                    other.len(),
                    chain.len()
                ));
            }
            if st.retired != stores[0].retired {
                self.fail(format!("node {} stores other retired jobs", i + 1));
            }
        }
        if let Err(e) = ledger::verify(&chain) {
            self.fail(format!("the stored chain does not verify: {e}"));
        }
        let states: Vec<State> = self
            .nodes
            .iter()
            .map(|n| n.states.current().state.as_ref().clone())
            .collect();
        for (i, s) in states.iter().enumerate().skip(1) {
            if *s != states[0] {
                self.fail(format!("node {} ends with a different state", i + 1));
            }
        }
        let s = &states[0];
        if chain.first().map(|r| r.seq) != Some(1)
            || chain.last().map(|r| (r.seq, &r.hash)) != Some((s.chain.seq, &s.chain.hash))
        {
            self.fail(format!(
                "the stored chain ({} records) does not run from 1 to the state's head {}",
                chain.len(),
                s.chain.seq
            ));
        }
        for id in &self.acked {
            let retired = stores[0].retired.get(id).map(|(_, j)| j);
            match s.jobs.get(id).or(retired) {
                None => self.fail(format!("acknowledged job {id} is missing")),
                Some(j) if j.state != JobState::Completed => {
                    self.fail(format!("acknowledged job {id} ended {:?}", j.state))
                }
                Some(j) => {
                    if j.gang
                        .as_ref()
                        .is_some_and(|g| g.parts.len() == AGENTS.len())
                    {
                        self.gangs_completed += 1;
                    }
                }
            }
        }
        // Usage is conserved: the ledger bills each completed run exactly the
        // GPU time its agent measured.
        // A multi-node run's parts are billed each from its own node.
        let mut billed: BTreeMap<(JobId, u32, &str), u64> = BTreeMap::new();
        for r in &chain {
            if let ledger::Entry::Usage(u) = &r.entry {
                *billed.entry((u.job, u.attempt, &u.node)).or_default() += u.gpu_ms;
            }
        }
        for agent in &self.agents {
            for (key, gpu_ms) in &agent.measured {
                let part = (key.0, key.1, agent.name.as_str());
                let retired = stores[0].retired.get(&key.0).map(|(_, j)| j);
                let completed = s
                    .jobs
                    .get(&key.0)
                    .or(retired)
                    .is_some_and(|j| j.state == JobState::Completed && j.attempts == key.1);
                if completed && billed.get(&part) != Some(gpu_ms) {
                    self.fail(format!(
                        "run {part:?}: measured {gpu_ms} GPU-ms, billed {:?}",
                        billed.get(&part)
                    ));
                }
            }
        }
        assert!(
            !self.acked.is_empty(),
            "seed {}: no job was acknowledged",
            self.seed
        );
    }
}

fn spec(gpus: u32) -> JobSpec {
    JobSpec {
        kind: JobKind::Finetune,
        gpus,
        command: vec!["train".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible: false,
        kill_grace_ms: 1_000,
        priority: 0,
        time_limit_ms: 0,
        isolation: Default::default(),
        env: Default::default(),
        nodes: 0,
        gpus_per_node: 0,
    }
}

fn setup_ops(state: &State) -> Vec<Op> {
    let mut ops = vec![];
    if !state.bootstrapped() {
        ops.push(Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        });
    }
    // Finished jobs leave memory within the run, into the stores.
    if state.policy.job_retention_s != RETENTION_S {
        ops.push(Op::SetPolicy {
            settings: vec![Setting::JobRetentionS(RETENTION_S)],
            by: "operator".into(),
            reason: "sim".into(),
        });
    }
    if !state.members.contains_key("m") {
        ops.push(Op::AddMember {
            name: "m".into(),
            token_hash: "m".into(),
            expires_at_ms: None,
        });
    }
    for a in AGENTS {
        if !state.nodes.contains_key(a) {
            ops.push(Op::RegisterNode {
                node: a.into(),
                owner: "m".into(),
                gpus: (0..GPUS_PER_AGENT)
                    .map(|g| GpuInfo {
                        uuid: format!("GPU-{a}-{g}"),
                        index: g,
                        model: "A100-80GB".into(),
                        memory_mb: 81_920,
                        measured: None,
                        power_limit_w: 0,
                    })
                    .collect(),
                session: "s".into(),
                orphaned_runs_end_ms: 0,
                address: String::new(),
                site: String::new(),
            });
        }
    }
    ops
}

/// Runs one seed; returns how many multi-node jobs completed.
fn run(seed: u64, nodes: u64) -> usize {
    let mut sim = Sim::new(seed, nodes);
    for _ in 0..TICKS {
        sim.step();
    }
    sim.settle();
    sim.gangs_completed
}

fn seeds(default: std::ops::Range<u64>, nodes: u64) {
    let only_nodes = std::env::var("COOP_SIM_NODES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Ok(seed) = std::env::var("COOP_SIM_SEED") {
        if only_nodes.is_none_or(|n| n == nodes) {
            run(seed.parse().expect("COOP_SIM_SEED: a number"), nodes);
        }
        return;
    }
    let gangs: usize = default.map(|seed| run(seed, nodes)).sum();
    // The seeds ran multi-node jobs through the faults, not just one-node ones.
    assert!(gangs > 0, "no multi-node job completed in any seed");
}

#[test]
fn three_nodes_keep_every_invariant_under_faults() {
    seeds(0..24, 3);
}

#[test]
fn five_nodes_keep_every_invariant_under_faults() {
    seeds(1_000..1_012, 5);
}
