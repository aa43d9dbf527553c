//! CSI request validation on requests as they arrive: the first byte picks the RPC, the rest
//! is its protobuf encoding (what tonic decodes). For every validating function of the
//! controller and node services:
//! - it never panics, and refuses with the gRPC code the rules give (INVALID_ARGUMENT;
//!   ABORTED for a foreign page token, OUT_OF_RANGE for an unsatisfiable size) and a
//!   one-line message;
//! - its answer does not depend on the iteration order of the request's maps;
//! - what it accepts is safe further down: every accepted volume or snapshot id renders as
//!   an RDS slot, file, NQN, parked allow list and disk note; accepted paths are normalized
//!   and below the kubelet root (checked against an independent oracle); accepted
//!   addresses and mount options cannot be read as command-line options;
//! - sizes are within the range asked for, whole 4 KiB blocks, and found whenever one
//!   exists;
//! - a CreateVolume it accepts, run on an in-memory RDS, yields a volume context that the
//!   node accepts in NodeStageVolume and NodePublishVolume.
//!
//! Seeds: `RDS_CSI_FUZZ_WRITE_SEEDS=DIR` makes the binary write one valid request of each
//! kind to DIR and exit (`fuzz/seeds/csi_request` was made so).
#![no_main]

use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rds_csi::Error;
use rds_csi::attachment::fence::parked_nqn;
use rds_csi::controller::capacity::{self, BLOCK_BYTES, MAX_VOLUME_BYTES, MIN_VOLUME_BYTES};
use rds_csi::controller::params::Expected;
use rds_csi::controller::snapshots::snapshot_id_field;
use rds_csi::controller::volumes::{validate_capabilities, validate_create, volume_id_field};
use rds_csi::controller::{ControllerConfig, paging, params};
use rds_csi::csi::controller::validate_create_snapshot;
use rds_csi::csi::node::{validate_publish as node_publish, validate_stage};
use rds_csi::csi::publish::{validate_publish, validate_unpublish};
use rds_csi::node::fake::FakeKernel;
use rds_csi::node::paths::validate_path;
use rds_csi::node::{NodeOps, NodeOptions};
use rds_csi::proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use rds_csi::proto::csi::*;
use rds_csi::routeros::command::{Command, DiskAdd, ExportSpec};
use rds_csi::routeros::render::Renderer;
use rds_csi::types::note::SnapshotNote;
use rds_csi::types::{SnapshotId, VolumeId};
use rds_csi_fuzz::block_on;
use rds_csi_fuzz::oracle::check_message;

const KUBELET: &str = "/var/lib/kubelet";
const RDS_ADDRESS: &str = "10.0.0.5";
const VOLUME_PATH: &str = "/storage-pool/kubernetes";

/// The RPC a first byte selects.
#[derive(Clone, Copy, Debug)]
enum Kind {
    CreateVolume,
    DeleteVolume,
    ControllerPublish,
    ControllerUnpublish,
    ValidateCapabilities,
    ListVolumes,
    CreateSnapshot,
    DeleteSnapshot,
    Capacity,
    NodeStage,
    NodePublish,
    NodeUnpublish,
    NodeExpand,
}

const KINDS: [Kind; 13] = [
    Kind::CreateVolume,
    Kind::DeleteVolume,
    Kind::ControllerPublish,
    Kind::ControllerUnpublish,
    Kind::ValidateCapabilities,
    Kind::ListVolumes,
    Kind::CreateSnapshot,
    Kind::DeleteSnapshot,
    Kind::Capacity,
    Kind::NodeStage,
    Kind::NodePublish,
    Kind::NodeUnpublish,
    Kind::NodeExpand,
];

fn expected() -> Expected {
    Expected {
        rds_address: Some(RDS_ADDRESS.into()),
        volume_path: Some(VOLUME_PATH.into()),
    }
}

fn node_ops() -> NodeOps {
    let kernel = Arc::new(FakeKernel::new(
        rds_csi::types::defaults::DEFAULT_NQN_PREFIX,
        "nqn.2014-08.org.nvmexpress:uuid:fuzz",
    ));
    NodeOps::new(
        kernel.clone(),
        kernel,
        NodeOptions {
            allowed_root: Some(KUBELET.into()),
            require_target_address: true,
            ..NodeOptions::default()
        },
    )
}

/// The same map, iterated in another order (a new `RandomState`).
fn reordered<K: Clone + Eq + Hash, V: Clone>(m: &HashMap<K, V>) -> HashMap<K, V> {
    let mut out: HashMap<K, V> = HashMap::with_capacity(m.len() + 7);
    for (k, v) in m {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// A refusal: the expected code and a one-line message.
fn refused(e: &Error, what: &str) {
    let ok = match what {
        "token" => matches!(e, Error::Aborted(_) | Error::InvalidArgument(_)),
        "size" => matches!(e, Error::OutOfRange(_) | Error::InvalidArgument(_)),
        _ => matches!(e, Error::InvalidArgument(_)),
    };
    assert!(ok, "{what}: refused with the wrong code: {e:?}");
    if let Err(why) = check_message(&e.to_string()) {
        panic!("{what}: {why}");
    }
}

fn renderer() -> Renderer {
    Renderer::new(VOLUME_PATH).expect("the default volume path renders")
}

/// Everything the controller sends to the RDS about an accepted volume id renders.
fn volume_renders(v: &VolumeId) {
    let r = renderer();
    let cmd = Command::DiskAdd(DiskAdd {
        slot: v.to_string(),
        file_path: r.file_path_for(v.as_str()),
        size_bytes: Some(MIN_VOLUME_BYTES),
        copy_from: Some(v.to_string()),
        comment: Some("rds-csi-volume:ext4".into()),
        export: Some(ExportSpec {
            port: 4420,
            nqn: ControllerConfig::default().nqn(v.as_str()),
            allow_host: Some(parked_nqn(v)),
        }),
    });
    if let Err(e) = r.render(&cmd) {
        panic!("accepted volume id {v} cannot be sent to the RDS: {e}");
    }
}

/// Everything the controller sends to the RDS about an accepted snapshot renders (with the
/// CSI name recorded in its note when the id is derived from it).
fn snapshot_renders(s: &SnapshotId, recorded: Option<&str>, source: &VolumeId) {
    let r = renderer();
    let cmd = Command::DiskAdd(DiskAdd {
        slot: s.to_string(),
        file_path: r.file_path_for(s.as_str()),
        size_bytes: None,
        copy_from: Some(source.to_string()),
        comment: Some(
            SnapshotNote {
                source: source.to_string(),
                name: recorded.map(str::to_string),
            }
            .render(),
        ),
        export: None,
    });
    if let Err(e) = r.render(&cmd) {
        panic!("accepted snapshot {s} of {source} cannot be sent to the RDS: {e}");
    }
}

/// The oracle of a kubelet path: absolute, normalized, strictly below the kubelet root.
fn path_is_fine(p: &str) -> bool {
    !p.contains('\0')
        && p.strip_prefix(KUBELET).is_some_and(|rest| {
            rest.len() > 1
                && rest.starts_with('/')
                && rest[1..]
                    .split('/')
                    .all(|s| !s.is_empty() && s != "." && s != "..")
        })
}

fn check_path(field: &str, value: &str) {
    let got = validate_path(field, value, Some(Path::new(KUBELET)));
    match &got {
        Ok(p) => {
            assert!(path_is_fine(value), "{field} {value:?} accepted");
            assert_eq!(p.as_os_str(), value, "{field} changed");
        }
        Err(e) => {
            assert!(!path_is_fine(value), "{field} {value:?} refused: {e}");
            refused(e, field);
        }
    }
}

/// An argument handed to a command line (nvme-cli, mount) cannot be read as an option or
/// split into two.
fn is_plain_argument(v: &str) -> bool {
    !v.starts_with('-') && !v.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn check_stage(req: &NodeStageVolumeRequest, ops: &NodeOps) -> Result<(), Error> {
    let got = validate_stage(req, ops);
    let mut again = req.clone();
    again.publish_context = reordered(&req.publish_context);
    again.volume_context = reordered(&req.volume_context);
    again.secrets = reordered(&req.secrets);
    assert_eq!(
        format!("{got:?}"),
        format!("{:?}", validate_stage(&again, ops)),
        "map order changed the answer"
    );
    let s = got?;
    volume_renders(&s.volume_id);
    assert!(path_is_fine(&req.staging_target_path));
    assert!(
        !s.target.address.is_empty() && is_plain_argument(&s.target.address),
        "address {:?}",
        s.target.address
    );
    assert!(is_plain_argument(&s.target.nqn), "nqn {:?}", s.target.nqn);
    assert!(s.target.port != 0);
    if let rds_csi::node::ops::VolumeKind::Mount { flags, fs_type } = &s.cap.kind {
        assert!(
            ["ext4", "xfs"].contains(&fs_type.as_str()),
            "fs {fs_type:?}"
        );
        for f in flags {
            assert!(
                !f.is_empty() && !f.contains(',') && is_plain_argument(f),
                "mount flag {f:?}"
            );
        }
    }
    Ok(())
}

fn check_node_publish(req: &NodePublishVolumeRequest, ops: &NodeOps) -> Result<(), Error> {
    let got = node_publish(req, ops);
    let mut again = req.clone();
    again.publish_context = reordered(&req.publish_context);
    again.volume_context = reordered(&req.volume_context);
    assert_eq!(
        format!("{got:?}"),
        format!("{:?}", node_publish(&again, ops)),
        "map order changed the answer"
    );
    let p = got?;
    volume_renders(&p.volume_id);
    assert!(path_is_fine(&req.staging_target_path) && path_is_fine(&req.target_path));
    assert_ne!(p.target_path, p.staging_path);
    assert!(is_plain_argument(&p.target.nqn), "nqn {:?}", p.target.nqn);
    assert!(
        is_plain_argument(&p.target.address),
        "address {:?}",
        p.target.address
    );
    assert!(p.target.port != 0);
    Ok(())
}

/// Runs an accepted CreateVolume on a fresh in-memory RDS and checks the node accepts the
/// volume context it answers with.
fn create_then_stage(req: &CreateVolumeRequest, args: &rds_csi::controller::volumes::CreateArgs) {
    let cfg = ControllerConfig {
        nvme_address: RDS_ADDRESS.into(),
        expected: expected(),
        ..ControllerConfig::default()
    };
    let (controller, _rds) = rds_csi_fuzz::controller(cfg);
    let Ok(volume) = block_on(controller.create_volume(args)) else {
        // Sources that do not exist on the fresh RDS, sizes out of range: judged elsewhere.
        return;
    };
    let cap = VolumeCapability {
        access_mode: Some(AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(match &args.fs_type {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.clone(),
                ..MountVolume::default()
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
    };
    let ops = node_ops();
    let staging = format!(
        "{KUBELET}/plugins/kubernetes.io/csi/rds/{}/globalmount",
        volume.volume_id
    );
    let stage = NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    if let Err(e) = check_stage(&stage, &ops) {
        panic!(
            "the node refuses the context of a volume the controller created from {req:?}: \
             {:?}: {e}",
            volume.volume_context
        );
    }
    let publish = NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging,
        target_path: format!(
            "{KUBELET}/pods/p/volumes/kubernetes.io~csi/{}/mount",
            volume.volume_id
        ),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    if let Err(e) = check_node_publish(&publish, &ops) {
        panic!("the node refuses to publish a volume the controller created: {e}");
    }
}

fn create_volume(req: CreateVolumeRequest) {
    let got = validate_create(&req, &expected());
    let mut again = req.clone();
    again.parameters = reordered(&req.parameters);
    again.secrets = reordered(&req.secrets);
    again.mutable_parameters = reordered(&req.mutable_parameters);
    assert_eq!(
        format!("{got:?}"),
        format!("{:?}", validate_create(&again, &expected())),
        "map order changed the answer"
    );
    match got {
        Ok(args) => {
            volume_renders(&args.volume_id);
            if let Some(fs) = &args.fs_type {
                assert!(params::SUPPORTED_FS.contains(&fs.as_str()), "fs {fs:?}");
            }
            create_then_stage(&req, &args);
        }
        Err(e) => refused(&e, "CreateVolume"),
    }
}

fn capacity(wire: &[u8]) {
    let Some((floor, wire)) = wire.split_first_chunk::<8>() else {
        return;
    };
    let floor = u64::from_le_bytes(*floor);
    let Ok(range) = CapacityRange::decode(wire) else {
        return;
    };
    let (req, lim) = (range.required_bytes, range.limit_bytes);
    let valid = req >= 0 && lim >= 0 && (lim == 0 || req <= lim);
    match capacity::resolve(Some(&range), floor) {
        Ok(size) => {
            assert!(valid);
            assert!(
                size >= req as u64 && (lim == 0 || size <= lim as u64),
                "{size} for {range:?}"
            );
            assert!(size >= floor && size >= MIN_VOLUME_BYTES && size <= MAX_VOLUME_BYTES);
            assert_eq!(size % BLOCK_BYTES, 0);
        }
        Err(e) => {
            refused(&e, "size");
            if valid {
                // No size exists: the smallest candidate is over the limit.
                let want = (req as u64).max(MIN_VOLUME_BYTES).max(floor);
                let bound = if lim == 0 {
                    MAX_VOLUME_BYTES
                } else {
                    (lim as u64).min(MAX_VOLUME_BYTES)
                };
                let smallest = want.checked_next_multiple_of(BLOCK_BYTES);
                assert!(
                    smallest.is_none_or(|s| s > bound),
                    "{range:?} floor {floor}: {e}"
                );
            }
        }
    }
    match capacity::expand_to(Some(&range), floor) {
        Ok(None) => assert!(valid && req as u64 <= floor && (lim == 0 || lim as u64 >= floor)),
        Ok(Some(size)) => {
            assert!(valid && size > floor && size >= req as u64);
            assert!((lim == 0 || size <= lim as u64) && size % BLOCK_BYTES == 0);
        }
        Err(e) => refused(&e, "size"),
    }
    if let Ok(fits) = capacity::satisfies(Some(&range), floor) {
        assert_eq!(
            fits,
            valid && floor >= req as u64 && (lim == 0 || floor <= lim as u64)
        );
    }
}

fn one(kind: Kind, wire: &[u8]) {
    macro_rules! decode {
        ($t:ty) => {
            match <$t>::decode(wire) {
                Ok(r) => r,
                Err(_) => return,
            }
        };
    }
    match kind {
        Kind::CreateVolume => create_volume(decode!(CreateVolumeRequest)),
        Kind::DeleteVolume => {
            let req = decode!(DeleteVolumeRequest);
            match volume_id_field(&req.volume_id, "volume_id") {
                Ok(v) => volume_renders(&v),
                Err(e) => refused(&e, "DeleteVolume"),
            }
        }
        Kind::ControllerPublish => {
            let req = decode!(ControllerPublishVolumeRequest);
            let got = validate_publish(&req);
            let mut again = req.clone();
            again.volume_context = reordered(&req.volume_context);
            again.secrets = reordered(&req.secrets);
            assert_eq!(
                format!("{got:?}"),
                format!("{:?}", validate_publish(&again))
            );
            match got {
                Ok(args) => volume_renders(&args.volume_id),
                Err(e) => refused(&e, "ControllerPublishVolume"),
            }
        }
        Kind::ControllerUnpublish => {
            let req = decode!(ControllerUnpublishVolumeRequest);
            match validate_unpublish(&req) {
                Ok(args) => volume_renders(&args.volume_id),
                Err(e) => refused(&e, "ControllerUnpublishVolume"),
            }
        }
        Kind::ValidateCapabilities => {
            let req = decode!(ValidateVolumeCapabilitiesRequest);
            let check = |r: &ValidateVolumeCapabilitiesRequest| {
                validate_capabilities(&r.volume_capabilities, "volume_capabilities")
                    .and_then(|fs| params::parse(&r.parameters, &expected()).map(|p| (fs, p)))
            };
            let got = check(&req);
            let mut again = req.clone();
            again.parameters = reordered(&req.parameters);
            assert_eq!(format!("{got:?}"), format!("{:?}", check(&again)));
            if let Err(e) = got {
                refused(&e, "ValidateVolumeCapabilities");
            }
        }
        Kind::ListVolumes => {
            let req = decode!(ListVolumesRequest);
            let ids = ["a", "b", "c", "pvc-1", "pvc-2", "z"];
            match paging::page(ids.to_vec(), |s| s, &req.starting_token, req.max_entries) {
                Ok((page, next)) => {
                    assert!(req.max_entries <= 0 || page.len() <= req.max_entries as usize);
                    assert!(next.is_empty() || paging::decode(&next).is_ok());
                }
                Err(e) => refused(&e, "token"),
            }
        }
        Kind::CreateSnapshot => {
            let req = decode!(CreateSnapshotRequest);
            let got = validate_create_snapshot(&req);
            let mut again = req.clone();
            again.parameters = reordered(&req.parameters);
            again.secrets = reordered(&req.secrets);
            assert_eq!(
                format!("{got:?}"),
                format!("{:?}", validate_create_snapshot(&again))
            );
            match got {
                Ok((name, recorded, source)) => {
                    snapshot_renders(&name, recorded.as_deref(), &source);
                    volume_renders(&source);
                }
                Err(e) => refused(&e, "CreateSnapshot"),
            }
        }
        Kind::DeleteSnapshot => {
            let req = decode!(DeleteSnapshotRequest);
            match snapshot_id_field(&req.snapshot_id, "snapshot_id") {
                Ok(s) => snapshot_renders(&s, None, &VolumeId::new("pvc-1").expect("a valid id")),
                Err(e) => refused(&e, "DeleteSnapshot"),
            }
        }
        Kind::Capacity => capacity(wire),
        Kind::NodeStage => {
            if let Err(e) = check_stage(&decode!(NodeStageVolumeRequest), &node_ops()) {
                refused(&e, "NodeStageVolume");
            }
        }
        Kind::NodePublish => {
            if let Err(e) = check_node_publish(&decode!(NodePublishVolumeRequest), &node_ops()) {
                refused(&e, "NodePublishVolume");
            }
        }
        Kind::NodeUnpublish => {
            let req = decode!(NodeUnpublishVolumeRequest);
            match VolumeId::new(&req.volume_id) {
                Ok(v) => volume_renders(&v),
                Err(e) => refused(&Error::from(e), "NodeUnpublishVolume"),
            }
            check_path("target_path", &req.target_path);
        }
        Kind::NodeExpand => {
            let req = decode!(NodeExpandVolumeRequest);
            check_path("volume_path", &req.volume_path);
            check_path("staging_target_path", &req.staging_target_path);
        }
    }
}

/// One valid request of each kind, encoded: the seed corpus.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mount = |fs: &str, mode: volume_capability::access_mode::Mode| VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            ..MountVolume::default()
        })),
    };
    let block = |mode: volume_capability::access_mode::Mode| VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    };
    use volume_capability::access_mode::Mode;
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let context = map(&[
        ("nvmeAddress", RDS_ADDRESS),
        ("nvmePort", "4420"),
        ("nqn", "nqn.2000-02.com.mikrotik:pvc-1"),
        ("fsType", "ext4"),
        ("ctrlLossTmo", "-1"),
        ("reconnectDelay", "5"),
    ]);
    let staging = format!("{KUBELET}/plugins/kubernetes.io/csi/rds/pvc-1/globalmount");
    let target = format!("{KUBELET}/pods/5d1c/volumes/kubernetes.io~csi/pvc-1/mount");
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, kind: usize, msg: Vec<u8>| {
        let mut bytes = vec![kind as u8];
        bytes.extend(msg);
        out.push((name.to_string(), bytes));
    };
    add(
        "create_volume_xfs",
        0,
        CreateVolumeRequest {
            name: "pvc-3f1c2a9e-8d7b-4c1e-9a0f-1b2c3d4e5f60".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1610612736,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount("xfs", Mode::SingleNodeWriter)],
            parameters: map(&[
                ("nvmeAddress", RDS_ADDRESS),
                ("nvmePort", "4420"),
                ("fsType", "xfs"),
                ("ctrlLossTmo", "-1"),
                ("reconnectDelay", "5"),
                ("keepAliveTmo", "30"),
                ("rdsAddress", RDS_ADDRESS),
                ("volumePath", VOLUME_PATH),
                ("csi.storage.k8s.io/pvc/name", "data"),
            ]),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "create_volume_block_from_snapshot",
        0,
        CreateVolumeRequest {
            name: "pvc-restore".into(),
            volume_capabilities: vec![block(Mode::MultiNodeMultiWriter)],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: "snap-1".into(),
                    },
                )),
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "delete_volume",
        1,
        DeleteVolumeRequest {
            volume_id: "pvc-1".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "controller_publish",
        2,
        ControllerPublishVolumeRequest {
            volume_id: "pvc-1".into(),
            node_id: "worker-1.example".into(),
            volume_capability: Some(mount("ext4", Mode::SingleNodeWriter)),
            volume_context: context.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "controller_unpublish",
        3,
        ControllerUnpublishVolumeRequest {
            volume_id: "pvc-1".into(),
            node_id: "worker-1".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "validate_capabilities",
        4,
        ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-1".into(),
            volume_capabilities: vec![
                mount("ext4", Mode::SingleNodeWriter),
                block(Mode::MultiNodeReaderOnly),
            ],
            parameters: map(&[("fsType", "ext4")]),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "list_volumes",
        5,
        ListVolumesRequest {
            max_entries: 2,
            starting_token: "after:b".into(),
        }
        .encode_to_vec(),
    );
    add(
        "create_snapshot",
        6,
        CreateSnapshotRequest {
            source_volume_id: "pvc-1".into(),
            name: "snapshot-8e3f".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "delete_snapshot",
        7,
        DeleteSnapshotRequest {
            snapshot_id: "snap-1".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let mut cap = (3u64 << 30).to_le_bytes().to_vec();
    cap.extend(
        CapacityRange {
            required_bytes: 5 << 30,
            limit_bytes: 8 << 30,
        }
        .encode_to_vec(),
    );
    add("capacity", 8, cap);
    add(
        "node_stage",
        9,
        NodeStageVolumeRequest {
            volume_id: "pvc-1".into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(mount("ext4", Mode::SingleNodeWriter)),
            volume_context: context.clone(),
            publish_context: map(&[("nvmeAddress", RDS_ADDRESS)]),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "node_publish",
        10,
        NodePublishVolumeRequest {
            volume_id: "pvc-1".into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(block(Mode::SingleNodeWriter)),
            volume_context: context,
            readonly: true,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    add(
        "node_unpublish",
        11,
        NodeUnpublishVolumeRequest {
            volume_id: "pvc-1".into(),
            target_path: target,
        }
        .encode_to_vec(),
    );
    add(
        "node_expand",
        12,
        NodeExpandVolumeRequest {
            volume_id: "pvc-1".into(),
            volume_path: staging.clone(),
            staging_target_path: staging,
            capacity_range: Some(CapacityRange {
                required_bytes: 2 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    out
}

fn write_seeds_if_asked() {
    let Some(dir) = std::env::var_os("RDS_CSI_FUZZ_WRITE_SEEDS") else {
        return;
    };
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (name, bytes) in seeds() {
        std::fs::write(Path::new(&dir).join(name), bytes).expect("seed written");
    }
    std::process::exit(0);
}

fuzz_target!(init: write_seeds_if_asked(), |data: &[u8]| {
    let Some((&kind, wire)) = data.split_first() else {
        return;
    };
    one(KINDS[usize::from(kind) % KINDS.len()], wire);
});
