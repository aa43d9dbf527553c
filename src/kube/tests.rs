//! The Kubernetes adapters, for real, against the simulated API server.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::attachment::{AttachmentConfig, AttachmentManager, PublishArgs, UnpublishArgs};
use crate::routeros::InMemoryRds;
use crate::error::Error;
use crate::kube::fake_api::{FakeApi, Kind};
use crate::kube::{KubeCluster, PvStore, adapters};
use crate::ports::rds::{DiskSpec, NvmeExport};
use crate::ports::time::SeededEntropy;
use crate::ports::{AttachmentStore, Clock, Cluster, Rds};
use crate::retry::Backoff;
use crate::types::{AccessMode, NodeId, VolumeId};

const DRIVER: &str = "rds.csi.srvlab.io";
const FAST: Backoff = Backoff {
    base: Duration::from_micros(1),
    max: Duration::from_micros(50),
    max_attempts: 8,
};

struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_760_000_000_123_456)
    }
}

pub(crate) fn pv_json(name: &str, handle: &str, driver: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name, "annotations": annotations },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteOnce"],
            "csi": { "driver": driver, "volumeHandle": handle },
        },
    })
}

fn node_json(name: &str, nqn: Option<&str>) -> Value {
    let mut ann = json!({});
    if let Some(n) = nqn {
        ann["rds.csi.srvlab.io/host-nqn"] = json!(n);
    }
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name, "annotations": ann } })
}

/// The name Kubernetes gives the VolumeAttachment of PV `pv` (whose volume handle is the
/// same, as the provisioner names them) on `node`.
fn va_name(pv: &str, node: &str) -> String {
    crate::kube::cluster::volume_attachment_name(
        &VolumeId::new(pv).unwrap(),
        DRIVER,
        &NodeId::new(node).unwrap(),
    )
}

fn va_json(pv: &str, node: &str, attached: bool) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
        "metadata": { "name": va_name(pv, node) },
        "spec": { "attacher": DRIVER, "nodeName": node, "source": { "persistentVolumeName": pv } },
        "status": { "attached": attached },
    })
}

struct World {
    _dir: tempfile::TempDir,
    api: FakeApi,
    rds: Arc<InMemoryRds>,
}

impl World {
    async fn new(volumes: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let rds = crate::routeros::in_memory_rds(1 << 40);
        let api = FakeApi::new();
        for v in volumes {
            rds.create_disk(&DiskSpec {
                slot: v.to_string(),
                size_bytes: 1 << 20,
                export: Some(NvmeExport { port: 4420, nqn: format!("nqn.2000-02.com.mikrotik:{v}") }),
                copy_from: None,
                comment: None,
                allowed_host_nqn: None,
            })
            .await
            .unwrap();
            api.put_object(Kind::PersistentVolume, "", pv_json(v, v, DRIVER, json!({})));
        }
        for n in ["node-a", "node-b"] {
            api.put_object(Kind::Node, "", node_json(n, Some(&format!("nqn.2014-08.org.nvmexpress:uuid:{n}"))));
        }
        World { _dir: dir, api, rds }
    }

    fn ports(&self) -> (Arc<PvStore>, Arc<KubeCluster>) {
        adapters(self.api.client(), DRIVER, Arc::new(FixedClock), Arc::new(SeededEntropy::from_seed(1)), FAST)
    }

    /// A controller (re)started: new adapters, new manager, rebuilt.
    async fn controller(&self, cfg: AttachmentConfig) -> AttachmentManager {
        let (store, cluster) = self.ports();
        let m = AttachmentManager::new(self.rds.clone(), store, cluster, Arc::new(FixedClock), cfg);
        m.rebuild().await.unwrap();
        m
    }

    fn annotations(&self, pv: &str) -> Value {
        self.api.object(Kind::PersistentVolume, "", pv).unwrap()["metadata"]["annotations"].clone()
    }
}

fn publish(v: &str, n: &str) -> PublishArgs {
    PublishArgs {
        volume_id: VolumeId::new(v).unwrap(),
        node_id: NodeId::new(n).unwrap(),
        access_mode: AccessMode::SingleNode,
        readonly: false,
        block: false,
        fs_type: Some("ext4".into()),
        nvme_address: None,
        migration_timeout: crate::attachment::migration::DEFAULT_TIMEOUT,
    }
}

fn unpublish(v: &str, n: &str) -> UnpublishArgs {
    UnpublishArgs { volume_id: VolumeId::new(v).unwrap(), node_id: Some(NodeId::new(n).unwrap()) }
}

#[tokio::test]
async fn publish_and_unpublish_cost_one_patch_each_and_write_the_annotations() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig::default()).await;
    w.api.reset_requests();
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    let reqs = w.api.requests();
    assert_eq!(reqs.get("PATCH persistentvolumes"), Some(&1));
    // The Event VolumeAttached: the PV's claim is read once (then cached), one POST.
    assert_eq!(reqs.get("GET persistentvolumes"), Some(&1), "{reqs:?}");
    assert_eq!(reqs.get("POST events"), Some(&1), "{reqs:?}");
    assert_eq!(reqs.get("GET nodes"), Some(&1), "the node's first publish: then cached");
    assert_eq!(reqs.values().sum::<u64>(), 4, "{reqs:?}");
    let ann = w.annotations("pvc-1");
    assert_eq!(ann["rds.csi.srvlab.io/attached-node"], "node-a");
    assert_eq!(ann["rds.csi.srvlab.io/attached-at"], "2025-10-09T08:53:20.123456Z");
    assert_eq!(ann["rds.csi.srvlab.io/attached-mode"], "single-node");
    w.api.reset_requests();
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    let reqs = w.api.requests();
    assert_eq!(reqs.get("PATCH persistentvolumes"), Some(&1));
    assert_eq!(reqs.get("POST events"), Some(&1), "VolumeDetached; the claim is cached");
    assert_eq!(reqs.get("GET nodes"), Some(&1), "is the volume still in use on the node?");
    assert_eq!(reqs.values().sum::<u64>(), 3, "{reqs:?}");
    assert_eq!(w.annotations("pvc-1"), json!({}), "annotations removed");
}

/// `node`'s Node as its kubelet reports it: `Ready` (or not) with `volumes` in use.
fn reporting_node(node: &str, ready: &str, volumes: &[&str]) -> Value {
    let mut n = node_json(node, None);
    let in_use: Vec<String> = volumes
        .iter()
        .map(|v| crate::kube::cluster::unique_volume_name(DRIVER, v))
        .collect();
    n["status"] = json!({
        "conditions": [{ "type": "Ready", "status": ready }],
        "volumesInUse": in_use,
    });
    n
}

#[tokio::test]
async fn a_detach_waits_while_a_ready_node_still_uses_the_volume() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig::default()).await;
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    // A force-detach decided while node-a stopped reporting reaches us after it came back
    // with the volume still mounted: refused, nothing changed.
    w.api.put_object(Kind::Node, "", reporting_node("node-a", "True", &["pvc-1", "pvc-2"]));
    let err = m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("volumesInUse"), "{}", status.message());
    assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], "node-a");
    // Not Ready (it stopped reporting, its list is stale): the force-detach proceeds.
    w.api.put_object(Kind::Node, "", reporting_node("node-a", "Unknown", &["pvc-1"]));
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(w.annotations("pvc-1"), json!({}));
    // Ready, the kubelet done with it: detached at once.
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    w.api.put_object(Kind::Node, "", reporting_node("node-a", "True", &["pvc-2"]));
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(w.annotations("pvc-1"), json!({}));
}

#[tokio::test]
async fn a_conflict_storm_is_retried_until_the_write_lands() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig::default()).await;
    // The events' claim lookup (one GET, cached) is made before the counted rounds.
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    for (round, n) in [1u64, 3, 7].into_iter().enumerate() {
        w.api.reset_requests();
        w.api.conflict_next_writes(n);
        let node = if round % 2 == 0 { "node-a" } else { "node-b" };
        if round > 0 {
            let prev = if node == "node-a" { "node-b" } else { "node-a" };
            w.api.conflict_next_writes(0);
            m.unpublish(&unpublish("pvc-1", prev)).await.unwrap_or_else(|e| panic!("{e}"));
            w.api.reset_requests();
            w.api.conflict_next_writes(n);
        }
        m.publish(&publish("pvc-1", node)).await.unwrap();
        let reqs = w.api.requests();
        assert_eq!(reqs.get("PATCH persistentvolumes"), Some(&(n + 1)), "{n} conflicts");
        assert_eq!(reqs.get("GET persistentvolumes"), Some(&n), "one re-read per conflict");
        assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], node);
    }
}

#[tokio::test]
async fn endless_conflicts_give_aborted_and_roll_back() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig::default()).await;
    w.api.conflict_next_writes(FAST.max_attempts as u64);
    let err = m.publish(&publish("pvc-1", "node-a")).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    assert!(m.list().is_empty());
    assert_eq!(w.annotations("pvc-1"), json!({}));
    // The next attempt (the CO retries) succeeds.
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
}

#[tokio::test]
async fn server_errors_are_retried_and_a_persistent_outage_is_unavailable() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig::default()).await;
    w.api.fail_next_requests([503, 500]);
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(m.get(&VolumeId::new("pvc-1").unwrap()).len(), 1);
    w.api.fail_next_requests(vec![503; 64]);
    let err = m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    assert_eq!(m.get(&VolumeId::new("pvc-1").unwrap()).len(), 1, "rolled back");
}

#[tokio::test]
async fn a_missing_pv_refuses_publish_and_lets_unpublish_succeed() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig::default()).await;
    w.api.remove_object(Kind::PersistentVolume, "", "pvc-1");
    // Not indexed as missing yet: the PATCH 404s.
    let err = m.publish(&publish("pvc-1", "node-a")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(ref msg) if msg.contains("PersistentVolume")), "{err:?}");
    assert!(m.list().is_empty());
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
}

#[tokio::test]
async fn rebuild_reads_every_page_and_ignores_other_drivers() {
    let w = World::new(&[]).await;
    for i in 0..1203 {
        let name = format!("pvc-{i:05}");
        let ann = if i % 3 == 0 {
            json!({
                "rds.csi.srvlab.io/attached-node": "node-a",
                "rds.csi.srvlab.io/attached-at": "2025-10-09T08:53:20.123456Z",
            })
        } else {
            json!({})
        };
        w.api.put_object(Kind::PersistentVolume, "", pv_json(&name, &name, DRIVER, ann));
        if i % 3 == 0 {
            w.api.put_object(Kind::VolumeAttachment, "", va_json(&name, "node-a", true));
        }
    }
    w.api.put_object(
        Kind::PersistentVolume,
        "",
        pv_json("other", "other", "ebs.csi.aws.com", json!({"rds.csi.srvlab.io/attached-node": "node-b"})),
    );
    w.api.reset_requests();
    let m = w.controller(AttachmentConfig::default()).await;
    assert_eq!(m.list().len(), 401);
    assert!(m.list().iter().all(|r| r.node_id.as_str() == "node-a" && r.access_mode == AccessMode::SingleNode));
    let reqs = w.api.requests();
    assert_eq!(reqs.get("LIST persistentvolumes"), Some(&3), "limit 500: three pages");
    assert_eq!(reqs.get("PATCH persistentvolumes"), None, "nothing to clear");
}

#[tokio::test]
async fn an_acknowledged_unpublish_is_not_resurrected_by_a_restart() {
    let w = World::new(&["pvc-1", "pvc-2"]).await;
    for v in ["pvc-1", "pvc-2"] {
        w.api.put_object(Kind::VolumeAttachment, "", va_json(v, "node-a", true));
    }
    let m = w.controller(AttachmentConfig::default()).await;
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    m.publish(&publish("pvc-2", "node-a")).await.unwrap();
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    // The attacher drops pvc-1's VolumeAttachment after the acknowledged unpublish.
    w.api.remove_object(Kind::VolumeAttachment, "", &va_name("pvc-1", "node-a"));
    // A stale annotation (e.g. an old controller's late write) must not bring it back either.
    let mut pv = w.api.object(Kind::PersistentVolume, "", "pvc-1").unwrap();
    pv["metadata"]["annotations"] = json!({"rds.csi.srvlab.io/attached-node": "node-a"});
    w.api.put_object(Kind::PersistentVolume, "", pv);
    drop(m);
    let m = w.controller(AttachmentConfig::default()).await;
    let vols: Vec<String> = m.list().into_iter().map(|r| r.volume_id.to_string()).collect();
    assert_eq!(vols, vec!["pvc-2"]);
    assert_eq!(w.annotations("pvc-1"), json!({}), "stale annotation cleared");
    // And node-b can now have pvc-1.
    m.publish(&publish("pvc-1", "node-b")).await.unwrap();
}

#[tokio::test]
async fn fencing_uses_node_objects_and_records_an_event() {
    let w = World::new(&["pvc-1"]).await;
    let m = w.controller(AttachmentConfig { data_path_fence: true, ..Default::default() }).await;
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(
        w.rds.get_disk("pvc-1").await.unwrap().unwrap().allowed_host_nqn.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:node-a")
    );
    // node-a's VolumeAttachment exists (named as Kubernetes names it): node-b is fenced.
    w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-1", "node-a", true));
    let err = m.publish(&publish("pvc-1", "node-b")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)));
    let events = w.api.objects(Kind::Event);
    let conflict: Vec<&Value> = events.iter().filter(|e| e["reason"] == "AttachmentConflict").collect();
    assert_eq!(conflict.len(), 1, "{events:?}");
    assert_eq!(conflict[0]["type"], "Warning");
    // The PV has no claim: the event is on the PV.
    assert_eq!(conflict[0]["involvedObject"]["kind"], "PersistentVolume");
    assert_eq!(conflict[0]["involvedObject"]["name"], "pvc-1");
    // node-a's Node object is deleted: the stale record is cleared, node-b gets the volume.
    w.api.remove_object(Kind::Node, "", "node-a");
    m.publish(&publish("pvc-1", "node-b")).await.unwrap();
    assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], "node-b");
    assert_eq!(
        w.rds.get_disk("pvc-1").await.unwrap().unwrap().allowed_host_nqn.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:node-b")
    );
}

/// Binds PV `pv` to claim `namespace/name`.
fn bind(w: &World, pv: &str, namespace: &str, name: &str) {
    let mut obj = w.api.object(Kind::PersistentVolume, "", pv).unwrap();
    obj["spec"]["claimRef"] = json!({ "kind": "PersistentVolumeClaim", "namespace": namespace, "name": name });
    w.api.put_object(Kind::PersistentVolume, "", obj);
}

/// Events in `namespace` as (involved kind, involved name, reason, type, count).
fn events_in(w: &World, namespace: &str) -> Vec<(String, String, String, String, u64)> {
    w.api
        .objects(Kind::Event)
        .into_iter()
        .filter(|e| e["metadata"]["namespace"] == namespace)
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&e["involvedObject"]["kind"]),
                s(&e["involvedObject"]["name"]),
                s(&e["reason"]),
                s(&e["type"]),
                e["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test]
async fn publish_and_unpublish_are_reported_on_the_claim_and_repeats_aggregate() {
    let w = World::new(&["pvc-1"]).await;
    bind(&w, "pvc-1", "apps", "data");
    let m = w.controller(AttachmentConfig::default()).await;
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    m.unpublish(&UnpublishArgs { volume_id: VolumeId::new("pvc-1").unwrap(), node_id: Some(NodeId::new("node-a").unwrap()) })
        .await
        .unwrap();
    let mut got = events_in(&w, "apps");
    got.sort();
    assert_eq!(
        got,
        vec![
            ("PersistentVolumeClaim".into(), "data".into(), "VolumeAttached".into(), "Normal".into(), 3),
            ("PersistentVolumeClaim".into(), "data".into(), "VolumeDetached".into(), "Normal".into(), 1),
        ],
        "three publishes are one Event with count 3, on the claim in its namespace"
    );
    assert!(events_in(&w, "default").is_empty(), "nothing on the PV");
    let e = w.api.objects(Kind::Event).into_iter().find(|e| e["reason"] == "VolumeAttached").unwrap();
    assert_eq!(e["involvedObject"]["namespace"], "apps");
    assert_eq!(e["message"], "volume pvc-1 attached to node node-a");
    assert!(e["reportingInstance"].as_str().unwrap().starts_with("rds.csi.srvlab.io-"));
    let requests = w.api.requests();
    assert_eq!(requests.get("POST events"), Some(&2), "{requests:?}");
    assert_eq!(requests.get("PATCH events"), Some(&2), "{requests:?}");
}

#[tokio::test]
async fn an_expired_event_is_created_again_and_distinct_messages_are_distinct_events() {
    use crate::ports::cluster::{ClusterEvent, reason};
    let w = World::new(&["pvc-1"]).await;
    bind(&w, "pvc-1", "apps", "data");
    let (_store, cluster) = w.ports();
    let event = |message: &str| ClusterEvent {
        volume_id: VolumeId::new("pvc-1").unwrap(),
        reason: reason::ATTACHMENT_CONFLICT.into(),
        message: message.into(),
        warning: true,
    };
    cluster.record_event(&event("to node-b")).await.unwrap();
    cluster.record_event(&event("to node-c")).await.unwrap();
    assert_eq!(events_in(&w, "apps").len(), 2, "different messages, different Events");
    // The API server dropped the Events (their TTL): the next repeat creates one anew.
    for e in w.api.objects(Kind::Event) {
        w.api.remove_object(Kind::Event, "apps", e["metadata"]["name"].as_str().unwrap());
    }
    cluster.record_event(&event("to node-b")).await.unwrap();
    assert_eq!(
        events_in(&w, "apps"),
        vec![("PersistentVolumeClaim".into(), "data".into(), "AttachmentConflict".into(), "Warning".into(), 1)]
    );
    // A claim read once is reused: one GET of the PV for the three events.
    assert_eq!(w.api.requests().get("GET persistentvolumes"), Some(&1));
}

#[tokio::test]
async fn a_failed_event_write_is_retried_by_the_next_repeat_without_a_second_object() {
    use crate::ports::cluster::{ClusterEvent, reason};
    let w = World::new(&["pvc-1"]).await;
    bind(&w, "pvc-1", "apps", "data");
    let (_store, cluster) = w.ports();
    let event = ClusterEvent {
        volume_id: VolumeId::new("pvc-1").unwrap(),
        reason: reason::VOLUME_ATTACHED.into(),
        message: "volume pvc-1 attached to node node-a".into(),
        warning: false,
    };
    // The claim is read, then every attempt of the POST fails.
    cluster.record_event(&event).await.unwrap();
    w.api.fail_next_requests(std::iter::repeat_n(503, FAST.max_attempts as usize));
    let mut second = event.clone();
    second.message = "volume pvc-1 attached to node node-b".into();
    assert!(cluster.record_event(&second).await.is_err());
    // The repeats find the object (or its absence) by name: still one object per event.
    cluster.record_event(&second).await.unwrap();
    cluster.record_event(&second).await.unwrap();
    cluster.record_event(&event).await.unwrap();
    let mut got = events_in(&w, "apps");
    got.sort();
    assert_eq!(
        got.iter().map(|e| e.4).collect::<Vec<_>>(),
        vec![2, 2],
        "{got:?}"
    );
}

#[tokio::test]
async fn cluster_adapter_reads_nodes_and_volume_attachments() {
    let w = World::new(&["pvc-1"]).await;
    let (store, cluster) = w.ports();
    store.load_all().await.unwrap();
    w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-1", "node-a", false));
    let mut foreign = va_json("pvc-1", "node-b", true);
    foreign["spec"]["attacher"] = json!("other.csi.io");
    w.api.put_object(Kind::VolumeAttachment, "", foreign);
    let a = NodeId::new("node-a").unwrap();
    assert!(cluster.node_exists(&a).await.unwrap());
    assert!(!cluster.node_exists(&NodeId::new("node-z").unwrap()).await.unwrap());
    assert_eq!(cluster.node_host_nqn(&a).await.unwrap().as_deref(), Some("nqn.2014-08.org.nvmexpress:uuid:node-a"));
    let vas = cluster.volume_attachments().await.unwrap().unwrap();
    assert_eq!(vas.len(), 1);
    assert_eq!((vas[0].volume_id.as_str(), vas[0].node_id.as_str(), vas[0].attached), ("pvc-1", "node-a", false));
}

#[tokio::test]
async fn annotations_round_trip_and_legacy_ones_read_their_mode_from_the_pv() {
    use crate::kube::pv_store::{annotations_for, records_from};
    use crate::ports::store::{AttachmentRecord, Migration};
    let v = VolumeId::new("pvc-1").unwrap();
    let rec = |node: &str, us: u64, mode: AccessMode, readonly: bool| {
        let mut r = AttachmentRecord::new(
            v.clone(),
            NodeId::new(node).unwrap(),
            UNIX_EPOCH + Duration::from_micros(us),
            mode,
            readonly,
        );
        r.generation = 7;
        r
    };
    let text = |recs: &[AttachmentRecord]| -> std::collections::BTreeMap<String, String> {
        annotations_for(recs)
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
            .collect()
    };
    let readers = vec![
        rec("node-a", 1_760_000_000_000_007, AccessMode::MultiNodeReadOnly, true),
        rec("node-b", 1_760_000_000_500_000, AccessMode::MultiNodeReadOnly, true),
    ];
    assert_eq!(records_from(&v, &text(&readers), AccessMode::SingleNode).unwrap(), readers);
    // A migration: on the target's record, in its own annotations.
    let mut target = rec("node-b", 1_760_000_000_500_000, AccessMode::MultiNodeMultiWriter, false);
    target.migration = Some(Migration {
        source: NodeId::new("node-a").unwrap(),
        started_at: target.attached_at,
        timeout: Duration::from_secs(90),
        target_nqn: Some("nqn.2014-08.org.nvmexpress:uuid:bbbb".into()),
    });
    let vm = vec![rec("node-a", 1_760_000_000_000_007, AccessMode::MultiNodeMultiWriter, false), target];
    let ann = text(&vm);
    assert_eq!(ann["rds.csi.srvlab.io/migration-source"], "node-a");
    assert_eq!(ann["rds.csi.srvlab.io/migration-timeout-seconds"], "90");
    assert_eq!(ann["rds.csi.srvlab.io/migration-target-nqn"], "nqn.2014-08.org.nvmexpress:uuid:bbbb");
    assert_eq!(ann["rds.csi.srvlab.io/migration-started-at"], "2025-10-09T08:53:20.500000Z");
    assert_eq!(ann["rds.csi.srvlab.io/attachment-generation"], "7");
    assert_eq!(records_from(&v, &ann, AccessMode::SingleNode).unwrap(), vm);
    // Written by the earlier driver: one node, a time with an offset, no mode: the PV says.
    let legacy: std::collections::BTreeMap<String, String> = [
        ("rds.csi.srvlab.io/attached-node".to_string(), "node-a".to_string()),
        ("rds.csi.srvlab.io/attached-at".to_string(), "2025-11-12T01:36:13.123456+01:00".to_string()),
    ]
    .into();
    let r = records_from(&v, &legacy, AccessMode::MultiNodeMultiWriter).unwrap();
    assert_eq!(
        (r.len(), r[0].access_mode, r[0].readonly, r[0].generation),
        (1, AccessMode::MultiNodeMultiWriter, false, 0)
    );
    assert_eq!(r[0].attached_at, UNIX_EPOCH + Duration::from_micros(1_762_907_773_123_456));
    for (k, bad) in [
        ("rds.csi.srvlab.io/attached-node", "bad node"),
        ("rds.csi.srvlab.io/attachment-generation", "seven"),
    ] {
        let mut ann = legacy.clone();
        ann.insert(k.to_string(), bad.to_string());
        assert!(records_from(&v, &ann, AccessMode::SingleNode).is_err(), "{k}={bad}");
    }
    // A migration source that holds nothing describes no migration: ignored, holders kept.
    let mut stray = legacy.clone();
    stray.insert("rds.csi.srvlab.io/migration-source".into(), "node-z".into());
    let r = records_from(&v, &stray, AccessMode::SingleNode).unwrap();
    assert_eq!((r.len(), r[0].migration.is_none()), (1, true));
}

#[test]
fn the_mode_of_a_pv_without_a_mode_annotation_comes_from_its_spec() {
    use crate::kube::pv_store::{PvSpecLite, mode_of_spec};
    let spec = |modes: &[&str], volume_mode: Option<&str>| PvSpecLite {
        access_modes: modes.iter().map(|m| m.to_string()).collect(),
        volume_mode: volume_mode.map(str::to_string),
        ..Default::default()
    };
    assert_eq!(mode_of_spec(&spec(&["ReadWriteMany"], Some("Block"))), AccessMode::MultiNodeMultiWriter);
    assert_eq!(mode_of_spec(&spec(&["ReadWriteMany"], Some("Filesystem"))), AccessMode::SingleNode);
    assert_eq!(mode_of_spec(&spec(&["ReadOnlyMany"], None)), AccessMode::MultiNodeReadOnly);
    assert_eq!(mode_of_spec(&spec(&["ReadWriteOnce", "ReadOnlyMany"], None)), AccessMode::SingleNode);
    assert_eq!(mode_of_spec(&spec(&[], None)), AccessMode::SingleNode);
}

#[tokio::test]
async fn a_node_named_twice_in_the_annotations_holds_the_volume_once() {
    // Found by fuzzing (`attachment_record`): `node-a,node-a` decoded as two holders of a
    // volume whose holder set has one record per node (ListVolumes listed node-a twice; a
    // write retried after a conflict compared its one record with two). It reads as one
    // holder since the earliest time; the next write stores it once. Named read-only and
    // read-write, it is malformed.
    let w = World::new(&["pvc-1"]).await;
    let doubled = json!({
        "rds.csi.srvlab.io/attached-node": "node-a,node-a",
        "rds.csi.srvlab.io/attached-at": "2025-11-12T00:36:14Z,2025-11-12T00:36:13Z",
    });
    w.api.put_object(Kind::PersistentVolume, "", pv_json("pvc-1", "pvc-1", DRIVER, doubled));
    let v = VolumeId::new("pvc-1").unwrap();
    let (store, _) = w.ports();
    let read = store.read_volume(&v).await.unwrap();
    assert_eq!(read.len(), 1, "{read:?}");
    assert_eq!(read[0].node_id.as_str(), "node-a");
    assert_eq!(read[0].attached_at, crate::kube::pv_store::parse_time("2025-11-12T00:36:13Z").unwrap());
    assert_eq!(store.load_all().await.unwrap(), read);
    let m = w.controller(AttachmentConfig::default()).await;
    m.publish(&publish("pvc-1", "node-a")).await.unwrap();
    m.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(w.annotations("pvc-1"), json!({}));
    let ann: std::collections::BTreeMap<String, String> = [
        ("rds.csi.srvlab.io/attached-node".to_string(), "node-b, node-a,node-b".to_string()),
        ("rds.csi.srvlab.io/attached-readonly".to_string(), "true,false,false".to_string()),
    ]
    .into();
    let e = crate::kube::pv_store::records_from(&v, &ann, AccessMode::SingleNode).unwrap_err();
    assert!(e.contains("node node-b twice"), "{e}");
}

#[tokio::test]
async fn fake_api_lists_in_pages_and_checks_preconditions() {
    let api = FakeApi::new();
    for i in 0..5 {
        api.put_object(Kind::Node, "", node_json(&format!("n{i}"), None));
    }
    let page = |q: &str| -> Value { serde_json::from_slice(&api.handle_now(&http::Method::GET, &format!("/api/v1/nodes?{q}"), b"").body).unwrap() };
    let p1 = page("limit=2");
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    assert_eq!(p1["metadata"]["continue"], "5_n1");
    let p3 = page("limit=2&continue=5_n3");
    assert_eq!(p3["items"][0]["metadata"]["name"], "n4");
    assert!(p3["metadata"].get("continue").is_none());
    let rv = api.object(Kind::Node, "", "n0").unwrap()["metadata"]["resourceVersion"].clone();
    let stale = json!({"metadata": {"resourceVersion": "999", "labels": {"x": "y"}}});
    assert_ne!(rv, json!("999"));
    let ans = api.handle_now(&http::Method::PATCH, "/api/v1/nodes/n0", stale.to_string().as_bytes());
    assert_eq!(ans.status, http::StatusCode::CONFLICT);
    let fresh = json!({"metadata": {"resourceVersion": rv, "labels": {"x": "y"}}});
    let ans = api.handle_now(&http::Method::PATCH, "/api/v1/nodes/n0", fresh.to_string().as_bytes());
    assert_eq!(ans.status, http::StatusCode::OK);
    assert_eq!(api.object(Kind::Node, "", "n0").unwrap()["metadata"]["labels"]["x"], "y");
}

#[tokio::test]
async fn a_stale_controller_cannot_overwrite_a_newer_attachment() {
    let w = World::new(&["pvc-1"]).await;
    w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-1", "node-a", true));
    let old = w.controller(AttachmentConfig::default()).await;
    old.publish(&publish("pvc-1", "node-a")).await.unwrap();
    // Failover: a new controller takes over, detaches node-a and attaches node-b.
    let new = w.controller(AttachmentConfig::default()).await;
    new.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    new.publish(&publish("pvc-1", "node-b")).await.unwrap();
    // A late unpublish reaches the old controller, which still believes node-a holds it.
    let err = old.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], "node-b");
    // Its memory was resynchronised: the retry is a no-op, and node-b stays fenced in.
    let holders: Vec<String> = old.list().into_iter().map(|r| r.node_id.to_string()).collect();
    assert_eq!(holders, vec!["node-b"]);
    old.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], "node-b");
    w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-1", "node-b", true));
    assert!(matches!(old.publish(&publish("pvc-1", "node-a")).await, Err(Error::FailedPrecondition(_))));
    // node-b's detach is done by hand (its VolumeAttachment's finalizer removed): the record
    // is stale, and node-a gets the volume.
    w.api.remove_object(Kind::VolumeAttachment, "", &va_name("pvc-1", "node-b"));
    old.publish(&publish("pvc-1", "node-a")).await.unwrap();
    assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], "node-a");
}

#[tokio::test]
async fn the_volume_attachment_name_is_the_one_kubernetes_gives() {
    // csi-<sha256(volume handle + driver + node)>, as the attach/detach controller names it.
    let name = crate::kube::cluster::volume_attachment_name(
        &VolumeId::new("pvc-1").unwrap(),
        "rds.csi.srvlab.io",
        &NodeId::new("node-a").unwrap(),
    );
    assert_eq!(name.len(), 4 + 64);
    assert!(name.starts_with("csi-") && name[4..].chars().all(|c| c.is_ascii_hexdigit()));
    // sha256("xy") (by `printf xy | sha256sum`) pins the digest and its hex rendering.
    assert_eq!(
        crate::kube::cluster::volume_attachment_name(
            &VolumeId::new("x").unwrap(),
            "",
            &NodeId::new("y").unwrap()
        ),
        "csi-769a4e6d0003189c7e96c5d9b7e810a0d11c3a12832527ec94b0f86d277f51ca"
    );
}

#[tokio::test]
async fn statically_provisioned_pvs_map_their_names_to_volume_handles() {
    let w = World::new(&["vol-static"]).await;
    // The PV is not named after the volume (a static PV); remove the default one.
    w.api.remove_object(Kind::PersistentVolume, "", "vol-static");
    w.api.put_object(Kind::PersistentVolume, "", pv_json("my-static-pv", "vol-static", DRIVER, json!({})));
    w.api.put_object(Kind::VolumeAttachment, "", va_json("my-static-pv", "node-a", true));
    let m = w.controller(AttachmentConfig::default()).await;
    m.publish(&publish("vol-static", "node-a")).await.unwrap();
    assert_eq!(w.annotations("my-static-pv")["rds.csi.srvlab.io/attached-node"], "node-a");
    // After a restart the record is kept: its VolumeAttachment names the PV, not the volume.
    let m = w.controller(AttachmentConfig::default()).await;
    assert_eq!(m.list().len(), 1);
    let (store, cluster) = w.ports();
    store.load_all().await.unwrap();
    let vas = cluster.volume_attachments().await.unwrap().unwrap();
    assert_eq!(vas[0].volume_id.as_str(), "vol-static");
}

#[tokio::test]
async fn the_fake_api_serves_the_real_client_over_tcp() {
    let api = FakeApi::new();
    api.put_object(Kind::PersistentVolume, "", pv_json("pvc-tcp", "pvc-tcp", DRIVER, json!({})));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = api.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move { server.serve_connection(stream).await });
        }
    });
    let mut config = ::kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.default_retry = false;
    let client = ::kube::Client::try_from(config).unwrap();
    let (store, _) = adapters(client, DRIVER, Arc::new(FixedClock), Arc::new(SeededEntropy::from_seed(3)), FAST);
    let v = VolumeId::new("pvc-tcp").unwrap();
    let rec = crate::ports::store::AttachmentRecord::new(
        v.clone(),
        NodeId::new("node-a").unwrap(),
        FixedClock.now(),
        AccessMode::SingleNode,
        false,
    );
    api.conflict_next_writes(2);
    store.write_volume(&v, std::slice::from_ref(&rec)).await.unwrap();
    assert_eq!(store.read_volume(&v).await.unwrap(), vec![rec]);
    assert_eq!(store.load_all().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_write_whose_answer_was_lost_is_recognised_on_retry() {
    let w = World::new(&["pvc-1"]).await;
    let (store, _) = w.ports();
    store.load_all().await.unwrap();
    let v = VolumeId::new("pvc-1").unwrap();
    let rec = crate::ports::store::AttachmentRecord::new(
        v.clone(),
        NodeId::new("node-a").unwrap(),
        FixedClock.now(),
        AccessMode::SingleNode,
        false,
    );
    // Another path writes exactly what we are about to write (as if our earlier attempt had
    // landed and its answer was lost); our cached version is now stale.
    let mut pv = w.api.object(Kind::PersistentVolume, "", "pvc-1").unwrap();
    let mut ann = crate::kube::pv_store::annotations_for(std::slice::from_ref(&rec));
    ann.retain(|_, v| !v.is_null()); // a merge patch's nulls remove keys
    pv["metadata"]["annotations"] = serde_json::Value::Object(ann);
    w.api.put_object(Kind::PersistentVolume, "", pv);
    w.api.reset_requests();
    store.write_volume_if(&v, &[], std::slice::from_ref(&rec)).await.unwrap();
    let reqs = w.api.requests();
    assert_eq!((reqs.get("PATCH persistentvolumes"), reqs.get("GET persistentvolumes")), (Some(&1), Some(&1)));
    assert_eq!(store.read_volume(&v).await.unwrap(), vec![rec]);
}

#[tokio::test]
async fn the_node_publishes_its_host_nqn_and_the_controller_reads_it_back() {
    let w = World::new(&[]).await;
    let mut node = node_json("node-c", None);
    node["metadata"]["annotations"]["other.io/keep"] = json!("yes");
    w.api.put_object(Kind::Node, "", node);
    let (_, cluster) = w.ports();
    let c = NodeId::new("node-c").unwrap();
    // Known, without an NQN: the answer is cached (node_known / node_host_nqn).
    assert_eq!(cluster.node_host_nqn(&c).await.unwrap(), None);
    w.api.reset_requests();

    let nqn = "nqn.2014-08.org.nvmexpress:uuid:node-c";
    w.api.fail_next_requests([503]);
    cluster.set_node_host_nqn(&c, nqn).await.expect("a transient failure is retried");
    assert_eq!(w.api.requests().get("PATCH nodes"), Some(&2), "{:?}", w.api.requests());
    let ann = w.api.object(Kind::Node, "", "node-c").unwrap()["metadata"]["annotations"].clone();
    assert_eq!(ann, json!({ "rds.csi.srvlab.io/host-nqn": nqn, "other.io/keep": "yes" }));
    // The cached "no NQN" is dropped: the same adapter reads the new value.
    assert_eq!(cluster.node_host_nqn(&c).await.unwrap().as_deref(), Some(nqn));
    // Another adapter (the controller's) reads it from the Node.
    let (_, controller) = w.ports();
    assert_eq!(controller.node_host_nqn(&c).await.unwrap().as_deref(), Some(nqn));

    // Republishing (a restart) overwrites; an invalid NQN sends nothing.
    cluster.set_node_host_nqn(&c, "nqn.2014-08.org.nvmexpress:uuid:new").await.unwrap();
    w.api.reset_requests();
    let err = cluster.set_node_host_nqn(&c, "bad nqn/").await.unwrap_err();
    assert!(err.to_string().contains("host NQN of node node-c"), "{err}");
    assert!(w.api.requests().is_empty());
    // A missing Node is an error naming it.
    let err = cluster
        .set_node_host_nqn(&NodeId::new("node-z").unwrap(), nqn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("PATCH Node node-z"), "{err}");
}

// ---- Watches ---------------------------------------------------------------------------

mod watches {
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::StreamExt;

    use super::*;
    use crate::controller::watched::apply;
    use crate::kube::KubeWatch;
    use crate::kube::fake_api::Reply;
    use crate::kube::pv_store::annotations_for;
    use crate::ports::ClusterWatch;
    use crate::ports::store::AttachmentRecord;
    use crate::ports::watch::Change;

    fn record(v: &str, n: &str, secs: u64) -> AttachmentRecord {
        AttachmentRecord::new(
            VolumeId::new(v).unwrap(),
            NodeId::new(n).unwrap(),
            UNIX_EPOCH + Duration::from_secs(secs),
            AccessMode::SingleNode,
            false,
        )
    }

    /// Another writer (a replica during a failover, an operator) sets `pv`'s records.
    fn write_by_another(api: &FakeApi, pv: &str, holders: &[AttachmentRecord]) {
        let patch = json!({ "metadata": { "annotations": annotations_for(holders) } });
        let path = format!("/api/v1/persistentvolumes/{pv}");
        let ans = api.handle_now(&http::Method::PATCH, &path, patch.to_string().as_bytes());
        assert_eq!(ans.status, http::StatusCode::OK);
    }

    fn delete(api: &FakeApi, path: &str) {
        let ans = api.handle_now(&http::Method::DELETE, path, b"");
        assert_eq!(ans.status, http::StatusCode::OK, "DELETE {path}");
    }

    /// Applies what the watch sees until every kind is listed.
    async fn synced(watch: &KubeWatch, m: &AttachmentManager) {
        let mut relisted = false;
        while !relisted {
            let changes = watch.changes().await;
            relisted = changes.iter().any(|c| matches!(c, Change::Relisted { .. }));
            apply(changes, m, &|| {}).await;
        }
        for _ in 0..10_000 {
            if watch.synced() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the watches never listed every kind");
    }

    fn lists(api: &FakeApi) -> Vec<(String, u64)> {
        api.requests()
            .into_iter()
            .filter(|(k, _)| k.starts_with("LIST "))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn another_writers_changes_are_followed_by_the_watch_without_a_list() {
        let w = World::new(&["pvc-1", "pvc-2"]).await;
        w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-2", "node-a", true));
        let m = w.controller(AttachmentConfig::default()).await;
        m.publish(&publish("pvc-1", "node-a")).await.unwrap();
        let watch = KubeWatch::new(w.api.client(), DRIVER, Arc::new(SeededEntropy::from_seed(2)));
        watch.start();
        synced(&watch, &m).await;
        assert_eq!(watch.lists(), 4, "one list of each kind");
        w.api.reset_requests();
        let listed = w.api.listed_objects();

        // A failover's other replica moved pvc-1 to node-b: memory follows, one GET.
        let moved = record("pvc-1", "node-b", 5);
        write_by_another(&w.api, "pvc-1", std::slice::from_ref(&moved));
        let changes = watch.changes().await;
        let seen = Change::Holders {
            volume: VolumeId::new("pvc-1").unwrap(),
            holders: vec![moved.clone()],
        };
        assert_eq!(changes, vec![seen]);
        apply(changes, &m, &|| {}).await;
        assert_eq!(m.list(), vec![moved]);

        // A VolumeAttachment deleted by hand, then a Node deleted: each nudges the
        // attachment reconciler, whose candidates now come from the watch's cache.
        let nudges = AtomicU32::new(0);
        let nudge = || {
            nudges.fetch_add(1, Ordering::SeqCst);
        };
        delete(
            &w.api,
            &format!("/apis/storage.k8s.io/v1/volumeattachments/{}", va_name("pvc-2", "node-a")),
        );
        let changes = watch.changes().await;
        assert_eq!(changes, vec![Change::Detached]);
        apply(changes, &m, &nudge).await;
        assert_eq!(watch.volume_attachments(), Some(Vec::new()));
        delete(&w.api, "/api/v1/nodes/node-a");
        let changes = watch.changes().await;
        assert_eq!(changes, vec![Change::Detached]);
        apply(changes, &m, &nudge).await;
        assert_eq!(nudges.load(Ordering::SeqCst), 2);

        let refs = watch.disk_references().unwrap();
        assert_eq!(refs.volumes.into_iter().collect::<Vec<_>>(), ["pvc-1", "pvc-2"]);
        assert_eq!(refs.snapshots, Some(Default::default()));
        // Nothing was listed again.
        assert_eq!(lists(&w.api), Vec::new(), "{:?}", w.api.requests());
        assert_eq!(w.api.listed_objects(), listed);
        assert_eq!(watch.lists(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_watch_resumes_from_its_version_and_a_410_relists() {
        let w = World::new(&["pvc-1"]).await;
        let m = w.controller(AttachmentConfig::default()).await;
        let watch = KubeWatch::new(w.api.client(), DRIVER, Arc::new(SeededEntropy::from_seed(3)));
        watch.start();
        synced(&watch, &m).await;
        w.api.reset_requests();

        // The server cuts every stream; the change made meanwhile is replayed from the
        // watch's version when it watches again: no list.
        w.api.cut_watches();
        let moved = record("pvc-1", "node-b", 7);
        write_by_another(&w.api, "pvc-1", std::slice::from_ref(&moved));
        let changes = watch.changes().await;
        assert!(
            changes.iter().any(|c| matches!(c, Change::Holders { holders, .. } if *holders == [moved.clone()])),
            "{changes:?}"
        );
        apply(changes, &m, &|| {}).await;
        assert_eq!(m.list(), vec![moved]);
        assert_eq!(lists(&w.api), Vec::new());
        assert!(w.api.requests().get("WATCH persistentvolumes").is_some_and(|n| *n >= 1));

        // Now the next watches are answered 410 Gone: the watcher lists again, and the
        // listed records replace what memory believed.
        w.api.reset_requests();
        w.api.gone_next_watches(4);
        w.api.cut_watches();
        write_by_another(&w.api, "pvc-1", &[]);
        let mut relisted = false;
        while !relisted {
            let changes = watch.changes().await;
            relisted = changes.iter().any(|c| matches!(c, Change::Relisted { .. }));
            apply(changes, &m, &|| {}).await;
        }
        assert_eq!(m.list(), Vec::new());
        assert!(lists(&w.api).iter().any(|(k, _)| k == "LIST persistentvolumes"), "{:?}", w.api.requests());
        assert!(watch.lists() > 4);
    }

    async fn next_line(reply: &mut Reply) -> Option<Value> {
        let Reply::Watch(stream) = reply else {
            panic!("not a watch: {reply:?}");
        };
        let line = stream.next().await?;
        assert!(line.ends_with(b"\n"), "one event a line");
        Some(serde_json::from_slice(&line).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn fake_api_watch_replays_streams_bookmarks_and_answers_410_beyond_its_history() {
        let api = FakeApi::new();
        let rv0 = api.put_object(Kind::Node, "", node_json("n0", None));
        api.put_object(Kind::Node, "", node_json("n1", None));
        let get = http::Method::GET;
        // From rv0: the change after it is replayed, then live changes follow.
        let mut w = api
            .respond(&get, &format!("/api/v1/nodes?watch=true&resourceVersion={rv0}&allowWatchBookmarks=true&timeoutSeconds=290"), b"")
            .await;
        let e = next_line(&mut w).await.unwrap();
        assert_eq!((e["type"].as_str(), e["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("n1")));
        delete(&api, "/api/v1/nodes/n0");
        let e = next_line(&mut w).await.unwrap();
        assert_eq!(e["type"], "DELETED");
        let deleted_at: u64 = e["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert!(deleted_at > rv0 + 1, "a deletion moves the version");
        // Silence: a bookmark a minute later, at the current version.
        let e = next_line(&mut w).await.unwrap();
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(e["object"]["metadata"]["resourceVersion"], deleted_at.to_string());
        // A watch from before the history: one ERROR event with a 410 Status, then the end.
        api.set_watch_history(2);
        api.put_object(Kind::Node, "", node_json("n2", None));
        api.put_object(Kind::Node, "", node_json("n3", None));
        let mut old = api
            .respond(&get, &format!("/api/v1/nodes?watch=true&resourceVersion={rv0}"), b"")
            .await;
        let e = next_line(&mut old).await.unwrap();
        assert_eq!((e["type"].as_str(), e["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
        assert_eq!(e["object"]["reason"], "Expired");
        assert!(next_line(&mut old).await.is_none());
        // The timeout ends a watch; a cut ends it at once.
        let mut short = api
            .respond(&get, &format!("/api/v1/nodes?watch=true&resourceVersion={deleted_at}&timeoutSeconds=5"), b"")
            .await;
        assert_eq!(next_line(&mut short).await.unwrap()["object"]["metadata"]["name"], "n2");
        assert_eq!(next_line(&mut short).await.unwrap()["object"]["metadata"]["name"], "n3");
        assert!(next_line(&mut short).await.is_none());
        api.cut_watches();
        assert!(next_line(&mut w).await.is_some_and(|e| e["object"]["metadata"]["name"] == "n2"));
        assert!(next_line(&mut w).await.is_some());
        assert!(next_line(&mut w).await.is_none());
        assert_eq!(api.watch_lines_pending(), 0);
        assert_eq!(api.requests().get("WATCH nodes"), Some(&3));
    }

    #[tokio::test]
    async fn a_paginated_list_answers_its_first_pages_version_on_every_page() {
        let api = FakeApi::new();
        for i in 0..5 {
            api.put_object(Kind::Node, "", node_json(&format!("n{i}"), None));
        }
        let page = |q: &str| -> Value {
            serde_json::from_slice(&api.handle_now(&http::Method::GET, &format!("/api/v1/nodes?{q}"), b"").body).unwrap()
        };
        let p1 = page("limit=2");
        let token = p1["metadata"]["continue"].as_str().unwrap().to_string();
        api.put_object(Kind::Node, "", node_json("n0", Some("nqn.changed")));
        let p2 = page(&format!("limit=2&continue={token}"));
        assert_eq!(p2["metadata"]["resourceVersion"], p1["metadata"]["resourceVersion"]);
        assert_eq!(api.listed_objects(), 4);
    }
}

/// A VM disk's PV: `ReadWriteMany`, `volumeMode: Block`, bound to the claim `vms/<name>`.
fn vm_pv_json(name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name, "annotations": annotations },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteMany"],
            "volumeMode": "Block",
            "claimRef": { "kind": "PersistentVolumeClaim", "namespace": "vms", "name": format!("{name}-claim") },
            "csi": { "driver": DRIVER, "volumeHandle": name },
        },
    })
}

fn vm_publish(v: &str, n: &str) -> PublishArgs {
    PublishArgs {
        access_mode: AccessMode::MultiNodeMultiWriter,
        block: true,
        fs_type: None,
        ..publish(v, n)
    }
}

#[tokio::test]
async fn migration_events_go_to_the_claim_in_its_namespace() {
    let w = World::new(&["pvc-vm"]).await;
    w.api.put_object(Kind::PersistentVolume, "", vm_pv_json("pvc-vm", json!({})));
    let m = w.controller(AttachmentConfig::default()).await;
    m.publish(&vm_publish("pvc-vm", "node-a")).await.unwrap();
    m.publish(&vm_publish("pvc-vm", "node-b")).await.unwrap();
    let ann = w.annotations("pvc-vm");
    assert_eq!(ann["rds.csi.srvlab.io/attached-node"], "node-a,node-b");
    assert_eq!(ann["rds.csi.srvlab.io/migration-source"], "node-a");
    assert_eq!(ann["rds.csi.srvlab.io/migration-timeout-seconds"], "300");
    assert_eq!(ann["rds.csi.srvlab.io/attachment-generation"], "2");
    m.unpublish(&unpublish("pvc-vm", "node-a")).await.unwrap();
    let ann = w.annotations("pvc-vm");
    assert_eq!(ann["rds.csi.srvlab.io/attached-node"], "node-b");
    assert!(ann.get("rds.csi.srvlab.io/migration-source").is_none(), "{ann}");
    let events: Vec<(String, String, String, String)> = w
        .api
        .objects(Kind::Event)
        .iter()
        .map(|e| {
            let s = |p: &str| e.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
            (s("/reason"), s("/metadata/namespace"), s("/involvedObject/kind"), s("/involvedObject/name"))
        })
        .collect();
    for reason in ["MigrationStarted", "MigrationCompleted"] {
        assert!(
            events.contains(&(
                reason.to_string(),
                "vms".to_string(),
                "PersistentVolumeClaim".to_string(),
                "pvc-vm-claim".to_string()
            )),
            "{reason}: {events:?}"
        );
    }
}

#[tokio::test]
async fn a_stale_replica_cannot_start_a_phantom_migration_after_an_a_b_a_change() {
    let w = World::new(&["pvc-vm"]).await;
    w.api.put_object(Kind::PersistentVolume, "", vm_pv_json("pvc-vm", json!({})));
    for n in ["node-a", "node-b"] {
        w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-vm", n, true));
    }
    let old = w.controller(AttachmentConfig::default()).await;
    old.publish(&vm_publish("pvc-vm", "node-a")).await.unwrap();
    // Failover: the new leader runs a whole migration attempt that fails (node-b attached,
    // then detached): the holders are node-a again, as the old leader believes.
    let new = w.controller(AttachmentConfig::default()).await;
    new.publish(&vm_publish("pvc-vm", "node-b")).await.unwrap();
    new.unpublish(&unpublish("pvc-vm", "node-b")).await.unwrap();
    assert_eq!(w.annotations("pvc-vm")["rds.csi.srvlab.io/attached-node"], "node-a");
    // The old leader's late publish of node-b (sent before the detach) must not land: the
    // generation moved on although the holders look the same.
    let err = old.publish(&vm_publish("pvc-vm", "node-b")).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    let ann = w.annotations("pvc-vm");
    assert_eq!(ann["rds.csi.srvlab.io/attached-node"], "node-a");
    assert!(ann.get("rds.csi.srvlab.io/migration-source").is_none(), "no phantom: {ann}");
    assert_eq!(ann["rds.csi.srvlab.io/attachment-generation"], "3");
}

#[tokio::test]
async fn a_listing_that_saw_a_newer_version_does_not_let_stale_memory_write_over_it() {
    let w = World::new(&["pvc-1"]).await;
    for n in ["node-a", "node-b"] {
        w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-1", n, true));
    }
    let old = w.controller(AttachmentConfig::default()).await;
    old.publish(&publish("pvc-1", "node-a")).await.unwrap();
    let new = w.controller(AttachmentConfig::default()).await;
    new.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap();
    new.publish(&publish("pvc-1", "node-b")).await.unwrap();
    // The old leader answers a ListVolumes: its store reads every PV (the newest versions)
    // while its memory still says node-a.
    assert_eq!(old.stored_records().await.unwrap().len(), 1);
    // A late unpublish of node-a there must not write "nobody" over node-b's attachment.
    let err = old.unpublish(&unpublish("pvc-1", "node-a")).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    assert_eq!(w.annotations("pvc-1")["rds.csi.srvlab.io/attached-node"], "node-b");
}

#[tokio::test]
async fn records_the_earlier_driver_left_are_rebuilt_with_the_mode_their_pv_says() {
    let w = World::new(&["pvc-vm"]).await;
    // As the Go driver wrote them: one node, Go's RFC 3339 with microseconds, no mode.
    w.api.put_object(
        Kind::PersistentVolume,
        "",
        vm_pv_json(
            "pvc-vm",
            json!({
                "rds.csi.srvlab.io/attached-node": "node-a",
                "rds.csi.srvlab.io/attached-at": "2025-11-12T00:36:13.123456Z",
            }),
        ),
    );
    w.api.put_object(Kind::VolumeAttachment, "", va_json("pvc-vm", "node-a", true));
    let m = w.controller(AttachmentConfig::default()).await;
    let held = m.get(&VolumeId::new("pvc-vm").unwrap());
    assert_eq!((held.len(), held[0].access_mode), (1, AccessMode::MultiNodeMultiWriter));
    w.api.reset_requests();
    // The kubelet's re-publish is a repeat (not ALREADY_EXISTS over a "single-node" guess),
    // and a second node starts a migration.
    m.publish(&vm_publish("pvc-vm", "node-a")).await.unwrap();
    assert_eq!(w.api.requests().get("PATCH persistentvolumes"), None);
    m.publish(&vm_publish("pvc-vm", "node-b")).await.unwrap();
    let ann = w.annotations("pvc-vm");
    assert_eq!(ann["rds.csi.srvlab.io/attached-mode"], "multi-node-multi-writer");
    assert_eq!(ann["rds.csi.srvlab.io/migration-source"], "node-a");
}
