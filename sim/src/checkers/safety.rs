//! Safety checks, run after every simulation step in which something happened:
//! - no single-node volume is acknowledged published to two nodes at once;
//! - every acknowledged publish is in the durable store (PV annotations in the API server),
//!   so it survives any restart;
//! - no acknowledged unpublish is resurrected in the store;
//! - no two disks share a name on the RDS;
//! - nothing is deleted while published, and an acknowledged delete stays deleted;
//! - an acknowledged create (volume or snapshot) stays on the RDS until its delete is
//!   sent or the CO abandons it, and an acknowledged expansion is never lost;
//! - the orphan volume reconciler never deletes a disk a PersistentVolume or a
//!   VolumeSnapshotContent references, or whose CreateVolume is in flight (judged as each
//!   deletion is sent, [`crate::reconciled`], reported with the CO's violations);
//! - every call is idempotent: no repeat of a valid call got an answer the spec rules out
//!   (reported by the CO as it happens);
//! - operations on one volume never overlap on one host ([`crate::overlap`]);
//! - with the data-path fence on, an acknowledged publish leaves the volume's export
//!   allowing the publishing node's current machine (its host NQN) and no other; no export
//!   is ever open to any host; and no export admits one node's machine while the durable
//!   records name another (the I/O those machines make is judged by [`crate::datapath`]).
//!
//! Every volume of the workload is single-node (`SINGLE_NODE_WRITER`).

use std::collections::{BTreeMap, BTreeSet};

use rds_csi::attachment::fence::is_parked;
use rds_csi::routeros::emulator::ExportView;

use crate::model::{Model, Op};
use crate::world::{Shared, node_index, node_name};

/// Violations in the current state (empty: all good).
pub fn check(sh: &Shared) -> Vec<String> {
    let model: Model = sh.model.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut bad = sh
        .co_violations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    bad.extend(sh.ops.violations());
    let slots = sh.emulator.disk_slots();
    let mut seen = BTreeSet::new();
    for s in &slots {
        if !seen.insert(s) {
            bad.push(format!("two disks named {s} on the RDS"));
        }
    }
    let exports = sh.emulator.exports();
    let mut published: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    // Each volume's PV is read once per check (its pairs and its export share it).
    let mut pvs: BTreeMap<&str, Option<BTreeSet<String>>> = BTreeMap::new();
    for ((v, n), p) in &model.pairs {
        if p.acked == Some(Op::Publish) {
            published.entry(v).or_default().push(n);
        }
        if p.unsettled() {
            continue;
        }
        let stored = pvs
            .entry(v.as_str())
            .or_insert_with(|| sh.stored_holders(v));
        let holds = stored.as_ref().is_some_and(|s| s.contains(n));
        match p.acked {
            Some(Op::Publish) => {
                if !holds {
                    bad.push(format!(
                        "acknowledged publish of {v} to {n} is not in the store (stored: {stored:?})"
                    ));
                }
                if !seen.contains(v) {
                    bad.push(format!("{v} is gone from the RDS while published to {n}"));
                }
                let want = node_index(n).map(|i| sh.host_nqn_now(i));
                match exports.get(v.as_str()) {
                    None if seen.contains(v) => {
                        bad.push(format!("{v} is published to {n} but not exported"));
                    }
                    Some(e) if sh.opts.data_path_fence && e.allow_host != want => {
                        bad.push(format!(
                            "data-path fence: {v} is published to {n}, but its export allows {:?}",
                            e.allow_host
                        ));
                    }
                    _ => {}
                }
            }
            Some(Op::Unpublish) if holds => {
                bad.push(format!(
                    "acknowledged unpublish of {v} from {n} is resurrected"
                ));
            }
            _ => {}
        }
    }
    if sh.opts.data_path_fence {
        bad.extend(fence_violations(sh, &model, &exports, &mut pvs));
    }
    for (v, nodes) in published {
        if nodes.len() > 1 {
            bad.push(format!(
                "single-node volume {v} acknowledged published to {} at once",
                nodes.join(" and ")
            ));
        }
    }
    for (v, vol) in &model.volumes {
        if vol.deleted && seen.contains(v) {
            bad.push(format!("{v} still on the RDS after an acknowledged delete"));
        }
        if vol.created && !vol.deleting && !vol.deleted && !vol.abandoned {
            match sh.emulator.disk_size(v) {
                None => bad.push(format!("acknowledged volume {v} is gone from the RDS")),
                Some(size) if size < vol.size => bad.push(format!(
                    "{v} has {size} bytes on the RDS, less than the acknowledged {}",
                    vol.size
                )),
                Some(_) => {}
            }
        }
    }
    for (id, snap) in &model.snapshots {
        if snap.deleted && seen.contains(id) {
            bad.push(format!(
                "snapshot {id} still on the RDS after an acknowledged delete"
            ));
        }
        if snap.created && !snap.deleting && !snap.deleted && !snap.abandoned && !seen.contains(id)
        {
            bad.push(format!("acknowledged snapshot {id} is gone from the RDS"));
        }
    }
    bad
}

/// With the data-path fence on, no export is ever open to any host (every volume of the
/// workload is single-node), and no export admits the machine of a node while the durable
/// records name another holder (the volume would be attached to two nodes), unless a call
/// on one of the two pairs is still running. (An export left admitting a former holder that
/// nobody replaced — a detach done by hand, a PV deleted by hand — is parked by the next
/// start-up, publish or unpublish; the I/O such a node makes is judged by
/// [`crate::datapath`].)
fn fence_violations<'a>(
    sh: &Shared,
    model: &Model,
    exports: &'a BTreeMap<String, ExportView>,
    pvs: &mut BTreeMap<&'a str, Option<BTreeSet<String>>>,
) -> Vec<String> {
    let mut bad = Vec::new();
    let none = BTreeSet::new();
    for (v, e) in exports {
        let Some(allowed) = &e.allow_host else {
            bad.push(format!(
                "data-path fence: the export of single-node volume {v} admits any host"
            ));
            continue;
        };
        if is_parked(Some(allowed)) {
            continue;
        }
        let Some(i) = sh.node_with_host_nqn(allowed) else {
            continue; // a machine that is gone: nobody has that NQN now
        };
        let n = node_name(i);
        let unsettled = |node: &str| {
            model
                .pairs
                .get(&(v.clone(), node.to_string()))
                .is_some_and(|p| p.unsettled())
        };
        let holders = pvs
            .entry(v.as_str())
            .or_insert_with(|| sh.stored_holders(v))
            .as_ref()
            .unwrap_or(&none);
        if let Some(other) = holders.iter().find(|h| **h != n)
            && !holders.contains(&n)
            && !unsettled(&n)
            && !unsettled(other)
        {
            bad.push(format!(
                "data-path fence: the export of {v} admits {n} while the records name {other}"
            ));
        }
    }
    bad
}
