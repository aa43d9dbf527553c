//! The command line of `rds-csi-plugin` (clap; every flag also an environment variable),
//! and its validation into typed [`Settings`]: the only place that reads flags or the
//! process environment. Everything below the binary gets [`Settings`], never [`Cli`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::attachment::AttachmentConfig;
use crate::controller::ControllerConfig;
use crate::controller::orphans::{OrphanMode, OrphanVolumeConfig};
use crate::controller::params::Expected;
use crate::controller::reconcile::ReconcileConfig;
use crate::node::{NodeOptions, OrphanConfig, ReconnectDefaults};
use crate::routeros::RdsLayout;
use crate::routeros::transport::ssh::{HostKeyPolicy, SshConfig, load_private_key};
use crate::server::ServeError;
use crate::settings::{
    DEFAULT_LEASE_NAMESPACE, KubeAccess, KubeSettings, NodeSettings,
    RdsAccess, RdsSettings, SSH_RETRY, ServeSettings, Settings, SshSettings,
};
use crate::telemetry::LogFormat;
use crate::types::defaults::{DEFAULT_DRIVER_NAME, DEFAULT_NQN_PREFIX, DEFAULT_NVME_PORT};
use crate::types::{Endpoint, InitiatorKind, Mode, NodeId, Nqn};

/// rds-csi-plugin: Kubernetes CSI driver for the MikroTik ROSE Data Server (NVMe/TCP).
///
/// Without --rds-address it runs on its embedded default: an RDS emulated on local files
/// under --state-dir, no Kubernetes needed.
#[derive(Debug, Clone, Parser)]
#[command(name = "rds-csi-plugin", version, about, long_about = None)]
pub struct Cli {
    /// CSI endpoint to serve on.
    #[arg(
        long,
        hide_env_values = true,
        env = "CSI_ENDPOINT",
        default_value = "unix:///tmp/rds-csi/csi.sock"
    )]
    pub endpoint: Endpoint,

    /// This node's id (the Kubernetes node name) [default: the host name].
    #[arg(long, hide_env_values = true, env = "CSI_NODE_ID")]
    pub node_id: Option<String>,

    /// CSI driver name.
    #[arg(long, hide_env_values = true, env = "CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,

    /// Which services to serve.
    #[arg(long, hide_env_values = true, env = "CSI_MODE", value_enum, default_value_t = Mode::All)]
    pub mode: Mode,

    /// Directory for local state (embedded backend, local attachment store)
    /// [default: a directory under the system temp dir, created and printed].
    #[arg(long, hide_env_values = true, env = "RDS_CSI_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// RDS management address (SSH). Without it the embedded backend is used.
    #[arg(long, hide_env_values = true, env = "RDS_ADDRESS")]
    pub rds_address: Option<String>,

    /// RDS SSH port.
    #[arg(long, hide_env_values = true, env = "RDS_PORT", default_value_t = 22)]
    pub rds_port: u16,

    /// RDS SSH user.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_USER",
        default_value = "admin"
    )]
    pub rds_user: String,

    /// File holding the SSH private key (ed25519 or RSA) for the RDS user.
    #[arg(long, hide_env_values = true, env = "RDS_KEY_FILE")]
    pub rds_key_file: Option<PathBuf>,

    /// Pinned RDS host key: an OpenSSH public key line or a SHA256:... fingerprint.
    #[arg(long, hide_env_values = true, env = "RDS_HOST_KEY")]
    pub rds_host_key: Option<String>,

    /// Accept any RDS host key (insecure; logs a warning at start).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_INSECURE_SKIP_HOST_KEY_VERIFICATION"
    )]
    pub rds_insecure_skip_host_key_verification: bool,

    /// Directory of the volume files on the RDS, under the pool's mount point
    /// (e.g. /storage-pool/kubernetes).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_VOLUME_PATH",
        default_value = "/storage-pool/kubernetes"
    )]
    pub rds_volume_path: String,

    /// Mount point of the RDS pool holding --rds-volume-path, whose free space is the
    /// capacity [default: the first component of --rds-volume-path].
    #[arg(long, hide_env_values = true, env = "RDS_POOL_MOUNT_POINT")]
    pub rds_pool_mount_point: Option<String>,

    /// Bound on connecting to the RDS (TCP, SSH handshake, authentication), in seconds.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CONNECT_TIMEOUT",
        default_value_t = 10
    )]
    pub rds_connect_timeout_secs: u64,

    /// Bound on one RouterOS command, in seconds.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_COMMAND_TIMEOUT",
        default_value_t = 30
    )]
    pub rds_command_timeout_secs: u64,

    /// SSH sessions to the RDS kept open and reused.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_MAX_CONNECTIONS",
        default_value_t = 2
    )]
    pub rds_max_connections: usize,

    /// RouterOS commands in flight at once (SSH channels over all sessions).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_MAX_CHANNELS",
        default_value_t = 8
    )]
    pub rds_max_channels: usize,

    /// Kubeconfig file [default: in-cluster config inside a pod, else no Kubernetes].
    #[arg(long, hide_env_values = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Data-path fence: a volume's NVMe/TCP export admits only the host NQN of the node
    /// it is published to (Node annotation rds.csi.srvlab.io/host-nqn, set by the node
    /// plugin), and no host at all while it is not published (parked), so a node that
    /// missed its detach cannot reach the volume. `--data-path-fence=false` opens every
    /// export to any host (warned at start-up).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_DATA_PATH_FENCE",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub data_path_fence: bool,

    /// Address to serve Prometheus metrics on (e.g. 0.0.0.0:9809); off when unset.
    #[arg(long, hide_env_values = true, env = "METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,

    /// Log format.
    #[arg(long, hide_env_values = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level or filter directives (e.g. info, rds_csi=debug).
    #[arg(
        long,
        hide_env_values = true,
        env = "LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,

    /// Staging and target paths must lie below this directory [default: /var/lib/kubelet
    /// inside a Kubernetes pod, no restriction otherwise].
    #[arg(long, hide_env_values = true, env = "KUBELET_ROOT")]
    pub kubelet_root: Option<PathBuf>,

    /// How the node attaches volumes [default: loop on the embedded default (mode all
    /// without --rds-address), nvme otherwise].
    #[arg(long, hide_env_values = true, env = "RDS_CSI_INITIATOR", value_enum)]
    pub initiator: Option<InitiatorKind>,

    /// This host's NVMe host NQN [default: the content of /etc/nvme/hostnqn].
    #[arg(long, hide_env_values = true, env = "NVME_HOST_NQN")]
    pub nvme_host_nqn: Option<String>,

    /// NQN prefix of this driver's volumes (a volume's NQN is the prefix + its id); the
    /// node never connects or disconnects any other NVMe subsystem.
    #[arg(long, hide_env_values = true, env = "RDS_CSI_NQN_PREFIX", default_value = DEFAULT_NQN_PREFIX)]
    pub nvme_nqn_prefix: String,

    /// NVMe/TCP controller loss timeout of the node's connections, in seconds, when the
    /// volume's StorageClass sets no ctrlLossTmo (-1: reconnect forever, I/O queued while the
    /// RDS is away; a number: after that long the kernel deletes the controller and I/O on
    /// the volume fails).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_NVME_CTRL_LOSS_TMO",
        default_value_t = -1,
        allow_negative_numbers = true
    )]
    pub nvme_ctrl_loss_tmo: i32,

    /// Seconds between the node's reconnect attempts when the volume's StorageClass sets no
    /// reconnectDelay.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_NVME_RECONNECT_DELAY",
        default_value_t = 5
    )]
    pub nvme_reconnect_delay: u32,

    /// NVMe/TCP keep-alive timeout in seconds when the volume's StorageClass sets no
    /// keepAliveTmo [default: the kernel's].
    #[arg(long, hide_env_values = true, env = "RDS_CSI_NVME_KEEP_ALIVE_TMO")]
    pub nvme_keep_alive_tmo: Option<u32>,

    /// How often the node looks for orphan NVMe connections (this driver's, used by no
    /// mount, held by no VolumeAttachment of the node), in seconds; also once at start-up
    /// (0: never). Needs Kubernetes.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ORPHAN_SWEEP",
        default_value_t = 300
    )]
    pub orphan_sweep_secs: u64,

    /// How long a connection must stay an orphan before it is disconnected, in seconds.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ORPHAN_GRACE",
        default_value_t = 600
    )]
    pub orphan_grace_secs: u64,

    /// Only log the orphan connections that would be disconnected.
    #[arg(long, hide_env_values = true, env = "RDS_CSI_ORPHAN_DRY_RUN")]
    pub orphan_dry_run: bool,

    /// NVMe/TCP address nodes connect to [default: the --rds-address host, else 127.0.0.1].
    #[arg(long, hide_env_values = true, env = "RDS_NVME_ADDRESS")]
    pub nvme_address: Option<String>,

    /// NVMe/TCP port of volume exports.
    #[arg(long, hide_env_values = true, env = "RDS_NVME_PORT", default_value_t = DEFAULT_NVME_PORT)]
    pub nvme_port: u16,

    /// Most volumes attached to one node (0: no limit).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_MAX_VOLUMES_PER_NODE",
        default_value_t = 0
    )]
    pub max_volumes_per_node: u32,

    /// An extra full resynchronisation of the controller's attachment memory from the PV
    /// annotations (a LIST of every PV) every this many seconds (0: never, the default:
    /// with Kubernetes the controller watches the PVs and follows every change another
    /// replica makes; the watch lists again only as its recovery).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ATTACHMENT_RESYNC",
        default_value_t = 0
    )]
    pub attachment_resync_secs: u64,

    /// How often the controller reads the I/O of each published volume's disk on the RDS
    /// (`/disk monitor-traffic`, one RouterOS command per volume) into the metrics, in
    /// seconds (0: never).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_DISK_TRAFFIC_INTERVAL",
        default_value_t = 0
    )]
    pub rds_disk_traffic_interval_secs: u64,

    /// The controller's orphan volume reconciler: disks of this driver on the RDS that no
    /// PersistentVolume, VolumeSnapshotContent, CreateVolume in flight, attachment record
    /// or VolumeAttachment references are reported (log line, gauge, Event); `delete`
    /// also deletes each once it has stayed orphaned for the grace period. Leader only.
    /// Needs Kubernetes.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ORPHAN_RECONCILER",
        value_enum,
        default_value_t = OrphanMode::DryRun
    )]
    pub orphan_reconciler: OrphanMode,

    /// Time between passes of the orphan volume reconciler, in seconds (0: never).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ORPHAN_RECONCILER_INTERVAL",
        default_value_t = 600
    )]
    pub orphan_reconciler_interval_secs: u64,

    /// How long a disk must stay orphaned, as seen by the leading controller since it
    /// first saw it so (a restart restarts the clock), before --orphan-reconciler=delete
    /// deletes it, in seconds.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ORPHAN_RECONCILER_GRACE",
        default_value_t = 3600
    )]
    pub orphan_reconciler_grace_secs: u64,

    /// Time between passes of the attachment reconciler (records of deleted Nodes, and of
    /// VolumeAttachments released by hand, cleared), in seconds (0: never). Leader only.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ATTACHMENT_RECONCILER_INTERVAL",
        default_value_t = 300
    )]
    pub attachment_reconciler_interval_secs: u64,

    /// Namespace of the Lease the controller replicas elect the reconcilers' leader with.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_LEADER_ELECTION_NAMESPACE",
        default_value = DEFAULT_LEASE_NAMESPACE
    )]
    pub leader_election_namespace: String,

    /// How long the reconcilers' Lease lasts without renewal, in seconds (renewed every
    /// third of it).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_LEADER_ELECTION_LEASE",
        default_value_t = 15
    )]
    pub leader_election_lease_secs: u64,

    /// Longest time in-flight RPCs may take to finish after SIGTERM/SIGINT, in seconds.
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_DRAIN_TIMEOUT",
        default_value_t = 30
    )]
    pub drain_timeout_secs: u64,
}

impl Cli {
    /// Validates the flags into settings, reading the process environment for whether it
    /// runs inside a Kubernetes pod.
    pub fn settings(&self) -> Result<Settings, ServeError> {
        self.settings_in(std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    /// Validates the flags into settings; `in_cluster`: whether this process runs inside a
    /// Kubernetes pod (then Kubernetes is used, and staging paths must lie below
    /// `/var/lib/kubelet`, unless the flags say otherwise).
    pub fn settings_in(&self, in_cluster: bool) -> Result<Settings, ServeError> {
        let config = |m: String| ServeError::Config(m);
        crate::csi::identity::validate_driver_name(&self.driver_name).map_err(config)?;
        let node_id = NodeId::new(
            self.node_id
                .clone()
                .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned()),
        )
        .map_err(|e| config(format!("--node-id: {e}")))?;
        Nqn::new(format!("{}x", self.nvme_nqn_prefix)).map_err(|e| {
            config(format!("--nvme-nqn-prefix {:?}: {e}", self.nvme_nqn_prefix))
        })?;
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("rds-csi").join("state"));
        let rds = self.rds_settings()?;
        let kube = KubeSettings {
            access: match &self.kubeconfig {
                Some(path) => KubeAccess::Kubeconfig(path.clone()),
                None if in_cluster => KubeAccess::InCluster,
                None => KubeAccess::Off,
            },
            retry: crate::retry::Backoff::API,
            lease_namespace: self.leader_election_namespace.clone(),
        };
        let nvme_address = self
            .nvme_address
            .clone()
            .or_else(|| self.rds_address.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        let controller = ControllerConfig {
            nqn_prefix: self.nvme_nqn_prefix.clone(),
            nvme_address,
            nvme_port: self.nvme_port,
            expected: Expected {
                rds_address: self.rds_address.clone(),
                volume_path: Some(rds.layout.volume_base_path.clone()),
            },
        };
        let initiator = self.initiator.unwrap_or(
            if self.rds_address.is_none() && self.mode == Mode::All {
                InitiatorKind::Loop
            } else {
                InitiatorKind::Nvme
            },
        );
        let node = NodeSettings {
            options: NodeOptions {
                allowed_root: self
                    .kubelet_root
                    .clone()
                    .or_else(|| in_cluster.then(|| PathBuf::from("/var/lib/kubelet"))),
                nqn_prefix: self.nvme_nqn_prefix.clone(),
                require_target_address: initiator == InitiatorKind::Nvme,
                reconnect: self.reconnect_defaults()?,
            },
            initiator,
            host_nqn: self.nvme_host_nqn.clone(),
            orphans: OrphanConfig {
                interval: Duration::from_secs(self.orphan_sweep_secs),
                grace: Duration::from_secs(self.orphan_grace_secs),
                dry_run: self.orphan_dry_run,
            },
        };
        Ok(Settings {
            driver_name: self.driver_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            node_id,
            mode: self.mode,
            state_dir,
            rds,
            kube,
            controller,
            attachment: AttachmentConfig {
                max_volumes_per_node: u64::from(self.max_volumes_per_node),
                data_path_fence: self.data_path_fence,
                resync_interval: Duration::from_secs(self.attachment_resync_secs),
            },
            disk_traffic: crate::controller::traffic::TrafficConfig {
                interval: Duration::from_secs(self.rds_disk_traffic_interval_secs),
            },
            orphan_volumes: OrphanVolumeConfig {
                mode: self.orphan_reconciler,
                interval: Duration::from_secs(self.orphan_reconciler_interval_secs),
                grace: Duration::from_secs(self.orphan_reconciler_grace_secs),
            },
            reconcile: ReconcileConfig {
                lease_duration: Duration::from_secs(self.leader_election_lease_secs.max(1)),
                attachment_interval: Duration::from_secs(self.attachment_reconciler_interval_secs),
            },
            node,
            serve: ServeSettings {
                endpoint: self.endpoint.clone(),
                metrics_address: self.metrics_address,
                drain: Duration::from_secs(self.drain_timeout_secs),
            },
        })
    }

    /// The node's reconnect defaults, checked as the kernel would check them.
    fn reconnect_defaults(&self) -> Result<ReconnectDefaults, ServeError> {
        let config = |m: String| ServeError::Config(m);
        if self.nvme_ctrl_loss_tmo < -1 {
            return Err(config(format!(
                "--nvme-ctrl-loss-tmo {}: -1 (reconnect forever) or a number of seconds",
                self.nvme_ctrl_loss_tmo
            )));
        }
        if self.nvme_reconnect_delay == 0 {
            return Err(config(
                "--nvme-reconnect-delay 0: at least 1 second between reconnect attempts".into(),
            ));
        }
        if self.nvme_keep_alive_tmo == Some(0) {
            return Err(config(
                "--nvme-keep-alive-tmo 0: at least 1 second, or unset for the kernel's".into(),
            ));
        }
        Ok(ReconnectDefaults {
            ctrl_loss_tmo: self.nvme_ctrl_loss_tmo,
            reconnect_delay: self.nvme_reconnect_delay,
            keep_alive_tmo: self.nvme_keep_alive_tmo,
        })
    }

    /// The RDS the `--rds-*` flags describe: the embedded emulator without `--rds-address`,
    /// else RouterOS over SSH with a pinned host key (the private key is read here).
    fn rds_settings(&self) -> Result<RdsSettings, ServeError> {
        let config = |m: String| ServeError::Config(m);
        let Some(address) = &self.rds_address else {
            return Ok(RdsSettings::embedded());
        };
        let key_file = self.rds_key_file.as_ref().ok_or_else(|| {
            config(
                "--rds-key-file: required with --rds-address (the SSH private key of --rds-user)"
                    .into(),
            )
        })?;
        let key = load_private_key(key_file).map_err(|e| config(format!("--rds-key-file {e}")))?;
        let host_key = match (
            &self.rds_host_key,
            self.rds_insecure_skip_host_key_verification,
        ) {
            (Some(_), true) => {
                return Err(config(
                    "--rds-host-key and --rds-insecure-skip-host-key-verification exclude each \
                     other; keep the pinned key"
                        .into(),
                ));
            }
            (Some(k), false) => {
                HostKeyPolicy::parse(k).map_err(|e| config(format!("--rds-host-key: {e}")))?
            }
            (None, true) => HostKeyPolicy::InsecureAcceptAny,
            (None, false) => {
                return Err(config(
                    "--rds-host-key: required with --rds-address; pin the RDS host key \
                     (an OpenSSH public key line, or its SHA256:... fingerprint from \
                     `ssh-keygen -lf`)"
                        .into(),
                ));
            }
        };
        let volume_path = self.rds_volume_path.trim_matches('/').to_string();
        let pool_mount_point = match &self.rds_pool_mount_point {
            Some(m) => m.trim_matches('/').to_string(),
            None => volume_path
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        let layout = RdsLayout {
            volume_base_path: volume_path,
            pool_mount_point,
        };
        // The adapter refuses a layout it cannot render commands for: refuse it here, with
        // the flags' names, before anything starts.
        layout.renderer().map_err(|e| {
            config(format!("--rds-volume-path / --rds-pool-mount-point: {e}"))
        })?;
        Ok(RdsSettings {
            access: RdsAccess::Ssh(SshSettings {
                address: address.clone(),
                port: self.rds_port,
                config: SshConfig {
                    user: self.rds_user.clone(),
                    key,
                    host_key,
                    connect_timeout: Duration::from_secs(self.rds_connect_timeout_secs.max(1)),
                    command_timeout: Duration::from_secs(self.rds_command_timeout_secs.max(1)),
                    max_connections: self.rds_max_connections.max(1),
                    max_channels: self.rds_max_channels.max(1),
                },
            }),
            layout,
            retry: SSH_RETRY,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str], in_cluster: bool) -> Settings {
        let mut all = vec!["rds-csi-plugin", "--node-id", "n1"];
        all.extend_from_slice(args);
        Cli::parse_from(all).settings_in(in_cluster).unwrap()
    }

    #[test]
    fn without_flags_the_settings_are_the_embedded_default() {
        let s = settings(&["--state-dir", "/s"], false);
        let want = Settings::embedded(NodeId::new("n1").unwrap(), Mode::All, "/s".into());
        assert_eq!(format!("{s:?}"), format!("{want:?}"));
        let s = settings(&["--state-dir", "/s", "--mode", "node"], false);
        let want = Settings::embedded(NodeId::new("n1").unwrap(), Mode::Node, "/s".into());
        assert_eq!(format!("{s:?}"), format!("{want:?}"));
    }

    #[test]
    fn the_reconcilers_come_from_flags() {
        let s = settings(&[], false);
        assert_eq!(s.orphan_volumes, OrphanVolumeConfig::default());
        assert_eq!(s.orphan_volumes.mode, OrphanMode::DryRun, "dry run by default");
        assert_eq!(s.reconcile, ReconcileConfig::default());
        let s = settings(
            &[
                "--orphan-reconciler",
                "delete",
                "--orphan-reconciler-interval-secs",
                "60",
                "--orphan-reconciler-grace-secs",
                "7200",
                "--attachment-reconciler-interval-secs",
                "30",
                "--leader-election-namespace",
                "rds-csi",
                "--leader-election-lease-secs",
                "20",
            ],
            true,
        );
        assert_eq!(
            s.orphan_volumes,
            OrphanVolumeConfig {
                mode: OrphanMode::Delete,
                interval: Duration::from_secs(60),
                grace: Duration::from_secs(7200),
            }
        );
        assert_eq!(
            s.reconcile,
            ReconcileConfig {
                lease_duration: Duration::from_secs(20),
                attachment_interval: Duration::from_secs(30),
            }
        );
        assert_eq!(s.kube.lease_namespace, "rds-csi");
        let off = settings(&["--orphan-reconciler", "off"], false);
        assert_eq!(off.orphan_volumes.mode, OrphanMode::Off);
        assert!(
            Cli::try_parse_from(["rds-csi-plugin", "--orphan-reconciler", "purge"]).is_err(),
            "an unknown mode is refused"
        );
    }

    #[test]
    fn kubelet_root_initiator_and_kubernetes_follow_the_environment() {
        let s = settings(&[], false);
        assert_eq!(s.node.options.allowed_root, None);
        assert_eq!(s.node.initiator, InitiatorKind::Loop);
        assert!(!s.node.options.require_target_address);
        assert_eq!(s.kube.access, KubeAccess::Off);
        let s = settings(&[], true);
        assert_eq!(
            s.node.options.allowed_root,
            Some(PathBuf::from("/var/lib/kubelet"))
        );
        assert_eq!(s.kube.access, KubeAccess::InCluster);
        let s = settings(&["--mode", "node", "--kubelet-root", "/k"], true);
        assert_eq!(s.node.options.allowed_root, Some(PathBuf::from("/k")));
        assert_eq!(s.node.initiator, InitiatorKind::Nvme);
        assert!(s.node.options.require_target_address);
        let s = settings(&["--mode", "node", "--initiator", "loop"], false);
        assert_eq!(s.node.initiator, InitiatorKind::Loop);
        let s = settings(&["--kubeconfig", "/kc"], false);
        assert_eq!(s.kube.access, KubeAccess::Kubeconfig("/kc".into()));
    }

    #[test]
    fn the_data_path_fence_is_on_unless_switched_off() {
        assert!(settings(&[], false).attachment.data_path_fence);
        assert!(settings(&["--data-path-fence"], false).attachment.data_path_fence);
        assert!(settings(&["--data-path-fence=true"], false).attachment.data_path_fence);
        assert!(!settings(&["--data-path-fence=false"], false).attachment.data_path_fence);
        assert!(
            Cli::try_parse_from(["rds-csi-plugin", "--data-path-fence=maybe"]).is_err(),
            "only true or false"
        );
    }

    #[test]
    fn reconnect_defaults_and_the_orphan_sweep_come_from_flags() {
        let s = settings(&[], false);
        assert_eq!(s.node.options.reconnect, ReconnectDefaults::default());
        assert_eq!(s.node.options.reconnect.ctrl_loss_tmo, -1);
        assert_eq!(s.node.options.reconnect.reconnect_delay, 5);
        assert_eq!(s.node.orphans, OrphanConfig::default());
        let s = settings(
            &[
                "--nvme-ctrl-loss-tmo",
                "600",
                "--nvme-reconnect-delay",
                "10",
                "--nvme-keep-alive-tmo",
                "30",
                "--orphan-sweep-secs",
                "0",
                "--orphan-grace-secs",
                "60",
                "--orphan-dry-run",
            ],
            false,
        );
        assert_eq!(
            s.node.options.reconnect,
            ReconnectDefaults {
                ctrl_loss_tmo: 600,
                reconnect_delay: 10,
                keep_alive_tmo: Some(30),
            }
        );
        assert_eq!(
            s.node.orphans,
            OrphanConfig {
                interval: Duration::ZERO,
                grace: Duration::from_secs(60),
                dry_run: true,
            }
        );
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        for (args, flag) in [
            (&["--driver-name", "Not_A_Name"][..], "driver"),
            (&["--node-id", "bad node"][..], "--node-id"),
            (&["--nvme-nqn-prefix", "bad prefix "][..], "--nvme-nqn-prefix"),
            (&["--rds-address", "10.0.0.1"][..], "--rds-key-file"),
            (&["--nvme-ctrl-loss-tmo", "-2"][..], "--nvme-ctrl-loss-tmo"),
            (&["--nvme-reconnect-delay", "0"][..], "--nvme-reconnect-delay"),
            (&["--nvme-keep-alive-tmo", "0"][..], "--nvme-keep-alive-tmo"),
        ] {
            let mut all = vec!["rds-csi-plugin"];
            all.extend_from_slice(args);
            let err = Cli::parse_from(all).settings_in(false).unwrap_err();
            assert!(
                matches!(&err, ServeError::Config(m) if m.contains(flag)),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn help_output_is_stable() {
        use clap::CommandFactory;
        let help = Cli::command()
            .term_width(100)
            .render_long_help()
            .to_string();
        insta::with_settings!({
            snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"),
            prepend_module_to_snapshot => false,
        }, {
            insta::assert_snapshot!("cli_help", help);
        });
    }
}
