//! Seams for wall-clock time and randomness, so the simulation can make both deterministic.
//!
//! Elapsed time and sleeps come from `tokio::time` (turmoil virtualises it); wall-clock
//! timestamps (e.g. `attached-at`) come from a [`Clock`]; every random choice (backoff
//! jitter) comes from an [`Entropy`].

use std::sync::Mutex;
use std::time::SystemTime;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A source of random numbers.
pub trait Entropy: Send + Sync + 'static {
    /// A uniformly distributed `u64`.
    fn next_u64(&self) -> u64;
}

/// A seeded [`StdRng`] behind a mutex (never held across `.await`).
#[derive(Debug)]
pub struct SeededEntropy(Mutex<StdRng>);

impl SeededEntropy {
    /// Seeded with `seed`: the same seed gives the same sequence.
    pub fn from_seed(seed: u64) -> Self {
        Self(Mutex::new(StdRng::seed_from_u64(seed)))
    }
    /// Seeded from the operating system (production).
    pub fn from_os() -> Self {
        Self(Mutex::new(rand::make_rng()))
    }
}

impl Entropy for SeededEntropy {
    fn next_u64(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).next_u64()
    }
}
