//! The CO: a client host that drives the plugin the way the Kubernetes sidecars and the
//! kubelet do, over CSI on turmoil TCP.
//!
//! Per volume, concurrently: CreateVolume until OK (same name: the provisioner), the PV
//! object, then `moves + 1` rounds of: a VolumeAttachment and ControllerPublish until OK
//! (the attacher), NodeStage and NodePublish until OK (the kubelet), sometimes a repeat of a
//! call that succeeded, sometimes a conflicting ControllerPublish of the volume to another
//! node, then NodeUnpublish, NodeUnstage and ControllerUnpublish until OK and the
//! VolumeAttachment removed (the pod moves); finally DeleteVolume until OK and the PV
//! removed. Every call and its outcome goes to the trace; acknowledgements go to the
//! [`Model`](crate::checkers::Model) the checkers judge.
//!
//! Each volume's choices come from its own seeded RNG, so the schedule of one volume does
//! not shift another's draws.

use std::collections::HashMap;
use std::time::Duration;

use rand::{RngExt, SeedableRng, rngs::StdRng};
use rds_csi::kube::fake_api::Kind;
use rds_csi::proto::csi::{
    CapacityRange, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    CreateVolumeRequest, DeleteVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
    controller_client::ControllerClient,
    node_client::NodeClient,
    volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
};
use serde_json::json;
use tonic::{Code, Status};

use crate::checkers::Op;
use crate::world::{DRIVER, KUBELET_ROOT, Shared, csi_channel, node_name};

/// Stands for the leading controller replica.
const CTRL: &str = "controller*";

/// Bound of one CSI call as the CO sees it.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of every volume.
pub const VOLUME_BYTES: i64 = 1 << 30;

/// One CSI call.
#[derive(Debug, Clone)]
enum Call {
    Create(CreateVolumeRequest),
    Delete(DeleteVolumeRequest),
    Publish(ControllerPublishVolumeRequest),
    Unpublish(ControllerUnpublishVolumeRequest),
    Stage(NodeStageVolumeRequest),
    Unstage(NodeUnstageVolumeRequest),
    NodePublish(NodePublishVolumeRequest),
    NodeUnpublish(NodeUnpublishVolumeRequest),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Create(_) => "CreateVolume",
            Call::Delete(_) => "DeleteVolume",
            Call::Publish(_) => "ControllerPublish",
            Call::Unpublish(_) => "ControllerUnpublish",
            Call::Stage(_) => "NodeStage",
            Call::Unstage(_) => "NodeUnstage",
            Call::NodePublish(_) => "NodePublish",
            Call::NodeUnpublish(_) => "NodeUnpublish",
        }
    }
}

/// What an OK answer carried that the CO needs later.
#[derive(Debug, Default)]
struct Reply {
    volume_context: HashMap<String, String>,
    publish_context: HashMap<String, String>,
}

async fn send(host: &str, call: Call) -> Result<Reply, Status> {
    let channel = csi_channel(host.to_string(), RPC_TIMEOUT)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel);
    let reply = match call {
        Call::Create(r) => {
            let v = c.create_volume(r).await?.into_inner().volume;
            Reply {
                volume_context: v.map(|v| v.volume_context).unwrap_or_default(),
                ..Default::default()
            }
        }
        Call::Delete(r) => c.delete_volume(r).await.map(|_| Reply::default())?,
        Call::Publish(r) => Reply {
            publish_context: c
                .controller_publish_volume(r)
                .await?
                .into_inner()
                .publish_context,
            ..Default::default()
        },
        Call::Unpublish(r) => c
            .controller_unpublish_volume(r)
            .await
            .map(|_| Reply::default())?,
        Call::Stage(r) => n.node_stage_volume(r).await.map(|_| Reply::default())?,
        Call::Unstage(r) => n.node_unstage_volume(r).await.map(|_| Reply::default())?,
        Call::NodePublish(r) => n.node_publish_volume(r).await.map(|_| Reply::default())?,
        Call::NodeUnpublish(r) => n.node_unpublish_volume(r).await.map(|_| Reply::default())?,
    };
    Ok(reply)
}

fn capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

/// The workload of one volume.
struct Script {
    sh: Shared,
    rng: StdRng,
    vol: String,
}

impl Script {
    /// One attempt of `call` on `host` (`CTRL`: the leading controller replica), traced.
    async fn once(&mut self, host: &str, call: &Call, note: &str) -> Result<Reply, Code> {
        let host = if host == CTRL {
            self.sh.leader().active
        } else {
            host
        };
        let name = call.name();
        let r = send(host, call.clone()).await;
        let outcome = match &r {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.sh.trace.log(
            "co",
            format!("{name} {} @{host}{note} -> {outcome}", self.vol),
        );
        r.map_err(|s| s.code())
    }

    /// `call` until OK, with seeded exponential backoff (the sidecars never give up).
    async fn until_ok(&mut self, host: &str, call: Call) -> Reply {
        let mut delay = Duration::from_millis(200);
        loop {
            if let Ok(r) = self.once(host, &call, "").await {
                return r;
            }
            let jitter = self.rng.random_range(500..=1000u64);
            tokio::time::sleep(delay * u32::try_from(jitter).unwrap_or(1000) / 1000).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Sometimes repeats a call that succeeded (a sidecar unsure of its outcome). During a
    /// failover a repeat to the controller may reach the stale former leader.
    async fn maybe_repeat(&mut self, host: &str, call: Call) {
        if self.rng.random_range(0..100) < self.sh.opts.repeat_pct {
            let host = if host == CTRL {
                let l = self.sh.leader();
                match l.stale {
                    Some(stale) if self.rng.random_bool(0.5) => stale,
                    _ => l.active,
                }
            } else {
                host
            };
            let _ = self.once(host, &call, " (repeat)").await;
        }
    }

    /// Waits a seeded virtual time in `min_ms..=max_ms` (a pod's life, a scheduling gap).
    async fn think(&mut self, min_ms: u64, max_ms: u64) {
        let ms = self.rng.random_range(min_ms..=max_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn model(&self) -> std::sync::MutexGuard<'_, crate::checkers::Model> {
        self.sh.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put_va(&self, node: &str, attached: bool) {
        self.sh.api.put_object(
            Kind::VolumeAttachment,
            "",
            json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
                "metadata": { "name": format!("csi-{}-{node}", self.vol) },
                "spec": { "attacher": DRIVER, "nodeName": node,
                          "source": { "persistentVolumeName": self.vol } },
                "status": { "attached": attached },
            }),
        );
    }

    fn publish_req(&self, node: &str, vctx: &HashMap<String, String>) -> Call {
        Call::Publish(ControllerPublishVolumeRequest {
            volume_id: self.vol.clone(),
            node_id: node.to_string(),
            volume_capability: Some(capability()),
            readonly: false,
            volume_context: vctx.clone(),
            ..Default::default()
        })
    }

    fn unpublish_req(&self, node: &str) -> Call {
        Call::Unpublish(ControllerUnpublishVolumeRequest {
            volume_id: self.vol.clone(),
            node_id: node.to_string(),
            ..Default::default()
        })
    }

    /// ControllerPublish until OK, recorded in the model.
    async fn publish(&mut self, node: &str, vctx: &HashMap<String, String>) -> Reply {
        self.model().begin(&self.vol, node, Op::Publish);
        let r = self.until_ok(CTRL, self.publish_req(node, vctx)).await;
        self.model().ack(&self.vol, node, Op::Publish);
        r
    }

    /// ControllerUnpublish until OK, recorded in the model.
    async fn unpublish(&mut self, node: &str) {
        self.model().begin(&self.vol, node, Op::Unpublish);
        self.until_ok(CTRL, self.unpublish_req(node)).await;
        self.model().ack(&self.vol, node, Op::Unpublish);
    }

    /// One attach of the volume to `other` while it is published elsewhere: the plugin
    /// must refuse it. Whatever the answer, the attach is then withdrawn (as the attacher
    /// does when its VolumeAttachment goes away), unless it was refused outright.
    async fn conflicting_attach(&mut self, other: &str, vctx: &HashMap<String, String>) {
        self.model().begin(&self.vol, other, Op::Publish);
        let r = self
            .once(CTRL, &self.publish_req(other, vctx), " (conflicting)")
            .await;
        match r {
            Ok(_) => {
                self.model().ack(&self.vol, other, Op::Publish);
                self.unpublish(other).await;
            }
            Err(Code::FailedPrecondition) => {
                let mut m = self.model();
                if let Some(p) = m.pairs.get_mut(&(self.vol.clone(), other.to_string())) {
                    p.pending = None;
                }
            }
            Err(_) => self.unpublish(other).await,
        }
    }

    async fn run(mut self) {
        let o = std::sync::Arc::clone(&self.sh.opts);
        let vol = self.vol.clone();
        // The provisioner.
        let create = Call::Create(CreateVolumeRequest {
            name: vol.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: VOLUME_BYTES,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability()],
            ..Default::default()
        });
        let created = self.until_ok(CTRL, create.clone()).await;
        self.model().volume(&vol).created = true;
        self.maybe_repeat(CTRL, create).await;
        self.sh.api.put_object(
            Kind::PersistentVolume,
            "",
            json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": { "name": vol },
                "spec": {
                    "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                    "csi": { "driver": DRIVER, "volumeHandle": vol },
                },
            }),
        );
        let vctx = created.volume_context;
        let mut node_ix = self.rng.random_range(0..o.nodes);
        for round in 0..=o.moves {
            let node = node_name(node_ix);
            // The attacher.
            self.put_va(&node, false);
            let published = self.publish(&node, &vctx).await;
            self.put_va(&node, true);
            self.maybe_repeat(CTRL, self.publish_req(&node, &vctx))
                .await;
            if self.rng.random_range(0..100) < o.conflict_attach_pct {
                let other =
                    node_name((node_ix + 1 + self.rng.random_range(0..o.nodes - 1)) % o.nodes);
                self.conflicting_attach(&other, &vctx).await;
            }
            // The kubelet. The disk is visible to the node's kernel while it exists on
            // the RDS (the network between them is not simulated).
            let nqn = format!("{}{vol}", rds_csi::node::DEFAULT_NQN_PREFIX);
            let kernel = self.sh.kernels[node_ix].clone();
            if kernel.disk(&nqn).is_none() && self.sh.emulator.disk_slots().contains(&vol) {
                kernel.add_disk(&nqn, VOLUME_BYTES as u64);
            }
            let staging =
                format!("{KUBELET_ROOT}/plugins/kubernetes.io/csi/{DRIVER}/{vol}/globalmount");
            let target = format!(
                "{KUBELET_ROOT}/pods/pod-{vol}-{round}/volumes/kubernetes.io~csi/{vol}/mount"
            );
            let stage = Call::Stage(NodeStageVolumeRequest {
                volume_id: vol.clone(),
                publish_context: published.publish_context.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(capability()),
                volume_context: vctx.clone(),
                ..Default::default()
            });
            self.until_ok(&node, stage.clone()).await;
            self.maybe_repeat(&node, stage).await;
            let pod = Call::NodePublish(NodePublishVolumeRequest {
                volume_id: vol.clone(),
                publish_context: published.publish_context.clone(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(capability()),
                volume_context: vctx.clone(),
                ..Default::default()
            });
            self.until_ok(&node, pod.clone()).await;
            self.maybe_repeat(&node, pod).await;
            // The pod runs for a while.
            self.think(1_000, 15_000).await;
            // The pod moves away.
            let unpod = Call::NodeUnpublish(NodeUnpublishVolumeRequest {
                volume_id: vol.clone(),
                target_path: target,
            });
            self.until_ok(&node, unpod.clone()).await;
            self.maybe_repeat(&node, unpod).await;
            let unstage = Call::Unstage(NodeUnstageVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: staging,
            });
            self.until_ok(&node, unstage.clone()).await;
            self.maybe_repeat(&node, unstage).await;
            self.unpublish(&node).await;
            self.maybe_repeat(CTRL, self.unpublish_req(&node)).await;
            self.sh
                .api
                .remove_object(Kind::VolumeAttachment, "", &format!("csi-{vol}-{node}"));
            self.think(0, 3_000).await;
            node_ix = (node_ix + 1 + self.rng.random_range(0..o.nodes - 1)) % o.nodes;
        }
        // The provisioner, on PV release.
        self.model().volume(&vol).deleting = true;
        let delete = Call::Delete(DeleteVolumeRequest {
            volume_id: vol.clone(),
            ..Default::default()
        });
        self.until_ok(CTRL, delete.clone()).await;
        {
            let mut m = self.model();
            let v = m.volume(&vol);
            v.deleting = false;
            v.deleted = true;
        }
        self.maybe_repeat(CTRL, delete).await;
        self.sh.api.remove_object(Kind::PersistentVolume, "", &vol);
        self.sh.trace.log("co", format!("{vol} done"));
    }
}

/// The CO client: every volume's script, concurrently, until all are done.
pub async fn run(sh: Shared) -> turmoil::Result {
    let mut tasks = Vec::new();
    for i in 0..sh.opts.volumes {
        let script = Script {
            sh: sh.clone(),
            rng: StdRng::seed_from_u64(sh.opts.seed.wrapping_mul(31).wrapping_add(i as u64)),
            vol: format!("pvc-sim-{i}"),
        };
        tasks.push(tokio::spawn(script.run()));
    }
    for t in tasks {
        t.await?;
    }
    sh.trace.log("co", "workload complete");
    Ok(())
}
