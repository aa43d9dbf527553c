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
        cluster: None,
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
        cluster: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Initiator;
    use crate::ports::rds::{DiskSpec, NvmeExport};
    use crate::ports::time::{SeededEntropy, SystemClock};

    /// The contract between the embedded RDS and the loop initiator: the file a CreateVolume
    /// makes is the file the node attaches, found from the NQN alone.
    #[tokio::test]
    async fn the_loop_initiator_finds_the_files_the_embedded_rds_creates() {
        let dir = tempfile::tempdir().unwrap();
        let rds = crate::driver::embedded_rds(
            dir.path(),
            Arc::new(SystemClock),
            Arc::new(SeededEntropy::from_seed(1)),
        )
        .unwrap();
        let nqn = format!("{DEFAULT_NQN_PREFIX}pvc-contract");
        rds.create_disk(&DiskSpec {
            slot: "pvc-contract".into(),
            size_bytes: 1 << 20,
            export: Some(NvmeExport {
                port: 4420,
                nqn: nqn.clone(),
            }),
            copy_from: None,
            comment: None,
        })
        .await
        .unwrap();
        let runner = Arc::new(exec::TokioRunner::new(COMMAND_TIMEOUT));
        let l = loopdev::LoopInitiator::new(
            runner,
            &embedded_volume_dir(dir.path()),
            DEFAULT_NQN_PREFIX.into(),
            "nqn.host".into(),
        );
        let file = l.file_for(&nqn).unwrap();
        assert!(file.is_file(), "{} missing", file.display());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 20);
        // Nothing attached yet, and a foreign NQN maps to nothing.
        assert_eq!(l.find_device(&nqn).await.unwrap(), None);
        assert!(l.file_for("nqn.other:pvc-contract").is_err());
    }
}
