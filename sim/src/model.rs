//! The workload's acknowledged history: what the CO was told. A call counts once the
//! plugin answered OK. While a call on a (volume, node) pair is outstanding (sent, not yet
//! acknowledged), its effect may or may not have happened, so the per-pair checks skip
//! that pair. Written by [`crate::workload`], judged by [`crate::checkers`].

use std::collections::BTreeMap;

/// The last acknowledged attachment call on a (volume, node) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// ControllerPublishVolume answered OK.
    Publish,
    /// ControllerUnpublishVolume answered OK.
    Unpublish,
}

/// One (volume, node) pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pair {
    /// Last acknowledged call.
    pub acked: Option<Op>,
    /// A call sent and not acknowledged yet.
    pub pending: Option<Op>,
    /// Calls an attacher that lost its state sent and no longer waits for (still running
    /// on the controller): until they end, the pair's state is not the CO's to claim.
    pub outstanding: u32,
    /// The CO's own calls on the pair still running (sent, no answer or timeout yet): they
    /// may still take effect even when the pair's node was lost meanwhile.
    pub running: u32,
}

impl Pair {
    /// Whether a call on the pair may still take effect (the per-pair checks skip it).
    pub fn unsettled(&self) -> bool {
        self.pending.is_some() || self.outstanding > 0 || self.running > 0
    }
}

/// One volume's lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Volume {
    /// CreateVolume answered OK.
    pub created: bool,
    /// DeleteVolume answered OK.
    pub deleted: bool,
    /// DeleteVolume sent, not acknowledged.
    pub deleting: bool,
    /// Size acknowledged by CreateVolume or the last ControllerExpandVolume.
    pub size: u64,
    /// The `ctrlLossTmo` its StorageClass sets (`None`: the node's default applies).
    pub ctrl_loss_tmo: Option<i32>,
    /// The CO left it behind (gave up after CreateVolume, or deleted its PV by hand): an
    /// orphan the reconciler may delete.
    pub abandoned: bool,
    /// A VM disk (RWX block, `MULTI_NODE_MULTI_WRITER`): two holders during a live
    /// migration, never three.
    pub multi: bool,
}

/// One snapshot's lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// CreateSnapshot answered OK.
    pub created: bool,
    /// DeleteSnapshot sent, not acknowledged.
    pub deleting: bool,
    /// DeleteSnapshot answered OK.
    pub deleted: bool,
    /// The CO forgot it (its VolumeSnapshotContent deleted without DeleteSnapshot): an
    /// orphan the reconciler may delete.
    pub abandoned: bool,
}

/// The acknowledged history of the workload.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// By (volume, node).
    pub pairs: BTreeMap<(String, String), Pair>,
    /// By volume.
    pub volumes: BTreeMap<String, Volume>,
    /// By snapshot id.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Every (volume, node) a publish was ever acknowledged for.
    pub published: std::collections::BTreeSet<(String, String)>,
    /// Volumes whose CreateVolume the CO has in flight (sent, until it gives up or is
    /// answered OK).
    pub creating: std::collections::BTreeSet<String>,
}

impl Model {
    /// A call on (volume, node) is sent.
    pub fn begin(&mut self, volume: &str, node: &str, op: Op) {
        self.pair(volume, node).pending = Some(op);
    }
    /// A call on (volume, node) was acknowledged.
    pub fn ack(&mut self, volume: &str, node: &str, op: Op) {
        let p = self.pair(volume, node);
        p.acked = Some(op);
        p.pending = None;
        if op == Op::Publish {
            self.published
                .insert((volume.to_string(), node.to_string()));
        }
    }
    /// `node`'s machine is lost: an acknowledged or pending publish to it claims nothing
    /// any more (the force-detach that follows is a fresh unpublish); an acknowledged
    /// unpublish still must never come back.
    pub fn node_lost(&mut self, node: &str) {
        for ((_, n), p) in self.pairs.iter_mut() {
            if n == node && (p.pending.is_some() || p.acked == Some(Op::Publish)) {
                *p = Pair {
                    outstanding: p.outstanding,
                    running: p.running,
                    ..Pair::default()
                };
            }
        }
    }

    /// An operator changed (volume, node)'s records by hand (a finalizer removed, a PV
    /// restored from a backup): what the CO was told about the pair no longer binds the
    /// store.
    pub fn operator_changed(&mut self, volume: &str, node: &str) {
        if let Some(p) = self.pairs.get_mut(&(volume.to_string(), node.to_string())) {
            p.acked = None;
            p.pending = None;
        }
    }

    /// A call of the CO's on (volume, node) starts running (`true`) or ends.
    pub fn running(&mut self, volume: &str, node: &str, starts: bool) {
        count(&mut self.pair(volume, node).running, starts);
    }

    /// A detached call on (volume, node) starts (`true`) or ends.
    pub fn outstanding(&mut self, volume: &str, node: &str, starts: bool) {
        count(&mut self.pair(volume, node).outstanding, starts);
    }

    fn pair(&mut self, volume: &str, node: &str) -> &mut Pair {
        self.pairs
            .entry((volume.to_string(), node.to_string()))
            .or_default()
    }

    /// Whether `node` holds `volume`: its ControllerPublish was acknowledged and no
    /// ControllerUnpublish since.
    pub fn holds(&self, volume: &str, node: &str) -> bool {
        self.pairs
            .get(&(volume.to_string(), node.to_string()))
            .is_some_and(|p| p.acked == Some(Op::Publish))
    }

    /// The lifecycle record of snapshot `id`.
    pub fn snapshot(&mut self, id: &str) -> &mut Snapshot {
        self.snapshots.entry(id.to_string()).or_default()
    }

    /// The lifecycle record of `volume`.
    pub fn volume(&mut self, volume: &str) -> &mut Volume {
        self.volumes.entry(volume.to_string()).or_default()
    }
}

/// Counts a call that starts (`true`) or ends.
fn count(n: &mut u32, starts: bool) {
    if starts {
        *n += 1;
    } else {
        *n = n.saturating_sub(1);
    }
}
