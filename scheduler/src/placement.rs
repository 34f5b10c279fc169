//! Placement: which pending jobs go where, now. Pure: reads the state, returns
//! decisions; the leader proposes them as `Op::Place` and apply re-validates them.
//!
//! Policy for now: arrival order, gang placement (all of a job's GPUs on one node),
//! best fit (the node left with the fewest free matching GPUs) so that whole nodes
//! stay free for large jobs, and jobs that do not fit yet are skipped so smaller
//! ones behind them can use idle GPUs. Fair-share ordering replaces arrival order
//! later without changing this interface.

use std::collections::BTreeMap;

use crate::state::{JobId, State, gpu_fits};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    pub node: String,
    pub gpus: Vec<String>,
}

pub fn schedule(state: &State, now_ms: i64) -> Vec<Placement> {
    // Free GPUs per up node, in index order.
    let mut free: BTreeMap<&str, Vec<&crate::state::Gpu>> = state
        .nodes
        .values()
        .filter(|n| n.up)
        .map(|n| {
            let mut gpus: Vec<_> = n.gpus.iter().filter(|g| g.job.is_none()).collect();
            gpus.sort_by_key(|g| g.index);
            (n.name.as_str(), gpus)
        })
        .collect();
    let mut left: usize = free.values().map(Vec::len).sum();
    let mut out = Vec::new();
    for (_, id) in &state.queue {
        if left == 0 {
            break;
        }
        let job = &state.jobs[id];
        if job.not_before_ms > now_ms {
            continue;
        }
        let want = job.spec.gpus as usize;
        let best = free
            .iter()
            .map(|(name, gpus)| {
                let fitting = gpus.iter().filter(|g| gpu_fits(g, &job.spec)).count();
                (fitting, *name)
            })
            .filter(|(fitting, _)| *fitting >= want)
            .min();
        let Some((_, node)) = best else { continue };
        let gpus = free.get_mut(node).expect("node from free");
        let mut chosen = Vec::with_capacity(want);
        gpus.retain(|g| {
            if chosen.len() < want && gpu_fits(g, &job.spec) {
                chosen.push(g.uuid.clone());
                false
            } else {
                true
            }
        });
        left -= want;
        out.push(Placement {
            job: *id,
            node: node.to_string(),
            gpus: chosen,
        });
    }
    out
}
