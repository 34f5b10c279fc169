//! The preemption phase of a pass: GPUs taken from runs of members above
//! their entitlement for the unplaced jobs of members below theirs.

use super::*;

/// Chooses preemptions for the unplaced jobs of members below their entitlement.
#[allow(clippy::too_many_arguments)]
pub(super) fn preempt(
    state: &State,
    now_ms: i64,
    ent: &BTreeMap<String, f64>,
    total: f64,
    alloc: &BTreeMap<String, u32>,
    pool: &Pool,
    unplaced: &[&Job],
    shapes: &mut HashMap<(Option<String>, u64), Vec<Vec<usize>>>,
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
    // Each run's candidates, one per part: what preempting it frees where.
    let mut parts_of: HashMap<JobId, Vec<usize>> = HashMap::new();
    for v in state.running.iter().map(|id| &state.jobs[id]) {
        if !state.preemptible(v, now_ms) {
            continue;
        }
        let Some(&member) = index.get(v.member.as_str()) else {
            continue;
        };
        // A multi-node run frees GPUs on each of its nodes: one candidate
        // per part, each freeing that part's GPUs.
        for node in v.run_nodes() {
            let Some(run) = v.run_on(node) else { continue };
            let Some(&n) = node_idx.get(node) else {
                continue;
            };
            let class = run
                .gpus
                .first()
                .and_then(|u| pool.nodes[n].gpus.iter().find(|g| &g.uuid == u))
                .and_then(|g| pool.class_of(g));
            if let Some(c) = class {
                by_slot.entry((n, c)).or_default().push(runs.len());
                parts_of.entry(v.id).or_default().push(runs.len());
                runs.push(Run {
                    job: v,
                    member,
                    slot: (n, c),
                    frees: run.gpus.len() as u32,
                });
            }
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
    let mut taken: BTreeSet<JobId> = BTreeSet::new();
    // Per member, the smallest one-node job no victims were found for:
    // victims only become fewer and the member's share only grows during
    // the pass.
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
        if share[m] <= 0.0 || held[m] >= share[m] {
            continue;
        }
        let Some((n, per)) = shape_of(state, shapes, job) else {
            continue;
        };
        let (n, per) = (n as usize, per as usize);
        if n == 1 && g >= hopeless[m] {
            continue;
        }
        // Slot by slot, the best victim set (fewest runs, then youngest) on
        // a node not chosen yet, until the job's `n` nodes are found; what
        // was chosen for one counts for the next.
        let after_m = held[m] + g as f64;
        let mut trial = Trial {
            held: held.clone(),
            taken: taken.clone(),
            slots: Vec::new(),
            victims: Vec::new(),
            freeing: HashMap::new(),
        };
        let mut found = true;
        for _ in 0..n {
            let mut best: Option<(VictimRank, (usize, usize), Vec<usize>)> = None;
            for c in pool.matching(&job.spec) {
                for (ni, slots) in pool.slots.iter().enumerate() {
                    let Some(s) = slots.get(&c) else { continue };
                    let slot = (ni, c);
                    if s.size < per || trial.slots.iter().any(|(x, _)| *x == ni) {
                        continue;
                    }
                    // A job's parts are of one kind, and share a site or an
                    // owner where the policy says so.
                    let apart = |&(n0, c0): &(usize, usize)| {
                        c0 != c
                            || pool.nodes[n0].group(pool.rule) != pool.nodes[ni].group(pool.rule)
                    };
                    if n > 1 && trial.slots.first().is_some_and(apart) {
                        continue;
                    }
                    // What victims chosen for other nodes free here too.
                    let freeing = trial.freeing.get(&slot).copied().unwrap_or(0);
                    let need = per.saturating_sub(s.free.len() + freeing);
                    if need == 0 && n == 1 {
                        continue; // it fits; only the reservation holds it back
                    }
                    let Some(chosen) = victims_for(
                        &runs,
                        by_slot.get(&slot).map_or(&[][..], Vec::as_slice),
                        need,
                        m,
                        after_m,
                        &share,
                        &trial,
                    ) else {
                        continue;
                    };
                    let youngest = chosen
                        .iter()
                        .filter_map(|&r| runs[r].job.started_at_ms)
                        .min()
                        .unwrap_or(0);
                    let freed: usize = chosen.iter().map(|&r| runs[r].frees as usize).sum();
                    let rank = (chosen.len(), std::cmp::Reverse(youngest), freed);
                    if best.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                        best = Some((rank, slot, chosen));
                    }
                }
            }
            let Some((_, slot, chosen)) = best else {
                found = false;
                break;
            };
            for r in chosen {
                let v = runs[r].job;
                if trial.taken.insert(v.id) {
                    trial.held[runs[r].member] -= v.spec.gpus as f64;
                    trial.victims.push(r);
                    for &q in &parts_of[&v.id] {
                        *trial.freeing.entry(runs[q].slot).or_default() += runs[q].frees as usize;
                    }
                }
            }
            trial.slots.push(slot);
        }
        if !found || trial.victims.is_empty() {
            if n == 1 {
                hopeless[m] = hopeless[m].min(g);
            }
            continue;
        }
        let node = runs[trial.victims[0]].job.node.clone().unwrap_or_default();
        for &r in &trial.victims {
            out.preemptions.push(Preemption {
                job: runs[r].job.id,
                for_job: job.id,
            });
        }
        held = trial.held;
        taken = trial.taken;
        held[m] += g as f64;
        out.waiting.insert(job.id, Wait::Preempting { node });
    }
}

/// How good a slot's victim set is: fewest runs, then youngest, then the
/// fewest GPUs freed.
type VictimRank = (usize, std::cmp::Reverse<i64>, usize);

/// The victims chosen so far for one pending job, over its nodes.
struct Trial {
    held: Vec<f64>,
    taken: BTreeSet<JobId>,
    /// (node, kind) of each node chosen.
    slots: Vec<(usize, usize)>,
    victims: Vec<usize>,
    /// GPUs the victims free, by slot (a multi-node victim frees on each
    /// of its nodes).
    freeing: HashMap<(usize, usize), usize>,
}

/// Runs of `candidates` (one slot's, in preference order) whose preemption
/// frees `need` GPUs there for member `m`, which would then hold `after_m`:
/// the victim's member keeps at least its entitlement, and the beneficiary
/// ends no further above its own than the victim's member. `None` if they
/// do not free enough.
fn victims_for(
    runs: &[Run],
    candidates: &[usize],
    need: usize,
    m: usize,
    after_m: f64,
    share: &[f64],
    trial: &Trial,
) -> Option<Vec<usize>> {
    let mut chosen = Vec::new();
    let mut freed = 0usize;
    let mut lost: Vec<(usize, f64)> = Vec::new();
    for &r in candidates {
        if freed >= need {
            break;
        }
        let run = &runs[r];
        let v = run.member;
        let held = trial.held[v];
        if trial.taken.contains(&run.job.id) || v == m || held <= share[v] {
            continue;
        }
        let already = lost.iter().find(|(x, _)| *x == v).map_or(0.0, |(_, l)| *l);
        let left = held - already - run.job.spec.gpus as f64;
        // (after_m / ent_m <= left / ent_v, multiplied out.)
        if left >= share[v] && after_m * share[v] <= left * share[m] {
            match lost.iter_mut().find(|(x, _)| *x == v) {
                Some((_, l)) => *l += run.job.spec.gpus as f64,
                None => lost.push((v, run.job.spec.gpus as f64)),
            }
            freed += run.frees as usize;
            chosen.push(r);
        }
    }
    (freed >= need).then_some(chosen)
}

/// A run that may be preempted, in the preemption phase of a pass: one per
/// part of a multi-node run.
pub(super) struct Run<'a> {
    pub(super) job: &'a Job,
    pub(super) member: usize,
    /// The node and kind of GPUs of this part.
    pub(super) slot: (usize, usize),
    /// GPUs its preemption frees on this candidate's node.
    pub(super) frees: u32,
}
