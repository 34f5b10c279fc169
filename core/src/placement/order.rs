//! The order pending jobs are tried in: sorted (fair share, FIFO) or by
//! progressive filling (DRF).

use super::*;

/// The pending jobs in the order the policy gives.
pub(super) enum Order<'a> {
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
pub(super) fn age(j: &Job) -> (i64, u32, JobId) {
    (
        j.submitted_at_ms,
        j.array.as_ref().map_or(0, |a| a.task),
        j.id,
    )
}

/// A non-negative float as an integer that sorts the same way.
pub(super) fn sort_key(x: f64) -> u64 {
    x.max(0.0).to_bits()
}

impl<'a> Order<'a> {
    pub(super) fn new(
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

    pub(super) fn next(&mut self) -> Option<&'a Job> {
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
    pub(super) fn placed(&mut self, member: &str, alloc: &BTreeMap<String, u32>) {
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
