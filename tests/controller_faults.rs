//! Controller behaviour under faults, in process over a real unix socket: a `/disk add`
//! whose reply is lost, deletes interrupted between the disk entry and its file, and
//! concurrent operations on one volume.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rds_csi::ports::rds::{Disk, DiskEntry, DiskSpec, PoolCapacity, Rds, RdsError};
use rds_csi::proto::csi::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest,
    DeleteVolumeRequest, VolumeCapability,
    controller_client::ControllerClient,
    volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode as CsiMode},
};
use rds_csi::routeros::command::CommandKind;
use rds_csi::routeros::emulator::faults::Fault;
use tonic::Code;
use tonic::transport::Channel;

fn create_req(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 2 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: CsiMode::SingleNodeWriter as i32,
            }),
        }],
        ..Default::default()
    }
}

/// Serves a controller over `rds` on a socket in `dir`; returns a client.
async fn serve(rds: Arc<dyn Rds>, dir: &std::path::Path) -> ControllerClient<Channel> {
    let plugin = common::controller_plugin(rds, dir).await;
    let (channel, _server) =
        common::serve_plugin(plugin, dir, std::future::pending(), Duration::from_secs(1)).await;
    ControllerClient::new(channel)
}

#[tokio::test]
async fn a_lost_disk_add_reply_leaves_exactly_one_disk_and_the_retry_gets_the_same_volume() {
    let dir = tempfile::tempdir().unwrap();
    let rds = rds_csi::routeros::in_memory_rds(1 << 40);
    let emulator = Arc::clone(rds.transport().emulator());
    // The RDS applies `/disk add` but the reply never arrives.
    emulator
        .faults()
        .push(CommandKind::DiskAdd, Fault::DropReply);
    let mut c = serve(rds, dir.path()).await;

    let first = c.create_volume(create_req("pvc-lost")).await;
    // The CO retries (the external-provisioner retries until success, with the same name).
    let retry = c
        .create_volume(create_req("pvc-lost"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    if let Ok(first) = first {
        assert_eq!(first.into_inner().volume.unwrap(), retry);
    }
    assert_eq!(retry.volume_id, "pvc-lost");
    assert_eq!(retry.capacity_bytes, 2 << 30);
    let slots: Vec<String> = emulator
        .disk_slots()
        .into_iter()
        .filter(|s| s != "pool")
        .collect();
    assert_eq!(
        slots,
        vec!["pvc-lost".to_string()],
        "exactly one disk for the name"
    );
    assert_eq!(
        emulator.file_names().len(),
        1,
        "{:?}",
        emulator.file_names()
    );
    // The fault was consumed: it really happened.
    assert_eq!(emulator.faults().take(CommandKind::DiskAdd), None);
}

#[tokio::test]
async fn a_delete_interrupted_before_the_file_removal_finishes_on_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let rds = rds_csi::routeros::in_memory_rds(1 << 40);
    let emulator = Arc::clone(rds.transport().emulator());
    let mut c = serve(rds, dir.path()).await;
    c.create_volume(create_req("pvc-del")).await.unwrap();
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: "pvc-del".into(),
            name: "snap-del".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    assert_eq!(
        emulator.file_names().len(),
        2,
        "{:?}",
        emulator.file_names()
    );

    // Each delete: the disk entry goes, then `/file remove` keeps failing (beyond the
    // adapter's own retries) until the CO's retry.
    let fail_file_removal = || {
        for _ in 0..10 {
            emulator.faults().push(
                CommandKind::FileRemove,
                Fault::Fail("failure: device busy".into()),
            );
        }
    };
    fail_file_removal();
    let del_snap = DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    };
    assert!(c.delete_snapshot(del_snap.clone()).await.is_err());
    assert!(
        !emulator.disk_slots().contains(&snap),
        "entry removed first"
    );
    emulator.faults().clear();
    c.delete_snapshot(del_snap).await.unwrap();

    fail_file_removal();
    let del_vol = DeleteVolumeRequest {
        volume_id: "pvc-del".into(),
        ..Default::default()
    };
    assert!(c.delete_volume(del_vol.clone()).await.is_err());
    emulator.faults().clear();
    c.delete_volume(del_vol).await.unwrap();

    assert!(
        emulator.file_names().is_empty(),
        "backing files leaked: {:?}",
        emulator.file_names()
    );
}

/// An RDS whose first look at one slot (`find_disk`) waits until released: an operation held
/// in flight.
struct Held {
    inner: Arc<dyn Rds>,
    slot: String,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Rds for Held {
    async fn ping(&self) -> Result<(), RdsError> {
        self.inner.ping().await
    }
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError> {
        self.inner.create_disk(spec).await
    }
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError> {
        self.inner.get_disk(slot).await
    }
    async fn find_disk(&self, slot: &str) -> Result<Option<DiskEntry>, RdsError> {
        if slot == self.slot {
            self.entered.notify_one();
            self.release.notified().await;
        }
        self.inner.find_disk(slot).await
    }
    async fn list_disks(&self, prefix: &str) -> Result<Vec<Disk>, RdsError> {
        self.inner.list_disks(prefix).await
    }
    async fn resize_disk(&self, slot: &str, size: u64) -> Result<Disk, RdsError> {
        self.inner.resize_disk(slot, size).await
    }
    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError> {
        self.inner.delete_disk(slot).await
    }
    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        self.inner.capacity().await
    }
    async fn set_allowed_host(&self, slot: &str, host: Option<&str>) -> Result<(), RdsError> {
        self.inner.set_allowed_host(slot, host).await
    }
}

#[tokio::test]
async fn a_second_operation_on_a_volume_in_flight_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let held = Arc::new(Held {
        inner: rds_csi::routeros::in_memory_rds(1 << 40),
        slot: "pvc-busy".into(),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let c = serve(held.clone(), dir.path()).await;
    let mut first_client = c.clone();
    let first =
        tokio::spawn(async move { first_client.create_volume(create_req("pvc-busy")).await });
    held.entered.notified().await;

    let mut c2 = c.clone();
    let err = c2.create_volume(create_req("pvc-busy")).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(err.message().contains("pvc-busy"), "{err}");
    let err = c2
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-busy".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    // Other volumes never wait on this one.
    c2.create_volume(create_req("pvc-free")).await.unwrap();

    held.release.notify_one();
    first.await.unwrap().unwrap();
    // Once the first ended, the same call succeeds (the held slot is released every time).
    let again = tokio::spawn(async move { c2.create_volume(create_req("pvc-busy")).await });
    held.entered.notified().await;
    held.release.notify_one();
    again.await.unwrap().unwrap();
}
