//! The attachment manager: which volume is attached to which node, durable before it is
//! acknowledged, serialised per volume, fenced for single-node volumes.
//!
//! Invariants (each closes a bug of the earlier Go driver):
//! - the check (who holds this volume?) and the act (record the new holder set) run under
//!   the same per-volume lock, so two nodes publishing one volume concurrently cannot both
//!   win;
//! - a change is applied to memory tentatively, written through the store, and rolled back
//!   if the write fails or the call is cancelled: nothing is reported attached that is not
//!   durable, and memory never claims a holder the store refused;
//! - untrack names the node: an unpublish from a node that no longer holds the volume
//!   leaves the current holder alone;
//! - the per-volume lock entries are freed when unused (see [`super::lock`]);
//! - the data-path fence ([`super::fence`]) moves only after the attachment record is
//!   durable, and is re-checked against the store after the move lands: a publish that
//!   loses a race never moves it, and a move that raced another replica is corrected to what
//!   the store names. An exported disk no single-node holder owns is parked, never open to
//!   any host (an open export after an unpublish let a node that missed its detach back in);
//! - a record whose holder's Node is gone, or whose VolumeAttachment is gone (detached by
//!   hand: the detach never reached the driver), is stale: it is cleared instead of
//!   blocking the volume forever. The attachment reconciler clears such records before
//!   anything blocks on them ([`AttachmentManager::clear_if_stale`]): under the volume's
//!   lock like any change, decided from fresh answers, a conditional write, then the fence;
//! - a multi-node block volume has at most two holders; the second starts a live migration
//!   recorded in the same write ([`super::migration`]), which either holder's unpublish
//!   ends. Events (on the PVC) and metrics follow every durable change, never a tentative
//!   one (the earlier driver allowed any number of holders until its late versions, and
//!   kept the migration in memory only);
//! - every write carries the holder set's generation, and the store compares it: a replica
//!   whose memory is older than the store (A → B → A meanwhile) cannot write over it.
//!
//! Lock order: per-volume lock (async, [`LockTable`]) first, then the map lock (a std
//! mutex over the in-memory state) for short, non-awaiting critical sections. The map lock
//! is never held while a per-volume lock is awaited nor across any `.await`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::attachment::fence::Target;
use crate::attachment::lock::{LockGuard, LockTable};
use crate::attachment::persist::store_error;
use crate::attachment::types::{
    AttachmentConfig, AttachmentRecord, Holders, PublishArgs, UnpublishArgs,
};
use crate::error::{Error, Result};
use crate::attachment::migration::{self, Change, Outcome};
use crate::metrics::{AttachmentMetrics, CallOutcome, MigrationMetrics, StaleReason};
use crate::ports::cluster::{ClusterEvent, reason};
use crate::ports::rds::{DiskEntry, RdsError};
use crate::ports::{AttachmentStore, Clock, Cluster, Rds};
use crate::types::note::VolumeNote;
use crate::types::{NodeId, VolumeId};

use crate::types::context::{
    FS_TYPE as CTX_FS_TYPE, NQN as CTX_NQN, NVME_ADDRESS as CTX_NVME_ADDRESS,
    NVME_PORT as CTX_NVME_PORT,
};

#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<VolumeId, Holders>,
    /// Number of volumes attached to each node (nodes with none are absent).
    per_node: BTreeMap<NodeId, u64>,
    /// Number of records (volume, node): the sum of `per_node`.
    records: u64,
    /// Number of volumes whose migration runs.
    migrating: i64,
}

impl State {
    /// Replaces the holders of `volume`, keeping `per_node` and the counts in step.
    /// Returns the previous holders.
    fn set(&mut self, volume: &VolumeId, next: Holders) -> Holders {
        let previous = self.volumes.remove(volume).unwrap_or_default();
        self.records = self.records.saturating_sub(previous.len() as u64) + next.len() as u64;
        self.migrating += i64::from(migration::running(&next).is_some())
            - i64::from(migration::running(&previous).is_some());
        for node in previous.nodes().filter(|n| !next.contains(n)) {
            if let Some(count) = self.per_node.get_mut(node) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_node.remove(node);
                }
            }
        }
        for node in next.nodes().filter(|n| !previous.contains(n)) {
            *self.per_node.entry(node.clone()).or_insert(0) += 1;
        }
        if !next.is_empty() {
            self.volumes.insert(volume.clone(), next);
        }
        previous
    }
}

/// Why a record whose VolumeAttachment is gone is stale.
/// How often running live migrations are checked for a target lost or cut off
/// ([`AttachmentManager::fence_lost_targets`]); nothing is asked while none runs.
pub const MIGRATION_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

const DETACHED_BY_HAND: &str =
    "its VolumeAttachment is gone (detached by hand: the detach never reached the driver)";
/// Why a record whose Node is gone is stale.
const NODE_GONE: &str = "its Node object is gone";

/// What a [`AttachmentManager::fence`] did.
#[derive(Debug, Clone, Copy)]
struct FenceMove {
    /// The export's allow list was changed.
    moved: bool,
    /// The store still names the holder the move was made for.
    still_held: bool,
}

/// Tracks attachments; one per controller instance.
pub struct AttachmentManager {
    rds: Arc<dyn Rds>,
    store: Arc<dyn AttachmentStore>,
    cluster: Arc<dyn Cluster>,
    clock: Arc<dyn Clock>,
    cfg: AttachmentConfig,
    locks: LockTable<VolumeId>,
    state: Mutex<State>,
    metrics: AttachmentMetrics,
    migrations: MigrationMetrics,
}

impl std::fmt::Debug for AttachmentManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachmentManager")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The map lock's guard: keeps `rds_csi_attachment_records` and
/// `rds_csi_migrations_in_flight` in step with memory.
struct StateGuard<'a> {
    guard: std::sync::MutexGuard<'a, State>,
    metrics: &'a AttachmentMetrics,
    migrations: &'a MigrationMetrics,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.metrics.set_records(self.guard.records);
        self.migrations.in_flight().set(self.guard.migrating);
    }
}

/// A tentative in-memory change, rolled back on drop unless committed.
struct Tentative<'a> {
    mgr: &'a AttachmentManager,
    volume: VolumeId,
    previous: Option<Holders>,
}

impl Tentative<'_> {
    fn commit(mut self) {
        self.previous = None;
    }
}

impl Drop for Tentative<'_> {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            tracing::debug!(volume_id = %self.volume, "rolling back the in-memory attachment change");
            self.mgr.state().set(&self.volume, previous);
        }
    }
}

impl AttachmentManager {
    /// A manager over the ports, with empty state (call [`Self::rebuild`] before serving).
    pub fn new(
        rds: Arc<dyn Rds>,
        store: Arc<dyn AttachmentStore>,
        cluster: Arc<dyn Cluster>,
        clock: Arc<dyn Clock>,
        cfg: AttachmentConfig,
    ) -> Self {
        Self {
            rds,
            store,
            cluster,
            clock,
            cfg,
            locks: LockTable::new(),
            state: Mutex::new(State::default()),
            metrics: AttachmentMetrics::default(),
            migrations: MigrationMetrics::default(),
        }
    }

    /// Records into `metrics` (the plugin's registry) instead of unregistered series.
    pub fn with_metrics(mut self, metrics: AttachmentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Records live migrations into `migrations` (the plugin's registry).
    pub fn with_migration_metrics(mut self, migrations: MigrationMetrics) -> Self {
        self.migrations = migrations;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &AttachmentConfig {
        &self.cfg
    }

    /// The in-memory state under the map lock; the records gauge follows every change when
    /// the guard drops.
    fn state(&self) -> StateGuard<'_> {
        StateGuard {
            guard: self.state.lock().unwrap_or_else(|p| p.into_inner()),
            metrics: &self.metrics,
            migrations: &self.migrations,
        }
    }

    pub(crate) fn store(&self) -> &dyn AttachmentStore {
        &*self.store
    }

    pub(crate) fn cluster(&self) -> &dyn Cluster {
        &*self.cluster
    }

    /// Replaces the whole in-memory state (start-up only).
    pub(crate) fn replace_all(&self, records: Vec<AttachmentRecord>) {
        let mut state = State::default();
        let mut records = records.into_iter().peekable();
        while let Some(first) = records.next() {
            let volume = first.volume_id.clone();
            let mut holders = state.volumes.remove(&volume).unwrap_or_default();
            holders.insert(first);
            while let Some(r) = records.next_if(|r| r.volume_id == volume) {
                holders.insert(r);
            }
            state.set(&volume, holders);
        }
        *self.state() = state;
    }

    /// Waits for `volume`'s lock. The map lock is not held here (lock order).
    async fn lock(&self, volume: &VolumeId) -> LockGuard<VolumeId> {
        self.locks.lock(volume.clone()).await
    }

    /// Holders of `volume` (sorted by node).
    pub fn get(&self, volume: &VolumeId) -> Vec<AttachmentRecord> {
        self.state()
            .volumes
            .get(volume)
            .map(|h| h.as_slice().to_vec())
            .unwrap_or_default()
    }

    /// Every attachment, sorted by (volume, node).
    pub fn list(&self) -> Vec<AttachmentRecord> {
        self.state()
            .volumes
            .values()
            .flat_map(|h| h.iter().cloned())
            .collect()
    }

    /// Whether `volume` is attached anywhere (e.g. to refuse deleting it).
    pub fn is_attached(&self, volume: &VolumeId) -> bool {
        self.state().volumes.contains_key(volume)
    }

    /// Number of volumes attached to `node`.
    pub fn volumes_on(&self, node: &NodeId) -> u64 {
        self.state().per_node.get(node).copied().unwrap_or(0)
    }

    /// Per-volume lock entries retained (0 when idle).
    pub fn lock_entries(&self) -> usize {
        self.locks.len()
    }

    /// Migrations running, as memory knows them.
    pub fn migrations_in_flight(&self) -> i64 {
        self.state().migrating
    }

    /// Applies `next` tentatively, checking the node limit for `adding` atomically with
    /// the change (two volumes racing for a node's last slot cannot both get it).
    fn apply_tentative(
        &self,
        volume: &VolumeId,
        next: Holders,
        adding: Option<&NodeId>,
    ) -> Result<Tentative<'_>> {
        let mut state = self.state();
        if let Some(node) = adding {
            let limit = self.cfg.max_volumes_per_node;
            let on_node = state.per_node.get(node).copied().unwrap_or(0);
            // CSI: "RESOURCE_EXHAUSTED: Indicates that the maximum supported number of
            // volumes that can be attached to the specified node are already attached."
            if limit > 0 && on_node >= limit {
                return Err(Error::ResourceExhausted(format!(
                    "node {node} already has {on_node} volumes attached, the maximum \
                     (max volumes per node = {limit}); detach one first"
                )));
            }
        }
        let previous = state.set(volume, next);
        Ok(Tentative {
            mgr: self,
            volume: volume.clone(),
            previous: Some(previous),
        })
    }

    /// Records `record` as a holder of its volume: check and act under the volume's lock,
    /// durable before returning. Fencing:
    /// another live holder of a single-node volume → FAILED_PRECONDITION; a holder whose
    /// Node object is gone is cleared. A second holder of a multi-node block volume starts a
    /// migration that may run `migration_timeout`; a third is refused.
    pub async fn track(
        &self,
        record: AttachmentRecord,
        migration_timeout: std::time::Duration,
    ) -> Result<()> {
        let _guard = self.lock(&record.volume_id).await;
        self.track_locked(record, migration_timeout, None).await
    }

    /// Removes `node`'s attachment of `volume` (absent already is success); other holders
    /// are kept. Durable before returning.
    pub async fn untrack(&self, volume: &VolumeId, node: &NodeId) -> Result<()> {
        let _guard = self.lock(volume).await;
        self.untrack_locked(volume, Some(node)).await.map(|_| ())
    }

    /// [`Self::track`] under the lock; `host_nqn` is the node's machine (recorded by a
    /// migration it starts as the target).
    async fn track_locked(
        &self,
        mut record: AttachmentRecord,
        migration_timeout: std::time::Duration,
        host_nqn: Option<&str>,
    ) -> Result<()> {
        let volume = record.volume_id.clone();
        let node = record.node_id.clone();
        let current: Holders = self
            .state()
            .volumes
            .get(&volume)
            .cloned()
            .unwrap_or_default();
        if let Some(existing) = current.get(&node) {
            if existing.readonly == record.readonly && existing.access_mode == record.access_mode {
                let machine_changed = existing
                    .migration
                    .as_ref()
                    .and_then(|m| m.target_nqn.as_deref())
                    .zip(host_nqn)
                    .is_some_and(|(recorded, now)| recorded != now);
                if !machine_changed {
                    // A repeat: acknowledged without a write, so only if the store still
                    // holds it (found by the simulation: during a failover the former
                    // leader detached it, and the repeat was acknowledged from stale
                    // memory).
                    return self.confirm(&volume, &current).await;
                }
                // The migration's target published again on a fresh machine under its
                // name: the CO wants it there; the migration records that machine.
                let mut next = current.clone();
                let mut updated = existing.clone();
                if let Some(m) = updated.migration.as_mut() {
                    m.target_nqn = host_nqn.map(str::to_string);
                }
                next.insert(updated);
                let next = next.stamped_after(&current);
                let tentative = self.apply_tentative(&volume, next.clone(), None)?;
                return self.write(&volume, &current, &next, tentative).await;
            }
            // CSI: "ALREADY_EXISTS: Indicates that a volume corresponding to the specified
            // volume_id has already been published at the node corresponding to the
            // specified node_id but is incompatible with the specified volume_capability or
            // readonly flag."
            return Err(Error::AlreadyExists(format!(
                "volume {volume} is already published to node {node} with readonly={} and \
                 access mode {:?}; requested readonly={} and {:?}: unpublish it first",
                existing.readonly, existing.access_mode, record.readonly, record.access_mode
            )));
        }
        let mut next = current.clone();
        for held in current.iter() {
            let other = &held.node_id;
            let exclusive =
                record.access_mode.is_single_node() || held.access_mode.is_single_node();
            if !exclusive {
                if held.access_mode != record.access_mode {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {volume} is published to node {other} with access mode {:?}; \
                         it cannot also be published with {:?}",
                        held.access_mode, record.access_mode
                    )));
                }
                continue;
            }
            if !self.clear_stale_holder(&volume, other, &node, &mut next).await? {
                // Refuse only what the store confirms (found by the simulation: a stale
                // holder blocked the volume until restart).
                self.confirm(&volume, &current).await?;
                let message = format!(
                    "volume {volume} is attached to node {other}; a single-node volume is \
                     attached to one node at a time, so node {node} must wait until it is \
                     detached from {other}"
                );
                self.metrics.conflict();
                self.event(&volume, reason::ATTACHMENT_CONFLICT, &message, true)
                    .await;
                // CSI: "FAILED_PRECONDITION: Indicates that a volume corresponding to the
                // specified volume_id has been published at another node and does not
                // have MULTI_NODE volume capability."
                return Err(Error::FailedPrecondition(message));
            }
        }
        if migration::migrates(record.access_mode) && next.len() >= migration::MAX_HOLDERS {
            // At the limit: a holder whose Node or VolumeAttachment is gone does not count.
            let held: Vec<NodeId> = next.nodes().cloned().collect();
            for other in &held {
                self.clear_stale_holder(&volume, other, &node, &mut next).await?;
            }
            if next.len() >= migration::MAX_HOLDERS {
                self.confirm(&volume, &current).await?;
                let message = self.limit_message(&volume, &node, &next);
                self.metrics.conflict();
                self.event(&volume, reason::ATTACHMENT_CONFLICT, &message, true)
                    .await;
                return Err(Error::FailedPrecondition(message));
            }
        }
        let mut next = migration::settle(next);
        migration::start(&next, &mut record, migration_timeout, host_nqn);
        next.insert(record);
        let next = next.stamped_after(&current);
        let tentative = self.apply_tentative(&volume, next.clone(), Some(&node))?;
        self.write(&volume, &current, &next, tentative).await
    }

    /// Removes `other` from `next` when its record of `volume` is stale (its Node or its
    /// VolumeAttachment gone), with an Event; whether it was. `node` is the one attaching.
    async fn clear_stale_holder(
        &self,
        volume: &VolumeId,
        other: &NodeId,
        node: &NodeId,
        next: &mut Holders,
    ) -> Result<bool> {
        let Some((why, stale)) = self.stale_reason(volume, other).await? else {
            return Ok(false);
        };
        let message = format!(
            "clearing the attachment of volume {volume} to node {other}: {stale}; \
             attaching to node {node}"
        );
        tracing::warn!(volume_id = %volume, node_id = %other, "{message}");
        self.metrics.stale_cleared(why);
        self.event(volume, reason::STALE_ATTACHMENT_CLEARED, &message, true)
            .await;
        next.remove(other);
        Ok(true)
    }

    /// Why `node` cannot attach `volume`, held by two nodes (`holders`) already.
    fn limit_message(&self, volume: &VolumeId, node: &NodeId, holders: &Holders) -> String {
        let nodes: Vec<String> = holders.nodes().map(ToString::to_string).collect();
        let both = nodes.join(" and ");
        let Some(m) = migration::running(holders) else {
            return format!(
                "volume {volume} is attached to two nodes already ({both}); a multi-node \
                 block volume is attached to at most two nodes (a live migration's source \
                 and target), so node {node} must wait until one of them is detached"
            );
        };
        let now = self.clock.now();
        let (elapsed, limit) = (m.elapsed(now).as_secs(), m.timeout.as_secs());
        let (source, target) = (&m.source, &m.target);
        if m.timed_out(now) {
            format!(
                "volume {volume} is attached to two nodes ({both}): the live migration from \
                 {source} to {target} started {elapsed}s ago and outlived its timeout of \
                 {limit}s (StorageClass parameter migrationTimeoutSeconds), so it may be \
                 stuck; no other node can attach until one of the two is detached — to \
                 reset, detach the source node {source} (or the target {target}); node \
                 {node} must wait"
            )
        } else {
            format!(
                "volume {volume} is attached to two nodes ({both}): a live migration from \
                 {source} to {target} has been running for {elapsed}s (timeout {limit}s); a \
                 multi-node block volume is attached to at most two nodes, so node {node} \
                 must wait for the migration to finish"
            )
        }
    }

    /// Removes `node` (or, with `None`, every holder) from `volume`; returns the removed
    /// records.
    async fn untrack_locked(
        &self,
        volume: &VolumeId,
        node: Option<&NodeId>,
    ) -> Result<Vec<AttachmentRecord>> {
        let current: Holders = self
            .state()
            .volumes
            .get(volume)
            .cloned()
            .unwrap_or_default();
        let (removed, rest) = current.partition(|r| node.is_none_or(|want| *want == r.node_id));
        if removed.is_empty() {
            // "Not attached" is acknowledged without a write, so only if the store agrees
            // (found by the simulation: the former leader's in-flight publish landed
            // after our rebuild, and the acknowledged unpublish left it in the store).
            // Nothing removed: `rest` is the whole of memory's holders.
            self.confirm(volume, &rest).await?;
            return Ok(Vec::new());
        }
        let previous: Holders = removed.iter().chain(rest.iter()).cloned().collect();
        let next = migration::settle(rest).stamped_after(&previous);
        let tentative = self.apply_tentative(volume, next.clone(), None)?;
        self.write(volume, &previous, &next, tentative).await?;
        Ok(removed.into_vec())
    }

    /// Why `node`'s record of `volume` is stale, or `None` while it is live: its Node object
    /// is gone (asked fresh), or the orchestrator has no VolumeAttachment for it any more.
    /// The external-attacher keeps its finalizer on a VolumeAttachment until our unpublish
    /// succeeded, so a record without one was detached by hand (a runbook removed the
    /// finalizer of a stuck detach): the detach never reached us, and the record would
    /// otherwise block the volume forever.
    async fn stale_reason(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<(StaleReason, &'static str)>> {
        if !self.cluster.node_exists(node).await? {
            return Ok(Some((StaleReason::NodeGone, NODE_GONE)));
        }
        Ok(match self.cluster.volume_attachment_exists(volume, node).await? {
            Some(false) => Some((StaleReason::VolumeAttachmentGone, DETACHED_BY_HAND)),
            Some(true) | None => None,
        })
    }

    /// The attachment reconciler's clear of `node`'s record of `volume`, decided under the
    /// volume's lock from fresh answers (the store, the Node, the VolumeAttachment):
    /// - the Node is gone and the record is single-node: cleared once the orchestrator has
    ///   no VolumeAttachment for it, or its VolumeAttachment is being deleted (a
    ///   force-detach: nothing will attach it to that node again);
    /// - the Node exists and the orchestrator has no VolumeAttachment for it: the
    ///   external-attacher removes its finalizer only after our unpublish succeeded, so the
    ///   object is gone while the record remains only when the finalizer was removed by
    ///   hand (the unpublish never reached us). A VolumeAttachment being deleted still
    ///   carries the finalizer: its unpublish is on the way, and the record is left to it.
    ///
    /// Like an unpublish: a conditional write of the remaining holders (a record another
    /// writer changed meanwhile is not overwritten: ABORTED), then the data-path fence
    /// moves (parked when no holder is left). Returns why the record was cleared, `None`
    /// when it was not.
    pub async fn clear_if_stale(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<StaleReason>> {
        let _guard = self.lock(volume).await;
        let stored = self.read_stored(volume).await?;
        self.state().set(volume, stored.clone());
        let Some(held) = stored.get(node) else {
            return Ok(None);
        };
        let single = held.access_mode.is_single_node();
        let Some(va) = self.cluster.volume_attachment(volume, node).await? else {
            return Ok(None);
        };
        let (why, text) = if !self.cluster.node_exists(node).await? {
            if !single || va.as_ref().is_some_and(|va| !va.deleting) {
                return Ok(None);
            }
            (StaleReason::NodeGone, NODE_GONE)
        } else if va.is_none() {
            (StaleReason::VolumeAttachmentGone, DETACHED_BY_HAND)
        } else {
            return Ok(None);
        };
        let mut next = stored.clone();
        next.remove(node);
        let tentative = self.apply_tentative(volume, next.clone(), None)?;
        self.write(volume, &stored, &next, tentative).await?;
        let message = format!("cleared the attachment of volume {volume} to node {node}: {text}");
        tracing::warn!(volume_id = %volume, node_id = %node, "{message}");
        self.metrics.stale_cleared(why);
        self.event(volume, reason::STALE_ATTACHMENT_CLEARED, &message, true)
            .await;
        // The fence after the record, like an unpublish.
        if self.cfg.data_path_fence {
            self.fence(volume, &next, None, None).await?;
        }
        Ok(Some(why))
    }

    /// DeleteVolume's view of who still uses `volume`: the holders the store names, under
    /// the volume's lock, with memory set to match; a holder whose VolumeAttachment is gone
    /// (detached by hand) is stale and cleared first, so a runbook's intervention cannot
    /// block the delete forever.
    pub async fn live_holders(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>> {
        let _guard = self.lock(volume).await;
        let stored = self.read_stored(volume).await?;
        self.state().set(volume, stored.clone());
        let mut live = stored.clone();
        for held in stored.iter() {
            let node = &held.node_id;
            if self.cluster.volume_attachment_exists(volume, node).await? == Some(false) {
                let message = format!(
                    "clearing the attachment of volume {volume} to node {node}: \
                     {DETACHED_BY_HAND}"
                );
                tracing::warn!(volume_id = %volume, node_id = %node, "{message}");
                self.metrics
                    .stale_cleared(StaleReason::VolumeAttachmentGone);
                self.event(volume, reason::STALE_ATTACHMENT_CLEARED, &message, true)
                    .await;
                live.remove(node);
            }
        }
        if live.len() != stored.len() {
            live = migration::settle(live).stamped_after(&stored);
            let tentative = self.apply_tentative(volume, live.clone(), None)?;
            self.write(volume, &stored, &live, tentative).await?;
            // The export follows the holders left (a migration's target cleared: the
            // source again), as after any unpublish.
            self.fence(volume, &live, None, None).await?;
        }
        Ok(live.into_vec())
    }

    /// Every record the store holds, sorted by (volume, node): for answers that must not
    /// rest on a possibly stale memory (ListVolumes' published nodes).
    pub async fn stored_records(&self) -> Result<Vec<AttachmentRecord>> {
        Ok(self.store.load_all().await?)
    }

    /// Sets memory's holders of `volume` (start-up only: the rebuild, after another writer
    /// changed them).
    pub(crate) fn set_holders(&self, volume: &VolumeId, holders: Holders) {
        self.state().set(volume, holders);
    }

    /// `volume`'s holders in the store (a missing PV holds nothing).
    pub(crate) async fn read_stored(&self, volume: &VolumeId) -> Result<Holders> {
        match self.store.read_volume(volume).await {
            Ok(records) => Ok(records.into_iter().collect()),
            Err(crate::ports::store::StoreError::NotFound(_)) => Ok(Holders::default()),
            Err(e) => Err(store_error(volume, e)),
        }
    }

    /// The holders of `volume` as the store has them, memory set to match, under the
    /// volume's lock: for decisions that must not rest on a possibly stale memory
    /// (deleting a volume).
    pub async fn stored_holders(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>> {
        let _guard = self.lock(volume).await;
        let stored = self.read_stored(volume).await?;
        self.state().set(volume, stored.clone());
        Ok(stored.as_slice().to_vec())
    }

    /// Starts the background checks, which end when the manager is dropped: every
    /// [`MIGRATION_CHECK_EVERY`] while a live migration runs, [`Self::fence_lost_targets`]
    /// (a migration's target lost or cut off is an event no CSI call brings); and the
    /// periodic [`resync`](Self::resync) every `resync_interval` (zero: never).
    pub fn spawn_resync(self: &Arc<Self>) {
        if self.cfg.data_path_fence {
            let manager = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(MIGRATION_CHECK_EVERY).await;
                    let Some(m) = manager.upgrade() else { break };
                    if m.migrations_in_flight() > 0 {
                        m.fence_lost_targets().await;
                    }
                }
            });
        }
        let every = self.config().resync_interval;
        if every.is_zero() {
            return;
        }
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(m) = manager.upgrade() else { break };
                if let Err(e) = m.resync().await {
                    tracing::warn!(error = %e, "attachment resync failed; retrying at the next interval");
                }
            }
        });
    }

    /// Picks up what another writer changed in the store (a former leader finishing its
    /// calls during a failover): lists every record, and each volume whose stored holders
    /// differ from memory is re-read under its lock (the list may predate our own latest
    /// write) and memory set to the store's. Then re-checks the fence of every running
    /// migration whose target can no longer be named ([`Self::fence_lost_targets`]).
    /// Returns how many volumes changed in memory.
    pub async fn resync(&self) -> Result<usize> {
        let records = self.store.load_all().await?;
        Ok(self.resync_from(records).await)
    }

    /// [`resync`](Self::resync) against `records`, every record of the store as just
    /// listed (a watch's relist): no second list. Returns how many volumes changed.
    pub async fn resync_from(&self, records: Vec<AttachmentRecord>) -> usize {
        let mut stored: BTreeMap<VolumeId, Holders> = BTreeMap::new();
        for r in records {
            let holders = stored.entry(r.volume_id.clone()).or_default();
            holders.insert(r);
        }
        let mut volumes: Vec<VolumeId> = stored.keys().cloned().collect();
        volumes.extend(self.state().volumes.keys().cloned());
        volumes.sort();
        volumes.dedup();
        let empty = Holders::default();
        let mut changed = 0;
        for volume in volumes {
            let listed = stored.get(&volume).unwrap_or(&empty);
            if self.same_in_memory(&volume, listed) {
                continue;
            }
            let _guard = self.lock(&volume).await;
            let fresh = match self.read_stored(&volume).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    // One unreadable PV must not keep every later volume stale.
                    tracing::warn!(volume_id = %volume, error = %e, "cannot re-read the attachments; next resync retries");
                    continue;
                }
            };
            if !self.same_in_memory(&volume, &fresh) {
                tracing::info!(volume_id = %volume, holders = ?fresh.nodes().collect::<Vec<_>>(),
                    "attachments changed by another writer; memory resynchronised from the store");
                self.state().set(&volume, fresh);
                changed += 1;
            }
        }
        self.fence_lost_targets().await;
        changed
    }

    /// A watch saw `volume`'s stored holders become `holders`: when memory differs, the
    /// volume is re-read under its lock (the event may predate our own latest write) and
    /// memory set to the store's. Returns whether memory changed. Our own writes come back
    /// this way too, equal to memory: they cost nothing.
    pub async fn follow(&self, volume: &VolumeId, holders: &[AttachmentRecord]) -> Result<bool> {
        let mut seen = Holders::default();
        for r in holders {
            seen.insert(r.clone());
        }
        if self.same_in_memory(volume, &seen) {
            return Ok(false);
        }
        let _guard = self.lock(volume).await;
        let fresh = self.read_stored(volume).await?;
        if self.same_in_memory(volume, &fresh) {
            return Ok(false);
        }
        tracing::info!(volume_id = %volume, holders = ?fresh.nodes().collect::<Vec<_>>(),
            "attachments changed by another writer (seen by the watch); memory resynchronised from the store");
        self.state().set(volume, fresh);
        Ok(true)
    }

    /// Re-fences every running migration whose target's machine is not the one its export
    /// admits (its Node object deleted with its machine, or back as a fresh machine with
    /// another host NQN): the export goes back to the source, the holder that still runs
    /// the VM ([`Self::allow_value`]), when the loss is seen — not only at the target's
    /// force-detach, minutes later, during which a source that lost its connection could
    /// not reconnect (found by the simulation, seed 2723) — and every running migration
    /// whose target stopped reporting while its source reports ([`Self::cut_off`]). A
    /// target whose machine is the one admitted and reports is left alone; a target the
    /// export no longer admits is admitted again only when it is published to again (or
    /// the migration ends). Runs every [`MIGRATION_CHECK_EVERY`] while a migration runs
    /// ([`Self::spawn_resync`]) and at every resync. Returns how many exports moved;
    /// failures are logged and retried at the next check.
    pub async fn fence_lost_targets(&self) -> usize {
        if !self.cfg.data_path_fence {
            return 0;
        }
        // Sorted by volume (the map is a BTreeMap): one order, whatever the run.
        let migrating: Vec<(VolumeId, migration::Running)> = self
            .state()
            .volumes
            .iter()
            .filter_map(|(v, h)| migration::running(h).map(|m| (v.clone(), m)))
            .collect();
        let mut moved = 0;
        for (volume, m) in migrating {
            let target = m.target;
            // The export admits the target's machine and the target reports (the usual
            // case): nothing to do.
            let seen = async {
                let nqn = self.cluster.node_host_nqn(&target).await?;
                let Some(disk) = self.rds.find_disk(volume.as_str()).await? else {
                    return Ok(None);
                };
                // Else the target's machine is lost, a fresh one, or cut off (the export is
                // moved to the source), or it reports again after it was cut off (moved
                // back): the fence decides ([`Self::allow_value`]); nothing moves when the
                // export is already right.
                if nqn.is_some()
                    && disk.allowed_host_nqn == nqn
                    && !self.cut_off(&target, &m.source).await?
                {
                    return Ok(None);
                }
                Ok::<_, Error>(Some(disk))
            };
            let disk = match seen.await {
                Ok(None) => continue,
                Ok(Some(disk)) => disk,
                Err(e) => {
                    tracing::warn!(volume_id = %volume, node_id = %target, error = %e, "cannot check the migration target's machine; the next migration check retries");
                    continue;
                }
            };
            let _guard = self.lock(&volume).await;
            let refenced = async {
                // The disk was observed before this read of the store (as at start-up).
                let stored = self.read_stored(&volume).await?;
                self.state().set(&volume, stored.clone());
                self.fence(&volume, &stored, None, Some(disk)).await
            };
            match refenced.await {
                Ok(m) if m.moved => {
                    tracing::warn!(volume_id = %volume, node_id = %target, "the migration target is lost or stopped reporting: its export admits the source again");
                    moved += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume_id = %volume, node_id = %target, error = %e, "cannot re-fence the export of a migration whose target is lost or cut off; the next migration check retries");
                }
            }
        }
        moved
    }

    fn same_in_memory(&self, volume: &VolumeId, holders: &Holders) -> bool {
        let state = self.state();
        let memory = state.volumes.get(volume).map(Holders::as_slice).unwrap_or(&[]);
        crate::ports::store::same_holders(memory, holders.as_slice())
    }

    /// The allow-list value for `volume` held by `holders` (`None`: open to any host),
    /// the export admitting `admitted` now: the fence's [`Target`], where a holder the export
    /// cannot name counts as gone — its node has no host NQN (its Node object deleted with
    /// its machine), or it is a live migration's target whose machine is not the one the
    /// export admits. A migration's target is admitted when it attaches (its publish, the
    /// `known` host NQN) and kept while its machine is the one admitted; once that machine
    /// is lost — its Node gone, or back as a fresh machine under the same name, which runs
    /// no VM — the migration cannot complete, and the export admits the source again, the
    /// holder that runs the VM (found by the simulation, seed 2723: the source, having lost
    /// its connection, stayed cut off until the target's force-detach, minutes later). A
    /// lone holder that cannot be named parks the export rather than leave it admitting
    /// whoever it admitted — a former holder (seed 803). Only holders are ever admitted.
    /// `known` is a host NQN just read for the node publishing, saving a request.
    async fn allow_value(
        &self,
        volume: &VolumeId,
        holders: &Holders,
        known: Option<(&NodeId, &str)>,
        admitted: Option<&str>,
    ) -> Result<Option<String>> {
        let mut named = holders.clone();
        loop {
            let node = match Target::of(self.cfg.data_path_fence, &named) {
                Target::Parked => return Ok(Some(crate::attachment::fence::parked_nqn(volume))),
                Target::Open => return Ok(None),
                Target::Host(node) => node,
            };
            let publishing = known.filter(|(n, _)| **n == node);
            let nqn = match publishing {
                Some((_, nqn)) => Some(nqn.to_string()),
                None => self.cluster.node_host_nqn(&node).await?,
            };
            let migration = migration::running(&named).filter(|m| m.target == node);
            let lost_target = match (&migration, &nqn) {
                (Some(m), Some(nqn)) if publishing.is_none() => {
                    self.target_lost(m, nqn, admitted).await?
                }
                _ => false,
            };
            match nqn {
                Some(nqn) if !lost_target => return Ok(Some(nqn)),
                Some(_) => tracing::warn!(volume_id = %volume, node_id = %node,
                    "the migration target's machine is lost, is not the one the export admits (a fresh one), or stopped reporting while the source reports: the export admits the source again, where the VM runs"),
                None => tracing::warn!(volume_id = %volume, node_id = %node,
                    "the holder has no published host NQN (its Node object is gone): the export does not admit it"),
            }
            // Each round removes a holder: this ends, at the latest parked.
            named.remove(&node);
        }
    }

    /// Whether a live migration's `target` stopped reporting (its Node not Ready: partitioned
    /// or down) while its `source` reports: the VM cannot have moved to a target the
    /// control plane cannot reach, so the source, where it runs, gets the export back
    /// (found by the simulation, seed 2618: a target cut off mid-migration while an RDS
    /// reboot dropped the source's connection left the VM without its disk until the
    /// target's force-detach, six minutes later). Not a timeout: a migration that outlasts
    /// its timeout may well have moved the VM (the target holds it then, and the source
    /// may be the one cut off).
    async fn cut_off(&self, target: &NodeId, source: &NodeId) -> Result<bool> {
        if self.reports(target).await? {
            return Ok(false);
        }
        self.reports(source).await
    }

    /// Whether `node`'s Node is Ready.
    async fn reports(&self, node: &NodeId) -> Result<bool> {
        Ok(self
            .cluster
            .node_report(node)
            .await?
            .is_some_and(|r| r.ready))
    }

    /// Whether migration `m`'s target, whose machine now has host NQN `nqn`, counts as
    /// gone for the export, which admits `admitted`: its machine is not the one published
    /// to (lost; a fresh one under its name runs no VM) — by the NQN the migration recorded
    /// at the target's publish, else (a record without it) by the one the export admits —
    /// or it stopped reporting while the source reports ([`Self::cut_off`]). A target that
    /// reports again, on the machine published to, is admitted again: nothing of this is
    /// kept in memory, so every replica and every restart decides alike.
    async fn target_lost(
        &self,
        m: &migration::Running,
        nqn: &str,
        admitted: Option<&str>,
    ) -> Result<bool> {
        let published = m.target_nqn.as_deref().or(admitted);
        if published != Some(nqn) {
            return Ok(true);
        }
        self.cut_off(&m.target, &m.source).await
    }

    /// Sets `volume`'s allow list to `value`, on `observed` when the disk was just read (no
    /// second read of it); a disk gone meanwhile has nothing to fence.
    async fn set_allow(
        &self,
        volume: &VolumeId,
        observed: Option<&DiskEntry>,
        value: Option<&str>,
    ) -> Result<()> {
        let r = match observed {
            Some(disk) => self.rds.fence_disk(disk, value).await,
            None => self.rds.set_allowed_host(volume.as_str(), value).await,
        };
        match r {
            // CSI: "If the volume corresponding to the volume_id ... cannot be found by
            // the Plugin and the volume can be safely regarded as ControllerUnpublished
            // from the node, the plugin SHOULD return 0 OK."
            Ok(()) | Err(RdsError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves `volume`'s export to what the fence wants for `holders` — the holders memory
    /// and the store agree on right after a durable change, under the volume's lock — then
    /// re-checks the store: the move is not atomic with it, and another replica (during a
    /// failover) may have changed the holders since and moved the export before our move
    /// landed. When the store now wants another target, the export is moved once more to
    /// it (memory follows the store). Observed first: nothing moves, and nothing is re-read,
    /// when the export is already right.
    ///
    /// `observed` is the disk as read *before* `holders` were read from the store (the
    /// start-up sweep's listing), used instead of a fresh read: a move is then made only
    /// when a store read newer than the observation disagrees with it. A fresh read after
    /// a stale store read could see another writer's move that the stale read predates,
    /// and undo it (found by the simulation, seed 2442: a restarting leader moved the
    /// export back to a former holder after the old leader's acknowledged publish).
    async fn fence(
        &self,
        volume: &VolumeId,
        holders: &Holders,
        expected: Option<(&NodeId, Option<&str>)>,
        observed: Option<DiskEntry>,
    ) -> Result<FenceMove> {
        let unmoved = FenceMove {
            moved: false,
            still_held: true,
        };
        let known = expected.and_then(|(n, nqn)| nqn.map(|q| (n, q)));
        let target = Target::of(self.cfg.data_path_fence, holders);
        // One `/disk print`: the export and its allow list (no size needed).
        let disk = match observed {
            Some(disk) => disk,
            None => match self.rds.find_disk(volume.as_str()).await? {
                Some(disk) => disk,
                None => return Ok(unmoved),
            },
        };
        if disk.export.is_none() {
            return Ok(unmoved);
        }
        let admitted = disk.allowed_host_nqn.as_deref();
        let want = self.allow_value(volume, holders, known, admitted).await?;
        if disk.allowed_host_nqn == want {
            return Ok(unmoved);
        }
        self.set_allow(volume, Some(&disk), want.as_deref()).await?;
        let stored = self.read_stored(volume).await?;
        let again = Target::of(self.cfg.data_path_fence, &stored);
        if again != target {
            let value = self
                .allow_value(volume, &stored, None, want.as_deref())
                .await?;
            if value != want {
                tracing::info!(volume_id = %volume, ?again, "the holders changed while the export was being fenced; fencing it to the stored holders");
                self.set_allow(volume, None, value.as_deref()).await?;
            }
        }
        let still_held = expected.is_none_or(|(n, _)| stored.contains(n));
        self.state().set(volume, stored);
        Ok(FenceMove {
            moved: true,
            still_held,
        })
    }

    /// Start-up: brings every exported disk's allow list in line with the fence and the
    /// stored holders. Volumes created before the fence existed (open exports) are parked
    /// here, and so are exports a crash left admitting a former holder; with the fence off,
    /// every fenced or parked export is opened. Each move is made under the volume's lock
    /// from a fresh read of the store and re-checked like every move. Returns how many
    /// exports moved; a volume that cannot be settled now is logged and settled by its next
    /// publish or unpublish.
    pub async fn settle_fences(&self) -> Result<usize> {
        let disks = self.rds.list_disks("").await?;
        let mut moved = 0;
        // Each holder's host NQN is asked once for the whole sweep.
        let mut nqns: BTreeMap<NodeId, Option<String>> = BTreeMap::new();
        for disk in disks.into_iter().filter(|d| d.export.is_some()) {
            let Ok(volume) = VolumeId::new(disk.slot.as_str()) else {
                continue;
            };
            // Memory was just rebuilt from the store: skip what already agrees with it.
            let memory: Holders = self.get(&volume).into_iter().collect();
            let target = Target::of(self.cfg.data_path_fence, &memory);
            let expected = match &target {
                Target::Parked => Some(crate::attachment::fence::parked_nqn(&volume)),
                Target::Open => None,
                Target::Host(node) => {
                    if !nqns.contains_key(node) {
                        let nqn = self.cluster.node_host_nqn(node).await.ok().flatten();
                        nqns.insert(node.clone(), nqn);
                    }
                    nqns.get(node).cloned().flatten()
                }
            };
            if expected == disk.allowed_host_nqn {
                continue;
            }
            let _guard = self.lock(&volume).await;
            let from = disk.allowed_host_nqn.clone();
            // The listing observed the disk before this read of the store.
            let observed = DiskEntry::from(disk);
            let settled = async {
                let stored = self.read_stored(&volume).await?;
                self.state().set(&volume, stored.clone());
                self.fence(&volume, &stored, None, Some(observed)).await
            };
            match settled.await {
                Ok(m) if m.moved => {
                    tracing::info!(volume_id = %volume, ?from, "export allow list settled at start-up");
                    moved += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume_id = %volume, error = %e, "cannot settle the export allow list at start-up; the next publish or unpublish does");
                }
            }
        }
        Ok(moved)
    }

    /// Confirms that the store holds what memory says `volume`'s holders are, before an
    /// answer decided from memory alone is acknowledged (already attached, not attached,
    /// attached elsewhere). Memory is a cache of the store: another writer — a former
    /// leader finishing its calls during a failover — may have changed the holders since
    /// our rebuild or last write. When they differ, memory is resynchronised from the
    /// store and the call is ABORTED, so the CO's retry meets the current state.
    async fn confirm(&self, volume: &VolumeId, memory: &Holders) -> Result<()> {
        let stored = self.read_stored(volume).await?;
        if crate::ports::store::same_holders(stored.as_slice(), memory.as_slice()) {
            return Ok(());
        }
        self.state().set(volume, stored);
        Err(Error::Aborted(format!(
            "attachments of volume {volume} changed by another writer; memory \
             resynchronised from the store, retry"
        )))
    }

    /// Writes `next` where the store still holds `previous`; on failure rolls the
    /// tentative change back, and on a conflict — another writer changed the volume's
    /// holders — resynchronises memory from the store, so the CO's retry (the call is
    /// ABORTED) meets the current state instead of overwriting it.
    async fn write(
        &self,
        volume: &VolumeId,
        previous: &Holders,
        next: &Holders,
        tentative: Tentative<'_>,
    ) -> Result<()> {
        let Err(e) = self
            .store
            .write_volume_if(volume, previous.as_slice(), next.as_slice())
            .await
        else {
            tentative.commit();
            self.migration_changed(volume, previous, next).await;
            return Ok(());
        };
        drop(tentative);
        if matches!(e, crate::ports::store::StoreError::Conflict(_)) {
            self.metrics.write_conflict();
            match self.read_stored(volume).await {
                Ok(holders) => {
                    tracing::warn!(volume_id = %volume, holders = ?holders.nodes().collect::<Vec<_>>(),
                        "attachments changed by another writer; memory resynchronised from the store");
                    self.state().set(volume, holders);
                }
                Err(read) => {
                    tracing::warn!(volume_id = %volume, error = %read, "cannot re-read the attachments after a conflict");
                }
            }
        }
        Err(store_error(volume, e))
    }

    async fn event(&self, volume: &VolumeId, reason: &str, message: &str, warning: bool) {
        let event = ClusterEvent {
            volume_id: volume.clone(),
            reason: reason.to_string(),
            message: message.to_string(),
            warning,
        };
        if let Err(e) = self.cluster.record_event(&event).await {
            tracing::warn!(volume_id = %volume, error = %e, "cannot record event {reason}");
        }
    }

    /// Reports the migrations a durable change from `previous` to `next` started or ended:
    /// an Event on the volume's PVC, a log line, the metrics.
    async fn migration_changed(&self, volume: &VolumeId, previous: &Holders, next: &Holders) {
        for change in migration::changes(previous, next) {
            let now = self.clock.now();
            let (reason, warning, message) = match &change {
                Change::Started(m) => (
                    reason::MIGRATION_STARTED,
                    false,
                    format!(
                        "live migration of volume {volume} from node {} to node {} started \
                         (both attached; timeout {}s)",
                        m.source,
                        m.target,
                        m.timeout.as_secs()
                    ),
                ),
                Change::Ended(m, outcome) => {
                    let elapsed = m.elapsed(now);
                    let late = m.timed_out(now);
                    let (reason, warning, what) = match outcome {
                        Outcome::Completed => (
                            reason::MIGRATION_COMPLETED,
                            false,
                            format!("completed: the source {} detached", m.source),
                        ),
                        Outcome::Failed => (
                            reason::MIGRATION_FAILED,
                            true,
                            format!("failed: the target {} detached", m.target),
                        ),
                    };
                    let label = match outcome {
                        Outcome::Completed => "completed",
                        Outcome::Failed => "failed",
                    };
                    self.migrations.ended(label, late, elapsed.as_secs_f64());
                    (
                        reason,
                        warning,
                        format!(
                            "live migration of volume {volume} from node {} to node {} {what} \
                             after {:.1}s{}",
                            m.source,
                            m.target,
                            elapsed.as_secs_f64(),
                            if late {
                                format!(", past its timeout of {}s", m.timeout.as_secs())
                            } else {
                                String::new()
                            }
                        ),
                    )
                }
            };
            tracing::info!(volume_id = %volume, reason, "{message}");
            self.event(volume, reason, &message, warning).await;
        }
    }

    /// ControllerPublishVolume core: checks the volume and node exist, tracks the
    /// attachment (fenced, durable), sets the data-path fence when enabled, and returns
    /// the `publish_context` the node connects with. An acknowledged publish is reported
    /// as the Event `VolumeAttached` (a repeat bumps its count) and counted by outcome.
    pub async fn publish(&self, args: &PublishArgs) -> Result<BTreeMap<String, String>> {
        let result = self.publish_tracked(args).await;
        self.metrics
            .publish(CallOutcome::of_code(result.as_ref().map_or_else(Error::code, |_| tonic::Code::Ok)));
        if result.is_ok() {
            let (volume, node) = (&args.volume_id, &args.node_id);
            let message = format!("volume {volume} attached to node {node}");
            self.event(volume, reason::VOLUME_ATTACHED, &message, false)
                .await;
        }
        result
    }

    async fn publish_tracked(&self, args: &PublishArgs) -> Result<BTreeMap<String, String>> {
        let volume = &args.volume_id;
        let node = &args.node_id;
        // CSI: "NOT_FOUND: Indicates that a volume corresponding to the specified volume_id
        // does not exist." / "... a node corresponding to the specified node_id does not
        // exist."
        // One `/disk print` (no size needed): the disk exists and its export.
        let disk =
            self.rds.find_disk(volume.as_str()).await?.ok_or_else(|| {
                Error::NotFound(format!("volume {volume} does not exist on the RDS"))
            })?;
        if !self.cluster.node_known(node).await? {
            return Err(Error::NotFound(format!(
                "node {node} does not exist (no Node object with that name)"
            )));
        }
        let export = disk.export.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {volume} is not exported over NVMe/TCP on the RDS"
            ))
        })?;
        // The fence names a holder's host for single-node volumes and for multi-node block
        // volumes (one holder, or a migration's target); readers share an open export.
        let fenced = self.cfg.data_path_fence
            && (args.access_mode.is_single_node() || migration::migrates(args.access_mode));
        let host_nqn = if fenced {
            self.cluster.node_host_nqn(node).await?
        } else {
            None
        };
        if fenced && host_nqn.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "node {node} has not published its NVMe host NQN (Node annotation \
                 rds.csi.srvlab.io/host-nqn), and the data-path fence admits a node to this \
                 volume only by it: the node plugin must run on {node} first (it publishes \
                 the NQN at start-up)"
            )));
        }

        let _guard = self.lock(volume).await;
        let record = AttachmentRecord::new(
            volume.clone(),
            node.clone(),
            // What the store keeps of it, so the stored record equals memory's.
            crate::ports::store::truncate_to_micros(self.clock.now()),
            args.access_mode,
            args.readonly,
        );
        // The record first, then the fence: a publish that loses the race to another
        // writer (a former leader during a failover) fails its precondition before it
        // touches the export, so it can never move the fence away from the holder the
        // store names (found by the simulation: a losing publish fenced the export to its
        // node and crashed before undoing it).
        self.track_locked(record, args.migration_timeout, host_nqn.as_deref())
            .await?;
        // With the fence off an export is open; only one a fenced past left restricted
        // needs a move (`disk` was read before the lock: the move observes again).
        if self.cfg.data_path_fence || disk.allowed_host_nqn.is_some() {
            // A failure fails the call with the record durable; the CO's retry (a repeat)
            // fences again, and an unpublish parks the export.
            let holders: Holders = self.get(volume).into_iter().collect();
            let mine = Some((node, host_nqn.as_deref()));
            if !self.fence(volume, &holders, mine, None).await?.still_held {
                return Err(Error::Aborted(format!(
                    "attachments of volume {volume} changed by another writer while it \
                     was being fenced; memory resynchronised from the store, retry"
                )));
            }
        }

        let mut ctx = BTreeMap::new();
        if let Some(addr) = &args.nvme_address {
            ctx.insert(CTX_NVME_ADDRESS.to_string(), addr.clone());
        }
        ctx.insert(CTX_NVME_PORT.to_string(), export.port.to_string());
        ctx.insert(CTX_NQN.to_string(), export.nqn.clone());
        if let Some(fs) = &args.fs_type
            && !args.block
        {
            ctx.insert(CTX_FS_TYPE.to_string(), fs.clone());
        }
        // The connect tunables in force (ControllerModifyVolume changes them in the disk's
        // note): the node reads the publish context before the volume context, so a change
        // applies at the volume's next attachment.
        if let Some(note) = disk.comment.as_deref().and_then(VolumeNote::parse) {
            for (key, value) in note.in_force().context() {
                ctx.insert(key.to_string(), value);
            }
        }
        Ok(ctx)
    }

    /// ControllerUnpublishVolume core: removes the named node's attachment (or all, when
    /// no node is named), durable before returning, then parks the export once no holder
    /// is left (also on a repeat: a previous attempt may have recorded the detach and
    /// failed to park). An acknowledged unpublish that names a node is reported as the
    /// Event `VolumeDetached` (a repeat bumps its count) and counted by outcome.
    pub async fn unpublish(&self, args: &UnpublishArgs) -> Result<()> {
        let result = self.unpublish_tracked(args).await;
        self.metrics
            .unpublish(CallOutcome::of_code(result.as_ref().map_or_else(Error::code, |_| tonic::Code::Ok)));
        if result.is_ok()
            && let Some(node) = &args.node_id
        {
            let volume = &args.volume_id;
            let message = format!("volume {volume} detached from node {node}");
            self.event(volume, reason::VOLUME_DETACHED, &message, false)
                .await;
        }
        result
    }

    async fn unpublish_tracked(&self, args: &UnpublishArgs) -> Result<()> {
        let volume = &args.volume_id;
        let _guard = self.lock(volume).await;
        if let Some(node) = &args.node_id
            && self.get(volume).iter().any(|r| r.node_id == *node)
            && self
                .cluster
                .node_report(node)
                .await?
                .is_some_and(|r| r.uses(volume))
        {
            // A detach decided while the node stopped reporting (Kubernetes' force-detach
            // after ~6 minutes) can reach us after the node came back with the volume still
            // mounted: its kernel reconnects through the export (an allow-list change does
            // not cut a live connection), so a detach now would leave a writer the records
            // no longer name (found by the simulation, seed 2021: an RDS outage kept the
            // export from being parked while the node was cut off). Its kubelet is back and
            // unmounting: the detach waits for it, as the attach/detach controller itself
            // waits for `volumesInUse` on a healthy node.
            return Err(Error::FailedPrecondition(format!(
                "node {node} is Ready and its kubelet still reports volume {volume} in use \
                 (Node status.volumesInUse); the detach waits until the kubelet has unmounted \
                 it"
            )));
        }
        self.untrack_locked(volume, args.node_id.as_ref()).await?;
        if !self.cfg.data_path_fence {
            return Ok(());
        }
        let holders: Holders = self.get(volume).into_iter().collect();
        self.fence(volume, &holders, None, None).await?;
        Ok(())
    }
}
