//! The CSI Controller service: volume lifecycle, publish/unpublish, snapshots, capacity.
//!
//! RPCs not listed in `ControllerGetCapabilities` answer UNIMPLEMENTED (generated default).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::inflight::InFlight;
use crate::csi::rpc;
use crate::driver::{ControllerDeps, DriverConfig};
use crate::proto::csi::{
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerPublishVolumeRequest, ControllerPublishVolumeResponse, ControllerServiceCapability,
    ControllerUnpublishVolumeRequest, ControllerUnpublishVolumeResponse, controller_server,
    controller_service_capability,
};

/// Controller service state (one per plugin instance).
pub struct ControllerService {
    #[allow(dead_code)]
    cfg: Arc<DriverConfig>,
    #[allow(dead_code)]
    deps: ControllerDeps,
    #[allow(dead_code)]
    inflight: InFlight,
}

impl ControllerService {
    /// A controller over `deps`.
    pub fn new(cfg: Arc<DriverConfig>, deps: ControllerDeps) -> Self {
        Self {
            cfg,
            deps,
            inflight: InFlight::default(),
        }
    }
}

#[tonic::async_trait]
impl controller_server::Controller for ControllerService {
    async fn controller_get_capabilities(
        &self,
        request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::{Rpc, Type, rpc::Type as T};
        let cap = |t: T| ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        rpc("ControllerGetCapabilities", "", request.get_ref(), async {
            Ok(ControllerGetCapabilitiesResponse {
                capabilities: vec![cap(T::PublishUnpublishVolume), cap(T::PublishReadonly)],
            })
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
            let _inflight = self.inflight.try_start(
                args.volume_id.as_str(),
                &format!("volume {}", args.volume_id),
            )?;
            let context = self.deps.attachments.publish(&args).await?;
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
            let _inflight = self.inflight.try_start(
                args.volume_id.as_str(),
                &format!("volume {}", args.volume_id),
            )?;
            self.deps.attachments.unpublish(&args).await?;
            Ok(ControllerUnpublishVolumeResponse {})
        })
        .await
    }
}
