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
pub(super) struct Run<'a> {
    pub(super) job: &'a Job,
    pub(super) member: usize,
    pub(super) gpus: u32,
    pub(super) taken: bool,
}
