//! Attachment manager benchmarks (release build, prints figures; no assertions on time).
//!
//! `cargo bench --bench attachment` (or `cargo run --release --bench attachment`):
//! 1. rebuild from 100,000 PVs on the in-process simulated API server: time and peak RSS
//!    (VmHWM) — targets < 1 s, < 150 MiB;
//! 2. API requests per publish and per unpublish without conflicts — target 1 each;
//! 3. lock-table entries retained after 1,000,000 distinct volumes were published and
//!    unpublished — target 0;
//! 4. publish throughput, 64 concurrent callers on distinct volumes, API latency fixed at
//!    5 ms — against the limit 64 / 5 ms = 12,800 publishes/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rds_csi::attachment::{AttachmentConfig, AttachmentManager, PublishArgs, UnpublishArgs};
use rds_csi::backend::{local_cluster::LocalCluster, mem_store::MemStore};
use rds_csi::kube::adapters;
use rds_csi::kube::fake_api::{FakeApi, Kind};
use rds_csi::ports::Rds;
use rds_csi::ports::rds::{Disk, DiskSpec, NvmeExport, PoolCapacity, RdsError};
use rds_csi::ports::time::{SeededEntropy, SystemClock};
use rds_csi::retry::Backoff;
use rds_csi::types::{AccessMode, NodeId, VolumeId};
use serde_json::json;

const DRIVER: &str = "rds.csi.srvlab.io";

/// An RDS where every slot is an exported disk, answering instantly: the benchmarks
/// measure the attachment path, not RouterOS.
struct AnyDisk;

#[async_trait]
impl Rds for AnyDisk {
    async fn ping(&self) -> Result<(), RdsError> {
        Ok(())
    }
    async fn create_disk(&self, _: &DiskSpec) -> Result<Disk, RdsError> {
        Err(RdsError::Rejected("read-only bench RDS".into()))
    }
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError> {
        Ok(Some(Disk {
            slot: slot.to_string(),
            file_path: format!("/pool/volumes/{slot}.img"),
            size_bytes: 1 << 30,
            export: Some(NvmeExport {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
            }),
            allowed_host_nqn: None,
            created_unix: None,
            comment: None,
        }))
    }
    async fn list_disks(&self, _: &str) -> Result<Vec<Disk>, RdsError> {
        Ok(Vec::new())
    }
    async fn resize_disk(&self, _: &str, _: u64) -> Result<Disk, RdsError> {
        Err(RdsError::Rejected("read-only bench RDS".into()))
    }
    async fn delete_disk(&self, _: &str) -> Result<(), RdsError> {
        Ok(())
    }
    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        Ok(PoolCapacity {
            size_bytes: 1 << 40,
            free_bytes: 1 << 40,
        })
    }
    async fn set_allowed_host(&self, _: &str, _: Option<&str>) -> Result<(), RdsError> {
        Ok(())
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pv(name: &str, attached_to: Option<&str>) -> serde_json::Value {
    let ann = match attached_to {
        Some(node) => json!({
            "rds.csi.srvlab.io/attached-node": node,
            "rds.csi.srvlab.io/attached-at": "2025-10-09T08:53:20.123456Z",
        }),
        None => json!({}),
    };
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name, "annotations": ann },
        "spec": {
            "capacity": { "storage": "10Gi" },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "rds-nvme",
            "csi": { "driver": DRIVER, "volumeHandle": name, "fsType": "ext4" },
        },
        "status": { "phase": "Bound" },
    })
}

fn node(name: &str) -> serde_json::Value {
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name,
        "annotations": { "rds.csi.srvlab.io/host-nqn": format!("nqn.2014-08.org.nvmexpress:uuid:{name}") } } })
}

fn va(pv: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
        "metadata": { "name": format!("csi-{pv}") },
        "spec": { "attacher": DRIVER, "nodeName": node, "source": { "persistentVolumeName": pv } },
        "status": { "attached": true },
    })
}

fn kube_manager(api: &FakeApi, cfg: AttachmentConfig) -> AttachmentManager {
    let (store, cluster) = adapters(
        api.client(),
        DRIVER,
        Arc::new(SystemClock),
        Arc::new(SeededEntropy::from_seed(7)),
        Backoff::API,
    );
    AttachmentManager::new(
        Arc::new(AnyDisk),
        store,
        cluster,
        Arc::new(SystemClock),
        cfg,
    )
}

fn publish_args(v: &str, n: &str) -> PublishArgs {
    PublishArgs {
        volume_id: VolumeId::new(v).expect("valid"),
        node_id: NodeId::new(n).expect("valid"),
        access_mode: AccessMode::SingleNode,
        readonly: false,
        block: false,
        fs_type: Some("ext4".into()),
        nvme_address: Some("10.0.0.5".into()),
        migration_timeout: rds_csi::attachment::migration::DEFAULT_TIMEOUT,
    }
}

fn unpublish_args(v: &str, n: &str) -> UnpublishArgs {
    UnpublishArgs {
        volume_id: VolumeId::new(v).expect("valid"),
        node_id: Some(NodeId::new(n).expect("valid")),
    }
}

async fn rebuild_100k() {
    const PVS: usize = 100_000;
    let api = FakeApi::new();
    for n in 0..16 {
        api.put_object(Kind::Node, "", node(&format!("node-{n}")));
    }
    for i in 0..PVS {
        let name = format!("pvc-{i:08}");
        // A third attached (with its VolumeAttachment), the rest idle.
        let attached = (i % 3 == 0).then(|| format!("node-{}", i % 16));
        api.put_object(Kind::PersistentVolume, "", pv(&name, attached.as_deref()));
        if let Some(n) = &attached {
            api.put_object(Kind::VolumeAttachment, "", va(&name, n));
        }
    }
    let rss_before = status_kib("VmRSS:");
    let hwm_before = status_kib("VmHWM:");
    let m = kube_manager(&api, AttachmentConfig::default());
    api.reset_requests();
    let t = Instant::now();
    let report = m.rebuild().await.expect("rebuild");
    let elapsed = t.elapsed();
    let hwm = status_kib("VmHWM:");
    println!(
        "rebuild: {PVS} PVs ({} attached) in {:.3} s; requests {:?}",
        report.kept,
        elapsed.as_secs_f64(),
        api.requests()
    );
    println!(
        "rebuild: peak RSS (VmHWM) {:.1} MiB for the whole process, fake API server and its \
         {PVS} PVs included (RSS before rebuild {:.1} MiB, peak before {:.1} MiB) [target < 1 s, < 150 MiB]",
        hwm as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        hwm_before as f64 / 1024.0
    );
}

async fn requests_per_operation() {
    const VOLUMES: usize = 1_000;
    let api = FakeApi::new();
    api.put_object(Kind::Node, "", node("node-a"));
    for i in 0..VOLUMES {
        api.put_object(Kind::PersistentVolume, "", pv(&format!("pvc-{i:05}"), None));
    }
    for fence in [false, true] {
        let m = kube_manager(
            &api,
            AttachmentConfig {
                data_path_fence: fence,
                ..Default::default()
            },
        );
        m.rebuild().await.expect("rebuild");
        api.reset_requests();
        m.publish(&publish_args("pvc-00000", "node-a"))
            .await
            .expect("publish");
        let first = api.request_count();
        api.reset_requests();
        for i in 1..VOLUMES {
            m.publish(&publish_args(&format!("pvc-{i:05}"), "node-a"))
                .await
                .expect("publish");
        }
        let publishes = api.request_count();
        let publish_reqs = api.requests();
        api.reset_requests();
        for i in 0..VOLUMES {
            m.unpublish(&unpublish_args(&format!("pvc-{i:05}"), "node-a"))
                .await
                .expect("unpublish");
        }
        let unpublishes = api.request_count();
        println!(
            "requests (fence {}): first publish on a node {first} (GET Node + PATCH PV); \
             then {:.3} per publish {:?}; {:.3} per unpublish [target 1 each]",
            if fence { "on" } else { "off" },
            publishes as f64 / (VOLUMES - 1) as f64,
            publish_reqs,
            unpublishes as f64 / VOLUMES as f64,
        );
    }
}

async fn lock_table_after_1m() {
    const VOLUMES: usize = 1_000_000;
    const CALLERS: usize = 64;
    let store = Arc::new(MemStore::new());
    let cluster = Arc::new(LocalCluster::new(
        (0..8).map(|n| NodeId::new(format!("node-{n}")).expect("valid")),
    ));
    let m = Arc::new(AttachmentManager::new(
        Arc::new(AnyDisk),
        store.clone(),
        cluster,
        Arc::new(SystemClock),
        AttachmentConfig::default(),
    ));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let m = Arc::clone(&m);
        tasks.push(tokio::spawn(async move {
            let mut peak = 0;
            for i in (c..VOLUMES).step_by(CALLERS) {
                let v = format!("pvc-{i:08}");
                let n = format!("node-{}", i % 8);
                m.publish(&publish_args(&v, &n)).await.expect("publish");
                m.unpublish(&unpublish_args(&v, &n))
                    .await
                    .expect("unpublish");
                if i % 4096 == 0 {
                    peak = peak.max(m.lock_entries());
                }
            }
            peak
        }));
    }
    let mut peak = 0;
    for t in tasks {
        peak = peak.max(t.await.expect("task"));
    }
    println!(
        "lock table: {} entries retained after {VOLUMES} distinct volumes published and \
         unpublished by {CALLERS} callers (sampled peak while running {peak}); {} attachments \
         and {} store records left; {:.2} s [target 0]",
        m.lock_entries(),
        m.list().len(),
        store.len(),
        t.elapsed().as_secs_f64()
    );
}

async fn throughput_64() {
    const CALLERS: usize = 64;
    const PER_CALLER: usize = 40;
    const LATENCY: Duration = Duration::from_millis(5);
    let api = FakeApi::new();
    api.put_object(Kind::Node, "", node("node-a"));
    for i in 0..CALLERS * PER_CALLER + 1 {
        api.put_object(Kind::PersistentVolume, "", pv(&format!("pvc-{i:05}"), None));
    }
    let m = Arc::new(kube_manager(&api, AttachmentConfig::default()));
    m.rebuild().await.expect("rebuild");
    // Warm the node cache (one GET Node), as a running controller has.
    m.publish(&publish_args(
        &format!("pvc-{:05}", CALLERS * PER_CALLER),
        "node-a",
    ))
    .await
    .expect("publish");
    api.set_latency(LATENCY);
    api.reset_requests();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let m = Arc::clone(&m);
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_CALLER {
                let v = format!("pvc-{:05}", c * PER_CALLER + k);
                m.publish(&publish_args(&v, "node-a"))
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = t.elapsed().as_secs_f64();
    let n = (CALLERS * PER_CALLER) as f64;
    let limit = CALLERS as f64 / LATENCY.as_secs_f64();
    println!(
        "throughput: {n} publishes by {CALLERS} callers on distinct volumes, API latency {} ms: \
         {:.0} publishes/s = {:.0}% of the limit {limit:.0}/s (64 / 5 ms); {} API requests",
        LATENCY.as_millis(),
        n / elapsed,
        100.0 * n / elapsed / limit,
        api.request_count()
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // First, so its peak RSS is not masked by the others.
        rebuild_100k().await;
        requests_per_operation().await;
        lock_table_after_1m().await;
        throughput_64().await;
    });
}
