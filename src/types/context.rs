//! Keys of the `volume_context` and `publish_context` maps the controller hands to the node.
//!
//! The controller sets them in CreateVolume (`volume_context`) and ControllerPublishVolume
//! (`publish_context`); the node reads them in NodeStageVolume. One list, so the two sides
//! cannot drift apart.

/// NVMe/TCP target address the node connects to.
pub const NVME_ADDRESS: &str = "nvmeAddress";
/// NVMe/TCP target port.
pub const NVME_PORT: &str = "nvmePort";
/// Subsystem NQN of the volume.
pub const NQN: &str = "nqn";
/// Filesystem type for mount volumes (`ext4`, `xfs`).
pub const FS_TYPE: &str = "fsType";
/// nvme connect `--ctrl-loss-tmo` (seconds, -1 forever).
pub const CTRL_LOSS_TMO: &str = "ctrlLossTmo";
/// nvme connect `--reconnect-delay` (seconds).
pub const RECONNECT_DELAY: &str = "reconnectDelay";
/// nvme connect `--keep-alive-tmo` (seconds; `0`: the kernel's default, as the earlier
/// driver wrote it).
pub const KEEP_ALIVE_TMO: &str = "keepAliveTmo";
/// How long a live migration of a multi-node block volume may run (seconds, 30–3600; the
/// controller reads it at ControllerPublishVolume).
pub const MIGRATION_TIMEOUT: &str = "migrationTimeoutSeconds";
