//! Per-volume backoff of NodeStageVolume (and of the repairs NodePublishVolume attempts): a
//! volume that keeps failing must not turn the kubelet's retries — one per pod, each with
//! its own backoff — into a storm of NVMe connects against the RDS.
//!
//! Policy: the first [`FREE_FAILURES`] consecutive failures of a volume cost nothing; after
//! that each attempt must wait `BASE × 2^(failures − FREE_FAILURES)`, at most [`MAX`]. A
//! call during the wait is refused at once (UNAVAILABLE: the kubelet retries) with the
//! count, the last error and the time left. Success, or an unstage, forgets the volume.
//!
//! Invariants: time only from tokio's clock (virtual in the simulation and in paused
//! tests); bounded memory (an entry lives while its volume keeps failing, and entries idle
//! for [`FORGET_AFTER`] are pruned); the lock is a sync mutex never held across `.await`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::types::VolumeId;

/// Consecutive failures that cost no wait.
pub const FREE_FAILURES: u32 = 3;
/// The first wait.
pub const BASE: Duration = Duration::from_secs(5);
/// The longest wait.
pub const MAX: Duration = Duration::from_secs(120);
/// An entry not touched for this long is dropped.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
struct Failures {
    count: u32,
    last_error: String,
    at: Instant,
    until: Instant,
}

/// What the backoff knows about a failing volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingVolume {
    /// Consecutive failures.
    pub count: u32,
    /// The last error.
    pub last_error: String,
}

/// Failing volumes and when each may be tried again. Clones share.
#[derive(Debug, Clone, Default)]
pub struct StageBackoff {
    volumes: Arc<Mutex<BTreeMap<VolumeId, Failures>>>,
}

impl StageBackoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<VolumeId, Failures>> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// UNAVAILABLE naming the failures and the wait when `volume` must wait, else `Ok`.
    pub fn check(&self, volume: &VolumeId) -> Result<(), Error> {
        let now = Instant::now();
        let volumes = self.lock();
        match volumes.get(volume) {
            Some(f) if f.until > now => Err(Error::Unavailable(format!(
                "volume {volume} failed to stage {} times in a row (last error: {}); to spare \
                 the storage server a reconnect storm, the node tries it again in {}s at the \
                 earliest",
                f.count,
                f.last_error,
                (f.until - now).as_secs().max(1)
            ))),
            _ => Ok(()),
        }
    }

    /// Records the outcome of an attempt on `volume`.
    pub fn record(&self, volume: &VolumeId, outcome: Result<(), &Error>) {
        let mut volumes = self.lock();
        let Err(e) = outcome else {
            volumes.remove(volume);
            return;
        };
        let now = Instant::now();
        if !volumes.contains_key(volume) {
            volumes.retain(|_, f| now.duration_since(f.at) < FORGET_AFTER);
        }
        let f = volumes.entry(volume.clone()).or_insert(Failures {
            count: 0,
            last_error: String::new(),
            at: now,
            until: now,
        });
        f.count += 1;
        f.last_error = e.to_string();
        f.at = now;
        f.until = now + delay(f.count);
    }

    /// Forgets `volume` (unstaged: the CO gave up on it or tore it down).
    pub fn forget(&self, volume: &VolumeId) {
        self.lock().remove(volume);
    }

    /// What is known about `volume`, when it is failing.
    pub fn failing(&self, volume: &VolumeId) -> Option<FailingVolume> {
        self.lock().get(volume).map(|f| FailingVolume {
            count: f.count,
            last_error: f.last_error.clone(),
        })
    }

    /// Volumes tracked (for tests of the memory bound).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no volume is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The wait after `failures` consecutive failures.
pub fn delay(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (BASE * 2u32.pow(doublings)).min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str) -> VolumeId {
        VolumeId::new(id).unwrap()
    }

    fn fail() -> Error {
        Error::Unavailable("10.0.0.1:4420 unreachable".into())
    }

    #[test]
    fn the_wait_doubles_after_the_free_failures_up_to_the_bound() {
        assert_eq!(delay(1), Duration::ZERO);
        assert_eq!(delay(2), Duration::ZERO);
        assert_eq!(delay(3), BASE);
        assert_eq!(delay(4), BASE * 2);
        assert_eq!(delay(5), BASE * 4);
        assert_eq!(delay(40), MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_volume_waits_and_says_why_and_success_forgets_it() {
        let b = StageBackoff::default();
        let v = vol("pvc-1");
        for _ in 0..2 {
            b.record(&v, Err(&fail()));
            b.check(&v).unwrap();
        }
        b.record(&v, Err(&fail()));
        let err = b.check(&v).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        assert!(
            msg.contains("3 times") && msg.contains("unreachable") && msg.contains("5s"),
            "{msg}"
        );
        // Other volumes are not held back.
        b.check(&vol("pvc-2")).unwrap();
        tokio::time::advance(BASE).await;
        b.check(&v).unwrap();
        b.record(&v, Ok(()));
        assert!(b.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_pruned() {
        let b = StageBackoff::default();
        b.record(&vol("pvc-old"), Err(&fail()));
        tokio::time::advance(FORGET_AFTER).await;
        b.record(&vol("pvc-new"), Err(&fail()));
        assert_eq!(b.len(), 1);
        assert!(b.failing(&vol("pvc-old")).is_none());
    }
}
