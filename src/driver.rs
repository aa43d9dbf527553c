//! Wiring: the configuration and ports a plugin instance runs with, and the services built
//! from them by [`Mode`]. Constructed once per process (or once per simulated host).

use std::path::Path;
use std::sync::Arc;

use crate::attachment::{AttachmentConfig, AttachmentManager};
use crate::backend::{file_store::FileStore, local_cluster::LocalCluster};
use crate::config::Mode;
use crate::csi::{
    controller::ControllerService,
    identity::{IdentityService, Readiness},
    node::NodeService,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::ports::{AttachmentStore, Clock, Cluster, Entropy, Initiator, Mounter, Rds};
use crate::proto::csi::{controller_server, identity_server, node_server};
use crate::types::NodeId;

/// Size of the embedded backend's pool.
pub const EMBEDDED_POOL_BYTES: u64 = 1 << 40;
/// Mount point of the embedded RDS's pool.
pub const EMBEDDED_POOL_MOUNT: &str = "pool";
/// Where the embedded RDS keeps disk files (host path: `<state-dir>/rds/pool/volumes`).
pub const EMBEDDED_VOLUME_PATH: &str = "pool/volumes";

/// What a plugin instance is, independent of its adapters.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// CSI driver name.
    pub driver_name: String,
    /// Version reported by GetPluginInfo.
    pub version: String,
    /// This node's id.
    pub node_id: NodeId,
    /// Services served.
    pub mode: Mode,
    /// Max volumes per node reported by NodeGetInfo (0: no limit).
    pub max_volumes_per_node: i64,
    /// Controller settings (NQN prefix, NVMe/TCP address and port).
    pub controller: crate::controller::ControllerConfig,
}

/// Ports the Controller service needs.
#[derive(Clone)]
pub struct ControllerDeps {
    /// The storage server.
    pub rds: Arc<dyn Rds>,
    /// Durable attachment records.
    pub store: Arc<dyn AttachmentStore>,
    /// The orchestrator.
    pub cluster: Arc<dyn Cluster>,
    /// Attachment tracking over the three ports above (publish/unpublish, fencing).
    pub attachments: Arc<AttachmentManager>,
}

impl ControllerDeps {
    /// Controller ports, with the attachment manager built over them.
    pub fn new(
        rds: Arc<dyn Rds>,
        store: Arc<dyn AttachmentStore>,
        cluster: Arc<dyn Cluster>,
        clock: Arc<dyn Clock>,
        attach: AttachmentConfig,
    ) -> Self {
        let attachments = Arc::new(AttachmentManager::new(
            Arc::clone(&rds),
            Arc::clone(&store),
            Arc::clone(&cluster),
            clock,
            attach,
        ));
        Self {
            rds,
            store,
            cluster,
            attachments,
        }
    }
}

/// Ports and settings the Node service needs.
#[derive(Clone)]
pub struct NodeDeps {
    /// NVMe/TCP host side (or loop devices on the embedded default).
    pub initiator: Arc<dyn Initiator>,
    /// Filesystems and mounts.
    pub mounter: Arc<dyn Mounter>,
    /// Where the node publishes its NVMe host NQN at start-up (for the controller's
    /// data-path fence); `None`: not published.
    pub cluster: Option<Arc<dyn Cluster>>,
    /// Allowed path root, NQN prefix.
    pub options: crate::node::NodeOptions,
}

/// All ports of one plugin instance.
#[derive(Clone)]
pub struct Deps {
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Randomness (backoff jitter).
    pub entropy: Arc<dyn Entropy>,
    /// Present when the controller is served.
    pub controller: Option<ControllerDeps>,
    /// Present when the node service is served.
    pub node: Option<NodeDeps>,
}

impl Deps {
    /// The embedded default: everything on local files under `state_dir`, no Kubernetes.
    pub fn embedded(
        state_dir: &Path,
        node_id: &NodeId,
        mode: Mode,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
    ) -> Result<Self> {
        Self::embedded_with_rds(state_dir, node_id, mode, clock, entropy, None)
    }

    /// The embedded default, but with `rds` (e.g. the RouterOS SSH adapter) instead of
    /// the emulator when given.
    pub fn embedded_with_rds(
        state_dir: &Path,
        node_id: &NodeId,
        mode: Mode,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        rds: Option<Arc<dyn Rds>>,
    ) -> Result<Self> {
        // One local cluster: in `--mode all` the node registers its host NQN where the
        // controller's data-path fence reads it.
        let cluster = Arc::new(LocalCluster::new([node_id.clone()]));
        let controller = if mode.controller() {
            let rds = match rds {
                Some(rds) => rds,
                None => embedded_rds(state_dir, Arc::clone(&clock), Arc::clone(&entropy))?,
            };
            Some(ControllerDeps::new(
                rds,
                Arc::new(FileStore::open(&state_dir.join("attachments"))?),
                Arc::clone(&cluster) as Arc<dyn Cluster>,
                Arc::clone(&clock),
                AttachmentConfig::default(),
            ))
        } else {
            None
        };
        let node = mode.node().then(|| NodeDeps {
            cluster: Some(cluster as Arc<dyn Cluster>),
            ..crate::node::embedded_deps(state_dir, node_id, crate::node::NodeOptions::default())
        });
        Ok(Self {
            clock,
            entropy,
            controller,
            node,
        })
    }
}

/// The embedded RDS: the RouterOS emulator on sparse files under `<state_dir>/rds`
/// (a pool mounted at [`EMBEDDED_POOL_MOUNT`], disks under [`EMBEDDED_VOLUME_PATH`]),
/// reached in-process through the same renderer, CLI reader and parser as a real RDS.
pub fn embedded_rds(
    state_dir: &Path,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
) -> Result<Arc<dyn Rds>> {
    use crate::routeros::{
        RdsLayout, RouterOsRds,
        emulator::{Emulator, PoolConfig},
        transport::inproc::InProcess,
    };
    let emulator = Emulator::open_dir(
        &state_dir.join("rds"),
        PoolConfig {
            slot: "pool".into(),
            mount_point: EMBEDDED_POOL_MOUNT.into(),
            size_bytes: EMBEDDED_POOL_BYTES,
        },
        clock,
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let layout = RdsLayout {
        volume_base_path: EMBEDDED_VOLUME_PATH.into(),
        pool_mount_point: EMBEDDED_POOL_MOUNT.into(),
    };
    let rds = RouterOsRds::new(
        InProcess::new(Arc::new(emulator)),
        &layout,
        crate::retry::Backoff::API,
        entropy,
    )?;
    Ok(Arc::new(rds))
}

impl Deps {
    /// Puts the controller's attachment tracking on other ports (e.g. the Kubernetes
    /// adapters; `None` keeps the current ones) with `cfg`, rebuilding the manager. No-op
    /// without a controller.
    pub fn with_attachments(
        mut self,
        ports: Option<(Arc<dyn AttachmentStore>, Arc<dyn Cluster>)>,
        cfg: AttachmentConfig,
    ) -> Self {
        if let Some(c) = self.controller.take() {
            let (store, cluster) = ports.unwrap_or((c.store, c.cluster));
            self.controller = Some(ControllerDeps::new(
                c.rds,
                store,
                cluster,
                Arc::clone(&self.clock),
                cfg,
            ));
        }
        self
    }
}

/// A plugin instance: its services and readiness.
pub struct Driver {
    cfg: Arc<DriverConfig>,
    deps: Deps,
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

impl Driver {
    /// Checks that `deps` match the mode.
    pub fn new(cfg: DriverConfig, deps: Deps) -> Result<Self> {
        if cfg.mode.controller() && deps.controller.is_none() {
            return Err(Error::Internal(
                "controller mode without controller ports".into(),
            ));
        }
        if cfg.mode.node() && deps.node.is_none() {
            return Err(Error::Internal("node mode without node ports".into()));
        }
        Ok(Self {
            cfg: Arc::new(cfg),
            deps,
            readiness: Readiness::default(),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DriverConfig {
        &self.cfg
    }

    /// The metrics of this instance.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Readiness flag (Probe).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Start-up work that must finish before the socket accepts requests: checks the
    /// backend answers and rebuilds state. Marks the driver ready.
    pub async fn start(&self) -> Result<()> {
        if let Some(c) = &self.deps.controller {
            c.rds.ping().await?;
            c.attachments.rebuild().await?;
        }
        if let Some(n) = &self.deps.node {
            // Restart recovery: the node's state is whatever the kernel has attached and
            // mounted; read it now (and fail start-up if it cannot be read).
            crate::node::NodeOps::new(
                Arc::clone(&n.initiator),
                Arc::clone(&n.mounter),
                n.options.clone(),
            )
            .recover()
            .await?;
            if let Some(cluster) = &n.cluster {
                publish_host_nqn(&self.cfg.node_id, &*n.initiator, &**cluster).await;
            }
        }
        if let Some(c) = &self.deps.controller {
            spawn_resync(&c.attachments);
        }
        self.readiness.set_ready();
        Ok(())
    }

    /// The gRPC services to serve.
    pub fn services(&self) -> Services {
        let rds = self.deps.controller.as_ref().map(|c| Arc::clone(&c.rds));
        Services {
            identity: identity_server::IdentityServer::new(IdentityService::new(
                self.cfg.driver_name.clone(),
                self.cfg.version.clone(),
                self.cfg.mode,
                self.readiness.clone(),
                rds,
            )),
            controller: self.deps.controller.clone().map(|deps| {
                controller_server::ControllerServer::new(ControllerService::new(
                    Arc::clone(&self.cfg),
                    deps,
                ))
            }),
            node: self.deps.node.clone().map(|deps| {
                node_server::NodeServer::new(NodeService::new(Arc::clone(&self.cfg), deps))
            }),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// Resynchronises the attachment memory from the store every `resync_interval` (zero:
/// never), picking up what another controller replica wrote during a failover. The task
/// ends when the manager is dropped.
fn spawn_resync(attachments: &Arc<AttachmentManager>) {
    let every = attachments.config().resync_interval;
    if every.is_zero() {
        return;
    }
    let manager = Arc::downgrade(attachments);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(m) = manager.upgrade() else { break };
            if let Err(e) = m.resync().await {
                tracing::warn!(error = %e, "attachment resync failed; retrying at the next interval");
            }
        }
    });
}

/// How long start-up waits for the host NQN to be published before serving without it.
pub const PUBLISH_HOST_NQN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// The tonic services of one driver.
pub struct Services {
    /// Identity (always).
    pub identity: identity_server::IdentityServer<IdentityService>,
    /// Controller, in controller/all mode.
    pub controller: Option<controller_server::ControllerServer<ControllerService>>,
    /// Node, in node/all mode.
    pub node: Option<node_server::NodeServer<NodeService>>,
    /// Per-RPC metrics, recorded by the server.
    pub metrics: Arc<Metrics>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local_cluster::LocalCluster;
    use crate::node::fake::FakeKernel;
    use crate::ports::cluster::{ClusterError, ClusterEvent, VolumeAttachmentInfo};

    /// A cluster whose API is down.
    struct Down;
    #[async_trait::async_trait]
    impl Cluster for Down {
        async fn node_exists(&self, _: &NodeId) -> std::result::Result<bool, ClusterError> {
            Err(ClusterError::Unavailable("down".into()))
        }
        async fn node_host_nqn(
            &self,
            _: &NodeId,
        ) -> std::result::Result<Option<String>, ClusterError> {
            Err(ClusterError::Unavailable("down".into()))
        }
        async fn set_node_host_nqn(
            &self,
            _: &NodeId,
            _: &str,
        ) -> std::result::Result<(), ClusterError> {
            Err(ClusterError::Unavailable("down".into()))
        }
        async fn volume_attachments(
            &self,
        ) -> std::result::Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
            Err(ClusterError::Unavailable("down".into()))
        }
        async fn record_event(&self, _: &ClusterEvent) -> std::result::Result<(), ClusterError> {
            Err(ClusterError::Unavailable("down".into()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_controller_resyncs_what_another_replica_wrote() {
        use crate::ports::store::AttachmentRecord;
        use crate::types::{AccessMode, VolumeId};
        let store = Arc::new(crate::backend::mem_store::MemStore::new());
        let deps = ControllerDeps::new(
            crate::routeros::in_memory_rds(1 << 40),
            store.clone(),
            Arc::new(LocalCluster::new([NodeId::new("node-a").unwrap()])),
            Arc::new(crate::ports::time::SystemClock),
            AttachmentConfig {
                resync_interval: std::time::Duration::from_secs(30),
                ..Default::default()
            },
        );
        let manager = Arc::clone(&deps.attachments);
        let driver = Driver::new(
            DriverConfig {
                driver_name: "rds.csi.srvlab.io".into(),
                version: "t".into(),
                node_id: NodeId::new("controller").unwrap(),
                mode: Mode::Controller,
                max_volumes_per_node: 0,
                controller: Default::default(),
            },
            Deps {
                clock: Arc::new(crate::ports::time::SystemClock),
                entropy: Arc::new(crate::ports::time::SeededEntropy::from_seed(1)),
                controller: Some(deps),
                node: None,
            },
        )
        .unwrap();
        driver.start().await.unwrap();
        // Another replica records an attachment after this one rebuilt.
        let volume = VolumeId::new("pvc-1").unwrap();
        let record = AttachmentRecord {
            volume_id: volume.clone(),
            node_id: NodeId::new("node-a").unwrap(),
            attached_at: std::time::UNIX_EPOCH,
            access_mode: AccessMode::SingleNode,
            readonly: false,
        };
        store.write_volume(&volume, &[record]).await.unwrap();
        assert!(manager.get(&volume).is_empty());
        tokio::time::sleep(std::time::Duration::from_secs(31)).await;
        assert_eq!(manager.get(&volume).len(), 1, "picked up by the resync");
    }

    fn node_driver(cluster: Arc<dyn Cluster>, host_nqn: &str) -> Driver {
        let kernel = FakeKernel::new("nqn.2000-02.com.mikrotik:", host_nqn);
        let cfg = DriverConfig {
            driver_name: "rds.csi.srvlab.io".into(),
            version: "t".into(),
            node_id: NodeId::new("n1").unwrap(),
            mode: Mode::Node,
            max_volumes_per_node: 0,
            controller: Default::default(),
        };
        let deps = Deps {
            clock: Arc::new(crate::ports::time::SystemClock),
            entropy: Arc::new(crate::ports::time::SeededEntropy::from_seed(1)),
            controller: None,
            node: Some(NodeDeps {
                initiator: Arc::new(kernel.clone()),
                mounter: Arc::new(kernel),
                cluster: Some(cluster),
                options: Default::default(),
            }),
        };
        Driver::new(cfg, deps).unwrap()
    }

    #[tokio::test]
    async fn the_node_publishes_its_host_nqn_at_start_up() {
        let cluster = Arc::new(LocalCluster::new([]));
        let nqn = "nqn.2014-08.org.nvmexpress:uuid:n1";
        let driver = node_driver(Arc::clone(&cluster) as Arc<dyn Cluster>, nqn);
        driver.start().await.unwrap();
        assert!(driver.readiness().is_ready());
        let n1 = NodeId::new("n1").unwrap();
        assert_eq!(cluster.node_host_nqn(&n1).await.unwrap().as_deref(), Some(nqn));
    }

    #[tokio::test]
    async fn start_up_tolerates_a_cluster_that_cannot_take_the_host_nqn() {
        // The fence is optional: the node serves its volumes anyway (and warns).
        let driver = node_driver(Arc::new(Down), "nqn.2014-08.org.nvmexpress:uuid:n1");
        driver.start().await.unwrap();
        assert!(driver.readiness().is_ready());
        // An invalid NQN is refused by the port and tolerated the same way.
        let cluster = Arc::new(LocalCluster::new([]));
        let driver = node_driver(Arc::clone(&cluster) as Arc<dyn Cluster>, "not an nqn");
        driver.start().await.unwrap();
        assert!(driver.readiness().is_ready());
        let n1 = NodeId::new("n1").unwrap();
        assert_eq!(cluster.node_host_nqn(&n1).await.unwrap(), None);
    }
}
