//! Command-line and environment configuration of the plugin (clap).
//!
//! Every flag can also be set through the environment variable named in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Default CSI driver name (also the CSIDriver object's name).
pub const DEFAULT_DRIVER_NAME: &str = "rds.csi.srvlab.io";

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity + Controller (the controller Deployment).
    Controller,
    /// Identity + Node (the node DaemonSet).
    Node,
    /// Identity + Controller + Node (development, the embedded default).
    All,
}

impl Mode {
    /// Serves the Controller service.
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    /// Serves the Node service.
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the CSI gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const HINT: &str = "expected unix:///absolute/path.sock or tcp://host:port";
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute ({HINT})"));
            }
            if path.ends_with('/') {
                return Err(format!("{s:?}: the socket path names a directory ({HINT})"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            use std::net::ToSocketAddrs;
            let mut addrs = addr
                .to_socket_addrs()
                .map_err(|e| format!("{s:?}: not a host:port address: {e} ({HINT})"))?;
            return addrs
                .next()
                .map(Endpoint::Tcp)
                .ok_or_else(|| format!("{s:?}: the address resolves to nothing ({HINT})"));
        }
        Err(format!("{s:?}: unknown scheme ({HINT})"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

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

    /// Data-path fence: ControllerPublish restricts the disk's NVMe/TCP export to the
    /// node's host NQN (Node annotation rds.csi.srvlab.io/host-nqn), ControllerUnpublish
    /// lifts it, so a node that missed its detach cannot reach the volume.
    #[arg(long, hide_env_values = true, env = "RDS_CSI_DATA_PATH_FENCE")]
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
    pub initiator: Option<crate::node::InitiatorKind>,

    /// This host's NVMe host NQN [default: the content of /etc/nvme/hostnqn].
    #[arg(long, hide_env_values = true, env = "NVME_HOST_NQN")]
    pub nvme_host_nqn: Option<String>,

    /// NQN prefix of this driver's volumes (a volume's NQN is the prefix + its id); the
    /// node never connects or disconnects any other NVMe subsystem.
    #[arg(long, hide_env_values = true, env = "RDS_CSI_NQN_PREFIX", default_value = crate::node::DEFAULT_NQN_PREFIX)]
    pub nvme_nqn_prefix: String,

    /// NVMe/TCP address nodes connect to [default: the --rds-address host, else 127.0.0.1].
    #[arg(long, hide_env_values = true, env = "RDS_NVME_ADDRESS")]
    pub nvme_address: Option<String>,

    /// NVMe/TCP port of volume exports.
    #[arg(long, hide_env_values = true, env = "RDS_NVME_PORT", default_value_t = crate::controller::DEFAULT_NVME_PORT)]
    pub nvme_port: u16,

    /// Most volumes attached to one node (0: no limit).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_MAX_VOLUMES_PER_NODE",
        default_value_t = 0
    )]
    pub max_volumes_per_node: u32,

    /// How often the controller resynchronises its attachment memory from the PV
    /// annotations, in seconds, picking up changes another controller replica made during
    /// a failover (0: never).
    #[arg(
        long,
        hide_env_values = true,
        env = "RDS_CSI_ATTACHMENT_RESYNC",
        default_value_t = 120
    )]
    pub attachment_resync_secs: u64,

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
    /// The node id, defaulting to the host name.
    pub fn node_id_or_hostname(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }
}

impl Cli {
    /// The allowed root for staging/target paths: the flag, else `/var/lib/kubelet` when
    /// running inside a Kubernetes pod (`in_cluster`), else none.
    pub fn allowed_root(&self, in_cluster: bool) -> Option<PathBuf> {
        self.kubelet_root
            .clone()
            .or_else(|| in_cluster.then(|| PathBuf::from("/var/lib/kubelet")))
    }

    /// The node's initiator: the flag, else loop devices on the embedded default (mode all
    /// without --rds-address), else nvme-cli.
    pub fn initiator_kind(&self) -> crate::node::InitiatorKind {
        use crate::node::InitiatorKind;
        self.initiator
            .unwrap_or(if self.rds_address.is_none() && self.mode == Mode::All {
                InitiatorKind::Loop
            } else {
                InitiatorKind::Nvme
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_unix_and_tcp_and_explains_errors() {
        assert_eq!(
            "unix:///run/csi/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/csi/csi.sock".into())
        );
        assert!(matches!(
            "tcp://127.0.0.1:10000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp(_)
        ));
        for bad in [
            "/tmp/x.sock",
            "unix://relative.sock",
            "http://x",
            "tcp://nohost",
            "unix:///tmp/",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err();
            assert!(err.contains("expected unix://"), "{bad}: {err}");
        }
    }

    #[test]
    fn kubelet_root_and_initiator_defaults_follow_the_environment() {
        use crate::node::InitiatorKind;
        let cli = Cli::parse_from(["rds-csi-plugin"]);
        assert_eq!(cli.allowed_root(false), None);
        assert_eq!(
            cli.allowed_root(true),
            Some(PathBuf::from("/var/lib/kubelet"))
        );
        assert_eq!(cli.initiator_kind(), InitiatorKind::Loop);
        let cli = Cli::parse_from(["rds-csi-plugin", "--mode", "node", "--kubelet-root", "/k"]);
        assert_eq!(cli.allowed_root(true), Some(PathBuf::from("/k")));
        assert_eq!(cli.initiator_kind(), InitiatorKind::Nvme);
        let cli = Cli::parse_from(["rds-csi-plugin", "--mode", "node", "--initiator", "loop"]);
        assert_eq!(cli.initiator_kind(), InitiatorKind::Loop);
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
