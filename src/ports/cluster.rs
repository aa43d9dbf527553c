//! The `Cluster` port: what the controller asks of the orchestrator (and what the node asks
//! and tells it: the VolumeAttachments of the node, its NVMe host NQN).
//!
//! Production: the Kubernetes API (Nodes, VolumeAttachments, Events). Embedded default: a
//! local cluster of this one node.

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

/// The reasons of the events the driver records: one list.
pub mod reason {
    /// A publish refused because the volume is attached elsewhere (single-node) or to two
    /// nodes already (a migrating multi-node volume). On the PersistentVolume.
    pub const ATTACH_FENCED: &str = "AttachFenced";
    /// A record whose node or VolumeAttachment is gone was cleared. On the PV.
    pub const STALE_ATTACHMENT_CLEARED: &str = "StaleAttachmentCleared";
    /// A live migration started (a second node attached a multi-node block volume). On the
    /// PersistentVolumeClaim.
    pub const MIGRATION_STARTED: &str = "MigrationStarted";
    /// A live migration completed (the source node detached). On the PVC.
    pub const MIGRATION_COMPLETED: &str = "MigrationCompleted";
    /// A live migration failed (the target node detached). On the PVC.
    pub const MIGRATION_FAILED: &str = "MigrationFailed";
    /// Every reason, sorted.
    pub const ALL: &[&str] = &[
        ATTACH_FENCED,
        MIGRATION_COMPLETED,
        MIGRATION_FAILED,
        MIGRATION_STARTED,
        STALE_ATTACHMENT_CLEARED,
    ];
}

/// Which object an event is recorded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSubject {
    /// The volume's PersistentVolume.
    Volume,
    /// The PersistentVolumeClaim bound to the volume's PV (its `spec.claimRef`); the PV
    /// when it has none.
    Claim,
}

/// An event to record on an object (e.g. a fenced publish).
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
    /// The object it is recorded on.
    pub subject: EventSubject,
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
    /// Records an event; best effort.
    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError>;
}
