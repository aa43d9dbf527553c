//! The `Leadership` port: which controller replica runs the controller's reconcilers.
//!
//! The controller Deployment may run several replicas; the reconcilers that delete or
//! clear (the orphan volume reconciler, the attachment reconciler) run on one of them at a
//! time. Production: a Kubernetes Lease (`coordination.k8s.io/v1`, `crate::kube::lease`).
//! A single instance (no Kubernetes, the embedded default) always leads ([`Sole`]).

use async_trait::async_trait;

use crate::ports::cluster::ClusterError;

/// Leader election of the controller's reconcilers.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Acquires the lease, or renews it when this instance holds it; returns whether this
    /// instance leads now. A leader that cannot renew (an error, or `false`) must stop
    /// acting until it leads again; the lease then expires and another replica takes it.
    async fn try_lead(&self) -> Result<bool, ClusterError>;
}

/// The only instance: always leads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sole;

#[async_trait]
impl Leadership for Sole {
    async fn try_lead(&self) -> Result<bool, ClusterError> {
        Ok(true)
    }
}
