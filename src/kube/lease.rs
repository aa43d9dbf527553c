//! The `Leadership` port over a Kubernetes Lease (`coordination.k8s.io/v1`), as client-go's
//! leader election does it, reduced to what the controller's reconcilers need.
//!
//! - Absent: created naming this instance (a create that loses the race is 409: not
//!   leading).
//! - Held by this instance: renewed (`renewTime`), a merge PATCH carrying the
//!   resourceVersion read, so a renewal that raced a takeover fails (409) instead of
//!   overwriting it.
//! - Held by another: taken over only once its record (holder, renew time, version) has
//!   stayed unchanged for `leaseDurationSeconds` as measured by this process's own clock
//!   since it first saw that record — never by comparing the other replica's timestamps with
//!   ours, so clock skew between machines cannot shorten a lease. The takeover is
//!   conditional on the resourceVersion too.
//!
//! A leader that cannot renew reports "not leading" (and errors): its reconcilers stop at
//! once. The identity is the controller's node name and a random suffix drawn from the
//! injected entropy, unique per process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use crate::kube::pv_store::{Failure, format_time, request_retrying};
use crate::ports::cluster::ClusterError;
use crate::ports::{Clock, Entropy, Leadership};
use crate::retry::Backoff;

#[derive(Debug, Deserialize)]
struct LeaseLite {
    #[serde(default)]
    metadata: LeaseMeta,
    #[serde(default)]
    spec: LeaseSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseMeta {
    #[serde(default)]
    resource_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseSpec {
    #[serde(default)]
    holder_identity: Option<String>,
    #[serde(default)]
    renew_time: Option<String>,
    #[serde(default)]
    lease_transitions: Option<i64>,
}

/// The record of another holder as first seen, with when (this process's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    holder: String,
    renew_time: Option<String>,
    version: Option<String>,
}

/// Leader election through one Lease object.
pub struct KubeLease {
    client: ::kube::Client,
    path: String,
    name: String,
    holder: String,
    /// `holder` and a random suffix, drawn at the first election (not at construction:
    /// an instance that never elects draws nothing from the entropy).
    identity: std::sync::OnceLock<String>,
    duration: Duration,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    backoff: Backoff,
    observed: Mutex<Option<(Observed, tokio::time::Instant)>>,
}

impl std::fmt::Debug for KubeLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLease")
            .field("name", &self.name)
            .field("identity", &self.identity.get())
            .finish_non_exhaustive()
    }
}

impl KubeLease {
    /// The Lease `name` in `namespace`, held as `holder` plus a random suffix for
    /// `duration` at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: ::kube::Client,
        namespace: &str,
        name: &str,
        holder: &str,
        duration: Duration,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        backoff: Backoff,
    ) -> Self {
        Self {
            client,
            path: format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"),
            name: name.to_string(),
            holder: holder.to_string(),
            identity: std::sync::OnceLock::new(),
            duration,
            clock,
            entropy,
            backoff,
            observed: Mutex::new(None),
        }
    }

    /// This instance's holder identity.
    pub fn identity(&self) -> &str {
        self.identity.get_or_init(|| {
            format!("{}_{:08x}", self.holder, self.entropy.next_u64() as u32)
        })
    }

    /// Sends `make()`'s request, retrying transient failures; `Ok(Err(_))`: the API
    /// answered with an error status.
    async fn call(
        &self,
        what: &str,
        make: impl Fn() -> Result<http::Request<Vec<u8>>, ::kube::core::request::Error>,
    ) -> Result<Result<LeaseLite, Failure>, ClusterError> {
        request_retrying(&self.client, &self.backoff, &*self.entropy, what, make).await
    }

    fn spec(&self, now: &str, acquire: bool, transitions: i64) -> serde_json::Value {
        let mut spec = json!({
            "holderIdentity": self.identity(),
            "leaseDurationSeconds": self.duration.as_secs(),
            "renewTime": now,
        });
        if acquire {
            spec["acquireTime"] = json!(now);
            spec["leaseTransitions"] = json!(transitions);
        }
        spec
    }

    /// Whether `seen` (another holder's record) has stood unchanged for the lease duration
    /// by our clock; remembers it when it is new.
    fn expired(&self, seen: Observed) -> bool {
        let now = tokio::time::Instant::now();
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match &*observed {
            Some((o, at)) if *o == seen => now.duration_since(*at) >= self.duration,
            _ => {
                *observed = Some((seen, now));
                false
            }
        }
    }
}

#[async_trait]
impl Leadership for KubeLease {
    async fn try_lead(&self) -> Result<bool, ClusterError> {
        let now = format_time(self.clock.now());
        let what = format!("GET Lease {}", self.name);
        let current = match self
            .call(&what, || {
                ::kube::core::Request::new(self.path.as_str()).get(&self.name, &Default::default())
            })
            .await?
        {
            Ok(lease) => lease,
            Err(Failure::Status(404, _)) => {
                let body = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": { "name": self.name },
                    "spec": self.spec(&now, true, 0),
                });
                let data =
                    serde_json::to_vec(&body).map_err(|e| ClusterError::Other(e.to_string()))?;
                return match self
                    .call("POST Lease", || {
                        ::kube::core::Request::new(self.path.as_str())
                            .create(&Default::default(), data.clone())
                    })
                    .await?
                {
                    Ok(_) => {
                        tracing::info!(identity = %self.identity(), lease = %self.name, "leading the controller's reconcilers (lease created)");
                        Ok(true)
                    }
                    Err(Failure::Status(409, _)) => Ok(false),
                    Err(f) => Err(ClusterError::Other(format!("POST Lease: {}", f.describe()))),
                };
            }
            Err(f) => return Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        };
        let holder = current.spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity();
        if !ours && !holder.is_empty() {
            let seen = Observed {
                holder: holder.clone(),
                renew_time: current.spec.renew_time.clone(),
                version: current.metadata.resource_version.clone(),
            };
            if !self.expired(seen) {
                return Ok(false);
            }
        }
        let transitions = current.spec.lease_transitions.unwrap_or(0) + i64::from(!ours);
        let mut patch = json!({ "spec": self.spec(&now, !ours, transitions) });
        if let Some(rv) = &current.metadata.resource_version {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        let what = format!("PATCH Lease {}", self.name);
        match self
            .call(&what, || {
                ::kube::core::Request::new(self.path.as_str()).patch(
                    &self.name,
                    &Default::default(),
                    &::kube::api::Patch::Merge(&patch),
                )
            })
            .await?
        {
            Ok(_) => {
                if !ours {
                    tracing::info!(identity = %self.identity(), lease = %self.name, previous = %holder, "leading the controller's reconcilers (lease taken over)");
                }
                Ok(true)
            }
            // Another replica renewed or took it meanwhile.
            Err(Failure::Status(409, _)) => Ok(false),
            Err(f) => Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::fake_api::{FakeApi, Kind};
    use crate::ports::time::{SeededEntropy, SystemClock};

    const LEASE: Duration = Duration::from_secs(15);

    fn lease(api: &FakeApi, holder: &str, seed: u64) -> KubeLease {
        KubeLease::new(
            api.client(),
            "rds-csi",
            "rds.csi.srvlab.io-reconcilers",
            holder,
            LEASE,
            Arc::new(SystemClock),
            Arc::new(SeededEntropy::from_seed(seed)),
            Backoff::API,
        )
    }

    fn holder(api: &FakeApi) -> String {
        api.object(Kind::Lease, "rds-csi", "rds.csi.srvlab.io-reconcilers").unwrap()["spec"]
            ["holderIdentity"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn one_replica_leads_and_another_takes_over_only_after_the_lease_lapses() {
        let api = FakeApi::new();
        let a = lease(&api, "node-a", 1);
        let b = lease(&api, "node-b", 2);
        assert!(a.try_lead().await.unwrap(), "created");
        assert!(!b.try_lead().await.unwrap());
        assert_eq!(holder(&api), a.identity());
        // a keeps renewing: b never takes over, however long it waits.
        for _ in 0..10 {
            tokio::time::advance(LEASE / 3).await;
            assert!(a.try_lead().await.unwrap());
            assert!(!b.try_lead().await.unwrap());
        }
        // a stops renewing: b takes over once a's record has stood still for a whole
        // lease by b's own clock (not before).
        tokio::time::advance(LEASE - Duration::from_secs(1)).await;
        assert!(!b.try_lead().await.unwrap());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_lead().await.unwrap(), "taken over");
        assert_eq!(holder(&api), b.identity());
        // a comes back: it does not lead, and b's lease stands.
        assert!(!a.try_lead().await.unwrap());
        assert!(b.try_lead().await.unwrap());
        let spec = &api.object(Kind::Lease, "rds-csi", "rds.csi.srvlab.io-reconcilers").unwrap()["spec"];
        assert_eq!(spec["leaseTransitions"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_races_a_takeover_loses_and_an_outage_is_not_leadership() {
        let api = FakeApi::new();
        let a = lease(&api, "node-a", 1);
        assert!(a.try_lead().await.unwrap());
        // Another writer changes the Lease between a's read and its patch.
        api.conflict_next_writes(1);
        assert!(!a.try_lead().await.unwrap(), "409: not leading");
        api.fail_next_requests([503; 8]);
        assert!(a.try_lead().await.is_err(), "the API is down: not leading");
    }
}
