//! The CO: a client host that drives the plugin the way the Kubernetes sidecars and the
//! kubelet do, over CSI on turmoil TCP.
//!
//! Per volume, concurrently: the claim arrives at a seeded time in the first half of the
//! chaos phase; CreateVolume until OK (same name: the provisioner), the PV object, then
//! `moves + 1` rounds of: a VolumeAttachment and ControllerPublish until OK (the attacher),
//! NodeStage and NodePublish until OK (the kubelet), sometimes a repeat of a call that
//! succeeded, sometimes a conflicting ControllerPublish of the volume to another node, then
//! NodeUnpublish, NodeUnstage and ControllerUnpublish until OK and the VolumeAttachment
//! removed (the pod moves to another live node); finally DeleteVolume until OK and the PV
//! removed. While a pod runs the kubelet polls NodeGetVolumeStats; a volume reported
//! abnormal gets its pod restarted on the node (NodeUnpublish, then NodePublish of the new
//! pod, which repairs a stale staging mount). Some volumes' StorageClass sets `ctrlLossTmo`.
//! When the node's machine is lost mid-round, its pod goes with it and the attach/detach
//! controller force-detaches [`FORCE_DETACH_SECS`] after the loss; when the node is
//! partitioned while alive, the same happens [`FORCE_DETACH_SECS`] after it stopped
//! reporting (unless it heals first), its kubelet keeps the mount, and cleans up once the
//! partition heals.
//!
//! The cluster's other habits, each a seeded knob: the provisioner's DeleteVolume racing
//! the last detach (PVC protection ends when the pod is gone, not when the detach is done);
//! an attacher that lost its state re-issuing ControllerPublish/Unpublish while the first
//! still runs (on the other replica during a failover); operators following runbooks —
//! removing a stuck VolumeAttachment's finalizer by hand (the detach never reaches the
//! driver), deleting a PV by hand and restoring it from a backup (stale annotations); and
//! the external-attacher's reconciliation, which compares ListVolumes' published nodes
//! with the VolumeAttachments and re-attaches what the driver says is missing — every
//! ListVolumes and ControllerGetVolume answer is judged against the durable records.
//!
//! Every call and its outcome goes to the trace; acknowledgements go to the
//! [`Model`](crate::model::Model) the checkers judge, and an answer the spec rules out
//! for a valid, repeated request (ALREADY_EXISTS to a same-name CreateVolume, NOT_FOUND to
//! a DeleteVolume, ...) is reported as a violation at once.
//!
//! Each volume's choices come from its own seeded RNG, so the schedule of one volume does
//! not shift another's draws.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use rand::{RngExt, SeedableRng, rngs::StdRng};
use rds_csi::kube::fake_api::Kind;
use rds_csi::proto::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerGetVolumeRequest,
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest, CreateSnapshotRequest,
    CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest, ListVolumesRequest,
    NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
    controller_client::ControllerClient,
    node_client::NodeClient,
    volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode},
};
use serde_json::json;
use tonic::{Code, Status};

use crate::model::Op;
use crate::options::{FORCE_DETACH_SECS, VM_PREFIX};
use crate::world::{
    CSI_PORT, DRIVER, ORPHAN_SWEEP, REISSUE_PORT, RESYNC, Shared, csi_channel, node_name,
    staging_path, target_path,
};

/// Stands for the leading controller replica.
const CTRL: &str = "controller*";

/// Size of every volume.
pub const VOLUME_BYTES: i64 = 1 << 30;

/// How often the kubelet polls the stats of a running pod's volume.
pub const STATS_EVERY: Duration = Duration::from_secs(5);

/// The `ctrlLossTmo` of the StorageClass some volumes use (seconds).
pub const FINITE_CTRL_LOSS_TMO: i32 = 30;

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
    Expand(ControllerExpandVolumeRequest),
    NodeExpand(NodeExpandVolumeRequest),
    Snapshot(CreateSnapshotRequest),
    DeleteSnapshot(DeleteSnapshotRequest),
    Stats(NodeGetVolumeStatsRequest),
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
            Call::Expand(_) => "ControllerExpand",
            Call::NodeExpand(_) => "NodeExpand",
            Call::Snapshot(_) => "CreateSnapshot",
            Call::DeleteSnapshot(_) => "DeleteSnapshot",
            Call::Stats(_) => "NodeGetVolumeStats",
        }
    }
}

/// What an OK answer carried that the CO needs later.
#[derive(Debug, Default)]
struct Reply {
    volume_context: HashMap<String, String>,
    publish_context: HashMap<String, String>,
    snapshot_id: String,
    /// NodeGetVolumeStats: the volume is abnormal.
    abnormal: bool,
}

async fn send(host: &str, port: u16, call: Call, timeout: Duration) -> Result<Reply, Status> {
    let channel = csi_channel(host.to_string(), port, timeout)
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
        Call::Expand(r) => c
            .controller_expand_volume(r)
            .await
            .map(|_| Reply::default())?,
        Call::NodeExpand(r) => n.node_expand_volume(r).await.map(|_| Reply::default())?,
        Call::Snapshot(r) => Reply {
            snapshot_id: c
                .create_snapshot(r)
                .await?
                .into_inner()
                .snapshot
                .map(|s| s.snapshot_id)
                .unwrap_or_default(),
            ..Default::default()
        },
        Call::DeleteSnapshot(r) => c.delete_snapshot(r).await.map(|_| Reply::default())?,
        Call::Stats(r) => Reply {
            abnormal: n
                .node_get_volume_stats(r)
                .await?
                .into_inner()
                .volume_condition
                .is_some_and(|c| c.abnormal),
            ..Default::default()
        },
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

/// A KubeVirt VM disk: a PVC `ReadWriteMany` + `volumeMode: Block`.
fn vm_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A pod using the volume on a node: its NodePublish (the target path included), the round
/// it belongs to, and how often it was restarted.
struct Pod {
    publish: NodePublishVolumeRequest,
    round: usize,
    restarts: u32,
}

/// The volume's node was lost (its machine gone, Node object deleted) or stopped
/// reporting (partitioned while alive) at this virtual time while the volume was attached
/// to it or on its way there.
#[derive(Debug, Clone, Copy)]
struct Lost {
    at: Duration,
    /// The node is alive behind a partition: its kubelet keeps the mount.
    alive: bool,
}

/// The answer `code` to `call` is one the spec rules out for the CO's requests, which are
/// always valid and always repeat the same parameters: a description, or `None`.
fn forbidden(call: &Call, code: Code) -> Option<&'static str> {
    match (call, code) {
        // CSI CreateVolume: "If a volume corresponding to the specified volume name
        // already exists, is accessible from accessibility_requirements, and is compatible
        // with the specified capacity_range, volume_capabilities, parameters and
        // mutable_parameters in the CreateVolumeRequest, the Plugin MUST reply 0 OK with
        // the corresponding CreateVolumeResponse." The same holds for every repeat.
        (_, Code::AlreadyExists) => Some("a repeat with the same parameters must succeed"),
        (_, Code::InvalidArgument) => Some("the request is valid"),
        // CSI DeleteVolume: "If a volume corresponding to the specified volume_id does not
        // exist or the artifacts associated with the volume do not exist anymore, the
        // Plugin MUST reply 0 OK."
        (Call::Delete(_), Code::NotFound) => Some("deleting a missing volume must succeed"),
        // CSI DeleteSnapshot: "If a snapshot corresponding to the specified snapshot_id
        // does not exist or the artifacts associated with the snapshot do not exist
        // anymore, the Plugin MUST reply 0 OK."
        (Call::DeleteSnapshot(_), Code::NotFound) => {
            Some("deleting a missing snapshot must succeed")
        }
        // CSI ControllerUnpublishVolume: "If the volume corresponding to the volume_id or
        // the node corresponding to node_id cannot be found by the Plugin and the volume
        // can be safely regarded as ControllerUnpublished from the node, the plugin SHOULD
        // return 0 OK."
        (Call::Unpublish(_), Code::NotFound) => Some("unpublishing what is gone must succeed"),
        (Call::Unstage(_) | Call::NodeUnpublish(_), Code::NotFound) => {
            Some("tearing down what is not there must succeed")
        }
        // The kubelet asks only about a volume it published at that path: a broken volume
        // is reported abnormal, never as missing.
        (Call::Stats(_), Code::NotFound) => Some("the volume is published at this path"),
        _ => None,
    }
}

/// The workload of one volume.
struct Script {
    sh: Shared,
    rng: StdRng,
    vol: String,
    /// The size last acknowledged.
    size: u64,
    /// The pod's target path of the current round (what a kubelet must clean up).
    target: Option<String>,
    /// A kubelet cleaning up after a partition: node index and its task.
    cleanup: Option<(usize, tokio::task::JoinHandle<()>)>,
    /// The provisioner's DeleteVolume, when it raced the last detach.
    deleting: Option<tokio::task::JoinHandle<()>>,
    /// The PV as a backup made during the last attach holds it (an operator may restore it).
    backup: Option<serde_json::Value>,
    /// A VM disk ([`vm_capability`]) rather than a single-node volume.
    vm: bool,
}

impl Script {
    /// The volume's capability.
    fn cap(&self) -> VolumeCapability {
        if self.vm {
            vm_capability()
        } else {
            capability()
        }
    }

    /// One attempt of `call` on `host` (`CTRL`: the leading controller replica), traced.
    async fn once(&mut self, host: &str, call: &Call, note: &str) -> Result<Reply, Code> {
        self.once_on(host, CSI_PORT, call, note).await
    }

    /// One attempt of `call` on `host`:`port`, traced.
    async fn once_on(
        &mut self,
        host: &str,
        port: u16,
        call: &Call,
        note: &str,
    ) -> Result<Reply, Code> {
        let host = if host == CTRL {
            self.controller()
        } else {
            host
        };
        let name = call.name();
        let timeout = Duration::from_millis(self.sh.opts.rpc_timeout_ms);
        let r = send(host, port, call.clone(), timeout).await;
        let outcome = match &r {
            Ok(reply) if reply.abnormal => "OK abnormal".to_string(),
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.sh.trace.log(
            "co",
            format!("{name} {} @{host}{note} -> {outcome}", self.vol),
        );
        if let Err(status) = &r
            && let Some(why) = forbidden(call, status.code())
        {
            self.sh.co_violation(format!(
                "{name} {} @{host}{note} answered {:?} ({why}): {}",
                self.vol,
                status.code(),
                status.message()
            ));
        }
        r.map_err(|s| s.code())
    }

    /// Sleeps the seeded backoff before attempt `attempt + 1` (the sidecars never give up).
    async fn backoff(&mut self, attempt: u32) {
        let delay = (Duration::from_millis(200) * 2u32.saturating_pow(attempt.min(5)))
            .min(Duration::from_secs(5));
        let jitter = self.rng.random_range(500..=1000u32);
        tokio::time::sleep(delay * jitter / 1000).await;
    }

    /// `call` until OK, with seeded exponential backoff.
    async fn until_ok(&mut self, host: &str, call: Call) -> Reply {
        let mut attempt = 0;
        loop {
            if let Ok(r) = self.once(host, &call, "").await {
                return r;
            }
            self.backoff(attempt).await;
            attempt += 1;
        }
    }

    /// Whether node `ix` is still the machine of generation `generation` and reporting;
    /// if not, when that machine was lost — or, for a node partitioned while alive, when
    /// it stopped reporting, once the attach/detach controller gives up on it
    /// ([`FORCE_DETACH_SECS`] later; until then the calls to it just fail and are retried).
    fn alive(&self, ix: usize, generation: u64) -> Result<(), Lost> {
        let life = self.sh.node_life(ix);
        if life.generation != generation {
            let at = usize::try_from(generation)
                .ok()
                .and_then(|g| life.lost_at.get(g).copied())
                .unwrap_or_default();
            return Err(Lost { at, alive: false });
        }
        if let Some(since) = self.sh.partitioned_since(ix) {
            let now = self.sh.trace.time().now();
            if now >= since + Duration::from_secs(FORCE_DETACH_SECS) {
                return Err(Lost {
                    at: since,
                    alive: true,
                });
            }
        }
        Ok(())
    }

    /// `call` until OK on `host` (`CTRL` or a node), as long as node `ix` stays the machine
    /// of `generation` (the kubelet and the attacher stop when the node is gone).
    async fn until_ok_on(
        &mut self,
        host: &str,
        ix: usize,
        generation: u64,
        call: Call,
    ) -> Result<Reply, Lost> {
        let mut attempt = 0;
        loop {
            self.alive(ix, generation)?;
            if let Ok(r) = self.once(host, &call, "").await {
                return Ok(r);
            }
            self.backoff(attempt).await;
            attempt += 1;
        }
    }

    /// The controller replica an attempt reaches: the leader, or during a failover, as
    /// often, the former leader (whose sidecars still work their queues: both replicas
    /// see calls for the same volumes).
    fn controller(&mut self) -> &'static str {
        let l = self.sh.leader();
        match l.stale {
            Some(stale) if self.rng.random_bool(0.5) => stale,
            _ => l.active,
        }
    }

    /// Sometimes repeats a call that succeeded (a sidecar unsure of its outcome).
    async fn maybe_repeat(&mut self, host: &str, call: Call) {
        if self.rng.random_range(0..100) < self.sh.opts.repeat_pct {
            let _ = self.once(host, &call, " (repeat)").await;
        }
    }

    /// Waits a seeded virtual time in `min_ms..=max_ms` (a pod's life, a scheduling gap).
    async fn think(&mut self, min_ms: u64, max_ms: u64) {
        let ms = self.rng.random_range(min_ms..=max_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn model(&self) -> std::sync::MutexGuard<'_, crate::model::Model> {
        self.sh.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the acknowledgement of `op` on (volume, node `ix`) if the node is still the
    /// machine of `generation` (an answer about a lost machine claims nothing).
    fn ack(&self, ix: usize, generation: u64, op: Op) -> Result<(), Lost> {
        self.alive(ix, generation)?;
        self.model().ack(&self.vol, &node_name(ix), op);
        Ok(())
    }

    fn put_va(&self, node: &str, attached: bool) {
        self.sh.api.put_object(
            Kind::VolumeAttachment,
            "",
            json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
                "metadata": { "name": va_name(&self.vol, node) },
                "spec": { "attacher": DRIVER, "nodeName": node,
                          "source": { "persistentVolumeName": self.vol } },
                "status": { "attached": attached },
            }),
        );
    }

    fn remove_va(&self, node: &str) {
        self.sh
            .api
            .remove_object(Kind::VolumeAttachment, "", &va_name(&self.vol, node));
    }

    fn publish_req(&self, node: &str, vctx: &HashMap<String, String>) -> Call {
        Call::Publish(ControllerPublishVolumeRequest {
            volume_id: self.vol.clone(),
            node_id: node.to_string(),
            volume_capability: Some(self.cap()),
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

    /// ControllerPublish to node `ix` until OK, recorded in the model; given up when the
    /// node's machine is lost.
    async fn publish(
        &mut self,
        ix: usize,
        generation: u64,
        vctx: &HashMap<String, String>,
    ) -> Result<Reply, Lost> {
        let node = node_name(ix);
        self.model().begin(&self.vol, &node, Op::Publish);
        let call = self.publish_req(&node, vctx);
        // Found by the simulation (seed 2723): the node's machine lost while its publish
        // ran cleared the pair's pending call, and the VM disk's fence was judged before
        // the still running publish moved it to the migration's target.
        self.model().running(&self.vol, &node, true);
        let r = match self.maybe_reissue(&node, &call).await {
            Some(r) => Ok(r),
            None => self.until_ok_on(CTRL, ix, generation, call).await,
        };
        self.model().running(&self.vol, &node, false);
        let r = r?;
        self.ack(ix, generation, Op::Publish)?;
        Ok(r)
    }

    /// ControllerUnpublish from `node` until OK, recorded in the model (the attacher
    /// detaches whether or not the node is still there).
    async fn unpublish(&mut self, node: &str) {
        self.model().begin(&self.vol, node, Op::Unpublish);
        let call = self.unpublish_req(node);
        if self.maybe_reissue(node, &call).await.is_none() {
            self.until_ok(CTRL, call).await;
        }
        self.model().ack(&self.vol, node, Op::Unpublish);
    }

    /// Sometimes the attacher loses its state while `call` (on the volume and `node`)
    /// runs: the first call keeps running on the controller, unanswered to anyone, and the
    /// attacher sends it again — to the same replica or, during a failover, to either —
    /// as a call of its own (the re-issue port). Its answer when it succeeded; else the
    /// caller goes on as usual.
    async fn maybe_reissue(&mut self, node: &str, call: &Call) -> Option<Reply> {
        if self.rng.random_range(0..100) >= self.sh.opts.reissue_pct {
            return None;
        }
        let host = self.controller();
        let timeout = Duration::from_millis(self.sh.opts.rpc_timeout_ms);
        let (sh, vol, node_name) = (self.sh.clone(), self.vol.clone(), node.to_string());
        let first = call.clone();
        self.model().outstanding(&vol, &node_name, true);
        let running = tokio::spawn(async move {
            let r = send(host, CSI_PORT, first.clone(), timeout).await;
            let outcome = match &r {
                Ok(_) => "OK".to_string(),
                Err(s) => format!("{:?}", s.code()),
            };
            sh.trace.log(
                "co",
                format!(
                    "{} {vol} @{host} (first, its attacher gone) -> {outcome}",
                    first.name()
                ),
            );
            sh.model
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .outstanding(&vol, &node_name, false);
        });
        // Re-issued while the first still runs (if it is already done, the attacher had
        // its answer).
        let wait = self.rng.random_range(1..=100);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if running.is_finished() {
            return None;
        }
        self.once_on(CTRL, REISSUE_PORT, call, " (re-issued)")
            .await
            .ok()
    }

    /// A schedulable node (up, reporting) other than `ix`, if there is one, else any.
    fn pick_node(&mut self, ix: usize) -> usize {
        let live = match self.sh.schedulable_nodes() {
            up if up.is_empty() => self.sh.live_nodes(),
            up => up,
        };
        let others: Vec<usize> = live.iter().copied().filter(|&n| n != ix).collect();
        let from = if others.is_empty() { live } else { others };
        from[self.rng.random_range(0..from.len())]
    }

    /// One attach of the volume to node `ix` while it is published elsewhere: the plugin
    /// must refuse it. Whatever the answer, the attach is then withdrawn (as the attacher
    /// does when its VolumeAttachment goes away), unless it was refused outright.
    async fn conflicting_attach(&mut self, ix: usize, vctx: &HashMap<String, String>) {
        let other = node_name(ix);
        let generation = self.sh.node_life(ix).generation;
        self.put_va(&other, false);
        self.model().begin(&self.vol, &other, Op::Publish);
        let r = self
            .once(CTRL, &self.publish_req(&other, vctx), " (conflicting)")
            .await;
        match r {
            Ok(_) => {
                let _ = self.ack(ix, generation, Op::Publish);
                self.unpublish(&other).await;
            }
            Err(Code::FailedPrecondition) => {
                let mut m = self.model();
                if let Some(p) = m.pairs.get_mut(&(self.vol.clone(), other.clone())) {
                    p.pending = None;
                }
            }
            Err(_) => self.unpublish(&other).await,
        }
        self.remove_va(&other);
    }

    /// One round on node `ix`: the attacher attaches, the kubelet stages and publishes to
    /// a pod, the pod runs, then everything is torn down in reverse and the attachment
    /// detached. `Err` if the node's machine is lost on the way (its pod goes with it), or
    /// the node stopped reporting long enough to be force-detached. In the `last` round the
    /// provisioner may send DeleteVolume as soon as the pod is gone.
    async fn round(
        &mut self,
        ix: usize,
        generation: u64,
        round: usize,
        last: bool,
        vctx: &HashMap<String, String>,
    ) -> Result<(), Lost> {
        let o = std::sync::Arc::clone(&self.sh.opts);
        let vol = self.vol.clone();
        let node = node_name(ix);
        self.target = None;
        // The attacher.
        self.put_va(&node, false);
        let published = self.publish(ix, generation, vctx).await?;
        self.put_va(&node, true);
        // A backup of the PV now holds this attachment (an operator may restore it later).
        self.backup = self.sh.api.object(Kind::PersistentVolume, "", &vol);
        self.maybe_repeat(CTRL, self.publish_req(&node, vctx)).await;
        if self.rng.random_range(0..100) < o.conflict_attach_pct {
            let other = self.pick_node(ix);
            if other != ix {
                self.conflicting_attach(other, vctx).await;
            }
        }
        self.alive(ix, generation)?;
        // The kubelet. The disk is visible to the node's kernel while it exists on the
        // RDS; whether the kernel may connect is the RDS's allow lists' (the data path).
        self.show_disk(ix);
        let staging = staging_path(&vol);
        let target = target_path(&vol, &format!("pod-{vol}-{round}"));
        let stage = Call::Stage(NodeStageVolumeRequest {
            volume_id: vol.clone(),
            publish_context: published.publish_context.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(capability()),
            volume_context: vctx.clone(),
            ..Default::default()
        });
        self.until_ok_on(&node, ix, generation, stage.clone())
            .await?;
        self.maybe_repeat(&node, stage).await;
        self.target = Some(target.clone());
        let mut pod = Pod {
            publish: NodePublishVolumeRequest {
                volume_id: vol.clone(),
                publish_context: published.publish_context.clone(),
                staging_target_path: staging.clone(),
                target_path: target,
                volume_capability: Some(capability()),
                volume_context: vctx.clone(),
                ..Default::default()
            },
            round,
            restarts: 0,
        };
        let publish = Call::NodePublish(pod.publish.clone());
        self.until_ok_on(&node, ix, generation, publish.clone())
            .await?;
        self.maybe_repeat(&node, publish).await;
        self.reattach_if_asked(ix, generation, vctx).await?;
        if self.rng.random_range(0..100) < o.expand_pct {
            self.expand(ix, generation, &mut pod).await?;
        }
        // The pod runs for a while (and may be restarted on the node).
        self.pod_runs(ix, generation, &mut pod).await?;
        self.reattach_if_asked(ix, generation, vctx).await?;
        let target = pod.publish.target_path;
        // The pod moves away.
        let unpod = Call::NodeUnpublish(NodeUnpublishVolumeRequest {
            volume_id: vol.clone(),
            target_path: target.clone(),
        });
        self.until_ok_on(&node, ix, generation, unpod.clone())
            .await?;
        self.maybe_repeat(&node, unpod).await;
        // The pod is gone: PVC protection lets the provisioner delete the PV now, while
        // the kubelet still unstages and the attacher still detaches.
        if last && self.rng.random_range(0..100) < o.delete_race_pct {
            self.sh.trace.log(
                "co",
                format!("{vol}: pod gone, the provisioner deletes while the detach is under way"),
            );
            let child = self.child();
            self.deleting = Some(tokio::spawn(child.delete_volume()));
            // The kubelet unstages once its volume manager notices no pod uses it.
            self.think(100, 3_000).await;
        }
        let unstage = Call::Unstage(NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging,
        });
        self.until_ok_on(&node, ix, generation, unstage.clone())
            .await?;
        self.maybe_repeat(&node, unstage).await;
        self.target = None;
        if self.rng.random_range(0..100) < o.operator_pct && self.rng.random_bool(0.5) {
            // The detach is stuck; a runbook says to remove the VolumeAttachment's
            // finalizer by hand: the detach never reaches the driver.
            self.sh.trace.log(
                "co",
                format!(
                    "operator removes the finalizer of {vol}'s VolumeAttachment on {node}: \
                     the detach never reaches the driver"
                ),
            );
            self.model().operator_changed(&vol, &node);
            self.remove_va(&node);
            return Ok(());
        }
        // The attacher detaches (the node may be lost meanwhile: the detach goes on).
        self.unpublish(&node).await;
        self.maybe_repeat(CTRL, self.unpublish_req(&node)).await;
        self.remove_va(&node);
        Ok(())
    }

    /// The external-attacher's reconciliation found this attachment missing from
    /// ListVolumes: it re-attaches (ControllerPublish again, until OK).
    async fn reattach_if_asked(
        &mut self,
        ix: usize,
        generation: u64,
        vctx: &HashMap<String, String>,
    ) -> Result<(), Lost> {
        let node = node_name(ix);
        if !self.sh.take_reattach(&self.vol, &node) {
            return Ok(());
        }
        self.sh.trace.log(
            "co",
            format!(
                "attacher re-attaches {} to {node} (missing from ListVolumes)",
                self.vol
            ),
        );
        self.publish(ix, generation, vctx).await.map(|_| ())
    }

    /// A script for the same volume with its own seeded RNG, for a task of its own (the
    /// provisioner racing the attacher, a kubelet cleaning up).
    fn child(&mut self) -> Script {
        Script {
            sh: self.sh.clone(),
            rng: StdRng::seed_from_u64(self.rng.random()),
            vol: self.vol.clone(),
            size: self.size,
            target: None,
            cleanup: None,
            deleting: None,
            backup: None,
            vm: self.vm,
        }
    }

    /// The kubelet of node `ix`, cut off while its volume was force-detached and moved,
    /// kept the mount; once the partition heals it learns the pod is gone and unmounts
    /// and unstages (unless its machine was lost meanwhile). Runs as a task of its own.
    fn clean_up_after_partition(&mut self, ix: usize, generation: u64) {
        let target = self.target.take();
        let mut kubelet = self.child();
        let handle = tokio::spawn(async move {
            while kubelet.sh.partitioned_since(ix).is_some() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let node = node_name(ix);
            let vol = kubelet.vol.clone();
            kubelet.sh.trace.log(
                "co",
                format!("{node}: kubelet back, cleans up {vol} (its pod is gone)"),
            );
            if let Some(target) = target {
                let unpod = Call::NodeUnpublish(NodeUnpublishVolumeRequest {
                    volume_id: vol.clone(),
                    target_path: target,
                });
                let _ = kubelet.until_ok_on(&node, ix, generation, unpod).await;
            }
            let unstage = Call::Unstage(NodeUnstageVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: staging_path(&vol),
            });
            let _ = kubelet.until_ok_on(&node, ix, generation, unstage).await;
        });
        self.cleanup = Some((ix, handle));
    }

    /// Waits for a kubelet's cleanup on node `ix` (or on any node: `None`), if one runs.
    async fn cleaned_up(&mut self, ix: Option<usize>) {
        if let Some((at, _)) = &self.cleanup
            && ix.is_none_or(|ix| ix == *at)
            && let Some((_, handle)) = self.cleanup.take()
        {
            let _ = handle.await;
        }
    }

    /// Between rounds, sometimes an operator deletes the PV by hand and restores it from a
    /// backup made while an earlier attachment held it: stale annotations the driver must
    /// neither trust to attach twice nor let block the volume.
    async fn maybe_restore_pv(&mut self) {
        if self.rng.random_range(0..100) >= self.sh.opts.operator_pct || self.rng.random_bool(0.5) {
            return;
        }
        let Some(backup) = self.backup.take() else {
            return;
        };
        let vol = self.vol.clone();
        self.sh.trace.log(
            "co",
            format!("operator deletes the PV of {vol} by hand and restores it from a backup"),
        );
        self.sh.api.remove_object(Kind::PersistentVolume, "", &vol);
        self.think(0, 2_000).await;
        self.sh.api.put_object(Kind::PersistentVolume, "", backup);
        for node in self.sh.stored_holders(&vol).unwrap_or_default() {
            self.model().operator_changed(&vol, &node);
        }
    }

    /// The provisioner, on PV release: DeleteVolume until OK, then the PV removed.
    async fn delete_volume(mut self) {
        let vol = self.vol.clone();
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
    }

    /// The pod runs on node `ix` for a seeded while, the kubelet polling its volume's stats
    /// ([`Self::check_pod`]).
    async fn pod_runs(&mut self, ix: usize, generation: u64, pod: &mut Pod) -> Result<(), Lost> {
        let time = self.sh.trace.time().clone();
        let now = || time.now();
        let end = now() + Duration::from_millis(self.rng.random_range(1_000..=15_000));
        while now() < end {
            tokio::time::sleep(STATS_EVERY.min(end - now())).await;
            self.check_pod(ix, generation, pod).await?;
        }
        Ok(())
    }

    /// The kubelet polls the stats of the pod's volume; when the volume is reported
    /// abnormal the pod is restarted on the node: the old pod's NodeUnpublish, then the new
    /// pod's NodePublish (which repairs a stale staging mount).
    async fn check_pod(&mut self, ix: usize, generation: u64, pod: &mut Pod) -> Result<(), Lost> {
        self.alive(ix, generation)?;
        let node = node_name(ix);
        let stats = Call::Stats(NodeGetVolumeStatsRequest {
            volume_id: self.vol.clone(),
            volume_path: pod.publish.target_path.clone(),
            staging_target_path: pod.publish.staging_target_path.clone(),
        });
        if !self.once(&node, &stats, "").await.is_ok_and(|r| r.abnormal) {
            return Ok(());
        }
        pod.restarts += 1;
        let old = Call::NodeUnpublish(NodeUnpublishVolumeRequest {
            volume_id: self.vol.clone(),
            target_path: pod.publish.target_path.clone(),
        });
        self.until_ok_on(&node, ix, generation, old).await?;
        let name = format!("pod-{}-{}-{}", self.vol, pod.round, pod.restarts);
        pod.publish.target_path = target_path(&self.vol, &name);
        self.target = Some(pod.publish.target_path.clone());
        let new = Call::NodePublish(pod.publish.clone());
        self.until_ok_on(&node, ix, generation, new).await?;
        Ok(())
    }

    /// The node's kernel sees the disk, at its current size, while it exists on the RDS
    /// (the network between them is not simulated).
    fn show_disk(&self, ix: usize) {
        let nqn = format!(
            "{}{}",
            rds_csi::types::defaults::DEFAULT_NQN_PREFIX,
            self.vol
        );
        let kernel = &self.sh.kernels[ix];
        match kernel.disk(&nqn) {
            Some(d) if d.size != self.size => kernel.resize_disk(&nqn, self.size),
            Some(_) => {}
            None if self.sh.emulator.disk_slots().contains(&self.vol) => {
                kernel.add_disk(&nqn, self.size);
            }
            None => {}
        }
    }

    /// The resizer grows the volume by 1 GiB while a pod on node `ix` uses it
    /// (ControllerExpandVolume until OK), then the kubelet grows the filesystem
    /// (NodeExpandVolume until OK).
    async fn expand(&mut self, ix: usize, generation: u64, pod: &mut Pod) -> Result<(), Lost> {
        let size = self.size + (1 << 30);
        let range = Some(CapacityRange {
            required_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            limit_bytes: 0,
        });
        let expand = Call::Expand(ControllerExpandVolumeRequest {
            volume_id: self.vol.clone(),
            capacity_range: range,
            volume_capability: Some(capability()),
            ..Default::default()
        });
        self.until_ok(CTRL, expand.clone()).await;
        self.size = size;
        self.model().volume(&self.vol).size = size;
        self.maybe_repeat(CTRL, expand).await;
        self.show_disk(ix);
        let node = node_name(ix);
        let mut attempt = 0;
        loop {
            self.alive(ix, generation)?;
            let grow = Call::NodeExpand(NodeExpandVolumeRequest {
                volume_id: self.vol.clone(),
                volume_path: pod.publish.target_path.clone(),
                capacity_range: range,
                staging_target_path: pod.publish.staging_target_path.clone(),
                volume_capability: Some(capability()),
                ..Default::default()
            });
            if self.once(&node, &grow, "").await.is_ok() {
                self.maybe_repeat(&node, grow).await;
                return Ok(());
            }
            // Meanwhile the kubelet keeps polling the volume (a stale one cannot grow
            // until its pod is restarted).
            self.check_pod(ix, generation, pod).await?;
            self.backoff(attempt).await;
            attempt += 1;
        }
    }

    /// The snapshotter takes snapshot `n` of the volume (CreateSnapshot until OK); its id.
    async fn snapshot(&mut self, n: usize) -> String {
        let call = Call::Snapshot(CreateSnapshotRequest {
            source_volume_id: self.vol.clone(),
            // A name that is no RDS slot (as a CO other than Kubernetes may send): the
            // snapshot's id is derived from it and the name recorded on the RDS.
            name: format!("snapshot #{n} of {}", self.vol),
            ..Default::default()
        });
        // The snapshotter's VolumeSnapshotContent exists before CreateSnapshot is sent and
        // gets the handle once it is answered (when the reconcilers run: they judge it).
        let content = format!("snapcontent-{}-{n}", self.vol);
        self.put_vsc(&content, None);
        let id = self.until_ok(CTRL, call.clone()).await.snapshot_id;
        self.model().snapshot(&id).created = true;
        self.put_vsc(&content, Some(&id));
        self.maybe_repeat(CTRL, call).await;
        id
    }

    /// The VolumeSnapshotContent `name` of a snapshot of this volume, with its handle once
    /// known (only when the reconcilers run).
    fn put_vsc(&self, name: &str, handle: Option<&str>) {
        if !self.sh.opts.reconcilers {
            return;
        }
        let mut vsc = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": { "name": name },
            "spec": { "driver": DRIVER, "deletionPolicy": "Delete",
                      "source": { "volumeHandle": self.vol } },
        });
        if let Some(h) = handle {
            vsc["status"] = json!({ "snapshotHandle": h, "readyToUse": true });
        }
        self.sh.api.put_object(Kind::VolumeSnapshotContent, "", vsc);
    }

    /// The VolumeSnapshotContent of snapshot `id`, deleted.
    fn remove_vsc(&self, id: &str) {
        let vscs = self.sh.api.objects(Kind::VolumeSnapshotContent);
        for vsc in vscs.iter().filter(|c| c["status"]["snapshotHandle"] == id) {
            if let Some(name) = vsc["metadata"]["name"].as_str() {
                self.sh
                    .api
                    .remove_object(Kind::VolumeSnapshotContent, "", name);
            }
        }
    }

    /// A CO that forgets snapshot `id`: its VolumeSnapshotContent is deleted without a
    /// DeleteSnapshot (an orphan for the reconciler).
    fn forget_snapshot(&mut self, id: &str) {
        self.model().snapshot(id).abandoned = true;
        self.remove_vsc(id);
        self.sh.trace.log(
            "co",
            format!("{id} forgotten: VolumeSnapshotContent deleted, no DeleteSnapshot"),
        );
    }

    /// The snapshotter deletes snapshot `id` (DeleteSnapshot until OK).
    async fn delete_snapshot(&mut self, id: &str) {
        self.model().snapshot(id).deleting = true;
        let call = Call::DeleteSnapshot(DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        });
        self.until_ok(CTRL, call.clone()).await;
        {
            let mut m = self.model();
            let s = m.snapshot(id);
            s.deleting = false;
            s.deleted = true;
        }
        self.remove_vsc(id);
        self.maybe_repeat(CTRL, call).await;
    }

    /// The attach/detach controller gives up on the lost node's unmount and force-detaches
    /// FORCE_DETACH_SECS after the loss: ControllerUnpublish until OK, VA removed.
    async fn force_detach(&mut self, node: &str, lost: Lost) {
        let now = self.sh.trace.time().now();
        let at = lost.at + Duration::from_secs(FORCE_DETACH_SECS);
        self.sh.trace.log(
            "co",
            format!(
                "{} on {node}: {} at {:.3}s, force-detach at {:.3}s",
                self.vol,
                if lost.alive {
                    "node stopped reporting"
                } else {
                    "machine lost"
                },
                lost.at.as_secs_f64(),
                at.as_secs_f64()
            ),
        );
        tokio::time::sleep(at.saturating_sub(now)).await;
        if self.sh.opts.reconcilers && !lost.alive {
            // The VolumeAttachment is being deleted (its finalizer holds it) and the
            // attacher gets to it a while later: the attachment reconciler may clear the
            // record of the lost machine (its Node is gone) first.
            self.mark_va_deleting(node);
            self.think(0, 30_000).await;
        }
        self.unpublish(node).await;
        self.maybe_repeat(CTRL, self.unpublish_req(node)).await;
        self.remove_va(node);
    }

    /// The VolumeAttachment of this volume on `node` gets its deletionTimestamp.
    fn mark_va_deleting(&self, node: &str) {
        let name = va_name(&self.vol, node);
        if let Some(mut va) = self.sh.api.object(Kind::VolumeAttachment, "", &name) {
            va["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            self.sh.api.put_object(Kind::VolumeAttachment, "", va);
        }
    }

    async fn run(mut self) {
        let o = std::sync::Arc::clone(&self.sh.opts);
        let vol = self.vol.clone();
        // Claims arrive over the chaos phase, so creates and deletes meet faults too.
        self.think(0, o.chaos_secs * 1000 / 2).await;
        // The provisioner, with the volume's StorageClass parameters.
        let ctrl_loss_tmo = (self.rng.random_range(0..100) < o.finite_ctrl_loss_pct)
            .then_some(FINITE_CTRL_LOSS_TMO);
        let create = Call::Create(CreateVolumeRequest {
            name: vol.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: VOLUME_BYTES,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability()],
            parameters: ctrl_loss_tmo
                .map(|t| [("ctrlLossTmo".to_string(), t.to_string())].into())
                .unwrap_or_default(),
            ..Default::default()
        });
        self.model().volume(&vol).ctrl_loss_tmo = ctrl_loss_tmo;
        // Whether (and how) the CO leaves an orphan behind: 0 gives up after one
        // CreateVolume, 1 deletes the PV by hand at the end, 2 forgets the snapshots.
        let abandon = (o.abandon_pct > 0 && self.rng.random_range(0..100) < o.abandon_pct)
            .then(|| self.rng.random_range(0..3u32));
        self.model().creating.insert(vol.clone());
        if abandon == Some(0) {
            // The provisioner gives up after one attempt (the claim was deleted): whatever
            // the RDS did stays there with no PV.
            let answer = self.once(CTRL, &create, "").await;
            {
                let mut m = self.model();
                m.creating.remove(&vol);
                let v = m.volume(&vol);
                v.created = answer.is_ok();
                v.abandoned = true;
                v.size = self.size;
            }
            self.sh
                .trace
                .log("co", format!("{vol} abandoned after CreateVolume: no PV"));
            return;
        }
        let created = self.until_ok(CTRL, create.clone()).await;
        {
            let mut m = self.model();
            m.creating.remove(&vol);
            let v = m.volume(&vol);
            v.created = true;
            v.size = self.size;
        }
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
                    "claimRef": { "kind": "PersistentVolumeClaim",
                                  "namespace": crate::world::CLAIM_NAMESPACE,
                                  "name": crate::world::claim_name(&vol) },
                },
            }),
        );
        let vctx = created.volume_context;
        let mut ix = self.pick_node(usize::MAX);
        let mut snapshots = Vec::new();
        for round in 0..=o.moves {
            self.cleaned_up(Some(ix)).await;
            let generation = self.sh.node_life(ix).generation;
            let last = round == o.moves;
            if let Err(lost) = self.round(ix, generation, round, last, &vctx).await {
                if lost.alive {
                    self.clean_up_after_partition(ix, generation);
                }
                self.force_detach(&node_name(ix), lost).await;
            }
            if self.deleting.is_none() && self.rng.random_range(0..100) < o.snapshot_pct {
                snapshots.push(self.snapshot(round).await);
            }
            self.think(0, 3_000).await;
            if !last {
                self.maybe_restore_pv().await;
            }
            ix = self.pick_node(ix);
        }
        // Snapshots outlive their volume (copies on the RDS): delete them before or after.
        let snapshots_first = self.rng.random_bool(0.5);
        if abandon == Some(2) {
            for id in std::mem::take(&mut snapshots) {
                self.forget_snapshot(&id);
            }
        }
        if snapshots_first {
            for id in &snapshots {
                self.delete_snapshot(id).await;
            }
        }
        // The provisioner, on PV release (unless it already raced the last detach); or
        // an admin deletes the PV by hand, without DeleteVolume.
        let deleting = match self.deleting.take() {
            Some(raced) => Some(raced),
            None if abandon == Some(1) => {
                self.model().volume(&vol).abandoned = true;
                self.sh.api.remove_object(Kind::PersistentVolume, "", &vol);
                self.sh.trace.log(
                    "co",
                    format!("{vol} abandoned: PV deleted by hand, no DeleteVolume"),
                );
                None
            }
            None => {
                let child = self.child();
                Some(tokio::spawn(child.delete_volume()))
            }
        };
        if let Some(deleting) = deleting {
            let _ = deleting.await;
        }
        if !snapshots_first {
            for id in &snapshots {
                self.delete_snapshot(id).await;
            }
        }
        self.cleaned_up(None).await;
        self.sh.trace.log("co", format!("{vol} done"));
    }
}

/// How a VM's live migration ends (drawn per migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The VM moved: the source is detached.
    Completes,
    /// KubeVirt gave up: the target is detached, the VM stays on the source.
    TargetDetached,
}

impl Script {
    /// Where the VM's `n`th pod (virt-launcher) on node `ix` maps the disk.
    fn vm_target(&self, ix: usize, n: usize) -> String {
        target_path(
            &self.vol,
            &format!("virt-launcher-{}-{n}-{}", self.vol, node_name(ix)),
        )
    }

    /// The attacher attaches the VM disk to node `ix` and the kubelet maps it into the
    /// VM's `n`th pod there (NodeStage, NodePublish of the raw block device).
    async fn vm_attach(
        &mut self,
        ix: usize,
        generation: u64,
        n: usize,
        vctx: &HashMap<String, String>,
    ) -> Result<Pod, Lost> {
        let node = node_name(ix);
        self.put_va(&node, false);
        let published = self.publish(ix, generation, vctx).await?;
        self.put_va(&node, true);
        self.maybe_repeat(CTRL, self.publish_req(&node, vctx)).await;
        self.show_disk(ix);
        let staging = staging_path(&self.vol);
        let stage = Call::Stage(NodeStageVolumeRequest {
            volume_id: self.vol.clone(),
            publish_context: published.publish_context.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(vm_capability()),
            volume_context: vctx.clone(),
            ..Default::default()
        });
        self.until_ok_on(&node, ix, generation, stage).await?;
        let pod = Pod {
            publish: NodePublishVolumeRequest {
                volume_id: self.vol.clone(),
                publish_context: published.publish_context,
                staging_target_path: staging,
                target_path: self.vm_target(ix, n),
                volume_capability: Some(vm_capability()),
                volume_context: vctx.clone(),
                ..Default::default()
            },
            round: n,
            restarts: 0,
        };
        let publish = Call::NodePublish(pod.publish.clone());
        self.until_ok_on(&node, ix, generation, publish.clone())
            .await?;
        self.maybe_repeat(&node, publish).await;
        Ok(pod)
    }

    /// The VM's pod on node `ix` is gone: the kubelet unmaps and unstages, the attacher
    /// detaches.
    async fn vm_detach(&mut self, ix: usize, generation: u64, pod: &Pod) -> Result<(), Lost> {
        let node = node_name(ix);
        let unpod = Call::NodeUnpublish(NodeUnpublishVolumeRequest {
            volume_id: self.vol.clone(),
            target_path: pod.publish.target_path.clone(),
        });
        self.until_ok_on(&node, ix, generation, unpod).await?;
        let unstage = Call::Unstage(NodeUnstageVolumeRequest {
            volume_id: self.vol.clone(),
            staging_target_path: staging_path(&self.vol),
        });
        self.until_ok_on(&node, ix, generation, unstage).await?;
        self.unpublish(&node).await;
        self.maybe_repeat(CTRL, self.unpublish_req(&node)).await;
        self.remove_va(&node);
        Ok(())
    }

    /// Node `ix` (the VM's pod `target` on it) was lost or stopped reporting: its kubelet
    /// cleans up once back (if alive), and the attach/detach controller force-detaches.
    async fn vm_lost(&mut self, ix: usize, generation: u64, target: String, lost: Lost) {
        self.target = Some(target);
        if lost.alive {
            self.clean_up_after_partition(ix, generation);
        }
        self.target = None;
        self.force_detach(&node_name(ix), lost).await;
    }

    /// A partitioned node's kubelet cleanup started by `other` (a task's script) becomes
    /// this script's, waited for before the VM uses that node again, and at the end.
    async fn adopt_cleanup(&mut self, other: &mut Script) {
        if let Some(cleanup) = other.cleanup.take() {
            self.cleaned_up(None).await;
            self.cleanup = Some(cleanup);
        }
    }

    /// Starts the VM on a live node other than `not` (retrying elsewhere when the node is
    /// lost on the way): (node, generation, pod).
    async fn vm_start(
        &mut self,
        not: usize,
        n: &mut usize,
        vctx: &HashMap<String, String>,
    ) -> (usize, u64, Pod) {
        let mut ix = self.pick_node(not);
        loop {
            self.cleaned_up(Some(ix)).await;
            let generation = self.sh.node_life(ix).generation;
            *n += 1;
            match self.vm_attach(ix, generation, *n, vctx).await {
                Ok(pod) => return (ix, generation, pod),
                Err(lost) => {
                    let target = self.vm_target(ix, *n);
                    self.vm_lost(ix, generation, target, lost).await;
                }
            }
            ix = self.pick_node(ix);
        }
    }

    /// The VM's pods on their nodes run until `until`, the kubelets polling the disk's
    /// stats ([`Self::check_pod`]: an abnormal volume gets its pod restarted). The first
    /// pod whose node is lost meanwhile, by index into `pods`.
    async fn vm_runs(
        &mut self,
        until: Duration,
        pods: &mut [(usize, u64, &mut Pod)],
    ) -> Option<(usize, Lost)> {
        let time = self.sh.trace.time().clone();
        let now = || time.now();
        while now() < until {
            tokio::time::sleep(STATS_EVERY.min(until - now())).await;
            for (i, (ix, generation, pod)) in pods.iter_mut().enumerate() {
                if let Err(lost) = self.check_pod(*ix, *generation, pod).await {
                    return Some((i, lost));
                }
            }
        }
        None
    }

    /// Awaits `task` (another kubelet's or the attacher's work on the VM's other node) while
    /// this node's kubelet keeps polling the VM's running pod `pod` on node `ix`, as the two
    /// nodes' kubelets do independently. The task's result, and the polled node's loss if it
    /// was lost meanwhile (polling then stops).
    async fn polling_while<T: Send + 'static>(
        &mut self,
        task: tokio::task::JoinHandle<T>,
        ix: usize,
        generation: u64,
        pod: &mut Pod,
    ) -> (T, Option<Lost>) {
        let mut lost = None;
        while !task.is_finished() {
            tokio::time::sleep(STATS_EVERY).await;
            if lost.is_none()
                && !task.is_finished()
                && let Err(l) = self.check_pod(ix, generation, pod).await
            {
                lost = Some(l);
            }
        }
        match task.await {
            Ok(t) => (t, lost),
            // The workload's own tasks do not panic; a panic is a bug of the harness.
            Err(e) => panic!("VM task failed: {e}"),
        }
    }

    /// A KubeVirt VM: its disk (RWX block, `migrationTimeoutSeconds` from the knobs)
    /// created, the VM started on a node, then live-migrated `migrations` times to another
    /// live node (the disk attached, staged and mapped there while the source still holds
    /// it), each migration ending as drawn: completed (the source detached), failed (the
    /// target detached first), or first outlasting its timeout, when a third node's attach
    /// is refused, then ending either way; a target lost mid-migration fails it (force-
    /// detached), a source lost restarts the VM elsewhere (or completes the migration).
    /// Sometimes a third node's attach meets a running migration. While the VM's pods run,
    /// the kubelets poll the disk as for any pod. Finally the VM stops and its disk is
    /// deleted.
    async fn run_vm(mut self) {
        let o = std::sync::Arc::clone(&self.sh.opts);
        let vol = self.vol.clone();
        self.think(0, o.chaos_secs * 1000 / 2).await;
        let create = Call::Create(CreateVolumeRequest {
            name: vol.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: VOLUME_BYTES,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![vm_capability()],
            parameters: [(
                rds_csi::types::context::MIGRATION_TIMEOUT.to_string(),
                o.migration_timeout_secs.to_string(),
            )]
            .into(),
            ..Default::default()
        });
        let created = self.until_ok(CTRL, create.clone()).await;
        {
            let mut m = self.model();
            let v = m.volume(&vol);
            v.created = true;
            v.size = self.size;
            v.multi = true;
        }
        self.maybe_repeat(CTRL, create).await;
        self.sh.api.put_object(
            Kind::PersistentVolume,
            "",
            json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": { "name": vol },
                "spec": {
                    "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteMany"],
                    "volumeMode": "Block",
                    "claimRef": { "kind": "PersistentVolumeClaim",
                                  "namespace": crate::world::CLAIM_NAMESPACE,
                                  "name": crate::world::claim_name(&vol) },
                    "csi": { "driver": DRIVER, "volumeHandle": vol },
                },
            }),
        );
        let vctx = created.volume_context;
        let time = self.sh.trace.time().clone();
        let now = || time.now();
        let mut pods = 0;
        let (mut src, mut src_gen, mut src_pod) = self.vm_start(usize::MAX, &mut pods, &vctx).await;
        let mut m = 0;
        while m < o.migrations {
            // The VM runs for a while.
            let until = now() + Duration::from_millis(self.rng.random_range(1_000..=10_000));
            if let Some((_, lost)) = self
                .vm_runs(until, &mut [(src, src_gen, &mut src_pod)])
                .await
            {
                let target = src_pod.publish.target_path.clone();
                self.vm_lost(src, src_gen, target, lost).await;
                (src, src_gen, src_pod) = self.vm_start(src, &mut pods, &vctx).await;
                m += 1;
                continue;
            }
            let dst = self.pick_node(src);
            if dst == src {
                m += 1;
                continue; // no other live node to move to
            }
            let draw = self.rng.random_range(0..100u32);
            let outlasts = draw >= 75;
            let ending = if draw < 50 || (outlasts && self.rng.random_bool(0.5)) {
                Ending::Completes
            } else {
                Ending::TargetDetached
            };
            let (from, to) = (node_name(src), node_name(dst));
            self.sh.trace.log(
                "co",
                format!(
                    "VM {vol}: live migration {m} from {from} to {to} ({}{})",
                    match ending {
                        Ending::Completes => "to complete",
                        Ending::TargetDetached => "to fail: the target detaches",
                    },
                    if outlasts {
                        ", after outlasting its timeout"
                    } else {
                        ""
                    }
                ),
            );
            m += 1;
            self.cleaned_up(Some(dst)).await;
            let dst_gen = self.sh.node_life(dst).generation;
            pods += 1;
            let started = now();
            let attach = {
                let mut attacher = self.child();
                let vctx = vctx.clone();
                tokio::spawn(async move { attacher.vm_attach(dst, dst_gen, pods, &vctx).await })
            };
            let (attached, src_lost) = self.polling_while(attach, src, src_gen, &mut src_pod).await;
            if let Some(lost) = src_lost {
                // The source is gone while the target attaches: the VM goes on on the target
                // if it got there, else it restarts elsewhere.
                self.sh.trace.log(
                    "co",
                    format!("VM {vol}: the source {from} is lost mid-migration"),
                );
                let target = src_pod.publish.target_path.clone();
                match attached {
                    Ok(p) => {
                        (src, src_gen, src_pod) = self
                            .vm_goes_on(
                                (src, src_gen, target, lost),
                                (dst, dst_gen, p),
                                &mut pods,
                                &vctx,
                            )
                            .await;
                    }
                    Err(dst_lost) => {
                        self.vm_lost(src, src_gen, target, lost).await;
                        let t = self.vm_target(dst, pods);
                        self.vm_lost(dst, dst_gen, t, dst_lost).await;
                        (src, src_gen, src_pod) = self.vm_start(src, &mut pods, &vctx).await;
                    }
                }
                continue;
            }
            let mut dst_pod = match attached {
                Ok(p) => p,
                Err(lost) => {
                    self.sh.trace.log(
                        "co",
                        format!("VM {vol}: migration fails, its target {to} is lost"),
                    );
                    let t = self.vm_target(dst, pods);
                    (src, src_gen, src_pod) = self
                        .vm_goes_on(
                            (dst, dst_gen, t, lost),
                            (src, src_gen, src_pod),
                            &mut pods,
                            &vctx,
                        )
                        .await;
                    continue;
                }
            };
            if self.rng.random_range(0..100) < o.conflict_attach_pct
                && let Some(third) = self.pick_third(src, dst)
            {
                self.conflicting_attach(third, &vctx).await;
            }
            let until = if outlasts {
                started
                    + Duration::from_secs(o.migration_timeout_secs)
                    + Duration::from_millis(self.rng.random_range(1_000..=20_000))
            } else {
                now() + Duration::from_millis(self.rng.random_range(500..=5_000))
            };
            let lost = self
                .vm_runs(
                    until,
                    &mut [(src, src_gen, &mut src_pod), (dst, dst_gen, &mut dst_pod)],
                )
                .await;
            match lost {
                Some((0, lost)) => {
                    // The source is gone: the VM can only go on on the target.
                    self.sh.trace.log(
                        "co",
                        format!("VM {vol}: the source {from} is lost mid-migration"),
                    );
                    let target = src_pod.publish.target_path.clone();
                    (src, src_gen, src_pod) = self
                        .vm_goes_on(
                            (src, src_gen, target, lost),
                            (dst, dst_gen, dst_pod),
                            &mut pods,
                            &vctx,
                        )
                        .await;
                    continue;
                }
                Some((_, lost)) => {
                    self.sh.trace.log(
                        "co",
                        format!("VM {vol}: migration fails, its target {to} is lost"),
                    );
                    let target = dst_pod.publish.target_path.clone();
                    (src, src_gen, src_pod) = self
                        .vm_goes_on(
                            (dst, dst_gen, target, lost),
                            (src, src_gen, src_pod),
                            &mut pods,
                            &vctx,
                        )
                        .await;
                    continue;
                }
                None => {}
            }
            if outlasts {
                self.sh.trace.log(
                    "co",
                    format!(
                        "VM {vol}: migration from {from} to {to} outlasted its timeout of {}s",
                        o.migration_timeout_secs
                    ),
                );
                if let Some(third) = self.pick_third(src, dst) {
                    self.conflicting_attach(third, &vctx).await;
                }
            }
            let (leaving, leaving_gen, leaving_pod, staying, staying_gen, mut staying_pod) =
                match ending {
                    Ending::Completes => (src, src_gen, src_pod, dst, dst_gen, dst_pod),
                    Ending::TargetDetached => (dst, dst_gen, dst_pod, src, src_gen, src_pod),
                };
            let detach = {
                let mut kubelet = self.child();
                tokio::spawn(async move {
                    let target = leaving_pod.publish.target_path.clone();
                    if let Err(lost) = kubelet.vm_detach(leaving, leaving_gen, &leaving_pod).await {
                        kubelet.vm_lost(leaving, leaving_gen, target, lost).await;
                    }
                    kubelet
                })
            };
            let (mut kubelet, staying_lost) = self
                .polling_while(detach, staying, staying_gen, &mut staying_pod)
                .await;
            self.adopt_cleanup(&mut kubelet).await;
            (src, src_gen, src_pod) = (staying, staying_gen, staying_pod);
            let elapsed = now().saturating_sub(started);
            self.sh.trace.log(
                "co",
                format!(
                    "VM {vol}: migration from {from} to {to} {} after {:.1}s",
                    match ending {
                        Ending::Completes => "completed, the VM runs on the target",
                        Ending::TargetDetached => "failed, the VM stays on the source",
                    },
                    elapsed.as_secs_f64()
                ),
            );
            if let Some(lost) = staying_lost {
                let target = src_pod.publish.target_path.clone();
                self.vm_lost(src, src_gen, target, lost).await;
                (src, src_gen, src_pod) = self.vm_start(src, &mut pods, &vctx).await;
            }
        }
        // The VM stops.
        if let Err(lost) = self.vm_detach(src, src_gen, &src_pod).await {
            let target = src_pod.publish.target_path.clone();
            self.vm_lost(src, src_gen, target, lost).await;
        }
        let child = self.child();
        let _ = tokio::spawn(child.delete_volume()).await;
        self.cleaned_up(None).await;
        self.sh.trace.log("co", format!("{vol} done"));
    }

    /// One of the VM's two nodes, `gone` (its pod `target`), was lost mid-migration; the VM
    /// goes on in its pod `pod` on node `run` while `gone`'s kubelet cleans up (if alive)
    /// and the attach/detach controller force-detaches it minutes later ([`Self::vm_lost`],
    /// a task of its own) — the kubelet of `run` polls its pod meanwhile, as the two nodes'
    /// kubelets are independent. Where the VM runs afterwards: `run`, or, if `run` was lost
    /// too meanwhile, the node it restarted on.
    async fn vm_goes_on(
        &mut self,
        (gone, gone_gen, target, lost): (usize, u64, String, Lost),
        (run, run_gen, mut pod): (usize, u64, Pod),
        pods: &mut usize,
        vctx: &HashMap<String, String>,
    ) -> (usize, u64, Pod) {
        let task = {
            let mut kubelet = self.child();
            tokio::spawn(async move {
                kubelet.vm_lost(gone, gone_gen, target, lost).await;
                kubelet
            })
        };
        let (mut kubelet, run_lost) = self.polling_while(task, run, run_gen, &mut pod).await;
        self.adopt_cleanup(&mut kubelet).await;
        let Some(run_lost) = run_lost else {
            return (run, run_gen, pod);
        };
        let target = pod.publish.target_path.clone();
        self.vm_lost(run, run_gen, target, run_lost).await;
        self.vm_start(run, pods, vctx).await
    }

    /// A schedulable node other than `a` and `b`, if there is one.
    fn pick_third(&mut self, a: usize, b: usize) -> Option<usize> {
        let others: Vec<usize> = self
            .sh
            .schedulable_nodes()
            .into_iter()
            .filter(|&n| n != a && n != b)
            .collect();
        (!others.is_empty()).then(|| others[self.rng.random_range(0..others.len())])
    }
}

/// The name Kubernetes gives the VolumeAttachment of `vol` on `node` (the driver looks it up
/// by that name).
fn va_name(vol: &str, node: &str) -> String {
    match (
        rds_csi::types::VolumeId::new(vol),
        rds_csi::types::NodeId::new(node),
    ) {
        (Ok(v), Ok(n)) => rds_csi::kube::cluster::volume_attachment_name(&v, DRIVER, &n),
        _ => format!("csi-{vol}-{node}"),
    }
}

/// The CO client: every volume's script, concurrently, until all are done; and, when the
/// knob says so, the external-attacher's reconciliation beside them.
pub async fn run(sh: Shared) -> turmoil::Result {
    let mut tasks = Vec::new();
    for i in 0..sh.opts.volumes {
        let script = Script {
            sh: sh.clone(),
            rng: StdRng::seed_from_u64(sh.opts.seed.wrapping_mul(31).wrapping_add(i as u64)),
            vol: format!("pvc-sim-{i}"),
            size: VOLUME_BYTES as u64,
            target: None,
            cleanup: None,
            deleting: None,
            backup: None,
            vm: false,
        };
        tasks.push(tokio::spawn(script.run()));
    }
    for i in 0..sh.opts.vms {
        let script = Script {
            sh: sh.clone(),
            rng: StdRng::seed_from_u64(sh.opts.seed.wrapping_mul(37).wrapping_add(1000 + i as u64)),
            vol: format!("{VM_PREFIX}{i}"),
            size: VOLUME_BYTES as u64,
            target: None,
            cleanup: None,
            deleting: None,
            backup: None,
            vm: true,
        };
        tasks.push(tokio::spawn(script.run_vm()));
    }
    let reconciler = (sh.opts.reconcile_secs > 0).then(|| tokio::spawn(reconcile(sh.clone())));
    for t in tasks {
        t.await?;
    }
    if let Some(r) = reconciler {
        r.abort();
    }
    // Memory of a replica that missed the other's writes during a failover agrees with
    // the store again after its next resync, and a connection a node was left with is past
    // its orphan grace period and swept.
    // Volumes abandoned early can end the workload before the chaos phase does: the faults
    // of its end (a node left a connection it does not hold) are settled like the others.
    if sh.opts.abandon_pct > 0 {
        let chaos = Duration::from_secs(sh.opts.chaos_secs);
        let now = sh.trace.time().now();
        tokio::time::sleep(chaos.saturating_sub(now)).await;
    }
    let settle = RESYNC.max(ORPHAN_SWEEP.grace + ORPHAN_SWEEP.interval * 2);
    tokio::time::sleep(settle + Duration::from_secs(5)).await;
    // With the orphan reconciler deleting, what the CO left behind is reclaimed (else
    // the liveness bound fails the seed).
    if sh.opts.reconcilers && sh.opts.orphan_delete {
        while !sh.abandoned_disks().is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sh.trace.log("co", "orphans reclaimed");
    }
    // Background work of a controller (a watch's relist re-reading a volume, a migration
    // check) may hold a volume's lock at this instant; a leaked lock is one that never
    // clears, and the liveness checker finds it after this bounded wait.
    for _ in 0..60 {
        let busy = crate::world::CONTROLLERS
            .iter()
            .any(|r| sh.manager(r).is_some_and(|m| m.lock_entries() != 0));
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sh.trace.log("co", "workload complete");
    Ok(())
}

/// The holders of every volume the workload made, as the durable records name them (no
/// PV: none).
fn durable(sh: &Shared) -> BTreeMap<String, BTreeSet<String>> {
    let volumes: Vec<String> = sh
        .model
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .volumes
        .keys()
        .cloned()
        .collect();
    volumes
        .into_iter()
        .map(|v| {
            let held = sh.stored_holders(&v).unwrap_or_default();
            (v, held)
        })
        .collect()
}

/// Judges an answer of `rpc` on `host` (published nodes by volume) against the durable
/// records, for each volume whose records did not change while the call ran.
fn judge(
    sh: &Shared,
    rpc: &str,
    host: &str,
    answer: &BTreeMap<String, BTreeSet<String>>,
    before: &BTreeMap<String, BTreeSet<String>>,
    after: &BTreeMap<String, BTreeSet<String>>,
) {
    for (vol, said) in answer {
        match (before.get(vol), after.get(vol)) {
            (Some(b), Some(a)) if a == b && said != b => sh.co_violation(format!(
                "{rpc} @{host} says {vol} is published to {said:?}; the durable records say {b:?}"
            )),
            _ => {}
        }
    }
}

/// ListVolumes on `host`, every page (two entries a page): published nodes by volume.
async fn list_volumes(
    host: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, BTreeSet<String>>, Status> {
    let channel = csi_channel(host.to_string(), CSI_PORT, timeout)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut c = ControllerClient::new(channel);
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await?
            .into_inner();
        for e in page.entries {
            let (Some(v), Some(st)) = (e.volume, e.status) else {
                continue;
            };
            out.insert(v.volume_id, st.published_node_ids.into_iter().collect());
        }
        if page.next_token.is_empty() {
            return Ok(out);
        }
        token = page.next_token;
    }
}

/// ControllerGetVolume of `vol` on `host`: its published nodes.
async fn get_volume(host: &str, vol: &str, timeout: Duration) -> Result<BTreeSet<String>, Status> {
    let channel = csi_channel(host.to_string(), CSI_PORT, timeout)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let answer = ControllerClient::new(channel)
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: vol.to_string(),
        })
        .await?
        .into_inner();
    Ok(answer
        .status
        .map(|s| s.published_node_ids.into_iter().collect())
        .unwrap_or_default())
}

/// The external-attacher's reconciliation (`--reconcile-sync`): every `reconcile_secs` it
/// lists the volumes (ListVolumes, with LIST_VOLUMES_PUBLISHED_NODES) and compares their
/// published nodes with the VolumeAttachments; one attached in its VolumeAttachment but
/// missing from the answer is re-attached (its volume's script publishes it again). It
/// also asks ControllerGetVolume about one volume. Every answer is judged against the
/// durable records: these answers drive real actions.
async fn reconcile(sh: Shared) {
    let period = Duration::from_secs(sh.opts.reconcile_secs);
    let timeout = Duration::from_millis(sh.opts.rpc_timeout_ms);
    let mut rng = StdRng::seed_from_u64(sh.opts.seed ^ 0x00a7_7ac4);
    loop {
        tokio::time::sleep(period).await;
        let l = sh.leader();
        let host = match l.stale {
            Some(stale) if rng.random_bool(0.5) => stale,
            _ => l.active,
        };
        let before = durable(&sh);
        let answer = list_volumes(host, timeout).await;
        let after = durable(&sh);
        let published = match answer {
            Ok(p) => p,
            Err(e) => {
                sh.trace.log(
                    "co",
                    format!("attacher reconcile: ListVolumes @{host} -> {:?}", e.code()),
                );
                continue;
            }
        };
        sh.trace.log(
            "co",
            format!(
                "attacher reconcile: ListVolumes @{host} -> OK ({} volumes)",
                published.len()
            ),
        );
        judge(&sh, "ListVolumes", host, &published, &before, &after);
        for va in sh.api.objects(Kind::VolumeAttachment) {
            let attached = va.pointer("/status/attached").and_then(|a| a.as_bool());
            let vol = va
                .pointer("/spec/source/persistentVolumeName")
                .and_then(|v| v.as_str());
            let node = va.pointer("/spec/nodeName").and_then(|v| v.as_str());
            if let (Some(true), Some(vol), Some(node)) = (attached, vol, node)
                && published.get(vol).is_some_and(|p| !p.contains(node))
            {
                sh.trace.log(
                    "co",
                    format!("attacher reconcile: {vol} on {node} is attached but not published: re-attach"),
                );
                sh.request_reattach(vol, node);
            }
        }
        let live: Vec<String> = {
            let m = sh.model.lock().unwrap_or_else(|p| p.into_inner());
            m.volumes
                .iter()
                .filter(|(_, v)| v.created && !v.deleting && !v.deleted)
                .map(|(k, _)| k.clone())
                .collect()
        };
        if live.is_empty() {
            continue;
        }
        let vol = live[rng.random_range(0..live.len())].clone();
        let before = durable(&sh);
        let answer = get_volume(host, &vol, timeout).await;
        let after = durable(&sh);
        if let Ok(nodes) = answer {
            judge(
                &sh,
                "ControllerGetVolume",
                host,
                &BTreeMap::from([(vol, nodes)]),
                &before,
                &after,
            );
        }
    }
}
