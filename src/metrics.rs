//! Prometheus metrics: ONE registry per plugin instance (prefix `rds_csi_`), built by the
//! composition root and handed to the parts that record into it as cheap handles — never a
//! global. The node's data path records through [`Metrics`] itself (NVMe connects and
//! disconnects by outcome with their duration, stale mounts detected, recoveries, orphan
//! connections cleaned). Each other area has its handle type: [`AttachmentMetrics`] (the
//! attachment manager), [`MigrationMetrics`] (the controller's live migrations:
//! `rds_csi_migrations_total{outcome, timed_out}`, `rds_csi_migration_duration_seconds{outcome}`,
//! `rds_csi_migrations_in_flight`),
//! [`RouterOsMetrics`] (the RouterOS adapter and its SSH pool), [`RdsMetrics`] (what the
//! RDS reports: pool, disks, per-disk traffic) and [`ReconcilerMetrics`] (the hooks for the
//! controller's reconcilers); the per-RPC series are recorded by a tower layer around the
//! gRPC server ([`MetricsLayer`]), so every RPC is counted the same way. [`serve`] is the
//! HTTP endpoint serving the text exposition format.
//!
//! A handle's `Default` is a set of series registered nowhere (unit tests, a part built
//! without a registry); clones share their series. [`SERIES`] is the one list of names: the
//! README's table and the Grafana dashboard are checked against it and against the real
//! exposition (`cargo test --lib metrics`, `cargo test --test deploy`).
//!
//! Conventions: base units (`_seconds`, `_bytes`), counters end in `_total` (the encoder
//! adds it), labels are bounded — a closed set of values each. The only per-volume label is
//! `volume` on the per-disk traffic gauges, which exist only when the disk-traffic poll is
//! switched on (`--rds-disk-traffic-interval-secs`, off by default), one series per
//! published volume.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ports::rds::DiskTraffic;

/// Every metric family the driver exports (without the `rds_csi_` prefix and without the
/// `_total` the encoder adds to counters): the one list of metric names.
pub const SERIES: &[&str] = &[
    RPCS,
    RPC_DURATION,
    NVME_OPERATIONS,
    NVME_OPERATION_DURATION,
    STALE_MOUNTS,
    VOLUME_RECOVERIES,
    ORPHAN_CONNECTIONS,
    ATTACHMENT_PUBLISHES,
    ATTACHMENT_UNPUBLISHES,
    ATTACHMENT_CONFLICTS,
    ATTACHMENT_STALE_CLEARED,
    ATTACHMENT_RECORDS,
    ATTACHMENT_WRITE_CONFLICTS,
    ROUTEROS_COMMANDS,
    ROUTEROS_COMMAND_DURATION,
    ROUTEROS_UP,
    ROUTEROS_SSH_CONNECTIONS,
    ROUTEROS_SSH_CHANNELS,
    ROUTEROS_SSH_CONNECTS,
    ROUTEROS_SSH_RECONNECTS,
    RDS_POOL_SIZE,
    RDS_POOL_FREE,
    RDS_DISKS,
    RDS_DISK_READ_OPS,
    RDS_DISK_WRITE_OPS,
    RDS_DISK_READ_BYTES,
    RDS_DISK_WRITE_BYTES,
    ORPHAN_VOLUMES,
    ORPHAN_VOLUMES_FOUND,
    ORPHAN_VOLUMES_DELETED,
    RECONCILER_RUNS,
    RECONCILER_RUN_DURATION,
    MIGRATIONS,
    MIGRATION_DURATION,
    MIGRATIONS_IN_FLIGHT,
];

/// The prefix of every series.
pub const PREFIX: &str = "rds_csi";

const RPCS: &str = "rpcs";
const RPC_DURATION: &str = "rpc_duration_seconds";
const NVME_OPERATIONS: &str = "nvme_operations";
const NVME_OPERATION_DURATION: &str = "nvme_operation_duration_seconds";
const STALE_MOUNTS: &str = "stale_mounts_detected";
const VOLUME_RECOVERIES: &str = "volume_recoveries";
const ORPHAN_CONNECTIONS: &str = "orphan_connections";
const ATTACHMENT_PUBLISHES: &str = "attachment_publishes";
const ATTACHMENT_UNPUBLISHES: &str = "attachment_unpublishes";
const ATTACHMENT_CONFLICTS: &str = "attachment_conflicts";
const ATTACHMENT_STALE_CLEARED: &str = "attachment_stale_records_cleared";
const ATTACHMENT_RECORDS: &str = "attachment_records";
const ATTACHMENT_WRITE_CONFLICTS: &str = "attachment_write_conflicts";
const ROUTEROS_COMMANDS: &str = "routeros_commands";
const ROUTEROS_COMMAND_DURATION: &str = "routeros_command_duration_seconds";
const ROUTEROS_UP: &str = "routeros_up";
const ROUTEROS_SSH_CONNECTIONS: &str = "routeros_ssh_connections";
const ROUTEROS_SSH_CHANNELS: &str = "routeros_ssh_channels_in_use";
const ROUTEROS_SSH_CONNECTS: &str = "routeros_ssh_connects";
const ROUTEROS_SSH_RECONNECTS: &str = "routeros_ssh_reconnects";
const RDS_POOL_SIZE: &str = "rds_pool_size_bytes";
const RDS_POOL_FREE: &str = "rds_pool_free_bytes";
const RDS_DISKS: &str = "rds_disks";
const RDS_DISK_READ_OPS: &str = "rds_disk_read_ops_per_second";
const RDS_DISK_WRITE_OPS: &str = "rds_disk_write_ops_per_second";
const RDS_DISK_READ_BYTES: &str = "rds_disk_read_bytes_per_second";
const RDS_DISK_WRITE_BYTES: &str = "rds_disk_write_bytes_per_second";
const ORPHAN_VOLUMES: &str = "orphan_volumes";
const ORPHAN_VOLUMES_FOUND: &str = "orphan_volumes_found";
const ORPHAN_VOLUMES_DELETED: &str = "orphan_volumes_deleted";
const RECONCILER_RUNS: &str = "reconciler_runs";
const RECONCILER_RUN_DURATION: &str = "reconciler_run_duration_seconds";
const MIGRATIONS: &str = "migrations";
const MIGRATION_DURATION: &str = "migration_duration_seconds";
const MIGRATIONS_IN_FLIGHT: &str = "migrations_in_flight";

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
pub struct MigrationOutcome {
    /// `completed` or `failed`.
    pub outcome: String,
}

/// The controller's live migrations (KubeVirt): ended ones by outcome, their durations, and
/// those running in this controller's memory. Clones share the same series.
#[derive(Clone, Debug)]
pub struct MigrationMetrics {
    ended: Family<MigrationLabels, Counter>,
    duration: Family<MigrationOutcome, Histogram>,
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
            .get_or_create(&MigrationOutcome {
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

/// An `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Labels of the NVMe connect/disconnect metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NvmeLabels {
    /// `connect` or `disconnect`.
    pub op: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Labels of the stale-mount counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// The node call that saw it: `stage`, `publish`, `stats`, `expand`.
    pub check: &'static str,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of a RouterOS command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    verb: &'static str,
    outcome: &'static str,
}

/// A `verb` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerbLabel {
    verb: &'static str,
}

/// A `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// A `volume` label (per-disk traffic only).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

/// A `reconciler` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcilerLabel {
    reconciler: &'static str,
}

/// Labels of a reconciler run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    reconciler: &'static str,
    outcome: &'static str,
}

/// A gauge of floating-point values.
type FloatGauge = Gauge<f64, AtomicU64>;

/// How a ControllerPublishVolume or ControllerUnpublishVolume ended, as the attachment
/// manager answered it (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Answered OK (a repeat included).
    Ok,
    /// Refused until the CO changes something: attached elsewhere, unknown volume or node,
    /// node full, incompatible repeat (FAILED_PRECONDITION, NOT_FOUND, RESOURCE_EXHAUSTED,
    /// ALREADY_EXISTS, INVALID_ARGUMENT).
    Refused,
    /// ABORTED: another writer changed the volume's attachments; the CO retries.
    Aborted,
    /// The RDS or the orchestrator failed (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL...).
    Error,
}

impl CallOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Refused => "refused",
            CallOutcome::Aborted => "aborted",
            CallOutcome::Error => "error",
        }
    }

    /// The outcome of an answer with gRPC code `code`.
    pub fn of_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::Ok => CallOutcome::Ok,
            Code::FailedPrecondition
            | Code::NotFound
            | Code::ResourceExhausted
            | Code::AlreadyExists
            | Code::InvalidArgument
            | Code::OutOfRange => CallOutcome::Refused,
            Code::Aborted => CallOutcome::Aborted,
            _ => CallOutcome::Error,
        }
    }
}

/// Why a stale attachment record was cleared (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The holder's Node object is gone.
    NodeGone,
    /// The record's VolumeAttachment is gone (detached by hand).
    VolumeAttachmentGone,
}

impl StaleReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::NodeGone => "node_gone",
            StaleReason::VolumeAttachmentGone => "volume_attachment_gone",
        }
    }
}

/// The attachment manager's series. Clones share them.
#[derive(Clone, Debug)]
pub struct AttachmentMetrics {
    publishes: Family<OutcomeLabel, Counter>,
    unpublishes: Family<OutcomeLabel, Counter>,
    conflicts: Counter,
    stale_cleared: Family<ReasonLabel, Counter>,
    records: Gauge,
    write_conflicts: Counter,
}

impl Default for AttachmentMetrics {
    /// Series registered nowhere.
    fn default() -> Self {
        Self {
            publishes: Family::default(),
            unpublishes: Family::default(),
            conflicts: Counter::default(),
            stale_cleared: Family::default(),
            records: Gauge::default(),
            write_conflicts: Counter::default(),
        }
    }
}

impl AttachmentMetrics {
    fn register(&self, r: &mut Registry) {
        // Every outcome and reason from zero, so rate() and alerts see them before the first.
        for outcome in [
            CallOutcome::Ok,
            CallOutcome::Refused,
            CallOutcome::Aborted,
            CallOutcome::Error,
        ] {
            let l = OutcomeLabel {
                outcome: outcome.as_str(),
            };
            let _ = self.publishes.get_or_create(&l);
            let _ = self.unpublishes.get_or_create(&l);
        }
        for why in [StaleReason::NodeGone, StaleReason::VolumeAttachmentGone] {
            let _ = self.stale_cleared.get_or_create(&ReasonLabel {
                reason: why.as_str(),
            });
        }
        r.register(
            ATTACHMENT_PUBLISHES,
            "ControllerPublishVolume calls answered by the attachment manager, by outcome \
             (ok, refused, aborted, error)",
            self.publishes.clone(),
        );
        r.register(
            ATTACHMENT_UNPUBLISHES,
            "ControllerUnpublishVolume calls answered by the attachment manager, by outcome",
            self.unpublishes.clone(),
        );
        r.register(
            ATTACHMENT_CONFLICTS,
            "Publishes refused because a single-node volume is attached to another node, or \
             a VM disk has its two holders already (Event AttachmentConflict)",
            self.conflicts.clone(),
        );
        r.register(
            ATTACHMENT_STALE_CLEARED,
            "Stale attachment records cleared, by reason (node_gone, volume_attachment_gone)",
            self.stale_cleared.clone(),
        );
        r.register(
            ATTACHMENT_RECORDS,
            "Attachment records (volume, node) held in this controller's memory",
            self.records.clone(),
        );
        r.register(
            ATTACHMENT_WRITE_CONFLICTS,
            "Conditional writes of attachment records refused because another writer had \
             changed the volume's holders",
            self.write_conflicts.clone(),
        );
    }

    /// A publish was answered.
    pub fn publish(&self, outcome: CallOutcome) {
        self.publishes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// An unpublish was answered.
    pub fn unpublish(&self, outcome: CallOutcome) {
        self.unpublishes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A publish was refused: the volume is attached to another node.
    pub fn conflict(&self) {
        self.conflicts.inc();
    }

    /// A stale record was cleared.
    pub fn stale_cleared(&self, why: StaleReason) {
        self.stale_cleared
            .get_or_create(&ReasonLabel {
                reason: why.as_str(),
            })
            .inc();
    }

    /// A conditional write met another writer's change.
    pub fn write_conflict(&self) {
        self.write_conflicts.inc();
    }

    /// Sets the number of records held in memory.
    pub fn set_records(&self, n: u64) {
        self.records.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// How a RouterOS command ended (the `outcome` label of `rds_csi_routeros_commands_total`).
pub mod command_outcome {
    /// A reply that is not an error.
    pub const OK: &str = "ok";
    /// RouterOS answered that the item does not exist.
    pub const NOT_FOUND: &str = "not_found";
    /// RouterOS answered that the item exists already.
    pub const ALREADY_EXISTS: &str = "already_exists";
    /// RouterOS refused the command (invalid input, syntax).
    pub const REJECTED: &str = "rejected";
    /// Not enough space in the pool.
    pub const NO_SPACE: &str = "no_space";
    /// Not connected, connection lost, or RouterOS busy.
    pub const UNAVAILABLE: &str = "unavailable";
    /// No complete answer in time.
    pub const TIMEOUT: &str = "timeout";
    /// The host key did not match.
    pub const HOST_KEY: &str = "host_key";
    /// Output the parser could not read.
    pub const PROTOCOL: &str = "protocol";
}

/// The RouterOS adapter's series (every transport) and its SSH pool's. Clones share them.
#[derive(Clone, Debug)]
pub struct RouterOsMetrics {
    commands: Family<CommandLabels, Counter>,
    duration: Family<VerbLabel, Histogram>,
    up: Gauge,
    ssh_connections: Gauge,
    ssh_channels: Gauge,
    ssh_connects: Family<OutcomeLabel, Counter>,
    ssh_reconnects: Counter,
}

fn command_histogram() -> Histogram {
    // 1 ms .. ~33 s: in-process answers to a command timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for RouterOsMetrics {
    /// Series registered nowhere.
    fn default() -> Self {
        Self {
            commands: Family::default(),
            duration: Family::new_with_constructor(command_histogram),
            up: Gauge::default(),
            ssh_connections: Gauge::default(),
            ssh_channels: Gauge::default(),
            ssh_connects: Family::default(),
            ssh_reconnects: Counter::default(),
        }
    }
}

impl RouterOsMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            ROUTEROS_COMMANDS,
            "RouterOS commands sent to the RDS, by verb and outcome",
            self.commands.clone(),
        );
        r.register(
            ROUTEROS_COMMAND_DURATION,
            "RouterOS command latency (send to complete reply), by verb",
            self.duration.clone(),
        );
        r.register(
            ROUTEROS_UP,
            "1 when the last RouterOS command got an answer from the RDS, 0 when it could not \
             reach it (unavailable, timeout, host key)",
            self.up.clone(),
        );
        r.register(
            ROUTEROS_SSH_CONNECTIONS,
            "SSH sessions to the RDS open in the pool",
            self.ssh_connections.clone(),
        );
        r.register(
            ROUTEROS_SSH_CHANNELS,
            "SSH channels (commands) in flight to the RDS",
            self.ssh_channels.clone(),
        );
        r.register(
            ROUTEROS_SSH_CONNECTS,
            "SSH session attempts to the RDS (TCP + handshake + authentication), by outcome \
             (ok, failed)",
            self.ssh_connects.clone(),
        );
        r.register(
            ROUTEROS_SSH_RECONNECTS,
            "SSH sessions opened to replace one that was closed or failed",
            self.ssh_reconnects.clone(),
        );
    }

    /// A command with verb `verb` (e.g. `disk_add`) ended with `outcome` (one of
    /// [`command_outcome`]) after `seconds`.
    pub fn command(&self, verb: &'static str, outcome: &'static str, seconds: f64) {
        self.commands
            .get_or_create(&CommandLabels { verb, outcome })
            .inc();
        self.duration
            .get_or_create(&VerbLabel { verb })
            .observe(seconds);
        let unreachable = matches!(
            outcome,
            command_outcome::UNAVAILABLE | command_outcome::TIMEOUT | command_outcome::HOST_KEY
        );
        self.up.set(i64::from(!unreachable));
    }

    /// The gauge of open SSH sessions.
    pub fn ssh_connections(&self) -> Gauge {
        self.ssh_connections.clone()
    }

    /// The gauge of SSH channels in flight.
    pub fn ssh_channels_in_use(&self) -> Gauge {
        self.ssh_channels.clone()
    }

    /// An SSH session attempt ended; `replacing`: it replaces a session that was closed or
    /// failed (a reconnect).
    pub fn ssh_connect(&self, ok: bool, replacing: bool) {
        self.ssh_connects
            .get_or_create(&OutcomeLabel {
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
        if ok && replacing {
            self.ssh_reconnects.inc();
        }
    }
}

/// What the RDS reports: its pool, its disks, and (when polled) the traffic of published
/// volumes. Clones share the series.
#[derive(Clone, Debug, Default)]
pub struct RdsMetrics {
    pool_size: Gauge,
    pool_free: Gauge,
    disks: Family<KindLabel, Gauge>,
    read_ops: Family<VolumeLabel, FloatGauge>,
    write_ops: Family<VolumeLabel, FloatGauge>,
    read_bytes: Family<VolumeLabel, FloatGauge>,
    write_bytes: Family<VolumeLabel, FloatGauge>,
}

impl RdsMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            RDS_POOL_SIZE,
            "Size of the RDS storage pool volumes are carved from, as last read (GetCapacity)",
            self.pool_size.clone(),
        );
        r.register(
            RDS_POOL_FREE,
            "Free bytes of the RDS storage pool, as last read (GetCapacity, CreateVolume)",
            self.pool_free.clone(),
        );
        r.register(
            RDS_DISKS,
            "Disks of this driver on the RDS, by kind (volume, snapshot), as last listed",
            self.disks.clone(),
        );
        for (name, help, family) in [
            (
                RDS_DISK_READ_OPS,
                "Read operations per second of a published volume's disk (/disk \
                 monitor-traffic; only with --rds-disk-traffic-interval-secs)",
                &self.read_ops,
            ),
            (
                RDS_DISK_WRITE_OPS,
                "Write operations per second of a published volume's disk",
                &self.write_ops,
            ),
            (
                RDS_DISK_READ_BYTES,
                "Bytes read per second from a published volume's disk",
                &self.read_bytes,
            ),
            (
                RDS_DISK_WRITE_BYTES,
                "Bytes written per second to a published volume's disk",
                &self.write_bytes,
            ),
        ] {
            r.register(name, help, family.clone());
        }
    }

    /// The pool's size and free bytes, as just read.
    pub fn pool(&self, size_bytes: u64, free_bytes: u64) {
        self.pool_size
            .set(i64::try_from(size_bytes).unwrap_or(i64::MAX));
        self.pool_free
            .set(i64::try_from(free_bytes).unwrap_or(i64::MAX));
    }

    /// The driver's disks, as just listed in full.
    pub fn disks(&self, volumes: u64, snapshots: u64) {
        for (kind, n) in [("volume", volumes), ("snapshot", snapshots)] {
            self.disks
                .get_or_create(&KindLabel { kind })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The traffic of `volume`'s disk, as just read.
    pub fn disk_traffic(&self, volume: &str, t: &DiskTraffic) {
        let l = VolumeLabel {
            volume: volume.to_string(),
        };
        self.read_ops.get_or_create(&l).set(t.read_ops_per_second);
        self.write_ops.get_or_create(&l).set(t.write_ops_per_second);
        self.read_bytes.get_or_create(&l).set(t.read_bytes_per_second);
        self.write_bytes
            .get_or_create(&l)
            .set(t.write_bytes_per_second);
    }

    /// Drops `volume`'s traffic series (no longer published).
    pub fn forget_disk_traffic(&self, volume: &str) {
        let l = VolumeLabel {
            volume: volume.to_string(),
        };
        for family in [
            &self.read_ops,
            &self.write_ops,
            &self.read_bytes,
            &self.write_bytes,
        ] {
            family.remove(&l);
        }
    }
}

/// The controller's reconcilers (the `reconciler` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciler {
    /// Finds (and in delete mode deletes) disks no PV or snapshot references.
    OrphanVolumes,
    /// Clears the attachment records of deleted Nodes and VolumeAttachments.
    Attachments,
    /// Reads the traffic of published volumes' disks (`/disk monitor-traffic`).
    DiskTraffic,
}

impl Reconciler {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reconciler::OrphanVolumes => "orphan_volumes",
            Reconciler::Attachments => "attachments",
            Reconciler::DiskTraffic => "disk_traffic",
        }
    }
}

/// The hooks of the controller's periodic work: each pass of a reconciler
/// ([`ReconcilerMetrics::run`]) and the orphan reconciler's findings
/// ([`ReconcilerMetrics::orphans`], [`ReconcilerMetrics::orphan_deleted`]). Clones share
/// the series.
///
/// ```
/// # use rds_csi::metrics::{Metrics, Reconciler};
/// let metrics = Metrics::default();
/// let hooks = metrics.reconcilers();
/// // one pass of the orphan reconciler: 3 orphans now, 1 of them seen for the first time
/// hooks.orphans(3, 1);
/// hooks.orphan_deleted();
/// hooks.run(Reconciler::OrphanVolumes, true, 0.25);
/// assert!(metrics.render().contains("rds_csi_orphan_volumes 3"));
/// ```
#[derive(Clone, Debug)]
pub struct ReconcilerMetrics {
    orphans: Gauge,
    orphans_found: Counter,
    orphans_deleted: Counter,
    runs: Family<RunLabels, Counter>,
    duration: Family<ReconcilerLabel, Histogram>,
}

fn run_histogram() -> Histogram {
    // 1 ms .. ~65 s: one pass over every PV and disk.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for ReconcilerMetrics {
    /// Series registered nowhere.
    fn default() -> Self {
        Self {
            orphans: Gauge::default(),
            orphans_found: Counter::default(),
            orphans_deleted: Counter::default(),
            runs: Family::default(),
            duration: Family::new_with_constructor(run_histogram),
        }
    }
}

impl ReconcilerMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            ORPHAN_VOLUMES,
            "Disks of this driver that no PersistentVolume, VolumeSnapshotContent or \
             CreateVolume in flight references, as the last orphan-reconciler pass found them",
            self.orphans.clone(),
        );
        r.register(
            ORPHAN_VOLUMES_FOUND,
            "Orphan disks seen for the first time (Event OrphanVolumeFound)",
            self.orphans_found.clone(),
        );
        r.register(
            ORPHAN_VOLUMES_DELETED,
            "Orphan disks deleted after their grace period (Event OrphanVolumeDeleted)",
            self.orphans_deleted.clone(),
        );
        r.register(
            RECONCILER_RUNS,
            "Passes of the controller's reconcilers, by reconciler and outcome (ok, failed)",
            self.runs.clone(),
        );
        r.register(
            RECONCILER_RUN_DURATION,
            "How long a reconciler pass took, by reconciler",
            self.duration.clone(),
        );
    }

    /// One pass of `reconciler` ended (`ok`: it finished without error) after `seconds`.
    pub fn run(&self, reconciler: Reconciler, ok: bool, seconds: f64) {
        let reconciler = reconciler.as_str();
        self.runs
            .get_or_create(&RunLabels {
                reconciler,
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
        self.duration
            .get_or_create(&ReconcilerLabel { reconciler })
            .observe(seconds);
    }

    /// The orphan reconciler's pass found `current` orphans, `new` of them not seen before.
    pub fn orphans(&self, current: u64, new: u64) {
        self.orphans.set(i64::try_from(current).unwrap_or(i64::MAX));
        self.orphans_found.inc_by(new);
    }

    /// The orphan reconciler deleted one orphan.
    pub fn orphan_deleted(&self) {
        self.orphans_deleted.inc();
    }
}

/// The plugin's metrics: the one registry of a plugin instance and the handles recording
/// into it.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram>,
    migrations: MigrationMetrics,
    nvme: Family<NvmeLabels, Counter>,
    nvme_latency: Family<NvmeLabels, Histogram>,
    stale_mounts: Family<CheckLabels, Counter>,
    recoveries: Family<OutcomeLabel, Counter>,
    orphans: Family<OutcomeLabel, Counter>,
    attachment: AttachmentMetrics,
    routeros: RouterOsMetrics,
    rds: RdsMetrics,
    reconcilers: ReconcilerMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let rpcs = Family::<RpcLabels, Counter>::default();
        let latency = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            RPCS,
            "CSI RPCs answered, by method and gRPC code",
            rpcs.clone(),
        );
        registry.register(
            RPC_DURATION,
            "CSI RPC latency, by method and gRPC code",
            latency.clone(),
        );
        let migrations = MigrationMetrics::default();
        registry.register(
            MIGRATIONS,
            "Live migrations of multi-node block volumes that ended, by outcome (completed: \
             the source detached; failed: the target detached) and whether they outlived \
             their timeout",
            migrations.ended.clone(),
        );
        registry.register(
            MIGRATION_DURATION,
            "How long live migrations ran, by outcome",
            migrations.duration.clone(),
        );
        registry.register(
            MIGRATIONS_IN_FLIGHT,
            "Live migrations running, as this controller's memory knows them",
            migrations.in_flight.clone(),
        );
        let nvme = Family::<NvmeLabels, Counter>::default();
        let nvme_latency = Family::<NvmeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        });
        let stale_mounts = Family::<CheckLabels, Counter>::default();
        let recoveries = Family::<OutcomeLabel, Counter>::default();
        let orphans = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            NVME_OPERATIONS,
            "NVMe connects and disconnects on the node, by operation and outcome",
            nvme.clone(),
        );
        registry.register(
            NVME_OPERATION_DURATION,
            "Duration of NVMe connects and disconnects on the node, by operation and outcome",
            nvme_latency.clone(),
        );
        registry.register(
            STALE_MOUNTS,
            "Staging or publish mounts found on a device that is gone or no longer the \
             volume's, by the node call that found them",
            stale_mounts.clone(),
        );
        registry.register(
            VOLUME_RECOVERIES,
            "Repairs of a stale staging mount (remount of the volume's current device and \
             re-bind of its publish targets), by outcome",
            recoveries.clone(),
        );
        registry.register(
            ORPHAN_CONNECTIONS,
            "NVMe connections of this driver that no volume on the node uses and no \
             VolumeAttachment holds, by what the sweep did with them",
            orphans.clone(),
        );
        let attachment = AttachmentMetrics::default();
        attachment.register(&mut registry);
        let routeros = RouterOsMetrics::default();
        routeros.register(&mut registry);
        let rds = RdsMetrics::default();
        rds.register(&mut registry);
        let reconcilers = ReconcilerMetrics::default();
        reconcilers.register(&mut registry);
        Self {
            registry,
            rpcs,
            latency,
            migrations,
            nvme,
            nvme_latency,
            stale_mounts,
            recoveries,
            orphans,
            attachment,
            routeros,
            rds,
            reconcilers,
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

    /// Records one NVMe `op` (`connect`, `disconnect`) that took `seconds`.
    pub fn observe_nvme(&self, op: &'static str, ok: bool, seconds: f64) {
        let labels = NvmeLabels {
            op,
            outcome: if ok { "ok" } else { "error" },
        };
        self.nvme.get_or_create(&labels).inc();
        self.nvme_latency.get_or_create(&labels).observe(seconds);
    }

    /// Records a stale mount seen by the node call `check`.
    pub fn stale_mount(&self, check: &'static str) {
        self.stale_mounts.get_or_create(&CheckLabels { check }).inc();
    }

    /// Records one recovery of a stale staging mount.
    pub fn recovery(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.recoveries.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Records what the orphan sweep did with one connection: `disconnected`, `error`,
    /// `dry_run`.
    pub fn orphan(&self, outcome: &'static str) {
        self.orphans.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The attachment manager's handle.
    pub fn attachment(&self) -> AttachmentMetrics {
        self.attachment.clone()
    }

    /// The RouterOS adapter's (and SSH pool's) handle.
    pub fn routeros(&self) -> RouterOsMetrics {
        self.routeros.clone()
    }

    /// The handle for what the RDS reports.
    pub fn rds(&self) -> RdsMetrics {
        self.rds.clone()
    }

    /// The reconcilers' hooks.
    pub fn reconcilers(&self) -> ReconcilerMetrics {
        self.reconcilers.clone()
    }

    /// A registry with one sample of every family — as a running controller has after its
    /// first CSI calls, a disk-traffic poll and a pass of each reconciler — for checking
    /// what names documentation and dashboards may use against a real exposition (a family
    /// without any sample is not encoded at all).
    pub fn example() -> Self {
        let m = Self::default();
        m.observe("ControllerPublishVolume", tonic::Code::Ok, 0.01);
        m.observe_nvme("connect", true, 0.2);
        m.stale_mount("stats");
        m.recovery(true);
        m.orphan("dry_run");
        m.attachment.write_conflict();
        m.attachment.conflict();
        m.attachment.set_records(1);
        m.routeros
            .command("disk_print", command_outcome::OK, 0.01);
        m.routeros.ssh_connect(true, true);
        m.routeros.ssh_connections().set(1);
        m.routeros.ssh_channels_in_use().set(0);
        m.rds.pool(1 << 40, 1 << 39);
        m.rds.disks(1, 0);
        m.rds.disk_traffic("pvc-example", &DiskTraffic::default());
        m.reconcilers.run(Reconciler::OrphanVolumes, true, 0.1);
        m.reconcilers.orphans(0, 0);
        m.reconcilers.orphan_deleted();
        m.migrations.ended("completed", false, 12.0);
        m
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

/// The metric families of a text exposition: (name as declared by `# TYPE`, type), sorted.
/// A counter `x` is sampled as `x_total`, a histogram `x` as `x_bucket`, `x_sum`, `x_count`.
pub fn families(exposition: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect();
    out.sort();
    out
}

/// The sample names a text exposition can contain (what a PromQL query may name).
pub fn sample_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (name, kind) in families(exposition) {
        match kind.as_str() {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_series_is_registered_and_nothing_else() {
        let text = Metrics::example().render();
        let mut declared: Vec<String> = families(&text)
            .into_iter()
            .map(|(n, _)| n.strip_prefix("rds_csi_").unwrap_or(&n).to_string())
            .collect();
        declared.sort();
        let mut listed: Vec<String> = SERIES.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(declared, listed, "SERIES and the registry differ");
        for (name, kind) in families(&text) {
            assert!(name.starts_with("rds_csi_"), "{name}");
            if kind == "counter" {
                assert!(!name.ends_with("_total"), "{name}: the encoder adds _total");
            }
            if kind == "histogram" {
                assert!(name.ends_with("_seconds"), "{name}: durations in seconds");
            }
        }
    }

    /// The README's metrics table (between `<!-- metrics -->` markers) names every series
    /// the driver exports, as it is sampled, and nothing else.
    #[test]
    fn the_readme_table_lists_every_series() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .unwrap();
        let table = readme
            .split_once("<!-- metrics -->")
            .and_then(|(_, rest)| rest.split_once("<!-- /metrics -->"))
            .map(|(t, _)| t)
            .expect("README.md has a table between <!-- metrics --> and <!-- /metrics -->");
        let mut in_readme: Vec<String> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`'))
            .map(|(name, _)| name.split('{').next().unwrap_or(name).to_string())
            .collect();
        in_readme.sort();
        let mut exported: Vec<String> = families(&Metrics::example().render())
            .into_iter()
            .map(|(name, kind)| match kind.as_str() {
                "counter" => format!("{name}_total"),
                _ => name,
            })
            .collect();
        exported.sort();
        assert_eq!(in_readme, exported, "README metrics table vs the registry");
    }

    #[test]
    fn handles_record_into_the_one_registry() {
        let m = Metrics::default();
        let a = m.attachment();
        a.publish(CallOutcome::Ok);
        a.publish(CallOutcome::of_code(tonic::Code::FailedPrecondition));
        a.conflict();
        a.stale_cleared(StaleReason::NodeGone);
        a.set_records(7);
        a.write_conflict();
        let r = m.routeros();
        r.command("disk_add", command_outcome::OK, 0.01);
        r.command("disk_print", command_outcome::TIMEOUT, 30.0);
        r.ssh_connect(true, false);
        r.ssh_connect(true, true);
        r.ssh_connections().set(2);
        let rds = m.rds();
        rds.pool(1000, 400);
        rds.disks(3, 1);
        let text = m.render();
        for want in [
            r#"rds_csi_attachment_publishes_total{outcome="ok"} 1"#,
            r#"rds_csi_attachment_publishes_total{outcome="refused"} 1"#,
            "rds_csi_attachment_conflicts_total 1",
            r#"rds_csi_attachment_stale_records_cleared_total{reason="node_gone"} 1"#,
            "rds_csi_attachment_records 7",
            "rds_csi_attachment_write_conflicts_total 1",
            r#"rds_csi_routeros_commands_total{verb="disk_add",outcome="ok"} 1"#,
            r#"rds_csi_routeros_command_duration_seconds_count{verb="disk_print"} 1"#,
            "rds_csi_routeros_up 0",
            r#"rds_csi_routeros_ssh_connects_total{outcome="ok"} 2"#,
            "rds_csi_routeros_ssh_reconnects_total 1",
            "rds_csi_routeros_ssh_connections 2",
            "rds_csi_rds_pool_size_bytes 1000",
            "rds_csi_rds_pool_free_bytes 400",
            r#"rds_csi_rds_disks{kind="snapshot"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        // A handle's default records into series registered nowhere.
        AttachmentMetrics::default().conflict();
        assert!(m.render().contains("rds_csi_attachment_conflicts_total 1"));
    }

    #[test]
    fn observed_rpcs_appear_in_the_exposition_with_the_prefix() {        let m = Metrics::default();
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

    #[test]
    fn node_data_path_metrics_have_conventional_names_and_bounded_labels() {
        let m = Metrics::default();
        m.observe_nvme("connect", true, 0.2);
        m.observe_nvme("connect", false, 30.0);
        m.observe_nvme("disconnect", true, 0.1);
        m.stale_mount("stats");
        m.stale_mount("stats");
        m.recovery(true);
        m.orphan("dry_run");
        let text = m.render();
        for line in [
            r#"rds_csi_nvme_operations_total{op="connect",outcome="ok"} 1"#,
            r#"rds_csi_nvme_operations_total{op="connect",outcome="error"} 1"#,
            r#"rds_csi_nvme_operations_total{op="disconnect",outcome="ok"} 1"#,
            r#"rds_csi_nvme_operation_duration_seconds_count{op="connect",outcome="error"} 1"#,
            r#"rds_csi_stale_mounts_detected_total{check="stats"} 2"#,
            r#"rds_csi_volume_recoveries_total{outcome="ok"} 1"#,
            r#"rds_csi_orphan_connections_total{outcome="dry_run"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
