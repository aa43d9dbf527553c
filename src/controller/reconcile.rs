//! The controller's reconcilers and the loop that runs them on the leading replica: the
//! attachment reconciler (here) and the orphan volume reconciler ([`super::orphans`]).
//!
//! The attachment reconciler clears attachment records nothing will ever unpublish: a
//! record whose Node was deleted (the machine is gone; its single-node volume would stay
//! fenced to it until a conflicting publish came along), and a record whose
//! VolumeAttachment was released by hand. The rule of each clear is
//! [`AttachmentManager::clear_if_stale`]'s: decided under the volume's lock from fresh
//! answers, a conditional write, then the fence. A pass is cheap when nothing is stale: the
//! records in memory, one read of the VolumeAttachments, one read per holder node.
//!
//! Invariants of the loop:
//! - Only the leader acts: every tick acquires or renews the lease ([`Leadership`]); a
//!   replica that does not lead forgets the orphans it saw (their grace starts again when it
//!   leads) and does nothing else.
//! - The tick is a third of the lease's duration, so a leader renews well before its lease
//!   expires; the orphan pass runs every orphan interval, the attachment pass every
//!   attachment interval, and at once when [`Reconcilers::nudge`] says the cluster changed
//!   (a Node or VolumeAttachment deleted, seen by a watch).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::attachment::AttachmentManager;
use crate::controller::orphans::{OrphanMode, OrphanVolumes};
use crate::error::Result;
use crate::metrics::{Reconciler, ReconcilerMetrics, StaleReason};
use crate::ports::{Cluster, ClusterWatch, Leadership};
use crate::types::{NodeId, VolumeId};

/// The attachment reconciler.
pub struct StaleAttachments {
    attachments: Arc<AttachmentManager>,
    cluster: Arc<dyn Cluster>,
    metrics: ReconcilerMetrics,
    watch: Option<Arc<dyn ClusterWatch>>,
}

impl std::fmt::Debug for StaleAttachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleAttachments").finish_non_exhaustive()
    }
}

impl StaleAttachments {
    /// The reconciler of `attachments`' records against `cluster`.
    pub fn new(
        attachments: Arc<AttachmentManager>,
        cluster: Arc<dyn Cluster>,
        metrics: ReconcilerMetrics,
    ) -> Self {
        Self {
            attachments,
            cluster,
            metrics,
            watch: None,
        }
    }

    /// Picks candidates from `watch`'s VolumeAttachments (once listed) instead of listing
    /// them every pass; each clear is still decided on fresh answers
    /// ([`AttachmentManager::clear_if_stale`]).
    pub fn with_watch(mut self, watch: Arc<dyn ClusterWatch>) -> Self {
        self.watch = Some(watch);
        self
    }

    /// One pass: the records whose Node is gone or which no VolumeAttachment names are
    /// handed to [`AttachmentManager::clear_if_stale`]; returns what was cleared, sorted.
    pub async fn pass(&self) -> Result<Vec<(VolumeId, NodeId, StaleReason)>> {
        let started = Instant::now();
        let result = self.judge().await;
        self.metrics.run(
            Reconciler::Attachments,
            result.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn judge(&self) -> Result<Vec<(VolumeId, NodeId, StaleReason)>> {
        let records = self.attachments.list();
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Without VolumeAttachments (no Kubernetes) there is nothing to judge against.
        let vas = match self.watch.as_ref().and_then(|w| w.volume_attachments()) {
            Some(vas) => vas,
            None => match self.cluster.volume_attachments().await? {
                Some(vas) => vas,
                None => return Ok(Vec::new()),
            },
        };
        let mut nodes: BTreeMap<NodeId, bool> = BTreeMap::new();
        for r in &records {
            if !nodes.contains_key(&r.node_id) {
                let exists = self.cluster.node_exists(&r.node_id).await?;
                nodes.insert(r.node_id.clone(), exists);
            }
        }
        let mut cleared = Vec::new();
        for r in records {
            let va = vas
                .iter()
                .find(|va| va.volume_id == r.volume_id && va.node_id == r.node_id);
            let node_gone = !nodes.get(&r.node_id).copied().unwrap_or(true);
            let candidate = match va {
                None => true,
                Some(va) => node_gone && va.deleting,
            };
            if !candidate {
                continue;
            }
            match self
                .attachments
                .clear_if_stale(&r.volume_id, &r.node_id)
                .await
            {
                Ok(Some(why)) => cleared.push((r.volume_id, r.node_id, why)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(volume_id = %r.volume_id, node_id = %r.node_id, error = %e, "cannot clear a stale attachment record; the next pass retries");
                }
            }
        }
        Ok(cleared)
    }
}

/// Settings of the reconcilers' loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// How long a lease lasts without renewal; the loop ticks every third of it.
    pub lease_duration: Duration,
    /// Time between attachment passes (zero: only when nudged).
    pub attachment_interval: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            attachment_interval: Duration::from_secs(300),
        }
    }
}

/// The controller's reconcilers, run on the leader.
pub struct Reconcilers {
    leader: Arc<dyn Leadership>,
    orphans: Arc<OrphanVolumes>,
    attachments: Arc<StaleAttachments>,
    cfg: ReconcileConfig,
    nudged: Notify,
}

impl std::fmt::Debug for Reconcilers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconcilers")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Reconcilers {
    /// The loop of `orphans` and `attachments` under `leader`'s lease.
    pub fn new(
        leader: Arc<dyn Leadership>,
        orphans: Arc<OrphanVolumes>,
        attachments: Arc<StaleAttachments>,
        cfg: ReconcileConfig,
    ) -> Self {
        Self {
            leader,
            orphans,
            attachments,
            cfg,
            nudged: Notify::new(),
        }
    }

    /// The orphan volume reconciler.
    pub fn orphans(&self) -> &Arc<OrphanVolumes> {
        &self.orphans
    }

    /// The attachment reconciler.
    pub fn attachments(&self) -> &Arc<StaleAttachments> {
        &self.attachments
    }

    /// The cluster changed in a way the attachment reconciler judges (a Node or a
    /// VolumeAttachment deleted): its next pass runs at the next tick.
    pub fn nudge(&self) {
        self.nudged.notify_one();
    }

    /// One tick: leads? then the passes that are due. Returns whether this replica leads.
    pub async fn tick(&self, orphans_due: bool, attachments_due: bool) -> bool {
        let leads = match self.leader.try_lead().await {
            Ok(leads) => leads,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the reconcilers' lease; not leading until it can");
                false
            }
        };
        if !leads {
            self.orphans.forget();
            return false;
        }
        if attachments_due && let Err(e) = self.attachments.pass().await {
            tracing::warn!(error = %e, "attachment reconciler pass failed; retried at the next one");
        }
        if orphans_due && let Err(e) = self.orphans.pass(&*self.leader).await {
            tracing::warn!(error = %e, "orphan volume reconciler pass failed; retried at the next one");
        }
        true
    }

    /// Runs the loop until the runtime ends.
    pub fn spawn(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let orphan_every = (this.orphans.config().mode != OrphanMode::Off)
            .then_some(this.orphans.config().interval)
            .filter(|d| !d.is_zero());
        let attach_every = Some(this.cfg.attachment_interval).filter(|d| !d.is_zero());
        if orphan_every.is_none() && attach_every.is_none() {
            tracing::info!("controller reconcilers off");
            return;
        }
        let tick = (this.cfg.lease_duration / 3).max(Duration::from_secs(1));
        tracing::info!(
            orphan_mode = ?this.orphans.config().mode,
            orphan_interval_secs = orphan_every.map(|d| d.as_secs()),
            orphan_grace_secs = this.orphans.config().grace.as_secs(),
            attachment_interval_secs = attach_every.map(|d| d.as_secs()),
            "controller reconcilers on (leader only)"
        );
        tokio::spawn(async move {
            let start = Instant::now();
            // The first passes run at the first tick that leads.
            let mut next_orphans = orphan_every.map(|_| start);
            let mut next_attach = attach_every.map(|_| start);
            let mut nudged = false;
            loop {
                let now = Instant::now();
                let orphans_due = next_orphans.is_some_and(|t| now >= t);
                let attach_due = nudged || next_attach.is_some_and(|t| now >= t);
                if this.tick(orphans_due, attach_due).await {
                    if orphans_due {
                        next_orphans = orphan_every.map(|d| now + d);
                    }
                    if attach_due {
                        nudged = false;
                        next_attach = attach_every.map(|d| now + d);
                    }
                } else {
                    // A new leader starts its passes at once.
                    next_orphans = orphan_every.map(|_| now);
                    next_attach = attach_every.map(|_| now);
                }
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = this.nudged.notified() => { nudged = true; }
                }
            }
        });
    }
}
