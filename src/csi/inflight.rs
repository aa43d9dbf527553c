//! In-flight guard: at most one operation per object (volume or snapshot) at a time.
//!
//! The spec: "In general the Cluster Orchestrator (CO) is responsible for ensuring that
//! there is no more than one call 'in-flight' per volume at a given time. However, in some
//! circumstances, the CO MAY lose state (for example when the CO crashes and restarts), and
//! MAY issue multiple calls simultaneously for the same volume. The Plugin SHOULD handle
//! this as gracefully as possible. The error code `ABORTED` MAY be returned by the plugin in
//! this case."
//!
//! One [`InFlight`] per service instance (never global); the guard releases on drop, so a
//! cancelled RPC (client went away) frees its key too.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// Keys of the operations in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<BTreeSet<String>>>,
}

/// Holds a key until dropped.
#[derive(Debug)]
#[must_use = "the key is released when the guard is dropped"]
pub struct InFlightGuard {
    keys: Arc<Mutex<BTreeSet<String>>>,
    key: String,
}

impl InFlight {
    /// Marks `key` in flight, or ABORTED naming `what` if it already is.
    pub fn try_start(&self, key: &str, what: &str) -> Result<InFlightGuard, Error> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "an operation on {what} is already in progress; retry later"
            )));
        }
        Ok(InFlightGuard {
            keys: Arc::clone(&self.keys),
            key: key.to_string(),
        })
    }

    /// Whether `key` is in flight.
    pub fn contains(&self, key: &str) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Number of keys in flight.
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_on_a_key_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let g = f.try_start("pvc-1", "volume pvc-1").unwrap();
        let err = f.try_start("pvc-1", "volume pvc-1").unwrap_err();
        assert!(matches!(err, Error::Aborted(ref m) if m.contains("volume pvc-1")));
        let _other = f.try_start("pvc-2", "volume pvc-2").unwrap();
        drop(g);
        assert!(f.try_start("pvc-1", "volume pvc-1").is_ok());
    }
}
