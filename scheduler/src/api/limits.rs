//! Submissions per second per member: a token bucket for each member on each
//! scheduler (governor's GCRA), refilled at the policy's `submit_rate` with
//! bursts of ten times that. Not replicated: a member spreading its calls
//! over several schedulers gets each one's rate, which still bounds it.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::Status;

/// Metadata of a RESOURCE_EXHAUSTED answer: when to try again.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";

#[derive(Default)]
pub struct SubmitLimits {
    /// The limiter for the rate it was made for (remade when the policy changes).
    limiter: Mutex<Option<(u64, Arc<DefaultKeyedRateLimiter<String>>)>>,
}

impl SubmitLimits {
    /// Takes one submission of `member` at `rate` per second (0: no limit).
    pub fn check(&self, member: &str, rate: u64) -> Result<(), Status> {
        self.check_n(member, rate, 1)
    }

    /// Takes `jobs` submissions at once (an array's tasks), at most a whole
    /// burst: a large array waits for a full bucket, then empties it.
    pub fn check_n(&self, member: &str, rate: u64, jobs: u32) -> Result<(), Status> {
        let Some(per_s) = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        let limiter = {
            let mut l = self.limiter.lock().expect("limiter lock");
            match l.as_ref() {
                Some((r, lim)) if *r == rate => lim.clone(),
                _ => {
                    let burst = per_s.saturating_mul(NonZeroU32::new(10).expect("10 > 0"));
                    let lim = Arc::new(RateLimiter::keyed(
                        Quota::per_second(per_s).allow_burst(burst),
                    ));
                    *l = Some((rate, lim.clone()));
                    lim
                }
            }
        };
        let burst = per_s.saturating_mul(NonZeroU32::new(10).expect("10 > 0"));
        let n = NonZeroU32::new(jobs.max(1)).expect("at least 1").min(burst);
        let taken = limiter
            .check_key_n(&member.to_string(), n)
            .expect("n is within the burst");
        taken.map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let ms = wait.as_millis().max(1);
            let mut status = Status::resource_exhausted(format!(
                "submissions: member {member} may submit {rate} jobs a second (policy submit_rate); retry in {ms} ms"
            ));
            if let Ok(v) = ms.to_string().parse() {
                status.metadata_mut().insert(RETRY_AFTER_HEADER, v);
            }
            status
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_member_waits_while_others_do_not() {
        let l = SubmitLimits::default();
        for _ in 0..20 {
            l.check("a", 2).expect("within the burst of 20");
        }
        let refused = l.check("a", 2).expect_err("past the burst");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().starts_with("submissions:"),
            "{}",
            refused.message()
        );
        let wait: u64 = refused
            .metadata()
            .get(RETRY_AFTER_HEADER)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            wait > 0 && wait <= 500,
            "one token comes every 500 ms: {wait}"
        );
        l.check("b", 2).expect("another member has its own bucket");
        l.check("a", 0).expect("rate 0: no limit");
    }
}
