//! The real [`Mounter`]: `blkid`, `mkfs.*`, `mount`/`umount`, `resize2fs`/`xfs_growfs`,
//! `statvfs`, and `/proc/self/mountinfo` for the mount table.
//!
//! Invariants:
//! - Every external command goes through the [`CommandRunner`] and is bounded by its
//!   timeout; every blocking syscall that could stall on a dead device (statvfs, stat,
//!   open) runs on the blocking pool under a timeout, so no RPC hangs forever.
//! - `format` is only ever called by the node core after `filesystem_of` reported no
//!   signature at all; `mkfs.xfs` runs without `-f` so it refuses a device with a signature
//!   even if a caller forgot that check.
//! - The busy check is the kernel's mount table (no `/proc/*/fd` scan, no `fuser`), so it
//!   can neither see nor hang on the plugin's own process.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::node::exec::{CommandOutput, CommandRunner, ExecError, command_line};
use crate::node::mountinfo;
use crate::ports::mounter::{FsCheck, MountEntry, MountError, Mounter, TargetKind, UsageStats};

/// Filesystems the node formats and mounts.
pub const SUPPORTED_FS_TYPES: &[&str] = &["ext4", "xfs"];

/// The production mounter.
pub struct RealMounter {
    runner: Arc<dyn CommandRunner>,
    mountinfo: PathBuf,
    syscall_timeout: Duration,
}

impl RealMounter {
    /// A mounter running commands through `runner`, reading the mount table from
    /// `/proc/self/mountinfo`, bounding blocking syscalls by `syscall_timeout`.
    pub fn new(runner: Arc<dyn CommandRunner>, syscall_timeout: Duration) -> Self {
        Self {
            runner,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            syscall_timeout,
        }
    }

    async fn run(&self, program: &str, args: &[String]) -> Result<CommandOutput, MountError> {
        self.runner.run(program, args).await.map_err(exec_error)
    }

    async fn run_ok(&self, program: &str, args: &[String]) -> Result<CommandOutput, MountError> {
        let out = self.run(program, args).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(MountError::Command(format!(
                "`{}` failed: {}",
                command_line(program, args),
                out.failure_text()
            )))
        }
    }

    /// Runs a blocking filesystem call on the blocking pool, bounded.
    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> Result<T, MountError> + Send + 'static,
    ) -> Result<T, MountError> {
        match tokio::time::timeout(self.syscall_timeout, tokio::task::spawn_blocking(f)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(MountError::Io(format!("{what}: {e}"))),
            Err(_) => Err(MountError::Timeout(format!(
                "{what} did not return within {}s (dead device or mount?)",
                self.syscall_timeout.as_secs()
            ))),
        }
    }
}

fn exec_error(e: ExecError) -> MountError {
    match e {
        ExecError::Timeout { .. } => MountError::Timeout(e.to_string()),
        ExecError::Spawn { .. } => MountError::Command(e.to_string()),
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn io_err(path: &Path, e: std::io::Error) -> MountError {
    if e.kind() == std::io::ErrorKind::NotFound {
        MountError::NotFound(path.display().to_string())
    } else {
        MountError::Io(format!("{}: {e}", path.display()))
    }
}

/// `major:minor` of a device number as mountinfo prints it.
fn major_minor(rdev: u64) -> String {
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// Parses `blkid -p -o export` output: the filesystem type, or a description of another
/// signature (partition table, RAID member, ...) that must not be formatted over either.
pub fn parse_blkid_export(stdout: &str) -> Option<String> {
    let mut fs = None;
    let mut pt = None;
    let mut usage = None;
    for line in stdout.lines() {
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "TYPE" => fs = Some(v.trim().to_string()),
                "PTTYPE" => pt = Some(v.trim().to_string()),
                "USAGE" => usage = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (fs, pt, usage) {
        (Some(t), _, _) => Some(t),
        (None, Some(p), _) => Some(format!("{p} partition table")),
        (None, None, Some(u)) => Some(format!("{u} signature")),
        (None, None, None) => None,
    }
}

#[async_trait]
impl Mounter for RealMounter {
    async fn filesystem_of(&self, device: &Path) -> Result<Option<String>, MountError> {
        // -p: probe the device itself, not blkid's cache. Exit 2: nothing found.
        let args = vec!["-p".into(), "-o".into(), "export".into(), s(device)];
        let out = self.run("blkid", &args).await?;
        match out.code {
            Some(0) => Ok(parse_blkid_export(&out.stdout)
                .or_else(|| Some("unrecognised signature".to_string()))),
            Some(2) => Ok(None),
            _ => Err(MountError::Command(format!(
                "`{}` failed: {}",
                command_line("blkid", &args),
                out.failure_text()
            ))),
        }
    }

    async fn check_filesystem(&self, device: &Path, fs_type: &str) -> Result<FsCheck, MountError> {
        if fs_type != "ext4" {
            // xfs: the mount replays the log; xfs_repair is never run automatically.
            return Ok(FsCheck::Clean);
        }
        // -p (preen): repair only what is safe without a person (journal replay, counts,
        // orphan lists); anything else ends with exit 4 and leaves the filesystem alone.
        let args = vec!["-p".into(), s(device)];
        let out = self.run("e2fsck", &args).await?;
        fsck_outcome(device, &out)
    }

    async fn format(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
        let (program, args): (&str, Vec<String>) = match fs_type {
            // No -F: mke2fs needs no force for a whole device; discard of a large remote
            // volume can take minutes, and a fresh RDS file is zeroed anyway.
            "ext4" => (
                "mkfs.ext4",
                vec!["-q".into(), "-E".into(), "nodiscard".into(), s(device)],
            ),
            // No -f: mkfs.xfs refuses a device holding any signature.
            "xfs" => ("mkfs.xfs", vec!["-q".into(), "-K".into(), s(device)]),
            other => {
                return Err(MountError::Unsupported(format!(
                    "filesystem type {other:?}; supported: {SUPPORTED_FS_TYPES:?}"
                )));
            }
        };
        self.run_ok(program, &args).await.map(|_| ())
    }

    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let mut args = vec!["-t".to_string(), fs_type.to_string()];
        if !options.is_empty() {
            args.push("-o".into());
            args.push(options.join(","));
        }
        args.push(s(source));
        args.push(s(target));
        self.run_ok("mount", &args).await.map(|_| ())
    }

    async fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
        self.run_ok("mount", &["--bind".into(), s(source), s(target)])
            .await?;
        if readonly {
            // A bind mount inherits the source's flags; read-only needs a remount.
            let remount = vec!["-o".into(), "remount,bind,ro".into(), s(target)];
            if let Err(e) = self.run_ok("mount", &remount).await {
                // Never leave a writable bind where a read-only one was asked for.
                let _ = self.unmount(target).await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mounted = self.mounts().await?.iter().any(|m| m.target == target);
        if !mounted {
            return Ok(());
        }
        let args = vec![s(target)];
        let out = self.run("umount", &args).await?;
        if out.success() {
            return Ok(());
        }
        if self.mounts().await?.iter().any(|m| m.target == target) {
            return Err(MountError::Busy(format!(
                "`umount {}` failed and it is still mounted (in use?): {}",
                target.display(),
                out.failure_text()
            )));
        }
        Ok(())
    }

    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        let path = self.mountinfo.clone();
        let text = self
            .blocking(format!("reading {}", path.display()), move || {
                consistent_read(&path)
            })
            .await?;
        mountinfo::parse(&text)
    }

    async fn resize_fs(
        &self,
        device: &Path,
        mount_path: &Path,
        fs_type: &str,
    ) -> Result<(), MountError> {
        match fs_type {
            "ext4" | "ext3" => {
                // The kernel refuses an online ext4 resize (EPERM) without CAP_SYS_RESOURCE;
                // say so up front instead of relaying resize2fs's bare "Permission denied".
                if !has_cap_sys_resource() {
                    return Err(MountError::Unsupported(format!(
                        "online resize of ext4 on {}: the node plugin lacks CAP_SYS_RESOURCE \
                         (run its container privileged or add the capability)",
                        device.display()
                    )));
                }
                let args = vec![s(device)];
                let out = self.run("resize2fs", &args).await?;
                if out.success() {
                    Ok(())
                } else {
                    Err(MountError::Command(format!(
                        "online resize of ext4 on {} failed ({}); online ext4 resize needs \
                         CAP_SYS_RESOURCE in the node plugin's container",
                        device.display(),
                        out.failure_text()
                    )))
                }
            }
            "xfs" => self
                .run_ok("xfs_growfs", &[s(mount_path)])
                .await
                .map(|_| ()),
            other => Err(MountError::Unsupported(format!(
                "cannot grow a {other} filesystem; supported: {SUPPORTED_FS_TYPES:?}"
            ))),
        }
    }

    async fn stats(&self, path: &Path) -> Result<UsageStats, MountError> {
        let p = path.to_path_buf();
        self.blocking(format!("statvfs {}", path.display()), move || statvfs(&p))
            .await
    }

    async fn device_size(&self, device: &Path) -> Result<u64, MountError> {
        let d = device.to_path_buf();
        self.blocking(format!("size of {}", device.display()), move || {
            use std::io::{Seek, SeekFrom};
            let mut f = std::fs::File::open(&d).map_err(|e| io_err(&d, e))?;
            f.seek(SeekFrom::End(0)).map_err(|e| io_err(&d, e))
        })
        .await
    }

    async fn device_binds(&self, device: &Path) -> Result<Vec<PathBuf>, MountError> {
        let Some(name) = device.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Ok(Vec::new());
        };
        let rdev = match self.device_number(device).await {
            Ok(r) => r,
            Err(MountError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // Cheap filter first (a bind of a device node has the node's path as its root),
        // then stat only those candidates: stat on an unrelated dead mount could hang.
        let suffix = format!("/{name}");
        let mut candidates: Vec<PathBuf> = self
            .mounts()
            .await?
            .into_iter()
            .filter(|m| m.root.ends_with(&suffix))
            .map(|m| m.target)
            .collect();
        candidates.sort();
        candidates.dedup();
        let mut found = Vec::new();
        for c in candidates {
            let p = c.clone();
            let rdev = rdev.clone();
            let is_it = self
                .blocking(format!("stat {}", c.display()), move || {
                    Ok(match std::fs::metadata(&p) {
                        Ok(m) => m.file_type().is_block_device() && major_minor(m.rdev()) == rdev,
                        Err(_) => false,
                    })
                })
                .await?;
            if is_it {
                found.push(c);
            }
        }
        Ok(found)
    }

    async fn device_number(&self, device: &Path) -> Result<String, MountError> {
        let d = device.to_path_buf();
        self.blocking(format!("stat {}", device.display()), move || {
            let m = std::fs::metadata(&d).map_err(|e| io_err(&d, e))?;
            if !m.file_type().is_block_device() {
                return Err(MountError::NotFound(format!(
                    "{} is not a block device",
                    d.display()
                )));
            }
            Ok(major_minor(m.rdev()))
        })
        .await
    }

    async fn prepare_target(&self, path: &Path, kind: TargetKind) -> Result<(), MountError> {
        let p = path.to_path_buf();
        self.blocking(format!("creating {}", path.display()), move || {
            match (std::fs::symlink_metadata(&p), kind) {
                (Ok(m), TargetKind::Directory) if m.is_dir() => return Ok(()),
                (Ok(m), TargetKind::File) if m.is_file() || m.file_type().is_block_device() => {
                    return Ok(());
                }
                // Some COs (csi-sanity) create every target as a directory; a raw block
                // publish needs a file there. Only an empty directory is replaced.
                (Ok(m), TargetKind::File) if m.is_dir() && std::fs::remove_dir(&p).is_ok() => {}
                (Ok(_), _) => {
                    return Err(MountError::Io(format!(
                        "{} exists and is not a {}",
                        p.display(),
                        if kind == TargetKind::Directory {
                            "directory"
                        } else {
                            "file"
                        }
                    )));
                }
                (Err(e), _) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(&p, e));
                }
                (Err(_), _) => {}
            }
            match kind {
                TargetKind::Directory => std::fs::create_dir_all(&p).map_err(|e| io_err(&p, e)),
                TargetKind::File => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
                    }
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&p)
                        .map(|_| ())
                        .map_err(|e| io_err(&p, e))
                }
            }
        })
        .await
    }

    async fn remove_target(&self, path: &Path) -> Result<(), MountError> {
        let p = path.to_path_buf();
        self.blocking(format!("removing {}", path.display()), move || {
            let m = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err(&p, e)),
            };
            let r = if m.is_dir() {
                // Never recursive: a non-empty directory here means something is wrong.
                std::fs::remove_dir(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(&p, e)),
            }
        })
        .await
    }

    async fn path_exists(&self, path: &Path) -> Result<bool, MountError> {
        let p = path.to_path_buf();
        self.blocking(format!("stat {}", path.display()), move || {
            Ok(std::fs::symlink_metadata(&p).is_ok())
        })
        .await
    }
}

/// Reads a /proc table until two consecutive reads agree. The kernel generates
/// `/proc/self/mountinfo` chunk by chunk; a mount or unmount elsewhere between two chunks
/// can drop or repeat lines, and a missed line would make a mounted path look unmounted.
fn consistent_read(path: &Path) -> Result<String, MountError> {
    const ATTEMPTS: usize = 8;
    let mut last = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    for _ in 0..ATTEMPTS {
        let next = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        if next == last {
            return Ok(next);
        }
        last = next;
    }
    Err(MountError::Io(format!(
        "{} kept changing over {ATTEMPTS} reads (mount storm?); retry",
        path.display()
    )))
}

/// Reads `e2fsck -p`'s exit status (a bit mask, e2fsck(8)): 0 clean; 1 (and 2, "reboot",
/// which only concerns a mounted root filesystem) errors corrected; 4 errors left
/// uncorrected; 8 and above, the check itself failed.
fn fsck_outcome(device: &Path, out: &CommandOutput) -> Result<FsCheck, MountError> {
    let text = out.failure_text();
    match out.code {
        Some(0) => Ok(FsCheck::Clean),
        Some(c) if c & !3 == 0 => Ok(FsCheck::Repaired(
            out.stdout.trim().replace('\n', "; "),
        )),
        Some(c) if c & 4 != 0 && c & !7 == 0 => Err(MountError::Corrupt(format!(
            "e2fsck -p found errors on {} it cannot repair without a person ({text}); the \
             volume was not mounted. Run `e2fsck -f {}` on the node by hand (it asks before \
             each repair) or restore the volume from a snapshot",
            device.display(),
            device.display()
        ))),
        _ => Err(MountError::Command(format!(
            "`e2fsck -p {}` could not check the filesystem: {text}",
            device.display()
        ))),
    }
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of `CapEff` in /proc/self/status).
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        // Unknown: let resize2fs try and report.
        .is_none_or(|eff| eff & (1 << CAP_SYS_RESOURCE) != 0)
}

fn statvfs(path: &Path) -> Result<UsageStats, MountError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| MountError::Io(format!("{}: path contains NUL", path.display())))?;
    // SAFETY: `c` is a valid NUL-terminated string; `st` is a plain C struct the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io_err(path, std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    let total = (st.f_blocks as u64).saturating_mul(frsize);
    let free = (st.f_bfree as u64).saturating_mul(frsize);
    let avail = (st.f_bavail as u64).saturating_mul(frsize);
    let files = st.f_files as u64;
    let ffree = st.f_ffree as u64;
    Ok(UsageStats {
        total_bytes: total,
        available_bytes: avail,
        used_bytes: total.saturating_sub(free),
        total_inodes: files,
        free_inodes: ffree,
        used_inodes: files.saturating_sub(ffree),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::exec::testing::{ScriptedRunner, fail, ok};

    fn mounter(r: Arc<ScriptedRunner>) -> RealMounter {
        RealMounter::new(r, Duration::from_secs(10))
    }

    #[test]
    fn blkid_export_reports_filesystems_and_other_signatures() {
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Some("ext4".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/sda\nPTUUID=1\nPTTYPE=gpt\n"),
            Some("gpt partition table".into())
        );
        assert_eq!(parse_blkid_export("DEVNAME=/dev/x\n"), None);
    }

    #[tokio::test]
    async fn ext4_is_preened_before_mounting_and_errors_that_need_a_person_are_refused() {
        let r = Arc::new(ScriptedRunner::new(|argv| match argv[2].as_str() {
            "/dev/clean" => ok("/dev/clean: clean, 11/16384 files\n"),
            "/dev/journal" => Ok(crate::node::exec::CommandOutput {
                code: Some(1),
                stdout: "/dev/journal: recovering journal\n".into(),
                stderr: String::new(),
            }),
            "/dev/broken" => fail(4, "/dev/broken: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY."),
            _ => fail(8, "e2fsck: No such file or directory while trying to open /dev/gone"),
        }));
        let m = mounter(r.clone());
        let check = |d: &'static str| m.check_filesystem(Path::new(d), "ext4");
        assert_eq!(check("/dev/clean").await, Ok(FsCheck::Clean));
        assert_eq!(
            check("/dev/journal").await,
            Ok(FsCheck::Repaired("/dev/journal: recovering journal".into()))
        );
        let err = check("/dev/broken").await.unwrap_err();
        assert!(
            matches!(&err, MountError::Corrupt(m) if m.contains("e2fsck -f /dev/broken") && m.contains("MANUALLY")),
            "{err:?}"
        );
        assert!(matches!(check("/dev/gone").await, Err(MountError::Command(_))));
        // xfs is not checked: its mount replays the log.
        assert_eq!(
            m.check_filesystem(Path::new("/dev/x"), "xfs").await,
            Ok(FsCheck::Clean)
        );
        assert_eq!(r.calls()[0], vec!["e2fsck", "-p", "/dev/clean"]);
        assert_eq!(r.calls().len(), 4, "never -y, never xfs_repair");
    }

    #[tokio::test]
    async fn blkid_exit_2_means_blank_and_other_failures_are_errors() {
        let r = Arc::new(ScriptedRunner::new(|_| fail(2, "")));
        assert_eq!(
            mounter(r.clone())
                .filesystem_of(Path::new("/dev/loop3"))
                .await,
            Ok(None)
        );
        assert_eq!(
            r.calls(),
            vec![vec!["blkid", "-p", "-o", "export", "/dev/loop3"]]
        );
        let r = Arc::new(ScriptedRunner::new(|_| fail(4, "bad usage")));
        assert!(matches!(
            mounter(r).filesystem_of(Path::new("/dev/loop3")).await,
            Err(MountError::Command(_))
        ));
    }

    #[tokio::test]
    async fn format_and_mount_command_lines() {
        let r = Arc::new(ScriptedRunner::new(|_| ok("")));
        let m = mounter(r.clone());
        m.format(Path::new("/dev/nvme1n1"), "ext4").await.unwrap();
        m.format(Path::new("/dev/nvme1n1"), "xfs").await.unwrap();
        assert!(matches!(
            m.format(Path::new("/dev/nvme1n1"), "btrfs").await,
            Err(MountError::Unsupported(_))
        ));
        m.mount(
            Path::new("/dev/nvme1n1"),
            Path::new("/stage"),
            "xfs",
            &["nouuid".into(), "ro".into()],
        )
        .await
        .unwrap();
        m.bind(Path::new("/stage"), Path::new("/target"), true)
            .await
            .unwrap();
        assert_eq!(
            r.calls(),
            vec![
                vec!["mkfs.ext4", "-q", "-E", "nodiscard", "/dev/nvme1n1"],
                vec!["mkfs.xfs", "-q", "-K", "/dev/nvme1n1"],
                vec![
                    "mount",
                    "-t",
                    "xfs",
                    "-o",
                    "nouuid,ro",
                    "/dev/nvme1n1",
                    "/stage"
                ],
                vec!["mount", "--bind", "/stage", "/target"],
                vec!["mount", "-o", "remount,bind,ro", "/target"],
            ]
        );
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;
    use crate::node::exec::testing::{ScriptedRunner, ok};

    #[tokio::test]
    async fn a_block_target_replaces_an_empty_directory_but_not_a_full_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = RealMounter::new(Arc::new(ScriptedRunner::new(|_| ok(""))), Duration::from_secs(10));
        let t = dir.path().join("a/b");
        std::fs::create_dir_all(&t).unwrap();
        m.prepare_target(&t, TargetKind::File).await.unwrap();
        assert!(t.is_file());
        let full = dir.path().join("full");
        std::fs::create_dir_all(full.join("x")).unwrap();
        assert!(m.prepare_target(&full, TargetKind::File).await.is_err());
        assert!(full.join("x").is_dir());
    }
}
