//! The `Rds` port: file-backed disks on the ROSE Data Server, in storage terms.
//!
//! Adapters: RouterOS over SSH (production), the RouterOS emulator (embedded default and
//! simulation). A disk is identified by its slot; volumes and snapshots are both disks (a
//! snapshot is a non-exported `copy-from` copy).

use async_trait::async_trait;

/// Errors of the `Rds` port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdsError {
    /// The disk, file or source does not exist.
    #[error("not found on the RDS: {0}")]
    NotFound(String),
    /// A disk with this slot (or a file at this path) already exists.
    #[error("already exists on the RDS: {0}")]
    AlreadyExists(String),
    /// RouterOS (or our renderer) refused the command as invalid.
    #[error("rejected by the RDS: {0}")]
    Rejected(String),
    /// Not enough free space in the pool.
    #[error("not enough space on the RDS: {0}")]
    NoSpace(String),
    /// The RDS cannot be reached or did not answer; the call may be retried.
    #[error("RDS unavailable: {0}")]
    Unavailable(String),
    /// A command did not finish in time; it may or may not have been applied.
    #[error("RDS command timed out: {0}")]
    Timeout(String),
    /// The RDS presented a host key that does not match the pinned one.
    #[error("RDS host key verification failed: {0}")]
    HostKey(String),
    /// The RDS answered with output we could not understand.
    #[error("unexpected output from the RDS: {0}")]
    Protocol(String),
}

/// NVMe/TCP export settings of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeExport {
    /// TCP port of the NVMe/TCP target (RouterOS default 4420).
    pub port: u16,
    /// Subsystem NQN the disk is exported under.
    pub nqn: String,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Disk slot (the volume or snapshot id).
    pub slot: String,
    /// Exact size in bytes. For a copy, the size of the new disk (≥ the source's).
    pub size_bytes: u64,
    /// Export over NVMe/TCP (volumes) or not (snapshots).
    pub export: Option<NvmeExport>,
    /// Create as a copy of this slot (`copy-from`): snapshot, restore or clone.
    pub copy_from: Option<String>,
    /// A note kept with the disk entry (e.g. a snapshot's source volume).
    pub comment: Option<String>,
    /// The host NQN the export admits from the start (`None`: any host). The data-path
    /// fence creates volumes parked, so no host can connect before a publish.
    pub allowed_host_nqn: Option<String>,
}

/// A disk as the RDS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Disk slot.
    pub slot: String,
    /// Backing file path on the RDS.
    pub file_path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Export, when exported over NVMe/TCP.
    pub export: Option<NvmeExport>,
    /// Host NQN allowed to connect (the data-path fence), when set.
    pub allowed_host_nqn: Option<String>,
    /// Creation time of the backing file, seconds since the Unix epoch, when known.
    pub created_unix: Option<i64>,
    /// The note kept with the disk entry, if any.
    pub comment: Option<String>,
}

/// Size and free space of the pool volumes are carved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Total bytes.
    pub size_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
}

/// The ROSE Data Server, as the controller needs it.
#[async_trait]
pub trait Rds: Send + Sync + 'static {
    /// Cheap liveness check of the backend (used by Probe).
    async fn ping(&self) -> Result<(), RdsError>;
    /// Creates a file-backed disk. An existing slot is `AlreadyExists`; callers observe
    /// first with [`Rds::get_disk`] for idempotency.
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError>;
    /// The disk in `slot`, if any.
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError>;
    /// All disks whose slot starts with `slot_prefix`, sorted by slot. Only disks this
    /// driver manages (backing file under its volume path) are listed.
    async fn list_disks(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError>;
    /// Sets the exact size of a disk (grow only; the caller checks).
    async fn resize_disk(&self, slot: &str, size_bytes: u64) -> Result<Disk, RdsError>;
    /// Removes the disk entry AND its backing file. Absent already is success.
    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError>;
    /// Pool capacity.
    async fn capacity(&self) -> Result<PoolCapacity, RdsError>;
    /// Sets (or with `None` clears) the host NQN allowed to connect to the disk's export.
    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError>;

    /// Creates snapshot `slot`: a non-exported copy of disk `source`, of the same size,
    /// carrying `comment`. `NotFound` when the source is absent; `AlreadyExists` when
    /// `slot` is taken.
    async fn create_snapshot(
        &self,
        source: &str,
        slot: &str,
        comment: &str,
    ) -> Result<Disk, RdsError> {
        let src = self
            .get_disk(source)
            .await?
            .ok_or_else(|| RdsError::NotFound(format!("snapshot source disk slot={source}")))?;
        self.create_disk(&DiskSpec {
            slot: slot.to_string(),
            size_bytes: src.size_bytes,
            export: None,
            copy_from: Some(source.to_string()),
            comment: Some(comment.to_string()),
            allowed_host_nqn: None,
        })
        .await
    }

    /// Snapshots (non-exported disks) whose slot starts with `slot_prefix`, sorted by slot.
    async fn list_snapshots(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        let mut disks = self.list_disks(slot_prefix).await?;
        disks.retain(|d| d.export.is_none());
        Ok(disks)
    }

    /// Deletes a snapshot (its disk entry and file). Absent already is success.
    async fn delete_snapshot(&self, slot: &str) -> Result<(), RdsError> {
        self.delete_disk(slot).await
    }

    /// Creates volume `spec.slot` as a copy of disk `source` (a volume or a snapshot):
    /// restore and clone. `spec.size_bytes` must be at least the source's size.
    async fn clone_disk(&self, source: &str, spec: &DiskSpec) -> Result<Disk, RdsError> {
        self.create_disk(&DiskSpec {
            copy_from: Some(source.to_string()),
            comment: None,
            ..spec.clone()
        })
        .await
    }
}
