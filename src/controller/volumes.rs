//! Volume RPCs of the controller core: create, delete, expand, get, list, validate,
//! capacity.

use std::collections::HashMap;

use crate::controller::{Controller, capacity, paging, params};
use crate::types::context;
use crate::error::{Error, Result};
use crate::ports::rds::{Disk, DiskSpec, NvmeExport};
use crate::proto::csi::{
    CapacityRange, ControllerGetVolumeResponse, CreateVolumeRequest, GetCapacityRequest,
    GetCapacityResponse, ListVolumesResponse, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse, Volume, VolumeCapability, VolumeCondition,
    VolumeContentSource, controller_get_volume_response, list_volumes_response,
    validate_volume_capabilities_response::Confirmed, volume_capability::AccessType,
    volume_content_source,
};
use crate::types::{SnapshotId, VolumeId};

/// A validated CreateVolume request.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    /// Volume id (= name = slot).
    pub volume_id: VolumeId,
    /// Requested capacity range.
    pub range: Option<CapacityRange>,
    /// StorageClass parameters, parsed.
    pub params: params::VolumeParams,
    /// Filesystem for mount capabilities (None: block only).
    pub fs_type: Option<String>,
    /// Content source.
    pub source: Option<Source>,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Restore of a snapshot.
    Snapshot(SnapshotId),
    /// Clone of a volume.
    Volume(VolumeId),
}

impl Source {
    fn slot(&self) -> &str {
        match self {
            Source::Snapshot(s) => s.as_str(),
            Source::Volume(v) => v.as_str(),
        }
    }

    fn to_csi(&self) -> VolumeContentSource {
        use volume_content_source::{SnapshotSource, Type, VolumeSource};
        VolumeContentSource {
            r#type: Some(match self {
                Source::Snapshot(s) => Type::Snapshot(SnapshotSource {
                    snapshot_id: s.to_string(),
                }),
                Source::Volume(v) => Type::Volume(VolumeSource {
                    volume_id: v.to_string(),
                }),
            }),
        }
    }
}

/// Checks the capabilities of a request and returns the filesystem its mount capabilities
/// name (empty when they name none), or `None` when all are block.
pub fn validate_capabilities(caps: &[VolumeCapability], field: &str) -> Result<Option<String>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{field} must list at least one capability"
        )));
    }
    let mut any_mount = false;
    let mut named: std::collections::BTreeSet<&str> = Default::default();
    for cap in caps {
        crate::controller::caps::access(cap)
            .map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))?;
        if let Some(AccessType::Mount(m)) = &cap.access_type {
            any_mount = true;
            if !m.fs_type.is_empty() {
                if !params::SUPPORTED_FS.contains(&m.fs_type.as_str()) {
                    return Err(Error::InvalidArgument(format!(
                        "{field}: fs_type {:?} is not supported; use one of {:?}",
                        m.fs_type,
                        params::SUPPORTED_FS
                    )));
                }
                named.insert(&m.fs_type);
            }
        }
    }
    if named.len() > 1 {
        return Err(Error::InvalidArgument(format!(
            "{field}: capabilities ask for more than one filesystem ({named:?})"
        )));
    }
    Ok(any_mount.then(|| named.into_iter().next().unwrap_or_default().to_string()))
}

/// Validates a CreateVolume request (pure).
pub fn validate_create(
    req: &CreateVolumeRequest,
    expected: &params::Expected,
) -> Result<CreateArgs> {
    if req.name.is_empty() {
        return Err(Error::InvalidArgument("name is required".into()));
    }
    let volume_id =
        VolumeId::new(&req.name).map_err(|e| Error::InvalidArgument(format!("name: {e}")))?;
    let mount_fs = validate_capabilities(&req.volume_capabilities, "volume_capabilities")?;
    let params = params::parse(&req.parameters, expected)?;
    // The capability's fs_type wins; the StorageClass parameter is the default; ext4 last.
    let fs_type = mount_fs.map(|fs| {
        if !fs.is_empty() {
            fs
        } else {
            params.fs_type.clone().unwrap_or_else(|| "ext4".into())
        }
    });
    if let (Some(cap_fs), Some(param_fs)) = (&fs_type, &params.fs_type)
        && cap_fs != param_fs
    {
        return Err(Error::InvalidArgument(format!(
            "volume_capabilities ask for fs_type {cap_fs:?} but parameters.fsType is {param_fs:?}"
        )));
    }
    let source = match req
        .volume_content_source
        .as_ref()
        .and_then(|s| s.r#type.as_ref())
    {
        None => None,
        Some(volume_content_source::Type::Snapshot(s)) => Some(Source::Snapshot(
            SnapshotId::new(&s.snapshot_id).map_err(|e| {
                Error::InvalidArgument(format!("volume_content_source.snapshot.snapshot_id: {e}"))
            })?,
        )),
        Some(volume_content_source::Type::Volume(v)) => {
            Some(Source::Volume(VolumeId::new(&v.volume_id).map_err(
                |e| Error::InvalidArgument(format!("volume_content_source.volume.volume_id: {e}")),
            )?))
        }
    };
    Ok(CreateArgs {
        volume_id,
        range: req.capacity_range,
        params,
        fs_type,
        source,
    })
}

/// Parses a volume id field.
pub fn volume_id_field(value: &str, field: &str) -> Result<VolumeId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    VolumeId::new(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// Prefix of the disk comment recording a volume's layout.
const LAYOUT_TAG: &str = "rds-csi-volume:";

/// The disk comment of a volume: `rds-csi-volume:<fs type>` or `rds-csi-volume:block`.
fn layout_comment(args: &CreateArgs) -> String {
    format!("{LAYOUT_TAG}{}", args.fs_type.as_deref().unwrap_or("block"))
}

/// Whether a disk is a volume (exported) rather than a snapshot.
fn is_volume(disk: &Disk) -> bool {
    disk.export.is_some()
}

impl Controller {
    /// The volume `volume_id`, NOT_FOUND when there is none (a snapshot is not a volume).
    pub(crate) async fn volume(&self, volume_id: &VolumeId) -> Result<Disk> {
        match self.rds.get_disk(volume_id.as_str()).await? {
            Some(d) if is_volume(&d) => Ok(d),
            _ => Err(Error::NotFound(format!(
                "volume {volume_id} does not exist"
            ))),
        }
    }

    fn volume_context(&self, args: &CreateArgs) -> HashMap<String, String> {
        let p = &args.params;
        let mut ctx = HashMap::new();
        let address = p
            .nvme_address
            .clone()
            .unwrap_or_else(|| self.cfg.nvme_address.clone());
        ctx.insert(context::NVME_ADDRESS.to_string(), address);
        ctx.insert(
            context::NVME_PORT.to_string(),
            p.nvme_port.unwrap_or(self.cfg.nvme_port).to_string(),
        );
        ctx.insert(
            context::NQN.to_string(),
            self.cfg.nqn(args.volume_id.as_str()),
        );
        if let Some(fs) = &args.fs_type {
            ctx.insert(context::FS_TYPE.to_string(), fs.clone());
        }
        if let Some(v) = p.ctrl_loss_tmo {
            ctx.insert(context::CTRL_LOSS_TMO.to_string(), v.to_string());
        }
        if let Some(v) = p.reconnect_delay {
            ctx.insert(context::RECONNECT_DELAY.to_string(), v.to_string());
        }
        if let Some(v) = p.keep_alive_tmo {
            ctx.insert(context::KEEP_ALIVE_TMO.to_string(), v.to_string());
        }
        if let Some(t) = p.migration_timeout {
            ctx.insert(
                context::MIGRATION_TIMEOUT.to_string(),
                t.as_secs().to_string(),
            );
        }
        ctx
    }

    fn to_volume(&self, disk: &Disk, args: &CreateArgs) -> Volume {
        Volume {
            capacity_bytes: disk.size_bytes as i64,
            volume_id: disk.slot.clone(),
            volume_context: self.volume_context(args),
            content_source: args.source.as_ref().map(Source::to_csi),
            accessible_topology: Vec::new(),
        }
    }

    /// CreateVolume core.
    pub async fn create_volume(&self, args: &CreateArgs) -> Result<Volume> {
        let id = args.volume_id.as_str();
        for w in &args.params.warnings {
            tracing::warn!(volume_id = %id, "{w}");
        }
        // Observe first. The spec: "If a volume corresponding to the specified volume name
        // already exists, is accessible from accessibility_requirements, and is compatible
        // with the specified capacity_range, volume_capabilities, parameters and
        // mutable_parameters in the CreateVolumeRequest, the Plugin MUST reply 0 OK with the
        // corresponding CreateVolumeResponse." A retry after a lost reply lands here.
        if let Some(existing) = self.rds.get_disk(id).await? {
            if !is_volume(&existing) {
                return Err(Error::AlreadyExists(format!(
                    "name {id:?} is taken by a snapshot on the RDS; choose another volume name"
                )));
            }
            if !capacity::satisfies(args.range.as_ref(), existing.size_bytes)? {
                // "Indicates that a volume corresponding to the specified volume name
                // already exists but is incompatible with the specified capacity_range..."
                return Err(Error::AlreadyExists(format!(
                    "volume {id} already exists with {} bytes, outside the requested capacity_range",
                    existing.size_bytes
                )));
            }
            // The disk comment records how the volume was made (filesystem or block):
            // the same name asking for another one is a different volume.
            let wanted = layout_comment(args);
            if let Some(had) = existing.comment.as_deref().filter(|c| c.starts_with(LAYOUT_TAG))
                && had != wanted
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {id} already exists as {}, but this request asks for {}",
                    &had[LAYOUT_TAG.len()..],
                    &wanted[LAYOUT_TAG.len()..]
                )));
            }
            return Ok(self.to_volume(&existing, args));
        }

        let floor = match &args.source {
            None => 0,
            Some(src) => {
                let disk = self.rds.get_disk(src.slot()).await?;
                let found = match (&disk, src) {
                    (Some(d), Source::Snapshot(_)) => !is_volume(d),
                    (Some(d), Source::Volume(_)) => is_volume(d),
                    (None, _) => false,
                };
                match (disk, found) {
                    (Some(d), true) => d.size_bytes,
                    _ => {
                        // "Indicates that the specified source does not exist."
                        let what = match src {
                            Source::Snapshot(s) => format!("snapshot {s}"),
                            Source::Volume(v) => format!("source volume {v}"),
                        };
                        return Err(Error::NotFound(format!(
                            "volume_content_source: {what} does not exist"
                        )));
                    }
                }
            }
        };
        let size = capacity::resolve(args.range.as_ref(), floor)?;
        let spec = DiskSpec {
            slot: id.to_string(),
            size_bytes: size,
            export: Some(NvmeExport {
                port: args.params.nvme_port.unwrap_or(self.cfg.nvme_port),
                nqn: self.cfg.nqn(id),
            }),
            copy_from: args.source.as_ref().map(|s| s.slot().to_string()),
            comment: Some(layout_comment(args)),
            // Born parked (restores and clones too): no host reaches a new volume before
            // its first publish.
            allowed_host_nqn: self
                .attachments
                .config()
                .data_path_fence
                .then(|| crate::attachment::fence::parked_nqn(&args.volume_id)),
        };
        let disk = self.rds.create_disk(&spec).await?;
        Ok(self.to_volume(&disk, args))
    }

    /// DeleteVolume core.
    pub async fn delete_volume(&self, volume_id: &VolumeId) -> Result<()> {
        let id = volume_id.as_str();
        match self.rds.get_disk(id).await? {
            // "If a volume corresponding to the specified volume_id does not exist or the
            // artifacts associated with the volume do not exist anymore, the Plugin MUST
            // reply 0 OK." A snapshot of that name is not this volume: leave it. An absent
            // disk may be a delete interrupted between `/disk remove` and `/file remove`
            // (found by the simulation): the adapter's delete still clears the file.
            None => {
                self.rds.delete_disk(id).await?;
                return Ok(());
            }
            Some(d) if !is_volume(&d) => return Ok(()),
            Some(_) => {}
        }
        // "FAILED_PRECONDITION: Indicates that the volume is in use" — never delete a disk a
        // node may still be writing to.
        // From the store, not memory: another replica may have published it since. The
        // provisioner may send this while the detach is still on its way (PVC protection
        // ends when the pod is gone, not when the detach is done): refused until it lands.
        let holders = self.attachments.live_holders(volume_id).await?;
        if !holders.is_empty() {
            let nodes: Vec<String> = holders.iter().map(|r| r.node_id.to_string()).collect();
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published to node(s) {}; unpublish it first",
                nodes.join(", ")
            )));
        }
        self.rds.delete_disk(id).await?;
        Ok(())
    }

    /// ControllerExpandVolume core: the new size and whether the node must grow the
    /// filesystem.
    pub async fn expand_volume(
        &self,
        volume_id: &VolumeId,
        range: Option<&CapacityRange>,
        block: bool,
    ) -> Result<(u64, bool)> {
        let disk = self.volume(volume_id).await?;
        let size = match capacity::expand_to(range, disk.size_bytes)? {
            None => disk.size_bytes,
            Some(new_size) => {
                self.rds
                    .resize_disk(volume_id.as_str(), new_size)
                    .await?
                    .size_bytes
            }
        };
        // A filesystem must be grown by the node; a raw block device needs nothing more.
        Ok((size, !block))
    }

    /// ValidateVolumeCapabilities core.
    pub async fn validate_volume_capabilities(
        &self,
        req: &ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse> {
        let volume_id = volume_id_field(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        self.volume(&volume_id).await?;
        // "Confirmed ... indicates to the CO the set of capabilities that the plugin has
        // validated"; an unsupported set is answered with a message, not an error.
        Ok(
            match validate_capabilities(&req.volume_capabilities, "volume_capabilities")
                .and_then(|_| params::parse(&req.parameters, &self.cfg.expected))
            {
                Ok(_) => ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(Confirmed {
                        volume_context: req.volume_context.clone(),
                        volume_capabilities: req.volume_capabilities.clone(),
                        parameters: req.parameters.clone(),
                        mutable_parameters: Default::default(),
                    }),
                    message: String::new(),
                },
                Err(e) => ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: e.to_string(),
                },
            },
        )
    }

    fn listed_volume(&self, d: &Disk) -> Volume {
        let mut ctx = HashMap::new();
        if let Some(e) = &d.export {
            ctx.insert(context::NQN.to_string(), e.nqn.clone());
            ctx.insert(context::NVME_PORT.to_string(), e.port.to_string());
        }
        Volume {
            capacity_bytes: d.size_bytes as i64,
            volume_id: d.slot.clone(),
            volume_context: ctx,
            content_source: None,
            accessible_topology: Vec::new(),
        }
    }

    /// ControllerGetVolume core.
    pub async fn get_volume(&self, volume_id: &VolumeId) -> Result<ControllerGetVolumeResponse> {
        let disk = self.volume(volume_id).await?;
        let condition = match &disk.export {
            Some(e) if e.nqn == self.cfg.nqn(volume_id.as_str()) => VolumeCondition {
                abnormal: false,
                message: "exported over NVMe/TCP".into(),
            },
            Some(e) => VolumeCondition {
                abnormal: true,
                message: format!("exported under an unexpected NQN {}", e.nqn),
            },
            None => VolumeCondition {
                abnormal: true,
                message: "not exported".into(),
            },
        };
        // The published nodes from the store, not memory: the external-attacher acts on
        // this answer (re-attaches what is missing), and memory may lag another replica.
        let published_node_ids = self
            .attachments
            .stored_holders(volume_id)
            .await?
            .into_iter()
            .map(|r| r.node_id.to_string())
            .collect();
        Ok(ControllerGetVolumeResponse {
            volume: Some(self.listed_volume(&disk)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }

    /// ListVolumes core.
    pub async fn list_volumes(&self, max_entries: i32, token: &str) -> Result<ListVolumesResponse> {
        paging::decode(token)?;
        let mut disks = self.rds.list_disks("").await?;
        disks.retain(is_volume);
        disks.sort_by(|a, b| a.slot.cmp(&b.slot));
        let (page, next_token) = paging::page(disks, |d| d.slot.as_str(), token, max_entries)?;
        // From the store, not memory: the external-attacher compares these with its
        // VolumeAttachments and re-attaches what the answer says is missing
        // (LIST_VOLUMES_PUBLISHED_NODES), and memory may lag another replica's writes.
        let mut published: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for r in self.attachments.stored_records().await? {
            published
                .entry(r.volume_id.to_string())
                .or_default()
                .push(r.node_id.to_string());
        }
        let entries = page
            .iter()
            .map(|d| list_volumes_response::Entry {
                volume: Some(self.listed_volume(d)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published.remove(&d.slot).unwrap_or_default(),
                    volume_condition: None,
                }),
            })
            .collect();
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    /// GetCapacity core.
    pub async fn get_capacity(&self, req: &GetCapacityRequest) -> Result<GetCapacityResponse> {
        params::parse(&req.parameters, &self.cfg.expected)?;
        // "If volume_capabilities ... are not supported by the plugin, ... available_capacity
        // ... SHOULD be 0": an unsupported capability can hold nothing.
        if !req.volume_capabilities.is_empty()
            && validate_capabilities(&req.volume_capabilities, "volume_capabilities").is_err()
        {
            return Ok(GetCapacityResponse::default());
        }
        let pool = self.rds.capacity().await?;
        let free = pool.free_bytes.min(i64::MAX as u64);
        Ok(GetCapacityResponse {
            available_capacity: free as i64,
            maximum_volume_size: Some(free.min(capacity::MAX_VOLUME_BYTES) as i64),
            minimum_volume_size: Some(capacity::MIN_VOLUME_BYTES as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::volume_capability::{
        AccessMode, BlockVolume, MountVolume, access_mode::Mode,
    };

    fn mount(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }
    fn block(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capabilities_choose_the_filesystem() {
        assert_eq!(
            validate_capabilities(&[block(Mode::SingleNodeWriter)], "c").unwrap(),
            None
        );
        assert_eq!(
            validate_capabilities(&[mount("", Mode::SingleNodeWriter)], "c").unwrap(),
            Some(String::new())
        );
        assert_eq!(
            validate_capabilities(&[mount("xfs", Mode::SingleNodeWriter)], "c").unwrap(),
            Some("xfs".into())
        );
        assert!(validate_capabilities(&[mount("btrfs", Mode::SingleNodeWriter)], "c").is_err());
        assert!(
            validate_capabilities(
                &[
                    mount("ext4", Mode::SingleNodeWriter),
                    mount("xfs", Mode::SingleNodeWriter)
                ],
                "c"
            )
            .is_err()
        );
        assert!(validate_capabilities(&[mount("ext4", Mode::MultiNodeMultiWriter)], "c").is_err());
        assert!(validate_capabilities(&[block(Mode::MultiNodeMultiWriter)], "c").is_ok());
        assert!(validate_capabilities(&[], "c").is_err());
    }

    #[test]
    fn create_requests_are_validated_with_named_fields() {
        let ok = CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: vec![mount("", Mode::SingleNodeWriter)],
            ..Default::default()
        };
        let args = validate_create(&ok, &params::Expected::default()).unwrap();
        assert_eq!(args.fs_type.as_deref(), Some("ext4"));
        let cases: Vec<(CreateVolumeRequest, &str)> = vec![
            (
                CreateVolumeRequest {
                    name: String::new(),
                    ..ok.clone()
                },
                "name is required",
            ),
            (
                CreateVolumeRequest {
                    name: "a;b".into(),
                    ..ok.clone()
                },
                "name:",
            ),
            (
                CreateVolumeRequest {
                    volume_capabilities: vec![],
                    ..ok.clone()
                },
                "volume_capabilities",
            ),
            (
                CreateVolumeRequest {
                    parameters: [("bogus".to_string(), "1".to_string())].into(),
                    ..ok.clone()
                },
                "unknown key \"bogus\"",
            ),
            (
                CreateVolumeRequest {
                    volume_capabilities: vec![mount("xfs", Mode::SingleNodeWriter)],
                    parameters: [("fsType".to_string(), "ext4".to_string())].into(),
                    ..ok.clone()
                },
                "parameters.fsType",
            ),
        ];
        for (req, needle) in cases {
            let err = validate_create(&req, &params::Expected::default()).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(needle)),
                "{needle}: {err}"
            );
        }
    }
}
