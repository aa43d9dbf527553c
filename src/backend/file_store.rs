//! Embedded `AttachmentStore`: one JSON file under the state directory, replaced atomically
//! (write, fsync, rename, fsync dir) on every change, so a `kill -9` at any point leaves
//! either the old or the new set of records, and every acknowledged write is in it.
//! A temporary file left by a killed writer is ignored (and overwritten by the next write).

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
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        let mut records = self.records.lock().await;
        let mut next = records.clone();
        next.retain(|(v, _), _| v != volume);
        for r in holders {
            next.insert((r.volume_id.clone(), r.node_id.clone()), r.clone());
        }
        if next == *records {
            return Ok(());
        }
        // Only a durable write updates the cached copy.
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
        use std::io::BufRead;
        let exe = std::env::current_exe().unwrap();
        for kill_after in [1u64, 2, 5, 13, 40] {
            let dir = tempfile::tempdir().unwrap();
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "backend::file_store::tests::kill_nine_child_writer",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("RDS_CSI_KILL9_DIR", dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let mut acked = 0u64;
            for line in std::io::BufReader::new(stdout).lines() {
                if line.unwrap().starts_with("ACK ") {
                    acked += 1;
                    if acked == kill_after {
                        break;
                    }
                }
            }
            child.kill().unwrap(); // SIGKILL, mid-write or between writes
            child.wait().unwrap();
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
