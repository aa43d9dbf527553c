//! The Events the driver tried to record and could not (the API was unreachable or
//! failing): the `Cluster` port of every controller is wrapped so that the events checker
//! (`crate::checkers::events`) can tell an Event that was never attempted from one the API
//! refused. Events are best effort; an acknowledged publish whose VolumeAttached Event is
//! neither in the API server nor among these failures was never reported.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rds_csi::ports::Cluster;
use rds_csi::ports::cluster::{ClusterError, ClusterEvent, DiskReferences, VolumeAttachmentInfo};
use rds_csi::types::{NodeId, VolumeId};

/// (volume, reason, message) of the Events whose recording failed.
#[derive(Debug, Default)]
pub struct EventLog {
    failed: Mutex<BTreeSet<(String, String, String)>>,
}

impl EventLog {
    /// Whether recording this event failed at least once.
    pub fn failed(&self, volume: &str, reason: &str, message: &str) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(volume.to_string(), reason.to_string(), message.to_string()))
    }
}

/// Wraps `inner`, noting every failed `record_event` in `log`.
pub fn audit(inner: Arc<dyn Cluster>, log: Arc<EventLog>) -> Arc<dyn Cluster> {
    Arc::new(Audited { inner, log })
}

struct Audited {
    inner: Arc<dyn Cluster>,
    log: Arc<EventLog>,
}

#[async_trait]
impl Cluster for Audited {
    async fn node_exists(&self, node: &NodeId) -> Result<bool, ClusterError> {
        self.inner.node_exists(node).await
    }
    async fn node_known(&self, node: &NodeId) -> Result<bool, ClusterError> {
        self.inner.node_known(node).await
    }
    async fn node_report(
        &self,
        node: &NodeId,
    ) -> Result<Option<rds_csi::ports::cluster::NodeReport>, ClusterError> {
        self.inner.node_report(node).await
    }
    async fn node_host_nqn(&self, node: &NodeId) -> Result<Option<String>, ClusterError> {
        self.inner.node_host_nqn(node).await
    }
    async fn set_node_host_nqn(&self, node: &NodeId, host_nqn: &str) -> Result<(), ClusterError> {
        self.inner.set_node_host_nqn(node, host_nqn).await
    }
    async fn volume_attachments(&self) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
        self.inner.volume_attachments().await
    }
    async fn volume_attachment_exists(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<bool>, ClusterError> {
        self.inner.volume_attachment_exists(volume, node).await
    }
    async fn volume_attachments_on(
        &self,
        node: &NodeId,
    ) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
        self.inner.volume_attachments_on(node).await
    }
    async fn volume_attachment(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<Option<VolumeAttachmentInfo>>, ClusterError> {
        self.inner.volume_attachment(volume, node).await
    }
    async fn disk_references(&self, fresh: bool) -> Result<Option<DiskReferences>, ClusterError> {
        self.inner.disk_references(fresh).await
    }
    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        let result = self.inner.record_event(event).await;
        if result.is_err() {
            self.log
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((
                    event.volume_id.to_string(),
                    event.reason.clone(),
                    event.message.clone(),
                ));
        }
        result
    }
}
