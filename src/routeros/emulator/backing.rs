//! Where the emulator's disk files live: sparse files under a host directory (the
//! embedded default) or sizes in memory (the simulation and unit tests).
//!
//! Names are RouterOS file names (relative, no leading `/`), already checked by the
//! emulator's model to lie under the pool's mount point with no `..` segment. The model
//! (the emulator's tables) decides which files exist: `create` and `copy` are only asked
//! for a name the tables do not hold, so a host file already there is an orphan of a crash
//! between the I/O and the tables' journal, and is replaced.
//!
//! No fsync: like the tables, a file operation survives a `kill -9` once its system call
//! returned, which is what the embedded backend promises (see
//! [`crate::fsutil::journal`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Storage of disk files.
pub trait Backing: Send + Sync + 'static {
    /// Creates a sparse file of `size` bytes (replacing an orphan of that name).
    fn create(&self, name: &str, size: u64) -> std::io::Result<()>;
    /// Copies `src` to a new file `dst` (holes kept; an orphan of that name is replaced)
    /// and sets its size to `size` (≥ the source's).
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

/// Removes an orphan at `p` (a file the tables do not know); absent is fine.
fn remove_orphan(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => {
            tracing::info!(file = %p.display(), "replaced an orphaned disk file (left by a crash)");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Backing for FileBacking {
    fn create(&self, name: &str, size: u64) -> std::io::Result<()> {
        let p = self.path(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                remove_orphan(&p)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)?
            }
            other => other?,
        };
        f.set_len(size)
    }

    fn copy(&self, src: &str, dst: &str, size: u64) -> std::io::Result<()> {
        let (s, d) = (self.path(src), self.path(dst));
        if let Some(dir) = d.parent() {
            std::fs::create_dir_all(dir)?;
        }
        remove_orphan(&d)?;
        copy_sparse(&s, &d, size)
    }

    fn resize(&self, name: &str, size: u64) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))?
            .set_len(size)
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn host_path(&self, name: &str) -> Option<PathBuf> {
        Some(self.path(name))
    }
}

/// Copies `src` to a new file `dst` of `size` bytes, keeping holes: only the data
/// extents `SEEK_DATA`/`SEEK_HOLE` report are read and written, so a snapshot of a mostly
/// empty 1 TiB volume costs what the volume holds, not 1 TiB.
fn copy_sparse(src: &Path, dst: &Path, size: u64) -> std::io::Result<()> {
    let from = std::fs::File::open(src)?;
    let len = from.metadata()?.len();
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // From here on `dst` is ours: a failed copy leaves no half file behind.
    let result = copy_extents(&from, &to, len, size);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_extents(
    from: &std::fs::File,
    to: &std::fs::File,
    len: u64,
    size: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    to.set_len(size.max(len))?;
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(from.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `off`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut off = data;
        while off < hole {
            let want = usize::try_from((hole - off).min(buf.len() as u64)).unwrap_or(buf.len());
            let n = from.read_at(&mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            to.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        pos = hole;
    }
    to.set_len(size)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn copies_keep_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBacking::new(dir.path()).unwrap();
        let gib = 1u64 << 30;
        b.create("pool/v/a.img", 4 * gib).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("pool/v/a.img"))
            .unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 2 * gib + 12345).unwrap();
        f.write_all_at(b"tail", 4 * gib - 4).unwrap();
        drop(f);
        b.copy("pool/v/a.img", "pool/v/b.img", 5 * gib).unwrap();
        let c = std::fs::File::open(dir.path().join("pool/v/b.img")).unwrap();
        let meta = c.metadata().unwrap();
        assert_eq!(meta.len(), 5 * gib);
        // Sparse: a few data blocks, not 4 GiB.
        assert!(meta.blocks() * 512 < 64 << 20, "{} blocks", meta.blocks());
        let mut buf = [0u8; 6];
        c.read_exact_at(&mut buf[..4], 0).unwrap();
        assert_eq!(&buf[..4], b"head");
        c.read_exact_at(&mut buf, 2 * gib + 12345).unwrap();
        assert_eq!(&buf, b"middle");
        c.read_exact_at(&mut buf[..4], 4 * gib - 4).unwrap();
        assert_eq!(&buf[..4], b"tail");
        c.read_exact_at(&mut buf[..4], 4 * gib).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 0]);
        assert!(b.copy("pool/v/none.img", "pool/v/c.img", gib).is_err());
        assert!(!dir.path().join("pool/v/c.img").exists());
    }

    #[test]
    fn an_orphaned_file_is_replaced_by_create_and_copy() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBacking::new(dir.path()).unwrap();
        let orphan = dir.path().join("pool/v/o.img");
        std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
        std::fs::write(&orphan, b"stale data").unwrap();
        b.create("pool/v/o.img", 4096).unwrap();
        assert_eq!(std::fs::read(&orphan).unwrap(), vec![0u8; 4096]);
        b.create("pool/v/src.img", 8192).unwrap();
        std::fs::write(&orphan, b"stale again").unwrap();
        b.copy("pool/v/src.img", "pool/v/o.img", 8192).unwrap();
        assert_eq!(std::fs::read(&orphan).unwrap(), vec![0u8; 8192]);
    }
}
