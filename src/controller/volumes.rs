//! Volume RPCs of the controller core: create, delete, expand, modify, get, list,
//! validate, capacity.
//!
//! What a volume is, is read from the RDS alone: its disk entry (size, export) and the note
//! the driver keeps with it ([`VolumeNote`]: layout, the CSI name when the id is derived
//! from it, the StorageClass' address, the connect tunables). So every answer about a
//! volume — CreateVolume and its repeats, ListVolumes, ControllerGetVolume — carries the
//! same `volume_context`, built by one function from the same record.

use std::collections::HashMap;

use crate::controller::{Controller, capacity, names, paging, params};
use crate::types::context;
use crate::error::{Error, Result};
use crate::ports::rds::{Disk, DiskEntry, DiskSpec, NvmeExport};
use crate::proto::csi::{
    CapacityRange, ControllerGetVolumeResponse, CreateVolumeRequest, GetCapacityRequest,
    GetCapacityResponse, ListVolumesResponse, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse, Volume, VolumeCapability, VolumeCondition,
    VolumeContentSource, controller_get_volume_response, list_volumes_response,
    validate_volume_capabilities_response::Confirmed, volume_capability::AccessType,
    volume_content_source,
};
use crate::types::note::{Tunables, VolumeNote};
use crate::types::{SnapshotId, VolumeId};

/// A validated CreateVolume request.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    /// The CSI name.
    pub name: String,
    /// Volume id (= slot): the name itself when it is a safe slot, else derived from it.
    pub volume_id: VolumeId,
    /// The name to record with the disk (when the id is derived from it).
    pub recorded_name: Option<String>,
    /// Requested capacity range.
    pub range: Option<CapacityRange>,
    /// StorageClass parameters, parsed, with `mutable_parameters` applied over them.
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
    let (volume_id, recorded_name) = names::volume_id_for(&req.name, "name")?;
    let mount_fs = validate_capabilities(&req.volume_capabilities, "volume_capabilities")?;
    let mut params = params::parse(&req.parameters, expected)?;
    // "Plugins MUST treat these as if they take precedence over the parameters field."
    params.tunables = params
        .tunables
        .updated(params::parse_mutable(&req.mutable_parameters)?);
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
        name: req.name.clone(),
        volume_id,
        recorded_name,
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

impl CreateArgs {
    /// The note recorded with the new volume's disk.
    fn note(&self) -> VolumeNote {
        VolumeNote {
            layout: self.fs_type.clone().unwrap_or_else(|| BLOCK.into()),
            name: self.recorded_name.clone(),
            nvme_address: self.params.nvme_address.clone(),
            tunables: self.params.tunables,
            modified: Default::default(),
            migration_timeout_secs: self.params.migration_timeout.map(|t| t.as_secs()),
        }
    }
}

/// The layout of a raw block volume in its note.
const BLOCK: &str = "block";

/// The note of a disk, when it carries a readable volume note.
fn note_of(comment: Option<&str>) -> Option<VolumeNote> {
    comment.and_then(VolumeNote::parse)
}

/// The CSI name of a volume disk: the recorded one, else its slot.
fn name_of(slot: &str, note: Option<&VolumeNote>) -> String {
    note.and_then(|n| n.name.clone())
        .unwrap_or_else(|| slot.to_string())
}

fn volume_not_found(volume_id: &VolumeId) -> Error {
    Error::NotFound(format!("volume {volume_id} does not exist"))
}

/// Whether a disk is a volume (exported) rather than a snapshot.
fn is_volume(disk: &Disk) -> bool {
    disk.export.is_some()
}

impl Controller {
    /// The volume `volume_id` with its exact size, NOT_FOUND when there is none (a
    /// snapshot is not a volume).
    pub(crate) async fn volume(&self, volume_id: &VolumeId) -> Result<Disk> {
        match self.rds.get_disk(volume_id.as_str()).await? {
            Some(d) if is_volume(&d) => Ok(d),
            _ => Err(volume_not_found(volume_id)),
        }
    }

    /// The volume `volume_id`'s entry (one command: no size), NOT_FOUND when there is none.
    pub(crate) async fn volume_entry(&self, volume_id: &VolumeId) -> Result<DiskEntry> {
        match self.rds.find_disk(volume_id.as_str()).await? {
            Some(d) if d.export.is_some() => Ok(d),
            _ => Err(volume_not_found(volume_id)),
        }
    }

    /// The `volume_context` of a volume: the same for CreateVolume (and its repeats),
    /// ListVolumes and ControllerGetVolume, since all read it from the disk and its note —
    /// "A volume uniquely identified by `volume_id` SHALL always report the same
    /// volume_context."
    fn volume_context(
        &self,
        export: Option<&NvmeExport>,
        note: Option<&VolumeNote>,
    ) -> HashMap<String, String> {
        let mut ctx = HashMap::new();
        let address = note
            .and_then(|n| n.nvme_address.clone())
            .unwrap_or_else(|| self.cfg.nvme_address.clone());
        ctx.insert(context::NVME_ADDRESS.to_string(), address);
        if let Some(e) = export {
            ctx.insert(context::NVME_PORT.to_string(), e.port.to_string());
            ctx.insert(context::NQN.to_string(), e.nqn.clone());
        }
        if let Some(n) = note {
            if n.layout != BLOCK {
                ctx.insert(context::FS_TYPE.to_string(), n.layout.clone());
            }
            for (k, v) in n.tunables.context() {
                ctx.insert(k.to_string(), v);
            }
            if let Some(t) = n.migration_timeout_secs {
                ctx.insert(context::MIGRATION_TIMEOUT.to_string(), t.to_string());
            }
        }
        ctx
    }

    /// A volume as the RPCs answer it.
    fn to_volume(&self, disk: &Disk, source: Option<&Source>) -> Volume {
        let note = note_of(disk.comment.as_deref());
        Volume {
            capacity_bytes: disk.size_bytes as i64,
            volume_id: disk.slot.clone(),
            volume_context: self.volume_context(disk.export.as_ref(), note.as_ref()),
            content_source: source.map(Source::to_csi),
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
        // One `/disk print` for the slot and the content source: absent (the usual case)
        // or the disk, whose exact size is then read.
        let mut slots = vec![id];
        slots.extend(args.source.as_ref().map(Source::slot));
        let found = self.rds.find_disks(&slots).await?;
        let entry = |slot: &str| found.iter().find(|d| d.slot == slot);
        if let Some(existing) = entry(id) {
            let existing = self.rds.sized(existing).await?;
            if !is_volume(&existing) {
                return Err(Error::AlreadyExists(format!(
                    "name {:?} is taken by a snapshot on the RDS (slot {id}); choose another \
                     volume name",
                    args.name
                )));
            }
            let note = note_of(existing.comment.as_deref());
            // A derived id names its volume only with the name recorded beside it: another
            // name whose id collides is not this volume.
            let had = name_of(id, note.as_ref());
            if had != args.name {
                return Err(Error::AlreadyExists(format!(
                    "the RDS slot {id} for name {:?} holds volume {had:?}, a different name; \
                     choose another volume name",
                    args.name
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
            // The note records how the volume was made (filesystem or block): the same name
            // asking for another one is a different volume. (The connect tunables can be
            // changed with ControllerModifyVolume, so they never make it incompatible.)
            let wanted = args.note().layout;
            if let Some(note) = &note
                && note.layout != wanted
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {id} already exists as {}, but this request asks for {wanted}",
                    note.layout
                )));
            }
            return Ok(self.to_volume(&existing, args.source.as_ref()));
        }

        let floor = match &args.source {
            None => 0,
            Some(src) => {
                let disk = entry(src.slot());
                let found = match (disk, src) {
                    (Some(d), Source::Snapshot(_)) => d.export.is_none(),
                    (Some(d), Source::Volume(_)) => d.export.is_some(),
                    (None, _) => false,
                };
                match (disk, found) {
                    // The new volume is at least as large: the source's exact size.
                    (Some(d), true) => self.rds.sized(d).await?.size_bytes,
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
            comment: Some(args.note().render()),
            // Born parked (restores and clones too): no host reaches a new volume before
            // its first publish.
            allowed_host_nqn: self
                .attachments
                .config()
                .data_path_fence
                .then(|| crate::attachment::fence::parked_nqn(&args.volume_id)),
        };
        let disk = self.rds.create_disk(&spec).await?;
        Ok(self.to_volume(&disk, args.source.as_ref()))
    }

    /// ControllerModifyVolume core: `changes` (validated `mutable_parameters`) recorded in
    /// the volume's note as the tunables in force from the next attachment on (its
    /// `volume_context` stays what CreateVolume returned: "The contents of this field SHALL
    /// NOT be mutable"); one read, and one write when they differ.
    pub async fn modify_volume(&self, volume_id: &VolumeId, changes: Tunables) -> Result<()> {
        let disk = self.volume_entry(volume_id).await?;
        let Some(mut note) = note_of(disk.comment.as_deref()) else {
            // "Parameters not supported ... Indicates that the CO has specified mutable
            // parameters not supported by the volume."
            return Err(Error::InvalidArgument(format!(
                "volume {volume_id} carries no note of this driver on the RDS (made by an \
                 earlier driver or by hand), so its connect settings cannot be changed"
            )));
        };
        let next = note.modified.updated(changes);
        if next == note.modified {
            return Ok(());
        }
        note.modified = next;
        self.rds.set_comment(&disk, &note.render()).await?;
        Ok(())
    }

    /// DeleteVolume core.
    pub async fn delete_volume(&self, volume_id: &VolumeId) -> Result<()> {
        let id = volume_id.as_str();
        // One `/disk print`: is it there, is it a volume, where is its file.
        let disk = match self.rds.find_disk(id).await? {
            // "If a volume corresponding to the specified volume_id does not exist or the
            // artifacts associated with the volume do not exist anymore, the Plugin MUST
            // reply 0 OK." An absent disk may be a delete interrupted between `/disk
            // remove` and `/file remove` (found by the simulation): its file is removed.
            None => {
                self.rds.remove_leftover_file(id).await?;
                return Ok(());
            }
            // A snapshot of that name is not this volume: leave it.
            Some(d) if d.export.is_none() => return Ok(()),
            Some(d) => d,
        };
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
        self.rds.remove_disk(&disk).await?;
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
        // The exact size decides whether to grow (and is the answer when it does not).
        let disk = self.volume(volume_id).await?;
        let size = match capacity::expand_to(range, disk.size_bytes)? {
            None => disk.size_bytes,
            Some(new_size) => self.rds.grow_disk(&disk, new_size).await?.size_bytes,
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
        self.volume_entry(&volume_id).await?;
        // "Confirmed ... indicates to the CO the set of capabilities that the plugin has
        // validated"; an unsupported set is answered with a message, not an error.
        Ok(
            match validate_capabilities(&req.volume_capabilities, "volume_capabilities")
                .and_then(|_| params::parse(&req.parameters, &self.cfg.expected))
                .and_then(|_| params::parse_mutable(&req.mutable_parameters))
            {
                Ok(_) => ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(Confirmed {
                        volume_context: req.volume_context.clone(),
                        volume_capabilities: req.volume_capabilities.clone(),
                        parameters: req.parameters.clone(),
                        mutable_parameters: req.mutable_parameters.clone(),
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
            volume: Some(self.to_volume(&disk, None)),
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
                volume: Some(self.to_volume(d, None)),
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
        // Mutable parameters take precedence over the StorageClass' parameters.
        let both = CreateVolumeRequest {
            parameters: [("ctrlLossTmo".to_string(), "-1".to_string())].into(),
            mutable_parameters: [("ctrlLossTmo".to_string(), "600".to_string())].into(),
            ..ok.clone()
        };
        let args = validate_create(&both, &params::Expected::default()).unwrap();
        assert_eq!(args.params.tunables.ctrl_loss_tmo, Some(600));
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
                    name: "a;b".repeat(43),
                    ..ok.clone()
                },
                "name is 129 bytes long",
            ),
            (
                CreateVolumeRequest {
                    mutable_parameters: [("fsType".to_string(), "xfs".to_string())].into(),
                    ..ok.clone()
                },
                "mutable_parameters.fsType is fixed",
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
