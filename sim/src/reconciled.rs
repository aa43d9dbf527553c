//! The orphan volume reconciler's deletions, judged as they are sent: the `Rds` port of
//! every controller replica is wrapped so that a disk deleted outside any CSI call (by the
//! reconciler) is checked against the world at that moment. A disk a PersistentVolume or a
//! VolumeSnapshotContent references, or whose CreateVolume the CO has in flight, must never
//! be deleted; what wants it is decided by the world ([`Wanted`]), and every deletion is
//! written to the trace.

use std::sync::Arc;

use async_trait::async_trait;
use rds_csi::ports::Rds;
use rds_csi::ports::rds::{Disk, DiskEntry, DiskSpec, DiskTraffic, PoolCapacity, RdsError};

/// Why the disk in a slot is wanted right now (`None`: nothing wants it).
pub type Wanted = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;
/// The CSI method running on the current task (`None`: background work).
pub type Method = Arc<dyn Fn() -> Option<String> + Send + Sync>;
/// Where a deletion is reported: (the slot, why it was wanted, if it was).
pub type Report = Arc<dyn Fn(&str, Option<String>) + Send + Sync>;

/// Wraps `inner`: every background deletion is judged by `wanted` and reported.
pub fn judge_deletes(
    inner: Arc<dyn Rds>,
    wanted: Wanted,
    method: Method,
    report: Report,
) -> Arc<dyn Rds> {
    Arc::new(Judged {
        inner,
        wanted,
        method,
        report,
    })
}

struct Judged {
    inner: Arc<dyn Rds>,
    wanted: Wanted,
    method: Method,
    report: Report,
}

impl Judged {
    fn judge(&self, slot: &str) {
        if (self.method)().is_none() {
            (self.report)(slot, (self.wanted)(slot));
        }
    }
}

#[async_trait]
impl Rds for Judged {
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
        self.judge(slot);
        self.inner.delete_disk(slot).await
    }
    async fn remove_disk(&self, disk: &DiskEntry) -> Result<(), RdsError> {
        self.judge(&disk.slot);
        self.inner.remove_disk(disk).await
    }
    async fn remove_leftover_file(&self, slot: &str) -> Result<(), RdsError> {
        self.judge(slot);
        self.inner.remove_leftover_file(slot).await
    }
    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        self.inner.capacity().await
    }
    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.inner.set_allowed_host(slot, host_nqn).await
    }
    async fn fence_disk(&self, disk: &DiskEntry, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.inner.fence_disk(disk, host_nqn).await
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
        self.inner.create_snapshot(source, slot, comment).await
    }
    async fn list_snapshots(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        self.inner.list_snapshots(slot_prefix).await
    }
}
