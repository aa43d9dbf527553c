//! `AttachmentStore` over PersistentVolume annotations (production).
//!
//! Format, on the PV whose `spec.csi.driver` is ours and whose `spec.csi.volumeHandle` is
//! the volume id:
//! - `rds.csi.srvlab.io/attached-node`: holder node names, comma-separated, sorted;
//! - `rds.csi.srvlab.io/attached-at`: RFC 3339 UTC timestamps with microseconds, aligned;
//! - `rds.csi.srvlab.io/attached-readonly`: `true`/`false`, aligned (absent: all false);
//! - `rds.csi.srvlab.io/attached-mode`: `single-node`, `multi-node-read-only` or
//!   `multi-node-multi-writer`. Absent (annotations the earlier Go driver wrote: one node in
//!   `attached-node`, its RFC 3339 time in `attached-at`, nothing else): read from the PV
//!   itself — `ReadWriteMany` with `volumeMode: Block` is `multi-node-multi-writer`, only
//!   `ReadOnlyMany` is `multi-node-read-only`, anything else `single-node`;
//! - while a live migration runs (two holders of a multi-node block volume):
//!   `rds.csi.srvlab.io/migration-source` (the source node; the other holder is the
//!   target), `rds.csi.srvlab.io/migration-started-at` (RFC 3339) and
//!   `rds.csi.srvlab.io/migration-timeout-seconds`;
//! - `rds.csi.srvlab.io/attachment-generation`: the number of the write that made this
//!   holder set (see [`AttachmentRecord::generation`]; absent: 0).
//!
//! A node named twice in `attached-node` (a hand edit, a restored backup) is one holder,
//! since the earliest of its times; named once read-only and once read-write, the record is
//! malformed. No holder: the annotations are removed.
//!
//! One request per change in the common case: a JSON merge patch carrying
//! `metadata.resourceVersion` (the version we last saw: from the start-up LIST, a read or
//! our own previous write) as its precondition. The index keeps, beside that version, a
//! fingerprint of the attachments it held; a conditional write patches against it only
//! when the fingerprint is the one of the holders the manager expects — otherwise (another
//! reader, say ListVolumes, saw a newer version than the manager's memory) the PV is read
//! again and compared first, so a stale memory can never write over a newer record. On 409
//! Conflict the PV is read again and the write repeated, with the seeded [`Backoff`] and a
//! bounded number of attempts; a write is the volume's complete holder set, so repeating it
//! is idempotent. Transient errors (5xx, 429, transport) are retried the same way. A volume
//! not seen before costs one GET first.
//!
//! A missing PV: a write that adds holders fails with `StoreError::NotFound` (the manager
//! refuses the publish: it cannot be made durable); a write that empties the holder set
//! succeeds (nothing is left that could resurrect the attachment).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ports::Entropy;
use crate::ports::store::{AttachmentRecord, AttachmentStore, StoreError, same_holders};
use crate::retry::Backoff;
use crate::types::{AccessMode, NodeId, VolumeId};

/// Annotation: holder node names.
pub const ANN_ATTACHED_NODE: &str = "rds.csi.srvlab.io/attached-node";
/// Annotation: when each holder was attached (RFC 3339, microseconds).
pub const ANN_ATTACHED_AT: &str = "rds.csi.srvlab.io/attached-at";
/// Annotation: whether each holder was published read-only.
pub const ANN_ATTACHED_READONLY: &str = "rds.csi.srvlab.io/attached-readonly";
/// Annotation: the access mode of the attachment.
pub const ANN_ATTACHED_MODE: &str = "rds.csi.srvlab.io/attached-mode";
/// Annotation: the source node of the live migration under way.
pub const ANN_MIGRATION_SOURCE: &str = "rds.csi.srvlab.io/migration-source";
/// Annotation: when the live migration under way started (RFC 3339, microseconds).
pub const ANN_MIGRATION_STARTED_AT: &str = "rds.csi.srvlab.io/migration-started-at";
/// Annotation: how long the live migration under way may run, in seconds.
pub const ANN_MIGRATION_TIMEOUT: &str = "rds.csi.srvlab.io/migration-timeout-seconds";
/// Annotation: the host NQN of the live migration's target machine at its publish.
pub const ANN_MIGRATION_TARGET_NQN: &str = "rds.csi.srvlab.io/migration-target-nqn";
/// Annotation: the generation of the holder set.
pub const ANN_GENERATION: &str = "rds.csi.srvlab.io/attachment-generation";

/// Every annotation of an attachment record, in the order they are written.
pub const ALL_ANNOTATIONS: &[&str] = &[
    ANN_ATTACHED_NODE,
    ANN_ATTACHED_AT,
    ANN_ATTACHED_READONLY,
    ANN_ATTACHED_MODE,
    ANN_MIGRATION_SOURCE,
    ANN_MIGRATION_STARTED_AT,
    ANN_MIGRATION_TIMEOUT,
    ANN_MIGRATION_TARGET_NQN,
    ANN_GENERATION,
];

const PV_PATH: &str = "/api/v1/persistentvolumes";
/// Page size of the start-up LIST.
pub const LIST_PAGE: u32 = 500;

/// Where a volume's PV is, the version we last saw of it, and a fingerprint of the
/// attachments it held at that version (`None`: unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PvRef {
    pub name: String,
    pub rv: String,
    pub fingerprint: Option<u64>,
}

impl PvRef {
    /// The reference to `pv` as read, holding `records` (or unreadable ones).
    fn of(pv: &PvLite, records: Option<&[AttachmentRecord]>) -> Self {
        Self {
            name: pv.metadata.name.clone(),
            rv: pv.metadata.resource_version.clone().unwrap_or_default(),
            fingerprint: records.map(fingerprint),
        }
    }
}

/// A fingerprint of a holder set: equal for the sets [`same_holders`] finds equal.
fn fingerprint(records: &[AttachmentRecord]) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same set hashes the same in every process (the value never leaves
    // this one, though).
    let mut h = std::hash::DefaultHasher::new();
    records.len().hash(&mut h);
    for r in records {
        r.node_id.hash(&mut h);
        r.access_mode.hash(&mut h);
        r.readonly.hash(&mut h);
        crate::ports::store::micros(r.attached_at).hash(&mut h);
        r.migration.hash(&mut h);
        r.generation.hash(&mut h);
    }
    h.finish()
}

/// Volume id ↔ PV name (and last seen resourceVersion), shared by the kube adapters.
///
/// PVs of a CSI provisioner are named after the volume; the reverse map holds only the
/// others (statically provisioned PVs), so it costs nothing in the common case.
#[derive(Debug, Default)]
pub struct PvIndex {
    inner: Mutex<IndexMaps>,
}

#[derive(Debug, Default)]
struct IndexMaps {
    by_volume: BTreeMap<VolumeId, PvRef>,
    /// PV name → volume, for PVs not named after their volume.
    by_other_name: BTreeMap<String, VolumeId>,
}

impl PvIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, IndexMaps> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn get(&self, volume: &VolumeId) -> Option<PvRef> {
        self.lock().by_volume.get(volume).cloned()
    }
    pub(crate) fn set(&self, volume: VolumeId, r: PvRef) {
        let mut maps = self.lock();
        let renamed = maps
            .by_volume
            .get(&volume)
            .filter(|old| old.name != r.name)
            .map(|old| old.name.clone());
        if let Some(old_name) = renamed {
            maps.by_other_name.remove(&old_name);
        }
        if r.name != volume.as_str() {
            maps.by_other_name.insert(r.name.clone(), volume.clone());
        }
        maps.by_volume.insert(volume, r);
    }
    pub(crate) fn forget(&self, volume: &VolumeId) {
        let mut maps = self.lock();
        if let Some(old) = maps.by_volume.remove(volume) {
            maps.by_other_name.remove(&old.name);
        }
    }
    /// The volume whose PV is named `pv_name`.
    pub(crate) fn volume_of(&self, pv_name: &str) -> Option<VolumeId> {
        let maps = self.lock();
        if let Ok(v) = VolumeId::new(pv_name)
            && maps.by_volume.get(&v).is_some_and(|r| r.name == pv_name)
        {
            return Some(v);
        }
        maps.by_other_name.get(pv_name).cloned()
    }
    /// Number of PVs indexed.
    pub fn len(&self) -> usize {
        self.lock().by_volume.len()
    }
    /// Whether no PV is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parts of a PV we read.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PvLite {
    pub metadata: MetaLite,
    #[serde(default)]
    pub spec: PvSpecLite,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MetaLite {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PvSpecLite {
    #[serde(default)]
    pub csi: Option<CsiLite>,
    /// `ReadWriteOnce`, `ReadWriteMany`, ...
    #[serde(default)]
    pub access_modes: Vec<String>,
    /// `Filesystem` (the default) or `Block`.
    #[serde(default)]
    pub volume_mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CsiLite {
    pub driver: String,
    pub volume_handle: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListLite<T> {
    #[serde(default)]
    pub metadata: ListMetaLite,
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListMetaLite {
    #[serde(default, rename = "continue")]
    pub continue_token: Option<String>,
}

/// How a kube call failed, for retry decisions.
pub(crate) enum Failure {
    /// HTTP status from the API server.
    Status(u16, String),
    /// Transport or decoding failure.
    Transport(String),
}

pub(crate) fn classify(e: ::kube::Error) -> Failure {
    match e {
        ::kube::Error::Api(s) => Failure::Status(s.code, s.message),
        other => Failure::Transport(other.to_string()),
    }
}

pub(crate) fn transient(f: &Failure) -> bool {
    match f {
        Failure::Status(code, _) => *code == 429 || *code >= 500,
        Failure::Transport(_) => true,
    }
}

impl Failure {
    pub(crate) fn describe(&self) -> String {
        match self {
            Failure::Status(code, msg) => format!("HTTP {code}: {msg}"),
            Failure::Transport(msg) => msg.clone(),
        }
    }
}

/// Sends the request `make` builds (again for each attempt) on `client`, retrying transient
/// failures with `backoff`. `Ok(Err(_))`: the API answered with a status that is not
/// transient, for the caller to judge; `Err`: still unavailable after the attempts.
pub(crate) async fn request_retrying<T: serde::de::DeserializeOwned>(
    client: &::kube::Client,
    backoff: &Backoff,
    entropy: &dyn Entropy,
    what: &str,
    make: impl Fn() -> Result<http::Request<Vec<u8>>, ::kube::core::request::Error>,
) -> Result<Result<T, Failure>, crate::ports::cluster::ClusterError> {
    use crate::ports::cluster::ClusterError;
    let mut attempt = 0;
    loop {
        let req = make().map_err(|e| ClusterError::Other(format!("{what}: {e}")))?;
        match client.request::<T>(req).await.map_err(classify) {
            Ok(v) => return Ok(Ok(v)),
            Err(f) if transient(&f) && attempt + 1 < backoff.max_attempts => {
                tokio::time::sleep(backoff.delay(attempt, entropy)).await;
                attempt += 1;
            }
            Err(f) if transient(&f) => {
                return Err(ClusterError::Unavailable(format!("{what}: {}", f.describe())));
            }
            Err(f) => return Ok(Err(f)),
        }
    }
}

/// Formats `t` as RFC 3339 UTC with microseconds.
pub fn format_time(t: SystemTime) -> String {
    match k8s_openapi::jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        Err(_) => "1970-01-01T00:00:00.000000Z".to_string(),
    }
}

/// Parses an RFC 3339 timestamp.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: k8s_openapi::jiff::Timestamp = s.parse().ok()?;
    Some(SystemTime::from(ts))
}

fn mode_name(m: AccessMode) -> &'static str {
    match m {
        AccessMode::SingleNode => "single-node",
        AccessMode::MultiNodeReadOnly => "multi-node-read-only",
        AccessMode::MultiNodeMultiWriter => "multi-node-multi-writer",
    }
}

/// The annotation values for `holders` (sorted by node); `Value::Null` removes a key.
pub fn annotations_for(holders: &[AttachmentRecord]) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for k in ALL_ANNOTATIONS {
        m.insert(k.to_string(), Value::Null);
    }
    if holders.is_empty() {
        return m;
    }
    let join = |f: &dyn Fn(&AttachmentRecord) -> String| {
        holders.iter().map(f).collect::<Vec<_>>().join(",")
    };
    m.insert(
        ANN_ATTACHED_NODE.into(),
        json!(join(&|r| r.node_id.to_string())),
    );
    m.insert(
        ANN_ATTACHED_AT.into(),
        json!(join(&|r| format_time(r.attached_at))),
    );
    m.insert(
        ANN_ATTACHED_READONLY.into(),
        json!(join(&|r| r.readonly.to_string())),
    );
    m.insert(
        ANN_ATTACHED_MODE.into(),
        json!(mode_name(holders[0].access_mode)),
    );
    if let Some(mig) = holders.iter().find_map(|r| r.migration.as_ref()) {
        m.insert(ANN_MIGRATION_SOURCE.into(), json!(mig.source.to_string()));
        m.insert(
            ANN_MIGRATION_STARTED_AT.into(),
            json!(format_time(mig.started_at)),
        );
        m.insert(
            ANN_MIGRATION_TIMEOUT.into(),
            json!(mig.timeout.as_secs().to_string()),
        );
        if let Some(nqn) = &mig.target_nqn {
            m.insert(ANN_MIGRATION_TARGET_NQN.into(), json!(nqn));
        }
    }
    m.insert(
        ANN_GENERATION.into(),
        json!(holders[0].generation.to_string()),
    );
    m
}

/// The access mode a PV's own spec implies, for records that do not name one (written by
/// the earlier driver): `ReadWriteMany` block volumes are multi-node writers (KubeVirt
/// disks), `ReadOnlyMany`-only volumes multi-node readers, the rest single-node.
pub(crate) fn mode_of_spec(spec: &PvSpecLite) -> AccessMode {
    let has = |m: &str| spec.access_modes.iter().any(|a| a == m);
    let block = spec.volume_mode.as_deref() == Some("Block");
    if has("ReadWriteMany") && block {
        AccessMode::MultiNodeMultiWriter
    } else if has("ReadOnlyMany") && !has("ReadWriteOnce") && !has("ReadWriteMany") {
        AccessMode::MultiNodeReadOnly
    } else {
        AccessMode::SingleNode
    }
}

/// Records encoded in a PV's annotations; malformed parts are reported, not guessed.
/// `default_mode` is the mode when the annotations name none ([`mode_of_spec`]).
pub fn records_from(
    volume: &VolumeId,
    annotations: &BTreeMap<String, String>,
    default_mode: AccessMode,
) -> Result<Vec<AttachmentRecord>, String> {
    let Some(nodes) = annotations.get(ANN_ATTACHED_NODE).filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    let nodes: Vec<&str> = nodes.split(',').map(str::trim).collect();
    let ats: Vec<&str> = annotations
        .get(ANN_ATTACHED_AT)
        .map(|s| s.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let ros: Vec<&str> = annotations
        .get(ANN_ATTACHED_READONLY)
        .map(|s| s.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let mode = match annotations.get(ANN_ATTACHED_MODE).map(String::as_str) {
        None => default_mode,
        Some("single-node") => AccessMode::SingleNode,
        Some("multi-node-read-only") => AccessMode::MultiNodeReadOnly,
        Some("multi-node-multi-writer") => AccessMode::MultiNodeMultiWriter,
        Some(other) => return Err(format!("{ANN_ATTACHED_MODE}={other:?} is not a known mode")),
    };
    let generation = match annotations.get(ANN_GENERATION) {
        Some(g) => g
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{ANN_GENERATION}: {g:?} is not a number"))?,
        None => 0,
    };
    let mut out = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let node_id =
            NodeId::new(*node).map_err(|e| format!("{ANN_ATTACHED_NODE}: {e}"))?;
        let attached_at = match ats.get(i) {
            Some(at) => parse_time(at)
                .ok_or_else(|| format!("{ANN_ATTACHED_AT}: {at:?} is not RFC 3339"))?,
            None => UNIX_EPOCH,
        };
        let readonly = match ros.get(i) {
            None | Some(&"false") => false,
            Some(&"true") => true,
            Some(other) => return Err(format!("{ANN_ATTACHED_READONLY}: {other:?}")),
        };
        let mut r = AttachmentRecord::new(volume.clone(), node_id, attached_at, mode, readonly);
        r.generation = generation;
        out.push(r);
    }
    // A node named twice (a hand edit, a restored backup) holds the volume once, since it
    // was first recorded: the manager keeps one record per node, and a write compares
    // against these (found by fuzzing). Named read-only and read-write, it is malformed.
    out.sort_by(|a, b| (&a.node_id, a.attached_at).cmp(&(&b.node_id, b.attached_at)));
    let mut holders: Vec<AttachmentRecord> = Vec::with_capacity(out.len());
    for r in out {
        match holders.last() {
            Some(prev) if prev.node_id == r.node_id => {
                if prev.readonly != r.readonly {
                    return Err(format!(
                        "{ANN_ATTACHED_NODE} names node {} twice, once read-only and once \
                         read-write",
                        r.node_id
                    ));
                }
            }
            _ => holders.push(r),
        }
    }
    // The migration is put on the holders as deduplicated: a source named twice is still
    // one of two holders.
    if let Some(source) = annotations.get(ANN_MIGRATION_SOURCE) {
        attach_migration(&mut holders, source, annotations)?;
    }
    Ok(holders)
}

/// Puts the migration the annotations describe on its target's record. A source that is
/// not one of exactly two holders describes no running migration (left by hand): ignored.
fn attach_migration(
    records: &mut [AttachmentRecord],
    source: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(), String> {
    let timeout = match annotations.get(ANN_MIGRATION_TIMEOUT) {
        Some(t) => t
            .trim()
            .parse::<u64>()
            .map(std::time::Duration::from_secs)
            .map_err(|_| format!("{ANN_MIGRATION_TIMEOUT}: {t:?} is not a number of seconds"))?,
        None => crate::types::defaults::DEFAULT_MIGRATION_TIMEOUT,
    };
    let started = match annotations.get(ANN_MIGRATION_STARTED_AT) {
        Some(at) => Some(
            parse_time(at)
                .ok_or_else(|| format!("{ANN_MIGRATION_STARTED_AT}: {at:?} is not RFC 3339"))?,
        ),
        None => None,
    };
    if records.len() != 2 || !records.iter().any(|r| r.node_id.as_str() == source) {
        tracing::warn!(source, "migration annotations name no running migration; ignored");
        return Ok(());
    }
    let source = NodeId::new(source).map_err(|e| format!("{ANN_MIGRATION_SOURCE}: {e}"))?;
    if let Some(target) = records.iter_mut().find(|r| r.node_id != source) {
        target.migration = Some(crate::ports::store::Migration {
            source,
            started_at: started.unwrap_or(target.attached_at),
            timeout,
            target_nqn: annotations
                .get(ANN_MIGRATION_TARGET_NQN)
                .filter(|n| !n.is_empty())
                .cloned(),
        });
    }
    Ok(())
}

/// Attachment records in PV annotations.
pub struct PvStore {
    client: ::kube::Client,
    driver_name: String,
    entropy: Arc<dyn Entropy>,
    backoff: Backoff,
    index: Arc<PvIndex>,
}

impl std::fmt::Debug for PvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvStore")
            .field("driver_name", &self.driver_name)
            .finish_non_exhaustive()
    }
}

impl PvStore {
    /// A store for PVs of `driver_name`, retrying with `backoff` and `entropy`.
    pub fn new(
        client: ::kube::Client,
        driver_name: impl Into<String>,
        entropy: Arc<dyn Entropy>,
        backoff: Backoff,
        index: Arc<PvIndex>,
    ) -> Self {
        Self {
            client,
            driver_name: driver_name.into(),
            entropy,
            backoff,
            index,
        }
    }

    /// The shared PV index.
    pub fn index(&self) -> Arc<PvIndex> {
        Arc::clone(&self.index)
    }

    async fn pause(&self, attempt: u32) {
        tokio::time::sleep(self.backoff.delay(attempt, &*self.entropy)).await;
    }

    /// GET one PV; `Ok(None)` when absent. Transient failures are retried.
    async fn get_pv(&self, name: &str) -> Result<Option<PvLite>, StoreError> {
        let req = ::kube::core::Request::new(PV_PATH)
            .get(name, &Default::default())
            .map_err(|e| StoreError::Unavailable(format!("PersistentVolume {name}: {e}")))?;
        let mut attempt = 0;
        loop {
            match self.client.request::<PvLite>(clone_req(&req)).await.map_err(classify) {
                Ok(pv) => return Ok(Some(pv)),
                Err(Failure::Status(404, _)) => return Ok(None),
                Err(f) if transient(&f) && attempt + 1 < self.backoff.max_attempts => {
                    self.pause(attempt).await;
                    attempt += 1;
                }
                Err(f) => {
                    return Err(StoreError::Unavailable(format!(
                        "GET PersistentVolume {name}: {}",
                        f.describe()
                    )));
                }
            }
        }
    }

    fn ours<'a>(&self, pv: &'a PvLite) -> Option<&'a CsiLite> {
        pv.spec
            .csi
            .as_ref()
            .filter(|c| c.driver == self.driver_name)
    }

    /// Finds the PV of `volume`: the index, else the PV named after the volume, else a
    /// full scan (statically provisioned PVs created after start-up).
    async fn locate(&self, volume: &VolumeId) -> Result<Option<PvRef>, StoreError> {
        if let Some(r) = self.index.get(volume) {
            return Ok(Some(r));
        }
        if let Some(pv) = self.get_pv(volume.as_str()).await?
            && self
                .ours(&pv)
                .is_some_and(|c| c.volume_handle == volume.as_str())
        {
            let r = PvRef::of(&pv, decode(volume, &pv).ok().as_deref());
            self.index.set(volume.clone(), r.clone());
            return Ok(Some(r));
        }
        self.scan(|_, _, _| {}).await?;
        Ok(self.index.get(volume))
    }

    /// Paginated LIST of every PV of this driver: indexes them and hands each, with its
    /// decoded records, to `each`.
    async fn scan(
        &self,
        mut each: impl FnMut(&VolumeId, &PvLite, Result<Vec<AttachmentRecord>, String>),
    ) -> Result<(), StoreError> {
        let mut token: Option<String> = None;
        loop {
            let mut lp = ::kube::api::ListParams::default().limit(LIST_PAGE);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let req = ::kube::core::Request::new(PV_PATH)
                .list(&lp)
                .map_err(|e| StoreError::Unavailable(format!("LIST PersistentVolumes: {e}")))?;
            let mut attempt = 0;
            let page = loop {
                match self
                    .client
                    .request::<ListLite<PvLite>>(clone_req(&req))
                    .await
                    .map_err(classify)
                {
                    Ok(page) => break page,
                    Err(f) if transient(&f) && attempt + 1 < self.backoff.max_attempts => {
                        self.pause(attempt).await;
                        attempt += 1;
                    }
                    Err(f) => {
                        return Err(StoreError::Unavailable(format!(
                            "LIST PersistentVolumes: {}",
                            f.describe()
                        )));
                    }
                }
            };
            for pv in &page.items {
                let Some(csi) = self.ours(pv) else { continue };
                let Ok(volume) = VolumeId::new(csi.volume_handle.as_str()) else {
                    tracing::warn!(pv = %pv.metadata.name, handle = %csi.volume_handle,
                        "PersistentVolume of this driver has an invalid volume handle; ignored");
                    continue;
                };
                let records = decode(&volume, pv);
                self.index
                    .set(volume.clone(), PvRef::of(pv, records.as_deref().ok()));
                each(&volume, pv, records);
            }
            match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }
}

/// The attachment records `pv`'s annotations hold.
fn decode(volume: &VolumeId, pv: &PvLite) -> Result<Vec<AttachmentRecord>, String> {
    match &pv.metadata.annotations {
        Some(ann) => records_from(volume, ann, mode_of_spec(&pv.spec)),
        None => Ok(Vec::new()),
    }
}

fn clone_req(req: &http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    let mut out = http::Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}

impl PvStore {
    /// Writes `holders` as `volume`'s annotations (see the module doc), checking on a
    /// conflict that the stored holders still are `previous` when given.
    async fn write(
        &self,
        volume: &VolumeId,
        previous: Option<&[AttachmentRecord]>,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        let Some(mut pv) = self.locate(volume).await? else {
            if holders.is_empty() {
                return Ok(());
            }
            return Err(StoreError::NotFound(format!(
                "no PersistentVolume of driver {} has volumeHandle {volume}",
                self.driver_name
            )));
        };
        // The version we know held other holders than expected (or we cannot tell):
        // another writer changed them, or a read (ListVolumes) saw a newer version than the
        // manager's memory. Check the PV as it is now before writing over it.
        if let Some(previous) = previous
            && pv.fingerprint != Some(fingerprint(previous))
        {
            match self.refresh(volume, &mut pv, Some(previous), holders).await? {
                Fresh::Gone => return gone(holders),
                Fresh::Written => return Ok(()),
                Fresh::Unchanged => {}
            }
        }
        let annotations = annotations_for(holders);
        let mut attempt = 0u32;
        loop {
            let patch = json!({
                "metadata": {
                    "resourceVersion": pv.rv,
                    "annotations": annotations,
                }
            });
            let req = ::kube::core::Request::new(PV_PATH)
                .patch(
                    &pv.name,
                    &Default::default(),
                    &::kube::api::Patch::Merge(&patch),
                )
                .map_err(|e| StoreError::Unavailable(format!("PersistentVolume {}: {e}", pv.name)))?;
            let failure = match self.client.request::<PvLite>(req).await.map_err(classify) {
                Ok(updated) => {
                    let records = decode(volume, &updated);
                    self.index
                        .set(volume.clone(), PvRef::of(&updated, records.as_deref().ok()));
                    return Ok(());
                }
                Err(f) => f,
            };
            let retryable = matches!(failure, Failure::Status(409, _)) || transient(&failure);
            if matches!(failure, Failure::Status(404, _)) {
                self.index.forget(volume);
                if holders.is_empty() {
                    return Ok(());
                }
                return Err(StoreError::NotFound(format!(
                    "PersistentVolume {} of volume {volume} was deleted",
                    pv.name
                )));
            }
            attempt += 1;
            if !retryable || attempt >= self.backoff.max_attempts {
                let what = format!(
                    "PATCH PersistentVolume {} after {attempt} attempts: {}",
                    pv.name,
                    failure.describe()
                );
                self.index.forget(volume); // re-read next time
                return Err(match failure {
                    Failure::Status(409, _) => StoreError::Conflict(what),
                    _ => StoreError::Unavailable(what),
                });
            }
            tracing::debug!(volume_id = %volume, attempt, error = %failure.describe(), "retrying the attachment write");
            self.pause(attempt - 1).await;
            // Someone else changed the PV (or our write's fate is unknown): read it again.
            match self.refresh(volume, &mut pv, previous, holders).await? {
                Fresh::Gone => return gone(holders),
                // A previous attempt whose answer was lost did land.
                Fresh::Written => return Ok(()),
                Fresh::Unchanged => {}
            }
        }
    }

    /// Re-reads `pv` (its resourceVersion) and, with `previous`, checks that its holders
    /// are unchanged — or already are `holders` (an earlier attempt landed although its
    /// answer was lost).
    async fn refresh(
        &self,
        volume: &VolumeId,
        pv: &mut PvRef,
        previous: Option<&[AttachmentRecord]>,
        holders: &[AttachmentRecord],
    ) -> Result<Fresh, StoreError> {
        let Some(fresh) = self.get_pv(&pv.name).await? else {
            self.index.forget(volume);
            return Ok(Fresh::Gone);
        };
        let decoded = decode(volume, &fresh);
        *pv = PvRef::of(&fresh, decoded.as_deref().ok());
        self.index.set(volume.clone(), pv.clone());
        if let Some(previous) = previous {
            let now = decoded
                .map_err(|e| StoreError::Corrupt(format!("PersistentVolume {}: {e}", pv.name)))?;
            if same_holders(holders, &now) && !same_holders(previous, holders) {
                return Ok(Fresh::Written);
            }
            if !same_holders(previous, &now) {
                let nodes: Vec<String> = now.iter().map(|r| r.node_id.to_string()).collect();
                return Err(StoreError::Conflict(format!(
                    "the attachments on PersistentVolume {} were changed by another writer \
                     (now held by {nodes:?})",
                    pv.name
                )));
            }
        }
        Ok(Fresh::Unchanged)
    }
}

/// What a re-read of the PV found.
enum Fresh {
    /// The PV does not exist.
    Gone,
    /// It already holds the holders being written.
    Written,
    /// It holds the expected previous holders: write.
    Unchanged,
}

/// The outcome of a write whose PV does not exist (see the module doc).
fn gone(holders: &[AttachmentRecord]) -> Result<(), StoreError> {
    if holders.is_empty() {
        Ok(())
    } else {
        Err(StoreError::NotFound(
            "the PersistentVolume of the volume does not exist (deleted?)".into(),
        ))
    }
}

#[async_trait]
impl AttachmentStore for PvStore {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.write(volume, None, holders).await
    }

    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.write(volume, Some(previous), holders).await
    }

    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        let Some(r) = self.locate(volume).await? else {
            return Ok(Vec::new());
        };
        let Some(pv) = self.get_pv(&r.name).await? else {
            self.index.forget(volume);
            return Ok(Vec::new());
        };
        let records = decode(volume, &pv);
        self.index
            .set(volume.clone(), PvRef::of(&pv, records.as_deref().ok()));
        records.map_err(|e| StoreError::Corrupt(format!("PersistentVolume {}: {e}", r.name)))
    }

    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        let mut out = Vec::new();
        self.scan(|volume, pv, records| match records {
            Ok(records) => out.extend(records),
            Err(e) => tracing::error!(pv = %pv.metadata.name, volume_id = %volume,
                "unreadable attachment annotations, ignored: {e}"),
        })
        .await?;
        out.sort_by(|a, b| (&a.volume_id, &a.node_id).cmp(&(&b.volume_id, &b.node_id)));
        Ok(out)
    }
}
