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
//! - Gang placement: all of a job's GPUs at once, of one model and memory
//!   size, and best fit: the nodes left with the fewest free GPUs of that
//!   kind, so that whole nodes stay free for large jobs. A job larger than
//!   any node (or that asks for `nodes`/`gpus_per_node`) spans the fewest
//!   nodes with equal parts (`state::gang::shape`), all placed at once.
//! - Backfill: the first job that does not fit reserves the node (or nodes,
//!   for a multi-node job) where it will fit soonest (from the time limits of the runs there). Later jobs may use
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

mod order;
mod pool;
mod preempt;

use order::{Order, age};
use pool::{Failure, Pool, Reservation};
use preempt::preempt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    /// Rank 0's node and GPUs (the only ones of a one-node run).
    pub node: String,
    pub gpus: Vec<String>,
    /// The other ranks' of a multi-node run, in rank order.
    pub more: Vec<(String, Vec<String>)>,
}

impl Placement {
    /// The command that makes it: `Place`, or `PlaceGang` with a free
    /// rendezvous port on rank 0's node.
    pub fn op(self, state: &State) -> crate::state::Op {
        place_ops(state, vec![self]).remove(0)
    }
}

/// The commands that make `placements`, in order: multi-node runs led from
/// the same host in one pass get different rendezvous ports.
pub fn place_ops(state: &State, placements: Vec<Placement>) -> Vec<crate::state::Op> {
    use crate::state::Op;
    let mut taken: Vec<(String, u16)> = Vec::new();
    placements
        .into_iter()
        .map(|p| {
            if p.more.is_empty() {
                return Op::Place {
                    job: p.job,
                    node: p.node,
                    gpus: p.gpus,
                };
            }
            let host = state.rendezvous_host(&p.node).to_string();
            let port = state.free_rendezvous_port(&p.node, |port| {
                taken.iter().any(|(h, t)| *h == host && *t == port)
            });
            taken.push((host, port));
            let mut parts = vec![(p.node, p.gpus)];
            parts.extend(p.more);
            Op::PlaceGang {
                job: p.job,
                parts,
                port,
            }
        })
        .collect()
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
    /// A multi-node job: not `nodes` nodes with `per_node` free GPUs each of
    /// one kind it accepts.
    NoFitNodes { nodes: u32, per_node: u32 },
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
            Wait::Reserved { .. } | Wait::NoFit { .. } | Wait::NoFitNodes { .. } => "Resources",
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
            Wait::NoFitNodes { nodes, per_node } => write!(
                f,
                "waiting for {nodes} nodes with {per_node} free GPUs of one kind each, all at once"
            ),
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

/// How `job` splits over the nodes of the pass (see `state::gang::shape`),
/// with each kind of request's node sizes found once per pass.
fn shape_of(
    state: &State,
    sizes: &mut HashMap<(Option<String>, u64), Vec<Vec<usize>>>,
    job: &Job,
) -> Option<(u32, u32)> {
    let spec = &job.spec;
    // A job that asks for nothing and fits the smallest node needs no search.
    if spec.nodes == 0 && spec.gpus_per_node == 0 && spec.gpus == 1 {
        return Some((1, 1));
    }
    let key = (
        spec.gpu_model.as_ref().map(|m| m.to_ascii_lowercase()),
        spec.min_gpu_memory_mb,
    );
    let s = sizes
        .entry(key)
        .or_insert_with(|| state.node_sizes(spec, true));
    crate::state::gang_shape(spec, s)
}

/// One pass at `now_ms`. `usage` is each member's decayed usage (see
/// `fairshare::usage`), used by the `fairshare` order.
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
    // Per kind of request, what each node offers it: how jobs split.
    let mut shapes: HashMap<(Option<String>, u64), Vec<Vec<usize>>> = HashMap::new();

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
        let Some((n, per)) = shape_of(state, &mut shapes, job) else {
            // No node offers its kind of GPU any more.
            out.waiting.insert(job.id, pool.no_fit(&job.spec));
            unplaced.push(job);
            continue;
        };
        let (n, per) = (n as usize, per as usize);
        let expected_end =
            (job.spec.time_limit_ms > 0).then(|| now_ms + job.spec.time_limit_ms as i64);
        let like = failed
            .get(&key)
            .and_then(|fs| fs.iter().find(|f| f.covers(job.spec.gpus, n, expected_end)))
            .copied();
        let hopeless = pool.free_total < want || like.is_some();
        let found = if hopeless {
            None
        } else {
            pool.gang_fit(&job.spec, n, per, |slot, _| match &reservation {
                Some(r) => r.admits(slot, expected_end, per),
                None => true,
            })
        };
        match found {
            Some(slots) => {
                let mut parts = Vec::with_capacity(n);
                for slot in slots {
                    if let Some(r) = reservation.as_mut() {
                        r.consume(slot, expected_end, per);
                    }
                    let gpus = pool.take(slot, per, expected_end);
                    parts.push((pool.nodes[slot.0].name.clone(), gpus));
                }
                *alloc.entry(job.member.clone()).or_default() += job.spec.gpus;
                order.placed(&job.member, &alloc);
                let (node, gpus) = parts.remove(0);
                out.placements.push(Placement {
                    job: job.id,
                    node,
                    gpus,
                    more: parts,
                });
            }
            None => {
                unplaced.push(job);
                let behind = match like {
                    Some(f) => f.behind_reservation,
                    None => pool.free_total >= want && pool.fits_anywhere(&job.spec, n, per),
                };
                if like.is_none() {
                    let fs = failed.entry(key).or_default();
                    if fs.len() < 16 {
                        fs.push(Failure {
                            gpus: job.spec.gpus,
                            nodes: n,
                            ends: expected_end,
                            behind_reservation: behind,
                        });
                    }
                }
                if n > 1 && !(behind && reservation.is_some()) {
                    out.waiting.insert(
                        job.id,
                        Wait::NoFitNodes {
                            nodes: n as u32,
                            per_node: per as u32,
                        },
                    );
                } else if !behind {
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
                    && let Some(r) = pool.reserve(state, job, n, per, now_ms)
                {
                    let nodes: Vec<&str> = r
                        .slots
                        .iter()
                        .map(|(slot, _)| pool.nodes[slot.0].name.as_str())
                        .collect();
                    out.waiting.insert(
                        job.id,
                        Wait::Reserved {
                            node: nodes.join(","),
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
            state,
            now_ms,
            &ent,
            total,
            &alloc,
            &pool,
            &unplaced,
            &mut shapes,
            &mut out,
        );
    }
    out
}
