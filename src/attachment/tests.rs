//! Behaviour of the attachment manager over the embedded adapters.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::attachment::{AttachmentConfig, AttachmentManager, PublishArgs, UnpublishArgs};
use crate::backend::{file_store::FileStore, local_cluster::LocalCluster, mem_store::MemStore};
use crate::error::Error;
use crate::ports::cluster::VolumeAttachmentInfo;
use crate::ports::rds::{DiskSpec, NvmeExport};
use crate::ports::store::StoreError;
use crate::ports::{AttachmentStore, Clock, Rds};
use crate::routeros::InMemoryRds;
use crate::types::{AccessMode, NodeId, VolumeId};

struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_760_000_000_000_001)
    }
}

pub(super) struct World {
    pub(super) _dir: tempfile::TempDir,
    pub(super) rds: Arc<InMemoryRds>,
    pub(super) store: Arc<MemStore>,
    pub(super) cluster: Arc<LocalCluster>,
    pub(super) mgr: Arc<AttachmentManager>,
}

pub(super) fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}
pub(super) fn nid(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

async fn world(cfg: AttachmentConfig) -> World {
    world_with(cfg, Arc::new(FixedClock)).await
}

/// Volumes `pvc-1..3` on an in-memory RDS, nodes `node-a..c` (a and b with host NQNs), a
/// manager over them with `cfg` and `clock`.
pub(super) async fn world_with(cfg: AttachmentConfig, clock: Arc<dyn Clock>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let rds = crate::routeros::in_memory_rds(1 << 40);
    for v in ["pvc-1", "pvc-2", "pvc-3"] {
        rds.create_disk(&DiskSpec {
            slot: v.into(),
            size_bytes: 1 << 20,
            export: Some(NvmeExport {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{v}"),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        })
        .await
        .unwrap();
    }
    let store = Arc::new(MemStore::new());
    let cluster = Arc::new(LocalCluster::new([
        nid("node-a"),
        nid("node-b"),
        nid("node-c"),
    ]));
    cluster.register_node(
        nid("node-a"),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa".into()),
    );
    cluster.register_node(
        nid("node-b"),
        Some("nqn.2014-08.org.nvmexpress:uuid:bbbb".into()),
    );
    let mgr = Arc::new(AttachmentManager::new(
        rds.clone(),
        store.clone(),
        cluster.clone(),
        clock,
        cfg,
    ));
    World {
        _dir: dir,
        rds,
        store,
        cluster,
        mgr,
    }
}

pub(super) fn publish_args(v: &str, n: &str, readonly: bool) -> PublishArgs {
    PublishArgs {
        volume_id: vid(v),
        node_id: nid(n),
        access_mode: AccessMode::SingleNode,
        readonly,
        block: false,
        fs_type: Some("ext4".into()),
        nvme_address: Some("10.0.0.5".into()),
        migration_timeout: crate::attachment::migration::DEFAULT_TIMEOUT,
    }
}

pub(super) fn unpublish_args(v: &str, n: Option<&str>) -> UnpublishArgs {
    UnpublishArgs {
        volume_id: vid(v),
        node_id: n.map(nid),
    }
}

pub(super) fn holders(w: &World, v: &str) -> Vec<String> {
    holders_of(&w.mgr, v)
}

fn holders_of(mgr: &AttachmentManager, v: &str) -> Vec<String> {
    mgr.get(&vid(v))
        .into_iter()
        .map(|r| r.node_id.to_string())
        .collect()
}

/// The NQN a parked export of `v` admits.
fn parked(v: &str) -> String {
    crate::attachment::fence::parked_nqn(&vid(v))
}

/// The host NQN `v`'s export admits (`None`: any host).
pub(super) async fn allowed_host(w: &World, v: &str) -> Option<String> {
    w.rds.get_disk(v).await.unwrap().unwrap().allowed_host_nqn
}

async fn stored(w: &World) -> Vec<(String, String)> {
    w.store
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.volume_id.to_string(), r.node_id.to_string()))
        .collect()
}

#[tokio::test]
async fn publish_tracks_durably_and_returns_the_publish_context() {
    let w = world(AttachmentConfig::default()).await;
    let ctx = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    insta::with_settings!({
        snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"),
        prepend_module_to_snapshot => false,
    }, {
        insta::assert_debug_snapshot!("attachment_publish_context", ctx);
    });
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    assert_eq!(stored(&w).await, vec![("pvc-1".into(), "node-a".into())]);
    assert_eq!(w.mgr.volumes_on(&nid("node-a")), 1);
    assert_eq!(w.mgr.lock_entries(), 0);
}

#[tokio::test]
async fn repeated_publish_is_ok_ten_times_and_a_different_readonly_is_already_exists() {
    let w = world(AttachmentConfig::default()).await;
    let first = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(
            w.mgr
                .publish(&publish_args("pvc-1", "node-a", false))
                .await
                .unwrap(),
            first
        );
    }
    assert_eq!(w.store.writes(), 1, "an idempotent repeat writes nothing");
    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", true))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::AlreadyExists(ref m) if m.contains("readonly")),
        "{err:?}"
    );
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
}

#[tokio::test]
async fn unknown_volume_or_node_is_not_found() {
    let w = world(AttachmentConfig::default()).await;
    let err = w
        .mgr
        .publish(&publish_args("pvc-missing", "node-a", false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("pvc-missing")),
        "{err:?}"
    );
    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-z", false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("node-z")),
        "{err:?}"
    );
    assert!(w.mgr.list().is_empty());
}

#[tokio::test]
async fn publish_to_second_node_is_fenced_with_an_event() {
    let w = world(AttachmentConfig::default()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-b", false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(ref m) if m.contains("node-a")),
        "{err:?}"
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    let reasons: Vec<(String, bool)> = w
        .cluster
        .events()
        .into_iter()
        .map(|e| (e.reason, e.warning))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("VolumeAttached".to_string(), false),
            ("AttachmentConflict".to_string(), true)
        ]
    );
}

#[tokio::test]
async fn a_holder_whose_node_is_gone_is_cleared_and_the_publish_proceeds() {
    let w = world(AttachmentConfig::default()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    w.cluster.remove_node(&nid("node-a"));
    w.mgr
        .publish(&publish_args("pvc-1", "node-b", false))
        .await
        .unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-b"]);
    assert_eq!(stored(&w).await, vec![("pvc-1".into(), "node-b".into())]);
    assert_eq!(
        w.store.writes(),
        2,
        "stale clear and new holder in one write"
    );
    assert_eq!(w.mgr.volumes_on(&nid("node-a")), 0);
    let reasons: Vec<String> = w.cluster.events().into_iter().map(|e| e.reason).collect();
    assert_eq!(
        reasons,
        ["VolumeAttached", "StaleAttachmentCleared", "VolumeAttached"]
    );
}

#[tokio::test]
async fn multi_node_modes_share_and_mixed_modes_are_refused() {
    let w = world(AttachmentConfig::default()).await;
    let rox = |n: &str| PublishArgs {
        access_mode: AccessMode::MultiNodeReadOnly,
        readonly: true,
        ..publish_args("pvc-1", n, true)
    };
    w.mgr.publish(&rox("node-a")).await.unwrap();
    w.mgr.publish(&rox("node-b")).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a", "node-b"]);
    let rwx = PublishArgs {
        access_mode: AccessMode::MultiNodeMultiWriter,
        block: true,
        ..publish_args("pvc-1", "node-c", false)
    };
    let err = w.mgr.publish(&rwx).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    let single = publish_args("pvc-1", "node-c", false);
    assert!(matches!(
        w.mgr.publish(&single).await.unwrap_err(),
        Error::FailedPrecondition(_)
    ));
    // Unpublish with no node: from every node.
    w.mgr
        .unpublish(&unpublish_args("pvc-1", None))
        .await
        .unwrap();
    assert!(w.mgr.list().is_empty());
    assert!(stored(&w).await.is_empty());
}

#[tokio::test]
async fn max_volumes_per_node_is_honoured() {
    let w = world(AttachmentConfig {
        max_volumes_per_node: 2,
        ..Default::default()
    })
    .await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    w.mgr
        .publish(&publish_args("pvc-2", "node-a", false))
        .await
        .unwrap();
    let err = w
        .mgr
        .publish(&publish_args("pvc-3", "node-a", false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ResourceExhausted(ref m) if m.contains("node-a")),
        "{err:?}"
    );
    // The repeat of an existing attachment is not a new one.
    w.mgr
        .publish(&publish_args("pvc-2", "node-a", false))
        .await
        .unwrap();
    w.mgr
        .unpublish(&unpublish_args("pvc-1", Some("node-a")))
        .await
        .unwrap();
    w.mgr
        .publish(&publish_args("pvc-3", "node-a", false))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_persist_rolls_back_memory_and_fails_the_rpc() {
    let w = world(AttachmentConfig::default()).await;
    w.store
        .fail_next_writes([StoreError::Unavailable("api down".into())]);
    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    assert!(w.mgr.list().is_empty());
    assert_eq!(w.mgr.volumes_on(&nid("node-a")), 0);
    // A conflict storm beyond the store's retries is ABORTED.
    w.store
        .fail_next_writes([StoreError::Conflict("pv pvc-1".into())]);
    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    // A missing PV refuses the publish.
    w.store
        .fail_next_writes([StoreError::NotFound("PersistentVolume pvc-1".into())]);
    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap_err();
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
    assert!(w.mgr.list().is_empty());

    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    w.store
        .fail_next_writes([StoreError::Unavailable("api down".into())]);
    assert!(
        w.mgr
            .unpublish(&unpublish_args("pvc-1", Some("node-a")))
            .await
            .is_err()
    );
    assert_eq!(
        holders(&w, "pvc-1"),
        vec!["node-a"],
        "unpublish rolled back"
    );
    assert_eq!(stored(&w).await.len(), 1);
    assert_eq!(w.mgr.lock_entries(), 0);
}

/// A store whose writes never finish (an API server that stopped answering).
struct StuckStore(tokio::sync::Notify);
#[async_trait::async_trait]
impl AttachmentStore for StuckStore {
    async fn write_volume(
        &self,
        _: &VolumeId,
        _: &[crate::ports::store::AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.0.notify_one();
        std::future::pending().await
    }
    async fn load_all(&self) -> Result<Vec<crate::ports::store::AttachmentRecord>, StoreError> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_publish_cancelled_during_its_write_leaves_no_tentative_state() {
    let w = world(AttachmentConfig::default()).await;
    let store = Arc::new(StuckStore(tokio::sync::Notify::new()));
    let mgr = AttachmentManager::new(
        w.rds.clone(),
        store.clone(),
        w.cluster.clone(),
        Arc::new(FixedClock),
        AttachmentConfig::default(),
    );
    let args = publish_args("pvc-1", "node-a", false);
    tokio::select! {
        r = mgr.publish(&args) => panic!("the write cannot finish: {r:?}"),
        // The write is in flight; select! drops the publish (the client went away).
        () = store.0.notified() => {}
    }
    assert!(mgr.list().is_empty());
    assert_eq!(mgr.volumes_on(&nid("node-a")), 0);
    assert_eq!(mgr.lock_entries(), 0);
}

#[tokio::test]
async fn unpublish_from_the_wrong_node_keeps_the_holder_and_is_ok() {
    let w = world(AttachmentConfig::default()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    w.mgr
        .unpublish(&unpublish_args("pvc-1", Some("node-b")))
        .await
        .unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    assert_eq!(w.store.writes(), 1);
    for _ in 0..3 {
        w.mgr
            .unpublish(&unpublish_args("pvc-1", Some("node-a")))
            .await
            .unwrap();
    }
    assert!(w.mgr.list().is_empty());
    // Unknown volume: "the volume can be safely regarded as ControllerUnpublished".
    w.mgr
        .unpublish(&unpublish_args("pvc-unknown", Some("node-a")))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_publishing_one_volume_concurrently_exactly_one_wins() {
    for round in 0..50 {
        let w = world(AttachmentConfig::default()).await;
        let (m1, m2) = (w.mgr.clone(), w.mgr.clone());
        let a =
            tokio::spawn(async move { m1.publish(&publish_args("pvc-1", "node-a", false)).await });
        let b =
            tokio::spawn(async move { m2.publish(&publish_args("pvc-1", "node-b", false)).await });
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} / {b:?}");
        let loser = if a.is_ok() { b } else { a };
        assert!(matches!(loser, Err(Error::FailedPrecondition(_))));
        assert_eq!(w.mgr.get(&vid("pvc-1")).len(), 1);
        assert_eq!(stored(&w).await.len(), 1);
        assert_eq!(w.mgr.lock_entries(), 0);
    }
}

#[tokio::test]
async fn data_path_fence_follows_the_holder() {
    let w = world(AttachmentConfig {
        data_path_fence: true,
        ..Default::default()
    })
    .await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    let allowed = || allowed_host(&w, "pvc-1");
    assert_eq!(
        allowed().await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa")
    );
    // node-a vanishes; node-b takes over: the fence moves, so node-a cannot reach the disk.
    w.cluster.remove_node(&nid("node-a"));
    w.mgr
        .publish(&publish_args("pvc-1", "node-b", false))
        .await
        .unwrap();
    assert_eq!(
        allowed().await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:bbbb")
    );
    w.mgr
        .unpublish(&unpublish_args("pvc-1", Some("node-b")))
        .await
        .unwrap();
    assert_eq!(allowed().await, Some(parked("pvc-1")), "parked, not open");
    // A node without a host NQN cannot be fenced to: refused, nothing recorded.
    let err = w
        .mgr
        .publish(&publish_args("pvc-2", "node-c", false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(ref m)
            if m.contains("host NQN") && m.contains("node plugin must run on node-c first")),
        "{err:?}"
    );
    assert!(w.mgr.list().is_empty());
}

#[tokio::test]
async fn a_publish_that_dies_during_its_write_leaves_the_holders_fence_in_place() {
    let fenced = AttachmentConfig {
        data_path_fence: true,
        ..Default::default()
    };
    let w = world(fenced.clone()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    // A replica whose writes never finish (it crashes meanwhile) publishes to node-b.
    let store = Arc::new(StuckStore(tokio::sync::Notify::new()));
    let stale = AttachmentManager::new(
        w.rds.clone(),
        store.clone(),
        w.cluster.clone(),
        Arc::new(FixedClock),
        fenced,
    );
    let args = publish_args("pvc-1", "node-b", false);
    tokio::select! {
        r = stale.publish(&args) => panic!("the write cannot finish: {r:?}"),
        () = store.0.notified() => {}
    }
    assert_eq!(
        allowed_host(&w, "pvc-1").await
            .as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa"),
        "the export still admits only the holder"
    );
}

/// An RDS where setting one allowed-host value waits until released.
struct FenceGate {
    inner: Arc<dyn Rds>,
    gated: Option<String>,
    at_gate: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl FenceGate {
    fn new(inner: Arc<dyn Rds>, gated: Option<&str>) -> Self {
        Self {
            inner,
            gated: gated.map(str::to_string),
            at_gate: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        }
    }
}

#[async_trait::async_trait]
impl Rds for FenceGate {
    async fn ping(&self) -> Result<(), crate::ports::rds::RdsError> {
        self.inner.ping().await
    }
    async fn create_disk(
        &self,
        spec: &DiskSpec,
    ) -> Result<crate::ports::rds::Disk, crate::ports::rds::RdsError> {
        self.inner.create_disk(spec).await
    }
    async fn get_disk(
        &self,
        slot: &str,
    ) -> Result<Option<crate::ports::rds::Disk>, crate::ports::rds::RdsError> {
        self.inner.get_disk(slot).await
    }
    async fn list_disks(
        &self,
        prefix: &str,
    ) -> Result<Vec<crate::ports::rds::Disk>, crate::ports::rds::RdsError> {
        self.inner.list_disks(prefix).await
    }
    async fn resize_disk(
        &self,
        slot: &str,
        size: u64,
    ) -> Result<crate::ports::rds::Disk, crate::ports::rds::RdsError> {
        self.inner.resize_disk(slot, size).await
    }
    async fn delete_disk(&self, slot: &str) -> Result<(), crate::ports::rds::RdsError> {
        self.inner.delete_disk(slot).await
    }
    async fn capacity(
        &self,
    ) -> Result<crate::ports::rds::PoolCapacity, crate::ports::rds::RdsError> {
        self.inner.capacity().await
    }
    async fn set_allowed_host(
        &self,
        slot: &str,
        host: Option<&str>,
    ) -> Result<(), crate::ports::rds::RdsError> {
        if host == self.gated.as_deref() {
            self.at_gate.notify_one();
            self.release.notified().await;
        }
        self.inner.set_allowed_host(slot, host).await
    }
}

/// Two fenced replicas over one store: `here` talks to the RDS through a [`FenceGate`] on
/// `gated`, `other` directly.
struct TwoFenced {
    w: World,
    gate: Arc<FenceGate>,
    here: AttachmentManager,
    other: AttachmentManager,
}

async fn two_fenced_replicas(gated: Option<&str>) -> TwoFenced {
    let fenced = AttachmentConfig {
        data_path_fence: true,
        ..Default::default()
    };
    let w = world(fenced.clone()).await;
    let gate = Arc::new(FenceGate::new(w.rds.clone(), gated));
    let replica = |rds: Arc<dyn Rds>| {
        AttachmentManager::new(
            rds,
            w.store.clone(),
            w.cluster.clone(),
            Arc::new(FixedClock),
            fenced.clone(),
        )
    };
    let here = replica(gate.clone());
    let other = replica(w.rds.clone());
    TwoFenced {
        w,
        gate,
        here,
        other,
    }
}

#[tokio::test]
async fn an_unpublish_parking_the_export_after_another_replica_published_fences_it_again() {
    let TwoFenced {
        w,
        gate,
        here,
        other,
    } = two_fenced_replicas(Some(&parked("pvc-1"))).await;
    here.publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    // This replica detaches node-a; between its write and its parking of the export, the
    // other replica (started from the store then) attaches node-b and fences it in.
    let meanwhile = async {
        gate.at_gate.notified().await;
        other.rebuild().await.unwrap();
        other
            .publish(&publish_args("pvc-1", "node-b", false))
            .await
            .unwrap();
        gate.release.notify_one();
    };
    let detach = unpublish_args("pvc-1", Some("node-a"));
    let (unpublished, ()) = tokio::join!(here.unpublish(&detach), meanwhile);
    unpublished.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-1").await
            .as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:bbbb"),
        "the export admits the holder the store names"
    );
    assert_eq!(holders_of(&here, "pvc-1"), vec!["node-b"]);
}

#[tokio::test]
async fn a_publish_whose_volume_moved_on_before_its_fence_landed_is_aborted_and_refenced() {
    let TwoFenced {
        w,
        gate,
        here,
        other,
    } = two_fenced_replicas(Some("nqn.2014-08.org.nvmexpress:uuid:aaaa")).await;
    // This replica records node-a; before its fence lands, the other replica detaches
    // node-a and attaches node-b (fenced to node-b).
    let meanwhile = async {
        gate.at_gate.notified().await;
        other.rebuild().await.unwrap();
        other
            .unpublish(&unpublish_args("pvc-1", Some("node-a")))
            .await
            .unwrap();
        other
            .publish(&publish_args("pvc-1", "node-b", false))
            .await
            .unwrap();
        gate.release.notify_one();
    };
    let attach = publish_args("pvc-1", "node-a", false);
    let (published, ()) = tokio::join!(here.publish(&attach), meanwhile);
    assert!(
        matches!(published, Err(Error::Aborted(_))),
        "not acknowledged: {published:?}"
    );
    assert_eq!(
        allowed_host(&w, "pvc-1").await
            .as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:bbbb"),
        "the export admits the holder the store names"
    );
    assert_eq!(holders_of(&here, "pvc-1"), vec!["node-b"]);
}

#[tokio::test]
async fn a_failed_persist_leaves_the_fence_untouched() {
    let w = world(AttachmentConfig {
        data_path_fence: true,
        ..Default::default()
    })
    .await;
    w.store
        .fail_next_writes([StoreError::Unavailable("api down".into())]);
    assert!(
        w.mgr
            .publish(&publish_args("pvc-1", "node-a", false))
            .await
            .is_err()
    );
    assert_eq!(
        allowed_host(&w, "pvc-1").await,
        None
    );
}

#[tokio::test]
async fn rebuild_restores_records_and_drops_those_whose_detach_completed() {
    let w = world(AttachmentConfig::default()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    w.mgr
        .publish(&publish_args("pvc-2", "node-b", false))
        .await
        .unwrap();
    // pvc-2's VolumeAttachment is gone: its unpublish was acknowledged.
    w.cluster
        .set_volume_attachments(Some(vec![VolumeAttachmentInfo {
            volume_id: vid("pvc-1"),
            node_id: nid("node-a"),
            attached: true,
            deleting: false,
        }]));
    let restarted = AttachmentManager::new(
        w.rds.clone(),
        w.store.clone(),
        w.cluster.clone(),
        Arc::new(FixedClock),
        AttachmentConfig::default(),
    );
    let report = restarted.rebuild().await.unwrap();
    assert_eq!((report.kept, report.dropped), (1, 1));
    assert_eq!(restarted.list().len(), 1);
    assert_eq!(restarted.get(&vid("pvc-1"))[0].node_id, nid("node-a"));
    assert_eq!(
        stored(&w).await,
        vec![("pvc-1".into(), "node-a".into())],
        "stale record cleared"
    );
    // Fencing works on rebuilt state.
    assert!(
        restarted
            .publish(&publish_args("pvc-1", "node-b", false))
            .await
            .is_err()
    );
}

/// A store that lets another writer act in the middle of this replica's calls (a former
/// leader racing the new one during a failover): `write_first` lands just before this
/// replica's first conditional write; `publish_after_read` is another replica's publish,
/// run to completion after this replica's first read of a volume was taken, so the answer
/// is stale by the time it arrives.
struct Interleaved {
    inner: Arc<MemStore>,
    write_first: std::sync::Mutex<Option<(VolumeId, Vec<crate::ports::store::AttachmentRecord>)>>,
    publish_after_read: tokio::sync::Mutex<Option<(Arc<AttachmentManager>, PublishArgs)>>,
}

impl Interleaved {
    fn over(inner: Arc<MemStore>) -> Self {
        Self {
            inner,
            write_first: std::sync::Mutex::new(None),
            publish_after_read: tokio::sync::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl AttachmentStore for Interleaved {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[crate::ports::store::AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.inner.write_volume(volume, holders).await
    }

    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[crate::ports::store::AttachmentRecord],
        holders: &[crate::ports::store::AttachmentRecord],
    ) -> Result<(), StoreError> {
        let other = self.write_first.lock().unwrap().take();
        if let Some((v, records)) = other {
            self.inner.write_volume(&v, &records).await?;
        }
        self.inner.write_volume_if(volume, previous, holders).await
    }

    async fn read_volume(
        &self,
        volume: &VolumeId,
    ) -> Result<Vec<crate::ports::store::AttachmentRecord>, StoreError> {
        let read = self.inner.read_volume(volume).await;
        if let Some((other, args)) = self.publish_after_read.lock().await.take() {
            other.publish(&args).await.unwrap();
        }
        read
    }

    async fn load_all(&self) -> Result<Vec<crate::ports::store::AttachmentRecord>, StoreError> {
        self.inner.load_all().await
    }
}

#[tokio::test]
async fn a_rebuild_never_clears_what_another_writer_stored_after_it_loaded() {
    let w = world(AttachmentConfig::default()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    // node-a's VolumeAttachment is gone (detached by hand), and while a restarting replica
    // rebuilds, the new leader publishes pvc-1 to node-b (its VolumeAttachment is new).
    w.cluster
        .set_volume_attachments(Some(vec![VolumeAttachmentInfo {
            volume_id: vid("pvc-1"),
            node_id: nid("node-b"),
            attached: true,
            deleting: false,
        }]));
    let node_b = crate::ports::store::AttachmentRecord {
        volume_id: vid("pvc-1"),
        node_id: nid("node-b"),
        attached_at: UNIX_EPOCH,
        access_mode: AccessMode::SingleNode,
        readonly: false,
        migration: None,
        generation: 0,
    };
    let store = Arc::new(Interleaved::over(w.store.clone()));
    *store.write_first.lock().unwrap() = Some((vid("pvc-1"), vec![node_b]));
    let restarted = AttachmentManager::new(
        w.rds.clone(),
        store,
        w.cluster.clone(),
        Arc::new(FixedClock),
        AttachmentConfig::default(),
    );
    let report = restarted.rebuild().await.unwrap();
    assert_eq!((report.dropped, report.clear_failures), (1, 1));
    assert_eq!(
        stored(&w).await,
        vec![("pvc-1".into(), "node-b".into())],
        "the other writer's acknowledged publish survives the rebuild"
    );
    assert_eq!(
        restarted.get(&vid("pvc-1"))[0].node_id,
        nid("node-b"),
        "memory follows the store"
    );
}

#[tokio::test]
async fn a_start_up_settle_on_a_stale_read_never_undoes_another_writers_fence() {
    let fenced = AttachmentConfig {
        data_path_fence: true,
        ..Default::default()
    };
    let w = world(fenced.clone()).await;
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    // node-a's VolumeAttachment is gone (detached by hand); the restarting replica drops
    // the record but cannot clear it (the API is down for that write).
    w.cluster
        .set_volume_attachments(Some(vec![VolumeAttachmentInfo {
            volume_id: vid("pvc-1"),
            node_id: nid("node-b"),
            attached: true,
            deleting: false,
        }]));
    w.store
        .fail_next_writes([StoreError::Unavailable("api down".into())]);
    let store = Arc::new(Interleaved::over(w.store.clone()));
    let restarted = AttachmentManager::new(
        w.rds.clone(),
        store.clone(),
        w.cluster.clone(),
        Arc::new(FixedClock),
        fenced,
    );
    assert_eq!(restarted.rebuild().await.unwrap().clear_failures, 1);
    // Its settle reads the store (still node-a) while the old leader publishes to node-b.
    *store.publish_after_read.lock().await = Some((w.mgr.clone(), publish_args("pvc-1", "node-b", false)));
    assert_eq!(
        restarted.settle_fences().await.unwrap(),
        2,
        "pvc-2 and pvc-3 (open exports) are parked; pvc-1's listed export agreed with the \
         sweep's read of the store: not moved"
    );
    assert_eq!(
        allowed_host(&w, "pvc-1").await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:bbbb"),
        "the acknowledged publish's fence stands"
    );
}

#[tokio::test]
async fn an_acknowledged_unpublish_never_comes_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(AttachmentConfig::default()).await;
    let open = || -> Arc<AttachmentManager> {
        Arc::new(AttachmentManager::new(
            w.rds.clone(),
            Arc::new(FileStore::open(dir.path()).unwrap()),
            w.cluster.clone(),
            Arc::new(FixedClock),
            AttachmentConfig::default(),
        ))
    };
    let m = open();
    m.rebuild().await.unwrap();
    m.publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    m.publish(&publish_args("pvc-2", "node-a", false))
        .await
        .unwrap();
    m.unpublish(&unpublish_args("pvc-1", Some("node-a")))
        .await
        .unwrap();
    drop(m);
    let m = open();
    m.rebuild().await.unwrap();
    let vols: Vec<String> = m
        .list()
        .into_iter()
        .map(|r| r.volume_id.to_string())
        .collect();
    assert_eq!(vols, vec!["pvc-2"]);
}

/// A second controller replica over the same store, RDS and cluster (a failover: both
/// run for a while), started from the store as an elected replica does.
async fn other_replica(w: &World) -> AttachmentManager {
    let other = AttachmentManager::new(
        w.rds.clone(),
        w.store.clone(),
        w.cluster.clone(),
        Arc::new(FixedClock),
        AttachmentConfig::default(),
    );
    other.rebuild().await.unwrap();
    other
}

/// This replica attaches pvc-1 to node-a, then the other replica (started after that)
/// detaches it: this replica's memory still says attached. Returns the other replica.
async fn attached_here_detached_there(w: &World) -> AttachmentManager {
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    let other = other_replica(w).await;
    other
        .unpublish(&unpublish_args("pvc-1", Some("node-a")))
        .await
        .unwrap();
    assert_eq!(holders(w, "pvc-1"), vec!["node-a"]);
    other
}

#[tokio::test]
async fn a_repeated_publish_is_acknowledged_only_if_the_store_still_holds_it() {
    let w = world(AttachmentConfig::default()).await;
    attached_here_detached_there(&w).await;

    let err = w
        .mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Aborted(ref m) if m.contains("another writer")),
        "{err:?}"
    );
    assert!(holders(&w, "pvc-1").is_empty(), "memory resynchronised");
    // The CO's retry records it again, durably.
    w.mgr
        .publish(&publish_args("pvc-1", "node-a", false))
        .await
        .unwrap();
    assert_eq!(stored(&w).await, vec![("pvc-1".into(), "node-a".into())]);
}

#[tokio::test]
async fn resync_picks_up_what_another_replica_wrote() {
    let w = world(AttachmentConfig::default()).await;
    let other = attached_here_detached_there(&w).await;
    other
        .publish(&publish_args("pvc-2", "node-b", false))
        .await
        .unwrap();

    assert_eq!(w.mgr.resync().await.unwrap(), 2);
    assert!(holders(&w, "pvc-1").is_empty());
    assert_eq!(holders(&w, "pvc-2"), vec!["node-b"]);
    assert_eq!(w.mgr.volumes_on(&nid("node-a")), 0);
    assert_eq!(w.mgr.volumes_on(&nid("node-b")), 1);
    assert_eq!(w.mgr.resync().await.unwrap(), 0, "nothing left to pick up");
    assert_eq!(w.mgr.lock_entries(), 0);
}

#[tokio::test]
async fn stored_holders_answer_from_the_store_and_refresh_memory() {
    let w = world(AttachmentConfig::default()).await;
    let other = other_replica(&w).await;
    other
        .publish(&publish_args("pvc-3", "node-b", false))
        .await
        .unwrap();
    assert!(holders(&w, "pvc-3").is_empty(), "this replica has not seen it");
    let held: Vec<String> = w
        .mgr
        .stored_holders(&vid("pvc-3"))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.node_id.to_string())
        .collect();
    assert_eq!(held, vec!["node-b"]);
    assert_eq!(holders(&w, "pvc-3"), vec!["node-b"]);
}

pub(super) fn fenced() -> AttachmentConfig {
    AttachmentConfig {
        data_path_fence: true,
        ..Default::default()
    }
}

/// A controller core over `w`'s RDS and manager.
fn controller(w: &World) -> crate::controller::Controller {
    crate::controller::Controller::new(
        crate::controller::ControllerConfig::default(),
        w.rds.clone(),
        w.mgr.clone(),
    )
}

fn create_args(v: &str, source: Option<crate::controller::volumes::Source>) -> crate::controller::volumes::CreateArgs {
    crate::controller::volumes::CreateArgs {
        name: v.to_string(),
        volume_id: vid(v),
        recorded_name: None,
        range: None,
        params: Default::default(),
        fs_type: Some("ext4".into()),
        source,
    }
}

#[tokio::test]
async fn volumes_are_born_parked_restores_and_clones_too() {
    use crate::controller::volumes::Source;
    let w = world(fenced()).await;
    let c = controller(&w);
    c.create_volume(&create_args("pvc-new", None)).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-new").await, Some(parked("pvc-new")));
    c.create_volume(&create_args("pvc-clone", Some(Source::Volume(vid("pvc-new")))))
        .await
        .unwrap();
    assert_eq!(allowed_host(&w, "pvc-clone").await, Some(parked("pvc-clone")));
    w.rds
        .create_snapshot("pvc-new", "snap-1", "rds-csi-snapshot-of:pvc-new")
        .await
        .unwrap();
    let snap = crate::types::SnapshotId::new("snap-1").unwrap();
    c.create_volume(&create_args("pvc-restore", Some(Source::Snapshot(snap))))
        .await
        .unwrap();
    assert_eq!(allowed_host(&w, "pvc-restore").await, Some(parked("pvc-restore")));
    // Publish moves it to the holder, unpublish parks it again.
    w.mgr.publish(&publish_args("pvc-new", "node-a", false)).await.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-new").await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa")
    );
    w.mgr.unpublish(&unpublish_args("pvc-new", Some("node-a"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-new").await, Some(parked("pvc-new")));
    // With the fence off a volume is born open.
    let w = world(AttachmentConfig::default()).await;
    controller(&w).create_volume(&create_args("pvc-open", None)).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-open").await, None);
}

#[tokio::test]
async fn a_single_node_volume_is_never_open_to_any_host() {
    let w = world(fenced()).await;
    let c = controller(&w);
    c.create_volume(&create_args("pvc-x", None)).await.unwrap();
    let never_open = |step: &'static str| {
        let w = &w;
        async move {
            let a = allowed_host(w, "pvc-x").await;
            assert!(a.is_some(), "{step}: the export is open to any host");
            a
        }
    };
    never_open("created").await;
    let steps: Vec<(&str, bool, Option<&str>)> = vec![
        ("publish a", true, Some("node-a")),
        ("repeat publish a", true, Some("node-a")),
        ("unpublish from b (not the holder)", false, Some("node-b")),
        ("unpublish a", false, Some("node-a")),
        ("repeat unpublish a", false, Some("node-a")),
        ("publish b", true, Some("node-b")),
        ("unpublish every node", false, None),
        ("unpublish every node again", false, None),
    ];
    for (step, publish, node) in steps {
        if publish {
            w.mgr
                .publish(&publish_args("pvc-x", node.unwrap(), false))
                .await
                .unwrap();
        } else {
            w.mgr
                .unpublish(&unpublish_args("pvc-x", node))
                .await
                .unwrap();
        }
        never_open(step).await;
    }
    // A refused second publish and a failed write leave it fenced too.
    w.mgr.publish(&publish_args("pvc-x", "node-a", false)).await.unwrap();
    assert!(w.mgr.publish(&publish_args("pvc-x", "node-b", false)).await.is_err());
    never_open("refused publish").await;
    w.store
        .fail_next_writes([StoreError::Unavailable("api down".into())]);
    assert!(w.mgr.unpublish(&unpublish_args("pvc-x", Some("node-a"))).await.is_err());
    assert_eq!(
        never_open("failed unpublish").await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa"),
        "the holder keeps its fence until its detach is durable"
    );
    w.mgr.unpublish(&unpublish_args("pvc-x", Some("node-a"))).await.unwrap();
    assert_eq!(never_open("unpublished").await, Some(parked("pvc-x")));
}

#[tokio::test]
async fn a_repeated_unpublish_parks_an_export_a_failed_one_left_fenced() {
    let w = world(fenced()).await;
    w.mgr.publish(&publish_args("pvc-1", "node-a", false)).await.unwrap();
    // The detach is durable but the park fails (the RDS is busy): the call fails, and
    // the CO's repeat parks the export.
    w.store.write_volume(&vid("pvc-1"), &[]).await.unwrap();
    w.mgr.resync().await.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-1").await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa")
    );
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await, Some(parked("pvc-1")));
}

#[tokio::test]
async fn multi_node_readers_open_the_export_and_the_last_unpublish_parks_it() {
    let w = world(fenced()).await;
    let readers = |n: &str| PublishArgs {
        access_mode: AccessMode::MultiNodeReadOnly,
        ..publish_args("pvc-1", n, true)
    };
    w.rds
        .set_allowed_host("pvc-1", Some(&parked("pvc-1")))
        .await
        .unwrap();
    // node-c has no host NQN: readers share an open export and do not need it.
    w.mgr.publish(&readers("node-a")).await.unwrap();
    w.mgr.publish(&readers("node-c")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await, None, "readers: open");
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await, None, "node-c still reads it");
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-c"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await, Some(parked("pvc-1")));
}

#[tokio::test]
async fn start_up_parks_the_exports_of_volumes_made_before_the_fence() {
    // Three volumes made open (before the fence existed): pvc-1 held by node-a in the
    // store, pvc-2 by node-c (no host NQN published yet), pvc-3 by nobody; and a stale
    // fence: pvc-4 still admits node-b, whose detach was recorded before a crash.
    let w = world(fenced()).await;
    w.rds
        .create_disk(&DiskSpec {
            slot: "pvc-4".into(),
            size_bytes: 1 << 20,
            export: Some(NvmeExport {
                port: 4420,
                nqn: "nqn.2000-02.com.mikrotik:pvc-4".into(),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: Some("nqn.2014-08.org.nvmexpress:uuid:bbbb".into()),
        })
        .await
        .unwrap();
    w.rds
        .create_snapshot("pvc-3", "snap-3", "rds-csi-snapshot-of:pvc-3")
        .await
        .unwrap();
    let record = |v: &str, n: &str| crate::ports::store::AttachmentRecord {
        volume_id: vid(v),
        node_id: nid(n),
        attached_at: UNIX_EPOCH,
        access_mode: AccessMode::SingleNode,
        readonly: false,
        migration: None,
        generation: 0,
    };
    w.store.write_volume(&vid("pvc-1"), &[record("pvc-1", "node-a")]).await.unwrap();
    w.store.write_volume(&vid("pvc-2"), &[record("pvc-2", "node-c")]).await.unwrap();
    w.mgr.rebuild().await.unwrap();
    assert_eq!(w.mgr.settle_fences().await.unwrap(), 3);
    assert_eq!(
        allowed_host(&w, "pvc-1").await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:aaaa")
    );
    assert_eq!(allowed_host(&w, "pvc-2").await, None, "left until node-c publishes its NQN");
    assert_eq!(allowed_host(&w, "pvc-3").await, Some(parked("pvc-3")));
    assert_eq!(allowed_host(&w, "pvc-4").await, Some(parked("pvc-4")));
    assert_eq!(w.rds.get_disk("snap-3").await.unwrap().unwrap().allowed_host_nqn, None);
    assert_eq!(w.mgr.settle_fences().await.unwrap(), 0, "settled: nothing moves again");
    assert_eq!(w.mgr.lock_entries(), 0);

    // Switched off, the fence opens every export at start-up.
    let off = AttachmentManager::new(
        w.rds.clone(),
        w.store.clone(),
        w.cluster.clone(),
        Arc::new(FixedClock),
        AttachmentConfig::default(),
    );
    off.rebuild().await.unwrap();
    assert_eq!(off.settle_fences().await.unwrap(), 3);
    for v in ["pvc-1", "pvc-2", "pvc-3", "pvc-4"] {
        assert_eq!(allowed_host(&w, v).await, None, "{v}");
    }
}

#[tokio::test]
async fn a_record_whose_volume_attachment_is_gone_is_cleared_not_blocking() {
    // node-a's detach was done by hand (the VolumeAttachment's finalizer removed): the
    // record stays in the store, the VolumeAttachment is gone.
    let w = world(fenced()).await;
    w.mgr.publish(&publish_args("pvc-1", "node-a", false)).await.unwrap();
    w.mgr.publish(&publish_args("pvc-2", "node-a", false)).await.unwrap();
    let va = |v: &str, n: &str| VolumeAttachmentInfo {
        volume_id: vid(v),
        node_id: nid(n),
        attached: true,
        deleting: false,
    };
    w.cluster.set_volume_attachments(Some(vec![va("pvc-1", "node-b")]));
    w.mgr.publish(&publish_args("pvc-1", "node-b", false)).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-b"]);
    assert_eq!(
        allowed_host(&w, "pvc-1").await.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:bbbb"),
        "node-a is fenced out"
    );
    assert!(
        w.cluster.events().iter().any(|e| e.reason == "StaleAttachmentCleared"
            && e.message.contains("VolumeAttachment is gone")),
        "{:?}",
        w.cluster.events()
    );
    // DeleteVolume's view: pvc-2's stale record is cleared, pvc-1's live one is not.
    assert!(w.mgr.live_holders(&vid("pvc-2")).await.unwrap().is_empty());
    assert_eq!(stored(&w).await, vec![("pvc-1".into(), "node-b".into())]);
    assert_eq!(w.mgr.live_holders(&vid("pvc-1")).await.unwrap().len(), 1);
    // A live VolumeAttachment still fences: node-c is refused while node-b holds it.
    w.cluster
        .set_volume_attachments(Some(vec![va("pvc-1", "node-b"), va("pvc-1", "node-c")]));
    assert!(matches!(
        w.mgr.publish(&publish_args("pvc-1", "node-a", false)).await,
        Err(Error::FailedPrecondition(_))
    ));
}
