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
//! - a VM disk (RWX block) is acknowledged published to at most two nodes at once, the
//!   durable records never name more than two, and two holders always carry their
//!   migration (source, start, timeout) in the same records — through crashes mid-persist
//!   and failovers alike; with the fence on, its export admits one of its stored holders
//!   (the migration's target while one runs, its source once the
//!   target's machine was lost) or is parked.
//!
//! Every other volume of the workload is single-node (`SINGLE_NODE_WRITER`).

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
    let multi = |v: &str| model.volumes.get(v).is_some_and(|vol| vol.multi);
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
                    // A VM disk's export follows its migration (judged below).
                    Some(e) if sh.opts.data_path_fence && !multi(v) && e.allow_host != want => {
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
        if multi(v) {
            if nodes.len() > 2 {
                bad.push(format!(
                    "VM disk {v} acknowledged published to {} at once (at most two)",
                    nodes.join(", ")
                ));
            }
            continue;
        }
        if nodes.len() > 1 {
            bad.push(format!(
                "single-node volume {v} acknowledged published to {} at once",
                nodes.join(" and ")
            ));
        }
    }
    for (v, _) in model.volumes.iter().filter(|(_, vol)| vol.multi) {
        // The fence moves after the record is durable: not judged while a call runs.
        let busy = model
            .pairs
            .iter()
            .any(|((pv, _), p)| pv == v && p.unsettled());
        bad.extend(migration_violations(sh, v, exports.get(v.as_str()), busy));
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

/// A VM disk's durable records: at most two holders, two only with their migration
/// recorded (the target's record names the other as its source); with the fence on and no
/// call on the disk running (`busy`), its export admits a stored holder — while a migration
/// runs, its target, or its source once the target's machine was lost or the target
/// stopped reporting (the driver cannot tell the two apart from a target that is merely
/// slow after the fact, so either holder is accepted here; which one serves the VM is
/// judged by the liveness checks: the VM's disk usable after the heal) — or is parked.
fn migration_violations(
    sh: &Shared,
    v: &str,
    export: Option<&ExportView>,
    busy: bool,
) -> Vec<String> {
    use rds_csi::kube::pv_store::ANN_MIGRATION_SOURCE;
    let mut bad = Vec::new();
    let Some(pv) = sh
        .api
        .object(rds_csi::kube::fake_api::Kind::PersistentVolume, "", v)
    else {
        return bad;
    };
    let ann = |k: &str| {
        pv.pointer("/metadata/annotations")
            .and_then(|a| a.get(k))
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    let holders: Vec<String> = ann(rds_csi::kube::pv_store::ANN_ATTACHED_NODE)
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    let sources: Vec<String> = ann(ANN_MIGRATION_SOURCE)
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    if holders.len() > 2 {
        bad.push(format!(
            "VM disk {v}: the records name {} holders ({})",
            holders.len(),
            holders.join(", ")
        ));
    }
    let recorded = !sources.is_empty() && sources.iter().all(|s| holders.contains(s));
    if holders.len() == 2 && !recorded {
        bad.push(format!(
            "VM disk {v} is held by {} without its migration recorded (source: {sources:?})",
            holders.join(" and ")
        ));
    }
    if sh.opts.data_path_fence
        && !busy
        && let Some(e) = export
    {
        match e.allow_host.as_deref() {
            None => bad.push(format!(
                "data-path fence: the export of VM disk {v} admits any host"
            )),
            Some(a) if is_parked(Some(a)) => {}
            Some(a) => {
                let admitted = sh.node_with_host_nqn(a).map(node_name);
                let ok = match (&admitted, holders.len()) {
                    // A machine that is gone (nobody has that NQN now), or no holder left:
                    // parked by the next start-up, publish or unpublish.
                    (None, _) | (_, 0) => true,
                    (Some(n), _) => holders.contains(n),
                };
                if !ok {
                    bad.push(format!(
                        "data-path fence: the export of VM disk {v} admits {admitted:?} while \
                         the records name {holders:?} (migration source {sources:?})"
                    ));
                }
            }
        }
    }
    bad
}

/// With the data-path fence on, no export is ever open to any host (every volume of the
/// workload but the VM disks is single-node), and no export admits the machine of a node while the durable
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
        if model.volumes.get(v).is_some_and(|vol| vol.multi) {
            continue; // judged by `migration_violations`
        }
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
