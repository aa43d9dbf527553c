//! Attachment vocabulary: the record (re-exported from the store port), the validated
//! arguments of publish/unpublish, and the manager's configuration.

use std::collections::BTreeMap;

pub use crate::ports::store::AttachmentRecord;
use crate::types::{AccessMode, NodeId, VolumeId};

/// Holders of one volume, by node.
pub type Holders = BTreeMap<NodeId, AttachmentRecord>;

/// Validated ControllerPublishVolume arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishArgs {
    /// Volume to publish.
    pub volume_id: VolumeId,
    /// Node to publish to.
    pub node_id: NodeId,
    /// Access mode, reduced to what fencing needs.
    pub access_mode: AccessMode,
    /// Publish read-only.
    pub readonly: bool,
    /// Block volume (no filesystem).
    pub block: bool,
    /// Filesystem type for mount volumes (from the capability, else the volume context).
    pub fs_type: Option<String>,
    /// NVMe/TCP address the node should connect to (volume context `nvmeAddress`).
    pub nvme_address: Option<String>,
}

/// Validated ControllerUnpublishVolume arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishArgs {
    /// Volume to unpublish.
    pub volume_id: VolumeId,
    /// Node to unpublish from; `None`: from every node (the CSI spec's unset `node_id`).
    pub node_id: Option<NodeId>,
}

/// How the manager behaves; fixed for the life of a plugin instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachmentConfig {
    /// Most volumes attached to one node (0: no limit).
    pub max_volumes_per_node: u64,
    /// Data-path fence: publish restricts the disk's NVMe/TCP export to the node's host NQN
    /// (`nvme-tcp-server-allow-host-name`), unpublish lifts the restriction.
    pub data_path_fence: bool,
}
