//! Kubernetes adapters (kube-rs): the `AttachmentStore` over PV annotations
//! ([`pv_store`]), the `Cluster` port ([`cluster`]), the `Leadership` port over a Lease
//! ([`lease`]), the `ClusterWatch` port over kube's runtime watcher ([`watch`]), client
//! construction, and the simulated
//! API server the tests and the simulation run them against ([`fake_api`]).
//!
//! kube's own retry layer is off (`Config::default_retry = false`): it draws jitter from
//! `RandomState`. Every retry here uses [`crate::retry::Backoff`] with the injected
//! `Entropy`, with a bounded number of attempts.

pub mod cluster;
pub mod fake_api;
pub mod lease;
pub mod pv_store;
pub mod watch;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::ports::{Clock, Entropy};
use crate::retry::Backoff;

pub use cluster::KubeCluster;
pub use lease::KubeLease;
pub use pv_store::{PvIndex, PvStore};
pub use watch::KubeWatch;

/// Namespace events about cluster-scoped objects (PVs) are recorded in.
pub const EVENT_NAMESPACE: &str = "default";

/// Builds a client from `kubeconfig`, or from the in-cluster service account when `None`.
/// No kube retries; bounded timeouts so a broken link cannot hang a call forever. Must run
/// inside a tokio runtime.
pub fn client(kubeconfig: Option<&Path>) -> Result<::kube::Client, String> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
            // The loader does no I/O beyond what `read_from` did: no runtime needed.
            futures::executor::block_on(::kube::Config::from_custom_kubeconfig(
                kc,
                &::kube::config::KubeConfigOptions::default(),
            ))
            .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None => ::kube::Config::incluster()
            .map_err(|e| format!("in-cluster Kubernetes configuration: {e}"))?,
    };
    config.default_retry = false;
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(30));
    config.write_timeout = Some(Duration::from_secs(30));
    ::kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// The two Kubernetes adapters of the controller, sharing one PV index; `backoff` is
/// [`Backoff::API`] in production.
pub fn adapters(
    client: ::kube::Client,
    driver_name: &str,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    backoff: Backoff,
) -> (Arc<PvStore>, Arc<KubeCluster>) {
    let index = Arc::new(PvIndex::default());
    let store = Arc::new(PvStore::new(
        client.clone(),
        driver_name,
        Arc::clone(&entropy),
        backoff,
        Arc::clone(&index),
    ));
    let cluster = Arc::new(KubeCluster::new(
        client,
        driver_name,
        EVENT_NAMESPACE,
        clock,
        entropy,
        backoff,
        index,
    ));
    (store, cluster)
}

#[cfg(test)]
mod tests;
