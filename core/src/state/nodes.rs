//! Nodes: registration (and what an agent's restart does to its runs), loss,
//! and the measured throughput of the registered GPUs.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Capacity, CutOff, Event, Gpu, GpuInfo, JobId, Node, Rejection, State, invalid, valid_name,
    validation::{MAX_GPUS_PER_NODE, check_gpu},
};

impl State {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn register_node(
        &mut self,
        at: i64,
        name: &str,
        owner: &str,
        gpus: &[GpuInfo],
        session: &str,
        orphaned_end: i64,
        address: &str,
        site: &str,
    ) -> Result<Vec<Event>, Rejection> {
        if !valid_name(name) {
            return Err(invalid(
                "node",
                format!("{name:?} is not a valid node name"),
            ));
        }
        if self.active_member(owner).is_err() {
            return Err(Rejection::NotFound(format!(
                "owner: member {owner:?} does not exist"
            )));
        }
        // A host name or an IP address, no port: it becomes MASTER_ADDR.
        let host_name = address.len() <= 253
            && address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
            && !address.starts_with(['-', '.']);
        // An IPv6 address: hex digits and at least two colons (one colon is a
        // host with a port).
        let ipv6 = address.len() <= 45
            && address.matches(':').count() >= 2
            && address
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !address.is_empty() && !host_name && !ipv6 {
            return Err(invalid(
                "address",
                format!("{address:?} is not a host name or IP address (without a port)"),
            ));
        }
        if !site.is_empty() && !valid_name(site) {
            return Err(invalid(
                "site",
                format!("{site:?} is not a valid site name (lowercase letters, digits, - and _)"),
            ));
        }
        // An agent's identity is a UUID; anything long would only weigh on
        // every replica.
        if session.is_empty() || session.len() > 128 {
            return Err(invalid("session", "must be 1 to 128 bytes"));
        }
        if gpus.len() > MAX_GPUS_PER_NODE {
            return Err(invalid(
                "gpus",
                format!(
                    "{} GPUs; a node offers at most {MAX_GPUS_PER_NODE}",
                    gpus.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for g in gpus {
            check_gpu(g)?;
            if g.uuid.is_empty() || !seen.insert(g.uuid.as_str()) {
                return Err(invalid(
                    "gpus",
                    format!("GPU uuid {:?} is empty or repeated", g.uuid),
                ));
            }
            if let Some(other) = self
                .nodes
                .values()
                .find(|n| n.name != name && n.gpus.iter().any(|o| o.uuid == g.uuid))
            {
                return Err(invalid(
                    "gpus",
                    format!(
                        "GPU {} is already registered by node {}",
                        g.uuid, other.name
                    ),
                ));
            }
        }
        // The inventory is fixed at the first registration after enrollment:
        // an owner cannot grow its contributed capacity or change what its
        // GPUs are without enrolling the machine again.
        let inventory: Vec<GpuInfo> = match self.inventory.get(name) {
            None => gpus.to_vec(),
            Some(enrolled) => {
                let mut kept = enrolled.clone();
                for g in gpus {
                    let Some(e) = kept.iter_mut().find(|e| e.uuid == g.uuid) else {
                        return Err(Rejection::FailedPrecondition(format!(
                            "gpus: GPU {} is not one node {name} was enrolled with; enroll the node again (coop node revoke {name}; coop node enroll {name}) to change its GPUs",
                            g.uuid
                        )));
                    };
                    if e.model != g.model || e.memory_mb != g.memory_mb {
                        return Err(Rejection::FailedPrecondition(format!(
                            "gpus: GPU {} was enrolled as {} with {} MB, not {} with {} MB; enroll node {name} again to change it",
                            g.uuid, e.model, e.memory_mb, g.model, g.memory_mb
                        )));
                    }
                    // The first measurement and power limit stand until the node
                    // enrolls again: an owner cannot raise what its GPUs may bill.
                    if e.measured.is_none() {
                        e.measured = g.measured;
                    }
                    if e.power_limit_w == 0 {
                        e.power_limit_w = g.power_limit_w;
                    }
                }
                kept
            }
        };
        let enrolled = |uuid: &str| inventory.iter().find(|e| e.uuid == uuid);
        let measured = |uuid: &str| enrolled(uuid).and_then(|e| e.measured);
        let power_limit_w = |uuid: &str| enrolled(uuid).map_or(0, |e| e.power_limit_w);
        let mut events = vec![Event::Node(name.to_string())];
        if let Some(node) = self.nodes.get(name) {
            // Runs of an earlier agent process are no longer watched by anyone;
            // runs on GPUs that are gone cannot continue. Both go back to the queue.
            let new_session = node.session != session;
            let orphans: Vec<JobId> = node
                .gpus
                .iter()
                .filter(|g| new_session || !gpus.iter().any(|n| n.uuid == g.uuid))
                .filter_map(|g| g.job)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for job in orphans {
                self.end_run_lost(at, job, name, orphaned_end.min(at), "agent restarted");
                events.push(Event::Job(job));
            }
        }
        let held: BTreeMap<String, JobId> = self
            .nodes
            .get(name)
            .map(|n| {
                n.gpus
                    .iter()
                    .filter_map(|g| g.job.map(|j| (g.uuid.clone(), j)))
                    .collect()
            })
            .unwrap_or_default();
        let registered_at_ms = self.nodes.get(name).map_or(at, |n| n.registered_at_ms);
        // A node that stays up with the same owner and GPUs keeps offering
        // them since when it did; otherwise the offer so far is closed.
        let unchanged = self.nodes.get(name).is_some_and(|n| {
            n.up && n.owner == owner
                && n.gpus.len() == gpus.len()
                && n.gpus
                    .iter()
                    .zip(gpus)
                    .all(|(a, b)| a.uuid == b.uuid && a.model == b.model)
        });
        let up_since_ms = match self.nodes.get(name) {
            Some(n) if unchanged => n.up_since_ms,
            Some(n) => {
                let closed = n.offered_until(at);
                self.capacity.extend(closed);
                at
            }
            None => at,
        };
        let same_session = self.nodes.get(name).is_some_and(|n| n.session == session);
        let (last_seq, mut cut_off) = match self.nodes.get(name) {
            // The same agent: it still owes reports of the runs cut off.
            Some(n) if same_session => (n.last_seq, n.cut_off.clone()),
            _ => (0, vec![]),
        };
        // Back in touch, it is told those runs are not its own any more and
        // stops them at once: they bill no later.
        let deadline = at.saturating_add(super::plausible::CUT_OFF_STOP_MS);
        for c in &mut cut_off {
            c.deadline_ms.get_or_insert(deadline);
        }
        self.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                owner: owner.to_string(),
                gpus: gpus
                    .iter()
                    .map(|g| Gpu {
                        uuid: g.uuid.clone(),
                        index: g.index,
                        model: g.model.clone(),
                        memory_mb: g.memory_mb,
                        job: held.get(&g.uuid).copied(),
                        measured: measured(&g.uuid),
                        power_limit_w: power_limit_w(&g.uuid),
                    })
                    .collect(),
                up: true,
                session: session.to_string(),
                last_seq,
                cut_off,
                draining: false,
                cordon: self.nodes.get(name).and_then(|n| n.cordon.clone()),
                registered_at_ms,
                up_since_ms,
                address: address.to_string(),
                site: site.to_string(),
            },
        );
        self.inventory.insert(name.to_string(), inventory);
        self.remeasure_models();
        Ok(events)
    }

    pub(crate) fn node_down(
        &mut self,
        name: &str,
        last_seen: i64,
    ) -> Result<Vec<Event>, Rejection> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| Rejection::NotFound(format!("node {name:?} does not exist")))?;
        if !node.up {
            return Ok(vec![]);
        }
        // It offered its GPUs until it was last heard from.
        let closed = node.offered_until(last_seen.max(node.up_since_ms));
        node.up = false;
        self.capacity.extend(closed);
        let node = self.nodes.get_mut(name).expect("checked above");
        let jobs: BTreeSet<JobId> = node.gpus.iter().filter_map(|g| g.job).collect();
        let mut events = vec![Event::Node(name.to_string())];
        for job in jobs {
            let cut = self.jobs.get(&job).and_then(|j| {
                let run = j.run_on(name)?;
                let started = run.started_at_ms?;
                let (model, weight_milli) = self.weight_of(name, run.gpus);
                Some(CutOff {
                    job,
                    attempt: j.attempts,
                    billed_to_ms: last_seen.max(run.billed_to_ms),
                    gpus: run.gpus.len() as u32,
                    model,
                    weight_milli,
                    power_w: self.power_w(name, run.gpus),
                    started_at_ms: started.max(1),
                    energy_mj: run.energy_mj,
                    deadline_ms: None,
                })
            });
            self.end_run_lost(last_seen, job, name, last_seen, "node down");
            if let Some(cut) = cut {
                self.nodes
                    .get_mut(name)
                    .expect("checked above")
                    .cut_off
                    .push(cut);
            }
            events.push(Event::Job(job));
        }
        Ok(events)
    }

    /// Recomputes each model's mean probed throughput from the registered GPUs.
    pub(super) fn remeasure_models(&mut self) {
        let mut sums: BTreeMap<String, (Capacity, u64)> = BTreeMap::new();
        for g in self.nodes.values().flat_map(|n| &n.gpus) {
            let Some(m) = g.measured else { continue };
            let (s, n) = sums.entry(g.model.clone()).or_insert((
                Capacity {
                    fp16_gflops: 0,
                    bf16_gflops: 0,
                    memory_mb_per_s: 0,
                },
                0,
            ));
            s.fp16_gflops = s.fp16_gflops.saturating_add(m.fp16_gflops);
            s.bf16_gflops = s.bf16_gflops.saturating_add(m.bf16_gflops);
            s.memory_mb_per_s = s.memory_mb_per_s.saturating_add(m.memory_mb_per_s);
            *n += 1;
        }
        self.measured_models = sums
            .into_iter()
            .map(|(model, (s, n))| {
                let mean = Capacity {
                    fp16_gflops: s.fp16_gflops / n,
                    bf16_gflops: s.bf16_gflops / n,
                    memory_mb_per_s: s.memory_mb_per_s / n,
                };
                (model, mean)
            })
            .collect();
    }
}
