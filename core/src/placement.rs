//! One scheduling pass: which pending jobs go where now, which runs are
//! preempted for whom, which runs are past their time limit, and why every
//! other job waits. Pure: it reads the state and returns decisions; the leader
//! proposes them as commands, and apply validates each again. `coop simulate`
//! calls this same function.
//!
//! - Order: jobs that preemption is freeing GPUs for come first; then the
//!   policy's order: `fairshare` (member's factor, then job priority, then
//!   age), `drf` (member holding the smallest share of GPUs relative to its
//!   entitlement, re-evaluated after every placement), or `fifo` (age).
//! - Gang placement: all of a job's GPUs at once, on one node, of one model and
//!   memory size, and best fit: the node left with the fewest free GPUs of that
//!   kind, so that whole nodes stay free for large jobs.
//! - Backfill: the first job that does not fit reserves the node where it will
//!   fit soonest (from the time limits of the runs there). Later jobs may use
//!   that node's GPUs only if they end before the reserved start (by their own
//!   time limit) or leave enough GPUs for it. With no time limits known, the
//!   reserved node is held: it fills up with the head job as runs end.
//! - Preemption: a member below its entitlement whose job cannot be placed may
//!   take GPUs from preemptible runs (past their minimum run time) of members
//!   above theirs: on the node that needs the fewest victims, the largest
//!   and then youngest runs first. A move is made only if afterwards the
//!   victim's member still holds at least its entitlement, and the
//!   beneficiary's share relative to its entitlement is no more than the
//!   victim member's. So GPUs never move straight back: a member that was
//!   preempted stays at or above its entitlement and cannot be below it to
//!   preempt in turn, unless its own runs end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::fairshare::{entitlements, factors, running_gpus, total_gpus};
use crate::policy::Ordering;
use crate::state::{Gpu, Job, JobId, JobSpec, Node, State};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    pub node: String,
    pub gpus: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub job: JobId,
    pub for_job: JobId,
}

/// Why a pending job was not placed in this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// A service restarting after exits, with back-off.
    BackingOff { until_ms: i64 },
    /// Its member is suspended: nothing of it is placed until resumed.
    MemberSuspended,
    /// Runs on `node` are being preempted (or have been) to make room for it.
    Preempting { node: String },
    /// First in line that does not fit: `node` is reserved for it, with enough
    /// GPUs free by `at_ms` (unknown when runs there have no time limits).
    Reserved { node: String, at_ms: Option<i64> },
    /// It would fit, but only by delaying the reserved start of `job`.
    BehindReservation { job: JobId },
    /// No node has `gpus` free GPUs of a kind it accepts (`most_free` is the
    /// largest such block now).
    NoFit { gpus: u32, most_free: u32 },
    /// Its member holds `held` GPUs and may hold `quota` (policy gpu_quota).
    OverQuota { held: u64, quota: u64 },
    /// Held (`coop job hold`) until released.
    Held,
    /// Waits for job `job` to end (successfully, for afterok).
    Dependency { job: JobId },
    /// `limit` tasks of its array are running already (`--array ...%N`).
    ArrayLimit { limit: u32 },
}

impl Wait {
    /// A one-word reason, as squeue's REASON column gives it.
    pub fn code(&self) -> &'static str {
        match self {
            Wait::BackingOff { .. } => "BackOff",
            Wait::MemberSuspended => "MemberSuspended",
            Wait::Preempting { .. } => "Preempting",
            Wait::Reserved { .. } | Wait::NoFit { .. } => "Resources",
            Wait::BehindReservation { .. } => "Priority",
            Wait::OverQuota { .. } => "Quota",
            Wait::Held => "Held",
            Wait::Dependency { .. } => "Dependency",
            Wait::ArrayLimit { .. } => "ArrayTaskLimit",
        }
    }
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::BackingOff { until_ms } => {
                write!(f, "restarting after back-off (not before {until_ms} ms)")
            }
            Wait::MemberSuspended => write!(f, "its member is suspended"),
            Wait::Preempting { node } => {
                write!(f, "preempted runs on {node} are freeing its GPUs")
            }
            Wait::Reserved { node, at_ms } => match at_ms {
                Some(t) => write!(f, "next in line: {node} reserved, free by {t} ms"),
                None => write!(f, "next in line: {node} reserved until its runs end"),
            },
            Wait::BehindReservation { job } => {
                write!(f, "would delay the reserved start of job {job}")
            }
            Wait::OverQuota { held, quota } => write!(
                f,
                "its member holds {held} GPUs of its quota of {quota} (policy gpu_quota)"
            ),
            Wait::Held => write!(f, "held: coop job release to let it run"),
            Wait::Dependency { job } => write!(f, "waits for job {job}"),
            Wait::ArrayLimit { limit } => {
                write!(f, "{limit} tasks of its array are running, its limit")
            }
            Wait::NoFit { gpus, most_free } => write!(
                f,
                "waiting for {gpus} free GPUs of one kind on one node (largest free block now: {most_free})"
            ),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub preemptions: Vec<Preemption>,
    /// Running jobs past their time limit, to be stopped.
    pub expiries: Vec<JobId>,
    pub waiting: HashMap<JobId, Wait>,
    /// Pending jobs in the order this pass considered them.
    pub order: Vec<JobId>,
    /// From this position of `order` on, jobs were not examined one by one:
    /// nothing was free. They wait for free GPUs (or for preemption).
    pub tail_from: Option<usize>,
}

impl Plan {
    /// Why `job`, at `position` in `order`, waits; `None` if it was placed.
    pub fn wait_of(&self, job: &Job, position: Option<usize>) -> Option<Wait> {
        if let Some(w) = self.waiting.get(&job.id) {
            return Some(w.clone());
        }
        let in_tail = matches!((position, self.tail_from), (Some(p), Some(t)) if p >= t);
        if !in_tail {
            return None;
        }
        Some(match &job.nominated_node {
            Some(node) => Wait::Preempting { node: node.clone() },
            None => Wait::NoFit {
                gpus: job.spec.gpus,
                most_free: 0,
            },
        })
    }
}

/// One pass at `now_ms`. `usage` is each member's decayed usage (see
/// `fairshare::DecayedUsage`), used by the `fairshare` order.
pub fn plan(state: &State, now_ms: i64, usage: &BTreeMap<String, f64>) -> Plan {
    let expiries = state
        .running
        .iter()
        .map(|id| &state.jobs[id])
        .filter(|j| !j.stopping() && j.spec.time_limit_ms > 0)
        .filter(|j| {
            j.started_at_ms
                .is_some_and(|s| now_ms - s >= j.spec.time_limit_ms as i64)
        })
        .map(|j| j.id)
        .collect();
    let mut out = Plan {
        expiries,
        waiting: HashMap::with_capacity(state.queue.len()),
        order: Vec::with_capacity(state.queue.len()),
        ..Plan::default()
    };

    let ent = entitlements(state);
    let total = total_gpus(state) as f64;
    let mut alloc: BTreeMap<String, u32> = running_gpus(state);
    let mut pool = Pool::new(state);

    let mut ready: Vec<&Job> = Vec::new();
    // Tasks of each array running, or let through in this pass.
    let mut array_running = state.array_running();
    // In queue order, but an array's tasks (one submission time) by index,
    // so that its `%N` lets through the lowest ones first.
    let mut queued: Vec<&Job> = state.queue.iter().map(|(_, id)| &state.jobs[id]).collect();
    queued.sort_by_key(|j| age(j));
    for j in queued {
        let id = &j.id;
        let blocked = state.blocked(*id, &array_running);
        if state.members.get(&j.member).is_some_and(|m| m.suspended) {
            out.waiting.insert(*id, Wait::MemberSuspended);
        } else if let Some(b) = blocked {
            out.waiting.insert(
                *id,
                match b {
                    crate::habits::Blocked::Held => Wait::Held,
                    crate::habits::Blocked::Dependency(job) => Wait::Dependency { job },
                    crate::habits::Blocked::ArrayLimit(limit) => Wait::ArrayLimit { limit },
                },
            );
        } else if j.not_before_ms > now_ms {
            out.waiting.insert(
                *id,
                Wait::BackingOff {
                    until_ms: j.not_before_ms,
                },
            );
        } else {
            if let Some(a) = &j.array
                && a.limit > 0
            {
                *array_running.entry(a.array).or_default() += 1;
            }
            ready.push(j);
        }
    }
    let mut order = Order::new(state, ready, &ent, &alloc, total, usage);
    let mut reservation: Option<Reservation> = None;
    // Per kind of request, the jobs that found no place: free blocks and the
    // reservation's spare only shrink during a pass, so a job at least as
    // large that ends no earlier fails too. (Keyed by the model as spelled: a
    // different spelling only costs a lookup.)
    let mut failed: HashMap<(Option<&str>, u64), Vec<Failure>> = HashMap::new();
    let mut unplaced: Vec<&Job> = Vec::with_capacity(state.queue.len());

    while let Some(job) = order.next() {
        out.order.push(job.id);
        if pool.free_total == 0 && reservation.is_some() {
            // Nothing is free and the head of the line holds its reservation:
            // no later job can be placed in this pass. The rest only wait (see
            // `Plan::wait_of`) and may still preempt.
            out.tail_from = Some(out.order.len() - 1);
            unplaced.push(job);
            while let Some(rest) = order.next() {
                out.order.push(rest.id);
                unplaced.push(rest);
            }
            break;
        }
        let want = job.spec.gpus as usize;
        if let Some(quota) = state.policy.gpu_quota(&job.member) {
            let held = alloc.get(&job.member).copied().unwrap_or(0) as u64;
            if held + want as u64 > quota {
                // Waits for its member's own runs to end: it neither reserves
                // nor preempts.
                out.waiting.insert(job.id, Wait::OverQuota { held, quota });
                continue;
            }
        }
        let key = (job.spec.gpu_model.as_deref(), job.spec.min_gpu_memory_mb);
        let expected_end =
            (job.spec.time_limit_ms > 0).then(|| now_ms + job.spec.time_limit_ms as i64);
        let like = failed
            .get(&key)
            .and_then(|fs| fs.iter().find(|f| f.covers(job.spec.gpus, expected_end)))
            .copied();
        let hopeless = pool.free_total < want || like.is_some();
        let found = if hopeless {
            None
        } else {
            pool.best_fit(&job.spec, |slot, _| match &reservation {
                Some(r) if r.slot == slot => r.admits(expected_end, want),
                _ => true,
            })
        };
        match found {
            Some(slot) => {
                if let Some(r) = reservation.as_mut()
                    && r.slot == slot
                {
                    r.consume(expected_end, want);
                }
                let gpus = pool.take(slot, want, expected_end);
                *alloc.entry(job.member.clone()).or_default() += job.spec.gpus;
                order.placed(&job.member, &alloc);
                out.placements.push(Placement {
                    job: job.id,
                    node: pool.nodes[slot.0].name.clone(),
                    gpus,
                });
            }
            None => {
                unplaced.push(job);
                let behind = match like {
                    Some(f) => f.behind_reservation,
                    None => pool.free_total >= want && pool.fits_anywhere(&job.spec),
                };
                if like.is_none() {
                    let fs = failed.entry(key).or_default();
                    if fs.len() < 16 {
                        fs.push(Failure {
                            gpus: job.spec.gpus,
                            ends: expected_end,
                            behind_reservation: behind,
                        });
                    }
                }
                if !behind {
                    out.waiting.insert(job.id, pool.no_fit(&job.spec));
                } else if let Some(r) = &reservation {
                    out.waiting
                        .insert(job.id, Wait::BehindReservation { job: r.job });
                } else {
                    out.waiting.insert(
                        job.id,
                        Wait::NoFit {
                            gpus: job.spec.gpus,
                            most_free: pool.most_free(&job.spec) as u32,
                        },
                    );
                }
                if reservation.is_none()
                    && let Some(r) = pool.reserve(state, job, now_ms)
                {
                    out.waiting.insert(
                        job.id,
                        Wait::Reserved {
                            node: pool.nodes[r.slot.0].name.clone(),
                            at_ms: r.at_ms,
                        },
                    );
                    reservation = Some(r);
                }
            }
        }
        if let Some(node) = &job.nominated_node
            && out.waiting.contains_key(&job.id)
        {
            out.waiting
                .insert(job.id, Wait::Preempting { node: node.clone() });
        }
    }

    if state.policy.preemption {
        preempt(
            state, now_ms, &ent, total, &alloc, &pool, &unplaced, &mut out,
        );
    }
    out
}

/// Chooses preemptions for the unplaced jobs of members below their entitlement.
#[allow(clippy::too_many_arguments)]
fn preempt(
    state: &State,
    now_ms: i64,
    ent: &BTreeMap<String, f64>,
    total: f64,
    alloc: &BTreeMap<String, u32>,
    pool: &Pool,
    unplaced: &[&Job],
    out: &mut Plan,
) {
    // Members by index: this phase looks them up for every candidate.
    let names: Vec<&str> = ent.keys().map(String::as_str).collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let share: Vec<f64> = names.iter().map(|m| ent[*m] * total).collect();
    let mut held: Vec<f64> = names
        .iter()
        .map(|m| alloc.get(*m).copied().unwrap_or(0) as f64)
        .collect();
    // Nothing to take from if no member holds more than its entitlement.
    if !held.iter().zip(&share).any(|(h, s)| h > s) {
        return;
    }
    // The runs that may be preempted now, by the slot (node, GPU kind) they
    // hold, largest and then youngest first: the candidates in that order.
    let node_idx: HashMap<&str, usize> = pool
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut runs: Vec<Run> = Vec::new();
    let mut by_slot: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for v in state.running.iter().map(|id| &state.jobs[id]) {
        if !state.preemptible(v, now_ms) {
            continue;
        }
        let (Some(&n), Some(&member)) = (
            v.node.as_deref().and_then(|n| node_idx.get(n)),
            index.get(v.member.as_str()),
        ) else {
            continue;
        };
        let class = v
            .gpus
            .first()
            .and_then(|u| pool.nodes[n].gpus.iter().find(|g| &g.uuid == u))
            .and_then(|g| pool.class_of(g));
        if let Some(c) = class {
            by_slot.entry((n, c)).or_default().push(runs.len());
            runs.push(Run {
                job: v,
                member,
                gpus: v.spec.gpus,
                taken: false,
            });
        }
    }
    for vs in by_slot.values_mut() {
        vs.sort_by_key(|&r| {
            let v = runs[r].job;
            (
                std::cmp::Reverse(v.spec.gpus),
                std::cmp::Reverse(v.started_at_ms),
                v.id,
            )
        });
    }
    // Per member, the smallest gang no victims were found for: victims only
    // become fewer and the member's share only grows during the pass.
    let mut hopeless: Vec<u32> = vec![u32::MAX; names.len()];
    for job in unplaced {
        if by_slot.is_empty() {
            return;
        }
        if job.nominated_node.is_some() {
            continue; // GPUs are already being freed for it
        }
        let Some(&m) = index.get(job.member.as_str()) else {
            continue;
        };
        let g = job.spec.gpus;
        if g >= hopeless[m] || share[m] <= 0.0 || held[m] >= share[m] {
            continue;
        }
        // Best victim set over all slots: fewest runs, then youngest.
        let classes: Vec<usize> = pool.matching(&job.spec).collect();
        let after_m = held[m] + g as f64;
        let mut best: Option<(usize, std::cmp::Reverse<i64>, usize, Vec<usize>)> = None;
        let mut chosen: Vec<usize> = Vec::new();
        for (slot, victims) in &by_slot {
            let s = &pool.slots[slot.0][&slot.1];
            if !classes.contains(&slot.1) || s.size < g as usize {
                continue;
            }
            let need = (g as usize).saturating_sub(s.free.len());
            if need == 0 {
                continue; // it fits; only the reservation holds it back
            }
            chosen.clear();
            let mut freed = 0usize;
            let mut lost: Vec<(usize, f64)> = Vec::new();
            for &r in victims {
                if freed >= need {
                    break;
                }
                let run = &runs[r];
                let v = run.member;
                if run.taken || v == m || held[v] <= share[v] {
                    continue;
                }
                let already = lost.iter().find(|(x, _)| *x == v).map_or(0.0, |(_, l)| *l);
                let left = held[v] - already - run.gpus as f64;
                // The victim's member keeps at least its entitlement, and the
                // beneficiary ends no further above its own than the victim's
                // member (after_m / ent_m <= left / ent_v, multiplied out).
                if left >= share[v] && after_m * share[v] <= left * share[m] {
                    match lost.iter_mut().find(|(x, _)| *x == v) {
                        Some((_, l)) => *l += run.gpus as f64,
                        None => lost.push((v, run.gpus as f64)),
                    }
                    freed += run.gpus as usize;
                    chosen.push(r);
                }
            }
            if freed < need {
                continue;
            }
            let youngest = chosen
                .iter()
                .filter_map(|&r| runs[r].job.started_at_ms)
                .min()
                .unwrap_or(0);
            let rank = (chosen.len(), std::cmp::Reverse(youngest), freed);
            if best.as_ref().is_none_or(|(n, y, f, _)| rank < (*n, *y, *f)) {
                best = Some((rank.0, rank.1, rank.2, chosen.clone()));
            }
        }
        let Some((_, _, _, victims)) = best else {
            hopeless[m] = hopeless[m].min(g);
            continue;
        };
        let node = runs[victims[0]].job.node.clone().unwrap_or_default();
        for r in victims {
            runs[r].taken = true;
            held[runs[r].member] -= runs[r].gpus as f64;
            out.preemptions.push(Preemption {
                job: runs[r].job.id,
                for_job: job.id,
            });
        }
        held[m] += g as f64;
        out.waiting.insert(job.id, Wait::Preempting { node });
    }
}

/// A run that may be preempted, in the preemption phase of a pass.
struct Run<'a> {
    job: &'a Job,
    member: usize,
    gpus: u32,
    taken: bool,
}

/// The pending jobs in the order the policy gives.
enum Order<'a> {
    Sorted(std::vec::IntoIter<&'a Job>),
    /// Progressive filling: the member with the least GPUs relative to its
    /// entitlement goes next, re-evaluated after every placement.
    Drf {
        first: std::vec::IntoIter<&'a Job>,
        queues: BTreeMap<String, std::collections::VecDeque<&'a Job>>,
        keys: BTreeSet<(u64, String)>,
        key_of: BTreeMap<String, u64>,
        ent: BTreeMap<String, f64>,
        total: f64,
    },
}

/// Queue order: by submission time; an array's tasks (which share theirs)
/// by index, 0, 1, 2, ... as in Slurm; then by id.
fn age(j: &Job) -> (i64, u32, JobId) {
    (
        j.submitted_at_ms,
        j.array.as_ref().map_or(0, |a| a.task),
        j.id,
    )
}

/// A non-negative float as an integer that sorts the same way.
fn sort_key(x: f64) -> u64 {
    x.max(0.0).to_bits()
}

impl<'a> Order<'a> {
    fn new(
        state: &State,
        ready: Vec<&'a Job>,
        ent: &BTreeMap<String, f64>,
        alloc: &BTreeMap<String, u32>,
        total: f64,
        usage: &BTreeMap<String, f64>,
    ) -> Self {
        let (mut first, mut rest): (Vec<&Job>, Vec<&Job>) =
            ready.into_iter().partition(|j| j.nominated_node.is_some());
        first.sort_by_key(|j| age(j));
        match state.policy.ordering {
            Ordering::Fifo => {
                rest.sort_by_key(|j| age(j));
                first.extend(rest);
                Order::Sorted(first.into_iter())
            }
            Ordering::Fairshare => {
                let f = factors(ent, usage);
                let fk =
                    |j: &Job| std::cmp::Reverse(sort_key(f.get(&j.member).copied().unwrap_or(0.0)));
                rest.sort_by_cached_key(|j| (fk(j), std::cmp::Reverse(j.spec.priority), age(j)));
                first.extend(rest);
                Order::Sorted(first.into_iter())
            }
            Ordering::Drf => {
                let mut queues: BTreeMap<String, std::collections::VecDeque<&Job>> =
                    BTreeMap::new();
                rest.sort_by_key(|j| (std::cmp::Reverse(j.spec.priority), age(j)));
                for j in rest {
                    queues.entry(j.member.clone()).or_default().push_back(j);
                }
                let mut o = Order::Drf {
                    first: first.into_iter(),
                    queues,
                    keys: BTreeSet::new(),
                    key_of: BTreeMap::new(),
                    ent: ent.clone(),
                    total,
                };
                let members: Vec<String> = match &o {
                    Order::Drf { queues, .. } => queues.keys().cloned().collect(),
                    _ => unreachable!(),
                };
                for m in members {
                    o.placed(&m, alloc);
                }
                o
            }
        }
    }

    fn next(&mut self) -> Option<&'a Job> {
        match self {
            Order::Sorted(it) => it.next(),
            Order::Drf {
                first,
                queues,
                keys,
                key_of,
                ..
            } => {
                if let Some(j) = first.next() {
                    return Some(j);
                }
                let (k, m) = keys.pop_first()?;
                let q = queues.get_mut(&m).expect("keyed members have a queue");
                let j = q.pop_front();
                if q.is_empty() {
                    key_of.remove(&m);
                } else {
                    keys.insert((k, m));
                }
                j
            }
        }
    }

    /// `member` now holds `alloc[member]` GPUs: re-key it.
    fn placed(&mut self, member: &str, alloc: &BTreeMap<String, u32>) {
        if let Order::Drf {
            queues,
            keys,
            key_of,
            ent,
            total,
            ..
        } = self
        {
            if queues.get(member).is_none_or(|q| q.is_empty()) {
                return;
            }
            let e = ent.get(member).copied().unwrap_or(0.0);
            let share = alloc.get(member).copied().unwrap_or(0) as f64 / total.max(1.0);
            let k = if e > 0.0 {
                sort_key(share / e)
            } else {
                sort_key(f64::INFINITY)
            };
            if let Some(old) = key_of.insert(member.to_string(), k) {
                keys.remove(&(old, member.to_string()));
            }
            keys.insert((k, member.to_string()));
        }
    }
}

/// A job that found no place in this pass, for skipping the like of it.
#[derive(Debug, Clone, Copy)]
struct Failure {
    gpus: u32,
    /// Expected end (None: no time limit).
    ends: Option<i64>,
    /// It would have fitted but for the reservation.
    behind_reservation: bool,
}

impl Failure {
    /// A job of `gpus` ending at `ends` fails too: it is no smaller and ends
    /// no earlier, so no slot admits it that did not admit this one.
    fn covers(&self, gpus: u32, ends: Option<i64>) -> bool {
        let no_earlier = match (ends, self.ends) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a >= b,
        };
        gpus >= self.gpus && no_earlier
    }
}

/// The head-of-line job's hold on one node's GPUs of one kind.
struct Reservation {
    job: JobId,
    slot: (usize, usize),
    /// When enough GPUs will be free for it; `None`: not known.
    at_ms: Option<i64>,
    /// GPUs of the slot that later jobs may still take without delaying it.
    spare: usize,
}

impl Reservation {
    fn admits(&self, expected_end: Option<i64>, gpus: usize) -> bool {
        let ends_first = matches!((expected_end, self.at_ms), (Some(e), Some(t)) if e <= t);
        ends_first || gpus <= self.spare
    }

    fn consume(&mut self, expected_end: Option<i64>, gpus: usize) {
        let ends_first = matches!((expected_end, self.at_ms), (Some(e), Some(t)) if e <= t);
        if !ends_first {
            self.spare -= gpus;
        }
    }
}

/// One node's GPUs of one kind.
#[derive(Default)]
struct Slot<'a> {
    /// Free GPUs, lowest index first.
    free: Vec<&'a Gpu>,
    size: usize,
    /// Expected ends of the runs placed here in this pass, one per GPU.
    taken_ends: Vec<Option<i64>>,
}

/// Free GPUs of the pass, by node and kind (model, memory).
struct Pool<'a> {
    nodes: Vec<&'a Node>,
    classes: Vec<(&'a str, u64)>,
    /// Per node: its GPUs of each class.
    slots: Vec<BTreeMap<usize, Slot<'a>>>,
    /// Per class: (free GPUs, node) for every node with that class.
    by_free: Vec<BTreeSet<(usize, usize)>>,
    free_total: usize,
}

impl<'a> Pool<'a> {
    fn new(state: &'a State) -> Self {
        let nodes: Vec<&Node> = state
            .nodes
            .values()
            .filter(|n| n.up && !n.draining && n.cordon.is_none())
            .collect();
        let mut classes: Vec<(&str, u64)> = nodes
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| (g.model.as_str(), g.memory_mb)))
            .collect();
        classes.sort();
        classes.dedup();
        let class_idx: BTreeMap<(&str, u64), usize> =
            classes.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let mut slots = Vec::with_capacity(nodes.len());
        let mut by_free = vec![BTreeSet::new(); classes.len()];
        let mut free_total = 0;
        for (ni, n) in nodes.iter().enumerate() {
            let mut s: BTreeMap<usize, Slot> = BTreeMap::new();
            for g in &n.gpus {
                let e = s
                    .entry(class_idx[&(g.model.as_str(), g.memory_mb)])
                    .or_default();
                e.size += 1;
                if g.job.is_none() {
                    e.free.push(g);
                }
            }
            for (c, slot) in s.iter_mut() {
                slot.free.sort_by_key(|g| g.index);
                free_total += slot.free.len();
                by_free[*c].insert((slot.free.len(), ni));
            }
            slots.push(s);
        }
        Self {
            nodes,
            classes,
            slots,
            by_free,
            free_total,
        }
    }

    fn class_of(&self, g: &Gpu) -> Option<usize> {
        self.classes
            .binary_search(&(g.model.as_str(), g.memory_mb))
            .ok()
    }

    fn matching<'s>(&'s self, spec: &'s JobSpec) -> impl Iterator<Item = usize> + 's {
        let model = spec.gpu_model.as_ref();
        let min = spec.min_gpu_memory_mb;
        self.classes
            .iter()
            .enumerate()
            .filter_map(move |(i, (m, mem))| {
                (model
                    .as_ref()
                    .is_none_or(|want| want.eq_ignore_ascii_case(m))
                    && *mem >= min)
                    .then_some(i)
            })
    }

    /// The best-fit slot with enough free GPUs that `allowed` accepts.
    fn best_fit(
        &self,
        spec: &JobSpec,
        allowed: impl Fn((usize, usize), usize) -> bool,
    ) -> Option<(usize, usize)> {
        let want = spec.gpus as usize;
        self.matching(spec)
            .filter_map(|c| {
                self.by_free[c]
                    .range((want, 0)..)
                    .find(|(free, n)| allowed((*n, c), *free))
                    .map(|(free, n)| (*free, *n, c))
            })
            .min()
            .map(|(_, n, c)| (n, c))
    }

    fn fits_anywhere(&self, spec: &JobSpec) -> bool {
        self.best_fit(spec, |_, _| true).is_some()
    }

    fn most_free(&self, spec: &JobSpec) -> usize {
        self.matching(spec)
            .filter_map(|c| self.by_free[c].last().map(|(f, _)| *f))
            .max()
            .unwrap_or(0)
    }

    fn no_fit(&self, spec: &JobSpec) -> Wait {
        Wait::NoFit {
            gpus: spec.gpus,
            most_free: if self.free_total == 0 {
                0
            } else {
                self.most_free(spec) as u32
            },
        }
    }

    /// Every slot whose kind fits `spec` and that is large enough, with its free count.
    fn slots_for(&self, spec: &JobSpec) -> Vec<((usize, usize), usize)> {
        let want = spec.gpus as usize;
        let classes: Vec<usize> = self.matching(spec).collect();
        let mut out = Vec::new();
        for (ni, s) in self.slots.iter().enumerate() {
            for c in &classes {
                if let Some(slot) = s.get(c)
                    && slot.size >= want
                {
                    out.push(((ni, *c), slot.free.len()));
                }
            }
        }
        out
    }

    fn take(&mut self, at: (usize, usize), want: usize, ends: Option<i64>) -> Vec<String> {
        let slot = self.slots[at.0].get_mut(&at.1).expect("slot exists");
        self.by_free[at.1].remove(&(slot.free.len(), at.0));
        let taken: Vec<String> = slot.free.drain(..want).map(|g| g.uuid.clone()).collect();
        slot.taken_ends.extend(std::iter::repeat_n(ends, want));
        self.by_free[at.1].insert((slot.free.len(), at.0));
        self.free_total -= want;
        taken
    }

    /// Where `job` will fit soonest, from the time limits of the runs there
    /// (and of those placed earlier in this pass). The node preemption is
    /// freeing for it comes first.
    fn reserve(&self, state: &State, job: &Job, now_ms: i64) -> Option<Reservation> {
        let want = job.spec.gpus as usize;
        type Rank = (bool, i64, std::cmp::Reverse<usize>, (usize, usize));
        let mut best: Option<(Rank, Reservation)> = None;
        for (slot, free) in self.slots_for(&job.spec) {
            let node = self.nodes[slot.0];
            let mut ends: Vec<Option<i64>> = node
                .gpus
                .iter()
                .filter(|g| self.class_of(g) == Some(slot.1))
                .filter_map(|g| g.job)
                .map(|id| expected_end(&state.jobs[&id], now_ms, &state.policy))
                .chain(self.slots[slot.0][&slot.1].taken_ends.iter().copied())
                .collect();
            ends.sort_by_key(|e| e.unwrap_or(i64::MAX));
            let need = want.saturating_sub(free);
            let at = if need == 0 {
                Some(now_ms)
            } else {
                ends.get(need - 1).copied().flatten()
            };
            let spare = at.map_or(0, |t| {
                free + ends.iter().filter(|e| e.is_some_and(|e| e <= t)).count() - want
            });
            let nominated = job.nominated_node.as_deref() == Some(node.name.as_str());
            let rank = (
                !nominated,
                at.unwrap_or(i64::MAX),
                std::cmp::Reverse(free),
                slot,
            );
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                let r = Reservation {
                    job: job.id,
                    slot,
                    at_ms: at,
                    spare,
                };
                best = Some((rank, r));
            }
        }
        best.map(|(_, r)| r)
    }
}

/// When a running job's GPUs are expected to be free.
fn expected_end(job: &Job, now_ms: i64, policy: &crate::policy::Policy) -> Option<i64> {
    if job.preempted_for().is_some() {
        return Some(now_ms + policy.preempt_grace_s as i64 * 1000);
    }
    if job.stopping() {
        return Some(now_ms + job.spec.kill_grace_ms as i64);
    }
    let limit = job.spec.time_limit_ms as i64;
    if limit == 0 {
        return None;
    }
    Some(job.started_at_ms.unwrap_or(now_ms) + limit)
}
