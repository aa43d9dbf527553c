//! The `AttachmentStore` port: durable attachment records (volume → nodes).
//!
//! Production: PV annotations through the Kubernetes API, written with an optimistic
//! concurrency precondition (`crate::kube::pv_store`). Embedded default: a local file,
//! written atomically (`crate::backend::file_store`). A write returns only once the record
//! is durable; the attachment manager answers a publish only after that.
//!
//! The unit of writing is a volume: the manager, holding the volume's lock, knows the
//! volume's complete set of holders and writes it whole. So a store needs one write per
//! change, and a late write can never merge with a newer one into a set nobody intended.

use std::time::SystemTime;

use async_trait::async_trait;

use crate::types::{AccessMode, NodeId, VolumeId};

/// Errors of the `AttachmentStore` port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A concurrent writer won (HTTP 409) more times than we retry.
    #[error("attachment store conflict: {0}")]
    Conflict(String),
    /// The object the record lives on (e.g. the PV) does not exist.
    #[error("attachment store object not found: {0}")]
    NotFound(String),
    /// The store cannot be reached; the write did not happen (or its fate is unknown).
    #[error("attachment store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be read back.
    #[error("attachment store holds a corrupt record: {0}")]
    Corrupt(String),
    /// Local I/O failed.
    #[error("attachment store I/O error: {0}")]
    Io(String),
}

/// A live migration of a multi-node block volume (KubeVirt): the second holder (the
/// target) joined while `source` held the volume. Carried by the target's record, so it is
/// written by the same conditional write as the holders themselves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Migration {
    /// The holder the volume is migrating away from.
    pub source: NodeId,
    /// When the target was attached: the migration's start.
    pub started_at: SystemTime,
    /// How long the migration may run (`migrationTimeoutSeconds` of the volume's
    /// StorageClass): past it, a new attach is refused until a holder is detached.
    pub timeout: std::time::Duration,
    /// The host NQN of the target's machine when it was published (with the data-path
    /// fence): a machine under the target's name with another NQN is a fresh one, which
    /// runs no VM. `None` in records written without it.
    #[serde(default)]
    pub target_nqn: Option<String>,
}

/// One durable attachment: `volume` is attached to `node`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AttachmentRecord {
    /// The attached volume.
    pub volume_id: VolumeId,
    /// The node it is attached to.
    pub node_id: NodeId,
    /// When the attachment was recorded (microsecond precision: what the stores keep).
    pub attached_at: SystemTime,
    /// Access mode it was published with.
    pub access_mode: AccessMode,
    /// Published read-only.
    pub readonly: bool,
    /// The migration this holder is the target of, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// The number of the write that made the volume's current holder set (every record of
    /// a volume carries the same; counted from 1 after the set was empty). Conditional
    /// writes compare it, so a holder set that changed and changed back between a
    /// replica's read and its write (A → B → A) is still a conflict.
    #[serde(default)]
    pub generation: u64,
}

impl AttachmentRecord {
    /// A record of a fresh attachment (no migration, generation 0 until written).
    pub fn new(
        volume_id: VolumeId,
        node_id: NodeId,
        attached_at: SystemTime,
        access_mode: AccessMode,
        readonly: bool,
    ) -> Self {
        Self {
            volume_id,
            node_id,
            attached_at,
            access_mode,
            readonly,
            migration: None,
            generation: 0,
        }
    }
}

/// Durable storage of attachment records.
#[async_trait]
pub trait AttachmentStore: Send + Sync + 'static {
    /// Durably replaces the holders of `volume` with `holders` (all with this `volume_id`,
    /// sorted by node; empty: the volume is attached nowhere). Returns once durable.
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError>;
    /// Like [`Self::write_volume`], but only while the stored holders of `volume` still
    /// are `previous` (same nodes, access mode and readonly flags): when another writer
    /// changed them (e.g. a second controller during a failover), fails with
    /// `StoreError::Conflict` and writes nothing, so a stale view never overwrites a newer
    /// one. Stores with a single writer need not check (the default).
    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        let _ = previous;
        self.write_volume(volume, holders).await
    }
    /// The stored holders of `volume`, sorted by node.
    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        Ok(self
            .load_all()
            .await?
            .into_iter()
            .filter(|r| r.volume_id == *volume)
            .collect())
    }
    /// Every stored record, sorted by (volume, node).
    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError>;
}

/// What [`AttachmentStore::write_volume_if`] compares: who holds, how, since when (a
/// holder that left and came back is a new attachment), the migration, and the generation
/// of the set (a set that changed and changed back is not the same).
pub fn same_holders(a: &[AttachmentRecord], b: &[AttachmentRecord]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.node_id == y.node_id
                && x.access_mode == y.access_mode
                && x.readonly == y.readonly
                && micros(x.attached_at) == micros(y.attached_at)
                && x.migration == y.migration
                && x.generation == y.generation
        })
}

/// `t` in whole microseconds since the epoch (what the stores keep of a time).
pub fn micros(t: SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// `t` truncated to whole microseconds (what the stores keep of a time), so a record made
/// in memory equals its stored copy.
pub fn truncate_to_micros(t: SystemTime) -> SystemTime {
    let us = micros(t);
    std::time::UNIX_EPOCH
        + std::time::Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
}
