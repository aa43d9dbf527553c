//! Benchmark of following another writer's change among 100,000 PersistentVolumes, through
//! the simulated API server (in process, no network):
//!
//! 1. the watch path: the controller's watches (`KubeWatch`, kube's runtime watcher) list
//!    every kind once, then one PV's attachment annotations are changed by another writer;
//!    printed: the time until the change is seen, and the LIST requests and objects the
//!    API server sent for it (none: one watch event);
//! 2. for comparison, what the fixed periodic resync did for every change, seen or not:
//!    one full paginated LIST of every PV (`AttachmentStore::load_all`).
//!
//! Run: `cargo bench --bench watch`. It prints its figures (and the load average: the
//! machine is shared); it asserts only that the change was seen and how it was seen.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use rds_csi::kube::fake_api::{FakeApi, Kind};
use rds_csi::kube::pv_store::annotations_for;
use rds_csi::kube::{KubeWatch, adapters};
use rds_csi::ports::store::AttachmentRecord;
use rds_csi::ports::time::{SeededEntropy, SystemClock};
use rds_csi::ports::watch::Change;
use rds_csi::ports::{AttachmentStore, ClusterWatch};
use rds_csi::retry::Backoff;
use rds_csi::types::{AccessMode, NodeId, VolumeId};
use serde_json::json;

const DRIVER: &str = "rds.csi.srvlab.io";
const PVS: usize = 100_000;

fn pv(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name, "annotations": {} },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteOnce"],
            "csi": { "driver": DRIVER, "volumeHandle": name },
            "claimRef": { "namespace": "default", "name": format!("claim-{name}") },
        },
    })
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    println!("load average: {}", load());
    let api = FakeApi::new();
    let seeding = Instant::now();
    for i in 0..PVS {
        api.put_object(Kind::PersistentVolume, "", pv(&format!("pvc-{i:06}")));
    }
    for n in ["node-a", "node-b"] {
        api.put_object(Kind::Node, "", json!({ "metadata": { "name": n } }));
    }
    println!("seeded {PVS} PVs in {:.2?}", seeding.elapsed());

    // 1. The watches: the first list, then one change by another writer.
    let watch = KubeWatch::new(api.client(), DRIVER, Arc::new(SeededEntropy::from_seed(1)));
    let started = Instant::now();
    watch.start();
    loop {
        let changes = watch.changes().await;
        if changes.iter().any(|c| matches!(c, Change::Relisted { .. })) {
            break;
        }
    }
    while !watch.synced() {
        tokio::task::yield_now().await;
    }
    let reqs = api.requests();
    println!(
        "watch start: every kind listed in {:.2?} ({} LIST requests, {} objects)",
        started.elapsed(),
        reqs.iter()
            .filter(|(k, _)| k.starts_with("LIST "))
            .map(|(_, n)| n)
            .sum::<u64>(),
        api.listed_objects()
    );
    api.reset_requests();
    let (listed, events) = (api.listed_objects(), api.watch_events());
    let target = "pvc-054321";
    let moved = AttachmentRecord {
        volume_id: VolumeId::new(target).unwrap(),
        node_id: NodeId::new("node-b").unwrap(),
        attached_at: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        access_mode: AccessMode::SingleNode,
        readonly: false,
        migration: None,
        generation: 0,
    };
    let patch =
        json!({ "metadata": { "annotations": annotations_for(std::slice::from_ref(&moved)) } });
    let changed = Instant::now();
    let ans = api.handle_now(
        &http::Method::PATCH,
        &format!("/api/v1/persistentvolumes/{target}"),
        patch.to_string().as_bytes(),
    );
    assert!(ans.status.is_success(), "{}", ans.status);
    let seen = loop {
        let changes = watch.changes().await;
        if changes.iter().any(|c| {
            matches!(c, Change::Holders { volume, holders } if volume.as_str() == target && *holders == [moved.clone()])
        }) {
            break changed.elapsed();
        }
    };
    let reqs = api.requests();
    let lists: u64 = reqs
        .iter()
        .filter(|(k, _)| k.starts_with("LIST "))
        .map(|(_, n)| n)
        .sum();
    println!(
        "watch: another writer's change to 1 of {PVS} PVs seen after {seen:.2?}: {lists} LIST requests, {} objects listed, {} watch event(s) sent",
        api.listed_objects() - listed,
        api.watch_events() - events
    );
    assert_eq!(lists, 0, "the change must be seen without a list: {reqs:?}");

    // 2. What the periodic resync cost each time: a full list of the PVs.
    let (store, _) = adapters(
        api.client(),
        DRIVER,
        Arc::new(SystemClock),
        Arc::new(SeededEntropy::from_seed(2)),
        Backoff::API,
    );
    api.reset_requests();
    let listed = api.listed_objects();
    let resync = Instant::now();
    let records = store.load_all().await.expect("load_all");
    let took = resync.elapsed();
    assert!(records.contains(&moved));
    println!(
        "periodic resync (before watches, every 120 s): one full LIST took {took:.2?}: {} LIST requests, {} objects listed",
        api.requests()
            .get("LIST persistentvolumes")
            .copied()
            .unwrap_or(0),
        api.listed_objects() - listed
    );
    println!("load average: {}", load());
}
