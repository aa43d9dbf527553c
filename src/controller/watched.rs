//! Watch-driven reconciliation: what the controller does with what its watches see
//! ([`ClusterWatch`]).
//!
//! - A PersistentVolume's attachment annotations changed (another replica's write during a
//!   failover, a hand edit, a restored backup) or the PV was deleted: the attachment
//!   manager follows it ([`AttachmentManager::follow`]: nothing when memory already
//!   agrees, which is the case for our own writes; else one read under the volume's lock).
//! - The PersistentVolumes were (re)listed by the watch — at its start and as its recovery
//!   after a 410 Gone: the manager compares every listed record with memory
//!   ([`AttachmentManager::resync_from`]), the one full comparison, with no list of its
//!   own.
//! - A Node was deleted, or a VolumeAttachment deleted or marked for deletion: the
//!   attachment reconciler is nudged ([`Reconcilers::nudge`]) and passes at its next tick,
//!   on the leader.
//!
//! This replaces the fixed periodic resync (a LIST of every PV every 120 s): a change
//! another writer makes is followed within the watch's delay, and nothing is listed unless
//! the watch has to. Every replica follows (each keeps its own memory); only the leader
//! reconciles.

use std::sync::Arc;

use crate::attachment::AttachmentManager;
use crate::controller::reconcile::Reconcilers;
use crate::ports::watch::{Change, ClusterWatch};

/// Applies `changes`, in order; `nudge` wakes the attachment reconciler.
pub async fn apply(
    changes: Vec<Change>,
    attachments: &AttachmentManager,
    nudge: &(dyn Fn() + Sync),
) {
    let mut nudge_it = false;
    for change in changes {
        match change {
            Change::Holders { volume, holders } => {
                if let Err(e) = attachments.follow(&volume, &holders).await {
                    tracing::warn!(volume_id = %volume, error = %e,
                        "cannot re-read the attachments of a volume the watch saw change; the next change or relist retries");
                }
            }
            Change::Relisted { holders } => {
                let changed = attachments.resync_from(holders).await;
                if changed > 0 {
                    tracing::info!(changed, "attachments resynchronised after the watch listed the PersistentVolumes");
                }
                // Anything may have happened while the watch was down.
                nudge_it = true;
            }
            Change::Detached => nudge_it = true,
        }
    }
    if nudge_it {
        nudge();
    }
}

/// Runs the watches and applies what they see until the runtime ends.
pub fn spawn(
    watch: Arc<dyn ClusterWatch>,
    attachments: Arc<AttachmentManager>,
    reconcilers: Arc<Reconcilers>,
) {
    watch.start();
    tokio::spawn(async move {
        loop {
            let changes = watch.changes().await;
            apply(changes, &attachments, &|| reconcilers.nudge()).await;
        }
    });
}
