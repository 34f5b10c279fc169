//! Fair-share maths: entitlements, decayed usage and the fair-share factor.
//!
//! Pure functions of the replicated state and a time. Floats appear only here
//! and in [`Decayed`], the per-member totals the state keeps.
//!
//! Decay: a ledger record is usage spread evenly over `[start, end]`, and
//! usage at time `t` counts `2^(-(now - t) / half_life)` at `now`. A record
//! therefore counts its integral, `rate * H/ln2 * (2^(-(now-end)/H) -
//! 2^(-(now-start)/H))`, which does not depend on how an agent cut a run into
//! intervals. Slurm decays usage in steps; this is the same curve without steps.

use std::collections::BTreeMap;

use crate::decay::record_value;
pub use crate::decay::{Decayed, decayed};
use crate::state::{State, UsageRecord, live_gpus, unbilled_ms};

/// Each member's entitlement as a fraction of the cluster (they sum to 1 when
/// there is any member). Voted shares and contributed capacity are blended by
/// `capacity_blend_pct`; capacity is the weighted GPUs of the member's nodes
/// that are up.
pub fn entitlements(state: &State) -> BTreeMap<String, f64> {
    let p = &state.policy;
    let shares: BTreeMap<&str, f64> = state
        .members
        .keys()
        .map(|m| (m.as_str(), p.share(m) as f64))
        .collect();
    let share_total: f64 = shares.values().sum();
    let mut capacity: BTreeMap<&str, f64> =
        state.members.keys().map(|m| (m.as_str(), 0.0)).collect();
    for n in state.nodes.values().filter(|n| n.up) {
        if let Some(c) = capacity.get_mut(n.owner.as_str()) {
            *c += n
                .gpus
                .iter()
                .map(|g| state.weight_milli(&g.model) as f64 / 1000.0)
                .sum::<f64>();
        }
    }
    let capacity_total: f64 = capacity.values().sum();
    let count = state.members.len().max(1) as f64;
    let blend = p.capacity_blend_pct as f64 / 100.0;
    shares
        .iter()
        .map(|(m, s)| {
            let by_share = if share_total > 0.0 {
                s / share_total
            } else {
                1.0 / count
            };
            let by_capacity = if capacity_total > 0.0 {
                capacity[m] / capacity_total
            } else {
                by_share
            };
            (
                m.to_string(),
                (1.0 - blend) * by_share + blend * by_capacity,
            )
        })
        .collect()
}

/// Decayed usage per member at `now_ms`: the billed part from the state's
/// per-member totals, plus what running jobs have used since they were last
/// billed. O(members + running jobs), whatever the length of the history.
pub fn usage(state: &State, now_ms: i64) -> BTreeMap<String, f64> {
    let hl = state.policy.half_life_s;
    let mut out: BTreeMap<String, f64> = state.members.keys().map(|m| (m.clone(), 0.0)).collect();
    // Removed members' usage still counts in the co-op's total.
    for (m, d) in &state.decayed {
        *out.entry(m.clone()).or_default() += d.at(now_ms, hl);
    }
    add_running(state, now_ms, &mut out);
    out
}

/// Decayed usage computed from scratch from `records` (the whole history,
/// as a replica's store holds it) at the state's half-life: what [`usage`]
/// must equal while the half-life has not changed.
pub fn recomputed<'a>(
    state: &State,
    records: impl IntoIterator<Item = &'a UsageRecord>,
    now_ms: i64,
) -> BTreeMap<String, f64> {
    let hl = state.policy.half_life_s;
    let mut out: BTreeMap<String, f64> = state.members.keys().map(|m| (m.clone(), 0.0)).collect();
    for r in records {
        *out.entry(r.member.clone()).or_default() += record_value(r, now_ms, hl);
    }
    add_running(state, now_ms, &mut out);
    out
}

fn add_running(state: &State, now_ms: i64, out: &mut BTreeMap<String, f64>) {
    let hl = state.policy.half_life_s;
    for j in state.running.iter().map(|id| &state.jobs[id]) {
        let ms = unbilled_ms(j, now_ms);
        if ms == 0 {
            continue;
        }
        let (_, w) = state.run_weight(j);
        let weighted = ms as f64 * live_gpus(j) as f64 * w as f64 / 1000.0;
        *out.entry(j.member.clone()).or_default() +=
            decayed(weighted, j.billed_to_ms, now_ms, now_ms, hl);
    }
}

/// Slurm's classic fair-share factor `2^(-U/S)`: `U` is the member's share of
/// all decayed usage, `S` its entitlement. 1 for a member that has used
/// nothing, 0.5 for one that used exactly its entitlement, towards 0 beyond.
/// A member with no entitlement gets 0: it runs only on otherwise idle GPUs.
pub fn factors(
    entitlements: &BTreeMap<String, f64>,
    usage: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let total: f64 = usage.values().sum();
    entitlements
        .iter()
        .map(|(m, s)| {
            let u = if total > 0.0 {
                usage.get(m).copied().unwrap_or(0.0) / total
            } else {
                0.0
            };
            let f = if *s > 0.0 { (-u / s).exp2() } else { 0.0 };
            (m.clone(), f)
        })
        .collect()
}

/// GPUs each member's running jobs hold now.
pub fn running_gpus(state: &State) -> BTreeMap<String, u32> {
    let mut out: BTreeMap<String, u32> = state.members.keys().map(|m| (m.clone(), 0)).collect();
    for j in state.running.iter().map(|id| &state.jobs[id]) {
        *out.entry(j.member.clone()).or_default() += j.spec.gpus;
    }
    out
}

/// GPUs on nodes that are up.
pub fn total_gpus(state: &State) -> u32 {
    state
        .nodes
        .values()
        .filter(|n| n.up)
        .map(|n| n.gpus.len() as u32)
        .sum()
}

/// Max-min fair allocation of `capacity` among members with `demand`, in
/// proportion to `weight` (water-filling): what each would get if the cluster
/// were perfectly fair given what each wanted.
pub fn water_fill(
    capacity: f64,
    demand: &BTreeMap<String, f64>,
    weight: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    let mut open: Vec<&String> = demand
        .iter()
        .filter(|(m, d)| **d > 0.0 && weight.get(*m).copied().unwrap_or(0.0) > 0.0)
        .map(|(m, _)| m)
        .collect();
    let mut left = capacity;
    while !open.is_empty() && left > 1e-9 {
        let w: f64 = open.iter().map(|m| weight[*m]).sum();
        let per = left / w;
        let (sated, hungry): (Vec<&String>, Vec<&String>) = open
            .iter()
            .partition(|m| demand[**m] - out.get(**m).copied().unwrap_or(0.0) <= per * weight[**m]);
        if sated.is_empty() {
            for m in &hungry {
                *out.entry((*m).clone()).or_default() += per * weight[*m];
            }
            break;
        }
        for m in sated {
            let got = out.entry(m.clone()).or_default();
            left -= demand[m] - *got;
            *got = demand[m];
        }
        open = hungry;
    }
    out
}

/// Jain's index `(sum x)^2 / (n * sum x^2)` of `xs` (1 = all equal).
pub fn jain(xs: &[f64]) -> Option<f64> {
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    (sq > 0.0).then(|| sum * sum / (xs.len() as f64 * sq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_a_record_does_not_change_its_decayed_value() {
        let hl = 3600;
        let whole = decayed(8.0e6, 0, 8_000, 20_000, hl);
        let parts: f64 = (0..8)
            .map(|i| decayed(1.0e6, i * 1000, (i + 1) * 1000, 20_000, hl))
            .sum();
        assert!((whole - parts).abs() < 1e-12 * whole, "{whole} vs {parts}");
    }

    #[test]
    fn usage_halves_every_half_life() {
        let hl = 7 * 86_400;
        let a = decayed(3.6e6, 0, 0, 0, hl);
        let b = decayed(3.6e6, 0, 0, hl as i64 * 1000, hl);
        assert!((a - 1.0).abs() < 1e-12);
        assert!((b - 0.5).abs() < 1e-12);
    }

    #[test]
    fn factor_is_one_half_at_entitlement() {
        let ent = BTreeMap::from([("a".to_string(), 0.25), ("b".to_string(), 0.75)]);
        let usage = BTreeMap::from([("a".to_string(), 1.0), ("b".to_string(), 3.0)]);
        let f = factors(&ent, &usage);
        assert!((f["a"] - 0.5).abs() < 1e-12 && (f["b"] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn water_fill_gives_unwanted_capacity_to_others() {
        let demand = BTreeMap::from([("a".to_string(), 10.0), ("b".to_string(), 100.0)]);
        let weight = BTreeMap::from([("a".to_string(), 0.5), ("b".to_string(), 0.5)]);
        let f = water_fill(60.0, &demand, &weight);
        assert!(
            (f["a"] - 10.0).abs() < 1e-9 && (f["b"] - 50.0).abs() < 1e-9,
            "{f:?}"
        );
    }

    #[test]
    fn jain_of_equal_values_is_one() {
        assert_eq!(jain(&[2.0, 2.0, 2.0]), Some(1.0));
        assert!((jain(&[1.0, 0.0]).unwrap() - 0.5).abs() < 1e-12);
    }
}
