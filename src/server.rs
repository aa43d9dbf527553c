//! Process lifecycle: build the driver from the CLI, finish start-up, take the socket,
//! serve, and drain on SIGTERM/SIGINT.
//!
//! The gRPC server takes any incoming connection stream, so the simulation serves the same
//! services on turmoil TCP.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::config::{Cli, Endpoint};
use crate::driver::{Deps, Driver, DriverConfig, Services};
use crate::ports::time::{SeededEntropy, SystemClock};
use crate::types::NodeId;

/// Why the plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The socket is held by a live plugin.
    #[error("{0} is in use by another running plugin; stop it first or choose another --endpoint")]
    InUse(String),
    /// The endpoint could not be bound.
    #[error("cannot listen on {0}")]
    Bind(String),
    /// Start-up failed.
    #[error("start-up failed: {0}")]
    Startup(#[from] crate::Error),
    /// The server failed.
    #[error("gRPC server: {0}")]
    Transport(String),
}

/// Serves `services` on `incoming` until `shutdown` resolves, then lets in-flight RPCs finish
/// for at most `drain`.
pub async fn serve<I, IO, IE, F>(
    services: Services,
    incoming: I,
    shutdown: F,
    drain: Duration,
) -> Result<(), ServeError>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()> + Send + 'static,
{
    // Reflection in both protocol versions: grpcurl before 1.8.8 speaks only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let mut builder = tonic::transport::Server::builder()
        // A silently broken link must not hang a connection forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::metrics::MetricsLayer(services.metrics));
    let router = builder
        .add_service(services.identity)
        .add_optional_service(services.controller)
        .add_optional_service(services.node)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        let _ = stopped_tx.send(());
    });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.map_err(|e| ServeError::Transport(e.to_string())),
        _ = stopped_rx => {
            tracing::info!(drain_secs = drain.as_secs(), "stopping: no new connections, draining in-flight RPCs");
            match tokio::time::timeout(drain, &mut server).await {
                Ok(result) => result.map_err(|e| ServeError::Transport(e.to_string())),
                Err(_) => {
                    tracing::warn!("drain bound reached; exiting with RPCs still in flight");
                    Ok(())
                }
            }
        }
    }
}

/// Ownership of a bound unix socket path: holds `<socket>.lock` so that a second plugin
/// cannot take over a socket a live one serves, and removes the socket file when dropped.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    _lock: std::fs::File,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path`: a stale socket file (no process listening) is replaced; a socket held by a
/// live plugin is not; a non-socket file is never removed.
pub async fn bind_unix(path: &Path) -> Result<(tokio::net::UnixListener, SocketGuard), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ServeError::Bind(format!("{}: {e}", dir.display())))?;
    }
    let lock_path = PathBuf::from(format!("{shown}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ServeError::Bind(format!("{}: {e}", lock_path.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(ServeError::InUse(shown)),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(ServeError::Bind(format!("{}: {e}", lock_path.display())));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::Bind(format!(
                "{shown} exists and is not a socket; refusing to replace it"
            )));
        }
        Ok(_) => match tokio::net::UnixStream::connect(path).await {
            Ok(_) => return Err(ServeError::InUse(shown)),
            Err(_) => {
                tracing::info!(socket = %shown, "replacing stale socket");
                std::fs::remove_file(path)
                    .map_err(|e| ServeError::Bind(format!("{shown}: {e}")))?;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::Bind(format!("{shown}: {e}"))),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| ServeError::Bind(format!("{shown}: {e}")))?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            _lock: lock,
        },
    ))
}

/// Installs the SIGTERM/SIGINT handlers now (so a signal that arrives before serving starts
/// is not lost to the default action) and returns a future resolving on the first of them.
pub fn termination_signal() -> Result<impl Future<Output = ()> + Send + 'static, ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| ServeError::Config(format!("cannot handle {name}: {e}")))
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// The state directory: the flag, or a fixed directory under the system temp dir.
pub fn state_dir(cli: &Cli) -> PathBuf {
    cli.state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("rds-csi").join("state"))
}

/// Builds the driver the CLI describes.
pub fn build_driver(cli: &Cli) -> Result<Driver, ServeError> {
    crate::csi::identity::validate_driver_name(&cli.driver_name).map_err(ServeError::Config)?;
    let node_id = NodeId::new(cli.node_id_or_hostname())
        .map_err(|e| ServeError::Config(format!("--node-id: {e}")))?;
    let clock: Arc<dyn crate::ports::Clock> = Arc::new(SystemClock);
    let entropy: Arc<dyn crate::ports::Entropy> = Arc::new(SeededEntropy::from_os());
    let rds = ssh_rds(cli, Arc::clone(&entropy))?;
    let dir = state_dir(cli);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ServeError::Config(format!("--state-dir {}: {e}", dir.display())))?;
    if rds.is_none() && cli.mode.controller() {
        tracing::info!(state_dir = %dir.display(), "embedded backend: RDS emulated on local files");
    }
    let mut deps = Deps::embedded_with_rds(
        &dir,
        &node_id,
        cli.mode,
        Arc::clone(&clock),
        Arc::clone(&entropy),
        rds,
    )?;
    if let Some(node) = deps.node.as_mut() {
        // Keep the embedded cluster the node publishes its host NQN to.
        let cluster = node.cluster.take();
        *node = crate::node::node_deps_from_cli(cli, &dir, &node_id);
        node.cluster = cluster;
    }
    // Kubernetes: with --kubeconfig, or in a pod (the API server's address is in the env).
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kube = cli.kubeconfig.is_some() || in_cluster;
    let client = match kube.then(|| crate::kube::client(cli.kubeconfig.as_deref())) {
        // A node plugin in a pod without a ServiceAccount token still serves its volumes;
        // it only cannot publish its host NQN (optional: the data-path fence).
        Some(Err(e)) if !cli.mode.controller() && cli.kubeconfig.is_none() => {
            tracing::warn!(
                error = %e,
                "no Kubernetes client: this node's NVMe host NQN is not published, so with \
                 --data-path-fence the controller cannot publish volumes here; mount the node \
                 ServiceAccount token (the chart does) or annotate the Node by hand"
            );
            None
        }
        other => other.transpose().map_err(ServeError::Config)?,
    };
    let kube_ports = if let Some(client) = client {
        let (store, cluster) = crate::kube::adapters(
            client,
            &cli.driver_name,
            clock,
            entropy,
            crate::retry::Backoff::API,
        );
        let cluster = cluster as Arc<dyn crate::ports::Cluster>;
        if let Some(node) = deps.node.as_mut() {
            // The node publishes its host NQN as a Node annotation.
            node.cluster = Some(Arc::clone(&cluster));
        }
        cli.mode.controller().then(|| {
            tracing::info!("attachments recorded in PersistentVolume annotations (Kubernetes)");
            (store as Arc<dyn crate::ports::AttachmentStore>, cluster)
        })
    } else {
        None
    };
    let deps = deps.with_attachments(
        kube_ports,
        crate::attachment::AttachmentConfig {
            max_volumes_per_node: u64::from(cli.max_volumes_per_node),
            data_path_fence: cli.data_path_fence,
            resync_interval: Duration::from_secs(cli.attachment_resync_secs),
        },
    );
    let cfg = DriverConfig {
        driver_name: cli.driver_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        node_id,
        mode: cli.mode,
        max_volumes_per_node: i64::from(cli.max_volumes_per_node),
        controller: controller_config(cli)?,
    };
    Ok(Driver::new(cfg, deps)?)
}

/// The RouterOS SSH adapter the `--rds-*` flags describe, or `None` without
/// `--rds-address` (the embedded backend).
pub fn ssh_rds(
    cli: &Cli,
    entropy: Arc<dyn crate::ports::Entropy>,
) -> Result<Option<Arc<dyn crate::ports::Rds>>, ServeError> {
    use crate::routeros::transport::{
        TcpConnector,
        ssh::{HostKeyPolicy, SshConfig, SshTransport, load_private_key},
    };
    let Some(address) = &cli.rds_address else {
        return Ok(None);
    };
    let key_file = cli.rds_key_file.as_ref().ok_or_else(|| {
        ServeError::Config(
            "--rds-key-file: required with --rds-address (the SSH private key of --rds-user)"
                .into(),
        )
    })?;
    let key = load_private_key(key_file)
        .map_err(|e| ServeError::Config(format!("--rds-key-file {e}")))?;
    let host_key = match (
        &cli.rds_host_key,
        cli.rds_insecure_skip_host_key_verification,
    ) {
        (Some(_), true) => {
            return Err(ServeError::Config(
                "--rds-host-key and --rds-insecure-skip-host-key-verification exclude each other; \
                 keep the pinned key"
                    .into(),
            ));
        }
        (Some(k), false) => HostKeyPolicy::parse(k)
            .map_err(|e| ServeError::Config(format!("--rds-host-key: {e}")))?,
        (None, true) => {
            tracing::warn!(
                rds = %address,
                "RDS host key verification is DISABLED (--rds-insecure-skip-host-key-verification): \
                 anyone who can intercept the connection can impersonate the RDS"
            );
            HostKeyPolicy::InsecureAcceptAny
        }
        (None, false) => {
            return Err(ServeError::Config(
                "--rds-host-key: required with --rds-address; pin the RDS host key \
                 (an OpenSSH public key line, or its SHA256:... fingerprint from `ssh-keygen -lf`)"
                    .into(),
            ));
        }
    };
    let volume_path = cli.rds_volume_path.trim_matches('/').to_string();
    let pool_mount_point = match &cli.rds_pool_mount_point {
        Some(m) => m.trim_matches('/').to_string(),
        None => volume_path
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    let layout = crate::routeros::RdsLayout {
        volume_base_path: volume_path,
        pool_mount_point,
    };
    let transport = SshTransport::new(
        TcpConnector {
            addr: format!("{address}:{}", cli.rds_port),
        },
        SshConfig {
            user: cli.rds_user.clone(),
            key,
            host_key,
            connect_timeout: Duration::from_secs(cli.rds_connect_timeout_secs.max(1)),
            command_timeout: Duration::from_secs(cli.rds_command_timeout_secs.max(1)),
            max_connections: cli.rds_max_connections.max(1),
            max_channels: cli.rds_max_channels.max(1),
        },
    );
    let retry = crate::retry::Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
        max_attempts: 4,
    };
    let rds =
        crate::routeros::RouterOsRds::new(transport, &layout, retry, entropy).map_err(|e| {
            ServeError::Config(format!("--rds-volume-path / --rds-pool-mount-point: {e}"))
        })?;
    tracing::info!(rds = %address, port = cli.rds_port, user = %cli.rds_user, volume_path = %layout.volume_base_path, pool = %layout.pool_mount_point, "RDS backend: RouterOS over SSH");
    Ok(Some(Arc::new(rds)))
}

/// Controller settings from the CLI.
fn controller_config(cli: &Cli) -> Result<crate::controller::ControllerConfig, ServeError> {
    use crate::controller::{ControllerConfig, params::Expected};
    crate::types::Nqn::new(format!("{}x", cli.nvme_nqn_prefix)).map_err(|e| {
        ServeError::Config(format!("--nvme-nqn-prefix {:?}: {e}", cli.nvme_nqn_prefix))
    })?;
    let nvme_address = cli
        .nvme_address
        .clone()
        .or_else(|| cli.rds_address.clone())
        .unwrap_or_else(|| "127.0.0.1".into());
    Ok(ControllerConfig {
        nqn_prefix: cli.nvme_nqn_prefix.clone(),
        nvme_address,
        nvme_port: cli.nvme_port,
        expected: Expected {
            rds_address: cli.rds_address.clone(),
            volume_path: Some(cli.rds_volume_path.trim_matches('/').to_string()),
        },
    })
}

/// Runs the plugin until SIGTERM/SIGINT.
pub async fn run(cli: Cli) -> Result<(), ServeError> {
    let stop = termination_signal()?;
    let driver = build_driver(&cli)?;
    // Start-up (state rebuild) finishes before the socket exists, so nothing is answered
    // from half-built state.
    driver.start().await?;
    let drain = Duration::from_secs(cli.drain_timeout_secs);
    if let Some(addr) = cli.metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Bind(format!("--metrics-address {addr}: {e}")))?;
        tracing::info!(%addr, "serving metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, driver.metrics()));
    }
    let services = driver.services();
    let cfg = driver.config();
    match &cli.endpoint {
        Endpoint::Unix(path) => {
            let (listener, _guard) = bind_unix(path).await?;
            tracing::info!(endpoint = %cli.endpoint, driver = %cfg.driver_name, mode = ?cfg.mode, node_id = %cfg.node_id, "serving");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            serve(services, incoming, stop, drain).await
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Bind(format!("{addr}: {e}")))?;
            tracing::info!(endpoint = %cli.endpoint, driver = %cfg.driver_name, mode = ?cfg.mode, "serving");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            serve(services, incoming, stop, drain).await
        }
    }
}
