//! The node side of the driver: the adapters of the `Initiator` and `Mounter` ports and the
//! node core the CSI Node service calls.
//!
//! - [`ops`]: the core (stage, publish, expand, stats, start-up recovery), stateless over
//!   the ports;
//! - [`nvme`]: production initiator (nvme-cli + sysfs); [`loopdev`]: embedded initiator
//!   (loop devices over the embedded RDS's files);
//! - [`mount`]: the real mounter; [`mountinfo`]: the mount table parser;
//! - [`exec`]: the bounded command runner seam; [`paths`]: request path validation;
//! - [`fake`]: an in-memory kernel implementing both node ports (unit tests, simulation).

pub mod exec;
pub mod fake;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod nvme;
pub mod ops;
pub mod paths;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::NodeDeps;
use crate::types::NodeId;

pub use ops::{NodeOps, NodeOptions};

/// Default prefix of the NQNs this driver exports (RouterOS: `nvme-tcp-server-nqn`); a
/// volume's NQN is this prefix followed by the volume id.
pub const DEFAULT_NQN_PREFIX: &str = "nqn.2000-02.com.mikrotik:";

/// Bound on one external command (mkfs of a large volume is the slowest).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on one blocking filesystem call (statvfs, stat, open, reading mountinfo).
pub const SYSCALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Which initiator the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitiatorKind {
    /// The kernel NVMe/TCP initiator through nvme-cli (production).
    Nvme,
    /// Loop devices over the embedded RDS's backing files (embedded default).
    Loop,
}

/// Where the embedded RDS keeps its disk files: `<state_dir>/rds/<EMBEDDED_VOLUME_PATH>`.
pub fn embedded_volume_dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir
        .join("rds")
        .join(crate::driver::EMBEDDED_VOLUME_PATH)
}

/// Node ports for the embedded default: loop devices over the embedded RDS's disk files
/// `<state_dir>/rds/pool/volumes/<slot>.img`.
pub fn embedded_deps(state_dir: &Path, node_id: &NodeId, opts: NodeOptions) -> NodeDeps {
    let runner = Arc::new(exec::TokioRunner::new(COMMAND_TIMEOUT));
    let initiator = loopdev::LoopInitiator::new(
        runner.clone(),
        &embedded_volume_dir(state_dir),
        opts.nqn_prefix.clone(),
        format!("nqn.2014-08.io.srvlab.rds-csi:embedded:{node_id}"),
    );
    NodeDeps {
        initiator: Arc::new(initiator),
        mounter: Arc::new(mount::RealMounter::new(runner, SYSCALL_TIMEOUT)),
        options: opts,
    }
}

/// Node ports for production: nvme-cli with `host_nqn` (else `/etc/nvme/hostnqn`).
pub fn nvme_deps(host_nqn: Option<String>, mut opts: NodeOptions) -> NodeDeps {
    opts.require_target_address = true;
    let runner = Arc::new(exec::TokioRunner::new(COMMAND_TIMEOUT));
    let initiator = nvme::NvmeCli::new(
        nvme::NvmeCliConfig::new(opts.nqn_prefix.clone(), host_nqn),
        runner.clone(),
    );
    NodeDeps {
        initiator: Arc::new(initiator),
        mounter: Arc::new(mount::RealMounter::new(runner, SYSCALL_TIMEOUT)),
        options: opts,
    }
}

/// Node ports as the command line describes them (initiator kind, host NQN, NQN prefix,
/// allowed path root).
pub fn node_deps_from_cli(
    cli: &crate::config::Cli,
    state_dir: &Path,
    node_id: &NodeId,
) -> NodeDeps {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let opts = NodeOptions {
        allowed_root: cli.allowed_root(in_cluster),
        nqn_prefix: cli.nvme_nqn_prefix.clone(),
        require_target_address: false,
    };
    tracing::info!(initiator = ?cli.initiator_kind(), allowed_root = ?opts.allowed_root, nqn_prefix = %opts.nqn_prefix, "node service");
    match cli.initiator_kind() {
        InitiatorKind::Loop => embedded_deps(state_dir, node_id, opts),
        InitiatorKind::Nvme => nvme_deps(cli.nvme_host_nqn.clone(), opts),
    }
}
