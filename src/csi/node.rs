//! The CSI Node service: stage, publish, expand and stats on the node.
//!
//! Each RPC runs through [`crate::csi::rpc`] (span with the volume id, redacted request log,
//! the one error table): pure `validate_*` (INVALID_ARGUMENT naming the field) → in-flight
//! guard on the volume id (ABORTED on a concurrent call) → the node core
//! ([`crate::node::ops`]). RPCs not listed in `NodeGetCapabilities` answer UNIMPLEMENTED.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};

use crate::csi::inflight::InFlight;
use crate::csi::rpc;
use crate::error::{Error, Result};
use crate::node::mount::SUPPORTED_FS_TYPES;
use crate::node::ops::{NodeAccess, NodeCapability, NodeOps, Publish, Stage, VolumeKind};
use crate::node::paths::validate_path;
use crate::ports::initiator::NvmeTarget;
use crate::types::context;
use crate::types::defaults::DEFAULT_NVME_PORT;
use crate::proto::csi::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage, node_server, node_service_capability, volume_capability,
    volume_usage,
};
use crate::types::{NodeId, Nqn, VolumeId};

/// Topology key naming the node a volume is reachable from.
pub const TOPOLOGY_NODE_KEY: &str = "topology.rds.csi.srvlab.io/node";

/// Default filesystem when neither the capability nor the volume context names one.
pub const DEFAULT_FS_TYPE: &str = "ext4";

/// Node service state (one per plugin instance).
pub struct NodeService {
    node_id: NodeId,
    max_volumes_per_node: i64,
    ops: NodeOps,
    inflight: InFlight,
}

impl NodeService {
    /// A node service over the node core `ops`, reporting `node_id` and
    /// `max_volumes_per_node` (0: no limit) in NodeGetInfo.
    pub fn new(node_id: NodeId, max_volumes_per_node: i64, ops: NodeOps) -> Self {
        Self {
            node_id,
            max_volumes_per_node,
            ops,
            inflight: InFlight::default(),
        }
    }

    /// Shares `inflight` (the keys of the operations in flight) with the node's background
    /// work, the orphan sweep, so the two never act on one volume at once.
    pub fn with_inflight(mut self, inflight: InFlight) -> Self {
        self.inflight = inflight;
        self
    }
}

/// The orphan sweep holds a volume's key like an RPC does (see [`NodeService::guard`]).
impl crate::node::VolumeBusy for InFlight {
    fn try_hold(&self, volume: &VolumeId) -> Option<Box<dyn Send>> {
        self.try_start(volume.as_str(), &format!("volume {volume}"))
            .ok()
            .map(|g| Box::new(g) as Box<dyn Send>)
    }
}

fn volume_id(value: &str) -> Result<VolumeId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument("volume_id is required".into()));
    }
    Ok(VolumeId::new(value)?)
}

/// Validates a volume capability for the node.
pub fn validate_capability(
    cap: Option<&VolumeCapability>,
    volume_context: &HashMap<String, String>,
) -> Result<NodeCapability> {
    use volume_capability::access_mode::Mode;
    let cap = cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume_capability.access_mode is required".into()))?
        .mode;
    let access = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeMultiWriter) => NodeAccess::Writer,
        Ok(Mode::MultiNodeMultiWriter | Mode::MultiNodeSingleWriter) => NodeAccess::Writer,
        Ok(Mode::SingleNodeSingleWriter) => NodeAccess::SingleWriter,
        Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly) => NodeAccess::ReadOnly,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "volume_capability.access_mode.mode {mode} is not a known access mode"
            )));
        }
    };
    let kind = match &cap.access_type {
        Some(volume_capability::AccessType::Block(_)) => VolumeKind::Block,
        Some(volume_capability::AccessType::Mount(m)) => {
            if matches!(Mode::try_from(mode), Ok(Mode::MultiNodeMultiWriter)) {
                return Err(Error::InvalidArgument(
                    "volume_capability: MULTI_NODE_MULTI_WRITER is only supported for block \
                     volumes (ext4/xfs cannot be mounted read-write on two nodes)"
                        .into(),
                ));
            }
            let fs_type = if !m.fs_type.is_empty() {
                m.fs_type.clone()
            } else {
                volume_context
                    .get(context::FS_TYPE)
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_FS_TYPE.to_string())
            };
            if !SUPPORTED_FS_TYPES.contains(&fs_type.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "volume_capability.mount.fs_type {fs_type:?} is not supported; use one of {SUPPORTED_FS_TYPES:?}"
                )));
            }
            for f in &m.mount_flags {
                if f.is_empty()
                    || f.starts_with('-')
                    || f.contains(',')
                    || f.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(Error::InvalidArgument(format!(
                        "volume_capability.mount.mount_flags: {f:?} is not a single mount option"
                    )));
                }
            }
            VolumeKind::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_type (mount or block) is required".into(),
            ));
        }
    };
    Ok(NodeCapability { kind, access })
}

/// Reads the NVMe/TCP target from the publish context (first) and the volume context.
///
/// `nvmeAddress` is required when `require_address` (the NVMe/TCP initiator); otherwise an
/// absent address is left empty (loop devices on the embedded default need none).
pub fn target_from_context(
    nqn_default: String,
    publish_context: &HashMap<String, String>,
    volume_context: &HashMap<String, String>,
    require_address: bool,
) -> Result<NvmeTarget> {
    let get = |k: &str| {
        publish_context
            .get(k)
            .or_else(|| volume_context.get(k))
            .filter(|v| !v.is_empty())
    };
    fn num<T: std::str::FromStr>(key: &str, v: Option<&String>) -> Result<Option<T>> {
        v.map(|v| {
            v.trim().parse::<T>().map_err(|_| {
                Error::InvalidArgument(format!("volume_context {key}={v:?} is not a valid number"))
            })
        })
        .transpose()
    }
    let address = match get(context::NVME_ADDRESS) {
        Some(a) => a.clone(),
        None if !require_address => String::new(),
        None => {
            return Err(Error::InvalidArgument(format!(
                "volume_context/publish_context {} (the NVMe/TCP target address) is required",
                context::NVME_ADDRESS
            )));
        }
    };
    if address.starts_with('-') || address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidArgument(format!(
            "volume_context {}={address:?} is not an address",
            context::NVME_ADDRESS
        )));
    }
    let nqn = match get(context::NQN) {
        Some(n) => Nqn::new(n.clone())
            .map_err(|e| Error::InvalidArgument(format!("volume_context {}: {e}", context::NQN)))?
            .to_string(),
        None => nqn_default,
    };
    let port: Option<u16> = num(context::NVME_PORT, get(context::NVME_PORT))?;
    if port == Some(0) {
        return Err(Error::InvalidArgument(format!(
            "volume_context {} must be 1..65535",
            context::NVME_PORT
        )));
    }
    let ctrl_loss_tmo: Option<i32> = num(context::CTRL_LOSS_TMO, get(context::CTRL_LOSS_TMO))?;
    if ctrl_loss_tmo.is_some_and(|v| v < -1) {
        return Err(Error::InvalidArgument(format!(
            "volume_context {} must be -1 (forever) or a number of seconds",
            context::CTRL_LOSS_TMO
        )));
    }
    Ok(NvmeTarget {
        address,
        port: port.unwrap_or(DEFAULT_NVME_PORT),
        nqn,
        ctrl_loss_tmo,
        reconnect_delay: num(context::RECONNECT_DELAY, get(context::RECONNECT_DELAY))?,
        // 0 is the kernel's default, as the earlier driver wrote it into every volume
        // context; passed on, it would switch keep-alive off instead.
        keep_alive_tmo: num::<u32>(context::KEEP_ALIVE_TMO, get(context::KEEP_ALIVE_TMO))?
            .filter(|&v| v != 0),
    })
}

/// The volume and path of NodeGetVolumeStats / NodeExpandVolume. Only absent fields are
/// INVALID_ARGUMENT: an id no volume can have, or a path that cannot hold the volume
/// (relative, not normalized, outside the kubelet root), is NOT_FOUND — the spec's
/// "Indicates that a volume corresponding to the specified volume_id does not exist on
/// specified volume_path" (stats) and "... could not be found" (expand).
fn located_volume(id: &str, path: &str, root: Option<&Path>) -> Result<(VolumeId, PathBuf)> {
    // Present but unusable: "not there", not a malformed request.
    let not_found = |given: &str, e: Error| match e {
        Error::InvalidArgument(m) if !given.is_empty() => Error::NotFound(m),
        e => e,
    };
    let id = volume_id(id).map_err(|e| not_found(id, e))?;
    let path = validate_path("volume_path", path, root).map_err(|e| match not_found(path, e) {
        Error::NotFound(m) => Error::NotFound(format!("volume {id}: {m}")),
        e => e,
    })?;
    Ok((id, path))
}

/// Validates NodeStageVolume.
pub fn validate_stage(req: &NodeStageVolumeRequest, ops: &NodeOps) -> Result<Stage> {
    let volume_id = volume_id(&req.volume_id)?;
    let root = ops.options().allowed_root.as_deref();
    let staging_path = validate_path("staging_target_path", &req.staging_target_path, root)?;
    let cap = validate_capability(req.volume_capability.as_ref(), &req.volume_context)?;
    let target = target_from_context(
        ops.nqn_for(&volume_id),
        &req.publish_context,
        &req.volume_context,
        ops.options().require_target_address,
    )?;
    Ok(Stage {
        volume_id,
        staging_path,
        cap,
        target,
    })
}

/// Validates NodePublishVolume.
pub fn validate_publish(req: &NodePublishVolumeRequest, ops: &NodeOps) -> Result<Publish> {
    let volume_id = volume_id(&req.volume_id)?;
    let root = ops.options().allowed_root.as_deref();
    // Spec: "staging_target_path ... This field is REQUIRED if STAGE_UNSTAGE_VOLUME
    // capability is set" (it is).
    let staging_path = validate_path("staging_target_path", &req.staging_target_path, root)?;
    let target_path = validate_path("target_path", &req.target_path, root)?;
    if target_path == staging_path {
        return Err(Error::InvalidArgument(
            "target_path must differ from staging_target_path".into(),
        ));
    }
    let cap = validate_capability(req.volume_capability.as_ref(), &req.volume_context)?;
    // The connect details too: a stale staging mount is repaired here (an address is only
    // needed then, so its absence is not refused up front).
    let target = target_from_context(
        ops.nqn_for(&volume_id),
        &req.publish_context,
        &req.volume_context,
        false,
    )?;
    let readonly = req.readonly || cap.access == NodeAccess::ReadOnly;
    Ok(Publish {
        volume_id,
        staging_path,
        target_path,
        cap,
        readonly,
        target,
    })
}

impl NodeService {
    fn guard(&self, id: &VolumeId) -> Result<crate::csi::inflight::InFlightGuard> {
        self.inflight
            .try_start(id.as_str(), &format!("volume {id}"))
    }

    fn root(&self) -> Option<&std::path::Path> {
        self.ops.options().allowed_root.as_deref()
    }

    async fn do_stage(&self, req: &NodeStageVolumeRequest) -> Result<()> {
        let r = validate_stage(req, &self.ops)?;
        let _g = self.guard(&r.volume_id)?;
        self.ops.stage(&r).await
    }

    async fn do_unstage(&self, req: &NodeUnstageVolumeRequest) -> Result<()> {
        let id = volume_id(&req.volume_id)?;
        let path = validate_path("staging_target_path", &req.staging_target_path, self.root())?;
        let _g = self.guard(&id)?;
        self.ops.unstage(&id, &path).await
    }

    async fn do_publish(&self, req: &NodePublishVolumeRequest) -> Result<()> {
        let r = validate_publish(req, &self.ops)?;
        let _g = self.guard(&r.volume_id)?;
        self.ops.publish(&r).await
    }

    async fn do_unpublish(&self, req: &NodeUnpublishVolumeRequest) -> Result<()> {
        let id = volume_id(&req.volume_id)?;
        let path = validate_path("target_path", &req.target_path, self.root())?;
        let _g = self.guard(&id)?;
        self.ops.unpublish(&id, &path).await
    }

    async fn do_expand(&self, req: &NodeExpandVolumeRequest) -> Result<i64> {
        let (id, path) = located_volume(&req.volume_id, &req.volume_path, self.root())?;
        if !req.staging_target_path.is_empty() {
            validate_path("staging_target_path", &req.staging_target_path, self.root())?;
        }
        let required = match &req.capacity_range {
            Some(r) if r.required_bytes < 0 || r.limit_bytes < 0 => {
                return Err(Error::InvalidArgument(
                    "capacity_range bytes must not be negative".into(),
                ));
            }
            Some(r) if r.required_bytes > 0 => Some(r.required_bytes as u64),
            _ => None,
        };
        let _g = self.guard(&id)?;
        let size = self.ops.expand(&id, &path, required).await?;
        Ok(i64::try_from(size).unwrap_or(i64::MAX))
    }

    async fn do_stats(
        &self,
        req: &NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse> {
        let (id, path) = located_volume(&req.volume_id, &req.volume_path, self.root())?;
        // Stats only read: no in-flight guard, so kubelet's periodic polling never
        // ABORTs a concurrent stage or publish.
        let h = self.ops.stats(&id, &path).await?;
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut usage = vec![VolumeUsage {
            available: clamp(h.usage.available_bytes),
            total: clamp(h.usage.total_bytes),
            used: clamp(h.usage.used_bytes),
            unit: volume_usage::Unit::Bytes as i32,
        }];
        if !h.block && h.abnormal.is_none() {
            usage.push(VolumeUsage {
                available: clamp(h.usage.free_inodes),
                total: clamp(h.usage.total_inodes),
                used: clamp(h.usage.used_inodes),
                unit: volume_usage::Unit::Inodes as i32,
            });
        }
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition {
                abnormal: h.abnormal.is_some(),
                message: h.abnormal.unwrap_or_else(|| "volume is healthy".into()),
            }),
        })
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("NodeStageVolume", &req.volume_id, req, async {
            self.do_stage(req)
                .await
                .map(|()| NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("NodeUnstageVolume", &req.volume_id, req, async {
            self.do_unstage(req)
                .await
                .map(|()| NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("NodePublishVolume", &req.volume_id, req, async {
            self.do_publish(req)
                .await
                .map(|()| NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("NodeUnpublishVolume", &req.volume_id, req, async {
            self.do_unpublish(req)
                .await
                .map(|()| NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.get_ref();
        rpc("NodeGetVolumeStats", &req.volume_id, req, async {
            self.do_stats(req).await
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("NodeExpandVolume", &req.volume_id, req, async {
            self.do_expand(req)
                .await
                .map(|capacity_bytes| NodeExpandVolumeResponse { capacity_bytes })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{Rpc, Type, rpc::Type as T};
        let cap = |t: T| NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        rpc("NodeGetCapabilities", "", request.get_ref(), async {
            Ok(NodeGetCapabilitiesResponse {
                capabilities: vec![
                    cap(T::StageUnstageVolume),
                    cap(T::ExpandVolume),
                    cap(T::GetVolumeStats),
                    cap(T::VolumeCondition),
                    cap(T::SingleNodeMultiWriter),
                ],
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        rpc("NodeGetInfo", "", request.get_ref(), async {
            Ok(NodeGetInfoResponse {
                node_id: self.node_id.to_string(),
                max_volumes_per_node: self.max_volumes_per_node,
                accessible_topology: Some(Topology {
                    segments: [(TOPOLOGY_NODE_KEY.to_string(), self.node_id.to_string())]
                        .into(),
                }),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::VolumeCapability;
    use volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};

    fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capability_validation_names_the_field() {
        let ctx = HashMap::new();
        let c = validate_capability(Some(&mount_cap("", Mode::SingleNodeWriter)), &ctx).unwrap();
        assert_eq!(
            c.kind,
            VolumeKind::Mount {
                fs_type: "ext4".into(),
                flags: vec!["noatime".into()]
            }
        );
        let ctx: HashMap<_, _> = [(context::FS_TYPE.to_string(), "xfs".to_string())].into();
        let c =
            validate_capability(Some(&mount_cap("", Mode::SingleNodeSingleWriter)), &ctx).unwrap();
        assert!(matches!(c.kind, VolumeKind::Mount { ref fs_type, .. } if fs_type == "xfs"));
        assert_eq!(c.access, NodeAccess::SingleWriter);
        let block = VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
        };
        assert_eq!(
            validate_capability(Some(&block), &ctx).unwrap().kind,
            VolumeKind::Block
        );

        let bad: Vec<(Option<VolumeCapability>, &str)> = vec![
            (None, "volume_capability is required"),
            (Some(mount_cap("btrfs", Mode::SingleNodeWriter)), "fs_type"),
            (
                Some(mount_cap("ext4", Mode::MultiNodeMultiWriter)),
                "MULTI_NODE_MULTI_WRITER",
            ),
            (Some(mount_cap("ext4", Mode::Unknown)), "access_mode"),
            (
                Some(VolumeCapability {
                    access_type: None,
                    access_mode: Some(AccessMode { mode: 1 }),
                }),
                "access_type",
            ),
            (
                Some(VolumeCapability {
                    access_type: Some(AccessType::Mount(MountVolume {
                        fs_type: "ext4".into(),
                        mount_flags: vec!["rw,exec".into()],
                        volume_mount_group: String::new(),
                    })),
                    access_mode: Some(AccessMode { mode: 1 }),
                }),
                "mount_flags",
            ),
        ];
        for (cap, needle) in bad {
            let err = validate_capability(cap.as_ref(), &ctx).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(needle)),
                "{needle}: {err:?}"
            );
        }
    }

    #[test]
    fn target_comes_from_the_context_keys_with_publish_context_first() {
        let vc: HashMap<String, String> = [
            (context::NVME_ADDRESS, "10.0.0.1"),
            (context::NVME_PORT, "4421"),
            (context::NQN, "nqn.2000-02.com.mikrotik:pvc-1"),
            (context::CTRL_LOSS_TMO, "-1"),
            (context::RECONNECT_DELAY, "5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let pc: HashMap<String, String> = [
            (context::KEEP_ALIVE_TMO.to_string(), "15".to_string()),
            (context::NVME_ADDRESS.to_string(), "10.0.0.2".to_string()),
        ]
        .into();
        let t = target_from_context("default".into(), &pc, &vc, true).unwrap();
        assert_eq!(
            t,
            NvmeTarget {
                address: "10.0.0.2".into(),
                port: 4421,
                nqn: "nqn.2000-02.com.mikrotik:pvc-1".into(),
                ctrl_loss_tmo: Some(-1),
                reconnect_delay: Some(5),
                keep_alive_tmo: Some(15),
            }
        );
        let min: HashMap<String, String> =
            [(context::NVME_ADDRESS.to_string(), "h".to_string())].into();
        let t = target_from_context("nqn.x:pvc-2".into(), &HashMap::new(), &min, true).unwrap();
        assert_eq!((t.port, t.nqn.as_str()), (4420, "nqn.x:pvc-2"));
        // The earlier driver wrote keepAliveTmo=0 (the kernel's default) into every volume
        // context: no option, not keep-alive switched off.
        let mut go = min.clone();
        go.insert(context::KEEP_ALIVE_TMO.to_string(), "0".to_string());
        let t = target_from_context("nqn.x:pvc-2".into(), &HashMap::new(), &go, true).unwrap();
        assert_eq!(t.keep_alive_tmo, None);
        for (k, v) in [
            (context::NVME_PORT, "0"),
            (context::NVME_PORT, "http"),
            (context::CTRL_LOSS_TMO, "-5"),
            (context::NQN, "nqn with space"),
            (context::NVME_ADDRESS, "-o evil"),
        ] {
            let mut c = min.clone();
            c.insert(k.to_string(), v.to_string());
            let err = target_from_context("d".into(), &HashMap::new(), &c, true).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(k)),
                "{k}={v}: {err:?}"
            );
        }
        let err =
            target_from_context("d".into(), &HashMap::new(), &HashMap::new(), true).unwrap_err();
        assert!(err.to_string().contains(context::NVME_ADDRESS));
        // Loop devices need no address.
        let t =
            target_from_context("nqn.x:v".into(), &HashMap::new(), &HashMap::new(), false).unwrap();
        assert_eq!((t.address.as_str(), t.nqn.as_str()), ("", "nqn.x:v"));
    }

    // ---- The service over the in-memory kernel -------------------------------------------

    mod over_fake_kernel {
        use super::*;
        use crate::node::fake::FakeKernel;
        use std::sync::Arc;
        use crate::node::NodeOptions;
        use crate::proto::csi::node_server::Node;
        use tonic::Code;

        const PREFIX: &str = "nqn.2000-02.com.mikrotik:";

        fn service(k: &FakeKernel) -> NodeService {
            let ops = NodeOps::new(
                Arc::new(k.clone()),
                Arc::new(k.clone()),
                NodeOptions {
                    allowed_root: Some("/k".into()),
                    nqn_prefix: PREFIX.into(),
                    require_target_address: true,
                    ..NodeOptions::default()
                },
            );
            NodeService::new(NodeId::new("n1").unwrap(), 7, ops)
        }

        fn ctx(vol: &str) -> HashMap<String, String> {
            [
                (context::NVME_ADDRESS.to_string(), "10.0.0.1".to_string()),
                (context::NQN.to_string(), format!("{PREFIX}{vol}")),
            ]
            .into()
        }

        fn stage_req(vol: &str, cap: VolumeCapability) -> NodeStageVolumeRequest {
            NodeStageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: format!("/k/stage/{vol}"),
                volume_capability: Some(cap),
                volume_context: ctx(vol),
                ..Default::default()
            }
        }

        fn publish_req(vol: &str, pod: &str, cap: VolumeCapability) -> NodePublishVolumeRequest {
            NodePublishVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: format!("/k/stage/{vol}"),
                target_path: format!("/k/pods/{pod}/{vol}"),
                volume_capability: Some(cap),
                volume_context: ctx(vol),
                ..Default::default()
            }
        }

        fn stats_req(vol: &str, pod: &str) -> NodeGetVolumeStatsRequest {
            NodeGetVolumeStatsRequest {
                volume_id: vol.into(),
                volume_path: format!("/k/pods/{pod}/{vol}"),
                staging_target_path: String::new(),
            }
        }

        #[tokio::test]
        async fn lost_nvme_connection_makes_the_volume_abnormal() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            k.add_disk(&format!("{PREFIX}pvc-1"), 1 << 30);
            let svc = service(&k);
            let cap = mount_cap("xfs", Mode::SingleNodeWriter);
            svc.node_stage_volume(Request::new(stage_req("pvc-1", cap.clone())))
                .await
                .unwrap();
            svc.node_publish_volume(Request::new(publish_req("pvc-1", "p", cap)))
                .await
                .unwrap();
            let ok = svc
                .node_get_volume_stats(Request::new(stats_req("pvc-1", "p")))
                .await
                .unwrap()
                .into_inner();
            assert!(!ok.volume_condition.unwrap().abnormal);
            assert_eq!(ok.usage.len(), 2);

            k.lose_connection(&format!("{PREFIX}pvc-1"));
            let bad = svc
                .node_get_volume_stats(Request::new(stats_req("pvc-1", "p")))
                .await
                .unwrap()
                .into_inner();
            let cond = bad.volume_condition.unwrap();
            assert!(cond.abnormal && cond.message.contains("gone"), "{cond:?}");

            // The CO can still tear the broken volume down.
            svc.node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: "pvc-1".into(),
                target_path: "/k/pods/p/pvc-1".into(),
            }))
            .await
            .unwrap();
            svc.node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                volume_id: "pvc-1".into(),
                staging_target_path: "/k/stage/pvc-1".into(),
            }))
            .await
            .unwrap();
            assert!(k.mount_table().is_empty());
        }

        /// NodeGetVolumeStats and NodeExpandVolume, spec error tables: "Volume not found |
        /// 5 NOT_FOUND | Indicates that a volume corresponding to the specified volume_id
        /// does not exist on specified volume_path." (stats) / "... could not be found."
        /// (expand) — for an unknown volume whatever the path, and for a path that does not
        /// hold the volume (missing, relative, outside the kubelet root, another volume's).
        /// Only absent fields are INVALID_ARGUMENT.
        #[tokio::test]
        async fn stats_and_expand_of_a_volume_not_on_the_path_are_not_found() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            let svc = service(&k);
            let cap = mount_cap("xfs", Mode::SingleNodeWriter);
            for (vol, pod) in [("pvc-1", "p"), ("pvc-2", "q")] {
                k.add_disk(&format!("{PREFIX}{vol}"), 1 << 30);
                svc.node_stage_volume(Request::new(stage_req(vol, cap.clone())))
                    .await
                    .unwrap();
                svc.node_publish_volume(Request::new(publish_req(vol, pod, cap.clone())))
                    .await
                    .unwrap();
            }
            let cases = [
                ("pvc-none", "/k/pods/p/pvc-1", Code::NotFound),
                ("pvc-none", "/k/pods/none/pvc-none", Code::NotFound),
                ("pvc-none", "pods/p/pvc-1", Code::NotFound),
                ("not a volume id!", "/k/pods/p/pvc-1", Code::NotFound),
                ("pvc-1", "/k/pods/missing/pvc-1", Code::NotFound),
                ("pvc-1", "k/pods/p/pvc-1", Code::NotFound),
                ("pvc-1", "/k/pods/p/../p/pvc-1", Code::NotFound),
                ("pvc-1", "/elsewhere/pvc-1", Code::NotFound),
                ("pvc-1", "/k/pods/q/pvc-2", Code::NotFound),
                ("", "/k/pods/p/pvc-1", Code::InvalidArgument),
                ("pvc-1", "", Code::InvalidArgument),
            ];
            for (vol, path, want) in cases {
                let stats = svc
                    .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                        volume_id: vol.into(),
                        volume_path: path.into(),
                        staging_target_path: String::new(),
                    }))
                    .await
                    .unwrap_err();
                assert_eq!(stats.code(), want, "stats {vol} {path}: {stats:?}");
                let expand = svc
                    .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                        volume_id: vol.into(),
                        volume_path: path.into(),
                        ..Default::default()
                    }))
                    .await
                    .unwrap_err();
                assert_eq!(expand.code(), want, "expand {vol} {path}: {expand:?}");
            }
            // And where it is, it answers.
            svc.node_get_volume_stats(Request::new(stats_req("pvc-1", "p")))
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn a_second_call_on_a_volume_in_flight_is_aborted() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            k.add_disk(&format!("{PREFIX}pvc-1"), 1 << 30);
            let svc = Arc::new(service(&k));
            k.hold_connects();
            let cap = mount_cap("ext4", Mode::SingleNodeWriter);
            let first = tokio::spawn({
                let svc = Arc::clone(&svc);
                let req = stage_req("pvc-1", cap.clone());
                async move { svc.node_stage_volume(Request::new(req)).await }
            });
            // Let the first call reach the held connect.
            while svc.inflight.is_empty() {
                tokio::task::yield_now().await;
            }
            let err = svc
                .node_stage_volume(Request::new(stage_req("pvc-1", cap.clone())))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Aborted, "{err:?}");
            assert!(err.message().contains("pvc-1"));
            // Other volumes are not blocked by it.
            svc.node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                volume_id: "pvc-2".into(),
                staging_target_path: "/k/stage/pvc-2".into(),
            }))
            .await
            .unwrap();
            k.release_connects();
            first.await.unwrap().unwrap();
            assert!(svc.inflight.is_empty());
        }

        #[tokio::test]
        async fn restaging_after_unstage_never_formats_again() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            let nqn = format!("{PREFIX}pvc-1");
            k.add_disk(&nqn, 1 << 30);
            let svc = service(&k);
            let cap = mount_cap("ext4", Mode::SingleNodeWriter);
            for _ in 0..3 {
                svc.node_stage_volume(Request::new(stage_req("pvc-1", cap.clone())))
                    .await
                    .unwrap();
                svc.node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                    volume_id: "pvc-1".into(),
                    staging_target_path: "/k/stage/pvc-1".into(),
                }))
                .await
                .unwrap();
            }
            assert_eq!(k.disk(&nqn).unwrap().formats, 1);
            assert!(k.mount_table().is_empty());
        }

        #[tokio::test]
        async fn expand_waits_for_the_server_side_growth_then_grows_the_filesystem() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            let nqn = format!("{PREFIX}pvc-1");
            k.add_disk(&nqn, 1 << 30);
            let svc = service(&k);
            let cap = mount_cap("xfs", Mode::SingleNodeWriter);
            svc.node_stage_volume(Request::new(stage_req("pvc-1", cap.clone())))
                .await
                .unwrap();
            svc.node_publish_volume(Request::new(publish_req("pvc-1", "p", cap)))
                .await
                .unwrap();
            let expand = || NodeExpandVolumeRequest {
                volume_id: "pvc-1".into(),
                volume_path: "/k/pods/p/pvc-1".into(),
                capacity_range: Some(crate::proto::csi::CapacityRange {
                    required_bytes: 2 << 30,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            let err = svc.node_expand_volume(Request::new(expand())).await.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
            k.resize_disk(&nqn, 2 << 30);
            let got = svc.node_expand_volume(Request::new(expand())).await.unwrap();
            assert_eq!(got.into_inner().capacity_bytes, 2 << 30);
            assert_eq!(k.disk(&nqn).unwrap().fs_size, 2 << 30);
        }

        #[tokio::test]
        async fn foreign_nqns_unreachable_targets_and_missing_addresses_are_refused() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            k.add_disk("nqn.2016-06.io.spdk:cnode1", 1 << 30);
            let svc = service(&k);
            let cap = mount_cap("ext4", Mode::SingleNodeWriter);
            let mut req = stage_req("pvc-1", cap.clone());
            req.volume_context
                .insert(context::NQN.into(), "nqn.2016-06.io.spdk:cnode1".into());
            let err = svc.node_stage_volume(Request::new(req)).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

            k.add_disk(&format!("{PREFIX}pvc-1"), 1 << 30);
            k.set_unreachable(true);
            let err = svc
                .node_stage_volume(Request::new(stage_req("pvc-1", cap.clone())))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");

            let mut req = stage_req("pvc-1", cap);
            req.volume_context.remove(context::NVME_ADDRESS);
            let err = svc.node_stage_volume(Request::new(req)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(k.mount_table().is_empty());
        }

        #[tokio::test]
        async fn node_info_and_capabilities() {
            let k = FakeKernel::new(PREFIX, "nqn.host");
            let svc = service(&k);
            let info = svc
                .node_get_info(Request::new(NodeGetInfoRequest {}))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.node_id, "n1");
            assert_eq!(info.max_volumes_per_node, 7);
            assert_eq!(
                info.accessible_topology.unwrap().segments[TOPOLOGY_NODE_KEY],
                "n1"
            );
            let caps = svc
                .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
                .await
                .unwrap()
                .into_inner();
            let mut names: Vec<String> = caps
                .capabilities
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(node_service_capability::Type::Rpc(r)) => {
                        node_service_capability::rpc::Type::try_from(r.r#type)
                            .ok()
                            .map(|t| t.as_str_name().to_string())
                    }
                    None => None,
                })
                .collect();
            names.sort();
            assert_eq!(
                names,
                [
                    "EXPAND_VOLUME",
                    "GET_VOLUME_STATS",
                    "SINGLE_NODE_MULTI_WRITER",
                    "STAGE_UNSTAGE_VOLUME",
                    "VOLUME_CONDITION"
                ]
            );
        }
    }
}
