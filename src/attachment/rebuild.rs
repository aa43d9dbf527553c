//! Start-up: rebuild the in-memory attachments from the store before any request is served.
//!
//! Records are cross-checked against the orchestrator's VolumeAttachment objects when it
//! has them. The external-attacher keeps a finalizer on a VolumeAttachment until our
//! ControllerUnpublishVolume has succeeded, so a record without a VolumeAttachment for its
//! (volume, node) belongs to an acknowledged detach: it is dropped and cleared in the store,
//! and never comes back (stale annotations resurrecting attachments was an outage of the
//! earlier Go driver). The clear is a conditional write of what was loaded, like every
//! write of the manager's: it never overwrites what another writer stored since. A record
//! with a VolumeAttachment (attached, pending, or being deleted) is kept: the CO will
//! publish or unpublish it again.

use std::collections::{BTreeMap, BTreeSet};

use crate::attachment::manager::AttachmentManager;
use crate::attachment::persist::store_error;
use crate::attachment::types::{AttachmentRecord, Holders};
use crate::error::Result;
use crate::ports::store::StoreError;
use crate::types::{NodeId, VolumeId};

/// What a rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Records kept in memory.
    pub kept: usize,
    /// Records dropped because their VolumeAttachment is gone.
    pub dropped: usize,
    /// Volumes whose store entry could not be cleared: the store failed, or another writer
    /// changed the volume since it was loaded (memory then follows the store).
    pub clear_failures: usize,
}

impl AttachmentManager {
    /// Rebuilds the in-memory state from the store, cross-checked against the cluster's
    /// VolumeAttachments. Run once, before serving.
    pub async fn rebuild(&self) -> Result<RebuildReport> {
        let records = self.store().load_all().await?;
        let attachments = self.cluster().volume_attachments().await?;
        let Some(attachments) = attachments else {
            let report = RebuildReport {
                kept: records.len(),
                ..RebuildReport::default()
            };
            self.replace_all(records);
            tracing::info!(kept = report.kept, "attachments rebuilt from the store");
            return Ok(report);
        };
        let live: BTreeSet<(VolumeId, NodeId)> = attachments
            .into_iter()
            .map(|va| (va.volume_id, va.node_id))
            .collect();
        let mut kept: Vec<AttachmentRecord> = Vec::with_capacity(records.len());
        // Each volume that lost a record, with every record the store had for it.
        let mut touched: BTreeMap<VolumeId, Vec<AttachmentRecord>> = BTreeMap::new();
        let mut report = RebuildReport::default();
        for r in &records {
            if live.contains(&(r.volume_id.clone(), r.node_id.clone())) {
                kept.push(r.clone());
            } else {
                tracing::info!(volume_id = %r.volume_id, node_id = %r.node_id,
                    "dropping attachment record: its VolumeAttachment is gone (detach completed)");
                report.dropped += 1;
                touched.insert(r.volume_id.clone(), Vec::new());
            }
        }
        drop(live);
        for r in records {
            if let Some(loaded) = touched.get_mut(&r.volume_id) {
                loaded.push(r);
            }
        }
        // Rewrite the volumes that lost a record, with the holders that remain, only where
        // the store still holds what was loaded: another writer (a former leader finishing
        // its calls) may have changed them since, and an unconditional write would erase
        // what it acknowledged (found by the simulation, seed 1850: a publish acknowledged
        // by the new leader was cleared by the old one's slow rebuild).
        let mut fresh: Vec<(VolumeId, Holders)> = Vec::new();
        for (volume, loaded) in &touched {
            // `kept` is sorted by (volume, node), as `load_all` returns records.
            let start = kept.partition_point(|r| r.volume_id < *volume);
            let end = start + kept[start..].partition_point(|r| r.volume_id == *volume);
            let before: Holders = kept[start..end].iter().cloned().collect();
            // A migration whose source was dropped has completed; the set is a new one, the
            // next generation of the one loaded.
            let previous: Holders = loaded.iter().cloned().collect();
            let holders = crate::attachment::migration::settle(before).stamped_after(&previous);
            match self
                .store()
                .write_volume_if(volume, loaded, holders.as_slice())
                .await
            {
                // Memory holds what the store now does (its generation too).
                Ok(()) => {
                    kept.splice(start..end, holders.into_vec());
                }
                Err(StoreError::Conflict(what)) => {
                    // Memory takes what the other writer stored; a stale record still in
                    // it is cleared by the next publish that meets it (its Node or
                    // VolumeAttachment is asked then).
                    tracing::warn!(volume_id = %volume, conflict = %what,
                        "attachments changed by another writer during the rebuild; memory follows the store");
                    report.clear_failures += 1;
                    match self.read_stored(volume).await {
                        Ok(holders) => fresh.push((volume.clone(), holders)),
                        Err(e) => tracing::warn!(volume_id = %volume, error = %e,
                            "cannot re-read the attachments; the next resync does"),
                    }
                }
                Err(e) => {
                    tracing::warn!(volume_id = %volume, error = %store_error(volume, e),
                        "cannot clear stale attachment records; they stay ignored in memory");
                    report.clear_failures += 1;
                }
            }
        }
        report.kept = kept.len();
        self.replace_all(kept);
        for (volume, holders) in fresh {
            self.set_holders(&volume, holders);
        }
        tracing::info!(
            kept = report.kept,
            dropped = report.dropped,
            "attachments rebuilt"
        );
        Ok(report)
    }
}
