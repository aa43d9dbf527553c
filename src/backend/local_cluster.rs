//! Embedded `Cluster`: a cluster of known nodes with no API server. Nodes are the plugin's
//! own node id plus any registered later (e.g. by NodeGetInfo in the same process);
//! events go to the log.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::ports::cluster::{Cluster, ClusterError, ClusterEvent, VolumeAttachmentInfo};
use crate::types::NodeId;

/// Known nodes and their host NQNs.
#[derive(Debug, Default)]
pub struct LocalCluster {
    nodes: Mutex<BTreeMap<NodeId, Option<String>>>,
}

impl LocalCluster {
    /// A cluster of `nodes`.
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            nodes: Mutex::new(nodes.into_iter().map(|n| (n, None)).collect()),
        }
    }

    /// Adds (or updates) a node and its host NQN.
    pub fn register_node(&self, node: NodeId, host_nqn: Option<String>) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, host_nqn);
    }

    /// Removes a node (as if its Node object was deleted).
    pub fn remove_node(&self, node: &NodeId) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }
}

#[async_trait]
impl Cluster for LocalCluster {
    async fn node_exists(&self, node: &NodeId) -> Result<bool, ClusterError> {
        Ok(self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(node))
    }

    async fn node_host_nqn(&self, node: &NodeId) -> Result<Option<String>, ClusterError> {
        Ok(self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
            .flatten())
    }

    async fn volume_attachments(&self) -> Result<Vec<VolumeAttachmentInfo>, ClusterError> {
        // No orchestrator: the attachment store is the only record.
        Ok(Vec::new())
    }

    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        if event.warning {
            tracing::warn!(volume_id = %event.volume_id, reason = %event.reason, "{}", event.message);
        } else {
            tracing::info!(volume_id = %event.volume_id, reason = %event.reason, "{}", event.message);
        }
        Ok(())
    }
}
