//! The simulated world: turmoil hosts running the code that ships.
//!
//! - `kube`: the simulated API server ([`FakeApi`]) over HTTP/1.1 on turmoil TCP; the
//!   controller reaches it with a real `kube::Client` (built inside the host, rebuilt after
//!   every restart) whose transport opens a turmoil TCP connection per request.
//! - `rds`: the RouterOS emulator over its TCP line protocol; the controller reaches it
//!   through the real renderer, transport and parser (`RouterOsRds` over `TcpTransport`).
//! - `controller`, `controller-b`: the real plugin in controller mode, built by the
//!   composition root (`rds_csi::compose`) like the binary's, served by `server::serve` on
//!   turmoil TCP.
//! - `node-1..N`: the real plugin in node mode over the in-memory kernel
//!   (`rds_csi::node::fake::FakeKernel`, which survives plugin restarts like a real kernel,
//!   and models NVMe/TCP reconnects, ctrl-loss-tmo and device renames), with a `kube::Client`
//!   of its own (host NQN, the VolumeAttachments its orphan sweep reads). The data path is
//!   the RDS's export allow lists, mirrored into each kernel after every step
//!   ([`Shared::sync_data_path`]): a kernel cannot open a new connection to an export that
//!   names another host; an RDS outage reaches every kernel ([`crate::faults`]).
//!
//! Every timeout here is virtual: turmoil drops segments of a partitioned link silently, so
//! each request is bounded. Port wrappers (crash points, planted bugs, call tracking) enter
//! through the root's `PortLayers` ([`crate::crash`], [`crate::bugs`], [`crate::overlap`]);
//! the driver has no sim switch.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioIo, TokioTimer};
use rds_csi::attachment::{AttachmentConfig, AttachmentManager};
use rds_csi::compose::{self, Kernel, Plugin, PortLayers, Seams};
use rds_csi::controller::orphans::{OrphanMode, OrphanVolumeConfig};
use rds_csi::kube::fake_api::{FakeApi, Kind};
use rds_csi::node::fake::FakeKernel;
use rds_csi::node::{NodeOptions, OrphanConfig};
use rds_csi::ports::time::SeededEntropy;
use rds_csi::ports::{AttachmentStore, Clock, Cluster, ClusterWatch, Mounter, Rds};
use rds_csi::retry::Backoff;
use rds_csi::routeros::RdsLayout;
use rds_csi::routeros::emulator::{Emulator, ExportView, PoolConfig};
use rds_csi::routeros::transport::tcp::{TcpTransport, serve_connection};
use rds_csi::routeros::transport::{Connector, Transport};
use rds_csi::settings::Settings;
use rds_csi::types::defaults::DEFAULT_NQN_PREFIX;
use rds_csi::types::{Mode, NodeId, VolumeId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint};

use crate::crash::CrashPoint;
use crate::model::Model;
use crate::options::{Bug, Options};
use crate::overlap::{Ops, Tracked};
use crate::trace::{SimTime, Trace};

/// The CSI driver name.
pub const DRIVER: &str = "rds.csi.srvlab.io";
/// Where the pinned epoch of every simulation is (wall-clock timestamps are derived).
pub const EPOCH_SECS: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
/// CSI port of the controller and node hosts.
pub const CSI_PORT: u16 = 10000;
/// Second CSI port of the controller hosts: where an attacher that lost its state re-issues
/// a call (the same service as [`CSI_PORT`], one in-flight table; a planted bug serves it
/// from a second instance).
pub const REISSUE_PORT: u16 = 10001;
/// API server port.
pub const KUBE_PORT: u16 = 6443;
/// RDS line-protocol port.
pub const RDS_PORT: u16 = 8728;
/// Bound of one API request (connect + answer).
pub const KUBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Mount point of the emulated pool.
pub const POOL: &str = "pool";
/// Directory of disk files on the pool.
pub const VOLUME_PATH: &str = "pool/volumes";
/// Root of staging and target paths on nodes.
pub const KUBELET_ROOT: &str = "/var/lib/kubelet";
/// Retry policy of the controller's adapters in the sim (short: virtual time is cheap, but
/// a partition must be able to exhaust it).
pub const BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_secs(1),
    max_attempts: 4,
};

/// How often each controller replica resynchronises its attachment memory from the store.
pub const RESYNC: Duration = Duration::from_secs(30);

/// The nodes' orphan sweep: how often, and how long a connection must stay an orphan.
pub const ORPHAN_SWEEP: OrphanConfig = OrphanConfig {
    interval: Duration::from_secs(10),
    grace: Duration::from_secs(15),
    dry_run: false,
};

/// The staging path of `volume` on a node (the kubelet's global mount).
pub fn staging_path(volume: &str) -> String {
    format!("{KUBELET_ROOT}/plugins/kubernetes.io/csi/{DRIVER}/{volume}/globalmount")
}

/// The publish target of `volume` for the pod `pod`.
pub fn target_path(volume: &str, pod: &str) -> String {
    format!("{KUBELET_ROOT}/pods/{pod}/volumes/kubernetes.io~csi/{volume}/mount")
}

/// The volume a staging path or publish target belongs to (the component before the last,
/// in both shapes above).
pub fn volume_of_path(path: &std::path::Path) -> Option<&str> {
    path.parent()?.file_name()?.to_str()
}

/// Wall clock of the simulation: the pinned epoch plus simulated time.
#[derive(Debug, Clone, Default)]
pub struct SimClock(pub SimTime);

impl Clock for SimClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(EPOCH_SECS) + self.0.now()
    }
}

/// Everything of one scenario the hosts, the workload and the checkers share. Clones share.
#[derive(Clone)]
pub struct Shared {
    /// The knobs.
    pub opts: Arc<Options>,
    /// The trace.
    pub trace: Trace,
    /// The API server's state.
    pub api: FakeApi,
    /// The storage server.
    pub emulator: Arc<Emulator>,
    /// One kernel per node, index 0 is `node-1`.
    pub kernels: Vec<FakeKernel>,
    /// The workload's acknowledged history.
    pub model: Arc<Mutex<Model>>,
    /// The attachment manager of each controller replica's running incarnation.
    pub managers: Arc<Mutex<BTreeMap<String, Arc<AttachmentManager>>>>,
    /// The controller replicas: who the CO sends calls to (the leader), and a stale
    /// former leader still running during a failover.
    pub leader: Arc<Mutex<Leader>>,
    /// Crash point around attachment writes.
    pub crash: Arc<CrashPoint>,
    /// Controller incarnations started so far.
    pub incarnation: Arc<AtomicU64>,
    /// The life of each node's machine, index 0 is `node-1`.
    pub nodes: Arc<Mutex<Vec<NodeLife>>>,
    /// Answers the CO got that the spec forbids for its requests (a repeat of a
    /// successful call must succeed).
    pub co_violations: Arc<Mutex<Vec<String>>>,
    /// The driver's operations in flight, per host and volume.
    pub ops: Ops,
    /// The export allow lists last mirrored into the kernels.
    exports: Arc<Mutex<BTreeMap<String, ExportView>>>,
    /// Per node (index 0 is `node-1`): since when it is partitioned while alive.
    partitioned: Arc<Mutex<Vec<Option<Duration>>>>,
    /// (volume, node) pairs the external-attacher's reconciliation found attached in a
    /// VolumeAttachment but missing from ListVolumes: to be re-attached.
    reattach: Arc<Mutex<std::collections::BTreeSet<(String, String)>>>,
    /// The Events the controllers failed to record.
    pub events: Arc<crate::events::EventLog>,
}

impl Shared {
    /// The disks the CO abandoned (orphans for the reconciler) whose entry or backing file
    /// is still on the RDS, sorted.
    pub fn abandoned_disks(&self) -> Vec<String> {
        let model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        let slots = self.emulator.disk_slots();
        let files = self.emulator.file_names();
        // A disk is gone once its entry and its backing file are: deleting one is two
        // RouterOS commands (`/disk remove`, then `/file remove`).
        let mut left: Vec<String> = model
            .volumes
            .iter()
            .filter(|(_, v)| v.abandoned)
            .map(|(s, _)| s)
            .chain(
                model
                    .snapshots
                    .iter()
                    .filter(|(_, v)| v.abandoned)
                    .map(|(s, _)| s),
            )
            .filter(|s| slots.contains(*s) || files.iter().any(|f| f.contains(&format!("/{s}."))))
            .cloned()
            .collect();
        left.sort();
        left.dedup();
        left
    }

    /// Why the disk in `slot` is wanted now, if it is: a PersistentVolume or a
    /// VolumeSnapshotContent references it, or the CO has its CreateVolume in flight.
    pub fn wanted(&self, slot: &str) -> Option<String> {
        let pvs = self.api.objects(Kind::PersistentVolume);
        if let Some(pv) = pvs
            .iter()
            .find(|pv| pv["spec"]["csi"]["volumeHandle"] == slot)
        {
            return Some(format!(
                "PersistentVolume {} references it",
                pv["metadata"]["name"]
            ));
        }
        let vscs = self.api.objects(Kind::VolumeSnapshotContent);
        if let Some(vsc) = vscs.iter().find(|c| {
            c["status"]["snapshotHandle"] == slot || c["spec"]["source"]["snapshotHandle"] == slot
        }) {
            return Some(format!(
                "VolumeSnapshotContent {} references it",
                vsc["metadata"]["name"]
            ));
        }
        let model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        model
            .creating
            .contains(slot)
            .then(|| "the CO's CreateVolume of it is in flight".to_string())
    }
}

/// Namespace of the workload's PersistentVolumeClaims.
pub const CLAIM_NAMESPACE: &str = "sim";

/// The claim bound to `volume`'s PV (in [`CLAIM_NAMESPACE`]).
pub fn claim_name(volume: &str) -> String {
    format!("claim-{volume}")
}

/// The life of one node's machine: lost (Node object deleted) and replaced by a fresh
/// machine under the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLife {
    /// Bumped when the machine is lost: work begun on an older generation was on a
    /// machine that is gone.
    pub generation: u64,
    /// Whether the machine is down (lost, not replaced yet).
    pub down: bool,
    /// When each past generation was lost (index = generation).
    pub lost_at: Vec<Duration>,
}

impl Shared {
    /// A fresh world state for `opts`.
    pub fn new(opts: Options) -> Self {
        let trace = Trace::default();
        let emulator = Emulator::in_memory(
            PoolConfig {
                slot: POOL.into(),
                mount_point: POOL.into(),
                size_bytes: 1 << 40,
            },
            Arc::new(SimClock(trace.time().clone())),
        );
        let kernels = (0..opts.nodes)
            .map(|i| FakeKernel::new(DEFAULT_NQN_PREFIX, &host_nqn_of_machine(i, 0)))
            .collect();
        let nodes = vec![NodeLife::default(); opts.nodes];
        let partitioned = Arc::new(Mutex::new(vec![None; opts.nodes]));
        Self {
            opts: Arc::new(opts),
            trace,
            api: FakeApi::new(),
            emulator: Arc::new(emulator),
            kernels,
            model: Arc::default(),
            managers: Arc::default(),
            leader: Arc::new(Mutex::new(Leader {
                active: CONTROLLERS[0],
                stale: None,
            })),
            crash: Arc::default(),
            incarnation: Arc::default(),
            nodes: Arc::new(Mutex::new(nodes)),
            co_violations: Arc::default(),
            ops: Ops::default(),
            exports: Arc::default(),
            partitioned,
            reattach: Arc::default(),
            events: Arc::default(),
        }
    }

    /// Node `i` is partitioned while alive since `since` (`None`: reachable again).
    pub fn set_partitioned(&self, i: usize, since: Option<Duration>) {
        self.partitioned.lock().unwrap_or_else(|p| p.into_inner())[i] = since;
    }

    /// Every node's kubelet reports its Node status as the real one does: `Ready` while it
    /// reaches the control plane, and `volumesInUse`, the volumes with a mount or a raw
    /// block bind on its machine (the driver waits for that list on a Ready node before it
    /// detaches). A node partitioned while alive stops reporting: its Node is
    /// `Ready=Unknown` (at once here: the node lifecycle controller's 40 s grace is far
    /// inside the 6-minute force-detach) and keeps its last list. Written on a change
    /// only, after every step (so the same whatever the stepping).
    pub fn report_node_status(&self) {
        for (i, kernel) in self.kernels.iter().enumerate() {
            let name = node_name(i);
            let Some(mut node) = self.api.object(Kind::Node, "", &name) else {
                continue;
            };
            let reporting = self.partitioned_since(i).is_none();
            let mut status = node
                .get("status")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            status["conditions"] = serde_json::json!([{
                "type": "Ready",
                "status": if reporting { "True" } else { "Unknown" },
            }]);
            if reporting {
                let conns =
                    futures::executor::block_on(rds_csi::ports::Initiator::connections(kernel))
                        .unwrap_or_default();
                let mut in_use: Vec<String> = conns
                    .iter()
                    .filter(|c| in_use(kernel, &c.device))
                    .filter_map(|c| c.nqn.strip_prefix(DEFAULT_NQN_PREFIX))
                    .filter_map(|slot| VolumeId::new(slot).ok())
                    .map(|v| rds_csi::kube::cluster::unique_volume_name(DRIVER, v.as_str()))
                    .collect();
                in_use.sort();
                in_use.dedup();
                status["volumesInUse"] = serde_json::json!(in_use);
            }
            if node.get("status") != Some(&status) {
                node["status"] = status;
                self.api.put_object(Kind::Node, "", node);
            }
        }
    }

    /// Since when node `i` is partitioned while alive, if it is.
    pub fn partitioned_since(&self, i: usize) -> Option<Duration> {
        self.partitioned.lock().unwrap_or_else(|p| p.into_inner())[i]
    }

    /// The external-attacher asks for (volume, node) to be re-attached.
    pub fn request_reattach(&self, volume: &str, node: &str) {
        self.reattach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((volume.to_string(), node.to_string()));
    }

    /// Takes a re-attach request for (volume, node), if there is one.
    pub fn take_reattach(&self, volume: &str, node: &str) -> bool {
        self.reattach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(volume.to_string(), node.to_string()))
    }

    /// The host NQN node `i`'s machine has now (a re-provisioned machine has a new one).
    pub fn host_nqn_now(&self, i: usize) -> String {
        host_nqn_of_machine(i, self.node_life(i).generation)
    }

    /// The holders of `volume` as its PV's annotations name them (`None`: no PV): the
    /// durable records.
    pub fn stored_holders(&self, volume: &str) -> Option<std::collections::BTreeSet<String>> {
        let pv = self
            .api
            .object(rds_csi::kube::fake_api::Kind::PersistentVolume, "", volume)?;
        let nodes = pv
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(rds_csi::kube::pv_store::ANN_ATTACHED_NODE))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        Some(
            nodes
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    /// The node whose current machine has host NQN `nqn`, if any.
    pub fn node_with_host_nqn(&self, nqn: &str) -> Option<usize> {
        (0..self.opts.nodes).find(|&i| self.host_nqn_now(i) == nqn)
    }

    /// Mirrors the RDS's export allow lists into the kernels (the data path): a kernel is
    /// refused new connections to an export that allows another host. Cheap when nothing
    /// changed, so it runs after every step.
    pub fn sync_data_path(&self) {
        let now = self.emulator.exports();
        let mut last = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return;
        }
        for (i, kernel) in self.kernels.iter().enumerate() {
            let me = self.host_nqn_now(i);
            for e in now.values() {
                kernel.refuse(&e.nqn, e.allow_host.as_ref().is_some_and(|h| *h != me));
            }
        }
        *last = now;
    }

    /// Forgets the allow lists last mirrored, so the next [`Self::sync_data_path`] mirrors
    /// them again (a kernel's host NQN changed).
    pub fn forget_data_path(&self) {
        self.exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn node_lives(&self) -> std::sync::MutexGuard<'_, Vec<NodeLife>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The life of node `i`.
    pub fn node_life(&self, i: usize) -> NodeLife {
        self.node_lives()[i].clone()
    }

    /// Node `i`'s machine is lost at `now`.
    pub fn lose_node(&self, i: usize, now: Duration) {
        let mut lives = self.node_lives();
        let life = &mut lives[i];
        life.lost_at.push(now);
        life.generation += 1;
        life.down = true;
    }

    /// Node `i` is back (a fresh machine).
    pub fn restore_node(&self, i: usize) {
        self.node_lives()[i].down = false;
    }

    /// The nodes whose machine is up and reachable: where pods can be scheduled.
    pub fn schedulable_nodes(&self) -> Vec<usize> {
        self.live_nodes()
            .into_iter()
            .filter(|&i| self.partitioned_since(i).is_none())
            .collect()
    }

    /// The nodes whose machine is up.
    pub fn live_nodes(&self) -> Vec<usize> {
        self.node_lives()
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.down)
            .map(|(i, _)| i)
            .collect()
    }

    /// Records an answer the spec forbids.
    pub fn co_violation(&self, what: String) {
        self.co_violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    /// The manager of `replica`'s running incarnation, if it started.
    pub fn manager(&self, replica: &str) -> Option<Arc<AttachmentManager>> {
        self.managers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(replica)
            .cloned()
    }

    /// The current leader and stale replica.
    pub fn leader(&self) -> Leader {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the leader and stale replica.
    pub fn set_leader(&self, l: Leader) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }
}

/// The controller replicas (hosts).
pub const CONTROLLERS: [&str; 2] = ["controller", "controller-b"];

/// Which controller replica leads, and which former leader still runs (stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leader {
    /// Where the CO sends its calls.
    pub active: &'static str,
    /// A former leader that has not noticed yet (gets the CO's stale repeats).
    pub stale: Option<&'static str>,
}

/// The name of node host `i` (0-based).
pub fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// The index of the node host named `name`.
pub fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix("node-")?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// The NVMe host NQN of the machine of generation `generation` of node `i`: a node
/// re-provisioned under the same name (a fresh machine after a loss) has a new one.
pub fn host_nqn_of_machine(i: usize, generation: u64) -> String {
    match generation {
        0 => format!("nqn.2014-08.org.nvmexpress:uuid:{}", node_name(i)),
        g => format!("nqn.2014-08.org.nvmexpress:uuid:{}-g{g}", node_name(i)),
    }
}

/// Node `i`'s Node object for its machine of generation `generation`, carrying that
/// machine's host NQN as the node plugin publishes it.
pub fn node_object(i: usize, generation: u64) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": node_name(i),
            "annotations": {
                (rds_csi::kube::cluster::ANN_HOST_NQN): host_nqn_of_machine(i, generation),
            },
        },
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---- Transport plumbing ----------------------------------------------------------------

/// A turmoil TCP stream with the `Connected` tonic's server needs.
pub struct SimIo(pub turmoil::net::TcpStream);

impl AsyncRead for SimIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for SimIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// The accepted connections of `listener`, as the stream `server::serve` takes.
fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<SimIo>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| SimIo(s));
        Some((next, l))
    })
}

/// Opens a CSI channel to `host`:`port` over turmoil TCP (one connection per channel).
pub async fn csi_channel(
    host: String,
    port: u16,
    rpc_timeout: Duration,
) -> Result<Channel, BoxError> {
    let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(rpc_timeout);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let host = host.clone();
            async move {
                turmoil::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await?;
    Ok(channel)
}

/// The `kube::Client` transport: one turmoil TCP connection per request, bounded by
/// [`KUBE_TIMEOUT`], the whole answer read inside the bound; a watch's answer is a stream
/// instead, its head bounded by [`KUBE_TIMEOUT`] and each later chunk by [`WATCH_IDLE`]
/// (turmoil drops segments without a reset: a watch cut by a partition would otherwise
/// wait forever; the server sends a bookmark every minute, so a silent minute and more is
/// a dead stream).
#[derive(Debug, Clone, Copy)]
pub struct KubeHttp;

/// How long a watch stream may stay silent before the client gives it up.
pub const WATCH_IDLE: Duration = Duration::from_secs(75);

/// A response body of [`KubeHttp`].
type KubeBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A streamed body whose every frame must come within `idle` of the previous one.
struct IdleBody {
    inner: hyper::body::Incoming,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let at = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(at);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("watch stream silent too long".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tower::Service<http::Request<kube::client::Body>> for KubeHttp {
    type Response = http::Response<KubeBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let watch = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        Box::pin(async move {
            let exchange = async move {
                let stream = turmoil::net::TcpStream::connect(("kube", KUBE_PORT)).await?;
                let (mut tx, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let resp = tx.send_request(req).await?;
                let (parts, body) = resp.into_parts();
                let body: KubeBody = if watch {
                    IdleBody {
                        inner: body,
                        idle: WATCH_IDLE,
                        timer: Box::pin(tokio::time::sleep(WATCH_IDLE)),
                    }
                    .boxed_unsync()
                } else {
                    let bytes = body.collect().await?.to_bytes();
                    Full::new(bytes)
                        .map_err(|never| match never {})
                        .boxed_unsync()
                };
                Ok::<_, BoxError>(http::Response::from_parts(parts, body))
            };
            match tokio::time::timeout(KUBE_TIMEOUT, exchange).await {
                Ok(r) => r,
                Err(_) => Err("API request timed out".into()),
            }
        })
    }
}

/// Connects the RDS adapter to the `rds` host.
#[derive(Debug, Clone, Copy)]
pub struct RdsConnector;

#[async_trait::async_trait]
impl Connector for RdsConnector {
    type Io = turmoil::net::TcpStream;
    async fn connect(&self) -> std::io::Result<Self::Io> {
        turmoil::net::TcpStream::connect(("rds", RDS_PORT)).await
    }
    fn describe(&self) -> String {
        format!("rds:{RDS_PORT}")
    }
}

// ---- Hosts -----------------------------------------------------------------------------

/// The `kube` host: serves the fake API over HTTP/1.1 with a fixed `date` header.
pub async fn kube_host(api: FakeApi) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", KUBE_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let api = api.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let api = api.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let pq = parts
                            .uri
                            .path_and_query()
                            .map(|p| p.as_str().to_string())
                            .unwrap_or_default();
                        // A watch answers a stream; every response has a fixed `date`.
                        let resp = api.respond(&parts.method, &pq, &body).await.into_response();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The `rds` host: the emulator over its TCP line protocol.
pub async fn rds_host(emulator: Arc<Emulator>) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", RDS_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let emu = Arc::clone(&emulator);
        tokio::spawn(async move {
            let _ = serve_connection(emu, stream).await;
        });
    }
}

/// Period of the orphan volume reconciler (when the knob runs it).
pub const ORPHAN_INTERVAL: Duration = Duration::from_secs(10);
/// Period of the attachment reconciler (when the knob runs it).
pub const ATTACHMENT_RECONCILE: Duration = Duration::from_secs(20);

/// The settings of the plugin on host `name` in `mode`: the embedded defaults with the
/// simulation's short retries, resync interval, fence knob and kubelet root.
fn settings(name: &str, mode: Mode, opts: &Options) -> Result<Settings, String> {
    let node_id = NodeId::new(name).map_err(|e| e.to_string())?;
    let mut s = Settings::embedded(node_id, mode, "/nonexistent/sim-state".into());
    s.version = "sim".into();
    s.rds.layout = RdsLayout {
        volume_base_path: VOLUME_PATH.into(),
        pool_mount_point: POOL.into(),
    };
    s.rds.retry = BACKOFF;
    s.kube.retry = BACKOFF;
    s.attachment = AttachmentConfig {
        // The controllers follow the PVs by watch: no periodic resync.
        resync_interval: Duration::ZERO,
        data_path_fence: opts.data_path_fence,
        ..AttachmentConfig::default()
    };
    s.node.options = NodeOptions {
        allowed_root: Some(KUBELET_ROOT.into()),
        nqn_prefix: DEFAULT_NQN_PREFIX.into(),
        require_target_address: true,
        ..NodeOptions::default()
    };
    s.node.orphans = ORPHAN_SWEEP;
    // The controller's reconcilers, when the knob runs them.
    s.orphan_volumes = OrphanVolumeConfig {
        mode: match (opts.reconcilers, opts.orphan_delete) {
            (false, _) => OrphanMode::Off,
            (true, false) => OrphanMode::DryRun,
            (true, true) => OrphanMode::Delete,
        },
        interval: ORPHAN_INTERVAL,
        grace: Duration::from_secs(opts.orphan_grace_secs),
    };
    s.reconcile.attachment_interval = if opts.reconcilers {
        ATTACHMENT_RECONCILE
    } else {
        Duration::ZERO
    };
    Ok(s)
}

/// The scenario's wrappers around a controller replica's ports: crash points and planted
/// bugs at the store, planted bugs at the cluster, the RDS and the RouterOS transport, and the
/// no-overlap checker's call tracking at the RDS and the store.
struct ControllerLayers {
    sh: Shared,
    name: &'static str,
}

impl PortLayers for ControllerLayers {
    fn transport(&self, port: Arc<dyn Transport>) -> Arc<dyn Transport> {
        crate::bugs::wrap_transport(port, self.sh.opts.bug)
    }
    fn rds(&self, port: Arc<dyn Rds>) -> Arc<dyn Rds> {
        let port = crate::bugs::wrap_rds(port, self.sh.opts.bug);
        let (sh, ops, name) = (self.sh.clone(), self.sh.ops.clone(), self.name);
        let port = crate::reconciled::judge_deletes(
            port,
            Arc::new({
                let sh = sh.clone();
                move |slot: &str| sh.wanted(slot)
            }),
            Arc::new(move || ops.current_method()),
            Arc::new(move |slot: &str, wanted: Option<String>| {
                sh.trace
                    .log(name, format!("orphan reconciler deletes {slot}"));
                let wanted = match wanted {
                    None if !sh.opts.orphan_delete => Some("the reconciler runs a dry run".into()),
                    w => w,
                };
                if let Some(why) = wanted {
                    sh.co_violations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!(
                            "the orphan reconciler on {name} deleted {slot} while {why}"
                        ));
                }
            }),
        );
        Arc::new(Tracked::new(port, self.name, &self.sh.ops))
    }
    fn store(&self, port: Arc<dyn AttachmentStore>) -> Arc<dyn AttachmentStore> {
        let port = crate::crash::wrap_store(port, &self.sh.crash, self.name);
        let ops = self.sh.ops.clone();
        let port = crate::bugs::wrap_store(
            port,
            self.sh.opts.bug,
            Arc::new(move || ops.current_method()),
        );
        Arc::new(Tracked::new(port, self.name, &self.sh.ops))
    }
    fn cluster(&self, port: Arc<dyn Cluster>) -> Arc<dyn Cluster> {
        let port = crate::bugs::wrap_cluster(port, self.sh.opts.bug);
        crate::events::audit(port, Arc::clone(&self.sh.events))
    }
    fn watch(&self, port: Arc<dyn ClusterWatch>) -> Arc<dyn ClusterWatch> {
        crate::bugs::wrap_watch(port, self.sh.opts.bug)
    }
}

/// Finishes start-up (retrying while the backend is unreachable), then serves CSI on
/// [`CSI_PORT`] — and, for a controller (`reissue`), on [`REISSUE_PORT`] too: from the same
/// service, or with [`Bug::ReissuedPublishSkipsLock`] from a second instance (its own
/// in-flight table).
async fn start_and_serve(
    plugin: Plugin,
    trace: &Trace,
    who: &'static str,
    name: &str,
    reissue: Option<Option<Bug>>,
) -> turmoil::Result {
    let mut attempt = 0u32;
    loop {
        match plugin.start().await {
            Ok(()) => break,
            Err(e) => {
                attempt += 1;
                trace.log(
                    who,
                    format!("{name} start-up failed (attempt {attempt}): {}", kind_of(e)),
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    trace.log(who, format!("{name} ready"));
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", CSI_PORT)).await?;
    let serve = |services, incoming| {
        rds_csi::server::serve(
            services,
            incoming,
            std::future::pending::<()>(),
            Duration::ZERO,
        )
    };
    match reissue {
        None => serve(plugin.services(), incoming(listener).boxed()).await,
        Some(bug) => {
            let second = turmoil::net::TcpListener::bind(("0.0.0.0", REISSUE_PORT)).await?;
            if bug == Some(Bug::ReissuedPublishSkipsLock) {
                let (a, b) = tokio::join!(
                    serve(plugin.services(), incoming(listener).boxed()),
                    serve(
                        plugin.services_with_own_inflight(),
                        incoming(second).boxed()
                    ),
                );
                a.and(b)
            } else {
                let both = futures::stream::select(incoming(listener), incoming(second));
                serve(plugin.services(), both.boxed()).await
            }
        }
    }
    .map_err(|e| e.to_string())?;
    Ok(())
}

fn kind_of(e: rds_csi::Error) -> String {
    tonic::Status::from(e).code().description().to_string()
}

/// A controller replica host (`name`), one incarnation: the plugin built by the
/// composition root over the `kube` and `rds` hosts (reached over turmoil TCP, the kube
/// client built inside the host) with the scenario's port wrappers, then served.
pub async fn controller_host(sh: Shared, name: &'static str) -> turmoil::Result {
    let inc = sh.incarnation.fetch_add(1, Ordering::SeqCst);
    sh.trace
        .log("ctrl", format!("{name}: incarnation {inc} starting"));
    let mut seams = Seams::with(
        Arc::new(SimClock(sh.trace.time().clone())),
        Arc::new(SeededEntropy::from_seed(
            sh.opts.seed ^ 0xc0_47_80_11 ^ (inc << 32),
        )),
    );
    seams.kube = Some(kube::Client::new(KubeHttp, "default"));
    seams.rds_transport = Some(Arc::new(TcpTransport::new(
        RdsConnector,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )));
    seams.layers = Arc::new(ControllerLayers {
        sh: sh.clone(),
        name,
    });
    let plugin = compose::build(&settings(name, Mode::Controller, &sh.opts)?, seams)
        .map_err(|e| e.to_string())?;
    if let Some(manager) = plugin.attachments() {
        sh.managers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), manager);
    }
    start_and_serve(plugin, &sh.trace, "ctrl", name, Some(sh.opts.bug)).await
}

/// The `node-<i+1>` host, one incarnation: the plugin built by the composition root over
/// its kernel (tracked for the no-overlap checker, the initiator with the planted bug if
/// it is a node bug) and a Kubernetes client of its own (its host NQN, the VolumeAttachments
/// its orphan sweep judges by), then served.
pub async fn node_host(sh: Shared, i: usize) -> turmoil::Result {
    let kernel = Arc::new(Tracked::new(
        Arc::new(sh.kernels[i].clone()),
        &node_name(i),
        &sh.ops,
    ));
    let mut seams = Seams::with(
        Arc::new(SimClock(sh.trace.time().clone())),
        Arc::new(SeededEntropy::from_seed(
            sh.opts.seed ^ (i as u64 + 1) << 40,
        )),
    );
    seams.kernel = Some(Kernel {
        initiator: crate::bugs::wrap_initiator(kernel.clone(), sh.opts.bug),
        mounter: kernel,
    });
    seams.kube = Some(kube::Client::new(KubeHttp, "default"));
    let plugin = compose::build(&settings(&node_name(i), Mode::Node, &sh.opts)?, seams)
        .map_err(|e| e.to_string())?;
    start_and_serve(plugin, &sh.trace, "node", "", None).await
}

/// Whether `device` is in use on `kernel`: a filesystem on it is mounted, or it is bound as a
/// raw block device.
pub fn in_use(kernel: &FakeKernel, device: &std::path::Path) -> bool {
    futures::executor::block_on(async {
        let Ok(number) = Mounter::device_number(kernel, device).await else {
            return false;
        };
        let mounted = Mounter::mounts(kernel)
            .await
            .is_ok_and(|ms| ms.iter().any(|m| m.dev == number));
        mounted
            || Mounter::device_binds(kernel, device)
                .await
                .is_ok_and(|b| !b.is_empty())
    })
}
