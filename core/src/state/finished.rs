//! Finished jobs in memory, by member: what a usage window counts without
//! visiting every job in memory.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::{JobId, State};

/// Persistent sets, so that a clone of the state shares them.
type ByMember = BTreeMap<String, imbl::OrdSet<(i64, JobId)>>;

/// The current entries of `State::finished` (not those of a job that ran
/// again since) by member. Derived, not replicated: built from the state
/// the first time a reader asks (after a restart or a snapshot install),
/// then kept up to date by apply. Its equality is the state's (it is a
/// function of it; `State::check` holds it to that).
#[derive(Debug, Clone, Default)]
pub struct FinishedByMember(OnceLock<ByMember>);

impl PartialEq for FinishedByMember {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl FinishedByMember {
    /// Once built, the entry goes in (apply's side).
    pub(super) fn insert(&mut self, member: &str, at: i64, id: JobId) {
        if let Some(ix) = self.0.get_mut() {
            ix.entry(member.to_string()).or_default().insert((at, id));
        }
    }

    /// Once built, the entry goes out (apply's side).
    pub(super) fn remove(&mut self, member: &str, at: i64, id: JobId) {
        if let Some(ix) = self.0.get_mut()
            && let Some(set) = ix.get_mut(member)
        {
            set.remove(&(at, id));
            if set.is_empty() {
                ix.remove(member);
            }
        }
    }
}

/// An entry of `finished` is current while its job is final since then.
fn current(job: &super::Job, at: i64) -> bool {
    job.state.is_final() && job.finished_at_ms == Some(at)
}

impl State {
    /// The index, built from `finished` on first use.
    fn finished_by_member(&self) -> &ByMember {
        self.finished_of.0.get_or_init(|| {
            let mut ix = ByMember::new();
            for &(at, id) in &self.finished {
                if let Some(j) = self.jobs.get(&id).filter(|j| current(j, at)) {
                    ix.entry(j.member.clone()).or_default().insert((at, id));
                }
            }
            ix
        })
    }

    /// Builds the derived indexes now: after decoding a state, so that the
    /// clones readers are given share them instead of each building its own.
    pub fn build_indexes(&self) {
        self.finished_by_member();
    }

    /// How many jobs in memory of each member (or of `member`) finished in
    /// `[from_ms, to_ms]`: counted in the index, no job visited.
    pub fn finished_counts(
        &self,
        from_ms: i64,
        to_ms: i64,
        member: Option<&str>,
    ) -> Vec<(&str, u64)> {
        if from_ms > to_ms {
            return Vec::new();
        }
        let range = (from_ms, JobId::nil())..=(to_ms, JobId::max());
        self.finished_by_member()
            .iter()
            .filter(|(m, _)| member.is_none_or(|o| o == m.as_str()))
            .map(|(m, set)| (m.as_str(), set.range(range.clone()).count() as u64))
            .collect()
    }

    /// The index agrees with `finished` (for `State::check`).
    pub(super) fn check_finished_by_member(&self) -> Result<(), String> {
        let Some(ix) = self.finished_of.0.get() else {
            return Ok(());
        };
        let mut n = 0;
        for (member, set) in ix {
            for entry in set {
                n += 1;
                let owner = self.jobs.get(&entry.1).filter(|j| current(j, entry.0));
                if !self.finished.contains(entry) || owner.is_none_or(|j| j.member != *member) {
                    return Err(format!(
                        "finished: job {} at {} is indexed under member {member} wrongly",
                        entry.1, entry.0
                    ));
                }
            }
        }
        let owned = self
            .finished
            .iter()
            .filter(|(at, id)| self.jobs.get(id).is_some_and(|j| current(j, *at)))
            .count();
        if n != owned {
            return Err(format!(
                "finished: {n} entries by member, but {owned} finished jobs in memory"
            ));
        }
        Ok(())
    }
}
