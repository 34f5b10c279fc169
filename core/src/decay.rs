//! Decay: a usage record is usage spread evenly over `[start, end]`, and
//! usage at time `t` counts `2^(-(now - t) / half_life)` at `now` (see
//! `fairshare`). The curve, and [`Decayed`], the per-member total the
//! replicated state keeps of it.

use serde::{Deserialize, Serialize};

use crate::model::UsageRecord;

/// Milliseconds in an hour: usage figures are in normalised GPU-hours.
const HOUR_MS: f64 = 3_600_000.0;

/// `2^(-dt / half_life)`, with `libm`'s exp2 (pure Rust): the platform's
/// C library may round its last bit otherwise, and the replicated totals
/// ([`Decayed`]) must come out the same on every replica.
fn decay(dt_ms: f64, half_life_ms: f64) -> f64 {
    libm::exp2(-dt_ms / half_life_ms)
}

/// Decayed value at `now_ms` of `weighted_gpu_ms` spread evenly over `[start, end]`,
/// in normalised GPU-hours.
pub fn decayed(
    weighted_gpu_ms: f64,
    start_ms: i64,
    end_ms: i64,
    now_ms: i64,
    half_life_s: u64,
) -> f64 {
    let h = half_life_s as f64 * 1000.0;
    // In f64: times from a hostile or broken report may be far apart.
    let (s, e) = (
        now_ms as f64 - start_ms as f64,
        now_ms as f64 - end_ms as f64,
    );
    let v = if end_ms > start_ms {
        let rate = weighted_gpu_ms / (end_ms as f64 - start_ms as f64);
        rate * h / std::f64::consts::LN_2 * (decay(e, h) - decay(s, h))
    } else {
        weighted_gpu_ms * decay(e, h)
    };
    v / HOUR_MS
}

pub(crate) fn record_value(r: &UsageRecord, now_ms: i64, half_life_s: u64) -> f64 {
    decayed(
        r.weighted_gpu_ms as f64,
        r.start_ms,
        r.end_ms,
        now_ms,
        half_life_s,
    )
}

/// A member's billed usage decayed to `at_ms`. Every record's decayed value
/// scales by the same `2^(-dt/H)` as time passes (see the module doc), so this
/// one number gives the exact decayed usage at any later time without the
/// records it came from: the replicated state keeps one per member, and the
/// records themselves live in each replica's store.
///
/// It is the one float in the replicated state. Every replica computes it
/// with the same operations in the same order (basic IEEE arithmetic, which
/// is exact to the bit everywhere, and `libm`'s exp2, the same code on every
/// platform), and it is written and read back to the bit (serde_json's
/// `float_roundtrip`), so replicas agree; it orders the queue and bills
/// nothing. A change of half-life applies from the time
/// it is adopted: usage before it keeps the value it had then (a departure
/// from recomputing the whole history with the new half-life, which Slurm
/// does not do either).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Decayed {
    pub at_ms: i64,
    /// Normalised GPU-hours at `at_ms`.
    pub value: f64,
}

impl Decayed {
    /// The value at `now_ms`.
    pub fn at(&self, now_ms: i64, half_life_s: u64) -> f64 {
        if self.value == 0.0 {
            return 0.0;
        }
        self.value
            * decay(
                now_ms as f64 - self.at_ms as f64,
                half_life_s as f64 * 1000.0,
            )
    }

    /// Moves to `now_ms` (never backwards), decaying at `half_life_s`.
    pub fn advance(&mut self, now_ms: i64, half_life_s: u64) {
        if now_ms > self.at_ms {
            self.value = self.at(now_ms, half_life_s);
            self.at_ms = now_ms;
        }
    }

    /// Adds a billed record. The value moves to the record's end when that is
    /// later, so that it never has to grow back from far in the past.
    pub fn add(&mut self, r: &UsageRecord, half_life_s: u64) {
        self.advance(r.end_ms, half_life_s);
        self.value += record_value(r, self.at_ms, half_life_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_far_apart_do_not_overflow() {
        // As a fuzzed history once billed: a run from the far past ended now.
        // (Debug builds panic on an integer overflow; this one must not.)
        let v = decayed(3_600_000.0, i64::MIN, 0, i64::MAX, 3600);
        assert_eq!(v, 0.0, "long decayed");
        let d = Decayed {
            value: 1.0,
            at_ms: i64::MIN,
        };
        assert_eq!(d.at(i64::MAX, 3600), 0.0);
    }
}
