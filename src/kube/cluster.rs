//! The `Cluster` port over the Kubernetes API (production): Node existence and host NQN
//! (Node annotation [`ANN_HOST_NQN`]), VolumeAttachments of this driver, of all nodes or of
//! one (paginated LIST, PV names resolved to volume handles through the shared [`PvIndex`],
//! else one GET of the PV), and Events; the node plugin publishes its host NQN with one
//! merge PATCH of its Node's annotations. Transient failures are retried with the seeded
//! [`Backoff`].
//!
//! Events (core/v1) are recorded where operators look: on the PersistentVolumeClaim bound
//! to the volume's PV (its `spec.claimRef`, read with one GET and cached for
//! [`CLAIM_CACHE_TTL`]), in the claim's namespace; on the PV (in `default`) when it has no
//! claim or is gone. They are aggregated as Kubernetes' own event recorder does: a repeat of
//! an event this instance recorded — same object, type, reason and message — is one merge
//! PATCH of the recorded Event's `count` and `lastTimestamp`, not a new object (a PATCH
//! answered 404, the Event expired, creates it again). The cache of recorded events holds
//! the [`EVENT_CACHE_SIZE`] most recently used. Each instance names itself in
//! `reportingInstance`. Identical events recorded concurrently may both create an object
//! (as Kubernetes' recorder may across replicas); the driver records a volume's events
//! under its in-flight guard, so it does not.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use crate::kube::pv_store::{
    Failure, ListLite, MetaLite, PvIndex, PvLite, format_time, request_retrying,
};
use crate::ports::cluster::{
    Cluster, ClusterError, ClusterEvent, DiskReferences, NodeReport, VolumeAttachmentInfo,
};
use crate::ports::{Clock, Entropy};
use crate::retry::Backoff;
use crate::types::{NodeId, VolumeId};

/// Node annotation holding the node's NVMe host NQN (set by the node plugin).
pub const ANN_HOST_NQN: &str = "rds.csi.srvlab.io/host-nqn";

/// How long a positive Node answer is reused by `node_known`. `node_exists` and
/// `node_host_nqn` always ask.
pub const NODE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Cache size beyond which expired entries are pruned.
const NODE_CACHE_PRUNE: usize = 4096;
/// How long the claim bound to a PV is reused for its events.
pub const CLAIM_CACHE_TTL: Duration = Duration::from_secs(300);
/// Recorded events remembered for aggregation (the most recently used).
pub const EVENT_CACHE_SIZE: usize = 4096;

const VA_PATH: &str = "/apis/storage.k8s.io/v1/volumeattachments";
const PV_PATH: &str = "/api/v1/persistentvolumes";
const VSC_PATH: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";

/// The parts of a VolumeSnapshotContent the orphan reconciler reads.
#[derive(Debug, Deserialize)]
struct VscLite {
    #[serde(default)]
    spec: VscSpec,
    #[serde(default)]
    status: Option<VscStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VscSpec {
    #[serde(default)]
    driver: String,
    #[serde(default)]
    source: VscSource,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VscSource {
    #[serde(default)]
    snapshot_handle: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VscStatus {
    #[serde(default)]
    snapshot_handle: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NodeLite {
    #[serde(default)]
    metadata: MetaLite,
    #[serde(default)]
    status: NodeStatusLite,
}

/// What the kubelet reports in a Node's status that the driver reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatusLite {
    #[serde(default)]
    conditions: Vec<ConditionLite>,
    /// Unique volume names (`kubernetes.io/csi/<driver>^<handle>`) the kubelet has mounted
    /// or mapped.
    #[serde(default)]
    volumes_in_use: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConditionLite {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

impl NodeLite {
    fn ready(&self) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == "True")
    }
}

/// The name the kubelet gives a CSI volume (`volume`: its handle) in
/// `Node.status.volumesInUse`.
pub fn unique_volume_name(driver: &str, volume: &str) -> String {
    format!("kubernetes.io/csi/{driver}^{volume}")
}

#[derive(Debug, Deserialize)]
struct VaLite {
    #[serde(default)]
    metadata: VaMeta,
    spec: VaSpec,
    #[serde(default)]
    status: Option<VaStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VaMeta {
    #[serde(default)]
    deletion_timestamp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VaSpec {
    attacher: String,
    node_name: String,
    #[serde(default)]
    source: VaSource,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VaSource {
    #[serde(default)]
    persistent_volume_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct VaStatus {
    #[serde(default)]
    attached: bool,
}

/// The name Kubernetes' attach/detach controller gives the VolumeAttachment of volume
/// handle `volume` on `node` for `driver`: `csi-` + the hex SHA-256 of the three,
/// concatenated.
pub fn volume_attachment_name(volume: &VolumeId, driver: &str, node: &NodeId) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{volume}{driver}{node}").as_bytes());
    let mut name = String::with_capacity(4 + 64);
    name.push_str("csi-");
    for b in digest.iter() {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// The orchestrator is Kubernetes.
pub struct KubeCluster {
    client: ::kube::Client,
    driver_name: String,
    event_namespace: String,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    backoff: Backoff,
    index: Arc<PvIndex>,
    /// Nodes seen to exist: when, and their host NQN.
    nodes: Mutex<BTreeMap<NodeId, (tokio::time::Instant, Option<String>)>>,
    /// PV name → when read, and the claim bound to it (namespace, name).
    claims: Mutex<BTreeMap<String, (tokio::time::Instant, Option<Claim>)>>,
    /// Events this instance recorded, for aggregation.
    recorded: Mutex<Recorded>,
    /// `reportingInstance` of this instance's events (drawn at the first event).
    instance: std::sync::OnceLock<String>,
}

/// A PersistentVolumeClaim: (namespace, name).
type Claim = (String, String);

/// What makes two events the same (Kubernetes' recorder key, less what is constant for
/// one instance): the object's (kind, namespace, name), type, reason, message.
type EventKey = (&'static str, String, String, &'static str, String, String);

/// One Event object this instance created.
#[derive(Debug, Clone)]
struct RecordedEvent {
    namespace: String,
    name: String,
    count: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Recorded {
    events: BTreeMap<EventKey, RecordedEvent>,
    uses: u64,
}

impl Recorded {
    /// The recorded Event for `key`, its count bumped, if this instance has one.
    fn repeat(&mut self, key: &EventKey) -> Option<RecordedEvent> {
        self.uses += 1;
        let used = self.uses;
        let e = self.events.get_mut(key)?;
        e.count += 1;
        e.used = used;
        Some(e.clone())
    }

    fn insert(&mut self, key: EventKey, mut e: RecordedEvent) {
        self.uses += 1;
        e.used = self.uses;
        if self.events.len() >= EVENT_CACHE_SIZE && !self.events.contains_key(&key) {
            let oldest = self
                .events
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.events.remove(&k);
            }
        }
        self.events.insert(key, e);
    }
}

#[derive(Debug, Deserialize)]
struct PvClaimLite {
    #[serde(default)]
    spec: PvClaimSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PvClaimSpec {
    #[serde(default)]
    claim_ref: Option<ClaimRefLite>,
}

#[derive(Debug, Default, Deserialize)]
struct ClaimRefLite {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("driver_name", &self.driver_name)
            .finish_non_exhaustive()
    }
}

impl KubeCluster {
    /// The cluster behind `client`; events of cluster-scoped objects go to
    /// `event_namespace` (Kubernetes uses `default`).
    pub fn new(
        client: ::kube::Client,
        driver_name: impl Into<String>,
        event_namespace: impl Into<String>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        backoff: Backoff,
        index: Arc<PvIndex>,
    ) -> Self {
        Self {
            client,
            driver_name: driver_name.into(),
            event_namespace: event_namespace.into(),
            clock,
            entropy,
            backoff,
            index,
            nodes: Mutex::new(BTreeMap::new()),
            claims: Mutex::new(BTreeMap::new()),
            recorded: Mutex::new(Recorded::default()),
            instance: std::sync::OnceLock::new(),
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, (tokio::time::Instant, Option<String>)>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A recent positive answer about `node`: `Some(host_nqn)`.
    fn cached(&self, node: &NodeId) -> Option<Option<String>> {
        let nodes = self.nodes();
        let (at, nqn) = nodes.get(node)?;
        (at.elapsed() < NODE_CACHE_TTL).then(|| nqn.clone())
    }

    /// GETs `node`, caching the answer; `Some(host_nqn)` when it exists.
    async fn fetch_node(&self, node: &NodeId) -> Result<Option<Option<String>>, ClusterError> {
        let found = self.node(node).await?.map(|n| {
            n.metadata
                .annotations
                .and_then(|mut a| a.remove(ANN_HOST_NQN))
                .filter(|s| !s.is_empty())
        });
        let mut nodes = self.nodes();
        match &found {
            Some(nqn) => {
                if nodes.len() >= NODE_CACHE_PRUNE {
                    nodes.retain(|_, (at, _)| at.elapsed() < NODE_CACHE_TTL);
                }
                nodes.insert(node.clone(), (tokio::time::Instant::now(), nqn.clone()));
            }
            None => {
                nodes.remove(node);
            }
        }
        Ok(found)
    }

    /// Sends `req` (rebuilt by `make` for each attempt), retrying transient failures.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        make: impl Fn() -> Result<http::Request<Vec<u8>>, ::kube::core::request::Error>,
    ) -> Result<Result<T, Failure>, ClusterError> {
        request_retrying(&self.client, &self.backoff, &*self.entropy, what, make).await
    }

    async fn node(&self, node: &NodeId) -> Result<Option<NodeLite>, ClusterError> {
        let what = format!("GET Node {node}");
        match self
            .call::<NodeLite>(&what, || {
                ::kube::core::Request::new("/api/v1/nodes").get(node.as_str(), &Default::default())
            })
            .await?
        {
            Ok(n) => Ok(Some(n)),
            Err(Failure::Status(404, _)) => Ok(None),
            Err(f) => Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        }
    }

    /// The claim bound to PV `pv_name`, if any (cached for [`CLAIM_CACHE_TTL`]).
    async fn claim_of(&self, pv_name: &str) -> Result<Option<Claim>, ClusterError> {
        {
            let claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, claim)) = claims.get(pv_name)
                && at.elapsed() < CLAIM_CACHE_TTL
            {
                return Ok(claim.clone());
            }
        }
        let what = format!("GET PersistentVolume {pv_name}");
        let claim = match self
            .call::<PvClaimLite>(&what, || {
                ::kube::core::Request::new("/api/v1/persistentvolumes")
                    .get(pv_name, &Default::default())
            })
            .await?
        {
            Ok(pv) => pv
                .spec
                .claim_ref
                .filter(|c| !c.name.is_empty() && !c.namespace.is_empty())
                .map(|c| (c.namespace, c.name)),
            // A PV gone: its events go to its name, as before it was deleted.
            Err(Failure::Status(404, _)) => None,
            Err(f) => return Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        };
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        if claims.len() >= NODE_CACHE_PRUNE {
            claims.retain(|_, (at, _)| at.elapsed() < CLAIM_CACHE_TTL);
        }
        claims.insert(pv_name.to_string(), (tokio::time::Instant::now(), claim.clone()));
        Ok(claim)
    }

    /// Creates the Event `body` in `namespace`.
    async fn create_event(&self, namespace: &str, body: &serde_json::Value) -> Result<(), ClusterError> {
        let data = serde_json::to_vec(body).map_err(|e| ClusterError::Other(e.to_string()))?;
        let path = format!("/api/v1/namespaces/{namespace}/events");
        match self
            .call::<serde_json::Value>("POST Event", || {
                ::kube::core::Request::new(path.as_str()).create(&Default::default(), data.clone())
            })
            .await?
        {
            // The name is ours and fresh: an earlier attempt whose answer was lost created
            // it (found by reasoning about lost replies; a second object would break the
            // aggregation).
            Ok(_) | Err(Failure::Status(409, _)) => Ok(()),
            Err(f) => Err(ClusterError::Other(format!("POST Event: {}", f.describe()))),
        }
    }

    /// Bumps a recorded Event's count; `Ok(false)` when it is gone (expired).
    async fn bump_event(&self, e: &RecordedEvent, now_secs: &str) -> Result<bool, ClusterError> {
        let patch = json!({ "count": e.count, "lastTimestamp": now_secs });
        let path = format!("/api/v1/namespaces/{}/events", e.namespace);
        let what = format!("PATCH Event {}", e.name);
        match self
            .call::<serde_json::Value>(&what, || {
                ::kube::core::Request::new(path.as_str()).patch(
                    &e.name,
                    &Default::default(),
                    &::kube::api::Patch::Merge(&patch),
                )
            })
            .await?
        {
            Ok(_) => Ok(true),
            Err(Failure::Status(404, _)) => Ok(false),
            Err(f) => Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        }
    }

    /// Every object of the collection at `path` (paginated LIST), handed to `each`;
    /// `Ok(false)` when the API serves no such collection (404: e.g. the snapshot CRDs are
    /// not installed).
    async fn list_pages<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
        mut each: impl FnMut(T),
    ) -> Result<bool, ClusterError> {
        let mut token: Option<String> = None;
        loop {
            let page = match self
                .call::<ListLite<T>>(what, || {
                    let mut lp = ::kube::api::ListParams::default()
                        .limit(crate::kube::pv_store::LIST_PAGE);
                    if let Some(t) = &token {
                        lp = lp.continue_token(t);
                    }
                    ::kube::core::Request::new(path).list(&lp)
                })
                .await?
            {
                Ok(p) => p,
                Err(Failure::Status(404, _)) if token.is_none() => return Ok(false),
                Err(f) => return Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
            };
            page.items.into_iter().for_each(&mut each);
            match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => return Ok(true),
            }
        }
    }

    /// The references to this driver's disks, read now: every PV's volume handle, every
    /// VolumeSnapshotContent's snapshot handle.
    async fn list_references(&self) -> Result<DiskReferences, ClusterError> {
        let mut refs = DiskReferences::default();
        let driver = self.driver_name.as_str();
        self.list_pages::<PvLite>(PV_PATH, "LIST PersistentVolumes", |pv| {
            if let Some(csi) = pv.spec.csi.filter(|c| c.driver == driver) {
                refs.volumes.insert(csi.volume_handle);
            }
        })
        .await?;
        let mut snapshots = std::collections::BTreeSet::new();
        let served = self
            .list_pages::<VscLite>(VSC_PATH, "LIST VolumeSnapshotContents", |vsc| {
                if vsc.spec.driver != driver {
                    return;
                }
                let handles = [
                    vsc.spec.source.snapshot_handle,
                    vsc.status.and_then(|s| s.snapshot_handle),
                ];
                snapshots.extend(handles.into_iter().flatten());
            })
            .await?;
        refs.snapshots = served.then_some(snapshots);
        Ok(refs)
    }

    /// The VolumeAttachments of this driver (on `node` only, when given), their PV names
    /// resolved to volume ids (PVs of other nodes are never fetched), sorted by (volume,
    /// node).
    async fn list_attachments(
        &self,
        node: Option<&NodeId>,
    ) -> Result<Vec<VolumeAttachmentInfo>, ClusterError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = match self
                .call::<ListLite<VaLite>>("LIST VolumeAttachments", || {
                    let mut lp = ::kube::api::ListParams::default().limit(crate::kube::pv_store::LIST_PAGE);
                    if let Some(t) = &token {
                        lp = lp.continue_token(t);
                    }
                    ::kube::core::Request::new(VA_PATH).list(&lp)
                })
                .await?
            {
                Ok(p) => p,
                Err(f) => {
                    return Err(ClusterError::Other(format!(
                        "LIST VolumeAttachments: {}",
                        f.describe()
                    )));
                }
            };
            for va in page.items {
                if va.spec.attacher != self.driver_name
                    || node.is_some_and(|n| n.as_str() != va.spec.node_name)
                {
                    continue;
                }
                let Some(pv) = va.spec.source.persistent_volume_name else {
                    continue;
                };
                let Some(volume_id) = self.volume_of_pv(&pv).await? else {
                    continue;
                };
                let Ok(node_id) = NodeId::new(va.spec.node_name.as_str()) else {
                    continue;
                };
                out.push(VolumeAttachmentInfo {
                    volume_id,
                    node_id,
                    attached: va.status.is_some_and(|s| s.attached),
                    deleting: va.metadata.deletion_timestamp.is_some(),
                });
            }
            match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort_by(|a, b| (&a.volume_id, &a.node_id).cmp(&(&b.volume_id, &b.node_id)));
        Ok(out)
    }

    async fn volume_of_pv(&self, pv_name: &str) -> Result<Option<VolumeId>, ClusterError> {
        if let Some(v) = self.index.volume_of(pv_name) {
            return Ok(Some(v));
        }
        let what = format!("GET PersistentVolume {pv_name}");
        match self
            .call::<PvLite>(&what, || {
                ::kube::core::Request::new("/api/v1/persistentvolumes")
                    .get(pv_name, &Default::default())
            })
            .await?
        {
            Ok(pv) => Ok(pv
                .spec
                .csi
                .filter(|c| c.driver == self.driver_name)
                .and_then(|c| VolumeId::new(c.volume_handle).ok())),
            Err(Failure::Status(404, _)) => Ok(None),
            Err(f) => Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        }
    }
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn node_exists(&self, node: &NodeId) -> Result<bool, ClusterError> {
        Ok(self.fetch_node(node).await?.is_some())
    }

    async fn node_known(&self, node: &NodeId) -> Result<bool, ClusterError> {
        if self.cached(node).is_some() {
            return Ok(true);
        }
        self.node_exists(node).await
    }

    async fn node_report(&self, node: &NodeId) -> Result<Option<NodeReport>, ClusterError> {
        let Some(n) = self.node(node).await? else {
            return Ok(None);
        };
        let prefix = unique_volume_name(&self.driver_name, "");
        let volumes_in_use = n
            .status
            .volumes_in_use
            .iter()
            .filter_map(|name| name.strip_prefix(prefix.as_str()))
            .filter_map(|id| VolumeId::new(id).ok())
            .collect();
        Ok(Some(NodeReport {
            ready: n.ready(),
            volumes_in_use,
        }))
    }

    async fn node_host_nqn(&self, node: &NodeId) -> Result<Option<String>, ClusterError> {
        // Always asked: a Node deleted and re-created under the same name (a re-provisioned
        // machine) carries a new host NQN, and a fence moved to the old one would lock the
        // new machine out of the volume it was just published.
        Ok(self.fetch_node(node).await?.flatten())
    }

    async fn set_node_host_nqn(&self, node: &NodeId, host_nqn: &str) -> Result<(), ClusterError> {
        let nqn = crate::types::Nqn::new(host_nqn)
            .map_err(|e| ClusterError::Other(format!("host NQN of node {node}: {e}")))?;
        // The node owns this key: a plain merge patch, no resourceVersion precondition.
        let patch = json!({ "metadata": { "annotations": { (ANN_HOST_NQN): nqn.as_str() } } });
        let what = format!("PATCH Node {node}");
        match self
            .call::<NodeLite>(&what, || {
                ::kube::core::Request::new("/api/v1/nodes").patch(
                    node.as_str(),
                    &Default::default(),
                    &::kube::api::Patch::Merge(&patch),
                )
            })
            .await?
        {
            Ok(_) => {
                // A cached answer for this node must not hide the new NQN.
                self.nodes().remove(node);
                Ok(())
            }
            Err(f) => Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        }
    }

    async fn volume_attachments(&self) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
        self.list_attachments(None).await.map(Some)
    }

    async fn volume_attachments_on(
        &self,
        node: &NodeId,
    ) -> Result<Option<Vec<VolumeAttachmentInfo>>, ClusterError> {
        self.list_attachments(Some(node)).await.map(Some)
    }

    async fn volume_attachment_exists(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<bool>, ClusterError> {
        Ok(self
            .volume_attachment(volume, node)
            .await?
            .map(|va| va.is_some()))
    }

    async fn volume_attachment(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<Option<VolumeAttachmentInfo>>, ClusterError> {
        // The attach/detach controller names a VolumeAttachment after what it attaches, so
        // one GET answers (no LIST of every VolumeAttachment in the cluster).
        let name = volume_attachment_name(volume, &self.driver_name, node);
        let what = format!("GET VolumeAttachment {name}");
        match self
            .call::<VaLite>(&what, || {
                ::kube::core::Request::new(VA_PATH).get(&name, &Default::default())
            })
            .await?
        {
            Ok(va) => Ok(Some(
                (va.spec.attacher == self.driver_name && va.spec.node_name == node.as_str())
                    .then(|| VolumeAttachmentInfo {
                        volume_id: volume.clone(),
                        node_id: node.clone(),
                        attached: va.status.is_some_and(|s| s.attached),
                        deleting: va.metadata.deletion_timestamp.is_some(),
                    }),
            )),
            Err(Failure::Status(404, _)) => Ok(Some(None)),
            Err(f) => Err(ClusterError::Other(format!("{what}: {}", f.describe()))),
        }
    }

    async fn disk_references(&self, _fresh: bool) -> Result<Option<DiskReferences>, ClusterError> {
        self.list_references().await.map(Some)
    }

    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        let pv_name = self
            .index
            .get(&event.volume_id)
            .map(|r| r.name)
            .unwrap_or_else(|| event.volume_id.to_string());
        // A claim's events live in its namespace; a PV's (cluster-scoped) in ours.
        let (kind, namespace, object) = match self.claim_of(&pv_name).await? {
            Some((ns, name)) => ("PersistentVolumeClaim", ns, name),
            None => ("PersistentVolume", self.event_namespace.clone(), pv_name),
        };
        let kind_type = if event.warning { "Warning" } else { "Normal" };
        let now = format_time(self.clock.now());
        // Seconds precision for the legacy timestamps, as the API server expects.
        let now_secs = format!("{}Z", now.get(..19).unwrap_or(&now));
        let key: EventKey = (
            kind,
            namespace.clone(),
            object.clone(),
            kind_type,
            event.reason.clone(),
            event.message.clone(),
        );
        let repeat = self
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .repeat(&key);
        if let Some(recorded) = repeat
            && self.bump_event(&recorded, &now_secs).await?
        {
            return Ok(());
        }
        let instance = self
            .instance
            .get_or_init(|| format!("{}-{:08x}", self.driver_name, self.entropy.next_u64() as u32))
            .clone();
        let name = format!("{object}.{:016x}", self.entropy.next_u64());
        let mut involved = json!({ "apiVersion": "v1", "kind": kind, "name": object });
        if kind == "PersistentVolumeClaim" {
            involved["namespace"] = json!(namespace);
        }
        let body = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": { "name": name, "namespace": namespace },
            "involvedObject": involved,
            "reason": event.reason,
            "message": event.message,
            "type": kind_type,
            "source": { "component": self.driver_name },
            "reportingComponent": self.driver_name,
            "reportingInstance": instance,
            "firstTimestamp": now_secs,
            "lastTimestamp": now_secs,
            "count": 1,
        });
        // Remembered before the POST: a POST whose outcome is unknown (its answer lost,
        // every retry failed) may have created the object, so the next repeat PATCHes this
        // name, and creates anew only on 404 (found by the simulation: a lost POST answer
        // left the Event unknown to the cache, and the repeat created a second object).
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                RecordedEvent {
                    namespace: namespace.clone(),
                    name,
                    count: 1,
                    used: 0,
                },
            );
        self.create_event(&namespace, &body).await
    }
}
