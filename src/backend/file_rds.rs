//! Interim embedded `Rds`: sparse files under a local directory, with an atomically
//! written index. It keeps the port's semantics (exact sizes, copy-from, export settings,
//! idempotent delete of entry and file) until the RouterOS emulator replaces it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::fsutil::atomic_write;
use crate::ports::rds::{Disk, DiskSpec, NvmeExport, PoolCapacity, Rds, RdsError};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    size_bytes: u64,
    export: Option<(u16, String)>,
    allowed_host_nqn: Option<String>,
    created_unix: i64,
}

/// Disks as sparse files in `dir`, a pool of `pool_bytes`.
#[derive(Debug)]
pub struct FileRds {
    dir: PathBuf,
    pool_bytes: u64,
    index: Mutex<BTreeMap<String, Entry>>,
}

impl FileRds {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, pool_bytes: u64) -> Result<Self, RdsError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join("disks.json");
        let index = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| RdsError::Protocol(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&path, e)),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            pool_bytes,
            index: Mutex::new(index),
        })
    }

    /// Backing file of a slot.
    pub fn file_path(&self, slot: &str) -> PathBuf {
        self.dir.join(format!("{slot}.img"))
    }

    fn save(&self, index: &BTreeMap<String, Entry>) -> Result<(), RdsError> {
        let path = self.dir.join("disks.json");
        let data =
            serde_json::to_vec_pretty(index).map_err(|e| RdsError::Protocol(e.to_string()))?;
        atomic_write(&path, &data).map_err(|e| io(&path, e))
    }

    fn disk(&self, slot: &str, e: &Entry) -> Disk {
        Disk {
            slot: slot.to_string(),
            file_path: self.file_path(slot).display().to_string(),
            size_bytes: e.size_bytes,
            export: e.export.clone().map(|(port, nqn)| NvmeExport { port, nqn }),
            allowed_host_nqn: e.allowed_host_nqn.clone(),
            created_unix: Some(e.created_unix),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn io(path: &Path, e: std::io::Error) -> RdsError {
    RdsError::Unavailable(format!("{}: {e}", path.display()))
}

fn check_slot(slot: &str) -> Result<(), RdsError> {
    crate::types::VolumeId::new(slot)
        .map(|_| ())
        .map_err(|e| RdsError::Rejected(format!("slot: {e}")))
}

#[async_trait]
impl Rds for FileRds {
    async fn ping(&self) -> Result<(), RdsError> {
        std::fs::metadata(&self.dir)
            .map(|_| ())
            .map_err(|e| io(&self.dir, e))
    }

    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError> {
        check_slot(&spec.slot)?;
        let mut index = self.lock();
        if index.contains_key(&spec.slot) {
            return Err(RdsError::AlreadyExists(format!("disk slot={}", spec.slot)));
        }
        let used: u64 = index.values().map(|e| e.size_bytes).sum();
        if used.saturating_add(spec.size_bytes) > self.pool_bytes {
            return Err(RdsError::NoSpace(format!(
                "{} bytes requested, {} free",
                spec.size_bytes,
                self.pool_bytes.saturating_sub(used)
            )));
        }
        let path = self.file_path(&spec.slot);
        if let Some(src) = &spec.copy_from {
            if !index.contains_key(src) {
                return Err(RdsError::NotFound(format!("copy-from source slot={src}")));
            }
            std::fs::copy(self.file_path(src), &path).map_err(|e| io(&path, e))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(spec.copy_from.is_none())
            .open(&path)
            .map_err(|e| io(&path, e))?;
        f.set_len(spec.size_bytes).map_err(|e| io(&path, e))?;
        f.sync_all().map_err(|e| io(&path, e))?;
        let created_unix = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        let entry = Entry {
            size_bytes: spec.size_bytes,
            export: spec.export.clone().map(|e| (e.port, e.nqn)),
            allowed_host_nqn: None,
            created_unix,
        };
        index.insert(spec.slot.clone(), entry.clone());
        self.save(&index)?;
        Ok(self.disk(&spec.slot, &entry))
    }

    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError> {
        Ok(self.lock().get(slot).map(|e| self.disk(slot, e)))
    }

    async fn list_disks(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        let index = self.lock();
        Ok(index
            .range(slot_prefix.to_string()..)
            .take_while(|(s, _)| s.starts_with(slot_prefix))
            .map(|(s, e)| self.disk(s, e))
            .collect())
    }

    async fn resize_disk(&self, slot: &str, size_bytes: u64) -> Result<Disk, RdsError> {
        let mut index = self.lock();
        let Some(entry) = index.get(slot).cloned() else {
            return Err(RdsError::NotFound(format!("disk slot={slot}")));
        };
        let path = self.file_path(slot);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        f.set_len(size_bytes).map_err(|e| io(&path, e))?;
        f.sync_all().map_err(|e| io(&path, e))?;
        let entry = Entry {
            size_bytes,
            ..entry
        };
        index.insert(slot.to_string(), entry.clone());
        self.save(&index)?;
        Ok(self.disk(slot, &entry))
    }

    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError> {
        let mut index = self.lock();
        if index.remove(slot).is_some() {
            self.save(&index)?;
        }
        let path = self.file_path(slot);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, e)),
        }
    }

    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        let used: u64 = self.lock().values().map(|e| e.size_bytes).sum();
        Ok(PoolCapacity {
            size_bytes: self.pool_bytes,
            free_bytes: self.pool_bytes.saturating_sub(used),
        })
    }

    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError> {
        let mut index = self.lock();
        let Some(entry) = index.get_mut(slot) else {
            return Err(RdsError::NotFound(format!("disk slot={slot}")));
        };
        entry.allowed_host_nqn = host_nqn.map(str::to_string);
        self.save(&index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn spec(slot: &str, size: u64) -> DiskSpec {
        DiskSpec {
            slot: slot.into(),
            size_bytes: size,
            export: Some(NvmeExport {
                port: 4420,
                nqn: format!("nqn.test:{slot}"),
            }),
            copy_from: None,
        }
    }

    #[tokio::test]
    async fn disks_survive_reopen_with_exact_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let rds = FileRds::open(dir.path(), 10 * GIB).unwrap();
        rds.create_disk(&spec("pvc-a", GIB + GIB / 2))
            .await
            .unwrap();
        assert!(matches!(
            rds.create_disk(&spec("pvc-a", GIB)).await,
            Err(RdsError::AlreadyExists(_))
        ));
        let reopened = FileRds::open(dir.path(), 10 * GIB).unwrap();
        let d = reopened.get_disk("pvc-a").await.unwrap().unwrap();
        assert_eq!(d.size_bytes, GIB + GIB / 2);
        assert_eq!(
            std::fs::metadata(reopened.file_path("pvc-a"))
                .unwrap()
                .len(),
            GIB + GIB / 2
        );
        assert_eq!(
            reopened.capacity().await.unwrap().free_bytes,
            10 * GIB - (GIB + GIB / 2)
        );
    }

    #[tokio::test]
    async fn delete_removes_entry_and_file_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let rds = FileRds::open(dir.path(), 10 * GIB).unwrap();
        rds.create_disk(&spec("pvc-b", GIB)).await.unwrap();
        rds.delete_disk("pvc-b").await.unwrap();
        rds.delete_disk("pvc-b").await.unwrap();
        assert!(!rds.file_path("pvc-b").exists());
        assert_eq!(rds.list_disks("pvc").await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn pool_space_and_hostile_slots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rds = FileRds::open(dir.path(), GIB).unwrap();
        assert!(matches!(
            rds.create_disk(&spec("pvc-big", 2 * GIB)).await,
            Err(RdsError::NoSpace(_))
        ));
        assert!(matches!(
            rds.create_disk(&spec("../x", GIB)).await,
            Err(RdsError::Rejected(_))
        ));
    }
}
