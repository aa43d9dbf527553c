//! Planted bugs for the proof-of-power tests: faulty test-only wrappers at the port
//! boundaries (the driver has no switch for them). A normal run plants none. One bug sits
//! at the serving boundary instead: [`Bug::ReissuedPublishSkipsLock`] serves re-issued
//! calls from a second service instance with its own in-flight table (see
//! `crate::world`), as a driver whose per-volume lock a re-issued call skips would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rds_csi::ports::cluster::{ClusterError, ClusterEvent, DiskReferences, VolumeAttachmentInfo};
use rds_csi::ports::initiator::{Connection, InitiatorError, NvmeTarget};
use rds_csi::ports::rds::{Disk, DiskEntry, DiskSpec, DiskTraffic, PoolCapacity, RdsError};
use rds_csi::ports::store::{AttachmentRecord, StoreError};
use rds_csi::ports::watch::Change;
use rds_csi::ports::{AttachmentStore, Cluster, ClusterWatch, Initiator, Rds};
use rds_csi::routeros::render::CommandLine;
use rds_csi::routeros::transport::Transport;
use rds_csi::types::{NodeId, VolumeId};

use crate::options::Bug;

/// A store that acknowledges a write at once and persists it later (lost if the
/// controller crashes meanwhile), or one that ignores the precondition of
/// `write_volume_if`.
struct BuggyStore {
    inner: Arc<dyn AttachmentStore>,
    bug: Bug,
}

#[async_trait]
impl AttachmentStore for BuggyStore {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        if self.bug == Bug::AckBeforePersist {
            let inner = Arc::clone(&self.inner);
            let (volume, holders) = (volume.clone(), holders.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = inner.write_volume(&volume, &holders).await;
            });
            return Ok(());
        }
        self.inner.write_volume(volume, holders).await
    }
    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        match self.bug {
            Bug::AckBeforePersist | Bug::DropPrecondition => {
                self.write_volume(volume, holders).await
            }
            _ => self.inner.write_volume_if(volume, previous, holders).await,
        }
    }
    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.inner.read_volume(volume).await
    }
    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.inner.load_all().await
    }
}

/// A cluster that lies when asked fresh: with [`Bug::NodeGoneWhileAlive`] every node is
/// gone (while they are alive); with [`Bug::ThirdNodeAttaches`] a VM disk
/// ([`crate::options::VM_PREFIX`]) has no VolumeAttachment (its holders look detached by
/// hand, so a third node is let in).
struct LyingCluster {
    inner: Arc<dyn Cluster>,
    bug: Bug,
}

#[async_trait]
impl Cluster for LyingCluster {
    async fn node_exists(&self, node: &NodeId) -> Result<bool, ClusterError> {
        if self.bug == Bug::NodeGoneWhileAlive {
            return Ok(false);
        }
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
        if self.bug == Bug::ThirdNodeAttaches
            && volume.as_str().starts_with(crate::options::VM_PREFIX)
        {
            return Ok(Some(false));
        }
        self.inner.volume_attachment_exists(volume, node).await
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
        self.inner.record_event(event).await
    }
}

/// A cluster that answers "recorded" for a VolumeAttached Event without recording it.
struct DropsAttached {
    inner: Arc<dyn Cluster>,
}

#[async_trait]
impl Cluster for DropsAttached {
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
        if event.reason == rds_csi::ports::cluster::reason::VOLUME_ATTACHED {
            return Ok(());
        }
        self.inner.record_event(event).await
    }
}

/// A cluster whose answer to the orphan reconciler names no PersistentVolume and no
/// VolumeSnapshotContent.
struct ReferencesLost {
    inner: Arc<dyn Cluster>,
}

#[async_trait]
impl Cluster for ReferencesLost {
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
        Ok(self
            .inner
            .disk_references(fresh)
            .await?
            .map(|_| DiskReferences {
                volumes: Default::default(),
                snapshots: Some(Default::default()),
            }))
    }
    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        self.inner.record_event(event).await
    }
}

/// The watches with `bug` planted, if it is one of theirs: [`Bug::OrphanReferencesLost`]
/// loses the references the watches' caches hold, as it loses the API's.
pub fn wrap_watch(inner: Arc<dyn ClusterWatch>, bug: Option<Bug>) -> Arc<dyn ClusterWatch> {
    match bug {
        Some(Bug::OrphanReferencesLost) => Arc::new(WatchedReferencesLost { inner }),
        _ => inner,
    }
}

struct WatchedReferencesLost {
    inner: Arc<dyn ClusterWatch>,
}

#[async_trait]
impl ClusterWatch for WatchedReferencesLost {
    fn start(&self) {
        self.inner.start();
    }
    async fn changes(&self) -> Vec<Change> {
        self.inner.changes().await
    }
    fn volume_attachments(&self) -> Option<Vec<VolumeAttachmentInfo>> {
        self.inner.volume_attachments()
    }
    fn disk_references(&self) -> Option<DiskReferences> {
        self.inner.disk_references().map(|_| DiskReferences {
            volumes: Default::default(),
            snapshots: Some(Default::default()),
        })
    }
}

/// Names the CSI method running on the current task (`None`: none), for bugs that hit
/// one RPC only.
pub type CurrentMethod = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A store whose reads during DeleteVolume find no holder: DeleteVolume does not check
/// who still holds the volume.
struct BlindDelete {
    inner: Arc<dyn AttachmentStore>,
    method: CurrentMethod,
}

#[async_trait]
impl AttachmentStore for BlindDelete {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.inner.write_volume(volume, holders).await
    }
    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.inner.write_volume_if(volume, previous, holders).await
    }
    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        if (self.method)().as_deref() == Some("DeleteVolume") {
            return Ok(Vec::new());
        }
        self.inner.read_volume(volume).await
    }
    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.inner.load_all().await
    }
}

/// The store with `bug` planted, if it is a store bug; `method` names the running RPC.
pub fn wrap_store(
    inner: Arc<dyn AttachmentStore>,
    bug: Option<Bug>,
    method: CurrentMethod,
) -> Arc<dyn AttachmentStore> {
    match bug {
        Some(bug @ (Bug::AckBeforePersist | Bug::DropPrecondition)) => {
            Arc::new(BuggyStore { inner, bug })
        }
        Some(Bug::DeleteSkipsHolders) => Arc::new(BlindDelete { inner, method }),
        _ => inner,
    }
}

/// The cluster with `bug` planted, if it is a cluster bug.
pub fn wrap_cluster(inner: Arc<dyn Cluster>, bug: Option<Bug>) -> Arc<dyn Cluster> {
    match bug {
        Some(bug @ (Bug::NodeGoneWhileAlive | Bug::ThirdNodeAttaches)) => {
            Arc::new(LyingCluster { inner, bug })
        }
        Some(Bug::AttachedEventDropped) => Arc::new(DropsAttached { inner }),
        Some(Bug::OrphanReferencesLost) => Arc::new(ReferencesLost { inner }),
        _ => inner,
    }
}

/// A link to the RDS that takes a lost reply (no answer, or the connection dropped
/// mid-command) as a failure and sends the command again at once, answering with the
/// second reply: the first attempt may have been applied, so an add comes back as
/// "already exists" and the adapter never gets to observe what happened.
struct BlindResend {
    inner: Arc<dyn Transport>,
}

#[async_trait]
impl Transport for BlindResend {
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        match self.inner.run(cmd).await {
            Err(RdsError::Timeout(_) | RdsError::Unavailable(_)) => self.inner.run(cmd).await,
            answer => answer,
        }
    }
}

/// The link to the RDS with `bug` planted, if it is an RDS bug.
pub fn wrap_transport(inner: Arc<dyn Transport>, bug: Option<Bug>) -> Arc<dyn Transport> {
    match bug {
        Some(Bug::BlindRdsRetry) => Arc::new(BlindResend { inner }),
        _ => inner,
    }
}

/// A node initiator with a node bug: it drops the reconnect tunables of every connect (the
/// kernel's defaults apply), or it remembers the first device path it saw for each volume
/// and answers with it as long as some device of the driver has that path.
struct BuggyInitiator {
    inner: Arc<dyn Initiator>,
    bug: Bug,
    remembered: Mutex<BTreeMap<String, PathBuf>>,
}

impl BuggyInitiator {
    /// The remembered path of `nqn` if a device of the driver still has it; otherwise
    /// `fresh()`, remembered if nothing was.
    async fn recall(
        &self,
        nqn: &str,
        fresh: Result<Option<PathBuf>, InitiatorError>,
    ) -> Result<Option<PathBuf>, InitiatorError> {
        let old = self
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(nqn)
            .cloned();
        if let Some(old) = old
            && self.inner.nqn_of_device(&old).await?.is_some()
        {
            return Ok(Some(old));
        }
        let fresh = fresh?;
        if let Some(p) = &fresh {
            self.remembered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(nqn.to_string())
                .or_insert_with(|| p.clone());
        }
        Ok(fresh)
    }
}

#[async_trait]
impl Initiator for BuggyInitiator {
    async fn host_nqn(&self) -> Result<String, InitiatorError> {
        self.inner.host_nqn().await
    }
    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf, InitiatorError> {
        match self.bug {
            Bug::KernelReconnectDefaults => {
                let target = NvmeTarget {
                    ctrl_loss_tmo: None,
                    reconnect_delay: None,
                    ..target.clone()
                };
                self.inner.connect(&target).await
            }
            _ => {
                let fresh = self.inner.connect(target).await.map(Some);
                Ok(self.recall(&target.nqn, fresh).await?.unwrap_or_default())
            }
        }
    }
    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.inner.disconnect(nqn).await
    }
    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        let fresh = self.inner.find_device(nqn).await;
        match self.bug {
            Bug::RememberedDevicePath => self.recall(nqn, fresh).await,
            _ => fresh,
        }
    }
    async fn nqn_of_device(&self, device: &Path) -> Result<Option<String>, InitiatorError> {
        self.inner.nqn_of_device(device).await
    }
    async fn connections(&self) -> Result<Vec<Connection>, InitiatorError> {
        self.inner.connections().await
    }
    async fn rescan(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.inner.rescan(nqn).await
    }
    async fn apply_reconnect(&self, target: &NvmeTarget) -> Result<bool, InitiatorError> {
        match self.bug {
            // The node never hands its reconnect settings to the kernel.
            Bug::KernelReconnectDefaults => Ok(false),
            _ => self.inner.apply_reconnect(target).await,
        }
    }
}

/// The node's initiator with `bug` planted, if it is a node bug.
pub fn wrap_initiator(inner: Arc<dyn Initiator>, bug: Option<Bug>) -> Arc<dyn Initiator> {
    match bug {
        Some(bug @ (Bug::KernelReconnectDefaults | Bug::RememberedDevicePath)) => {
            Arc::new(BuggyInitiator {
                inner,
                bug,
                remembered: Mutex::new(BTreeMap::new()),
            })
        }
        _ => inner,
    }
}

/// An RDS port with an RDS-side bug: `UnpublishOpensExport` opens an export to any host
/// where the driver parks it (an unpublish that lifts the fence rather than parking it);
/// `NamelessRds` keeps a new snapshot's note without its `:n.` field (the CSI name the
/// driver records when the snapshot id is derived from the name): the copy exists, but
/// nothing on the RDS says which name it was made for.
struct BuggyRds {
    inner: Arc<dyn Rds>,
    bug: Bug,
}

impl BuggyRds {
    /// The allow-list value the RDS keeps when `host_nqn` is asked for.
    fn kept<'a>(&self, host_nqn: Option<&'a str>) -> Option<&'a str> {
        match self.bug {
            Bug::UnpublishOpensExport => {
                host_nqn.filter(|h| !rds_csi::attachment::fence::is_parked(Some(h)))
            }
            _ => host_nqn,
        }
    }
}

/// `note` without its `:n.<name>` field.
fn without_name(note: &str) -> String {
    note.split(':')
        .filter(|field| !field.starts_with("n."))
        .collect::<Vec<_>>()
        .join(":")
}

#[async_trait]
impl Rds for BuggyRds {
    async fn ping(&self) -> Result<(), RdsError> {
        self.inner.ping().await
    }
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError> {
        self.inner.create_disk(spec).await
    }
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError> {
        self.inner.get_disk(slot).await
    }
    async fn find_disk(&self, slot: &str) -> Result<Option<DiskEntry>, RdsError> {
        self.inner.find_disk(slot).await
    }
    async fn find_disks(&self, slots: &[&str]) -> Result<Vec<DiskEntry>, RdsError> {
        self.inner.find_disks(slots).await
    }
    async fn sized(&self, disk: &DiskEntry) -> Result<Disk, RdsError> {
        self.inner.sized(disk).await
    }
    async fn list_disks(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        self.inner.list_disks(slot_prefix).await
    }
    async fn resize_disk(&self, slot: &str, size_bytes: u64) -> Result<Disk, RdsError> {
        self.inner.resize_disk(slot, size_bytes).await
    }
    async fn grow_disk(&self, disk: &Disk, size_bytes: u64) -> Result<Disk, RdsError> {
        self.inner.grow_disk(disk, size_bytes).await
    }
    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError> {
        self.inner.delete_disk(slot).await
    }
    async fn remove_disk(&self, disk: &DiskEntry) -> Result<(), RdsError> {
        self.inner.remove_disk(disk).await
    }
    async fn remove_leftover_file(&self, slot: &str) -> Result<(), RdsError> {
        self.inner.remove_leftover_file(slot).await
    }
    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        self.inner.capacity().await
    }
    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.inner.set_allowed_host(slot, self.kept(host_nqn)).await
    }
    async fn fence_disk(&self, disk: &DiskEntry, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.inner.fence_disk(disk, self.kept(host_nqn)).await
    }
    async fn set_comment(&self, disk: &DiskEntry, comment: &str) -> Result<(), RdsError> {
        self.inner.set_comment(disk, comment).await
    }
    async fn disk_traffic(&self, slot: &str) -> Result<DiskTraffic, RdsError> {
        self.inner.disk_traffic(slot).await
    }
    async fn create_snapshot(
        &self,
        source: &str,
        slot: &str,
        comment: &str,
    ) -> Result<Disk, RdsError> {
        let comment = match self.bug {
            Bug::NamelessRds => without_name(comment),
            _ => comment.to_string(),
        };
        self.inner.create_snapshot(source, slot, &comment).await
    }
    async fn list_snapshots(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        self.inner.list_snapshots(slot_prefix).await
    }
}

/// The RDS port with `bug` planted, if it is an RDS bug.
pub fn wrap_rds(inner: Arc<dyn Rds>, bug: Option<Bug>) -> Arc<dyn Rds> {
    match bug {
        Some(bug @ (Bug::UnpublishOpensExport | Bug::NamelessRds)) => {
            Arc::new(BuggyRds { inner, bug })
        }
        _ => inner,
    }
}
