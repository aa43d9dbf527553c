//! The orphan volume reconciler: finds disks of this driver on the RDS that nothing in the
//! orchestrator wants any more, reports them, and (only when told to) deletes them after a
//! grace period.
//!
//! A disk is left behind when a CreateVolume succeeded on the RDS but its PersistentVolume
//! never came (the controller crashed between `/disk add` and its answer, and the CO gave
//! up), when a PV was deleted without a DeleteVolume (a `Retain` policy edited by hand, an
//! admin's `kubectl delete pv` with the finalizer removed), or when a snapshot's
//! VolumeSnapshotContent went away without a DeleteSnapshot.
//!
//! Invariants:
//! - Only this driver's disks are judged: volumes (exported under the driver's NQN prefix)
//!   and snapshots (non-exported copies carrying the driver's source comment), both under
//!   its volume path (the `Rds` port lists nothing else). A foreign disk is never touched.
//! - A disk is an orphan only when no PersistentVolume of this driver names it as its volume
//!   handle, no VolumeSnapshotContent names it as its snapshot handle, no CreateVolume or
//!   CreateSnapshot on it is in flight (the CSI service's in-flight key), no attachment
//!   record holds it and no VolumeAttachment names it. Without the orchestrator's objects
//!   (no Kubernetes) nothing is an orphan.
//! - The default is a dry run: each orphan is logged every pass (disk, kind, size, since
//!   when this controller has seen it orphaned) and counted in the gauge; nothing is
//!   deleted. `delete` mode deletes an orphan only once this process has seen it orphaned
//!   continuously for the grace period: a restart, or a pass that finds it wanted again,
//!   restarts the clock, so the grace is never shortened (the earlier Go driver measured
//!   the disk's age from a fabricated timestamp, so its grace protected nothing).
//! - A deletion is decided again at the moment of acting: under the disk's in-flight key
//!   (a CreateVolume of that name arriving meanwhile is ABORTED and retried after the
//!   delete, creating the disk afresh), on a fresh read of the references (never on a watch
//!   cache alone), of the VolumeAttachments and of the volume's stored attachment records,
//!   and only while this replica still leads (the [`Leadership`] port: one replica of the
//!   controller Deployment deletes).
//! - Events: `OrphanVolumeFound` when a disk is first seen orphaned, `OrphanVolumeDeleted`
//!   when it is deleted (recorded on its PV's name: an orphan has no claim).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::attachment::AttachmentManager;
use crate::error::Result;
use crate::metrics::{Reconciler, ReconcilerMetrics};
use crate::ports::cluster::{ClusterEvent, DiskReferences, reason};
use crate::ports::rds::{Disk, DiskEntry};
use crate::ports::{Clock, Cluster, ClusterWatch, Leadership, Rds};
use crate::types::VolumeId;
use crate::types::note::SnapshotNote;

/// What the orphan reconciler does with what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrphanMode {
    /// Not run at all.
    Off,
    /// Report orphans (log line, gauge, Event); delete nothing.
    DryRun,
    /// Report orphans, and delete each once it has stayed orphaned for the grace period.
    Delete,
}

/// Settings of the orphan volume reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrphanVolumeConfig {
    /// Dry run (the default), delete, or off.
    pub mode: OrphanMode,
    /// Time between passes.
    pub interval: Duration,
    /// How long a disk must be seen orphaned, continuously, by this process before
    /// `delete` mode deletes it.
    pub grace: Duration,
}

impl Default for OrphanVolumeConfig {
    fn default() -> Self {
        Self {
            mode: OrphanMode::DryRun,
            interval: Duration::from_secs(600),
            grace: Duration::from_secs(3600),
        }
    }
}

/// Whether a disk is a volume or a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiskKind {
    /// An exported disk under the driver's NQN prefix.
    Volume,
    /// A non-exported copy carrying the driver's source comment.
    Snapshot,
}

impl DiskKind {
    /// `volume` or `snapshot`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskKind::Volume => "volume",
            DiskKind::Snapshot => "snapshot",
        }
    }
}

/// Keeps CSI calls off a disk while held, and tells whether one is in flight: the
/// controller service's in-flight keys, shared with the reconciler.
pub trait DiskBusy: Send + Sync {
    /// Whether a call on the disk in `slot` is in flight now.
    fn in_flight(&self, kind: DiskKind, slot: &str) -> bool;
    /// Holds the disk in `slot` until the returned value is dropped (a call on it is then
    /// ABORTED); `None` when a call on it is in flight.
    fn try_hold(&self, kind: DiskKind, slot: &str) -> Option<Box<dyn Send>>;
}

/// What one pass found and did (slots, sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrphanReport {
    /// Whether the orchestrator's references were available (without them nothing is
    /// judged).
    pub judged: bool,
    /// Every orphan this pass found.
    pub orphans: Vec<String>,
    /// Orphans seen for the first time.
    pub new: Vec<String>,
    /// Orphans deleted.
    pub deleted: Vec<String>,
    /// Orphans past their grace period that the dry run left alone.
    pub would_delete: Vec<String>,
}

/// When an orphan was first seen (this process's clock), and its wall-clock time for the log.
#[derive(Debug, Clone, Copy)]
struct Seen {
    since: Instant,
    at: SystemTime,
}

/// The orphan volume reconciler of one controller instance.
pub struct OrphanVolumes {
    rds: Arc<dyn Rds>,
    attachments: Arc<AttachmentManager>,
    cluster: Arc<dyn Cluster>,
    busy: Arc<dyn DiskBusy>,
    clock: Arc<dyn Clock>,
    nqn_prefix: String,
    cfg: OrphanVolumeConfig,
    metrics: ReconcilerMetrics,
    seen: Mutex<BTreeMap<String, Seen>>,
    watch: Option<Arc<dyn ClusterWatch>>,
}

impl std::fmt::Debug for OrphanVolumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrphanVolumes")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// An orphan candidate: a disk of this driver.
struct Candidate {
    slot: String,
    kind: DiskKind,
    size_bytes: u64,
}

impl OrphanVolumes {
    /// The reconciler of the disks on `rds` exported under `nqn_prefix`, judged against
    /// `cluster`'s references and `attachments`' records, keeping CSI calls off a disk
    /// through `busy` while it deletes it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rds: Arc<dyn Rds>,
        attachments: Arc<AttachmentManager>,
        cluster: Arc<dyn Cluster>,
        busy: Arc<dyn DiskBusy>,
        clock: Arc<dyn Clock>,
        nqn_prefix: impl Into<String>,
        cfg: OrphanVolumeConfig,
        metrics: ReconcilerMetrics,
    ) -> Self {
        Self {
            rds,
            attachments,
            cluster,
            busy,
            clock,
            nqn_prefix: nqn_prefix.into(),
            cfg,
            metrics,
            seen: Mutex::new(BTreeMap::new()),
            watch: None,
        }
    }

    /// Judges from `watch`'s caches (once they are listed) instead of listing the
    /// PersistentVolumes, VolumeSnapshotContents and VolumeAttachments every pass; a
    /// deletion is still decided on fresh answers from the API.
    pub fn with_watch(mut self, watch: Arc<dyn ClusterWatch>) -> Self {
        self.watch = Some(watch);
        self
    }

    /// What references the disks: the watch's cache when it has listed them, else the API.
    async fn references(&self) -> Result<Option<DiskReferences>> {
        if let Some(refs) = self.watch.as_ref().and_then(|w| w.disk_references()) {
            return Ok(Some(refs));
        }
        Ok(self.cluster.disk_references(false).await?)
    }

    /// The settings.
    pub fn config(&self) -> &OrphanVolumeConfig {
        &self.cfg
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets every orphan seen: this replica stopped leading, so what it saw no longer
    /// counts towards a grace period (a later leadership starts the clocks again).
    pub fn forget(&self) {
        self.seen().clear();
        self.metrics.orphans(0, 0);
    }

    /// This driver's disks: volumes under its NQN prefix, and its snapshots.
    fn ours(&self, disk: &Disk) -> Option<DiskKind> {
        match &disk.export {
            Some(e) if e.nqn.starts_with(&self.nqn_prefix) => Some(DiskKind::Volume),
            Some(_) => None,
            None => disk
                .comment
                .as_deref()
                .and_then(SnapshotNote::parse)
                .map(|_| DiskKind::Snapshot),
        }
    }

    /// Whether `slot` is wanted, a call in flight on it aside: referenced, or published.
    fn referenced(
        &self,
        kind: DiskKind,
        slot: &str,
        refs: &DiskReferences,
        published: &BTreeSet<String>,
    ) -> bool {
        let referenced = match kind {
            DiskKind::Volume => refs.volumes.contains(slot),
            DiskKind::Snapshot => refs.snapshots.as_ref().is_none_or(|s| s.contains(slot)),
        };
        referenced
            || published.contains(slot)
            || VolumeId::new(slot).is_ok_and(|v| self.attachments.is_attached(&v))
    }

    /// The volumes the VolumeAttachments name (none without the orchestrator's objects).
    async fn published(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .cluster
            .volume_attachments()
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|va| va.volume_id.to_string())
            .collect())
    }

    /// One pass; `leader` is asked again before anything is deleted.
    pub async fn pass(&self, leader: &dyn Leadership) -> Result<OrphanReport> {
        let started = Instant::now();
        let result = self.judge(leader).await;
        self.metrics.run(
            Reconciler::OrphanVolumes,
            result.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn judge(&self, leader: &dyn Leadership) -> Result<OrphanReport> {
        let mut report = OrphanReport::default();
        if self.cfg.mode == OrphanMode::Off {
            return Ok(report);
        }
        // The disks first, then what wants them: a disk created after the references were
        // read would otherwise look unreferenced.
        let disks = self.rds.list_disks("").await?;
        let Some(refs) = self.references().await? else {
            self.forget();
            tracing::debug!("orphan volume reconciler: the orchestrator keeps no PersistentVolumes; nothing judged");
            return Ok(report);
        };
        report.judged = true;
        let published = match self.watch.as_ref().and_then(|w| w.volume_attachments()) {
            Some(vas) => vas.into_iter().map(|va| va.volume_id.to_string()).collect(),
            None => self.published().await?,
        };
        let candidates: Vec<Candidate> = disks
            .into_iter()
            .filter_map(|d| {
                let kind = self.ours(&d)?;
                let wanted = self.referenced(kind, &d.slot, &refs, &published)
                    || self.busy.in_flight(kind, &d.slot);
                (!wanted).then_some(Candidate {
                    slot: d.slot,
                    kind,
                    size_bytes: d.size_bytes,
                })
            })
            .collect();
        let now = Instant::now();
        let wall = self.clock.now();
        let mut due = Vec::new();
        {
            let current: BTreeSet<&str> = candidates.iter().map(|c| c.slot.as_str()).collect();
            let mut seen = self.seen();
            seen.retain(|slot, _| current.contains(slot.as_str()));
            for c in &candidates {
                let first = *seen.entry(c.slot.clone()).or_insert_with(|| {
                    report.new.push(c.slot.clone());
                    Seen {
                        since: now,
                        at: wall,
                    }
                });
                let orphaned_for = now.duration_since(first.since);
                let first_seen_unix = first
                    .at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                tracing::warn!(
                    disk = %c.slot,
                    kind = c.kind.as_str(),
                    size_bytes = c.size_bytes,
                    first_seen_unix,
                    orphaned_for_secs = orphaned_for.as_secs(),
                    mode = ?self.cfg.mode,
                    "orphan disk: no PersistentVolume, VolumeSnapshotContent, CreateVolume in flight, attachment record or VolumeAttachment references it"
                );
                report.orphans.push(c.slot.clone());
                if orphaned_for >= self.cfg.grace {
                    due.push((c.slot.clone(), c.kind));
                }
            }
        }
        self.metrics
            .orphans(candidates.len() as u64, report.new.len() as u64);
        for slot in &report.new {
            self.event(
                slot,
                reason::ORPHAN_VOLUME_FOUND,
                &format!(
                    "disk {slot} on the RDS is referenced by no PersistentVolume or \
                     VolumeSnapshotContent of this driver (mode {:?}, grace {} s)",
                    self.cfg.mode,
                    self.cfg.grace.as_secs()
                ),
                true,
            )
            .await;
        }
        if due.is_empty() {
            return Ok(report);
        }
        if self.cfg.mode == OrphanMode::DryRun {
            for (slot, _) in due {
                tracing::warn!(disk = %slot, grace_secs = self.cfg.grace.as_secs(), "orphan disk past its grace period: would delete it (dry run; --orphan-reconciler=delete deletes)");
                report.would_delete.push(slot);
            }
            return Ok(report);
        }
        self.delete_due(leader, due, &mut report).await?;
        Ok(report)
    }

    /// Deletes the orphans `due`, each decided again under its in-flight key from fresh
    /// answers.
    async fn delete_due(
        &self,
        leader: &dyn Leadership,
        due: Vec<(String, DiskKind)>,
        report: &mut OrphanReport,
    ) -> Result<()> {
        let mut held = Vec::new();
        for (slot, kind) in due {
            if let Some(key) = self.busy.try_hold(kind, &slot) {
                held.push((slot, kind, key));
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        // Fresh, under the keys: a CreateVolume that finished meanwhile has its disk
        // referenced by now or is refused while the key is held.
        let Some(refs) = self.cluster.disk_references(true).await? else {
            return Ok(());
        };
        let published = self.published().await?;
        for (slot, kind, _key) in held {
            if self.referenced(kind, &slot, &refs, &published) {
                self.seen().remove(&slot);
                continue;
            }
            let Some(disk) = self.rds.get_disk(&slot).await? else {
                self.seen().remove(&slot);
                continue;
            };
            if self.ours(&disk) != Some(kind) {
                self.seen().remove(&slot);
                continue;
            }
            if kind == DiskKind::Volume
                && let Ok(volume) = VolumeId::new(slot.as_str())
                && !self.attachments.stored_holders(&volume).await?.is_empty()
            {
                self.seen().remove(&slot);
                continue;
            }
            // Only the leader deletes, and it may have lost the lease during this pass.
            if !leader.try_lead().await.unwrap_or(false) {
                tracing::info!("orphan volume reconciler: no longer the leader; deleting nothing more");
                return Ok(());
            }
            // Volume or snapshot alike: the entry just observed, then its file.
            let deleted = self.rds.remove_disk(&DiskEntry::from(disk.clone())).await;
            if let Err(e) = deleted {
                tracing::warn!(disk = %slot, error = %e, "cannot delete the orphan disk; the next pass retries");
                continue;
            }
            tracing::warn!(disk = %slot, kind = kind.as_str(), size_bytes = disk.size_bytes, grace_secs = self.cfg.grace.as_secs(), "orphan disk deleted");
            self.seen().remove(&slot);
            self.metrics.orphan_deleted();
            self.event(
                &slot,
                reason::ORPHAN_VOLUME_DELETED,
                &format!(
                    "orphan disk {slot} deleted from the RDS after {} s referenced by nothing",
                    self.cfg.grace.as_secs()
                ),
                false,
            )
            .await;
            report.deleted.push(slot);
        }
        Ok(())
    }

    async fn event(&self, slot: &str, reason: &str, message: &str, warning: bool) {
        let Ok(volume_id) = VolumeId::new(slot) else {
            return;
        };
        let event = ClusterEvent {
            volume_id,
            reason: reason.to_string(),
            message: message.to_string(),
            warning,
        };
        if let Err(e) = self.cluster.record_event(&event).await {
            tracing::warn!(disk = %slot, error = %e, "cannot record event {reason}");
        }
    }
}
