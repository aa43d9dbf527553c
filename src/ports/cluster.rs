//! The `Cluster` port: what the controller asks of the orchestrator (and what the node asks
//! and tells it: the VolumeAttachments of the node, its NVMe host NQN).
//!
//! Production: the Kubernetes API (Nodes, VolumeAttachments, Events). Embedded default: a
//! local cluster of this one node.

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::types::{NodeId, VolumeId};

/// Errors of the `Cluster` port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The API cannot be reached.
    #[error("cluster API unavailable: {0}")]
    Unavailable(String),
    /// Anything else the API answered.
    #[error("cluster API error: {0}")]
    Other(String),
}

/// A VolumeAttachment of this driver, reduced to what rebuild needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachmentInfo {
    /// The volume handle (our volume id).
    pub volume_id: VolumeId,
    /// The node it attaches to.
    pub node_id: NodeId,
    /// `status.attached`.
    pub attached: bool,
    /// Whether the object is being deleted (detach requested).
    pub deleting: bool,
}

/// What a node's kubelet reports in its Node's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    /// The `Ready` condition is `True`: the kubelet reports. `False` or `Unknown` (it
    /// stopped reporting: the node lifecycle controller marks it) is not ready, and so is
    /// a Node with no status.
    pub ready: bool,
    /// This driver's volumes in `status.volumesInUse` (`kubernetes.io/csi/<driver>^<id>`):
    /// a mount or a block mapping is still there. Stale when the node is not ready.
    pub volumes_in_use: Vec<VolumeId>,
}

impl NodeReport {
    /// Whether the kubelet reports `volume` still in use now: ready, and listed.
    pub fn uses(&self, volume: &VolumeId) -> bool {
        self.ready && self.volumes_in_use.contains(volume)
    }
}

/// What in the orchestrator references the driver's disks (the orphan reconciler's
/// evidence that a disk is wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskReferences {
    /// The volume handles (`spec.csi.volumeHandle`) of this driver's PersistentVolumes,
    /// whatever their phase (a PV being deleted still references its disk).
    pub volumes: BTreeSet<String>,
    /// The snapshot handles of this driver's VolumeSnapshotContents (`status.snapshotHandle`,
    /// or `spec.source.snapshotHandle` of a pre-provisioned one); `None` when the
    /// orchestrator serves no VolumeSnapshotContents (snapshot disks are then never judged).
    pub snapshots: Option<BTreeSet<String>>,
}

/// The reasons of the Events the driver records: the one list. Every Event is about a
/// volume and is recorded on the PersistentVolumeClaim bound to the volume's
/// PersistentVolume (its `spec.claimRef`), or on the PersistentVolume when it has no claim.
pub mod reason {
    /// A publish was acknowledged: the volume is attached to a node (Normal; a repeated
    /// publish bumps the same Event's count).
    pub const VOLUME_ATTACHED: &str = "VolumeAttached";
    /// An unpublish was acknowledged: the volume is detached from a node (Normal).
    pub const VOLUME_DETACHED: &str = "VolumeDetached";
    /// A publish was refused: a single-node volume is attached to another node, or a
    /// multi-node volume cannot take another holder (Warning).
    pub const ATTACHMENT_CONFLICT: &str = "AttachmentConflict";
    /// A record whose Node or VolumeAttachment is gone was cleared (Warning).
    pub const STALE_ATTACHMENT_CLEARED: &str = "StaleAttachmentCleared";
    /// The orphan reconciler found a disk nothing references (Warning).
    pub const ORPHAN_VOLUME_FOUND: &str = "OrphanVolumeFound";
    /// The orphan reconciler deleted a disk after its grace period (Normal).
    pub const ORPHAN_VOLUME_DELETED: &str = "OrphanVolumeDeleted";
    /// A live migration started: a second node attached a multi-node block volume (Normal).
    pub const MIGRATION_STARTED: &str = "MigrationStarted";
    /// A live migration completed: the source node detached (Normal).
    pub const MIGRATION_COMPLETED: &str = "MigrationCompleted";
    /// A live migration failed: the target node detached (Warning).
    pub const MIGRATION_FAILED: &str = "MigrationFailed";
    /// Every reason, sorted.
    pub const ALL: &[&str] = &[
        ATTACHMENT_CONFLICT,
        MIGRATION_COMPLETED,
        MIGRATION_FAILED,
        MIGRATION_STARTED,
        ORPHAN_VOLUME_DELETED,
        ORPHAN_VOLUME_FOUND,
        STALE_ATTACHMENT_CLEARED,
        VOLUME_ATTACHED,
        VOLUME_DETACHED,
    ];
}

/// An Event about a volume, recorded on its claim (else its PV); a repeat of the same
/// event (same object, reason, type and message) bumps the recorded Event's count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// The volume the event is about.
    pub volume_id: VolumeId,
    /// Short machine-readable reason (one of [`reason::ALL`]).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// Warning (true) or Normal.
    pub warning: bool,
}

/// The orchestrator.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// Whether the Node object `node` exists, asked fresh (used where a stale "yes" would
    /// be unsafe: deciding that a holder's node is gone).
    async fn node_exists(&self, node: &NodeId) -> Result<bool, ClusterError>;
    /// Whether `node` exists; may answer "yes" from a recent positive answer (used for the
    /// NOT_FOUND check of the node a volume is published to, to save a request per publish).
    async fn node_known(&self, node: &NodeId) -> Result<bool, ClusterError> {
        self.node_exists(node).await
    }
    /// The NVMe host NQN the node published (annotation), if known; asked fresh: a Node
    /// re-created under the same name (a re-provisioned machine) carries another.
    async fn node_host_nqn(&self, node: &NodeId) -> Result<Option<String>, ClusterError>;
    /// What `node`'s kubelet reports in its Node's status, asked fresh; `None` when the
    /// Node is gone.
    async fn node_report(&self, node: &NodeId) -> Result<Option<NodeReport>, ClusterError>;
    /// Publishes `node`'s NVMe host NQN (the node plugin, at start-up) so that the
    /// controller's data-path fence can read it back with [`Cluster::node_host_nqn`].
    /// `host_nqn` is validated first (an invalid one is `Other`, nothing is sent).
    async fn set_node_host_nqn(&self, node: &NodeId, host_nqn: &str) -> Result<(), ClusterError>;
    /// VolumeAttachments of this driver, sorted by (volume, node); `None` when the
    /// orchestrator has no such objects (no Kubernetes), so there is nothing to cross-check.
    async fn volume_attachments(&self) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError>;
    /// Whether the orchestrator has a VolumeAttachment of this driver for (`volume`,
    /// `node`), in any state; `None` when it has no such objects (no Kubernetes). Asked
    /// fresh: a "no" clears an attachment record as detached by hand.
    async fn volume_attachment_exists(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<bool>, ClusterError> {
        Ok(self.volume_attachments().await?.map(|all| {
            all.iter()
                .any(|va| va.volume_id == *volume && va.node_id == *node)
        }))
    }
    /// The VolumeAttachments of this driver on `node` (the node plugin's orphan sweep),
    /// sorted by volume; `None` as for [`Cluster::volume_attachments`].
    async fn volume_attachments_on(
        &self,
        node: &NodeId,
    ) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
        Ok(self
            .volume_attachments()
            .await?
            .map(|vas| vas.into_iter().filter(|va| va.node_id == *node).collect()))
    }
    /// The VolumeAttachment of this driver for (`volume`, `node`), if any (`Some(None)`:
    /// none); `None` when the orchestrator has no such objects. Asked fresh: the attachment
    /// reconciler clears a record on this answer.
    async fn volume_attachment(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<Option<VolumeAttachmentInfo>>, ClusterError> {
        Ok(self.volume_attachments().await?.map(|all| {
            all.into_iter()
                .find(|va| va.volume_id == *volume && va.node_id == *node)
        }))
    }
    /// What references the driver's disks; `None` when the orchestrator keeps no such
    /// objects (no Kubernetes: nothing can be judged an orphan). With `fresh`, read from
    /// the API now (a deletion is decided only on a fresh answer); without, it may come
    /// from a watch cache.
    async fn disk_references(&self, fresh: bool) -> Result<Option<DiskReferences>, ClusterError> {
        let _ = fresh;
        Ok(None)
    }
    /// Records an event (on the volume's claim, else its PV), aggregating repeats; best
    /// effort: the callers log a failure and carry on.
    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError>;
}
