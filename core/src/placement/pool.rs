//! The free GPUs of a pass by node and kind, best-fit gang placement, and
//! the head-of-line job's reservation for backfill.

use super::*;

/// A job that found no place in this pass, for skipping the like of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Failure {
    pub(super) gpus: u32,
    /// Over how many nodes.
    pub(super) nodes: usize,
    /// Expected end (None: no time limit).
    pub(super) ends: Option<i64>,
    /// It would have fitted but for the reservation.
    pub(super) behind_reservation: bool,
}

impl Failure {
    /// A job of `gpus` ending at `ends` fails too: it is no smaller and ends
    /// no earlier, so no slot admits it that did not admit this one.
    pub(super) fn covers(&self, gpus: u32, nodes: usize, ends: Option<i64>) -> bool {
        let no_earlier = match (ends, self.ends) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a >= b,
        };
        // Parts no smaller: a job over more nodes may fit where this did not.
        nodes == self.nodes && gpus >= self.gpus && no_earlier
    }
}

/// The head-of-line job's hold on GPUs of one kind: on one node, or on as
/// many as a multi-node job needs.
pub(super) struct Reservation {
    pub(super) job: JobId,
    /// The reserved slots, each with the GPUs later jobs may still take
    /// there without delaying it.
    pub(super) slots: Vec<((usize, usize), usize)>,
    /// When enough GPUs will be free for it on all of them; `None`: not known.
    pub(super) at_ms: Option<i64>,
}

impl Reservation {
    /// Whether a job ending at `expected_end` may take `gpus` GPUs of `slot`.
    pub(super) fn admits(
        &self,
        slot: (usize, usize),
        expected_end: Option<i64>,
        gpus: usize,
    ) -> bool {
        match self.slots.iter().find(|(s, _)| *s == slot) {
            None => true,
            Some((_, spare)) => self.ends_first(expected_end) || gpus <= *spare,
        }
    }

    pub(super) fn consume(&mut self, slot: (usize, usize), expected_end: Option<i64>, gpus: usize) {
        let ends_first = self.ends_first(expected_end);
        if let Some((_, spare)) = self.slots.iter_mut().find(|(s, _)| *s == slot)
            && !ends_first
        {
            *spare -= gpus;
        }
    }

    fn ends_first(&self, expected_end: Option<i64>) -> bool {
        matches!((expected_end, self.at_ms), (Some(e), Some(t)) if e <= t)
    }
}

/// One node's GPUs of one kind.
#[derive(Default)]
pub(super) struct Slot<'a> {
    /// Free GPUs, lowest index first.
    pub(super) free: Vec<&'a Gpu>,
    pub(super) size: usize,
    /// Expected ends of the runs placed here in this pass, one per GPU.
    pub(super) taken_ends: Vec<Option<i64>>,
}

/// Free GPUs of the pass, by node and kind (model, memory).
pub(super) struct Pool<'a> {
    pub(super) nodes: Vec<&'a Node>,
    pub(super) classes: Vec<(&'a str, u64)>,
    /// Per node: its GPUs of each class.
    pub(super) slots: Vec<BTreeMap<usize, Slot<'a>>>,
    /// Per class: (free GPUs, node) for every node with that class.
    pub(super) by_free: Vec<BTreeSet<(usize, usize)>>,
    pub(super) free_total: usize,
    /// Which nodes a multi-node job's parts may share (policy).
    pub(super) rule: crate::policy::GangNodes,
}

impl<'a> Pool<'a> {
    pub(super) fn new(state: &'a State) -> Self {
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
            rule: state.policy.gang_nodes,
        }
    }

    pub(super) fn class_of(&self, g: &Gpu) -> Option<usize> {
        self.classes
            .binary_search(&(g.model.as_str(), g.memory_mb))
            .ok()
    }

    pub(super) fn matching<'s>(&'s self, spec: &'s JobSpec) -> impl Iterator<Item = usize> + 's {
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

    /// `n` slots of one kind on distinct nodes with `per` free GPUs each that
    /// `allowed` accepts, best fit: those left with the fewest free GPUs, so
    /// that whole nodes stay free for large jobs. Several nodes are taken in
    /// one site (`Node::site`) where one has room for all, else across sites;
    /// in one site or of one owner only, where the policy says so.
    pub(super) fn gang_fit(
        &self,
        spec: &JobSpec,
        n: usize,
        per: usize,
        allowed: impl Fn((usize, usize), usize) -> bool,
    ) -> Option<Vec<(usize, usize)>> {
        self.matching(spec)
            .filter_map(|c| {
                let fits = self.by_free[c]
                    .range((per, 0)..)
                    .filter(|(free, node)| allowed((*node, c), *free))
                    .copied();
                use crate::policy::GangNodes;
                let (across, chosen) = if n == 1 {
                    (false, fits.take(1).collect::<Vec<_>>())
                } else {
                    let all: Vec<(usize, usize)> = fits.collect();
                    let by = match self.rule {
                        GangNodes::Any => GangNodes::Site,
                        rule => rule,
                    };
                    match self.one_group(&all, n, by) {
                        Some(one) => (false, one),
                        None if self.rule == GangNodes::Any => {
                            (true, all.into_iter().take(n).collect())
                        }
                        None => (false, vec![]),
                    }
                };
                (chosen.len() == n).then(|| {
                    let free: usize = chosen.iter().map(|(f, _)| f).sum();
                    (across, free, chosen[0].1, c, chosen)
                })
            })
            .min()
            .map(|(_, _, _, c, chosen)| chosen.into_iter().map(|(_, node)| (node, c)).collect())
    }

    /// The best fit of `n` of `fits` ((free, node), fewest free first) that
    /// share one group (a site, an owner), if a group has `n` of them.
    fn one_group(
        &self,
        fits: &[(usize, usize)],
        n: usize,
        by: crate::policy::GangNodes,
    ) -> Option<Vec<(usize, usize)>> {
        let mut groups: BTreeMap<&str, Vec<(usize, usize)>> = BTreeMap::new();
        for f in fits {
            groups
                .entry(self.nodes[f.1].group(by))
                .or_default()
                .push(*f);
        }
        groups
            .into_values()
            .filter(|fs| fs.len() >= n)
            .map(|mut fs| {
                fs.truncate(n);
                fs
            })
            .min_by_key(|fs| (fs.iter().map(|(f, _)| f).sum::<usize>(), fs[0].1))
    }

    pub(super) fn fits_anywhere(&self, spec: &JobSpec, n: usize, per: usize) -> bool {
        self.gang_fit(spec, n, per, |_, _| true).is_some()
    }

    pub(super) fn most_free(&self, spec: &JobSpec) -> usize {
        self.matching(spec)
            .filter_map(|c| self.by_free[c].last().map(|(f, _)| *f))
            .max()
            .unwrap_or(0)
    }

    pub(super) fn no_fit(&self, spec: &JobSpec) -> Wait {
        Wait::NoFit {
            gpus: spec.gpus,
            most_free: if self.free_total == 0 {
                0
            } else {
                self.most_free(spec) as u32
            },
        }
    }

    /// Every slot whose kind fits `spec` and that holds at least `want`
    /// GPUs, with its free count.
    pub(super) fn slots_for(&self, spec: &JobSpec, want: usize) -> Vec<((usize, usize), usize)> {
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

    pub(super) fn take(
        &mut self,
        at: (usize, usize),
        want: usize,
        ends: Option<i64>,
    ) -> Vec<String> {
        let slot = self.slots[at.0].get_mut(&at.1).expect("slot exists");
        self.by_free[at.1].remove(&(slot.free.len(), at.0));
        let taken: Vec<String> = slot.free.drain(..want).map(|g| g.uuid.clone()).collect();
        slot.taken_ends.extend(std::iter::repeat_n(ends, want));
        self.by_free[at.1].insert((slot.free.len(), at.0));
        self.free_total -= want;
        taken
    }

    /// Where `job`, as `n` parts of `per` GPUs, will fit soonest, from the
    /// time limits of the runs there (and of those placed earlier in this
    /// pass): the `n` nodes of one kind that free `per` GPUs first, the one
    /// preemption is freeing for it first.
    pub(super) fn reserve(
        &self,
        state: &State,
        job: &Job,
        n: usize,
        per: usize,
        now_ms: i64,
    ) -> Option<Reservation> {
        // Per kind: each large enough slot's rank, when it frees `per`, and
        // its runs' expected ends.
        type Rank = (bool, i64, std::cmp::Reverse<usize>, (usize, usize));
        type Candidate = (Rank, usize, Vec<Option<i64>>);
        // Per kind, and per group of nodes the policy lets parts share.
        let mut by_class: BTreeMap<(usize, &str), Vec<Candidate>> = BTreeMap::new();
        for (slot, free) in self.slots_for(&job.spec, per) {
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
            let need = per.saturating_sub(free);
            let at = if need == 0 {
                Some(now_ms)
            } else {
                ends.get(need - 1).copied().flatten()
            };
            let nominated = job.nominated_node.as_deref() == Some(node.name.as_str());
            let rank = (
                !nominated,
                at.unwrap_or(i64::MAX),
                std::cmp::Reverse(free),
                slot,
            );
            by_class
                .entry((slot.1, node.group(self.rule)))
                .or_default()
                .push((rank, free, ends));
        }
        let mut best: Option<(Rank, Reservation)> = None;
        for mut cands in by_class.into_values() {
            if cands.len() < n {
                continue;
            }
            cands.sort_by_key(|c| c.0);
            cands.truncate(n);
            let last = cands.iter().map(|c| c.0.1).max().unwrap_or(i64::MAX);
            let at = (last != i64::MAX).then_some(last);
            let slots = cands
                .iter()
                .map(|(rank, free, ends)| {
                    let spare = at.map_or(0, |t| {
                        free + ends.iter().filter(|e| e.is_some_and(|e| e <= t)).count() - per
                    });
                    (rank.3, spare)
                })
                .collect();
            let first = cands[0].0;
            let rank = (first.0, last, first.2, first.3);
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((
                    rank,
                    Reservation {
                        job: job.id,
                        slots,
                        at_ms: at,
                    },
                ));
            }
        }
        best.map(|(_, r)| r)
    }
}

/// When a running job's GPUs are expected to be free.
fn expected_end(job: &Job, now_ms: i64, policy: &crate::policy::Policy) -> Option<i64> {
    if job.stopping() {
        return Some(now_ms.saturating_add(job.stop_grace_ms(policy) as i64));
    }
    let limit = job.spec.time_limit_ms as i64;
    if limit == 0 {
        return None;
    }
    Some(job.started_at_ms.unwrap_or(now_ms) + limit)
}
