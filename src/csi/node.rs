//! The CSI Node service: stage, publish, expand and stats on the node.
//!
//! RPCs not listed in `NodeGetCapabilities` answer UNIMPLEMENTED (generated default).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::rpc;
use crate::driver::{DriverConfig, NodeDeps};
use crate::proto::csi::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, Topology, node_server,
};

/// Topology key naming the node a volume is reachable from.
pub const TOPOLOGY_NODE_KEY: &str = "topology.rds.csi.srvlab.io/node";

/// Node service state (one per plugin instance).
pub struct NodeService {
    cfg: Arc<DriverConfig>,
    #[allow(dead_code)]
    deps: NodeDeps,
}

impl NodeService {
    /// A node service over `deps`.
    pub fn new(cfg: Arc<DriverConfig>, deps: NodeDeps) -> Self {
        Self { cfg, deps }
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn node_get_capabilities(
        &self,
        request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        rpc("NodeGetCapabilities", "", request.get_ref(), async {
            Ok(NodeGetCapabilitiesResponse {
                capabilities: Vec::new(),
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
                node_id: self.cfg.node_id.to_string(),
                max_volumes_per_node: self.cfg.max_volumes_per_node,
                accessible_topology: Some(Topology {
                    segments: [(TOPOLOGY_NODE_KEY.to_string(), self.cfg.node_id.to_string())]
                        .into(),
                }),
            })
        })
        .await
    }
}
