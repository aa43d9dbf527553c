//! Prometheus metrics (prefix `rds_csi_`): a counter and a latency histogram per CSI method
//! and gRPC code, recorded by a tower layer around the gRPC server so every RPC is counted
//! the same way; the node's data path (NVMe connects and disconnects by outcome with their
//! duration, stale mounts detected, recoveries, orphan connections cleaned); the
//! controller's live migrations ([`MigrationMetrics`]: `rds_csi_migrations_total{outcome,
//! timed_out}`, `rds_csi_migration_duration_seconds{outcome}`, `rds_csi_migrations_in_flight`);
//! and an HTTP endpoint serving the text exposition format.
//!
//! Every metric name is registered in [`Metrics::default`], the one list. Labels are
//! bounded sets (methods, codes, outcomes): never a volume id.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the per-RPC metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// CSI method, e.g. `CreateVolume`.
    pub method: String,
    /// gRPC status code name, e.g. `Ok`, `NotFound`.
    pub code: String,
}

/// Labels of a migration that ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    /// `completed` (the source detached) or `failed` (the target detached).
    pub outcome: String,
    /// `true` when it ended after outliving its `migrationTimeoutSeconds`.
    pub timed_out: String,
}

/// Labels of a migration's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationOutcome {
    /// `completed` or `failed`.
    pub outcome: String,
}

/// The controller's live migrations (KubeVirt): ended ones by outcome, their durations, and
/// those running in this controller's memory. Clones share the same series.
#[derive(Clone, Debug)]
pub struct MigrationMetrics {
    ended: Family<MigrationLabels, Counter>,
    duration: Family<MigrationOutcome, Histogram>,
    in_flight: Gauge,
}

impl Default for MigrationMetrics {
    /// Series registered nowhere (tests, or a manager built without a registry).
    fn default() -> Self {
        Self {
            ended: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            in_flight: Gauge::default(),
        }
    }
}

fn duration_histogram() -> Histogram {
    // 1 s .. ~68 min: migrations last seconds to the longest timeout (3600 s).
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

impl MigrationMetrics {
    /// A migration ended: `completed` or `failed`, after `seconds`, past its timeout or not.
    pub fn ended(&self, outcome: &str, timed_out: bool, seconds: f64) {
        self.ended
            .get_or_create(&MigrationLabels {
                outcome: outcome.to_string(),
                timed_out: timed_out.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&MigrationOutcome {
                outcome: outcome.to_string(),
            })
            .observe(seconds);
    }

    /// The gauge of migrations running in this controller's memory (the attachment manager
    /// keeps it in step with its memory).
    pub fn in_flight(&self) -> Gauge {
        self.in_flight.clone()
    }
}

/// Labels of the NVMe connect/disconnect metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NvmeLabels {
    /// `connect` or `disconnect`.
    pub op: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Labels of the stale-mount counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// The node call that saw it: `stage`, `publish`, `stats`, `expand`.
    pub check: &'static str,
}

/// Labels of counters by outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Recoveries: `ok`, `error`. Orphans: `disconnected`, `error`, `dry_run`.
    pub outcome: &'static str,
}

/// The plugin's metrics. One per plugin instance.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram>,
    migrations: MigrationMetrics,
    nvme: Family<NvmeLabels, Counter>,
    nvme_latency: Family<NvmeLabels, Histogram>,
    stale_mounts: Family<CheckLabels, Counter>,
    recoveries: Family<OutcomeLabels, Counter>,
    orphans: Family<OutcomeLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rds_csi");
        let rpcs = Family::<RpcLabels, Counter>::default();
        let latency = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "rpcs",
            "CSI RPCs answered, by method and gRPC code",
            rpcs.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "CSI RPC latency, by method and gRPC code",
            latency.clone(),
        );
        let migrations = MigrationMetrics::default();
        registry.register(
            "migrations",
            "Live migrations of multi-node block volumes that ended, by outcome (completed: \
             the source detached; failed: the target detached) and whether they outlived \
             their timeout",
            migrations.ended.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "How long live migrations ran, by outcome",
            migrations.duration.clone(),
        );
        registry.register(
            "migrations_in_flight",
            "Live migrations running, as this controller's memory knows them",
            migrations.in_flight.clone(),
        );
        let nvme = Family::<NvmeLabels, Counter>::default();
        let nvme_latency = Family::<NvmeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        });
        let stale_mounts = Family::<CheckLabels, Counter>::default();
        let recoveries = Family::<OutcomeLabels, Counter>::default();
        let orphans = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "nvme_operations",
            "NVMe connects and disconnects on the node, by operation and outcome",
            nvme.clone(),
        );
        registry.register(
            "nvme_operation_duration_seconds",
            "Duration of NVMe connects and disconnects on the node, by operation and outcome",
            nvme_latency.clone(),
        );
        registry.register(
            "stale_mounts_detected",
            "Staging or publish mounts found on a device that is gone or no longer the \
             volume's, by the node call that found them",
            stale_mounts.clone(),
        );
        registry.register(
            "volume_recoveries",
            "Repairs of a stale staging mount (remount of the volume's current device and \
             re-bind of its publish targets), by outcome",
            recoveries.clone(),
        );
        registry.register(
            "orphan_connections",
            "NVMe connections of this driver that no volume on the node uses and no \
             VolumeAttachment holds, by what the sweep did with them",
            orphans.clone(),
        );
        Self {
            registry,
            rpcs,
            latency,
            migrations,
            nvme,
            nvme_latency,
            stale_mounts,
            recoveries,
            orphans,
        }
    }
}

impl Metrics {
    /// Records one answered RPC.
    pub fn observe(&self, method: &str, code: tonic::Code, seconds: f64) {
        let labels = RpcLabels {
            method: method.to_string(),
            code: format!("{code:?}"),
        };
        self.rpcs.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(seconds);
    }

    /// The migration metrics (handles sharing this registry's series).
    pub fn migrations(&self) -> MigrationMetrics {
        self.migrations.clone()
    }

    /// Records one NVMe `op` (`connect`, `disconnect`) that took `seconds`.
    pub fn observe_nvme(&self, op: &'static str, ok: bool, seconds: f64) {
        let labels = NvmeLabels {
            op,
            outcome: if ok { "ok" } else { "error" },
        };
        self.nvme.get_or_create(&labels).inc();
        self.nvme_latency.get_or_create(&labels).observe(seconds);
    }

    /// Records a stale mount seen by the node call `check`.
    pub fn stale_mount(&self, check: &'static str) {
        self.stale_mounts.get_or_create(&CheckLabels { check }).inc();
    }

    /// Records one recovery of a stale staging mount.
    pub fn recovery(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.recoveries.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Records what the orphan sweep did with one connection: `disconnected`, `error`,
    /// `dry_run`.
    pub fn orphan(&self, outcome: &'static str) {
        self.orphans.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Tower layer recording [`Metrics`] for every gRPC request.
#[derive(Clone, Debug)]
pub struct MetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

/// The service [`MetricsLayer`] wraps around the gRPC router.
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // "/csi.v1.Controller/CreateVolume" → "CreateVolume".
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let metrics = Arc::clone(&self.metrics);
        let started = tokio::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            if let Ok(resp) = &result {
                // Errors are answered trailers-only, so the status is in the headers; a
                // response without one is a success whose status follows in trailers.
                let code = tonic::Status::from_header_map(resp.headers())
                    .map_or(tonic::Code::Ok, |s| s.code());
                metrics.observe(&method, code, started.elapsed().as_secs_f64());
            }
            result
        })
    }
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (200, metrics.render())
                    } else {
                        (404, "see /metrics\n".to_string())
                    };
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_rpcs_appear_in_the_exposition_with_the_prefix() {
        let m = Metrics::default();
        m.observe("CreateVolume", tonic::Code::Ok, 0.01);
        m.observe("CreateVolume", tonic::Code::Ok, 0.02);
        m.observe("DeleteVolume", tonic::Code::NotFound, 0.5);
        let text = m.render();
        assert!(
            text.contains(r#"rds_csi_rpcs_total{method="CreateVolume",code="Ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"rds_csi_rpcs_total{method="DeleteVolume",code="NotFound"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("rds_csi_rpc_duration_seconds_bucket"),
            "{text}"
        );
    }

    #[test]
    fn migrations_appear_by_outcome_with_durations_and_in_flight() {
        let m = Metrics::default();
        let mig = m.migrations();
        mig.in_flight().set(2);
        mig.ended("completed", false, 12.0);
        mig.ended("completed", false, 30.0);
        mig.ended("failed", true, 400.0);
        let text = m.render();
        for want in [
            r#"rds_csi_migrations_total{outcome="completed",timed_out="false"} 2"#,
            r#"rds_csi_migrations_total{outcome="failed",timed_out="true"} 1"#,
            r#"rds_csi_migration_duration_seconds_count{outcome="completed"} 2"#,
            r#"rds_csi_migration_duration_seconds_sum{outcome="failed"} 400.0"#,
            "rds_csi_migrations_in_flight 2",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
    }

    #[test]
    fn node_data_path_metrics_have_conventional_names_and_bounded_labels() {
        let m = Metrics::default();
        m.observe_nvme("connect", true, 0.2);
        m.observe_nvme("connect", false, 30.0);
        m.observe_nvme("disconnect", true, 0.1);
        m.stale_mount("stats");
        m.stale_mount("stats");
        m.recovery(true);
        m.orphan("dry_run");
        let text = m.render();
        for line in [
            r#"rds_csi_nvme_operations_total{op="connect",outcome="ok"} 1"#,
            r#"rds_csi_nvme_operations_total{op="connect",outcome="error"} 1"#,
            r#"rds_csi_nvme_operations_total{op="disconnect",outcome="ok"} 1"#,
            r#"rds_csi_nvme_operation_duration_seconds_count{op="connect",outcome="error"} 1"#,
            r#"rds_csi_stale_mounts_detected_total{check="stats"} 2"#,
            r#"rds_csi_volume_recoveries_total{outcome="ok"} 1"#,
            r#"rds_csi_orphan_connections_total{outcome="dry_run"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
