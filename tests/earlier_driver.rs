//! Drop-in for the earlier Go driver: an RDS and a cluster in the state that driver left
//! them (its `/disk add` command lines, replayed into the emulator; its StorageClass
//! parameters, volume contexts and PV annotations), then this driver's CSI calls on them
//! over a unix socket: rebuild, publish (fenced, and the live migration of a VM disk),
//! stage, expand, snapshot, clone, restore from the old driver's snapshot, list, delete.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rds_csi::compose::{Kernel, Seams, build};
use rds_csi::kube::fake_api::{FakeApi, Kind};
use rds_csi::node::fake::FakeKernel;
use rds_csi::ports::time::{SeededEntropy, SystemClock};
use rds_csi::proto::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerGetVolumeRequest,
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest, CreateSnapshotRequest,
    CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest, ListSnapshotsRequest,
    NodeStageVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability, VolumeContentSource,
    controller_client::ControllerClient,
    node_client::NodeClient,
    volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode},
    volume_content_source::{SnapshotSource, Type, VolumeSource},
};
use rds_csi::routeros::emulator::{Emulator, PoolConfig};
use rds_csi::routeros::transport::inproc::InProcess;
use rds_csi::routeros::{RdsLayout, RouterOsRds};
use rds_csi::settings::{KubeAccess, Settings};
use rds_csi::types::{Mode as PluginMode, NodeId};
use serde_json::{Value, json};
use tonic::Code;

const DRIVER: &str = "rds.csi.srvlab.io";
/// The earlier driver's default volume path.
const BASE: &str = "storage-pool/metal-csi";
const PREFIX: &str = "nqn.2000-02.com.mikrotik:";
const DISK: &str = "pvc-0f3c9a52-6b1e-4d7a-9c1e-2b5d8e7f6a10";
const VM: &str = "pvc-7d2e4b61-3a9c-4f8e-b1d2-6c5e4a3b2f19";
const SNAP: &str = "snap-0f3c9a52-6b1e-4d7a-9c1e-2b5d8e7f6a10-at-1739800000";

/// The `/disk add` line the earlier driver sent for a volume (its layout: file
/// `<volumePath>/<id>.img`, size in whole GiB, NQN `<prefix><id>`, no comment).
fn go_create(id: &str, gib: u64) -> String {
    format!(
        "/disk add type=file file-path=/{BASE}/{id}.img file-size={gib}G slot={id} \
         nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn={PREFIX}{id}"
    )
}

/// Its snapshot: a `copy-from` copy, not exported, named `snap-<uuid>-at-<unix seconds>`.
fn go_snapshot(source: &str, id: &str) -> String {
    format!(
        "/disk add type=file copy-from=[find slot={source}] file-path=/{BASE}/{id}.img slot={id}"
    )
}

/// The StorageClass parameters of the earlier driver's chart, as the provisioner sends them.
fn go_parameters() -> HashMap<String, String> {
    [
        ("rdsAddress", "10.42.0.1"),
        ("nvmeAddress", "10.42.0.1"),
        ("nvmePort", "4420"),
        ("volumePath", "/storage-pool/metal-csi"),
        ("fsType", "ext4"),
        ("ctrlLossTmo", "-1"),
        ("reconnectDelay", "5"),
        ("keepAliveTmo", "0"),
        ("migrationTimeoutSeconds", "600"),
        ("sshPort", "22"),
        ("nqnPrefix", "nqn.2000-02.com.mikrotik"),
        ("csi.storage.k8s.io/pvc/name", "data"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The volume context the earlier driver returned (and the PV keeps): `volumePath` is the
/// file, and `keepAliveTmo=0` its "kernel default".
fn go_context(id: &str) -> HashMap<String, String> {
    [
        ("rdsAddress", "10.42.0.1".to_string()),
        ("nvmeAddress", "10.42.0.1".to_string()),
        ("nvmePort", "4420".to_string()),
        ("nqn", format!("{PREFIX}{id}")),
        ("volumePath", format!("/{BASE}/{id}.img")),
        ("ctrlLossTmo", "-1".to_string()),
        ("reconnectDelay", "5".to_string()),
        ("keepAliveTmo", "0".to_string()),
        ("migrationTimeoutSeconds", "300".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

fn vm_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn host_nqn(node: &str) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:{node}")
}

fn pv(id: &str, modes: &[&str], block: bool, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": id, "annotations": annotations },
        "spec": {
            "capacity": { "storage": "2Gi" },
            "accessModes": modes,
            "volumeMode": if block { "Block" } else { "Filesystem" },
            "claimRef": { "kind": "PersistentVolumeClaim", "namespace": "vms", "name": format!("claim-{id}") },
            "csi": { "driver": DRIVER, "volumeHandle": id, "volumeAttributes": go_context(id) },
        },
    })
}

fn va(id: &str, node: &str) -> Value {
    let name = rds_csi::kube::cluster::volume_attachment_name(
        &rds_csi::types::VolumeId::new(id).unwrap(),
        DRIVER,
        &NodeId::new(node).unwrap(),
    );
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
        "metadata": { "name": name },
        "spec": { "attacher": DRIVER, "nodeName": node, "source": { "persistentVolumeName": id } },
        "status": { "attached": true },
    })
}

fn settings(mode: PluginMode, node: &str, dir: &std::path::Path) -> Settings {
    let mut s = Settings::embedded(NodeId::new(node).unwrap(), mode, dir.join(node));
    s.rds.layout = RdsLayout {
        volume_base_path: BASE.into(),
        pool_mount_point: "storage-pool".into(),
    };
    s.controller.expected.volume_path = Some(BASE.into());
    s.controller.expected.rds_address = Some("10.42.0.1".into());
    s.controller.nvme_address = "10.42.0.1".into();
    // The Kubernetes client comes through the seams; nothing is read from the machine.
    s.kube.access = KubeAccess::Off;
    s
}

fn seams(api: &FakeApi) -> Seams {
    let mut s = Seams::with(
        Arc::new(SystemClock),
        Arc::new(SeededEntropy::from_seed(13)),
    );
    s.kube = Some(api.client());
    s
}

#[tokio::test]
async fn a_cluster_the_earlier_driver_ran_is_served_as_it_stands() {
    let dir = tempfile::tempdir().unwrap();
    // The RDS as the earlier driver left it.
    let emulator = Arc::new(Emulator::in_memory(
        PoolConfig {
            slot: "raid1".into(),
            mount_point: "storage-pool".into(),
            size_bytes: 1 << 40,
        },
        Arc::new(SystemClock),
    ));
    for line in [
        go_create(DISK, 2),
        go_create(VM, 4),
        go_snapshot(DISK, SNAP),
    ] {
        match emulator.execute(&line).await {
            rds_csi::routeros::emulator::Outcome::Reply(r) => assert!(r.ok, "{line}: {}", r.output),
            other => panic!("{line}: {other:?}"),
        }
    }
    // The cluster: two nodes (host NQNs published), the disk attached to node-a by the
    // earlier driver (its two annotations, its VolumeAttachment), the VM disk idle.
    let api = FakeApi::new();
    for n in ["node-a", "node-b", "node-c"] {
        api.put_object(
            Kind::Node,
            "",
            json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": n,
                "annotations": { "rds.csi.srvlab.io/host-nqn": host_nqn(n) } } }),
        );
    }
    api.put_object(
        Kind::PersistentVolume,
        "",
        pv(
            DISK,
            &["ReadWriteOnce"],
            false,
            json!({
                "rds.csi.srvlab.io/attached-node": "node-a",
                "rds.csi.srvlab.io/attached-at": "2026-02-17T13:46:40.123456Z",
            }),
        ),
    );
    api.put_object(Kind::VolumeAttachment, "", va(DISK, "node-a"));
    api.put_object(
        Kind::PersistentVolume,
        "",
        pv(VM, &["ReadWriteMany"], true, json!({})),
    );

    // This driver's controller replaces it: rebuilt from the annotations at start-up.
    let rds = RouterOsRds::new(
        InProcess::new(Arc::clone(&emulator)),
        &settings(PluginMode::Controller, "ctl", dir.path())
            .rds
            .layout,
        rds_csi::retry::Backoff::API,
        Arc::new(SeededEntropy::from_seed(3)),
    )
    .unwrap();
    let mut s = seams(&api);
    s.rds = Some(Arc::new(rds));
    let controller = build(&settings(PluginMode::Controller, "ctl", dir.path()), s).unwrap();
    controller.start().await.unwrap();
    let cdir = dir.path().join("c");
    std::fs::create_dir_all(&cdir).unwrap();
    let (channel, _server) = common::serve_plugin(
        controller,
        &cdir,
        std::future::pending(),
        Duration::from_secs(1),
    )
    .await;
    let mut c = ControllerClient::new(channel);
    // The start-up sweep fenced the old driver's open export to its holder.
    assert_eq!(
        emulator.exports()[DISK].allow_host.as_deref(),
        Some(host_nqn("node-a").as_str())
    );

    // The provisioner repeats a CreateVolume with the old StorageClass: the same volume.
    let created = c
        .create_volume(CreateVolumeRequest {
            name: DISK.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: go_parameters(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(created.capacity_bytes, 2 << 30);
    assert_eq!(created.volume_context["nqn"], format!("{PREFIX}{DISK}"));
    // Its volume_context is the one every RPC answers for it, read from the RDS: a volume
    // the earlier driver made has no note of ours, so the StorageClass' tunables and
    // migrationTimeoutSeconds are not in it (the PV keeps the context the earlier driver
    // wrote, which is what ControllerPublish and NodeStage read).
    assert!(
        !created
            .volume_context
            .contains_key("migrationTimeoutSeconds"),
        "{:?}",
        created.volume_context
    );
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: DISK.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.volume_context, created.volume_context);

    // The attachment the old driver recorded holds: a repeat is OK, another node is fenced.
    let publish = |vol: &str, node: &str, cap: VolumeCapability| ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        volume_context: go_context(vol),
        ..Default::default()
    };
    let published = c
        .controller_publish_volume(publish(DISK, "node-a", mount_cap()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let err = c
        .controller_publish_volume(publish(DISK, "node-b", mount_cap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // node-a's plugin stages it from the old PV's volume context.
    let kernel = FakeKernel::new(PREFIX, &host_nqn("node-a"));
    kernel.add_disk(&format!("{PREFIX}{DISK}"), 2 << 30);
    let mut ns = seams(&api);
    ns.kernel = Some(Kernel {
        initiator: Arc::new(kernel.clone()),
        mounter: Arc::new(kernel.clone()),
    });
    let node = build(&settings(PluginMode::Node, "node-a", dir.path()), ns).unwrap();
    node.start().await.unwrap();
    let ndir = dir.path().join("n");
    std::fs::create_dir_all(&ndir).unwrap();
    let (nchannel, _nserver) =
        common::serve_plugin(node, &ndir, std::future::pending(), Duration::from_secs(1)).await;
    let mut n = NodeClient::new(nchannel);
    let staging = dir.path().join("staging").display().to_string();
    n.node_stage_volume(NodeStageVolumeRequest {
        volume_id: DISK.into(),
        publish_context: published,
        staging_target_path: staging.clone(),
        volume_capability: Some(mount_cap()),
        volume_context: go_context(DISK),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        kernel
            .mount_table()
            .iter()
            .any(|m| m.target.display().to_string() == staging),
        "{:?}",
        kernel.mount_table()
    );

    // Expand, snapshot and clone the old volume.
    let grown = c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: DISK.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 3 << 30,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (grown.capacity_bytes, grown.node_expansion_required),
        (3 << 30, true)
    );
    assert_eq!(emulator.disk_size(DISK), Some(3 << 30));
    let ours = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: DISK.into(),
            name: "snapshot-new".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let clone = |name: &str, source: Type| CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![mount_cap()],
        parameters: go_parameters(),
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(source),
        }),
        ..Default::default()
    };
    c.create_volume(clone(
        "pvc-clone",
        Type::Volume(VolumeSource {
            volume_id: DISK.into(),
        }),
    ))
    .await
    .unwrap();

    // The old driver's snapshot: listed (by id and by source), restored from, deleted.
    let listed = c
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: DISK.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // (The creation time is the file's, as for ours; the id's seconds only without it.)
    let snaps: Vec<(String, String, bool)> = listed
        .entries
        .iter()
        .map(|e| {
            let s = e.snapshot.clone().unwrap();
            (
                s.snapshot_id,
                s.source_volume_id,
                s.creation_time.unwrap().seconds > 0,
            )
        })
        .collect();
    assert!(
        snaps.contains(&(SNAP.to_string(), DISK.to_string(), true)),
        "{snaps:?}"
    );
    assert!(snaps.iter().any(|s| s.0 == ours.snapshot_id), "{snaps:?}");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let by_id = c
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: SNAP.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let restored = c
        .create_volume(clone(
            "pvc-restored",
            Type::Snapshot(SnapshotSource {
                snapshot_id: SNAP.into(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 2 << 30, "the snapshot's size");
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: SNAP.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!emulator.disk_slots().contains(&SNAP.to_string()));
    assert!(
        !emulator.file_names().iter().any(|f| f.contains(SNAP)),
        "{:?}",
        emulator.file_names()
    );

    // The VM disk the old driver made migrates live between two nodes; a third waits.
    // (The attach/detach controller makes each VolumeAttachment before the attacher calls.)
    for n in ["node-a", "node-b", "node-c"] {
        api.put_object(Kind::VolumeAttachment, "", va(VM, n));
    }
    c.controller_publish_volume(publish(VM, "node-a", vm_cap()))
        .await
        .unwrap();
    c.controller_publish_volume(publish(VM, "node-b", vm_cap()))
        .await
        .unwrap();
    let err = c
        .controller_publish_volume(publish(VM, "node-c", vm_cap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("node-a") && err.message().contains("node-b"),
        "{err:?}"
    );
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: VM.into(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let reasons: Vec<String> = api
        .objects(Kind::Event)
        .iter()
        .filter_map(|e| {
            e.pointer("/reason")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert!(
        reasons.contains(&"MigrationStarted".to_string()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"MigrationCompleted".to_string()),
        "{reasons:?}"
    );

    // Tear the old volume down and delete it: disk and file gone.
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: DISK.into(),
        staging_target_path: staging,
    })
    .await
    .unwrap();
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: DISK.into(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    api.remove_object(
        Kind::VolumeAttachment,
        "",
        va(DISK, "node-a")["metadata"]["name"].as_str().unwrap(),
    );
    c.delete_volume(DeleteVolumeRequest {
        volume_id: DISK.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!emulator.disk_slots().contains(&DISK.to_string()));
    assert!(
        !emulator
            .file_names()
            .iter()
            .any(|f| f.contains(DISK) && !f.contains("snap"))
    );
}
