//! Snapshot RPCs of the controller core: create, delete, list.
//!
//! A snapshot is a non-exported `copy-from` copy of a volume's disk; its slot is the CSI
//! snapshot name, and its disk comment records the source volume (`rds-csi-snapshot-of:<id>`),
//! since RouterOS keeps no link between a copy and its source.
//!
//! Snapshots the earlier Go driver made are recognised too (listed, restored from,
//! deleted): non-exported disks without a comment whose slot is its snapshot id
//! `snap-<uuid>-at-<suffix>` — the suffix is the creation time in unix seconds (its last
//! versions: a hex hash of the CSI name) and the uuid that of the source volume
//! `pvc-<uuid>` ([`earlier_driver_source`]).

use prost_types::Timestamp;

use crate::controller::{Controller, paging};
use crate::error::{Error, Result};
use crate::ports::rds::Disk;
use crate::proto::csi::{
    ListSnapshotsRequest, ListSnapshotsResponse, Snapshot, list_snapshots_response,
};
use crate::types::{SnapshotId, VolumeId};

const SOURCE_TAG: &str = "rds-csi-snapshot-of:";

/// The disk comment recording a snapshot's source volume.
pub fn source_comment(source: &VolumeId) -> String {
    format!("{SOURCE_TAG}{source}")
}

/// The source volume of a snapshot disk: recorded in its comment, or, for the earlier
/// driver's snapshots (no comment), named by its slot.
pub fn source_of(disk: &Disk) -> Option<String> {
    match disk.comment.as_deref() {
        Some(c) => c.strip_prefix(SOURCE_TAG).map(str::to_string),
        None => earlier_driver_source(&disk.slot),
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

/// Whether a disk is a snapshot: ours, or the earlier driver's.
fn is_snapshot(disk: &Disk) -> bool {
    disk.export.is_none() && source_of(disk).is_some()
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
        source_volume_id: source_of(disk).unwrap_or_default(),
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
        self.volume(source).await.map_err(|e| match e {
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
        match self.rds.get_disk(id.as_str()).await? {
            // "If a snapshot corresponding to the specified snapshot_id does not exist or the
            // artifacts associated with the snapshot do not exist anymore, the Plugin MUST
            // reply 0 OK." A volume of that name is not this snapshot: leave it. An absent
            // disk may be a delete interrupted between `/disk remove` and `/file remove`
            // (found by the simulation): the adapter's delete still clears the file.
            Some(d) if is_snapshot(&d) => Ok(self.rds.delete_snapshot(id.as_str()).await?),
            Some(_) => Ok(()),
            None => Ok(self.rds.delete_snapshot(id.as_str()).await?),
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
                    || source_of(d).as_deref() == Some(req.source_volume_id.as_str()))
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
            assert!(is_snapshot(&disk(id, None, false)), "{id}");
        }
        let s = to_snapshot(&disk(&timed, None, false));
        assert_eq!(s.source_volume_id, format!("pvc-{UUID}"));
        assert_eq!(s.creation_time.unwrap().seconds, 1_739_800_000, "from the id");
        assert_eq!(to_snapshot(&disk(&hashed, None, false)).creation_time.unwrap().seconds, 0);
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
        assert!(!is_snapshot(&disk(&timed, None, true)));
        assert!(!is_snapshot(&disk(&timed, Some("backup of vm-1"), false)));
        // Ours: the comment decides.
        assert!(is_snapshot(&disk("snap-x", Some("rds-csi-snapshot-of:pvc-1"), false)));
        assert!(!is_snapshot(&disk("snap-x", None, false)));
    }
}
