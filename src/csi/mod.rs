//! The CSI gRPC services: thin tonic adapters over the driver core.
//!
//! Each RPC: log the redacted request in a span carrying the method and volume id →
//! validate (pure functions) → in-flight guard → core call → map the error through the one
//! table in [`crate::error`].

pub mod controller;
pub mod identity;
pub mod inflight;
pub mod node;
pub mod publish;

use crate::proto::{MaybeRedact, loggable};

use tracing::Instrument;

/// Runs one RPC: in a span carrying the method and volume id, logs the request with every
/// `csi_secret` field cleared, runs `core`, logs the outcome, and maps the error through
/// the one table (`From<Error> for Status`).
pub(crate) async fn rpc<Req, Resp, Fut>(
    method: &'static str,
    volume_id: &str,
    req: &Req,
    core: Fut,
) -> Result<tonic::Response<Resp>, tonic::Status>
where
    Req: Clone + MaybeRedact + std::fmt::Debug,
    Fut: Future<Output = crate::Result<Resp>>,
{
    let span = tracing::info_span!("rpc", method, volume_id);
    async move {
        tracing::debug!(request = ?loggable(req), "request");
        let result = core.await;
        match &result {
            Ok(_) => tracing::debug!("ok"),
            Err(e) => tracing::warn!(code = ?e.code(), error = %e, "failed"),
        }
        result
            .map(tonic::Response::new)
            .map_err(tonic::Status::from)
    }
    .instrument(span)
    .await
}
