//! What holds after every command, checked after each `State::apply` in
//! debug builds. Each check costs in proportion to the live state (the
//! queue, the running set, the nodes and their GPUs), never to its history
//! (all jobs, the ledger, the audit chain): simulations and property tests
//! apply hundreds of thousands of commands.

use super::{JobState, Op, State};

impl State {
    /// A running run's `gpus` on node `name`: the node is up, and each GPU
    /// is on it, listed once, and recorded as held by `id`.
    fn check_holds(&self, id: super::JobId, name: &str, gpus: &[String]) -> Result<(), String> {
        let node = self
            .nodes
            .get(name)
            .ok_or_else(|| format!("running: job {id} is on node {name}, which does not exist"))?;
        if !node.up {
            return Err(format!(
                "running: job {id} is on node {name}, which is down"
            ));
        }
        for (k, uuid) in gpus.iter().enumerate() {
            if gpus[..k].contains(uuid) {
                return Err(format!("running: job {id} lists GPU {uuid} twice"));
            }
            let g =
                node.gpus.iter().find(|g| &g.uuid == uuid).ok_or_else(|| {
                    format!("running: job {id}'s GPU {uuid} is not on node {name}")
                })?;
            if g.job != Some(id) {
                return Err(format!(
                    "GPU {uuid} on node {name}: held by {:?}, but running job {id} holds it",
                    g.job
                ));
            }
        }
        Ok(())
    }

    /// A running multi-node run: its parts, on distinct nodes, hold all of
    /// its GPUs between them; each part still running holds its own; and
    /// no part runs on while another has failed unless the run is stopping.
    fn check_gang(&self, j: &super::Job, g: &super::Gang) -> Result<(), String> {
        let id = j.id;
        if g.parts.len() < 2 {
            return Err(format!("running: job {id} is a gang of {}", g.parts.len()));
        }
        let all: Vec<&String> = g.parts.iter().flat_map(|p| &p.gpus).collect();
        if all.len() != j.gpus.len() || all.iter().zip(&j.gpus).any(|(a, b)| *a != b) {
            return Err(format!("running: job {id}'s parts do not hold its GPUs"));
        }
        if j.node.as_deref() != Some(g.parts[0].node.as_str()) {
            return Err(format!("running: job {id}'s node is not its rank 0's"));
        }
        for (r, p) in g.parts.iter().enumerate() {
            if g.parts[..r].iter().any(|q| q.node == p.node) {
                return Err(format!("running: job {id} has two parts on {}", p.node));
            }
            if p.end.is_none() {
                self.check_holds(id, &p.node, &p.gpus)?;
            }
            if let Some(s) = p.started_at_ms
                && p.billed_to_ms < s
            {
                return Err(format!(
                    "running: part {r} of job {id} is billed to {} before its start {s}",
                    p.billed_to_ms
                ));
            }
        }
        if g.broken() && !j.stopping() {
            return Err(format!(
                "running: a part of job {id} failed but the others are not being stopped"
            ));
        }
        Ok(())
    }

    /// Checks the state's invariants; the error names the first one broken.
    ///
    /// - `queue`: each entry is a pending job's `(submitted_at_ms, id)`, and a
    ///   pending job is not being stopped.
    /// - `running`: each entry is a running job with a node that is up, on
    ///   which it holds its spec's count of distinct GPUs, each recorded as
    ///   held by it (`Gpu::job`); it has had an attempt, and is billed from
    ///   no earlier than its start.
    ///   A multi-node run: its parts, on distinct nodes, hold its GPUs between
    ///   them; each part still running is on a node that is up and holds its
    ///   own; if a part failed or was lost, the run is being stopped.
    /// - GPUs: a GPU held by a job is held by a running job, on that GPU's
    ///   node, that lists it (for a multi-node run, its part there that is
    ///   still running). With the above, no GPU is held by two runs.
    /// - `audit`: its last record follows the one before (sequence and hash
    ///   link).
    /// - every pending job is queued, every running job in `running`, every
    ///   final job in `finished` (and in its by-member index, once built).
    pub fn check(&self) -> Result<(), String> {
        for &(at, id) in &self.queue {
            let j = self
                .jobs
                .get(&id)
                .ok_or_else(|| format!("queue: job {id} does not exist"))?;
            if j.state != JobState::Pending {
                return Err(format!("queue: job {id} is {:?}, not pending", j.state));
            }
            if j.submitted_at_ms != at {
                return Err(format!(
                    "queue: job {id} is queued at {at} but was submitted at {}",
                    j.submitted_at_ms
                ));
            }
            if let Some(s) = j.stop {
                return Err(format!("queue: pending job {id} is being stopped ({s:?})"));
            }
        }
        for id in &self.running {
            let j = self
                .jobs
                .get(id)
                .ok_or_else(|| format!("running: job {id} does not exist"))?;
            if j.state != JobState::Running {
                return Err(format!("running: job {id} is {:?}, not running", j.state));
            }
            if j.attempts == 0 {
                return Err(format!("running: job {id} runs with no attempt counted"));
            }
            if j.gpus.len() != j.spec.gpus as usize {
                return Err(format!(
                    "running: job {id} holds {} GPUs but asks for {}",
                    j.gpus.len(),
                    j.spec.gpus
                ));
            }
            if let Some(g) = &j.gang {
                self.check_gang(j, g)?;
            } else {
                let name = j
                    .node
                    .as_deref()
                    .ok_or_else(|| format!("running: job {id} has no node"))?;
                self.check_holds(*id, name, &j.gpus)?;
            }
            if let Some(s) = j.started_at_ms
                && j.billed_to_ms < s
            {
                return Err(format!(
                    "running: job {id} is billed to {} before its start {s}",
                    j.billed_to_ms
                ));
            }
        }
        for node in self.nodes.values() {
            for g in &node.gpus {
                let Some(id) = g.job else { continue };
                let held = self.running.contains(&id)
                    && self.jobs.get(&id).is_some_and(|j| {
                        j.run_on(&node.name)
                            .is_some_and(|r| r.gpus.contains(&g.uuid))
                    });
                if !held {
                    return Err(format!(
                        "GPU {} on node {}: held by job {id}, which is not running there on it",
                        g.uuid, node.name
                    ));
                }
            }
        }
        if let [.., before, last] = self.outbox.records.as_slice()
            && (last.seq != before.seq + 1 || last.prev_hash != before.hash)
        {
            return Err(format!(
                "audit: record {} does not follow record {}",
                last.seq, before.seq
            ));
        }
        if let Some(last) = self.outbox.records.last()
            && (last.seq != self.chain.seq || last.hash != self.chain.hash)
        {
            return Err(format!(
                "audit: the chain's head is not its last record ({})",
                last.seq
            ));
        }
        for j in self.jobs.values() {
            let indexed = match j.state {
                JobState::Pending => self.queue.contains(&(j.submitted_at_ms, j.id)),
                JobState::Running => self.running.contains(&j.id),
                _ => true,
            };
            if !indexed {
                return Err(format!(
                    "{}: {:?} job {} is not in it",
                    if j.state == JobState::Pending {
                        "queue"
                    } else {
                        "running"
                    },
                    j.state,
                    j.id
                ));
            }
        }
        // Built here in debug builds, so that apply keeps it from then on
        // and every test holds it to `finished`.
        self.build_indexes();
        self.check_finished_by_member()?;
        for j in self.jobs.values().filter(|j| j.state.is_final()) {
            let indexed = j
                .finished_at_ms
                .is_some_and(|at| self.finished.contains(&(at, j.id)));
            if !indexed {
                return Err(format!(
                    "finished: job {} ({:?}) is not in the index of finished jobs",
                    j.id, j.state
                ));
            }
        }
        Ok(())
    }
}

/// The name of a command's op, for the message of a broken invariant.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
pub(super) fn op_name(op: &Op) -> String {
    let debug = format!("{op:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::super::{Command, GpuInfo, JobKind, JobSpec, Op};
    use super::*;

    fn run(s: &mut State, at_ms: i64, op: Op) {
        s.apply(&Command { at_ms, op }).expect("applies");
    }

    /// A co-op with one two-GPU node, job `a` running on its first GPU and
    /// job `b` pending.
    fn two_jobs() -> (State, Uuid, Uuid) {
        let mut s = State::default();
        run(
            &mut s,
            1,
            Op::Bootstrap {
                operator_token_hash: "op".into(),
                default_member: Some(("alice".into(), "alice".into())),
            },
        );
        let gpu = |i: u32| GpuInfo {
            uuid: format!("GPU-{i}"),
            index: i,
            model: "A100".into(),
            memory_mb: 40_000,
            measured: None,
            power_limit_w: 0,
        };
        run(
            &mut s,
            2,
            Op::RegisterNode {
                node: "n1".into(),
                owner: "alice".into(),
                gpus: vec![gpu(0), gpu(1)],
                session: "s1".into(),
                orphaned_runs_end_ms: 2,
                address: String::new(),
                site: String::new(),
            },
        );
        let spec = JobSpec {
            kind: JobKind::Finetune,
            gpus: 1,
            command: vec!["train".into()],
            gpu_model: None,
            min_gpu_memory_mb: 0,
            preemptible: false,
            kill_grace_ms: 0,
            priority: 0,
            time_limit_ms: 0,
            isolation: Default::default(),
            env: Default::default(),
            nodes: 0,
            gpus_per_node: 0,
        };
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for id in [a, b] {
            let member = "alice".into();
            let spec = spec.clone();
            run(&mut s, 3, Op::SubmitJob { id, member, spec });
        }
        let gpus = vec!["GPU-0".to_string()];
        let node = "n1".into();
        run(&mut s, 4, Op::Place { job: a, node, gpus });
        (s, a, b)
    }

    /// Job `b` made to run on job `a`'s GPU, behind the state machine's back.
    fn corrupt(s: &mut State, b: Uuid) {
        let j = s.jobs.get_mut(&b).unwrap();
        s.queue.remove(&(j.submitted_at_ms, b));
        j.state = JobState::Running;
        j.node = Some("n1".into());
        j.gpus = vec!["GPU-0".into()];
        j.attempts = 1;
        s.running.insert(b);
    }

    #[test]
    fn two_runs_on_one_gpu_are_named() {
        let (mut s, _, b) = two_jobs();
        assert_eq!(s.check(), Ok(()));
        corrupt(&mut s, b);
        let err = s.check().unwrap_err();
        assert!(
            err.contains("GPU GPU-0") && err.contains(&b.to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_queued_job_that_is_not_pending_is_named() {
        let (mut s, a, _) = two_jobs();
        s.queue.insert((3, a));
        let err = s.check().unwrap_err();
        assert!(
            err.starts_with("queue:") && err.contains("not pending"),
            "{err}"
        );
    }

    /// A clone (a reader's view) shares the jobs; changing one through the
    /// original copies it, and the clone stays as it was, encoded the same.
    #[test]
    fn a_clone_keeps_what_it_saw() {
        let (mut s, a, b) = two_jobs();
        let view = s.clone();
        let before = crate::codec::encode(&view);
        run(&mut s, 5, Op::CancelJob { id: b });
        s.jobs.get_mut(&a).unwrap().member = "other".into();
        assert_eq!(view.jobs[&b].state, JobState::Pending);
        assert_eq!(view.jobs[&a].member, "alice");
        assert_eq!(s.jobs[&a].member, "other");
        assert!(view.queue.contains(&(3, b)) && !s.queue.contains(&(3, b)));
        assert_eq!(crate::codec::encode(&view), before);
        let back: State = crate::codec::decode(&before).unwrap();
        // What apply made for the store is not encoded.
        let mut encoded = view;
        encoded.take_outbox();
        assert_eq!(back, encoded);
    }

    #[test]
    fn a_pending_job_missing_from_the_queue_is_named() {
        let (mut s, _, b) = two_jobs();
        s.queue.clear();
        let err = s.check().unwrap_err();
        assert!(
            err.starts_with("queue:") && err.contains(&b.to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_running_job_missing_from_running_is_named() {
        let (mut s, a, _) = two_jobs();
        // Its GPU freed too, so that only the index is wrong.
        s.running.clear();
        s.nodes.get_mut("n1").unwrap().gpus[0].job = None;
        let err = s.check().unwrap_err();
        assert!(
            err.starts_with("running:") && err.contains(&a.to_string()),
            "{err}"
        );
    }

    /// The finished jobs by member, counted for usage windows, follow apply
    /// (built once, then kept) and answer what a scan of every job would.
    #[test]
    fn finished_counts_follow_apply() {
        let (mut s, a, b) = two_jobs();
        assert_eq!(s.finished_counts(0, 100, None), vec![]);
        run(&mut s, 5, Op::CancelJob { id: b });
        assert_eq!(s.finished_counts(0, 100, None), vec![("alice", 1)]);
        run(&mut s, 6, Op::CancelJob { id: a });
        // `a` ends when its agent says it stopped.
        assert_eq!(s.finished_counts(0, 100, Some("alice")), vec![("alice", 1)]);
        assert_eq!(s.finished_counts(6, 100, Some("alice")), vec![("alice", 0)]);
        assert_eq!(s.finished_counts(0, 100, Some("bob")), vec![]);
        assert_eq!(s.check(), Ok(()));
        // Behind apply's back: the index no longer matches `finished`.
        s.finished.clear();
        let err = s.check().unwrap_err();
        assert!(err.starts_with("finished:"), "{err}");
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "invariant broken after CancelJob")]
    fn apply_panics_on_a_broken_invariant_naming_the_op() {
        let (mut s, a, b) = two_jobs();
        corrupt(&mut s, b);
        let _ = s.apply(&Command {
            at_ms: 5,
            op: Op::CancelJob { id: a },
        });
    }
}
