//! Connecting a CSI gRPC client to a plugin endpoint: used by the integration tests, the
//! benchmarks and anyone scripting against the plugin.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::types::Endpoint;

/// Opens a channel to `endpoint` (unix socket or TCP).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Unix(path) => connect_unix(path.clone()).await,
        Endpoint::Tcp(addr) => {
            TonicEndpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
    }
}

/// Opens a channel over the unix socket at `path`.
pub async fn connect_unix(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    // The URI is required by tonic but unused: every connection goes to the socket.
    TonicEndpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
}
