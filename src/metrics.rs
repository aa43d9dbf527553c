//! Prometheus metrics (prefix `rds_csi_`): a counter and a latency histogram per CSI method
//! and gRPC code, recorded by a tower layer around the gRPC server so every RPC is counted
//! the same way; the controller's live migrations ([`MigrationMetrics`]); and an HTTP
//! endpoint serving the text exposition format.
//!
//! Names (one list): `rds_csi_rpcs_total{method,code}`,
//! `rds_csi_rpc_duration_seconds{method,code}`,
//! `rds_csi_migrations_total{outcome,timed_out}`,
//! `rds_csi_migration_duration_seconds{outcome}`, `rds_csi_migrations_in_flight`. Labels are
//! bounded (no volume or node names).

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
pub struct OutcomeLabels {
    /// `completed` or `failed`.
    pub outcome: String,
}

/// The controller's live migrations (KubeVirt): ended ones by outcome, their durations, and
/// those running in this controller's memory. Clones share the same series.
#[derive(Clone, Debug)]
pub struct MigrationMetrics {
    ended: Family<MigrationLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram>,
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
            .get_or_create(&OutcomeLabels {
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

/// The plugin's metrics. One per plugin instance.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram>,
    migrations: MigrationMetrics,
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
        Self {
            registry,
            rpcs,
            latency,
            migrations,
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
}
