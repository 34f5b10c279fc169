//! The co-op's scheduling policy: shares, weights, decay and preemption rules.
//!
//! Part of the replicated state, so it holds integers only (thousandths,
//! percents, seconds): every replica must read the same policy bit for bit.
//! Only the operator changes it, with a reason, and every change is kept.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// How pending jobs are ordered before placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Arrival order (with backfill).
    Fifo,
    /// Slurm's classic factor 2^(-U/S): decayed usage U against entitlement S.
    #[default]
    Fairshare,
    /// Dominant resource fairness on GPUs held now, relative to entitlement.
    Drf,
}

/// Which nodes the parts of one multi-node job may share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GangNodes {
    /// Any nodes of one GPU model, one site's where one site has room.
    #[default]
    Any,
    /// Nodes of one site only (`coop agent run --site`).
    Site,
    /// Nodes of one owner only.
    Owner,
}

impl GangNodes {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "any" => Some(Self::Any),
            "site" => Some(Self::Site),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Site => "site",
            Self::Owner => "owner",
        }
    }
}

fn is_any(g: &GangNodes) -> bool {
    *g == GangNodes::Any
}

impl Ordering {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fifo" => Some(Self::Fifo),
            "fairshare" => Some(Self::Fairshare),
            "drf" => Some(Self::Drf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fifo => "fifo",
            Self::Fairshare => "fairshare",
            Self::Drf => "drf",
        }
    }
}

pub const DEFAULT_HALF_LIFE_S: u64 = 7 * 24 * 3600;
/// The weight of a GPU model the policy does not name: one unit per GPU-hour.
pub const UNIT_WEIGHT_MILLI: u64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub ordering: Ordering,
    /// Voted shares; a member not listed holds `default_share`.
    pub shares: BTreeMap<String, u64>,
    pub default_share: u64,
    /// Percent of the entitlement that follows contributed GPU capacity; the
    /// rest follows voted shares.
    pub capacity_blend_pct: u32,
    /// Normalised units per GPU-hour, in thousandths, by GPU model.
    pub model_weights_milli: BTreeMap<String, u64>,
    pub half_life_s: u64,
    pub preemption: bool,
    /// Services are never preempted unless this is set.
    pub preempt_inference: bool,
    /// A run younger than this is not preempted.
    pub min_runtime_s: u64,
    /// SIGTERM-to-SIGKILL grace of a preempted run, for its checkpoint.
    pub preempt_grace_s: u64,
    /// Member approvals a policy change needs (0: the operator sets it directly).
    #[serde(default)]
    pub approvals_required: u32,
    /// How long a proposed change waits for its approvals.
    #[serde(default = "default_proposal_ttl")]
    pub proposal_ttl_s: u64,
    /// fp16 TFLOPS worth one unit per GPU-hour: a model without a declared
    /// weight is weighted by its GPUs' probed throughput (0 = off: one unit).
    #[serde(default)]
    pub weight_reference_tflops: u64,
    /// Longest SIGTERM-to-SIGKILL grace a job may ask for.
    #[serde(default = "default_max_grace")]
    pub max_grace_s: u64,
    /// Pending jobs a member may have at once (0 = no limit).
    #[serde(default = "default_max_pending")]
    pub max_pending_jobs: u64,
    /// GPUs a member may hold at once (0 = no quota), and per member.
    #[serde(default)]
    pub gpu_quota: u64,
    #[serde(default)]
    pub gpu_quotas: BTreeMap<String, u64>,
    /// Submissions per second a member may make, on each scheduler, with
    /// bursts of ten times as many (0 = no limit).
    #[serde(default = "default_submit_rate")]
    pub submit_rate: u64,
    /// How long a finished job stays in the replicated state's memory; after
    /// that it is read from each replica's store.
    pub job_retention_s: u64,
    /// Which nodes a multi-node job's parts may share.
    #[serde(default, skip_serializing_if = "is_any")]
    pub gang_nodes: GangNodes,
}

fn default_max_grace() -> u64 {
    DEFAULT_MAX_GRACE_S
}

fn default_max_pending() -> u64 {
    DEFAULT_MAX_PENDING_JOBS
}

fn default_submit_rate() -> u64 {
    DEFAULT_SUBMIT_RATE
}

pub const DEFAULT_MAX_GRACE_S: u64 = 600;
pub const DEFAULT_MAX_PENDING_JOBS: u64 = 10_000;
pub const DEFAULT_SUBMIT_RATE: u64 = 50;

fn default_proposal_ttl() -> u64 {
    DEFAULT_PROPOSAL_TTL_S
}

pub const DEFAULT_PROPOSAL_TTL_S: u64 = 7 * 24 * 3600;
pub const DEFAULT_JOB_RETENTION_S: u64 = 7 * 24 * 3600;
/// A year: finished jobs kept longer would be a history held in memory again.
pub const MAX_JOB_RETENTION_S: u64 = 365 * 24 * 3600;

impl Default for Policy {
    fn default() -> Self {
        Self {
            ordering: Ordering::Fairshare,
            shares: BTreeMap::new(),
            default_share: 1,
            capacity_blend_pct: 0,
            model_weights_milli: BTreeMap::new(),
            half_life_s: DEFAULT_HALF_LIFE_S,
            preemption: true,
            preempt_inference: false,
            min_runtime_s: 300,
            preempt_grace_s: 30,
            approvals_required: 0,
            proposal_ttl_s: DEFAULT_PROPOSAL_TTL_S,
            weight_reference_tflops: 0,
            max_grace_s: DEFAULT_MAX_GRACE_S,
            max_pending_jobs: DEFAULT_MAX_PENDING_JOBS,
            gpu_quota: 0,
            gpu_quotas: BTreeMap::new(),
            job_retention_s: DEFAULT_JOB_RETENTION_S,
            submit_rate: DEFAULT_SUBMIT_RATE,
            gang_nodes: GangNodes::Any,
        }
    }
}

impl Policy {
    pub fn share(&self, member: &str) -> u64 {
        self.shares
            .get(member)
            .copied()
            .unwrap_or(self.default_share)
    }

    /// GPUs `member` may hold at once, if it has a quota.
    pub fn gpu_quota(&self, member: &str) -> Option<u64> {
        let q = self
            .gpu_quotas
            .get(member)
            .copied()
            .unwrap_or(self.gpu_quota);
        (q > 0).then_some(q)
    }

    /// Thousandths of a normalised unit per GPU-hour for `model` (case-insensitive),
    /// as declared; see `State::weight_milli` for measured weights.
    pub fn weight_milli(&self, model: &str) -> u64 {
        self.declared_weight_milli(model)
            .unwrap_or(UNIT_WEIGHT_MILLI)
    }

    pub fn declared_weight_milli(&self, model: &str) -> Option<u64> {
        self.model_weights_milli
            .iter()
            .find(|(m, _)| m.eq_ignore_ascii_case(model))
            .map(|(_, w)| *w)
    }

    /// The weight of a model measured at `fp16_gflops` by the agents' probe,
    /// when the policy weighs by measurement.
    pub fn measured_weight_milli(&self, fp16_gflops: u64) -> Option<u64> {
        (self.weight_reference_tflops > 0 && fp16_gflops > 0).then(|| {
            // units = TFLOPS / reference; thousandths = GFLOPS / reference.
            (fp16_gflops / self.weight_reference_tflops).clamp(1, MAX_WEIGHT_MILLI)
        })
    }

    /// Applies one setting; the caller checks members exist.
    pub fn set(&mut self, s: &Setting) {
        match s {
            Setting::Ordering(o) => self.ordering = *o,
            Setting::Share { member, shares } => {
                self.shares.insert(member.clone(), *shares);
            }
            Setting::DefaultShare(n) => self.default_share = *n,
            Setting::CapacityBlendPct(p) => self.capacity_blend_pct = *p,
            Setting::ModelWeightMilli { model, milli } => {
                self.model_weights_milli.insert(model.clone(), *milli);
            }
            Setting::HalfLifeS(s) => self.half_life_s = *s,
            Setting::Preemption(b) => self.preemption = *b,
            Setting::PreemptInference(b) => self.preempt_inference = *b,
            Setting::MinRuntimeS(s) => self.min_runtime_s = *s,
            Setting::PreemptGraceS(s) => self.preempt_grace_s = *s,
            Setting::Approvals(k) => self.approvals_required = *k,
            Setting::ProposalTtlS(s) => self.proposal_ttl_s = *s,
            Setting::WeightReferenceTflops(t) => self.weight_reference_tflops = *t,
            Setting::MaxGraceS(s) => self.max_grace_s = *s,
            Setting::MaxPendingJobs(n) => self.max_pending_jobs = *n,
            Setting::GpuQuota(n) => self.gpu_quota = *n,
            Setting::MemberGpuQuota { member, gpus } => {
                self.gpu_quotas.insert(member.clone(), *gpus);
            }
            Setting::SubmitRate(n) => self.submit_rate = *n,
            Setting::JobRetentionS(s) => self.job_retention_s = *s,
            Setting::GangNodes(g) => self.gang_nodes = *g,
            // Membership is the state's to change, not the policy's.
            Setting::AddMember { .. } | Setting::RemoveMember(_) => {}
        }
    }

    /// Every setting as `key=value`, the form `coop policy set` takes.
    pub fn settings(&self) -> Vec<Setting> {
        let mut out = vec![
            Setting::Ordering(self.ordering),
            Setting::DefaultShare(self.default_share),
        ];
        out.extend(self.shares.iter().map(|(m, s)| Setting::Share {
            member: m.clone(),
            shares: *s,
        }));
        out.push(Setting::CapacityBlendPct(self.capacity_blend_pct));
        out.extend(
            self.model_weights_milli
                .iter()
                .map(|(m, w)| Setting::ModelWeightMilli {
                    model: m.clone(),
                    milli: *w,
                }),
        );
        out.extend([
            Setting::HalfLifeS(self.half_life_s),
            Setting::Preemption(self.preemption),
            Setting::PreemptInference(self.preempt_inference),
            Setting::MinRuntimeS(self.min_runtime_s),
            Setting::PreemptGraceS(self.preempt_grace_s),
            Setting::Approvals(self.approvals_required),
            Setting::ProposalTtlS(self.proposal_ttl_s),
            Setting::WeightReferenceTflops(self.weight_reference_tflops),
            Setting::MaxGraceS(self.max_grace_s),
            Setting::MaxPendingJobs(self.max_pending_jobs),
            Setting::GpuQuota(self.gpu_quota),
        ]);
        out.extend(
            self.gpu_quotas
                .iter()
                .map(|(m, g)| Setting::MemberGpuQuota {
                    member: m.clone(),
                    gpus: *g,
                }),
        );
        out.push(Setting::SubmitRate(self.submit_rate));
        out.push(Setting::JobRetentionS(self.job_retention_s));
        out.push(Setting::GangNodes(self.gang_nodes));
        out
    }
}

/// One policy setting, as `coop policy set KEY=VALUE` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setting {
    Ordering(Ordering),
    Share {
        member: String,
        shares: u64,
    },
    DefaultShare(u64),
    CapacityBlendPct(u32),
    ModelWeightMilli {
        model: String,
        milli: u64,
    },
    HalfLifeS(u64),
    Preemption(bool),
    PreemptInference(bool),
    MinRuntimeS(u64),
    PreemptGraceS(u64),
    Approvals(u32),
    ProposalTtlS(u64),
    WeightReferenceTflops(u64),
    MaxGraceS(u64),
    MaxPendingJobs(u64),
    GpuQuota(u64),
    MemberGpuQuota {
        member: String,
        gpus: u64,
    },
    SubmitRate(u64),
    JobRetentionS(u64),
    /// Which nodes a multi-node job's parts may share.
    GangNodes(GangNodes),
    /// A member joins the co-op once the proposal passes (its token, made
    /// when proposed, works from then on). Only `coop member add` makes it.
    AddMember {
        name: String,
        token_hash: String,
    },
    RemoveMember(String),
}

pub const SETTING_KEYS: &str = "ordering, share.MEMBER, default_share, capacity_blend, weight.MODEL, weight_reference_tflops, half_life, preemption, preempt_inference, min_runtime, preempt_grace, approvals, proposal_ttl, max_grace, max_pending, gpu_quota, gpu_quota.MEMBER, submit_rate, job_retention, gang_nodes, member.remove";

/// Shares and weights are capped so that sums and products stay far from overflow.
const MAX_SHARES: u64 = 1_000_000;
const MAX_WEIGHT_MILLI: u64 = 1_000_000;
const MAX_DURATION_S: u64 = 10 * 365 * 24 * 3600;
/// The longest grace the policy may allow: a day.
pub const MAX_GRACE_S: u64 = 24 * 3600;

impl Setting {
    /// Parses `key=value`. Durations take a unit (`90s`, `15m`, `7d`); a weight
    /// takes up to three decimals. The error names the key.
    pub fn parse(kv: &str) -> Result<Self, (String, String)> {
        let (key, value) = kv.split_once('=').ok_or_else(|| {
            (
                kv.to_string(),
                format!("expected KEY=VALUE (keys: {SETTING_KEYS})"),
            )
        })?;
        let (key, value) = (key.trim(), value.trim());
        let err = |m: String| (key.to_string(), m);
        let int = |max: u64| -> Result<u64, (String, String)> {
            let n: u64 = value
                .parse()
                .map_err(|_| err(format!("{value:?} is not a whole number")))?;
            if n > max {
                return Err(err(format!("{n} is above the maximum {max}")));
            }
            Ok(n)
        };
        let flag = || match value {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => Err(err(format!("{value:?} is not on or off"))),
        };
        let secs = || parse_duration_s(value).map_err(err);
        Ok(match key {
            "ordering" => Setting::Ordering(
                Ordering::parse(value)
                    .ok_or_else(|| err(format!("{value:?} is not fifo, fairshare or drf")))?,
            ),
            "default_share" => Setting::DefaultShare(int(MAX_SHARES)?),
            "capacity_blend" => {
                let v = value.strip_suffix('%').unwrap_or(value);
                let n: u32 = v
                    .parse()
                    .ok()
                    .filter(|n| *n <= 100)
                    .ok_or_else(|| err(format!("{value:?} is not a percent from 0 to 100")))?;
                Setting::CapacityBlendPct(n)
            }
            "half_life" => {
                let s = secs()?;
                if s == 0 {
                    return Err(err("must be longer than zero".into()));
                }
                Setting::HalfLifeS(s)
            }
            "preemption" => Setting::Preemption(flag()?),
            "preempt_inference" => Setting::PreemptInference(flag()?),
            "min_runtime" => Setting::MinRuntimeS(secs()?),
            "preempt_grace" => Setting::PreemptGraceS(secs()?),
            "approvals" => Setting::Approvals(int(1000)? as u32),
            "weight_reference_tflops" => Setting::WeightReferenceTflops(int(1_000_000)?),
            "max_grace" => {
                let s = secs()?;
                if s > MAX_GRACE_S {
                    return Err(err(format!("at most {}", fmt_duration_s(MAX_GRACE_S))));
                }
                Setting::MaxGraceS(s)
            }
            "max_pending" => Setting::MaxPendingJobs(int(10_000_000)?),
            "gpu_quota" => Setting::GpuQuota(int(1_000_000)?),
            "submit_rate" => Setting::SubmitRate(int(100_000)?),
            "gang_nodes" => Setting::GangNodes(
                GangNodes::parse(value)
                    .ok_or_else(|| err(format!("{value:?} is not any, site or owner")))?,
            ),
            "member.add" => {
                return Err(err(
                    "members are added with `coop member add NAME` (it proposes the member and prints its token)".into(),
                ));
            }
            "member.remove" => Setting::RemoveMember(value.to_string()),
            "proposal_ttl" => {
                let s = secs()?;
                if s == 0 {
                    return Err(err("must be longer than zero".into()));
                }
                Setting::ProposalTtlS(s)
            }
            "job_retention" => {
                let s = secs()?;
                if s == 0 || s > MAX_JOB_RETENTION_S {
                    return Err(err(format!(
                        "must be longer than zero and at most {}",
                        fmt_duration_s(MAX_JOB_RETENTION_S)
                    )));
                }
                Setting::JobRetentionS(s)
            }
            k => {
                if let Some(member) = k.strip_prefix("gpu_quota.") {
                    Setting::MemberGpuQuota {
                        member: member.to_string(),
                        gpus: int(1_000_000)?,
                    }
                } else if let Some(member) = k.strip_prefix("share.") {
                    Setting::Share {
                        member: member.to_string(),
                        shares: int(MAX_SHARES)?,
                    }
                } else if let Some(model) = k.strip_prefix("weight.") {
                    if model.is_empty() {
                        return Err(err("names no GPU model".into()));
                    }
                    Setting::ModelWeightMilli {
                        model: model.to_string(),
                        milli: parse_milli(value).map_err(err)?,
                    }
                } else {
                    return Err(err(format!("unknown policy key (keys: {SETTING_KEYS})")));
                }
            }
        })
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setting::Ordering(o) => write!(f, "ordering={}", o.as_str()),
            Setting::Share { member, shares } => write!(f, "share.{member}={shares}"),
            Setting::DefaultShare(n) => write!(f, "default_share={n}"),
            Setting::CapacityBlendPct(p) => write!(f, "capacity_blend={p}%"),
            Setting::ModelWeightMilli { model, milli } => {
                write!(f, "weight.{model}={}.{:03}", milli / 1000, milli % 1000)
            }
            Setting::HalfLifeS(s) => write!(f, "half_life={}", fmt_duration_s(*s)),
            Setting::Preemption(b) => write!(f, "preemption={}", on_off(*b)),
            Setting::PreemptInference(b) => write!(f, "preempt_inference={}", on_off(*b)),
            Setting::MinRuntimeS(s) => write!(f, "min_runtime={}", fmt_duration_s(*s)),
            Setting::PreemptGraceS(s) => write!(f, "preempt_grace={}", fmt_duration_s(*s)),
            Setting::Approvals(k) => write!(f, "approvals={k}"),
            Setting::ProposalTtlS(s) => write!(f, "proposal_ttl={}", fmt_duration_s(*s)),
            Setting::WeightReferenceTflops(t) => write!(f, "weight_reference_tflops={t}"),
            Setting::MaxGraceS(s) => write!(f, "max_grace={}", fmt_duration_s(*s)),
            Setting::MaxPendingJobs(n) => write!(f, "max_pending={n}"),
            Setting::GpuQuota(n) => write!(f, "gpu_quota={n}"),
            Setting::MemberGpuQuota { member, gpus } => write!(f, "gpu_quota.{member}={gpus}"),
            Setting::SubmitRate(n) => write!(f, "submit_rate={n}"),
            Setting::JobRetentionS(s) => write!(f, "job_retention={}", fmt_duration_s(*s)),
            Setting::GangNodes(g) => write!(f, "gang_nodes={}", g.as_str()),
            Setting::AddMember { name, .. } => write!(f, "member.add={name}"),
            Setting::RemoveMember(name) => write!(f, "member.remove={name}"),
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// A duration as a person writes it: a whole number and a unit (`90s`,
/// `15m`, `12h`, `7d`). A bare number is refused (is `7` seconds or days?),
/// except `0`.
pub fn parse_duration_s(v: &str) -> Result<u64, String> {
    let (num, mult) = match v.char_indices().last() {
        Some((i, 's')) => (&v[..i], 1),
        Some((i, 'm')) => (&v[..i], 60),
        Some((i, 'h')) => (&v[..i], 3600),
        Some((i, 'd')) => (&v[..i], 86_400),
        _ if v == "0" => (v, 1),
        _ if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(format!("{v} needs a unit (e.g. {v}d, {v}h, {v}m or {v}s)"));
        }
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|s| *s <= MAX_DURATION_S)
        .ok_or_else(|| format!("{v:?} is not a duration like 90s, 15m, 12h or 7d"))
}

pub fn fmt_duration_s(s: u64) -> String {
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A decimal with up to three places, as thousandths: "1.25" -> 1250.
fn parse_milli(v: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{v:?} is not a weight like 1, 0.5 or 2.125 (at most {MAX_WEIGHT_MILLI} thousandths)"
        )
    };
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty() || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let i: u64 = int.parse().map_err(|_| bad())?;
    let f: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    i.checked_mul(1000)
        .and_then(|i| i.checked_add(f))
        .filter(|m| *m > 0 && *m <= MAX_WEIGHT_MILLI)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_through_their_text() {
        let mut p = Policy::default();
        p.set(&Setting::Share {
            member: "a".into(),
            shares: 3,
        });
        p.set(&Setting::ModelWeightMilli {
            model: "A100-80GB".into(),
            milli: 2125,
        });
        for s in p.settings() {
            assert_eq!(Setting::parse(&s.to_string()), Ok(s.clone()), "{s}");
        }
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (kv, key) in [
            ("half_life=0s", "half_life"),
            ("half_life=soon", "half_life"),
            ("job_retention=0s", "job_retention"),
            ("job_retention=400d", "job_retention"),
            ("capacity_blend=101", "capacity_blend"),
            ("weight.T4=0", "weight.T4"),
            ("weight.T4=1.2345", "weight.T4"),
            ("share.a=-1", "share.a"),
            ("preemption=maybe", "preemption"),
            ("colour=blue", "colour"),
        ] {
            assert_eq!(Setting::parse(kv).unwrap_err().0, key, "{kv}");
        }
    }

    #[test]
    fn durations_need_a_unit() {
        for key in [
            "half_life",
            "min_runtime",
            "preempt_grace",
            "max_grace",
            "proposal_ttl",
            "job_retention",
        ] {
            let (k, m) = Setting::parse(&format!("{key}=7")).unwrap_err();
            assert_eq!(
                (k.as_str(), m.as_str()),
                (key, "7 needs a unit (e.g. 7d, 7h, 7m or 7s)")
            );
            assert!(Setting::parse(&format!("{key}=7h")).is_ok(), "{key}=7h");
        }
        assert_eq!(Setting::parse("min_runtime=0"), Ok(Setting::MinRuntimeS(0)));
        assert_eq!(parse_duration_s("90s"), Ok(90));
        assert_eq!(parse_duration_s("7d"), Ok(7 * 86_400));
    }

    #[test]
    fn unnamed_models_weigh_one_unit() {
        let mut p = Policy::default();
        assert_eq!(p.weight_milli("T4-16GB"), 1000);
        p.set(&Setting::ModelWeightMilli {
            model: "t4-16gb".into(),
            milli: 250,
        });
        assert_eq!(p.weight_milli("T4-16GB"), 250);
    }
}
