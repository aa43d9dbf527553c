//! The data-path fence: which host a disk's NVMe/TCP export admits
//! (`nvme-tcp-server-allow-host-name` on the RDS), as a function of the volume's holders.
//!
//! The attachment records say who may use a volume; the fence makes the RDS itself refuse
//! everyone else, so a node that missed its detach (partitioned while the attach/detach
//! controller force-detached its volume, then healed) cannot reconnect once the volume has
//! moved. Rules, with the fence on (the default):
//! - an exported disk that no single-node holder owns is **parked**: its allow list names
//!   [`parked_nqn`] of the volume (`nqn.2014-08.io.srvlab.rds-csi:parked:<volume id>`), an
//!   NQN no host has, so no host can connect. A volume is born parked (CreateVolume, and so
//!   restores and clones), and is parked again after every unpublish that leaves it without
//!   a holder;
//! - a single-node holder: the export admits exactly that node's host NQN (the Node
//!   annotation its node plugin publishes at start-up);
//! - a multi-node block volume (KubeVirt, [`super::migration`]) held by one node: the
//!   export admits exactly that node, as for a single-node volume;
//! - during its live migration (two holders): the export admits the **target**, the node
//!   that must connect next. `nvme-tcp-server-allow-host-name` holds one host NQN, so it
//!   cannot name both; the source needs no admission, being connected already: an NVMe/TCP
//!   target checks the allow list when a host connects, and an established connection is
//!   not re-checked when the list changes (the emulator models exactly this; the Linux
//!   `nvmet` target behaves so). A source that loses its connection during the migration
//!   cannot reconnect until the migration ends: completed, the export stays with the
//!   target; failed (the target detached), it returns to the source. The kernel keeps
//!   retrying meanwhile (`ctrlLossTmo=-1`: I/O waits, nothing fails). A third node — say,
//!   one that held the volume before and was cut off — is refused at any time, which an
//!   open export would not do. The cost, accepted: KubeVirt's source writes until the
//!   switchover, so a source cut off mid-migration stalls the VM until KubeVirt aborts the
//!   migration (which detaches the target and returns the export to the source) — the
//!   README's KubeVirt section weighs the choices. A target whose machine is lost (its Node
//!   gone, or a fresh machine under its name: another host NQN than the migration
//!   recorded) can no longer complete the migration, and one cut off (its Node not Ready
//!   while the source's is) cannot have the VM: the manager then admits the source again
//!   (`AttachmentManager::allow_value`, re-checked every 10 s while a migration runs), and
//!   the cut-off target again once it reports; never a node that holds nothing;
//! - multi-node readers (`MULTI_NODE_READER_ONLY`): the export is open (any number of
//!   holders, one allow-list entry);
//! - with the fence off, every export is open.
//!
//! The manager ([`super::manager`]) moves the fence only after the attachment record is
//! durable, and re-checks it against the store after the move lands. The rules here are
//! pure; they never look at the RDS.

use crate::attachment::types::Holders;
use crate::types::{NodeId, VolumeId};

/// Prefix of the NQN a parked export admits: the naming authority of this driver, then
/// `parked:`. No host NQN starts with it (hosts use `nqn.2014-08.org.nvmexpress:uuid:...`
/// or their own authority), so a parked export admits nobody.
pub const PARKED_NQN_PREFIX: &str = "nqn.2014-08.io.srvlab.rds-csi:parked:";

/// The NQN a parked export of `volume` admits: [`PARKED_NQN_PREFIX`] + the volume id (at
/// most 37 + 128 characters, within the 223 an NQN may have).
pub fn parked_nqn(volume: &VolumeId) -> String {
    format!("{PARKED_NQN_PREFIX}{volume}")
}

/// Whether an allow list value is a parked one.
pub fn is_parked(allowed: Option<&str>) -> bool {
    allowed.is_some_and(|a| a.starts_with(PARKED_NQN_PREFIX))
}

/// What a volume's export should admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Nobody: the allow list names [`parked_nqn`].
    Parked,
    /// Exactly this node's host NQN.
    Host(NodeId),
    /// Any host (no allow list): multi-node readers, or the fence is off.
    Open,
}

impl Target {
    /// The target for a volume held by `holders`, with the fence on (`fence`) or off.
    pub fn of(fence: bool, holders: &Holders) -> Target {
        if !fence {
            return Target::Open;
        }
        if let Some(r) = holders.iter().find(|r| r.access_mode.is_single_node()) {
            // Fencing guarantees at most one single-node holder.
            return Target::Host(r.node_id.clone());
        }
        if let Some(m) = crate::attachment::migration::running(holders) {
            return Target::Host(m.target);
        }
        let mut migrating = holders
            .iter()
            .filter(|r| crate::attachment::migration::migrates(r.access_mode));
        match (holders.is_empty(), migrating.next(), migrating.next()) {
            (true, _, _) => Target::Parked,
            (false, Some(only), None) => Target::Host(only.node_id.clone()),
            // Readers; or two multi-node writers without a recorded migration (written by
            // hand, or by a driver that did not record it): neither can be named alone.
            _ => Target::Open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::types::AttachmentRecord;
    use crate::types::AccessMode;

    fn record(node: &str, mode: AccessMode) -> AttachmentRecord {
        AttachmentRecord::new(
            VolumeId::new("pvc-1").unwrap(),
            NodeId::new(node).unwrap(),
            std::time::UNIX_EPOCH,
            mode,
            false,
        )
    }

    #[test]
    fn a_migrating_volume_admits_its_one_holder_then_the_target() {
        let source = record("node-a", AccessMode::MultiNodeMultiWriter);
        let one: Holders = [source.clone()].into_iter().collect();
        assert_eq!(
            Target::of(true, &one),
            Target::Host(NodeId::new("node-a").unwrap())
        );
        let mut target = record("node-b", AccessMode::MultiNodeMultiWriter);
        crate::attachment::migration::start(&one, &mut target, std::time::Duration::from_secs(60), None);
        let two: Holders = [source, target].into_iter().collect();
        assert_eq!(
            Target::of(true, &two),
            Target::Host(NodeId::new("node-b").unwrap()),
            "the target connects next; the source is connected already"
        );
        assert_eq!(Target::of(false, &two), Target::Open);
    }

    #[test]
    fn no_holder_parks_a_single_node_holder_admits_itself_readers_are_open() {
        let none = Holders::new();
        assert_eq!(Target::of(true, &none), Target::Parked);
        let one: Holders = [record("node-a", AccessMode::SingleNode)]
            .into_iter()
            .collect();
        assert_eq!(
            Target::of(true, &one),
            Target::Host(NodeId::new("node-a").unwrap())
        );
        let many: Holders = [
            record("node-a", AccessMode::MultiNodeReadOnly),
            record("node-b", AccessMode::MultiNodeReadOnly),
        ]
        .into_iter()
        .collect();
        assert_eq!(Target::of(true, &many), Target::Open);
        for h in [&none, &one, &many] {
            assert_eq!(
                Target::of(false, h),
                Target::Open,
                "the fence off opens all"
            );
        }
    }

    #[test]
    fn the_parked_nqn_is_derived_from_the_volume_and_is_a_valid_nqn() {
        let v = VolumeId::new("v".repeat(128)).unwrap();
        let nqn = parked_nqn(&v);
        assert!(nqn.ends_with(v.as_str()));
        assert!(crate::types::Nqn::new(nqn.clone()).is_ok(), "{nqn}");
        assert!(is_parked(Some(&nqn)));
        assert!(!is_parked(Some("nqn.2014-08.org.nvmexpress:uuid:aaaa")));
        assert!(!is_parked(None));
    }
}
