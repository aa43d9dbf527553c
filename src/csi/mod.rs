//! The CSI gRPC services: thin tonic adapters over the driver core.
//!
//! Each RPC: log the redacted request in a span carrying the method and volume id →
//! validate (pure functions) → in-flight guard → core call → map the error through the one
//! table in [`crate::error`].

pub mod context;
pub mod controller;
pub mod identity;
pub mod inflight;
pub mod node;
pub mod publish;

use crate::proto::{MaybeRedact, loggable};

/// Logs a request at debug level with every `csi_secret` field cleared.
pub(crate) fn log_request<T: Clone + MaybeRedact + std::fmt::Debug>(method: &str, req: &T) {
    tracing::debug!(method, request = ?loggable(req), "request");
}

/// Logs the outcome of an RPC: info on success, warn on error (code and message).
pub(crate) fn log_result<T>(method: &str, result: &Result<T, crate::Error>) {
    match result {
        Ok(_) => tracing::debug!(method, "ok"),
        Err(e) => tracing::warn!(method, code = ?e.code(), error = %e, "failed"),
    }
}
