//! In-memory `AttachmentStore` for tests and benchmarks: the records in a map, with
//! injectable write failures, a write counter and conditional writes (a stale view's
//! write conflicts, as on the API server). Not durable; never used by the plugin
//! binary.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::ports::store::{AttachmentRecord, AttachmentStore, StoreError};
use crate::types::{NodeId, VolumeId};

/// Records in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    records: Mutex<BTreeMap<(VolumeId, NodeId), AttachmentRecord>>,
    fail_next: Mutex<Vec<StoreError>>,
    writes: AtomicU64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next writes fail with `errors`, in order (then writes succeed again).
    pub fn fail_next_writes(&self, errors: impl IntoIterator<Item = StoreError>) {
        let mut q = self.fail_next.lock().unwrap_or_else(|p| p.into_inner());
        let mut errors: Vec<StoreError> = errors.into_iter().collect();
        errors.reverse();
        errors.append(&mut q);
        *q = errors;
    }

    /// Number of write attempts so far (failed ones included).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a write attempt and fails it with the next injected error, if any.
    fn attempt(&self) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        match self.fail_next.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Replaces `volume`'s records in `records` with `holders`.
fn replace(
    records: &mut BTreeMap<(VolumeId, NodeId), AttachmentRecord>,
    volume: &VolumeId,
    holders: &[AttachmentRecord],
) {
    records.retain(|(v, _), _| v != volume);
    for r in holders {
        records.insert((r.volume_id.clone(), r.node_id.clone()), r.clone());
    }
}

#[async_trait]
impl AttachmentStore for MemStore {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.attempt()?;
        replace(
            &mut self.records.lock().unwrap_or_else(|p| p.into_inner()),
            volume,
            holders,
        );
        Ok(())
    }

    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.attempt()?;
        // The check and the write under one lock, as the API server's precondition is.
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let stored: Vec<AttachmentRecord> = records
            .values()
            .filter(|r| r.volume_id == *volume)
            .cloned()
            .collect();
        if !crate::ports::store::same_holders(&stored, previous) {
            return Err(StoreError::Conflict(format!(
                "the holders of {volume} changed since they were read"
            )));
        }
        replace(&mut records, volume, holders);
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect())
    }
}
