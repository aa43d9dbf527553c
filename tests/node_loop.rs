//! The Node service end to end on real loop devices, real filesystems and real mounts.
//!
//! Needs root, `losetup`, `blkid`, `mount`, `mkfs.ext4`/`resize2fs` (e2fsprogs) and
//! `mkfs.xfs`/`xfs_growfs` (xfsprogs). Each test works in its own temp directory: the
//! backing files, the kubelet-like tree and every mount live below it, and a [`Cleanup`]
//! guard unmounts and detaches everything below it when the test ends, pass or fail.
//!
//! The gRPC Node service (`NodeService`) is driven directly through its trait methods with
//! the embedded adapters (loop initiator + real mounter), exactly as the plugin wires them.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rds_csi::compose::{embedded_volume_dir, loop_kernel};
use rds_csi::csi::node::NodeService;
use rds_csi::node::{NodeOps, NodeOptions};
use rds_csi::proto::csi::node_server::Node;
use rds_csi::proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode as AM,
};
use rds_csi::proto::csi::*;
use rds_csi::types::NodeId;
use rds_csi::types::context;
use tonic::{Code, Request};

const MIB: u64 = 1 << 20;
const PREFIX: &str = "nqn.2000-02.com.mikrotik:";

/// Unmounts everything below the test directory and detaches its loop devices, on drop.
struct Cleanup {
    root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut targets: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|t| t.replace("\\040", " "))
            .filter(|t| Path::new(t).starts_with(&self.root))
            .collect();
        // Deepest and latest first.
        targets.reverse();
        for t in targets {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&t)
                .status();
        }
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let f = e.path().join("loop/backing_file");
                if let Ok(b) = std::fs::read_to_string(&f)
                    && Path::new(b.trim()).starts_with(&self.root)
                {
                    let dev = Path::new("/dev").join(e.file_name());
                    let _ = std::process::Command::new("losetup")
                        .arg("-d")
                        .arg(dev)
                        .status();
                }
            }
        }
    }
}

/// One test's world: a state dir with the embedded RDS's backing files, a kubelet root,
/// and a node service over the embedded adapters.
struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    node: NodeService,
    _cleanup: Cleanup,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(embedded_volume_dir(&root.join("state"))).unwrap();
        std::fs::create_dir_all(root.join("kubelet")).unwrap();
        let node = Self::service(&root);
        World {
            _dir: dir,
            _cleanup: Cleanup { root: root.clone() },
            root,
            node,
        }
    }

    /// A fresh service over the same kernel state: what a restarted plugin sees.
    fn service(root: &Path) -> NodeService {
        NodeService::new(NodeId::new("node-1").unwrap(), 0, Self::ops_in(root))
    }

    fn options(root: &Path) -> NodeOptions {
        NodeOptions {
            allowed_root: Some(root.join("kubelet")),
            nqn_prefix: PREFIX.into(),
            require_target_address: false,
            ..NodeOptions::default()
        }
    }

    /// The node core over the embedded kernel (loop devices over the state dir's files).
    fn ops_in(root: &Path) -> NodeOps {
        let kernel = loop_kernel(&root.join("state"), &NodeId::new("node-1").unwrap(), PREFIX);
        NodeOps::new(kernel.initiator, kernel.mounter, Self::options(root))
    }

    fn ops(&self) -> NodeOps {
        Self::ops_in(&self.root)
    }

    /// Creates `vol` on the embedded RDS, exported to any host (what CreateVolume does with
    /// the data-path fence off): its backing file, and the export the loop initiator must
    /// be admitted to.
    fn create_volume(&self, vol: &str, bytes: u64) {
        use rds_csi::routeros::command::{Command, DiskAdd, ExportSpec};
        let emulator = rds_csi::compose::embedded_emulator(
            &self.root.join("state"),
            std::sync::Arc::new(rds_csi::ports::time::SystemClock),
        )
        .unwrap();
        let add = emulator.apply(&Command::DiskAdd(DiskAdd {
            slot: vol.into(),
            file_path: format!("{}/{vol}.img", rds_csi::settings::EMBEDDED_VOLUME_PATH),
            size_bytes: Some(bytes),
            copy_from: None,
            export: Some(ExportSpec {
                port: 4420,
                nqn: format!("{PREFIX}{vol}"),
                allow_host: None,
            }),
            comment: None,
        }));
        assert!(add.ok, "{}", add.output);
        assert_eq!(std::fs::metadata(self.backing(vol)).unwrap().len(), bytes);
    }

    /// Grows the backing file (what ControllerExpandVolume does on the embedded RDS).
    fn grow_volume(&self, vol: &str, bytes: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.backing(vol))
            .unwrap();
        f.set_len(bytes).unwrap();
    }

    fn backing(&self, vol: &str) -> PathBuf {
        embedded_volume_dir(&self.root.join("state")).join(format!("{vol}.img"))
    }

    fn staging(&self, vol: &str) -> String {
        self.path(&format!("plugins/kubernetes.io/csi/rds/{vol}/globalmount"))
    }

    fn target(&self, vol: &str, pod: &str) -> String {
        self.path(&format!("pods/{pod}/volumes/kubernetes.io~csi/{vol}/mount"))
    }

    fn path(&self, rel: &str) -> String {
        self.root.join("kubelet").join(rel).display().to_string()
    }

    /// The loop device attached to `vol`'s backing file, from the kernel.
    fn loop_device(&self, vol: &str) -> Option<PathBuf> {
        let want = self.backing(vol);
        std::fs::read_dir("/sys/block")
            .ok()?
            .flatten()
            .find_map(|e| {
                let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                (Path::new(b.trim()) == want).then(|| Path::new("/dev").join(e.file_name()))
            })
    }

    fn mounted(&self, path: &str) -> Vec<String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        text.lines()
            .filter(|l| l.split(' ').nth(4) == Some(path))
            .map(str::to_string)
            .collect()
    }

    async fn stage(&self, vol: &str, cap: VolumeCapability) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(Request::new(NodeStageVolumeRequest {
                volume_id: vol.into(),
                publish_context: HashMap::new(),
                staging_target_path: self.staging(vol),
                volume_capability: Some(cap),
                secrets: HashMap::new(),
                volume_context: volume_context(vol),
            }))
            .await
            .map(|_| ())
    }

    async fn unstage(&self, vol: &str) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: self.staging(vol),
            }))
            .await
            .map(|_| ())
    }

    async fn publish(
        &self,
        vol: &str,
        target: &str,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: vol.into(),
                publish_context: HashMap::new(),
                staging_target_path: self.staging(vol),
                target_path: target.into(),
                volume_capability: Some(cap),
                readonly,
                secrets: HashMap::new(),
                volume_context: volume_context(vol),
            }))
            .await
            .map(|_| ())
    }

    async fn unpublish(&self, vol: &str, target: &str) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.into(),
            }))
            .await
            .map(|_| ())
    }

    async fn stats(
        &self,
        vol: &str,
        path: &str,
    ) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
        self.node
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: vol.into(),
                volume_path: path.into(),
                staging_target_path: String::new(),
            }))
            .await
            .map(|r| r.into_inner())
    }

    async fn expand(&self, vol: &str, path: &str, required: u64) -> Result<i64, tonic::Status> {
        self.node
            .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                volume_id: vol.into(),
                volume_path: path.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: required as i64,
                    limit_bytes: 0,
                }),
                staging_target_path: String::new(),
                volume_capability: None,
                secrets: HashMap::new(),
            }))
            .await
            .map(|r| r.into_inner().capacity_bytes)
    }
}

fn volume_context(vol: &str) -> HashMap<String, String> {
    [
        (context::NVME_ADDRESS, "127.0.0.1"),
        (context::NVME_PORT, "4420"),
        (context::NQN, &format!("{PREFIX}{vol}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn mount_cap(fs: &str, mode: AM) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap(mode: AM) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn usage(r: &NodeGetVolumeStatsResponse, unit: volume_usage::Unit) -> Option<VolumeUsage> {
    r.usage.iter().find(|u| u.unit == unit as i32).copied()
}

/// Whether this process may resize a mounted ext4 (the kernel checks CAP_SYS_RESOURCE).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << 24) != 0
}

/// stage → publish → stats → expand → unpublish → unstage, every call twice.
async fn mount_lifecycle(fs: &str, vol: &str, size: u64, grown: u64) {
    let w = World::new();
    w.create_volume(vol, size);
    let cap = mount_cap(fs, AM::SingleNodeWriter);
    for _ in 0..2 {
        w.stage(vol, cap.clone()).await.unwrap();
    }
    let dev = w.loop_device(vol).expect("a loop device after stage");
    assert_eq!(w.mounted(&w.staging(vol)).len(), 1, "staged exactly once");
    let target = w.target(vol, "pod-a");
    for _ in 0..2 {
        w.publish(vol, &target, cap.clone(), false).await.unwrap();
    }
    assert_eq!(w.mounted(&target).len(), 1, "published exactly once");
    std::fs::write(Path::new(&target).join("data"), b"hello").unwrap();

    let stats = w.stats(vol, &target).await.unwrap();
    let bytes = usage(&stats, volume_usage::Unit::Bytes).unwrap();
    let inodes = usage(&stats, volume_usage::Unit::Inodes).unwrap();
    assert!(bytes.total > 0 && bytes.total <= size as i64, "{bytes:?}");
    assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
    assert!(!stats.volume_condition.unwrap().abnormal);

    w.grow_volume(vol, grown);
    let online_ok = fs == "xfs" || has_cap_sys_resource();
    for _ in 0..2 {
        match w.expand(vol, &target, grown).await {
            Ok(cap) => {
                assert!(online_ok, "ext4 grew without CAP_SYS_RESOURCE?");
                assert_eq!(cap, grown as i64);
            }
            Err(e) => {
                // This container lacks CAP_SYS_RESOURCE: a clear error, not a hang.
                assert!(!online_ok, "{e:?}");
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("CAP_SYS_RESOURCE"), "{e:?}");
            }
        }
    }
    let after = w.stats(vol, &target).await.unwrap();
    let total_after = usage(&after, volume_usage::Unit::Bytes).unwrap().total;
    if online_ok {
        assert!(
            total_after > bytes.total,
            "{total_after} <= {}",
            bytes.total
        );
    }

    for _ in 0..2 {
        w.unpublish(vol, &target).await.unwrap();
    }
    assert!(w.mounted(&target).is_empty());
    assert!(!Path::new(&target).exists(), "target path removed");
    for _ in 0..2 {
        w.unstage(vol).await.unwrap();
    }
    assert!(w.mounted(&w.staging(vol)).is_empty());
    assert_eq!(w.loop_device(vol), None, "{} detached", dev.display());
}

#[tokio::test]
async fn ext4_volume_lifecycle_with_repeated_calls() {
    mount_lifecycle("ext4", "pvc-ext4-life", 64 * MIB, 96 * MIB).await;
}

#[tokio::test]
async fn xfs_volume_lifecycle_with_repeated_calls() {
    mount_lifecycle("xfs", "pvc-xfs-life", 320 * MIB, 400 * MIB).await;
}

#[tokio::test]
async fn block_volume_lifecycle_with_repeated_calls() {
    let w = World::new();
    let vol = "pvc-block-life";
    w.create_volume(vol, 16 * MIB);
    let cap = block_cap(AM::SingleNodeWriter);
    for _ in 0..2 {
        w.stage(vol, cap.clone()).await.unwrap();
    }
    assert!(w.loop_device(vol).is_some());
    let target = w.path(&format!(
        "plugins/kubernetes.io/csi/volumeDevices/publish/{vol}/pod-a"
    ));
    // Some COs (csi-sanity) pre-create every target as a directory: replaced by a file.
    std::fs::create_dir_all(&target).unwrap();
    for _ in 0..2 {
        w.publish(vol, &target, cap.clone(), false).await.unwrap();
    }
    assert_eq!(w.mounted(&target).len(), 1);
    // The target is the device: write through it, read back through the backing file.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(b"raw-block").unwrap();
        f.sync_all().unwrap();
    }
    let mut buf = [0u8; 9];
    let mut f = std::fs::File::open(w.backing(vol)).unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"raw-block");

    let stats = w.stats(vol, &target).await.unwrap();
    assert_eq!(
        usage(&stats, volume_usage::Unit::Bytes).unwrap().total,
        (16 * MIB) as i64
    );
    assert!(usage(&stats, volume_usage::Unit::Inodes).is_none());
    assert!(!stats.volume_condition.unwrap().abnormal);

    w.grow_volume(vol, 32 * MIB);
    for _ in 0..2 {
        assert_eq!(
            w.expand(vol, &target, 32 * MIB).await.unwrap(),
            (32 * MIB) as i64
        );
    }
    let stats = w.stats(vol, &target).await.unwrap();
    assert_eq!(
        usage(&stats, volume_usage::Unit::Bytes).unwrap().total,
        (32 * MIB) as i64
    );

    for _ in 0..2 {
        w.unpublish(vol, &target).await.unwrap();
    }
    assert!(!Path::new(&target).exists());
    for _ in 0..2 {
        w.unstage(vol).await.unwrap();
    }
    assert_eq!(w.loop_device(vol), None);
}

#[tokio::test]
async fn a_device_with_a_filesystem_is_never_reformatted() {
    let w = World::new();
    let vol = "pvc-keep";
    w.create_volume(vol, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    w.stage(vol, cap.clone()).await.unwrap();
    std::fs::write(Path::new(&w.staging(vol)).join("precious"), b"data").unwrap();
    w.unstage(vol).await.unwrap();
    assert_eq!(w.loop_device(vol), None);

    // A request for another filesystem must not wipe it either.
    let err = w
        .stage(vol, mount_cap("xfs", AM::SingleNodeWriter))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("refusing to reformat"), "{err:?}");

    w.stage(vol, cap.clone()).await.unwrap();
    let got = std::fs::read(Path::new(&w.staging(vol)).join("precious")).unwrap();
    assert_eq!(got, b"data");
    w.unstage(vol).await.unwrap();
}

#[tokio::test]
async fn staging_an_already_staged_volume_is_ok_and_incompatible_is_already_exists() {
    let w = World::new();
    let vol = "pvc-restage";
    w.create_volume(vol, 64 * MIB);
    w.stage(vol, mount_cap("ext4", AM::SingleNodeWriter))
        .await
        .unwrap();
    w.stage(vol, mount_cap("ext4", AM::SingleNodeWriter))
        .await
        .unwrap();
    assert_eq!(w.mounted(&w.staging(vol)).len(), 1);
    let err = w
        .stage(vol, mount_cap("ext4", AM::SingleNodeReaderOnly))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    w.unstage(vol).await.unwrap();
}

#[tokio::test]
async fn unstage_of_a_volume_that_is_not_staged_is_ok() {
    let w = World::new();
    w.unstage("pvc-never-staged").await.unwrap();
    w.create_volume("pvc-never-staged", 16 * MIB);
    w.unstage("pvc-never-staged").await.unwrap();
    w.unpublish("pvc-never-staged", &w.target("pvc-never-staged", "pod-x"))
        .await
        .unwrap();
}

#[tokio::test]
async fn single_writer_volume_cannot_be_published_at_a_second_target() {
    let w = World::new();
    let vol = "pvc-sn-sw";
    w.create_volume(vol, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeSingleWriter);
    w.stage(vol, cap.clone()).await.unwrap();
    w.publish(vol, &w.target(vol, "pod-a"), cap.clone(), false)
        .await
        .unwrap();
    let err = w
        .publish(vol, &w.target(vol, "pod-b"), cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        !Path::new(&w.target(vol, "pod-b")).exists()
            || w.mounted(&w.target(vol, "pod-b")).is_empty()
    );
    // SINGLE_NODE_MULTI_WRITER may be published at several targets on this node.
    let multi = mount_cap("ext4", AM::SingleNodeMultiWriter);
    w.unpublish(vol, &w.target(vol, "pod-a")).await.unwrap();
    w.publish(vol, &w.target(vol, "pod-a"), multi.clone(), false)
        .await
        .unwrap();
    w.publish(vol, &w.target(vol, "pod-c"), multi.clone(), true)
        .await
        .unwrap();
    // Read-only publish: the kernel refuses writes there.
    let ro = std::fs::write(Path::new(&w.target(vol, "pod-c")).join("x"), b"x");
    assert!(ro.is_err());
    // Published again at the same target with the other readonly flag: incompatible.
    let err = w
        .publish(vol, &w.target(vol, "pod-c"), multi.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Unstage while published is refused (busy), never a hang.
    let err = w.unstage(vol).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for pod in ["pod-a", "pod-c"] {
        w.unpublish(vol, &w.target(vol, pod)).await.unwrap();
    }
    w.unstage(vol).await.unwrap();
    assert_eq!(w.loop_device(vol), None);

    // Raw block: the same rule.
    let bvol = "pvc-sn-sw-block";
    w.create_volume(bvol, 16 * MIB);
    let bcap = block_cap(AM::SingleNodeSingleWriter);
    w.stage(bvol, bcap.clone()).await.unwrap();
    let t1 = w.path("plugins/kubernetes.io/csi/volumeDevices/publish/b/pod-a");
    let t2 = w.path("plugins/kubernetes.io/csi/volumeDevices/publish/b/pod-b");
    w.publish(bvol, &t1, bcap.clone(), false).await.unwrap();
    let err = w.publish(bvol, &t2, bcap.clone(), false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    w.unpublish(bvol, &t1).await.unwrap();
    w.unstage(bvol).await.unwrap();
}

#[tokio::test]
async fn stats_report_not_found_and_abnormal_conditions() {
    let w = World::new();
    let vol = "pvc-stats";
    w.create_volume(vol, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    w.stage(vol, cap.clone()).await.unwrap();
    let target = w.target(vol, "pod-a");
    w.publish(vol, &target, cap.clone(), false).await.unwrap();

    let err = w.stats("pvc-unknown", &target).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = w
        .stats(vol, &w.target(vol, "no-such-pod"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = w.expand("pvc-unknown", &target, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = w
        .expand(vol, &w.target(vol, "no-such-pod"), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Someone unmounts the target behind the plugin's back: abnormal, with a reason.
    assert!(
        std::process::Command::new("umount")
            .arg(&target)
            .status()
            .unwrap()
            .success()
    );
    let stats = w.stats(vol, &target).await.unwrap();
    let cond = stats.volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("not mounted"),
        "{cond:?}"
    );

    w.unpublish(vol, &target).await.unwrap();
    w.unstage(vol).await.unwrap();
}

#[tokio::test]
async fn a_restarted_node_learns_attachments_from_the_kernel() {
    let w = World::new();
    let vol = "pvc-restart";
    w.create_volume(vol, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    w.stage(vol, cap.clone()).await.unwrap();
    let target = w.target(vol, "pod-a");
    w.publish(vol, &target, cap.clone(), false).await.unwrap();

    // "Restart": a new service and core with no memory of the calls above.
    let found = w.ops().recover().await.unwrap();
    let ours: Vec<_> = found
        .iter()
        .filter(|v| v.nqn == format!("{PREFIX}{vol}"))
        .collect();
    assert_eq!(ours.len(), 1, "{found:?}");
    assert_eq!(
        ours[0].mounts,
        vec![PathBuf::from(w.staging(vol)), PathBuf::from(&target)]
    );
    let restarted = World::service(&w.root);
    let w2 = World {
        _dir: tempfile::tempdir().unwrap(),
        root: w.root.clone(),
        node: restarted,
        _cleanup: Cleanup {
            root: w.root.join("nothing"),
        },
    };
    // kubelet repeats the calls it is unsure of, then tears down.
    w2.stage(vol, cap.clone()).await.unwrap();
    w2.publish(vol, &target, cap.clone(), false).await.unwrap();
    assert_eq!(w.mounted(&target).len(), 1);
    w2.unpublish(vol, &target).await.unwrap();
    w2.unstage(vol).await.unwrap();
    assert_eq!(w.loop_device(vol), None);
}

#[tokio::test]
async fn paths_outside_the_kubelet_root_are_invalid_arguments() {
    let w = World::new();
    let vol = "pvc-paths";
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    for bad in ["/etc", "relative", "/tmp/../etc/x"] {
        let err = w
            .node
            .node_stage_volume(Request::new(NodeStageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: bad.into(),
                volume_capability: Some(cap.clone()),
                volume_context: volume_context(vol),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("staging_target_path"), "{err:?}");
        let err = w.unpublish(vol, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // Nothing was attached by the refused calls.
    assert_eq!(w.loop_device(vol), None);
}

#[tokio::test]
async fn the_plugin_binary_attaches_over_its_socket_and_recovers_after_a_restart() {
    use rds_csi::proto::csi::node_client::NodeClient;
    let w = World::new();
    let state = w.root.join("state");
    let socket = w.root.join("csi.sock");
    let vol = "pvc-plugin-e2e";
    w.create_volume(vol, 64 * MIB);
    let mut plugin = common::Plugin::start(&socket, &state, &["--mode", "all"]);
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    // The data-path fence parked the volume at start-up: publish it to this node first.
    rds_csi::proto::csi::controller_client::ControllerClient::new(plugin.channel().await)
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: "test-node".into(),
            volume_capability: Some(cap.clone()),
            volume_context: volume_context(vol),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut node = NodeClient::new(plugin.channel().await);
    let staging = w.staging(vol);
    let target = w.target(vol, "pod-a");
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: volume_context(vol),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: volume_context(vol),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(w.loop_device(vol).is_some());

    // Crash and restart: the new process learns the attachment from the kernel before
    // serving.
    drop(node);
    plugin.signal("KILL");
    let _ = plugin.child.wait();
    drop(plugin);
    let mut plugin = common::Plugin::spawn(&socket, &state, &["--mode", "all"]);
    plugin.wait_for_log(&format!("nqn={PREFIX}{vol}"));
    plugin.wait_for_log("serving");
    let mut node = NodeClient::new(plugin.channel().await);
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.into(),
            volume_path: target.clone(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.clone(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging,
    })
    .await
    .unwrap();
    assert_eq!(w.loop_device(vol), None);
    assert!(!Path::new(&target).exists());
}

#[tokio::test]
async fn a_volume_travels_create_publish_stage_and_back_in_one_embedded_plugin() {
    use rds_csi::proto::csi::controller_client::ControllerClient;
    use rds_csi::proto::csi::node_client::NodeClient;
    let w = World::new();
    let state = w.root.join("state");
    let plugin = common::Plugin::start(&w.root.join("csi.sock"), &state, &["--mode", "all"]);
    let channel = plugin.channel().await;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let cap = mount_cap("xfs", AM::SingleNodeWriter);

    let vol = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-e2e-embedded".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: (320 * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    let pc = ctl
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "test-node".into(),
            volume_capability: Some(cap.clone()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let staging = w.staging(&id);
    let target = w.target(&id, "pod-a");
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: pc.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.clone(),
        publish_context: pc,
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The loop device sits on the very file the embedded RDS created for the volume.
    assert!(
        w.loop_device(&id).is_some(),
        "no loop device over {}",
        w.backing(&id).display()
    );
    std::fs::write(Path::new(&target).join("hello"), b"world").unwrap();

    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.clone(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging,
    })
    .await
    .unwrap();
    assert_eq!(w.loop_device(&id), None);
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "test-node".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!w.backing(&id).exists());
}

// ---- The self-healing data path on real loop devices ----------------------------------

/// Every loop device over `vol`'s backing file, with whether it is being detached
/// (autoclear: `losetup -d` while a mount still holds it).
fn loop_devices(w: &World, vol: &str) -> Vec<(PathBuf, bool)> {
    let want = w.backing(vol);
    let mut out: Vec<(PathBuf, bool)> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let autoclear = std::fs::read_to_string(e.path().join("loop/autoclear"))
                .is_ok_and(|v| v.trim() == "1");
            (Path::new(b.trim()) == want)
                .then(|| (Path::new("/dev").join(e.file_name()), autoclear))
        })
        .collect();
    out.sort();
    out
}

fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The source device of the mount at `path`.
fn source_of(w: &World, path: &str) -> String {
    let line = w
        .mounted(path)
        .pop()
        .unwrap_or_else(|| panic!("{path} not mounted"));
    line.split(" - ")
        .nth(1)
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .to_string()
}

/// `major:minor` of the mount at `path`.
fn dev_of(w: &World, path: &str) -> String {
    w.mounted(path)
        .pop()
        .unwrap()
        .split(' ')
        .nth(2)
        .unwrap()
        .to_string()
}

/// The volume's device goes away under its mounts and comes back under another name: the
/// loop device is detached (the kernel keeps it for the mounts, but it is no longer the
/// volume's: the initiator skips it) and the backing file attached again.
fn rename_device(w: &World, vol: &str) -> (PathBuf, PathBuf) {
    let old = w.loop_device(vol).unwrap();
    run("losetup", &["-d", &old.display().to_string()]);
    let new = PathBuf::from(run(
        "losetup",
        &["-f", "--show", &w.backing(vol).display().to_string()],
    ));
    assert_ne!(old, new);
    (old, new)
}

#[tokio::test]
async fn a_renamed_device_is_reported_abnormal_and_publish_then_stage_repair_it_keeping_the_data() {
    let w = World::new();
    let vol = "pvc-renamed";
    w.create_volume(vol, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeMultiWriter);
    w.stage(vol, cap.clone()).await.unwrap();
    let pod_a = w.target(vol, "pod-a");
    w.publish(vol, &pod_a, cap.clone(), false).await.unwrap();
    let file = Path::new(&pod_a).join("precious");
    std::fs::write(&file, b"written before the outage").unwrap();
    std::fs::File::open(&file).unwrap().sync_all().unwrap();

    let (old, new) = rename_device(&w, vol);
    let stats = w.stats(vol, &pod_a).await.unwrap();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("stale") && cond.message.contains(&old.display().to_string()),
        "{cond:?}"
    );

    // A new pod's NodePublishVolume repairs the staging mount and re-binds pod-a.
    let pod_b = w.target(vol, "pod-b");
    w.publish(vol, &pod_b, cap.clone(), false).await.unwrap();
    assert_eq!(source_of(&w, &w.staging(vol)), new.display().to_string());
    let new_dev = dev_of(&w, &w.staging(vol));
    assert_eq!(
        dev_of(&w, &pod_a),
        new_dev,
        "pod-a bound to the repaired filesystem"
    );
    assert_eq!(dev_of(&w, &pod_b), new_dev);
    assert_eq!(
        w.mounted(&pod_a).len(),
        1,
        "the dead bind is gone, not stacked under"
    );
    for pod in [&pod_a, &pod_b] {
        let got = std::fs::read(Path::new(pod).join("precious")).unwrap();
        assert_eq!(got, b"written before the outage");
        let cond = w.stats(vol, pod).await.unwrap().volume_condition.unwrap();
        assert!(!cond.abnormal, "{cond:?}");
    }
    // Nothing holds the old device any more: no mount, and the volume's only device in use
    // is the new one (the kernel detaches the old one once the last opener, often udev,
    // lets go of it).
    let in_use: Vec<(PathBuf, bool)> = loop_devices(&w, vol)
        .into_iter()
        .filter(|(_, detaching)| !detaching)
        .collect();
    assert_eq!(in_use, vec![(new.clone(), false)]);
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let old_source = format!(" {} ", old.display());
    let ours = |l: &&str| {
        l.split(' ')
            .nth(4)
            .is_some_and(|t| Path::new(t).starts_with(&w.root))
    };
    assert!(
        !table.lines().filter(ours).any(|l| l.contains(&old_source)),
        "{table}"
    );

    // Again, and this time the kubelet's NodeStageVolume repairs it.
    std::fs::write(Path::new(&pod_b).join("second"), b"also kept").unwrap();
    std::fs::File::open(Path::new(&pod_b).join("second"))
        .unwrap()
        .sync_all()
        .unwrap();
    let (_, newer) = rename_device(&w, vol);
    w.stage(vol, cap.clone()).await.unwrap();
    assert_eq!(source_of(&w, &w.staging(vol)), newer.display().to_string());
    for pod in [&pod_a, &pod_b] {
        assert_eq!(
            std::fs::read(Path::new(pod).join("second")).unwrap(),
            b"also kept"
        );
        assert!(
            !w.stats(vol, pod)
                .await
                .unwrap()
                .volume_condition
                .unwrap()
                .abnormal
        );
    }

    for pod in [&pod_a, &pod_b] {
        w.unpublish(vol, pod).await.unwrap();
    }
    w.unstage(vol).await.unwrap();
    assert!(loop_devices(&w, vol).is_empty());
}

#[tokio::test]
async fn a_corrupted_ext4_is_refused_at_stage_and_a_replayable_one_is_repaired() {
    let w = World::new();
    let vol = "pvc-fsck";
    w.create_volume(vol, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    w.stage(vol, cap.clone()).await.unwrap();
    std::fs::write(Path::new(&w.staging(vol)).join("data"), b"x").unwrap();
    w.unstage(vol).await.unwrap();
    let img = w.backing(vol).display().to_string();

    // Marked as having errors (as the kernel does after an I/O error), nothing else wrong:
    // e2fsck -p repairs it on its own and the stage goes on.
    run("debugfs", &["-w", "-R", "ssv state 2", &img]);
    w.stage(vol, cap.clone()).await.unwrap();
    assert_eq!(
        std::fs::read(Path::new(&w.staging(vol)).join("data")).unwrap(),
        b"x"
    );
    w.unstage(vol).await.unwrap();
    // A mount alone keeps the error state; the check before it cleared it.
    let state = run("dumpe2fs", &["-h", &img]);
    assert!(
        state
            .lines()
            .any(|l| l.starts_with("Filesystem state:") && l.ends_with(" clean")),
        "{state}"
    );

    // The root directory destroyed: only a person may repair that. Refused, clearly, with
    // nothing mounted and nothing formatted.
    run("debugfs", &["-w", "-R", "clri <2>", &img]);
    run("debugfs", &["-w", "-R", "ssv state 2", &img]);
    let err = w.stage(vol, cap.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("cannot repair without a person")
            && err.message().contains("e2fsck -f"),
        "{err:?}"
    );
    assert!(w.mounted(&w.staging(vol)).is_empty());
    let fs = run("blkid", &["-p", "-o", "value", "-s", "TYPE", &img]);
    assert_eq!(fs, "ext4", "never reformatted");
    w.unstage(vol).await.unwrap();
    assert!(loop_devices(&w, vol).is_empty());
}

#[tokio::test]
async fn orphan_cleanup_leaves_foreign_devices_and_mounts_alone() {
    use rds_csi::backend::local_cluster::LocalCluster;
    use rds_csi::csi::inflight::InFlight;
    use rds_csi::metrics::Metrics;
    use rds_csi::node::{OrphanConfig, OrphanSweeper};
    use rds_csi::ports::cluster::VolumeAttachmentInfo;
    use std::sync::Arc;

    let w = World::new();
    // Left behind by an earlier life of the node: attached, nothing uses it.
    for vol in ["pvc-orphan", "pvc-held"] {
        w.create_volume(vol, 16 * MIB);
        run(
            "losetup",
            &["-f", "--show", &w.backing(vol).display().to_string()],
        );
    }
    // Staged and published: in use.
    let staged = "pvc-staged";
    w.create_volume(staged, 64 * MIB);
    let cap = mount_cap("ext4", AM::SingleNodeWriter);
    w.stage(staged, cap.clone()).await.unwrap();
    w.publish(staged, &w.target(staged, "pod-a"), cap, false)
        .await
        .unwrap();
    // Someone else's loop device, mounted under the kubelet root, and a tmpfs there too.
    let foreign = w.root.join("foreign.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    run("mkfs.ext4", &["-q", &foreign.display().to_string()]);
    let foreign_dev = run("losetup", &["-f", "--show", &foreign.display().to_string()]);
    let foreign_mnt = w.path("pods/other/volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&foreign_mnt).unwrap();
    run("mount", &[&foreign_dev, &foreign_mnt]);
    let tmpfs = w.path("plugins/kubernetes.io/csi/rds/pvc-orphan/globalmount");
    std::fs::create_dir_all(&tmpfs).unwrap();
    run("mount", &["-t", "tmpfs", "tmpfs", &tmpfs]);

    // The records hold pvc-held on this node (a staged raw block volume has no mount).
    let cluster = Arc::new(LocalCluster::new([]));
    cluster.set_volume_attachments(Some(vec![VolumeAttachmentInfo {
        volume_id: rds_csi::types::VolumeId::new("pvc-held").unwrap(),
        node_id: NodeId::new("node-1").unwrap(),
        attached: true,
        deleting: false,
    }]));
    let sweeper = OrphanSweeper::new(
        NodeId::new("node-1").unwrap(),
        w.ops(),
        cluster,
        Arc::new(InFlight::default()),
        OrphanConfig {
            interval: std::time::Duration::from_secs(60),
            grace: std::time::Duration::ZERO,
            dry_run: false,
        },
        Arc::new(Metrics::default()),
    );
    let report = sweeper.sweep().await.unwrap();
    assert_eq!(report.disconnected, vec![format!("{PREFIX}pvc-orphan")]);
    assert!(loop_devices(&w, "pvc-orphan").is_empty());
    assert_eq!(loop_devices(&w, "pvc-held").len(), 1);
    assert_eq!(loop_devices(&w, staged).len(), 1);
    assert_eq!(w.mounted(&w.staging(staged)).len(), 1);
    assert_eq!(w.mounted(&foreign_mnt).len(), 1, "foreign mount untouched");
    assert_eq!(w.mounted(&tmpfs).len(), 1, "tmpfs untouched");
    let backing = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/backing_file",
        Path::new(&foreign_dev)
            .file_name()
            .unwrap()
            .to_string_lossy()
    ))
    .unwrap();
    assert_eq!(
        backing.trim(),
        foreign.display().to_string(),
        "foreign loop device attached"
    );
    // A second sweep finds nothing more to do.
    assert!(sweeper.sweep().await.unwrap().disconnected.is_empty());

    w.unpublish(staged, &w.target(staged, "pod-a"))
        .await
        .unwrap();
    w.unstage(staged).await.unwrap();
}
