//! The `ClusterWatch` port: the orchestrator's objects as watches see them, for the
//! controller's watch-driven reconciliation.
//!
//! A watch delivers what changed, in order, from a cache it keeps of the kinds the
//! controller judges (PersistentVolumes, Nodes, VolumeAttachments, VolumeSnapshotContents).
//! A full list happens only when the watch itself needs one — at its start and as its
//! recovery when the API server answers 410 Gone — and is reported as
//! [`Change::Relisted`] with everything it listed, so the consumer compares once instead of
//! listing again. Production: `crate::kube::watch::KubeWatch` over kube's runtime watcher;
//! the simulation runs that same adapter against its API server. Without Kubernetes there
//! is no watch (one writer, nothing to follow).

use async_trait::async_trait;

use crate::ports::cluster::{DiskReferences, VolumeAttachmentInfo};
use crate::ports::store::AttachmentRecord;
use crate::types::VolumeId;

/// One change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A PersistentVolume of this driver was added, changed or deleted: these are the
    /// attachment records its annotations now hold (none once deleted).
    Holders {
        /// The PV's volume.
        volume: VolumeId,
        /// The records its annotations hold, sorted by node.
        holders: Vec<AttachmentRecord>,
    },
    /// The PersistentVolumes were listed (the watch's start, or its recovery after a 410):
    /// every record of every PV of this driver, sorted by (volume, node).
    Relisted {
        /// Every listed record.
        holders: Vec<AttachmentRecord>,
    },
    /// A Node was deleted, or a VolumeAttachment of this driver was deleted or marked for
    /// deletion: an attachment record may have become stale.
    Detached,
}

/// Watches of the orchestrator's objects.
#[async_trait]
pub trait ClusterWatch: Send + Sync + 'static {
    /// Starts the watches (idempotent).
    fn start(&self);
    /// Waits for changes and returns every change seen since the last call, in order.
    async fn changes(&self) -> Vec<Change>;
    /// The VolumeAttachments of this driver as the watch last saw them, sorted by (volume,
    /// node); `None` until both the VolumeAttachments and the PersistentVolumes (which map
    /// a VolumeAttachment to its volume) have been listed.
    fn volume_attachments(&self) -> Option<Vec<VolumeAttachmentInfo>>;
    /// What references the driver's disks as the watch last saw it; `None` until the
    /// PersistentVolumes and VolumeSnapshotContents (or their absence) are known.
    fn disk_references(&self) -> Option<DiskReferences>;
}
