//! Every knob of a scenario, derived from its seed alone and printed first as
//! `SEED=<n> <knobs>`, so a failing seed replays exactly.
//!
//! Rates are per cent per fault tick (one tick every `fault_every_ms` of virtual time during
//! the chaos phase); the liveness phase that follows has every fault off.

use std::fmt;

use rand::{RngExt, SeedableRng, rngs::StdRng};

/// A bug planted at a port boundary by a test-only wrapper (proof of power): the harness
/// must find a failing seed for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bug {
    /// The attachment store acknowledges a write before it is persisted.
    AckBeforePersist,
    /// The attachment store drops the precondition of conditional writes.
    DropPrecondition,
    /// The cluster reports a live node as gone.
    NodeGoneWhileAlive,
    /// The link to the RDS takes a lost reply as a failure and sends the command again
    /// blindly, without observing whether the first one was applied.
    BlindRdsRetry,
    /// Unpublish opens the export to any host instead of parking it.
    UnpublishOpensExport,
    /// DeleteVolume does not check who still holds the volume.
    DeleteSkipsHolders,
    /// A re-issued ControllerPublish is served past the per-volume in-flight lock.
    ReissuedPublishSkipsLock,
    /// The node connects without its reconnect defaults: the kernel's own ctrl-loss-tmo
    /// (600 s) applies, and an RDS outage longer than that fails the filesystems.
    KernelReconnectDefaults,
    /// The node's initiator answers with the device path it first saw for a volume as long
    /// as that path exists: after a reconnect renamed the volume, and the old name went to
    /// another volume, the node mounts the wrong disk.
    RememberedDevicePath,
    /// The cluster finds no VolumeAttachment of a VM disk's holders (judged detached by
    /// hand): a third node attaches while two hold the disk.
    ThirdNodeAttaches,
    /// The RDS keeps a new snapshot's note without the CSI name recorded in it, so a name
    /// that is no RDS slot is not recognised when its CreateSnapshot is repeated.
    NamelessRds,
    /// The Event of an attachment is dropped while reporting it recorded.
    AttachedEventDropped,
    /// The orphan reconciler's view of the cluster loses the PersistentVolumes and
    /// VolumeSnapshotContents: every disk looks unreferenced.
    OrphanReferencesLost,
}

impl Bug {
    /// Every planted bug.
    pub const ALL: [Bug; 13] = [
        Bug::AckBeforePersist,
        Bug::DropPrecondition,
        Bug::NodeGoneWhileAlive,
        Bug::BlindRdsRetry,
        Bug::UnpublishOpensExport,
        Bug::DeleteSkipsHolders,
        Bug::ReissuedPublishSkipsLock,
        Bug::KernelReconnectDefaults,
        Bug::RememberedDevicePath,
        Bug::ThirdNodeAttaches,
        Bug::NamelessRds,
        Bug::AttachedEventDropped,
        Bug::OrphanReferencesLost,
    ];
}

/// The knobs of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The seed everything below is derived from.
    pub seed: u64,
    /// Node hosts (`node-1..N`).
    pub nodes: usize,
    /// Volumes the workload creates, moves and deletes (concurrently).
    pub volumes: usize,
    /// Moves of each volume between nodes.
    pub moves: usize,
    /// Chance (%) the CO repeats a call that already succeeded.
    pub repeat_pct: u32,
    /// How long the CO waits for a CSI answer before it retries (the call may still be
    /// running on the plugin: the retry then overlaps it).
    pub rpc_timeout_ms: u64,
    /// Chance (%) the CO sends a conflicting attach to a second node.
    pub conflict_attach_pct: u32,
    /// Chance (%) per round that the volume is expanded while a pod uses it
    /// (ControllerExpandVolume, then NodeExpandVolume).
    pub expand_pct: u32,
    /// Chance (%) per round that a snapshot of the volume is taken (deleted later, before
    /// or after the volume).
    pub snapshot_pct: u32,
    /// Chance (%) per tick of a 409 storm on the API.
    pub api_conflict_pct: u32,
    /// Chance (%) per tick of a burst of API 5xx answers.
    pub api_5xx_pct: u32,
    /// Fixed latency of every API request (ms).
    pub api_latency_ms: u64,
    /// Chance (%) per tick that an RDS command fails.
    pub rds_fail_pct: u32,
    /// Chance (%) per tick that an RDS command is applied but its reply lost.
    pub rds_lost_reply_pct: u32,
    /// Chance (%) per tick of a controller crash + restart.
    pub bounce_pct: u32,
    /// Chance (%) per tick of arming a crash point around the next attachment write.
    pub crash_point_pct: u32,
    /// Chance (%) per tick of a partition leader↔kube or leader↔rds.
    pub partition_pct: u32,
    /// Chance (%) per tick that the link leader↔kube or leader↔rds turns flaky for a
    /// while (drops out at random for a few steps at a time: message loss).
    pub flaky_link_pct: u32,
    /// Chance (%) per tick of a node plugin crash + restart.
    pub node_crash_pct: u32,
    /// Chance (%) per tick that a node's machine is lost and its Node object deleted (it
    /// comes back as a fresh machine later); Kubernetes force-detaches its volumes after
    /// [`FORCE_DETACH_SECS`].
    pub node_delete_pct: u32,
    /// Chance (%) per tick of a controller failover (the other replica leads; the old
    /// leader keeps answering stale calls for a while).
    pub failover_pct: u32,
    /// An RDS outage (a reboot: management and NVMe/TCP gone, every node's controllers
    /// reconnecting): when it starts (ms of virtual time) and how long it lasts (s; some
    /// longer than the kernel's default ctrl-loss-tmo of 600 s). The heal waits for its end.
    pub rds_outage: Option<(u64, u64)>,
    /// Chance (%) per volume that its StorageClass sets `ctrlLossTmo` (30 s): its
    /// controllers are deleted by outages longer than that, and its mounts need repair.
    pub finite_ctrl_loss_pct: u32,
    /// Chance (%) per tick that a node loses one of its NVMe controllers (deleted under its
    /// mounts; the volume comes back under a new name when connected again).
    pub device_loss_pct: u32,
    /// Chance (%) that a node plugin crash leaves the restarted node a connection to a
    /// volume it does not hold (an unstage that never finished in an earlier life).
    pub leftover_pct: u32,
    /// Whether the controller runs with the data-path fence (`--data-path-fence`, the
    /// default: on in 7 seeds of 8): each export admits only its holder's host NQN, and
    /// nobody while unheld, which the simulated data path enforces.
    pub data_path_fence: bool,
    /// Chance (%) per tick that a node is partitioned while alive (its kubelet cut off from
    /// the API server, its kernel from the RDS) for 20–420 s, so that Kubernetes
    /// force-detaches its volumes [`FORCE_DETACH_SECS`] later while it still has them
    /// mounted and keeps reconnecting; at most one per scenario, only with the fence on
    /// (without it nothing stops the node when the partition heals).
    pub node_partition_pct: u32,
    /// Chance (%) per tick of an API latency spike longer than the CO's deadline (the
    /// CO's call times out while the write lands later), for 1–5 s.
    pub api_spike_pct: u32,
    /// Chance (%) per volume that the provisioner's DeleteVolume races the last detach
    /// (sent once the pod is gone, before the node unstages and the attacher detaches).
    pub delete_race_pct: u32,
    /// Chance (%) per ControllerPublish/Unpublish that the attacher loses its state and
    /// re-issues the call while the first still runs (to the other replica during a
    /// failover).
    pub reissue_pct: u32,
    /// Chance (%) per round of an operator following a runbook: removing a stuck
    /// VolumeAttachment's finalizer by hand (the detach never reaches the driver), or
    /// deleting the PV by hand and restoring it from a backup (stale annotations).
    pub operator_pct: u32,
    /// Period of the external-attacher's reconciliation (ListVolumes' published nodes
    /// against the VolumeAttachments), virtual seconds; 0: off.
    pub reconcile_secs: u64,
    /// Virtual time between fault ticks (ms).
    pub fault_every_ms: u64,
    /// Length of the chaos phase (virtual s).
    pub chaos_secs: u64,
    /// Whether the controller's reconcilers run (half the seeds): the attachment reconciler
    /// every 20 s, and the orphan volume reconciler every 10 s, in delete mode in three
    /// seeds of four (dry run otherwise), both on the replica holding the Lease.
    pub reconcilers: bool,
    /// The orphan reconciler deletes (else: dry run).
    pub orphan_delete: bool,
    /// The orphan reconciler's grace period (virtual s).
    pub orphan_grace_secs: u64,
    /// Chance (%) per volume that the CO leaves an orphan behind: it gives up after
    /// CreateVolume (no PV), deletes the PV by hand without DeleteVolume, or forgets the
    /// volume's snapshots (their VolumeSnapshotContents deleted without DeleteSnapshot).
    pub abandon_pct: u32,
    /// Chance (%) per tick (in seeds with faults, drawn up to 8) that the API server cuts
    /// every watch stream (the controllers' watchers watch again from where they were), or
    /// cuts them and answers the next watches 410 Gone (the watchers relist).
    pub watch_fault_pct: u32,
    /// KubeVirt VMs (besides the volumes): each an RWX block disk that live-migrates
    /// between live nodes — migrations that complete, that fail (the target detached, or
    /// lost), and that outlast their timeout (a third node's attach is then refused).
    pub vms: usize,
    /// Live migrations of each VM.
    pub migrations: usize,
    /// The VM disks' `migrationTimeoutSeconds`.
    pub migration_timeout_secs: u64,
    /// Planted bug (proof-of-power tests only; `None` in every normal run).
    pub bug: Option<Bug>,
}

/// Volume ids of the VMs' disks start so (the volumes': `pvc-sim-`).
pub const VM_PREFIX: &str = "pvc-vm-";

/// Bound on the liveness phase: after healing, the workload must finish within this.
pub const LIVENESS_SECS: u64 = 600;

/// How long the attach/detach controller waits for a lost node to unmount before it
/// force-detaches (Kubernetes' `maxWaitForUnmountDuration`, 6 minutes).
pub const FORCE_DETACH_SECS: u64 = 360;

impl Options {
    /// The knobs of `seed`.
    pub fn from_seed(seed: u64) -> Self {
        let mut r = StdRng::seed_from_u64(seed);
        // A quarter of the seeds run calm (no faults at all), so plain workloads are
        // covered too; the others draw each rate independently.
        let calm = r.random_range(0..4u32) == 0;
        let mut rate = |max: u32| if calm { 0 } else { r.random_range(0..=max) };
        let api_conflict_pct = rate(30);
        let api_5xx_pct = rate(20);
        let rds_fail_pct = rate(25);
        let rds_lost_reply_pct = rate(25);
        let bounce_pct = rate(12);
        let crash_point_pct = rate(25);
        let partition_pct = rate(12);
        let node_crash_pct = rate(10);
        let failover_pct = rate(10);
        let flaky_link_pct = rate(8);
        let node_delete_pct = rate(4);
        let node_partition_pct = rate(4);
        let api_spike_pct = rate(6);
        let device_loss_pct = rate(6);
        let leftover_pct = rate(60);
        let outage_roll = rate(100);
        let nodes = r.random_range(2..=4);
        let volumes = r.random_range(1..=4);
        let moves = r.random_range(1..=3);
        let repeat_pct = r.random_range(0..=40);
        let conflict_attach_pct = r.random_range(0..=50);
        let expand_pct = r.random_range(0..=40);
        let snapshot_pct = r.random_range(0..=40);
        let api_latency_ms = r.random_range(0..=20);
        let data_path_fence = r.random_range(0..8u32) != 0;
        let rpc_timeout_ms = r.random_range(500..=10_000);
        let fault_every_ms = r.random_range(200..=2_000);
        let chaos_secs = r.random_range(10..=60);
        let delete_race_pct = r.random_range(0..=50);
        let reissue_pct = r.random_range(0..=20);
        let operator_pct = r.random_range(0..=20);
        let reconcile_secs = if r.random_bool(0.5) {
            r.random_range(5..=60)
        } else {
            0
        };
        let rds_outage = match outage_roll {
            // One seed in six (of those with faults) has an outage, half of them long.
            0 => None,
            n if n <= 8 => Some((
                r.random_range(0..=chaos_secs * 1000),
                r.random_range(610..=780),
            )),
            n if n <= 16 => Some((
                r.random_range(0..=chaos_secs * 1000),
                r.random_range(5..=90),
            )),
            _ => None,
        };
        let finite_ctrl_loss_pct = if calm { 0 } else { r.random_range(0..=50) };
        // Drawn last: the knobs above are the same as before the reconcilers existed.
        let reconcilers = r.random_bool(0.5);
        let (orphan_delete, orphan_grace_secs, abandon_pct) = if reconcilers {
            (
                r.random_range(0..4u32) != 0,
                r.random_range(5..=90),
                r.random_range(0..=40),
            )
        } else {
            (false, 0, 0)
        };
        // Drawn after the reconcilers' knobs, for the same reason.
        let watch_fault_pct = if calm { 0 } else { r.random_range(0..=8) };
        let mut opts = Self {
            seed,
            nodes,
            volumes,
            moves,
            repeat_pct,
            conflict_attach_pct,
            expand_pct,
            snapshot_pct,
            api_conflict_pct,
            api_5xx_pct,
            api_latency_ms,
            rds_fail_pct,
            rds_lost_reply_pct,
            bounce_pct,
            crash_point_pct,
            partition_pct,
            flaky_link_pct,
            node_crash_pct,
            node_delete_pct,
            failover_pct,
            data_path_fence,
            node_partition_pct: if data_path_fence {
                node_partition_pct
            } else {
                0
            },
            api_spike_pct,
            delete_race_pct,
            reissue_pct,
            operator_pct,
            reconcile_secs,
            rpc_timeout_ms,
            fault_every_ms,
            chaos_secs,
            vms: 0,
            migrations: 0,
            migration_timeout_secs: 0,
            rds_outage,
            finite_ctrl_loss_pct,
            device_loss_pct,
            leftover_pct,
            reconcilers,
            orphan_delete,
            orphan_grace_secs,
            abandon_pct,
            watch_fault_pct,
            bug: None,
        };
        // The VMs are drawn last, so every knob above keeps its value for every seed.
        if r.random_bool(0.5) {
            opts.vms = r.random_range(1..=2);
        }
        opts.migrations = r.random_range(1..=3);
        opts.migration_timeout_secs = r.random_range(30..=60);
        opts
    }

    /// With `bug` planted.
    pub fn with_bug(mut self, bug: Bug) -> Self {
        self.bug = Some(bug);
        self
    }
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SEED={} nodes={} volumes={} moves={} repeat={}% conflict_attach={}% expand={}% \
             snapshot={}% api_409={}% \
             api_5xx={}% api_latency={}ms rds_fail={}% rds_lost_reply={}% bounce={}% \
             crash_point={}% partition={}% flaky_link={}% node_crash={}% node_delete={}% \
             failover={}% fence={} node_partition={}% api_spike={}% delete_race={}% \
             reissue={}% operator={}% reconcile={}s rpc_timeout={}ms fault_every={}ms chaos={}s \
             outage={} finite_ctrl_loss={}% device_loss={}% leftover={}% watch_fault={}%",
            self.seed,
            self.nodes,
            self.volumes,
            self.moves,
            self.repeat_pct,
            self.conflict_attach_pct,
            self.expand_pct,
            self.snapshot_pct,
            self.api_conflict_pct,
            self.api_5xx_pct,
            self.api_latency_ms,
            self.rds_fail_pct,
            self.rds_lost_reply_pct,
            self.bounce_pct,
            self.crash_point_pct,
            self.partition_pct,
            self.flaky_link_pct,
            self.node_crash_pct,
            self.node_delete_pct,
            self.failover_pct,
            if self.data_path_fence { "on" } else { "off" },
            self.node_partition_pct,
            self.api_spike_pct,
            self.delete_race_pct,
            self.reissue_pct,
            self.operator_pct,
            self.reconcile_secs,
            self.rpc_timeout_ms,
            self.fault_every_ms,
            self.chaos_secs,
            match self.rds_outage {
                Some((at, secs)) => format!("{secs}s@{}.{:03}s", at / 1000, at % 1000),
                None => "none".into(),
            },
            self.finite_ctrl_loss_pct,
            self.device_loss_pct,
            self.leftover_pct,
            self.watch_fault_pct,
        )?;
        if self.reconcilers {
            write!(
                f,
                " reconcilers=on orphans={} orphan_grace={}s abandon={}%",
                if self.orphan_delete {
                    "delete"
                } else {
                    "dry-run"
                },
                self.orphan_grace_secs,
                self.abandon_pct
            )?;
        }
        if self.vms > 0 {
            write!(
                f,
                " vms={} migrations={} migration_timeout={}s",
                self.vms, self.migrations, self.migration_timeout_secs
            )?;
        }
        if let Some(bug) = self.bug {
            write!(f, " bug={bug:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_are_a_function_of_the_seed() {
        assert_eq!(Options::from_seed(7), Options::from_seed(7));
        assert!(
            Options::from_seed(7)
                .to_string()
                .starts_with("SEED=7 nodes=")
        );
        let distinct: std::collections::BTreeSet<String> =
            (0..50).map(|s| Options::from_seed(s).to_string()).collect();
        assert_eq!(distinct.len(), 50);
    }
}
