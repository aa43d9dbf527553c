//! Where the emulator's disk files live: sparse files under a host directory (the
//! embedded default) or sizes in memory (the simulation and unit tests).
//!
//! Names are RouterOS file names (relative, no leading `/`), already checked by the
//! emulator's model to lie under the pool's mount point with no `..` segment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Storage of disk files.
pub trait Backing: Send + Sync + 'static {
    /// Creates a sparse file of `size` bytes. Fails if it exists.
    fn create(&self, name: &str, size: u64) -> std::io::Result<()>;
    /// Copies `src` to a new file `dst` and sets its size to `size` (≥ the source's).
    fn copy(&self, src: &str, dst: &str, size: u64) -> std::io::Result<()>;
    /// Sets the size of an existing file.
    fn resize(&self, name: &str, size: u64) -> std::io::Result<()>;
    /// Removes a file; absent is success.
    fn remove(&self, name: &str) -> std::io::Result<()>;
    /// Where the file lives on the host, when it is a real file (the embedded initiator
    /// attaches it as a loop device).
    fn host_path(&self, name: &str) -> Option<PathBuf>;
}

/// Sparse files under a host directory.
#[derive(Debug)]
pub struct FileBacking {
    root: PathBuf,
}

impl FileBacking {
    /// Files under `root` (created if missing).
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn sync_parent(p: &Path) -> std::io::Result<()> {
    match p.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Backing for FileBacking {
    fn create(&self, name: &str, size: u64) -> std::io::Result<()> {
        let p = self.path(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)?;
        f.set_len(size)?;
        f.sync_all()?;
        sync_parent(&p)
    }

    fn copy(&self, src: &str, dst: &str, size: u64) -> std::io::Result<()> {
        let (s, d) = (self.path(src), self.path(dst));
        if d.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{dst} exists"),
            ));
        }
        if let Some(dir) = d.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(&s, &d)?;
        let f = std::fs::OpenOptions::new().write(true).open(&d)?;
        f.set_len(size)?;
        f.sync_all()?;
        sync_parent(&d)
    }

    fn resize(&self, name: &str, size: u64) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))?;
        f.set_len(size)?;
        f.sync_all()
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        let p = self.path(name);
        match std::fs::remove_file(&p) {
            Ok(()) => sync_parent(&p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn host_path(&self, name: &str) -> Option<PathBuf> {
        Some(self.path(name))
    }
}

/// File sizes in memory (no content).
#[derive(Debug, Default)]
pub struct MemBacking {
    files: Mutex<BTreeMap<String, u64>>,
}

impl MemBacking {
    fn files(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backing for MemBacking {
    fn create(&self, name: &str, size: u64) -> std::io::Result<()> {
        let mut files = self.files();
        if files.contains_key(name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{name} exists"),
            ));
        }
        files.insert(name.to_string(), size);
        Ok(())
    }

    fn copy(&self, src: &str, dst: &str, size: u64) -> std::io::Result<()> {
        let mut files = self.files();
        if !files.contains_key(src) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{src} not found"),
            ));
        }
        if files.contains_key(dst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{dst} exists"),
            ));
        }
        files.insert(dst.to_string(), size);
        Ok(())
    }

    fn resize(&self, name: &str, size: u64) -> std::io::Result<()> {
        match self.files().get_mut(name) {
            Some(s) => {
                *s = size;
                Ok(())
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name} not found"),
            )),
        }
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.files().remove(name);
        Ok(())
    }

    fn host_path(&self, _name: &str) -> Option<PathBuf> {
        None
    }
}
