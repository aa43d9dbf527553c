//! The `Mounter` port: filesystems and mounts on the node.
//!
//! Production and embedded: mkfs/mount/blkid/findmnt-equivalents with timeouts.
//! Simulation: a simulated kernel.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Errors of the `Mounter` port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// The path or device does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A command did not finish in time.
    #[error("mount operation timed out: {0}")]
    Timeout(String),
    /// The target is busy.
    #[error("busy: {0}")]
    Busy(String),
    /// The operation is not supported here (e.g. offline-only resize).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A command failed.
    #[error("command failed: {0}")]
    Command(String),
    /// Local I/O failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// The filesystem has errors that only a person may repair.
    #[error("filesystem needs a manual check: {0}")]
    Corrupt(String),
}

/// One line of the mount table (`/proc/self/mountinfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem's device (shared by a mount and its bind mounts).
    pub dev: String,
    /// Root of the mount within its filesystem (`/` for a whole-filesystem mount; the
    /// device node's path, e.g. `/loop0`, for a raw block bind of a devtmpfs node).
    pub root: String,
    /// Source device (or bind source root).
    pub source: String,
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Usage figures of a mounted filesystem or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageStats {
    /// Total bytes.
    pub total_bytes: u64,
    /// Available bytes.
    pub available_bytes: u64,
    /// Used bytes.
    pub used_bytes: u64,
    /// Total inodes (0 for block).
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Used inodes.
    pub used_inodes: u64,
}

/// What a filesystem check before mounting found (errors it could not repair are
/// [`MountError::Corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsCheck {
    /// Clean, or a filesystem the node does not check (xfs replays its log at mount).
    Clean,
    /// Errors found and repaired automatically (what the repair said).
    Repaired(String),
}

/// What a publish or staging target must be before something is mounted on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory (mount volumes).
    Directory,
    /// A regular file (raw block volumes: the device node is bound onto it).
    File,
}

/// Filesystems and mounts.
#[async_trait]
pub trait Mounter: Send + Sync + 'static {
    /// The filesystem type on `device`, if it holds one.
    async fn filesystem_of(&self, device: &Path) -> Result<Option<String>, MountError>;
    /// Checks the filesystem of `fs_type` on the unmounted `device` before it is mounted
    /// read-write, repairing only what is safe to repair without a person (ext4: `e2fsck
    /// -p`, which also replays the journal); never a destructive repair. xfs is not checked
    /// (its mount replays the log). Errors that need a person are [`MountError::Corrupt`].
    async fn check_filesystem(&self, device: &Path, fs_type: &str) -> Result<FsCheck, MountError>;
    /// Creates a filesystem of `fs_type` on `device`.
    async fn format(&self, device: &Path, fs_type: &str) -> Result<(), MountError>;
    /// Mounts `source` on `target` with `fs_type` and `options`.
    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError>;
    /// Bind-mounts `source` on `target`, read-only when asked.
    async fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError>;
    /// Unmounts `target` (not mounted is success).
    async fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// The mount table, in kernel order.
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError>;
    /// Grows the filesystem on `device` mounted at `mount_path` to fill the device.
    async fn resize_fs(
        &self,
        device: &Path,
        mount_path: &Path,
        fs_type: &str,
    ) -> Result<(), MountError>;
    /// Usage of the filesystem at `path` (or the block device at `path`).
    async fn stats(&self, path: &Path) -> Result<UsageStats, MountError>;
    /// Size in bytes of the block device.
    async fn device_size(&self, device: &Path) -> Result<u64, MountError>;
    /// Mount points where the device node `device` itself is bind-mounted (raw block
    /// publishes), sorted.
    async fn device_binds(&self, device: &Path) -> Result<Vec<PathBuf>, MountError>;
    /// `major:minor` of the block device `device` (compare with [`MountEntry::dev`]).
    async fn device_number(&self, device: &Path) -> Result<String, MountError>;
    /// Creates `path` as `kind` (and its parents); an existing one of that kind is success.
    async fn prepare_target(&self, path: &Path, kind: TargetKind) -> Result<(), MountError>;
    /// Removes the empty directory or file at `path` (absent is success; never recursive).
    async fn remove_target(&self, path: &Path) -> Result<(), MountError>;
    /// Whether `path` exists (without following a dead mount into a hang: bounded).
    async fn path_exists(&self, path: &Path) -> Result<bool, MountError>;
}
