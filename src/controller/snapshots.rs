//! Snapshot RPCs of the controller core: create, delete, get, list.
//!
//! A snapshot is a non-exported `copy-from` copy of a volume's disk; its slot is the CSI
//! snapshot name when that is a safe slot, else an id derived from it
//! ([`crate::controller::names`]); its note ([`SnapshotNote`]) records the source volume
//! (RouterOS keeps no link between a copy and its source) and, for a derived id, the name.
//!
//! Snapshots the earlier Go driver made are recognised too (listed, restored from,
//! deleted): non-exported disks without a comment whose slot is its snapshot id
//! `snap-<uuid>-at-<suffix>` — the suffix is the creation time in unix seconds (its last
//! versions: a hex hash of the CSI name) and the uuid that of the source volume
//! `pvc-<uuid>` ([`earlier_driver_source`]); their note is made up from the slot.

use prost_types::Timestamp;

use crate::controller::{Controller, names, paging};
use crate::error::{Error, Result};
use crate::ports::rds::{Disk, DiskEntry};
use crate::proto::csi::{
    ListSnapshotsRequest, ListSnapshotsResponse, Snapshot, list_snapshots_response,
};
use crate::types::note::SnapshotNote;
use crate::types::{SnapshotId, VolumeId};

/// The note of a disk, when it is a snapshot (unexported): ours, with a snapshot note, or
/// the earlier driver's (no comment), whose note is read from its slot.
fn snapshot_note(export: bool, slot: &str, comment: Option<&str>) -> Option<SnapshotNote> {
    if export {
        return None;
    }
    match comment {
        Some(c) => SnapshotNote::parse(c),
        None => earlier_driver_source(slot).map(|source| SnapshotNote { source, name: None }),
    }
}

/// The source volume id `pvc-<uuid>` of the earlier driver's snapshot id
/// `snap-<uuid>-at-<suffix>` (uuid in lowercase hex 8-4-4-4-12, suffix lowercase hex
/// digits), or `None` when `slot` is not one.
pub fn earlier_driver_source(slot: &str) -> Option<String> {
    let rest = slot.strip_prefix("snap-")?;
    let (uuid, suffix) = rest.split_once("-at-")?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let groups: Vec<&str> = uuid.split('-').collect();
    let shaped = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g));
    (shaped && hex(suffix)).then(|| format!("pvc-{uuid}"))
}

/// When the earlier driver's snapshot `slot` was cut, if its suffix is unix seconds.
fn earlier_driver_created(slot: &str) -> Option<i64> {
    earlier_driver_source(slot)?;
    let (_, suffix) = slot.rsplit_once("-at-")?;
    suffix.parse().ok()
}

/// The note of a snapshot disk (see [`snapshot_note`]).
fn disk_note(disk: &Disk) -> Option<SnapshotNote> {
    snapshot_note(disk.export.is_some(), &disk.slot, disk.comment.as_deref())
}

/// Parses a snapshot id field.
pub fn snapshot_id_field(value: &str, field: &str) -> Result<SnapshotId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    SnapshotId::new(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// A validated CreateSnapshot name: its id and the name to record (derived ids only).
pub fn snapshot_name(name: &str) -> Result<(SnapshotId, Option<String>)> {
    names::snapshot_id_for(name, "name")
}

fn to_snapshot(disk: &Disk, note: &SnapshotNote) -> Snapshot {
    Snapshot {
        size_bytes: disk.size_bytes as i64,
        snapshot_id: disk.slot.clone(),
        source_volume_id: note.source.clone(),
        creation_time: Some(Timestamp {
            seconds: disk
                .created_unix
                .or_else(|| earlier_driver_created(&disk.slot))
                .unwrap_or(0),
            nanos: 0,
        }),
        // A copy-from completes before `/disk add` returns: the copy is usable at once.
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

impl Controller {
    /// CreateSnapshot core: `id` (from `name`, which is recorded when `recorded` says so)
    /// of volume `source`.
    pub async fn create_snapshot(
        &self,
        name: &str,
        id: &SnapshotId,
        recorded: Option<&str>,
        source: &VolumeId,
    ) -> Result<Snapshot> {
        // Observe first: "If a snapshot corresponding to the specified snapshot name is
        // successfully cut and ready to use ... the Plugin MUST reply 0 OK"; the same name
        // from another source is "ALREADY_EXISTS ... Indicates that a snapshot corresponding
        // to the specified snapshot name already exists but is incompatible with the
        // specified volume_id." One `/disk print` for the name's slot and the source.
        let found = self.rds.find_disks(&[id.as_str(), source.as_str()]).await?;
        let entry = |slot: &str| found.iter().find(|d| d.slot == slot);
        if let Some(existing) = entry(id.as_str()) {
            // A repeat: the copy's exact size and creation time.
            let existing = self.rds.sized(existing).await?;
            let Some(note) = disk_note(&existing) else {
                return Err(Error::AlreadyExists(format!(
                    "name {name:?} is taken by a volume or foreign disk on the RDS (slot {id}); \
                     choose another snapshot name"
                )));
            };
            let had = note.name.clone().unwrap_or_else(|| id.to_string());
            if had != name {
                return Err(Error::AlreadyExists(format!(
                    "the RDS slot {id} for name {name:?} holds snapshot {had:?}, a different \
                     name; choose another snapshot name"
                )));
            }
            if note.source != source.as_str() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists with source volume {}, not {source}",
                    note.source
                )));
            }
            return Ok(to_snapshot(&existing, &note));
        }
        // The source exists and is a volume (its size comes with the copy).
        if entry(source.as_str()).is_none_or(|d| d.export.is_none()) {
            return Err(Error::NotFound(format!(
                "source_volume_id: volume {source} does not exist"
            )));
        }
        let note = SnapshotNote {
            source: source.to_string(),
            name: recorded.map(str::to_string),
        };
        let disk = self
            .rds
            .create_snapshot(source.as_str(), id.as_str(), &note.render())
            .await?;
        Ok(to_snapshot(&disk, &note))
    }

    /// DeleteSnapshot core.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        match self.rds.find_disk(id.as_str()).await? {
            // "If a snapshot corresponding to the specified snapshot_id does not exist or the
            // artifacts associated with the snapshot do not exist anymore, the Plugin MUST
            // reply 0 OK." A volume of that name is not this snapshot: leave it. An absent
            // disk may be a delete interrupted between `/disk remove` and `/file remove`
            // (found by the simulation): its file is removed.
            Some(d) if is_snapshot_entry(&d) => Ok(self.rds.remove_disk(&d).await?),
            Some(_) => Ok(()),
            None => Ok(self.rds.remove_leftover_file(id.as_str()).await?),
        }
    }

    /// GetSnapshot core: "If the snapshot does not exist any more, `GetSnapshot` should
    /// return gRPC error code `NOT_FOUND`."
    pub async fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let disk = self.rds.get_disk(id.as_str()).await?;
        disk.as_ref()
            .and_then(|d| {
                disk_note(d).map(|n| to_snapshot(d, &n))
            })
            .ok_or_else(|| Error::NotFound(format!("snapshot {id} does not exist")))
    }

    /// ListSnapshots core.
    pub async fn list_snapshots(
        &self,
        req: &ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse> {
        paging::decode(&req.starting_token)?;
        let snaps: Vec<Disk> = if !req.snapshot_id.is_empty() {
            // "If snapshot_id is specified and not found, return an empty list" — an id that
            // cannot exist is simply not found.
            match SnapshotId::new(&req.snapshot_id) {
                Ok(id) => self.rds.get_disk(id.as_str()).await?.into_iter().collect(),
                Err(_) => Vec::new(),
            }
        } else {
            self.rds.list_snapshots("").await?
        };
        let mut snaps: Vec<(Disk, SnapshotNote)> = snaps
            .into_iter()
            .filter_map(|d| {
                let note = disk_note(&d)?;
                (req.source_volume_id.is_empty() || note.source == req.source_volume_id)
                    .then_some((d, note))
            })
            .collect();
        snaps.sort_by(|a, b| a.0.slot.cmp(&b.0.slot));
        let (page, next_token) = paging::page(
            snaps,
            |(d, _)| d.slot.as_str(),
            &req.starting_token,
            req.max_entries,
        )?;
        Ok(ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|(d, note)| list_snapshots_response::Entry {
                    snapshot: Some(to_snapshot(d, note)),
                })
                .collect(),
            next_token,
        })
    }
}

/// Whether a disk entry is one of our snapshots.
fn is_snapshot_entry(disk: &DiskEntry) -> bool {
    snapshot_note(disk.export.is_some(), &disk.slot, disk.comment.as_deref()).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(slot: &str, comment: Option<&str>, exported: bool) -> Disk {
        Disk {
            slot: slot.into(),
            file_path: format!("storage-pool/metal-csi/{slot}.img"),
            size_bytes: 1 << 30,
            export: exported.then(|| crate::ports::rds::NvmeExport {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
            }),
            allowed_host_nqn: None,
            created_unix: None,
            comment: comment.map(str::to_string),
        }
    }

    const UUID: &str = "a1b2c3d4-e5f6-7890-abcd-ef1234567890";

    #[test]
    fn the_earlier_drivers_snapshots_are_recognised_by_their_ids() {
        let timed = format!("snap-{UUID}-at-1739800000");
        let hashed = format!("snap-{UUID}-at-3a9f8c02d1");
        for id in [&timed, &hashed] {
            assert_eq!(
                earlier_driver_source(id).as_deref(),
                Some(format!("pvc-{UUID}").as_str()),
                "{id}"
            );
            assert!(disk_note(&disk(id, None, false)).is_some(), "{id}");
        }
        let d = disk(&timed, None, false);
        let s = to_snapshot(&d, &disk_note(&d).unwrap());
        assert_eq!(s.source_volume_id, format!("pvc-{UUID}"));
        assert_eq!(s.creation_time.unwrap().seconds, 1_739_800_000, "from the id");
        let d = disk(&hashed, None, false);
        assert_eq!(to_snapshot(&d, &disk_note(&d).unwrap()).creation_time.unwrap().seconds, 0);
        for not in [
            format!("snap-{UUID}"),
            format!("snap-{UUID}-at-"),
            format!("snap-{}-at-1", UUID.to_uppercase()),
            "snap-1234-at-5".to_string(),
            format!("pvc-{UUID}"),
            format!("snap-{UUID}-at-12 3"),
        ] {
            assert_eq!(earlier_driver_source(&not), None, "{not}");
        }
        // Exported, or commented by someone else: not a snapshot of either driver.
        assert!(disk_note(&disk(&timed, None, true)).is_none());
        assert!(disk_note(&disk(&timed, Some("backup of vm-1"), false)).is_none());
        // Ours: the note decides (one of an older driver version reads the same).
        assert!(disk_note(&disk("snap-x", Some("rds-csi-snapshot-of:pvc-1"), false)).is_some());
        assert!(disk_note(&disk("snap-x", None, false)).is_none());
    }
}
