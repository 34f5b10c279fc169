//! The jobs in memory as a persistent map. A clone (the view readers are
//! given after each batch of applies, a snapshot's copy) shares every job
//! with the original; apply then copies only the tree nodes on the way to
//! the job it changes, and that one job.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Job, JobId};

/// Jobs by id, in id order (so encoded exactly as a `BTreeMap` was).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jobs(imbl::OrdMap<JobId, Arc<Job>>);

impl Jobs {
    pub fn get(&self, id: &JobId) -> Option<&Job> {
        self.0.get(id).map(|j| &**j)
    }

    /// The job to change: copied first if a view or snapshot shares it.
    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut Job> {
        self.0.get_mut(id).map(Arc::make_mut)
    }

    pub fn insert(&mut self, id: JobId, job: Job) -> Option<Job> {
        self.0.insert(id, Arc::new(job)).map(Arc::unwrap_or_clone)
    }

    pub fn remove(&mut self, id: &JobId) -> Option<Job> {
        self.0.remove(id).map(Arc::unwrap_or_clone)
    }

    pub fn contains_key(&self, id: &JobId) -> bool {
        self.0.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&JobId, &Job)> {
        self.0.iter().map(|(id, j)| (id, &**j))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &JobId> {
        self.0.keys()
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Job> {
        self.0.values().map(|j| &**j)
    }
}

impl std::ops::Index<&JobId> for Jobs {
    type Output = Job;

    fn index(&self, id: &JobId) -> &Job {
        self.get(id).expect("no job with this id")
    }
}

impl<'a> IntoIterator for &'a Jobs {
    type Item = (&'a JobId, &'a Job);
    type IntoIter = Box<dyn DoubleEndedIterator<Item = (&'a JobId, &'a Job)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl FromIterator<(JobId, Job)> for Jobs {
    fn from_iter<I: IntoIterator<Item = (JobId, Job)>>(iter: I) -> Self {
        Self(iter.into_iter().map(|(id, j)| (id, Arc::new(j))).collect())
    }
}

impl Serialize for Jobs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Jobs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<JobId, Job>::deserialize(d)?
            .into_iter()
            .collect())
    }
}
