//! The node core: stage, publish, expand and stats over the `Initiator` and `Mounter` ports,
//! and the repair of a staged volume whose device went away.
//!
//! Invariants:
//! - Observe, then act: every operation first reads the kernel (connected subsystems or
//!   loop devices through the initiator, `/proc/self/mountinfo` through the mounter) and
//!   acts only on the difference, so repeating a call, or calling after a plugin restart,
//!   gives the same result. The only memory across calls is the backoff of failing volumes
//!   (a restart forgets it, which is safe).
//! - A device holding any signature is never formatted.
//! - A device is only disconnected when no mount or block bind of it remains (the busy
//!   check reads the mount table; it cannot hang on the plugin's own process).
//! - The volume ↔ subsystem mapping is `NQN = <nqn prefix><volume id>` (the controller
//!   sets the `nqn` context key accordingly), so calls that carry only a volume id
//!   (unstage, expand, stats) find the device without remembered state.
//! - A mount is *stale* when it is a filesystem (or raw block bind) whose device is gone, or
//!   whose device is no longer its volume's device (a reconnect after a controller loss
//!   gave the volume a new name; the initiator still names the old device's NQN). Every
//!   call that touches a staged volume classifies the mount it finds ([`Mount`]); a mount
//!   that is neither the volume's current device nor stale is someone else's and is never
//!   unmounted.
//! - Repair (NodeStageVolume, NodePublishVolume) connects first and only then unmounts the
//!   dead mounts, mounts the volume's current device found by NQN (after the filesystem
//!   check), and re-binds the publish targets that showed the dead filesystem; each step is
//!   logged, attempts are bounded, and a volume that keeps failing backs off
//!   ([`StageBackoff`]) so the kubelet's retries cannot become a reconnect storm. Only
//!   publish targets below the allowed root (`--kubelet-root`) are bound again.
//! - An ext4 filesystem is checked (`e2fsck -p`, never a destructive repair) before every
//!   read-write mount at the staging path; errors that need a person fail the stage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::Code;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::node::backoff::StageBackoff;
use crate::node::mount::SUPPORTED_FS_TYPES;
use crate::ports::initiator::{Connection, NvmeTarget};
use crate::ports::mounter::{FsCheck, MountEntry, MountError, TargetKind, UsageStats};
use crate::ports::{Initiator, Mounter};
use crate::types::VolumeId;

/// Attempts one repair of a stale staging mount gets before the call fails.
pub const RECOVERY_ATTEMPTS: u32 = 3;

/// The node-wide NVMe/TCP reconnect settings, used when the volume (its StorageClass) sets
/// none. The defaults ride out an RDS reboot: the kernel retries forever
/// (`ctrl_loss_tmo` -1) every 5 s, queueing I/O meanwhile, instead of deleting the
/// controller after its own default of 600 s and failing every filesystem on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectDefaults {
    /// `--ctrl-loss-tmo` in seconds (-1: retry forever).
    pub ctrl_loss_tmo: i32,
    /// `--reconnect-delay` in seconds.
    pub reconnect_delay: u32,
    /// `--keep-alive-tmo` in seconds (`None`: the kernel's default).
    pub keep_alive_tmo: Option<u32>,
}

impl Default for ReconnectDefaults {
    fn default() -> Self {
        Self {
            ctrl_loss_tmo: -1,
            reconnect_delay: 5,
            keep_alive_tmo: None,
        }
    }
}

impl ReconnectDefaults {
    /// `target` with every tunable the volume does not set taken from these defaults (the
    /// volume's own values win).
    pub fn apply(&self, target: &NvmeTarget) -> NvmeTarget {
        NvmeTarget {
            ctrl_loss_tmo: target.ctrl_loss_tmo.or(Some(self.ctrl_loss_tmo)),
            reconnect_delay: target.reconnect_delay.or(Some(self.reconnect_delay)),
            keep_alive_tmo: target.keep_alive_tmo.or(self.keep_alive_tmo),
            ..target.clone()
        }
    }
}

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
    /// Reconnect tunables for volumes that set none.
    pub reconnect: ReconnectDefaults,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            allowed_root: None,
            nqn_prefix: crate::types::defaults::DEFAULT_NQN_PREFIX.to_string(),
            require_target_address: false,
            reconnect: ReconnectDefaults::default(),
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
    /// Where the volume is connected (to repair a stale staging mount).
    pub target: NvmeTarget,
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
    metrics: Arc<Metrics>,
    backoff: StageBackoff,
}

/// What a mount found at a volume's staging or publish path is, judged against the
/// volume's current device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// On the volume's current device.
    Current,
    /// The volume's, on a device that is gone or no longer the volume's: why.
    Stale(String),
    /// Someone else's (another device, not a block filesystem): never touched.
    Foreign,
}

/// The volume's current device: path and `major:minor`.
type Device = (PathBuf, String);

fn is_ro(m: &MountEntry) -> bool {
    m.options.iter().any(|o| o == "ro")
}

/// The top-most mount at `path` (the last in kernel order).
fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.target == path)
}

/// The device node a mount was made from: a filesystem mount of this driver's kinds names
/// it as its source; a raw block bind carries the device node's path as its root. `None`
/// for anything else (tmpfs, overlay, ...).
fn device_of_mount(m: &MountEntry) -> Option<PathBuf> {
    if m.fs_type == "devtmpfs" {
        let name = m.root.trim_start_matches('/');
        return (!name.is_empty()).then(|| Path::new("/dev").join(name));
    }
    (SUPPORTED_FS_TYPES.contains(&m.fs_type.as_str()) && m.source.starts_with('/'))
        .then(|| PathBuf::from(&m.source))
}

/// An error of the same gRPC code as `e` with `message` (the code decides whether the CO
/// retries; the message says what happened and what to do).
fn recast(e: &Error, message: String) -> Error {
    match e.code() {
        Code::Unavailable => Error::Unavailable(message),
        Code::DeadlineExceeded | Code::Aborted => Error::Aborted(message),
        Code::AlreadyExists => Error::AlreadyExists(message),
        Code::NotFound | Code::FailedPrecondition => Error::FailedPrecondition(message),
        _ => Error::Internal(message),
    }
}

/// How the staging mount of a volume should look.
struct StagingSpec<'a> {
    volume_id: &'a VolumeId,
    staging_path: &'a Path,
    fs_type: &'a str,
    flags: &'a [String],
    readonly: bool,
    target: &'a NvmeTarget,
}

impl NodeOps {
    /// A core over the node's ports, with metrics of its own.
    pub fn new(
        initiator: Arc<dyn Initiator>,
        mounter: Arc<dyn Mounter>,
        opts: NodeOptions,
    ) -> Self {
        Self {
            initiator,
            mounter,
            opts,
            metrics: Arc::new(Metrics::default()),
            backoff: StageBackoff::default(),
        }
    }

    /// Records into `metrics` (the plugin instance's).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The options.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// The per-volume backoff of failing stages.
    pub fn backoff(&self) -> &StageBackoff {
        &self.backoff
    }

    /// The NQN of `volume_id`.
    pub fn nqn_for(&self, volume_id: &VolumeId) -> String {
        format!("{}{}", self.opts.nqn_prefix, volume_id)
    }

    /// The volume id behind one of this driver's NQNs (`None`: not `<prefix><volume id>`).
    pub fn volume_of(&self, nqn: &str) -> Option<VolumeId> {
        nqn.strip_prefix(&self.opts.nqn_prefix)
            .and_then(|id| VolumeId::new(id).ok())
    }

    /// This driver's connections.
    pub async fn connections(&self) -> Result<Vec<Connection>> {
        Ok(self.initiator.connections().await?)
    }

    /// The device of `nqn` if connected, else connects with the node's reconnect defaults
    /// for what the volume leaves unset. A connection already there gets those settings
    /// too: one left from before a restart or made by hand may carry the kernel's own
    /// 600 s `ctrl_loss_tmo`, which would delete the controller under the filesystem in a
    /// longer RDS outage (found by the simulation, seeds 581, 2423 and 2983).
    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf> {
        if let Some(d) = self.initiator.find_device(&target.nqn).await? {
            let target = self.opts.reconnect.apply(target);
            match self.initiator.apply_reconnect(&target).await {
                Ok(true) => tracing::info!(nqn = %target.nqn, ctrl_loss_tmo = ?target.ctrl_loss_tmo, reconnect_delay = ?target.reconnect_delay, "reconnect settings applied to an existing connection"),
                Ok(false) => {}
                // The volume works as connected; only its outage behaviour is not ours.
                Err(e) => tracing::warn!(nqn = %target.nqn, error = %e, "could not apply the reconnect settings to an existing connection"),
            }
            return Ok(d);
        }
        if self.opts.require_target_address && target.address.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "cannot connect {}: the volume_context/publish_context carry no {}",
                target.nqn,
                crate::types::context::NVME_ADDRESS
            )));
        }
        let target = self.opts.reconnect.apply(target);
        let started = tokio::time::Instant::now();
        let r = self.initiator.connect(&target).await;
        let secs = started.elapsed().as_secs_f64();
        self.metrics.observe_nvme("connect", r.is_ok(), secs);
        match &r {
            Ok(d) => tracing::info!(nqn = %target.nqn, device = %d.display(), ctrl_loss_tmo = ?target.ctrl_loss_tmo, reconnect_delay = ?target.reconnect_delay, "connected"),
            Err(e) => tracing::warn!(nqn = %target.nqn, error = %e, "connect failed"),
        }
        Ok(r?)
    }

    /// Disconnects `nqn`, measured.
    pub(crate) async fn disconnect(&self, nqn: &str) -> Result<()> {
        let started = tokio::time::Instant::now();
        let r = self.initiator.disconnect(nqn).await;
        let secs = started.elapsed().as_secs_f64();
        self.metrics.observe_nvme("disconnect", r.is_ok(), secs);
        Ok(r?)
    }

    /// The current device of `nqn`, with its `major:minor`.
    async fn current_device(&self, nqn: &str) -> Result<Option<Device>> {
        let Some(path) = self.initiator.find_device(nqn).await? else {
            return Ok(None);
        };
        match self.mounter.device_number(&path).await {
            Ok(n) => Ok(Some((path, n))),
            // Gone between the two looks: not connected.
            Err(MountError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Judges the mount `m` found at a path of the volume whose subsystem is `nqn` and
    /// whose current device is `current`.
    pub async fn classify(&self, m: &MountEntry, nqn: &str, current: Option<&Device>) -> Result<Mount> {
        if let Some((path, dev)) = current
            && (*dev == m.dev || (m.fs_type == "devtmpfs" && device_of_mount(m).as_ref() == Some(path)))
        {
            return Ok(Mount::Current);
        }
        let Some(device) = device_of_mount(m) else {
            return Ok(Mount::Foreign);
        };
        let now = match current {
            Some((p, _)) => format!("; the volume's device is now {}", p.display()),
            None => "; the volume is not connected".to_string(),
        };
        match self.mounter.device_number(&device).await {
            Err(MountError::NotFound(_)) => {
                return Ok(Mount::Stale(format!(
                    "its device {} is gone (NVMe controller lost){now}",
                    device.display()
                )));
            }
            Err(e) => return Err(e.into()),
            // The name was handed to another device after the mounted one went away.
            Ok(n) if m.fs_type != "devtmpfs" && n != m.dev => {
                return Ok(Mount::Stale(format!(
                    "its device {} ({}) is gone and the name now belongs to another device{now}",
                    device.display(),
                    m.dev
                )));
            }
            Ok(_) => {}
        }
        let owner = self.initiator.nqn_of_device(&device).await?;
        if owner.as_deref() == Some(nqn) {
            return Ok(Mount::Stale(format!(
                "its device {} is no longer the volume's (a reconnect gave it a new name){now}",
                device.display()
            )));
        }
        // A raw block bind (devtmpfs: its own device number says nothing) whose device name
        // went to another volume of ours after a reconnect: this volume's, gone stale
        // (found by the simulation: a KubeVirt VM disk's stats answered NOT_FOUND).
        if m.fs_type == "devtmpfs"
            && let Some(other) = owner
        {
            return Ok(Mount::Stale(format!(
                "its device {} now belongs to {other}{now}",
                device.display()
            )));
        }
        Ok(Mount::Foreign)
    }

    /// NodeStageVolume: connect, format if blank, check and mount at the staging path
    /// (mount volumes); a stale staging mount is repaired.
    pub async fn stage(&self, r: &Stage) -> Result<()> {
        self.backoff.check(&r.volume_id)?;
        let outcome = self.stage_once(r).await;
        self.record(&r.volume_id, outcome.as_ref().copied());
        outcome
    }

    /// Feeds the backoff: a refusal because of the request itself (incompatible, another
    /// call in flight) is no failure of the volume.
    fn record(&self, volume_id: &VolumeId, outcome: Result<(), &Error>) {
        if !matches!(outcome, Err(Error::AlreadyExists(_) | Error::Aborted(_))) {
            self.backoff.record(volume_id, outcome);
        }
    }

    async fn stage_once(&self, r: &Stage) -> Result<()> {
        let device = self.connect(&r.target).await?;
        let VolumeKind::Mount { fs_type, flags } = &r.cap.kind else {
            // Raw block: the connected device is the staged state; publish binds it.
            return Ok(());
        };
        let readonly = r.cap.access == NodeAccess::ReadOnly;
        let dev = self.mounter.device_number(&device).await?;
        let spec = StagingSpec {
            volume_id: &r.volume_id,
            staging_path: &r.staging_path,
            fs_type,
            flags,
            readonly,
            target: &r.target,
        };
        let mounts = self.mounter.mounts().await?;
        if let Some(m) = mount_at(&mounts, &r.staging_path) {
            let current = (device.clone(), dev.clone());
            match self.classify(m, &r.target.nqn, Some(&current)).await? {
                // Spec: "If the volume corresponding to the volume_id is already staged to
                // the staging_target_path, and is identical to the specified
                // volume_capability the Plugin MUST reply 0 OK."
                Mount::Current if m.fs_type == *fs_type && is_ro(m) == readonly => return Ok(()),
                Mount::Stale(why) => {
                    self.metrics.stale_mount("stage");
                    return self.repair(&spec, m, &mounts, &why).await;
                }
                // Spec: "If this RPC failed, or the CO does not know if it failed or not, it
                // MAY choose to call NodeStageVolume again ... Volume published but is
                // incompatible: 6 ALREADY_EXISTS".
                Mount::Current | Mount::Foreign => {
                    return Err(Error::AlreadyExists(format!(
                        "staging_target_path {} already has {} ({}, {}) mounted, incompatible \
                         with volume {} as {fs_type}{}",
                        r.staging_path.display(),
                        m.source,
                        m.fs_type,
                        if is_ro(m) { "ro" } else { "rw" },
                        r.volume_id,
                        if readonly { " read-only" } else { "" }
                    )));
                }
            }
        }
        self.mount_staging(&spec, &device, &dev).await
    }

    /// Prepares the staging path, formats a blank device, checks the filesystem (read-write
    /// mounts) and mounts `device` there.
    async fn mount_staging(&self, s: &StagingSpec<'_>, device: &Path, dev: &str) -> Result<()> {
        self.mounter
            .prepare_target(s.staging_path, TargetKind::Directory)
            .await?;
        let fs_type = s.fs_type;
        match self.mounter.filesystem_of(device).await? {
            None => {
                tracing::info!(volume = %s.volume_id, device = %device.display(), fs_type, "formatting blank device");
                self.mounter.format(device, fs_type).await?;
            }
            Some(existing) if existing == fs_type => {
                // Like Kubernetes' mount library: check before a read-write mount (a
                // read-only one cannot make it worse), and only while nothing has it mounted.
                let in_use = self.mounter.mounts().await?.iter().any(|m| m.dev == dev);
                if !s.readonly && !in_use {
                    self.check_filesystem(s.volume_id, device, fs_type).await?;
                }
            }
            Some(existing) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {}: device {} holds {existing}, not the requested {fs_type}; \
                     refusing to reformat it",
                    s.volume_id,
                    device.display()
                )));
            }
        }
        let mut options = s.flags.to_vec();
        if fs_type == "xfs" && !options.iter().any(|o| o == "nouuid") {
            // Clones and restored snapshots share the XFS UUID of their source.
            options.push("nouuid".into());
        }
        if s.readonly {
            options.push("ro".into());
        }
        self.mounter
            .mount(device, s.staging_path, fs_type, &options)
            .await?;
        Ok(())
    }

    async fn check_filesystem(&self, volume_id: &VolumeId, device: &Path, fs_type: &str) -> Result<()> {
        match self.mounter.check_filesystem(device, fs_type).await {
            Ok(FsCheck::Clean) => Ok(()),
            Ok(FsCheck::Repaired(what)) => {
                tracing::warn!(volume = %volume_id, device = %device.display(), repaired = %what, "filesystem check repaired errors before mounting");
                Ok(())
            }
            Err(MountError::Corrupt(why)) => Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is not staged: {why}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Repairs the stale staging mount `stale` (found in `mounts`, judged stale because
    /// `why`): bounded attempts, each step logged. The volume's publish targets that showed
    /// the dead filesystem are bound again to the repaired one.
    async fn repair(&self, s: &StagingSpec<'_>, stale: &MountEntry, mounts: &[MountEntry], why: &str) -> Result<()> {
        let mut targets: Vec<(PathBuf, bool)> = Vec::new();
        let ours = |p: &Path| {
            p != s.staging_path
                && self.opts.allowed_root.as_ref().is_none_or(|root| p.starts_with(root))
        };
        for m in mounts.iter().filter(|m| m.dev == stale.dev && ours(&m.target)) {
            if !targets.iter().any(|(t, _)| *t == m.target) {
                targets.push((m.target.clone(), is_ro(m)));
            }
        }
        tracing::warn!(
            volume = %s.volume_id,
            staging = %s.staging_path.display(),
            why,
            publish_targets = ?targets,
            "stale staging mount: repairing"
        );
        let mut last = None;
        for attempt in 1..=RECOVERY_ATTEMPTS {
            match self.repair_attempt(s, stale, &targets).await {
                Ok(()) => {
                    self.metrics.recovery(true);
                    tracing::info!(volume = %s.volume_id, attempt, "stale staging mount repaired");
                    return Ok(());
                }
                // Something else sits there now: not ours to repair.
                Err(e @ Error::AlreadyExists(_)) => {
                    self.metrics.recovery(false);
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(volume = %s.volume_id, attempt, error = %e, "repair attempt failed");
                    last = Some(e);
                }
            }
        }
        self.metrics.recovery(false);
        let e = last.unwrap_or_else(|| Error::Internal("no repair attempt ran".into()));
        Err(recast(
            &e,
            format!(
                "volume {}: the staging mount at {} is stale ({why}) and {RECOVERY_ATTEMPTS} \
                 repair attempts failed; last: {e}. The kubelet retries; if this persists, check \
                 that this node reaches the storage server at {}:{} (`nvme list-subsys`), then \
                 delete the pods using the volume so that it is staged afresh",
                s.volume_id,
                s.staging_path.display(),
                s.target.address,
                s.target.port
            ),
        ))
    }

    /// One attempt of a repair; each step observes first, so a later attempt continues
    /// where an earlier one stopped.
    async fn repair_attempt(&self, s: &StagingSpec<'_>, stale: &MountEntry, targets: &[(PathBuf, bool)]) -> Result<()> {
        let volume = s.volume_id;
        let device = self.connect(s.target).await?;
        let dev = self.mounter.device_number(&device).await?;
        let current = (device.clone(), dev.clone());
        let mounts = self.mounter.mounts().await?;
        let at_staging = mount_at(&mounts, s.staging_path).cloned();
        let staged = match &at_staging {
            Some(m) => self.classify(m, &s.target.nqn, Some(&current)).await?,
            None => Mount::Stale("nothing mounted".into()),
        };
        match staged {
            Mount::Current => {}
            Mount::Stale(_) => {
                for (t, _) in targets {
                    if let Some(m) = mount_at(&mounts, t)
                        && m.dev == stale.dev
                    {
                        tracing::info!(volume = %volume, target = %t.display(), "repair: unmounting the dead publish target");
                        self.unmount_all(t).await?;
                    }
                }
                if at_staging.is_some() {
                    tracing::info!(volume = %volume, staging = %s.staging_path.display(), device = %stale.source, "repair: unmounting the dead staging mount");
                    self.unmount_all(s.staging_path).await?;
                }
                tracing::info!(volume = %volume, staging = %s.staging_path.display(), device = %device.display(), "repair: mounting the volume's current device");
                self.mount_staging(s, &device, &dev).await?;
            }
            Mount::Foreign => {
                return Err(Error::AlreadyExists(format!(
                    "staging_target_path {} now has {} mounted, which is not volume {volume}",
                    s.staging_path.display(),
                    at_staging.map(|m| m.source).unwrap_or_default()
                )));
            }
        }
        let mounts = self.mounter.mounts().await?;
        for (t, readonly) in targets {
            if let Some(m) = mount_at(&mounts, t) {
                if m.dev == dev {
                    continue;
                }
                if !matches!(self.classify(m, &s.target.nqn, Some(&current)).await?, Mount::Stale(_)) {
                    tracing::warn!(volume = %volume, target = %t.display(), source = %m.source, "repair: publish target holds something else now; left alone");
                    continue;
                }
                self.unmount_all(t).await?;
            }
            tracing::info!(volume = %volume, target = %t.display(), readonly, "repair: binding the publish target again");
            self.mounter.prepare_target(t, TargetKind::Directory).await?;
            self.mounter.bind(s.staging_path, t, *readonly).await?;
        }
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
            if !ours && self.classify(&m, &nqn, None).await? == Mount::Foreign {
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
        // The CO tore the volume down (or gave up on it): no backoff survives that.
        self.backoff.forget(volume_id);
        // Spec: "If the volume corresponding to the volume_id is not staged to the
        // staging_target_path, the Plugin MUST reply 0 OK." — nothing mounted and nothing
        // connected is that case.
        let Some(device) = device else {
            return Ok(());
        };
        self.ensure_unused(volume_id, &device).await?;
        self.disconnect(&nqn).await?;
        Ok(())
    }

    /// Where `device` is in use: its mounts and raw block binds, from `mounts`.
    pub(crate) async fn users(&self, device: &Path, mounts: &[MountEntry]) -> Result<Vec<PathBuf>> {
        let dev = match self.mounter.device_number(device).await {
            Ok(d) => d,
            // The device node is already gone: nothing can use it.
            Err(MountError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut users: Vec<PathBuf> = mounts
            .iter()
            .filter(|m| m.dev == dev)
            .map(|m| m.target.clone())
            .collect();
        users.extend(self.mounter.device_binds(device).await?);
        Ok(users)
    }

    /// The mount table.
    pub(crate) async fn mounts(&self) -> Result<Vec<MountEntry>> {
        Ok(self.mounter.mounts().await?)
    }

    /// Busy check: no mount and no block bind of `device` remains.
    async fn ensure_unused(&self, volume_id: &VolumeId, device: &Path) -> Result<()> {
        let users = self.users(device, &self.mounter.mounts().await?).await?;
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

    /// NodePublishVolume: bind the staged filesystem (or the device node) to the target; a
    /// stale staging mount (or raw block bind) is repaired first.
    pub async fn publish(&self, r: &Publish) -> Result<()> {
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {} on this node; call NodeStageVolume first",
                r.volume_id,
                r.staging_path.display()
            ))
        };
        let nqn = &r.target.nqn;
        let mut current = self.current_device(nqn).await?;
        let mut mounts = self.mounter.mounts().await?;
        let single = r.cap.access == NodeAccess::SingleWriter;
        match &r.cap.kind {
            VolumeKind::Mount { fs_type, flags } => {
                let staged = match mount_at(&mounts, &r.staging_path) {
                    Some(m) => self.classify(m, nqn, current.as_ref()).await?,
                    None => return Err(not_staged()),
                };
                match staged {
                    Mount::Current => {}
                    Mount::Stale(why) => {
                        self.metrics.stale_mount("publish");
                        self.backoff.check(&r.volume_id)?;
                        let spec = StagingSpec {
                            volume_id: &r.volume_id,
                            staging_path: &r.staging_path,
                            fs_type,
                            flags,
                            readonly: r.cap.access == NodeAccess::ReadOnly,
                            target: &r.target,
                        };
                        let stale = mount_at(&mounts, &r.staging_path).cloned().ok_or_else(not_staged)?;
                        let outcome = self.repair(&spec, &stale, &mounts, &why).await;
                        self.record(&r.volume_id, outcome.as_ref().copied());
                        outcome?;
                        current = self.current_device(nqn).await?;
                        mounts = self.mounter.mounts().await?;
                    }
                    Mount::Foreign => return Err(not_staged()),
                }
                let (_, dev) = current.ok_or_else(not_staged)?;
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
                if let Some(m) = mount_at(&mounts, &r.target_path) {
                    match self.classify(m, nqn, current.as_ref()).await? {
                        Mount::Current => {
                            let (device, _) = current.as_ref().ok_or_else(not_staged)?;
                            let binds = self.mounter.device_binds(device).await?;
                            let same = binds.contains(&r.target_path) && is_ro(m) == r.readonly;
                            return self.already_published(r, same, m);
                        }
                        Mount::Stale(why) => {
                            // The bind shows a device node that is gone: bind the volume's
                            // current device there again.
                            self.metrics.stale_mount("publish");
                            self.backoff.check(&r.volume_id)?;
                            tracing::warn!(volume = %r.volume_id, target = %r.target_path.display(), why, "stale raw block publish: binding the current device again");
                            let outcome = self.unbind_stale_block(r).await;
                            self.record(&r.volume_id, outcome.as_ref().map(|_| ()));
                            self.metrics.recovery(outcome.is_ok());
                            current = Some(outcome?);
                        }
                        Mount::Foreign => return self.already_published(r, false, m),
                    }
                }
                if current.is_none() {
                    // A raw block volume is staged by its connection alone: one lost (its
                    // controller gone after ctrl-loss-tmo) is repaired here by connecting
                    // again, as a stale staging mount is for a filesystem — a restarted pod
                    // gets only NodePublishVolume (found by the simulation: a KubeVirt VM's
                    // disk stayed unusable after its controller was lost).
                    self.metrics.stale_mount("publish");
                    self.backoff.check(&r.volume_id)?;
                    tracing::warn!(volume = %r.volume_id, "raw block volume without a connection: connecting again");
                    let outcome = self.connect(&r.target).await;
                    self.record(&r.volume_id, outcome.as_ref().map(|_| ()));
                    self.metrics.recovery(outcome.is_ok());
                    let device = outcome?;
                    let dev = self.mounter.device_number(&device).await?;
                    current = Some((device, dev));
                }
                let (device, _) = current.ok_or_else(not_staged)?;
                let binds = self.mounter.device_binds(&device).await?;
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

    /// Connects the raw block volume of `r` and unmounts the stale bind at its target.
    async fn unbind_stale_block(&self, r: &Publish) -> Result<Device> {
        let device = self.connect(&r.target).await?;
        let dev = self.mounter.device_number(&device).await?;
        self.unmount_all(&r.target_path).await?;
        Ok((device, dev))
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

    /// NodeExpandVolume: re-read the device size, grow the filesystem online; the new
    /// capacity in bytes.
    pub async fn expand(
        &self,
        volume_id: &VolumeId,
        volume_path: &Path,
        required_bytes: Option<u64>,
    ) -> Result<u64> {
        let nqn = self.nqn_for(volume_id);
        let current = self.current_device(&nqn).await?;
        let mounts = self.mounter.mounts().await?;
        if let Some(m) = mount_at(&mounts, volume_path)
            && let Mount::Stale(why) = self.classify(m, &nqn, current.as_ref()).await?
        {
            self.metrics.stale_mount("expand");
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} at {} is stale: {why}; it cannot grow until NodeStageVolume \
                 or NodePublishVolume repairs it (restart the pod using it), then expand again",
                volume_path.display()
            )));
        }
        // Spec (NodeExpandVolume errors): "Volume not found | 5 NOT_FOUND | Indicates that a
        // volume corresponding to the specified volume_id could not be found."
        let Some((device, dev)) = current else {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not attached on this node"
            )));
        };
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
        let nqn = self.nqn_for(volume_id);
        let current = self.current_device(&nqn).await?;
        let mounts = self.mounter.mounts().await?;
        let abnormal = |msg: String| VolumeHealth {
            usage: UsageStats::default(),
            block: false,
            abnormal: Some(msg),
        };
        let Some(m) = mount_at(&mounts, volume_path).cloned() else {
            return match current {
                Some(_) => Ok(abnormal(format!(
                    "volume {volume_id} is attached but not mounted at {} (unmounted behind \
                     the plugin's back?); restart the pod so that NodePublishVolume mounts it \
                     again",
                    volume_path.display()
                ))),
                None => Err(Error::NotFound(format!(
                    "volume {volume_id} is not attached on this node"
                ))),
            };
        };
        match self.classify(&m, &nqn, current.as_ref()).await? {
            Mount::Current => match current {
                Some((device, _)) if m.fs_type == "devtmpfs" => Ok(VolumeHealth {
                    usage: UsageStats {
                        total_bytes: self.mounter.device_size(&device).await?,
                        ..UsageStats::default()
                    },
                    block: true,
                    abnormal: None,
                }),
                _ => Ok(VolumeHealth {
                    usage: self.mounter.stats(volume_path).await?,
                    block: false,
                    abnormal: None,
                }),
            },
            Mount::Stale(why) => {
                self.metrics.stale_mount("stats");
                let mut msg = format!(
                    "volume {volume_id} at {} is stale: {why}. NodeStageVolume or \
                     NodePublishVolume repairs it: restart the pod (delete it) so that the \
                     kubelet publishes the volume again",
                    volume_path.display()
                );
                if let Some(f) = self.backoff.failing(volume_id) {
                    msg.push_str(&format!(
                        "; repairs keep failing ({} in a row, last: {})",
                        f.count, f.last_error
                    ));
                }
                Ok(abnormal(msg))
            }
            Mount::Foreign => Err(Error::NotFound(format!(
                "volume_path {} has {} mounted, not volume {volume_id}",
                volume_path.display(),
                m.source
            ))),
        }
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
