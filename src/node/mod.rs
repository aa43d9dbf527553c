//! The node side of the driver: the node core the CSI Node service calls, and the adapters
//! of the two node ports.
//!
//! - [`ops`]: the core (stage, publish, expand, stats, repair of stale mounts, start-up
//!   recovery) over the ports, with [`backoff`] of failing volumes; [`orphans`]: the sweep
//!   of connections nothing holds; [`publish_host_nqn`]: the start-up step that lets the
//!   controller fence;
//! - [`nvme`]: production initiator (nvme-cli + sysfs); [`loopdev`]: embedded initiator
//!   (loop devices over the embedded RDS's files);
//! - [`mount`]: the real mounter; [`mountinfo`]: the mount table parser;
//! - [`exec`]: the bounded command runner seam; [`paths`]: request path validation;
//! - [`fake`]: an in-memory kernel implementing both node ports (unit tests, simulation).
//!
//! Which adapters a plugin instance runs with is decided by the composition root
//! ([`crate::compose`]), never here.

pub mod backoff;
pub mod exec;
pub mod fake;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod nvme;
pub mod ops;
pub mod orphans;
pub mod paths;

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::ports::{Cluster, Initiator};
use crate::types::NodeId;

pub use ops::{NodeOps, NodeOptions, ReconnectDefaults};
pub use orphans::{OrphanConfig, OrphanSweeper, VolumeBusy};

/// Bound on one external command (mkfs of a large volume is the slowest).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on one blocking filesystem call (statvfs, stat, open, reading mountinfo).
pub const SYSCALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long start-up waits for the host NQN to be published before serving without it.
pub const PUBLISH_HOST_NQN_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes this node's NVMe host NQN for the controller's data-path fence
/// (`--data-path-fence`). Best effort by design: the fence is optional and a node that
/// cannot publish still serves its volumes; with the fence on, the controller refuses to
/// publish to a node without a known NQN (FAILED_PRECONDITION), so a failure here shows up
/// there too. Hence a warning that names the cause and the fix, not a start-up failure.
pub async fn publish_host_nqn(node: &NodeId, initiator: &dyn Initiator, cluster: &dyn Cluster) {
    let nqn = match initiator.host_nqn().await {
        Ok(nqn) => nqn,
        Err(e) => {
            tracing::warn!(
                node_id = %node,
                error = %e,
                "cannot read this node's NVMe host NQN, so it is not published: with \
                 --data-path-fence the controller cannot publish volumes to this node; set \
                 --nvme-host-nqn or write /etc/nvme/hostnqn, then restart the node plugin"
            );
            return;
        }
    };
    let published =
        tokio::time::timeout(PUBLISH_HOST_NQN_TIMEOUT, cluster.set_node_host_nqn(node, &nqn))
            .await
            .unwrap_or_else(|_| {
                Err(crate::ports::cluster::ClusterError::Unavailable(format!(
                    "no answer within {}s",
                    PUBLISH_HOST_NQN_TIMEOUT.as_secs()
                )))
            });
    match published {
        Ok(()) => tracing::info!(node_id = %node, host_nqn = %nqn, "host NQN published"),
        Err(e) => tracing::warn!(
            node_id = %node,
            host_nqn = %nqn,
            error = %e,
            "cannot publish this node's NVMe host NQN (Node annotation \
             rds.csi.srvlab.io/host-nqn): with --data-path-fence the controller cannot publish \
             volumes to this node; check the node ServiceAccount may patch nodes (RBAC) and the \
             API server is reachable, then restart the node plugin, or annotate the Node by hand"
        ),
    }
}
