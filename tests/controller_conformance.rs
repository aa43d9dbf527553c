//! CSI conformance of the Controller service: the plugin on its embedded backend, served
//! on a real unix socket and driven by a tonic client. Covers every row of the error-code
//! table a conformance suite checks, every controller RPC, and repeats every successful
//! call ten times (the spec: "all of the following RPCs MUST be idempotent").

mod common;

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser;
use rds_csi::cli::Cli;
use rds_csi::proto::csi::{
    self, CapacityRange, ControllerExpandVolumeRequest, ControllerGetCapabilitiesRequest,
    ControllerGetVolumeRequest, ControllerModifyVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest,
    DeleteSnapshotRequest, DeleteVolumeRequest, GetCapacityRequest, GetSnapshotRequest,
    ListSnapshotsRequest, ListVolumesRequest, ValidateVolumeCapabilitiesRequest, VolumeCapability,
    VolumeContentSource,
    controller_client::ControllerClient,
    controller_service_capability,
    volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode},
    volume_content_source,
};
use tonic::Code;
use tonic::transport::Channel;

const GIB: i64 = 1 << 30;
const NODE: &str = "test-node";

type Client = ControllerClient<Channel>;

struct Fixture {
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    c: Client,
}

/// The plugin as `rds-csi-plugin ARGS` builds it (embedded backend, node id `test-node`),
/// served in this process on a unix socket in a temporary directory.
async fn start(args: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let state = dir.path().join("state").display().to_string();
    let mut argv = vec![
        "rds-csi-plugin",
        "--endpoint",
        &endpoint,
        "--state-dir",
        &state,
    ];
    // A controller alone on the embedded backend has no node plugin to publish host NQNs,
    // which the data-path fence needs: these rows check the CSI contract without it.
    argv.extend([
        "--node-id",
        NODE,
        "--mode",
        "controller",
        "--data-path-fence=false",
    ]);
    argv.extend(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    let settings = cli.settings_in(false).unwrap();
    let plugin = rds_csi::compose::build(&settings, rds_csi::compose::Seams::os()).unwrap();
    plugin.start().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let (channel, _server) =
        common::serve_plugin(plugin, dir.path(), stopped, Duration::from_secs(5)).await;
    let c = ControllerClient::new(channel);
    Fixture {
        _dir: dir,
        _stop: stop,
        c,
    }
}

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn create_req(name: &str, required: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

fn publish_req(volume: &str, node: &str, readonly: bool) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        readonly,
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// Calls `f` ten times; every answer must equal the first.
macro_rules! ten_times {
    ($f:expr) => {{
        let first = $f.await.expect("first call").into_inner();
        for i in 1..10 {
            let again = $f
                .await
                .unwrap_or_else(|e| panic!("repeat {i}: {e}"))
                .into_inner();
            assert_eq!(again, first, "repeat {i} answered differently");
        }
        first
    }};
}

#[tokio::test]
async fn volume_lifecycle_is_idempotent_ten_times_over() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let caps = ten_times!(c.controller_get_capabilities(ControllerGetCapabilitiesRequest {}));
    assert!(caps.capabilities.len() >= 10);

    let one_and_half = GIB + GIB / 2;
    let vol = ten_times!(c.create_volume(create_req("pvc-life", one_and_half)))
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "pvc-life");
    // Exact size: the earlier driver turned 1.5 GiB into 1 GiB.
    assert_eq!(vol.capacity_bytes, one_and_half);
    let ctx = &vol.volume_context;
    assert_eq!(
        ctx.get("nqn").map(String::as_str),
        Some("nqn.2000-02.com.mikrotik:pvc-life")
    );
    assert_eq!(ctx.get("fsType").map(String::as_str), Some("ext4"));
    assert!(ctx.contains_key("nvmeAddress") && ctx.contains_key("nvmePort"));

    let got = ten_times!(c.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: "pvc-life".into()
    }));
    assert_eq!(got.volume.unwrap().capacity_bytes, one_and_half);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);

    let validated = ten_times!(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-life".into(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..Default::default()
        })
    );
    assert!(validated.confirmed.is_some());

    let publish = ten_times!(c.controller_publish_volume(publish_req("pvc-life", NODE, false)));
    assert_eq!(
        publish.publish_context.get("nqn").map(String::as_str),
        Some("nqn.2000-02.com.mikrotik:pvc-life")
    );
    let listed = ten_times!(c.list_volumes(ListVolumesRequest::default()));
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(
        listed.entries[0]
            .status
            .as_ref()
            .unwrap()
            .published_node_ids,
        vec![NODE.to_string()]
    );

    // Nothing is deleted while published.
    let (code_, msg) = code(
        c.delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-life".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains(NODE), "{msg}");

    let expanded = ten_times!(c.controller_expand_volume(ControllerExpandVolumeRequest {
        volume_id: "pvc-life".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 3 * GIB,
            limit_bytes: 0
        }),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }));
    assert_eq!(expanded.capacity_bytes, 3 * GIB);
    assert!(expanded.node_expansion_required);

    ten_times!(
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: "pvc-life".into(),
            node_id: NODE.into(),
            ..Default::default()
        })
    );
    ten_times!(c.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-life".into(),
        ..Default::default()
    }));
    assert!(
        c.list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );
}

#[tokio::test]
async fn create_volume_names_sizes_and_parameters() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    // A 128-byte name works and, being a safe slot, is its own id; a longer one breaks
    // the spec's size limit ("fields SHALL NOT exceed the limits documented here").
    let long = "v".repeat(128);
    let vol = c
        .create_volume(create_req(&long, GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, long);
    let (code_, msg) = code(c.create_volume(create_req(&"v".repeat(129), GIB)).await);
    assert_eq!(code_, Code::InvalidArgument, "{msg}");
    assert!(msg.starts_with("name is 129 bytes long"), "{msg}");
    // Same name, compatible → same volume; incompatible size → ALREADY_EXISTS.
    let again = c
        .create_volume(create_req(&long, GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, vol);
    let (code_, _) = code(c.create_volume(create_req(&long, 2 * GIB)).await);
    assert_eq!(code_, Code::AlreadyExists);
    // Same name, same size, another filesystem (or block) → ALREADY_EXISTS.
    let mut xfs = create_req(&long, GIB);
    xfs.parameters = HashMap::from([("fsType".to_string(), "xfs".to_string())]);
    let (code_, msg) = code(c.create_volume(xfs).await);
    assert_eq!(code_, Code::AlreadyExists);
    assert!(
        msg.contains("as ext4") && msg.contains("asks for xfs"),
        "{msg}"
    );
    let mut block = create_req(&long, GIB);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    assert_eq!(code(c.create_volume(block).await).0, Code::AlreadyExists);
    // Missing fields.
    let (code_, msg) = code(
        c.create_volume(CreateVolumeRequest {
            name: String::new(),
            ..create_req("x", GIB)
        })
        .await,
    );
    assert_eq!(
        (code_, msg.as_str()),
        (Code::InvalidArgument, "name is required")
    );
    let (code_, msg) = code(
        c.create_volume(CreateVolumeRequest {
            volume_capabilities: vec![],
            ..create_req("x", GIB)
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument, "{msg}");
    // Unsatisfiable capacity → OUT_OF_RANGE.
    let (code_, _) = code(c.create_volume(create_req("pvc-huge", 17 << 40)).await);
    assert_eq!(code_, Code::OutOfRange);
    let (code_, _) = code(
        c.create_volume(CreateVolumeRequest {
            capacity_range: Some(CapacityRange {
                required_bytes: 0,
                limit_bytes: GIB / 2,
            }),
            ..create_req("pvc-tiny", 0)
        })
        .await,
    );
    assert_eq!(code_, Code::OutOfRange);
    // An unknown StorageClass parameter is named.
    let mut req = create_req("pvc-param", GIB);
    req.parameters = HashMap::from([("fsTyp".to_string(), "xfs".to_string())]);
    let (code_, msg) = code(c.create_volume(req).await);
    assert_eq!(code_, Code::InvalidArgument);
    assert!(msg.contains("\"fsTyp\""), "{msg}");
    // Field parameters reach the volume context.
    let mut req = create_req("pvc-xfs", GIB);
    req.parameters = HashMap::from([
        ("fsType".to_string(), "xfs".to_string()),
        ("ctrlLossTmo".to_string(), "-1".to_string()),
        ("nvmeAddress".to_string(), "10.0.0.9".to_string()),
    ]);
    let ctx = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_context;
    assert_eq!(ctx["fsType"], "xfs");
    assert_eq!(ctx["ctrlLossTmo"], "-1");
    assert_eq!(ctx["nvmeAddress"], "10.0.0.9");
    // Multi-writer filesystems are refused; multi-writer block is fine.
    let mut req = create_req("pvc-mnmw", GIB);
    req.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    assert_eq!(code(c.create_volume(req).await).0, Code::InvalidArgument);
    let mut req = create_req("pvc-mnmw", GIB);
    req.volume_capabilities = vec![block_cap(Mode::MultiNodeMultiWriter)];
    assert!(c.create_volume(req).await.is_ok());
}

#[tokio::test]
async fn error_table_rows() {
    let mut f = start(&["--max-volumes-per-node", "2"]).await;
    let c = &mut f.c;
    // DeleteVolume of an unknown id → OK.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-never".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code(c.delete_volume(DeleteVolumeRequest::default()).await).0,
        Code::InvalidArgument
    );
    // ValidateVolumeCapabilities of an unknown volume → NOT_FOUND.
    let (code_, _) = code(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-never".into(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound);
    assert_eq!(
        code(
            c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-never".into(),
                ..Default::default()
            })
            .await
        )
        .0,
        Code::InvalidArgument
    );
    // ControllerPublish of an unknown volume or node → NOT_FOUND.
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req("pvc-never", NODE, false))
                .await
        )
        .0,
        Code::NotFound
    );
    c.create_volume(create_req("pvc-a", GIB)).await.unwrap();
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req("pvc-a", "ghost-node", false))
                .await
        )
        .0,
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req("pvc-a", "", false))
                .await
        )
        .0,
        Code::InvalidArgument
    );
    // Re-publish with a different readonly flag → ALREADY_EXISTS.
    c.controller_publish_volume(publish_req("pvc-a", NODE, false))
        .await
        .unwrap();
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req("pvc-a", NODE, true))
                .await
        )
        .0,
        Code::AlreadyExists
    );
    // Beyond max volumes per node → an error.
    for v in ["pvc-b", "pvc-c"] {
        c.create_volume(create_req(v, GIB)).await.unwrap();
    }
    c.controller_publish_volume(publish_req("pvc-b", NODE, false))
        .await
        .unwrap();
    let (code_, msg) = code(
        c.controller_publish_volume(publish_req("pvc-c", NODE, false))
            .await,
    );
    assert_eq!(code_, Code::ResourceExhausted, "{msg}");
    // ListVolumes with a bad starting_token → ABORTED.
    let (code_, _) = code(
        c.list_volumes(ListVolumesRequest {
            starting_token: "invalid-token".into(),
            max_entries: 0,
        })
        .await,
    );
    assert_eq!(code_, Code::Aborted);
    // ListSnapshots with unknown ids → OK and empty.
    let snaps = c
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: "snap-never".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(snaps.entries.is_empty());
    let snaps = c
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: "pvc-never".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(snaps.entries.is_empty());
    // ControllerExpand without capacity → INVALID_ARGUMENT; shrink → OUT_OF_RANGE.
    let (code_, _) = code(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-a".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);
    let (code_, _) = code(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-a".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 0,
                limit_bytes: GIB / 2,
            }),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::OutOfRange);
    let (code_, _) = code(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-never".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound);
    // Unpublish from a node that does not hold the volume is OK and keeps the holder.
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "pvc-a".into(),
        node_id: "other-node".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec![NODE.to_string()]
    );
}

#[tokio::test]
async fn list_volumes_paginates_across_deletions() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    for i in 0..5 {
        c.create_volume(create_req(&format!("pvc-{i}"), GIB))
            .await
            .unwrap();
    }
    let page = |token: String| ListVolumesRequest {
        max_entries: 2,
        starting_token: token,
    };
    let p1 = c
        .list_volumes(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    let ids = |r: &csi::ListVolumesResponse| {
        r.entries
            .iter()
            .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&p1), ["pvc-0", "pvc-1"]);
    // The last volume of the page is deleted: the next page still continues after it.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let p2 = c
        .list_volumes(page(p1.next_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&p2), ["pvc-2", "pvc-3"]);
    let p3 = c
        .list_volumes(page(p2.next_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ids(&p3), p3.next_token.as_str()),
        (vec!["pvc-4".to_string()], "")
    );
}

#[tokio::test]
async fn capacity_shrinks_as_volumes_are_created() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let before = ten_times!(c.get_capacity(GetCapacityRequest::default()));
    assert!(before.available_capacity > 0);
    assert_eq!(before.minimum_volume_size, Some(GIB));
    c.create_volume(create_req("pvc-cap", 5 * GIB))
        .await
        .unwrap();
    let after = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        before.available_capacity - after.available_capacity,
        5 * GIB
    );
    let mut bad = GetCapacityRequest::default();
    bad.parameters.insert("nope".into(), "1".into());
    assert_eq!(code(c.get_capacity(bad).await).0, Code::InvalidArgument);
}

#[tokio::test]
async fn snapshots_restores_and_clones() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    c.create_volume(create_req("pvc-src", 2 * GIB))
        .await
        .unwrap();
    let snap_req = |name: &str, src: &str| CreateSnapshotRequest {
        source_volume_id: src.into(),
        name: name.into(),
        ..Default::default()
    };
    let snap = ten_times!(c.create_snapshot(snap_req("snap-1", "pvc-src")))
        .snapshot
        .unwrap();
    assert_eq!(
        (
            snap.snapshot_id.as_str(),
            snap.source_volume_id.as_str(),
            snap.size_bytes
        ),
        ("snap-1", "pvc-src", 2 * GIB)
    );
    assert!(snap.ready_to_use);
    assert!(snap.creation_time.is_some());
    // Same name, other source → ALREADY_EXISTS; missing source → NOT_FOUND; missing fields.
    c.create_volume(create_req("pvc-other", GIB)).await.unwrap();
    assert_eq!(
        code(c.create_snapshot(snap_req("snap-1", "pvc-other")).await).0,
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_snapshot(snap_req("snap-2", "pvc-never")).await).0,
        Code::NotFound
    );
    assert_eq!(
        code(c.create_snapshot(snap_req("", "pvc-src")).await).0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap_req("snap-3", "")).await).0,
        Code::InvalidArgument
    );
    // A snapshot name is not a volume: the volume APIs do not see it.
    assert_eq!(
        code(
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "snap-1".into()
            })
            .await
        )
        .0,
        Code::NotFound
    );

    // Listing filters by id and by source.
    c.create_snapshot(snap_req("snap-o", "pvc-other"))
        .await
        .unwrap();
    let by_source = c
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: "pvc-src".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_source.entries.len(), 1);
    let by_id = c
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: "snap-o".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        by_id.entries[0].snapshot.as_ref().unwrap().source_volume_id,
        "pvc-other"
    );
    let all = ten_times!(c.list_snapshots(ListSnapshotsRequest {
        max_entries: 1,
        ..Default::default()
    }));
    assert_eq!(all.entries.len(), 1);
    assert!(!all.next_token.is_empty());

    // Restore: the size is at least the snapshot's; smaller is OUT_OF_RANGE.
    let from_snap = |id: &str| {
        Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: id.into(),
                },
            )),
        })
    };
    let mut req = create_req("pvc-restored", 0);
    req.volume_content_source = from_snap("snap-1");
    let restored = ten_times!(c.create_volume(req.clone())).volume.unwrap();
    assert_eq!(restored.capacity_bytes, 2 * GIB);
    assert_eq!(restored.content_source, req.volume_content_source);
    let mut small = create_req("pvc-small", 0);
    small.capacity_range = Some(CapacityRange {
        required_bytes: GIB,
        limit_bytes: GIB,
    });
    small.volume_content_source = from_snap("snap-1");
    assert_eq!(code(c.create_volume(small).await).0, Code::OutOfRange);
    let mut missing = create_req("pvc-missing", 0);
    missing.volume_content_source = from_snap("snap-never");
    assert_eq!(code(c.create_volume(missing).await).0, Code::NotFound);
    // Clone of a volume.
    let mut clone = create_req("pvc-clone", 3 * GIB);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "pvc-src".into(),
            },
        )),
    });
    assert_eq!(
        c.create_volume(clone)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .capacity_bytes,
        3 * GIB
    );

    // A volume with snapshots can be deleted (copy-from copies are independent files) and
    // its snapshot still restores.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-src".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req2 = create_req("pvc-restored-2", 0);
    req2.volume_content_source = from_snap("snap-1");
    assert!(c.create_volume(req2).await.is_ok());
    // DeleteSnapshot is idempotent and leaves volumes of the same name alone.
    ten_times!(c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: "snap-1".into(),
        ..Default::default()
    }));
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: "pvc-other".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-other".into()
        })
        .await
        .is_ok()
    );
    assert_eq!(
        code(c.delete_snapshot(DeleteSnapshotRequest::default()).await).0,
        Code::InvalidArgument
    );
}

fn has_capability(
    caps: &csi::ControllerGetCapabilitiesResponse,
    want: controller_service_capability::rpc::Type,
) -> bool {
    caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(controller_service_capability::Type::Rpc(r)) if r.r#type == want as i32)
    })
}

/// CreateVolumeRequest.name / CreateSnapshotRequest.name: "Any Unicode string that conforms
/// to the length limit is allowed except those containing the following banned characters:
/// U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F." A name that is no RDS slot
/// gets an id derived from it; every call after works with that id.
#[tokio::test]
async fn any_name_is_accepted_and_its_volume_found_again() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let names = [
        "pvc\"; /system reset-configuration".to_string(),
        "../../etc/passwd".into(),
        "my volume + its [find] $x".into(),
        "données été ☃".into(),
        format!("-{}", "é".repeat(63)), // 127 bytes, leading '-'
    ];
    let mut ids = Vec::new();
    for name in &names {
        let vol = ten_times!(c.create_volume(create_req(name, GIB)))
            .volume
            .unwrap();
        assert!(
            vol.volume_id.starts_with("vol-"),
            "{name}: {}",
            vol.volume_id
        );
        assert_eq!(
            vol.volume_context["nqn"],
            format!("nqn.2000-02.com.mikrotik:{}", vol.volume_id)
        );
        // Same name, incompatible size: still recognised as that volume.
        assert_eq!(
            code(c.create_volume(create_req(name, 2 * GIB)).await).0,
            Code::AlreadyExists
        );
        ids.push(vol.volume_id);
    }
    let listed: Vec<String> = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want);
    // The spec's banned characters are refused, naming them.
    for bad in ["a\u{0}b", "bell\u{7}", "esc\u{1b}[0m", "c1\u{85}"] {
        let (code_, msg) = code(c.create_volume(create_req(bad, GIB)).await);
        assert_eq!(code_, Code::InvalidArgument, "{bad:?}: {msg}");
        assert!(msg.contains("control character"), "{msg}");
    }
    // A snapshot named freely, of a volume named freely.
    let snap_req = CreateSnapshotRequest {
        source_volume_id: ids[2].clone(),
        name: "nightly backup #1 (ünïcode)".into(),
        ..Default::default()
    };
    let snap = ten_times!(c.create_snapshot(snap_req.clone()))
        .snapshot
        .unwrap();
    assert!(
        snap.snapshot_id.starts_with("snap-"),
        "{}",
        snap.snapshot_id
    );
    assert_eq!(snap.source_volume_id, ids[2]);
    let other_source = CreateSnapshotRequest {
        source_volume_id: ids[3].clone(),
        ..snap_req
    };
    assert_eq!(
        code(c.create_snapshot(other_source).await).0,
        Code::AlreadyExists
    );
    ten_times!(c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    }));
    for id in &ids {
        ten_times!(c.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }));
    }
    assert!(
        c.list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );
}

/// A derived id is the slot of the name recorded with it, never of another name: "Indicates
/// that a volume corresponding to the specified volume name already exists but is
/// incompatible" — here, the slot is taken by a different name, whichever came first.
#[tokio::test]
async fn a_slot_holding_another_name_is_never_taken_for_this_one() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let (derived, _) = rds_csi::controller::names::volume_id_for("x+y", "name").unwrap();
    let derived = derived.to_string();
    // The literal name first (a safe slot, its own id), then the name that derives it.
    c.create_volume(create_req(&derived, GIB)).await.unwrap();
    let (code_, msg) = code(c.create_volume(create_req("x+y", GIB)).await);
    assert_eq!(code_, Code::AlreadyExists, "{msg}");
    assert!(msg.contains("a different name"), "{msg}");
    c.delete_volume(DeleteVolumeRequest {
        volume_id: derived.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The other way round.
    let vol = c
        .create_volume(create_req("x+y", GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, derived);
    let (code_, msg) = code(c.create_volume(create_req(&derived, GIB)).await);
    assert_eq!(code_, Code::AlreadyExists, "{msg}");
    assert!(msg.contains("\"x+y\""), "{msg}");
    // And the rightful owner still gets its volume.
    let again = c
        .create_volume(create_req("x+y", GIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.volume.unwrap(), vol);
}

/// Idempotency does not depend on the controller's memory: a repeated CreateVolume after a
/// `kill -9` and restart of the plugin finds the volume by the name recorded on the RDS.
#[tokio::test]
async fn a_named_volume_is_recognised_after_a_controller_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let state = dir.path().join("state");
    let args = ["--mode", "controller"];
    let first = {
        let plugin = common::Plugin::start(&socket, &state, &args);
        let mut c = ControllerClient::new(plugin.channel().await);
        let vol = c
            .create_volume(create_req("data for \"app\" #7", 3 * GIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        drop(plugin); // SIGKILL
        vol
    };
    let plugin = common::Plugin::start(&socket, &state, &args);
    let mut c = ControllerClient::new(plugin.channel().await);
    let again = c
        .create_volume(create_req("data for \"app\" #7", 3 * GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, first);
    let other = c
        .create_volume(create_req("data for \"app\" #8", 3 * GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_ne!(
        other.volume_id, first.volume_id,
        "another name is another volume"
    );
}

/// ListVolumes and ControllerGetVolume return the `volume_context` CreateVolume returned:
/// "A volume uniquely identified by `volume_id` SHALL always report the same
/// volume_context." — for every kind of volume.
#[tokio::test]
async fn every_answer_carries_the_volume_context_create_volume_returned() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let mut plain = create_req("pvc-plain", GIB);
    plain.parameters = HashMap::new();
    let mut tuned = create_req("pvc-tuned with a name", GIB);
    tuned.parameters = HashMap::from([
        ("fsType".to_string(), "xfs".to_string()),
        ("nvmeAddress".to_string(), "10.0.0.9".to_string()),
        ("ctrlLossTmo".to_string(), "-1".to_string()),
        ("reconnectDelay".to_string(), "5".to_string()),
        (
            "csi.storage.k8s.io/pvc/name".to_string(),
            "data".to_string(),
        ),
    ]);
    tuned.mutable_parameters = HashMap::from([("keepAliveTmo".to_string(), "30".to_string())]);
    let mut block = create_req("pvc-block", GIB);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    let mut created = Vec::new();
    for req in [plain, tuned, block] {
        created.push(
            c.create_volume(req)
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap(),
        );
    }
    let t = &created[1].volume_context;
    assert_eq!(
        (
            t["fsType"].as_str(),
            t["nvmeAddress"].as_str(),
            t["ctrlLossTmo"].as_str()
        ),
        ("xfs", "10.0.0.9", "-1")
    );
    assert_eq!(
        (t["reconnectDelay"].as_str(), t["keepAliveTmo"].as_str()),
        ("5", "30")
    );
    assert!(
        !created[2].volume_context.contains_key("fsType"),
        "block has no filesystem"
    );
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    for vol in &created {
        let entry = listed
            .entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == vol.volume_id)
            .unwrap();
        let got = entry.volume.as_ref().unwrap();
        assert_eq!(
            got.volume_context, vol.volume_context,
            "ListVolumes {}",
            vol.volume_id
        );
        assert_eq!(got.capacity_bytes, vol.capacity_bytes);
        let get = c
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            get.volume.unwrap().volume_context,
            vol.volume_context,
            "ControllerGetVolume {}",
            vol.volume_id
        );
    }
}

/// GetSnapshot (capability GET_SNAPSHOT): "`GetSnapshotResponse` should contain current
/// information of a snapshot if it exists. If the snapshot does not exist any more,
/// `GetSnapshot` should return gRPC error code `NOT_FOUND`."
#[tokio::test]
async fn get_snapshot_answers_what_create_snapshot_did() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(has_capability(
        &caps,
        controller_service_capability::rpc::Type::GetSnapshot
    ));
    c.create_volume(create_req("pvc-src", 2 * GIB))
        .await
        .unwrap();
    let made = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: "pvc-src".into(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let get = |id: &str| GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let got = ten_times!(c.get_snapshot(get("snap-1"))).snapshot.unwrap();
    assert_eq!(got, made);
    // "Snapshot does not exist | 5 NOT_FOUND": never made, a volume's id, deleted.
    for id in ["snap-never", "pvc-src"] {
        let (code_, msg) = code(c.get_snapshot(get(id)).await);
        assert_eq!(code_, Code::NotFound, "{id}: {msg}");
    }
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: "snap-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(code(c.get_snapshot(get("snap-1")).await).0, Code::NotFound);
    assert_eq!(code(c.get_snapshot(get("")).await).0, Code::InvalidArgument);
}

/// ControllerModifyVolume (capability MODIFY_VOLUME): the connect tunables change on a live
/// volume (handed to the node in the publish context at the next attachment); any other
/// parameter is "Parameters not supported | 3 INVALID_ARGUMENT | Indicates that the CO has
/// specified mutable parameters not supported by the volume"; "Volume does not exist | 5
/// NOT_FOUND"; "This operation MUST be idempotent."
#[tokio::test]
async fn modify_volume_changes_the_connect_tunables_only() {
    let mut f = start(&[]).await;
    let c = &mut f.c;
    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(has_capability(
        &caps,
        controller_service_capability::rpc::Type::ModifyVolume
    ));
    let mut req = create_req("pvc-mod", GIB);
    req.parameters = HashMap::from([("ctrlLossTmo".to_string(), "-1".to_string())]);
    let vol = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let modify = |params: &[(&str, &str)]| ControllerModifyVolumeRequest {
        volume_id: "pvc-mod".into(),
        mutable_parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    ten_times!(
        c.controller_modify_volume(modify(&[("ctrlLossTmo", "600"), ("reconnectDelay", "2")]))
    );
    // Only the keys given change: "SPs MUST NOT modify volumes based on the absence of keys".
    ten_times!(c.controller_modify_volume(modify(&[("keepAliveTmo", "15")])));
    let ctx = c
        .controller_publish_volume(publish_req("pvc-mod", NODE, false))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(
        (
            ctx["ctrlLossTmo"].as_str(),
            ctx["reconnectDelay"].as_str(),
            ctx["keepAliveTmo"].as_str()
        ),
        ("600", "2", "15")
    );
    let listed = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-mod".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // The volume_context never changes: "The contents of this field SHALL NOT be mutable."
    assert_eq!(listed.volume_context, vol.volume_context);
    assert_eq!(listed.volume_context["ctrlLossTmo"], "-1");
    for (params, needle) in [
        (vec![("fsType", "xfs")], "fixed when the volume is created"),
        (
            vec![("nvmeAddress", "10.1.1.1")],
            "fixed when the volume is created",
        ),
        (vec![("iops", "500")], "not a parameter of this driver"),
        (vec![("reconnectDelay", "0")], "at least 1 second"),
    ] {
        let (code_, msg) = code(c.controller_modify_volume(modify(&params)).await);
        assert_eq!(code_, Code::InvalidArgument, "{params:?}: {msg}");
        assert!(msg.contains(needle), "{msg}");
    }
    let mut missing = modify(&[("ctrlLossTmo", "5")]);
    missing.volume_id = "pvc-never".into();
    assert_eq!(
        code(c.controller_modify_volume(missing).await).0,
        Code::NotFound
    );
    let mut no_id = modify(&[("ctrlLossTmo", "5")]);
    no_id.volume_id = String::new();
    assert_eq!(
        code(c.controller_modify_volume(no_id).await).0,
        Code::InvalidArgument
    );
    // CreateVolume's mutable_parameters follow the same rule.
    let mut bad = create_req("pvc-bad-mutable", GIB);
    bad.mutable_parameters = HashMap::from([("fsType".to_string(), "xfs".to_string())]);
    assert_eq!(code(c.create_volume(bad).await).0, Code::InvalidArgument);
}
