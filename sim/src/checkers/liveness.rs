//! Liveness checks, after the heal when the workload has finished: nothing is left behind
//! (but the orphans a CO abandoned under a dry run of the orphan reconciler) and every
//! party agrees that nothing is attached — no disk or file on the RDS, no
//! connection or mount on any node, no attachment in the store, the API server or the
//! controller's memory, and an empty lock table.

use rds_csi::kube::fake_api::Kind;
use rds_csi::ports::Initiator;
use rds_csi::ports::Mounter;

use crate::world::{CONTROLLERS, Shared, node_name};

/// Leftovers (empty: converged).
pub fn check(sh: &Shared) -> Vec<String> {
    let mut bad = Vec::new();
    // What the CO abandoned stays under a dry run (and is reclaimed before the workload
    // completes in delete mode).
    let abandoned = sh.abandoned_disks();
    let slots: Vec<String> = sh
        .emulator
        .disk_slots()
        .into_iter()
        .filter(|s| !abandoned.contains(s))
        .collect();
    if !slots.is_empty() {
        bad.push(format!("orphan disks on the RDS: {slots:?}"));
    }
    let files: Vec<String> = sh
        .emulator
        .file_names()
        .into_iter()
        .filter(|f| !abandoned.iter().any(|s| f.contains(&format!("/{s}."))))
        .collect();
    if !files.is_empty() {
        bad.push(format!("orphan files on the RDS: {files:?}"));
    }
    for (i, k) in sh.kernels.iter().enumerate() {
        let mounts = futures::executor::block_on(Mounter::mounts(k)).unwrap_or_default();
        if !mounts.is_empty() {
            bad.push(format!(
                "{} still has {} mount(s)",
                node_name(i),
                mounts.len()
            ));
        }
        let conns = futures::executor::block_on(Initiator::connections(k)).unwrap_or_default();
        if !conns.is_empty() {
            bad.push(format!(
                "{} still has {} NVMe connection(s)",
                node_name(i),
                conns.len()
            ));
        }
    }
    let pvs = sh.api.objects(Kind::PersistentVolume);
    if !pvs.is_empty() {
        bad.push(format!("{} PV(s) left in the API server", pvs.len()));
    }
    let vas = sh.api.objects(Kind::VolumeAttachment);
    if !vas.is_empty() {
        bad.push(format!("{} VolumeAttachment(s) left", vas.len()));
    }
    let leader = sh.leader().active;
    for replica in CONTROLLERS {
        match sh.manager(replica) {
            Some(m) => {
                if m.lock_entries() != 0 {
                    bad.push(format!(
                        "{replica}: lock table holds {} entries",
                        m.lock_entries()
                    ));
                }
                // Only the leader's memory must agree: a standby's view is refreshed when
                // it takes the lease.
                let list = m.list();
                if replica == leader && !list.is_empty() {
                    bad.push(format!(
                        "{replica} still tracks {} attachment(s)",
                        list.len()
                    ));
                }
            }
            None => bad.push(format!("{replica} never started")),
        }
    }
    bad
}
