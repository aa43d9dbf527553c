//! Embedded `Cluster`: a cluster of known nodes with no API server. Nodes are the plugin's
//! own node id plus any registered later (e.g. by NodeGetInfo in the same process);
//! events go to the log.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::ports::cluster::{
    Cluster, ClusterError, ClusterEvent, DiskReferences, NodeReport, VolumeAttachmentInfo,
};
use crate::types::NodeId;

/// Events kept for [`LocalCluster::events`].
const MAX_EVENTS: usize = 1024;

/// Known nodes and their host NQNs.
#[derive(Debug, Default)]
pub struct LocalCluster {
    nodes: Mutex<BTreeMap<NodeId, Option<String>>>,
    events: Mutex<Vec<ClusterEvent>>,
    attachments: Mutex<Option<Vec<VolumeAttachmentInfo>>>,
    references: Mutex<Option<DiskReferences>>,
    /// Reports set by [`LocalCluster::set_node_report`]; a node without one is ready and
    /// uses nothing.
    reports: Mutex<BTreeMap<NodeId, NodeReport>>,
}

impl LocalCluster {
    /// A cluster of `nodes`.
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            nodes: Mutex::new(nodes.into_iter().map(|n| (n, None)).collect()),
            ..Self::default()
        }
    }

    /// Events recorded so far, oldest first.
    pub fn events(&self) -> Vec<ClusterEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pretends the orchestrator has these VolumeAttachments (tests); `None` (the default):
    /// it has none to cross-check against.
    pub fn set_volume_attachments(&self, vas: Option<Vec<VolumeAttachmentInfo>>) {
        *self.attachments.lock().unwrap_or_else(|p| p.into_inner()) = vas;
    }

    /// Pretends the orchestrator has these references to disks (tests); `None` (the
    /// default): it keeps no PersistentVolumes, so nothing is an orphan.
    pub fn set_disk_references(&self, refs: Option<DiskReferences>) {
        *self.references.lock().unwrap_or_else(|p| p.into_inner()) = refs;
    }

    /// Adds (or updates) a node and its host NQN.
    pub fn register_node(&self, node: NodeId, host_nqn: Option<String>) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, host_nqn);
    }

    /// Pretends `node`'s kubelet reports `report` (tests: a node that stopped reporting, or
    /// still uses a volume).
    pub fn set_node_report(&self, node: NodeId, report: NodeReport) {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, report);
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

    /// No kubelet reports here: a known node is ready and uses nothing, unless a report
    /// was set.
    async fn node_report(&self, node: &NodeId) -> Result<Option<NodeReport>, ClusterError> {
        if !self.node_exists(node).await? {
            return Ok(None);
        }
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Some(reports.get(node).cloned().unwrap_or(NodeReport {
            ready: true,
            volumes_in_use: Vec::new(),
        })))
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

    async fn set_node_host_nqn(&self, node: &NodeId, host_nqn: &str) -> Result<(), ClusterError> {
        let nqn = crate::types::Nqn::new(host_nqn)
            .map_err(|e| ClusterError::Other(format!("host NQN of node {node}: {e}")))?;
        self.register_node(node.clone(), Some(nqn.as_str().to_owned()));
        Ok(())
    }

    async fn volume_attachments(&self) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
        // No orchestrator: the attachment store is the only record (unless a test says).
        Ok(self
            .attachments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }

    async fn disk_references(&self, _fresh: bool) -> Result<Option<DiskReferences>, ClusterError> {
        Ok(self
            .references
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }

    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        if event.warning {
            tracing::warn!(volume_id = %event.volume_id, reason = %event.reason, "{}", event.message);
        } else {
            tracing::info!(volume_id = %event.volume_id, reason = %event.reason, "{}", event.message);
        }
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        // Keep the most recent ones only: memory stays bounded in a long-running plugin.
        if events.len() >= MAX_EVENTS {
            events.remove(0);
        }
        events.push(event.clone());
        Ok(())
    }
}
