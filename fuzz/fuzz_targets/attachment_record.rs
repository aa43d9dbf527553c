//! What the driver reads back about a volume: the attachment record in PV annotations
//! (production) and in the embedded store's JSON file, and the disk note (the RouterOS
//! comment naming a snapshot's source volume or a volume's layout) and parked allow list.
//! - PV annotations as found (the driver's keys with any values, other keys): decoding
//!   never panics, whatever mode the PV's spec implies for annotations naming none; it
//!   refuses with a one-line message, or gives holders sorted by node, at most one per node
//!   (the invariant of the manager's holder set), that encode and decode again to
//!   themselves (the migration and generation annotations included);
//! - records the driver writes (valid nodes, times to the microsecond, any mode) decode
//!   to exactly themselves;
//! - the embedded store's file: any bytes decode or are refused; what decodes re-encodes
//!   to itself;
//! - the disk note through RouterOS (render → emulator → `print` → parse, on an in-memory
//!   RDS): a snapshot lists its source volume, a repeated CreateVolume finds its layout,
//!   another layout is ALREADY_EXISTS, a new volume is parked.
#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rds_csi::Error;
use rds_csi::attachment::fence::parked_nqn;
use rds_csi::controller::ControllerConfig;
use rds_csi::controller::volumes::CreateArgs;
use rds_csi::kube::pv_store::{
    ANN_ATTACHED_AT, ANN_ATTACHED_MODE, ANN_ATTACHED_NODE, ANN_ATTACHED_READONLY, ANN_GENERATION,
    ANN_MIGRATION_SOURCE, ANN_MIGRATION_STARTED_AT, ANN_MIGRATION_TIMEOUT, annotations_for,
    records_from,
};
use rds_csi::ports::Rds;
use rds_csi::ports::store::AttachmentRecord;
use rds_csi::proto::csi::ListSnapshotsRequest;
use rds_csi::types::{AccessMode, NodeId, SnapshotId, VolumeId};
use rds_csi_fuzz::oracle::check_message;
use rds_csi_fuzz::{Text, block_on};

#[derive(Arbitrary, Debug)]
enum Key {
    Node,
    At,
    ReadOnly,
    Mode,
    Other(Text),
    MigrationSource,
    MigrationStartedAt,
    MigrationTimeout,
    Generation,
}

#[derive(Arbitrary, Debug)]
struct Holder {
    node: Text,
    /// Seconds since the epoch, folded into years 1970..=9999.
    secs: u64,
    micros: u32,
    readonly: bool,
}

#[derive(Arbitrary, Debug)]
enum Input {
    /// Annotations as found on a PV.
    Annotations(Vec<(Key, Text)>),
    /// Records as the driver writes them.
    Written { holders: Vec<Holder>, mode: u8 },
    /// The embedded store's file.
    StoreFile(Vec<u8>),
    /// The disk note and allow list through RouterOS.
    Note {
        volume: Text,
        snapshot: Text,
        xfs: bool,
    },
}

fn volume() -> VolumeId {
    VolumeId::new("pvc-1").expect("a valid id")
}

const MODES: [AccessMode; 3] = [
    AccessMode::SingleNode,
    AccessMode::MultiNodeReadOnly,
    AccessMode::MultiNodeMultiWriter,
];

/// The annotations `annotations_for` writes (a `null` removes a key).
fn written(holders: &[AttachmentRecord]) -> BTreeMap<String, String> {
    annotations_for(holders)
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            serde_json::Value::Null => None,
            other => panic!("annotation {k} written as {other}"),
        })
        .collect()
}

/// A time as annotations carry it: to the microsecond.
fn micros(t: std::time::SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i128,
        Err(e) => -(e.duration().as_micros() as i128),
    }
}

/// A record as annotations carry it: times to the microsecond.
type Essence = (
    String,
    AccessMode,
    bool,
    i128,
    u64,
    Option<(String, i128, u64)>,
);

/// A record as annotations carry it.
fn essence(r: &AttachmentRecord) -> Essence {
    let migration = r.migration.as_ref().map(|m| {
        (
            m.source.to_string(),
            micros(m.started_at),
            m.timeout.as_secs(),
        )
    });
    (
        r.node_id.to_string(),
        r.access_mode,
        r.readonly,
        micros(r.attached_at),
        r.generation,
        migration,
    )
}

fn decoded(ann: &BTreeMap<String, String>) {
    for mode in MODES {
        decoded_as(ann, mode);
    }
}

/// `ann` decoded with `mode` for a record that names none (the PV spec's reading).
fn decoded_as(ann: &BTreeMap<String, String>, mode: AccessMode) {
    match records_from(&volume(), ann, mode) {
        Ok(records) => {
            for pair in records.windows(2) {
                assert!(
                    pair[0].node_id < pair[1].node_id,
                    "holders not sorted by node, one per node: {records:?} from {ann:?}"
                );
            }
            assert!(records.iter().all(|r| r.volume_id == volume()));
            let again = records_from(&volume(), &written(&records), mode)
                .unwrap_or_else(|e| panic!("{records:?} written then unreadable: {e}"));
            assert_eq!(
                again.iter().map(essence).collect::<Vec<_>>(),
                records.iter().map(essence).collect::<Vec<_>>(),
                "decoded records do not survive a write"
            );
        }
        Err(e) => {
            if let Err(why) = check_message(&e) {
                panic!("{why}");
            }
        }
    }
}

fn round_trip(holders: Vec<Holder>, mode: u8) {
    let mode = MODES[usize::from(mode) % MODES.len()];
    let mut records: Vec<AttachmentRecord> = Vec::new();
    for h in holders {
        let Ok(node_id) = NodeId::new(h.node.0) else {
            continue;
        };
        if records.iter().any(|r| r.node_id == node_id) {
            continue;
        }
        // 1970-01-01 ..= 9999-12-31, to the microsecond: what RFC 3339 can carry.
        let secs = h.secs % 253_402_300_800;
        records.push(AttachmentRecord::new(
            volume(),
            node_id,
            UNIX_EPOCH
                + Duration::from_secs(secs)
                + Duration::from_micros(u64::from(h.micros % 1_000_000)),
            mode,
            h.readonly,
        ));
    }
    records.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let ann = written(&records);
    // Written records name their mode: the spec's reading is never used.
    let back = records_from(&volume(), &ann, AccessMode::SingleNode)
        .unwrap_or_else(|e| panic!("{records:?} written as {ann:?}, then unreadable: {e}"));
    assert_eq!(back, records, "written as {ann:?}");
}

fn store_file(bytes: &[u8]) {
    if let Ok(records) = serde_json::from_slice::<Vec<AttachmentRecord>>(bytes) {
        let text = serde_json::to_vec_pretty(&records).expect("records serialize");
        let again: Vec<AttachmentRecord> =
            serde_json::from_slice(&text).expect("written records read back");
        assert_eq!(again, records);
    }
}

fn note(volume: Text, snapshot: Text, xfs: bool) {
    let (Ok(v), Ok(s)) = (VolumeId::new(volume.0), SnapshotId::new(snapshot.0)) else {
        return;
    };
    if v.as_str() == s.as_str() {
        return;
    }
    let (controller, rds) = rds_csi_fuzz::controller(ControllerConfig::default());
    let fs = if xfs { "xfs" } else { "ext4" };
    let args = |fs: &str| CreateArgs {
        name: v.to_string(),
        volume_id: v.clone(),
        recorded_name: None,
        range: None,
        params: Default::default(),
        fs_type: Some(fs.to_string()),
        source: None,
    };
    block_on(async {
        controller
            .create_volume(&args(fs))
            .await
            .unwrap_or_else(|e| panic!("create {v}: {e}"));
        let disk = rds
            .get_disk(v.as_str())
            .await
            .expect("read")
            .expect("created");
        assert_eq!(
            disk.allowed_host_nqn,
            Some(parked_nqn(&v)),
            "{v} not born parked"
        );
        // The layout note: the same request again is the same volume, another is not.
        controller
            .create_volume(&args(fs))
            .await
            .unwrap_or_else(|e| panic!("repeated create {v}: {e}"));
        let other = if xfs { "ext4" } else { "xfs" };
        match controller.create_volume(&args(other)).await {
            Err(Error::AlreadyExists(_)) => {}
            got => panic!("create {v} as {other} after {fs}: {got:?}"),
        }
        // The snapshot note.
        let snap = controller
            .create_snapshot(s.as_str(), &s, None, &v)
            .await
            .unwrap_or_else(|e| panic!("snapshot {s} of {v}: {e}"));
        assert_eq!(snap.source_volume_id, v.as_str());
        let listed = controller
            .list_snapshots(&ListSnapshotsRequest {
                source_volume_id: v.to_string(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("list snapshots of {v}: {e}"));
        let ids: Vec<&str> = listed
            .entries
            .iter()
            .filter_map(|e| e.snapshot.as_ref())
            .map(|s| s.snapshot_id.as_str())
            .collect();
        assert_eq!(ids, [s.as_str()], "snapshots of {v}");
    });
}

fuzz_target!(|input: Input| {
    match input {
        Input::Annotations(entries) => {
            let ann: BTreeMap<String, String> = entries
                .into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Key::Node => ANN_ATTACHED_NODE.to_string(),
                        Key::At => ANN_ATTACHED_AT.to_string(),
                        Key::ReadOnly => ANN_ATTACHED_READONLY.to_string(),
                        Key::Mode => ANN_ATTACHED_MODE.to_string(),
                        Key::Other(t) => t.0,
                        Key::MigrationSource => ANN_MIGRATION_SOURCE.to_string(),
                        Key::MigrationStartedAt => ANN_MIGRATION_STARTED_AT.to_string(),
                        Key::MigrationTimeout => ANN_MIGRATION_TIMEOUT.to_string(),
                        Key::Generation => ANN_GENERATION.to_string(),
                    };
                    (key, v.0)
                })
                .collect();
            decoded(&ann);
        }
        Input::Written { holders, mode } => round_trip(holders, mode),
        Input::StoreFile(bytes) => store_file(&bytes),
        Input::Note {
            volume,
            snapshot,
            xfs,
        } => note(volume, snapshot, xfs),
    }
});
