//! The self-healing data path over the in-memory kernel: reconnect defaults, outages and
//! ctrl-loss-tmo, stale mounts and their repair, the filesystem check, the stage backoff,
//! the orphan sweep and the node metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::local_cluster::LocalCluster;
use crate::csi::inflight::InFlight;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node::fake::{FakeKernel, FsDamage, KernelEvent};
use crate::node::ops::{
    NodeAccess, NodeCapability, NodeOps, NodeOptions, Publish, ReconnectDefaults, Stage,
    VolumeKind,
};
use crate::node::orphans::{OrphanConfig, OrphanSweeper, VolumeBusy};
use crate::ports::cluster::VolumeAttachmentInfo;
use crate::ports::initiator::NvmeTarget;
use crate::ports::mounter::{MountEntry, TargetKind};
use crate::ports::{Initiator, Mounter};
use crate::types::{NodeId, VolumeId};

const PREFIX: &str = "nqn.2000-02.com.mikrotik:";

fn nqn(vol: &str) -> String {
    format!("{PREFIX}{vol}")
}

struct Node {
    k: FakeKernel,
    ops: NodeOps,
    metrics: Arc<Metrics>,
}

fn node() -> Node {
    let k = FakeKernel::new(PREFIX, "nqn.host");
    let metrics = Arc::new(Metrics::default());
    let ops = NodeOps::new(
        Arc::new(k.clone()),
        Arc::new(k.clone()),
        NodeOptions {
            allowed_root: Some("/k".into()),
            nqn_prefix: PREFIX.into(),
            require_target_address: true,
            reconnect: ReconnectDefaults::default(),
        },
    )
    .with_metrics(Arc::clone(&metrics));
    Node { k, ops, metrics }
}

fn target(vol: &str) -> NvmeTarget {
    NvmeTarget {
        address: "10.0.0.1".into(),
        port: 4420,
        nqn: nqn(vol),
        ctrl_loss_tmo: None,
        reconnect_delay: None,
        keep_alive_tmo: None,
    }
}

fn cap(kind: VolumeKind) -> NodeCapability {
    NodeCapability {
        kind,
        access: NodeAccess::Writer,
    }
}

fn ext4() -> VolumeKind {
    VolumeKind::Mount {
        fs_type: "ext4".into(),
        flags: vec![],
    }
}

fn staging(vol: &str) -> PathBuf {
    PathBuf::from(format!("/k/stage/{vol}"))
}

fn pod_target(vol: &str, pod: &str) -> PathBuf {
    PathBuf::from(format!("/k/pods/{pod}/{vol}"))
}

fn stage_req(vol: &str, kind: VolumeKind) -> Stage {
    Stage {
        volume_id: VolumeId::new(vol).unwrap(),
        staging_path: staging(vol),
        cap: cap(kind),
        target: target(vol),
    }
}

fn publish_req(vol: &str, pod: &str, kind: VolumeKind) -> Publish {
    Publish {
        volume_id: VolumeId::new(vol).unwrap(),
        staging_path: staging(vol),
        target_path: pod_target(vol, pod),
        cap: cap(kind),
        readonly: false,
        target: target(vol),
    }
}

fn id(vol: &str) -> VolumeId {
    VolumeId::new(vol).unwrap()
}

fn mount_of<'a>(k: &FakeKernel, path: &Path, table: &'a mut Vec<MountEntry>) -> &'a MountEntry {
    *table = k.mount_table();
    table.iter().rev().find(|m| m.target == path).unwrap()
}

impl Node {
    /// Stages and publishes `vol` (ext4) at `pod`.
    async fn running(&self, vol: &str, pod: &str) {
        self.k.add_disk(&nqn(vol), 1 << 30);
        self.ops.stage(&stage_req(vol, ext4())).await.unwrap();
        self.ops.publish(&publish_req(vol, pod, ext4())).await.unwrap();
    }

    async fn condition(&self, vol: &str, pod: &str) -> Option<String> {
        self.condition_at(vol, &pod_target(vol, pod)).await.unwrap()
    }

    async fn condition_at(&self, vol: &str, path: &Path) -> Result<Option<String>, Error> {
        Ok(self.ops.stats(&id(vol), path).await?.abnormal)
    }

    /// The staging mount and every publish target of `vol` are on its current device.
    async fn healthy(&self, vol: &str, pods: &[&str]) {
        let dev = self.k.find_device(&nqn(vol)).await.unwrap().unwrap();
        let number = self.k.device_number(&dev).await.unwrap();
        let mut table = Vec::new();
        assert_eq!(mount_of(&self.k, &staging(vol), &mut table).dev, number);
        for pod in pods {
            assert_eq!(mount_of(&self.k, &pod_target(vol, pod), &mut table).dev, number);
            assert_eq!(self.condition(vol, pod).await, None);
        }
    }
}

#[tokio::test]
async fn connects_use_the_node_defaults_unless_the_volume_sets_its_own() {
    let n = node();
    n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    n.ops.stage(&stage_req("pvc-1", VolumeKind::Block)).await.unwrap();
    assert_eq!(n.k.reconnect_settings(&nqn("pvc-1")), Some((-1, 5)));
    n.k.add_disk(&nqn("pvc-2"), 1 << 30);
    let mut r = stage_req("pvc-2", VolumeKind::Block);
    r.target.ctrl_loss_tmo = Some(60);
    n.ops.stage(&r).await.unwrap();
    assert_eq!(n.k.reconnect_settings(&nqn("pvc-2")), Some((60, 5)));
    let text = n.metrics.render();
    assert!(
        text.contains(r#"rds_csi_nvme_operations_total{op="connect",outcome="ok"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_connection_left_with_the_kernels_defaults_gets_the_node_defaults_when_staged() {
    // Found by the simulation (seeds 581, 2423, 2983): a connection the node did not make
    // with its settings (left from before a restart) was adopted by NodeStage as it was, and
    // an outage longer than the kernel's 600 s deleted it under the filesystem.
    let n = node();
    n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    n.k.connect(&target("pvc-1")).await.unwrap();
    assert_eq!(n.k.reconnect_settings(&nqn("pvc-1")), Some((600, 10)));
    n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap();
    assert_eq!(n.k.reconnect_settings(&nqn("pvc-1")), Some((-1, 5)));
    n.ops.publish(&publish_req("pvc-1", "p", ext4())).await.unwrap();
    n.k.take_events();
    let s = Duration::from_secs;
    n.k.outage_begins(s(100));
    n.k.advance(s(100 + 3_600));
    n.k.outage_ends();
    n.k.advance(s(100 + 3_605));
    assert!(n.k.take_events().is_empty(), "nothing lost under the mount");
    n.healthy("pvc-1", &["p"]).await;
    // The volume's own settings win over the node's, on an adopted connection too.
    n.k.add_disk(&nqn("pvc-2"), 1 << 30);
    n.k.connect(&target("pvc-2")).await.unwrap();
    let mut r = stage_req("pvc-2", VolumeKind::Block);
    r.target.ctrl_loss_tmo = Some(60);
    n.ops.stage(&r).await.unwrap();
    assert_eq!(n.k.reconnect_settings(&nqn("pvc-2")), Some((60, 5)));
}

#[tokio::test]
async fn an_outage_longer_than_ctrl_loss_tmo_deletes_the_controller_and_forever_rides_it_out() {
    let n = node();
    n.running("pvc-forever", "p").await;
    n.k.add_disk(&nqn("pvc-60"), 1 << 30);
    let mut r = stage_req("pvc-60", ext4());
    r.target.ctrl_loss_tmo = Some(60);
    n.ops.stage(&r).await.unwrap();
    let mut p = publish_req("pvc-60", "p", ext4());
    p.target.ctrl_loss_tmo = Some(60);
    n.ops.publish(&p).await.unwrap();
    n.k.take_events();

    let s = Duration::from_secs;
    n.k.outage_begins(s(100));
    n.k.advance(s(159));
    assert!(n.k.find_device(&nqn("pvc-60")).await.unwrap().is_some(), "within ctrl-loss-tmo");
    // I/O is queued while reconnecting: an unmount does not return.
    let err = n.k.unmount(&pod_target("pvc-forever", "p")).await.unwrap_err();
    assert!(err.to_string().contains("reconnects"), "{err}");
    n.k.advance(s(161));
    assert!(n.k.find_device(&nqn("pvc-60")).await.unwrap().is_none(), "deleted at 60 s");
    assert!(n.k.find_device(&nqn("pvc-forever")).await.unwrap().is_some());
    assert_eq!(
        n.k.take_events(),
        vec![KernelEvent::LostUnderMount {
            nqn: nqn("pvc-60"),
            ctrl_loss_tmo: 60,
            why: "ctrl-loss-tmo expired",
        }]
    );
    n.k.advance(s(10_000));
    n.k.outage_ends();
    assert!(!n.k.is_live(&nqn("pvc-forever")), "the next attempt is not due yet");
    n.k.advance(s(10_005));
    assert!(n.k.is_live(&nqn("pvc-forever")), "reconnected at the next attempt");
    n.healthy("pvc-forever", &["p"]).await;
    assert!(n.condition("pvc-60", "p").await.is_some());
}

#[tokio::test]
async fn a_lost_controller_is_stale_and_publish_repairs_it_under_a_new_name() {
    let n = node();
    n.running("pvc-a", "p1").await;
    n.running("pvc-b", "p1").await;
    let old = n.k.find_device(&nqn("pvc-a")).await.unwrap().unwrap();
    n.k.lose_connection(&nqn("pvc-a"));
    let cond = n.condition("pvc-a", "p1").await.expect("abnormal");
    assert!(
        cond.contains("stale") && cond.contains(&old.display().to_string()) && cond.contains("gone"),
        "{cond}"
    );
    // The kubelet's stats polling never repairs; a new pod's NodePublish does.
    n.ops.publish(&publish_req("pvc-a", "p2", ext4())).await.unwrap();
    let new = n.k.find_device(&nqn("pvc-a")).await.unwrap().unwrap();
    assert_ne!(new, old, "the dead mount still held the old name while reconnecting");
    n.healthy("pvc-a", &["p1", "p2"]).await;
    n.healthy("pvc-b", &["p1"]).await;
    let disk = n.k.disk(&nqn("pvc-a")).unwrap();
    assert_eq!(disk.formats, 1, "the filesystem was kept, never formatted again");
    let text = n.metrics.render();
    for line in [
        r#"rds_csi_stale_mounts_detected_total{check="stats"} 1"#,
        r#"rds_csi_stale_mounts_detected_total{check="publish"} 1"#,
        r#"rds_csi_volume_recoveries_total{outcome="ok"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing in {text}");
    }
    // The old name is free again now that the dead mount is gone: the next volume gets it.
    n.k.add_disk(&nqn("pvc-c"), 1 << 30);
    n.ops.stage(&stage_req("pvc-c", VolumeKind::Block)).await.unwrap();
    assert_eq!(n.k.find_device(&nqn("pvc-c")).await.unwrap(), Some(old));
    n.healthy("pvc-a", &["p1", "p2"]).await;
}

#[tokio::test]
async fn stage_repairs_a_stale_staging_mount_and_repeats_are_ok() {
    let n = node();
    n.running("pvc-1", "p").await;
    n.k.lose_connection(&nqn("pvc-1"));
    for _ in 0..2 {
        n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap();
    }
    n.healthy("pvc-1", &["p"]).await;
    assert_eq!(n.k.take_events().iter().filter(|e| matches!(e, KernelEvent::Connected { .. })).count(), 2);
}

#[tokio::test]
async fn a_repair_that_cannot_reconnect_fails_with_what_to_do_and_backs_off() {
    let n = node();
    n.running("pvc-1", "p").await;
    n.k.lose_connection(&nqn("pvc-1"));
    n.k.set_unreachable(true);
    let err = n.ops.publish(&publish_req("pvc-1", "p2", ext4())).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(
        msg.contains("stale") && msg.contains("3 repair attempts") && msg.contains("10.0.0.1:4420"),
        "{msg}"
    );
    // The dead mounts are left as they were: nothing half-done.
    assert!(n.k.mount_table().iter().any(|m| m.target == staging("pvc-1")));
    let cond = n.condition("pvc-1", "p").await.unwrap();
    assert!(cond.contains("repairs keep failing (1 in a row"), "{cond}");
    for _ in 0..2 {
        let _ = n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap_err();
    }
    let err = n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap_err();
    assert!(err.to_string().contains("3 times in a row"), "{err}");
    let calls = n.metrics.render();
    assert!(calls.contains(r#"rds_csi_volume_recoveries_total{outcome="error"} 1"#), "{calls}");
    // Healed and past the wait: repaired.
    n.k.set_unreachable(false);
    n.ops.backoff().forget(&id("pvc-1"));
    n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap();
    n.healthy("pvc-1", &["p"]).await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_volume_waits_before_it_is_tried_again() {
    let n = node();
    n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    n.k.set_unreachable(true);
    for _ in 0..3 {
        let err = n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap_err();
        assert!(err.to_string().contains("unreachable"), "{err}");
    }
    n.k.set_unreachable(false);
    let err = n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(ref m) if m.contains("reconnect storm")), "{err:?}");
    let connects = n.metrics.render();
    assert!(
        connects.contains(r#"rds_csi_nvme_operations_total{op="connect",outcome="error"} 3"#),
        "the refused attempt never reached the target: {connects}"
    );
    tokio::time::advance(crate::node::backoff::BASE).await;
    n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap();
    assert!(n.ops.backoff().is_empty());
}

#[tokio::test]
async fn a_renamed_loop_like_device_is_stale_while_it_still_exists() {
    // A loop device detached under its mount stays (autoclear) but is no longer the
    // volume's: the initiator still names its NQN, so it is stale, not foreign.
    let n = node();
    n.running("pvc-1", "p").await;
    let old = n.k.find_device(&nqn("pvc-1")).await.unwrap().unwrap();
    let mut table = Vec::new();
    let m = mount_of(&n.k, &staging("pvc-1"), &mut table).clone();
    let other = (PathBuf::from("/dev/nvme9n1"), "259:9".to_string());
    let verdict = n.ops.classify(&m, &nqn("pvc-1"), Some(&other)).await.unwrap();
    assert!(
        matches!(verdict, crate::node::ops::Mount::Stale(ref why) if why.contains("no longer")),
        "{verdict:?} (old {})",
        old.display()
    );
    // The same mount judged for another volume is someone else's.
    let verdict = n.ops.classify(&m, &nqn("pvc-2"), None).await.unwrap();
    assert_eq!(verdict, crate::node::ops::Mount::Foreign);
}

#[tokio::test]
async fn a_foreign_mount_at_the_staging_path_is_never_unmounted() {
    let n = node();
    n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    // Someone mounts a disk that is not this driver's where pvc-1 is to be staged.
    n.k.add_disk("nqn.2014-08.org.example:local", 1 << 30);
    let dev = n.k.leave_connection("nqn.2014-08.org.example:local").unwrap();
    n.k.format(&dev, "ext4").await.unwrap();
    n.k.prepare_target(&staging("pvc-1"), TargetKind::Directory).await.unwrap();
    n.k.mount(&dev, &staging("pvc-1"), "ext4", &[]).await.unwrap();
    let err = n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
    assert_eq!(n.k.mount_table().len(), 1);
    let err = n.ops.unstage(&id("pvc-1"), &staging("pvc-1")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert_eq!(n.k.mount_table().len(), 1);
    assert!(n.condition_at("pvc-1", &staging("pvc-1")).await.is_err(), "not this volume");
}

#[tokio::test]
async fn the_filesystem_is_checked_before_a_read_write_mount() {
    let n = node();
    n.running("pvc-1", "p").await;
    n.ops.publish(&publish_req("pvc-1", "p", ext4())).await.unwrap();
    n.ops.unpublish(&id("pvc-1"), &pod_target("pvc-1", "p")).await.unwrap();
    n.ops.unstage(&id("pvc-1"), &staging("pvc-1")).await.unwrap();
    // A journal left to replay: repaired on its own, the stage goes on.
    n.k.damage_filesystem(&nqn("pvc-1"), FsDamage::Repairable);
    n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap();
    assert_eq!(n.k.disk(&nqn("pvc-1")).unwrap().damage, FsDamage::None);
    n.ops.unstage(&id("pvc-1"), &staging("pvc-1")).await.unwrap();
    // Errors that need a person: refused, nothing mounted, nothing formatted.
    n.k.damage_filesystem(&nqn("pvc-1"), FsDamage::NeedsPerson);
    let err = n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("MANUALLY")), "{err:?}");
    assert!(n.k.mount_table().is_empty());
    assert_eq!(n.k.disk(&nqn("pvc-1")).unwrap().formats, 1);
    // A read-only mount cannot make it worse: not checked, mounted.
    let mut ro = stage_req("pvc-1", ext4());
    ro.cap.access = NodeAccess::ReadOnly;
    n.ops.backoff().forget(&id("pvc-1"));
    n.ops.stage(&ro).await.unwrap();
    assert_eq!(n.k.mount_table().len(), 1);
}

#[tokio::test]
async fn a_stale_raw_block_publish_is_bound_to_the_current_device() {
    let n = node();
    n.k.add_disk(&nqn("pvc-b"), 1 << 30);
    n.ops.stage(&stage_req("pvc-b", VolumeKind::Block)).await.unwrap();
    let p = publish_req("pvc-b", "p", VolumeKind::Block);
    n.ops.publish(&p).await.unwrap();
    n.k.lose_connection(&nqn("pvc-b"));
    assert!(n.condition("pvc-b", "p").await.unwrap().contains("gone"));
    n.ops.publish(&p).await.unwrap();
    let dev = n.k.find_device(&nqn("pvc-b")).await.unwrap().unwrap();
    assert_eq!(n.k.device_binds(&dev).await.unwrap(), vec![pod_target("pvc-b", "p")]);
    assert_eq!(n.condition("pvc-b", "p").await, None);
}

#[tokio::test]
async fn a_raw_block_volume_whose_connection_was_lost_is_connected_again_by_a_new_pods_publish() {
    // A raw block volume is staged by its connection alone: when the controller is gone
    // (lost, or deleted after ctrl-loss-tmo) the kubelet restarts the pod, which gets only
    // NodePublishVolume — the publish must connect again rather than answer "not staged"
    // for ever (found by the simulation: a KubeVirt VM's disk stayed unusable).
    let n = node();
    n.k.add_disk(&nqn("pvc-vm"), 1 << 30);
    n.ops.stage(&stage_req("pvc-vm", VolumeKind::Block)).await.unwrap();
    n.ops.publish(&publish_req("pvc-vm", "p1", VolumeKind::Block)).await.unwrap();
    n.k.lose_connection(&nqn("pvc-vm"));
    assert!(n.k.find_device(&nqn("pvc-vm")).await.unwrap().is_none());
    assert!(n.condition("pvc-vm", "p1").await.unwrap().contains("gone"));
    // The kubelet restarts the pod: the old pod's unpublish, the new pod's publish.
    n.ops.unpublish(&id("pvc-vm"), &pod_target("pvc-vm", "p1")).await.unwrap();
    n.ops.publish(&publish_req("pvc-vm", "p2", VolumeKind::Block)).await.unwrap();
    let dev = n.k.find_device(&nqn("pvc-vm")).await.unwrap().expect("connected again");
    assert!(n.k.is_live(&nqn("pvc-vm")));
    assert_eq!(n.k.device_binds(&dev).await.unwrap(), vec![pod_target("pvc-vm", "p2")]);
    assert_eq!(n.condition("pvc-vm", "p2").await, None);
    assert_eq!(n.k.reconnect_settings(&nqn("pvc-vm")), Some((-1, 5)), "the node's defaults");
    let text = n.metrics.render();
    for line in [
        r#"rds_csi_stale_mounts_detected_total{check="publish"} 1"#,
        r#"rds_csi_volume_recoveries_total{outcome="ok"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing in {text}");
    }
}

#[tokio::test]
async fn a_raw_block_bind_whose_device_name_went_to_another_volume_is_stale_not_foreign() {
    // A raw block bind is a devtmpfs bind: its own device number says nothing, and it does
    // not keep its device's name taken. Once the controller is lost, the next volume to
    // connect gets the name — the bind then names another volume's device. It is this
    // volume's bind gone stale (stats say so, publish binds the volume's new device), not
    // someone else's mount (found by the simulation: a KubeVirt VM disk's stats answered
    // NOT_FOUND and its pod was never restarted).
    let n = node();
    n.k.add_disk(&nqn("pvc-vm"), 1 << 30);
    n.ops.stage(&stage_req("pvc-vm", VolumeKind::Block)).await.unwrap();
    let p = publish_req("pvc-vm", "p", VolumeKind::Block);
    n.ops.publish(&p).await.unwrap();
    let old = n.k.find_device(&nqn("pvc-vm")).await.unwrap().unwrap();
    n.k.lose_connection(&nqn("pvc-vm"));
    n.k.add_disk(&nqn("pvc-other"), 1 << 30);
    n.ops.stage(&stage_req("pvc-other", VolumeKind::Block)).await.unwrap();
    assert_eq!(n.k.find_device(&nqn("pvc-other")).await.unwrap(), Some(old.clone()));

    let cond = n.condition("pvc-vm", "p").await.expect("abnormal, not NOT_FOUND");
    assert!(
        cond.contains("stale") && cond.contains(&format!("now belongs to {}", nqn("pvc-other"))),
        "{cond}"
    );
    // The restarted pod's publish at the same path binds the volume's own device again.
    n.ops.publish(&p).await.unwrap();
    let dev = n.k.find_device(&nqn("pvc-vm")).await.unwrap().unwrap();
    assert_ne!(dev, old);
    assert_eq!(n.k.device_binds(&dev).await.unwrap(), vec![pod_target("pvc-vm", "p")]);
    assert!(n.k.device_binds(&old).await.unwrap().is_empty(), "the other volume's device");
    assert_eq!(n.condition("pvc-vm", "p").await, None);
}

#[tokio::test]
async fn expand_of_a_stale_volume_says_to_repair_it_first() {
    let n = node();
    n.running("pvc-1", "p").await;
    n.k.lose_connection(&nqn("pvc-1"));
    let err = n
        .ops
        .expand(&id("pvc-1"), &pod_target("pvc-1", "p"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("stale")), "{err:?}");
}

// ---- The orphan sweep -------------------------------------------------------------------

struct Sweep {
    n: Node,
    cluster: Arc<LocalCluster>,
    inflight: InFlight,
    sweeper: OrphanSweeper,
}

fn sweep(dry_run: bool) -> Sweep {
    let n = node();
    let cluster = Arc::new(LocalCluster::new([]));
    cluster.set_volume_attachments(Some(Vec::new()));
    let inflight = InFlight::default();
    let sweeper = OrphanSweeper::new(
        NodeId::new("n1").unwrap(),
        n.ops.clone(),
        cluster.clone(),
        Arc::new(inflight.clone()),
        OrphanConfig {
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(120),
            dry_run,
        },
        Arc::clone(&n.metrics),
    );
    Sweep {
        n,
        cluster,
        inflight,
        sweeper,
    }
}

fn va(vol: &str, node: &str) -> VolumeAttachmentInfo {
    VolumeAttachmentInfo {
        volume_id: id(vol),
        node_id: NodeId::new(node).unwrap(),
        attached: true,
        deleting: false,
    }
}

#[tokio::test(start_paused = true)]
async fn only_unused_unheld_connections_go_and_only_after_the_grace_period() {
    let s = sweep(false);
    let k = &s.n.k;
    for v in ["pvc-orphan", "pvc-held", "pvc-mounted", "pvc-elsewhere"] {
        k.add_disk(&nqn(v), 1 << 30);
        k.leave_connection(&nqn(v)).unwrap();
    }
    s.n.running("pvc-mounted", "p").await;
    s.cluster.set_volume_attachments(Some(vec![
        va("pvc-held", "n1"),
        va("pvc-elsewhere", "n2"),
    ]));
    let r = s.sweeper.sweep().await.unwrap();
    assert!(r.judged);
    assert_eq!(r.waiting, vec![nqn("pvc-elsewhere"), nqn("pvc-orphan")]);
    assert!(r.disconnected.is_empty(), "nothing before the grace period");
    tokio::time::advance(Duration::from_secs(119)).await;
    assert!(s.sweeper.sweep().await.unwrap().disconnected.is_empty());
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = s.sweeper.sweep().await.unwrap();
    assert_eq!(r.disconnected, vec![nqn("pvc-elsewhere"), nqn("pvc-orphan")]);
    let left: Vec<String> = k.connections().await.unwrap().into_iter().map(|c| c.nqn).collect();
    assert_eq!(left, vec![nqn("pvc-held"), nqn("pvc-mounted")]);
    assert_eq!(k.mount_table().len(), 2, "no mount touched");
    assert!(s
        .n
        .metrics
        .render()
        .contains(r#"rds_csi_orphan_connections_total{outcome="disconnected"} 2"#));
}

#[tokio::test(start_paused = true)]
async fn a_mounted_volume_fenced_away_is_disconnected_so_the_kubelet_can_unmount_it() {
    let s = sweep(false);
    let k = &s.n.k;
    for v in ["pvc-fenced", "pvc-outage"] {
        s.n.running(v, "p").await;
    }
    // Both reconnect (the RDS is away); only pvc-outage is still attached to this node.
    k.outage_begins(Duration::ZERO);
    s.cluster
        .set_volume_attachments(Some(vec![va("pvc-outage", "n1")]));
    let r = s.sweeper.sweep().await.unwrap();
    assert_eq!(r.waiting, vec![nqn("pvc-fenced")]);
    // The kubelet's NodeUnpublish waits on the queued I/O meanwhile.
    let unpublish = s.n.ops.unpublish(&id("pvc-fenced"), &pod_target("pvc-fenced", "p")).await;
    assert_eq!(unpublish.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    tokio::time::advance(Duration::from_secs(120)).await;
    let r = s.sweeper.sweep().await.unwrap();
    assert_eq!(r.disconnected, vec![nqn("pvc-fenced")]);
    // Its queued I/O failed with the controller: the kubelet's cleanup now finishes.
    s.n.ops
        .unpublish(&id("pvc-fenced"), &pod_target("pvc-fenced", "p"))
        .await
        .unwrap();
    s.n.ops
        .unstage(&id("pvc-fenced"), &staging("pvc-fenced"))
        .await
        .unwrap();
    // The volume still attached here keeps its controller and mounts through the outage.
    let left: Vec<String> = k.connections().await.unwrap().into_iter().map(|c| c.nqn).collect();
    assert_eq!(left, vec![nqn("pvc-outage")]);
    assert!(k
        .mount_table()
        .iter()
        .all(|m| m.target.to_string_lossy().contains("pvc-outage")));
}

#[tokio::test(start_paused = true)]
async fn the_grace_period_starts_again_when_a_connection_is_used_meanwhile() {
    let s = sweep(false);
    s.n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    s.n.k.leave_connection(&nqn("pvc-1")).unwrap();
    assert_eq!(s.sweeper.sweep().await.unwrap().waiting.len(), 1);
    tokio::time::advance(Duration::from_secs(100)).await;
    // Attached to this node and staged: held and used.
    s.cluster.set_volume_attachments(Some(vec![va("pvc-1", "n1")]));
    s.n.ops.stage(&stage_req("pvc-1", ext4())).await.unwrap();
    assert!(s.sweeper.sweep().await.unwrap().waiting.is_empty());
    s.n.ops.unstage(&id("pvc-1"), &staging("pvc-1")).await.unwrap();
    s.n.k.leave_connection(&nqn("pvc-1")).unwrap();
    s.cluster.set_volume_attachments(Some(Vec::new()));
    tokio::time::advance(Duration::from_secs(100)).await;
    let r = s.sweeper.sweep().await.unwrap();
    assert_eq!((r.waiting.len(), r.disconnected.len()), (1, 0), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_without_records_or_with_a_busy_volume_disconnects_nothing() {
    let s = sweep(true);
    s.n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    s.n.k.leave_connection(&nqn("pvc-1")).unwrap();
    s.sweeper.sweep().await.unwrap();
    tokio::time::advance(Duration::from_secs(121)).await;
    let r = s.sweeper.sweep().await.unwrap();
    assert_eq!(r.would_disconnect, vec![nqn("pvc-1")]);
    assert_eq!(s.n.k.connections().await.unwrap().len(), 1);

    let s = sweep(false);
    s.n.k.add_disk(&nqn("pvc-1"), 1 << 30);
    s.n.k.leave_connection(&nqn("pvc-1")).unwrap();
    s.sweeper.sweep().await.unwrap();
    tokio::time::advance(Duration::from_secs(121)).await;
    // An RPC on the volume is in flight: the sweep keeps off it.
    let key = s.inflight.try_hold(&id("pvc-1")).unwrap();
    let r = s.sweeper.sweep().await.unwrap();
    assert_eq!((r.waiting.clone(), r.disconnected.len()), (vec![nqn("pvc-1")], 0));
    drop(key);
    // No records at all (no Kubernetes): nothing is judged, nothing goes.
    s.cluster.set_volume_attachments(None);
    let r = s.sweeper.sweep().await.unwrap();
    assert!(!r.judged && r.disconnected.is_empty());
    assert_eq!(s.n.k.connections().await.unwrap().len(), 1);
}
