//! The orphan sweep: NVMe connections of this driver that nothing on the node uses and no
//! record holds are disconnected after a grace period, at start-up and periodically.
//!
//! A connection is left behind when its unstage never ran to the end (the node plugin was
//! down while its pod went away and the CO gave up, a force-detach after a partition, a
//! crash between a connect and the mount of a stage the CO abandoned). Left alone it keeps
//! a controller reconnecting forever against the RDS and a device the volume's next holder
//! must not share.
//!
//! Invariants:
//! - Only this driver's connections are judged (the initiator lists only NQNs with the
//!   driver's prefix, and the NQN must name a valid volume id); nothing but a disconnect is
//!   ever done — no mount is touched, here or anywhere else on the host.
//! - A connection is an orphan only when the controller's records — the VolumeAttachments
//!   of this node, read from the orchestrator — do not hold its volume, **and** either no
//!   mount or raw block bind uses its device, or its controller is not live (reconnecting).
//!   The second case is a volume fenced away from this node: Kubernetes force-detached it
//!   (a partition, a node that stopped reporting), the RDS's allow list now refuses this
//!   host, and with `ctrl-loss-tmo=-1` the controller would reconnect forever, every
//!   `umount` of its filesystem waiting on I/O that can never land. Disconnecting fails that
//!   queued I/O (it could only have reached a disk the volume's next holder now owns) and
//!   lets the kubelet's NodeUnpublish/NodeUnstage finish; the mounts themselves are still
//!   left to the kubelet. Found by the simulation (a node partitioned across an RDS outage,
//!   its volume force-detached and fenced: its kubelet's cleanup hung).
//!   Without records (no Kubernetes: the embedded default) nothing is an orphan: a staged
//!   raw block volume has no mount to show for it.
//! - The grace period is real: a connection must be seen an orphan continuously, by this
//!   process, for `grace` before it goes (a restart starts the clock again; the earlier
//!   driver faked the age, so its grace never protected anything).
//! - Act under the volume's in-flight key (the CSI service's guard), after reading the
//!   records and the mount table again: a NodeStageVolume of the volume either finished
//!   (its mount is seen), is refused while the sweep holds the key, or starts after the
//!   disconnect and connects afresh. VolumeAttachments exist before the CO stages, so a
//!   stage in progress is always held by a record.
//! - `dry_run` logs what would be disconnected and does nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::node::ops::NodeOps;
use crate::ports::Cluster;
use crate::types::{NodeId, VolumeId};

/// Keeps other operations off a volume while held: the CSI service's in-flight guard, so
/// the sweep and an RPC on the same volume never interleave.
pub trait VolumeBusy: Send + Sync {
    /// Holds `volume` until the returned value is dropped; `None` when an operation on it
    /// is in flight.
    fn try_hold(&self, volume: &VolumeId) -> Option<Box<dyn Send>>;
}

/// Settings of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrphanConfig {
    /// Time between sweeps (zero: no sweep at all, not even at start-up).
    pub interval: Duration,
    /// How long a connection must stay an orphan before it is disconnected.
    pub grace: Duration,
    /// Only log what would be disconnected.
    pub dry_run: bool,
}

impl Default for OrphanConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            grace: Duration::from_secs(600),
            dry_run: false,
        }
    }
}

/// What one sweep found and did (NQNs, sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Whether the orchestrator's records were available (without them nothing is judged).
    pub judged: bool,
    /// Orphans seen, not yet past their grace period.
    pub waiting: Vec<String>,
    /// Orphans disconnected.
    pub disconnected: Vec<String>,
    /// Orphans past their grace period that `dry_run` left connected.
    pub would_disconnect: Vec<String>,
}

/// The sweep of one node.
pub struct OrphanSweeper {
    node: NodeId,
    ops: NodeOps,
    cluster: Arc<dyn Cluster>,
    busy: Arc<dyn VolumeBusy>,
    cfg: OrphanConfig,
    metrics: Arc<Metrics>,
    /// When each current orphan was first seen, by NQN.
    seen: Mutex<BTreeMap<String, Instant>>,
}

impl OrphanSweeper {
    /// The sweep of `node` over its core `ops`, asking `cluster` for the records and
    /// keeping RPCs off a volume through `busy` while it acts on it.
    pub fn new(
        node: NodeId,
        ops: NodeOps,
        cluster: Arc<dyn Cluster>,
        busy: Arc<dyn VolumeBusy>,
        cfg: OrphanConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            ops,
            cluster,
            busy,
            cfg,
            metrics,
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sweeps now, then every interval, until the runtime ends. Nothing when the interval
    /// is zero.
    pub fn spawn(self: Arc<Self>) {
        if self.cfg.interval.is_zero() {
            tracing::info!("orphan sweep off");
            return;
        }
        tracing::info!(
            interval_secs = self.cfg.interval.as_secs(),
            grace_secs = self.cfg.grace.as_secs(),
            dry_run = self.cfg.dry_run,
            "orphan sweep on"
        );
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "orphan sweep failed; next one in an interval");
                }
                tokio::time::sleep(self.cfg.interval).await;
            }
        });
    }

    /// The volumes the records hold on this node; `None` without records.
    async fn held(&self) -> Result<Option<Vec<VolumeId>>> {
        Ok(self
            .cluster
            .volume_attachments_on(&self.node)
            .await?
            .map(|vas| vas.into_iter().map(|va| va.volume_id).collect()))
    }

    /// The orphans among this driver's connections, given the volumes `held` by records.
    async fn orphans(&self, held: &[VolumeId]) -> Result<Vec<(String, VolumeId)>> {
        let mounts = self.ops.mounts().await?;
        let mut out = Vec::new();
        for c in self.ops.connections().await? {
            let Some(volume) = self.ops.volume_of(&c.nqn) else {
                continue;
            };
            // A connection in use stays, unless it is fenced away: its controller keeps
            // reconnecting and no record holds its volume on this node any more.
            if held.contains(&volume)
                || (c.live && !self.ops.users(&c.device, &mounts).await?.is_empty())
            {
                continue;
            }
            out.push((c.nqn, volume));
        }
        Ok(out)
    }

    /// One sweep.
    pub async fn sweep(&self) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let Some(held) = self.held().await? else {
            self.seen().clear();
            tracing::debug!("orphan sweep: the orchestrator keeps no VolumeAttachments; nothing judged");
            return Ok(report);
        };
        report.judged = true;
        let orphans = self.orphans(&held).await?;
        let now = Instant::now();
        let due: Vec<(String, VolumeId)> = {
            let mut seen = self.seen();
            seen.retain(|nqn, _| orphans.iter().any(|(n, _)| n == nqn));
            let mut due = Vec::new();
            for (nqn, volume) in orphans {
                let since = *seen.entry(nqn.clone()).or_insert(now);
                if now.duration_since(since) >= self.cfg.grace {
                    due.push((nqn, volume));
                } else {
                    report.waiting.push(nqn);
                }
            }
            due
        };
        for (nqn, volume) in due {
            let Some(_key) = self.busy.try_hold(&volume) else {
                report.waiting.push(nqn);
                continue;
            };
            // Again, under the key: a stage that finished meanwhile shows its mount, a
            // VolumeAttachment created meanwhile shows in the records.
            let Some(held) = self.held().await? else {
                return Ok(report);
            };
            if !self
                .orphans(&held)
                .await?
                .iter()
                .any(|(n, _)| *n == nqn)
            {
                self.seen().remove(&nqn);
                continue;
            }
            if self.cfg.dry_run {
                tracing::warn!(nqn = %nqn, volume = %volume, grace_secs = self.cfg.grace.as_secs(), "orphan connection: would disconnect it (dry run)");
                self.metrics.orphan("dry_run");
                report.would_disconnect.push(nqn);
                continue;
            }
            match self.ops.disconnect(&nqn).await {
                Ok(()) => {
                    tracing::warn!(nqn = %nqn, volume = %volume, grace_secs = self.cfg.grace.as_secs(), "orphan connection disconnected: no VolumeAttachment of this node held it, and no mount used it or its controller kept reconnecting");
                    self.metrics.orphan("disconnected");
                    self.seen().remove(&nqn);
                    report.disconnected.push(nqn);
                }
                Err(e) => {
                    tracing::warn!(nqn = %nqn, error = %e, "orphan connection: disconnect failed; retried next sweep");
                    self.metrics.orphan("error");
                }
            }
        }
        report.waiting.sort();
        Ok(report)
    }
}
