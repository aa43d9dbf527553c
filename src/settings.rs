//! The typed settings of one plugin instance: what the command line decided (or the
//! simulation, or a test), validated once, as plain values. The composition root
//! ([`crate::compose`]) turns them into ports, adapters and services; nothing below the
//! root reads the command line, and nothing here does I/O beyond what validation needed
//! (the SSH key was read when the settings were made).
//!
//! Each part is the configuration type of the layer that consumes it
//! ([`ControllerConfig`], [`AttachmentConfig`], [`NodeOptions`], [`OrphanConfig`],
//! [`RdsLayout`]), so a setting has one type from the flag to its use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::attachment::AttachmentConfig;
use crate::controller::ControllerConfig;
use crate::controller::orphans::OrphanVolumeConfig;
use crate::controller::params::Expected;
use crate::controller::reconcile::ReconcileConfig;
use crate::controller::traffic::TrafficConfig;
use crate::node::{NodeOptions, OrphanConfig};
use crate::retry::Backoff;
use crate::routeros::RdsLayout;
use crate::routeros::transport::ssh::SshConfig;
use crate::types::defaults::DEFAULT_DRIVER_NAME;
use crate::types::{Endpoint, InitiatorKind, Mode, NodeId};

/// Namespace of the reconcilers' Lease when none is given (the chart passes its own).
pub const DEFAULT_LEASE_NAMESPACE: &str = "default";

/// Mount point of the embedded RDS's pool.
pub const EMBEDDED_POOL_MOUNT: &str = "pool";
/// Where the embedded RDS keeps disk files (host path: `<state-dir>/rds/pool/volumes`).
pub const EMBEDDED_VOLUME_PATH: &str = "pool/volumes";
/// Size of the embedded RDS's pool.
pub const EMBEDDED_POOL_BYTES: u64 = 1 << 40;

/// Retries of RouterOS commands over SSH (a real RDS: slower answers than the API).
pub const SSH_RETRY: Backoff = Backoff {
    base: Duration::from_millis(200),
    max: Duration::from_secs(5),
    max_attempts: 4,
};

/// Everything one plugin instance runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// CSI driver name (GetPluginInfo; prefix of the annotations the driver writes).
    pub driver_name: String,
    /// Version reported by GetPluginInfo.
    pub version: String,
    /// This node's id (the Kubernetes node name).
    pub node_id: NodeId,
    /// Which services are served.
    pub mode: Mode,
    /// Local state: the embedded RDS, the local attachment store, the loop initiator's files.
    pub state_dir: PathBuf,
    /// How the controller reaches the RDS.
    pub rds: RdsSettings,
    /// Whether and how the plugin reaches Kubernetes.
    pub kube: KubeSettings,
    /// The controller core.
    pub controller: ControllerConfig,
    /// The attachment manager (also: the node's max volumes, reported by NodeGetInfo).
    pub attachment: AttachmentConfig,
    /// The controller's poll of published volumes' disk traffic (metrics).
    pub disk_traffic: TrafficConfig,
    /// The controller's orphan volume reconciler.
    pub orphan_volumes: OrphanVolumeConfig,
    /// The controller's reconcilers' loop (lease, attachment reconciler).
    pub reconcile: ReconcileConfig,
    /// The node core and its initiator.
    pub node: NodeSettings,
    /// The gRPC endpoint, metrics and shutdown.
    pub serve: ServeSettings,
}

/// How the controller reaches the RDS.
#[derive(Debug, Clone)]
pub struct RdsSettings {
    /// The embedded emulator or a real RDS over SSH.
    pub access: RdsAccess,
    /// Where volumes live on it.
    pub layout: RdsLayout,
    /// Retries of reads and observed writes.
    pub retry: Backoff,
}

impl RdsSettings {
    /// The embedded RDS: the emulator's pool mounted at [`EMBEDDED_POOL_MOUNT`], disks
    /// under [`EMBEDDED_VOLUME_PATH`].
    pub fn embedded() -> Self {
        Self {
            access: RdsAccess::Embedded,
            layout: RdsLayout {
                volume_base_path: EMBEDDED_VOLUME_PATH.into(),
                pool_mount_point: EMBEDDED_POOL_MOUNT.into(),
            },
            retry: Backoff::API,
        }
    }
}

/// Which RDS.
#[derive(Debug, Clone)]
pub enum RdsAccess {
    /// The RouterOS emulator on files under `<state_dir>/rds`, in process.
    Embedded,
    /// A real RDS over SSH.
    Ssh(SshSettings),
}

/// A real RDS over SSH.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// Management address (host name or IP).
    pub address: String,
    /// SSH port.
    pub port: u16,
    /// User, key (never printed), host key policy, timeouts, pool size.
    pub config: SshConfig,
}

/// Whether and how the plugin reaches Kubernetes.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Where the client configuration comes from.
    pub access: KubeAccess,
    /// Retries of API conflicts and transient errors.
    pub retry: Backoff,
    /// Namespace of the Lease the controller's replicas elect their reconcilers' leader
    /// with.
    pub lease_namespace: String,
}

/// Where the Kubernetes client configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeAccess {
    /// No Kubernetes: attachments in a local file, a local cluster view.
    Off,
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
    /// The pod's service account. A node plugin without one still serves its volumes (it
    /// only cannot publish its host NQN); a controller without one does not start.
    InCluster,
}

/// The node side.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node core's options (allowed path root, NQN prefix, whether the target address
    /// is required).
    pub options: NodeOptions,
    /// How volumes are attached.
    pub initiator: InitiatorKind,
    /// This host's NVMe host NQN (`None`: read `/etc/nvme/hostnqn`).
    pub host_nqn: Option<String>,
    /// The sweep of orphan NVMe connections.
    pub orphans: OrphanConfig,
}

/// Serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    /// Where CSI is served.
    pub endpoint: Endpoint,
    /// Where Prometheus metrics are served (`None`: off).
    pub metrics_address: Option<SocketAddr>,
    /// Bound on draining in-flight RPCs at stop.
    pub drain: Duration,
}

impl Settings {
    /// The embedded default for `node_id` in `mode` with state under `state_dir`: the
    /// values the command line gives without flags (pinned by a test in [`crate::cli`]).
    pub fn embedded(node_id: NodeId, mode: Mode, state_dir: PathBuf) -> Self {
        let initiator = if mode == Mode::All {
            InitiatorKind::Loop
        } else {
            InitiatorKind::Nvme
        };
        Self {
            driver_name: DEFAULT_DRIVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            node_id,
            mode,
            state_dir,
            rds: RdsSettings::embedded(),
            kube: KubeSettings {
                access: KubeAccess::Off,
                retry: Backoff::API,
                lease_namespace: DEFAULT_LEASE_NAMESPACE.into(),
            },
            controller: ControllerConfig {
                expected: Expected {
                    rds_address: None,
                    volume_path: Some(EMBEDDED_VOLUME_PATH.into()),
                },
                ..ControllerConfig::default()
            },
            attachment: AttachmentConfig {
                resync_interval: Duration::ZERO,
                data_path_fence: true,
                ..AttachmentConfig::default()
            },
            disk_traffic: TrafficConfig::default(),
            orphan_volumes: OrphanVolumeConfig::default(),
            reconcile: ReconcileConfig::default(),
            node: NodeSettings {
                options: NodeOptions {
                    require_target_address: initiator == InitiatorKind::Nvme,
                    ..NodeOptions::default()
                },
                initiator,
                host_nqn: None,
                orphans: OrphanConfig::default(),
            },
            serve: ServeSettings {
                endpoint: Endpoint::Unix("/tmp/rds-csi/csi.sock".into()),
                metrics_address: None,
                drain: Duration::from_secs(30),
            },
        }
    }
}
