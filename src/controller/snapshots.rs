//! Snapshot RPCs of the controller core: create, delete, list.
//!
//! A snapshot is a non-exported `copy-from` copy of a volume's disk; its slot is the CSI
//! snapshot name, and its disk comment records the source volume (`rds-csi-snapshot-of:<id>`),
//! since RouterOS keeps no link between a copy and its source.

use prost_types::Timestamp;

use crate::controller::{Controller, paging};
use crate::error::{Error, Result};
use crate::ports::rds::{Disk, DiskEntry};
use crate::proto::csi::{
    ListSnapshotsRequest, ListSnapshotsResponse, Snapshot, list_snapshots_response,
};
use crate::types::{SnapshotId, VolumeId};

const SOURCE_TAG: &str = "rds-csi-snapshot-of:";

/// The disk comment recording a snapshot's source volume.
pub fn source_comment(source: &VolumeId) -> String {
    format!("{SOURCE_TAG}{source}")
}

/// The source volume recorded in a snapshot disk's comment.
pub fn source_of(disk: &Disk) -> Option<&str> {
    disk.comment.as_deref()?.strip_prefix(SOURCE_TAG)
}

/// Whether a disk is one of our snapshots.
fn is_snapshot(disk: &Disk) -> bool {
    disk.export.is_none() && source_of(disk).is_some()
}

/// Whether a disk entry is one of our snapshots.
fn is_snapshot_entry(disk: &DiskEntry) -> bool {
    disk.export.is_none()
        && disk
            .comment
            .as_deref()
            .is_some_and(|c| c.starts_with(SOURCE_TAG))
}

/// Parses a snapshot id field.
pub fn snapshot_id_field(value: &str, field: &str) -> Result<SnapshotId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    SnapshotId::new(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

fn to_snapshot(disk: &Disk) -> Snapshot {
    Snapshot {
        size_bytes: disk.size_bytes as i64,
        snapshot_id: disk.slot.clone(),
        source_volume_id: source_of(disk).unwrap_or_default().to_string(),
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
    /// CreateSnapshot core.
    pub async fn create_snapshot(&self, name: &SnapshotId, source: &VolumeId) -> Result<Snapshot> {
        // Observe first: "If a snapshot corresponding to the specified snapshot name is
        // successfully cut and ready to use ... the Plugin MUST reply 0 OK"; the same name
        // from another source is "ALREADY_EXISTS ... Indicates that a snapshot corresponding
        // to the specified snapshot name already exists but is incompatible with the
        // specified volume_id."
        if let Some(existing) = self.rds.get_disk(name.as_str()).await? {
            return match source_of(&existing) {
                Some(s) if is_snapshot(&existing) && s == source.as_str() => {
                    Ok(to_snapshot(&existing))
                }
                Some(s) if is_snapshot(&existing) => Err(Error::AlreadyExists(format!(
                    "snapshot {name} already exists with source volume {s}, not {source}"
                ))),
                _ => Err(Error::AlreadyExists(format!(
                    "name {name:?} is taken by a volume or foreign disk on the RDS; choose another snapshot name"
                ))),
            };
        }
        self.volume_entry(source).await.map_err(|e| match e {
            Error::NotFound(_) => {
                Error::NotFound(format!("source_volume_id: volume {source} does not exist"))
            }
            e => e,
        })?;
        let disk = self
            .rds
            .create_snapshot(source.as_str(), name.as_str(), &source_comment(source))
            .await?;
        Ok(to_snapshot(&disk))
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

    /// ListSnapshots core.
    pub async fn list_snapshots(
        &self,
        req: &ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse> {
        paging::decode(&req.starting_token)?;
        let mut snaps: Vec<Disk> = if !req.snapshot_id.is_empty() {
            // "If snapshot_id is specified and not found, return an empty list" — an id that
            // cannot exist is simply not found.
            match SnapshotId::new(&req.snapshot_id) {
                Ok(id) => self.rds.get_disk(id.as_str()).await?.into_iter().collect(),
                Err(_) => Vec::new(),
            }
        } else {
            self.rds.list_snapshots("").await?
        };
        snaps.retain(|d| {
            is_snapshot(d)
                && (req.source_volume_id.is_empty()
                    || source_of(d) == Some(req.source_volume_id.as_str()))
        });
        snaps.sort_by(|a, b| a.slot.cmp(&b.slot));
        let (page, next_token) = paging::page(
            snaps,
            |d| d.slot.as_str(),
            &req.starting_token,
            req.max_entries,
        )?;
        Ok(ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|d| list_snapshots_response::Entry {
                    snapshot: Some(to_snapshot(d)),
                })
                .collect(),
            next_token,
        })
    }
}
