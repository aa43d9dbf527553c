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
//! removed. When the node's machine is lost mid-round, its pod goes with it and the
//! attach/detach controller force-detaches [`FORCE_DETACH_SECS`] after the loss.
//!
//! Every call and its outcome goes to the trace; acknowledgements go to the
//! [`Model`](crate::model::Model) the checkers judge, and an answer the spec rules out
//! for a valid, repeated request (ALREADY_EXISTS to a same-name CreateVolume, NOT_FOUND to
//! a DeleteVolume, ...) is reported as a violation at once.
//!
//! Each volume's choices come from its own seeded RNG, so the schedule of one volume does
//! not shift another's draws.

use std::collections::HashMap;
use std::time::Duration;

use rand::{RngExt, SeedableRng, rngs::StdRng};
use rds_csi::kube::fake_api::Kind;
use rds_csi::proto::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest,
    DeleteSnapshotRequest, DeleteVolumeRequest, NodeExpandVolumeRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
    controller_client::ControllerClient,
    node_client::NodeClient,
    volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
};
use serde_json::json;
use tonic::{Code, Status};

use crate::model::Op;
use crate::options::FORCE_DETACH_SECS;
use crate::world::{DRIVER, KUBELET_ROOT, RESYNC, Shared, csi_channel, node_name};

/// Stands for the leading controller replica.
const CTRL: &str = "controller*";

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
    Expand(ControllerExpandVolumeRequest),
    NodeExpand(NodeExpandVolumeRequest),
    Snapshot(CreateSnapshotRequest),
    DeleteSnapshot(DeleteSnapshotRequest),
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
        }
    }
}

/// What an OK answer carried that the CO needs later.
#[derive(Debug, Default)]
struct Reply {
    volume_context: HashMap<String, String>,
    publish_context: HashMap<String, String>,
    snapshot_id: String,
}

async fn send(host: &str, call: Call, timeout: Duration) -> Result<Reply, Status> {
    let channel = csi_channel(host.to_string(), timeout)
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

/// The volume's node was lost (its machine gone, Node object deleted) at this virtual time
/// while the volume was attached to it or on its way there.
#[derive(Debug, Clone, Copy)]
struct Lost {
    at: Duration,
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
}

impl Script {
    /// One attempt of `call` on `host` (`CTRL`: the leading controller replica), traced.
    async fn once(&mut self, host: &str, call: &Call, note: &str) -> Result<Reply, Code> {
        let host = if host == CTRL {
            self.controller()
        } else {
            host
        };
        let name = call.name();
        let timeout = Duration::from_millis(self.sh.opts.rpc_timeout_ms);
        let r = send(host, call.clone(), timeout).await;
        let outcome = match &r {
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

    /// Whether node `ix` is still the machine of generation `generation`; if not, when
    /// that machine was lost.
    fn alive(&self, ix: usize, generation: u64) -> Result<(), Lost> {
        let life = self.sh.node_life(ix);
        if life.generation == generation {
            return Ok(());
        }
        let at = usize::try_from(generation)
            .ok()
            .and_then(|g| life.lost_at.get(g).copied())
            .unwrap_or_default();
        Err(Lost { at })
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
                "metadata": { "name": format!("csi-{}-{node}", self.vol) },
                "spec": { "attacher": DRIVER, "nodeName": node,
                          "source": { "persistentVolumeName": self.vol } },
                "status": { "attached": attached },
            }),
        );
    }

    fn remove_va(&self, node: &str) {
        self.sh.api.remove_object(
            Kind::VolumeAttachment,
            "",
            &format!("csi-{}-{node}", self.vol),
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
        let r = self
            .until_ok_on(CTRL, ix, generation, self.publish_req(&node, vctx))
            .await?;
        self.ack(ix, generation, Op::Publish)?;
        Ok(r)
    }

    /// ControllerUnpublish from `node` until OK, recorded in the model (the attacher
    /// detaches whether or not the node is still there).
    async fn unpublish(&mut self, node: &str) {
        self.model().begin(&self.vol, node, Op::Unpublish);
        self.until_ok(CTRL, self.unpublish_req(node)).await;
        self.model().ack(&self.vol, node, Op::Unpublish);
    }

    /// A live node other than `ix`, if there is one, else any live node.
    fn pick_node(&mut self, ix: usize) -> usize {
        let live = self.sh.live_nodes();
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
    }

    /// One round on node `ix`: the attacher attaches, the kubelet stages and publishes to
    /// a pod, the pod runs, then everything is torn down in reverse and the attachment
    /// detached. `Err` if the node's machine is lost on the way (its pod goes with it).
    async fn round(
        &mut self,
        ix: usize,
        generation: u64,
        round: usize,
        vctx: &HashMap<String, String>,
    ) -> Result<(), Lost> {
        let o = std::sync::Arc::clone(&self.sh.opts);
        let vol = self.vol.clone();
        let node = node_name(ix);
        // The attacher.
        self.put_va(&node, false);
        let published = self.publish(ix, generation, vctx).await?;
        self.put_va(&node, true);
        self.maybe_repeat(CTRL, self.publish_req(&node, vctx)).await;
        if self.rng.random_range(0..100) < o.conflict_attach_pct {
            let other = self.pick_node(ix);
            if other != ix {
                self.conflicting_attach(other, vctx).await;
            }
        }
        self.alive(ix, generation)?;
        // The kubelet. The disk is visible to the node's kernel while it exists on the
        // RDS (the network between them is not simulated).
        self.show_disk(ix);
        let staging =
            format!("{KUBELET_ROOT}/plugins/kubernetes.io/csi/{DRIVER}/{vol}/globalmount");
        let target =
            format!("{KUBELET_ROOT}/pods/pod-{vol}-{round}/volumes/kubernetes.io~csi/{vol}/mount");
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
        let pod = Call::NodePublish(NodePublishVolumeRequest {
            volume_id: vol.clone(),
            publish_context: published.publish_context.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(capability()),
            volume_context: vctx.clone(),
            ..Default::default()
        });
        self.until_ok_on(&node, ix, generation, pod.clone()).await?;
        self.maybe_repeat(&node, pod).await;
        if self.rng.random_range(0..100) < o.expand_pct {
            self.expand(ix, generation, &staging, &target).await?;
        }
        // The pod runs for a while.
        self.think(1_000, 15_000).await;
        // The pod moves away.
        let unpod = Call::NodeUnpublish(NodeUnpublishVolumeRequest {
            volume_id: vol.clone(),
            target_path: target.clone(),
        });
        self.until_ok_on(&node, ix, generation, unpod.clone())
            .await?;
        self.maybe_repeat(&node, unpod).await;
        let unstage = Call::Unstage(NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging,
        });
        self.until_ok_on(&node, ix, generation, unstage.clone())
            .await?;
        self.maybe_repeat(&node, unstage).await;
        // The attacher detaches (the node may be lost meanwhile: the detach goes on).
        self.unpublish(&node).await;
        self.maybe_repeat(CTRL, self.unpublish_req(&node)).await;
        self.remove_va(&node);
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
    async fn expand(
        &mut self,
        ix: usize,
        generation: u64,
        staging: &str,
        target: &str,
    ) -> Result<(), Lost> {
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
        let grow = Call::NodeExpand(NodeExpandVolumeRequest {
            volume_id: self.vol.clone(),
            volume_path: target.to_string(),
            capacity_range: range,
            staging_target_path: staging.to_string(),
            volume_capability: Some(capability()),
            ..Default::default()
        });
        self.until_ok_on(&node, ix, generation, grow.clone())
            .await?;
        self.maybe_repeat(&node, grow).await;
        Ok(())
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
        let id = self.until_ok(CTRL, call.clone()).await.snapshot_id;
        self.model().snapshot(&id).created = true;
        self.maybe_repeat(CTRL, call).await;
        id
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
        self.maybe_repeat(CTRL, call).await;
    }

    /// The attach/detach controller gives up on the lost node's unmount and force-detaches
    /// FORCE_DETACH_SECS after the loss: ControllerUnpublish until OK, VA removed.
    async fn force_detach(&mut self, node: &str, lost: Lost) {
        let now = turmoil::sim_elapsed().unwrap_or_default();
        let at = lost.at + Duration::from_secs(FORCE_DETACH_SECS);
        self.sh.trace.log(
            "co",
            format!(
                "{} on {node}: machine lost at {:.3}s, force-detach at {:.3}s",
                self.vol,
                lost.at.as_secs_f64(),
                at.as_secs_f64()
            ),
        );
        tokio::time::sleep(at.saturating_sub(now)).await;
        self.unpublish(node).await;
        self.maybe_repeat(CTRL, self.unpublish_req(node)).await;
        self.remove_va(node);
    }

    async fn run(mut self) {
        let o = std::sync::Arc::clone(&self.sh.opts);
        let vol = self.vol.clone();
        // Claims arrive over the chaos phase, so creates and deletes meet faults too.
        self.think(0, o.chaos_secs * 1000 / 2).await;
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
        {
            let mut m = self.model();
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
                },
            }),
        );
        let vctx = created.volume_context;
        let live = self.sh.live_nodes();
        let mut ix = live[self.rng.random_range(0..live.len())];
        let mut snapshots = Vec::new();
        for round in 0..=o.moves {
            let generation = self.sh.node_life(ix).generation;
            if let Err(lost) = self.round(ix, generation, round, &vctx).await {
                self.force_detach(&node_name(ix), lost).await;
            }
            if self.rng.random_range(0..100) < o.snapshot_pct {
                snapshots.push(self.snapshot(round).await);
            }
            self.think(0, 3_000).await;
            ix = self.pick_node(ix);
        }
        // Snapshots outlive their volume (copies on the RDS): delete them before or after.
        let snapshots_first = self.rng.random_bool(0.5);
        if snapshots_first {
            for id in &snapshots {
                self.delete_snapshot(id).await;
            }
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
        if !snapshots_first {
            for id in &snapshots {
                self.delete_snapshot(id).await;
            }
        }
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
            size: VOLUME_BYTES as u64,
        };
        tasks.push(tokio::spawn(script.run()));
    }
    for t in tasks {
        t.await?;
    }
    // Memory of a replica that missed the other's writes during a failover agrees with
    // the store again after its next resync.
    tokio::time::sleep(RESYNC + Duration::from_secs(5)).await;
    sh.trace.log("co", "workload complete");
    Ok(())
}
