//! The CSI Controller service: volume lifecycle, publish/unpublish, snapshots, capacity.
//!
//! RPCs not listed in `ControllerGetCapabilities` answer UNIMPLEMENTED (generated default).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::inflight::InFlight;
use crate::driver::{ControllerDeps, DriverConfig};
use crate::proto::csi::{
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse, controller_server,
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
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }
}
