//! The Kubernetes API access the plugin itself needs: the ONE list the deployment's RBAC is
//! checked against.
//!
//! `deploy/helm/rds-csi/templates/rbac-plugin.yaml` grants the controller's ServiceAccount
//! exactly [`API_ACCESS`], and the node's ServiceAccount exactly [`NODE_API_ACCESS`];
//! `tests/deploy.rs` fails when the rendered manifests grant more or less. Whoever adds,
//! removes or changes a Kubernetes API call in the adapters (`src/backend/kube*`, the
//! `AttachmentStore` and `Cluster` ports' production adapters) updates these lists in the
//! same change, then the chart (and `python3 deploy/tools/deploycheck.py sync`).
//!
//! The CSI sidecars (provisioner, attacher, resizer, snapshotter) have their own, separate
//! rules in the chart; they are not listed here.
//!
//! The list is checked against the code too: a test here drives every method of the
//! `AttachmentStore` and `Cluster` production adapters against the simulated API server
//! and requires the requests it sees to be exactly [`API_ACCESS`] for the controller's
//! methods and [`NODE_API_ACCESS`] for the node's; the controller's watches
//! (`crate::kube::watch`) are started there too (the simulated server counts a
//! `watch=true` GET as `WATCH`).
//!
//! Invariants: entries are unique per (api group, resource); verbs are Kubernetes RBAC verbs
//! (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`).

/// One RBAC grant: (API group, `""` for the core group; resource, with `/subresource` where
/// one is used; verbs).
pub type ApiAccess = (&'static str, &'static str, &'static [&'static str]);

/// What the controller plugin (`--mode controller`) calls on the Kubernetes API.
///
/// - `persistentvolumes` get/list/patch: attachment records live in PV annotations
///   (`rds.csi.srvlab.io/attached-node`, `rds.csi.srvlab.io/attached-at`), written by a
///   patch with a resourceVersion precondition (re-read by a get after a conflict) and
///   rebuilt at start-up by a paginated list; an event names its PV (get);
/// - `nodes` get: a stale record is cleared only when its node's Node object is gone; the
///   data-path fence reads the node's host NQN annotation;
/// - `volumeattachments` list: the start-up rebuild cross-checks the records; get: a
///   record whose VolumeAttachment is gone (detached by hand) is cleared as stale;
/// - `events` create, patch: attachments, detachments, conflicts and cleared records are
///   reported as Events on the volume's claim (found through the PV's `claimRef`: get), a
///   repeat of the same Event is aggregated into it (patch of its count).
///
/// - `leases` get, create, patch: the controller replicas elect the leader of their
///   reconcilers with one Lease (`<driver>-reconcilers`), created when absent, renewed and
///   taken over by a merge patch with a resourceVersion precondition;
/// - `volumesnapshotcontents` list: the orphan volume reconciler never judges a snapshot
///   disk a VolumeSnapshotContent references (the PV list serves it for volumes);
/// - list + watch of `persistentvolumes`, `nodes`, `volumeattachments` and
///   `volumesnapshotcontents`: the controller's watches (kube's runtime watcher: a list,
///   then a watch from its resourceVersion) follow what other writers change and feed the
///   reconcilers.
pub const API_ACCESS: &[ApiAccess] = &[
    ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
    ("", "nodes", &["get", "list", "watch"]),
    ("storage.k8s.io", "volumeattachments", &["get", "list", "watch"]),
    ("", "events", &["create", "patch"]),
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", &["list", "watch"]),
];

/// What the node plugin (`--mode node`) calls on the Kubernetes API.
///
/// - `nodes` patch: at start-up it publishes its NVMe host NQN as the annotation
///   `rds.csi.srvlab.io/host-nqn` of its own Node (one merge patch), which the controller's
///   data-path fence reads;
/// - `volumeattachments` list and `persistentvolumes` get: the orphan sweep asks which
///   volumes the controller's records hold on this node (the VolumeAttachments naming it,
///   their PV resolved to the volume handle) before it disconnects a connection nothing
///   uses. Read-only.
pub const NODE_API_ACCESS: &[ApiAccess] = &[
    ("", "nodes", &["patch"]),
    ("storage.k8s.io", "volumeattachments", &["list"]),
    ("", "persistentvolumes", &["get"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    const VERBS: &[&str] = &[
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ];

    #[test]
    fn access_lists_are_unique_and_use_real_verbs() {
        for list in [API_ACCESS, NODE_API_ACCESS] {
            let mut seen = std::collections::BTreeSet::new();
            for (group, resource, verbs) in list {
                assert!(
                    seen.insert((group, resource)),
                    "{group}/{resource} listed twice"
                );
                assert!(!verbs.is_empty(), "{group}/{resource} has no verbs");
                for verb in *verbs {
                    assert!(
                        VERBS.contains(verb),
                        "{group}/{resource}: unknown verb {verb}"
                    );
                }
            }
        }
    }

    /// The RBAC grant of a request the simulated API server counted as `"METHOD resource"`.
    fn grant_of(request: &str) -> (String, String, String) {
        let (method, resource) = request.split_once(' ').expect("METHOD resource");
        let verb = match method {
            "GET" => "get",
            "LIST" => "list",
            "WATCH" => "watch",
            "POST" => "create",
            "PATCH" => "patch",
            "PUT" => "update",
            "DELETE" => "delete",
            other => panic!("unexpected method {other} in {request}"),
        };
        let group = match resource {
            "volumeattachments" => "storage.k8s.io",
            "leases" => "coordination.k8s.io",
            "volumesnapshotcontents" => "snapshot.storage.k8s.io",
            _ => "",
        };
        (group.to_owned(), resource.to_owned(), verb.to_owned())
    }

    #[tokio::test]
    async fn api_access_is_exactly_what_the_kubernetes_adapters_call() {
        use std::collections::BTreeSet;
        use std::sync::Arc;
        use std::time::{Duration, UNIX_EPOCH};

        use serde_json::json;

        use crate::kube::fake_api::{FakeApi, Kind};
        use crate::ports::cluster::ClusterEvent;
        use crate::ports::store::AttachmentRecord;
        use crate::ports::time::SeededEntropy;
        use crate::ports::{AttachmentStore, Clock, Cluster};
        use crate::retry::Backoff;
        use crate::types::{AccessMode, NodeId, VolumeId};

        struct FixedClock;
        impl Clock for FixedClock {
            fn now(&self) -> std::time::SystemTime {
                UNIX_EPOCH + Duration::from_secs(1_760_000_000)
            }
        }
        const DRIVER: &str = "rds.csi.srvlab.io";
        let api = FakeApi::new();
        let pv = |name: &str, handle: &str| {
            json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": { "name": name, "annotations": {} },
                "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                          "csi": { "driver": DRIVER, "volumeHandle": handle } },
            })
        };
        api.put_object(Kind::PersistentVolume, "", pv("pv-1", "vol-1"));
        api.put_object(Kind::PersistentVolume, "", pv("pv-2", "vol-2"));
        api.put_object(
            Kind::Node,
            "",
            json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-a",
                    "annotations": { "rds.csi.srvlab.io/host-nqn": "nqn.2014-08.org.nvmexpress:uuid:a" } } }),
        );
        api.put_object(
            Kind::VolumeAttachment,
            "",
            json!({ "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
                    "metadata": { "name": "csi-a" },
                    "spec": { "attacher": DRIVER, "nodeName": "node-a",
                              "source": { "persistentVolumeName": "pv-1" } },
                    "status": { "attached": true } }),
        );
        let fast = Backoff {
            base: Duration::from_micros(1),
            max: Duration::from_micros(50),
            max_attempts: 8,
        };
        let (store, cluster) = crate::kube::adapters(
            api.client(),
            DRIVER,
            Arc::new(FixedClock),
            Arc::new(SeededEntropy::from_seed(7)),
            fast,
        );
        let vol = VolumeId::new("vol-1").unwrap();
        let node = NodeId::new("node-a").unwrap();
        let record = AttachmentRecord {
            volume_id: vol.clone(),
            node_id: node.clone(),
            attached_at: FixedClock.now(),
            access_mode: AccessMode::SingleNode,
            readonly: false,
            migration: None,
            generation: 0,
        };
        // Every method of both ports (add new port methods here), including the conflict
        // paths (re-read, then retry) and a volume the index has not seen.
        store.load_all().await.unwrap();
        store.write_volume(&vol, std::slice::from_ref(&record)).await.unwrap();
        api.conflict_next_writes(1);
        store.write_volume(&vol, &[]).await.unwrap();
        store.write_volume(&VolumeId::new("vol-2").unwrap(), &[]).await.unwrap();
        store.read_volume(&vol).await.unwrap();
        store
            .write_volume_if(&vol, &[], std::slice::from_ref(&record))
            .await
            .unwrap();
        api.conflict_next_writes(1);
        store
            .write_volume_if(&vol, std::slice::from_ref(&record), &[])
            .await
            .unwrap();
        assert!(cluster.node_exists(&node).await.unwrap());
        assert!(!cluster.node_exists(&NodeId::new("node-gone").unwrap()).await.unwrap());
        assert!(cluster.node_known(&node).await.unwrap());
        assert!(cluster.node_host_nqn(&node).await.unwrap().is_some());
        assert!(cluster.volume_attachments().await.unwrap().is_some());
        assert_eq!(
            cluster
                .volume_attachment_exists(&vol, &node)
                .await
                .unwrap(),
            Some(false),
            "csi-a is not the name Kubernetes gives (vol-1, node-a)"
        );
        let event = ClusterEvent {
            volume_id: vol.clone(),
            reason: crate::ports::cluster::reason::ATTACHMENT_CONFLICT.into(),
            message: "test".into(),
            warning: true,
        };
        cluster.record_event(&event).await.unwrap();
        // A repeat is aggregated into the recorded Event.
        cluster.record_event(&event).await.unwrap();
        assert_eq!(cluster.volume_attachment(&vol, &node).await.unwrap(), Some(None));
        let refs = cluster.disk_references(true).await.unwrap().unwrap();
        assert!(refs.volumes.contains("vol-1") && refs.snapshots == Some(Default::default()));
        // The reconcilers' lease: created, renewed.
        use crate::ports::Leadership;
        let lease = crate::kube::KubeLease::new(
            api.client(),
            "rds-csi",
            "rds.csi.srvlab.io-reconcilers",
            "node-a",
            Duration::from_secs(15),
            Arc::new(FixedClock),
            Arc::new(SeededEntropy::from_seed(9)),
            fast,
        );
        assert!(lease.try_lead().await.unwrap());
        assert!(lease.try_lead().await.unwrap());
        // The controller's watches: every kind listed, then watched.
        use crate::ports::ClusterWatch;
        let watch = crate::kube::KubeWatch::new(api.client(), DRIVER, Arc::new(SeededEntropy::from_seed(11)));
        watch.start();
        while !watch.synced() || api.requests().keys().filter(|k| k.starts_with("WATCH ")).count() < 4 {
            tokio::task::yield_now().await;
        }

        let grants = |list: &[ApiAccess]| -> BTreeSet<_> {
            list.iter()
                .flat_map(|(g, r, verbs)| verbs.iter().map(|v| (g.to_string(), r.to_string(), v.to_string())))
                .collect()
        };
        let called: BTreeSet<_> = api.requests().keys().map(|r| grant_of(r)).collect();
        assert_eq!(
            called,
            grants(API_ACCESS),
            "the Kubernetes adapters' API calls (left) differ from kube_rbac::API_ACCESS (right): \
             update API_ACCESS to what the code calls, then \
             deploy/helm/rds-csi/templates/rbac-plugin.yaml, then run \
             `python3 deploy/tools/deploycheck.py sync` (tests/deploy.rs checks the chart)"
        );

        // The node plugin's calls (add new node-side methods here), counted afresh, through
        // adapters of its own (as the node's own client: no index filled by a PV scan).
        api.reset_requests();
        let (_, node_cluster) = crate::kube::adapters(
            api.client(),
            DRIVER,
            Arc::new(FixedClock),
            Arc::new(SeededEntropy::from_seed(8)),
            fast,
        );
        node_cluster
            .set_node_host_nqn(&node, "nqn.2014-08.org.nvmexpress:uuid:b")
            .await
            .unwrap();
        let held = node_cluster.volume_attachments_on(&node).await.unwrap().unwrap();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].volume_id, vol);
        let called: BTreeSet<_> = api.requests().keys().map(|r| grant_of(r)).collect();
        assert_eq!(
            called,
            grants(NODE_API_ACCESS),
            "the node plugin's API calls (left) differ from kube_rbac::NODE_API_ACCESS (right): \
             update NODE_API_ACCESS to what the code calls, then \
             deploy/helm/rds-csi/templates/rbac-plugin.yaml, then run \
             `python3 deploy/tools/deploycheck.py sync` (tests/deploy.rs checks the chart)"
        );
    }
}
