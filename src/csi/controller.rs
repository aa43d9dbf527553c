//! The CSI Controller service: volume lifecycle, publish/unpublish, snapshots, capacity.
//!
//! RPCs not listed in `ControllerGetCapabilities` answer UNIMPLEMENTED (generated default).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::inflight::InFlight;
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
    #[tracing::instrument(skip_all, fields(method = "ControllerGetCapabilities"))]
    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::{Rpc, Type, rpc};
        let rpc = |t: rpc::Type| ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(rpc::Type::PublishUnpublishVolume),
                rpc(rpc::Type::PublishReadonly),
            ],
        }))
    }

    #[tracing::instrument(skip_all, fields(method = "ControllerPublishVolume", volume_id = %request.get_ref().volume_id, node_id = %request.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        const METHOD: &str = "ControllerPublishVolume";
        let req = request.into_inner();
        crate::csi::log_request(METHOD, &req);
        let result = async {
            let args = crate::csi::publish::validate_publish(&req)?;
            let _inflight = self.inflight.try_start(
                args.volume_id.as_str(),
                &format!("volume {}", args.volume_id),
            )?;
            self.deps.attachments.publish(&args).await
        }
        .await;
        crate::csi::log_result(METHOD, &result);
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: result?.into_iter().collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(method = "ControllerUnpublishVolume", volume_id = %request.get_ref().volume_id, node_id = %request.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        const METHOD: &str = "ControllerUnpublishVolume";
        let req = request.into_inner();
        crate::csi::log_request(METHOD, &req);
        let result = async {
            let args = crate::csi::publish::validate_unpublish(&req)?;
            let _inflight = self.inflight.try_start(
                args.volume_id.as_str(),
                &format!("volume {}", args.volume_id),
            )?;
            self.deps.attachments.unpublish(&args).await
        }
        .await;
        crate::csi::log_result(METHOD, &result);
        result?;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }
}
