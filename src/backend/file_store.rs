//! Embedded `AttachmentStore`: one JSON file under the state directory, replaced atomically
//! (write, fsync, rename, fsync dir) on every change, so a `kill -9` at any point leaves
//! either the old or the new set of records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::fsutil::atomic_write;
use crate::ports::store::{AttachmentRecord, AttachmentStore, StoreError};
use crate::types::{NodeId, VolumeId};

type Records = BTreeMap<(VolumeId, NodeId), AttachmentRecord>;

/// Attachment records in `<dir>/attachments.json`.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    // Serialises writers; the file is the truth, this is its cached copy.
    records: Mutex<Records>,
}

impl FileStore {
    /// Opens (or creates empty) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let path = dir.join("attachments.json");
        let records = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Vec<AttachmentRecord>>(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?
                .into_iter()
                .map(|r| ((r.volume_id.clone(), r.node_id.clone()), r))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Records::new(),
            Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
        };
        Ok(Self {
            path,
            records: Mutex::new(records),
        })
    }

    fn write(&self, records: &Records) -> Result<(), StoreError> {
        let list: Vec<&AttachmentRecord> = records.values().collect();
        let data = serde_json::to_vec_pretty(&list).map_err(|e| StoreError::Io(e.to_string()))?;
        atomic_write(&self.path, &data)
            .map_err(|e| StoreError::Io(format!("{}: {e}", self.path.display())))
    }
}

#[async_trait]
impl AttachmentStore for FileStore {
    async fn persist(&self, record: &AttachmentRecord) -> Result<(), StoreError> {
        let mut records = self.records.lock().await;
        let mut next = records.clone();
        next.insert(
            (record.volume_id.clone(), record.node_id.clone()),
            record.clone(),
        );
        // Only a durable write updates the cached copy.
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    async fn clear(&self, volume: &VolumeId, node: &NodeId) -> Result<(), StoreError> {
        let mut records = self.records.lock().await;
        let key = (volume.clone(), node.clone());
        if !records.contains_key(&key) {
            return Ok(());
        }
        let mut next = records.clone();
        next.remove(&key);
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        Ok(self.records.lock().await.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AccessMode;
    use std::time::{Duration, UNIX_EPOCH};

    fn rec(v: &str, n: &str) -> AttachmentRecord {
        AttachmentRecord {
            volume_id: VolumeId::new(v).unwrap(),
            node_id: NodeId::new(n).unwrap(),
            attached_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            access_mode: AccessMode::SingleNode,
            readonly: false,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_clear_names_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.persist(&rec("pvc-1", "node-a")).await.unwrap();
        store.persist(&rec("pvc-2", "node-b")).await.unwrap();
        store
            .clear(
                &VolumeId::new("pvc-1").unwrap(),
                &NodeId::new("node-b").unwrap(),
            )
            .await
            .unwrap();
        store
            .clear(
                &VolumeId::new("pvc-2").unwrap(),
                &NodeId::new("node-b").unwrap(),
            )
            .await
            .unwrap();
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
}
