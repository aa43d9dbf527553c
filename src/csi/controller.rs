//! The CSI Controller service: a thin tonic adapter over [`crate::controller::Controller`]
//! and the attachment manager. Each RPC validates its request (pure functions), takes the
//! in-flight guard of the object it changes (ABORTED on collision), and calls the core.

use tonic::{Request, Response, Status};

use crate::controller::params::parse_mutable;
use crate::controller::snapshots::{snapshot_id_field, snapshot_name};
use crate::controller::volumes::{validate_create, volume_id_field};
use crate::controller::{Controller, ControllerConfig};
use crate::csi::inflight::{InFlight, InFlightGuard};
use crate::csi::rpc;
use crate::error::{Error, Result};
use crate::types::{SnapshotId, VolumeId};
use crate::proto::csi::{
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    GetSnapshotRequest, GetSnapshotResponse,
    ListSnapshotsRequest, ListSnapshotsResponse, ListVolumesRequest, ListVolumesResponse,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse, controller_server,
    controller_service_capability, volume_capability::AccessType,
};

/// Controller service state (one per plugin instance).
pub struct ControllerService {
    core: Controller,
    inflight: InFlight,
}

impl ControllerService {
    /// A controller service over the controller core.
    pub fn new(core: Controller) -> Self {
        Self {
            core,
            inflight: InFlight::default(),
        }
    }

    /// The controller settings.
    pub fn config(&self) -> &ControllerConfig {
        self.core.config()
    }

    fn volume_guard(&self, id: &str) -> Result<InFlightGuard> {
        self.inflight
            .try_start(&format!("volume/{id}"), &format!("volume {id}"))
    }

    fn snapshot_guard(&self, id: &str) -> Result<InFlightGuard> {
        self.inflight
            .try_start(&format!("snapshot/{id}"), &format!("snapshot {id}"))
    }
}

/// Validates a CreateSnapshot request: the snapshot id the name gives, the name to record
/// with it (when the id is derived from the name) and the source volume id — what the core
/// works on; snapshots take no parameters.
pub fn validate_create_snapshot(
    req: &CreateSnapshotRequest,
) -> Result<(SnapshotId, Option<String>, VolumeId)> {
    let (name, recorded) = snapshot_name(&req.name)?;
    let source = volume_id_field(&req.source_volume_id, "source_volume_id")?;
    if !req.parameters.is_empty() {
        let mut keys: Vec<&String> = req.parameters.keys().collect();
        keys.sort();
        return Err(Error::InvalidArgument(format!(
            "parameters: snapshots take none, got {keys:?}"
        )));
    }
    Ok((name, recorded, source))
}

/// The capabilities this controller offers.
pub fn capabilities() -> Vec<ControllerServiceCapability> {
    use controller_service_capability::{Rpc, Type, rpc::Type as T};
    [
        T::CreateDeleteVolume,
        T::PublishUnpublishVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
        T::PublishReadonly,
        T::ExpandVolume,
        T::ListVolumesPublishedNodes,
        T::VolumeCondition,
        T::GetVolume,
        T::ModifyVolume,
        T::GetSnapshot,
    ]
    .into_iter()
    .map(|t| ControllerServiceCapability {
        r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
    })
    .collect()
}

#[tonic::async_trait]
impl controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("CreateVolume", &req.name, req, async {
            let args = validate_create(req, &self.config().expected)?;
            let _guard = self.volume_guard(args.volume_id.as_str())?;
            let volume = self.core.create_volume(&args).await?;
            Ok(CreateVolumeResponse {
                volume: Some(volume),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("DeleteVolume", &req.volume_id, req, async {
            let id = volume_id_field(&req.volume_id, "volume_id")?;
            let _guard = self.volume_guard(id.as_str())?;
            self.core.delete_volume(&id).await?;
            Ok(DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("ControllerPublishVolume", &req.volume_id, req, async {
            let args = crate::csi::publish::validate_publish(req)?;
            let _guard = self.volume_guard(args.volume_id.as_str())?;
            let context = self.core.attachments().publish(&args).await?;
            Ok(ControllerPublishVolumeResponse {
                publish_context: context.into_iter().collect(),
            })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("ControllerUnpublishVolume", &req.volume_id, req, async {
            let args = crate::csi::publish::validate_unpublish(req)?;
            let _guard = self.volume_guard(args.volume_id.as_str())?;
            self.core.attachments().unpublish(&args).await?;
            Ok(ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.get_ref();
        rpc("ValidateVolumeCapabilities", &req.volume_id, req, async {
            self.core.validate_volume_capabilities(req).await
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.get_ref();
        rpc("ListVolumes", "", req, async {
            self.core
                .list_volumes(req.max_entries, &req.starting_token)
                .await
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.get_ref();
        rpc("GetCapacity", "", req, async {
            self.core.get_capacity(req).await
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        rpc("ControllerGetCapabilities", "", request.get_ref(), async {
            Ok(ControllerGetCapabilitiesResponse {
                capabilities: capabilities(),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.get_ref();
        rpc("CreateSnapshot", &req.source_volume_id, req, async {
            let (name, recorded, source) = validate_create_snapshot(req)?;
            let _snap = self.snapshot_guard(name.as_str())?;
            let _vol = self.volume_guard(source.as_str())?;
            let snapshot = self
                .core
                .create_snapshot(&req.name, &name, recorded.as_deref(), &source)
                .await?;
            Ok(CreateSnapshotResponse {
                snapshot: Some(snapshot),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.get_ref();
        rpc("DeleteSnapshot", "", req, async {
            let id = snapshot_id_field(&req.snapshot_id, "snapshot_id")?;
            let _guard = self.snapshot_guard(id.as_str())?;
            self.core.delete_snapshot(&id).await?;
            Ok(DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.get_ref();
        rpc("ListSnapshots", &req.source_volume_id, req, async {
            self.core.list_snapshots(req).await
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let req = request.get_ref();
        rpc("GetSnapshot", "", req, async {
            let id = snapshot_id_field(&req.snapshot_id, "snapshot_id")?;
            Ok(GetSnapshotResponse {
                snapshot: Some(self.core.get_snapshot(&id).await?),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("ControllerModifyVolume", &req.volume_id, req, async {
            let id = volume_id_field(&req.volume_id, "volume_id")?;
            // "SPs MUST NOT modify volumes based on the absence of keys, only keys that are
            // specified should result in modifications to the volume."
            let changes = parse_mutable(&req.mutable_parameters)?;
            let _guard = self.volume_guard(id.as_str())?;
            self.core.modify_volume(&id, changes).await?;
            Ok(ControllerModifyVolumeResponse {})
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("ControllerExpandVolume", &req.volume_id, req, async {
            let id = volume_id_field(&req.volume_id, "volume_id")?;
            let block = matches!(
                req.volume_capability
                    .as_ref()
                    .and_then(|c| c.access_type.as_ref()),
                Some(AccessType::Block(_))
            );
            let _guard = self.volume_guard(id.as_str())?;
            let (size, node_expansion_required) = self
                .core
                .expand_volume(&id, req.capacity_range.as_ref(), block)
                .await?;
            Ok(ControllerExpandVolumeResponse {
                capacity_bytes: size as i64,
                node_expansion_required,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.get_ref();
        rpc("ControllerGetVolume", &req.volume_id, req, async {
            let id = volume_id_field(&req.volume_id, "volume_id")?;
            self.core.get_volume(&id).await
        })
        .await
    }
}
