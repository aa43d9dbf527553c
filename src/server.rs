//! Serving: the gRPC server over any incoming connection stream (a unix socket in
//! production, turmoil TCP in the simulation), ownership of the unix socket, the signals
//! that stop it, and the bounded drain. What is served is built by the composition root
//! ([`crate::compose`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::csi::{controller::ControllerService, identity::IdentityService, node::NodeService};
use crate::metrics::Metrics;
use crate::proto::csi::{controller_server, identity_server, node_server};

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

/// The tonic services of one plugin instance.
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
    let mut builder = tonic::transport::Server::builder()
        // A silently broken link must not hang a connection forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::metrics::MetricsLayer(services.metrics));
    let router = builder
        .add_routes(reflection()?)
        .add_service(services.identity)
        .add_optional_service(services.controller)
        .add_optional_service(services.node);

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

/// The gRPC reflection services, in both protocol versions (grpcurl before 1.8.8 speaks
/// only v1alpha). Decoded from the compile-time descriptor set once per process: the result
/// is immutable, and decoding it costs about as much as a thousand RPCs, which the
/// simulation (thousands of plugin starts in one process) paid at every start.
fn reflection() -> Result<tonic::service::Routes, ServeError> {
    static ROUTES: std::sync::OnceLock<Result<tonic::service::Routes, String>> =
        std::sync::OnceLock::new();
    let build = || {
        let builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        };
        let v1 = builder().build_v1().map_err(|e| e.to_string())?;
        let v1alpha = builder().build_v1alpha().map_err(|e| e.to_string())?;
        Ok(tonic::service::Routes::new(v1).add_service(v1alpha))
    };
    ROUTES
        .get_or_init(build)
        .clone()
        .map_err(ServeError::Transport)
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
