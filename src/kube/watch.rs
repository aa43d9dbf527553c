//! The `ClusterWatch` port over kube's runtime watcher: PersistentVolumes, Nodes,
//! VolumeAttachments and VolumeSnapshotContents, each followed by one
//! `kube::runtime::watcher` and reflected into a sorted cache.
//!
//! How a watcher talks to the API server (kube-runtime's `ListWatch` strategy): a
//! paginated LIST (`limit` = [`LIST_PAGE`]) gives the objects and a resourceVersion; a
//! WATCH from that version (`watch=true&resourceVersion=..&allowWatchBookmarks=true&
//! timeoutSeconds=290`) streams every later change. When a watch ends (its timeout, a
//! cut connection) the watcher watches again from the last version it saw — no LIST;
//! only a 410 Gone (the version fell out of the server's watch cache) makes it list
//! again. That relist is the only full list: it is reported as `Change::Relisted` with
//! every record, so the attachment manager compares once and nothing lists a second time.
//!
//! Invariants:
//! - The caches are `BTreeMap`s: what the controller reads from them comes sorted, never
//!   in hash order (kube's own reflector `Store` is a hash map; it is not used here).
//! - Each watcher's errors are retried after the driver's seeded backoff
//!   ([`WATCH_BACKOFF`]), never kube's jittered one (it would draw from the OS).
//! - A kind is *synced* once its first list completed; until then the cache answers
//!   `None` and callers read the API directly. A relist replaces the kind's cache whole.
//! - Objects are decoded into the few fields read (`metadata` + what each judgement
//!   needs), so 100,000 PVs cost little memory.
//!
//! Lock order: the one cache mutex is a leaf, never held across an `.await`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::kube::pv_store::{LIST_PAGE, PvSpecLite, mode_of_spec, records_from};
use crate::ports::Entropy;
use crate::ports::cluster::{DiskReferences, VolumeAttachmentInfo};
use crate::ports::store::AttachmentRecord;
use crate::ports::watch::{Change, ClusterWatch};
use crate::retry::Backoff;
use crate::types::{NodeId, VolumeId};

/// The pause after a watcher's error: 0.8 s doubling to 30 s, seeded jitter (client-go's
/// reflector backs off the same way).
pub const WATCH_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(800),
    max: Duration::from_secs(30),
    max_attempts: u32::MAX,
};

/// Implements `kube::Resource` for a cluster-scoped, partially decoded object.
macro_rules! cluster_resource {
    ($ty:ident, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = kube::core::ClusterResourceScope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A PersistentVolume: its CSI source.
#[derive(Debug, Clone, Deserialize)]
struct Pv {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PvSpecLite,
}
cluster_resource!(Pv, "PersistentVolume", "", "v1", "persistentvolumes");

/// A Node: its name only.
#[derive(Debug, Clone, Deserialize)]
struct Node {
    #[serde(default)]
    metadata: ObjectMeta,
}
cluster_resource!(Node, "Node", "", "v1", "nodes");

/// A VolumeAttachment: attacher, node, PV, attached, deleting.
#[derive(Debug, Clone, Deserialize)]
struct Va {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: VaSpec,
    #[serde(default)]
    status: Option<VaStatus>,
}
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VaSpec {
    #[serde(default)]
    attacher: String,
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    source: VaSource,
}
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VaSource {
    #[serde(default)]
    persistent_volume_name: Option<String>,
}
#[derive(Debug, Clone, Default, Deserialize)]
struct VaStatus {
    #[serde(default)]
    attached: bool,
}
cluster_resource!(
    Va,
    "VolumeAttachment",
    "storage.k8s.io",
    "v1",
    "volumeattachments"
);

/// A VolumeSnapshotContent: driver and snapshot handles.
#[derive(Debug, Clone, Deserialize)]
struct Vsc {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: VscSpec,
    #[serde(default)]
    status: Option<VscStatus>,
}
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VscSpec {
    #[serde(default)]
    driver: String,
    #[serde(default)]
    source: VscSource,
}
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VscSource {
    #[serde(default)]
    snapshot_handle: Option<String>,
}
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VscStatus {
    #[serde(default)]
    snapshot_handle: Option<String>,
}
cluster_resource!(
    Vsc,
    "VolumeSnapshotContent",
    "snapshot.storage.k8s.io",
    "v1",
    "volumesnapshotcontents"
);

/// A VolumeAttachment of this driver, as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VaEntry {
    pv: String,
    node: String,
    attached: bool,
    deleting: bool,
}

/// One kind's cache: the synced objects and, during a (re)list, the objects listed so far.
#[derive(Debug)]
struct Cache<T> {
    synced: bool,
    objects: BTreeMap<String, T>,
    listing: Option<BTreeMap<String, T>>,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self {
            synced: false,
            objects: BTreeMap::new(),
            listing: None,
        }
    }
}

#[derive(Debug, Default)]
struct Caches {
    /// This driver's PVs: name → (volume, records).
    pvs: Cache<(VolumeId, Vec<AttachmentRecord>)>,
    nodes: Cache<()>,
    vas: Cache<VaEntry>,
    vscs: Cache<Vec<String>>,
    vsc_absent: bool,
    changes: Vec<Change>,
    relists: u64,
}

/// Applies one watcher event to `cache`: `keep` turns an object into its entry (`None`:
/// not ours). Returns `(previous, new)` of the object for `Apply`/`Delete`, or the names
/// that disappeared for `InitDone`.
enum Applied<T> {
    Nothing,
    Changed {
        previous: Option<T>,
        now: Option<T>,
    },
    Relisted {
        removed: Vec<T>,
    },
}

fn apply<K: kube::Resource, T: Clone>(
    cache: &mut Cache<T>,
    event: Event<K>,
    keep: impl Fn(&K) -> Option<T>,
) -> Applied<T> {
    let name = |o: &K| o.meta().name.clone().unwrap_or_default();
    match event {
        Event::Init => {
            cache.listing = Some(BTreeMap::new());
            Applied::Nothing
        }
        Event::InitApply(o) => {
            if let (Some(listing), Some(entry)) = (cache.listing.as_mut(), keep(&o)) {
                listing.insert(name(&o), entry);
            }
            Applied::Nothing
        }
        Event::InitDone => {
            let listed = cache.listing.take().unwrap_or_default();
            let removed = cache
                .objects
                .iter()
                .filter(|(n, _)| !listed.contains_key(*n))
                .map(|(_, v)| v.clone())
                .collect();
            cache.objects = listed;
            cache.synced = true;
            Applied::Relisted { removed }
        }
        Event::Apply(o) => {
            let n = name(&o);
            let now = keep(&o);
            let previous = match &now {
                Some(e) => cache.objects.insert(n, e.clone()),
                None => cache.objects.remove(&n),
            };
            Applied::Changed { previous, now }
        }
        Event::Delete(o) => {
            let previous = cache.objects.remove(&name(&o));
            Applied::Changed {
                previous,
                now: None,
            }
        }
    }
}

/// The caches and the changes not yet taken, shared with the watcher tasks.
struct Shared {
    client: kube::Client,
    driver_name: String,
    entropy: Arc<dyn Entropy>,
    caches: Mutex<Caches>,
    changed: Notify,
    started: AtomicBool,
}

/// The watches of one controller instance.
#[derive(Clone)]
pub struct KubeWatch {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KubeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeWatch")
            .field("driver_name", &self.shared.driver_name)
            .finish_non_exhaustive()
    }
}

impl KubeWatch {
    /// The watches of `driver_name`'s objects through `client`; nothing runs until
    /// [`ClusterWatch::start`].
    pub fn new(client: kube::Client, driver_name: &str, entropy: Arc<dyn Entropy>) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                driver_name: driver_name.to_string(),
                entropy,
                caches: Mutex::new(Caches::default()),
                changed: Notify::new(),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// Lists done so far, every kind together (the first list of each included): more
    /// than four means a watcher relisted.
    pub fn lists(&self) -> u64 {
        self.shared.caches().relists
    }

    /// Whether every kind has been listed once.
    pub fn synced(&self) -> bool {
        let c = self.shared.caches();
        c.pvs.synced && c.nodes.synced && c.vas.synced && (c.vscs.synced || c.vsc_absent)
    }
}

impl Shared {
    fn caches(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pv_entry(&self, pv: &Pv) -> Option<(VolumeId, Vec<AttachmentRecord>)> {
        let csi = pv
            .spec
            .csi
            .as_ref()
            .filter(|c| c.driver == self.driver_name)?;
        let volume = VolumeId::new(csi.volume_handle.as_str()).ok()?;
        let annotations = pv.metadata.annotations.clone().unwrap_or_default();
        let records = match records_from(&volume, &annotations, mode_of_spec(&pv.spec)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(pv = ?pv.metadata.name, volume_id = %volume,
                    "unreadable attachment annotations, ignored: {e}");
                Vec::new()
            }
        };
        Some((volume, records))
    }

    fn on_pv(&self, event: Event<Pv>) {
        let mut c = self.caches();
        let c = &mut *c;
        match apply(&mut c.pvs, event, |pv| self.pv_entry(pv)) {
            Applied::Nothing => {}
            Applied::Relisted { .. } => {
                c.relists += 1;
                let mut holders: Vec<AttachmentRecord> = c
                    .pvs
                    .objects
                    .values()
                    .flat_map(|(_, r)| r.iter().cloned())
                    .collect();
                holders.sort_by(|a, b| (&a.volume_id, &a.node_id).cmp(&(&b.volume_id, &b.node_id)));
                tracing::info!(
                    pvs = c.pvs.objects.len(),
                    "PersistentVolumes listed by the watch"
                );
                c.changes.push(Change::Relisted { holders });
            }
            Applied::Changed { previous, now } => {
                if previous == now {
                    return;
                }
                match (previous, now) {
                    (_, Some((volume, holders))) => c.changes.push(Change::Holders { volume, holders }),
                    (Some((volume, _)), None) => c.changes.push(Change::Holders {
                        volume,
                        holders: Vec::new(),
                    }),
                    (None, None) => {}
                }
            }
        }
    }

    fn on_node(&self, event: Event<Node>) {
        let mut c = self.caches();
        match apply(&mut c.nodes, event, |_| Some(())) {
            Applied::Relisted { removed } => {
                c.relists += 1;
                if !removed.is_empty() {
                    c.changes.push(Change::Detached);
                }
            }
            Applied::Changed {
                previous: Some(()),
                now: None,
            } => c.changes.push(Change::Detached),
            _ => {}
        }
    }

    fn va_entry(&self, va: &Va) -> Option<VaEntry> {
        (va.spec.attacher == self.driver_name).then(|| VaEntry {
            pv: va.spec.source.persistent_volume_name.clone().unwrap_or_default(),
            node: va.spec.node_name.clone(),
            attached: va.status.as_ref().is_some_and(|s| s.attached),
            deleting: va.metadata.deletion_timestamp.is_some(),
        })
    }

    fn on_va(&self, event: Event<Va>) {
        let mut c = self.caches();
        match apply(&mut c.vas, event, |va| self.va_entry(va)) {
            Applied::Nothing => {}
            Applied::Relisted { removed } => {
                c.relists += 1;
                if !removed.is_empty() || c.vas.objects.values().any(|v| v.deleting) {
                    c.changes.push(Change::Detached);
                }
            }
            Applied::Changed { previous, now } => {
                let gone = previous.is_some() && now.is_none();
                let deleting = now.as_ref().is_some_and(|v| v.deleting)
                    && !previous.as_ref().is_some_and(|v| v.deleting);
                if gone || deleting {
                    c.changes.push(Change::Detached);
                }
            }
        }
    }

    fn vsc_entry(&self, vsc: &Vsc) -> Option<Vec<String>> {
        (vsc.spec.driver == self.driver_name).then(|| {
            [
                vsc.spec.source.snapshot_handle.clone(),
                vsc.status.as_ref().and_then(|s| s.snapshot_handle.clone()),
            ]
            .into_iter()
            .flatten()
            .collect()
        })
    }

    fn on_vsc(&self, event: Event<Vsc>) {
        let mut c = self.caches();
        c.vsc_absent = false;
        if let Applied::Relisted { .. } = apply(&mut c.vscs, event, |v| self.vsc_entry(v)) {
            c.relists += 1;
        }
    }

    /// Runs one kind's watcher until the runtime ends: events go to `on`, errors are
    /// logged and retried after [`WATCH_BACKOFF`]; `on_error` sees each error first.
    fn spawn_kind<K>(
        self: &Arc<Self>,
        what: &'static str,
        on: fn(&Self, Event<K>),
        on_error: fn(&Self, &watcher::Error),
    ) where
        K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
    {
        let this = Arc::downgrade(self);
        let api: kube::Api<K> = kube::Api::all(self.client.clone());
        let config = watcher::Config::default().page_size(LIST_PAGE);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher::watcher(api, config));
            let mut failures: u32 = 0;
            while let Some(item) = stream.next().await {
                let Some(me) = this.upgrade() else { return };
                match item {
                    Ok(event) => {
                        failures = 0;
                        on(&me, event);
                        if !me.caches().changes.is_empty() {
                            me.changed.notify_one();
                        }
                    }
                    Err(e) => {
                        on_error(&me, &e);
                        tracing::warn!(kind = what, error = %e, "watch failed; retrying");
                        let pause = WATCH_BACKOFF.delay(failures, &*me.entropy);
                        failures = failures.saturating_add(1);
                        drop(me);
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        });
    }
}

/// Whether a watcher's error is the API's 404 for its initial list (the kind is not served).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

#[async_trait]
impl ClusterWatch for KubeWatch {
    fn start(&self) {
        let s = &self.shared;
        if s.started.swap(true, Ordering::SeqCst) {
            return;
        }
        s.spawn_kind::<Pv>("PersistentVolume", Shared::on_pv, |_, _| {});
        s.spawn_kind::<Node>("Node", Shared::on_node, |_, _| {});
        s.spawn_kind::<Va>("VolumeAttachment", Shared::on_va, |_, _| {});
        s.spawn_kind::<Vsc>("VolumeSnapshotContent", Shared::on_vsc, |me, e| {
            if not_served(e) {
                me.caches().vsc_absent = true;
            }
        });
    }

    async fn changes(&self) -> Vec<Change> {
        loop {
            let taken = std::mem::take(&mut self.shared.caches().changes);
            if !taken.is_empty() {
                return taken;
            }
            self.shared.changed.notified().await;
        }
    }

    fn volume_attachments(&self) -> Option<Vec<VolumeAttachmentInfo>> {
        let c = self.shared.caches();
        if !c.vas.synced || !c.pvs.synced {
            return None;
        }
        let mut out: Vec<VolumeAttachmentInfo> = c
            .vas
            .objects
            .values()
            .filter_map(|va| {
                let (volume_id, _) = c.pvs.objects.get(&va.pv)?;
                Some(VolumeAttachmentInfo {
                    volume_id: volume_id.clone(),
                    node_id: NodeId::new(va.node.as_str()).ok()?,
                    attached: va.attached,
                    deleting: va.deleting,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.volume_id, &a.node_id).cmp(&(&b.volume_id, &b.node_id)));
        Some(out)
    }

    fn disk_references(&self) -> Option<DiskReferences> {
        let c = self.shared.caches();
        if !c.pvs.synced || !(c.vscs.synced || c.vsc_absent) {
            return None;
        }
        let volumes: BTreeSet<String> = c
            .pvs
            .objects
            .values()
            .map(|(v, _)| v.to_string())
            .collect();
        let snapshots = (!c.vsc_absent).then(|| {
            c.vscs
                .objects
                .values()
                .flat_map(|h| h.iter().cloned())
                .collect()
        });
        Some(DiskReferences { volumes, snapshots })
    }
}
