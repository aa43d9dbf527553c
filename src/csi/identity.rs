//! The CSI Identity service: plugin name and version, capabilities, readiness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::{Request, Response, Status};

use crate::types::Mode;
use crate::csi::rpc;
use crate::ports::Rds;
use crate::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse, identity_server,
    plugin_capability,
};

/// Whether start-up work (state rebuild) has finished. Shared by the driver and Probe.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks start-up done.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// Whether start-up is done.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Identity service state.
pub struct IdentityService {
    name: String,
    version: String,
    mode: Mode,
    readiness: Readiness,
    rds: Option<Arc<dyn Rds>>,
}

impl IdentityService {
    /// `rds` is pinged by Probe when this process serves the controller.
    pub fn new(
        name: String,
        version: String,
        mode: Mode,
        readiness: Readiness,
        rds: Option<Arc<dyn Rds>>,
    ) -> Self {
        Self {
            name,
            version,
            mode,
            readiness,
            rds,
        }
    }

    fn capabilities(&self) -> Vec<PluginCapability> {
        use plugin_capability::{Service, VolumeExpansion, service, volume_expansion};
        let service = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(Service {
                r#type: t as i32,
            })),
        };
        let mut caps = Vec::new();
        if self.mode.controller() {
            caps.push(service(service::Type::ControllerService));
        }
        caps.push(service(service::Type::VolumeAccessibilityConstraints));
        caps.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        });
        caps
    }
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        rpc("GetPluginInfo", "", request.get_ref(), async {
            Ok(GetPluginInfoResponse {
                name: self.name.clone(),
                vendor_version: self.version.clone(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        rpc("GetPluginCapabilities", "", request.get_ref(), async {
            Ok(GetPluginCapabilitiesResponse {
                capabilities: self.capabilities(),
            })
        })
        .await
    }

    async fn probe(
        &self,
        request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        rpc("Probe", "", request.get_ref(), async {
            // Spec: "The plugin is still initializing, but is otherwise perfectly healthy. In
            // this case a successful response SHALL be returned with a readiness value of
            // `false`."
            if !self.readiness.is_ready() {
                return Ok(ProbeResponse { ready: Some(false) });
            }
            // Spec: "The plugin is in an unhealthy state and MAY need restarting. In this
            // case a gRPC error code SHALL be returned." A backend that does not answer
            // makes the controller unable to serve.
            if let Some(rds) = &self.rds {
                rds.ping().await?;
            }
            Ok(ProbeResponse { ready: Some(true) })
        })
        .await
    }
}

/// Checks a driver name against the spec: "The name MUST follow domain name notation
/// format ... It SHOULD NOT be longer than 63 characters".
pub fn validate_driver_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("driver name {name:?} must be 1 to 63 characters"));
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && label.as_bytes()[0].is_ascii_alphanumeric()
            && label.as_bytes()[label.len() - 1].is_ascii_alphanumeric()
    });
    if !ok || !name.contains('.') {
        return Err(format!(
            "driver name {name:?} must be a domain name (letters, digits, '-' and '.', e.g. rds.csi.srvlab.io)"
        ));
    }
    Ok(())
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_follow_domain_notation() {
        assert!(validate_driver_name("rds.csi.srvlab.io").is_ok());
        for bad in ["", "nodots", "a..b", "-a.b", "a_b.c", &"a.".repeat(40)] {
            assert!(validate_driver_name(bad).is_err(), "{bad}");
        }
    }
}
