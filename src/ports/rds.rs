//! The `Rds` port: file-backed disks on the ROSE Data Server, in storage terms.
//!
//! Adapters: RouterOS over SSH (production), the RouterOS emulator (embedded default and
//! simulation). A disk is identified by its slot; volumes and snapshots are both disks (a
//! snapshot is a non-exported `copy-from` copy).
//!
//! Every call costs round trips to the RDS (one per RouterOS command over SSH), so the port
//! offers the cheap observation too: [`Rds::find_disk`] is one `/disk print` (the entry:
//! export, file, comment); [`Rds::get_disk`] adds the backing file's exact size and
//! creation time (a second command). Writes that act on a disk the caller has just observed
//! take that observation instead of reading it again.

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

/// A disk entry as one `/disk print` shows it: everything but the exact size (which
/// `/disk` may print rounded to a tenth of a unit) and the file's creation time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    /// Disk slot.
    pub slot: String,
    /// Backing file path on the RDS.
    pub file_path: String,
    /// Export, when exported over NVMe/TCP.
    pub export: Option<NvmeExport>,
    /// Host NQN allowed to connect (the data-path fence), when set.
    pub allowed_host_nqn: Option<String>,
    /// The note kept with the disk entry, if any.
    pub comment: Option<String>,
    /// The size as `/disk` printed it (possibly rounded), when it did.
    pub printed_size_bytes: Option<u64>,
}

impl From<Disk> for DiskEntry {
    fn from(d: Disk) -> Self {
        Self {
            slot: d.slot,
            file_path: d.file_path,
            export: d.export,
            allowed_host_nqn: d.allowed_host_nqn,
            comment: d.comment,
            printed_size_bytes: Some(d.size_bytes),
        }
    }
}

/// Size and free space of the pool volumes are carved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Total bytes.
    pub size_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
}

/// A disk's I/O at one moment, as `/disk monitor-traffic ... once` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DiskTraffic {
    /// Read operations per second.
    pub read_ops_per_second: f64,
    /// Write operations per second.
    pub write_ops_per_second: f64,
    /// Bytes read per second.
    pub read_bytes_per_second: f64,
    /// Bytes written per second.
    pub write_bytes_per_second: f64,
}

/// The ROSE Data Server, as the controller needs it.
#[async_trait]
pub trait Rds: Send + Sync + 'static {
    /// Cheap liveness check of the backend (used by Probe).
    async fn ping(&self) -> Result<(), RdsError>;
    /// Creates a file-backed disk and returns it as specified (its creation time
    /// unknown). An existing slot is `AlreadyExists`; callers observe first with
    /// [`Rds::get_disk`] for idempotency.
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError>;
    /// The disk in `slot`, if any, with its exact size and creation time.
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError>;
    /// The disk entry in `slot`, if any (one `/disk print`: no exact size).
    async fn find_disk(&self, slot: &str) -> Result<Option<DiskEntry>, RdsError> {
        Ok(self.get_disk(slot).await?.map(DiskEntry::from))
    }
    /// The entries of those of `slots` that hold a disk (one `/disk print` for all).
    async fn find_disks(&self, slots: &[&str]) -> Result<Vec<DiskEntry>, RdsError> {
        let mut out = Vec::new();
        for slot in slots {
            out.extend(self.find_disk(slot).await?);
        }
        Ok(out)
    }
    /// `disk` (just observed with [`Rds::find_disk`]) with its exact size and creation time.
    async fn sized(&self, disk: &DiskEntry) -> Result<Disk, RdsError> {
        self.get_disk(&disk.slot)
            .await?
            .ok_or_else(|| RdsError::NotFound(format!("disk slot={}", disk.slot)))
    }
    /// All disks whose slot starts with `slot_prefix`, sorted by slot. Only disks this
    /// driver manages (backing file under its volume path) are listed.
    async fn list_disks(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError>;
    /// Sets the exact size of a disk (grow only; the caller checks).
    async fn resize_disk(&self, slot: &str, size_bytes: u64) -> Result<Disk, RdsError>;
    /// Removes the disk entry AND its backing file. Absent already is success (a backing
    /// file left by an interrupted delete is still removed).
    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError>;
    /// Removes `disk` (just observed with [`Rds::find_disk`]): its entry, then its file.
    async fn remove_disk(&self, disk: &DiskEntry) -> Result<(), RdsError> {
        self.delete_disk(&disk.slot).await
    }
    /// Removes the backing file a delete interrupted between entry and file removal left
    /// for `slot`, whose entry was just observed absent. Absent already is success.
    async fn remove_leftover_file(&self, slot: &str) -> Result<(), RdsError> {
        self.delete_disk(slot).await
    }
    /// Grows `disk` (just observed with [`Rds::get_disk`]) to exactly `size_bytes` and
    /// returns it at its new size.
    async fn grow_disk(&self, disk: &Disk, size_bytes: u64) -> Result<Disk, RdsError> {
        self.resize_disk(&disk.slot, size_bytes).await
    }
    /// Replaces the note kept with `disk` (just observed with [`Rds::find_disk`]).
    async fn set_comment(&self, disk: &DiskEntry, comment: &str) -> Result<(), RdsError> {
        let _ = comment;
        Err(RdsError::Rejected(format!(
            "disk slot={}: this RDS port cannot change a disk's comment",
            disk.slot
        )))
    }
    /// Pool capacity.
    async fn capacity(&self) -> Result<PoolCapacity, RdsError>;
    /// Sets (or with `None` clears) the host NQN allowed to connect to the disk's export.
    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError>;
    /// [`Rds::set_allowed_host`] on `disk`, just observed with [`Rds::find_disk`].
    async fn fence_disk(&self, disk: &DiskEntry, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.set_allowed_host(&disk.slot, host_nqn).await
    }

    /// The current I/O of disk `slot` (one RouterOS command). `NotFound` when the disk is
    /// gone. Adapters without such a reading answer `Rejected`, so wrappers must forward it.
    async fn disk_traffic(&self, slot: &str) -> Result<DiskTraffic, RdsError> {
        Err(RdsError::Rejected(format!(
            "disk slot={slot}: this RDS adapter reads no traffic"
        )))
    }

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
        let made = self
            .create_disk(&DiskSpec {
                slot: slot.to_string(),
                size_bytes: src.size_bytes,
                export: None,
                copy_from: Some(source.to_string()),
                comment: Some(comment.to_string()),
                allowed_host_nqn: None,
            })
            .await?;
        // The time the copy was taken is the RDS's.
        Ok(self.get_disk(slot).await?.unwrap_or(made))
    }

    /// Snapshots (non-exported disks) whose slot starts with `slot_prefix`, sorted by slot.
    async fn list_snapshots(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        let mut disks = self.list_disks(slot_prefix).await?;
        disks.retain(|d| d.export.is_none());
        Ok(disks)
    }
}
