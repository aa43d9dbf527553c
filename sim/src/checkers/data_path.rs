//! The nodes' data path, judged from each kernel's own record of what was done to it
//! ([`rds_csi::node::fake::KernelEvent`]) and from its state:
//!
//! - safety, for every event as it happens: a node connects only to volumes it holds (its
//!   ControllerPublish acknowledged and not unpublished since), and mounts or binds a
//!   volume's disk only at that volume's own paths and only while it holds it — a repair
//!   that remounted another volume's device would show here; the driver never pulls a
//!   controller from under a mount (a disconnect of a device in use); and a volume whose
//!   StorageClass sets no `ctrlLossTmo` never loses its controller to an RDS outage (the
//!   node's default reconnects forever: the outage must not reach its filesystem);
//! - bounded liveness, after the heal: within [`USABLE_BOUND`] every mount of a volume path
//!   is on that volume's current, live device again — reconnected by the kernel, or
//!   repaired by the node when the kubelet restarted the pod that saw it abnormal.

use std::time::Duration;

use rds_csi::node::fake::KernelEvent;
use rds_csi::types::defaults::DEFAULT_NQN_PREFIX;

use crate::model::Model;
use crate::world::{Shared, node_name, volume_of_path};

/// How long after the heal (the end of the chaos phase and of any RDS outage) a staged
/// volume may stay unusable: the next reconnect attempt, the kubelet's stats poll and pod
/// restart, and a repair that waits out the stage backoff (at most 120 s).
pub const USABLE_BOUND: Duration = Duration::from_secs(180);

/// Judges the kernels' events since the last call (every step, before any fault changes
/// the model). Events of note go to the trace.
pub fn judge_events(sh: &Shared, now: Duration) -> Vec<String> {
    let mut bad = Vec::new();
    let mut model: Option<Model> = None;
    for (i, k) in sh.kernels.iter().enumerate() {
        let events = k.take_events();
        if events.is_empty() {
            continue;
        }
        let node = node_name(i);
        let m =
            model.get_or_insert_with(|| sh.model.lock().unwrap_or_else(|p| p.into_inner()).clone());
        for e in events {
            match e {
                KernelEvent::Connected { nqn, device } => {
                    let vol = volume_of_nqn(&nqn);
                    if !m.holds(vol, &node) {
                        bad.push(format!(
                            "{node} connected {vol} ({}), which it does not hold",
                            device.display()
                        ));
                    }
                }
                KernelEvent::Mounted { nqn, target } => {
                    let vol = volume_of_nqn(&nqn);
                    if !m.holds(vol, &node) {
                        bad.push(format!(
                            "{node} mounted {vol} at {}, which it does not hold",
                            target.display()
                        ));
                    }
                    if volume_of_path(&target) != Some(vol) {
                        bad.push(format!(
                            "{node} mounted the disk of {vol} at {}, a path of another volume",
                            target.display()
                        ));
                    }
                }
                KernelEvent::LostUnderMount {
                    nqn,
                    ctrl_loss_tmo,
                    why,
                } => {
                    let vol = volume_of_nqn(&nqn);
                    sh.trace.at(
                        now,
                        "kernel",
                        format!("{node}: controller of {vol} deleted under its mounts ({why})"),
                    );
                    let set = m.volumes.get(vol).and_then(|v| v.ctrl_loss_tmo);
                    if why == "disconnected" {
                        bad.push(format!(
                            "{node} disconnected {vol} while a filesystem still used it"
                        ));
                    }
                    // Only a volume fenced away from the node (no longer held, its controller
                    // refused at every reconnect) may lose its queued I/O to a disconnect.
                    if why == "disconnected while reconnecting" && m.holds(vol, &node) {
                        bad.push(format!(
                            "{node} disconnected {vol} under its filesystem while it still holds \
                             it (its controller was reconnecting: the queued writes are lost)"
                        ));
                    }
                    if why == "ctrl-loss-tmo expired" && set.is_none() {
                        bad.push(format!(
                            "{node}: {vol}, whose StorageClass sets no ctrlLossTmo, lost its \
                             controller to an RDS outage after {ctrl_loss_tmo}s: I/O errors \
                             reached its filesystem (the node's default reconnects forever)"
                        ));
                    }
                }
            }
        }
    }
    bad
}

/// Mounts of volume paths that are still not on their volume's live device,
/// [`USABLE_BOUND`] after node `i`'s heal `heal_of(i)` (nothing before that). Only mounts a
/// node may use count: a node partitioned while alive outlives the other faults' heal (its
/// own comes when the partition ends), and once its volume was force-detached its mount is
/// fenced off until its kubelet cleans up (the data-path fence at work).
pub fn check_usable(
    sh: &Shared,
    now: Duration,
    heal_of: impl Fn(usize) -> Duration,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (i, k) in sh.kernels.iter().enumerate() {
        if sh.partitioned_since(i).is_some() || now < heal_of(i) + USABLE_BOUND {
            continue;
        }
        let node = node_name(i);
        for m in k.mount_table() {
            let Some(vol) = volume_of_path(&m.target) else {
                continue;
            };
            if !sh.stored_holders(vol).is_some_and(|h| h.contains(&node)) {
                continue;
            }
            let want = format!("{DEFAULT_NQN_PREFIX}{vol}");
            let usable = k.nqn_of_mount(&m).is_some_and(|n| n == want) && k.is_live(&want);
            if !usable {
                bad.push(format!(
                    "{}: {} ({vol}) is not usable {}s after the heal: its device {} is gone, \
                     another volume's, or still reconnecting",
                    node_name(i),
                    m.target.display(),
                    USABLE_BOUND.as_secs(),
                    m.source
                ));
            }
        }
    }
    bad
}

fn volume_of_nqn(nqn: &str) -> &str {
    nqn.strip_prefix(DEFAULT_NQN_PREFIX).unwrap_or(nqn)
}
