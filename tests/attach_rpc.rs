//! ControllerPublishVolume / ControllerUnpublishVolume through the real plugin binary on a
//! unix socket (embedded backend: file attachment store, this one node), including a
//! `kill -9` and restarts in between.

mod common;

use std::sync::Arc;

use common::Plugin;
use rds_csi::ports::rds::{DiskSpec, NvmeExport};
use rds_csi::ports::time::{SeededEntropy, SystemClock};
use rds_csi::proto::csi::{
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest, VolumeCapability,
    controller_client::ControllerClient,
    volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
};
use tonic::Code;

fn publish(volume: &str, node: &str, readonly: bool) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        readonly,
        volume_capability: Some(VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })),
        }),
        volume_context: [("nvmeAddress".to_string(), "192.0.2.10".to_string())].into(),
        ..Default::default()
    }
}

fn unpublish(volume: &str, node: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn publish_is_durable_across_kill_nine_and_an_acknowledged_unpublish_stays_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("csi.sock"), dir.path().join("state"));
    {
        // The volume exists on the embedded RDS before the plugin starts.
        let rds = rds_csi::compose::embedded_rds(
            &state,
            Arc::new(SystemClock),
            Arc::new(SeededEntropy::from_seed(1)),
        )
        .unwrap();
        rds.create_disk(&DiskSpec {
            slot: "pvc-rpc".into(),
            size_bytes: 1 << 30,
            export: Some(NvmeExport {
                port: 4420,
                nqn: "nqn.2000-02.com.mikrotik:pvc-rpc".into(),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        })
        .await
        .unwrap();
    }

    let mut plugin = Plugin::start(&socket, &state, &[]);
    let mut c = ControllerClient::new(plugin.channel().await);
    let ctx = c
        .controller_publish_volume(publish("pvc-rpc", "test-node", false))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(
        ctx.get("nqn").map(String::as_str),
        Some("nqn.2000-02.com.mikrotik:pvc-rpc")
    );
    assert_eq!(ctx.get("nvmePort").map(String::as_str), Some("4420"));
    assert_eq!(
        ctx.get("nvmeAddress").map(String::as_str),
        Some("192.0.2.10")
    );
    assert_eq!(ctx.get("fsType").map(String::as_str), Some("ext4"));
    for _ in 0..3 {
        let again = c
            .controller_publish_volume(publish("pvc-rpc", "test-node", false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(again, ctx);
    }
    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<_>| ()).unwrap_err().code()
    };
    assert_eq!(
        code(
            c.controller_publish_volume(publish("pvc-nope", "test-node", false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish("pvc-rpc", "other-node", false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish("", "test-node", false))
                .await
        ),
        Code::InvalidArgument
    );

    // kill -9: the acknowledged publish survives.
    plugin.signal("KILL");
    let _ = plugin.child.wait();
    drop(plugin);
    let plugin = Plugin::start(&socket, &state, &[]);
    let mut c = ControllerClient::new(plugin.channel().await);
    assert_eq!(
        code(
            c.controller_publish_volume(publish("pvc-rpc", "test-node", true))
                .await
        ),
        Code::AlreadyExists,
        "the attachment (readonly=false) was rebuilt"
    );
    c.controller_unpublish_volume(unpublish("pvc-rpc", "test-node"))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish("pvc-rpc", "test-node"))
        .await
        .unwrap();
    drop(c);
    drop(plugin);

    // Restart: the acknowledged unpublish is not resurrected.
    let plugin = Plugin::start(&socket, &state, &[]);
    let mut c = ControllerClient::new(plugin.channel().await);
    c.controller_publish_volume(publish("pvc-rpc", "test-node", true))
        .await
        .expect("free again: publish with another readonly flag succeeds");
}

/// The embedded RDS on `state` (the plugin must not be running).
fn rds_at(state: &std::path::Path) -> Arc<dyn rds_csi::ports::Rds> {
    rds_csi::compose::embedded_rds(
        state,
        Arc::new(SystemClock),
        Arc::new(SeededEntropy::from_seed(1)),
    )
    .unwrap()
}

#[tokio::test]
async fn data_path_fence_on_the_embedded_default_uses_the_host_nqn_the_node_published() {
    // `--mode all` (the default): the node publishes its host NQN into the cluster the
    // controller reads, so the fence needs no annotation by hand.
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("csi.sock"), dir.path().join("state"));
    rds_at(&state)
        .create_disk(&DiskSpec {
            slot: "pvc-fence".into(),
            size_bytes: 1 << 30,
            export: Some(NvmeExport {
                port: 4420,
                nqn: "nqn.2000-02.com.mikrotik:pvc-fence".into(),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        })
        .await
        .unwrap();
    let host_nqn = "nqn.2014-08.io.srvlab.rds-csi:embedded:test-node";

    let mut plugin = Plugin::start(&socket, &state, &["--data-path-fence"]);
    assert!(
        plugin.log.iter().any(|l| l.contains("host NQN published")),
        "log:\n{}",
        plugin.log.join("")
    );
    let mut c = ControllerClient::new(plugin.channel().await);
    c.controller_publish_volume(publish("pvc-fence", "test-node", false))
        .await
        .expect("publish with the fence on");
    drop(c);
    // The RDS state is durable once the RPC answered; read it with the plugin gone.
    plugin.signal("KILL");
    let _ = plugin.child.wait();
    drop(plugin);
    let disk = rds_at(&state).get_disk("pvc-fence").await.unwrap().unwrap();
    assert_eq!(disk.allowed_host_nqn.as_deref(), Some(host_nqn));

    let mut plugin = Plugin::start(&socket, &state, &["--data-path-fence"]);
    let mut c = ControllerClient::new(plugin.channel().await);
    c.controller_unpublish_volume(unpublish("pvc-fence", "test-node"))
        .await
        .unwrap();
    drop(c);
    // The RDS state is durable once the RPC answered; read it with the plugin gone.
    plugin.signal("KILL");
    let _ = plugin.child.wait();
    drop(plugin);
    let disk = rds_at(&state).get_disk("pvc-fence").await.unwrap().unwrap();
    assert_eq!(
        disk.allowed_host_nqn.as_deref(),
        Some("nqn.2014-08.io.srvlab.rds-csi:parked:pvc-fence"),
        "parked: no host is admitted once unpublished"
    );
}

#[tokio::test]
async fn start_up_parks_volumes_made_before_the_fence_and_switching_it_off_warns() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("csi.sock"), dir.path().join("state"));
    // A volume made before the fence existed: its export admits any host.
    rds_at(&state)
        .create_disk(&DiskSpec {
            slot: "pvc-old".into(),
            size_bytes: 1 << 30,
            export: Some(NvmeExport {
                port: 4420,
                nqn: "nqn.2000-02.com.mikrotik:pvc-old".into(),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        })
        .await
        .unwrap();
    let allowed = || async {
        rds_at(&state)
            .get_disk("pvc-old")
            .await
            .unwrap()
            .unwrap()
            .allowed_host_nqn
    };
    // The default fences: parked before the socket serves.
    let mut plugin = Plugin::start(&socket, &state, &[]);
    assert!(
        !plugin
            .log
            .iter()
            .any(|l| l.contains("data-path fence is OFF")),
        "log:\n{}",
        plugin.log.join("")
    );
    plugin.signal("KILL");
    let _ = plugin.child.wait();
    drop(plugin);
    assert_eq!(
        allowed().await.as_deref(),
        Some("nqn.2014-08.io.srvlab.rds-csi:parked:pvc-old")
    );
    // Switched off: a warning at start-up, and the export opened again.
    let mut plugin = Plugin::spawn(&socket, &state, &["--data-path-fence=false"]);
    plugin.wait_for_log("data-path fence is OFF");
    plugin.wait_for_log("serving");
    plugin.signal("KILL");
    let _ = plugin.child.wait();
    drop(plugin);
    assert_eq!(allowed().await, None);
}
