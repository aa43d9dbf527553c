//! Names, prefixes and ports more than one layer must agree on, in one list: the command
//! line offers them as defaults, the controller exports volumes with them, the node only
//! touches what they name.

/// Default CSI driver name (also the CSIDriver object's name and the prefix of every
/// annotation the driver writes).
pub const DEFAULT_DRIVER_NAME: &str = "rds.csi.srvlab.io";

/// Default prefix of the NQNs this driver exports (RouterOS: `nvme-tcp-server-nqn`); a
/// volume's NQN is this prefix followed by the volume id.
pub const DEFAULT_NQN_PREFIX: &str = "nqn.2000-02.com.mikrotik:";

/// Default NVMe/TCP port of an export (RouterOS's own default).
pub const DEFAULT_NVME_PORT: u16 = 4420;

/// Default `migrationTimeoutSeconds` of a multi-node block volume (the earlier driver's):
/// what the attachment core applies and what the PV store assumes for a migration recorded
/// without its timeout.
pub const DEFAULT_MIGRATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
