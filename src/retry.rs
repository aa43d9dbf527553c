//! Seeded exponential backoff with full jitter.
//!
//! tower's and kube's retry policies draw jitter from `RandomState`, which would make the
//! simulation non-deterministic; every retry loop in the driver uses this instead, drawing
//! from the injected [`Entropy`].

use std::time::Duration;

use crate::ports::Entropy;

/// Exponential backoff: attempt `n` waits a uniform time in `[0, min(max, base·2ⁿ)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay cap of the first retry.
    pub base: Duration,
    /// Largest delay cap.
    pub max: Duration,
    /// Attempts before giving up (the first try included).
    pub max_attempts: u32,
}

impl Backoff {
    /// A short policy for API conflicts and transient errors.
    pub const API: Backoff = Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_secs(2),
        max_attempts: 8,
    };

    /// The delay before retry number `attempt` (0-based), jittered by `entropy`.
    pub fn delay(&self, attempt: u32, entropy: &dyn Entropy) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        if cap_nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(entropy.next_u64() % (cap_nanos + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::time::SeededEntropy;

    #[test]
    fn delays_are_capped_and_reproducible_from_the_seed() {
        let b = Backoff::API;
        let (e1, e2) = (SeededEntropy::from_seed(7), SeededEntropy::from_seed(7));
        for attempt in 0..30 {
            let d1 = b.delay(attempt, &e1);
            assert_eq!(d1, b.delay(attempt, &e2));
            let cap = b.base.saturating_mul(1 << attempt.min(20)).min(b.max);
            assert!(d1 <= cap, "attempt {attempt}: {d1:?} > {cap:?}");
        }
    }
}
