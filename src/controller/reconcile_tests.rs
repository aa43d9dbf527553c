//! Rules of the controller's reconcilers (orphan volumes, stale attachments, the leader
//! loop) over the embedded adapters, in tokio's paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::attachment::{AttachmentConfig, AttachmentManager, PublishArgs};
use crate::backend::{local_cluster::LocalCluster, mem_store::MemStore};
use crate::controller::orphans::{OrphanMode, OrphanVolumeConfig, OrphanVolumes};
use crate::controller::reconcile::{ReconcileConfig, Reconcilers, StaleAttachments};
use crate::types::note::SnapshotNote;
use crate::csi::inflight::InFlight;
use crate::metrics::{Metrics, StaleReason};
use crate::ports::cluster::{ClusterError, DiskReferences, VolumeAttachmentInfo, reason};
use crate::ports::rds::{DiskSpec, NvmeExport};
use crate::ports::store::AttachmentRecord;
use crate::ports::time::SystemClock;
use crate::ports::{AttachmentStore, Leadership, Rds};
use crate::routeros::InMemoryRds;
use crate::types::defaults::DEFAULT_NQN_PREFIX;
use crate::types::{AccessMode, NodeId, VolumeId};

const GRACE: Duration = Duration::from_secs(3600);

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}
fn nid(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A lease this test hands out or takes away.
struct Flag(AtomicBool);
#[async_trait]
impl Leadership for Flag {
    async fn try_lead(&self) -> Result<bool, ClusterError> {
        Ok(self.0.load(Ordering::SeqCst))
    }
}

struct World {
    rds: Arc<InMemoryRds>,
    store: Arc<MemStore>,
    cluster: Arc<LocalCluster>,
    mgr: Arc<AttachmentManager>,
    inflight: InFlight,
    metrics: Metrics,
    leader: Arc<Flag>,
}

impl World {
    async fn new() -> Self {
        let rds = crate::routeros::in_memory_rds(1 << 40);
        let store = Arc::new(MemStore::new());
        let cluster = Arc::new(LocalCluster::new([nid("node-a"), nid("node-b")]));
        cluster.register_node(nid("node-a"), Some("nqn.2014-08.org.nvmexpress:uuid:aaaa".into()));
        cluster.register_node(nid("node-b"), Some("nqn.2014-08.org.nvmexpress:uuid:bbbb".into()));
        let mgr = Arc::new(AttachmentManager::new(
            rds.clone(),
            store.clone(),
            cluster.clone(),
            Arc::new(SystemClock),
            AttachmentConfig {
                data_path_fence: true,
                ..AttachmentConfig::default()
            },
        ));
        Self {
            rds,
            store,
            cluster,
            mgr,
            inflight: InFlight::default(),
            metrics: Metrics::default(),
            leader: Arc::new(Flag(AtomicBool::new(true))),
        }
    }

    async fn volume(&self, slot: &str, prefix: &str) {
        self.rds
            .create_disk(&DiskSpec {
                slot: slot.into(),
                size_bytes: 1 << 20,
                export: Some(NvmeExport {
                    port: 4420,
                    nqn: format!("{prefix}{slot}"),
                }),
                copy_from: None,
                comment: None,
                allowed_host_nqn: None,
            })
            .await
            .unwrap();
    }

    async fn snapshot(&self, slot: &str, source: &str) {
        self.rds
            .create_snapshot(
                source,
                slot,
                &SnapshotNote {
                    source: source.to_string(),
                    name: None,
                }
                .render(),
            )
            .await
            .unwrap();
    }

    fn orphans(&self, mode: OrphanMode) -> OrphanVolumes {
        OrphanVolumes::new(
            self.rds.clone(),
            Arc::clone(&self.mgr),
            self.cluster.clone(),
            Arc::new(self.inflight.clone()),
            Arc::new(SystemClock),
            DEFAULT_NQN_PREFIX,
            OrphanVolumeConfig {
                mode,
                interval: Duration::from_secs(60),
                grace: GRACE,
            },
            self.metrics.reconcilers(),
        )
    }

    fn refs(&self, volumes: &[&str], snapshots: &[&str]) {
        self.cluster.set_disk_references(Some(DiskReferences {
            volumes: volumes.iter().map(|s| s.to_string()).collect(),
            snapshots: Some(snapshots.iter().map(|s| s.to_string()).collect()),
        }));
    }

    async fn exists(&self, slot: &str) -> bool {
        self.rds.get_disk(slot).await.unwrap().is_some()
    }

    fn events(&self, reason: &str) -> Vec<String> {
        self.cluster
            .events()
            .into_iter()
            .filter(|e| e.reason == reason)
            .map(|e| e.volume_id.to_string())
            .collect()
    }
}

/// Disks of every kind the reconciler must tell apart.
async fn populated() -> World {
    let w = World::new().await;
    for v in ["pvc-kept", "pvc-orphan", "pvc-held", "pvc-va"] {
        w.volume(v, DEFAULT_NQN_PREFIX).await;
    }
    w.volume("pvc-foreign", "nqn.2000-02.com.example:").await;
    w.snapshot("snap-kept", "pvc-kept").await;
    w.snapshot("snap-orphan", "pvc-kept").await;
    w.refs(&["pvc-kept"], &["snap-kept"]);
    // A record holds pvc-held; a VolumeAttachment names pvc-va.
    let record = AttachmentRecord::new(
        vid("pvc-held"),
        nid("node-a"),
        std::time::UNIX_EPOCH,
        AccessMode::SingleNode,
        false,
    );
    w.store
        .write_volume(&vid("pvc-held"), &[record])
        .await
        .unwrap();
    w.mgr.rebuild().await.unwrap();
    w.cluster.set_volume_attachments(Some(vec![VolumeAttachmentInfo {
        volume_id: vid("pvc-va"),
        node_id: nid("node-b"),
        attached: true,
        deleting: false,
    }]));
    w
}

#[tokio::test(start_paused = true)]
async fn the_dry_run_reports_orphans_and_deletes_nothing() {
    let w = populated().await;
    w.volume("pvc-creating", DEFAULT_NQN_PREFIX).await;
    let _creating = w.inflight.try_start("volume/pvc-creating", "volume pvc-creating").unwrap();
    let r = w.orphans(OrphanMode::DryRun);
    let report = r.pass(&*w.leader).await.unwrap();
    assert!(report.judged);
    assert_eq!(report.orphans, ["pvc-orphan", "snap-orphan"]);
    assert_eq!(report.new, ["pvc-orphan", "snap-orphan"]);
    assert!(w.metrics.render().contains("rds_csi_orphan_volumes 2"), "{}", w.metrics.render());
    assert_eq!(w.events(reason::ORPHAN_VOLUME_FOUND), ["pvc-orphan", "snap-orphan"]);
    tokio::time::advance(GRACE * 2).await;
    let report = r.pass(&*w.leader).await.unwrap();
    assert!(report.new.is_empty(), "found once, reported every pass");
    assert_eq!(report.would_delete, ["pvc-orphan", "snap-orphan"]);
    assert!(report.deleted.is_empty());
    for slot in ["pvc-orphan", "snap-orphan", "pvc-kept", "pvc-foreign"] {
        assert!(w.exists(slot).await, "{slot} deleted by a dry run");
    }
    assert_eq!(w.events(reason::ORPHAN_VOLUME_FOUND).len(), 2, "one Event per orphan");
}

#[tokio::test(start_paused = true)]
async fn delete_mode_deletes_only_unwanted_disks_after_the_grace_period() {
    let w = populated().await;
    w.volume("pvc-creating", DEFAULT_NQN_PREFIX).await;
    let creating = w.inflight.try_start("volume/pvc-creating", "volume pvc-creating").unwrap();
    let r = w.orphans(OrphanMode::Delete);
    assert!(r.pass(&*w.leader).await.unwrap().deleted.is_empty());
    tokio::time::advance(GRACE - Duration::from_secs(1)).await;
    assert!(r.pass(&*w.leader).await.unwrap().deleted.is_empty(), "the grace is not over");
    tokio::time::advance(Duration::from_secs(1)).await;
    let report = r.pass(&*w.leader).await.unwrap();
    assert_eq!(report.deleted, ["pvc-orphan", "snap-orphan"]);
    assert!(!w.exists("pvc-orphan").await && !w.exists("snap-orphan").await);
    for slot in ["pvc-kept", "snap-kept", "pvc-held", "pvc-va", "pvc-creating", "pvc-foreign"] {
        assert!(w.exists(slot).await, "{slot} was wanted");
    }
    assert_eq!(w.events(reason::ORPHAN_VOLUME_DELETED), ["pvc-orphan", "snap-orphan"]);
    assert!(w.metrics.render().contains("rds_csi_orphan_volumes_deleted_total 2"));
    // The CreateVolume ends without a PV (the CO gave up): its disk is an orphan from
    // now on, and waits a whole grace period.
    drop(creating);
    let report = r.pass(&*w.leader).await.unwrap();
    assert_eq!(report.new, ["pvc-creating"]);
    assert!(report.deleted.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_restart_or_a_disk_wanted_again_restarts_the_grace_period() {
    let w = populated().await;
    let r = w.orphans(OrphanMode::Delete);
    r.pass(&*w.leader).await.unwrap();
    tokio::time::advance(GRACE / 2).await;
    // A new process (a restart): the orphans are new to it.
    let restarted = w.orphans(OrphanMode::Delete);
    assert_eq!(restarted.pass(&*w.leader).await.unwrap().new.len(), 2);
    tokio::time::advance(GRACE / 2).await;
    assert!(restarted.pass(&*w.leader).await.unwrap().deleted.is_empty(), "grace counted from the restart");
    // pvc-orphan is wanted again for a pass (a PV came and went): its clock restarts.
    w.refs(&["pvc-kept", "pvc-orphan"], &["snap-kept"]);
    restarted.pass(&*w.leader).await.unwrap();
    w.refs(&["pvc-kept"], &["snap-kept"]);
    tokio::time::advance(GRACE / 2).await;
    let report = restarted.pass(&*w.leader).await.unwrap();
    assert_eq!(report.deleted, ["snap-orphan"]);
    assert!(w.exists("pvc-orphan").await);
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_deletes_and_without_references_nothing_is_judged() {
    let w = populated().await;
    let r = w.orphans(OrphanMode::Delete);
    r.pass(&*w.leader).await.unwrap();
    tokio::time::advance(GRACE).await;
    w.leader.0.store(false, Ordering::SeqCst);
    assert!(r.pass(&*w.leader).await.unwrap().deleted.is_empty(), "lost the lease");
    assert!(w.exists("pvc-orphan").await);
    // A call in flight on the orphan when it is due: left for the next pass.
    w.leader.0.store(true, Ordering::SeqCst);
    let busy = w.inflight.try_start("volume/pvc-orphan", "volume pvc-orphan").unwrap();
    assert_eq!(r.pass(&*w.leader).await.unwrap().deleted, ["snap-orphan"]);
    assert!(w.exists("pvc-orphan").await);
    drop(busy);
    // No orchestrator objects (no Kubernetes): nothing judged, clocks forgotten.
    w.cluster.set_disk_references(None);
    let report = r.pass(&*w.leader).await.unwrap();
    assert!(!report.judged && report.orphans.is_empty());
    assert!(w.exists("pvc-orphan").await);
}

#[tokio::test(start_paused = true)]
async fn without_the_snapshot_api_snapshots_are_never_orphans() {
    let w = populated().await;
    w.cluster.set_disk_references(Some(DiskReferences {
        volumes: ["pvc-kept".to_string()].into(),
        snapshots: None,
    }));
    let report = w.orphans(OrphanMode::DryRun).pass(&*w.leader).await.unwrap();
    assert_eq!(report.orphans, ["pvc-orphan"]);
}

// ---- the attachment reconciler ----

async fn published(w: &World, volume: &str, node: &str) {
    w.volume(volume, DEFAULT_NQN_PREFIX).await;
    w.mgr
        .publish(&PublishArgs {
            volume_id: vid(volume),
            node_id: nid(node),
            access_mode: AccessMode::SingleNode,
            readonly: false,
            block: false,
            fs_type: Some("ext4".into()),
            nvme_address: Some("10.0.0.5".into()),
            migration_timeout: crate::attachment::migration::DEFAULT_TIMEOUT,
        })
        .await
        .unwrap();
}

fn va(volume: &str, node: &str, deleting: bool) -> VolumeAttachmentInfo {
    VolumeAttachmentInfo {
        volume_id: vid(volume),
        node_id: nid(node),
        attached: true,
        deleting,
    }
}

fn stale(w: &World) -> StaleAttachments {
    StaleAttachments::new(Arc::clone(&w.mgr), w.cluster.clone(), w.metrics.reconcilers())
}

#[tokio::test(start_paused = true)]
async fn a_deleted_node_loses_its_records_once_its_volume_attachments_go() {
    let w = World::new().await;
    published(&w, "pvc-1", "node-a").await;
    published(&w, "pvc-2", "node-a").await;
    published(&w, "pvc-3", "node-b").await;
    w.cluster.set_volume_attachments(Some(vec![
        va("pvc-1", "node-a", false),
        va("pvc-2", "node-a", false),
        va("pvc-3", "node-b", false),
    ]));
    let s = stale(&w);
    assert!(s.pass().await.unwrap().is_empty(), "all live");
    w.cluster.remove_node(&nid("node-a"));
    assert!(s.pass().await.unwrap().is_empty(), "its VolumeAttachments still stand");
    // Kubernetes force-detaches pvc-1 (deleting) and pvc-2's object is gone.
    w.cluster.set_volume_attachments(Some(vec![
        va("pvc-1", "node-a", true),
        va("pvc-3", "node-b", false),
    ]));
    let cleared = s.pass().await.unwrap();
    assert_eq!(
        cleared,
        [
            (vid("pvc-1"), nid("node-a"), StaleReason::NodeGone),
            (vid("pvc-2"), nid("node-a"), StaleReason::NodeGone),
        ]
    );
    assert!(w.store.read_volume(&vid("pvc-1")).await.unwrap().is_empty(), "durable");
    assert!(w.mgr.get(&vid("pvc-2")).is_empty());
    assert_eq!(w.mgr.get(&vid("pvc-3")).len(), 1, "another node's record stays");
    // The fence moved after the record: the exports are parked.
    let parked = crate::attachment::fence::parked_nqn(&vid("pvc-1"));
    let disk = w.rds.get_disk("pvc-1").await.unwrap().unwrap();
    assert_eq!(disk.allowed_host_nqn.as_deref(), Some(parked.as_str()));
    assert_eq!(w.events(reason::STALE_ATTACHMENT_CLEARED), ["pvc-1", "pvc-2"]);
    assert!(s.pass().await.unwrap().is_empty(), "nothing left to clear");
}

#[tokio::test(start_paused = true)]
async fn a_volume_attachment_released_by_hand_clears_its_record_but_a_deleting_one_waits() {
    let w = World::new().await;
    published(&w, "pvc-1", "node-a").await;
    published(&w, "pvc-2", "node-b").await;
    // pvc-1's VolumeAttachment is being deleted: the attacher's finalizer is on it and
    // our unpublish is on its way. pvc-2's is gone: its finalizer was removed by hand.
    w.cluster
        .set_volume_attachments(Some(vec![va("pvc-1", "node-a", true)]));
    let cleared = stale(&w).pass().await.unwrap();
    assert_eq!(
        cleared,
        [(vid("pvc-2"), nid("node-b"), StaleReason::VolumeAttachmentGone)]
    );
    assert_eq!(w.mgr.get(&vid("pvc-1")).len(), 1);
    assert!(w.store.read_volume(&vid("pvc-2")).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_clear_never_overwrites_what_another_writer_recorded() {
    let w = World::new().await;
    published(&w, "pvc-1", "node-a").await;
    w.cluster.set_volume_attachments(Some(vec![]));
    // Another replica moved the volume to node-b after our memory was filled.
    let moved = AttachmentRecord::new(
        vid("pvc-1"),
        nid("node-b"),
        std::time::UNIX_EPOCH,
        AccessMode::SingleNode,
        false,
    );
    w.store.write_volume(&vid("pvc-1"), &[moved]).await.unwrap();
    w.cluster
        .set_volume_attachments(Some(vec![va("pvc-1", "node-b", false)]));
    // The clear of node-a's record re-reads the store under the lock: nothing to clear,
    // and node-b's record stands.
    assert!(stale(&w).pass().await.unwrap().is_empty());
    let stored = w.store.read_volume(&vid("pvc-1")).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].node_id, nid("node-b"));
    assert_eq!(w.mgr.get(&vid("pvc-1"))[0].node_id, nid("node-b"), "memory follows the store");
}

#[tokio::test(start_paused = true)]
async fn the_loop_runs_on_the_leader_only_and_a_nudge_runs_the_attachment_pass() {
    let w = World::new().await;
    published(&w, "pvc-1", "node-a").await;
    w.cluster
        .set_volume_attachments(Some(vec![va("pvc-1", "node-a", false)]));
    w.leader.0.store(false, Ordering::SeqCst);
    let loop_ = Arc::new(Reconcilers::new(
        w.leader.clone(),
        Arc::new(w.orphans(OrphanMode::DryRun)),
        Arc::new(stale(&w)),
        ReconcileConfig {
            lease_duration: Duration::from_secs(15),
            attachment_interval: Duration::ZERO,
        },
    ));
    loop_.spawn();
    w.cluster.set_volume_attachments(Some(vec![]));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(w.mgr.get(&vid("pvc-1")).len(), 1, "not the leader: nothing cleared");
    w.leader.0.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(w.mgr.get(&vid("pvc-1")).len(), 1, "no interval, no nudge: no pass");
    loop_.nudge();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(w.mgr.get(&vid("pvc-1")).is_empty(), "the nudge ran a pass");
}
