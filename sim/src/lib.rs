//! The simulation harness: turmoil worlds that run the real driver code under seeded chaos.
//!
//! It grows with the simulation issue; today it holds the seed plumbing every scenario uses.

/// Knobs derived from a seed, printed first as `SEED=<n> <knobs>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The seed.
    pub seed: u64,
}
