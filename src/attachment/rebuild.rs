//! Start-up: rebuild the in-memory attachments from the store before any request is served.
//!
//! Records are cross-checked against the orchestrator's VolumeAttachment objects when it
//! has them. The external-attacher keeps a finalizer on a VolumeAttachment until our
//! ControllerUnpublishVolume has succeeded, so a record without a VolumeAttachment for its
//! (volume, node) belongs to an acknowledged detach: it is dropped and cleared in the store,
//! and never comes back (stale annotations resurrecting attachments was an outage of the
//! earlier Go driver). A record with a VolumeAttachment (attached, pending, or being
//! deleted) is kept: the CO will publish or unpublish it again.

use std::collections::BTreeSet;

use crate::attachment::manager::AttachmentManager;
use crate::attachment::persist::write_holders;
use crate::attachment::types::{AttachmentRecord, Holders};
use crate::error::Result;
use crate::types::{NodeId, VolumeId};


/// What a rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Records kept in memory.
    pub kept: usize,
    /// Records dropped because their VolumeAttachment is gone.
    pub dropped: usize,
    /// Volumes whose store entry could not be cleared (cleared again on their next change).
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
        let mut touched: BTreeSet<VolumeId> = BTreeSet::new();
        let mut report = RebuildReport::default();
        for r in records {
            if live.contains(&(r.volume_id.clone(), r.node_id.clone())) {
                kept.push(r);
            } else {
                tracing::info!(volume_id = %r.volume_id, node_id = %r.node_id,
                    "dropping attachment record: its VolumeAttachment is gone (detach completed)");
                report.dropped += 1;
                touched.insert(r.volume_id);
            }
        }
        drop(live);
        // Rewrite the volumes that lost a record, with the holders that remain.
        for volume in &touched {
            // `kept` is sorted by (volume, node), as `load_all` returns records.
            let start = kept.partition_point(|r| r.volume_id < *volume);
            let end = start + kept[start..].partition_point(|r| r.volume_id == *volume);
            let before: Holders = kept[start..end].iter().cloned().collect();
            // A migration whose source was dropped has completed; the set is a new one.
            let holders =
                crate::attachment::migration::settle(before.clone()).stamped_after(&before);
            match write_holders(self.store(), volume, &holders).await {
                // Memory holds what the store now does (its generation too).
                Ok(()) => {
                    kept.splice(start..end, holders.into_vec());
                }
                Err(e) => {
                    tracing::warn!(volume_id = %volume, error = %e,
                        "cannot clear stale attachment records; they stay ignored in memory");
                    report.clear_failures += 1;
                }
            }
        }
        report.kept = kept.len();
        self.replace_all(kept);
        tracing::info!(
            kept = report.kept,
            dropped = report.dropped,
            "attachments rebuilt"
        );
        Ok(report)
    }
}
