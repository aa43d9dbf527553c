//! Embedded `AttachmentStore`: the attachment records in a journaled file under the state
//! directory ([`crate::fsutil::journal`]): `attachments.json` (the snapshot, a list of
//! records as earlier versions wrote it whole) and `attachments.journal` (one line per
//! change of a volume's holders).
//!
//! Durability: a write returns once its journal line is in the kernel, so a `kill -9` at
//! any point leaves every acknowledged write readable and nothing torn (the test below
//! kills a writer mid-way); no fsync per write (see the journal's header for why, and what
//! a power loss costs).
//!
//! Concurrency: one short critical section per write (the in-memory map and one
//! `write(2)`), never held across an `.await`; writes of different volumes do not wait on
//! each other's I/O beyond that single system call.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::fsutil::journal::{Journal, JournalError, Journaled};
use crate::ports::store::{AttachmentRecord, AttachmentStore, StoreError};
use crate::types::VolumeId;

/// The holders of every attached volume (volumes attached nowhere are absent). On disk, a
/// flat list of records sorted by (volume, node).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<AttachmentRecord>", into = "Vec<AttachmentRecord>")]
struct Records(BTreeMap<VolumeId, Vec<AttachmentRecord>>);

impl From<Vec<AttachmentRecord>> for Records {
    fn from(list: Vec<AttachmentRecord>) -> Self {
        let mut map: BTreeMap<VolumeId, Vec<AttachmentRecord>> = BTreeMap::new();
        for r in list {
            map.entry(r.volume_id.clone()).or_default().push(r);
        }
        for holders in map.values_mut() {
            holders.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        }
        Self(map)
    }
}

impl From<Records> for Vec<AttachmentRecord> {
    fn from(records: Records) -> Self {
        records.0.into_values().flatten().collect()
    }
}

impl Journaled for Records {
    /// A volume's holders, replaced whole (empty: attached nowhere).
    type Change = (VolumeId, Vec<AttachmentRecord>);

    fn apply(&mut self, (volume, holders): Self::Change) {
        if holders.is_empty() {
            self.0.remove(&volume);
        } else {
            self.0.insert(volume, holders);
        }
    }

    fn entry_count(&self) -> usize {
        self.0.len()
    }
}

#[derive(Debug)]
struct Inner {
    journal: Journal<Records>,
    records: Records,
}

/// Attachment records in `<dir>/attachments.json` + `<dir>/attachments.journal`.
#[derive(Debug)]
pub struct FileStore {
    inner: Mutex<Inner>,
}

impl From<JournalError> for StoreError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::Io { .. } => StoreError::Io(e.to_string()),
            JournalError::Corrupt { .. } => StoreError::Corrupt(e.to_string()),
        }
    }
}

impl FileStore {
    /// Opens (or creates empty) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let (journal, records) = Journal::open(dir, "attachments")?;
        Ok(Self {
            inner: Mutex::new(Inner { journal, records }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl AttachmentStore for FileStore {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let current = inner.records.0.get(volume).map(Vec::as_slice).unwrap_or(&[]);
        if current == holders {
            return Ok(());
        }
        let change = (volume.clone(), holders.to_vec());
        // Only a recorded change updates memory.
        inner
            .journal
            .append(std::slice::from_ref(&change))
            .map_err(|e| StoreError::Io(format!("attachment journal: {e}")))?;
        let Inner { journal, records } = &mut *inner;
        records.apply(change);
        journal.compact_if_due(records);
        Ok(())
    }

    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        Ok(self.inner().records.0.get(volume).cloned().unwrap_or_default())
    }

    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        Ok(self.inner().records.clone().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AccessMode;
    use crate::types::NodeId;
    use std::time::{Duration, UNIX_EPOCH};

    fn rec(v: &str, n: &str) -> AttachmentRecord {
        AttachmentRecord {
            volume_id: VolumeId::new(v).unwrap(),
            node_id: NodeId::new(n).unwrap(),
            attached_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            access_mode: AccessMode::SingleNode,
            readonly: false,
            migration: None,
            generation: 0,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_a_write_replaces_only_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let (v1, v2) = (
            VolumeId::new("pvc-1").unwrap(),
            VolumeId::new("pvc-2").unwrap(),
        );
        store
            .write_volume(&v1, &[rec("pvc-1", "node-a"), rec("pvc-1", "node-b")])
            .await
            .unwrap();
        store
            .write_volume(&v2, &[rec("pvc-2", "node-b")])
            .await
            .unwrap();
        store
            .write_volume(&v1, &[rec("pvc-1", "node-a")])
            .await
            .unwrap();
        store.write_volume(&v2, &[]).await.unwrap();
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(
            reopened.load_all().await.unwrap(),
            vec![rec("pvc-1", "node-a")]
        );
    }

    #[tokio::test]
    async fn a_corrupt_file_is_reported_not_discarded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("attachments.json"), b"{not json").unwrap();
        assert!(matches!(
            FileStore::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(
            std::fs::read(dir.path().join("attachments.json")).unwrap(),
            b"{not json"
        );
    }

    /// Child half of the kill -9 test: writes volumes `kill-0`, `kill-1`, ... forever,
    /// printing each index once its write returned (was acknowledged).
    #[tokio::test]
    async fn kill_nine_child_writer() {
        use std::io::Write;
        let Some(dir) = std::env::var_os("RDS_CSI_KILL9_DIR") else {
            return; // only runs as the child of the test below
        };
        let store = FileStore::open(Path::new(&dir)).unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0u64.. {
            let v = VolumeId::new(format!("kill-{i}")).unwrap();
            store
                .write_volume(&v, &[rec(v.as_str(), "node-a")])
                .await
                .unwrap();
            writeln!(out, "ACK {i}").unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn survives_kill_nine_at_any_point_with_every_acknowledged_write() {
        // Past the first compactions (every 1,024 writes) too.
        for kill_after in [1u64, 2, 5, 13, 40, 1500, 2600] {
            let dir = tempfile::tempdir().unwrap();
            // SIGKILL once `kill_after` changes were acknowledged.
            let acked = crate::fsutil::kill9::kill_after_acks(
                "backend::file_store::tests::kill_nine_child_writer",
                "RDS_CSI_KILL9_DIR",
                dir.path(),
                kill_after,
            );
            assert_eq!(acked, kill_after, "child stopped early");
            let store = FileStore::open(dir.path()).expect("store must reopen after kill -9");
            let records = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(store.load_all())
                .unwrap();
            let n = records.len() as u64;
            assert!(n >= acked, "{n} records after {acked} acknowledged writes");
            let mut want: Vec<String> = (0..n).map(|i| format!("kill-{i}")).collect();
            want.sort();
            let got: Vec<String> = records.iter().map(|r| r.volume_id.to_string()).collect();
            assert_eq!(got, want, "a prefix of the writes, nothing torn");
        }
    }
}
