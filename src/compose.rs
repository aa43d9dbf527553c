//! The composition root: the one place that turns [`Settings`] into ports, adapters, cores
//! and services, and starts the background tasks.
//!
//! The binary ([`run`]), the integration tests and the simulation all build a plugin
//! instance with [`build`]. What differs between them enters through [`Seams`] — the clock,
//! the randomness, and how the outside world is reached (the RDS, Kubernetes, the node's
//! kernel) — and through [`PortLayers`], which wrap every port as it is built (the
//! simulation's crash points, planted bugs and call tracking; nothing in production). The
//! driver below has no switch for any of them.
//!
//! Adding a part (a reconciler, a watcher): build it in [`build`] from the ports already
//! made there, keep it in [`Plugin`], start it in [`Plugin::start`]. Nothing else wires.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::attachment::AttachmentManager;
use crate::backend::{file_store::FileStore, local_cluster::LocalCluster};
use crate::controller::Controller;
use crate::controller::orphans::OrphanVolumes;
use crate::controller::reconcile::{Reconcilers, StaleAttachments};
use crate::controller::traffic::TrafficPoll;
use crate::csi::{
    controller::ControllerService,
    identity::{IdentityService, Readiness},
    inflight::InFlight,
    node::NodeService,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::node::{COMMAND_TIMEOUT, NodeOps, OrphanSweeper, SYSCALL_TIMEOUT};
use crate::ports::time::{SeededEntropy, SystemClock};
use crate::ports::lease::Sole;
use crate::ports::{
    AttachmentStore, Clock, Cluster, ClusterWatch, Entropy, Initiator, Leadership, Mounter, Rds,
};
use crate::proto::csi::{controller_server, identity_server, node_server};
use crate::routeros::emulator::{Emulator, PoolConfig};
use crate::routeros::transport::{Transport, TcpConnector, inproc::InProcess, ssh::SshTransport};
use crate::routeros::RouterOsRds;
use crate::server::{ServeError, Services};
use crate::settings::{
    EMBEDDED_POOL_BYTES, EMBEDDED_POOL_MOUNT, EMBEDDED_VOLUME_PATH, KubeAccess, RdsAccess,
    RdsSettings, Settings,
};
use crate::types::{Endpoint, InitiatorKind, NodeId};

/// The two node ports, which a real host implements with one kernel.
#[derive(Clone)]
pub struct Kernel {
    /// NVMe/TCP host side (or loop devices on the embedded default).
    pub initiator: Arc<dyn Initiator>,
    /// Filesystems and mounts.
    pub mounter: Arc<dyn Mounter>,
}

/// How a plugin instance reaches the world outside the process. [`Seams::os`] is
/// production: the system clock, OS-seeded randomness, and everything else as the
/// [`Settings`] describe it. A seam that is set replaces what the settings would build.
pub struct Seams {
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Randomness (backoff jitter).
    pub entropy: Arc<dyn Entropy>,
    /// The whole `Rds` port (tests over a scripted or faulty RDS).
    pub rds: Option<Arc<dyn Rds>>,
    /// The RouterOS transport under the real adapter (the simulation's turmoil TCP).
    pub rds_transport: Option<Arc<dyn Transport>>,
    /// A Kubernetes client (the simulation's, over turmoil).
    pub kube: Option<::kube::Client>,
    /// The node's kernel (the simulation's in-memory kernel).
    pub kernel: Option<Kernel>,
    /// Wrappers around every port.
    pub layers: Arc<dyn PortLayers>,
}

impl Seams {
    /// Production: system clock, OS-seeded randomness, the rest from the settings.
    pub fn os() -> Self {
        Self::with(Arc::new(SystemClock), Arc::new(SeededEntropy::from_os()))
    }

    /// `clock` and `entropy`, the rest from the settings.
    pub fn with(clock: Arc<dyn Clock>, entropy: Arc<dyn Entropy>) -> Self {
        Self {
            clock,
            entropy,
            rds: None,
            rds_transport: None,
            kube: None,
            kernel: None,
            layers: Arc::new(NoLayers),
        }
    }
}

/// Wraps each port as the root builds it; every method defaults to no wrapper. The
/// simulation plugs its crash points, planted bugs and call tracking in here, so they sit
/// exactly at the port boundaries.
pub trait PortLayers: Send + Sync {
    /// Wraps the RouterOS transport (under the adapter).
    fn transport(&self, port: Arc<dyn Transport>) -> Arc<dyn Transport> {
        port
    }
    /// Wraps the `Rds` port.
    fn rds(&self, port: Arc<dyn Rds>) -> Arc<dyn Rds> {
        port
    }
    /// Wraps the `AttachmentStore` port.
    fn store(&self, port: Arc<dyn AttachmentStore>) -> Arc<dyn AttachmentStore> {
        port
    }
    /// Wraps the `Cluster` port.
    fn cluster(&self, port: Arc<dyn Cluster>) -> Arc<dyn Cluster> {
        port
    }
    /// Wraps the `ClusterWatch` port.
    fn watch(&self, port: Arc<dyn ClusterWatch>) -> Arc<dyn ClusterWatch> {
        port
    }
}

/// No wrappers (production).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLayers;

impl PortLayers for NoLayers {}

/// The controller half of a plugin instance.
struct ControllerPart {
    core: Controller,
    rds: Arc<dyn Rds>,
    /// The disk-traffic poll (started only with an interval).
    traffic: Arc<TrafficPoll>,
    /// The keys of the controller calls in flight, shared by the service and the orphan
    /// volume reconciler.
    inflight: InFlight,
    /// The orphan volume and attachment reconcilers, run on the leader.
    reconcilers: Arc<Reconcilers>,
    /// The watches of the cluster (with Kubernetes), followed on every replica.
    watch: Option<Arc<dyn ClusterWatch>>,
}

/// The node half of a plugin instance.
struct NodePart {
    ops: NodeOps,
    initiator: Arc<dyn Initiator>,
    /// Where the node publishes its host NQN for the controller's data-path fence.
    cluster: Arc<dyn Cluster>,
    /// The keys of the node operations in flight, shared by the service and the sweep.
    inflight: InFlight,
    /// The sweep of orphan connections (started by [`Plugin::start`]).
    sweeper: Arc<OrphanSweeper>,
}

/// One plugin instance: what [`build`] made, ready to [`start`](Plugin::start) and serve.
pub struct Plugin {
    driver_name: String,
    version: String,
    node_id: NodeId,
    mode: crate::types::Mode,
    max_volumes_per_node: u64,
    controller: Option<ControllerPart>,
    node: Option<NodePart>,
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

/// Builds the plugin instance `settings` describe, reaching the outside through `seams`.
/// Does no network I/O: the first contact with the RDS and Kubernetes is
/// [`Plugin::start`].
pub fn build(settings: &Settings, seams: Seams) -> Result<Plugin, ServeError> {
    let Seams {
        clock,
        entropy,
        rds,
        rds_transport,
        kube,
        kernel,
        layers,
    } = seams;
    let mode = settings.mode;
    // The instance's one registry: every part records into it through its handle.
    let metrics = Arc::new(Metrics::default());
    let kube = match kube {
        Some(client) => Some(client),
        None => kube_client(settings)?,
    };
    // Kubernetes: the attachment records are PV annotations and the cluster is the API.
    // Without it, one local cluster view: in `--mode all` the node registers its host NQN
    // where the controller's data-path fence reads it.
    // The reconcilers' leader: a Lease among the controller replicas; alone without
    // Kubernetes.
    let leader: Arc<dyn Leadership> = match &kube {
        Some(client) => Arc::new(crate::kube::KubeLease::new(
            client.clone(),
            &settings.kube.lease_namespace,
            &format!("{}-reconcilers", settings.driver_name),
            settings.node_id.as_str(),
            settings.reconcile.lease_duration,
            Arc::clone(&clock),
            Arc::clone(&entropy),
            settings.kube.retry,
        )),
        None => Arc::new(Sole),
    };
    // The controller's watches of the cluster (PVs, Nodes, VolumeAttachments,
    // VolumeSnapshotContents): what drives its reconciliation with Kubernetes.
    let watch: Option<Arc<dyn ClusterWatch>> = match &kube {
        Some(client) if mode.controller() => Some(layers.watch(Arc::new(
            crate::kube::KubeWatch::new(client.clone(), &settings.driver_name, Arc::clone(&entropy)),
        ))),
        _ => None,
    };
    let (kube_store, cluster): (Option<Arc<dyn AttachmentStore>>, Arc<dyn Cluster>) = match kube
    {
        Some(client) => {
            let (store, cluster) = crate::kube::adapters(
                client,
                &settings.driver_name,
                Arc::clone(&clock),
                Arc::clone(&entropy),
                settings.kube.retry,
            );
            (Some(store), cluster)
        }
        None => (
            None,
            Arc::new(LocalCluster::new([settings.node_id.clone()])),
        ),
    };
    let cluster = layers.cluster(cluster);

    let controller = if mode.controller() {
        let rds = match rds {
            Some(rds) => rds,
            None => {
                let transport = match rds_transport {
                    Some(t) => t,
                    None => rds_transport_from(settings, Arc::clone(&clock), &metrics)?,
                };
                let adapter = RouterOsRds::new(
                    layers.transport(transport),
                    &settings.rds.layout,
                    settings.rds.retry,
                    Arc::clone(&entropy),
                )
                .map_err(|e| ServeError::Config(format!("RDS layout: {e}")))?
                .with_metrics(metrics.routeros(), metrics.rds());
                Arc::new(adapter)
            }
        };
        let rds = layers.rds(rds);
        let store = match kube_store {
            Some(store) => {
                tracing::info!("attachments recorded in PersistentVolume annotations (Kubernetes)");
                store
            }
            None => {
                let dir = state_subdir(&settings.state_dir, "attachments")?;
                Arc::new(FileStore::open(&dir).map_err(Error::from)?)
            }
        };
        let store = layers.store(store);
        let attachments = Arc::new(
            AttachmentManager::new(
                Arc::clone(&rds),
                store,
                Arc::clone(&cluster),
                Arc::clone(&clock),
                settings.attachment.clone(),
            )
            .with_metrics(metrics.attachment())
            .with_migration_metrics(metrics.migrations()),
        );
        let traffic = Arc::new(TrafficPoll::new(
            Arc::clone(&rds),
            Arc::clone(&attachments),
            metrics.rds(),
            metrics.reconcilers(),
            settings.disk_traffic,
        ));
        let inflight = InFlight::default();
        let mut orphans = OrphanVolumes::new(
            Arc::clone(&rds),
            Arc::clone(&attachments),
            Arc::clone(&cluster),
            Arc::new(inflight.clone()),
            Arc::clone(&clock),
            settings.controller.nqn_prefix.clone(),
            settings.orphan_volumes,
            metrics.reconcilers(),
        );
        let mut stale = StaleAttachments::new(
            Arc::clone(&attachments),
            Arc::clone(&cluster),
            metrics.reconcilers(),
        );
        if let Some(w) = &watch {
            orphans = orphans.with_watch(Arc::clone(w));
            stale = stale.with_watch(Arc::clone(w));
        }
        let (orphans, stale) = (Arc::new(orphans), Arc::new(stale));
        let reconcilers = Arc::new(Reconcilers::new(leader, orphans, stale, settings.reconcile));
        Some(ControllerPart {
            core: Controller::new(settings.controller.clone(), Arc::clone(&rds), attachments),
            rds,
            traffic,
            inflight,
            reconcilers,
            watch,
        })
    } else {
        None
    };

    let node = if mode.node() {
        let kernel = match kernel {
            Some(k) => k,
            None => kernel_from(settings)?,
        };
        let ops = NodeOps::new(
            Arc::clone(&kernel.initiator),
            kernel.mounter,
            settings.node.options.clone(),
        )
        .with_metrics(Arc::clone(&metrics));
        let inflight = InFlight::default();
        let sweeper = Arc::new(OrphanSweeper::new(
            settings.node_id.clone(),
            ops.clone(),
            Arc::clone(&cluster),
            Arc::new(inflight.clone()),
            settings.node.orphans,
            Arc::clone(&metrics),
        ));
        Some(NodePart {
            ops,
            initiator: kernel.initiator,
            cluster,
            inflight,
            sweeper,
        })
    } else {
        None
    };

    Ok(Plugin {
        driver_name: settings.driver_name.clone(),
        version: settings.version.clone(),
        node_id: settings.node_id.clone(),
        mode,
        max_volumes_per_node: settings.attachment.max_volumes_per_node,
        controller,
        node,
        readiness: Readiness::default(),
        metrics,
    })
}

impl Plugin {
    /// Start-up work that must finish before the socket accepts requests — the RDS
    /// answers, the attachment state is rebuilt, the node has read what the kernel has
    /// attached and mounted and published its host NQN — then the background tasks
    /// (attachment resync, the disk-traffic poll, the controller's reconcilers on the leading
    /// replica, the node's orphan sweep, whose first round runs at once). Marks the plugin ready. Idempotent: the simulation retries it
    /// while the backend is unreachable.
    pub async fn start(&self) -> Result<()> {
        if let Some(c) = &self.controller {
            c.rds.ping().await?;
            let attachments = c.core.attachments();
            attachments.rebuild().await?;
            if !attachments.config().data_path_fence {
                tracing::warn!(
                    "the data-path fence is OFF (--data-path-fence=false): every volume's \
                     NVMe/TCP export admits any host, so a node that missed its detach (for \
                     example partitioned while Kubernetes force-detached its volume) can \
                     reconnect and write to a volume that has moved to another node"
                );
            }
            // Exports made before the fence existed (or before it was switched off) are
            // brought in line with it before anything is served.
            let moved = attachments.settle_fences().await?;
            if moved > 0 {
                tracing::info!(moved, "export allow lists settled to the data-path fence");
            }
        }
        if let Some(n) = &self.node {
            // Restart recovery: the node's state is whatever the kernel has attached and
            // mounted; read it now (and fail start-up if it cannot be read).
            n.ops.recover().await?;
            crate::node::publish_host_nqn(&self.node_id, &*n.initiator, &*n.cluster).await;
        }
        if let Some(c) = &self.controller {
            // With Kubernetes the watches follow every change another writer makes (and
            // relist only as their recovery); the periodic resync runs only when set.
            if let Some(w) = &c.watch {
                crate::controller::watched::spawn(
                    Arc::clone(w),
                    Arc::clone(c.core.attachments()),
                    Arc::clone(&c.reconcilers),
                );
            }
            c.core.attachments().spawn_resync();
            c.traffic.spawn();
            c.reconcilers.spawn();
        }
        if let Some(n) = &self.node {
            Arc::clone(&n.sweeper).spawn();
        }
        self.readiness.set_ready();
        Ok(())
    }

    /// The gRPC services to serve.
    pub fn services(&self) -> Services {
        self.services_over(self.controller.as_ref().map(|c| c.inflight.clone()))
    }

    /// The gRPC services with a controller in-flight table of their own, as a second
    /// separately built instance would have: calls served by them are not serialised with
    /// the plugin's (the simulation's planted bug `ReissuedPublishSkipsLock`; never
    /// served otherwise).
    pub fn services_with_own_inflight(&self) -> Services {
        self.services_over(self.controller.as_ref().map(|_| InFlight::default()))
    }

    fn services_over(&self, inflight: Option<InFlight>) -> Services {
        Services {
            identity: identity_server::IdentityServer::new(IdentityService::new(
                self.driver_name.clone(),
                self.version.clone(),
                self.mode,
                self.readiness.clone(),
                self.controller.as_ref().map(|c| Arc::clone(&c.rds)),
            )),
            controller: self.controller.as_ref().map(|c| {
                controller_server::ControllerServer::new(
                    ControllerService::new(c.core.clone())
                        .with_inflight(inflight.clone().unwrap_or_default()),
                )
            }),
            node: self.node.as_ref().map(|n| {
                node_server::NodeServer::new(
                    NodeService::new(
                        self.node_id.clone(),
                        i64::try_from(self.max_volumes_per_node).unwrap_or(i64::MAX),
                        n.ops.clone(),
                    )
                    .with_inflight(n.inflight.clone()),
                )
            }),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// The attachment manager, when the controller is served.
    pub fn attachments(&self) -> Option<Arc<AttachmentManager>> {
        self.controller
            .as_ref()
            .map(|c| Arc::clone(c.core.attachments()))
    }

    /// The `Rds` port, when the controller is served.
    pub fn rds(&self) -> Option<Arc<dyn Rds>> {
        self.controller.as_ref().map(|c| Arc::clone(&c.rds))
    }

    /// Readiness (Probe).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The disk-traffic poll, when the controller is served.
    pub fn traffic(&self) -> Option<Arc<TrafficPoll>> {
        self.controller.as_ref().map(|c| Arc::clone(&c.traffic))
    }

    /// The controller's reconcilers, when the controller is served.
    pub fn reconcilers(&self) -> Option<Arc<Reconcilers>> {
        self.controller.as_ref().map(|c| Arc::clone(&c.reconcilers))
    }

    /// The metrics registry of this instance (every series it exports).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }
}

/// Runs the plugin the settings describe until SIGTERM/SIGINT: builds it, finishes
/// start-up before the socket exists (nothing is answered from half-built state), serves
/// metrics when asked, then serves CSI and drains.
pub async fn run(settings: Settings) -> Result<(), ServeError> {
    let stop = crate::server::termination_signal()?;
    let plugin = build(&settings, Seams::os())?;
    plugin.start().await?;
    let drain = settings.serve.drain;
    if let Some(addr) = settings.serve.metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Bind(format!("--metrics-address {addr}: {e}")))?;
        tracing::info!(%addr, "serving metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, plugin.metrics()));
    }
    let endpoint = &settings.serve.endpoint;
    let services = plugin.services();
    match endpoint {
        Endpoint::Unix(path) => {
            let (listener, _guard) = crate::server::bind_unix(path).await?;
            tracing::info!(endpoint = %endpoint, driver = %settings.driver_name, mode = ?settings.mode, node_id = %settings.node_id, "serving");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            crate::server::serve(services, incoming, stop, drain).await
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Bind(format!("{addr}: {e}")))?;
            tracing::info!(endpoint = %endpoint, driver = %settings.driver_name, mode = ?settings.mode, "serving");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            crate::server::serve(services, incoming, stop, drain).await
        }
    }
}

/// The Kubernetes client the settings ask for, if any.
fn kube_client(settings: &Settings) -> Result<Option<::kube::Client>, ServeError> {
    match &settings.kube.access {
        KubeAccess::Off => Ok(None),
        KubeAccess::Kubeconfig(path) => crate::kube::client(Some(path))
            .map(Some)
            .map_err(ServeError::Config),
        KubeAccess::InCluster => match crate::kube::client(None) {
            Ok(client) => Ok(Some(client)),
            // A node plugin in a pod without a ServiceAccount token still serves its
            // volumes; it only cannot publish its host NQN (optional: the data-path fence)
            // nor sweep orphan connections.
            Err(e) if !settings.mode.controller() => {
                tracing::warn!(
                    error = %e,
                    "no Kubernetes client: this node's NVMe host NQN is not published, so with \
                     --data-path-fence the controller cannot publish volumes here, and the \
                     orphan sweep has no VolumeAttachments to judge by (it disconnects nothing); \
                     mount the node ServiceAccount token (the chart does) or annotate the Node \
                     by hand"
                );
                Ok(None)
            }
            Err(e) => Err(ServeError::Config(e)),
        },
    }
}

/// The RouterOS transport the settings describe: in process to the embedded emulator, or
/// SSH to a real RDS.
fn rds_transport_from(
    settings: &Settings,
    clock: Arc<dyn Clock>,
    metrics: &Metrics,
) -> Result<Arc<dyn Transport>, ServeError> {
    match &settings.rds.access {
        RdsAccess::Embedded => {
            tracing::info!(state_dir = %settings.state_dir.display(), "embedded backend: RDS emulated on local files");
            Ok(Arc::new(InProcess::new(embedded_emulator(
                &settings.state_dir,
                clock,
            )?)))
        }
        RdsAccess::Ssh(ssh) => {
            if matches!(
                ssh.config.host_key,
                crate::routeros::transport::ssh::HostKeyPolicy::InsecureAcceptAny
            ) {
                tracing::warn!(
                    rds = %ssh.address,
                    "RDS host key verification is DISABLED (--rds-insecure-skip-host-key-verification): \
                     anyone who can intercept the connection can impersonate the RDS"
                );
            }
            let layout = &settings.rds.layout;
            tracing::info!(rds = %ssh.address, port = ssh.port, user = %ssh.config.user, volume_path = %layout.volume_base_path, pool = %layout.pool_mount_point, "RDS backend: RouterOS over SSH");
            Ok(Arc::new(
                SshTransport::new(
                    TcpConnector {
                        addr: format!("{}:{}", ssh.address, ssh.port),
                    },
                    ssh.config.clone(),
                )
                .with_metrics(metrics.routeros()),
            ))
        }
    }
}

/// The node's kernel the settings describe: loop devices over the embedded RDS's files, or
/// the NVMe/TCP initiator through nvme-cli.
fn kernel_from(settings: &Settings) -> Result<Kernel, ServeError> {
    let opts = &settings.node.options;
    tracing::info!(initiator = ?settings.node.initiator, allowed_root = ?opts.allowed_root, nqn_prefix = %opts.nqn_prefix, "node service");
    Ok(match settings.node.initiator {
        InitiatorKind::Loop => {
            let files = embedded_volume_dir(&settings.state_dir);
            std::fs::create_dir_all(&files)
                .map_err(|e| ServeError::Config(format!("--state-dir {}: {e}", files.display())))?;
            loop_kernel(&settings.state_dir, &settings.node_id, &opts.nqn_prefix)
        }
        InitiatorKind::Nvme => nvme_kernel(settings.node.host_nqn.clone(), &opts.nqn_prefix),
    })
}

/// Creates and returns `<state_dir>/<name>`.
fn state_subdir(state_dir: &Path, name: &str) -> Result<PathBuf, ServeError> {
    let dir = state_dir.join(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ServeError::Config(format!("--state-dir {}: {e}", dir.display())))?;
    Ok(dir)
}

/// The embedded RDS's emulator: a pool mounted at [`EMBEDDED_POOL_MOUNT`] with its tables
/// and sparse disk files under `<state_dir>/rds`.
pub fn embedded_emulator(
    state_dir: &Path,
    clock: Arc<dyn Clock>,
) -> Result<Arc<Emulator>, ServeError> {
    let dir = state_subdir(state_dir, "rds")?;
    let emulator = Emulator::open_dir(
        &dir,
        PoolConfig {
            slot: "pool".into(),
            mount_point: EMBEDDED_POOL_MOUNT.into(),
            size_bytes: EMBEDDED_POOL_BYTES,
        },
        clock,
    )
    .map_err(|e| ServeError::Config(format!("--state-dir {}: {e}", dir.display())))?;
    Ok(Arc::new(emulator))
}

/// The embedded RDS as an `Rds` port: the RouterOS emulator on sparse files under
/// `<state_dir>/rds` (disks under [`EMBEDDED_VOLUME_PATH`]), reached in-process through
/// the same renderer, CLI reader and parser as a real RDS.
pub fn embedded_rds(
    state_dir: &Path,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
) -> Result<Arc<dyn Rds>, ServeError> {
    let embedded = RdsSettings::embedded();
    let rds = RouterOsRds::new(
        InProcess::new(embedded_emulator(state_dir, clock)?),
        &embedded.layout,
        embedded.retry,
        entropy,
    )
    .map_err(|e| ServeError::Config(format!("RDS layout: {e}")))?;
    Ok(Arc::new(rds))
}

/// Where the embedded RDS keeps its tables (the emulator's directory): `<state_dir>/rds`.
pub fn embedded_rds_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("rds")
}

/// Where the embedded RDS keeps its disk files: `<state_dir>/rds/<EMBEDDED_VOLUME_PATH>`.
pub fn embedded_volume_dir(state_dir: &Path) -> PathBuf {
    embedded_rds_dir(state_dir).join(EMBEDDED_VOLUME_PATH)
}

/// The embedded kernel: loop devices over the embedded RDS's disk files
/// `<state_dir>/rds/pool/volumes/<slot>.img`, and the real mounter.
pub fn loop_kernel(state_dir: &Path, node_id: &NodeId, nqn_prefix: &str) -> Kernel {
    let runner = Arc::new(crate::node::exec::TokioRunner::new(COMMAND_TIMEOUT));
    let initiator = crate::node::loopdev::LoopInitiator::new(
        runner.clone(),
        &embedded_volume_dir(state_dir),
        &embedded_rds_dir(state_dir),
        nqn_prefix.to_string(),
        format!("nqn.2014-08.io.srvlab.rds-csi:embedded:{node_id}"),
    );
    Kernel {
        initiator: Arc::new(initiator),
        mounter: Arc::new(crate::node::mount::RealMounter::new(runner, SYSCALL_TIMEOUT)),
    }
}

/// The production kernel: nvme-cli with `host_nqn` (else `/etc/nvme/hostnqn`), and the
/// real mounter.
pub fn nvme_kernel(host_nqn: Option<String>, nqn_prefix: &str) -> Kernel {
    let runner = Arc::new(crate::node::exec::TokioRunner::new(COMMAND_TIMEOUT));
    let initiator = crate::node::nvme::NvmeCli::new(
        crate::node::nvme::NvmeCliConfig::new(nqn_prefix.to_string(), host_nqn),
        runner.clone(),
    );
    Kernel {
        initiator: Arc::new(initiator),
        mounter: Arc::new(crate::node::mount::RealMounter::new(runner, SYSCALL_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem_store::MemStore;
    use crate::node::fake::FakeKernel;
    use crate::ports::cluster::{ClusterError, ClusterEvent, VolumeAttachmentInfo};
    use crate::settings::{KubeSettings, Settings};
    use crate::types::Mode;

    /// Replaces the store and the cluster the root builds (what a test needs to reach).
    #[derive(Default)]
    struct Swap {
        store: Option<Arc<dyn AttachmentStore>>,
        cluster: Option<Arc<dyn Cluster>>,
    }

    impl PortLayers for Swap {
        fn store(&self, port: Arc<dyn AttachmentStore>) -> Arc<dyn AttachmentStore> {
            self.store.clone().unwrap_or(port)
        }
        fn cluster(&self, port: Arc<dyn Cluster>) -> Arc<dyn Cluster> {
            self.cluster.clone().unwrap_or(port)
        }
    }

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

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
        async fn node_report(
            &self,
            _: &NodeId,
        ) -> std::result::Result<Option<crate::ports::cluster::NodeReport>, ClusterError> {
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

    #[tokio::test]
    async fn the_embedded_default_builds_and_starts_both_halves() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::embedded(node("n1"), Mode::All, dir.path().to_path_buf());
        let plugin = build(&settings, Seams::os()).unwrap();
        plugin.start().await.unwrap();
        assert!(plugin.readiness().is_ready());
        let services = plugin.services();
        assert!(services.controller.is_some() && services.node.is_some());
        assert!(dir.path().join("rds").is_dir(), "embedded RDS under the state dir");
        assert!(dir.path().join("attachments").is_dir(), "local attachment store");
    }

    #[tokio::test]
    async fn a_kubeconfig_selects_the_kubernetes_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nusers:\n- name: u\n  user:\n    token: t\n",
        )
        .unwrap();
        let state = dir.path().join("state");
        let mut settings = Settings::embedded(node("node-a"), Mode::Controller, state.clone());
        settings.kube = KubeSettings {
            access: KubeAccess::Kubeconfig(kc),
            ..settings.kube
        };
        let plugin = build(&settings, Seams::os()).unwrap();
        assert!(plugin.attachments().is_some());
        assert!(
            !state.join("attachments").exists(),
            "records go to PV annotations, not the local store"
        );
        settings.kube.access = KubeAccess::Kubeconfig("/nonexistent/kubeconfig".into());
        let err = build(&settings, Seams::os()).err().unwrap();
        assert!(
            err.to_string().contains("--kubeconfig /nonexistent/kubeconfig"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_controller_resyncs_what_another_replica_wrote() {
        use crate::ports::store::AttachmentRecord;
        use crate::types::{AccessMode, VolumeId};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MemStore::new());
        let mut settings = Settings::embedded(node("node-a"), Mode::Controller, dir.path().into());
        settings.attachment.resync_interval = std::time::Duration::from_secs(30);
        let mut seams = Seams::with(Arc::new(SystemClock), Arc::new(SeededEntropy::from_seed(1)));
        seams.rds = Some(crate::routeros::in_memory_rds(1 << 40));
        seams.layers = Arc::new(Swap {
            store: Some(store.clone()),
            cluster: None,
        });
        let plugin = build(&settings, seams).unwrap();
        let manager = plugin.attachments().unwrap();
        plugin.start().await.unwrap();
        // Another replica records an attachment after this one rebuilt.
        let volume = VolumeId::new("pvc-1").unwrap();
        let record = AttachmentRecord {
            volume_id: volume.clone(),
            node_id: node("node-a"),
            attached_at: std::time::UNIX_EPOCH,
            access_mode: AccessMode::SingleNode,
            readonly: false,
            migration: None,
            generation: 0,
        };
        store.write_volume(&volume, &[record]).await.unwrap();
        assert!(manager.get(&volume).is_empty());
        tokio::time::sleep(std::time::Duration::from_secs(31)).await;
        assert_eq!(manager.get(&volume).len(), 1, "picked up by the resync");
    }

    fn node_plugin(cluster: Arc<dyn Cluster>, host_nqn: &str) -> Plugin {
        let kernel = FakeKernel::new(crate::types::defaults::DEFAULT_NQN_PREFIX, host_nqn);
        let settings = Settings::embedded(node("n1"), Mode::Node, "/nonexistent".into());
        let mut seams = Seams::with(Arc::new(SystemClock), Arc::new(SeededEntropy::from_seed(1)));
        seams.kernel = Some(Kernel {
            initiator: Arc::new(kernel.clone()),
            mounter: Arc::new(kernel),
        });
        seams.layers = Arc::new(Swap {
            store: None,
            cluster: Some(cluster),
        });
        build(&settings, seams).unwrap()
    }

    #[tokio::test]
    async fn the_node_publishes_its_host_nqn_at_start_up() {
        let cluster = Arc::new(LocalCluster::new([]));
        let nqn = "nqn.2014-08.org.nvmexpress:uuid:n1";
        let plugin = node_plugin(Arc::clone(&cluster) as Arc<dyn Cluster>, nqn);
        plugin.start().await.unwrap();
        assert!(plugin.readiness().is_ready());
        assert_eq!(
            cluster.node_host_nqn(&node("n1")).await.unwrap().as_deref(),
            Some(nqn)
        );
    }

    #[tokio::test]
    async fn start_up_tolerates_a_cluster_that_cannot_take_the_host_nqn() {
        // The fence is optional: the node serves its volumes anyway (and warns).
        let plugin = node_plugin(Arc::new(Down), "nqn.2014-08.org.nvmexpress:uuid:n1");
        plugin.start().await.unwrap();
        assert!(plugin.readiness().is_ready());
        // An invalid NQN is refused by the port and tolerated the same way.
        let cluster = Arc::new(LocalCluster::new([]));
        let plugin = node_plugin(Arc::clone(&cluster) as Arc<dyn Cluster>, "not an nqn");
        plugin.start().await.unwrap();
        assert!(plugin.readiness().is_ready());
        assert_eq!(cluster.node_host_nqn(&node("n1")).await.unwrap(), None);
    }

    /// The contract between the embedded RDS and the loop initiator: the file a CreateVolume
    /// makes is the file the node attaches, found from the NQN alone.
    #[tokio::test]
    async fn the_loop_initiator_finds_the_files_the_embedded_rds_creates() {
        use crate::ports::rds::{DiskSpec, NvmeExport};
        use crate::types::defaults::DEFAULT_NQN_PREFIX;
        let dir = tempfile::tempdir().unwrap();
        let rds = embedded_rds(
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
            allowed_host_nqn: None,
        })
        .await
        .unwrap();
        let runner = Arc::new(crate::node::exec::TokioRunner::new(COMMAND_TIMEOUT));
        let l = crate::node::loopdev::LoopInitiator::new(
            runner,
            &embedded_volume_dir(dir.path()),
            &embedded_rds_dir(dir.path()),
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

    // Multi-threaded: the file-backed emulator moves its blocking I/O off the runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_embedded_rds_persists_across_reopen() {
        use crate::ports::rds::{DiskSpec, NvmeExport};
        const GIB: u64 = 1 << 30;
        let spec = DiskSpec {
            slot: "pvc-a".into(),
            size_bytes: GIB + GIB / 2,
            export: Some(NvmeExport {
                port: 4420,
                nqn: "nqn.2000-02.com.mikrotik:pvc-a".into(),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let entropy: Arc<dyn Entropy> = Arc::new(SeededEntropy::from_seed(3));
        let rds = embedded_rds(dir.path(), Arc::clone(&clock), Arc::clone(&entropy)).unwrap();
        rds.create_disk(&spec).await.unwrap();
        let host_file = embedded_volume_dir(dir.path()).join("pvc-a.img");
        assert_eq!(std::fs::metadata(&host_file).unwrap().len(), GIB + GIB / 2);
        drop(rds);
        let rds = embedded_rds(dir.path(), clock, entropy).unwrap();
        assert_eq!(
            rds.get_disk("pvc-a").await.unwrap().unwrap().size_bytes,
            GIB + GIB / 2
        );
        rds.delete_disk("pvc-a").await.unwrap();
        assert!(!host_file.exists());
    }
}
