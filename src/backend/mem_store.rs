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
}

#[async_trait]
impl AttachmentStore for MemStore {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = self
            .fail_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
        {
            return Err(e);
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.retain(|(v, _), _| v != volume);
        for r in holders {
            records.insert((r.volume_id.clone(), r.node_id.clone()), r.clone());
        }
        Ok(())
    }

    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        let stored: Vec<AttachmentRecord> = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| r.volume_id == *volume)
            .cloned()
            .collect();
        if !crate::ports::store::same_holders(&stored, previous) {
            self.writes.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Conflict(format!(
                "the holders of {volume} changed since they were read"
            )));
        }
        self.write_volume(volume, holders).await
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
