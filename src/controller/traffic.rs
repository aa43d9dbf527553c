//! The disk-traffic poll: every `interval` (off by default), one `/disk monitor-traffic
//! <slot> once` per published volume — the volumes the attachment manager holds records
//! for — into the `rds_csi_rds_disk_*_per_second{volume}` gauges. Each read is a RouterOS
//! command (rendered by the renderer, read by the parser, counted like every command), so
//! the interval is the operator's trade between freshness and load on the RDS.
//!
//! A volume no longer published loses its series at the next pass (bounded cardinality: at
//! most one series set per published volume); a disk that cannot be read this pass keeps
//! its previous values and is read again at the next. One pass at a time, in volume order.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::attachment::AttachmentManager;
use crate::metrics::{RdsMetrics, Reconciler, ReconcilerMetrics};
use crate::ports::Rds;
use crate::ports::rds::RdsError;

/// The poll's setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficConfig {
    /// How often published volumes' traffic is read (zero: never, the default).
    pub interval: Duration,
}

/// Reads the traffic of published volumes' disks into the metrics.
pub struct TrafficPoll {
    rds: Arc<dyn Rds>,
    attachments: Arc<AttachmentManager>,
    metrics: RdsMetrics,
    runs: ReconcilerMetrics,
    cfg: TrafficConfig,
    /// Volumes that have series now.
    reported: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for TrafficPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficPoll")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl TrafficPoll {
    /// A poll of `attachments`' published volumes on `rds`, recording into `metrics`, each
    /// pass counted in `runs`.
    pub fn new(
        rds: Arc<dyn Rds>,
        attachments: Arc<AttachmentManager>,
        metrics: RdsMetrics,
        runs: ReconcilerMetrics,
        cfg: TrafficConfig,
    ) -> Self {
        Self {
            rds,
            attachments,
            metrics,
            runs,
            cfg,
            reported: Mutex::new(BTreeSet::new()),
        }
    }

    /// One pass: reads every published volume's traffic; returns how many were read.
    pub async fn poll_once(&self) -> usize {
        let started = tokio::time::Instant::now();
        let published: BTreeSet<String> = self
            .attachments
            .list()
            .into_iter()
            .map(|r| r.volume_id.to_string())
            .collect();
        let mut read = 0;
        let mut failed = false;
        for volume in &published {
            match self.rds.disk_traffic(volume).await {
                Ok(t) => {
                    self.metrics.disk_traffic(volume, &t);
                    self.reported().insert(volume.clone());
                    read += 1;
                }
                Err(RdsError::NotFound(_)) => self.forget(volume),
                Err(e) => {
                    failed = true;
                    tracing::debug!(volume_id = %volume, error = %e, "cannot read the disk's traffic; next pass retries");
                }
            }
        }
        let gone: Vec<String> = self
            .reported()
            .iter()
            .filter(|v| !published.contains(*v))
            .cloned()
            .collect();
        for volume in &gone {
            self.forget(volume);
        }
        self.runs.run(
            Reconciler::DiskTraffic,
            !failed,
            started.elapsed().as_secs_f64(),
        );
        read
    }

    fn reported(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget(&self, volume: &str) {
        self.metrics.forget_disk_traffic(volume);
        self.reported().remove(volume);
    }

    /// Starts the periodic pass (nothing when the interval is zero); the task ends when
    /// the poll is dropped.
    pub fn spawn(self: &Arc<Self>) {
        let every = self.cfg.interval;
        if every.is_zero() {
            return;
        }
        let poll = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(p) = poll.upgrade() else { break };
                p.poll_once().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::{AttachmentConfig, PublishArgs, UnpublishArgs};
    use crate::backend::{local_cluster::LocalCluster, mem_store::MemStore};
    use crate::metrics::Metrics;
    use crate::ports::rds::{DiskSpec, NvmeExport};
    use crate::ports::time::SystemClock;
    use crate::types::{AccessMode, NodeId, VolumeId};

    #[tokio::test]
    async fn published_volumes_get_traffic_series_and_lose_them_when_unpublished() {
        let rds = crate::routeros::in_memory_rds(1 << 40);
        for v in ["pvc-1", "pvc-2"] {
            rds.create_disk(&DiskSpec {
                slot: v.into(),
                size_bytes: 1 << 20,
                export: Some(NvmeExport {
                    port: 4420,
                    nqn: format!("nqn.2000-02.com.mikrotik:{v}"),
                }),
                copy_from: None,
                comment: None,
                allowed_host_nqn: None,
            })
            .await
            .unwrap();
        }
        let node = NodeId::new("node-a").unwrap();
        let metrics = Metrics::default();
        let rds: Arc<dyn Rds> = rds;
        let attachments = Arc::new(AttachmentManager::new(
            Arc::clone(&rds),
            Arc::new(MemStore::new()),
            Arc::new(LocalCluster::new([node.clone()])),
            Arc::new(SystemClock),
            AttachmentConfig::default(),
        ));
        let poll = TrafficPoll::new(
            rds,
            Arc::clone(&attachments),
            metrics.rds(),
            metrics.reconcilers(),
            TrafficConfig {
                interval: Duration::from_secs(10),
            },
        );
        assert_eq!(poll.poll_once().await, 0, "nothing published");
        let publish = |v: &str| PublishArgs {
            volume_id: VolumeId::new(v).unwrap(),
            node_id: node.clone(),
            access_mode: AccessMode::SingleNode,
            readonly: false,
            block: true,
            fs_type: None,
            nvme_address: None,
            migration_timeout: crate::attachment::migration::DEFAULT_TIMEOUT,
        };
        attachments.publish(&publish("pvc-1")).await.unwrap();
        attachments.publish(&publish("pvc-2")).await.unwrap();
        assert_eq!(poll.poll_once().await, 2);
        let text = metrics.render();
        for v in ["pvc-1", "pvc-2"] {
            let series = format!(r#"rds_csi_rds_disk_write_bytes_per_second{{volume="{v}"}} 0.0"#);
            assert!(text.contains(&series), "{series} missing in:\n{text}");
        }
        attachments
            .unpublish(&UnpublishArgs {
                volume_id: VolumeId::new("pvc-1").unwrap(),
                node_id: Some(node.clone()),
            })
            .await
            .unwrap();
        assert_eq!(poll.poll_once().await, 1);
        let text = metrics.render();
        assert!(!text.contains(r#"volume="pvc-1""#), "pvc-1 is no longer published:\n{text}");
        assert!(text.contains(r#"volume="pvc-2""#));
        assert!(
            text.contains(r#"rds_csi_reconciler_runs_total{reconciler="disk_traffic",outcome="ok"} 3"#),
            "{text}"
        );
    }
}
