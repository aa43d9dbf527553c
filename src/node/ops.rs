//! The node core: stage, publish, expand and stats over the `Initiator` and `Mounter` ports.
//!
//! Invariants:
//! - Stateless: every operation first observes the kernel (connected subsystems or loop
//!   devices through the initiator, `/proc/self/mountinfo` through the mounter) and acts
//!   only on the difference, so repeating a call, or calling after a plugin restart, gives
//!   the same result. Nothing is remembered between calls.
//! - A device holding any signature is never formatted.
//! - A device is only disconnected when no mount or block bind of it remains (the busy
//!   check reads the mount table; it cannot hang on the plugin's own process).
//! - The volume ↔ subsystem mapping is `NQN = <nqn prefix><volume id>` (the controller
//!   sets the `nqn` context key accordingly), so calls that carry only a volume id
//!   (unstage, expand, stats) find the device without remembered state.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ports::initiator::NvmeTarget;
use crate::ports::mounter::{MountEntry, TargetKind, UsageStats};
use crate::ports::{Initiator, Mounter};
use crate::types::VolumeId;

/// Node settings beyond the ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    /// Staging and target paths must lie below this root (`--kubelet-root`); `None`: any
    /// absolute normalized path.
    pub allowed_root: Option<PathBuf>,
    /// This driver's NQN prefix; a volume's NQN is the prefix followed by its id.
    pub nqn_prefix: String,
    /// Whether NodeStageVolume needs the `nvmeAddress` context key (the NVMe/TCP initiator
    /// does; loop devices on the embedded default do not).
    pub require_target_address: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            allowed_root: None,
            nqn_prefix: crate::types::defaults::DEFAULT_NQN_PREFIX.to_string(),
            require_target_address: false,
        }
    }
}

/// How the workload accesses the volume, reduced to what the node enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAccess {
    /// Read-write; several targets on this node allowed.
    Writer,
    /// Read-write at one target only (SINGLE_NODE_SINGLE_WRITER).
    SingleWriter,
    /// Read-only everywhere.
    ReadOnly,
}

/// Mount or raw block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// A filesystem of `fs_type` mounted with `flags`.
    Mount {
        /// `ext4` or `xfs`.
        fs_type: String,
        /// Extra mount options from the capability.
        flags: Vec<String>,
    },
    /// The raw block device.
    Block,
}

/// A validated volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapability {
    /// Mount or block.
    pub kind: VolumeKind,
    /// Access mode.
    pub access: NodeAccess,
}

/// A validated NodeStageVolume.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The volume.
    pub volume_id: VolumeId,
    /// Where the filesystem is mounted for the node (mount volumes).
    pub staging_path: PathBuf,
    /// Capability.
    pub cap: NodeCapability,
    /// Where to connect.
    pub target: NvmeTarget,
}

/// A validated NodePublishVolume.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The volume.
    pub volume_id: VolumeId,
    /// The staging path given to NodeStageVolume.
    pub staging_path: PathBuf,
    /// Where the workload sees the volume.
    pub target_path: PathBuf,
    /// Capability.
    pub cap: NodeCapability,
    /// Publish read-only (request flag or read-only access mode).
    pub readonly: bool,
    /// Subsystem NQN of the volume.
    pub nqn: String,
}

/// Health of a volume as NodeGetVolumeStats reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHealth {
    /// Usage (all zero when abnormal).
    pub usage: UsageStats,
    /// Raw block volume: only bytes are meaningful.
    pub block: bool,
    /// `Some(message)` when the volume is abnormal.
    pub abnormal: Option<String>,
}

/// One attached volume found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVolume {
    /// Subsystem NQN.
    pub nqn: String,
    /// Its block device.
    pub device: PathBuf,
    /// Mount points of its filesystem (staging and publish targets), kernel order.
    pub mounts: Vec<PathBuf>,
    /// Raw block publishes of its device node.
    pub block_binds: Vec<PathBuf>,
}

/// The node core.
#[derive(Clone)]
pub struct NodeOps {
    initiator: Arc<dyn Initiator>,
    mounter: Arc<dyn Mounter>,
    opts: NodeOptions,
}

fn is_ro(m: &MountEntry) -> bool {
    m.options.iter().any(|o| o == "ro")
}

/// The top-most mount at `path` (the last in kernel order).
fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.target == path)
}

impl NodeOps {
    /// A core over the node's ports.
    pub fn new(
        initiator: Arc<dyn Initiator>,
        mounter: Arc<dyn Mounter>,
        opts: NodeOptions,
    ) -> Self {
        Self {
            initiator,
            mounter,
            opts,
        }
    }

    /// The options.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// The NQN of `volume_id`.
    pub fn nqn_for(&self, volume_id: &VolumeId) -> String {
        format!("{}{}", self.opts.nqn_prefix, volume_id)
    }

    /// NodeStageVolume: connect, format if blank, mount at the staging path (mount volumes).
    pub async fn stage(&self, r: &Stage) -> Result<()> {
        let device = self.initiator.connect(&r.target).await?;
        let VolumeKind::Mount { fs_type, flags } = &r.cap.kind else {
            // Raw block: the connected device is the staged state; publish binds it.
            return Ok(());
        };
        let readonly = r.cap.access == NodeAccess::ReadOnly;
        let dev = self.mounter.device_number(&device).await?;
        let mounts = self.mounter.mounts().await?;
        if let Some(m) = mount_at(&mounts, &r.staging_path) {
            // Spec: "If the volume corresponding to the volume_id is already staged to the
            // staging_target_path, and is identical to the specified volume_capability the
            // Plugin MUST reply 0 OK."
            if m.dev == dev && m.fs_type == *fs_type && is_ro(m) == readonly {
                return Ok(());
            }
            // Spec: "If this RPC failed, or the CO does not know if it failed or not, it MAY
            // choose to call NodeStageVolume again ... Volume published but is incompatible:
            // 6 ALREADY_EXISTS".
            return Err(Error::AlreadyExists(format!(
                "staging_target_path {} already has {} ({}, {}) mounted, incompatible with \
                 volume {} as {fs_type}{}",
                r.staging_path.display(),
                m.source,
                m.fs_type,
                if is_ro(m) { "ro" } else { "rw" },
                r.volume_id,
                if readonly { " read-only" } else { "" }
            )));
        }
        self.mounter
            .prepare_target(&r.staging_path, TargetKind::Directory)
            .await?;
        match self.mounter.filesystem_of(&device).await? {
            None => {
                tracing::info!(volume = %r.volume_id, device = %device.display(), fs_type, "formatting blank device");
                self.mounter.format(&device, fs_type).await?;
            }
            Some(existing) if existing == *fs_type => {}
            Some(existing) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {}: device {} holds {existing}, not the requested {fs_type}; \
                     refusing to reformat it",
                    r.volume_id,
                    device.display()
                )));
            }
        }
        let mut options = flags.clone();
        if fs_type == "xfs" && !options.iter().any(|o| o == "nouuid") {
            // Clones and restored snapshots share the XFS UUID of their source.
            options.push("nouuid".into());
        }
        if readonly {
            options.push("ro".into());
        }
        self.mounter
            .mount(&device, &r.staging_path, fs_type, &options)
            .await?;
        Ok(())
    }

    /// NodeUnstageVolume: unmount the staging path, then disconnect once nothing uses the
    /// device.
    pub async fn unstage(&self, volume_id: &VolumeId, staging_path: &Path) -> Result<()> {
        let mut nqn = self.nqn_for(volume_id);
        let mut device = self.initiator.find_device(&nqn).await?;
        let mounts = self.mounter.mounts().await?;
        if let Some(m) = mount_at(&mounts, staging_path).cloned() {
            // The staging mount names its device; find which of our subsystems it is, in
            // case the volume was connected under another NQN.
            let dev_of_mount = m.dev.clone();
            let mut ours = device.is_some();
            if let Some(d) = &device {
                ours = self.mounter.device_number(d).await.ok().as_deref() == Some(&dev_of_mount);
            }
            if !ours {
                for c in self.initiator.connections().await? {
                    if self.mounter.device_number(&c.device).await.ok().as_deref()
                        == Some(&dev_of_mount)
                    {
                        nqn = c.nqn;
                        device = Some(c.device);
                        ours = true;
                        break;
                    }
                }
            }
            if !ours && self.mount_device_alive(&m).await {
                return Err(Error::FailedPrecondition(format!(
                    "staging_target_path {} has {} mounted, which is not volume {volume_id}",
                    staging_path.display(),
                    m.source
                )));
            }
            // Ours, or a mount whose device is gone (a lost connection): unmount it either
            // way, or the CO could never finish unstaging a broken volume.
            self.unmount_all(staging_path).await?;
        }
        // Spec: "If the volume corresponding to the volume_id is not staged to the
        // staging_target_path, the Plugin MUST reply 0 OK." — nothing mounted and nothing
        // connected is that case.
        let Some(device) = device else {
            return Ok(());
        };
        self.ensure_unused(volume_id, &device).await?;
        self.initiator.disconnect(&nqn).await?;
        Ok(())
    }

    /// Busy check: no mount and no block bind of `device` remains.
    async fn ensure_unused(&self, volume_id: &VolumeId, device: &Path) -> Result<()> {
        let dev = match self.mounter.device_number(device).await {
            Ok(d) => d,
            // The device node is already gone: nothing can use it.
            Err(crate::ports::mounter::MountError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut users: Vec<PathBuf> = self
            .mounter
            .mounts()
            .await?
            .into_iter()
            .filter(|m| m.dev == dev)
            .map(|m| m.target)
            .collect();
        users.extend(self.mounter.device_binds(device).await?);
        if users.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = users.iter().map(|p| p.display().to_string()).collect();
        Err(Error::FailedPrecondition(format!(
            "volume {volume_id} is still mounted at {}; unpublish it there first",
            list.join(", ")
        )))
    }

    /// Unmounts every mount stacked at `path` (bounded).
    async fn unmount_all(&self, path: &Path) -> Result<()> {
        for _ in 0..8 {
            if mount_at(&self.mounter.mounts().await?, path).is_none() {
                return Ok(());
            }
            self.mounter.unmount(path).await?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after 8 unmounts",
            path.display()
        )))
    }

    /// NodePublishVolume: bind the staged filesystem (or the device node) to the target.
    pub async fn publish(&self, r: &Publish) -> Result<()> {
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {} on this node; call NodeStageVolume first",
                r.volume_id,
                r.staging_path.display()
            ))
        };
        let device = self
            .initiator
            .find_device(&r.nqn)
            .await?
            .ok_or_else(not_staged)?;
        let mounts = self.mounter.mounts().await?;
        let single = r.cap.access == NodeAccess::SingleWriter;
        match &r.cap.kind {
            VolumeKind::Mount { .. } => {
                let dev = self.mounter.device_number(&device).await?;
                if mount_at(&mounts, &r.staging_path).is_none_or(|m| m.dev != dev) {
                    return Err(not_staged());
                }
                if let Some(m) = mount_at(&mounts, &r.target_path) {
                    return self.already_published(r, m.dev == dev && is_ro(m) == r.readonly, m);
                }
                if single {
                    let others: Vec<&MountEntry> = mounts
                        .iter()
                        .filter(|m| m.dev == dev && m.target != r.staging_path)
                        .collect();
                    self.single_writer_check(r, others.iter().map(|m| m.target.as_path()))?;
                }
                self.mounter
                    .prepare_target(&r.target_path, TargetKind::Directory)
                    .await?;
                self.mounter
                    .bind(&r.staging_path, &r.target_path, r.readonly)
                    .await?;
            }
            VolumeKind::Block => {
                let binds = self.mounter.device_binds(&device).await?;
                if let Some(m) = mount_at(&mounts, &r.target_path) {
                    let same = binds.contains(&r.target_path) && is_ro(m) == r.readonly;
                    return self.already_published(r, same, m);
                }
                if single {
                    self.single_writer_check(r, binds.iter().map(PathBuf::as_path))?;
                }
                self.mounter
                    .prepare_target(&r.target_path, TargetKind::File)
                    .await?;
                self.mounter
                    .bind(&device, &r.target_path, r.readonly)
                    .await?;
            }
        }
        Ok(())
    }

    fn already_published(&self, r: &Publish, compatible: bool, m: &MountEntry) -> Result<()> {
        // Spec: "If the volume corresponding to the volume_id has already been published at
        // the specified target_path, and is compatible with the specified volume_capability
        // and readonly flag, the Plugin MUST reply 0 OK."
        if compatible {
            return Ok(());
        }
        // Spec (NodePublishVolume errors): "Volume published but is incompatible |
        // 6 ALREADY_EXISTS | Indicates that a volume corresponding to the specified
        // volume_id has already been published at the specified target_path but is
        // incompatible with the specified volume_capability or readonly flag."
        Err(Error::AlreadyExists(format!(
            "target_path {} already has {} mounted ({}), incompatible with volume {}{}",
            r.target_path.display(),
            m.source,
            if is_ro(m) { "ro" } else { "rw" },
            r.volume_id,
            if r.readonly {
                " read-only"
            } else {
                " read-write"
            }
        )))
    }

    fn single_writer_check<'a>(
        &self,
        r: &Publish,
        mut others: impl Iterator<Item = &'a Path>,
    ) -> Result<()> {
        // Spec (SINGLE_NODE_SINGLE_WRITER): "Can only be published once as read/write at a
        // single workload on a single node, at any given time." and (NodePublishVolume
        // errors): "Exceeds capabilities | 9 FAILED_PRECONDITION".
        if let Some(other) = others.find(|p| *p != r.target_path) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {}; \
                 it cannot also be published at {}",
                r.volume_id,
                other.display(),
                r.target_path.display()
            )));
        }
        Ok(())
    }

    /// NodeUnpublishVolume: unmount the target and remove it.
    pub async fn unpublish(&self, volume_id: &VolumeId, target_path: &Path) -> Result<()> {
        // Spec: "If the volume corresponding to the volume_id is not published at the
        // specified target_path, the Plugin MUST reply 0 OK." — and: "The SP MUST delete the
        // file or directory it created at this path."
        self.unmount_all(target_path).await?;
        self.mounter.remove_target(target_path).await?;
        tracing::debug!(volume = %volume_id, target = %target_path.display(), "unpublished");
        Ok(())
    }

    /// The attached device of `volume_id`, or NOT_FOUND.
    async fn attached_device(&self, volume_id: &VolumeId) -> Result<(String, PathBuf)> {
        let nqn = self.nqn_for(volume_id);
        match self.initiator.find_device(&nqn).await? {
            Some(d) => Ok((nqn, d)),
            None => Err(Error::NotFound(format!(
                "volume {volume_id} is not attached on this node"
            ))),
        }
    }

    /// NodeExpandVolume: re-read the device size, grow the filesystem online; the new
    /// capacity in bytes.
    pub async fn expand(
        &self,
        volume_id: &VolumeId,
        volume_path: &Path,
        required_bytes: Option<u64>,
    ) -> Result<u64> {
        // Spec (NodeExpandVolume errors): "Volume not found | 5 NOT_FOUND | Indicates that a
        // volume corresponding to the specified volume_id could not be found."
        let (nqn, device) = self.attached_device(volume_id).await?;
        let dev = self.mounter.device_number(&device).await?;
        let mounts = self.mounter.mounts().await?;
        let fs_mount = mount_at(&mounts, volume_path)
            .filter(|m| m.dev == dev)
            .cloned();
        let is_block = fs_mount.is_none()
            && self
                .mounter
                .device_binds(&device)
                .await?
                .iter()
                .any(|p| p == volume_path);
        if fs_mount.is_none() && !is_block {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not mounted at volume_path {}",
                volume_path.display()
            )));
        }
        self.initiator.rescan(&nqn).await?;
        let size = self.mounter.device_size(&device).await?;
        if let Some(req) = required_bytes
            && size < req
        {
            return Err(Error::Unavailable(format!(
                "volume {volume_id}: device {} is {size} bytes after a rescan, less than the \
                 required {req}; the storage server has not grown it yet (retry)",
                device.display()
            )));
        }
        if let Some(m) = fs_mount {
            self.mounter
                .resize_fs(&device, volume_path, &m.fs_type)
                .await?;
        }
        Ok(size)
    }

    /// NodeGetVolumeStats: usage and condition of the volume at `volume_path`.
    pub async fn stats(&self, volume_id: &VolumeId, volume_path: &Path) -> Result<VolumeHealth> {
        // Spec (NodeGetVolumeStats errors): "Volume not found | 5 NOT_FOUND | Indicates that
        // a volume corresponding to the specified volume_id could not be found on specified
        // volume_path."
        if !self.mounter.path_exists(volume_path).await? {
            return Err(Error::NotFound(format!(
                "volume_path {} does not exist",
                volume_path.display()
            )));
        }
        let device = self.initiator.find_device(&self.nqn_for(volume_id)).await?;
        let mounts = self.mounter.mounts().await?;
        let here = mount_at(&mounts, volume_path).cloned();
        let abnormal = |msg: String| VolumeHealth {
            usage: UsageStats::default(),
            block: false,
            abnormal: Some(msg),
        };
        let Some(device) = device else {
            return match here {
                // A mount of a live device that is not this volume's: wrong volume.
                Some(m) if self.mount_device_alive(&m).await => Err(Error::NotFound(format!(
                    "volume_path {} has {} mounted, not volume {volume_id}",
                    volume_path.display(),
                    m.source
                ))),
                // A mount whose device went away: the volume's, and it is broken.
                Some(m) => Ok(abnormal(format!(
                    "the device of volume {volume_id} is gone (NVMe connection lost?); \
                     {} still has {} mounted",
                    volume_path.display(),
                    m.source
                ))),
                None => Err(Error::NotFound(format!(
                    "volume {volume_id} is not attached on this node"
                ))),
            };
        };
        let dev = self.mounter.device_number(&device).await?;
        match here {
            Some(m) if m.dev == dev => Ok(VolumeHealth {
                usage: self.mounter.stats(volume_path).await?,
                block: false,
                abnormal: None,
            }),
            Some(m) => {
                if self
                    .mounter
                    .device_binds(&device)
                    .await?
                    .iter()
                    .any(|p| p == volume_path)
                {
                    let total = self.mounter.device_size(&device).await?;
                    Ok(VolumeHealth {
                        usage: UsageStats {
                            total_bytes: total,
                            ..UsageStats::default()
                        },
                        block: true,
                        abnormal: None,
                    })
                } else {
                    Err(Error::NotFound(format!(
                        "volume_path {} has {} mounted, not volume {volume_id}",
                        volume_path.display(),
                        m.source
                    )))
                }
            }
            None => Ok(abnormal(format!(
                "volume {volume_id} is attached but not mounted at {} (unmounted behind the \
                 plugin's back?)",
                volume_path.display()
            ))),
        }
    }

    /// Whether the device a mount was made from still exists (a filesystem mount names it
    /// as its source; a raw block bind carries the device node's path as its root).
    async fn mount_device_alive(&self, m: &MountEntry) -> bool {
        let path = if m.source.starts_with('/') {
            PathBuf::from(&m.source)
        } else {
            Path::new("/dev").join(m.root.trim_start_matches('/'))
        };
        self.mounter.device_number(&path).await.is_ok()
    }

    /// Start-up: what is attached and mounted, read from the kernel.
    pub async fn recover(&self) -> Result<Vec<AttachedVolume>> {
        let mounts = self.mounter.mounts().await?;
        let mut out = Vec::new();
        for c in self.initiator.connections().await? {
            let dev = self.mounter.device_number(&c.device).await.ok();
            let fs_mounts: Vec<PathBuf> = mounts
                .iter()
                .filter(|m| Some(&m.dev) == dev.as_ref())
                .map(|m| m.target.clone())
                .collect();
            let block_binds = self.mounter.device_binds(&c.device).await?;
            tracing::info!(
                nqn = %c.nqn,
                device = %c.device.display(),
                mounts = ?fs_mounts,
                block_binds = ?block_binds,
                "found attached volume"
            );
            out.push(AttachedVolume {
                nqn: c.nqn,
                device: c.device,
                mounts: fs_mounts,
                block_binds,
            });
        }
        tracing::info!(volumes = out.len(), "node state read from the kernel");
        Ok(out)
    }
}
