//! "Operations on one volume never overlap": on each host, the driver runs its operations
//! on one volume one at a time.
//!
//! An operation is one CSI call as the driver runs it: the `rpc` span that
//! `rds_csi::csi::rpc` opens with the method and volume id. It counts from its first call
//! into a port (RDS, attachment store, initiator, mounter) until the span closes (the call
//! returned, or its host crashed and dropped it). A call that touches no port — refused
//! by the in-flight guard with ABORTED — never counts, so the checker judges what the
//! driver does, not when the CO happens to send. Two replicas of the controller during a
//! failover are two hosts: their calls may overlap (the store's preconditions order them).
//!
//! The spans are observed by a [`tracing`] layer installed for the scenario's thread only
//! ([`Ops::subscriber`]); the port calls by [`Tracked`] wrappers, one per host incarnation,
//! plugged in at the port boundaries like every other sim wrapper.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rds_csi::ports::initiator::{Connection, InitiatorError, NvmeTarget};
use rds_csi::ports::mounter::{FsCheck, MountEntry, MountError, TargetKind, UsageStats};
use rds_csi::ports::rds::{Disk, DiskEntry, DiskSpec, DiskTraffic, PoolCapacity, RdsError};
use rds_csi::ports::store::{AttachmentRecord, StoreError};
use rds_csi::ports::{AttachmentStore, Initiator, Mounter, Rds};
use rds_csi::types::VolumeId;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// CSI calls that only read a volume.
const READ_ONLY: [&str; 3] = [
    "ControllerGetVolume",
    "ValidateVolumeCapabilities",
    "NodeGetVolumeStats",
];

/// One open CSI call.
#[derive(Debug, Clone)]
struct Rpc {
    method: String,
    volume: String,
    /// The host it touched ports on (`None`: no port call yet).
    host: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct State {
    open: BTreeMap<u64, Rpc>,
    violations: Vec<String>,
    checks: u64,
    refused: u64,
}

/// The operations in flight in one scenario, and the overlaps seen. Clones share.
#[derive(Debug, Clone, Default)]
pub struct Ops {
    state: Arc<Mutex<State>>,
}

impl Ops {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A CSI call `span` started. Snapshot calls name their source volume in the span but
    /// act on the snapshot (the in-flight guard keys them by snapshot): they only read the
    /// volume, so they are not judged against the volume's operations; nor are the calls
    /// that only read (the external-attacher's ControllerGetVolume runs beside a publish by
    /// design: it takes no in-flight guard).
    fn open(&self, span: u64, method: String, mut volume: String) {
        if method.ends_with("Snapshot") || READ_ONLY.contains(&method.as_str()) {
            volume.clear();
        }
        self.st().open.insert(
            span,
            Rpc {
                method,
                volume,
                host: None,
            },
        );
    }

    /// A CSI call ended (or was dropped). One that touched no port while another call on
    /// its volume was open was kept out (the in-flight guard): counted, to show the checker
    /// met overlapping calls.
    fn close(&self, span: u64) {
        let mut st = self.st();
        if let Some(r) = st.open.remove(&span)
            && r.host.is_none()
            && !r.volume.is_empty()
            && st.open.values().any(|o| o.volume == r.volume)
        {
            st.refused += 1;
        }
    }

    /// The CSI call `span` calls a port on `host`: an overlap if another call on the same
    /// volume already touched a port on `host` and is still open.
    pub fn effect(&self, span: u64, host: &Arc<str>) {
        let mut st = self.st();
        let Some(rpc) = st.open.get_mut(&span) else {
            return;
        };
        if rpc.volume.is_empty() {
            return;
        }
        rpc.host = Some(Arc::clone(host));
        let me = rpc.clone();
        st.checks += 1;
        let other = st
            .open
            .iter()
            .find(|(id, r)| **id != span && r.volume == me.volume && r.host == me.host)
            .map(|(_, r)| r.method.clone());
        if let Some(other) = other {
            let msg = format!(
                "operations on {} overlap on {host}: {} runs while {other} is still running",
                me.volume, me.method
            );
            if !st.violations.contains(&msg) {
                st.violations.push(msg);
            }
        }
    }

    /// Marks an effect of the CSI call running on the current task, if any, on `host`.
    fn effect_here(&self, host: &Arc<str>) {
        if let Some(id) = tracing::Span::current().id() {
            self.effect(id.into_u64(), host);
        }
    }

    /// The method of the CSI call running on the current task, if any (for planted bugs
    /// that hit one RPC only).
    pub fn current_method(&self) -> Option<String> {
        let id = tracing::Span::current().id()?.into_u64();
        self.st().open.get(&id).map(|r| r.method.clone())
    }

    /// Overlaps seen so far.
    pub fn violations(&self) -> Vec<String> {
        self.st().violations.clone()
    }

    /// Port calls judged so far.
    pub fn checks(&self) -> u64 {
        self.st().checks
    }

    /// Calls that ended without touching a port while another call on their volume was
    /// open (kept out by the in-flight guard).
    pub fn refused(&self) -> u64 {
        self.st().refused
    }

    /// The subscriber to install for the scenario's thread: it sees only the driver's
    /// `rpc` spans (every other span and event is disabled, so it costs nothing else).
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        tracing_subscriber::registry().with(self.layer())
    }

    /// The layer of [`Self::subscriber`], to combine with others.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let only_rpc = tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.name() == "rpc" && m.target().starts_with("rds_csi")
        });
        RpcLayer { ops: self.clone() }.with_filter(only_rpc)
    }
}

/// Opens and closes [`Rpc`]s as the driver's spans come and go.
struct RpcLayer {
    ops: Ops,
}

#[derive(Default)]
struct Fields {
    method: String,
    volume: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "method" => self.method = value.to_string(),
            "volume_id" => self.volume = value.to_string(),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S> Layer<S> for RpcLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        self.ops.open(id.into_u64(), f.method, f.volume);
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        self.ops.close(id.into_u64());
    }
}

/// A port of `host` whose every call is an effect of the CSI call running it.
pub struct Tracked<T: ?Sized> {
    inner: Arc<T>,
    host: Arc<str>,
    ops: Ops,
}

impl<T: ?Sized> Tracked<T> {
    /// Wraps `inner`, a port of `host`.
    pub fn new(inner: Arc<T>, host: &str, ops: &Ops) -> Self {
        Self {
            inner,
            host: host.into(),
            ops: ops.clone(),
        }
    }

    fn mark(&self) -> &T {
        self.ops.effect_here(&self.host);
        &self.inner
    }
}

#[async_trait]
impl Rds for Tracked<dyn Rds> {
    async fn ping(&self) -> Result<(), RdsError> {
        self.mark().ping().await
    }
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError> {
        self.mark().create_disk(spec).await
    }
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError> {
        self.mark().get_disk(slot).await
    }
    async fn list_disks(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        self.mark().list_disks(slot_prefix).await
    }
    async fn resize_disk(&self, slot: &str, size_bytes: u64) -> Result<Disk, RdsError> {
        self.mark().resize_disk(slot, size_bytes).await
    }
    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError> {
        self.mark().delete_disk(slot).await
    }
    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        self.mark().capacity().await
    }
    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.mark().set_allowed_host(slot, host_nqn).await
    }
    async fn create_snapshot(
        &self,
        source: &str,
        slot: &str,
        comment: &str,
    ) -> Result<Disk, RdsError> {
        self.mark().create_snapshot(source, slot, comment).await
    }
    async fn list_snapshots(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        self.mark().list_snapshots(slot_prefix).await
    }
    async fn find_disk(&self, slot: &str) -> Result<Option<DiskEntry>, RdsError> {
        self.mark().find_disk(slot).await
    }
    async fn find_disks(&self, slots: &[&str]) -> Result<Vec<DiskEntry>, RdsError> {
        self.mark().find_disks(slots).await
    }
    async fn sized(&self, disk: &DiskEntry) -> Result<Disk, RdsError> {
        self.mark().sized(disk).await
    }
    async fn remove_disk(&self, disk: &DiskEntry) -> Result<(), RdsError> {
        self.mark().remove_disk(disk).await
    }
    async fn remove_leftover_file(&self, slot: &str) -> Result<(), RdsError> {
        self.mark().remove_leftover_file(slot).await
    }
    async fn grow_disk(&self, disk: &Disk, size_bytes: u64) -> Result<Disk, RdsError> {
        self.mark().grow_disk(disk, size_bytes).await
    }
    async fn set_comment(&self, disk: &DiskEntry, comment: &str) -> Result<(), RdsError> {
        self.mark().set_comment(disk, comment).await
    }
    async fn disk_traffic(&self, slot: &str) -> Result<DiskTraffic, RdsError> {
        self.mark().disk_traffic(slot).await
    }
    async fn fence_disk(&self, disk: &DiskEntry, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.mark().fence_disk(disk, host_nqn).await
    }
}

#[async_trait]
impl AttachmentStore for Tracked<dyn AttachmentStore> {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.mark().write_volume(volume, holders).await
    }
    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.mark().write_volume_if(volume, previous, holders).await
    }
    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.mark().read_volume(volume).await
    }
    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.mark().load_all().await
    }
}

#[async_trait]
impl<K: Initiator + Mounter> Initiator for Tracked<K> {
    async fn host_nqn(&self) -> Result<String, InitiatorError> {
        Initiator::host_nqn(self.mark()).await
    }
    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf, InitiatorError> {
        self.mark().connect(target).await
    }
    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.mark().disconnect(nqn).await
    }
    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        self.mark().find_device(nqn).await
    }
    async fn nqn_of_device(&self, device: &Path) -> Result<Option<String>, InitiatorError> {
        self.mark().nqn_of_device(device).await
    }
    async fn connections(&self) -> Result<Vec<Connection>, InitiatorError> {
        self.mark().connections().await
    }
    async fn rescan(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.mark().rescan(nqn).await
    }
    async fn apply_reconnect(&self, target: &NvmeTarget) -> Result<bool, InitiatorError> {
        self.mark().apply_reconnect(target).await
    }
}

#[async_trait]
impl<K: Initiator + Mounter> Mounter for Tracked<K> {
    async fn filesystem_of(&self, device: &Path) -> Result<Option<String>, MountError> {
        self.mark().filesystem_of(device).await
    }
    async fn check_filesystem(&self, device: &Path, fs_type: &str) -> Result<FsCheck, MountError> {
        self.mark().check_filesystem(device, fs_type).await
    }
    async fn format(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
        self.mark().format(device, fs_type).await
    }
    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        self.mark().mount(source, target, fs_type, options).await
    }
    async fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
        self.mark().bind(source, target, readonly).await
    }
    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        self.mark().unmount(target).await
    }
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        self.mark().mounts().await
    }
    async fn resize_fs(
        &self,
        device: &Path,
        mount_path: &Path,
        fs_type: &str,
    ) -> Result<(), MountError> {
        self.mark().resize_fs(device, mount_path, fs_type).await
    }
    async fn stats(&self, path: &Path) -> Result<UsageStats, MountError> {
        self.mark().stats(path).await
    }
    async fn device_size(&self, device: &Path) -> Result<u64, MountError> {
        self.mark().device_size(device).await
    }
    async fn device_binds(&self, device: &Path) -> Result<Vec<PathBuf>, MountError> {
        self.mark().device_binds(device).await
    }
    async fn device_number(&self, device: &Path) -> Result<String, MountError> {
        self.mark().device_number(device).await
    }
    async fn prepare_target(&self, path: &Path, kind: TargetKind) -> Result<(), MountError> {
        self.mark().prepare_target(path, kind).await
    }
    async fn remove_target(&self, path: &Path) -> Result<(), MountError> {
        self.mark().remove_target(path).await
    }
    async fn path_exists(&self, path: &Path) -> Result<bool, MountError> {
        self.mark().path_exists(path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(ops: &Ops, span: u64, method: &str, volume: &str) {
        ops.open(span, method.into(), volume.into());
    }

    #[test]
    fn two_calls_on_one_volume_with_effects_on_one_host_overlap() {
        let ops = Ops::default();
        rpc(&ops, 1, "NodeStageVolume", "pvc-1");
        rpc(&ops, 2, "NodeUnstageVolume", "pvc-1");
        let node = Arc::from("node-1");
        ops.effect(1, &node);
        assert!(ops.violations().is_empty());
        ops.effect(2, &node);
        let v = ops.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("pvc-1") && v[0].contains("NodeStageVolume"),
            "{v:?}"
        );
    }

    #[test]
    fn refused_calls_other_hosts_other_volumes_and_ended_calls_do_not_overlap() {
        let ops = Ops::default();
        rpc(&ops, 1, "ControllerPublishVolume", "pvc-1");
        rpc(&ops, 2, "ControllerPublishVolume", "pvc-1"); // refused: never touches a port
        rpc(&ops, 3, "ControllerPublishVolume", "pvc-1"); // another replica
        rpc(&ops, 4, "DeleteVolume", "pvc-2");
        let (a, b) = (Arc::from("controller"), Arc::from("controller-b"));
        ops.effect(1, &a);
        ops.effect(3, &b);
        ops.effect(4, &a);
        ops.close(2);
        assert_eq!(ops.refused(), 1, "2 touched nothing while 1 was open");
        ops.close(1);
        rpc(&ops, 5, "ControllerUnpublishVolume", "pvc-1");
        ops.effect(5, &a);
        ops.effect(99, &a); // not in a CSI call: start-up, rebuild
        assert!(ops.violations().is_empty(), "{:?}", ops.violations());
        assert_eq!(ops.checks(), 4);
    }

    #[tokio::test]
    async fn the_layer_sees_the_driver_span_and_the_wrapper_marks_its_effects() {
        let ops = Ops::default();
        let _guard = tracing::subscriber::set_default(ops.subscriber());
        let kernel = rds_csi::node::fake::FakeKernel::new("nqn.test:", "nqn.host");
        let tracked = Arc::new(Tracked::new(Arc::new(kernel), "node-1", &ops));
        // Two spans as `rds_csi::csi::rpc` opens them, both touching the kernel.
        let a = tracing::info_span!(target: "rds_csi::csi", "rpc", method = "NodeStageVolume", volume_id = "pvc-1");
        let b = tracing::info_span!(target: "rds_csi::csi", "rpc", method = "NodeUnstageVolume", volume_id = "pvc-1");
        {
            let _e = a.enter();
            let _ = Mounter::mounts(&*tracked).await;
        }
        assert!(ops.violations().is_empty());
        {
            let _e = b.enter();
            let _ = Initiator::connections(&*tracked).await;
        }
        assert_eq!(ops.violations().len(), 1, "{:?}", ops.violations());
        drop((a, b));
        // Both closed: a new call on the volume overlaps nothing.
        let c = tracing::info_span!(target: "rds_csi::csi", "rpc", method = "NodePublishVolume", volume_id = "pvc-1");
        {
            let _e = c.enter();
            let _ = Mounter::mounts(&*tracked).await;
        }
        assert_eq!(ops.violations().len(), 1, "{:?}", ops.violations());
    }
}
