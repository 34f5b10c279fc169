//! Multi-node runs ("gangs"): how a job splits over nodes, its placement all
//! at once, its parts' reports and billing, and one fate for all parts.
//!
//! A job whose GPUs do not fit on one node (or that asks for `nodes` or
//! `gpus_per_node`) runs as one process per node, all placed by one
//! `PlaceGang` command. Each part is billed on its own, from its own agent's
//! reports, exactly as a one-node run is. When a part fails or is lost the
//! others are stopped (`Stop::PartEnded`); when the last part has ended the
//! job ends once, as a one-node run would with the first failing part's exit
//! code (or as a lost run, if a part was lost).

use std::collections::BTreeSet;

use super::validation::MAX_NODES_PER_JOB;
use super::{
    Event, Gang, Job, JobId, JobSpec, JobState, Part, PartEnd, Rejection, RunReport, State, Stop,
    UsageRecord,
    billing::{ms_between, weighted_ms},
    invalid, largest_class,
};
use crate::policy::GangNodes;

/// Lowest port that rendezvous are placed on (torchrun's default).
pub const FIRST_RENDEZVOUS_PORT: u16 = 29500;

/// How `spec` splits over nodes, as (nodes, GPUs on each), given how many
/// GPUs of one kind that fit it each node offers, by the groups of nodes a
/// job's parts may share (`groups`; see `GangNodes`): what it asks for, else
/// one node if one is large enough, else the fewest nodes with equal parts
/// that enough nodes of one group can hold (or, if none can, the fewest
/// nodes at all: it then waits, or is refused at submission). `None`: it
/// cannot be split so.
pub fn shape(spec: &JobSpec, groups: &[Vec<usize>]) -> Option<(u32, u32)> {
    if let Some(n) = spec.gpus.checked_div(spec.gpus_per_node) {
        return Some((n, spec.gpus_per_node));
    }
    if spec.nodes > 0 {
        return Some((spec.nodes, spec.gpus / spec.nodes));
    }
    let g = spec.gpus as usize;
    let largest = groups.iter().flatten().copied().max().unwrap_or(0);
    if largest == 0 {
        return None;
    }
    if g <= largest {
        return Some((1, spec.gpus));
    }
    let splits = || {
        (g.div_ceil(largest)..=MAX_NODES_PER_JOB.min(g))
            .filter(move |n| g.is_multiple_of(*n) && g / n <= largest)
    };
    splits()
        .find(|n| big_enough(groups, g / n) >= *n)
        .or_else(|| splits().next())
        .map(|n| (n as u32, (g / n) as u32))
}

/// The most nodes of one group that offer `per` GPUs.
fn big_enough(groups: &[Vec<usize>], per: usize) -> usize {
    groups
        .iter()
        .map(|sizes| sizes.iter().filter(|s| **s >= per).count())
        .max()
        .unwrap_or(0)
}

/// What a node's agent has of a run: the one-node run, or its part of a
/// multi-node one.
#[derive(Debug, Clone, Copy)]
pub struct RunView<'a> {
    pub started_at_ms: Option<i64>,
    pub billed_to_ms: i64,
    pub energy_mj: u64,
    pub gpus: &'a [String],
    pub placed_at_ms: i64,
}

impl Job {
    /// The part of the current run on `node` that has not ended, if any.
    pub fn run_on(&self, node: &str) -> Option<RunView<'_>> {
        if self.state != JobState::Running {
            return None;
        }
        match &self.gang {
            None => (self.node.as_deref() == Some(node)).then_some(RunView {
                started_at_ms: self.started_at_ms,
                billed_to_ms: self.billed_to_ms,
                energy_mj: self.run_energy_mj,
                gpus: &self.gpus,
                placed_at_ms: self.placed_at_ms,
            }),
            Some(g) => g
                .parts
                .iter()
                .find(|p| p.node == node && p.end.is_none())
                .map(|p| RunView {
                    started_at_ms: p.started_at_ms,
                    billed_to_ms: p.billed_to_ms,
                    energy_mj: p.energy_mj,
                    gpus: &p.gpus,
                    placed_at_ms: self.placed_at_ms,
                }),
        }
    }

    /// The GPUs a running job holds now: all of a one-node run's; of a
    /// multi-node run, its running parts' (`gpus` lists every part's, and
    /// the GPUs of a part that ended may already run another job).
    pub fn held_gpus(&self) -> Vec<&String> {
        if self.state != JobState::Running {
            return vec![];
        }
        match &self.gang {
            None => self.gpus.iter().collect(),
            Some(g) => g
                .parts
                .iter()
                .filter(|p| p.end.is_none())
                .flat_map(|p| &p.gpus)
                .collect(),
        }
    }

    /// Every node the current (or last) run is on, rank 0 first.
    pub fn run_nodes(&self) -> Vec<&str> {
        match &self.gang {
            Some(g) => g.parts.iter().map(|p| p.node.as_str()).collect(),
            None => self.node.as_deref().into_iter().collect(),
        }
    }
}

impl State {
    /// How many GPUs of one kind fitting `spec` each node offers, of the
    /// nodes new runs may be placed on (`usable`) or of all registered ones,
    /// by the groups the policy lets a job's parts share (`gang_nodes`).
    pub fn node_sizes(&self, spec: &JobSpec, usable: bool) -> Vec<Vec<usize>> {
        let rule = self.policy.gang_nodes;
        let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for n in self
            .nodes
            .values()
            .filter(|n| !usable || (n.up && !n.draining && n.cordon.is_none()))
        {
            groups
                .entry(n.group(rule))
                .or_default()
                .push(largest_class(n, spec));
        }
        groups.into_values().collect()
    }

    /// How `spec` splits over the nodes runs may be placed on now (see
    /// [`shape`]): what `place` and `place_gang` hold placements to.
    pub fn shape_of(&self, spec: &JobSpec) -> Option<(u32, u32)> {
        if spec.nodes > 0 || spec.gpus_per_node > 0 {
            return shape(spec, &[]); // as asked: no node needs a look
        }
        shape(spec, &self.node_sizes(spec, true))
    }

    /// Refuses a job that no set of registered nodes could ever run.
    pub(super) fn check_shape(&self, spec: &JobSpec) -> Result<(), Rejection> {
        // A job that asks for no split and fits one registered node: the
        // common case needs no count of every node's GPUs.
        let unsplit = spec.nodes == 0 && spec.gpus_per_node == 0;
        if unsplit
            && self
                .nodes
                .values()
                .any(|n| largest_class(n, spec) >= spec.gpus as usize)
        {
            return Ok(());
        }
        let groups = self.node_sizes(spec, false);
        let largest = groups.iter().flatten().copied().max().unwrap_or(0);
        let what = match &spec.gpu_model {
            Some(m) => format!(" {m}"),
            None => String::new(),
        };
        let Some((n, per)) = shape(spec, &groups) else {
            return Err(Rejection::FailedPrecondition(if largest == 0 {
                format!(
                    "gpus: the job asks for {} GPUs but no registered node has matching{what} GPUs",
                    spec.gpus
                )
            } else {
                format!(
                    "gpus: the job asks for {} GPUs, which do not split into equal parts of at most {largest} matching{what} GPUs over at most {MAX_NODES_PER_JOB} nodes",
                    spec.gpus
                )
            }));
        };
        let big = big_enough(&groups, per as usize);
        if big < n as usize {
            let within = match self.policy.gang_nodes {
                GangNodes::Any => "",
                GangNodes::Site => " in one site (policy gang_nodes=site)",
                GangNodes::Owner => " of one owner (policy gang_nodes=owner)",
            };
            return Err(Rejection::FailedPrecondition(if n == 1 {
                format!(
                    "gpus: the job asks for {} GPUs but the largest registered node has {largest} matching{what} GPUs",
                    spec.gpus
                )
            } else {
                format!(
                    "gpus: the job asks for {} GPUs as {n} nodes of {per}, but {big} registered {} {per} matching{what} GPUs{within}",
                    spec.gpus,
                    if big == 1 { "node has" } else { "nodes have" }
                )
            }));
        }
        Ok(())
    }

    pub(super) fn place_gang(
        &mut self,
        at: i64,
        id: JobId,
        parts: &[(String, Vec<String>)],
        port: u16,
    ) -> Result<Vec<Event>, Rejection> {
        self.check_placeable(at, id)?;
        let job = self.job(id)?;
        let (n, per) = self.shape_of(&job.spec).unwrap_or((0, 0));
        if n < 2 || parts.len() != n as usize {
            return Err(invalid(
                "parts",
                format!(
                    "placement gives {} nodes to a job of {n} nodes of {per} GPUs",
                    parts.len()
                ),
            ));
        }
        if port < 1024 {
            return Err(invalid("port", "must be from 1024 to 65535"));
        }
        let mut nodes = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut model: Option<&str> = None;
        for (name, gpus) in parts {
            if !nodes.insert(name.as_str()) {
                return Err(invalid("parts", format!("node {name} is given twice")));
            }
            if gpus.len() != per as usize {
                return Err(invalid(
                    "parts",
                    format!(
                        "node {name} is given {} GPUs; each part has {per}",
                        gpus.len()
                    ),
                ));
            }
            let node = self.usable_node(name)?;
            for uuid in gpus {
                if !seen.insert(uuid.as_str()) {
                    return Err(invalid("gpus", format!("GPU {uuid} is given twice")));
                }
                let gpu = super::jobs::free_gpu(node, uuid, &job.spec)?;
                match model {
                    None => model = Some(&gpu.model),
                    Some(m) if m != gpu.model => {
                        return Err(invalid(
                            "gpus",
                            format!(
                                "a job's parts run on one GPU model, not {m} and {}",
                                gpu.model
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        let rule = self.policy.gang_nodes;
        let group = |name: &str| self.nodes.get(name).map(|n| n.group(rule));
        if parts
            .iter()
            .any(|(name, _)| group(name) != group(&parts[0].0))
        {
            return Err(invalid(
                "parts",
                format!(
                    "the policy (gang_nodes={}) places a job's parts on nodes of one {}",
                    rule.as_str(),
                    rule.as_str()
                ),
            ));
        }
        let master = &parts[0].0;
        let host = self.rendezvous_host(master);
        if let Some(other) = self.running.iter().find(|o| {
            self.jobs[*o]
                .gang
                .as_ref()
                .is_some_and(|g| g.port == port && self.rendezvous_host(&g.parts[0].node) == host)
        }) {
            return Err(Rejection::FailedPrecondition(format!(
                "port {port} on {host} is the rendezvous of job {other}"
            )));
        }
        let mut events = vec![Event::Job(id)];
        for (name, gpus) in parts {
            let node = self.nodes.get_mut(name).expect("checked above");
            for g in node.gpus.iter_mut().filter(|g| gpus.contains(&g.uuid)) {
                g.job = Some(id);
            }
            events.push(Event::Node(name.clone()));
        }
        let all: Vec<String> = parts.iter().flat_map(|(_, g)| g.iter().cloned()).collect();
        self.start_run(at, id, master, &all);
        let job = self.jobs.get_mut(&id).expect("checked above");
        job.gang = Some(Box::new(Gang {
            port,
            parts: parts
                .iter()
                .map(|(node, gpus)| Part {
                    node: node.clone(),
                    gpus: gpus.clone(),
                    started_at_ms: None,
                    billed_to_ms: 0,
                    energy_mj: 0,
                    utilization: (0, 0),
                    end: None,
                })
                .collect(),
            first_broken: None,
        }));
        Ok(events)
    }

    /// Where rank 0 on `node` is reached: its address, else its name. Nodes
    /// on one host (several agents on one machine) share its ports.
    pub fn rendezvous_host<'a>(&'a self, node: &'a str) -> &'a str {
        match self.nodes.get(node) {
            Some(n) if !n.address.is_empty() => &n.address,
            _ => node,
        }
    }

    /// The rendezvous port for a gang whose rank 0 is on `node`: the lowest
    /// from [`FIRST_RENDEZVOUS_PORT`] that no running gang led from the same
    /// host uses and that `also_taken` does not refuse.
    pub fn free_rendezvous_port(&self, node: &str, also_taken: impl Fn(u16) -> bool) -> u16 {
        let host = self.rendezvous_host(node);
        let used: BTreeSet<u16> = self
            .running
            .iter()
            .filter_map(|id| self.jobs[id].gang.as_ref())
            .filter(|g| self.rendezvous_host(&g.parts[0].node) == host)
            .map(|g| g.port)
            .collect();
        (FIRST_RENDEZVOUS_PORT..=u16::MAX)
            .find(|p| !used.contains(p) && !also_taken(*p))
            .unwrap_or(FIRST_RENDEZVOUS_PORT)
    }

    /// A report about a part of a running multi-node run (the caller found
    /// that `job` is one). Reports of parts that are not current are
    /// acknowledged and ignored, as for one-node runs.
    pub(super) fn part_report(
        &mut self,
        at: i64,
        node: &str,
        report: &RunReport,
        plausible: bool,
    ) -> Result<Vec<Event>, Rejection> {
        let (id, attempt) = report.run();
        let rank = self
            .jobs
            .get(&id)
            .filter(|j| j.state == JobState::Running && j.attempts == attempt)
            .and_then(|j| j.gang.as_ref())
            .and_then(|g| {
                g.parts
                    .iter()
                    .position(|p| p.node == node && p.end.is_none())
            });
        let Some(rank) = rank else {
            return Ok(vec![]);
        };
        match report {
            RunReport::Started { at_ms, .. } => {
                if !plausible {
                    return Ok(vec![]);
                }
                let j = self.jobs.get_mut(&id).expect("checked");
                let start = (*at_ms).clamp(j.placed_at_ms.min(at), at);
                let g = j.gang.as_mut().expect("checked");
                g.parts[rank].started_at_ms = Some(start);
                g.parts[rank].billed_to_ms = start;
                j.started_at_ms = Some(j.started_at_ms.map_or(start, |s| s.min(start)));
                sync_billed_to(j);
                Ok(vec![Event::Job(id)])
            }
            RunReport::Usage {
                to_ms, energy_mj, ..
            } => {
                if plausible {
                    self.bill_part(id, rank, (*to_ms).min(at), *energy_mj);
                }
                Ok(vec![])
            }
            RunReport::Utilization {
                sum_pct, samples, ..
            } => {
                if plausible {
                    let j = self.jobs.get_mut(&id).expect("checked");
                    let g = j.gang.as_mut().expect("checked");
                    g.parts[rank].utilization = (*sum_pct, *samples);
                    j.run_utilization = g.parts.iter().fold((0u64, 0u64), |(s, n), p| {
                        (
                            s.saturating_add(p.utilization.0),
                            n.saturating_add(p.utilization.1),
                        )
                    });
                }
                Ok(vec![])
            }
            RunReport::Lost {
                at_ms,
                reason,
                energy_mj,
                ..
            } => {
                let (end, energy) = self.part_end(id, rank, at, *at_ms, *energy_mj, plausible);
                let reason = super::plausible::bounded_reason(reason);
                self.end_part(at, id, rank, end, energy, None, reason);
                Ok(vec![Event::Job(id), Event::Node(node.to_string())])
            }
            RunReport::Exited {
                at_ms,
                exit_code,
                reason,
                energy_mj,
                ..
            } => {
                let (end, energy) = self.part_end(id, rank, at, *at_ms, *energy_mj, plausible);
                let reason = super::plausible::bounded_reason(reason);
                self.end_part(at, id, rank, end, energy, Some(*exit_code), reason);
                Ok(vec![Event::Job(id), Event::Node(node.to_string())])
            }
        }
    }

    /// Where a part that a report ends is closed, and with what energy (as
    /// `run_end` for one-node runs).
    fn part_end(
        &self,
        id: JobId,
        rank: usize,
        at: i64,
        at_ms: i64,
        energy_mj: u64,
        plausible: bool,
    ) -> (i64, u64) {
        let j = &self.jobs[&id];
        let p = &j.gang.as_ref().expect("a gang").parts[rank];
        let floor = match p.started_at_ms {
            Some(_) => p.billed_to_ms,
            None => j.placed_at_ms.min(at),
        };
        if plausible {
            (at_ms.min(at).max(floor), energy_mj)
        } else {
            (floor, 0)
        }
    }

    /// Bills part `rank` of the current run of `id` up to `to_ms`: a usage
    /// record of its node and GPUs.
    pub(super) fn bill_part(&mut self, id: JobId, rank: usize, to_ms: i64, energy_mj: u64) {
        let Some(j) = self.jobs.get(&id) else { return };
        let Some(p) = j.gang.as_ref().map(|g| &g.parts[rank]) else {
            return;
        };
        if p.started_at_ms.is_none() {
            return;
        }
        let from = p.billed_to_ms;
        let to = to_ms.max(from);
        let (model, weight_milli) = self.weight_of(&p.node, &p.gpus);
        let gpu_ms = ms_between(from, to).saturating_mul(p.gpus.len() as u64);
        let record = UsageRecord {
            job: id,
            attempt: j.attempts,
            member: j.member.clone(),
            node: p.node.clone(),
            model,
            gpus: p.gpus.len() as u32,
            start_ms: from,
            end_ms: to,
            gpu_ms,
            weighted_gpu_ms: weighted_ms(gpu_ms, weight_milli),
            energy_mj,
        };
        let j = self.jobs.get_mut(&id).expect("checked");
        j.run_energy_mj = j.run_energy_mj.saturating_add(energy_mj);
        let p = &mut j.gang.as_mut().expect("checked").parts[rank];
        p.billed_to_ms = to;
        p.energy_mj = p.energy_mj.saturating_add(energy_mj);
        sync_billed_to(j);
        if gpu_ms > 0 || energy_mj > 0 {
            self.add_usage(record);
        }
    }

    /// Part `rank` has ended at `end_ms` (exited with `exit_code`, or lost):
    /// billed to there, its GPUs freed. A failed or lost part stops the
    /// others; the last one to end decides the job's fate.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_part(
        &mut self,
        at: i64,
        id: JobId,
        rank: usize,
        end_ms: i64,
        energy_mj: u64,
        exit_code: Option<i32>,
        reason: String,
    ) {
        self.bill_part(id, rank, end_ms, energy_mj);
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        let g = j.gang.as_mut().expect("a gang");
        let p = &mut g.parts[rank];
        p.end = Some(PartEnd {
            at_ms: end_ms,
            exit_code,
            reason,
        });
        let node = p.node.clone();
        // A service is whole or not at all: any part ending restarts it all.
        let service = j.spec.kind == crate::model::JobKind::Inference;
        if g.first_broken.is_none() && (exit_code != Some(0) || service) {
            g.first_broken = Some(rank as u32);
        }
        let (done, broken) = (g.all_ended(), g.broken());
        if broken && !done {
            j.request_stop(Stop::PartEnded);
        }
        if let Some(n) = self.nodes.get_mut(&node) {
            for gpu in n.gpus.iter_mut().filter(|gpu| gpu.job == Some(id)) {
                gpu.job = None;
            }
        }
        if done {
            self.end_gang(at, id);
        }
    }

    /// Every part has ended: the job ends once, as a one-node run that
    /// exited with the code of the part that failed first (or was lost) would.
    fn end_gang(&mut self, at: i64, id: JobId) {
        self.running.remove(&id);
        let j = self.jobs.get_mut(&id).expect("a gang");
        let (sum, n) = std::mem::take(&mut j.run_utilization);
        j.utilization = (
            j.utilization.0.saturating_add(sum),
            j.utilization.1.saturating_add(n),
        );
        let g = j.gang.as_ref().expect("a gang");
        let end = g
            .parts
            .iter()
            .filter_map(|p| p.end.as_ref())
            .map(|e| e.at_ms)
            .max()
            .unwrap_or(at);
        // The part that broke first stopped the others: its end is the job's.
        let first = g.first_broken.and_then(|r| {
            let p = g.parts.get(r as usize)?;
            Some((r, p, p.end.as_ref()?))
        });
        let (code, reason) = match first {
            Some((r, p, e)) => match e.exit_code {
                None => {
                    let why = format!("rank {r} on {}: {}", p.node, e.reason);
                    self.after_lost_run(id, end, &why);
                    return;
                }
                Some(code) => {
                    let why = if e.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", e.reason)
                    };
                    (
                        code,
                        format!("rank {r} on {} exited with {code}{why}", p.node),
                    )
                }
            },
            None => {
                let r0 = g.parts[0].end.as_ref().map(|e| e.reason.clone());
                (0, r0.unwrap_or_default())
            }
        };
        self.after_exit(id, at, end, code, reason);
    }

    /// A part's run was lost with its node or agent (`node_down`, a new
    /// agent session): as a lost one-node run.
    pub(super) fn lose_part(&mut self, at: i64, id: JobId, node: &str, end_ms: i64, why: &str) {
        let rank = self.jobs.get(&id).and_then(|j| {
            j.gang
                .as_ref()?
                .parts
                .iter()
                .position(|p| p.node == node && p.end.is_none())
        });
        if let Some(rank) = rank {
            self.end_part(at, id, rank, end_ms, 0, None, why.to_string());
        }
    }
}

/// A gang's `billed_to_ms` is the least any started part is billed to: what
/// the live figures count as unbilled.
fn sync_billed_to(j: &mut Job) {
    if let Some(g) = &j.gang
        && let Some(min) = g
            .parts
            .iter()
            .filter(|p| p.started_at_ms.is_some() && p.end.is_none())
            .map(|p| p.billed_to_ms)
            .min()
    {
        j.billed_to_ms = min.max(j.started_at_ms.unwrap_or(min));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(gpus: u32, nodes: u32, per: u32) -> JobSpec {
        JobSpec {
            kind: crate::model::JobKind::Finetune,
            gpus,
            command: vec!["x".into()],
            gpu_model: None,
            min_gpu_memory_mb: 0,
            preemptible: false,
            kill_grace_ms: 0,
            priority: 0,
            time_limit_ms: 0,
            isolation: Default::default(),
            env: Default::default(),
            nodes,
            gpus_per_node: per,
        }
    }

    #[test]
    fn a_job_spans_the_fewest_nodes_with_equal_parts() {
        let eights = [vec![8; 8]];
        assert_eq!(shape(&spec(4, 0, 0), &eights), Some((1, 4)));
        assert_eq!(shape(&spec(8, 0, 0), &eights), Some((1, 8)));
        assert_eq!(shape(&spec(16, 0, 0), &eights), Some((2, 8)));
        assert_eq!(shape(&spec(12, 0, 0), &eights), Some((2, 6)));
        // 9 does not split in two: three nodes of three.
        assert_eq!(shape(&spec(9, 0, 0), &eights), Some((3, 3)));
        assert_eq!(shape(&spec(24, 0, 0), &eights), Some((3, 8)));
        assert_eq!(shape(&spec(4, 0, 0), &[]), None);
        assert_eq!(shape(&spec(4, 0, 0), &[vec![0, 0]]), None);
        // A prime beyond the largest node needs as many nodes as GPUs: more
        // than a job may span.
        assert_eq!(shape(&spec(67, 0, 0), &eights), None);
    }

    #[test]
    fn the_split_is_one_that_enough_nodes_can_hold() {
        // One node of 8 among nodes of 4: 12 GPUs as three parts of 4, not
        // two of 6 (only one node has 6).
        assert_eq!(shape(&spec(12, 0, 0), &[vec![8, 4, 4, 4]]), Some((3, 4)));
        assert_eq!(shape(&spec(16, 0, 0), &[vec![8, 4, 4, 4]]), Some((4, 4)));
        assert_eq!(shape(&spec(16, 0, 0), &[vec![8, 8, 4]]), Some((2, 8)));
        // No split that the nodes hold: the fewest nodes (it waits, or is
        // refused at submission, naming that split).
        assert_eq!(shape(&spec(16, 0, 0), &[vec![8, 4]]), Some((2, 8)));
    }

    #[test]
    fn the_split_is_one_that_one_group_of_nodes_can_hold() {
        // Two sites of two 4-GPU nodes: no split of 12 GPUs fits one site,
        // so the fewest nodes overall (it waits, or is refused at submission).
        let sites = [vec![4, 4], vec![4, 4]];
        assert_eq!(shape(&spec(12, 0, 0), &sites), Some((3, 4)));
        assert_eq!(shape(&spec(8, 0, 0), &sites), Some((2, 4)));
        assert_eq!(big_enough(&sites, 4), 2);
        assert_eq!(big_enough(&[vec![4, 4, 4]], 4), 3);
    }

    #[test]
    fn what_a_job_asks_for_stands() {
        assert_eq!(shape(&spec(16, 0, 4), &[vec![8]]), Some((4, 4)));
        assert_eq!(shape(&spec(16, 2, 0), &[vec![16]]), Some((2, 8)));
        assert_eq!(shape(&spec(8, 1, 0), &[vec![8]]), Some((1, 8)));
        assert_eq!(shape(&spec(16, 2, 8), &[vec![8]]), Some((2, 8)));
    }
}
