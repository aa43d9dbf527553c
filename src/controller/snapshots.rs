//! Snapshot RPCs of the controller core: create, delete, get, list.
//!
//! A snapshot is a non-exported `copy-from` copy of a volume's disk; its slot is the CSI
//! snapshot name when that is a safe slot, else an id derived from it
//! ([`crate::controller::names`]); its note ([`SnapshotNote`]) records the source volume
//! (RouterOS keeps no link between a copy and its source) and, for a derived id, the name.

use prost_types::Timestamp;

use crate::controller::{Controller, names, paging};
use crate::error::{Error, Result};
use crate::ports::rds::{Disk, DiskEntry};
use crate::proto::csi::{
    ListSnapshotsRequest, ListSnapshotsResponse, Snapshot, list_snapshots_response,
};
use crate::types::note::SnapshotNote;
use crate::types::{SnapshotId, VolumeId};

/// The note of a disk, when it is one of our snapshots (unexported, with a snapshot note).
fn snapshot_note(export: bool, comment: Option<&str>) -> Option<SnapshotNote> {
    if export {
        return None;
    }
    comment.and_then(SnapshotNote::parse)
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
            seconds: disk.created_unix.unwrap_or(0),
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
            let Some(note) = snapshot_note(existing.export.is_some(), existing.comment.as_deref())
            else {
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
                snapshot_note(d.export.is_some(), d.comment.as_deref())
                    .map(|n| to_snapshot(d, &n))
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
                let note = snapshot_note(d.export.is_some(), d.comment.as_deref())?;
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
    snapshot_note(disk.export.is_some(), disk.comment.as_deref()).is_some()
}
